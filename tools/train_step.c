/*
** train_step: a test-time tool exposing the training engine (src/train) to
** the reference test (tests/ref/test_train_reference.py).
**
**   train_step MODEL_DIR BATCH.bin OUTDIR [--steps N] [--lr X] [--wd X]
**              [--micro M] [--train all|proj|last:N] [--clip X] [--warmup N]
**              [--cosine TOTAL] [--smooth E] [--keep FILE --nkeep K]
**              [--texts K]
**
** BATCH.bin (little-endian): int32 n, int32 S, int32 C, then pixels
** float32 (n, 3, S, S), ids int32 (n, C) zero-padded, lens int32 (n).
** OUTDIR gets:
**   tensors.tsv     name, ndim, shape (comma-separated), offset, numel, trainable
**   grads.f32       the gradient of the loss at the initial weights (numel floats)
**   params1.f32     the parameters after one AdamW step
**   losses.txt      the loss of each of the N steps (before its update), one a line
** Every step is the same batch (so the curve falls). --keep: patch dropout,
** FILE holding int32 (n, K) increasing patch indices, the patches each image
** keeps (cdb_trainer_set_patches). --texts K: K captions per image
** (cdb_train_opts.texts_per_image); the batch's n rows are then K*m texts,
** row k*m + i the k-th caption of image i, and the engine gets the first
** m = n / K images (the other rows' pixels are not read).
*/
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "clipdb.h"
#include "model/model.h"
#include "train/train.h"

static int usage(void)
{
    fprintf(stderr,
            "usage: train_step MODEL_DIR BATCH.bin OUTDIR [--steps N] [--lr X] [--wd X]\n"
            "                  [--micro M] [--train all|proj|last:N] [--clip X] [--warmup N]\n"
            "                  [--cosine TOTAL] [--smooth LABEL_SMOOTHING]\n"
            "                  [--keep FILE --nkeep K] [--texts K]\n"
            "  Runs the training engine on one batch: gradient, one AdamW step, N steps.\n");
    return 2;
}

static int write_all(const char *dir, const char *name, const void *p, size_t n)
{
    char path[4096];
    FILE *f;
    int ok;
    snprintf(path, sizeof path, "%s/%s", dir, name);
    f = fopen(path, "wb");
    ok = f && fwrite(p, 1, n, f) == n;
    if (f && fclose(f) != 0) ok = 0;
    if (!ok) fprintf(stderr, "train_step: cannot write %s\n", path);
    return ok;
}

