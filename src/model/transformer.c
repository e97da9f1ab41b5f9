/*
** transformer.c: the CLIP transformer (ViT image tower and causal text
** tower) and the public encode calls.
**
** One residual block function (cdb_block_forward) serves both towers. Matrix
** products go through the compute layer (compute.h: cdb_linear on the
** weights packed for the model's precision, cdb_sgemm) with the whole batch stacked into one GEMM
** (rows = sequences * tokens); the elementwise parts (layernorm, softmax,
** QuickGELU) are 4- or 8-lane vector loops written with GCC/clang vector
** extensions so that they stay a small fraction of the time.
**
** Shapes: d = width, f = MLP width, T = tokens per sequence, nseq = sequences
** in the batch, rows = nseq * T, e = embedding size, hd = 64 (head size).
*/
#include "compute/compute.h"
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "model/tokenizer.h"
#include "model/transformer.h"

/* ---- per-context scratch -------------------------------------------------- */

struct cdb_run {
    float *x;     size_t cap_x;     /* (rows, d) residual stream */
    float *h;     size_t cap_h;     /* (rows, d) layernorm output; patch embeddings */
    float *qkv;   size_t cap_qkv;   /* (rows, 3d) q | k | v */
    float *att;   size_t cap_att;   /* (rows, d) attention output (heads concatenated) */
    float *mlp;   size_t cap_mlp;   /* (rows, f) MLP hidden; image patches */
    float *s;     size_t cap_s;     /* (T, T) attention scores of one (sequence, head) */
    float *proj;  size_t cap_proj;  /* (nseq, e) projected output of a text group */
};

struct cdb_run *cdb_run_new(void)
{
    return calloc(1, sizeof(struct cdb_run));
}

void cdb_run_free(struct cdb_run *r)
{
    if (!r) return;
    free(r->x);
    free(r->h);
    free(r->qkv);
    free(r->att);
    free(r->mlp);
    free(r->s);
    free(r->proj);
    free(r);
}

/* Grows *p to hold at least n floats (contents are not kept). */
static int grow(float **p, size_t *cap, size_t n, cdb_err *e)
{
    float *q;
    size_t bytes;
    if (n <= *cap) return CLIPDB_OK;
    if (!cdb_mul_ok(n, sizeof(float), &bytes))
        return cdb_err_set(e, CLIPDB_ELIMIT, "activation buffer too large");
    q = malloc(bytes);
    if (!q) return cdb_err_set(e, CLIPDB_ENOMEM, "out of memory (activations, %zu bytes)", bytes);
    free(*p);
    *p = q;
    *cap = n;
    return CLIPDB_OK;
}

/* Product of a*b*c in size_t, or 0 on overflow (callers' sizes are small). */
static size_t prod3(size_t a, size_t b, size_t c)
{
    size_t ab, abc;
    if (!cdb_mul_ok(a, b, &ab) || !cdb_mul_ok(ab, c, &abc)) return 0;
    return abc;
}

/* Buffers one block needs for rows = nseq*T tokens. */
static int reserve_block(struct cdb_run *r, size_t rows, size_t d, size_t f, size_t T,
                         cdb_err *e)
{
    int rc;
    if ((rc = grow(&r->h, &r->cap_h, prod3(rows, d, 1), e))) return rc;
    if ((rc = grow(&r->qkv, &r->cap_qkv, prod3(rows, d, 3), e))) return rc;
    if ((rc = grow(&r->att, &r->cap_att, prod3(rows, d, 1), e))) return rc;
    if ((rc = grow(&r->mlp, &r->cap_mlp, prod3(rows, f, 1), e))) return rc;
    if ((rc = grow(&r->s, &r->cap_s, prod3(T, T, 1), e))) return rc;
    return CLIPDB_OK;
}

/* ---- elementwise kernels -------------------------------------------------- */

/* VL floats / VL int32 lanes: 8 (one AVX register) when the compiler may
** use AVX, else 4 (SSE/NEON), so the vector type never crosses an ABI it
** lacks. Loads and stores go through memcpy (unaligned). */
#if defined(__AVX__)
#define VL 8
#else
#define VL 4
#endif
typedef float vecf __attribute__((vector_size(VL * 4)));
typedef int32_t veci __attribute__((vector_size(VL * 4)));

