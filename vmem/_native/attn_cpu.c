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
 * Work split. A work item is one request, some KV heads, and a range of its keys. Where a token's KV
 * heads lie back to back (NHD) an item takes as many of them as ATTN_MAX_ROWS query rows allow (all 8
 * of a 32/8-head model): a block of keys then covers whole [Hkv, D] token rows. Elsewhere (HND) an item
 * takes one KV head, whose keys are one sequential stream. With num_threads > 1 the keys are cut into
 * equal chunks (whole 64-key blocks) until there are ~ATTN_ITEMS_PER_THREAD items per thread, so two
 * threads get equal work at batch 1 or with 2 KV heads; a cut item leaves its (m, l, acc) rows and the
 * caller merges them after the join (merge_unit). Worker pthreads take items from an atomic counter
 * (the calling thread is one of them). vmem_attn_decode_plan reports the split without running it.
 *
 * Implementation. Three paths over the same algorithm, chosen per call by vmem_attn_decode_path:
 *   - AVX-512F: scores register-blocked over 4 query rows x 2 keys; V accumulated in 4 query rows x
 *     64 dims of registers while the block's V rows stream past; a vector 2^x (degree-6 polynomial and
 *     vscalefps); bf16 widened by a shift, fp16 by vcvtph2ps. Rows of the block after next (K) and of
 *     the next block (V) are prefetched into L2: the hardware prefetcher stops at 4 KiB pages and
 *     cannot follow NHD's head-strided rows (NHD ran at half HND's speed without it). A multi-head
 *     item walks each block ATTN_KEY_STEP keys at a time through all its heads, so a few token rows
 *     (pages) are hot at once: one head over all 64 keys touched 32 pages per head at 8 x 128 bf16
 *     heads (b16/4K bf16 NHD 146 -> 112 ms, HND 110, on a loaded machine).
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
 * bit (a cut request sums its chunks in another order); vdpbf16ps flushes bf16 denormals (|x| < 1.2e-38)
 * to zero. Threads are created per call (tens of µs), so calls under ATTN_BYTES_PER_THREAD of K+V per
 * thread stay on the caller's.
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

