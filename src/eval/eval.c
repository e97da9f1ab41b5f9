/*
** eval.c: `clipdb eval`'s experiments on a database: the standard protocol
** (R@K, median and mean rank, both directions), the paper's hit-rate curves
** for the three metrics against the random baseline, the comparison of the
** vector sets, exact search against IVF and Faiss over nprobe, and the
** qualitative Table-1 samples. Definitions: include/clipdb.h.
*/
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "eval/eval.h"
#include "index/index.h"

static const int default_ks[] = {1, 5, 10};
static const int default_nprobes[] = {1, 2, 4, 8, 16, 32, 64};

void clipdb_eval_options_init(clipdb_eval_options *opt)
{
    size_t i;
    memset(opt, 0, sizeof *opt);
    opt->metric = CLIPDB_METRIC_COSINE;
    opt->n_ks = (int)(sizeof default_ks / sizeof default_ks[0]);
    for (i = 0; i < sizeof default_ks / sizeof default_ks[0]; i++) opt->ks[i] = default_ks[i];
    opt->curve_max_k = 1000;
    opt->compare_indexes = 1;
    opt->n_nprobes = (int)(sizeof default_nprobes / sizeof default_nprobes[0]);
    for (i = 0; i < sizeof default_nprobes / sizeof default_nprobes[0]; i++)
        opt->nprobes[i] = default_nprobes[i];
    opt->faiss = 1;
    opt->index_k = 10;
    opt->n_samples = 5;
    opt->sample_top = 5;
    opt->seed = CLIPDB_DEFAULT_SEED;
}

const char *clipdb_eval_errmsg(const clipdb_eval *ev)
{
    if (!ev) return "out of memory";
    return ev->err.code ? ev->err.msg : "not an error";
}

int clipdb_eval_n_sets(const clipdb_eval *ev)
{
    return ev ? ev->n_sets : 0;
}

int clipdb_eval_get_summary(const clipdb_eval *ev, int set, clipdb_eval_summary *out)
{
    if (!ev || !out || set < 0 || set >= ev->n_sets) return CLIPDB_EINVAL;
    *out = ev->sets[set].sum;
    return CLIPDB_OK;
}

void clipdb_eval_free(clipdb_eval *ev)
{
    int i, m;
    if (!ev) return;
    for (i = 0; i < ev->n_sets; i++) {
        cdb_eval_set *s = &ev->sets[i];
        free(s->name);
        free((char *)s->sum.model);
        for (m = 0; m < CDB_N_METRICS; m++) {
            free(s->curve_t2i[m]);
            free(s->curve_i2t[m]);
        }
        free(s->ranks_t2i);
        free(s->ranks_i2t);
    }
    free(ev->sets);
    free(ev->db_path);
    free(ev->model);
    free(ev->split_desc);
    free(ev->date);
    free(ev->cap_img);
    free(ev->random_t2i);
    free(ev->random_i2t);
    free(ev->index_note);
    free(ev->samples_i2t);
    free(ev->samples_t2i);
    cdb_split_free(ev->split);
    free(ev);
}

