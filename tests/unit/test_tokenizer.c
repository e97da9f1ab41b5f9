/* Unit tests of src/model/tokenizer.c: published ids, the public policy
** (empty, over-long, truncation, bad UTF-8), special tokens, BPE on a tiny
** hand-made vocabulary, and bad vocabulary files. */
#include <stdint.h>
#include <zlib.h>

#include "model/model.h"
#include "model/tokenizer.h"
#include "test.h"

/* The real vocabulary of ../shared, loaded once; NULL when absent. */
static const char *bpe_dir(void)
{
    static char dir[1100];
    char path[1200];
    const char *sh = test_shared_dir();
    if (!sh) return NULL;
    snprintf(dir, sizeof dir, "%s/models/clip-vit-b-32", sh);
    snprintf(path, sizeof path, "%s/bpe_simple_vocab_16e6.txt.gz", dir);
    return cdb_file_exists(path) ? dir : NULL;
}

static cdb_tokenizer *real_tok(void)
{
    static cdb_tokenizer *t;
    static int tried;
    cdb_err e;
    if (!tried) {
        tried = 1;
        if (bpe_dir() && cdb_tok_load_dir(bpe_dir(), &t, &e) != CLIPDB_OK) {
            fprintf(stderr, "    %s\n", e.msg);
            t = NULL;
        }
    }
    return t;
}

static int ids_equal(const int32_t *a, int n, const int32_t *b, int m)
{
    return n == m && !memcmp(a, b, (size_t)n * sizeof *a);
}

static int encode(const cdb_tokenizer *t, cdb_tok_cache *c, const char *s, int32_t *ids, int cap,
                  int *n)
{
    cdb_err e;
    cdb_err_clear(&e);
    return cdb_tok_encode(t, c, s, strlen(s), ids, cap, n, &e);
}

TEST(tok_published_ids)
{
    static const int32_t cat[] = {49406, 320, 1125, 539, 320, 2368, 49407};
    static const int32_t dog[] = {49406, 320, 1125, 539, 320, 1929, 49407};
    cdb_tokenizer *t = real_tok();
    cdb_tok_cache *c = cdb_tok_cache_new();
    int32_t ids[77];
    int n = 0;
    if (!t) {
        cdb_tok_cache_free(c);
        SKIP("../shared/models/clip-vit-b-32/bpe_simple_vocab_16e6.txt.gz absent");
    }
    REQUIRE(c);
    CHECK(cdb_tok_sot(t) == 49406 && cdb_tok_eot(t) == 49407 && cdb_tok_vocab_size(t) == 49408);
    CHECK(encode(t, c, "a photo of a cat", ids, 77, &n) == CLIPDB_OK);
    CHECK(ids_equal(ids, n, cat, 7));
    CHECK(encode(t, c, "a photo of a dog", ids, 77, &n) == CLIPDB_OK);
    CHECK(ids_equal(ids, n, dog, 7));
    /* again from the cache, and without one; case and spacing are cleaned */
    CHECK(encode(t, c, "  A   PHOTO of\ta cat ", ids, 77, &n) == CLIPDB_OK);
    CHECK(ids_equal(ids, n, cat, 7));
    CHECK(encode(t, NULL, "a photo of a dog", ids, 77, &n) == CLIPDB_OK);
    CHECK(ids_equal(ids, n, dog, 7));
    /* HTML entities, unescaped twice: "&amp;lt;" is "<" */
    {
        int32_t ref[77];
        int m = 0;
        CHECK(encode(t, c, "a &amp;lt; b &eacute;", ids, 77, &n) == CLIPDB_OK);
        CHECK(encode(t, c, "a < b \xc3\xa9", ref, 77, &m) == CLIPDB_OK);
        CHECK(ids_equal(ids, n, ref, m));
    }
    cdb_tok_cache_free(c);
}

