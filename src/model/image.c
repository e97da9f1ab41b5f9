/*
** image.c: image decoding and CLIP preprocessing (see image.h).
**
** Reference behaviour is Pillow 9.4 + torchvision 0.14 as CLIP uses them:
**   im = ImageOps.exif_transpose(Image.open(f)).convert("RGB")
**   Resize(S, BICUBIC) -> CenterCrop(S) -> ToTensor() -> Normalize(mean, std)
**
** Decoders (libjpeg-turbo, libpng, libwebp, stb_image for BMP, giflib) give
** what Image.convert("RGB") gives: grey replicated, palettes looked up, alpha
** dropped without compositing, 16-bit RGB(A)/LA reduced to the high byte,
** 16-bit grey clipped to 255 (PIL opens it as mode "I" and i2rgb clips), CMYK
** JPEG inverted (Adobe polarity, as PIL assumes) and converted with PIL's
** cmyk2rgb formula.
**
** Corrupt data is an error, never grey pixels: a truncated JPEG or PNG fails
** (PIL raises "image file is truncated" too). libjpeg's warnings that mean
** damaged entropy data (premature end, bad Huffman code, resync) are turned
** into errors; harmless ones (extraneous bytes before a marker, common in
** camera files that PIL opens) are ignored.
**
** The resize is Pillow's ImagingResample (libImaging/Resample.c) for 8-bit
** images: separable, horizontal pass first (only over the source rows the
** vertical pass will read), then vertical; Keys' bicubic (a = -0.5) with its
** support widened by the downscale factor (antialias); per-output normalised
** coefficients in fixed point with 22 fraction bits; each pass rounds and
** clamps to 8 bits. Every output pixel depends only on its own coefficients,
** so computing only the centre-crop window gives the same bytes as resizing
** the whole image and cropping.
*/
#include "model/image.h"

#include <limits.h>
#include <math.h>
#include <setjmp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <gif_lib.h>
#include <jpeglib.h>
#include <jerror.h>
#include <png.h>
#include <stb_image.h>
#include <webp/decode.h>
#include <webp/demux.h>


/* ---- buffers --------------------------------------------------------- */

/* Grows *p to at least n bytes (contents not kept: core.h cdb_reserve). */
static int grow(void **p, size_t *cap, size_t n)
{
    return cdb_reserve(p, cap, n, 1) ? CLIPDB_ENOMEM : CLIPDB_OK;
}

void cdb_rgb_free(cdb_rgb *img)
{
    if (!img) return;
    free(img->px);
    img->px = NULL;
    img->cap = 0;
    img->w = img->h = 0;
}

/* The pixel limit that applies to out: its max_pixels when set and lower
** than the build's CDB_IMAGE_MAX_PIXELS, else that. */
static unsigned long long pixel_limit(const cdb_rgb *out)
{
    const unsigned long long hard = CDB_IMAGE_MAX_PIXELS;
    return out->max_pixels && out->max_pixels < hard ? out->max_pixels : hard;
}

/* Checks w x h against the limits (out's, see pixel_limit) before anything
** is allocated and sizes (h, w, 3) in *bytes. */
static int check_size(const cdb_rgb *out, long long w, long long h, size_t *bytes, cdb_err *e)
{
    const unsigned long long limit = pixel_limit(out);
    size_t n;
    if (w <= 0 || h <= 0)
        return cdb_err_set(e, CLIPDB_EFORMAT, "image has an empty size (%lldx%lld)", w, h);
    if (w > CLIPDB_MAX_IMAGE_SIDE || h > CLIPDB_MAX_IMAGE_SIDE ||
        (unsigned long long)w * (unsigned long long)h > limit)
        return cdb_err_set(e, CLIPDB_ELIMIT,
                           "image is %lldx%lld; the limit is %d pixels a side and %llu pixels in all",
                           w, h, CLIPDB_MAX_IMAGE_SIDE, limit);
    if (!cdb_mul_ok((size_t)w, (size_t)h, &n) || !cdb_mul_ok(n, 3, &n))
        return cdb_err_set(e, CLIPDB_ELIMIT, "image is %lldx%lld: too large", w, h);
    *bytes = n;
    return CLIPDB_OK;
}

/* Sets out to w x h, growing its buffer. */
static int rgb_alloc(cdb_rgb *out, int w, int h, cdb_err *e)
{
    size_t n;
    int rc = check_size(out, w, h, &n, e);
    if (rc != CLIPDB_OK) return rc;
    if (grow((void **)&out->px, &out->cap, n) != CLIPDB_OK)
        return cdb_err_set(e, CLIPDB_ENOMEM, "out of memory for a %dx%d image", w, h);
    out->w = out->full_w = w;
    out->h = out->full_h = h;
    out->dct_num = 8;
    out->partial_left = out->partial_top = 0;
    return CLIPDB_OK;
}

/* ---- EXIF orientation ------------------------------------------------- */

static unsigned rd16(const uint8_t *p, int be)
{
    return be ? (unsigned)p[0] << 8 | p[1] : (unsigned)p[1] << 8 | p[0];
}
static uint32_t rd32(const uint8_t *p, int be)
{
    return be ? (uint32_t)p[0] << 24 | (uint32_t)p[1] << 16 | (uint32_t)p[2] << 8 | p[3]
              : (uint32_t)p[3] << 24 | (uint32_t)p[2] << 16 | (uint32_t)p[1] << 8 | p[0];
}

/* The Orientation (tag 0x0112) of IFD0 in an APP1 "Exif\0\0" payload, or 1
** when absent or malformed. Every read is bounded by n. */
static int exif_orientation(const uint8_t *d, size_t n)
{
    const uint8_t *t;
    size_t tn, ifd, count, i;
    int be;
    if (n < 6 || memcmp(d, "Exif\0\0", 6) != 0) return 1;
    t = d + 6;
    tn = n - 6;
    if (tn < 8) return 1;
    if (!memcmp(t, "II*\0", 4)) be = 0;
    else if (!memcmp(t, "MM\0*", 4)) be = 1;
    else return 1;
    ifd = rd32(t + 4, be);
    if (ifd > tn - 2) return 1;
    count = rd16(t + ifd, be);
    for (i = 0; i < count; i++) {
        size_t at = ifd + 2 + 12 * i;
        unsigned tag, type, v;
        if (at > tn - 12) return 1;
        tag = rd16(t + at, be);
        if (tag != 0x0112) continue;
        type = rd16(t + at + 2, be);
        if (type == 3) v = rd16(t + at + 8, be);       /* SHORT */
        else if (type == 4) v = rd32(t + at + 8, be);  /* LONG */
        else return 1;
        return v >= 1 && v <= 8 ? (int)v : 1;
    }
    return 1;
}

