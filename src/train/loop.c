/*
** loop.c: clipdb_finetune and clipdb_train (include/clipdb.h): one training
** loop over a cdb_tdata, with checkpoints, resumption, progress, validation
** recall, and the final model directory.
**
** Files of a run writing OUT:
**   OUT.ckpt/state.safetensors   the last checkpoint (ckpt.c)
**   OUT.ckpt/init/               clipdb train: the initial weights (arch.c)
**   OUT/                         the result, written at the end (writer.c);
**                                OUT.ckpt is removed once OUT is in place
** A run finds OUT.ckpt/state.safetensors and resumes from it when its
** configuration string (options, data fingerprint, starting model) is the
** one it would write itself; any other is refused, never overwritten.
**
** Determinism: the data order of epoch E is a seeded permutation, the
** caption of image I at step S and its augmentation are drawn from
** (seed, S, I) (data.c), and the engine is deterministic for a given batch,
** so a run resumed at step S reaches the weights of an uninterrupted one.
**
** With o->ema the loop also keeps an exponential moving average of all the
** weights (cdb_ema_update after each step, in the checkpoint as "ema"):
** validation measures it, the written model is it, and the last epoch
** measures the weights as trained too, for comparison.
*/
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "model/writer.h"
#include "train/loop.h"


void clipdb_train_options_init(clipdb_train_options *o)
{
    memset(o, 0, sizeof *o);
    o->split = "train";
    o->epochs = 5;
    o->batch = 32;
    o->lr = 5e-8f;
    o->wd = 1e-3f;
    o->beta1 = 0.9f;
    o->beta2 = 0.999f;
    o->eps = 1e-8f;
    o->schedule = "constant";
    o->train = "all";
    o->val_fraction = 0.1f;
    o->val_max = 1000;
    o->augment = 1;
    o->crop_min = 0.5f;
    o->captions_per_image = 1;
}

typedef struct run {
    const clipdb_train_options *o;
    const char *kind;          /* "finetune" or "train" */
    clipdb_model *m;
    cdb_trainer *t;
    cdb_tdata data;
    int augment;
    int out_dtype;             /* CDB_DT_* of the written weights */
    char *ckpt_dir, *ckpt_path;
    char *config;
    char *start;               /* what the run started from (model identity or arch) */
    float *ema;                /* the average of the weights (o->ema > 0), else NULL */
    int lock_fd;               /* flock on OUT.ckpt/lock, -1 when not held */
    cdb_err err;
} run;

static void run_free(run *r)
{
    if (r->lock_fd >= 0) close(r->lock_fd);
    cdb_trainer_free(r->t);
    clipdb_model_close(r->m);
    cdb_tdata_free(&r->data);
    free(r->ckpt_dir);
    free(r->ckpt_path);
    free(r->config);
    free(r->start);
    free(r->ema);
}

static int report(run *r, clipdb_train_progress *p, const char *event)
{
    p->event = event;
    return r->o->progress ? r->o->progress(r->o->progress_arg, p) : 0;
}

/* A SHA-256 over the training data (paths, captions, which are held out). */
static int data_fingerprint(const cdb_tdata *d, char hex[65], cdb_err *e)
{
    size_t i, j, len = 0, cap = 0;
    char *buf = NULL;
    int rc;
#define PUT(s)                                                                 \
    do {                                                                       \
        size_t n_ = strlen(s) + 1;                                             \
        if (cdb_grow((void **)&buf, &cap, len + n_, 1)) goto oom;              \
        memcpy(buf + len, s, n_);                                              \
        len += n_;                                                             \
    } while (0)
    for (i = 0; i < d->pairs->n; i++) {
        PUT(d->pairs->img[i].path);
        for (j = 0; j < d->pairs->img[i].n_captions; j++) PUT(d->pairs->img[i].captions[j]);
    }
    for (i = 0; i < d->n_val; i++) {
        char num[32];
        snprintf(num, sizeof num, "v%lld", (long long)d->val[i]);
        PUT(num);
    }
#undef PUT
    rc = cdb_sha256_hex(buf ? buf : "", len, hex, e);
    free(buf);
    return rc;
oom:
    free(buf);
    return cdb_err_set(e, CLIPDB_ENOMEM, "out of memory");
}