static inline vecf vec_load(const float *p)
{
    vecf v;
    memcpy(&v, p, sizeof v);
    return v;
}
static inline void vec_store(float *p, vecf v) { memcpy(p, &v, sizeof v); }
static inline vecf vec_set1(float a) { return (vecf){0} + a; }
static inline float vec_hsum(vecf v)
{
    float s = 0.0f;
    for (int k = 0; k < VL; k++) s += v[k];
    return s;
}
static inline vecf vec_max(vecf a, vecf b)
{
    veci m = a > b; /* -1 where a > b */
    return (vecf)((m & (veci)a) | (~m & (veci)b));
}

/* exp(x) lane-wise: Cephes expf (range reduction by ln 2, degree-5
** polynomial; relative error about 2e-7 over [-87, 88]). Inputs are clamped
** to that range, so the result is finite, and 0 below -87.3. */
static inline vecf vec_exp(vecf x)
{
    const vecf hi = vec_set1(88.3762626647949f), lo = vec_set1(-88.3762626647949f);
    veci m;
    vecf fx, t, z, y;
    veci n;
    m = x > hi;
    x = (vecf)((m & (veci)hi) | (~m & (veci)x));
    m = x < lo;
    x = (vecf)((m & (veci)lo) | (~m & (veci)x));
    /* n = floor(x / ln 2 + 0.5) */
    fx = x * 1.44269504088896341f + 0.5f;
    t = __builtin_convertvector(__builtin_convertvector(fx, veci), vecf); /* trunc */
    m = t > fx;
    fx = t - (vecf)(m & (veci)vec_set1(1.0f));
    x = x - fx * 0.693359375f - fx * -2.12194440e-4f;
    z = x * x;
    y = vec_set1(1.9875691500e-4f);
    y = y * x + 1.3981999507e-3f;
    y = y * x + 8.3334519073e-3f;
    y = y * x + 4.1665795894e-2f;
    y = y * x + 1.6666665459e-1f;
    y = y * x + 5.0000001201e-1f;
    y = y * z + x + 1.0f;
    n = __builtin_convertvector(fx, veci);
    n = (n + 127) << 23; /* 2^n as float bits; n >= -127 here (0 -> 0.0f) */
    return y * (vecf)n;
}

static inline vecf vec_quick_gelu(vecf x)
{
    return x / (1.0f + vec_exp(x * -1.702f));
}

void cdb_add_bias(float *x, const float *bias, size_t rows, size_t n)
{
    size_t i, j;
    for (i = 0; i < rows; i++) {
        float *xr = x + i * n; /* (n) */
        for (j = 0; j + VL <= n; j += VL) vec_store(xr + j, vec_load(xr + j) + vec_load(bias + j));
        for (; j < n; j++) xr[j] += bias[j];
    }
}

/* x (rows, ld) columns [0, n) += bias (n). */
static void add_bias_strided(float *x, size_t ld, const float *bias, size_t rows, size_t n)
{
    size_t i, j;
    for (i = 0; i < rows; i++) {
        float *xr = x + i * ld;
        for (j = 0; j + VL <= n; j += VL) vec_store(xr + j, vec_load(xr + j) + vec_load(bias + j));
        for (; j < n; j++) xr[j] += bias[j];
    }
}

void cdb_quick_gelu(float *x, const float *bias, size_t rows, size_t n)
{
    size_t i, j;
    for (i = 0; i < rows; i++) {
        float *xr = x + i * n; /* (n) */
        for (j = 0; j + VL <= n; j += VL) {
            vecf v = vec_load(xr + j);
            if (bias) v += vec_load(bias + j);
            vec_store(xr + j, vec_quick_gelu(v));
        }
        if (j < n) { /* tail through the same vector code, zero-padded */
            float tmp[VL] = {0};
            size_t k, rest = n - j;
            for (k = 0; k < rest; k++) tmp[k] = xr[j + k] + (bias ? bias[j + k] : 0.0f);
            vec_store(tmp, vec_quick_gelu(vec_load(tmp)));
            memcpy(xr + j, tmp, rest * sizeof(float));
        }
    }
}

