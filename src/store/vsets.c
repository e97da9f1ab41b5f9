/*
** vsets.c: named vector sets. A database's own vectors (those of the model
** it was created with) are the set CLIPDB_VECTOR_SET_BASE, in vectors_image
** and vectors_text as ever. Every other set holds the vectors of another
** model (a fine-tuned one, say) over the same items; clipdb_db_reembed
** makes and fills one, clipdb_db_drop_set deletes one, and a search, the
** statistics and eval read them.
**
** Schema (format version 3, created by the first reembed, a write; a file
** without these tables is one with only base, and a read-only open never
** creates them):
**   vector_sets(id, name UNIQUE, model_dir, model_identity, precision, dim,
**               created_at)
**   set_vectors(set_id, type, id, norm, vec), UNIQUE(set_id, type, id)
** One table for the vectors of every named set, keyed by (set, item type,
** item), rather than a table pair per set: no SQL is ever built from a
** user-given name (names are bound values), `rm` deletes an item from every
** set with one statement (by the index on id), and the list of sets is data,
** not schema. It is a rowid table with a unique index, not WITHOUT ROWID: its
** rows (a 2 KiB vector for 512 dimensions) are too big for the latter.
*/
#include <limits.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "store/store.h"

static const char *const schema_sets_sql =
    "CREATE TABLE IF NOT EXISTS vector_sets(id INTEGER PRIMARY KEY, name TEXT NOT NULL UNIQUE,"
    "  model_dir TEXT NOT NULL, model_identity TEXT NOT NULL, precision TEXT NOT NULL,"
    "  dim INTEGER NOT NULL, created_at INTEGER NOT NULL);"
    "CREATE TABLE IF NOT EXISTS set_vectors(set_id INTEGER NOT NULL, type INTEGER NOT NULL,"
    "  id INTEGER NOT NULL, norm REAL NOT NULL, vec BLOB NOT NULL,"
    "  UNIQUE(set_id, type, id));"
    "CREATE INDEX IF NOT EXISTS set_vectors_id ON set_vectors(id);";

#define REEMBED_DEFAULT_BATCH 32
#define REEMBED_MAX_BATCH 1024

