#!/usr/bin/env python3
"""What the trust boundary costs: anti-spoofing and isolation rules on vs off, in one run.

    sudo python3 bench/trust.py [--endpoints 2,1000] [--secs 4] [--rounds 3]

One "host" namespace with a ferrynet network (IPv4 + IPv6) and a second network (so isolation has
something to decide), two measured containers and, for the larger counts, idle filler containers on
the same bridge (each one an anti-spoofing entry). For every endpoint count it alternates rounds
with the rules in place (as ferrynet installs them) and with them taken out of the kernel, and
measures in each round:
  - same-host container -> container TCP throughput (iperf3, one stream);
  - new TCP connections per second container -> container (the `connrate` client, 4 in flight);
  - new TCP connections per second from an outside client through a published port.
"Off" deletes the anti-spoofing table (`bridge ferrynet`) and the isolation and loopback rules of
`inet ferrynet` (found by their comments); `ferrynet reload` puts them back for the next "on"
round. Results are printed as a Markdown table with the on/off ratio per measure.
"""

import argparse
import os
import re
import statistics
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench  # noqa: E402  (the shared namespace and plugin helpers)
from bench import CONNRATE, FERRYNET, Ferrynet, cleanup, conn_rate, iperf, netns, sh, wire_client  # noqa: E402

# Comments of the rules that make up the trust boundary in `inet ferrynet` (model/edge.rs).
TRUST_COMMENT = re.compile(r'comment "(isolat|loopback|localnet|foreign)', re.I)


def nft(host, *args, check=True):
    return sh("ip", "netns", "exec", host, "nft", *args, check=check)


def rules_off(host):
    """Take the anti-spoofing table and the isolation/loopback rules out of the host's kernel."""
    nft(host, "delete", "table", "bridge", "ferrynet", check=False)
    listing = nft(host, "-a", "list", "table", "inet", "ferrynet").stdout
    chain = None
    for line in listing.splitlines():
        m = re.match(r"\s*chain (\S+) \{", line)
        if m:
            chain = m.group(1)
            continue
        h = re.search(r"# handle (\d+)$", line)
        if chain and h and TRUST_COMMENT.search(line):
            nft(host, "delete", "rule", "inet", "ferrynet", chain, "handle", h.group(1))
    left = nft(host, "list", "ruleset").stdout
    if "table bridge ferrynet" in left or TRUST_COMMENT.search(left):
        raise RuntimeError("trust rules still present after rules_off:\n" + left)


def rules_on(host, f):
    """Rebuild ferrynet's whole edge from the store (what `ferrynet reload` does)."""
    sh("ip", "netns", "exec", host, FERRYNET, "--state-dir", f.state, "reload")
    if "table bridge ferrynet" not in nft(host, "list", "tables").stdout:
        raise RuntimeError("ferrynet reload did not restore the anti-spoofing table")


def measure(c_srv, c_cli, srv_ip, client, host_addr, secs):
    thr = iperf(c_srv, c_cli, srv_ip, secs)
    c2c = conn_rate(c_cli, srv_ip, 7000, secs=secs, reps=1)
    pub = conn_rate(client, host_addr, 8080, secs=secs, reps=1)
    return thr, c2c, pub


def run(endpoints, secs, rounds):
    host = netns("h")
    f = Ferrynet(host)
    f.cidr = "10.77.0.0/16"
    other = Ferrynet(host, cidr="10.78.0.0/16")
    other.state = f.state
    srv = None
    try:
        # A second network on the same host, so the isolation rules have another pool to weigh.
        conf_b = other.conf([])
        conf_b["name"] = "bench-b"
        c_b = netns("c")
        env = {"CNI_CONTAINERID": "b0", "CNI_NETNS": f"/run/netns/{c_b}", "CNI_IFNAME": "eth0"}
        _, rc, out, _ = bench.run_plugin(host, FERRYNET, "ADD", conf_b, env)
        if rc != 0:
            raise RuntimeError(f"ADD on the second network failed: {out}")
        c_srv, c_cli = netns("c"), netns("c")
        res = f.add("srv", c_srv, [{"hostPort": 8080, "containerPort": 7000, "protocol": "tcp"}])[2]
        f.add("cli", c_cli, [])
        for k in range(max(0, endpoints - 3)):
            f.add(f"fill{k}", netns("c"), [])
        srv_ip = res["ips"][0]["address"].split("/")[0]
        srv = subprocess.Popen(["ip", "netns", "exec", c_srv, CONNRATE, "server", "7000", "2"], stdout=subprocess.PIPE)
        srv.stdout.readline()
        client, host_addr = wire_client(host, 61)
        on, off = [], []
        for r in range(rounds):
            for state in ("on", "off") if r % 2 == 0 else ("off", "on"):
                if state == "on":
                    rules_on(host, f)
                    on.append(measure(c_srv, c_cli, srv_ip, client, host_addr, secs))
                else:
                    rules_off(host)
                    off.append(measure(c_srv, c_cli, srv_ip, client, host_addr, secs))
                print(f"  {endpoints} endpoints, round {r}, {state}: {(on if state == 'on' else off)[-1]}", file=sys.stderr)
        rules_on(host, f)
        return [tuple(statistics.median(x[i] for x in rows) for i in range(3)) for rows in (on, off)]
    finally:
        if srv:
            srv.kill()
            srv.wait()
        sh("ip", "netns", "exec", host, "nft", "delete", "table", "inet", "ferrynet", check=False)
        sh("ip", "netns", "exec", host, "nft", "delete", "table", "bridge", "ferrynet", check=False)
        f.close()
        cleanup()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--endpoints", default="3,1000", help="endpoints on the host's bridge (comma-separated)")
    ap.add_argument("--secs", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=4)
    a = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("run as root")
    for p in (FERRYNET, CONNRATE):
        if not os.path.exists(p):
            sys.exit(f"{p} missing: cargo build --release -p ferrynet -p connrate")
    rows = []
    try:
        for n in (int(x) for x in a.endpoints.split(",")):
            rows.append((n, *run(n, a.secs, a.rounds)))
    finally:
        cleanup()
    print(f"\n### Trust boundary on vs off ({a.rounds} alternating rounds of {a.secs} s, median)\n")
    print("| endpoints | measure | rules on | rules off | on / off |")
    print("|---|---|---|---|---|")
    names = ("container -> container TCP Gbit/s", "container -> container new conn/s", "published port new conn/s")
    for n, on, off in rows:
        for i, name in enumerate(names):
            scale = 1e9 if i == 0 else 1
            print(f"| {n} | {name} | {on[i] / scale:.2f} | {off[i] / scale:.2f} | {on[i] / off[i]:.3f} |")


if __name__ == "__main__":
    main()
