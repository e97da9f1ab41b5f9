/*
** writer.c: the safetensors writer and the model-directory writer (see
** writer.h). The file layout is the one safetensors.c reads: 8-byte
** little-endian header length, a JSON header padded with spaces to a
** multiple of 8, then the tensors' bytes in header order.
*/
#include <cjson/cJSON.h>
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "model/writer.h"

#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "writer.c writes little-endian safetensors data from memory: little-endian hosts only"
#endif

/* Bytes converted per write() call. */
#define WRITE_CHUNK ((size_t)1 << 16)

uint16_t cdb_f32_to_f16(float f)
{
    uint32_t x, sign, exp, man;
    memcpy(&x, &f, sizeof x);
    sign = (x >> 16) & 0x8000u;
    exp = (x >> 23) & 0xffu;
    man = x & 0x7fffffu;
    if (exp == 0xff) return (uint16_t)(sign | 0x7c00u | (man ? 0x200u | (man >> 13) : 0));
    if (exp > 142) return (uint16_t)(sign | 0x7c00u); /* >= 2^16: overflow to inf */
    if (exp >= 113) {                                 /* normal half */
        uint32_t h = ((exp - 112) << 10) | (man >> 13), rest = man & 0x1fffu;
        if (rest > 0x1000u || (rest == 0x1000u && (h & 1u))) h++; /* may carry into inf */
        return (uint16_t)(sign | h);
    }
    if (exp >= 102) { /* subnormal half: value = m * 2^-24 */
        uint32_t m = man | 0x800000u, shift = 126 - exp, h = m >> shift;
        uint32_t rest = m & ((1u << shift) - 1), half = 1u << (shift - 1);
        if (rest > half || (rest == half && (h & 1u))) h++;
        return (uint16_t)(sign | h);
    }
    return (uint16_t)sign; /* underflows to zero */
}

static size_t itemsize_of(int dtype)
{
    return dtype == CDB_DT_F32 ? 4 : 2;
}

static const char *dtype_name(int dtype)
{
    return dtype == CDB_DT_F32 ? "F32" : dtype == CDB_DT_F16 ? "F16" : "BF16";
}

static size_t numel_of(const cdb_wtensor *t)
{
    size_t n = 1;
    int i;
    for (i = 0; i < t->ndim; i++) n *= (size_t)t->shape[i];
    return n;
}

/* Element i (in file order) of an fp32 tensor. */
static float elem(const cdb_wtensor *t, size_t i)
{
    int p;
    if (t->transpose) {
        size_t r = i / (size_t)t->shape[1], c = i % (size_t)t->shape[1];
        // file (r, c) = source (c, r); source is (shape[1], shape[0])
        return t->part[0][c * (size_t)t->shape[0] + r];
    }
    for (p = 0; p < t->n_parts; p++) {
        if (i < t->part_n[p]) return t->part[p][i];
        i -= t->part_n[p];
    }
    return NAN; /* not reached: parts cover numel */
}

/* Refuses a tensor with a value that is not finite (or not finite in dtype). */
static int check_finite(const cdb_wtensor *t, int dtype, cdb_err *e)
{
    size_t i, n = numel_of(t);
    for (i = 0; i < n; i++) {
        float v = elem(t, i);
        if (!isfinite(v))
            return cdb_err_set(e, CLIPDB_EFORMAT,
                               "tensor '%s' holds %s at element %zu; refusing to write it",
                               t->name, isnan(v) ? "NaN" : "an infinity", i);
        if (dtype == CDB_DT_F16 && (cdb_f32_to_f16(v) & 0x7c00u) == 0x7c00u)
            return cdb_err_set(e, CLIPDB_EFORMAT,
                               "tensor '%s': element %zu (%g) overflows F16; write F32 or BF16",
                               t->name, i, (double)v);
    }
    return CLIPDB_OK;
}

static int write_all(int fd, const void *buf, size_t n, const char *path, cdb_err *e)
{
    const uint8_t *p = buf;
    while (n) {
        ssize_t w = write(fd, p, n);
        if (w < 0 && errno == EINTR) continue;
        if (w <= 0)
            return cdb_err_set(e, CLIPDB_EIO, "cannot write %s: %s", path,
                               w < 0 ? strerror(errno) : "no space written");
        p += w;
        n -= (size_t)w;
    }
    return CLIPDB_OK;
}