void cdb_softmax(float *v, size_t n, float scale)
{
    size_t j;
    float mx = v[0], sum;
    vecf vmax, vsum = vec_set1(0.0f), sc = vec_set1(scale), inv;
    if (n == 0) return;
    vmax = vec_set1(v[0]);
    for (j = 0; j + VL <= n; j += VL) vmax = vec_max(vmax, vec_load(v + j));
    for (int k = 0; k < VL; k++) mx = vmax[k] > mx ? vmax[k] : mx;
    for (; j < n; j++) mx = v[j] > mx ? v[j] : mx;
    /* scale > 0, so max(scale * v) = scale * max(v) */
    vmax = vec_set1(mx * scale);
    for (j = 0; j + VL <= n; j += VL) {
        vecf t = vec_exp(vec_load(v + j) * sc - vmax);
        vsum += t;
        vec_store(v + j, t);
    }
    sum = vec_hsum(vsum);
    if (j < n) {
        float tmp[VL];
        size_t k, rest = n - j;
        for (k = 0; k < VL; k++) tmp[k] = k < rest ? v[j + k] * scale - mx * scale : -1e30f;
        vec_store(tmp, vec_exp(vec_load(tmp)));
        for (k = 0; k < rest; k++) {
            v[j + k] = tmp[k];
            sum += tmp[k];
        }
    }
    inv = vec_set1(1.0f / sum);
    for (j = 0; j + VL <= n; j += VL) vec_store(v + j, vec_load(v + j) * inv);
    for (; j < n; j++) v[j] *= inv[0];
}

void cdb_layernorm(float *x, const float *bias, const float *w, const float *b,
                   float *y, size_t rows, size_t n)
{
    size_t i, j;
    for (i = 0; i < rows; i++) {
        float *xr = x + i * n, *yr = y + i * n; /* (n) each */
        vecf acc = vec_set1(0.0f), m8, r8;
        float mean, var, rstd, tail = 0.0f;
        if (bias) cdb_add_bias(xr, bias, 1, n);
        for (j = 0; j + VL <= n; j += VL) acc += vec_load(xr + j);
        for (; j < n; j++) tail += xr[j];
        mean = (vec_hsum(acc) + tail) / (float)n;
        m8 = vec_set1(mean);
        acc = vec_set1(0.0f);
        tail = 0.0f;
        for (j = 0; j + VL <= n; j += VL) {
            vecf dlt = vec_load(xr + j) - m8;
            acc += dlt * dlt;
        }
        for (; j < n; j++) tail += (xr[j] - mean) * (xr[j] - mean);
        var = (vec_hsum(acc) + tail) / (float)n;
        rstd = 1.0f / sqrtf(var + CDB_LN_EPS);
        r8 = vec_set1(rstd);
        for (j = 0; j + VL <= n; j += VL)
            vec_store(yr + j, (vec_load(xr + j) - m8) * r8 * vec_load(w + j) + vec_load(b + j));
        for (; j < n; j++) yr[j] = (xr[j] - mean) * rstd * w[j] + b[j];
    }
}

/* ---- the residual block --------------------------------------------------- */