static int make_config(run *r)
{
    const clipdb_train_options *o = r->o;
    char hex[65];
    int rc = data_fingerprint(&r->data, hex, &r->err);
    if (rc) return rc;
    r->config = cdb_sprintf(
        "clipdb %s checkpoint v1\nstart %s\ndata %s %zu+%zu images\nepochs %d batch %d micro %d\n"
        "lr %.9g wd %.9g betas %.9g,%.9g eps %.9g warmup %d schedule %s clip %.9g\n"
        "train %s seed %llu augment %d crop %.9g\n",
        r->kind, r->start, hex, r->data.n_train, r->data.n_val, o->epochs, o->batch,
        o->micro_batch, (double)o->lr, (double)o->wd, (double)o->beta1, (double)o->beta2,
        (double)o->eps, o->warmup, o->schedule, (double)o->clip_grad, o->train,
        (unsigned long long)o->seed, r->augment, (double)o->crop_min);
    if (r->config && r->augment && o->text_drop > 0) { /* none adds no line, as before */
        char *c = cdb_sprintf("%stext_drop %.9g\n", r->config, (double)o->text_drop);
        free(r->config);
        r->config = c;
    }
    if (r->config && r->augment && o->patch_drop > 0) { /* none adds no line, as before */
        char *c = cdb_sprintf("%spatch_drop %.9g\n", r->config, (double)o->patch_drop);
        free(r->config);
        r->config = c;
    }
    if (r->config && o->label_smoothing > 0) { /* none adds no line, as before */
        char *c = cdb_sprintf("%slabel_smoothing %.9g\n", r->config, (double)o->label_smoothing);
        free(r->config);
        r->config = c;
    }
    if (r->config && o->ema > 0) { /* none adds no line, as before */
        char *c = cdb_sprintf("%sema %.9g\n", r->config, (double)o->ema);
        free(r->config);
        r->config = c;
    }
    if (r->config && o->captions_per_image > 1) { /* one adds no line, as before */
        char *c = cdb_sprintf("%scaptions_per_image %d\n", r->config, o->captions_per_image);
        free(r->config);
        r->config = c;
    }
    if (r->config && o->precision && strcmp(o->precision, "fp32")) { /* fp32 adds no line, as before */
        char *c = cdb_sprintf("%sprecision %s\n", r->config, o->precision);
        free(r->config);
        r->config = c;
    }
    return r->config ? CLIPDB_OK : cdb_err_set(&r->err, CLIPDB_ENOMEM, "out of memory");
}

/* Removes the partial checkpoints ("*.tmp.<pid>") of runs that were killed. */
static void remove_stale_tmp(const char *dir)
{
    DIR *d = opendir(dir);
    struct dirent *de;
    if (!d) return;
    while ((de = readdir(d)) != NULL) {
        if (strncmp(de->d_name, "state.safetensors.tmp.", 22) == 0) {
            char *p = cdb_path_join(dir, de->d_name);
            if (p) unlink(p);
            free(p);
        }
    }
    closedir(d);
}

/* Checks OUT and prepares OUT.ckpt before any work, so that a refused or
** unwritable target costs nothing. */
static int prepare_out(run *r, const char *out_dir)
{
    struct stat sb;
    if (!out_dir || !*out_dir) return cdb_err_set(&r->err, CLIPDB_EINVAL, "no --out given");
    if (lstat(out_dir, &sb) == 0 && !r->o->force)
        return cdb_err_set(&r->err, CLIPDB_EINVAL, "%s already exists; use --force to replace it",
                           out_dir);
    r->ckpt_dir = cdb_sprintf("%s.ckpt", out_dir);
    r->ckpt_path = r->ckpt_dir ? cdb_path_join(r->ckpt_dir, "state.safetensors") : NULL;
    if (!r->ckpt_path) return cdb_err_set(&r->err, CLIPDB_ENOMEM, "out of memory");
    if (mkdir(r->ckpt_dir, 0755) != 0 && errno != EEXIST)
        return cdb_err_set(&r->err, CLIPDB_EIO, "cannot create %s: %s", r->ckpt_dir,
                           strerror(errno));
    if (access(r->ckpt_dir, W_OK) != 0)
        return cdb_err_set(&r->err, CLIPDB_EIO, "cannot write in %s: %s", r->ckpt_dir,
                           strerror(errno));
    /* One run per OUT: a lock held until exit (released by the kernel if killed). */
    {
        char *lock = cdb_path_join(r->ckpt_dir, "lock");
        if (!lock) return cdb_err_set(&r->err, CLIPDB_ENOMEM, "out of memory");
        r->lock_fd = open(lock, O_RDWR | O_CREAT | O_CLOEXEC, 0644);
        free(lock);
        if (r->lock_fd < 0)
            return cdb_err_set(&r->err, CLIPDB_EIO, "cannot create a lock in %s: %s",
                               r->ckpt_dir, strerror(errno));
        if (flock(r->lock_fd, LOCK_EX | LOCK_NB) != 0) {
            close(r->lock_fd);
            r->lock_fd = -1;
            return cdb_err_set(&r->err, CLIPDB_EINVAL,
                               "another training run is writing %s (its checkpoints are in %s)",
                               out_dir, r->ckpt_dir);
        }
    }
    remove_stale_tmp(r->ckpt_dir);
    return CLIPDB_OK;
}

