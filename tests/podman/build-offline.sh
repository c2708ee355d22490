#!/usr/bin/env bash
# Builds the repository's Dockerfile with podman, on a machine that reaches no image
# registry but does reach Debian's package mirror (as the project's machines do).
#
#   bash tests/podman/build-offline.sh [--arch amd64|arm64] [--target STAGE] [TAG]
#
# builds the Dockerfile's final stage, the default image, as TAG (default:
# localhost/meshinit:<version>, with -ARCH added for an arch not the machine's); with
# `--target STAGE` (passed to `podman build --target`), the Dockerfile's stage STAGE
# instead, e.g. `--target nftables-only`, as TAG (default: localhost/meshinit:<version>-STAGE).
# `--arch` (default: this machine's) is the image's arch, `podman build --platform
# linux/ARCH`: the Dockerfile cross-compiles and gathers the tools on this machine, so
# nothing of the other arch runs (no emulation needed). Stages a build shares with an
# earlier one (the compiled binary) come from podman's layer cache.
#
# The Dockerfile's RUST_IMAGE and DEBIAN_IMAGE become one local image: a Debian bookworm
# root filesystem made by mmdebstrap (with iptables, nftables, gcc and libc6-dev, and the
# cross linker for the other arch), imported with `podman import`, laid out like the
# official Rust image (RUSTUP_HOME=/usr/local/rustup, CARGO_HOME=/usr/local/cargo, cargo on
# PATH). TARGET_ROOT_IMAGE, where the image's tools come from, is bookworm's iptables and
# nftables for ARCH, unpacked by mmdebstrap without running anything (--variant=extract),
# its /bin, /sbin and /lib merged into /usr as in Debian's images, imported for ARCH; for
# arm64 also libmnl-dev, libnftnl-dev and iptables' source package, and XTABLES_BUILD_IMAGE,
# where the Dockerfile rebuilds the arm64 extensions (scripts/build-xtables.sh): bookworm
# with the cross compiler, make, pkg-config and dpkg-dev.
# The Rust toolchain itself is this machine's (with the aarch64 target for arm64),
# bind-mounted read-only at those paths for the build, with its crate cache overlaid (cargo
# may extract into it; the host's copy is not written). The build runs with no network:
# everything it needs is local.
#
# Needs root, podman (with runc), mmdebstrap, cargo. The base images are made once and kept
# (their tags name a hash of the recipe); the Dockerfile build uses podman's layer cache.
#
# Environment:
#   PODMAN_OPTS      extra global podman options (word-split), e.g. --root/--runroot/--tmpdir
#   CONTAINERS_CONF  podman configuration (default: tests/podman/containers.conf)
#   RUSTUP_HOME, CARGO_HOME   the toolchain to mount (default: ~/.rustup, ~/.cargo)
# Prints `base <tag>`, `target-root <tag>` and `image <tag>` as its last lines.
set -euo pipefail
cd "$(dirname "$0")/../.."

usage() { echo "usage: build-offline.sh [--arch amd64|arm64] [--target STAGE] [TAG]" >&2; exit 2; }
stage=
host_arch="$(dpkg --print-architecture)"
arch="$host_arch"
while [ $# -gt 0 ]; do
  case "$1" in
    --arch) [ $# -ge 2 ] && [ -n "$2" ] || usage; arch="$2"; shift 2 ;;
    --arch=?*) arch="${1#--arch=}"; shift ;;
    --target) [ $# -ge 2 ] && [ -n "$2" ] || usage; stage="$2"; shift 2 ;;
    --target=?*) stage="${1#--target=}"; shift ;;
    --) shift; break ;;
    -*) usage ;;
    *) break ;;
  esac
done
[ $# -le 1 ] || usage
target=()
[ -z "$stage" ] || target=(--target "$stage")

case "$arch" in
  amd64) triple=x86_64-unknown-linux-gnu ;;
  arm64) triple=aarch64-unknown-linux-gnu ;;
  *) echo "build-offline.sh: --arch $arch: amd64 or arm64" >&2; exit 2 ;;
