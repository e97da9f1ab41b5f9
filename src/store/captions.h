/*
** captions.h: parsers of captions files (outside input: bounded, fuzzed).
**   JSON lines, one object per image, as ../shared/data/coco-subset/captions.jsonl:
**     {"image": "a.jpg", "captions": ["...", ...], <other fields: metadata>}
**   COCO captions_*.json:
**     {"images": [{"id": 1, "file_name": "a.jpg"}, ...],
**      "annotations": [{"image_id": 1, "caption": "..."}, ...]}
**   CSV (RFC 4180, header row): columns image and caption; other columns
**     become metadata (strings).
** The format is detected from the content (a .csv name means CSV).
*/
#ifndef CDB_CAPTIONS_H
#define CDB_CAPTIONS_H

#include "core/core.h"

#define CDB_CAPTIONS_MAX_FILE  ((size_t)1 << 30) /* 1 GiB */
#define CDB_CAPTIONS_MAX_NAME  4096              /* bytes of an image name */
#define CDB_CAPTIONS_MAX_PER_IMAGE 10000

typedef struct cdb_caption_entry {
    char *image;         /* file name relative to the images folder */
    char **captions;     /* n_captions, in file order */
    size_t n_captions, cap_captions;
    size_t *lines;       /* n_captions: the line (COCO: the annotation) of each */
    size_t cap_lines;
    char *meta_json;     /* a JSON object of the other fields, or NULL */
    int used;            /* free for the caller (ingest marks matches) */
} cdb_caption_entry;

typedef struct cdb_captions {
    cdb_caption_entry *e; /* n, sorted by image, one entry per image */
    size_t n;
    size_t n_captions;    /* total */
    const char *format;   /* "jsonl", "coco" or "csv" */
} cdb_captions;

/* Parses len bytes (data[len] must be readable and NUL) of a captions file;
** name is used in messages ("NAME:LINE: reason") and for the .csv rule.
** *out (free with cdb_captions_free) is set on success. */
int cdb_captions_parse(const char *data, size_t len, const char *name,
                       cdb_captions **out, cdb_err *e);
/* Reads and parses the file at path. */
int cdb_captions_load(const char *path, cdb_captions **out, cdb_err *e);
/* The entry of image name, or NULL. */
cdb_caption_entry *cdb_captions_find(cdb_captions *c, const char *image);
void cdb_captions_free(cdb_captions *c);

#endif
