/* Note [CPU decode attention]
 *
 * Rationale. On the CPU reference path a decode step (one query token per request) reads every K/V row
 * of every request once, so it should run at memory bandwidth. PyTorch's CPU SDPA does not get there in
 * bf16: it is compute-bound on this shape (4 query rows per KV head under GQA), measured at ~3.8x the
 * read-bandwidth floor at batch 32, context 4096 (bench/allocator.py, part "decode").
 *
 * Approach. One fused pass, flash-decoding style: the query heads a KV head serves under GQA
 * (num_heads / num_kv_heads of them) are processed together, so each K and V row is read once; scores,
 * an online softmax (running max m, running sum l, accumulator rescaled when m grows) and the weighted
 * V sum stay in float32. Keys are taken in blocks of ATTN_BLOCK_KEYS:
 *
 *     keys of request b:  [0, B) [B, 2B) ... [kB, L)          L = seqlens[b]; nothing at or past L is read
 *     per block:          s = q.K^T * scale * log2(e)  ->  m' = max(m, max s),  p = 2^(s - m'),
 *                         l = l * 2^(m - m') + sum p,  acc = acc * 2^(m - m') + p.V
 *     end:                out = acc / l                (L == 0 gives zeros, as FlashAttention does)
 *
 * A work item is one request and as many of its KV heads as ATTN_MAX_ROWS query rows allow (all 8 of
 * a 32/8-head model): a block of keys then covers whole [Hkv, D] token rows, so NHD is read as
 * sequentially as HND. With num_threads > 1 and enough keys, worker pthreads take items from an atomic
 * counter (the calling thread is one of them); items shrink to one KV head when that leaves too few.
 *
 * Implementation. Three paths over the same algorithm, chosen per call by vmem_attn_decode_path:
 *   - AVX-512F: scores register-blocked over 4 query rows x 2 keys; V accumulated in 4 query rows x
 *     64 dims of registers while the block's V rows stream past; a vector 2^x (degree-6 polynomial and
 *     vscalefps); bf16 widened by a shift, fp16 by vcvtph2ps. Rows of the block after next (K) and of
 *     the next block (V) are prefetched into L2: the hardware prefetcher stops at 4 KiB pages and
 *     cannot follow NHD's head-strided rows (NHD ran at half HND's speed without it).
 *   - AVX512_BF16 (bf16 only, head_dim % 32 == 0): the same, but scores by vdpbf16ps straight from the
 *     stored bits against the unscaled bf16 query (exact), the scale applied to the float32 sum.
 *   - portable C, auto-vectorised at best: no AVX-512, head_dim % 16 != 0, non-x86, or flags
 *     VMEM_ATTN_PORTABLE (tests force it; VMEM_ATTN_NO_BF16_DOT forces AVX-512F over AVX512_BF16).
 * The x86 functions carry __attribute__((target(...))) and are picked with __builtin_cpu_supports, so
 * the file builds with plain flags on any x86-64 and on aarch64 (x86 code under #if defined(__x86_64__)).
 * K/V are read in place through element strides per cache row, token and head (last dim contiguous):
 * NHD, HND and layer-group views alike. Output is rounded to the storage dtype once (nearest-even).
 * Scratch (queries, accumulators, scores: ~150 KiB) is allocated per thread per call. The declarations
 * live in build.py (ATTN_DECLS: cffi's cdef and the module source) as well as here; a test keeps the
 * two in step.
 *
 * Limitations. seqlen_q == 1 only (the Python side keeps SDPA for the rest); head_dim <= 256; no alibi,
 * soft-cap, sliding window or dropout. Results match a float32 reference to rounding, not SDPA bit for
 * bit; vdpbf16ps flushes bf16 denormals (|x| < 1.2e-38) to zero. Threads are created per call (tens
 * of µs), so calls under ATTN_KEYS_PER_THREAD (key, KV head) pairs per thread stay on the caller's.
 * On the host backend K and V planes sit a power of two apart, which costs ~10% against separately
 * allocated tensors (bench: vmem HND vs static HND), likely DRAM bank conflicts between the two streams.
 */
#include <pthread.h>
#include <signal.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include "vmem.h"

#if defined(__x86_64__)
#include <immintrin.h>
#endif

/* ---- declarations: the same text as ATTN_DECLS in build.py ------------------------------------ */
#define VMEM_ATTN_F32 0
#define VMEM_ATTN_F16 1
#define VMEM_ATTN_BF16 2
#define VMEM_ATTN_PORTABLE 1
#define VMEM_ATTN_NO_BF16_DOT 2
#define VMEM_ATTN_PATH_PORTABLE 0
#define VMEM_ATTN_PATH_AVX512 1
#define VMEM_ATTN_PATH_AVX512_BF16 2

typedef struct {
    const void *q;          /* query b, head h: q + b*q_stride_b + h*q_stride_h, head_dim contiguous */
    const void *k_cache;    /* row r, token t, KV head h: k_cache + r*k_stride_b + t*k_stride_s + h*k_stride_h */
    const void *v_cache;
    void *out;              /* like q */
    const int64_t *seqlens; /* [batch] keys read by request b: [0, seqlens[b]) */
    const int64_t *rows;    /* [batch] cache row of request b */
    int64_t q_stride_b, q_stride_h;                 /* strides in elements */
    int64_t k_stride_b, k_stride_s, k_stride_h;
    int64_t v_stride_b, v_stride_s, v_stride_h;
    int64_t out_stride_b, out_stride_h;
    int32_t dtype;          /* VMEM_ATTN_F32 / F16 / BF16: q, caches and out alike */
    int32_t batch, num_heads, num_kv_heads, head_dim;
    int32_t num_threads;    /* upper bound on threads used, >= 1 */
    int32_t flags;          /* VMEM_ATTN_PORTABLE: no AVX-512; VMEM_ATTN_NO_BF16_DOT: no vdpbf16ps */
    float scale;            /* softmax scale */
} vmem_attn_decode_t;

