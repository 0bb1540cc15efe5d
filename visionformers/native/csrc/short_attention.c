/* Softmax attention over short sequences, out = softmax(scale q k^T + bias) v (Vaswani et al. 2017, eq. 1), for
 * CPU fp32 inference: Swin's 7x7 windows (49 tokens, head dim 32) and any other attention of at most 64 keys, and
 * (long_task, below) sequences of up to 256 tokens such as ViT's 197.
 *
 * ATen's CPU flash attention tiles for long sequences; at 49 keys most of its time is per-tile bookkeeping, and
 * its (B, H, N, D) output needs another copy to reach the (B, N, H*D) rows that the output projection reads.
 * Here one (batch, head) pair is one task (the next task's rows are prefetched meanwhile): its keys are transposed
 * once into a small (D, NP) block in L1 cache (its values are read in place),
 * each query row's NP scores are a few vectors accumulated in registers (vectorised over keys), the softmax
 * runs on those vectors, and the weighted sum of the values (vectorised over D) is written straight into
 * out (B, N, H, D). NP is N rounded up to whole vectors; padding keys score -inf.
 *
 * q, k, v are read through strides (the views of a fused qkv product need no copy): element (b, h, n, d) of q
 * is q[b*qs[0] + h*qs[1] + n*qs[2] + d]. bias, when given, is (N, N) rows at bs[0]*b + bs[1]*h (0: broadcast).
 * Scores are sum_d q k in float, times scale, plus bias, as SDPA computes them. A row whose scores are all -inf
 * (fully masked) gives zeros, as ATen's CPU SDPA does. Each task is computed the same way on any thread:
 * deterministic. Built on first use by visionformers/_native.py.
 */
#include "gemm_kernel.h"  /* (includes vmath.h) the qkv projection of vf_qkv_attention */

#define MAX_N 64   /* keys and queries per sequence */
#define MAX_D 128  /* head dim; a multiple of VL */
/* the task buffers on the stack: whole vectors never straddle two cache lines (kt at an odd multiple of 16 bytes
 * made every other key vector a split load, and the short path ~12% slower) */
#define ALIGNED __attribute__((aligned(64)))

/* scores of two query rows at once: each key vector loaded once for both */
static inline __attribute__((always_inline)) void scores2(const float *q0, const float *q1, const float *kt, long D,
                                                          vf *s0, vf *s1, const int NV, float scale) {
    vf a0[MAX_N / VL], a1[MAX_N / VL];
    for (int j = 0; j < NV; j++) a0[j] = a1[j] = splat(0.0f);
    for (long d = 0; d < D; d++) {
        const vf x0 = splat(q0[d]), x1 = splat(q1[d]);
        const float *row = kt + d * NV * VL;
        for (int j = 0; j < NV; j++) {
            const vf kv = load(row + j * VL);
            a0[j] += x0 * kv;
            a1[j] += x1 * kv;
        }
    }
    for (int j = 0; j < NV; j++) { s0[j] = a0[j] * scale; s1[j] = a1[j] * scale; }
}

/* the lanes of the last of NV key vectors that are past the N keys (padding, scored -inf) */
static inline vi padding_lanes(long N, int NV) {
    vf iota;
    for (int l = 0; l < VL; l++) iota[l] = (float)((NV - 1) * VL + l);
    return iota >= (float)N;
}

/* p = exp(s + bias - max) of one query row, padding keys and masked keys 0; returns 1 / sum, or 0 when every key
 * is masked (the row's output is then 0, as ATen's). Branch-free, so that two rows' calls interleave. */
static inline __attribute__((always_inline)) float softmax_row(vf *s, const float *bi, long N, const int NV, vi pad,
                                                               float *p) {
    const vf zero = splat(0.0f);
    if (bi) {
        for (int j = 0; j < NV - 1; j++) s[j] += load(bi + j * VL);
        s[NV - 1] += ld(bi, (NV - 1) * VL, N);
    }
    s[NV - 1] = vselect(pad, splat(-INFINITY), s[NV - 1]);
    vf mx = s[0];
    for (int j = 1; j < NV; j++) mx = vmax(mx, s[j]);
    mx = hmax_all(mx);
    const int masked = mx[0] == -INFINITY;  /* every key masked: the row's output is 0 */
    mx = vselect(mx == -INFINITY, zero, mx);
    vf sum = zero;
    for (int j = 0; j < NV; j++) {
        const vf e = v_exp_le0(s[j] - mx);
        sum += e;
        store(p + j * VL, e);
    }
    return masked ? 0.0f : 1.0f / hsum(sum);
}

