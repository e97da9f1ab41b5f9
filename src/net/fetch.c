/*
** fetch.c: downloading a published model from Hugging Face (or a server with
** the same URL layout) with libcurl: redirects followed, resumable .part
** files, sizes checked against every header that announces one, SHA-256
** checked with libcrypto when the hub gives it.
**
** Per file:
**   1. HEAD <base>/<name>/resolve/main/<file>. Hugging Face answers LFS
**      files with a redirect to its CDN carrying X-Linked-Size (the size) and
**      X-Linked-Etag (the SHA-256): that answer is enough. Other files are
**      answered directly (redirects are followed) with Content-Length.
**   2. DIR/<file> already of that size: skipped.
**   3. DIR/<file>.part of N bytes: GET with "Range: bytes=N-" (redirects
**      followed), whose Content-Length must match the size. A 206 answer
**      must start at N and give the same total; a 200 answer (Range
**      ignored) restarts the file from byte 0 in the same transfer. A body
**      longer than announced is cut off with an error; a short one is an
**      error that keeps the .part file for the next run.
**   4. Complete: SHA-256 checked (when known), the weights file parsed
**      (header and offsets, cdb_st_open), rename to DIR/<file>.
**
** src/net/ is the network layer: it sits above model/ (it checks fetched
** weights with the safetensors reader) and below cli/; nothing in model/,
** index/ or store/ calls it.
*/
#include <ctype.h>
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <sys/statvfs.h>
#include <unistd.h>

#include <curl/curl.h>
#include <openssl/evp.h>

#include "core/core.h"
#include "model/safetensors.h"

#define DEFAULT_BASE_URL "https://huggingface.co"
#define BASE_URL_ENV "CLIPDB_HF_BASE_URL"
/* No single file of a CLIP model comes near this; a larger announced size is
** a lie or a mistake (ViT-bigG/14 in F32 is about 10 GiB). */
#define MAX_FILE_BYTES ((int64_t)64 << 30)
#define MAX_NAME_PART 96
#define PROGRESS_INTERVAL_S 0.1

/* ---- which files a model name means ------------------------------------------ */

typedef struct fetch_file {
    const char *name;
    int optional;   /* a 404 skips it (open_clip repositories may lack a tokenizer) */
    int weights;    /* parsed as safetensors before it is renamed */
} fetch_file;

static const fetch_file hf_layout[] = {
    {"model.safetensors", 0, 1}, {"vocab.json", 0, 0}, {"merges.txt", 0, 0}, {NULL, 0, 0}};
/* open_clip repositories: the weights under open_clip's key names (which are
** OpenAI's); vocab.json + merges.txt where present, else the directory needs
** bpe_simple_vocab_16e6.txt.gz (shared/models/clip-vit-b-32/). */
static const fetch_file open_clip_layout[] = {
    {"open_clip_model.safetensors", 0, 1}, {"vocab.json", 1, 0}, {"merges.txt", 1, 0},
    {NULL, 0, 0}};

/* Known names. Any other "org/name" follows the generic rule in
** files_for_name: organisation "timm" -> open_clip layout, else the Hugging
** Face transformers layout. */
static const struct {
    const char *name;
    const fetch_file *files;
} known_models[] = {
    {"openai/clip-vit-base-patch32", hf_layout},
    {"timm/vit_base_patch32_clip_224.openai", open_clip_layout},
    {"laion/CLIP-ViT-B-32-laion2B-s34B-b79K", open_clip_layout},
};

static const fetch_file *files_for_name(const char *name)
{
    size_t i;
    for (i = 0; i < sizeof known_models / sizeof known_models[0]; i++)
        if (!strcmp(name, known_models[i].name)) return known_models[i].files;
    if (!strncmp(name, "timm/", 5)) return open_clip_layout;
    return hf_layout;
}

