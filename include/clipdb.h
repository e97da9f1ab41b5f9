/*
** clipdb.h: the one public header of clipdb.
**
** If it is not in this file it is not a published API. The CLI and the
** server use nothing else.
**
** Conventions (see STYLE.md):
**  - every function returns an int status (CLIPDB_OK == 0, else a CLIPDB_E*
**    code) and hands results back through out-parameters;
**  - the message of the last error is kept on the handle the call was made
**    on (clipdb_model_errmsg, clipdb_ctx_errmsg, ...); library code never
**    prints and never exits;
**  - constructors follow sqlite: clipdb_x_open(&out, ...) sets *out to a
**    handle even when it fails (unless memory is exhausted, then NULL), so
**    the caller can read the message, then must call the matching close,
**    which accepts NULL;
**  - memory handed out is freed with clipdb_free unless a comment says
**    otherwise.
*/
#ifndef CLIPDB_H
#define CLIPDB_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define CLIPDB_VERSION        "0.1.0"
#define CLIPDB_VERSION_NUMBER 1000 /* major*1000000 + minor*1000 + patch */

#if defined(__GNUC__)
#define CLIPDB_API __attribute__((visibility("default")))
#else
#define CLIPDB_API
#endif

/* ---- status codes ------------------------------------------------------ */
#define CLIPDB_OK        0
#define CLIPDB_ERROR     1  /* generic failure */
#define CLIPDB_ENOMEM    2  /* out of memory */
#define CLIPDB_EIO       3  /* a file could not be read or written */
#define CLIPDB_EFORMAT   4  /* malformed or corrupt input (file, JSON, ...) */
#define CLIPDB_EINVAL    5  /* bad argument from the caller */
#define CLIPDB_ENOTFOUND 6  /* a file, tensor or item does not exist */
#define CLIPDB_ELIMIT    7  /* input exceeds a safety limit (size, pixels) */
#define CLIPDB_EMISMATCH 8  /* e.g. vectors from another model */
#define CLIPDB_ENET      9  /* network failure (model fetch) */
#define CLIPDB_ESTOPPED  10 /* stopped on request (training: state checkpointed) */

/* A short constant name for a status code ("CLIPDB_EFORMAT"). */
CLIPDB_API const char *clipdb_status_name(int rc);

/* Frees memory handed out by clipdb (strings, arrays). Accepts NULL. */
CLIPDB_API void clipdb_free(void *p);

/* ---- limits against hostile input --------------------------------------- */
#define CLIPDB_MAX_IMAGE_SIDE   32768       /* pixels, width or height */
#define CLIPDB_MAX_IMAGE_PIXELS 178956970u  /* w*h, as PIL's default */
#define CLIPDB_MAX_TEXT_BYTES   (1u << 20)  /* one text, before truncation */
#define CLIPDB_MAX_IMAGE_FILE_BYTES ((size_t)256 << 20) /* one image file read whole */

/* ---- the model ----------------------------------------------------------- */

/* A loaded CLIP model: weights (memory-mapped where possible) and tokenizer.
** Immutable once open: any number of threads may encode with it at once,
** each through its own clipdb_ctx. */
typedef struct clipdb_model clipdb_model;

/* Shape of a loaded model, inferred from the tensor shapes. */
typedef struct clipdb_model_info {
    int embed_dim;        /* size of the joint embedding (512 for ViT-B/32) */
    int image_size;       /* input side in pixels (224) */
    int patch_size;       /* 32 for ViT-B/32 */
    int vision_width;     /* 768 */
    int vision_layers;    /* 12 */
    int vision_heads;     /* width / 64 */
    int text_width;       /* 512 */
    int text_layers;      /* 12 */
    int text_heads;       /* width / 64 */
    int context_length;   /* 77 */
    int vocab_size;       /* 49408 */
    const char *key_style;     /* "openai" or "hf" */
    const char *weights_dtype; /* "F32", "F16", "BF16" or "mixed" */
    uint64_t weights_bytes;    /* size of model.safetensors */
    const char *precision;     /* encoder precision: "fp32", "bf16" or "int8" */
    const char *compute;       /* backend and ISA, as clipdb_compute_info() */
    uint64_t packed_bytes;     /* memory the packed (reordered) weights own */
    const char *vision_kind;   /* "vit", or "resnet" (CLIP's ModifiedResNet:
                               ** patch_size 0, vision_width the first
                               ** stage's, vision_layers its bottlenecks,
                               ** vision_heads the attention pool's) */
    int vision_stages[4];      /* resnet: bottlenecks per stage (RN50 3,4,6,3) */
} clipdb_model_info;

/* Encoder precision, chosen when a model is opened. fp32 (the default) is
** exact; bf16 rounds the inputs and weights of every linear layer to bf16
** (fp32 accumulation); int8 quantises weights per output channel and
** activations per token (int32 accumulation). Vectors of different
** precisions are not comparable bit for bit: a database records the
** precision its vectors were made with. */
typedef enum clipdb_precision {
    CLIPDB_PRECISION_FP32 = 0,
    CLIPDB_PRECISION_BF16 = 1,
    CLIPDB_PRECISION_INT8 = 2
} clipdb_precision;
/* "fp32", "bf16", "int8". */
CLIPDB_API const char *clipdb_precision_name(clipdb_precision p);
/* Parses a name above; CLIPDB_EINVAL for anything else. */
CLIPDB_API int clipdb_precision_parse(const char *s, clipdb_precision *out);
/* The matrix backend in use and the instruction set it dispatched to, e.g.
** "onednn avx512_core_bf16" or "openblas SkylakeX" (environment:
** CLIPDB_GEMM=onednn|openblas, default onednn; ONEDNN_MAX_CPU_ISA lowers
** oneDNN's ISA). Static string. */
CLIPDB_API const char *clipdb_compute_info(void);

/* Opens the model in directory `dir`: model.safetensors (or
** open_clip_model.safetensors) and a tokenizer (bpe_simple_vocab_16e6.txt.gz,
** or vocab.json + merges.txt). On failure *out still holds a handle with the
** message (see the conventions above). Close with clipdb_model_close. */
CLIPDB_API int clipdb_model_open(clipdb_model **out, const char *dir);
/* The same with an encoder precision (clipdb_model_open: fp32). The linear
** weights are converted and reordered once, here, for the backend. */
CLIPDB_API int clipdb_model_open_precision(clipdb_model **out, const char *dir,
                                           clipdb_precision prec);
/* Opens only the tokenizer of the model in `dir` (for `clipdb tokenize`):
** encoding calls on such a handle fail with CLIPDB_EINVAL. */
CLIPDB_API int clipdb_model_open_tokenizer(clipdb_model **out, const char *dir);
CLIPDB_API void clipdb_model_close(clipdb_model *m);
/* The status code and the message of the last failed call on m: the code is
** the one the failing layer gave (a decoder's CLIPDB_EFORMAT stays
** CLIPDB_EFORMAT); the message names the input and the reason. After a call
** that succeeded: CLIPDB_OK and "". For m == NULL (a constructor that ran
** out of memory): CLIPDB_ENOMEM and "out of memory". The same holds for
** clipdb_ctx_errcode / clipdb_ctx_errmsg. */
CLIPDB_API int clipdb_model_errcode(const clipdb_model *m);
CLIPDB_API const char *clipdb_model_errmsg(const clipdb_model *m);
CLIPDB_API int clipdb_model_get_info(const clipdb_model *m, clipdb_model_info *out);

/* A stable identity for the model: "clip-<arch>-<first 16 hex digits of the
** SHA-256 of the weights file>", e.g. "clip-vit-b32-1a2b3c4d5e6f7a8b"; arch is
** vit-b32, vit-b16, vit-l14, vit-l14-336 or "w<width>-p<patch>". The digest
** is computed on the first call (about 0.4 s for 600 MB) and cached in
** memory and in the user's cache directory, never in the model directory:
** $XDG_CACHE_HOME/clipdb/identity/ (else ~/.cache/clipdb/identity/), one
** file per weights file ("<size> <mtime_ns> <hex>", trusted only while size
** and mtime match). When no cache directory can be written the digest is
** computed again by each process; nothing fails. Thread-safe. The string belongs to the model. NULL when the model has no
** weights (clipdb_model_open_tokenizer) or hashing fails. */
CLIPDB_API const char *clipdb_model_identity(const clipdb_model *m);
/* The identity of the model's tokenizer: 64 hex digits of the SHA-256 of
** what it does (its special ids, byte symbols and merge table, in a fixed
** order), not of its files, so bpe_simple_vocab_16e6.txt.gz and the
** vocab.json + merges.txt made from it have one digest, and a merges file
** that lost a line has another. A database records it beside the weights'
** identity. Computed on the first call (a few ms), then cached; thread-safe.
** The string belongs to the model; NULL when it has no tokenizer or on
** OOM. */
CLIPDB_API const char *clipdb_model_tokenizer_digest(const clipdb_model *m);

/* ---- per-thread encoding context ----------------------------------------- */

