/*
** bench_search.c: exact and IVF search of clipdb against Faiss (through the
** shim, the same vectors, the same threads), with correctness checked in the
** same run. Fixed seeds; warm-up runs excluded; medians over repeats.
**
** usage: build/bench/bench_search [N [NQ]]   (default 100000 base, 1000 queries)
**        build/bench/bench_search --db FILE [--target image|text] [--nq NQ] [--seeds S]
**   The second form runs the IVF-vs-Faiss curve (nlist 100, nprobe 1, 2, 3,
**   4, 5, 7, 10, 15, 20, 25; recall@10 against exact search, the mean and
**   min..max over S k-means seeds per side, default 16) over the vectors of
**   a clipdb database: the target's vectors are the base, the first NQ
**   (default 1000) vectors of the other type are the queries (captions
**   against images for --target image, the default).
** Also: exact search on each compressed copy (sq8, bf16, fp16; clipdb_cvecs)
** + fp32 re-rank against the fp32 exact scan, on the clustered set: build
** time, single-query median latency, batched queries/s, recall@10 (fails
** below 0.999), with the CPU model and the kernel ISA.
**        build/bench/bench_search --compressed [N [NQ]]   that block alone.
** Prints one table; exits 1 if a correctness check fails.
*/
#include <cblas.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "compute/compute.h"
#include "core/core.h"
#include "index/index.h"
#include "store/store.h"

#define D 512
#define K 10

static int cmp_double(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

static double median(double *v, int n)
{
    qsort(v, (size_t)n, sizeof *v, cmp_double);
    return n % 2 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]);
}

static double gauss(cdb_rng *r)
{
    double u1 = cdb_rng_unif(r) + 1e-12, u2 = cdb_rng_unif(r);
    return sqrt(-2 * log(u1)) * cos(6.283185307179586 * u2);
}

/* n x D: nc == 0 -> i.i.d. Gaussian; else around nc Gaussian centres. */
static float *make_data(size_t n, int nc, double sigma, uint64_t seed)
{
    cdb_rng r = {seed};
    float *x = malloc(n * D * sizeof *x), *c = NULL;
    size_t i, j;
    if (nc) {
        c = malloc((size_t)nc * D * sizeof *c);
        for (i = 0; i < (size_t)nc * D; i++) c[i] = (float)gauss(&r);
    }
    for (i = 0; i < n; i++) {
        const float *ci = nc ? c + (size_t)cdb_rng_below(&r, (uint64_t)nc) * D : NULL;
        for (j = 0; j < D; j++) x[i * D + j] = (ci ? ci[j] : 0.0f) + (float)(sigma * gauss(&r));
    }
    free(c);
    return x;
}

static double recall(const clipdb_hit *a, const clipdb_hit *ex, size_t nq)
{
    size_t i, hit = 0;
    int p, q;
    for (i = 0; i < nq; i++)
        for (p = 0; p < K; p++)
            for (q = 0; q < K; q++)
                if (ex[i * K + p].id == a[i * K + q].id) {
                    hit++;
                    break;
                }
    return (double)hit / (double)(nq * K);
}

static void die(const char *what, const char *msg)
{
    fprintf(stderr, "bench_search: %s: %s\n", what, msg);
    exit(1);
}

#define MAX_PROBES 16
#define MAX_SEEDS 32

/* Trains and fills both IVF100 indexes (cosine) with k-means seed `seed`
** (clipdb: the train option; Faiss: ClusteringParameters::seed). */
static void build_pair(const float *x, const int64_t *ids, size_t n, int d, uint64_t seed, clipdb_ivf **ivf,
                       cdb_faiss **fi, double *t_ours, double *t_faiss)
{
    clipdb_ivf_train_options to;
    double t0;
    clipdb_ivf_train_options_init(&to);
    to.seed = seed;
    t0 = cdb_now();
    if (clipdb_ivf_new(ivf, d, 100, CLIPDB_METRIC_COSINE) || clipdb_ivf_train(*ivf, x, n, &to) ||
        clipdb_ivf_add(*ivf, ids, x, n, NULL))
        die("ivf", clipdb_ivf_errmsg(*ivf));
    *t_ours = cdb_now() - t0;
    t0 = cdb_now();
    if (cdb_faiss_new(fi, d, "IVF100,Flat", CLIPDB_METRIC_COSINE) || cdb_faiss_set_train_seed(*fi, (int)seed) ||
        cdb_faiss_train(*fi, x, n) || cdb_faiss_add(*fi, ids, x, n))
        die("faiss IVF", cdb_faiss_errmsg(*fi));
    *t_faiss = cdb_now() - t0;
}

