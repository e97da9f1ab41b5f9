/*
** train.h: the CLIP training engine (both towers): fp32 master weights,
** forward with activations kept, backward, the contrastive loss, AdamW.
** Internal; the commands (src/cli finetune/train, src/train loops) call it.
** Owner: src/train/engine.c (optimizer, loss, parameter layout) and
** src/train/backward.c (the per-op backward passes, beside their forwards'
** shape comments).
**
** Layout (llm.c's ParameterTensors): the parameters, their gradients and the
** AdamW moments m and v each live in ONE allocation of numel floats, in the
** same order. Named tensor views (cdb_ptensor) describe that order: one view
** per tensor of the model file, named and shaped exactly as in the file the
** model was loaded from (its key convention, m->key_style), so that writing a
** model is "for each view, write numel floats under name with shape". In
** particular HF's q/k/v_proj stay three (d, d) tensors (stored contiguously,
** so the forward still does one (3d, d) GEMM) and HF's projections stay
** (e, d). logit_scale is the last view, shape [] (ndim 0, numel 1).
**
** The forward used in training is the inference forward of
** src/model/transformer.c (cdb_block_forward and the tower pieces), run on a
** cdb_vision / cdb_text whose pointers point into the master weights, with
** an activation record kept per block. Texts run causally at the batch's
** longest end-token length (positions after a text's end token never reach
** its end token, so they get no gradient); images run all tokens, the loss
** reads the class token.
**
** A ResNet image tower (CLIP's ModifiedResNet, model.h cdb_resnet) runs
** src/model/resnet.c's training forward and backward instead of the blocks:
** its batch norms normalise with each micro-batch's own statistics (torch's
** train mode) and move their running statistics once a step (in the pass
** that back-propagates). Those statistics are tensors of the layout like
** the others (OpenAI names "...running_mean" / "...running_var"), never
** trained (trainable 0, no decay), so checkpoints and written models carry
** them. With micro-batches the statistics are the micro-batch's, as in
** torch with gradient accumulation: the gradient is then not exactly the
** full batch's. Patch dropout needs a ViT.
**
** Loss (CLIP paper, open_clip ClipLoss): img = normalize(vision(pixels)),
** txt = normalize(text(ids)), logits (n, n) = exp(logit_scale) img @ txt^T,
** loss = (CE(logits, arange n) + CE(logits^T, arange n)) / 2, means over rows.
**
** Optimizer: torch.optim.AdamW (decoupled decay p -= lr*wd*p before the Adam
** update, bias correction, betas/eps from the options); open_clip's rule:
** decay only tensors with ndim >= 2 (not gains, biases, class embedding, nor
** logit_scale). After each step logit_scale is clamped to [0, ln 100].
** Schedule: lr(step) = lr * (step+1)/warmup during warm-up, then constant or
** cosine 0.5 (1 + cos(pi * (step - warmup) / (total - warmup))) * lr
** (open_clip's cosine_lr). Gradient clipping by global L2 norm over the
** trained tensors (torch.nn.utils.clip_grad_norm_), off when clip_grad <= 0.
**
** Micro-batches (opts.micro_batch, "accumulation"): the contrastive loss
** couples the whole batch, so accumulation is done as open_clip's accum_freq
** does it, exactly: pass 1 runs every micro-batch forward without keeping
** activations and caches the n embeddings; the loss and its gradient with
** respect to every embedding are computed on the whole batch; pass 2 runs
** each micro-batch forward again with activations kept and back-propagates
** its slice of the embedding gradient, summing parameter gradients. The
** result is the gradient of the full-batch loss (the same numbers as one
** big batch, up to summation order) at the cost of a second forward; memory
** is that of one micro-batch. micro_batch 0 = the whole batch at once.
**
** Threads: the GEMMs (most of the work) use the compute backend's threads
** (cdb_compute_threads, both cores); the elementwise kernels of forward and
** backward (layer norm, QuickGELU, bias adds and bias gradients) are split
** over the process's pool (src/core/pool.c) and attention runs one pool task
** per sequence (src/model/transformer.c), with results that do not depend
** on the split. AdamW runs on the pool in fixed pieces (the gradient norm
** summed per piece, then in piece order: the same floats for any number of
** threads). Still on the calling thread: the loss (n x n, small) and the
** embedding gathers. bench/bench_train.c reports the measured
** cores_busy (CPU time / wall).
**
** Precision (opts.gemm): fp32, or bf16 GEMMs (cdb_sgemm_bf16: inputs
** rounded to bf16, fp32 accumulation and output) for every GEMM of forward
** and backward; everything else (kernels, loss, master weights, gradients,
** AdamW moments) stays fp32.
*/
#ifndef CDB_TRAIN_H
#define CDB_TRAIN_H

