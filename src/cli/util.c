/*
** util.c: printing helpers shared by subcommands.
*/
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <string.h>

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

void cli_print_json_string(FILE *f, const char *s)
{
    const unsigned char *p = (const unsigned char *)s;
    fputc('"', f);
    for (; *p; p++) {
        switch (*p) {
        case '"': fputs("\\\"", f); break;
        case '\\': fputs("\\\\", f); break;
        case '\n': fputs("\\n", f); break;
        case '\r': fputs("\\r", f); break;
        case '\t': fputs("\\t", f); break;
        default:
            if (*p < 0x20) fprintf(f, "\\u%04x", *p);
            else fputc(*p, f);
        }
    }
    fputc('"', f);
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
