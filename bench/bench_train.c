/*
** bench_train: one training step of the C engine (src/train), timed.
**
**   bench_train MODEL_DIR [--batch 32] [--steps 5] [--seed 1] [--tokens 20]
**               [--precision fp32|bf16]
**
** A seeded random batch: pixels uniform in [-2, 2], texts of `tokens` ids
** (start, random words, end). One warm-up step (excluded), then `steps` timed
** steps (forward + backward of both towers, AdamW). Prints one line of
** key=value: median seconds per step, pairs/s, the first and last loss
** (the verification: the loss falls on a repeated batch), the peak
** resident memory of the process (ru_maxrss), and cores_busy = CPU time /
** wall time over the timed steps (2.0 = both cores busy throughout), and
** the precision of the GEMMs with the ISA oneDNN dispatched.
** bench/bench_train.py runs it beside PyTorch doing the same step.
*/
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>

#include "clipdb.h"
#include "compute/compute.h"
#include "model/model.h"
#include "train/train.h"

static int cmp_d(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

int main(int argc, char **argv)
{
    int batch = 32, steps = 5, tokens = 20, i, k, rc = 1;
    cdb_prec prec = CDB_PREC_FP32;
    char gemm[96];
    unsigned long long seed = 1;
    clipdb_model *m = NULL;
    cdb_trainer *t = NULL;
    cdb_train_opts o;
    cdb_train_stats st;
    cdb_err e = {0};
    float *px = NULL, first = 0.0f;
    int32_t *buf = NULL;
    const int32_t **ids = NULL;
    int *lens = NULL;
    double *sec = NULL, wall0 = 0.0, cpu0 = 0.0, wall = 0.0, cpu = 0.0;
    struct rusage ru;

    if (argc < 2) {
        fprintf(stderr, "usage: bench_train MODEL_DIR [--batch 32] [--steps 5] [--seed 1] "
                        "[--tokens 20] [--precision fp32|bf16]\n");
        return 2;
    }
    for (i = 2; i + 1 < argc; i += 2) {
        if (!strcmp(argv[i], "--batch")) batch = atoi(argv[i + 1]);
        else if (!strcmp(argv[i], "--steps")) steps = atoi(argv[i + 1]);
        else if (!strcmp(argv[i], "--seed")) seed = strtoull(argv[i + 1], NULL, 10);
        else if (!strcmp(argv[i], "--tokens")) tokens = atoi(argv[i + 1]);
        else if (!strcmp(argv[i], "--precision") && !strcmp(argv[i + 1], "fp32")) prec = CDB_PREC_FP32;
        else if (!strcmp(argv[i], "--precision") && !strcmp(argv[i + 1], "bf16")) prec = CDB_PREC_BF16;
        else return 2;
    }
    if (batch < 2 || steps < 1 || tokens < 2 || tokens > 77) return 2;
    if (clipdb_model_open(&m, argv[1])) {
        fprintf(stderr, "bench_train: %s\n", m ? clipdb_model_errmsg(m) : "cannot open");
        goto cleanup;
    }
    {
        const size_t S = (size_t)m->vision.image_size, np = (size_t)batch * 3 * S * S;
        px = malloc(np * sizeof *px);
        buf = calloc((size_t)batch * 77, sizeof *buf);
        ids = malloc((size_t)batch * sizeof *ids);
        lens = malloc((size_t)batch * sizeof *lens);
        sec = malloc((size_t)steps * sizeof *sec);
        if (!px || !buf || !ids || !lens || !sec) goto cleanup;
        for (size_t j = 0; j < np; j++) {
            seed = seed * 6364136223846793005ull + 1442695040888963407ull;
            px[j] = (float)((seed >> 40) % 4001) / 1000.0f - 2.0f;
        }
        for (k = 0; k < batch; k++) {
            int32_t *tk = buf + (size_t)k * 77;
            tk[0] = 49406;
            for (i = 1; i < tokens - 1; i++) {
                seed = seed * 6364136223846793005ull + 1442695040888963407ull;
                tk[i] = (int32_t)((seed >> 33) % 40000);
            }
            tk[tokens - 1] = 49407;
            ids[k] = tk;
            lens[k] = tokens;
        }
    }
    cdb_train_opts_init(&o);
    o.lr = 1e-5f;
    o.gemm = prec;
    if (cdb_trainer_new(&t, m, &o, &e)) {
        fprintf(stderr, "bench_train: %s\n", e.msg);
        goto cleanup;
    }
    for (i = -1; i < steps; i++) {
        if (cdb_train_step(t, px, ids, lens, batch, &st)) {
            fprintf(stderr, "bench_train: %s\n", cdb_trainer_errmsg(t));
            goto cleanup;
        }
        if (i < 0) first = st.loss;
        else sec[i] = st.seconds;
        if (i < 0) { /* utilisation over the timed steps: CPU time / wall time */
            getrusage(RUSAGE_SELF, &ru);
            cpu0 = ru.ru_utime.tv_sec + ru.ru_utime.tv_usec * 1e-6 + ru.ru_stime.tv_sec +
                   ru.ru_stime.tv_usec * 1e-6;
            wall0 = cdb_now();
        }
    }
    getrusage(RUSAGE_SELF, &ru);
    cpu = ru.ru_utime.tv_sec + ru.ru_utime.tv_usec * 1e-6 + ru.ru_stime.tv_sec +
          ru.ru_stime.tv_usec * 1e-6 - cpu0;
    wall = cdb_now() - wall0;
    qsort(sec, (size_t)steps, sizeof *sec, cmp_d);
    /* gemm=: the backend and oneDNN's ISA, one token ("onednn:avx512_core_bf16") */
    snprintf(gemm, sizeof gemm, "%s",
             prec == CDB_PREC_BF16 ? (cdb_gemm_bf16_native() ? cdb_onednn_isa() : "emulated-bf16")
                                   : cdb_compute_describe());
    for (char *c = gemm; *c; c++)
        if (*c == ' ') *c = ':';
    printf("median_s=%.4f pairs_per_s=%.3f loss_first=%.5f loss_last=%.5f peak_rss_mb=%.1f "
           "threads=%d cores_busy=%.2f precision=%s gemm=%s\n",
           sec[steps / 2], batch / sec[steps / 2], first, st.loss, ru.ru_maxrss / 1024.0,
           cdb_compute_threads(), cpu / wall, prec == CDB_PREC_BF16 ? "bf16" : "fp32", gemm);
    rc = 0;
cleanup:
    cdb_trainer_free(t);
    clipdb_model_close(m);
    free(px);
    free(buf);
    free(ids);
    free(lens);
    free(sec);
    return rc;
}
