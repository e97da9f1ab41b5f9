/* Unit tests of src/core/pool.c: every task runs exactly once, from one
** caller and from several callers at once (the TSan build runs these). */
#include <pthread.h>

#include "core/core.h"
#include "test.h"

typedef struct count_job {
    int *hits;   /* one counter per task */
} count_job;

static void count_task(void *arg, size_t i)
{
    count_job *j = arg;
    j->hits[i]++;
}

static int run_jobs(int rounds, size_t n)
{
    int *hits = calloc(n, sizeof *hits), r, bad = 0;
    count_job j = {hits};
    size_t i;
    if (!hits) return 1;
    for (r = 0; r < rounds; r++) {
        cdb_pool_run(n, count_task, &j);
        for (i = 0; i < n; i++) bad += hits[i] != r + 1;
    }
    free(hits);
    return bad;
}

TEST(core_pool_runs_every_task_once)
{
    CHECK(cdb_pool_threads() >= 1 && cdb_pool_threads() <= CDB_POOL_MAX_THREADS);
    CHECK(run_jobs(50, 1) == 0);
    CHECK(run_jobs(50, 3) == 0);
    CHECK(run_jobs(20, 257) == 0);
    cdb_pool_run(0, count_task, NULL); /* nothing to do: fn is never called */
}

static void *caller(void *arg)
{
    *(int *)arg = run_jobs(100, 33);
    return NULL;
}

TEST(core_pool_concurrent_callers)
{
    pthread_t t[4];
    int bad[4] = {0, 0, 0, 0}, i, started = 0;
    for (i = 0; i < 4; i++) {
        if (pthread_create(&t[i], NULL, caller, &bad[i]) != 0) break;
        started++;
    }
    CHECK(started == 4);
    for (i = 0; i < started; i++) pthread_join(t[i], NULL);
    for (i = 0; i < started; i++) CHECK(bad[i] == 0);
}
