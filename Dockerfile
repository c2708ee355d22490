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
# Where the iptables and nft tools and their libraries come from: Debian bookworm
# (iptables 1.8.9, nftables 1.0.6).
ARG DEBIAN_IMAGE=debian:bookworm-slim

FROM ${RUST_IMAGE} AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY src ./src
# A member of the workspace: cargo reads its manifest even when building meshinit alone.
COPY agent ./agent
# glibc, statically linked: the binary needs no library, not even the image's libc.
RUN RUSTFLAGS="-C target-feature=+crt-static" \
      cargo build --release --locked --bin meshinit \
        --target x86_64-unknown-linux-gnu --target-dir /tmp/target \
 && cp /tmp/target/x86_64-unknown-linux-gnu/release/meshinit /meshinit \
 && rm -rf /tmp/target \
 && /meshinit --version

FROM ${DEBIAN_IMAGE} AS tools
# A base that already carries them (the offline build's) skips the download.
RUN if ! [ -x /usr/sbin/xtables-nft-multi ] || ! [ -x /usr/sbin/xtables-legacy-multi ] \
       || ! [ -x /usr/sbin/nft ]; then \
      apt-get update \
      && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
           iptables nftables \
      && rm -rf /var/lib/apt/lists/*; \
    fi
# Gather into /out: the two xtables multi-call binaries under the names meshinit runs, nft,
# each shared library those load (found with ldd, copied to its real path with its soname
# link; /lib and /lib64 stay links into /usr, as in Debian), and every xtables extension
# that needs no other library (iptables-save must be able to print whatever another tool
# put into the pod's namespace). That leaves out three, statistic, RATEEST and connlabel,
# which would bring in 1 MB more (libm, libnetfilter_conntrack); the build names them.
# Then each tool runs once, chrooted into /out: nothing it needs is missing.
RUN set -eu; \
    out=/out; sbin="$out/usr/sbin"; ext=/usr/lib/x86_64-linux-gnu/xtables; \
    tools="/usr/sbin/xtables-legacy-multi /usr/sbin/xtables-nft-multi /usr/sbin/nft"; \
    libs_of() { ldd "$@" | awk '$2 == "=>" { print $3 } NF == 2 && $1 ~ /^\// { print $1 }' \
                | sort -u; }; \
    mkdir -p "$sbin" "$out$ext" "$out/etc" "$out/run" "$out/tmp"; chmod 1777 "$out/tmp"; \
    cp -a $tools "$sbin/"; \
    for fam in iptables ip6tables; do \
      for backend in legacy nft; do \
        for kind in "" -restore -save; do \
          ln -s "xtables-$backend-multi" "$sbin/$fam-$backend$kind"; \
        done; \
      done; \
    done; \
    tool_libs="$(libs_of $tools)"; \
    for lib in $tool_libs; do \
      real="$(readlink -f "$lib")"; dir="$(readlink -f "$(dirname "$lib")")"; \
      mkdir -p "$out$(dirname "$real")" "$out$dir"; \
      cp -a "$real" "$out$real"; \
      if [ -L "$lib" ]; then cp -a "$lib" "$out$dir/"; fi; \
    done; \
    for so in "$ext"/*.so; do \
      more="$(libs_of "$so" | grep -vxF "$tool_libs" || true)"; \
      if [ -z "$more" ]; then cp -a "$so" "$out$ext/"; \
      else echo "left out $(basename "$so"), which needs" $more; fi; \
    done; \
    for link in /lib /lib64; do if [ -L "$link" ]; then cp -a "$link" "$out/"; fi; done; \
    chroot "$out" /usr/sbin/iptables-nft-save --version; \
    chroot "$out" /usr/sbin/ip6tables-legacy-restore --version; \
    chroot "$out" /usr/sbin/nft --version

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

# The node agent's image (charts/meshinit-cni): meshinit-cni-agent and the static meshinit
# it installs on each node as the CNI plugin, nothing else. Built only when asked for:
#
#   docker build --target agent -t meshinit-cni-agent:0.1.0 .
FROM ${RUST_IMAGE} AS agent-build
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY src ./src
COPY agent ./agent
RUN RUSTFLAGS="-C target-feature=+crt-static" \
      cargo build --release --locked -p meshinit-cni-agent \
        --target x86_64-unknown-linux-gnu --target-dir /tmp/target \
 && cp /tmp/target/x86_64-unknown-linux-gnu/release/meshinit-cni-agent /meshinit-cni-agent \
 && rm -rf /tmp/target \
 && /meshinit-cni-agent --version

FROM scratch AS agent
ARG VERSION=0.1.0
ARG SOURCE=https://example.invalid/meshinit
LABEL org.opencontainers.image.title="meshinit-cni-agent" \
      org.opencontainers.image.description="meshinit-cni's node agent: installs the plugin, keeps it chained, repairs pods that raced it" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.source="${SOURCE}" \
      org.opencontainers.image.licenses="Apache-2.0"
COPY --from=build /meshinit /usr/local/bin/meshinit
COPY --from=agent-build /meshinit-cni-agent /usr/local/bin/meshinit-cni-agent
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
