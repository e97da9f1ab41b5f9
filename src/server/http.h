/*
** http.h: the server's internal parts: limits, the request parsers (route
** patterns, multipart/form-data, bounded JSON) that the fuzz targets drive,
** and the embedded web assets. Nothing here touches the network; server.c
** owns libmicrohttpd.
*/
#ifndef CDB_HTTP_H
#define CDB_HTTP_H

#include <stddef.h>
#include <stdint.h>

#include <cjson/cJSON.h>

/* ---- limits (every one a named constant) ---------------------------------- */
#define CDB_HTTP_MAX_BODY        (16u << 20) /* any request body, bytes */
#define CDB_HTTP_MAX_UPLOAD      (12u << 20) /* one uploaded image, bytes */
#define CDB_HTTP_MAX_JSON        (64u << 10) /* a JSON request body, bytes */
#define CDB_HTTP_MAX_JSON_DEPTH  8           /* nesting of arrays/objects */
#define CDB_HTTP_MAX_QUERY_TEXT  2048        /* a query or caption text, bytes */
#define CDB_HTTP_MAX_K           1000        /* results per search */
#define CDB_HTTP_MAX_NPROBE      65536
#define CDB_HTTP_MAX_WHERE       16          /* filters per search */
#define CDB_HTTP_MAX_PARTS       32          /* multipart parts */
#define CDB_HTTP_MAX_PART_HEADER 1024        /* one part's header block, bytes */
#define CDB_HTTP_MAX_BOUNDARY    70          /* RFC 2046 */
#define CDB_HTTP_MAX_CAPTIONS    32          /* captions of one uploaded image */
#define CDB_HTTP_MAX_PATH        1024        /* request path, bytes */
#define CDB_HTTP_MAX_SEGMENTS    8           /* path segments */
#define CDB_HTTP_TIMEOUT_S       30          /* idle client (slowloris) */
#define CDB_HTTP_MAX_CONNECTIONS 512
#define CDB_HTTP_MAX_PER_IP      256
#define CDB_HTTP_THUMB_CACHE     4096        /* thumbnails kept in memory */
#define CDB_HTTP_MAX_FILE        (64u << 20) /* an original image served, bytes */

/* ---- route patterns -------------------------------------------------------- */

/* Matches `path` against `pattern` ("/api/items/{id}/thumb"): literal
** segments must be equal; "{id}" matches a decimal id (0 .. INT64_MAX, no
** sign, no leading zeros) written to *id; "{name}" matches one segment of
** [A-Za-z0-9._-] not starting with '.' (its pointer and length to *name and *name_len).
** Returns 1 on a match, 0 otherwise. Paths longer than CDB_HTTP_MAX_PATH
** never match. */
int cdb_route_match(const char *pattern, const char *path, int64_t *id, const char **name,
                    size_t *name_len);

/* ---- multipart/form-data (RFC 7578) ----------------------------------------- */
typedef struct cdb_part {
    char name[128];          /* form field name */
    char filename[256];      /* "" when not a file */
    char content_type[128];  /* "" when absent */
    const unsigned char *data; /* points into the body */
    size_t len;
} cdb_part;

/* The boundary from a Content-Type value ("multipart/form-data;
** boundary=XYZ", quoted or not) into out (cap bytes). 0 or -1. */
int cdb_multipart_boundary(const char *content_type, char *out, size_t cap);

/* Splits body (len bytes) into at most max_parts parts. Returns the number of
** parts, or -1 for a malformed body (message in err, errcap bytes). */
int cdb_multipart_parse(const unsigned char *body, size_t len, const char *boundary,
                        cdb_part *parts, int max_parts, char *err, size_t errcap);

/* ---- JSON ------------------------------------------------------------------- */

/* Parses a JSON request body: refuses more than CDB_HTTP_MAX_JSON bytes and
** nesting deeper than CDB_HTTP_MAX_JSON_DEPTH before cJSON sees it, and
** anything but an object at the top. NULL on failure (reason in err). The
** caller frees with cJSON_Delete. */
cJSON *cdb_json_parse_body(const char *body, size_t len, char *err, size_t errcap);

/* ---- embedded assets (generated from web/ at build time) --------------------- */
typedef struct cdb_asset {
    const char *name;        /* "index.html" */
    const char *mime;
    const unsigned char *data;
    size_t len;
} cdb_asset;
extern const cdb_asset cdb_assets[];
extern const int cdb_n_assets;
const cdb_asset *cdb_asset_find(const char *name, size_t len);

#endif
