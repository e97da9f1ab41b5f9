/*
** loop.h: the training commands' internals (src/train): architecture specs
** and CLIP's initialisation (arch.c), training data (data.c), checkpoints
** (ckpt.c) and the loop shared by clipdb_finetune and clipdb_train (loop.c).
** The engine itself (forward/backward, loss, AdamW) is train.h.
*/
#ifndef CDB_TRAIN_LOOP_H
#define CDB_TRAIN_LOOP_H

#include "clipdb.h"
#include "core/core.h"
#include "index/index.h"
#include "model/image.h"
#include "model/model.h"
#include "store/store.h"
#include "train/train.h"

/* ---- architecture specs (arch.c) ---------------------------------------- */

/* A from-scratch CLIP ViT. heads are width / 64 (CDB_HEAD_DIM), MLP 4 x width. */
typedef struct cdb_arch {
    int image, patch, vwidth, vlayers;  /* a ViT image tower (patch > 0) */
    int rwidth, rlayers[4];             /* or CLIP's ModifiedResNet (rwidth > 0) */
    int context, twidth, tlayers;
    int embed;
} cdb_arch;

/* Parses a spec (the grammar is in clipdb train --help, src/cli/cmd_train.c):
**   vit:image=S,patch=P,width=W,layers=L[,heads=H];text:width=W,layers=L[,heads=H][,context=C];embed=E
**   or rn:image=S,width=W,layers=A.B.C.D in place of the vit part
** bounded (sides <= 1024, widths <= 4096,
** layers <= 64). CLIPDB_EINVAL with a message naming the bad part. */
int cdb_arch_parse(const char *spec, cdb_arch *out, cdb_err *e);

/* Writes a model directory at dir (which must not exist) holding a CLIP of
** architecture a with CLIP's initialisation drawn from seed (OpenAI
** model.py initialize_parameters for the text tower, token and position
** embeddings and the projections; PyTorch's default initialisation of the
** vision tower's layers, as OpenAI's ViT gets; a ResNet: PyTorch's default
** convolutions, batch norms at the identity except each bottleneck's bn3
** gain 0, the attention pool's weights std dim^-0.5; logit_scale ln(1/0.07)), F32
** in OpenAI key names, with the tokenizer files of tok_dir. */
int cdb_arch_init_dir(const cdb_arch *a, uint64_t seed, const char *tok_dir, const char *dir,
                      cdb_err *e);

/* ---- data (data.c) -------------------------------------------------------- */

/* The images used by a run (cdb_pairs, store.h, from either source) and how
** a batch is drawn from them. */
typedef struct cdb_tdata {
    cdb_pairs *pairs;       /* owned */
    int64_t *train;         /* indices into pairs->img used for training */
    size_t n_train;
    int64_t *val;           /* held-out indices (clipdb_train), may be 0 */
    size_t n_val;
} cdb_tdata;

/* From images_dir + a captions file (the formats of clipdb add); images
** that do not exist are left out (*n_missing counts them). split/val_split
** select entries by their "split" metadata field when not NULL; else
** val_fraction (at most val_max images) of the images, drawn with seed, are
** held out. */
int cdb_tdata_from_files(const char *images_dir, const char *captions_path, const char *split,
                         const char *val_split, float val_fraction, int val_max, uint64_t seed,
                         cdb_tdata *out, size_t *n_missing, cdb_err *e);
void cdb_tdata_free(cdb_tdata *d);

/* The deterministic randomness of a run: every draw is a function of (seed,
** purpose, step/epoch, index), so that a resumed run draws exactly what an
** uninterrupted one does. */
uint64_t cdb_tdraw(uint64_t seed, uint64_t purpose, uint64_t a, uint64_t b);
enum { CDB_DRAW_ORDER = 1, CDB_DRAW_CAPTION = 2, CDB_DRAW_CROP = 3, CDB_DRAW_SPLIT = 4,
       CDB_DRAW_TEXT_DROP = 5, CDB_DRAW_PATCH = 6, CDB_DRAW_TEXT_DROP_K = 7 };

/* order (n) <- the permutation of epoch (0-based) of the n training images. */
void cdb_tdata_order(uint64_t seed, long epoch, size_t n, int64_t *order);

