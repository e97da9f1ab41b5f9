/*
** search.c: the query pipeline and the index-building entry points.
** clipdb_db_search: validate -> query vectors (texts and images encoded in
** batches, stored items read) -> metadata filter (the sorted ids allowed)
** -> the index search of a stored-index type (sindex.h: exact, IVF, Faiss)
** -> results with their items' fields. clipdb_db_build_ivf/_faiss build an
** index with its type and store it in one transaction.
*/
#include <errno.h>
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cjson/cJSON.h>

#include "index/index.h"
#include "store/sindex.h"

void clipdb_search_options_init(clipdb_search_options *opt)
{
    memset(opt, 0, sizeof *opt);
    opt->target = CLIPDB_ITEM_IMAGE;
    opt->k = 10;
    opt->metric = CLIPDB_METRIC_COSINE;
    opt->index = CLIPDB_INDEX_EXACT;
    opt->nprobe = 8;
    opt->faiss = NULL;
}

void clipdb_index_options_init(clipdb_index_options *opt)
{
    memset(opt, 0, sizeof *opt);
    opt->target = CLIPDB_ITEM_IMAGE;
    opt->metric = CLIPDB_METRIC_COSINE;
    opt->seed = CLIPDB_DEFAULT_SEED;
}

/* ---- filters ------------------------------------------------------------------ */

static int cmp_i64(const void *a, const void *b)
{
    int64_t x = *(const int64_t *)a, y = *(const int64_t *)b;
    return x < y ? -1 : x > y;
}

/* The sorted ids matching every "FIELD=VALUE" of opt->where; *ids NULL when
** there is no filter. */
static int filter_ids(clipdb_db *db, const clipdb_search_options *opt, int64_t **ids_out,
                      size_t *n_out)
{
    sqlite3_stmt *st = NULL;
    int64_t *ids = NULL, *next = NULL;
    size_t n = 0, cap = 0, nn, a, b;
    int rc = CLIPDB_OK, w;

    *ids_out = NULL;
    *n_out = 0;
    if (opt->n_where <= 0) return CLIPDB_OK;
    rc = cdb_db_prepare(db,
                        "SELECT item FROM item_meta WHERE key = ?1 AND (value = ?2 OR value = ?3) "
                        "ORDER BY item",
                        &st);
    if (rc != CLIPDB_OK) return rc;
    for (w = 0; w < opt->n_where; w++) {
        const char *cond = opt->where[w], *eq = cond ? strchr(cond, '=') : NULL;
        char *end;
        long long iv;
        double dv;
        if (!eq || eq == cond) {
            rc = cdb_err_set(&db->err, CLIPDB_EINVAL, "bad filter '%s' (expected FIELD=VALUE)",
                             cond ? cond : "");
            goto cleanup;
        }
        sqlite3_reset(st);
        sqlite3_bind_text(st, 1, cond, (int)(eq - cond), SQLITE_STATIC);
        sqlite3_bind_text(st, 2, eq + 1, -1, SQLITE_STATIC);
        /* a number matches numeric metadata too (image_id=139) */
        errno = 0;
        iv = strtoll(eq + 1, &end, 10);
        if (!errno && *end == '\0' && end != eq + 1) sqlite3_bind_int64(st, 3, iv);
        else if ((dv = strtod(eq + 1, &end)), *end == '\0' && end != eq + 1)
            sqlite3_bind_double(st, 3, dv);
        else sqlite3_bind_text(st, 3, eq + 1, -1, SQLITE_STATIC);
        nn = 0;
        free(next);
        next = NULL;
        cap = 0;
        while (sqlite3_step(st) == SQLITE_ROW) {
            if (cdb_grow((void **)&next, &cap, nn + 1, sizeof *next)) {
                rc = cdb_err_set(&db->err, CLIPDB_ENOMEM, "out of memory");
                goto cleanup;
            }
            next[nn++] = sqlite3_column_int64(st, 0);
        }
        if (w == 0) {
            free(ids);
            ids = next;
            n = nn;
            next = NULL;
            continue;
        }
        /* intersect two sorted lists, in place */
        for (a = b = 0, cap = 0; a < n && b < nn;) {
            if (ids[a] < next[b]) a++;
            else if (ids[a] > next[b]) b++;
            else {
                ids[cap++] = ids[a];
                a++;
                b++;
            }
        }
        n = cap;
    }
    if (!ids) ids = malloc(sizeof *ids); /* an empty, non-NULL list: nothing allowed */
    if (!ids) {
        rc = cdb_err_set(&db->err, CLIPDB_ENOMEM, "out of memory");
        goto cleanup;
    }
    qsort(ids, n, sizeof *ids, cmp_i64);
    *ids_out = ids;
    *n_out = n;
    ids = NULL;
cleanup:
    sqlite3_finalize(st);
    free(ids);
    free(next);
    return rc;
}

