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
/* Per-element channels. Factored (rank-2) tensors: pc = row factor x column factor.
 * Diagonal (rank-1) tensors: v = second moment per element (the reference feeds it twice,
 * as "row" and "column" statistics; the caller sums those weights). */
#define NCH_SMALL_FC (4 + 4 * K)      /* g, p, m(K), rms, m*r(K), r, pc*g(K), pc*m(K) */
#define NCH_VELO (3 + 5 * K)          /* g, clip(g), p, m(K), rms, m*r(K), r, pc*g(K), g*r, pc*m(K) */
#define NCH_SMALL_FC_DIAG (4 + 6 * K) /* g, p, m(K), rms, m*r(K), r, fg(K), v(K), rv(K), mf(K) */
#define NCH_VELO_DIAG (3 + 7 * K)     /* g, clip(g), p, m(K), rms, m*r(K), r, fg(K), g*r, v(K), rv(K), mf(K) */
#define NCH_MAX NCH_VELO_DIAG
#define N_STATS (2 * K + 3)

enum { MODE_SMALL_FC = 0, MODE_VELO = 1, MODE_SMALL_FC_DIAG = 2, MODE_VELO_DIAG = 3 };
#define IS_VELO(mode) ((mode) == MODE_VELO || (mode) == MODE_VELO_DIAG)
#define IS_DIAG(mode) ((mode) >= MODE_SMALL_FC_DIAG)
#define N_CH(mode) ((mode) == MODE_SMALL_FC ? NCH_SMALL_FC : (mode) == MODE_VELO ? NCH_VELO \
                    : (mode) == MODE_SMALL_FC_DIAG ? NCH_SMALL_FC_DIAG : NCH_VELO_DIAG)

int lopt_abi_version(void) { return 11; }
int lopt_decays(void) { return K; }
int lopt_hidden(void) { return H; }
int lopt_n_channels(int mode) { return N_CH(mode); }

/* pass 0: row_sum[i] = sum_j (g_ij^2 + 1e-30), col_sum[j] = sum_i (...), with g clipped
 * to [-clip, clip] when clip > 0. Returns 0, or -1 when a thread's column buffer cannot be
 * allocated. */
