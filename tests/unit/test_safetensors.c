/* Unit tests of src/model/safetensors.c: valid files, and every way a header can lie. */
#include <stdint.h>

#include "model/safetensors.h"
#include "test.h"

/* Builds "<8-byte LE length><header><data>" in a malloc'ed buffer (caller frees). */
static uint8_t *build(const char *header, const void *data, size_t dlen, size_t *len)
{
    size_t hlen = strlen(header), i;
    uint8_t *b = malloc(8 + hlen + dlen + 1);
    if (!b) abort();
    for (i = 0; i < 8; i++) b[i] = (uint8_t)((uint64_t)hlen >> (8 * i));
    memcpy(b + 8, header, hlen);
    if (dlen) memcpy(b + 8 + hlen, data, dlen);
    *len = 8 + hlen + dlen;
    return b;
}

/* Parses header + dlen zero bytes of data; returns the status, the message in e. */
static int parse_hdr(const char *header, size_t dlen, cdb_err *e)
{
    uint8_t *zeros = calloc(1, dlen + 1), *b;
    size_t len;
    cdb_safetensors *st = NULL;
    int rc;
    b = build(header, zeros, dlen, &len);
    cdb_err_clear(e);
    rc = cdb_st_parse(b, len, &st, e);
    if (rc == CLIPDB_OK) CHECK(st != NULL);
    else CHECK(st == NULL);
    cdb_st_close(st);
    free(b);
    free(zeros);
    return rc;
}

/* The header must be rejected with a message containing `want`. */
#define CHECK_BAD(header, dlen, want)                                          \
    do {                                                                       \
        cdb_err e_;                                                            \
        CHECK(parse_hdr(header, dlen, &e_) == CLIPDB_EFORMAT);                 \
        if (!strstr(e_.msg, want)) {                                           \
            fprintf(stderr, "    message was: %s\n", e_.msg);                  \
            test_fail_at(__FILE__, __LINE__, "message lacks: " want);          \
        }                                                                      \
    } while (0)

TEST(st_parses_valid_file_and_finds_tensors)
{
    const float a[6] = {1, 2, 3, 4, 5, 6};
    uint8_t data[24 + 4 + 8];
    const char *hdr =
        "{\"__metadata__\":{\"format\":\"pt\"},"
        "\"b\":{\"dtype\":\"F16\",\"shape\":[2],\"data_offsets\":[24,28]},"
        "\"a\":{\"dtype\":\"F32\",\"shape\":[2,3],\"data_offsets\":[0,24]},"
        "\"ids\":{\"dtype\":\"I64\",\"shape\":[1,1],\"data_offsets\":[28,36]},"
        "\"empty\":{\"dtype\":\"F32\",\"shape\":[0,5],\"data_offsets\":[36,36]},"
        "\"scalar\":{\"dtype\":\"BF16\",\"shape\":[],\"data_offsets\":[36,36]}}   ";
    size_t len;
    uint8_t *b;
    cdb_safetensors *st = NULL;
    const cdb_tensor *t;
    cdb_err e;
    memcpy(data, a, 24);
    memset(data + 24, 0, 12);
    b = build(hdr, data, sizeof data, &len);
    cdb_err_clear(&e);
    /* "scalar" has 1 element of 2 bytes but 0 bytes: rejected; fix the header first. */
    CHECK(cdb_st_parse(b, len, &st, &e) == CLIPDB_EFORMAT);
    CHECK(strstr(e.msg, "tensor 'scalar'") != NULL);
    free(b);
    hdr = "{\"__metadata__\":{\"format\":\"pt\"},"
          "\"b\":{\"dtype\":\"F16\",\"shape\":[2],\"data_offsets\":[24,28]},"
          "\"a\":{\"dtype\":\"F32\",\"shape\":[2,3],\"data_offsets\":[0,24]},"
          "\"ids\":{\"dtype\":\"I64\",\"shape\":[1,1],\"data_offsets\":[28,36]},"
          "\"empty\":{\"dtype\":\"F32\",\"shape\":[0,5],\"data_offsets\":[36,36]}}   ";
    b = build(hdr, data, sizeof data, &len);
    REQUIRE(cdb_st_parse(b, len, &st, &e) == CLIPDB_OK);
    CHECK(st->n == 4); /* __metadata__ is not a tensor */
    t = cdb_st_find(st, "a");
    REQUIRE(t);
    CHECK(t->dtype == CDB_DT_F32 && !strcmp(t->dtype_name, "F32"));
    CHECK(t->ndim == 2 && t->shape[0] == 2 && t->shape[1] == 3 && t->numel == 6);
    CHECK(t->nbytes == 24 && t->data == b + 8 + strlen(hdr));
    CHECK(!memcmp(t->data, a, 24));
    t = cdb_st_find(st, "b");
    REQUIRE(t);
    CHECK(t->dtype == CDB_DT_F16 && t->numel == 2 && t->nbytes == 4);
    t = cdb_st_find(st, "ids");
    REQUIRE(t);
    CHECK(t->dtype == CDB_DT_OTHER && !strcmp(t->dtype_name, "I64"));
    t = cdb_st_find(st, "empty");
    REQUIRE(t);
    CHECK(t->numel == 0 && t->nbytes == 0);
    CHECK(cdb_st_find(st, "__metadata__") == NULL);
    CHECK(cdb_st_find(st, "nope") == NULL);
    CHECK(st->buf == b && st->len == len);
    cdb_st_close(st);
    free(b);
}

