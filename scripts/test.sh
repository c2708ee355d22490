#!/usr/bin/env bash
# Every test: formatting, lints, unit tests, Istio parity, and (as root) the real-kernel,
# real-traffic tests in throwaway network namespaces. Installs what they need when run as
# root on Debian/Ubuntu; without root those tests skip with a reason (under CI=true they
# fail instead, because there they must run).
set -euo pipefail
cd "$(dirname "$0")/.."

needed=(iptables-legacy-restore iptables-nft-restore ip6tables-legacy-restore ip setpriv nft)
missing=()
for tool in "${needed[@]}"; do
  command -v "$tool" >/dev/null 2>&1 || [ -x "/usr/sbin/$tool" ] || missing+=("$tool")
done
if [ "${#missing[@]}" -gt 0 ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "test.sh: installing iptables, iproute2, nftables, util-linux (missing: ${missing[*]})"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq iptables iproute2 nftables util-linux >/dev/null
  else
    echo "test.sh: missing ${missing[*]}; kernel tests will skip (install iptables iproute2 nftables util-linux)"
  fi
fi

cargo fmt --check
cargo clippy --all-targets --quiet -- -D warnings
cargo test "$@"
