/*
** server.c: `clipdb serve`, the HTTP server on libmicrohttpd.
**
** Threads: libmicrohttpd's pool of `threads` workers; each request borrows a
** worker slot (a database handle and an encoder context, see slot_get) for
** its whole life, so no handle is used by two threads at once. One model is
** opened once and shared (read-only) by every handle. Writes (POST/DELETE)
** are serialised by one mutex; SQLite's WAL lets the other handles read
** meanwhile, and each handle reloads its vectors when the file changed.
**
** One table (routes[]) registers every route; handlers reach the database
** through include/clipdb.h only. Every limit is a named constant in
** server/http.h. Requests are logged through the on_log callback; nothing
** here prints.
*/
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <unistd.h>
#include <arpa/inet.h>
#include <netinet/in.h>

#include <microhttpd.h>
#include <stb_image_write.h>

#include "clipdb.h"
#include "core/core.h"
#include "server/http.h"

/* ---- the server ---------------------------------------------------------------- */

typedef struct slot {
    clipdb_db *db;
    clipdb_ctx *ctx;         /* thumbnails and upload checks */
    float *pixels;           /* 3 x S x S, reused */
} slot;

typedef struct thumb {
    int64_t id;              /* -1: empty */
    unsigned char *jpeg;
    size_t len;
} thumb;

#define N_CODES 17
static const int codes[N_CODES] = {200, 201, 204, 400, 401, 403, 404, 405, 409,
                                   411, 413, 415, 422, 500, 503, 507, 0};
#define N_BUCKETS 12
static const double buckets_s[N_BUCKETS] = {0.001, 0.0025, 0.005, 0.01, 0.025, 0.05,
                                            0.1,   0.25,   0.5,   1,    2.5,   10};

struct clipdb_server {
    cdb_err err;
    clipdb_server_options opt;
    char *db_path, *upload_dir, *token, *cors;
    struct MHD_Daemon *mhd;
    int port;
    clipdb_model *model;     /* belongs to slots[0].db */
    int image_size;
    slot *slots;
    int n_slots, n_free;
    int *free_slots;
    pthread_mutex_t slot_mu, write_mu, metric_mu, thumb_mu;
    pthread_cond_t slot_cv;
    int mutexes;
    thumb *thumbs;           /* CDB_HTTP_THUMB_CACHE, direct-mapped by id */
    /* the evaluation (GET /api/eval), computed on first use and kept until a
    ** write changes the database */
    pthread_mutex_t eval_mu;
    char *eval_json, *eval_html;
    size_t eval_html_len;
    /* metrics, per route (and one more row for unrouted requests) */
    uint64_t *count;         /* (n_routes + 1) x N_CODES */
    uint64_t *hist;          /* (n_routes + 1) x (N_BUCKETS + 1) */
    double *sum_s;           /* n_routes + 1 */
};

/* One request being answered. */
typedef struct hreq {
    clipdb_server *s;
    struct MHD_Connection *conn;
    const char *method, *url;
    const char *body;
    size_t len;
    int64_t id;              /* {id} */
    const char *name;        /* {name} */
    size_t name_len;
    slot *sl;                /* borrowed worker slot */
    /* the answer */
    int status;
    char *out;               /* malloc'd, or NULL with out_static */
    const unsigned char *out_static;
    size_t out_len;
    const char *mime;
    const char *cache;       /* Cache-Control, or NULL */
    const char *csp;         /* Content-Security-Policy, or NULL: the page's */
} hreq;

static void eval_forget(clipdb_server *s);

/* Per-connection upload state. */
typedef struct upload {
    char *buf;
    size_t len, cap;
    int too_large;
    double t0;
} upload;

/* ---- answers --------------------------------------------------------------------- */

static void reply_json(hreq *r, int status, cJSON *obj)
{
    char *txt = obj ? cJSON_PrintUnformatted(obj) : NULL;
    cJSON_Delete(obj);
    free(r->out);
    r->out = txt;
    r->out_static = NULL;
    if (!txt) {
        static const char oom[] = "{\"error\":\"out of memory\",\"status\":500}";
        r->out_static = (const unsigned char *)oom;
        r->out_len = sizeof oom - 1;
        status = 500;
    } else {
        r->out_len = strlen(txt);
    }
    r->status = status;
    r->mime = "application/json";
}

static int reply_error(hreq *r, int status, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));
static int reply_error(hreq *r, int status, const char *fmt, ...)
{
    char msg[512];
    va_list ap;
    cJSON *o = cJSON_CreateObject();
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    if (o && (!cJSON_AddStringToObject(o, "error", msg) ||
              !cJSON_AddNumberToObject(o, "status", status))) {
        cJSON_Delete(o);
        o = NULL;
    }
    reply_json(r, status, o);
    return r->status;
}

/* The HTTP status for a library status code. */
static int http_status(int rc)
{
    switch (rc) {
    case CLIPDB_EINVAL: return 400;
    case CLIPDB_ENOTFOUND: return 404;
    case CLIPDB_EFORMAT: return 422;
    case CLIPDB_ELIMIT: return 413;
    case CLIPDB_EMISMATCH: return 409;
    default: return 500;
    }
}

/* ---- worker slots ------------------------------------------------------------------ */

static slot *slot_get(clipdb_server *s)
{
    slot *sl;
    pthread_mutex_lock(&s->slot_mu);
    while (s->n_free == 0) pthread_cond_wait(&s->slot_cv, &s->slot_mu);
    sl = &s->slots[s->free_slots[--s->n_free]];
    pthread_mutex_unlock(&s->slot_mu);
    return sl;
}

static void slot_put(clipdb_server *s, slot *sl)
{
    pthread_mutex_lock(&s->slot_mu);
    s->free_slots[s->n_free++] = (int)(sl - s->slots);
    pthread_cond_signal(&s->slot_cv);
    pthread_mutex_unlock(&s->slot_mu);
}

/* ---- JSON of results (the objects of `clipdb search --json`) ------------------------- */

static cJSON *result_json(const clipdb_result *x, int with_score)
{
    cJSON *o = cJSON_CreateObject(), *meta, *it;
    int ok = o != NULL;
    if (!ok) return NULL;
    ok &= cJSON_AddNumberToObject(o, "id", (double)x->id) != NULL;
    ok &= cJSON_AddStringToObject(o, "type", x->type == CLIPDB_ITEM_TEXT ? "text" : "image") !=
          NULL;
    if (x->path) ok &= cJSON_AddStringToObject(o, "path", x->path) != NULL;
    if (x->abspath) ok &= cJSON_AddStringToObject(o, "abspath", x->abspath) != NULL;
    if (x->text) ok &= cJSON_AddStringToObject(o, "text", x->text) != NULL;
    if (x->image >= 0) ok &= cJSON_AddNumberToObject(o, "image", (double)x->image) != NULL;
    /* the metadata fields, at the top level as the CLI prints them */
    meta = x->meta_json ? cJSON_Parse(x->meta_json) : NULL;
    for (it = meta ? meta->child : NULL; ok && it; it = it->next)
        if (!cJSON_GetObjectItemCaseSensitive(o, it->string))
            ok &= cJSON_AddItemToObject(o, it->string, cJSON_Duplicate(it, 1));
    cJSON_Delete(meta);
    if (with_score) ok &= cJSON_AddNumberToObject(o, "score", (double)x->score) != NULL;
    if (!ok) {
        cJSON_Delete(o);
        return NULL;
    }
    return o;
}

/* ---- request parameters ---------------------------------------------------------------- */

/* A string field: a JSON string, or (from a form) the same. */
static const char *param_str(cJSON *obj, const char *key)
{
    cJSON *v = cJSON_GetObjectItemCaseSensitive(obj, key);
    return cJSON_IsString(v) ? v->valuestring : NULL;
}

/* An integer field given as a number or a decimal string; 0 absent (keeps
** *out), 1 set, -1 bad or out of [lo, hi]. */
static int param_int(cJSON *obj, const char *key, long long lo, long long hi, long long *out)
{
    cJSON *v = cJSON_GetObjectItemCaseSensitive(obj, key);
    long long x;
    char *end;
    if (!v || cJSON_IsNull(v)) return 0;
    if (cJSON_IsNumber(v)) {
        double d = v->valuedouble;
        if (!(d >= (double)lo && d <= (double)hi) || d != (double)(long long)d) return -1;
        x = (long long)d;
    } else if (cJSON_IsString(v) && v->valuestring[0]) {
        errno = 0;
        x = strtoll(v->valuestring, &end, 10);
        if (errno || *end || x < lo || x > hi) return -1;
    } else {
        return -1;
    }
    *out = x;
    return 1;
}

/* The integer parameter `key` of a search into *field: kept when absent;
** outside [lo, hi] (or not an integer) a 400 naming the range. 0, or the
** HTTP status already replied. */
static int search_int(hreq *r, cJSON *p, const char *key, long long lo, long long hi, int *field)
{
    long long v = *field;
    if (param_int(p, key, lo, hi, &v) < 0)
        return reply_error(r, 400, "'%s' must be an integer from %lld to %lld", key, lo, hi);
    *field = (int)v;
    return 0;
}

