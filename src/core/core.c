/*
** core.c: error slots, checked allocation, file reading and mapping.
*/
#include "core/core.h"

#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include <math.h>
#include <openssl/evp.h>

const char *clipdb_status_name(int rc)
{
    switch (rc) {
    case CLIPDB_OK: return "CLIPDB_OK";
    case CLIPDB_ERROR: return "CLIPDB_ERROR";
    case CLIPDB_ENOMEM: return "CLIPDB_ENOMEM";
    case CLIPDB_EIO: return "CLIPDB_EIO";
    case CLIPDB_EFORMAT: return "CLIPDB_EFORMAT";
    case CLIPDB_EINVAL: return "CLIPDB_EINVAL";
    case CLIPDB_ENOTFOUND: return "CLIPDB_ENOTFOUND";
    case CLIPDB_ELIMIT: return "CLIPDB_ELIMIT";
    case CLIPDB_EMISMATCH: return "CLIPDB_EMISMATCH";
    case CLIPDB_ENET: return "CLIPDB_ENET";
    case CLIPDB_ESTOPPED: return "CLIPDB_ESTOPPED";
    default: return "CLIPDB_UNKNOWN";
    }
}

void clipdb_free(void *p)
{
    free(p);
}

int cdb_err_set(cdb_err *e, int code, const char *fmt, ...)
{
    if (e) {
        va_list ap;
        va_start(ap, fmt);
        vsnprintf(e->msg, sizeof e->msg, fmt, ap);
        va_end(ap);
        e->code = code;
    }
    return code;
}

void cdb_err_clear(cdb_err *e)
{
    if (e) {
        e->code = CLIPDB_OK;
        e->msg[0] = '\0';
    }
}

void cdb_err_prefix(cdb_err *e, const char *fmt, ...)
{
    char buf[2 * CDB_ERRMSG_MAX + 4];
    size_t n;
    va_list ap;
    if (!e) return;
    va_start(ap, fmt);
    vsnprintf(buf, CDB_ERRMSG_MAX, fmt, ap);
    va_end(ap);
    n = strlen(buf);
    memcpy(buf + n, ": ", 2);
    memcpy(buf + n + 2, e->msg, strnlen(e->msg, CDB_ERRMSG_MAX - 1) + 1);
    buf[n + 2 + strnlen(e->msg, CDB_ERRMSG_MAX - 1)] = '\0';
    memcpy(e->msg, buf, CDB_ERRMSG_MAX - 1);
    e->msg[CDB_ERRMSG_MAX - 1] = '\0';
}

void *cdb_malloc_array(size_t n, size_t size)
{
    size_t total;
    if (!cdb_mul_ok(n, size, &total)) return NULL;
    return malloc(total ? total : 1);
}

void *cdb_calloc_array(size_t n, size_t size)
{
    size_t total;
    if (!cdb_mul_ok(n, size, &total)) return NULL;
    return calloc(n ? n : 1, size ? size : 1);
}

char *cdb_strdup(const char *s)
{
    size_t n;
    char *p;
    if (!s) return NULL;
    n = strlen(s) + 1;
    p = malloc(n);
    if (p) memcpy(p, s, n);
    return p;
}

char *cdb_sprintf(const char *fmt, ...)
{
    va_list ap;
    int n;
    char *p;
    va_start(ap, fmt);
    n = vsnprintf(NULL, 0, fmt, ap);
    va_end(ap);
    if (n < 0) return NULL;
    p = malloc((size_t)n + 1);
    if (!p) return NULL;
    va_start(ap, fmt);
    vsnprintf(p, (size_t)n + 1, fmt, ap);
    va_end(ap);
    return p;
}

