#!/bin/bash
# bench/run.sh: the benchmarks (`make bench`). Each section prints its own
# table; figures and commands are recorded in bench/README.md.
# Env: CLIPDB_BIN (the binary), PY (Debian's python3 with torch/numpy/PIL).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-/usr/bin/python3}
export CLIPDB_BIN=${CLIPDB_BIN:-$PWD/build/clipdb}

echo "== encoder: clipdb embed vs PyTorch (bench/bench_encode.py) =="
"$PY" bench/bench_encode.py