/* ---- query vectors ------------------------------------------------------------ */

/* The vector set a search runs on: base (v NULL) or a named one, the
** dimension of its vectors, and (once a query needs encoding) the model and
** context that encode its queries. */
typedef struct search_space {
    cdb_vset *v;
    int d;
    clipdb_model *m;
    clipdb_ctx *ctx;
} search_space;

static int item_vector(clipdb_db *db, const search_space *sp, int64_t id, float *out)
{
    sqlite3_stmt *st = NULL;
    int rc = cdb_db_prepare(db,
                            sp->v ? "SELECT vec FROM set_vectors WHERE set_id = ?2 AND id = ?1"
                                  : "SELECT vec FROM vectors_image WHERE id = ?1 UNION ALL "
                                    "SELECT vec FROM vectors_text WHERE id = ?1",
                            &st);
    if (rc != CLIPDB_OK) return rc;
    sqlite3_bind_int64(st, 1, id);
    if (sp->v) sqlite3_bind_int64(st, 2, sp->v->sid);
    if (sqlite3_step(st) != SQLITE_ROW) {
        if (sp->v)
            rc = cdb_err_set(&db->err, CLIPDB_ENOTFOUND,
                             "%s: no item with id %lld in vector set '%s'", db->path,
                             (long long)id, sp->v->name);
        else
            rc = cdb_err_set(&db->err, CLIPDB_ENOTFOUND, "%s: no item with id %lld", db->path,
                             (long long)id);
    } else if ((size_t)sqlite3_column_bytes(st, 0) != (size_t)sp->d * sizeof(float)) {
        rc = cdb_err_set(&db->err, CLIPDB_EFORMAT, "%s: corrupt vector of item %lld", db->path,
                         (long long)id);
    } else {
        memcpy(out, sqlite3_column_blob(st, 0), (size_t)sp->d * sizeof(float));
    }
    sqlite3_finalize(st);
    return rc;
}

/* Encodes the queries of kind `qkind` (texts or image files) with the one
** batched encoder and writes each vector to its row of q (nq x d). The
** encoder's status code (the image decoder's, the tokenizer's) is kept. */
static int encode_queries(clipdb_db *db, const search_space *sp, const clipdb_query *queries,
                          size_t nq, clipdb_query_kind qkind, float *q)
{
    const char **inputs = NULL;
    size_t *rows = NULL, n = 0, i;
    float *vecs = NULL;
    int rc = CLIPDB_OK;

    for (i = 0; i < nq; i++) n += queries[i].kind == qkind && (qkind == CLIPDB_QUERY_TEXT || queries[i].path);
    if (n == 0) return CLIPDB_OK;
    if (n > INT32_MAX) return cdb_err_set(&db->err, CLIPDB_ELIMIT, "search: too many queries");
    inputs = cdb_malloc_array(n, sizeof *inputs);
    rows = cdb_malloc_array(n, sizeof *rows);
    vecs = cdb_malloc_array(n, (size_t)sp->d * sizeof(float));
    if (!inputs || !rows || !vecs) {
        rc = cdb_err_set(&db->err, CLIPDB_ENOMEM, "out of memory");
        goto cleanup;
    }
    for (i = n = 0; i < nq; i++)
        if (queries[i].kind == qkind && (qkind == CLIPDB_QUERY_TEXT || queries[i].path)) {
            rows[n] = i;
            inputs[n++] = qkind == CLIPDB_QUERY_TEXT ? queries[i].text : queries[i].path;
        }
    // texts (n) -> text tower, or image files (n) -> decode -> vision tower -> vecs (n, d)
    rc = clipdb_encode_batch(sp->ctx,
                             qkind == CLIPDB_QUERY_TEXT ? CLIPDB_INPUT_TEXT : CLIPDB_INPUT_IMAGE_FILE,
                             inputs, (int)n, vecs, NULL, NULL);
    if (rc != CLIPDB_OK) {
        cdb_err_set(&db->err, rc, "%s", clipdb_ctx_errmsg(sp->ctx));
        goto cleanup;
    }
    for (i = 0; i < n; i++)
        memcpy(q + rows[i] * (size_t)sp->d, vecs + i * (size_t)sp->d,
               (size_t)sp->d * sizeof(float));
cleanup:
    free(inputs);
    free(rows);
    free(vecs);
    return rc;
}

/* The preprocessed in-memory query images held at once: bounds the pixel
** buffer of encode_memory_images whatever the number of queries (64 MiB:
** 111 images of 224 px; any number of the tiny test models' 32 px ones). */
#define CDB_QUERY_PIXEL_BYTES ((size_t)64 << 20)