/* o_r = inv_r sum_j p_r[j] v_j for R = 1 or 2 query rows, DV vectors of the head dim held in registers */
static inline __attribute__((always_inline)) void weighted_sum(const float *p0, const float *p1, const float *v,
                                                               long vn, long N, float *o0, float *o1, const int DV,
                                                               const int R, float inv0, float inv1) {
    vf a0[MAX_D / VL], a1[MAX_D / VL];
    for (int d = 0; d < DV; d++) a0[d] = a1[d] = splat(0.0f);
    for (long j = 0; j < N; j++) {
        const vf x0 = splat(p0[j]), x1 = splat(R == 2 ? p1[j] : 0.0f);
        for (int d = 0; d < DV; d++) {
            const vf vv = load(v + j * vn + d * VL);
            a0[d] += x0 * vv;
            if (R == 2) a1[d] += x1 * vv;
        }
    }
    for (int d = 0; d < DV; d++) {
        store(o0 + d * VL, a0[d] * inv0);
        if (R == 2) store(o1 + d * VL, a1[d] * inv1);
    }
}


/* the query rows of one task, two at a time (the last one alone when N is odd), for NV vectors of keys: a
 * constant per instance, so that every loop over the key vectors is unrolled and its vectors stay in registers */
static inline __attribute__((always_inline)) void query_rows(const float *q, const float *v, const float *bias,
                                                             float *out, long N, long D, long qn, long vn, long on,
                                                             const int NV, float scale, const float *kt) {
    const vi pad = padding_lanes(N, NV);
    const int DV = (int)(D / VL);
    for (long i = 0; i < N; i += 2) {
        const int R = i + 1 < N ? 2 : 1;
        const long i1 = R == 2 ? i + 1 : i;
        vf s0[MAX_N / VL], s1[MAX_N / VL];
        scores2(q + i * qn, q + i1 * qn, kt, D, s0, s1, NV, scale);
        float p0[MAX_N] ALIGNED, p1[MAX_N] ALIGNED;
        const float inv0 = softmax_row(s0, bias ? bias + i * N : NULL, N, NV, pad, p0);
        const float inv1 = R == 2 ? softmax_row(s1, bias ? bias + i1 * N : NULL, N, NV, pad, p1) : 0.0f;
        float *o0 = out + i * on, *o1 = out + i1 * on;
        if (R == 2) {
            switch (DV) {
            case 1: weighted_sum(p0, p1, v, vn, N, o0, o1, 1, 2, inv0, inv1); break;
            case 2: weighted_sum(p0, p1, v, vn, N, o0, o1, 2, 2, inv0, inv1); break;
            case 4: weighted_sum(p0, p1, v, vn, N, o0, o1, 4, 2, inv0, inv1); break;
            default:
                for (long d = 0; d < D; d += VL) weighted_sum(p0, p1, v + d, vn, N, o0 + d, o1 + d, 1, 2, inv0, inv1);
            }
        } else {
            for (long d = 0; d < D; d += VL) weighted_sum(p0, p0, v + d, vn, N, o0 + d, o0 + d, 1, 1, inv0, inv0);
        }
    }
}

static void task(const float *q, const float *k, const float *v, const float *bias, float *out, long N, long D,
                 long qn, long kn, long vn, long on, int NV, float scale, float *kt) {
    const long NP = (long)NV * VL;
    for (long j0 = 0; j0 < NP; j0 += VL)  /* kt (D, NP) = k^T, zero past N, in VL x VL blocks */
        for (long d0 = 0; d0 < D; d0 += VL) transpose_block(k + j0 * kn + d0, kn, kt + d0 * NP + j0, NP, N - j0 < VL ? N - j0 : VL);
#define ROWS(nv) query_rows(q, v, bias, out, N, D, qn, vn, on, nv, scale, kt)
    switch (NV) {
    case 1: ROWS(1); break;
    case 2: ROWS(2); break;
    case 3: ROWS(3); break;
    case 4: ROWS(4); break;
    case 5: ROWS(5); break;
    case 6: ROWS(6); break;
    case 7: ROWS(7); break;
    default: ROWS(8); break;
    }
#undef ROWS
}

static inline void prefetch_rows(const float *x, long N, long stride, long D) {
    for (long n = 0; n < N; n++)
        for (long d = 0; d < D; d += 64 / sizeof(float)) __builtin_prefetch(x + n * stride + d);
}