int cdb_open_regular(const char *path, int *fd_out, struct stat *st, cdb_err *e)
{
    int rc = CLIPDB_OK;
    int fd, flags;

    *fd_out = -1;
    /* O_NONBLOCK: opening a FIFO for reading would otherwise wait for a
    ** writer forever; the type is checked on the descriptor (no race with
    ** a rename between a stat and the open), then the flag is cleared. */
    fd = open(path, O_RDONLY | O_NONBLOCK | O_CLOEXEC);
    if (fd < 0) {
        rc = cdb_err_set(e, errno == ENOENT ? CLIPDB_ENOTFOUND : CLIPDB_EIO,
                         "%s: %s", path, strerror(errno));
        goto cleanup;
    }
    if (fstat(fd, st) != 0) {
        rc = cdb_err_set(e, CLIPDB_EIO, "%s: %s", path, strerror(errno));
        goto cleanup;
    }
    if (!S_ISREG(st->st_mode)) {
        rc = cdb_err_set(e, CLIPDB_EIO, "%s: not a regular file (%s)", path,
                         S_ISDIR(st->st_mode) ? "a directory" : S_ISFIFO(st->st_mode) ? "a FIFO"
                         : S_ISCHR(st->st_mode) || S_ISBLK(st->st_mode) ? "a device"
                         : S_ISSOCK(st->st_mode) ? "a socket" : "not a plain file");
        goto cleanup;
    }
    flags = fcntl(fd, F_GETFL);
    if (flags < 0 || fcntl(fd, F_SETFL, flags & ~O_NONBLOCK) != 0) {
        rc = cdb_err_set(e, CLIPDB_EIO, "%s: %s", path, strerror(errno));
        goto cleanup;
    }
    *fd_out = fd;
    fd = -1;
cleanup:
    if (fd >= 0) close(fd);
    return rc;
}

int cdb_read_file(const char *path, size_t max_bytes, char **out, size_t *len,
                  cdb_err *e)
{
    int rc = CLIPDB_OK;
    int fd = -1;
    FILE *f = NULL;
    char *buf = NULL;
    struct stat st;
    size_t size, got;

    *out = NULL;
    *len = 0;
    if ((rc = cdb_open_regular(path, &fd, &st, e)) != CLIPDB_OK) goto cleanup;
    f = fdopen(fd, "rb");
    if (!f) {
        rc = cdb_err_set(e, CLIPDB_EIO, "%s: %s", path, strerror(errno));
        goto cleanup;
    }
    fd = -1;
    if ((uint64_t)st.st_size > max_bytes) {
        rc = cdb_err_set(e, CLIPDB_ELIMIT, "%s: file of %lld bytes exceeds the limit of %zu",
                         path, (long long)st.st_size, max_bytes);
        goto cleanup;
    }
    size = (size_t)st.st_size;
    buf = malloc(size + 1);
    if (!buf) {
        rc = cdb_err_set(e, CLIPDB_ENOMEM, "%s: out of memory", path);
        goto cleanup;
    }
    got = fread(buf, 1, size, f);
    if (got != size || ferror(f)) {
        rc = cdb_err_set(e, CLIPDB_EIO, "%s: short read", path);
        goto cleanup;
    }
    buf[size] = '\0';
    *out = buf;
    *len = size;
    buf = NULL;
cleanup:
    free(buf);
    if (f) fclose(f);
    if (fd >= 0) close(fd);
    return rc;
}

int cdb_map_file(const char *path, cdb_map *m, cdb_err *e)
{
    int rc = CLIPDB_OK;
    int fd = -1;
    struct stat st;
    void *p;

    m->data = NULL;
    m->size = 0;
    if ((rc = cdb_open_regular(path, &fd, &st, e)) != CLIPDB_OK) goto cleanup;
    if (st.st_size == 0) {
        rc = cdb_err_set(e, CLIPDB_EFORMAT, "%s: empty file", path);
        goto cleanup;
    }
    p = mmap(NULL, (size_t)st.st_size, PROT_READ, MAP_PRIVATE, fd, 0);
    if (p == MAP_FAILED) {
        rc = cdb_err_set(e, CLIPDB_EIO, "%s: mmap: %s", path, strerror(errno));
        goto cleanup;
    }
    m->data = p;
    m->size = (size_t)st.st_size;
cleanup:
    if (fd >= 0) close(fd);
    return rc;
}

