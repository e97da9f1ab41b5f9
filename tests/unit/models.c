/*
** models.c: tiny generated models for the unit tests (models.h).
*/
#include "models.h"

#include <pthread.h>
#include <unistd.h>

#include "core/core.h"
#include "model/model.h"
#include "model/safetensors.h"
#include "test.h"

const char *test_gen_model(const char *name, const char *args)
{
    static char dir[512];
    char cmd[1024], marker[600];
    snprintf(dir, sizeof dir, "%s/%s", test_tmpdir(), name);
    snprintf(marker, sizeof marker, "%s/model.safetensors", dir);
    if (access(marker, R_OK) == 0) return dir;
    if (access("/usr/bin/python3", X_OK) != 0) return NULL;
    snprintf(cmd, sizeof cmd,
             "/usr/bin/python3 tools/gen_model.py '%s' --size tiny --tokenizer none %s", dir,
             args);
    if (system(cmd) != 0) {
        test_fail_at(__FILE__, __LINE__, cmd);
        return NULL;
    }
    return dir;
}

const char *test_tiny_clip_model(void)
{
    static char dir[512];
    static int state; /* 0 untried, 1 ready, -1 unavailable */
    char cmd[1024];
    if (state == 0) {
        state = -1;
        if (!test_shared_dir() || access("/usr/bin/python3", X_OK) != 0) return NULL;
        snprintf(dir, sizeof dir, "%s/ctx-tiny", test_tmpdir());
        snprintf(cmd, sizeof cmd,
                 "/usr/bin/python3 tools/gen_model.py '%s' --size tiny --seed 5 >/dev/null", dir);
        if (system(cmd) != 0) {
            test_fail_at(__FILE__, __LINE__, cmd);
            return NULL;
        }
        state = 1;
    }
    return state == 1 ? dir : NULL;
}

int test_load_model(const char *dir, clipdb_model **out)
{
    clipdb_model *m = calloc(1, sizeof *m);
    int rc;
    if (!m) abort();
    m->identity_lock = malloc(sizeof(pthread_mutex_t));
    pthread_mutex_init((pthread_mutex_t *)m->identity_lock, NULL);
    m->dir = cdb_strdup(dir);
    m->weights_path = cdb_path_join(dir, "model.safetensors");
    *out = m;
    rc = cdb_st_open(m->weights_path, &m->st, &m->err);
    if (rc == CLIPDB_OK) rc = cdb_weights_bind(m);
    return rc;
}

void test_unload_model(clipdb_model *m)
{
    if (!m) return;
    cdb_model_unpack(m); /* packs made by cdb_trainer_sync's repack */
    cdb_weights_release(m);
    cdb_st_close(m->st);
    pthread_mutex_destroy((pthread_mutex_t *)m->identity_lock);
    free(m->identity_lock);
    free(m->weights_path);
    free(m->dir);
    free(m);
}