static int is_memory_image(const clipdb_query *x)
{
    return x->kind == CLIPDB_QUERY_IMAGE && !x->path;
}

/* Encodes the image queries given as bytes in memory (data/len, no path: an
** HTTP upload) into their rows of q. The images of a window (all of them,
** unless their pixels exceed CDB_QUERY_PIXEL_BYTES) are decoded first, each
** with its own status; when every one decoded, the window goes to the
** batched encoder in one call (its image groups: one forward per group, not
** per image). A query that does not decode fails the search before any
** encoding of its window, with its decoder's status code and a message
** naming its query index (and how many more of the window failed). */
static int encode_memory_images(clipdb_db *db, const search_space *sp,
                                const clipdb_query *queries, size_t nq, float *q)
{
    size_t px = clipdb_image_floats(sp->m), d = (size_t)sp->d, n = 0, win, i, k, j;
    size_t *rows = NULL;
    float *pixels = NULL, *vecs = NULL;
    clipdb_item_status bad = {CLIPDB_OK, ""};
    size_t bad_query = 0, n_bad = 0;
    int rc = CLIPDB_OK;

    for (i = 0; i < nq; i++) n += is_memory_image(&queries[i]);
    if (n == 0) return CLIPDB_OK;
    win = CDB_QUERY_PIXEL_BYTES / (px * sizeof(float));
    if (win == 0) win = 1;
    if (win > n) win = n;
    rows = cdb_malloc_array(win, sizeof *rows);
    pixels = cdb_malloc_array(win, px * sizeof(float));
    vecs = cdb_malloc_array(win, d * sizeof(float));
    if (!rows || !pixels || !vecs) {
        rc = cdb_err_set(&db->err, CLIPDB_ENOMEM, "out of memory");
        goto cleanup;
    }
    for (i = 0; i < nq;) {
        /* decode up to win images: every one, keeping each failure's status */
        for (k = 0; k < win && i < nq; i++) {
            const clipdb_query *x = &queries[i];
            int s;
            if (!is_memory_image(x)) continue;
            // bytes -> decode + preprocess -> pixels[k] (3, S, S)
            s = clipdb_image_load_memory(sp->ctx, x->data, x->len, pixels + k * px);
            if (s == CLIPDB_OK) {
                rows[k++] = i;
            } else if (n_bad++ == 0) {
                bad.code = s;
                snprintf(bad.msg, sizeof bad.msg, "%s", clipdb_ctx_errmsg(sp->ctx));
                bad_query = i;
            }
        }
        if (n_bad) {
            char more[80] = "";
            if (n_bad > 1)
                snprintf(more, sizeof more, " (and %zu more image queries that did not decode)",
                         n_bad - 1);
            rc = cdb_err_set(&db->err, bad.code, "query %zu: %s%s", bad_query, bad.msg, more);
            goto cleanup;
        }
        if (k == 0) continue;
        // pixels (k, 3, S, S) -> vision tower, in the encoder's groups -> vecs (k, d)
        if ((rc = clipdb_encode_images(sp->ctx, pixels, (int)k, vecs)) != CLIPDB_OK) {
            cdb_err_set(&db->err, rc, "image queries: %s", clipdb_ctx_errmsg(sp->ctx));
            goto cleanup;
        }
        for (j = 0; j < k; j++) memcpy(q + rows[j] * d, vecs + j * d, d * sizeof(float));
    }
cleanup:
    free(rows);
    free(pixels);
    free(vecs);
    return rc;
}

/* Encodes or fetches the nq query vectors into q (nq x d): texts in one
** batch, image files in another, images in memory in a third, items from the
** set searched. The queries are encoded with the set's model. */
static int query_vectors(clipdb_db *db, search_space *sp, const clipdb_query *queries, size_t nq,
                         float *q)
{
    size_t i;
    int rc, encode = 0;

    /* items, and the model when a query needs it */
    for (i = 0; i < nq; i++) {
        const clipdb_query *x = &queries[i];
        if (x->kind == CLIPDB_QUERY_ITEM) {
            if ((rc = item_vector(db, sp, x->item, q + i * (size_t)sp->d)) != CLIPDB_OK)
                return rc;
        } else if (x->kind == CLIPDB_QUERY_TEXT || x->kind == CLIPDB_QUERY_IMAGE) {
            if ((x->kind == CLIPDB_QUERY_TEXT && !x->text) ||
                (x->kind == CLIPDB_QUERY_IMAGE && !x->path && !x->data))
                return cdb_err_set(&db->err, CLIPDB_EINVAL, "query %zu: no text or path", i);
            encode = 1;
        } else {
            return cdb_err_set(&db->err, CLIPDB_EINVAL, "query %zu: bad kind %d", i, (int)x->kind);
        }
    }
    if (!encode) return CLIPDB_OK;
    if (sp->v) {
        if ((rc = cdb_vset_ctx(db, sp->v, &sp->ctx)) != CLIPDB_OK) return rc;
        sp->m = sp->v->model;
    } else {
        if ((rc = clipdb_db_model(db, &sp->m)) != CLIPDB_OK) return rc;
        sp->ctx = db->ctx;
    }
    if ((rc = encode_queries(db, sp, queries, nq, CLIPDB_QUERY_TEXT, q)) != CLIPDB_OK) return rc;
    if ((rc = encode_queries(db, sp, queries, nq, CLIPDB_QUERY_IMAGE, q)) != CLIPDB_OK) return rc;
    return encode_memory_images(db, sp, queries, nq, q);
}

