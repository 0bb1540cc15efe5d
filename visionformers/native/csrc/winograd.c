/* The data transforms of Winograd's minimal filtering F(2x2, 3x3) (Lavin & Gray 2016, "Fast Algorithms for
 * Convolutional Neural Networks", sec. 4, eq. 8): a 3x3 stride-1 convolution of a zero-padded map as
 *     Y = A^T [ (G g G^T) (.) (B^T d B) ] A
 * per 2x2 output tile, d the 4x4 input patch around it, g a 3x3 filter, (.) elementwise. Summed over input
 * channels, the (.) becomes 16 independent matrix products (tiles x C) @ (C x K), one per point of the 4x4
 * transformed tile: 16 products for every 4 outputs instead of 36 multiply-adds. The products run in BLAS
 * (visionformers/nn/conv.py); the transforms here are additions and subtractions only, so results keep fp32
 * accuracy (the 1/2 of G is exact).
 *
 *   B^T = [1 0 -1 0; 0 1 1 0; 0 -1 1 0; 0 1 0 -1]    A^T = [1 1 1 0; 0 1 -1 -1]
 *
 *   vf_wino_in:   x (N, H, W, C) -> V (16, n, C) = B^T d B of tiles t0 .. t0 + n (zero padding of 1)
 *   vf_wino_out:  M (16, n, K) -> Y (N, H, W, K) = A^T m A (+ bias) for the same tiles (edges clipped)
 *   vf_wino_grad: dY (N, H, W, K) -> Z (16, n, K) = A dy A^T, the transform of the output gradient that the
 *                 weight gradient G^T [sum over tiles of V^T Z] G needs (the transpose of vf_wino_out)
 * V, M and Z hold their 16 planes ``plane`` floats apart; a stride that is not a multiple of 4 KB keeps the 16
 * streams of a tile out of one L1 set (the caller pads it by a cache line).
 * Maps are channels-last (NHWC); tile t is (image, tile row, tile column) in row-major order over
 * ceil(H/2) x ceil(W/2) tiles per image. Channels are the vector lanes (vmath.h: 8 or 16 floats), a ragged last
 * block through the same code on a padded copy. Each tile is computed the same way on any thread:
 * deterministic. Built on first use by visionformers/_native.py.
 */
#include "vmath.h"

#define TILE_COORDS                                              \
    const long tile = t0 + i, tx = tile % tw, rest = tile / tw; \
    const long ty = rest % th, img = rest / th

/* px[p * S + q] = the pixel (y0 + p, x0 + q) of image img of the (N, H, W, C) map m, NULL outside the map (zero
 * padding), for the S x S patch of a tile */
static inline void patch(const float *m, long img, long H, long W, long C, long y0, long x0, int S, const float **px) {
    for (int p = 0; p < S; p++)
        for (int q = 0; q < S; q++) {
            const long yy = y0 + p, xx = x0 + q;
            px[p * S + q] = (yy < 0 || yy >= H || xx < 0 || xx >= W) ? NULL : m + ((img * H + yy) * W + xx) * C;
        }
}

/* V (16, n, C): the input transform of tiles t0 .. t0 + n of x (N, H, W, C) */
void vf_wino_in(const float *restrict x, float *restrict V, long N, long H, long W, long C, long t0, long n,
               long plane, int nthreads) {
    const long th = (H + 1) / 2, tw = (W + 1) / 2;
    (void)N;
    #pragma omp parallel for schedule(static) num_threads(nthreads)
    for (long i = 0; i < n; i++) {
        TILE_COORDS;
        const float *rows[4][4];  /* the 16 input pixels of the patch */
        patch(x, img, H, W, C, 2 * ty - 1, 2 * tx - 1, 4, &rows[0][0]);
        float *out = V + i * C;
        for (long c = 0; c < C; c += VL) {
            vf d[4][4], t[4][4];
            for (int p = 0; p < 4; p++)
                for (int q = 0; q < 4; q++) {
                    d[p][q] = rows[p][q] ? ld(rows[p][q], c, C) : splat(0.0f);
                }
            for (int q = 0; q < 4; q++) {  /* B^T d: along the rows of the patch */
                t[0][q] = d[0][q] - d[2][q];
                t[1][q] = d[1][q] + d[2][q];
                t[2][q] = d[2][q] - d[1][q];
                t[3][q] = d[1][q] - d[3][q];
            }
            for (int p = 0; p < 4; p++) {  /* (B^T d) B: along the columns */
                vf v[4] = {t[p][0] - t[p][2], t[p][1] + t[p][2], t[p][2] - t[p][1], t[p][1] - t[p][3]};
                for (int q = 0; q < 4; q++) {
                    st(out + (p * 4 + q) * plane, c, C, v[q]);
                }
            }
        }
    }
}

