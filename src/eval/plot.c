/*
** plot.c: the evaluation's plots, drawn with PLplot (cairo driver: pngcairo
** and svgcairo). PLplot keeps global state: one plot at a time per process
** (the CLI and the server's eval handler draw from one thread).
**   hit_rate_t2i / hit_rate_i2t: hit rate within the top k against log k,
**       one line per metric, the random baseline dashed;
**   index_speed: queries per second (log) against recall of the exact top k,
**       one line per index over nprobe;
**   models: hit-rate curves of every vector set (both directions).
*/
#include <errno.h>
#include <math.h>
#include <plplot.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "eval/eval.h"

/* fontconfig (through cairo) keeps a process-wide font cache and libltdl the
** loaded PLplot drivers, never freed; under LeakSanitizer those would fail
** every run, so leak tracking pauses while PLplot draws (no clipdb memory is
** allocated between begin() and end()). */
#if defined(__SANITIZE_ADDRESS__)
#include <sanitizer/lsan_interface.h>
#define PLOT_LSAN_OFF() __lsan_disable()
#define PLOT_LSAN_ON() __lsan_enable()
/* Pango initialises fontconfig on a thread of its own, which the pause
** above does not cover: fontconfig's cache is listed as a known leak. */
__attribute__((visibility("default"))) const char *__lsan_default_suppressions(void);
const char *__lsan_default_suppressions(void)
{
    return "leak:libfontconfig.so\n";
}
#else
#define PLOT_LSAN_OFF() ((void)0)
#define PLOT_LSAN_ON() ((void)0)
#endif

const char *const cdb_eval_plot_names[] = {"hit_rate_t2i", "hit_rate_i2t", "index_speed",
                                           "models", NULL};

#define MAX_LINES 16
#define POINT_SYMBOL "\xe2\x97\x8f" /* U+25CF BLACK CIRCLE, the same in plot and legend */

/* Colours of cmap0 used for lines (index 0 is the white background, 1 the
** black frame and text). */
static void set_palette(void)
{
    static const int rgb[][3] = {{255, 255, 255}, {0, 0, 0},      {31, 119, 180},
                                 {214, 39, 40},   {44, 160, 44},  {128, 128, 128},
                                 {148, 103, 189}, {255, 127, 14}, {140, 86, 75}};
    int i;
    plscmap0n(16);
    for (i = 0; i < (int)(sizeof rgb / sizeof rgb[0]); i++) plscol0(i, rgb[i][0], rgb[i][1], rgb[i][2]);
}

/* PLplot's fatal errors would call exit(): turn them into a return. */
static int on_plplot_exit(PLCHAR_VECTOR msg)
{
    (void)msg;
    return 0;
}

typedef struct line {
    const char *label;
    int n;
    const double *x, *y; /* x already in plot units (log10 k where the axis is log) */
    int colour, style;   /* style 1 solid, 2 dashed */
    int points;          /* 1: also mark the points */
} line;

static void begin(const char *dev, const char *file)
{
    PLOT_LSAN_OFF();
    plsexit(on_plplot_exit);
    plsdev(dev);
    plsfnam(file);
    plsetopt("geometry", "900x600");
    set_palette();
    plinit();
    pladv(0);
    plschr(0, 1.0);
    plvpor(0.11, 0.96, 0.11, 0.90);
}

static void end(void)
{
    plend();
    PLOT_LSAN_ON();
}

