/*
** safetensors.h: a bounded reader of the safetensors format
** (8-byte little-endian header length N, N bytes of JSON header, raw data).
** Owner: src/model/safetensors.c. Every offset and shape from the header is
** checked against the file before use.
*/
#ifndef CDB_SAFETENSORS_H
#define CDB_SAFETENSORS_H

#include "core/core.h"

enum { CDB_DT_F32 = 1, CDB_DT_F16, CDB_DT_BF16, CDB_DT_OTHER };

#define CDB_ST_MAX_DIMS 8

typedef struct cdb_tensor {
    char *name;
    int dtype;                       /* CDB_DT_* */
    const char *dtype_name;          /* as written in the header, e.g. "F32" */
    int ndim;
    int64_t shape[CDB_ST_MAX_DIMS];
    int64_t numel;
    const uint8_t *data;             /* into the mapping; not aligned in general */
    size_t nbytes;
} cdb_tensor;

typedef struct cdb_safetensors {
    cdb_map map;                     /* zero when parsed from a caller's buffer */
    const uint8_t *buf;              /* the whole file: the mapping or the caller's buffer */
    size_t len;
    cdb_tensor *tensors;
    size_t n;
} cdb_safetensors;

/* Maps and parses a file. *out (NULL on failure) is owned by the caller,
** who closes it with cdb_st_close. Errors name the file and the tensor. */
int cdb_st_open(const char *path, cdb_safetensors **out, cdb_err *e);
/* Parses a buffer the caller keeps alive while *out lives (the fuzz entry
** point). *out is owned by the caller (cdb_st_close); tensors point into buf. */
int cdb_st_parse(const uint8_t *buf, size_t len, cdb_safetensors **out, cdb_err *e);
/* The tensor named `name`, or NULL (binary search; names are unique). */
const cdb_tensor *cdb_st_find(const cdb_safetensors *st, const char *name);
void cdb_st_close(cdb_safetensors *st);

#endif
