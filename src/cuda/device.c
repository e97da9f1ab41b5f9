/*
** device.c: choosing the device (include/clipdb.h, "devices"): parsing,
** resolving AUTO, and the encoding context's GPU towers. Compiled in every
** build; without CUDA the backend calls (stub.c) answer "built without CUDA".
*/
#include <stdlib.h>
#include <string.h>

#include "cuda/cuda.h"
#include "model/model.h"

int clipdb_device_parse(const char *spec, clipdb_device *dev, clipdb_precision *vec_prec)
{
    static const struct { const char *name; clipdb_device d; } devs[] = {
        {"cpu", CLIPDB_DEVICE_CPU}, {"cuda", CLIPDB_DEVICE_CUDA}, {"auto", CLIPDB_DEVICE_AUTO}};
    static const struct { const char *name; clipdb_precision p; } precs[] = {
        {"fp32", CLIPDB_PRECISION_FP32}, {"fp16", CLIPDB_PRECISION_FP16},
        {"bf16", CLIPDB_PRECISION_BF16}};
    const char *colon;
    size_t len, i;
    if (!spec || !dev || !vec_prec) return CLIPDB_EINVAL;
    colon = strchr(spec, ':');
    len = colon ? (size_t)(colon - spec) : strlen(spec);
    for (i = 0; i < sizeof devs / sizeof devs[0]; i++)
        if (strlen(devs[i].name) == len && !strncmp(spec, devs[i].name, len)) break;
    if (i == sizeof devs / sizeof devs[0]) return CLIPDB_EINVAL;
    *dev = devs[i].d;
    *vec_prec = CLIPDB_PRECISION_FP32;
    if (!colon) return CLIPDB_OK;
    for (i = 0; i < sizeof precs / sizeof precs[0]; i++)
        if (!strcmp(colon + 1, precs[i].name)) {
            *vec_prec = precs[i].p;
            return CLIPDB_OK;
        }
    return CLIPDB_EINVAL;
}

cdb_cuda_dtype cdb_cuda_dtype_of(clipdb_precision p)
{
    return p == CLIPDB_PRECISION_BF16 ? CDB_CUDA_BF16
         : p == CLIPDB_PRECISION_FP16 ? CDB_CUDA_F16 : CDB_CUDA_F32;
}

const char *clipdb_device_name(clipdb_device d)
{
    switch (d) {
    case CLIPDB_DEVICE_CPU: return "cpu";
    case CLIPDB_DEVICE_CUDA: return "cuda";
    case CLIPDB_DEVICE_AUTO: return "auto";
    }
    return "?";
}

int cdb_device_resolve(clipdb_device want, clipdb_device *got, cdb_err *e)
{
    cdb_err probe;
    if (want != CLIPDB_DEVICE_CPU && want != CLIPDB_DEVICE_CUDA && want != CLIPDB_DEVICE_AUTO)
        return cdb_err_set(e, CLIPDB_EINVAL, "unknown device %d", (int)want);
    if (want == CLIPDB_DEVICE_CPU) {
        *got = CLIPDB_DEVICE_CPU;
        return CLIPDB_OK;
    }
    cdb_err_clear(&probe);
    if (cdb_cuda_probe(&probe) == CLIPDB_OK) {
        *got = CLIPDB_DEVICE_CUDA;
        return CLIPDB_OK;
    }
    if (want == CLIPDB_DEVICE_AUTO) {
        *got = CLIPDB_DEVICE_CPU;
        return CLIPDB_OK;
    }
    return cdb_err_set(e, CLIPDB_ENODEV, "%s", probe.msg);
}

int clipdb_device_resolve(clipdb_device want, clipdb_device *got, char **errmsg)
{
    cdb_err e;
    int rc;
    if (errmsg) *errmsg = NULL;
    if (!got) return CLIPDB_EINVAL;
    cdb_err_clear(&e);
    rc = cdb_device_resolve(want, got, &e);
    if (rc != CLIPDB_OK && errmsg) *errmsg = cdb_strdup(e.msg);
    return rc;
}

/* The GPU towers of a context (cdb_encoder_ops): uploaded at the first
** encode, in the model's precision, and kept until the context goes. */
typedef struct gpu_encoder {
    const clipdb_model *m;
    cdb_cuda_dtype dt;
    cdb_cuda_model *g;
} gpu_encoder;

static int gpu_ready(gpu_encoder *x, cdb_err *e)
{
    if (x->g) return CLIPDB_OK;
    return cdb_cuda_model_new(&x->g, x->m, x->dt, e);
}

static int gpu_images(void *self, const float *pixels, int n, float *out, cdb_err *e)
{
    gpu_encoder *x = self;
    int rc = gpu_ready(x, e);
    // pixels (n, 3, S, S) -> out (n, embed_dim) on the GPU
    return rc != CLIPDB_OK ? rc : cdb_cuda_encode_images(x->g, pixels, n, out, e);
}

static int gpu_texts(void *self, const int32_t *const *ids, const int *lens, int n, float *out,
                     cdb_err *e)
{
    gpu_encoder *x = self;
    int rc = gpu_ready(x, e);
    // ids (n texts) -> out (n, embed_dim) on the GPU
    return rc != CLIPDB_OK ? rc : cdb_cuda_encode_texts(x->g, ids, lens, n, out, e);
}

static void gpu_free(void *self)
{
    gpu_encoder *x = self;
    if (!x) return;
    cdb_cuda_model_free(x->g);
    free(x);
}

static const cdb_encoder_ops gpu_ops = {gpu_images, gpu_texts, gpu_free};

int clipdb_ctx_set_device(clipdb_ctx *c, clipdb_device dev)
{
    clipdb_device got;
    clipdb_model *m;
    cdb_err *e;
    gpu_encoder *x;
    int rc;
    if (!c) return CLIPDB_EINVAL;
    e = cdb_ctx_err(c);
    m = cdb_ctx_model(c);
    cdb_err_clear(e);
    if ((rc = cdb_device_resolve(dev, &got, e)) != CLIPDB_OK) return rc;
    if (got == CLIPDB_DEVICE_CPU) {
        cdb_ctx_set_encoder(c, NULL, NULL);
        return CLIPDB_OK;
    }
    if (!m) return cdb_err_set(e, CLIPDB_EINVAL, "context has no model");
    /* the GPU towers compute as the CPU ones in the model's precision */
    if (m->prec != CDB_PREC_FP32 && m->prec != CDB_PREC_BF16)
        return cdb_err_set(e, CLIPDB_EINVAL,
                           "the GPU encoders run in fp32 or bf16; this model is opened in %s "
                           "(use --device cpu)",
                           clipdb_precision_name((clipdb_precision)m->prec));
    if (!(x = calloc(1, sizeof *x))) return cdb_err_set(e, CLIPDB_ENOMEM, "out of memory");
    x->m = m;
    x->dt = m->prec == CDB_PREC_BF16 ? CDB_CUDA_BF16 : CDB_CUDA_F32;
    cdb_ctx_set_encoder(c, &gpu_ops, x);
    return CLIPDB_OK;
}
