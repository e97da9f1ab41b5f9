/*
** json.c: every figure of an evaluation as one JSON object (cJSON); the
** format is documented in `clipdb eval --help` (src/cli/cmd_eval.c).
*/
#include <cjson/cJSON.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "eval/eval.h"

static const char *const metric_names[CDB_N_METRICS] = {"cosine", "dot", "l2"};

/* {"R@1": r, ..., "median_rank": m, "mean_rank": m, "queries": n, "gallery": n} */
static cJSON *dir_json(const clipdb_eval_summary *s, const clipdb_eval_dir *d)
{
    cJSON *o = cJSON_CreateObject();
    char key[32];
    int i;
    if (!o) return NULL;
    for (i = 0; i < s->n_ks; i++) {
        snprintf(key, sizeof key, "R@%d", s->ks[i]);
        cJSON_AddNumberToObject(o, key, d->recall[i]);
    }
    cJSON_AddNumberToObject(o, "median_rank", d->median_rank);
    cJSON_AddNumberToObject(o, "mean_rank", d->mean_rank);
    cJSON_AddNumberToObject(o, "queries", (double)d->queries);
    cJSON_AddNumberToObject(o, "gallery", (double)d->gallery);
    return o;
}

/* [[1, r1], [2, r2], ...] */
static cJSON *curve_json(const double *c, int kmax)
{
    cJSON *a = cJSON_CreateArray();
    int k;
    for (k = 1; a && k <= kmax; k++) {
        cJSON *p = cJSON_CreateArray();
        if (!p) break;
        cJSON_AddItemToArray(p, cJSON_CreateNumber(k));
        cJSON_AddItemToArray(p, cJSON_CreateNumber(c[k - 1]));
        cJSON_AddItemToArray(a, p);
    }
    return a;
}

static cJSON *ranks_json(const int64_t *ids, const int64_t *ranks, size_t n)
{
    cJSON *a = cJSON_CreateArray();
    size_t i;
    for (i = 0; a && i < n; i++) {
        cJSON *p = cJSON_CreateArray();
        if (!p) break;
        cJSON_AddItemToArray(p, cJSON_CreateNumber((double)ids[i]));
        cJSON_AddItemToArray(p, cJSON_CreateNumber((double)ranks[i]));
        cJSON_AddItemToArray(a, p);
    }
    return a;
}

static cJSON *curves_json(double *const *c, int kmax)
{
    cJSON *o = cJSON_CreateObject();
    int m;
    for (m = 0; o && m < CDB_N_METRICS; m++)
        cJSON_AddItemToObject(o, metric_names[m], curve_json(c[m], kmax));
    return o;
}

static cJSON *samples_json(const clipdb_eval *ev, int i2t)
{
    const cdb_split *sp = ev->split;
    const cdb_eval_sample *smp = i2t ? ev->samples_i2t : ev->samples_t2i;
    int n = i2t ? ev->n_samples_i2t : ev->n_samples_t2i, i, a;
    size_t c;
    cJSON *arr = cJSON_CreateArray();
    for (i = 0; arr && i < n; i++) {
        cJSON *o = cJSON_CreateObject(), *truth, *top;
        if (!o) break;
        cJSON_AddItemToArray(arr, o);
        if (i2t) {
            cJSON_AddStringToObject(o, "image", sp->image_paths[smp[i].query]);
            truth = cJSON_AddArrayToObject(o, "truth");
            for (c = 0; truth && c < sp->n_captions; c++)
                if (ev->cap_img[c] == smp[i].query)
                    cJSON_AddItemToArray(truth, cJSON_CreateString(sp->caption_texts[c]));
        } else {
            cJSON_AddStringToObject(o, "caption", sp->caption_texts[smp[i].query]);
            cJSON_AddStringToObject(o, "truth", sp->image_paths[ev->cap_img[smp[i].query]]);
        }
        top = cJSON_AddArrayToObject(o, "top");
        for (a = 0; top && a < smp[i].n_top; a++) {
            cJSON *t = cJSON_CreateObject();
            if (!t) break;
            if (i2t) cJSON_AddStringToObject(t, "caption", sp->caption_texts[smp[i].top[a]]);
            else cJSON_AddStringToObject(t, "image", sp->image_paths[smp[i].top[a]]);
            cJSON_AddNumberToObject(t, "score", smp[i].score[a]);
            cJSON_AddBoolToObject(t, "right", smp[i].right[a]);
            cJSON_AddItemToArray(top, t);
        }
    }
    return arr;
}