#include <stddef.h>
#include <stdint.h>

#include "model/model.h"

#define CDB_LOGIT_SCALE_MAX 4.605170185988091f /* ln 100 */

typedef enum { CDB_SCHED_CONSTANT = 0, CDB_SCHED_COSINE = 1 } cdb_sched;

/* What gets gradients and updates; frozen tensors get neither. */
typedef enum {
    CDB_TRAIN_ALL = 0,  /* every tensor */
    CDB_TRAIN_PROJ = 1, /* the two projections and logit_scale */
    CDB_TRAIN_LAST = 2  /* the last last_n blocks of each tower, the final
                        ** layer norms, projections and logit_scale */
} cdb_train_what;

typedef struct cdb_train_opts {
    float lr;            /* peak learning rate (default 5e-5) */
    float beta1, beta2;  /* 0.9, 0.999 */
    float eps;           /* 1e-8 */
    float wd;            /* decoupled weight decay (default 0.2, open_clip) */
    int warmup;          /* steps of linear warm-up, 0 = none (default 0) */
    cdb_sched schedule;  /* default CDB_SCHED_CONSTANT */
    long total_steps;    /* for cosine: the step at which lr reaches 0 */
    float clip_grad;     /* max global grad L2 norm; <= 0 = off (default 0) */
    float label_smoothing; /* in [0, 1): each direction's cross-entropy has
                         ** the target 1 - ls on the pair and ls / n spread
                         ** over the batch's n, as torch's cross_entropy(...,
                         ** label_smoothing=ls); 0 (default): the paper's loss */
    int micro_batch;     /* images per micro-batch, 0 = whole batch (default 0);
                         ** texts go in micro-batches of the same count */
    int texts_per_image; /* K in 1..CDB_MAX_TEXTS_PER_IMAGE (0 reads as 1): a
                         ** batch of n images carries K*n texts, text k*n + i
                         ** a caption of image i, and the loss is the mean
                         ** over k of the symmetric CE of the n images against
                         ** the n texts of slot k (default 1: the paper's) */
    cdb_train_what what; /* default CDB_TRAIN_ALL */
    int last_n;          /* for CDB_TRAIN_LAST */
    int threads;         /* reserved for splitting the non-GEMM work; must be >= 0,
                         ** not used yet (the GEMMs use cdb_compute_threads()) */
    cdb_prec gemm;       /* the GEMMs of forward and backward: CDB_PREC_FP32
                         ** (default) or CDB_PREC_BF16 (bf16 inputs, fp32
                         ** accumulation: cdb_sgemm_bf16); master weights,
                         ** gradients and AdamW state stay fp32 either way */
} cdb_train_opts;

#define CDB_MAX_TEXTS_PER_IMAGE 16

/* Fills the documented defaults. */
void cdb_train_opts_init(cdb_train_opts *o);

/* Parses "all", "proj" or "last:N" (1 <= N <= 1000) into o->what / o->last_n.
** CLIPDB_EINVAL with a message naming the text otherwise. */
int cdb_train_parse_what(const char *spec, cdb_train_opts *o, cdb_err *e);

/* One named tensor view into the flat arrays. */
typedef struct cdb_ptensor {
    char name[128];      /* key as in the loaded model's file (its convention) */
    int ndim;            /* 0 (logit_scale) .. 4 (patch embedding) */
    int64_t shape[4];
    size_t offset;       /* in floats, into params / grads / m / v */
    size_t numel;
    int decay;           /* AdamW weight decay applies (ndim >= 2) */
    int trainable;       /* per opts.what; frozen: grad stays 0, no update */
} cdb_ptensor;

typedef struct cdb_trainer cdb_trainer;

/* Statistics of one step (or gradient computation). */
typedef struct cdb_train_stats {
    float loss;          /* symmetric CE of the batch before the update */
    float lr;            /* learning rate used by the update (0 for grad only) */
    float grad_norm;     /* global L2 norm of the gradient before clipping */
    float logit_scale;   /* after the update (a log; exp() is the temperature) */
    double seconds;      /* wall time of the call */
} cdb_train_stats;

