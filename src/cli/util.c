/*
** util.c: helpers shared by subcommands: messages, option values, JSON
** printing, the progress printer.
*/
#include <errno.h>
#include <fcntl.h>
#include <math.h>
#include <stdarg.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "cli/cli.h"

int cli_fail(const char *cmd, const char *fmt, ...)
{
    va_list ap;
    fprintf(stderr, "clipdb %s: ", cmd);
    va_start(ap, fmt);
    vfprintf(stderr, fmt, ap);
    va_end(ap);
    fputc('\n', stderr);
    return CLI_FAIL;
}

int cli_usage(const char *cmd, const char *fmt, ...)
{
    va_list ap;
    fprintf(stderr, "clipdb %s: ", cmd);
    va_start(ap, fmt);
    vfprintf(stderr, fmt, ap);
    va_end(ap);
    fprintf(stderr, "\ntry 'clipdb %s --help'\n", cmd);
    return CLI_USAGE;
}

int cli_wants_help(int argc, char **argv)
{
    int i;
    for (i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--")) break;
        if (!strcmp(argv[i], "-h") || !strcmp(argv[i], "--help")) return 1;
    }
    return 0;
}

void cli_print_floats_json(FILE *f, const float *v, int n)
{
    int i;
    fputc('[', f);
    for (i = 0; i < n; i++) {
        if (i) fputc(',', f);
        if (isfinite(v[i])) fprintf(f, "%.9g", (double)v[i]);
        else fputs("null", f);
    }
    fputc(']', f);
}

/* Length of the valid UTF-8 sequence at p (RFC 3629: no overlong forms, no
** surrogates, nothing above U+10FFFF), or 0 when it is not one. */
static int utf8_len(const unsigned char *p)
{
    if (p[0] < 0x80) return 1;
    if (p[0] >= 0xc2 && p[0] <= 0xdf) return (p[1] & 0xc0) == 0x80 ? 2 : 0;
    if (p[0] >= 0xe0 && p[0] <= 0xef) {
        unsigned lo = p[0] == 0xe0 ? 0xa0 : 0x80, hi = p[0] == 0xed ? 0x9f : 0xbf;
        return p[1] >= lo && p[1] <= hi && (p[2] & 0xc0) == 0x80 ? 3 : 0;
    }
    if (p[0] >= 0xf0 && p[0] <= 0xf4) {
        unsigned lo = p[0] == 0xf0 ? 0x90 : 0x80, hi = p[0] == 0xf4 ? 0x8f : 0xbf;
        return p[1] >= lo && p[1] <= hi && (p[2] & 0xc0) == 0x80 && (p[3] & 0xc0) == 0x80 ? 4
                                                                                         : 0;
    }
    return 0;
}

/* Prints s with control characters escaped (json: as JSON escapes) and each
** byte that is not part of valid UTF-8 replaced by U+FFFD, so that the
** output is valid UTF-8 and one record stays on one line. */
static void print_escaped(FILE *f, const char *s, int json)
{
    const unsigned char *p = (const unsigned char *)s;
    int n;
    while (*p) {
        switch (*p) {
        case '"': fputs(json ? "\\\"" : "\"", f); break;
        case '\\': fputs(json ? "\\\\" : "\\", f); break;
        case '\n': fputs("\\n", f); break;
        case '\r': fputs("\\r", f); break;
        case '\t': fputs(json ? "\\t" : "\t", f); break;
        default:
            if (*p < 0x20 || *p == 0x7f) {
                fprintf(f, "\\u%04x", *p);
            } else if ((n = utf8_len(p)) > 0) {
                fwrite(p, 1, (size_t)n, f);
                p += n;
                continue;
            } else {
                fputs(json ? "\\ufffd" : "\xef\xbf\xbd", f);
            }
        }
        p++;
    }
}

