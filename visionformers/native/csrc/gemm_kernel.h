/* The register-blocked GEMM kernel of gemm.c (its comment tells the method), shared with the kernels that run a
 * product as one step of a larger computation (short_attention.c's fused qkv projection and its longer sequences'
 * two products): W packed in panels of NR columns (pack_panel: gemm.c's weights, the long attention's keys), the
 * MR x NR micro-kernel over them with its epilogue, row_block, one block of rows of C = epilogue(A W^T), and the
 * per-thread scratch buffers of the kernels that keep a block's intermediate results in cache.
 */
#ifndef VF_GEMM_KERNEL_H
#define VF_GEMM_KERNEL_H
#include <stdint.h>
#include <stdlib.h>

#include "vmath.h"

#define NR (2 * VL)              /* columns per panel: two vectors */
#if VL == 16
#define MR 12                    /* 24 accumulators of 32 AVX-512 registers */
#else
#define MR 6                     /* 12 accumulators of 16 AVX2 registers */
#endif
#define KC 384                   /* columns of A per block: MR x KC of A and KC x NR of W stay in L1 / L2 */
#define MC_TARGET (12 * MR)      /* rows per block, rounded so that blocks split evenly over the threads */

/* dst[j * ds + i] = src[i * ss + j] for a VL x VL block of src of which the first r rows are read (the others
 * are taken as zeros) */
static inline void transpose_block(const float *src, long ss, float *dst, long ds, long r) {
#if defined(__AVX2__) && VL == 8
    __m256 x[8];
    for (long i = 0; i < 8; i++) x[i] = i < r ? _mm256_loadu_ps(src + i * ss) : _mm256_setzero_ps();
    const __m256 t0 = _mm256_unpacklo_ps(x[0], x[1]), t1 = _mm256_unpackhi_ps(x[0], x[1]);
    const __m256 t2 = _mm256_unpacklo_ps(x[2], x[3]), t3 = _mm256_unpackhi_ps(x[2], x[3]);
    const __m256 t4 = _mm256_unpacklo_ps(x[4], x[5]), t5 = _mm256_unpackhi_ps(x[4], x[5]);
    const __m256 t6 = _mm256_unpacklo_ps(x[6], x[7]), t7 = _mm256_unpackhi_ps(x[6], x[7]);
    const __m256 u0 = _mm256_shuffle_ps(t0, t2, 0x44), u1 = _mm256_shuffle_ps(t0, t2, 0xEE);
    const __m256 u2 = _mm256_shuffle_ps(t1, t3, 0x44), u3 = _mm256_shuffle_ps(t1, t3, 0xEE);
    const __m256 u4 = _mm256_shuffle_ps(t4, t6, 0x44), u5 = _mm256_shuffle_ps(t4, t6, 0xEE);
    const __m256 u6 = _mm256_shuffle_ps(t5, t7, 0x44), u7 = _mm256_shuffle_ps(t5, t7, 0xEE);
    _mm256_storeu_ps(dst + 0 * ds, _mm256_permute2f128_ps(u0, u4, 0x20));
    _mm256_storeu_ps(dst + 1 * ds, _mm256_permute2f128_ps(u1, u5, 0x20));
    _mm256_storeu_ps(dst + 2 * ds, _mm256_permute2f128_ps(u2, u6, 0x20));
    _mm256_storeu_ps(dst + 3 * ds, _mm256_permute2f128_ps(u3, u7, 0x20));
    _mm256_storeu_ps(dst + 4 * ds, _mm256_permute2f128_ps(u0, u4, 0x31));
    _mm256_storeu_ps(dst + 5 * ds, _mm256_permute2f128_ps(u1, u5, 0x31));
    _mm256_storeu_ps(dst + 6 * ds, _mm256_permute2f128_ps(u2, u6, 0x31));
    _mm256_storeu_ps(dst + 7 * ds, _mm256_permute2f128_ps(u3, u7, 0x31));
#else
    for (long j = 0; j < VL; j++)
        for (long i = 0; i < VL; i++) dst[j * ds + i] = i < r ? src[i * ss + j] : 0.0f;
#endif
}

