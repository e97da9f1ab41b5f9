/* libFuzzer target: opening a database file (a mutated clipdb file must give
** an error, never a crash): the bytes are written to a file, opened
** read-only, its statistics read and every stored vector loaded (the checks
** of sizes, finiteness and norms). Seeds: tests/fuzz/seeds/dbopen. */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "store/store.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    char path[64];
    clipdb_db_options opt;
    clipdb_db_stats st;
    const cdb_vecset *vs;
    clipdb_db *db = NULL;
    FILE *f;
    snprintf(path, sizeof path, "/tmp/fuzz-dbopen-%d.db", (int)getpid());
    f = fopen(path, "wb");
    if (!f) return 0;
    if (size && fwrite(data, 1, size, f) != size) {
        fclose(f);
        return 0;
    }
    fclose(f);
    clipdb_db_options_init(&opt);
    opt.readonly = 1;
    if (clipdb_db_open(&db, path, &opt) == CLIPDB_OK) {
        if (clipdb_db_get_stats(db, &st) == CLIPDB_OK) clipdb_db_stats_free(&st);
        (void)cdb_db_vectors(db, CLIPDB_ITEM_IMAGE, &vs);
        (void)cdb_db_vectors(db, CLIPDB_ITEM_TEXT, &vs);
    } else if (clipdb_db_errmsg(db)[0] == '\0') {
        abort(); /* a failure always says why */
    }
    clipdb_db_close(db);
    unlink(path);
    return 0;
}
