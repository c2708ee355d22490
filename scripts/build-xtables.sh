#!/usr/bin/env bash
# iptables' extensions (the libxt_*, libipt_*, libip6t_*, libebt_*, libarpt_* shared
# objects) for the arm64 image, rebuilt from Debian's source package of the version the
# image's iptables has, with Debian's configuration and flags, linked without RELRO.
#
#   build-xtables.sh rebuilds ARCH         succeeds when ARCH's extensions are rebuilt
#   build-xtables.sh fetch ROOT            ROOT's iptables source package into ROOT/usr/src/iptables
#   build-xtables.sh build ARCH ROOT OUT   the rebuilt extensions into OUT/usr/lib/<multiarch>/xtables
#
# Why: Debian links arm64 for 64 KiB pages (max-page-size, so that its binaries load on
# 64 KiB-page kernels: RHEL 9's kernel-64k, some Ampere setups), and bookworm's binutils
# ends the RELRO region on such a boundary. A segment's file offset must equal its address
# modulo that size, so each extension's data segment sits 64 KiB into its file: Debian's
# arm64 extensions take 7.9 MB. Linked with `-z norelro`, the data segment follows the
# code in the file (its address is still 64 KiB further on): the same alignment, loading on
# 4 and 64 KiB pages alike, and each file holds only its contents (1.1 MB for all of them).
# The cost: what RELRO protects (an extension's GOT, made read-only once relocated) stays
# writable, in the short-lived iptables processes meshinit starts. amd64's extensions are
# Debian's own: linked for 4 KiB pages, their padding is at most a page.
#
# `fetch` runs `apt-get source --download-only` for the version of iptables unpacked in
# ROOT, with whatever APT_CONFIG the caller set (its sources must have deb-src lines); apt
# checks the files against the archive's signed index. `build` needs, in ROOT: Debian's
# iptables for ARCH (its changelog names the version; its extensions are the list to
# rebuild), libmnl-dev and libnftnl-dev (iptables' configure asks pkg-config for them),
# and the source package `fetch` put in ROOT/usr/src/iptables. On the build machine:
# ARCH's gcc (a cross compiler: <multiarch>-gcc), make, pkg-config, dpkg-dev. Nothing
# in ROOT runs.
set -euo pipefail

die() { echo "build-xtables.sh: $*" >&2; exit 1; }
usage() { die "usage: build-xtables.sh rebuilds ARCH | fetch ROOT | build ARCH ROOT OUT"; }

# The Debian version of the iptables unpacked in ROOT (extracted packages have no dpkg
# status; the changelog's first line is the version's).
iptables_version() {
  local changelog="$1/usr/share/doc/iptables/changelog.Debian.gz"
  [ -f "$changelog" ] || die "no iptables in $1 ($changelog is missing)"
  gzip -dc "$changelog" | sed -n '1s/^iptables (\([^)]*\)).*/\1/p'
}