void cdb_unmap(cdb_map *m)
{
    if (m && m->data) munmap((void *)m->data, m->size);
    if (m) {
        m->data = NULL;
        m->size = 0;
    }
}

double cdb_now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

char *cdb_path_join(const char *dir, const char *name)
{
    size_t n = strlen(dir);
    if (n > 0 && dir[n - 1] == '/') return cdb_sprintf("%s%s", dir, name);
    return cdb_sprintf("%s/%s", dir, name);
}

int cdb_file_exists(const char *path)
{
    struct stat st;
    return stat(path, &st) == 0 && S_ISREG(st.st_mode);
}

/* ---- hashing, growable arrays, norms ---------------------------------------- */

void cdb_hex(const uint8_t *bytes, size_t n, char *out)
{
    static const char digits[] = "0123456789abcdef";
    size_t i;
    for (i = 0; i < n; i++) {
        out[2 * i] = digits[bytes[i] >> 4];
        out[2 * i + 1] = digits[bytes[i] & 15];
    }
    out[2 * n] = '\0';
}

int cdb_sha256_hex(const void *data, size_t len, char hex[65], cdb_err *e)
{
    unsigned char md[EVP_MAX_MD_SIZE];
    unsigned int n = 0;
    if (!EVP_Digest(data, len, md, &n, EVP_sha256(), NULL) || n != 32)
        return cdb_err_set(e, CLIPDB_ERROR, "SHA-256 failed");
    cdb_hex(md, 32, hex);
    return CLIPDB_OK;
}

int cdb_grow(void **buf, size_t *cap, size_t need, size_t size)
{
    size_t ncap = *cap ? *cap : 16, bytes;
    void *p;
    if (need <= *cap) return 0;
    while (ncap < need) {
        if (!cdb_mul_ok(ncap, 2, &ncap)) return -1;
    }
    if (!cdb_mul_ok(ncap, size, &bytes)) return -1;
    p = realloc(*buf, bytes);
    if (!p) return -1;
    *buf = p;
    *cap = ncap;
    return 0;
}

int cdb_reserve(void **buf, size_t *cap, size_t n, size_t size)
{
    size_t bytes;
    void *p;
    if (*buf && n <= *cap) return 0;
    if (!cdb_mul_ok(n, size, &bytes)) return -1;
    p = malloc(bytes ? bytes : 1);
    if (!p) return -1;
    free(*buf);
    *buf = p;
    *cap = n;
    return 0;
}

float cdb_norm(const float *x, size_t d)
{
    double s = 0.0;
    size_t i;
    for (i = 0; i < d; i++) s += (double)x[i] * x[i];
    return (float)sqrt(s);
}

long cdb_json_nul_escape(const char *text, size_t len)
{
    size_t i;
    for (i = 0; i + 1 < len; i++) {
        if (text[i] != '\\') continue;
        if (text[i + 1] == 'u' && i + 5 < len && !memcmp(text + i + 2, "0000", 4))
            return (long)i;
        i++; /* the escaped character: "\\" is one backslash */
    }
    return -1;
}

int cdb_make_dirs(const char *dir, cdb_err *e)
{
    int rc = CLIPDB_OK;
    char *p = cdb_strdup(dir), *s;
    struct stat st;
    if (!p) return cdb_err_set(e, CLIPDB_ENOMEM, "out of memory");
    for (s = p + 1;; s++) {
        if (*s != '/' && *s != '\0') continue;
        char c = *s;
        *s = '\0';
        if (mkdir(p, 0777) != 0 && errno != EEXIST) {
            rc = cdb_err_set(e, CLIPDB_EIO, "mkdir %s: %s", p, strerror(errno));
            goto cleanup;
        }
        *s = c;
        if (c == '\0') break;
    }
    if (stat(dir, &st) != 0 || !S_ISDIR(st.st_mode))
        rc = cdb_err_set(e, CLIPDB_EIO, "%s: not a directory", dir);
cleanup:
    free(p);
    return rc;
}
