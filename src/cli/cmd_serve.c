/*
** cmd_serve.c: clipdb serve DB [--bind ADDR] [--port N] [--token T]
** [--read-only] [--threads N]. Starts the server (src/server, through the
** public API), prints the URL, logs one line per request on stderr, and
** stops cleanly on SIGINT or SIGTERM.
*/
#include <errno.h>
#include <pthread.h>
#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "cli/cli.h"

const char cli_serve_help[] =
    "usage: clipdb serve DB [--bind ADDR] [--port N] [--token T | --token-env VAR]\n"
    "                       [--read-only] [--threads N] [--model DIR] [--cors ORIGIN]\n"
    "                       [--max-image-pixels N] [--quiet]\n"
    "\n"
    "Serves the database over HTTP: the web page at / (search by text, image upload\n"
    "or a stored item; the four tools text->image, image->text, image->image,\n"
    "text->text; exact, IVF or Faiss; cosine, dot or l2) and the JSON API under\n"
    "/api (documented in README.md and served as /api/openapi.json). Prints the URL,\n"
    "then one line per request on stderr. Ctrl-C (SIGINT) or SIGTERM stops it after\n"
    "the requests in flight.\n"
    "\n"
    "options:\n"
    "  --bind ADDR     IPv4 address to listen on (default 127.0.0.1: this machine\n"
    "                  only; 0.0.0.0 exposes the server to the network)\n"
    "  --port N        port (default 8080; 0 picks a free one)\n"
    "  --token T       allow POST/DELETE /api/items with 'Authorization: Bearer T'\n"
    "                  (at least 8 characters); without a token writes are refused\n"
    "  --token-env VAR the token from environment variable VAR (keeps it out of\n"
    "                  the process list)\n"
    "  --read-only     open the database read-only; writes refused even with a token\n"
    "  --threads N     worker threads, each with its own database handle and\n"
    "                  encoder context; the model is shared (default 4, max "
    CLI_STR(CLIPDB_SERVER_MAX_THREADS) ")\n"
    "  --model DIR     model directory (default: the recorded one)\n"
    "  --cors ORIGIN   send CORS headers allowing ORIGIN (default: none)\n"
    "  --max-image-pixels N\n"
    "                  the largest uploaded image (a query or an item added), in\n"
    "                  pixels as the file declares them: larger ones get 413\n"
    "                  before they are decoded, since a 1 KB file may declare a\n"
    "                  500 MB image (default " CLI_STR(CLIPDB_SERVER_MAX_IMAGE_PIXELS) ", 8000 x 8000;\n"
    "                  at most 178956970, the library's limit; stored items are\n"
    "                  not limited)\n"
    "  --quiet         no per-request log lines\n"
    "\n"
    "examples:\n"
    "  clipdb serve photos.db                     # then open http://127.0.0.1:8080/\n"
    "  clipdb serve photos.db --port 0 --read-only\n"
    "  CLIPDB_TOKEN=s3cretvalue clipdb serve photos.db --token-env CLIPDB_TOKEN\n"
    "  curl -s localhost:8080/api/search -H 'Content-Type: application/json' \\\n"
    "       -d '{\"text\": \"a dog on a beach\", \"k\": 5}'\n"
    "  curl -s localhost:8080/api/search -F image=@cat.jpg -F target=text\n";

static pthread_mutex_t log_mu = PTHREAD_MUTEX_INITIALIZER;
static int stop_pipe[2] = {-1, -1};

/* Any thread may take the signal (OpenBLAS starts threads before main can
** block it), so the handler only writes the signal number to a pipe that
** the main thread waits on. */
static void on_stop_signal(int sig)
{
    unsigned char b = (unsigned char)sig;
    ssize_t n = write(stop_pipe[1], &b, 1);
    (void)n;
}

static void log_request(void *arg, const char *line)
{
    (void)arg;
    pthread_mutex_lock(&log_mu);
    fprintf(stderr, "%s\n", line);
    pthread_mutex_unlock(&log_mu);
}

int cli_cmd_serve(int argc, char **argv)
{
    clipdb_server_options opt;
    clipdb_server *srv = NULL;
    const char *path = NULL;
    struct sigaction sa;
    unsigned char sig = 0;
    int a, quiet = 0;

    clipdb_server_options_init(&opt);
    for (a = 1; a < argc; a++) {
        const char *s = argv[a];
        int has = a + 1 < argc;
        long long v;
        int rc;
        if (!strcmp(s, "--bind") && has) {
            opt.bind = argv[++a];
        } else if (!strcmp(s, "--port") && has) {
            if ((rc = cli_parse_int("serve", s, argv[++a], 0, 65535, &v)) != CLI_OK) return rc;
            opt.port = (int)v;
        } else if (!strcmp(s, "--threads") && has) {
            if ((rc = cli_parse_int("serve", s, argv[++a], 1, CLIPDB_SERVER_MAX_THREADS, &v)) !=
                CLI_OK)
                return rc;
            opt.threads = (int)v;
        } else if (!strcmp(s, "--token") && has) {
            opt.token = argv[++a];
        } else if (!strcmp(s, "--token-env") && has) {
            opt.token = getenv(argv[++a]);
            if (!opt.token || !*opt.token)
                return cli_usage("serve", "environment variable %s is not set", argv[a]);
        } else if (!strcmp(s, "--read-only")) {
            opt.readonly = 1;
        } else if (!strcmp(s, "--model") && has) {
            opt.model_dir = argv[++a];
        } else if (!strcmp(s, "--max-image-pixels") && has) {
            if ((rc = cli_parse_int("serve", s, argv[++a], 1, CLIPDB_MAX_IMAGE_PIXELS, &v)) !=
                CLI_OK)
                return rc;
            opt.max_image_pixels = (unsigned long long)v;
        } else if (!strcmp(s, "--cors") && has) {
            opt.cors_origin = argv[++a];
        } else if (!strcmp(s, "--quiet")) {
            quiet = 1;
        } else if (s[0] == '-' && s[1]) {
            return cli_usage("serve", "unknown option or missing value '%s'", s);
        } else if (!path) {
            path = s;
        } else {
            return cli_usage("serve", "unexpected argument '%s'", s);
        }
    }
    if (!path) return cli_usage("serve", "no database file given");
    if (!quiet) opt.on_log = log_request;
    if (pipe(stop_pipe)) return cli_fail("serve", "pipe: %s", strerror(errno));
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_stop_signal;
    sigemptyset(&sa.sa_mask);
    sigaction(SIGINT, &sa, NULL);
    sigaction(SIGTERM, &sa, NULL);
    signal(SIGPIPE, SIG_IGN);
    if (clipdb_server_start(&srv, path, &opt) != CLIPDB_OK) {
        cli_fail("serve", "%s", clipdb_server_errmsg(srv));
        clipdb_server_stop(srv);
        return CLI_FAIL;
    }
    printf("clipdb serve: http://%s:%d/ (%s%s; Ctrl-C stops)\n",
           strcmp(opt.bind, "0.0.0.0") ? opt.bind : "127.0.0.1", clipdb_server_port(srv), path,
           opt.readonly ? ", read-only" : opt.token ? ", writes with the token" : "");
    fflush(stdout);
    while (read(stop_pipe[0], &sig, 1) != 1 && errno == EINTR) {}
    fprintf(stderr, "clipdb serve: %s: stopping\n", sig == SIGINT ? "SIGINT" : "SIGTERM");
    clipdb_server_stop(srv);
    return CLI_OK;
}
