/*
** test.h: a tiny unit-test harness. Each test file defines tests with
** TEST(name) { ... }; they register themselves and tests/unit/main.c runs
** them all (or those whose name contains argv[1]) and prints
** "N passed, N failed, N skipped".
*/
#ifndef CDB_TEST_H
#define CDB_TEST_H

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

typedef void (*test_fn)(void);
void test_register(const char *name, test_fn fn);
void test_fail_at(const char *file, int line, const char *what);
void test_skip(const char *why);
/* Path of the shared data folder (../shared from the repository root, or
** $CLIPDB_SHARED), or NULL if it is absent. */
const char *test_shared_dir(void);
/* A fresh temporary directory for this test run; removed at exit. */
const char *test_tmpdir(void);

#define TEST(name)                                                        \
    static void name(void);                                               \
    __attribute__((constructor)) static void name##_register(void)       \
    {                                                                     \
        test_register(#name, name);                                       \
    }                                                                     \
    static void name(void)

/* CHECK records a failure and goes on; REQUIRE returns from the test. */
#define CHECK(cond)                                                       \
    do {                                                                  \
        if (!(cond)) test_fail_at(__FILE__, __LINE__, #cond);             \
    } while (0)
#define REQUIRE(cond)                                                     \
    do {                                                                  \
        if (!(cond)) {                                                    \
            test_fail_at(__FILE__, __LINE__, #cond);                      \
            return;                                                       \
        }                                                                 \
    } while (0)
#define CHECK_NEAR(a, b, tol)                                             \
    do {                                                                  \
        double a_ = (double)(a), b_ = (double)(b);                        \
        if (!(fabs(a_ - b_) <= (tol))) {                                  \
            char m_[256];                                                 \
            snprintf(m_, sizeof m_, "%s ~ %s: %.9g vs %.9g (tol %g)", #a, \
                     #b, a_, b_, (double)(tol));                          \
            test_fail_at(__FILE__, __LINE__, m_);                         \
        }                                                                 \
    } while (0)
#define SKIP(why)                                                         \
    do {                                                                  \
        test_skip(why);                                                   \
        return;                                                           \
    } while (0)

#endif
