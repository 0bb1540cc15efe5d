/* y = x W^T + b for a few rows of x: the matrix-vector products of token-by-token decoding.
 *
 * W is (R, K) row-major, as nn.Linear stores it; x is (M, K); y is (M, R). At decoding's one row per step the
 * product only streams W from memory. CPU BLAS runs this case on one core (16 GB/s here, where both cores read
 * 23 GB/s), so the rows of W are split over the threads, four at a time, in chunks of 64 contiguous rows handed
 * out as threads finish (a core that another process holds up does not stall the others, as a static split
 * would). Every dot product is one vectorised reduction in a fixed order, whichever thread computes it:
 * deterministic run to run and for any number of threads.
 * Built on first use by visionformers/_native.py with the system C compiler and OpenMP (PyTorch's libgomp).
 */
void vf_linear_rows(const float *restrict W, const float *restrict x, const float *restrict b, float *restrict y,
                    long M, long R, long K, int nthreads) {
    #pragma omp parallel for schedule(dynamic, 16) num_threads(nthreads) if (R * K >= 65536)
    for (long r0 = 0; r0 < R; r0 += 4) {
        const long nr = R - r0 < 4 ? R - r0 : 4;
        for (long m = 0; m < M; m++) {
            const float *xm = x + m * K;
            float *ym = y + m * R + r0;
            if (nr == 4) {
                const float *w0 = W + r0 * K, *w1 = w0 + K, *w2 = w1 + K, *w3 = w2 + K;
                float s0 = 0.f, s1 = 0.f, s2 = 0.f, s3 = 0.f;
                #pragma omp simd reduction(+:s0, s1, s2, s3)
                for (long k = 0; k < K; k++) {
                    const float xk = xm[k];
                    s0 += w0[k] * xk;
                    s1 += w1[k] * xk;
                    s2 += w2[k] * xk;
                    s3 += w3[k] * xk;
                }
                ym[0] = b ? s0 + b[r0] : s0;
                ym[1] = b ? s1 + b[r0 + 1] : s1;
                ym[2] = b ? s2 + b[r0 + 2] : s2;
                ym[3] = b ? s3 + b[r0 + 3] : s3;
            } else {
                for (long i = 0; i < nr; i++) {
                    const float *wr = W + (r0 + i) * K;
                    float s = 0.f;
                    #pragma omp simd reduction(+:s)
                    for (long k = 0; k < K; k++) s += wr[k] * xm[k];
                    ym[i] = b ? s + b[r0 + i] : s;
                }
            }
        }
    }
}