case "${1:-}" in
  rebuilds)
    [ $# -eq 2 ] || usage
    [ "$2" = arm64 ]
    ;;
  fetch)
    [ $# -eq 2 ] || usage
    root="$2"
    version="$(iptables_version "$root")"
    [ -n "$version" ] || die "cannot read iptables' version in $root"
    mkdir -p "$root/usr/src/iptables"
    cd "$root/usr/src/iptables"
    if ! ls ./*.dsc >/dev/null 2>&1; then
      apt-get source --download-only -qq -o APT::Sandbox::User=root "iptables=$version" >&2 \
        || die "cannot fetch iptables' source package, version $version (deb-src in the sources?)"
    fi
    ;;
  build)
    [ $# -eq 4 ] || usage
    arch="$2" root="$(realpath "$3")" out="$(realpath -m "$4")"
    multi="$(dpkg-architecture -a"$arch" -qDEB_HOST_MULTIARCH 2>/dev/null)"
    build_type="$(dpkg-architecture -qDEB_BUILD_GNU_TYPE 2>/dev/null)"
    version="$(iptables_version "$root")"
    upstream="${version#*:}"
    upstream="${upstream%-*}"
    dsc="$root/usr/src/iptables/iptables_${version#*:}.dsc"
    [ -f "$dsc" ] || die "no $dsc: the source of the iptables in $root (build-xtables.sh fetch)"
    debian_ext="$root/usr/lib/$multi/xtables"
    [ -d "$debian_ext" ] || die "no $debian_ext"
    for tool in "$multi-gcc" "$multi-strip" "$multi-readelf" make pkg-config dpkg-source dpkg-buildflags; do
      command -v "$tool" >/dev/null || die "needs $tool"
    done

    work="$(mktemp -d)"
    trap 'rm -rf "$work"' EXIT
    echo "build-xtables.sh: iptables $version's extensions for $arch" >&2
    # The build's own output goes to a log, shown when a step fails.
    quietly() {
      "$@" >>"$work/build.log" 2>&1 || { tail -n 40 "$work/build.log" >&2; die "failed: $*"; }
    }
    quietly dpkg-source --no-copy -x "$dsc" "$work/src"
    cd "$work/src"
    # Debian's configuration (debian/rules), checked, so that a version configured
    # differently fails here instead of building other extensions.
    grep -q -- '--disable-libipq --enable-devel' debian/rules \
      || die "iptables $version's debian/rules configures differently than this script"
    grep -q 'hardening=+all' debian/rules || die "iptables $version's debian/rules: hardening changed"
    export DEB_BUILD_MAINT_OPTIONS=hardening=+all DEB_HOST_ARCH="$arch"
    flags() { dpkg-buildflags --get "$1"; }
    export CC="$multi-gcc"
    export PKG_CONFIG_LIBDIR="$root/usr/lib/$multi/pkgconfig:$root/usr/share/pkgconfig"
    export PKG_CONFIG_SYSROOT_DIR="$root"
    quietly ./configure --build="$build_type" --host="$multi" --prefix=/usr --sysconfdir=/etc \
      --localstatedir=/var --runstatedir=/run --disable-dependency-tracking \
      --disable-libipq --enable-devel --libdir="/usr/lib/$multi" \
      --with-xtlibdir="/usr/lib/$multi/xtables" \
      CFLAGS="$(flags CFLAGS)" CPPFLAGS="$(flags CPPFLAGS)" LDFLAGS="$(flags LDFLAGS)"
    jobs="$(nproc)"
    quietly make -j"$jobs" -C libxtables
    quietly make -j"$jobs" -C extensions LDFLAGS="$(flags LDFLAGS) -Wl,-z,norelro"
    quietly make -C extensions install DESTDIR="$work/install"
    built="$work/install/usr/lib/$multi/xtables"
    # As Debian's dh_strip does.
    find "$built" -type f -name '*.so' -exec "$multi-strip" --remove-section=.comment \
      --remove-section=.note --strip-unneeded {} +

    # Each of Debian's extensions is rebuilt, as a file where Debian's is a file and a link
    # to the same target where Debian's is a link, and with Debian's segment alignment (the
    # largest page size it loads on); one not rebuilt (its library is not in ROOT) stays
    # Debian's and is named.
    align() { "$multi-readelf" -lW "$1" | awk '$1 == "LOAD" { print $NF }' | sort -u; }
    for deb in "$debian_ext"/*.so; do
      name="$(basename "$deb")"
      new="$built/$name"
      if [ ! -e "$new" ] && [ ! -L "$new" ]; then
        echo "build-xtables.sh: not rebuilt: $name (Debian's stays)" >&2
      elif [ -L "$deb" ]; then
        [ "$(readlink "$new")" = "$(readlink "$deb")" ] \
          || die "$name: a link to $(readlink "$deb") in Debian's package, not in the build"
      else
        [ ! -L "$new" ] || die "$name: a file in Debian's package, a link in the build"
        [ "$(align "$new")" = "$(align "$deb")" ] \
          || die "$name: segments aligned to $(align "$new"), Debian's to $(align "$deb")"
      fi
    done
    for new in "$built"/*.so; do
      [ -e "$debian_ext/$(basename "$new")" ] || die "$(basename "$new"): not in Debian's package"
    done
    # (Measured before the copy: OUT may be ROOT.)
    echo "build-xtables.sh: $(find "$built" -name '*.so' | wc -l) extensions," \
      "$(du -sb --apparent-size "$built" | cut -f1) bytes (Debian's:" \
      "$(du -sb --apparent-size "$debian_ext" | cut -f1))" >&2
    mkdir -p "$out/usr/lib/$multi/xtables"
    cp -a "$built"/. "$out/usr/lib/$multi/xtables/"
    ;;
  *) usage ;;
esac