static int check_options(clipdb_eval *ev, const clipdb_eval_options *o)
{
    int i;
    if (!cdb_metric_ok(o->metric))
        return cdb_err_set(&ev->err, CLIPDB_EINVAL, "bad metric %d", (int)o->metric);
    if (o->n_ks < 1 || o->n_ks > CLIPDB_EVAL_MAX_KS)
        return cdb_err_set(&ev->err, CLIPDB_EINVAL, "between 1 and %d values of k, not %d",
                           CLIPDB_EVAL_MAX_KS, o->n_ks);
    for (i = 0; i < o->n_ks; i++)
        if (o->ks[i] < 1 || o->ks[i] > CLIPDB_MAX_K)
            return cdb_err_set(&ev->err, CLIPDB_EINVAL, "bad k %d (1 .. %d)", o->ks[i],
                               CLIPDB_MAX_K);
    if (o->curve_max_k < 1 || o->curve_max_k > CLIPDB_MAX_K)
        return cdb_err_set(&ev->err, CLIPDB_EINVAL, "bad curve length %d", o->curve_max_k);
    if (o->n_nprobes < 0 || o->n_nprobes > CLIPDB_EVAL_MAX_NPROBES)
        return cdb_err_set(&ev->err, CLIPDB_EINVAL, "at most %d nprobe values",
                           CLIPDB_EVAL_MAX_NPROBES);
    for (i = 0; i < o->n_nprobes; i++)
        if (o->nprobes[i] < 1 || o->nprobes[i] > CLIPDB_MAX_NLIST)
            return cdb_err_set(&ev->err, CLIPDB_EINVAL, "bad nprobe %d", o->nprobes[i]);
    if (o->nlist < 0 || o->nlist > CLIPDB_MAX_NLIST)
        return cdb_err_set(&ev->err, CLIPDB_EINVAL, "bad nlist %d", o->nlist);
    if (o->index_k < 1 || o->index_k > 1000)
        return cdb_err_set(&ev->err, CLIPDB_EINVAL, "bad index k %d (1 .. 1000)", o->index_k);
    if (o->n_samples < 0 || o->n_samples > 100)
        return cdb_err_set(&ev->err, CLIPDB_EINVAL, "bad number of samples %d (0 .. 100)",
                           o->n_samples);
    if (o->sample_top < 1 || o->sample_top > 16)
        return cdb_err_set(&ev->err, CLIPDB_EINVAL, "bad sample_top %d (1 .. 16)",
                           o->sample_top);
    if (o->n_where < 0 || (o->n_where > 0 && !o->where))
        return cdb_err_set(&ev->err, CLIPDB_EINVAL, "bad filters");
    return CLIPDB_OK;
}

static size_t image_index(const cdb_split *s, int64_t id)
{
    size_t lo = 0, hi = s->n_images;
    while (lo < hi) {
        size_t mid = lo + (hi - lo) / 2;
        if (s->image_ids[mid] < id) lo = mid + 1;
        else hi = mid;
    }
    return lo;
}

/* Keeps the first caption (smallest id: captions are in id order) of every
** image. */
static int keep_first_captions(cdb_split *s)
{
    size_t i, n = 0;
    unsigned char *seen = calloc(s->n_images, 1);
    if (!seen) return CLIPDB_ENOMEM;
    for (i = 0; i < s->n_captions; i++) {
        size_t im = image_index(s, s->caption_image[i]);
        if (seen[im]) {
            free(s->caption_texts[i]);
            continue;
        }
        seen[im] = 1;
        s->caption_ids[n] = s->caption_ids[i];
        s->caption_image[n] = s->caption_image[i];
        s->caption_texts[n++] = s->caption_texts[i];
    }
    s->n_captions = n;
    free(seen);
    return CLIPDB_OK;
}

