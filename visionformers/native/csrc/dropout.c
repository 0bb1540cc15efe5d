/* Dropout (Srivastava et al. 2014, eq. 2, inverted: kept values scaled by 1/(1-p)) with a counter-based random
 * mask, for CPU fp32.
 *
 * Element i is kept when the top 24 bits of hash(seed, i) are >= threshold = round(p 2^24); the hash is
 * SplitMix64's output function (Steele et al. 2014) of seed + (i + 1) * golden ratio, i.e. the i-th output of
 * a SplitMix64 generator started at seed. The mask is a function of (seed, i) only: any thread computes any
 * element, the same seed gives the same mask on any machine and thread count, and backward recomputes the mask
 * from the seed instead of storing it. ATen's CPU dropout draws from a sequential Mersenne Twister, ~2.5 ns per
 * element on one core, which is most of its time on a UNet's activations.
 * Built on first use by visionformers/_native.py.
 */
#include <stdint.h>
#include <string.h>

#define VL 16
typedef float vf __attribute__((vector_size(4 * VL)));
typedef uint32_t vu __attribute__((vector_size(4 * VL)));
typedef uint64_t vq __attribute__((vector_size(4 * VL)));  /* 8 lanes */

static inline vq mix(vq z) {
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

/* v * scale where the elements i0 .. i0 + 15 are kept, else 0 */
static inline vf apply(vf v, long i0, uint64_t seed, uint32_t threshold, float scale) {
    const uint64_t golden = 0x9E3779B97F4A7C15ull;
    vq lo, hi;
    for (int k = 0; k < 8; k++) {
        lo[k] = seed + (uint64_t)(i0 + k + 1) * golden;
        hi[k] = seed + (uint64_t)(i0 + k + 9) * golden;
    }
    lo = mix(lo) >> 40;
    hi = mix(hi) >> 40;
    vu bits;
    for (int k = 0; k < 8; k++) { bits[k] = (uint32_t)lo[k]; bits[k + 8] = (uint32_t)hi[k]; }
    return (vf)((vu)(v * scale) & (bits >= threshold));  /* the comparison is all ones where kept */
}

/* y[i] = x[i] * scale where element i is kept, else 0; x may be y (in place). n elements, contiguous. */
void vf_dropout(const float *x, float *y, long n, uint64_t seed, uint32_t threshold, float scale, int nthreads) {
    const long full = n - n % VL;
    #pragma omp parallel for schedule(static) num_threads(nthreads) if (n >= 65536)
    for (long i = 0; i < full; i += VL) {
        vf v;
        memcpy(&v, x + i, sizeof v);
        v = apply(v, i, seed, threshold, scale);
        memcpy(y + i, &v, sizeof v);
    }
    if (full < n) {
        float t[VL] = {0};
        memcpy(t, x + full, (n - full) * sizeof(float));
        vf v;
        memcpy(&v, t, sizeof v);
        v = apply(v, full, seed, threshold, scale);
        memcpy(t, &v, sizeof v);
        memcpy(y + full, t, (n - full) * sizeof(float));
    }
}
