/*
** search.c: queries (texts, images, stored items) against the stored
** vectors of one item type, through the index module: exact search
** (clipdb_flat_search, one matrix product for many queries), IVF
** (clipdb_ivf, centroids and list assignments kept in the database) or a
** Faiss index built on the fly. Metadata filters become the allowed-rows
** filter of the index module, so filtered searches return k results when k
** items match.
*/
#include <errno.h>
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cjson/cJSON.h>

#include "cuda/cuda.h"
#include "index/index.h"
#include "store/store.h"

#define QUERY_CHUNK 64 /* texts or images encoded per call */

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
    opt->seed = 1234;
}

static const char *type_name(int t)
{
    return t == CLIPDB_ITEM_TEXT ? "text" : "image";
}

/* ---- IVF bookkeeping ------------------------------------------------------ */

void cdb_db_ivf_release(clipdb_db *db)
{
    int t, m;
    for (t = 0; t < 3; t++)
        for (m = 0; m < 3; m++) {
            clipdb_ivf_free(db->ivf[t][m]);
            db->ivf[t][m] = NULL;
            clipdb_ivf_free(db->ivf_assigner[t][m]);
            db->ivf_assigner[t][m] = NULL;
            cdb_faiss_free(db->faiss[t][m]);
            db->faiss[t][m] = NULL;
            free(db->faiss_note[t][m]);
            db->faiss_note[t][m] = NULL;
        }
}

/* An empty index holding the stored centroids of (target, metric), to
** assign new vectors; *out NULL when there is no such index. */
static int load_centroids(clipdb_db *db, int target, clipdb_metric metric, clipdb_ivf **out)
{
    sqlite3_stmt *st = NULL;
    int rc, s;
    *out = NULL;
    rc = cdb_db_prepare(db, "SELECT nlist, dim, centroids FROM ivf WHERE target = ? AND metric = ?",
                        &st);
    if (rc != CLIPDB_OK) return rc;
    sqlite3_bind_int(st, 1, target);
    sqlite3_bind_int(st, 2, metric);
    s = sqlite3_step(st);
    if (s == SQLITE_ROW) {
        int nlist = sqlite3_column_int(st, 0), dim = sqlite3_column_int(st, 1);
        const void *c = sqlite3_column_blob(st, 2);
        size_t want = (size_t)(nlist > 0 ? nlist : 0) * (size_t)db->embed_dim * sizeof(float);
        if (dim != db->embed_dim || nlist < 1 || nlist > CLIPDB_MAX_NLIST || !c ||
            (size_t)sqlite3_column_bytes(st, 2) != want) {
            rc = cdb_err_set(&db->err, CLIPDB_EFORMAT, "%s: corrupt IVF index (%s, %s)", db->path,
                             type_name(target), clipdb_metric_name(metric));
        } else if (clipdb_ivf_new_from_centroids(out, dim, nlist, metric, c) !=
                   CLIPDB_OK) {
            rc = cdb_err_set(&db->err, CLIPDB_ERROR, "IVF: %s", clipdb_ivf_errmsg(*out));
            clipdb_ivf_free(*out);
            *out = NULL;
        }
    } else if (s != SQLITE_DONE) {
        rc = cdb_db_sqlerr(db, "reading the IVF index");
    }
    sqlite3_finalize(st);
    return rc;
}

int cdb_db_ivf_on_insert(clipdb_db *db, int type, int64_t id, const float *vec)
{
    sqlite3_stmt *st = NULL, *ins = NULL;
    int rc, metrics[3], n = 0, i;
    rc = cdb_db_prepare(db, "SELECT metric FROM ivf WHERE target = ?", &st);
    if (rc != CLIPDB_OK) return rc;
    sqlite3_bind_int(st, 1, type);
    while (n < 3 && sqlite3_step(st) == SQLITE_ROW) metrics[n++] = sqlite3_column_int(st, 0);
    sqlite3_finalize(st);
    for (i = 0; i < n && rc == CLIPDB_OK; i++) {
        int m = metrics[i];
        int32_t list;
        if (m < 0 || m > 2) continue;
        if (!db->ivf_assigner[type][m] &&
            (rc = load_centroids(db, type, (clipdb_metric)m, &db->ivf_assigner[type][m])) != CLIPDB_OK)
            break;
        if (!db->ivf_assigner[type][m]) continue;
        // vec (1, d) -> nearest of the nlist centroids -> list
        if (clipdb_ivf_assign(db->ivf_assigner[type][m], vec, 1, &list) != CLIPDB_OK) {
            rc = cdb_err_set(&db->err, CLIPDB_ERROR, "IVF assign: %s",
                             clipdb_ivf_errmsg(db->ivf_assigner[type][m]));
            break;
        }
        rc = cdb_db_prepare(db,
                            "INSERT OR REPLACE INTO ivf_assign(target, metric, id, list) "
                            "VALUES(?, ?, ?, ?)",
                            &ins);
        if (rc != CLIPDB_OK) break;
        sqlite3_bind_int(ins, 1, type);
        sqlite3_bind_int(ins, 2, m);
        sqlite3_bind_int64(ins, 3, id);
        sqlite3_bind_int(ins, 4, list);
        if (sqlite3_step(ins) != SQLITE_DONE) rc = cdb_db_sqlerr(db, "writing an IVF assignment");
        sqlite3_finalize(ins);
        ins = NULL;
    }
    return rc;
}

