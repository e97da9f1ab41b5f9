/*
** safetensors.c: a bounded reader of the safetensors format.
**
** Layout (https://github.com/huggingface/safetensors, "Format"):
**   8 bytes   N, little-endian u64: the header length
**   N bytes   JSON object: {"NAME": {"dtype": "F32", "shape": [..],
**             "data_offsets": [begin, end]}, ..., "__metadata__": {..}}
**             (writers pad it with trailing spaces to a multiple of 8)
**   rest      the data section; offsets are relative to its start
**
** Nothing in the header is trusted: N is bounded by the file and by
** CDB_ST_MAX_HEADER, every number must be a non-negative integer that a
** double holds exactly, shapes are overflow-checked, every tensor's byte
** range must lie inside the data section, match numel * itemsize, and not
** overlap another tensor's range, and names must be unique.
*/
#include <cjson/cJSON.h>
#include <stdlib.h>
#include <string.h>

#include "model/safetensors.h"

#define CDB_ST_MAX_HEADER ((uint64_t)100 * 1024 * 1024)
/* Largest integer a double represents exactly (JSON numbers go through cJSON's double). */
#define CDB_ST_MAX_INT ((double)(1ULL << 53))

static const struct {
    const char *name;
    int dtype;
    size_t itemsize;
} dtypes[] = {
    {"F32", CDB_DT_F32, 4},    {"F16", CDB_DT_F16, 2},     {"BF16", CDB_DT_BF16, 2},
    {"F64", CDB_DT_OTHER, 8},  {"I64", CDB_DT_OTHER, 8},   {"U64", CDB_DT_OTHER, 8},
    {"I32", CDB_DT_OTHER, 4},  {"U32", CDB_DT_OTHER, 4},   {"I16", CDB_DT_OTHER, 2},
    {"U16", CDB_DT_OTHER, 2},  {"I8", CDB_DT_OTHER, 1},    {"U8", CDB_DT_OTHER, 1},
    {"BOOL", CDB_DT_OTHER, 1}, {"F8_E4M3", CDB_DT_OTHER, 1}, {"F8_E5M2", CDB_DT_OTHER, 1},
};

/* Reads a JSON number that must be an integer in [0, 2^53]. */
static int json_uint(const cJSON *j, uint64_t *out)
{
    double v;
    if (!cJSON_IsNumber(j)) return 0;
    v = j->valuedouble;
    if (!(v >= 0.0) || v > CDB_ST_MAX_INT || v != (double)(uint64_t)v) return 0;
    *out = (uint64_t)v;
    return 1;
}

static int cmp_name(const void *a, const void *b)
{
    return strcmp(((const cdb_tensor *)a)->name, ((const cdb_tensor *)b)->name);
}

/* Orders tensor pointers by the start of their byte range. */
static int cmp_offset(const void *a, const void *b)
{
    const cdb_tensor *x = *(const cdb_tensor *const *)a, *y = *(const cdb_tensor *const *)b;
    return x->data < y->data ? -1 : x->data > y->data;
}

