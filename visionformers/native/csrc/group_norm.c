/* GroupNorm (Wu & He 2018, eq. 1-2) over channels-last activations, with an optional SiLU after it, forward and
 * backward, for CPU fp32.
 *
 * x is (B, S, C): a channels-last (B, C, H, W) map with S = H*W, and C channels in G groups of C/G consecutive
 * channels. Per sample and group: mean, and rstd = 1/sqrt(var + eps) with the biased variance, in two passes
 * (the mean, then the squared deviations) accumulated in double. Forward: y = act(x * scale + shift) with
 * scale = rstd w, shift = b - mean scale per channel, as ATen computes it. Backward, for x_hat = (x - mean) rstd,
 * z = x_hat w + b, y = act(z):
 *   dz = dy act'(z),   db = sum dz,   dw = sum dz x_hat   (per sample, into part; the caller sums the samples),
 *   dx = rstd (w dz - mean_g(w dz) - x_hat mean_g(w dz x_hat))   (mean_g: over the S * C/G values of a group).
 * The SiLU and its derivative s (1 + z (1 - s)), s = sigmoid(z), fuse into these passes, so no separate pass
 * over the map and no saved normalised tensor. One sample's activations (S*C floats, 0.5-1.5 MB in a CIFAR-10
 * UNet) stay in L2 cache between passes. Samples are split over threads and each is computed the same way on
 * any thread: deterministic. Built on first use by visionformers/_native.py.
 */
#include <stdlib.h>
#include "vmath.h"

#define ROWS_PER_FLUSH 64  /* float partial sums over this many positions, then added into double */

static inline vf silu_grad(vf z, vf dy) {  /* dy * d/dz z sigmoid(z) */
    const vf s = recip(1.0f + v_exp(-z));
    return dy * s * (1.0f + z * (1.0f - s));
}

/* Per-channel mean and rstd of one sample, expanded from its groups (arrays of Cp >= C, zero-padded). */
static void sample_moments(const float *xs, long S, long C, long G, float eps, double *acc, float *muc, float *rc,
                           float *mean, float *rstd) {
    const long cg = C / G;
    for (long c = 0; c < C; c++) acc[c] = 0.0;
    for (long s = 0; s < S; s++)
        for (long c = 0; c < C; c++) acc[c] += xs[s * C + c];
    for (long g = 0; g < G; g++) {
        double t = 0.0;
        for (long c = g * cg; c < (g + 1) * cg; c++) t += acc[c];
        mean[g] = (float)(t / (double)(S * cg));
    }
    for (long c = 0; c < C; c++) { muc[c] = mean[c / cg]; acc[c] = 0.0; }
    for (long s = 0; s < S; s++)
        for (long c = 0; c < C; c++) { const double d = (double)xs[s * C + c] - muc[c]; acc[c] += d * d; }
    for (long g = 0; g < G; g++) {
        double t = 0.0;
        for (long c = g * cg; c < (g + 1) * cg; c++) t += acc[c];
        rstd[g] = (float)(1.0 / sqrt(t / (double)(S * cg) + (double)eps));
    }
    for (long c = 0; c < C; c++) rc[c] = rstd[c / cg];
}

/* y (B, S, C) = act(GroupNorm(x)); w, b (C,) or NULL; writes mean, rstd (B, G). 0 on success, -1 out of memory. */
int vf_group_norm_fwd(const float *x, const float *w, const float *b, float *y, float *mean, float *rstd,
                      long B, long S, long C, long G, float eps, int act, int nthreads) {
    const long Cp = (C + VL - 1) / VL * VL;
    int failed = 0;
    #pragma omp parallel num_threads(nthreads) reduction(|: failed)
    {
        double *acc = malloc(Cp * sizeof(double));
        float *muc = calloc(4 * Cp, sizeof(float)), *rc = muc + Cp, *scale = rc + Cp, *shift = scale + Cp;
        if (!acc || !muc) failed = 1;
        #pragma omp for schedule(static)
        for (long n = 0; n < B; n++) {
            if (failed) continue;
            const float *xs = x + n * S * C;
            float *ys = y + n * S * C;
            sample_moments(xs, S, C, G, eps, acc, muc, rc, mean + n * G, rstd + n * G);
            for (long c = 0; c < C; c++) {
                scale[c] = rc[c] * (w ? w[c] : 1.0f);
                shift[c] = (b ? b[c] : 0.0f) - muc[c] * scale[c];
            }
            for (long s = 0; s < S; s++)
                for (long c = 0; c < C; c += VL) {
                    const vf z = ld(xs + s * C, c, C) * load(scale + c) + load(shift + c);
                    st(ys + s * C, c, C, act == ACT_SILU ? v_act(z, ACT_SILU) : z);
                }
        }
        free(acc);
        free(muc);
    }
    return failed ? -1 : 0;
}

