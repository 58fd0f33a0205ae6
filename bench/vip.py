#!/usr/bin/env python3
"""New TCP connections per second through a virtual IP with 10 and with 10,000 services
programmed, in one run (10, then cycles of 10,000 and back to 10), on a one-host `ferrynet lab` (real etcd).

    sudo python3 bench/vip.py [--services 10000] [--secs 4] [--reps 3] [--cycles 3]

The measured service `bench` has three producers, containers on the host running
`connrate server 80`; the client is `connrate client VIP 80 SECS 4` in a container on the same
host, so every connection is DNATed by the host's `inet ferrynet-svc` table. The other
services (one port, one VIP, one producer each, never connected to) are written straight into
etcd over its HTTP gateway, 40 services per transaction. Also measured: how long the agent
takes to program the 10,000 services (from the last write to the table having them), and
the whole-table rebuild of the restarted agent (one nft transaction with every service).

Needs a release build: cargo build --release -p ferrynet -p connrate. Everything (lab,
containers) is removed at the end, also on failure. Results are printed as Markdown.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench import CONNRATE, FERRYNET, sh  # noqa: E402

LAB = "vipb"
VIP = "10.96.0.10"

WRITER = r"""
import base64,json,sys,urllib.request,ipaddress
ETCD='http://172.31.0.253:2379'
R='/ferrynet/v1/'
def b64(s): return base64.b64encode(s.encode()).decode()
def post(path,body):
    r=urllib.request.urlopen(urllib.request.Request(ETCD+path,data=json.dumps(body).encode(),method='POST'))
    return json.loads(r.read())
def name(i): return 'f%05d'%i
def vip(i): return str(ipaddress.ip_address('10.96.128.0')+i+1)
mode,lo,hi=sys.argv[1],int(sys.argv[2]),int(sys.argv[3])
if mode=='add':
    puts=[]
    for i in range(lo,hi):
        n=name(i)
        svc={'name':n,'ports':[{'name':'http','port':80,'protocol':'tcp'}],'vips':[vip(i)]}
        pr={'service':n,'id':'p','host':'h1','addrs':['10.20.250.%d'%(1+i%250)]}
        puts+= [(R+'services/'+n,json.dumps(svc)),(R+'vips/'+vip(i),n),(R+'producers/'+n+'/p',json.dumps(pr))]
    for k in range(0,len(puts),120):
        post('/v3/kv/txn',{'success':[{'requestPut':{'key':b64(a),'value':b64(b)}} for a,b in puts[k:k+120]]})
else:
    for p in ('services/','producers/'):
        post('/v3/kv/deleterange',{'key':b64(R+p+name(lo)),'range_end':b64(R+p+'g')})
    keys=[R+'vips/'+vip(i) for i in range(lo,hi)]
    for k in range(0,len(keys),120):
        post('/v3/kv/txn',{'success':[{'requestDeleteRange':{'key':b64(a)}} for a in keys[k:k+120]]})
