/*
** image.h: image decoding (JPEG, PNG, WebP, BMP, GIF first frame) to 8-bit
** RGB as PIL's Image.convert("RGB") gives it, and CLIP's preprocessing
** (torchvision Resize(S, BICUBIC) on a PIL image, CenterCrop(S), ToTensor,
** Normalize) with Pillow's resampling reproduced exactly.
**
** Internal. These functions need no model and keep no hidden state, so the
** store's ingest threads may call them concurrently (each with its own
** cdb_rgb / scratch).
*/
#ifndef CDB_IMAGE_H
#define CDB_IMAGE_H

#include <stddef.h>
#include <stdint.h>

#include "core/core.h"

/* Largest image file read by cdb_image_decode_file. */
#define CDB_IMAGE_MAX_FILE_BYTES CLIPDB_MAX_IMAGE_FILE_BYTES

/* The largest image decoded, in pixels (w * h); larger ones are refused
** before anything is allocated. The public CLIPDB_MAX_IMAGE_PIXELS (PIL's
** default) unless a build sets it lower: the fuzz build does (Makefile,
** FUZZ_DEFS), so that a small input declaring a huge valid image (a GIF's
** logical screen, a lossless WebP of one colour) is decoded within
** libFuzzer's time limit under ASan; the code path is the same. */
#ifndef CDB_IMAGE_MAX_PIXELS
#define CDB_IMAGE_MAX_PIXELS CLIPDB_MAX_IMAGE_PIXELS
#endif

/* A JPEG is decoded at a reduced DCT scale (M/8) only while its shorter side
** stays at least CDB_IMAGE_DCT_MARGIN times the target side; see
** choose_dct_scale in image.c and tests/ref/test_image_pil.py for the parity
** this keeps. */
#ifndef CDB_IMAGE_DCT_MARGIN
#define CDB_IMAGE_DCT_MARGIN 3
#endif

/* An 8-bit RGB image, rows top to bottom, 3 bytes per pixel, no padding.
** px (cap bytes) is owned by the struct: free with cdb_rgb_free. A decoder
** reuses px when cap is large enough, so one cdb_rgb can serve many images.
** Initialise with {0}. */
typedef struct cdb_rgb {
    int w, h;
    uint8_t *px;  /* (h, w, 3) */
    size_t cap;   /* bytes allocated at px */
    /* Set by a JPEG decoded at a reduced DCT scale: the full-size image is
    ** full_w x full_h and was decoded at dct_num/8 of it, so the decoded
    ** pixels cover full_w * dct_num / 8 columns (the last one partly). The
    ** preprocessing keeps the full-size geometry. 0 (or dct_num 8): w, h.
    ** The partial column/row is the last one unless an EXIF transpose moved
    ** it to the first (partial_left, partial_top). */
    int full_w, full_h, dct_num;
    int partial_left, partial_top;
    /* Set by the caller, kept by the decoders: images of more than this many
    ** pixels (w * h as declared, whatever the format) are refused with
    ** CLIPDB_ELIMIT before anything is allocated. 0, or a value above
    ** CDB_IMAGE_MAX_PIXELS: CDB_IMAGE_MAX_PIXELS. */
    unsigned long long max_pixels;
} cdb_rgb;

void cdb_rgb_free(cdb_rgb *img);

/* Decodes an image in memory, detecting the format by its magic bytes, into
** *out (see cdb_rgb). JPEG EXIF orientation is applied. target > 0 lets a
** large JPEG be decoded at a reduced DCT scale for a later resize to a
** shorter side of `target`; 0 always decodes at full size. Errors (format,
** corrupt data, limits) are written to e without any file name. */
int cdb_image_decode_memory(const uint8_t *data, size_t len, int target,
                            cdb_rgb *out, cdb_err *e);

/* The same for a file; messages start with the path. */
int cdb_image_decode_file(const char *path, int target, cdb_rgb *out,
                          cdb_err *e);

/* Reusable buffers of the resize (coefficients, intermediate rows) and of
** the decoder (the cdb_rgb). Defined in image.c; a clipdb_ctx holds one. */
struct cdb_img_scratch;
void cdb_img_scratch_free(struct cdb_img_scratch *s);

/* CLIP preprocessing of img into out (3, size, size) floats, channel-major:
** resize so the shorter side is `size` (the other int(size * long / short))
** with Pillow's antialiased bicubic, centre crop, /255, normalise with CLIP's
** mean and std. *scratch may be NULL (allocated on first use, then reused;
** free with cdb_img_scratch_free). Returns CLIPDB_OK, CLIPDB_EINVAL (empty
** image, size < 1) or CLIPDB_ENOMEM. */
int cdb_image_preprocess_with(struct cdb_img_scratch **scratch,
                              const cdb_rgb *img, int size, float *out);

/* Decodes the file at path (or, when path is NULL, len bytes at data) into
** the scratch's own cdb_rgb and preprocesses it into pixels (3, size, size),
** as cdb_image_decode_* then cdb_image_preprocess_with. max_pixels is the
** cdb_rgb's max_pixels for this image (0: the build's limit). The decoder's
** status code is returned unchanged; a file's messages start with its path. */
int cdb_image_load_with(struct cdb_img_scratch **scratch, const char *path, const void *data,
                        size_t len, int size, unsigned long long max_pixels, float *pixels,
                        cdb_err *e);

/* Training augmentation: the box (x, y, w, h) of img (decoded at full size,
** not DCT-scaled) cropped, resized to (size, size) with Pillow's antialiased
** bicubic (torchvision's resized_crop on a PIL image, as RandomResizedCrop
** does), mirrored left to right when flip, then normalised as above into
** out (3, size, size).
** CLIPDB_EINVAL for a box outside the image or a DCT-scaled image. */
int cdb_image_preprocess_box(struct cdb_img_scratch **scratch, const cdb_rgb *img, int x, int y,
                             int w, int h, int flip, int size, float *out);

/* cdb_image_preprocess_with with temporary buffers. */
int cdb_image_preprocess(const cdb_rgb *img, int size, float *out);

/* The resized image itself (before crop and normalisation), for tests:
** img resized to (out_w, out_h) exactly as Pillow's
** Image.resize((out_w, out_h), BICUBIC). out: (out_h, out_w, 3), caller's. */
int cdb_image_resize_rgb(const cdb_rgb *img, int out_w, int out_h,
                         uint8_t *out);

/* The output size torchvision's Resize(size) gives a w x h image. */
void cdb_image_resized_size(int w, int h, int size, int *out_w, int *out_h);

#endif /* CDB_IMAGE_H */
