/*
** db.c: the database file: creating and opening it (magic, version, model
** binding), items, metadata, deleting, loading vectors, statistics.
*/
#include <errno.h>
#include <limits.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>

#include <cjson/cJSON.h>
#include <openssl/evp.h>

#include "store/store.h"

static const char *const schema_sql =
    "CREATE TABLE meta(key TEXT PRIMARY KEY, value TEXT NOT NULL) WITHOUT ROWID;"
    "CREATE TABLE items("
    "  id INTEGER PRIMARY KEY,"
    "  type INTEGER NOT NULL,"          /* 1 image, 2 text */
    "  path TEXT, abspath TEXT, size INTEGER, sha256 TEXT," /* images */
    "  text TEXT,"                      /* texts */
    "  image INTEGER,"                  /* captions: their image's id */
    "  added_at INTEGER NOT NULL);"
    "CREATE UNIQUE INDEX items_abspath ON items(abspath) WHERE abspath IS NOT NULL;"
    "CREATE INDEX items_image ON items(image) WHERE image IS NOT NULL;"
    "CREATE INDEX items_text ON items(text) WHERE text IS NOT NULL;"
    "CREATE TABLE item_meta(item INTEGER NOT NULL, key TEXT NOT NULL, value,"
    "  PRIMARY KEY(item, key)) WITHOUT ROWID;"
    "CREATE INDEX item_meta_kv ON item_meta(key, value);"
    "CREATE TABLE vectors_image(id INTEGER PRIMARY KEY, norm REAL NOT NULL, vec BLOB NOT NULL);"
    "CREATE TABLE vectors_text(id INTEGER PRIMARY KEY, norm REAL NOT NULL, vec BLOB NOT NULL);"
    "CREATE TABLE ivf(target INTEGER NOT NULL, metric INTEGER NOT NULL,"
    "  nlist INTEGER NOT NULL, dim INTEGER NOT NULL, seed INTEGER NOT NULL,"
    "  centroids BLOB NOT NULL, PRIMARY KEY(target, metric)) WITHOUT ROWID;"
    "CREATE TABLE ivf_assign(target INTEGER NOT NULL, metric INTEGER NOT NULL,"
    "  id INTEGER NOT NULL, list INTEGER NOT NULL,"
    "  PRIMARY KEY(target, metric, id)) WITHOUT ROWID;"
    "CREATE INDEX ivf_assign_id ON ivf_assign(id);";

/* ---- small SQLite helpers ------------------------------------------------ */

int cdb_db_sqlerr(clipdb_db *db, const char *what)
{
    int code = sqlite3_errcode(db->sql);
    int rc = CLIPDB_ERROR;
    if (code == SQLITE_NOMEM) rc = CLIPDB_ENOMEM;
    else if (code == SQLITE_IOERR || code == SQLITE_CANTOPEN || code == SQLITE_FULL ||
             code == SQLITE_READONLY || code == SQLITE_BUSY)
        rc = CLIPDB_EIO;
    else if (code == SQLITE_CORRUPT || code == SQLITE_NOTADB)
        rc = CLIPDB_EFORMAT;
    return cdb_err_set(&db->err, rc, "%s: %s: %s", db->path, what, sqlite3_errmsg(db->sql));
}

int cdb_db_exec(clipdb_db *db, const char *sql)
{
    if (sqlite3_exec(db->sql, sql, NULL, NULL, NULL) != SQLITE_OK)
        return cdb_db_sqlerr(db, "sql");
    return CLIPDB_OK;
}

int cdb_db_prepare(clipdb_db *db, const char *sql, sqlite3_stmt **st)
{
    if (sqlite3_prepare_v2(db->sql, sql, -1, st, NULL) != SQLITE_OK) {
        *st = NULL;
        return cdb_db_sqlerr(db, "prepare");
    }
    return CLIPDB_OK;
}

int cdb_db_begin(clipdb_db *db)
{
    return cdb_db_exec(db, "BEGIN IMMEDIATE");
}

int cdb_db_commit(clipdb_db *db)
{
    int rc = cdb_db_exec(db, "COMMIT");
    db->local_changes++;
    return rc;
}

void cdb_db_rollback(clipdb_db *db)
{
    if (!sqlite3_get_autocommit(db->sql)) sqlite3_exec(db->sql, "ROLLBACK", NULL, NULL, NULL);
    db->local_changes++;
}