TEST(st_empty_header_object_is_valid)
{
    cdb_err e;
    CHECK(parse_hdr("{}", 0, &e) == CLIPDB_OK);
    CHECK(parse_hdr("{\"__metadata__\":{}}", 0, &e) == CLIPDB_OK);
}

TEST(st_rejects_short_and_lying_header_length)
{
    uint8_t b[16] = {0};
    cdb_safetensors *st = (cdb_safetensors *)1;
    cdb_err e;
    cdb_err_clear(&e);
    CHECK(cdb_st_parse(b, 0, &st, &e) == CLIPDB_EFORMAT && st == NULL);
    CHECK(strstr(e.msg, "too short") != NULL);
    CHECK(cdb_st_parse(b, 7, &st, &e) == CLIPDB_EFORMAT);
    b[0] = 9; /* header of 9 bytes in a 16-byte file: 8 + 9 > 16 */
    CHECK(cdb_st_parse(b, 16, &st, &e) == CLIPDB_EFORMAT);
    CHECK(strstr(e.msg, "header length 9 runs past the end of the file (16 bytes)") != NULL);
    memset(b, 0xff, 8); /* 2^64 - 1 */
    CHECK(cdb_st_parse(b, 16, &st, &e) == CLIPDB_EFORMAT);
    CHECK(strstr(e.msg, "runs past the end") != NULL);
}

TEST(st_rejects_header_over_limit)
{
    size_t n = (size_t)100 * 1024 * 1024 + 16, i;
    uint8_t *b = calloc(1, n);
    cdb_safetensors *st = NULL;
    cdb_err e;
    REQUIRE(b);
    for (i = 0; i < 8; i++) b[i] = (uint8_t)((uint64_t)(n - 8) >> (8 * i));
    cdb_err_clear(&e);
    CHECK(cdb_st_parse(b, n, &st, &e) == CLIPDB_EFORMAT);
    CHECK(strstr(e.msg, "over the") != NULL);
    free(b);
}

TEST(st_rejects_bad_json)
{
    CHECK_BAD("{\"a\":", 0, "not valid JSON");
    CHECK_BAD("not json", 0, "not valid JSON");
    CHECK_BAD("[1,2]", 0, "not a JSON object");
    CHECK_BAD("\"str\"", 0, "not a JSON object");
    CHECK_BAD("{} x", 0, "after the JSON object");
    /* an escaped NUL would cut the name: "w\u0000x" would load as "w" */
    CHECK_BAD("{\"w\\u0000x\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,4]}}", 4,
              "escaped NUL (\\u0000) at byte 3");
    CHECK_BAD("{\"__metadata__\":{\"a\":\"\\u0000\"}}", 0, "escaped NUL");
}

