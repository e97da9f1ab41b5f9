/*
** arch.c: architecture specs of from-scratch models and CLIP's
** initialisation (see loop.h). The initial weights are written as an
** ordinary model directory, so that training starts from a model loaded
** like any other.
*/
#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "model/transformer.h"
#include "model/writer.h"
#include "train/loop.h"

#define ARCH_MAX_SIDE 1024
#define ARCH_MAX_WIDTH 4096
#define ARCH_MAX_LAYERS 64
#define ARCH_MAX_CONTEXT 1024
#define ARCH_MAX_EMBED 4096

/* Reads "key=N" pairs separated by ',' from s (up to end) into the named slots. */
typedef struct kv {
    const char *key;
    int *slot;
    int max;
} kv;

static int parse_kvs(const char *part, const char *s, const char *end, kv *kvs, int n,
                     cdb_err *e)
{
    while (s < end) {
        const char *comma = memchr(s, ',', (size_t)(end - s)), *eq;
        const char *stop = comma ? comma : end;
        int i, found = 0;
        long v;
        char *vend;
        eq = memchr(s, '=', (size_t)(stop - s));
        if (!eq)
            return cdb_err_set(e, CLIPDB_EINVAL, "arch: '%.*s' in %s is not key=value",
                               (int)(stop - s), s, part);
        for (i = 0; i < n; i++) {
            if (strlen(kvs[i].key) != (size_t)(eq - s) || strncmp(kvs[i].key, s, (size_t)(eq - s)))
                continue;
            errno = 0;
            v = strtol(eq + 1, &vend, 10);
            if (vend != stop || eq + 1 == stop || errno || v < 1 || v > kvs[i].max)
                return cdb_err_set(e, CLIPDB_EINVAL,
                                   "arch: %s %s='%.*s' is not an integer in [1, %d]", part,
                                   kvs[i].key, (int)(stop - eq - 1), eq + 1, kvs[i].max);
            *kvs[i].slot = (int)v;
            found = 1;
        }
        if (!found)
            return cdb_err_set(e, CLIPDB_EINVAL, "arch: unknown key '%.*s' in %s",
                               (int)(eq - s), s, part);
        s = comma ? comma + 1 : end;
    }
    return CLIPDB_OK;
}

static int check_heads(const char *tower, int width, int heads, cdb_err *e)
{
    if (width % CDB_HEAD_DIM)
        return cdb_err_set(e, CLIPDB_EINVAL, "arch: %s width %d is not a multiple of %d", tower,
                           width, CDB_HEAD_DIM);
    if (heads && heads != width / CDB_HEAD_DIM)
        return cdb_err_set(e, CLIPDB_EINVAL,
                           "arch: %s heads=%d, but heads are width/%d = %d in CLIP's encoder",
                           tower, heads, CDB_HEAD_DIM, width / CDB_HEAD_DIM);
    return CLIPDB_OK;
}

