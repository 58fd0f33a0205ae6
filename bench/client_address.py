#!/usr/bin/env python3
"""What keeping the client's address costs, in one run, on a one-host `ferrynet lab` (etcd).

    sudo python3 bench/client_address.py [--secs 4] [--rounds 4]

1. New TCP connections per second through a VIP, client and producer containers on the same
   bridge (the case that used to be masqueraded): rounds alternate between the rules as
   shipped (no SNAT; the reply is bridged back and un-DNATed by the host) and with the old
   SNAT put back (`masquerade` of every load-balanced connection leaving for a bridge,
   inserted into `inet ferrynet-svc` and removed again by handle).
2. What the bridge's `nf_call_iptables`/`nf_call_ip6tables` cost bridged traffic that needs
   none of it: container -> container on one bridge, new connections per second and iperf3
   TCP throughput, with the option on (as shipped) vs off (the bridge option and the
   namespace's `net.bridge.bridge-nf-call-ip*tables` sysctls both 0, as on a host where
   br_netfilter was never loaded), alternating.

The producer runs `connrate server 80 2`; clients run `connrate client ADDR PORT SECS 4`.
Needs a release build: cargo build --release -p ferrynet -p connrate. The lab is removed at
the end, also on failure. Prints Markdown.
"""

import argparse
import json
import os
import re
import subprocess
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench import CONNRATE, FERRYNET, iperf, sh  # noqa: E402

LAB = "cab"
VIP = "10.96.0.10"
HOST = f"{LAB}-h1"
SNAT_RULE = 'ct mark & 0x00800000 != 0 oifname "fn-*" masquerade comment "bench-snat"'


def log(msg):
    print(msg, file=sys.stderr, flush=True)


def on_h1(*args):
    return sh(FERRYNET, "lab", "exec", "--name", LAB, "h1", "--", FERRYNET, *args)


def nft(*args, check=True):
    return sh("ip", "netns", "exec", HOST, "nft", *args, check=check)


def snat(on):
    if on:
        nft("add", "rule", "inet", "ferrynet-svc", "postrouting", *SNAT_RULE.split(" "))
        return
    listing = nft("-a", "list", "chain", "inet", "ferrynet-svc", "postrouting").stdout
    for h in re.findall(r'bench-snat" # handle (\d+)', listing):
        nft("delete", "rule", "inet", "ferrynet-svc", "postrouting", "handle", h)


def bridges():
    links = json.loads(sh("ip", "-n", HOST, "-j", "link", "show", "type", "bridge").stdout)
    return [l["ifname"] for l in links if l["ifname"].startswith("fn-")]


def bridge_nf(on):
    v = "1" if on else "0"
    for fam in ("iptables", "ip6tables"):
        sh("ip", "netns", "exec", HOST, "sysctl", "-qw", f"net.bridge.bridge-nf-call-{fam}={v}")
    for br in bridges():
        sh("ip", "-n", HOST, "link", "set", br, "type", "bridge", "nf_call_iptables", v, "nf_call_ip6tables", v)


def container_ips(name):
    ps = json.loads(on_h1("ps", "--json").stdout)
    me = next(c for c in ps if c["name"] == name)
    return [i.split("/")[0] for i in me["ips"]]


FAILED = {}


def rate(client, addr, secs, what):
    """New connections per second; failed connects (2 s timeout) are counted per `what`."""
    out = sh("ip", "netns", "exec", client, CONNRATE, "client", addr, "80", str(secs), "4").stdout
    m = re.search(r"\((\d+) ok, (\d+) failed", out)
    ok, failed = FAILED.get(what, (0, 0))
    FAILED[what] = (ok + int(m.group(1)), failed + int(m.group(2)))
    return float(out.split()[0])


