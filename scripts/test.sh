#!/usr/bin/env bash
# Every test: formatting, lints, unit tests, Istio parity, and (as root) the real-kernel,
# real-traffic tests in throwaway network namespaces. Installs what they need when run as
# root on Debian/Ubuntu; without root those tests skip with a reason (under CI=true they
# fail instead, because there they must run).
set -euo pipefail
cd "$(dirname "$0")/.."

# Under CI=true nothing may skip: a step that cannot install what the tests need stops the
# run here, naming the step, rather than leaving tests to skip (or fail far from the cause).
# Elsewhere it only warns.
in_ci() { [ "${CI:-}" = true ]; }
cannot() {
  if in_ci; then
    echo "test.sh: $1; CI=true, so stopping: under CI every test must run" >&2
    exit 1
  fi
  echo "test.sh: $1; $2" >&2
}

# Each program the tests need, and the Debian package that has it. podman, runc and
# mmdebstrap build meshinit's image offline and run it in pods (tests/integration/image.rs).
# The CNI plugins (bridge, host-local), nsenter and catatonit (podman's pause image) run
# those pods on podman's CNI backend with meshinit-cni chained (tests/integration/cni_runtime.rs).
# ipset only reads the sets meshinit makes over netlink, as an independent check
# (tests/integration/support/state.rs). libseccomp's header: the Kubernetes node's runc is
# built from its Go module with seccomp (tests/k8s/build-addons.sh). qemu (system, for
# both arches; user-mode, to run the arm64 image's programs), cpio, kmod's depmod and xz
# build and boot the kernel matrix's guests (tests/vm/run.sh); the aarch64 cross linker
# and glibc build meshinit for arm64 (the VM guests, the arm64 image); with make, pkg-config
# and dpkg-dev, the arm64 guests' xtables extensions (scripts/build-xtables.sh).
declare -A package_of=(
  [qemu-system-x86_64]=qemu-system-x86 [qemu-system-aarch64]=qemu-system-arm
  [qemu-aarch64]=qemu-user [cpio]=cpio [depmod]=kmod [xz]=xz-utils
  [aarch64-linux-gnu-gcc]=gcc-aarch64-linux-gnu
  [/usr/aarch64-linux-gnu/lib/libc.a]=libc6-dev-arm64-cross
  [make]=make [pkg-config]=pkg-config [dpkg-source]=dpkg-dev
  [iptables-legacy-restore]=iptables [iptables-nft-restore]=iptables
  [ip6tables-legacy-restore]=iptables [ip]=iproute2 [setpriv]=util-linux [nft]=nftables
  [podman]=podman [runc]=runc [mmdebstrap]=mmdebstrap
  [/usr/lib/cni/bridge]=containernetworking-plugins [/usr/lib/cni/host-local]=containernetworking-plugins
  [nsenter]=util-linux [/usr/libexec/podman/catatonit]=catatonit [ipset]=ipset
  [openssl]=openssl [flock]=util-linux [/usr/include/seccomp.h]=libseccomp-dev
)
missing=()
for tool in "${!package_of[@]}"; do
  command -v "$tool" >/dev/null 2>&1 || [ -x "/usr/sbin/$tool" ] || [ -f "$tool" ] || missing+=("$tool")
done
if [ "${#missing[@]}" -gt 0 ]; then
  packages=$(for tool in "${missing[@]}"; do echo "${package_of[$tool]}"; done | sort -u | tr '\n' ' ')
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "test.sh: installing $packages(missing: ${missing[*]})"
    export DEBIAN_FRONTEND=noninteractive
    # shellcheck disable=SC2086 # one word per package
    apt-get update -qq && apt-get install -y -qq $packages >/dev/null \
      || cannot "could not install $packages" "kernel and image tests will skip"
  else
    cannot "missing ${missing[*]} (install $packages as root)" "kernel and image tests will skip"
  fi
fi
# The Kubernetes manifests and the injection template are checked against the API schemas
# (tests/integration/manifests.rs), offline, by kubernetes-validate.
if ! python3 -c 'import kubernetes_validate, yaml' >/dev/null 2>&1; then
  echo "test.sh: installing kubernetes-validate"
  python3 -m pip install --quiet --disable-pip-version-check kubernetes-validate==1.37.0 \
    || cannot "could not install kubernetes-validate" "the manifest tests will skip"
fi

