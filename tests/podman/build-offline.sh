#!/usr/bin/env bash
# Builds the repository's Dockerfile with podman, on a machine that reaches no image
# registry but does reach Debian's package mirror (as the project's machines do).
#
#   bash tests/podman/build-offline.sh [--target STAGE] [TAG]
#
# builds the Dockerfile's final stage, the default image, as TAG (default:
# localhost/meshinit:<version>); with `--target STAGE` (passed to `podman build --target`),
# the Dockerfile's stage STAGE instead, e.g. `--target nftables-only`, as TAG (default:
# localhost/meshinit:<version>-STAGE). Stages a build shares with an earlier one (the
# compiled binary) come from podman's layer cache.
#
# The Dockerfile's two base images become one local image: a Debian bookworm root
# filesystem made by mmdebstrap (with iptables, nftables, gcc and libc6-dev), imported with
# `podman import`, laid out like the official Rust image (RUSTUP_HOME=/usr/local/rustup,
# CARGO_HOME=/usr/local/cargo, cargo on PATH). The Rust toolchain itself is this machine's,
# bind-mounted read-only at those paths for the build, with its crate cache overlaid (cargo
# may extract into it; the host's copy is not written). The build runs with no network:
# everything it needs is local.
#
# Needs root, podman (with runc), mmdebstrap, cargo. The base image is made once and kept
# (its tag names a hash of the recipe); the Dockerfile build uses podman's layer cache.
#
# Environment:
#   PODMAN_OPTS      extra global podman options (word-split), e.g. --root/--runroot/--tmpdir
#   CONTAINERS_CONF  podman configuration (default: tests/podman/containers.conf)
#   RUSTUP_HOME, CARGO_HOME   the toolchain to mount (default: ~/.rustup, ~/.cargo)
# Prints `base <tag>` and `image <tag>` as its last lines.
set -euo pipefail
cd "$(dirname "$0")/../.."

usage() { echo "usage: build-offline.sh [--target STAGE] [TAG]" >&2; exit 2; }
stage=
while [ $# -gt 0 ]; do
  case "$1" in
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

version="$(sed -n 's/^version = "\(.*\)"$/\1/p' Cargo.toml | head -n1)"
tag="${1:-localhost/meshinit:$version${stage:+-$stage}}"
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

# The base image: one rootfs serves as both RUST_IMAGE and DEBIAN_IMAGE.
suite=bookworm
packages=iptables,nftables,gcc,libc6-dev
rust_env=(
  "ENV=PATH=/usr/local/cargo/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
  "ENV=RUSTUP_HOME=/usr/local/rustup"
  "ENV=CARGO_HOME=/usr/local/cargo"
)
recipe="mmdebstrap --variant=essential --include=$packages $suite; ${rust_env[*]}"
base_repo=localhost/meshinit-build-base
base="$base_repo:$suite-$(printf '%s' "$recipe" | sha256sum | cut -c1-12)"
if ! podman image exists "$base"; then
  echo "build-offline.sh: making $base ($recipe)" >&2
  rootfs="$(mktemp -d)"
  trap 'rm -rf "$rootfs"' EXIT
  mmdebstrap --quiet --variant=essential --include="$packages" "$suite" "$rootfs/rootfs.tar"
  changes=()
  for change in "${rust_env[@]}"; do changes+=(--change "$change"); done
  podman import --quiet "${changes[@]}" "$rootfs/rootfs.tar" "$base" >/dev/null
  rm -rf "$rootfs"
  trap - EXIT
  # Earlier recipes' base images are no longer used.
  for old in $(podman images --format '{{.Repository}}:{{.Tag}}' --filter "reference=$base_repo"); do
    [ "$old" = "$base" ] || podman rmi "$old" >/dev/null || true
  done
fi

# Every crate the build needs, in the cache the build mounts (a no-op when they are there).
CARGO_HOME="$cargo_home" cargo fetch --locked --quiet --target x86_64-unknown-linux-gnu

podman build --pull=never --network=none \
  --build-arg RUST_IMAGE="$base" --build-arg DEBIAN_IMAGE="$base" \
  --build-arg VERSION="$version" \
  --volume "$rustup_home:/usr/local/rustup:ro" \
  --volume "$cargo_home/bin:/usr/local/cargo/bin:ro" \
  --volume "$cargo_home/registry:/usr/local/cargo/registry:O" \
  "${target[@]}" --tag "$tag" --file Dockerfile . >&2
echo "base $base"
echo "image $tag"
