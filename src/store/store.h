/*
** store.h: the database handle and the internal calls shared by the files
** of src/store (sql.c: SQLite helpers; db.c: the file, schema and items;
** sindex*.c: the stored-index type and its implementations, see sindex.h;
** captions.c: captions parsers; ingest.c: the add pipeline; search.c: the
** query pipeline and the index-building entry points).
** Internal; the public view is the store section of include/clipdb.h.
**
** Schema (format version 1; PRAGMA application_id = CLIPDB_DB_MAGIC,
** PRAGMA user_version = CLIPDB_DB_VERSION):
**   meta(key, value)                         format, model identity/dir/shape,
**                                            tokenizer_digest (absent in files
**                                            made before it was recorded)
**   items(id, type, path, abspath, size, sha256, text, image, added_at)
**   item_meta(item, key, value)              metadata fields (typed values)
**   vectors_image(id, norm, vec), vectors_text(id, norm, vec)
**                                            one little-endian float32 BLOB
**                                            per vector, rowid = item id, so
**                                            loading is one sequential scan
**   ivf(target, metric, nlist, dim, seed, centroids)   (made by sindex_ivf.c)
**   ivf_assign(target, metric, id, list)
** Format version 2 adds (made by sindex_faiss.c; each stored-index type
** creates its own tables, see cdb_sindex_ensure_tables):
**   faiss(target, metric, factory, dim, sha256, blob, built_at)
**                                            a Faiss index (write_index bytes)
**                                            and the SHA-256 of those bytes
**   faiss_ids(target, metric, id, stale)     the ids the blob holds; stale = 1
**                                            when the item was deleted or its
**                                            vector replaced since the build
** Format version 3 adds (vsets.c; made by the first clipdb_db_reembed, so a
** file without named sets stays at 2 and older clipdbs still open it):
**   vector_sets(id, name, model_dir, model_identity, precision, dim,
**               created_at)            the named vector sets
**   set_vectors(set_id, type, id, norm, vec)
**                                            their vectors, one row per
**                                            (set, item type, item)
*/
#ifndef CDB_STORE_H
#define CDB_STORE_H

#include <sqlite3.h>

#include "core/core.h"

/* Number of entries of clipdb_db.sets, indexed by the set (the item type,
** CLIPDB_ITEM_IMAGE = 1 or CLIPDB_ITEM_TEXT = 2; 0 unused). Item types go
** into SQL as bound values, never as literals. */
#define CDB_N_SETS 3

/* A vector set: the vectors a stored index serves and a search scans,
** loaded into memory. Today a database holds one set per item type (the
** image vectors and the text vectors, set = CLIPDB_ITEM_IMAGE / _TEXT);
** the stored-index slots (sindex.h) are keyed by set so that more sets per
** database (other models, other fields) need no new kind of cache. */
typedef struct cdb_vecset {
    int loaded;
    int64_t data_version;  /* PRAGMA data_version when loaded */
    int64_t changes;       /* db->local_changes when loaded */
    size_t n;
    int64_t *ids;          /* n, ascending */
    float *vecs;           /* n x d */
    float *norms;          /* n */
    int d;                 /* dimension of the vectors */
    /* its compressed copy (compressed.c), rebuilt with these vectors */
    struct clipdb_cvecs *cv; /* NULL: none stored (when cv_known) */
    int cv_known;          /* the stored row was read since the load */
} cdb_vecset;

/* A named vector set (vsets.c), as cached on a handle: its row of
** vector_sets, its loaded vectors by item type, and its model (opened when a
** query must be encoded). */
typedef struct cdb_vset {
    int64_t sid;           /* vector_sets.id */
    char *name, *model_dir, *identity;
    clipdb_precision precision;
    int dim;
    cdb_vecset vs[CDB_N_SETS]; /* by item type, as clipdb_db.sets */
    clipdb_model *model;   /* owned; NULL until used */
    clipdb_ctx *ctx;       /* owned */
} cdb_vset;

struct cdb_sindex;

/* The format version of a file without named vector sets (what create
** writes and what an older file is upgraded to at a read-write open); the
** first set made (vsets.c) takes it to CLIPDB_DB_VERSION. */
#define CDB_DB_VERSION_PLAIN 2