TEST(tok_truncation_keeps_end_token)
{
    cdb_tokenizer *t = real_tok();
    int32_t ids[77];
    int n = 0;
    size_t total = 0;
    cdb_err e;
    if (!t) SKIP("../shared vocabulary absent");
    CHECK(cdb_tok_encode_count(t, NULL, "a photo of a cat", 16, ids, 4, &n, &total, &e) == CLIPDB_OK);
    CHECK(n == 4 && total == 7);
    CHECK(ids[0] == 49406 && ids[1] == 320 && ids[2] == 1125 && ids[3] == 49407);
    CHECK(encode(t, NULL, "a photo of a cat", ids, 2, &n) == CLIPDB_OK);
    CHECK(n == 2 && ids[0] == 49406 && ids[1] == 49407);
    CHECK(encode(t, NULL, "a", ids, 1, &n) == CLIPDB_EINVAL);
}

TEST(tok_special_tokens_in_text)
{
    cdb_tokenizer *t = real_tok();
    int32_t ids[77];
    int n = 0;
    if (!t) SKIP("../shared vocabulary absent");
    CHECK(encode(t, NULL, "<|startoftext|>a cat<|endoftext|>", ids, 77, &n) == CLIPDB_OK);
    REQUIRE(n == 6);
    CHECK(ids[0] == 49406 && ids[1] == 49406 && ids[2] == 320 && ids[3] == 2368 &&
          ids[4] == 49407 && ids[5] == 49407);
    /* upper case is lowered first, so it is the special token too */
    CHECK(encode(t, NULL, "<|ENDOFTEXT|>", ids, 77, &n) == CLIPDB_OK);
    CHECK(n == 3 && ids[1] == 49407);
}

TEST(tok_rejects_bad_utf8)
{
    cdb_tokenizer *t = real_tok();
    int32_t ids[77];
    int n = 0;
    cdb_err e;
    if (!t) SKIP("../shared vocabulary absent");
    cdb_err_clear(&e);
    CHECK(cdb_tok_encode(t, NULL, "abc\xff", 4, ids, 77, &n, &e) == CLIPDB_EINVAL);
    CHECK(!strcmp(e.msg, "text is not valid UTF-8 (byte 0xff at offset 3)"));
    CHECK(cdb_tok_encode(t, NULL, "\xed\xa0\x80", 3, ids, 77, &n, &e) == CLIPDB_EINVAL); /* surrogate */
    CHECK(cdb_tok_encode(t, NULL, "\xc0\x80", 2, ids, 77, &n, &e) == CLIPDB_EINVAL);     /* overlong */
    CHECK(cdb_tok_encode(t, NULL, "ab\xe2\x82", 4, ids, 77, &n, &e) == CLIPDB_EINVAL);   /* cut */
    CHECK(strstr(e.msg, "offset 2") != NULL);
}

TEST(tok_policy_through_ctx)
{
    clipdb_model *m = NULL;
    clipdb_ctx *c = NULL;
    int32_t ids[77];
    int n = -1, i;
    char *big = NULL;
    if (!bpe_dir()) SKIP("../shared vocabulary absent");
    REQUIRE(clipdb_model_open_tokenizer(&m, bpe_dir()) == CLIPDB_OK);
    REQUIRE(clipdb_ctx_new(&c, m) == CLIPDB_OK);
    CHECK(clipdb_tokenize(c, "", ids, 77, &n) == CLIPDB_EINVAL);
    CHECK(!strcmp(clipdb_ctx_errmsg(c), "empty text") && n == 0);
    CHECK(clipdb_tokenize(c, " \t&nbsp; \n", ids, 77, &n) == CLIPDB_EINVAL);
    CHECK(!strcmp(clipdb_ctx_errmsg(c), "empty text"));
    big = malloc(10001);
    REQUIRE(big);
    for (i = 0; i < 10000; i++) big[i] = "a cat "[i % 6];
    big[10000] = '\0';
    CHECK(clipdb_tokenize(c, big, ids, 77, &n) == CLIPDB_ELIMIT);
    CHECK(strstr(clipdb_ctx_errmsg(c), "text is 3336 tokens long; the context holds 77") != NULL);
    CHECK(clipdb_ctx_set_truncate(c, 1) == CLIPDB_OK);
    CHECK(clipdb_tokenize(c, big, ids, 77, &n) == CLIPDB_OK);
    CHECK(n == 77 && ids[0] == 49406 && ids[1] == 320 && ids[2] == 2368 && ids[76] == 49407);
    CHECK(clipdb_tokenize(c, "a photo of a cat", ids, 77, &n) == CLIPDB_OK && n == 7);
    free(big);
    clipdb_ctx_free(c);
    clipdb_model_close(m);
}