int vmem_attn_decode(const vmem_attn_decode_t *args);
int vmem_attn_decode_path(int32_t head_dim, int32_t flags);
/* ---- end of declarations ---------------------------------------------------------------------- */

#define ATTN_BLOCK_KEYS 64      /* keys per softmax block */
#define ATTN_PREFETCH_K 128     /* K rows are prefetched this many keys ahead (the block after next) */
#define ATTN_PREFETCH_V 64      /* V rows: the next block (K and V streams apart: see Limitations) */
#define ATTN_MAX_ROWS 64        /* query rows per work item (several KV heads when the group is small) */
#define ATTN_MAX_DIM 256
#define ATTN_KEYS_PER_THREAD 16384  /* (key, KV head) pairs of work that justify one more thread */
#define ATTN_MAX_THREADS 64
#define LOG2E 1.44269504088896340736f

typedef struct {
    float q[ATTN_MAX_ROWS * ATTN_MAX_DIM];      /* query rows, pre-multiplied by scale * log2(e) */
    float acc[ATTN_MAX_ROWS * ATTN_MAX_DIM];    /* unnormalised output rows */
    uint16_t qb[ATTN_MAX_ROWS * ATTN_MAX_DIM];  /* bf16 query rows as given (the bf16 dot-product path) */
    float s[ATTN_MAX_ROWS * ATTN_BLOCK_KEYS];   /* scores, then probabilities, of one block */
    float m[ATTN_MAX_ROWS], l[ATTN_MAX_ROWS];   /* running max (log2 units) and sum */
} attn_scratch_t;                               /* one per thread, 64-byte aligned, on the heap */

/* ---- scalar conversions (exact widening; rounding narrowing, nearest-even) ------------------- */

static inline float bits_f32(uint32_t u) { float f; memcpy(&f, &u, 4); return f; }
static inline uint32_t f32_bits(float f) { uint32_t u; memcpy(&u, &f, 4); return u; }

static inline float bf16_f32(uint16_t h) { return bits_f32((uint32_t)h << 16); }