/* Runs a one-row query returning an integer. */
static int query_int(clipdb_db *db, const char *sql, int64_t *out)
{
    sqlite3_stmt *st = NULL;
    int rc = cdb_db_prepare(db, sql, &st);
    if (rc != CLIPDB_OK) return rc;
    if (sqlite3_step(st) == SQLITE_ROW) *out = sqlite3_column_int64(st, 0);
    else rc = cdb_db_sqlerr(db, sql);
    sqlite3_finalize(st);
    return rc;
}

static int meta_put(clipdb_db *db, const char *key, const char *value)
{
    sqlite3_stmt *st = NULL;
    int rc = cdb_db_prepare(db, "INSERT OR REPLACE INTO meta(key, value) VALUES(?, ?)", &st);
    if (rc != CLIPDB_OK) return rc;
    sqlite3_bind_text(st, 1, key, -1, SQLITE_STATIC);
    sqlite3_bind_text(st, 2, value, -1, SQLITE_STATIC);
    if (sqlite3_step(st) != SQLITE_DONE) rc = cdb_db_sqlerr(db, "writing meta");
    sqlite3_finalize(st);
    return rc;
}

/* *out (caller frees) gets the value, or NULL if the key is absent. */
static int meta_get(clipdb_db *db, const char *key, char **out)
{
    sqlite3_stmt *st = NULL;
    int rc = cdb_db_prepare(db, "SELECT value FROM meta WHERE key = ?", &st);
    *out = NULL;
    if (rc != CLIPDB_OK) return rc;
    sqlite3_bind_text(st, 1, key, -1, SQLITE_STATIC);
    int s = sqlite3_step(st);
    if (s == SQLITE_ROW) {
        *out = cdb_strdup((const char *)sqlite3_column_text(st, 0));
        if (!*out) rc = cdb_err_set(&db->err, CLIPDB_ENOMEM, "out of memory");
    } else if (s != SQLITE_DONE) {
        rc = cdb_db_sqlerr(db, "reading meta");
    }
    sqlite3_finalize(st);
    return rc;
}

/* ---- opening ------------------------------------------------------------- */

void clipdb_db_options_init(clipdb_db_options *opt)
{
    memset(opt, 0, sizeof *opt);
}

static clipdb_db *db_alloc(const char *path)
{
    clipdb_db *db = calloc(1, sizeof *db);
    if (!db) return NULL;
    db->path = cdb_strdup(path ? path : "");
    if (!db->path) {
        free(db);
        return NULL;
    }
    return db;
}

static int sql_open(clipdb_db *db, int flags)
{
    if (sqlite3_open_v2(db->path, &db->sql, flags | SQLITE_OPEN_NOMUTEX, NULL) != SQLITE_OK) {
        int rc = cdb_err_set(&db->err, CLIPDB_EIO, "%s: cannot open: %s", db->path,
                             db->sql ? sqlite3_errmsg(db->sql) : "out of memory");
        return rc;
    }
    sqlite3_busy_timeout(db->sql, 10000);
    return CLIPDB_OK;
}

/* WAL: a reader never blocks the writer, and a killed writer leaves the
** last committed transaction. synchronous=NORMAL is durable against a
** killed process (not a power cut) and keeps commits cheap. */
static int set_pragmas(clipdb_db *db)
{
    /* reads through a memory map: no copy of every page into SQLite's cache */
    int rc = cdb_db_exec(db, "PRAGMA mmap_size=17179869184");
    if (rc != CLIPDB_OK || db->readonly) return rc;
    return cdb_db_exec(db, "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL;");
}