TEST(st_rejects_embedded_nul_in_header)
{
    const char hdr[] = "{}  \0 \0";
    uint8_t b[8 + sizeof hdr - 1];
    cdb_safetensors *st = NULL;
    cdb_err e;
    size_t i;
    for (i = 0; i < 8; i++) b[i] = (uint8_t)((sizeof hdr - 1) >> (8 * i));
    memcpy(b + 8, hdr, sizeof hdr - 1);
    cdb_err_clear(&e);
    CHECK(cdb_st_parse(b, sizeof b, &st, &e) == CLIPDB_EFORMAT);
    CHECK(strstr(e.msg, "after the JSON object") != NULL);
}

TEST(st_rejects_bad_entries)
{
    CHECK_BAD("{\"w\":5}", 0, "tensor 'w': header entry is not an object");
    CHECK_BAD("{\"w\":{\"shape\":[1],\"data_offsets\":[0,4]}}", 4, "tensor 'w': no \"dtype\"");
    CHECK_BAD("{\"w\":{\"dtype\":\"F32\",\"data_offsets\":[0,4]}}", 4, "tensor 'w': no \"shape\"");
    CHECK_BAD("{\"w\":{\"dtype\":\"F32\",\"shape\":[1]}}", 4, "tensor 'w': \"data_offsets\"");
    CHECK_BAD("{\"w\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0]}}", 4,
              "\"data_offsets\" is not [begin, end]");
    CHECK_BAD("{\"w\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,\"4\"]}}", 4,
              "\"data_offsets\" is not [begin, end]");
    CHECK_BAD("{\"w\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[-4,0]}}", 4,
              "\"data_offsets\" is not [begin, end]");
    CHECK_BAD("{\"w\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,4.5]}}", 4,
              "\"data_offsets\" is not [begin, end]");
}

TEST(st_rejects_bad_shapes)
{
    CHECK_BAD("{\"w\":{\"dtype\":\"F32\",\"shape\":[-1],\"data_offsets\":[0,4]}}", 4,
              "tensor 'w': shape entry 0 is not a non-negative integer");
    CHECK_BAD("{\"w\":{\"dtype\":\"F32\",\"shape\":[1,1.5],\"data_offsets\":[0,4]}}", 4,
              "shape entry 1");
    CHECK_BAD("{\"w\":{\"dtype\":\"F32\",\"shape\":[1e300],\"data_offsets\":[0,4]}}", 4,
              "shape entry 0");
    CHECK_BAD("{\"w\":{\"dtype\":\"F32\",\"shape\":[\"2\"],\"data_offsets\":[0,4]}}", 4,
              "shape entry 0");
    /* each dim fits in 2^53 but the product overflows 64 bits */
    CHECK_BAD("{\"w\":{\"dtype\":\"F32\",\"shape\":[4294967296,4294967296,4],"
              "\"data_offsets\":[0,4]}}",
              4, "tensor 'w': element count overflows");
    /* numel fits, numel * itemsize does not */
    CHECK_BAD("{\"w\":{\"dtype\":\"F32\",\"shape\":[4294967296,1073741824],"
              "\"data_offsets\":[0,4]}}",
              4, "tensor 'w': byte count overflows");
    CHECK_BAD("{\"w\":{\"dtype\":\"F32\",\"shape\":[1,1,1,1,1,1,1,1,1],\"data_offsets\":[0,4]}}",
              4, "more than 8 dimensions");
}