static inline uint16_t f32_bf16(float f) {
    uint32_t u = f32_bits(f);
    if ((u & 0x7fffffffu) > 0x7f800000u)
        return (uint16_t)((u >> 16) | 0x40u);              /* quiet NaN */
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

/* fp16 <-> fp32 without F16C: the bit tricks of Marat Dukhan's FP16 library (MIT). */
static inline float f16_f32(uint16_t h) {
    const uint32_t w = (uint32_t)h << 16, sign = w & 0x80000000u, two_w = w + w;
    const float normalized = bits_f32((two_w >> 4) + (0xE0u << 23)) * 0x1.0p-112f;
    const float denormalized = bits_f32((two_w >> 17) | (126u << 23)) - 0.5f;
    return bits_f32(sign | (two_w < (1u << 27) ? f32_bits(denormalized) : f32_bits(normalized)));
}

static inline uint16_t f32_f16(float f) {
    float base = (__builtin_fabsf(f) * 0x1.0p+112f) * 0x1.0p-110f;
    const uint32_t w = f32_bits(f), shl1_w = w + w, sign = w & 0x80000000u;
    uint32_t bias = shl1_w & 0xFF000000u;
    if (bias < 0x71000000u)
        bias = 0x71000000u;
    base = bits_f32((bias >> 1) + 0x07800000u) + base;
    const uint32_t bits = f32_bits(base);
    const uint32_t nonsign = ((bits >> 13) & 0x7C00u) + (bits & 0x0FFFu);
    return (uint16_t)((sign >> 16) | (shl1_w > 0xFF000000u ? 0x7E00u : nonsign));
}

/* 2^x for x <= 0 (the softmax's only case): 2^floor(x) * p(frac), p a degree-6 fit (rel. error 6e-9). */
#define EXP2_C0 1.000000006158204f
#define EXP2_C1 0.6931468377007519f
#define EXP2_C2 0.240231096761393f
#define EXP2_C3 0.055478912463380964f
#define EXP2_C4 0.009686186289582578f
#define EXP2_C5 0.0012382415543543816f
#define EXP2_C6 0.00021871262307292775f

static inline float exp2_neg(float x) {
    if (!(x >= -126.0f))
        return x != x ? x : 0.0f;                           /* NaN stays NaN; -inf and tiny give 0 */
    float xi = (float)(int)x;
    if (xi > x)
        xi -= 1.0f;
    const float f = x - xi;
    const float p = EXP2_C0 + f * (EXP2_C1 + f * (EXP2_C2 + f * (EXP2_C3 + f * (EXP2_C4 + f * (EXP2_C5 + f * EXP2_C6)))));
    return p * bits_f32((uint32_t)((int)xi + 127) << 23);
}

static void load_row(float *dst, const void *src, int32_t dtype, int d) {
    if (dtype == VMEM_ATTN_F32) {
        memcpy(dst, src, (size_t)d * sizeof(float));
    } else if (dtype == VMEM_ATTN_BF16) {
        const uint16_t *h = src;
        for (int i = 0; i < d; i++)
            dst[i] = bf16_f32(h[i]);
    } else {
        const uint16_t *h = src;
        for (int i = 0; i < d; i++)
            dst[i] = f16_f32(h[i]);
    }
}

static void store_row(void *dst, const float *src, float mul, int32_t dtype, int d) {
    if (dtype == VMEM_ATTN_F32) {
        float *o = dst;
        for (int i = 0; i < d; i++)
            o[i] = src[i] * mul;
    } else {
        uint16_t *o = dst;
        for (int i = 0; i < d; i++)
            o[i] = dtype == VMEM_ATTN_BF16 ? f32_bf16(src[i] * mul) : f32_f16(src[i] * mul);
    }
}

/* ---- one work item: request b, KV heads [h0, h0 + num_heads), query rows [row0, row0 + head_rows) of each
 * head's group. Scratch row i belongs to KV head h0 + i / head_rows. Taking all KV heads of a request in
 * one item makes NHD reads sequential (a block of keys covers whole [Hkv, D] token rows). ---- */

typedef struct {
    const char *k, *v;              /* token 0 of KV head h0 of this cache row */
    int64_t k_step, v_step;         /* bytes between tokens */
    int64_t k_head, v_head;         /* bytes between KV heads */
    int64_t num_keys;
    int num_heads, head_rows, d;    /* KV heads, query rows per KV head, head_dim */
    int row_bytes;                  /* bytes of one head's row: head_dim elements */
    float qmul;                     /* scale * log2(e): what s->q already holds, s->qb does not */
} attn_item_t;

static size_t dtype_bytes(int32_t dtype) { return dtype == VMEM_ATTN_F32 ? 4 : 2; }

static const char *q_row(const vmem_attn_decode_t *a, const void *base, int64_t b, int64_t qh, int out) {
    const int64_t off = out ? b * a->out_stride_b + qh * a->out_stride_h : b * a->q_stride_b + qh * a->q_stride_h;
    return (const char *)base + off * (int64_t)dtype_bytes(a->dtype);
}

/* Fills s->q, s->m, s->l, zeroes s->acc; returns the item's geometry. */
static attn_item_t item_begin(const vmem_attn_decode_t *a, int64_t b, int h0, int num_heads, int row0,
                              int head_rows, attn_scratch_t *s) {
    const int64_t eb = (int64_t)dtype_bytes(a->dtype);
    const int d = a->head_dim, group = a->num_heads / a->num_kv_heads, nr = num_heads * head_rows;
    const int64_t r = a->rows[b];
    attn_item_t it = {
        .k = (const char *)a->k_cache + (r * a->k_stride_b + h0 * a->k_stride_h) * eb,
        .v = (const char *)a->v_cache + (r * a->v_stride_b + h0 * a->v_stride_h) * eb,
        .k_step = a->k_stride_s * eb, .v_step = a->v_stride_s * eb,
        .k_head = a->k_stride_h * eb, .v_head = a->v_stride_h * eb,
        .num_keys = a->seqlens[b], .num_heads = num_heads, .head_rows = head_rows, .d = d,
        .row_bytes = d * (int)eb, .qmul = a->scale * LOG2E,
    };
    for (int i = 0; i < nr; i++) {
        const int64_t qh = (int64_t)(h0 + i / head_rows) * group + row0 + i % head_rows;
        const char *src = q_row(a, a->q, b, qh, 0);
        load_row(s->q + i * d, src, a->dtype, d);
        if (a->dtype == VMEM_ATTN_BF16)
            memcpy(s->qb + i * d, src, (size_t)d * 2);
        for (int j = 0; j < d; j++)
            s->q[i * d + j] *= it.qmul;
        s->m[i] = -__builtin_inff();
        s->l[i] = 0.0f;
    }
    memset(s->acc, 0, sizeof(float) * (size_t)nr * d);
    return it;
}

static void item_end(const vmem_attn_decode_t *a, int64_t b, int h0, int num_heads, int row0, int head_rows,
                     const attn_scratch_t *s) {
    const int d = a->head_dim, group = a->num_heads / a->num_kv_heads;
    for (int i = 0; i < num_heads * head_rows; i++) {
        const int64_t qh = (int64_t)(h0 + i / head_rows) * group + row0 + i % head_rows;
        const float mul = s->l[i] == 0.0f ? 0.0f : 1.0f / s->l[i];  /* no keys: zeros; NaN stays NaN */
        store_row((char *)q_row(a, a->out, b, qh, 1), s->acc + i * d, mul, a->dtype, d);
    }
}

/* Online-softmax update of one block's scores (log2 units) in place; rescales acc. Portable. */
static void softmax_block(attn_scratch_t *s, int num_rows, int n, int d) {
    for (int i = 0; i < num_rows; i++) {
        float *si = s->s + i * ATTN_BLOCK_KEYS;
        float mb = s->m[i];
        for (int j = 0; j < n; j++)
            mb = si[j] > mb ? si[j] : mb;
        const float alpha = exp2_neg(s->m[i] - mb);
        float sum = 0.0f;
        for (int j = 0; j < n; j++) {
            si[j] = exp2_neg(si[j] - mb);
            sum += si[j];
        }
        s->m[i] = mb;
        s->l[i] = s->l[i] * alpha + sum;
        if (alpha != 1.0f)
            for (int j = 0; j < d; j++)
                s->acc[i * d + j] *= alpha;
    }
}

/* Eight partial sums: a loop the compiler can vectorise without reassociating (no -ffast-math). */
static inline float dot(const float *a, const float *b, int d) {
    float p[8] = {0};
    int c = 0;
    for (; c + 8 <= d; c += 8)
        for (int l = 0; l < 8; l++)
            p[l] += a[c + l] * b[c + l];
    float tail = 0.0f;
    for (; c < d; c++)
        tail += a[c] * b[c];
    return tail + ((p[0] + p[4]) + (p[1] + p[5])) + ((p[2] + p[6]) + (p[3] + p[7]));
}

static void item_portable(const attn_item_t *it, attn_scratch_t *s, int32_t dtype) {
    float row[ATTN_MAX_DIM];
    const int d = it->d, hr = it->head_rows, nr = it->num_heads * hr;
    for (int64_t t0 = 0; t0 < it->num_keys; t0 += ATTN_BLOCK_KEYS) {
        const int n = (int)(it->num_keys - t0 < ATTN_BLOCK_KEYS ? it->num_keys - t0 : ATTN_BLOCK_KEYS);
        for (int j = 0; j < n; j++)
            for (int h = 0; h < it->num_heads; h++) {
                load_row(row, it->k + h * it->k_head + (t0 + j) * it->k_step, dtype, d);
                for (int i = h * hr; i < (h + 1) * hr; i++)
                    s->s[i * ATTN_BLOCK_KEYS + j] = dot(s->q + i * d, row, d);
            }
        softmax_block(s, nr, n, d);
        for (int j = 0; j < n; j++)
            for (int h = 0; h < it->num_heads; h++) {
                load_row(row, it->v + h * it->v_head + (t0 + j) * it->v_step, dtype, d);
                for (int i = h * hr; i < (h + 1) * hr; i++) {
                    const float p = s->s[i * ATTN_BLOCK_KEYS + j];
                    float *acc = s->acc + i * d;
                    for (int c = 0; c < d; c++)
                        acc[c] += p * row[c];
                }
            }
    }
}

/* ---- AVX-512F path ---------------------------------------------------------------------------- */
#if defined(__x86_64__)
#define AVX512 __attribute__((target("avx512f")))
#define AVX512_INLINE static inline __attribute__((always_inline, target("avx512f")))

/* 16 elements at p[i..i+16) widened to float32; dtype is a constant after inlining. */
AVX512_INLINE __m512 x_load(const char *p, int i, const int dtype) {
    if (dtype == VMEM_ATTN_F32)
        return _mm512_loadu_ps((const float *)p + i);
    const __m256i h = _mm256_loadu_si256((const __m256i *)((const uint16_t *)p + i));
    if (dtype == VMEM_ATTN_F16)
        return _mm512_cvtph_ps(h);
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

/* 2^x, x <= 0 (NaN passes through: max(lo, NaN) returns the NaN operand). */
AVX512_INLINE __m512 x_exp2(__m512 x) {
    x = _mm512_max_ps(_mm512_set1_ps(-127.0f), x);
    const __m512 xi = _mm512_roundscale_ps(x, _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
    const __m512 f = _mm512_sub_ps(x, xi);
    __m512 p = _mm512_set1_ps(EXP2_C6);
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(EXP2_C5));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(EXP2_C4));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(EXP2_C3));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(EXP2_C2));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(EXP2_C1));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(EXP2_C0));
    return _mm512_scalef_ps(p, xi);
}