int main(int argc, char **argv)
{
    const char *model_dir, *batch_path, *outdir, *keep_path = NULL;
    cdb_train_opts o;
    clipdb_model *m = NULL;
    cdb_trainer *t = NULL;
    cdb_train_state s;
    cdb_train_stats st;
    cdb_err e = {0};
    FILE *f = NULL, *lf = NULL;
    int32_t hdr[3], *idbuf = NULL, *lens = NULL;
    const int32_t **ids = NULL;
    float *pixels = NULL;
    int32_t *keep = NULL;
    int steps = 1, i, rc = 1, n, S, C, nkeep = 0, ni, K;
    char path[4096];

    if (argc < 4) return usage();
    model_dir = argv[1], batch_path = argv[2], outdir = argv[3];
    cdb_train_opts_init(&o);
    for (i = 4; i < argc; i++) {
        if (!strcmp(argv[i], "--steps") && i + 1 < argc) steps = atoi(argv[++i]);
        else if (!strcmp(argv[i], "--lr") && i + 1 < argc) o.lr = strtof(argv[++i], NULL);
        else if (!strcmp(argv[i], "--wd") && i + 1 < argc) o.wd = strtof(argv[++i], NULL);
        else if (!strcmp(argv[i], "--micro") && i + 1 < argc) o.micro_batch = atoi(argv[++i]);
        else if (!strcmp(argv[i], "--clip") && i + 1 < argc) o.clip_grad = strtof(argv[++i], NULL);
        else if (!strcmp(argv[i], "--smooth") && i + 1 < argc)
            o.label_smoothing = strtof(argv[++i], NULL);
        else if (!strcmp(argv[i], "--warmup") && i + 1 < argc) o.warmup = atoi(argv[++i]);
        else if (!strcmp(argv[i], "--keep") && i + 1 < argc) keep_path = argv[++i];
        else if (!strcmp(argv[i], "--nkeep") && i + 1 < argc) nkeep = atoi(argv[++i]);
        else if (!strcmp(argv[i], "--texts") && i + 1 < argc)
            o.texts_per_image = atoi(argv[++i]);
        else if (!strcmp(argv[i], "--cosine") && i + 1 < argc) {
            o.schedule = CDB_SCHED_COSINE;
            o.total_steps = atol(argv[++i]);
        } else if (!strcmp(argv[i], "--train") && i + 1 < argc) {
            if (cdb_train_parse_what(argv[++i], &o, &e)) {
                fprintf(stderr, "train_step: %s\n", e.msg);
                return 2;
            }
        } else
            return usage();
    }
    if (steps < 1 || (keep_path && (nkeep < 1 || nkeep > 65536))) return usage();

    if (clipdb_model_open(&m, model_dir)) {
        fprintf(stderr, "train_step: %s\n", m ? clipdb_model_errmsg(m) : "cannot open model");
        goto cleanup;
    }
    f = fopen(batch_path, "rb");
    if (!f || fread(hdr, sizeof hdr, 1, f) != 1) {
        fprintf(stderr, "train_step: cannot read %s\n", batch_path);
        goto cleanup;
    }
    n = hdr[0], S = hdr[1], C = hdr[2];
    if (n < 2 || n > 4096 || S != m->vision.image_size || C < 1 || C > 4096) {
        fprintf(stderr, "train_step: bad batch header (n %d, S %d, C %d)\n", n, S, C);
        goto cleanup;
    }
    pixels = malloc((size_t)n * 3 * S * S * sizeof *pixels);
    idbuf = malloc((size_t)n * C * sizeof *idbuf);
    lens = malloc((size_t)n * sizeof *lens);
    ids = malloc((size_t)n * sizeof *ids);
    if (!pixels || !idbuf || !lens || !ids ||
        fread(pixels, sizeof *pixels, (size_t)n * 3 * S * S, f) != (size_t)n * 3 * S * S ||
        fread(idbuf, sizeof *idbuf, (size_t)n * C, f) != (size_t)n * C ||
        fread(lens, sizeof *lens, (size_t)n, f) != (size_t)n) {
        fprintf(stderr, "train_step: %s is truncated\n", batch_path);
        goto cleanup;
    }
    for (i = 0; i < n; i++) ids[i] = idbuf + (size_t)i * C;
    K = o.texts_per_image > 1 ? o.texts_per_image : 1;
    ni = n / K; /* images */
    if (ni * K != n || ni < 2) {
        fprintf(stderr, "train_step: %d texts are not %d captions each of >= 2 images\n", n, K);
        goto cleanup;
    }

    if (cdb_trainer_new(&t, m, &o, &e)) {
        fprintf(stderr, "train_step: %s\n", e.msg);
        goto cleanup;
    }
    if (keep_path) {
        FILE *kf = fopen(keep_path, "rb");
        int got = kf && (keep = malloc((size_t)ni * nkeep * sizeof *keep)) &&
                  fread(keep, sizeof *keep, (size_t)ni * nkeep, kf) == (size_t)ni * nkeep;
        if (kf) fclose(kf);
        if (!got) {
            fprintf(stderr, "train_step: cannot read %d x %d patch indices from %s\n", ni, nkeep,
                    keep_path);
            goto cleanup;
        }
        if (cdb_trainer_set_patches(t, keep, nkeep, ni)) {
            fprintf(stderr, "train_step: %s\n", cdb_trainer_errmsg(t));
            goto cleanup;
        }
    }
    cdb_trainer_state(t, &s);
    snprintf(path, sizeof path, "%s/tensors.tsv", outdir);
    lf = fopen(path, "w");
    if (!lf) goto cleanup;
    for (i = 0; i < s.n_tensors; i++) {
        const cdb_ptensor *pt = &s.tensors[i];
        fprintf(lf, "%s\t%d\t", pt->name, pt->ndim);
        for (int k = 0; k < pt->ndim; k++) fprintf(lf, "%s%lld", k ? "," : "", (long long)pt->shape[k]);
        fprintf(lf, "\t%zu\t%zu\t%d\n", pt->offset, pt->numel, pt->trainable);
    }
    fclose(lf);
    snprintf(path, sizeof path, "%s/losses.txt", outdir);
    lf = fopen(path, "w");
    if (!lf) goto cleanup;
    for (i = 0; i < steps; i++) {
        if (cdb_train_grad(t, pixels, ids, lens, ni, &st)) {
            fprintf(stderr, "train_step: %s\n", cdb_trainer_errmsg(t));
            goto cleanup;
        }
        if (i == 0 && !write_all(outdir, "grads.f32", s.grads, s.numel * sizeof(float)))
            goto cleanup;
        if (cdb_train_apply(t, &st)) {
            fprintf(stderr, "train_step: %s\n", cdb_trainer_errmsg(t));
            goto cleanup;
        }
        fprintf(lf, "%.9g\n", st.loss);
        if (i == 0 && !write_all(outdir, "params1.f32", s.params, s.numel * sizeof(float)))
            goto cleanup;
    }
    rc = 0;
cleanup:
    if (lf) fclose(lf);
    if (f) fclose(f);
    cdb_trainer_free(t);
    clipdb_model_close(m);
    free(pixels);
    free(idbuf);
    free(lens);
    free(ids);
    free(keep);
    return rc;
}