#define MAX_LONG_N 256  /* keys and queries per sequence of the long path */

/* One (batch, head) of a longer sequence (MAX_N < N <= MAX_LONG_N) as two products with the micro-kernel of
 * gemm_kernel.h: S = q k^T into a buffer of rows of NP = N rounded up to NR, each row's softmax in place
 * (normalised: P = exp(s - max) / sum), then out = P v. k and v^T are packed into panels first; buf holds
 * N NP + NP D + DP N floats (DP: D rounded up to NR). */
static void long_task(const float *q, const float *k, const float *v, const float *bias, float *out, long N, long D,
                      long qn, long kn, long vn, long on, float scale, float *buf) {
    const long NP = (N + NR - 1) / NR * NR, DP = (D + NR - 1) / NR * NR;
    float *S = buf, *kp = S + N * NP, *vp = kp + NP * D;
    for (long p = 0; p < NP / NR; p++)  /* kp: k packed as W is for a product (S = q k^T) */
        pack_panel(k + p * NR * kn, kn, N - p * NR < NR ? N - p * NR : NR, D, kp + p * D * NR);
    for (long p = 0; p < DP / NR; p++)  /* vp: panel p holds v[j][p NR + c] at vp[(p N + j) NR + c] */
        for (long j = 0; j < N; j++) {
            const long c0 = p * NR;
            store(vp + (p * N + j) * NR, ld(v + j * vn, c0, D));
            store(vp + (p * N + j) * NR + VL, ld(v + j * vn, c0 + VL < D ? c0 + VL : D, D));
        }
    row_block(q, qn, kp, S, NP, 0, N, NP, D, NULL, 0, NULL);
    const int NV = (int)((N + VL - 1) / VL);  /* the vectors that hold keys (the second product reads N of them) */
    const vi pad = padding_lanes(N, NV);
    for (long i = 0; i < N; i++) {  /* each row's softmax, as the short path's, normalised in place */
        float *p = S + i * NP;
        vf s[MAX_LONG_N / VL];
        for (int j = 0; j < NV; j++) s[j] = load(p + j * VL) * scale;
        const float inv = softmax_row(s, bias ? bias + i * N : NULL, N, NV, pad, p);
        for (int j = 0; j < NV; j++) store(p + j * VL, load(p + j * VL) * inv);
    }
    row_block(S, NP, vp, out, on, 0, N, D, N, NULL, 0, NULL);
}

/* out (B, N, H, D); returns 0, or -1 where N or D is out of range (the caller checks first) */
int vf_short_attention(const float *q, const float *k, const float *v, const float *bias, float *out, long B, long H,
                       long N, long D, const long *qs, const long *ks, const long *vs, const long *bs, float scale,
                       int nthreads) {
    if (N < 1 || N > MAX_LONG_N || D < VL || D > MAX_D || D % VL) return -1;
    if (N > MAX_N) {
        int failed = 0;
        const long NP = (N + NR - 1) / NR * NR;
        #pragma omp parallel num_threads(nthreads) reduction(|: failed)
        {
            float *buf = scratch((size_t)(NP * (NP + 2 * (D + NR))));
            failed = buf == NULL;
            #pragma omp for schedule(static)
            for (long t = 0; t < B * H; t++) {
                if (!buf) continue;
                const long b = t / H, h = t % H;
                long_task(q + b * qs[0] + h * qs[1], k + b * ks[0] + h * ks[1], v + b * vs[0] + h * vs[1],
                          bias ? bias + b * bs[0] + h * bs[1] : NULL, out + (b * N * H + h) * D, N, D, qs[2], ks[2],
                          vs[2], H * D, scale, buf);
            }
        }
        return failed ? -1 : 0;
    }
    const int NV = (int)((N + VL - 1) / VL);
    #pragma omp parallel num_threads(nthreads)
    {
        float kt[MAX_D * MAX_N] ALIGNED;  /* k^T of the current task, in L1 */
        #pragma omp for schedule(static)
        for (long t = 0; t < B * H; t++) {
            const long b = t / H, h = t % H;
            if (t + 1 < B * H) {  /* the next task's rows, while this one computes: strided rows defeat the
                                   * hardware prefetcher, and their first touch otherwise stalls the task */
                const long b1 = (t + 1) / H, h1 = (t + 1) % H;
                prefetch_rows(q + b1 * qs[0] + h1 * qs[1], N, qs[2], D);
                prefetch_rows(k + b1 * ks[0] + h1 * ks[1], N, ks[2], D);
                prefetch_rows(v + b1 * vs[0] + h1 * vs[1], N, vs[2], D);
            }
            task(q + b * qs[0] + h * qs[1], k + b * ks[0] + h * ks[1], v + b * vs[0] + h * vs[1],
                 bias ? bias + b * bs[0] + h * bs[1] : NULL, out + (b * N * H + h) * D, N, D, qs[2], ks[2], vs[2],
                 H * D, NV, scale, kt);
        }
    }
    return 0;
}

