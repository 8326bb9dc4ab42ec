/* attn_internal.h — what attn_cpu.c (portable path, dispatch, threads) shares with attn_cpu_x86.c
 * (the AVX-512F and AVX512_BF16 kernels): block constants, per-thread scratch, the work item, scalar
 * helpers and the x86 item functions. Not part of the contract; Python never sees it. */
#ifndef VMEM_ATTN_INTERNAL_H
#define VMEM_ATTN_INTERNAL_H

#include <stdint.h>
#include <string.h>
#include "vmem_attn.h"

#define ATTN_BLOCK_KEYS 64      /* keys per softmax block */
#define ATTN_KEY_STEP 16        /* keys of a block walked at a time by every head of a multi-head item */
#define ATTN_PREFETCH_K 128     /* K rows are prefetched this many keys ahead (the block after next) */
#define ATTN_PREFETCH_V 64      /* V rows: the next block (K and V streams apart: see Limitations) */
#define ATTN_MAX_ROWS 64        /* query rows per work item (several KV heads when the group is small) */
#define ATTN_MAX_DIM 256
#define ATTN_BYTES_PER_THREAD (1 << 19)  /* K+V bytes read that justify one more thread (~50 us of reading) */
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

#if defined(__x86_64__)
/* attn_cpu_x86.c: one work item's keys through the AVX-512F kernels (f32, f16, bf16 widened), or the
 * AVX512_BF16 one (bf16 scores by vdpbf16ps). pre: the CPU has AVX-512F (and AVX512_BF16 for
 * _vmem_attn_item_avx512_bf16_dot); head_dim % 16 == 0 (% 32 for _dot); s filled by item_begin. */
void _vmem_attn_item_avx512_f32(const attn_item_t *it, attn_scratch_t *s);
void _vmem_attn_item_avx512_f16(const attn_item_t *it, attn_scratch_t *s);
void _vmem_attn_item_avx512_bf16(const attn_item_t *it, attn_scratch_t *s);
void _vmem_attn_item_avx512_bf16_dot(const attn_item_t *it, attn_scratch_t *s);
#endif

#endif