/* Scratch (activation buffers, tokenizer cache) for one thread at a time.
** Buffers are allocated on first use and reused; a context never shares
** writable state with another. */
typedef struct clipdb_ctx clipdb_ctx;

CLIPDB_API int clipdb_ctx_new(clipdb_ctx **out, clipdb_model *m);
CLIPDB_API void clipdb_ctx_free(clipdb_ctx *c);
/* As clipdb_model_errcode / clipdb_model_errmsg, for calls on c. */
CLIPDB_API int clipdb_ctx_errcode(const clipdb_ctx *c);
CLIPDB_API const char *clipdb_ctx_errmsg(const clipdb_ctx *c);

/* Tokenizes `text` (UTF-8) as CLIP does. Writes at most `cap` ids (cap must
** be >= 2) into `ids` and their count into *n_ids; the result starts with
** 49406 and ends with 49407 (truncated to `cap`, keeping the end token). */
CLIPDB_API int clipdb_tokenize(clipdb_ctx *c, const char *text,
                               int32_t *ids, int cap, int *n_ids);
/* Tokenizer policy, as OpenAI's clip.tokenize: text is cleaned (HTML
** entities, whitespace, lower case; ftfy is not applied) and must be valid
** UTF-8 of at most CLIPDB_MAX_TEXT_BYTES; a text with no tokens fails with
** CLIPDB_EINVAL "empty text"; a text of more than `cap` tokens (the context:
** CLIPDB_TEXT_CONTEXT for CLIP) fails with CLIPDB_ELIMIT unless truncation
** is on (off by default), then it is cut keeping the end token last. The
** setting holds for clipdb_tokenize and clipdb_encode_texts on this ctx. */
#define CLIPDB_TEXT_CONTEXT 77
CLIPDB_API int clipdb_ctx_set_truncate(clipdb_ctx *c, int on);

/* Number of floats of one preprocessed image: 3 * image_size * image_size. */
CLIPDB_API size_t clipdb_image_floats(const clipdb_model *m);

/* Decodes an image file (JPEG, PNG, WebP, BMP, GIF first frame; EXIF
** orientation applied) and preprocesses it as CLIP does into `pixels`
** (3 x S x S floats, channel-major, normalised). */
CLIPDB_API int clipdb_image_load(clipdb_ctx *c, const char *path, float *pixels);
/* The same from bytes in memory (e.g. an HTTP upload). */
CLIPDB_API int clipdb_image_load_memory(clipdb_ctx *c, const void *data,
                                        size_t len, float *pixels);

/* Lowers the largest image this ctx decodes, in pixels (width x height as
** the file declares it, whatever the format): larger ones fail with
** CLIPDB_ELIMIT before anything is allocated. A server taking uploads sets
** it, since a small file may declare a huge image (a 1 KB GIF of 13000 x
** 13000 pixels decodes to 500 MB). 0 restores the default,
** CLIPDB_MAX_IMAGE_PIXELS; a value above that is CLIPDB_EINVAL. */
CLIPDB_API int clipdb_ctx_set_max_image_pixels(clipdb_ctx *c, unsigned long long n);

/* Encodes n texts. out: n x embed_dim floats, the projected vectors as
** CLIP's encode_text returns them (not normalised). */
CLIPDB_API int clipdb_encode_texts(clipdb_ctx *c, const char *const *texts,
                                   int n, float *out);

/* Encodes n preprocessed images. pixels: n x 3 x S x S floats.
** out: n x embed_dim floats, as CLIP's encode_image (not normalised). The
** pixel form of clipdb_encode_batch: the same groups, any n. */
CLIPDB_API int clipdb_encode_images(clipdb_ctx *c, const float *pixels, int n,
                                    float *out);

/* What the inputs of clipdb_encode_batch are. */
typedef enum clipdb_input_kind {
    CLIPDB_INPUT_TEXT = 1,       /* UTF-8 texts, with this ctx's tokenizer policy */
    CLIPDB_INPUT_IMAGE_FILE = 2  /* image file paths, read as clipdb_image_load */
} clipdb_input_kind;

/* The outcome of one input of clipdb_encode_batch. */
#define CLIPDB_ITEM_MSG_MAX 512
typedef struct clipdb_item_status {
    int code;                      /* CLIPDB_OK, or the status of the step that
                                   ** refused this input, as that step gave it
                                   ** (the image decoder's CLIPDB_EFORMAT,
                                   ** CLIPDB_EIO, CLIPDB_ELIMIT, the
                                   ** tokenizer's CLIPDB_EINVAL, ...) */
    char msg[CLIPDB_ITEM_MSG_MAX]; /* "" when code is CLIPDB_OK; else the
                                   ** reason, starting with the input's name:
                                   ** the path of an image file; "text N"
                                   ** (N counted from 0) for a text of a
                                   ** batch of more than one */
} clipdb_item_status;

/* The one batched encoder: encodes n inputs of one kind (texts, or image
** files: decoded, preprocessed and encoded in groups, so memory stays
** bounded whatever n is). out: n x embed_dim floats, row i for inputs[i], as
** clipdb_encode_texts / clipdb_encode_images give them.
** status == NULL: the first input that fails fails the call with its status
** code; the message on the ctx names it. status != NULL (n entries): a
** failing input does not stop the call; status[i] gets its code and
** message and row i of out is zeros; the call returns CLIPDB_OK unless the
** encoder itself fails (CLIPDB_ENOMEM, ...). Inputs that failed are counted
** into *n_failed when n_failed is not NULL. */
CLIPDB_API int clipdb_encode_batch(clipdb_ctx *c, clipdb_input_kind kind,
                                   const char *const *inputs, int n, float *out,
                                   clipdb_item_status *status, int *n_failed);

/* ---- fetching published models -------------------------------------------- */

/* Where files come from: <base_url>/<name>/resolve/main/<file>, Hugging
** Face's layout. Which files: model.safetensors, vocab.json and merges.txt for
** Hugging Face transformers repositories (e.g. "openai/clip-vit-base-patch32");
** open_clip_model.safetensors (+ vocab.json and merges.txt where the repository
** has them) for open_clip ones ("timm/..." and the known laion names). */
typedef struct clipdb_fetch_options {
    /* NULL: $CLIPDB_HF_BASE_URL if set, else "https://huggingface.co". */
    const char *base_url;
    /* Called with the bytes done and the total (-1 if unknown) of the current
    ** file, about ten times a second while it moves and once with
    ** done == total when a file is complete (or found already complete).
    ** May be NULL. The library itself never prints. */
    void (*on_progress)(void *arg, const char *file, int64_t done, int64_t total);
    void *progress_arg;
    long connect_timeout_s; /* default 30 */
    /* A transfer slower than 1 KiB/s for this long is abandoned (the .part
    ** file is kept for a resume); no limit on the total time. Default 60. */
    long stall_timeout_s;
} clipdb_fetch_options;

/* Fills the defaults documented above. */
CLIPDB_API void clipdb_fetch_options_init(clipdb_fetch_options *opt);

/* Downloads the published model `name` (e.g. "openai/clip-vit-base-patch32")
** into `dir` (created if missing, like mkdir -p). Each file goes to
** dir/FILE.part, resumed with a Range request from its current size on the
** next call after an interruption, and is renamed to dir/FILE only when its
** size matches the one the server announced (and its SHA-256 matches, when
** the server gives one); a file already complete is skipped. opt may be NULL
** (defaults). Returns CLIPDB_OK, or CLIPDB_ENET (network, HTTP status, size
** or transfer error; the .part file is kept), CLIPDB_EIO (local files),
** CLIPDB_EMISMATCH (SHA-256 differs; the .part file is removed),
** CLIPDB_EFORMAT (the weights do not parse), CLIPDB_EINVAL (bad name or URL),
** CLIPDB_ELIMIT (announced size over the limit). On failure *errmsg (if
** errmsg is not NULL) gets a one-line message that the caller frees with
** clipdb_free; on success it is set to NULL. */
CLIPDB_API int clipdb_model_fetch(const char *name, const char *dir,
                                  const clipdb_fetch_options *opt, char **errmsg);

/* ---- vectors: distance kernels, exact and IVF search (src/index) ---------- */

/* (section owned by the index module)
**
** The index module knows vectors only. Vectors are float32, row-major,
** stored RAW (not normalised); their L2 norms are kept beside them. Every
** score is "higher is better": cosine similarity, dot product, or for L2 the
** negative Euclidean distance -||q - b||. Results come best first, ties
** broken by the smaller id, so every search is deterministic. */

typedef enum clipdb_metric {
    CLIPDB_METRIC_COSINE = 0,
    CLIPDB_METRIC_DOT = 1,
    CLIPDB_METRIC_L2 = 2
} clipdb_metric;

/* "cosine", "dot" (also "ip"), "l2" -> *out; CLIPDB_EINVAL otherwise. */
CLIPDB_API int clipdb_metric_parse(const char *name, clipdb_metric *out);
/* "cosine", "dot", "l2"; "?" for a value outside the enum. Static string. */
CLIPDB_API const char *clipdb_metric_name(clipdb_metric m);