/* One chart: axes, labels, lines and the legend at `pos`. */
static void chart(double x0, double x1, double y0, double y1, const char *xopt,
                  const char *yopt, const char *xlabel, const char *ylabel, const char *title,
                  const line *ls, int nl, int pos)
{
    PLINT opts[MAX_LINES], lcol[MAX_LINES], lsty[MAX_LINES], tcol[MAX_LINES], scol[MAX_LINES],
        snum[MAX_LINES], zero[MAX_LINES];
    PLFLT lw[MAX_LINES], ss[MAX_LINES], zf[MAX_LINES];
    const char *text[MAX_LINES], *sym[MAX_LINES];
    PLFLT w, h;
    int i;

    plwind(x0, x1, y0, y1);
    plcol0(1);
    plwidth(1);
    plbox(xopt, 0, 0, yopt, 0, 0);
    pllab(xlabel, ylabel, title);
    for (i = 0; i < nl && i < MAX_LINES; i++) {
        plcol0(ls[i].colour);
        pllsty(ls[i].style);
        plwidth(2.0);
        if (ls[i].n > 1) plline(ls[i].n, ls[i].x, ls[i].y);
        if (ls[i].points) plstring(ls[i].n, ls[i].x, ls[i].y, POINT_SYMBOL);
        opts[i] = PL_LEGEND_LINE | (ls[i].points ? PL_LEGEND_SYMBOL : 0);
        lcol[i] = scol[i] = ls[i].colour;
        lsty[i] = ls[i].style;
        tcol[i] = 1;
        lw[i] = 2.0;
        ss[i] = 1.0;
        snum[i] = 1;
        zero[i] = 0;
        zf[i] = 0;
        text[i] = ls[i].label;
        sym[i] = POINT_SYMBOL;
    }
    pllsty(1);
    plwidth(1);
    if (nl > 0)
        pllegend(&w, &h, PL_LEGEND_BACKGROUND | PL_LEGEND_BOUNDING_BOX, pos | PL_POSITION_INSIDE,
                 0.02, 0.02, 0.08, 0, 1, 1, 0, 0, nl < MAX_LINES ? nl : MAX_LINES, opts, 1.0,
                 0.9, 2.0, 0.0, tcol, text, zero, zero, zf, zf, lcol, lsty, lw, scol, ss, snum,
                 sym);
}

/* x = log10(k) for k = 1 .. n */
static double *log_ks(int n)
{
    double *x = cdb_malloc_array((size_t)(n > 0 ? n : 1), sizeof *x);
    int k;
    for (k = 1; x && k <= n; k++) x[k - 1] = log10((double)k);
    return x;
}

static const char *const metric_label[CDB_N_METRICS] = {"cosine", "dot product", "L2"};