/* Y (N, H, W, K) = the output transform of M (16, n, K) for tiles t0 .. t0 + n, plus bias (K,) if given */
void vf_wino_out(const float *restrict M, const float *restrict bias, float *restrict Y, long N, long H, long W,
                long K, long t0, long n, long plane, int nthreads) {
    const long th = (H + 1) / 2, tw = (W + 1) / 2;
    (void)N;
    #pragma omp parallel for schedule(static) num_threads(nthreads)
    for (long i = 0; i < n; i++) {
        TILE_COORDS;
        const float *in = M + i * K;
        for (long k = 0; k < K; k += VL) {
            vf u[2][4];
            for (int q = 0; q < 4; q++) {  /* A^T m: rows 0..3 of the transformed tile to 2 */
                vf r[4];
                for (int p = 0; p < 4; p++) r[p] = ld(in + (p * 4 + q) * plane, k, K);
                u[0][q] = r[0] + r[1] + r[2];
                u[1][q] = r[1] - r[2] - r[3];
            }
            const vf b = bias ? ld(bias, k, K) : splat(0.0f);
            for (int p = 0; p < 2; p++) {
                const long yy = 2 * ty + p;
                if (yy >= H) break;
                const vf o[2] = {u[p][0] + u[p][1] + u[p][2] + b, u[p][1] - u[p][2] - u[p][3] + b};
                for (int q = 0; q < 2; q++) {
                    const long xx = 2 * tx + q;
                    if (xx >= W) break;
                    st(Y + ((img * H + yy) * W + xx) * K, k, K, o[q]);
                }
            }
        }
    }
}

/* Z (16, n, K) = A dy A^T of the 2x2 output-gradient tiles t0 .. t0 + n of dY (N, H, W, K), zero past the edges */
void vf_wino_grad(const float *restrict dY, float *restrict Z, long N, long H, long W, long K, long t0, long n,
                 long plane, int nthreads) {
    const long th = (H + 1) / 2, tw = (W + 1) / 2;
    (void)N;
    #pragma omp parallel for schedule(static) num_threads(nthreads)
    for (long i = 0; i < n; i++) {
        TILE_COORDS;
        const float *px[2][2];  /* the 4 output-gradient pixels of the tile */
        patch(dY, img, H, W, K, 2 * ty, 2 * tx, 2, &px[0][0]);
        float *out = Z + i * K;
        for (long k = 0; k < K; k += VL) {
            vf g[2][2];
            for (int p = 0; p < 2; p++)
                for (int q = 0; q < 2; q++) {
                    g[p][q] = px[p][q] ? ld(px[p][q], k, K) : splat(0.0f);
                }
            vf h[4][2];  /* A g, A = [1 0; 1 1; 1 -1; 0 -1] */
            for (int q = 0; q < 2; q++) {
                h[0][q] = g[0][q];
                h[1][q] = g[0][q] + g[1][q];
                h[2][q] = g[0][q] - g[1][q];
                h[3][q] = -g[1][q];
            }
            for (int p = 0; p < 4; p++) {  /* (A g) A^T */
                const vf z[4] = {h[p][0], h[p][0] + h[p][1], h[p][0] - h[p][1], -h[p][1]};
                for (int q = 0; q < 4; q++) {
                    st(out + (p * 4 + q) * plane, k, K, z[q]);
                }
            }
        }
    }
}