/* Rows to prefetch while a block's scores are computed: K rows [0, num_k) from k, V rows [0, num_v) from v. */
typedef struct {
    const char *k, *v;
    int64_t k_step, v_step;
    int num_k, num_v, row_bytes;
} attn_prefetch_t;

/* Asks for row j's cache lines (into L2): the hardware prefetcher stops at 4 KiB pages and cannot follow
 * NHD's head-strided rows. */
AVX512_INLINE void x_prefetch(const attn_prefetch_t *pf, int j) {
    if (j < pf->num_k)
        for (int o = 0; o < pf->row_bytes; o += 64)
            _mm_prefetch(pf->k + j * pf->k_step + o, _MM_HINT_T1);
    if (j < pf->num_v)
        for (int o = 0; o < pf->row_bytes; o += 64)
            _mm_prefetch(pf->v + j * pf->v_step + o, _MM_HINT_T1);
}

/* Horizontal sums of 4 vectors -> [sum a0, sum a1, sum a2, sum a3]. */
AVX512_INLINE __m128 x_sum4(__m512 a0, __m512 a1, __m512 a2, __m512 a3) {
    const __m512 t01 = _mm512_add_ps(_mm512_unpacklo_ps(a0, a1), _mm512_unpackhi_ps(a0, a1));
    const __m512 t23 = _mm512_add_ps(_mm512_unpacklo_ps(a2, a3), _mm512_unpackhi_ps(a2, a3));
    /* per 128-bit lane: t01 = [a0 a1 a0 a1] partials, t23 = [a2 a3 a2 a3] */
    const __m512 u = _mm512_add_ps(_mm512_shuffle_ps(t01, t23, _MM_SHUFFLE(1, 0, 1, 0)),
                                   _mm512_shuffle_ps(t01, t23, _MM_SHUFFLE(3, 2, 3, 2)));
    const __m256 w = _mm256_add_ps(_mm512_castps512_ps256(u),
                                   _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(u), 1)));
    return _mm_add_ps(_mm256_castps256_ps128(w), _mm256_extractf128_ps(w, 1));
}

/* Scores of n keys for query rows q[0..R) (R <= 4, a constant after inlining) into s (row stride
 * ATTN_BLOCK_KEYS). Two keys at a time keep 2R independent FMA chains in flight. Prefetches the next
 * rows pf names on the way. */
