/*
** sindex_faiss.c: a Faiss index (src/index/faiss_shim.cc) as a stored-index
** type. Stored as the bytes of faiss::write_index with their SHA-256 (table
** faiss, checked before Faiss's reader sees them) and the ids it holds
** (table faiss_ids, stale = 1 once an item is deleted or its vector
** replaced). A search loads it and brings it up to date: stale or gone ids
** leave it, stored vectors it lacks join it; an index type that cannot
** remove is rebuilt from its factory string, with a note.
**
** Every build (index_factory, train, add, write_index) runs in a forked
** child process (build_index below): a crash inside Faiss becomes an error
** of this process, never its end.
*/
#include <errno.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

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
    cdb_faiss *f;    /* the index searched (loaded, or read from blob) */
    char *factory;   /* its index_factory string */
    uint8_t *blob;   /* a build's write_index bytes, until stored or read */
    size_t len;
    char sha256[65]; /* of blob */
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
    free(v->blob);
    v->blob = NULL;
    v->len = 0;
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

/* ---- building in a child process ----------------------------------------
** The grammar above keeps away the strings Faiss is known to crash on, but
** it cannot vouch for every accepted string on every data set: parameters
** at the edges of n, d or a code's bits reach Faiss's train and add, where
** an exception is the polite failure and an abort, a division by zero or a
** wild pointer the rude one. So every build runs in a forked child:
**   child:  index_factory, train, add, write_index; then one reply on a
**           pipe (a build_reply, then the index bytes or the error
**           message) and _exit(0);
**   parent: reads the reply (bounded by what a database value holds),
**           reaps the child and turns a signal or a non-zero exit into
**           "Faiss crashed building 'X' (signal 11: ...); nothing was
**           stored". The bytes are checked (length, SHA-256, vector count,
**           dimension) before anything uses them. A build writes nothing to
**           the database, so a failed one leaves it unchanged.
** Searching stays in this process: what it searches is an index built this
** way and checked (by SHA-256 when read back from the database), whose
** parameters already went through train and add on these vectors, and a
** fork per query would cost more than the search. The child touches
** neither the SQLite handle nor its files (fcntl locks belong to a process,
** so the child's exit releases none of ours) and runs OpenMP with one
** thread (cdb_faiss_after_fork); BLAS keeps its threads.
**
** Test hook (in the manner of SQLite's fault-injection test controls): the
** environment variable CLIPDB_FAULT_FAISS_BUILD, read by the child only,
** after its train and add, makes it fail on purpose: "signal" raises
** SIGSEGV (default action, so it dies by the signal even under ASan),
** "exit" exits with status 3 without a reply, "short" sends half of the
** index bytes, "big" announces more bytes than the bound. Unset, or any
** other value: no effect. */
#define BUILD_MAGIC 0x46424443u /* "CDBF" */

typedef struct build_reply {
    uint32_t magic;
    int32_t rc;      /* CLIPDB_OK: len index bytes follow; else len message bytes */
    uint64_t len;
    int64_t ntotal;  /* vectors in the index */
    int32_t dim;
    char sha256[65]; /* of the index bytes */
} build_reply;

static int write_all(int fd, const void *p, size_t n)
{
    const char *c = p;
    while (n > 0) {
        ssize_t w = write(fd, c, n);
        if (w < 0 && errno == EINTR) continue;
        if (w <= 0) return -1;
        c += w;
        n -= (size_t)w;
    }
    return 0;
}

/* Reads n bytes, or fewer at the end of the pipe: the count, -1 on error. */
static ssize_t read_full(int fd, void *p, size_t n)
{
    size_t got = 0;
    while (got < n) {
        ssize_t r = read(fd, (char *)p + got, n - got);
        if (r < 0 && errno == EINTR) continue;
        if (r < 0) return -1;
        if (r == 0) break;
        got += (size_t)r;
    }
    return (ssize_t)got;
}

