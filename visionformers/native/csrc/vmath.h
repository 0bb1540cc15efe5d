/* Vector math shared by the native kernels: vectors of VL floats (GCC vector extensions) as wide as the machine's
 * registers, 16 with AVX-512 and 8 otherwise (one AVX2 or two SSE registers), exp, erf, the activations and one
 * LayerNorm row.
 * Vectors wider than the registers are split by the compiler but passed between functions through memory: on a
 * Zen 3 (AVX2) 16-float vectors made SiLU 2.9x and the GroupNorm kernels 3x slower than 8-float ones.
 * exp is a degree-5 polynomial on [-ln2/2, ln2/2] after range reduction (Cephes expf); GELU's erf is a rational fit.
 * Included by the kernels in this directory; visionformers/_native.py keys each build by these headers too.
 */
#ifndef VF_VMATH_H
#define VF_VMATH_H
#include <math.h>
#include <string.h>

#ifndef VL
#if defined(__AVX512F__)
#define VL 16
#else
#define VL 8
#endif
#endif
#if defined(__AVX2__) || defined(__AVX512F__)
#include <immintrin.h>  /* the intrinsics below, where the machine has them */
#endif
typedef float vf __attribute__((vector_size(4 * VL)));
typedef int vi __attribute__((vector_size(4 * VL)));

enum { ACT_NONE = 0, ACT_GELU = 1, ACT_GELU_TANH = 2, ACT_RELU = 3, ACT_SILU = 4 };

static inline vf load(const float *p) { vf v; memcpy(&v, p, sizeof v); return v; }
static inline void store(float *p, vf v) { memcpy(p, &v, sizeof v); }
#if defined(__AVX512F__) && VL == 16
/* the first n < VL lanes of p, zeros after / stores of the first n lanes: masked moves (an array filled piecewise
 * and read back as a vector waits on a failed store-to-load forward, ~20 cycles per tail on Zen 3) */
static inline vf load_n(const float *p, long n) { return (vf)_mm512_maskz_loadu_ps((__mmask16)((1u << n) - 1), p); }
static inline void store_n(float *p, vf v, long n) { _mm512_mask_storeu_ps(p, (__mmask16)((1u << n) - 1), (__m512)v); }
#elif defined(__AVX2__) && VL == 8
static inline __m256i lanes_below(long n) { return _mm256_cmpgt_epi32(_mm256_set1_epi32((int)n), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7)); }
static inline vf load_n(const float *p, long n) { return (vf)_mm256_maskload_ps(p, lanes_below(n)); }
static inline void store_n(float *p, vf v, long n) { _mm256_maskstore_ps(p, lanes_below(n), (__m256)v); }
#else
static inline vf load_n(const float *p, long n) {  /* the first n < VL lanes of p, zeros after */
    float t[VL] = {0};
    memcpy(t, p, n * sizeof(float));
    return load(t);
}
static inline void store_n(float *p, vf v, long n) {
    float t[VL];
    store(t, v);
    memcpy(p, t, n * sizeof(float));
}
#endif
/* lanes c .. c + VL of a row of C floats, the part past C as zeros (loads) or left alone (stores) */
static inline vf ld(const float *p, long c, long C) { return C - c >= VL ? load(p + c) : load_n(p + c, C - c); }
static inline void st(float *p, long c, long C, vf v) { if (C - c >= VL) store(p + c, v); else store_n(p + c, v, C - c); }
/* one broadcast: a - 0.0f == a exactly and folds away (a + 0.0f does not: -0.0f + 0.0f = +0.0f) */
static inline vf splat(float a) { return a - (vf){0}; }
static inline vf vselect(vi mask, vf a, vf b) { return (vf)(((vi)a & mask) | ((vi)b & ~mask)); }