/* Multi-head attention of nseq sequences of T tokens.
** qkv (nseq*T, 3d): q | k | v per token, biases added.
** att (nq*nseq, d): per sequence, nq = T query rows (qpos == NULL) or the
** single row qpos[s]. */
static void attention(struct cdb_run *r, const float *qkv, float *att, int d, int nseq,
                      int T, int causal, const int *qpos)
{
    const int heads = d / CDB_HEAD_DIM, ld = 3 * d;
    const float scale = 1.0f / sqrtf((float)CDB_HEAD_DIM);
    float *S = r->s; /* (nq, nk) scores of one (sequence, head) */
    int s, hh, i;
    for (s = 0; s < nseq; s++) {
        const float *base = qkv + (size_t)s * T * ld; /* (T, 3d) */
        const int q0 = qpos ? qpos[s] : 0;
        const int nq = qpos ? 1 : T;
        const int nk = (qpos && causal) ? q0 + 1 : T;
        float *out = att + (size_t)s * nq * d; /* (nq, d) */
        for (hh = 0; hh < heads; hh++) {
            const float *Q = base + (size_t)q0 * ld + hh * CDB_HEAD_DIM; /* (nq, hd), ld 3d */
            const float *K = base + d + hh * CDB_HEAD_DIM;               /* (nk, hd), ld 3d */
            const float *V = base + 2 * d + hh * CDB_HEAD_DIM;           /* (nk, hd), ld 3d */
            /* Q (nq, hd) @ K^T (hd, nk) -> S (nq, nk) */
            cdb_sgemm(CDB_NO_TRANS, CDB_TRANS, nq, nk, CDB_HEAD_DIM, 1.0f,
                        Q, ld, K, ld, 0.0f, S, nk);
            for (i = 0; i < nq; i++) {
                float *row = S + (size_t)i * nk; /* (nk) */
                int valid = (causal && !qpos) ? i + 1 : nk;
                cdb_softmax(row, (size_t)valid, scale);
                if (valid < nk) memset(row + valid, 0, (size_t)(nk - valid) * sizeof(float));
            }
            /* P (nq, nk) @ V (nk, hd) -> out[:, head] (nq, hd), ld d */
            cdb_sgemm(CDB_NO_TRANS, CDB_NO_TRANS, nq, CDB_HEAD_DIM, nk, 1.0f,
                        S, nk, V, ld, 0.0f, out + hh * CDB_HEAD_DIM, d);
        }
    }
}

int cdb_block_forward(struct cdb_run *r, const cdb_block *b, int d, int f, float *x,
                      int nseq, int T, int causal, const int *qpos, cdb_err *e)
{
    int rc, s, rows = nseq * T;
    if (d <= 0 || d % CDB_HEAD_DIM || f <= 0 || nseq <= 0 || T <= 0)
        return cdb_err_set(e, CLIPDB_EINVAL, "block: bad shape (d %d, f %d, %d x %d tokens)",
                           d, f, nseq, T);
    rc = reserve_block(r, (size_t)rows, (size_t)d, (size_t)f, (size_t)T, e);
    if (rc) return rc;

    /* h (rows, d) = ln_1(x) */
    cdb_layernorm(x, NULL, b->ln1_w, b->ln1_b, r->h, (size_t)rows, (size_t)d);
    /* qkv (rows, 3d) = h (rows, d) @ [Wq; Wk; Wv]^T (d, 3d) + [bq | bk | bv] */
    if (b->pk_qkv || (b->wk == b->wq + (size_t)d * d && b->wv == b->wk + (size_t)d * d)) {
        /* packed, or in_proj_weight (3d, d) contiguous: one GEMM */
        if ((rc = cdb_linear(b->pk_qkv, b->wq, rows, 3 * d, d, r->h, d, 0.0f, r->qkv, 3 * d, e)))
            return rc;
    } else {
        /* separate q/k/v_proj (d, d) each: h (rows, d) @ W^T (d, d) -> qkv[:, part] (rows, d), ld 3d */
        if ((rc = cdb_linear(NULL, b->wq, rows, d, d, r->h, d, 0.0f, r->qkv, 3 * d, e)) ||
            (rc = cdb_linear(NULL, b->wk, rows, d, d, r->h, d, 0.0f, r->qkv + d, 3 * d, e)) ||
            (rc = cdb_linear(NULL, b->wv, rows, d, d, r->h, d, 0.0f, r->qkv + 2 * d, 3 * d, e)))
            return rc;
    }
    add_bias_strided(r->qkv, (size_t)3 * d, b->bq, (size_t)rows, (size_t)d);
    add_bias_strided(r->qkv + d, (size_t)3 * d, b->bk, (size_t)rows, (size_t)d);
    add_bias_strided(r->qkv + 2 * d, (size_t)3 * d, b->bv, (size_t)rows, (size_t)d);

    /* att (rows', d) = attention; rows' = rows, or nseq with qpos */
    attention(r, r->qkv, r->att, d, nseq, T, causal, qpos);
    if (qpos) {
        /* keep only the needed token of each sequence: x (nseq*T, d) -> (nseq, d);
        ** row s moves from s*T + qpos[s] >= s, so a forward pass is safe */
        for (s = 0; s < nseq; s++)
            if ((size_t)s * T + qpos[s] != (size_t)s)
                memmove(x + (size_t)s * d, x + ((size_t)s * T + qpos[s]) * d,
                        (size_t)d * sizeof(float));
        rows = nseq;
    }
    /* x (rows, d) += att (rows, d) @ Wo^T (d, d) */
    if ((rc = cdb_linear(b->pk_o, b->wo, rows, d, d, r->att, d, 1.0f, x, d, e))) return rc;
    /* x += bo; h (rows, d) = ln_2(x) */
    cdb_layernorm(x, b->bo, b->ln2_w, b->ln2_b, r->h, (size_t)rows, (size_t)d);
    /* mlp (rows, f) = h (rows, d) @ W1^T (d, f); mlp = quick_gelu(mlp + b1) */
    if ((rc = cdb_linear(b->pk_fc1, b->fc1_w, rows, f, d, r->h, d, 0.0f, r->mlp, f, e)))
        return rc;
    cdb_quick_gelu(r->mlp, b->fc1_b, (size_t)rows, (size_t)f);
    /* x (rows, d) += mlp (rows, f) @ W2^T (f, d); x += b2 */
    if ((rc = cdb_linear(b->pk_fc2, b->fc2_w, rows, d, f, r->mlp, f, 1.0f, x, d, e))) return rc;
    cdb_add_bias(x, b->fc2_b, (size_t)rows, (size_t)d);
    return CLIPDB_OK;
}

