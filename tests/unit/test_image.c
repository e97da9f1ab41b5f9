/* Unit tests of src/model/image.c: bad input gives clear errors; the resize
** matches a plain scalar implementation of Pillow's formula at sizes on both
** sides of every threshold; the public load path on a context. */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <jpeglib.h>
#include <png.h>
#include <zlib.h>

#include "model/image.h"
#include "model/model.h"
#include "models.h"
#include "test.h"

/* ---- fixtures ---------------------------------------------------------- */

static uint32_t lcg(uint32_t *s)
{
    *s = *s * 1664525u + 1013904223u;
    return *s >> 24;
}

/* A w x h image of smooth gradients plus noise (edges and flat areas). */
static void fill_image(cdb_rgb *img, int w, int h, uint32_t seed)
{
    size_t i, n = (size_t)w * (size_t)h;
    img->px = malloc(n * 3);
    img->cap = n * 3;
    img->w = w;
    img->h = h;
    img->full_w = img->full_h = img->dct_num = 0;
    img->partial_left = img->partial_top = 0;
    for (i = 0; i < n; i++) {
        int x = (int)(i % (size_t)w), y = (int)(i / (size_t)w);
        img->px[3 * i + 0] = (uint8_t)((x * 7 + y * 3) & 255);
        img->px[3 * i + 1] = (uint8_t)lcg(&seed);
        img->px[3 * i + 2] = (uint8_t)(((x / 5 + y / 7) & 1) ? 250 : 5);
    }
}

static void write_bytes(const char *path, const void *p, size_t n)
{
    FILE *f = fopen(path, "wb");
    if (!f) return;
    if (n) fwrite(p, 1, n, f);
    fclose(f);
}

/* A small real JPEG made with libjpeg. Caller frees *out with free. */
static void make_jpeg(int w, int h, unsigned char **out, unsigned long *len)
{
    struct jpeg_compress_struct ci;
    struct jpeg_error_mgr err;
    cdb_rgb img = {0};
    JSAMPROW row;
    fill_image(&img, w, h, 1);
    *out = NULL;
    *len = 0;
    ci.err = jpeg_std_error(&err);
    jpeg_create_compress(&ci);
    jpeg_mem_dest(&ci, out, len);
    ci.image_width = (JDIMENSION)w;
    ci.image_height = (JDIMENSION)h;
    ci.input_components = 3;
    ci.in_color_space = JCS_RGB;
    jpeg_set_defaults(&ci);
    jpeg_set_quality(&ci, 90, TRUE);
    jpeg_start_compress(&ci, TRUE);
    while (ci.next_scanline < ci.image_height) {
        row = img.px + (size_t)ci.next_scanline * (size_t)w * 3;
        jpeg_write_scanlines(&ci, &row, 1);
    }
    jpeg_finish_compress(&ci);
    jpeg_destroy_compress(&ci);
    cdb_rgb_free(&img);
}

static void put32(uint8_t *p, uint32_t v)
{
    p[0] = (uint8_t)(v >> 24);
    p[1] = (uint8_t)(v >> 16);
    p[2] = (uint8_t)(v >> 8);
    p[3] = (uint8_t)v;
}

/* Signature + IHDR (w x h, 8-bit RGB) with a valid CRC; 33 bytes. */
static void png_header(uint8_t *b, uint32_t w, uint32_t h)
{
    memcpy(b, "\x89PNG\r\n\x1a\n", 8);
    put32(b + 8, 13);
    memcpy(b + 12, "IHDR", 4);
    put32(b + 16, w);
    put32(b + 20, h);
    b[24] = 8; /* depth */
    b[25] = 2; /* RGB */
    b[26] = b[27] = b[28] = 0;
    put32(b + 29, (uint32_t)crc32(0, b + 12, 17));
}

static int decode(const void *p, size_t n, cdb_rgb *img, cdb_err *e)
{
    cdb_err_clear(e);
    return cdb_image_decode_memory(p, n, 0, img, e);
}

/* ---- bad input ----------------------------------------------------------- */

