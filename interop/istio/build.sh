#!/usr/bin/env bash
# Builds istio-oracle (Istio's capture code as a command, see main.go) and prints its path.
#
# The binary is kept per pinned Istio version and per source, so a run whose go.mod, go.sum
# and main.go are unchanged reuses it without starting Go at all. Modules are fetched once,
# through the Go module proxy, into Go's module cache; later builds are offline.
#
#   ISTIO_ORACLE_CACHE  where binaries are kept (default: /var/lib/meshinit-test as root,
#                       else $CARGO_TARGET_DIR or the repository's target/)
#   GO                  the go command (default: go on PATH, else /usr/local/go/bin/go)
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
repo="$(cd "$here/../.." && pwd)"

go_cmd="${GO:-}"
if [ -z "$go_cmd" ]; then
  if command -v go >/dev/null 2>&1; then go_cmd=go
  elif [ -x /usr/local/go/bin/go ]; then go_cmd=/usr/local/go/bin/go
  else echo "istio-oracle: no Go toolchain (set GO or put go on PATH)" >&2; exit 1
  fi
fi

version="$(awk '$1 == "istio.io/istio" { print $2 }' "$here/go.mod")"
if [ -z "$version" ]; then
  echo "istio-oracle: go.mod pins no istio.io/istio version" >&2
  exit 1
fi
# The pinned version names the directory; a digest of the sources tells builds within it
# apart, so editing main.go never runs a stale binary.
digest="$(cat "$here/go.mod" "$here/go.sum" "$here"/*.go | sha256sum | cut -c1-16)"

if [ -n "${ISTIO_ORACLE_CACHE:-}" ]; then cache="$ISTIO_ORACLE_CACHE"
elif [ "$(id -u)" = 0 ]; then cache=/var/lib/meshinit-test
else cache="${CARGO_TARGET_DIR:-$repo/target}"
fi
dir="$cache/istio-oracle-$version"
bin="$dir/istio-oracle-$digest"

# The module's directory holds Istio's own golden files, against which the tests check the
# oracle itself (tools/istio-*/pkg/capture/testdata); recorded beside the binary at build.
if [ ! -x "$bin" ] || [ ! -d "$(cat "$bin.moddir" 2>/dev/null)" ]; then
  mkdir -p "$dir"
  echo "istio-oracle: building against istio.io/istio $version (the first build fetches modules)" >&2
  # -mod=readonly: go.sum is the record of what was fetched; a build never rewrites it.
  # -p 2: the machines this runs on have two cores; don't starve the rest of the suite.
  (cd "$here" && GOFLAGS=-mod=readonly "$go_cmd" build -p 2 -trimpath -o "$bin.tmp" .)
  (cd "$here" && GOFLAGS=-mod=readonly "$go_cmd" list -m -f '{{.Dir}}' istio.io/istio) > "$bin.moddir"
  mv "$bin.tmp" "$bin"
  # Older builds of this version are dead weight once a newer source builds.
  find "$dir" -mindepth 1 -maxdepth 1 -type f -name 'istio-oracle-*' ! -name "istio-oracle-$digest*" -delete
fi
echo "$bin"
