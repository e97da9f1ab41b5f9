/*
** tokenizer.h: CLIP's byte-level BPE. Owner: src/model/tokenizer.c.
** A loaded tokenizer is immutable and shared by all threads; per-thread
** state (a BPE cache) lives in a cdb_tok_cache owned by a clipdb_ctx.
*/
#ifndef CDB_TOKENIZER_H
#define CDB_TOKENIZER_H

#include "core/core.h"

#define CDB_TOK_SOT 49406
#define CDB_TOK_EOT 49407

typedef struct cdb_tokenizer cdb_tokenizer;
typedef struct cdb_tok_cache cdb_tok_cache;

/* Loads bpe_simple_vocab_16e6.txt.gz, or vocab.json + merges.txt, from dir. */
int cdb_tok_load_dir(const char *dir, cdb_tokenizer **out, cdb_err *e);
void cdb_tok_free(cdb_tokenizer *t);

cdb_tok_cache *cdb_tok_cache_new(void);
void cdb_tok_cache_free(cdb_tok_cache *c);

/* Tokenizes len bytes of UTF-8 text into at most cap ids (cap >= 2), start
** and end tokens included, truncating and keeping the end token. cache may
** be NULL. */
int cdb_tok_encode(const cdb_tokenizer *t, cdb_tok_cache *cache, const char *text,
                   size_t len, int32_t *ids, int cap, int *n_ids, cdb_err *e);

#endif