/* One search result. Unused result slots hold id -1 and score -INFINITY. */
typedef struct clipdb_hit {
    int64_t id;
    float score;
} clipdb_hit;

/* Limits of the index module (k, d and the number of lists). */
#define CLIPDB_MAX_DIM   65536
#define CLIPDB_MAX_K     (1 << 24)
#define CLIPDB_MAX_NLIST (1 << 20)
#define CLIPDB_DEFAULT_SEED 1234 /* k-means seed when none is given */
/* The name of a database's own vector set: the vectors of the model it was
** created with. Other sets (the vectors of other models over the same items,
** e.g. a fine-tuned one) are added by clipdb_db_reembed under a name of
** 1 to CLIPDB_VECTOR_SET_NAME_MAX characters [A-Za-z0-9_-]. */
#define CLIPDB_VECTOR_SET_BASE "base"
#define CLIPDB_VECTOR_SET_NAME_MAX 64

/* A borrowed view of n vectors of dimension d. Nothing is copied or freed. */
typedef struct clipdb_vecs {
    const float *data;    /* n x d floats, row-major */
    const int64_t *ids;   /* n ids, or NULL: the id of row i is i */
    const float *norms;   /* n L2 norms of the rows, or NULL: computed when
                          ** the metric needs them (cosine, l2) */
    size_t n;
    int d;
} clipdb_vecs;

/* Which keys a search may return. The key is the ROW index for
** clipdb_flat_search and the ID for clipdb_ivf_search. A NULL filter allows
** everything. If `bitmap` is set, key k is allowed when k < nbits and bit
** (k % 64) of bitmap[k / 64] is set; otherwise `keys` (n_keys keys, sorted
** ascending, duplicates allowed) lists the allowed keys. A filter that allows
** nothing gives 0 results; filtered search still returns min(k, #allowed)
** results (the filter is applied while scanning, never after). */
typedef struct clipdb_filter {
    const uint64_t *bitmap;
    size_t nbits;
    const int64_t *keys;
    size_t n_keys;
} clipdb_filter;

/* Computes the L2 norms of n rows of dimension d: norms_out (n). */
CLIPDB_API int clipdb_vec_norms(const float *x, size_t n, int d, float *norms_out);

/* Exact k-nearest-neighbour search of nq queries (nq x base->d floats) in
** `base`. Writes nq * k hits to `out` (query i's hits at out[i*k ..], best
** first) and the number of valid hits per query, min(k, #allowed rows), to
** *n_out (the same for every query; the remaining slots are id -1). One
** query uses a matrix-vector product, many use blocked matrix products
** (bounded scratch: 1024 queries x 8192 rows at a time); large searches use
** the OpenBLAS threads. Returns CLIPDB_EINVAL for a bad k (< 1 or >
** CLIPDB_MAX_K), d, metric or NULL pointer, CLIPDB_ENOMEM; on failure a
** message is written to *errmsg if errmsg is not NULL (caller frees with
** clipdb_free). */
CLIPDB_API int clipdb_flat_search(const clipdb_vecs *base, const float *queries,
                                  size_t nq, int k, clipdb_metric metric,
                                  const clipdb_filter *filter, clipdb_hit *out,
                                  int *n_out, char **errmsg);

/* Compressed copies of a vector set for search, beside its fp32 vectors:
**   sq8   8-bit codes per dimension (as Faiss's SQ8: per-dimension min and
**         step over the set), a quarter of the fp32 bytes;
**   bf16  bfloat16 values, half the bytes;
**   fp16  IEEE half values, half the bytes.
** A search scans the copy (one query: a SIMD dot kernel, AVX-512 VNNI / AVX2
** / C chosen at run time; many queries: an int8 or bf16 matrix product) for
** the best `rerank` candidates per query (at least k), then rescores those
** exactly on the fp32 vectors, so returned scores are exact and a true
** neighbour is missed only if its approximate score falls out of the top
** `rerank` (recall@10 >= 0.999 at CLIPDB_CVECS_RERANK on clustered and CLIP
** vectors: tests and bench/bench_search). Immutable once built; any number of
** threads may search one at once. */
typedef enum clipdb_compress {
    CLIPDB_COMPRESS_NONE = 0,
    CLIPDB_COMPRESS_SQ8 = 1,
    CLIPDB_COMPRESS_BF16 = 2,
    CLIPDB_COMPRESS_FP16 = 3
} clipdb_compress;
/* "none", "sq8", "bf16", "fp16" ("?" for a bad value). */
CLIPDB_API const char *clipdb_compress_name(clipdb_compress c);
/* Parses one of those names; CLIPDB_EINVAL otherwise. */
CLIPDB_API int clipdb_compress_parse(const char *name, clipdb_compress *out);
/* Candidates re-ranked per query by default: max(k * 4, this). */
#define CLIPDB_CVECS_RERANK 64

typedef struct clipdb_cvecs clipdb_cvecs;
/* Builds the copy of `kind` of base (NaN and infinities refused). sq8:
** ranges NULL takes each dimension's min and max over base; else ranges
** (2 * d floats: vmin[d] then step[d], as clipdb_cvecs_ranges gives, e.g.
** stored with a database) quantises with those, values outside clamping to
** codes 0 and 255 (re-ranking keeps results exact). Caller frees with
** clipdb_cvecs_free. errmsg as clipdb_flat_search. */
CLIPDB_API int clipdb_cvecs_build(const clipdb_vecs *base, clipdb_compress kind,
                                  const float *ranges, clipdb_cvecs **out, char **errmsg);
CLIPDB_API void clipdb_cvecs_free(clipdb_cvecs *c);
CLIPDB_API clipdb_compress clipdb_cvecs_kind(const clipdb_cvecs *c);
/* sq8: its 2 * d range floats (vmin then step; belong to c); else NULL. */
CLIPDB_API const float *clipdb_cvecs_ranges(const clipdb_cvecs *c);
/* Bytes the copy holds (codes, norms, ranges). */
CLIPDB_API size_t clipdb_cvecs_bytes(const clipdb_cvecs *c);
/* The kernel path its searches take: "avx512_vnni", "avx2" or "c". */
CLIPDB_API const char *clipdb_cvecs_isa(const clipdb_cvecs *c);
/* As clipdb_flat_search (same output, filter keys are row indexes), scanning
** c and re-ranking the best `rerank` candidates per query (rerank <= 0:
** max(4k, CLIPDB_CVECS_RERANK)) on base, which must be the set c was built
** from. */
CLIPDB_API int clipdb_cvecs_search(const clipdb_cvecs *c, const clipdb_vecs *base,
                                   const float *queries, size_t nq, int k, int rerank,
                                   clipdb_metric metric, const clipdb_filter *filter,
                                   clipdb_hit *out, int *n_out, char **errmsg);

/* The SQ8 interface of earlier releases: clipdb_cvecs of kind sq8. */
typedef struct clipdb_cvecs clipdb_sq8;
CLIPDB_API int clipdb_sq8_build(const clipdb_vecs *base, clipdb_sq8 **out, char **errmsg);
CLIPDB_API void clipdb_sq8_free(clipdb_sq8 *s);
CLIPDB_API size_t clipdb_sq8_bytes(const clipdb_sq8 *s);
CLIPDB_API int clipdb_sq8_search(const clipdb_sq8 *s, const clipdb_vecs *base,
                                 const float *queries, size_t nq, int k, int rerank,
                                 clipdb_metric metric, const clipdb_filter *filter,
                                 clipdb_hit *out, int *n_out, char **errmsg);

/* An inverted-file index with flat (uncompressed) lists, as Faiss's
** IndexIVFFlat: nlist centroids from k-means; every vector lives in the list
** of its nearest centroid; a search scans the nprobe lists nearest to the
** query. Coarse assignment: by L2 for the l2 metric; for cosine and dot the
** centroids come from spherical k-means on normalised vectors (unit
** centroids) and assignment is by inner product, as Faiss does for
** METRIC_INNER_PRODUCT. Lists keep copies of the vectors contiguously, with
** their ids and norms. One thread at a time per handle (searches write the
** error message on it); clipdb_flat_search is stateless and reentrant. */
typedef struct clipdb_ivf clipdb_ivf;

/* Options of clipdb_ivf_train. Fill with clipdb_ivf_train_options_init. */
typedef struct clipdb_ivf_train_options {
    uint64_t seed;            /* RNG seed (default 1234) */
    int max_iter;             /* Lloyd iterations at most (default 20) */
    double tol;               /* stop when the objective improves by less than
                              ** this fraction (default 1e-4) */
    int max_points_per_list;  /* train on a sample of at most this many points
                              ** per list, as Faiss (default 256; 0: all) */
} clipdb_ivf_train_options;
CLIPDB_API void clipdb_ivf_train_options_init(clipdb_ivf_train_options *opt);

