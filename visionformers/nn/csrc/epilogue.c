/* The elementwise steps around a transformer block's products, fused into one pass each, for CPU inference.
 *
 * ATen runs a block's bias, activation, residual and LayerNorm as separate passes over the activations, and
 * adds a bias by copying it into every row of the product's output before the product (addmm). Here:
 *   vf_bias_act:  h = act(h + b) in place: fc1's bias and activation in one pass over its (M, hidden) output.
 *   vf_add_norm:  v = x + (y + b); s = v and/or h = LayerNorm(v) (Ba et al. 2016, eq. 4): a residual
 *                 branch's output bias, the residual add and the next norm in one pass (pre-norm keeps s,
 *                 the residual stream, and h, the next sublayer's input; post-norm keeps only h).
 * Math on 16-float vectors (GCC vector extensions: AVX-512 registers where -march=native has them, two AVX2 or
 * four SSE registers otherwise). erf is a rational fit (below); exp is a degree-5 polynomial on [-ln2/2, ln2/2]
 * after range reduction (Cephes expf).
 * Results match ATen's to float rounding; every row is computed the same way on any thread: deterministic.
 * Built on first use by visionformers/_native.py with the system C compiler and OpenMP (PyTorch's libgomp).
 */
#include <math.h>
#include <string.h>

#define VL 16
typedef float vf __attribute__((vector_size(4 * VL)));
typedef int vi __attribute__((vector_size(4 * VL)));

enum { ACT_NONE = 0, ACT_GELU = 1, ACT_GELU_TANH = 2, ACT_RELU = 3, ACT_SILU = 4 };

static inline vf load(const float *p) { vf v; memcpy(&v, p, sizeof v); return v; }
static inline void store(float *p, vf v) { memcpy(p, &v, sizeof v); }
static inline vf splat(float a) { return (vf){0} + a; }
static inline vf select(vi mask, vf a, vf b) { return (vf)(((vi)a & mask) | ((vi)b & ~mask)); }

#if defined(__AVX512F__)
#include <immintrin.h>
static inline vf vmax(vf a, vf b) { return (vf)_mm512_max_ps((__m512)a, (__m512)b); }
static inline vf vmin(vf a, vf b) { return (vf)_mm512_min_ps((__m512)a, (__m512)b); }
static inline vf recip(vf d) {  /* 1/d: 14-bit estimate and one Newton step (relative error ~1e-8, no divider) */
    const vf r = (vf)_mm512_rcp14_ps((__m512)d);
    return r * (2.0f - d * r);
}
#else
static inline vf vmax(vf a, vf b) { return select(a > b, a, b); }
static inline vf vmin(vf a, vf b) { return select(a < b, a, b); }
static inline vf recip(vf d) { return 1.0f / d; }
#endif

static inline vf v_exp(vf x) {
    x = vmin(vmax(x, splat(-80.0f)), splat(88.3f));  /* from e^-80: results stay normal floats (no slow subnormals) */
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

/* erf(x) = x P(x^2) / Q(x^2) below |x| = 3.92, +-1 beyond (float's erf is +-1 there): the rational minimax fit of
 * Eigen's and XLA's float erf, |error| <= 4.3e-7; no exp and one reciprocal, three times cheaper than exp-based. */
static inline vf v_erf(vf x) {
    const vi sign = (vi)x & (int)0x80000000;
    const vi saturated = (vf)((vi)x ^ sign) >= 3.92f;  /* erf rounds to +-1 in float from |x| = 3.92 on */
    x = vmin(vmax(x, splat(-4.0f)), splat(4.0f));
    const vf x2 = x * x;
    vf p = splat(-2.72614225801306e-10f);
    p = p * x2 + 2.77068142495902e-08f;
    p = p * x2 + -2.10102402082508e-06f;
    p = p * x2 + -5.69250639462346e-05f;
    p = p * x2 + -7.34990630326855e-04f;
    p = p * x2 + -2.95459980854025e-03f;
    p = p * x2 + -1.60960333262415e-02f;
    vf q = splat(-1.45660718464996e-05f);
    q = q * x2 + -2.13374055278905e-04f;
    q = q * x2 + -1.68282697438203e-03f;
    q = q * x2 + -7.37332916720468e-03f;
    q = q * x2 + -1.42647390514189e-02f;
    return select(saturated, (vf)(sign | 0x3f800000), x * p * recip(q));
}

static inline vf v_act(vf x, int act) {
    switch (act) {
    case ACT_GELU:  /* x Phi(x) = x/2 (1 + erf(x / sqrt 2)) (Hendrycks & Gimpel 2016, sec. 2) */
        return 0.5f * x * (1.0f + v_erf(x * 0.70710678118654752f));
    case ACT_GELU_TANH: {  /* x/2 (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))), tanh u = 1 - 2 / (e^2u + 1) */
        const vf u = 0.79788456080286536f * (x + 0.044715f * x * x * x);
        return 0.5f * x * (2.0f - 2.0f * recip(v_exp(2.0f * u) + 1.0f));
    }
    case ACT_RELU:
        return select(x < 0.0f, splat(0.0f), x);  /* NaN stays NaN, as in ATen */
    case ACT_SILU:
        return x * recip(1.0f + v_exp(-x));
    default:
        return x;
    }
}

/* h (M, N) = act(h + b), b (N,) or NULL; the last N % 16 columns go through the same vector code */
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
        if (!h) continue;
        vf acc = splat(0.0f);
        float tail = 0.0f;
        for (long n = 0; n < full; n += VL) acc += load(v + n);
        for (long n = full; n < N; n++) tail += v[n];
        float sum = tail;
        for (int i = 0; i < VL; i++) sum += acc[i];
        const float mean = sum / (float)N;
        acc = splat(0.0f);
        tail = 0.0f;
        for (long n = 0; n < full; n += VL) { const vf d = load(v + n) - mean; acc += d * d; }
        for (long n = full; n < N; n++) { const float d = v[n] - mean; tail += d * d; }
        float sq = tail;
        for (int i = 0; i < VL; i++) sq += acc[i];
        const float rstd = 1.0f / sqrtf(sq / (float)N + eps);
        float *hr = h + m * N;
        for (long n = 0; n < full; n += VL) {
            vf o = (load(v + n) - mean) * rstd;
            if (w) o = o * load(w + n);
            if (beta) o = o + load(beta + n);
            store(hr + n, o);
        }
        for (long n = full; n < N; n++) {
            float o = (v[n] - mean) * rstd;
            if (w) o = o * w[n];
            if (beta) o = o + beta[n];
            hr[n] = o;
        }
    }
}
