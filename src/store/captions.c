/*
** captions.c: JSON-lines, COCO JSON and CSV captions parsers. Every limit is
** checked (file size, name length, captions per image, text length), and
** every error names the file and the line (or the array element).
*/
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include <cjson/cJSON.h>

#include "store/captions.h"

typedef struct builder {
    cdb_captions *c;
    size_t cap;
    const char *name;
    cdb_err *e;
} builder;

static int oom(builder *b)
{
    return cdb_err_set(b->e, CLIPDB_ENOMEM, "%s: out of memory", b->name);
}

/* Adds an entry (taking ownership of meta_json) and returns it in *out. */
static int add_entry(builder *b, const char *image, size_t image_len, char *meta_json,
                     cdb_caption_entry **out, size_t line)
{
    cdb_caption_entry *x;
    if (image_len == 0 || image_len > CDB_CAPTIONS_MAX_NAME || memchr(image, '\0', image_len)) {
        free(meta_json);
        return cdb_err_set(b->e, CLIPDB_EFORMAT, "%s:%zu: bad image name (empty, too long or NUL)",
                           b->name, line);
    }
    if (cdb_grow((void **)&b->c->e, &b->cap, b->c->n + 1, sizeof *b->c->e)) {
        free(meta_json);
        return oom(b);
    }
    x = &b->c->e[b->c->n];
    memset(x, 0, sizeof *x);
    x->image = malloc(image_len + 1);
    if (!x->image) {
        free(meta_json);
        return oom(b);
    }
    memcpy(x->image, image, image_len);
    x->image[image_len] = '\0';
    x->meta_json = meta_json;
    b->c->n++;
    *out = x;
    return CLIPDB_OK;
}

static int add_caption(builder *b, cdb_caption_entry *x, const char *text, size_t len, size_t line)
{
    char *s;
    if (len > CLIPDB_MAX_TEXT_BYTES)
        return cdb_err_set(b->e, CLIPDB_ELIMIT, "%s:%zu: caption longer than %u bytes", b->name,
                           line, CLIPDB_MAX_TEXT_BYTES);
    if (memchr(text, '\0', len))
        return cdb_err_set(b->e, CLIPDB_EFORMAT, "%s:%zu: caption holds a NUL byte", b->name,
                           line);
    if (x->n_captions >= CDB_CAPTIONS_MAX_PER_IMAGE)
        return cdb_err_set(b->e, CLIPDB_ELIMIT, "%s:%zu: more than %d captions for %s", b->name,
                           line, CDB_CAPTIONS_MAX_PER_IMAGE, x->image);
    if (cdb_grow((void **)&x->captions, &x->cap_captions, x->n_captions + 1,
                 sizeof *x->captions) ||
        cdb_grow((void **)&x->lines, &x->cap_lines, x->n_captions + 1, sizeof *x->lines))
        return oom(b);
    s = malloc(len + 1);
    if (!s) return oom(b);
    memcpy(s, text, len);
    s[len] = '\0';
    x->lines[x->n_captions] = line;
    x->captions[x->n_captions++] = s;
    b->c->n_captions++;
    return CLIPDB_OK;
}

static void entry_free(cdb_caption_entry *x)
{
    size_t i;
    for (i = 0; i < x->n_captions; i++) free(x->captions[i]);
    free(x->captions);
    free(x->lines);
    free(x->image);
    free(x->meta_json);
}

void cdb_captions_free(cdb_captions *c)
{
    size_t i;
    if (!c) return;
    for (i = 0; i < c->n; i++) entry_free(&c->e[i]);
    free(c->e);
    free(c);
}

static int cmp_entry(const void *a, const void *b)
{
    const cdb_caption_entry *x = a, *y = b;
    return strcmp(x->image, y->image);
}