TEST(st_rejects_bad_offsets)
{
    CHECK_BAD("{\"visual.proj\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[10,99999999]}}",
              4096,
              "tensor 'visual.proj': data_offsets [10, 99999999] run past the end of the file "
              "(data section is 4096 bytes)");
    CHECK_BAD("{\"w\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[8,4]}}", 16,
              "tensor 'w': data_offsets [8, 4] begin after they end");
    CHECK_BAD("{\"w\":{\"dtype\":\"F32\",\"shape\":[2,2],\"data_offsets\":[0,12]}}", 16,
              "tensor 'w': data_offsets [0, 12] hold 12 bytes, but 4 F32 elements need 16");
    CHECK_BAD("{\"w\":{\"dtype\":\"BF16\",\"shape\":[3],\"data_offsets\":[0,4]}}", 16,
              "hold 4 bytes, but 3 BF16 elements need 6");
    CHECK_BAD("{\"w\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,1e17]}}", 16,
              "\"data_offsets\" is not");
}

TEST(st_rejects_overlap_and_duplicates)
{
    CHECK_BAD("{\"a\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8]},"
              "\"b\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[4,12]}}",
              16, "tensors 'a' [0, 8] and 'b' [4, 12] overlap");
    CHECK_BAD("{\"a\":{\"dtype\":\"F32\",\"shape\":[4],\"data_offsets\":[0,16]},"
              "\"b\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[4,8]}}",
              16, "overlap");
    CHECK_BAD("{\"a\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,4]},"
              "\"a\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[4,8]}}",
              16, "tensor 'a' appears twice");
}

TEST(st_unknown_dtype_is_bounded_not_trusted)
{
    cdb_err e;
    /* An unknown dtype string parses as OTHER; its range must still lie in the file. */
    CHECK(parse_hdr("{\"q\":{\"dtype\":\"Q4_K\",\"shape\":[3],\"data_offsets\":[0,7]}}", 8, &e) ==
          CLIPDB_OK);
    CHECK_BAD("{\"q\":{\"dtype\":\"Q4_K\",\"shape\":[3],\"data_offsets\":[0,70]}}", 8,
              "run past the end");
}

static void write_bytes(const char *path, const void *p, size_t n)
{
    FILE *f = fopen(path, "wb");
    if (!f) abort();
    if (n) fwrite(p, 1, n, f);
    fclose(f);
}

TEST(st_open_rejects_empty_and_truncated_files)
{
    char path[512];
    const char *hdr = "{\"w\":{\"dtype\":\"F32\",\"shape\":[4],\"data_offsets\":[0,16]}}";
    uint8_t data[16] = {0}, *b;
    size_t len;
    cdb_safetensors *st = NULL;
    cdb_err e;

    cdb_err_clear(&e);
    snprintf(path, sizeof path, "%s/st_empty.safetensors", test_tmpdir());
    write_bytes(path, "", 0);
    CHECK(cdb_st_open(path, &st, &e) == CLIPDB_EFORMAT && st == NULL);
    CHECK(strstr(e.msg, "st_empty.safetensors") && strstr(e.msg, "empty"));

    b = build(hdr, data, sizeof data, &len);
    snprintf(path, sizeof path, "%s/st_ok.safetensors", test_tmpdir());
    write_bytes(path, b, len);
    REQUIRE(cdb_st_open(path, &st, &e) == CLIPDB_OK);
    CHECK(st->map.size == len && st->buf == st->map.data);
    CHECK(cdb_st_find(st, "w") && cdb_st_find(st, "w")->numel == 4);
    cdb_st_close(st);

    /* cut inside the data: the tensor runs past the end */
    snprintf(path, sizeof path, "%s/st_trunc.safetensors", test_tmpdir());
    write_bytes(path, b, len - 3);
    CHECK(cdb_st_open(path, &st, &e) == CLIPDB_EFORMAT && st == NULL);
    CHECK(strstr(e.msg, "st_trunc.safetensors: tensor 'w': data_offsets [0, 16] run past the end "
                        "of the file (data section is 13 bytes)") != NULL);
    /* cut inside the header */
    write_bytes(path, b, 20);
    CHECK(cdb_st_open(path, &st, &e) == CLIPDB_EFORMAT);
    CHECK(strstr(e.msg, "runs past the end of the file (20 bytes)") != NULL);
    free(b);

    CHECK(cdb_st_open("/nonexistent/x.safetensors", &st, &e) == CLIPDB_ENOTFOUND);
}