/* Ranks, curves and the summary of one vector set. */
static int eval_set(clipdb_eval *ev, clipdb_db *db, cdb_eval_set *set, const char *model)
{
    const cdb_split *sp = ev->split;
    size_t ni = sp->n_images, nc = sp->n_captions, i;
    int d = set->dim, m, rc = CLIPDB_OK;
    float *iv = NULL, *cv = NULL;
    int64_t *ilab = NULL, *clab = NULL, *rt[CDB_N_METRICS] = {0}, *ri[CDB_N_METRICS] = {0};
    double t0 = cdb_now();
    clipdb_eval_summary *sum = &set->sum;
    cdb_rank_stats st;

    sum->set = set->name;
    sum->model = cdb_strdup(model);
    sum->images = (int64_t)ni;
    sum->captions = (int64_t)nc;
    sum->captions_outside = (int64_t)sp->n_captions_outside;
    sum->metric = ev->opt.metric;
    sum->n_ks = ev->opt.n_ks;
    memcpy(sum->ks, ev->opt.ks, sizeof sum->ks);
    set->kmax_t2i = ev->opt.curve_max_k < (int64_t)ni ? ev->opt.curve_max_k : (int)ni;
    set->kmax_i2t = ev->opt.curve_max_k < (int64_t)nc ? ev->opt.curve_max_k : (int)nc;

    iv = cdb_malloc_array(ni * (size_t)d, sizeof *iv);
    cv = cdb_malloc_array(nc * (size_t)d, sizeof *cv);
    ilab = cdb_malloc_array(ni, sizeof *ilab);
    clab = cdb_malloc_array(nc, sizeof *clab);
    if (!sum->model || !iv || !cv || !ilab || !clab) {
        rc = cdb_err_set(&ev->err, CLIPDB_ENOMEM, "out of memory");
        goto cleanup;
    }
    if ((rc = cdb_db_set_vectors(db, set->name, CLIPDB_ITEM_IMAGE, sp->image_ids, ni, iv)) ||
        (rc = cdb_db_set_vectors(db, set->name, CLIPDB_ITEM_TEXT, sp->caption_ids, nc, cv))) {
        cdb_err_set(&ev->err, rc, "%s", clipdb_db_errmsg(db));
        goto cleanup;
    }
    for (i = 0; i < ni; i++) ilab[i] = (int64_t)i;
    for (i = 0; i < nc; i++) clab[i] = (int64_t)ev->cap_img[i];
    for (m = 0; m < CDB_N_METRICS; m++) {
        rt[m] = cdb_malloc_array(nc, sizeof(int64_t));
        ri[m] = cdb_malloc_array(ni, sizeof(int64_t));
        set->curve_t2i[m] = cdb_malloc_array((size_t)set->kmax_t2i, sizeof(double));
        set->curve_i2t[m] = cdb_malloc_array((size_t)set->kmax_i2t, sizeof(double));
        if (!rt[m] || !ri[m] || !set->curve_t2i[m] || !set->curve_i2t[m]) {
            rc = cdb_err_set(&ev->err, CLIPDB_ENOMEM, "out of memory");
            goto cleanup;
        }
    }
    t0 = cdb_now();
    if (nc * ni <= CDB_EVAL_FULL_SCORES) {
        /* three metrics, both directions, from one product */
        rc = cdb_eval_ranks_pair(d, cv, nc, clab, sp->caption_ids, iv, ni, sp->image_ids, rt, ri,
                                 &ev->err);
    } else {
        /* per metric, text->image (captions (nc, d) against images (ni, d))
        ** then image->text (images against captions), blocked */
        for (m = 0; m < CDB_N_METRICS && rc == CLIPDB_OK; m++) {
            rc = cdb_eval_ranks((clipdb_metric)m, d, cv, nc, clab, iv, ni, sp->image_ids, ilab,
                                rt[m], &ev->err);
            if (rc == CLIPDB_OK)
                rc = cdb_eval_ranks((clipdb_metric)m, d, iv, ni, ilab, cv, nc, sp->caption_ids,
                                    clab, ri[m], &ev->err);
        }
    }
    if (rc != CLIPDB_OK) goto cleanup;
    for (m = 0; m < CDB_N_METRICS; m++) {
        int own = m == (int)ev->opt.metric;
        rc = cdb_eval_rank_stats(rt[m], nc, set->kmax_t2i, set->curve_t2i[m], &st, &ev->err);
        if (rc != CLIPDB_OK) goto cleanup;
        if (own) {
            sum->t2i.queries = st.n;
            sum->t2i.gallery = (int64_t)ni;
            sum->t2i.median_rank = st.median;
            sum->t2i.mean_rank = st.mean;
        }
        rc = cdb_eval_rank_stats(ri[m], ni, set->kmax_i2t, set->curve_i2t[m], &st, &ev->err);
        if (rc != CLIPDB_OK) goto cleanup;
        if (own) {
            sum->i2t.queries = st.n;
            sum->i2t.gallery = (int64_t)nc;
            sum->i2t.median_rank = st.median;
            sum->i2t.mean_rank = st.mean;
            sum->images_without_captions = (int64_t)ni - st.n;
            set->ranks_t2i = rt[m];
            set->ranks_i2t = ri[m];
            rt[m] = ri[m] = NULL;
        }
    }
    sum->score_seconds = cdb_now() - t0;
    /* R@K from the ranks (k <= the gallery, checked before) */
    for (i = 0; i < (size_t)sum->n_ks; i++) {
        int64_t k = sum->ks[i], a = 0, b = 0;
        size_t j;
        for (j = 0; j < nc; j++) a += set->ranks_t2i[j] > 0 && set->ranks_t2i[j] <= k;
        for (j = 0; j < ni; j++) b += set->ranks_i2t[j] > 0 && set->ranks_i2t[j] <= k;
        sum->t2i.recall[i] = sum->t2i.queries ? (double)a / (double)sum->t2i.queries : 0;
        sum->i2t.recall[i] = sum->i2t.queries ? (double)b / (double)sum->i2t.queries : 0;
    }
cleanup:
    free(iv);
    free(cv);
    free(ilab);
    free(clab);
    for (m = 0; m < CDB_N_METRICS; m++) {
        free(rt[m]);
        free(ri[m]);
    }
    return rc;
}