/* Median seconds of one batch search by clipdb (iv) or Faiss (f), after one
** warm-up call: at least 3 timed calls and at least 0.3 s in all (at most
** 64 calls). Each side is timed in its own block, never interleaved with the
** other: Faiss's OpenMP workers spin after a call and OpenBLAS's threads
** yield-wait after one, and on a 2-core machine a millisecond-long search
** started right after the other library's call runs against those threads
** (that skewed the low-nprobe figures by up to 5x). */
static double time_search(clipdb_ivf *iv, cdb_faiss *f, const float *q, size_t nq, int nprobe, clipdb_hit *out)
{
    double t[64], t0, total = 0;
    int r, n_out;
    for (r = -1; r < 64 && (r < 3 || total < 0.3); r++) {
        t0 = cdb_now();
        if (iv && clipdb_ivf_search(iv, q, nq, K, nprobe, NULL, out, &n_out)) die("ivf search", clipdb_ivf_errmsg(iv));
        if (f && cdb_faiss_search(f, q, nq, K, nprobe, out)) die("faiss search", cdb_faiss_errmsg(f));
        if (r >= 0) total += t[r] = cdb_now() - t0;
    }
    return median(t, r);
}

static void stats(const double *v, int n, double *mean, double *lo, double *hi)
{
    int i;
    *mean = 0;
    *lo = *hi = v[0];
    for (i = 0; i < n; i++) {
        *mean += v[i] / n;
        if (v[i] < *lo) *lo = v[i];
        if (v[i] > *hi) *hi = v[i];
    }
}

/* IVF100 (clipdb) against Faiss "IVF100,Flat", cosine: train + add time,
** then queries/s and recall@10 (against the exact answers ex) at each nprobe
** of probes[0..np). Speed: the indexes of k-means seed 1234 (both sides'
** default). Recall: the mean (and min..max) over `seeds` k-means seeds per
** side (1234, 1235, ...), because a single seed's recall moves by a few
** points on small data sets. Returns 1 if clipdb's mean recall falls below
** Faiss's by more than 0.02 at some nprobe. The seed-1234 indexes are
** handed back. x (n, d) with ids; q (nq, d). */
static int ivf_curve(const float *x, const int64_t *ids, size_t n, int d, const float *q, size_t nq,
                     const clipdb_hit *ex, clipdb_hit *ours, clipdb_hit *theirs, const int *probes, int np,
                     int seeds, clipdb_ivf **ivf_out, cdb_faiss **fi_out)
{
    double ts[1], tf[1], qs_o[MAX_PROBES], qs_f[MAX_PROBES], rec_o[MAX_PROBES][MAX_SEEDS],
        rec_f[MAX_PROBES][MAX_SEEDS];
    int i, s, n_out, fail = 0;
    clipdb_ivf *ivf = NULL;
    cdb_faiss *fi = NULL;

    if (np > MAX_PROBES || seeds < 1 || seeds > MAX_SEEDS) die("usage", "too many nprobe values or seeds");
    for (s = 0; s < seeds; s++) {
        clipdb_ivf *iv;
        cdb_faiss *f;
        build_pair(x, ids, n, d, 1234 + (uint64_t)s, &iv, &f, &ts[0], &tf[0]);
        if (s == 0) {
            printf("%-44s %10.2f s %10.2f s %8.2f\n", "IVF100 train + add (seconds)", ts[0], tf[0], tf[0] / ts[0]);
            ivf = iv;
            fi = f;
        }
        for (i = 0; i < np; i++) {
            if (clipdb_ivf_search(iv, q, nq, K, probes[i], NULL, ours, &n_out))
                die("ivf search", clipdb_ivf_errmsg(iv));
            if (cdb_faiss_search(f, q, nq, K, probes[i], theirs)) die("faiss search", cdb_faiss_errmsg(f));
            if (s == 0) { /* timed for seed 1234 only, each side in its own block */
                qs_o[i] = (double)nq / time_search(iv, NULL, q, nq, probes[i], ours);
                qs_f[i] = (double)nq / time_search(NULL, f, q, nq, probes[i], theirs);
            }
            rec_o[i][s] = recall(ours, ex, nq);
            rec_f[i][s] = recall(theirs, ex, nq);
        }
        if (s > 0) {
            clipdb_ivf_free(iv);
            cdb_faiss_free(f);
        }
    }
    for (i = 0; i < np; i++) {
        double mo, lo_o, hi_o, mf, lo_f, hi_f;
        char name[64];
        stats(rec_o[i], seeds, &mo, &lo_o, &hi_o);
        stats(rec_f[i], seeds, &mf, &lo_f, &hi_f);
        fail |= mo < mf - 0.02;
        snprintf(name, sizeof name, "IVF100 nprobe %2d, batch queries/s", probes[i]);
        if (seeds == 1)
            printf("%-44s %12.0f %12.0f %8.2f  recall@10 %.4f vs %.4f\n", name, qs_o[i], qs_f[i], qs_o[i] / qs_f[i],
                   mo, mf);
        else
            printf("%-44s %12.0f %12.0f %8.2f  recall@10 %.4f [%.4f, %.4f] vs %.4f [%.4f, %.4f]\n", name, qs_o[i],
                   qs_f[i], qs_o[i] / qs_f[i], mo, lo_o, hi_o, mf, lo_f, hi_f);
    }
    if (seeds > 1) printf("(recall: mean [min, max] over k-means seeds 1234..%d per side)\n", 1234 + seeds - 1);
    *ivf_out = ivf;
    *fi_out = fi;
    return fail;
}