#if defined(__AVX512F__)
static inline vf vmax(vf a, vf b) { return (vf)_mm512_max_ps((__m512)a, (__m512)b); }
static inline vf vmin(vf a, vf b) { return (vf)_mm512_min_ps((__m512)a, (__m512)b); }
static inline vf recip(vf d) {  /* 1/d: 14-bit estimate and one Newton step (relative error ~1e-8, no divider) */
    const vf r = (vf)_mm512_rcp14_ps((__m512)d);
    return r * (2.0f - d * r);
}
#elif defined(__AVX2__) && VL == 8
static inline vf vmax(vf a, vf b) { return (vf)_mm256_max_ps((__m256)a, (__m256)b); }
static inline vf vmin(vf a, vf b) { return (vf)_mm256_min_ps((__m256)a, (__m256)b); }
static inline vf recip(vf d) {  /* 1/d: 12-bit estimate and one Newton step (relative error ~2e-7; the divider is
                                 * 3-5x slower per vector, and GELU's erf in a product's epilogue waited on it) */
    const vf r = (vf)_mm256_rcp_ps((__m256)d);
    return r * (2.0f - d * r);
}
#else
static inline vf vmax(vf a, vf b) { return vselect(a > b, a, b); }
static inline vf vmin(vf a, vf b) { return vselect(a < b, a, b); }
static inline vf recip(vf d) { return 1.0f / d; }
#endif

/* e^x for x already in [-87.3, 88.3] (normal float results): Cephes expf's range reduction and polynomial */
static inline vf exp_in_range(vf x) {
    const vf n = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;  /* round(x / ln 2) */
    const vf r = (x - n * 0.693359375f) - n * -2.12194440e-4f;              /* x - n ln 2, in two parts */
    vf p = splat(1.9875691500e-4f);
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    const vf e = p * r * r + r + 1.0f;
    const vi pow2n = (__builtin_convertvector(n, vi) + 127) << 23;          /* 2^n as float bits */
    return e * (vf)pow2n;
}

static inline vf v_exp(vf x) {  /* from e^-80: results stay normal floats (no slow subnormals) */
    return exp_in_range(vmin(vmax(x, splat(-80.0f)), splat(88.3f)));
}

/* exp(x) for x <= 0 (a softmax's scores less their max), 0 from x = -87.3 on, where e^x is no longer a normal float
 * (masked scores, -inf, give 0) */
static inline vf v_exp_le0(vf x) {
    const vi keep = x > -87.3f;
    return (vf)((vi)exp_in_range(vmax(x, splat(-87.3f))) & keep);
}

/* GELU x Phi(x) = x (1/2 + erf(x / sqrt 2) / 2) (Hendrycks & Gimpel 2016, sec. 2), with erf(z) = z P(z^2) / Q(z^2), the
 * rational minimax fit of Eigen's and XLA's float erf (|error| <= 4.3e-7 below |z| = 3.92, where float's erf becomes
 * +-1). z = x / sqrt 2 and the halving are folded into the coefficients: with c = x clamped to |x| <= 4.2 sqrt 2 and
 * u = c^2, erf(x / sqrt 2) / 2 = c P~(u) / Q~(u), P~(u) = P(u/2) / (2 sqrt 2), Q~(u) = Q(u/2). At |z| = 4.2 the fit
 * exceeds 1 by 2.7e-6, so clamping the half-erf to [-1/2, 1/2] gives exactly Phi = 0 or 1 far out (GELU(-1e30) = 0)
 * whatever the reciprocal's rounding. 22 vector operations, one reciprocal and no exp: 1.2x as fast as the unfolded
 * erf with its saturation select, and Swin-T's stage-1 MLP (96 -> 384 -> 96, the GELU in its epilogue) 4% faster. */
static inline vf v_gelu(vf x) {
    const vf c = vmin(vmax(x, splat(-5.939696961966999f)), splat(5.939696961966999f));
    const vf u = c * c;
    vf p = splat(-1.505995060250189e-12f);
    p = p * u + 3.061199412650202e-10f;
    p = p * u + -4.642651039253876e-08f;
    p = p * u + -2.515756170991271e-06f;
    p = p * u + -6.496460735158676e-05f;
    p = p * u + -5.223043900778214e-04f;
    p = p * u + -5.690807157595012e-03f;
    vf q = splat(-9.103794904062250e-07f);
    q = q * u + -2.667175690986312e-05f;
    q = q * u + -4.207067435955075e-04f;
    q = q * u + -3.686664583602340e-03f;
    q = q * u + -1.426473905141890e-02f;
    const vf half_erf = vmin(vmax(c * p * recip(q), splat(-0.5f)), splat(0.5f));
    return x * (0.5f + half_erf);
}