/* h (n, d) = ln(x (n, d)); out (n, e) = h @ proj (d, e), or h @ proj^T with proj (e, d). */
static int final_ln_project(const cdb_tower *t, int e_dim, float *x, float *h, int n,
                            float *out, cdb_err *e)
{
    const int d = t->width;
    cdb_layernorm(x, NULL, t->ln_post_w, t->ln_post_b, h, (size_t)n, (size_t)d);
    if (t->pk_proj || t->proj_transposed) /* h (n, d) @ proj^T (d, e) -> out (n, e) */
        return cdb_linear(t->pk_proj, t->proj, n, e_dim, d, h, d, 0.0f, out, e_dim, e);
    /* h (n, d) @ proj (d, e) -> out (n, e) */
    cdb_sgemm(CDB_NO_TRANS, CDB_NO_TRANS, n, e_dim, d, 1.0f, h, d, t->proj,
                e_dim, 0.0f, out, e_dim);
    return CLIPDB_OK;
}

/* Runs the tower's blocks on x (nseq*T, d); with qpos the last block keeps
** only those positions, leaving x (nseq, d). */
static int run_blocks(struct cdb_run *r, const cdb_tower *t, int nseq, int T, int causal,
                      const int *qpos, cdb_err *e)
{
    int l, rc;
    for (l = 0; l < t->layers; l++) {
        rc = cdb_block_forward(r, &t->blocks[l], t->width, t->mlp, r->x, nseq, T, causal,
                               l == t->layers - 1 ? qpos : NULL, e);
        if (rc) return rc;
    }
    return CLIPDB_OK;
}

static int check_tower(const cdb_tower *t, const char *name, cdb_err *e)
{
    if (!t->blocks || t->layers < 1 || t->width <= 0 || t->width % CDB_HEAD_DIM || t->mlp <= 0)
        return cdb_err_set(e, CLIPDB_EINVAL, "%s tower is not loaded", name);
    return CLIPDB_OK;
}

/* ---- vision tower ------------------------------------------------------- */