static int opts_to_engine(run *r, long total, cdb_train_opts *to)
{
    const clipdb_train_options *o = r->o;
    cdb_train_opts_init(to);
    to->lr = o->lr;
    to->wd = o->wd;
    to->beta1 = o->beta1;
    to->beta2 = o->beta2;
    to->eps = o->eps;
    to->warmup = o->warmup;
    to->total_steps = total;
    to->clip_grad = o->clip_grad;
    to->label_smoothing = o->label_smoothing;
    to->micro_batch = o->micro_batch;
    to->texts_per_image = o->captions_per_image;
    if (!o->precision || !strcmp(o->precision, "fp32"))
        to->gemm = CDB_PREC_FP32;
    else if (!strcmp(o->precision, "bf16"))
        to->gemm = CDB_PREC_BF16;
    else
        return cdb_err_set(&r->err, CLIPDB_EINVAL, "precision '%s' is not fp32 or bf16",
                           o->precision);
    if (!o->schedule || !strcmp(o->schedule, "constant"))
        to->schedule = CDB_SCHED_CONSTANT;
    else if (!strcmp(o->schedule, "cosine"))
        to->schedule = CDB_SCHED_COSINE;
    else
        return cdb_err_set(&r->err, CLIPDB_EINVAL, "schedule '%s' is not constant or cosine",
                           o->schedule);
    return cdb_train_parse_what(o->train ? o->train : "all", to, &r->err);
}

static int check_options(run *r)
{
    const clipdb_train_options *o = r->o;
    if (o->epochs < 1 || o->epochs > 1000000)
        return cdb_err_set(&r->err, CLIPDB_EINVAL, "--epochs %d is not in [1, 1000000]",
                           o->epochs);
    if (o->batch < 2 || o->batch > 65536)
        return cdb_err_set(&r->err, CLIPDB_EINVAL,
                           "--batch %d is not in [2, 65536] (the loss contrasts pairs)",
                           o->batch);
    if (o->micro_batch < 0 || o->micro_batch > o->batch)
        return cdb_err_set(&r->err, CLIPDB_EINVAL, "--micro-batch %d is not in [0, --batch]",
                           o->micro_batch);
    if (!(o->lr >= 0) || !(o->wd >= 0) || !(o->eps > 0) || !(o->beta1 >= 0 && o->beta1 < 1) ||
        !(o->beta2 >= 0 && o->beta2 < 1))
        return cdb_err_set(&r->err, CLIPDB_EINVAL,
                           "bad optimizer settings (lr and wd >= 0, eps > 0, betas in [0, 1))");
    if (o->warmup < 0) return cdb_err_set(&r->err, CLIPDB_EINVAL, "--warmup must be >= 0");
    if (!(o->crop_min > 0.0f && o->crop_min <= 1.0f)) /* also refuses NaN */
        return cdb_err_set(&r->err, CLIPDB_EINVAL, "--crop-min %g is not in (0, 1]",
                           (double)o->crop_min);
    if (!(o->label_smoothing >= 0.0f && o->label_smoothing < 1.0f))
        return cdb_err_set(&r->err, CLIPDB_EINVAL, "--label-smoothing %g is not in [0, 1)",
                           (double)o->label_smoothing);
    if (!(o->text_drop >= 0.0f && o->text_drop < 1.0f))
        return cdb_err_set(&r->err, CLIPDB_EINVAL, "--text-drop %g is not in [0, 1)",
                           (double)o->text_drop);
    if (!(o->patch_drop >= 0.0f && o->patch_drop < 1.0f))
        return cdb_err_set(&r->err, CLIPDB_EINVAL, "--patch-drop %g is not in [0, 1)",
                           (double)o->patch_drop);
    if (!(o->ema >= 0.0f && o->ema < 1.0f))
        return cdb_err_set(&r->err, CLIPDB_EINVAL, "--ema %g is not in [0, 1)", (double)o->ema);
    if (o->captions_per_image < 1 || o->captions_per_image > CDB_MAX_TEXTS_PER_IMAGE)
        return cdb_err_set(&r->err, CLIPDB_EINVAL, "--captions-per-image %d is not in 1..%d",
                           o->captions_per_image, CDB_MAX_TEXTS_PER_IMAGE);
    if (o->checkpoint_every < 0)
        return cdb_err_set(&r->err, CLIPDB_EINVAL, "--checkpoint-every must be >= 0");
    {
        cdb_train_opts to; /* the engine's own checks of schedule and --train, early */
        return opts_to_engine(r, 1, &to);
    }
}

/* The input model's weights must be finite (a NaN would poison the run). */
static int check_finite_model(run *r)
{
    cdb_wtensor *t = NULL;
    size_t n = 0, i, j, k;
    int rc = cdb_weights_layout(r->m, r->m->key_style, &t, &n, &r->err);
    for (i = 0; rc == CLIPDB_OK && i < n; i++) {
        size_t at = 0;
        for (k = 0; k < (size_t)t[i].n_parts && rc == CLIPDB_OK; k++)
            for (j = 0; j < t[i].part_n[k]; j++, at++)
                if (!isfinite(t[i].part[k][j])) {
                    rc = cdb_err_set(&r->err, CLIPDB_EFORMAT,
                                     "model %s: tensor '%s' holds %s; refusing to train on it",
                                     r->m->dir, t[i].name,
                                     isnan(t[i].part[k][j]) ? "NaN" : "an infinity");
                    break;
                }
    }
    free(t);
    return rc;
}

