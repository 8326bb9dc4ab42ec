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
 * Files: attn_cpu.c holds this Note, the portable path, dispatch and threads; attn_cpu_x86.c the two
 * x86 paths (its _vmem_attn_item_* functions); attn_internal.h what both share (block constants,
 * scratch and item structs, scalar helpers); vmem_attn.h the public declarations.
 * The x86 functions carry __attribute__((target(...))) and are picked with __builtin_cpu_supports, so
 * both files build with plain flags on any x86-64 and on aarch64 (x86 code under #if defined(__x86_64__)).
 * K/V are read in place through element strides per cache row, token and head (last dim contiguous):
 * NHD, HND and layer-group views alike. Output is rounded to the storage dtype once (nearest-even).
 * Scratch (queries, accumulators, scores: ~150 KiB) is allocated per thread per call. build.py feeds
 * vmem_attn.h's text to cffi (cdef and module source), so the declarations are written once.
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
#include "vmem_attn.h"
#include "attn_internal.h"

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

/* ---- one work item (attn_item_t in attn_internal.h): begin, end, the portable path ----------- */

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

/* ---- dispatch: the x86 paths live in attn_cpu_x86.c -------------------------------------------- */
#if defined(__x86_64__)
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
            _vmem_attn_item_avx512_f32(&it, s);
        else if (a->dtype == VMEM_ATTN_F16)
            _vmem_attn_item_avx512_f16(&it, s);
        else if (job->path == VMEM_ATTN_PATH_AVX512_BF16)
            _vmem_attn_item_avx512_bf16_dot(&it, s);
        else
            _vmem_attn_item_avx512_bf16(&it, s);
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