struct clipdb_db {
    cdb_err err;
    sqlite3 *sql;
    char *path;
    int readonly;
    /* the file as opened: a commit checks the path still names it (a file
    ** deleted or replaced meanwhile would take every commit with it) */
    unsigned long long file_dev, file_ino;
    int format_version;    /* of the file (older ones are upgraded when
                           ** opened read-write) */
    int embed_dim;
    char *identity;        /* model identity recorded at creation */
    char *tok_digest;      /* tokenizer digest recorded at creation (meta
                           ** "tokenizer_digest"), or NULL: a database made
                           ** before it was recorded (db.c, record_tokenizer) */
    char *model_dir;       /* recorded model directory */
    char *model_dir_opt;   /* directory given at open (overrides) */
    clipdb_precision precision; /* encoder precision (meta "encoder_precision") */
    clipdb_model *model;   /* opened on first use; owned unless model_shared */
    clipdb_model *model_opt;  /* given at open (borrowed), or NULL */
    int model_shared;      /* model is model_opt: not closed with the handle */
    clipdb_ctx *ctx;       /* the handle's encoding context, owned */
    unsigned long long max_image_pixels; /* clipdb_db_options; set on every
                           ** ctx the handle makes (0: the default) */
    int64_t local_changes; /* bumped by every write through this handle */
    cdb_vecset sets[CDB_N_SETS]; /* the vector sets, by item type */
    cdb_vset **vsets;      /* named sets looked up so far (vsets.c) */
    size_t n_vsets, cap_vsets;
    /* Loaded indexes (sindex.c): one slot per (type, set, metric). */
    struct cdb_sindex *sindex;
    size_t n_sindex, cap_sindex;
};

/* Creates a database file bound to a model described by its identity and
** embedding size, without opening the model (tests and benchmarks use it;
** clipdb_db_open with create opens the model and calls it). */
int cdb_db_create_raw(clipdb_db **out, const char *path, const char *identity,
                      int embed_dim, const char *model_dir);

/* Runs SQL without results; the message goes to db->err. */
int cdb_db_exec(clipdb_db *db, const char *sql);
int cdb_db_prepare(clipdb_db *db, const char *sql, sqlite3_stmt **st);
/* Prepares sql and binds its parameters ?1, ?2, ... to the arguments after
** `types`, one per letter: 'i' an int, 'l' an int64_t, 'd' a double, 't' a
** const char * (bound without a copy: it must outlive the statement's use;
** NULL binds NULL). The types are not checked by the compiler: pass exactly
** these C types. On failure *st is NULL and db->err says why. */
int cdb_db_prepare_bind(clipdb_db *db, const char *sql, sqlite3_stmt **st, const char *types,
                        ...);
/* Prepares and binds as cdb_db_prepare_bind, then runs a statement that
** returns no row (an INSERT, UPDATE or DELETE); `what` names it in the
** error message. */
int cdb_db_run(clipdb_db *db, const char *what, const char *sql, const char *types, ...);
/* Records an SQLite failure in db->err ("what: sqlite message"). */
int cdb_db_sqlerr(clipdb_db *db, const char *what);
int cdb_db_begin(clipdb_db *db);
/* Records the device and inode the path names now (after opening). */
void cdb_db_note_file(clipdb_db *db);
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

/* Why a stored vector (d floats) with its stored norm is unusable (a
** non-finite value, a norm that is not the vector's), or NULL when sound
** (vsets.c). */
const char *cdb_vector_damage(const float *v, int d, double norm);
/* The vectors of one type, loaded (or reloaded when the file changed).
** The set belongs to db. A damaged vector is CLIPDB_EFORMAT naming the item. */
int cdb_db_vectors(clipdb_db *db, int type, const cdb_vecset **out);

/* Loads into s (cleared first) the vectors of item type `type` (d floats
** each): of the base set when sid < 0, else of the named set sid. Reloads
** only when the file changed since (s->loaded, data_version, changes).
** (vsets.c) */
int cdb_vecset_load(clipdb_db *db, cdb_vecset *s, int64_t sid, int type, int d);
void cdb_vecset_clear(cdb_vecset *s);
/* Runs a one-row query returning an integer (sql.c). */
int cdb_db_query_int(clipdb_db *db, const char *sql, int64_t *out);
/* *out = the number of items of `type` (captions_only: texts that are
** captions of an image) (sql.c). */
int cdb_db_count_items(clipdb_db *db, int type, int captions_only, int64_t *out);

/* ---- named vector sets (vsets.c) ---- */

/* 1 when the file has the tables of named sets (format version 3). */
int cdb_vsets_present(clipdb_db *db);
/* The named set `name` (not base): CLIPDB_ENOTFOUND, with the sets the
** database has, when absent. *out belongs to db (until it is closed). */
int cdb_vset_find(clipdb_db *db, const char *name, cdb_vset **out);
/* The vectors of type `type` of set v, loaded. */
int cdb_vset_vectors(clipdb_db *db, cdb_vset *v, int type, const cdb_vecset **out);
/* v's model and encoding context, opened on first use: the model_dir given
** at open when no model was (it must be v's model), else v's recorded one. */
int cdb_vset_ctx(clipdb_db *db, cdb_vset *v, clipdb_ctx **ctx);
/* Inside a transaction: deletes item id's vectors from every named set
** (nothing when the file has no sets). */
int cdb_vsets_forget_item(clipdb_db *db, int64_t id);
/* Appends the named sets to st->sets (clipdb_db_get_stats). */
int cdb_vsets_stats(clipdb_db *db, clipdb_db_stats *st, size_t *cap);
/* Frees the cached sets of db (clipdb_db_close). */
void cdb_vsets_release(clipdb_db *db);

