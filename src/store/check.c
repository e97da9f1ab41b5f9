/*
** check.c: clipdb_db_check, the integrity check of a database file (`clipdb
** check`): SQLite's own integrity check, then the invariants of the data
** (issue 9), each problem reported by item id. Reads only; every query is
** bounded by the size of the file, and the problems listed by
** CLIPDB_CHECK_MAX_PROBLEMS (all are counted).
**
** Most invariants are one SQL query each (the table `rules` below): a query
** returns (id, other) rows, one per problem. The vectors are read once, row
** by row, with cdb_vector_damage (the test searches apply when they load
** them), and the stored indexes are compared with the vector sets.
*/
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "store/store.h"

typedef struct check_ctx {
    clipdb_db *db;
    clipdb_db_check_report *r;
    size_t cap;
} check_ctx;

/* Counts a problem and lists it while there is room; message = prefix + the
** formatted text. Only out of memory fails. */
static int add_problem(check_ctx *c, const char *kind, int64_t item, const char *prefix,
                       const char *fmt, ...)
{
    clipdb_db_problem *p;
    char text[512];
    va_list ap;
    c->r->n_problems++;
    if (c->r->n_listed >= CLIPDB_CHECK_MAX_PROBLEMS) return CLIPDB_OK;
    if (cdb_grow((void **)&c->r->problems, &c->cap, (size_t)c->r->n_listed + 1,
                 sizeof *c->r->problems))
        return cdb_err_set(&c->db->err, CLIPDB_ENOMEM, "out of memory");
    va_start(ap, fmt);
    vsnprintf(text, sizeof text, fmt, ap);
    va_end(ap);
    p = &c->r->problems[c->r->n_listed];
    p->kind = kind;
    p->item = item;
    if (!(p->message = cdb_sprintf("%s%s", prefix ? prefix : "", text)))
        return cdb_err_set(&c->db->err, CLIPDB_ENOMEM, "out of memory");
    c->r->n_listed++;
    return CLIPDB_OK;
}

/* After a failed prepare or step: a file SQLite finds damaged is a problem
** found (the check goes on with the next query); anything else (I/O, out of
** memory) stops the check. */
static int read_failed(check_ctx *c, const char *what)
{
    int code = sqlite3_errcode(c->db->sql) & 0xff;
    if (code == SQLITE_CORRUPT || code == SQLITE_NOTADB || code == SQLITE_ERROR ||
        code == SQLITE_MISMATCH || code == SQLITE_RANGE)
        return add_problem(c, "integrity", -1, NULL, "cannot read %s: %s", what,
                           sqlite3_errmsg(c->db->sql));
    return cdb_db_sqlerr(c->db, what);
}

/* Runs sql (binding binds[0 .. nb) as ?1, ?2, ...): each row (a, b) is a
** problem of `kind` about item a (about no item when no_item), its message
** prefix + fmt formatted with (a, b). */
static int rule_rows(check_ctx *c, const char *kind, const char *prefix, const char *sql,
                     const int64_t *binds, int nb, const char *fmt, int no_item)
{
    sqlite3_stmt *st = NULL;
    int rc = CLIPDB_OK, s = SQLITE_DONE, i;
    if (sqlite3_prepare_v2(c->db->sql, sql, -1, &st, NULL) != SQLITE_OK)
        return read_failed(c, kind);
    for (i = 0; i < nb; i++) sqlite3_bind_int64(st, i + 1, binds[i]);
    while (rc == CLIPDB_OK && (s = sqlite3_step(st)) == SQLITE_ROW) {
        long long id = sqlite3_column_int64(st, 0);
        long long other = sqlite3_column_count(st) > 1 ? sqlite3_column_int64(st, 1) : 0;
        rc = add_problem(c, kind, no_item ? -1 : (int64_t)id, prefix, fmt, id, other);
    }
    if (rc == CLIPDB_OK && s != SQLITE_DONE) rc = read_failed(c, kind);
    sqlite3_finalize(st);
    return rc;
}

static int rule(check_ctx *c, const char *kind, const char *prefix, const char *sql,
                const int64_t *binds, int nb, const char *fmt)
{
    return rule_rows(c, kind, prefix, sql, binds, nb, fmt, 0);
}