/* Recall at 1, 5, 10 of the held-out pairs, both directions, with the
** weights params (the trainer's layout; cosine, exact search) into t2i and
** i2t (-1 when there is nothing held out) and *pairs. */
static int validate(run *r, const float *params, float t2i[3], float i2t[3], long *pairs)
{
    const cdb_pairs *pp = r->data.pairs;
    clipdb_ctx *c = NULL;
    size_t nv = r->data.n_val, nc = 0, i, j, k;
    int e = r->m->embed_dim, rc, n_out = 0;
    float *iv = NULL, *tv = NULL;
    const char **texts = NULL, **paths = NULL;
    int64_t *owner = NULL;
    clipdb_hit *hits = NULL;
    size_t hit_t2i[3] = {0}, hit_i2t[3] = {0};
    static const int ks[3] = {1, 5, 10};
    char *msg = NULL;

    for (i = 0; i < 3; i++) t2i[i] = i2t[i] = -1;
    *pairs = 0;
    if (nv < 2) return CLIPDB_OK;
    if ((rc = cdb_trainer_sync_params(r->t, r->m, params))) {
        return cdb_err_set(&r->err, rc, "validation: %s", cdb_trainer_errmsg(r->t));
    }
    for (i = 0; i < nv; i++) nc += pp->img[r->data.val[i]].n_captions;
    if ((rc = clipdb_ctx_new(&c, r->m))) goto ctxfail;
    clipdb_ctx_set_truncate(c, 1);
    iv = cdb_malloc_array(nv, (size_t)e * sizeof *iv);
    tv = cdb_malloc_array(nc, (size_t)e * sizeof *tv);
    paths = cdb_malloc_array(nv, sizeof *paths);
    texts = cdb_malloc_array(nc, sizeof *texts);
    owner = cdb_malloc_array(nc, sizeof *owner);
    hits = cdb_malloc_array((nv > nc ? nv : nc) * 10, sizeof *hits);
    if (!iv || !tv || !paths || !texts || !owner || !hits) {
        rc = cdb_err_set(&r->err, CLIPDB_ENOMEM, "out of memory for validation");
        goto cleanup;
    }
    if (nv > INT_MAX || nc > INT_MAX) {
        rc = cdb_err_set(&r->err, CLIPDB_ELIMIT, "validation: more than %d images or captions",
                         INT_MAX);
        goto cleanup;
    }
    for (i = 0, k = 0; i < nv; i++) {
        const cdb_pair_image *im = &pp->img[r->data.val[i]];
        paths[i] = im->path;
        for (j = 0; j < im->n_captions; j++, k++) {
            texts[k] = im->captions[j];
            owner[k] = (int64_t)i;
        }
    }
    /* the one batched encoder, in its own groups; the first input that
    ** fails stops validation, named */
    // image files (nv) -> iv (nv, e); captions (nc) -> tv (nc, e)
    if ((rc = clipdb_encode_batch(c, CLIPDB_INPUT_IMAGE_FILE, paths, (int)nv, iv, NULL, NULL)) ||
        (rc = clipdb_encode_batch(c, CLIPDB_INPUT_TEXT, texts, (int)nc, tv, NULL, NULL)))
        goto ctxfail;
    {
        clipdb_vecs base_i = {iv, NULL, NULL, nv, e}, base_t = {tv, NULL, NULL, nc, e};
        int kk = nv < 10 ? (int)nv : 10;
        // text -> image: each caption's image among the top K of nv images
        rc = clipdb_flat_search(&base_i, tv, nc, kk, CLIPDB_METRIC_COSINE, NULL, hits, &n_out,
                                &msg);
        if (rc) goto searchfail;
        for (k = 0; k < nc; k++)
            for (j = 0; j < (size_t)n_out; j++)
                if (hits[k * (size_t)kk + j].id == owner[k]) {
                    for (i = 0; i < 3; i++) hit_t2i[i] += (int)j < ks[i];
                    break;
                }
        // image -> text: any of the image's captions among the top K of nc captions
        kk = nc < 10 ? (int)nc : 10;
        rc = clipdb_flat_search(&base_t, iv, nv, kk, CLIPDB_METRIC_COSINE, NULL, hits, &n_out,
                                &msg);
        if (rc) goto searchfail;
        for (k = 0; k < nv; k++)
            for (j = 0; j < (size_t)n_out; j++)
                if (owner[hits[k * (size_t)kk + j].id] == (int64_t)k) {
                    for (i = 0; i < 3; i++) hit_i2t[i] += (int)j < ks[i];
                    break;
                }
    }
    for (i = 0; i < 3; i++) {
        t2i[i] = (float)hit_t2i[i] / (float)nc;
        i2t[i] = (float)hit_i2t[i] / (float)nv;
    }
    *pairs = (long)nv;
    rc = CLIPDB_OK;
    goto cleanup;
ctxfail:
    rc = cdb_err_set(&r->err, rc, "validation: %s", clipdb_ctx_errmsg(c));
    goto cleanup;
searchfail:
    rc = cdb_err_set(&r->err, rc, "validation search: %s", msg ? msg : "failed");
cleanup:
    clipdb_free(msg);
    clipdb_ctx_free(c);
    free(iv);
    free(tv);
    free(paths);
    free(texts);
    free(owner);
    free(hits);
    return rc;
}

