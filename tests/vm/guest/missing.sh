# A kernel with parts missing (tests/vm/run.sh's MISSING: the modules init took away, or
# ipv6.disable=1): what a pod gets from meshinit's default choice, with Istio's injector
# arguments and no backend flag, in namespaces as users' nodes leave them:
#   fresh           a new namespace
#   legacy-empty    legacy tables exist but hold no rules (an `iptables-legacy -L` ran)
#   legacy-rules    a legacy table holds another tool's rule (a CNI plugin's, say)
#   retry-tproxy    after a failed TPROXY attempt on iptables-legacy, the pod's next try
#   native          --native-nftables
#   sets            --match-sets, with lists of excluded ports and CIDRs (ipsets on
#                   iptables): traffic to them goes out uncaptured
# Each either works (traffic captured: `ok`) or meshinit refuses with one error naming the
# flag that picks another backend, leaving nothing of its own (`refused`, which passes);
# anything else fails.
# One `@@ RESULT CASE ok|refused|FAIL …` line each.
. /vm/common.sh
SUITE="$1"

# Istio's injector arguments; dual-stack where the kernel has IPv6 (without it, nothing
# about IPv6 is said: meshinit finds out itself).
args() {
  echo "-p 15001 -z 15006 -u 1337 -m $1 -i * -b * -d 15090,15021,15020 --dns-servers="
  if $IPV6; then echo "--dual-stack --ipv6"; fi
}

# try CASE MODE [ARGS…]: the default apply, then traffic or the refusal.
try() {
  ENGINE="$1" mode="$2"
  shift 2
  FAILURES=
  set -f
  # shellcheck disable=SC2046
  if run_meshinit apply $(args "$mode") "$@"; then
    backend="$(grep -o 'backend="[^"]*"' /tmp/meshinit.log | head -n1)"
    expect traffic app tcp "$VAULT" "$(captured "$VAULT")"
    expect traffic proxy tcp "$VAULT" "$(direct peer "$VAULT")"
    if [ "$ENGINE" = sets ]; then
      expect traffic app tcp "$VAULT_8300" "$(direct peer "$VAULT_8300")"
      expect traffic app tcp "$EXCLUDED_CIDR_TARGET" "$(direct peer "$EXCLUDED_CIDR_TARGET")"
    fi
    if [ "$mode" = TPROXY ]; then
      expect traffic peer tcp "$POD_8080" "^by=sidecar:15006 local=$(quote "$POD_8080") .*client=192\.0\.2\.1:"
    else
      expect traffic peer tcp "$POD_8080" "$(inbound "$POD_8080")"
    fi
    result "$backend"
  else
    code=$?
    error="$(grep -iE 'error|fail' /tmp/meshinit.log | tail -n 3 | tr '\n' ' ')"
    if grep -qE -- '--(force-iptables-binary|native-nftables)' /tmp/meshinit.log; then
      echo "-- $ENGINE: $(grep '^meshinit:' /tmp/meshinit.log)"
      module="$(grep -o '(module [A-Za-z0-9_]*' /tmp/meshinit.log | head -n1 | sed 's/(module //')"
      left="$(ours)"
      if [ -n "$left" ]; then
        echo "!! $ENGINE: refused, but left: $left"
        echo "@@ RESULT $ENGINE FAIL refused-but-left-rules"
      else
        echo "@@ RESULT $ENGINE refused lacks=$module exit=$code"
      fi
    else
      echo "!! $ENGINE: meshinit exited $code: $(cat /tmp/meshinit.log)"
      echo "@@ RESULT $ENGINE FAIL exit=$code $error"
    fi
  fi
  set +f
}

fresh() {
  topology && servers || { echo "@@ RESULT $1 FAIL setup"; return 1; }
}

fresh fresh && try fresh REDIRECT
fresh legacy-empty && {
  in_pod iptables-legacy -t filter -L -n >/dev/null 2>&1
  in_pod iptables-legacy -t mangle -L -n >/dev/null 2>&1
  try legacy-empty REDIRECT
}
fresh legacy-rules && {
  in_pod iptables-legacy -t filter -A INPUT -p icmp -j ACCEPT 2>/dev/null
  try legacy-rules REDIRECT
}
fresh retry-tproxy && {
  sidecar tproxy
  set -f
  # shellcheck disable=SC2046
  run_meshinit apply $(args TPROXY) --force-iptables-binary legacy
  echo "-- the forced legacy attempt: exit $?, legacy tables: $(in_pod cat /proc/net/ip_tables_names | tr '\n' ' ')"
  set +f
  try retry-tproxy TPROXY
}
fresh native && try native REDIRECT --native-nftables
fresh sets && try sets REDIRECT --match-sets -o 8300,8301 -x 203.0.113.10/32,203.0.113.11/32
teardown
