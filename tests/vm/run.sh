#!/usr/bin/env bash
# The kernel matrix: meshinit on Debian's stock kernels, amd64 and arm64, in VMs.
#
#   bash tests/vm/run.sh [--quick] [--only ARCH/VERSION] [--no-missing] [--no-table]
#
# Each guest boots one of the pinned kernels below under qemu (TCG: no KVM needed), from a
# small initramfs: Debian bookworm's userland for the guest's arch (iptables 1.8.9 legacy
# and nft, nftables 1.0.6, iproute2, kmod, ipset, busybox, dash: the image's tools, extracted
# without running maintainer scripts; arm64's xtables extensions rebuilt as in the image,
# scripts/build-xtables.sh), that kernel's netfilter modules (from the same
# package, with modules.dep), the static release meshinit built from this tree for that
# arch, and examples/vm_probe.rs (the integration tests' helper roles). In the guest,
# tests/vm/guest/checks.sh builds network namespaces (documentation addresses only) and
# sends real traffic through meshinit's rules on each engine, with and without
# --match-sets; then the boots with parts of the kernel taken away (tests/vm/guest/
# missing.sh). Results come back on the serial console; every boot has a hard timeout and
# powers off at the end.
#
# --quick: one amd64 kernel and one arm64 kernel, and four of the missing-parts boots on
# the amd64 one (what scripts/test.sh runs on every CI run). Without it, every kernel
# below, and docs/kernels.md is rewritten with the table (unless --no-table or --only).
#
# Needs root (only for the cache directory and apt's download), qemu-system-x86,
# qemu-system-arm, cpio, xz-utils, busybox-static's package from Debian (fetched), cargo with
# the aarch64-unknown-linux-gnu target and gcc-aarch64-linux-gnu + libc6-dev-arm64-cross,
# and for the arm64 extensions make, pkg-config and dpkg-dev.
# Fetched packages and built pieces are cached in $MESHINIT_VM_CACHE
# (/var/lib/meshinit-test/vm), keyed by package version; apt uses a private APT_CONFIG
# there, never the machine's sources. The static builds' cargo target directory is there
# too, so that a fresh clone (CI's) compiles only meshinit, not its dependencies.
set -euo pipefail
cd "$(dirname "$0")/../.."
repo="$PWD"

# arch, suite, kernel package, pinned version. Debian's point-release kernels: a version
# leaves the mirror when its suite's next point release lands (bullseye's is final); then
# bump the pin here.
KERNELS=(
  "amd64 bullseye linux-image-5.10.0-32-amd64 5.10.223-1"
  "amd64 bookworm linux-image-6.1.0-50-amd64 6.1.176-1"
  "amd64 trixie linux-image-6.12.117+deb13-amd64 6.12.117-1"
  "arm64 bookworm linux-image-6.1.0-50-arm64 6.1.176-1"
  "arm64 trixie linux-image-6.12.117+deb13-arm64 6.12.117-1"
)
QUICK=("amd64/6.1.176-1" "arm64/6.1.176-1")
# The guest's userland: bookworm's, as in the image (its dependencies resolved by apt).
USERLAND=(iptables=1.8.9-2 nftables=1.0.6-2+deb12u2 iproute2=6.1.0-3 kmod=30+20221128-1
  ipset=7.17-1 busybox-static=1:1.35.0-4+deb12u1+b1 dash=0.5.12-2)
# The boots of kernels with parts missing, run on one kernel per arch in the matrix:
# name, modules taken away, extra kernel command line.
MISSING=(
  "no-legacy-nat|iptable_nat,ip6table_nat|"
  "no-legacy|ip_tables,ip6_tables|"
  "no-nf_tables|nf_tables|"
  "no-xt_owner|xt_owner|"
  "no-xt_TPROXY|xt_TPROXY|"
  "no-ip_set|ip_set|"
  "ipv6-disabled||ipv6.disable=1"
)
MISSING_ON=("amd64/6.1.176-1" "arm64/6.1.176-1")
# --quick: these of them, on the first of MISSING_ON only.
MISSING_QUICK=(no-legacy-nat no-nf_tables no-xt_owner ipv6-disabled)
BOOT_TIMEOUT="${MESHINIT_VM_TIMEOUT:-900}"
jobs="${MESHINIT_VM_JOBS:-$(nproc)}"

usage() { echo "usage: tests/vm/run.sh [--quick] [--only ARCH/VERSION] [--no-missing] [--no-table]" >&2; exit 2; }
quick=false only= table=true missing=true
while [ $# -gt 0 ]; do
  case "$1" in
    --quick) quick=true; shift ;;
    --only) [ $# -ge 2 ] || usage; only="$2"; shift 2 ;;
    --no-table) table=false; shift ;;
    --no-missing) missing=false; shift ;;
    *) usage ;;
  esac
