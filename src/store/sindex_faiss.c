/*
** sindex_faiss.c: a Faiss index (src/index/faiss_shim.cc) as a stored-index
** type. Stored as the bytes of faiss::write_index with their SHA-256 (table
** faiss, checked before Faiss's reader sees them) and the ids it holds
** (table faiss_ids, stale = 1 once an item is deleted or its vector
** replaced). A search loads it and brings it up to date: stale or gone ids
** leave it, stored vectors it lacks join it; an index type that cannot
** remove is rebuilt in memory from its factory string, with a note.
*/
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "index/index.h"
#include "store/sindex.h"

/* The tables of a stored Faiss index (added in format version 2: a v1
** file gets them when it is first opened read-write): its bytes, and the
** ids they hold. */
static const char *const faiss_tables_sql =
    "CREATE TABLE IF NOT EXISTS faiss(target INTEGER NOT NULL, metric INTEGER NOT NULL,"
    "  factory TEXT NOT NULL, dim INTEGER NOT NULL, sha256 TEXT NOT NULL, blob BLOB NOT NULL,"
    "  built_at INTEGER NOT NULL, UNIQUE(target, metric));"
    "CREATE TABLE IF NOT EXISTS faiss_ids(target INTEGER NOT NULL, metric INTEGER NOT NULL,"
    "  id INTEGER NOT NULL, stale INTEGER NOT NULL DEFAULT 0,"
    "  PRIMARY KEY(target, metric, id)) WITHOUT ROWID;"
    "CREATE INDEX IF NOT EXISTS faiss_ids_id ON faiss_ids(id);";

static int faiss_ensure_tables(clipdb_db *db)
{
    return cdb_db_exec(db, faiss_tables_sql);
}

typedef struct faiss_state {
    cdb_faiss *f;
    char *factory;   /* its index_factory string */
} faiss_state;

static int state_of(clipdb_db *db, cdb_sindex *s, faiss_state **out)
{
    if (!s->impl && !(s->impl = calloc(1, sizeof(faiss_state))))
        return cdb_err_set(&db->err, CLIPDB_ENOMEM, "out of memory");
    *out = s->impl;
    return CLIPDB_OK;
}

static void faiss_invalidate(cdb_sindex *s)
{
    faiss_state *v = s->impl;
    if (!v) return;
    cdb_faiss_free(v->f);
    v->f = NULL;
    free(v->factory);
    v->factory = NULL;
}

static void faiss_release(cdb_sindex *s)
{
    faiss_invalidate(s);
    free(s->impl);
    s->impl = NULL;
}

/* Records a failure of the shim with its status code kept. */
static int shim_fail(clipdb_db *db, int rc, const cdb_faiss *f)
{
    return cdb_err_set(&db->err, rc, "Faiss: %s", f ? cdb_faiss_errmsg(f) : "out of memory");
}

/* ---- the factory strings accepted --------------------------------------
** Faiss's index_factory aborts, divides by zero or dereferences NULL on some
** strings (IVF0,Flat: SIGABRT; HNSW0: SIGSEGV; PQ0: SIGFPE) and accepts
** others no search can use (IVF0_HNSW8,Flat). So only this grammar reaches
** it, with its parameters checked against the dimension d and the number of
** vectors n:
**   spec      = { transform "," } main
**   transform = "PCA" N | "PCAR" N            N <= d; the dimension becomes N
**             | "OPQ" M [ "_" N ]              N (default: the dimension)
**                                              divisible by M; becomes N
**             | "L2norm"
**   main      = "Flat" | "HNSW" M [ ",Flat" ]  2 <= M <= 256
**             | code
**             | "IVF" N "," ( "Flat" | code )  1 <= N <= n
**   code      = "PQ" M [ "x" B ]               dimension divisible by M,
**                                              1 <= B <= 16
**             | "SQ8" | "SQ4" | "SQfp16"
** Every number is decimal, without sign, 1 .. 2^24. */
#define FAISS_SPEC_MAX 256
#define FAISS_NUM_MAX (1L << 24)

