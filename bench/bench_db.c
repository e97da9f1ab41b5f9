/*
** bench_db.c: benchmarks of the database (src/store).
**
**   bench_db open DB N D      builds DB (if absent) with N random vectors of
**                             dimension D (seeded), then times, in this
**                             process, opening it and answering the first
**                             query (loading the vectors + exact top-10), and
**                             a second query; checks the top hit of a query
**                             equal to a stored vector is that vector.
**   bench_db check DB N D     the cost of clipdb_db_check (`clipdb check`)
**                             beside opening: builds DB as `open` does if
**                             absent, then times (median of 5 after a
**                             warm-up, each in a fresh handle) open alone,
**                             open + the first query (loading and checking
**                             every vector), open + check --quick and open
**                             + check, and prints each as a ratio to open;
**                             checks that the file has no problem.
**   bench_db ingest MODEL DIR N
**                             encoder alone: decodes the first
**                             min(N, 512) images of DIR (not timed) and times
**                             clipdb_encode_images on them in batches of 32
**                             (after a warm-up batch): its steady-state rate;
**                             pipeline: times clipdb_db_add of all N files
**                             (decode threads + encoder + SQLite) into a
**                             fresh database. Prints images/s of both and
**                             the ratio.
*/
#include <dirent.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "store/store.h"

#define ENC_MAX 512 /* the encoder-alone rate is measured on at most this many images */

static uint64_t rng = 42;
static float frand(void)
{
    rng = rng * 6364136223846793005ull + 1442695040888963407ull;
    return (float)((rng >> 40) & 0xffffff) / 16777216.0f - 0.5f;
}