/* Sorts by image and merges entries of the same image (captions appended
** in order; the first metadata kept). qsort is not stable, so entries keep
** their order through an index in `used` during the sort. */
static int finish(builder *b)
{
    cdb_captions *c = b->c;
    size_t i, j, w = 0;
    for (i = 0; i < c->n; i++) c->e[i].used = (int)i;
    if (c->n > 0) qsort(c->e, c->n, sizeof *c->e, cmp_entry);
    /* restore file order among equal names */
    for (i = 0; i < c->n;) {
        j = i + 1;
        while (j < c->n && !strcmp(c->e[j].image, c->e[i].image)) j++;
        if (j - i > 1) {
            size_t a, z;
            for (a = i + 1; a < j; a++)
                for (z = a; z > i && c->e[z - 1].used > c->e[z].used; z--) {
                    cdb_caption_entry t = c->e[z];
                    c->e[z] = c->e[z - 1];
                    c->e[z - 1] = t;
                }
        }
        i = j;
    }
    for (i = 0; i < c->n; i++) {
        cdb_caption_entry *x = &c->e[i];
        x->used = 0;
        if (w > 0 && !strcmp(c->e[w - 1].image, x->image)) {
            cdb_caption_entry *d = &c->e[w - 1];
            for (j = 0; j < x->n_captions; j++) {
                if (cdb_grow((void **)&d->captions, &d->cap_captions, d->n_captions + 1,
                             sizeof *d->captions) ||
                    cdb_grow((void **)&d->lines, &d->cap_lines, d->n_captions + 1,
                             sizeof *d->lines))
                    return oom(b);
                d->lines[d->n_captions] = x->lines[j];
                d->captions[d->n_captions++] = x->captions[j];
            }
            x->n_captions = 0;
            entry_free(x);
            if (d->n_captions > CDB_CAPTIONS_MAX_PER_IMAGE)
                return cdb_err_set(b->e, CLIPDB_ELIMIT, "%s: more than %d captions for %s",
                                   b->name, CDB_CAPTIONS_MAX_PER_IMAGE, d->image);
            continue;
        }
        if (w != i) c->e[w] = *x;
        w++;
    }
    c->n = w;
    return CLIPDB_OK;
}

/* ---- JSON lines ---------------------------------------------------------- */

static int parse_jsonl_line(builder *b, const char *line, size_t len, size_t lineno)
{
    cJSON *obj = NULL, *img, *caps, *one, *it;
    cdb_caption_entry *x = NULL;
    char *meta = NULL;
    int rc = CLIPDB_OK;
    const char *end = NULL;

    obj = cJSON_ParseWithLengthOpts(line, len, &end, 0);
    if (!obj) {
        rc = cdb_err_set(b->e, CLIPDB_EFORMAT, "%s:%zu: not valid JSON (near byte %zu)",
                         b->name, lineno, end && end >= line ? (size_t)(end - line) + 1 : 0);
        goto cleanup;
    }
    while (end && end < line + len && (*end == ' ' || *end == '\t' || *end == '\r')) end++;
    if (end && end < line + len) {
        rc = cdb_err_set(b->e, CLIPDB_EFORMAT, "%s:%zu: text after the JSON object", b->name,
                         lineno);
        goto cleanup;
    }
    if (!cJSON_IsObject(obj)) {
        rc = cdb_err_set(b->e, CLIPDB_EFORMAT, "%s:%zu: expected a JSON object", b->name, lineno);
        goto cleanup;
    }
    img = cJSON_GetObjectItemCaseSensitive(obj, "image");
    if (!cJSON_IsString(img)) {
        rc = cdb_err_set(b->e, CLIPDB_EFORMAT, "%s:%zu: no \"image\" string", b->name, lineno);
        goto cleanup;
    }
    caps = cJSON_GetObjectItemCaseSensitive(obj, "captions");
    one = cJSON_GetObjectItemCaseSensitive(obj, "caption");
    if (!cJSON_IsArray(caps) && !cJSON_IsString(one)) {
        rc = cdb_err_set(b->e, CLIPDB_EFORMAT,
                         "%s:%zu: no \"captions\" array (or \"caption\" string)", b->name, lineno);
        goto cleanup;
    }
    cJSON_ArrayForEach(it, caps)
    {
        if (!cJSON_IsString(it)) {
            rc = cdb_err_set(b->e, CLIPDB_EFORMAT, "%s:%zu: a caption is not a string", b->name,
                             lineno);
            goto cleanup;
        }
    }
    /* metadata: the other fields */
    {
        cJSON *m = cJSON_CreateObject();
        int n = 0;
        if (!m) {
            rc = oom(b);
            goto cleanup;
        }
        cJSON_ArrayForEach(it, obj)
        {
            if (!it->string || !strcmp(it->string, "image") || !strcmp(it->string, "captions") ||
                !strcmp(it->string, "caption"))
                continue;
            cJSON *dup = cJSON_Duplicate(it, 1);
            if (!dup || !cJSON_AddItemToObject(m, it->string, dup)) {
                cJSON_Delete(dup);
                cJSON_Delete(m);
                rc = oom(b);
                goto cleanup;
            }
            n++;
        }
        if (n > 0 && !(meta = cJSON_PrintUnformatted(m))) {
            cJSON_Delete(m);
            rc = oom(b);
            goto cleanup;
        }
        cJSON_Delete(m);
    }
    rc = add_entry(b, img->valuestring, strlen(img->valuestring), meta, &x, lineno);
    meta = NULL;
    if (rc != CLIPDB_OK) goto cleanup;
    if (cJSON_IsString(one))
        if ((rc = add_caption(b, x, one->valuestring, strlen(one->valuestring), lineno)) != CLIPDB_OK)
            goto cleanup;
    cJSON_ArrayForEach(it, caps)
    {
        if ((rc = add_caption(b, x, it->valuestring, strlen(it->valuestring), lineno)) != CLIPDB_OK)
            goto cleanup;
    }
cleanup:
    free(meta);
    cJSON_Delete(obj);
    return rc;
}

