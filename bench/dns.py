#!/usr/bin/env python3
"""DNS queries per second: ferrynet's embedded DNS server beside aardvark-dns and dnsmasq, in one
run, over the same record set and the same query file.

    sudo python3 bench/dns.py [--names 100] [--secs 5] [--rounds 3] [--clients 8]

ferrynet: a "host" namespace running `target/release/ferrynet agent` (embedded store,
          --dns-upstream none), one network, --names containers made with `ferrynet run`; the
          server answers on the network's gateway.
aardvark-dns (/usr/lib/podman/aardvark-dns, podman's server): its own namespace with a bridge
          holding the gateway address, a config file listing the same names and addresses.
dnsmasq:  its own namespace, same bridge layout, the same names in an --addn-hosts file,
          --no-resolv, cache on (its default).

The client is dnsperf, run inside a namespace on the server's bridge (for ferrynet: inside the
first container), asking for the A record of every name in turn (bare names, as a container
with a search domain would after its first try) for --secs seconds; --rounds rounds, the
servers' order rotating each round (the machine's load drifts), the median run reported. Nothing is forwarded: every
name is known to every server. Everything made here is removed at the end, also on failure.
Results are printed as a Markdown table (progress on stderr).
"""

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench import FERRYNET, TAG, cleanup, enter, netns, sh  # noqa: E402

AARDVARK = "/usr/lib/podman/aardvark-dns"
PROCS = []  # (Popen or pid, what)
DIRS = []
CONTAINERS = []  # (state dir, host ns, name)


def log(msg):
    print(msg, file=sys.stderr, flush=True)


def need(path, package):
    if not (os.path.exists(path) or shutil.which(path)):
        sys.exit(f"{path} is missing: apt-get install {package} (scripts/deps.sh bench)")


def start(ns, argv, **kw):
    p = subprocess.Popen(argv, preexec_fn=enter(ns), stdin=subprocess.DEVNULL, **kw)
    PROCS.append((p, argv[0]))
    return p


def stop_all():
    for name_state in reversed(CONTAINERS):
        state, host, name = name_state
        subprocess.run(["nsenter", f"--net=/run/netns/{host}", FERRYNET, "--state-dir", state,
                        "rm", "--force", name], capture_output=True)
    for p, _ in reversed(PROCS):
        if isinstance(p, int):
            try:
                os.kill(p, signal.SIGTERM)
            except ProcessLookupError:
                pass
            continue
        p.terminate()
        try:
            p.wait(5)
        except subprocess.TimeoutExpired:
            p.kill()
    cleanup()
    for d in DIRS:
        shutil.rmtree(d, ignore_errors=True)


def bridged_pair(kind, gw, client_ip):
    """A server namespace with bridge br0 holding gw/24, a client namespace on it."""
    srv, cli = netns(f"{kind}s"), netns(f"{kind}c")
    sh("ip", "-n", srv, "link", "add", "br0", "type", "bridge")
    sh("ip", "-n", srv, "addr", "add", f"{gw}/24", "dev", "br0")
    sh("ip", "-n", srv, "link", "set", "br0", "up")
    sh("ip", "-n", srv, "link", "add", "v0", "type", "veth", "peer", "name", "eth0", "netns", cli)
    sh("ip", "-n", srv, "link", "set", "v0", "master", "br0", "up")
    sh("ip", "-n", cli, "addr", "add", f"{client_ip}/24", "dev", "eth0")
    sh("ip", "-n", cli, "link", "set", "eth0", "up")
    return srv, cli


def wait_answer(client_ns, server, name, want, what):
    deadline = time.time() + 30
    while time.time() < deadline:
        p = subprocess.run(["dig", "+short", "+tries=1", "+time=1", f"@{server}", name, "A"],
                           preexec_fn=enter(client_ns), capture_output=True, text=True)
        if p.stdout.strip() == want:
            return
        time.sleep(0.2)
    sys.exit(f"{what} does not answer {name} -> {want} at {server}")


def dnsperf(client_ns, server, qfile, secs, clients):
    p = subprocess.run(["dnsperf", "-s", server, "-d", qfile, "-l", str(secs), "-c", str(clients),
                        "-T", "2", "-q", "500", "-t", "2"],
                       preexec_fn=enter(client_ns), capture_output=True, text=True)
    out = p.stdout
    qps = re.search(r"Queries per second:\s+([\d.]+)", out)
    lost = re.search(r"Queries lost:\s+(\d+)", out)
    noerr = re.search(r"NOERROR (\d+)", out)
    lat = re.search(r"Average Latency \(s\):\s+([\d.]+)", out)
    if not qps:
        sys.exit(f"dnsperf failed: {out}{p.stderr}")
    return {"qps": float(qps.group(1)), "lost": int(lost.group(1)) if lost else -1,
            "noerror": int(noerr.group(1)) if noerr else 0,
            "lat_ms": float(lat.group(1)) * 1000 if lat else 0.0}