static int draw(clipdb_eval *ev, const char *name, const char *dev, const char *file)
{
    const cdb_eval_set *s0 = &ev->sets[0];
    line ls[MAX_LINES];
    double *x = NULL, *xi = NULL, *bx[3] = {0}, *by[3] = {0};
    char title[256];
    int nl = 0, m, i, rc = CLIPDB_OK, nprobe_rows = 0;

    if (!strcmp(name, "hit_rate_t2i") || !strcmp(name, "hit_rate_i2t")) {
        int t2i = name[9] == 't', kmax = t2i ? s0->kmax_t2i : s0->kmax_i2t;
        if (!(x = log_ks(kmax))) return CLIPDB_ENOMEM;
        for (m = 0; m < CDB_N_METRICS; m++)
            ls[nl++] = (line){metric_label[m], kmax, x, t2i ? s0->curve_t2i[m] : s0->curve_i2t[m],
                              2 + m, 1, 0};
        ls[nl++] = (line){t2i ? "random (k/N)" : "random (m right of N)", kmax, x,
                          t2i ? ev->random_t2i : ev->random_i2t, 5, 2, 0};
        snprintf(title, sizeof title, "%s: right %s within the top k (%lld %s; %s)",
                 t2i ? "text -> image" : "image -> text", t2i ? "image" : "caption",
                 (long long)(t2i ? s0->sum.images : s0->sum.captions),
                 t2i ? "images" : "captions", ev->split_desc);
        begin(dev, file);
        chart(0, log10((double)(kmax > 1 ? kmax : 2)), 0, 1.02, "bclnst", "bcnstv",
              "k (log scale)", "hit rate within top k", title, ls, nl,
              PL_POSITION_LEFT | PL_POSITION_TOP);
        end();
    } else if (!strcmp(name, "index_speed")) {
        /* one line per kind: x recall, y log10 q/s */
        static const char *const kinds[3] = {"exact", "ivf", "faiss"};
        static const char *const labels[3] = {"exact (flat)", "clipdb IVF (nprobe 1..)",
                                              "Faiss IVF,Flat (nprobe 1..)"};
        double ymin = 1e300, ymax = -1e300;
        for (m = 0; m < 3; m++) {
            int n = 0;
            bx[m] = cdb_malloc_array((size_t)ev->n_index_rows + 1, sizeof(double));
            by[m] = cdb_malloc_array((size_t)ev->n_index_rows + 1, sizeof(double));
            if (!bx[m] || !by[m]) {
                rc = CLIPDB_ENOMEM;
                goto cleanup;
            }
            for (i = 0; i < ev->n_index_rows; i++) {
                const cdb_eval_index_row *r = &ev->index_rows[i];
                if (strcmp(r->kind, kinds[m])) continue;
                bx[m][n] = r->recall;
                by[m][n] = log10(r->qps > 0 ? r->qps : 1e-3);
                if (by[m][n] < ymin) ymin = by[m][n];
                if (by[m][n] > ymax) ymax = by[m][n];
                n++;
            }
            if (n) ls[nl++] = (line){labels[m], n, bx[m], by[m], 2 + m, 1, 1};
        }
        nprobe_rows = 1;
        if (nl == 0) {
            ymin = 0;
            ymax = 1;
        }
        snprintf(title, sizeof title,
                 "indexes: speed vs recall of the exact top %d (%zu text queries, nlist %d)",
                 ev->opt.index_k, ev->split->n_captions, ev->index_nlist);
        begin(dev, file);
        chart(0, 1.02, floor(ymin - 0.2), ceil(ymax + 0.2), "bcnst", "bclnstv",
              "recall against exact search", "queries per second (log scale)", title, ls, nl,
              PL_POSITION_LEFT | PL_POSITION_BOTTOM);
        /* each point labelled with its nprobe */
        plschr(0, 0.75);
        for (i = 0; nprobe_rows && i < ev->n_index_rows; i++) {
            const cdb_eval_index_row *r = &ev->index_rows[i];
            char lab[16];
            if (!r->nprobe) continue;
            plcol0(!strcmp(r->kind, "ivf") ? 3 : 4);
            snprintf(lab, sizeof lab, "%d", r->nprobe);
            plptex(r->recall - 0.012, log10(r->qps > 0 ? r->qps : 1e-3), 1, 0, 1.0, lab);
        }
        end();
    } else if (!strcmp(name, "models")) {
        int kt = s0->kmax_t2i, ki = s0->kmax_i2t;
        if (!(x = log_ks(kt)) || !(xi = log_ks(ki))) {
            rc = CLIPDB_ENOMEM;
            goto cleanup;
        }
        for (i = 0; i < ev->n_sets && nl + 2 < MAX_LINES; i++) {
            static char lab[MAX_LINES][96];
            const cdb_eval_set *s = &ev->sets[i];
            snprintf(lab[nl], sizeof lab[nl], "%s: text -> image", s->name);
            ls[nl] = (line){lab[nl], kt, x, s->curve_t2i[ev->opt.metric], 2 + (i % 4) * 2, 1, 0};
            nl++;
            snprintf(lab[nl], sizeof lab[nl], "%s: image -> text", s->name);
            ls[nl] = (line){lab[nl], ki, xi, s->curve_i2t[ev->opt.metric], 3 + (i % 4) * 2, 1, 0};
            nl++;
        }
        ls[nl++] = (line){"random (k/N images)", kt, x, ev->random_t2i, 5, 2, 0};
        snprintf(title, sizeof title, "vector sets compared (%s; %s)",
                 metric_label[ev->opt.metric], ev->split_desc);
        begin(dev, file);
        chart(0, log10((double)((kt > ki ? kt : ki) > 1 ? (kt > ki ? kt : ki) : 2)), 0, 1.02,
              "bclnst", "bcnstv", "k (log scale)", "hit rate within top k", title, ls, nl,
              PL_POSITION_LEFT | PL_POSITION_TOP);
        end();
    } else {
        rc = CLIPDB_EINVAL;
    }
cleanup:
    free(x);
    free(xi);
    for (m = 0; m < 3; m++) {
        free(bx[m]);
        free(by[m]);
    }
    return rc;
}

