#!/usr/bin/env bash
# Builds the static release binary that the image ships; prints its path.
#
#   scripts/build-static.sh [TRIPLE [CARGO-ARGS…]]
#
# TRIPLE: the host's by default; aarch64-unknown-linux-gnu on an x86_64 machine links with
# Debian's gcc-aarch64-linux-gnu (and libc6-dev-arm64-cross for glibc's static libraries),
# unless CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_LINKER names another linker. CARGO-ARGS
# build more targets in the same run (tests/vm/run.sh: `--example vm_probe`).
set -euo pipefail
cd "$(dirname "$0")/.."
host="$(rustc -vV | sed -n 's/^host: //p')"
target="${1:-$host}"
[ $# -eq 0 ] || shift
if [ "$target" = aarch64-unknown-linux-gnu ] && [ "$host" != "$target" ]; then
  export CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_LINKER="${CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_LINKER:-aarch64-linux-gnu-gcc}"
fi
RUSTFLAGS="-C target-feature=+crt-static" \
  cargo build --release --quiet --target "$target" --target-dir target/static --bin meshinit "$@"
echo "target/static/$target/release/meshinit"