static int write_tensor(int fd, const cdb_wtensor *t, int dtype, uint8_t *buf, const char *path,
                        cdb_err *e)
{
    size_t n, i, at = 0, isz = itemsize_of(dtype);
    int rc;
    if (t->raw) return write_all(fd, t->raw, t->raw_bytes, path, e);
    n = numel_of(t);
    for (i = 0; i < n; i++) {
        float v = elem(t, i);
        if (dtype == CDB_DT_F32) {
            memcpy(buf + at, &v, 4);
        } else {
            uint16_t h = dtype == CDB_DT_F16 ? cdb_f32_to_f16(v) : cdb_f32_to_bf16(v);
            buf[at] = (uint8_t)h;
            buf[at + 1] = (uint8_t)(h >> 8);
        }
        at += isz;
        if (at == WRITE_CHUNK || i + 1 == n) {
            if ((rc = write_all(fd, buf, at, path, e))) return rc;
            at = 0;
        }
    }
    return CLIPDB_OK;
}

int cdb_fsync_parent(const char *path)
{
    char *dir = cdb_strdup(path), *slash;
    int fd, rc;
    if (!dir) return -1;
    slash = strrchr(dir, '/');
    if (!slash) {
        free(dir);
        dir = cdb_strdup(".");
        if (!dir) return -1;
    } else if (slash == dir) {
        slash[1] = '\0';
    } else {
        *slash = '\0';
    }
    fd = open(dir, O_RDONLY | O_DIRECTORY);
    free(dir);
    if (fd < 0) return -1;
    rc = fsync(fd);
    close(fd);
    return rc;
}

/* The header JSON, padded with spaces to a multiple of 8; caller frees. */
static char *build_header(const cdb_wtensor *t, size_t n, int dtype, const char *const *mk,
                          const char *const *mv, int n_meta, size_t *hlen, cdb_err *e)
{
    cJSON *root = cJSON_CreateObject(), *meta = NULL;
    char *text = NULL, *out = NULL;
    size_t i, off = 0, len;
    int j, ok = root != NULL;

    if (ok) ok = (meta = cJSON_AddObjectToObject(root, "__metadata__")) != NULL &&
                 cJSON_AddStringToObject(meta, "format", "pt") != NULL;
    for (j = 0; ok && j < n_meta; j++) ok = cJSON_AddStringToObject(meta, mk[j], mv[j]) != NULL;
    for (i = 0; ok && i < n; i++) {
        cJSON *o = cJSON_AddObjectToObject(root, t[i].name), *shape, *offs;
        size_t bytes = t[i].raw ? t[i].raw_bytes : numel_of(&t[i]) * itemsize_of(dtype);
        int d;
        ok = o && cJSON_AddStringToObject(o, "dtype", t[i].raw ? t[i].raw_dtype
                                                              : dtype_name(dtype)) &&
             (shape = cJSON_AddArrayToObject(o, "shape")) &&
             (offs = cJSON_AddArrayToObject(o, "data_offsets"));
        for (d = 0; ok && d < t[i].ndim; d++)
            ok = cJSON_AddItemToArray(shape, cJSON_CreateNumber((double)t[i].shape[d]));
        ok = ok && cJSON_AddItemToArray(offs, cJSON_CreateNumber((double)off)) &&
             cJSON_AddItemToArray(offs, cJSON_CreateNumber((double)(off + bytes)));
        off += bytes;
    }
    if (ok) ok = (text = cJSON_PrintUnformatted(root)) != NULL;
    if (ok) {
        len = strlen(text);
        *hlen = (len + 7) & ~(size_t)7;
        ok = (out = malloc(*hlen + 1)) != NULL;
        if (ok) {
            memcpy(out, text, len);
            memset(out + len, ' ', *hlen - len);
            out[*hlen] = '\0';
        }
    }
    if (!ok) cdb_err_set(e, CLIPDB_ENOMEM, "out of memory building a safetensors header");
    free(text);
    cJSON_Delete(root);
    return out;
}

