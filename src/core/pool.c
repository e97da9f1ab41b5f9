/*
** pool.c: the one persistent worker pool of the process (core.h:
** cdb_pool_run). Started on first use with one worker per online CPU but
** one (the calling thread is the last), at most CDB_POOL_MAX_THREADS; the
** workers sleep on a condition variable between jobs and live until the
** process exits. One job runs at a time: a caller that finds the pool busy
** (another thread's job) runs its tasks itself, so concurrent searches
** never wait on each other and never start threads of their own.
*/
#include <pthread.h>
#include <unistd.h>

#include "core/core.h"

static struct {
    pthread_once_t once;
    pthread_mutex_t mu;     /* guards everything below */
    pthread_cond_t work;    /* a new job (gen changed) */
    pthread_cond_t done;    /* the job's last task finished */
    pthread_mutex_t busy;   /* held by the caller whose job runs */
    int n_workers;
    uint64_t gen;           /* job generation */
    cdb_pool_fn fn;
    void *arg;
    size_t n, next, finished;
} P = {.once = PTHREAD_ONCE_INIT,
       .mu = PTHREAD_MUTEX_INITIALIZER,
       .work = PTHREAD_COND_INITIALIZER,
       .done = PTHREAD_COND_INITIALIZER,
       .busy = PTHREAD_MUTEX_INITIALIZER};

/* With P.mu held: runs tasks of the current job until none is left. */
static void take_tasks(void)
{
    while (P.next < P.n) {
        size_t i = P.next++;
        cdb_pool_fn fn = P.fn;
        void *arg = P.arg;
        pthread_mutex_unlock(&P.mu);
        fn(arg, i);
        pthread_mutex_lock(&P.mu);
        if (++P.finished == P.n) pthread_cond_broadcast(&P.done);
    }
}

static void *worker(void *unused)
{
    uint64_t seen = 0;
    (void)unused;
    pthread_mutex_lock(&P.mu);
    for (;;) {
        while (P.gen == seen) pthread_cond_wait(&P.work, &P.mu);
        seen = P.gen;
        take_tasks();
    }
    return NULL; /* not reached: workers live as long as the process */
}

static void start(void)
{
    long cpus = sysconf(_SC_NPROCESSORS_ONLN);
    int want = cpus > 1 ? (int)cpus - 1 : 0, i;
    pthread_attr_t at;
    if (want > CDB_POOL_MAX_THREADS - 1) want = CDB_POOL_MAX_THREADS - 1;
    if (pthread_attr_init(&at) != 0) return;
    pthread_attr_setdetachstate(&at, PTHREAD_CREATE_DETACHED);
    for (i = 0; i < want; i++) {
        pthread_t t;
        if (pthread_create(&t, &at, worker, NULL) != 0) break;
        P.n_workers++;
    }
    pthread_attr_destroy(&at);
}

int cdb_pool_threads(void)
{
    pthread_once(&P.once, start);
    return P.n_workers + 1;
}

void cdb_pool_run(size_t n, cdb_pool_fn fn, void *arg)
{
    size_t i;
    if (n == 0) return;
    pthread_once(&P.once, start);
    if (n == 1 || P.n_workers == 0 || pthread_mutex_trylock(&P.busy) != 0) {
        for (i = 0; i < n; i++) fn(arg, i); /* serial, or the pool is busy */
        return;
    }
    pthread_mutex_lock(&P.mu);
    P.fn = fn;
    P.arg = arg;
    P.n = n;
    P.next = P.finished = 0;
    P.gen++;
    pthread_cond_broadcast(&P.work);
    take_tasks();
    while (P.finished < P.n) pthread_cond_wait(&P.done, &P.mu);
    P.fn = NULL;
    P.arg = NULL;
    pthread_mutex_unlock(&P.mu);
    pthread_mutex_unlock(&P.busy);
}
