/*
** sindex_ivf.c: clipdb's IVF-Flat index (src/index/ivf.c) as a stored-index
** type. Stored as its centroids (table ivf) and the list of every vector
** (table ivf_assign); a new vector is assigned its nearest list when it is
** written, a deleted one loses its row; a search loads the centroids and
** fills the lists from the stored vectors.
*/
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "index/index.h"
#include "store/sindex.h"

/* The tables of a stored IVF index (format version 1): its centroids, and
** the list of every vector of its set. */
static const char *const ivf_tables_sql =
    "CREATE TABLE IF NOT EXISTS ivf(target INTEGER NOT NULL, metric INTEGER NOT NULL,"
    "  nlist INTEGER NOT NULL, dim INTEGER NOT NULL, seed INTEGER NOT NULL,"
    "  centroids BLOB NOT NULL, PRIMARY KEY(target, metric)) WITHOUT ROWID;"
    "CREATE TABLE IF NOT EXISTS ivf_assign(target INTEGER NOT NULL, metric INTEGER NOT NULL,"
    "  id INTEGER NOT NULL, list INTEGER NOT NULL,"
    "  PRIMARY KEY(target, metric, id)) WITHOUT ROWID;"
    "CREATE INDEX IF NOT EXISTS ivf_assign_id ON ivf_assign(id);";

static int ivf_ensure_tables(clipdb_db *db)
{
    return cdb_db_exec(db, ivf_tables_sql);
}

typedef struct ivf_state {
    clipdb_ivf *full;      /* every stored vector in its list, for search */
    clipdb_ivf *assigner;  /* the stored centroids only, to assign writes */
    int32_t *lists;        /* after build: the list of each vector of vs */
    uint64_t seed;         /* after build: the k-means seed */
} ivf_state;

static int state_of(clipdb_db *db, cdb_sindex *s, ivf_state **out)
{
    if (!s->impl && !(s->impl = calloc(1, sizeof(ivf_state))))
        return cdb_err_set(&db->err, CLIPDB_ENOMEM, "out of memory");
    *out = s->impl;
    return CLIPDB_OK;
}

/* Records a failure of clipdb_ivf call with its status code kept. */
static int ivf_fail(clipdb_db *db, int rc, const clipdb_ivf *ivf)
{
    return cdb_err_set(&db->err, rc, "IVF: %s", ivf ? clipdb_ivf_errmsg(ivf) : "out of memory");
}

/* An empty index holding the stored centroids of (set, metric), to assign
** new vectors; *out NULL when there is no such index. */
static int load_centroids(clipdb_db *db, int set, clipdb_metric metric, clipdb_ivf **out)
{
    sqlite3_stmt *st = NULL;
    int rc, s;
    *out = NULL;
    rc = cdb_db_prepare(db, "SELECT nlist, dim, centroids FROM ivf WHERE target = ? AND metric = ?",
                        &st);
    if (rc != CLIPDB_OK) return rc;
    sqlite3_bind_int(st, 1, set);
    sqlite3_bind_int(st, 2, metric);
    s = sqlite3_step(st);
    if (s == SQLITE_ROW) {
        int nlist = sqlite3_column_int(st, 0), dim = sqlite3_column_int(st, 1);
        const void *c = sqlite3_column_blob(st, 2);
        size_t want = (size_t)(nlist > 0 ? nlist : 0) * (size_t)db->embed_dim * sizeof(float);
        if (dim != db->embed_dim || nlist < 1 || nlist > CLIPDB_MAX_NLIST || !c ||
            (size_t)sqlite3_column_bytes(st, 2) != want) {
            rc = cdb_err_set(&db->err, CLIPDB_EFORMAT, "%s: corrupt IVF index (%s, %s)", db->path,
                             cdb_set_name(set), clipdb_metric_name(metric));
        } else if ((rc = clipdb_ivf_new_from_centroids(out, dim, nlist, metric, c)) !=
                   CLIPDB_OK) {
            ivf_fail(db, rc, *out);
            clipdb_ivf_free(*out);
            *out = NULL;
        }
    } else if (s != SQLITE_DONE) {
        rc = cdb_db_sqlerr(db, "reading the IVF index");
    }
    sqlite3_finalize(st);
    return rc;
}