/* ---- a tiny vocabulary written by the test ---------------------------------- */

static const char *write_file(const char *dir, const char *name, const char *data, size_t len)
{
    static char path[600];
    FILE *f;
    snprintf(path, sizeof path, "%s/%s", dir, name);
    f = fopen(path, "wb");
    if (!f) return NULL;
    fwrite(data, 1, len, f);
    fclose(f);
    return path;
}

static int write_gz(const char *dir, const char *text)
{
    char path[600];
    gzFile g;
    snprintf(path, sizeof path, "%s/bpe_simple_vocab_16e6.txt.gz", dir);
    g = gzopen(path, "wb");
    if (!g) return 0;
    gzwrite(g, text, (unsigned)strlen(text));
    gzclose(g);
    return 1;
}

static const char *subdir(const char *name)
{
    static char path[600];
    char cmd[700];
    snprintf(path, sizeof path, "%s/%s", test_tmpdir(), name);
    snprintf(cmd, sizeof cmd, "mkdir -p '%s'", path);
    if (system(cmd) != 0) return NULL;
    return path;
}

TEST(tok_tiny_vocab_bpe_by_rank)
{
    const char *dir = subdir("tiny");
    cdb_tokenizer *t = NULL;
    int32_t ids[16];
    int n = 0;
    cdb_err e;
    REQUIRE(dir);
    /* 'a' is vocabulary entry 64 ('!' is 0), "c</w>" 256 + 66. Merges:
    ** 512 "ab", 513 "abc</w>", 514 "bc</w>" (rank 2: loses to "a b"). */
    REQUIRE(write_gz(dir, "#version: test\na b\nab c</w>\nb c</w>"));
    REQUIRE(cdb_tok_load_dir(dir, &t, &e) == CLIPDB_OK);
    CHECK(cdb_tok_sot(t) == 515 && cdb_tok_eot(t) == 516 && cdb_tok_vocab_size(t) == 517);
    CHECK(encode(t, NULL, "abc", ids, 16, &n) == CLIPDB_OK);
    CHECK(n == 3 && ids[0] == 515 && ids[1] == 513 && ids[2] == 516);
    CHECK(encode(t, NULL, "bc b", ids, 16, &n) == CLIPDB_OK);
    CHECK(n == 4 && ids[1] == 514 && ids[2] == 256 + 65);
    /* "aaa": no merge of a+a; each byte stays, the last with </w> */
    CHECK(encode(t, NULL, "aaa", ids, 16, &n) == CLIPDB_OK);
    CHECK(n == 5 && ids[1] == 64 && ids[2] == 64 && ids[3] == 256 + 64);
    cdb_tok_free(t);
}

