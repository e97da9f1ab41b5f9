/* libFuzzer target: decode any bytes as an image (all five formats, JPEG
** with and without DCT scaling) and preprocess the result. */
#include <stdint.h>
#include <stdlib.h>

#include "model/image.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    static float out[3 * 32 * 32];
    cdb_rgb img = {0};
    cdb_err e;
    cdb_err_clear(&e);
    /* The first byte picks the target side (0: full-size decode). */
    int target = size ? (data[0] & 1) * 32 : 0;
    if (cdb_image_decode_memory(data, size, target, &img, &e) == CLIPDB_OK) {
        if (cdb_image_preprocess(&img, 32, out) != CLIPDB_OK) abort();
    } else if (e.code == CLIPDB_OK || !e.msg[0]) {
        abort(); /* a failure must say why */
    }
    cdb_rgb_free(&img);
    return 0;
}