static int fault_is(const char *fault, const char *what)
{
    return fault && !strcmp(fault, what);
}

/* The child: builds, replies on fd, exits; never returns. */
static void build_child(int fd, const char *factory, int d, clipdb_metric metric,
                        const cdb_vecset *vs, uint64_t max_len)
{
    const char *fault = getenv("CLIPDB_FAULT_FAISS_BUILD");
    const char *msg = NULL;
    cdb_faiss *f = NULL;
    uint8_t *blob = NULL;
    size_t len = 0;
    build_reply r;
    cdb_err e;
    int rc, ok;

    /* only the reply pipe stays open: another thread's concurrent build
    ** would otherwise wait for its end of file until this child exits, and
    ** closing the database's files here releases no lock of the parent */
    if (fd > 3) close_range(3, (unsigned)fd - 1, 0);
    close_range((unsigned)fd + 1, ~0u, 0);
    cdb_faiss_after_fork();
    memset(&r, 0, sizeof r);
    memset(&e, 0, sizeof e);
    r.magic = BUILD_MAGIC;
    // vs (n, d) -> train (k-means, PCA, OPQ) -> add with ids -> write_index bytes
    if ((rc = cdb_faiss_new(&f, d, factory, metric)) == CLIPDB_OK &&
        (rc = cdb_faiss_train(f, vs->vecs, vs->n)) == CLIPDB_OK &&
        (rc = cdb_faiss_add(f, vs->ids, vs->vecs, vs->n)) == CLIPDB_OK) {
        if (fault_is(fault, "signal")) {
            signal(SIGSEGV, SIG_DFL);
            raise(SIGSEGV);
        }
        if (fault_is(fault, "exit")) _exit(3);
        rc = cdb_faiss_serialize(f, &blob, &len);
    }
    if (rc != CLIPDB_OK) {
        msg = cdb_faiss_errmsg(f);
    } else if ((rc = cdb_sha256_hex(blob, len, r.sha256, &e)) != CLIPDB_OK) {
        msg = e.msg;
    }
    if (rc != CLIPDB_OK) {
        r.rc = rc;
        r.len = strnlen(msg, CDB_ERRMSG_MAX - 1);
        ok = !write_all(fd, &r, sizeof r) && !write_all(fd, msg, (size_t)r.len);
    } else {
        r.len = len;
        r.ntotal = (int64_t)cdb_faiss_ntotal(f);
        r.dim = cdb_faiss_dim(f);
        if (fault_is(fault, "big")) r.len = max_len + 1;
        if (fault_is(fault, "short")) len /= 2;
        ok = !write_all(fd, &r, sizeof r) && !write_all(fd, blob, len);
    }
    _exit(ok ? 0 : 2); /* no atexit handlers, no stdio flush: the parent's state */
}