static int cmp_double(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

static void print_cpu(void)
{
    char line[256];
    FILE *f = fopen("/proc/cpuinfo", "r");
    while (f && fgets(line, sizeof line, f))
        if (!strncmp(line, "model name", 10)) {
            printf("cpu: %s", strchr(line, ':') ? strchr(line, ':') + 2 : line);
            break;
        }
    if (f) fclose(f);
    printf("compute: %s\n", clipdb_compute_info());
}

/* One timed run of `what` (0 open, 1 open + first query, 2 open + check
** --quick, 3 open + check) on a fresh read-only handle; -1 on failure. */
static double check_run(const char *path, int what, long n)
{
    clipdb_db_options o;
    clipdb_db *db = NULL;
    clipdb_db_check_report r;
    clipdb_results *res = NULL;
    clipdb_search_options so;
    clipdb_query q;
    double t0 = cdb_now(), t = -1;
    clipdb_db_options_init(&o);
    o.readonly = 1;
    if (clipdb_db_open(&db, path, &o) != CLIPDB_OK) goto done;
    if (what == 1) {
        clipdb_search_options_init(&so);
        memset(&q, 0, sizeof q);
        q.kind = CLIPDB_QUERY_ITEM;
        q.item = n / 2;
        if (clipdb_db_search(db, &q, 1, &so, &res) != CLIPDB_OK) goto done;
        clipdb_results_free(res);
    } else if (what >= 2) {
        if (clipdb_db_check(db, what == 2, &r) != CLIPDB_OK) goto done;
        if (r.n_problems != 0 || r.vectors != n) {
            fprintf(stderr, "bench_db: check found %lld problems in %lld vectors (%s)\n",
                    (long long)r.n_problems, (long long)r.vectors,
                    r.n_listed ? r.problems[0].message : "");
            clipdb_db_check_free(&r);
            goto done;
        }
        clipdb_db_check_free(&r);
    }
    t = cdb_now() - t0;
done:
    if (t < 0) fprintf(stderr, "bench_db: %s\n", clipdb_db_errmsg(db));
    clipdb_db_close(db);
    return t;
}

static int bench_open(const char *path, long n, int d);

static int bench_check(const char *path, long n, int d)
{
    static const char *const names[] = {"open", "open + first query", "open + check --quick",
                                        "open + check"};
    double t[4][5], med[4];
    struct stat sb;
    int w, i;
    if (stat(path, &sb) != 0 && bench_open(path, n, d) != 0) return 1;
    stat(path, &sb);
    print_cpu();
    printf("database: %ld vectors x %d, %.1f MB\n", n, d, (double)sb.st_size / 1e6);
    for (w = 0; w < 4; w++) {
        if (check_run(path, w, n) < 0) return 1; /* warm-up: the page cache */
        for (i = 0; i < 5; i++)
            if ((t[w][i] = check_run(path, w, n)) < 0) return 1;
        qsort(t[w], 5, sizeof t[w][0], cmp_double);
        med[w] = t[w][2];
    }
    printf("| what | median of 5 | x open |\n| --- | --- | --- |\n");
    for (w = 0; w < 4; w++)
        printf("| %s | %.1f ms | %.1f |\n", names[w], med[w] * 1e3, med[w] / med[0]);
    return 0;
}

static int bench_open(const char *path, long n, int d)
{
    clipdb_db *db = NULL;
    clipdb_results *res = NULL;
    clipdb_query q;
    clipdb_search_options opt;
    struct stat sb;
    double t0, t1, t2, t3;
    int rc;

    if (stat(path, &sb) != 0) {
        float *v = malloc((size_t)d * sizeof *v);
        int64_t id;
        long i;
        int j;
        t0 = cdb_now();
        if (cdb_db_create_raw(&db, path, "bench-random", d, NULL) != CLIPDB_OK) goto fail;
        for (i = 0; i < n; i++) {
            if (i % 5000 == 0 && cdb_db_begin(db) != CLIPDB_OK) goto fail;
            for (j = 0; j < d; j++) v[j] = frand();
            if (cdb_db_insert_image(db, "x.jpg", NULL, 1, "0", v, &id) != CLIPDB_OK) goto fail;
            if ((i % 5000 == 4999 || i == n - 1) && cdb_db_commit(db) != CLIPDB_OK) goto fail;
        }
        clipdb_db_close(db);
        db = NULL;
        free(v);
        stat(path, &sb);
        printf("built %s: %ld vectors x %d in %.1f s, %.1f MB\n", path, n, d, cdb_now() - t0,
               (double)sb.st_size / 1e6);
    }
    t0 = cdb_now();
    if ((rc = clipdb_db_open(&db, path, NULL)) != CLIPDB_OK) goto fail;
    t1 = cdb_now();
    clipdb_search_options_init(&opt);
    memset(&q, 0, sizeof q);
    q.kind = CLIPDB_QUERY_ITEM;
    q.item = n / 2;
    if (clipdb_db_search(db, &q, 1, &opt, &res) != CLIPDB_OK) goto fail;
    t2 = cdb_now();
    if (res->offsets[1] < 1 || res->results[0].id != n / 2) {
        fprintf(stderr, "bench_db: wrong answer (top hit %lld)\n", (long long)res->results[0].id);
        return 1;
    }
    clipdb_results_free(res);
    q.item = n / 3;
    if (clipdb_db_search(db, &q, 1, &opt, &res) != CLIPDB_OK) goto fail;
    t3 = cdb_now();
    clipdb_results_free(res);
    printf("| open | first query (load %ld x %d + exact top-10) | open + first query | second query |\n"
           "| --- | --- | --- | --- |\n"
           "| %.1f ms | %.1f ms | %.1f ms | %.1f ms |\n",
           n, d, (t1 - t0) * 1e3, (t2 - t1) * 1e3, (t2 - t0) * 1e3, (t3 - t2) * 1e3);
    clipdb_db_close(db);
    return 0;
fail:
    fprintf(stderr, "bench_db: %s\n", clipdb_db_errmsg(db));
    clipdb_db_close(db);
    return 1;
}

static int bench_ingest(const char *model_dir, const char *dir, int n)
{
    clipdb_model *m = NULL;
    clipdb_ctx *ctx = NULL;
    clipdb_db *db = NULL;
    clipdb_db_options dopt;
    clipdb_add_options aopt;
    clipdb_add_result r;
    clipdb_model_info info;
    struct dirent **names = NULL;
    char sub[256], dbpath[1024], *path;
    float *pix = NULL, *out = NULL, *one = NULL;
    size_t fl;
    int k = 0, i, nn, b, ne;
    double t0, enc_s, pipe_s;

    if (clipdb_model_open(&m, model_dir) != CLIPDB_OK) {
        fprintf(stderr, "bench_db: %s\n", clipdb_model_errmsg(m));
        return 1;
    }
    clipdb_model_get_info(m, &info);
    clipdb_ctx_new(&ctx, m);
    fl = clipdb_image_floats(m);
    /* a folder of the first n images (symlinks) */
    snprintf(sub, sizeof sub, "/tmp/bench_db_ingest_%d", (int)getpid());
    mkdir(sub, 0755);
    nn = scandir(dir, &names, NULL, alphasort);
    ne = n < ENC_MAX ? n : ENC_MAX;   /* images timed through the encoder alone */
    pix = malloc((size_t)ne * fl * sizeof(float));
    out = malloc((size_t)ne * (size_t)info.embed_dim * sizeof(float));
    one = malloc(fl * sizeof(float));
    if (!pix || !out || !one) {
        fprintf(stderr, "bench_db: out of memory\n");
        return 1;
    }
    for (i = 0; i < nn && k < n; i++) {
        char link[8192];
        if (names[i]->d_name[0] == '.') continue;
        path = cdb_path_join(dir, names[i]->d_name);
        if (clipdb_image_load(ctx, path, k < ne ? pix + (size_t)k * fl : one) == CLIPDB_OK) {
            char *abs = realpath(path, NULL);
            snprintf(link, sizeof link, "%s/%s", sub, names[i]->d_name);
            if (abs && symlink(abs, link) == 0) k++;
            free(abs);
        }
        free(path);
    }
    for (i = 0; i < nn; i++) free(names[i]);
    free(names);
    /* encoder alone, after one untimed warm-up batch (weights paged in,
    ** buffers allocated) */
    if (k < ne) ne = k;
    clipdb_encode_images(ctx, pix, ne < 32 ? ne : 32, out);
    t0 = cdb_now();
    for (b = 0; b < ne; b += 32) {
        int c = ne - b < 32 ? ne - b : 32;
        // pix (c, 3, S, S) -> vision tower -> out (c, e)
        clipdb_encode_images(ctx, pix + (size_t)b * fl, c, out + (size_t)b * (size_t)info.embed_dim);
    }
    enc_s = cdb_now() - t0;
    free(pix);
    free(one);
    clipdb_ctx_free(ctx);
    clipdb_model_close(m);
    /* the whole pipeline */
    snprintf(dbpath, sizeof dbpath, "%s.db", sub);
    clipdb_db_options_init(&dopt);
    dopt.create = 1;
    dopt.model_dir = model_dir;
    if (clipdb_db_open(&db, dbpath, &dopt) != CLIPDB_OK) {
        fprintf(stderr, "bench_db: %s\n", clipdb_db_errmsg(db));
        return 1;
    }
    clipdb_add_options_init(&aopt);
    aopt.images_dir = sub;
    t0 = cdb_now();
    if (clipdb_db_add(db, &aopt, &r) != CLIPDB_OK) {
        fprintf(stderr, "bench_db: %s\n", clipdb_db_errmsg(db));
        return 1;
    }
    pipe_s = cdb_now() - t0;
    printf("| images | encoder alone (steady state, %d images) | whole pipeline (decode + encode + store) | ratio |\n"
           "| --- | --- | --- | --- |\n"
           "| %d (%lld added) | %.2f img/s | %.2f img/s | %.1f%% |\n",
           ne, k, (long long)r.images_added, ne / enc_s, k / pipe_s,
           100.0 * (k / pipe_s) / (ne / enc_s));
    clipdb_db_close(db);
    free(out);
    remove(dbpath);
    snprintf(dbpath, sizeof dbpath, "rm -rf %s %s.db-wal %s.db-shm", sub, sub, sub);
    if (system(dbpath) != 0) return 1;
    return 0;
}

int main(int argc, char **argv)
{
    if (argc == 5 && !strcmp(argv[1], "open")) return bench_open(argv[2], atol(argv[3]), atoi(argv[4]));
    if (argc == 5 && !strcmp(argv[1], "ingest")) return bench_ingest(argv[2], argv[3], atoi(argv[4]));
    if (argc == 5 && !strcmp(argv[1], "check")) return bench_check(argv[2], atol(argv[3]), atoi(argv[4]));
    fprintf(stderr, "usage: bench_db open DB N D | bench_db check DB N D | "
                    "bench_db ingest MODEL_DIR IMAGES_DIR N\n");
    return 2;
}
