/*
** sindex.h: the stored-index type. An index over one vector set of a
** database (today a database holds one set per item type: the image
** vectors and the text vectors) for one metric. Each kind of index is one
** implementation of cdb_sindex_type, a struct of function pointers as
** sqlite3_module or Faiss's Index:
**   sindex_exact.c   exact search (nothing stored, nothing to load)
**   sindex_ivf.c     clipdb's IVF-Flat (centroids + list of every vector)
**   sindex_faiss.c   a Faiss index_factory index (its bytes + the ids held)
** sindex.c keeps the loaded indexes of a handle (an array of cdb_sindex
** slots, one per (type, vector set, metric)) and is the one hook db.c
** calls when a vector is written or deleted. Calls run one way:
**   search.c -> sindex.c -> sindex_*.c -> sql.c (store.h) and src/index
**   db.c     -> sindex.c (the write hook, releasing on close, the
**               listing of the stored indexes for clipdb_db_get_stats, and
**               the types' tables at create and upgrade)
** Internal; the public view is clipdb_db_search / clipdb_db_build_* .
*/
#ifndef CDB_SINDEX_H
#define CDB_SINDEX_H

#include <string.h>

#include "store/store.h"

typedef struct cdb_sindex_type cdb_sindex_type;
struct cdb_index_list;

/* One loaded index of a handle: a cache slot. */
typedef struct cdb_sindex {
    const cdb_sindex_type *type;
    int set;               /* the vector set it serves (CLIPDB_ITEM_*) */
    clipdb_metric metric;
    void *impl;            /* the type's state (owned; NULL until used) */
    int loaded;            /* impl reflects the vectors of (changes, version) */
    int64_t changes;       /* cdb_vecset.changes when loaded */
    int64_t data_version;  /* cdb_vecset.data_version when loaded */
    char *note;            /* what the last load had to do, or NULL */
} cdb_sindex;

/* A write to the stored vectors, told to every index type. */
typedef enum cdb_write_op {
    CDB_WRITE_INSERT = 1,  /* a new vector (id, vec) in set */
    CDB_WRITE_REPLACE = 2, /* the vector of id changed to vec */
    CDB_WRITE_DELETE = 3   /* item id and its vector are gone (set unknown: 0) */
} cdb_write_op;

typedef struct cdb_write {
    cdb_write_op op;
    int set;
    int64_t id;
    const float *vec;      /* embed_dim floats; NULL for DELETE */
} cdb_write;

/* Searches of one call, as the types see them. */
typedef struct cdb_search_call {
    const cdb_vecset *vs;  /* the stored vectors of the set */
    const float *q;        /* nq x embed_dim query vectors */
    size_t nq;
    int k;
    const clipdb_search_options *opt;
    const int64_t *allowed;/* sorted ids passing the filters, or NULL: all */
    size_t n_allowed;
    const char **compressed; /* exact: set to the copy's kind when it scanned
                             ** a compressed copy (may be NULL) */
    const char **scan_isa;   /* and its kernel path (may be NULL) */
} cdb_search_call;

