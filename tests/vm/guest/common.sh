# Helpers for the guest's checks (sourced): the pod and peer namespaces of the integration
# tests' topology (tests/integration/support/topology.rs), their servers (vm_probe, the
# tests' helper roles), clients, and what each connection must meet.
#
#   pod  eth0 192.0.2.2/24 2001:db8::2/64  ───  peer eth0 192.0.2.1/24 2001:db8::1/64
#                                                     lo 198.51.100.30 203.0.113.10 203.0.113.53
POD=vmpod
PEER=vmpeer
PROBE=/usr/local/bin/vm_probe
MESHINIT=/usr/local/bin/meshinit
VAULT=198.51.100.30:8200
VAULT_8300=198.51.100.30:8300
EXCLUDED_CIDR_TARGET=203.0.113.10:8200
POD_8080=192.0.2.2:8080
POD6_8080='[2001:db8::2]:8080'
PEER6='[2001:db8::1]:8200'
DNS=192.0.2.1:53
OTHER_DNS=203.0.113.53:53
# Whether the kernel has IPv6 (not with ipv6.disable=1).
if [ -e /proc/sys/net/ipv6 ]; then IPV6=true; else IPV6=false; fi

in_pod() { ip netns exec "$POD" "$@"; }
in_peer() { ip netns exec "$PEER" "$@"; }

# The namespaces, fresh (the previous case's are deleted with everything in them).
topology() {
  teardown
  ip netns add "$POD" && ip netns add "$PEER" || return 1
  ip -n "$POD" link set lo up
  ip -n "$PEER" link set lo up
  ip -n "$POD" link add eth0 type veth peer name eth0 netns "$PEER" || return 1
  ip -n "$POD" addr add 192.0.2.2/24 dev eth0
  ip -n "$PEER" addr add 192.0.2.1/24 dev eth0
  if $IPV6; then
    ip -n "$POD" addr add 2001:db8::2/64 dev eth0 nodad
    ip -n "$PEER" addr add 2001:db8::1/64 dev eth0 nodad
  fi
  for addr in 198.51.100.30 203.0.113.10 203.0.113.53; do
    ip -n "$PEER" addr add "$addr/32" dev lo
  done
  ip -n "$POD" link set eth0 up
  ip -n "$PEER" link set eth0 up
  ip -n "$POD" route add 198.51.100.0/24 via 192.0.2.1
  ip -n "$POD" route add 203.0.113.0/24 via 192.0.2.1
}

SERVERS=
teardown() {
  for pid in $SERVERS; do kill "$pid" 2>/dev/null; done
  for pid in $SERVERS; do wait "$pid" 2>/dev/null; done
  SERVERS=
  ip netns del "$POD" 2>/dev/null
  ip netns del "$PEER" 2>/dev/null
  return 0
}

# serve NS UID:GID NAME LISTENER…: a vm_probe server, in the background, once it is ready.
serve() {
  ns="$1" as="$2" name="$3"
  shift 3
  out="/tmp/serve-$name.log"
  : >"$out"
  ip netns exec "$ns" "$PROBE" --as "$as" serve "$name" "$@" >"$out" 2>&1 &
  pid=$!
  SERVERS="$SERVERS $pid"
  i=0
  while ! grep -q '^ready' "$out"; do
    i=$((i + 1))
    if [ "$i" -gt 100 ] || ! kill -0 "$pid" 2>/dev/null; then
      echo "!! $name did not start: $(cat "$out")"
      return 1
    fi
    sleep 0.1
  done
}

# on_any NS PROTO PORT…: tcp:0.0.0.0:P (and tcp:[::]:P with IPv6) for each port.
on_any() {
  kind="$1"
  shift
  for port in "$@"; do
    echo "$kind:0.0.0.0:$port"
    if $IPV6; then echo "$kind:[::]:$port"; fi
  done
}

