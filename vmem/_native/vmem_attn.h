/* vmem_attn.h — the fused CPU decode attention kernel (Note [CPU decode attention] in attn_cpu.c).
 *
 * This text is also fed to cffi's cdef and module source (build.py strips the #-lines and declares
 * the #define constants as `#define NAME ...`), so keep it plain C.
 */
#ifndef VMEM_ATTN_H
#define VMEM_ATTN_H
#include <stdint.h>

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
    int64_t split_keys;     /* 0: the kernel chooses; > 0: cut every request's keys into chunks of this many */
} vmem_attn_decode_t;

/* How vmem_attn_decode divides one call's work (Note [CPU decode attention], "work split"). */
typedef struct {
    int32_t num_threads;    /* threads it starts, the caller's included */
    int32_t heads_per_item; /* KV heads per work item */
    int64_t chunk_keys;     /* keys per context chunk; 0: requests are not cut */
    int64_t num_items;      /* work items */
    int64_t max_item_work;  /* (key, KV head) pairs of the largest item */
    int64_t total_work;     /* (key, KV head) pairs of all items */
} vmem_attn_plan_t;

int vmem_attn_decode(const vmem_attn_decode_t *args);
int vmem_attn_decode_plan(const vmem_attn_decode_t *args, vmem_attn_plan_t *plan);
int vmem_attn_decode_path(int32_t head_dim, int32_t flags);

#endif