/* ---- results -------------------------------------------------------------------- */

void clipdb_results_free(clipdb_results *r)
{
    size_t i;
    if (!r) return;
    if (r->results && r->offsets)
        for (i = 0; i < r->offsets[r->nq]; i++) {
            free((char *)r->results[i].path);
            free((char *)r->results[i].abspath);
            free((char *)r->results[i].text);
            free((char *)r->results[i].meta_json);
        }
    free(r->results);
    free(r->offsets);
    free((char *)r->note);
    free(r);
}

/* Fills the fields of result x (id and score set) from the database. */
static int fill_result(clipdb_db *db, sqlite3_stmt *item, sqlite3_stmt *meta, clipdb_result *x)
{
    cJSON *obj = NULL;
    char *js = NULL;
    int rc = CLIPDB_OK;

    sqlite3_reset(item);
    sqlite3_bind_int64(item, 1, x->id);
    if (sqlite3_step(item) != SQLITE_ROW)
        return cdb_err_set(&db->err, CLIPDB_ENOTFOUND, "%s: item %lld vanished", db->path,
                           (long long)x->id);
    x->type = sqlite3_column_int(item, 0);
    x->image = sqlite3_column_type(item, 4) == SQLITE_NULL ? -1 : sqlite3_column_int64(item, 4);
#define DUP_COL(field, col)                                                     \
    if (sqlite3_column_type(item, col) != SQLITE_NULL &&                        \
        !(x->field = cdb_strdup((const char *)sqlite3_column_text(item, col)))) \
        rc = CLIPDB_ENOMEM;
    DUP_COL(path, 1)
    DUP_COL(abspath, 2)
    DUP_COL(text, 3)
#undef DUP_COL
    sqlite3_reset(item);
    obj = cJSON_CreateObject();
    if (!obj) rc = CLIPDB_ENOMEM;
    sqlite3_reset(meta);
    sqlite3_bind_int64(meta, 1, x->id);
    while (rc == CLIPDB_OK && sqlite3_step(meta) == SQLITE_ROW) {
        const char *k = (const char *)sqlite3_column_text(meta, 0);
        cJSON *v = NULL;
        switch (sqlite3_column_type(meta, 1)) {
        case SQLITE_INTEGER:
        case SQLITE_FLOAT: v = cJSON_CreateNumber(sqlite3_column_double(meta, 1)); break;
        case SQLITE_NULL: v = cJSON_CreateNull(); break;
        default: v = cJSON_CreateString((const char *)sqlite3_column_text(meta, 1)); break;
        }
        if (!v || !k || !cJSON_AddItemToObject(obj, k, v)) {
            cJSON_Delete(v);
            rc = CLIPDB_ENOMEM;
        }
    }
    sqlite3_reset(meta);
    if (rc == CLIPDB_OK && !(js = cJSON_PrintUnformatted(obj))) rc = CLIPDB_ENOMEM;
    x->meta_json = js;
    cJSON_Delete(obj);
    if (rc != CLIPDB_OK) return cdb_err_set(&db->err, rc, "out of memory");
    return CLIPDB_OK;
}

static int item_stmts(clipdb_db *db, sqlite3_stmt **item, sqlite3_stmt **meta)
{
    int rc = cdb_db_prepare(db, "SELECT type, path, abspath, text, image FROM items WHERE id = ?",
                            item);
    if (rc == CLIPDB_OK)
        rc = cdb_db_prepare(db, "SELECT key, value FROM item_meta WHERE item = ? ORDER BY key",
                            meta);
    return rc;
}