/* The parameter `key` naming one of n choices into *field (values[i] for
** names[i]): kept when absent; anything else (a non-string too) a 400
** listing the names. 0, or the HTTP status already replied. */
static int search_choice(hreq *r, cJSON *p, const char *key, const char *const *names,
                         const int *values, int n, int *field)
{
    const char *sv = param_str(p, key);
    char list[128] = "";
    size_t at = 0;
    int i;
    if (!sv && !cJSON_GetObjectItemCaseSensitive(p, key)) return 0;
    for (i = 0; sv && i < n; i++)
        if (!strcmp(sv, names[i])) {
            *field = values[i];
            return 0;
        }
    for (i = 0; i < n && at < sizeof list; i++)
        at += (size_t)snprintf(list + at, sizeof list - at, "%s%s", names[i],
                               i + 2 < n ? ", " : i + 2 == n ? " or " : "");
    return reply_error(r, 400, "'%s' is %s", key, list);
}

/* Turns a multipart body into a JSON object of its text fields (a repeated
** field becomes an array) and the file part named `file_field`. */
static int form_to_json(hreq *r, const char *ct, const char *file_field, cJSON **obj,
                        const cdb_part **file, cdb_part *parts)
{
    char boundary[CDB_HTTP_MAX_BOUNDARY + 1], err[160];
    int n, i;
    *obj = NULL;
    *file = NULL;
    if (cdb_multipart_boundary(ct, boundary, sizeof boundary))
        return reply_error(r, 400, "multipart/form-data needs a boundary of 1 to %d characters",
                           CDB_HTTP_MAX_BOUNDARY);
    n = cdb_multipart_parse((const unsigned char *)r->body, r->len, boundary, parts,
                            CDB_HTTP_MAX_PARTS, err, sizeof err);
    if (n < 0) return reply_error(r, 400, "%s", err);
    if (!(*obj = cJSON_CreateObject())) return reply_error(r, 500, "out of memory");
    for (i = 0; i < n; i++) {
        const cdb_part *p = &parts[i];
        cJSON *old, *v;
        char *txt;
        if (!strcmp(p->name, file_field)) {
            if (*file) return reply_error(r, 400, "more than one '%s' file", file_field);
            *file = p;
            continue;
        }
        if (p->len > CDB_HTTP_MAX_QUERY_TEXT)
            return reply_error(r, 413, "form field '%s' is over %d bytes", p->name,
                               CDB_HTTP_MAX_QUERY_TEXT);
        if (memchr(p->data, '\0', p->len))
            return reply_error(r, 400, "form field '%s' holds a NUL byte", p->name);
        if (!(txt = malloc(p->len + 1))) return reply_error(r, 500, "out of memory");
        memcpy(txt, p->data, p->len);
        txt[p->len] = '\0';
        v = cJSON_CreateString(txt);
        free(txt);
        if (!v) return reply_error(r, 500, "out of memory");
        old = cJSON_GetObjectItemCaseSensitive(*obj, p->name);
        if (!old) {
            cJSON_AddItemToObject(*obj, p->name, v);
        } else if (cJSON_IsArray(old)) {
            cJSON_AddItemToArray(old, v);
        } else {
            cJSON *arr = cJSON_CreateArray();
            if (!arr) {
                cJSON_Delete(v);
                return reply_error(r, 500, "out of memory");
            }
            cJSON_AddItemToArray(arr, cJSON_Duplicate(old, 1));
            cJSON_AddItemToArray(arr, v);
            cJSON_ReplaceItemInObjectCaseSensitive(*obj, p->name, arr);
        }
    }
    return 0;
}

/* The request body as a JSON object (application/json) or a form
** (multipart/form-data). 0, or the HTTP status already replied. */
static int body_params(hreq *r, const char *file_field, cJSON **obj, const cdb_part **file,
                       cdb_part *parts)
{
    const char *ct = MHD_lookup_connection_value(r->conn, MHD_HEADER_KIND, "Content-Type");
    char err[160];
    *obj = NULL;
    *file = NULL;
    if (ct && !strncasecmp(ct, "multipart/form-data", 19))
        return form_to_json(r, ct, file_field, obj, file, parts);
    if (!ct || strncasecmp(ct, "application/json", 16))
        return reply_error(r, 415, "send application/json or multipart/form-data");
    if (!(*obj = cdb_json_parse_body(r->body, r->len, err, sizeof err)))
        return reply_error(r, r->len > CDB_HTTP_MAX_JSON ? 413 : 400, "%s", err);
    return 0;
}

/* ---- handlers ------------------------------------------------------------------------ */

static int h_healthz(hreq *r)
{
    cJSON *o = cJSON_CreateObject();
    if (o) cJSON_AddStringToObject(o, "status", "ok");
    reply_json(r, 200, o);
    return 200;
}

static const char *target_name(int t)
{
    return t == CLIPDB_ITEM_TEXT ? "text" : "image";
}

static int h_stats(hreq *r)
{
    clipdb_db_stats st;
    cJSON *o, *arr, *sets;
    int rc = clipdb_db_get_stats(r->sl->db, &st), i;
    if (rc != CLIPDB_OK) return reply_error(r, 500, "%s", clipdb_db_errmsg(r->sl->db));
    o = cJSON_CreateObject();
    if (!o) {
        clipdb_db_stats_free(&st);
        return reply_error(r, 500, "out of memory");
    }
    cJSON_AddStringToObject(o, "version", CLIPDB_VERSION);
    cJSON_AddStringToObject(o, "path", st.path ? st.path : "");
    cJSON_AddStringToObject(o, "model", st.model ? st.model : "");
    cJSON_AddNumberToObject(o, "embed_dim", st.embed_dim);
    cJSON_AddNumberToObject(o, "format_version", st.format_version);
    cJSON_AddNumberToObject(o, "images", (double)st.images);
    cJSON_AddNumberToObject(o, "texts", (double)st.texts);
    cJSON_AddNumberToObject(o, "captions", (double)st.captions);
    cJSON_AddNumberToObject(o, "vectors", (double)st.vectors);
    arr = cJSON_AddArrayToObject(o, "indexes");
    for (i = 0; arr && i < st.n_indexes; i++) {
        const clipdb_db_index_info *x = &st.indexes[i];
        cJSON *e = cJSON_CreateObject();
        if (!e) break;
        cJSON_AddStringToObject(e, "kind", x->kind);
        if (x->factory) cJSON_AddStringToObject(e, "factory", x->factory);
        cJSON_AddStringToObject(e, "target", target_name(x->target));
        cJSON_AddStringToObject(e, "metric", clipdb_metric_name(x->metric));
        cJSON_AddNumberToObject(e, "nlist", x->nlist);
        cJSON_AddNumberToObject(e, "n_vectors", (double)x->n_vectors);
        cJSON_AddItemToArray(arr, e);
    }
    /* The vector sets, base first; the page shows the "fine-tuned or not"
    ** switch only when this lists two or more. "sets" has the details. */
    sets = cJSON_AddArrayToObject(o, "vector_sets");
    for (i = 0; sets && i < st.n_sets; i++)
        cJSON_AddItemToArray(sets, cJSON_CreateString(st.sets[i].name));
    arr = cJSON_AddArrayToObject(o, "sets");
    for (i = 0; arr && i < st.n_sets; i++) {
        const clipdb_db_set_info *x = &st.sets[i];
        cJSON *e = cJSON_CreateObject();
        if (!e) break;
        cJSON_AddStringToObject(e, "name", x->name);
        cJSON_AddStringToObject(e, "model", x->model ? x->model : "");
        cJSON_AddStringToObject(e, "precision", x->precision);
        cJSON_AddNumberToObject(e, "dim", x->dim);
        cJSON_AddNumberToObject(e, "images", (double)x->images);
        cJSON_AddNumberToObject(e, "texts", (double)x->texts);
        cJSON_AddItemToArray(arr, e);
    }
    cJSON_AddBoolToObject(o, "readonly", r->s->opt.readonly);
    cJSON_AddBoolToObject(o, "writable", !r->s->opt.readonly && r->s->token);
    cJSON_AddNumberToObject(o, "max_k", CDB_HTTP_MAX_K);
    cJSON_AddNumberToObject(o, "max_upload_bytes", CDB_HTTP_MAX_UPLOAD);
    cJSON_AddNumberToObject(o, "max_image_pixels", (double)r->s->opt.max_image_pixels);
    cJSON_AddBoolToObject(o, "eval", 1);
    clipdb_db_stats_free(&st);
    reply_json(r, 200, o);
    return 200;
}

