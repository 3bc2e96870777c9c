/* Fused CPU kernels for per-element learned optimizers (small_fc_lopt, VeLO).
 *
 * A factored rank-2 tensor of shape (a, b) is stepped in three passes over memory:
 *   pass 0  row and column sums of g^2 + 1e-30 (Adafactor statistics);
 *   pass 1  new momentum / second-moment accumulators, the sum of squares of every
 *           per-element input channel (for the per-channel normalisation) and, for
 *           VeLO, sums of the *old* accumulators and of p^2 (its per-tensor features);
 *   pass 2  rebuild the channels element by element, run the per-element MLP
 *           (n_ch -> H -> H -> 2, relu) and write p_new = p - dir * exp(e * mag) * coef.
 * The normalisation scales and the row/column-constant channels are folded into the
 * first-layer weights and into per-row / per-column hidden biases by the caller.
 * Accumulators are decay-first: m is (K, a*b), rms is (1, a*b).
 *
 * The per-element work is written as one `omp simd` loop per row with compile-time
 * channel and hidden counts (K = 3 decays, H = 4 hidden units: the released
 * configurations), so the compiler keeps every channel and hidden unit of 8 elements
 * in vector registers. Other shapes use the PyTorch path.
 * Built and loaded by metaopt/lopt/cpu_kernels.py; every entry point is checked
 * against the PyTorch implementation in tests/lopt.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#if defined(__AVX2__)
#include <immintrin.h>
#endif

#define K 3
#define H 4
#define NCH_SMALL_FC (4 + 4 * K) /* g, p, m(K), rms, m*r(K), r, pc*g(K), pc*m(K) */
#define NCH_VELO (3 + 5 * K)     /* g, clip(g), p, m(K), rms, m*r(K), r, pc*g(K), g*r, pc*m(K) */
#define NCH_MAX NCH_VELO
#define N_STATS (2 * K + 3)

enum { MODE_SMALL_FC = 0, MODE_VELO = 1 };

int lopt_abi_version(void) { return 3; }
int lopt_decays(void) { return K; }
int lopt_hidden(void) { return H; }
int lopt_n_channels(int mode) { return mode == MODE_SMALL_FC ? NCH_SMALL_FC : NCH_VELO; }

/* pass 0: row_sum[i] = sum_j (g_ij^2 + 1e-30), col_sum[j] = sum_i (...).
 * Returns 0, or -1 when a thread's column buffer cannot be allocated. */
int lopt_sq_rowcol(int64_t a, int64_t b, const float *restrict g, double *restrict row_sum,
                   double *restrict col_sum, int nthreads) {
    int failed = 0;
    for (int64_t j = 0; j < b; j++) col_sum[j] = 0.0;
#pragma omp parallel num_threads(nthreads)
    {
        double *col_local = (double *)calloc((size_t)(b > 0 ? b : 1), sizeof(double));
        if (!col_local) {
#pragma omp atomic write
            failed = 1;
        }
#pragma omp for schedule(static)
        for (int64_t i = 0; i < a; i++) {
            if (!col_local) continue;
            const float *gi = g + i * b;
            float rs = 0.0f;
#pragma omp simd reduction(+ : rs)
            for (int64_t j = 0; j < b; j++) {
                float s = gi[j] * gi[j] + 1e-30f;
                rs += s;
                col_local[j] += (double)s;
            }
            row_sum[i] = (double)rs;
        }
#pragma omp critical
        if (col_local)
            for (int64_t j = 0; j < b; j++) col_sum[j] += col_local[j];
        free(col_local);
    }
    return failed ? -1 : 0;
}

/* ---------------------------------------------------------------- 8-lane vectors
 * GCC/Clang vector extensions: portable SIMD (AVX on x86-64, NEON pairs on arm64)
 * without relying on the auto-vectoriser, which does not vectorise the whole per-element
 * pipeline (channels, 3-layer MLP, exp) as one loop. */
#define L 8
typedef float vf __attribute__((vector_size(4 * L)));
typedef int32_t vi __attribute__((vector_size(4 * L)));