/* A new, untrained index. Sets *out even on failure (message on the handle)
** unless memory is exhausted; free with clipdb_ivf_free. */
CLIPDB_API int clipdb_ivf_new(clipdb_ivf **out, int d, int nlist, clipdb_metric metric);
/* A trained, empty index from saved centroids (nlist x d floats, copied). */
CLIPDB_API int clipdb_ivf_new_from_centroids(clipdb_ivf **out, int d, int nlist,
                                             clipdb_metric metric,
                                             const float *centroids);
CLIPDB_API void clipdb_ivf_free(clipdb_ivf *ivf);
/* The message of the last failed call on ivf ("" when none failed);
** "out of memory" for NULL. */
CLIPDB_API const char *clipdb_ivf_errmsg(const clipdb_ivf *ivf);
/* The status code of the last failed call on ivf (CLIPDB_OK when none
** failed); CLIPDB_ENOMEM for NULL. */
CLIPDB_API int clipdb_ivf_errcode(const clipdb_ivf *ivf);

/* Trains the centroids by k-means (k-means++ seeding) on n vectors
** (n >= nlist). opt may be NULL (defaults). Empties the lists. */
CLIPDB_API int clipdb_ivf_train(clipdb_ivf *ivf, const float *x, size_t n,
                                const clipdb_ivf_train_options *opt);

/* Index shape: any out-pointer may be NULL. CLIPDB_EINVAL for NULL ivf. */
CLIPDB_API int clipdb_ivf_info(const clipdb_ivf *ivf, int *d, int *nlist,
                               clipdb_metric *metric, int *is_trained,
                               size_t *ntotal);
/* The centroids (nlist x d floats); they belong to the index and live until
** it is retrained or freed. NULL when untrained. */
CLIPDB_API const float *clipdb_ivf_centroids(const clipdb_ivf *ivf);

/* The list each of n vectors would go to: lists_out (n). */
CLIPDB_API int clipdb_ivf_assign(clipdb_ivf *ivf, const float *x, size_t n,
                                 int32_t *lists_out);
/* Adds n vectors with their ids to the lists given (0 <= lists[i] < nlist),
** e.g. saved from clipdb_ivf_assign, without recomputing assignments. An id
** already present is CLIPDB_EINVAL (nothing is added then). */
CLIPDB_API int clipdb_ivf_add_assigned(clipdb_ivf *ivf, const int64_t *ids,
                                       const float *x, const int32_t *lists,
                                       size_t n);
/* Assigns and adds n vectors. lists_out (n) may be NULL; else it receives the
** list of each vector (for the caller to persist). */
CLIPDB_API int clipdb_ivf_add(clipdb_ivf *ivf, const int64_t *ids, const float *x,
                              size_t n, int32_t *lists_out);
/* Removes the ids present (unknown ids are ignored); *n_removed (may be
** NULL) gets how many were removed. */
CLIPDB_API int clipdb_ivf_remove(clipdb_ivf *ivf, const int64_t *ids, size_t n,
                                 size_t *n_removed);
/* The list of `id`, or CLIPDB_ENOTFOUND. */
CLIPDB_API int clipdb_ivf_list_of(const clipdb_ivf *ivf, int64_t id, int32_t *list);

/* Approximate search of nq queries, scanning the nprobe nearest lists (1 <=
** nprobe; clipped to nlist) with the exact kernels of clipdb_flat_search;
** output as clipdb_flat_search (filter keys are IDS here). If the probed
** lists hold fewer than min(k, #allowed) candidates (small lists, or a
** selective filter), the query falls back to scanning every list, which is
** exact search over the allowed vectors, so *n_out is always
** min(k, #allowed). The metric is the index's. */
CLIPDB_API int clipdb_ivf_search(clipdb_ivf *ivf, const float *queries, size_t nq,
                                 int k, int nprobe, const clipdb_filter *filter,
                                 clipdb_hit *out, int *n_out);


/* ---- the database: storage, ingest, search (src/store) -------------------- */

/* (section owned by the store module)
**
** A database is one SQLite file bound at creation to one model (its identity
** and shape are recorded; vectors from another model are refused). Items are
** images (path as given, absolute path, size, SHA-256 of the content) or
** texts (standalone, or captions linked to their image). Each item has its
** raw projected CLIP vector and its norm. Items may carry metadata fields
** (e.g. split, image_id) that searches can filter on. A handle is used by one
** thread at a time. */
typedef struct clipdb_db clipdb_db;

/* The on-disk format: SQLite PRAGMA application_id and user_version. */
#define CLIPDB_DB_MAGIC   0x434C4442 /* "CLDB" */
#define CLIPDB_DB_VERSION 3 /* 2: stored Faiss indexes; 3: named vector
                            ** sets (a file becomes 3 only when its first
                            ** set is made); 1 and 2 are still read */

/* Item types. */
#define CLIPDB_ITEM_IMAGE 1
#define CLIPDB_ITEM_TEXT  2

typedef struct clipdb_db_options {
    int create;            /* 1: create a new database (the file must not
                           ** exist) bound to the model in model_dir */
    int readonly;          /* 1: open read-only (not with create) */
    const char *model_dir; /* create: the model (required). Open: the model
                           ** directory to use instead of the recorded one;
                           ** without `model`, also for a search of a named
                           ** vector set (it must be that set's model) */
    clipdb_model *model;   /* open: a model already open to use (borrowed: it
                           ** must outlive the handle; checked against the
                           ** recorded identity on first use), so that several
                           ** handles (e.g. one per server thread) share one
                           ** model. NULL (default): opened on first use. */
    const char *precision; /* encoder precision ("fp32", "bf16", "int8"). Create:
                           ** recorded with the database (NULL: fp32); every
                           ** vector it stores is made in it. Open: NULL uses
                           ** the recorded one; another one is refused
                           ** (CLIPDB_EMISMATCH), so precisions never mix.
                           ** Databases older than this field are fp32. */
    unsigned long long max_image_pixels; /* the largest image this handle
                           ** decodes (queries, images added, reembed), as
                           ** clipdb_ctx_set_max_image_pixels; 0 (default):
                           ** CLIPDB_MAX_IMAGE_PIXELS, the most it may be */
} clipdb_db_options;
/* Defaults: open an existing database read-write, recorded model. */
CLIPDB_API void clipdb_db_options_init(clipdb_db_options *opt);

/* Opens (or with opt->create, creates) the database at `path`. Refuses a
** file that is not a clipdb database and a newer format version, with a
** message naming the file. opt may be NULL (defaults). *out is set even on
** failure (see the conventions); close with clipdb_db_close. */
CLIPDB_API int clipdb_db_open(clipdb_db **out, const char *path,
                              const clipdb_db_options *opt);
CLIPDB_API void clipdb_db_close(clipdb_db *db);
/* The message of the last failed call on db, "" when the last call
** succeeded (or none was made); "out of memory" for NULL (a failed open). */
CLIPDB_API const char *clipdb_db_errmsg(const clipdb_db *db);
/* The status code of the last call on db: CLIPDB_OK when it succeeded, else
** the code that call returned (the callee's, kept through every layer). */
CLIPDB_API int clipdb_db_errcode(const clipdb_db *db);

/* The database's model, opened on first use (the directory given at open,
** else the recorded one) and checked against the recorded identity
** (CLIPDB_EMISMATCH if it differs). The model belongs to db. */
CLIPDB_API int clipdb_db_model(clipdb_db *db, clipdb_model **out);

/* ---- adding ---- */

typedef struct clipdb_add_progress {
    const char *phase;     /* "images" or "texts" */
    int64_t done, total;   /* files (or texts) processed / to process */
    int64_t added, skipped, failed;
    double elapsed_s;
} clipdb_add_progress;

#define CLIPDB_ADD_BATCH_DEFAULT      32   /* images per transaction */
#define CLIPDB_ADD_MAX_BATCH          1024
#define CLIPDB_ADD_MAX_DECODE_THREADS 8    /* more are taken as this many */

typedef struct clipdb_add_options {
    const char *images_dir;    /* add every image under it (recursively) */
    const char *captions_path; /* with images_dir: captions (JSON lines,
                               ** COCO captions_*.json, or CSV image,caption) */
    const char *texts_path;    /* standalone texts, one per line */
    int batch_size;            /* images per transaction (default
                               ** CLIPDB_ADD_BATCH_DEFAULT, at most
                               ** CLIPDB_ADD_MAX_BATCH); the encoder takes
                               ** them in its own groups, as
                               ** clipdb_encode_batch does */
    int decode_threads;        /* image decoding threads (default 0: the
                               ** number of CPUs); at most
                               ** CLIPDB_ADD_MAX_DECODE_THREADS */
    /* Called about every progress_interval_s seconds and at the end. */
    void (*on_progress)(void *arg, const clipdb_add_progress *p);
    double progress_interval_s;/* default 0.25 */
    /* Called for each input skipped as bad: "PATH: reason". */
    void (*on_warning)(void *arg, const char *msg);
    void *arg;
} clipdb_add_options;
CLIPDB_API void clipdb_add_options_init(clipdb_add_options *opt);

