/* libFuzzer target: tokenizes arbitrary bytes with the real CLIP vocabulary
** ($CLIPDB_BPE, else ../shared/models/clip-vit-b-32/bpe_simple_vocab_16e6.txt.gz),
** or, where that is absent, a tiny vocabulary written to /tmp once.
** Checks the invariants of every successful result. */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <zlib.h>

#include "model/tokenizer.h"

static cdb_tokenizer *tok;
static cdb_tok_cache *cache;

static void load(void)
{
    cdb_err e;
    const char *p = getenv("CLIPDB_BPE");
    char tiny[] = "/tmp/clipdb-fuzz-tok-XXXXXX";
    if (!p || !*p) p = "../shared/models/clip-vit-b-32/bpe_simple_vocab_16e6.txt.gz";
    if (access(p, R_OK) == 0 && cdb_tok_load_file(p, &tok, &e) == CLIPDB_OK) goto done;
    {
        int fd = mkstemp(tiny);
        gzFile g;
        if (fd < 0) abort();
        g = gzdopen(fd, "wb");
        gzputs(g, "#version: tiny\na b\nab c</w>\nb c</w>\nh e\nhe l\nhel l\nhell o</w>\n\xc3 \xa9\n");
        gzclose(g);
        if (cdb_tok_load_file(tiny, &tok, &e) != CLIPDB_OK) {
            fprintf(stderr, "fuzz_tokenizer: %s\n", e.msg);
            abort();
        }
        unlink(tiny);
    }
done:
    cache = cdb_tok_cache_new();
    if (!cache) abort();
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    int32_t ids[77], ids2[77];
    int n = 0, n2 = 0, i;
    size_t total = 0;
    cdb_err e;
    if (!tok) load();
    if (cdb_tok_encode_count(tok, cache, (const char *)data, size, ids, 77, &n, &total, &e) !=
        CLIPDB_OK)
        return 0;
    if (n < 2 || n > 77 || ids[0] != cdb_tok_sot(tok) || ids[n - 1] != cdb_tok_eot(tok)) abort();
    if (total <= 77 ? (size_t)n != total : n != 77) abort();
    for (i = 0; i < n; i++)
        if (ids[i] < 0 || ids[i] >= cdb_tok_vocab_size(tok)) abort();
    /* the cache must not change the result */
    if (cdb_tok_encode(tok, NULL, (const char *)data, size, ids2, 77, &n2, &e) != CLIPDB_OK ||
        n2 != n || memcmp(ids, ids2, (size_t)n * sizeof *ids))
        abort();
    return 0;
}
