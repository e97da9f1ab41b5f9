/* libFuzzer target: the vocabulary parsers. The input is split at the first
** NUL byte into vocab.json and merges.txt (the HF layout), and its whole is
** also written gzip-compressed as an OpenAI merges file; every load must
** succeed or fail cleanly, and a loaded tokenizer must encode a few texts. */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <zlib.h>

#include "model/tokenizer.h"

static char dir[] = "/tmp/clipdb-fuzz-vocab-XXXXXX";
static char vj[64], mt[64], gz[64];

static void write_raw(const char *path, const uint8_t *d, size_t n)
{
    FILE *f = fopen(path, "wb");
    if (!f) abort();
    if (n && fwrite(d, 1, n, f) != n) abort();
    fclose(f);
}

static void try_tok(cdb_tokenizer *t)
{
    static const char *const texts[] = {"a photo of a cat", "abc hello &amp; 123 \xc3\xa9\xc3\xa9",
                                        "<|startoftext|>x'sy"};
    int32_t ids[77];
    int n, i, j;
    cdb_err e;
    for (i = 0; i < 3; i++) {
        if (cdb_tok_encode(t, NULL, texts[i], strlen(texts[i]), ids, 77, &n, &e) != CLIPDB_OK) abort();
        for (j = 0; j < n; j++)
            if (ids[j] < 0 || ids[j] >= cdb_tok_vocab_size(t)) abort();
    }
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    const uint8_t *nul = memchr(data, 0, size);
    size_t vlen = nul ? (size_t)(nul - data) : size;
    cdb_tokenizer *t = NULL;
    cdb_err e;
    gzFile g;
    if (!vj[0]) {
        if (!mkdtemp(dir)) abort();
        snprintf(vj, sizeof vj, "%s/vocab.json", dir);
        snprintf(mt, sizeof mt, "%s/merges.txt", dir);
        snprintf(gz, sizeof gz, "%s/bpe.txt.gz", dir);
    }
    write_raw(vj, data, vlen);
    write_raw(mt, nul ? nul + 1 : data, nul ? size - vlen - 1 : 0);
    if (cdb_tok_load_hf(vj, mt, &t, &e) == CLIPDB_OK) {
        try_tok(t);
        cdb_tok_free(t);
    }
    g = gzopen(gz, "wb1");
    if (!g) abort();
    if (size) gzwrite(g, data, (unsigned)size);
    gzclose(g);
    if (cdb_tok_load_file(gz, &t, &e) == CLIPDB_OK) {
        try_tok(t);
        cdb_tok_free(t);
    }
    /* and the raw bytes as if they were the .gz (corrupt gzip streams) */
    write_raw(gz, data, size);
    if (cdb_tok_load_file(gz, &t, &e) == CLIPDB_OK) {
        try_tok(t);
        cdb_tok_free(t);
    }
    return 0;
}