static char *made_json(run *r, long steps)
{
    const clipdb_train_options *o = r->o;
    char date[32];
    time_t now = time(NULL);
    struct tm tmv;
    char *json;
    gmtime_r(&now, &tmv);
    strftime(date, sizeof date, "%Y-%m-%dT%H:%M:%SZ", &tmv);
    json = cdb_sprintf(
        "{\n  \"made_by\": \"clipdb %s\",\n  \"clipdb_version\": \"%s\",\n"
        "  \"command\": %s%s%s,\n  \"seed\": %llu,\n  \"steps\": %ld,\n  \"epochs\": %d,\n"
        "  \"batch\": %d,\n  \"train_pairs\": %zu,\n  \"val_pairs\": %zu,\n"
        "  \"lr\": %.9g,\n  \"wd\": %.9g,\n  \"schedule\": \"%s\",\n  \"warmup\": %d,\n"
        "  \"train\": \"%s\",\n  \"augment\": %s,\n  \"crop_min\": %.6g,\n  \"text_drop\": %.6g,\n  \"patch_drop\": %.6g,\n  \"label_smoothing\": %.6g,\n  \"ema\": %.9g,\n  \"captions_per_image\": %d,\n  \"precision\": \"%s\",\n"
        "  \"start\": \"%s\",\n  \"date\": \"%s\"\n}\n",
        r->kind, CLIPDB_VERSION, o->command ? "\"" : "", o->command ? o->command : "null",
        o->command ? "\"" : "", (unsigned long long)o->seed, steps, o->epochs, o->batch,
        r->data.n_train, r->data.n_val, (double)o->lr, (double)o->wd, o->schedule, o->warmup,
        o->train, r->augment ? "true" : "false", (double)o->crop_min,
        (double)(r->augment ? o->text_drop : 0.0f), (double)(r->augment ? o->patch_drop : 0.0f),
        (double)o->label_smoothing, (double)o->ema, o->captions_per_image,
        o->precision ? o->precision : "fp32", r->start, date);
    return json;
}

static int write_result(run *r, const char *out_dir, long steps, clipdb_train_progress *p)
{
    cdb_model_write_opts wo = {0};
    char *json = NULL;
    int rc;
    cdb_train_state st;
    cdb_trainer_state(r->t, &st);
    if ((rc = cdb_trainer_sync_params(r->t, r->m, r->ema ? r->ema : st.params)))
        return cdb_err_set(&r->err, rc, "%s", cdb_trainer_errmsg(r->t));
    if (!(json = made_json(r, steps))) return cdb_err_set(&r->err, CLIPDB_ENOMEM, "out of memory");
    wo.style = r->m->key_style;
    wo.dtype = r->out_dtype;
    wo.made_json = json;
    wo.force = r->o->force;
    rc = cdb_model_write_dir(r->m, out_dir, &wo, &r->err);
    free(json);
    if (rc) return rc;
    cdb_rm_tree(r->ckpt_dir);
    p->path = out_dir;
    report(r, p, "done");
    return CLIPDB_OK;
}

float cdb_ema_decay(float decay, long steps)
{
    float warm = (float)(1.0 + (double)steps) / (float)(10.0 + (double)steps);
    return warm < decay ? warm : decay;
}

/* On the pool, in pieces of EMA_CHUNK floats (elementwise: the same floats
** whatever the split). */
#define EMA_CHUNK ((size_t)1 << 16)
typedef struct ema_job {
    float *avg;
    const float *w;
    size_t n;
    float d;
} ema_job;

static void ema_task(void *arg, size_t c)
{
    const ema_job *a = arg;
    const float k = 1.0f - a->d;
    const size_t lo = c * EMA_CHUNK, hi = a->n - lo < EMA_CHUNK ? a->n : lo + EMA_CHUNK;
    size_t i;
    for (i = lo; i < hi; i++) a->avg[i] = a->d * a->avg[i] + k * a->w[i];
}

void cdb_ema_update(float *avg, const float *w, size_t n, float d)
{
    ema_job a = {avg, w, n, d};
    cdb_pool_run((n + EMA_CHUNK - 1) / EMA_CHUNK, ema_task, &a);
}

/* Writes a checkpoint after `step` steps, with the order of the epoch the
** next step belongs to. */
static int save(run *r, long step, long spe, int64_t *order, long *order_epoch)
{
    cdb_ckpt_extra x;
    if (*order_epoch != step / spe) {
        cdb_tdata_order(r->o->seed, step / spe, r->data.n_train, order);
        *order_epoch = step / spe;
    }
    x.seed = r->o->seed;
    x.order = order;
    x.n_order = r->data.n_train;
    x.config = r->config;
    x.ema = r->ema;
    return cdb_ckpt_write(r->ckpt_path, r->t, &x, &r->err);
}

