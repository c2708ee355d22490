#!/usr/bin/env bash
# The main job, at your desk: build meshinit and dry-run a realistic pod.
#
# The pod is the one in examples/vault-app.annotations (a Kubernetes Downward API file):
# an app whose init container fetches secrets from Vault on port 8200, so that port is
# excluded from capture, with inbound capture on its two ports. The args are what
# meshinit's injection template passes: the fixed ports, and --annotations, from which
# meshinit derives everything Istio's injector would have rendered as istio-init args.
# --no-ipv6 and --dns-servers make the output the same on every machine.
set -euo pipefail
cd "$(dirname "$0")/.."
command -v cargo >/dev/null || { echo "demo.sh: needs a Rust toolchain (cargo)" >&2; exit 1; }
cargo build --release --quiet
exec ./target/release/meshinit print \
  -p 15001 -z 15006 --log_output_level=default:info \
  --annotations examples/vault-app.annotations \
  --redirect-dns --dns-servers 10.96.0.10 --no-ipv6 "$@"