static int ivf_stored_metrics(clipdb_db *db, int set, clipdb_metric metrics[3], int *n)
{
    sqlite3_stmt *st = NULL;
    int rc = cdb_db_prepare(db, "SELECT metric FROM ivf WHERE target = ?", &st), s;
    *n = 0;
    if (rc != CLIPDB_OK) return rc;
    sqlite3_bind_int(st, 1, set);
    while ((s = sqlite3_step(st)) == SQLITE_ROW) {
        int m = sqlite3_column_int(st, 0);
        if (*n < 3 && cdb_metric_ok((clipdb_metric)m)) metrics[(*n)++] = (clipdb_metric)m;
    }
    if (s != SQLITE_DONE) rc = cdb_db_sqlerr(db, "reading the IVF index");
    sqlite3_finalize(st);
    return rc;
}

static int ivf_on_insert(clipdb_db *db, cdb_sindex *s, int64_t id, const float *vec)
{
    sqlite3_stmt *ins = NULL;
    ivf_state *v = NULL;
    int32_t list;
    int rc;
    if ((rc = state_of(db, s, &v)) != CLIPDB_OK) return rc;
    if (!v->assigner && (rc = load_centroids(db, s->set, s->metric, &v->assigner)) != CLIPDB_OK)
        return rc;
    if (!v->assigner) return CLIPDB_OK;
    // vec (1, d) -> nearest of the nlist centroids -> list
    if ((rc = clipdb_ivf_assign(v->assigner, vec, 1, &list)) != CLIPDB_OK)
        return ivf_fail(db, rc, v->assigner);
    rc = cdb_db_prepare(db,
                        "INSERT OR REPLACE INTO ivf_assign(target, metric, id, list) "
                        "VALUES(?, ?, ?, ?)",
                        &ins);
    if (rc != CLIPDB_OK) return rc;
    sqlite3_bind_int(ins, 1, s->set);
    sqlite3_bind_int(ins, 2, s->metric);
    sqlite3_bind_int64(ins, 3, id);
    sqlite3_bind_int(ins, 4, list);
    if (sqlite3_step(ins) != SQLITE_DONE) rc = cdb_db_sqlerr(db, "writing an IVF assignment");
    sqlite3_finalize(ins);
    return rc;
}

static int ivf_on_delete(clipdb_db *db, int64_t id)
{
    sqlite3_stmt *st = NULL;
    int rc = cdb_db_prepare(db, "DELETE FROM ivf_assign WHERE id = ?", &st);
    if (rc != CLIPDB_OK) return rc;
    sqlite3_bind_int64(st, 1, id);
    if (sqlite3_step(st) != SQLITE_DONE) rc = cdb_db_sqlerr(db, "deleting an IVF assignment");
    sqlite3_finalize(st);
    return rc;
}

static int ivf_build(clipdb_db *db, cdb_sindex *s, const cdb_vecset *vs,
                     const clipdb_index_options *opt, const char *spec)
{
    clipdb_ivf_train_options topt;
    ivf_state *v = NULL;
    int rc, nlist;
    (void)spec;
    if ((rc = state_of(db, s, &v)) != CLIPDB_OK) return rc;
    if (vs->n == 0)
        return cdb_err_set(&db->err, CLIPDB_EINVAL, "%s: no %s vectors to index", db->path,
                           cdb_set_name(s->set));
    nlist = opt->nlist > 0 ? opt->nlist : (int)lround(sqrt((double)vs->n));
    if (nlist < 1) nlist = 1;
    if ((size_t)nlist > vs->n)
        return cdb_err_set(&db->err, CLIPDB_EINVAL,
                           "%s: %d lists need at least %d %s vectors (the database holds %zu)",
                           db->path, nlist, nlist, cdb_set_name(s->set), vs->n);
    clipdb_ivf_train_options_init(&topt);
    topt.seed = opt->seed;
    free(v->lists);
    clipdb_ivf_free(v->full);
    v->full = NULL;
    v->seed = opt->seed;
    if (!(v->lists = cdb_malloc_array(vs->n, sizeof *v->lists)))
        return cdb_err_set(&db->err, CLIPDB_ENOMEM, "out of memory");
    // vs (n, d) -> k-means -> centroids (nlist, d) -> list of each row (n)
    if ((rc = clipdb_ivf_new(&v->full, db->embed_dim, nlist, s->metric)) != CLIPDB_OK ||
        (rc = clipdb_ivf_train(v->full, vs->vecs, vs->n, &topt)) != CLIPDB_OK ||
        (rc = clipdb_ivf_assign(v->full, vs->vecs, vs->n, v->lists)) != CLIPDB_OK)
        return ivf_fail(db, rc, v->full);
    return CLIPDB_OK;
}