/* Builds a Faiss index from `factory` over every vector of vs in a child
** process (above). On success *blob (caller frees with free) holds its
** write_index bytes, *len of them, with their SHA-256 in sha256. */
static int build_index(clipdb_db *db, const char *factory, clipdb_metric metric,
                       const cdb_vecset *vs, uint8_t **blob, size_t *len, char sha256[65])
{
    uint64_t max_len = (uint64_t)sqlite3_limit(db->sql, SQLITE_LIMIT_LENGTH, -1);
    char msg[CDB_ERRMSG_MAX], hex[65], extra;
    const char *bad = NULL;
    int fds[2] = {-1, -1}, status = 0, killed = 0, rc = CLIPDB_OK;
    uint8_t *buf = NULL;
    build_reply r;
    pid_t pid;

    *blob = NULL;
    *len = 0;
    memset(&r, 0, sizeof r);
    if (pipe(fds))
        return cdb_err_set(&db->err, CLIPDB_EIO, "Faiss: no pipe for the build process: %s",
                           strerror(errno));
    if ((pid = fork()) < 0) {
        rc = cdb_err_set(&db->err, CLIPDB_ERROR, "Faiss: cannot start the build process: %s",
                         strerror(errno));
        goto cleanup;
    }
    if (pid == 0) {
        close(fds[0]);
        build_child(fds[1], factory, db->embed_dim, metric, vs, max_len);
    }
    close(fds[1]);
    fds[1] = -1;
    /* the reply: its header, then what it announces, then the end */
    if (read_full(fds[0], &r, sizeof r) != (ssize_t)sizeof r) {
        bad = "no complete reply";
    } else if (r.magic != BUILD_MAGIC || r.dim < 0 || r.sha256[64] != '\0') {
        bad = "a malformed reply";
        killed = 1;
    } else if (r.rc != CLIPDB_OK) {
        if (r.len >= sizeof msg) {
            bad = "an overlong error message";
            killed = 1;
        } else if (read_full(fds[0], msg, (size_t)r.len) != (ssize_t)r.len) {
            bad = "a cut error message";
        } else {
            msg[r.len] = '\0';
        }
    } else if (r.len == 0 || r.len > max_len || r.len > SIZE_MAX) {
        bad = "an index larger than a database value holds";
        killed = 1;
    } else if (!(buf = malloc((size_t)r.len))) {
        rc = cdb_err_set(&db->err, CLIPDB_ENOMEM, "out of memory");
        killed = 1;
    } else if (read_full(fds[0], buf, (size_t)r.len) != (ssize_t)r.len) {
        bad = "fewer index bytes than it announced";
    }
    if (!bad && rc == CLIPDB_OK && read_full(fds[0], &extra, 1) != 0) {
        bad = "more bytes than it announced";
        killed = 1;
    }
    if (killed) kill(pid, SIGKILL); /* it may be blocked writing to us */
    close(fds[0]);
    fds[0] = -1;
    while (waitpid(pid, &status, 0) < 0) {
        if (errno != EINTR) {
            if (rc == CLIPDB_OK)
                rc = cdb_err_set(&db->err, CLIPDB_ERROR,
                                 "Faiss: no status of the build process of '%s': %s", factory,
                                 strerror(errno));
            goto cleanup;
        }
    }
    if (rc != CLIPDB_OK) goto cleanup;
    if (!killed && WIFSIGNALED(status)) {
        rc = cdb_err_set(&db->err, CLIPDB_ERROR,
                         "Faiss crashed building '%s' (signal %d: %s); nothing was stored",
                         factory, WTERMSIG(status), strsignal(WTERMSIG(status)));
    } else if (!killed && (!WIFEXITED(status) || WEXITSTATUS(status) != 0)) {
        rc = cdb_err_set(&db->err, CLIPDB_ERROR,
                         "Faiss failed building '%s' (its process exited with status %d); "
                         "nothing was stored",
                         factory, WIFEXITED(status) ? WEXITSTATUS(status) : -1);
    } else if (bad) {
        rc = cdb_err_set(&db->err, CLIPDB_ERROR,
                         "Faiss building '%s': the build process sent %s; nothing was stored",
                         factory, bad);
    } else if (r.rc != CLIPDB_OK) {
        rc = cdb_err_set(&db->err, r.rc > 0 && r.rc <= CLIPDB_ESTOPPED ? r.rc : CLIPDB_ERROR,
                         "Faiss: %s", msg);
    } else if (r.ntotal != (int64_t)vs->n || r.dim != db->embed_dim ||
               (rc = cdb_sha256_hex(buf, (size_t)r.len, hex, &db->err)) != CLIPDB_OK ||
               strcmp(hex, r.sha256)) {
        if (rc == CLIPDB_OK)
            rc = cdb_err_set(&db->err, CLIPDB_ERROR,
                             "Faiss building '%s': the index built holds %lld vectors of "
                             "dimension %d, or bytes other than it announced (expected %zu of "
                             "dimension %d); nothing was stored",
                             factory, (long long)r.ntotal, (int)r.dim, vs->n, db->embed_dim);
    } else {
        *blob = buf;
        *len = (size_t)r.len;
        memcpy(sha256, hex, sizeof hex);
        buf = NULL;
    }
cleanup:
    if (fds[0] >= 0) close(fds[0]);
    if (fds[1] >= 0) close(fds[1]);
    free(buf);
    return rc;
}