/* "org/name", each part [A-Za-z0-9._-]{1,96}, not starting with '.' or '-'. */
static int valid_name(const char *name)
{
    int parts = 1;
    size_t len = 0;
    const char *p;
    for (p = name;; p++) {
        if (*p == '/' || *p == '\0') {
            if (len == 0 || len > MAX_NAME_PART) return 0;
            if (p[-(long)len] == '.' || p[-(long)len] == '-') return 0;
            if (*p == '\0') break;
            parts++;
            len = 0;
            continue;
        }
        if (!isalnum((unsigned char)*p) && *p != '.' && *p != '_' && *p != '-') return 0;
        len++;
    }
    return parts == 2;
}

/* ---- small helpers ------------------------------------------------------------- */

/* Parses a whole string of decimal digits (surrounding blanks allowed) into
** [0, MAX_FILE_BYTES]. Returns 1 on success. */
static int parse_size(const char *s, size_t n, int64_t *out)
{
    int64_t v = 0;
    size_t i = 0, digits = 0;
    while (i < n && (s[i] == ' ' || s[i] == '\t')) i++;
    for (; i < n && s[i] >= '0' && s[i] <= '9'; i++, digits++) {
        v = v * 10 + (s[i] - '0');
        if (v > MAX_FILE_BYTES) return 0;
    }
    while (i < n && (s[i] == ' ' || s[i] == '\t' || s[i] == '\r' || s[i] == '\n')) i++;
    if (!digits || i != n) return 0;
    *out = v;
    return 1;
}

/* Size of a regular file, or -1 if it does not exist. */
static int64_t file_size(const char *path)
{
    struct stat st;
    if (stat(path, &st) != 0 || !S_ISREG(st.st_mode)) return -1;
    return (int64_t)st.st_size;
}

/* Lower-case hex SHA-256 of a file into hex[65]. */
static int sha256_file(const char *path, char hex[65], cdb_err *e)
{
    int rc = CLIPDB_OK;
    FILE *f = NULL;
    EVP_MD_CTX *md = NULL;
    unsigned char buf[1 << 16], digest[EVP_MAX_MD_SIZE];
    unsigned int dlen = 0;
    size_t n;

    f = fopen(path, "rb");
    md = EVP_MD_CTX_new();
    if (!f) {
        rc = cdb_err_set(e, CLIPDB_EIO, "%s: %s", path, strerror(errno));
        goto cleanup;
    }
    if (!md || EVP_DigestInit_ex(md, EVP_sha256(), NULL) != 1) {
        rc = cdb_err_set(e, CLIPDB_ENOMEM, "SHA-256: out of memory");
        goto cleanup;
    }
    while ((n = fread(buf, 1, sizeof buf, f)) > 0) EVP_DigestUpdate(md, buf, n);
    if (ferror(f)) {
        rc = cdb_err_set(e, CLIPDB_EIO, "%s: read error", path);
        goto cleanup;
    }
    EVP_DigestFinal_ex(md, digest, &dlen);
    if (dlen != 32) {
        rc = cdb_err_set(e, CLIPDB_ERROR, "SHA-256 of %s failed", path);
        goto cleanup;
    }
    cdb_hex(digest, 32, hex);
cleanup:
    EVP_MD_CTX_free(md);
    if (f) fclose(f);
    return rc;
}

/* ---- one libcurl transfer -------------------------------------------------------- */

static pthread_once_t curl_once = PTHREAD_ONCE_INIT;
static CURLcode curl_init_rc;
static void curl_init(void)
{
    curl_init_rc = curl_global_init(CURL_GLOBAL_DEFAULT);
}

/* What a HEAD told us about one file. */
typedef struct remote_info {
    int64_t size;      /* -1 if unknown */
    char sha256[65];   /* "" if unknown */
} remote_info;