int clipdb_db_get_item(clipdb_db *db, int64_t id, clipdb_results **out)
{
    sqlite3_stmt *item = NULL, *meta = NULL, *caps = NULL;
    clipdb_results *res = NULL;
    int64_t *ids = NULL;
    size_t n = 1, cap = 0, i;
    int rc;

    *out = NULL;
    cdb_err_clear(&db->err);
    if ((rc = item_stmts(db, &item, &meta)) != CLIPDB_OK) goto cleanup;
    if ((rc = cdb_db_prepare(db, "SELECT id FROM items WHERE image = ? ORDER BY id", &caps)) !=
        CLIPDB_OK)
        goto cleanup;
    /* the item, then its captions */
    if (cdb_grow((void **)&ids, &cap, 1, sizeof *ids) != 0) goto nomem;
    ids[0] = id;
    sqlite3_bind_int64(caps, 1, id);
    while (sqlite3_step(caps) == SQLITE_ROW) {
        if (cdb_grow((void **)&ids, &cap, n + 1, sizeof *ids) != 0) goto nomem;
        ids[n++] = sqlite3_column_int64(caps, 0);
    }
    res = calloc(1, sizeof *res);
    if (!res) goto nomem;
    res->nq = 1;
    res->offsets = cdb_calloc_array(2, sizeof *res->offsets);
    res->results = cdb_calloc_array(n, sizeof *res->results);
    if (!res->offsets || !res->results) goto nomem;
    for (i = 0; i < n; i++) {
        res->results[i].id = ids[i];
        res->offsets[1] = i + 1;
        if ((rc = fill_result(db, item, meta, &res->results[i])) != CLIPDB_OK) {
            if (rc == CLIPDB_ENOTFOUND)
                rc = cdb_err_set(&db->err, CLIPDB_ENOTFOUND, "no item %lld", (long long)id);
            goto cleanup;
        }
    }
    *out = res;
    res = NULL;
    goto cleanup;
nomem:
    rc = cdb_err_set(&db->err, CLIPDB_ENOMEM, "out of memory");
cleanup:
    sqlite3_finalize(item);
    sqlite3_finalize(meta);
    sqlite3_finalize(caps);
    clipdb_results_free(res);
    free(ids);
    return rc;
}

/* ---- the search ------------------------------------------------------------------ */

/* Checks the options every search shares, then those of the index type. */
static int validate(clipdb_db *db, const clipdb_query *queries, size_t nq,
                    const clipdb_search_options *opt, const cdb_sindex_type **type)
{
    *type = NULL;
    if (nq == 0 || !queries) return cdb_err_set(&db->err, CLIPDB_EINVAL, "search: no query");
    if (opt->target != CLIPDB_ITEM_IMAGE && opt->target != CLIPDB_ITEM_TEXT)
        return cdb_err_set(&db->err, CLIPDB_EINVAL, "search: bad target %d", opt->target);
    if (!cdb_metric_ok(opt->metric))
        return cdb_err_set(&db->err, CLIPDB_EINVAL, "search: bad metric %d", (int)opt->metric);
    if (opt->k < 1 || opt->k > CLIPDB_MAX_K)
        return cdb_err_set(&db->err, CLIPDB_EINVAL, "search: k must be 1 to %d", CLIPDB_MAX_K);
    if (opt->n_where < 0 || (opt->n_where > 0 && !opt->where))
        return cdb_err_set(&db->err, CLIPDB_EINVAL, "search: bad filters");
    if (!(*type = cdb_sindex_type_of(opt->index)))
        return cdb_err_set(&db->err, CLIPDB_EINVAL, "search: bad index kind %d", (int)opt->index);
    if (opt->vector_set && strcmp(opt->vector_set, CLIPDB_VECTOR_SET_BASE) &&
        opt->index != CLIPDB_INDEX_EXACT)
        return cdb_err_set(&db->err, CLIPDB_EINVAL,
                           "search: stored %s indexes serve the base vector set only; search "
                           "vector set '%.80s' with the exact index (--index exact)",
                           (*type)->name, opt->vector_set);
    return (*type)->validate ? (*type)->validate(db, opt) : CLIPDB_OK;
}

/* *note (caller frees) says how many items of `type` set v lacks, or NULL
** when it has them all. */
static int set_gap_note(clipdb_db *db, const cdb_vset *v, int type, size_t have, char **note)
{
    int64_t all = 0;
    int rc = cdb_db_count_items(db, type, 0, &all);
    *note = NULL;
    if (rc != CLIPDB_OK || all <= (int64_t)have) return rc;
    *note = cdb_sprintf("vector set '%s' lacks %lld of %lld %s; run 'clipdb reembed %s --model "
                        "%s --as %s' to add them (this search covers the %zu it has)",
                        v->name, (long long)(all - (int64_t)have), (long long)all,
                        type == CLIPDB_ITEM_IMAGE ? "images" : "texts", db->path, v->model_dir,
                        v->name, have);
    if (!*note) return cdb_err_set(&db->err, CLIPDB_ENOMEM, "out of memory");
    return CLIPDB_OK;
}