static int h_search(hreq *r)
{
    static const char *const target_names[] = {"image", "text"};
    static const int target_values[] = {CLIPDB_ITEM_IMAGE, CLIPDB_ITEM_TEXT};
    static const char *const index_names[] = {"exact", "ivf", "faiss"};
    static const int index_values[] = {CLIPDB_INDEX_EXACT, CLIPDB_INDEX_IVF, CLIPDB_INDEX_FAISS};
    cdb_part parts[CDB_HTTP_MAX_PARTS];
    const cdb_part *file = NULL;
    cJSON *p = NULL, *o = NULL, *arr, *w, *q;
    clipdb_search_options opt;
    clipdb_query query;
    clipdb_results *res = NULL;
    const char *where[CDB_HTTP_MAX_WHERE], *text, *sv;
    char wbuf[CDB_HTTP_MAX_WHERE][256];
    long long v = 0;
    int st, n_q = 0, rc, kind;
    size_t j;

    if ((st = body_params(r, "image", &p, &file, parts)) != 0) goto cleanup;
    memset(&query, 0, sizeof query);
    clipdb_search_options_init(&opt);
    text = param_str(p, "text");
    if (cJSON_GetObjectItemCaseSensitive(p, "text") && !text) {
        st = reply_error(r, 400, "'text' must be a string");
        goto cleanup;
    }
    if (text) {
        if (strlen(text) > CDB_HTTP_MAX_QUERY_TEXT) {
            st = reply_error(r, 413, "the text is over %d bytes", CDB_HTTP_MAX_QUERY_TEXT);
            goto cleanup;
        }
        query.kind = CLIPDB_QUERY_TEXT;
        query.text = text;
        n_q++;
    }
    if ((rc = param_int(p, "item", 0, INT64_MAX, &v)) != 0) {
        if (rc < 0) {
            st = reply_error(r, 400, "'item' must be an item id (a non-negative integer)");
            goto cleanup;
        }
        query.kind = CLIPDB_QUERY_ITEM;
        query.item = v;
        n_q++;
    }
    if (file) {
        if (file->len > CDB_HTTP_MAX_UPLOAD) {
            st = reply_error(r, 413, "the image is over %u bytes", CDB_HTTP_MAX_UPLOAD);
            goto cleanup;
        }
        if (file->len == 0) {
            st = reply_error(r, 422, "the uploaded image is empty");
            goto cleanup;
        }
        query.kind = CLIPDB_QUERY_IMAGE;
        query.data = file->data;
        query.len = file->len;
        n_q++;
    }
    if (n_q != 1) {
        st = reply_error(r, 400, "give exactly one of 'text', 'item' or an 'image' upload");
        goto cleanup;
    }
    if ((st = search_choice(r, p, "target", target_names, target_values, 2, &opt.target)) ||
        (st = search_int(r, p, "k", 1, CDB_HTTP_MAX_K, &opt.k)))
        goto cleanup;
    if ((sv = param_str(p, "metric")) || cJSON_GetObjectItemCaseSensitive(p, "metric")) {
        if (!sv || clipdb_metric_parse(sv, &opt.metric) != CLIPDB_OK) {
            st = reply_error(r, 400, "'metric' is cosine, dot or l2");
            goto cleanup;
        }
    }
    kind = (int)opt.index;
    if ((st = search_choice(r, p, "index", index_names, index_values, 3, &kind)) ||
        (st = search_int(r, p, "nprobe", 1, CDB_HTTP_MAX_NPROBE, &opt.nprobe)))
        goto cleanup;
    opt.index = (clipdb_index_kind)kind;
    /* the vector set: "space" (as the CLI's --space), or "vectors" (older
    ** pages); an unknown name is the search's 404 */
    if ((sv = param_str(p, "space")) || cJSON_GetObjectItemCaseSensitive(p, "space") ||
        (sv = param_str(p, "vectors")) || cJSON_GetObjectItemCaseSensitive(p, "vectors")) {
        if (!sv || !*sv || strlen(sv) > CLIPDB_VECTOR_SET_NAME_MAX) {
            st = reply_error(r, 400, "'space' is the name of a vector set (see /api/stats)");
            goto cleanup;
        }
        opt.vector_set = sv;
    }
    /* filters: ["FIELD=VALUE", ...], {"FIELD": VALUE, ...} or one string */
    w = cJSON_GetObjectItemCaseSensitive(p, "where");
    if (w && !cJSON_IsNull(w)) {
        cJSON *it;
        int n = 0;
        if (!cJSON_IsString(w) && !cJSON_IsArray(w) && !cJSON_IsObject(w)) {
            st = reply_error(r, 400, "'where' is a list of \"FIELD=VALUE\" or an object");
            goto cleanup;
        }
        for (it = cJSON_IsString(w) ? w : w->child; it; it = it == w ? NULL : it->next) {
            if (n >= CDB_HTTP_MAX_WHERE) {
                st = reply_error(r, 400, "at most %d filters", CDB_HTTP_MAX_WHERE);
                goto cleanup;
            }
            if (cJSON_IsObject(w)) {
                if (!it->string[0]) rc = -1;
                else if (cJSON_IsString(it))
                    rc = snprintf(wbuf[n], sizeof wbuf[n], "%s=%s", it->string, it->valuestring);
                else if (cJSON_IsNumber(it))
                    rc = snprintf(wbuf[n], sizeof wbuf[n], "%s=%.17g", it->string,
                                  it->valuedouble);
                else rc = -1;
            } else {
                rc = cJSON_IsString(it) && strchr(it->valuestring, '=') &&
                             it->valuestring[0] != '='
                         ? snprintf(wbuf[n], sizeof wbuf[n], "%s", it->valuestring)
                         : -1;
            }
            if (rc < 0 || (size_t)rc >= sizeof wbuf[n]) {
                st = reply_error(r, 400, "a filter is FIELD=VALUE (at most %zu bytes)",
                                 sizeof wbuf[n] - 1);
                goto cleanup;
            }
            where[n] = wbuf[n];
            n++;
        }
        opt.where = where;
        opt.n_where = n;
    }
    rc = clipdb_db_search(r->sl->db, &query, 1, &opt, &res);
    if (rc != CLIPDB_OK) {
        st = reply_error(r, http_status(rc), "%s", clipdb_db_errmsg(r->sl->db));
        goto cleanup;
    }
    o = cJSON_CreateObject();
    arr = o ? cJSON_AddArrayToObject(o, "results") : NULL;
    if (!arr) {
        st = reply_error(r, 500, "out of memory");
        goto cleanup;
    }
    for (j = res->offsets[0]; j < res->offsets[1]; j++) {
        cJSON *x = result_json(&res->results[j], 1);
        if (!x) {
            st = reply_error(r, 500, "out of memory");
            goto cleanup;
        }
        cJSON_AddItemToArray(arr, x);
    }
    cJSON_AddNumberToObject(o, "took_ms", res->took_ms);
    if ((q = cJSON_AddObjectToObject(o, "timings"))) {
        cJSON_AddNumberToObject(q, "encode_ms", res->encode_ms);
        cJSON_AddNumberToObject(q, "search_ms", res->took_ms - res->encode_ms);
        /* what exact search scanned: a compressed copy (re-ranked in fp32) or fp32 */
        cJSON_AddStringToObject(q, "scan", res->compressed ? res->compressed : "fp32");
    }
    if ((q = cJSON_AddObjectToObject(o, "query"))) {
        cJSON_AddStringToObject(q, "kind", query.kind == CLIPDB_QUERY_TEXT    ? "text"
                                           : query.kind == CLIPDB_QUERY_ITEM ? "item"
                                                                             : "image");
        if (query.kind == CLIPDB_QUERY_ITEM) cJSON_AddNumberToObject(q, "item", (double)query.item);
        cJSON_AddStringToObject(q, "target", target_name(opt.target));
        cJSON_AddNumberToObject(q, "k", opt.k);
        cJSON_AddStringToObject(q, "metric", clipdb_metric_name(opt.metric));
        cJSON_AddStringToObject(q, "index", opt.index == CLIPDB_INDEX_IVF     ? "ivf"
                                            : opt.index == CLIPDB_INDEX_FAISS ? "faiss"
                                                                              : "exact");
        if (opt.index == CLIPDB_INDEX_IVF) cJSON_AddNumberToObject(q, "nprobe", opt.nprobe);
        cJSON_AddStringToObject(q, "vectors",
                                opt.vector_set ? opt.vector_set : CLIPDB_VECTOR_SET_BASE);
    }
    if (res->note) cJSON_AddStringToObject(o, "note", res->note);
    reply_json(r, 200, o);
    o = NULL;
    st = 200;
cleanup:
    cJSON_Delete(o);
    cJSON_Delete(p);
    clipdb_results_free(res);
    return st;
}

static int h_item(hreq *r)
{
    clipdb_results *res = NULL;
    cJSON *o, *item, *caps;
    size_t j;
    int rc = clipdb_db_get_item(r->sl->db, r->id, &res);
    if (rc != CLIPDB_OK) return reply_error(r, http_status(rc), "%s", clipdb_db_errmsg(r->sl->db));
    o = cJSON_CreateObject();
    item = result_json(&res->results[0], 0);
    if (!o || !item) {
        cJSON_Delete(o);
        cJSON_Delete(item);
        clipdb_results_free(res);
        return reply_error(r, 500, "out of memory");
    }
    cJSON_AddItemToObject(o, "item", item);
    caps = cJSON_AddArrayToObject(o, "captions");
    for (j = 1; caps && j < res->offsets[1]; j++) {
        cJSON *x = result_json(&res->results[j], 0);
        if (x) cJSON_AddItemToArray(caps, x);
    }
    clipdb_results_free(res);
    reply_json(r, 200, o);
    return 200;
}

