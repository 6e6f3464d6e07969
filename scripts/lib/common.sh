# Shared by scripts/test, scripts/lab and scripts/bench: install what the project needs.
# Packages come from Debian; nothing else is downloaded except crates from crates.io.

# Debian packages every command needs (etcd for the datastore, protoc and the well-known
# .proto files (libprotobuf-dev, only a Recommends of protoc) for etcd-client's
# build, iproute2 for namespaces, prometheus for promtool, openssl for TLS test
# certificates, podman/runc/busybox-static as a real CNI client, the reference CNI
# plugins, nftables/iputils for dataplane tests, BIRD/GoBGP/FRR/ExaBGP as real BGP peers).
CALICO_APT_PACKAGES=(protobuf-compiler libprotobuf-dev etcd-server etcd-client iproute2 iputils-ping nftables iptables ipset iperf3 prometheus procps psmisc
    openssl podman runc catatonit busybox-static containernetworking-plugins util-linux tar
    bird2 gobgpd frr exabgp)

need_root() {
    if [ "$(id -u)" -ne 0 ]; then
        echo "$1 needs root (it installs packages and creates network namespaces)." >&2
        exit 1
    fi
}

install_deps() {
    local missing=()
    for p in "${CALICO_APT_PACKAGES[@]}"; do
        dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p")
    done
    if [ "${#missing[@]}" -gt 0 ]; then
        echo ">>> installing Debian packages: ${missing[*]}"
        export DEBIAN_FRONTEND=noninteractive
        apt-get update -qq
        apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
    fi
    # prometheus (the server) is only installed for promtool: never leave it running.
    if systemctl is-active --quiet prometheus 2>/dev/null; then systemctl stop prometheus || true; fi
    if ! command -v cargo >/dev/null 2>&1; then
        echo "cargo is not installed: install a Rust toolchain (rustup) first." >&2
        exit 1
    fi
}