/* The loop proper: from r->m and r->data to out_dir. */
static int run_loop(run *r, const char *out_dir)
{
    const clipdb_train_options *o = r->o;
    const cdb_pairs *pp = r->data.pairs;
    size_t n = r->data.n_train, B = (size_t)o->batch, j, k;
    long spe, total, step, session_steps = 0, order_epoch = -1, saved_step = -1;
    int64_t *order = NULL;
    int32_t *keep = NULL; /* (B, nkeep) under patch dropout, else NULL */
    const int np = r->m->vision.grid * r->m->vision.grid;
    const int nkeep = cdb_tdata_patch_count(np, r->augment ? o->patch_drop : 0.0f);
    cdb_batch b;
    cdb_train_opts to;
    cdb_train_state st;
    clipdb_train_progress p;
    double t0 = cdb_now(), loss_sum = 0;
    long loss_n = 0;
    int rc, stop = 0;

    memset(&b, 0, sizeof b);
    memset(&p, 0, sizeof p);
    for (j = 0; j < 3; j++) p.val_t2i[j] = p.val_i2t[j] = p.val_raw_t2i[j] = p.val_raw_i2t[j] = -1;
    if (n < B) {
        return cdb_err_set(&r->err, CLIPDB_EINVAL,
                           "%zu image-caption pairs to train on, fewer than --batch %zu",
                           n, B);
    }
    if (r->m->vision.rn && r->augment && o->patch_drop > 0.0f)
        return cdb_err_set(&r->err, CLIPDB_EINVAL,
                           "--patch-drop needs a ViT image tower; this model's is a ResNet");
    spe = (long)(n / B);
    total = spe * o->epochs;
    if ((rc = opts_to_engine(r, total, &to))) return rc;
    if ((rc = cdb_trainer_new(&r->t, r->m, &to, &r->err))) return rc;
    if ((rc = make_config(r))) return rc;
    cdb_trainer_state(r->t, &st);
    if (o->ema > 0) { /* the initial weights; a checkpoint replaces them */
        if (!(r->ema = cdb_malloc_array(st.numel, sizeof *r->ema)))
            return cdb_err_set(&r->err, CLIPDB_ENOMEM, "out of memory");
        memcpy(r->ema, st.params, st.numel * sizeof *r->ema);
    }
    if (!(order = cdb_malloc_array(n, sizeof *order)))
        return cdb_err_set(&r->err, CLIPDB_ENOMEM, "out of memory");
    if (nkeep < np && !(keep = cdb_malloc_array(B * (size_t)nkeep, sizeof *keep))) {
        free(order);
        return cdb_err_set(&r->err, CLIPDB_ENOMEM, "out of memory");
    }
    p.epochs = o->epochs;
    p.total_steps = total;
    p.steps_per_epoch = (int)spe;
    p.pairs = (long)(spe * (long)B);
    if (cdb_file_exists(r->ckpt_path)) {
        if ((rc = cdb_ckpt_read(r->ckpt_path, r->t, r->config, order, n, r->ema, &r->err)))
            goto cleanup;
        cdb_trainer_state(r->t, &st);
        order_epoch = st.step / spe;
        saved_step = st.step;
        p.step = st.step;
        p.path = r->ckpt_path;
        if (report(r, &p, "resume")) stop = 1;
    } else {
        p.path = NULL;
        if (report(r, &p, "start")) stop = 1;
    }
    if ((rc = cdb_batch_init(&b, o->batch, o->captions_per_image, r->m->vision.image_size, r->m->text.context,
                             r->augment ? 0 : pp->n, &r->err)))
        goto cleanup;
    cdb_trainer_state(r->t, &st);
    for (step = st.step; step < total && !stop; ) {
        long epoch = step / spe, bi = step % spe;
        cdb_train_stats ts;
        if (order_epoch != epoch) {
            cdb_tdata_order(o->seed, epoch, n, order);
            order_epoch = epoch;
        }
        for (j = 0; j < B; j++) {
            size_t img = (size_t)r->data.train[order[(size_t)bi * B + j]];
            size_t cap = (size_t)(cdb_tdraw(o->seed, CDB_DRAW_CAPTION, (uint64_t)step, img) %
                                  pp->img[img].n_captions);
            rc = cdb_batch_load(&b, (int)j, pp, img, cap, r->m->tok, r->augment,
                                o->crop_min, r->augment ? o->text_drop : 0.0f, o->seed, step,
                                &r->err);
            for (k = 1; rc == CLIPDB_OK && k < (size_t)o->captions_per_image; k++)
                rc = cdb_batch_load_text(&b, (int)(k * B + j), pp, img,
                                         (cap + k) % pp->img[img].n_captions, r->m->tok,
                                         r->augment ? o->text_drop : 0.0f,
                                         cdb_tdraw(o->seed, CDB_DRAW_TEXT_DROP_K, (uint64_t)step,
                                                   (uint64_t)img * CDB_MAX_TEXTS_PER_IMAGE + k),
                                         &r->err);
            if (rc) goto cleanup;
        }
        if (keep) {
            for (j = 0; j < B; j++)
                cdb_tdata_patches(o->seed, step, (size_t)r->data.train[order[(size_t)bi * B + j]],
                                  np, nkeep, keep + (size_t)j * nkeep);
            if ((rc = cdb_trainer_set_patches(r->t, keep, nkeep, (int)B))) {
                rc = cdb_err_set(&r->err, rc, "%s", cdb_trainer_errmsg(r->t));
                goto cleanup;
            }
        }
        rc = cdb_train_step(r->t, b.pixels, (const int32_t *const *)b.ids, b.lens, (int)B, &ts);
        if (rc) {
            rc = cdb_err_set(&r->err, rc, "step %ld: %s", step + 1, cdb_trainer_errmsg(r->t));
            goto cleanup;
        }
        step++;
        session_steps++;
        if (r->ema) cdb_ema_update(r->ema, st.params, st.numel, cdb_ema_decay(o->ema, step));
        loss_sum += ts.loss;
        loss_n++;
        p.step = step;
        p.epoch = (int)(epoch + 1);
        p.loss = ts.loss;
        p.lr = ts.lr;
        p.elapsed_s = cdb_now() - t0;
        p.pairs_per_s = p.elapsed_s > 0 ? (double)(session_steps * (long)B) / p.elapsed_s : 0;
        p.eta_s = session_steps ? p.elapsed_s / (double)session_steps * (double)(total - step) : 0;
        p.path = NULL;
        if (report(r, &p, "step")) stop = 1;
        if (step % spe == 0) { /* end of an epoch */
            if ((rc = validate(r, r->ema ? r->ema : st.params, p.val_t2i, p.val_i2t,
                               &p.val_pairs)))
                goto cleanup;
            if (r->ema && step == total && /* the last: the weights as trained, too */
                (rc = validate(r, st.params, p.val_raw_t2i, p.val_raw_i2t, &p.val_pairs)))
                goto cleanup;
            p.loss = (float)(loss_sum / (double)(loss_n ? loss_n : 1));
            loss_sum = 0;
            loss_n = 0;
            if (report(r, &p, "epoch")) stop = 1;
            for (j = 0; j < 3; j++)
                p.val_t2i[j] = p.val_i2t[j] = p.val_raw_t2i[j] = p.val_raw_i2t[j] = -1;
        }
        if (step < total &&
            (stop || step % spe == 0 || (o->checkpoint_every && step % o->checkpoint_every == 0))) {
            if ((rc = save(r, step, spe, order, &order_epoch))) goto cleanup;
            saved_step = step;
            p.path = r->ckpt_path;
            if (report(r, &p, "checkpoint")) stop = 1;
        }
    }
    if (step < total) {
        /* stopped before the first step of this session: still leave a checkpoint */
        if (saved_step != step && (rc = save(r, step, spe, order, &order_epoch))) goto cleanup;
        p.path = r->ckpt_path;
        report(r, &p, "stopped");
        rc = cdb_err_set(&r->err, CLIPDB_ESTOPPED,
                         "stopped at step %ld of %ld; the checkpoint %s resumes it", step, total,
                         r->ckpt_path);
        goto cleanup;
    }
    rc = write_result(r, out_dir, total, &p);
cleanup:
    free(order);
    free(keep);
    cdb_batch_free(&b);
    return rc;
}

