#!/usr/bin/env python3
"""Same-host TCP throughput of routed endpoints (issue 14), beside its anchors in one run.

    sudo python3 bench/routed.py [--secs 5 --reps 5]

Three paths, measured in alternation (one iperf3 run of each per round, median of the rounds):
a raw veth pair between two namespaces (the anchor), two ferrynet containers on a routed
network (veth, the host's routing, veth; the routed guard and the edge in the path) and two
ferrynet containers on a bridged network (veth, bridge, veth) in another host namespace. Each
ferrynet network gets its own "host" namespace, so one's rules never sit in the other's path.
Everything runs in namespaces this script creates and removes. Uses bench.py's helpers.
"""

import argparse
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench  # noqa: E402


class Routed(bench.Ferrynet):
    """ferrynet with `mode: routed`."""

    def conf(self, ports):
        c = super().conf(ports)
        c["mode"] = "routed"
        return c


def first_v4(result):
    return next(i["address"].split("/")[0] for i in result["ips"] if ":" not in i["address"])


def pair(kind, cidr):
    """A host namespace with a ferrynet network of `kind` and two containers: (server ns, client
    ns, server address, the plugin object)."""
    host = bench.netns("h")
    f = kind(host, cidr)
    c1, c2 = bench.netns("c"), bench.netns("c")
    r1 = f.add("t1", c1, [])[2]
    f.add("t2", c2, [])
    return c1, c2, first_v4(r1), f


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--secs", type=int, default=5)
    ap.add_argument("--reps", type=int, default=5)
    a = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("run as root")
    if not os.path.exists(bench.FERRYNET):
        sys.exit(f"{bench.FERRYNET} missing: cargo build --release -p ferrynet")
    res = {"raw": [], "routed": [], "bridge": []}
    plugins = []
    try:
        ra, rb = bench.netns("c"), bench.netns("c")
        bench.sh("ip", "-n", ra, "link", "add", "eth0", "type", "veth", "peer", "name", "eth0", "netns", rb)
        bench.sh("ip", "-n", ra, "addr", "add", "10.76.0.1/24", "dev", "eth0")
        bench.sh("ip", "-n", rb, "addr", "add", "10.76.0.2/24", "dev", "eth0")
        bench.sh("ip", "-n", ra, "link", "set", "eth0", "up")
        bench.sh("ip", "-n", rb, "link", "set", "eth0", "up")
        paths = {"raw": (ra, rb, "10.76.0.1")}
        for name, kind, cidr in (("routed", Routed, "10.79.0.0/16"), ("bridge", bench.Ferrynet, "10.77.0.0/16")):
            s, c, addr, f = pair(kind, cidr)
            plugins.append(f)
            paths[name] = (s, c, addr)
        for _ in range(a.reps):
            for name, (s, c, addr) in paths.items():
                res[name].append(bench.iperf(s, c, addr, a.secs))
    finally:
        for f in plugins:
            f.close()
        bench.cleanup()
    med = {k: statistics.median(v) for k, v in res.items()}
    print(f"\n### Same-host TCP throughput, routed vs raw veth vs bridged (iperf3, {a.secs} s x {a.reps}, median)\n")
    print("| path | Gbit/s (median) | runs, Gbit/s | / raw veth |")
    print("|---|---|---|---|")
    for k, label in (("raw", "raw veth pair between two netns"),
                     ("routed", "ferrynet routed: veth, host routing, veth"),
                     ("bridge", "ferrynet bridged: veth, bridge, veth")):
        runs = ", ".join(f"{x / 1e9:.1f}" for x in res[k])
        print(f"| {label} | {med[k] / 1e9:.2f} | {runs} | {med[k] / med['raw']:.2f} |")
    print(f"\nrouted / raw veth: {med['routed'] / med['raw']:.2f} (target >= 0.95); "
          f"routed / bridged: {med['routed'] / med['bridge']:.2f}")


if __name__ == "__main__":
    main()
