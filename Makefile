# clipdb build. `make` builds build/clipdb; `make test` runs every test;
# `make asan` runs the tests again under ASan+UBSan; `make fuzz` runs each
# fuzz target briefly; `make bench` runs the benchmarks. See README.md.

SHELL   := /bin/bash
CC      ?= cc
CXX     ?= c++
BUILD   ?= build
PY      ?= /usr/bin/python3
OPT     ?= -O2 -march=native
SAN     ?=
WARN     = -Wall -Wextra -Wshadow -Werror
CPPFLAGS = -Iinclude -Isrc -D_GNU_SOURCE -I/usr/include/stb -I/usr/include/plplot
# -fPIC: the same objects make the static and the shared library;
# -fvisibility=hidden: the shared one exports only what CLIPDB_API marks.
CFLAGS  += -std=c11 $(WARN) $(OPT) -g -pthread -fPIC -fvisibility=hidden $(SAN)
CXXFLAGS += -std=c++17 $(WARN) $(OPT) -g -pthread -fPIC -fvisibility=hidden $(SAN)
LDLIBS   = -ldnnl -lopenblas -lsqlite3 -ljpeg -lpng -lwebp -lwebpdemux -lgif -lstb -lz -lutf8proc \
           -lcjson -lplplot -lmicrohttpd -lcurl -lcrypto -lfaiss -llapack -lgomp -lstdc++ -lm -lpthread
LDFLAGS += $(SAN)