# A second, newer nft (Debian trixie's, run with its own libraries) reads back what meshinit
# programs over netlink, so the encoder is not only judged by the nft it was modelled on
# (tests/integration/nft_golden.rs). Made once; kept with the tests' other cached state.
newer_nft=/var/lib/meshinit-test/nft-trixie
if [ ! -x "$newer_nft/usr/sbin/nft" ]; then
  if [ "$(id -u)" = 0 ] && command -v mmdebstrap >/dev/null; then
    echo "test.sh: making $newer_nft (mmdebstrap trixie nftables)"
    # mmdebstrap makes its target directory but not that directory's parent, which does not
    # exist yet on a fresh machine.
    mkdir -p "$(dirname "$newer_nft")"
    rm -rf "$newer_nft.tmp"
    if mmdebstrap --quiet --variant=essential --include=nftables trixie "$newer_nft.tmp"; then
      rm -rf "$newer_nft" && mv "$newer_nft.tmp" "$newer_nft"
    else
      rm -rf "$newer_nft.tmp"
      cannot "could not make $newer_nft" "the newer-nft checks will skip"
    fi
  else
    cannot "no $newer_nft (made as root, with mmdebstrap)" "the newer-nft checks will skip"
  fi
fi

# Rust's standard library for arm64, for the cross builds above.
if ! rustup target list --installed 2>/dev/null | grep -qx aarch64-unknown-linux-gnu; then
  echo "test.sh: adding the aarch64-unknown-linux-gnu target"
  rustup target add aarch64-unknown-linux-gnu \
    || cannot "could not add the aarch64-unknown-linux-gnu target" "the arm64 image and VM tests will fail"
fi

cargo fmt --check
cargo clippy --workspace --all-targets --quiet -- -D warnings
# helm, for the node agent's chart tests (tests/integration/chart.rs): built from its pinned
# module by tests/k8s/build-addons.sh, cached (tests/k8s/run.sh uses the same build).
if [ -z "${HELM:-}" ]; then
  if [ "$(id -u)" = 0 ] && command -v go >/dev/null; then
    if addons="$(bash tests/k8s/build-addons.sh)"; then
      export HELM="$addons/helm"
    else
      cannot "tests/k8s/build-addons.sh failed" "the chart tests will skip"
    fi
  else
    cannot "no helm (tests/k8s/build-addons.sh builds it, as root with go)" "the chart tests will skip"
  fi
fi
cargo test "$@"
# The node agent (agent/, its own crate so that the init container's binary stays small).
# Tested on its own, so the tests above build meshinit with exactly its own features, as
# its release build does (a workspace-wide build would unify the two crates' features).
if [ "$#" -eq 0 ]; then
  cargo test -p meshinit-cni-agent
fi

# The kernel matrix's quick set: Debian's 6.1 kernels for amd64 and arm64 booted under
# qemu, every engine with real traffic, and the amd64 one with modules taken away
# (tests/vm/run.sh --quick; `bash tests/vm/run.sh` is the whole matrix, docs/kernels.md).
# As root (its cache, /var/lib/meshinit-test/vm, and apt's download); not when test.sh was
# given arguments.
if [ "$#" -gt 0 ]; then
  echo "test.sh: arguments given: not running tests/vm/run.sh" >&2
elif [ "$(id -u)" != 0 ]; then
  cannot "tests/vm/run.sh needs root" "the kernel matrix will not run"
else
  vm_started=$SECONDS
  bash tests/vm/run.sh --quick
  echo "test.sh: the kernel matrix's quick set took $((SECONDS - vm_started)) s"
fi

# A single-node Kubernetes built from pinned Go modules (etcd, the API server, the
# controllers, the kubelet, containerd), with meshinit's pods on it in both modes
# (tests/k8s/run.sh; the first run builds the components, 7.5 to 17 minutes on 2 cores;
# later runs take them from the cache, and the scenarios take about 3.5 minutes). As
# root; not when test.sh was given arguments (those select cargo tests).
if [ "$#" -gt 0 ]; then
  echo "test.sh: arguments given (a selection of cargo tests): not running tests/k8s/run.sh" >&2
elif [ "$(id -u)" != 0 ]; then
  cannot "tests/k8s/run.sh needs root" "the Kubernetes node scenarios will skip"
elif ! command -v go >/dev/null; then
  cannot "tests/k8s/run.sh needs go (the components are built from Go modules)" \
    "the Kubernetes node scenarios will skip"
else
  bash tests/k8s/run.sh
fi