/* dx (B, S, C) from dy, x and the forward's mean, rstd; part (B, 2, C) doubles: per sample [db; dw]. */
int vf_group_norm_bwd(const float *dy, const float *x, const float *mean, const float *rstd, const float *w,
                      const float *b, float *dx, double *part, long B, long S, long C, long G, int act, int nthreads) {
    const long Cp = (C + VL - 1) / VL * VL, cg = C / G;
    int failed = 0;
    #pragma omp parallel num_threads(nthreads) reduction(|: failed)
    {
        double *sums = malloc(2 * Cp * sizeof(double)), *sdz = sums, *sdzx = sums ? sums + Cp : NULL;
        float *buf = calloc(9 * Cp, sizeof(float));
        float *muc = buf, *rc = buf + Cp, *wc = rc + Cp, *bc = wc + Cp, *f1 = bc + Cp, *f2 = f1 + Cp;
        float *k1 = f2 + Cp, *k2 = k1 + Cp, *k3 = k2 + Cp;
        if (!sums || !buf) failed = 1;
        #pragma omp for schedule(static)
        for (long n = 0; n < B; n++) {
            if (failed) continue;
            const float *xs = x + n * S * C, *dys = dy + n * S * C;
            float *dxs = dx + n * S * C;
            for (long c = 0; c < C; c++) {
                muc[c] = mean[n * G + c / cg];
                rc[c] = rstd[n * G + c / cg];
                wc[c] = w ? w[c] : 1.0f;
                bc[c] = b ? b[c] : 0.0f;
                sdz[c] = sdzx[c] = 0.0;
            }
            /* pass 1: dz (kept in dx) and its channel sums */
            for (long s0 = 0; s0 < S; s0 += ROWS_PER_FLUSH) {
                for (long c = 0; c < Cp; c++) f1[c] = f2[c] = 0.0f;
                const long s1 = s0 + ROWS_PER_FLUSH < S ? s0 + ROWS_PER_FLUSH : S;
                for (long s = s0; s < s1; s++)
                    for (long c = 0; c < C; c += VL) {
                        const vf xh = (ld(xs + s * C, c, C) - load(muc + c)) * load(rc + c);
                        vf dz = ld(dys + s * C, c, C);
                        if (act == ACT_SILU) dz = silu_grad(xh * load(wc + c) + load(bc + c), dz);
                        st(dxs + s * C, c, C, dz);
                        store(f1 + c, load(f1 + c) + dz);
                        store(f2 + c, load(f2 + c) + dz * xh);
                    }
                for (long c = 0; c < C; c++) { sdz[c] += f1[c]; sdzx[c] += f2[c]; }
            }
            for (long g = 0; g < G; g++) {
                double m1 = 0.0, m2 = 0.0;
                for (long c = g * cg; c < (g + 1) * cg; c++) { m1 += wc[c] * sdz[c]; m2 += wc[c] * sdzx[c]; }
                m1 /= (double)(S * cg);
                m2 /= (double)(S * cg);
                for (long c = g * cg; c < (g + 1) * cg; c++) {
                    k1[c] = rc[c] * wc[c];
                    k2[c] = (float)(rc[c] * m1);
                    k3[c] = (float)(rc[c] * m2);
                }
            }
            /* pass 2: dx = rstd w dz - rstd m1 - x_hat rstd m2 */
            for (long s = 0; s < S; s++)
                for (long c = 0; c < C; c += VL) {
                    const vf xh = (ld(xs + s * C, c, C) - load(muc + c)) * load(rc + c);
                    st(dxs + s * C, c, C, load(k1 + c) * ld(dxs + s * C, c, C) - load(k2 + c) - xh * load(k3 + c));
                }
            for (long c = 0; c < C; c++) { part[n * 2 * C + c] = sdz[c]; part[n * 2 * C + C + c] = sdzx[c]; }
        }
        free(sums);
        free(buf);
    }
    return failed ? -1 : 0;
}