/* State of one GET, shared with the libcurl callbacks. */
typedef struct xfer {
    CURL *curl;
    FILE *f;
    const char *part;
    int64_t offset;    /* bytes of .part kept (the Range start) */
    int64_t written;   /* body bytes written by this transfer */
    int64_t total;     /* expected final size, -1 if unknown */
    int started;       /* the response status was checked */
    int cb_rc;         /* CLIPDB_* status set by a callback that stopped the transfer */
    int discard;       /* the .part is not a prefix of the file: remove it */
    cdb_err *e;
    const clipdb_fetch_options *opt;
    const char *file;
    double last_progress;
} xfer;

static CURL *new_handle(const clipdb_fetch_options *opt, char *errbuf)
{
    CURL *c = curl_easy_init();
    if (!c) return NULL;
    curl_easy_setopt(c, CURLOPT_ERRORBUFFER, errbuf);
    curl_easy_setopt(c, CURLOPT_FOLLOWLOCATION, 1L);
    curl_easy_setopt(c, CURLOPT_MAXREDIRS, 10L);
    curl_easy_setopt(c, CURLOPT_PROTOCOLS_STR, "http,https");
    curl_easy_setopt(c, CURLOPT_REDIR_PROTOCOLS_STR, "http,https");
    curl_easy_setopt(c, CURLOPT_FAILONERROR, 1L);
    curl_easy_setopt(c, CURLOPT_NOSIGNAL, 1L);
    curl_easy_setopt(c, CURLOPT_USERAGENT, "clipdb/" CLIPDB_VERSION);
    curl_easy_setopt(c, CURLOPT_CONNECTTIMEOUT, opt->connect_timeout_s);
    curl_easy_setopt(c, CURLOPT_LOW_SPEED_LIMIT, 1024L);
    curl_easy_setopt(c, CURLOPT_LOW_SPEED_TIME, opt->stall_timeout_s);
    /* Compressed bodies would make sizes incomparable: ask for identity. */
    curl_easy_setopt(c, CURLOPT_ACCEPT_ENCODING, NULL);
    return c;
}

/* Value of header `name` in response number `req` (-1: the last one). */
static const char *header_value(CURL *c, const char *name, int req)
{
    struct curl_header *h = NULL;
    if (curl_easy_header(c, name, 0, CURLH_HEADER, req, &h) != CURLHE_OK || !h) return NULL;
    return h->value;
}

/* Turns a failed curl_easy_perform into a message. */
static int transfer_error(CURL *c, CURLcode cc, const char *errbuf, const char *method,
                          const char *url, cdb_err *e)
{
    long status = 0;
    curl_easy_getinfo(c, CURLINFO_RESPONSE_CODE, &status);
    if (cc == CURLE_HTTP_RETURNED_ERROR)
        return cdb_err_set(e, CLIPDB_ENET, "%s %s: HTTP %ld%s", method, url, status,
                           status == 404 ? " (no such model or file)"
                           : status == 401 || status == 403
                               ? " (not allowed: a private or gated repository?)"
                               : "");
    return cdb_err_set(e, CLIPDB_ENET, "%s %s: %s", method, url,
                       errbuf[0] ? errbuf : curl_easy_strerror(cc));
}

/* Reads X-Linked-Size / X-Linked-Etag of the last response into ri.
** Returns 1 if it carried X-Linked-Size. */
static int linked_headers(CURL *c, const char *url, remote_info *ri, int *rc, cdb_err *e)
{
    const char *s = header_value(c, "X-Linked-Size", -1);
    const char *tag = header_value(c, "X-Linked-Etag", -1);
    int64_t v;
    if (tag) {
        /* "\"<64 hex>\"", possibly with a W/ prefix; anything else (a git
        ** blob id) is not a SHA-256 and is ignored. */
        const char *p = tag;
        size_t n, i;
        if (!strncmp(p, "W/", 2)) p += 2;
        if (*p == '"') p++;
        n = strspn(p, "0123456789abcdefABCDEF");
        if (n == 64 && (p[64] == '"' || p[64] == '\0')) {
            for (i = 0; i < 64; i++) ri->sha256[i] = (char)tolower((unsigned char)p[i]);
            ri->sha256[64] = '\0';
        }
    }
    if (!s) return 0;
    if (!parse_size(s, strlen(s), &v)) {
        *rc = cdb_err_set(e, CLIPDB_ELIMIT,
                          "HEAD %s: X-Linked-Size '%.40s' is not a size up to %" PRId64 " bytes",
                          url, s, MAX_FILE_BYTES);
        return 0;
    }
    ri->size = v;
    return 1;
}

