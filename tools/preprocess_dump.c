/*
** preprocess_dump: a test-time tool. Decodes IMAGE and preprocesses it as
** CLIP does, writing the normalised (3, S, S) float32 tensor (little-endian,
** channel-major) to OUT.f32; with --rgb, also the decoded RGB image before
** the resize as raw (h, w, 3) bytes, its size printed on stdout as "W H".
**
**   preprocess_dump IMAGE OUT.f32 [--size 224] [--no-dct-scale] [--rgb OUT.rgb]
**                   [--box X,Y,W,H,FLIP]
**
** --box: the training augmentation instead (cdb_image_preprocess_box: crop
** the box, resize it to S x S, mirror when FLIP is 1); decodes at full size.
**
** Used by tests/ref/test_image_pil.py to compare with PIL + torchvision.
*/
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "model/image.h"

static int usage(void)
{
    fprintf(stderr,
            "usage: preprocess_dump IMAGE OUT.f32 [--size 224] [--no-dct-scale] [--rgb OUT.rgb]\n"
            "  Writes CLIP's normalised (3, S, S) float32 tensor of IMAGE to OUT.f32.\n"
            "  --size S        crop side (default 224)\n"
            "  --no-dct-scale  decode JPEGs at full size (no reduced DCT scale)\n"
            "  --rgb FILE      also write the decoded (h, w, 3) RGB bytes; prints \"W H\"\n"
            "  --box X,Y,W,H,FLIP  crop the box, resize to S x S, mirror if FLIP is 1\n"
            "example: preprocess_dump photo.jpg photo.f32 --rgb photo.rgb\n");
    return 2;
}

static int write_all(const char *path, const void *p, size_t n)
{
    FILE *f = fopen(path, "wb");
    int ok = f && fwrite(p, 1, n, f) == n;
    if (f && fclose(f) != 0) ok = 0;
    if (!ok) fprintf(stderr, "preprocess_dump: cannot write %s\n", path);
    return ok;
}

int main(int argc, char **argv)
{
    const char *in = NULL, *out = NULL, *rgb_path = NULL;
    int size = 224, dct = 1, i, rc = 1, box = 0, bx = 0, by = 0, bw = 0, bh = 0, flip = 0;
    cdb_rgb img = {0};
    cdb_err e;
    float *px = NULL;
    struct cdb_img_scratch *scratch = NULL;

    for (i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--size") && i + 1 < argc) size = atoi(argv[++i]);
        else if (!strcmp(argv[i], "--no-dct-scale")) dct = 0;
        else if (!strcmp(argv[i], "--box") && i + 1 < argc) {
            if (sscanf(argv[++i], "%d,%d,%d,%d,%d", &bx, &by, &bw, &bh, &flip) != 5) return usage();
            box = 1;
            dct = 0;
        }
        else if (!strcmp(argv[i], "--rgb") && i + 1 < argc) rgb_path = argv[++i];
        else if (!strcmp(argv[i], "--help") || !strcmp(argv[i], "-h")) return usage();
        else if (argv[i][0] == '-') return usage();
        else if (!in) in = argv[i];
        else if (!out) out = argv[i];
        else return usage();
    }
    if (!in || !out || size < 1 || size > 4096) return usage();
    cdb_err_clear(&e);
    if (cdb_image_decode_file(in, dct ? size : 0, &img, &e) != CLIPDB_OK) {
        fprintf(stderr, "preprocess_dump: %s\n", e.msg);
        goto cleanup;
    }
    if (rgb_path) {
        if (!write_all(rgb_path, img.px, (size_t)img.w * (size_t)img.h * 3)) goto cleanup;
        printf("%d %d\n", img.w, img.h);
    }
    px = malloc((size_t)3 * (size_t)size * (size_t)size * sizeof *px);
    if (!px || (box ? cdb_image_preprocess_box(&scratch, &img, bx, by, bw, bh, flip, size, px)
                    : cdb_image_preprocess(&img, size, px)) != CLIPDB_OK) {
        fprintf(stderr, "preprocess_dump: preprocessing failed\n");
        goto cleanup;
    }
    if (!write_all(out, px, (size_t)3 * (size_t)size * (size_t)size * sizeof *px)) goto cleanup;
    rc = 0;
cleanup:
    cdb_img_scratch_free(scratch);
    free(px);
    cdb_rgb_free(&img);
    return rc;
}