int cdb_vision_forward(struct cdb_run *r, const cdb_vision *v, int embed_dim,
                       const float *pixels, int n, float *out, cdb_err *e)
{
    const int d = v->t.width, P = v->patch, G = v->grid, S = v->image_size, T = v->n_pos;
    const int np = G * G, K = 3 * P * P;
    int rc, i0, i, p, c, ky, *qpos = NULL;
    if ((rc = check_tower(&v->t, "vision", e))) return rc;
    if (P <= 0 || G <= 0 || G * P != S || T != np + 1)
        return cdb_err_set(e, CLIPDB_EINVAL, "vision tower has inconsistent sizes");
    if (n < 0) return cdb_err_set(e, CLIPDB_EINVAL, "negative image count");
    if (n == 0) return CLIPDB_OK;
    {
        const size_t nb = CDB_VISION_CHUNK, rows = nb * (size_t)T;
        if ((rc = grow(&r->x, &r->cap_x, rows * d, e))) return rc;
        if ((rc = reserve_block(r, rows, (size_t)d, (size_t)v->t.mlp, (size_t)T, e))) return rc;
        /* the patch matrix (nb*np, K) lives in the MLP buffer */
        if ((rc = grow(&r->mlp, &r->cap_mlp, nb * np * K, e)))
            return rc;
    }
    qpos = calloc(CDB_VISION_CHUNK, sizeof *qpos); /* all 0: the class token */
    if (!qpos) return cdb_err_set(e, CLIPDB_ENOMEM, "out of memory");
    for (i0 = 0; i0 < n; i0 += CDB_VISION_CHUNK) {
        const int nb = n - i0 < CDB_VISION_CHUNK ? n - i0 : CDB_VISION_CHUNK;
        float *patches = r->mlp; /* (nb*np, K), K = 3*P*P in conv1's (c, ky, kx) order */
        /* im2col: image i, patch (gy, gx) -> row i*np + gy*G + gx */
        for (i = 0; i < nb; i++) {
            const float *img = pixels + (size_t)(i0 + i) * 3 * S * S; /* (3, S, S) */
            for (p = 0; p < np; p++) {
                const int gy = p / G, gx = p % G;
                float *row = patches + ((size_t)i * np + p) * K;
                for (c = 0; c < 3; c++)
                    for (ky = 0; ky < P; ky++)
                        memcpy(row + (c * P + ky) * P,
                               img + ((size_t)c * S + (size_t)gy * P + ky) * S + (size_t)gx * P,
                               (size_t)P * sizeof(float));
            }
        }
        /* patches (nb*np, K) @ conv1^T (K, d) -> h (nb*np, d) */
        if ((rc = cdb_linear(v->pk_patch, v->patch_w, nb * np, d, K, patches, K, 0.0f, r->h, d,
                             e)))
            goto cleanup;
        /* x (nb*T, d): per image [class_emb; patch embeddings] + pos_emb (T, d) */
        for (i = 0; i < nb; i++) {
            float *xi = r->x + (size_t)i * T * d;
            for (c = 0; c < d; c++) xi[c] = v->class_emb[c] + v->pos_emb[c];
            for (p = 0; p < np; p++) {
                const float *src = r->h + ((size_t)i * np + p) * d;
                const float *pe = v->pos_emb + (size_t)(p + 1) * d;
                float *dst = xi + (size_t)(p + 1) * d;
                for (c = 0; c < d; c++) dst[c] = src[c] + pe[c];
            }
        }
        /* x = ln_pre(x) */
        cdb_layernorm(r->x, NULL, v->ln_pre_w, v->ln_pre_b, r->x, (size_t)nb * T, (size_t)d);
        /* blocks; the last keeps the class token only: x (nb, d) */
        if ((rc = run_blocks(r, &v->t, nb, T, 0, qpos, e))) goto cleanup;
        /* out (nb, e) = ln_post(x) @ proj */
        if ((rc = final_ln_project(&v->t, embed_dim, r->x, r->h, nb, out + (size_t)i0 * embed_dim,
                                   e)))
            goto cleanup;
    }
cleanup:
    free(qpos);
    return rc;
}

/* ---- text tower --------------------------------------------------------- */

typedef struct text_item {
    int index; /* position in the caller's arrays */
    int len;   /* tokens up to and including the end token (argmax + 1) */
} text_item;

