/*
** html.c: the evaluation as one self-contained HTML page: the summary
** tables, the plots (PNG, inline as data: URIs), the index comparison and
** the Table-1 samples with JPEG thumbnails (data: URIs). Nothing is fetched
** from the network when it opens.
*/
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <stb_image_write.h>

#include "eval/eval.h"
#include "model/image.h"

#define THUMB_SIDE 160 /* longest side of a thumbnail, pixels */

static const char *const metric_names[CDB_N_METRICS] = {"cosine", "dot", "l2"};

static void put_escaped(FILE *f, const char *s)
{
    for (; s && *s; s++) {
        switch (*s) {
        case '<': fputs("&lt;", f); break;
        case '>': fputs("&gt;", f); break;
        case '&': fputs("&amp;", f); break;
        case '"': fputs("&quot;", f); break;
        default: fputc(*s, f);
        }
    }
}

static void put_base64(FILE *f, const uint8_t *p, size_t n)
{
    static const char tab[] = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    size_t i;
    for (i = 0; i + 2 < n; i += 3) {
        uint32_t v = (uint32_t)p[i] << 16 | (uint32_t)p[i + 1] << 8 | p[i + 2];
        fputc(tab[v >> 18], f);
        fputc(tab[(v >> 12) & 63], f);
        fputc(tab[(v >> 6) & 63], f);
        fputc(tab[v & 63], f);
    }
    if (n - i == 1) {
        uint32_t v = (uint32_t)p[i] << 16;
        fprintf(f, "%c%c==", tab[v >> 18], tab[(v >> 12) & 63]);
    } else if (n - i == 2) {
        uint32_t v = (uint32_t)p[i] << 16 | (uint32_t)p[i + 1] << 8;
        fprintf(f, "%c%c%c=", tab[v >> 18], tab[(v >> 12) & 63], tab[(v >> 6) & 63]);
    }
}

typedef struct membuf {
    uint8_t *p;
    size_t n, cap;
    int failed;
} membuf;

static void mem_write(void *ctx, void *data, int size)
{
    membuf *b = ctx;
    if (b->failed || size <= 0) return;
    if (cdb_grow((void **)&b->p, &b->cap, b->n + (size_t)size, 1)) {
        b->failed = 1;
        return;
    }
    memcpy(b->p + b->n, data, (size_t)size);
    b->n += (size_t)size;
}

/* <img> of a JPEG thumbnail of the image file, or a note when it cannot be
** read (a moved file must not stop the report). */
static void put_thumb(FILE *f, const char *path)
{
    cdb_rgb img = {0};
    cdb_err e;
    uint8_t *px = NULL;
    membuf b = {0};
    int w, h;

    cdb_err_clear(&e);
    if (cdb_image_decode_file(path, THUMB_SIDE, &img, &e) != CLIPDB_OK || img.w < 1 ||
        img.h < 1) {
        fputs("<span class=missing>(image not readable: ", f);
        put_escaped(f, e.msg);
        fputs(")</span>", f);
        goto cleanup;
    }
    if (img.w >= img.h) {
        w = img.w < THUMB_SIDE ? img.w : THUMB_SIDE;
        h = (int)((double)img.h * w / img.w + 0.5);
    } else {
        h = img.h < THUMB_SIDE ? img.h : THUMB_SIDE;
        w = (int)((double)img.w * h / img.h + 0.5);
    }
    if (w < 1) w = 1;
    if (h < 1) h = 1;
    px = malloc((size_t)w * (size_t)h * 3);
    if (!px || cdb_image_resize_rgb(&img, w, h, px) != CLIPDB_OK ||
        !stbi_write_jpg_to_func(mem_write, &b, w, h, 3, px, 85) || b.failed) {
        fputs("<span class=missing>(thumbnail failed)</span>", f);
        goto cleanup;
    }
    fprintf(f, "<img class=thumb width=%d height=%d alt=\"", w, h);
    put_escaped(f, path);
    fputs("\" src=\"data:image/jpeg;base64,", f);
    put_base64(f, b.p, b.n);
    fputs("\">", f);
cleanup:
    free(b.p);
    free(px);
    cdb_rgb_free(&img);
}

static void put_dir_row(FILE *f, const char *name, const clipdb_eval_summary *s,
                        const clipdb_eval_dir *d)
{
    int i;
    fprintf(f, "<tr><td>%s</td>", name);
    for (i = 0; i < s->n_ks; i++) fprintf(f, "<td>%.4f</td>", d->recall[i]);
    fprintf(f, "<td>%g</td><td>%.2f</td><td>%lld</td><td>%lld</td></tr>\n", d->median_rank,
            d->mean_rank, (long long)d->queries, (long long)d->gallery);
}

static void put_dir_head(FILE *f, const clipdb_eval_summary *s, const char *first)
{
    int i;
    fprintf(f, "<tr><th>%s</th>", first);
    for (i = 0; i < s->n_ks; i++) fprintf(f, "<th>R@%d</th>", s->ks[i]);
    fputs("<th>median rank</th><th>mean rank</th><th>queries</th><th>gallery</th></tr>\n", f);
}