/* Reads a number at *p (advancing it); 0 when there is none or it is out of range. */
static long spec_num(const char **p)
{
    long v = 0;
    if (**p < '0' || **p > '9') return 0;
    while (**p >= '0' && **p <= '9') {
        v = v * 10 + (**p - '0');
        if (v > FAISS_NUM_MAX) return 0;
        (*p)++;
    }
    return v;
}

static int spec_word(const char **p, const char *w)
{
    size_t n = strlen(w);
    if (strncmp(*p, w, n)) return 0;
    *p += n;
    return 1;
}

/* One code ("PQ" M ["x" B] | "SQ..."): 1 if it parsed and fits dimension dim. */
static int spec_code(const char **p, long dim, const char **why)
{
    long m, b = 8;
    if (spec_word(p, "SQfp16") || spec_word(p, "SQ8") || spec_word(p, "SQ4")) return 1;
    if (!spec_word(p, "PQ")) return 0;
    if (!(m = spec_num(p))) return (*why = "PQ needs a number of sub-quantizers > 0"), 0;
    if (dim % m) return (*why = "PQ's sub-quantizers must divide the dimension"), 0;
    if (spec_word(p, "x") && (!(b = spec_num(p)) || b > 16))
        return (*why = "PQ's bits per code must be 1 to 16"), 0;
    return 1;
}

static int faiss_spec_check(clipdb_db *db, const char *spec, long d, size_t n)
{
    const char *p = spec, *why = NULL;
    long dim = d, v, m;
    if (strlen(spec) > FAISS_SPEC_MAX)
        return cdb_err_set(&db->err, CLIPDB_EINVAL, "Faiss factory string longer than %d bytes",
                           FAISS_SPEC_MAX);
    for (;;) { /* transforms */
        if (spec_word(&p, "PCAR") || spec_word(&p, "PCA")) {
            if (!(v = spec_num(&p)) || v > dim) {
                why = "PCA needs an output dimension from 1 to the input's";
                goto bad;
            }
            dim = v;
        } else if (spec_word(&p, "OPQ")) {
            if (!(m = spec_num(&p))) {
                why = "OPQ needs a number of sub-quantizers > 0";
                goto bad;
            }
            if (spec_word(&p, "_") && !(dim = spec_num(&p))) {
                why = "OPQ's output dimension must be > 0";
                goto bad;
            }
            if (dim % m) {
                why = "OPQ's sub-quantizers must divide its output dimension";
                goto bad;
            }
        } else if (!spec_word(&p, "L2norm")) {
            break;
        }
        if (!spec_word(&p, ",")) goto bad;
    }
    if (spec_word(&p, "Flat")) {
    } else if (spec_word(&p, "HNSW")) {
        if ((v = spec_num(&p)) < 2 || v > 256) {
            why = "HNSW needs M from 2 to 256 neighbours";
            goto bad;
        }
        if (spec_word(&p, ",") && !spec_word(&p, "Flat")) goto bad;
    } else if (spec_word(&p, "IVF")) {
        if (!(v = spec_num(&p))) {
            why = "IVF needs a number of lists > 0";
            goto bad;
        }
        if ((size_t)v > n)
            return cdb_err_set(&db->err, CLIPDB_EINVAL,
                               "Faiss factory string '%s': IVF%ld needs at least %ld vectors to "
                               "train on; %zu stored", spec, v, v, n);
        if (!spec_word(&p, ",")) {
            why = "IVF N must be followed by ,Flat or a code (PQ M, SQ8, ...)";
            goto bad;
        }
        if (!spec_word(&p, "Flat") && !spec_code(&p, dim, &why)) goto bad;
    } else if (!spec_code(&p, dim, &why)) {
        goto bad;
    }
    if (*p == '\0') return CLIPDB_OK;
bad:
    return cdb_err_set(&db->err, CLIPDB_EINVAL,
                       "Faiss factory string '%s' not accepted%s%s (at '%s'; accepted: "
                       "[PCA N,|OPQ M[_N],|L2norm,]... then Flat, HNSW M, IVF N,Flat, "
                       "IVF N,PQ M[xB], IVF N,SQ8, PQ M[xB] or SQ8/SQ4/SQfp16)",
                       spec, why ? ": " : "", why ? why : "", p);
}