static int ivf_store(clipdb_db *db, cdb_sindex *s, const cdb_vecset *vs)
{
    ivf_state *v = s->impl;
    sqlite3_stmt *st = NULL;
    int rc, nlist = 0;
    if (!v || !v->full || !v->lists)
        return cdb_err_set(&db->err, CLIPDB_EINVAL, "IVF: nothing built to store");
    if ((rc = clipdb_ivf_info(v->full, NULL, &nlist, NULL, NULL, NULL)) != CLIPDB_OK)
        return ivf_fail(db, rc, v->full);
    rc = cdb_db_prepare(db,
                        "INSERT OR REPLACE INTO ivf(target, metric, nlist, dim, seed, centroids) "
                        "VALUES(?, ?, ?, ?, ?, ?)",
                        &st);
    if (rc != CLIPDB_OK) return rc;
    sqlite3_bind_int(st, 1, s->set);
    sqlite3_bind_int(st, 2, s->metric);
    sqlite3_bind_int(st, 3, nlist);
    sqlite3_bind_int(st, 4, db->embed_dim);
    sqlite3_bind_int64(st, 5, (sqlite3_int64)v->seed);
    sqlite3_bind_blob(st, 6, clipdb_ivf_centroids(v->full),
                      (int)((size_t)nlist * (size_t)db->embed_dim * sizeof(float)), SQLITE_STATIC);
    if (sqlite3_step(st) != SQLITE_DONE) rc = cdb_db_sqlerr(db, "writing the IVF index");
    sqlite3_finalize(st);
    if (rc != CLIPDB_OK) return rc;
    return cdb_sindex_replace_ids(db, "DELETE FROM ivf_assign WHERE target = ? AND metric = ?",
                                  "INSERT INTO ivf_assign(target, metric, id, list) "
                                  "VALUES(?, ?, ?, ?)",
                                  s->set, s->metric, vs->ids, v->lists, vs->n);
}

/* The IVF index of (set, metric) with every stored vector in its list. */
static int ivf_load(clipdb_db *db, cdb_sindex *s, const cdb_vecset *vs)
{
    sqlite3_stmt *st = NULL;
    clipdb_ivf *ivf = NULL;
    int32_t *lists = NULL;
    ivf_state *v = NULL;
    size_t i;
    int rc;

    if ((rc = state_of(db, s, &v)) != CLIPDB_OK) return rc;
    if ((rc = load_centroids(db, s->set, s->metric, &ivf)) != CLIPDB_OK) return rc;
    if (!ivf)
        return cdb_err_set(&db->err, CLIPDB_ENOTFOUND,
                           "%s: no IVF index for %s vectors and metric %s", db->path,
                           cdb_set_name(s->set), clipdb_metric_name(s->metric));
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
    sqlite3_bind_int(st, 1, s->set);
    sqlite3_bind_int(st, 2, s->metric);
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
            (rc = clipdb_ivf_assign(ivf, vs->vecs + i * (size_t)db->embed_dim, 1, &lists[i])) !=
                CLIPDB_OK) {
            ivf_fail(db, rc, ivf);
            goto cleanup;
        }
    if ((rc = clipdb_ivf_add_assigned(ivf, vs->ids, vs->vecs, lists, vs->n)) != CLIPDB_OK) {
        ivf_fail(db, rc, ivf);
        goto cleanup;
    }
    clipdb_ivf_free(v->full);
    v->full = ivf;
    ivf = NULL;
