#!/usr/bin/env python3
"""`ferrynet trace` for a cross-host case (issue 16, part 1), beside its anchor in one run.

    sudo python3 bench/trace.py [--runs 50]

A 3-host `ferrynet lab` (etcd, vxlan) with one container on h1 and one on h2. Times N runs of
`ferrynet trace c1 c2:7000 --json` in h1's namespace (the whole process: store reads over etcd,
the model, netlink route lookups, the anti-spoofing element read), and in alternation the
anchor: what an operator would type by hand on h1, `ip route get <c2>` plus `nft list ruleset`
(two processes). Prints p50/p95 of each and the ratio of the p50s. Target: trace ≤ 200 ms.
Everything runs in the lab's namespaces and is removed at the end.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench import FERRYNET, sh  # noqa: E402

LAB = "trb"
ROOT = "/run/ferrynet-lab"


def pct(xs, p):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(p / 100 * (len(xs) - 1))))]


def timed(args, env=None):
    t = time.perf_counter()
    r = subprocess.run(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    dt = time.perf_counter() - t
    if r.returncode != 0:
        sys.exit(f"{args} failed: {r.stderr.decode()}")
    return dt, r.stdout


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=50)
    a = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("run as root")
    if not os.path.exists(FERRYNET):
        sys.exit(f"{FERRYNET} missing: cargo build --release -p ferrynet")
    sh(FERRYNET, "lab", "down", "--name", LAB, check=False)
    try:
        sh(FERRYNET, "lab", "up", "--name", LAB, "--hosts", "3", "--backend", "vxlan")
        ex = lambda h, *args: sh(FERRYNET, "lab", "exec", "--name", LAB, h, "--", FERRYNET, *args)  # noqa: E731
        ex("h1", "run", "--name", "trb1", "--net", "fabric", "--", "sleep", "infinity")
        ex("h2", "run", "--name", "trb2", "--net", "fabric", "--", "sleep", "infinity")
        store = json.load(open(f"{ROOT}/{LAB}/lab.json"))["store"]
        env = dict(os.environ, FERRYNET_STATE_DIR=f"{ROOT}/{LAB}/h1", FERRYNET_STORE=store)
        ns = ["nsenter", f"--net=/run/netns/{LAB}-h1"]
        trace = ns + [FERRYNET, "trace", "trb1", "trb2:7000", "--json"]
        _, first = timed(trace, env)
        t = json.loads(first)
        c2 = t["dst"]
        print(f"verdict: {t['verdict']['step']} delivered={t['verdict']['delivered']}", file=sys.stderr)
        tr, an = [], []
        for _ in range(a.runs):
            tr.append(timed(trace, env)[0])
            d1, _ = timed(ns + ["ip", "route", "get", c2])
            d2, _ = timed(ns + ["nft", "list", "ruleset"])
            an.append(d1 + d2)
        ms = lambda x: f"{x * 1000:.1f}"  # noqa: E731
        print(f"| what (N={a.runs}) | p50 ms | p95 ms |")
        print("|---|---|---|")
        print(f"| `ferrynet trace c1 c2:7000 --json` (cross host, vxlan, etcd) | {ms(statistics.median(tr))} | {ms(pct(tr, 95))} |")
        print(f"| anchor: `ip route get` + `nft list ruleset` | {ms(statistics.median(an))} | {ms(pct(an, 95))} |")
        print(f"\nratio trace / anchor (p50): {statistics.median(tr) / statistics.median(an):.2f}")
    finally:
        sh(FERRYNET, "lab", "exec", "--name", LAB, "h1", "--", FERRYNET, "rm", "--force", "trb1", check=False)
        sh(FERRYNET, "lab", "exec", "--name", LAB, "h2", "--", FERRYNET, "rm", "--force", "trb2", check=False)
        sh(FERRYNET, "lab", "down", "--name", LAB, check=False)


if __name__ == "__main__":
    main()