/* Index searches are timed REPEATS times (all queries in one call each);
** the median is kept, so one slow run on a busy machine does not decide. */
#define REPEATS 3

static double median3(double a, double b, double c)
{
    if (a > b) {
        double t = a;
        a = b;
        b = t;
    }
    return c < a ? a : c > b ? b : c;
}

/* Hit counts of approximate results against the exact ones and the truth. */
static void score_index_row(clipdb_eval *ev, const clipdb_hit *exact, const clipdb_hit *got,
                            size_t nq, int k, cdb_eval_index_row *row)
{
    size_t i;
    int a, b;
    double inter = 0, h1 = 0, hk = 0;
    for (i = 0; i < nq; i++) {
        const clipdb_hit *e = exact + i * (size_t)k, *g = got + i * (size_t)k;
        int64_t truth = (int64_t)ev->cap_img[i];
        for (a = 0; a < k; a++) {
            if (g[a].id < 0) continue;
            for (b = 0; b < k; b++)
                if (e[b].id == g[a].id) {
                    inter++;
                    break;
                }
            if (g[a].id == truth) {
                hk++;
                if (a == 0) h1++;
            }
        }
    }
    row->recall = nq ? inter / ((double)nq * k) : 0;
    row->hit1 = nq ? h1 / (double)nq : 0;
    row->hitk = nq ? hk / (double)nq : 0;
}