cleanup:
    sqlite3_finalize(st);
    clipdb_ivf_free(ivf);
    free(lists);
    return rc;
}

static int ivf_validate(clipdb_db *db, const clipdb_search_options *opt)
{
    if (opt->nprobe < 1)
        return cdb_err_set(&db->err, CLIPDB_EINVAL, "search: nprobe must be at least 1");
    return CLIPDB_OK;
}

static int ivf_search(clipdb_db *db, cdb_sindex *s, const cdb_search_call *c, clipdb_hit *out,
                      int *n_out)
{
    ivf_state *v = s->impl;
    clipdb_filter filter, *fp = NULL;
    int rc;
    if (!v || !v->full) return cdb_err_set(&db->err, CLIPDB_EINVAL, "IVF: not loaded");
    if (c->allowed) {
        memset(&filter, 0, sizeof filter);
        filter.keys = c->allowed;
        filter.n_keys = c->n_allowed;
        fp = &filter;
    }
    // queries (nq, d) -> nprobe nearest lists -> exact kernel over them -> top k
    rc = clipdb_ivf_search(v->full, c->q, c->nq, c->k, c->opt->nprobe, fp, out, n_out);
    if (rc != CLIPDB_OK) cdb_err_set(&db->err, rc, "IVF search: %s", clipdb_ivf_errmsg(v->full));
    return rc;
}

static void ivf_invalidate(cdb_sindex *s)
{
    ivf_state *v = s->impl;
    if (!v) return;
    clipdb_ivf_free(v->full);
    v->full = NULL;
    free(v->lists);
    v->lists = NULL;
}

static void ivf_release(cdb_sindex *s)
{
    ivf_state *v = s->impl;
    if (!v) return;
    ivf_invalidate(s);
    clipdb_ivf_free(v->assigner);
    free(v);
    s->impl = NULL;
}

/* Every stored IVF index: its lists and the vectors assigned to them. */
static int ivf_list_stored(clipdb_db *db, cdb_index_list *l)
{
    sqlite3_stmt *st = NULL;
    clipdb_db_index_info *x = NULL;
    int rc, s;
    rc = cdb_db_prepare(db,
                        "SELECT target, metric, nlist, "
                        "(SELECT count(*) FROM ivf_assign a WHERE a.target = ivf.target "
                        "AND a.metric = ivf.metric) FROM ivf ORDER BY target, metric",
                        &st);
    if (rc != CLIPDB_OK) return rc;
    while ((s = sqlite3_step(st)) == SQLITE_ROW) {
        if ((rc = cdb_sindex_list_push(db, l, &x)) != CLIPDB_OK) goto cleanup;
        x->kind = "ivf";
        x->target = sqlite3_column_int(st, 0);
        x->metric = (clipdb_metric)sqlite3_column_int(st, 1);
        x->nlist = sqlite3_column_int(st, 2);
        x->n_vectors = sqlite3_column_int64(st, 3);
    }
    if (s != SQLITE_DONE) rc = cdb_db_sqlerr(db, "listing the IVF indexes");
cleanup:
    sqlite3_finalize(st);
    return rc;
}

const cdb_sindex_type cdb_sindex_ivf = {
    .name = "ivf",
    .kind = CLIPDB_INDEX_IVF,
    .ensure_tables = ivf_ensure_tables,
    .validate = ivf_validate,
    .build = ivf_build,
    .store = ivf_store,
    .load = ivf_load,
    .search = ivf_search,
    .stored_metrics = ivf_stored_metrics,
    .on_insert = ivf_on_insert,
    .on_delete = ivf_on_delete,
    .invalidate = ivf_invalidate,
    .release = ivf_release,
    .list_stored = ivf_list_stored,
};
