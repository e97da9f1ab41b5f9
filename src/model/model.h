/*
** model.h: the internal shape of a loaded CLIP model, shared by the weight
** loader (weights.c), the model's open/close (model.c), the transformer
** (transformer.c) and the context (ctx.c). The tokenizer and the image
** decoder are leaves below it and do not include it. Internal; the public
** view is clipdb_model_info.
**
** Every weight is an fp32 array: memory-mapped from the safetensors file when
** it is stored as little-endian F32, else converted once at load time into
** memory owned by the model. Linear weights are (out, in), row-major, as
** torch.nn.Linear stores them, so y = x @ W^T + b.
*/
#ifndef CDB_MODEL_H
#define CDB_MODEL_H

#include "compute/compute.h"
#include "core/core.h"
#include "model/safetensors.h"
#include "model/tokenizer.h"

/* Width of one attention head in every CLIP tower: heads = width / 64. */
#define CDB_HEAD_DIM 64

/* One residual attention block:
**   x = x + out_proj(attn(ln_1(x)));  x = x + c_proj(quick_gelu(c_fc(ln_2(x))))
** d = width, f = MLP width (4d). */
typedef struct cdb_block {
    const float *ln1_w, *ln1_b;        /* (d) */
    const float *wq, *wk, *wv;         /* (d, d) each: rows of in_proj_weight or q/k/v_proj */
    const float *bq, *bk, *bv;         /* (d) each */
    const float *wo, *bo;              /* (d, d), (d) */
    const float *ln2_w, *ln2_b;        /* (d) */
    const float *fc1_w, *fc1_b;        /* (f, d), (f) */
    const float *fc2_w, *fc2_b;        /* (d, f), (d) */
    /* Packed forms for the model's precision (model.c, at open), owned; NULL:
    ** cdb_linear runs on the plain fp32 weight (training, OpenBLAS fp32). */
    cdb_wpack *pk_qkv;                 /* [Wq; Wk; Wv] (3d, d) */
    cdb_wpack *pk_o, *pk_fc1, *pk_fc2;
} cdb_block;

typedef struct cdb_tower {
    int width;      /* d */
    int layers;
    int heads;      /* d / CDB_HEAD_DIM */
    int mlp;        /* f = 4d */
    cdb_block *blocks;                 /* [layers], owned */
    const float *ln_post_w, *ln_post_b; /* ln_post (vision) / ln_final (text), (d) */
    /* Projection to the joint space, (d, e) row-major so that y = x @ proj,
    ** or (e, d) when proj_transposed (HF stores visual_projection.weight as
    ** (e, d)): then y = x @ proj^T. */
    const float *proj;
    int proj_transposed;
    cdb_wpack *pk_proj;                /* packed proj (model.c), or NULL */
} cdb_tower;

/* CLIP's ModifiedResNet image tower (RN50, RN101, RN50x4, ...), OpenAI key
** names "visual.*". Batch norm runs on its running statistics, folded at
** load into y = x * scale + shift per channel (eps 1e-5, as torch).
**   stem: 3x3 conv s2 (w/2) - bn - relu - 3x3 (w/2) - bn - relu - 3x3 (w) -
**         bn - relu - avgpool 2
**   stages 1..4 of bottlenecks (planes w, 2w, 4w, 8w; out 4 planes):
**         1x1 - bn - relu - 3x3 - bn - relu - avgpool s - 1x1 - bn, plus the
**         input (through avgpool s - 1x1 - bn when block 0 changes the shape),
**         relu; s = 2 in block 0 of stages 2-4, else 1
**   attention pool: tokens [mean; the grid] + pos, one query (the mean
**         token) over all, heads of 64, then c_proj to the embedding. */
typedef struct cdb_conv {
    const float *w;                    /* (cout, cin, k, k), no bias */
    int cout, cin, k;                  /* stride 1 except the stem's first (2); pad k / 2 */
    const float *bn_w, *bn_b, *bn_mean, *bn_var; /* (cout) each */
    float *scale, *shift;              /* (cout) each, folded at load (owned by the model) */
} cdb_conv;

typedef struct cdb_bottleneck {
    cdb_conv c1, c2, c3;
    cdb_conv down;                     /* down.w NULL: the input is added as it is */
    int stride;                        /* 1 or 2: the avgpool after c2 (and before down) */
} cdb_bottleneck;

typedef struct cdb_resnet {
    int width;                         /* w: stage 1's planes (64 in RN50) */
    int layers[4];                     /* bottlenecks per stage */
    int n_blocks;
    cdb_conv stem[3];
    cdb_bottleneck *blocks;            /* [n_blocks], owned */
    int grid;                          /* image_size / 32 */
    int dim;                           /* 32 w: the attention pool's width */
    int heads;                         /* dim / 64 */
    const float *pos;                  /* (grid^2 + 1, dim) */
    const float *wq, *bq, *wk, *bk, *wv, *bv; /* (dim, dim), (dim) */
    const float *wc, *bc;              /* c_proj (e, dim), (e) */
} cdb_resnet;

/* Folds a batch norm's running statistics into cv->scale / shift (allocated);
** -1, or the first channel whose running variance is negative or NaN. In
** resnet.c, as the two below. */
int cdb_conv_fold(cdb_conv *cv);
/* cdb_conv_fold over the whole tower (after its weights changed). */
int cdb_resnet_fold(cdb_resnet *rn, cdb_err *e);