/* Applies orientation o (2..8) as PIL's exif_transpose: 2 FLIP_LEFT_RIGHT,
** 3 ROTATE_180, 4 FLIP_TOP_BOTTOM, 5 TRANSPOSE, 6 ROTATE_270, 7 TRANSVERSE,
** 8 ROTATE_90. Output pixel (x', y') reads source pixel
** start + x' * sx + y' * sy (pixel indices of the w x h source). */
static int apply_orientation(cdb_rgb *img, int o, cdb_err *e)
{
    long w = img->w, h = img->h, start, sx, sy, ow, oh, x, y;
    uint8_t *dst, *q;
    switch (o) {
    case 2: start = w - 1;               sx = -1; sy = w;  break;
    case 3: start = (h - 1) * w + w - 1; sx = -1; sy = -w; break;
    case 4: start = (h - 1) * w;         sx = 1;  sy = -w; break;
    case 5: start = 0;                   sx = w;  sy = 1;  break;
    case 6: start = (h - 1) * w;         sx = -w; sy = 1;  break;
    case 7: start = (h - 1) * w + w - 1; sx = -w; sy = -1; break;
    case 8: start = w - 1;               sx = w;  sy = -1; break;
    default: return CLIPDB_OK;
    }
    ow = o >= 5 ? h : w;
    oh = o >= 5 ? w : h;
    dst = malloc((size_t)w * (size_t)h * 3);
    if (!dst) return cdb_err_set(e, CLIPDB_ENOMEM, "out of memory");
    q = dst;
    for (y = 0; y < oh; y++) {
        const uint8_t *p = img->px + (start + y * sy) * 3;
        for (x = 0; x < ow; x++, p += sx * 3, q += 3) {
            q[0] = p[0];
            q[1] = p[1];
            q[2] = p[2];
        }
    }
    free(img->px);
    img->px = dst;
    img->cap = (size_t)w * (size_t)h * 3;
    img->w = (int)ow;
    img->h = (int)oh;
    if (o >= 5) {
        int t = img->full_w;
        img->full_w = img->full_h;
        img->full_h = t;
    }
    /* the source's partial last column/row now lies first along an output
    ** axis that walks the source backwards */
    img->partial_left = sx < 0;
    img->partial_top = sy < 0;
    return CLIPDB_OK;
}

/* ---- JPEG (libjpeg-turbo) ---------------------------------------------- */

struct jpeg_fail {
    struct jpeg_error_mgr pub;
    jmp_buf jump;
    char msg[JMSG_LENGTH_MAX];
};

static void jpeg_on_error(j_common_ptr ci)
{
    struct jpeg_fail *f = (struct jpeg_fail *)ci->err;
    ci->err->format_message(ci, f->msg);
    longjmp(f->jump, 1);
}

/* Warnings that mean the entropy-coded data is damaged become errors; the
** others (and all trace messages) are dropped: library code never prints. */
static void jpeg_on_message(j_common_ptr ci, int level)
{
    struct jpeg_fail *f = (struct jpeg_fail *)ci->err;
    int code = ci->err->msg_code;
    if (level >= 0) return;
    if (code == JWRN_JPEG_EOF || code == JWRN_HIT_MARKER || code == JWRN_HUFF_BAD_CODE ||
        code == JWRN_MUST_RESYNC || code == JWRN_NOT_SEQUENTIAL ||
        code == JWRN_BOGUS_PROGRESSION) {
        ci->err->format_message(ci, f->msg);
        longjmp(f->jump, 1);
    }
    ci->err->num_warnings++;
}

static void jpeg_on_output(j_common_ptr ci)
{
    (void)ci;
}

/* The smallest scale M/8 (M in 1..8) that keeps the shorter side of the
** decoded image at least CDB_IMAGE_DCT_MARGIN * target (libjpeg rounds the
** scaled size up). 8 (no scaling) when target <= 0. */
static int choose_dct_scale(unsigned w, unsigned h, int target)
{
    unsigned s = w < h ? w : h;
    int m;
    if (target <= 0) return 8;
    for (m = 1; m < 8; m++)
        if ((s * (unsigned)m + 7) / 8 >= (unsigned)target * CDB_IMAGE_DCT_MARGIN) return m;
    return 8;
}

/* State of one JPEG decode, kept outside jpeg_run's frame so that it is
** intact after a longjmp into jpeg_run. */
struct jpeg_job {
    struct jpeg_decompress_struct ci;
    struct jpeg_fail fail;
    int created;
    uint8_t *row;        /* one CMYK row, owned */
    int orientation;
};

/* PIL's cmyk2rgb after the "CMYK;I" unpack: c = 255 - raw, and
** out = clip(nk - c * nk / 255) with nk = 255 - k and PIL's rounding. */
static void cmyk_row_to_rgb(const uint8_t *in, uint8_t *out, int w)
{
    int x;
    for (x = 0; x < w; x++, in += 4, out += 3) {
        int nk = in[3], c;  /* raw k is 255 - K, so nk = 255 - K = raw */
        for (c = 0; c < 3; c++) {
            int t = (255 - in[c]) * nk + 128;
            int v = nk - (((t >> 8) + t) >> 8);
            out[c] = (uint8_t)(v < 0 ? 0 : v > 255 ? 255 : v);
        }
    }
}