/* Exact vs IVF vs Faiss for text->image of the first vector set under
** opt.metric: every caption is a query, all in one search call. */
static int compare_indexes(clipdb_eval *ev, clipdb_db *db)
{
    const cdb_split *sp = ev->split;
    size_t ni = sp->n_images, nc = sp->n_captions, i;
    int d = ev->sets[0].dim, k = ev->opt.index_k, nlist, p, r, n_out, rc = CLIPDB_OK;
    double dt[REPEATS];
    float *iv = NULL, *cv = NULL;
    int64_t *ids = NULL;
    clipdb_hit *exact = NULL, *got = NULL;
    clipdb_ivf *ivf = NULL;
    cdb_faiss *fa = NULL;
    clipdb_vecs base;
    clipdb_ivf_train_options to;
    char *msg = NULL, factory[64];
    double t0;
    cdb_eval_index_row *row;

    if (k > (int)ni) k = (int)ni;
    ev->opt.index_k = k;
    nlist = ev->opt.nlist ? ev->opt.nlist : (int)lround(sqrt((double)ni));
    if (nlist < 1) nlist = 1;
    if ((size_t)nlist > ni) nlist = (int)ni;
    ev->index_nlist = nlist;
    iv = cdb_malloc_array(ni * (size_t)d, sizeof *iv);
    cv = cdb_malloc_array(nc * (size_t)d, sizeof *cv);
    ids = cdb_malloc_array(ni, sizeof *ids);
    exact = cdb_malloc_array(nc * (size_t)k, sizeof *exact);
    got = cdb_malloc_array(nc * (size_t)k, sizeof *got);
    if (!iv || !cv || !ids || !exact || !got) {
        rc = cdb_err_set(&ev->err, CLIPDB_ENOMEM, "out of memory");
        goto cleanup;
    }
    if ((rc = cdb_db_set_vectors(db, ev->sets[0].name, CLIPDB_ITEM_IMAGE, sp->image_ids, ni,
                                 iv)) ||
        (rc = cdb_db_set_vectors(db, ev->sets[0].name, CLIPDB_ITEM_TEXT, sp->caption_ids, nc,
                                 cv))) {
        cdb_err_set(&ev->err, rc, "%s", clipdb_db_errmsg(db));
        goto cleanup;
    }
    for (i = 0; i < ni; i++) ids[i] = (int64_t)i;
    base.data = iv;
    base.ids = NULL;
    base.norms = NULL;
    base.n = ni;
    base.d = d;

    /* exact: the reference */
    for (r = 0; r < REPEATS; r++) {
        t0 = cdb_now();
        rc = clipdb_flat_search(&base, cv, nc, k, ev->opt.metric, NULL, exact, &n_out, &msg);
        if (rc != CLIPDB_OK) {
            cdb_err_set(&ev->err, rc, "exact search: %s", msg ? msg : "failed");
            goto cleanup;
        }
        dt[r] = cdb_now() - t0;
    }
    row = &ev->index_rows[ev->n_index_rows++];
    row->kind = "exact";
    row->qps = (double)nc / fmax(median3(dt[0], dt[1], dt[2]), 1e-9);
    score_index_row(ev, exact, exact, nc, k, row);

    /* our IVF */
    t0 = cdb_now();
    clipdb_ivf_train_options_init(&to);
    to.seed = ev->opt.seed;
    if ((rc = clipdb_ivf_new(&ivf, d, nlist, ev->opt.metric)) != CLIPDB_OK ||
        (rc = clipdb_ivf_train(ivf, iv, ni, &to)) != CLIPDB_OK ||
        (rc = clipdb_ivf_add(ivf, ids, iv, ni, NULL)) != CLIPDB_OK) {
        cdb_err_set(&ev->err, rc, "ivf: %s", clipdb_ivf_errmsg(ivf));
        goto cleanup;
    }
    {
        double build = cdb_now() - t0;
        for (p = 0; p < ev->opt.n_nprobes; p++) {
            int np = ev->opt.nprobes[p];
            if (np > nlist) continue;
            for (r = 0; r < REPEATS; r++) {
                t0 = cdb_now();
                rc = clipdb_ivf_search(ivf, cv, nc, k, np, NULL, got, &n_out);
                if (rc != CLIPDB_OK) {
                    cdb_err_set(&ev->err, rc, "ivf search: %s", clipdb_ivf_errmsg(ivf));
                    goto cleanup;
                }
                dt[r] = cdb_now() - t0;
            }
            row = &ev->index_rows[ev->n_index_rows++];
            row->kind = "ivf";
            row->nprobe = np;
            row->build_s = build;
            row->qps = (double)nc / fmax(median3(dt[0], dt[1], dt[2]), 1e-9);
            score_index_row(ev, exact, got, nc, k, row);
        }
    }

    /* Faiss IndexIVFFlat with the same nlist */
    if (ev->opt.faiss) {
        double build;
        snprintf(factory, sizeof factory, "IVF%d,Flat", nlist);
        t0 = cdb_now();
        if (cdb_faiss_new(&fa, d, factory, ev->opt.metric) != CLIPDB_OK ||
            cdb_faiss_set_train_seed(fa, (int)(ev->opt.seed & 0x7fffffff)) != CLIPDB_OK ||
            cdb_faiss_train(fa, iv, ni) != CLIPDB_OK || cdb_faiss_add(fa, ids, iv, ni) != CLIPDB_OK) {
            /* not fatal: the report says why Faiss is missing */
            ev->index_note = cdb_sprintf("faiss %s: %s", factory,
                                         fa ? cdb_faiss_errmsg(fa) : "out of memory");
            goto cleanup;
        }
        build = cdb_now() - t0;
        for (p = 0; p < ev->opt.n_nprobes; p++) {
            int np = ev->opt.nprobes[p];
            if (np > nlist) continue;
            for (r = 0; r < REPEATS; r++) {
                t0 = cdb_now();
                if (cdb_faiss_search(fa, cv, nc, k, np, got) != CLIPDB_OK) {
                    ev->index_note = cdb_sprintf("faiss search: %s", cdb_faiss_errmsg(fa));
                    goto cleanup;
                }
                dt[r] = cdb_now() - t0;
            }
            row = &ev->index_rows[ev->n_index_rows++];
            row->kind = "faiss";
            row->nprobe = np;
            row->build_s = build;
            row->qps = (double)nc / fmax(median3(dt[0], dt[1], dt[2]), 1e-9);
            score_index_row(ev, exact, got, nc, k, row);
        }
    }
cleanup:
    clipdb_free(msg);
    clipdb_ivf_free(ivf);
    cdb_faiss_free(fa);
    free(iv);
    free(cv);
    free(ids);
    free(exact);
    free(got);
    return rc;
}