/* Inside a transaction: replaces the per-id rows of the index of (target,
** metric): runs del_sql (binding target, metric), then ins_sql for each of
** the n ids (binding target, metric, id, and lists[i] when lists is set). */
static int replace_index_ids(clipdb_db *db, const char *del_sql, const char *ins_sql, int target,
                             clipdb_metric metric, const int64_t *ids, const int32_t *lists,
                             size_t n)
{
    sqlite3_stmt *st = NULL;
    size_t i;
    int rc = cdb_db_prepare(db, del_sql, &st);
    if (rc != CLIPDB_OK) return rc;
    sqlite3_bind_int(st, 1, target);
    sqlite3_bind_int(st, 2, (int)metric);
    if (sqlite3_step(st) != SQLITE_DONE) rc = cdb_db_sqlerr(db, "replacing an index");
    sqlite3_finalize(st);
    if (rc != CLIPDB_OK || (rc = cdb_db_prepare(db, ins_sql, &st)) != CLIPDB_OK) return rc;
    for (i = 0; i < n && rc == CLIPDB_OK; i++) {
        sqlite3_reset(st);
        sqlite3_bind_int(st, 1, target);
        sqlite3_bind_int(st, 2, (int)metric);
        sqlite3_bind_int64(st, 3, ids[i]);
        if (lists) sqlite3_bind_int(st, 4, lists[i]);
        if (sqlite3_step(st) != SQLITE_DONE) rc = cdb_db_sqlerr(db, "writing an index");
    }
    sqlite3_finalize(st);
    return rc;
}

int clipdb_db_build_ivf(clipdb_db *db, const clipdb_index_options *opt)
{
    clipdb_index_options def;
    clipdb_ivf_train_options topt;
    const cdb_vecset *vs;
    clipdb_ivf *ivf = NULL;
    sqlite3_stmt *st = NULL;
    int32_t *lists = NULL;
    int rc, nlist, in_tx = 0;

    if (!opt) {
        clipdb_index_options_init(&def);
        opt = &def;
    }
    cdb_err_clear(&db->err);
    if (opt->target != CLIPDB_ITEM_IMAGE && opt->target != CLIPDB_ITEM_TEXT)
        return cdb_err_set(&db->err, CLIPDB_EINVAL, "index: bad target %d", opt->target);
    if (!cdb_metric_ok(opt->metric))
        return cdb_err_set(&db->err, CLIPDB_EINVAL, "index: bad metric %d", (int)opt->metric);
    if ((rc = cdb_db_vectors(db, opt->target, &vs)) != CLIPDB_OK) return rc;
    if (vs->n == 0)
        return cdb_err_set(&db->err, CLIPDB_EINVAL, "%s: no %s vectors to index", db->path,
                           type_name(opt->target));
    nlist = opt->nlist > 0 ? opt->nlist : (int)lround(sqrt((double)vs->n));
    if (nlist < 1) nlist = 1;
    if ((size_t)nlist > vs->n)
        return cdb_err_set(&db->err, CLIPDB_EINVAL,
                           "%s: %d lists need at least %d %s vectors (the database holds %zu)",
                           db->path, nlist, nlist, type_name(opt->target), vs->n);
    clipdb_ivf_train_options_init(&topt);
    topt.seed = opt->seed;
    lists = cdb_malloc_array(vs->n, sizeof *lists);
    if (!lists) return cdb_err_set(&db->err, CLIPDB_ENOMEM, "out of memory");
    if (clipdb_ivf_new(&ivf, db->embed_dim, nlist, opt->metric) != CLIPDB_OK ||
        clipdb_ivf_train(ivf, vs->vecs, vs->n, &topt) != CLIPDB_OK ||
        clipdb_ivf_assign(ivf, vs->vecs, vs->n, lists) != CLIPDB_OK) {
        rc = cdb_err_set(&db->err, CLIPDB_ERROR, "IVF: %s", clipdb_ivf_errmsg(ivf));
        goto cleanup;
    }
    if ((rc = cdb_db_begin(db)) != CLIPDB_OK) goto cleanup;
    in_tx = 1;
    rc = cdb_db_prepare(db,
                        "INSERT OR REPLACE INTO ivf(target, metric, nlist, dim, seed, centroids) "
                        "VALUES(?, ?, ?, ?, ?, ?)",
                        &st);
    if (rc != CLIPDB_OK) goto cleanup;
    sqlite3_bind_int(st, 1, opt->target);
    sqlite3_bind_int(st, 2, opt->metric);
    sqlite3_bind_int(st, 3, nlist);
    sqlite3_bind_int(st, 4, db->embed_dim);
    sqlite3_bind_int64(st, 5, (sqlite3_int64)opt->seed);
    sqlite3_bind_blob(st, 6, clipdb_ivf_centroids(ivf),
                      (int)((size_t)nlist * (size_t)db->embed_dim * sizeof(float)), SQLITE_STATIC);
    if (sqlite3_step(st) != SQLITE_DONE) {
        rc = cdb_db_sqlerr(db, "writing the IVF index");
        goto cleanup;
    }
    sqlite3_finalize(st);
    st = NULL;
    rc = replace_index_ids(db, "DELETE FROM ivf_assign WHERE target = ? AND metric = ?",
                           "INSERT INTO ivf_assign(target, metric, id, list) VALUES(?, ?, ?, ?)",
                           opt->target, opt->metric, vs->ids, lists, vs->n);
    if (rc != CLIPDB_OK) goto cleanup;
    rc = cdb_db_commit(db);
    in_tx = 0;
    /* the cached indexes of this target and metric are stale now */
    clipdb_ivf_free(db->ivf_assigner[opt->target][opt->metric]);
    db->ivf_assigner[opt->target][opt->metric] = NULL;
    clipdb_ivf_free(db->ivf[opt->target][opt->metric]);
    db->ivf[opt->target][opt->metric] = NULL;
cleanup:
    sqlite3_finalize(st);
    if (in_tx) cdb_db_rollback(db);
    clipdb_ivf_free(ivf);
    free(lists);
    return rc;
}