static int jpeg_run(struct jpeg_job *j, const uint8_t *data, size_t len, int target,
                    cdb_rgb *out, cdb_err *e)
{
    jpeg_saved_marker_ptr mk;
    int cmyk, rc;
    if (setjmp(j->fail.jump))
        return cdb_err_set(e, CLIPDB_EFORMAT, "corrupt JPEG data: %s", j->fail.msg);
    j->ci.err = jpeg_std_error(&j->fail.pub);
    j->fail.pub.error_exit = jpeg_on_error;
    j->fail.pub.emit_message = jpeg_on_message;
    j->fail.pub.output_message = jpeg_on_output;
    jpeg_create_decompress(&j->ci);
    j->created = 1;
    jpeg_mem_src(&j->ci, data, (unsigned long)len);
    jpeg_save_markers(&j->ci, JPEG_APP0 + 1, 0xFFFF);
    jpeg_read_header(&j->ci, TRUE);

    {
        size_t unused;
        rc = check_size(out, j->ci.image_width, j->ci.image_height, &unused, e);
        if (rc != CLIPDB_OK) return rc;
    }
    /* PIL keeps the first APP1 Exif segment. */
    for (mk = j->ci.marker_list; mk; mk = mk->next) {
        if (mk->marker == JPEG_APP0 + 1 && mk->data_length >= 6 &&
            !memcmp(mk->data, "Exif\0\0", 6)) {
            j->orientation = exif_orientation(mk->data, mk->data_length);
            break;
        }
    }
    cmyk = j->ci.jpeg_color_space == JCS_CMYK || j->ci.jpeg_color_space == JCS_YCCK;
    j->ci.out_color_space = cmyk ? JCS_CMYK : JCS_RGB;
    j->ci.scale_num = (unsigned)choose_dct_scale(j->ci.image_width, j->ci.image_height, target);
    j->ci.scale_denom = 8;
    jpeg_start_decompress(&j->ci);
    rc = rgb_alloc(out, (int)j->ci.output_width, (int)j->ci.output_height, e);
    if (rc != CLIPDB_OK) return rc;
    out->full_w = (int)j->ci.image_width;
    out->full_h = (int)j->ci.image_height;
    out->dct_num = (int)j->ci.scale_num;
    if (cmyk) {
        j->row = malloc((size_t)out->w * 4);
        if (!j->row) return cdb_err_set(e, CLIPDB_ENOMEM, "out of memory");
    }
    while (j->ci.output_scanline < j->ci.output_height) {
        uint8_t *dst = out->px + (size_t)j->ci.output_scanline * (size_t)out->w * 3;
        JSAMPROW rows[1];
        rows[0] = cmyk ? j->row : dst;
        if (jpeg_read_scanlines(&j->ci, rows, 1) != 1)
            return cdb_err_set(e, CLIPDB_EFORMAT, "corrupt JPEG data: no scanline decoded");
        if (cmyk) cmyk_row_to_rgb(j->row, dst, out->w);
    }
    jpeg_finish_decompress(&j->ci);
    return CLIPDB_OK;
}

static int decode_jpeg(const uint8_t *data, size_t len, int target, cdb_rgb *out, cdb_err *e)
{
    struct jpeg_job *j = calloc(1, sizeof *j);
    int rc;
    if (!j) return cdb_err_set(e, CLIPDB_ENOMEM, "out of memory");
    j->orientation = 1;
    rc = jpeg_run(j, data, len, target, out, e);
    if (j->created) jpeg_destroy_decompress(&j->ci);
    if (rc == CLIPDB_OK && j->orientation != 1) rc = apply_orientation(out, j->orientation, e);
    free(j->row);
    free(j);
    return rc;
}

/* ---- PNG (libpng) ------------------------------------------------------ */

struct png_job {
    png_structp png;
    png_infop info;
    const uint8_t *data;
    size_t len, pos;
    uint8_t *buf;        /* decoded rows before conversion, owned */
    char msg[200];
};

static void png_on_error(png_structp png, png_const_charp msg)
{
    struct png_job *j = png_get_error_ptr(png);
    snprintf(j->msg, sizeof j->msg, "%s", msg);
    png_longjmp(png, 1);
}

static void png_on_warning(png_structp png, png_const_charp msg)
{
    (void)png;
    (void)msg;
}

static void png_on_read(png_structp png, png_bytep dst, size_t n)
{
    struct png_job *j = png_get_io_ptr(png);
    if (n > j->len - j->pos) png_error(png, "premature end of file");
    memcpy(dst, j->data + j->pos, n);
    j->pos += n;
}

/* Converts one decoded row of `ch` channels (16-bit grey when wide) to RGB. */
static void png_row_to_rgb(const uint8_t *in, uint8_t *out, int w, int ch, int wide)
{
    int x;
    if (wide) {  /* PIL mode "I", then i2rgb clips to 0..255 */
        for (x = 0; x < w; x++, in += 2, out += 3) {
            unsigned v = (unsigned)in[0] << 8 | in[1];
            out[0] = out[1] = out[2] = (uint8_t)(v > 255 ? 255 : v);
        }
        return;
    }
    switch (ch) {
    case 1:
    case 2:
        for (x = 0; x < w; x++, in += ch, out += 3) out[0] = out[1] = out[2] = in[0];
        break;
    case 3:
        memcpy(out, in, (size_t)w * 3);
        break;
    default:
        for (x = 0; x < w; x++, in += 4, out += 3) {
            out[0] = in[0];
            out[1] = in[1];
            out[2] = in[2];
        }
    }
}