typedef struct clipdb_add_result {
    int64_t images_added;      /* new files */
    int64_t images_updated;    /* known paths whose content changed */
    int64_t images_unchanged;  /* skipped: same path and content hash */
    int64_t images_failed;     /* unreadable or corrupt: reported, skipped */
    int64_t captions_added;
    int64_t captions_unmatched;/* caption entries naming no image in the folder */
    int64_t captions_duplicate;/* skipped: the same text already belongs to the
                               ** same image (repeated in the file, or stored) */
    int64_t texts_added;       /* standalone texts */
    int64_t texts_unchanged;   /* standalone texts already present */
    int64_t texts_failed;      /* lines the encoder refuses (invalid UTF-8,
                               ** empty after cleaning, NUL byte, too long):
                               ** reported with their line number, skipped */
    int64_t last_id;           /* id of the last image or standalone text
                               ** added or updated, -1 if none */
    int64_t captions_failed;   /* captions the encoder refuses (empty after
                               ** cleaning, ...): reported with FILE:LINE and
                               ** the image, skipped */
} clipdb_add_result;

/* Adds images (with captions) and/or texts. Incremental: unchanged files
** are skipped. Commits every batch (an item, its vector and its captions in
** one transaction), so a killed run leaves every committed batch and resumes
** when run again. A malformed captions file fails before anything is added
** ("FILE:LINE: reason"). */
CLIPDB_API int clipdb_db_add(clipdb_db *db, const clipdb_add_options *opt,
                             clipdb_add_result *res);

/* Deletes items and their vectors (in every vector set); deleting an image
** deletes its captions too. Unknown ids are CLIPDB_ENOTFOUND (nothing is deleted). Counts go to
** *n_items (the ids given) and *n_captions (captions deleted with their
** images); either may be NULL. */
CLIPDB_API int clipdb_db_rm(clipdb_db *db, const int64_t *ids, int n,
                            int64_t *n_items, int64_t *n_captions);

/* ---- vector sets ---- */

/* Options of clipdb_db_reembed. Fill with clipdb_reembed_options_init. */
typedef struct clipdb_reembed_options {
    const char *name;          /* the set: [A-Za-z0-9_-]{1,64}, not "base" */
    const char *model_dir;     /* the model whose vectors the set holds */
    const char *precision;     /* encoder precision (NULL: fp32); a set keeps
                               ** the one it was made with */
    int batch_size;            /* items per encoder batch and commit
                               ** (default 32, at most 1024) */
    /* Called after every committed batch and at the end of each phase
    ** (phase "images" or "texts"; added = encoded into the set, skipped =
    ** already in it); a non-zero return stops the run after that commit:
    ** CLIPDB_ESTOPPED, everything committed kept. May be NULL. */
    int (*on_progress)(void *arg, const clipdb_add_progress *p);
    /* Called for each item that could not be encoded: "PATH: reason"
    ** (images) or "text ID: reason". May be NULL. */
    void (*on_warning)(void *arg, const char *msg);
    void *arg;
} clipdb_reembed_options;
CLIPDB_API void clipdb_reembed_options_init(clipdb_reembed_options *opt);

typedef struct clipdb_reembed_result {
    int64_t images_encoded, texts_encoded; /* added to the set by this run */
    int64_t images_present, texts_present; /* already in the set: skipped */
    int64_t images_failed, texts_failed;   /* reported through on_warning */
    int created;                           /* 1: this run made the set */
} clipdb_reembed_result;

/* Encodes every item of the database (images from their stored absolute
** paths, texts and captions from their stored text) with the model in
** opt->model_dir into the vector set opt->name, creating the set on first
** use (and the tables of sets: the file becomes format version 3).
** Incremental: items already in the set are skipped, so a rerun after
** new adds encodes only those. Commits every batch, so a killed run keeps
** every committed batch and the rerun finishes. An item that cannot be
** encoded (a missing or corrupt image file) is reported and counted, not
** fatal. Refused: a bad name or "base" (CLIPDB_EINVAL), an existing set
** made by another model or precision (CLIPDB_EMISMATCH: use a new name, or
** drop the set first), a read-only handle. res may be NULL. */
CLIPDB_API int clipdb_db_reembed(clipdb_db *db, const clipdb_reembed_options *opt,
                                 clipdb_reembed_result *res);
/* Deletes vector set `name` and its vectors (one transaction).
** CLIPDB_ENOTFOUND for an unknown set; "base" is CLIPDB_EINVAL. */
CLIPDB_API int clipdb_db_drop_set(clipdb_db *db, const char *name);

/* ---- searching ---- */

typedef enum clipdb_index_kind {
    CLIPDB_INDEX_EXACT = 0,
    CLIPDB_INDEX_IVF = 1,
    CLIPDB_INDEX_FAISS = 2
} clipdb_index_kind;

/* What a query is. */
typedef enum clipdb_query_kind {
    CLIPDB_QUERY_TEXT = 1,   /* text: encoded with the text tower */
    CLIPDB_QUERY_IMAGE = 2,  /* image file path: encoded with the vision tower */
    CLIPDB_QUERY_ITEM = 3    /* a stored item's vector, by id */
} clipdb_query_kind;

typedef struct clipdb_query {
    clipdb_query_kind kind;
    const char *text;        /* QUERY_TEXT */
    const char *path;        /* QUERY_IMAGE: a file; or NULL and data/len */
    int64_t item;            /* QUERY_ITEM */
    const void *data;        /* QUERY_IMAGE without a path: the encoded image */
    size_t len;              /* file's bytes in memory (an HTTP upload) */
} clipdb_query;

/* The query-file format of `clipdb search --batch`: one query per line ("\n"
** or "\r\n"): "image:PATH" (an image file), "item:ID" (a stored item; ID a
** whole decimal number), or else a text; empty lines are skipped. */
#define CLIPDB_MAX_BATCH_BYTES ((size_t)256 << 20) /* a query file, at most */
#define CLIPDB_MAX_BATCH_QUERIES (1 << 20)          /* queries in one file, at most */

typedef struct clipdb_query_list {
    size_t n;
    clipdb_query *queries;   /* n */
    char *storage;           /* the lines the queries' strings point into */
} clipdb_query_list;

/* Parses len bytes of a query file (name: the file's name, for messages)
** into *out (free with clipdb_query_list_free; it owns every string). At
** least one query. Errors, naming NAME:LINE where there is one:
** CLIPDB_EFORMAT for a NUL byte (it would hide the rest of its line), an
** item id that is not a whole number, "image:" without a path;
** CLIPDB_ELIMIT over CLIPDB_MAX_BATCH_BYTES or CLIPDB_MAX_BATCH_QUERIES;
** CLIPDB_EINVAL when it holds no query. On failure *out is empty and
** *errmsg (if errmsg is not NULL; caller frees with clipdb_free) says why. */
CLIPDB_API int clipdb_queries_parse(const char *data, size_t len, const char *name,
                                    clipdb_query_list *out, char **errmsg);
/* Frees what clipdb_queries_parse put in *l (not l itself); accepts NULL. */
CLIPDB_API void clipdb_query_list_free(clipdb_query_list *l);

typedef struct clipdb_search_options {
    int target;              /* CLIPDB_ITEM_IMAGE (default) or _TEXT */
    int k;                   /* default 10 */
    clipdb_metric metric;    /* default cosine */
    clipdb_index_kind index; /* default exact */
    int nprobe;              /* IVF lists to scan (default 8) */
    const char *faiss;       /* CLIPDB_INDEX_FAISS: NULL (default) uses the
                             ** index stored by clipdb_db_build_faiss; an
                             ** index_factory string ("IVF100,Flat") builds
                             ** one in memory for this search instead */
    const char *const *where;/* n_where filters "FIELD=VALUE" on metadata
                             ** (all must hold); FIELD may also be "type" */
    int n_where;
    const char *vector_set;  /* the vector set searched: NULL (default) or
                             ** CLIPDB_VECTOR_SET_BASE, or a set made by
                             ** clipdb_db_reembed (queries are encoded with
                             ** that set's model; exact index only; an
                             ** unknown name is CLIPDB_ENOTFOUND). A set
                             ** lacking items searches those it has and says
                             ** so in clipdb_results.note */
    int no_compressed;       /* exact index: 1 scans the fp32 vectors even
                             ** when the set has a compressed copy
                             ** (clipdb_db_set_compressed); 0 (default) scans
                             ** the copy and re-ranks in fp32 */
} clipdb_search_options;
CLIPDB_API void clipdb_search_options_init(clipdb_search_options *opt);

/* One result, with the item's fields. */
typedef struct clipdb_result {
    int64_t id;
    int type;                /* CLIPDB_ITEM_IMAGE or _TEXT */
    float score;             /* similarity, higher is better (L2: -distance) */
    const char *path;        /* images: the path as given; else NULL */
    const char *abspath;     /* images: absolute path; else NULL */
    const char *text;        /* texts; else NULL */
    int64_t image;           /* captions: the image's id; else -1 */
    const char *meta_json;   /* metadata as a JSON object ("{}" if none) */
} clipdb_result;