/* Fills t from one header entry; the data section is [data, data + data_len). */
static int parse_entry(const cJSON *j, const uint8_t *data, uint64_t data_len, cdb_tensor *t,
                       cdb_err *e)
{
    const cJSON *dt = cJSON_GetObjectItemCaseSensitive(j, "dtype");
    const cJSON *shape = cJSON_GetObjectItemCaseSensitive(j, "shape");
    const cJSON *offs = cJSON_GetObjectItemCaseSensitive(j, "data_offsets");
    const cJSON *it;
    size_t itemsize = 0, numel = 1, nbytes, i, nlen, dlen;
    uint64_t begin, end, dim;
    const char *name = j->string;

    if (!cJSON_IsObject(j))
        return cdb_err_set(e, CLIPDB_EFORMAT, "tensor '%s': header entry is not an object", name);
    if (!cJSON_IsString(dt))
        return cdb_err_set(e, CLIPDB_EFORMAT, "tensor '%s': no \"dtype\" string", name);
    nlen = strlen(name);
    dlen = strlen(dt->valuestring);
    /* name and dtype string in one allocation; dtype_name points after the name. */
    t->name = malloc(nlen + dlen + 2);
    if (!t->name) return cdb_err_set(e, CLIPDB_ENOMEM, "out of memory");
    memcpy(t->name, name, nlen + 1);
    memcpy(t->name + nlen + 1, dt->valuestring, dlen + 1);
    t->dtype_name = t->name + nlen + 1;
    t->dtype = CDB_DT_OTHER;
    for (i = 0; i < sizeof dtypes / sizeof dtypes[0]; i++) {
        if (strcmp(dtypes[i].name, dt->valuestring) == 0) {
            t->dtype = dtypes[i].dtype;
            itemsize = dtypes[i].itemsize;
            break;
        }
    }

    if (!cJSON_IsArray(shape))
        return cdb_err_set(e, CLIPDB_EFORMAT, "tensor '%s': no \"shape\" array", name);
    t->ndim = 0;
    cJSON_ArrayForEach(it, shape)
    {
        if (t->ndim == CDB_ST_MAX_DIMS)
            return cdb_err_set(e, CLIPDB_EFORMAT, "tensor '%s': more than %d dimensions", name,
                               CDB_ST_MAX_DIMS);
        if (!json_uint(it, &dim))
            return cdb_err_set(e, CLIPDB_EFORMAT,
                               "tensor '%s': shape entry %d is not a non-negative integer "
                               "below 2^53",
                               name, t->ndim);
        if (!cdb_mul_ok(numel, (size_t)dim, &numel) || numel > (size_t)INT64_MAX)
            return cdb_err_set(e, CLIPDB_EFORMAT, "tensor '%s': element count overflows", name);
        t->shape[t->ndim++] = (int64_t)dim;
    }
    t->numel = (int64_t)numel;

    if (!cJSON_IsArray(offs) || cJSON_GetArraySize(offs) != 2 ||
        !json_uint(cJSON_GetArrayItem(offs, 0), &begin) ||
        !json_uint(cJSON_GetArrayItem(offs, 1), &end))
        return cdb_err_set(e, CLIPDB_EFORMAT,
                           "tensor '%s': \"data_offsets\" is not [begin, end] with "
                           "non-negative integers",
                           name);
    if (begin > end)
        return cdb_err_set(e, CLIPDB_EFORMAT,
                           "tensor '%s': data_offsets [%llu, %llu] begin after they end", name,
                           (unsigned long long)begin, (unsigned long long)end);
    if (end > data_len)
        return cdb_err_set(e, CLIPDB_EFORMAT,
                           "tensor '%s': data_offsets [%llu, %llu] run past the end of the file "
                           "(data section is %llu bytes)",
                           name, (unsigned long long)begin, (unsigned long long)end,
                           (unsigned long long)data_len);
    /* An unknown dtype has no known item size: its range is only bounded. */
    if (itemsize) {
        if (!cdb_mul_ok(numel, itemsize, &nbytes))
            return cdb_err_set(e, CLIPDB_EFORMAT, "tensor '%s': byte count overflows", name);
        if (nbytes != end - begin)
            return cdb_err_set(e, CLIPDB_EFORMAT,
                               "tensor '%s': data_offsets [%llu, %llu] hold %llu bytes, but "
                               "%llu %s elements need %zu",
                               name, (unsigned long long)begin, (unsigned long long)end,
                               (unsigned long long)(end - begin), (unsigned long long)numel,
                               t->dtype_name, nbytes);
    }
    t->data = data + begin;
    t->nbytes = (size_t)(end - begin);
    return CLIPDB_OK;
}