/* Reads the original file of image item r->id into *data (caller frees).
** Only files the database records are served, and only when the recorded
** absolute path is the real path: a symlink swapped in anywhere along it is
** refused. */
static int read_item_file(hreq *r, unsigned char **data, size_t *len)
{
    clipdb_results *res = NULL;
    char real[PATH_MAX];
    struct stat sb;
    unsigned char *buf = NULL;
    size_t got = 0;
    int fd = -1, st = 0, rc;
    const clipdb_result *x;

    *data = NULL;
    rc = clipdb_db_get_item(r->sl->db, r->id, &res);
    if (rc != CLIPDB_OK) return reply_error(r, http_status(rc), "%s", clipdb_db_errmsg(r->sl->db));
    x = &res->results[0];
    if (x->type != CLIPDB_ITEM_IMAGE || !x->abspath) {
        st = reply_error(r, 404, "item %lld is a text, not an image", (long long)r->id);
        goto cleanup;
    }
    if (!realpath(x->abspath, real) || strcmp(real, x->abspath)) {
        st = reply_error(r, 404, "the file of item %lld is gone or is not where it was added",
                         (long long)r->id);
        goto cleanup;
    }
    fd = open(x->abspath, O_RDONLY | O_NOFOLLOW | O_CLOEXEC);
    if (fd < 0 || fstat(fd, &sb) || !S_ISREG(sb.st_mode)) {
        st = reply_error(r, 404, "the file of item %lld cannot be read", (long long)r->id);
        goto cleanup;
    }
    if ((uint64_t)sb.st_size > CDB_HTTP_MAX_FILE) {
        st = reply_error(r, 413, "the file of item %lld is over %u bytes", (long long)r->id,
                         CDB_HTTP_MAX_FILE);
        goto cleanup;
    }
    buf = malloc((size_t)sb.st_size + 1);
    if (!buf) {
        st = reply_error(r, 500, "out of memory");
        goto cleanup;
    }
    while (got < (size_t)sb.st_size) {
        ssize_t n = read(fd, buf + got, (size_t)sb.st_size - got);
        if (n <= 0) break;
        got += (size_t)n;
    }
    *data = buf;
    *len = got;
    buf = NULL;
cleanup:
    if (fd >= 0) close(fd);
    free(buf);
    clipdb_results_free(res);
    return st;
}

static const char *image_mime(const unsigned char *d, size_t n)
{
    if (n >= 3 && d[0] == 0xFF && d[1] == 0xD8 && d[2] == 0xFF) return "image/jpeg";
    if (n >= 8 && !memcmp(d, "\x89PNG\r\n\x1a\n", 8)) return "image/png";
    if (n >= 12 && !memcmp(d, "RIFF", 4) && !memcmp(d + 8, "WEBP", 4)) return "image/webp";
    if (n >= 6 && (!memcmp(d, "GIF87a", 6) || !memcmp(d, "GIF89a", 6))) return "image/gif";
    if (n >= 2 && d[0] == 'B' && d[1] == 'M') return "image/bmp";
    return NULL;
}

static int h_item_image(hreq *r)
{
    unsigned char *data;
    size_t len = 0;
    int st = read_item_file(r, &data, &len);
    const char *mime;
    if (st) return st;
    mime = image_mime(data, len);
    r->out = (char *)data;
    r->out_len = len;
    r->mime = mime ? mime : "application/octet-stream";
    r->cache = "private, max-age=3600";
    r->status = 200;
    return 200;
}

typedef struct jpeg_buf {
    unsigned char *p;
    size_t len, cap;
    int failed;
} jpeg_buf;

static void jpeg_sink(void *ctx, void *data, int size)
{
    jpeg_buf *b = ctx;
    if (b->failed || size <= 0) return;
    if (cdb_grow((void **)&b->p, &b->cap, b->len + (size_t)size, 1)) {
        b->failed = 1;
        return;
    }
    memcpy(b->p + b->len, data, (size_t)size);
    b->len += (size_t)size;
}

/* The thumbnail: the image as the model sees it (resized and centre-cropped
** to S x S), un-normalised back to RGB and written as JPEG. */
static int make_thumb(hreq *r, unsigned char **jpeg, size_t *len)
{
    static const float mean[3] = {0.48145466f, 0.4578275f, 0.40821073f};
    static const float stdv[3] = {0.26862954f, 0.26130258f, 0.27577711f};
    clipdb_server *s = r->s;
    unsigned char *data = NULL, *rgb = NULL;
    size_t n = 0, S = (size_t)s->image_size, i;
    jpeg_buf b = {0};
    int st = read_item_file(r, &data, &n), c;
    if (st) return st;
    if (clipdb_image_load_memory(r->sl->ctx, data, n, r->sl->pixels) != CLIPDB_OK) {
        st = reply_error(r, 422, "item %lld: %s", (long long)r->id, clipdb_ctx_errmsg(r->sl->ctx));
        goto cleanup;
    }
    rgb = malloc(S * S * 3);
    if (!rgb) {
        st = reply_error(r, 500, "out of memory");
        goto cleanup;
    }
    // pixels (3, S, S) channel-major, normalised -> rgb (S, S, 3) bytes
    for (c = 0; c < 3; c++)
        for (i = 0; i < S * S; i++) {
            float v = (r->sl->pixels[(size_t)c * S * S + i] * stdv[c] + mean[c]) * 255.0f + 0.5f;
            rgb[i * 3 + (size_t)c] = (unsigned char)(v < 0 ? 0 : v > 255 ? 255 : v);
        }
    if (!stbi_write_jpg_to_func(jpeg_sink, &b, (int)S, (int)S, 3, rgb, 85) || b.failed) {
        st = reply_error(r, 500, "could not write the thumbnail");
        goto cleanup;
    }
    *jpeg = b.p;
    *len = b.len;
    b.p = NULL;
cleanup:
    free(b.p);
    free(rgb);
    free(data);
    return st;
}

static int h_item_thumb(hreq *r)
{
    clipdb_server *s = r->s;
    thumb *t = &s->thumbs[(uint64_t)r->id % CDB_HTTP_THUMB_CACHE];
    unsigned char *jpeg = NULL;
    size_t len = 0;
    int st;
    pthread_mutex_lock(&s->thumb_mu);
    if (t->id == r->id && (r->out = malloc(t->len))) {
        memcpy(r->out, t->jpeg, t->len);
        r->out_len = t->len;
    }
    pthread_mutex_unlock(&s->thumb_mu);
    if (!r->out) {
        if ((st = make_thumb(r, &jpeg, &len)) != 0) return st;
        r->out = malloc(len);
        if (!r->out) {
            free(jpeg);
            return reply_error(r, 500, "out of memory");
        }
        memcpy(r->out, jpeg, len);
        r->out_len = len;
        pthread_mutex_lock(&s->thumb_mu);
        free(t->jpeg);
        t->jpeg = jpeg;
        t->len = len;
        t->id = r->id;
        pthread_mutex_unlock(&s->thumb_mu);
    }
    r->mime = "image/jpeg";
    r->cache = "private, max-age=3600";
    r->status = 200;
    return 200;
}

static void thumb_forget(clipdb_server *s, int64_t id)
{
    thumb *t = &s->thumbs[(uint64_t)id % CDB_HTTP_THUMB_CACHE];
    pthread_mutex_lock(&s->thumb_mu);
    if (t->id == id) {
        free(t->jpeg);
        t->jpeg = NULL;
        t->id = -1;
    }
    pthread_mutex_unlock(&s->thumb_mu);
}

/* Constant-time comparison: the time depends on the length of the secret
** only, never on where the guess differs. */
static int token_ok(const char *secret, const char *given)
{
    size_t ls = strlen(secret), lg = given ? strlen(given) : 0, i;
    unsigned d = (unsigned)(ls != lg);
    for (i = 0; i < ls; i++) d |= (unsigned char)secret[i] ^ (unsigned char)(i < lg ? given[i] : 0);
    return given && d == 0;
}

/* 0 when the request may write; else the status replied. */
static int check_write(hreq *r)
{
    const char *auth = MHD_lookup_connection_value(r->conn, MHD_HEADER_KIND, "Authorization");
    if (r->s->opt.readonly) return reply_error(r, 403, "the server is read-only (--read-only)");
    if (!r->s->token)
        return reply_error(r, 403, "writes are disabled: start the server with --token");
    if (!auth || strncmp(auth, "Bearer ", 7) || !token_ok(r->s->token, auth + 7))
        return reply_error(r, 401, "writes need 'Authorization: Bearer TOKEN'");
    return 0;
}

static int write_file(const char *path, const void *data, size_t len)
{
    int fd = open(path, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC | O_NOFOLLOW, 0644);
    size_t done = 0;
    if (fd < 0) return -1;
    while (done < len) {
        ssize_t n = write(fd, (const char *)data + done, len - done);
        if (n <= 0) break;
        done += (size_t)n;
    }
    return (close(fd) || done != len) ? -1 : 0;
}