static int cmp_item(const void *a, const void *b)
{
    const text_item *x = a, *y = b;
    if (x->len != y->len) return x->len < y->len ? -1 : 1;
    return x->index < y->index ? -1 : x->index > y->index;
}

/* Whether a group of cnt texts (lengths summing to sum) may take one more of
** length len (the group then runs at length len, the largest so far): at
** most CDB_TEXT_MAX_ROWS tokens, 64 texts, and padding within ~15%. */
static int group_accepts(int cnt, long sum, int len)
{
    long padded = (long)(cnt + 1) * len, real = sum + len;
    if (padded > CDB_TEXT_MAX_ROWS || cnt >= 64) return 0;
    return padded * 100 <= real * 115 + 200L * (cnt + 1);
}

int cdb_text_forward(struct cdb_run *r, const cdb_text *t, int embed_dim,
                     const int32_t *const *ids, const int *lens, int n, int full,
                     float *out, cdb_err *e)
{
    const int d = t->t.width, C = t->context;
    int rc, i, j, g0, *qpos = NULL;
    text_item *items = NULL;
    if ((rc = check_tower(&t->t, "text", e))) return rc;
    if (n < 0) return cdb_err_set(e, CLIPDB_EINVAL, "negative text count");
    if (n == 0) return CLIPDB_OK;
    items = malloc((size_t)n * sizeof *items);
    qpos = malloc((size_t)(n < 64 ? n : 64) * sizeof *qpos);
    if (!items || !qpos) {
        rc = cdb_err_set(e, CLIPDB_ENOMEM, "out of memory");
        goto cleanup;
    }
    for (i = 0; i < n; i++) {
        int best = 0;
        if (lens[i] < 1 || lens[i] > C) {
            rc = cdb_err_set(e, CLIPDB_EINVAL, "text %d: %d tokens (must be 1..%d)", i, lens[i], C);
            goto cleanup;
        }
        for (j = 0; j < lens[i]; j++) {
            if (ids[i][j] < 0 || ids[i][j] >= t->vocab) {
                rc = cdb_err_set(e, CLIPDB_EINVAL, "text %d: token id %d outside the vocabulary (%d)",
                                 i, (int)ids[i][j], t->vocab);
                goto cleanup;
            }
            if (ids[i][j] > ids[i][best]) best = j; /* first maximum, as torch.argmax */
        }
        items[i].index = i;
        items[i].len = best + 1;
    }
    if (!full) qsort(items, (size_t)n, sizeof *items, cmp_item);

    for (g0 = 0; g0 < n;) {
        int cnt = 1, L, g;
        long sum = items[g0].len;
        if (full) {
            /* CLIP's computation: all C positions of every text through every block */
            while (g0 + cnt < n && cnt < 64 && (long)(cnt + 1) * C <= CDB_TEXT_MAX_ROWS) cnt++;
            L = C;
        } else {
            while (g0 + cnt < n && group_accepts(cnt, sum, items[g0 + cnt].len))
                sum += items[g0 + cnt++].len;
            L = items[g0 + cnt - 1].len;
        }
        {
            const size_t rows = (size_t)cnt * L;
            if ((rc = grow(&r->x, &r->cap_x, rows * d, e))) goto cleanup;
            if ((rc = grow(&r->proj, &r->cap_proj, (size_t)cnt * embed_dim, e))) goto cleanup;
        }
        /* x (cnt*L, d): token embedding (vocab, d) rows + pos_emb (C, d); padding is id 0 */
        for (g = 0; g < cnt; g++) {
            const int idx = items[g0 + g].index;
            for (j = 0; j < L; j++) {
                const int32_t id = j < lens[idx] ? ids[idx][j] : 0;
                const float *te = t->tok_emb + (size_t)id * d, *pe = t->pos_emb + (size_t)j * d;
                float *dst = r->x + ((size_t)g * L + j) * d;
                int c;
                for (c = 0; c < d; c++) dst[c] = te[c] + pe[c];
            }
            qpos[g] = items[g0 + g].len - 1; /* the end token */
        }
        if (full) {
            if ((rc = run_blocks(r, &t->t, cnt, L, 1, NULL, e))) goto cleanup;
            for (g = 0; g < cnt; g++) /* x (cnt*L, d) -> (cnt, d): the end tokens */
                memmove(r->x + (size_t)g * d, r->x + ((size_t)g * L + qpos[g]) * d,
                        (size_t)d * sizeof(float));
        } else {
            /* causal: every text's end token sees only tokens 0..end, so the
            ** group runs at its own length and the last block keeps the end token */
            if ((rc = run_blocks(r, &t->t, cnt, L, 1, qpos, e))) goto cleanup;
        }
        /* proj (cnt, e) = ln_final(x (cnt, d)) @ text_projection */
        if ((rc = final_ln_project(&t->t, embed_dim, r->x, r->h, cnt, r->proj, e))) goto cleanup;
        for (g = 0; g < cnt; g++)
            memcpy(out + (size_t)items[g0 + g].index * embed_dim, r->proj + (size_t)g * embed_dim,
                   (size_t)embed_dim * sizeof(float));
        g0 += cnt;
    }
cleanup:
    free(items);
    free(qpos);
    return rc;
}

