#!/usr/bin/env bash
# Builds the node's add-ons from pinned Go modules:
#
#   modules/helm/   helm.sh/helm/v3               helm (installs Istio's charts)
#   modules/istio/  istio.io/istio                pilot-discovery (istiod), at the commit
#                                                 whose charts and injector interop/istio pins;
#                                                 pilot-agent, whose `istio-iptables` is Istio's
#                                                 istio-init (benches/istio.sh measures it; the
#                                                 node's Istio proxy_init image carries it);
#                                                 install-cni and the istio-cni plugin, Istio's
#                                                 CNI agent and plugin (its install-cni image)
#   modules/runc/   github.com/opencontainers/runc  runc, the node's OCI runtime: Debian 12's
#                                                 (1.1.5) has no idmapped mounts, so
#                                                 containerd could run no pod with
#                                                 hostUsers: false
#
#   bash tests/k8s/build-addons.sh     # prints the directory holding the binaries
#
# Kept apart from build.sh so that the node's Kubernetes components (the long build) keep
# their cache when these change. Cached in /var/lib/meshinit-test/k8s-addons-<hash>/bin
# (MESHINIT_K8S_CACHE overrides the parent), <hash> covering the modules' go.mod and go.sum,
# this script and the Go version. -trimpath, stripped, `-p 2`; static but for runc, which
# needs cgo (its nsexec is C) and libseccomp (Debian's libseccomp-dev), as runc's own
# release builds do.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
modules="$here/modules"

export GOTOOLCHAIN=local GOFLAGS=-mod=readonly CGO_ENABLED=0
command -v go >/dev/null || { echo "build-addons.sh: needs go" >&2; exit 1; }

key="$(
  {
    go version
    cat "$0"
    for dir in helm istio runc; do
      echo "== $dir"
      cat "$modules/$dir/go.mod" "$modules/$dir/go.sum"
    done
  } | sha256sum | cut -c1-16
)"
cache="${MESHINIT_K8S_CACHE:-/var/lib/meshinit-test}/k8s-addons-$key"
bin="$cache/bin"
if [ -f "$cache/complete" ]; then
  echo "$bin"
  exit 0
fi

mkdir -p "$cache"
rm -rf "$bin.tmp" && mkdir -p "$bin.tmp"
: >"$cache/build-times.txt"

build() { # NAME MODULE-DIR LDFLAGS [-tags TAGS] PACKAGE
  local name="$1" dir="$2" ldflags="$3" start
  shift 3
  start=$(date +%s)
  echo "build-addons.sh: building $name ($*)" >&2
  (cd "$modules/$dir" && go build -p 2 -trimpath -ldflags="-s -w $ldflags" -o "$bin.tmp/$name" "$@")
  echo "$name $(($(date +%s) - start))s" | tee -a "$cache/build-times.txt" >&2
}

helm="$(cd "$modules/helm" && go list -m -f '{{.Version}}' helm.sh/helm/v3)"
build helm helm "-X helm.sh/helm/v3/internal/version.version=$helm" helm.sh/helm/v3/cmd/helm
build pilot-discovery istio "" istio.io/istio/pilot/cmd/pilot-discovery
build pilot-agent istio "" istio.io/istio/pilot/cmd/pilot-agent
build install-cni istio "" istio.io/istio/cni/cmd/install-cni
build istio-cni istio "" istio.io/istio/cni/cmd/istio-cni
runc="$(cd "$modules/runc" && go list -m -f '{{.Version}}' github.com/opencontainers/runc)"
[ -f /usr/include/seccomp.h ] || { echo "build-addons.sh: runc needs libseccomp-dev" >&2; exit 1; }
CGO_ENABLED=1 build runc runc "-X main.version=${runc#v}" -tags seccomp github.com/opencontainers/runc

rm -rf "$bin" && mv "$bin.tmp" "$bin"
du -sh "$bin" | tee -a "$cache/build-times.txt" >&2
touch "$cache/complete"
echo "$bin"
