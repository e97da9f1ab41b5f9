/*
** cvecs.c: compressed copies of a vector set for search (sq8, bf16, fp16),
** with fp32 re-ranking, so that "exact" search stays exact for the hits it
** returns.
**
** sq8 quantiser: per dimension, as Faiss's ScalarQuantizer QT_8bit: vmin[i]
** and step[i] = (vmax[i] - vmin[i]) / 255 over the set (or stored ranges);
** code = round((x - vmin) / step) clamped to [0, 255]; x^ = vmin + step *
** code (error <= step / 2 inside the range).
** bf16 / fp16: each value rounded to nearest even (fp16 clamps at +-65504).
**
** Approximate dot of a query q (d) with row x:
**   sq8   q.x^ = q.vmin + sum_i w_i code_i with w_i = q_i step_i; w is
**         itself quantised symmetrically, w_i ~ a * wq_i with wq_i in
**         [-127, 127] (a = max|w| / 127; 63 where oneDNN's int8 GEMM lacks
**         VNNI), so the sum is an exact u8 x s8 integer dot: vpdpbusd, 64
**         codes per instruction, reading n * d bytes (a quarter of fp32);
**   bf16 / fp16  sum_i x^_i q_i, fp32 query, fp32 accumulation.
** Ranking scores from it: dot; cosine: dot / |x^|; l2: 2 dot - |x^|^2
** (= |q|^2 - |q - x^|^2), with the norms of the decoded rows x^, not the
** exact ones: a row outside stored ranges (clamped codes) is then ranked as
** the point it was clamped to, consistently, instead of by a mix of its
** clamped dot and its true norm (which put a far row, searched for itself,
** last).
**
** Search:
**   fewer than CDB_CVECS_GEMM_MIN queries: one query at a time, rows split
**     across threads, the dot kernel (ckern.c) per block of CV_ROWS rows;
**   more: chunks of up to CV_QC queries, one worker thread each from start
**     to end: per tile of rows, a single-threaded matrix product of the
**     chunk's queries with the tile (sq8: oneDNN's u8 x s8 -> s32 GEMM;
**     bf16: the bf16 matmul; fp16: rows widened to fp32 and sgemm) into a
**     score tile that stays in cache (CV_TILE_BYTES), then the tile's
**     ranking scores, then the chunk's re-rank (see search_batched);
**   either way the best R = rerank candidates per query (R >= k) by the
**   approximate score are kept (bounded heaps keyed by row), then rescored
**   exactly against the fp32 rows (double accumulation: direct |q - x|^2
**   for l2, so a vector finds itself at distance 0) and the best k returned,
**   best first. A true neighbour is missed only if its approximate score falls
**   out of the top R (measured: tests/unit/test_cvecs.c, bench_search).
*/
#include <limits.h>
#if defined(__AVX512F__) || defined(__F16C__)
#include <immintrin.h>
#endif
#include <math.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>

#include "compute/compute.h"
#include "compute/convert.h"
#include "index/index.h"

#ifdef _OPENMP /* the Makefile builds this file with -fopenmp */
#include <omp.h>
#endif

#define CV_MAX_THREADS 16
#define CV_ROWS 256     /* rows per kernel call (one query) */
#define CV_QC 256       /* queries per chunk of the batched path */
#define CV_QC_WIDE 1024 /* the same where rows are widened to fp32 per tile */
#define CV_NB 4096      /* at most this many rows per score tile */
#define CV_TILE_BYTES (256 << 10) /* a score tile: stays in a core's L2 */
#define FP16_MAX 65504.0f

struct clipdb_cvecs {
    clipdb_compress kind;
    size_t n;
    int d;
    float *ranges;          /* sq8: (2, d): vmin then step; else NULL */
    float *norms;           /* (n) norms of the decoded rows |x^| (ranking only) */
    float *inv;             /* (n) 1 / |x^| (0 for a zero row): cosine without a division */
    void *codes;            /* sq8: u8 (n, d); bf16 / fp16: u16 (n, d) */
    const cdb_ckern *kern;
};

const char *clipdb_compress_name(clipdb_compress c)
{
    switch (c) {
    case CLIPDB_COMPRESS_NONE: return "none";
    case CLIPDB_COMPRESS_SQ8: return "sq8";
    case CLIPDB_COMPRESS_BF16: return "bf16";
    case CLIPDB_COMPRESS_FP16: return "fp16";
    }
    return "?";
}

int clipdb_compress_parse(const char *name, clipdb_compress *out)
{
    int c;
    for (c = CLIPDB_COMPRESS_NONE; c <= CLIPDB_COMPRESS_FP16; c++)
        if (name && !strcmp(name, clipdb_compress_name((clipdb_compress)c))) {
            *out = (clipdb_compress)c;
            return CLIPDB_OK;
        }
    return CLIPDB_EINVAL;
}

static size_t code_size(clipdb_compress kind)
{
    return kind == CLIPDB_COMPRESS_SQ8 ? 1 : 2;
}

void clipdb_cvecs_free(clipdb_cvecs *c)
{
    if (!c) return;
    free(c->ranges);
    free(c->norms);
    free(c->inv);
    free(c->codes);
    free(c);
}

/* Runs fn on each of nt jobs (job i at base + i * size): nt - 1 threads and
** this one; jobs whose thread could not start run here. */
static __attribute__((unused)) void run_jobs(void *(*fn)(void *), void *base, size_t size, int nt)
{
    pthread_t tid[CV_MAX_THREADS];
    int t, started = 0;
    for (t = 1; t < nt; t++) {
        if (pthread_create(&tid[t], NULL, fn, (char *)base + (size_t)t * size) != 0) break;
        started = t;
    }
    fn(base);
    for (t = 1; t <= started; t++) pthread_join(tid[t], NULL);
    for (t = started + 1; t < nt; t++) fn((char *)base + (size_t)t * size);
}

