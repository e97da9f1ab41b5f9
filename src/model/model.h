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

typedef struct cdb_vision {
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
void cdb_weights_release(clipdb_model *m);

/* IEEE half to float, exactly (subnormals, inf, NaN kept); weights.c
** converts F16 tensors with it and BF16 ones with compute.h's
** cdb_bf16_to_f32. */
float cdb_f16_to_f32(uint16_t h);

/* One tensor of a model in its file's key convention, and the view pointers
** it feeds: *slot[k] = data + off[k] for each non-NULL slot (OpenAI's packed
** in_proj_weight feeds wq, wk and wv). Used by the training engine to lay out
** and name its parameters and to point a model's views at new weights. */
typedef enum { CDB_W_EMBED, CDB_W_BLOCK, CDB_W_FINAL_LN, CDB_W_PROJ, CDB_W_SCALE } cdb_wkind;
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
** positions, ln_pre, blocks, ln_post, projection), text (tokens, positions,
** blocks, ln_final, projection), logit_scale. Within a block q, k and v
** weights come one after another (then their biases), so a buffer laid out in
** this order holds [Wq; Wk; Wv] as one (3d, d) matrix in both conventions.
** *out: caller frees with free(). Implemented in weights.c. */
int cdb_weights_list(const char *key_style, cdb_vision *v, cdb_text *t, int embed_dim,
                     cdb_wref **out, size_t *n, cdb_err *e);


/* An encoder that runs the towers elsewhere (src/cuda: the GPU), installed
** on a context by clipdb_ctx_set_device (src/cuda/device.c) so that the
** context (ctx.c) calls it in place of cdb_vision_forward / cdb_text_forward
** without knowing what it is. Errors go to e. */
typedef struct cdb_encoder_ops {
    // pixels (n, 3, S, S) -> out (n, embed_dim)
    int (*images)(void *self, const float *pixels, int n, float *out, cdb_err *e);
    // ids[i] (lens[i] tokens) -> out (n, embed_dim), as cdb_text_forward (full = 0)
    int (*texts)(void *self, const int32_t *const *ids, const int *lens, int n, float *out,
                 cdb_err *e);
    void (*free)(void *self);
} cdb_encoder_ops;
/* ctx.c: c encodes through ops/self from now on (ops NULL: on the CPU);
** the previous ones are freed, and self is owned by c. */
void cdb_ctx_set_encoder(clipdb_ctx *c, const cdb_encoder_ops *ops, void *self);
/* ctx.c: the model of c, and the error slot of c. */
clipdb_model *cdb_ctx_model(clipdb_ctx *c);
cdb_err *cdb_ctx_err(clipdb_ctx *c);

#endif /* CDB_MODEL_H */