/* Runs the index search of c with type: the loaded (stored) index of the
** set, or for a Faiss spec given with the search, one built in memory for
** this call. *note: a remark of the load (belongs to db), or NULL. */
static int index_search(clipdb_db *db, const cdb_sindex_type *type, const cdb_search_call *c,
                        clipdb_hit *hits, int *n_out, const char **note)
{
    const clipdb_search_options *opt = c->opt;
    cdb_sindex *s = NULL, tmp;
    int rc;
    *note = NULL;
    if (type == &cdb_sindex_faiss && opt->faiss) {
        memset(&tmp, 0, sizeof tmp);
        tmp.type = type;
        tmp.set = opt->target;
        tmp.metric = opt->metric;
        rc = type->build(db, &tmp, c->vs, NULL, opt->faiss);
        if (rc == CLIPDB_OK) rc = type->search(db, &tmp, c, hits, n_out);
        if (tmp.impl) type->release(&tmp);
        return rc;
    }
    if ((rc = cdb_sindex_get(db, type, opt->target, opt->metric, c->vs, &s)) != CLIPDB_OK)
        return rc;
    *note = s->note;
    return type->search(db, s, c, hits, n_out);
}

/* Results of the nq queries from hits (nq x k, n_out per query) with the
** fields of their items. */
static int make_results(clipdb_db *db, const clipdb_hit *hits, size_t nq, int k, int n_out,
                        clipdb_results **out)
{
    clipdb_results *res = calloc(1, sizeof *res);
    sqlite3_stmt *item = NULL, *meta = NULL;
    size_t i, j, total = 0;
    int rc = CLIPDB_OK;

    *out = NULL;
    if (!res) return cdb_err_set(&db->err, CLIPDB_ENOMEM, "out of memory");
    res->nq = nq;
    res->offsets = cdb_calloc_array(nq + 1, sizeof *res->offsets);
    res->results = cdb_calloc_array(nq * (size_t)(n_out > 0 ? n_out : 1), sizeof *res->results);
    if (!res->offsets || !res->results) {
        rc = cdb_err_set(&db->err, CLIPDB_ENOMEM, "out of memory");
        goto cleanup;
    }
    if ((rc = item_stmts(db, &item, &meta)) != CLIPDB_OK) goto cleanup;
    for (i = 0; i < nq && rc == CLIPDB_OK; i++) {
        res->offsets[i] = total;
        for (j = 0; j < (size_t)n_out; j++) {
            const clipdb_hit *h = &hits[i * (size_t)k + j];
            clipdb_result *x;
            if (h->id < 0) break;
            x = &res->results[total++];
            x->id = h->id;
            x->score = h->score;
            if ((rc = fill_result(db, item, meta, x)) != CLIPDB_OK) break;
        }
    }
cleanup:
    if (res->offsets) res->offsets[nq] = total;
    sqlite3_finalize(item);
    sqlite3_finalize(meta);
    if (rc != CLIPDB_OK) clipdb_results_free(res);
    else *out = res;
    return rc;
}

