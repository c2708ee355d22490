#!/usr/bin/env bash
# docs/kernels.md from tests/vm/run.sh's results file (lines: arch release suite engine
# outcome detail…).
set -euo pipefail
results="$1"
engines=(iptables-legacy iptables-legacy+sets iptables-nft iptables-nft+sets nftables nftables+sets)
cases=(fresh legacy-empty legacy-rules retry-tproxy native sets)

cell() {
  # cell ARCH RELEASE SUITE ENGINE: the outcome, and for the missing-parts boots the backend
  # or the refusal.
  awk -v a="$1" -v r="$2" -v s="$3" -v e="$4" '
    $1 == a && $2 == r && $3 == s && ($4 == e || $4 == "-") {
      out = $5
      if (s != "matrix" && $5 == "ok") { out = "ok: " $6; gsub(/backend=|"/, "", out) }
      if ($5 == "refused") { out = "refused: " $6; sub(/lacks=/, "no ", out) }
      print out; found = 1; exit
    }
    END { if (!found) print "–" }' "$results"
}

cat <<'EOF'
# Kernels and arches: the matrix

Produced by `bash tests/vm/run.sh` (do not edit by hand): Debian's stock kernels, booted
under qemu (TCG) from an initramfs with Debian bookworm's userland for the guest's arch
(iptables 1.8.9 legacy and nft, nftables 1.0.6, iproute2, kmod, ipset, busybox; on arm64
with the xtables extensions rebuilt as in the image, scripts/build-xtables.sh), the
kernel's own netfilter modules, loaded on demand, and this tree's static meshinit for that
arch. In each guest, real traffic in network namespaces (documentation addresses), per
engine, with and without `--match-sets`: REDIRECT with dual-stack, DNS capture and
excluded ports, CIDRs and inbound ports; a re-run that must leave the rules exactly as they
were; a switch of the same pod to TPROXY (inbound keeps the client's address, v4 and v6);
cleanup, after which nothing of meshinit's is left (rules, chains, tables, sets, routing).
`ok` means every check of every step passed. See tests/vm/guest/checks.sh. Engines:
`iptables-legacy` and `iptables-nft` are `--force-iptables-binary legacy|nft`, `nftables`
is `--native-nftables --nftables-apply netlink`; `+sets` adds `--match-sets`.

EOF
header="| kernel | arch |"
rule="| --- | --- |"
for e in "${engines[@]}"; do header="$header $e |"; rule="$rule --- |"; done
echo "$header"
echo "$rule"
awk '$3 == "matrix" { print $1, $2 }' "$results" | sort -u -k2,2V -k1,1 | while read -r arch release; do
  line="| $release | $arch |"
  for e in "${engines[@]}"; do line="$line $(cell "$arch" "$release" matrix "$e") |"; done
  echo "$line"
done

cat <<'EOF'

## Kernels with parts missing

The same boots with modules taken away before anything loads them (as if the kernel had
been built without them), or with `ipv6.disable=1`. meshinit runs with Istio's injector
arguments and no backend flag, so this is its default choice; per case
(tests/vm/guest/missing.sh): `fresh` a new namespace; `legacy-empty` legacy tables that
exist but hold no rules; `legacy-rules` a legacy table holding another tool's rule;
`retry-tproxy` the pod's next try after a failed TPROXY attempt on iptables-legacy;
`native` `--native-nftables`; `sets` `--match-sets` with lists of excluded ports and
CIDRs (ipsets on iptables), which must still go out uncaptured. `ok: BACKEND`: the rules
applied there and captured real traffic; `refused: no MODULE`: meshinit changed nothing
and exited 3 with one error naming what the kernel lacks (that module) and the flag that
picks another backend.

EOF
header="| kernel | arch | kernel lacks |"
rule="| --- | --- | --- |"
for c in "${cases[@]}"; do header="$header $c |"; rule="$rule --- |"; done
echo "$header"
echo "$rule"
awk '$3 != "matrix" { print $1, $2, $3 }' "$results" | sort -u -k2,2V -k1,1 -k3,3 | while read -r arch release suite; do
  line="| $release | $arch | $suite |"
  for c in "${cases[@]}"; do line="$line $(cell "$arch" "$release" "$suite" "$c") |"; done
  echo "$line"
done