/* HEAD url: the announced size and SHA-256, as huggingface_hub finds them:
** redirects are followed one by one and the walk stops at the first answer
** with X-Linked-Size (the hub's redirect of an LFS file to its CDN, whose
** signed URLs need not answer HEAD); else the final 2xx gives Content-Length.
** *status gets the last HTTP status (404 included, with CLIPDB_ENET). */
static int head_file(const char *url, const clipdb_fetch_options *opt, remote_info *ri,
                     long *status, cdb_err *e)
{
    int rc = CLIPDB_OK, hops;
    char errbuf[CURL_ERROR_SIZE] = "";
    CURL *c = new_handle(opt, errbuf);
    CURLcode cc;
    curl_off_t clen = -1;
    char *cur = cdb_strdup(url), *next;

    ri->size = -1;
    ri->sha256[0] = '\0';
    *status = 0;
    if (!c || !cur) {
        rc = cdb_err_set(e, CLIPDB_ENOMEM, "curl: out of memory");
        goto cleanup;
    }
    curl_easy_setopt(c, CURLOPT_NOBODY, 1L);
    curl_easy_setopt(c, CURLOPT_FOLLOWLOCATION, 0L);
    for (hops = 0;; hops++) {
        errbuf[0] = '\0';
        curl_easy_setopt(c, CURLOPT_URL, cur);
        cc = curl_easy_perform(c);
        curl_easy_getinfo(c, CURLINFO_RESPONSE_CODE, status);
        if (cc != CURLE_OK) {
            rc = transfer_error(c, cc, errbuf, "HEAD", cur, e);
            goto cleanup;
        }
        if (linked_headers(c, cur, ri, &rc, e) || rc != CLIPDB_OK) goto cleanup;
        if (*status < 300 || *status >= 400) break;
        next = NULL;
        curl_easy_getinfo(c, CURLINFO_REDIRECT_URL, &next);
        if (!next) {
            rc = cdb_err_set(e, CLIPDB_ENET, "HEAD %s: HTTP %ld without a Location", cur,
                             *status);
            goto cleanup;
        }
        if (hops >= 10) {
            rc = cdb_err_set(e, CLIPDB_ENET, "HEAD %s: more than 10 redirects", url);
            goto cleanup;
        }
        free(cur);
        cur = cdb_strdup(next);
        if (!cur) {
            rc = cdb_err_set(e, CLIPDB_ENOMEM, "out of memory");
            goto cleanup;
        }
    }
    curl_easy_getinfo(c, CURLINFO_CONTENT_LENGTH_DOWNLOAD_T, &clen);
    if (clen > MAX_FILE_BYTES) {
        rc = cdb_err_set(e, CLIPDB_ELIMIT, "HEAD %s: Content-Length %" PRId64
                         " exceeds the limit of %" PRId64 " bytes",
                         cur, (int64_t)clen, MAX_FILE_BYTES);
        goto cleanup;
    }
    ri->size = clen;
cleanup:
    free(cur);
    curl_easy_cleanup(c);
    return rc;
}

static void report(xfer *x, int64_t done, int force)
{
    double now;
    if (!x->opt->on_progress) return;
    now = cdb_now();
    if (!force && now - x->last_progress < PROGRESS_INTERVAL_S) return;
    x->last_progress = now;
    x->opt->on_progress(x->opt->progress_arg, x->file, done, x->total);
}