int lopt_sq_rowcol(int64_t a, int64_t b, const float *restrict g, float clip,
                   double *restrict row_sum, double *restrict col_sum, int nthreads) {
    int failed = 0;
    /* clipping to +-inf is the identity: one branch-free loop for both cases (a branch on
     * `clip` inside the loop made the unclipped case 2.4x slower) */
    const float c = clip > 0.0f ? clip : INFINITY;
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
                float gv = gi[j];
                gv = gv < -c ? -c : (gv > c ? c : gv);
                float s = gv * gv + 1e-30f;
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

/* Factored statistics of an (a, b) gradient, everything pass 1 and 2 need besides the
 * per-element data: updates v_row (K x len_r) and v_col (K x len_c) in place (element
 * (q, t) at q * sq + t * si: decay-first or channel-last layouts), and writes the row /
 * column factors fac_a (K, a), fac_b (K, b) and the hidden biases u_a (H, a), u_b (H, b)
 * of the 4K row/column channels v_row, v_col, rsqrt(v_row + 1e-8), rsqrt(v_col + 1e-8)
 * (first-layer weights w_stat (4K, H) in that order, each channel normalised by its
 * root mean square; `bias` (H) is added to u_a). d0 is the axis v_row averages over
 * (v_row indexes the other axis d1, v_col indexes d0). With update_v = 0, v_row and
 * v_col are taken as already updated (g is not read). Returns 0, or -1 when out of
 * memory. */
int lopt_factored_prepare(int64_t a, int64_t b, int d0, int update_v, const float *g,
                          float clip, float *v_row,
                          int64_t r_sq, int64_t r_si, float *v_col, int64_t c_sq, int64_t c_si,
                          const float *fac_decay, const float *w_stat, const float *bias,
                          float *fac_a, float *fac_b, float *u_a, float *u_b, int nthreads) {
    const int d1 = 1 - d0;
    double *row_sum = NULL, *col_sum = NULL;
    if (update_v) {
        row_sum = (double *)malloc((size_t)a * sizeof(double));
        col_sum = (double *)malloc((size_t)b * sizeof(double));
        if (!row_sum || !col_sum || lopt_sq_rowcol(a, b, g, clip, row_sum, col_sum, nthreads) != 0) {
            free(row_sum);
            free(col_sum);
            return -1;
        }
    }
    /* v_row averages g^2 over d0 and indexes d1; v_col the other way round */
    const int64_t len_r = d1 == 0 ? a : b, len_c = d0 == 0 ? a : b;
    const double *mean_src_r = d0 == 0 ? col_sum : row_sum;
    const double *mean_src_c = d1 == 0 ? col_sum : row_sum;
    const double div_r = d0 == 0 ? (double)a : (double)b, div_c = d1 == 0 ? (double)a : (double)b;
    float *ur = d1 == 0 ? u_a : u_b, *uc = d0 == 0 ? u_a : u_b;
    float *fr = d1 == 0 ? fac_a : fac_b, *fcol = d0 == 0 ? fac_a : fac_b;
    for (int o = 0; o < H; o++) {
        for (int64_t t = 0; t < len_r; t++) ur[o * len_r + t] = 0.0f;
        for (int64_t t = 0; t < len_c; t++) uc[o * len_c + t] = 0.0f;
    }
    for (int q = 0; q < K; q++) {
        const float fd = fac_decay[q], fc = 1.0f - fac_decay[q];
        double sr = 0.0, sr2 = 0.0, srr2 = 0.0, sc2 = 0.0, scr2 = 0.0;
        for (int64_t t = 0; t < len_r; t++) {
            float *v = v_row + q * r_sq + t * r_si;
            if (update_v) *v = fd * *v + fc * (float)(mean_src_r[t] / div_r);
            const float rs = 1.0f / sqrtf(*v + 1e-8f);
            sr += *v;
            sr2 += (double)*v * *v;
            srr2 += (double)rs * rs;
        }
        for (int64_t t = 0; t < len_c; t++) {
            float *v = v_col + q * c_sq + t * c_si;
            if (update_v) *v = fd * *v + fc * (float)(mean_src_c[t] / div_c);
            const float rs = 1.0f / sqrtf(*v + 1e-8f);
            sc2 += (double)*v * *v;
            scr2 += (double)rs * rs;
            float x = *v < 1e-9f ? 1e-9f : *v;
            fcol[q * len_c + t] = 1.0f / sqrtf(x);
        }
        const float row_mean = (float)(sr / (double)len_r);
        const float s_vr = 1.0f / sqrtf(1e-5f + (float)(sr2 / (double)len_r));
        const float s_rr = 1.0f / sqrtf(1e-5f + (float)(srr2 / (double)len_r));
        const float s_vc = 1.0f / sqrtf(1e-5f + (float)(sc2 / (double)len_c));
        const float s_rc = 1.0f / sqrtf(1e-5f + (float)(scr2 / (double)len_c));
        for (int64_t t = 0; t < len_r; t++) {
            const float v = v_row[q * r_sq + t * r_si];
            float x = v / (row_mean + 1e-9f);
            x = x < 1e-9f ? 1e-9f : x;
            fr[q * len_r + t] = 1.0f / sqrtf(x);
            const float rs = 1.0f / sqrtf(v + 1e-8f);
            for (int o = 0; o < H; o++)
                ur[o * len_r + t] += s_vr * w_stat[q * H + o] * v
                                     + s_rr * w_stat[(2 * K + q) * H + o] * rs;
        }
        for (int64_t t = 0; t < len_c; t++) {
            const float v = v_col[q * c_sq + t * c_si];
            const float rs = 1.0f / sqrtf(v + 1e-8f);
            for (int o = 0; o < H; o++)
                uc[o * len_c + t] += s_vc * w_stat[(K + q) * H + o] * v
                                     + s_rc * w_stat[(3 * K + q) * H + o] * rs;
        }
    }
    for (int o = 0; o < H; o++)
        for (int64_t i = 0; i < a; i++) u_a[o * a + i] += bias[o];
    free(row_sum);
    free(col_sum);
    return 0;
}

/* The per-element input channels of 8 elements into x[], in each mode's order (unused
 * trailing channels are zero). Factored modes read fa/fb, diagonal modes v. */
static inline __attribute__((always_inline)) void vchannels(
    const int mode, vf gv, vf pv, const vf m[K], vf rv, const float fa[K], const vf fb[K],
    const vf v[K], vf x[NCH_MAX]) {
    const vf r = vrsqrt(rv + 1e-6f);
    for (int c = N_CH(mode); c < NCH_MAX; c++) x[c] = vsplat(0.0f);
    int c = 0;
    x[c++] = gv;
    if (IS_VELO(mode)) x[c++] = vmin(vmax(gv, vsplat(-0.1f)), vsplat(0.1f));
    x[c++] = pv;
    for (int q = 0; q < K; q++) x[c++] = m[q];
    x[c++] = rv;
    for (int q = 0; q < K; q++) x[c++] = m[q] * r;
    x[c++] = r;
    vf pc[K];
    for (int q = 0; q < K; q++)
        pc[q] = IS_DIAG(mode) ? vrsqrt(vmax(v[q] + 1e-9f, vsplat(1e-9f))) : fa[q] * fb[q];
    for (int q = 0; q < K; q++) x[c++] = pc[q] * gv;
    if (IS_VELO(mode)) x[c++] = gv * r;
    if (IS_DIAG(mode)) {
        for (int q = 0; q < K; q++) x[c++] = v[q];
        for (int q = 0; q < K; q++) x[c++] = vrsqrt(v[q] + 1e-8f);
        for (int q = 0; q < K; q++)
            x[c++] = m[q] * (mode == MODE_VELO_DIAG ? vrsqrt(v[q]) : vrsqrt(v[q] + 1e-6f));
    } else {
        for (int q = 0; q < K; q++) x[c++] = pc[q] * m[q];
    }
}

/* The squares of the channels of a factored mode, as vchannels() would give them, but
 * with rsqrt(rms + 1e-6)^2 taken as 1 / (rms + 1e-6): pass 1 only needs the squares, and
 * this saves the square root (the sums differ from squaring vchannels() by float
 * rounding only). */
static inline __attribute__((always_inline)) void vsquares_factored(
    const int mode, vf gv, vf pv, const vf m[K], vf rv, const float fa[K], const vf fb[K],
    vf x2[NCH_MAX]) {
    const vf ir = 1.0f / (rv + 1e-6f), g2 = gv * gv;
    int c = 0;
    x2[c++] = g2;
    if (IS_VELO(mode)) {
        const vf cg = vmin(vmax(gv, vsplat(-0.1f)), vsplat(0.1f));
        x2[c++] = cg * cg;
    }
    x2[c++] = pv * pv;
    vf m2[K];
    for (int q = 0; q < K; q++) x2[c++] = m2[q] = m[q] * m[q];
    x2[c++] = rv * rv;
    for (int q = 0; q < K; q++) x2[c++] = m2[q] * ir;
    x2[c++] = ir;
    vf pc[K];
    for (int q = 0; q < K; q++) pc[q] = fa[q] * fb[q];
    for (int q = 0; q < K; q++) {
        const vf t = pc[q] * gv;
        x2[c++] = t * t;
    }
    if (IS_VELO(mode)) x2[c++] = g2 * ir;
    for (int q = 0; q < K; q++) {
        const vf t = pc[q] * m[q];
        x2[c++] = t * t;
    }
}

/* Load `len` (<= L) lanes at p (full-width when len == L). */
static inline vf vld(const float *p, int len) { return len == L ? vload(p) : vload_part(p, len); }
static inline void vst(float *p, vf v, int len) {
    if (len == L) vstore(p, v); else vstore_part(p, v, len);
}

/* Gradient lanes; VeLO clips gradients to [-1000, 1000] before everything else. */
static inline __attribute__((always_inline)) vf load_grad(const int mode, const float *g,
                                                          int len) {
    const vf gv = vld(g, len);
    return IS_VELO(mode) ? vmin(vmax(gv, vsplat(-1000.0f)), vsplat(1000.0f)) : gv;
}

/* One row of pass 1: new accumulators, channel sums of squares (ss) and old-state sums
 * (st). `mode` is a literal at every call, so each mode is compiled on its own. */
static inline __attribute__((always_inline)) void pass1_row(
    const int mode, int64_t i, int64_t a, int64_t b, const float *restrict g,
    const float *restrict p, const float *m_old, const float *rms_old,
    float *m_new, float *rms_new, const float d[K], const float c1[K],
    float rms_decay, float rc, const float *restrict fac_a, const float *restrict fac_b,
    const float *v_old, float *v_new, const float fd[K], const float fc[K],
    double *restrict ss_out, double *restrict st_out) {
    const int64_t n = a * b, off = i * b;
    float fa[K];
    for (int q = 0; q < K; q++) fa[q] = IS_DIAG(mode) ? 0.0f : fac_a[q * a + i];
    /* only the mode's own channels are accumulated: unused accumulators would spill */
    const int n_ch = N_CH(mode);
    vf ss[NCH_MAX], st[N_STATS];
    for (int c = 0; c < n_ch; c++) ss[c] = vsplat(0.0f);
    for (int s = 0; s < N_STATS; s++) st[s] = vsplat(0.0f);
    for (int64_t j = 0; j < b; j += L) {
        const int len = (int)(b - j < L ? b - j : L);
        const int64_t e = off + j;
        const vf gv = load_grad(mode, g + e, len), pv = vld(p + e, len),
                 ro = vld(rms_old + e, len);
        vf m[K], fb[K], v[K], x[NCH_MAX];
        for (int q = 0; q < K; q++) {
            const vf mo = vld(m_old + q * n + e, len);
            if (IS_VELO(mode)) { st[2 * q] += mo; st[2 * q + 1] += mo * mo; }
            m[q] = mo * d[q] + gv * c1[q];
            vst(m_new + q * n + e, m[q], len);
            if (IS_DIAG(mode)) {
                v[q] = vld(v_old + q * n + e, len) * fd[q] + (gv * gv + 1e-30f) * fc[q];
                vst(v_new + q * n + e, v[q], len);
                fb[q] = vsplat(0.0f);
            } else {
                v[q] = vsplat(0.0f);
                fb[q] = vld(fac_b + q * b + j, len);
            }
        }
        if (IS_VELO(mode)) { st[2 * K] += ro; st[2 * K + 1] += ro * ro; st[2 * K + 2] += pv * pv; }
        const vf rv = ro * rms_decay + gv * gv * rc;
        vst(rms_new + e, rv, len);
        if (IS_DIAG(mode)) {
            vchannels(mode, gv, pv, m, rv, fa, fb, v, x);
            for (int c = 0; c < n_ch; c++) x[c] = x[c] * x[c];
        } else {
            vsquares_factored(mode, gv, pv, m, rv, fa, fb, x);
        }
        if (len < L) { /* lanes past the row end must not count */
            vi keep;
            for (int l = 0; l < L; l++) keep[l] = l < len ? -1 : 0;
            for (int c = 0; c < n_ch; c++) x[c] = vselect(keep, x[c], vsplat(0.0f));
        }
        for (int c = 0; c < n_ch; c++) ss[c] += x[c];
    }
    for (int c = 0; c < n_ch; c++)
        for (int l = 0; l < L; l++) ss_out[c] += ss[c][l];
    for (int s = 0; s < N_STATS; s++)
        for (int l = 0; l < L; l++) st_out[s] += st[s][l];
}

/* pass 1 over an (a, b) tensor (diagonal modes: a = 1, b = n). Factored modes:
 * fac_a: (K, a) row factors, fac_b: (K, b) column factors (their product is the
 * Adafactor preconditioner of element (i, j)). Diagonal modes: v_old -> v_new (K, n),
 * decays fac_decay. sumsq: (n_ch,) output. stats (VeLO modes; may be NULL): sum m_q,
 * sum m_q^2 (q < K), sum rms, sum rms^2, sum p^2 of the OLD state. */
void lopt_pass1(int mode, int64_t a, int64_t b, const float *g, const float *p,
                const float *m_old, const float *rms_old, float *m_new, float *rms_new,
                const float *mom_decay, float rms_decay, const float *fac_a, const float *fac_b,
                const float *v_old, float *v_new, const float *fac_decay, double *sumsq,
                double *stats, int nthreads) {
    const int n_ch = lopt_n_channels(mode);
    float d[K], c1[K], fd[K], fc[K];
    for (int q = 0; q < K; q++) { d[q] = mom_decay[q]; c1[q] = 1.0f - mom_decay[q]; }
    for (int q = 0; q < K; q++) {
        fd[q] = fac_decay ? fac_decay[q] : 0.0f;
        fc[q] = 1.0f - fd[q];
    }
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
#define PASS1_ROW(MODE)                                                                      \
    pass1_row(MODE, i, a, b, g, p, m_old, rms_old, m_new, rms_new, d, c1, rms_decay, rc, fac_a, \
              fac_b, v_old, v_new, fd, fc, ss_local, st_local)
            switch (mode) {
            case MODE_SMALL_FC: PASS1_ROW(MODE_SMALL_FC); break;
            case MODE_VELO: PASS1_ROW(MODE_VELO); break;
            case MODE_SMALL_FC_DIAG: PASS1_ROW(MODE_SMALL_FC_DIAG); break;
            default: PASS1_ROW(MODE_VELO_DIAG); break;
            }
#undef PASS1_ROW
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

/* First MLP layer (relu) of one vector of elements. */
static inline __attribute__((always_inline)) void mlp_layer0(
    const int mode, const vf x[NCH_MAX], const vf ub[H], const float ua[H],
    const mlp_t *restrict net, vf h[H]) {
    const int n_ch = N_CH(mode);
    vf h_odd[H];
    for (int o = 0; o < H; o++) { h[o] = ua[o] + ub[o]; h_odd[o] = vsplat(0.0f); }
    /* even and odd channels in separate sums: twice the independent FMA chains */
    for (int c = 0; c + 1 < n_ch; c += 2)
        for (int o = 0; o < H; o++) {
            h[o] += net->W[c][o] * x[c];
            h_odd[o] += net->W[c + 1][o] * x[c + 1];
        }
    if (n_ch % 2)
        for (int o = 0; o < H; o++) h[o] += net->W[n_ch - 1][o] * x[n_ch - 1];
    for (int o = 0; o < H; o++) h[o] = vmax(h[o] + h_odd[o], vsplat(0.0f));
}

/* The rest of the MLP and the step, from the first hidden layer. */
static inline __attribute__((always_inline)) vf mlp_rest_step(
    const vf h[H], vf pv, const mlp_t *restrict net, float exp_mult, float coef,
    float p_decay) {
    vf h2[H];
    for (int o = 0; o < H; o++) {
        vf s = net->B1[o];
        for (int c = 0; c < H; c++) s += net->W1[c][o] * h[c];
        h2[o] = vmax(s, vsplat(0.0f));
    }
    vf dir = net->B2[0], mag = net->B2[1];
    for (int c = 0; c < H; c++) { dir += net->W2[c][0] * h2[c]; mag += net->W2[c][1] * h2[c]; }
    return pv * p_decay - dir * vexp(mag * exp_mult) * coef;
}

/* Elements per block of pass 2: the first layer of a block is computed and parked in
 * a small buffer, then the rest of the MLP runs over the block. Two short loops instead
 * of one long dependency chain (channels -> 3 layers -> exp) per vector let the CPU
 * overlap more vectors. */
#define BLOCK 128

/* One row of pass 2 (see pass 1 for `mode`). Measured: two vectors per iteration (more
 * independent FMA chains) spill registers on AVX2 and are slower. */
static inline __attribute__((always_inline)) void pass2_row(
    const int mode, int64_t i, int64_t a, int64_t b, const float *restrict g,
    const float *p, const float *restrict m_acc, const float *restrict rms,
    const float *restrict fac_a, const float *restrict fac_b, const mlp_t *restrict net,
    const float *restrict u_a, const float *restrict u_b, const float *restrict v_acc,
    float exp_mult, float coef, float p_decay, float *p_new) {
    const int64_t n = a * b, off = i * b;
    float fa[K], ua[H];
    for (int q = 0; q < K; q++) fa[q] = IS_DIAG(mode) ? 0.0f : fac_a[q * a + i];
    for (int o = 0; o < H; o++) ua[o] = u_a[o * a + i];
    vf hbuf[BLOCK / L][H];
    for (int64_t j0 = 0; j0 < b; j0 += BLOCK) {
        const int64_t j_end = b - j0 < BLOCK ? b : j0 + BLOCK;
        for (int64_t j = j0; j < j_end; j += L) {
            const int len = (int)(b - j < L ? b - j : L);
            const int64_t e = off + j;
            vf m[K], fb[K], v[K], x[NCH_MAX], ub[H];
            for (int q = 0; q < K; q++) {
                m[q] = vld(m_acc + q * n + e, len);
                fb[q] = IS_DIAG(mode) ? vsplat(0.0f) : vld(fac_b + q * b + j, len);
                v[q] = IS_DIAG(mode) ? vld(v_acc + q * n + e, len) : vsplat(0.0f);
            }
            vchannels(mode, load_grad(mode, g + e, len), vld(p + e, len), m,
                      vld(rms + e, len), fa, fb, v, x);
            for (int o = 0; o < H; o++)
                ub[o] = IS_DIAG(mode) ? vsplat(0.0f) : vld(u_b + o * b + j, len);
            mlp_layer0(mode, x, ub, ua, net, hbuf[(j - j0) / L]);
        }
        for (int64_t j = j0; j < j_end; j += L) {
            const int len = (int)(b - j < L ? b - j : L);
            const int64_t e = off + j;
            vst(p_new + e, mlp_rest_step(hbuf[(j - j0) / L], vld(p + e, len), net, exp_mult,
                                         coef, p_decay), len);
        }
    }
}

/* pass 2. w_in: (n_ch, H) first-layer weights of the per-element channels; each channel
 * c is normalised by rsqrt(1e-5 + sumsq[c] / n) (its sums of squares from pass 1), which
 * is folded into the weights here;
 * u_a: (H, a), u_b: (H, b) hidden biases of the row / column channels (bias included
 * once; diagonal modes: u_a (H, 1) is the bias, u_b unused, v (K, n) the second moments);
 * w1: (H, H) and w2: (H, 2) in (in, out) layout with biases b1 (H), b2 (2).
 * p_new = p * p_decay - dir * exp(exp_mult * mag) * coef; p_new may be p (in place),
 * and in pass 1 m_new / rms_new / v_new may be m_old / rms_old / v_old. */
void lopt_pass2(int mode, int64_t a, int64_t b, const float *g, const float *p,
                const float *m, const float *rms, const float *fac_a, const float *fac_b,
                const float *v, const float *w_in, const double *sumsq, const float *u_a,
                const float *u_b,
                const float *w1, const float *b1, const float *w2, const float *b2,
                float exp_mult, float coef, float p_decay, float *p_new, int nthreads) {
    const int n_ch = lopt_n_channels(mode);
    mlp_t net;
    for (int c = 0; c < NCH_MAX; c++)
        for (int o = 0; o < H; o++) {
            const float scale = c < n_ch ? 1.0f / sqrtf(1e-5f + (float)sumsq[c] / (float)(a * b))
                                         : 0.0f;
            net.W[c][o] = vsplat(c < n_ch ? scale * w_in[c * H + o] : 0.0f);
        }
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
#define PASS2_ROW(MODE)                                                                        \
    pass2_row(MODE, i, a, b, g, p, m, rms, fac_a, fac_b, &net, u_a, u_b, v, exp_mult, coef, \
              p_decay, p_new)
        switch (mode) {
        case MODE_SMALL_FC: PASS2_ROW(MODE_SMALL_FC); break;
        case MODE_VELO: PASS2_ROW(MODE_VELO); break;
        case MODE_SMALL_FC_DIAG: PASS2_ROW(MODE_SMALL_FC_DIAG); break;
        default: PASS2_ROW(MODE_VELO_DIAG); break;
        }
#undef PASS2_ROW
    }
}

/* VeLO's per-step scalars, for the tensors whose pass 1 gave `stats` (the step's few
 * dozen small tensor ops in one call; float32 arithmetic like the PyTorch reference).
 *
 * Loss buffer (10 running means of the loss; metaopt/lopt/velo.py::loss_buffer_step):
 * buf_it = the buffer's old iteration; with bias_d = 1 - decays_d^(buf_it + 1), the loss is capped at
 * twice the largest bias-corrected mean (not at buf_it = 0), new_means = means * decays +
 * loss * (1 - decays), new_min = min(running_min, new_means / bias), and the 9 loss
 * features clamp((cor_i - min_i) / max(cor_{i+1} - min_i, 1e-8) - 1, -1, 1) of the new
 * buffer (zero while buf_it + 1 <= 2). it / num_steps: the step's time features.
 *
 * LSTM input (n, 30) (velo.py::VeLO._lstm_features): per tensor j, from the sums
 * stats[j] = [sum m_q, sum m_q^2 (q < K), sum rms, sum rms^2, sum p^2] over counts[j]
 * elements: mean(p^2) -> msq[j], the norm multiplier nm = rsqrt(max(msq, 1e-9)) and the
 * clipped logs 0.5 * clamp(log(1e-8 + |10 v|), -5, 5) of nm * mean(rms), nm^2 * var(m_q)
 * and nm^2 var(rms) + (nm mean(rms) - nm mean(m_q))^2; the row is
 * [tanh(10 (it / num_steps - timescales)) (9), loss features (9), log mean rms,
 *  rank[j] (5), logs of the variances (2K)]. */
#define N_LOSS 10
#define N_TIMESCALES 9
#define N_RNN_IN 30

static float clip_log_abs(float v) {
    float l = logf(1e-8f + fabsf(v * 10.0f));
    l = l < -5.0f ? -5.0f : (l > 5.0f ? 5.0f : l);
    return l * 0.5f;
}

void lopt_velo_scalars(int64_t n, int it, int num_steps, int buf_it, float loss, const float *decays,
                       const float *means, const float *running_min, float *new_means,
                       float *new_min, const float *timescales, const double *stats,
                       const double *counts, const float *rank, float *rnn_in, float *msq) {
    float bias[N_LOSS], feat[N_LOSS - 1];
    const float it_next = (float)(buf_it + 1);
    float approx_max = -INFINITY;
    for (int d = 0; d < N_LOSS; d++) {
        bias[d] = 1.0f - powf(decays[d], it_next);
        const float c = means[d] / bias[d];
        approx_max = c > approx_max ? c : approx_max;
    }
    if (buf_it == 0) approx_max = loss;
    const float cap = fabsf(approx_max) * 2.0f;
    const float l = cap < loss ? cap : loss;
    for (int d = 0; d < N_LOSS; d++) {
        new_means[d] = means[d] * decays[d] + l * (1.0f - decays[d]);
        const float c = new_means[d] / bias[d];
        new_min[d] = running_min[d] < c ? running_min[d] : c;
    }
    for (int i = 0; i < N_LOSS - 1; i++) {
        const float lo = new_min[i];
        float den = new_means[i + 1] / bias[i + 1] - lo;
        den = den < 1e-8f ? 1e-8f : den;
        float f = (new_means[i] / bias[i] - lo) / den - 1.0f;
        f = f < -1.0f ? -1.0f : (f > 1.0f ? 1.0f : f);
        feat[i] = buf_it + 1 <= 2 ? f * 0.0f : f;
    }
    float shared[N_TIMESCALES + N_LOSS - 1];
    const float fraction = (float)it / (float)num_steps;
    for (int i = 0; i < N_TIMESCALES; i++)
        shared[i] = tanhf((fraction - timescales[i]) * 10.0f);
    for (int i = 0; i < N_LOSS - 1; i++) shared[N_TIMESCALES + i] = feat[i];
    for (int64_t j = 0; j < n; j++) {
        const double *st = stats + j * N_STATS;
        const double cnt = counts[j];
        float *row = rnn_in + j * N_RNN_IN;
        float mean_m[K], var_m[K];
        for (int q = 0; q < K; q++) {
            mean_m[q] = (float)(st[2 * q] / cnt);
            const float v = (float)(st[2 * q + 1] / cnt) - mean_m[q] * mean_m[q];
            var_m[q] = v < 0.0f ? 0.0f : v;
        }
        const float mean_r = (float)(st[2 * K] / cnt);
        float var_r = (float)(st[2 * K + 1] / cnt) - mean_r * mean_r;
        var_r = var_r < 0.0f ? 0.0f : var_r;
        const float ms = (float)(st[2 * K + 2] / cnt);
        msq[j] = ms;
        const float nm = 1.0f / sqrtf(ms < 1e-9f ? 1e-9f : ms);
        const float nm2 = nm * nm;
        const float mean_rms = mean_r * nm;
        for (int i = 0; i < N_TIMESCALES + N_LOSS - 1; i++) row[i] = shared[i];
        row[18] = clip_log_abs(mean_rms);
        for (int i = 0; i < 5; i++) row[19 + i] = rank[j * 5 + i];
        for (int q = 0; q < K; q++) {
            const float dm = mean_rms - mean_m[q] * nm;
            row[24 + q] = clip_log_abs(var_m[q] * nm2);
            row[24 + K + q] = clip_log_abs(var_r * nm2 + dm * dm);
        }
    }
}

/* The index of the first of `count` float32 arrays (addresses `ptrs`, lengths `counts`)
 * holding a NaN or an infinity, or -1 when all are finite: the step guard's check of the
 * gradients in one pass over memory, before anything is written. (x - x is 0 for finite
 * x and NaN otherwise; summing those stays vectorised without -ffast-math.) */
int64_t lopt_first_nonfinite(int64_t count, const int64_t *ptrs, const int64_t *counts) {
    for (int64_t j = 0; j < count; j++) {
        const float *x = (const float *)(uintptr_t)ptrs[j];
        const int64_t n = counts[j];
        float acc = 0.0f;
#pragma omp simd reduction(+ : acc)
        for (int64_t i = 0; i < n; i++) acc += x[i] - x[i];
        if (acc != 0.0f || acc != acc) return j;
    }
    return -1;
}

/* The gate pre-activations of VeLO's per-tensor LSTM (the shell's snapshot of the weights,
 * mix_in folded in; metaopt/lopt/velo.py::VeLO.rnn), for `rows` tensors:
 *   pooled  = max over rows of relu(pool_b + x @ pool_w)                 (n_pool,)
 *   gates   = bias + x @ fold + pooled @ W_p + h @ W_h                   (rows, 4 hid)
 * (the cell's sigmoids and tanhs stay with torch's vectorised ones). x is (rows, n_in);
 * pool_w (n_in, n_pool), n_pool <= 4 hid;
 * fold (n_in, 4 hid); W_p (n_pool, 4 hid) and W_h (hid, 4 hid) stored in panels of
 * GATE_PANEL columns, w[k][n] at (n / GATE_PANEL) * depth * GATE_PANEL + k * GATE_PANEL +
 * n % GATE_PANEL (metaopt/lopt/cpu_kernels.py::gate_panels), so a panel streams
 * contiguously and stays in cache while every block of GATE_ROWS rows reads it. At VeLO's
 * sizes (a few tensors, two 512 x 2048 matrices) the step is bound by reading those 8 MB;
 * a general GEMM packs them first and reads them twice. Every output is one thread's sum
 * in a fixed order: results do not depend on nthreads. `pooled` (n_pool) is the caller's
 * scratch; `gates` (rows, 4 hid) the output. */
#define GATE_PANEL 32
#define GATE_ROWS 8

int lopt_gate_panel(void) { return GATE_PANEL; }

void lopt_velo_gates(int64_t rows, int64_t n_in, int64_t n_pool, int64_t hid, const float *x,
                     const float *h, const float *pool_w, const float *pool_b,
                     const float *fold, const float *bias, const float *wh, const float *wp,
                     float *pooled, float *gates, int nthreads) {
    const int64_t cols = 4 * hid, panels = cols / GATE_PANEL;
    for (int64_t j = 0; j < n_pool; j++) pooled[j] = 0.0f;  /* relu: the max is >= 0 */
    for (int64_t m = 0; m < rows; m++) {
        float *v = gates;  /* (n_pool <= 4 hid) scratch before the gates are written */
        for (int64_t j = 0; j < n_pool; j++) v[j] = pool_b[j];
        for (int64_t k = 0; k < n_in; k++) {
            const float xk = x[m * n_in + k];
            const float *w = pool_w + k * n_pool;
#pragma omp simd
            for (int64_t j = 0; j < n_pool; j++) v[j] += xk * w[j];
        }
#pragma omp simd
        for (int64_t j = 0; j < n_pool; j++) pooled[j] = v[j] > pooled[j] ? v[j] : pooled[j];
    }
#pragma omp parallel for schedule(static) num_threads(nthreads)
    for (int64_t q = 0; q < panels; q++) {
        const int64_t n0 = q * GATE_PANEL;
        const float *ph = wh + q * hid * GATE_PANEL, *pp = wp + q * n_pool * GATE_PANEL;
        float shared[GATE_PANEL];
        for (int j = 0; j < GATE_PANEL; j++) shared[j] = bias[n0 + j];
        for (int64_t k = 0; k < n_pool; k++) {
            const float pk = pooled[k];
            const float *w = pp + k * GATE_PANEL;
#pragma omp simd
            for (int j = 0; j < GATE_PANEL; j++) shared[j] += pk * w[j];
        }
        for (int64_t m0 = 0; m0 < rows; m0 += GATE_ROWS) {
            const int64_t mr = rows - m0 < GATE_ROWS ? rows - m0 : GATE_ROWS;
            const float *hb = h + m0 * hid;
            float acc[GATE_ROWS][GATE_PANEL];
            for (int m = 0; m < GATE_ROWS; m++)
                for (int j = 0; j < GATE_PANEL; j++) acc[m][j] = 0.0f;
            for (int64_t k = 0; k < hid; k++) {
                const float *w = ph + k * GATE_PANEL;
                for (int m = 0; m < GATE_ROWS; m++) {
                    const float hm = m < mr ? hb[m * hid + k] : 0.0f;
#pragma omp simd
                    for (int j = 0; j < GATE_PANEL; j++) acc[m][j] += hm * w[j];
                }
            }
            for (int64_t m = 0; m < mr; m++) {
                const float *xm = x + (m0 + m) * n_in;
                float *out = gates + (m0 + m) * cols + n0;
                for (int j = 0; j < GATE_PANEL; j++) out[j] = shared[j] + acc[m][j];
                for (int64_t k = 0; k < n_in; k++) {
                    const float xk = xm[k];
                    const float *f = fold + k * cols + n0;
#pragma omp simd
                    for (int j = 0; j < GATE_PANEL; j++) out[j] += xk * f[j];
                }
            }
        }
    }
}

/* Batched in-place VeLO steps: one call runs passes 0-1 (lopt_velo_pass1_plans) or the
 * factored hidden biases and pass 2 (lopt_velo_pass2_plans) of `count` tensors, each
 * described by a row of PLAN_SLOTS int64 in `table` (addresses as integers; written and
 * checked by metaopt/lopt/cpu_kernels.py::VeLOPlanBatch). The per-tensor work is exactly
 * the unbatched calls'; only the per-call overhead is shared. Matrices: mode MODE_VELO,
 * (a, b), d0, v_row/v_col channel-last; vectors: MODE_VELO_DIAG, a = 1, b = n.
 * Pass 2 reads the tensor's packed MLP row `packed + row * row_stride` at the SL_*
 * offsets (see velo_kernels.kernel_mlp_gather), coef[j] and p_decay[j]. */
enum {
    PL_MODE, PL_A, PL_B, PL_D0, PL_G, PL_P, PL_M, PL_RMS, PL_V, PL_VROW, PL_VCOL, PL_FACA,
    PL_FACB, PL_UA, PL_UB, PL_ZEROS, PL_SUMSQ, PL_STATS, PL_ROW, PL_SL_WX, PL_SL_WSTAT,
    PL_SL_B0, PL_SL_W1, PL_SL_B1, PL_SL_W2, PL_SL_B2, PLAN_SLOTS
};
#define PL_F(t, s) ((float *)(uintptr_t)(t)[s])

int lopt_plan_slots(void) { return PLAN_SLOTS; }

/* Returns 0, or 1 + j when tensor j's row/column sums could not be allocated (tensors
 * before j are stepped, j and later are not). */
int lopt_velo_pass1_plans(int64_t count, const int64_t *table, const float *mom_decay,
                          float rms_decay, const float *fac_decay, int nthreads) {
    for (int64_t j = 0; j < count; j++) {
        const int64_t *t = table + j * PLAN_SLOTS;
        const int mode = (int)t[PL_MODE];
        const float *g = PL_F(t, PL_G);
        double *sumsq = (double *)(uintptr_t)t[PL_SUMSQ], *stats = (double *)(uintptr_t)t[PL_STATS];
        if (mode == MODE_VELO_DIAG) {
            lopt_pass1(mode, 1, t[PL_B], g, PL_F(t, PL_P), PL_F(t, PL_M), PL_F(t, PL_RMS),
                       PL_F(t, PL_M), PL_F(t, PL_RMS), mom_decay, rms_decay, NULL, NULL,
                       PL_F(t, PL_V), PL_F(t, PL_V), fac_decay, sumsq, stats, nthreads);
            continue;
        }
        const float *z = PL_F(t, PL_ZEROS);
        if (lopt_factored_prepare(t[PL_A], t[PL_B], (int)t[PL_D0], 1, g, 1000.0f,
                                  PL_F(t, PL_VROW), 1, K, PL_F(t, PL_VCOL), 1, K, fac_decay, z,
                                  z, PL_F(t, PL_FACA), PL_F(t, PL_FACB), PL_F(t, PL_UA),
                                  PL_F(t, PL_UB), nthreads) != 0)
            return (int)(1 + j);
        lopt_pass1(mode, t[PL_A], t[PL_B], g, PL_F(t, PL_P), PL_F(t, PL_M), PL_F(t, PL_RMS),
                   PL_F(t, PL_M), PL_F(t, PL_RMS), mom_decay, rms_decay, PL_F(t, PL_FACA),
                   PL_F(t, PL_FACB), NULL, NULL, NULL, sumsq, stats, nthreads);
    }
    return 0;
}

void lopt_velo_pass2_plans(int64_t count, const int64_t *table, const float *packed,
                           int64_t row_stride, const float *coef, const float *p_decay,
                           float exp_mult, int nthreads) {
    for (int64_t j = 0; j < count; j++) {
        const int64_t *t = table + j * PLAN_SLOTS;
        const int mode = (int)t[PL_MODE];
        const float *row = packed + t[PL_ROW] * row_stride;
        const double *sumsq = (const double *)(uintptr_t)t[PL_SUMSQ];
        const float *g = PL_F(t, PL_G);
        float *p = PL_F(t, PL_P);
        if (mode == MODE_VELO_DIAG) {
            lopt_pass2(mode, 1, t[PL_B], g, p, PL_F(t, PL_M), PL_F(t, PL_RMS), NULL, NULL,
                       PL_F(t, PL_V), row + t[PL_SL_WX], sumsq, row + t[PL_SL_B0], NULL,
                       row + t[PL_SL_W1], row + t[PL_SL_B1], row + t[PL_SL_W2],
                       row + t[PL_SL_B2], exp_mult, coef[j], p_decay[j], p, nthreads);
            continue;
        }
        /* the hidden biases of the row/column channels (v already updated in pass 1: no
         * allocation) */
        lopt_factored_prepare(t[PL_A], t[PL_B], (int)t[PL_D0], 0, g, 0.0f, PL_F(t, PL_VROW),
                              1, K, PL_F(t, PL_VCOL), 1, K, PL_F(t, PL_ZEROS),
                              row + t[PL_SL_WSTAT], row + t[PL_SL_B0], PL_F(t, PL_FACA),
                              PL_F(t, PL_FACB), PL_F(t, PL_UA), PL_F(t, PL_UB), nthreads);
        lopt_pass2(mode, t[PL_A], t[PL_B], g, p, PL_F(t, PL_M), PL_F(t, PL_RMS),
                   PL_F(t, PL_FACA), PL_F(t, PL_FACB), NULL, row + t[PL_SL_WX], sumsq,
                   PL_F(t, PL_UA), PL_F(t, PL_UB), row + t[PL_SL_W1], row + t[PL_SL_B1],
                   row + t[PL_SL_W2], row + t[PL_SL_B2], exp_mult, coef[j], p_decay[j], p,
                   nthreads);
    }
}


/* small_fc_lopt's whole step for `count` tensors x `rows` rows in one call (the one
 * orchestration of metaopt/lopt/cpu_kernels.py::LoptCpuKernels.small_fc_rows; rows = 1
 * is the torch.optim shell's step of a whole model, rows = R the meta-training rows).
 *
 * Tensor j is described by row j of `table` (SR_SLOTS int64): its mode (MODE_SMALL_FC:
 * an (a, b) matrix with factored second moments, v_row/v_col decay-first (K, len) and
 * d0 the axis v_row averages over; MODE_SMALL_FC_DIAG: a vector, a = 1, b = n, v (K, n)),
 * the base addresses of row 0 of its arrays and, per array, the distance between rows
 * (in floats). Row r of tensor j is stepped with row r of every per-row constant (each a
 * contiguous (rows, size) array: mom_d, fac_d (K), rms_d (1), w_factored (NCH_SMALL_FC,
 * H), w_diag (NCH_SMALL_FC_DIAG, H), w_stat (4K, H), bias0 (H), w1 (H, H), b1 (H),
 * w2 (H, 2), b2 (2)) and coef[j * rows + r], p_decay[j * rows + r]: the work of each
 * (tensor, row) is exactly lopt_factored_prepare + lopt_pass1 + lopt_pass2 (or pass 1 and
 * 2 of the diagonal mode). Outputs may alias inputs (in place); v_row/v_col are updated
 * in place. With rows > 1 the (tensor, row) jobs run in parallel (each on one thread),
 * with rows = 1 one after another (each on nthreads).
 *
 * Returns 0; -(1 + j) when table row j is malformed (unknown mode, non-positive size,
 * d0 not 0/1, a NULL address, a row stride smaller than a row: nothing is written then);
 * 1 + j when tensor j's scratch could not be allocated. */
enum {
    SR_MODE, SR_A, SR_B, SR_D0,
    SR_G, SR_P, SR_M_OLD, SR_RMS_OLD, SR_P_NEW, SR_M_NEW, SR_RMS_NEW, SR_V_ROW, SR_V_COL,
    SR_V_OLD, SR_V_NEW, /* addresses (as integers) of row 0 */
    SR_S_G, SR_S_P, SR_S_M_OLD, SR_S_RMS_OLD, SR_S_P_NEW, SR_S_M_NEW, SR_S_RMS_NEW,
    SR_S_V_ROW, SR_S_V_COL, SR_S_V_OLD, SR_S_V_NEW, /* per-row strides, in floats */
    SR_SLOTS
};
#define SR_ADDR0 SR_G
#define SR_N_ADDR (SR_S_G - SR_G)

int lopt_small_fc_slots(void) { return SR_SLOTS; }

/* The floats one row of array `slot` (an SR_* address) of a table row holds; 0: unused. */
static int64_t sr_row_size(const int64_t *t, int slot) {
    const int64_t a = t[SR_A], b = t[SR_B], n = a * b;
    const int diag = t[SR_MODE] == MODE_SMALL_FC_DIAG;
    const int64_t len_r = t[SR_D0] == 0 ? b : a, len_c = t[SR_D0] == 0 ? a : b;
    switch (slot) {
    case SR_G: case SR_P: case SR_RMS_OLD: case SR_P_NEW: case SR_RMS_NEW: return n;
    case SR_M_OLD: case SR_M_NEW: return K * n;
    case SR_V_ROW: return diag ? 0 : K * len_r;
    case SR_V_COL: return diag ? 0 : K * len_c;
    case SR_V_OLD: case SR_V_NEW: return diag ? K * n : 0;
    default: return 0;
    }
}

static int sr_row_ok(const int64_t *t) {
    if (t[SR_MODE] != MODE_SMALL_FC && t[SR_MODE] != MODE_SMALL_FC_DIAG) return 0;
    if (t[SR_A] < 1 || t[SR_B] < 1) return 0;
    if (t[SR_MODE] == MODE_SMALL_FC_DIAG ? t[SR_A] != 1 : (t[SR_D0] != 0 && t[SR_D0] != 1))
        return 0;
    for (int s = SR_ADDR0; s < SR_ADDR0 + SR_N_ADDR; s++) {
        const int64_t size = sr_row_size(t, s);
        if (size == 0) continue;
        if (t[s] == 0 || t[s + SR_N_ADDR] < size) return 0;
    }
    return 1;
}

#define SR_F(t, s, r) ((float *)(uintptr_t)(t)[s] + (r) * (t)[(s) + SR_N_ADDR])

/* One (tensor, row) job; returns 0 or -1 (out of memory). */
static int small_fc_job(const int64_t *t, int64_t r, const float *mom_d, const float *fac_d,
                        const float *rms_d, const float *w_factored, const float *w_diag,
                        const float *w_stat, const float *bias0, const float *w1,
                        const float *b1, const float *w2, const float *b2, float coef,
                        float p_decay, float exp_mult, int nthreads) {
    const int mode = (int)t[SR_MODE];
    const int64_t a = t[SR_A], b = t[SR_B];
    const float *md = mom_d + r * K, *fd = fac_d + r * K, *bz = bias0 + r * H;
    const float *w1r = w1 + r * H * H, *b1r = b1 + r * H, *w2r = w2 + r * 2 * H,
                *b2r = b2 + r * 2;
    double sumsq[NCH_MAX];
    const float *g = SR_F(t, SR_G, r), *p = SR_F(t, SR_P, r);
    float *m_new = SR_F(t, SR_M_NEW, r), *rms_new = SR_F(t, SR_RMS_NEW, r);
    if (mode == MODE_SMALL_FC_DIAG) {
        float *v_new = SR_F(t, SR_V_NEW, r);
        lopt_pass1(mode, 1, b, g, p, SR_F(t, SR_M_OLD, r), SR_F(t, SR_RMS_OLD, r), m_new,
                   rms_new, md, rms_d[r], NULL, NULL, SR_F(t, SR_V_OLD, r), v_new, fd, sumsq,
                   NULL, nthreads);
        lopt_pass2(mode, 1, b, g, p, m_new, rms_new, NULL, NULL, v_new,
                   w_diag + r * NCH_SMALL_FC_DIAG * H, sumsq, bz, NULL, w1r, b1r, w2r, b2r,
                   exp_mult, coef, p_decay, SR_F(t, SR_P_NEW, r), nthreads);
        return 0;
    }
    const int d0 = (int)t[SR_D0];
    const int64_t len_r = d0 == 0 ? b : a, len_c = d0 == 0 ? a : b;
    float *scratch = (float *)malloc((size_t)(K * (a + b) + H * (a + b)) * sizeof(float));
    if (!scratch) return -1;
    float *fac_a = scratch, *fac_b = fac_a + K * a, *u_a = fac_b + K * b, *u_b = u_a + H * a;
    if (lopt_factored_prepare(a, b, d0, 1, g, 0.0f, SR_F(t, SR_V_ROW, r), len_r, 1,
                              SR_F(t, SR_V_COL, r), len_c, 1, fd, w_stat + r * 4 * K * H, bz,
                              fac_a, fac_b, u_a, u_b, nthreads) != 0) {
        free(scratch);
        return -1;
    }
    lopt_pass1(mode, a, b, g, p, SR_F(t, SR_M_OLD, r), SR_F(t, SR_RMS_OLD, r), m_new, rms_new,
               md, rms_d[r], fac_a, fac_b, NULL, NULL, NULL, sumsq, NULL, nthreads);
    lopt_pass2(mode, a, b, g, p, m_new, rms_new, fac_a, fac_b, NULL,
               w_factored + r * NCH_SMALL_FC * H, sumsq, u_a, u_b, w1r, b1r, w2r, b2r,
               exp_mult, coef, p_decay, SR_F(t, SR_P_NEW, r), nthreads);
    free(scratch);
    return 0;
}

int lopt_small_fc_rows(int64_t count, const int64_t *table, int64_t rows, const float *mom_d,
                       const float *fac_d, const float *rms_d, const float *w_factored,
                       const float *w_diag, const float *w_stat, const float *bias0,
                       const float *w1, const float *b1, const float *w2, const float *b2,
                       const float *coef, const float *p_decay, float exp_mult, int nthreads) {
    for (int64_t j = 0; j < count; j++)
        if (!sr_row_ok(table + j * SR_SLOTS)) return (int)(-(1 + j));
    int64_t failed = -1;
    const int64_t jobs = count * rows;
#define SMALL_FC_JOB(JOB, THREADS)                                                             \
    small_fc_job(table + ((JOB) / rows) * SR_SLOTS, (JOB) % rows, mom_d, fac_d, rms_d,         \
                 w_factored, w_diag, w_stat, bias0, w1, b1, w2, b2, coef[JOB], p_decay[JOB], \
                 exp_mult, THREADS)
    if (rows > 1) {
#pragma omp parallel for schedule(dynamic, 1) num_threads(nthreads)
        for (int64_t job = 0; job < jobs; job++)
            if (SMALL_FC_JOB(job, 1) != 0) {
#pragma omp critical
                if (failed < 0 || job / rows < failed) failed = job / rows;
            }
    } else {
        for (int64_t job = 0; job < jobs && failed < 0; job++)
            if (SMALL_FC_JOB(job, nthreads) != 0) failed = job;
    }
#undef SMALL_FC_JOB
    return failed < 0 ? 0 : (int)(1 + failed);
}
