/*
** tokenizer.h: CLIP's byte-level BPE. Owner: src/model/tokenizer.c.
** A loaded tokenizer is immutable and shared by all threads; per-thread
** state (a BPE cache) lives in a cdb_tok_cache owned by a clipdb_ctx.
*/
#ifndef CDB_TOKENIZER_H
#define CDB_TOKENIZER_H

#include "core/core.h"

typedef struct cdb_tokenizer cdb_tokenizer;
typedef struct cdb_tok_cache cdb_tok_cache;

/* Loads bpe_simple_vocab_16e6.txt.gz, or vocab.json + merges.txt, from dir.
** *out (free with cdb_tok_free) is NULL on failure; the message, naming the
** file (and line), is in e. */
int cdb_tok_load_dir(const char *dir, cdb_tokenizer **out, cdb_err *e);
/* The same from one OpenAI merges file (gzip) / from the two HF files. */
int cdb_tok_load_file(const char *gz_path, cdb_tokenizer **out, cdb_err *e);
int cdb_tok_load_hf(const char *vocab_json, const char *merges_txt, cdb_tokenizer **out,
                    cdb_err *e);
void cdb_tok_free(cdb_tokenizer *t);

/* Ids of <|startoftext|> / <|endoftext|> (49406 / 49407 for CLIP's files)
** and the vocabulary size (49408). */
int32_t cdb_tok_sot(const cdb_tokenizer *t);
int32_t cdb_tok_eot(const cdb_tokenizer *t);
int32_t cdb_tok_vocab_size(const cdb_tokenizer *t);

/* SHA-256 (64 hex digits + NUL) of what the tokenizer does (its special
** ids, byte symbols and merge table), not of its files: the same tokenizer
** as bpe_simple_vocab_16e6.txt.gz or as vocab.json + merges.txt has one
** digest; a merges file that lost or gained a line has another. */
int cdb_tok_digest(const cdb_tokenizer *t, char hex[65], cdb_err *e);

/* A per-thread cache (word -> ids, bounded: cleared when full) and scratch
** buffers. Caller frees with cdb_tok_cache_free. NULL on OOM. */
cdb_tok_cache *cdb_tok_cache_new(void);
void cdb_tok_cache_free(cdb_tok_cache *c);

/* Tokenizes len bytes of UTF-8 text into at most cap ids (cap >= 2), start
** and end tokens included, truncating and keeping the end token last (as
** clip.tokenize(truncate=True)). cache may be NULL (slower). Errors: text
** not valid UTF-8 or over CLIPDB_MAX_TEXT_BYTES. An empty text gives the two
** special tokens. */
int cdb_tok_encode(const cdb_tokenizer *t, cdb_tok_cache *cache, const char *text,
                   size_t len, int32_t *ids, int cap, int *n_ids, cdb_err *e);
/* The same, also giving the untruncated count (special tokens included) in
** *n_total when n_total is not NULL. */
int cdb_tok_encode_count(const cdb_tokenizer *t, cdb_tok_cache *cache, const char *text,
                         size_t len, int32_t *ids, int cap, int *n_ids, size_t *n_total,
                         cdb_err *e);

#endif