void cli_print_json_string(FILE *f, const char *s)
{
    fputc('"', f);
    print_escaped(f, s, 1);
    fputc('"', f);
}

void cli_print_plain(FILE *f, const char *s)
{
    print_escaped(f, s, 0);
}

void cli_print_json_number(FILE *f, double v)
{
    if (isfinite(v)) fprintf(f, "%.9g", v);
    else fputs("null", f);
}

int cli_parse_precision(const char *cmd, const char *s, clipdb_precision *out)
{
    if (clipdb_precision_parse(s, out) != CLIPDB_OK)
        return cli_usage(cmd, "--precision must be fp32, bf16 or int8, not '%s'", s);
    return CLI_OK;
}

int cli_open_model(const char *cmd, const char *dir, clipdb_precision prec, clipdb_model **out)
{
    int rc = clipdb_model_open_precision(out, dir, prec);
    if (rc != CLIPDB_OK) {
        cli_fail(cmd, "%s", *out ? clipdb_model_errmsg(*out) : "out of memory");
        clipdb_model_close(*out);
        *out = NULL;
        return CLI_FAIL;
    }
    return CLI_OK;
}

int cli_open_db(const char *cmd, const char *path, const clipdb_db_options *opt, clipdb_db **out)
{
    int rc = clipdb_db_open(out, path, opt);
    if (rc == CLIPDB_OK) return CLI_OK;
    /* the library names the file and the reason; the CLI adds what to type */
    if (rc == CLIPDB_ENOTFOUND && (!opt || !opt->create))
        cli_fail(cmd, "%s; create one with 'clipdb init %s --model DIR'", clipdb_db_errmsg(*out),
                 path);
    else cli_fail(cmd, "%s", clipdb_db_errmsg(*out));
    clipdb_db_close(*out);
    *out = NULL;
    return CLI_FAIL;
}

/* ---- option values ----------------------------------------------------------- */

int cli_parse_int(const char *cmd, const char *opt, const char *s, long long lo, long long hi,
                  long long *out)
{
    char *end;
    long long v;
    errno = 0;
    v = strtoll(s, &end, 10);
    if (errno || end == s || *end || v < lo || v > hi)
        return cli_usage(cmd, "%s needs a whole number from %lld to %lld, not '%s'", opt, lo, hi,
                         s);
    *out = v;
    return CLI_OK;
}

int cli_parse_double(const char *cmd, const char *opt, const char *s, double lo, double hi,
                     double *out)
{
    char *end;
    double v;
    errno = 0;
    v = strtod(s, &end);
    if (errno || end == s || *end || !(v >= lo && v <= hi))
        return cli_usage(cmd, "%s needs a number from %g to %g, not '%s'", opt, lo, hi, s);
    *out = v;
    return CLI_OK;
}

int cli_parse_target(const char *cmd, const char *s, int *target)
{
    if (!strcmp(s, "image")) *target = CLIPDB_ITEM_IMAGE;
    else if (!strcmp(s, "text")) *target = CLIPDB_ITEM_TEXT;
    else return cli_usage(cmd, "--target is image or text, not '%s'", s);
    return CLI_OK;
}

/* ---- progress ------------------------------------------------------------------ */

static void amount(char *buf, size_t cap, double v, int bytes)
{
    static const char *const unit[] = {"B", "KiB", "MiB", "GiB", "TiB"};
    int u = 0;
    if (!bytes) {
        snprintf(buf, cap, "%.0f", v);
        return;
    }
    while (v >= 1024.0 && u < 4) {
        v /= 1024.0;
        u++;
    }
    snprintf(buf, cap, u ? "%.1f %s" : "%.0f %s", v, unit[u]);
}