static int xferinfo_cb(void *arg, curl_off_t dltotal, curl_off_t dlnow, curl_off_t ultotal,
                       curl_off_t ulnow)
{
    xfer *x = arg;
    (void)dltotal;
    (void)dlnow;
    (void)ultotal;
    (void)ulnow;
    if (x->started) report(x, x->offset + x->written, 0);
    return 0;
}

/* First body bytes: the status and Content-Range decide how they continue
** the .part file. Returns 0 to go on, else stops the transfer. */
static int start_body(xfer *x)
{
    long status = 0;
    curl_off_t clen = -1;
    int64_t total;

    x->started = 1;
    curl_easy_getinfo(x->curl, CURLINFO_RESPONSE_CODE, &status);
    curl_easy_getinfo(x->curl, CURLINFO_CONTENT_LENGTH_DOWNLOAD_T, &clen);
    if (status == 206) {
        const char *cr = header_value(x->curl, "Content-Range", -1);
        const char *dash, *slash;
        int64_t start;
        if (x->offset == 0 && !cr) goto plain;
        /* "bytes START-END/TOTAL" */
        if (!cr || strncmp(cr, "bytes ", 6) || !(dash = strchr(cr + 6, '-')) ||
            !(slash = strchr(dash, '/')) ||
            !parse_size(cr + 6, (size_t)(dash - cr - 6), &start) ||
            !parse_size(slash + 1, strlen(slash + 1), &total)) {
            x->cb_rc = cdb_err_set(x->e, CLIPDB_ENET, "206 answer with a bad Content-Range '%.60s'",
                                   cr ? cr : "(none)");
            return 1;
        }
        if (start != x->offset) {
            x->cb_rc = cdb_err_set(x->e, CLIPDB_ENET,
                                   "asked for bytes from %" PRId64 " but the server sent from %" PRId64,
                                   x->offset, start);
            return 1;
        }
        if (x->total >= 0 && total != x->total) {
            x->cb_rc = cdb_err_set(x->e, CLIPDB_ENET,
                                   "the server now gives the size as %" PRId64 " bytes, not %" PRId64,
                                   total, x->total);
            return 1;
        }
        x->total = total;
        report(x, x->offset, 1);
        return 0;
    }
plain:
    if (x->offset > 0) {
        /* The server ignored the Range request: start the file again. */
        if (fflush(x->f) != 0 || ftruncate(fileno(x->f), 0) != 0 || fseeko(x->f, 0, SEEK_SET) != 0) {
            x->cb_rc = cdb_err_set(x->e, CLIPDB_EIO, "%s: truncate: %s", x->part, strerror(errno));
            return 1;
        }
        x->offset = 0;
    }
    total = clen;
    if (total > MAX_FILE_BYTES) {
        x->cb_rc = cdb_err_set(x->e, CLIPDB_ELIMIT,
                               "Content-Length %" PRId64 " exceeds the limit of %" PRId64 " bytes",
                               total, MAX_FILE_BYTES);
        return 1;
    }
    if (x->total >= 0 && total >= 0 && total != x->total) {
        x->cb_rc = cdb_err_set(x->e, CLIPDB_ENET,
                               "the server announced %" PRId64 " bytes but sends %" PRId64,
                               x->total, total);
        return 1;
    }
    if (x->total < 0) x->total = total;
    report(x, 0, 1);
    return 0;
}

static size_t write_cb(char *data, size_t size, size_t nmemb, void *arg)
{
    xfer *x = arg;
    size_t n = size * nmemb;
    if (!x->started && start_body(x)) return 0;
    if (x->total >= 0 && (int64_t)n > x->total - x->offset - x->written) {
        x->cb_rc = cdb_err_set(x->e, CLIPDB_ENET,
                               "the server sent more than the %" PRId64 " bytes it announced "
                               "(download removed)",
                               x->total);
        x->discard = 1;
        return 0;
    }
    if (fwrite(data, 1, n, x->f) != n) {
        x->cb_rc = cdb_err_set(x->e, CLIPDB_EIO, "%s: write: %s", x->part, strerror(errno));
        return 0;
    }
    x->written += (int64_t)n;
    return n;
}

