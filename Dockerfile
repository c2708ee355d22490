# meshinit's image: the static meshinit binary, iptables' save/restore tools (legacy and
# nft) and nftables' `nft` (for --native-nftables), with exactly the libraries those need.
# No shell, no package manager.
#
#   docker build -t meshinit:0.1.0 .
#
# Base images are build arguments, so that a build without a registry can name local
# images instead (tests/podman/build-offline.sh does that; see README, "The image").

# The Rust toolchain: anything with cargo, a C compiler and glibc's static libraries
# (libc6-dev), laid out like the official image (cargo on PATH).
ARG RUST_IMAGE=rust:1.95-slim-bookworm
# Debian bookworm on the build machine's platform, where the tools are gathered.
ARG DEBIAN_IMAGE=debian:bookworm-slim
# Debian bookworm on the build machine's platform, where the arm64 image's xtables
# extensions are compiled (scripts/build-xtables.sh; the compiler, make, pkg-config and
# dpkg-dev are installed into it unless it has them).
ARG XTABLES_BUILD_IMAGE=debian:bookworm-slim
# Where the iptables and nft tools and their libraries come from: Debian bookworm
# (iptables 1.8.9, nftables 1.0.6) for the image's arch (its packages are fetched into it
# unless it already has them).
ARG TARGET_ROOT_IMAGE=debian:bookworm-slim

# The arch the image is for (amd64 or arm64; `--platform linux/arm64` sets TARGETARCH) is
# only ever built for, never run: the compiler and the tools' gathering run on the build
# machine's platform (BUILDPLATFORM), so an arm64 image builds on amd64 without emulation.

# The target arch's root filesystem, where the tools and their libraries come from:
# TARGET_ROOT_IMAGE for TARGETARCH. Nothing runs in it.
FROM ${TARGET_ROOT_IMAGE} AS target-root