/* the sum of v's lanes, as a shuffle tree (three dependent adds with AVX2, not VL) */
static inline float hsum(vf v) {
#if defined(__AVX2__) && VL == 8
    __m256 x = (__m256)v;
    x = _mm256_add_ps(x, _mm256_permute2f128_ps(x, x, 1));
    x = _mm256_add_ps(x, _mm256_shuffle_ps(x, x, 0x4E));
    return _mm256_cvtss_f32(_mm256_add_ps(x, _mm256_shuffle_ps(x, x, 0xB1)));
#else
    float t = 0.0f;
    for (int l = 0; l < VL; l++) t += v[l];
    return t;
#endif
}

/* every lane = the max of v's lanes, as a shuffle tree */
static inline vf hmax_all(vf v) {
#if defined(__AVX2__) && VL == 8
    __m256 x = (__m256)v;
    x = _mm256_max_ps(x, _mm256_permute2f128_ps(x, x, 1));
    x = _mm256_max_ps(x, _mm256_shuffle_ps(x, x, 0x4E));
    return (vf)_mm256_max_ps(x, _mm256_shuffle_ps(x, x, 0xB1));
#else
    float m = v[0];
    for (int l = 1; l < VL; l++) m = v[l] > m ? v[l] : m;
    return splat(m);
#endif
}

/* sum over n < N of f(v[n]) for f(x) = x (sq = 0) or (x - mean)^2 (sq = 1): four vector accumulators and a shuffle
 * tree, so that a row's sum waits on a few additions rather than on one chain per vector and lane */
static inline __attribute__((always_inline)) float row_sum(const float *v, long N, float mean, const int sq) {
    const long full = N - N % VL;
    vf a0 = splat(0.0f), a1 = a0, a2 = a0, a3 = a0;
    const vf m = splat(mean);
#define TERM(p) (sq ? (load(p) - m) * (load(p) - m) : load(p))
    long n = 0;
    for (; n + 4 * VL <= full; n += 4 * VL) {
        a0 += TERM(v + n);
        a1 += TERM(v + n + VL);
        a2 += TERM(v + n + 2 * VL);
        a3 += TERM(v + n + 3 * VL);
    }
    for (; n < full; n += VL) a0 += TERM(v + n);
#undef TERM
    float t = hsum((a0 + a1) + (a2 + a3));
    for (n = full; n < N; n++) t += sq ? (v[n] - mean) * (v[n] - mean) : v[n];
    return t;
}

/* h = (v - mean) / sqrt(var + eps) * g + beta over one row of N floats (LayerNorm, Ba et al. 2016, eq. 4; g, beta
 * may be NULL; h may be v): the one row norm of epilogue.c's vf_add_norm and gemm.c's epilogue. Two passes for the
 * statistics (the variance of the centred values, as ATen's), the row being in L1 cache. */
static inline void layer_norm_row(const float *v, float *h, const float *g, const float *beta, long N,
                                  float eps) {
    const long full = N - N % VL;
    const float mean = row_sum(v, N, 0.0f, 0) / (float)N;
    const float rstd = 1.0f / sqrtf(row_sum(v, N, mean, 1) / (float)N + eps);
    for (long n = 0; n < full; n += VL) {
        vf o = (load(v + n) - mean) * rstd;
        if (g) o = o * load(g + n);
        if (beta) o = o + load(beta + n);
        store(h + n, o);
    }
    for (long n = full; n < N; n++) {
        float o = (v[n] - mean) * rstd;
        if (g) o = o * g[n];
        if (beta) o = o + beta[n];
        h[n] = o;
    }
}

static inline vf v_act(vf x, int act) {
    switch (act) {
    case ACT_GELU:
        return v_gelu(x);
    case ACT_GELU_TANH: {  /* x/2 (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))) = x sigmoid(2u): no 1 - 1/(..) to cancel */
        const vf u = 0.79788456080286536f * (x + 0.044715f * x * x * x);
        return x * recip(1.0f + v_exp(-2.0f * u));
    }
    case ACT_RELU:
        return vselect(x < 0.0f, splat(0.0f), x);  /* NaN stays NaN, as in ATen */
    case ACT_SILU:
        return x * recip(1.0f + v_exp(-x));
    default:
        return x;
    }
}

#endif