static int png_run(struct png_job *j, cdb_rgb *out, cdb_err *e)
{
    png_uint_32 w, h;
    int depth, ctype, interlace, ch, wide, passes, rc;
    size_t rowbytes, y;
    if (setjmp(png_jmpbuf(j->png)))
        return cdb_err_set(e, CLIPDB_EFORMAT, "corrupt PNG data: %s", j->msg);
    png_set_read_fn(j->png, j, png_on_read);
    png_read_info(j->png, j->info);
    png_get_IHDR(j->png, j->info, &w, &h, &depth, &ctype, &interlace, NULL, NULL);
    rc = rgb_alloc(out, (int)w, (int)h, e);
    if (rc != CLIPDB_OK) return rc;
    wide = depth == 16 && ctype == PNG_COLOR_TYPE_GRAY;
    if (ctype == PNG_COLOR_TYPE_PALETTE) png_set_palette_to_rgb(j->png);
    if (ctype == PNG_COLOR_TYPE_GRAY && depth < 8) png_set_expand_gray_1_2_4_to_8(j->png);
    if (depth == 16 && !wide) png_set_strip_16(j->png);  /* keeps the high byte, as PIL */
    passes = png_set_interlace_handling(j->png);
    png_read_update_info(j->png, j->info);
    ch = png_get_channels(j->png, j->info);
    rowbytes = png_get_rowbytes(j->png, j->info);
    if (ch < 1 || ch > 4 || rowbytes != (size_t)w * (size_t)ch * (wide ? 2 : 1))
        return cdb_err_set(e, CLIPDB_EFORMAT, "unsupported PNG layout");
    if (passes == 1 && ch == 3 && !wide) {
        for (y = 0; y < h; y++) png_read_row(j->png, out->px + y * (size_t)w * 3, NULL);
    } else if (passes == 1) {
        j->buf = malloc(rowbytes);
        if (!j->buf) return cdb_err_set(e, CLIPDB_ENOMEM, "out of memory");
        for (y = 0; y < h; y++) {
            png_read_row(j->png, j->buf, NULL);
            png_row_to_rgb(j->buf, out->px + y * (size_t)w * 3, (int)w, ch, wide);
        }
    } else {
        size_t total;
        png_bytep *rows;
        if (!cdb_mul_ok(rowbytes, h, &total) ||
            !cdb_add_ok(total, (size_t)h * sizeof(png_bytep), &total) ||
            !(j->buf = malloc(total)))
            return cdb_err_set(e, CLIPDB_ENOMEM, "out of memory");
        rows = (png_bytep *)(void *)(j->buf + rowbytes * h);
        for (y = 0; y < h; y++) rows[y] = j->buf + y * rowbytes;
        png_read_image(j->png, rows);
        for (y = 0; y < h; y++)
            png_row_to_rgb(rows[y], out->px + y * (size_t)w * 3, (int)w, ch, wide);
    }
    return CLIPDB_OK;
}

static int decode_png(const uint8_t *data, size_t len, cdb_rgb *out, cdb_err *e)
{
    struct png_job *j;
    int rc;
    size_t unused;
    /* The IHDR is the first chunk: check the size before libpng allocates. */
    if (len >= 24 && !memcmp(data + 12, "IHDR", 4)) {
        rc = check_size(out, rd32(data + 16, 1), rd32(data + 20, 1), &unused, e);
        if (rc != CLIPDB_OK) return rc;
    }
    j = calloc(1, sizeof *j);
    if (!j) return cdb_err_set(e, CLIPDB_ENOMEM, "out of memory");
    j->data = data;
    j->len = len;
    j->png = png_create_read_struct(PNG_LIBPNG_VER_STRING, j, png_on_error, png_on_warning);
    if (j->png) j->info = png_create_info_struct(j->png);
    if (!j->png || !j->info) rc = cdb_err_set(e, CLIPDB_ENOMEM, "out of memory");
    else rc = png_run(j, out, e);
    png_destroy_read_struct(j->png ? &j->png : NULL, j->info ? &j->info : NULL, NULL);
    free(j->buf);
    free(j);
    return rc;
}

/* ---- WebP (libwebp; the first frame of an animation) -------------------- */

static int decode_webp(const uint8_t *data, size_t len, cdb_rgb *out, cdb_err *e)
{
    WebPBitstreamFeatures f;
    WebPAnimDecoderOptions opt;
    WebPAnimDecoder *dec = NULL;
    WebPData wd;
    uint8_t *frame;
    int rc, ts;
    size_t i, n;
    if (WebPGetFeatures(data, len, &f) != VP8_STATUS_OK)
        return cdb_err_set(e, CLIPDB_EFORMAT, "corrupt WebP data: bad header");
    rc = rgb_alloc(out, f.width, f.height, e);
    if (rc != CLIPDB_OK) return rc;
    if (!f.has_animation) {
        if (!WebPDecodeRGBInto(data, len, out->px, (size_t)f.width * (size_t)f.height * 3,
                               f.width * 3))
            return cdb_err_set(e, CLIPDB_EFORMAT, "corrupt WebP data: decoding failed");
        return CLIPDB_OK;
    }
    if (!WebPAnimDecoderOptionsInit(&opt))
        return cdb_err_set(e, CLIPDB_ERROR, "libwebp version mismatch");
    opt.color_mode = MODE_RGBA;
    opt.use_threads = 0;
    wd.bytes = data;
    wd.size = len;
    dec = WebPAnimDecoderNew(&wd, &opt);
    if (!dec) return cdb_err_set(e, CLIPDB_EFORMAT, "corrupt WebP data: bad animation");
    if (!WebPAnimDecoderGetNext(dec, &frame, &ts)) {
        rc = cdb_err_set(e, CLIPDB_EFORMAT, "corrupt WebP data: first frame does not decode");
    } else {
        n = (size_t)f.width * (size_t)f.height;
        for (i = 0; i < n; i++) memcpy(out->px + 3 * i, frame + 4 * i, 3);
    }
    WebPAnimDecoderDelete(dec);
    return rc;
}

/* ---- BMP (stb_image) ---------------------------------------------------- */

/* stb_image reads past the end of a BMP as zero bytes, so a 70-byte file
** that declares 13000 x 13000 pixels would decode (as black) at the cost of
** the whole size. Like PIL, an uncompressed BMP whose rows do not all lie in
** the file is an error instead (the last row's padding may be missing). RLE
** BMPs are left to stb_image, which refuses them. */
static int bmp_check_length(const uint8_t *data, size_t len, int w, int h, cdb_err *e)
{
    uint32_t off, hsz, bpp, comp = 0;
    unsigned long long stride, need;
    if (len < 30) return cdb_err_set(e, CLIPDB_EFORMAT, "corrupt BMP data: header cut short");
    off = rd32(data + 10, 0);
    hsz = rd32(data + 14, 0);
    bpp = rd16(data + (hsz == 12 ? 24 : 28), 0);
    if (hsz != 12) {
        if (len < 34) return cdb_err_set(e, CLIPDB_EFORMAT, "corrupt BMP data: header cut short");
        comp = rd32(data + 30, 0);
    }
    if ((comp != 0 && comp != 3) || bpp == 0 || bpp > 32) return CLIPDB_OK;
    stride = ((unsigned long long)w * bpp + 31) / 32 * 4;
    need = (unsigned long long)off + stride * (unsigned)(h - 1) + ((unsigned long long)w * bpp + 7) / 8;
    if (need > len)
        return cdb_err_set(e, CLIPDB_EFORMAT,
                           "truncated BMP data: %dx%d pixels at %u bits need %llu bytes, the file "
                           "has %zu",
                           w, h, (unsigned)bpp, need, len);
    return CLIPDB_OK;
}

