/* libFuzzer target: the multipart/form-data parser of the HTTP server. The
** first byte picks the boundary length; every part found must lie inside
** the body and carry a name. */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "server/http.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    char boundary[CDB_HTTP_MAX_BOUNDARY + 1], err[160], ct[128];
    cdb_part parts[CDB_HTTP_MAX_PARTS];
    unsigned char *body;
    size_t bn;
    int n, i;
    if (size < 1) return 0;
    bn = 1 + data[0] % 12;
    if (size - 1 < bn) return 0;
    memcpy(boundary, data + 1, bn);
    boundary[bn] = '\0';
    if (strlen(boundary) != bn) return 0;
    /* the Content-Type path too */
    memcpy(ct, "multipart/form-data; boundary=", 30);
    memcpy(ct + 30, boundary, bn + 1);
    {
        char b2[CDB_HTTP_MAX_BOUNDARY + 1];
        if (cdb_multipart_boundary(ct, b2, sizeof b2) == 0 && strchr(boundary, ';') == NULL &&
            strchr(boundary, ' ') == NULL && strchr(boundary, '\t') == NULL &&
            boundary[0] != '"' && strcmp(b2, boundary))
            abort();
    }
    /* a copy of exactly the body bytes, so ASan sees any overread */
    body = malloc(size - 1 - bn + 1);
    if (!body) return 0;
    memcpy(body, data + 1 + bn, size - 1 - bn);
    n = cdb_multipart_parse(body, size - 1 - bn, boundary, parts, CDB_HTTP_MAX_PARTS, err,
                            sizeof err);
    if (n > CDB_HTTP_MAX_PARTS) abort();
    if (n < 0 && !err[0]) abort();
    for (i = 0; i < n; i++) {
        if (!parts[i].name[0]) abort();
        if (parts[i].data < body || parts[i].data + parts[i].len > body + (size - 1 - bn)) abort();
    }
    free(body);
    return 0;
}