TEST(image_missing_empty_and_text_files_fail_clearly)
{
    cdb_rgb img = {0};
    cdb_err e;
    char path[600];
    cdb_err_clear(&e);
    snprintf(path, sizeof path, "%s/nope.jpg", test_tmpdir());
    CHECK(cdb_image_decode_file(path, 224, &img, &e) == CLIPDB_ENOTFOUND);
    CHECK(strstr(e.msg, path) != NULL);

    snprintf(path, sizeof path, "%s/empty.png", test_tmpdir());
    write_bytes(path, "", 0);
    cdb_err_clear(&e);
    CHECK(cdb_image_decode_file(path, 224, &img, &e) == CLIPDB_EFORMAT);
    CHECK(strstr(e.msg, path) != NULL && strstr(e.msg, "empty") != NULL);

    snprintf(path, sizeof path, "%s/notes.jpg", test_tmpdir());
    write_bytes(path, "hello, this is text\n", 20);
    cdb_err_clear(&e);
    CHECK(cdb_image_decode_file(path, 224, &img, &e) == CLIPDB_EFORMAT);
    CHECK(strstr(e.msg, "not a recognised image (JPEG, PNG, WebP, BMP, GIF)") != NULL);
    CHECK(strstr(e.msg, path) != NULL);
    cdb_rgb_free(&img);
}

TEST(image_truncated_jpeg_is_an_error_not_grey_pixels)
{
    unsigned char *jpg = NULL;
    unsigned long len = 0;
    cdb_rgb img = {0};
    cdb_err e;
    make_jpeg(96, 64, &jpg, &len);
    REQUIRE(jpg && len > 200);
    REQUIRE(decode(jpg, len, &img, &e) == CLIPDB_OK);
    CHECK(img.w == 96 && img.h == 64);
    CHECK(decode(jpg, len / 2, &img, &e) == CLIPDB_EFORMAT);
    CHECK(strstr(e.msg, "corrupt JPEG data") != NULL);
    CHECK(decode(jpg, 40, &img, &e) == CLIPDB_EFORMAT);  /* inside the headers */
    CHECK(strstr(e.msg, "corrupt JPEG data") != NULL);
    CHECK(decode(jpg, 3, &img, &e) == CLIPDB_EFORMAT);
    free(jpg);
    cdb_rgb_free(&img);
}

TEST(image_truncated_png_fails)
{
    cdb_rgb src = {0}, img = {0};
    png_image pi;
    size_t len = 0;
    void *buf;
    cdb_err e;
    fill_image(&src, 50, 40, 3);
    memset(&pi, 0, sizeof pi);
    pi.version = PNG_IMAGE_VERSION;
    pi.width = 50;
    pi.height = 40;
    pi.format = PNG_FORMAT_RGB;
    REQUIRE(png_image_write_to_memory(&pi, NULL, &len, 0, src.px, 0, NULL));
    buf = malloc(len);
    REQUIRE(buf);
    REQUIRE(png_image_write_to_memory(&pi, buf, &len, 0, src.px, 0, NULL));
    REQUIRE(decode(buf, len, &img, &e) == CLIPDB_OK);
    CHECK(img.w == 50 && img.h == 40 && !memcmp(img.px, src.px, 50 * 40 * 3));
    CHECK(decode(buf, len - 30, &img, &e) == CLIPDB_EFORMAT);
    CHECK(strstr(e.msg, "corrupt PNG data") != NULL);
    CHECK(decode(buf, 20, &img, &e) == CLIPDB_EFORMAT);
    free(buf);
    cdb_rgb_free(&src);
    cdb_rgb_free(&img);
}

TEST(image_png_with_absurd_dimensions_fails_before_allocating)
{
    uint8_t b[33 + 12];
    cdb_rgb img = {0};
    cdb_err e;
    png_header(b, 100000, 100000);
    put32(b + 33, 0);
    memcpy(b + 37, "IEND", 4);
    put32(b + 41, (uint32_t)crc32(0, (const uint8_t *)"IEND", 4));
    CHECK(decode(b, sizeof b, &img, &e) == CLIPDB_ELIMIT);
    CHECK(strstr(e.msg, "image is 100000x100000; the limit is") != NULL);
    CHECK(img.px == NULL);
    /* within the side limit but over the pixel count */
    png_header(b, 20000, 20000);
    CHECK(decode(b, sizeof b, &img, &e) == CLIPDB_ELIMIT);
    CHECK(strstr(e.msg, "image is 20000x20000") != NULL);
    png_header(b, 0, 7);
    CHECK(decode(b, sizeof b, &img, &e) == CLIPDB_EFORMAT);
    cdb_rgb_free(&img);
}

