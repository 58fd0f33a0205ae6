#!/usr/bin/env python3
"""ferrynet's BGP benchmarks, on the rack lab (`ferrynet lab up --racks 2 --router bird`).

    sudo python3 bench/bgp.py throughput [--secs 5 --reps 5]   # container<->container over bgp vs host<->host, both through the ToRs
    sudo python3 bench/bgp.py propagation [--n 30 --starts 5] [--before BIN]  # ADD on h1 -> route in h2's kernel; a block claim in etcd -> route in h2's kernel; agent start -> Established; vs GoBGP -> BIRD
        (--before: the same with another ferrynet build, e.g. the one before a change, in the same run)
    sudo python3 bench/bgp.py table [--prefixes 10000 --reps 2]   # a GoBGP peer's table into the kernel: the agent vs BIRD

All traffic stays inside namespaces the lab or this script creates; everything is removed at
the end. Results are printed as Markdown tables.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench import FERRYNET, cleanup, iperf, ms, netns, pct, run_plugin, sh  # noqa: E402
from multihost import cni, host_ns, lab_down, LAB_ROOT  # noqa: E402


def rack_lab(name, hosts=2, bgp=True):
    lab_down(name)
    args = [FERRYNET, "lab", "up", "--name", name, "--hosts", str(hosts), "--racks", "2", "--router", "bird"]
    if bgp:
        args += ["--backend", "bgp"]
    sh(*args)


def ns_exec(ns, *cmd, check=True):
    return sh("ip", "netns", "exec", ns, *cmd, check=check)


def birdc(lab, r, *args):
    return ns_exec(f"{lab}-tor{r}", "birdc", "-s", f"{LAB_ROOT}/{lab}/tor{r}/bird.ctl", *args, check=False).stdout


def count_routes(ns, proto):
    out = sh("ip", "-n", ns, "route", "show", "proto", proto).stdout
    return out.count("\n")


def wait(cond, timeout, what):
    until = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > until:
            raise RuntimeError(f"timed out waiting for {what}")
        time.sleep(0.01)


def agent_pid(lab, host):
    rec = json.load(open(f"{LAB_ROOT}/{lab}/lab.json"))
    return [p for p, w in rec["pids"] if w == f"agent {host}"][-1]


def proc_kib(pid, field):
    for line in open(f"/proc/{pid}/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def extra_ns(lab, name, addr):
    """A namespace on rack 0's switch at `addr`/24 (removed by the caller)."""
    sh("ip", "netns", "add", name)
    sh("ip", "-n", f"{lab}-ul", "link", "add", name[-6:], "type", "veth", "peer", "name", "eth0", "netns", name)
    sh("ip", "-n", f"{lab}-ul", "link", "set", name[-6:], "master", "ul0", "up")
    sh("ip", "-n", name, "addr", "add", f"{addr}/24", "dev", "eth0")
    sh("ip", "-n", name, "link", "set", "eth0", "up")
    sh("ip", "-n", name, "link", "set", "lo", "up")


class RouteWatch:
    """`ip monitor route` in a namespace: the time each new route line (with `needle`) appears."""

    def __init__(self, ns, needle):
        self.p = subprocess.Popen(["ip", "-n", ns, "monitor", "route"], stdout=subprocess.PIPE, text=True)
        self.needle, self.seen, self.lock = needle, [], threading.Lock()
        threading.Thread(target=self.read, daemon=True).start()
        time.sleep(0.2)

    def read(self):
        for line in self.p.stdout:
            if self.needle in line and not line.startswith("Deleted"):
                with self.lock:
                    self.seen.append((time.monotonic(), line.split()[0]))

    def after(self, t0):
        with self.lock:
            return [s for s in self.seen if s[0] >= t0]

    def stop(self):
        self.p.kill()
        self.p.wait()


