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