AVX512_INLINE void x_scores(const float *q, const char *k, int64_t k_step, int n, int d, float *s,
                            const attn_prefetch_t *pf, const int R, const int dtype) {
    int j = 0;
    for (; j + 2 <= n; j += 2) {
        x_prefetch(pf, j);
        x_prefetch(pf, j + 1);
        const char *k0 = k + j * k_step, *k1 = k0 + k_step;
        __m512 a0[4], a1[4];
#pragma GCC unroll 4
        for (int r = 0; r < 4; r++)
            a0[r] = a1[r] = _mm512_setzero_ps();
        for (int c = 0; c < d; c += 16) {
            const __m512 x0 = x_load(k0, c, dtype), x1 = x_load(k1, c, dtype);
#pragma GCC unroll 4
            for (int r = 0; r < R; r++) {
                const __m512 qr = _mm512_load_ps(q + r * d + c);
                a0[r] = _mm512_fmadd_ps(qr, x0, a0[r]);
                a1[r] = _mm512_fmadd_ps(qr, x1, a1[r]);
            }
        }
        float t0[4], t1[4];
        _mm_storeu_ps(t0, x_sum4(a0[0], a0[1], a0[2], a0[3]));
        _mm_storeu_ps(t1, x_sum4(a1[0], a1[1], a1[2], a1[3]));
#pragma GCC unroll 4
        for (int r = 0; r < R; r++) {
            s[r * ATTN_BLOCK_KEYS + j] = t0[r];
            s[r * ATTN_BLOCK_KEYS + j + 1] = t1[r];
        }
    }
    if (j < n) {
        x_prefetch(pf, j);
        const char *k0 = k + j * k_step;
        __m512 a0[4];
#pragma GCC unroll 4
        for (int r = 0; r < 4; r++)
            a0[r] = _mm512_setzero_ps();
        for (int c = 0; c < d; c += 16) {
            const __m512 x0 = x_load(k0, c, dtype);
#pragma GCC unroll 4
            for (int r = 0; r < R; r++)
                a0[r] = _mm512_fmadd_ps(_mm512_load_ps(q + r * d + c), x0, a0[r]);
        }
        float t0[4];
        _mm_storeu_ps(t0, x_sum4(a0[0], a0[1], a0[2], a0[3]));
#pragma GCC unroll 4
        for (int r = 0; r < R; r++)
            s[r * ATTN_BLOCK_KEYS + j] = t0[r];
    }
}

/* acc[r][0..d) += sum_j p[r][j] * V[j] for query rows r < R: registers hold R rows x W vectors of acc
 * while the block's V rows stream past (W = 4, i.e. 64 dims, then 16-dim tails). */
AVX512_INLINE void x_accum(float *acc, const float *p, const char *v, int64_t v_step, int n, int d,
                           const int R, const int dtype) {
    int c = 0;
    for (; c + 64 <= d; c += 64) {
        __m512 a[4][4];
#pragma GCC unroll 4
        for (int r = 0; r < R; r++)
#pragma GCC unroll 4
            for (int w = 0; w < 4; w++)
                a[r][w] = _mm512_load_ps(acc + r * d + c + 16 * w);
        for (int j = 0; j < n; j++) {
            const char *vj = v + j * v_step;
            __m512 x[4];
#pragma GCC unroll 4
            for (int w = 0; w < 4; w++)
                x[w] = x_load(vj, c + 16 * w, dtype);
#pragma GCC unroll 4
            for (int r = 0; r < R; r++) {
                const __m512 pr = _mm512_set1_ps(p[r * ATTN_BLOCK_KEYS + j]);
#pragma GCC unroll 4
                for (int w = 0; w < 4; w++)
                    a[r][w] = _mm512_fmadd_ps(pr, x[w], a[r][w]);
            }
        }
#pragma GCC unroll 4
        for (int r = 0; r < R; r++)
#pragma GCC unroll 4
            for (int w = 0; w < 4; w++)
                _mm512_store_ps(acc + r * d + c + 16 * w, a[r][w]);
    }
    for (; c < d; c += 16) {
        __m512 a[4];
#pragma GCC unroll 4
        for (int r = 0; r < R; r++)
            a[r] = _mm512_load_ps(acc + r * d + c);
        for (int j = 0; j < n; j++) {
            const __m512 x = x_load(v + j * v_step, c, dtype);
#pragma GCC unroll 4
            for (int r = 0; r < R; r++)
                a[r] = _mm512_fmadd_ps(_mm512_set1_ps(p[r * ATTN_BLOCK_KEYS + j]), x, a[r]);
        }
#pragma GCC unroll 4
        for (int r = 0; r < R; r++)
            _mm512_store_ps(acc + r * d + c, a[r]);
    }
}

/* Vectorised softmax_block: max and 2^x over the block's keys, 16 at a time. */
AVX512_INLINE void x_softmax(attn_scratch_t *s, int num_rows, int n, int d) {
    for (int i = 0; i < num_rows; i++) {
        float *si = s->s + i * ATTN_BLOCK_KEYS;
        __m512 mv = _mm512_set1_ps(s->m[i]);
        for (int j = 0; j < n; j += 16) {
            const __mmask16 k = n - j >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (n - j)) - 1);
            mv = _mm512_mask_max_ps(mv, k, mv, _mm512_maskz_loadu_ps(k, si + j));
        }
        const float mb = _mm512_reduce_max_ps(mv);
        const float alpha = exp2_neg(s->m[i] - mb);
        const __m512 mbv = _mm512_set1_ps(mb);
        __m512 sum = _mm512_setzero_ps();
        for (int j = 0; j < n; j += 16) {
            const __mmask16 k = n - j >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (n - j)) - 1);
            const __m512 p = x_exp2(_mm512_sub_ps(_mm512_maskz_loadu_ps(k, si + j), mbv));
            _mm512_mask_storeu_ps(si + j, k, p);
            sum = _mm512_mask_add_ps(sum, k, sum, p);
        }
        s->m[i] = mb;
        s->l[i] = s->l[i] * alpha + _mm512_reduce_add_ps(sum);
        if (alpha != 1.0f) {
            const __m512 av = _mm512_set1_ps(alpha);
            for (int j = 0; j < d; j += 16)
                _mm512_store_ps(s->acc + i * d + j, _mm512_mul_ps(av, _mm512_load_ps(s->acc + i * d + j)));
        }
    }
}