/* Runs the nt jobs as run_jobs, but on the OpenMP threads when built with
** OpenMP: those the GEMM just ran on (oneDNN's pool), which otherwise spin
** waiting for work while other threads score the block (on 2 cores a third
** of the time went to that spinning). */
static void run_jobs_pool(void *(*fn)(void *), void *base, size_t size, int nt)
{
#ifdef _OPENMP
    int t;
#pragma omp parallel for num_threads(nt) schedule(static, 1)
    for (t = 0; t < nt; t++) fn((char *)base + (size_t)t * size);
#else
    run_jobs(fn, base, size, nt);
#endif
}

/* One thread's share of clipdb_cvecs_build: the rows [r0, r1). */
typedef struct build_job {
    const clipdb_vecs *base;
    clipdb_cvecs *c;
    const float *inv; /* (d) sq8: 1 / step */
    float *lo, *hi;   /* (d) sq8 without ranges: minima and maxima of these rows */
    size_t r0, r1, bad;
} build_job;

/* sq8 without stored ranges: the minimum and maximum of each dimension over
** the job's rows (non-finite values are refused later, by encode_rows). */
static void *minmax_rows(void *arg)
{
    build_job *jb = arg;
    const int d = jb->c->d;
    size_t i;
    int j;

    for (j = 0; j < d; j++) {
        jb->lo[j] = INFINITY;
        jb->hi[j] = -INFINITY;
    }
    for (i = jb->r0; i < jb->r1; i++) {
        const float *x = jb->base->data + i * (size_t)d;
        for (j = 0; j < d; j++) {
            jb->lo[j] = fminf(jb->lo[j], x[j]);
            jb->hi[j] = fmaxf(jb->hi[j], x[j]);
        }
    }
    return NULL;
}

/* The job's codes and norms (c->ranges and inv ready for sq8). A row with a
** non-finite value stops the job: bad is that row (else SIZE_MAX), so the
** lowest over the jobs is the first bad row of the set, as a serial pass
** would find it. */
static void *encode_rows(void *arg)
{
    build_job *jb = arg;
    clipdb_cvecs *c = jb->c;
    const int d = c->d;
    const float *vmin = c->ranges, *step = c->ranges ? c->ranges + d : NULL;
    size_t i;
    int j;

    jb->bad = SIZE_MAX;
    for (i = jb->r0; i < jb->r1; i++) {
        const float *x = jb->base->data + i * (size_t)d;
        double n2 = 0;
        for (j = 0; j < d; j++)
            if (!isfinite(x[j])) {
                jb->bad = i;
                return NULL;
            }
        if (c->kind == CLIPDB_COMPRESS_SQ8) {
            uint8_t *code = (uint8_t *)c->codes + i * (size_t)d;
            for (j = 0; j < d; j++) {
                float v = nearbyintf((x[j] - vmin[j]) * jb->inv[j]), y;
                code[j] = (uint8_t)(v < 0 ? 0 : v > 255 ? 255 : v);
                y = vmin[j] + step[j] * (float)code[j];
                n2 += (double)y * y;
            }
        } else {
            uint16_t *h = (uint16_t *)c->codes + i * (size_t)d;
            for (j = 0; j < d; j++) {
                float v = x[j], y;
                if (c->kind == CLIPDB_COMPRESS_BF16) {
                    h[j] = cdb_f32_to_bf16(v);
                    y = cdb_bf16_to_f32(h[j]);
                } else {
                    h[j] = cdb_f32_to_fp16(v > FP16_MAX ? FP16_MAX : v < -FP16_MAX ? -FP16_MAX : v);
                    y = cdb_fp16_to_f32(h[j]);
                }
                n2 += (double)y * y;
            }
        }
        c->norms[i] = (float)sqrt(n2);
        c->inv[i] = c->norms[i] > 0 ? 1.0f / c->norms[i] : 0.0f;
    }
    return NULL;
}