/* Builds a trainer from a loaded model (both towers): copies every weight
** into fp32 master weights (whatever the file's dtype), zeroes grads and
** moments, step 0. The model is not modified and may be closed afterwards.
** On failure *out is NULL and e says why (model without weights, width not
** a multiple of 64, bad options, out of memory). Caller frees with
** cdb_trainer_free. */
int cdb_trainer_new(cdb_trainer **out, const clipdb_model *m, const cdb_train_opts *o,
                    cdb_err *e);
void cdb_trainer_free(cdb_trainer *t);   /* accepts NULL */
/* The message of the last failed call on t. */
const char *cdb_trainer_errmsg(const cdb_trainer *t);

/* One optimizer step on a batch of n image-text pairs (pair i = image i,
** text i): forward, loss, backward (in micro-batches when asked), clipping,
** AdamW with the scheduled lr, logit_scale clamp, step += 1.
**   pixels (n, 3, S, S), preprocessed as for clipdb_encode_images;
**   ids[i] holds lens[i] token ids (start first, end last, as
**   cdb_tokenize_ctx gives; the end token is the argmax, as inference);
**   n >= 2. st may be NULL. With opts.texts_per_image K > 1, ids and lens
**   hold K*n texts: text k*n + i belongs to image i. */
int cdb_train_step(cdb_trainer *t, const float *pixels, const int32_t *const *ids,
                   const int *lens, int n, cdb_train_stats *st);

/* Patch dropout (open_clip's PatchDropout; an augmentation of training only,
** inference always sees every patch): the following steps run image i of
** their batch on the class token and the nkeep patches keep[i*nkeep ..]
** (strictly increasing grid indices gy*G + gx) only, n images covered (a
** batch of more is an error). keep NULL or nkeep 0: every patch again. The
** keep list is copied. CLIPDB_EINVAL (message on t) for a bad list. */
int cdb_trainer_set_patches(cdb_trainer *t, const int32_t *keep, int nkeep, int n);

/* The two halves of cdb_train_step, for tests and custom loops:
** cdb_train_grad sets the gradients (of the mean loss over the batch) of the
** trainable tensors, frozen ones stay 0; cdb_train_apply clips, updates and
** advances the step with the gradients as they are. */
int cdb_train_grad(cdb_trainer *t, const float *pixels, const int32_t *const *ids,
                   const int *lens, int n, cdb_train_stats *st);
int cdb_train_apply(cdb_trainer *t, cdb_train_stats *st);

/* The learning rate the next cdb_train_apply will use. */
float cdb_trainer_lr(const cdb_trainer *t);

/* ---- parameters and optimizer state (saving, checkpoints) ------------------ */

/* Views of the state, owned by t (valid until cdb_trainer_free). params,
** grads, m and v are numel floats each, laid out by tensors[0..n_tensors).
** Writing params / m / v (e.g. from a checkpoint) and set_step restore a
** training exactly; the encoder views follow params automatically. */
typedef struct cdb_train_state {
    size_t numel;
    float *params, *grads, *m, *v;
    const cdb_ptensor *tensors;
    int n_tensors;
    long step;           /* optimizer steps taken */
} cdb_train_state;
void cdb_trainer_state(cdb_trainer *t, cdb_train_state *out);
void cdb_trainer_set_step(cdb_trainer *t, long step);
/* The view named `name`, or NULL. */
const cdb_ptensor *cdb_trainer_find(const cdb_trainer *t, const char *name);

/* Makes m's encoders use the trained weights: m's tensor views are pointed
** at fp32 copies of the current params (owned by m, freed at model close),
** and m->logit_scale updated. m must be the model t was built from (same
** architecture; CLIPDB_EMISMATCH otherwise). m's identity still names the
** file it was loaded from: write a model directory and open it to get an
** identity for stored vectors. Syncing again into the same model refreshes
** the same copy (no new memory); m must stay open while t syncs into it. */
int cdb_trainer_sync(cdb_trainer *t, clipdb_model *m);
/* The same with other weights of t's layout (numel floats, e.g. an average
** of the params): m's encoders then use params, not t's own. */
int cdb_trainer_sync_params(cdb_trainer *t, clipdb_model *m, const float *params);

/* 1 if any param is NaN or infinite. (cdb_train_apply refuses a gradient
** whose norm is not finite with CLIPDB_ERROR before changing anything.) */
int cdb_trainer_nonfinite(const cdb_trainer *t);

#endif /* CDB_TRAIN_H */