/* Fills s->q, s->m, s->l, zeroes s->acc; returns the geometry of the item reading keys [t0, t1). */
static attn_item_t item_begin(const vmem_attn_decode_t *a, int64_t b, int h0, int num_heads, int row0,
                              int head_rows, int64_t t0, int64_t t1, attn_scratch_t *s) {
    const int64_t eb = (int64_t)dtype_bytes(a->dtype);
    const int d = a->head_dim, group = a->num_heads / a->num_kv_heads, nr = num_heads * head_rows;
    const int64_t r = a->rows[b];
    attn_item_t it = {
        .k = (const char *)a->k_cache + (r * a->k_stride_b + h0 * a->k_stride_h + t0 * a->k_stride_s) * eb,
        .v = (const char *)a->v_cache + (r * a->v_stride_b + h0 * a->v_stride_h + t0 * a->v_stride_s) * eb,
        .k_step = a->k_stride_s * eb, .v_step = a->v_stride_s * eb,
        .k_head = a->k_stride_h * eb, .v_head = a->v_stride_h * eb,
        .num_keys = t1 - t0, .num_heads = num_heads, .head_rows = head_rows, .d = d,
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
                     const float *m, const float *l, const float *acc) {
    const int d = a->head_dim, group = a->num_heads / a->num_kv_heads;
    for (int i = 0; i < num_heads * head_rows; i++) {
        const int64_t qh = (int64_t)(h0 + i / head_rows) * group + row0 + i % head_rows;
        const float mul = l[i] == 0.0f ? 0.0f : 1.0f / l[i];  /* no keys: zeros; NaN stays NaN */
        store_row((char *)q_row(a, a->out, b, qh, 1), acc + i * d, mul, a->dtype, d);
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

/* ---- work split ----------------------------------------------------------------------------------
 * A unit is (request b, head group, row chunk): heads_per_item KV heads and up to ATTN_MAX_ROWS query
 * rows of each one's group. When the cache's rows hold a token's KV heads back to back (NHD), a unit takes
 * as many heads as the scratch holds, so a block of keys covers whole [Hkv, D] token rows; otherwise (HND)
 * one head, whose keys are then one sequential stream per K and V (several heads per item there meant
 * 2 x heads streams a power of two apart per thread). With more than one thread a unit's keys are cut into
 * chunks of chunk_keys, so that there are ITEMS_PER_THREAD items per thread of about equal work whatever
 * the batch and head count; a cut unit's items leave partial (m, l, acc) rows that merge_unit combines:
 *     M = max_c m_c,  l = sum_c l_c 2^(m_c - M),  out = (sum_c acc_c 2^(m_c - M)) / l.
 * Items are taken from an atomic counter (the calling thread is one worker); merges run after the join. */
#define ATTN_ITEMS_PER_THREAD 4
#define ATTN_MIN_CHUNK_KEYS 256     /* a shorter chunk costs more in setup and merge than it balances */

typedef struct {
    int32_t b, unit;                /* request; unit within it: head group * chunks_per_head + row chunk */
    int32_t slot;                   /* partial slot; -1: the item writes out itself */
    int64_t t0, t1;                 /* keys [t0, t1) */
} attn_task_t;

typedef struct {
    const vmem_attn_decode_t *a;
    vmem_attn_plan_t plan;
    int path, head_groups, chunks_per_head, slot_rows;
    attn_task_t *tasks;             /* [plan.num_items], a cut unit's items consecutive */
    float *partials;                /* per slot: m[slot_rows], l[slot_rows], acc[slot_rows * head_dim] */
    int64_t next;                   /* next task to take (atomic) */
} attn_job_t;

typedef struct {
    attn_job_t *job;
    attn_scratch_t *scratch;
} attn_worker_t;

typedef struct {
    int h0, num_heads, row0, head_rows;
} attn_rows_t;

static int64_t min64(int64_t x, int64_t y) { return x < y ? x : y; }
static int64_t max64(int64_t x, int64_t y) { return x > y ? x : y; }
static int64_t cdiv64(int64_t x, int64_t y) { return (x + y - 1) / y; }

static attn_rows_t unit_rows(const vmem_attn_decode_t *a, const vmem_attn_plan_t *p, int chunks_per_head, int unit) {
    const int group = a->num_heads / a->num_kv_heads;
    const int h0 = unit / chunks_per_head * p->heads_per_item, row0 = unit % chunks_per_head * ATTN_MAX_ROWS;
    return (attn_rows_t){
        .h0 = h0, .num_heads = (int)min64(a->num_kv_heads - h0, p->heads_per_item),
        .row0 = row0, .head_rows = (int)min64(group - row0, ATTN_MAX_ROWS),
    };
}

/* Items a unit of request b is cut into. */
static int64_t unit_items(const vmem_attn_plan_t *p, int64_t keys) {
    return p->chunk_keys > 0 && keys > p->chunk_keys ? cdiv64(keys, p->chunk_keys) : 1;
}

/* pre: validate(a) == VMEM_OK. The split vmem_attn_decode makes (no allocation). */
static void make_plan(const vmem_attn_decode_t *a, vmem_attn_plan_t *p, int *chunks_per_head, int *head_groups) {
    const int group = a->num_heads / a->num_kv_heads;
    const int cph = (group + ATTN_MAX_ROWS - 1) / ATTN_MAX_ROWS;
    const int heads_adjacent = a->k_stride_h == a->head_dim && a->v_stride_h == a->head_dim;
    int64_t total_keys = 0, max_keys = 0;
    for (int32_t b = 0; b < a->batch; b++) {
        total_keys += a->seqlens[b];
        max_keys = max64(max_keys, a->seqlens[b]);
    }
    memset(p, 0, sizeof *p);
    p->heads_per_item = heads_adjacent && group <= ATTN_MAX_ROWS
        ? (int)min64(ATTN_MAX_ROWS / group, a->num_kv_heads) : 1;
    const int hg = (a->num_kv_heads + p->heads_per_item - 1) / p->heads_per_item;
    const int64_t units_per_request = (int64_t)hg * cph;
    const int64_t bytes = total_keys * a->num_kv_heads * a->head_dim * 2 * (int64_t)dtype_bytes(a->dtype);
    int64_t want = min64(min64(bytes / ATTN_BYTES_PER_THREAD, a->num_threads), ATTN_MAX_THREADS);
    want = max64(want, 1);
    if (a->split_keys > 0) {
        p->chunk_keys = a->split_keys;
    } else if (want > 1) {               /* equal chunks, ITEMS_PER_THREAD per thread, whole key blocks */
        int64_t chunk = cdiv64(units_per_request * total_keys, ATTN_ITEMS_PER_THREAD * want);
        chunk = max64(cdiv64(chunk, ATTN_BLOCK_KEYS) * ATTN_BLOCK_KEYS, ATTN_MIN_CHUNK_KEYS);
        p->chunk_keys = chunk < max_keys ? chunk : 0;
    }
    for (int32_t b = 0; b < a->batch; b++) {
        const int64_t n = unit_items(p, a->seqlens[b]);
        p->num_items += units_per_request * n;
        for (int u = 0; u < units_per_request; u++) {
            const int64_t heads = unit_rows(a, p, cph, u).num_heads;
            p->max_item_work = max64(p->max_item_work, heads * min64(a->seqlens[b], p->chunk_keys ? p->chunk_keys : a->seqlens[b]));
        }
        p->total_work += (int64_t)a->num_kv_heads * cph * a->seqlens[b];
    }
    p->num_threads = (int32_t)max64(min64(want, p->num_items), 1);
    *chunks_per_head = cph;
    *head_groups = hg;
}

/* Fills job->tasks (and slots); returns the number of partial slots. */
static int64_t make_tasks(attn_job_t *job) {
    const vmem_attn_decode_t *a = job->a;
    const int units = job->head_groups * job->chunks_per_head;
    int64_t i = 0, slots = 0;
    for (int32_t b = 0; b < a->batch; b++) {
        const int64_t n = unit_items(&job->plan, a->seqlens[b]);
        for (int u = 0; u < units; u++)
            for (int64_t c = 0; c < n; c++, i++) {
                const int64_t t0 = c * job->plan.chunk_keys;
                job->tasks[i] = (attn_task_t){
                    .b = b, .unit = u, .slot = n > 1 ? (int32_t)slots++ : -1,
                    .t0 = n > 1 ? t0 : 0, .t1 = n > 1 ? min64(t0 + job->plan.chunk_keys, a->seqlens[b]) : a->seqlens[b],
                };
            }
    }
    return slots;
}

static float *slot_m(const attn_job_t *job, int32_t slot) {
    return job->partials + (size_t)slot * job->slot_rows * (job->a->head_dim + 2);
}

static void run_item(const attn_job_t *job, const attn_task_t *t, attn_scratch_t *s) {
    const vmem_attn_decode_t *a = job->a;
    const attn_rows_t r = unit_rows(a, &job->plan, job->chunks_per_head, t->unit);
    const attn_item_t it = item_begin(a, t->b, r.h0, r.num_heads, r.row0, r.head_rows, t->t0, t->t1, s);
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
    const int nr = r.num_heads * r.head_rows;
    if (t->slot < 0) {
        item_end(a, t->b, r.h0, r.num_heads, r.row0, r.head_rows, s->m, s->l, s->acc);
        return;
    }
    float *m = slot_m(job, t->slot), *l = m + job->slot_rows, *acc = l + job->slot_rows;
    memcpy(m, s->m, sizeof(float) * nr);
    memcpy(l, s->l, sizeof(float) * nr);
    memcpy(acc, s->acc, sizeof(float) * (size_t)nr * a->head_dim);
}

/* Combines the partials of the n items of one cut unit, tasks[0..n), into out; tmp holds slot_rows
 * x head_dim floats. */
static void merge_unit(const attn_job_t *job, const attn_task_t *tasks, int64_t n, float *tmp) {
    const vmem_attn_decode_t *a = job->a;
    const int d = a->head_dim;
    const attn_rows_t r = unit_rows(a, &job->plan, job->chunks_per_head, tasks[0].unit);
    const int nr = r.num_heads * r.head_rows;
    float mm[ATTN_MAX_ROWS], ll[ATTN_MAX_ROWS];
    for (int i = 0; i < nr; i++) {
        float mx = -__builtin_inff();
        for (int64_t c = 0; c < n; c++) {
            const float mc = slot_m(job, tasks[c].slot)[i];
            mx = mc > mx || mc != mc ? mc : mx;             /* NaN wins: it stays NaN */
        }
        float l = 0.0f, *acc = tmp + (size_t)i * d;
        memset(acc, 0, sizeof(float) * d);
        for (int64_t c = 0; c < n; c++) {
            const float *m = slot_m(job, tasks[c].slot);
            const float w = m[i] == -__builtin_inff() ? 0.0f : exp2_neg(m[i] - mx);
            const float *ac = m + 2 * job->slot_rows + (size_t)i * d;
            l += m[job->slot_rows + i] * w;
            for (int j = 0; j < d; j++)
                acc[j] += w * ac[j];
        }
        mm[i] = mx;
        ll[i] = l;
    }
    item_end(a, tasks[0].b, r.h0, r.num_heads, r.row0, r.head_rows, mm, ll, tmp);
}

static void *attn_worker(void *arg) {
    attn_worker_t *w = arg;
    for (;;) {
        const int64_t item = __atomic_fetch_add(&w->job->next, 1, __ATOMIC_RELAXED);
        if (item >= w->job->plan.num_items)
            return NULL;
        run_item(w->job, &w->job->tasks[item], w->scratch);
    }
}

static int validate(const vmem_attn_decode_t *a) {
    if (!a || !a->q || !a->k_cache || !a->v_cache || !a->out || (a->batch > 0 && (!a->seqlens || !a->rows)))
        return VMEM_ERR_INVALID;
    if (a->dtype != VMEM_ATTN_F32 && a->dtype != VMEM_ATTN_F16 && a->dtype != VMEM_ATTN_BF16)
        return VMEM_ERR_INVALID;
    if (a->batch < 0 || a->num_kv_heads <= 0 || a->num_heads <= 0 || a->num_heads % a->num_kv_heads)
        return VMEM_ERR_INVALID;
    if (a->head_dim <= 0 || a->head_dim > ATTN_MAX_DIM || a->num_threads < 1 || a->split_keys < 0)
        return VMEM_ERR_INVALID;
    if (a->q_stride_b < 0 || a->q_stride_h < 0 || a->k_stride_b < 0 || a->k_stride_s < 0 || a->k_stride_h < 0
        || a->v_stride_b < 0 || a->v_stride_s < 0 || a->v_stride_h < 0 || a->out_stride_b < 0 || a->out_stride_h < 0)
        return VMEM_ERR_INVALID;
    for (int32_t b = 0; b < a->batch; b++)
        if (a->seqlens[b] < 0 || a->rows[b] < 0)
            return VMEM_ERR_INVALID;
    return VMEM_OK;
}

/* pre: as vmem_attn_decode. Fills plan with the split vmem_attn_decode would make; VMEM_ERR_INVALID
 * for a bad argument. Reads only args and the seqlens array. */
int vmem_attn_decode_plan(const vmem_attn_decode_t *args, vmem_attn_plan_t *plan) {
    const int rc = plan ? validate(args) : VMEM_ERR_INVALID;
    if (rc != VMEM_OK)
        return rc;
    int cph, hg;
    make_plan(args, plan, &cph, &hg);
    return VMEM_OK;
}

/* pre: args describes valid memory: for every b, rows[b] is a row of both caches holding at least
 *      seqlens[b] tokens, q/out hold batch x num_heads rows of head_dim elements, out overlaps nothing
 *      it reads; head_dim <= 256; num_heads a multiple of num_kv_heads; num_threads >= 1.
 * Writes out; reads K/V only at tokens [0, seqlens[b]). VMEM_ERR_INVALID for a bad argument,
 * VMEM_ERR_OOM when the task list, the partials or one thread's scratch could not be allocated
 * (nothing written either way). Needs no GIL; uses up to num_threads threads, the caller's included. */
int vmem_attn_decode(const vmem_attn_decode_t *args) {
    const int rc = validate(args);
    if (rc != VMEM_OK)
        return rc;
    attn_job_t job = {.a = args, .path = vmem_attn_decode_path(args->head_dim, args->flags), .next = 0};
    make_plan(args, &job.plan, &job.chunks_per_head, &job.head_groups);
    job.slot_rows = job.plan.heads_per_item * (int)min64(args->num_heads / args->num_kv_heads, ATTN_MAX_ROWS);
    job.tasks = malloc(sizeof(attn_task_t) * (size_t)max64(job.plan.num_items, 1));
    if (!job.tasks)
        return VMEM_ERR_OOM;
    const int64_t slots = make_tasks(&job);
    if (slots > 0) {
        job.partials = malloc(sizeof(float) * (size_t)slots * job.slot_rows * (args->head_dim + 2));
        if (!job.partials) {
            free(job.tasks);
            return VMEM_ERR_OOM;
        }
    }
    attn_worker_t workers[ATTN_MAX_THREADS];
    pthread_t threads[ATTN_MAX_THREADS];
    int num_workers = 0, started = 0;
    for (; num_workers < job.plan.num_threads; num_workers++) {
        void *mem = NULL;
        if (posix_memalign(&mem, 64, sizeof(attn_scratch_t)) != 0)
            break;                          /* fewer threads */
        workers[num_workers] = (attn_worker_t){.job = &job, .scratch = mem};
    }
    if (num_workers == 0) {
        free(job.partials);
        free(job.tasks);
        return VMEM_ERR_OOM;
    }
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
    for (int64_t i = 0; slots > 0 && i < job.plan.num_items;) {  /* a cut unit's items are consecutive */
        int64_t n = 1;
        while (job.tasks[i].slot >= 0 && i + n < job.plan.num_items && job.tasks[i + n].slot >= 0
               && job.tasks[i + n].b == job.tasks[i].b && job.tasks[i + n].unit == job.tasks[i].unit)
            n++;
        if (job.tasks[i].slot >= 0)
            merge_unit(&job, &job.tasks[i], n, workers[0].scratch->acc);
        i += n;
    }
    for (int i = 0; i < num_workers; i++)
        free(workers[i].scratch);
    free(job.partials);
    free(job.tasks);
    return VMEM_OK;
}