int cdb_arch_parse(const char *spec, cdb_arch *a, cdb_err *e)
{
    int vheads = 0, theads = 0, rc, have_v = 0, have_t = 0;
    const char *s = spec;
    memset(a, 0, sizeof *a);
    a->context = CLIPDB_TEXT_CONTEXT;
    if (!spec || !*spec) return cdb_err_set(e, CLIPDB_EINVAL, "arch: empty spec");
    while (*s) {
        const char *semi = strchr(s, ';'), *end = semi ? semi : s + strlen(s);
        if (!strncmp(s, "vit:", 4)) {
            kv k[] = {{"image", &a->image, ARCH_MAX_SIDE}, {"patch", &a->patch, ARCH_MAX_SIDE},
                      {"width", &a->vwidth, ARCH_MAX_WIDTH},
                      {"layers", &a->vlayers, ARCH_MAX_LAYERS},
                      {"heads", &vheads, ARCH_MAX_WIDTH}};
            if ((rc = parse_kvs("vit", s + 4, end, k, 5, e))) return rc;
            have_v = 1;
        } else if (!strncmp(s, "text:", 5)) {
            kv k[] = {{"width", &a->twidth, ARCH_MAX_WIDTH},
                      {"layers", &a->tlayers, ARCH_MAX_LAYERS},
                      {"heads", &theads, ARCH_MAX_WIDTH},
                      {"context", &a->context, ARCH_MAX_CONTEXT}};
            if ((rc = parse_kvs("text", s + 5, end, k, 4, e))) return rc;
            have_t = 1;
        } else if (!strncmp(s, "embed=", 6)) {
            kv k[] = {{"embed", &a->embed, ARCH_MAX_EMBED}};
            if ((rc = parse_kvs("embed", s, end, k, 1, e))) return rc;
        } else {
            return cdb_err_set(e, CLIPDB_EINVAL,
                               "arch: '%.*s' is not a part (vit:..., text:..., embed=N)",
                               (int)(end - s), s);
        }
        s = semi ? semi + 1 : end;
    }
    if (!have_v || !a->image || !a->patch || !a->vwidth || !a->vlayers)
        return cdb_err_set(e, CLIPDB_EINVAL,
                           "arch: needs vit:image=S,patch=P,width=W,layers=L");
    if (!have_t || !a->twidth || !a->tlayers)
        return cdb_err_set(e, CLIPDB_EINVAL, "arch: needs text:width=W,layers=L");
    if (!a->embed) return cdb_err_set(e, CLIPDB_EINVAL, "arch: needs embed=E");
    if (a->image % a->patch)
        return cdb_err_set(e, CLIPDB_EINVAL, "arch: image %d is not a multiple of patch %d",
                           a->image, a->patch);
    if (a->context < 2) return cdb_err_set(e, CLIPDB_EINVAL, "arch: context must be >= 2");
    if ((rc = check_heads("vit", a->vwidth, vheads, e)) ||
        (rc = check_heads("text", a->twidth, theads, e)))
        return rc;
    return CLIPDB_OK;
}

/* ---- initialisation ------------------------------------------------------- */

typedef struct init_rng {
    cdb_rng r;
    int have;
    double spare;
} init_rng;

/* Standard normal (Box-Muller). */
static double gauss(init_rng *g)
{
    double u, v;
    if (g->have) {
        g->have = 0;
        return g->spare;
    }
    do u = cdb_rng_unif(&g->r);
    while (u <= 0.0);
    v = cdb_rng_unif(&g->r);
    g->spare = sqrt(-2.0 * log(u)) * sin(2.0 * M_PI * v);
    g->have = 1;
    return sqrt(-2.0 * log(u)) * cos(2.0 * M_PI * v);
}

static void fill_normal(init_rng *g, float *x, size_t n, double std)
{
    size_t i;
    for (i = 0; i < n; i++) x[i] = (float)(std * gauss(g));
}

static void fill_uniform(init_rng *g, float *x, size_t n, double bound)
{
    size_t i;
    for (i = 0; i < n; i++) x[i] = (float)((2.0 * cdb_rng_unif(&g->r) - 1.0) * bound);
}

static void fill_const(float *x, size_t n, float v)
{
    size_t i;
    for (i = 0; i < n; i++) x[i] = v;
}

/* Carves n floats off the arena. */
static float *take(float **at, size_t n)
{
    float *p = *at;
    *at += n;
    return p;
}

static size_t tower_floats(int d, int layers, int e)
{
    size_t f = 4 * (size_t)d, per = 2 * (size_t)d + 3 * (size_t)d * d + 3 * (size_t)d +
                                    (size_t)d * d + d + 2 * (size_t)d + f * d + f + d * f + d;
    return per * (size_t)layers + 2 * (size_t)d + (size_t)d * e;
}