static int parse_jsonl(builder *b, const char *data, size_t len)
{
    size_t pos = 0, lineno = 0;
    int rc;
    while (pos < len) {
        const char *nl = memchr(data + pos, '\n', len - pos);
        size_t n = nl ? (size_t)(nl - (data + pos)) : len - pos, i;
        lineno++;
        for (i = 0; i < n && (data[pos + i] == ' ' || data[pos + i] == '\t' ||
                              data[pos + i] == '\r');
             i++) {
        }
        if (i < n) {
            rc = parse_jsonl_line(b, data + pos, n, lineno);
            if (rc != CLIPDB_OK) return rc;
        }
        pos += n + 1;
    }
    return CLIPDB_OK;
}

/* ---- COCO ----------------------------------------------------------------- */

typedef struct coco_img {
    double id;
    const char *file;
    size_t entry;   /* 1 + index of its entry in b->c->e; 0: none yet */
} coco_img;

static int cmp_coco(const void *a, const void *b)
{
    double x = ((const coco_img *)a)->id, y = ((const coco_img *)b)->id;
    return x < y ? -1 : x > y;
}

static int parse_coco(builder *b, cJSON *doc)
{
    cJSON *images = cJSON_GetObjectItemCaseSensitive(doc, "images");
    cJSON *anns = cJSON_GetObjectItemCaseSensitive(doc, "annotations");
    coco_img *imgs = NULL, key, *hit;
    size_t n = 0, i = 0;
    int rc = CLIPDB_OK;
    cJSON *it;

    if (!cJSON_IsArray(images) || !cJSON_IsArray(anns))
        return cdb_err_set(b->e, CLIPDB_EFORMAT,
                           "%s: COCO captions need \"images\" and \"annotations\" arrays", b->name);
    n = (size_t)cJSON_GetArraySize(images);
    imgs = cdb_calloc_array(n, sizeof *imgs);
    if (!imgs) return oom(b);
    cJSON_ArrayForEach(it, images)
    {
        cJSON *id = cJSON_GetObjectItemCaseSensitive(it, "id");
        cJSON *fn = cJSON_GetObjectItemCaseSensitive(it, "file_name");
        if (!cJSON_IsNumber(id) || !cJSON_IsString(fn)) {
            rc = cdb_err_set(b->e, CLIPDB_EFORMAT,
                             "%s: images[%zu]: needs a numeric \"id\" and a \"file_name\" string",
                             b->name, i);
            goto cleanup;
        }
        imgs[i].id = id->valuedouble;
        imgs[i].file = fn->valuestring;
        i++;
    }
    qsort(imgs, n, sizeof *imgs, cmp_coco);
    for (i = 1; i < n; i++)
        if (imgs[i].id == imgs[i - 1].id) {
            rc = cdb_err_set(b->e, CLIPDB_EFORMAT, "%s: images: id %.17g appears twice", b->name,
                             imgs[i].id);
            goto cleanup;
        }
    i = 0;
    cJSON_ArrayForEach(it, anns)
    {
        cJSON *iid = cJSON_GetObjectItemCaseSensitive(it, "image_id");
        cJSON *cap = cJSON_GetObjectItemCaseSensitive(it, "caption");
        if (!cJSON_IsNumber(iid) || !cJSON_IsString(cap)) {
            rc = cdb_err_set(b->e, CLIPDB_EFORMAT,
                             "%s: annotations[%zu]: needs a numeric \"image_id\" and a "
                             "\"caption\" string",
                             b->name, i);
            goto cleanup;
        }
        key.id = iid->valuedouble;
        hit = n ? bsearch(&key, imgs, n, sizeof *imgs, cmp_coco) : NULL;
        if (!hit) {
            rc = cdb_err_set(b->e, CLIPDB_EFORMAT,
                             "%s: annotations[%zu]: image_id %.17g is not in \"images\"", b->name,
                             i, key.id);
            goto cleanup;
        }
        if (!hit->entry) {
            cdb_caption_entry *x = NULL;
            char *meta = NULL;
            if (hit->id == (double)(long long)hit->id)
                meta = cdb_sprintf("{\"image_id\":%lld}", (long long)hit->id);
            else
                meta = cdb_sprintf("{\"image_id\":%.17g}", hit->id);
            if (!meta) {
                rc = oom(b);
                goto cleanup;
            }
            if ((rc = add_entry(b, hit->file, strlen(hit->file), meta, &x, i)) != CLIPDB_OK)
                goto cleanup;
            hit->entry = (size_t)(x - b->c->e) + 1;
        }
        /* by index: entries move when the array grows */
        if ((rc = add_caption(b, &b->c->e[hit->entry - 1], cap->valuestring, strlen(cap->valuestring), i)) !=
            CLIPDB_OK)
            goto cleanup;
        i++;
    }
cleanup:
    free(imgs);
    return rc;
}

