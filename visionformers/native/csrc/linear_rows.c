/* y = x W^T + b for a few rows of x: the matrix-vector products of token-by-token decoding.
 *
 * W is (R, K) row-major, as nn.Linear stores it; x is (M, K); y is (M, R). At decoding's one row per step the
 * product only streams W from memory. CPU BLAS runs this case on one core (16 GB/s here, where both cores read
 * 23 GB/s), so the rows of W are split over the threads, four at a time, in chunks of 64 contiguous rows handed
 * out as threads finish (a core that another process holds up does not stall the others, as a static split
 * would). Each block of four W rows meets the rows of x two at a time (8 accumulators: each W value loaded once
 * serves two rows), then the odd one. Every dot product is one vectorised reduction in a fixed order, whichever
 * thread computes it: deterministic run to run and for any number of threads.
 * Built on first use by visionformers/_native.py with the system C compiler and OpenMP (PyTorch's libgomp).
 */

/* rows r0..r0+3 of W against one row of x */
static inline void block4x1(const float *restrict W, const float *restrict x, const float *restrict b,
                            float *restrict y, long r0, long K) {
    const float *w0 = W + r0 * K, *w1 = w0 + K, *w2 = w1 + K, *w3 = w2 + K;
    float s0 = 0.f, s1 = 0.f, s2 = 0.f, s3 = 0.f;
    #pragma omp simd reduction(+:s0, s1, s2, s3)
    for (long k = 0; k < K; k++) {
        const float xk = x[k];
        s0 += w0[k] * xk;
        s1 += w1[k] * xk;
        s2 += w2[k] * xk;
        s3 += w3[k] * xk;
    }
    y[0] = b ? s0 + b[r0] : s0;
    y[1] = b ? s1 + b[r0 + 1] : s1;
    y[2] = b ? s2 + b[r0 + 2] : s2;
    y[3] = b ? s3 + b[r0 + 3] : s3;
}

/* rows r0..r0+3 of W against two rows of x, xa and xb */
static inline void block4x2(const float *restrict W, const float *restrict xa, const float *restrict xb,
                            const float *restrict b, float *restrict ya, float *restrict yb, long r0, long K) {
    const float *w0 = W + r0 * K, *w1 = w0 + K, *w2 = w1 + K, *w3 = w2 + K;
    float a0 = 0.f, a1 = 0.f, a2 = 0.f, a3 = 0.f, c0 = 0.f, c1 = 0.f, c2 = 0.f, c3 = 0.f;
    #pragma omp simd reduction(+:a0, a1, a2, a3, c0, c1, c2, c3)
    for (long k = 0; k < K; k++) {
        const float p = xa[k], q = xb[k];
        const float v0 = w0[k], v1 = w1[k], v2 = w2[k], v3 = w3[k];
        a0 += v0 * p;
        a1 += v1 * p;
        a2 += v2 * p;
        a3 += v3 * p;
        c0 += v0 * q;
        c1 += v1 * q;
        c2 += v2 * q;
        c3 += v3 * q;
    }
    ya[0] = b ? a0 + b[r0] : a0;
    ya[1] = b ? a1 + b[r0 + 1] : a1;
    ya[2] = b ? a2 + b[r0 + 2] : a2;
    ya[3] = b ? a3 + b[r0 + 3] : a3;
    yb[0] = b ? c0 + b[r0] : c0;
    yb[1] = b ? c1 + b[r0 + 1] : c1;
    yb[2] = b ? c2 + b[r0 + 2] : c2;
    yb[3] = b ? c3 + b[r0 + 3] : c3;
}

void vf_linear_rows(const float *restrict W, const float *restrict x, const float *restrict b, float *restrict y,
                    long M, long R, long K, int nthreads) {
    #pragma omp parallel for schedule(dynamic, 16) num_threads(nthreads) if (R * K >= 65536)
    for (long r0 = 0; r0 < R; r0 += 4) {
        if (R - r0 >= 4) {
            long m = 0;
            for (; m + 1 < M; m += 2)
                block4x2(W, x + m * K, x + (m + 1) * K, b, y + m * R + r0, y + (m + 1) * R + r0, r0, K);
            if (m < M)
                block4x1(W, x + m * K, b, y + m * R + r0, r0, K);
        } else {  /* the last 1-3 rows of W */
            for (long m = 0; m < M; m++) {
                const float *xm = x + m * K;
                for (long r = r0; r < R; r++) {
                    const float *wr = W + r * K;
                    float s = 0.f;
                    #pragma omp simd reduction(+:s)
                    for (long k = 0; k < K; k++) s += wr[k] * xm[k];
                    y[m * R + r] = b ? s + b[r] : s;
                }
            }
        }
    }
}