/* One integer of a one-row query into *out (0 when it cannot be read: the
** reason is then a problem found). */
static int count(check_ctx *c, const char *sql, int64_t *out)
{
    sqlite3_stmt *st = NULL;
    int rc = CLIPDB_OK;
    *out = 0;
    if (sqlite3_prepare_v2(c->db->sql, sql, -1, &st, NULL) != SQLITE_OK)
        return read_failed(c, "counts");
    if (sqlite3_step(st) == SQLITE_ROW) *out = sqlite3_column_int64(st, 0);
    else rc = read_failed(c, "counts");
    sqlite3_finalize(st);
    return rc;
}

/* SQLite's own check: each line other than "ok" is a problem (at most 100). */
static int check_sqlite(check_ctx *c, int quick)
{
    sqlite3_stmt *st = NULL;
    int rc = CLIPDB_OK, s = SQLITE_DONE;
    if (sqlite3_prepare_v2(c->db->sql,
                           quick ? "PRAGMA quick_check(100)" : "PRAGMA integrity_check(100)", -1,
                           &st, NULL) != SQLITE_OK)
        return read_failed(c, "the file");
    while (rc == CLIPDB_OK && (s = sqlite3_step(st)) == SQLITE_ROW) {
        const char *text = (const char *)sqlite3_column_text(st, 0), *nl;
        if (!text || !strcmp(text, "ok")) continue;
        /* a row may hold several lines ("*** in database main ***\nOn tree
        ** page 17 cell 15: ..."): one problem each */
        for (; rc == CLIPDB_OK && *text; text = *nl ? nl + 1 : nl) {
            nl = strchr(text, '\n');
            if (!nl) nl = text + strlen(text);
            if (nl > text && strncmp(text, "*** in database", 15))
                rc = add_problem(c, "integrity", -1, NULL, "SQLite %s: %.*s",
                                 quick ? "quick_check" : "integrity_check",
                                 (int)(nl - text > 400 ? 400 : nl - text), text);
        }
    }
    if (rc == CLIPDB_OK && s != SQLITE_DONE) rc = read_failed(c, "the file");
    sqlite3_finalize(st);
    return rc;
}

/* The invariants that are one query each. Rows are (item id, other). */
static const struct {
    const char *kind, *sql, *fmt;
} rules[] = {
    {"item", "SELECT id, type FROM items WHERE type NOT IN (1, 2)",
     "item %lld: unknown item type %lld"},
    {"item", "SELECT id FROM items WHERE type = 1 AND path IS NULL AND abspath IS NULL",
     "image %lld: no path recorded"},
    {"item", "SELECT id FROM items WHERE type = 2 AND text IS NULL", "text %lld: no text recorded"},
    {"orphan_caption",
     "SELECT c.id, c.image FROM items c WHERE c.image IS NOT NULL AND NOT EXISTS "
     "(SELECT 1 FROM items i WHERE i.id = c.image AND i.type = 1) ORDER BY c.id",
     "caption %lld: its image %lld does not exist"},
    {"duplicate_text",
     "SELECT id, first FROM (SELECT a.id AS id, (SELECT min(b.id) FROM items b WHERE b.type = 2 "
     "AND b.text = a.text AND b.image IS a.image AND b.id < a.id) AS first FROM items a "
     "WHERE a.type = 2) WHERE first IS NOT NULL ORDER BY id",
     "text %lld: the same text as item %lld (with the same image, or both standalone)"},
    {"duplicate_path",
     "SELECT id, first FROM (SELECT a.id AS id, (SELECT min(b.id) FROM items b WHERE b.type = 1 "
     "AND b.abspath = a.abspath AND b.id < a.id) AS first FROM items a WHERE a.type = 1) "
     "WHERE first IS NOT NULL ORDER BY id",
     "image %lld: the same file as image %lld"},
    {"missing_vector",
     "SELECT id FROM items WHERE type = 1 AND id NOT IN (SELECT id FROM vectors_image) ORDER BY id",
     "image %lld: no vector stored"},
    {"missing_vector",
     "SELECT id FROM items WHERE type = 2 AND id NOT IN (SELECT id FROM vectors_text) ORDER BY id",
     "text %lld: no vector stored"},
    {"orphan_vector",
     "SELECT id FROM vectors_image WHERE id NOT IN (SELECT id FROM items WHERE type = 1) "
     "ORDER BY id",
     "item %lld: an image vector without an image item"},
    {"orphan_vector",
     "SELECT id FROM vectors_text WHERE id NOT IN (SELECT id FROM items WHERE type = 2) "
     "ORDER BY id",
     "item %lld: a text vector without a text item"},
    {"orphan_meta",
     "SELECT DISTINCT item FROM item_meta WHERE item NOT IN (SELECT id FROM items) ORDER BY item",
     "item %lld: metadata without its item"},
};