/* --db FILE [--target image|text] [--nq NQ]: the IVF curve over a
** database's vectors (see the top of the file). */
static int bench_db_vectors(int argc, char **argv)
{
    const char *path = NULL;
    static const int probes[] = {1, 2, 3, 4, 5, 7, 10, 15, 20, 25};
    int target = CLIPDB_ITEM_IMAGE, i, n_out, fail, seeds = 16;
    size_t nq = 1000;
    clipdb_db *db = NULL;
    clipdb_db_options o;
    const cdb_vecset *base, *qs;
    clipdb_hit *ex, *ours, *theirs;
    clipdb_ivf *ivf = NULL;
    cdb_faiss *fi = NULL;
    clipdb_vecs bv;
    char *msg = NULL;

    for (i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--db") && i + 1 < argc) path = argv[++i];
        else if (!strcmp(argv[i], "--target") && i + 1 < argc) {
            i++;
            if (!strcmp(argv[i], "image")) target = CLIPDB_ITEM_IMAGE;
            else if (!strcmp(argv[i], "text")) target = CLIPDB_ITEM_TEXT;
            else die("usage", "--target is image or text");
        } else if (!strcmp(argv[i], "--nq") && i + 1 < argc) nq = (size_t)atol(argv[++i]);
        else if (!strcmp(argv[i], "--seeds") && i + 1 < argc) seeds = atoi(argv[++i]);
        else die("usage", "bench_search --db FILE [--target image|text] [--nq NQ] [--seeds S]");
    }
    if (!path || nq < 1) die("usage", "bench_search --db FILE [--target image|text] [--nq NQ]");
    clipdb_db_options_init(&o);
    o.readonly = 1;
    if (clipdb_db_open(&db, path, &o)) die(path, clipdb_db_errmsg(db));
    /* two loads: base's arrays stay valid (the sets are per type) */
    if (cdb_db_vectors(db, target, &base) ||
        cdb_db_vectors(db, target == CLIPDB_ITEM_IMAGE ? CLIPDB_ITEM_TEXT : CLIPDB_ITEM_IMAGE, &qs))
        die(path, clipdb_db_errmsg(db));
    if (base->n < 100 * 39) /* Faiss warns below 39 points per list; still runs */
        fprintf(stderr, "bench_search: only %zu base vectors for 100 lists (a check run)\n", base->n);
    if (base->n < 100 || qs->n < 1) die(path, "need at least 100 base vectors and 1 query");
    if (nq > qs->n) nq = qs->n;
    ex = malloc(nq * K * sizeof *ex);
    ours = malloc(nq * K * sizeof *ours);
    theirs = malloc(nq * K * sizeof *theirs);
    if (!ex || !ours || !theirs) die("memory", "out of memory");
    printf("clipdb bench_search --db %s: model %s, d %d, base %zu %s vectors, queries: the first %zu %s "
           "vectors, k %d, cosine, OpenBLAS threads %d\n\n",
           path, db->identity, db->embed_dim, base->n, target == CLIPDB_ITEM_IMAGE ? "image" : "text", nq,
           target == CLIPDB_ITEM_IMAGE ? "text" : "image", K, openblas_get_num_threads());
    printf("%-44s %12s %12s %8s  %s\n", "case", "clipdb", "faiss", "ratio", "check");
    bv = (clipdb_vecs){base->vecs, base->ids, base->norms, base->n, db->embed_dim};
    if (clipdb_flat_search(&bv, qs->vecs, nq, K, CLIPDB_METRIC_COSINE, NULL, ex, &n_out, &msg)) die("flat", msg);
    fail = ivf_curve(base->vecs, base->ids, base->n, db->embed_dim, qs->vecs, nq, ex, ours, theirs, probes,
                     (int)(sizeof probes / sizeof *probes), seeds, &ivf, &fi);

    printf("\nratio: > 1 means clipdb is faster. %s\n", fail ? "CORRECTNESS CHECK FAILED" : "all checks passed");
    clipdb_ivf_free(ivf);
    cdb_faiss_free(fi);
    clipdb_db_close(db);
    free(ex);
    free(ours);
    free(theirs);
    return fail;
}