/* ---- CSV (RFC 4180) ------------------------------------------------------- */

typedef struct csv_field {
    char *s;
    size_t len;
} csv_field;

typedef struct csv_row {
    csv_field *f;
    size_t n, cap;
    char *buf;          /* unescaped bytes of every field, NUL-separated */
    size_t blen, bcap;
} csv_row;

static int row_put(csv_row *r, char ch)
{
    if (cdb_grow((void **)&r->buf, &r->bcap, r->blen + 1, 1)) return -1;
    r->buf[r->blen++] = ch;
    return 0;
}

#define CSV_MAX_FIELDS 1024

/* Reads one record starting at *pos; fields index into r->buf by offset
** (stored in f[i].s as an offset until the record is complete). */
static int csv_record(builder *b, const char *d, size_t len, size_t *pos, size_t *lineno,
                      csv_row *r)
{
    size_t p = *pos, start_line = *lineno;
    r->n = 0;
    r->blen = 0;
    for (;;) {
        size_t off = r->blen;
        int quoted = 0;
        if (r->n == CSV_MAX_FIELDS)
            return cdb_err_set(b->e, CLIPDB_ELIMIT, "%s:%zu: more than %d fields", b->name,
                               start_line, CSV_MAX_FIELDS);
        if (p < len && d[p] == '"') {
            quoted = 1;
            p++;
            for (;;) {
                if (p >= len)
                    return cdb_err_set(b->e, CLIPDB_EFORMAT, "%s:%zu: unterminated quoted field",
                                       b->name, start_line);
                if (d[p] == '"') {
                    if (p + 1 < len && d[p + 1] == '"') {
                        if (row_put(r, '"')) return oom(b);
                        p += 2;
                        continue;
                    }
                    p++;
                    break;
                }
                if (d[p] == '\n') (*lineno)++;
                if (row_put(r, d[p])) return oom(b);
                p++;
            }
            if (p < len && d[p] != ',' && d[p] != '\n' && d[p] != '\r')
                return cdb_err_set(b->e, CLIPDB_EFORMAT,
                                   "%s:%zu: text after a closing quote (write a quote as \"\")",
                                   b->name, *lineno);
        } else {
            while (p < len && d[p] != ',' && d[p] != '\n' && d[p] != '\r') {
                if (row_put(r, d[p])) return oom(b);
                p++;
            }
        }
        (void)quoted;
        if (r->blen - off > CLIPDB_MAX_TEXT_BYTES)
            return cdb_err_set(b->e, CLIPDB_ELIMIT, "%s:%zu: field longer than %u bytes", b->name,
                               start_line, CLIPDB_MAX_TEXT_BYTES);
        if (row_put(r, '\0')) return oom(b);
        if (cdb_grow((void **)&r->f, &r->cap, r->n + 1, sizeof *r->f)) return oom(b);
        r->f[r->n].s = (char *)(uintptr_t)off;
        r->f[r->n].len = r->blen - off - 1;
        r->n++;
        if (p < len && d[p] == ',') {
            p++;
            continue;
        }
        /* end of record */
        if (p < len && d[p] == '\r') p++;
        if (p < len && d[p] == '\n') p++;
        break;
    }
    for (size_t i = 0; i < r->n; i++) r->f[i].s = r->buf + (uintptr_t)r->f[i].s;
    (*lineno)++;
    *pos = p;
    return CLIPDB_OK;
}