static int decode_bmp(const uint8_t *data, size_t len, cdb_rgb *out, cdb_err *e)
{
    int w, h, comp, rc;
    size_t unused;
    stbi_uc *px;
    if (len > INT_MAX) return cdb_err_set(e, CLIPDB_ELIMIT, "BMP file too large");
    if (!stbi_info_from_memory(data, (int)len, &w, &h, &comp))
        return cdb_err_set(e, CLIPDB_EFORMAT, "corrupt BMP data: %s", stbi_failure_reason());
    rc = check_size(out, w, h, &unused, e);
    if (rc != CLIPDB_OK) return rc;
    rc = bmp_check_length(data, len, w, h, e);
    if (rc != CLIPDB_OK) return rc;
    px = stbi_load_from_memory(data, (int)len, &w, &h, &comp, 3);
    if (!px) return cdb_err_set(e, CLIPDB_EFORMAT, "corrupt BMP data: %s", stbi_failure_reason());
    rc = rgb_alloc(out, w, h, e);
    if (rc == CLIPDB_OK) memcpy(out->px, px, (size_t)w * (size_t)h * 3);
    stbi_image_free(px);
    return rc;
}

/* ---- GIF first frame (giflib) ------------------------------------------- */

struct gif_src {
    const uint8_t *data;
    size_t len, pos;
};

static int gif_on_read(GifFileType *g, GifByteType *dst, int n)
{
    struct gif_src *s = g->UserData;
    size_t k = n < 0 ? 0 : (size_t)n;
    if (k > s->len - s->pos) k = s->len - s->pos;
    memcpy(dst, s->data + s->pos, k);
    s->pos += k;
    return (int)k;
}

/* Reads the first image of the GIF as PIL 9.4 shows frame 0: a canvas of
** the logical screen (grown to hold the frame) filled with the transparent
** index (else 0), the frame's indices pasted, then the frame's palette (else
** the global one; else grey levels) looked up; indices past the palette are
** black. */
static int gif_run(GifFileType *g, cdb_rgb *out, uint8_t **canvas, cdb_err *e)
{
    GifRecordType rec;
    int transparent = -1, rc;
    for (;;) {
        if (DGifGetRecordType(g, &rec) == GIF_ERROR)
            return cdb_err_set(e, CLIPDB_EFORMAT, "corrupt GIF data: %s", GifErrorString(g->Error));
        if (rec == TERMINATE_RECORD_TYPE)
            return cdb_err_set(e, CLIPDB_EFORMAT, "GIF has no image frame");
        if (rec == EXTENSION_RECORD_TYPE) {
            int code;
            GifByteType *ext;
            if (DGifGetExtension(g, &code, &ext) == GIF_ERROR)
                return cdb_err_set(e, CLIPDB_EFORMAT, "corrupt GIF data: %s",
                                   GifErrorString(g->Error));
            if (code == GRAPHICS_EXT_FUNC_CODE && ext && ext[0] >= 4)
                transparent = (ext[1] & 1) ? ext[4] : -1;
            while (ext) {
                if (DGifGetExtensionNext(g, &ext) == GIF_ERROR)
                    return cdb_err_set(e, CLIPDB_EFORMAT, "corrupt GIF data: %s",
                                       GifErrorString(g->Error));
            }
            continue;
        }
        if (rec == IMAGE_DESC_RECORD_TYPE) break;
    }
    if (DGifGetImageDesc(g) == GIF_ERROR)
        return cdb_err_set(e, CLIPDB_EFORMAT, "corrupt GIF data: %s", GifErrorString(g->Error));
    {
        const GifImageDesc *d = &g->Image;
        const ColorMapObject *cm = d->ColorMap ? d->ColorMap : g->SColorMap;
        long W = g->SWidth, H = g->SHeight, y, i, n;
        int pass;
        static const int start[4] = {0, 4, 2, 1}, step[4] = {8, 8, 4, 2};
        size_t unused;
        if (d->Left < 0 || d->Top < 0 || d->Width <= 0 || d->Height <= 0)
            return cdb_err_set(e, CLIPDB_EFORMAT, "corrupt GIF data: bad frame extent");
        if ((long)d->Left + d->Width > W) W = (long)d->Left + d->Width;
        if ((long)d->Top + d->Height > H) H = (long)d->Top + d->Height;
        rc = check_size(out, W, H, &unused, e);
        if (rc != CLIPDB_OK) return rc;
        n = W * H;
        *canvas = malloc((size_t)n);
        if (!*canvas) return cdb_err_set(e, CLIPDB_ENOMEM, "out of memory");
        memset(*canvas, transparent >= 0 ? transparent : 0, (size_t)n);
        for (pass = d->Interlace ? 0 : 3; pass < 4; pass++) {
            long y0 = d->Interlace ? start[pass] : 0, dy = d->Interlace ? step[pass] : 1;
            for (y = y0; y < d->Height; y += dy) {
                GifPixelType *row = *canvas + (d->Top + y) * W + d->Left;
                if (DGifGetLine(g, row, d->Width) == GIF_ERROR)
                    return cdb_err_set(e, CLIPDB_EFORMAT, "corrupt GIF data: %s",
                                       GifErrorString(g->Error));
            }
        }
        rc = rgb_alloc(out, (int)W, (int)H, e);
        if (rc != CLIPDB_OK) return rc;
        for (i = 0; i < n; i++) {
            int v = (*canvas)[i];
            uint8_t *p = out->px + 3 * i;
            if (!cm) {
                p[0] = p[1] = p[2] = (uint8_t)v;
            } else if (v < cm->ColorCount) {
                p[0] = cm->Colors[v].Red;
                p[1] = cm->Colors[v].Green;
                p[2] = cm->Colors[v].Blue;
            } else {
                p[0] = p[1] = p[2] = 0;
            }
        }
    }
    return CLIPDB_OK;
}