TEST(image_gif_without_frames_or_with_garbage_fails)
{
    static const uint8_t no_frame[] = {'G', 'I', 'F', '8', '9', 'a', 1, 0, 1, 0, 0, 0, 0, 0x3B};
    uint8_t garbage[64];
    uint32_t s = 9;
    size_t i;
    cdb_rgb img = {0};
    cdb_err e;
    CHECK(decode(no_frame, sizeof no_frame, &img, &e) == CLIPDB_EFORMAT);
    CHECK(strstr(e.msg, "GIF has no image frame") != NULL);
    memcpy(garbage, "GIF89a", 6);
    for (i = 6; i < sizeof garbage; i++) garbage[i] = (uint8_t)lcg(&s);
    CHECK(decode(garbage, sizeof garbage, &img, &e) != CLIPDB_OK);
    CHECK(strstr(e.msg, "GIF") != NULL);
    CHECK(decode(garbage, 8, &img, &e) == CLIPDB_EFORMAT);  /* header cut short */
    cdb_rgb_free(&img);
}

TEST(image_other_magic_with_garbage_fails)
{
    uint8_t b[80];
    uint32_t s = 5;
    size_t i;
    cdb_rgb img = {0};
    cdb_err e;
    for (i = 0; i < sizeof b; i++) b[i] = (uint8_t)lcg(&s);
    memcpy(b, "RIFF\x40\0\0\0WEBPVP8 ", 16);
    CHECK(decode(b, sizeof b, &img, &e) == CLIPDB_EFORMAT);
    CHECK(strstr(e.msg, "WebP") != NULL);
    memcpy(b, "BM", 2);
    CHECK(decode(b, sizeof b, &img, &e) == CLIPDB_EFORMAT);
    CHECK(strstr(e.msg, "BMP") != NULL);
    CHECK(decode(b, 0, &img, &e) == CLIPDB_EFORMAT);
    cdb_rgb_free(&img);
}

/* A bottom-up 24-bit BMP of w x h (rows padded to 4 bytes), pixel (x, y) =
** (x, y, x + y); returns its length. */
static size_t make_bmp24(uint8_t *b, size_t cap, int w, int h)
{
    size_t stride = ((size_t)w * 3 + 3) / 4 * 4, n = 54 + stride * (size_t)h;
    int x, y;
    if (n > cap) return 0;
    memset(b, 0, n);
    memcpy(b, "BM", 2);
    b[2] = (uint8_t)n, b[3] = (uint8_t)(n >> 8), b[4] = (uint8_t)(n >> 16);
    b[10] = 54, b[14] = 40;
    b[18] = (uint8_t)w, b[19] = (uint8_t)(w >> 8), b[20] = (uint8_t)(w >> 16);
    b[22] = (uint8_t)h, b[23] = (uint8_t)(h >> 8), b[24] = (uint8_t)(h >> 16);
    b[26] = 1, b[28] = 24;
    for (y = 0; y < h; y++)
        for (x = 0; x < w; x++) {
            uint8_t *p = b + 54 + stride * (size_t)(h - 1 - y) + 3 * (size_t)x;
            p[0] = (uint8_t)(x + y), p[1] = (uint8_t)y, p[2] = (uint8_t)x; /* B, G, R */
        }
    return n;
}

