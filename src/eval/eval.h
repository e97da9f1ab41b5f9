/*
** eval.h: internals of the eval module (src/eval): the rank computation
** (metrics.c), the experiments (eval.c), and the writers of JSON (json.c),
** plots (plot.c, PLplot) and the HTML report (html.c). Not part of the
** public API; the public view is the eval section of include/clipdb.h,
** where ranks, ties and the gallery are defined.
*/
#ifndef CDB_EVAL_H
#define CDB_EVAL_H

#include <stddef.h>
#include <stdint.h>

#include "clipdb.h"
#include "core/core.h"
#include "store/store.h"

/* Most scores held at once by the rank computation (queries per block x
** gallery): 16 Mi floats, 64 MiB. */
#define CDB_EVAL_BLOCK_SCORES ((size_t)1 << 24)
/* Largest gallery (images or captions) evaluated. */
#define CDB_EVAL_MAX_GALLERY ((size_t)1 << 24)

/* Ranks of the right items of nq queries in a gallery of ng items, under
** `metric`, from ONE batched score computation per block of queries:
**   dots (bq, ng) = q block (bq, d) @ g^T (d, ng)      (cdb_sgemm)
** turned into scores: cosine dot * (1/|q| * 1/|g|), dot, or for L2 the
** rank-equivalent 2 q.g - |g|^2 (= |q|^2 - |q - g|^2). The right items of
** query i are the gallery items j with glab[j] == qlab[i]; ranks[i]
** (counted from 1) is 1 + #{j : (s_j, gid[j]) ranks before (s_r, gid[r])},
** r the best right item, ties broken by the smaller id (cdb_hit_better); 0
** when query i has no right item. q (nq, d), g (ng, d), gid (ng), qlab (nq),
** glab (ng). */
int cdb_eval_ranks(clipdb_metric metric, int d, const float *q, size_t nq,
                   const int64_t *qlab, const float *g, size_t ng, const int64_t *gid,
                   const int64_t *glab, int64_t *ranks, cdb_err *e);

/* Most scores of the one-matrix computation of both directions
** (cdb_eval_ranks_pair): 64 Mi floats, 256 MiB; larger galleries take
** cdb_eval_ranks once per direction and metric. */
#define CDB_EVAL_FULL_SCORES ((size_t)1 << 26)

/* Both directions and the three metrics from ONE product, for nc captions
** of ni images:
**   dots (nc, ni) = captions (nc, d) @ images^T (d, ni)     (cdb_sgemm)
** text->image ranks (nc) read each row, with the images' ids iid and each
** caption's image index cap_img[c]; image->text ranks (ni, 0 for an image
** with no caption) read each column, with the captions' ids cid. Scores,
** ties and ranks as cdb_eval_ranks (the same expressions). ranks_t2i[m] and
** ranks_i2t[m] (metric m) may be NULL: not computed. nc * ni <=
** CDB_EVAL_FULL_SCORES. */
int cdb_eval_ranks_pair(int d, const float *caps, size_t nc, const int64_t *cap_img,
                        const int64_t *cid, const float *imgs, size_t ni, const int64_t *iid,
                        int64_t *const ranks_t2i[3], int64_t *const ranks_i2t[3], cdb_err *e);

/* Summary of ranks (zeros skipped): the number of ranked queries, the hit
** rate within k for k = 1 .. kmax into curve (kmax), the lower median and
** the mean. */
typedef struct cdb_rank_stats {
    int64_t n;
    double median, mean;
} cdb_rank_stats;
int cdb_eval_rank_stats(const int64_t *ranks, size_t nq, int kmax, double *curve,
                        cdb_rank_stats *st, cdb_err *e);

/* The random baseline: a query with m right items among n, gallery in random
** order, is hit within k with probability 1 - C(n - m, k) / C(n, k). The
** mean over queries whose numbers of right items are m (nq values, zeros
** skipped), for k = 1 .. kmax, into curve (kmax). */
void cdb_eval_random_curve(const int64_t *m, size_t nq, int64_t n, int kmax, double *curve);

/* ---- the results ---------------------------------------------------------- */

#define CDB_N_METRICS 3

typedef struct cdb_eval_set {
    char *name;
    int dim;                          /* of the set's vectors */
    clipdb_eval_summary sum;
    int kmax_t2i, kmax_i2t;
    double *curve_t2i[CDB_N_METRICS]; /* kmax_t2i hit rates, per metric */
    double *curve_i2t[CDB_N_METRICS];
    int64_t *ranks_t2i, *ranks_i2t;   /* under opt.metric: captions, images */
} cdb_eval_set;

typedef struct cdb_eval_index_row {
    const char *kind;        /* "exact", "ivf", "faiss" */
    int nprobe;              /* 0 for exact */
    double recall;           /* mean |top-k & exact top-k| / k */
    double hit1, hitk;       /* right image at rank 1, within index_k */
    double qps;              /* queries per second, all queries in one call */
    double build_s;          /* training + adding (0 for exact) */
} cdb_eval_index_row;

typedef struct cdb_eval_sample {
    size_t query;            /* image index (i2t) or caption index (t2i) */
    int n_top;
    size_t top[16];          /* retrieved gallery indexes, best first */
    float score[16];
    int right[16];           /* 1 where the retrieved item is a right one */
} cdb_eval_sample;

struct clipdb_eval {
    cdb_err err;
    clipdb_eval_options opt;
    char *db_path, *model, *split_desc, *date;
    int64_t embed_dim;
    cdb_split *split;        /* after --pairs first */
    size_t *cap_img;         /* n_captions: the caption's image index */
    int n_sets;
    cdb_eval_set *sets;
    double *random_t2i, *random_i2t; /* kmax of the first set's directions */
    int n_index_rows;
    cdb_eval_index_row index_rows[2 * CLIPDB_EVAL_MAX_NPROBES + 1];
    int index_nlist;
    char *index_note;        /* why a part of the comparison did not run */
    int n_samples_i2t, n_samples_t2i;
    cdb_eval_sample *samples_i2t, *samples_t2i;
    double total_seconds;
};

/* Plots (plot.c): writes NAME.png and/or NAME.svg of every plot into dir. */
int cdb_eval_plots(clipdb_eval *ev, const char *dir, int png, int svg);
/* Renders plot `name` to PNG bytes in memory (for the HTML report): *buf
** (caller frees with free). */
int cdb_eval_plot_png(clipdb_eval *ev, const char *name, uint8_t **buf, size_t *len);
/* The plot names, NULL-terminated. */
extern const char *const cdb_eval_plot_names[];

#endif