/* The CPU's model name (from /proc/cpuinfo) into buf. */
static void cpu_model(char *buf, size_t len)
{
    FILE *f = fopen("/proc/cpuinfo", "r");
    char line[256];
    snprintf(buf, len, "unknown");
    while (f && fgets(line, sizeof line, f))
        if (!strncmp(line, "model name", 10) && strchr(line, ':')) {
            snprintf(buf, len, "%s", strchr(line, ':') + 2);
            buf[strcspn(buf, "\n")] = 0;
            break;
        }
    if (f) fclose(f);
}

/* Exact search on each compressed copy (sq8, bf16, fp16) + fp32 re-rank of
** the default candidates against the fp32 exact scan of the same set, cosine:
** build time and bytes, one-query median latency, nq queries in one call
** (the GEMM path), recall@10 against fp32 exact (fails below 0.999). ex
** holds the fp32 exact answers of the nq queries. Returns 1 on a failed check. */
static int bench_compressed(const clipdb_vecs *bv, const float *q, size_t nq, int warm, int n_single,
                            int reps, const clipdb_hit *ex, clipdb_hit *ours, clipdb_hit *theirs)
{
    static const clipdb_compress kinds[] = {CLIPDB_COMPRESS_SQ8, CLIPDB_COMPRESS_BF16, CLIPDB_COMPRESS_FP16};
    double ts[256], tf[256], lat_fp32 = 0, bt_fp32 = 0, t0;
    char cpu[200], *msg = NULL;
    int fail = 0, n_out = 0, i, r;
    size_t kk;
    cpu_model(cpu, sizeof cpu);
    printf("\ncompressed copies + fp32 re-rank (%d candidates) vs the fp32 exact scan, %zu x %d, cosine\n"
           "CPU: %s; dot kernels: %s; GEMM: %s; int8 code range +-%d\n",
           CLIPDB_CVECS_RERANK, bv->n, bv->d, cpu, cdb_ckern_best()->name, cdb_compute_describe(),
           cdb_int8_weight_max());
    /* fp32 side, measured in this run */
    for (i = 0; i < warm + n_single; i++) {
        const float *qi = q + (size_t)(i % (int)nq) * bv->d;
        t0 = cdb_now();
        if (clipdb_flat_search(bv, qi, 1, K, CLIPDB_METRIC_COSINE, NULL, theirs, &n_out, &msg)) die("flat", msg);
        if (i >= warm) tf[(i - warm) % 256] = cdb_now() - t0;
    }
    lat_fp32 = median(tf, n_single < 256 ? n_single : 256) * 1e3;
    for (r = 0; r < reps + 1; r++) {
        t0 = cdb_now();
        if (clipdb_flat_search(bv, q, nq, K, CLIPDB_METRIC_COSINE, NULL, ours, &n_out, &msg)) die("flat", msg);
        if (r) tf[r - 1] = cdb_now() - t0;
    }
    bt_fp32 = (double)nq / median(tf, reps);
    printf("%-30s %10s %12s %8s %12s %8s %10s %10s\n", "copy", "build s", "1 query ms", "x fp32",
           "batch q/s", "x fp32", "recall@10", "(1 query)");
    printf("%-30s %10s %12.3f %8.2f %12.0f %8.2f %10s %10s\n", "fp32 exact scan", "-", lat_fp32, 1.0, bt_fp32,
           1.0, "1", "1");
    for (kk = 0; kk < sizeof kinds / sizeof kinds[0]; kk++) {
        clipdb_cvecs *c = NULL;
        double build, lat, bt, rec1, recb;
        size_t found = 0;
        char name[64];
        t0 = cdb_now();
        if (clipdb_cvecs_build(bv, kinds[kk], NULL, &c, &msg)) die("compressed build", msg);
        build = cdb_now() - t0;
        for (i = 0; i < warm + n_single; i++) {
            const size_t qi = (size_t)(i % (int)nq);
            t0 = cdb_now();
            if (clipdb_cvecs_search(c, bv, q + qi * bv->d, 1, K, 0, CLIPDB_METRIC_COSINE, NULL, ours, &n_out,
                                    &msg))
                die("compressed search", msg);
            if (i >= warm) ts[(i - warm) % 256] = cdb_now() - t0;
            for (r = 0; r < K; r++)
                for (int r2 = 0; r2 < K; r2++) found += ours[r].id == ex[qi * K + r2].id;
        }
        lat = median(ts, n_single < 256 ? n_single : 256) * 1e3;
        rec1 = (double)found / ((double)(warm + n_single) * K);
        for (r = 0; r < reps + 1; r++) {
            t0 = cdb_now();
            if (clipdb_cvecs_search(c, bv, q, nq, K, 0, CLIPDB_METRIC_COSINE, NULL, ours, &n_out, &msg))
                die("compressed search", msg);
            if (r) ts[r - 1] = cdb_now() - t0;
        }
        bt = (double)nq / median(ts, reps);
        recb = recall(ours, ex, nq);
        snprintf(name, sizeof name, "%s (%zu MB)", clipdb_compress_name(kinds[kk]), clipdb_cvecs_bytes(c) >> 20);
        printf("%-30s %10.3f %12.3f %8.2f %12.0f %8.2f %10.4f %10.4f\n", name, build, lat, lat_fp32 / lat, bt,
               bt / bt_fp32, recb, rec1);
        fail |= rec1 < 0.999 || recb < 0.999;
        clipdb_cvecs_free(c);
    }
    printf("(fp32: %zu MB; 1 query: median of %d after %d warm-up; batch: %zu queries in one call, median of "
           "%d; recall@10 against fp32 exact)\n",
           (bv->n * (size_t)bv->d * sizeof(float)) >> 20, n_single < 256 ? n_single : 256, warm, nq, reps);
    return fail;
}

