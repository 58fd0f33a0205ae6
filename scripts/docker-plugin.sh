#!/usr/bin/env bash
# Package ferrynet as a managed (v2) Docker plugin and create it in the local engine:
#
#   scripts/docker-plugin.sh [NAME] [BINARY]      (as root; default NAME ferrynet/ferrynet:latest,
#                                                  BINARY target/release/ferrynet)
#   docker plugin set NAME FERRYNET_STORE=etcd://10.0.0.1:2379   # optional, before enabling
#   docker plugin enable NAME
#   docker network create -d NAME --ipam-driver NAME --subnet 10.90.0.0/24 web
#
# The plugin runs `ferrynet agent --docker-socket /run/docker/plugins/ferrynet.sock` in the host's
# network and PID namespaces, with the host's /var/lib/ferrynet as its state directory (shared
# with the host's CLI and CNI plugin) and the Engine API socket for container names. Its root
# filesystem holds the binary and the tools it runs (nft, iptables with its extensions), with
# the shared libraries they load, copied from this machine. DOCKER_HOST (unix://…) selects the
# engine; DOCKER_PLUGIN_KEEP=DIR keeps the plugin directory there instead of a temporary one.
set -euo pipefail
cd "$(dirname "$0")/.."

name=${1:-ferrynet/ferrynet:latest}
bin=${2:-target/release/ferrynet}
[ -x "$bin" ] || { echo "no ferrynet binary at $bin (cargo build --release -p ferrynet)" >&2; exit 1; }
for tool in nft iptables ip6tables iptables-restore ip6tables-restore ldd; do
    command -v "$tool" >/dev/null || { echo "$tool is missing (apt-get install nftables iptables libc-bin)" >&2; exit 1; }
done

if [ -n "${DOCKER_PLUGIN_KEEP:-}" ]; then
    dir=$DOCKER_PLUGIN_KEEP
    rm -rf "$dir"
    mkdir -p "$dir"
else
    dir=$(mktemp -d)
    trap 'rm -rf "$dir"' EXIT
fi
root=$dir/rootfs
mkdir -p "$root"/{usr/bin,usr/sbin,etc,tmp,run,run/ferrynet,proc,sys,dev,var/lib/ferrynet,var/run}
# Debian's merged /usr: the usual top-level names are links into it.
for d in bin sbin lib lib64; do
    mkdir -p "$root/usr/$d"
    ln -sfn "usr/$d" "$root/$d"
done

# put SRC [DEST]: SRC (links followed) at DEST, by default SRC's own path, under the root's
# /usr (the root's /lib, /bin... are links into it, as on the host).
put() {
    local dest=${2:-$1}
    install -D -m 0755 "$(readlink -f "$1")" "$root/usr${dest#/usr}"
}
# libs FILE: the shared libraries FILE loads.
libs() {
    ldd "$(readlink -f "$1")" 2>/dev/null | awk '/=> \// { print $3 } /^[[:space:]]*\// { print $1 }'
}
# add FILE...: each file at its own path, with the libraries it loads.
add() {
    local f lib
    for f in "$@"; do
        put "$f"
        for lib in $(libs "$f"); do put "$lib"; done
    done
}
put "$bin" /usr/bin/ferrynet
for lib in $(libs "$bin"); do put "$lib"; done
# iptables-restore places ferrynet's FORWARD chain in one transaction (multi-call binaries: the
# name they are called by picks the tool, so each name is its own copy).
add "$(command -v nft)" "$(command -v iptables)" "$(command -v ip6tables)" \
    "$(command -v iptables-restore)" "$(command -v ip6tables-restore)"
# iptables loads its matches and targets at run time.
xt=$(dirname "$(ldd "$(readlink -f "$(command -v iptables)")" | awk '/libxtables/ { print $3 }')")/xtables
[ -d "$xt" ] && add "$xt"/*.so
# iptables-nft and nft read these.
for f in /etc/protocols /etc/services /etc/ethertypes; do
    [ -e "$f" ] && cp -L "$f" "$root$f"
done
echo 'hosts: files dns' >"$root/etc/nsswitch.conf"

cat >"$dir/config.json" <<'JSON'
{
  "description": "ferrynet: network and IPAM driver (bridges, multi-host fabric, DNS, load balancing)",
  "documentation": "docs/DOCKER.md in the ferrynet repository",
  "entrypoint": ["/usr/bin/ferrynet", "agent", "--docker-socket", "/run/docker/plugins/ferrynet.sock"],
  "workdir": "/",
  "interface": {
    "types": ["docker.networkdriver/1.0", "docker.ipamdriver/1.0"],
    "socket": "ferrynet.sock"
  },
  "network": { "type": "host" },
  "pidhost": true,
  "linux": {
    "capabilities": ["CAP_NET_ADMIN", "CAP_NET_RAW", "CAP_NET_BIND_SERVICE", "CAP_SYS_ADMIN",
                     "CAP_SYS_PTRACE", "CAP_DAC_OVERRIDE", "CAP_KILL", "CAP_SETUID", "CAP_SETGID"]
  },
  "env": [
    { "name": "FERRYNET_STORE", "description": "cluster store URL (empty: the embedded store)",
      "settable": ["value"], "value": "" },
    { "name": "FERRYNET_HOST", "description": "this host's name in the cluster (empty: the system's)",
      "settable": ["value"], "value": "" },
    { "name": "FERRYNET_UNDERLAY_DEV", "description": "underlay interface (empty: the default route's)",
      "settable": ["value"], "value": "" },
    { "name": "FERRYNET_LOG", "description": "log level", "settable": ["value"], "value": "info" }
  ],
  "mounts": [
    { "name": "state", "description": "ferrynet's state directory, shared with the host's CLI and CNI plugin",
      "source": "/var/lib/ferrynet", "destination": "/var/lib/ferrynet",
      "type": "bind", "options": ["rbind"], "settable": ["source"] },
    { "name": "run", "description": "the agent's socket (/run/ferrynet/agent.sock), for the host's `ferrynet status`",
      "source": "/run/ferrynet", "destination": "/run/ferrynet",
      "type": "bind", "options": ["rbind"], "settable": ["source"] },
    { "name": "docker-api", "description": "the Engine API socket (container names)",
      "source": "/var/run/docker.sock", "destination": "/var/run/docker.sock",
      "type": "bind", "options": ["rbind"], "settable": ["source"] },
    { "name": "netns", "description": "named network namespaces (health checks of CLI containers)",
      "source": "/run/netns", "destination": "/run/netns",
      "type": "bind", "options": ["rbind"], "settable": ["source"] }
  ]
}
JSON

mkdir -p /var/lib/ferrynet /run/ferrynet /run/netns
docker plugin create "$name" "$dir" >/dev/null
echo "created Docker plugin $name; enable it with: docker plugin enable $name"