int cdb_db_create_raw(clipdb_db **out, const char *path, const char *identity,
                      int embed_dim, const char *model_dir)
{
    int rc = CLIPDB_OK;
    clipdb_db *db;
    char buf[64];
    char *absdir = NULL;
    struct stat sb;

    *out = db = db_alloc(path);
    if (!db) return CLIPDB_ENOMEM;
    if (!path || !identity || embed_dim <= 0 || embed_dim > 65536)
        return cdb_err_set(&db->err, CLIPDB_EINVAL, "create: bad arguments");
    if (stat(path, &sb) == 0)
        return cdb_err_set(&db->err, CLIPDB_EINVAL, "%s: already exists (not overwriting it)",
                           path);
    rc = sql_open(db, SQLITE_OPEN_READWRITE | SQLITE_OPEN_CREATE);
    if (rc != CLIPDB_OK) goto cleanup;
    /* 32 KiB pages hold 15 vectors of 512 floats (4 KiB pages hold one, half
    ** empty): the file is about half the size and loads faster. */
    if ((rc = cdb_db_exec(db, "PRAGMA page_size=32768")) != CLIPDB_OK) goto cleanup;
    rc = set_pragmas(db);
    if (rc != CLIPDB_OK) goto cleanup;
    snprintf(buf, sizeof buf, "PRAGMA application_id=%d; PRAGMA user_version=%d;",
             (int)CLIPDB_DB_MAGIC, CLIPDB_DB_VERSION);
    if ((rc = cdb_db_begin(db)) != CLIPDB_OK) goto cleanup;
    if ((rc = cdb_db_exec(db, buf)) != CLIPDB_OK) goto cleanup;
    if ((rc = cdb_db_exec(db, schema_sql)) != CLIPDB_OK) goto cleanup;
    absdir = model_dir ? realpath(model_dir, NULL) : NULL;
    snprintf(buf, sizeof buf, "%d", embed_dim);
    if ((rc = meta_put(db, "format", "clipdb")) != CLIPDB_OK) goto cleanup;
    snprintf(buf, sizeof buf, "%d", CLIPDB_DB_VERSION);
    if ((rc = meta_put(db, "format_version", buf)) != CLIPDB_OK) goto cleanup;
    snprintf(buf, sizeof buf, "%d", embed_dim);
    if ((rc = meta_put(db, "embed_dim", buf)) != CLIPDB_OK) goto cleanup;
    if ((rc = meta_put(db, "model_identity", identity)) != CLIPDB_OK) goto cleanup;
    if ((rc = meta_put(db, "model_dir", absdir ? absdir : model_dir ? model_dir : ""))
        != CLIPDB_OK)
        goto cleanup;
    snprintf(buf, sizeof buf, "%lld", (long long)time(NULL));
    if ((rc = meta_put(db, "created_at", buf)) != CLIPDB_OK) goto cleanup;
    if ((rc = meta_put(db, "clipdb_version", CLIPDB_VERSION)) != CLIPDB_OK) goto cleanup;
    if ((rc = cdb_db_commit(db)) != CLIPDB_OK) goto cleanup;
    db->embed_dim = embed_dim;
    db->identity = cdb_strdup(identity);
    db->model_dir = cdb_strdup(absdir ? absdir : model_dir ? model_dir : "");
    if (!db->identity || !db->model_dir) rc = cdb_err_set(&db->err, CLIPDB_ENOMEM, "out of memory");
cleanup:
    if (rc != CLIPDB_OK && db->sql) {
        cdb_db_rollback(db);
        sqlite3_close(db->sql);
        db->sql = NULL;
        remove(path);
    }
    free(absdir);
    return rc;
}

static int create_with_model(clipdb_db **out, const char *path, const char *model_dir)
{
    clipdb_model *m = NULL;
    clipdb_model_info info;
    const char *identity;
    int rc = clipdb_model_open(&m, model_dir);
    if (rc != CLIPDB_OK) {
        *out = db_alloc(path);
        if (*out) cdb_err_set(&(*out)->err, rc, "%s", clipdb_model_errmsg(m));
        clipdb_model_close(m);
        return rc;
    }
    identity = clipdb_model_identity(m);
    clipdb_model_get_info(m, &info);
    rc = cdb_db_create_raw(out, path, identity ? identity : "unknown", info.embed_dim, model_dir);
    if (rc == CLIPDB_OK) (*out)->model = m;
    else clipdb_model_close(m);
    return rc;
}

static int check_header(clipdb_db *db)
{
    int64_t app = 0, ver = 0;
    int rc;
    /* The first read of the file: SQLITE_NOTADB here means "not SQLite". */
    if (sqlite3_exec(db->sql, "SELECT count(*) FROM sqlite_schema", NULL, NULL, NULL) !=
        SQLITE_OK) {
        if (sqlite3_errcode(db->sql) == SQLITE_NOTADB)
            return cdb_err_set(&db->err, CLIPDB_EFORMAT,
                               "%s: not a clipdb database (not an SQLite file)", db->path);
        return cdb_db_sqlerr(db, "opening");
    }
    if ((rc = query_int(db, "PRAGMA application_id", &app)) != CLIPDB_OK) return rc;
    if ((rc = query_int(db, "PRAGMA user_version", &ver)) != CLIPDB_OK) return rc;
    if ((uint32_t)app != CLIPDB_DB_MAGIC)
        return cdb_err_set(&db->err, CLIPDB_EFORMAT,
                           "%s: not a clipdb database (SQLite application_id 0x%08x, "
                           "expected 0x%08x)",
                           db->path, (unsigned)app, (unsigned)CLIPDB_DB_MAGIC);
    if (ver > CLIPDB_DB_VERSION)
        return cdb_err_set(&db->err, CLIPDB_EFORMAT,
                           "%s: database format version %lld is newer than this clipdb "
                           "supports (%d); upgrade clipdb",
                           db->path, (long long)ver, CLIPDB_DB_VERSION);
    if (ver < 1)
        return cdb_err_set(&db->err, CLIPDB_EFORMAT,
                           "%s: bad database format version %lld", db->path, (long long)ver);
    return CLIPDB_OK;
}