/* The IVF index of (target, metric) with every stored vector in its list,
** loaded from the database (cached until the database changes). */
static int ivf_for_search(clipdb_db *db, int target, clipdb_metric metric, const cdb_vecset *vs,
                          clipdb_ivf **out)
{
    sqlite3_stmt *st = NULL;
    clipdb_ivf *ivf = NULL;
    int32_t *lists = NULL;
    size_t i;
    int rc;

    *out = NULL;
    if (db->ivf[target][metric] && db->ivf_changes[target][metric] == vs->changes &&
        db->ivf_version[target][metric] == vs->data_version) {
        *out = db->ivf[target][metric];
        return CLIPDB_OK;
    }
    clipdb_ivf_free(db->ivf[target][metric]);
    db->ivf[target][metric] = NULL;
    if ((rc = load_centroids(db, target, metric, &ivf)) != CLIPDB_OK) return rc;
    if (!ivf)
        return cdb_err_set(&db->err, CLIPDB_ENOTFOUND,
                           "%s: no IVF index for %s vectors and metric %s; build one with "
                           "'clipdb index %s --ivf --target %s --metric %s'",
                           db->path, type_name(target), clipdb_metric_name(metric),
                           db->path, type_name(target), clipdb_metric_name(metric));
    lists = cdb_malloc_array(vs->n, sizeof *lists);
    if (!lists) {
        rc = cdb_err_set(&db->err, CLIPDB_ENOMEM, "out of memory");
        goto cleanup;
    }
    for (i = 0; i < vs->n; i++) lists[i] = -1;
    rc = cdb_db_prepare(db,
                        "SELECT id, list FROM ivf_assign WHERE target = ? AND metric = ? "
                        "ORDER BY id",
                        &st);
    if (rc != CLIPDB_OK) goto cleanup;
    sqlite3_bind_int(st, 1, target);
    sqlite3_bind_int(st, 2, metric);
    i = 0;
    /* both sorted by id: merge */
    while (sqlite3_step(st) == SQLITE_ROW) {
        int64_t id = sqlite3_column_int64(st, 0);
        while (i < vs->n && vs->ids[i] < id) i++;
        if (i < vs->n && vs->ids[i] == id) lists[i] = sqlite3_column_int(st, 1);
    }
    /* vectors without an assignment (none when written by clipdb) get one */
    for (i = 0; i < vs->n; i++)
        if (lists[i] < 0 &&
            clipdb_ivf_assign(ivf, vs->vecs + i * (size_t)db->embed_dim, 1, &lists[i]) !=
                CLIPDB_OK) {
            rc = cdb_err_set(&db->err, CLIPDB_ERROR, "IVF: %s", clipdb_ivf_errmsg(ivf));
            goto cleanup;
        }
    if (clipdb_ivf_add_assigned(ivf, vs->ids, vs->vecs, lists, vs->n) != CLIPDB_OK) {
        rc = cdb_err_set(&db->err, CLIPDB_ERROR, "IVF: %s", clipdb_ivf_errmsg(ivf));
        goto cleanup;
    }
    db->ivf[target][metric] = ivf;
    db->ivf_changes[target][metric] = vs->changes;
    db->ivf_version[target][metric] = vs->data_version;
    *out = ivf;
    ivf = NULL;
cleanup:
    sqlite3_finalize(st);
    clipdb_ivf_free(ivf);
    free(lists);
    return rc;
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
            if (nn == cap) {
                size_t nc = cap ? 2 * cap : 256;
                int64_t *p = realloc(next, nc * sizeof *p);
                if (!p) {
                    rc = cdb_err_set(&db->err, CLIPDB_ENOMEM, "out of memory");
                    goto cleanup;
                }
                next = p;
                cap = nc;
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

static int item_vector(clipdb_db *db, int64_t id, float *out)
{
    sqlite3_stmt *st = NULL;
    int rc = cdb_db_prepare(db,
                            "SELECT vec FROM vectors_image WHERE id = ?1 UNION ALL "
                            "SELECT vec FROM vectors_text WHERE id = ?1",
                            &st);
    if (rc != CLIPDB_OK) return rc;
    sqlite3_bind_int64(st, 1, id);
    if (sqlite3_step(st) != SQLITE_ROW) {
        rc = cdb_err_set(&db->err, CLIPDB_ENOTFOUND, "%s: no item with id %lld", db->path,
                         (long long)id);
    } else if ((size_t)sqlite3_column_bytes(st, 0) != (size_t)db->embed_dim * sizeof(float)) {
        rc = cdb_err_set(&db->err, CLIPDB_EFORMAT, "%s: corrupt vector of item %lld", db->path,
                         (long long)id);
    } else {
        memcpy(out, sqlite3_column_blob(st, 0), (size_t)db->embed_dim * sizeof(float));
    }
    sqlite3_finalize(st);
    return rc;
}

/* Encodes n texts (texts != NULL) or n preprocessed images (pixels) and
** writes vector j to row rows[j] of q (nq x d). */
static int encode_chunk(clipdb_db *db, const char **texts, const float *pixels, size_t n,
                        const size_t *rows, float *q)
{
    float *tmp = cdb_malloc_array(n, (size_t)db->embed_dim * sizeof(float));
    size_t j;
    int rc;
    if (!tmp) return cdb_err_set(&db->err, CLIPDB_ENOMEM, "out of memory");
    // texts (n) -> text tower, or pixels (n, 3, S, S) -> vision tower -> tmp (n, d)
    rc = texts ? clipdb_encode_texts(db->ctx, texts, (int)n, tmp)
               : clipdb_encode_images(db->ctx, pixels, (int)n, tmp);
    if (rc != CLIPDB_OK) {
        rc = cdb_err_set(&db->err, CLIPDB_ERROR, "encoding the query %s: %s",
                         texts ? "text" : "image", clipdb_ctx_errmsg(db->ctx));
    } else {
        for (j = 0; j < n; j++)
            memcpy(q + rows[j] * (size_t)db->embed_dim, tmp + j * (size_t)db->embed_dim,
                   (size_t)db->embed_dim * sizeof(float));
    }
    free(tmp);
    return rc;
}

/* Encodes or fetches the nq query vectors into q (nq x d): texts in
** batches, images in batches, items from the database. */
static int query_vectors(clipdb_db *db, const clipdb_query *queries, size_t nq, float *q)
{
    const char **texts = NULL;
    size_t *rows = NULL, n = 0, i;
    float *pixels = NULL;
    clipdb_model *m = NULL;
    size_t img_floats = 0;
    int rc = CLIPDB_OK;

    texts = cdb_calloc_array(QUERY_CHUNK, sizeof *texts);
    rows = cdb_calloc_array(QUERY_CHUNK, sizeof *rows);
    if (!texts || !rows) {
        rc = cdb_err_set(&db->err, CLIPDB_ENOMEM, "out of memory");
        goto cleanup;
    }
    /* items, and the model when a query needs it */
    for (i = 0; i < nq; i++) {
        const clipdb_query *x = &queries[i];
        if (x->kind == CLIPDB_QUERY_ITEM) {
            if ((rc = item_vector(db, x->item, q + i * (size_t)db->embed_dim)) != CLIPDB_OK)
                goto cleanup;
        } else if (x->kind == CLIPDB_QUERY_TEXT || x->kind == CLIPDB_QUERY_IMAGE) {
            if ((x->kind == CLIPDB_QUERY_TEXT && !x->text) || (x->kind == CLIPDB_QUERY_IMAGE && !x->path)) {
                rc = cdb_err_set(&db->err, CLIPDB_EINVAL, "query %zu: no text or path", i);
                goto cleanup;
            }
            if (!m && (rc = clipdb_db_model(db, &m)) != CLIPDB_OK) goto cleanup;
        } else {
            rc = cdb_err_set(&db->err, CLIPDB_EINVAL, "query %zu: bad kind %d", i, (int)x->kind);
            goto cleanup;
        }
    }
    if (!m) goto cleanup;
    // texts: chunks of (n) -> text tower -> (n, d) rows of q
    for (i = 0; i <= nq; i++) {
        if (i < nq && queries[i].kind == CLIPDB_QUERY_TEXT) {
            rows[n] = i;
            texts[n++] = queries[i].text;
        }
        if (n == QUERY_CHUNK || (i == nq && n > 0)) {
            if ((rc = encode_chunk(db, texts, NULL, n, rows, q)) != CLIPDB_OK) goto cleanup;
            n = 0;
        }
    }
    // images: chunks of (n, 3, S, S) -> vision tower -> (n, d) rows of q
    img_floats = clipdb_image_floats(m);
    for (i = 0; i <= nq; i++) {
        if (i < nq && queries[i].kind == CLIPDB_QUERY_IMAGE) {
            if (!pixels && !(pixels = cdb_malloc_array(QUERY_CHUNK, img_floats * sizeof(float)))) {
                rc = cdb_err_set(&db->err, CLIPDB_ENOMEM, "out of memory");
                goto cleanup;
            }
            if (clipdb_image_load(db->ctx, queries[i].path, pixels + n * img_floats) !=
                CLIPDB_OK) {
                rc = cdb_err_set(&db->err, CLIPDB_EFORMAT, "%s", clipdb_ctx_errmsg(db->ctx));
                goto cleanup;
            }
            rows[n++] = i;
        }
        if (n == QUERY_CHUNK || (i == nq && n > 0)) {
            if ((rc = encode_chunk(db, NULL, pixels, n, rows, q)) != CLIPDB_OK) goto cleanup;
            n = 0;
        }
    }
cleanup:
    free(texts);
    free(rows);
    free(pixels);
    return rc;
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

/* ---- the search --------------------------------------------------------------------- */

/* ---- Faiss indexes ------------------------------------------------------------------- */

int cdb_db_faiss_mark_stale(clipdb_db *db, int64_t id)
{
    sqlite3_stmt *st = NULL;
    int rc;
    if (db->format_version < 2) return CLIPDB_OK;
    rc = cdb_db_prepare(db, "UPDATE faiss_ids SET stale = 1 WHERE id = ?", &st);
    if (rc != CLIPDB_OK) return rc;
    sqlite3_bind_int64(st, 1, id);
    if (sqlite3_step(st) != SQLITE_DONE) rc = cdb_db_sqlerr(db, "marking a Faiss entry stale");
    sqlite3_finalize(st);
    return rc;
}

/* A new Faiss index from `factory`, trained on and holding every vector of
** vs. *out (free with cdb_faiss_free) only on success. */
static int faiss_build(clipdb_db *db, const char *factory, clipdb_metric metric,
                       const cdb_vecset *vs, cdb_faiss **out)
{
    cdb_faiss *f = NULL;
    int rc = CLIPDB_OK;
    *out = NULL;
    // vs (n, d) -> train (k-means for IVF) -> add with ids
    if (cdb_faiss_new(&f, db->embed_dim, factory, metric) != CLIPDB_OK ||
        cdb_faiss_train(f, vs->vecs, vs->n) != CLIPDB_OK ||
        cdb_faiss_add(f, vs->ids, vs->vecs, vs->n) != CLIPDB_OK) {
        rc = cdb_err_set(&db->err, f ? CLIPDB_ERROR : CLIPDB_ENOMEM, "%s",
                         f ? cdb_faiss_errmsg(f) : "out of memory");
        cdb_faiss_free(f);
        return rc;
    }
    *out = f;
    return CLIPDB_OK;
}

int clipdb_db_build_faiss(clipdb_db *db, const clipdb_index_options *opt, const char *factory)
{
    clipdb_index_options def;
    const cdb_vecset *vs;
    cdb_faiss *f = NULL;
    sqlite3_stmt *st = NULL;
    uint8_t *blob = NULL;
    size_t len = 0;
    char hex[65];
    int rc, in_tx = 0;

    if (!opt) {
        clipdb_index_options_init(&def);
        opt = &def;
    }
    cdb_err_clear(&db->err);
    if (opt->target != CLIPDB_ITEM_IMAGE && opt->target != CLIPDB_ITEM_TEXT)
        return cdb_err_set(&db->err, CLIPDB_EINVAL, "index: bad target %d", opt->target);
    if (!cdb_metric_ok(opt->metric))
        return cdb_err_set(&db->err, CLIPDB_EINVAL, "index: bad metric %d", (int)opt->metric);
    if (!factory || !*factory)
        return cdb_err_set(&db->err, CLIPDB_EINVAL, "index: no Faiss factory string");
    if (db->readonly || db->format_version < 2)
        return cdb_err_set(&db->err, CLIPDB_EINVAL, "%s: opened read-only; cannot store an index",
                           db->path);
    if ((rc = cdb_db_vectors(db, opt->target, &vs)) != CLIPDB_OK) return rc;
    if (vs->n == 0)
        return cdb_err_set(&db->err, CLIPDB_EINVAL, "%s: no %s vectors to index", db->path,
                           type_name(opt->target));
    if ((rc = faiss_build(db, factory, opt->metric, vs, &f)) != CLIPDB_OK) goto cleanup;
    if (cdb_faiss_serialize(f, &blob, &len) != CLIPDB_OK) {
        rc = cdb_err_set(&db->err, CLIPDB_ERROR, "%s", cdb_faiss_errmsg(f));
        goto cleanup;
    }
    if (len > (size_t)INT32_MAX) {
        rc = cdb_err_set(&db->err, CLIPDB_ELIMIT,
                         "%s: the Faiss index is %zu bytes, more than a database value holds",
                         db->path, len);
        goto cleanup;
    }
    if ((rc = cdb_sha256_hex(blob, len, hex, &db->err)) != CLIPDB_OK) goto cleanup;
    if ((rc = cdb_db_begin(db)) != CLIPDB_OK) goto cleanup;
    in_tx = 1;
    rc = cdb_db_prepare(db,
                        "INSERT OR REPLACE INTO faiss(target, metric, factory, dim, sha256, blob, "
                        "built_at) VALUES(?, ?, ?, ?, ?, ?, strftime('%s','now'))",
                        &st);
    if (rc != CLIPDB_OK) goto cleanup;
    sqlite3_bind_int(st, 1, opt->target);
    sqlite3_bind_int(st, 2, (int)opt->metric);
    sqlite3_bind_text(st, 3, factory, -1, SQLITE_STATIC);
    sqlite3_bind_int(st, 4, db->embed_dim);
    sqlite3_bind_text(st, 5, hex, -1, SQLITE_STATIC);
    sqlite3_bind_blob(st, 6, blob, (int)len, SQLITE_STATIC);
    if (sqlite3_step(st) != SQLITE_DONE) {
        rc = cdb_db_sqlerr(db, "writing the Faiss index");
        goto cleanup;
    }
    sqlite3_finalize(st);
    st = NULL;
    rc = replace_index_ids(db, "DELETE FROM faiss_ids WHERE target = ? AND metric = ?",
                           "INSERT INTO faiss_ids(target, metric, id) VALUES(?, ?, ?)",
                           opt->target, opt->metric, vs->ids, NULL, vs->n);
    if (rc != CLIPDB_OK) goto cleanup;
    rc = cdb_db_commit(db);
    in_tx = 0;
    cdb_faiss_free(db->faiss[opt->target][opt->metric]);
    db->faiss[opt->target][opt->metric] = NULL;
cleanup:
    sqlite3_finalize(st);
    if (in_tx) cdb_db_rollback(db);
    cdb_faiss_free(f);
    free(blob);
    return rc;
}

/* Reads the stored Faiss index of (target, metric): checks the SHA-256 of
** the bytes before Faiss sees them. *f NULL when there is none. *factory
** (caller frees) gets its factory string. */
static int faiss_read_stored(clipdb_db *db, int target, clipdb_metric metric, cdb_faiss **f,
                             char **factory)
{
    sqlite3_stmt *st = NULL;
    char hex[65];
    int rc, s;

    *f = NULL;
    *factory = NULL;
    if (db->format_version < 2) return CLIPDB_OK;
    rc = cdb_db_prepare(db,
                        "SELECT factory, dim, sha256, blob FROM faiss WHERE target = ? AND "
                        "metric = ?",
                        &st);
    if (rc != CLIPDB_OK) return rc;
    sqlite3_bind_int(st, 1, target);
    sqlite3_bind_int(st, 2, (int)metric);
    s = sqlite3_step(st);
    if (s == SQLITE_ROW) {
        const uint8_t *blob = sqlite3_column_blob(st, 3);
        size_t len = (size_t)sqlite3_column_bytes(st, 3);
        const char *want = (const char *)sqlite3_column_text(st, 2);
        if (!(*factory = cdb_strdup((const char *)sqlite3_column_text(st, 0)))) {
            rc = cdb_err_set(&db->err, CLIPDB_ENOMEM, "out of memory");
        } else if (sqlite3_column_int(st, 1) != db->embed_dim || !blob || len == 0 || !want) {
            rc = cdb_err_set(&db->err, CLIPDB_EFORMAT, "%s: corrupt stored Faiss index (%s, %s)",
                             db->path, type_name(target), clipdb_metric_name(metric));
        } else if ((rc = cdb_sha256_hex(blob, len, hex, &db->err)) != CLIPDB_OK) {
            /* message set */
        } else if (strcmp(hex, want)) {
            rc = cdb_err_set(&db->err, CLIPDB_EFORMAT,
                             "%s: the stored Faiss index (%s, %s) is corrupt (SHA-256 of its "
                             "bytes does not match); rebuild it with 'clipdb index %s --faiss "
                             "\"%s\" --target %s --metric %s'",
                             db->path, type_name(target), clipdb_metric_name(metric), db->path,
                             *factory, type_name(target), clipdb_metric_name(metric));
        } else if (cdb_faiss_deserialize(f, blob, len, metric) != CLIPDB_OK ||
                   cdb_faiss_dim(*f) != db->embed_dim) {
            rc = cdb_err_set(&db->err, CLIPDB_EFORMAT, "%s: stored Faiss index (%s, %s): %s",
                             db->path, type_name(target), clipdb_metric_name(metric),
                             *f && cdb_faiss_dim(*f) ? "wrong dimension" : cdb_faiss_errmsg(*f));
        }
    } else if (s != SQLITE_DONE) {
        rc = cdb_db_sqlerr(db, "reading the Faiss index");
    }
    sqlite3_finalize(st);
    if (rc != CLIPDB_OK) {
        cdb_faiss_free(*f);
        *f = NULL;
        free(*factory);
        *factory = NULL;
    }
    return rc;
}

/* Grows an id list by one. */
static int push_id(clipdb_db *db, int64_t **v, size_t *n, size_t *cap, int64_t id)
{
    if (*n == *cap) {
        size_t nc = *cap ? 2 * *cap : 64;
        int64_t *p = realloc(*v, nc * sizeof *p);
        if (!p) return cdb_err_set(&db->err, CLIPDB_ENOMEM, "out of memory");
        *v = p;
        *cap = nc;
    }
    (*v)[(*n)++] = id;
    return CLIPDB_OK;
}

/* The stored Faiss index of (target, metric) brought up to date with vs:
** ids deleted or replaced since the build removed, new ones added (an
** index that cannot remove is rebuilt from its factory string, with a
** note). Cached on db until the database changes. */
static int faiss_for_search(clipdb_db *db, int target, clipdb_metric metric, const cdb_vecset *vs,
                            cdb_faiss **out, const char **note)
{
    sqlite3_stmt *st = NULL;
    cdb_faiss *f = NULL, *g = NULL;
    char *factory = NULL;
    int64_t *rm = NULL, *add = NULL;
    float *x = NULL;
    size_t n_rm = 0, cap_rm = 0, n_add = 0, cap_add = 0, i, j;
    int rc;

    *out = NULL;
    *note = NULL;
    if (db->faiss[target][metric] && db->faiss_changes[target][metric] == vs->changes &&
        db->faiss_version[target][metric] == vs->data_version) {
        *out = db->faiss[target][metric];
        *note = db->faiss_note[target][metric];
        return CLIPDB_OK;
    }
    cdb_faiss_free(db->faiss[target][metric]);
    db->faiss[target][metric] = NULL;
    free(db->faiss_note[target][metric]);
    db->faiss_note[target][metric] = NULL;
    if ((rc = faiss_read_stored(db, target, metric, &f, &factory)) != CLIPDB_OK) return rc;
    if (!f)
        return cdb_err_set(&db->err, CLIPDB_ENOTFOUND,
                           "%s: no stored Faiss index for %s vectors and metric %s; build one "
                           "with 'clipdb index %s --faiss \"IVF100,Flat\" --target %s --metric "
                           "%s' (or give --faiss SPEC to build one for this search)",
                           db->path, type_name(target), clipdb_metric_name(metric), db->path,
                           type_name(target), clipdb_metric_name(metric));
    /* the ids it holds vs the stored vectors (both sorted): stale or gone
    ** ones leave it, stored ones it lacks join it */
    rc = cdb_db_prepare(db,
                        "SELECT id, stale FROM faiss_ids WHERE target = ? AND metric = ? "
                        "ORDER BY id",
                        &st);
    if (rc != CLIPDB_OK) goto cleanup;
    sqlite3_bind_int(st, 1, target);
    sqlite3_bind_int(st, 2, (int)metric);
    i = 0;
    while (sqlite3_step(st) == SQLITE_ROW) {
        int64_t id = sqlite3_column_int64(st, 0);
        int stale = sqlite3_column_int(st, 1);
        for (; i < vs->n && vs->ids[i] < id; i++)
            if ((rc = push_id(db, &add, &n_add, &cap_add, vs->ids[i])) != CLIPDB_OK) goto cleanup;
        int present = i < vs->n && vs->ids[i] == id;
        if ((stale || !present) && (rc = push_id(db, &rm, &n_rm, &cap_rm, id)) != CLIPDB_OK)
            goto cleanup;
        if (present) {
            if (stale && (rc = push_id(db, &add, &n_add, &cap_add, id)) != CLIPDB_OK) goto cleanup;
            i++;
        }
    }
    for (; i < vs->n; i++)
        if ((rc = push_id(db, &add, &n_add, &cap_add, vs->ids[i])) != CLIPDB_OK) goto cleanup;
    if (n_rm > 0 && cdb_faiss_remove(f, rm, n_rm, NULL) != CLIPDB_OK) {
        /* e.g. HNSW: no removal. Rebuild from the stored vectors. */
        char buf[512];
        snprintf(buf, sizeof buf,
                 "the stored Faiss index \"%s\" cannot remove the %zu items deleted or changed "
                 "since it was built (%s); rebuilt it in memory for this search; run 'clipdb "
                 "index %s --faiss \"%s\"' to store an up-to-date one",
                 factory, n_rm, cdb_faiss_errmsg(f), db->path, factory);
        if ((rc = faiss_build(db, factory, metric, vs, &g)) != CLIPDB_OK) goto cleanup;
        cdb_faiss_free(f);
        f = g;
        n_add = 0;
        if (!(db->faiss_note[target][metric] = cdb_strdup(buf))) {
            rc = cdb_err_set(&db->err, CLIPDB_ENOMEM, "out of memory");
            goto cleanup;
        }
    }
    if (n_add > 0) {
        x = cdb_malloc_array(n_add, (size_t)db->embed_dim * sizeof(float));
        if (!x) {
            rc = cdb_err_set(&db->err, CLIPDB_ENOMEM, "out of memory");
            goto cleanup;
        }
        // gather the new rows of vs (both id lists sorted) -> x (n_add, d)
        for (i = j = 0; i < vs->n && j < n_add; i++)
            if (vs->ids[i] == add[j])
                memcpy(x + j++ * (size_t)db->embed_dim, vs->vecs + i * (size_t)db->embed_dim,
                       (size_t)db->embed_dim * sizeof(float));
        if (cdb_faiss_add(f, add, x, n_add) != CLIPDB_OK) {
            rc = cdb_err_set(&db->err, CLIPDB_ERROR, "%s", cdb_faiss_errmsg(f));
            goto cleanup;
        }
    }
    db->faiss[target][metric] = f;
    db->faiss_changes[target][metric] = vs->changes;
    db->faiss_version[target][metric] = vs->data_version;
    *out = f;
    *note = db->faiss_note[target][metric];
    f = NULL;
cleanup:
    sqlite3_finalize(st);
    cdb_faiss_free(f);
    free(factory);
    free(rm);
    free(add);
    free(x);
    return rc;
}

/* Searches with the stored Faiss index, or with one built in memory from
** opt->faiss. *note: see faiss_for_search. */
static int faiss_search(clipdb_db *db, const clipdb_search_options *opt, const cdb_vecset *vs,
                        const float *q, size_t nq, int k, clipdb_hit *hits, const char **note)
{
    cdb_faiss *f = NULL, *own = NULL;
    int rc;
    *note = NULL;
    if (opt->faiss) rc = faiss_build(db, opt->faiss, opt->metric, vs, &own);
    else rc = faiss_for_search(db, opt->target, opt->metric, vs, &f, note);
    if (rc != CLIPDB_OK) return rc;
    if (own) f = own;
    if (cdb_faiss_search(f, q, nq, k, opt->nprobe, hits) != CLIPDB_OK)
        rc = cdb_err_set(&db->err, CLIPDB_ERROR, "%s", cdb_faiss_errmsg(f));
    cdb_faiss_free(own);
    return rc;
}

/* ---- the CUDA backend ------------------------------------------------------- */

void cdb_db_gpu_release(clipdb_db *db)
{
    int i;
    for (i = 0; i < 3; i++) {
        cdb_cuda_flat_free(db->gpu[i]);
        db->gpu[i] = NULL;
    }
}

int clipdb_db_set_device(clipdb_db *db, clipdb_device dev, clipdb_precision prec)
{
    clipdb_device got;
    int rc;
    if (!db) return CLIPDB_EINVAL;
    cdb_err_clear(&db->err);
    if (prec != CLIPDB_PREC_FP32 && prec != CLIPDB_PREC_FP16 && prec != CLIPDB_PREC_BF16)
        return cdb_err_set(&db->err, CLIPDB_EINVAL, "unknown precision %d", (int)prec);
    if ((rc = cdb_device_resolve(dev, &got, &db->err)) != CLIPDB_OK) return rc;
    if ((int)got != db->device || (int)prec != db->precision) cdb_db_gpu_release(db);
    db->device = (int)got;
    db->precision = (int)prec;
    if (db->ctx && (rc = clipdb_ctx_set_device(db->ctx, got, prec)) != CLIPDB_OK)
        return cdb_err_set(&db->err, rc, "%s", clipdb_ctx_errmsg(db->ctx));
    return CLIPDB_OK;
}

/* The vectors of `type` resident on the GPU: uploaded at the first search
** and again only when the vecset was reloaded (the file changed). */
static int gpu_flat_for(clipdb_db *db, int type, const cdb_vecset *vs, cdb_cuda_flat **out)
{
    clipdb_vecs base = {vs->vecs, vs->ids, vs->norms, vs->n, db->embed_dim};
    int rc;
    if (db->gpu[type] && db->gpu_version[type] == vs->data_version &&
        db->gpu_changes[type] == vs->changes) {
        *out = db->gpu[type];
        return CLIPDB_OK;
    }
    cdb_cuda_flat_free(db->gpu[type]);
    db->gpu[type] = NULL;
    rc = cdb_cuda_flat_new(&db->gpu[type], &base, (cdb_cuda_dtype)db->precision, &db->err);
    if (rc != CLIPDB_OK) return rc;
    db->gpu_version[type] = vs->data_version;
    db->gpu_changes[type] = vs->changes;
    *out = db->gpu[type];
    return CLIPDB_OK;
}

int clipdb_db_search(clipdb_db *db, const clipdb_query *queries, size_t nq,
                     const clipdb_search_options *opt, clipdb_results **out)
{
    clipdb_search_options def;
    const cdb_vecset *vs;
    clipdb_results *res = NULL;
    clipdb_hit *hits = NULL;
    float *q = NULL;
    int64_t *allowed = NULL;
    size_t n_allowed = 0, i, j, total = 0;
    uint64_t *bitmap = NULL;
    clipdb_filter filter, *fp = NULL;
    sqlite3_stmt *item = NULL, *meta = NULL;
    char *errmsg = NULL;
    const char *note = NULL;
    double t0 = cdb_now();
    int rc, k, n_out = 0;

    *out = NULL;
    if (!opt) {
        clipdb_search_options_init(&def);
        opt = &def;
    }
    cdb_err_clear(&db->err);
    if (nq == 0 || !queries) return cdb_err_set(&db->err, CLIPDB_EINVAL, "search: no query");
    if (opt->target != CLIPDB_ITEM_IMAGE && opt->target != CLIPDB_ITEM_TEXT)
        return cdb_err_set(&db->err, CLIPDB_EINVAL, "search: bad target %d", opt->target);
    if (!cdb_metric_ok(opt->metric))
        return cdb_err_set(&db->err, CLIPDB_EINVAL, "search: bad metric %d", (int)opt->metric);
    if (opt->k < 1 || opt->k > CLIPDB_MAX_K)
        return cdb_err_set(&db->err, CLIPDB_EINVAL, "search: k must be 1 to %d", CLIPDB_MAX_K);
    if (opt->index == CLIPDB_INDEX_IVF && opt->nprobe < 1)
        return cdb_err_set(&db->err, CLIPDB_EINVAL, "search: nprobe must be at least 1");
    if (opt->index == CLIPDB_INDEX_FAISS && opt->n_where > 0)
        return cdb_err_set(&db->err, CLIPDB_EINVAL,
                           "search: filters (--where) work with the exact and ivf indexes, not "
                           "faiss");
    k = opt->k;
    q = cdb_malloc_array(nq, (size_t)db->embed_dim * sizeof(float));
    if (!q) return cdb_err_set(&db->err, CLIPDB_ENOMEM, "out of memory");
    if ((rc = query_vectors(db, queries, nq, q)) != CLIPDB_OK) goto cleanup;
    if ((rc = cdb_db_vectors(db, opt->target, &vs)) != CLIPDB_OK) goto cleanup;
    if ((rc = filter_ids(db, opt, &allowed, &n_allowed)) != CLIPDB_OK) goto cleanup;
    hits = cdb_malloc_array(nq, (size_t)k * sizeof *hits);
    res = calloc(1, sizeof *res);
    if (!hits || !res) {
        rc = cdb_err_set(&db->err, CLIPDB_ENOMEM, "out of memory");
        goto cleanup;
    }
    memset(&filter, 0, sizeof filter);
    if (vs->n == 0) {
        n_out = 0;
    } else if (opt->index == CLIPDB_INDEX_EXACT) {
        clipdb_vecs base = {vs->vecs, vs->ids, vs->norms, vs->n, db->embed_dim};
        if (allowed) {
            /* keys of flat search are rows: ids -> rows (both sorted) */
            bitmap = cdb_calloc_array((vs->n + 63) / 64, sizeof *bitmap);
            if (!bitmap) {
                rc = cdb_err_set(&db->err, CLIPDB_ENOMEM, "out of memory");
                goto cleanup;
            }
            for (i = j = 0; i < vs->n && j < n_allowed;) {
                if (vs->ids[i] < allowed[j]) i++;
                else if (vs->ids[i] > allowed[j]) j++;
                else {
                    bitmap[i / 64] |= (uint64_t)1 << (i % 64);
                    i++;
                    j++;
                }
            }
            filter.bitmap = bitmap;
            filter.nbits = vs->n;
            fp = &filter;
        }
        // queries (nq, d) . base (n, d)^T -> scores (nq, n) -> top k per query
        if (db->device == CLIPDB_DEVICE_CUDA && k <= CDB_CUDA_MAX_K) {
            cdb_cuda_flat *gf; /* the same on the GPU (src/cuda/search.cu) */
            if ((rc = gpu_flat_for(db, opt->target, vs, &gf)) != CLIPDB_OK ||
                (rc = cdb_cuda_flat_search(gf, q, nq, k, opt->metric, fp, hits, &n_out,
                                           &db->err)) != CLIPDB_OK) {
                cdb_err_prefix(&db->err, "search");
                goto cleanup;
            }
        } else if (clipdb_flat_search(&base, q, nq, k, opt->metric, fp, hits, &n_out,
                               &errmsg) != CLIPDB_OK) {
            rc = cdb_err_set(&db->err, CLIPDB_ERROR, "search: %s", errmsg ? errmsg : "failed");
            goto cleanup;
        }
    } else if (opt->index == CLIPDB_INDEX_IVF) {
        clipdb_ivf *ivf;
        if ((rc = ivf_for_search(db, opt->target, opt->metric, vs, &ivf)) != CLIPDB_OK)
            goto cleanup;
        if (allowed) {
            filter.keys = allowed;
            filter.n_keys = n_allowed;
            fp = &filter;
        }
        if (clipdb_ivf_search(ivf, q, nq, k, opt->nprobe, fp, hits, &n_out) != CLIPDB_OK) {
            rc = cdb_err_set(&db->err, CLIPDB_ERROR, "search: %s", clipdb_ivf_errmsg(ivf));
            goto cleanup;
        }
    } else if (opt->index == CLIPDB_INDEX_FAISS) {
        if ((rc = faiss_search(db, opt, vs, q, nq, k, hits, &note)) != CLIPDB_OK) goto cleanup;
        n_out = k;
    } else {
        rc = cdb_err_set(&db->err, CLIPDB_EINVAL, "search: bad index kind %d", (int)opt->index);
        goto cleanup;
    }
    /* results with their items' fields */
    res->nq = nq;
    res->offsets = cdb_calloc_array(nq + 1, sizeof *res->offsets);
    res->results = cdb_calloc_array(nq * (size_t)(n_out > 0 ? n_out : 1), sizeof *res->results);
    if (!res->offsets || !res->results) {
        rc = cdb_err_set(&db->err, CLIPDB_ENOMEM, "out of memory");
        goto cleanup;
    }
    if ((rc = cdb_db_prepare(db, "SELECT type, path, abspath, text, image FROM items WHERE id = ?",
                             &item)) != CLIPDB_OK ||
        (rc = cdb_db_prepare(db, "SELECT key, value FROM item_meta WHERE item = ? ORDER BY key",
                             &meta)) != CLIPDB_OK)
        goto cleanup;
    for (i = 0; i < nq; i++) {
        res->offsets[i] = total;
        for (j = 0; j < (size_t)n_out; j++) {
            const clipdb_hit *h = &hits[i * (size_t)k + j];
            clipdb_result *x;
            if (h->id < 0) break;
            x = &res->results[total++];
            x->id = h->id;
            x->score = h->score;
            if ((rc = fill_result(db, item, meta, x)) != CLIPDB_OK) {
                res->offsets[nq] = total;
                goto cleanup;
            }
        }
    }
    res->offsets[nq] = total;
    res->took_ms = (cdb_now() - t0) * 1000.0;
    if (note && !(res->note = cdb_strdup(note))) {
        rc = cdb_err_set(&db->err, CLIPDB_ENOMEM, "out of memory");
        goto cleanup;
    }
    *out = res;
    res = NULL;
cleanup:
    sqlite3_finalize(item);
    sqlite3_finalize(meta);
    if (res && res->offsets && !res->offsets[nq]) res->offsets[nq] = total;
    clipdb_results_free(res);
    free(errmsg);
    free(bitmap);
    free(allowed);
    free(hits);
    free(q);
    return rc;
}