/* GET url into part, resuming from its current size. total: the announced
** size (-1 if unknown), updated from the answer. */
static int get_file(const char *url, const char *part, const char *file,
                    const clipdb_fetch_options *opt, int64_t *total, cdb_err *e)
{
    int rc = CLIPDB_OK;
    char errbuf[CURL_ERROR_SIZE] = "";
    char range[48];
    CURLcode cc;
    int64_t have = file_size(part);
    int fd = -1;
    xfer x;

    memset(&x, 0, sizeof x);
    x.part = part;
    x.total = *total;
    x.e = e;
    x.opt = opt;
    x.file = file;
    if (have > 0 && *total >= 0 && have > *total) have = 0; /* longer than the file: stale */
    x.offset = have > 0 ? have : 0;
    /* Opened without truncation, locked, then truncated or appended to: two
    ** fetches into one directory never write the same .part at once. */
    fd = open(part, O_RDWR | O_CREAT | O_CLOEXEC, 0644);
    if (fd < 0) {
        rc = cdb_err_set(e, CLIPDB_EIO, "%s: %s", part, strerror(errno));
        goto cleanup;
    }
    if (flock(fd, LOCK_EX | LOCK_NB) != 0) {
        rc = cdb_err_set(e, CLIPDB_EIO, "%s: %s", part,
                         errno == EWOULDBLOCK ? "another fetch is writing it" : strerror(errno));
        goto cleanup;
    }
    if ((x.offset == 0 && ftruncate(fd, 0) != 0) || lseek(fd, 0, SEEK_END) < 0 ||
        !(x.f = fdopen(fd, "r+b"))) {
        rc = cdb_err_set(e, CLIPDB_EIO, "%s: %s", part, strerror(errno));
        goto cleanup;
    }
    fd = -1; /* owned by x.f */
    x.curl = new_handle(opt, errbuf);
    if (!x.curl) {
        rc = cdb_err_set(e, CLIPDB_ENOMEM, "curl: out of memory");
        goto cleanup;
    }
    curl_easy_setopt(x.curl, CURLOPT_URL, url);
    curl_easy_setopt(x.curl, CURLOPT_WRITEFUNCTION, write_cb);
    curl_easy_setopt(x.curl, CURLOPT_WRITEDATA, &x);
    curl_easy_setopt(x.curl, CURLOPT_XFERINFOFUNCTION, xferinfo_cb);
    curl_easy_setopt(x.curl, CURLOPT_XFERINFODATA, &x);
    curl_easy_setopt(x.curl, CURLOPT_NOPROGRESS, 0L);
    if (x.offset > 0) {
        /* CURLOPT_RANGE rather than RESUME_FROM: a 200 answer then reaches
        ** start_body, which restarts the file instead of failing. */
        snprintf(range, sizeof range, "%" PRId64 "-", x.offset);
        curl_easy_setopt(x.curl, CURLOPT_RANGE, range);
    }
    cc = curl_easy_perform(x.curl);
    if (cc != CURLE_OK) {
        if (x.cb_rc) {
            rc = x.cb_rc;
            cdb_err_prefix(e, "GET %s", url);
        } else {
            rc = transfer_error(x.curl, cc, errbuf, "GET", url, e);
        }
        goto cleanup;
    }
    if (!x.started && start_body(&x)) { /* an empty body never calls write_cb */
        rc = x.cb_rc;
        cdb_err_prefix(e, "GET %s", url);
        goto cleanup;
    }
    if (fflush(x.f) != 0 || fsync(fileno(x.f)) != 0) {
        rc = cdb_err_set(e, CLIPDB_EIO, "%s: %s", part, strerror(errno));
        goto cleanup;
    }
    if (x.total >= 0 && x.offset + x.written != x.total) {
        rc = cdb_err_set(e, CLIPDB_ENET,
                         "GET %s: got %" PRId64 " of %" PRId64 " bytes; run again to resume",
                         url, x.offset + x.written, x.total);
        goto cleanup;
    }
    *total = x.offset + x.written;
    report(&x, *total, 1);
cleanup:
    if (x.f && fclose(x.f) != 0 && rc == CLIPDB_OK)
        rc = cdb_err_set(e, CLIPDB_EIO, "%s: %s", part, strerror(errno));
    if (fd >= 0) close(fd);
    /* A body longer than announced: what is kept is not known to be a
    ** prefix of the file. An empty .part is of no use either. */
    if (rc != CLIPDB_OK && x.f && (x.discard || x.offset + x.written == 0)) unlink(part);
    if (rc == CLIPDB_ENET && x.offset + x.written > 0 && !x.discard &&
        !strstr(e->msg, "resume")) {
        size_t l = strnlen(e->msg, sizeof e->msg);
        snprintf(e->msg + l, sizeof e->msg - l, "; %s kept: run again to resume", part);
    }
    curl_easy_cleanup(x.curl);
    return rc;
}

