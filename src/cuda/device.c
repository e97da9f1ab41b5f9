/*
** device.c: choosing the device (include/clipdb.h, "devices"): parsing,
** resolving AUTO, and the encoding context's GPU towers. Compiled in every
** build; without CUDA the backend calls (stub.c) answer "built without CUDA".
*/
#include <stdlib.h>
#include <string.h>

#include "cuda/cuda.h"
#include "model/model.h"

int clipdb_device_parse(const char *spec, clipdb_device *dev, clipdb_precision *prec)
{
    static const struct { const char *name; clipdb_device d; } devs[] = {
        {"cpu", CLIPDB_DEVICE_CPU}, {"cuda", CLIPDB_DEVICE_CUDA}, {"auto", CLIPDB_DEVICE_AUTO}};
    static const struct { const char *name; clipdb_precision p; } precs[] = {
        {"fp32", CLIPDB_PREC_FP32}, {"fp16", CLIPDB_PREC_FP16}, {"bf16", CLIPDB_PREC_BF16}};
    const char *colon;
    size_t len, i;
    if (!spec || !dev || !prec) return CLIPDB_EINVAL;
    colon = strchr(spec, ':');
    len = colon ? (size_t)(colon - spec) : strlen(spec);
    for (i = 0; i < sizeof devs / sizeof devs[0]; i++)
        if (strlen(devs[i].name) == len && !strncmp(spec, devs[i].name, len)) break;
    if (i == sizeof devs / sizeof devs[0]) return CLIPDB_EINVAL;
    *dev = devs[i].d;
    *prec = CLIPDB_PREC_FP32;
    if (!colon) return CLIPDB_OK;
    for (i = 0; i < sizeof precs / sizeof precs[0]; i++)
        if (!strcmp(colon + 1, precs[i].name)) {
            *prec = precs[i].p;
            return CLIPDB_OK;
        }
    return CLIPDB_EINVAL;
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

int clipdb_ctx_set_device(clipdb_ctx *c, clipdb_device dev, clipdb_precision prec)
{
    clipdb_device got;
    int rc;
    if (!c) return CLIPDB_EINVAL;
    cdb_err_clear(&c->err);
    if (prec != CLIPDB_PREC_FP32 && prec != CLIPDB_PREC_FP16 && prec != CLIPDB_PREC_BF16)
        return cdb_err_set(&c->err, CLIPDB_EINVAL, "unknown precision %d", (int)prec);
    if ((rc = cdb_device_resolve(dev, &got, &c->err)) != CLIPDB_OK) return rc;
    /* the encoders run in fp32 or bf16 */
    if (prec == CLIPDB_PREC_FP16) prec = CLIPDB_PREC_FP32;
    if ((int)got != c->device || (int)prec != c->precision) {
        cdb_cuda_model_free(c->gpu);
        c->gpu = NULL;
    }
    c->device = (int)got;
    c->precision = (int)prec;
    return CLIPDB_OK;
}

int cdb_cuda_ctx_model(clipdb_ctx *c, cdb_cuda_model **out)
{
    int rc;
    if (!c->gpu &&
        (rc = cdb_cuda_model_new(&c->gpu, c->m, (cdb_cuda_dtype)c->precision, &c->err)) != CLIPDB_OK)
        return rc;
    *out = c->gpu;
    return CLIPDB_OK;
}
