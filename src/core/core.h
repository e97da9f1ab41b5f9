/*
** core.h: errors, checked sizes, files: small utilities shared by every
** module. Internal; not part of the public API.
*/
#ifndef CDB_CORE_H
#define CDB_CORE_H

#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

#include "clipdb.h"

#define CDB_ERRMSG_MAX 512

/* An error slot, embedded in every handle. code is a CLIPDB_* status. */
typedef struct cdb_err {
    int code;
    char msg[CDB_ERRMSG_MAX];
} cdb_err;

/* Records (code, printf-style message) in e and returns code, so that
** error paths read: rc = cdb_err_set(e, CLIPDB_EFORMAT, "...", ...); goto cleanup;
** e may be NULL. */
int cdb_err_set(cdb_err *e, int code, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));
void cdb_err_clear(cdb_err *e);
/* Prefixes the message already in e with "prefix: ". */
void cdb_err_prefix(cdb_err *e, const char *fmt, ...)
    __attribute__((format(printf, 2, 3)));

/* Checked size arithmetic: return 1 and write the result if it fits, else 0. */
static inline int cdb_mul_ok(size_t a, size_t b, size_t *out)
{
    return !__builtin_mul_overflow(a, b, out);
}
static inline int cdb_add_ok(size_t a, size_t b, size_t *out)
{
    return !__builtin_add_overflow(a, b, out);
}
/* malloc(n * size) with the product checked; NULL on overflow or OOM. */
void *cdb_malloc_array(size_t n, size_t size);
void *cdb_calloc_array(size_t n, size_t size);
/* strdup that returns NULL on OOM; accepts NULL. */
char *cdb_strdup(const char *s);
/* asprintf-like; caller frees. NULL on OOM. */
char *cdb_sprintf(const char *fmt, ...) __attribute__((format(printf, 1, 2)));

/* Opens path read-only as *fd_out (caller closes) and fills *st, refusing
** anything but a regular file (a FIFO, a device, a directory) without
** blocking on it: CLIPDB_EIO names the path and what it is. */
struct stat;
int cdb_open_regular(const char *path, int *fd_out, struct stat *st, cdb_err *e);

/* Reads a whole file of at most max_bytes. *out (caller frees with free) gets
** a NUL after the last byte, not counted in *len. */
int cdb_read_file(const char *path, size_t max_bytes, char **out, size_t *len,
                  cdb_err *e);

/* A read-only memory map of a whole file. */
typedef struct cdb_map {
    const uint8_t *data;
    size_t size;
} cdb_map;
int cdb_map_file(const char *path, cdb_map *m, cdb_err *e);
void cdb_unmap(cdb_map *m);

/* Monotonic clock, seconds. */
double cdb_now(void);

/* Joins dir and name with '/'. Caller frees. NULL on OOM. */
char *cdb_path_join(const char *dir, const char *name);
int cdb_file_exists(const char *path);
/* mkdir -p dir (mode 0777 before the umask). CLIPDB_EIO names the part that
** could not be made, or dir when it exists but is not a directory. */
int cdb_make_dirs(const char *dir, cdb_err *e);

/* Lower-case hex of n bytes into out (2n + 1 chars, NUL-terminated). */
void cdb_hex(const uint8_t *bytes, size_t n, char *out);
/* SHA-256 of len bytes as 64 lower-case hex digits + NUL. */
int cdb_sha256_hex(const void *data, size_t len, char hex[65], cdb_err *e);

/* The one growable array: makes *buf (elements of `size` bytes, capacity
** *cap elements) hold at least `need` elements, doubling from 16; the
** product is overflow-checked. 0 on success; -1 on overflow or OOM, with
** *buf and *cap untouched (the caller still frees *buf). */
int cdb_grow(void **buf, size_t *cap, size_t need, size_t size);
/* The one scratch buffer: makes *buf (capacity *cap elements of `size`
** bytes) hold at least n elements, WITHOUT keeping its contents and without
** doubling (a new block of exactly n elements, never of 0 bytes, replaces a
** smaller one): for buffers rewritten on every use (activations, decode and
** tokenizer scratch), where cdb_grow's copy and spare room would be waste.
** 0 on success; -1 on overflow or OOM, with *buf and *cap untouched. */
int cdb_reserve(void **buf, size_t *cap, size_t n, size_t size);

/* Euclidean norm of x (d), accumulated in double: the one norm used for
** stored vectors and queries alike. */
float cdb_norm(const float *x, size_t d);

/* The byte offset in text[0, len) of the first JSON escape of a NUL
** (backslash u0000), or -1. cJSON decodes it into
** a C string that then ends there, so a name, token or caption would be
** silently cut: the parsers of outside JSON refuse it. Escaped backslashes
** are skipped, so a backslash escape followed by "u0000" is no NUL. */
long cdb_json_nul_escape(const char *text, size_t len);

/* ---- the worker pool (pool.c) ---------------------------------------- */
/* One persistent pool of threads per process, sized to the machine (one
** worker per online CPU but one; the caller is the last), at most
** CDB_POOL_MAX_THREADS in all. */
#define CDB_POOL_MAX_THREADS 64
typedef void (*cdb_pool_fn)(void *arg, size_t task);
/* Runs fn(arg, i) for every i in [0, n) and returns when all are done; the
** calling thread runs tasks too. Tasks of one call may run in parallel (fn
** must let them); calls from several threads are safe (while one runs, the
** others run their tasks on their own thread). */
void cdb_pool_run(size_t n, cdb_pool_fn fn, void *arg);
/* Threads a job can use: the workers and the caller (starts the pool). */
int cdb_pool_threads(void);

#endif /* CDB_CORE_H */