/* Checks free space in dir for `need` more bytes. */
static int check_space(const char *dir, int64_t need, cdb_err *e)
{
    struct statvfs sv;
    uint64_t avail;
    if (need <= 0 || statvfs(dir, &sv) != 0) return CLIPDB_OK;
    avail = (uint64_t)sv.f_bavail * (uint64_t)sv.f_frsize;
    if (avail < (uint64_t)need)
        return cdb_err_set(e, CLIPDB_EIO, "%s: %" PRId64 " bytes needed but only %" PRIu64
                           " free", dir, need, avail);
    return CLIPDB_OK;
}

/* One file: HEAD, skip or GET (resumed), verify, rename. */
static int fetch_one(const char *base, const char *name, const char *dir, const fetch_file *ff,
                     const clipdb_fetch_options *opt, cdb_err *e)
{
    int rc = CLIPDB_OK;
    char *url = NULL, *final = NULL, *part = NULL;
    remote_info ri;
    long status = 0;
    int64_t have, total;
    char hex[65];

    url = cdb_sprintf("%s/%s/resolve/main/%s", base, name, ff->name);
    final = cdb_path_join(dir, ff->name);
    part = cdb_sprintf("%s.part", final ? final : "");
    if (!url || !final || !part) {
        rc = cdb_err_set(e, CLIPDB_ENOMEM, "out of memory");
        goto cleanup;
    }
    rc = head_file(url, opt, &ri, &status, e);
    if (rc != CLIPDB_OK) {
        if (ff->optional && status == 404) {
            cdb_err_clear(e);
            rc = CLIPDB_OK;
        }
        goto cleanup;
    }
    total = ri.size;
    have = file_size(final);
    if (have >= 0 && total >= 0 && have == total) {
        if (opt->on_progress) opt->on_progress(opt->progress_arg, ff->name, have, total);
        goto cleanup;
    }
    have = file_size(part);
    if (total >= 0 && have > total) {
        /* Longer than the file: not a prefix of it. */
        if (unlink(part) != 0) {
            rc = cdb_err_set(e, CLIPDB_EIO, "%s: %s", part, strerror(errno));
            goto cleanup;
        }
        have = -1;
    }
    if (total >= 0) {
        rc = check_space(dir, total - (have > 0 ? have : 0), e);
        if (rc != CLIPDB_OK) goto cleanup;
    }
    if (!(total >= 0 && have == total)) {
        rc = get_file(url, part, ff->name, opt, &total, e);
        if (rc != CLIPDB_OK) goto cleanup;
    } else if (opt->on_progress) {
        opt->on_progress(opt->progress_arg, ff->name, have, total);
    }
    if (ri.sha256[0]) {
        rc = sha256_file(part, hex, e);
        if (rc != CLIPDB_OK) goto cleanup;
        if (strcmp(hex, ri.sha256) != 0) {
            unlink(part);
            rc = cdb_err_set(e, CLIPDB_EMISMATCH,
                             "%s: SHA-256 %s differs from the %s the server announced; "
                             "removed the download",
                             ff->name, hex, ri.sha256);
            goto cleanup;
        }
    }
    if (ff->weights) {
        /* The header and every tensor's offsets, checked against the file
        ** (the tensors themselves are bound when the model is opened). */
        cdb_safetensors *st = NULL;
        rc = cdb_st_open(part, &st, e);
        cdb_st_close(st);
        if (rc != CLIPDB_OK) {
            unlink(part);
            cdb_err_prefix(e, "%s: downloaded, but not a valid safetensors file (removed)",
                           ff->name);
            goto cleanup;
        }
    }
    if (rename(part, final) != 0) {
        rc = cdb_err_set(e, CLIPDB_EIO, "rename %s: %s", part, strerror(errno));
        goto cleanup;
    }
cleanup:
    free(url);
    free(final);
    free(part);
    return rc;
}