/* Query rows in register blocks of 4: R is a constant in every call below. */
#define X_ROWS(call4, call3, call2, call1, left) \
    do { switch (left) { case 1: call1; break; case 2: call2; break; case 3: call3; break; default: call4; } } while (0)

static inline int block_keys(int64_t num_keys, int64_t t0) {
    const int64_t left = num_keys - t0;
    return (int)(left < 0 ? 0 : left < ATTN_BLOCK_KEYS ? left : ATTN_BLOCK_KEYS);
}

static inline attn_prefetch_t block_prefetch(const attn_item_t *it, int h, int64_t t0) {
    return (attn_prefetch_t){
        .k = it->k + h * it->k_head + (t0 + ATTN_PREFETCH_K) * it->k_step,
        .v = it->v + h * it->v_head + (t0 + ATTN_PREFETCH_V) * it->v_step,
        .k_step = it->k_step, .v_step = it->v_step,
        .num_k = block_keys(it->num_keys, t0 + ATTN_PREFETCH_K), .num_v = block_keys(it->num_keys, t0 + ATTN_PREFETCH_V),
        .row_bytes = it->row_bytes,
    };
}

/* Scores of the block of keys [t0, t0 + n) for every query row of the item; prefetches ahead. */
AVX512_INLINE void x_block_scores(const attn_item_t *it, attn_scratch_t *s, int64_t t0, const int dtype) {
    const int d = it->d, hr = it->head_rows;
    const int n = block_keys(it->num_keys, t0);
    for (int h = 0; h < it->num_heads; h++) {
        const char *k = it->k + h * it->k_head + t0 * it->k_step;
        attn_prefetch_t pf = block_prefetch(it, h, t0);
        for (int r = 0; r < hr; r += 4) {
            const float *q = s->q + (h * hr + r) * d;
            float *sc = s->s + (h * hr + r) * ATTN_BLOCK_KEYS;
            if (r)
                pf.num_k = pf.num_v = 0;        /* asked for by the first register block */
#define X_SCORES(R) x_scores(q, k, it->k_step, n, d, sc, &pf, R, dtype)
            X_ROWS(X_SCORES(4), X_SCORES(3), X_SCORES(2), X_SCORES(1), hr - r);
#undef X_SCORES
        }
    }
}

/* Softmax of the block's scores, then its V rows into the accumulators. */
AVX512_INLINE void x_block_values(const attn_item_t *it, attn_scratch_t *s, int64_t t0, const int dtype) {
    const int d = it->d, hr = it->head_rows, n = block_keys(it->num_keys, t0);
    x_softmax(s, it->num_heads * hr, n, d);
    for (int h = 0; h < it->num_heads; h++) {
        const char *v = it->v + h * it->v_head + t0 * it->v_step;
        for (int r = 0; r < hr; r += 4) {
            float *acc = s->acc + (h * hr + r) * d;
            const float *p = s->s + (h * hr + r) * ATTN_BLOCK_KEYS;
#define X_ACCUM(R) x_accum(acc, p, v, it->v_step, n, d, R, dtype)
            X_ROWS(X_ACCUM(4), X_ACCUM(3), X_ACCUM(2), X_ACCUM(1), hr - r);
#undef X_ACCUM
        }
    }
}

static AVX512 void item_avx512_f32(const attn_item_t *it, attn_scratch_t *s) {
    for (int64_t t0 = 0; t0 < it->num_keys; t0 += ATTN_BLOCK_KEYS) {
        x_block_scores(it, s, t0, VMEM_ATTN_F32);
        x_block_values(it, s, t0, VMEM_ATTN_F32);
    }
}

static AVX512 void item_avx512_f16(const attn_item_t *it, attn_scratch_t *s) {
    for (int64_t t0 = 0; t0 < it->num_keys; t0 += ATTN_BLOCK_KEYS) {
        x_block_scores(it, s, t0, VMEM_ATTN_F16);
        x_block_values(it, s, t0, VMEM_ATTN_F16);
    }
}

static AVX512 void item_avx512_bf16(const attn_item_t *it, attn_scratch_t *s) {
    for (int64_t t0 = 0; t0 < it->num_keys; t0 += ATTN_BLOCK_KEYS) {
        x_block_scores(it, s, t0, VMEM_ATTN_BF16);
        x_block_values(it, s, t0, VMEM_ATTN_BF16);
    }
}

/* ---- bf16 scores with vdpbf16ps (AVX512_BF16): products of bf16 pairs summed in float32 straight from
 * the stored bits, half the instructions of widen + FMA. The query stays unscaled bf16 (exact); the
 * scale is applied to the float32 dot product. Needs head_dim % 32 == 0. */
#define AVX512BF16 __attribute__((target("avx512f,avx512bf16")))
#define AVX512BF16_INLINE static inline __attribute__((always_inline, target("avx512f,avx512bf16")))

