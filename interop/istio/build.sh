#!/usr/bin/env bash
# Builds one of the oracles and prints its path:
#   build.sh [rules]   istio-oracle: Istio's capture code as a command (main.go)
#   build.sh inject    istio-inject-oracle: Istio's sidecar injector (inject/main.go); it
#                      links the Kubernetes client and Helm, so its first build is minutes
#
# A binary is kept per pinned Istio version and per source, so a run whose go.mod, go.sum
# and sources are unchanged reuses it without starting Go at all. Modules are fetched once,
# through the Go module proxy, into Go's module cache; later builds are offline.
#
#   ISTIO_ORACLE_CACHE  where binaries are kept (default: /var/lib/meshinit-test as root,
#                       else $CARGO_TARGET_DIR or the repository's target/)
#   GO                  the go command (default: go on PATH, else /usr/local/go/bin/go)
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
case "${1:-rules}" in
  rules) name=istio-oracle package=. sources=("$here"/*.go) ;;
  inject) name=istio-inject-oracle package=./inject sources=("$here"/inject/*.go) ;;
  *) echo "usage: build.sh [rules|inject]" >&2; exit 2 ;;
esac
repo="$(cd "$here/../.." && pwd)"

go_cmd="${GO:-}"
if [ -z "$go_cmd" ]; then
  if command -v go >/dev/null 2>&1; then go_cmd=go
  elif [ -x /usr/local/go/bin/go ]; then go_cmd=/usr/local/go/bin/go
  else echo "$name: no Go toolchain (set GO or put go on PATH)" >&2; exit 1
  fi
fi

version="$(awk '$1 == "istio.io/istio" { print $2 }' "$here/go.mod")"
if [ -z "$version" ]; then
  echo "$name: go.mod pins no istio.io/istio version" >&2
  exit 1
fi
# The pinned version names the directory; a digest of the sources tells builds within it
# apart, so editing a source never runs a stale binary (nor rebuilds the other oracle).
digest="$(cat "$here/go.mod" "$here/go.sum" "${sources[@]}" | sha256sum | cut -c1-16)"

if [ -n "${ISTIO_ORACLE_CACHE:-}" ]; then cache="$ISTIO_ORACLE_CACHE"
elif [ "$(id -u)" = 0 ]; then cache=/var/lib/meshinit-test
else cache="${CARGO_TARGET_DIR:-$repo/target}"
fi
dir="$cache/istio-oracle-$version"
bin="$dir/$name-$digest"

# The module's directory holds Istio's own golden files, against which the tests check the
# oracles (capture testdata), and the charts the injector renders; recorded beside the binary.
mkdir -p "$dir"
# One build at a time: tests running in parallel may all ask for the same binary.
exec 9>"$dir/.lock"
flock 9
if [ ! -x "$bin" ] || [ ! -d "$(cat "$bin.moddir" 2>/dev/null)" ]; then
  echo "$name: building against istio.io/istio $version (the first build fetches modules)" >&2
  # -mod=readonly: go.sum is the record of what was fetched; a build never rewrites it.
  # -p 2: the machines this runs on have two cores; don't starve the rest of the suite.
  # -s -w: no symbol tables; nothing here is debugged, and they are a large part of the size.
  (cd "$here" && GOFLAGS=-mod=readonly "$go_cmd" build -p 2 -trimpath -ldflags='-s -w' -o "$bin.tmp" "$package")
  (cd "$here" && GOFLAGS=-mod=readonly "$go_cmd" list -m -f '{{.Dir}}' istio.io/istio) > "$bin.moddir"
  mv "$bin.tmp" "$bin"
fi
# Builds of other sources are pruned once unused for a week, not at once: checkouts of other
# sources on the same machine (worktrees, branches) use theirs at the same time, and a
# binary deleted between this script's answer and a test's start fails that test.
touch "$bin"
find "$dir" -mindepth 1 -maxdepth 1 -type f -name "$name-*" ! -name "$name-$digest*" -mtime +7 -delete
echo "$bin"
