/*
** transformer.h: the CLIP transformer (both towers) on fp32 weight views.
** Internal; the public entry points are clipdb_encode_texts and
** clipdb_encode_images (include/clipdb.h). Owner: src/model/transformer.c.
**
** All matrix work goes through the compute layer (cdb_sgemm, compute.h) with the whole batch
** stacked into one GEMM (rows = sequences * tokens). Activations live in a
** struct cdb_run (per context, grown on demand, never shared between
** threads); the model itself is read-only.
*/
#ifndef CDB_TRANSFORMER_H
#define CDB_TRANSFORMER_H

#include "compute/compute.h"
#include "model/model.h"

#define CDB_LN_EPS 1e-5f

/* Images per forward pass of the vision tower (bounds activation memory:
** 16 images x 50 tokens x 3072 floats = 9.8 MB for the MLP buffer). */
#define CDB_VISION_CHUNK 16
/* Most tokens (sequences x length) in one forward pass of the text tower. */
#define CDB_TEXT_MAX_ROWS 2048
/* Most texts in one group of the text tower (texts of similar length run
** together at the group's length). */
#define CDB_TEXT_GROUP_MAX 64

/* Per-context scratch (a clipdb_ctx holds one). */
struct cdb_run;

/* Allocates an empty scratch (buffers grow on first use). NULL on OOM.
** Caller frees with cdb_run_free, which accepts NULL. */
struct cdb_run *cdb_run_new(void);
void cdb_run_free(struct cdb_run *r);
/* The precision of the GEMMs on plain (unpacked) weights and activations
** that r runs: CDB_PREC_FP32 (default: cdb_sgemm) or CDB_PREC_BF16
** (cdb_sgemm_bf16: bf16 inputs, fp32 accumulation; the training engine's
** --precision bf16). Packed weights keep their own precision. */
void cdb_run_set_gemm(struct cdb_run *r, cdb_prec prec);

/* ---- kernels (exposed for the unit tests) ------------------------------- */

/* For each of `rows` rows of x (rows, n): x += bias (if bias != NULL), then
** y = (x - mean) / sqrt(var + eps) * w + b; y (rows, n) may equal x. */
void cdb_layernorm(float *x, const float *bias, const float *w, const float *b,
                   float *y, size_t rows, size_t n);
/* x (rows, n) <- quick_gelu(x + bias), quick_gelu(v) = v * sigmoid(1.702 v). */
void cdb_quick_gelu(float *x, const float *bias, size_t rows, size_t n);
/* x (rows, n) += bias (n) on every row. */
void cdb_add_bias(float *x, const float *bias, size_t rows, size_t n);
/* db (n) += the sum over rows of dy (rows, ld), columns [0, n): a bias's
** gradient (nothing if db is NULL). Each column is summed in row order. */
void cdb_bias_backward(float *db, const float *dy, size_t ld, size_t rows, size_t n);
/* In place: v[0..n) <- softmax(scale * v[0..n)). */
void cdb_softmax(float *v, size_t n, float scale);

/* One residual attention block on nseq sequences of T tokens each:
**   x (nseq*T, d) <- x + out_proj(attn(ln_1(x))); x <- x + c_proj(quick_gelu(c_fc(ln_2(x))))
** heads = d / CDB_HEAD_DIM; causal: token i attends to tokens 0..i only.
** qpos: NULL to compute every token; else qpos[s] is the single position of
** sequence s that is still needed: attention reads keys/values of all T
** tokens, but only that query row goes on, and on return x holds (nseq, d)
** rows (row s = the updated token qpos[s]). */
int cdb_block_forward(struct cdb_run *r, const cdb_block *b, int d, int f, float *x,
                      int nseq, int T, int causal, const int *qpos, cdb_err *e);

/* Vision tower (a ViT): pixels (n, 3, S, S) -> out (n, embed_dim), n any
** size (processed in chunks of CDB_VISION_CHUNK). A ResNet tower (v->rn) is
** cdb_resnet_forward's. */
int cdb_vision_forward(struct cdb_run *r, const cdb_vision *v, int embed_dim,
                       const float *pixels, int n, float *out, cdb_err *e);

/* CLIP's ModifiedResNet (resnet.c): pixels (n, 3, S, S) -> out (n,
** embed_dim), fp32, batch norm on the running statistics. */
int cdb_resnet_forward(const cdb_resnet *rn, int S, int embed_dim, const float *pixels, int n,
                       float *out, cdb_err *e);

/* Training a ResNet tower (src/train): the forward on the micro-batch's
** batch-norm statistics with every activation kept in t (grown to the
** micro-batch), the running statistics updated in place when update (the
** views bn_mean / bn_var must then be writable memory: the trainer's), and
** the backward from dout (nb, e) (the last forward's micro-batch): g's
** tensors += (NULL views: frozen); only blocks >= lo are back-propagated
** (lo = n_blocks: the attention pool only; lo < 0: the stem too). prec:
** the GEMMs' precision (fp32, or bf16 inputs as cdb_sgemm_bf16). */
struct cdb_rn_train;
struct cdb_rn_train *cdb_rn_train_new(cdb_prec prec);
void cdb_rn_train_free(struct cdb_rn_train *t); /* accepts NULL */
int cdb_resnet_train_forward(struct cdb_rn_train *t, const cdb_resnet *rn, int S, int e_dim,
                             const float *pixels, int nb, int update, float *out, cdb_err *e);
int cdb_resnet_train_backward(struct cdb_rn_train *t, const cdb_resnet *rn, const cdb_resnet *g,
                              int e_dim, int lo, const float *dout, cdb_err *e);

