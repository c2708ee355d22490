#!/usr/bin/env bash
# Times a whole `.ci/run`, as CI runs it: a fresh clone of this repository's HEAD, as root,
# CI=true, no standard input. Prints the wall time and the exit code.
#
#   scripts/time-ci.sh --cold   every cache the project fills is empty: the tests' state
#                               (/var/lib/meshinit-test: the node's and the add-ons' builds,
#                               the oracles, podman's images, the VM kernels and guests),
#                               cargo's registry, and Go's module and build caches. Each is
#                               an empty directory mounted over it in a mount namespace of
#                               the run's own, so the machine's caches stay as they were.
#                               What apt, pip and rustup installed stays installed.
#   scripts/time-ci.sh --warm   with the machine's caches, as CI finds them after a run.
#
# The clone, and with --cold the empty caches, are kept under WORKDIR (default
# /tmp/meshinit-time-ci); the run's output is WORKDIR/log.
set -euo pipefail
mode="${1:-}"
case "$mode" in
  --cold | --warm) ;;
  *) echo "usage: time-ci.sh --cold|--warm" >&2; exit 2 ;;
esac
[ "$(id -u)" = 0 ] || { echo "time-ci.sh: as root, as CI runs" >&2; exit 2; }
repo="$(cd "$(dirname "$0")/.." && pwd)"
work="${WORKDIR:-/tmp/meshinit-time-ci}"
rm -rf "$work"
mkdir -p "$work"
git clone -q "$repo" "$work/main"
echo "time-ci.sh: $mode run of $(git -C "$work/main" log --oneline -1), output in $work/log" >&2

run_ci() {
  cd "$work/main"
  local start=$SECONDS status=0
  CI=true bash .ci/run </dev/null >"$work/log" 2>&1 || status=$?
  echo "time-ci.sh: $mode .ci/run exited $status after $((SECONDS - start)) s ($(( (SECONDS - start) / 60 )) min)"
  return "$status"
}

if [ "$mode" = --warm ]; then
  run_ci
  exit
fi
# The caches, each mounted over by an empty directory in this run's mount namespace.
caches=(/var/lib/meshinit-test /root/.cargo/registry /root/.cargo/git /root/go /root/.cache/go-build)
export -f run_ci
export work mode
unshare --mount --propagation private bash -euc '
  i=0
  for cache in "$@"; do
    mkdir -p "$cache" "$work/empty/$i"
    mount --bind "$work/empty/$i" "$cache"
    i=$((i + 1))
  done
  run_ci
' time-ci "${caches[@]}"