int clipdb_cvecs_build(const clipdb_vecs *base, clipdb_compress kind, const float *ranges,
                       clipdb_cvecs **out, char **errmsg)
{
    clipdb_cvecs *c = NULL;
    cdb_err e;
    build_job jobs[CV_MAX_THREADS];
    size_t nd, bytes, bad = SIZE_MAX;
    int j, d, t, nt, rc = CLIPDB_OK;
    float *vmin, *step, *inv = NULL, *part = NULL;

    cdb_err_clear(&e);
    if (out) *out = NULL;
    if (!base || !out || (base->n && !base->data) || base->d < 1 || base->d > CLIPDB_MAX_DIM) {
        rc = cdb_err_set(&e, CLIPDB_EINVAL, "compressed copy: bad vector set");
        goto cleanup;
    }
    if (kind != CLIPDB_COMPRESS_SQ8 && kind != CLIPDB_COMPRESS_BF16 &&
        kind != CLIPDB_COMPRESS_FP16) {
        rc = cdb_err_set(&e, CLIPDB_EINVAL, "compressed copy: unknown kind %d", (int)kind);
        goto cleanup;
    }
    d = base->d;
    if (!cdb_mul_ok(base->n, (size_t)d, &nd) || !cdb_mul_ok(nd, code_size(kind), &bytes)) {
        rc = cdb_err_set(&e, CLIPDB_EINVAL, "compressed copy: sizes overflow");
        goto cleanup;
    }
    c = calloc(1, sizeof *c);
    if (!c || !(c->norms = cdb_malloc_array(base->n ? base->n : 1, sizeof(float))) ||
        !(c->inv = cdb_malloc_array(base->n ? base->n : 1, sizeof(float))) ||
        !(c->codes = malloc(bytes ? bytes : 1)) ||
        (kind == CLIPDB_COMPRESS_SQ8 &&
         (!(c->ranges = cdb_malloc_array(2 * (size_t)d, sizeof(float))) ||
          !(inv = cdb_malloc_array((size_t)d, sizeof *inv))))) {
        rc = cdb_err_set(&e, CLIPDB_ENOMEM, "compressed copy: out of memory (%zu bytes)", bytes);
        goto cleanup;
    }
    c->kind = kind;
    c->n = base->n;
    c->d = d;
    c->kern = cdb_ckern_best();
    /* the rows: contiguous runs, one a thread (each row's code and norm do
    ** not depend on the split, so the copy is the same for any thread count) */
    nt = cdb_compute_threads();
    if (nt > CV_MAX_THREADS) nt = CV_MAX_THREADS;
    if (nt < 1 || nd < CDB_CVECS_BUILD_MT) nt = 1;
    for (t = 0; t < nt; t++) {
        jobs[t].base = base;
        jobs[t].c = c;
        jobs[t].inv = inv;
        jobs[t].lo = jobs[t].hi = NULL;
        jobs[t].r0 = c->n * (size_t)t / (size_t)nt;
        jobs[t].r1 = c->n * (size_t)(t + 1) / (size_t)nt;
    }
    if (kind == CLIPDB_COMPRESS_SQ8) {
        vmin = c->ranges;
        step = c->ranges + d;
        if (ranges) {
            for (j = 0; j < d; j++)
                if (!isfinite(ranges[j]) || !isfinite(ranges[d + j]) || ranges[d + j] < 0) {
                    rc = cdb_err_set(&e, CLIPDB_EINVAL,
                                     "compressed copy: bad range of dimension %d", j);
                    goto cleanup;
                }
            memcpy(c->ranges, ranges, 2 * (size_t)d * sizeof(float));
        } else if (c->n == 0) {
            for (j = 0; j < d; j++) vmin[j] = step[j] = 0.0f;
        } else {
            if (!(part = cdb_malloc_array(2 * (size_t)nt * (size_t)d, sizeof *part))) {
                rc = cdb_err_set(&e, CLIPDB_ENOMEM, "compressed copy: out of memory");
                goto cleanup;
            }
            for (t = 0; t < nt; t++) {
                jobs[t].lo = part + 2 * (size_t)t * (size_t)d;
                jobs[t].hi = jobs[t].lo + d;
            }
            run_jobs_pool(minmax_rows, jobs, sizeof jobs[0], nt);
            for (j = 0; j < d; j++) {
                float lo = jobs[0].lo[j], hi = jobs[0].hi[j];
                for (t = 1; t < nt; t++) {
                    lo = fminf(lo, jobs[t].lo[j]);
                    hi = fmaxf(hi, jobs[t].hi[j]);
                }
                vmin[j] = lo;
                step[j] = (hi - lo) / 255.0f;
            }
        }
        for (j = 0; j < d; j++) inv[j] = step[j] > 0 ? 1.0f / step[j] : 0.0f;
    }
    run_jobs_pool(encode_rows, jobs, sizeof jobs[0], nt);
    for (t = 0; t < nt; t++)
        if (jobs[t].bad < bad) bad = jobs[t].bad;
    if (bad != SIZE_MAX)
        rc = cdb_err_set(&e, CLIPDB_EINVAL, "compressed copy: row %zu has a non-finite value",
                         bad);
cleanup:
    free(inv);
    free(part);
    if (rc != CLIPDB_OK) {
        clipdb_cvecs_free(c);
        if (errmsg) *errmsg = cdb_strdup(e.msg);
    } else {
        *out = c;
    }
    return rc;
}

clipdb_compress clipdb_cvecs_kind(const clipdb_cvecs *c)
{
    return c ? c->kind : CLIPDB_COMPRESS_NONE;
}

const float *clipdb_cvecs_ranges(const clipdb_cvecs *c)
{
    return c ? c->ranges : NULL;
}

size_t clipdb_cvecs_bytes(const clipdb_cvecs *c)
{
    if (!c) return 0;
    return c->n * (size_t)c->d * code_size(c->kind) + 2 * c->n * sizeof(float) +
           (c->ranges ? 2 * (size_t)c->d * sizeof(float) : 0);
}

const char *clipdb_cvecs_isa(const clipdb_cvecs *c)
{
    return c && c->kern ? c->kern->name : "c";
}

int cdb_cvecs_dim(const clipdb_cvecs *c)
{
    return c ? c->d : 0;
}

const void *cdb_cvecs_codes(const clipdb_cvecs *c, const float **norms)
{
    if (norms) *norms = c ? c->norms : NULL;
    return c ? c->codes : NULL;
}

void cdb_cvecs_set_kernels(clipdb_cvecs *c, const cdb_ckern *k)
{
    if (c) c->kern = k ? k : cdb_ckern_best();
}

/* ---- queries as the copy sees them ------------------------------------------ */

/* Query i of a search, prepared: sq8: q0 = q.vmin, scale a, wq (d) s8;
** bf16 (GEMM path): qh (d) bf16. */
typedef struct cv_query {
    float q0, a;
} cv_query;

static void prep_sq8(const clipdb_cvecs *c, const float *q, int qmax, cv_query *p, int8_t *wq)
{
    const float *vmin = c->ranges, *step = c->ranges + c->d;
    float amax = 0, q0 = 0, inv;
    int i;
    for (i = 0; i < c->d; i++) {
        float w = q[i] * step[i];
        q0 += q[i] * vmin[i];
        if (fabsf(w) > amax) amax = fabsf(w);
    }
    p->q0 = q0;
    p->a = amax > 0 ? amax / (float)qmax : 0.0f;
    inv = amax > 0 ? (float)qmax / amax : 0.0f;
    for (i = 0; i < c->d; i++) {
        float v = nearbyintf(q[i] * step[i] * inv);
        wq[i] = (int8_t)(v < -qmax ? -qmax : v > qmax ? qmax : v);
    }
}