SIDECAR=
# sidecar redirect|tproxy: Envoy's listeners; under TPROXY as Istio runs it, uid 0 and gid
# 1337 (root's capabilities stand in for its NET_ADMIN), the inbound listener transparent.
sidecar() {
  if [ -n "$SIDECAR" ]; then
    kill "$SIDECAR" 2>/dev/null
    wait "$SIDECAR" 2>/dev/null
  fi
  case "$1" in
    redirect) as=1337:1337 inbound=tcp ;;
    tproxy) as=0:1337 inbound=tproxy ;;
  esac
  dns6=
  if $IPV6; then dns6='udp:[::1]:15053'; fi
  # shellcheck disable=SC2046 # one word per listener
  serve "$POD" "$as" sidecar $(on_any tcp 15001 15053) $(on_any "$inbound" 15006) \
    udp:127.0.0.1:15053 $dns6 || return 1
  SIDECAR=$pid
}

# The peer's remote services and DNS servers, the pod's app; the sidecar in REDIRECT mode.
servers() {
  # shellcheck disable=SC2046
  serve "$PEER" 0:0 peer $(on_any tcp 8200 8300 53) udp:192.0.2.1:53 udp:203.0.113.53:53 \
    && serve "$POD" 1000:1000 app $(on_any tcp 8080 15021) \
    && sidecar redirect
}

# connect WHO PROTO TARGET: the one line the answering server sent (`by=… local=… orig=…
# client=…`), or `FAIL reason`. WHO: app (uid 1000 in the pod), proxy (1337 in the pod),
# peer (root in the peer).
connect() {
  case "$1" in
    app) ns=$POD as=1000:1000 ;;
    proxy) ns=$POD as=1337:1337 ;;
    peer) ns=$PEER as=0:0 ;;
  esac
  ip netns exec "$ns" "$PROBE" --as "$as" client "$2" "$3" 2>&1 | sed 's/^REPLY //'
}

# expect CASE WHO PROTO TARGET PATTERN: the answer must match PATTERN (grep -E); records a
# failure for CASE otherwise.
FAILURES=
expect() {
  case_="$1" who="$2" proto="$3" target="$4" pattern="$5"
  got="$(connect "$who" "$proto" "$target")"
  if ! echo "$got" | grep -qE "$pattern"; then
    echo "!! $ENGINE $case_: $who → $proto $target: expected /$pattern/, got: $got"
    FAILURES="$FAILURES $case_"
  fi
}

# Who answers what: the sidecar's outbound listener with the original destination kept,
# its inbound one, the real server.
captured() { echo "^by=sidecar:15001 .*orig=$(quote "$1") "; }
inbound() { echo "^by=sidecar:15006 .*orig=$(quote "$1") "; }
direct() { echo "^by=$1:[0-9]+ local=$(quote "$2") "; }
quote() { echo "$1" | sed -e 's/[.[]/\\&/g' -e 's/]/\\]/g'; }

# meshinit SUBCOMMAND ARGS…: runs meshinit in the pod; its log goes to /tmp/meshinit.log.
run_meshinit() {
  in_pod "$MESHINIT" "$@" >/tmp/meshinit.log 2>&1
}

# Everything netfilter and routing hold in the pod, every backend, as text to compare.
dump() {
  for tool in iptables-legacy-save ip6tables-legacy-save iptables-nft-save ip6tables-nft-save; do
    echo "== $tool"
    in_pod "$tool" 2>/dev/null | grep -v '^#' | sed 's/\[[0-9]*:[0-9]*\]//'
  done
  echo "== nft"
  in_pod nft list ruleset 2>/dev/null | sed 's/counter packets [0-9]* bytes [0-9]*/counter/'
  echo "== ipset"
  in_pod ipset save 2>/dev/null
  for family in -4 -6; do
    echo "== ip $family rule"
    in_pod ip "$family" rule show 2>/dev/null
    echo "== ip $family route table 133"
    in_pod ip "$family" route show table 133 2>/dev/null
  done
}

# What of meshinit's (or Istio's) a dump still holds: the needles of the integration
# tests' assert_nothing_of_ours, and Istio's nftables tables.
ours() {
  dump | grep -iE 'istio|proto 224|--comment meshinit|^create meshinit-|^== ip -[46] route table 133' -A1 \
    | grep -vE '^(--|== ip -[46] route table 133)$' | grep -v '^== ' 
}

result() {
  if [ -z "$FAILURES" ]; then
    echo "@@ RESULT $ENGINE ok $*"
  else
    echo "@@ RESULT $ENGINE FAIL $(echo "$FAILURES" | tr ' ' '\n' | sort -u | tr '\n' ' ')"
  fi
}