static int parse_csv(builder *b, const char *d, size_t len)
{
    csv_row r = {0};
    char **names = NULL;
    size_t pos = 0, lineno = 1, ncol = 0, i, line;
    long ci = -1, cc = -1;
    int rc = CLIPDB_OK;
    cJSON *m = NULL;

    if (len >= 3 && !memcmp(d, "\xEF\xBB\xBF", 3)) pos = 3; /* UTF-8 BOM */
    if ((rc = csv_record(b, d, len, &pos, &lineno, &r)) != CLIPDB_OK) goto cleanup;
    ncol = r.n;
    names = calloc(ncol, sizeof *names);
    if (!names) {
        rc = oom(b);
        goto cleanup;
    }
    for (i = 0; i < ncol; i++) {
        if (!(names[i] = cdb_strdup(r.f[i].s))) {
            rc = oom(b);
            goto cleanup;
        }
        if (!strcasecmp(names[i], "image") && ci < 0) ci = (long)i;
        else if (!strcasecmp(names[i], "caption") && cc < 0) cc = (long)i;
    }
    if (ci < 0 || cc < 0) {
        rc = cdb_err_set(b->e, CLIPDB_EFORMAT,
                         "%s:1: the CSV header must name the columns image and caption", b->name);
        goto cleanup;
    }
    while (pos < len) {
        cdb_caption_entry *x = NULL;
        char *meta = NULL;
        line = lineno;
        if ((rc = csv_record(b, d, len, &pos, &lineno, &r)) != CLIPDB_OK) goto cleanup;
        if (r.n == 1 && r.f[0].len == 0) continue; /* empty line */
        if (r.n != ncol) {
            rc = cdb_err_set(b->e, CLIPDB_EFORMAT, "%s:%zu: expected %zu fields, found %zu",
                             b->name, line, ncol, r.n);
            goto cleanup;
        }
        if (ncol > 2) {
            m = cJSON_CreateObject();
            if (!m) {
                rc = oom(b);
                goto cleanup;
            }
            for (i = 0; i < ncol; i++) {
                if ((long)i == ci || (long)i == cc) continue;
                if (memchr(r.f[i].s, '\0', r.f[i].len)) continue;
                if (!cJSON_AddStringToObject(m, names[i], r.f[i].s)) {
                    rc = oom(b);
                    goto cleanup;
                }
            }
            meta = cJSON_PrintUnformatted(m);
            cJSON_Delete(m);
            m = NULL;
            if (!meta) {
                rc = oom(b);
                goto cleanup;
            }
        }
        rc = add_entry(b, r.f[ci].s, r.f[ci].len, meta, &x, line);
        if (rc != CLIPDB_OK) goto cleanup;
        rc = add_caption(b, x, r.f[cc].s, r.f[cc].len, line);
        if (rc != CLIPDB_OK) goto cleanup;
    }
cleanup:
    cJSON_Delete(m);
    for (i = 0; names && i < ncol; i++) free(names[i]);
    free(names);
    free(r.f);
    free(r.buf);
    return rc;
}