/* Results of nq queries: query i's results are results[offsets[i] ..
** offsets[i+1]). Free with clipdb_results_free (strings belong to it). */
typedef struct clipdb_results {
    size_t nq;
    size_t *offsets;         /* nq + 1 */
    clipdb_result *results;
    double took_ms;          /* search time (encoding included) */
    double encode_ms;        /* of which encoding the queries (decoding
                             ** images included) */
    const char *note;        /* a remark for the user, or NULL: e.g. that the
                             ** stored Faiss index could not drop deleted
                             ** items and was rebuilt in memory */
    const char *compressed;  /* the compressed copy exact search scanned
                             ** before its fp32 re-rank ("sq8", "bf16",
                             ** "fp16"), or NULL: it scanned the fp32 vectors.
                             ** Static string */
    const char *scan_isa;    /* with compressed: the kernel path of its
                             ** dot products ("avx512_vnni", "avx2", "c") */
} clipdb_results;
CLIPDB_API void clipdb_results_free(clipdb_results *r);

/* Answers nq queries (texts are encoded in one batch, images likewise, and
** all queries are searched together: one matrix product for exact search).
** *out (free with clipdb_results_free) is set on success. On failure the
** status is the failing step's own (clipdb_db_errcode gives it too): e.g.
** the image decoder's CLIPDB_EFORMAT / CLIPDB_ELIMIT / CLIPDB_EIO for a query
** image, the tokenizer's CLIPDB_EINVAL for an empty text, CLIPDB_ENOTFOUND
** when the index asked for is not stored, CLIPDB_EFORMAT when it is
** corrupt; the message names the input and the reason. */
CLIPDB_API int clipdb_db_search(clipdb_db *db, const clipdb_query *queries,
                                size_t nq, const clipdb_search_options *opt,
                                clipdb_results **out);

/* One stored item, by id: results[0] is the item (score 0); for an image,
** results[1..] are its captions (ids ascending). nq is 1. CLIPDB_ENOTFOUND
** for an unknown id. Free with clipdb_results_free. */
CLIPDB_API int clipdb_db_get_item(clipdb_db *db, int64_t id, clipdb_results **out);

/* ---- indexes and statistics ---- */

typedef struct clipdb_index_options {
    int target;              /* CLIPDB_ITEM_IMAGE (default) or _TEXT */
    clipdb_metric metric;    /* the metric it serves (default cosine) */
    int nlist;               /* default 0: about sqrt(n), at least 1 */
    uint64_t seed;           /* k-means seed (default 1234) */
} clipdb_index_options;
CLIPDB_API void clipdb_index_options_init(clipdb_index_options *opt);

/* Trains an IVF index (k-means) on the stored vectors of opt->target and
** stores its centroids and the list of every vector in the database,
** replacing an earlier one for the same target and metric. Vectors added
** later go to their nearest list; deleted ones leave it. */
CLIPDB_API int clipdb_db_build_ivf(clipdb_db *db, const clipdb_index_options *opt);

/* Builds a Faiss index (faiss::index_factory string `factory`, e.g.
** "IVF100,Flat", trained and filled with the stored vectors of opt->target
** for opt->metric; opt->nlist and opt->seed are not used) and stores it in
** the database with the SHA-256 of its bytes and the ids it holds,
** replacing an earlier one for the same target and metric. Searches with
** CLIPDB_INDEX_FAISS load it (checking the SHA-256 first: a mismatch is
** CLIPDB_EFORMAT and the bytes never reach Faiss's reader), add the items
** added since and remove the deleted ones; an index type that cannot
** remove is rebuilt in memory for the search (said in clipdb_results.note).
** The factory string must follow the grammar in src/store/sindex_faiss.c
** (Flat, HNSW M, IVF N,Flat, PQ M, ... with parameters that fit the
** dimension and the number of vectors); any other is CLIPDB_EINVAL before
** Faiss sees it (the same for clipdb_search_options.faiss). */
CLIPDB_API int clipdb_db_build_faiss(clipdb_db *db, const clipdb_index_options *opt,
                                     const char *factory);

/* Makes the compressed copy of `kind` (sq8, bf16, fp16) of the vectors of
** `target` (CLIPDB_ITEM_IMAGE or _TEXT) in vector set `space` (NULL or
** CLIPDB_VECTOR_SET_BASE: the base set; else a set made by
** clipdb_db_reembed), replacing an earlier one; CLIPDB_COMPRESS_NONE drops it
** (CLIPDB_ENOTFOUND when there is none). Exact searches of that set and
** target then scan the copy and re-rank in fp32 (clipdb_cvecs_search). What
** is stored is the kind and, for sq8, the per-dimension ranges of the
** vectors now stored; the codes are rebuilt from the fp32 vectors with those
** ranges when a search first needs them (vectors added later that fall
** outside clamp; re-ranking keeps results exact). sq8 needs at least one
** vector. CLIPDB_EINVAL on a read-only handle. */
CLIPDB_API int clipdb_db_set_compressed(clipdb_db *db, const char *space, int target,
                                        clipdb_compress kind);

/* One compressed copy of a database (clipdb_db_stats.compressed). */
typedef struct clipdb_db_compressed_info {
    const char *space;       /* the vector set */
    int target;              /* CLIPDB_ITEM_IMAGE or _TEXT */
    const char *kind;        /* "sq8", "bf16" or "fp16" (static) */
    int dim;
} clipdb_db_compressed_info;

typedef struct clipdb_db_index_info {
    const char *kind;        /* "ivf" or "faiss" */
    const char *factory;     /* faiss: the index_factory string; else NULL */
    int target;
    clipdb_metric metric;
    int nlist;               /* ivf; 0 for faiss */
    int64_t n_vectors;       /* faiss: vectors in the stored index (items
                             ** added later join it at search time) */
} clipdb_db_index_info;

/* One vector set of a database (clipdb_db_stats.sets). */
typedef struct clipdb_db_set_info {
    const char *name;        /* CLIPDB_VECTOR_SET_BASE or the set's name */
    const char *model;       /* identity of the model that made its vectors */
    const char *model_dir;   /* that model's recorded directory */
    const char *precision;   /* "fp32", "bf16" or "int8" */
    int dim;                 /* its vectors' dimension */
    int64_t images, texts;   /* vectors it holds, by item type */
    int64_t created_at;      /* Unix time; 0 for base */
} clipdb_db_set_info;

typedef struct clipdb_db_stats {
    int64_t images, texts, captions, vectors;
    int format_version;
    int embed_dim;
    const char *model;       /* identity */
    const char *model_dir;   /* recorded model directory */
    const char *path;        /* the database file */
    int n_indexes;
    clipdb_db_index_info *indexes; /* n_indexes stored indexes, any number */
    int n_sets;
    clipdb_db_set_info *sets;      /* n_sets vector sets: sets[0] is
                                   ** CLIPDB_VECTOR_SET_BASE, then the named
                                   ** ones by name */
    int n_compressed;
    clipdb_db_compressed_info *compressed; /* the compressed copies, by
                                   ** space then target */
} clipdb_db_stats;
/* Fills *out. indexes and sets (and their strings) belong to the caller:
** free them with clipdb_db_stats_free; the other strings belong to db and
** live until it is closed. On failure nothing is left to free. */
CLIPDB_API int clipdb_db_get_stats(clipdb_db *db, clipdb_db_stats *out);
/* Frees what clipdb_db_get_stats allocated in *st (not st itself).
** Accepts NULL and a zeroed struct. */
CLIPDB_API void clipdb_db_stats_free(clipdb_db_stats *st);

/* ---- integrity (`clipdb check`) ---- */

/* One problem clipdb_db_check found. */
typedef struct clipdb_db_problem {
    const char *kind;        /* static: "integrity" (SQLite's integrity check,
                             ** or a table that cannot be read), "item" (a bad
                             ** type or a missing text/path), "orphan_caption",
                             ** "duplicate_text", "duplicate_path",
                             ** "missing_vector" (an item without its vector),
                             ** "orphan_vector" (a vector without its item),
                             ** "vector" (a wrong size, a component that is not
                             ** finite, a stored norm that is not the vector's),
                             ** "orphan_meta", "high_water" (an id above the
                             ** recorded highest id), "index" (an IVF or Faiss
                             ** index that does not match the vectors) */
    int64_t item;            /* the item id it concerns, or -1 (the file, an index) */
    char *message;           /* one line naming the item, e.g. "caption 17: its
                             ** image 5 does not exist" */
} clipdb_db_problem;

/* At most this many problems are listed (all are counted). */
#define CLIPDB_CHECK_MAX_PROBLEMS 1000

typedef struct clipdb_db_check_report {
    int64_t items, vectors, indexes; /* what was checked */
    int64_t n_problems;      /* problems found (all of them) */
    int n_listed;            /* problems[0 .. n_listed): the first
                             ** CLIPDB_CHECK_MAX_PROBLEMS, in the order found */
    clipdb_db_problem *problems;
} clipdb_db_check_report;