int cdb_st_write(const char *path, const cdb_wtensor *t, size_t n, int dtype,
                 const char *const *meta_keys, const char *const *meta_vals, int n_meta,
                 cdb_err *e)
{
    int rc = CLIPDB_OK, fd = -1, i;
    char *header = NULL, *tmp = NULL;
    uint8_t *buf = NULL, len8[8];
    size_t hlen = 0, k;

    if (dtype != CDB_DT_F32 && dtype != CDB_DT_F16 && dtype != CDB_DT_BF16)
        return cdb_err_set(e, CLIPDB_EINVAL, "cannot write dtype %d (F32, F16 or BF16)", dtype);
    for (k = 0; k < n; k++)
        if (!t[k].raw && (rc = check_finite(&t[k], dtype, e))) return rc;
    if (!(header = build_header(t, n, dtype, meta_keys, meta_vals, n_meta, &hlen, e)))
        return CLIPDB_ENOMEM;
    tmp = cdb_sprintf("%s.tmp.%ld", path, (long)getpid());
    buf = malloc(WRITE_CHUNK);
    if (!tmp || !buf) {
        rc = cdb_err_set(e, CLIPDB_ENOMEM, "out of memory");
        goto cleanup;
    }
    fd = open(tmp, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
    if (fd < 0) {
        rc = cdb_err_set(e, CLIPDB_EIO, "cannot create %s: %s", tmp, strerror(errno));
        goto cleanup;
    }
    for (i = 0; i < 8; i++) len8[i] = (uint8_t)((uint64_t)hlen >> (8 * i));
    if ((rc = write_all(fd, len8, 8, tmp, e)) || (rc = write_all(fd, header, hlen, tmp, e)))
        goto cleanup;
    for (k = 0; k < n; k++)
        if ((rc = write_tensor(fd, &t[k], dtype, buf, tmp, e))) goto cleanup;
    if (fsync(fd) != 0) {
        rc = cdb_err_set(e, CLIPDB_EIO, "cannot write %s: fsync: %s", tmp, strerror(errno));
        goto cleanup;
    }
    i = close(fd);
    fd = -1;
    if (i != 0) {
        rc = cdb_err_set(e, CLIPDB_EIO, "cannot write %s: close: %s", tmp, strerror(errno));
        goto cleanup;
    }
    if (rename(tmp, path) != 0) {
        rc = cdb_err_set(e, CLIPDB_EIO, "cannot rename %s to %s: %s", tmp, path,
                         strerror(errno));
        goto cleanup;
    }
    cdb_fsync_parent(path);
cleanup:
    if (fd >= 0) close(fd);
    if (rc != CLIPDB_OK && tmp) unlink(tmp);
    free(tmp);
    free(buf);
    free(header);
    return rc;
}

/* ---- model directories -------------------------------------------------------- */

static const char *const tokenizer_files[] = {
    "bpe_simple_vocab_16e6.txt.gz", "vocab.json", "merges.txt", "tokenizer.json",
    "tokenizer_config.json", "special_tokens_map.json",
};

/* Copies src to dst (a new file), fsync'ed. */
static int copy_file(const char *src, const char *dst, cdb_err *e)
{
    int in = -1, out = -1, rc = CLIPDB_OK;
    uint8_t buf[1 << 15];
    ssize_t r;
    in = open(src, O_RDONLY | O_CLOEXEC);
    if (in < 0) return cdb_err_set(e, CLIPDB_EIO, "cannot read %s: %s", src, strerror(errno));
    out = open(dst, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0644);
    if (out < 0) {
        rc = cdb_err_set(e, CLIPDB_EIO, "cannot create %s: %s", dst, strerror(errno));
        goto cleanup;
    }
    while ((r = read(in, buf, sizeof buf)) != 0) {
        if (r < 0 && errno == EINTR) continue;
        if (r < 0) {
            rc = cdb_err_set(e, CLIPDB_EIO, "cannot read %s: %s", src, strerror(errno));
            goto cleanup;
        }
        if ((rc = write_all(out, buf, (size_t)r, dst, e))) goto cleanup;
    }
    if (fsync(out) != 0)
        rc = cdb_err_set(e, CLIPDB_EIO, "cannot write %s: fsync: %s", dst, strerror(errno));
cleanup:
    if (in >= 0) close(in);
    if (out >= 0 && close(out) != 0 && rc == CLIPDB_OK)
        rc = cdb_err_set(e, CLIPDB_EIO, "cannot write %s: close: %s", dst, strerror(errno));
    return rc;
}

static int write_text(const char *path, const char *text, cdb_err *e)
{
    int fd = open(path, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0644), rc;
    if (fd < 0) return cdb_err_set(e, CLIPDB_EIO, "cannot create %s: %s", path, strerror(errno));
    rc = write_all(fd, text, strlen(text), path, e);
    if (rc == CLIPDB_OK && fsync(fd) != 0)
        rc = cdb_err_set(e, CLIPDB_EIO, "cannot write %s: fsync: %s", path, strerror(errno));
    if (close(fd) != 0 && rc == CLIPDB_OK)
        rc = cdb_err_set(e, CLIPDB_EIO, "cannot write %s: close: %s", path, strerror(errno));
    return rc;
}

int cdb_rm_tree(const char *path)
{
    struct stat sb;
    DIR *d;
    struct dirent *de;
    int rc = 0;
    if (lstat(path, &sb) != 0) return errno == ENOENT ? 0 : -1;
    if (!S_ISDIR(sb.st_mode)) return unlink(path);
    if (!(d = opendir(path))) return -1;
    while ((de = readdir(d)) != NULL) {
        char *sub;
        if (!strcmp(de->d_name, ".") || !strcmp(de->d_name, "..")) continue;
        sub = cdb_path_join(path, de->d_name);
        if (!sub || cdb_rm_tree(sub) != 0) rc = -1;
        free(sub);
    }
    closedir(d);
    return rmdir(path) == 0 ? rc : -1;
}

static int model_dtype(const clipdb_model *m)
{
    if (m->dtype && !strcmp(m->dtype, "F16")) return CDB_DT_F16;
    if (m->dtype && !strcmp(m->dtype, "BF16")) return CDB_DT_BF16;
    return CDB_DT_F32;
}

int cdb_model_write_dir(const clipdb_model *m, const char *out_dir,
                        const cdb_model_write_opts *opts, cdb_err *e)
{
    int rc = CLIPDB_OK, dtype = opts->dtype ? opts->dtype : model_dtype(m), n_tok = 0;
    const char *style = opts->style ? opts->style : m->key_style;
    const char *tok_dir = opts->tok_dir ? opts->tok_dir : m->dir;
    char *tmp = NULL, *path = NULL, *old = NULL;
    cdb_wtensor *t = NULL;
    size_t n = 0, i;
    struct stat sb;
    int exists = lstat(out_dir, &sb) == 0;

    if (exists && !opts->force)
        return cdb_err_set(e, CLIPDB_EINVAL, "%s already exists; use --force to replace it",
                           out_dir);
    if (exists && !S_ISDIR(sb.st_mode))
        return cdb_err_set(e, CLIPDB_EINVAL, "%s exists and is not a directory", out_dir);
    if ((rc = cdb_weights_layout(m, style, &t, &n, e))) return rc;
    tmp = cdb_sprintf("%s.tmp.%ld", out_dir, (long)getpid());
    old = cdb_sprintf("%s.old.%ld", out_dir, (long)getpid());
    if (!tmp || !old) {
        rc = cdb_err_set(e, CLIPDB_ENOMEM, "out of memory");
        goto cleanup;
    }
    cdb_rm_tree(tmp); /* a leftover of this pid's earlier try */
    if (mkdir(tmp, 0755) != 0) {
        rc = cdb_err_set(e, CLIPDB_EIO, "cannot create %s: %s", tmp, strerror(errno));
        goto cleanup;
    }
    if (!(path = cdb_path_join(tmp, "model.safetensors"))) {
        rc = cdb_err_set(e, CLIPDB_ENOMEM, "out of memory");
        goto cleanup;
    }
    {
        const char *mk[1] = {"clipdb_key_style"}, *mv[1] = {style};
        if ((rc = cdb_st_write(path, t, n, dtype, mk, mv, 1, e))) goto cleanup;
    }
    for (i = 0; i < sizeof tokenizer_files / sizeof tokenizer_files[0]; i++) {
        char *src = cdb_path_join(tok_dir, tokenizer_files[i]);
        free(path);
        path = cdb_path_join(tmp, tokenizer_files[i]);
        if (!src || !path) {
            free(src);
            rc = cdb_err_set(e, CLIPDB_ENOMEM, "out of memory");
            goto cleanup;
        }
        if (cdb_file_exists(src)) {
            rc = copy_file(src, path, e);
            n_tok++;
        }
        free(src);
        if (rc) goto cleanup;
    }
    if (!n_tok) {
        rc = cdb_err_set(e, CLIPDB_ENOTFOUND, "no tokenizer files in %s to copy", tok_dir);
        goto cleanup;
    }
    if (opts->made_json) {
        free(path);
        if (!(path = cdb_path_join(tmp, CDB_MADE_FILE))) {
            rc = cdb_err_set(e, CLIPDB_ENOMEM, "out of memory");
            goto cleanup;
        }
        if ((rc = write_text(path, opts->made_json, e))) goto cleanup;
    }
    cdb_fsync_parent(path);
    /* Into place: an existing directory is moved aside first, then removed. */
    if (exists && rename(out_dir, old) != 0) {
        rc = cdb_err_set(e, CLIPDB_EIO, "cannot replace %s: %s", out_dir, strerror(errno));
        goto cleanup;
    }
    if (rename(tmp, out_dir) != 0) {
        rc = cdb_err_set(e, CLIPDB_EIO, "cannot rename %s to %s: %s", tmp, out_dir,
                         strerror(errno));
        if (exists) rename(old, out_dir);
        goto cleanup;
    }
    cdb_fsync_parent(out_dir);
    if (exists) cdb_rm_tree(old);
cleanup:
    if (rc != CLIPDB_OK && tmp) cdb_rm_tree(tmp);
    free(t);
    free(tmp);
    free(old);
    free(path);
    return rc;
}