static int decode_gif(const uint8_t *data, size_t len, cdb_rgb *out, cdb_err *e)
{
    struct gif_src src = {data, len, 0};
    uint8_t *canvas = NULL;
    int err = 0, rc;
    GifFileType *g = DGifOpen(&src, gif_on_read, &err);
    if (!g) return cdb_err_set(e, CLIPDB_EFORMAT, "corrupt GIF data: %s", GifErrorString(err));
    rc = gif_run(g, out, &canvas, e);
    DGifCloseFile(g, &err);
    free(canvas);
    return rc;
}

/* ---- dispatch ------------------------------------------------------------ */

int cdb_image_decode_memory(const uint8_t *data, size_t len, int target, cdb_rgb *out,
                            cdb_err *e)
{
    if (!data || len == 0) return cdb_err_set(e, CLIPDB_EFORMAT, "empty image data");
    if (len >= 3 && data[0] == 0xFF && data[1] == 0xD8 && data[2] == 0xFF)
        return decode_jpeg(data, len, target, out, e);
    if (len >= 8 && !memcmp(data, "\x89PNG\r\n\x1a\n", 8)) return decode_png(data, len, out, e);
    if (len >= 12 && !memcmp(data, "RIFF", 4) && !memcmp(data + 8, "WEBP", 4))
        return decode_webp(data, len, out, e);
    if (len >= 2 && data[0] == 'B' && data[1] == 'M') return decode_bmp(data, len, out, e);
    if (len >= 6 && (!memcmp(data, "GIF87a", 6) || !memcmp(data, "GIF89a", 6)))
        return decode_gif(data, len, out, e);
    return cdb_err_set(e, CLIPDB_EFORMAT, "not a recognised image (JPEG, PNG, WebP, BMP, GIF)");
}

int cdb_image_decode_file(const char *path, int target, cdb_rgb *out, cdb_err *e)
{
    char *data = NULL;
    size_t len = 0;
    int rc = cdb_read_file(path, CDB_IMAGE_MAX_FILE_BYTES, &data, &len, e);
    if (rc != CLIPDB_OK) return rc;  /* the message names the path */
    rc = cdb_image_decode_memory((const uint8_t *)data, len, target, out, e);
    if (rc != CLIPDB_OK) cdb_err_prefix(e, "%s", path);
    free(data);
    return rc;
}

/* ---- resize (Pillow's ImagingResample, 8-bit) ----------------------------- */

#define RS_BITS 22  /* Pillow's PRECISION_BITS: 32 - 8 - 2 */

/* Keys' cubic convolution kernel with a = -0.5. */
static double bicubic(double x)
{
    const double a = -0.5;
    if (x < 0.0) x = -x;
    if (x < 1.0) return ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0;
    if (x < 2.0) return (((x - 5.0) * x + 8.0) * x - 4.0) * a;
    return 0.0;
}

/* Filter taps of one axis, for the outputs first .. first+n-1 of a resize
** from in_size to out_size: output i reads in[lo[i] .. lo[i]+cnt[i]) with
** fixed-point weights k[i * ksize + j]. */
typedef struct rs_axis {
    int n, ksize;
    int *lo, *cnt;       /* (n) each */
    int32_t *k;          /* (n, ksize) */
    size_t cap_lo, cap_cnt, cap_k, cap_w;
    double *w;           /* (ksize) scratch */
} rs_axis;

struct cdb_img_scratch {
    cdb_rgb rgb;         /* decoded image (clipdb_image_load) */
    rs_axis ax, ay;
    uint8_t *tmp;        /* horizontal pass output (rows, n_x, 3) */
    size_t cap_tmp;
    int32_t *acc;        /* vertical accumulator (n_x * 3) */
    size_t cap_acc;
    uint8_t *crop;       /* (S, S, 3) */
    size_t cap_crop;
    cdb_rgb box;         /* the crop box of cdb_image_preprocess_box */
};

static void axis_free(rs_axis *a)
{
    free(a->lo);
    free(a->cnt);
    free(a->k);
    free(a->w);
}

void cdb_img_scratch_free(struct cdb_img_scratch *s)
{
    if (!s) return;
    cdb_rgb_free(&s->rgb);
    cdb_rgb_free(&s->box);
    axis_free(&s->ax);
    axis_free(&s->ay);
    free(s->tmp);
    free(s->acc);
    free(s->crop);
    free(s);
}

/* Pillow's precompute_coeffs + normalize_coeffs_8bpc, for the window of
** outputs [first, first + n) of a resize of the source span [0, extent) to
** out_size; source pixels past in_size are not read. extent is in_size
** except for a DCT-scaled JPEG (see cdb_rgb), like Pillow's `box`. */
static int axis_build(rs_axis *a, int in_size, double origin, double extent, int out_size,
                      int first, int n)
{
    double scale = extent / out_size;
    double fscale = scale < 1.0 ? 1.0 : scale;
    double support = 2.0 * fscale;  /* bicubic support 2, widened when shrinking */
    double ss = 1.0 / fscale;
    int ksize = (int)ceil(support) * 2 + 1, i, j;
    size_t nk;
    if (!cdb_mul_ok((size_t)n, (size_t)ksize, &nk) || nk > (size_t)INT_MAX ||
        grow((void **)&a->lo, &a->cap_lo, (size_t)n * sizeof(int)) ||
        grow((void **)&a->cnt, &a->cap_cnt, (size_t)n * sizeof(int)) ||
        grow((void **)&a->k, &a->cap_k, nk * sizeof(int32_t)) ||
        grow((void **)&a->w, &a->cap_w, (size_t)ksize * sizeof(double)))
        return CLIPDB_ENOMEM;
    a->n = n;
    a->ksize = ksize;
    for (i = 0; i < n; i++) {
        double center = origin + (first + i + 0.5) * scale, sum = 0.0;
        int lo = (int)(center - support + 0.5), hi = (int)(center + support + 0.5);
        int32_t *k = a->k + (size_t)i * ksize;
        if (lo < 0) lo = 0;
        if (hi > in_size) hi = in_size;
        for (j = 0; j < hi - lo; j++) {
            a->w[j] = bicubic((j + lo - center + 0.5) * ss);
            sum += a->w[j];
        }
        for (j = 0; j < hi - lo; j++) {
            double v = sum != 0.0 ? a->w[j] / sum : a->w[j];
            v *= (double)(1 << RS_BITS);
            k[j] = (int32_t)(v < 0 ? v - 0.5 : v + 0.5);
        }
        for (; j < ksize; j++) k[j] = 0;
        a->lo[i] = lo;
        a->cnt[i] = hi - lo;
    }
    return CLIPDB_OK;
}

