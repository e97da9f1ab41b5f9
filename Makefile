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
CPPFLAGS = -Iinclude -Isrc -D_GNU_SOURCE -I/usr/include/stb
CFLAGS  += -std=c11 $(WARN) $(OPT) -g -pthread -fvisibility=hidden $(SAN)
CXXFLAGS += -std=c++17 $(WARN) $(OPT) -g -pthread -fvisibility=hidden $(SAN)
LDLIBS   = -ldnnl -lopenblas -lsqlite3 -ljpeg -lpng -lwebp -lwebpdemux -lgif -lstb -lz -lutf8proc \
           -lcjson -lmicrohttpd -lcurl -lcrypto -lfaiss -llapack -lgomp -lstdc++ -lm -lpthread
LDFLAGS += $(SAN)

LIB_C   := $(wildcard src/core/*.c src/compute/*.c src/model/*.c src/index/*.c src/store/*.c)
LIB_CXX := $(wildcard src/index/*.cc)
CLI_C   := $(wildcard src/cli/*.c)
TEST_C  := $(wildcard tests/unit/*.c)
FUZZ_C  := $(wildcard tests/fuzz/fuzz_*.c)

LIB_O  := $(LIB_C:%.c=$(BUILD)/%.o) $(LIB_CXX:%.cc=$(BUILD)/%.o)
CLI_O  := $(CLI_C:%.c=$(BUILD)/%.o)
TEST_O := $(TEST_C:%.c=$(BUILD)/%.o)

.PHONY: examples all test unit-test cli-test asan fuzz bench demo clean
all: $(BUILD)/clipdb

$(BUILD)/%.o: %.c
	@mkdir -p $(dir $@)
	$(CC) $(CPPFLAGS) $(CFLAGS) -MMD -MP -c $< -o $@

$(BUILD)/%.o: %.cc
	@mkdir -p $(dir $@)
	$(CXX) $(CPPFLAGS) $(CXXFLAGS) -MMD -MP -c $< -o $@

$(BUILD)/libclipdb.a: $(LIB_O)
	@rm -f $@
	ar rcs $@ $^

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

unit-test: $(BUILD)/test_unit
	$(BUILD)/test_unit

cli-test: $(BUILD)/clipdb $(EXAMPLES)
	CLIPDB_BIN=$(abspath $(BUILD)/clipdb) CLIPDB_BUILD=$(abspath $(BUILD)) \
	    $(PY) -m pytest -q -ra tests/cli tests/ref

# Everything again under AddressSanitizer + UndefinedBehaviorSanitizer.
asan:
	$(MAKE) BUILD=build-asan OPT="-O1 -march=native" \
	    SAN="-fsanitize=address,undefined -fno-sanitize-recover=undefined -fno-omit-frame-pointer" \
	    CLIPDB_ASAN=1 test

# libFuzzer targets (clang). FUZZ_SECONDS each.
FUZZ_SECONDS ?= 20
FUZZ_BUILD   := build-fuzz
fuzz:
	$(MAKE) BUILD=$(FUZZ_BUILD) CC=clang CXX=clang++ OPT=-O1 \
	    SAN="-fsanitize=fuzzer-no-link,address,undefined -fno-omit-frame-pointer" \
	    $(FUZZ_BUILD)/libclipdb.a
	@set -eo pipefail; for src in $(FUZZ_C); do \
	    name=$$(basename $$src .c); \
	    clang $(CPPFLAGS) -std=c11 -g -O1 -fsanitize=fuzzer,address,undefined \
	        -o $(FUZZ_BUILD)/$$name $$src $(FUZZ_BUILD)/libclipdb.a $(LDLIBS); \
	    mkdir -p $(FUZZ_BUILD)/corpus-$$name; \
	    seeds=tests/fuzz/seeds/$${name#fuzz_}; \
	    echo "fuzz: $$name for $(FUZZ_SECONDS)s"; \
	    $(FUZZ_BUILD)/$$name -max_total_time=$(FUZZ_SECONDS) -rss_limit_mb=2048 \
	        -timeout=10 -print_final_stats=1 $(FUZZ_BUILD)/corpus-$$name \
	        $$( [ -d $$seeds ] && echo $$seeds ) 2>&1 | tail -n 12; \
	done

# Test-time tools (tools/NAME.c -> $(BUILD)/tools/NAME), linked against the library.
$(BUILD)/tools/preprocess_dump: $(BUILD)/tools/preprocess_dump.o $(BUILD)/libclipdb.a
	$(CC) $(LDFLAGS) -pthread -o $@ $< $(BUILD)/libclipdb.a $(LDLIBS)
cli-test: $(BUILD)/tools/preprocess_dump

# Search benchmark of the index module (bench/README.md).
$(BUILD)/bench/bench_search: bench/bench_search.c $(BUILD)/libclipdb.a
	@mkdir -p $(dir $@)
	$(CC) $(CPPFLAGS) $(CFLAGS) -o $@ $< $(BUILD)/libclipdb.a $(LDLIBS)

# Store benchmark (bench/README.md): DB open + first query, ingest vs encoder.
$(BUILD)/bench/bench_db: bench/bench_db.c $(BUILD)/libclipdb.a
	@mkdir -p $(dir $@)
	$(CC) $(CPPFLAGS) $(CFLAGS) -o $@ $< $(BUILD)/libclipdb.a $(LDLIBS)

bench: $(BUILD)/clipdb
	CLIPDB_BIN=$(abspath $(BUILD)/clipdb) PY=$(PY) bash bench/run.sh

# The main job on an embedded default (README, first command).
demo: $(BUILD)/clipdb
	CLIPDB_BIN=$(abspath $(BUILD)/clipdb) PY=$(PY) bash tools/demo.sh

clean:
	rm -rf build build-asan build-fuzz

-include $(LIB_O:.o=.d) $(CLI_O:.o=.d) $(TEST_O:.o=.d) $(BUILD)/tools/preprocess_dump.d