int clipdb_eval_json(clipdb_eval *ev, char **json)
{
    cJSON *root = NULL, *o, *sets, *rows;
    const cdb_eval_set *s0;
    int i;
    char *txt = NULL;

    if (json) *json = NULL;
    if (!ev || !json) return CLIPDB_EINVAL;
    if (ev->n_sets < 1) return cdb_err_set(&ev->err, CLIPDB_EINVAL, "no results to write");
    s0 = &ev->sets[0];
    root = cJSON_CreateObject();
    if (!root) goto oom;
    cJSON_AddStringToObject(root, "database", ev->db_path);
    cJSON_AddStringToObject(root, "model", s0->sum.model ? s0->sum.model : ev->model);
    cJSON_AddStringToObject(root, "vector_set", s0->name);
    cJSON_AddStringToObject(root, "split", ev->split_desc);
    cJSON_AddStringToObject(root, "date", ev->date);
    cJSON_AddStringToObject(root, "metric", metric_names[ev->opt.metric]);
    cJSON_AddStringToObject(root, "pairs", ev->opt.pairs_first ? "first" : "all");
    cJSON_AddNumberToObject(root, "images", (double)s0->sum.images);
    cJSON_AddNumberToObject(root, "captions", (double)s0->sum.captions);
    cJSON_AddNumberToObject(root, "images_without_captions",
                            (double)s0->sum.images_without_captions);
    cJSON_AddNumberToObject(root, "captions_outside", (double)s0->sum.captions_outside);
    cJSON_AddItemToObject(root, "t2i", dir_json(&s0->sum, &s0->sum.t2i));
    cJSON_AddItemToObject(root, "i2t", dir_json(&s0->sum, &s0->sum.i2t));
    o = cJSON_AddObjectToObject(root, "hit_rate");
    if (!o) goto oom;
    cJSON_AddItemToObject(o, "t2i", curves_json(s0->curve_t2i, s0->kmax_t2i));
    cJSON_AddItemToObject(o, "i2t", curves_json(s0->curve_i2t, s0->kmax_i2t));
    cJSON_AddItemToObject(root, "random", curve_json(ev->random_t2i, s0->kmax_t2i));
    cJSON_AddItemToObject(root, "random_i2t", curve_json(ev->random_i2t, s0->kmax_i2t));

    /* the model comparison: every vector set */
    sets = cJSON_AddArrayToObject(root, "sets");
    for (i = 0; sets && i < ev->n_sets; i++) {
        const cdb_eval_set *s = &ev->sets[i];
        cJSON *so = cJSON_CreateObject(), *h;
        if (!so) goto oom;
        cJSON_AddItemToArray(sets, so);
        cJSON_AddStringToObject(so, "name", s->name);
        cJSON_AddStringToObject(so, "model", s->sum.model);
        cJSON_AddItemToObject(so, "t2i", dir_json(&s->sum, &s->sum.t2i));
        cJSON_AddItemToObject(so, "i2t", dir_json(&s->sum, &s->sum.i2t));
        h = cJSON_AddObjectToObject(so, "hit_rate");
        if (h) {
            cJSON_AddItemToObject(h, "t2i", curve_json(s->curve_t2i[ev->opt.metric], s->kmax_t2i));
            cJSON_AddItemToObject(h, "i2t", curve_json(s->curve_i2t[ev->opt.metric], s->kmax_i2t));
        }
        cJSON_AddNumberToObject(so, "score_seconds", s->sum.score_seconds);
    }

    /* exact vs IVF vs Faiss */
    o = cJSON_AddObjectToObject(root, "index_comparison");
    if (!o) goto oom;
    if (ev->n_index_rows == 0) {
        cJSON_AddFalseToObject(o, "measured");
    } else {
        cJSON_AddTrueToObject(o, "measured");
        cJSON_AddStringToObject(o, "direction", "t2i");
        cJSON_AddStringToObject(o, "metric", metric_names[ev->opt.metric]);
        cJSON_AddNumberToObject(o, "k", ev->opt.index_k);
        cJSON_AddNumberToObject(o, "nlist", ev->index_nlist);
        cJSON_AddNumberToObject(o, "queries", (double)ev->split->n_captions);
        rows = cJSON_AddArrayToObject(o, "rows");
        for (i = 0; rows && i < ev->n_index_rows; i++) {
            const cdb_eval_index_row *r = &ev->index_rows[i];
            cJSON *ro = cJSON_CreateObject();
            char key[32];
            if (!ro) goto oom;
            cJSON_AddItemToArray(rows, ro);
            cJSON_AddStringToObject(ro, "index", r->kind);
            cJSON_AddNumberToObject(ro, "nprobe", r->nprobe);
            cJSON_AddNumberToObject(ro, "recall", r->recall);
            cJSON_AddNumberToObject(ro, "hit@1", r->hit1);
            snprintf(key, sizeof key, "hit@%d", ev->opt.index_k);
            cJSON_AddNumberToObject(ro, key, r->hitk);
            cJSON_AddNumberToObject(ro, "qps", r->qps);
            cJSON_AddNumberToObject(ro, "build_seconds", r->build_s);
        }
    }
    if (ev->index_note) cJSON_AddStringToObject(o, "note", ev->index_note);

    o = cJSON_AddObjectToObject(root, "samples");
    if (!o) goto oom;
    cJSON_AddItemToObject(o, "i2t", samples_json(ev, 1));
    cJSON_AddItemToObject(o, "t2i", samples_json(ev, 0));

    /* the rank of every query under opt.metric: [[item id, rank], ...], rank 0
    ** for an image without a caption */
    o = cJSON_AddObjectToObject(root, "ranks");
    if (!o) goto oom;
    cJSON_AddItemToObject(o, "t2i", ranks_json(ev->split->caption_ids, s0->ranks_t2i,
                                               ev->split->n_captions));
    cJSON_AddItemToObject(o, "i2t", ranks_json(ev->split->image_ids, s0->ranks_i2t,
                                               ev->split->n_images));

    o = cJSON_AddObjectToObject(root, "gpu");
    if (!o) goto oom;
    cJSON_AddFalseToObject(o, "measured");
    cJSON_AddStringToObject(o, "note",
                            "no GPU backend in this build: CPU against GPU timing not measured");

    o = cJSON_AddObjectToObject(root, "timing");
    if (!o) goto oom;
    cJSON_AddNumberToObject(o, "score_seconds", s0->sum.score_seconds);
    cJSON_AddNumberToObject(o, "total_seconds", ev->total_seconds);

    txt = cJSON_PrintUnformatted(root);
    if (!txt) goto oom;
    /* clipdb_free is free; cJSON allocates with malloc */
    *json = txt;
    cJSON_Delete(root);
    return CLIPDB_OK;
oom:
    cJSON_Delete(root);
    return cdb_err_set(&ev->err, CLIPDB_ENOMEM, "out of memory writing JSON");
}