void clipdb_fetch_options_init(clipdb_fetch_options *opt)
{
    memset(opt, 0, sizeof *opt);
    opt->connect_timeout_s = 30;
    opt->stall_timeout_s = 60;
}

int clipdb_model_fetch(const char *name, const char *dir, const clipdb_fetch_options *opt_in,
                       char **errmsg)
{
    int rc = CLIPDB_OK;
    cdb_err err;
    clipdb_fetch_options opt;
    const fetch_file *files;
    char *base = NULL;
    const char *b;
    size_t n;

    cdb_err_clear(&err);
    if (errmsg) *errmsg = NULL;
    if (opt_in) opt = *opt_in;
    else clipdb_fetch_options_init(&opt);
    if (opt.connect_timeout_s <= 0) opt.connect_timeout_s = 30;
    if (opt.stall_timeout_s <= 0) opt.stall_timeout_s = 60;
    if (!name || !valid_name(name)) {
        rc = cdb_err_set(&err, CLIPDB_EINVAL,
                         "model name '%s' is not of the form ORG/NAME (letters, digits, . _ -)",
                         name ? name : "(null)");
        goto cleanup;
    }
    if (!dir || !*dir) {
        rc = cdb_err_set(&err, CLIPDB_EINVAL, "no directory given");
        goto cleanup;
    }
    b = opt.base_url;
    if (!b || !*b) b = getenv(BASE_URL_ENV);
    if (!b || !*b) b = DEFAULT_BASE_URL;
    if (strncmp(b, "http://", 7) && strncmp(b, "https://", 8)) {
        rc = cdb_err_set(&err, CLIPDB_EINVAL, "base URL '%s' is not http:// or https://", b);
        goto cleanup;
    }
    base = cdb_strdup(b);
    if (!base) {
        rc = cdb_err_set(&err, CLIPDB_ENOMEM, "out of memory");
        goto cleanup;
    }
    for (n = strlen(base); n > 0 && base[n - 1] == '/'; n--) base[n - 1] = '\0';
    pthread_once(&curl_once, curl_init);
    if (curl_init_rc != CURLE_OK) {
        rc = cdb_err_set(&err, CLIPDB_ENET, "curl_global_init: %s",
                         curl_easy_strerror(curl_init_rc));
        goto cleanup;
    }
    rc = cdb_make_dirs(dir, &err);
    if (rc != CLIPDB_OK) goto cleanup;
    for (files = files_for_name(name); files->name; files++) {
        rc = fetch_one(base, name, dir, files, &opt, &err);
        if (rc != CLIPDB_OK) goto cleanup;
    }
cleanup:
    free(base);
    if (rc != CLIPDB_OK && errmsg) *errmsg = cdb_strdup(err.msg[0] ? err.msg : "fetch failed");
    return rc;
}