/* 1 when name is [A-Za-z0-9_-]{1,CLIPDB_VECTOR_SET_NAME_MAX}. */
static int name_ok(const char *name)
{
    size_t i, n = name ? strlen(name) : 0;
    if (n < 1 || n > CLIPDB_VECTOR_SET_NAME_MAX) return 0;
    for (i = 0; i < n; i++) {
        char c = name[i];
        if (!((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') ||
              c == '_' || c == '-'))
            return 0;
    }
    return 1;
}

int cdb_vsets_present(clipdb_db *db)
{
    int64_t n = 0;
    if (cdb_db_query_int(db,
                         "SELECT count(*) FROM sqlite_schema WHERE type = 'table' AND "
                         "name = 'set_vectors'",
                         &n) != CLIPDB_OK)
        return 0;
    return n > 0;
}

/* ---- loading a set's vectors (the base set's too) ---------------------------- */

void cdb_vecset_clear(cdb_vecset *s)
{
    free(s->ids);
    free(s->vecs);
    free(s->norms);
    clipdb_cvecs_free(s->cv);
    memset(s, 0, sizeof *s);
}

/* Why a stored vector (d) and its stored norm cannot be used, or NULL: a
** non-finite component, or a norm that is not the vector's own (a damaged
** file: an Inf would rank first, a norm of 1e-30 gives cosines of 1e28).
** Every loaded vector passes here, so it is one pass with eight independent
** double sums: a float squared cannot overflow a double, so the sum is
** finite exactly when every component is; the order of the sums differs
** from cdb_norm's by far less than the 1e-5 allowed. */
const char *cdb_vector_damage(const float *v, int d, double norm)
{
    double a[8] = {0}, s, n;
    int i, j;
    for (i = 0; i + 8 <= d; i += 8)
        for (j = 0; j < 8; j++) a[j] += (double)v[i + j] * v[i + j];
    for (; i < d; i++) a[0] += (double)v[i] * v[i];
    s = ((a[0] + a[1]) + (a[2] + a[3])) + ((a[4] + a[5]) + (a[6] + a[7]));
    if (!isfinite(s)) return "a component is not finite";
    if (!isfinite(norm)) return "its norm is not finite";
    n = sqrt(s);
    /* the stored norm is cdb_norm of the same floats (rounded to float) */
    if (fabs(n - norm) > 1e-5 * n + 1e-30) return "its stored norm is not the vector's";
    return NULL;
}

int cdb_vecset_load(clipdb_db *db, cdb_vecset *s, int64_t sid, int type, int d)
{
    sqlite3_stmt *st = NULL;
    int64_t ver = 0, count = 0;
    size_t row = 0, vbytes = (size_t)d * sizeof(float);
    const char *why;
    int rc, step;

    if ((rc = cdb_db_query_int(db, "PRAGMA data_version", &ver)) != CLIPDB_OK) return rc;
    if (s->loaded && s->data_version == ver && s->changes == db->local_changes) return CLIPDB_OK;
    cdb_vecset_clear(s);
    /* the base set has a table per type; the named ones share set_vectors */
    rc = cdb_db_prepare_bind(db,
                             sid >= 0 ? "SELECT count(*) FROM set_vectors WHERE set_id = ?1 AND "
                                        "type = ?2"
                             : type == CLIPDB_ITEM_IMAGE ? "SELECT count(*) FROM vectors_image"
                                                         : "SELECT count(*) FROM vectors_text",
                             &st, sid >= 0 ? "li" : "", sid, type);
    if (rc != CLIPDB_OK) return rc;
    if (sqlite3_step(st) == SQLITE_ROW) count = sqlite3_column_int64(st, 0);
    else rc = cdb_db_sqlerr(db, "counting vectors");
    sqlite3_finalize(st);
    st = NULL;
    if (rc != CLIPDB_OK) return rc;
    s->ids = cdb_malloc_array((size_t)count, sizeof *s->ids);
    s->norms = cdb_malloc_array((size_t)count, sizeof *s->norms);
    s->vecs = cdb_malloc_array((size_t)count, vbytes);
    if (!s->ids || !s->norms || !s->vecs) {
        rc = cdb_err_set(&db->err, CLIPDB_ENOMEM, "out of memory loading %lld vectors",
                         (long long)count);
        goto cleanup;
    }
    rc = cdb_db_prepare_bind(db,
                             sid >= 0 ? "SELECT id, norm, vec FROM set_vectors WHERE set_id = ?1 "
                                        "AND type = ?2 ORDER BY id"
                             : type == CLIPDB_ITEM_IMAGE
                                 ? "SELECT id, norm, vec FROM vectors_image ORDER BY id"
                                 : "SELECT id, norm, vec FROM vectors_text ORDER BY id",
                             &st, sid >= 0 ? "li" : "", sid, type);
    if (rc != CLIPDB_OK) goto cleanup;
    while ((step = sqlite3_step(st)) == SQLITE_ROW) {
        const void *blob = sqlite3_column_blob(st, 2);
        if (row >= (size_t)count) break; /* a concurrent writer: count once more later */
        if ((size_t)sqlite3_column_bytes(st, 2) != vbytes || !blob) {
            rc = cdb_err_set(&db->err, CLIPDB_EFORMAT,
                             "%s: corrupt vector of item %lld (%d bytes, expected %zu)",
                             db->path, (long long)sqlite3_column_int64(st, 0),
                             sqlite3_column_bytes(st, 2), vbytes);
            goto cleanup;
        }
        s->ids[row] = sqlite3_column_int64(st, 0);
        s->norms[row] = (float)sqlite3_column_double(st, 1);
        memcpy(s->vecs + row * (size_t)d, blob, vbytes);
        if ((why = cdb_vector_damage(s->vecs + row * (size_t)d, d,
                                     sqlite3_column_double(st, 1))) != NULL) {
            rc = cdb_err_set(&db->err, CLIPDB_EFORMAT,
                             "%s: corrupt vector of item %lld (%s); delete or re-add the item",
                             db->path, (long long)s->ids[row], why);
            goto cleanup;
        }
        row++;
    }
    if (step != SQLITE_ROW && step != SQLITE_DONE) {
        rc = cdb_db_sqlerr(db, "loading vectors");
        goto cleanup;
    }
    s->n = row;
    s->d = d;
    s->loaded = 1;
    s->data_version = ver;
    s->changes = db->local_changes;
cleanup:
    sqlite3_finalize(st);
    if (rc != CLIPDB_OK) cdb_vecset_clear(s);
    return rc;
}

/* ---- the list of sets ---------------------------------------------------------- */

void cdb_db_vector_sets_free(char **names, int n)
{
    int i;
    for (i = 0; names && i < n; i++) free(names[i]);
    free(names);
}

int cdb_db_vector_sets(clipdb_db *db, char ***names_out, int *n_out)
{
    sqlite3_stmt *st = NULL;
    char **names = NULL;
    size_t n = 0, cap = 0;
    int rc = CLIPDB_OK, s;

    *names_out = NULL;
    *n_out = 0;
    if (cdb_grow((void **)&names, &cap, 1, sizeof *names) ||
        !(names[n++] = cdb_strdup(CLIPDB_VECTOR_SET_BASE)))
        goto nomem;
    if (cdb_vsets_present(db)) {
        if ((rc = cdb_db_prepare(db, "SELECT name FROM vector_sets ORDER BY name", &st)) !=
            CLIPDB_OK)
            goto cleanup;
        while ((s = sqlite3_step(st)) == SQLITE_ROW) {
            if (n >= INT_MAX || cdb_grow((void **)&names, &cap, n + 1, sizeof *names) ||
                !(names[n] = cdb_strdup((const char *)sqlite3_column_text(st, 0))))
                goto nomem;
            n++;
        }
        if (s != SQLITE_DONE) {
            rc = cdb_db_sqlerr(db, "listing the vector sets");
            goto cleanup;
        }
    }
    *names_out = names;
    *n_out = (int)n;
    names = NULL;
    goto cleanup;
nomem:
    rc = cdb_err_set(&db->err, CLIPDB_ENOMEM, "out of memory");
cleanup:
    sqlite3_finalize(st);
    cdb_db_vector_sets_free(names, (int)n);
    return rc;
}

/* "no vector set 'x' in DB (it has: base, ft)" as CLIPDB_ENOTFOUND. */
static int not_found(clipdb_db *db, const char *name)
{
    char **names = NULL, *list = NULL, *next;
    int n = 0, i;
    if (cdb_db_vector_sets(db, &names, &n) != CLIPDB_OK) n = 0;
    list = cdb_strdup(n ? "" : CLIPDB_VECTOR_SET_BASE);
    for (i = 0; i < n && list; i++) {
        next = cdb_sprintf("%s%s%s", list, i ? ", " : "", names[i]);
        free(list);
        list = next;
    }
    cdb_db_vector_sets_free(names, n);
    cdb_err_set(&db->err, CLIPDB_ENOTFOUND, "no vector set '%s' in %s (it has: %s)", name,
                db->path, list ? list : CLIPDB_VECTOR_SET_BASE);
    free(list);
    return CLIPDB_ENOTFOUND;
}

/* ---- the sets cached on a handle ------------------------------------------------ */

static void vset_free(cdb_vset *v)
{
    int t;
    if (!v) return;
    for (t = 0; t < CDB_N_SETS; t++) cdb_vecset_clear(&v->vs[t]);
    clipdb_ctx_free(v->ctx);
    clipdb_model_close(v->model);
    free(v->name);
    free(v->model_dir);
    free(v->identity);
    free(v);
}

void cdb_vsets_release(clipdb_db *db)
{
    size_t i;
    for (i = 0; i < db->n_vsets; i++) vset_free(db->vsets[i]);
    free(db->vsets);
    db->vsets = NULL;
    db->n_vsets = db->cap_vsets = 0;
}

int cdb_vset_find(clipdb_db *db, const char *name, cdb_vset **out)
{
    sqlite3_stmt *st = NULL;
    cdb_vset *v = NULL;
    size_t i;
    int rc = CLIPDB_OK, s;

    *out = NULL;
    if (!name_ok(name) || !cdb_vsets_present(db)) return not_found(db, name ? name : "");
    rc = cdb_db_prepare_bind(db,
                             "SELECT id, model_dir, model_identity, precision, dim FROM "
                             "vector_sets WHERE name = ?1",
                             &st, "t", name);
    if (rc != CLIPDB_OK) return rc;
    if ((s = sqlite3_step(st)) != SQLITE_ROW) {
        sqlite3_finalize(st);
        if (s != SQLITE_DONE) return cdb_db_sqlerr(db, "reading the vector sets");
        return not_found(db, name);
    }
    for (i = 0; i < db->n_vsets; i++)
        if (!strcmp(db->vsets[i]->name, name)) break;
    if (i < db->n_vsets && db->vsets[i]->sid == sqlite3_column_int64(st, 0)) {
        *out = db->vsets[i]; /* the same set as cached */
        goto cleanup;
    }
    if (i < db->n_vsets) { /* dropped and made again since: forget the old one */
        vset_free(db->vsets[i]);
        db->vsets[i] = db->vsets[--db->n_vsets];
    }
    if (!(v = calloc(1, sizeof *v)) ||
        cdb_grow((void **)&db->vsets, &db->cap_vsets, db->n_vsets + 1, sizeof *db->vsets))
        goto nomem;
    v->sid = sqlite3_column_int64(st, 0);
    v->dim = sqlite3_column_int(st, 4);
    if (!(v->name = cdb_strdup(name)) ||
        !(v->model_dir = cdb_strdup((const char *)sqlite3_column_text(st, 1))) ||
        !(v->identity = cdb_strdup((const char *)sqlite3_column_text(st, 2))))
        goto nomem;
    if (v->dim <= 0 || v->dim > CLIPDB_MAX_DIM ||
        clipdb_precision_parse((const char *)sqlite3_column_text(st, 3), &v->precision) !=
            CLIPDB_OK) {
        rc = cdb_err_set(&db->err, CLIPDB_EFORMAT, "%s: corrupt row of vector set '%s'",
                         db->path, name);
        goto cleanup;
    }
    db->vsets[db->n_vsets++] = v;
    *out = v;
    v = NULL;
    goto cleanup;
nomem:
    rc = cdb_err_set(&db->err, CLIPDB_ENOMEM, "out of memory");
cleanup:
    sqlite3_finalize(st);
    vset_free(v);
    return rc;
}

int cdb_vset_vectors(clipdb_db *db, cdb_vset *v, int type, const cdb_vecset **out)
{
    int rc;
    *out = NULL;
    if (type != CLIPDB_ITEM_IMAGE && type != CLIPDB_ITEM_TEXT)
        return cdb_err_set(&db->err, CLIPDB_EINVAL, "bad item type %d", type);
    if ((rc = cdb_vecset_load(db, &v->vs[type], v->sid, type, v->dim)) != CLIPDB_OK) return rc;
    *out = &v->vs[type];
    return CLIPDB_OK;
}

/* Opens the model in dir with precision prec and checks it is the one of
** identity/dim (what = the set's name, for the message). On success *out
** owns it. */
static int open_checked(clipdb_db *db, const char *dir, clipdb_precision prec,
                        const char *identity, int dim, const char *what, clipdb_model **out)
{
    clipdb_model *m = NULL;
    clipdb_model_info info;
    const char *id;
    int rc = clipdb_model_open_precision(&m, dir, prec);
    *out = NULL;
    if (rc != CLIPDB_OK) {
        cdb_err_set(&db->err, rc, "%s", clipdb_model_errmsg(m));
        clipdb_model_close(m);
        return rc;
    }
    id = clipdb_model_identity(m);
    clipdb_model_get_info(m, &info);
    if (!id || strcmp(id, identity) || info.embed_dim != dim) {
        cdb_err_set(&db->err, CLIPDB_EMISMATCH,
                    "%s: the model in %s (%s, %d dims) is not the model of vector set '%s' "
                    "(%s, %d dims); its queries would not be comparable",
                    db->path, dir, id ? id : "?", info.embed_dim, what, identity, dim);
        clipdb_model_close(m);
        return CLIPDB_EMISMATCH;
    }
    *out = m;
    return CLIPDB_OK;
}

int cdb_vset_ctx(clipdb_db *db, cdb_vset *v, clipdb_ctx **ctx)
{
    const char *dir = !db->model_opt && db->model_dir_opt ? db->model_dir_opt : v->model_dir;
    int rc;
    *ctx = NULL;
    if (!v->model &&
        (rc = open_checked(db, dir, v->precision, v->identity, v->dim, v->name, &v->model)) !=
            CLIPDB_OK)
        return rc;
    if (!v->ctx) {
        if ((rc = clipdb_ctx_new(&v->ctx, v->model)) != CLIPDB_OK) {
            cdb_err_set(&db->err, rc, "%s", clipdb_ctx_errmsg(v->ctx));
            clipdb_ctx_free(v->ctx);
            v->ctx = NULL;
            return rc;
        }
        clipdb_ctx_set_truncate(v->ctx, 1); /* as the base set's queries */
        clipdb_ctx_set_max_image_pixels(v->ctx, db->max_image_pixels);
    }
    *ctx = v->ctx;
    return CLIPDB_OK;
}

/* ---- writes other parts of the store make ---------------------------------------- */

int cdb_vsets_forget_item(clipdb_db *db, int64_t id)
{
    if (!cdb_vsets_present(db)) return CLIPDB_OK;
    return cdb_db_run(db, "deleting set vectors", "DELETE FROM set_vectors WHERE id = ?1", "l",
                      id);
}

int cdb_vsets_stats(clipdb_db *db, clipdb_db_stats *out, size_t *cap)
{
    sqlite3_stmt *st = NULL;
    clipdb_db_set_info *x;
    clipdb_precision p;
    int rc, s;
    if (!cdb_vsets_present(db)) return CLIPDB_OK;
    rc = cdb_db_prepare_bind(
        db,
        "SELECT s.name, s.model_identity, s.model_dir, s.precision, s.dim, s.created_at, "
        "(SELECT count(*) FROM set_vectors v WHERE v.set_id = s.id AND v.type = ?1),"
        "(SELECT count(*) FROM set_vectors v WHERE v.set_id = s.id AND v.type = ?2)"
        " FROM vector_sets s ORDER BY s.name",
        &st, "ii", (int)CLIPDB_ITEM_IMAGE, (int)CLIPDB_ITEM_TEXT);
    if (rc != CLIPDB_OK) return rc;
    while ((s = sqlite3_step(st)) == SQLITE_ROW) {
        if (cdb_grow((void **)&out->sets, cap, (size_t)out->n_sets + 1, sizeof *out->sets)) {
            rc = cdb_err_set(&db->err, CLIPDB_ENOMEM, "out of memory");
            break;
        }
        x = &out->sets[out->n_sets++];
        memset(x, 0, sizeof *x);
        x->name = cdb_strdup((const char *)sqlite3_column_text(st, 0));
        x->model = cdb_strdup((const char *)sqlite3_column_text(st, 1));
        x->model_dir = cdb_strdup((const char *)sqlite3_column_text(st, 2));
        /* a static name: the stored text is checked, not handed out */
        x->precision = clipdb_precision_parse((const char *)sqlite3_column_text(st, 3), &p) ==
                               CLIPDB_OK
                           ? clipdb_precision_name(p)
                           : "?";
        x->dim = sqlite3_column_int(st, 4);
        x->created_at = sqlite3_column_int64(st, 5);
        x->images = sqlite3_column_int64(st, 6);
        x->texts = sqlite3_column_int64(st, 7);
        if (!x->name || !x->model || !x->model_dir) {
            rc = cdb_err_set(&db->err, CLIPDB_ENOMEM, "out of memory");
            break;
        }
    }
    if (rc == CLIPDB_OK && s != SQLITE_DONE) rc = cdb_db_sqlerr(db, "listing the vector sets");
    sqlite3_finalize(st);
    return rc;
}

/* ---- reembed ------------------------------------------------------------------------ */

void clipdb_reembed_options_init(clipdb_reembed_options *opt)
{
    memset(opt, 0, sizeof *opt);
    opt->batch_size = REEMBED_DEFAULT_BATCH;
}

/* The set `name` made with the model (identity, dim, prec, dir): created
** (with the tables, taking the file to format version 3) or checked against
** the recorded one, in one transaction. *sid: its id. */
static int ensure_set(clipdb_db *db, const char *name, const char *dir, const char *identity,
                      int dim, clipdb_precision prec, int64_t *sid, int *created)
{
    sqlite3_stmt *st = NULL;
    int64_t ver = 0;
    char buf[128];
    int rc, s;

    *created = 0;
    if ((rc = cdb_db_begin(db)) != CLIPDB_OK) return rc;
    if ((rc = cdb_db_query_int(db, "PRAGMA user_version", &ver)) != CLIPDB_OK) goto cleanup;
    if (ver < CLIPDB_DB_VERSION) {
        snprintf(buf, sizeof buf, "PRAGMA user_version=%d", CLIPDB_DB_VERSION);
        if ((rc = cdb_db_exec(db, schema_sets_sql)) != CLIPDB_OK ||
            (rc = cdb_db_exec(db, buf)) != CLIPDB_OK)
            goto cleanup;
        snprintf(buf, sizeof buf,
                 "INSERT OR REPLACE INTO meta(key, value) VALUES('format_version', '%d')",
                 CLIPDB_DB_VERSION);
        if ((rc = cdb_db_exec(db, buf)) != CLIPDB_OK) goto cleanup;
    }
    rc = cdb_db_prepare_bind(db,
                             "SELECT id, model_identity, precision, dim, model_dir FROM "
                             "vector_sets WHERE name = ?1",
                             &st, "t", name);
    if (rc != CLIPDB_OK) goto cleanup;
    if ((s = sqlite3_step(st)) == SQLITE_ROW) {
        const char *had = (const char *)sqlite3_column_text(st, 1);
        const char *had_prec = (const char *)sqlite3_column_text(st, 2);
        *sid = sqlite3_column_int64(st, 0);
        if (!had || strcmp(had, identity) || sqlite3_column_int(st, 3) != dim) {
            rc = cdb_err_set(&db->err, CLIPDB_EMISMATCH,
                             "%s: vector set '%s' holds the vectors of model %s (%d dims, %s); "
                             "the model in %s is %s (%d dims): use a new name, or delete the "
                             "set first with 'clipdb reembed %s --drop %s'",
                             db->path, name, had ? had : "?", sqlite3_column_int(st, 3),
                             (const char *)sqlite3_column_text(st, 4), dir, identity, dim,
                             db->path, name);
            goto cleanup;
        }
        if (!had_prec || strcmp(had_prec, clipdb_precision_name(prec))) {
            rc = cdb_err_set(&db->err, CLIPDB_EMISMATCH,
                             "%s: vector set '%s' was made in %s precision, not %s; its "
                             "vectors would mix precisions (give --precision %s, or use a new "
                             "name)",
                             db->path, name, had_prec ? had_prec : "?",
                             clipdb_precision_name(prec), had_prec ? had_prec : "?");
            goto cleanup;
        }
        sqlite3_finalize(st);
        st = NULL;
        /* the same model, perhaps moved: its queries are opened from here on */
        rc = cdb_db_run(db, "updating a vector set",
                        "UPDATE vector_sets SET model_dir = ?1 WHERE id = ?2", "tl", dir, *sid);
    } else if (s == SQLITE_DONE) {
        sqlite3_finalize(st);
        st = NULL;
        rc = cdb_db_run(db, "creating a vector set",
                        "INSERT INTO vector_sets(name, model_dir, model_identity, precision,"
                        " dim, created_at) VALUES(?1, ?2, ?3, ?4, ?5, ?6)",
                        "ttttil", name, dir, identity, clipdb_precision_name(prec), dim,
                        (int64_t)time(NULL));
        *sid = sqlite3_last_insert_rowid(db->sql);
        *created = 1;
    } else {
        rc = cdb_db_sqlerr(db, "reading the vector sets");
    }
    if (rc != CLIPDB_OK) goto cleanup;
    rc = cdb_db_commit(db);
cleanup:
    sqlite3_finalize(st);
    if (rc != CLIPDB_OK) cdb_db_rollback(db);
    return rc;
}

/* The items of `type` not yet in set sid, by id: ids and their inputs (an
** image's stored absolute path, or a text). */
typedef struct todo {
    int64_t *ids;
    char **inputs;
    size_t n, cap_ids, cap_inputs;
    int64_t present;        /* items of the type already in the set */
} todo;

static void todo_free(todo *t)
{
    size_t i;
    for (i = 0; i < t->n; i++) free(t->inputs[i]);
    free(t->inputs);
    free(t->ids);
    memset(t, 0, sizeof *t);
}

static int todo_read(clipdb_db *db, int64_t sid, int type, todo *t)
{
    sqlite3_stmt *st = NULL;
    int64_t all = 0;
    int rc, s;
    memset(t, 0, sizeof *t);
    rc = cdb_db_prepare_bind(db,
                             type == CLIPDB_ITEM_IMAGE
                                 ? "SELECT id, coalesce(abspath, path) FROM items WHERE type = ?1 "
                                   "AND id NOT IN (SELECT id FROM set_vectors WHERE set_id = ?2 "
                                   "AND type = ?1) ORDER BY id"
                                 : "SELECT id, text FROM items WHERE type = ?1 AND id NOT IN "
                                   "(SELECT id FROM set_vectors WHERE set_id = ?2 AND type = ?1) "
                                   "ORDER BY id",
                             &st, "il", type, sid);
    if (rc != CLIPDB_OK) return rc;
    while ((s = sqlite3_step(st)) == SQLITE_ROW) {
        const char *in = (const char *)sqlite3_column_text(st, 1);
        if (cdb_grow((void **)&t->ids, &t->cap_ids, t->n + 1, sizeof *t->ids) ||
            cdb_grow((void **)&t->inputs, &t->cap_inputs, t->n + 1, sizeof *t->inputs) ||
            !(t->inputs[t->n] = cdb_strdup(in ? in : ""))) {
            rc = cdb_err_set(&db->err, CLIPDB_ENOMEM, "out of memory");
            break;
        }
        t->ids[t->n++] = sqlite3_column_int64(st, 0);
    }
    if (rc == CLIPDB_OK && s != SQLITE_DONE) rc = cdb_db_sqlerr(db, "listing the items to encode");
    sqlite3_finalize(st);
    if (rc == CLIPDB_OK) rc = cdb_db_count_items(db, type, 0, &all);
    if (rc != CLIPDB_OK) todo_free(t);
    else t->present = all - (int64_t)t->n;
    return rc;
}

/* *sid = the id of the set `name` now, -1 when there is none. */
static int set_id(clipdb_db *db, const char *name, int64_t *sid)
{
    sqlite3_stmt *st = NULL;
    int rc = cdb_db_prepare_bind(db, "SELECT id FROM vector_sets WHERE name = ?1", &st, "t", name);
    int s;
    *sid = -1;
    if (rc != CLIPDB_OK) return rc;
    if ((s = sqlite3_step(st)) == SQLITE_ROW) *sid = sqlite3_column_int64(st, 0);
    else if (s != SQLITE_DONE) rc = cdb_db_sqlerr(db, "reading the vector sets");
    sqlite3_finalize(st);
    return rc;
}

/* One transaction: the vectors (n x dim, status ok) of the items ids[] go
** into set sid, unless the item was deleted meanwhile; *written counts them.
** The set must still be sid (not dropped by another process). */
static int write_batch(clipdb_db *db, const char *name, int64_t sid, int type, int dim,
                       const int64_t *ids, const float *vecs, const clipdb_item_status *status,
                       size_t n, int64_t *written)
{
    sqlite3_stmt *st = NULL;
    int64_t now_sid = -1;
    size_t i;
    int rc;
    if ((rc = cdb_db_begin(db)) != CLIPDB_OK) return rc;
    if ((rc = set_id(db, name, &now_sid)) != CLIPDB_OK) goto cleanup;
    if (now_sid != sid) {
        rc = cdb_err_set(&db->err, CLIPDB_ERROR,
                         "%s: vector set '%s' was dropped by another process during this run",
                         db->path, name);
        goto cleanup;
    }
    rc = cdb_db_prepare(db,
                        "INSERT OR IGNORE INTO set_vectors(set_id, type, id, norm, vec) "
                        "SELECT ?1, ?2, ?3, ?4, ?5 WHERE EXISTS "
                        "(SELECT 1 FROM items WHERE id = ?3 AND type = ?2)",
                        &st);
    if (rc != CLIPDB_OK) goto cleanup;
    for (i = 0; i < n; i++) {
        const float *v = vecs + i * (size_t)dim;
        if (status[i].code != CLIPDB_OK) continue;
        sqlite3_reset(st);
        sqlite3_bind_int64(st, 1, sid);
        sqlite3_bind_int(st, 2, type);
        sqlite3_bind_int64(st, 3, ids[i]);
        sqlite3_bind_double(st, 4, (double)cdb_norm(v, (size_t)dim));
        /* float32 in host order, as the base set (little-endian hosts only) */
        sqlite3_bind_blob(st, 5, v, (int)((size_t)dim * sizeof(float)), SQLITE_STATIC);
        if (sqlite3_step(st) != SQLITE_DONE) {
            rc = cdb_db_sqlerr(db, "writing a set vector");
            goto cleanup;
        }
        *written += sqlite3_changes(db->sql);
    }
    sqlite3_finalize(st);
    st = NULL;
    rc = cdb_db_commit(db);
cleanup:
    sqlite3_finalize(st);
    if (rc != CLIPDB_OK) cdb_db_rollback(db);
    return rc;
}

/* Marks non-finite vectors (a model that makes NaN) as failed inputs. */
static void refuse_nonfinite(const float *vecs, int dim, size_t n, clipdb_item_status *status,
                             const char *const *inputs)
{
    size_t i;
    int j;
    for (i = 0; i < n; i++) {
        if (status[i].code != CLIPDB_OK) continue;
        for (j = 0; j < dim && isfinite(vecs[i * (size_t)dim + (size_t)j]); j++) {
        }
        if (j < dim) {
            status[i].code = CLIPDB_EFORMAT;
            snprintf(status[i].msg, sizeof status[i].msg, "%.400s: the model made a vector that is not finite",
                     inputs[i]);
        }
    }
}

/* Encodes and stores the items of one type missing from the set. */
static int reembed_type(clipdb_db *db, const clipdb_reembed_options *opt, clipdb_ctx *ctx,
                        int64_t sid, int dim, int type, clipdb_reembed_result *res, double t0)
{
    todo t;
    clipdb_add_progress p;
    clipdb_item_status *status = NULL;
    float *vecs = NULL;
    const char **labels = NULL;
    char label[64];
    int64_t *encoded = type == CLIPDB_ITEM_IMAGE ? &res->images_encoded : &res->texts_encoded;
    int64_t *failed = type == CLIPDB_ITEM_IMAGE ? &res->images_failed : &res->texts_failed;
    size_t b = (size_t)opt->batch_size, at, i, n;
    int rc;

    if ((rc = todo_read(db, sid, type, &t)) != CLIPDB_OK) return rc;
    if (type == CLIPDB_ITEM_IMAGE) res->images_present = t.present;
    else res->texts_present = t.present;
    memset(&p, 0, sizeof p);
    p.phase = type == CLIPDB_ITEM_IMAGE ? "images" : "texts";
    p.total = (int64_t)t.n;
    p.skipped = t.present;
    status = cdb_malloc_array(b, sizeof *status);
    vecs = cdb_malloc_array(b, (size_t)dim * sizeof *vecs);
    labels = cdb_malloc_array(b, sizeof *labels);
    if (!status || !vecs || !labels) {
        rc = cdb_err_set(&db->err, CLIPDB_ENOMEM, "out of memory");
        goto cleanup;
    }
    for (at = 0; at < t.n; at += n) {
        n = t.n - at < b ? t.n - at : b;
        // texts (n) -> text tower, or image files (n) -> decode -> vision tower -> vecs (n, dim)
        rc = clipdb_encode_batch(ctx,
                                 type == CLIPDB_ITEM_IMAGE ? CLIPDB_INPUT_IMAGE_FILE
                                                           : CLIPDB_INPUT_TEXT,
                                 (const char *const *)t.inputs + at, (int)n, vecs, status, NULL);
        if (rc != CLIPDB_OK) {
            cdb_err_set(&db->err, rc, "%s", clipdb_ctx_errmsg(ctx));
            goto cleanup;
        }
        for (i = 0; i < n; i++) labels[i] = t.inputs[at + i];
        refuse_nonfinite(vecs, dim, n, status, labels);
        for (i = 0; i < n; i++) {
            if (status[i].code == CLIPDB_OK) continue;
            (*failed)++;
            if (!opt->on_warning) continue;
            if (type == CLIPDB_ITEM_IMAGE) {
                opt->on_warning(opt->arg, status[i].msg);
            } else {
                /* the encoder names a text by its place in the batch: name the item */
                char *m;
                snprintf(label, sizeof label, "text %lld", (long long)t.ids[at + i]);
                m = cdb_sprintf("%s: %s", label, status[i].msg);
                opt->on_warning(opt->arg, m ? m : label);
                free(m);
            }
        }
        if ((rc = write_batch(db, opt->name, sid, type, dim, t.ids + at, vecs, status, n,
                              encoded)) != CLIPDB_OK)
            goto cleanup;
        p.done = (int64_t)(at + n);
        p.added = *encoded;
        p.failed = *failed;
        p.elapsed_s = cdb_now() - t0;
        if (opt->on_progress && opt->on_progress(opt->arg, &p) && at + n < t.n) {
            rc = cdb_err_set(&db->err, CLIPDB_ESTOPPED,
                             "%s: stopped on request; %lld %s of vector set '%s' committed "
                             "(run the same command again to finish)",
                             db->path, (long long)(p.done), p.phase, opt->name);
            goto cleanup;
        }
    }
    if (t.n == 0 && opt->on_progress) { /* nothing to do: said once */
        p.elapsed_s = cdb_now() - t0;
        (void)opt->on_progress(opt->arg, &p);
    }
cleanup:
    free(status);
    free(vecs);
    free(labels);
    todo_free(&t);
    return rc;
}

int clipdb_db_reembed(clipdb_db *db, const clipdb_reembed_options *opt,
                      clipdb_reembed_result *res)
{
    clipdb_reembed_options o;
    clipdb_reembed_result local;
    clipdb_precision prec = CLIPDB_PRECISION_FP32;
    clipdb_model *m = NULL;
    clipdb_model_info info;
    clipdb_ctx *ctx = NULL;
    const char *identity;
    char *absdir = NULL;
    int64_t sid = 0;
    double t0 = cdb_now();
    int rc;

    if (!res) res = &local;
    memset(res, 0, sizeof *res);
    cdb_err_clear(&db->err);
    if (!opt) return cdb_err_set(&db->err, CLIPDB_EINVAL, "reembed: no options");
    o = *opt;
    if (!o.name || !strcmp(o.name, CLIPDB_VECTOR_SET_BASE))
        return cdb_err_set(&db->err, CLIPDB_EINVAL,
                           "the vector set '%s' is the vectors of the database's own model "
                           "(made by add); give another name with --as",
                           CLIPDB_VECTOR_SET_BASE);
    if (!name_ok(o.name))
        return cdb_err_set(&db->err, CLIPDB_EINVAL,
                           "bad vector set name '%.80s': 1 to %d characters of A-Z a-z 0-9 _ -",
                           o.name, CLIPDB_VECTOR_SET_NAME_MAX);
    if (!o.model_dir || !*o.model_dir)
        return cdb_err_set(&db->err, CLIPDB_EINVAL, "reembed: no model directory given");
    if (o.precision && clipdb_precision_parse(o.precision, &prec) != CLIPDB_OK)
        return cdb_err_set(&db->err, CLIPDB_EINVAL, "unknown precision '%.40s' (fp32, bf16 or int8)",
                           o.precision);
    if (o.batch_size == 0) o.batch_size = REEMBED_DEFAULT_BATCH;
    if (o.batch_size < 1 || o.batch_size > REEMBED_MAX_BATCH)
        return cdb_err_set(&db->err, CLIPDB_EINVAL, "reembed: batch size must be 1 to %d",
                           REEMBED_MAX_BATCH);
    if (db->readonly)
        return cdb_err_set(&db->err, CLIPDB_EINVAL, "%s: opened read-only; cannot add a vector set",
                           db->path);
    if ((rc = clipdb_model_open_precision(&m, o.model_dir, prec)) != CLIPDB_OK) {
        cdb_err_set(&db->err, rc, "%s", clipdb_model_errmsg(m));
        goto cleanup;
    }
    identity = clipdb_model_identity(m);
    clipdb_model_get_info(m, &info);
    if (!identity) {
        rc = cdb_err_set(&db->err, CLIPDB_EIO, "%s: cannot compute the model's identity",
                         o.model_dir);
        goto cleanup;
    }
    if ((rc = clipdb_ctx_new(&ctx, m)) != CLIPDB_OK) {
        cdb_err_set(&db->err, rc, "%s", clipdb_ctx_errmsg(ctx));
        goto cleanup;
    }
    clipdb_ctx_set_truncate(ctx, 1); /* captions longer than the context: cut, as add does */
    clipdb_ctx_set_max_image_pixels(ctx, db->max_image_pixels);
    absdir = realpath(o.model_dir, NULL);
    if ((rc = ensure_set(db, o.name, absdir ? absdir : o.model_dir, identity, info.embed_dim, prec,
                         &sid, &res->created)) != CLIPDB_OK)
        goto cleanup;
    if ((rc = reembed_type(db, &o, ctx, sid, info.embed_dim, CLIPDB_ITEM_IMAGE, res, t0)) !=
        CLIPDB_OK)
        goto cleanup;
    rc = reembed_type(db, &o, ctx, sid, info.embed_dim, CLIPDB_ITEM_TEXT, res, t0);
cleanup:
    free(absdir);
    clipdb_ctx_free(ctx);
    clipdb_model_close(m);
    return rc;
}

int clipdb_db_drop_set(clipdb_db *db, const char *name)
{
    int64_t sid = -1;
    int rc;
    cdb_err_clear(&db->err);
    if (name && !strcmp(name, CLIPDB_VECTOR_SET_BASE))
        return cdb_err_set(&db->err, CLIPDB_EINVAL,
                           "the vector set '%s' cannot be dropped: it is the database's own "
                           "(clipdb rm deletes items)",
                           CLIPDB_VECTOR_SET_BASE);
    if (db->readonly)
        return cdb_err_set(&db->err, CLIPDB_EINVAL, "%s: opened read-only; cannot drop a set",
                           db->path);
    if (!name_ok(name) || !cdb_vsets_present(db)) return not_found(db, name ? name : "");
    if ((rc = cdb_db_begin(db)) != CLIPDB_OK) return rc;
    if ((rc = set_id(db, name, &sid)) != CLIPDB_OK) goto cleanup;
    if (sid < 0) {
        cdb_db_rollback(db);
        return not_found(db, name);
    }
    if ((rc = cdb_db_run(db, "dropping a vector set", "DELETE FROM set_vectors WHERE set_id = ?1",
                         "l", sid)) != CLIPDB_OK ||
        (rc = cdb_db_run(db, "dropping a vector set", "DELETE FROM vector_sets WHERE id = ?1", "l",
                         sid)) != CLIPDB_OK)
        goto cleanup;
    rc = cdb_db_commit(db);
cleanup:
    if (rc != CLIPDB_OK) cdb_db_rollback(db);
    return rc;
}
