#!/usr/bin/env bash
# The single-host demo: build ferrynet, create a network, start the agent (DNS, service VIPs),
# start two containers, show them talking by name and through a service's virtual IP, and show
# a published port answering a client that runs in another namespace.
# Run as root on Debian 12. Everything it creates is removed at the end.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/deps.sh
need_root
install_missing demo

echo "==> building ferrynet (release)"
cargo build --release --locked -p ferrynet 2>&1 | tail -n 2
FN="$PWD/target/release/ferrynet"
NET="demo$$"
WEB="web$$"
CLI="cli$$"
CLIENT="fn-demo-client-$$"
HOSTIF="fndemo$$"
SVC="hello$$"
STATE="${FERRYNET_STATE_DIR:-/var/lib/ferrynet}"
AGENT=""
AGENT_LOG=$(mktemp)
# The agent records this host in host.json and leaves its service table in place when it stops
# (restarts must not drop traffic); the demo puts both back as they were.
HOSTJSON_BACKUP=""
[ -f "$STATE/host.json" ] && HOSTJSON_BACKUP=$(mktemp) && cp "$STATE/host.json" "$HOSTJSON_BACKUP"
SVC_TABLE_BEFORE=$(nft list table inet ferrynet-svc >/dev/null 2>&1 && echo yes || echo no)

cleanup() {
  echo "==> cleaning up"
  "$FN" rm --force "$WEB" >/dev/null 2>&1 || true
  "$FN" rm --force "$CLI" >/dev/null 2>&1 || true
  "$FN" service deregister "$SVC" >/dev/null 2>&1 || true
  if [ -n "$AGENT" ]; then kill "$AGENT" 2>/dev/null || true; wait "$AGENT" 2>/dev/null || true; fi
  "$FN" network rm "$NET" >/dev/null 2>&1 || true
  [ "$SVC_TABLE_BEFORE" = no ] && nft delete table inet ferrynet-svc 2>/dev/null || true
  if [ -n "$HOSTJSON_BACKUP" ]; then mv "$HOSTJSON_BACKUP" "$STATE/host.json"; else rm -f "$STATE/host.json"; fi
  rm -f "$AGENT_LOG"
  ip netns del "$CLIENT" 2>/dev/null || true
  ip link del "$HOSTIF" 2>/dev/null || true
}
trap cleanup EXIT

step() { printf '\n\033[1m$ %s\033[0m\n' "$*"; "$@"; }

step "$FN" network create "$NET" --subnet 10.199.0.0/24 --subnet fd99:199::/64
step "$FN" network ls

echo
echo "==> the agent: DNS on each network's gateway, service VIPs, health checks (log: $AGENT_LOG)"
# --dns-upstream none: names outside the cluster get SERVFAIL, so the demo sends no query off
# this machine.
"$FN" agent --dns-upstream none >"$AGENT_LOG" 2>&1 &
AGENT=$!
for i in $(seq 1 100); do "$FN" status >/dev/null 2>&1 && break; sleep 0.1; done
"$FN" status >/dev/null || { cat "$AGENT_LOG"; exit 1; }

step "$FN" run --name "$WEB" --net "$NET" -p 8080:80 --service "$SVC:80" --check http:80/=200 -- python3 -m http.server 80 --bind ::
step "$FN" run --name "$CLI" --net "$NET" -- sleep 600
step "$FN" ps

echo
echo "==> $CLI finds $WEB by name (the agent's DNS, through the container's resolv.conf)"
step "$FN" exec "$CLI" -- cat /etc/resolv.conf
step "$FN" exec "$CLI" -- getent hosts "$WEB"

echo
echo "==> $CLI talks to $WEB by name over the bridge"
for i in $(seq 1 50); do
  if "$FN" exec "$CLI" -- python3 -c "import urllib.request as u; print('HTTP', u.urlopen('http://$WEB/', timeout=2).status, 'from $WEB')" 2>/dev/null; then break; fi
  sleep 0.1
done

echo
echo "==> the service $SVC: a virtual IP, served by healthy producers (here $WEB, once its HTTP check passes)"
for i in $(seq 1 50); do
  "$FN" service ls | grep -q " 1/1 " && break
  sleep 0.2
done
step "$FN" service ls
step "$FN" exec "$CLI" -- getent hosts "$SVC"
"$FN" exec "$CLI" -- python3 -c "import urllib.request as u; print('HTTP', u.urlopen('http://$SVC/', timeout=3).status, 'through the VIP of $SVC')"

echo
echo "==> a client in its own namespace ($CLIENT, 10.198.0.2) reaches the published port on the host (10.198.0.1:8080)"
ip netns add "$CLIENT"
ip link add "$HOSTIF" type veth peer name eth0 netns "$CLIENT"
ip addr add 10.198.0.1/30 dev "$HOSTIF"
ip link set "$HOSTIF" up
ip -n "$CLIENT" addr add 10.198.0.2/30 dev eth0
ip -n "$CLIENT" link set eth0 up
ip -n "$CLIENT" link set lo up
ip -n "$CLIENT" route add default via 10.198.0.1
ip netns exec "$CLIENT" python3 -c "import urllib.request as u; r=u.urlopen('http://10.198.0.1:8080/', timeout=3); print('HTTP', r.status, 'from the published port')"

echo
echo "==> the nftables map behind it: one element per published port, one lookup whatever their number"
nft list map inet ferrynet pm4_any
echo
echo "==> the web server saw these clients (real source addresses, no proxy):"
tail -n 3 "${FERRYNET_STATE_DIR:-/var/lib/ferrynet}/containers/$WEB/log" || true
echo
echo "==> the agent's metrics (Prometheus text on 127.0.0.1:9470; the topology page is at /)"
python3 -c "import urllib.request as u; print(''.join(l for l in u.urlopen('http://127.0.0.1:9470/metrics', timeout=3).read().decode().splitlines(True) if l.startswith(('ferrynet_endpoints', 'ferrynet_producers'))), end='')"
echo
echo "demo OK"