static int load_meta(clipdb_db *db)
{
    int rc;
    char *dim = NULL, *fmt = NULL;
    long v;
    if ((rc = meta_get(db, "format", &fmt)) != CLIPDB_OK) goto cleanup;
    if ((rc = meta_get(db, "embed_dim", &dim)) != CLIPDB_OK) goto cleanup;
    if ((rc = meta_get(db, "model_identity", &db->identity)) != CLIPDB_OK) goto cleanup;
    if ((rc = meta_get(db, "model_dir", &db->model_dir)) != CLIPDB_OK) goto cleanup;
    if (!fmt || strcmp(fmt, "clipdb") || !dim || !db->identity || !db->model_dir) {
        rc = cdb_err_set(&db->err, CLIPDB_EFORMAT, "%s: corrupt clipdb database (meta table)",
                         db->path);
        goto cleanup;
    }
    errno = 0;
    v = strtol(dim, NULL, 10);
    if (errno || v <= 0 || v > 65536) {
        rc = cdb_err_set(&db->err, CLIPDB_EFORMAT, "%s: corrupt embed_dim '%s'", db->path, dim);
        goto cleanup;
    }
    db->embed_dim = (int)v;
cleanup:
    free(dim);
    free(fmt);
    return rc;
}

int clipdb_db_open(clipdb_db **out, const char *path, const clipdb_db_options *opt)
{
    clipdb_db_options def;
    clipdb_db *db;
    struct stat sb;
    int rc;

    if (!opt) {
        clipdb_db_options_init(&def);
        opt = &def;
    }
    if (opt->create) {
        if (!opt->model_dir) {
            *out = db = db_alloc(path);
            if (!db) return CLIPDB_ENOMEM;
            return cdb_err_set(&db->err, CLIPDB_EINVAL, "%s: creating needs a model directory",
                               path ? path : "");
        }
        return create_with_model(out, path, opt->model_dir);
    }
    *out = db = db_alloc(path);
    if (!db) return CLIPDB_ENOMEM;
    if (!path) return cdb_err_set(&db->err, CLIPDB_EINVAL, "no database path given");
    if (stat(path, &sb) != 0)
        return cdb_err_set(&db->err, CLIPDB_ENOTFOUND,
                           "%s: no such database (create one with 'clipdb init')", path);
    if (!S_ISREG(sb.st_mode))
        return cdb_err_set(&db->err, CLIPDB_EFORMAT, "%s: not a clipdb database (not a file)",
                           path);
    db->readonly = opt->readonly;
    if (opt->model_dir && !(db->model_dir_opt = cdb_strdup(opt->model_dir)))
        return cdb_err_set(&db->err, CLIPDB_ENOMEM, "out of memory");
    rc = sql_open(db, opt->readonly ? SQLITE_OPEN_READONLY : SQLITE_OPEN_READWRITE);
    if (rc != CLIPDB_OK) return rc;
    if ((rc = check_header(db)) != CLIPDB_OK) return rc;
    if ((rc = set_pragmas(db)) != CLIPDB_OK) return rc;
    return load_meta(db);
}

void clipdb_db_close(clipdb_db *db)
{
    int i;
    if (!db) return;
    cdb_db_ivf_release(db);
    for (i = 0; i < 3; i++) {
        free(db->sets[i].ids);
        free(db->sets[i].vecs);
        free(db->sets[i].norms);
    }
    if (db->sql) sqlite3_close(db->sql);
    clipdb_ctx_free(db->ctx);
    clipdb_model_close(db->model);
    free(db->identity);
    free(db->model_dir);
    free(db->model_dir_opt);
    free(db->path);
    free(db);
}

const char *clipdb_db_errmsg(const clipdb_db *db)
{
    if (!db) return "out of memory";
    return db->err.code == CLIPDB_OK ? "no error" : db->err.msg;
}