void cli_progress_draw(cli_progress *p, const char *label, int64_t done, int64_t total,
                       double rate, int bytes, const char *note, int final)
{
    char d[32], t[32], r[32], eta[32] = "";
    int pct = total > 0 ? (int)(100.0 * (double)done / (double)total) : -1;
    if (!note) note = "";
    amount(d, sizeof d, (double)done, bytes);
    amount(t, sizeof t, (double)(total > 0 ? total : 0), bytes);
    if (bytes) amount(r, sizeof r, rate, 1);
    else snprintf(r, sizeof r, "%.1f", rate);
    if (total > 0 && rate > 0 && done < total) {
        long s = (long)((double)(total - done) / rate + 0.5);
        snprintf(eta, sizeof eta, "ETA %ld:%02ld", s / 60, s % 60);
    }
    if (p->tty) {
        /* one line redrawn in place; \033[K clears what a longer line left */
        fprintf(stderr, "\r%-20s", label);
        if (pct >= 0) {
            char bar[21];
            int i, fill = pct * 20 / 100;
            for (i = 0; i < 20; i++) bar[i] = i < fill ? '#' : '.';
            bar[20] = '\0';
            fprintf(stderr, " [%s] %3d%%  %s/%s", bar, pct, d, t);
        } else {
            fprintf(stderr, " %s", d);
        }
        fprintf(stderr, "  %s/s%s%s%s%s\033[K", r, eta[0] ? "  " : "", eta, note[0] ? "  " : "",
                note);
        p->open_line = !final;
        if (final) fputc('\n', stderr);
    } else {
        fprintf(stderr, "%s: %s", label, d);
        if (pct >= 0) fprintf(stderr, "/%s (%d%%)", t, pct);
        fprintf(stderr, ", %s/s%s%s%s%s\n", r, eta[0] ? ", " : "", eta, note[0] ? ", " : "", note);
    }
    fflush(stderr);
}

void cli_progress_break(cli_progress *p)
{
    if (p->open_line) fputc('\n', stderr);
    p->open_line = 0;
}

FILE *cli_fopen_regular(const char *cmd, const char *path)
{
    struct stat st;
    FILE *f;
    int flags, fd = open(path, O_RDONLY | O_NONBLOCK | O_CLOEXEC);
    if (fd < 0) {
        cli_fail(cmd, "%s: %s", path, strerror(errno));
        return NULL;
    }
    /* The type is checked before any read: a FIFO opened without
    ** O_NONBLOCK waits for a writer forever. */
    if (fstat(fd, &st) != 0 || !S_ISREG(st.st_mode)) {
        cli_fail(cmd, "%s: not a regular file", path);
        close(fd);
        return NULL;
    }
    flags = fcntl(fd, F_GETFL);
    if (flags < 0 || fcntl(fd, F_SETFL, flags & ~O_NONBLOCK) != 0 || !(f = fdopen(fd, "rb"))) {
        cli_fail(cmd, "%s: %s", path, strerror(errno));
        close(fd);
        return NULL;
    }
    return f;
}

static volatile sig_atomic_t interrupted;

static void on_sigint(int sig)
{
    (void)sig;
    interrupted = 1;
    signal(SIGINT, SIG_DFL); /* a second Ctrl-C ends the process at once */
}

void cli_catch_sigint(void)
{
    interrupted = 0;
    signal(SIGINT, on_sigint);
}

int cli_interrupted(void)
{
    return interrupted;
}

int cli_parse_device(const char *cmd, const char *spec, clipdb_device *dev,
                     clipdb_precision *vec_prec)
{
    char *msg = NULL;
    int rc;
    if (clipdb_device_parse(spec, dev, vec_prec) != CLIPDB_OK)
        return cli_usage(cmd, "--device is cpu, cuda or auto (optionally :fp32, :fp16 or :bf16), "
                              "not '%s'", spec);
    if (clipdb_device_resolve(*dev, dev, &msg) != CLIPDB_OK) {
        rc = cli_fail(cmd, "--device %s: %s", spec, msg ? msg : "no CUDA device");
        clipdb_free(msg);
        return rc;
    }
    return CLI_OK;
}