/* Removes an upload folder the server made (files directly in it). */
static void remove_upload(const char *dir)
{
    static const char *const names[] = {"image.jpg", "image.png", "image.webp", "image.gif",
                                        "image.bmp", "captions.jsonl", "texts.txt"};
    size_t i;
    for (i = 0; i < sizeof names / sizeof names[0]; i++) {
        char *p = cdb_path_join(dir, names[i]);
        if (p) unlink(p);
        free(p);
    }
    rmdir(dir);
}

static int h_item_add(hreq *r)
{
    clipdb_server *s = r->s;
    cdb_part parts[CDB_HTTP_MAX_PARTS];
    const cdb_part *file = NULL;
    cJSON *p = NULL, *caps = NULL, *line = NULL, *o;
    clipdb_add_options aopt;
    clipdb_add_result ares;
    char *dir = NULL, *img = NULL, *capf = NULL, *txtf = NULL, *js = NULL;
    const char *text, *mime;
    int st, rc, locked = 0, n_caps = 0;

    if ((st = check_write(r)) != 0) return st;
    if ((st = body_params(r, "image", &p, &file, parts)) != 0) goto cleanup;
    text = param_str(p, "text");
    if (!file == !text) {
        st = reply_error(r, 400, "give either an 'image' upload (with 'caption' fields) or a "
                                 "'text'");
        goto cleanup;
    }
    clipdb_add_options_init(&aopt);
    dir = cdb_sprintf("%s/XXXXXX", s->upload_dir);
    if (!dir) {
        st = reply_error(r, 500, "out of memory");
        goto cleanup;
    }
    if (mkdir(s->upload_dir, 0755) && errno != EEXIST) {
        st = reply_error(r, 507, "cannot create %s: %s", s->upload_dir, strerror(errno));
        goto cleanup;
    }
    if (text) {
        if (strlen(text) > CDB_HTTP_MAX_QUERY_TEXT || strpbrk(text, "\r\n")) {
            st = reply_error(r, 400, "a text is one line of at most %d bytes",
                             CDB_HTTP_MAX_QUERY_TEXT);
            goto cleanup;
        }
        if (!mkdtemp(dir) || !(txtf = cdb_path_join(dir, "texts.txt")) ||
            write_file(txtf, text, strlen(text))) {
            st = reply_error(r, 507, "cannot write the upload: %s", strerror(errno));
            goto cleanup;
        }
        aopt.texts_path = txtf;
    } else {
        cJSON *c = cJSON_GetObjectItemCaseSensitive(p, "caption"), *it;
        if (file->len > CDB_HTTP_MAX_UPLOAD) {
            st = reply_error(r, 413, "the image is over %u bytes", CDB_HTTP_MAX_UPLOAD);
            goto cleanup;
        }
        mime = image_mime(file->data, file->len);
        /* refuse what does not decode before anything is written; the slot's
        ** ctx has the upload limit only for this check (stored items'
        ** thumbnails are not limited) */
        rc = CLIPDB_EFORMAT;
        if (mime) {
            clipdb_ctx_set_max_image_pixels(r->sl->ctx, r->s->opt.max_image_pixels);
            rc = clipdb_image_load_memory(r->sl->ctx, file->data, file->len, r->sl->pixels);
            clipdb_ctx_set_max_image_pixels(r->sl->ctx, 0);
        }
        if (!mime || rc != CLIPDB_OK) {
            int code = mime && clipdb_ctx_errcode(r->sl->ctx) == CLIPDB_ELIMIT ? 413 : 422;
            st = reply_error(r, code, "the upload is not a readable image%s%s",
                             mime ? ": " : " (JPEG, PNG, WebP, GIF or BMP)",
                             mime ? clipdb_ctx_errmsg(r->sl->ctx) : "");
            goto cleanup;
        }
        caps = cJSON_CreateArray();
        if (!caps) {
            st = reply_error(r, 500, "out of memory");
            goto cleanup;
        }
        if (c && !cJSON_IsArray(c)) c = cJSON_IsString(c) ? c : NULL;
        for (it = c ? (cJSON_IsArray(c) ? c->child : c) : NULL; it;
             it = (cJSON_IsArray(c) ? it->next : NULL)) {
            if (!cJSON_IsString(it) || strpbrk(it->valuestring, "\r\n") ||
                !it->valuestring[0]) {
                st = reply_error(r, 400, "a caption is one non-empty line of text");
                goto cleanup;
            }
            if (++n_caps > CDB_HTTP_MAX_CAPTIONS) {
                st = reply_error(r, 400, "at most %d captions", CDB_HTTP_MAX_CAPTIONS);
                goto cleanup;
            }
            cJSON_AddItemToArray(caps, cJSON_CreateString(it->valuestring));
        }
        if (!mkdtemp(dir) ||
            !(img = cdb_sprintf("%s/image.%s", dir, strchr(mime, '/') + 1)) ||
            write_file(img, file->data, file->len)) {
            st = reply_error(r, 507, "cannot write the upload: %s", strerror(errno));
            goto cleanup;
        }
        aopt.images_dir = dir;
        if (n_caps) {
            line = cJSON_CreateObject();
            if (!line || !cJSON_AddStringToObject(line, "image", strrchr(img, '/') + 1)) {
                st = reply_error(r, 500, "out of memory");
                goto cleanup;
            }
            cJSON_AddItemToObject(line, "captions", caps);
            caps = NULL;
            if (!(js = cJSON_PrintUnformatted(line)) ||
                !(capf = cdb_path_join(dir, "captions.jsonl")) || write_file(capf, js, strlen(js))) {
                st = reply_error(r, 507, "cannot write the captions");
                goto cleanup;
            }
            aopt.captions_path = capf;
        }
    }
    aopt.batch_size = 1;
    aopt.decode_threads = 1;
    pthread_mutex_lock(&s->write_mu);
    locked = 1;
    rc = clipdb_db_add(r->sl->db, &aopt, &ares);
    if (rc != CLIPDB_OK) {
        st = reply_error(r, http_status(rc), "%s", clipdb_db_errmsg(r->sl->db));
        remove_upload(dir);
        goto cleanup;
    }
    if (ares.last_id < 0) {
        remove_upload(dir);
        st = text && ares.texts_unchanged
                 ? reply_error(r, 409, "this text is already stored")
                 : reply_error(r, 422, "nothing was added (the encoder refused the input)");
        goto cleanup;
    }
    eval_forget(s);
    o = cJSON_CreateObject();
    if (o) {
        cJSON_AddNumberToObject(o, "id", (double)ares.last_id);
        cJSON_AddStringToObject(o, "type", text ? "text" : "image");
        cJSON_AddNumberToObject(o, "captions", (double)ares.captions_added);
    }
    reply_json(r, 201, o);
    st = 201;
cleanup:
    if (locked) pthread_mutex_unlock(&s->write_mu);
    cJSON_Delete(p);
    cJSON_Delete(caps);
    cJSON_Delete(line);
    free(js);
    free(dir);
    free(img);
    free(capf);
    free(txtf);
    return st;
}

static int h_item_rm(hreq *r)
{
    int64_t n_items = 0, n_caps = 0;
    cJSON *o;
    int st, rc;
    if ((st = check_write(r)) != 0) return st;
    pthread_mutex_lock(&r->s->write_mu);
    rc = clipdb_db_rm(r->sl->db, &r->id, 1, &n_items, &n_caps);
    pthread_mutex_unlock(&r->s->write_mu);
    if (rc != CLIPDB_OK) return reply_error(r, http_status(rc), "%s", clipdb_db_errmsg(r->sl->db));
    thumb_forget(r->s, r->id);
    eval_forget(r->s);
    o = cJSON_CreateObject();
    if (o) {
        cJSON_AddNumberToObject(o, "deleted", (double)r->id);
        cJSON_AddNumberToObject(o, "captions", (double)n_caps);
    }
    reply_json(r, 200, o);
    return 200;
}

static int h_asset(hreq *r)
{
    const cdb_asset *a = r->name ? cdb_asset_find(r->name, r->name_len)
                                 : cdb_asset_find("index.html", 10);
    if (!a || !strcmp(a->name, "openapi.json"))
        return reply_error(r, 404, "no such page: %s", r->url);
    r->out_static = a->data;
    r->out_len = a->len;
    r->mime = a->mime;
    r->cache = "no-cache";
    r->status = 200;
    return 200;
}

static int h_openapi(hreq *r)
{
    const cdb_asset *a = cdb_asset_find("openapi.json", 12);
    if (!a) return reply_error(r, 404, "no OpenAPI document in this build");
    r->out_static = a->data;
    r->out_len = a->len;
    r->mime = "application/json";
    r->status = 200;
    return 200;
}

/* Forgets the cached evaluation (after a write). */
static void eval_forget(clipdb_server *s)
{
    pthread_mutex_lock(&s->eval_mu);
    clipdb_free(s->eval_json);
    clipdb_free(s->eval_html);
    s->eval_json = s->eval_html = NULL;
    pthread_mutex_unlock(&s->eval_mu);
}