TEST(tok_bad_vocab_files)
{
    const char *d;
    cdb_tokenizer *t = NULL;
    cdb_err e;
    char *gz = NULL;
    size_t gzlen = 0;

    cdb_err_clear(&e);
    CHECK(cdb_tok_load_dir("/nonexistent/dir", &t, &e) == CLIPDB_ENOTFOUND && !t);
    CHECK(strstr(e.msg, "bpe_simple_vocab_16e6.txt.gz") != NULL);

    REQUIRE((d = subdir("empty")) != NULL);
    REQUIRE(write_file(d, "bpe_simple_vocab_16e6.txt.gz", "", 0));
    CHECK(cdb_tok_load_dir(d, &t, &e) == CLIPDB_EFORMAT && !t);
    CHECK(strstr(e.msg, "empty file") != NULL);

    REQUIRE((d = subdir("notgz")) != NULL);
    REQUIRE(write_file(d, "bpe_simple_vocab_16e6.txt.gz", "hello\nworld\n", 12));
    CHECK(cdb_tok_load_dir(d, &t, &e) == CLIPDB_EFORMAT && !t);
    CHECK(strstr(e.msg, "not a valid gzip file") != NULL);

    REQUIRE((d = subdir("malformed")) != NULL);
    REQUIRE(write_gz(d, "#version\na b\nab\nc d\n"));
    CHECK(cdb_tok_load_dir(d, &t, &e) == CLIPDB_EFORMAT && !t);
    CHECK(strstr(e.msg, "bpe_simple_vocab_16e6.txt.gz:3: malformed merge line") != NULL);

    REQUIRE((d = subdir("badutf8")) != NULL);
    REQUIRE(write_gz(d, "#version\na \xff\n"));
    CHECK(cdb_tok_load_dir(d, &t, &e) == CLIPDB_EFORMAT && !t);
    CHECK(strstr(e.msg, "not valid UTF-8") != NULL);

    /* HF files */
    REQUIRE((d = subdir("hf_array")) != NULL);
    REQUIRE(write_file(d, "vocab.json", "[1, 2]", 6));
    REQUIRE(write_file(d, "merges.txt", "#version: 0.2\na b\n", 18));
    CHECK(cdb_tok_load_dir(d, &t, &e) == CLIPDB_EFORMAT && !t);
    CHECK(strstr(e.msg, "vocab.json: not a JSON object") != NULL);

    REQUIRE((d = subdir("hf_badjson")) != NULL);
    REQUIRE(write_file(d, "vocab.json", "{\n\"a\": 1,\n\"b\" 2}", 17));
    REQUIRE(write_file(d, "merges.txt", "#version: 0.2\na b\n", 18));
    CHECK(cdb_tok_load_dir(d, &t, &e) == CLIPDB_EFORMAT && !t);
    CHECK(strstr(e.msg, "vocab.json:3: not valid JSON") != NULL);

    /* "a\u0000b" would be read as the symbol "a" */
    REQUIRE((d = subdir("hf_nulescape")) != NULL);
    REQUIRE(write_file(d, "vocab.json", "{\n\"a\": 1,\n\"a\\u0000b\": 2}", 24));
    REQUIRE(write_file(d, "merges.txt", "#version: 0.2\na b\n", 18));
    CHECK(cdb_tok_load_dir(d, &t, &e) == CLIPDB_EFORMAT && !t);
    CHECK(strstr(e.msg, "vocab.json:3: a symbol with an escaped NUL") != NULL);

    REQUIRE((d = subdir("hf_badid")) != NULL);
    REQUIRE(write_file(d, "vocab.json", "{\"a\": \"x\"}", 10));
    REQUIRE(write_file(d, "merges.txt", "#version: 0.2\na b\n", 18));
    CHECK(cdb_tok_load_dir(d, &t, &e) == CLIPDB_EFORMAT && !t);
    CHECK(strstr(e.msg, "entry \"a\" is not an integer id") != NULL);

    REQUIRE((d = subdir("hf_nomerges")) != NULL);
    REQUIRE(write_file(d, "vocab.json", "{\"a\": 1}", 8));
    CHECK(cdb_tok_load_dir(d, &t, &e) != CLIPDB_OK && !t); /* byte symbols missing */

    /* a truncated copy of the real file */
    if (!bpe_dir()) SKIP("../shared vocabulary absent (truncated-gzip case)");
    {
        char src[1200];
        snprintf(src, sizeof src, "%s/bpe_simple_vocab_16e6.txt.gz", bpe_dir());
        REQUIRE(cdb_read_file(src, 1 << 24, &gz, &gzlen, &e) == CLIPDB_OK);
        REQUIRE((d = subdir("truncated")) != NULL);
        REQUIRE(write_file(d, "bpe_simple_vocab_16e6.txt.gz", gz, gzlen / 2));
        CHECK(cdb_tok_load_dir(d, &t, &e) == CLIPDB_EFORMAT && !t);
        CHECK(strstr(e.msg, "truncated gzip stream") != NULL);
        free(gz);
    }
}