/* Checks the whole database: SQLite's PRAGMA integrity_check (quick: the
** faster quick_check, which skips matching indexes to their tables), then
** the invariants of the data: every caption's image exists; no text is
** stored twice (for the same image, or standalone) and no image path twice;
** each item has exactly one vector of its type and each vector its item;
** every vector has embed_dim finite components and its stored norm; no
** metadata without its item; no id above the recorded high-water mark; each
** IVF index's centroids fit the dimension and its lists hold exactly the
** vectors of its set; each Faiss index's bytes match their SHA-256 and it
** holds no deleted item that is not marked stale. Reads only (a read-only
** handle is enough). Returns CLIPDB_OK when the check ran, whatever it
** found (a table SQLite cannot read is an "integrity" problem); an error
** when it could not run (I/O, memory). *out: free with
** clipdb_db_check_free (it owns the messages). */
CLIPDB_API int clipdb_db_check(clipdb_db *db, int quick, clipdb_db_check_report *out);
/* Frees what clipdb_db_check allocated in *r (not r itself). Accepts NULL
** and a zeroed struct. */
CLIPDB_API void clipdb_db_check_free(clipdb_db_check_report *r);

/* ---- the HTTP server (src/server) ------------------------------------------ */

/* `clipdb serve`: a JSON API and the embedded web page over one database, on
** libmicrohttpd's thread pool. One model is shared by every worker; each
** worker has its own database handle and encoder context. The routes, the
** limits and the status codes are documented in README.md and served as
** OpenAPI at /api/openapi.json. The server never prints: it reports through
** status codes, clipdb_server_errmsg and the on_log callback. */
typedef struct clipdb_server clipdb_server;

#define CLIPDB_SERVER_MAX_THREADS 64
/* The server's default image limit: 64,000,000 pixels (8000 x 8000, a 48 MP
** phone photo fits; 192 MB of RGB per request at most). Lower than the
** library's because a 1 KB upload may declare a huge image. */
#define CLIPDB_SERVER_MAX_IMAGE_PIXELS 64000000

typedef struct clipdb_server_options {
    const char *bind;        /* IPv4 address to listen on (default "127.0.0.1") */
    int port;                /* default 8080; 0: any free port (clipdb_server_port) */
    int threads;             /* worker threads (default 4, at most
                             ** CLIPDB_SERVER_MAX_THREADS) */
    const char *token;       /* POST/DELETE /api/items need it (header
                             ** "Authorization: Bearer T"); NULL (default):
                             ** writes are refused */
    int readonly;            /* 1: the database is opened read-only and
                             ** writes are refused even with the token */
    const char *model_dir;   /* the model, instead of the recorded one */
    const char *upload_dir;  /* where uploaded images are kept (default: the
                             ** database path + ".uploads") */
    const char *cors_origin; /* NULL (default): no CORS headers at all */
    unsigned long long max_image_pixels; /* the largest uploaded image, in
                             ** pixels (a query or an item added): larger
                             ** ones get 413 before they are decoded. Default
                             ** CLIPDB_SERVER_MAX_IMAGE_PIXELS; at most
                             ** CLIPDB_MAX_IMAGE_PIXELS. Stored items are not
                             ** limited (their thumbnails). */
    /* One line per request ("GET /api/stats 200 0.4ms"), from the worker
    ** threads (the callee serialises if it must). May be NULL. */
    void (*on_log)(void *arg, const char *line);
    void *log_arg;
} clipdb_server_options;
CLIPDB_API void clipdb_server_options_init(clipdb_server_options *opt);

/* Opens the database at db_path (and its model) and starts serving. *out is
** set even on failure (message on it) unless memory is exhausted; stop and
** free with clipdb_server_stop. */
CLIPDB_API int clipdb_server_start(clipdb_server **out, const char *db_path,
                                   const clipdb_server_options *opt);
/* The port actually bound (useful with port 0). */
CLIPDB_API int clipdb_server_port(const clipdb_server *s);
CLIPDB_API const char *clipdb_server_errmsg(const clipdb_server *s);
/* Stops accepting, finishes the requests in flight, frees everything.
** Accepts NULL. */
CLIPDB_API void clipdb_server_stop(clipdb_server *s);

/* ---- evaluation: retrieval metrics, experiments, reports (src/eval) -------- */

/* (section owned by the eval module)
**
** The ground truth comes from the database: captions linked to their images.
** The GALLERY is the images matching the split (every filter of `where`, and
** `split` as "split=VALUE") and the captions of those images; a caption whose
** image is outside the split is not a query. An image with no caption is a
** distractor for text->image and not an image->text query.
**
** Ranks (counted from 1): the rank of the right item for a query is the
** position it has in clipdb's search results over the gallery: items are
** ordered by score (higher first, cosine / dot / -L2) and a TIE is broken by
** the smaller item id, exactly as clipdb_flat_search orders hits. So
** rank = 1 + #{others scoring higher} + #{others scoring equal with a smaller
** id}. For image->text, where an image has several captions, the rank is the
** best (smallest) rank of any of its captions.
** Recall@K (R@K) and the hit rate within k are the fraction of queries whose
** rank <= K. The hit-rate curves run over k = 1 .. min(curve_max_k, gallery
** size of that direction). The random baseline is a classifier ranking the
** gallery in random order: k / N for one right item among N.
**
** Vector sets: every set of vectors the database holds is evaluated and
** compared (one today: "default", the vectors of the database's model;
** databases holding several, e.g. base and finetuned, list them all). */

#define CLIPDB_EVAL_MAX_KS 16      /* at most this many R@K cut-offs */
#define CLIPDB_EVAL_MAX_NPROBES 32 /* at most this many nprobe values */

typedef struct clipdb_eval_options {
    const char *split;           /* shorthand for the filter "split=VALUE";
                                 ** NULL: no split filter */
    const char *const *where;    /* n_where more filters "FIELD=VALUE" on the
                                 ** images' metadata (all must hold) */
    int n_where;
    clipdb_metric metric;        /* the metric of the R@K / rank table and of
                                 ** the index comparison (default cosine);
                                 ** hit-rate curves are given for all three */
    int pairs_first;             /* 1: keep one caption per image (the first
                                 ** stored, smallest id), as the paper's 96%
                                 ** figure; default 0 (every caption) */
    int ks[CLIPDB_EVAL_MAX_KS];  /* R@K cut-offs (default 1, 5, 10) */
    int n_ks;
    int curve_max_k;             /* hit-rate curves up to this k (default
                                 ** 1000, clipped to the gallery size) */
    const char *vector_set;      /* NULL: every vector set; else only that one
                                 ** (an unknown name is CLIPDB_ENOTFOUND) */
    int compare_indexes;         /* 1 (default): exact vs IVF (vs Faiss) for
                                 ** text->image over nprobes; 0: skip */
    int nlist;                   /* IVF lists (default 0: about sqrt(images)) */
    int nprobes[CLIPDB_EVAL_MAX_NPROBES]; /* default 1, 2, 4, 8, 16, 32, 64,
                                 ** those <= nlist */
    int n_nprobes;
    int faiss;                   /* 1 (default): Faiss IVF<nlist>,Flat too */
    int index_k;                 /* k of the index comparison (default 10) */
    int n_samples;               /* Table-1 samples per direction (default 5) */
    int sample_top;              /* retrieved items shown per sample (5) */
    uint64_t seed;               /* sampling and k-means seed (default 1234) */
} clipdb_eval_options;
/* Fills the defaults documented above. */
CLIPDB_API void clipdb_eval_options_init(clipdb_eval_options *opt);

/* The results of one evaluation. */
typedef struct clipdb_eval clipdb_eval;

/* One direction's standard figures. */
typedef struct clipdb_eval_dir {
    int64_t queries;             /* queries that have a right answer */
    int64_t gallery;             /* items ranked per query */
    double recall[CLIPDB_EVAL_MAX_KS]; /* at opt.ks[i], fraction in [0, 1] */
    double median_rank;          /* the lower median for an even count */
    double mean_rank;
} clipdb_eval_dir;

/* The summary of vector set `set` (0 .. clipdb_eval_n_sets - 1). */
typedef struct clipdb_eval_summary {
    const char *set;             /* the vector set's name */
    const char *model;           /* model identity */
    int64_t images, captions;    /* gallery sizes */
    int64_t images_without_captions, captions_outside; /* excluded queries */
    clipdb_metric metric;
    int n_ks;
    int ks[CLIPDB_EVAL_MAX_KS];
    clipdb_eval_dir t2i, i2t;    /* text->image, image->text */
    double score_seconds;        /* the batched score + rank computation,
                                 ** all three metrics, both directions */
} clipdb_eval_summary;

/* Runs the evaluation on `db`. opt may be NULL (defaults). *out is set even
** on failure (the message is on it, clipdb_eval_errmsg) unless memory is
** exhausted; free with clipdb_eval_free. Errors: CLIPDB_EINVAL (bad option,
** bad filter, k larger than the gallery, a split with no images, a gallery
** with no captions), CLIPDB_ENOTFOUND (unknown vector set), CLIPDB_ELIMIT,
** CLIPDB_ENOMEM, or the store's codes. */
CLIPDB_API int clipdb_eval_run(clipdb_db *db, const clipdb_eval_options *opt,
                               clipdb_eval **out);