int clipdb_db_model(clipdb_db *db, clipdb_model **out)
{
    int rc = CLIPDB_OK;
    clipdb_model *m = NULL;
    clipdb_model_info info;
    const char *dir, *id;

    *out = NULL;
    if (!db->model) {
        dir = db->model_dir_opt ? db->model_dir_opt : db->model_dir;
        if (!dir || !*dir)
            return cdb_err_set(&db->err, CLIPDB_EINVAL,
                               "%s: no model directory recorded; give one (--model DIR)",
                               db->path);
        rc = clipdb_model_open(&m, dir);
        if (rc != CLIPDB_OK) {
            cdb_err_set(&db->err, rc, "%s", clipdb_model_errmsg(m));
            goto cleanup;
        }
        id = clipdb_model_identity(m);
        clipdb_model_get_info(m, &info);
        if (!id || strcmp(id, db->identity) || info.embed_dim != db->embed_dim) {
            rc = cdb_err_set(&db->err, CLIPDB_EMISMATCH,
                             "%s: the model in %s (%s, %d dims) is not the model this "
                             "database was created with (%s, %d dims); its vectors would not "
                             "be comparable",
                             db->path, dir, id ? id : "?", info.embed_dim, db->identity,
                             db->embed_dim);
            goto cleanup;
        }
        db->model = m;
        m = NULL;
    }
    if (!db->ctx) {
        rc = clipdb_ctx_new(&db->ctx, db->model);
        if (rc != CLIPDB_OK) {
            cdb_err_set(&db->err, rc, "%s", clipdb_ctx_errmsg(db->ctx));
            clipdb_ctx_free(db->ctx);
            db->ctx = NULL;
            goto cleanup;
        }
        /* Captions and queries longer than the context are cut as CLIP's
        ** truncate=True does, rather than refused. */
        clipdb_ctx_set_truncate(db->ctx, 1);
    }
    *out = db->model;
cleanup:
    clipdb_model_close(m);
    return rc;
}

/* ---- items ---------------------------------------------------------------- */

static float vec_norm(const float *v, int d)
{
    double s = 0;
    int i;
    for (i = 0; i < d; i++) s += (double)v[i] * (double)v[i];
    return (float)sqrt(s);
}

static int put_vector(clipdb_db *db, int type, int64_t id, const float *vec)
{
    sqlite3_stmt *st = NULL;
    int rc, i;
    for (i = 0; i < db->embed_dim; i++)
        if (!isfinite(vec[i]))
            return cdb_err_set(&db->err, CLIPDB_EINVAL, "item %lld: vector is not finite",
                               (long long)id);
    rc = cdb_db_prepare(db,
                        type == CLIPDB_ITEM_IMAGE
                            ? "INSERT OR REPLACE INTO vectors_image(id, norm, vec) VALUES(?,?,?)"
                            : "INSERT OR REPLACE INTO vectors_text(id, norm, vec) VALUES(?,?,?)",
                        &st);
    if (rc != CLIPDB_OK) return rc;
    sqlite3_bind_int64(st, 1, id);
    sqlite3_bind_double(st, 2, (double)vec_norm(vec, db->embed_dim));
    /* float32 in host order; clipdb builds only for little-endian hosts. */
    sqlite3_bind_blob(st, 3, vec, (int)((size_t)db->embed_dim * sizeof(float)), SQLITE_STATIC);
    if (sqlite3_step(st) != SQLITE_DONE) rc = cdb_db_sqlerr(db, "writing a vector");
    sqlite3_finalize(st);
    if (rc == CLIPDB_OK) rc = cdb_db_ivf_on_insert(db, type, id, vec);
    return rc;
}

int cdb_db_insert_image(clipdb_db *db, const char *path, const char *abspath,
                        int64_t size, const char *sha256, const float *vec, int64_t *id)
{
    sqlite3_stmt *st = NULL;
    int rc = cdb_db_prepare(db,
                            "INSERT INTO items(type, path, abspath, size, sha256, added_at) "
                            "VALUES(1, ?, ?, ?, ?, strftime('%s','now'))",
                            &st);
    if (rc != CLIPDB_OK) return rc;
    sqlite3_bind_text(st, 1, path, -1, SQLITE_STATIC);
    sqlite3_bind_text(st, 2, abspath, -1, SQLITE_STATIC);
    sqlite3_bind_int64(st, 3, size);
    sqlite3_bind_text(st, 4, sha256, -1, SQLITE_STATIC);
    if (sqlite3_step(st) != SQLITE_DONE) rc = cdb_db_sqlerr(db, "adding an image");
    sqlite3_finalize(st);
    if (rc != CLIPDB_OK) return rc;
    *id = sqlite3_last_insert_rowid(db->sql);
    return put_vector(db, CLIPDB_ITEM_IMAGE, *id, vec);
}