/* Offers row r with ranking score sc to heap h (ids are ROW indexes);
** returns the heap's new entry threshold: the root's score once full, else
** -inf. Callers skip rows below it without calling (ties still come here,
** where the row index breaks them). */
static float offer(cdb_topk *t, size_t h, float sc, size_t r, const clipdb_filter *f)
{
    const clipdb_hit *root = &t->hits[h * (size_t)t->k];
    if (sc == sc && !(t->count[h] == t->k && !cdb_hit_better(sc, (int64_t)r, root->score, root->id)) &&
        (!f || cdb_filter_allows(f, (int64_t)r)))
        cdb_topk_push(t, h, sc, (int64_t)r);
    return t->count[h] == t->k ? root->score : -INFINITY;
}

/* The ranking score of row r is dot * mul[r] + add[r] (see the top):
** per-row factors of a block of rows for `metric`. */
static void rank_factors(const clipdb_cvecs *c, clipdb_metric m, size_t r0, size_t nb, float *mul,
                         float *add)
{
    size_t i;
    for (i = 0; i < nb; i++) {
        const float xn = c->norms[r0 + i];
        mul[i] = m == CLIPDB_METRIC_DOT ? 1.0f : m == CLIPDB_METRIC_COSINE ? c->inv[r0 + i] : 2.0f;
        add[i] = m == CLIPDB_METRIC_L2 ? -xn * xn : 0.0f;
    }
}

/* 16 lanes, as GCC / Clang vector extensions: one AVX-512 register (two
** AVX2 ones, or scalar code elsewhere). */
#define CHUNK 16
typedef float v16f __attribute__((vector_size(64)));
typedef int32_t v16i __attribute__((vector_size(64)));

static inline v16f load16f(const float *x)
{
    v16f v;
    memcpy(&v, x, sizeof v);
    return v;
}

/* 1 if any lane of sc is >= the lane of thr. */
static inline int any_ge(v16f sc, v16f thr)
{
#if defined(__AVX512F__) /* one compare into a mask register (-march=native here) */
    return _mm512_cmp_ps_mask((__m512)sc, (__m512)thr, _CMP_GE_OQ) != 0;
#else
    v16i ge = sc >= thr;
    int32_t any = 0;
    for (int u = 0; u < CHUNK; u++) any |= ge[u];
    return any != 0;
#endif
}

/* Offers the rows [r0, r0 + nb) with dots dot[] to heap h: 16 rows at a
** time are scored and compared with the threshold in vector registers; only
** a chunk with a row at or above it goes row by row. */
static void offer_rows(cdb_topk *t, size_t h, const float *dot, const float *mul, const float *add,
                       size_t r0, size_t nb, const clipdb_filter *f)
{
    const clipdb_hit *root = &t->hits[h * (size_t)t->k];
    float thr = t->count[h] == t->k ? root->score : -INFINITY;
    size_t i = 0, u;
    for (; i + CHUNK <= nb; i += CHUNK) {
        v16f sc = load16f(dot + i) * load16f(mul + i) + load16f(add + i);
        if (!any_ge(sc, thr - (v16f){0})) continue;
        for (u = 0; u < CHUNK; u++)
            if (sc[u] >= thr) thr = offer(t, h, sc[u], r0 + i + u, f);
    }
    for (; i < nb; i++) {
        float sc = dot[i] * mul[i] + add[i];
        if (sc >= thr) thr = offer(t, h, sc, r0 + i, f);
    }
}

/* ---- one query: the dot kernel over row ranges, one per thread ----------------- */

typedef struct scan_job {
    const clipdb_cvecs *c;
    const float *q;          /* bf16 / fp16: the fp32 query */
    const int8_t *wq;        /* sq8 */
    cv_query p;
    clipdb_metric metric;
    const clipdb_filter *filter;
    size_t r0, r1;
    cdb_topk t;              /* one heap of R candidates */
} scan_job;

static void *scan_rows(void *arg)
{
    scan_job *j = arg;
    const clipdb_cvecs *c = j->c;
    int32_t ib[CV_ROWS];
    float fb[CV_ROWS], mul[CV_ROWS], add[CV_ROWS];
    size_t r, i, nb;
    for (r = j->r0; r < j->r1; r += nb) {
        nb = j->r1 - r < CV_ROWS ? j->r1 - r : CV_ROWS;
        if (c->kind == CLIPDB_COMPRESS_SQ8) {
            // codes (nb, d) u8 . wq (d) s8 -> ib (nb) s32
            c->kern->dot_u8s8((const uint8_t *)c->codes + r * (size_t)c->d, nb, c->d, j->wq, ib);
            for (i = 0; i < nb; i++) fb[i] = j->p.q0 + j->p.a * (float)ib[i];
        } else {
            const uint16_t *x = (const uint16_t *)c->codes + r * (size_t)c->d;
            // rows (nb, d) half . q (d) f32 -> fb (nb)
            if (c->kind == CLIPDB_COMPRESS_BF16) c->kern->dot_bf16(x, nb, c->d, j->q, fb);
            else c->kern->dot_fp16(x, nb, c->d, j->q, fb);
        }
        rank_factors(c, j->metric, r, nb, mul, add);
        offer_rows(&j->t, 0, fb, mul, add, r, nb, j->filter);
    }
    return NULL;
}

/* ---- many queries: a matrix product per block, then the scores --------------------- */

