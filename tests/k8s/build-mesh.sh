#!/usr/bin/env bash
# Builds what installs and runs Istio's control plane on the node, from pinned Go modules:
#
#   modules/helm/   helm.sh/helm/v3      helm (installs Istio's charts, and meshinit's)
#   modules/istio/  istio.io/istio       pilot-discovery (istiod), at the commit whose
#                                        charts and injector interop/istio pins
#
#   bash tests/k8s/build-mesh.sh     # prints the directory holding the binaries
#
# Kept apart from build.sh so that the node's components (the long build) keep their cache
# when these change. Cached in /var/lib/meshinit-test/k8s-mesh-<hash>/bin (MESHINIT_K8S_CACHE
# overrides the parent), <hash> covering both modules' go.mod and go.sum, this script and
# the Go version. Static, -trimpath, stripped, `-p 2`.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
modules="$here/modules"

export GOTOOLCHAIN=local GOFLAGS=-mod=readonly CGO_ENABLED=0
command -v go >/dev/null || { echo "build-mesh.sh: needs go" >&2; exit 1; }

key="$(
  {
    go version
    cat "$0"
    for dir in helm istio; do
      echo "== $dir"
      cat "$modules/$dir/go.mod" "$modules/$dir/go.sum"
    done
  } | sha256sum | cut -c1-16
)"
cache="${MESHINIT_K8S_CACHE:-/var/lib/meshinit-test}/k8s-mesh-$key"
bin="$cache/bin"
if [ -f "$cache/complete" ]; then
  echo "$bin"
  exit 0
fi

mkdir -p "$cache"
rm -rf "$bin.tmp" && mkdir -p "$bin.tmp"
: >"$cache/build-times.txt"

build() { # NAME MODULE-DIR LDFLAGS PACKAGE
  local name="$1" dir="$2" ldflags="$3" package="$4" start
  start=$(date +%s)
  echo "build-mesh.sh: building $name ($package)" >&2
  (cd "$modules/$dir" && go build -p 2 -trimpath -ldflags="-s -w $ldflags" -o "$bin.tmp/$name" "$package")
  echo "$name $(($(date +%s) - start))s" | tee -a "$cache/build-times.txt" >&2
}

helm="$(cd "$modules/helm" && go list -m -f '{{.Version}}' helm.sh/helm/v3)"
build helm helm "-X helm.sh/helm/v3/internal/version.version=$helm" helm.sh/helm/v3/cmd/helm
build pilot-discovery istio "" istio.io/istio/pilot/cmd/pilot-discovery

rm -rf "$bin" && mv "$bin.tmp" "$bin"
du -sh "$bin" | tee -a "$cache/build-times.txt" >&2
touch "$cache/complete"
echo "$bin"