/* Text tower on token ids: ids[i] holds lens[i] ids (start token first, end
** token last, 2 <= lens[i] <= context) -> out (n, embed_dim). The end token
** is the argmax of the ids, as CLIP takes it. Texts are sorted by length
** and run in groups at the group's own length, computing only up to the end
** token. full != 0 instead runs every text at the full context with all
** positions through every block (CLIP's own computation; for tests). */
int cdb_text_forward(struct cdb_run *r, const cdb_text *t, int embed_dim,
                     const int32_t *const *ids, const int *lens, int n, int full,
                     float *out, cdb_err *e);

/* ---- training: the same forward with activations kept, and the backwards --
** (src/train uses these; each backward sits beside its forward in
** transformer.c with the same shape comments.) Gradient views are the same
** structs as the weights (cdb_block, cdb_tower, cdb_vision, cdb_text) whose
** pointers point into a writable gradient buffer; gradients are accumulated
** (+=); a NULL pointer marks a frozen tensor, whose gradient is skipped. */

/* Activations of one block kept for the backward (rows = nseq*T). */
typedef struct cdb_block_acts {
    float *x_in;   /* (rows, d) residual stream entering the block (ln_1 input) */
    float *h1;     /* (rows, d) ln_1 output */
    float *qkv;    /* (rows, 3d) q | k | v, biases added */
    float *p;      /* (nseq, heads, T, T) attention probabilities (masked = 0) */
    float *att;    /* (rows, d) attention output, heads concatenated */
    float *x_mid;  /* (rows, d) residual after attention + bo (ln_2 input) */
    float *h2;     /* (rows, d) ln_2 output */
    float *pre;    /* (rows, f) c_fc output without bias (QuickGELU input - b1) */
    float *gelu;   /* (rows, f) QuickGELU output (c_proj input) */
} cdb_block_acts;

/* Floats one record needs, and carving a record out of buf (that many floats). */
size_t cdb_block_acts_floats(int d, int f, int nseq, int T);
void cdb_block_acts_carve(cdb_block_acts *a, float *buf, int d, int f, int nseq, int T);

/* cdb_block_forward keeping the activations in *keep (keep != NULL needs
** qpos == NULL). cdb_block_forward is this with keep == NULL. */
int cdb_block_forward_keep(struct cdb_run *r, const cdb_block *b, int d, int f, float *x,
                           int nseq, int T, int causal, const int *qpos,
                           const cdb_block_acts *keep, cdb_err *e);
/* dx (nseq*T, d): dL/d(output) in, dL/d(input) out (when need_dx). g: gradient views. */
int cdb_block_backward(struct cdb_run *r, const cdb_block *b, const cdb_block *g,
                       const cdb_block_acts *a, int d, int f, int nseq, int T, float *dx,
                       int need_dx, cdb_err *e);

/* dx (rows, n) += layernorm backward of dy; dw, db += (NULL: skipped; dx NULL: skipped). */
void cdb_layernorm_backward(float *dx, float *dw, float *db, const float *dy, const float *x,
                            const float *w, size_t rows, size_t n);
/* d (rows, n) *= quick_gelu'(pre + bias). */
void cdb_quick_gelu_backward(float *d, const float *pre, const float *bias, size_t rows,
                             size_t n);

/* h (n, d) = ln_post(x (n, d)) (x unchanged); out (n, e) = h @ proj (or proj^T). */
int cdb_final_ln_project(struct cdb_run *r, const cdb_tower *t, int e_dim, float *x, float *h,
                         int n, float *out, cdb_err *e);
/* From dout (n, e): g->proj, g->ln_post_* +=; dx (n, d) written unless NULL; dh scratch (n, d). */
int cdb_final_ln_project_backward(struct cdb_run *r, const cdb_tower *t, const cdb_tower *g,
                                  int e_dim, const float *x, const float *h, const float *dout,
                                  int n, float *dh, float *dx, cdb_err *e);

/* x (nb*T, d) = ln_pre([class_emb; patches (nb*np, K) @ conv1^T] + pos_emb) of
** pixels (nb, 3, S, S); x0: NULL, or (nb*T, d) keeping the ln_pre input.
** keep NULL: all np = G*G patches, T = np + 1. Otherwise patch dropout (as
** open_clip's PatchDropout, training only): image i keeps the nkeep patches
** keep[i*nkeep ..] (grid indices gy*G + gx, each with its own position
** embedding), T = nkeep + 1, the class token first.
** Uses r's h and MLP buffers as scratch (grown as needed). */
int cdb_vision_embed(struct cdb_run *r, const cdb_vision *v, const float *pixels, int nb,
                     const int32_t *keep, int nkeep, float *x0, float *x, cdb_err *e);
/* From dx (nb*T, d) = dL/dx: g's conv1, class, position and ln_pre gradients
** +=; keep, nkeep as the forward had them. */
int cdb_vision_embed_backward(struct cdb_run *r, const cdb_vision *v, const cdb_vision *g,
                              const float *pixels, int nb, const int32_t *keep, int nkeep,
                              const float *x0, const float *dx, cdb_err *e);

/* x (cnt*L, d): row (s, j) = tok_emb[id] + pos_emb[j] of text index[s] (index
** NULL: text s); positions j >= lens use id 0 (padding). Ids must be checked. */
void cdb_text_embed(const cdb_text *t, const int32_t *const *ids, const int *lens,
                    const int *index, int cnt, int L, float *x);
/* g->tok_emb rows of the ids used, g->pos_emb rows += dx (cnt*L, d); padding skipped. */
void cdb_text_embed_backward(const cdb_text *g, const int32_t *const *ids, const int *lens,
                             const int *index, int cnt, int L, const float *dx);

#endif
