/* Unit tests of src/core: error slots, checked sizes, file helpers. */
#include "core/core.h"
#include "test.h"

TEST(core_err_set_returns_code_and_formats)
{
    cdb_err e;
    cdb_err_clear(&e);
    CHECK(cdb_err_set(&e, CLIPDB_EFORMAT, "bad %d", 7) == CLIPDB_EFORMAT);
    CHECK(e.code == CLIPDB_EFORMAT);
    CHECK(!strcmp(e.msg, "bad 7"));
    cdb_err_prefix(&e, "file %s", "x");
    CHECK(!strcmp(e.msg, "file x: bad 7"));
}

TEST(core_checked_arithmetic_detects_overflow)
{
    size_t r;
    CHECK(cdb_mul_ok(3, 4, &r) && r == 12);
    CHECK(!cdb_mul_ok((size_t)-1, 2, &r));
    CHECK(!cdb_add_ok((size_t)-1, 1, &r));
    CHECK(cdb_malloc_array((size_t)-1, 16) == NULL);
}

TEST(core_read_file_reports_missing_and_limit)
{
    cdb_err e;
    char *buf = NULL, path[512];
    size_t len;
    FILE *f;
    cdb_err_clear(&e);
    CHECK(cdb_read_file("/nonexistent/zz", 100, &buf, &len, &e) == CLIPDB_ENOTFOUND);
    CHECK(strstr(e.msg, "/nonexistent/zz") != NULL);
    snprintf(path, sizeof path, "%s/ten", test_tmpdir());
    f = fopen(path, "wb");
    REQUIRE(f);
    fputs("0123456789", f);
    fclose(f);
    CHECK(cdb_read_file(path, 5, &buf, &len, &e) == CLIPDB_ELIMIT);
    REQUIRE(cdb_read_file(path, 100, &buf, &len, &e) == CLIPDB_OK);
    CHECK(len == 10 && buf[10] == '\0' && !memcmp(buf, "0123456789", 10));
    free(buf);
}

/* cdb_grow keeps the elements and doubles from 16; an overflowing request
** fails and leaves the array as it was. */
/* The escaped-NUL finder of the JSON parsers: offsets, an escaped
** backslash before "u0000", a cut-off escape at the end. */
TEST(core_json_nul_escape)
{
    static const struct {
        const char *s;
        long want;
    } cases[] = {
        {"{\"a\": \"b\"}", -1},
        {"{\"a\\u0000\": 1}", 3},
        {"\\u0000", 0},
        {"\"\\\\u0000\"", -1},        /* "\\u0000": a backslash, then text */
        {"\"\\\\\\u0000\"", 3},       /* "\\\u0000": a backslash, then NUL */
        {"\"\\u0001\\u00000\"", 7},   /* the second escape */
        {"\"\\u000\"", -1},
        {"x\\u000", -1},             /* cut off */
        {"\\", -1},
        {"", -1},
    };
    size_t i;
    for (i = 0; i < sizeof cases / sizeof *cases; i++)
        CHECK(cdb_json_nul_escape(cases[i].s, strlen(cases[i].s)) == cases[i].want);
    /* only the bytes given count */
    CHECK(cdb_json_nul_escape("ab\\u0000", 7) == -1);
}

TEST(core_grow_keeps_contents_and_refuses_overflow)
{
    int *v = NULL;
    size_t cap = 0, i;
    for (i = 0; i < 1000; i++) {
        REQUIRE(cdb_grow((void **)&v, &cap, i + 1, sizeof *v) == 0);
        REQUIRE(cap >= i + 1);
        v[i] = (int)i * 3;
    }
    CHECK(cap == 1024); /* 16 doubled six times */
    for (i = 0; i < 1000; i++) CHECK(v[i] == (int)i * 3);
    CHECK(cdb_grow((void **)&v, &cap, 10, sizeof *v) == 0 && cap == 1024); /* no shrink */
    CHECK(cdb_grow((void **)&v, &cap, (size_t)-1 / 2, sizeof *v) == -1);
    CHECK(cap == 1024 && v[999] == 999 * 3);
    free(v);
}

/* cdb_reserve gives exactly the room asked for, reuses a block that is large
** enough, never a NULL block for 0 elements, and refuses an overflow without
** touching the buffer. */
TEST(core_reserve_exact_reuse_and_overflow)
{
    double *b = NULL, *first;
    size_t cap = 0;
    REQUIRE(cdb_reserve((void **)&b, &cap, 0, sizeof *b) == 0);
    CHECK(b != NULL && cap == 0);
    REQUIRE(cdb_reserve((void **)&b, &cap, 100, sizeof *b) == 0);
    CHECK(cap == 100);
    b[99] = 1.5;
    first = b;
    REQUIRE(cdb_reserve((void **)&b, &cap, 60, sizeof *b) == 0);
    CHECK(b == first && cap == 100 && b[99] == 1.5); /* large enough: kept */
    REQUIRE(cdb_reserve((void **)&b, &cap, 101, sizeof *b) == 0);
    CHECK(cap == 101);
    b[100] = 2.5;
    CHECK(cdb_reserve((void **)&b, &cap, (size_t)-1 / 4, sizeof *b) == -1);
    CHECK(cap == 101 && b[100] == 2.5);
    free(b);
}
