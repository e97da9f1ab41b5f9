/*
** parse.c: the parsers of outside input in the server: route patterns,
** multipart/form-data bodies and JSON bodies. Each is bounded (lengths,
** counts, depth) and never reads past the buffer it is given; the fuzz
** targets in tests/fuzz/ drive them directly.
*/
#include <stdio.h>
#include <string.h>
#include <strings.h>

#include "server/http.h"

/* ---- routes ------------------------------------------------------------------ */

static int parse_id(const char *s, size_t n, int64_t *out)
{
    uint64_t v = 0;
    size_t i;
    if (n == 0 || n > 19 || (n > 1 && s[0] == '0')) return 0;
    for (i = 0; i < n; i++) {
        if (s[i] < '0' || s[i] > '9') return 0;
        v = v * 10 + (uint64_t)(s[i] - '0');
    }
    if (v > (uint64_t)INT64_MAX) return 0;
    *out = (int64_t)v;
    return 1;
}

static int name_ok(const char *s, size_t n)
{
    size_t i;
    if (n == 0 || n > 128 || s[0] == '.') return 0;
    for (i = 0; i < n; i++) {
        char c = s[i];
        if (!((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') ||
              c == '.' || c == '_' || c == '-'))
            return 0;
    }
    return 1;
}

int cdb_route_match(const char *pattern, const char *path, int64_t *id, const char **name,
                    size_t *name_len)
{
    const char *p = pattern, *q = path;
    int segs = 0;
    if (!path || strnlen(path, CDB_HTTP_MAX_PATH + 1) > CDB_HTTP_MAX_PATH || *q != '/') return 0;
    while (*p && *q) {
        size_t pn, qn;
        if (*p != '/' || *q != '/') return 0;
        p++;
        q++;
        if (++segs > CDB_HTTP_MAX_SEGMENTS) return 0;
        pn = strcspn(p, "/");
        qn = strcspn(q, "/");
        if (pn == 4 && !strncmp(p, "{id}", 4)) {
            int64_t v;
            if (!parse_id(q, qn, &v)) return 0;
            if (id) *id = v;
        } else if (pn == 6 && !strncmp(p, "{name}", 6)) {
            if (!name_ok(q, qn)) return 0;
            if (name) *name = q;
            if (name_len) *name_len = qn;
        } else if (pn != qn || strncmp(p, q, pn)) {
            return 0;
        }
        p += pn;
        q += qn;
    }
    return *p == '\0' && *q == '\0';
}

/* ---- multipart ------------------------------------------------------------------ */

int cdb_multipart_boundary(const char *ct, char *out, size_t cap)
{
    const char *b;
    size_t n;
    if (!ct || strncasecmp(ct, "multipart/form-data", 19)) return -1;
    b = strcasestr(ct, "boundary=");
    if (!b) return -1;
    b += 9;
    if (*b == '"') {
        const char *e = strchr(++b, '"');
        if (!e) return -1;
        n = (size_t)(e - b);
    } else {
        n = strcspn(b, "; \t");
    }
    if (n == 0 || n > CDB_HTTP_MAX_BOUNDARY || n + 1 > cap) return -1;
    memcpy(out, b, n);
    out[n] = '\0';
    return 0;
}

/* memmem bounded to [h, h + hn) */
static const unsigned char *find(const unsigned char *h, size_t hn, const char *needle, size_t nn)
{
    return nn > hn ? NULL : memmem(h, hn, needle, nn);
}

/* Copies the value of `key="..."` (or key=token) from a Content-Disposition
** header line (line, n bytes) into out. 0 found, -1 absent or too long. */
static int header_param(const char *line, size_t n, const char *key, char *out, size_t cap)
{
    size_t kn = strlen(key), i, j;
    for (i = 0; i + kn + 1 <= n; i++) {
        if ((i == 0 || line[i - 1] == ' ' || line[i - 1] == ';' || line[i - 1] == '\t') &&
            !strncasecmp(line + i, key, kn) && line[i + kn] == '=') {
            i += kn + 1;
            if (i < n && line[i] == '"') {
                for (j = ++i; j < n && line[j] != '"'; j++) {}
                if (j >= n) return -1;
            } else {
                for (j = i; j < n && line[j] != ';' && line[j] != ' '; j++) {}
            }
            if (j - i + 1 > cap) return -1;
            memcpy(out, line + i, j - i);
            out[j - i] = '\0';
            return 0;
        }
    }
    return -1;
}

int cdb_multipart_parse(const unsigned char *body, size_t len, const char *boundary,
                        cdb_part *parts, int max_parts, char *err, size_t errcap)
{
    char delim[CDB_HTTP_MAX_BOUNDARY + 8];
    size_t dn, pos;
    const unsigned char *p;
    int n = 0;

#define FAIL(...)                              \
    do {                                       \
        snprintf(err, errcap, __VA_ARGS__);    \
        return -1;                             \
    } while (0)
    if (!boundary || !*boundary || strlen(boundary) > CDB_HTTP_MAX_BOUNDARY)
        FAIL("multipart: bad boundary");
    /* the first delimiter "--B" may start the body; later ones are "\r\n--B" */
    dn = (size_t)snprintf(delim, sizeof delim, "\r\n--%s", boundary);
    if (len >= dn - 2 && !memcmp(body, delim + 2, dn - 2)) pos = dn - 2;
    else {
        p = find(body, len, delim, dn);
        if (!p) FAIL("multipart: no boundary in the body");
        pos = (size_t)(p - body) + dn;
    }
    for (;;) {
        const unsigned char *hdr_end, *next;
        size_t hs;
        cdb_part *x;
        /* after a delimiter: "--" ends the body, else CRLF and a part */
        if (len - pos >= 2 && body[pos] == '-' && body[pos + 1] == '-') return n;
        while (pos < len && (body[pos] == ' ' || body[pos] == '\t')) pos++;
        if (len - pos < 2 || body[pos] != '\r' || body[pos + 1] != '\n')
            FAIL("multipart: bad delimiter line");
        pos += 2;
        if (n >= max_parts) FAIL("multipart: more than %d parts", max_parts);
        hdr_end = find(body + pos, len - pos < CDB_HTTP_MAX_PART_HEADER + 4
                                       ? len - pos : CDB_HTTP_MAX_PART_HEADER + 4,
                       "\r\n\r\n", 4);
        if (!hdr_end) FAIL("multipart: part %d: headers missing or over %d bytes", n + 1,
                           CDB_HTTP_MAX_PART_HEADER);
        x = &parts[n];
        memset(x, 0, sizeof *x);
        /* header lines */
        hs = pos;
        while (hs < (size_t)(hdr_end - body)) {
            const char *line = (const char *)body + hs;
            const unsigned char *eol = find(body + hs, (size_t)(hdr_end - body) + 2 - hs, "\r\n", 2);
            size_t ln = (size_t)(eol - body) - hs;
            if (ln >= 20 && !strncasecmp(line, "Content-Disposition:", 20)) {
                if (header_param(line, ln, "name", x->name, sizeof x->name))
                    FAIL("multipart: part %d: no field name (or over %zu bytes)", n + 1,
                         sizeof x->name - 1);
                if (header_param(line, ln, "filename", x->filename, sizeof x->filename) &&
                    find((const unsigned char *)line, ln, "filename=", 9))
                    FAIL("multipart: part %d: file name over %zu bytes", n + 1,
                         sizeof x->filename - 1);
            } else if (ln >= 13 && !strncasecmp(line, "Content-Type:", 13)) {
                size_t o = 13;
                while (o < ln && line[o] == ' ') o++;
                if (ln - o >= sizeof x->content_type) FAIL("multipart: part %d: long type", n + 1);
                memcpy(x->content_type, line + o, ln - o);
                x->content_type[ln - o] = '\0';
            }
            hs += ln + 2;
        }
        if (!x->name[0]) FAIL("multipart: part %d: no Content-Disposition name", n + 1);
        pos = (size_t)(hdr_end - body) + 4;
        next = find(body + pos, len - pos, delim, dn);
        if (!next) FAIL("multipart: part %d is not terminated", n + 1);
        x->data = body + pos;
        x->len = (size_t)(next - body) - pos;
        pos = (size_t)(next - body) + dn;
        n++;
    }
#undef FAIL
}

/* ---- JSON --------------------------------------------------------------------------- */

cJSON *cdb_json_parse_body(const char *body, size_t len, char *err, size_t errcap)
{
    size_t i;
    int depth = 0, in_str = 0;
    cJSON *j;
    if (len > CDB_HTTP_MAX_JSON) {
        snprintf(err, errcap, "JSON body over %u bytes", CDB_HTTP_MAX_JSON);
        return NULL;
    }
    /* nesting, counted outside strings, before the parser recurses; NULs */
    for (i = 0; i < len; i++) {
        char c = body[i];
        if (c == '\0') {
            snprintf(err, errcap, "NUL byte in the JSON body");
            return NULL;
        }
        if (in_str) {
            /* \u0000 would become a NUL inside cJSON's C strings: a text cut short */
            if (c == '\\' && len - i >= 6 && !memcmp(body + i + 1, "u0000", 5)) {
                snprintf(err, errcap, "\\u0000 (a NUL byte) in a JSON string");
                return NULL;
            }
            if (c == '\\') i++;
            else if (c == '"') in_str = 0;
        } else if (c == '"') {
            in_str = 1;
        } else if (c == '{' || c == '[') {
            if (++depth > CDB_HTTP_MAX_JSON_DEPTH) {
                snprintf(err, errcap, "JSON nested deeper than %d", CDB_HTTP_MAX_JSON_DEPTH);
                return NULL;
            }
        } else if (c == '}' || c == ']') {
            depth--;
        }
    }
    j = cJSON_ParseWithLength(body, len);
    if (!j) {
        snprintf(err, errcap, "malformed JSON");
        return NULL;
    }
    if (!cJSON_IsObject(j)) {
        cJSON_Delete(j);
        snprintf(err, errcap, "the JSON body must be an object");
        return NULL;
    }
    return j;
}

const cdb_asset *cdb_asset_find(const char *name, size_t len)
{
    int i;
    for (i = 0; i < cdb_n_assets; i++)
        if (strlen(cdb_assets[i].name) == len && !memcmp(cdb_assets[i].name, name, len))
            return &cdb_assets[i];
    return NULL;
}