esac
arch_suffix=
[ "$arch" = "$host_arch" ] || arch_suffix="-$arch"
version="$(sed -n 's/^version = "\(.*\)"$/\1/p' Cargo.toml | head -n1)"
tag="${1:-localhost/meshinit:$version${stage:+-$stage}$arch_suffix}"
export CONTAINERS_CONF="${CONTAINERS_CONF:-$PWD/tests/podman/containers.conf}"
rustup_home="${RUSTUP_HOME:-$HOME/.rustup}"
cargo_home="${CARGO_HOME:-$HOME/.cargo}"
read -r -a podman_opts <<<"${PODMAN_OPTS:-}"
podman() { command podman "${podman_opts[@]}" "$@"; }

for tool in podman mmdebstrap cargo; do
  command -v "$tool" >/dev/null || { echo "build-offline.sh: needs $tool" >&2; exit 1; }
done
for dir in "$rustup_home" "$cargo_home/bin"; do
  [ -d "$dir" ] || { echo "build-offline.sh: no Rust toolchain at $dir (set RUSTUP_HOME/CARGO_HOME)" >&2; exit 1; }
done

# Earlier recipes' images (REPO's tags starting with PREFIX, other than KEEP) are no
# longer used.
remove_older() {
  local repo="$1" prefix="$2" keep="$3" old
  for old in $(podman images --format '{{.Repository}}:{{.Tag}}' --filter "reference=$repo"); do
    case "$old" in "$prefix"*) [ "$old" = "$keep" ] || podman rmi "$old" >/dev/null || true ;; esac
  done
}

# The base image: one rootfs serves as both RUST_IMAGE and DEBIAN_IMAGE.
suite=bookworm
packages=iptables,nftables,gcc,libc6-dev
# The other arch's linker and glibc (static libraries), for the cross build.
case "$host_arch" in
  amd64) packages="$packages,gcc-aarch64-linux-gnu,libc6-dev-arm64-cross" ;;
  arm64) packages="$packages,gcc-x86-64-linux-gnu,libc6-dev-amd64-cross" ;;
esac
rust_env=(
  "ENV=PATH=/usr/local/cargo/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
  "ENV=RUSTUP_HOME=/usr/local/rustup"
  "ENV=CARGO_HOME=/usr/local/cargo"
)
# essential_image REPO TAG RECIPE PACKAGES [CHANGE…]: TAG, unless it exists: mmdebstrap's
# essential variant of the suite with PACKAGES, imported with the CHANGEs (Dockerfile
# instructions); REPO's other tags for this suite are then removed.
essential_image() {
  local repo="$1" tag="$2" recipe="$3" include="$4" change rootfs
  shift 4
  podman image exists "$tag" && return
  echo "build-offline.sh: making $tag ($recipe)" >&2
  rootfs="$(mktemp -d)"
  trap 'rm -rf "$rootfs"' EXIT
  mmdebstrap --quiet --variant=essential --include="$include" "$suite" "$rootfs/rootfs.tar"
  local changes=()
  for change in "$@"; do changes+=(--change "$change"); done
  podman import --quiet "${changes[@]}" "$rootfs/rootfs.tar" "$tag" >/dev/null
  rm -rf "$rootfs"
  trap - EXIT
  remove_older "$repo" "${tag%-*}-" "$tag"
}
recipe="mmdebstrap --variant=essential --include=$packages $suite; ${rust_env[*]}"
base_repo=localhost/meshinit-build-base
base="$base_repo:$suite-$(printf '%s' "$recipe" | sha256sum | cut -c1-12)"
essential_image "$base_repo" "$base" "$recipe" "$packages" "${rust_env[@]}"

# The target root: the image's tools for ARCH, unpacked, nothing run. Where the xtables
# extensions are rebuilt (arm64: scripts/build-xtables.sh), also what that build needs from
# it: libmnl-dev, libnftnl-dev, and the iptables source package of the same version, which
# apt (mmdebstrap's own configuration, deb-src lines added) fetches into
# /usr/src/iptables. (podman 4.3 sets neither TARGETARCH nor BUILDPLATFORM for the
# Dockerfile, as BuildKit does: given below.)
root_packages=iptables,nftables
root_hooks=()
if bash scripts/build-xtables.sh rebuilds "$arch"; then
  root_packages="$root_packages,libmnl-dev,libnftnl-dev"
  root_hooks=(
    --setup-hook='sed -n "s/^deb /deb-src /p" "$1/etc/apt/sources.list" >>"$1/etc/apt/sources.list"'
    --extract-hook="APT_CONFIG=\"\$MMDEBSTRAP_APT_CONFIG\" bash $PWD/scripts/build-xtables.sh fetch \"\$1\""
  )