/* Table 1: for n sampled images the top captions, for n sampled captions the
** top images, under opt.metric, from the first vector set. */
static int draw_samples(clipdb_eval *ev, clipdb_db *db, int i2t)
{
    const cdb_split *sp = ev->split;
    size_t ni = sp->n_images, nc = sp->n_captions, nq = i2t ? ni : nc, ng = i2t ? nc : ni;
    size_t ns = (size_t)ev->opt.n_samples, i, j;
    int d = ev->sets[0].dim, top = ev->opt.sample_top, n_out, rc = CLIPDB_OK, a;
    float *gv = NULL, *qv = NULL;
    int64_t *qid = NULL;
    clipdb_hit *hits = NULL;
    cdb_eval_sample *smp = NULL;
    clipdb_vecs base;
    char *msg = NULL;
    cdb_rng rng;

    if (i2t) { /* only images with a caption are queries */
        size_t with = 0;
        for (i = 0; i < ni; i++) with += ev->sets[0].ranks_i2t[i] > 0;
        if (ns > with) ns = with;
    }
    if (ns > nq) ns = nq;
    if ((size_t)top > ng) top = (int)ng;
    if (ns == 0) return CLIPDB_OK;
    smp = calloc(ns, sizeof *smp);
    qid = cdb_malloc_array(ns, sizeof *qid);
    gv = cdb_malloc_array(ng * (size_t)d, sizeof *gv);
    qv = cdb_malloc_array(ns * (size_t)d, sizeof *qv);
    hits = cdb_malloc_array(ns * (size_t)top, sizeof *hits);
    if (!smp || !qid || !gv || !qv || !hits) {
        rc = cdb_err_set(&ev->err, CLIPDB_ENOMEM, "out of memory");
        goto cleanup;
    }
    rng.s = ev->opt.seed ^ (i2t ? 0x1217u : 0x7121u);
    for (i = 0; i < ns; i++) {
        size_t q;
        int dup;
        do { /* distinct queries (ns <= the candidates, so this ends) */
            q = (size_t)cdb_rng_below(&rng, nq);
            dup = i2t && ev->sets[0].ranks_i2t[q] == 0;
            for (j = 0; j < i && !dup; j++) dup = smp[j].query == q;
        } while (dup);
        smp[i].query = q;
        qid[i] = i2t ? sp->image_ids[q] : sp->caption_ids[q];
    }
    if ((rc = cdb_db_set_vectors(db, ev->sets[0].name, i2t ? CLIPDB_ITEM_TEXT : CLIPDB_ITEM_IMAGE,
                                 i2t ? sp->caption_ids : sp->image_ids, ng, gv)) ||
        (rc = cdb_db_set_vectors(db, ev->sets[0].name, i2t ? CLIPDB_ITEM_IMAGE : CLIPDB_ITEM_TEXT,
                                 qid, ns, qv))) {
        cdb_err_set(&ev->err, rc, "%s", clipdb_db_errmsg(db));
        goto cleanup;
    }
    /* gallery ids are the items' ids, so ties order as in the ranks */
    base.data = gv;
    base.ids = i2t ? sp->caption_ids : sp->image_ids;
    base.norms = NULL;
    base.n = ng;
    base.d = d;
    rc = clipdb_flat_search(&base, qv, ns, top, ev->opt.metric, NULL, hits, &n_out, &msg);
    if (rc != CLIPDB_OK) {
        cdb_err_set(&ev->err, rc, "sample search: %s", msg ? msg : "failed");
        goto cleanup;
    }
    for (i = 0; i < ns; i++) {
        smp[i].n_top = n_out;
        for (a = 0; a < n_out; a++) {
            const clipdb_hit *h = &hits[i * (size_t)top + (size_t)a];
            size_t g = i2t ? 0 : image_index(sp, h->id);
            if (i2t) { /* id -> caption index */
                size_t lo = 0, hi = nc;
                while (lo < hi) {
                    size_t mid = lo + (hi - lo) / 2;
                    if (sp->caption_ids[mid] < h->id) lo = mid + 1;
                    else hi = mid;
                }
                g = lo;
            }
            smp[i].top[a] = g;
            smp[i].score[a] = h->score;
            smp[i].right[a] = i2t ? ev->cap_img[g] == smp[i].query : g == ev->cap_img[smp[i].query];
        }
    }
    if (i2t) {
        ev->samples_i2t = smp;
        ev->n_samples_i2t = (int)ns;
    } else {
        ev->samples_t2i = smp;
        ev->n_samples_t2i = (int)ns;
    }
    smp = NULL;
cleanup:
    clipdb_free(msg);
    free(smp);
    free(qid);
    free(gv);
    free(qv);
    free(hits);
    return rc;
}