/* The nkeep (1..np) patches image img keeps at step `step` under patch
** dropout: a uniform draw without replacement from 0..np-1, increasing, into
** keep[0..nkeep), from the stream (seed, CDB_DRAW_PATCH, step, img). */
void cdb_tdata_patches(uint64_t seed, long step, size_t img, int np, int nkeep, int32_t *keep);

/* Patches kept of np at patch dropout p: max(1, floor(np * (1 - p))), as
** open_clip; np when p <= 0. */
int cdb_tdata_patch_count(int np, float p);

/* Reusable per-run buffers for building batches. */
typedef struct cdb_batch {
    float *pixels;          /* (cap, 3, S, S) */
    int32_t **ids;          /* texts * cap rows of `context` ids: row k*cap + j
                            ** is the k-th caption of image j */
    int32_t *ids_buf;
    int *lens;
    int cap, texts, image_size, context;
    cdb_rgb rgb;
    struct cdb_img_scratch *scratch;
    cdb_tok_cache *tok_cache;
    /* Without augmentation an image's pixels are the same every epoch: they
    ** are kept (per image index, up to cache_budget bytes) after the first. */
    float **cache;          /* n_images entries, NULL until loaded */
    size_t n_images, cache_bytes, cache_budget;
} cdb_batch;

/* Bytes of preprocessed pixels a run keeps in memory (finetune). */
#define CDB_PIXEL_CACHE_BYTES ((size_t)2 << 30)

/* cap images with `texts` (1..CDB_MAX_TEXTS_PER_IMAGE) captions each;
** n_images: the pairs' image count (for the cache; 0: no cache). */
int cdb_batch_init(cdb_batch *b, int cap, int texts, int image_size, int context,
                   size_t n_images, cdb_err *e);
void cdb_batch_free(cdb_batch *b);

/* Loads pair j (0..n) of a batch: the image pairs->img[img] (preprocessed
** as CLIP does, or with random-resized-crop (area scale in [crop_min, 1],
** aspect in [3/4, 4/3]) and a horizontal flip of probability 1/2 when
** augment), and its caption number `cap` tokenized (truncated to the
** context), each token between the start and end tokens dropped with
** probability text_drop (at least one kept). The draws use (seed, step, img). */
int cdb_batch_load(cdb_batch *b, int j, const cdb_pairs *p, size_t img, size_t cap,
                   const cdb_tokenizer *tok, int augment, float crop_min, float text_drop,
                   uint64_t seed, long step, cdb_err *e);
/* Loads only a text: caption `cap` of image img into text row `row` (0 ..
** texts * cap), its tokens dropped as above with the random stream
** `drop_state` (a cdb_tdraw value). */
int cdb_batch_load_text(cdb_batch *b, int row, const cdb_pairs *p, size_t img, size_t cap,
                        const cdb_tokenizer *tok, float text_drop, uint64_t drop_state,
                        cdb_err *e);

/* ---- checkpoints (ckpt.c) --------------------------------------------------- */

/* The restorable state of a run besides the engine's (params, AdamW m and v,
** step): the seed (with the step, all the randomness), the data order of the
** current epoch, and the configuration string the run was started with. */
typedef struct cdb_ckpt_extra {
    uint64_t seed;
    const int64_t *order;   /* n_order */
    size_t n_order;
    const char *config;
    const float *ema;       /* the average of the weights (numel), or NULL */
} cdb_ckpt_extra;

/* Writes path atomically (the previous checkpoint stays intact on failure). */
int cdb_ckpt_write(const char *path, cdb_trainer *t, const cdb_ckpt_extra *x, cdb_err *e);
/* Restores t, order (n_order) and, when ema is not NULL, the average of the
** weights (numel floats; the checkpoint must hold one) from path.
** CLIPDB_EMISMATCH when the checkpoint was made with another configuration
** or model shape. */
int cdb_ckpt_read(const char *path, cdb_trainer *t, const char *config, int64_t *order,
                  size_t n_order, float *ema, cdb_err *e);

/* ---- the average of the weights (loop.c) ------------------------------------- */

/* The decay of the average after `steps` optimizer steps (1-based):
** min(decay, (1 + steps) / (10 + steps)), TensorFlow's
** ExponentialMovingAverage with num_updates: early weights, far from the
** trained ones, fade fast. */
float cdb_ema_decay(float decay, long steps);
/* avg (n) <- d avg + (1 - d) w. */
void cdb_ema_update(float *avg, const float *w, size_t n, float d);

#endif /* CDB_TRAIN_LOOP_H */
