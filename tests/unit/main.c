/*
** main.c: runs the registered unit tests.
** usage: test_unit [SUBSTRING]   (only tests whose name contains SUBSTRING)
*/
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "test.h"

#define MAX_TESTS 2048

static struct {
    const char *name;
    test_fn fn;
    char skip_why[200]; /* "" unless the test skipped */
} tests[MAX_TESTS];
static int n_tests;
static int cur_failed, cur_skipped, cur;
static char tmpdir[256];

void test_register(const char *name, test_fn fn)
{
    if (n_tests < MAX_TESTS) {
        tests[n_tests].name = name;
        tests[n_tests].fn = fn;
        n_tests++;
    }
}

void test_fail_at(const char *file, int line, const char *what)
{
    fprintf(stderr, "    FAIL %s:%d: %s\n", file, line, what);
    cur_failed++;
}

void test_skip(const char *why)
{
    fprintf(stderr, "    skip: %s\n", why);
    snprintf(tests[cur].skip_why, sizeof tests[cur].skip_why, "%s", why);
    cur_skipped = 1;
}

const char *test_shared_dir(void)
{
    static char buf[1024];
    const char *env = getenv("CLIPDB_SHARED");
    const char *dir = env && *env ? env : "../shared";
    snprintf(buf, sizeof buf, "%s/data", dir);
    if (access(buf, R_OK) != 0) return NULL;
    snprintf(buf, sizeof buf, "%s", dir);
    return buf;
}

const char *test_tmpdir(void)
{
    if (!tmpdir[0]) {
        snprintf(tmpdir, sizeof tmpdir, "/tmp/clipdb-unit-XXXXXX");
        if (!mkdtemp(tmpdir)) {
            perror("mkdtemp");
            abort();
        }
    }
    return tmpdir;
}

static int cmp_tests(const void *a, const void *b)
{
    const char *x = *(const char *const *)a, *y = *(const char *const *)b;
    return strcmp(x, y);
}

int main(int argc, char **argv)
{
    int i, passed = 0, failed = 0, skipped = 0;
    const char *filter = argc > 1 ? argv[1] : NULL;
    qsort(tests, (size_t)n_tests, sizeof tests[0], cmp_tests);
    for (i = 0; i < n_tests; i++) {
        if (filter && !strstr(tests[i].name, filter)) continue;
        cur_failed = 0;
        cur_skipped = 0;
        cur = i;
        fprintf(stderr, "  %s\n", tests[i].name);
        tests[i].fn();
        if (cur_failed) failed++;
        else if (cur_skipped) skipped++;
        else passed++;
    }
    if (tmpdir[0]) {
        char cmd[300];
        snprintf(cmd, sizeof cmd, "rm -rf '%s'", tmpdir);
        if (system(cmd) != 0) fprintf(stderr, "could not remove %s\n", tmpdir);
    }
    /* every skip with its reason, then the count, so `make test` shows why */
    for (i = 0; i < n_tests; i++)
        if (tests[i].skip_why[0]) printf("unit: SKIPPED %s: %s\n", tests[i].name, tests[i].skip_why);
    printf("unit: %d passed, %d failed, %d skipped\n", passed, failed, skipped);
    return failed ? 1 : 0;
}