int clipdb_db_search(clipdb_db *db, const clipdb_query *queries, size_t nq,
                     const clipdb_search_options *opt, clipdb_results **out)
{
    clipdb_search_options def, capped;
    const cdb_sindex_type *type;
    cdb_search_call call;
    const cdb_vecset *vs;
    search_space sp;
    clipdb_hit *hits = NULL;
    char *gap = NULL;
    float *q = NULL;
    int64_t *allowed = NULL;
    size_t n_allowed = 0;
    const char *note = NULL, *compressed = NULL, *scan_isa = NULL;
    double t0 = cdb_now(), t_enc = 0;
    int rc, n_out = 0, snapshot = 0;

    *out = NULL;
    if (!opt) {
        clipdb_search_options_init(&def);
        opt = &def;
    }
    cdb_err_clear(&db->err);
    if ((rc = validate(db, queries, nq, opt, &type)) != CLIPDB_OK) return rc;
    memset(&sp, 0, sizeof sp);
    sp.d = db->embed_dim;
    /* One read transaction: the vectors, the filter and the items' rows come
    ** from one snapshot, so a concurrent rm cannot make a hit vanish. */
    if (sqlite3_get_autocommit(db->sql)) {
        if ((rc = cdb_db_exec(db, "BEGIN")) != CLIPDB_OK) return rc;
        snapshot = 1;
    }
    if (opt->vector_set && strcmp(opt->vector_set, CLIPDB_VECTOR_SET_BASE)) {
        if ((rc = cdb_vset_find(db, opt->vector_set, &sp.v)) != CLIPDB_OK) goto cleanup;
        sp.d = sp.v->dim;
    }
    q = cdb_malloc_array(nq, (size_t)sp.d * sizeof(float));
    if (!q) {
        rc = cdb_err_set(&db->err, CLIPDB_ENOMEM, "out of memory");
        goto cleanup;
    }
    if ((rc = query_vectors(db, &sp, queries, nq, q)) != CLIPDB_OK) goto cleanup;
    t_enc = cdb_now() - t0;
    if (sp.v) rc = cdb_vset_vectors(db, sp.v, opt->target, &vs);
    else rc = cdb_db_vectors(db, opt->target, &vs);
    if (rc != CLIPDB_OK) goto cleanup;
    if (sp.v && (rc = set_gap_note(db, sp.v, opt->target, vs->n, &gap)) != CLIPDB_OK) goto cleanup;
    /* No query can have more results than there are vectors: k is capped at
    ** their count, so the hit buffers (nq x k) stay within what is stored. */
    if ((size_t)opt->k > vs->n) {
        capped = *opt;
        capped.k = vs->n > 0 ? (int)vs->n : 1;
        opt = &capped;
    }
    hits = cdb_malloc_array(nq, (size_t)opt->k * sizeof *hits);
    if (!hits) {
        rc = cdb_err_set(&db->err, CLIPDB_ENOMEM, "out of memory");
        goto cleanup;
    }
    if ((rc = filter_ids(db, opt, &allowed, &n_allowed)) != CLIPDB_OK) goto cleanup;
    call = (cdb_search_call){vs, q, nq, opt->k, opt, allowed, n_allowed, &compressed, &scan_isa};
    if (vs->n > 0 && (rc = index_search(db, type, &call, hits, &n_out, &note)) != CLIPDB_OK)
        goto cleanup;
    if (gap) note = gap;
    if ((rc = make_results(db, hits, nq, opt->k, n_out, out)) != CLIPDB_OK) goto cleanup;
    (*out)->took_ms = (cdb_now() - t0) * 1000.0;
    (*out)->encode_ms = t_enc * 1000.0;
    (*out)->compressed = compressed;
    (*out)->scan_isa = scan_isa;
    if (note && !((*out)->note = cdb_strdup(note))) {
        rc = cdb_err_set(&db->err, CLIPDB_ENOMEM, "out of memory");
        clipdb_results_free(*out);
        *out = NULL;
    }
cleanup:
    /* a read transaction: nothing to write; COMMIT only ends the snapshot */
    if (snapshot && !sqlite3_get_autocommit(db->sql))
        sqlite3_exec(db->sql, rc == CLIPDB_OK ? "COMMIT" : "ROLLBACK", NULL, NULL, NULL);
    free(gap);
    free(allowed);
    free(hits);
    free(q);
    return rc;
}

/* ---- building stored indexes ---------------------------------------------------- */

/* Builds the index of `type` over the stored vectors of opt->target and
** stores it, replacing the earlier one of (target, metric). */
#define BUILD_TRIES 3 /* builds of an index while writers commit (build_stored) */

static int build_stored(clipdb_db *db, const cdb_sindex_type *type,
                        const clipdb_index_options *opt, const char *spec)
{
    clipdb_index_options def;
    const cdb_vecset *vs;
    cdb_sindex s;
    int64_t ver;
    int rc, in_tx = 0, tries;

    if (!opt) {
        clipdb_index_options_init(&def);
        opt = &def;
    }
    cdb_err_clear(&db->err);
    if (opt->target != CLIPDB_ITEM_IMAGE && opt->target != CLIPDB_ITEM_TEXT)
        return cdb_err_set(&db->err, CLIPDB_EINVAL, "index: bad target %d", opt->target);
    if (!cdb_metric_ok(opt->metric))
        return cdb_err_set(&db->err, CLIPDB_EINVAL, "index: bad metric %d", (int)opt->metric);
    if (db->readonly)
        return cdb_err_set(&db->err, CLIPDB_EINVAL, "%s: opened read-only; cannot store an index",
                           db->path);
    memset(&s, 0, sizeof s);
    /* Built outside the write lock (k-means takes a while), then stored only
    ** if no other process committed meanwhile: a writer committing between
    ** the read and the store would leave its vectors out of the lists (or
    ** deleted ones in them). Else built again; the last try builds while
    ** holding the lock. */
    for (tries = 1;; tries++) {
        int locked = tries == BUILD_TRIES;
        if (locked) {
            if ((rc = cdb_db_begin(db)) != CLIPDB_OK) goto cleanup;
            in_tx = 1;
        }
        if ((rc = cdb_db_vectors(db, opt->target, &vs)) != CLIPDB_OK) goto cleanup;
        ver = vs->data_version;
        s.type = type;
        s.set = opt->target;
        s.metric = opt->metric;
        if ((rc = type->build(db, &s, vs, opt, spec)) != CLIPDB_OK) goto cleanup;
        if (locked) break;
        if ((rc = cdb_db_begin(db)) != CLIPDB_OK) goto cleanup;
        in_tx = 1;
        if ((rc = cdb_db_vectors(db, opt->target, &vs)) != CLIPDB_OK) goto cleanup;
        if (vs->data_version == ver) break;
        cdb_db_rollback(db);
        in_tx = 0;
        if (s.impl) type->release(&s);
        memset(&s, 0, sizeof s);
    }
    if ((rc = type->store(db, &s, vs)) != CLIPDB_OK) goto cleanup;
    rc = cdb_db_commit(db);
    in_tx = 0;
    /* the loaded index of this set and metric (and IVF's assigner) is stale */
    cdb_sindex_forget(db, type, opt->target, opt->metric);
cleanup:
    if (in_tx) cdb_db_rollback(db);
    if (s.impl) type->release(&s);
    return rc;
}