static int finish(run *r, int rc, char **errmsg)
{
    /* a run that failed before its first checkpoint leaves nothing behind */
    if (rc != CLIPDB_OK && rc != CLIPDB_ESTOPPED && r->lock_fd >= 0 && r->ckpt_path &&
        !cdb_file_exists(r->ckpt_path))
        cdb_rm_tree(r->ckpt_dir);
    if (errmsg) *errmsg = rc ? cdb_strdup(r->err.msg[0] ? r->err.msg : clipdb_status_name(rc))
                             : NULL;
    run_free(r);
    return rc;
}

static int dtype_of(const char *name)
{
    return !name ? 0 : !strcmp(name, "F16") ? CDB_DT_F16 : !strcmp(name, "BF16") ? CDB_DT_BF16
                                                                                 : CDB_DT_F32;
}

int clipdb_finetune(const char *db_path, const char *model_dir, const char *out_dir,
                    const clipdb_train_options *o, char **errmsg)
{
    run r;
    clipdb_db *db = NULL;
    clipdb_db_options dopt;
    cdb_pairs *pairs = NULL;
    int rc;
    size_t i;

    memset(&r, 0, sizeof r);
    r.lock_fd = -1;
    r.o = o;
    r.kind = "finetune";
    r.augment = 0; /* the paper fine-tunes without augmentation */
    if ((rc = check_options(&r)) || (rc = prepare_out(&r, out_dir))) return finish(&r, rc, errmsg);
    rc = clipdb_model_open(&r.m, model_dir);
    if (rc) {
        cdb_err_set(&r.err, rc, "%s", clipdb_model_errmsg(r.m));
        return finish(&r, rc, errmsg);
    }
    if ((rc = check_finite_model(&r))) return finish(&r, rc, errmsg);
    r.out_dtype = dtype_of(o->out_dtype ? o->out_dtype : r.m->dtype);
    r.start = cdb_strdup(clipdb_model_identity(r.m) ? clipdb_model_identity(r.m) : "?");
    clipdb_db_options_init(&dopt);
    dopt.readonly = 1;
    dopt.model_dir = model_dir;
    rc = clipdb_db_open(&db, db_path, &dopt);
    if (rc) {
        cdb_err_set(&r.err, rc, "%s", clipdb_db_errmsg(db));
        clipdb_db_close(db);
        return finish(&r, rc, errmsg);
    }
    rc = cdb_db_pairs(db, o->split && *o->split ? o->split : NULL, &pairs);
    if (rc == CLIPDB_OK && pairs->n == 0) {
        char *splits = NULL;
        cdb_db_split_counts(db, &splits);
        if (splits && !*splits)
            rc = cdb_err_set(&r.err, CLIPDB_EINVAL,
                             "%s holds no images with captions%s%s%s (add them with "
                             "'clipdb add DB --images DIR --captions FILE')",
                             db_path, o->split ? " in split '" : "", o->split ? o->split : "",
                             o->split ? "'" : "");
        else
            rc = cdb_err_set(&r.err, CLIPDB_EINVAL,
                             "%s: no captioned images in split '%s'; its splits: %s", db_path,
                             o->split ? o->split : "", splits ? splits : "?");
        free(splits);
    } else if (rc) {
        cdb_err_set(&r.err, rc, "%s", clipdb_db_errmsg(db));
    }
    clipdb_db_close(db);
    if (rc) {
        cdb_pairs_free(pairs);
        return finish(&r, rc, errmsg);
    }
    r.data.pairs = pairs;
    r.data.train = cdb_malloc_array(pairs->n, sizeof *r.data.train);
    if (!r.data.train || !r.start)
        return finish(&r, cdb_err_set(&r.err, CLIPDB_ENOMEM, "out of memory"), errmsg);
    for (i = 0; i < pairs->n; i++) r.data.train[i] = (int64_t)i;
    r.data.n_train = pairs->n;
    if (pairs->n < (size_t)o->batch)
        return finish(&r,
                      cdb_err_set(&r.err, CLIPDB_EINVAL,
                                  "split '%s' has %zu captioned images, fewer than --batch %d",
                                  o->split ? o->split : "(all)", pairs->n, o->batch),
                      errmsg);
    rc = run_loop(&r, out_dir);
    return finish(&r, rc, errmsg);
}