static inline uint8_t clip8(int32_t v)
{
    v >>= RS_BITS;
    return (uint8_t)(v < 0 ? 0 : v > 255 ? 255 : v);
}

/* The full-size geometry of img: size (fw, fh), covering the decoded
** pixels [ox, ox + ew) x [oy, oy + eh) (Pillow's resize box). */
typedef struct rs_geom {
    int fw, fh;
    double ox, oy, ew, eh;
} rs_geom;

static rs_geom geometry(const cdb_rgb *img)
{
    rs_geom g = {img->w, img->h, 0.0, 0.0, img->w, img->h};
    if (img->full_w > 0 && img->full_h > 0 && img->dct_num > 0 && img->dct_num < 8) {
        g.fw = img->full_w;
        g.fh = img->full_h;
        g.ew = (double)img->full_w * img->dct_num / 8.0;
        g.eh = (double)img->full_h * img->dct_num / 8.0;
        g.ox = img->partial_left ? img->w - g.ew : 0.0;
        g.oy = img->partial_top ? img->h - g.eh : 0.0;
    }
    return g;
}

/* Resizes img to (rw, rh) as Pillow does and writes the window
** (x0, y0, cw, ch) of the result to out (ch, cw, 3). */
static int resample(struct cdb_img_scratch *s, const cdb_rgb *img, int rw, int rh, int x0,
                    int y0, int cw, int ch, uint8_t *out)
{
    const rs_geom g = geometry(img);
    const int need_h = rw != img->w || g.ew != img->w, need_v = rh != img->h || g.eh != img->h;
    const size_t in_stride = (size_t)img->w * 3, row = (size_t)cw * 3;
    const uint8_t *src;   /* rows the vertical pass reads, from row `base` */
    size_t src_stride;
    int base, rows, i, j;
    size_t x;

    if (need_v) {
        if (axis_build(&s->ay, img->h, g.oy, g.eh, rh, y0, ch)) return CLIPDB_ENOMEM;
        base = s->ay.lo[0];
        rows = s->ay.lo[ch - 1] + s->ay.cnt[ch - 1] - base;
    } else {
        base = y0;
        rows = ch;
    }
    if (need_h) {
        /* horizontal pass: img rows [base, base+rows) (w) -> tmp (rows, cw) */
        size_t nt;
        if (axis_build(&s->ax, img->w, g.ox, g.ew, rw, x0, cw)) return CLIPDB_ENOMEM;
        if (!cdb_mul_ok((size_t)rows, row, &nt) || grow((void **)&s->tmp, &s->cap_tmp, nt))
            return CLIPDB_ENOMEM;
        for (j = 0; j < rows; j++) {
            const uint8_t *in = img->px + (size_t)(base + j) * in_stride;
            uint8_t *o = s->tmp + (size_t)j * row;
            for (i = 0; i < cw; i++, o += 3) {
                const int32_t *k = s->ax.k + (size_t)i * s->ax.ksize;
                const uint8_t *p = in + (size_t)s->ax.lo[i] * 3;
                int32_t a0 = 1 << (RS_BITS - 1), a1 = a0, a2 = a0;
                int t, n = s->ax.cnt[i];
                for (t = 0; t < n; t++, p += 3) {
                    a0 += p[0] * k[t];
                    a1 += p[1] * k[t];
                    a2 += p[2] * k[t];
                }
                o[0] = clip8(a0);
                o[1] = clip8(a1);
                o[2] = clip8(a2);
            }
        }
        src = s->tmp;
        src_stride = row;
    } else {
        src = img->px + (size_t)base * in_stride + (size_t)x0 * 3;
        src_stride = in_stride;
    }
    if (!need_v) {
        for (j = 0; j < ch; j++) memcpy(out + (size_t)j * row, src + (size_t)j * src_stride, row);
        return CLIPDB_OK;
    }
    /* vertical pass: src (rows, cw) -> out (ch, cw), one accumulator row */
    if (grow((void **)&s->acc, &s->cap_acc, row * sizeof(int32_t))) return CLIPDB_ENOMEM;
    for (j = 0; j < ch; j++) {
        const int32_t *k = s->ay.k + (size_t)j * s->ay.ksize;
        const uint8_t *r0 = src + (size_t)(s->ay.lo[j] - base) * src_stride;
        int32_t *acc = s->acc;
        uint8_t *o = out + (size_t)j * row;
        int t, n = s->ay.cnt[j];
        for (x = 0; x < row; x++) acc[x] = 1 << (RS_BITS - 1);
        for (t = 0; t < n; t++) {
            const uint8_t *r = r0 + (size_t)t * src_stride;
            const int32_t kt = k[t];
            for (x = 0; x < row; x++) acc[x] += r[x] * kt;
        }
        for (x = 0; x < row; x++) o[x] = clip8(acc[x]);
    }
    return CLIPDB_OK;
}

void cdb_image_resized_size(int w, int h, int size, int *out_w, int *out_h)
{
    int s = w < h ? w : h, l = w < h ? h : w;
    int nl = (int)((double)size * (double)l / (double)s);
    *out_w = w <= h ? size : nl;
    *out_h = w <= h ? nl : size;
}