/* ---- public API -------------------------------------------------------------- */

static int ctx_ready(clipdb_ctx *c)
{
    if (!c->m) return cdb_err_set(&c->err, CLIPDB_EINVAL, "context has no model");
    if (!c->m->st)
        return cdb_err_set(&c->err, CLIPDB_EINVAL,
                           "model %s was opened without weights (tokenizer only); "
                           "open it with clipdb_model_open to encode",
                           c->m->dir ? c->m->dir : "");
    if (!c->run && !(c->run = cdb_run_new()))
        return cdb_err_set(&c->err, CLIPDB_ENOMEM, "out of memory");
    return CLIPDB_OK;
}

int clipdb_encode_images(clipdb_ctx *c, const float *pixels, int n, float *out)
{
    int rc;
    if (!c) return CLIPDB_EINVAL;
    cdb_err_clear(&c->err);
    if ((rc = ctx_ready(c))) return rc;
    if (n < 0 || (n > 0 && (!pixels || !out)))
        return cdb_err_set(&c->err, CLIPDB_EINVAL, "encode_images: bad arguments");
    return cdb_vision_forward(c->run, &c->m->vision, c->m->embed_dim, pixels, n, out, &c->err);
}

int clipdb_encode_texts(clipdb_ctx *c, const char *const *texts, int n, float *out)
{
    int rc = CLIPDB_OK, i, C;
    int32_t *buf = NULL;
    const int32_t **ids = NULL;
    int *lens = NULL;
    if (!c) return CLIPDB_EINVAL;
    cdb_err_clear(&c->err);
    if ((rc = ctx_ready(c))) return rc;
    if (n < 0 || (n > 0 && (!texts || !out)))
        return cdb_err_set(&c->err, CLIPDB_EINVAL, "encode_texts: bad arguments");
    if (n == 0) return CLIPDB_OK;
    C = c->m->text.context;
    buf = cdb_malloc_array((size_t)n * (size_t)C, sizeof *buf);
    ids = cdb_malloc_array((size_t)n, sizeof *ids);
    lens = cdb_malloc_array((size_t)n, sizeof *lens);
    if (!buf || !ids || !lens) {
        rc = cdb_err_set(&c->err, CLIPDB_ENOMEM, "out of memory");
        goto cleanup;
    }
    for (i = 0; i < n; i++) {
        ids[i] = buf + (size_t)i * C;
        /* CLIP's policy (tokenizer.c): empty text, non-UTF-8 and more than C
        ** tokens (unless clipdb_ctx_set_truncate) are errors */
        rc = cdb_tokenize_ctx(c, texts[i], buf + (size_t)i * C, C, &lens[i]);
        if (rc != CLIPDB_OK) {
            if (n > 1) cdb_err_prefix(&c->err, "text %d", i);
            goto cleanup;
        }
    }
    rc = cdb_text_forward(c->run, &c->m->text, c->m->embed_dim, ids, lens, n, 0, out, &c->err);
cleanup:
    free(buf);
    free(ids);
    free(lens);
    return rc;
}