/* ---- entry points ------------------------------------------------------------ */

/* The line (from 1) of the first \u0000 escape in JSON text s (n bytes),
** or 0 (cdb_json_nul_escape). cJSON decodes it to a NUL byte inside its C
** strings, which would cut a caption, an image name or a metadata value
** short without a word; so such a file is refused, naming the line. */
static size_t json_nul_escape_line(const char *s, size_t n)
{
    long at = cdb_json_nul_escape(s, n);
    size_t i, line = 1;
    if (at < 0) return 0;
    for (i = 0; i < (size_t)at; i++) line += s[i] == '\n';
    return line;
}

int cdb_captions_parse(const char *data, size_t len, const char *name, cdb_captions **out,
                       cdb_err *e)
{
    builder b;
    size_t i = 0, nlen, nul_line;
    int rc;
    cJSON *doc = NULL;

    *out = NULL;
    memset(&b, 0, sizeof b);
    b.name = name ? name : "captions";
    b.e = e;
    if (len > CDB_CAPTIONS_MAX_FILE)
        return cdb_err_set(e, CLIPDB_ELIMIT, "%s: larger than %zu bytes", b.name,
                           CDB_CAPTIONS_MAX_FILE);
    b.c = calloc(1, sizeof *b.c);
    if (!b.c) return oom(&b);
    nlen = strlen(b.name);
    while (i < len && (data[i] == ' ' || data[i] == '\t' || data[i] == '\r' || data[i] == '\n'))
        i++;
    if (i < len && data[i] == '{' && !(nlen >= 4 && !strcasecmp(b.name + nlen - 4, ".csv")) &&
        (nul_line = json_nul_escape_line(data, len)) != 0) {
        rc = cdb_err_set(e, CLIPDB_EFORMAT,
                         "%s:%zu: a string holds \\u0000 (a NUL byte), which no caption, image "
                         "name or metadata value can hold",
                         b.name, nul_line);
        cdb_captions_free(b.c);
        return rc;
    }
    if (nlen >= 4 && !strcasecmp(b.name + nlen - 4, ".csv")) {
        b.c->format = "csv";
        rc = parse_csv(&b, data, len);
    } else if (i < len && data[i] == '{' &&
               (doc = cJSON_ParseWithLengthOpts(data, len + 1, NULL, 1)) != NULL &&
               cJSON_IsObject(doc) && cJSON_GetObjectItemCaseSensitive(doc, "annotations")) {
        b.c->format = "coco";
        rc = parse_coco(&b, doc);
    } else if (i < len && data[i] == '{') {
        b.c->format = "jsonl";
        rc = parse_jsonl(&b, data, len);
    } else if (i == len) {
        b.c->format = "jsonl";
        rc = CLIPDB_OK; /* empty: no captions */
    } else {
        b.c->format = "csv";
        rc = parse_csv(&b, data, len);
    }
    if (rc == CLIPDB_OK) rc = finish(&b);
    cJSON_Delete(doc);
    if (rc != CLIPDB_OK) {
        cdb_captions_free(b.c);
        return rc;
    }
    *out = b.c;
    return CLIPDB_OK;
}

int cdb_captions_load(const char *path, cdb_captions **out, cdb_err *e)
{
    char *data = NULL;
    size_t len = 0;
    int rc = cdb_read_file(path, CDB_CAPTIONS_MAX_FILE, &data, &len, e);
    *out = NULL;
    if (rc != CLIPDB_OK) return rc;
    rc = cdb_captions_parse(data, len, path, out, e);
    free(data);
    return rc;
}

cdb_caption_entry *cdb_captions_find(cdb_captions *c, const char *image)
{
    cdb_caption_entry key;
    if (!c || c->n == 0) return NULL;
    key.image = (char *)image;
    return bsearch(&key, c->e, c->n, sizeof *c->e, cmp_entry);
}