int clipdb_eval_run(clipdb_db *db, const clipdb_eval_options *opt, clipdb_eval **out)
{
    clipdb_eval *ev = calloc(1, sizeof *ev);
    char **set_names = NULL;
    const char **where = NULL;
    char *split_filter = NULL;
    clipdb_db_stats st;
    int rc, n_where, n_names = 0, i, first = 0;
    size_t c;
    double t0 = cdb_now();
    time_t now = time(NULL);
    struct tm tm;
    char date[32];

    *out = ev;
    if (!ev) return CLIPDB_ENOMEM;
    if (opt) ev->opt = *opt;
    else clipdb_eval_options_init(&ev->opt);
    if (!db) return cdb_err_set(&ev->err, CLIPDB_EINVAL, "no database");
    if ((rc = check_options(ev, &ev->opt)) != CLIPDB_OK) return rc;
    ev->opt.where = NULL; /* borrowed: not kept past this call */
    if ((rc = clipdb_db_get_stats(db, &st)) != CLIPDB_OK)
        return cdb_err_set(&ev->err, rc, "%s", clipdb_db_errmsg(db));
    ev->db_path = cdb_strdup(st.path);
    ev->model = cdb_strdup(st.model);
    ev->embed_dim = st.embed_dim;
    clipdb_db_stats_free(&st);
    gmtime_r(&now, &tm);
    strftime(date, sizeof date, "%Y-%m-%dT%H:%M:%SZ", &tm);
    ev->date = cdb_strdup(date);

    /* the split: every filter, plus split=VALUE */
    n_where = opt ? opt->n_where : 0;
    where = calloc((size_t)n_where + 1, sizeof *where);
    if (!where || !ev->db_path || !ev->model || !ev->date) {
        rc = cdb_err_set(&ev->err, CLIPDB_ENOMEM, "out of memory");
        goto cleanup;
    }
    for (i = 0; i < n_where; i++) where[i] = opt->where[i];
    if (ev->opt.split) {
        if (!(split_filter = cdb_sprintf("split=%s", ev->opt.split))) {
            rc = cdb_err_set(&ev->err, CLIPDB_ENOMEM, "out of memory");
            goto cleanup;
        }
        where[n_where++] = split_filter;
    }
    ev->opt.split = NULL;
    ev->split_desc = cdb_strdup(n_where ? "" : "all");
    for (i = 0; i < n_where && ev->split_desc; i++) {
        char *s = cdb_sprintf("%s%s%s", ev->split_desc, i ? " " : "", where[i]);
        free(ev->split_desc);
        ev->split_desc = s;
    }
    if (!ev->split_desc) {
        rc = cdb_err_set(&ev->err, CLIPDB_ENOMEM, "out of memory");
        goto cleanup;
    }
    if ((rc = cdb_db_split(db, where, n_where, &ev->split)) != CLIPDB_OK) {
        cdb_err_set(&ev->err, rc, "%s", clipdb_db_errmsg(db));
        goto cleanup;
    }
    if (ev->split->n_images == 0) {
        rc = cdb_err_set(&ev->err, CLIPDB_EINVAL, "no images in the split (%s) of %s",
                         ev->split_desc, ev->db_path);
        goto cleanup;
    }
    if (ev->split->n_captions == 0) {
        rc = cdb_err_set(&ev->err, CLIPDB_EINVAL,
                         "no captions linked to the %zu images of the split (%s): evaluation "
                         "needs images added with their captions (clipdb add --captions)",
                         ev->split->n_images, ev->split_desc);
        goto cleanup;
    }
    if (ev->opt.pairs_first && keep_first_captions(ev->split) != CLIPDB_OK) {
        rc = cdb_err_set(&ev->err, CLIPDB_ENOMEM, "out of memory");
        goto cleanup;
    }
    for (i = 0; i < ev->opt.n_ks; i++) {
        size_t g = ev->split->n_images < ev->split->n_captions ? ev->split->n_images
                                                               : ev->split->n_captions;
        if ((size_t)ev->opt.ks[i] > g) {
            rc = cdb_err_set(&ev->err, CLIPDB_EINVAL,
                             "k %d is larger than the gallery (%zu images, %zu captions in %s)",
                             ev->opt.ks[i], ev->split->n_images, ev->split->n_captions,
                             ev->split_desc);
            goto cleanup;
        }
    }
    ev->cap_img = cdb_malloc_array(ev->split->n_captions, sizeof *ev->cap_img);
    if (!ev->cap_img) {
        rc = cdb_err_set(&ev->err, CLIPDB_ENOMEM, "out of memory");
        goto cleanup;
    }
    for (c = 0; c < ev->split->n_captions; c++)
        ev->cap_img[c] = image_index(ev->split, ev->split->caption_image[c]);

    /* the vector sets */
    /* the vector sets: the database's list (base first), or the one asked for */
    if ((rc = cdb_db_vector_sets(db, &set_names, &n_names)) != CLIPDB_OK) {
        cdb_err_set(&ev->err, rc, "%s", clipdb_db_errmsg(db));
        goto cleanup;
    }
    if (ev->opt.vector_set) {
        for (i = 0; i < n_names && strcmp(set_names[i], ev->opt.vector_set); i++) {
        }
        if (i == n_names) {
            char *list = cdb_strdup(""), *next;
            for (i = 0; i < n_names && list; i++) {
                next = cdb_sprintf("%s%s%s", list, i ? ", " : "", set_names[i]);
                free(list);
                list = next;
            }
            rc = cdb_err_set(&ev->err, CLIPDB_ENOTFOUND,
                             "no vector set '%s' in %s (it has: %s)", ev->opt.vector_set,
                             ev->db_path, list ? list : CLIPDB_VECTOR_SET_BASE);
            free(list);
            goto cleanup;
        }
        first = i;
    }
    ev->sets = calloc((size_t)n_names, sizeof *ev->sets);
    if (!ev->sets) {
        rc = cdb_err_set(&ev->err, CLIPDB_ENOMEM, "out of memory");
        goto cleanup;
    }
    for (i = first; i < (ev->opt.vector_set ? first + 1 : n_names); i++) {
        cdb_eval_set *s = &ev->sets[ev->n_sets++];
        const char *model = NULL;
        if (!(s->name = cdb_strdup(set_names[i]))) {
            rc = cdb_err_set(&ev->err, CLIPDB_ENOMEM, "out of memory");
            goto cleanup;
        }
        if ((rc = cdb_db_set_shape(db, s->name, &s->dim, &model)) != CLIPDB_OK) {
            cdb_err_set(&ev->err, rc, "%s", clipdb_db_errmsg(db));
            goto cleanup;
        }
        if ((rc = eval_set(ev, db, s, model)) != CLIPDB_OK) goto cleanup;
    }
    ev->opt.vector_set = NULL;

    /* the random baseline: t2i one right image among N; i2t m right captions */
    {
        cdb_eval_set *s = &ev->sets[0];
        int64_t *m_t2i = NULL, *m_i2t = NULL;
        size_t ni = ev->split->n_images, nc = ev->split->n_captions;
        ev->random_t2i = cdb_malloc_array((size_t)s->kmax_t2i, sizeof(double));
        ev->random_i2t = cdb_malloc_array((size_t)s->kmax_i2t, sizeof(double));
        m_t2i = cdb_malloc_array(nc, sizeof *m_t2i);
        m_i2t = cdb_calloc_array(ni, sizeof *m_i2t);
        if (ev->random_t2i && ev->random_i2t && m_t2i && m_i2t) {
            for (c = 0; c < nc; c++) {
                m_t2i[c] = 1;
                m_i2t[ev->cap_img[c]]++;
            }
            cdb_eval_random_curve(m_t2i, nc, (int64_t)ni, s->kmax_t2i, ev->random_t2i);
            cdb_eval_random_curve(m_i2t, ni, (int64_t)nc, s->kmax_i2t, ev->random_i2t);
        } else {
            rc = cdb_err_set(&ev->err, CLIPDB_ENOMEM, "out of memory");
        }
        free(m_t2i);
        free(m_i2t);
        if (rc != CLIPDB_OK) goto cleanup;
    }
    if (ev->opt.compare_indexes && (rc = compare_indexes(ev, db)) != CLIPDB_OK) goto cleanup;
    if ((rc = draw_samples(ev, db, 1)) != CLIPDB_OK || (rc = draw_samples(ev, db, 0)) != CLIPDB_OK)
        goto cleanup;
    ev->total_seconds = cdb_now() - t0;
cleanup:
    cdb_db_vector_sets_free(set_names, n_names);
    free(where);
    free(split_filter);
    return rc;
}