AVX512BF16_INLINE void x_scores_dot(const uint16_t *q, const char *k, int64_t k_step, int n, int d, float *s,
                                    float qmul, const attn_prefetch_t *pf, const int R) {
    const __m128 mul = _mm_set1_ps(qmul);
    int j = 0;
    for (; j < n; j += 2) {
        const int two = j + 1 < n;              /* the last key of an odd block pairs with itself */
        x_prefetch(pf, j);
        x_prefetch(pf, j + 1);
        const char *k0 = k + j * k_step, *k1 = two ? k0 + k_step : k0;
        __m512 a0[4], a1[4];
#pragma GCC unroll 4
        for (int r = 0; r < 4; r++)
            a0[r] = a1[r] = _mm512_setzero_ps();
        for (int c = 0; c < d; c += 32) {
            const __m512bh x0 = (__m512bh)_mm512_loadu_si512(k0 + 2 * c);
            const __m512bh x1 = (__m512bh)_mm512_loadu_si512(k1 + 2 * c);
#pragma GCC unroll 4
            for (int r = 0; r < R; r++) {
                const __m512bh qr = (__m512bh)_mm512_load_si512(q + r * d + c);
                a0[r] = _mm512_dpbf16_ps(a0[r], qr, x0);
                a1[r] = _mm512_dpbf16_ps(a1[r], qr, x1);
            }
        }
        float t0[4], t1[4];
        _mm_storeu_ps(t0, _mm_mul_ps(mul, x_sum4(a0[0], a0[1], a0[2], a0[3])));
        _mm_storeu_ps(t1, _mm_mul_ps(mul, x_sum4(a1[0], a1[1], a1[2], a1[3])));
#pragma GCC unroll 4
        for (int r = 0; r < R; r++) {
            s[r * ATTN_BLOCK_KEYS + j] = t0[r];
            if (two)
                s[r * ATTN_BLOCK_KEYS + j + 1] = t1[r];
        }
    }
}

AVX512BF16_INLINE void x_block_scores_dot(const attn_item_t *it, attn_scratch_t *s, int64_t t0) {
    const int d = it->d, hr = it->head_rows;
    const int n = block_keys(it->num_keys, t0);
    for (int h = 0; h < it->num_heads; h++) {
        const char *k = it->k + h * it->k_head + t0 * it->k_step;
        attn_prefetch_t pf = block_prefetch(it, h, t0);
        for (int r = 0; r < hr; r += 4) {
            const uint16_t *q = s->qb + (h * hr + r) * d;
            float *sc = s->s + (h * hr + r) * ATTN_BLOCK_KEYS;
            if (r)
                pf.num_k = pf.num_v = 0;
#define X_SCORES(R) x_scores_dot(q, k, it->k_step, n, d, sc, it->qmul, &pf, R)
            X_ROWS(X_SCORES(4), X_SCORES(3), X_SCORES(2), X_SCORES(1), hr - r);
#undef X_SCORES
        }
    }
}

static AVX512BF16 void item_avx512_bf16_dot(const attn_item_t *it, attn_scratch_t *s) {
    for (int64_t t0 = 0; t0 < it->num_keys; t0 += ATTN_BLOCK_KEYS) {
        x_block_scores_dot(it, s, t0);
        x_block_values(it, s, t0, VMEM_ATTN_BF16);
    }
}

static int have_bf16_dot(void) { return __builtin_cpu_supports("avx512bf16"); }
static int have_avx512(void) { return __builtin_cpu_supports("avx512f"); }
#else
static int have_avx512(void) { return 0; }
static int have_bf16_dot(void) { return 0; }
#endif

/* pre: head_dim > 0. Which path vmem_attn_decode takes for this head_dim and flags (VMEM_ATTN_PATH_*);
 * VMEM_ATTN_PATH_AVX512_BF16 differs from VMEM_ATTN_PATH_AVX512 for bf16 only. */
int vmem_attn_decode_path(int32_t head_dim, int32_t flags) {
    if ((flags & VMEM_ATTN_PORTABLE) || head_dim % 16 != 0 || !have_avx512())
        return VMEM_ATTN_PATH_PORTABLE;
    if ((flags & VMEM_ATTN_NO_BF16_DOT) || head_dim % 32 != 0 || !have_bf16_dot())
        return VMEM_ATTN_PATH_AVX512;
    return VMEM_ATTN_PATH_AVX512_BF16;
}

/* ---- work split ---------------------------------------------------------------------------------- */

/* item = ((b * head_groups) + head group) * chunks_per_head + chunk; a head group is heads_per_item KV
 * heads; a chunk is ATTN_MAX_ROWS query rows of one head's group (chunks_per_head > 1 only for groups
 * larger than ATTN_MAX_ROWS, and then heads_per_item == 1). */
typedef struct {
    const vmem_attn_decode_t *a;
    int path, heads_per_item, head_groups, chunks_per_head;
    int64_t num_items;
    int64_t next;                   /* next item to take (atomic) */
} attn_job_t;

typedef struct {
    attn_job_t *job;
    attn_scratch_t *scratch;
} attn_worker_t;

static void run_item(const attn_job_t *job, int64_t item, attn_scratch_t *s) {
    const vmem_attn_decode_t *a = job->a;
    const int group = a->num_heads / a->num_kv_heads;
    const int chunk = (int)(item % job->chunks_per_head);
    const int h0 = (int)(item / job->chunks_per_head % job->head_groups) * job->heads_per_item;
    const int64_t b = item / job->chunks_per_head / job->head_groups;
    const int num_heads = a->num_kv_heads - h0 < job->heads_per_item ? a->num_kv_heads - h0 : job->heads_per_item;
    const int row0 = chunk * ATTN_MAX_ROWS;
    const int head_rows = group - row0 < ATTN_MAX_ROWS ? group - row0 : ATTN_MAX_ROWS;
    const attn_item_t it = item_begin(a, b, h0, num_heads, row0, head_rows, s);
#if defined(__x86_64__)
    if (job->path != VMEM_ATTN_PATH_PORTABLE) {
        if (a->dtype == VMEM_ATTN_F32)
            item_avx512_f32(&it, s);
        else if (a->dtype == VMEM_ATTN_F16)
            item_avx512_f16(&it, s);
        else if (job->path == VMEM_ATTN_PATH_AVX512_BF16)
            item_avx512_bf16_dot(&it, s);
        else
            item_avx512_bf16(&it, s);
    } else
#endif
        item_portable(&it, s, a->dtype);
    item_end(a, b, h0, num_heads, row0, head_rows, s);
}

