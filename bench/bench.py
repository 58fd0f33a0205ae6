#!/usr/bin/env python3
"""ferrynet's single-host benchmarks, each run beside its anchor in the same run.

    sudo python3 bench/bench.py latency   [--n 100]
    sudo python3 bench/bench.py ports     [--counts 0,1000,10000]
    sudo python3 bench/bench.py throughput

Everything happens inside network namespaces this script creates (a fresh "host" namespace per
system measured, containers and clients as further namespaces); all of it is removed at the end.
Plugins are executed the way a runtime executes them: CNI_* environment, config on stdin, run in
the host namespace. Results are printed as Markdown tables.
"""

import argparse
import ctypes
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# FERRYNET_BIN: another build of ferrynet (e.g. a saved "before" binary) for A/B runs.
FERRYNET = os.environ.get("FERRYNET_BIN") or os.path.join(ROOT, "target", "release", "ferrynet")
CONNRATE = os.path.join(ROOT, "target", "release", "connrate")
CNI_DIR = "/usr/lib/cni"
NETAVARK = "/usr/lib/podman/netavark"
CLONE_NEWNET = 0x40000000
LIBC = ctypes.CDLL(None, use_errno=True)
TAG = f"{os.getpid() % 100000}"
CREATED_NS = []


def sh(*args, check=True, **kw):
    return subprocess.run(args, check=check, capture_output=True, text=True, **kw)


def netns(kind):
    name = f"fnb-{kind}-{TAG}-{len(CREATED_NS)}"
    sh("ip", "netns", "add", name)
    sh("ip", "-n", name, "link", "set", "lo", "up")
    CREATED_NS.append(name)
    return name


def cleanup():
    for n in reversed(CREATED_NS):
        sh("ip", "netns", "del", n, check=False)
    CREATED_NS.clear()


def enter(ns):
    """preexec_fn: move the child into namespace `ns` before exec."""
    def f():
        fd = os.open(f"/run/netns/{ns}", os.O_RDONLY)
        if LIBC.setns(fd, CLONE_NEWNET) != 0:
            raise OSError(ctypes.get_errno(), "setns")
        os.close(fd)
    return f


RSS_MODE = {"on": False}


def run_plugin(host, path, cmd, conf, env=None, args=None):
    """Exec a plugin in `host`; returns (seconds, exit code, parsed stdout, peak RSS in KiB).
    Peak RSS is only measured in RSS mode, through GNU time: rusage of a child forked from this
    Python process would count the Python image it was forked from."""
    e = {"PATH": os.environ.get("PATH", ""), "CNI_COMMAND": cmd, "CNI_PATH": CNI_DIR}
    e.update(env or {})
    data = json.dumps(conf).encode()
    argv = [path] + (args or [])
    rss_file = None
    if RSS_MODE["on"]:
        rss_file = tempfile.NamedTemporaryFile(prefix="fnb-rss-", delete=False).name
        argv = ["/usr/bin/time", "-f", "%M", "-o", rss_file] + argv
    t0 = time.perf_counter()
    p = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, env=e, preexec_fn=enter(host))
    p.stdin.write(data)
    p.stdin.close()
    out = p.stdout.read()
    err = p.stderr.read()
    _, status, ru = os.wait4(p.pid, 0)
    dt = time.perf_counter() - t0
    p.returncode = os.waitstatus_to_exitcode(status)
    try:
        parsed = json.loads(out) if out.strip() else {}
    except ValueError:
        parsed = {"raw": out.decode(errors="replace")}
    if p.returncode != 0:
        parsed.setdefault("stderr", err.decode(errors="replace")[-500:])
    rss = 0
    if rss_file:
        with open(rss_file) as f:
            rss = int((f.read().split() or ["0"])[-1])
        os.unlink(rss_file)
    return dt, p.returncode, parsed, rss