def throughput(secs, reps):
    lab = "bgpbt"
    try:
        rack_lab(lab)
        c1, c2 = netns("c"), netns("c")
        _, r1 = cni(lab, "h1", "ADD", "t1", c1)
        cni(lab, "h2", "ADD", "t2", c2)
        a1 = r1["ips"][0]["address"].split("/")[0]
        wait(lambda: sh("ip", "netns", "exec", c2, "ping", "-c1", "-W1", a1, check=False).returncode == 0, 30, "c2 -> c1")
        ours, anchor = [], []
        for _ in range(reps):
            ours.append(iperf(c1, c2, a1, secs) / 1e9)
            anchor.append(iperf(host_ns(lab, "h1"), host_ns(lab, "h2"), "172.31.0.1", secs) / 1e9)
        mo, ma = statistics.median(ours), statistics.median(anchor)
        print("| container h2 → container h1 over bgp (Gbit/s) | host h2 → host h1 (Gbit/s) | ratio |")
        print("|---|---|---|")
        print(f"| {mo:.2f} ({', '.join(f'{x:.2f}' for x in ours)}) | {ma:.2f} ({', '.join(f'{x:.2f}' for x in anchor)}) | {mo / ma:.2f} |")
    finally:
        lab_down(lab)
        cleanup()


CLAIM = r"""
import base64,json,sys,time,urllib.request
def b64(s): return base64.b64encode(s.encode()).decode()
block=sys.argv[1]
body=json.dumps({'success':[{'requestPut':{'key':b64('/ferrynet/v1/blocks/prop/'+block.replace('/','_')),
                                           'value':b64(json.dumps({'host':'h1'}))}}]}).encode()
t0=time.monotonic()
urllib.request.urlopen(urllib.request.Request('http://172.31.0.253:2379/v3/kv/txn',data=body,method='POST')).read()
print(t0)
"""


def ours_propagation(n, starts):
    lab = "bgpbp"
    adds, props, est, claims, late, ahead = [], [], [], [], 0, 0
    try:
        rack_lab(lab)
        sh("nsenter", f"--net=/run/netns/{host_ns(lab, 'h1')}", FERRYNET, "--state-dir", f"{LAB_ROOT}/{lab}/h1",
           "network", "create", "prop", "--subnet", "10.50.0.0/16", "--backend", "bgp", "--block-size", "30")
        wait(lambda: "10.50." in sh("ip", "-n", host_ns(lab, "h2"), "route", "show", "proto", "114").stdout, 30,
             "prop's first block at h2")
        # The first container takes the block h1 already announces; every later one (a /30
        # holds one) needs a new block: claimed by the ADD itself, or, with spare blocks,
        # claimed ahead by h1's agent after the previous ADD (its route then already in h2's
        # kernel when the ADD starts: counted as "ahead", its propagation as 0).
        cni_net(lab, "h1", "prop", "warm", netns("c"))
        watch = RouteWatch(host_ns(lab, "h2"), "10.50.")
        for i in range(n):
            # Containers arrive 200 ms apart (not back to back), for both builds alike.
            time.sleep(0.2)
            ns = netns("c")
            have = sh("ip", "-n", host_ns(lab, "h2"), "route", "show", "proto", "114").stdout
            t0 = time.monotonic()
            dt, out = cni_net(lab, "h1", "prop", f"p{i}", ns)
            adds.append(dt)
            ip = out["ips"][0]["address"].split("/")[0]
            block = ".".join(ip.split(".")[:3] + [str(int(ip.split(".")[3]) & ~3)]) + "/30"
            if any(line.split()[:1] == [block] for line in have.splitlines()):
                ahead += 1
                props.append(0.0)
                continue
            wait(lambda: any(s[1] == block for s in watch.after(t0)), 10, f"{block} at h2")
            seen = next(s[0] for s in watch.after(t0) if s[1] == block)
            props.append(seen - t0)
            late += seen > t0 + dt
        # A block claim written to etcd as IPAM writes it (one transaction, from the etcd
        # namespace), timed from just before the request: the BGP path alone (store watch ->
        # h1's speaker -> ToRs -> h2's speaker -> h2's kernel), without the CNI process.
        for i in range(n):
            block = f"10.50.200.{i * 4}/30"
            t0 = float(ns_exec(f"{lab}-etcd", "python3", "-c", CLAIM, block).stdout.strip())
            wait(lambda: any(s[1] == block for s in watch.after(t0)), 10, f"{block} at h2")
            claims.append(next(s[0] for s in watch.after(t0) if s[1] == block) - t0)
        watch.stop()
        for _ in range(starts):
            sh(FERRYNET, "lab", "stop-agent", "--name", lab, "h1")
            wait(lambda: "Established" not in birdc(lab, 0, "show", "protocols", "h1v4"), 10, "session down")
            t0 = time.monotonic()
            sh(FERRYNET, "lab", "start-agent", "--name", lab, "h1")
            wait(lambda: "Established" in birdc(lab, 0, "show", "protocols", "h1v4"), 30, "session up")
            est.append(time.monotonic() - t0)
    finally:
        lab_down(lab)
        cleanup()
    return adds, props, est, claims, late, ahead


