#!/usr/bin/env bash
# The figures in docs/comparison.md: the same pod started by podman (CNI network backend)
# in init-container mode and in CNI mode, runs alternating, on this machine. Needs root,
# podman and containernetworking-plugins (scripts/test.sh installs them).
#
#   bash benches/modes.sh                        # 11 runs of each mode
#   MESHINIT_BENCH_RUNS=31 bash benches/modes.sh
#
# meshinit-cni runs the static release binary, the one the image (and so istio-init and
# istio-validation) ships.
set -euo pipefail
cd "$(dirname "$0")/.."
bin="$(bash scripts/build-static.sh)"
export MESHINIT_BIN="$PWD/$bin"
cargo test --quiet --test integration -- --ignored --nocapture --exact \
  cni_runtime::bench_pod_start_by_mode