def pct(xs, q):
    xs = sorted(xs)
    k = (len(xs) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def ms(x):
    return f"{x * 1000:.1f}"


# --- the three systems -------------------------------------------------------------------------

class Ferrynet:
    name = "ferrynet"

    def __init__(self, host, cidr="10.77.0.0/16"):
        self.host = host
        self.state = tempfile.mkdtemp(prefix="fnb-state-")
        self.cidr = cidr

    def conf(self, ports):
        return {"cniVersion": "1.0.0", "name": "bench", "type": "ferrynet", "subnets": [{"cidr": self.cidr}],
                "stateDir": self.state, "runtimeConfig": {"portMappings": ports}}

    def add(self, cid, ns, ports):
        env = {"CNI_CONTAINERID": cid, "CNI_NETNS": f"/run/netns/{ns}", "CNI_IFNAME": "eth0"}
        dt, rc, out, rss = run_plugin(self.host, FERRYNET, "ADD", self.conf(ports), env)
        if rc != 0:
            raise RuntimeError(f"ferrynet ADD failed: {out}")
        return dt, rss, out

    def delete(self, cid, ns, ports, _result):
        env = {"CNI_CONTAINERID": cid, "CNI_NETNS": f"/run/netns/{ns}", "CNI_IFNAME": "eth0"}
        dt, rc, out, rss = run_plugin(self.host, FERRYNET, "DEL", self.conf(ports), env)
        if rc != 0:
            raise RuntimeError(f"ferrynet DEL failed: {out}")
        return dt, rss

    def close(self):
        shutil.rmtree(self.state, ignore_errors=True)


class RefChain:
    """The reference plugins as a runtime chains them: bridge (+ host-local IPAM) then portmap."""
    name = "bridge+host-local+portmap"

    def __init__(self, host, cidr="10.78.0.0/16"):
        self.host = host
        self.state = tempfile.mkdtemp(prefix="fnb-hl-")
        self.cidr = cidr

    def bridge_conf(self):
        return {"cniVersion": "1.0.0", "name": "bench", "type": "bridge", "bridge": "cnibench0", "isGateway": True,
                "ipMasq": True, "hairpinMode": True,
                "ipam": {"type": "host-local", "ranges": [[{"subnet": self.cidr}]], "dataDir": self.state,
                         # host-local gives the container a default route only when asked to.
                         "routes": [{"dst": "0.0.0.0/0"}]}}

    def portmap_conf(self, ports, prev):
        c = {"cniVersion": "1.0.0", "name": "bench", "type": "portmap", "capabilities": {"portMappings": True},
             "runtimeConfig": {"portMappings": ports}}
        if prev is not None:
            c["prevResult"] = prev
        return c

    def add(self, cid, ns, ports):
        env = {"CNI_CONTAINERID": cid, "CNI_NETNS": f"/run/netns/{ns}", "CNI_IFNAME": "eth0"}
        d1, rc, res, r1 = run_plugin(self.host, f"{CNI_DIR}/bridge", "ADD", self.bridge_conf(), env)
        if rc != 0:
            raise RuntimeError(f"bridge ADD failed: {res}")
        d2, rc, res2, r2 = run_plugin(self.host, f"{CNI_DIR}/portmap", "ADD", self.portmap_conf(ports, res), env)
        if rc != 0:
            raise RuntimeError(f"portmap ADD failed: {res2}")
        return d1 + d2, max(r1, r2), res2

    def delete(self, cid, ns, ports, result):
        env = {"CNI_CONTAINERID": cid, "CNI_NETNS": f"/run/netns/{ns}", "CNI_IFNAME": "eth0"}
        d2, rc, out, r2 = run_plugin(self.host, f"{CNI_DIR}/portmap", "DEL", self.portmap_conf(ports, result), env)
        if rc != 0:
            raise RuntimeError(f"portmap DEL failed: {out}")
        conf = self.bridge_conf()
        conf["prevResult"] = result
        d1, rc, out, r1 = run_plugin(self.host, f"{CNI_DIR}/bridge", "DEL", conf, env)
        if rc != 0:
            raise RuntimeError(f"bridge DEL failed: {out}")
        return d1 + d2, max(r1, r2)

    def close(self):
        shutil.rmtree(self.state, ignore_errors=True)


class Netavark:
    """netavark setup/teardown (Debian's 1.4.0: its iptables firewall driver; DNS off)."""
    name = "netavark"

    def __init__(self, host):
        self.host = host
        self.cfg = tempfile.mkdtemp(prefix="fnb-nv-")
        self.n = 0

    def opts(self, cid, ip, ports):
        return {"container_id": cid, "container_name": cid,
                "networks": {"bench": {"interface_name": "eth0", "static_ips": [ip]}},
                "network_info": {"bench": {"dns_enabled": False, "driver": "bridge", "id": "0" * 63 + "1", "internal": False,
                                           "ipv6_enabled": False, "name": "bench", "network_interface": "nvbench0",
                                           "subnets": [{"gateway": "10.79.0.1", "subnet": "10.79.0.0/16"}]}},
                "port_mappings": [{"host_ip": "", "container_port": p["containerPort"], "host_port": p["hostPort"],
                                   "range": 1, "protocol": p.get("protocol", "tcp")} for p in ports]}

    def add(self, cid, ns, ports):
        # netavark leaves IPAM to podman: hand it the next static address.
        self.n += 1
        ip = f"10.79.{(self.n + 1) // 250}.{(self.n + 1) % 250 + 2}"
        o = self.opts(cid, ip, ports)
        dt, rc, out, rss = run_plugin(self.host, NETAVARK, "", o, args=["--config", self.cfg, "setup", f"/run/netns/{ns}"])
        if rc != 0:
            raise RuntimeError(f"netavark setup failed: {out}")
        return dt, rss, o

    def delete(self, cid, ns, ports, result):
        dt, rc, out, rss = run_plugin(self.host, NETAVARK, "", result, args=["--config", self.cfg, "teardown", f"/run/netns/{ns}"])
        if rc != 0:
            raise RuntimeError(f"netavark teardown failed: {out}")
        return dt, rss

    def close(self):
        shutil.rmtree(self.cfg, ignore_errors=True)


# --- benchmarks --------------------------------------------------------------------------------

def bench_latency(n):
    rows = []
    for cls in (Ferrynet, RefChain, Netavark):
        host = netns("h")
        sysm = cls(host)
        ctrs = [netns("c") for _ in range(n)]
        adds, dels, rss = [], [], 0
        results = []
        try:
            for i, ns in enumerate(ctrs):
                dt, r, res = sysm.add(f"lat{i}", ns, [{"hostPort": 20000 + i, "containerPort": 80, "protocol": "tcp"}])
                adds.append(dt)
                rss = max(rss, r)
                results.append(res)
            for i, ns in enumerate(ctrs):
                dt, r = sysm.delete(f"lat{i}", ns, [{"hostPort": 20000 + i, "containerPort": 80, "protocol": "tcp"}], results[i])
                dels.append(dt)
            # Peak RSS from a separate pass through GNU time (not timed).
            RSS_MODE["on"] = True
            try:
                for i, ns in enumerate(ctrs[:5]):
                    ports = [{"hostPort": 21000 + i, "containerPort": 80, "protocol": "tcp"}]
                    _, r, res = sysm.add(f"rss{i}", ns, ports)
                    rss = max(rss, r)
                    rss = max(rss, sysm.delete(f"rss{i}", ns, ports, res)[1])
            finally:
                RSS_MODE["on"] = False
        finally:
            sysm.close()
            cleanup()
        rows.append((sysm.name, pct(adds, .5), pct(adds, .95), pct(dels, .5), pct(dels, .95), rss))
        print(f"  {sysm.name}: ADD p50 {ms(pct(adds, .5))} ms, DEL p50 {ms(pct(dels, .5))} ms", file=sys.stderr)
    f = rows[0]
    best_add = min(r[1] for r in rows[1:])
    best_del = min(r[3] for r in rows[1:])
    print(f"\n### CNI ADD/DEL latency, {n} containers, one published port each\n")
    print("| system | ADD p50 ms | ADD p95 ms | DEL p50 ms | DEL p95 ms | peak RSS KiB |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r[0]} | {ms(r[1])} | {ms(r[2])} | {ms(r[3])} | {ms(r[4])} | {r[5]} |")
    print(f"\nferrynet / faster anchor: ADD p50 {f[1] / best_add:.2f}x, DEL p50 {f[3] / best_del:.2f}x "
          f"(target <= 0.5x)")


def wire_client(host, n):
    """An outside client namespace wired to `host` by a veth: returns (client ns, host address)."""
    client = netns("o")
    hl = f"fnbo{TAG}{n}"[:15]
    sh("ip", "-n", host, "link", "add", hl, "type", "veth", "peer", "name", "ext0", "netns", client)
    sh("ip", "-n", host, "addr", "add", f"10.250.{n}.1/24", "dev", hl)
    sh("ip", "-n", host, "link", "set", hl, "up")
    sh("ip", "-n", client, "addr", "add", f"10.250.{n}.2/24", "dev", "ext0")
    sh("ip", "-n", client, "link", "set", "ext0", "up")
    sh("ip", "-n", client, "route", "add", "default", "via", f"10.250.{n}.1")
    for k, v in (("net.ipv4.ip_local_port_range", "1024 65000"), ("net.ipv4.tcp_tw_reuse", "1")):
        sh("ip", "netns", "exec", client, "sysctl", "-qw", f"{k}={v}")
    return client, f"10.250.{n}.1"


def conn_rate(client, addr, port, secs=4, reps=3):
    vals = []
    for _ in range(reps):
        out = sh("ip", "netns", "exec", client, CONNRATE, "client", addr, str(port), str(secs), "4").stdout
        vals.append(float(out.split()[0]))
    return statistics.median(vals)


def bench_ports(counts):
    rows = []
    for cls in (Ferrynet, RefChain):
        for count in counts:
            host = netns("h")
            sysm = cls(host)
            try:
                # Existing mappings: 10 containers sharing `count` host ports.
                per = count // 10
                for k in range(10 if count else 0):
                    ns = netns("c")
                    ports = [{"hostPort": 30000 + k * per + j, "containerPort": 80, "protocol": "tcp"} for j in range(per)]
                    sysm.add(f"fill{k}", ns, ports)
                # The server behind the measured port.
                srv_ns = netns("c")
                _, _, _ = sysm.add("server", srv_ns, [{"hostPort": 8080, "containerPort": 80, "protocol": "tcp"}])
                srv = subprocess.Popen(["ip", "netns", "exec", srv_ns, CONNRATE, "server", "80", "2"], stdout=subprocess.PIPE)
                srv.stdout.readline()
                client, addr = wire_client(host, 60)
                # Time of one more ADD with a mapping (median of 5).
                times = []
                for r in range(5):
                    ns = netns("c")
                    dt, _, res = sysm.add(f"probe{r}", ns, [{"hostPort": 9000 + r, "containerPort": 80, "protocol": "tcp"}])
                    times.append(dt)
                rate = conn_rate(client, addr, 8080)
                srv.kill()
                srv.wait()
            finally:
                sysm.close()
                cleanup()
            rows.append((sysm.name, count, statistics.median(times), rate))
            print(f"  {sysm.name} @ {count}: ADD {ms(statistics.median(times))} ms, {rate:.0f} conn/s", file=sys.stderr)
    print("\n### Published ports at scale\n")
    print("| system | existing mappings | one more ADD (median ms) | new TCP conn/s via published port | conn/s vs same system at 0 |")
    print("|---|---|---|---|---|")
    base = {}
    for name, count, t, rate in rows:
        base.setdefault(name, rate)
        print(f"| {name} | {count} | {ms(t)} | {rate:.0f} | {rate / base[name]:.2f} |")


def iperf(server_ns, client_ns, addr, secs=5):
    """One iperf3 run from `client_ns` to a one-shot server in `server_ns`; bits per second."""
    srv = subprocess.Popen(["ip", "netns", "exec", server_ns, "iperf3", "-s", "-1", "-p", "5201"],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(0.3)
    out = sh("ip", "netns", "exec", client_ns, "iperf3", "-c", addr, "-p", "5201", "-t", str(secs), "-J").stdout
    srv.wait(timeout=10)
    return json.loads(out)["end"]["sum_received"]["bits_per_second"]


def bench_throughput(secs=5, reps=5):
    raw, fn = [], []
    try:
        a, b = netns("c"), netns("c")
        sh("ip", "-n", a, "link", "add", "eth0", "type", "veth", "peer", "name", "eth0", "netns", b)
        sh("ip", "-n", a, "addr", "add", "10.76.0.1/24", "dev", "eth0")
        sh("ip", "-n", b, "addr", "add", "10.76.0.2/24", "dev", "eth0")
        sh("ip", "-n", a, "link", "set", "eth0", "up")
        sh("ip", "-n", b, "link", "set", "eth0", "up")
        host = netns("h")
        f = Ferrynet(host)
        c1, c2 = netns("c"), netns("c")
        r1 = f.add("t1", c1, [])[2]
        f.add("t2", c2, [])
        ip1 = r1["ips"][0]["address"].split("/")[0]
        for _ in range(reps):
            raw.append(iperf(a, b, "10.76.0.1", secs))
            fn.append(iperf(c1, c2, ip1, secs))
        f.close()
    finally:
        cleanup()
    r, x = statistics.median(raw), statistics.median(fn)
    print(f"\n### Same-host TCP throughput (iperf3, {secs} s x {reps}, median)\n")
    print("| path | Gbit/s |")
    print("|---|---|")
    print(f"| raw veth pair between two netns | {r / 1e9:.2f} |")
    print(f"| ferrynet container -> container (veth, bridge, veth) | {x / 1e9:.2f} |")
    print(f"\nferrynet / raw veth: {x / r:.2f} (target >= 0.95)")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("which", choices=["latency", "ports", "throughput"])
    ap.add_argument("--n", type=int, default=100, help="containers for the latency benchmark")
    ap.add_argument("--counts", default="0,1000,10000", help="existing mappings for the ports benchmark")
    a = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("run as root")
    for p in (FERRYNET, CONNRATE):
        if not os.path.exists(p):
            sys.exit(f"{p} missing: cargo build --release -p ferrynet -p connrate")
    try:
        if a.which == "latency":
            bench_latency(a.n)
        elif a.which == "ports":
            bench_ports([int(c) for c in a.counts.split(",")])
        else:
            bench_throughput()
    finally:
        cleanup()


if __name__ == "__main__":
    main()