print(post('/v3/kv/range',{'key':b64('/')}) .get('header',{}).get('revision'))
"""


def log(msg):
    print(msg, file=sys.stderr, flush=True)


def lab(*args, check=True):
    return sh(FERRYNET, "lab", *args, "--name", LAB, check=check)


def on_h1(*args):
    return sh(FERRYNET, "lab", "exec", "--name", LAB, "h1", "--", FERRYNET, *args)


def status():
    return json.loads(on_h1("status", "--json").stdout)


def write(mode, lo, hi):
    sh("ip", "netns", "exec", f"{LAB}-etcd", "python3", "-c", WRITER, mode, str(lo), str(hi))


def wait_vip_ports(n, timeout=120):
    """Wait until the agent has programmed `n` VIP ports; returns the seconds waited."""
    t0 = time.monotonic()
    while True:
        lb = status()["lb"]
        if lb.get("vipPorts") == n and not lb.get("error"):
            return time.monotonic() - t0
        if time.monotonic() - t0 > timeout:
            raise RuntimeError(f"load balancer never reached {n} VIP ports: {lb}")
        time.sleep(0.05)


def container_ip(name):
    ps = json.loads(on_h1("ps", "--json").stdout)
    me = next(c for c in ps if c["name"] == name)
    return [i.split("/")[0] for i in me["ips"]]


def conn_rate(client, secs, reps):
    vals = []
    for _ in range(reps):
        out = sh("ip", "netns", "exec", client, CONNRATE, "client", VIP, "80", str(secs), "4").stdout
        rate, rest = float(out.split()[0]), out
        if " 0 failed" not in rest:
            raise RuntimeError(f"failed connections through the VIP: {out.strip()}")
        vals.append(rate)
    return statistics.median(vals), vals


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--services", type=int, default=10000)
    ap.add_argument("--secs", type=int, default=4)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--cycles", type=int, default=3)
    a = ap.parse_args()
    for p in (FERRYNET, CONNRATE):
        if not os.path.exists(p):
            sys.exit(f"{p} missing: cargo build --release -p ferrynet -p connrate")
    lab("down", check=False)
    try:
        log("lab up (1 host, etcd)")
        sh(FERRYNET, "lab", "up", "--name", LAB, "--hosts", "1", "--backend", "route")
        producers = []
        for i in range(1, 4):
            name = f"{LAB}p{i}"
            on_h1("run", "--name", name, "--net", "fabric", "--", CONNRATE, "server", "80", "2")
            producers.append((f"p{i}", container_ip(name)))
        client_name = f"{LAB}cl"
        on_h1("run", "--name", client_name, "--net", "fabric", "--", "sleep", "infinity")
        client = f"fnc-{client_name}"
        for k, v in (("net.ipv4.ip_local_port_range", "1024 65000"), ("net.ipv4.tcp_tw_reuse", "1")):
            sh("ip", "netns", "exec", client, "sysctl", "-qw", f"{k}={v}")
        for pid, ips in producers:
            args = ["service", "register", "bench", "--port", "80", "--vip", VIP, "--id", pid]
            for ip in ips:
                args += ["--addr", ip]
            on_h1(*args)
        t0 = time.monotonic()
        while status()["lb"].get("vipPorts", 0) == 0:
            if time.monotonic() - t0 > 60:
                raise RuntimeError(f"service bench never programmed: {status()['lb']}")
            time.sleep(0.1)
        time.sleep(1)
        base = status()["lb"]["vipPorts"]  # bench's own VIP ports
        small = 9  # 9 others + bench = 10 services
        write("add", 0, small)
        wait_vip_ports(base + small)
        log("10 services: measuring")
        ten_runs = conn_rate(client, a.secs, a.reps)[1]
        big_runs = []
        timings = []
        for cycle in range(a.cycles):
            log(f"cycle {cycle + 1}/{a.cycles}: writing {a.services - small - 1} more services")
            t0 = time.monotonic()
            write("add", small, a.services - 1)
            written = time.monotonic() - t0
            waited = wait_vip_ports(base + a.services - 1)
            incremental_ms = status()["lb"]["lastApplyTookMs"]
            # A restarted agent rebuilds the whole table in one transaction.
            lab("stop-agent", "h1")
            lab("start-agent", "h1")
            t0 = time.monotonic()
            while True:
                try:
                    lb = status()["lb"]
                except (subprocess.CalledProcessError, json.JSONDecodeError):
                    lb = {}
                if lb.get("rebuilds", 0) >= 1 and lb.get("vipPorts") == base + a.services - 1:
                    break
                if time.monotonic() - t0 > 120:
                    raise RuntimeError(f"restarted agent never rebuilt the table: {lb}")
                time.sleep(0.05)
            timings.append((written, waited, incremental_ms, lb["lastApplyTookMs"]))
            log(f"{a.services} services: measuring")
            big_runs += conn_rate(client, a.secs, a.reps)[1]
            log("back to 10 services")
            write("del", small, a.services - 1)
            wait_vip_ports(base + small)
            ten_runs += conn_rate(client, a.secs, a.reps)[1]

        ten, big = statistics.median(ten_runs), statistics.median(big_runs)
        print(f"\n### Connections through a VIP: 10 vs {a.services} services (one host, 3 producers)\n")
        print(f"{a.cycles} cycles of 10 -> {a.services} -> 10 services, {a.reps} runs of {a.secs} s "
              "at each step; connrate, 4 connections in flight.\n")
        print("| services programmed | new connections/s, median | max | all runs |")
        print("|---|---|---|---|")
        print(f"| 10 | {ten:.0f} | {max(ten_runs):.0f} | {', '.join(f'{v:.0f}' for v in ten_runs)} |")
        print(f"| {a.services} | {big:.0f} | {max(big_runs):.0f} | {', '.join(f'{v:.0f}' for v in big_runs)} |")
        print(f"\nRatio {a.services} / 10: **{big / ten:.2f}** of medians, {max(big_runs) / max(ten_runs):.2f} "
              "of maxima (target >= 0.90)\n")
        print("| programming (per cycle) | times |")
        print("|---|---|")
        col = lambda k, f: ", ".join(f(t[k]) for t in timings)  # noqa: E731
        print(f"| writing {a.services - small - 1} services to etcd (40 per txn) | {col(0, lambda x: f'{x * 1000:.0f} ms')} |")
        print(f"| last write -> all programmed (agent, incremental) | {col(1, lambda x: f'{x * 1000:.0f} ms')} |")
        print(f"| the agent's last incremental nft transaction | {col(2, lambda x: f'{x:.0f} ms')} |")
        print(f"| whole-table rebuild with {a.services} services (restarted agent, one transaction) | {col(3, lambda x: f'{x:.0f} ms')} |")
    finally:
        lab("down", check=False)


if __name__ == "__main__":
    main()