done

cache="${MESHINIT_VM_CACHE:-/var/lib/meshinit-test/vm}"
mkdir -p "$cache"
log() { echo "vm: $*" >&2; }
die() { echo "vm: $*" >&2; exit 1; }
for tool in qemu-system-x86_64 qemu-system-aarch64 cpio xz depmod apt-get dpkg-deb cargo \
  make pkg-config dpkg-source; do
  command -v "$tool" >/dev/null || die "needs $tool"
done

triple_of() { case "$1" in amd64) echo x86_64-unknown-linux-gnu ;; arm64) echo aarch64-unknown-linux-gnu ;; esac; }

# --- apt, privately -----------------------------------------------------------------------
aptdir="$cache/apt"
apt_setup() {
  mkdir -p "$aptdir/etc/apt.conf.d" "$aptdir/etc/preferences.d" "$aptdir/state/lists/partial" \
    "$aptdir/cache/archives/partial"
  local keyring=/usr/share/keyrings/debian-archive-keyring.gpg
  : >"$aptdir/etc/sources.list"
  for suite in bullseye bookworm trixie; do
    echo "deb [signed-by=$keyring] http://deb.debian.org/debian $suite main" >>"$aptdir/etc/sources.list"
  done
  # The userland's iptables source, for the extensions scripts/build-xtables.sh rebuilds.
  echo "deb-src [signed-by=$keyring] http://deb.debian.org/debian bookworm main" >>"$aptdir/etc/sources.list"
  cat >"$aptdir/apt.conf" <<EOF
Dir::Etc "$aptdir/etc";
Dir::Etc::sourcelist "$aptdir/etc/sources.list";
Dir::Etc::sourceparts "-";
Dir::Etc::preferencesparts "$aptdir/etc/preferences.d";
Dir::Etc::parts "$aptdir/etc/apt.conf.d";
Dir::State "$aptdir/state";
Dir::State::status "$aptdir/state/status";
Dir::Cache "$aptdir/cache";
APT::Architectures { "amd64"; "arm64"; };
APT::Architecture "amd64";
Acquire::Languages "none";
APT::Sandbox::User "root";
EOF
  touch "$aptdir/state/status"
}
# Once per run (papt runs in command substitutions too, so a file says it was done).
papt() {
  if [ ! -f "$runs/apt-updated" ]; then
    apt_setup
    log "apt-get update (private lists in $aptdir)"
    APT_CONFIG="$aptdir/apt.conf" apt-get update -qq >&2 || die "apt-get update failed"
    touch "$runs/apt-updated"
  fi
  APT_CONFIG="$aptdir/apt.conf" "$@"
}