/* The pixel limit of a decode (cdb_rgb.max_pixels through
** cdb_image_load_with) and of a ctx (clipdb_ctx_set_max_image_pixels): an
** image of exactly the limit decodes, one pixel more is CLIPDB_ELIMIT; a
** limit above the library's is refused and leaves the old one. */
TEST(image_pixel_limit_per_decode_and_per_ctx)
{
    static uint8_t b[54 + 40 * 3 * 30];
    size_t n = make_bmp24(b, sizeof b, 40, 30); /* 1,200 pixels */
    struct cdb_img_scratch *s = NULL;
    float px[3 * 8 * 8], *pix = NULL;
    cdb_err e;
    const char *dir = test_tiny_clip_model();
    clipdb_model *m = NULL;
    clipdb_ctx *c = NULL;
    REQUIRE(n == sizeof b);
    CHECK(cdb_image_load_with(&s, NULL, b, n, 8, 1199, px, &e) == CLIPDB_ELIMIT);
    CHECK(strstr(e.msg, "40x30") && strstr(e.msg, "1199 pixels in all"));
    CHECK(cdb_image_load_with(&s, NULL, b, n, 8, 1200, px, &e) == CLIPDB_OK);
    CHECK(cdb_image_load_with(&s, NULL, b, n, 8, 0, px, &e) == CLIPDB_OK); /* 0: the default */
    cdb_img_scratch_free(s);
    CHECK(clipdb_ctx_set_max_image_pixels(NULL, 5) == CLIPDB_EINVAL);
    if (!dir) SKIP("../shared (the tokenizer) absent: the ctx half");
    REQUIRE(clipdb_model_open(&m, dir) == CLIPDB_OK);
    REQUIRE(clipdb_ctx_new(&c, m) == CLIPDB_OK);
    pix = malloc(clipdb_image_floats(m) * sizeof *pix);
    REQUIRE(pix);
    CHECK(clipdb_image_load_memory(c, b, n, pix) == CLIPDB_OK);
    CHECK(clipdb_ctx_set_max_image_pixels(c, 1199) == CLIPDB_OK);
    CHECK(clipdb_image_load_memory(c, b, n, pix) == CLIPDB_ELIMIT);
    CHECK(strstr(clipdb_ctx_errmsg(c), "1199 pixels in all") != NULL);
    CHECK(clipdb_ctx_set_max_image_pixels(c, 1200) == CLIPDB_OK);
    CHECK(clipdb_image_load_memory(c, b, n, pix) == CLIPDB_OK);
    CHECK(clipdb_ctx_set_max_image_pixels(c, 1199) == CLIPDB_OK);
    CHECK(clipdb_ctx_set_max_image_pixels(c, (unsigned long long)CLIPDB_MAX_IMAGE_PIXELS + 1) ==
          CLIPDB_EINVAL);
    CHECK(strstr(clipdb_ctx_errmsg(c), "above the largest") != NULL);
    CHECK(clipdb_image_load_memory(c, b, n, pix) == CLIPDB_ELIMIT); /* 1199 still */
    CHECK(clipdb_ctx_set_max_image_pixels(c, 0) == CLIPDB_OK);
    CHECK(clipdb_image_load_memory(c, b, n, pix) == CLIPDB_OK);
    free(pix);
    clipdb_ctx_free(c);
    clipdb_model_close(m);
}

TEST(image_truncated_bmp_is_an_error_not_black_pixels)
{
    uint8_t b[256];
    cdb_rgb img = {0};
    cdb_err e;
    size_t n = make_bmp24(b, sizeof b, 5, 3); /* stride 16: one pad byte a row */
    REQUIRE(n == 54 + 48);
    REQUIRE(decode(b, n, &img, &e) == CLIPDB_OK);
    CHECK(img.w == 5 && img.h == 3);
    CHECK(img.px[3 * (2 * 5 + 4) + 0] == 4 && img.px[3 * (2 * 5 + 4) + 1] == 2 &&
          img.px[3 * (2 * 5 + 4) + 2] == 6);
    /* The last row's padding may be missing (some writers leave it out). */
    CHECK(decode(b, n - 1, &img, &e) == CLIPDB_OK);
    CHECK(decode(b, n - 2, &img, &e) == CLIPDB_EFORMAT);
    CHECK(strstr(e.msg, "truncated BMP data: 5x3 pixels at 24 bits need 101 bytes, the file has 100") !=
          NULL);
    /* A header alone that declares 13000 x 13000 pixels: an error at once,
    ** not a 500 MB black image. */
    b[18] = (uint8_t)13000, b[19] = (uint8_t)(13000 >> 8);
    b[22] = (uint8_t)13000, b[23] = (uint8_t)(13000 >> 8);
    CHECK(decode(b, 70, &img, &e) == CLIPDB_EFORMAT);
    CHECK(strstr(e.msg, "truncated BMP data: 13000x13000") != NULL);
    cdb_rgb_free(&img);
}

/* ---- resize against a scalar reference --------------------------------- */

/* Pillow's bicubic antialiased resample, written the plain way: for each
** output pixel, weights in double, normalised, rounded to 22-bit fixed point
** (half away from zero), 8-bit clamp after each pass. Computes the window
** (x0, y0, cw, ch) of the (rw, rh) resize; horizontal pass over every row. */
static double ref_cubic(double x)
{
    x = x < 0 ? -x : x;
    if (x < 1) return 1.5 * x * x * x - 2.5 * x * x + 1;
    if (x < 2) return -0.5 * x * x * x + 2.5 * x * x - 4 * x + 2;
    return 0;
}