/* Runs the evaluation (defaults of `clipdb eval`: every caption, R@1/5/10,
** the three metrics, the index comparison) unless it is cached. Called with
** eval_mu held; 0 or the status replied. */
static int eval_compute(hreq *r)
{
    static const int ks[] = {1, 5, 10};
    clipdb_server *s = r->s;
    clipdb_eval_options opt;
    clipdb_db_stats st;
    clipdb_eval *ev = NULL;
    int rc, i;
    if (s->eval_json) return 0;
    /* the defaults, with the cut-offs a small database can take */
    clipdb_eval_options_init(&opt);
    if (clipdb_db_get_stats(r->sl->db, &st) == CLIPDB_OK) {
        if (st.images > 0 && st.images < 10) {
            opt.n_ks = 0;
            for (i = 0; i < 3; i++)
                if (ks[i] <= st.images) opt.ks[opt.n_ks++] = ks[i];
            opt.index_k = (int)st.images;
        }
        clipdb_db_stats_free(&st);
    }
    rc = clipdb_eval_run(r->sl->db, &opt, &ev);
    if (rc == CLIPDB_OK) rc = clipdb_eval_json(ev, &s->eval_json);
    if (rc == CLIPDB_OK) rc = clipdb_eval_html(ev, &s->eval_html, &s->eval_html_len);
    if (rc != CLIPDB_OK) {
        /* a database that cannot be evaluated (no captions, say) is a state,
        ** not a bad request */
        reply_error(r, rc == CLIPDB_EINVAL ? 409 : http_status(rc), "evaluation: %s",
                    ev ? clipdb_eval_errmsg(ev) : "out of memory");
        clipdb_free(s->eval_json);
        clipdb_free(s->eval_html);
        s->eval_json = s->eval_html = NULL;
    }
    clipdb_eval_free(ev);
    return rc == CLIPDB_OK ? 0 : r->status;
}

static int h_eval(hreq *r)
{
    int st;
    pthread_mutex_lock(&r->s->eval_mu);
    st = eval_compute(r);
    if (!st) {
        r->out = cdb_strdup(r->s->eval_json);
        if (r->out) {
            r->out_len = strlen(r->out);
            r->mime = "application/json";
            r->status = st = 200;
        }
    }
    pthread_mutex_unlock(&r->s->eval_mu);
    if (!st) return reply_error(r, 500, "out of memory");
    return st;
}

/* The self-contained HTML report (tables, plots and samples inline as data:
** URIs), framed by the page's evaluation tab. */
static int h_eval_report(hreq *r)
{
    int st;
    pthread_mutex_lock(&r->s->eval_mu);
    st = eval_compute(r);
    if (!st && (r->out = malloc(r->s->eval_html_len + 1))) {
        memcpy(r->out, r->s->eval_html, r->s->eval_html_len);
        r->out_len = r->s->eval_html_len;
        r->mime = "text/html; charset=utf-8";
        r->csp = "default-src 'none'; img-src data:; style-src 'unsafe-inline'; "
                 "frame-ancestors 'self'";
        r->status = st = 200;
    }
    pthread_mutex_unlock(&r->s->eval_mu);
    if (!st) return reply_error(r, 500, "out of memory");
    return st;
}

static int h_metrics(hreq *r);

/* ---- the routes table ------------------------------------------------------------------ */

#define R_DB 1     /* borrows a worker slot (database handle, context) */
#define R_BODY 2   /* reads a request body */

typedef struct route {
    const char *method;
    const char *pattern;
    int (*handler)(hreq *r);
    int flags;
    const char *summary;
} route;

static const route routes[] = {
    {"GET", "/healthz", h_healthz, 0, "liveness: {\"status\": \"ok\"}"},
    {"GET", "/metrics", h_metrics, R_DB, "Prometheus text: requests, latencies, errors, items"},
    {"GET", "/api/stats", h_stats, R_DB, "what the database holds; limits; vector sets"},
    {"GET", "/api/openapi.json", h_openapi, 0, "this API as OpenAPI 3"},
    {"POST", "/api/search", h_search, R_DB | R_BODY, "search by text, image upload or item"},
    {"POST", "/api/items", h_item_add, R_DB | R_BODY, "add an image (with captions) or a text"},
    {"GET", "/api/items/{id}", h_item, R_DB, "an item; an image's captions"},
    {"DELETE", "/api/items/{id}", h_item_rm, R_DB, "delete an item (with its captions)"},
    {"GET", "/api/items/{id}/image", h_item_image, R_DB, "the original image file"},
    {"GET", "/api/items/{id}/thumb", h_item_thumb, R_DB, "a JPEG thumbnail (cached)"},
    {"GET", "/api/eval", h_eval, R_DB, "the evaluation figures (as `clipdb eval --json`)"},
    {"GET", "/api/eval/report", h_eval_report, R_DB, "the evaluation report with its plots"},
    {"GET", "/", h_asset, 0, "the web page"},
    {"GET", "/{name}", h_asset, 0, "the page's assets"},
};
#define N_ROUTES ((int)(sizeof routes / sizeof routes[0]))

/* ---- metrics ------------------------------------------------------------------------- */

static void metric_add(clipdb_server *s, int ri, int status, double secs)
{
    int c, b;
    for (c = 0; c < N_CODES - 1 && codes[c] != status; c++) {}
    for (b = 0; b < N_BUCKETS && secs > buckets_s[b]; b++) {}
    pthread_mutex_lock(&s->metric_mu);
    s->count[ri * N_CODES + c]++;
    s->hist[ri * (N_BUCKETS + 1) + b]++;
    s->sum_s[ri] += secs;
    pthread_mutex_unlock(&s->metric_mu);
}

static int h_metrics(hreq *r)
{
    clipdb_server *s = r->s;
    clipdb_db_stats st;
    char *buf = NULL;
    size_t len = 0, cap = 0;
    int i, c, b;
    uint64_t errors = 0;
#define EMIT(...)                                                                         \
    do {                                                                                  \
        int n_ = snprintf(NULL, 0, __VA_ARGS__);                                          \
        if (n_ < 0 || cdb_grow((void **)&buf, &cap, len + (size_t)n_ + 1, 1)) goto oom;   \
        snprintf(buf + len, (size_t)n_ + 1, __VA_ARGS__);                                 \
        len += (size_t)n_;                                                                \
    } while (0)
    EMIT("# HELP clipdb_http_requests_total HTTP requests answered, by route and status.\n"
         "# TYPE clipdb_http_requests_total counter\n");
    pthread_mutex_lock(&s->metric_mu);
    for (i = 0; i <= N_ROUTES; i++)
        for (c = 0; c < N_CODES; c++) {
            uint64_t n = s->count[i * N_CODES + c];
            const char *pat = i < N_ROUTES ? routes[i].pattern : "unmatched";
            if (!n) continue;
            if (codes[c] >= 400 || codes[c] == 0) errors += n;
            if (codes[c])
                EMIT("clipdb_http_requests_total{method=\"%s\",route=\"%s\",code=\"%d\"} %llu\n",
                     i < N_ROUTES ? routes[i].method : "", pat, codes[c], (unsigned long long)n);
            else
                EMIT("clipdb_http_requests_total{method=\"%s\",route=\"%s\",code=\"other\"} %llu\n",
                     i < N_ROUTES ? routes[i].method : "", pat, (unsigned long long)n);
        }
    EMIT("# HELP clipdb_http_errors_total Requests answered with a 4xx or 5xx status.\n"
         "# TYPE clipdb_http_errors_total counter\nclipdb_http_errors_total %llu\n",
         (unsigned long long)errors);
    EMIT("# HELP clipdb_http_request_duration_seconds Time to answer, by route.\n"
         "# TYPE clipdb_http_request_duration_seconds histogram\n");
    for (i = 0; i <= N_ROUTES; i++) {
        uint64_t cum = 0;
        const char *pat = i < N_ROUTES ? routes[i].pattern : "unmatched";
        const char *m = i < N_ROUTES ? routes[i].method : "";
        for (b = 0; b <= N_BUCKETS; b++) cum += s->hist[i * (N_BUCKETS + 1) + b];
        if (!cum) continue;
        cum = 0;
        for (b = 0; b < N_BUCKETS; b++) {
            cum += s->hist[i * (N_BUCKETS + 1) + b];
            EMIT("clipdb_http_request_duration_seconds_bucket{method=\"%s\",route=\"%s\","
                 "le=\"%g\"} %llu\n", m, pat, buckets_s[b], (unsigned long long)cum);
        }
        cum += s->hist[i * (N_BUCKETS + 1) + N_BUCKETS];
        EMIT("clipdb_http_request_duration_seconds_bucket{method=\"%s\",route=\"%s\",le=\"+Inf\"}"
             " %llu\n", m, pat, (unsigned long long)cum);
        EMIT("clipdb_http_request_duration_seconds_sum{method=\"%s\",route=\"%s\"} %.6f\n", m,
             pat, s->sum_s[i]);
        EMIT("clipdb_http_request_duration_seconds_count{method=\"%s\",route=\"%s\"} %llu\n", m,
             pat, (unsigned long long)cum);
    }
    pthread_mutex_unlock(&s->metric_mu);
    if (clipdb_db_get_stats(r->sl->db, &st) == CLIPDB_OK) {
        const long long n_img = st.images, n_txt = st.texts, n_cap = st.captions;
        clipdb_db_stats_free(&st);
        EMIT("# HELP clipdb_items Items stored, by type.\n# TYPE clipdb_items gauge\n"
             "clipdb_items{type=\"image\"} %lld\nclipdb_items{type=\"text\"} %lld\n"
             "clipdb_items{type=\"caption\"} %lld\n",
             n_img, n_txt, n_cap);
    }
#undef EMIT
    r->out = buf;
    r->out_len = len;
    r->mime = "text/plain; version=0.0.4";
    r->status = 200;
    return 200;
oom:
    pthread_mutex_unlock(&s->metric_mu);
    free(buf);
    return reply_error(r, 500, "out of memory");
}

