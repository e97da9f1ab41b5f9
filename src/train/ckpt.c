/*
** ckpt.c: training checkpoints (see loop.h). A checkpoint is one safetensors
** file written atomically (writer.c: tmp + fsync + rename), holding
**   params, adam_m, adam_v   F32 (numel): the engine's flat arrays
**   step                     I64 [1]: optimizer steps taken
**   rng                      U64 [2]: the seed and the step; every random draw
**                            of a run is a function of them (data.c)
**   order                    I64 (n): the current epoch's data order
**   config                   U8 (len): the run's configuration string; a
**                            checkpoint is only resumed by the same one
**   layout                   U8 (len): the engine's tensor names and sizes
**   ema                      F32 (numel): the average of the weights, when
**                            the run keeps one (--ema)
** The previous checkpoint is replaced only once the new one is complete on
** disk, so a crash or a full disk while writing leaves it intact.
*/
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "model/writer.h"
#include "train/loop.h"

/* "name numel\n" per engine tensor: a fingerprint of the parameter layout. */
static char *layout_string(const cdb_train_state *s)
{
    char *acc = cdb_strdup(""), *next;
    int i;
    for (i = 0; acc && i < s->n_tensors; i++) {
        next = cdb_sprintf("%s%s %zu\n", acc, s->tensors[i].name, s->tensors[i].numel);
        free(acc);
        acc = next;
    }
    return acc;
}

static void raw(cdb_wtensor *t, const char *name, const char *dtype, int64_t n, const void *data,
                size_t bytes)
{
    memset(t, 0, sizeof *t);
    snprintf(t->name, sizeof t->name, "%s", name);
    t->ndim = 1;
    t->shape[0] = n;
    t->raw = data;
    t->raw_dtype = dtype;
    t->raw_bytes = bytes;
}

static void f32(cdb_wtensor *t, const char *name, const float *data, size_t n)
{
    memset(t, 0, sizeof *t);
    snprintf(t->name, sizeof t->name, "%s", name);
    t->ndim = 1;
    t->shape[0] = (int64_t)n;
    t->part[0] = data;
    t->part_n[0] = n;
    t->n_parts = 1;
}

int cdb_ckpt_write(const char *path, cdb_trainer *t, const cdb_ckpt_extra *x, cdb_err *e)
{
    cdb_train_state s;
    cdb_wtensor w[9];
    int64_t step;
    uint64_t rng[2];
    char *layout;
    int rc;

    cdb_trainer_state(t, &s);
    step = s.step;
    rng[0] = x->seed;
    rng[1] = (uint64_t)s.step;
    if (!(layout = layout_string(&s))) return cdb_err_set(e, CLIPDB_ENOMEM, "out of memory");
    f32(&w[0], "params", s.params, s.numel);
    f32(&w[1], "adam_m", s.m, s.numel);
    f32(&w[2], "adam_v", s.v, s.numel);
    raw(&w[3], "step", "I64", 1, &step, sizeof step);
    raw(&w[4], "rng", "U64", 2, rng, sizeof rng);
    raw(&w[5], "order", "I64", (int64_t)x->n_order, x->order, x->n_order * sizeof(int64_t));
    raw(&w[6], "config", "U8", (int64_t)strlen(x->config), x->config, strlen(x->config));
    raw(&w[7], "layout", "U8", (int64_t)strlen(layout), layout, strlen(layout));
    if (x->ema) f32(&w[8], "ema", x->ema, s.numel);
    {
        const char *mk[1] = {"clipdb_checkpoint"}, *mv[1] = {"1"};
        rc = cdb_st_write(path, w, x->ema ? 9 : 8, CDB_DT_F32, mk, mv, 1, e);
    }
    free(layout);
    if (rc != CLIPDB_OK) cdb_err_prefix(e, "checkpoint");
    return rc;
}

/* The tensor `name` with dtype name `dt` and exactly `bytes` bytes. */
static const cdb_tensor *need(const cdb_safetensors *st, const char *name, const char *dt,
                              size_t bytes, const char *path, cdb_err *e)
{
    const cdb_tensor *t = cdb_st_find(st, name);
    if (!t || strcmp(t->dtype_name, dt) || t->nbytes != bytes) {
        cdb_err_set(e, CLIPDB_EFORMAT,
                    "checkpoint %s: tensor '%s' is missing or not %zu bytes of %s", path, name,
                    bytes, dt);
        return NULL;
    }
    return t;
}

int cdb_ckpt_read(const char *path, cdb_trainer *t, const char *config, int64_t *order,
                  size_t n_order, float *ema, cdb_err *e)
{
    cdb_safetensors *st = NULL;
    cdb_train_state s;
    const cdb_tensor *tc, *tl, *tp, *tm, *tv, *ts, *to, *ta = NULL;
    char *layout = NULL;
    int64_t step;
    int rc;

    cdb_trainer_state(t, &s);
    if ((rc = cdb_st_open(path, &st, e))) return rc;
    if (!(layout = layout_string(&s))) {
        rc = cdb_err_set(e, CLIPDB_ENOMEM, "out of memory");
        goto cleanup;
    }
    tc = cdb_st_find(st, "config");
    if (!tc || strcmp(tc->dtype_name, "U8") || tc->nbytes != strlen(config) ||
        memcmp(tc->data, config, tc->nbytes)) {
        rc = cdb_err_set(e, CLIPDB_EMISMATCH,
                         "checkpoint %s was written by a run with other options or data; "
                         "run the same command to resume it, or delete it to start over",
                         path);
        goto cleanup;
    }
    tl = cdb_st_find(st, "layout");
    if (!tl || tl->nbytes != strlen(layout) || memcmp(tl->data, layout, tl->nbytes)) {
        rc = cdb_err_set(e, CLIPDB_EMISMATCH,
                         "checkpoint %s holds parameters of another model shape", path);
        goto cleanup;
    }
    if (!(tp = need(st, "params", "F32", s.numel * 4, path, e)) ||
        !(tm = need(st, "adam_m", "F32", s.numel * 4, path, e)) ||
        !(tv = need(st, "adam_v", "F32", s.numel * 4, path, e)) ||
        !(ts = need(st, "step", "I64", 8, path, e)) ||
        !(to = need(st, "order", "I64", n_order * 8, path, e)) ||
        (ema && !(ta = need(st, "ema", "F32", s.numel * 4, path, e)))) {
        rc = CLIPDB_EFORMAT;
        goto cleanup;
    }
    memcpy(&step, ts->data, sizeof step);
    if (step < 0) {
        rc = cdb_err_set(e, CLIPDB_EFORMAT, "checkpoint %s: negative step", path);
        goto cleanup;
    }
    {
        size_t i;
        memcpy(order, to->data, n_order * sizeof *order);
        for (i = 0; i < n_order; i++)
            if (order[i] < 0 || (size_t)order[i] >= n_order) {
                rc = cdb_err_set(e, CLIPDB_EFORMAT, "checkpoint %s: data order out of range",
                                 path);
                goto cleanup;
            }
    }
    memcpy(s.params, tp->data, s.numel * sizeof(float));
    memcpy(s.m, tm->data, s.numel * sizeof(float));
    memcpy(s.v, tv->data, s.numel * sizeof(float));
    if (ema) memcpy(ema, ta->data, s.numel * sizeof(float));
    cdb_trainer_set_step(t, (long)step);
cleanup:
    free(layout);
    cdb_st_close(st);
    return rc;
}
