/*
** compressed.c: the compressed copies (sq8, bf16, fp16; src/index/cvecs.c)
** a database keeps of its vector sets for exact search.
**
** Stored: one row per (vector set, target) in table `compressed`, made by
** the first copy (a file without the table has no copies, and opens and
** searches as before, read-only included): the kind, the dimension and, for
** sq8, the per-dimension ranges (vmin[d] then step[d], little-endian floats
** as the vectors) fixed when the copy was made.
**
** Not stored: the codes. They are a pure function of the fp32 vectors and
** the stored ranges, and a search needs the fp32 vectors loaded anyway (the
** re-rank reads them), so the codes are rebuilt next to the loaded vectors
** (cdb_vecset.cv) when a search first needs them, and again whenever the
** vectors reload (any add, rm or reembed, here or in another process).
** Hence a write has nothing to update here: a vector added later is
** quantised with the stored ranges at the next load (values outside clamp,
** and the fp32 re-rank keeps results exact); a deleted one is simply not
** loaded. Storing the codes instead (a BLOB per vector, 512 B at d = 512)
** would add a quarter of the fp32 bytes to the file and a second write per
** vector, which an older clipdb writing the same file would not make, so the
** copy could go stale; the ranges cannot (measured rebuild cost at load:
** bench/README.md). clipdb_db_set_compressed (search.c, beside the other
** index builds) makes and drops copies through cdb_compressed_store/_drop.
*/
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "index/index.h"
#include "store/store.h"

#define CV_TABLE                                                                     \
    "CREATE TABLE IF NOT EXISTS compressed(space TEXT NOT NULL, target INTEGER NOT " \
    "NULL, kind INTEGER NOT NULL, dim INTEGER NOT NULL, ranges BLOB, created_at "   \
    "INTEGER NOT NULL, PRIMARY KEY(space, target))"

static int table_present(clipdb_db *db, int *yes)
{
    int64_t n = 0;
    int rc = cdb_db_query_int(
        db, "SELECT count(*) FROM sqlite_master WHERE type = 'table' AND name = 'compressed'", &n);
    *yes = n > 0;
    return rc;
}

static int is_base(const char *space)
{
    return !space || !strcmp(space, CLIPDB_VECTOR_SET_BASE);
}

/* The stored row of (space, target): *kind NONE when there is none; sq8:
** *ranges (2 d floats, caller frees). Checked against dimension d. */
static int read_row(clipdb_db *db, const char *space, int target, int d, clipdb_compress *kind,
                    float **ranges)
{
    sqlite3_stmt *st = NULL;
    int rc, present = 0, s;
    *kind = CLIPDB_COMPRESS_NONE;
    *ranges = NULL;
    if ((rc = table_present(db, &present)) != CLIPDB_OK || !present) return rc;
    rc = cdb_db_prepare(db, "SELECT kind, dim, ranges FROM compressed WHERE space = ? AND target = ?",
                        &st);
    if (rc != CLIPDB_OK) return rc;
    sqlite3_bind_text(st, 1, space, -1, SQLITE_STATIC);
    sqlite3_bind_int(st, 2, target);
    s = sqlite3_step(st);
    if (s == SQLITE_ROW) {
        int k = sqlite3_column_int(st, 0), dim = sqlite3_column_int(st, 1);
        size_t want = 2 * (size_t)(d > 0 ? d : 0) * sizeof(float);
        const void *blob = sqlite3_column_blob(st, 2);
        if (k < CLIPDB_COMPRESS_SQ8 || k > CLIPDB_COMPRESS_FP16 || dim != d ||
            (k == CLIPDB_COMPRESS_SQ8 && (!blob || (size_t)sqlite3_column_bytes(st, 2) != want))) {
            rc = cdb_err_set(&db->err, CLIPDB_EFORMAT,
                             "%s: corrupt compressed copy of the %s vectors of set '%s' (kind %d, "
                             "dimension %d for %d)",
                             db->path, cdb_set_name(target), space, k, dim, d);
        } else if (k == CLIPDB_COMPRESS_SQ8 && !(*ranges = malloc(want))) {
            rc = cdb_err_set(&db->err, CLIPDB_ENOMEM, "out of memory");
        } else {
            if (*ranges) memcpy(*ranges, blob, want);
            *kind = (clipdb_compress)k;
        }
    } else if (s != SQLITE_DONE) {
        rc = cdb_db_sqlerr(db, "reading the compressed copies");
    }
    sqlite3_finalize(st);
    return rc;
}

int cdb_compressed_get(clipdb_db *db, const char *space, int target, const cdb_vecset *vs,
                       struct clipdb_cvecs **out)
{
    /* the handle's own cache entry, beside the vectors it was built from */
    cdb_vecset *m = (cdb_vecset *)vs;
    clipdb_compress kind;
    clipdb_vecs base = {vs->vecs, vs->ids, vs->norms, vs->n, vs->d};
    float *ranges = NULL;
    char *msg = NULL;
    int rc;