/* The qkv projection of a group of whole windows w0 .. w1 (N rows each; A: their rows of C, stride lda) into qkv
 * (rows of E = 3 H D: q, k, v, each H heads of D; gemm_kernel.h's product, Wp packed by vf_gemm_pack), then every
 * (window, head) task of the group on it: window w's heads go to o + (w - w0) N H D (rows of H D). bias (N, N) rows
 * at bs[0] wb + bs[1] h, with wb = w % bs[2] where bs[2] > 0 (the windows of every image sharing one set), else w.
 * vf_qkv_attention and vf_window_block run it per group. */
static void group_attention(const float *A, long lda, long C, const float *Wp, const float *qkv_bias, float *qkv,
                            long w0, long w1, long N, long H, long D, const float *bias, const long *bs, float scale,
                            int NV, float *o, float *kt) {
    const long E = 3 * H * D, HD = H * D;
    row_block(A, lda, Wp, qkv, E, 0, (w1 - w0) * N, E, C, qkv_bias, 0, NULL);
    for (long w = w0; w < w1; w++)
        for (long h = 0; h < H; h++) {
            const float *q = qkv + (w - w0) * N * E + h * D;
            const long wb = bs && bs[2] ? w % bs[2] : w;
            task(q, q + HD, q + 2 * HD, bias ? bias + wb * bs[0] + h * bs[1] : NULL, o + (w - w0) * N * HD + h * D, N,
                 D, E, E, E, HD, NV, scale, kt);
        }
}

/* Bytes of a thread's qkv buffer in vf_qkv_attention: windows are projected a few at a time so that their q, k, v
 * are still in the core's L2 cache when their attention reads them */
#define QKV_BUDGET (256 * 1024)

/* A windowed self-attention with its qkv projection, window by window: for each group of a few windows of x (B
 * windows of N rows of C), qkv = x_w Wqkv^T + b_qkv (N rows of 3 H D: q, k, v, each H heads of D) goes into a
 * per-thread buffer (gemm_kernel.h's product, W packed by vf_gemm_pack), and the (window, head) tasks above run on
 * it at once. Separately, the qkv of a whole batch makes a round trip through memory before the attention reads it
 * back, (window, head) by (window, head) in strided rows; here it never leaves the cache. out (B, N, H, D); bias as
 * vf_short_attention's (row w of bs[0] is window w). Returns 0, -1 where N or D is out of range or a buffer cannot
 * be had. */
int vf_qkv_attention(const float *x, const float *Wp, const float *qkv_bias, const float *bias, float *out, long B,
                     long H, long N, long D, long C, const long *bs, float scale, int nthreads) {
    if (N < 1 || N > MAX_N || D < VL || D > MAX_D || D % VL) return -1;
    const int NV = (int)((N + VL - 1) / VL);
    const long E = 3 * H * D;  /* qkv row: q heads, k heads, v heads */
    long G = QKV_BUDGET / (N * E * (long)sizeof(float));  /* windows per group: their qkv in L2 ... */
    const long most = 2 * MC_TARGET / N;                    /* ... and about two GEMM row blocks of them */
    G = G > most ? most : G;
    G = G < 1 ? 1 : G;
    const long groups = (B + G - 1) / G;
    int failed = 0;
    #pragma omp parallel num_threads(nthreads) reduction(|: failed)
    {
        float *qkv = scratch((size_t)(G * N * E));
        float kt[MAX_D * MAX_N] ALIGNED;
        failed = qkv == NULL;
        #pragma omp for schedule(dynamic, 1)
        for (long g = 0; g < groups; g++) {
            if (!qkv) continue;
            const long w0 = g * G, w1 = w0 + G < B ? w0 + G : B;
            group_attention(x + w0 * N * C, C, C, Wp, qkv_bias, qkv, w0, w1, N, H, D, bias, bs, scale, NV,
                            out + w0 * N * H * D, kt);
        }
    }
    return failed ? -1 : 0;
}