/* The blocks of one tower. text: OpenAI's initialize_parameters (attention
** std d^-0.5, out_proj and c_proj std d^-0.5 (2L)^-0.5, c_fc std (2d)^-0.5);
** vision: PyTorch defaults (MultiheadAttention: xavier_uniform in_proj, zero
** biases; Linear: U(+-1/sqrt(fan_in)) weights and biases). Gains 1, biases 0
** in LayerNorms. */
static void init_tower(init_rng *g, cdb_tower *t, float **at, int d, int layers, int e,
                       int text)
{
    int i, f = 4 * d;
    double attn_std = pow(d, -0.5), proj_std = pow(d, -0.5) * pow(2.0 * layers, -0.5);
    double fc_std = pow(2.0 * d, -0.5);
    t->width = d;
    t->layers = layers;
    t->heads = d / CDB_HEAD_DIM;
    t->mlp = f;
    for (i = 0; i < layers; i++) {
        cdb_block *b = &t->blocks[i];
        float *w, *p;
        size_t dd = (size_t)d * d;
        b->ln1_w = p = take(at, (size_t)d);
        fill_const(p, (size_t)d, 1.0f);
        b->ln1_b = p = take(at, (size_t)d);
        fill_const(p, (size_t)d, 0.0f);
        // in_proj_weight (3d, d)
        w = take(at, 3 * dd);
        if (text) fill_normal(g, w, 3 * dd, attn_std);
        else fill_uniform(g, w, 3 * dd, sqrt(6.0 / (double)(d + 3 * d)));
        b->wq = w;
        b->wk = w + dd;
        b->wv = w + 2 * dd;
        p = take(at, 3 * (size_t)d);
        fill_const(p, 3 * (size_t)d, 0.0f);
        b->bq = p;
        b->bk = p + d;
        b->bv = p + 2 * d;
        // out_proj (d, d)
        b->wo = p = take(at, dd);
        if (text) fill_normal(g, p, dd, proj_std);
        else fill_uniform(g, p, dd, 1.0 / sqrt(d));
        b->bo = p = take(at, (size_t)d);
        fill_const(p, (size_t)d, 0.0f);
        b->ln2_w = p = take(at, (size_t)d);
        fill_const(p, (size_t)d, 1.0f);
        b->ln2_b = p = take(at, (size_t)d);
        fill_const(p, (size_t)d, 0.0f);
        // c_fc (f, d), c_proj (d, f); biases keep nn.Linear's default in both towers
        b->fc1_w = p = take(at, (size_t)f * d);
        if (text) fill_normal(g, p, (size_t)f * d, fc_std);
        else fill_uniform(g, p, (size_t)f * d, 1.0 / sqrt(d));
        b->fc1_b = p = take(at, (size_t)f);
        fill_uniform(g, p, (size_t)f, 1.0 / sqrt(d));
        b->fc2_w = p = take(at, (size_t)d * f);
        if (text) fill_normal(g, p, (size_t)d * f, proj_std);
        else fill_uniform(g, p, (size_t)d * f, 1.0 / sqrt(f));
        b->fc2_b = p = take(at, (size_t)d);
        fill_uniform(g, p, (size_t)d, 1.0 / sqrt(f));
    }
    t->ln_post_w = take(at, (size_t)d);
    fill_const((float *)t->ln_post_w, (size_t)d, 1.0f);
    t->ln_post_b = take(at, (size_t)d);
    fill_const((float *)t->ln_post_b, (size_t)d, 0.0f);
    // proj (d, e): scale d^-0.5 (visual: width^-0.5 * randn; text_projection: std width^-0.5)
    t->proj = take(at, (size_t)d * e);
    fill_normal(g, (float *)t->proj, (size_t)d * e, pow(d, -0.5));
    t->proj_transposed = 0;
}