static int ref_taps(int in, int out, int i, int *lo, int32_t *k)
{
    double scale = (double)in / out, fs = scale < 1 ? 1 : scale, sup = 2 * fs;
    double c = (i + 0.5) * scale, w[4096], sum = 0;
    int a = (int)(c - sup + 0.5), b = (int)(c + sup + 0.5), j;
    if (a < 0) a = 0;
    if (b > in) b = in;
    for (j = a; j < b; j++) sum += w[j - a] = ref_cubic((j - c + 0.5) / fs);
    for (j = a; j < b; j++) {
        double v = w[j - a] / sum * 4194304.0;
        k[j - a] = (int32_t)(v < 0 ? v - 0.5 : v + 0.5);
    }
    *lo = a;
    return b - a;
}

static uint8_t ref_clip(int64_t v)
{
    v >>= 22;
    return (uint8_t)(v < 0 ? 0 : v > 255 ? 255 : v);
}

static void ref_resize(const cdb_rgb *img, int rw, int rh, int x0, int y0, int cw, int ch,
                       uint8_t *out)
{
    uint8_t *mid = malloc((size_t)img->h * (size_t)cw * 3);
    int32_t k[4096];
    int x, y, c, t, lo, n;
    for (y = 0; y < img->h; y++)
        for (x = 0; x < cw; x++) {
            n = rw == img->w ? 0 : ref_taps(img->w, rw, x0 + x, &lo, k);
            for (c = 0; c < 3; c++) {
                int64_t acc = 1 << 21;
                if (!n) {
                    mid[((size_t)y * cw + x) * 3 + c] =
                        img->px[((size_t)y * img->w + x0 + x) * 3 + c];
                    continue;
                }
                for (t = 0; t < n; t++)
                    acc += (int64_t)img->px[((size_t)y * img->w + lo + t) * 3 + c] * k[t];
                mid[((size_t)y * cw + x) * 3 + c] = ref_clip(acc);
            }
        }
    for (y = 0; y < ch; y++) {
        n = rh == img->h ? 0 : ref_taps(img->h, rh, y0 + y, &lo, k);
        for (x = 0; x < cw; x++)
            for (c = 0; c < 3; c++) {
                int64_t acc = 1 << 21;
                if (!n) {
                    out[((size_t)y * cw + x) * 3 + c] = mid[((size_t)(y0 + y) * cw + x) * 3 + c];
                    continue;
                }
                for (t = 0; t < n; t++) acc += (int64_t)mid[((size_t)(lo + t) * cw + x) * 3 + c] * k[t];
                out[((size_t)y * cw + x) * 3 + c] = ref_clip(acc);
            }
    }
    free(mid);
}

static const float mean_[3] = {0.48145466f, 0.4578275f, 0.40821073f};
static const float std_[3] = {0.26862954f, 0.26130258f, 0.27577711f};

/* Preprocess (crop window) and, when small enough, the full resize against
** the reference. */
static void check_size(int w, int h, int S)
{
    cdb_rgb img = {0};
    int rw, rh, x0, y0, c;
    size_t i, plane = (size_t)S * S, bad = 0;
    uint8_t *want = malloc(plane * 3);
    float *got = malloc(plane * 3 * sizeof *got);
    char what[96];
    fill_image(&img, w, h, (uint32_t)(w * 31 + h));
    cdb_image_resized_size(w, h, S, &rw, &rh);
    /* torchvision's center crop: int(round((rw - S) / 2.0)), half to even */
    x0 = (int)nearbyint((rw - S) / 2.0);
    y0 = (int)nearbyint((rh - S) / 2.0);
    ref_resize(&img, rw, rh, x0, y0, S, S, want);
    CHECK(cdb_image_preprocess(&img, S, got) == CLIPDB_OK);
    for (i = 0; i < plane; i++)
        for (c = 0; c < 3; c++) {
            float v = ((float)want[3 * i + c] / 255.0f - mean_[c]) / std_[c];
            bad += got[c * plane + i] != v;
        }
    snprintf(what, sizeof what, "%dx%d -> %d: %zu values differ", w, h, S, bad);
    if (bad) test_fail_at(__FILE__, __LINE__, what);
    if ((size_t)rw * (size_t)rh <= 2000000) {
        uint8_t *full = malloc((size_t)rw * rh * 3), *mine = malloc((size_t)rw * rh * 3);
        ref_resize(&img, rw, rh, 0, 0, rw, rh, full);
        CHECK(cdb_image_resize_rgb(&img, rw, rh, mine) == CLIPDB_OK);
        if (memcmp(full, mine, (size_t)rw * rh * 3)) {
            snprintf(what, sizeof what, "%dx%d -> %dx%d full resize differs", w, h, rw, rh);
            test_fail_at(__FILE__, __LINE__, what);
        }
        free(full);
        free(mine);
    }
    free(want);
    free(got);
    cdb_rgb_free(&img);
}

