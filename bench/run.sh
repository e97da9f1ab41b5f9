#!/bin/bash
# bench/run.sh: the benchmarks (`make bench`). Each section prints its own
# table; figures and commands are recorded in bench/README.md.
# Env: CLIPDB_BIN (the binary), PY (Debian's python3 with torch/numpy/PIL).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-/usr/bin/python3}
export CLIPDB_BIN=${CLIPDB_BIN:-$PWD/build/clipdb}

# ---- index: exact and IVF search vs Faiss (bench/bench_search.c, ~4 min) ----
echo "== index: exact + IVF search vs Faiss (build/bench/bench_search) =="
make -s -j2 build/bench/bench_search
build/bench/bench_search 100000 1000

# ---- encoder: clipdb embed vs PyTorch (bench/bench_encode.py, ~5 min) ----
echo "== encoder: clipdb embed vs PyTorch (bench/bench_encode.py) =="
"$PY" bench/bench_encode.py

# ---- store: DB open + first query; ingest pipeline vs encoder alone ----------
# (bench/bench_db.c; ~10 min: 100,000 x 512 database, then the flickr8k images
# through full-size ViT-B/32: all 8,091 images by default, BENCH_INGEST_N=256 for a quick run)
(
  set -e
  echo "== store: open + first query on 100,000 x 512; ingest vs encoder alone (build/bench/bench_db) =="
  make -s -j2 build/bench/bench_db
  tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT
  build/bench/bench_db open "$tmp/b100k.db" 100000 512 >/dev/null   # builds the file (untimed)
  build/bench/bench_db open "$tmp/b100k.db" 100000 512
  build/bench/bench_db check "$tmp/b100k.db" 100000 512
  data=../shared/data/flickr8k/images
  if [ -d "$data" ]; then
    "$PY" tools/gen_model.py "$tmp/b32" --size b32 --keys openai --dtype F32 --seed 1 >/dev/null
    build/bench/bench_db ingest "$tmp/b32" "$data" "${BENCH_INGEST_N:-8091}"
  else
    echo "store: ../shared/data/flickr8k not found; skipping the ingest benchmark"
  fi
)

# ---- IVF vs Faiss over the Flickr8k vectors of a generated model --------------
# (bench_search --db: nlist 100, nprobe 1..25, caption vectors against image
# vectors, recall@10 vs exact). BENCH_FLICKR_MODEL=small (default, ~2 min of
# ingest) or b32 (full-size ViT-B/32: ~12+ min for 8,091 images and 40k captions).
(
  set -e
  data=../shared/data/flickr8k
  size=${BENCH_FLICKR_MODEL:-small}
  echo "== index: IVF vs Faiss over Flickr8k vectors (generated $size model; build/bench/bench_search --db) =="
  if [ ! -d "$data/images" ]; then
    echo "index: $data not found; skipping"
    exit 0
  fi
  make -s -j2 build/bench/bench_search build/clipdb
  tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT
  "$PY" tools/gen_model.py "$tmp/model" --size "$size" --keys openai --dtype F32 --seed 1 >/dev/null
  "$CLIPDB_BIN" init "$tmp/flickr.db" --model "$tmp/model"
  "$CLIPDB_BIN" add "$tmp/flickr.db" --images "$data/images" --captions "$data/captions.jsonl" -q
  build/bench/bench_search --db "$tmp/flickr.db" --target image --nq 1000
)

# ---- eval: the Flickr8k test split from stored vectors (bench/bench_eval.c) --
# Against the 2 s target, beside one search per query. First the split's shape
# at ViT-B/32's 512 dims (seeded random vectors), then the real Flickr8k test
# images and captions through a generated tiny model (~1 min to add).
(
  set -e
  echo "== eval: Flickr8k test from stored vectors (build/bench/bench_eval) =="
  make -s -j2 build/bench/bench_eval build/clipdb
  build/bench/bench_eval --synthetic 1000 5000 512
  data=../shared/data/flickr8k
  if [ ! -d "$data/images" ]; then
    echo "eval: $data not found; skipping the real split"
    exit 0
  fi
  tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT
  mkdir "$tmp/images"
  "$PY" - "$data" "$tmp" <<'PYEOF'
import json, os, sys
data, tmp = sys.argv[1], sys.argv[2]
with open(f"{data}/captions.jsonl") as f, open(f"{tmp}/captions.jsonl", "w") as out:
    for line in f:
        e = json.loads(line)
        if e["split"] == "test":
            os.symlink(f"{os.path.abspath(data)}/images/{e['image']}", f"{tmp}/images/{e['image']}")
            out.write(line)
PYEOF
  "$PY" tools/gen_model.py "$tmp/model" --size tiny --keys openai --dtype F32 --seed 1 >/dev/null
  "$CLIPDB_BIN" init "$tmp/flickr-test.db" --model "$tmp/model" >/dev/null
  "$CLIPDB_BIN" add "$tmp/flickr-test.db" --images "$tmp/images" --captions "$tmp/captions.jsonl" -q
  build/bench/bench_eval "$tmp/flickr-test.db" test
)

# ---- server: wrk load, 64 connections, 60 s mixed traffic + ingest (bench/serve_load.py, ~3 min) ----
echo "== server: clipdb serve under wrk load vs the library one search at a time (bench/serve_load.py) =="
if [ -f .cache/demo/coco.db ]; then
  "$PY" bench/serve_load.py .cache/demo/coco.db
else
  echo "skipped: no .cache/demo/coco.db (run 'CLIPDB_DEMO_SERVE=0 make demo' first)"
fi

# ---- training: one ViT-B/32 step (batch 32) vs PyTorch 2 threads ------------
# (bench/bench_train.py: build/bench/bench_train beside torch on the same step;
# ~5 min: generating the b32 weights, then 1 warm-up + 5 steps on each side)
echo "== train: ViT-B/32 training step, batch 32, vs PyTorch (bench/bench_train.py) =="
"$PY" bench/bench_train.py