int cdb_st_parse(const uint8_t *buf, size_t len, cdb_safetensors **out, cdb_err *e)
{
    int rc = CLIPDB_OK;
    uint64_t hlen = 0;
    char *text = NULL;
    const char *end = NULL;
    cJSON *root = NULL, *j;
    cdb_safetensors *st = NULL;
    cdb_tensor **by_off = NULL;
    size_t i, n = 0, k;
    const uint8_t *data;
    uint64_t data_len;

    *out = NULL;
    if (len < 8) {
        rc = cdb_err_set(e, CLIPDB_EFORMAT,
                         "file is %zu bytes, too short for a safetensors header", len);
        goto cleanup;
    }
    for (i = 0; i < 8; i++) hlen |= (uint64_t)buf[i] << (8 * i);
    if (hlen > len - 8) {
        rc = cdb_err_set(e, CLIPDB_EFORMAT,
                         "header length %llu runs past the end of the file (%zu bytes); "
                         "not a safetensors file, or truncated",
                         (unsigned long long)hlen, len);
        goto cleanup;
    }
    if (hlen > CDB_ST_MAX_HEADER) {
        rc = cdb_err_set(e, CLIPDB_EFORMAT, "header length %llu is over the %llu-byte limit",
                         (unsigned long long)hlen, (unsigned long long)CDB_ST_MAX_HEADER);
        goto cleanup;
    }
    data = buf + 8 + hlen;
    data_len = (uint64_t)len - 8 - hlen;

    /* A NUL-terminated copy, so that cJSON never reads past the header. */
    text = malloc((size_t)hlen + 1);
    if (!text) {
        rc = cdb_err_set(e, CLIPDB_ENOMEM, "out of memory");
        goto cleanup;
    }
    memcpy(text, buf + 8, (size_t)hlen);
    text[hlen] = '\0';
    {
        long nul = cdb_json_nul_escape(text, (size_t)hlen);
        if (nul >= 0) {
            rc = cdb_err_set(e, CLIPDB_EFORMAT,
                             "header has an escaped NUL (\\u0000) at byte %ld: names and "
                             "strings may not contain NUL", nul);
            goto cleanup;
        }
    }
    root = cJSON_ParseWithOpts(text, &end, 0);
    if (!root) {
        rc = cdb_err_set(e, CLIPDB_EFORMAT, "header is not valid JSON (error near byte %td)",
                         end ? end - text : (ptrdiff_t)0);
        goto cleanup;
    }
    /* Only the writers' space padding may follow the object (no NULs, no garbage). */
    for (; end < text + hlen; end++) {
        if (*end != ' ' && *end != '\t' && *end != '\n' && *end != '\r') {
            rc = cdb_err_set(e, CLIPDB_EFORMAT, "header has bytes after the JSON object (byte %td)",
                             end - text);
            goto cleanup;
        }
    }
    if (!cJSON_IsObject(root)) {
        rc = cdb_err_set(e, CLIPDB_EFORMAT, "header is not a JSON object");
        goto cleanup;
    }

    st = calloc(1, sizeof *st);
    cJSON_ArrayForEach(j, root) n++;
    if (!st || !(st->tensors = cdb_calloc_array(n ? n : 1, sizeof *st->tensors))) {
        rc = cdb_err_set(e, CLIPDB_ENOMEM, "out of memory");
        goto cleanup;
    }
    cJSON_ArrayForEach(j, root)
    {
        if (strcmp(j->string, "__metadata__") == 0) continue;
        rc = parse_entry(j, data, data_len, &st->tensors[st->n], e);
        st->n++; /* counted even on failure so that cdb_st_close frees its name */
        if (rc != CLIPDB_OK) goto cleanup;
    }

    /* Names sorted for cdb_st_find's binary search; duplicates are an error. */
    qsort(st->tensors, st->n, sizeof *st->tensors, cmp_name);
    for (i = 1; i < st->n; i++) {
        if (strcmp(st->tensors[i - 1].name, st->tensors[i].name) == 0) {
            rc = cdb_err_set(e, CLIPDB_EFORMAT, "tensor '%s' appears twice in the header",
                             st->tensors[i].name);
            goto cleanup;
        }
    }
    /* No two non-empty byte ranges may overlap. */
    by_off = cdb_malloc_array(st->n ? st->n : 1, sizeof *by_off);
    if (!by_off) {
        rc = cdb_err_set(e, CLIPDB_ENOMEM, "out of memory");
        goto cleanup;
    }
    for (i = k = 0; i < st->n; i++)
        if (st->tensors[i].nbytes) by_off[k++] = &st->tensors[i];
    qsort(by_off, k, sizeof *by_off, cmp_offset);
    for (i = 1; i < k; i++) {
        const cdb_tensor *a = by_off[i - 1], *b = by_off[i];
        if (a->data + a->nbytes > b->data) {
            rc = cdb_err_set(e, CLIPDB_EFORMAT,
                             "tensors '%s' [%td, %td] and '%s' [%td, %td] overlap", a->name,
                             a->data - data, a->data + a->nbytes - data, b->name, b->data - data,
                             b->data + b->nbytes - data);
            goto cleanup;
        }
    }
    st->buf = buf;
    st->len = len;
    *out = st;
    st = NULL;
cleanup:
    free(by_off);
    cdb_st_close(st);
    cJSON_Delete(root);
    free(text);
    return rc;
}

int cdb_st_open(const char *path, cdb_safetensors **out, cdb_err *e)
{
    cdb_map map;
    int rc;

    *out = NULL;
    rc = cdb_map_file(path, &map, e);
    if (rc != CLIPDB_OK) return rc;
    rc = cdb_st_parse(map.data, map.size, out, e);
    if (rc != CLIPDB_OK) {
        cdb_err_prefix(e, "%s", path);
        cdb_unmap(&map);
        return rc;
    }
    (*out)->map = map;
    return CLIPDB_OK;
}

const cdb_tensor *cdb_st_find(const cdb_safetensors *st, const char *name)
{
    cdb_tensor key;
    if (!st || !st->n) return NULL;
    key.name = (char *)name;
    return bsearch(&key, st->tensors, st->n, sizeof key, cmp_name);
}

void cdb_st_close(cdb_safetensors *st)
{
    size_t i;
    if (!st) return;
    for (i = 0; i < st->n; i++) free(st->tensors[i].name);
    free(st->tensors);
    cdb_unmap(&st->map);
    free(st);
}