fi
# (The recipe names the hooks without this checkout's path, so that every clone shares it.)
root_recipe="mmdebstrap --variant=extract --architectures=$arch --include=$root_packages${root_hooks[*]:+ +deb-src, extract hook: build-xtables.sh fetch} $suite; merged /usr"
root_repo=localhost/meshinit-target-root
target_root="$root_repo:$suite-$arch-$(printf '%s' "$root_recipe" | sha256sum | cut -c1-12)"
if ! podman image exists "$target_root"; then
  echo "build-offline.sh: making $target_root ($root_recipe)" >&2
  work="$(mktemp -d)"
  trap 'rm -rf "$work"' EXIT
  mmdebstrap --quiet --variant=extract --architectures="$arch" --include="$root_packages" \
    "${root_hooks[@]}" "$suite" "$work/root"
  for dir in bin sbin lib lib64; do
    if [ -d "$work/root/$dir" ] && [ ! -L "$work/root/$dir" ]; then
      mkdir -p "$work/root/usr/$dir"
      cp -a "$work/root/$dir/." "$work/root/usr/$dir/"
      rm -rf "${work:?}/root/$dir"
      ln -s "usr/$dir" "$work/root/$dir"
    fi
  done
  tar -C "$work/root" -cf "$work/root.tar" .
  podman import --quiet --arch "$arch" "$work/root.tar" "$target_root" >/dev/null
  rm -rf "$work"
  trap - EXIT
  remove_older "$root_repo" "$root_repo:$suite-$arch-" "$target_root"
fi

# XTABLES_BUILD_IMAGE, where the Dockerfile compiles the extensions it rebuilds (arm64:
# scripts/build-xtables.sh): bookworm with ARCH's compiler, make, pkg-config and dpkg-dev.
# For an arch whose extensions are Debian's, nothing is compiled there: the base serves.
xtables_build="$base"
if bash scripts/build-xtables.sh rebuilds "$arch"; then
  if [ "$arch" = "$host_arch" ]; then xtables_packages=gcc,libc6-dev
  else xtables_packages="gcc-${triple%%-*}-linux-gnu,libc6-dev-$arch-cross"; fi
  xtables_packages="$xtables_packages,make,pkg-config,dpkg-dev"
  xtables_recipe="mmdebstrap --variant=essential --include=$xtables_packages $suite"
  xtables_repo=localhost/meshinit-xtables-build
  xtables_build="$xtables_repo:$suite-$arch-$(printf '%s' "$xtables_recipe" | sha256sum | cut -c1-12)"
  essential_image "$xtables_repo" "$xtables_build" "$xtables_recipe" "$xtables_packages"
fi

# Every crate the build needs, in the cache the build mounts (a no-op when they are there).
CARGO_HOME="$cargo_home" cargo fetch --locked --quiet --target "$triple"

podman build --pull=never --network=none --platform "linux/$arch" \
  --build-arg RUST_IMAGE="$base" --build-arg DEBIAN_IMAGE="$base" \
  --build-arg TARGET_ROOT_IMAGE="$target_root" --build-arg XTABLES_BUILD_IMAGE="$xtables_build" \
  --build-arg TARGETARCH="$arch" --build-arg BUILDPLATFORM="linux/$host_arch" \
  --build-arg VERSION="$version" \
  --volume "$rustup_home:/usr/local/rustup:ro" \
  --volume "$cargo_home/bin:/usr/local/cargo/bin:ro" \
  --volume "$cargo_home/registry:/usr/local/cargo/registry:O" \
  "${target[@]}" --tag "$tag" --file Dockerfile . >&2
echo "base $base"
echo "target-root $target_root"
echo "image $tag"
