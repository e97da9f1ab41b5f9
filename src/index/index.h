/*
** index.h: internals of the index module (src/index): the one distance-kernel
** module (scores + top-k) that flat search, k-means and IVF all use, the
** k-means, the seeded RNG and the Faiss shim. Not part of the public API.
*/
#ifndef CDB_INDEX_H
#define CDB_INDEX_H

#include <stddef.h>
#include <stdint.h>

#include "clipdb.h"
#include "core/core.h"

/* ---- seeded RNG: splitmix64 (Steele, Lea, Flood 2014; the generator Java's
** SplittableRandom and xoshiro's seeding use). Tiny, fast, deterministic. */
typedef struct cdb_rng {
    uint64_t s;
} cdb_rng;
static inline uint64_t cdb_rng_next(cdb_rng *r)
{
    uint64_t z = (r->s += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}
/* Uniform double in [0, 1). */
static inline double cdb_rng_unif(cdb_rng *r)
{
    return (double)(cdb_rng_next(r) >> 11) * (1.0 / 9007199254740992.0);
}
/* Uniform integer in [0, n), n > 0 (bias below 2^-32 for n < 2^32). */
static inline uint64_t cdb_rng_below(cdb_rng *r, uint64_t n)
{
    return (uint64_t)(cdb_rng_unif(r) * (double)n) % n;
}

/* ---- filter ----------------------------------------------------------- */
/* 1 if the key passes the filter f (NULL allows everything). */
int cdb_filter_allows(const clipdb_filter *f, int64_t key);
/* Validates a filter; EINVAL message in e. */
int cdb_filter_check(const clipdb_filter *f, cdb_err *e);

/* ---- top-k heaps -------------------------------------------------------- */
/* nq bounded heaps of capacity k (the worst kept hit at the root), stored in
** the caller's output array: heap i is hits[i*k .. i*k+k), count[i] used. */
typedef struct cdb_topk {
    clipdb_hit *hits;   /* nq * k */
    int *count;         /* nq */
    int k;
} cdb_topk;
/* 1 if hit (s, id) ranks before (t, jd): higher score, then smaller id. */
static inline int cdb_hit_better(float s, int64_t id, float t, int64_t jd)
{
    return s > t || (s == t && id < jd);
}
/* Offers (score, id) to heap h of t. */
void cdb_topk_push(cdb_topk *t, size_t h, float score, int64_t id);
/* Sorts heap h best first, pads with (id -1, -INFINITY) up to k; for the L2
** metric turns the internal -d^2 scores into -d. */
void cdb_topk_finish(cdb_topk *t, size_t h, clipdb_metric metric);

/* ---- the distance kernel ---------------------------------------------- */
/* Rows of a base block: n contiguous vectors with norms, ids and filter keys. */
typedef struct cdb_rows {
    const float *x;        /* n x d */
    const float *norms;    /* n (needed for cosine and l2) */
    const int64_t *ids;    /* n, or NULL: id = id0 + j */
    int64_t id0;
    const int64_t *keys;   /* filter key per row, or NULL: key = key0 + j */
    int64_t key0;
    size_t n;
} cdb_rows;

/* A block of m queries, contiguous, with norms and their heap indexes. */
typedef struct cdb_qblock {
    const float *q;        /* m x d */
    const float *norms;    /* m */
    const size_t *heap;    /* m heap indexes in the cdb_topk, or NULL: heap0+i */
    size_t heap0;
    size_t m;
} cdb_qblock;

/* Tunables (tests shrink them to cross every threshold cheaply). */
typedef struct cdb_kparams {
    size_t q_block;     /* queries per GEMM (1024) */
    size_t b_block;     /* base rows per GEMM (8192) */
    size_t gemv_max_m;  /* at most this many queries: one sgemv each (1) */
    size_t small_max;   /* a single-query block of at most this many floats
                        ** (rows * d) uses the inline dot kernel, not sgemv,
                        ** whose thread start-up costs more than the work
                        ** below ~1 MB (1 << 18) */
    size_t direct_max;  /* a multi-query block of at most this many
                        ** multiply-adds (m * rows * d) uses the inline dot
                        ** kernel per query, not sgemm, whose packing costs
                        ** more than the work for small IVF lists at small d
                        ** (1 << 16) */
    int threads;        /* tasks of the top-k pass on the core pool (0: the
                        ** pool's thread count, cdb_pool_threads) */
    size_t thread_min;  /* fewest scores of a block worth threading (1 << 18) */
} cdb_kparams;
void cdb_kparams_default(cdb_kparams *p);

/* Scores every query of qb against every row of rows under `metric` and
** pushes the allowed ones into the heaps of t, p->b_block rows at a time:
** one query -> inline dot kernel (block <= p->small_max floats) or sgemv;
** more -> inline dot kernel per query (m * rows * d <= p->direct_max) or
** sgemm. Requires qb->m <= p->q_block and scratch of at least
** qb->m * min(rows->n, p->b_block) floats. */
void cdb_scan(const cdb_kparams *p, clipdb_metric metric, int d,
              const cdb_qblock *qb, const cdb_rows *rows,
              const clipdb_filter *filter, cdb_topk *t, float *scratch);

/* clipdb_flat_search with explicit tunables; errors in e. */
int cdb_flat_search(const cdb_kparams *p, const clipdb_vecs *base,
                    const float *queries, size_t nq, int k, clipdb_metric metric,
                    const clipdb_filter *filter, clipdb_hit *out, int *n_out,
                    cdb_err *e);

/* Validates a metric value. */
int cdb_metric_ok(clipdb_metric m);
/* Copies n rows, scaled to unit length (zero rows stay zero): y (n, d). */
void cdb_normalize_rows(const float *x, size_t n, int d, float *y);

/* ---- compressed-vector kernels (ckern.c) --------------------------------- */
/* Kernel levels, chosen at run time from the CPU's features. */
typedef enum { CDB_CK_C = 0, CDB_CK_AVX2 = 1, CDB_CK_AVX512 = 2 } cdb_ck_level;
/* Dot products of one query with n rows of a compressed copy, d values per
** row, rows contiguous:
**   dot_u8s8  out[r] = sum_j x[r,j] * q[j]  (u8 codes, s8 query; exact int32)
**   dot_bf16  out[r] = sum_j bf16(x[r,j]) * q[j]  (fp32 query)
**   dot_fp16  out[r] = sum_j fp16(x[r,j]) * q[j]  (fp32 query) */
typedef struct cdb_ckern {
    const char *name;   /* "c", "avx2", "avx512_vnni" */
    void (*dot_u8s8)(const uint8_t *x, size_t n, int d, const int8_t *q, int32_t *out);
    void (*dot_bf16)(const uint16_t *x, size_t n, int d, const float *q, float *out);
    void (*dot_fp16)(const uint16_t *x, size_t n, int d, const float *q, float *out);
} cdb_ckern;
/* The kernels of `level`, or NULL when this CPU lacks it (AVX2 also means
** F16C, which every AVX2 CPU has; AVX512 means F + BW + VNNI). */
const cdb_ckern *cdb_ckern_at(cdb_ck_level level);
/* The best level this CPU runs. */
const cdb_ckern *cdb_ckern_best(void);
/* IEEE binary16 conversions (round to nearest even; beyond the range: inf). */
uint16_t cdb_f32_to_fp16(float f);
float cdb_fp16_to_f32(uint16_t h);

/* ---- compressed copies (cvecs.c) ------------------------------------------- */
/* The kernels a copy's searches use (tests pin a level; NULL: the best). */
void cdb_cvecs_set_kernels(clipdb_cvecs *c, const cdb_ckern *k);
/* The dimension of its rows. */
int cdb_cvecs_dim(const clipdb_cvecs *c);
/* Its codes (n * d bytes for sq8, n * d halves for bf16 and fp16) and the
** norms of the decoded rows (n), for tests. */
const void *cdb_cvecs_codes(const clipdb_cvecs *c, const float **norms);
/* clipdb_cvecs_build encodes on several threads from this many values (n * d). */
#define CDB_CVECS_BUILD_MT ((size_t)1 << 18)
/* Queries at least this many at once go through the GEMM path. */
#define CDB_CVECS_GEMM_MIN 16

/* ---- k-means ------------------------------------------------------------ */
typedef struct cdb_kmeans_opts {
    uint64_t seed;
    int max_iter;
    double tol;
    int spherical;        /* normalise the centroids after every update */
    size_t max_sample;    /* 0: train on all points */
} cdb_kmeans_opts;
/* k-means++ seeding (Arthur & Vassilvitskii, "k-means++: the advantages of
** careful seeding", SODA 2007) then Lloyd iterations with GEMM assignment.
** x (n, d), n >= k -> centroids (k, d). *obj_out (may be NULL): the final
** sum of squared distances. */
int cdb_kmeans(const float *x, size_t n, int d, int k, const cdb_kmeans_opts *o,
               float *centroids, double *obj_out, cdb_err *e);
/* Nearest centroid of each row: by L2 (ip = 0) or by inner product (ip = 1).
** x (n, d), c (k, d) -> assign (n); dist_out (n, may be NULL) gets the squared
** L2 distance (ip = 0) or the inner product (ip = 1). */
int cdb_assign_nearest(const float *x, size_t n, int d, const float *c, int k,
                       int ip, int32_t *assign, float *dist_out, cdb_err *e);

/* ---- Faiss shim (faiss_shim.cc) ------------------------------------------ */
/* A Faiss index built by faiss::index_factory, behind a C interface. C++
** exceptions never cross it: they become CLIPDB_ERROR with the message in
** cdb_faiss_errmsg. For cosine the shim normalises vectors and queries and
** uses inner product. */
typedef struct cdb_faiss cdb_faiss;
/* *out is set even on failure (message inside) unless out of memory; free
** with cdb_faiss_free. `factory`: e.g. "Flat", "IVF100,Flat". */
int cdb_faiss_new(cdb_faiss **out, int d, const char *factory, clipdb_metric metric);
void cdb_faiss_free(cdb_faiss *f);
const char *cdb_faiss_errmsg(const cdb_faiss *f);
int cdb_faiss_train(cdb_faiss *f, const float *x, size_t n);
/* Adds with explicit ids (the index is wrapped in an IndexIDMap if needed). */
int cdb_faiss_add(cdb_faiss *f, const int64_t *ids, const float *x, size_t n);
int cdb_faiss_remove(cdb_faiss *f, const int64_t *ids, size_t n, size_t *n_removed);
/* nprobe <= 0: the index's own; else nprobe for this call only (the
** index's own value is unchanged afterwards). Scores follow clipdb's convention (l2:
** -distance). out (nq * k); missing results have id -1. */
int cdb_faiss_search(cdb_faiss *f, const float *q, size_t nq, int k, int nprobe,
                     clipdb_hit *out);
size_t cdb_faiss_ntotal(const cdb_faiss *f);
/* Seeds the k-means of an IVF index's next train (Faiss's
** ClusteringParameters::seed, 1234 by default); EINVAL if f holds no IVF. */
int cdb_faiss_set_train_seed(cdb_faiss *f, int seed);
/* The nprobe an IVF inside f uses by default (0: f holds no IVF). */
int cdb_faiss_nprobe(const cdb_faiss *f);
/* The dimension of the vectors the index holds (0 without an index). */
int cdb_faiss_dim(const cdb_faiss *f);
/* Serialises with faiss::write_index. *buf (caller frees with free). */
int cdb_faiss_serialize(cdb_faiss *f, uint8_t **buf, size_t *len);
/* Reads an index written by cdb_faiss_serialize (trusted bytes only: Faiss's
** reader is not hardened against hostile input). */
int cdb_faiss_deserialize(cdb_faiss **out, const uint8_t *buf, size_t len,
                          clipdb_metric metric);
/* For a forked child, before its first Faiss call: OpenMP runs one thread
** there. libgomp's thread pool does not survive fork: a child's first
** parallel region waits forever for pool threads of the parent (oneDNN and
** Faiss searches start them) that the child does not have. */
void cdb_faiss_after_fork(void);

#endif /* CDB_INDEX_H */
