/* Unit tests of the server's parsers (src/server/parse.c): route patterns,
** multipart/form-data, bounded JSON bodies, the embedded assets. */
#include "server/http.h"
#include "test.h"

TEST(server_route_match_ids_and_names)
{
    int64_t id = -1;
    const char *name = NULL;
    size_t nl = 0;
    CHECK(cdb_route_match("/api/items/{id}", "/api/items/42", &id, NULL, NULL) && id == 42);
    CHECK(cdb_route_match("/api/items/{id}/thumb", "/api/items/0/thumb", &id, NULL, NULL) &&
          id == 0);
    CHECK(cdb_route_match("/api/items/{id}", "/api/items/9223372036854775807", &id, NULL, NULL) &&
          id == INT64_MAX);
    CHECK(!cdb_route_match("/api/items/{id}", "/api/items/9223372036854775808", &id, NULL, NULL));
    CHECK(!cdb_route_match("/api/items/{id}", "/api/items/-1", &id, NULL, NULL));
    CHECK(!cdb_route_match("/api/items/{id}", "/api/items/007", &id, NULL, NULL));
    CHECK(!cdb_route_match("/api/items/{id}", "/api/items/", &id, NULL, NULL));
    CHECK(!cdb_route_match("/api/items/{id}", "/api/items/1/", &id, NULL, NULL));
    CHECK(!cdb_route_match("/api/items/{id}", "/api/items/1/thumb", &id, NULL, NULL));
    CHECK(cdb_route_match("/", "/", NULL, NULL, NULL));
    CHECK(!cdb_route_match("/", "", NULL, NULL, NULL));
    CHECK(cdb_route_match("/{name}", "/app.js", NULL, &name, &nl) && nl == 6 &&
          !strncmp(name, "app.js", 6));
    CHECK(!cdb_route_match("/{name}", "/..", NULL, &name, &nl));
    CHECK(!cdb_route_match("/{name}", "/.env", NULL, &name, &nl));
    CHECK(!cdb_route_match("/{name}", "/a%2fb", NULL, &name, &nl));
    CHECK(!cdb_route_match("/{name}", "/a/b", NULL, &name, &nl));
    CHECK(!cdb_route_match("/healthz", "/healthzz", NULL, NULL, NULL));
}

TEST(server_multipart_parts_and_errors)
{
    static const char body[] = "--B1\r\nContent-Disposition: form-data; name=\"text\"\r\n\r\n"
                               "a dog\r\n--B1\r\nContent-Disposition: form-data; name=\"image\"; "
                               "filename=\"x.jpg\"\r\nContent-Type: image/jpeg\r\n\r\n\xff\xd8\r\n"
                               "--B1\r\n\r\n--B1--\r\n";
    cdb_part parts[4];
    char b[80], err[160];
    int n;
    CHECK(cdb_multipart_boundary("multipart/form-data; boundary=B1", b, sizeof b) == 0 &&
          !strcmp(b, "B1"));
    CHECK(cdb_multipart_boundary("multipart/form-data; boundary=\"q d\"", b, sizeof b) == 0 &&
          !strcmp(b, "q d"));
    CHECK(cdb_multipart_boundary("multipart/form-data", b, sizeof b) < 0);
    CHECK(cdb_multipart_boundary("text/plain; boundary=B1", b, sizeof b) < 0);
    /* the third part has no name: refused */
    n = cdb_multipart_parse((const unsigned char *)body, sizeof body - 1, "B1", parts, 4, err,
                            sizeof err);
    CHECK(n == -1 && strstr(err, "part 3"));
    /* the first two alone */
    {
        const char *end = strstr(body, "--B1\r\n\r\n");
        char copy[512];
        size_t len = (size_t)(end - body);
        memcpy(copy, body, len);
        memcpy(copy + len, "--B1--\r\n", 8);
        n = cdb_multipart_parse((const unsigned char *)copy, len + 8, "B1", parts, 4, err,
                                sizeof err);
        REQUIRE(n == 2);
        CHECK(!strcmp(parts[0].name, "text") && parts[0].len == 5 &&
              !memcmp(parts[0].data, "a dog", 5) && !parts[0].filename[0]);
        CHECK(!strcmp(parts[1].name, "image") && !strcmp(parts[1].filename, "x.jpg") &&
              !strcmp(parts[1].content_type, "image/jpeg") && parts[1].len == 2);
        /* more parts than allowed */
        CHECK(cdb_multipart_parse((const unsigned char *)copy, len + 8, "B1", parts, 1, err,
                                  sizeof err) == -1 && strstr(err, "more than 1"));
        /* cut short: the last part is not terminated */
        CHECK(cdb_multipart_parse((const unsigned char *)copy, len - 3, "B1", parts, 4, err,
                                  sizeof err) == -1);
    }
    CHECK(cdb_multipart_parse((const unsigned char *)"", 0, "B1", parts, 4, err, sizeof err) == -1);
}

TEST(server_json_body_bounds)
{
    char err[160], *big, deep[64];
    cJSON *j;
    size_t i;
    j = cdb_json_parse_body("{\"text\": \"[[[[[[[[[[\"}", 22, err, sizeof err);
    CHECK(j != NULL); /* brackets inside a string are not nesting */
    cJSON_Delete(j);
    for (i = 0; i < 20; i++) deep[i] = '[';
    for (i = 20; i < 40; i++) deep[i] = ']';
    CHECK(!cdb_json_parse_body(deep, 40, err, sizeof err) && strstr(err, "deeper"));
    CHECK(!cdb_json_parse_body("[1]", 3, err, sizeof err) && strstr(err, "object"));
    CHECK(!cdb_json_parse_body("{\"a\": \"x\0y\"}", 12, err, sizeof err) && strstr(err, "NUL"));
    CHECK(!cdb_json_parse_body("{\"a\":", 5, err, sizeof err) && strstr(err, "malformed"));
    big = malloc(CDB_HTTP_MAX_JSON + 2);
    REQUIRE(big);
    memset(big, ' ', CDB_HTTP_MAX_JSON + 1);
    big[0] = '{';
    big[CDB_HTTP_MAX_JSON] = '}';
    CHECK(!cdb_json_parse_body(big, CDB_HTTP_MAX_JSON + 1, err, sizeof err) && strstr(err, "over"));
    j = cdb_json_parse_body(big, CDB_HTTP_MAX_JSON, err, sizeof err); /* '{' + spaces: malformed */
    CHECK(!j);
    free(big);
}

TEST(server_assets_are_embedded)
{
    const cdb_asset *a = cdb_asset_find("index.html", 10);
    REQUIRE(a);
    CHECK(strstr(a->mime, "text/html") && a->len > 100);
    CHECK(cdb_asset_find("app.js", 6) && cdb_asset_find("style.css", 9));
    CHECK(cdb_asset_find("openapi.json", 12));
    CHECK(!cdb_asset_find("nope.js", 7));
}