static inline vf vload(const float *p) { vf v; memcpy(&v, p, sizeof v); return v; }
static inline void vstore(float *p, vf v) { memcpy(p, &v, sizeof v); }
/* first `len` lanes from p, the rest 0 */
static inline vf vload_part(const float *p, int len) {
    float tmp[L] = {0};
    memcpy(tmp, p, (size_t)len * sizeof(float));
    return vload(tmp);
}
static inline void vstore_part(float *p, vf v, int len) {
    float tmp[L];
    vstore(tmp, v);
    memcpy(p, tmp, (size_t)len * sizeof(float));
}
static inline vf vsplat(float s) { return (vf){0} + s; }
static inline vf vselect(vi mask, vf a, vf b) { return (vf)(((vi)a & mask) | ((vi)b & ~mask)); }
#if defined(__AVX2__)
/* One instruction each where the target has them (the generic forms below are correct
 * everywhere but cost 3-8 instructions). */
static inline vf vmax(vf a, vf b) { return (vf)_mm256_max_ps((__m256)a, (__m256)b); }
static inline vf vmin(vf a, vf b) { return (vf)_mm256_min_ps((__m256)a, (__m256)b); }
static inline vf vround(vf x) {
    return (vf)_mm256_round_ps((__m256)x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
}
static inline vi vtoint(vf x) { return (vi)_mm256_cvttps_epi32((__m256)x); }
#else
static inline vf vmax(vf a, vf b) { return vselect(a > b, a, b); }
static inline vf vmin(vf a, vf b) { return vselect(a < b, a, b); }
static inline vf vround(vf x) {
    vf r;
    for (int l = 0; l < L; l++) r[l] = nearbyintf(x[l]);
    return r;
}
static inline vi vtoint(vf x) {
    vi r;
    for (int l = 0; l < L; l++) r[l] = (int32_t)x[l];
    return r;
}
#endif
static inline vf vrsqrt(vf x) {
    vf r;
    for (int l = 0; l < L; l++) r[l] = 1.0f / sqrtf(x[l]);
    return r;
}
/* exp(x): x = n ln2 + r, |r| <= ln2/2, degree-7 Taylor polynomial for e^r (relative
 * error < 2e-7 in float32), 2^n through the exponent bits. */
static inline vf vexp(vf x) {
    x = vmin(vmax(x, vsplat(-87.0f)), vsplat(88.0f));
    const vf rounded = vround(x * 1.44269504088896341f);
    vf r = x - rounded * 0.693145751953125f - rounded * 1.428606765330187045e-06f;
    vf poly = 1.0f + r * (1.0f + r * (0.5f + r * (1.0f / 6 + r * (1.0f / 24 + r * (1.0f / 120
              + r * (1.0f / 720 + r * (1.0f / 5040)))))));
    vi bits = (vtoint(rounded) + 127) << 23;
    return poly * (vf)bits;
}

/* The per-element input channels of 8 elements into x[], in each mode's order
 * (small_fc pads its 16 channels to NCH_MAX with zeros). */
static inline __attribute__((always_inline)) void vchannels(
    const int mode, vf gv, vf pv, const vf m[K], vf rv, const float fa[K], const vf fb[K],
    vf x[NCH_MAX]) {
    const vf r = vrsqrt(rv + 1e-6f);
    if (mode == MODE_SMALL_FC) {
        x[0] = gv;
        x[1] = pv;
        x[2 + K] = rv;
        x[3 + 2 * K] = r;
        for (int c = NCH_SMALL_FC; c < NCH_MAX; c++) x[c] = vsplat(0.0f);
        for (int q = 0; q < K; q++) {
            const vf pc = fa[q] * fb[q];
            x[2 + q] = m[q];
            x[3 + K + q] = m[q] * r;
            x[4 + 2 * K + q] = pc * gv;
            x[4 + 3 * K + q] = pc * m[q];
        }
    } else {
        x[0] = gv;
        x[1] = vmin(vmax(gv, vsplat(-0.1f)), vsplat(0.1f));
        x[2] = pv;
        x[3 + K] = rv;
        x[4 + 2 * K] = r;
        x[5 + 3 * K] = gv * r;
        for (int q = 0; q < K; q++) {
            const vf pc = fa[q] * fb[q];
            x[3 + q] = m[q];
            x[4 + K + q] = m[q] * r;
            x[5 + 2 * K + q] = pc * gv;
            x[6 + 3 * K + q] = pc * m[q];
        }
    }
}

/* Load `len` (<= L) lanes at p (full-width when len == L). */
static inline vf vld(const float *p, int len) { return len == L ? vload(p) : vload_part(p, len); }
static inline void vst(float *p, vf v, int len) {
    if (len == L) vstore(p, v); else vstore_part(p, v, len);
}

/* One row of pass 1: new accumulators, channel sums of squares (ss) and old-state sums
 * (st). `mode` is a literal at every call, so each mode is compiled on its own. */
static inline __attribute__((always_inline)) void pass1_row(
    const int mode, int64_t i, int64_t a, int64_t b, const float *restrict g,
    const float *restrict p, const float *m_old, const float *rms_old,
    float *m_new, float *rms_new, const float d[K], const float c1[K],
    float rms_decay, float rc, const float *restrict fac_a, const float *restrict fac_b,
    double *restrict ss_out, double *restrict st_out) {
    const int64_t n = a * b, off = i * b;
    float fa[K];
    for (int q = 0; q < K; q++) fa[q] = fac_a[q * a + i];
    vf ss[NCH_MAX], st[N_STATS];
    for (int c = 0; c < NCH_MAX; c++) ss[c] = vsplat(0.0f);
    for (int s = 0; s < N_STATS; s++) st[s] = vsplat(0.0f);
    for (int64_t j = 0; j < b; j += L) {
        const int len = (int)(b - j < L ? b - j : L);
        const int64_t e = off + j;
        const vf gv = vld(g + e, len), pv = vld(p + e, len), ro = vld(rms_old + e, len);
        vf m[K], fb[K], x[NCH_MAX];
        for (int q = 0; q < K; q++) {
            const vf mo = vld(m_old + q * n + e, len);
            if (mode == MODE_VELO) { st[2 * q] += mo; st[2 * q + 1] += mo * mo; }
            m[q] = mo * d[q] + gv * c1[q];
            vst(m_new + q * n + e, m[q], len);
            fb[q] = vld(fac_b + q * b + j, len);
        }
        if (mode == MODE_VELO) { st[2 * K] += ro; st[2 * K + 1] += ro * ro; st[2 * K + 2] += pv * pv; }
        const vf rv = ro * rms_decay + gv * gv * rc;
        vst(rms_new + e, rv, len);
        vchannels(mode, gv, pv, m, rv, fa, fb, x);
        if (len < L) { /* lanes past the row end must not count */
            vi keep;
            for (int l = 0; l < L; l++) keep[l] = l < len ? -1 : 0;
            for (int c = 0; c < NCH_MAX; c++) x[c] = vselect(keep, x[c], vsplat(0.0f));
        }
        for (int c = 0; c < NCH_MAX; c++) ss[c] += x[c] * x[c];
    }
    for (int c = 0; c < NCH_MAX; c++)
        for (int l = 0; l < L; l++) ss_out[c] += ss[c][l];
    for (int s = 0; s < N_STATS; s++)
        for (int l = 0; l < L; l++) st_out[s] += st[s][l];
}

/* pass 1. fac_a: (K, a) row factors, fac_b: (K, b) column factors (their product is the
 * Adafactor preconditioner of element (i, j)). sumsq: (n_ch,) output. stats (VeLO; may be
 * NULL): sum m_q, sum m_q^2 (q < K), sum rms, sum rms^2, sum p^2 of the OLD state. */
void lopt_rank2_pass1(int mode, int64_t a, int64_t b, const float *g, const float *p,
                      const float *m_old, const float *rms_old, float *m_new, float *rms_new,
                      const float *mom_decay, float rms_decay, const float *fac_a,
                      const float *fac_b, double *sumsq, double *stats, int nthreads) {
    const int n_ch = lopt_n_channels(mode);
    float d[K], c1[K];
    for (int q = 0; q < K; q++) { d[q] = mom_decay[q]; c1[q] = 1.0f - mom_decay[q]; }
    const float rc = 1.0f - rms_decay;
    for (int c = 0; c < n_ch; c++) sumsq[c] = 0.0;
    if (stats)
        for (int s = 0; s < N_STATS; s++) stats[s] = 0.0;
#pragma omp parallel num_threads(nthreads)
    {
        double ss_local[NCH_MAX] = {0};
        double st_local[N_STATS] = {0};
#pragma omp for schedule(static)
        for (int64_t i = 0; i < a; i++) {
            if (mode == MODE_SMALL_FC)
                pass1_row(MODE_SMALL_FC, i, a, b, g, p, m_old, rms_old, m_new, rms_new, d, c1,
                          rms_decay, rc, fac_a, fac_b, ss_local, st_local);
            else
                pass1_row(MODE_VELO, i, a, b, g, p, m_old, rms_old, m_new, rms_new, d, c1,
                          rms_decay, rc, fac_a, fac_b, ss_local, st_local);
        }
#pragma omp critical
        {
            for (int c = 0; c < n_ch; c++) sumsq[c] += ss_local[c];
            if (stats)
                for (int s = 0; s < N_STATS; s++) stats[s] += st_local[s];
        }
    }
}

/* The first-layer weights (normalisation folded in; zero rows pad to NCH_MAX) and the
 * rest of the MLP. */
typedef struct {
    vf W[NCH_MAX][H], W1[H][H], B1[H], W2[H][2], B2[2]; /* pre-broadcast: memory operands */
} mlp_t;

/* The MLP and the step for U vectors of elements at once (U independent FMA chains per
 * hidden unit keep both FMA pipes busy). */
#define U 1 /* measured: 2 spills registers on AVX2 and is slower */
static inline __attribute__((always_inline)) void mlp_step(
    const int mode, int nv, const vf x[U][NCH_MAX], const vf ub[U][H], const float ua[H],
    const vf pv[U], const mlp_t *restrict net, float exp_mult, float coef, float p_decay,
    vf out[U]) {
    const int n_ch = mode == MODE_SMALL_FC ? NCH_SMALL_FC : NCH_VELO;
    vf h[U][H], h2[U][H], h_odd[U][H];
    for (int u = 0; u < U; u++)
        for (int o = 0; o < H; o++) { h[u][o] = ua[o] + ub[u][o]; h_odd[u][o] = vsplat(0.0f); }
    /* even and odd channels in separate sums: twice the independent FMA chains */
    for (int c = 0; c + 1 < n_ch; c += 2)
        for (int o = 0; o < H; o++)
            for (int u = 0; u < U; u++)
                if (u < nv) {
                    h[u][o] += net->W[c][o] * x[u][c];
                    h_odd[u][o] += net->W[c + 1][o] * x[u][c + 1];
                }
    if (n_ch % 2)
        for (int o = 0; o < H; o++)
            for (int u = 0; u < U; u++) h[u][o] += net->W[n_ch - 1][o] * x[u][n_ch - 1];
    for (int u = 0; u < U; u++)
        for (int o = 0; o < H; o++) h[u][o] += h_odd[u][o];
    for (int u = 0; u < U; u++)
        for (int o = 0; o < H; o++) h[u][o] = vmax(h[u][o], vsplat(0.0f));
    for (int o = 0; o < H; o++)
        for (int u = 0; u < U; u++) {
            vf s = net->B1[o];
            for (int c = 0; c < H; c++) s += net->W1[c][o] * h[u][c];
            h2[u][o] = vmax(s, vsplat(0.0f));
        }
    for (int u = 0; u < U; u++) {
        vf dir = net->B2[0], mag = net->B2[1];
        for (int c = 0; c < H; c++) { dir += net->W2[c][0] * h2[u][c]; mag += net->W2[c][1] * h2[u][c]; }
        out[u] = pv[u] * p_decay - dir * vexp(mag * exp_mult) * coef;
    }
}

/* One row of pass 2 (see pass 1 for `mode`). */
static inline __attribute__((always_inline)) void pass2_row(
    const int mode, int64_t i, int64_t a, int64_t b, const float *restrict g,
    const float *p, const float *restrict m_acc, const float *restrict rms,
    const float *restrict fac_a, const float *restrict fac_b, const mlp_t *restrict net,
    const float *restrict u_a, const float *restrict u_b, float exp_mult, float coef,
    float p_decay, float *p_new) {
    const int64_t n = a * b, off = i * b;
    float fa[K], ua[H];
    for (int q = 0; q < K; q++) fa[q] = fac_a[q * a + i];
    for (int o = 0; o < H; o++) ua[o] = u_a[o * a + i];
    for (int64_t j = 0; j < b; j += U * L) {
        /* U vectors; the last group of a row may hold fewer (nv) and a partial vector */
        vf x[U][NCH_MAX], ub[U][H], pv[U], out[U];
        int lens[U], nv = 0;
        for (int u = 0; u < U; u++) {
            const int64_t jj = j + u * L;
            lens[u] = jj >= b ? 0 : (int)(b - jj < L ? b - jj : L);
            if (lens[u] == 0) continue;
            nv = u + 1;
            const int64_t e = off + jj;
            vf m[K], fb[K];
            for (int q = 0; q < K; q++) {
                m[q] = vld(m_acc + q * n + e, lens[u]);
                fb[q] = vld(fac_b + q * b + jj, lens[u]);
            }
            pv[u] = vld(p + e, lens[u]);
            vchannels(mode, vld(g + e, lens[u]), pv[u], m, vld(rms + e, lens[u]), fa, fb, x[u]);
            for (int o = 0; o < H; o++) ub[u][o] = vld(u_b + o * b + jj, lens[u]);
        }
        mlp_step(mode, nv, (const vf(*)[NCH_MAX])x, (const vf(*)[H])ub, ua, pv, net, exp_mult,
                 coef, p_decay, out);
        for (int u = 0; u < nv; u++) vst(p_new + off + j + u * L, out[u], lens[u]);
    }
}

/* pass 2. w_in: (n_ch, H) first-layer weights with the normalisation folded in;
 * u_a: (H, a), u_b: (H, b) hidden biases of the row / column channels (bias included
 * once); w1: (H, H) and w2: (H, 2) in (in, out) layout with biases b1 (H), b2 (2).
 * p_new = p * p_decay - dir * exp(exp_mult * mag) * coef; p_new may be p (in place),
 * and in pass 1 m_new / rms_new may be m_old / rms_old. */
void lopt_rank2_pass2(int mode, int64_t a, int64_t b, const float *g, const float *p,
                      const float *m, const float *rms, const float *fac_a,
                      const float *fac_b, const float *w_in, const float *u_a,
                      const float *u_b, const float *w1, const float *b1, const float *w2,
                      const float *b2, float exp_mult, float coef, float p_decay,
                      float *p_new, int nthreads) {
    const int n_ch = lopt_n_channels(mode);
    mlp_t net;
    for (int c = 0; c < NCH_MAX; c++)
        for (int o = 0; o < H; o++) net.W[c][o] = vsplat(c < n_ch ? w_in[c * H + o] : 0.0f);
    for (int c = 0; c < H; c++) {
        net.B1[c] = vsplat(b1[c]);
        net.W2[c][0] = vsplat(w2[2 * c]);
        net.W2[c][1] = vsplat(w2[2 * c + 1]);
        for (int o = 0; o < H; o++) net.W1[c][o] = vsplat(w1[c * H + o]);
    }
    net.B2[0] = vsplat(b2[0]);
    net.B2[1] = vsplat(b2[1]);
#pragma omp parallel for schedule(static) num_threads(nthreads)
    for (int64_t i = 0; i < a; i++) {
        if (mode == MODE_SMALL_FC)
            pass2_row(MODE_SMALL_FC, i, a, b, g, p, m, rms, fac_a, fac_b, &net, u_a, u_b,
                      exp_mult, coef, p_decay, p_new);
        else
            pass2_row(MODE_VELO, i, a, b, g, p, m, rms, fac_a, fac_b, &net, u_a, u_b,
                      exp_mult, coef, p_decay, p_new);
    }
}