TEST(image_resized_size_follows_torchvision)
{
    int w, h;
    cdb_image_resized_size(640, 480, 224, &w, &h);
    CHECK(w == 298 && h == 224);  /* int(224 * 640 / 480) = 298 */
    cdb_image_resized_size(427, 640, 224, &w, &h);
    CHECK(w == 224 && h == 335);
    cdb_image_resized_size(10000, 3, 224, &w, &h);
    CHECK(w == 746666 && h == 224);
    cdb_image_resized_size(5, 5, 224, &w, &h);
    CHECK(w == 224 && h == 224);
}

TEST(image_resize_matches_scalar_reference_across_thresholds)
{
    static const int sizes[][2] = {
        {1, 1},     {2, 2},     {1, 7},     {7, 1},     {3, 3},     {223, 223},
        {224, 224}, {225, 225}, {224, 300}, {300, 224}, {223, 224}, {225, 224},
        {224, 225}, {226, 229}, {447, 449}, {448, 448}, {640, 480}, {427, 640},
        {1000, 999}, {10000, 3}, {3, 2000},
    };
    size_t i;
    for (i = 0; i < sizeof sizes / sizeof sizes[0]; i++) check_size(sizes[i][0], sizes[i][1], 224);
    check_size(50, 37, 16);  /* another target side */
    check_size(9, 9, 32);
}

TEST(image_preprocess_rejects_bad_arguments)
{
    cdb_rgb img = {0};
    float out[3 * 4 * 4];
    CHECK(cdb_image_preprocess(&img, 4, out) == CLIPDB_EINVAL);
    fill_image(&img, 5, 5, 1);
    CHECK(cdb_image_preprocess(&img, 0, out) == CLIPDB_EINVAL);
    CHECK(cdb_image_preprocess(&img, 4, out) == CLIPDB_OK);
    cdb_rgb_free(&img);
}

/* ---- decode + preprocess into a reused scratch (what a clipdb_ctx calls) ---- */

TEST(image_load_with_reuses_scratch_and_names_path)
{
    struct cdb_img_scratch *s = NULL;
    cdb_err e;
    unsigned char *jpg = NULL;
    unsigned long len = 0;
    float *a = malloc(3 * 224 * 224 * sizeof *a), *b = malloc(3 * 224 * 224 * sizeof *b);
    char path[600];
    make_jpeg(300, 200, &jpg, &len);
    REQUIRE(jpg && a && b);
    snprintf(path, sizeof path, "%s/ctx.jpg", test_tmpdir());
    write_bytes(path, jpg, len);
    CHECK(cdb_image_load_with(&s, path, NULL, 0, 224, 0, a, &e) == CLIPDB_OK);
    CHECK(s != NULL);
    CHECK(cdb_image_load_with(&s, NULL, jpg, len, 224, 0, b, &e) == CLIPDB_OK);
    CHECK(!memcmp(a, b, 3 * 224 * 224 * sizeof *a));
    snprintf(path, sizeof path, "%s/absent.jpg", test_tmpdir());
    CHECK(cdb_image_load_with(&s, path, NULL, 0, 224, 0, a, &e) == CLIPDB_ENOTFOUND);
    CHECK(strstr(e.msg, path) == e.msg);
    CHECK(cdb_image_load_with(&s, NULL, jpg, len / 3, 224, 0, a, &e) == CLIPDB_EFORMAT);
    CHECK(strstr(e.msg, "corrupt JPEG data") != NULL);
    cdb_img_scratch_free(s);
    free(jpg);
    free(a);
    free(b);
}