def cni_net(lab, host, net, cid, ns):
    conf = {"cniVersion": "1.1.0", "name": net, "type": "ferrynet", "stateDir": f"{LAB_ROOT}/{lab}/{host}"}
    env = {"CNI_CONTAINERID": cid, "CNI_NETNS": f"/run/netns/{ns}", "CNI_IFNAME": "eth0"}
    dt, rc, out, _ = run_plugin(host_ns(lab, host), FERRYNET, "ADD", conf, env)
    if rc != 0:
        raise RuntimeError(f"ADD on {host} failed: {out}")
    return dt, out


GOBGP_H1 = """[global.config]
  as = 4200000001
  router-id = "172.31.0.1"
[[neighbors]]
  [neighbors.config]
    neighbor-address = "172.31.0.254"
    peer-as = 65000
  [neighbors.timers.config]
    connect-retry = 1
  [[neighbors.afi-safis]]
    [neighbors.afi-safis.config]
      afi-safi-name = "ipv4-unicast"
"""

BIRD_H2 = """router id 172.31.1.2;
protocol device {}
protocol kernel { ipv4 { export all; }; }
protocol bgp tor { local as 4200000002; neighbor 172.31.1.254 as 65001; direct;
  connect retry time 1; ipv4 { import all; export none; }; }
"""


