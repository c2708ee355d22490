#!/usr/bin/env bash
# Builds the node's components from the pinned Go modules in tests/k8s/modules/ (each a Go
# module of its own, with go.mod/go.sum committed; the components are `tool`s of it):
#
#   kubernetes/  k8s.io/kubernetes     kube-apiserver, kube-controller-manager, kube-scheduler,
#                                      kubelet, kubectl
#   containerd/  containerd/v2         containerd, containerd-shim-runc-v2, ctr
#   etcd/        etcd/server/v3        etcd
#   cri-tools/   sigs.k8s.io/cri-tools crictl
#
#   bash tests/k8s/build.sh        # prints the directory holding the binaries
#
# The binaries go to /var/lib/meshinit-test/k8s-<hash>/bin (MESHINIT_K8S_CACHE overrides
# the parent), <hash> covering every go.mod and go.sum, this script and the Go version: a
# run with the same inputs finds them there and builds nothing. Each component is built
# once, with `-p 2` (the project's machines have 2 cores), static (CGO_ENABLED=0),
# -trimpath and stripped; the time each took goes to build-times.txt beside bin/.
# Sources come from the Go module proxy (or the module cache), checked against go.sum.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
modules="$here/modules"

export GOTOOLCHAIN=local GOFLAGS=-mod=readonly CGO_ENABLED=0
command -v go >/dev/null || { echo "build.sh: needs go" >&2; exit 1; }

version_of() { # MODULE-DIR MODULE-PATH: the pinned version
  (cd "$modules/$1" && go list -m -f '{{.Version}}' "$2")
}

key="$(
  {
    go version
    cat "$0"
    for dir in kubernetes containerd etcd cri-tools; do
      echo "== $dir"
      cat "$modules/$dir/go.mod" "$modules/$dir/go.sum"
    done
  } | sha256sum | cut -c1-16
)"
cache="${MESHINIT_K8S_CACHE:-/var/lib/meshinit-test}/k8s-$key"
bin="$cache/bin"
if [ -f "$cache/complete" ]; then
  echo "$bin"
  exit 0
fi

mkdir -p "$cache"
rm -rf "$bin.tmp" && mkdir -p "$bin.tmp"
: >"$cache/build-times.txt"
flags=(-p 2 -trimpath)

build() { # NAME MODULE-DIR LDFLAGS [-tags TAGS] PACKAGE... (binaries named after their packages' dirs)
  local name="$1" dir="$2" ldflags="$3"
  shift 3
  local start end
  start=$(date +%s)
  echo "build.sh: building $name ($*)" >&2
  (cd "$modules/$dir" && go build "${flags[@]}" -ldflags="-s -w $ldflags" -o "$bin.tmp/" "$@")
  end=$(date +%s)
  echo "$name $((end - start))s" | tee -a "$cache/build-times.txt" >&2
}

k8s="$(version_of kubernetes k8s.io/kubernetes)"
k8s_minor="${k8s#v1.}"
k8s_minor="${k8s_minor%%.*}"
cv=k8s.io/component-base/version
build kubernetes kubernetes \
  "-X $cv.gitVersion=$k8s -X $cv.gitMajor=1 -X $cv.gitMinor=$k8s_minor -X $cv.gitTreeState=clean" \
  k8s.io/kubernetes/cmd/kube-apiserver k8s.io/kubernetes/cmd/kube-controller-manager \
  k8s.io/kubernetes/cmd/kube-scheduler k8s.io/kubernetes/cmd/kubelet k8s.io/kubernetes/cmd/kubectl

containerd="$(version_of containerd github.com/containerd/containerd/v2)"
cpkg=github.com/containerd/containerd/v2
# As containerd's Makefile builds them: urfave_cli_no_docs everywhere, no_grpc for the
# shim; no cgo, so the btrfs snapshotter (cgo only) is left out.
build containerd containerd "-X $cpkg/version.Version=$containerd -X $cpkg/version.Package=$cpkg" \
  -tags urfave_cli_no_docs $cpkg/cmd/containerd $cpkg/cmd/ctr
build containerd-shim containerd "-X $cpkg/version.Version=$containerd -X $cpkg/version.Package=$cpkg" \
  -tags "urfave_cli_no_docs no_grpc" $cpkg/cmd/containerd-shim-runc-v2

build etcd etcd "" go.etcd.io/etcd/server/v3
mv "$bin.tmp/server" "$bin.tmp/etcd"

build crictl cri-tools "" sigs.k8s.io/cri-tools/cmd/crictl

for tool in kube-apiserver kube-controller-manager kube-scheduler kubelet kubectl containerd containerd-shim-runc-v2 ctr etcd crictl; do
  [ -x "$bin.tmp/$tool" ] || { echo "build.sh: $tool was not built" >&2; exit 1; }
done
rm -rf "$bin" && mv "$bin.tmp" "$bin"
du -sh "$bin" | tee -a "$cache/build-times.txt" >&2
touch "$cache/complete"
echo "$bin"
