/*
** sql.c: the small SQLite helpers every file of src/store uses (errors on
** the handle, prepare, transactions), and the per-id rows shared by the
** stored index types. The bottom of src/store: it calls nothing above it.
*/
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "store/store.h"

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

static void bind_va(sqlite3_stmt *st, const char *types, va_list ap)
{
    int i;
    for (i = 0; types[i]; i++) {
        switch (types[i]) {
        case 'i': sqlite3_bind_int(st, i + 1, va_arg(ap, int)); break;
        case 'l': sqlite3_bind_int64(st, i + 1, va_arg(ap, int64_t)); break;
        case 'd': sqlite3_bind_double(st, i + 1, va_arg(ap, double)); break;
        case 't': sqlite3_bind_text(st, i + 1, va_arg(ap, const char *), -1, SQLITE_STATIC); break;
        default: sqlite3_bind_null(st, i + 1); /* not a type letter: nothing taken */
        }
    }
}

int cdb_db_prepare_bind(clipdb_db *db, const char *sql, sqlite3_stmt **st, const char *types,
                        ...)
{
    va_list ap;
    int rc = cdb_db_prepare(db, sql, st);
    if (rc != CLIPDB_OK) return rc;
    va_start(ap, types);
    bind_va(*st, types, ap);
    va_end(ap);
    return CLIPDB_OK;
}

int cdb_db_run(clipdb_db *db, const char *what, const char *sql, const char *types, ...)
{
    sqlite3_stmt *st = NULL;
    va_list ap;
    int rc = cdb_db_prepare(db, sql, &st);
    if (rc != CLIPDB_OK) return rc;
    va_start(ap, types);
    bind_va(st, types, ap);
    va_end(ap);
    if (sqlite3_step(st) != SQLITE_DONE) rc = cdb_db_sqlerr(db, what);
    sqlite3_finalize(st);
    return rc;
}

int cdb_db_begin(clipdb_db *db)
{
    return cdb_db_exec(db, "BEGIN IMMEDIATE");
}

int cdb_db_commit(clipdb_db *db)
{
    struct stat sb;
    int rc;
    if (db->file_ino &&
        (stat(db->path, &sb) != 0 || (unsigned long long)sb.st_ino != db->file_ino ||
         (unsigned long long)sb.st_dev != db->file_dev)) {
        sqlite3_exec(db->sql, "ROLLBACK", NULL, NULL, NULL);
        db->local_changes++;
        return cdb_err_set(&db->err, CLIPDB_EIO,
                           "%s: the database file was deleted or replaced while this command "
                           "wrote to it; this transaction was not committed",
                           db->path);
    }
    rc = cdb_db_exec(db, "COMMIT");
    db->local_changes++;
    return rc;
}

void cdb_db_note_file(clipdb_db *db)
{
    struct stat sb;
    if (stat(db->path, &sb) != 0) return;
    db->file_dev = (unsigned long long)sb.st_dev;
    db->file_ino = (unsigned long long)sb.st_ino;
}

void cdb_db_rollback(clipdb_db *db)
{
    if (!sqlite3_get_autocommit(db->sql)) sqlite3_exec(db->sql, "ROLLBACK", NULL, NULL, NULL);
    db->local_changes++;
}

int cdb_db_query_int(clipdb_db *db, const char *sql, int64_t *out)
{
    sqlite3_stmt *st = NULL;
    int rc = cdb_db_prepare(db, sql, &st);
    if (rc != CLIPDB_OK) return rc;
    if (sqlite3_step(st) == SQLITE_ROW) *out = sqlite3_column_int64(st, 0);
    else rc = cdb_db_sqlerr(db, sql);
    sqlite3_finalize(st);
    return rc;
}

/* *out = the number of items of `type` (captions only: those of an image). */
int cdb_db_count_items(clipdb_db *db, int type, int captions_only, int64_t *out)
{
    sqlite3_stmt *st = NULL;
    int rc = cdb_db_prepare(db,
                            captions_only
                                ? "SELECT count(*) FROM items WHERE type = ? AND image IS NOT NULL"
                                : "SELECT count(*) FROM items WHERE type = ?",
                            &st);
    if (rc != CLIPDB_OK) return rc;
    sqlite3_bind_int(st, 1, type);
    if (sqlite3_step(st) == SQLITE_ROW) *out = sqlite3_column_int64(st, 0);
    else rc = cdb_db_sqlerr(db, "counting items");
    sqlite3_finalize(st);
    return rc;
}

const char *cdb_set_name(int set)
{
    return set == CLIPDB_ITEM_TEXT ? "text" : "image";
}

int cdb_sindex_replace_ids(clipdb_db *db, const char *del_sql, const char *ins_sql, int set,
                           clipdb_metric metric, const int64_t *ids, const int32_t *lists,
                           size_t n)
{
    sqlite3_stmt *st = NULL;
    size_t i;
    int rc = cdb_db_prepare(db, del_sql, &st);
    if (rc != CLIPDB_OK) return rc;
    sqlite3_bind_int(st, 1, set);
    sqlite3_bind_int(st, 2, (int)metric);
    if (sqlite3_step(st) != SQLITE_DONE) rc = cdb_db_sqlerr(db, "replacing an index");
    sqlite3_finalize(st);
    if (rc != CLIPDB_OK || (rc = cdb_db_prepare(db, ins_sql, &st)) != CLIPDB_OK) return rc;
    for (i = 0; i < n && rc == CLIPDB_OK; i++) {
        sqlite3_reset(st);
        sqlite3_bind_int(st, 1, set);
        sqlite3_bind_int(st, 2, (int)metric);
        sqlite3_bind_int64(st, 3, ids[i]);
        if (lists) sqlite3_bind_int(st, 4, lists[i]);
        if (sqlite3_step(st) != SQLITE_DONE) rc = cdb_db_sqlerr(db, "writing an index");
    }
    sqlite3_finalize(st);
    return rc;
}
