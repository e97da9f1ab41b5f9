/*
** transformer.c: the CLIP transformer (ViT image tower and causal text
** tower) and the public encode calls.
**
** One residual block function (cdb_block_forward) serves both towers. Matrix
** products go through the compute layer (compute.h: cdb_linear on the
** weights packed for the model's precision, cdb_sgemm) with the whole batch stacked into one GEMM
** (rows = sequences * tokens); the elementwise parts (layernorm, softmax,
** QuickGELU) are 4- or 8-lane vector loops (QuickGELU 16 under AVX-512)
** written with GCC/clang vector extensions so that they stay a small
** fraction of the time.
**
** Training (src/train) runs this same forward with activations kept
** (cdb_block_forward_keep, cdb_vision_embed, cdb_text_embed,
** cdb_final_ln_project); each op's backward sits right after its forward.
**
** Shapes: d = width, f = MLP width, T = tokens per sequence, nseq = sequences
** in the batch, rows = nseq * T, e = embedding size, hd = CDB_HEAD_DIM (head size).
*/
#include "compute/compute.h"
#include "compute/vexp.h"
#include <math.h>
#include <stdlib.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif

#include "model/transformer.h"

/* ---- per-context scratch -------------------------------------------------- */

struct cdb_run {
    float *x;     size_t cap_x;     /* (rows, d) residual stream */
    float *h;     size_t cap_h;     /* (rows, d) layernorm output; patch embeddings */
    float *qkv;   size_t cap_qkv;   /* (rows, 3d) q | k | v */
    float *att;   size_t cap_att;   /* (rows, d) attention output (heads concatenated) */
    float *mlp;   size_t cap_mlp;   /* (rows, f) MLP hidden; image patches */
    float *s;     size_t cap_s;     /* (nseq, T, T) attention scores, one (T, T) per sequence */
    float *proj;  size_t cap_proj;  /* (nseq, e) projected output of a text group */
    cdb_prec gemm;                  /* GEMMs on plain weights: fp32, or bf16 (training) */
    int gemm_rc;                    /* first failed bf16 GEMM since the last check ... */
    cdb_err gemm_err;               /* ... and its message (see gemm()) */
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

void cdb_run_set_gemm(struct cdb_run *r, cdb_prec prec)
{
    r->gemm = prec == CDB_PREC_BF16 ? CDB_PREC_BF16 : CDB_PREC_FP32;
}

/* The GEMMs of the forward and backward on plain (unpacked) operands:
** cdb_sgemm, or cdb_sgemm_bf16 when r->gemm says bf16 (training with
** --precision bf16). Called from the pool's threads too, so a bf16 failure
** (out of memory) is kept, first one wins, in r->gemm_rc / gemm_err, and the
** op that ran the GEMMs returns it through gemm_status(). */
static void gemm(struct cdb_run *r, cdb_trans ta, cdb_trans tb, int m, int n, int k,
                 float alpha, const float *A, int lda, const float *B, int ldb, float beta,
                 float *C, int ldc)
{
    cdb_err e;
    int rc, zero = 0;
    if (r->gemm != CDB_PREC_BF16) {
        cdb_sgemm(ta, tb, m, n, k, alpha, A, lda, B, ldb, beta, C, ldc);
        return;
    }
    cdb_err_clear(&e);
    rc = cdb_sgemm_bf16(ta, tb, m, n, k, alpha, A, lda, B, ldb, beta, C, ldc, &e);
    if (rc && __atomic_compare_exchange_n(&r->gemm_rc, &zero, rc, 0, __ATOMIC_ACQ_REL,
                                          __ATOMIC_ACQUIRE))
        r->gemm_err = e;
}

/* CLIPDB_OK, or the first GEMM failure since the last call (then cleared). */
static int gemm_status(struct cdb_run *r, cdb_err *e)
{
    const int rc = r->gemm_rc;
    if (!rc) return CLIPDB_OK;
    r->gemm_rc = 0;
    return cdb_err_set(e, rc, "%s", r->gemm_err.msg);
}

/* cdb_linear, with plain weights (pk == NULL) through gemm(): x (m, n_in) @ W^T (n_in, n_out) -> y (m, n_out) */
static int linear(struct cdb_run *r, const cdb_wpack *pk, const float *W, int m, int n_out,
                  int n_in, const float *x, int ldx, float beta, float *y, int ldy, cdb_err *e)
{
    if (pk || r->gemm != CDB_PREC_BF16)
        return cdb_linear(pk, W, m, n_out, n_in, x, ldx, beta, y, ldy, e);
    if (m <= 0) return CLIPDB_OK;
    gemm(r, CDB_NO_TRANS, CDB_TRANS, m, n_out, n_in, 1.0f, x, ldx, W, n_in, beta, y, ldy);
    return gemm_status(r, e);
}

/* Grows *p to hold at least n floats (contents are not kept). */
static int grow(float **p, size_t *cap, size_t n, cdb_err *e)
{
    size_t bytes;
    if (!cdb_mul_ok(n, sizeof(float), &bytes))
        return cdb_err_set(e, CLIPDB_ELIMIT, "activation buffer too large");
    if (cdb_reserve((void **)p, cap, n, sizeof **p))
        return cdb_err_set(e, CLIPDB_ENOMEM, "out of memory (activations, %zu bytes)", bytes);
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
    /* one (T, T) score matrix per sequence: attention runs sequences in parallel */
    if ((rc = grow(&r->s, &r->cap_s, prod3(rows / (T ? T : 1), T, T), e))) return rc;
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

/* exp(x) lane-wise (Cephes expf; compute/vexp.h). */
CDB_DEFINE_VEXP(, vec_exp, vecf, veci)

/* QuickGELU is elementwise (no sum across lanes), so it may run on wider
** vectors than the reductions without changing a bit: VLW lanes, 16 (one
** AVX-512 register) where the compiler may use AVX-512 (measured, one
** thread: 2.2 -> 1.2 ms for 800 x 3072). The reductions (layernorm,
** softmax) stay at VL: their lane count sets their summation order. */
#if defined(__AVX512F__)
#define VLW 16
#else
#define VLW VL
#endif
typedef float vecw __attribute__((vector_size(VLW * 4)));
typedef int32_t veciw __attribute__((vector_size(VLW * 4)));
#if VLW != VL
CDB_DEFINE_VEXP(, vecw_exp, vecw, veciw)
#else
#define vecw_exp vec_exp
#endif
CDB_DEFINE_VQUICK_GELU(, vec_quick_gelu, vecw, vecw_exp)

/* ---- splitting the kernels over threads (run_tasks) ----------------------
** Each kernel below is a serial loop over rows (or columns) written for a
** range, and a public entry that cuts the range into one piece per thread
** (OpenMP's, or the process pool's: run_tasks). The pieces are disjoint and every row (column) is computed as the
** serial loop computes it, so the results do not depend on the split or the
** thread count (bit for bit). Small calls stay on the calling thread. */

/* Below this many floats of work a kernel is not split (a pool round trip
** costs microseconds). */
#define PAR_MIN_FLOATS 16384

/* The arguments of one kernel call (each kernel uses the fields it names). */
typedef struct kargs {
    float *x, *y, *dx, *dw, *db;
    const float *bias, *w, *b, *dy, *in;
    double *stats;      /* layernorm backward: (rows, 2) mean, rstd */
    size_t ld, n, rows;
} kargs;

typedef void (*span_fn)(const kargs *k, size_t lo, size_t hi);

typedef struct span_job {
    span_fn fn;
    const kargs *k;
    size_t count, per;
} span_job;

/* Runs fn(arg, i) for every i in [0, n) in parallel. Built with OpenMP
** (gcc; see the Makefile), on the OpenMP threads oneDNN runs the GEMMs on:
** with a second set of threads (the process pool) the GEMM's OpenMP threads
** spin, waiting for their next region, on the cores the pool's threads need
** for the kernels between the GEMMs (measured, 2 cores, bf16 texts: most
** of the samples in libgomp's spin loop; OMP_WAIT_POLICY=PASSIVE ran 2-3x
** faster). Without OpenMP (clang), on the process pool. */
static void run_tasks(size_t n, cdb_pool_fn fn, void *arg)
{
#ifdef _OPENMP
    size_t i;
#pragma omp parallel for schedule(dynamic, 1)
    for (i = 0; i < n; i++) fn(arg, i);
#else
    cdb_pool_run(n, fn, arg);
#endif
}

/* The threads run_tasks runs on. */
static int task_threads(void)
{
#ifdef _OPENMP
    return omp_in_parallel() ? 1 : omp_get_max_threads();
#else
    return cdb_pool_threads();
#endif
}

static void span_task(void *arg, size_t t)
{
    const span_job *j = arg;
    const size_t lo = t * j->per, hi = lo + j->per < j->count ? lo + j->per : j->count;
    if (lo < hi) j->fn(j->k, lo, hi);
}

/* fn over [0, count) rows or columns, `floats` the size of the work. */
static void par_span(span_fn fn, const kargs *k, size_t count, size_t floats)
{
    const size_t th = (size_t)task_threads();
    span_job j = {fn, k, count, 0};
    if (th < 2 || count < 2 || floats < PAR_MIN_FLOATS) {
        if (count) fn(k, 0, count);
        return;
    }
    j.per = (count + th - 1) / th;
    run_tasks((count + j.per - 1) / j.per, span_task, &j);
}

/* rows [lo, hi) of x (rows, ld), columns [0, n): += bias (n) */
static void add_bias_span(const kargs *k, size_t lo, size_t hi)
{
    const size_t n = k->n;
    size_t i, j;
    for (i = lo; i < hi; i++) {
        float *xr = k->x + i * k->ld;
        for (j = 0; j + VL <= n; j += VL)
            vec_store(xr + j, vec_load(xr + j) + vec_load(k->bias + j));
        for (; j < n; j++) xr[j] += k->bias[j];
    }
}

void cdb_add_bias(float *x, const float *bias, size_t rows, size_t n)
{
    const kargs k = {.x = x, .bias = bias, .ld = n, .n = n};
    par_span(add_bias_span, &k, rows, rows * n);
}

/* x (rows, ld) columns [0, n) += bias (n). */
static void add_bias_strided(float *x, size_t ld, const float *bias, size_t rows, size_t n)
{
    const kargs k = {.x = x, .bias = bias, .ld = ld, .n = n};
    par_span(add_bias_span, &k, rows, rows * n);
}

static void quick_gelu_span(const kargs *k, size_t lo, size_t hi);

void cdb_quick_gelu(float *x, const float *bias, size_t rows, size_t n)
{
    const kargs k = {.x = x, .bias = bias, .n = n};
    par_span(quick_gelu_span, &k, rows, rows * n);
}

/* rows [lo, hi) of cdb_quick_gelu */
static void quick_gelu_span(const kargs *k, size_t lo, size_t hi)
{
    float *x = k->x + lo * k->n;
    const float *bias = k->bias;
    const size_t rows = hi - lo, n = k->n;
    size_t i, j;
    for (i = 0; i < rows; i++) {
        float *xr = x + i * n; /* (n) */
        for (j = 0; j + VLW <= n; j += VLW) {
            vecw v, b;
            memcpy(&v, xr + j, sizeof v);
            if (bias) {
                memcpy(&b, bias + j, sizeof b);
                v += b;
            }
            v = vec_quick_gelu(v);
            memcpy(xr + j, &v, sizeof v);
        }
        if (j < n) { /* tail through the same vector code, zero-padded */
            float tmp[VLW] = {0};
            vecw v;
            size_t q, rest = n - j;
            for (q = 0; q < rest; q++) tmp[q] = xr[j + q] + (bias ? bias[j + q] : 0.0f);
            memcpy(&v, tmp, sizeof v);
            v = vec_quick_gelu(v);
            memcpy(xr + j, &v, rest * sizeof(float));
        }
    }
}

/* Backward of y = quick_gelu(pre + bias) on rows of n, in place:
** d (rows, n) <- d * g'(pre + bias), g(v) = v s(v), s = sigmoid(1.702 v),
** g'(v) = s + 1.702 v s (1 - s). pre is the kept GEMM output, without bias. */
static void quick_gelu_backward_span(const kargs *k, size_t lo, size_t hi);

void cdb_quick_gelu_backward(float *d, const float *pre, const float *bias, size_t rows,
                             size_t n)
{
    const kargs k = {.x = d, .in = pre, .bias = bias, .n = n};
    par_span(quick_gelu_backward_span, &k, rows, rows * n);
}

/* rows [lo, hi) of cdb_quick_gelu_backward */
static void quick_gelu_backward_span(const kargs *k, size_t lo, size_t hi)
{
    float *d = k->x + lo * k->n;
    const float *pre = k->in + lo * k->n, *bias = k->bias;
    const size_t rows = hi - lo, n = k->n;
    size_t i, j;
    for (i = 0; i < rows; i++) {
        const float *pr = pre + i * n; /* (n) */
        float *dr = d + i * n;
        for (j = 0; j + VL <= n; j += VL) {
            vecf v = vec_load(pr + j), sg;
            if (bias) v += vec_load(bias + j);
            sg = 1.0f / (1.0f + vec_exp(v * -1.702f));
            vec_store(dr + j, vec_load(dr + j) * (sg + 1.702f * v * sg * (1.0f - sg)));
        }
        for (; j < n; j++) {
            const float v = pr[j] + (bias ? bias[j] : 0.0f);
            const float sg = 1.0f / (1.0f + expf(-1.702f * v));
            dr[j] *= sg + 1.702f * v * sg * (1.0f - sg);
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

static void layernorm_span(const kargs *k, size_t lo, size_t hi);

void cdb_layernorm(float *x, const float *bias, const float *w, const float *b,
                   float *y, size_t rows, size_t n)
{
    const kargs k = {.x = x, .bias = bias, .w = w, .b = b, .y = y, .n = n};
    par_span(layernorm_span, &k, rows, rows * n);
}

/* rows [lo, hi) of cdb_layernorm */
static void layernorm_span(const kargs *k, size_t lo, size_t hi)
{
    const float *bias = k->bias, *w = k->w, *b = k->b;
    const size_t n = k->n;
    size_t i, j;
    for (i = lo; i < hi; i++) {
        float *xr = k->x + i * n, *yr = k->y + i * n; /* (n) each */
        vecf acc = vec_set1(0.0f), m8, r8;
        float mean, var, rstd, tail = 0.0f;
        if (bias) {
            const kargs one = {.x = xr, .bias = bias, .ld = n, .n = n};
            add_bias_span(&one, 0, 1);
        }
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

/* Backward of y = layernorm(x) * w + b for rows of n (llm.c layernorm_backward):
** mean and rstd are recomputed from the kept input x (rows, n);
**   dw (n) += sum_rows dy * xhat, db (n) += sum_rows dy   (skipped when NULL)
**   dx (rows, n) += rstd * (dy*w - mean(dy*w) - xhat * mean(dy*w * xhat))
** dx may be NULL (nothing below needs it). Two passes, each split over the
** pool: rows (their mean and rstd, and dx), then columns (dw and db, each
** column summed over the rows in order, as a serial loop would). */
static void ln_bwd_rows_span(const kargs *k, size_t lo, size_t hi)
{
    const size_t n = k->n;
    size_t i, j;
    for (i = lo; i < hi; i++) {
        const float *xr = k->in + i * n, *dyr = k->dy + i * n; /* (n) each */
        double mean = 0.0, var = 0.0, sdn = 0.0, sdnx = 0.0;
        float rstd;
        for (j = 0; j < n; j++) mean += xr[j];
        mean /= (double)n;
        for (j = 0; j < n; j++) var += (xr[j] - mean) * (xr[j] - mean);
        rstd = (float)(1.0 / sqrt(var / (double)n + CDB_LN_EPS));
        k->stats[2 * i] = mean;
        k->stats[2 * i + 1] = rstd;
        if (!k->dx) continue;
        for (j = 0; j < n; j++) {
            float xhat = (float)(xr[j] - mean) * rstd, dn = dyr[j] * k->w[j];
            sdn += dn;
            sdnx += dn * xhat;
        }
        {
            float *dxr = k->dx + i * n;
            const float mdn = (float)(sdn / (double)n), mdnx = (float)(sdnx / (double)n);
            for (j = 0; j < n; j++) {
                float xhat = (float)(xr[j] - mean) * rstd;
                dxr[j] += rstd * (dyr[j] * k->w[j] - mdn - xhat * mdnx);
            }
        }
    }
}

/* columns [lo, hi): dw, db += over all rows */
static void ln_bwd_cols_span(const kargs *k, size_t lo, size_t hi)
{
    const size_t n = k->n;
    size_t i, j;
    for (i = 0; i < k->rows; i++) {
        const float *xr = k->in + i * n, *dyr = k->dy + i * n;
        const double mean = k->stats[2 * i];
        const float rstd = (float)k->stats[2 * i + 1];
        for (j = lo; j < hi; j++) {
            float xhat = (float)(xr[j] - mean) * rstd;
            if (k->dw) k->dw[j] += dyr[j] * xhat;
            if (k->db) k->db[j] += dyr[j];
        }
    }
}

void cdb_layernorm_backward(float *dx, float *dw, float *db, const float *dy, const float *x,
                            const float *w, size_t rows, size_t n)
{
    double one[2];
    kargs k = {.dx = dx, .dw = dw, .db = db, .dy = dy, .in = x, .w = w, .n = n, .rows = rows};
    size_t i;
    if (!rows || (!dx && !dw && !db)) return;
    k.stats = rows > 1 ? cdb_malloc_array(rows, 2 * sizeof(double)) : one;
    if (!k.stats) { /* out of memory: row by row on this thread (same numbers) */
        for (i = 0; i < rows; i++)
            cdb_layernorm_backward(dx ? dx + i * n : NULL, dw, db, dy + i * n, x + i * n, w, 1, n);
        return;
    }
    par_span(ln_bwd_rows_span, &k, rows, rows * n);
    if (dw || db) par_span(ln_bwd_cols_span, &k, n, rows * n);
    if (k.stats != one) free(k.stats);
}

/* db (n) += sum over rows of dy (rows, ld), columns [0, n): the bias gradient. */
static void bias_backward_span(const kargs *k, size_t lo, size_t hi)
{
    size_t i, j;
    for (i = 0; i < k->rows; i++)
        for (j = lo; j < hi; j++) k->db[j] += k->dy[i * k->ld + j];
}

void cdb_bias_backward(float *db, const float *dy, size_t ld, size_t rows, size_t n)
{
    const kargs k = {.db = db, .dy = dy, .ld = ld, .n = n, .rows = rows};
    if (db) par_span(bias_backward_span, &k, n, rows * n); /* split by columns */
}

/* ---- the residual block --------------------------------------------------- */

/* Multi-head attention of nseq sequences of T tokens, one pool task per
** sequence (its heads in turn, its GEMMs single-threaded: the pool keeps
** the cores busy). A sequence's scores live in its own (T, T) of r->s, or
** in the kept probabilities keep_p (nseq, heads, T, T) when training.
** qkv (nseq*T, 3d): q | k | v per token, biases added.
** att (nq*nseq, d): per sequence, nq = T query rows (qpos == NULL) or the
** single row qpos[s]. */
typedef struct att_job {
    struct cdb_run *r;
    const float *qkv, *P, *datt; /* P: the kept probabilities (backward) */
    float *att, *dqkv, *keep_p;
    int d, T, causal;
    const int *qpos;
} att_job;

static void attention_seq(void *arg, size_t seq)
{
    const att_job *j = arg;
    struct cdb_run *r = j->r;
    const int d = j->d, T = j->T, causal = j->causal, s = (int)seq;
    const int *qpos = j->qpos;
    const int heads = d / CDB_HEAD_DIM, ld = 3 * d;
    const float scale = 1.0f / sqrtf((float)CDB_HEAD_DIM);
    const float *base = j->qkv + (size_t)s * T * ld; /* (T, 3d) */
    const int q0 = qpos ? qpos[s] : 0;
    const int nq = qpos ? 1 : T;
    const int nk = (qpos && causal) ? q0 + 1 : T;
    float *out = j->att + (size_t)s * nq * d; /* (nq, d) */
    float *S = r->s + (size_t)s * T * T;      /* (nq, nk) scores of one head */
    const int saved = cdb_compute_serial_enter();
    int hh, i;
    for (hh = 0; hh < heads; hh++) {
        const float *Q = base + (size_t)q0 * ld + hh * CDB_HEAD_DIM; /* (nq, hd), ld 3d */
        const float *K = base + d + hh * CDB_HEAD_DIM;               /* (nk, hd), ld 3d */
        const float *V = base + 2 * d + hh * CDB_HEAD_DIM;           /* (nk, hd), ld 3d */
        if (j->keep_p) S = j->keep_p + ((size_t)s * heads + hh) * T * T; /* kept (T, T) */
        /* Q (nq, hd) @ K^T (hd, nk) -> S (nq, nk) */
        gemm(r, CDB_NO_TRANS, CDB_TRANS, nq, nk, CDB_HEAD_DIM, 1.0f, Q, ld, K, ld, 0.0f, S, nk);
        for (i = 0; i < nq; i++) {
            float *row = S + (size_t)i * nk; /* (nk) */
            int valid = (causal && !qpos) ? i + 1 : nk;
            cdb_softmax(row, (size_t)valid, scale);
            if (valid < nk) memset(row + valid, 0, (size_t)(nk - valid) * sizeof(float));
        }
        /* P (nq, nk) @ V (nk, hd) -> out[:, head] (nq, hd), ld d */
        gemm(r, CDB_NO_TRANS, CDB_NO_TRANS, nq, CDB_HEAD_DIM, nk, 1.0f, S, nk, V, ld, 0.0f,
             out + hh * CDB_HEAD_DIM, d);
    }
    cdb_compute_serial_leave(saved);
}

static void attention(struct cdb_run *r, const float *qkv, float *att, int d, int nseq,
                      int T, int causal, const int *qpos, float *keep_p)
{
    att_job j = {.r = r, .qkv = qkv, .att = att, .keep_p = keep_p, .d = d, .T = T,
                 .causal = causal, .qpos = qpos};
    run_tasks((size_t)nseq, attention_seq, &j);
}

/* Backward of attention (all T query rows; as above without qpos), per
** (sequence, head), with P (T, T) the kept probabilities and scale 1/sqrt(hd):
**   dV = P^T dO;  dP = dO V^T;  dS = P * (dP - rowsum(dP * P));
**   dQ = scale dS K;  dK = scale dS^T Q
** (masked entries have P = 0, so dS = 0 there). datt (rows, d) -> dqkv (rows, 3d),
** written, not accumulated. One pool task per sequence; its dP (T, T) is
** its own part of r->s. */
static void attention_backward_seq(void *arg, size_t seq)
{
    const att_job *j = arg;
    struct cdb_run *r = j->r;
    const int d = j->d, T = j->T, s = (int)seq;
    const int heads = d / CDB_HEAD_DIM, ld = 3 * d;
    const float scale = 1.0f / sqrtf((float)CDB_HEAD_DIM);
    const float *base = j->qkv + (size_t)s * T * ld; /* (T, 3d) */
    float *dbase = j->dqkv + (size_t)s * T * ld;     /* (T, 3d) */
    const float *dO_s = j->datt + (size_t)s * T * d; /* (T, d) */
    float *dP = r->s + (size_t)s * T * T;            /* (T, T) */
    const int saved = cdb_compute_serial_enter();
    int hh, i, c;
    for (hh = 0; hh < heads; hh++) {
        const float *Pm = j->P + ((size_t)s * heads + hh) * T * T; /* (T, T) */
        const float *Q = base + hh * CDB_HEAD_DIM;                 /* (T, hd), ld 3d */
        const float *K = base + d + hh * CDB_HEAD_DIM;
        const float *V = base + 2 * d + hh * CDB_HEAD_DIM;
        const float *dO = dO_s + hh * CDB_HEAD_DIM;                /* (T, hd), ld d */
        float *dQ = dbase + hh * CDB_HEAD_DIM, *dK = dbase + d + hh * CDB_HEAD_DIM;
        float *dV = dbase + 2 * d + hh * CDB_HEAD_DIM;
        /* P^T (T, T) @ dO (T, hd) -> dV (T, hd), ld 3d */
        gemm(r, CDB_TRANS, CDB_NO_TRANS, T, CDB_HEAD_DIM, T, 1.0f, Pm, T, dO, d, 0.0f, dV, ld);
        /* dO (T, hd) @ V^T (hd, T) -> dP (T, T) */
        gemm(r, CDB_NO_TRANS, CDB_TRANS, T, T, CDB_HEAD_DIM, 1.0f, dO, d, V, ld, 0.0f, dP, T);
        for (i = 0; i < T; i++) { /* dP <- scale * P * (dP - sum_j dP P) */
            const float *pr = Pm + (size_t)i * T;
            float *dr = dP + (size_t)i * T, dot = 0.0f;
            for (c = 0; c < T; c++) dot += pr[c] * dr[c];
            for (c = 0; c < T; c++) dr[c] = scale * pr[c] * (dr[c] - dot);
        }
        /* dS (T, T) @ K (T, hd) -> dQ (T, hd), ld 3d */
        gemm(r, CDB_NO_TRANS, CDB_NO_TRANS, T, CDB_HEAD_DIM, T, 1.0f, dP, T, K, ld, 0.0f, dQ, ld);
        /* dS^T (T, T) @ Q (T, hd) -> dK (T, hd), ld 3d */
        gemm(r, CDB_TRANS, CDB_NO_TRANS, T, CDB_HEAD_DIM, T, 1.0f, dP, T, Q, ld, 0.0f, dK, ld);
    }
    cdb_compute_serial_leave(saved);
}

static void attention_backward(struct cdb_run *r, const float *qkv, const float *P,
                               const float *datt, float *dqkv, int d, int nseq, int T)
{
    att_job j = {.r = r, .qkv = qkv, .P = P, .datt = datt, .dqkv = dqkv, .d = d, .T = T};
    run_tasks((size_t)nseq, attention_backward_seq, &j);
}

int cdb_block_forward(struct cdb_run *r, const cdb_block *b, int d, int f, float *x,
                      int nseq, int T, int causal, const int *qpos, cdb_err *e)
{
    return cdb_block_forward_keep(r, b, d, f, x, nseq, T, causal, qpos, NULL, e);
}

/* The block, keeping its activations in *keep when keep != NULL (training;
** qpos must then be NULL): the block's buffers are then the record's, so
** the computation is the one above, unchanged. */
int cdb_block_forward_keep(struct cdb_run *r, const cdb_block *b, int d, int f, float *x,
                           int nseq, int T, int causal, const int *qpos,
                           const cdb_block_acts *keep, cdb_err *e)
{
    int rc, s, rows = nseq * T;
    float *own_h, *own_qkv, *own_att, *own_mlp; /* r's buffers, while a record's are used */
    /* bf16 and int8 packs add the biases (and QuickGELU) in the GEMM's own
    ** pass (cdb_linear_ep); else separate passes, as fp32 always does. The
    ** q/k/v biases fuse when they are one (3d) vector (in_proj_bias). */
    const int fuse_qkv = cdb_linear_fuses(b->pk_qkv) && b->bk == b->bq + d && b->bv == b->bk + d;
    const int fuse_fc1 = cdb_linear_fuses(b->pk_fc1), fuse_fc2 = cdb_linear_fuses(b->pk_fc2);
    if (d <= 0 || d % CDB_HEAD_DIM || f <= 0 || nseq <= 0 || T <= 0)
        return cdb_err_set(e, CLIPDB_EINVAL, "block: bad shape (d %d, f %d, %d x %d tokens)",
                           d, f, nseq, T);
    rc = reserve_block(r, (size_t)rows, (size_t)d, (size_t)f, (size_t)T, e);
    if (rc) return rc;
    own_h = r->h, own_qkv = r->qkv, own_att = r->att, own_mlp = r->mlp;
    if (keep && qpos) return cdb_err_set(e, CLIPDB_EINVAL, "block: kept activations need all tokens");
    if (keep) {
        memcpy(keep->x_in, x, (size_t)rows * d * sizeof(float));
        r->h = keep->h1, r->qkv = keep->qkv, r->att = keep->att, r->mlp = keep->pre;
    }

    /* h (rows, d) = ln_1(x) */
    cdb_layernorm(x, NULL, b->ln1_w, b->ln1_b, r->h, (size_t)rows, (size_t)d);
    /* qkv (rows, 3d) = h (rows, d) @ [Wq; Wk; Wv]^T (d, 3d) + [bq | bk | bv] */
    if (fuse_qkv) {
        if ((rc = cdb_linear_ep(b->pk_qkv, rows, 3 * d, d, r->h, 0.0f, r->qkv, b->bq,
                                CDB_ACT_NONE, e)))
            goto cleanup;
    } else if (b->pk_qkv || (b->wk == b->wq + (size_t)d * d && b->wv == b->wk + (size_t)d * d)) {
        /* packed, or in_proj_weight (3d, d) contiguous: one GEMM */
        if ((rc = linear(r, b->pk_qkv, b->wq, rows, 3 * d, d, r->h, d, 0.0f, r->qkv, 3 * d, e)))
            goto cleanup;
    } else {
        /* separate q/k/v_proj (d, d) each: h (rows, d) @ W^T (d, d) -> qkv[:, part] (rows, d), ld 3d */
        if ((rc = linear(r, NULL, b->wq, rows, d, d, r->h, d, 0.0f, r->qkv, 3 * d, e)) ||
            (rc = linear(r, NULL, b->wk, rows, d, d, r->h, d, 0.0f, r->qkv + d, 3 * d, e)) ||
            (rc = linear(r, NULL, b->wv, rows, d, d, r->h, d, 0.0f, r->qkv + 2 * d, 3 * d, e)))
            goto cleanup;
    }
    if (!fuse_qkv) {
        add_bias_strided(r->qkv, (size_t)3 * d, b->bq, (size_t)rows, (size_t)d);
        add_bias_strided(r->qkv + d, (size_t)3 * d, b->bk, (size_t)rows, (size_t)d);
        add_bias_strided(r->qkv + 2 * d, (size_t)3 * d, b->bv, (size_t)rows, (size_t)d);
    }

    /* att (rows', d) = attention; rows' = rows, or nseq with qpos */
    attention(r, r->qkv, r->att, d, nseq, T, causal, qpos, keep ? keep->p : NULL);
    if ((rc = gemm_status(r, e))) goto cleanup;
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
    if ((rc = linear(r, b->pk_o, b->wo, rows, d, d, r->att, d, 1.0f, x, d, e))) goto cleanup;
    /* x += bo; h (rows, d) = ln_2(x) */
    if (keep) r->h = keep->h2;
    cdb_layernorm(x, b->bo, b->ln2_w, b->ln2_b, r->h, (size_t)rows, (size_t)d);
    if (keep) memcpy(keep->x_mid, x, (size_t)rows * d * sizeof(float));
    /* inference on packs that fuse: x (rows, d) += mlp(h) in one call, the
    ** (rows, f) activation never in fp32 (cdb_mlp_ep); else as below */
    if (fuse_fc1 && fuse_fc2 && !keep) { /* one precision per model open */
        rc = cdb_mlp_ep(b->pk_fc1, b->pk_fc2, rows, d, f, r->h, b->fc1_b, b->fc2_b, x, e);
        goto cleanup;
    }
    /* mlp (rows, f) = h (rows, d) @ W1^T (d, f); mlp = quick_gelu(mlp + b1) */
    if (fuse_fc1 && !keep) {
        rc = cdb_linear_ep(b->pk_fc1, rows, f, d, r->h, 0.0f, r->mlp, b->fc1_b,
                           CDB_ACT_QUICK_GELU, e);
    } else if (!(rc = linear(r, b->pk_fc1, b->fc1_w, rows, f, d, r->h, d, 0.0f, r->mlp, f, e))) {
        if (keep) { /* pre (rows, f) stays the GEMM output; gelu gets the activation */
            memcpy(keep->gelu, r->mlp, (size_t)rows * f * sizeof(float));
            r->mlp = keep->gelu;
        }
        cdb_quick_gelu(r->mlp, b->fc1_b, (size_t)rows, (size_t)f);
    }
    if (rc) goto cleanup;
    /* x (rows, d) += mlp (rows, f) @ W2^T (f, d); x += b2 */
    if (fuse_fc2) {
        rc = cdb_linear_ep(b->pk_fc2, rows, d, f, r->mlp, 1.0f, x, b->fc2_b, CDB_ACT_NONE, e);
    } else if (!(rc = linear(r, b->pk_fc2, b->fc2_w, rows, d, f, r->mlp, f, 1.0f, x, d, e))) {
        cdb_add_bias(x, b->fc2_b, (size_t)rows, (size_t)d);
    }
cleanup:
    /* the record's buffers were borrowed: give r its own back */
    r->h = own_h, r->qkv = own_qkv, r->att = own_att, r->mlp = own_mlp;
    return rc;
}

size_t cdb_block_acts_floats(int d, int f, int nseq, int T)
{
    const size_t rows = (size_t)nseq * T, heads = (size_t)d / CDB_HEAD_DIM;
    return rows * ((size_t)5 * d + (size_t)3 * d + (size_t)2 * f) +
           (size_t)nseq * heads * T * T;
}

void cdb_block_acts_carve(cdb_block_acts *a, float *buf, int d, int f, int nseq, int T)
{
    const size_t rows = (size_t)nseq * T, heads = (size_t)d / CDB_HEAD_DIM;
    a->x_in = buf;                 buf += rows * d;
    a->h1 = buf;                   buf += rows * d;
    a->qkv = buf;                  buf += rows * 3 * d;
    a->p = buf;                    buf += (size_t)nseq * heads * T * T;
    a->att = buf;                  buf += rows * d;
    a->x_mid = buf;                buf += rows * d;
    a->h2 = buf;                   buf += rows * d;
    a->pre = buf;                  buf += rows * f;
    a->gelu = buf;
}

/* Backward of the block (all tokens, as cdb_block_forward_keep ran it).
** dx (rows, d): on entry dL/d(block output), on return dL/d(block input)
** (if need_dx; else left unspecified). g: gradient views (accumulated into,
** +=); NULL fields are frozen and skipped. Scratch: r's block buffers.
**   out = x_mid + gelu(h2 W1^T + b1) W2^T + b2;  x_mid = x_in + att Wo^T + bo
** with qkv = h1 [Wq; Wk; Wv]^T + b, h1 = ln_1(x_in), h2 = ln_2(x_mid). */
int cdb_block_backward(struct cdb_run *r, const cdb_block *b, const cdb_block *g,
                       const cdb_block_acts *a, int d, int f, int nseq, int T, float *dx,
                       int need_dx, cdb_err *e)
{
    const int rows = nseq * T;
    float *dh = NULL, *dqkv = NULL, *datt = NULL, *dpre = NULL;
    int rc = reserve_block(r, (size_t)rows, (size_t)d, (size_t)f, (size_t)T, e);
    if (rc) return rc;
    dh = r->h, dqkv = r->qkv, datt = r->att, dpre = r->mlp;
    /* MLP: db2 += sum dx; dW2 (d, f) += dx^T (d, rows) @ gelu (rows, f) */
    cdb_bias_backward((float *)g->fc2_b, dx, (size_t)d, (size_t)rows, (size_t)d);
    if (g->fc2_w)
        gemm(r, CDB_TRANS, CDB_NO_TRANS, d, f, rows, 1.0f, dx, d, a->gelu, f, 1.0f,
                  (float *)g->fc2_w, f);
    /* dpre (rows, f) = dx (rows, d) @ W2 (d, f), times quick_gelu' */
    gemm(r, CDB_NO_TRANS, CDB_NO_TRANS, rows, f, d, 1.0f, dx, d, b->fc2_w, f, 0.0f, dpre, f);
    cdb_quick_gelu_backward(dpre, a->pre, b->fc1_b, (size_t)rows, (size_t)f);
    /* db1 += sum dpre; dW1 (f, d) += dpre^T (f, rows) @ h2 (rows, d) */
    cdb_bias_backward((float *)g->fc1_b, dpre, (size_t)f, (size_t)rows, (size_t)f);
    if (g->fc1_w)
        gemm(r, CDB_TRANS, CDB_NO_TRANS, f, d, rows, 1.0f, dpre, f, a->h2, d, 1.0f,
                  (float *)g->fc1_w, d);
    /* dh2 (rows, d) = dpre (rows, f) @ W1 (f, d) */
    gemm(r, CDB_NO_TRANS, CDB_NO_TRANS, rows, d, f, 1.0f, dpre, f, b->fc1_w, d, 0.0f, dh, d);
    /* dx_mid = dx + ln_2 backward */
    cdb_layernorm_backward(dx, (float *)g->ln2_w, (float *)g->ln2_b, dh, a->x_mid, b->ln2_w,
                           (size_t)rows, (size_t)d);
    /* attention output: dbo += sum dx; dWo (d, d) += dx^T (d, rows) @ att (rows, d) */
    cdb_bias_backward((float *)g->bo, dx, (size_t)d, (size_t)rows, (size_t)d);
    if (g->wo)
        gemm(r, CDB_TRANS, CDB_NO_TRANS, d, d, rows, 1.0f, dx, d, a->att, d, 1.0f,
                  (float *)g->wo, d);
    /* datt (rows, d) = dx (rows, d) @ Wo (d, d) */
    gemm(r, CDB_NO_TRANS, CDB_NO_TRANS, rows, d, d, 1.0f, dx, d, b->wo, d, 0.0f, datt, d);
    /* dqkv (rows, 3d) */
    attention_backward(r, a->qkv, a->p, datt, dqkv, d, nseq, T);
    cdb_bias_backward((float *)g->bq, dqkv, (size_t)3 * d, (size_t)rows, (size_t)d);
    cdb_bias_backward((float *)g->bk, dqkv + d, (size_t)3 * d, (size_t)rows, (size_t)d);
    cdb_bias_backward((float *)g->bv, dqkv + 2 * d, (size_t)3 * d, (size_t)rows, (size_t)d);
    /* dWq|dWk|dWv (3d, d) += dqkv^T (3d, rows) @ h1 (rows, d); the three are
    ** contiguous in the gradient buffer (the trainer lays them out so) */
    if (g->wq)
        gemm(r, CDB_TRANS, CDB_NO_TRANS, 3 * d, d, rows, 1.0f, dqkv, 3 * d, a->h1, d, 1.0f,
                  (float *)g->wq, d);
    if (!need_dx && !g->ln1_w && !g->ln1_b) return gemm_status(r, e);
    /* dh1 (rows, d) = dqkv (rows, 3d) @ [Wq; Wk; Wv] (3d, d) */
    if (b->wk == b->wq + (size_t)d * d && b->wv == b->wk + (size_t)d * d) {
        gemm(r, CDB_NO_TRANS, CDB_NO_TRANS, rows, d, 3 * d, 1.0f, dqkv, 3 * d, b->wq, d, 0.0f,
                  dh, d);
    } else { /* dqkv[:, part] (rows, d), ld 3d @ W (d, d), summed */
        gemm(r, CDB_NO_TRANS, CDB_NO_TRANS, rows, d, d, 1.0f, dqkv, 3 * d, b->wq, d, 0.0f,
                  dh, d);
        gemm(r, CDB_NO_TRANS, CDB_NO_TRANS, rows, d, d, 1.0f, dqkv + d, 3 * d, b->wk, d, 1.0f,
                  dh, d);
        gemm(r, CDB_NO_TRANS, CDB_NO_TRANS, rows, d, d, 1.0f, dqkv + 2 * d, 3 * d, b->wv, d,
                  1.0f, dh, d);
    }
    /* dx_in = dx_mid + ln_1 backward */
    cdb_layernorm_backward(need_dx ? dx : NULL, (float *)g->ln1_w, (float *)g->ln1_b, dh, a->x_in, b->ln1_w,
                           (size_t)rows, (size_t)d);
    return gemm_status(r, e);
}

/* h (n, d) = ln(x (n, d)); out (n, e) = h @ proj (d, e), or h @ proj^T with proj (e, d). */
int cdb_final_ln_project(struct cdb_run *r, const cdb_tower *t, int e_dim, float *x, float *h,
                         int n, float *out, cdb_err *e)
{
    const int d = t->width;
    cdb_layernorm(x, NULL, t->ln_post_w, t->ln_post_b, h, (size_t)n, (size_t)d);
    if (t->pk_proj || t->proj_transposed) /* h (n, d) @ proj^T (d, e) -> out (n, e) */
        return linear(r, t->pk_proj, t->proj, n, e_dim, d, h, d, 0.0f, out, e_dim, e);
    /* h (n, d) @ proj (d, e) -> out (n, e) */
    gemm(r, CDB_NO_TRANS, CDB_NO_TRANS, n, e_dim, d, 1.0f, h, d, t->proj,
                e_dim, 0.0f, out, e_dim);
    return gemm_status(r, e);
}

/* Backward of cdb_final_ln_project on n rows: x (n, d) the kept ln input, h (n, d)
** the kept ln output, dout (n, e). g->proj, g->ln_post_*: gradient views (+=;
** NULL = frozen). dx (n, d) is written (if not NULL). dh (n, d) is scratch. */
int cdb_final_ln_project_backward(struct cdb_run *r, const cdb_tower *t, const cdb_tower *g,
                                  int e_dim, const float *x, const float *h, const float *dout,
                                  int n, float *dh, float *dx, cdb_err *e)
{
    const int d = t->width;
    if (g->proj) {
        if (t->proj_transposed) /* dproj (e, d) += dout^T (e, n) @ h (n, d) */
            gemm(r, CDB_TRANS, CDB_NO_TRANS, e_dim, d, n, 1.0f, dout, e_dim, h, d, 1.0f,
                      (float *)g->proj, d);
        else /* dproj (d, e) += h^T (d, n) @ dout (n, e) */
            gemm(r, CDB_TRANS, CDB_NO_TRANS, d, e_dim, n, 1.0f, h, d, dout, e_dim, 1.0f,
                      (float *)g->proj, e_dim);
    }
    if (!dx && !g->ln_post_w && !g->ln_post_b) return gemm_status(r, e);
    if (t->proj_transposed) /* dout (n, e) @ proj (e, d) -> dh (n, d) */
        gemm(r, CDB_NO_TRANS, CDB_NO_TRANS, n, d, e_dim, 1.0f, dout, e_dim, t->proj, d, 0.0f,
                  dh, d);
    else /* dout (n, e) @ proj^T (e, d) -> dh (n, d) */
        gemm(r, CDB_NO_TRANS, CDB_TRANS, n, d, e_dim, 1.0f, dout, e_dim, t->proj, e_dim, 0.0f,
                  dh, d);
    if (dx) memset(dx, 0, (size_t)n * d * sizeof(float));
    cdb_layernorm_backward(dx, (float *)g->ln_post_w, (float *)g->ln_post_b, dh, x,
                           t->ln_post_w, (size_t)n, (size_t)d);
    return gemm_status(r, e);
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

/* im2col of nb images (nb, 3, S, S) into patches (nb*nk, K), K = 3*P*P in
** conv1's (c, ky, kx) order: image i, its j-th patch p = (gy, gx) -> row
** i*nk + j, p = keep[i*nk + j] (keep NULL: nk = G*G, p = j). */
static void im2col(const cdb_vision *v, const float *pixels, int nb, const int32_t *keep, int nk,
                   float *patches)
{
    const int P = v->patch, G = v->grid, S = v->image_size, K = 3 * P * P;
    int i, j, c, ky;
    for (i = 0; i < nb; i++) {
        const float *img = pixels + (size_t)i * 3 * S * S; /* (3, S, S) */
        for (j = 0; j < nk; j++) {
            const int p = keep ? keep[(size_t)i * nk + j] : j, gy = p / G, gx = p % G;
            float *row = patches + ((size_t)i * nk + j) * K;
            for (c = 0; c < 3; c++)
                for (ky = 0; ky < P; ky++)
                    memcpy(row + (c * P + ky) * P,
                           img + ((size_t)c * S + (size_t)gy * P + ky) * S + (size_t)gx * P,
                           (size_t)P * sizeof(float));
        }
    }
}

int cdb_vision_embed(struct cdb_run *r, const cdb_vision *v, const float *pixels, int nb,
                     const int32_t *keep, int nkeep, float *x0, float *x, cdb_err *e)
{
    const int d = v->t.width, P = v->patch, G = v->grid;
    const int np = keep ? nkeep : G * G, T = np + 1, K = 3 * P * P;
    float *patches, *sum = x0 ? x0 : x;
    int rc, i, p, c;
    /* the patch matrix (nb*np, K) lives in the MLP buffer, h (nb*np, d) in h */
    if ((rc = grow(&r->mlp, &r->cap_mlp, prod3((size_t)nb, (size_t)np, (size_t)K), e)) ||
        (rc = grow(&r->h, &r->cap_h, prod3((size_t)nb, (size_t)np, (size_t)d), e)))
        return rc;
    patches = r->mlp;
    im2col(v, pixels, nb, keep, np, patches);
    /* patches (nb*np, K) @ conv1^T (K, d) -> h (nb*np, d) */
    if ((rc = linear(r, v->pk_patch, v->patch_w, nb * np, d, K, patches, K, 0.0f, r->h, d, e)))
        return rc;
    /* sum (nb*T, d): per image [class_emb; patch embeddings] + pos_emb (T, d) */
    for (i = 0; i < nb; i++) {
        float *xi = sum + (size_t)i * T * d;
        for (c = 0; c < d; c++) xi[c] = v->class_emb[c] + v->pos_emb[c];
        for (p = 0; p < np; p++) {
            const float *src = r->h + ((size_t)i * np + p) * d;
            const float *pe = v->pos_emb + (size_t)(1 + (keep ? keep[(size_t)i * np + p] : p)) * d;
            float *dst = xi + (size_t)(p + 1) * d;
            for (c = 0; c < d; c++) dst[c] = src[c] + pe[c];
        }
    }
    /* x = ln_pre(sum) */
    cdb_layernorm(sum, NULL, v->ln_pre_w, v->ln_pre_b, x, (size_t)nb * T, (size_t)d);
    return CLIPDB_OK;
}

int cdb_vision_embed_backward(struct cdb_run *r, const cdb_vision *v, const cdb_vision *g,
                              const float *pixels, int nb, const int32_t *keep, int nkeep,
                              const float *x0, const float *dx, cdb_err *e)
{
    const int d = v->t.width, P = v->patch, G = v->grid;
    const int np = keep ? nkeep : G * G, T = np + 1, K = 3 * P * P;
    float *dx0, *dh;
    int rc, i, p, c;
    if ((rc = grow(&r->x, &r->cap_x, prod3((size_t)nb, (size_t)T, (size_t)d), e)) ||
        (rc = grow(&r->mlp, &r->cap_mlp, prod3((size_t)nb, (size_t)np, (size_t)K), e)) ||
        (rc = grow(&r->h, &r->cap_h, prod3((size_t)nb, (size_t)np, (size_t)d), e)))
        return rc;
    dx0 = r->x, dh = r->h;
    /* dx0 (nb*T, d) = ln_pre backward of dx */
    memset(dx0, 0, (size_t)nb * T * d * sizeof(float));
    cdb_layernorm_backward(dx0, (float *)g->ln_pre_w, (float *)g->ln_pre_b, dx, x0, v->ln_pre_w,
                           (size_t)nb * T, (size_t)d);
    /* class and position embeddings: summed over images */
    for (i = 0; i < nb; i++) {
        const float *di = dx0 + (size_t)i * T * d; /* (T, d) */
        if (g->class_emb)
            for (c = 0; c < d; c++) ((float *)g->class_emb)[c] += di[c];
        if (g->pos_emb) { /* row 0: the class token; row 1 + j: patch keep[j] (or j) */
            float *gp = (float *)g->pos_emb;
            for (c = 0; c < d; c++) gp[c] += di[c];
            for (p = 0; p < np; p++) {
                float *gq = gp + (size_t)(1 + (keep ? keep[(size_t)i * np + p] : p)) * d;
                const float *dq = di + (size_t)(p + 1) * d;
                for (c = 0; c < d; c++) gq[c] += dq[c];
            }
        }
        for (p = 0; p < np; p++) /* dh (nb*np, d): the patch rows */
            memcpy(dh + ((size_t)i * np + p) * d, di + (size_t)(p + 1) * d,
                   (size_t)d * sizeof(float));
    }
    if (g->patch_w) {
        im2col(v, pixels, nb, keep, np, r->mlp);
        /* dconv1 (d, K) += dh^T (d, nb*np) @ patches (nb*np, K) */
        gemm(r, CDB_TRANS, CDB_NO_TRANS, d, K, nb * np, 1.0f, dh, d, r->mlp, K, 1.0f,
                  (float *)g->patch_w, K);
    }
    return gemm_status(r, e);
}

int cdb_vision_forward(struct cdb_run *r, const cdb_vision *v, int embed_dim,
                       const float *pixels, int n, float *out, cdb_err *e)
{
    const int d = v->t.width, P = v->patch, G = v->grid, S = v->image_size, T = v->n_pos;
    const int np = G * G, K = 3 * P * P;
    int rc, i0, *qpos = NULL;
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
        /* x (nb*T, d) = ln_pre([class_emb; patches @ conv1^T] + pos_emb) */
        if ((rc = cdb_vision_embed(r, v, pixels + (size_t)i0 * 3 * S * S, nb, NULL, 0, NULL,
                                   r->x, e)))
            goto cleanup;
        /* blocks; the last keeps the class token only: x (nb, d) */
        if ((rc = run_blocks(r, &v->t, nb, T, 0, qpos, e))) goto cleanup;
        /* out (nb, e) = ln_post(x) @ proj */
        if ((rc = cdb_final_ln_project(r, &v->t, embed_dim, r->x, r->h, nb,
                                        out + (size_t)i0 * embed_dim, e)))
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
** most CDB_TEXT_MAX_ROWS tokens, CDB_TEXT_GROUP_MAX texts, and padding within ~15%. */
static int group_accepts(int cnt, long sum, int len)
{
    long padded = (long)(cnt + 1) * len, real = sum + len;
    if (padded > CDB_TEXT_MAX_ROWS || cnt >= CDB_TEXT_GROUP_MAX) return 0;
    return padded * 100 <= real * 115 + 200L * (cnt + 1);
}

void cdb_text_embed(const cdb_text *t, const int32_t *const *ids, const int *lens,
                    const int *index, int cnt, int L, float *x)
{
    const int d = t->t.width;
    int g, j, c;
    for (g = 0; g < cnt; g++) {
        const int idx = index ? index[g] : g;
        for (j = 0; j < L; j++) {
            const int32_t id = j < lens[idx] ? ids[idx][j] : 0;
            const float *te = t->tok_emb + (size_t)id * d, *pe = t->pos_emb + (size_t)j * d;
            float *dst = x + ((size_t)g * L + j) * d;
            for (c = 0; c < d; c++) dst[c] = te[c] + pe[c];
        }
    }
}

void cdb_text_embed_backward(const cdb_text *g, const int32_t *const *ids, const int *lens,
                             const int *index, int cnt, int L, const float *dx)
{
    const int d = g->t.width;
    int s, j, c;
    for (s = 0; s < cnt; s++) {
        const int idx = index ? index[s] : s;
        for (j = 0; j < L && j < lens[idx]; j++) { /* padding rows carry no text */
            const float *src = dx + ((size_t)s * L + j) * d;
            if (g->tok_emb) { /* only the rows used */
                float *te = (float *)g->tok_emb + (size_t)ids[idx][j] * d;
                for (c = 0; c < d; c++) te[c] += src[c];
            }
            if (g->pos_emb) {
                float *pe = (float *)g->pos_emb + (size_t)j * d;
                for (c = 0; c < d; c++) pe[c] += src[c];
            }
        }
    }
}

int cdb_text_forward(struct cdb_run *r, const cdb_text *t, int embed_dim,
                     const int32_t *const *ids, const int *lens, int n, int full,
                     float *out, cdb_err *e)
{
    const int d = t->t.width, C = t->context;
    int rc, i, j, g0, *qpos = NULL, *gidx = NULL;
    text_item *items = NULL;
    if ((rc = check_tower(&t->t, "text", e))) return rc;
    if (n < 0) return cdb_err_set(e, CLIPDB_EINVAL, "negative text count");
    if (n == 0) return CLIPDB_OK;
    items = malloc((size_t)n * sizeof *items);
    qpos = malloc((size_t)(n < CDB_TEXT_GROUP_MAX ? n : CDB_TEXT_GROUP_MAX) * sizeof *qpos);
    gidx = malloc((size_t)(n < CDB_TEXT_GROUP_MAX ? n : CDB_TEXT_GROUP_MAX) * sizeof *gidx);
    if (!items || !qpos || !gidx) {
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
            while (g0 + cnt < n && cnt < CDB_TEXT_GROUP_MAX && (long)(cnt + 1) * C <= CDB_TEXT_MAX_ROWS) cnt++;
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
        for (g = 0; g < cnt; g++) {
            gidx[g] = items[g0 + g].index;
            qpos[g] = items[g0 + g].len - 1; /* the end token */
        }
        /* x (cnt*L, d): token embedding (vocab, d) rows + pos_emb (C, d); padding is id 0 */
        cdb_text_embed(t, ids, lens, gidx, cnt, L, r->x);
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
        if ((rc = cdb_final_ln_project(r, &t->t, embed_dim, r->x, r->h, cnt, r->proj, e)))
            goto cleanup;
        for (g = 0; g < cnt; g++)
            memcpy(out + (size_t)items[g0 + g].index * embed_dim, r->proj + (size_t)g * embed_dim,
                   (size_t)embed_dim * sizeof(float));
        g0 += cnt;
    }
cleanup:
    free(items);
    free(qpos);
    free(gidx);
    return rc;
}