    *out = NULL;
    if (m->cv_known) {
        *out = m->cv;
        return CLIPDB_OK;
    }
    if (is_base(space)) space = CLIPDB_VECTOR_SET_BASE;
    if ((rc = read_row(db, space, target, vs->d, &kind, &ranges)) != CLIPDB_OK) return rc;
    if (kind != CLIPDB_COMPRESS_NONE) {
        // fp32 vectors (n, d) + stored ranges -> codes (n, d)
        rc = clipdb_cvecs_build(&base, kind, ranges, &m->cv, &msg);
        if (rc != CLIPDB_OK) {
            rc = cdb_err_set(&db->err, rc == CLIPDB_ENOMEM ? CLIPDB_ENOMEM : CLIPDB_EFORMAT,
                             "%s: compressed copy of the %s vectors of set '%s': %s", db->path,
                             cdb_set_name(target), space, msg ? msg : "failed");
            goto cleanup;
        }
    }
    m->cv_known = 1;
    *out = m->cv;
cleanup:
    free(ranges);
    free(msg);
    return rc;
}

void cdb_compressed_forget(const cdb_vecset *vs)
{
    cdb_vecset *m = (cdb_vecset *)vs;
    clipdb_cvecs_free(m->cv);
    m->cv = NULL;
    m->cv_known = 0;
}

int cdb_compressed_store(clipdb_db *db, const char *space, int target, const clipdb_cvecs *c)
{
    sqlite3_stmt *st = NULL;
    const float *ranges = clipdb_cvecs_ranges(c);
    int rc;
    if ((rc = cdb_db_exec(db, CV_TABLE)) != CLIPDB_OK) return rc;
    rc = cdb_db_prepare(db,
                        "INSERT OR REPLACE INTO compressed(space, target, kind, dim, ranges, "
                        "created_at) VALUES(?, ?, ?, ?, ?, ?)",
                        &st);
    if (rc != CLIPDB_OK) return rc;
    sqlite3_bind_text(st, 1, space, -1, SQLITE_STATIC);
    sqlite3_bind_int(st, 2, target);
    sqlite3_bind_int(st, 3, (int)clipdb_cvecs_kind(c));
    sqlite3_bind_int(st, 4, cdb_cvecs_dim(c));
    if (ranges)
        sqlite3_bind_blob(st, 5, ranges, (int)(2 * (size_t)cdb_cvecs_dim(c) * sizeof(float)),
                          SQLITE_STATIC);
    else
        sqlite3_bind_null(st, 5);
    sqlite3_bind_int64(st, 6, (sqlite3_int64)time(NULL));
    if (sqlite3_step(st) != SQLITE_DONE) rc = cdb_db_sqlerr(db, "writing a compressed copy");
    sqlite3_finalize(st);
    return rc;
}

int cdb_compressed_drop(clipdb_db *db, const char *space, int target, int *dropped)
{
    sqlite3_stmt *st = NULL;
    int rc, present = 0;
    *dropped = 0;
    if ((rc = table_present(db, &present)) != CLIPDB_OK || !present) return rc;
    rc = cdb_db_prepare(db, "DELETE FROM compressed WHERE space = ? AND target = ?", &st);
    if (rc != CLIPDB_OK) return rc;
    sqlite3_bind_text(st, 1, space, -1, SQLITE_STATIC);
    sqlite3_bind_int(st, 2, target);
    if (sqlite3_step(st) != SQLITE_DONE) rc = cdb_db_sqlerr(db, "dropping a compressed copy");
    else *dropped = sqlite3_changes(db->sql) > 0;
    sqlite3_finalize(st);
    return rc;
}

int cdb_compressed_list(clipdb_db *db, clipdb_db_stats *out)
{
    sqlite3_stmt *st = NULL;
    size_t cap = 0;
    int rc, present = 0, s;
    if ((rc = table_present(db, &present)) != CLIPDB_OK || !present) return rc;
    rc = cdb_db_prepare(db, "SELECT space, target, kind, dim FROM compressed ORDER BY space, target",
                        &st);
    if (rc != CLIPDB_OK) return rc;
    while ((s = sqlite3_step(st)) == SQLITE_ROW) {
        clipdb_db_compressed_info *x;
        const char *sp = (const char *)sqlite3_column_text(st, 0);
        if (cdb_grow((void **)&out->compressed, &cap, (size_t)out->n_compressed + 1,
                     sizeof *out->compressed)) {
            rc = cdb_err_set(&db->err, CLIPDB_ENOMEM, "out of memory");
            break;
        }
        x = &out->compressed[out->n_compressed];
        memset(x, 0, sizeof *x);
        if (!(x->space = cdb_strdup(sp ? sp : ""))) {
            rc = cdb_err_set(&db->err, CLIPDB_ENOMEM, "out of memory");
            break;
        }
        out->n_compressed++;
        x->target = sqlite3_column_int(st, 1);
        x->kind = clipdb_compress_name((clipdb_compress)sqlite3_column_int(st, 2));
        x->dim = sqlite3_column_int(st, 3);
    }
    if (rc == CLIPDB_OK && s != SQLITE_DONE) rc = cdb_db_sqlerr(db, "listing the compressed copies");
    sqlite3_finalize(st);
    return rc;
}