/* ---- dispatch -------------------------------------------------------------------------- */

/* Finds the route; *route_idx is N_ROUTES when none. Returns the status to
** answer when no handler runs (404, 405), else 0. */
static int route_find(hreq *r, int *route_idx)
{
    int i, path_known = 0;
    const char *m = !strcmp(r->method, "HEAD") ? "GET" : r->method;
    *route_idx = N_ROUTES;
    for (i = 0; i < N_ROUTES; i++) {
        int64_t id = -1;
        const char *name = NULL;
        size_t nl = 0;
        if (!cdb_route_match(routes[i].pattern, r->url, &id, &name, &nl)) continue;
        path_known = 1;
        if (strcmp(routes[i].method, m)) continue;
        r->id = id;
        r->name = name;
        r->name_len = nl;
        *route_idx = i;
        return 0;
    }
    return path_known ? 405 : 404;
}

static void add_common_headers(clipdb_server *s, struct MHD_Response *resp, const hreq *r)
{
    MHD_add_response_header(resp, "Content-Type", r->mime ? r->mime : "application/json");
    MHD_add_response_header(resp, "X-Content-Type-Options", "nosniff");
    MHD_add_response_header(resp, "X-Frame-Options", r->csp ? "SAMEORIGIN" : "DENY");
    MHD_add_response_header(resp, "Referrer-Policy", "no-referrer");
    MHD_add_response_header(resp, "Content-Security-Policy",
                            r->csp ? r->csp
                                   : "default-src 'self'; img-src 'self' blob: data:; "
                                     "style-src 'self'; script-src 'self'; frame-ancestors 'none'");
    MHD_add_response_header(resp, "Cache-Control", r->cache ? r->cache : "no-store");
    if (s->cors) {
        MHD_add_response_header(resp, "Access-Control-Allow-Origin", s->cors);
        MHD_add_response_header(resp, "Access-Control-Allow-Methods", "GET, POST, DELETE");
        MHD_add_response_header(resp, "Access-Control-Allow-Headers",
                                "Content-Type, Authorization");
        MHD_add_response_header(resp, "Vary", "Origin");
    }
}

static enum MHD_Result send_reply(clipdb_server *s, struct MHD_Connection *conn, hreq *r)
{
    struct MHD_Response *resp;
    enum MHD_Result ret;
    if (r->out) {
        resp = MHD_create_response_from_buffer(r->out_len, r->out, MHD_RESPMEM_MUST_FREE);
        if (resp) r->out = NULL;
    } else {
        resp = MHD_create_response_from_buffer(r->out_len, (void *)r->out_static,
                                               MHD_RESPMEM_PERSISTENT);
    }
    if (!resp) return MHD_NO;
    add_common_headers(s, resp, r);
    if (r->status == 405) {
        /* the methods this path takes */
        char allow[64] = "";
        int i;
        for (i = 0; i < N_ROUTES; i++)
            if (cdb_route_match(routes[i].pattern, r->url, NULL, NULL, NULL) &&
                strlen(allow) + strlen(routes[i].method) + 3 < sizeof allow) {
                if (allow[0]) strcat(allow, ", ");
                strcat(allow, routes[i].method);
            }
        MHD_add_response_header(resp, "Allow", allow);
    }
    if (r->status == 401) MHD_add_response_header(resp, "WWW-Authenticate", "Bearer");
    ret = MHD_queue_response(conn, (unsigned)r->status, resp);
    MHD_destroy_response(resp);
    return ret;
}

static void log_line(clipdb_server *s, const hreq *r, double secs)
{
    char line[CDB_HTTP_MAX_PATH + 128], path[200];
    size_t i;
    if (!s->opt.on_log) return;
    /* the path, cut and with control bytes replaced, so a log line stays one line */
    for (i = 0; r->url[i] && i < sizeof path - 1; i++)
        path[i] = (unsigned char)r->url[i] < 0x20 || r->url[i] == 0x7f ? '?' : r->url[i];
    path[i] = '\0';
    snprintf(line, sizeof line, "%s %s %d %.1fms", r->method, path, r->status, secs * 1000.0);
    s->opt.on_log(s->opt.log_arg, line);
}

static enum MHD_Result on_request(void *cls, struct MHD_Connection *conn, const char *url,
                                  const char *method, const char *version,
                                  const char *upload_data, size_t *upload_size, void **con_cls)
{
    clipdb_server *s = cls;
    upload *u = *con_cls;
    hreq r;
    int route_idx, st;
    double secs;
    enum MHD_Result ret;
    (void)version;

    memset(&r, 0, sizeof r);
    r.s = s;
    r.conn = conn;
    r.method = method;
    r.url = url;
    if (!u) {
        /* first call: headers only. Refuse an announced body over the cap
        ** before reading it. */
        const char *cl = MHD_lookup_connection_value(conn, MHD_HEADER_KIND, "Content-Length");
        if (!(u = calloc(1, sizeof *u))) return MHD_NO;
        u->t0 = cdb_now();
        *con_cls = u;
        if (cl) {
            char *end;
            unsigned long long n;
            errno = 0;
            n = strtoull(cl, &end, 10);
            if (errno || *end || n > CDB_HTTP_MAX_BODY) u->too_large = 1;
        }
        if (!u->too_large) return MHD_YES;
        reply_error(&r, 413, "the request body is over %u bytes", CDB_HTTP_MAX_BODY);
        metric_add(s, N_ROUTES, 413, cdb_now() - u->t0);
        log_line(s, &r, cdb_now() - u->t0);
        ret = send_reply(s, conn, &r);
        free(r.out);
        return ret;
    }
    if (*upload_size) {
        size_t n = *upload_size;
        if (!u->too_large) {
            if (u->len + n > CDB_HTTP_MAX_BODY) {
                u->too_large = 1;
                free(u->buf);
                u->buf = NULL;
                u->len = u->cap = 0;
            } else if (cdb_grow((void **)&u->buf, &u->cap, u->len + n + 1, 1)) {
                return MHD_NO;
            } else {
                memcpy(u->buf + u->len, upload_data, n);
                u->len += n;
                u->buf[u->len] = '\0';
            }
        }
        *upload_size = 0;
        return MHD_YES;
    }
    /* the whole request is here */
    r.body = u->buf ? u->buf : "";
    r.len = u->len;
    if (u->too_large) {
        route_idx = N_ROUTES;
        reply_error(&r, 413, "the request body is over %u bytes", CDB_HTTP_MAX_BODY);
    } else if (!strcmp(method, "OPTIONS") && s->cors) {
        route_idx = N_ROUTES;
        r.status = 204;
    } else if ((st = route_find(&r, &route_idx)) != 0) {
        if (st == 405) reply_error(&r, 405, "%s is not allowed on %s", method, url);
        else reply_error(&r, 404, "no such route: %s", url);
    } else if (r.len && !(routes[route_idx].flags & R_BODY)) {
        reply_error(&r, 400, "%s %s takes no request body", method, routes[route_idx].pattern);
    } else {
        if (routes[route_idx].flags & R_DB) r.sl = slot_get(s);
        routes[route_idx].handler(&r);
        if (r.sl) slot_put(s, r.sl);
    }
    secs = cdb_now() - u->t0;
    metric_add(s, route_idx, r.status, secs);
    log_line(s, &r, secs);
    ret = send_reply(s, conn, &r);
    free(r.out);
    return ret;
}

/* Decodes %XX in the URL as libmicrohttpd does, except that a URL holding
** %00 is left as it is (and so matches no route) instead of being cut at
** the NUL. */
static size_t unescape_url(void *cls, struct MHD_Connection *c, char *s)
{
    (void)cls;
    (void)c;
    if (strstr(s, "%00")) return strlen(s);
    return MHD_http_unescape(s);
}

static void on_completed(void *cls, struct MHD_Connection *conn, void **con_cls,
                         enum MHD_RequestTerminationCode toe)
{
    upload *u = *con_cls;
    (void)cls;
    (void)conn;
    (void)toe;
    if (!u) return;
    free(u->buf);
    free(u);
    *con_cls = NULL;
}

/* ---- start and stop ---------------------------------------------------------------------- */

void clipdb_server_options_init(clipdb_server_options *opt)
{
    memset(opt, 0, sizeof *opt);
    opt->bind = "127.0.0.1";
    opt->port = 8080;
    opt->threads = 4;
    opt->max_image_pixels = CLIPDB_SERVER_MAX_IMAGE_PIXELS;
}

