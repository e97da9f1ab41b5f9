/*
** writer.h: writing safetensors files and whole model directories.
** Owner: src/model/writer.c (the file and directory writers) and
** src/model/weights.c (cdb_weights_layout: the tensor names and layouts of
** each key convention, beside the tables the loader binds them with).
**
** Every file is written atomically: into "<path>.tmp.<pid>", fsync'ed,
** renamed over <path>, and the directory fsync'ed; on any failure (a full
** disk, a file-size limit, a read-only target) the temporary file is removed
** and whatever was at <path> before is untouched.
*/
#ifndef CDB_WRITER_H
#define CDB_WRITER_H

#include "compute/compute.h"
#include "model/model.h"

#define CDB_WT_MAX_PARTS 3

/* One tensor to write. Its data is either fp32 (f32 parts, converted to the
** file's dtype) or raw little-endian bytes of another dtype (raw != NULL,
** raw_dtype "I64", "U64", "I32", ..., written as they are).
** f32 data: the concatenation of part[0..n_parts) (part_n[i] floats each);
** when transpose is set (2-D only), the single part holds the transposed
** matrix, (shape[1], shape[0]) row-major, and the file gets its transpose. */
typedef struct cdb_wtensor {
    char name[192];
    int ndim;
    int64_t shape[4];
    const float *part[CDB_WT_MAX_PARTS];
    size_t part_n[CDB_WT_MAX_PARTS];
    int n_parts;
    int transpose;
    const void *raw;
    const char *raw_dtype;
    size_t raw_bytes;
} cdb_wtensor;

/* The tensors of model m named and laid out in key convention `style`
** ("openai" or "hf"), pointing at m's fp32 views (no copy). *out is
** allocated (caller frees with free), *n its count. */
int cdb_weights_layout(const clipdb_model *m, const char *style, cdb_wtensor **out, size_t *n,
                       cdb_err *e);

/* Writes a safetensors file of n tensors at path, fp32 data stored as dtype
** (CDB_DT_F32, CDB_DT_F16 or CDB_DT_BF16; round to nearest even).
** meta_keys/meta_vals (n_meta strings) go into "__metadata__" beside
** "format": "pt". A NaN or infinite value (or one that overflows F16) is
** refused before anything is written, with the tensor's name. Atomic (see
** above). */
int cdb_st_write(const char *path, const cdb_wtensor *t, size_t n, int dtype,
                 const char *const *meta_keys, const char *const *meta_vals, int n_meta,
                 cdb_err *e);

/* What cdb_model_write_dir writes. */
typedef struct cdb_model_write_opts {
    const char *style;    /* "openai" or "hf"; NULL: the model's own */
    int dtype;            /* CDB_DT_*; 0: the model's own (F32 when "mixed") */
    const char *tok_dir;  /* where the tokenizer files are copied from; NULL: m->dir */
    const char *made_json; /* the content of clipdb_made.json (a JSON object), or NULL */
    int force;            /* replace an existing out_dir */
} cdb_model_write_opts;

/* The name of the JSON file of how a written model was made. */
#define CDB_MADE_FILE "clipdb_made.json"

/* Writes model m as a complete model directory at out_dir: model.safetensors
** (in opts' convention and dtype), the tokenizer files found in tok_dir
** (bpe_simple_vocab_16e6.txt.gz, vocab.json, merges.txt, tokenizer.json,
** tokenizer_config.json, special_tokens_map.json: those present), and
** clipdb_made.json. The directory is built as "<out_dir>.tmp.<pid>" and
** renamed into place, so a reader never sees half of it. An existing out_dir
** is CLIPDB_EINVAL unless opts->force. */
int cdb_model_write_dir(const clipdb_model *m, const char *out_dir,
                        const cdb_model_write_opts *opts, cdb_err *e);

/* fp32 -> IEEE binary16, round to nearest even (exposed for tests); the
** bfloat16 conversion is compute.h's cdb_f32_to_bf16. */
uint16_t cdb_f32_to_f16(float f);

/* Removes a directory tree (used for temporary directories; no symlinks
** followed). 0 on success. */
int cdb_rm_tree(const char *path);
/* fsync of the directory holding path (after a rename into it). */
int cdb_fsync_parent(const char *path);

#endif /* CDB_WRITER_H */
