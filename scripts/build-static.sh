#!/usr/bin/env bash
# Builds the static release binary that the image ships; prints its path.
#
#   scripts/build-static.sh [TARGET [CARGO-ARGS…]]
#
# TARGET: a Rust target triple or a Debian arch (amd64, arm64); empty or absent: the
# host's. aarch64-unknown-linux-gnu on another machine links with Debian's
# gcc-aarch64-linux-gnu (and libc6-dev-arm64-cross, glibc's static libraries), x86_64 on
# another with gcc-x86-64-linux-gnu, unless CARGO_TARGET_<TRIPLE>_LINKER names a linker.
# CARGO-ARGS choose what to build instead of `--bin meshinit` (tests/vm/run.sh adds
# `--example vm_probe`; the Dockerfile's agent stage, `-p meshinit-cni-agent`).
# STATIC_TARGET_DIR: cargo's target directory (default target/static).
set -euo pipefail
cd "$(dirname "$0")/.."
host="$(rustc -vV | sed -n 's/^host: //p')"
target="${1:-$host}"
[ $# -eq 0 ] || shift
case "$target" in
  amd64) target=x86_64-unknown-linux-gnu ;;
  arm64) target=aarch64-unknown-linux-gnu ;;
esac
[ $# -gt 0 ] || set -- --bin meshinit
if [ "$host" != "$target" ]; then
  var="CARGO_TARGET_$(echo "$target" | tr 'a-z-' 'A-Z_')_LINKER"
  export "$var=${!var:-${target%%-*}-linux-gnu-gcc}"
fi
dir="${STATIC_TARGET_DIR:-target/static}"
RUSTFLAGS="-C target-feature=+crt-static" \
  cargo build --release --locked --quiet --target "$target" --target-dir "$dir" "$@"
echo "$dir/$target/release/meshinit"