def anchor_propagation(n, starts):
    """GoBGP on h1 -> BIRD ToRs -> BIRD on h2 (its kernel), in a rack lab without ferrynet's BGP."""
    lab = "bgpba"
    adds, props, est = [], [], []
    d = f"/tmp/{lab}"
    os.makedirs(d, exist_ok=True)
    procs = []
    try:
        rack_lab(lab, bgp=False)
        open(f"{d}/gobgpd.toml", "w").write(GOBGP_H1)
        open(f"{d}/bird.conf", "w").write(BIRD_H2)
        procs.append(subprocess.Popen(["ip", "netns", "exec", host_ns(lab, "h2"), "bird", "-f", "-c", f"{d}/bird.conf",
                                       "-s", f"{d}/bird.ctl"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        gobgpd = None
        for i in range(starts):
            if gobgpd:
                gobgpd.terminate()
                gobgpd.wait()
                wait(lambda: "Established" not in birdc(lab, 0, "show", "protocols", "h1v4"), 10, "session down")
            t0 = time.monotonic()
            gobgpd = subprocess.Popen(["ip", "netns", "exec", host_ns(lab, "h1"), "gobgpd", "-f", f"{d}/gobgpd.toml",
                                       "-t", "toml", "--api-hosts", "127.0.0.1:50051", "--pprof-disable"],
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            wait(lambda: "Established" in birdc(lab, 0, "show", "protocols", "h1v4"), 60, "gobgp session up")
            est.append(time.monotonic() - t0)
        procs.append(gobgpd)
        wait(lambda: "Established" in sh("birdc", "-s", f"{d}/bird.ctl", "show", "protocols", "tor", check=False).stdout,
             60, "BIRD on h2 up")
        watch = RouteWatch(host_ns(lab, "h2"), "10.50.")
        for i in range(n):
            t0 = time.monotonic()
            t = time.monotonic()
            ns_exec(host_ns(lab, "h1"), "gobgp", "global", "rib", "add", f"10.50.{i // 64}.{(i % 64) * 4}/30",
                    "nexthop", "172.31.0.1")
            adds.append(time.monotonic() - t)
            wait(lambda: watch.after(t0), 10, "the route at h2")
            props.append(watch.after(t0)[0][0] - t0)
        watch.stop()
    finally:
        for p in procs:
            if p:
                p.kill()
                p.wait()
        lab_down(lab)
    return adds, props, est


def propagation(n, starts, before=None):
    """Ours (with `before` too, when given: another ferrynet build, run in a child process with
    FERRYNET_BIN set) and the anchor, one table."""
    runs = []
    if before:
        out = sh(sys.executable, os.path.abspath(__file__), "ours-propagation", "--n", str(n), "--starts", str(starts),
                 env={**os.environ, "FERRYNET_BIN": before}).stdout
        runs.append(("before", json.loads(out.strip().splitlines()[-1])))
    oa, op, oe, oc, late, ahead = ours_propagation(n, starts)
    runs.append(("after" if before else "ferrynet",
                 {"adds": oa, "props": op, "est": oe, "claims": oc, "late": late, "ahead": ahead}))
    aa, ap, ae = anchor_propagation(n, starts)
    print(f"ferrynet: {FERRYNET}" + (f"; before: {before}" if before else ""))
    print("| measure | build | ferrynet p50 | p99 | GoBGP → BIRD (anchor) p50 | p99 | ratio (p50) | ratio (p99) |")
    print("|---|---|---|---|---|---|---|---|")
    for what, key, a in (("origin (CNI ADD / `gobgp global rib add`)", "adds", aa),
                         ("CNI ADD start / `gobgp global rib add` start → route in h2's kernel", "props", ap),
                         ("block claim in etcd / `gobgp global rib add` start → route in h2's kernel", "claims", ap)):
        for build, r in runs:
            o = r[key]
            print(f"| {what} | {build} | {ms(pct(o, .5))} | {ms(pct(o, .99))} | {ms(pct(a, .5))} | {ms(pct(a, .99))} | "
                  f"{pct(o, .5) / pct(a, .5):.2f} | {pct(o, .99) / pct(a, .99):.2f} |")
    for build, r in runs:
        print(f"| route in h2's kernel only after the CNI ADD returned | {build} | {r['late']} of {n} | | | | | |")
    for build, r in runs:
        print(f"| route already in h2's kernel when the CNI ADD started (spare block) | {build} | "
              f"{r.get('ahead', 0)} of {n} | | | | | |")
    for build, r in runs:
        oe = r["est"]
        print(f"| speaker start → Established at the ToR | {build} | {ms(pct(oe, .5))} | {ms(max(oe))} (max) | "
              f"{ms(pct(ae, .5))} | {ms(max(ae))} (max) | {pct(oe, .5) / pct(ae, .5):.2f} | |")


BIRD_RX = """router id 172.31.0.61;
protocol device {}
protocol kernel { ipv4 { export all; }; merge paths on; }
protocol bgp gob { local as 65101; neighbor 172.31.0.60 as 65100; direct; ipv4 { import all; export none; }; }
"""

GOBGP_TX = """[global.config]
  as = 65100
  router-id = "172.31.0.60"
"""


def table(prefixes, reps):
    lab = "bgpbt2"
    d = f"/tmp/{lab}"
    os.makedirs(d, exist_ok=True)
    gob, rx = f"{lab}-gob", f"{lab}-birdrx"
    procs = []
    rows = {"ferrynet": [], "BIRD": []}
    installs = {"ferrynet": [], "BIRD": []}
    rss = {}
    try:
        rack_lab(lab, hosts=1)
        extra_ns(lab, gob, "172.31.0.60")
        extra_ns(lab, rx, "172.31.0.61")
        open(f"{d}/gobgpd.toml", "w").write(GOBGP_TX)
        open(f"{d}/bird.conf", "w").write(BIRD_RX)
        procs.append(subprocess.Popen(["ip", "netns", "exec", gob, "gobgpd", "-f", f"{d}/gobgpd.toml", "-t", "toml",
                                       "--api-hosts", "127.0.0.1:50051", "--pprof-disable"],
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        procs.append(subprocess.Popen(["ip", "netns", "exec", rx, "bird", "-f", "-c", f"{d}/bird.conf", "-s",
                                       f"{d}/bird.ctl"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        time.sleep(1)
        # The table: /32s inside the pool, next hop the GoBGP speaker itself; loaded before any
        # neighbour exists (not timed).
        lines = "".join(f"10.20.{128 + i // 256}.{i % 256}/32\n" for i in range(prefixes))
        sh("bash", "-c", f"ip netns exec {gob} xargs -P 4 -I P gobgp global rib add P nexthop 172.31.0.60",
           input=lines)
        got = ns_exec(gob, "gobgp", "global", "rib", "summary").stdout
        print(f"GoBGP table loaded: {got.strip()}", file=sys.stderr)
        sh("nsenter", f"--net=/run/netns/{host_ns(lab, 'h1')}", FERRYNET, "--state-dir", f"{LAB_ROOT}/{lab}/h1",
           "bgp", "peer", "add", "gob", "--address", "172.31.0.60", "--asn", "65100", "--host", "h1")
        pid = agent_pid(lab, "h1")
        rss["ferrynet before"] = proc_kib(pid, "VmRSS")
        for _ in range(reps):
            for who, peer, asn, ns, proto in (("BIRD", "172.31.0.61", "65101", rx, "bird"),
                                              ("ferrynet", "172.31.0.1", "4200000001", host_ns(lab, "h1"), "114")):
                watch = RouteWatch(ns, "10.20.")
                t0 = time.monotonic()
                ns_exec(gob, "gobgp", "neighbor", "add", peer, "as", asn)
                wait(lambda: count_routes(ns, proto) >= prefixes, 300, f"{who}'s kernel table")
                done = time.monotonic()
                t1 = watch.after(t0)[0][0]
                watch.stop()
                rows[who].append(done - t0)
                installs[who].append(done - t1)
                if who == "ferrynet":
                    rss["ferrynet"] = proc_kib(pid, "VmRSS")
                    rss["ferrynet peak"] = proc_kib(pid, "VmHWM")
                else:
                    bpid = procs[1].pid
                    kids = sh("pgrep", "-P", str(bpid), check=False).stdout.split()
                    bp = int(kids[0]) if kids else bpid
                    rss["BIRD"] = proc_kib(bp, "VmRSS")
                    rss["BIRD peak"] = proc_kib(bp, "VmHWM")
                ns_exec(gob, "gobgp", "neighbor", "del", peer)
                wait(lambda: count_routes(ns, proto) == 0, 300, f"{who}'s table emptied")
        o, a = statistics.median(rows["ferrynet"]), statistics.median(rows["BIRD"])
        io, ia = statistics.median(installs["ferrynet"]), statistics.median(installs["BIRD"])
        print("| measure | ferrynet agent | BIRD 2 (anchor) | ratio |")
        print("|---|---|---|---|")
        print(f"| first route → all {prefixes} routes in the kernel, median of {reps} (s) | {io:.2f} ({', '.join(f'{x:.2f}' for x in installs['ferrynet'])}) | "
              f"{ia:.2f} ({', '.join(f'{x:.2f}' for x in installs['BIRD'])}) | {io / ia:.2f} |")
        print(f"| neighbour added → {prefixes} routes in the kernel, median of {reps} (s) | {o:.2f} ({', '.join(f'{x:.2f}' for x in rows['ferrynet'])}) | "
              f"{a:.2f} ({', '.join(f'{x:.2f}' for x in rows['BIRD'])}) | {o / a:.2f} |")
        print(f"| RSS with the table (MiB) | {rss['ferrynet'] / 1024:.1f} (before: {rss['ferrynet before'] / 1024:.1f}; peak {rss['ferrynet peak'] / 1024:.1f}) | "
              f"{rss['BIRD'] / 1024:.1f} (peak {rss['BIRD peak'] / 1024:.1f}) | {rss['ferrynet'] / rss['BIRD']:.2f} |")
    finally:
        for p in procs:
            p.kill()
            p.wait()
        lab_down(lab)
        for ns in (gob, rx):
            sh("ip", "netns", "del", ns, check=False)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("what", choices=["throughput", "propagation", "table", "ours-propagation"])
    ap.add_argument("--before", help="propagation: also run this ferrynet binary (the build before a change)")
    ap.add_argument("--secs", type=int, default=5)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--n", type=int, default=30)
    ap.add_argument("--starts", type=int, default=5)
    ap.add_argument("--prefixes", type=int, default=10000)
    a = ap.parse_args()
    if a.what == "throughput":
        throughput(a.secs, a.reps)
    elif a.what == "propagation":
        propagation(a.n, a.starts, a.before)
    elif a.what == "ours-propagation":
        oa, op, oe, oc, late, ahead = ours_propagation(a.n, a.starts)
        print(json.dumps({"adds": oa, "props": op, "est": oe, "claims": oc, "late": late, "ahead": ahead}))
    else:
        table(a.prefixes, a.reps if a.reps != 5 else 2)


if __name__ == "__main__":
    main()