int clipdb_db_build_ivf(clipdb_db *db, const clipdb_index_options *opt)
{
    return build_stored(db, &cdb_sindex_ivf, opt, NULL);
}

int clipdb_db_build_faiss(clipdb_db *db, const clipdb_index_options *opt, const char *factory)
{
    if (!factory || !*factory) {
        cdb_err_clear(&db->err);
        return cdb_err_set(&db->err, CLIPDB_EINVAL, "index: no Faiss factory string");
    }
    return build_stored(db, &cdb_sindex_faiss, opt, factory);
}

/* ---- compressed copies (the rows: compressed.c) ------------------------------- */

int clipdb_db_set_compressed(clipdb_db *db, const char *space, int target, clipdb_compress kind)
{
    const cdb_vecset *vs = NULL;
    const char *name = CLIPDB_VECTOR_SET_BASE;
    clipdb_cvecs *c = NULL;
    cdb_vset *v = NULL;
    char *msg = NULL;
    int rc, in_tx = 0, dropped = 0;

    cdb_err_clear(&db->err);
    if (target != CLIPDB_ITEM_IMAGE && target != CLIPDB_ITEM_TEXT)
        return cdb_err_set(&db->err, CLIPDB_EINVAL, "compress: bad target %d", target);
    if (kind < CLIPDB_COMPRESS_NONE || kind > CLIPDB_COMPRESS_FP16)
        return cdb_err_set(&db->err, CLIPDB_EINVAL, "compress: bad kind %d", (int)kind);
    if (db->readonly)
        return cdb_err_set(&db->err, CLIPDB_EINVAL,
                           "%s: opened read-only; cannot change a compressed copy", db->path);
    if ((rc = cdb_db_begin(db)) != CLIPDB_OK) return rc;
    in_tx = 1;
    if (space && strcmp(space, CLIPDB_VECTOR_SET_BASE)) {
        if ((rc = cdb_vset_find(db, space, &v)) != CLIPDB_OK) goto cleanup;
        name = v->name;
        rc = cdb_vset_vectors(db, v, target, &vs);
    } else {
        rc = cdb_db_vectors(db, target, &vs);
    }
    if (rc != CLIPDB_OK) goto cleanup;
    if (kind == CLIPDB_COMPRESS_NONE) {
        if ((rc = cdb_compressed_drop(db, name, target, &dropped)) != CLIPDB_OK) goto cleanup;
        if (!dropped) {
            rc = cdb_err_set(&db->err, CLIPDB_ENOTFOUND,
                             "%s: no compressed copy of the %s vectors of set '%s'", db->path,
                             cdb_set_name(target), name);
            goto cleanup;
        }
    } else {
        clipdb_vecs base = {vs->vecs, vs->ids, vs->norms, vs->n, vs->d};
        if (kind == CLIPDB_COMPRESS_SQ8 && vs->n == 0) {
            rc = cdb_err_set(&db->err, CLIPDB_EINVAL,
                             "%s: no %s vectors in set '%s' to take sq8 ranges from", db->path,
                             cdb_set_name(target), name);
            goto cleanup;
        }
        /* sq8: the ranges of the vectors stored now (the codes are rebuilt at load) */
        if ((rc = clipdb_cvecs_build(&base, kind, NULL, &c, &msg)) != CLIPDB_OK) {
            rc = cdb_err_set(&db->err, rc, "compress: %s", msg ? msg : "failed");
            goto cleanup;
        }
        if ((rc = cdb_compressed_store(db, name, target, c)) != CLIPDB_OK) goto cleanup;
    }
    rc = cdb_db_commit(db);
    in_tx = 0;
    cdb_compressed_forget(vs);
cleanup:
    if (in_tx) cdb_db_rollback(db);
    clipdb_cvecs_free(c);
    free(msg);
    return rc;
}
