# The matrix's checks in one guest: on each engine (iptables-legacy, iptables-nft, native
# nftables over netlink), with and without --match-sets, in fresh namespaces:
#   apply   REDIRECT, dual-stack, DNS capture, excluded ports, CIDRs and inbound ports;
#           traffic: outbound captured (v4, v6) with the original destination, the proxy's
#           own not, inbound to the sidecar (v4, v6), excludes reach the real server, DNS to
#           the configured server captured, to another not
#   rerun   the same again: the rules are exactly as they were, traffic as before
#   switch  the same pod to TPROXY: inbound keeps the client's address (v4, v6)
#   cleanup nothing of meshinit's left (rules, chains, tables, sets, routing), and the
#           app's traffic goes out uncaptured
# One `@@ RESULT ENGINE ok|FAIL …` line per engine.
. /vm/common.sh

# Istio's injector arguments, plus excludes given as lists (so that --match-sets has sets
# to make) and DNS capture for the peer's server.
base_args() {
  echo "-p 15001 -z 15006 -u 1337 -m $1 -i * -b * -d 15090,15021,15020"
  echo "-x 203.0.113.10/32,203.0.113.11/32 -o 8300,8301"
  echo "--redirect-dns --dns-servers 192.0.2.1"
  if $IPV6; then echo "--dual-stack --ipv6"; else echo "--ipv6=false"; fi
}

traffic() {
  c="$1"
  expect "$c" app tcp "$VAULT" "$(captured "$VAULT")"
  expect "$c" proxy tcp "$VAULT" "$(direct peer "$VAULT")"
  expect "$c" app tcp "$VAULT_8300" "$(direct peer "$VAULT_8300")"
  expect "$c" app tcp "$EXCLUDED_CIDR_TARGET" "$(direct peer "$EXCLUDED_CIDR_TARGET")"
  expect "$c" peer tcp "192.0.2.2:15021" "$(direct app 192.0.2.2:15021)"
  expect "$c" app udp "$DNS" '^by=sidecar:15053 '
  expect "$c" proxy udp "$DNS" "$(direct peer "$DNS")"
  expect "$c" app udp "$OTHER_DNS" "$(direct peer "$OTHER_DNS")"
  expect "$c" app tcp "$DNS" "$(captured "$DNS" | sed 's/15001/15053/')"
  if [ "$2" = redirect ]; then
    expect "$c" peer tcp "$POD_8080" "$(inbound "$POD_8080")"
  fi
  if $IPV6; then
    expect "$c" app tcp "$PEER6" "$(captured "$PEER6")"
    expect "$c" proxy tcp "$PEER6" "$(direct peer "$PEER6")"
    if [ "$2" = redirect ]; then
      expect "$c" peer tcp "$POD6_8080" "$(inbound "$POD6_8080")"
    fi
  fi
}

engine() {
  ENGINE="$1"
  shift
  FAILURES=
  start=$(date +%s)
  if ! topology || ! servers; then
    echo "@@ RESULT $ENGINE FAIL setup"
    teardown
    return
  fi
  # shellcheck disable=SC2046 # one word per argument (no argument has a space)
  set -f
  if run_meshinit apply $(base_args REDIRECT) "$@"; then
    traffic apply redirect
  else
    echo "!! $ENGINE apply: $(tail -n 5 /tmp/meshinit.log)"
    FAILURES="$FAILURES apply"
  fi
  dump >/tmp/before
  if run_meshinit apply $(base_args REDIRECT) "$@"; then
    dump >/tmp/after
    if ! cmp -s /tmp/before /tmp/after; then
      echo "!! $ENGINE rerun changed the rules:"
      diff /tmp/before /tmp/after | head -n 20
      FAILURES="$FAILURES rerun"
    fi
    expect rerun app tcp "$VAULT" "$(captured "$VAULT")"
  else
    echo "!! $ENGINE rerun: $(tail -n 5 /tmp/meshinit.log)"
    FAILURES="$FAILURES rerun"
  fi
  sidecar tproxy || FAILURES="$FAILURES switch"
  if run_meshinit apply $(base_args TPROXY) "$@"; then
    traffic switch tproxy
    expect switch peer tcp "$POD_8080" "^by=sidecar:15006 local=$(quote "$POD_8080") .*client=192\.0\.2\.1:"
    if $IPV6; then
      expect switch peer tcp "$POD6_8080" \
        "^by=sidecar:15006 local=$(quote "$POD6_8080") .*client=\[2001:db8::1\]:"
    fi
  else
    echo "!! $ENGINE switch: $(tail -n 5 /tmp/meshinit.log)"
    FAILURES="$FAILURES switch"
  fi
  if run_meshinit cleanup $(base_args TPROXY) "$@"; then
    left="$(ours)"
    if [ -n "$left" ]; then
      echo "!! $ENGINE cleanup left: $left"
      FAILURES="$FAILURES cleanup"
    fi
    expect cleanup app tcp "$VAULT" "$(direct peer "$VAULT")"
  else
    echo "!! $ENGINE cleanup: $(tail -n 5 /tmp/meshinit.log)"
    FAILURES="$FAILURES cleanup"
  fi
  set +f
  teardown
  result "$(($(date +%s) - start))s"
}

engine iptables-legacy --force-iptables-binary legacy
engine iptables-legacy+sets --force-iptables-binary legacy --match-sets
engine iptables-nft --force-iptables-binary nft
engine iptables-nft+sets --force-iptables-binary nft --match-sets
engine nftables --native-nftables --nftables-apply netlink
engine nftables+sets --native-nftables --nftables-apply netlink --match-sets
