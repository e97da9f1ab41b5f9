#!/usr/bin/env bash
# Installs everything clipdb needs to build, test, fuzz and benchmark, from
# Debian bookworm's packages. Run as root (or through sudo).
set -euo pipefail
pkgs=(
  build-essential pkg-config clang libclang-rt-14-dev   # compilers; clang + its libFuzzer runtime
  libopenblas-dev liblapack-dev              # SGEMM for the transformer and search
  libdnnl-dev                                # oneDNN: default GEMM backend, bf16/int8 encoders
  libsqlite3-dev                             # the database file
  libjpeg62-turbo-dev libpng-dev libwebp-dev libgif-dev libstb-dev zlib1g-dev
  libutf8proc-dev libcjson-dev               # tokenizer, JSON
  libmicrohttpd-dev libcurl4-openssl-dev     # server, model fetch
  libfaiss-dev python3-faiss                 # optional Faiss backend + benchmark baseline
  libssl-dev                                 # SHA-256 (model identity, content hashes)
  python3 python3-torch python3-torchvision python3-numpy python3-pil python3-regex python3-pytest
)
missing=()
for p in "${pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO=sudo
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi
echo "install-deps: all ${#pkgs[@]} packages present"