typedef struct gemm_job {
    const clipdb_cvecs *c;
    const float *pq0, *pa;   /* (m) sq8: q . vmin and the scale a of each query */
    const void *S;           /* the block's products: sq8 s32 (nb, m); else f32 (m, nb) */
    const float *mul, *add;  /* (nb) rank factors of the block's rows */
    float *thr;              /* (m) entry thresholds of the heaps */
    size_t m, q0, q1;        /* this job's queries [q0, q1) of the m */
    size_t r0, nb;           /* rows [r0, r0 + nb) */
    const clipdb_filter *filter;
    cdb_topk *t;             /* m heaps */
} gemm_job;

static void *score_block(void *arg)
{
    gemm_job *j = arg;
    size_t r, i, u;
    if (j->c->kind == CLIPDB_COMPRESS_SQ8) {
        const int32_t *S = j->S;
        const float *pq0 = j->pq0, *pa = j->pa;
        float *thr = j->thr;
        const size_t m = j->m, q0 = j->q0, q1 = j->q1, nb = j->nb;
        /* rows outer: S (nb, m) is read in order; queries 16 at a time
        ** against their thresholds */
        for (r = 0; r < nb; r++) {
            const int32_t *Sr = S + r * m;
            const float mul = j->mul[r], add = j->add[r];
            for (i = q0; i + CHUNK <= q1; i += CHUNK) {
                v16i iv;
                v16f sc;
                memcpy(&iv, Sr + i, sizeof iv);
                // score = (q . vmin + a * idot) * mul + add, 16 queries
                sc = (load16f(pq0 + i) + load16f(pa + i) * __builtin_convertvector(iv, v16f)) *
                         mul + add;
                if (!any_ge(sc, load16f(thr + i))) continue;
                for (u = 0; u < CHUNK; u++)
                    if (sc[u] >= thr[i + u])
                        thr[i + u] = offer(j->t, i + u, sc[u], j->r0 + r, j->filter);
            }
            for (; i < q1; i++) {
                float sc = (pq0[i] + pa[i] * (float)Sr[i]) * mul + add;
                if (sc >= thr[i]) thr[i] = offer(j->t, i, sc, j->r0 + r, j->filter);
            }
        }
    } else {
        const float *S = j->S;
        for (i = j->q0; i < j->q1; i++)
            offer_rows(j->t, i, S + i * j->nb, j->mul, j->add, j->r0, j->nb, j->filter);
    }
    return NULL;
}

/* ---- re-rank ------------------------------------------------------------------------ */

/* The exact score of row r for query q (fp32 data, double accumulation), in
** the heaps' internal convention (l2: -|q - x|^2). Eight lanes of doubles
** (vector extensions: AVX-512 or two AVX registers where the compiler may use
** them), each lane summing every eighth term, then the lanes: the same
** products in double, summed in another order (the order a serial loop
** cannot be vectorised in without -ffast-math). */
typedef double v8d __attribute__((vector_size(64)));
typedef float v8f __attribute__((vector_size(32)));

static inline v8d load8d(const float *x)
{
    v8f v;
    memcpy(&v, x, sizeof v);
    return __builtin_convertvector(v, v8d);
}

static inline double hsum8d(v8d v)
{
    return ((v[0] + v[4]) + (v[1] + v[5])) + ((v[2] + v[6]) + (v[3] + v[7]));
}

static float exact_score(const clipdb_vecs *base, const float *q, double qn, size_t r,
                         clipdb_metric metric)
{
    const float *x = base->data + r * (size_t)base->d;
    v8d va = {0}, vx = {0};
    double a, xn2;
    int i = 0;
    if (metric == CLIPDB_METRIC_L2) { /* directly: a vector finds itself at exactly 0 */
        for (; i + 8 <= base->d; i += 8) {
            v8d t = load8d(q + i) - load8d(x + i);
            va += t * t;
        }
        a = hsum8d(va);
        for (; i < base->d; i++) {
            double t = (double)q[i] - x[i];
            a += t * t;
        }
        return (float)-a;
    }
    for (; i + 8 <= base->d; i += 8) {
        v8d xv = load8d(x + i);
        va += load8d(q + i) * xv;
        vx += xv * xv;
    }
    a = hsum8d(va);
    xn2 = hsum8d(vx);
    for (; i < base->d; i++) {
        a += (double)q[i] * x[i];
        xn2 += (double)x[i] * x[i];
    }
    if (metric == CLIPDB_METRIC_DOT) return (float)a;
    return qn > 0 && xn2 > 0 ? (float)(a / (qn * sqrt(xn2))) : 0.0f;
}

/* Asks the memory for row r of base (the re-rank reads rows in no order
** the hardware prefetcher could guess). */
static inline void prefetch_row(const clipdb_vecs *base, size_t r)
{
    const char *p = (const char *)(base->data + r * (size_t)base->d);
    for (size_t o = 0; o < (size_t)base->d * sizeof(float); o += 64) __builtin_prefetch(p + o);
}

/* Rescores the candidates of nh heaps of cand (R each, counts ccount) for
** query q exactly into fin (heap 0, k), ids mapped through base->ids; returns
** the number of hits. */
static int rerank(const clipdb_vecs *base, const float *q, clipdb_metric metric,
                  const clipdb_hit *cand, const int *ccount, int nh, int R, cdb_topk *fin)
{
    double qn = cdb_norm(q, (size_t)base->d);
    int h, i;
    *fin->count = 0;
    for (h = 0; h < nh; h++)
        for (i = 0; i < 2 && i < ccount[h]; i++) prefetch_row(base, (size_t)cand[(size_t)h * R + i].id);
    for (h = 0; h < nh; h++)
        for (i = 0; i < ccount[h]; i++) {
            size_t r = (size_t)cand[(size_t)h * R + i].id;
            if (i + 2 < ccount[h]) /* a later row's cache lines, while this one is scored */
                prefetch_row(base, (size_t)cand[(size_t)h * R + i + 2].id);
            cdb_topk_push(fin, 0, exact_score(base, q, qn, r, metric),
                          base->ids ? base->ids[r] : (int64_t)r);
        }
    cdb_topk_finish(fin, 0, metric);
    return *fin->count;
}

