#!/usr/bin/env bash
# Measures the shipped artifact: builds the static binary, then runs the apply and connect
# benchmarks against it (as root) and prints the static binary's size. Extra args go to
# the apply bench, e.g. `bash benches/run.sh --runs 41`.
# Istio's own istio-init against meshinit is benches/istio.sh (it builds Istio's pilot-agent).
set -euo pipefail
cd "$(dirname "$0")/.."
bin="$(bash scripts/build-static.sh)"
echo "static binary: $bin, $(stat -c %s "$bin") bytes"
MESHINIT_BIN="$PWD/$bin" cargo bench --quiet --bench apply -- "$@"
echo
MESHINIT_BIN="$PWD/$bin" cargo bench --quiet --bench connect
echo
MESHINIT_BIN="$PWD/$bin" cargo bench --quiet --bench burst
