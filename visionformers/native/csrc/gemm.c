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
#include "gemm_kernel.h"

long vf_gemm_packed_floats(long N, long K) { return (N + NR - 1) / NR * NR * K; }

/* Bp: panel p holds W[p*NR + j][k] at Bp[(p*K + k)*NR + j], zero for p*NR + j >= N */
void vf_gemm_pack(const float *W, long N, long K, float *Bp, int nthreads) {
    const long panels = (N + NR - 1) / NR;
    #pragma omp parallel for schedule(static) num_threads(nthreads)
    for (long p = 0; p < panels; p++) pack_panel(W + p * NR * K, K, N - p * NR < NR ? N - p * NR : NR, K, Bp + p * K * NR);
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
        row_block(A, K, Bp, out, N, m0, m1, N, K, bias, act, residual);
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
        float *hidden = scratch((size_t)mc * H);
        failed = hidden == NULL;
        #pragma omp for schedule(dynamic, 1)
        for (long ib = 0; ib < blocks; ib++) {
            if (!hidden) continue;
            const long m0 = ib * mc, m1 = m0 + mc < M ? m0 + mc : M;
            mlp_rows(A + m0 * K, K, W1p, b1, act, W2p, b2, hidden, H, out + m0 * N, N, m1 - m0,
                     residual ? residual + m0 * N : NULL);
            if (h)
                for (long i = m0; i < m1; i++) layer_norm_row(out + i * N, h + i * N, g, beta, N, eps);
        }
    }
    return failed ? -1 : 0;
}

/* A product over gathered rows, out (B Lo, N) = LN(A) W^T + bias: row i = b Lo + o of A concatenates the G rows
 * x[b, index[o G + j]], j < G, of x (B, L, C) (index L reads a zero row: padding), and LN is the LayerNorm (g, beta,
 * eps) over its G C features with norm, else the identity. Swin's patch merging (Liu et al. 2021, sec. 3.1: the 2x2
 * neighbours, their norm, the reduction) with the neighbours gathered straight from the token stream, row block by
 * row block, the gathered and normed rows in a per-thread buffer in cache. Returns -1 where the buffer cannot be
 * had. */
int vf_gather_norm_gemm(const float *x, long B, long L, long C, const long *index, long Lo, long G, int norm,
                        const float *g, const float *beta, float eps, const float *Wp, long N, const float *bias,
                        float *out, int nthreads) {
    const long M = B * Lo, K = G * C;
    const long mc = block_rows(M, nthreads), blocks = (M + mc - 1) / mc;
    int failed = 0;
    #pragma omp parallel num_threads(nthreads) reduction(|: failed)
    {
        float *A = scratch((size_t)(mc * K));
        failed = A == NULL;
        #pragma omp for schedule(dynamic, 1)
        for (long ib = 0; ib < blocks; ib++) {
            if (failed) continue;
            const long m0 = ib * mc, m1 = m0 + mc < M ? m0 + mc : M;
            for (long i = m0; i < m1; i++) {
                float *row = A + (i - m0) * K;
                const long b = i / Lo, o = i % Lo;
                for (long j = 0; j < G; j++) {
                    const long src = index[o * G + j];
                    if (src == L) memset(row + j * C, 0, C * sizeof(float));
                    else memcpy(row + j * C, x + (b * L + src) * C, C * sizeof(float));
                }
                if (norm) layer_norm_row(row, row, g, beta, K, eps);
            }
            row_block(A, K, Wp, out + m0 * N, N, 0, m1 - m0, N, K, bias, 0, NULL);
        }
    }
    return failed ? -1 : 0;
}