/* ---- search --------------------------------------------------------------------------- */

static int search_one_by_one(const clipdb_cvecs *c, const clipdb_vecs *base,
                             const float *queries, size_t nq, int k, int R, int nt,
                             clipdb_metric metric, const clipdb_filter *filter, clipdb_hit *out,
                             int *n_out, cdb_err *e)
{
    scan_job jobs[CV_MAX_THREADS];
    clipdb_hit *cand = cdb_malloc_array((size_t)nt * R, sizeof *cand);
    int *ccount = calloc((size_t)nt + 1, sizeof *ccount);
    int8_t *wq = malloc((size_t)c->d);
    size_t qi;
    int t, rc = CLIPDB_OK;
    if (!cand || !ccount || !wq) {
        rc = cdb_err_set(e, CLIPDB_ENOMEM, "compressed search: out of memory");
        goto cleanup;
    }
    for (qi = 0; qi < nq; qi++) {
        const float *q = queries + qi * (size_t)c->d;
        cdb_topk fin = {out + qi * (size_t)k, ccount + nt, k};
        cv_query p = {0, 0};
        int got;
        if (c->kind == CLIPDB_COMPRESS_SQ8) prep_sq8(c, q, cdb_int8_weight_max(), &p, wq);
        for (t = 0; t < nt; t++) {
            ccount[t] = 0;
            jobs[t] = (scan_job){c, q, wq, p, metric, filter,
                                 c->n * (size_t)t / (size_t)nt, c->n * (size_t)(t + 1) / (size_t)nt,
                                 {cand + (size_t)t * R, ccount + t, R}};
        }
        run_jobs_pool(scan_rows, jobs, sizeof jobs[0], nt);
        got = rerank(base, q, metric, cand, ccount, nt, R, &fin);
        if (qi == 0 || got < *n_out) *n_out = got;
    }
cleanup:
    free(cand);
    free(ccount);
    free(wq);
    return rc;
}

/* Many queries: chunks of at most CV_QC queries, each one worker's job from
** start to end (the workers take the next chunk as they finish one, so a
** core that other processes slow down does less): for every tile of rows, a
** single-threaded matrix product of the chunk's queries with the tile's rows
** into a score tile small enough to stay in the core's cache (CV_TILE_BYTES),
** the tile's ranking scores offered to the chunk's heaps at once, then the
** chunk's re-rank. No step waits for another thread (before: one threaded
** GEMM per 1024 x 4096 block, a 16 MB score block written and read back
** from memory, a barrier after each block and a single-threaded re-rank:
** measured on 2 cores, the GEMM was about half of the time). */
typedef struct batch_ctx {
    const clipdb_cvecs *c;
    const clipdb_vecs *base;
    const float *queries;
    size_t nq, qc;           /* queries, and per chunk */
    size_t next;             /* the next chunk to take (atomic) */
    int k, R, use_bf16;
    clipdb_metric metric;
    const clipdb_filter *filter;
    clipdb_hit *out;
} batch_ctx;

typedef struct batch_job {
    batch_ctx *x;
    int rc, n_out;           /* n_out: fewest hits of its queries (INT_MAX: none done) */
    cdb_err e;
} batch_job;

/* The rows of a score tile for m queries: CV_TILE_BYTES of scores, a
** multiple of 64 in [64, CV_NB]. */
static size_t tile_rows(size_t m)
{
    size_t nb = CV_TILE_BYTES / (4 * (m ? m : 1)) / 64 * 64;
    return nb < 64 ? 64 : nb > CV_NB ? CV_NB : nb;
}

/* Queries [q0, q0 + m) of x: the tiles, their scores, the re-rank. Buffers
** are the worker's (sized for x->qc queries and tile_rows(1) rows). */
typedef struct batch_buf {
    clipdb_hit *cand;        /* (qc, R) heaps */
    int *ccount;             /* (qc + 1) */
    void *qc;                /* sq8: wq (qc, d) s8; bf16: (qc, d) bf16 */
    void *S;                 /* score tile */
    float *wide;             /* fp16 (bf16 without a bf16 matmul): tile rows widened */
    float *mul, *add, *thr, *pq0, *pa;
} batch_buf;

/* h (n) fp16 or bf16 -> w (n) f32, exactly. fp16 through F16C 8 at a time
** where the compiler may use it (-march=native on x86): each worker widens
** every row of the set once per chunk. */
static void widen(const uint16_t *h, size_t n, clipdb_compress kind, float *w)
{
    size_t i = 0;
    if (kind != CLIPDB_COMPRESS_FP16) {
        for (; i < n; i++) w[i] = cdb_bf16_to_f32(h[i]);
        return;
    }
#if defined(__F16C__)
    for (; i + 8 <= n; i += 8)
        _mm256_storeu_ps(w + i, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(h + i))));
#endif
    for (; i < n; i++) w[i] = cdb_fp16_to_f32(h[i]);
}

