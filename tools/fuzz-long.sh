#!/usr/bin/env bash
# Longer fuzzing, for a scheduled job (not every CI run): every libFuzzer
# target of tests/fuzz (make fuzz) for FUZZ_SECONDS each (default 600 s;
# the per-CI `make fuzz` gives each 60 s, .ci/run). Artifacts (crash-*, leak-*,
# timeout-*, oom-*) go to build-fuzz/artifacts-TARGET/; the corpus grows in
# build-fuzz/corpus-TARGET/ and is kept between runs on the same machine.
# Exit status: 1 when any target left an artifact.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p build-fuzz
stamp=build-fuzz/.fuzz-long-start
touch "$stamp"
make fuzz FUZZ_SECONDS="${FUZZ_SECONDS:-600}"
found=$(find build-fuzz -path '*/artifacts-*' -type f -newer "$stamp" | head -n 20)
if [ -n "$found" ]; then
    echo "fuzz-long: artifacts found:"
    echo "$found"
    exit 1
fi
echo "fuzz-long: no crash, leak, timeout or OOM"