/* A new Faiss index from `factory`, trained on and holding every vector of
** vs. *out (free with cdb_faiss_free) only on success. */
static int build_index(clipdb_db *db, const char *factory, clipdb_metric metric,
                       const cdb_vecset *vs, cdb_faiss **out)
{
    cdb_faiss *f = NULL;
    int rc;
    *out = NULL;
    // vs (n, d) -> train (k-means for IVF) -> add with ids
    if ((rc = cdb_faiss_new(&f, db->embed_dim, factory, metric)) != CLIPDB_OK ||
        (rc = cdb_faiss_train(f, vs->vecs, vs->n)) != CLIPDB_OK ||
        (rc = cdb_faiss_add(f, vs->ids, vs->vecs, vs->n)) != CLIPDB_OK) {
        shim_fail(db, rc, f);
        cdb_faiss_free(f);
        return rc;
    }
    *out = f;
    return CLIPDB_OK;
}

static int faiss_build(clipdb_db *db, cdb_sindex *s, const cdb_vecset *vs,
                       const clipdb_index_options *opt, const char *spec)
{
    faiss_state *v = NULL;
    int rc;
    (void)opt;
    if (!spec || !*spec) return cdb_err_set(&db->err, CLIPDB_EINVAL, "no Faiss factory string");
    if (vs->n == 0)
        return cdb_err_set(&db->err, CLIPDB_EINVAL, "%s: no %s vectors to index", db->path,
                           cdb_set_name(s->set));
    if ((rc = faiss_spec_check(db, spec, db->embed_dim, vs->n)) != CLIPDB_OK) return rc;
    if ((rc = state_of(db, s, &v)) != CLIPDB_OK) return rc;
    faiss_invalidate(s);
    if (!(v->factory = cdb_strdup(spec))) return cdb_err_set(&db->err, CLIPDB_ENOMEM, "out of memory");
    return build_index(db, spec, s->metric, vs, &v->f);
}

static int faiss_store(clipdb_db *db, cdb_sindex *s, const cdb_vecset *vs)
{
    faiss_state *v = s->impl;
    sqlite3_stmt *st = NULL;
    uint8_t *blob = NULL;
    size_t len = 0;
    char hex[65];
    int rc;
    if (!v || !v->f) return cdb_err_set(&db->err, CLIPDB_EINVAL, "Faiss: nothing built to store");
    if (db->format_version < 2)
        return cdb_err_set(&db->err, CLIPDB_EINVAL,
                           "%s: format version %d holds no Faiss indexes", db->path,
                           db->format_version);
    if ((rc = cdb_faiss_serialize(v->f, &blob, &len)) != CLIPDB_OK) return shim_fail(db, rc, v->f);
    if (len > (size_t)INT32_MAX) {
        rc = cdb_err_set(&db->err, CLIPDB_ELIMIT,
                         "%s: the Faiss index is %zu bytes, more than a database value holds",
                         db->path, len);
        goto cleanup;
    }
    if ((rc = cdb_sha256_hex(blob, len, hex, &db->err)) != CLIPDB_OK) goto cleanup;
    rc = cdb_db_prepare(db,
                        "INSERT OR REPLACE INTO faiss(target, metric, factory, dim, sha256, blob, "
                        "built_at) VALUES(?, ?, ?, ?, ?, ?, strftime('%s','now'))",
                        &st);
    if (rc != CLIPDB_OK) goto cleanup;
    sqlite3_bind_int(st, 1, s->set);
    sqlite3_bind_int(st, 2, (int)s->metric);
    sqlite3_bind_text(st, 3, v->factory, -1, SQLITE_STATIC);
    sqlite3_bind_int(st, 4, db->embed_dim);
    sqlite3_bind_text(st, 5, hex, -1, SQLITE_STATIC);
    sqlite3_bind_blob(st, 6, blob, (int)len, SQLITE_STATIC);
    if (sqlite3_step(st) != SQLITE_DONE) {
        rc = cdb_db_sqlerr(db, "writing the Faiss index");
        goto cleanup;
    }
    rc = cdb_sindex_replace_ids(db, "DELETE FROM faiss_ids WHERE target = ? AND metric = ?",
                                "INSERT INTO faiss_ids(target, metric, id) VALUES(?, ?, ?)",
                                s->set, s->metric, vs->ids, NULL, vs->n);
cleanup:
    sqlite3_finalize(st);
    free(blob);
    return rc;
}

