/*
** models.h: tiny generated models for the unit tests that need real weights
** (weights binding, the writer, the training engine). Owner: models.c.
*/
#ifndef CDB_TEST_MODELS_H
#define CDB_TEST_MODELS_H

#include "clipdb.h"

/* Generates (once per name and test run) a tiny seeded model without a
** tokenizer with tools/gen_model.py into test_tmpdir()/name; args are more
** gen_model.py options ("--keys hf --dtype F16"). Returns the directory
** (a static buffer, valid until the next call), or NULL when python3 is
** missing or generation failed (recorded as a test failure). */
const char *test_gen_model(const char *name, const char *args);

/* Maps and binds dir/model.safetensors into a fresh model as
** clipdb_model_open does (no tokenizer). *out is set even on failure (its
** err holds the message); free with test_unload_model. */
/* A tiny seeded model (seed 5) with the real tokenizer of ../shared,
** generated once per test run; NULL (the test skips) when ../shared or
** python3 is absent. Opened with clipdb_model_open. */
const char *test_tiny_clip_model(void);

int test_load_model(const char *dir, clipdb_model **out);
void test_unload_model(clipdb_model *m);

#endif
