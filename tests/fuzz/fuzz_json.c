/* libFuzzer target: the bounded JSON body parser of the HTTP server. It
** must refuse what is too large or too deep before parsing, and hand back
** only objects. */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "server/http.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    char err[160];
    char *body = malloc(size ? size : 1);
    cJSON *j;
    if (!body) return 0;
    memcpy(body, data, size);
    err[0] = '\0';
    j = cdb_json_parse_body(body, size, err, sizeof err);
    if (j) {
        if (!cJSON_IsObject(j) || size > CDB_HTTP_MAX_JSON) abort();
        cJSON_Delete(j);
    } else if (!err[0]) {
        abort();
    }
    free(body);
    return 0;
}