/* Errors go to db->err with the callee's status code kept. Any member but
** name, kind, search, invalidate and release may be NULL (nothing to do). */
struct cdb_sindex_type {
    const char *name;           /* "exact", "ivf", "faiss" */
    clipdb_index_kind kind;
    /* Inside a transaction of a read-write handle: creates the tables this
    ** type stores its indexes in, those that are absent (CREATE ... IF NOT
    ** EXISTS), so that a new file and an upgraded older one both have them.
    ** The type owns its tables: no other file names them. */
    int (*ensure_tables)(clipdb_db *db);
    /* Checks the search options this type cannot serve (EINVAL). */
    int (*validate)(clipdb_db *db, const clipdb_search_options *opt);
    /* Builds an index in memory over every vector of vs into s->impl:
    ** opt (nlist, seed) for IVF, spec (an index_factory string) for Faiss. */
    int (*build)(clipdb_db *db, cdb_sindex *s, const cdb_vecset *vs,
                 const clipdb_index_options *opt, const char *spec);
    /* Inside a transaction: writes the index built in s to the database,
    ** replacing the stored one of (s->set, s->metric). */
    int (*store)(clipdb_db *db, cdb_sindex *s, const cdb_vecset *vs);
    /* Loads the stored index of (s->set, s->metric) into s->impl, up to
    ** date with vs; CLIPDB_ENOTFOUND when none is stored. */
    int (*load)(clipdb_db *db, cdb_sindex *s, const cdb_vecset *vs);
    /* Answers the queries of c with s (loaded or built). out (nq x k);
    ** *n_out: results per query (missing ones have id -1). */
    int (*search)(clipdb_db *db, cdb_sindex *s, const cdb_search_call *c, clipdb_hit *out,
                  int *n_out);
    /* The metrics for which an index of this type is stored for set (at
    ** most 3 into metrics[]), so that on_insert can be told. */
    int (*stored_metrics)(clipdb_db *db, int set, clipdb_metric metrics[3], int *n);
    /* Inside a transaction: vector (id, vec) joined s->set. */
    int (*on_insert)(clipdb_db *db, cdb_sindex *s, int64_t id, const float *vec);
    /* Inside a transaction: item id was deleted or its vector replaced. */
    int (*on_delete)(clipdb_db *db, int64_t id);
    /* Drops what reflects the stored vectors (kept: what a write needs). */
    void (*invalidate)(cdb_sindex *s);
    /* Frees s->impl and everything in it. */
    void (*release)(cdb_sindex *s);
    /* Appends one entry per index of this type stored in the database to
    ** l (cdb_sindex_list_push), in (set, metric) order. */
    int (*list_stored)(clipdb_db *db, struct cdb_index_list *l);
};

/* The stored indexes as clipdb_db_get_stats lists them: l->out->indexes
** grows as entries are pushed (capacity l->cap). */
typedef struct cdb_index_list {
    clipdb_db_stats *out;
    size_t cap;
} cdb_index_list;

/* Appends a zeroed entry to l; *x points at it. Inline here, so that the
** types calling it do not call back into sindex.c. */
static inline int cdb_sindex_list_push(clipdb_db *db, cdb_index_list *l,
                                       clipdb_db_index_info **x)
{
    clipdb_db_stats *out = l->out;
    if (cdb_grow((void **)&out->indexes, &l->cap, (size_t)out->n_indexes + 1, sizeof *out->indexes))
        return cdb_err_set(&db->err, CLIPDB_ENOMEM, "out of memory");
    *x = &out->indexes[out->n_indexes++];
    memset(*x, 0, sizeof **x);
    return CLIPDB_OK;
}

/* db.c, inside its transaction: every type's ensure_tables (at create, and
** when an older file is upgraded). A read-only handle never creates tables:
** CLIPDB_EINVAL. */
int cdb_sindex_ensure_tables(clipdb_db *db);

/* Lists every stored index of every type into out->indexes / n_indexes
** (IVF, then Faiss); on failure the entries already listed stay for the
** caller to free with clipdb_db_stats_free. */
int cdb_sindex_list_stored(clipdb_db *db, clipdb_db_stats *out);

extern const cdb_sindex_type cdb_sindex_exact;
extern const cdb_sindex_type cdb_sindex_ivf;
extern const cdb_sindex_type cdb_sindex_faiss;

/* The type serving index kind `kind`, or NULL. */
const cdb_sindex_type *cdb_sindex_type_of(clipdb_index_kind kind);

/* The one write hook (db.c): tells every index type about w. */
int cdb_sindex_on_write(clipdb_db *db, const cdb_write *w);

/* The slot of (type, set, metric) on db, created empty if absent. The
** pointer is valid until the next call that creates a slot. */
int cdb_sindex_slot(clipdb_db *db, const cdb_sindex_type *type, int set, clipdb_metric metric,
                    cdb_sindex **out);

/* The loaded index of (type, set, metric), (re)loaded when vs changed. */
int cdb_sindex_get(clipdb_db *db, const cdb_sindex_type *type, int set, clipdb_metric metric,
                   const cdb_vecset *vs, cdb_sindex **out);

/* Forgets the loaded index of (type, set, metric): after a rebuild. */
void cdb_sindex_forget(clipdb_db *db, const cdb_sindex_type *type, int set, clipdb_metric metric);

/* Frees every slot of db (clipdb_db_close). */
void cdb_sindex_release_all(clipdb_db *db);

#endif /* CDB_SINDEX_H */