/* --compressed [N [NQ]]: only the compressed-copy block, on the clustered set. */
static int bench_compressed_only(int argc, char **argv)
{
    size_t n = argc > 2 ? (size_t)atol(argv[2]) : 100000, nq = argc > 3 ? (size_t)atol(argv[3]) : 1000;
    float *x, *norms;
    clipdb_hit *ex, *ours, *theirs;
    clipdb_vecs bv;
    char *msg = NULL;
    int n_out = 0, fail;
    if (n < 1 || nq < 1) die("usage", "bench_search --compressed [N [NQ]]");
    x = make_data(n + nq, 1000, 1.5, 3);
    norms = malloc(n * sizeof *norms);
    ex = malloc(nq * K * sizeof *ex);
    ours = malloc(nq * K * sizeof *ours);
    theirs = malloc(nq * K * sizeof *theirs);
    if (!x || !norms || !ex || !ours || !theirs) die("memory", "out of memory");
    clipdb_vec_norms(x, n, D, norms);
    bv = (clipdb_vecs){x, NULL, norms, n, D};
    if (clipdb_flat_search(&bv, x + n * D, nq, K, CLIPDB_METRIC_COSINE, NULL, ex, &n_out, &msg)) die("flat", msg);
    printf("clipdb bench_search --compressed: %zu base vectors, %zu queries (1000 Gaussian clusters)\n", n, nq);
    fail = bench_compressed(&bv, x + n * D, nq, 5, 101, 3, ex, ours, theirs);
    printf("\nratio: > 1 means the compressed copy is faster. %s\n", fail ? "CORRECTNESS CHECK FAILED" : "all checks passed");
    free(x), free(norms), free(ex), free(ours), free(theirs);
    return fail;
}