#ifndef BLOCK_ROWS
#define BLOCK_ROWS 144  /* rows per group of windows in vf_window_block (about two GEMM row blocks) */
#endif

/* floats of one buffer of n, rounded up to whole cache lines */
static inline long lines(long n) { return (n + 15) / 16 * 16; }

/* A whole pre-norm transformer block over short sequences (Swin's windows), a group of windows at a time:
 *     s = x + proj(attention(qkv(LN1(x))))          out = s + fc2(act(fc1(LN2(s))))
 * (the block of Dosovitskiy et al. 2021, eqs. 2-3; Liu et al. 2021, eq. 3 with windowed attention). x holds B
 * windows of N rows of C, or, with gather, row p of the window order is row (p / L) L + gather[p % L] of x (a
 * stream of images of L tokens, reordered on the fly: Swin's cyclic shift). Every intermediate of a group (its
 * normed rows, q k v, heads, s, the MLP's hidden rows) lives in a per-thread buffer that stays in cache, and the
 * group's output rows are written once, in window order, to out. Weights packed by vf_gemm_pack; Wqkv (3 H D, C),
 * Wproj (C, H D), W1 (F, C), W2 (C, F); the attention's bias and scale as vf_qkv_attention's, except that with
 * bs[2] > 0 window w reads bias row w % bs[2] (the windows of every image share one set: Swin's shift mask, which
 * then need not be tiled over the batch). Returns 0, or -1 where N or D is out of range or a buffer cannot be had. */
int vf_window_block(const float *x, const long *gather, long L, float *out, long B, long N, long C,
                    const float *g1, const float *beta1, float eps1, const float *Wqkv, const float *bqkv, long H,
                    long D, const float *bias, const long *bs, float scale, const float *Wproj, const float *bproj,
                    const float *g2, const float *beta2, float eps2, const float *W1, const float *b1, int act, long F,
                    const float *W2, const float *b2, int nthreads) {
    if (N < 1 || N > MAX_N || D < VL || D > MAX_D || D % VL) return -1;
    const int NV = (int)((N + VL - 1) / VL);
    const long E = 3 * H * D, HD = H * D;
    /* about BLOCK_ROWS rows per group, as many groups for every thread, windows spread evenly over the groups (the
     * threads take groups as they come, so that a core slowed by another tenant takes fewer) */
    long groups = (B * N + BLOCK_ROWS - 1) / BLOCK_ROWS;
    groups = (groups + nthreads - 1) / nthreads * nthreads;
    groups = groups > B ? B : groups;
    const long G = (B + groups - 1) / groups, R = G * N;  /* the most windows and rows of a group */
    const long wa = C > HD ? C : HD, wq = E > F ? E : F;
    int failed = 0;
    #pragma omp parallel num_threads(nthreads) reduction(|: failed)
    {
        float *X = scratch((size_t)(lines(R * C) * 2 + lines(R * wa) + lines(R * wq)));
        float *S = X + lines(R * C), *A = S + lines(R * C), *Q = A + lines(R * wa);
        float kt[MAX_D * MAX_N] ALIGNED;
        failed = X == NULL;
        #pragma omp for schedule(dynamic, 1)
        for (long g = 0; g < groups; g++) {
            if (failed) continue;
            /* the B % groups groups of one window more come first: the groups taken last are the short ones */
            const long per = B / groups, extra = B % groups;
            const long w0 = g * per + (g < extra ? g : extra), w1 = w0 + per + (g < extra), r = (w1 - w0) * N;
            const float *xr = x + w0 * N * C;
            if (gather) {
                for (long i = 0; i < r; i++) {
                    const long p = w0 * N + i;
                    memcpy(X + i * C, x + ((p / L) * L + gather[p % L]) * C, C * sizeof(float));
                }
                xr = X;
            }
            for (long i = 0; i < r; i++) layer_norm_row(xr + i * C, A + i * C, g1, beta1, C, eps1);
            group_attention(A, C, C, Wqkv, bqkv, Q, w0, w1, N, H, D, bias, bs, scale, NV, A, kt);  /* heads into A */
            row_block(A, HD, Wproj, S, C, 0, r, C, HD, bproj, 0, xr);
            for (long i = 0; i < r; i++) layer_norm_row(S + i * C, A + i * C, g2, beta2, C, eps2);
            mlp_rows(A, C, W1, b1, act, W2, b2, Q, F, out + w0 * N * C, C, r, S);
        }
    }
    return failed ? -1 : 0;
}

int vf_vector_width(void) { return VL; }
