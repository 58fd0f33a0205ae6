#!/usr/bin/env bash
# The single-host demo: build ferrynet, create a network, start two containers, show them
# talking, and show a published port answering a client that runs in another namespace.
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

cleanup() {
  echo "==> cleaning up"
  "$FN" rm --force "$WEB" >/dev/null 2>&1 || true
  "$FN" rm --force "$CLI" >/dev/null 2>&1 || true
  "$FN" network rm "$NET" >/dev/null 2>&1 || true
  ip netns del "$CLIENT" 2>/dev/null || true
  ip link del "$HOSTIF" 2>/dev/null || true
}
trap cleanup EXIT

step() { printf '\n\033[1m$ %s\033[0m\n' "$*"; "$@"; }

step "$FN" network create "$NET" --subnet 10.199.0.0/24 --subnet fd99:199::/64
step "$FN" network ls
step "$FN" run --name "$WEB" --net "$NET" -p 8080:80 -- python3 -m http.server 80 --bind ::
step "$FN" run --name "$CLI" --net "$NET" -- sleep 600
step "$FN" ps
WEB_IP=$("$FN" ps --json | python3 -c "import json,sys; print([c for c in json.load(sys.stdin) if c['name']=='$WEB'][0]['ips'][0].split('/')[0])")

echo
echo "==> $CLI talks to $WEB at $WEB_IP over the bridge"
for i in $(seq 1 50); do
  if "$FN" exec "$CLI" -- python3 -c "import urllib.request as u; print('HTTP', u.urlopen('http://$WEB_IP/', timeout=2).status)" 2>/dev/null; then break; fi
  sleep 0.1
done

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
echo "demo OK"