int clipdb_train(const char *images_dir, const char *captions_path, const char *out_dir,
                 const clipdb_train_options *o, char **errmsg)
{
    run r;
    cdb_arch a;
    char *init = NULL;
    size_t missing = 0;
    int rc;

    memset(&r, 0, sizeof r);
    r.lock_fd = -1;
    r.o = o;
    r.kind = "train";
    r.augment = o->augment;
    if ((rc = check_options(&r)) || (rc = cdb_arch_parse(o->arch, &a, &r.err)))
        return finish(&r, rc, errmsg);
    if (!o->tokenizer_dir)
        return finish(&r,
                      cdb_err_set(&r.err, CLIPDB_EINVAL,
                                  "no --tokenizer DIR (a directory with CLIP's "
                                  "bpe_simple_vocab_16e6.txt.gz or vocab.json + merges.txt)"),
                      errmsg);
    if (!(o->val_fraction >= 0 && o->val_fraction < 1))
        return finish(&r, cdb_err_set(&r.err, CLIPDB_EINVAL, "--val must be in [0, 1)"), errmsg);
    if ((rc = prepare_out(&r, out_dir))) return finish(&r, rc, errmsg);
    rc = cdb_tdata_from_files(images_dir, captions_path, o->split, o->val_split,
                              o->val_fraction, o->val_max, o->seed, &r.data, &missing, &r.err);
    if (rc) return finish(&r, rc, errmsg);
    if (r.data.n_train == 0)
        return finish(&r,
                      cdb_err_set(&r.err, CLIPDB_EINVAL,
                                  "no captioned images of %s found under %s%s%s%s (%zu listed "
                                  "but missing)",
                                  captions_path, images_dir, o->split ? " in split '" : "",
                                  o->split ? o->split : "", o->split ? "'" : "", missing),
                      errmsg);
    /* The initial weights, written once: a resumed run reloads the same file. */
    r.start = cdb_sprintf("arch %s seed %llu", o->arch, (unsigned long long)o->seed);
    init = r.ckpt_dir ? cdb_path_join(r.ckpt_dir, "init") : NULL;
    if (!r.start || !init) {
        free(init);
        return finish(&r, cdb_err_set(&r.err, CLIPDB_ENOMEM, "out of memory"), errmsg);
    }
    if (!cdb_file_exists(r.ckpt_path)) {
        cdb_rm_tree(init);
        rc = cdb_arch_init_dir(&a, o->seed, o->tokenizer_dir, init, &r.err);
    }
    if (rc == CLIPDB_OK) {
        rc = clipdb_model_open(&r.m, init);
        if (rc) cdb_err_set(&r.err, rc, "%s", clipdb_model_errmsg(r.m));
    }
    free(init);
    if (rc) return finish(&r, rc, errmsg);
    r.out_dtype = dtype_of(o->out_dtype ? o->out_dtype : "F32");
    rc = run_loop(&r, out_dir);
    return finish(&r, rc, errmsg);
}
