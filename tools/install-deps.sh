#!/usr/bin/env bash
# Installs what clipdb needs from Debian bookworm's packages. Run as root (or
# through sudo).
#   bash tools/install-deps.sh          building and running: the compiler, the
#                                       libraries, python3 + numpy (make demo
#                                       generates its seeded model with them)
#   bash tools/install-deps.sh --test   also what the tests, fuzzers and
#                                       benchmarks use: the PyTorch/PIL
#                                       references, pytest, clang's libFuzzer
#                                       runtime, Faiss's Python baseline,
#                                       Chromium + playwright-core (npm) for the
#                                       page's browser tests, wrk for the load
#                                       benchmark
set -euo pipefail
want_test=0
for a in "$@"; do
  case "$a" in
    --test) want_test=1 ;;
    -h|--help) sed -n '2,13p' "$0"; exit 0 ;;
    *) echo "install-deps: unknown argument '$a' (try --help)" >&2; exit 2 ;;
  esac
done
pkgs=(
  build-essential pkg-config                 # compiler, make, pkg-config (make install's clipdb.pc)
  libopenblas-dev liblapack-dev              # SGEMM for the transformer and search
  libdnnl-dev                                # oneDNN: default GEMM backend, bf16/int8 encoders
  libsqlite3-dev                             # the database file
  libjpeg62-turbo-dev libpng-dev libwebp-dev libgif-dev libstb-dev zlib1g-dev
  libutf8proc-dev libcjson-dev               # tokenizer, JSON
  libcurl4-openssl-dev                       # model fetch
  libmicrohttpd-dev                          # clipdb serve
  libplplot-dev plplot-driver-cairo          # clipdb eval's plots (PNG, SVG)
  libfaiss-dev                               # optional Faiss backend
  libssl-dev                                 # SHA-256 (model identity, content hashes)
  python3 python3-numpy                      # make demo: tools/gen_model.py
)
if [ "$want_test" = 1 ]; then
  pkgs+=(
    clang libclang-rt-14-dev                 # make fuzz: clang + its libFuzzer runtime
    python3-torch python3-torchvision        # reference embeddings and preprocessing
    python3-pil python3-regex python3-pytest # reference images and tokenizer, the test runner
    python3-faiss                            # benchmark baseline
    chromium                                 # browser tests of the page (playwright-core from npm)
    wrk                                      # the server's load benchmark
  )
  # Node.js and npm for playwright-core: Debian's packages, unless a Node.js
  # with npm is already installed (NodeSource's nodejs bundles npm and
  # conflicts with Debian's npm package).
  command -v npm >/dev/null 2>&1 || pkgs+=(nodejs npm)
fi
missing=()
for p in "${pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO=sudo
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi
echo "install-deps: all ${#pkgs[@]} packages present$([ "$want_test" = 1 ] && echo ' (with --test)')"
if [ "$want_test" = 1 ]; then
  # playwright-core for the browser tests (Debian's chromium; no browser download)
  (cd "$(dirname "$0")/../tests/browser" &&
     PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD=1 npm ci --no-audit --no-fund --loglevel=error)
fi