def ferrynet(names):
    host = netns("dnsh")
    # An underlay for the agent to register (a veth pair inside the host: no dummy module needed).
    sh("ip", "-n", host, "link", "add", "u0", "type", "veth", "peer", "name", "u1")
    sh("ip", "-n", host, "addr", "add", "10.254.77.1/24", "dev", "u0")
    sh("ip", "-n", host, "link", "set", "u0", "up")
    sh("ip", "-n", host, "link", "set", "u1", "up")
    state = tempfile.mkdtemp(prefix="fnb-dns-")
    DIRS.append(state)
    agent_log = open(os.path.join(state, "agent.log"), "w")
    start(host, [FERRYNET, "--state-dir", state, "agent", "--host-name", "bench",
                 "--underlay-dev", "u0", "--dns-upstream", "none"],
          stdout=agent_log, stderr=agent_log)
    cli = ["nsenter", f"--net=/run/netns/{host}", FERRYNET, "--state-dir", state]
    deadline = time.time() + 20
    while subprocess.run(cli + ["status"], capture_output=True).returncode != 0:
        if time.time() > deadline:
            sys.exit("the ferrynet agent did not start")
        time.sleep(0.2)
    net = f"dnsb{TAG}"
    sh(*cli, "network", "create", net, "--subnet", "10.77.0.0/24")
    log(f"ferrynet: starting {len(names)} containers")
    for n in names:
        sh(*cli, "run", "--name", n, "--net", net, "--", "sleep", "3600")
        CONTAINERS.append((state, host, n))
    ps = json.loads(sh(*cli, "ps", "--json").stdout)
    addrs = {c["name"]: c["ips"][0].split("/")[0] for c in ps}
    return f"fnc-{names[0]}", "10.77.0.1", addrs


def aardvark(names, addrs):
    srv, cli = bridged_pair("aav", "10.78.0.1", "10.78.0.250")
    conf = tempfile.mkdtemp(prefix="fnb-aardvark-")
    DIRS.append(conf)
    with open(os.path.join(conf, "bench"), "w") as f:
        f.write("10.78.0.1\n")
        for i, n in enumerate(names):
            f.write(f"{i:064x} {addrs[n]}  {n}\n")
    # `run` daemonizes; the daemon's pid is written to aardvark.pid in the config directory.
    start(srv, [AARDVARK, "--config", conf, "-p", "53", "run"],
          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_answer(cli, "10.78.0.1", names[0], addrs[names[0]], "aardvark-dns")
    pidf = os.path.join(conf, "aardvark.pid")
    if os.path.exists(pidf):
        PROCS.append((int(open(pidf).read().strip()), "aardvark-dns daemon"))
    return cli, "10.78.0.1"


def dnsmasq(names, addrs):
    srv, cli = bridged_pair("dmq", "10.79.0.1", "10.79.0.250")
    d = tempfile.mkdtemp(prefix="fnb-dnsmasq-")
    DIRS.append(d)
    hosts = os.path.join(d, "hosts")
    with open(hosts, "w") as f:
        for n in names:
            f.write(f"{addrs[n]} {n}\n")
    start(srv, ["dnsmasq", "--keep-in-foreground", "--conf-file=/dev/null", "--no-resolv",
                "--no-hosts", f"--addn-hosts={hosts}", "--bind-interfaces",
                "--listen-address=10.79.0.1", "--pid-file", "--user=root"],
          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_answer(cli, "10.79.0.1", names[0], addrs[names[0]], "dnsmasq")
    return cli, "10.79.0.1"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--names", type=int, default=100)
    ap.add_argument("--secs", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--clients", type=int, default=8)
    a = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("run as root")
    need(FERRYNET, "ferrynet (cargo build --release -p ferrynet)")
    need(AARDVARK, "aardvark-dns")
    need("dnsmasq", "dnsmasq-base")
    need("dnsperf", "dnsperf")
    need("dig", "dnsutils")
    names = [f"c{i}x{TAG}" for i in range(a.names)]
    qdir = tempfile.mkdtemp(prefix="fnb-dnsq-")
    DIRS.append(qdir)
    qfile = os.path.join(qdir, "queries")
    with open(qfile, "w") as f:
        for n in names:
            f.write(f"{n} A\n")
    try:
        fn_client, fn_server, addrs = ferrynet(names)
        wait_answer(fn_client, fn_server, names[-1], addrs[names[-1]], "ferrynet")
        servers = [("ferrynet (agent)", fn_client, fn_server)]
        servers.append(("aardvark-dns " + sh(AARDVARK, "--version", check=False).stdout.split()[-1],
                        *aardvark(names, addrs)))
        servers.append(("dnsmasq", *dnsmasq(names, addrs)))
        runs = {what: [] for what, _, _ in servers}
        for rnd in range(a.rounds):
            order = servers[rnd % len(servers):] + servers[:rnd % len(servers)]
            for what, client, server in order:
                log(f"round {rnd + 1}: {what}: dnsperf for {a.secs} s")
                runs[what].append(dnsperf(client, server, qfile, a.secs, a.clients))
        results = {w: sorted(rs, key=lambda r: r["qps"])[len(rs) // 2] for w, rs in runs.items()}
        fn = results["ferrynet (agent)"]["qps"]
        print(f"| server | queries/s (median of {a.rounds}) | ferrynet / this | all runs, queries/s | "
              "answered NOERROR | lost | avg latency ms |")
        print("|---|---|---|---|---|---|---|")
        for what, r in results.items():
            every = ", ".join(f"{x['qps']:.0f}" for x in runs[what])
            print(f"| {what} | {r['qps']:.0f} | {fn / r['qps']:.2f} | {every} | {r['noerror']} | "
                  f"{r['lost']} | {r['lat_ms']:.2f} |")
    finally:
        stop_all()


if __name__ == "__main__":
    main()