/* "image" or "text" (sql.c). */
const char *cdb_set_name(int set);

/* ---- compressed copies (compressed.c) ---- */
/* The compressed copy of vs, the vectors of `target` in vector set `space`
** (NULL or base, or a named set), built at first use from its stored row;
** *out NULL when none is stored. The copy lives with vs (freed when vs
** reloads). */
int cdb_compressed_get(clipdb_db *db, const char *space, int target, const cdb_vecset *vs,
                       struct clipdb_cvecs **out);
/* Appends the stored copies to out->compressed (clipdb_db_get_stats). */
int cdb_compressed_list(clipdb_db *db, clipdb_db_stats *out);
/* Inside a transaction: stores the row of copy c (its kind, sq8 ranges) for
** (space, target), replacing an earlier one. */
int cdb_compressed_store(clipdb_db *db, const char *space, int target,
                         const struct clipdb_cvecs *c);
/* Inside a transaction: drops the row of (space, target); *dropped 0 if none. */
int cdb_compressed_drop(clipdb_db *db, const char *space, int target, int *dropped);
/* Frees the copy loaded beside vs (its stored row changed). */
void cdb_compressed_forget(const cdb_vecset *vs);

/* Inside a transaction: replaces the per-id rows of an index of (set,
** metric): runs del_sql (binding set, metric), then ins_sql for each of
** the n ids (binding set, metric, id, and lists[i] when lists is set). */
int cdb_sindex_replace_ids(clipdb_db *db, const char *del_sql, const char *ins_sql, int set,
                           clipdb_metric metric, const int64_t *ids, const int32_t *lists,
                           size_t n);


/* ---- export for evaluation (export.c) ------------------------------------ */

/* The ground truth of an evaluation split: the images matching every filter
** and the captions linked to them. */
typedef struct cdb_split {
    size_t n_images;
    int64_t *image_ids;      /* n_images, ascending */
    char **image_paths;      /* n_images absolute paths (or the path as given) */
    size_t n_captions;
    int64_t *caption_ids;    /* n_captions, ascending */
    int64_t *caption_image;  /* n_captions: the caption's image id (in the split) */
    char **caption_texts;    /* n_captions */
    /* captions matching every filter whose image does not (0 without filters) */
    size_t n_captions_outside;
} cdb_split;

/* Reads the split of `where` (n_where "FIELD=VALUE" filters on metadata,
** matched as clipdb_db_search does; none: every image). *out (free with
** cdb_split_free) is set on success. */
int cdb_db_split(clipdb_db *db, const char *const *where, int n_where, cdb_split **out);
void cdb_split_free(cdb_split *s);

/* The vector sets a database holds: base first, then the named ones by
** name. *names (n strings): caller frees with cdb_db_vector_sets_free. */
int cdb_db_vector_sets(clipdb_db *db, char ***names, int *n);
void cdb_db_vector_sets_free(char **names, int n);
/* The dimension of set `set`'s vectors and its model identity (belongs to
** db); CLIPDB_ENOTFOUND for an unknown set. */
int cdb_db_set_shape(clipdb_db *db, const char *set, int *dim, const char **model);

/* Copies the vectors of set `set` of the n items `ids` (all of type `type`)
** into out (n x the set's dim); an item without a vector is
** CLIPDB_ENOTFOUND. */
int cdb_db_set_vectors(clipdb_db *db, const char *set, int type, const int64_t *ids,
                       size_t n, float *out);

/* ---- image-caption pairs for training (pairs.c) ---- */

/* One image with its captions (text items linked to it), in id order. */
typedef struct cdb_pair_image {
    int64_t id;
    char *path;            /* the stored absolute path (or path) */
    char **captions;       /* n_captions */
    size_t n_captions, cap_captions;
} cdb_pair_image;

typedef struct cdb_pairs {
    cdb_pair_image *img;   /* n, by image id */
    size_t n;
    size_t n_captions;     /* total */
} cdb_pairs;

/* The images of `split` (item_meta split = value; NULL: every image) that
** have at least one caption, with their captions. *out (free with
** cdb_pairs_free) may hold n == 0. */
int cdb_db_pairs(clipdb_db *db, const char *split, cdb_pairs **out);
void cdb_pairs_free(cdb_pairs *p);
/* A description of the splits that hold captioned images, e.g.
** "'train2017' (800), 'val2017' (200)" ("" when none); caller frees. */
int cdb_db_split_counts(clipdb_db *db, char **out);

#endif /* CDB_STORE_H */