static int batch_chunk(batch_job *j, batch_buf *b, size_t q0, size_t m)
{
    const batch_ctx *x = j->x;
    const clipdb_cvecs *c = x->c;
    const size_t d = (size_t)c->d, nb_max = tile_rows((m + CHUNK - 1) / CHUNK * CHUNK);
    const float *Q = x->queries + q0 * d;
    cdb_topk heaps = {b->cand, b->ccount, x->R};
    gemm_job g;
    size_t r0, i;
    int rc;

    /* sq8: the queries padded to mp, a multiple of CHUNK, with zero rows
    ** whose thresholds (+inf) take nothing, so that score_block scores
    ** every row's queries 16 at a time, none left over one by one */
    const size_t mp = c->kind == CLIPDB_COMPRESS_SQ8 ? (m + CHUNK - 1) / CHUNK * CHUNK : m;
    for (i = 0; i < mp; i++) {
        b->ccount[i] = 0;
        b->thr[i] = i < m ? -INFINITY : INFINITY;
        if (c->kind == CLIPDB_COMPRESS_SQ8 && i < m) {
            cv_query p;
            prep_sq8(c, Q + i * d, cdb_int8_weight_max(), &p, (int8_t *)b->qc + i * d);
            b->pq0[i] = p.q0;
            b->pa[i] = p.a;
        } else if (c->kind == CLIPDB_COMPRESS_SQ8) {
            memset((int8_t *)b->qc + i * d, 0, d);
            b->pq0[i] = b->pa[i] = 0.0f;
        }
    }
    if (x->use_bf16) cdb_convert_best()->to_bf16(Q, m * d, b->qc);
    for (r0 = 0; r0 < c->n; r0 += nb_max) {
        const size_t nb = c->n - r0 < nb_max ? c->n - r0 : nb_max;
        if (c->kind == CLIPDB_COMPRESS_SQ8) {
            // codes (nb, d) u8 @ wq^T (d, mp) s8 -> S (nb, mp) s32
            rc = cdb_gemm_u8s8s32((int)nb, (int)mp, (int)d, (const uint8_t *)c->codes + r0 * d,
                                  b->qc, b->S, &j->e);
        } else if (x->use_bf16) {
            // q (m, d) bf16 @ rows^T (d, nb) bf16 -> S (m, nb) f32
            rc = cdb_gemm_bf16((int)m, (int)nb, (int)d, b->qc,
                               (const uint16_t *)c->codes + r0 * d, b->S, &j->e);
        } else {
            widen((const uint16_t *)c->codes + r0 * d, nb * d, c->kind, b->wide);
            // q (m, d) f32 @ rows^T (d, nb) f32 -> S (m, nb) f32
            cdb_sgemm(CDB_NO_TRANS, CDB_TRANS, (int)m, (int)nb, (int)d, 1.0f, Q, (int)d,
                      b->wide, (int)d, 0.0f, b->S, (int)nb);
            rc = CLIPDB_OK;
        }
        if (rc != CLIPDB_OK) return rc;
        rank_factors(c, x->metric, r0, nb, b->mul, b->add);
        g = (gemm_job){c, b->pq0, b->pa, b->S, b->mul, b->add, b->thr, mp, 0, mp, r0, nb,
                       x->filter, &heaps};
        score_block(&g);
    }
    for (i = 0; i < m; i++) {
        cdb_topk fin = {x->out + (q0 + i) * (size_t)x->k, b->ccount + mp, x->k};
        int got = rerank(x->base, Q + i * d, x->metric, b->cand + i * (size_t)x->R, &b->ccount[i],
                         1, x->R, &fin);
        if (got < j->n_out) j->n_out = got;
    }
    return CLIPDB_OK;
}

static void *batch_worker(void *arg)
{
    batch_job *j = arg;
    batch_ctx *x = j->x;
    const clipdb_cvecs *c = x->c;
    const size_t d = (size_t)c->d, qc = (x->qc + CHUNK - 1) / CHUNK * CHUNK, nb_max = tile_rows(1);
    const size_t nchunks = (x->nq + x->qc - 1) / x->qc;
    batch_buf b = {0};
    size_t ch;
    /* the products run on this thread alone: the workers are the parallelism */
    const int saved = cdb_compute_serial_enter();

    b.cand = cdb_malloc_array(qc * (size_t)x->R, sizeof *b.cand);
    b.ccount = calloc(qc + 1, sizeof *b.ccount);
    b.qc = cdb_malloc_array(qc * d, c->kind == CLIPDB_COMPRESS_SQ8 ? 1 : 2);
    /* m * tile_rows(m) <= max(CV_TILE_BYTES / 4, 64 m) for every m <= qc */
    b.S = cdb_malloc_array(CV_TILE_BYTES / 4 > 64 * qc ? CV_TILE_BYTES / 4 : 64 * qc, 4);
    b.mul = cdb_malloc_array(nb_max, sizeof *b.mul);
    b.add = cdb_malloc_array(nb_max, sizeof *b.add);
    b.thr = cdb_malloc_array(qc, sizeof *b.thr);
    b.pq0 = cdb_malloc_array(qc, sizeof *b.pq0);
    b.pa = cdb_malloc_array(qc, sizeof *b.pa);
    if (c->kind != CLIPDB_COMPRESS_SQ8 && !x->use_bf16)
        b.wide = cdb_malloc_array(nb_max * d, sizeof *b.wide);
    if (!b.cand || !b.ccount || !b.qc || !b.S || !b.mul || !b.add || !b.thr || !b.pq0 ||
        !b.pa || (c->kind != CLIPDB_COMPRESS_SQ8 && !x->use_bf16 && !b.wide)) {
        j->rc = cdb_err_set(&j->e, CLIPDB_ENOMEM, "compressed search: out of memory");
        goto cleanup;
    }
    while ((ch = __atomic_fetch_add(&x->next, 1, __ATOMIC_RELAXED)) < nchunks) {
        const size_t q0 = ch * x->qc, m = x->nq - q0 < x->qc ? x->nq - q0 : x->qc;
        if ((j->rc = batch_chunk(j, &b, q0, m)) != CLIPDB_OK) {
            __atomic_store_n(&x->next, nchunks, __ATOMIC_RELAXED); /* the others stop too */
            break;
        }
    }
cleanup:
    cdb_compute_serial_leave(saved);
    free(b.cand);
    free(b.ccount);
    free(b.qc);
    free(b.S);
    free(b.wide);
    free(b.mul);
    free(b.add);
    free(b.thr);
    free(b.pq0);
    free(b.pa);
    return NULL;
}

