/*
** cli.h: the subcommand table's entry type and the few helpers shared by
** subcommands. The CLI parses and prints; every decision lives in the
** library behind include/clipdb.h.
*/
#ifndef CDB_CLI_H
#define CDB_CLI_H

#include <stdio.h>

#include "clipdb.h"

/* Exit codes of the clipdb binary. */
#define CLI_OK    0
#define CLI_FAIL  1   /* the operation failed; a one-line message is on stderr */
#define CLI_USAGE 2   /* bad command line */

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

/* Opens a model with an encoder precision or prints the error; returns
** CLI_OK or CLI_FAIL. */
int cli_open_model(const char *cmd, const char *dir, clipdb_precision prec, clipdb_model **out);
/* Parses a --precision value (fp32, bf16, int8) or prints usage (CLI_USAGE). */
int cli_parse_precision(const char *cmd, const char *s, clipdb_precision *out);

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
extern const char cli_embed_help[]; /* cmd_embed.c */
int cli_cmd_embed(int argc, char **argv);

#endif
