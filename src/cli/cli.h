/*
** cli.h: the subcommand table's entry type and the few helpers shared by
** subcommands. The CLI parses and prints; every decision lives in the
** library behind include/clipdb.h.
*/
#ifndef CDB_CLI_H
#define CDB_CLI_H

#include <stdio.h>

#include "clipdb.h"

/* A numeric macro as a string literal, for help texts: CLI_STR(CLIPDB_TEXT_CONTEXT). */
#define CLI_STR_(x) #x
#define CLI_STR(x) CLI_STR_(x)

/* Exit codes of the clipdb binary. */
#define CLI_OK    0
#define CLI_FAIL  1   /* the operation failed; a one-line message is on stderr */
#define CLI_USAGE 2   /* bad command line */
#define CLI_INTERRUPTED 130 /* stopped by Ctrl-C with its work kept (128 + SIGINT) */

typedef struct cli_cmd {
    const char *name;
    const char *summary;     /* one line, for `clipdb --help` */
    const char *help;        /* full text for `clipdb NAME --help` */
    int (*run)(int argc, char **argv); /* argv[0] is NAME */
} cli_cmd;

/* Prints "clipdb NAME: message" on stderr; returns CLI_FAIL. */
int cli_fail(const char *cmd, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
/* Prints "clipdb NAME: message" and "try 'clipdb NAME --help'"; returns CLI_USAGE. */
int cli_usage(const char *cmd, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
/* Returns 1 if argv holds -h or --help (the caller then prints its help). */
int cli_wants_help(int argc, char **argv);
/* Prints a float vector as a JSON array with enough digits to round-trip. */
void cli_print_floats_json(FILE *f, const float *v, int n);
/* Prints s as a JSON string (quoted, escaped). */
void cli_print_json_string(FILE *f, const char *s);
/* s for plain output: control characters escaped (\n, \u0001, ...) and
** invalid UTF-8 replaced by U+FFFD, so one record stays one line. */
void cli_print_plain(FILE *f, const char *s);
/* A JSON number; null when v is not finite (JSON has no inf or NaN). */
void cli_print_json_number(FILE *f, double v);

/* ---- option values (util.c): each prints its own usage error ---- */

/* s, a whole decimal number from lo to hi, into *out (errno is reset before
** strtoll). A bad value prints "OPT needs a whole number from LO to HI, not
** 'S'" and returns CLI_USAGE; else CLI_OK. */
int cli_parse_int(const char *cmd, const char *opt, const char *s, long long lo, long long hi,
                  long long *out);
/* The same for a decimal number (e.g. seconds). */
int cli_parse_double(const char *cmd, const char *opt, const char *s, double lo, double hi,
                     double *out);
/* "image" or "text" -> CLIPDB_ITEM_IMAGE / CLIPDB_ITEM_TEXT (--target). */
int cli_parse_target(const char *cmd, const char *s, int *target);

/* ---- the one progress printer (util.c) ---- */

/* On a terminal one line redrawn in place:
**   LABEL  [#########...........]  45%  DONE/TOTAL  RATE/s  ETA m:ss  NOTE
** else (a log) one plain line per call:
**   LABEL: DONE/TOTAL (45%), RATE/s, ETA m:ss, NOTE
** Amounts are counts, or bytes shown as KiB/MiB/... when `bytes`; total < 0
** is unknown (no bar, percentage or ETA). final ends the line. */
typedef struct cli_progress {
    int tty;        /* stderr is a terminal */
    int open_line;  /* a redrawn line is on screen without its newline */
} cli_progress;
void cli_progress_draw(cli_progress *p, const char *label, int64_t done, int64_t total,
                       double rate, int bytes, const char *note, int final);
/* Ends a redrawn line (before printing anything else on stderr). */
void cli_progress_break(cli_progress *p);

/* Ctrl-C as a request to stop (train, finetune, reembed): after
** cli_catch_sigint the first SIGINT sets the flag cli_interrupted() returns;
** a second one ends the process at once. */
void cli_catch_sigint(void);
int cli_interrupted(void);

/* Opens a model with an encoder precision or prints the error; returns
** CLI_OK or CLI_FAIL. */
int cli_open_model(const char *cmd, const char *dir, clipdb_precision prec, clipdb_model **out);
/* Parses a --precision value (fp32, bf16, int8) or prints usage (CLI_USAGE). */
int cli_parse_precision(const char *cmd, const char *s, clipdb_precision *out);
/* fopen(path, "rb") for a regular file only, without blocking on a FIFO or
** a device; on failure prints "clipdb CMD: PATH: reason" and returns NULL. */
FILE *cli_fopen_regular(const char *cmd, const char *path);

/* Opens a database or prints the error (with a hint of what to type);
** returns CLI_OK or CLI_FAIL (then *out is NULL). */
int cli_open_db(const char *cmd, const char *path, const clipdb_db_options *opt, clipdb_db **out);

/* --device SPEC (embed, add, search; the lead wires eval and serve): parses
** SPEC ("cpu", "cuda", "auto", optionally ":fp32|fp16|bf16") and resolves
** auto; returns CLI_USAGE for a bad SPEC, CLI_FAIL (one line: "--device
** cuda: no CUDA device (...)") when CUDA is asked for and absent. The
** caller then passes *dev, *prec to clipdb_ctx_set_device or
** clipdb_db_set_device. */
int cli_parse_device(const char *cmd, const char *spec, clipdb_device *dev,
                     clipdb_precision *vec_prec);

/* The table, defined in main.c. */
extern const cli_cmd cli_commands[];
extern const int cli_n_commands;

/* Subcommands, one file each (src/cli/cmd_NAME.c). */
/* cmd_model.c: `clipdb model info|fetch` */
extern const char cli_model_help[];
int cli_cmd_model(int argc, char **argv);

/* cmd_tokenize.c: `clipdb tokenize` */
extern const char cli_tokenize_help[];
int cli_cmd_tokenize(int argc, char **argv);

/* the database (store module): init, add, rm, search, index, stats */
int cli_cmd_init(int argc, char **argv);
int cli_cmd_add(int argc, char **argv);
int cli_cmd_rm(int argc, char **argv);
int cli_cmd_stats(int argc, char **argv);
int cli_cmd_search(int argc, char **argv);
int cli_cmd_index(int argc, char **argv);
extern const char cli_init_help[], cli_add_help[], cli_rm_help[], cli_stats_help[],
    cli_search_help[], cli_index_help[];
extern const char cli_check_help[]; /* cmd_check.c */
int cli_cmd_check(int argc, char **argv);
extern const char cli_embed_help[]; /* cmd_embed.c */
int cli_cmd_embed(int argc, char **argv);
extern const char cli_serve_help[]; /* cmd_serve.c */
int cli_cmd_serve(int argc, char **argv);

extern const char cli_eval_help[]; /* cmd_eval.c */
int cli_cmd_eval(int argc, char **argv);

/* cmd_reembed.c: `clipdb reembed` (vector sets) */
extern const char cli_reembed_help[];
int cli_cmd_reembed(int argc, char **argv);

/* cmd_train.c: `clipdb finetune` and `clipdb train` */
extern const char cli_finetune_help[], cli_train_help[];
int cli_cmd_finetune(int argc, char **argv);
int cli_cmd_train(int argc, char **argv);

#endif