int cdb_db_update_image(clipdb_db *db, int64_t id, int64_t size, const char *sha256,
                        const float *vec)
{
    sqlite3_stmt *st = NULL;
    int rc = cdb_db_prepare(db, "UPDATE items SET size = ?, sha256 = ? WHERE id = ?", &st);
    if (rc != CLIPDB_OK) return rc;
    sqlite3_bind_int64(st, 1, size);
    sqlite3_bind_text(st, 2, sha256, -1, SQLITE_STATIC);
    sqlite3_bind_int64(st, 3, id);
    if (sqlite3_step(st) != SQLITE_DONE) rc = cdb_db_sqlerr(db, "updating an image");
    sqlite3_finalize(st);
    if (rc != CLIPDB_OK) return rc;
    rc = cdb_db_prepare(db, "DELETE FROM ivf_assign WHERE id = ?", &st);
    if (rc != CLIPDB_OK) return rc;
    sqlite3_bind_int64(st, 1, id);
    if (sqlite3_step(st) != SQLITE_DONE) rc = cdb_db_sqlerr(db, "updating an image");
    sqlite3_finalize(st);
    if (rc != CLIPDB_OK) return rc;
    return put_vector(db, CLIPDB_ITEM_IMAGE, id, vec);
}

int cdb_db_insert_text(clipdb_db *db, const char *text, int64_t image, const float *vec,
                       int64_t *id)
{
    sqlite3_stmt *st = NULL;
    int rc = cdb_db_prepare(db,
                            "INSERT INTO items(type, text, image, added_at) "
                            "VALUES(2, ?, ?, strftime('%s','now'))",
                            &st);
    if (rc != CLIPDB_OK) return rc;
    sqlite3_bind_text(st, 1, text, -1, SQLITE_STATIC);
    if (image >= 0) sqlite3_bind_int64(st, 2, image);
    else sqlite3_bind_null(st, 2);
    if (sqlite3_step(st) != SQLITE_DONE) rc = cdb_db_sqlerr(db, "adding a text");
    sqlite3_finalize(st);
    if (rc != CLIPDB_OK) return rc;
    *id = sqlite3_last_insert_rowid(db->sql);
    return put_vector(db, CLIPDB_ITEM_TEXT, *id, vec);
}

int cdb_db_set_meta_json(clipdb_db *db, int64_t id, const char *json)
{
    cJSON *obj = NULL, *f;
    sqlite3_stmt *st = NULL;
    char *s = NULL;
    int rc = CLIPDB_OK;

    if (!json || !*json) return CLIPDB_OK;
    if (strlen(json) > CLIPDB_MAX_TEXT_BYTES)
        return cdb_err_set(&db->err, CLIPDB_ELIMIT, "item %lld: metadata too large",
                           (long long)id);
    obj = cJSON_Parse(json);
    if (!cJSON_IsObject(obj)) {
        rc = cdb_err_set(&db->err, CLIPDB_EFORMAT, "item %lld: metadata is not a JSON object",
                         (long long)id);
        goto cleanup;
    }
    rc = cdb_db_prepare(db, "INSERT OR REPLACE INTO item_meta(item, key, value) VALUES(?,?,?)",
                        &st);
    if (rc != CLIPDB_OK) goto cleanup;
    cJSON_ArrayForEach(f, obj)
    {
        sqlite3_reset(st);
        sqlite3_bind_int64(st, 1, id);
        sqlite3_bind_text(st, 2, f->string, -1, SQLITE_STATIC);
        if (cJSON_IsString(f)) {
            sqlite3_bind_text(st, 3, f->valuestring, -1, SQLITE_STATIC);
        } else if (cJSON_IsNumber(f)) {
            double v = f->valuedouble;
            if (v == floor(v) && fabs(v) < 9e15) sqlite3_bind_int64(st, 3, (sqlite3_int64)v);
            else sqlite3_bind_double(st, 3, v);
        } else if (cJSON_IsNull(f)) {
            sqlite3_bind_null(st, 3);
        } else {
            /* booleans, arrays, objects: their JSON text */
            free(s);
            s = cJSON_PrintUnformatted(f);
            if (!s) {
                rc = cdb_err_set(&db->err, CLIPDB_ENOMEM, "out of memory");
                goto cleanup;
            }
            sqlite3_bind_text(st, 3, s, -1, SQLITE_TRANSIENT);
        }
        if (sqlite3_step(st) != SQLITE_DONE) {
            rc = cdb_db_sqlerr(db, "writing metadata");
            goto cleanup;
        }
    }
cleanup:
    free(s);
    sqlite3_finalize(st);
    cJSON_Delete(obj);
    return rc;
}

/* ---- deleting ------------------------------------------------------------- */

