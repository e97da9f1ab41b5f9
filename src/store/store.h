/*
** store.h: the database handle and the internal calls shared by the files
** of src/store (db.c: the file, schema and items; captions.c: captions
** parsers; ingest.c: the add pipeline; search.c: queries and IVF).
** Internal; the public view is the store section of include/clipdb.h.
**
** Schema (format version 1; PRAGMA application_id = CLIPDB_DB_MAGIC,
** PRAGMA user_version = CLIPDB_DB_VERSION):
**   meta(key, value)                         format, model identity/dir/shape
**   items(id, type, path, abspath, size, sha256, text, image, added_at)
**   item_meta(item, key, value)              metadata fields (typed values)
**   vectors_image(id, norm, vec), vectors_text(id, norm, vec)
**                                            one little-endian float32 BLOB
**                                            per vector, rowid = item id, so
**                                            loading is one sequential scan
**   ivf(target, metric, nlist, dim, seed, centroids)
**   ivf_assign(target, metric, id, list)
** Format version 2 adds:
**   faiss(target, metric, factory, dim, sha256, blob, built_at)
**                                            a Faiss index (write_index bytes)
**                                            and the SHA-256 of those bytes
**   faiss_ids(target, metric, id, stale)     the ids the blob holds; stale = 1
**                                            when the item was deleted or its
**                                            vector replaced since the build
*/
#ifndef CDB_STORE_H
#define CDB_STORE_H

#include <sqlite3.h>

#include "core/core.h"

/* The vectors of one item type, loaded into memory for search. */
typedef struct cdb_vecset {
    int loaded;
    int64_t data_version;  /* PRAGMA data_version when loaded */
    int64_t changes;       /* db->local_changes when loaded */
    size_t n;
    int64_t *ids;          /* n, ascending */
    float *vecs;           /* n x d */
    float *norms;          /* n */
} cdb_vecset;

struct clipdb_ivf;

struct clipdb_db {
    cdb_err err;
    sqlite3 *sql;
    char *path;
    int readonly;
    int format_version;    /* of the file (older ones are upgraded when
                           ** opened read-write) */
    int embed_dim;
    char *identity;        /* model identity recorded at creation */
    char *model_dir;       /* recorded model directory */
    char *model_dir_opt;   /* directory given at open (overrides) */
    clipdb_precision precision; /* encoder precision (meta "encoder_precision") */
    clipdb_model *model;   /* opened on first use, owned */
    clipdb_ctx *ctx;       /* the handle's encoding context, owned */
    int64_t local_changes; /* bumped by every write through this handle */
    cdb_vecset sets[3];    /* indexed by CLIPDB_ITEM_IMAGE / _TEXT */
    /* Loaded IVF indexes, [target][metric]; NULL when not loaded: full ones
    ** for search, and empty ones (centroids only) to assign new vectors. */
    struct clipdb_ivf *ivf[3][3];
    struct clipdb_ivf *ivf_assigner[3][3];
    int64_t ivf_changes[3][3];
    int64_t ivf_version[3][3];
    /* Stored Faiss indexes loaded for search (and brought up to date with
    ** the stored vectors), [target][metric]; NULL when not loaded. */
    struct cdb_faiss *faiss[3][3];
    int64_t faiss_changes[3][3];
    int64_t faiss_version[3][3];
    char *faiss_note[3][3];  /* what the last load had to do, or NULL */
    char *stats_factory[8];  /* strings of clipdb_db_get_stats */
};

/* Creates a database file bound to a model described by its identity and
** embedding size, without opening the model (tests and benchmarks use it;
** clipdb_db_open with create opens the model and calls it). */
int cdb_db_create_raw(clipdb_db **out, const char *path, const char *identity,
                      int embed_dim, const char *model_dir);

/* Runs SQL without results; the message goes to db->err. */
int cdb_db_exec(clipdb_db *db, const char *sql);
int cdb_db_prepare(clipdb_db *db, const char *sql, sqlite3_stmt **st);
/* Records an SQLite failure in db->err ("what: sqlite message"). */
int cdb_db_sqlerr(clipdb_db *db, const char *what);
int cdb_db_begin(clipdb_db *db);
int cdb_db_commit(clipdb_db *db);
void cdb_db_rollback(clipdb_db *db);

/* Inside a transaction: inserts an image item and its vector (embed_dim
** floats); *id gets the new id. */
int cdb_db_insert_image(clipdb_db *db, const char *path, const char *abspath,
                        int64_t size, const char *sha256, const float *vec,
                        int64_t *id);
/* Inside a transaction: the content of image `id` changed. */
int cdb_db_update_image(clipdb_db *db, int64_t id, int64_t size,
                        const char *sha256, const float *vec);
/* Inside a transaction: inserts a text item (a caption of image `image`, or
** standalone when image < 0) and its vector. */
int cdb_db_insert_text(clipdb_db *db, const char *text, int64_t image,
                       const float *vec, int64_t *id);
/* Inside a transaction: stores the fields of a JSON object (text of at most
** CLIPDB_MAX_TEXT_BYTES) as metadata of item `id`. */
int cdb_db_set_meta_json(clipdb_db *db, int64_t id, const char *json);

/* The vectors of one type, loaded (or reloaded when the file changed).
** The set belongs to db. */
int cdb_db_vectors(clipdb_db *db, int type, const cdb_vecset **out);

/* Lowercase hex SHA-256 (65 bytes with the NUL) of len bytes. */

/* IVF bookkeeping for a new vector (search.c): if an IVF index exists for
** this type, records the vector's nearest list in ivf_assign. */
int cdb_db_ivf_on_insert(clipdb_db *db, int type, int64_t id, const float *vec);
void cdb_db_ivf_release(clipdb_db *db);

/* Inside a transaction: item `id` was deleted or its vector replaced, so
** stored Faiss indexes must drop (and maybe re-add) it at the next search. */
int cdb_db_faiss_mark_stale(clipdb_db *db, int64_t id);

#endif /* CDB_STORE_H */