def peer_seen(client, producer_ns):
    """The address the producer sees for a connection from `client` through the VIP."""
    srv = ("import socket\ns=socket.socket();s.setsockopt(socket.SOL_SOCKET,socket.SO_REUSEADDR,1)\n"
           "s.bind(('0.0.0.0',81));s.listen(1);print('ready',flush=True)\nc,a=s.accept();print(a[0],flush=True)")
    p = subprocess.Popen(["ip", "netns", "exec", producer_ns, "python3", "-c", srv],
                         stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        if p.stdout.readline().strip() != "ready":
            raise RuntimeError("peer server did not start")
        code = f"import socket\nsocket.create_connection(('{VIP}',81),timeout=3).close()"
        for attempt in range(20):
            if sh("ip", "netns", "exec", client, "python3", "-c", code, check=False).returncode == 0:
                break
            time.sleep(0.5)
        else:
            raise RuntimeError("the VIP never answered on port 81")
        return p.stdout.readline().strip()
    finally:
        p.kill()
        p.wait()


def row(name, unit, a, b, an, bn):
    """Medians, their ratio, and the geometric mean of the per-round ratios (each round runs A
    and B back to back, so a load change between rounds of a shared machine cancels out)."""
    ma, mb = statistics.median(a), statistics.median(b)
    fa = ", ".join(f"{v:.0f}" for v in a)
    fb = ", ".join(f"{v:.0f}" for v in b)
    gm = statistics.geometric_mean([x / y for x, y in zip(a, b)])
    print(f"| {name} ({unit}) | {ma:.0f} | {mb:.0f} | {ma / mb:.3f} | **{gm:.3f}** | {an}: {fa}; {bn}: {fb} |")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--secs", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--fresh-clients", action="store_true",
                    help="VIP runs each from a client container of its own (no source port is reused "
                         "across runs, so no run meets the TIME_WAIT and conntrack entries of another); "
                         "implies --vip-only")
    ap.add_argument("--vip-only", action="store_true", help="skip the direct (bridge nf_call) measures")
    a = ap.parse_args()
    a.vip_only = a.vip_only or a.fresh_clients
    for p in (FERRYNET, CONNRATE):
        if not os.path.exists(p):
            sys.exit(f"{p} missing: cargo build --release -p ferrynet -p connrate")
    sh(FERRYNET, "lab", "down", "--name", LAB, check=False)
    try:
        log("lab up (1 host, etcd)")
        sh(FERRYNET, "lab", "up", "--name", LAB, "--hosts", "1", "--backend", "route")
        on_h1("run", "--name", f"{LAB}p", "--net", "fabric", "--", CONNRATE, "server", "80", "2")
        # The direct measures use a server and a client of their own: a client that reached one
        # producer both through the VIP and directly from the same recycled port would meet
        # conntrack tuple clashes (the VIP entry's reply tuple is the direct one's), which
        # only the old SNAT's port remapping hid.
        on_h1("run", "--name", f"{LAB}s", "--net", "fabric", "--", CONNRATE, "server", "80", "2")
        on_h1("run", "--name", f"{LAB}c", "--net", "fabric", "--", "sleep", "infinity")
        on_h1("run", "--name", f"{LAB}d", "--net", "fabric", "--", "sleep", "infinity")
        prod, client, server2, client2 = f"fnc-{LAB}p", f"fnc-{LAB}c", f"fnc-{LAB}s", f"fnc-{LAB}d"
        for ns in (client, client2):
            for k, v in (("net.ipv4.ip_local_port_range", "1024 65000"), ("net.ipv4.tcp_tw_reuse", "1")):
                sh("ip", "netns", "exec", ns, "sysctl", "-qw", f"{k}={v}")
        pips = container_ips(f"{LAB}p")
        args = ["service", "register", "bench", "--port", "80", "--port", "81", "--vip", VIP, "--id", "p"]
        for ip in pips:
            args += ["--addr", ip]
        on_h1(*args)
        t0 = time.monotonic()
        while True:
            try:
                rate(client, VIP, 1, 'warm-up')
                break
            except Exception:
                if time.monotonic() - t0 > 60:
                    raise
                time.sleep(0.5)
        cip = container_ips(f"{LAB}c")[0]
        seen = peer_seen(client, prod)
        snat(True)
        seen_snat = peer_seen(client, prod)
        snat(False)
        log(f"producer sees {seen} (client {cip}); with the old SNAT {seen_snat}")
        if seen != cip or seen_snat == cip:
            raise RuntimeError("the two modes are not what they claim to be")

        fresh = []
        if a.fresh_clients:
            for i in range(2 * a.rounds):
                on_h1("run", "--name", f"{LAB}f{i}", "--net", "fabric", "--", "sleep", "infinity")
                ns = f"fnc-{LAB}f{i}"
                for k, v in (("net.ipv4.ip_local_port_range", "1024 65000"), ("net.ipv4.tcp_tw_reuse", "1")):
                    sh("ip", "netns", "exec", ns, "sysctl", "-qw", f"{k}={v}")
                fresh.append(ns)
        vip_plain, vip_snat = [], []
        direct_on, direct_off, tput_on, tput_off = [], [], [], []
        s2 = container_ips(f"{LAB}s")[0]
        for r in range(a.rounds):
            log(f"round {r + 1}/{a.rounds}")
            for i, mode in enumerate((False, True) if r % 2 == 0 else (True, False)):
                snat(mode)
                who = fresh[2 * r + i] if fresh else client
                (vip_snat if mode else vip_plain).append(rate(who, VIP, a.secs, 'VIP, old SNAT' if mode else 'VIP, no SNAT'))
                snat(False)
            if a.vip_only:
                continue
            for on in ((True, False) if r % 2 == 0 else (False, True)):
                bridge_nf(on)
                (direct_on if on else direct_off).append(rate(client2, s2, a.secs, 'direct, nf_call on' if on else 'direct, nf_call off'))
                (tput_on if on else tput_off).append(iperf(server2, client2, s2, a.secs) / 1e9)
                bridge_nf(True)
        log(f"VIP runs: no SNAT {vip_plain}; old SNAT {vip_snat}")
        print("\n### Keeping the client's address (one host, client and producer on one bridge)\n")
        print(f"{a.rounds} alternating rounds of {a.secs} s; connrate, 4 connections in flight"
              f"{'; every VIP run from a fresh client container' if fresh else ''}; "
              f"the producer saw `{seen}` (the client) as shipped and `{seen_snat}` with SNAT.\n")
        print("| measure | A median | B median | A / B of medians | A / B per round, geometric mean | runs |")
        print("|---|---|---|---|---|---|")
        row("VIP new conn/s: A no SNAT (shipped), B old SNAT", "conn/s", vip_plain, vip_snat, "A", "B")
        if direct_on:
            row("direct new conn/s: A bridge nf_call on (shipped), B off", "conn/s", direct_on, direct_off, "A", "B")
        if tput_on:
            print(f"| iperf3 container -> container: A nf_call on, B off (Gbit/s) | {statistics.median(tput_on):.2f} | "
              f"{statistics.median(tput_off):.2f} | {statistics.median(tput_on) / statistics.median(tput_off):.3f} | "
                  f"**{statistics.geometric_mean([x / y for x, y in zip(tput_on, tput_off)]):.3f}** | "
                  f"A: {', '.join(f'{v:.2f}' for v in tput_on)}; B: {', '.join(f'{v:.2f}' for v in tput_off)} |")
        print("\n| connections | ok | failed (connect not done within 2 s) |")
        print("|---|---|---|")
        for what, (ok, failed) in FAILED.items():
            print(f"| {what} | {ok} | {failed} |")
    finally:
        sh(FERRYNET, "lab", "down", "--name", LAB, check=False)


if __name__ == "__main__":
    main()