/* Every stored vector: its size, finite components, its stored norm. */
static int check_vectors(check_ctx *c, int set)
{
    sqlite3_stmt *st = NULL;
    const size_t vbytes = (size_t)c->db->embed_dim * sizeof(float);
    const char *name = cdb_set_name(set), *why;
    float *v = malloc(vbytes);
    int rc = CLIPDB_OK, s = SQLITE_DONE;
    if (!v) return cdb_err_set(&c->db->err, CLIPDB_ENOMEM, "out of memory");
    if (sqlite3_prepare_v2(c->db->sql,
                           set == CLIPDB_ITEM_IMAGE ? "SELECT id, norm, vec FROM vectors_image"
                                                    : "SELECT id, norm, vec FROM vectors_text",
                           -1, &st, NULL) != SQLITE_OK) {
        rc = read_failed(c, "the vectors");
        goto cleanup;
    }
    while (rc == CLIPDB_OK && (s = sqlite3_step(st)) == SQLITE_ROW) {
        long long id = sqlite3_column_int64(st, 0);
        const void *blob = sqlite3_column_blob(st, 2);
        int bytes = sqlite3_column_bytes(st, 2);
        c->r->vectors++;
        if (sqlite3_column_type(st, 1) != SQLITE_FLOAT && sqlite3_column_type(st, 1) != SQLITE_INTEGER) {
            rc = add_problem(c, "vector", id, NULL, "item %lld: its %s vector has no stored norm",
                             id, name);
        } else if (!blob || (size_t)bytes != vbytes) {
            rc = add_problem(c, "vector", id, NULL,
                             "item %lld: its %s vector has %d bytes, expected %zu", id, name,
                             bytes, vbytes);
        } else {
            memcpy(v, blob, vbytes);
            if ((why = cdb_vector_damage(v, c->db->embed_dim, sqlite3_column_double(st, 1))))
                rc = add_problem(c, "vector", id, NULL, "item %lld: its %s vector is damaged (%s)",
                                 id, name, why);
        }
    }
    if (rc == CLIPDB_OK && s != SQLITE_DONE) rc = read_failed(c, "the vectors");
cleanup:
    sqlite3_finalize(st);
    free(v);
    return rc;
}

/* Ids above the high-water mark (meta last_item_id), which a new item could
** be given again. A file never opened read-write since the mark exists has
** none: nothing to check. */
static int check_high_water(check_ctx *c)
{
    sqlite3_stmt *st = NULL;
    int64_t last = 0;
    int rc = CLIPDB_OK, s, have = 0, valid = 0;
    /* valid: the text is the decimal form of a whole number */
    if (sqlite3_prepare_v2(c->db->sql, "SELECT value, CAST(CAST(value AS INTEGER) AS TEXT) = value "
                           "FROM meta WHERE key = 'last_item_id'", -1, &st, NULL) != SQLITE_OK)
        return read_failed(c, "meta");
    s = sqlite3_step(st);
    if (s == SQLITE_ROW) {
        have = 1;
        last = sqlite3_column_int64(st, 0);
        valid = sqlite3_column_int(st, 1);
    } else if (s != SQLITE_DONE) {
        rc = read_failed(c, "meta");
    }
    sqlite3_finalize(st);
    if (rc != CLIPDB_OK || !have) return rc;
    if (!valid)
        return add_problem(c, "high_water", -1, NULL,
                           "meta last_item_id is not a whole number");
    return rule(c, "high_water", NULL, "SELECT id, ?1 FROM items WHERE id > ?1 ORDER BY id",
                &last, 1, "item %lld: its id is above the highest id recorded (%lld): ids "
                          "could be given twice");
}

/* The lists of an IVF index (?1 target, ?2 metric, ?3 nlist) against the
** vectors of its set: sql[0] for images, sql[1] for texts. */
static const struct {
    const char *sql[2], *fmt;
} ivf_rules[] = {
    {{"SELECT id FROM ivf_assign WHERE target = ?1 AND metric = ?2 AND id NOT IN "
      "(SELECT id FROM vectors_image) ORDER BY id",
      "SELECT id FROM ivf_assign WHERE target = ?1 AND metric = ?2 AND id NOT IN "
      "(SELECT id FROM vectors_text) ORDER BY id"},
     "item %lld is listed but has no vector of the index's set"},
    {{"SELECT id FROM vectors_image WHERE id NOT IN (SELECT id FROM ivf_assign "
      "WHERE target = ?1 AND metric = ?2) ORDER BY id",
      "SELECT id FROM vectors_text WHERE id NOT IN (SELECT id FROM ivf_assign "
      "WHERE target = ?1 AND metric = ?2) ORDER BY id"},
     "item %lld has a vector but is in no list"},
    {{"SELECT id, list FROM ivf_assign WHERE target = ?1 AND metric = ?2 AND "
      "(list < 0 OR list >= ?3) ORDER BY id",
      "SELECT id, list FROM ivf_assign WHERE target = ?1 AND metric = ?2 AND "
      "(list < 0 OR list >= ?3) ORDER BY id"},
     "item %lld is in list %lld, outside the index's lists"},
};