# The compiler, on the build machine, able to link for TARGETARCH: a cross linker and the
# Rust target when TARGETARCH is not the build machine's (taken from the image when it has
# them, as the offline build's does).
FROM --platform=$BUILDPLATFORM ${RUST_IMAGE} AS cross
ARG TARGETARCH
WORKDIR /src
RUN set -eu; \
    arch="${TARGETARCH:-$(dpkg --print-architecture)}"; \
    case "$arch" in \
      amd64) gnu=x86_64; triple=x86_64-unknown-linux-gnu ;; \
      arm64) gnu=aarch64; triple=aarch64-unknown-linux-gnu ;; \
      *) echo "TARGETARCH $arch: meshinit's image is built for amd64 and arm64" >&2; exit 1 ;; \
    esac; \
    if [ "$arch" != "$(dpkg --print-architecture)" ]; then \
      if ! command -v "$gnu-linux-gnu-gcc" >/dev/null; then \
        apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
          "gcc-$(echo "$gnu" | tr _ -)-linux-gnu" "libc6-dev-$arch-cross" \
        && rm -rf /var/lib/apt/lists/*; \
      fi; \
      rustup target list --installed | grep -qx "$triple" || rustup target add "$triple"; \
    fi
COPY Cargo.toml Cargo.lock ./
COPY src ./src
# A member of the workspace: cargo reads its manifest even when building meshinit alone.
COPY agent ./agent
COPY scripts/build-static.sh ./scripts/

FROM cross AS build
ARG TARGETARCH
# glibc, statically linked: the binary needs no library, not even the image's libc.
RUN set -eu; \
    bin="$(STATIC_TARGET_DIR=/tmp/target bash scripts/build-static.sh "${TARGETARCH:-}")"; \
    cp "$bin" /meshinit; \
    rm -rf /tmp/target; \
    if [ "${TARGETARCH:-$(dpkg --print-architecture)}" = "$(dpkg --print-architecture)" ]; then \
      /meshinit --version; \
    fi

# The target root, completed: TARGETARCH's iptables and nftables and, where the extensions
# are rebuilt (scripts/build-xtables.sh: arm64), libmnl-dev and libnftnl-dev (iptables'
# configure asks for them) and iptables' source package of the same version in
# /target/usr/src/iptables. A target root that already has them (the offline build's)
# needs no download; otherwise the packages are fetched and unpacked into it (no
# maintainer script runs: nothing there is executed), the source with this stage's own apt
# sources, deb-src added. readelf (binutils) reads any arch's binaries.
FROM --platform=$BUILDPLATFORM ${DEBIAN_IMAGE} AS target
ARG TARGETARCH
COPY --from=target-root / /target/
COPY scripts/build-xtables.sh /usr/local/lib/meshinit/
RUN set -eu; \
    arch="${TARGETARCH:-$(dpkg --print-architecture)}"; \
    xtables=/usr/local/lib/meshinit/build-xtables.sh; \
    multi="$(case "$arch" in amd64) echo x86_64-linux-gnu ;; arm64) echo aarch64-linux-gnu ;; esac)"; \
    packages=; \
    for tool in xtables-nft-multi xtables-legacy-multi nft; do \
      [ -e "/target/usr/sbin/$tool" ] || packages="iptables:$arch nftables:$arch"; \
    done; \
    source=; \
    if bash "$xtables" rebuilds "$arch"; then \
      for pc in libmnl libnftnl; do \
        [ -e "/target/usr/lib/$multi/pkgconfig/$pc.pc" ] || packages="$packages $pc-dev:$arch"; \
      done; \
      ls /target/usr/src/iptables/*.dsc >/dev/null 2>&1 || source=1; \
    fi; \
    if [ -n "$packages$source" ] || ! command -v readelf >/dev/null; then \
      if [ -n "$source" ]; then \
        if [ -f /etc/apt/sources.list.d/debian.sources ]; then \
          sed -i 's/^Types: deb$/Types: deb deb-src/' /etc/apt/sources.list.d/debian.sources; \
        fi; \
        if [ -f /etc/apt/sources.list ]; then \
          sed -n 's/^deb /deb-src /p' /etc/apt/sources.list >/etc/apt/sources.list.d/src.list; \
        fi; \
      fi; \
      dpkg --add-architecture "$arch" && apt-get update; \
      if ! command -v readelf >/dev/null; then \
        DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends binutils; \
      fi; \
      if [ -n "$packages" ]; then \
        mkdir -p /tmp/debs; \
        apt-get install -y --download-only --no-install-recommends -o Dir::Cache::archives=/tmp/debs \
          $packages; \
        for deb in /tmp/debs/*.deb; do dpkg-deb -x "$deb" /target; done; \
        rm -rf /tmp/debs; \
      fi; \
      if [ -n "$source" ]; then bash "$xtables" fetch /target; fi; \
      rm -rf /var/lib/apt/lists/*; \
    fi

# The rebuilt extensions (arm64; nothing for amd64) in /xtables, laid out as in the target
# root, compiled on the build machine (a cross compiler unless it is arm64 too).
FROM --platform=$BUILDPLATFORM ${XTABLES_BUILD_IMAGE} AS xtables
ARG TARGETARCH
COPY --from=target /target/ /target/
COPY scripts/build-xtables.sh /usr/local/lib/meshinit/
RUN set -eu; \
    arch="${TARGETARCH:-$(dpkg --print-architecture)}"; \
    xtables=/usr/local/lib/meshinit/build-xtables.sh; \
    mkdir /xtables; \
    if bash "$xtables" rebuilds "$arch"; then \
      multi="$(case "$arch" in amd64) echo x86_64-linux-gnu ;; arm64) echo aarch64-linux-gnu ;; esac)"; \
      if [ "$arch" = "$(dpkg --print-architecture)" ]; then compiler="gcc libc6-dev"; \
      else compiler="gcc-$(echo "$multi" | tr _ -) libc6-dev-$arch-cross"; fi; \
      missing=; \
      command -v "$multi-gcc" >/dev/null || missing="$compiler"; \
      for tool in make:make pkg-config:pkg-config dpkg-source:dpkg-dev; do \
        command -v "${tool%%:*}" >/dev/null || missing="$missing ${tool#*:}"; \
      done; \
      if [ -n "$missing" ]; then \
        apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
          $missing && rm -rf /var/lib/apt/lists/*; \
      fi; \
      bash "$xtables" build "$arch" /target /xtables; \
    fi

FROM target AS tools
ARG TARGETARCH
COPY --from=xtables /xtables/ /target/
# Gather into /out: the two xtables multi-call binaries under the names meshinit runs, nft,
# each shared library those load (the closure of their ELF NEEDED entries, found where the
# target's loader looks, copied to its real path with its soname link; /lib and /lib64 stay
# links into /usr, as in Debian), the loader, and every xtables extension that needs no
# other library (iptables-save must be able to print whatever another tool put into the
# pod's namespace). That leaves out three, statistic, RATEEST and connlabel, which would
# bring in 1 MB more (libm, libnetfilter_conntrack); the build names them. Paths inside
# /target resolve as they would with /target as the root (its links are absolute). Then,
# when the image is for this machine's arch, each tool runs once, chrooted into /out:
# nothing it needs is missing.
RUN set -eu; \
    arch="${TARGETARCH:-$(dpkg --print-architecture)}"; \
    case "$arch" in amd64) multi=x86_64-linux-gnu ;; arm64) multi=aarch64-linux-gnu ;; esac; \
    t=/target; out=/out; sbin="$out/usr/sbin"; ext="/usr/lib/$multi/xtables"; \
    tools="/usr/sbin/xtables-legacy-multi /usr/sbin/xtables-nft-multi /usr/sbin/nft"; \
    inroot() { \
      rest="${1#/}"; res=; hops=0; \
      while [ -n "$rest" ]; do \
        comp="${rest%%/*}"; \
        case "$rest" in */*) rest="${rest#*/}" ;; *) rest= ;; esac; \
        case "$comp" in ""|.) continue ;; ..) res="${res%/*}"; continue ;; esac; \
        if [ -L "$t$res/$comp" ]; then \
          hops=$((hops + 1)); [ "$hops" -lt 40 ] || return 1; \
          link="$(readlink "$t$res/$comp")"; \
          case "$link" in /*) res= ;; esac; \
          rest="${link#/}${rest:+/$rest}"; \
        else res="$res/$comp"; fi; \
      done; \
      echo "${res:-/}"; \
    }; \
    find_lib() { \
      for dir in "/lib/$multi" "/usr/lib/$multi" /lib /usr/lib; do \
        found="$(inroot "$dir/$1")"; \
        if [ -n "$found" ] && [ -e "$t$found" ]; then echo "$dir/$1"; return; fi; \
      done; \
      echo "no $1 in the target root" >&2; return 1; \
    }; \
    deps_of() { \
      for elf in "$@"; do \
        readelf -d "$t$(inroot "$elf")" | sed -n 's/.*(NEEDED).*\[\(.*\)\]$/\1/p'; \
      done | sort -u; \
    }; \
    interp="$(readelf -l "$t/usr/sbin/nft" | sed -n 's/.*interpreter: \(.*\)\]$/\1/p')"; \
    libs_of() { \
      seen=; todo="$(deps_of "$@")"; \
      while [ -n "$todo" ]; do \
        next=; \
        for soname in $todo; do \
          case " $seen " in *" $soname "*) continue ;; esac; \
          seen="$seen $soname"; \
          next="$next $(deps_of "$(find_lib "$soname")")"; \
        done; \
        todo="$next"; \
      done; \
      for soname in $seen; do find_lib "$soname"; done | sort -u; \
    }; \
    mkdir -p "$sbin" "$out$ext" "$out/etc" "$out/run" "$out/tmp"; chmod 1777 "$out/tmp"; \
    for tool in $tools; do cp -a "$t$tool" "$sbin/"; done; \
    for fam in iptables ip6tables; do \
      for backend in legacy nft; do \
        for kind in "" -restore -save; do \
          ln -s "xtables-$backend-multi" "$sbin/$fam-$backend$kind"; \
        done; \
      done; \
    done; \
    tool_libs="$(libs_of $tools)"; \
    for lib in $tool_libs "$interp"; do \
      real="$(inroot "$lib")"; dir="$(inroot "$(dirname "$lib")")"; \
      mkdir -p "$out$(dirname "$real")" "$out$dir"; \
      cp -a "$t$real" "$out$real"; \
      if [ -L "$t$dir/$(basename "$lib")" ]; then cp -a "$t$dir/$(basename "$lib")" "$out$dir/"; fi; \
    done; \
    for so in "$t$ext"/*.so; do \
      more="$(libs_of "$ext/$(basename "$so")" | grep -vxF "$tool_libs" || true)"; \
      if [ -z "$more" ]; then cp -a "$so" "$out$ext/"; \
      else echo "left out $(basename "$so"), which needs" $more; fi; \
    done; \
    for link in /lib /lib64; do if [ -L "$t$link" ]; then cp -a "$t$link" "$out/"; fi; done; \
    if [ "$arch" = "$(dpkg --print-architecture)" ]; then \
      chroot "$out" /usr/sbin/iptables-nft-save --version; \
      chroot "$out" /usr/sbin/ip6tables-legacy-restore --version; \
      chroot "$out" /usr/sbin/nft --version; \
    fi

# The nftables-only variant: the static binary alone, nothing else in the image (no
# iptables, no nft, no library). It programs Istio's nftables tables over netlink, so it is
# for pods with --native-nftables (NATIVE_NFTABLES is on here). Built only when asked for:
#
#   docker build --target nftables-only -t meshinit:0.1.0-nftables .
FROM scratch AS nftables-only
ARG VERSION=0.1.0
ARG SOURCE=https://example.invalid/meshinit
LABEL org.opencontainers.image.title="meshinit (nftables only)" \
      org.opencontainers.image.description="Drop-in replacement for Istio's istio-init, native nftables over netlink: the static binary alone" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.source="${SOURCE}" \
      org.opencontainers.image.licenses="Apache-2.0"
COPY --from=build /meshinit /usr/local/bin/meshinit
ENV NATIVE_NFTABLES=true
ENTRYPOINT ["/usr/local/bin/meshinit"]

# The node agent's image (charts/meshinit-cni): meshinit-cni-agent, the static meshinit it
# installs on each node as the CNI plugin, and the iptables and nft tools meshinit's image
# has: the agent runs that plugin on running pods (CHECK, ADD) from its own container,
# so the tools it reads and writes rules with are the image's. Built only when asked for:
#
#   docker build --target agent -t meshinit-cni-agent:0.1.0 .
FROM cross AS agent-build
ARG TARGETARCH
RUN set -eu; \
    bin="$(STATIC_TARGET_DIR=/tmp/target bash scripts/build-static.sh "${TARGETARCH:-}" \
             -p meshinit-cni-agent)"; \
    cp "$(dirname "$bin")/meshinit-cni-agent" /meshinit-cni-agent; \
    rm -rf /tmp/target; \
    if [ "${TARGETARCH:-$(dpkg --print-architecture)}" = "$(dpkg --print-architecture)" ]; then \
      /meshinit-cni-agent --version; \
    fi

FROM scratch AS agent
ARG VERSION=0.1.0
ARG SOURCE=https://example.invalid/meshinit
LABEL org.opencontainers.image.title="meshinit-cni-agent" \
      org.opencontainers.image.description="meshinit-cni's node agent: installs the plugin, keeps it chained, repairs pods that raced it" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.source="${SOURCE}" \
      org.opencontainers.image.licenses="Apache-2.0"
COPY --from=tools /out/ /
COPY --from=build /meshinit /usr/local/bin/meshinit
COPY --from=agent-build /meshinit-cni-agent /usr/local/bin/meshinit-cni-agent
ENV PATH=/usr/local/bin:/usr/sbin
# The node's xtables lock (the chart mounts the host's /run/xtables.lock): on
# iptables-legacy the agent's plugin runs wait for the node's other writers, as the
# runtime's do.
ENV XTABLES_LOCKFILE=/run/xtables.lock
ENTRYPOINT ["/usr/local/bin/meshinit-cni-agent"]

# The default image (the last stage): meshinit with iptables and nft.
FROM scratch
ARG VERSION=0.1.0
ARG SOURCE=https://example.invalid/meshinit
LABEL org.opencontainers.image.title="meshinit" \
      org.opencontainers.image.description="Drop-in replacement for Istio's istio-init: Istio's capture rules, applied atomically" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.source="${SOURCE}" \
      org.opencontainers.image.licenses="Apache-2.0"
COPY --from=tools /out/ /
COPY --from=build /meshinit /usr/local/bin/meshinit
ENV PATH=/usr/local/bin:/usr/sbin
# iptables-legacy takes a lock file, /run/xtables.lock by default, which a read-only root
# filesystem (readOnlyRootFilesystem: true) refuses. /dev/shm is a writable tmpfs in every
# container, and in a Kubernetes pod it is the pod's, shared by its containers: the lock
# then serializes exactly the writers of this pod's network namespace.
ENV XTABLES_LOCKFILE=/dev/shm/xtables.lock
ENTRYPOINT ["/usr/local/bin/meshinit"]
