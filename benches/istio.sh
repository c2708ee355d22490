#!/usr/bin/env bash
# Istio's own istio-init against meshinit's, outside the node (docs/comparison.md):
# `cargo bench --bench istio` with Istio's pilot-agent, built from the pinned istio.io/istio
# module (tests/k8s/modules/istio) by tests/k8s/build-addons.sh, which caches it with the
# node's other add-ons, and the static release meshinit, the one the image ships. Needs
# root, Go, strace (it counts the processes) and both iptables backends.
#
#   bash benches/istio.sh               # 21 runs of each side per ruleset
#   bash benches/istio.sh --runs 41 --cidrs 1000
set -euo pipefail
cd "$(dirname "$0")/.."
[ "$(id -u)" = 0 ] || { echo "benches/istio.sh: needs root (network namespaces, cgroups)" >&2; exit 1; }
command -v strace >/dev/null || { echo "benches/istio.sh: needs strace (apt-get install strace)" >&2; exit 1; }
addons="$(bash tests/k8s/build-addons.sh)"
bin="$(bash scripts/build-static.sh)"
# The figures are only as quiet as the machine: say how loaded it was.
echo "$(date -u '+%F %H:%M UTC'), $(nproc) cores, load average $(cut -d' ' -f1-3 /proc/loadavg)," \
  "kernel $(uname -r), $(iptables --version)"
echo "pilot-agent: $addons/pilot-agent, $(stat -c %s "$addons/pilot-agent") bytes;" \
  "meshinit: $bin, $(stat -c %s "$bin") bytes (both static and stripped)"
PILOT_AGENT="$addons/pilot-agent" MESHINIT_BIN="$PWD/$bin" cargo bench --quiet --bench istio -- "$@"