/* Each IVF index: its centroids, and lists that hold exactly its set. */
static int check_ivf(check_ctx *c)
{
    sqlite3_stmt *st = NULL;
    int rc = CLIPDB_OK, s = SQLITE_DONE;
    if (sqlite3_prepare_v2(c->db->sql,
                           "SELECT target, metric, nlist, dim, centroids FROM ivf "
                           "ORDER BY target, metric", -1, &st, NULL) != SQLITE_OK)
        return read_failed(c, "the IVF indexes");
    while (rc == CLIPDB_OK && (s = sqlite3_step(st)) == SQLITE_ROW) {
        int64_t b[3];
        int target = sqlite3_column_int(st, 0), metric = sqlite3_column_int(st, 1);
        int64_t nlist = sqlite3_column_int64(st, 2), dim = sqlite3_column_int64(st, 3);
        const float *cent = sqlite3_column_blob(st, 4);
        size_t bytes = (size_t)sqlite3_column_bytes(st, 4), i, n, k;
        char prefix[96];
        c->r->indexes++;
        snprintf(prefix, sizeof prefix, "IVF index (%s, %s): ",
                 target == CLIPDB_ITEM_IMAGE ? "image" : target == CLIPDB_ITEM_TEXT ? "text" : "?",
                 clipdb_metric_name((clipdb_metric)metric));
        if (target != CLIPDB_ITEM_IMAGE && target != CLIPDB_ITEM_TEXT) {
            rc = add_problem(c, "index", -1, prefix, "unknown target %d", target);
            continue;
        }
        if (dim != c->db->embed_dim || nlist < 1 || nlist > CLIPDB_MAX_NLIST ||
            bytes != (size_t)nlist * (size_t)c->db->embed_dim * sizeof(float) || !cent) {
            rc = add_problem(c, "index", -1, prefix,
                             "its centroids (%lld lists of %lld floats, %zu bytes) do not fit "
                             "the database's dimension %d",
                             (long long)nlist, (long long)dim, bytes, c->db->embed_dim);
            continue;
        }
        n = (size_t)nlist * (size_t)dim;
        for (i = 0; i < n; i++) {
            float x;
            memcpy(&x, (const char *)cent + i * sizeof x, sizeof x);
            if (!isfinite(x)) break;
        }
        if (i < n && (rc = add_problem(c, "index", -1, prefix,
                                       "centroid %zu has a component that is not finite",
                                       i / (size_t)dim)) != CLIPDB_OK)
            break;
        b[0] = target;
        b[1] = metric;
        b[2] = nlist;
        for (k = 0; rc == CLIPDB_OK && k < sizeof ivf_rules / sizeof ivf_rules[0]; k++)
            rc = rule(c, "index", prefix, ivf_rules[k].sql[target == CLIPDB_ITEM_TEXT], b, 3,
                      ivf_rules[k].fmt);
    }
    if (rc == CLIPDB_OK && s != SQLITE_DONE) rc = read_failed(c, "the IVF indexes");
    sqlite3_finalize(st);
    if (rc == CLIPDB_OK)
        rc = rule_rows(c, "index", NULL,
                       "SELECT DISTINCT target, metric FROM ivf_assign a WHERE NOT EXISTS "
                       "(SELECT 1 FROM ivf i WHERE i.target = a.target AND i.metric = a.metric)",
                       NULL, 0, "IVF list rows of set %lld, metric %lld, without their index", 1);
    return rc;
}

