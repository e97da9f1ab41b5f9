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

#include "model/model.h"

#define CDB_LN_EPS 1e-5f
#define CDB_HEAD_DIM 64

/* Images per forward pass of the vision tower (bounds activation memory:
** 16 images x 50 tokens x 3072 floats = 9.8 MB for the MLP buffer). */
#define CDB_VISION_CHUNK 16
/* Most tokens (sequences x length) in one forward pass of the text tower. */
#define CDB_TEXT_MAX_ROWS 2048

/* Per-context scratch; see cdb_run_free (declared in model.h). */
struct cdb_run;

/* Allocates an empty scratch (buffers grow on first use). NULL on OOM.
** Caller frees with cdb_run_free. */
struct cdb_run *cdb_run_new(void);

/* ---- kernels (exposed for the unit tests) ------------------------------- */

/* For each of `rows` rows of x (rows, n): x += bias (if bias != NULL), then
** y = (x - mean) / sqrt(var + eps) * w + b; y (rows, n) may equal x. */
void cdb_layernorm(float *x, const float *bias, const float *w, const float *b,
                   float *y, size_t rows, size_t n);
/* x (rows, n) <- quick_gelu(x + bias), quick_gelu(v) = v * sigmoid(1.702 v). */
void cdb_quick_gelu(float *x, const float *bias, size_t rows, size_t n);
/* x (rows, n) += bias (n) on every row. */
void cdb_add_bias(float *x, const float *bias, size_t rows, size_t n);
/* In place: v[0..n) <- softmax(scale * v[0..n)). */
void cdb_softmax(float *v, size_t n, float scale);

/* One residual attention block on nseq sequences of T tokens each:
**   x (nseq*T, d) <- x + out_proj(attn(ln_1(x))); x <- x + c_proj(quick_gelu(c_fc(ln_2(x))))
** heads = d / 64; causal: token i attends to tokens 0..i only.
** qpos: NULL to compute every token; else qpos[s] is the single position of
** sequence s that is still needed: attention reads keys/values of all T
** tokens, but only that query row goes on, and on return x holds (nseq, d)
** rows (row s = the updated token qpos[s]). */
int cdb_block_forward(struct cdb_run *r, const cdb_block *b, int d, int f, float *x,
                      int nseq, int T, int causal, const int *qpos, cdb_err *e);

/* Vision tower: pixels (n, 3, S, S) -> out (n, embed_dim), n any size
** (processed in chunks of CDB_VISION_CHUNK). */
int cdb_vision_forward(struct cdb_run *r, const cdb_vision *v, int embed_dim,
                       const float *pixels, int n, float *out, cdb_err *e);

/* A text of a batch: its position in the caller's arrays and its tokens up
** to and including the end token (the argmax of the ids, as CLIP takes it). */
typedef struct cdb_text_item {
    int index;
    int len;
} cdb_text_item;
/* Checks n texts (1 <= lens[i] <= context, ids inside the vocabulary;
** EINVAL naming the text in e) and fills items (n), sorted by (len, index)
** when sort != 0. Shared by the CPU and GPU text towers. */
int cdb_text_items(const cdb_text *t, const int32_t *const *ids, const int *lens, int n,
                   int sort, cdb_text_item *items, cdb_err *e);

/* Text tower on token ids: ids[i] holds lens[i] ids (start token first, end
** token last, 2 <= lens[i] <= context) -> out (n, embed_dim). The end token
** is the argmax of the ids, as CLIP takes it. Texts are sorted by length
** and run in groups at the group's own length, computing only up to the end
** token. full != 0 instead runs every text at the full context with all
** positions through every block (CLIP's own computation; for tests). */
int cdb_text_forward(struct cdb_run *r, const cdb_text *t, int embed_dim,
                     const int32_t *const *ids, const int *lens, int n, int full,
                     float *out, cdb_err *e);

#endif