/* Checks that file can be written before PLplot tries (its driver would
** only print a warning). */
static int writable(clipdb_eval *ev, const char *file)
{
    FILE *f = fopen(file, "wb");
    if (!f)
        return cdb_err_set(&ev->err, CLIPDB_EIO, "cannot write %s: %s", file, strerror(errno));
    fclose(f);
    return CLIPDB_OK;
}

int cdb_eval_plots(clipdb_eval *ev, const char *dir, int png, int svg)
{
    int i, f, rc = CLIPDB_OK;
    char *file = NULL;

    if (!ev || !dir || (!png && !svg)) return CLIPDB_EINVAL;
    if (ev->n_sets < 1) return cdb_err_set(&ev->err, CLIPDB_EINVAL, "no results to plot");
    if (mkdir(dir, 0777) != 0 && errno != EEXIST)
        return cdb_err_set(&ev->err, CLIPDB_EIO, "cannot create %s: %s", dir, strerror(errno));
    for (i = 0; cdb_eval_plot_names[i]; i++) {
        for (f = 0; f < 2; f++) {
            if (!(f ? svg : png)) continue;
            free(file);
            file = cdb_sprintf("%s/%s.%s", dir, cdb_eval_plot_names[i], f ? "svg" : "png");
            if (!file) return cdb_err_set(&ev->err, CLIPDB_ENOMEM, "out of memory");
            if ((rc = writable(ev, file)) != CLIPDB_OK) goto cleanup;
            if ((rc = draw(ev, cdb_eval_plot_names[i], f ? "svgcairo" : "pngcairo", file)) !=
                CLIPDB_OK) {
                cdb_err_set(&ev->err, rc, "plot %s failed", file);
                goto cleanup;
            }
        }
    }
cleanup:
    free(file);
    return rc;
}

int clipdb_eval_write_plots(clipdb_eval *ev, const char *dir, int png, int svg)
{
    return cdb_eval_plots(ev, dir, png, svg);
}

int cdb_eval_plot_png(clipdb_eval *ev, const char *name, uint8_t **buf, size_t *len)
{
    char dir[] = "/tmp/clipdb-plot-XXXXXX", *file = NULL, *data = NULL;
    int rc;

    *buf = NULL;
    *len = 0;
    if (!mkdtemp(dir))
        return cdb_err_set(&ev->err, CLIPDB_EIO, "cannot create a temporary folder: %s",
                           strerror(errno));
    file = cdb_sprintf("%s/%s.png", dir, name);
    if (!file) {
        rc = cdb_err_set(&ev->err, CLIPDB_ENOMEM, "out of memory");
        goto cleanup;
    }
    if ((rc = writable(ev, file)) != CLIPDB_OK) goto cleanup;
    if ((rc = draw(ev, name, "pngcairo", file)) != CLIPDB_OK) {
        cdb_err_set(&ev->err, rc, "plot %s failed", name);
        goto cleanup;
    }
    if ((rc = cdb_read_file(file, (size_t)64 << 20, &data, len, &ev->err)) != CLIPDB_OK)
        goto cleanup;
    *buf = (uint8_t *)data;
cleanup:
    if (file) unlink(file);
    rmdir(dir);
    free(file);
    return rc;
}
