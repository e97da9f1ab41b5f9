/*
** main.c: the clipdb command line. One table registers every subcommand and
** its help; each subcommand lives in src/cli/cmd_NAME.c.
*/
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <unistd.h>

#include "cli/cli.h"

/* Under an address-space limit (ulimit -v), OpenBLAS retries a failed
** allocation of its work buffer (128 MiB, per thread) forever, and its
** threads, started when the library loads, can hang the exit. So when a
** limit is set: the process is started again with one BLAS thread (the
** variable must be set before the library loads), and the commands that
** run matrix products first check that the buffer and some room for the
** model fit, failing with a clear message instead of hanging. */
#define CLI_BLAS_ROOM_BYTES ((size_t)192 << 20)

static int memory_limit_guard(const char *cmd, char **argv)
{
    struct rlimit rl;
    void *probe;
    if (getrlimit(RLIMIT_AS, &rl) != 0 || rl.rlim_cur == RLIM_INFINITY) return CLI_OK;
    if (!getenv("OPENBLAS_NUM_THREADS")) {
        setenv("OPENBLAS_NUM_THREADS", "1", 1);
        if (!getenv("MALLOC_ARENA_MAX")) setenv("MALLOC_ARENA_MAX", "2", 1);
        execv("/proc/self/exe", argv);
        /* no /proc: go on with the threads the library started */
    }
    if (strcmp(cmd, "add") && strcmp(cmd, "search") && strcmp(cmd, "embed") &&
        strcmp(cmd, "index"))
        return CLI_OK;
    probe = malloc(CLI_BLAS_ROOM_BYTES);
    if (!probe)
        return cli_fail(cmd, "the address-space limit (ulimit -v: %llu MiB) leaves no room "
                        "for the BLAS work buffer (128 MiB) and the model (%zu MiB needed "
                        "beyond what is used); raise the limit",
                        (unsigned long long)(rl.rlim_cur >> 20), CLI_BLAS_ROOM_BYTES >> 20);
    free(probe);
    return CLI_OK;
}

static int cmd_version(int argc, char **argv)
{
    int i, verbose = 0;
    for (i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--verbose") || !strcmp(argv[i], "-v")) verbose = 1;
        else return cli_usage("version", "unknown argument '%s'", argv[i]);
    }
    printf("clipdb %s\n", CLIPDB_VERSION);
    if (verbose) printf("compute %s\n", clipdb_compute_info());
    return CLI_OK;
}

const cli_cmd cli_commands[] = {
    /* the database */
    {"init", "create a database bound to a model", cli_init_help, cli_cmd_init},
    {"add", "add images (with captions) or texts to a database", cli_add_help, cli_cmd_add},
    {"search", "nearest images or texts to a text, image or item", cli_search_help, cli_cmd_search},
    {"index", "build an IVF or Faiss index in a database", cli_index_help, cli_cmd_index},
    {"rm", "delete items from a database", cli_rm_help, cli_cmd_rm},
    {"stats", "what a database holds", cli_stats_help, cli_cmd_stats},
    {"check", "check a database's file and data; report problems by item id", cli_check_help,
     cli_cmd_check},
    {"serve", "serve the database over HTTP: the web page and a JSON API", cli_serve_help,
     cli_cmd_serve},
    {"eval", "retrieval evaluation: R@K, ranks, hit-rate curves, indexes, plots, HTML",
     cli_eval_help, cli_cmd_eval},
    {"reembed", "add a vector set: every item encoded with another model (e.g. fine-tuned)",
     cli_reembed_help, cli_cmd_reembed},
    /* the model */
    {"embed", "print CLIP embeddings of texts and images", cli_embed_help, cli_cmd_embed},
    {"tokenize", "print the CLIP token ids of texts", cli_tokenize_help, cli_cmd_tokenize},
    {"model", "show a model's shape and identity, or download one (info, fetch)",
     cli_model_help, cli_cmd_model},
    /* learning */
    {"finetune", "fine-tune a model on a database's image-caption pairs", cli_finetune_help,
     cli_cmd_finetune},
    {"train", "train a CLIP from scratch on images and captions", cli_train_help, cli_cmd_train},
    {"version", "print the version",
     "usage: clipdb version [--verbose]\n\nPrints the version of clipdb. --verbose (-v) also prints the matrix\n"
     "backend and the instruction set it dispatched to (\"compute onednn avx512_core_bf16\";\n"
     "environment: CLIPDB_GEMM=onednn|openblas, ONEDNN_MAX_CPU_ISA).\n",
     cmd_version},
};
const int cli_n_commands = (int)(sizeof cli_commands / sizeof cli_commands[0]);

static void print_main_help(FILE *f)
{
    int i;
    fprintf(f,
            "clipdb %s: a multimodal similarity-search database (CLIP ViT-B/32)\n"
            "\n"
            "usage: clipdb COMMAND [ARGS...]\n"
            "       clipdb COMMAND --help   (details and examples for one command)\n"
            "\n"
            "commands:\n",
            CLIPDB_VERSION);
    for (i = 0; i < cli_n_commands; i++)
        fprintf(f, "  %-10s %s\n", cli_commands[i].name, cli_commands[i].summary);
    fprintf(f, "\nExit status: 0 success, 1 failure (message on stderr), 2 bad usage.\n");
}

int main(int argc, char **argv)
{
    int i;
    if (argc < 2 || !strcmp(argv[1], "-h") || !strcmp(argv[1], "--help") ||
        !strcmp(argv[1], "help")) {
        if (argc >= 3 && !strcmp(argv[1], "help")) {
            for (i = 0; i < cli_n_commands; i++)
                if (!strcmp(argv[2], cli_commands[i].name)) {
                    fputs(cli_commands[i].help, stdout);
                    return CLI_OK;
                }
        }
        print_main_help(argc < 2 ? stderr : stdout);
        return argc < 2 ? CLI_USAGE : CLI_OK;
    }
    if (!strcmp(argv[1], "--version")) return cmd_version(argc - 1, argv + 1);
    for (i = 0; i < cli_n_commands; i++) {
        if (strcmp(argv[1], cli_commands[i].name)) continue;
        if (cli_wants_help(argc - 1, argv + 1)) {
            fputs(cli_commands[i].help, stdout);
            return CLI_OK;
        }
        if (memory_limit_guard(argv[1], argv) != CLI_OK) return CLI_FAIL;
        return cli_commands[i].run(argc - 1, argv + 1);
    }
    fprintf(stderr, "clipdb: unknown command '%s'; try 'clipdb --help'\n", argv[1]);
    return CLI_USAGE;
}