/* The page, written to f. */
static int write_html(clipdb_eval *ev, FILE *f)
{
    const cdb_eval_set *s0 = &ev->sets[0];
    const cdb_split *sp = ev->split;
    int i, j, a, rc = CLIPDB_OK;
    size_t c;

    fputs("<!DOCTYPE html>\n<html lang=en><head><meta charset=utf-8>\n<title>clipdb eval</title>\n"
          "<style>body{font-family:sans-serif;max-width:1000px;margin:1em auto;color:#222}"
          "table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ccc;"
          "padding:3px 8px;text-align:right}td.l,th.l{text-align:left}"
          ".right{color:#1a7f37;font-weight:bold}.thumb{vertical-align:middle;margin:2px}"
          ".plot{max-width:100%;border:1px solid #eee}.missing{color:#a00}"
          "small{color:#666}</style></head><body>\n",
          f);
    fputs("<h1>clipdb eval</h1>\n<p>database <code>", f);
    put_escaped(f, ev->db_path);
    fputs("</code>, model <code>", f);
    put_escaped(f, ev->n_sets > 0 && ev->sets[0].sum.model ? ev->sets[0].sum.model : ev->model);
    fputs("</code>, images <code>", f);
    put_escaped(f, ev->split_desc);
    fprintf(f,
            "</code>, %s, metric %s, captions: %s.<br>%lld images, %lld captions "
            "(%lld images without a caption, %lld captions of images outside the split "
            "excluded). Ranks count from 1; ties go to the smaller item id.</p>\n",
            ev->date, metric_names[ev->opt.metric], ev->opt.pairs_first ? "first per image" : "all",
            (long long)s0->sum.images, (long long)s0->sum.captions,
            (long long)s0->sum.images_without_captions, (long long)s0->sum.captions_outside);

    fputs("<h2>Standard protocol</h2>\n<table>", f);
    put_dir_head(f, &s0->sum, "direction");
    put_dir_row(f, "text &rarr; image", &s0->sum, &s0->sum.t2i);
    put_dir_row(f, "image &rarr; text", &s0->sum, &s0->sum.i2t);
    fprintf(f, "</table><small>scores and ranks of all queries, three metrics: %.3f s</small>\n",
            s0->sum.score_seconds);

    fputs("<h2>Hit rate within the top k</h2>\n", f);
    for (i = 0; cdb_eval_plot_names[i]; i++) {
        uint8_t *png = NULL;
        size_t n = 0;
        if (i == 2) fputs("<h2>Exact search against IVF and Faiss</h2>\n", f);
        if (i == 3) fputs("<h2>Vector sets (models) compared</h2>\n", f);
        if (i == 2 && ev->n_index_rows == 0) {
            fputs("<p>not measured (index comparison off)</p>\n", f);
            continue;
        }
        if ((rc = cdb_eval_plot_png(ev, cdb_eval_plot_names[i], &png, &n)) != CLIPDB_OK) goto cleanup;
        fprintf(f, "<p><img class=plot alt=\"%s\" src=\"data:image/png;base64,",
                cdb_eval_plot_names[i]);
        put_base64(f, png, n);
        fputs("\"></p>\n", f);
        free(png);
        if (i == 1) {
            static const int marks[] = {1, 5, 10, 50, 100, 500, 1000};
            int d, m;
            fputs("<table><tr><th class=l>direction, metric</th>", f);
            for (j = 0; j < 7; j++) fprintf(f, "<th>k=%d</th>", marks[j]);
            fputs("</tr>\n", f);
            for (d = 0; d < 2; d++) {
                int kmax = d ? s0->kmax_i2t : s0->kmax_t2i;
                for (m = 0; m <= CDB_N_METRICS; m++) {
                    const double *cv = m == CDB_N_METRICS ? (d ? ev->random_i2t : ev->random_t2i)
                                                          : (d ? s0->curve_i2t[m] : s0->curve_t2i[m]);
                    fprintf(f, "<tr><td class=l>%s, %s</td>", d ? "image &rarr; text" : "text &rarr; image",
                            m == CDB_N_METRICS ? "random" : metric_names[m]);
                    for (j = 0; j < 7; j++)
                        if (marks[j] <= kmax) fprintf(f, "<td>%.4f</td>", cv[marks[j] - 1]);
                        else fputs("<td>&ndash;</td>", f);
                    fputs("</tr>\n", f);
                }
            }
            fputs("</table>\n", f);
        }
        if (i == 2) {
            fprintf(f, "<table><tr><th class=l>index</th><th>nprobe</th><th>recall@%d vs exact</th>"
                       "<th>hit@1</th><th>hit@%d</th><th>queries/s</th><th>build s</th></tr>\n",
                    ev->opt.index_k, ev->opt.index_k);
            for (j = 0; j < ev->n_index_rows; j++) {
                const cdb_eval_index_row *r = &ev->index_rows[j];
                fprintf(f, "<tr><td class=l>%s</td><td>%d</td><td>%.4f</td><td>%.4f</td>"
                           "<td>%.4f</td><td>%.0f</td><td>%.3f</td></tr>\n",
                        r->kind, r->nprobe, r->recall, r->hit1, r->hitk, r->qps, r->build_s);
            }
            fputs("</table>", f);
            if (ev->index_note) {
                fputs("<p>", f);
                put_escaped(f, ev->index_note);
                fputs("</p>", f);
            }
        }
        if (i == 3) {
            fputs("<table>", f);
            put_dir_head(f, &s0->sum, "vector set, direction");
            for (j = 0; j < ev->n_sets; j++) {
                char name[160];
                snprintf(name, sizeof name, "%.100s, text &rarr; image", ev->sets[j].name);
                put_dir_row(f, name, &ev->sets[j].sum, &ev->sets[j].sum.t2i);
                snprintf(name, sizeof name, "%.100s, image &rarr; text", ev->sets[j].name);
                put_dir_row(f, name, &ev->sets[j].sum, &ev->sets[j].sum.i2t);
            }
            fputs("</table>\n", f);
        }
    }
    fputs("<h2>CPU against GPU</h2><p>not measured: this build has no GPU backend.</p>\n", f);

    fputs("<h2>Samples (as the paper's Table 1)</h2>\n<h3>Images &rarr; top captions</h3>\n"
          "<table><tr><th class=l>image</th><th class=l>ground truth</th>"
          "<th class=l>top retrieved captions (right ones in green)</th></tr>\n",
          f);
    for (i = 0; i < ev->n_samples_i2t; i++) {
        const cdb_eval_sample *s = &ev->samples_i2t[i];
        fputs("<tr><td class=l>", f);
        put_thumb(f, sp->image_paths[s->query]);
        fputs("</td><td class=l>", f);
        for (c = 0; c < sp->n_captions; c++)
            if (ev->cap_img[c] == s->query) {
                put_escaped(f, sp->caption_texts[c]);
                fputs("<br>", f);
            }
        fputs("</td><td class=l><ol>", f);
        for (a = 0; a < s->n_top; a++) {
            fprintf(f, "<li%s>", s->right[a] ? " class=right" : "");
            put_escaped(f, sp->caption_texts[s->top[a]]);
            fprintf(f, " <small>(%.4f)</small></li>", s->score[a]);
        }
        fputs("</ol></td></tr>\n", f);
    }
    fputs("</table>\n<h3>Captions &rarr; top images</h3>\n<table><tr><th class=l>caption</th>"
          "<th class=l>ground truth</th><th class=l>top retrieved images (right one marked "
          "&#10004;)</th></tr>\n",
          f);
    for (i = 0; i < ev->n_samples_t2i; i++) {
        const cdb_eval_sample *s = &ev->samples_t2i[i];
        fputs("<tr><td class=l>", f);
        put_escaped(f, sp->caption_texts[s->query]);
        fputs("</td><td class=l>", f);
        put_thumb(f, sp->image_paths[ev->cap_img[s->query]]);
        fputs("</td><td class=l>", f);
        for (a = 0; a < s->n_top; a++) {
            put_thumb(f, sp->image_paths[s->top[a]]);
            if (s->right[a]) fputs("<span class=right>&#10004;</span>", f);
        }
        fputs("</td></tr>\n", f);
    }
    fputs("</table>\n</body></html>\n", f);
cleanup:
    return rc;
}