/* Deletes one item's rows (item, vector, metadata, IVF assignment). */
static int delete_one(clipdb_db *db, int64_t id)
{
    static const char *const sql[] = {
        "DELETE FROM items WHERE id = ?1",
        "DELETE FROM vectors_image WHERE id = ?1",
        "DELETE FROM vectors_text WHERE id = ?1",
        "DELETE FROM item_meta WHERE item = ?1",
        "DELETE FROM ivf_assign WHERE id = ?1",
    };
    size_t i;
    int rc = CLIPDB_OK;
    for (i = 0; i < sizeof sql / sizeof sql[0] && rc == CLIPDB_OK; i++) {
        sqlite3_stmt *st = NULL;
        if ((rc = cdb_db_prepare(db, sql[i], &st)) != CLIPDB_OK) break;
        sqlite3_bind_int64(st, 1, id);
        if (sqlite3_step(st) != SQLITE_DONE) rc = cdb_db_sqlerr(db, "deleting");
        sqlite3_finalize(st);
    }
    return rc;
}

int clipdb_db_rm(clipdb_db *db, const int64_t *ids, int n, int64_t *n_items,
                 int64_t *n_captions)
{
    sqlite3_stmt *find = NULL, *caps = NULL;
    int64_t captions = 0, *cap_ids = NULL;
    size_t n_cap = 0, cap_cap = 0;
    int rc, i;
    size_t j;

    if (n_items) *n_items = 0;
    if (n_captions) *n_captions = 0;
    if (n < 0 || (n > 0 && !ids)) return cdb_err_set(&db->err, CLIPDB_EINVAL, "rm: bad arguments");
    if ((rc = cdb_db_begin(db)) != CLIPDB_OK) return rc;
    if ((rc = cdb_db_prepare(db, "SELECT type FROM items WHERE id = ?", &find)) != CLIPDB_OK)
        goto cleanup;
    if ((rc = cdb_db_prepare(db, "SELECT id FROM items WHERE image = ?", &caps)) != CLIPDB_OK)
        goto cleanup;
    for (i = 0; i < n; i++) {
        sqlite3_reset(find);
        sqlite3_bind_int64(find, 1, ids[i]);
        if (sqlite3_step(find) != SQLITE_ROW) {
            rc = cdb_err_set(&db->err, CLIPDB_ENOTFOUND, "%s: no item with id %lld (nothing deleted)",
                             db->path, (long long)ids[i]);
            goto cleanup;
        }
        /* Collect the captions first: deleting while stepping is unsafe. */
        sqlite3_reset(caps);
        sqlite3_bind_int64(caps, 1, ids[i]);
        n_cap = 0;
        while (sqlite3_step(caps) == SQLITE_ROW) {
            if (n_cap == cap_cap) {
                size_t nc = cap_cap ? 2 * cap_cap : 16;
                int64_t *p = realloc(cap_ids, nc * sizeof *p);
                if (!p) {
                    rc = cdb_err_set(&db->err, CLIPDB_ENOMEM, "out of memory");
                    goto cleanup;
                }
                cap_ids = p;
                cap_cap = nc;
            }
            cap_ids[n_cap++] = sqlite3_column_int64(caps, 0);
        }
        sqlite3_reset(caps);
        for (j = 0; j < n_cap; j++)
            if ((rc = delete_one(db, cap_ids[j])) != CLIPDB_OK) goto cleanup;
        captions += (int64_t)n_cap;
        if ((rc = delete_one(db, ids[i])) != CLIPDB_OK) goto cleanup;
    }
    sqlite3_finalize(find);
    sqlite3_finalize(caps);
    find = caps = NULL;
    rc = cdb_db_commit(db);
    if (rc == CLIPDB_OK) {
        if (n_items) *n_items = n;
        if (n_captions) *n_captions = captions;
    }
cleanup:
    sqlite3_finalize(find);
    sqlite3_finalize(caps);
    if (rc != CLIPDB_OK) cdb_db_rollback(db);
    free(cap_ids);
    return rc;
}

/* ---- vectors -------------------------------------------------------------- */

static void vecset_clear(cdb_vecset *s)
{
    free(s->ids);
    free(s->vecs);
    free(s->norms);
    memset(s, 0, sizeof *s);
}

