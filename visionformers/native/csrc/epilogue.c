/* The elementwise steps around a transformer block's products, fused into one pass each, for CPU inference.
 *
 * ATen runs a block's bias, activation, residual and LayerNorm as separate passes over the activations, and
 * adds a bias by copying it into every row of the product's output before the product (addmm). Here:
 *   vf_bias_act:  h = act(h + b) in place: fc1's bias and activation in one pass over its (M, hidden) output.
 *   vf_add_norm:  v = x + (y + b); s = v and/or h = LayerNorm(v) (Ba et al. 2016, eq. 4): a residual
 *                 branch's output bias, the residual add and the next norm in one pass (pre-norm keeps s,
 *                 the residual stream, and h, the next sublayer's input; post-norm keeps only h).
 * Math on vectors of VL floats (vmath.h).
 * Results match ATen's to float rounding; every row is computed the same way on any thread: deterministic.
 * Built on first use by visionformers/_native.py with the system C compiler and OpenMP (PyTorch's libgomp).
 */
#include "vmath.h"

/* h (M, N) = act(h + b), b (N,) or NULL; the last N % VL columns go through the same vector code */
void vf_bias_act(float *restrict h, const float *restrict b, long M, long N, int act, int nthreads) {
    const long full = N - N % VL;
    #pragma omp parallel for schedule(static) num_threads(nthreads) if (M * N >= 32768)
    for (long m = 0; m < M; m++) {
        float *row = h + m * N;
        for (long n = 0; n < full; n += VL)
            store(row + n, v_act(b ? load(row + n) + load(b + n) : load(row + n), act));
        if (full < N) {
            float tail[VL] = {0}, tb[VL] = {0};
            memcpy(tail, row + full, (N - full) * sizeof(float));
            if (b) memcpy(tb, b + full, (N - full) * sizeof(float));
            store(tail, v_act(load(tail) + load(tb), act));
            memcpy(row + full, tail, (N - full) * sizeof(float));
        }
    }
}

/* v = x + (y + b) per row (x, b may be NULL); s = v if s; h = (v - mean) / sqrt(var + eps) * w + beta if h
 * (w, beta may be NULL). s and h may be y itself (in place); with h but no s, h holds v in between. */
void vf_add_norm(const float *x, const float *y, const float *restrict b, float *s, float *h,
                 const float *restrict w, const float *restrict beta, long M, long N, float eps, int nthreads) {
    const long full = N - N % VL;
    if (!s && !h) return;
    #pragma omp parallel for schedule(static) num_threads(nthreads) if (M * N >= 16384)
    for (long m = 0; m < M; m++) {
        const float *xr = x ? x + m * N : NULL, *yr = y + m * N;
        float *v = s ? s + m * N : h + m * N;
        for (long n = 0; n < full; n += VL) {
            vf a = load(yr + n);
            if (b) a = a + load(b + n);
            if (xr) a = load(xr + n) + a;
            store(v + n, a);
        }
        for (long n = full; n < N; n++) {
            float a = yr[n];
            if (b) a = a + b[n];
            if (xr) a = xr[n] + a;
            v[n] = a;
        }
        if (h) layer_norm_row(v, h + m * N, w, beta, N, eps);
    }
}
