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
