#!/usr/bin/env bash
# Installs the Debian packages ferrynet's demo, tests or benchmarks need, when missing.
# Usage: scripts/deps.sh demo|test|bench
set -euo pipefail

need_root() {
  if [ "$(id -u)" != 0 ]; then
    echo "ferrynet: run this as root (it creates network namespaces, links and nftables rules)" >&2
    exit 1
  fi
}

packages_for() {
  # protobuf-compiler and libprotobuf-dev (its well-known .proto files): the etcd client's gRPC
  # code is generated with protoc when ferrynet builds;
  # gcc and libc6-dev: rustc links through cc, and ring (TLS) compiles C.
  local base="iproute2 nftables iptables util-linux procps iputils-ping python3 ca-certificates protobuf-compiler libprotobuf-dev gcc libc6-dev"
  case "$1" in
    demo) echo "$base" ;;
    # etcd-server: the store and multi-host tests run a real etcd; openssl makes TLS
    # certificates; busybox-static is the Docker tests' image; dnsutils (dig), knot-dnsutils
    # (kdig) and dnsmasq-base (a test upstream resolver) for the DNS tests; docker-compose for
    # the Docker scenario tests; containerd and runc run the CRI tests' private containerd
    # (whose pause image is busybox-static too), iperf3 measures bandwidth limits (theirs and
    # tests/cni_bandwidth.rs), and python3-pip installs their CRI client (below); tcpdump
    # captures the underlay in tests/sleeve.rs (no plaintext crosses it); bird2 and gobgpd
    # are the ToR routers of the BGP rack lab (tests/bgp.rs); prometheus scrapes the lab's
    # agents and chromium (headless) loads the topology page (tests/observability.rs); dpkg-dev
    # (dpkg-shlibdeps, for the package's dependencies) and systemd (systemd-analyze verify)
    # build and check the .deb (tests/package.rs).
    test) echo "$base dpkg-dev systemd containernetworking-plugins etcd-server openssl busybox-static dnsutils knot-dnsutils dnsmasq-base docker-compose containerd runc iperf3 python3-pip tcpdump bird2 gobgpd prometheus chromium" ;;
    # bench/docker.py imports the same busybox image as the Docker tests; bench/dns.py runs
    # dnsperf against ferrynet, aardvark-dns and dnsmasq (dig checks they answer).
    # bench/cri.py drives a private containerd over CRI, like the CRI tests.
    # bench/sleeve.py makes boringtun-cli's keys with python3-cryptography (boringtun-cli
    # itself: cargo install boringtun-cli). bench/bgp.py runs BIRD and GoBGP as routers and
    # as the anchor speakers.
    bench) echo "$base containernetworking-plugins netavark iperf3 time etcd-server busybox-static dnsperf aardvark-dns dnsmasq-base dnsutils containerd runc python3-pip python3-cryptography bird2 gobgpd" ;;
    *) echo "unknown set $1" >&2; exit 2 ;;
  esac
}

# The CRI tests' and benchmark's client: PyPI's CRI v1 stubs on grpcio, for the python3 the
# tests run. A failed install fails the script (the tests would fail later anyway).
CRI_CLIENT="container-runtime-interface-api==2.0.1"
install_cri_client() {
  python3 -c 'import grpc, cri_api.v1.api_pb2_grpc' 2>/dev/null && return 0
  echo "==> installing $CRI_CLIENT (pip)"
  # Debian's own python3 refuses pip installs into its site (PEP 668) unless told.
  python3 -m pip install --quiet "$CRI_CLIENT" 2>/dev/null ||
    python3 -m pip install --quiet --break-system-packages "$CRI_CLIENT"
  python3 -c 'import grpc, cri_api.v1.api_pb2_grpc'
}

install_missing() {
  local missing=()
  for p in $(packages_for "$1"); do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
  done
  if [ "${#missing[@]}" -gt 0 ]; then
    echo "==> installing ${missing[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  fi
  case "$1" in test | bench) install_cri_client ;; esac
  if ! command -v cargo >/dev/null 2>&1; then
    for d in "$HOME/.cargo/bin" /usr/local/cargo/bin; do
      [ -x "$d/cargo" ] && export PATH="$d:$PATH"
    done
  fi
  command -v cargo >/dev/null 2>&1 || {
    echo "ferrynet: cargo (Rust >= 1.90) is needed to build; install it with rustup" >&2
    exit 1
  }
}

if [ "${BASH_SOURCE[0]}" = "$0" ]; then
  need_root
  install_missing "${1:-test}"
fi
