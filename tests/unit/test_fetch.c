/*
** test_fetch.c: status codes and messages of clipdb_model_fetch that the CLI
** does not show (the transfers themselves are tested through the binary
** against tools/fake_hub.py in tests/cli/test_fetch.py).
*/
#include <stdio.h>
#include <string.h>
#include <sys/socket.h>
#include <netinet/in.h>
#include <unistd.h>

#include "clipdb.h"
#include "test.h"

TEST(fetch_options_defaults)
{
    clipdb_fetch_options o;
    memset(&o, 0x5a, sizeof o);
    clipdb_fetch_options_init(&o);
    CHECK(o.base_url == NULL);
    CHECK(o.on_progress == NULL);
    CHECK(o.progress_arg == NULL);
    CHECK(o.connect_timeout_s == 30);
    CHECK(o.stall_timeout_s == 60);
}

TEST(fetch_bad_arguments)
{
    static const char *const bad[] = {"", "openai", "a/b/c", "../x", "a/..", "a/b c",
                                      "a/-b", "a/b?c", "a/b%2f", "/b", "a/"};
    clipdb_fetch_options o;
    char *err = (char *)1;
    size_t i;
    clipdb_fetch_options_init(&o);
    o.base_url = "http://127.0.0.1:9";
    for (i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        err = NULL;
        CHECK(clipdb_model_fetch(bad[i], test_tmpdir(), &o, &err) == CLIPDB_EINVAL);
        REQUIRE(err != NULL);
        CHECK(strstr(err, "ORG/NAME") != NULL);
        clipdb_free(err);
    }
    CHECK(clipdb_model_fetch(NULL, test_tmpdir(), &o, NULL) == CLIPDB_EINVAL);
    CHECK(clipdb_model_fetch("openai/x", NULL, &o, NULL) == CLIPDB_EINVAL);
    o.base_url = "ftp://example.org";
    err = NULL;
    CHECK(clipdb_model_fetch("openai/x", test_tmpdir(), &o, &err) == CLIPDB_EINVAL);
    REQUIRE(err != NULL);
    CHECK(strstr(err, "ftp://example.org") != NULL);
    clipdb_free(err);
}

TEST(fetch_closed_port_is_enet)
{
    struct sockaddr_in a;
    socklen_t len = sizeof a;
    int s = socket(AF_INET, SOCK_STREAM, 0), port;
    char url[64], want[160], dir[512], *err = NULL;
    clipdb_fetch_options o;

    REQUIRE(s >= 0);
    memset(&a, 0, sizeof a);
    a.sin_family = AF_INET;
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    REQUIRE(bind(s, (struct sockaddr *)&a, sizeof a) == 0);
    REQUIRE(getsockname(s, (struct sockaddr *)&a, &len) == 0);
    port = ntohs(a.sin_port);
    close(s); /* nothing listens there now */
    snprintf(url, sizeof url, "http://127.0.0.1:%d/", port);
    snprintf(dir, sizeof dir, "%s/fetch/x/y", test_tmpdir());
    clipdb_fetch_options_init(&o);
    o.base_url = url;
    CHECK(clipdb_model_fetch("openai/clip-vit-base-patch32", dir, &o, &err) == CLIPDB_ENET);
    REQUIRE(err != NULL);
    /* The trailing '/' of the base URL is dropped. */
    snprintf(want, sizeof want,
             "HEAD http://127.0.0.1:%d/openai/clip-vit-base-patch32/resolve/main/"
             "model.safetensors",
             port);
    CHECK(strstr(err, want) != NULL);
    clipdb_free(err);
    /* The directory was created (mkdir -p) before the first request. */
    CHECK(access(dir, W_OK) == 0);
}