/* Each stored Faiss index (format 2): its bytes against their SHA-256, its
** dimension, and no deleted item among the ids it holds unless marked stale
** (items added since it was built join it at search time). */
static int check_faiss(check_ctx *c)
{
    sqlite3_stmt *st = NULL;
    int rc = CLIPDB_OK, s = SQLITE_DONE;
    if (c->db->format_version < 2) return CLIPDB_OK;
    if (sqlite3_prepare_v2(c->db->sql,
                           "SELECT target, metric, factory, dim, sha256, blob FROM faiss "
                           "ORDER BY target, metric", -1, &st, NULL) != SQLITE_OK)
        return read_failed(c, "the Faiss indexes");
    while (rc == CLIPDB_OK && (s = sqlite3_step(st)) == SQLITE_ROW) {
        int target = sqlite3_column_int(st, 0);
        int64_t b[2];
        const char *sha = (const char *)sqlite3_column_text(st, 4);
        const void *blob = sqlite3_column_blob(st, 5);
        size_t bytes = (size_t)sqlite3_column_bytes(st, 5);
        char prefix[160], hex[65];
        c->r->indexes++;
        snprintf(prefix, sizeof prefix, "Faiss index \"%.60s\" (%s, %s): ",
                 sqlite3_column_text(st, 2) ? (const char *)sqlite3_column_text(st, 2) : "?",
                 target == CLIPDB_ITEM_IMAGE ? "image" : target == CLIPDB_ITEM_TEXT ? "text" : "?",
                 clipdb_metric_name((clipdb_metric)sqlite3_column_int(st, 1)));
        if (target != CLIPDB_ITEM_IMAGE && target != CLIPDB_ITEM_TEXT) {
            rc = add_problem(c, "index", -1, prefix, "unknown target %d", target);
            continue;
        }
        if (sqlite3_column_int64(st, 3) != c->db->embed_dim) {
            rc = add_problem(c, "index", -1, prefix, "dimension %lld, not the database's %d",
                             (long long)sqlite3_column_int64(st, 3), c->db->embed_dim);
            continue;
        }
        if ((rc = cdb_sha256_hex(blob ? blob : "", blob ? bytes : 0, hex, &c->db->err)) !=
            CLIPDB_OK)
            break;
        if (!sha || strcmp(sha, hex)) {
            rc = add_problem(c, "index", -1, prefix,
                             "its bytes do not match their recorded SHA-256 (damaged)");
            continue;
        }
        b[0] = target;
        b[1] = sqlite3_column_int(st, 1);
        rc = rule(c, "index", prefix,
                  target == CLIPDB_ITEM_IMAGE
                      ? "SELECT id FROM faiss_ids WHERE target = ?1 AND metric = ?2 AND stale = 0 "
                        "AND id NOT IN (SELECT id FROM vectors_image) ORDER BY id"
                      : "SELECT id FROM faiss_ids WHERE target = ?1 AND metric = ?2 AND stale = 0 "
                        "AND id NOT IN (SELECT id FROM vectors_text) ORDER BY id",
                  b, 2, "item %lld is held but has no vector and is not marked stale");
    }
    if (rc == CLIPDB_OK && s != SQLITE_DONE) rc = read_failed(c, "the Faiss indexes");
    sqlite3_finalize(st);
    return rc;
}

int clipdb_db_check(clipdb_db *db, int quick, clipdb_db_check_report *out)
{
    check_ctx c;
    size_t i;
    int rc;

    memset(out, 0, sizeof *out);
    cdb_err_clear(&db->err);
    c.db = db;
    c.r = out;
    c.cap = 0;
    if ((rc = check_sqlite(&c, quick)) != CLIPDB_OK) goto cleanup;
    if ((rc = count(&c, "SELECT count(*) FROM items", &out->items)) != CLIPDB_OK) goto cleanup;
    for (i = 0; i < sizeof rules / sizeof rules[0]; i++)
        if ((rc = rule(&c, rules[i].kind, NULL, rules[i].sql, NULL, 0, rules[i].fmt)) != CLIPDB_OK)
            goto cleanup;
    if ((rc = check_vectors(&c, CLIPDB_ITEM_IMAGE)) != CLIPDB_OK ||
        (rc = check_vectors(&c, CLIPDB_ITEM_TEXT)) != CLIPDB_OK ||
        (rc = check_high_water(&c)) != CLIPDB_OK || (rc = check_ivf(&c)) != CLIPDB_OK ||
        (rc = check_faiss(&c)) != CLIPDB_OK)
        goto cleanup;
cleanup:
    if (rc != CLIPDB_OK) clipdb_db_check_free(out);
    return rc;
}

void clipdb_db_check_free(clipdb_db_check_report *r)
{
    int i;
    if (!r) return;
    for (i = 0; r->problems && i < r->n_listed; i++) free(r->problems[i].message);
    free(r->problems);
    r->problems = NULL;
    r->n_listed = 0;
}