/* The gzip reader: every member is read (a merge file cut into two members
** reads as one text: the bad line 3 sits in the second member), and a
** file that inflates past the limit (64 MiB) is refused as such, not read
** into memory without bound. */
TEST(tok_gzip_members_and_inflate_limit)
{
    const char *d;
    cdb_tokenizer *t = NULL;
    cdb_err e;
    char path[700], *chunk;
    gzFile g;
    size_t left;

    cdb_err_clear(&e);
    REQUIRE((d = subdir("two_members")) != NULL);
    snprintf(path, sizeof path, "%s/bpe_simple_vocab_16e6.txt.gz", d);
    REQUIRE((g = gzopen(path, "wb")) != NULL);
    gzputs(g, "#version\na b\n");
    gzclose(g);
    REQUIRE((g = gzopen(path, "ab")) != NULL); /* a second gzip member */
    gzputs(g, "ab\nc d\n");
    gzclose(g);
    CHECK(cdb_tok_load_dir(d, &t, &e) == CLIPDB_EFORMAT && !t);
    CHECK(strstr(e.msg, "bpe_simple_vocab_16e6.txt.gz:3: malformed merge line") != NULL);

    REQUIRE((d = subdir("bomb")) != NULL);
    snprintf(path, sizeof path, "%s/bpe_simple_vocab_16e6.txt.gz", d);
    REQUIRE((chunk = calloc(1, 1 << 20)) != NULL);
    REQUIRE((g = gzopen(path, "wb1")) != NULL);
    for (left = ((size_t)64 << 20) + 1; left > 0;) {
        unsigned n = left < (1u << 20) ? (unsigned)left : (1u << 20);
        REQUIRE(gzwrite(g, chunk, n) == (int)n);
        left -= n;
    }
    gzclose(g);
    free(chunk);
    CHECK(cdb_tok_load_dir(d, &t, &e) == CLIPDB_ELIMIT && !t);
    CHECK(strstr(e.msg, "inflates to more than 67108864 bytes") != NULL);
}

/* The digest a database records (cdb_tok_digest) describes what the
** tokenizer does: a merges file with a trailing newline is the same
** tokenizer; one that lost its last merge, or has two merges swapped, is
** another. */
TEST(tok_digest_is_of_behaviour_not_files)
{
    static const char *const texts[] = {
        "#version: test\na b\nab c</w>\nb c</w>",   /* 0: the reference */
        "#version: test\na b\nab c</w>\nb c</w>\n", /* 1: same, trailing newline */
        "#other header\na b\nab c</w>\nb c</w>",    /* 2: same (the header is not read) */
        "#version: test\na b\nab c</w>",            /* 3: lost the last merge */
        "#version: test\nab c</w>\na b\nb c</w>",   /* 4: two merges swapped */
    };
    char hex[5][65];
    size_t i;
    for (i = 0; i < sizeof texts / sizeof texts[0]; i++) {
        char name[32];
        const char *dir;
        cdb_tokenizer *t = NULL;
        cdb_err e;
        snprintf(name, sizeof name, "digest%zu", i);
        REQUIRE((dir = subdir(name)) != NULL);
        REQUIRE(write_gz(dir, texts[i]));
        REQUIRE(cdb_tok_load_dir(dir, &t, &e) == CLIPDB_OK);
        REQUIRE(cdb_tok_digest(t, hex[i], &e) == CLIPDB_OK);
        CHECK(strlen(hex[i]) == 64);
        cdb_tok_free(t);
    }
    CHECK(!strcmp(hex[0], hex[1]));
    CHECK(!strcmp(hex[0], hex[2]));
    CHECK(strcmp(hex[0], hex[3]) != 0);
    CHECK(strcmp(hex[0], hex[4]) != 0);
    CHECK(strcmp(hex[3], hex[4]) != 0);
}