# --- the kernel: vmlinuz and its netfilter modules, cached by package version ---------------
# Prints the directory: vmlinuz, release (uname -r), modules/lib/modules/<release>/…
kernel_dir() {
  local arch="$1" pkg="$2" version="$3"
  local dir="$cache/kernels/$arch/$pkg=$version"
  if [ ! -f "$dir/done" ]; then
    log "fetching $pkg=$version ($arch)"
    rm -rf "$dir" && mkdir -p "$dir/deb" "$dir/x"
    (cd "$dir/deb" && papt apt-get download -qq "$pkg:$arch=$version") >&2 \
      || die "cannot fetch $pkg:$arch=$version (has the pin left the mirror? bump KERNELS)"
    dpkg-deb -x "$dir"/deb/*.deb "$dir/x"
    local mods
    mods="$(find "$dir/x" -maxdepth 4 -type d -path '*/lib/modules/*' -prune | head -n1)"
    [ -n "$mods" ] || die "$pkg has no modules"
    local release
    release="$(basename "$mods")"
    cp "$dir/x/boot/vmlinuz-$release" "$dir/vmlinuz"
    local out="$dir/modules/lib/modules/$release"
    mkdir -p "$out"
    cp "$mods"/modules.order "$mods"/modules.builtin* "$out/"
    # Netfilter (iptables, nf_tables, conntrack, NAT, TPROXY, ip_set), veth, and what they
    # need (crc32c for conntrack and NAT).
    (cd "$mods" && find kernel/net/netfilter kernel/net/ipv4/netfilter kernel/net/ipv6/netfilter \
        kernel/drivers/net/veth.ko* kernel/lib kernel/crypto -name '*.ko*' 2>/dev/null) \
      | while read -r ko; do mkdir -p "$out/$(dirname "$ko")" && cp "$mods/$ko" "$out/$ko"; done
    depmod -b "$dir/modules" "$release"
    echo "$release" >"$dir/release"
    (cd "$dir/modules" && find . | cpio -o -H newc --quiet) >"$dir/modules.cpio"
    rm -rf "$dir/deb" "$dir/x" "$dir/modules"
    touch "$dir/done"
  fi
  echo "$dir"
}

# --- the userland: Debian's packages for the arch, extracted, as one cpio -----------------
# As in the image, the extensions of an arch whose Debian extensions are padded (arm64)
# are rebuilt from the source of the same iptables (scripts/build-xtables.sh, with the
# -dev packages it needs fetched too); the cache key covers that script.
userland_cpio() {
  local arch="$1"
  local key rebuild=false
  if bash scripts/build-xtables.sh rebuilds "$arch"; then rebuild=true; fi
  key="$( { printf '%s\n' "${USERLAND[@]}"; ! $rebuild || cat scripts/build-xtables.sh; } \
    | sha256sum | cut -c1-12)"
  local dir="$cache/userland/$arch-$key"
  if [ ! -f "$dir/done" ]; then
    log "fetching the $arch userland: ${USERLAND[*]}"
    rm -rf "$dir" && mkdir -p "$dir/debs" "$dir/root"
    local wanted=()
    for p in "${USERLAND[@]}"; do wanted+=("${p%%=*}:$arch=${p#*=}"); done
    if $rebuild; then wanted+=("libmnl-dev:$arch" "libnftnl-dev:$arch"); fi
    # apt resolves the dependencies against an empty status: everything they need.
    papt apt-get install -qq -y --download-only --no-install-recommends \
      -o Dir::Cache::archives="$dir/debs" -o APT::Default-Release=bookworm "${wanted[@]}" >&2 \
      || die "cannot fetch the $arch userland"
    for deb in "$dir"/debs/*.deb; do dpkg-deb -x "$deb" "$dir/root"; done
    ls "$dir/debs" >"$dir/packages"
    if $rebuild; then
      log "rebuilding the $arch xtables extensions (scripts/build-xtables.sh)"
      papt bash scripts/build-xtables.sh fetch "$dir/root"
      bash scripts/build-xtables.sh build "$arch" "$dir/root" "$dir/root" \
        || die "cannot rebuild the $arch xtables extensions"
      rm -rf "$dir/root/usr/src" "$dir/root/usr/include"
    fi
    rm -rf "$dir/root/usr/share/doc" "$dir/root/usr/share/man" "$dir/root/usr/share/locale" \
      "$dir/root/usr/share/info" "$dir/debs"
    (cd "$dir/root" && find . | cpio -o -H newc --quiet) >"$dir/userland.cpio"
    rm -rf "$dir/root"
    touch "$dir/done"
  fi
  echo "$dir/userland.cpio"
}

# --- this tree's binaries, static, per arch -----------------------------------------------
build_static() {
  local triple="$1"
  STATIC_TARGET_DIR="$cache/target" \
    bash scripts/build-static.sh "$triple" --bin meshinit --example vm_probe >/dev/null \
    || die "cannot build meshinit for $triple"
  echo "$cache/target/$triple/release"
}

# The last cpio: /init, the checks, meshinit and the probe (made per run, not cached).
tail_cpio() {
  local arch="$1" out="$2" bin
  bin="$(build_static "$(triple_of "$arch")")"
  local root
  root="$(mktemp -d)"
  mkdir -p "$root/usr/local/bin" "$root/vm"
  cp "$bin/meshinit" "$bin/examples/vm_probe" "$root/usr/local/bin/"
  cp tests/vm/guest/init "$root/init"
  cp tests/vm/guest/*.sh "$root/vm/"
  chmod 755 "$root/init"
  (cd "$root" && find . | cpio -o -H newc --quiet) >"$out"
  rm -rf "$root"
}

# --- one boot -----------------------------------------------------------------------------
# boot ARCH KDIR INITRD CMDLINE LOG: runs the guest to its poweroff (or the timeout).
boot() {
  local arch="$1" kdir="$2" initrd="$3" cmdline="$4" console="$5"
  local qemu=()
  case "$arch" in
    amd64) qemu=(qemu-system-x86_64 -machine q35 -cpu max -append "console=ttyS0 $cmdline") ;;
    arm64) qemu=(qemu-system-aarch64 -machine virt -cpu cortex-a57 -append "console=ttyAMA0 $cmdline") ;;
  esac
  timeout --kill-after=10 "$BOOT_TIMEOUT" "${qemu[@]}" -m 1024 -smp 1 -nographic \
    -no-reboot -nic none -monitor none -serial "file:$console" \
    -kernel "$kdir/vmlinuz" -initrd "$initrd" </dev/null >/dev/null 2>&1 || true
}

# one_of WORD LIST…: whether WORD is in LIST. (Not `printf | grep -q`: under pipefail, grep
# leaving early can fail the pipeline with printf's SIGPIPE.)
one_of() {
  local word="$1" item
  shift
  for item in "$@"; do [ "$item" = "$word" ] && return 0; done
  return 1
}

selected() {
  local key="$1"
  if [ -n "$only" ]; then [ "$key" = "$only" ]; return; fi
  if $quick; then one_of "$key" "${QUICK[@]}"; return; fi
  return 0
}

runs="$cache/runs/$(date +%Y%m%dT%H%M%S)"
mkdir -p "$runs"
results="$runs/results"
: >"$results"
failed=0
declare -A tails=()
# First everything each boot needs (fetched or from the cache, and this tree's binaries),
# then the boots, $jobs at a time (TCG runs one guest CPU on one host thread).
boots=()
for entry in "${KERNELS[@]}"; do
  read -r arch suite pkg version <<<"$entry"
  key="$arch/$version"
  selected "$key" || continue
  kdir="$(kernel_dir "$arch" "$pkg" "$version")"
  if [ -z "${tails[$arch]:-}" ]; then
    tails[$arch]="$runs/tail-$arch.cpio"
    tail_cpio "$arch" "${tails[$arch]}"
  fi
  initrd="$runs/initrd-$arch-$version.cpio"
  cat "$(userland_cpio "$arch")" "$kdir/modules.cpio" "${tails[$arch]}" >"$initrd"
  specs=("matrix||")
  if $missing && one_of "$key" "${MISSING_ON[@]}"; then
    for spec in "${MISSING[@]}"; do
      if $quick && { [ "$key" != "${MISSING_ON[0]}" ] \
           || ! one_of "${spec%%|*}" "${MISSING_QUICK[@]}"; }; then
        continue
      fi
      specs+=("$spec")
    done
  fi
  for spec in "${specs[@]}"; do boots+=("$arch|$version|$kdir|$initrd|$spec"); done
done
[ "${#boots[@]}" -gt 0 ] || die "no kernel selected"
log "prepared in $SECONDS s; ${#boots[@]} boots, $jobs at a time"

one_boot() {
  IFS='|' read -r arch version kdir initrd name without extra <<<"$1"
  local console="$runs/console-$arch-$version-$name.log" t0=$SECONDS
  log "booting $(cat "$kdir/release") ($arch): $name"
  boot "$arch" "$kdir" "$initrd" \
    "quiet panic=-1 meshinit.suite=$name meshinit.without=$without $extra" "$console"
  log "$(cat "$kdir/release") ($arch) $name: $((SECONDS - t0)) s"
}
boots_started=$SECONDS
for b in "${boots[@]}"; do
  while [ "$(jobs -rp | wc -l)" -ge "$jobs" ]; do wait -n || true; done
  one_boot "$b" &
done
wait
log "boots took $((SECONDS - boots_started)) s"

for b in "${boots[@]}"; do
  IFS='|' read -r arch version kdir initrd name without extra <<<"$b"
  release="$(cat "$kdir/release")"
  console="$runs/console-$arch-$version-$name.log"
  if ! grep -q '^@@ DONE' "$console"; then
    log "$release ($arch) $name: no end on the console (timeout or crash); last lines:"
    tail -n 20 "$console" >&2 || true
    echo "$arch $release $name - FAIL boot" >>"$results"
    failed=1
    continue
  fi
  tr -d '\r' <"$console" | sed -n 's/^@@ RESULT //p' | while read -r engine outcome detail; do
    echo "$arch $release $name $engine $outcome $detail"
  done >>"$results"
  if [ "$(tr -d '\r' <"$console" | grep -c '^@@ RESULT .* FAIL')" != 0 ]; then
    failed=1
    log "$release ($arch) $name:"
    tr -d '\r' <"$console" | grep -E '^(@@ RESULT .* FAIL|!! )' >&2 || true
  fi
done
rm -f "$runs"/initrd-*.cpio "$runs"/tail-*.cpio
cat "$results"

if ! $quick && [ -z "$only" ] && $table; then
  bash tests/vm/table.sh "$results" >docs/kernels.md
  log "wrote docs/kernels.md"
fi
# Earlier runs' logs: keep the last five.
ls -1d "$cache"/runs/*/ 2>/dev/null | head -n -5 | xargs -r rm -rf
[ "$failed" = 0 ] || die "failures (consoles in $runs)"
log "all passed (consoles in $runs)"