typedef struct cdb_vision {
    cdb_resnet *rn;                    /* a ResNet tower (owned); NULL: the ViT below */
    cdb_tower t;
    int image_size;                    /* S */
    int patch;                         /* P */
    int grid;                          /* S / P */
    int n_pos;                         /* grid*grid + 1 */
    const float *patch_w;              /* conv1 (d, 3, P, P), no bias */
    const float *class_emb;            /* (d) */
    const float *pos_emb;              /* (n_pos, d) */
    const float *ln_pre_w, *ln_pre_b;  /* (d) */
    cdb_wpack *pk_patch;               /* packed conv1 (d, 3*P*P), or NULL */
} cdb_vision;

typedef struct cdb_text {
    cdb_tower t;
    int context;                       /* CLIPDB_TEXT_CONTEXT */
    int vocab;                         /* 49408 */
    const float *tok_emb;              /* (vocab, d) */
    const float *pos_emb;              /* (context, d) */
} cdb_text;

struct clipdb_model {
    cdb_err err;
    char *dir;
    int embed_dim;
    cdb_vision vision;
    cdb_text text;
    float logit_scale;                 /* as stored (a log) */
    cdb_safetensors *st;               /* the mapped file */
    void **owned;                      /* converted (non-F32) tensors, freed at close */
    size_t n_owned, cap_owned;
    const char *key_style;             /* "openai" or "hf" */
    const char *dtype;                 /* "F32", "F16", "BF16", "mixed" */
    cdb_tokenizer *tok;
    char identity[96];                 /* filled lazily, guarded by identity_once */
    int identity_ready;
    void *identity_lock;               /* pthread_mutex_t*, owned */
    char tok_digest[65];               /* filled lazily (model.c), same lock */
    int tok_digest_ready;
    char *weights_path;                /* the mapped file, owned */
    uint64_t weights_size;             /* its size and mtime when bound (identity cache key) */
    int64_t weights_mtime_ns;
    cdb_prec prec;                     /* encoder precision (model.c) */
    size_t packed_bytes;               /* memory the packed weights own */
};

/* Maps tensors of m->st into m->vision / m->text, inferring the architecture
** from the shapes and converting non-F32 tensors (into m->owned). Names the
** first missing or mis-shaped tensor in m->err; on failure everything it
** bound is released again. Sets key_style, dtype, embed_dim, logit_scale, and
** (when m->weights_path is set) weights_size / weights_mtime_ns.
** cdb_weights_release frees what bind allocated (m->st stays open); it is
** idempotent. Implemented in weights.c, with clipdb_model_identity. */
int cdb_weights_bind(clipdb_model *m);
/* Rebuilds every packed weight (compute.h) from the model's current weight
** views, after they were pointed at or filled with new values (the training
** engine's sync): packs alias or convert the weights they were made from.
** Implemented in model.c. */
int cdb_model_repack(clipdb_model *m);
/* Frees the packed weights (NULLs them); clipdb_model_close does it. */
void cdb_model_unpack(clipdb_model *m);
void cdb_weights_release(clipdb_model *m);

/* IEEE half to float, exactly (subnormals, inf, NaN kept); weights.c
** converts F16 tensors with it and BF16 ones with compute.h's
** cdb_bf16_to_f32. */
float cdb_f16_to_f32(uint16_t h);

/* One tensor of a model in its file's key convention, and the view pointers
** it feeds: *slot[k] = data + off[k] for each non-NULL slot (OpenAI's packed
** in_proj_weight feeds wq, wk and wv). Used by the training engine to lay out
** and name its parameters and to point a model's views at new weights. */
/* Kinds: embeddings (a ResNet's stem), block tensors, the final layer norm
** (a ResNet's attention pool), projections (a ResNet's c_proj), the logit
** scale, and buffers (a batch norm's running statistics: never trained,
** updated by the training forward). */
typedef enum {
    CDB_W_EMBED,
    CDB_W_BLOCK,
    CDB_W_FINAL_LN,
    CDB_W_PROJ,
    CDB_W_SCALE,
    CDB_W_BUFFER
} cdb_wkind;
typedef struct cdb_wref {
    char name[128];
    int ndim;                          /* 0 for logit_scale (shape []) */
    int64_t shape[4];
    size_t numel;
    const float **slot[3];
    size_t off[3];
    int tower;                         /* 0 vision, 1 text, -1 logit_scale (no slot) */
    int layer;                         /* block index for CDB_W_BLOCK, else -1 */
    cdb_wkind kind;
} cdb_wref;
/* The tensors of the towers v and t (architecture fields set) in the
** convention key_style ("openai" / "hf"), in the order: vision (conv1, class,
** positions, ln_pre, blocks, ln_post, projection; a ResNet (OpenAI names
** only): the stem, the bottlenecks, each convolution followed by its batch
** norm's weight, bias, running mean and variance, then the attention pool),
** text (tokens, positions, blocks, ln_final, projection), logit_scale. Within a block q, k and v
** weights come one after another (then their biases), so a buffer laid out in
** this order holds [Wq; Wk; Wv] as one (3d, d) matrix in both conventions.
** *out: caller frees with free(). Implemented in weights.c. */
int cdb_weights_list(const char *key_style, cdb_vision *v, cdb_text *t, int embed_dim,
                     cdb_wref **out, size_t *n, cdb_err *e);


#endif /* CDB_MODEL_H */