int clipdb_eval_write_html(clipdb_eval *ev, const char *path)
{
    FILE *f;
    int rc;
    if (!ev || !path) return CLIPDB_EINVAL;
    if (ev->n_sets < 1) return cdb_err_set(&ev->err, CLIPDB_EINVAL, "no results to write");
    if (!(f = fopen(path, "w")))
        return cdb_err_set(&ev->err, CLIPDB_EIO, "cannot write %s: %s", path, strerror(errno));
    rc = write_html(ev, f);
    if (fclose(f) != 0 && rc == CLIPDB_OK)
        rc = cdb_err_set(&ev->err, CLIPDB_EIO, "writing %s: %s", path, strerror(errno));
    return rc;
}

int clipdb_eval_html(clipdb_eval *ev, char **html, size_t *len)
{
    FILE *f;
    char *buf = NULL;
    size_t n = 0;
    int rc;
    if (html) *html = NULL;
    if (len) *len = 0;
    if (!ev || !html) return CLIPDB_EINVAL;
    if (ev->n_sets < 1) return cdb_err_set(&ev->err, CLIPDB_EINVAL, "no results to write");
    if (!(f = open_memstream(&buf, &n))) return cdb_err_set(&ev->err, CLIPDB_ENOMEM, "out of memory");
    rc = write_html(ev, f);
    if (fclose(f) != 0 && rc == CLIPDB_OK)
        rc = cdb_err_set(&ev->err, CLIPDB_ENOMEM, "out of memory writing the report");
    if (rc != CLIPDB_OK) {
        free(buf);
        return rc;
    }
    *html = buf;
    if (len) *len = n;
    return CLIPDB_OK;
}
