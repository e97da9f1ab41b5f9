/* libFuzzer target: the captions parsers (JSON lines, COCO JSON, CSV).
** The first byte picks the file name (and so the .csv rule). */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "store/captions.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    static const char *const names[] = {"captions.jsonl", "captions_val.json", "captions.csv",
                                        "captions"};
    cdb_captions *c = NULL;
    cdb_err e;
    char *buf;
    size_t i;
    if (size < 1) return 0;
    buf = malloc(size); /* size - 1 bytes + NUL */
    if (!buf) return 0;
    memcpy(buf, data + 1, size - 1);
    buf[size - 1] = '\0';
    cdb_err_clear(&e);
    if (cdb_captions_parse(buf, size - 1, names[data[0] % 4], &c, &e) == CLIPDB_OK) {
        for (i = 0; i < c->n; i++) {
            if (cdb_captions_find(c, c->e[i].image) != &c->e[i]) abort();
        }
        cdb_captions_free(c);
    } else if (c != NULL || e.msg[0] == '\0') {
        abort();
    }
    free(buf);
    return 0;
}