int cdb_db_vectors(clipdb_db *db, int type, const cdb_vecset **out)
{
    cdb_vecset *s;
    sqlite3_stmt *st = NULL;
    int64_t ver = 0, count = 0;
    size_t row = 0, vbytes = (size_t)db->embed_dim * sizeof(float);
    int rc, step;

    *out = NULL;
    if (type != CLIPDB_ITEM_IMAGE && type != CLIPDB_ITEM_TEXT)
        return cdb_err_set(&db->err, CLIPDB_EINVAL, "bad item type %d", type);
    s = &db->sets[type];
    if ((rc = query_int(db, "PRAGMA data_version", &ver)) != CLIPDB_OK) return rc;
    if (s->loaded && s->data_version == ver && s->changes == db->local_changes) {
        *out = s;
        return CLIPDB_OK;
    }
    vecset_clear(s);
    rc = query_int(db,
                   type == CLIPDB_ITEM_IMAGE ? "SELECT count(*) FROM vectors_image"
                                             : "SELECT count(*) FROM vectors_text",
                   &count);
    if (rc != CLIPDB_OK) return rc;
    s->ids = cdb_malloc_array((size_t)count, sizeof *s->ids);
    s->norms = cdb_malloc_array((size_t)count, sizeof *s->norms);
    s->vecs = cdb_malloc_array((size_t)count, vbytes);
    if (!s->ids || !s->norms || !s->vecs) {
        rc = cdb_err_set(&db->err, CLIPDB_ENOMEM, "out of memory loading %lld vectors",
                         (long long)count);
        goto cleanup;
    }
    rc = cdb_db_prepare(db,
                        type == CLIPDB_ITEM_IMAGE
                            ? "SELECT id, norm, vec FROM vectors_image ORDER BY id"
                            : "SELECT id, norm, vec FROM vectors_text ORDER BY id",
                        &st);
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
        memcpy(s->vecs + row * (size_t)db->embed_dim, blob, vbytes);
        row++;
    }
    if (step != SQLITE_ROW && step != SQLITE_DONE) {
        rc = cdb_db_sqlerr(db, "loading vectors");
        goto cleanup;
    }
    s->n = row;
    s->loaded = 1;
    s->data_version = ver;
    s->changes = db->local_changes;
    *out = s;
cleanup:
    sqlite3_finalize(st);
    if (rc != CLIPDB_OK) vecset_clear(s);
    return rc;
}

/* ---- hashing -------------------------------------------------------------- */

int cdb_sha256_hex(const void *data, size_t len, char hex[65], cdb_err *e)
{
    unsigned char md[EVP_MAX_MD_SIZE];
    unsigned int n = 0, i;
    if (!EVP_Digest(data, len, md, &n, EVP_sha256(), NULL) || n != 32)
        return cdb_err_set(e, CLIPDB_ERROR, "SHA-256 failed");
    for (i = 0; i < n; i++) snprintf(hex + 2 * i, 3, "%02x", md[i]);
    hex[64] = '\0';
    return CLIPDB_OK;
}

/* ---- statistics ------------------------------------------------------------ */

int clipdb_db_get_stats(clipdb_db *db, clipdb_db_stats *out)
{
    sqlite3_stmt *st = NULL;
    int rc;
    memset(out, 0, sizeof *out);
    if ((rc = query_int(db, "SELECT count(*) FROM items WHERE type = 1", &out->images)) != CLIPDB_OK)
        return rc;
    if ((rc = query_int(db, "SELECT count(*) FROM items WHERE type = 2", &out->texts)) != CLIPDB_OK)
        return rc;
    if ((rc = query_int(db, "SELECT count(*) FROM items WHERE type = 2 AND image IS NOT NULL",
                        &out->captions)) != CLIPDB_OK)
        return rc;
    if ((rc = query_int(db,
                        "SELECT (SELECT count(*) FROM vectors_image) + "
                        "(SELECT count(*) FROM vectors_text)",
                        &out->vectors)) != CLIPDB_OK)
        return rc;
    out->format_version = CLIPDB_DB_VERSION;
    out->embed_dim = db->embed_dim;
    out->model = db->identity;
    out->model_dir = db->model_dir;
    out->path = db->path;
    rc = cdb_db_prepare(db,
                        "SELECT target, metric, nlist, "
                        "(SELECT count(*) FROM ivf_assign a WHERE a.target = ivf.target "
                        "AND a.metric = ivf.metric) FROM ivf ORDER BY target, metric",
                        &st);
    if (rc != CLIPDB_OK) return rc;
    while (sqlite3_step(st) == SQLITE_ROW && out->n_indexes < 8) {
        clipdb_db_index_info *x = &out->indexes[out->n_indexes++];
        x->kind = "ivf";
        x->target = sqlite3_column_int(st, 0);
        x->metric = (clipdb_metric)sqlite3_column_int(st, 1);
        x->nlist = sqlite3_column_int(st, 2);
        x->n_vectors = sqlite3_column_int64(st, 3);
    }
    sqlite3_finalize(st);
    return CLIPDB_OK;
}