int main(int argc, char **argv)
{
    if (argc > 1 && !strcmp(argv[1], "--compressed")) return bench_compressed_only(argc, argv);
    if (argc > 1 && !strncmp(argv[1], "--", 2)) return bench_db_vectors(argc, argv);
    size_t n = argc > 1 ? (size_t)atol(argv[1]) : 100000, nq = argc > 2 ? (size_t)atol(argv[2]) : 1000;
    const int n_single = 200, warm = 10, reps = 3;
    float *x, *q, *norms;
    int64_t *ids;
    clipdb_hit *ex, *ours, *theirs;
    double t0, ts[256], tf[256], lat_ours, lat_faiss, bt_ours, bt_faiss, agree;
    int n_out, i, r, fail = 0;
    size_t j, same = 0;
    char *msg = NULL;
    cdb_faiss *fl = NULL, *fi = NULL;
    clipdb_ivf *ivf = NULL;
    clipdb_vecs bv;

    if (n < 1000 || nq < 1) die("usage", "bench_search [N >= 1000 [NQ]]");
    ids = malloc(n * sizeof *ids);
    norms = malloc(n * sizeof *norms);
    ex = malloc(nq * K * sizeof *ex);
    ours = malloc(nq * K * sizeof *ours);
    theirs = malloc(nq * K * sizeof *theirs);
    for (j = 0; j < n; j++) ids[j] = (int64_t)j;

    printf("clipdb bench_search: d %d, k %d, base %zu, queries %zu, OpenBLAS threads %d\n\n", D, K, n, nq,
           openblas_get_num_threads());
    printf("%-44s %12s %12s %8s  %s\n", "case", "clipdb", "faiss", "ratio", "check");

    /* ---- exact search, i.i.d. Gaussian vectors, cosine (Faiss: normalised + IndexFlatIP) ---- */
    x = make_data(n, 0, 1.0, 1);
    q = make_data(nq, 0, 1.0, 2);
    clipdb_vec_norms(x, n, D, norms);
    bv = (clipdb_vecs){x, ids, norms, n, D};
    if (cdb_faiss_new(&fl, D, "Flat", CLIPDB_METRIC_COSINE) || cdb_faiss_add(fl, ids, x, n))
        die("faiss Flat", cdb_faiss_errmsg(fl));
    for (i = 0; i < warm + n_single; i++) {
        const float *qi = q + (size_t)(i % (int)nq) * D;
        t0 = cdb_now();
        if (clipdb_flat_search(&bv, qi, 1, K, CLIPDB_METRIC_COSINE, NULL, ours, &n_out, &msg)) die("flat", msg);
        if (i >= warm) ts[(i - warm) % 256] = cdb_now() - t0;
        t0 = cdb_now();
        if (cdb_faiss_search(fl, qi, 1, K, 0, theirs)) die("faiss search", cdb_faiss_errmsg(fl));
        if (i >= warm) tf[(i - warm) % 256] = cdb_now() - t0;
        for (r = 0; r < K; r++) same += ours[r].id == theirs[r].id;
    }
    lat_ours = median(ts, n_single < 256 ? n_single : 256) * 1e3;
    lat_faiss = median(tf, n_single < 256 ? n_single : 256) * 1e3;
    agree = (double)same / ((double)(warm + n_single) * K);
    fail |= agree < 0.99;
    printf("%-44s %9.3f ms %9.3f ms %8.2f  ids agree %.4f\n", "exact 1 query, median latency", lat_ours,
           lat_faiss, lat_faiss / lat_ours, agree);

    for (r = 0; r < reps + 1; r++) {
        t0 = cdb_now();
        if (clipdb_flat_search(&bv, q, nq, K, CLIPDB_METRIC_COSINE, NULL, ex, &n_out, &msg)) die("flat", msg);
        if (r) ts[r - 1] = cdb_now() - t0;
        t0 = cdb_now();
        if (cdb_faiss_search(fl, q, nq, K, 0, theirs)) die("faiss search", cdb_faiss_errmsg(fl));
        if (r) tf[r - 1] = cdb_now() - t0;
    }
    bt_ours = (double)nq / median(ts, reps);
    bt_faiss = (double)nq / median(tf, reps);
    agree = recall(theirs, ex, nq);
    fail |= agree < 0.99;
    {
        char name[64];
        snprintf(name, sizeof name, "exact %zu queries in one call, queries/s", nq);
        printf("%-44s %12.0f %12.0f %8.2f  recall vs faiss %.4f\n", name, bt_ours, bt_faiss, bt_faiss > 0 ? bt_ours / bt_faiss : 0,
               agree);
    }
    cdb_faiss_free(fl);
    fl = NULL;
    free(x);
    free(q);

    /* ---- IVF, clustered vectors (1000 Gaussian clusters), cosine, nlist 100 ---- */
    x = make_data(n + nq, 1000, 1.5, 3);
    q = x + n * D;
    clipdb_vec_norms(x, n, D, norms);
    bv = (clipdb_vecs){x, ids, norms, n, D};
    if (clipdb_flat_search(&bv, q, nq, K, CLIPDB_METRIC_COSINE, NULL, ex, &n_out, &msg)) die("flat", msg);
    {
        static const int probes[] = {1, 2, 5, 10, 25};
        fail |= ivf_curve(x, ids, n, D, q, nq, ex, ours, theirs, probes, 5, 1, &ivf, &fi);
    }
    /* one query at a time at nprobe 10 */
    for (i = 0; i < warm + n_single; i++) {
        const float *qi = q + (size_t)(i % (int)nq) * D;
        t0 = cdb_now();
        if (clipdb_ivf_search(ivf, qi, 1, K, 10, NULL, ours, &n_out)) die("ivf search", clipdb_ivf_errmsg(ivf));
        if (i >= warm) ts[(i - warm) % 256] = cdb_now() - t0;
        t0 = cdb_now();
        if (cdb_faiss_search(fi, qi, 1, K, 10, theirs)) die("faiss search", cdb_faiss_errmsg(fi));
        if (i >= warm) tf[(i - warm) % 256] = cdb_now() - t0;
    }
    lat_ours = median(ts, n_single < 256 ? n_single : 256) * 1e3;
    lat_faiss = median(tf, n_single < 256 ? n_single : 256) * 1e3;
    printf("%-44s %9.3f ms %9.3f ms %8.2f\n", "IVF100 nprobe 10, 1 query, median latency", lat_ours, lat_faiss,
           lat_faiss / lat_ours);
    fail |= bench_compressed(&bv, q, nq, warm, n_single, reps, ex, ours, theirs);
    printf("\nratio: > 1 means clipdb is faster (compressed rows: > 1 means the copy is faster than fp32). %s\n",
           fail ? "CORRECTNESS CHECK FAILED" : "all checks passed");
    cdb_faiss_free(fi);
    clipdb_ivf_free(ivf);
    free(x);
    free(ids);
    free(norms);
    free(ex);
    free(ours);
    free(theirs);
    return fail;
}