static void *attn_worker(void *arg) {
    attn_worker_t *w = arg;
    for (;;) {
        const int64_t item = __atomic_fetch_add(&w->job->next, 1, __ATOMIC_RELAXED);
        if (item >= w->job->num_items)
            return NULL;
        run_item(w->job, item, w->scratch);
    }
}

static int validate(const vmem_attn_decode_t *a) {
    if (!a || !a->q || !a->k_cache || !a->v_cache || !a->out || (a->batch > 0 && (!a->seqlens || !a->rows)))
        return VMEM_ERR_INVALID;
    if (a->dtype != VMEM_ATTN_F32 && a->dtype != VMEM_ATTN_F16 && a->dtype != VMEM_ATTN_BF16)
        return VMEM_ERR_INVALID;
    if (a->batch < 0 || a->num_kv_heads <= 0 || a->num_heads <= 0 || a->num_heads % a->num_kv_heads)
        return VMEM_ERR_INVALID;
    if (a->head_dim <= 0 || a->head_dim > ATTN_MAX_DIM || a->num_threads < 1)
        return VMEM_ERR_INVALID;
    if (a->q_stride_b < 0 || a->q_stride_h < 0 || a->k_stride_b < 0 || a->k_stride_s < 0 || a->k_stride_h < 0
        || a->v_stride_b < 0 || a->v_stride_s < 0 || a->v_stride_h < 0 || a->out_stride_b < 0 || a->out_stride_h < 0)
        return VMEM_ERR_INVALID;
    for (int32_t b = 0; b < a->batch; b++)
        if (a->seqlens[b] < 0 || a->rows[b] < 0)
            return VMEM_ERR_INVALID;
    return VMEM_OK;
}

static int64_t min64(int64_t x, int64_t y) { return x < y ? x : y; }

/* pre: args describes valid memory: for every b, rows[b] is a row of both caches holding at least
 *      seqlens[b] tokens, q/out hold batch x num_heads rows of head_dim elements, out overlaps nothing
 *      it reads; head_dim <= 256; num_heads a multiple of num_kv_heads; num_threads >= 1.
 * Writes out; reads K/V only at tokens [0, seqlens[b]). VMEM_ERR_INVALID for a bad argument,
 * VMEM_ERR_OOM when not even one thread's scratch could be allocated (nothing written either way).
 * Needs no GIL; uses up to num_threads threads, the caller's included. */
int vmem_attn_decode(const vmem_attn_decode_t *args) {
    const int rc = validate(args);
    if (rc != VMEM_OK)
        return rc;
    const int group = args->num_heads / args->num_kv_heads;
    int64_t total_keys = 0;
    for (int32_t b = 0; b < args->batch; b++)
        total_keys += args->seqlens[b];
    attn_job_t job = {.a = args, .path = vmem_attn_decode_path(args->head_dim, args->flags), .next = 0};
    job.chunks_per_head = (group + ATTN_MAX_ROWS - 1) / ATTN_MAX_ROWS;
    int64_t want = min64(min64(total_keys * args->num_kv_heads / ATTN_KEYS_PER_THREAD, args->num_threads),
                         min64((int64_t)args->batch * args->num_kv_heads * job.chunks_per_head, ATTN_MAX_THREADS));
    want = want < 1 ? 1 : want;
    /* as many KV heads per item as the scratch holds, while leaving >= 4 items per thread */
    int64_t hpi = min64(group <= ATTN_MAX_ROWS ? ATTN_MAX_ROWS / group : 1, args->num_kv_heads);
    if (want > 1)
        hpi = min64(hpi, args->batch * args->num_kv_heads / (4 * want));
    job.heads_per_item = hpi < 1 ? 1 : (int)hpi;
    job.head_groups = (args->num_kv_heads + job.heads_per_item - 1) / job.heads_per_item;
    job.num_items = (int64_t)args->batch * job.head_groups * job.chunks_per_head;

    attn_worker_t workers[ATTN_MAX_THREADS];
    pthread_t threads[ATTN_MAX_THREADS];
    int num_workers = 0, started = 0;
    for (; num_workers < want; num_workers++) {
        void *mem = NULL;
        if (posix_memalign(&mem, 64, sizeof(attn_scratch_t)) != 0)
            break;                          /* fewer threads */
        workers[num_workers] = (attn_worker_t){.job = &job, .scratch = mem};
    }
    if (num_workers == 0)
        return VMEM_ERR_OOM;
    if (num_workers > 1) {
        sigset_t all, old;                  /* workers take no signals: Python's handlers stay put */
        sigfillset(&all);
        pthread_sigmask(SIG_SETMASK, &all, &old);
        for (; started < num_workers - 1; started++)
            if (pthread_create(&threads[started], NULL, attn_worker, &workers[started + 1]) != 0)
                break;                      /* fewer threads; the caller does the rest */
        pthread_sigmask(SIG_SETMASK, &old, NULL);
    }
    attn_worker(&workers[0]);
    for (int i = 0; i < started; i++)
        pthread_join(threads[i], NULL);
    for (int i = 0; i < num_workers; i++)
        free(workers[i].scratch);
    return VMEM_OK;
}