int cdb_arch_init_dir(const cdb_arch *a, uint64_t seed, const char *tok_dir, const char *dir,
                      cdb_err *e)
{
    clipdb_model m;
    cdb_tokenizer *tok = NULL;
    cdb_model_write_opts wo = {0};
    init_rng g = {{seed ^ 0x636c697069696e74ull}, 0, 0.0};
    float *arena = NULL, *at;
    size_t total, grid = (size_t)(a->image / a->patch), npos = grid * grid + 1;
    int rc, vocab;
    double scale = pow(a->vwidth, -0.5), fan_in = 3.0 * a->patch * a->patch;

    memset(&m, 0, sizeof m);
    if ((rc = cdb_tok_load_dir(tok_dir, &tok, e))) {
        cdb_err_prefix(e, "tokenizer %s", tok_dir);
        return rc;
    }
    vocab = cdb_tok_vocab_size(tok);
    cdb_tok_free(tok);
    total = (size_t)a->vwidth * 3 * a->patch * a->patch + (size_t)a->vwidth +
            npos * a->vwidth + 2 * (size_t)a->vwidth +
            tower_floats(a->vwidth, a->vlayers, a->embed) + (size_t)vocab * a->twidth +
            (size_t)a->context * a->twidth + tower_floats(a->twidth, a->tlayers, a->embed);
    arena = cdb_malloc_array(total, sizeof *arena);
    m.vision.t.blocks = cdb_calloc_array((size_t)a->vlayers, sizeof(cdb_block));
    m.text.t.blocks = cdb_calloc_array((size_t)a->tlayers, sizeof(cdb_block));
    if (!arena || !m.vision.t.blocks || !m.text.t.blocks) {
        rc = cdb_err_set(e, CLIPDB_ENOMEM, "out of memory for %zu initial weights", total);
        goto cleanup;
    }
    at = arena;
    m.embed_dim = a->embed;
    m.key_style = "openai";
    m.dtype = "F32";
    m.logit_scale = logf(1.0f / 0.07f);
    /* vision: conv1 (d, 3, P, P) as nn.Conv2d's default (kaiming_uniform a=sqrt(5):
    ** U(+-1/sqrt(fan_in))); class and position embeddings scale * randn */
    m.vision.image_size = a->image;
    m.vision.patch = a->patch;
    m.vision.grid = (int)grid;
    m.vision.n_pos = (int)npos;
    m.vision.patch_w = take(&at, (size_t)a->vwidth * 3 * a->patch * a->patch);
    fill_uniform(&g, (float *)m.vision.patch_w, (size_t)a->vwidth * 3 * a->patch * a->patch,
                 1.0 / sqrt(fan_in));
    m.vision.class_emb = take(&at, (size_t)a->vwidth);
    fill_normal(&g, (float *)m.vision.class_emb, (size_t)a->vwidth, scale);
    m.vision.pos_emb = take(&at, npos * a->vwidth);
    fill_normal(&g, (float *)m.vision.pos_emb, npos * a->vwidth, scale);
    m.vision.ln_pre_w = take(&at, (size_t)a->vwidth);
    fill_const((float *)m.vision.ln_pre_w, (size_t)a->vwidth, 1.0f);
    m.vision.ln_pre_b = take(&at, (size_t)a->vwidth);
    fill_const((float *)m.vision.ln_pre_b, (size_t)a->vwidth, 0.0f);
    init_tower(&g, &m.vision.t, &at, a->vwidth, a->vlayers, a->embed, 0);
    /* text: token_embedding std 0.02, positional_embedding std 0.01 */
    m.text.context = a->context;
    m.text.vocab = vocab;
    m.text.tok_emb = take(&at, (size_t)vocab * a->twidth);
    fill_normal(&g, (float *)m.text.tok_emb, (size_t)vocab * a->twidth, 0.02);
    m.text.pos_emb = take(&at, (size_t)a->context * a->twidth);
    fill_normal(&g, (float *)m.text.pos_emb, (size_t)a->context * a->twidth, 0.01);
    init_tower(&g, &m.text.t, &at, a->twidth, a->tlayers, a->embed, 1);
    if ((size_t)(at - arena) != total) {
        rc = cdb_err_set(e, CLIPDB_ERROR, "internal: %zu of %zu initial weights laid out",
                         (size_t)(at - arena), total);
        goto cleanup;
    }
    wo.style = "openai";
    wo.dtype = CDB_DT_F32;
    wo.tok_dir = tok_dir;
    wo.made_json = "{\"made_by\": \"clipdb train: initial weights\"}";
    rc = cdb_model_write_dir(&m, dir, &wo, e);
cleanup:
    free(arena);
    free(m.vision.t.blocks);
    free(m.text.t.blocks);
    return rc;
}
