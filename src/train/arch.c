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
    int n;          /* 0 or 1: one integer; 4: "a.b.c.d" into slot[0..3] */
} kv;

/* "a.b.c.d" (n integers in [1, max] separated by '.') from s to end. */
static int parse_list(const char *s, const char *end, int *slot, int n, int max)
{
    int i;
    for (i = 0; i < n; i++) {
        long v = 0;
        const char *d = s;
        while (s < end && *s >= '0' && *s <= '9' && v <= max) v = v * 10 + (*s++ - '0');
        if (s == d || v < 1 || v > max) return 0;
        slot[i] = (int)v;
        if (i + 1 < n && (s >= end || *s++ != '.')) return 0;
    }
    return s == end;
}

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
            if (kvs[i].n > 1) {
                if (!parse_list(eq + 1, stop, kvs[i].slot, kvs[i].n, kvs[i].max))
                    return cdb_err_set(e, CLIPDB_EINVAL,
                                       "arch: %s %s='%.*s' is not %d integers in [1, %d] "
                                       "separated by '.'", part, kvs[i].key,
                                       (int)(stop - eq - 1), eq + 1, kvs[i].n, kvs[i].max);
                found = 1;
                break;
            }
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
            kv k[] = {{"image", &a->image, ARCH_MAX_SIDE, 0},
                      {"patch", &a->patch, ARCH_MAX_SIDE, 0},
                      {"width", &a->vwidth, ARCH_MAX_WIDTH, 0},
                      {"layers", &a->vlayers, ARCH_MAX_LAYERS, 0},
                      {"heads", &vheads, ARCH_MAX_WIDTH, 0}};
            if ((rc = parse_kvs("vit", s + 4, end, k, 5, e))) return rc;
            have_v++;
        } else if (!strncmp(s, "rn:", 3)) {
            kv k[] = {{"image", &a->image, ARCH_MAX_SIDE, 0},
                      {"width", &a->rwidth, ARCH_MAX_WIDTH / 32, 0},
                      {"layers", a->rlayers, ARCH_MAX_LAYERS, 4}};
            if ((rc = parse_kvs("rn", s + 3, end, k, 3, e))) return rc;
            have_v++;
        } else if (!strncmp(s, "text:", 5)) {
            kv k[] = {{"width", &a->twidth, ARCH_MAX_WIDTH, 0},
                      {"layers", &a->tlayers, ARCH_MAX_LAYERS, 0},
                      {"heads", &theads, ARCH_MAX_WIDTH, 0},
                      {"context", &a->context, ARCH_MAX_CONTEXT, 0}};
            if ((rc = parse_kvs("text", s + 5, end, k, 4, e))) return rc;
            have_t = 1;
        } else if (!strncmp(s, "embed=", 6)) {
            kv k[] = {{"embed", &a->embed, ARCH_MAX_EMBED, 0}};
            if ((rc = parse_kvs("embed", s, end, k, 1, e))) return rc;
        } else {
            return cdb_err_set(e, CLIPDB_EINVAL,
                               "arch: '%.*s' is not a part (vit:..., rn:..., text:..., embed=N)",
                               (int)(end - s), s);
        }
        s = semi ? semi + 1 : end;
    }
    if (have_v > 1)
        return cdb_err_set(e, CLIPDB_EINVAL, "arch: one image tower (vit:... or rn:...), not %d",
                           have_v);
    if (a->rwidth) {
        if (!a->image || !a->rlayers[0])
            return cdb_err_set(e, CLIPDB_EINVAL, "arch: needs rn:image=S,width=W,layers=A.B.C.D");
        if (a->image % 32)
            return cdb_err_set(e, CLIPDB_EINVAL,
                               "arch: rn image %d is not a multiple of 32 (the tower's stride)",
                               a->image);
        if (a->rwidth % 2)
            return cdb_err_set(e, CLIPDB_EINVAL,
                               "arch: rn width %d is not even (the attention pool's 32 x width "
                               "must be a multiple of %d)", a->rwidth, CDB_HEAD_DIM);
    } else if (!have_v || !a->image || !a->patch || !a->vwidth || !a->vlayers) {
        return cdb_err_set(e, CLIPDB_EINVAL,
                           "arch: needs vit:image=S,patch=P,width=W,layers=L "
                           "or rn:image=S,width=W,layers=A.B.C.D");
    }
    if (!have_t || !a->twidth || !a->tlayers)
        return cdb_err_set(e, CLIPDB_EINVAL, "arch: needs text:width=W,layers=L");
    if (!a->embed) return cdb_err_set(e, CLIPDB_EINVAL, "arch: needs embed=E");
    if (a->patch && a->image % a->patch)
        return cdb_err_set(e, CLIPDB_EINVAL, "arch: image %d is not a multiple of patch %d",
                           a->image, a->patch);
    if (a->context < 2) return cdb_err_set(e, CLIPDB_EINVAL, "arch: context must be >= 2");
    if ((!a->rwidth && (rc = check_heads("vit", a->vwidth, vheads, e))) ||
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

/* A convolution as nn.Conv2d's default (kaiming_uniform a=sqrt(5):
** U(+-1/sqrt(fan_in))) and its batch norm at the identity with gain `gain`
** (bias 0, running mean 0, variance 1); at == NULL: only counts. */
static size_t init_conv(init_rng *g, cdb_conv *cv, float **at, int cout, int cin, int k,
                        float gain)
{
    const size_t n = (size_t)cout * cin * k * k;
    float *p;
    if (!at) return n + 4 * (size_t)cout;
    cv->cout = cout, cv->cin = cin, cv->k = k;
    cv->w = p = take(at, n);
    fill_uniform(g, p, n, 1.0 / sqrt((double)cin * k * k));
    cv->bn_w = p = take(at, (size_t)cout);
    fill_const(p, (size_t)cout, gain);
    cv->bn_b = p = take(at, (size_t)cout);
    fill_const(p, (size_t)cout, 0.0f);
    cv->bn_mean = p = take(at, (size_t)cout);
    fill_const(p, (size_t)cout, 0.0f);
    cv->bn_var = p = take(at, (size_t)cout);
    fill_const(p, (size_t)cout, 1.0f);
    return n + 4 * (size_t)cout;
}

/* CLIP's ModifiedResNet (model.h) with OpenAI's initialize_parameters: each
** bottleneck's bn3 gain 0 (the block starts as its skip path), the
** attention pool's q, k, v and c_proj weights std dim^-0.5, its positions
** randn / sqrt(dim), biases nn.Linear's default. at == NULL: only counts
** (rn's blocks may then be NULL). The floats. */
static size_t init_resnet(init_rng *g, cdb_resnet *rn, float **at, const cdb_arch *a)
{
    const int w = a->rwidth, G = a->image / 32, D = 32 * w;
    const size_t T = (size_t)G * G + 1, DD = (size_t)D * D;
    cdb_conv scratch;
    size_t n = 0;
    int l, i, k, inplanes = w;
    float *p;
#define CONV(cv, co, ci, kk, gain) (n += init_conv(g, at ? (cv) : &scratch, at, co, ci, kk, gain))
    CONV(&rn->stem[0], w / 2, 3, 3, 1.0f);
    CONV(&rn->stem[1], w / 2, w / 2, 3, 1.0f);
    CONV(&rn->stem[2], w, w / 2, 3, 1.0f);
    for (l = 0, k = 0; l < 4; l++)
        for (i = 0; i < a->rlayers[l]; i++, k++) {
            const int planes = w << l, stride = l > 0 && i == 0 ? 2 : 1;
            cdb_bottleneck *bk = at ? &rn->blocks[k] : NULL;
            if (bk) bk->stride = stride;
            CONV(bk ? &bk->c1 : NULL, planes, inplanes, 1, 1.0f);
            CONV(bk ? &bk->c2 : NULL, planes, planes, 3, 1.0f);
            CONV(bk ? &bk->c3 : NULL, 4 * planes, planes, 1, 0.0f);
            if (stride > 1 || inplanes != 4 * planes)
                CONV(bk ? &bk->down : NULL, 4 * planes, inplanes, 1, 1.0f);
            inplanes = 4 * planes;
        }
#undef CONV
    n += T * D + 3 * (DD + (size_t)D) + (size_t)a->embed * D + (size_t)a->embed;
    if (!at) return n;
    for (l = 0; l < 4; l++) rn->layers[l] = a->rlayers[l];
    rn->n_blocks = k;
    rn->width = w, rn->grid = G, rn->dim = D, rn->heads = D / CDB_HEAD_DIM;
    rn->pos = p = take(at, T * D);
    fill_normal(g, p, T * D, pow(D, -0.5));
    /* CLIP's order: k, q, v */
    rn->wk = p = take(at, DD);
    fill_normal(g, p, DD, pow(D, -0.5));
    rn->bk = p = take(at, (size_t)D);
    fill_uniform(g, p, (size_t)D, 1.0 / sqrt(D));
    rn->wq = p = take(at, DD);
    fill_normal(g, p, DD, pow(D, -0.5));
    rn->bq = p = take(at, (size_t)D);
    fill_uniform(g, p, (size_t)D, 1.0 / sqrt(D));
    rn->wv = p = take(at, DD);
    fill_normal(g, p, DD, pow(D, -0.5));
    rn->bv = p = take(at, (size_t)D);
    fill_uniform(g, p, (size_t)D, 1.0 / sqrt(D));
    rn->wc = p = take(at, (size_t)a->embed * D);
    fill_normal(g, p, (size_t)a->embed * D, pow(D, -0.5));
    rn->bc = p = take(at, (size_t)a->embed);
    fill_uniform(g, p, (size_t)a->embed, 1.0 / sqrt(D));
    return n;
}

int cdb_arch_init_dir(const cdb_arch *a, uint64_t seed, const char *tok_dir, const char *dir,
                      cdb_err *e)
{
    clipdb_model m;
    cdb_tokenizer *tok = NULL;
    cdb_model_write_opts wo = {0};
    init_rng g = {{seed ^ 0x636c697069696e74ull}, 0, 0.0};
    float *arena = NULL, *at;
    cdb_resnet rn;
    const size_t grid = a->patch ? (size_t)(a->image / a->patch) : 0, npos = grid * grid + 1;
    size_t total;
    int rc, vocab;
    double scale = pow(a->vwidth, -0.5), fan_in = 3.0 * a->patch * a->patch;

    memset(&m, 0, sizeof m);
    if ((rc = cdb_tok_load_dir(tok_dir, &tok, e))) {
        cdb_err_prefix(e, "tokenizer %s", tok_dir);
        return rc;
    }
    vocab = cdb_tok_vocab_size(tok);
    cdb_tok_free(tok);
    memset(&rn, 0, sizeof rn);
    if (a->rwidth)
        total = init_resnet(&g, &rn, NULL, a);
    else
        total = (size_t)a->vwidth * 3 * a->patch * a->patch + (size_t)a->vwidth +
                npos * a->vwidth + 2 * (size_t)a->vwidth +
                tower_floats(a->vwidth, a->vlayers, a->embed);
    total += (size_t)vocab * a->twidth + (size_t)a->context * a->twidth +
             tower_floats(a->twidth, a->tlayers, a->embed);
    arena = cdb_malloc_array(total, sizeof *arena);
    if (a->rwidth)
        rn.blocks = cdb_calloc_array((size_t)a->rlayers[0] + a->rlayers[1] + a->rlayers[2] +
                                         a->rlayers[3],
                                     sizeof *rn.blocks);
    else
        m.vision.t.blocks = cdb_calloc_array((size_t)a->vlayers, sizeof(cdb_block));
    m.text.t.blocks = cdb_calloc_array((size_t)a->tlayers, sizeof(cdb_block));
    if (!arena || !(a->rwidth ? (void *)rn.blocks : (void *)m.vision.t.blocks) ||
        !m.text.t.blocks) {
        rc = cdb_err_set(e, CLIPDB_ENOMEM, "out of memory for %zu initial weights", total);
        goto cleanup;
    }
    at = arena;
    m.embed_dim = a->embed;
    m.key_style = "openai";
    m.dtype = "F32";
    m.logit_scale = logf(1.0f / 0.07f);
    m.vision.image_size = a->image;
    if (a->rwidth) {
        init_resnet(&g, &rn, &at, a);
        m.vision.rn = &rn;
        goto text;
    }
    /* vision: conv1 (d, 3, P, P) as nn.Conv2d's default (kaiming_uniform a=sqrt(5):
    ** U(+-1/sqrt(fan_in))); class and position embeddings scale * randn */
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
text:
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
    free(rn.blocks);
    free(m.vision.t.blocks);
    free(m.text.t.blocks);
    return rc;
}
