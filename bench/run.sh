#!/usr/bin/env bash
# Benchmarks. Each module appends a self-contained block. Needs build/ (make).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-/usr/bin/python3}
LIBS="-lopenblas -lsqlite3 -ljpeg -lpng -lwebp -lwebpdemux -lgif -lstb -lz -lutf8proc -lcjson \
-lmicrohttpd -lcurl -lcrypto -lfaiss -llapack -lgomp -lstdc++ -lm -lpthread"

# ---- store: DB open + first query; ingest pipeline vs encoder alone ----------
(
  set -e
  make -s -j2 build/libclipdb.a
  cc -Iinclude -Isrc -D_GNU_SOURCE -std=c11 -O2 -march=native -pthread -o build/bench_db \
     bench/bench_db.c build/libclipdb.a $LIBS
  tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT
  echo "## store: open a database of 100,000 x 512 vectors and answer the first query"
  build/bench_db open "$tmp/b100k.db" 100000 512 | grep -v '^built'   # build (untimed)
  build/bench_db open "$tmp/b100k.db" 100000 512
  data=../shared/data/flickr8k/images
  if [ -d "$data" ]; then
    echo "## store: ingest, full-size ViT-B/32 (seeded random weights), ${BENCH_INGEST_N:-256} flickr8k images"
    "$PY" tools/gen_model.py "$tmp/b32" --size b32 --keys openai --dtype F32 --seed 1 >/dev/null
    build/bench_db ingest "$tmp/b32" "$data" "${BENCH_INGEST_N:-256}"
  else
    echo "store: ../shared/data/flickr8k not found; skipping the ingest benchmark"
  fi
)
