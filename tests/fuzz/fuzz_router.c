/* libFuzzer target: the route matcher of the HTTP server. The input is a
** request path; it is matched against every pattern shape the routes table
** uses. A match must give an id that prints back to the same segment. */
#include <inttypes.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "server/http.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    static const char *const patterns[] = {"/", "/healthz", "/api/items/{id}",
                                           "/api/items/{id}/thumb", "/{name}", "/api/{name}/{id}"};
    char *path = malloc(size + 1), buf[32];
    size_t i, nl;
    if (!path) return 0;
    memcpy(path, data, size);
    path[size] = '\0';
    for (i = 0; i < sizeof patterns / sizeof patterns[0]; i++) {
        int64_t id = -1;
        const char *name = NULL;
        nl = 0;
        if (!cdb_route_match(patterns[i], path, &id, &name, &nl)) continue;
        if (strstr(patterns[i], "{id}")) {
            if (id < 0) abort();
            snprintf(buf, sizeof buf, "%" PRId64, id);
            if (!strstr(path, buf)) abort();
        }
        if (strstr(patterns[i], "{name}")) {
            if (!name || nl == 0 || name < path || name + nl > path + strlen(path) || name[0] == '.')
                abort();
        }
    }
    free(path);
    return 0;
}