/* Reads the stored Faiss index of (set, metric): checks the SHA-256 of the
** bytes before Faiss sees them. *f NULL when there is none. *factory
** (caller frees) gets its factory string. */
static int read_stored(clipdb_db *db, int set, clipdb_metric metric, cdb_faiss **f,
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
    sqlite3_bind_int(st, 1, set);
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
                             db->path, cdb_set_name(set), clipdb_metric_name(metric));
        } else if ((rc = cdb_sha256_hex(blob, len, hex, &db->err)) != CLIPDB_OK) {
            /* message set */
        } else if (strcmp(hex, want)) {
            rc = cdb_err_set(&db->err, CLIPDB_EFORMAT,
                             "%s: the stored Faiss index \"%s\" (%s, %s) is corrupt (the SHA-256 "
                             "of its bytes does not match); it must be rebuilt",
                             db->path, *factory, cdb_set_name(set), clipdb_metric_name(metric));
        } else if (cdb_faiss_deserialize(f, blob, len, metric) != CLIPDB_OK ||
                   cdb_faiss_dim(*f) != db->embed_dim) {
            rc = cdb_err_set(&db->err, CLIPDB_EFORMAT, "%s: stored Faiss index (%s, %s): %s",
                             db->path, cdb_set_name(set), clipdb_metric_name(metric),
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

/* Appends id to the list (*v, *n, capacity *cap). */
static int push_id(clipdb_db *db, int64_t **v, size_t *n, size_t *cap, int64_t id)
{
    if (cdb_grow((void **)v, cap, *n + 1, sizeof **v))
        return cdb_err_set(&db->err, CLIPDB_ENOMEM, "out of memory");
    (*v)[(*n)++] = id;
    return CLIPDB_OK;
}

static int faiss_load(clipdb_db *db, cdb_sindex *s, const cdb_vecset *vs)
{
    sqlite3_stmt *st = NULL;
    cdb_faiss *f = NULL, *g = NULL;
    char *factory = NULL;
    int64_t *rm = NULL, *add = NULL;
    float *x = NULL;
    size_t n_rm = 0, cap_rm = 0, n_add = 0, cap_add = 0, i, j;
    faiss_state *v = NULL;
    int rc;

    if ((rc = state_of(db, s, &v)) != CLIPDB_OK) return rc;
    if ((rc = read_stored(db, s->set, s->metric, &f, &factory)) != CLIPDB_OK) return rc;
    if (!f)
        return cdb_err_set(&db->err, CLIPDB_ENOTFOUND,
                           "%s: no stored Faiss index for %s vectors and metric %s", db->path,
                           cdb_set_name(s->set), clipdb_metric_name(s->metric));
    /* the ids it holds vs the stored vectors (both sorted): stale or gone
    ** ones leave it, stored ones it lacks join it */
    rc = cdb_db_prepare(db,
                        "SELECT id, stale FROM faiss_ids WHERE target = ? AND metric = ? "
                        "ORDER BY id",
                        &st);
    if (rc != CLIPDB_OK) goto cleanup;
    sqlite3_bind_int(st, 1, s->set);
    sqlite3_bind_int(st, 2, (int)s->metric);
    i = 0;
    while (sqlite3_step(st) == SQLITE_ROW) {
        int64_t id = sqlite3_column_int64(st, 0);
        int stale = sqlite3_column_int(st, 1), present;
        for (; i < vs->n && vs->ids[i] < id; i++)
            if ((rc = push_id(db, &add, &n_add, &cap_add, vs->ids[i])) != CLIPDB_OK) goto cleanup;
        present = i < vs->n && vs->ids[i] == id;
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
        s->note = cdb_sprintf("the stored Faiss index \"%s\" cannot remove the %zu items deleted "
                              "or changed since it was built (%s); rebuilt it in memory for this "
                              "search; build and store it again to have an up-to-date one",
                              factory, n_rm, cdb_faiss_errmsg(f));
        if (!s->note) {
            rc = cdb_err_set(&db->err, CLIPDB_ENOMEM, "out of memory");
            goto cleanup;
        }
        if ((rc = build_index(db, factory, s->metric, vs, &g)) != CLIPDB_OK) goto cleanup;
        cdb_faiss_free(f);
        f = g;
        n_add = 0;
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
        if ((rc = cdb_faiss_add(f, add, x, n_add)) != CLIPDB_OK) {
            shim_fail(db, rc, f);
            goto cleanup;
        }
    }
    faiss_invalidate(s);
    v->f = f;
    v->factory = factory;
    f = NULL;
    factory = NULL;
cleanup:
    sqlite3_finalize(st);
    cdb_faiss_free(f);
    free(factory);
    free(rm);
    free(add);
    free(x);
    return rc;
}

static int faiss_validate(clipdb_db *db, const clipdb_search_options *opt)
{
    if (opt->n_where > 0)
        return cdb_err_set(&db->err, CLIPDB_EINVAL,
                           "search: metadata filters work with the exact and IVF indexes, not "
                           "with Faiss");
    return CLIPDB_OK;
}

static int faiss_search(clipdb_db *db, cdb_sindex *s, const cdb_search_call *c, clipdb_hit *out,
                        int *n_out)
{
    faiss_state *v = s->impl;
    int rc;
    if (!v || !v->f) return cdb_err_set(&db->err, CLIPDB_EINVAL, "Faiss: not loaded");
    // queries (nq, d) -> Faiss search -> top k per query (missing: id -1)
    if ((rc = cdb_faiss_search(v->f, c->q, c->nq, c->k, c->opt->nprobe, out)) != CLIPDB_OK)
        return shim_fail(db, rc, v->f);
    *n_out = c->k;
    return CLIPDB_OK;
}

static int faiss_on_delete(clipdb_db *db, int64_t id)
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

/* Every stored Faiss index: its factory string and the vectors it holds
** (not those marked stale). A version-1 file has no Faiss tables. */
static int faiss_list_stored(clipdb_db *db, cdb_index_list *l)
{
    sqlite3_stmt *st = NULL;
    clipdb_db_index_info *x = NULL;
    int rc, s;
    if (db->format_version < 2) return CLIPDB_OK;
    rc = cdb_db_prepare(db,
                        "SELECT target, metric, factory, "
                        "(SELECT count(*) FROM faiss_ids a WHERE a.target = f.target "
                        "AND a.metric = f.metric AND a.stale = 0) FROM faiss f "
                        "ORDER BY target, metric",
                        &st);
    if (rc != CLIPDB_OK) return rc;
    while ((s = sqlite3_step(st)) == SQLITE_ROW) {
        if ((rc = cdb_sindex_list_push(db, l, &x)) != CLIPDB_OK) goto cleanup;
        x->kind = "faiss";
        x->target = sqlite3_column_int(st, 0);
        x->metric = (clipdb_metric)sqlite3_column_int(st, 1);
        x->n_vectors = sqlite3_column_int64(st, 3);
        if (!(x->factory = cdb_strdup((const char *)sqlite3_column_text(st, 2)))) {
            rc = cdb_err_set(&db->err, CLIPDB_ENOMEM, "out of memory");
            goto cleanup;
        }
    }
    if (s != SQLITE_DONE) rc = cdb_db_sqlerr(db, "listing the Faiss indexes");
cleanup:
    sqlite3_finalize(st);
    return rc;
}

const cdb_sindex_type cdb_sindex_faiss = {
    .name = "faiss",
    .kind = CLIPDB_INDEX_FAISS,
    .ensure_tables = faiss_ensure_tables,
    .validate = faiss_validate,
    .build = faiss_build,
    .store = faiss_store,
    .load = faiss_load,
    .search = faiss_search,
    /* new vectors join a stored Faiss index at load time, not when written */
    .on_delete = faiss_on_delete,
    .invalidate = faiss_invalidate,
    .release = faiss_release,
    .list_stored = faiss_list_stored,
};