/* Encodes one short text and one blank image on slot 0 before the first
** request, so that no user waits for the encoders' first use (oneDNN's code
** generation and the buffers' first allocation, global to the process):
** measured on the demo's database, a fresh server's first text query took
** 38-81 ms to encode and every later one 1-5 ms; after this, the first
** takes 1-2 ms too. A model that cannot encode fails the start here. */
static int warm_up(clipdb_server *s, int dim)
{
    const char *text = "a photo";
    slot *sl = &s->slots[0];
    float *v = cdb_malloc_array((size_t)(dim > 0 ? dim : 1), sizeof *v);
    int rc;
    if (!v) return cdb_err_set(&s->err, CLIPDB_ENOMEM, "out of memory");
    memset(sl->pixels, 0, clipdb_image_floats(s->model) * sizeof *sl->pixels);
    rc = clipdb_encode_texts(sl->ctx, &text, 1, v);
    if (rc == CLIPDB_OK) rc = clipdb_encode_images(sl->ctx, sl->pixels, 1, v);
    free(v);
    if (rc != CLIPDB_OK)
        return cdb_err_set(&s->err, rc, "the model failed a test encoding: %s",
                           clipdb_ctx_errmsg(sl->ctx));
    return CLIPDB_OK;
}

int clipdb_server_start(clipdb_server **out, const char *db_path, const clipdb_server_options *opt)
{
    clipdb_server_options def;
    clipdb_server *s;
    clipdb_db_options dopt;
    clipdb_model_info info;
    struct sockaddr_in addr;
    const union MHD_DaemonInfo *di;
    int rc = CLIPDB_OK, i;

    *out = s = calloc(1, sizeof *s);
    if (!s) return CLIPDB_ENOMEM;
    if (!opt) {
        clipdb_server_options_init(&def);
        opt = &def;
    }
    s->opt = *opt;
    if (!db_path) return cdb_err_set(&s->err, CLIPDB_EINVAL, "no database given");
    if (opt->threads < 1 || opt->threads > CLIPDB_SERVER_MAX_THREADS)
        return cdb_err_set(&s->err, CLIPDB_EINVAL, "threads must be 1 to %d, not %d",
                           CLIPDB_SERVER_MAX_THREADS, opt->threads);
    if (opt->port < 0 || opt->port > 65535)
        return cdb_err_set(&s->err, CLIPDB_EINVAL, "port must be 0 to 65535, not %d", opt->port);
    memset(&addr, 0, sizeof addr);
    addr.sin_family = AF_INET;
    addr.sin_port = htons((uint16_t)opt->port);
    if (inet_pton(AF_INET, opt->bind ? opt->bind : "127.0.0.1", &addr.sin_addr) != 1)
        return cdb_err_set(&s->err, CLIPDB_EINVAL, "bad bind address '%s' (an IPv4 address)",
                           opt->bind);
    if (opt->token && strlen(opt->token) < 8)
        return cdb_err_set(&s->err, CLIPDB_EINVAL, "the token must have at least 8 characters");
    s->db_path = cdb_strdup(db_path);
    s->upload_dir = opt->upload_dir ? cdb_strdup(opt->upload_dir)
                                    : cdb_sprintf("%s.uploads", db_path);
    s->token = opt->token ? cdb_strdup(opt->token) : NULL;
    s->cors = opt->cors_origin ? cdb_strdup(opt->cors_origin) : NULL;
    s->n_slots = opt->threads;
    s->slots = calloc((size_t)s->n_slots, sizeof *s->slots);
    s->free_slots = calloc((size_t)s->n_slots, sizeof *s->free_slots);
    s->thumbs = calloc(CDB_HTTP_THUMB_CACHE, sizeof *s->thumbs);
    s->count = calloc((size_t)(N_ROUTES + 1) * N_CODES, sizeof *s->count);
    s->hist = calloc((size_t)(N_ROUTES + 1) * (N_BUCKETS + 1), sizeof *s->hist);
    s->sum_s = calloc((size_t)N_ROUTES + 1, sizeof *s->sum_s);
    if (!s->db_path || !s->upload_dir || (opt->token && !s->token) ||
        (opt->cors_origin && !s->cors) || !s->slots || !s->free_slots || !s->thumbs ||
        !s->count || !s->hist || !s->sum_s)
        return cdb_err_set(&s->err, CLIPDB_ENOMEM, "out of memory");
    for (i = 0; i < CDB_HTTP_THUMB_CACHE; i++) s->thumbs[i].id = -1;
    pthread_mutex_init(&s->slot_mu, NULL);
    pthread_mutex_init(&s->write_mu, NULL);
    pthread_mutex_init(&s->metric_mu, NULL);
    pthread_mutex_init(&s->thumb_mu, NULL);
    pthread_mutex_init(&s->eval_mu, NULL);
    pthread_cond_init(&s->slot_cv, NULL);
    s->mutexes = 1;
    /* slot 0 opens the model; the others borrow it */
    for (i = 0; i < s->n_slots; i++) {
        slot *sl = &s->slots[i];
        clipdb_db_options_init(&dopt);
        dopt.readonly = opt->readonly;
        dopt.model_dir = opt->model_dir;
        dopt.model = s->model;
        dopt.max_image_pixels = opt->max_image_pixels; /* image queries */
        rc = clipdb_db_open(&sl->db, db_path, &dopt);
        if (rc == CLIPDB_OK && i == 0) {
            rc = clipdb_db_model(sl->db, &s->model);
            if (rc == CLIPDB_OK) {
                clipdb_model_get_info(s->model, &info);
                s->image_size = info.image_size;
            }
        }
        if (rc != CLIPDB_OK)
            return cdb_err_set(&s->err, rc, "%s", clipdb_db_errmsg(sl->db));
        if ((rc = clipdb_ctx_new(&sl->ctx, s->model)) != CLIPDB_OK)
            return cdb_err_set(&s->err, rc, "%s", clipdb_ctx_errmsg(sl->ctx));
        if (!(sl->pixels = cdb_malloc_array(clipdb_image_floats(s->model), sizeof(float))))
            return cdb_err_set(&s->err, CLIPDB_ENOMEM, "out of memory");
        s->free_slots[s->n_free++] = i;
    }
    if ((rc = warm_up(s, info.embed_dim)) != CLIPDB_OK) return rc;
    s->mhd = MHD_start_daemon(
        MHD_USE_INTERNAL_POLLING_THREAD | MHD_USE_EPOLL,
        (uint16_t)opt->port, NULL, NULL, on_request, s, MHD_OPTION_SOCK_ADDR,
        (struct sockaddr *)&addr, MHD_OPTION_THREAD_POOL_SIZE, (unsigned)opt->threads,
        MHD_OPTION_CONNECTION_TIMEOUT, (unsigned)CDB_HTTP_TIMEOUT_S,
        MHD_OPTION_CONNECTION_LIMIT, (unsigned)CDB_HTTP_MAX_CONNECTIONS,
        MHD_OPTION_PER_IP_CONNECTION_LIMIT, (unsigned)CDB_HTTP_MAX_PER_IP,
        MHD_OPTION_CONNECTION_MEMORY_LIMIT, (size_t)(64 << 10), MHD_OPTION_NOTIFY_COMPLETED,
        on_completed, s, MHD_OPTION_UNESCAPE_CALLBACK, unescape_url, s, MHD_OPTION_END);
    if (!s->mhd)
        return cdb_err_set(&s->err, CLIPDB_EIO, "cannot listen on %s:%d (in use, or not allowed)",
                           opt->bind ? opt->bind : "127.0.0.1", opt->port);
    di = MHD_get_daemon_info(s->mhd, MHD_DAEMON_INFO_BIND_PORT);
    s->port = di ? di->port : opt->port;
    return CLIPDB_OK;
}

int clipdb_server_port(const clipdb_server *s)
{
    return s ? s->port : 0;
}

const char *clipdb_server_errmsg(const clipdb_server *s)
{
    if (!s) return "out of memory";
    return s->err.code == CLIPDB_OK ? "no error" : s->err.msg;
}

void clipdb_server_stop(clipdb_server *s)
{
    int i;
    if (!s) return;
    if (s->mhd) MHD_stop_daemon(s->mhd);
    /* slot 0 owns the model the others borrow: close it last */
    for (i = s->n_slots - 1; s->slots && i >= 0; i--) {
        clipdb_ctx_free(s->slots[i].ctx);
        clipdb_db_close(s->slots[i].db);
        free(s->slots[i].pixels);
    }
    for (i = 0; s->thumbs && i < CDB_HTTP_THUMB_CACHE; i++) free(s->thumbs[i].jpeg);
    clipdb_free(s->eval_json);
    clipdb_free(s->eval_html);
    if (s->mutexes) {
        pthread_mutex_destroy(&s->slot_mu);
        pthread_mutex_destroy(&s->write_mu);
        pthread_mutex_destroy(&s->metric_mu);
        pthread_mutex_destroy(&s->thumb_mu);
        pthread_mutex_destroy(&s->eval_mu);
        pthread_cond_destroy(&s->slot_cv);
    }
    free(s->slots);
    free(s->free_slots);
    free(s->thumbs);
    free(s->count);
    free(s->hist);
    free(s->sum_s);
    free(s->db_path);
    free(s->upload_dir);
    free(s->token);
    free(s->cors);
    free(s);
}