/* W packed for the micro-kernel, one panel: rows (<= NR) rows of W (K columns, row stride ldw) at dst (K x NR floats),
 * dst[k NR + j] = W[j][k], zero for j >= rows. A VL x VL block at a time where K allows, then the last columns. */
static void pack_panel(const float *W, long ldw, long rows, long K, float *dst) {
    const long full = K - K % VL, low = rows < VL ? rows : VL, high = rows > VL ? rows - VL : 0;
    for (long k0 = 0; k0 < full; k0 += VL) {
        transpose_block(W + k0, ldw, dst + k0 * NR, NR, low);
        transpose_block(W + VL * ldw + k0, ldw, dst + k0 * NR + VL, NR, high);
    }
    for (long k = full; k < K; k++)
        for (long j = 0; j < NR; j++) dst[k * NR + j] = j < rows ? W[j * ldw + k] : 0.0f;
}

/* the second vector of a tile row of ncols <= NR columns (zeros where the row is shorter) */
static inline vf ld1(const float *p, long ncols) { return ncols > VL ? ld(p, VL, ncols) : splat(0.0f); }

/* R rows of A (stride lda) times one packed panel over kc steps; C tile (R, ncols) at c (stride ldc). first: the
 * tile starts from zero, else from C; last: the epilogue (bias b at the tile's columns, activation, residual tile
 * res of the same strides) runs before the store. */
static inline __attribute__((always_inline)) void tile(const float *a, long lda, const float *b, float *c, long ldc,
                                                       long kc, int first, int last, const float *bias, int act,
                                                       const float *res, const int R, long ncols) {
    vf c0[MR], c1[MR];
    for (int r = 0; r < R; r++) c0[r] = c1[r] = splat(0.0f);
    if (last)  /* the tile's rows of C and of the residual, fetched while the products run (strided rows of a few
                * cache lines each: the hardware prefetcher leaves them to miss at the epilogue) */
        for (int r = 0; r < R; r++) {
            __builtin_prefetch(c + r * ldc, 1, 3);
            __builtin_prefetch(c + r * ldc + ncols - 1, 1, 3);
            if (res) {
                __builtin_prefetch(res + r * ldc, 0, 3);
                __builtin_prefetch(res + r * ldc + ncols - 1, 0, 3);
            }
        }
    const float *ar[MR];
    for (int r = 0; r < R; r++) ar[r] = a + r * lda;
    for (long k = 0; k < kc; k++) {
        const vf b0 = load(b + k * NR), b1 = load(b + k * NR + VL);
        for (int r = 0; r < R; r++) {
            const vf x = splat(ar[r][k]);
            c0[r] += x * b0;
            c1[r] += x * b1;
        }
    }
    vf bias0 = splat(0.0f), bias1 = splat(0.0f);
    if (last && bias) { bias0 = ld(bias, 0, ncols); bias1 = ld1(bias, ncols); }
    for (int r = 0; r < R; r++) {
        float *cr = c + r * ldc;
        if (!first) { c0[r] += ld(cr, 0, ncols); c1[r] += ld1(cr, ncols); }
        if (last) {
            c0[r] += bias0;  /* (x W^T) + b, then the activation or the residual: r + (x W^T + b) */
            c1[r] += bias1;
            if (act) { c0[r] = v_act(c0[r], act); c1[r] = v_act(c1[r], act); }
            if (res) { c0[r] = ld(res + r * ldc, 0, ncols) + c0[r]; c1[r] = ld1(res + r * ldc, ncols) + c1[r]; }
        }
        st(cr, 0, ncols, c0[r]);
        if (ncols > VL) st(cr, VL, ncols, c1[r]);
    }
}