LIB_C   := $(wildcard src/core/*.c src/compute/*.c src/model/*.c src/net/*.c src/index/*.c src/store/*.c \
             src/eval/*.c src/train/*.c)
LIB_CXX := $(wildcard src/index/*.cc)
CLI_C   := $(wildcard src/cli/*.c)
TEST_C  := $(wildcard tests/unit/*.c)
FUZZ_C  := $(wildcard tests/fuzz/fuzz_*.c)

LIB_O  := $(LIB_C:%.c=$(BUILD)/%.o) $(LIB_CXX:%.cc=$(BUILD)/%.o)

# The HTTP server (src/server) and the web page (web/), embedded into the
# binary by a small generator built here (no xxd or Python at build time).
.DEFAULT_GOAL := all
SERVER_C := $(wildcard src/server/*.c)
WEB      := $(sort $(wildcard web/*.html web/*.css web/*.js web/*.json web/*.svg))
LIB_O    += $(SERVER_C:%.c=$(BUILD)/%.o) $(BUILD)/gen/assets.o
$(BUILD)/tools/embed_assets: tools/embed_assets.c
	@mkdir -p $(dir $@)
	$(CC) -std=c11 $(WARN) -O1 -o $@ $<
$(BUILD)/gen/assets.c: $(BUILD)/tools/embed_assets $(WEB)
	@mkdir -p $(dir $@)
	$(BUILD)/tools/embed_assets $@ $(WEB)
$(BUILD)/gen/assets.o: $(BUILD)/gen/assets.c
	$(CC) $(CPPFLAGS) $(CFLAGS) -c $< -o $@
CLI_O  := $(CLI_C:%.c=$(BUILD)/%.o)
TEST_O := $(TEST_C:%.c=$(BUILD)/%.o)

.PHONY: examples all test unit-test cli-test server-test browser-test asan tsan fuzz bench demo clean install
all: $(BUILD)/clipdb $(BUILD)/libclipdb.so

$(BUILD)/%.o: %.c
	@mkdir -p $(dir $@)
	$(CC) $(CPPFLAGS) $(CFLAGS) -MMD -MP -c $< -o $@

# cvecs.c scores its GEMM blocks on the OpenMP threads oneDNN ran the GEMM on
# (libgomp, linked anyway); clang's OpenMP needs libomp, which is not linked,
# so a clang build (the fuzz build) scores them on its own threads instead.
# Its 16-float vector helpers are static (no ABI to keep), hence -Wno-psabi
# where the build is not -march=native (the fuzz build).
CVECS_OMP := $(if $(findstring clang,$(CC)),,-fopenmp)
$(BUILD)/src/index/cvecs.o: CFLAGS += $(CVECS_OMP) -Wno-psabi
# transformer.c runs its kernels between the GEMMs on the same OpenMP threads
# (gcc; clang builds use the process pool, as above).
$(BUILD)/src/model/transformer.o: CFLAGS += $(CVECS_OMP)
# resnet.c splits its per-channel passes the same way.
$(BUILD)/src/model/resnet.o: CFLAGS += $(CVECS_OMP)
# ctx.c decodes a group's image files on the same threads.
$(BUILD)/src/model/ctx.o: CFLAGS += $(CVECS_OMP)
# onednn.c splits its elementwise passes over the same threads.
$(BUILD)/src/compute/onednn.o: CFLAGS += $(CVECS_OMP)
# convert.c's portable and AVX-512 kernels give the same bits only if no
# compiler fuses a multiply and an add (clang's default does, in one expression).
$(BUILD)/src/compute/convert.o: CFLAGS += -ffp-contract=off

$(BUILD)/%.o: %.cc
	@mkdir -p $(dir $@)
	$(CXX) $(CPPFLAGS) $(CXXFLAGS) -MMD -MP -c $< -o $@

$(BUILD)/libclipdb.a: $(LIB_O)
	@rm -f $@
	ar rcs $@ $^

# The shared library: the same objects; only CLIPDB_API symbols are exported
# (-fvisibility=hidden, and the version script hides anything else, e.g.
# template instances from the Faiss headers). Check: nm -D --defined-only.
SONAME := libclipdb.so.0
$(BUILD)/libclipdb.so: $(LIB_O) tools/libclipdb.map
	$(CXX) $(LDFLAGS) -shared -Wl,-soname,$(SONAME) -Wl,--version-script=tools/libclipdb.map \
	    -o $@ $(LIB_O) $(LDLIBS)

$(BUILD)/clipdb: $(CLI_O) $(BUILD)/libclipdb.a
	$(CC) $(LDFLAGS) -pthread -o $@ $(CLI_O) $(BUILD)/libclipdb.a $(LDLIBS)

$(BUILD)/test_unit: $(TEST_O) $(BUILD)/libclipdb.a
	$(CC) $(LDFLAGS) -pthread -o $@ $(TEST_O) $(BUILD)/libclipdb.a $(LDLIBS)

# Examples: programs that use only the public header (tests run them).
EXAMPLES := $(patsubst examples/%.c,$(BUILD)/examples/%,$(wildcard examples/*.c))
$(BUILD)/examples/%: examples/%.c include/clipdb.h $(BUILD)/libclipdb.a
	@mkdir -p $(dir $@)
	$(CC) -Iinclude $(CFLAGS) -o $@ $< $(BUILD)/libclipdb.a $(LDLIBS) $(LDFLAGS)
examples: $(EXAMPLES)

# The test command (README): C unit tests, then the black-box and reference
# tests of the real binary (pytest, Debian's python3 with torch/numpy/PIL).
# In sequence, so that each runner's closing line stands on its own line.
test:
	$(MAKE) --no-print-directory unit-test
	$(MAKE) --no-print-directory cli-test
	$(MAKE) --no-print-directory server-test

unit-test: $(BUILD)/test_unit
	$(BUILD)/test_unit

cli-test: $(BUILD)/clipdb $(BUILD)/libclipdb.so $(EXAMPLES)
	CLIPDB_BIN=$(abspath $(BUILD)/clipdb) CLIPDB_BUILD=$(abspath $(BUILD)) \
	    $(PY) -m pytest -q -ra tests/cli tests/ref

# The HTTP server over real HTTP on 127.0.0.1 (tests/server), then the page
# in Debian's Chromium (tests/browser; needs `npm ci` there, see .ci/run: it
# skips with a message when playwright-core or chromium is missing).
server-test: $(BUILD)/clipdb
	CLIPDB_BIN=$(abspath $(BUILD)/clipdb) $(PY) -m pytest -q -ra tests/server
	$(MAKE) --no-print-directory browser-test

browser-test: $(BUILD)/clipdb
	@if [ -n "$(CLIPDB_ASAN)" ]; then echo "browser-test: not run under ASan (the page is the same)"; \
	elif [ -d tests/browser/node_modules/playwright-core ] && [ -x /usr/bin/chromium ]; then \
	    cd tests/browser && CLIPDB_BIN=$(abspath $(BUILD)/clipdb) \
	        CLIPDB_BROWSER_OUT=$(abspath $(BUILD)/browser-tests) npm test; \
	else echo "browser-test: skipped: run 'npm ci' in tests/browser and install chromium (tools/install-deps.sh)"; fi

# Everything again under AddressSanitizer + UndefinedBehaviorSanitizer.
asan:
	$(MAKE) BUILD=build-asan OPT="-O1 -march=native" \
	    SAN="-fsanitize=address,undefined -fno-sanitize-recover=undefined -fno-omit-frame-pointer" \
	    CLIPDB_ASAN=1 test

# The concurrency tests under ThreadSanitizer: the core pool (one caller and
# concurrent callers), the top-k pass on the pool, two encoders in parallel,
# concurrent searches on one file, and the ingest pipeline (clipdb add with
# 4 decode threads, through tests/cli/test_store_tidy.py). OpenBLAS and
# libgomp are not instrumented, so their own threads are turned off
# (OPENBLAS_NUM_THREADS=1, OMP_NUM_THREADS=1): TSan checks clipdb's threads,
# not theirs. No suppressions.
TSAN_BUILD := build-tsan
TSAN_UNIT  := core_pool index_kernels_pool transformer_two_threads store_concurrent_searches
TSAN_ENV   := OPENBLAS_NUM_THREADS=1 OMP_NUM_THREADS=1 TSAN_OPTIONS="halt_on_error=1 exitcode=66"
tsan:
	$(MAKE) BUILD=$(TSAN_BUILD) OPT="-O1 -march=native" \
	    SAN="-fsanitize=thread -fno-omit-frame-pointer" \
	    $(TSAN_BUILD)/test_unit $(TSAN_BUILD)/clipdb $(TSAN_BUILD)/examples/search
	@set -e; for t in $(TSAN_UNIT); do $(TSAN_ENV) $(TSAN_BUILD)/test_unit $$t; done
	$(TSAN_ENV) CLIPDB_BIN=$(abspath $(TSAN_BUILD)/clipdb) CLIPDB_BUILD=$(abspath $(TSAN_BUILD)) \
	    $(PY) -m pytest -q tests/cli/test_store_tidy.py

# libFuzzer targets (clang). FUZZ_SECONDS each; FUZZ_SECONDS_fuzz_NAME=S
# gives one target its own time (make fuzz FUZZ_SECONDS_fuzz_dbopen=120).
# FUZZ_JOBS targets run at a time (.ci/run: 2, one per core), each its own
# log in build-fuzz/log-TARGET, whose tail is printed when all are done.
# Crashes, leaks, timeouts and OOMs are written to
# build-fuzz/artifacts-TARGET/ (never the repository root); any makes the
# rule fail, and the failing targets' reports are printed last, so that the
# tail of a CI log names them (target, error, the input in base64 up to
# 8 KiB). Linked by clang++ (the C target compiled as C): a target that
# reaches the Faiss shim (fuzz_dbopen) needs the C++ UBSan runtime.
# FUZZ_DEFS: limits lowered for the fuzz build, so that every input runs
# well within -timeout under ASan (a 799-byte GIF may declare a valid
# 13000 x 13000 screen: 12 s to decode and resize there).
FUZZ_SECONDS ?= 20
FUZZ_JOBS    ?= 1
FUZZ_BUILD   := build-fuzz
FUZZ_NAMES   := $(basename $(notdir $(FUZZ_C)))
FUZZ_DEFS    := -DCDB_IMAGE_MAX_PIXELS=4194304u
fuzz:
	$(MAKE) BUILD=$(FUZZ_BUILD) CC=clang CXX=clang++ OPT=-O1 \
	    SAN="-fsanitize=fuzzer-no-link,address,undefined -fno-omit-frame-pointer $(FUZZ_DEFS)" \
	    $(FUZZ_BUILD)/libclipdb.a
	@set -e; for name in $(FUZZ_NAMES); do \
	    clang++ -x c $(CPPFLAGS) -std=c11 -g -O1 -fsanitize=fuzzer,address,undefined \
	        -o $(FUZZ_BUILD)/$$name tests/fuzz/$$name.c -x none $(FUZZ_BUILD)/libclipdb.a $(LDLIBS); \
	    mkdir -p $(FUZZ_BUILD)/corpus-$$name $(FUZZ_BUILD)/artifacts-$$name; \
	    rm -f $(FUZZ_BUILD)/status-$$name; \
	    [ -n "$$(ls -A tests/fuzz/seeds/$${name#fuzz_} 2>/dev/null)" ] || \
	        { echo "fuzz: $$name has no seeds in tests/fuzz/seeds/$${name#fuzz_}"; exit 1; }; \
	done
	@for name in $(FUZZ_NAMES); do \
	    while [ "$$(jobs -rp | wc -l)" -ge $(FUZZ_JOBS) ]; do sleep 1; done; \
	    v=FUZZ_SECONDS_$$name; secs=$${!v:-$(FUZZ_SECONDS)}; \
	    echo "fuzz: $$name for $${secs}s"; \
	    ( $(FUZZ_BUILD)/$$name -max_total_time=$$secs -rss_limit_mb=2048 \
	        -timeout=10 -print_final_stats=1 \
	        -artifact_prefix=$(FUZZ_BUILD)/artifacts-$$name/ $(FUZZ_BUILD)/corpus-$$name \
	        tests/fuzz/seeds/$${name#fuzz_} > $(FUZZ_BUILD)/log-$$name 2>&1; \
	      echo $$? > $(FUZZ_BUILD)/status-$$name ) & \
	done; wait; failed=; \
	for name in $(FUZZ_NAMES); do \
	    st=$$(cat $(FUZZ_BUILD)/status-$$name 2>/dev/null || echo missing); \
	    echo "== $$name: exit $$st"; tail -n 12 $(FUZZ_BUILD)/log-$$name; \
	    [ "$$st" = 0 ] || failed="$$failed $$name"; \
	done; \
	for name in $$failed; do \
	    echo "== $$name FAILED: its report (whole log: $(FUZZ_BUILD)/log-$$name)"; \
	    sed -n '/^==[0-9]*==\|deadly signal\|ERROR: libFuzzer/,$$p' $(FUZZ_BUILD)/log-$$name | head -n 80; \
	    ls -l $(FUZZ_BUILD)/artifacts-$$name; \
	done; \
	for name in $$failed; do \
	    echo "fuzz: FAILED $$name (exit $$(cat $(FUZZ_BUILD)/status-$$name 2>/dev/null)):"; \
	    grep -m 3 -E 'ERROR: |^SUMMARY|deadly signal|Test unit written' $(FUZZ_BUILD)/log-$$name; \
	    for a in $(FUZZ_BUILD)/artifacts-$$name/*; do \
	        [ -f "$$a" ] && [ "$$(stat -c %s "$$a")" -le 8192 ] && echo "$$a in base64: $$(base64 -w0 "$$a")"; \
	    done; \
	done; \
	[ -z "$$failed" ] || exit 1

# Test-time tools (tools/NAME.c -> $(BUILD)/tools/NAME), linked against the library.
$(BUILD)/tools/preprocess_dump: $(BUILD)/tools/preprocess_dump.o $(BUILD)/libclipdb.a
	$(CC) $(LDFLAGS) -pthread -o $@ $< $(BUILD)/libclipdb.a $(LDLIBS)
cli-test: $(BUILD)/tools/preprocess_dump
$(BUILD)/tools/train_step: $(BUILD)/tools/train_step.o $(BUILD)/libclipdb.a
	$(CC) $(LDFLAGS) -pthread -o $@ $< $(BUILD)/libclipdb.a $(LDLIBS)
cli-test: $(BUILD)/tools/train_step

# Search benchmark of the index module (bench/README.md).
$(BUILD)/bench/bench_search: bench/bench_search.c $(BUILD)/libclipdb.a
	@mkdir -p $(dir $@)
	$(CC) $(CPPFLAGS) $(CFLAGS) -o $@ $< $(BUILD)/libclipdb.a $(LDLIBS)

# Store benchmark (bench/README.md): DB open + first query, ingest vs encoder.
$(BUILD)/bench/bench_db: bench/bench_db.c $(BUILD)/libclipdb.a
	@mkdir -p $(dir $@)
	$(CC) $(CPPFLAGS) $(CFLAGS) -o $@ $< $(BUILD)/libclipdb.a $(LDLIBS)

# Baseline of the server load benchmark (bench/serve_load.py): public API only.
$(BUILD)/bench/bench_serve_lib: bench/bench_serve_lib.c $(BUILD)/libclipdb.a
	@mkdir -p $(dir $@)
	$(CC) -Iinclude $(CFLAGS) -o $@ $< $(BUILD)/libclipdb.a $(LDLIBS)

# Evaluation benchmark (bench/README.md): Flickr8k test from stored vectors.
$(BUILD)/bench/bench_eval: bench/bench_eval.c $(BUILD)/libclipdb.a
	@mkdir -p $(dir $@)
	$(CC) $(CPPFLAGS) $(CFLAGS) -o $@ $< $(BUILD)/libclipdb.a $(LDLIBS)

# Training-step benchmark (bench/bench_train.py runs it beside PyTorch).
$(BUILD)/bench/bench_train: bench/bench_train.c $(BUILD)/libclipdb.a
	@mkdir -p $(dir $@)
	$(CC) $(CPPFLAGS) $(CFLAGS) -o $@ $< $(BUILD)/libclipdb.a $(LDLIBS)

# Per-core peak of fp32 FMA, bf16 and int8 dot products (bench/README.md).
$(BUILD)/bench/isa_peak: bench/isa_peak.c
	@mkdir -p $(dir $@)
	$(CC) $(CFLAGS) -o $@ $<

bench: $(BUILD)/clipdb
	CLIPDB_BIN=$(abspath $(BUILD)/clipdb) PY=$(PY) bash bench/run.sh

# The main job on an embedded default (README, first command).
demo: $(BUILD)/clipdb
	CLIPDB_BIN=$(abspath $(BUILD)/clipdb) PY=$(PY) bash tools/demo.sh

# make install PREFIX=/usr/local [DESTDIR=...]: the binary, the header, both
# libraries and clipdb.pc (pkg-config --cflags --libs clipdb; --static adds
# the libraries libclipdb.a needs).
PREFIX  ?= /usr/local
LIBDIR  ?= $(PREFIX)/lib
VERSION := $(shell sed -n 's/^\#define CLIPDB_VERSION  *"\(.*\)"/\1/p' include/clipdb.h)
install: $(BUILD)/clipdb $(BUILD)/libclipdb.a $(BUILD)/libclipdb.so tools/clipdb.pc.in
	install -d $(DESTDIR)$(PREFIX)/bin $(DESTDIR)$(PREFIX)/include $(DESTDIR)$(LIBDIR)/pkgconfig
	install -m 755 $(BUILD)/clipdb $(DESTDIR)$(PREFIX)/bin/clipdb
	install -m 644 include/clipdb.h $(DESTDIR)$(PREFIX)/include/clipdb.h
	install -m 644 $(BUILD)/libclipdb.a $(DESTDIR)$(LIBDIR)/libclipdb.a
	install -m 755 $(BUILD)/libclipdb.so $(DESTDIR)$(LIBDIR)/$(SONAME)
	ln -sf $(SONAME) $(DESTDIR)$(LIBDIR)/libclipdb.so
	sed -e 's|@PREFIX@|$(PREFIX)|' -e 's|@LIBDIR@|$(LIBDIR)|' -e 's|@VERSION@|$(VERSION)|' \
	    -e 's|@LIBS_PRIVATE@|$(LDLIBS)|' tools/clipdb.pc.in > $(DESTDIR)$(LIBDIR)/pkgconfig/clipdb.pc

clean:
	rm -rf build build-asan build-fuzz build-tsan

-include $(LIB_O:.o=.d) $(CLI_O:.o=.d) $(TEST_O:.o=.d) $(BUILD)/tools/preprocess_dump.d \
         $(BUILD)/tools/train_step.d