/* *out: the index in bytes b (n of them) from build_index, checked to have
** the database's dimension. Free with cdb_faiss_free. */
static int read_built(clipdb_db *db, const char *factory, const uint8_t *b, size_t n,
                      clipdb_metric metric, cdb_faiss **out)
{
    int rc = cdb_faiss_deserialize(out, b, n, metric);
    if (rc == CLIPDB_OK && cdb_faiss_dim(*out) == db->embed_dim) return CLIPDB_OK;
    rc = cdb_err_set(&db->err, rc == CLIPDB_OK ? CLIPDB_EFORMAT : rc,
                     "Faiss: reading the index built from '%s': %s", factory,
                     rc == CLIPDB_OK ? "wrong dimension" : cdb_faiss_errmsg(*out));
    cdb_faiss_free(*out);
    *out = NULL;
    return rc;
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
    return build_index(db, spec, s->metric, vs, &v->blob, &v->len, v->sha256);
}

static int faiss_store(clipdb_db *db, cdb_sindex *s, const cdb_vecset *vs)
{
    faiss_state *v = s->impl;
    sqlite3_stmt *st = NULL;
    int rc;
    if (!v || !v->blob) return cdb_err_set(&db->err, CLIPDB_EINVAL, "Faiss: nothing built to store");
    if (db->format_version < 2)
        return cdb_err_set(&db->err, CLIPDB_EINVAL,
                           "%s: format version %d holds no Faiss indexes", db->path,
                           db->format_version);
    if (v->len > (size_t)INT32_MAX)
        return cdb_err_set(&db->err, CLIPDB_ELIMIT,
                           "%s: the Faiss index is %zu bytes, more than a database value holds",
                           db->path, v->len);
    rc = cdb_db_prepare(db,
                        "INSERT OR REPLACE INTO faiss(target, metric, factory, dim, sha256, blob, "
                        "built_at) VALUES(?, ?, ?, ?, ?, ?, strftime('%s','now'))",
                        &st);
    if (rc != CLIPDB_OK) goto cleanup;
    sqlite3_bind_int(st, 1, s->set);
    sqlite3_bind_int(st, 2, (int)s->metric);
    sqlite3_bind_text(st, 3, v->factory, -1, SQLITE_STATIC);
    sqlite3_bind_int(st, 4, db->embed_dim);
    sqlite3_bind_text(st, 5, v->sha256, -1, SQLITE_STATIC);
    sqlite3_bind_blob(st, 6, v->blob, (int)v->len, SQLITE_STATIC);
    if (sqlite3_step(st) != SQLITE_DONE) {
        rc = cdb_db_sqlerr(db, "writing the Faiss index");
        goto cleanup;
    }
    rc = cdb_sindex_replace_ids(db, "DELETE FROM faiss_ids WHERE target = ? AND metric = ?",
                                "INSERT INTO faiss_ids(target, metric, id) VALUES(?, ?, ?)",
                                s->set, s->metric, vs->ids, NULL, vs->n);
cleanup:
    sqlite3_finalize(st);
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
    char *factory = NULL, hex[65];
    uint8_t *blob = NULL;
    size_t blen = 0;
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
        if ((rc = build_index(db, factory, s->metric, vs, &blob, &blen, hex)) != CLIPDB_OK ||
            (rc = read_built(db, factory, blob, blen, s->metric, &g)) != CLIPDB_OK)
            goto cleanup;
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
    free(blob);
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
    if (v && !v->f && v->blob &&
        (rc = read_built(db, v->factory, v->blob, v->len, s->metric, &v->f)) != CLIPDB_OK)
        return rc;
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
