/* Inference products of many rows, C = epilogue(A W^T), with the weights packed once and the epilogue applied
 * while each tile of C is still in registers, for CPU fp32 inference.
 *
 * BLAS computes a linear layer as x W^T and then ATen runs the bias, the activation, the residual add and the
 * next LayerNorm as passes over the output; it also re-packs W on every call (MKL's sgemm copy routines were ~5%
 * of a Swin-T forward). Here W (N, K), nn.Linear's layout, is packed once into panels of NR columns (K rows of NR
 * floats, zero past N), kept by the caller, and each call runs the loops of Goto & van de Geijn ("Anatomy of
 * High-Performance Matrix Multiplication", 2008, fig. 8) with a register-blocked micro-kernel: MR rows of A
 * times one NR-column panel, MR x NR accumulators, MR broadcasts of A and two loads of W per step of k.
 * A is read in place (rows of stride K), in blocks of KC columns; a thread owns whole blocks of rows, so once
 * a block's last KC columns are done its rows are complete and the epilogue runs on them at once:
 *     C = act(A W^T + b) + r          (bias b, activation and residual r each optional; act with no residual)
 *     H = LayerNorm(C) * g + beta     (optional; C is kept too when asked: a pre-norm block's residual stream)
 * Sums run over k in the same order for every row and any number of threads: deterministic. Results agree with
 * F.linear to float rounding (another summation order). Built on first use by visionformers/_native.py.
 */
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

long vf_gemm_packed_floats(long N, long K) { return (N + NR - 1) / NR * NR * K; }

/* Bp: panel p holds W[p*NR + j][k] at Bp[(p*K + k)*NR + j], zero for p*NR + j >= N */
void vf_gemm_pack(const float *W, long N, long K, float *Bp, int nthreads) {
    const long panels = (N + NR - 1) / NR;
    #pragma omp parallel for schedule(static) num_threads(nthreads)
    for (long p = 0; p < panels; p++) {
        float *dst = Bp + p * K * NR;
        const long cols = N - p * NR < NR ? N - p * NR : NR;
        for (long k = 0; k < K; k++) {
            for (long j = 0; j < cols; j++) dst[k * NR + j] = W[(p * NR + j) * K + k];
            for (long j = cols; j < NR; j++) dst[k * NR + j] = 0.0f;
        }
    }
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

/* rows m0..m1 of out (stride N) = act(A W^T + bias) + residual for A of stride lda (rows m0.. of the operand), the
 * product over K in blocks of KC, each tile's epilogue after its last block */
static void row_block(const float *A, long lda, const float *Bp, float *out, long m0, long m1, long N, long K,
                      const float *bias, int act, const float *residual) {
    const long panels = (N + NR - 1) / NR;
    for (long p0 = 0; p0 < K; p0 += KC) {
        const long kc = p0 + KC < K ? KC : K - p0;
        const int first = p0 == 0, last = p0 + kc == K;
        for (long jp = 0; jp < panels; jp++) {
            const float *b = Bp + (jp * K + p0) * NR;
            const long col = jp * NR, ncols = N - col < NR ? N - col : NR;
            for (long i = m0; i < m1; i += MR) {
                const int R = m1 - i < MR ? (int)(m1 - i) : MR;
                tile_rows(A + i * lda + p0, lda, b, out + i * N + col, N, kc, first, last, bias ? bias + col : NULL,
                          act, residual ? residual + i * N + col : NULL, R, ncols);
            }
        }
    }
}

/* Rows per block for M rows: about MC_TARGET, a multiple of MR, and as many blocks for every thread */
static long block_rows(long M, int nthreads) {
    long blocks = (M + MC_TARGET - 1) / MC_TARGET;
    blocks = (blocks + nthreads - 1) / nthreads * nthreads;
    const long mc = (M + blocks - 1) / blocks;
    return (mc + MR - 1) / MR * MR;
}

/* C (M, N) = act(A (M, K) W^T + bias) + residual, W packed by vf_gemm_pack; then, with h, h = LayerNorm(C) (g, beta,
 * eps). C may be NULL with h given: h holds C in between (post-norm keeps only the norm). bias, residual, g, beta
 * may be NULL; act is an ACT_* code of vmath.h, and 0 with a residual. */
void vf_gemm(const float *A, const float *Bp, float *C, long M, long N, long K, const float *bias, int act,
             const float *residual, float *h, const float *g, const float *beta, float eps, int nthreads) {
    float *out = C ? C : h;
    const long mc = block_rows(M, nthreads), blocks = (M + mc - 1) / mc;
    /* dynamic: a core slowed by another tenant takes fewer blocks (each block is computed the same way anywhere) */
    #pragma omp parallel for schedule(dynamic, 1) num_threads(nthreads)
    for (long ib = 0; ib < blocks; ib++) {
        const long m0 = ib * mc, m1 = m0 + mc < M ? m0 + mc : M;
        row_block(A, K, Bp, out, m0, m1, N, K, bias, act, residual);
        if (h)  /* the block's rows are complete and still in cache */
            for (long i = m0; i < m1; i++) layer_norm_row(out + i * N, h + i * N, g, beta, N, eps);
    }
}

/* A whole MLP block, C = residual + (act(A W1^T + b1) W2^T + b2) and optionally h = LayerNorm(C), row block by row
 * block: the hidden activations of a block (mc x H) live in a per-thread buffer in cache and never reach memory.
 * A (M, K), W1 packed (H, K), W2 packed (N, H); as vf_gemm otherwise. Returns -1 where the buffer cannot be had. */
int vf_mlp(const float *A, const float *W1p, const float *b1, int act, const float *W2p, const float *b2, float *C,
           long M, long K, long H, long N, const float *residual, float *h, const float *g, const float *beta,
           float eps, int nthreads) {
    float *out = C ? C : h;
    const long mc = block_rows(M, nthreads), blocks = (M + mc - 1) / mc;
    int failed = 0;
    #pragma omp parallel num_threads(nthreads) reduction(|: failed)
    {
        float *hidden = malloc((size_t)mc * H * sizeof(float));
        failed = hidden == NULL;
        #pragma omp for schedule(dynamic, 1)
        for (long ib = 0; ib < blocks; ib++) {
            if (!hidden) continue;
            const long m0 = ib * mc, m1 = m0 + mc < M ? m0 + mc : M;
            row_block(A + m0 * K, K, W1p, hidden, 0, m1 - m0, H, K, b1, act, NULL);
            row_block(hidden, H, W2p, out + m0 * N, 0, m1 - m0, N, H, b2, 0, residual ? residual + m0 * N : NULL);
            if (h)
                for (long i = m0; i < m1; i++) layer_norm_row(out + i * N, h + i * N, g, beta, N, eps);
        }
        free(hidden);
    }
    return failed ? -1 : 0;
}