/* Python's int(round(d / 2.0)) for d >= 0: halves round to even. */
static int half_round_even(int d)
{
    int k = d / 2;
    return (d % 2 == 0 || k % 2 == 0) ? k : k + 1;
}

static int scratch_get(struct cdb_img_scratch **s)
{
    if (!*s) *s = calloc(1, sizeof **s);
    return *s ? CLIPDB_OK : CLIPDB_ENOMEM;
}

int cdb_image_resize_rgb(const cdb_rgb *img, int out_w, int out_h, uint8_t *out)
{
    struct cdb_img_scratch *s = NULL;
    int rc;
    if (!img || !img->px || img->w < 1 || img->h < 1 || out_w < 1 || out_h < 1)
        return CLIPDB_EINVAL;
    rc = scratch_get(&s);
    if (rc == CLIPDB_OK) rc = resample(s, img, out_w, out_h, 0, 0, out_w, out_h, out);
    cdb_img_scratch_free(s);
    return rc;
}

/* CLIP's normalisation constants, as float32 tensors hold them. */
static const float clip_mean[3] = {0.48145466f, 0.4578275f, 0.40821073f};
static const float clip_std[3] = {0.26862954f, 0.26130258f, 0.27577711f};

/* ToTensor then Normalize, in float32 as torch computes them:
** ((float)v / 255 - mean) / std; flip mirrors the columns (hflip). */
static void normalize_crop(const uint8_t *crop, int size, int flip, float *out)
{
    float lut[3][256];
    size_t plane = (size_t)size * (size_t)size, i, r, col;
    int c, v;
    for (c = 0; c < 3; c++)
        for (v = 0; v < 256; v++) lut[c][v] = ((float)v / 255.0f - clip_mean[c]) / clip_std[c];
    // crop (S, S, 3) HWC bytes -> out (3, S, S) CHW floats
    for (i = 0; i < plane; i++) {
        r = i / (size_t)size;
        col = i % (size_t)size;
        if (flip) col = (size_t)size - 1 - col;
        out[r * (size_t)size + col] = lut[0][crop[3 * i]];
        out[plane + r * (size_t)size + col] = lut[1][crop[3 * i + 1]];
        out[2 * plane + r * (size_t)size + col] = lut[2][crop[3 * i + 2]];
    }
}

int cdb_image_preprocess_with(struct cdb_img_scratch **scratch, const cdb_rgb *img, int size,
                              float *out)
{
    struct cdb_img_scratch *s;
    int rw, rh, rc;
    rs_geom g;
    size_t plane;
    if (!img || !img->px || img->w < 1 || img->h < 1 || size < 1 ||
        size > CLIPDB_MAX_IMAGE_SIDE)
        return CLIPDB_EINVAL;
    rc = scratch_get(scratch);
    if (rc != CLIPDB_OK) return rc;
    s = *scratch;
    g = geometry(img);
    cdb_image_resized_size(g.fw, g.fh, size, &rw, &rh);
    plane = (size_t)size * (size_t)size;
    if (grow((void **)&s->crop, &s->cap_crop, plane * 3)) return CLIPDB_ENOMEM;
    rc = resample(s, img, rw, rh, half_round_even(rw - size), half_round_even(rh - size), size,
                  size, s->crop);
    if (rc != CLIPDB_OK) return rc;
    normalize_crop(s->crop, size, 0, out);
    return CLIPDB_OK;
}

int cdb_image_preprocess_box(struct cdb_img_scratch **scratch, const cdb_rgb *img, int x, int y,
                             int w, int h, int flip, int size, float *out)
{
    struct cdb_img_scratch *s;
    cdb_err e;
    int rc, j;
    if (!img || !img->px || img->w < 1 || img->h < 1 || size < 1 ||
        size > CLIPDB_MAX_IMAGE_SIDE || w < 1 || h < 1 || x < 0 || y < 0 || x > img->w - w ||
        y > img->h - h || (img->dct_num > 0 && img->dct_num < 8))
        return CLIPDB_EINVAL;
    rc = scratch_get(scratch);
    if (rc != CLIPDB_OK) return rc;
    s = *scratch;
    if (grow((void **)&s->crop, &s->cap_crop, (size_t)size * size * 3)) return CLIPDB_ENOMEM;
    /* crop, then resize the cropped image (torchvision's resized_crop on a
    ** PIL image: the filter never reads outside the box) */
    if (rgb_alloc(&s->box, w, h, &e) != CLIPDB_OK) return CLIPDB_ENOMEM;
    for (j = 0; j < h; j++)
        memcpy(s->box.px + (size_t)j * w * 3, img->px + ((size_t)(y + j) * img->w + x) * 3,
               (size_t)w * 3);
    rc = resample(s, &s->box, size, size, 0, 0, size, size, s->crop);
    if (rc != CLIPDB_OK) return rc;
    normalize_crop(s->crop, size, flip, out);
    return CLIPDB_OK;
}

int cdb_image_preprocess(const cdb_rgb *img, int size, float *out)
{
    struct cdb_img_scratch *s = NULL;
    int rc = cdb_image_preprocess_with(&s, img, size, out);
    cdb_img_scratch_free(s);
    return rc;
}

int cdb_image_load_with(struct cdb_img_scratch **scratch, const char *path, const void *data,
                        size_t len, int size, unsigned long long max_pixels, float *pixels,
                        cdb_err *e)
{
    int rc;
    if (scratch_get(scratch)) return cdb_err_set(e, CLIPDB_ENOMEM, "out of memory");
    (*scratch)->rgb.max_pixels = max_pixels;
    if (path) rc = cdb_image_decode_file(path, size, &(*scratch)->rgb, e);
    else rc = cdb_image_decode_memory(data, len, size, &(*scratch)->rgb, e);
    if (rc != CLIPDB_OK) return rc;
    rc = cdb_image_preprocess_with(scratch, &(*scratch)->rgb, size, pixels);
    if (rc != CLIPDB_OK)
        return cdb_err_set(e, rc, "%s: preprocessing failed (%s)", path ? path : "image",
                           clipdb_status_name(rc));
    return CLIPDB_OK;
}