#define TILE(n) tile(a, lda, b, c, ldc, kc, first, last, bias, act, res, n, ncols)
static void tile_rows(const float *a, long lda, const float *b, float *c, long ldc, long kc, int first, int last,
                      const float *bias, int act, const float *res, int R, long ncols) {
    switch (R) {  /* a constant row count per case: the accumulators stay in registers */
#if MR == 12
    case 12: TILE(12); break;
    case 11: TILE(11); break;
    case 10: TILE(10); break;
    case 9: TILE(9); break;
    case 8: TILE(8); break;
    case 7: TILE(7); break;
#endif
    case 6: TILE(6); break;
    case 5: TILE(5); break;
    case 4: TILE(4); break;
    case 3: TILE(3); break;
    case 2: TILE(2); break;
    default: TILE(1); break;
    }
}
#undef TILE

/* rows m0..m1 of out (N columns, rows of stride ldc) = act(A W^T + bias) + residual (rows of the same stride) for A
 * of stride lda (rows m0.. of the operand), the product over K in blocks of KC, each tile's epilogue after its last
 * block */
static void row_block(const float *A, long lda, const float *Bp, float *out, long ldc, long m0, long m1, long N,
                      long K, const float *bias, int act, const float *residual) {
    const long panels = (N + NR - 1) / NR;
    for (long p0 = 0; p0 < K; p0 += KC) {
        const long kc = p0 + KC < K ? KC : K - p0;
        const int first = p0 == 0, last = p0 + kc == K;
        for (long jp = 0; jp < panels; jp++) {
            const float *b = Bp + (jp * K + p0) * NR;
            const long col = jp * NR, ncols = N - col < NR ? N - col : NR;
            for (long i = m0; i < m1; i += MR) {
                const int R = m1 - i < MR ? (int)(m1 - i) : MR;
                tile_rows(A + i * lda + p0, lda, b, out + i * ldc + col, ldc, kc, first, last, bias ? bias + col : NULL,
                          act, residual ? residual + i * ldc + col : NULL, R, ncols);
            }
        }
    }
}

/* m rows of out (stride N) = residual + (act(A W1^T + b1) W2^T + b2), a transformer MLP, for m rows of A (stride
 * K), W1 packed (H, K) and W2 packed (N, H); the hidden rows go through hidden (m x H, in cache); residual (stride
 * N) may be NULL. gemm.c's vf_mlp runs it per block of rows, short_attention.c's vf_window_block per group of
 * windows. */
static void mlp_rows(const float *A, long K, const float *W1p, const float *b1, int act, const float *W2p,
                     const float *b2, float *hidden, long H, float *out, long N, long m, const float *residual) {
    row_block(A, K, W1p, hidden, H, 0, m, H, K, b1, act, NULL);
    row_block(hidden, H, W2p, out, N, 0, m, N, H, b2, 0, residual);
}

/* A per-thread scratch block of at least n floats, kept for the thread's life (PyTorch's OpenMP threads persist): a
 * block this size from malloc is a fresh mapping each time, whose pages fault in again on every call. It starts on a
 * cache line (malloc's large blocks start 16 bytes past a page, where every other vector straddles two lines: the
 * windowed attention's q, k, v rows and the MLP's hidden rows). NULL where it cannot be had. One per kernel library
 * and thread: a kernel must not hold it across a call of another. */
static float *scratch(size_t n) {
    static __thread void *block;
    static __thread float *buf;
    static __thread size_t cap;
    if (n > cap) {
        free(block);
        block = malloc(n * sizeof(float) + 64);
        buf = block ? (float *)(((uintptr_t)block + 63) & ~(uintptr_t)63) : NULL;
        cap = block ? n : 0;
    }
    return buf;
}

/* Rows per block for M rows: about MC_TARGET, a multiple of MR, and as many blocks for every thread */
static inline long block_rows(long M, int nthreads) {
    long blocks = (M + MC_TARGET - 1) / MC_TARGET;
    blocks = (blocks + nthreads - 1) / nthreads * nthreads;
    const long mc = (M + blocks - 1) / blocks;
    return (mc + MR - 1) / MR * MR;
}

#endif