CLIPDB_API void clipdb_eval_free(clipdb_eval *ev);
CLIPDB_API const char *clipdb_eval_errmsg(const clipdb_eval *ev);
CLIPDB_API int clipdb_eval_n_sets(const clipdb_eval *ev);
/* Strings of *out belong to ev. */
CLIPDB_API int clipdb_eval_get_summary(const clipdb_eval *ev, int set,
                                       clipdb_eval_summary *out);

/* Every figure as one JSON object (the format is `clipdb eval --help`'s):
** {"images", "captions", "t2i", "i2t", "hit_rate", "random", ...} for the
** first vector set, "sets" for all of them, "index_comparison", "samples",
** "gpu". *json: caller frees with clipdb_free. */
CLIPDB_API int clipdb_eval_json(clipdb_eval *ev, char **json);

/* Writes the plots into directory `dir` (created if missing) with PLplot:
** hit_rate_t2i, hit_rate_i2t (log k, three metrics and the random
** baseline), index_speed (recall vs queries per second), models (the vector
** sets' hit-rate curves), each as NAME.png when png is set and NAME.svg when
** svg is set. */
CLIPDB_API int clipdb_eval_write_plots(clipdb_eval *ev, const char *dir, int png,
                                       int svg);

/* Writes one self-contained HTML report (tables, plots and Table-1 samples
** with thumbnails, all inline as data: URIs; no network needed) to `path`. */
CLIPDB_API int clipdb_eval_write_html(clipdb_eval *ev, const char *path);
/* The same page in memory (for a server): *html (NUL-terminated, *len bytes
** without the NUL; len may be NULL), caller frees with clipdb_free. */
CLIPDB_API int clipdb_eval_html(clipdb_eval *ev, char **html, size_t *len);


/* ---- training: fine-tuning and training from scratch (src/train) ---------- */

/* Progress of a training run, reported after every optimizer step and at
** each event. */
typedef struct clipdb_train_progress {
    const char *event;       /* "start", "resume", "step", "epoch",
                             ** "checkpoint", "done" or "stopped" */
    int epoch, epochs;       /* 1-based epoch being run / of the run */
    long step, total_steps;  /* optimizer steps done / of the whole run */
    int steps_per_epoch;
    long pairs;              /* training pairs (images) per epoch */
    float loss;              /* "step": the batch's loss; "epoch": mean over it */
    float lr;                /* learning rate of the last step */
    double pairs_per_s;      /* image-caption pairs per second (this session) */
    double eta_s;            /* estimated seconds to the end */
    double elapsed_s;
    /* "epoch" with a validation split (clipdb_train): recall at 1, 5, 10,
    ** text->image and image->text, in [0, 1]; -1 when not measured. */
    float val_t2i[3], val_i2t[3];
    long val_pairs;
    const char *path;        /* "checkpoint", "resume", "done": the file or
                             ** directory written / read */
    /* With an average of the weights (clipdb_train_options.ema), val_t2i
    ** and val_i2t measure the average (the weights that will be written),
    ** and the last epoch's "epoch" also measures the weights as trained
    ** here; -1 otherwise. */
    float val_raw_t2i[3], val_raw_i2t[3];
} clipdb_train_progress;

/* Called by the training loop; a non-zero return asks it to stop: it then
** writes a checkpoint and returns CLIPDB_ESTOPPED (run the same call again to
** resume). Called from the calling thread only. */
typedef int (*clipdb_train_progress_fn)(void *arg, const clipdb_train_progress *p);

typedef struct clipdb_train_options {
    /* data: clipdb_finetune trains on the images whose item_meta "split"
    ** equals split (NULL: every captioned image); clipdb_train on the
    ** captions-file entries whose "split" field equals it (NULL: all) */
    const char *split;       /* default "train" */
    int epochs;              /* default 5 */
    int batch;               /* pairs per step; the remainder of an epoch is
                             ** dropped (default 32) */
    int micro_batch;         /* pairs per forward/backward pass (exact
                             ** accumulation), 0 = the whole batch */
    /* AdamW (torch.optim.AdamW) and the schedule. Defaults: the paper's
    ** fine-tuning settings lr 5e-8, wd 1e-3, betas 0.9/0.999, eps 1e-8,
    ** constant rate, no warm-up, no clipping. */
    float lr, wd, beta1, beta2, eps;
    int warmup;              /* steps */
    const char *schedule;    /* "constant" or "cosine" */
    float clip_grad;         /* global gradient norm; <= 0 = off */
    float label_smoothing;   /* in [0, 1): each direction's cross-entropy
                             ** aims at 1 - E on the pair and E / n on each
                             ** of the batch's n (torch's label_smoothing);
                             ** default 0, the paper's loss */
    const char *train;       /* "all", "proj" or "last:N" (default "all") */
    uint64_t seed;           /* data order, caption choice, augmentation,
                             ** initialisation (default 0) */
    int force;               /* replace an existing output directory */
    int checkpoint_every;    /* steps between checkpoints (0: each epoch) */
    const char *out_dtype;   /* "F32", "F16" or "BF16" for the written
                             ** weights; NULL: the input's (train: F32) */
    /* clipdb_train only */
    const char *arch;        /* the architecture spec (see clipdb train --help) */
    const char *tokenizer_dir; /* a directory with CLIP's BPE files */
    const char *val_split;   /* validate on the entries of this "split"
                             ** (then split selects the training ones) */
    float val_fraction;      /* without val_split: held-out share of the
                             ** images (default 0.1) */
    int val_max;             /* at most this many (default 1000) */
    int augment;             /* random-resized-crop + flip (default 1 for
                             ** clipdb_train; clipdb_finetune never augments) */
    const char *command;     /* recorded in the written model's clipdb_made.json */
    clipdb_train_progress_fn progress;
    void *progress_arg;
    const char *precision;   /* the GEMMs of the training step: "fp32"
                             ** (default, NULL) or "bf16" (bf16 inputs,
                             ** fp32 accumulation; weights, gradients and
                             ** optimizer state stay fp32) */
    float crop_min;          /* clipdb_train's random-resized-crop: the
                             ** smallest crop, as a share of the image's
                             ** area, in (0, 1] (default 0.5) */
    float text_drop;         /* clipdb_train's text augmentation: each token
                             ** of a caption is dropped with this probability,
                             ** in [0, 1) (default 0: none) */
    float patch_drop;        /* clipdb_train's patch dropout (open_clip's
                             ** patch_dropout): each step an image keeps
                             ** max(1, floor(np * (1 - P))) of its np
                             ** patches, drawn with the seed, and the image
                             ** tower runs on those only (faster steps);
                             ** inference sees every patch. In [0, 1)
                             ** (default 0: none) */
    float ema;               /* an exponential moving average of the weights
                             ** (all of them, batch norms' running statistics
                             ** included): after step t (1-based), avg = d avg +
                             ** (1 - d) weights with d = min(ema, (1 + t) /
                             ** (10 + t)), starting from the initial weights.
                             ** Validation measures the average and the
                             ** written model is the average. In [0, 1)
                             ** (default 0: none, the weights as trained) */
    int captions_per_image;  /* K in 1..16 (default 1: the paper's one
                             ** caption per image per step): each step
                             ** pairs its images with K of their captions
                             ** (the drawn one, then the next ones in the
                             ** image's order, round again if it has fewer
                             ** than K) and the loss is the mean over the K
                             ** of the symmetric cross-entropy of the images
                             ** against one caption each; the text tower
                             ** runs on K times as many texts */
} clipdb_train_options;

/* Fills the defaults above. */
CLIPDB_API void clipdb_train_options_init(clipdb_train_options *o);

/* Fine-tunes the model in model_dir on the image-caption pairs of the
** database at db_path (one caption drawn per image per step, or
** o->captions_per_image of them; no augmentation) and writes the result
** as a complete model directory at out_dir (weights in the input's key
** convention and dtype, its tokenizer files, clipdb_made.json).
** Checkpoints go to "<out_dir>.ckpt"; a run that
** was stopped or killed resumes from it when called again with the same
** options, and reaches the same weights as an uninterrupted run. Returns
** CLIPDB_OK, CLIPDB_ESTOPPED (stopped by the progress callback, checkpoint
** written), or an error with a message in *errmsg (caller frees with
** clipdb_free; NULL on success). */
CLIPDB_API int clipdb_finetune(const char *db_path, const char *model_dir, const char *out_dir,
                               const clipdb_train_options *o, char **errmsg);

/* Trains a CLIP from scratch (o->arch, CLIP's initialisation) on the images
** under images_dir and their captions in captions_path (the formats of
** clipdb add), holding out o->val_fraction of the images for validation
** (recall printed each epoch), with the same checkpoints, resumption and
** output as clipdb_finetune (weights F32 in OpenAI key names). */
CLIPDB_API int clipdb_train(const char *images_dir, const char *captions_path,
                            const char *out_dir, const clipdb_train_options *o,
                            char **errmsg);


#ifdef __cplusplus
}
#endif
#endif /* CLIPDB_H */
