/* attn_cpu_x86.c — the x86 kernels of the fused CPU decode attention (Note [CPU decode attention] in
 * attn_cpu.c): the AVX-512F path and the AVX512_BF16 path. Every function carries its own
 * __attribute__((target(...))), so this file builds with plain flags; attn_cpu.c calls the
 * _vmem_attn_item_* functions only after __builtin_cpu_supports. Empty of code off x86-64. */
#include <stdint.h>
#include <string.h>
#include "attn_internal.h"

#if defined(__x86_64__)
#include <immintrin.h>

/* ---- AVX-512F path ---------------------------------------------------------------------------- */
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

/* Keys a block is walked in, all heads of the item at a time: NHD items hold several heads per token row,
 * and walking one head over the whole block touched 64 rows (32 pages of 4 KiB at 8 x 128 bf16 heads)
 * per head, thrashing the L1 TLB; KEY_STEP rows keep a handful of pages hot while every head reads them. */
static inline int key_step(const attn_item_t *it) { return it->num_heads > 1 ? ATTN_KEY_STEP : ATTN_BLOCK_KEYS; }

/* Scores of the block of keys [t0, t0 + n) for every query row of the item; prefetches ahead. */
AVX512_INLINE void x_block_scores(const attn_item_t *it, attn_scratch_t *s, int64_t t0, const int dtype) {
    const int d = it->d, hr = it->head_rows, step = key_step(it);
    const int n = block_keys(it->num_keys, t0);
    for (int j0 = 0; j0 < n; j0 += step) {
        const int m = n - j0 < step ? n - j0 : step;
        for (int h = 0; h < it->num_heads; h++) {
            const char *k = it->k + h * it->k_head + (t0 + j0) * it->k_step;
            attn_prefetch_t pf = block_prefetch(it, h, t0 + j0);
            for (int r = 0; r < hr; r += 4) {
                const float *q = s->q + (h * hr + r) * d;
                float *sc = s->s + (h * hr + r) * ATTN_BLOCK_KEYS + j0;
                if (r)
                    pf.num_k = pf.num_v = 0;        /* asked for by the first register block */
#define X_SCORES(R) x_scores(q, k, it->k_step, m, d, sc, &pf, R, dtype)
                X_ROWS(X_SCORES(4), X_SCORES(3), X_SCORES(2), X_SCORES(1), hr - r);
#undef X_SCORES
            }
        }
    }
}

/* Softmax of the block's scores, then its V rows into the accumulators. */
AVX512_INLINE void x_block_values(const attn_item_t *it, attn_scratch_t *s, int64_t t0, const int dtype) {
    const int d = it->d, hr = it->head_rows, n = block_keys(it->num_keys, t0), step = key_step(it);
    x_softmax(s, it->num_heads * hr, n, d);
    for (int j0 = 0; j0 < n; j0 += step) {
        const int m = n - j0 < step ? n - j0 : step;
        for (int h = 0; h < it->num_heads; h++) {
            const char *v = it->v + h * it->v_head + (t0 + j0) * it->v_step;
            for (int r = 0; r < hr; r += 4) {
                float *acc = s->acc + (h * hr + r) * d;
                const float *p = s->s + (h * hr + r) * ATTN_BLOCK_KEYS + j0;
#define X_ACCUM(R) x_accum(acc, p, v, it->v_step, m, d, R, dtype)
                X_ROWS(X_ACCUM(4), X_ACCUM(3), X_ACCUM(2), X_ACCUM(1), hr - r);
#undef X_ACCUM
            }
        }
    }
}

AVX512 void _vmem_attn_item_avx512_f32(const attn_item_t *it, attn_scratch_t *s) {
    for (int64_t t0 = 0; t0 < it->num_keys; t0 += ATTN_BLOCK_KEYS) {
        x_block_scores(it, s, t0, VMEM_ATTN_F32);
        x_block_values(it, s, t0, VMEM_ATTN_F32);
    }
}

AVX512 void _vmem_attn_item_avx512_f16(const attn_item_t *it, attn_scratch_t *s) {
    for (int64_t t0 = 0; t0 < it->num_keys; t0 += ATTN_BLOCK_KEYS) {
        x_block_scores(it, s, t0, VMEM_ATTN_F16);
        x_block_values(it, s, t0, VMEM_ATTN_F16);
    }
}

AVX512 void _vmem_attn_item_avx512_bf16(const attn_item_t *it, attn_scratch_t *s) {
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
    const int d = it->d, hr = it->head_rows, step = key_step(it);
    const int n = block_keys(it->num_keys, t0);
    for (int j0 = 0; j0 < n; j0 += step) {
        const int m = n - j0 < step ? n - j0 : step;
        for (int h = 0; h < it->num_heads; h++) {
            const char *k = it->k + h * it->k_head + (t0 + j0) * it->k_step;
            attn_prefetch_t pf = block_prefetch(it, h, t0 + j0);
            for (int r = 0; r < hr; r += 4) {
                const uint16_t *q = s->qb + (h * hr + r) * d;
                float *sc = s->s + (h * hr + r) * ATTN_BLOCK_KEYS + j0;
                if (r)
                    pf.num_k = pf.num_v = 0;
#define X_SCORES(R) x_scores_dot(q, k, it->k_step, m, d, sc, it->qmul, &pf, R)
                X_ROWS(X_SCORES(4), X_SCORES(3), X_SCORES(2), X_SCORES(1), hr - r);
#undef X_SCORES
            }
        }
    }
}

AVX512BF16 void _vmem_attn_item_avx512_bf16_dot(const attn_item_t *it, attn_scratch_t *s) {
    for (int64_t t0 = 0; t0 < it->num_keys; t0 += ATTN_BLOCK_KEYS) {
        x_block_scores_dot(it, s, t0);
        x_block_values(it, s, t0, VMEM_ATTN_BF16);
    }
}
#endif
