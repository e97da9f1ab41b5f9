/*
** fuzz_safetensors.c: libFuzzer target for the safetensors reader
** (cdb_st_parse) and, when a file parses, the weight binder (lookups,
** shape inference, dtype conversion) on it.
** Seeds: tests/fuzz/seeds/safetensors/ (see README there).
*/
#include <stdlib.h>
#include <string.h>

#include "model/model.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);
int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    cdb_safetensors *st = NULL;
    cdb_err e;
    size_t i;
    volatile size_t sink = 0;

    if (cdb_st_parse(data, size, &st, &e) != CLIPDB_OK) {
        if (!e.msg[0]) abort(); /* every failure carries a message */
        return 0;
    }
    for (i = 0; i < st->n; i++) {
        const cdb_tensor *t = cdb_st_find(st, st->tensors[i].name);
        if (t != &st->tensors[i]) abort(); /* names are unique and findable */
        if (t->data < data || t->data + t->nbytes > data + size) abort();
        if (t->nbytes) sink += t->data[0] + t->data[t->nbytes - 1];
    }
    {
        clipdb_model *m = calloc(1, sizeof *m);
        if (m) {
            m->st = st;
            if (cdb_weights_bind(m) != CLIPDB_OK && !m->err.msg[0]) abort();
            cdb_weights_release(m);
            free(m);
        }
    }
    (void)sink;
    cdb_st_close(st);
    return 0;
}
