#!/usr/bin/env bash
# Builds the static release binary that the image ships; prints its path.
set -euo pipefail
cd "$(dirname "$0")/.."
target="$(rustc -vV | sed -n 's/^host: //p')"
RUSTFLAGS="-C target-feature=+crt-static" \
  cargo build --release --quiet --target "$target" --target-dir target/static
echo "target/static/$target/release/meshinit"