static int search_batched(const clipdb_cvecs *c, const clipdb_vecs *base, const float *queries,
                          size_t nq, int k, int R, int nt, clipdb_metric metric,
                          const clipdb_filter *filter, clipdb_hit *out, int *n_out, cdb_err *e)
{
    batch_job jobs[CV_MAX_THREADS];
    batch_ctx x = {c, base, queries, nq, 0, 0, k, R,
                   c->kind == CLIPDB_COMPRESS_BF16 && cdb_gemm_bf16_native(), metric, filter, out};
    int t, rc = CLIPDB_OK;
    /* chunks of CV_QC queries, fewer when that leaves a thread without one;
    ** rows widened to fp32 per tile (fp16, bf16 without a bf16 matmul): one
    ** chunk per thread, each row widened once per thread (the widening cost
    ** as much as the product) */
    x.qc = (nq + (size_t)nt - 1) / (size_t)nt;
    if (x.qc > CV_QC && (c->kind == CLIPDB_COMPRESS_SQ8 || x.use_bf16)) x.qc = CV_QC;
    if (x.qc > CV_QC_WIDE) x.qc = CV_QC_WIDE;
    for (t = 0; t < nt; t++) {
        jobs[t].x = &x;
        jobs[t].rc = CLIPDB_OK;
        jobs[t].n_out = INT_MAX;
        cdb_err_clear(&jobs[t].e);
    }
    run_jobs_pool(batch_worker, jobs, sizeof jobs[0], nt);
    *n_out = INT_MAX;
    for (t = 0; t < nt; t++) {
        if (jobs[t].rc != CLIPDB_OK && rc == CLIPDB_OK) {
            rc = jobs[t].rc;
            *e = jobs[t].e;
        }
        if (jobs[t].n_out < *n_out) *n_out = jobs[t].n_out;
    }
    if (*n_out == INT_MAX) *n_out = 0;
    return rc;
}

int clipdb_cvecs_search(const clipdb_cvecs *c, const clipdb_vecs *base, const float *queries,
                        size_t nq, int k, int rerank_n, clipdb_metric metric,
                        const clipdb_filter *filter, clipdb_hit *out, int *n_out, char **errmsg)
{
    cdb_err e;
    int rc = CLIPDB_OK, nt, R;

    cdb_err_clear(&e);
    if (!c || !base || !n_out || (!queries && nq) || (!out && nq)) {
        rc = cdb_err_set(&e, CLIPDB_EINVAL, "compressed search: NULL argument");
        goto cleanup;
    }
    if (base->n != c->n || base->d != c->d || (c->n && !base->data)) {
        rc = cdb_err_set(&e, CLIPDB_EINVAL, "compressed search: the fp32 set (%zu x %d) is not "
                         "the one compressed (%zu x %d)", base->n, base->d, c->n, c->d);
        goto cleanup;
    }
    if (k < 1 || k > CLIPDB_MAX_K) {
        rc = cdb_err_set(&e, CLIPDB_EINVAL, "compressed search: k = %d out of range", k);
        goto cleanup;
    }
    if (!cdb_metric_ok(metric)) {
        rc = cdb_err_set(&e, CLIPDB_EINVAL, "compressed search: unknown metric %d", (int)metric);
        goto cleanup;
    }
    if ((rc = cdb_filter_check(filter, &e)) != CLIPDB_OK) goto cleanup;
    *n_out = 0;
    if (nq == 0) goto cleanup;
    if (rerank_n <= 0) rerank_n = k <= CLIPDB_CVECS_RERANK / 4 ? CLIPDB_CVECS_RERANK : 4 * k;
    R = rerank_n > k ? rerank_n : k;
    if (R > CLIPDB_MAX_K) R = CLIPDB_MAX_K;
    if ((size_t)R > c->n) R = c->n > 0 ? (int)c->n : 1;
    if (k > R) R = k;
    nt = cdb_compute_threads();
    if (nt > CV_MAX_THREADS) nt = CV_MAX_THREADS;
    if (nt < 1 || c->n * (size_t)c->d < ((size_t)1 << 18)) nt = 1;
    if (nq >= CDB_CVECS_GEMM_MIN && c->n > 0)
        rc = search_batched(c, base, queries, nq, k, R, nt, metric, filter, out, n_out, &e);
    else
        rc = search_one_by_one(c, base, queries, nq, k, R, nt, metric, filter, out, n_out, &e);
cleanup:
    if (rc != CLIPDB_OK && errmsg) *errmsg = cdb_strdup(e.msg);
    return rc;
}

/* ---- the SQ8 interface of earlier releases ------------------------------------------ */

int clipdb_sq8_build(const clipdb_vecs *base, clipdb_sq8 **out, char **errmsg)
{
    return clipdb_cvecs_build(base, CLIPDB_COMPRESS_SQ8, NULL, out, errmsg);
}

void clipdb_sq8_free(clipdb_sq8 *s)
{
    clipdb_cvecs_free(s);
}

size_t clipdb_sq8_bytes(const clipdb_sq8 *s)
{
    return clipdb_cvecs_bytes(s);
}

int clipdb_sq8_search(const clipdb_sq8 *s, const clipdb_vecs *base, const float *queries,
                      size_t nq, int k, int rerank_n, clipdb_metric metric,
                      const clipdb_filter *filter, clipdb_hit *out, int *n_out, char **errmsg)
{
    return clipdb_cvecs_search(s, base, queries, nq, k, rerank_n, metric, filter, out, n_out,
                               errmsg);
}
