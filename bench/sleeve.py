#!/usr/bin/env python3
"""The sleeve (encrypted userspace overlay) against ferrynet's kernel VXLAN and boringtun's CLI,
in one `ferrynet lab` of two hosts (hosts are network namespaces on one underlay bridge).

    sudo python3 bench/sleeve.py [--reps 5] [--secs 5] [--rr 5000]

Per rep, alternating: iperf3 container h2 -> container h1 over a `--backend sleeve` network,
over a `--backend vxlan` network (same hosts, same lab), and host h2 -> host h1 through a
boringtun-cli tunnel (`cargo install boringtun-cli`; userspace WireGuard, 4 threads, multi-queue
TUN) configured over its UAPI socket. CPU: the CPU time, during each
iperf3 run of the iperf3 pair (with the kernel work done in their context), both agents and
boringtun-cli, per Gbit carried (CPU seconds per Gbit = busy cores per Gbit/s).
TCP_RR: a python client sends 64 bytes and waits for the echo, --rr times per path; p50 and
p99. Also: after `kill -9` of h1's agent and a restart, the time until a TCP connection from
h2's container to h1's succeeds. Everything is removed at the end. Markdown tables on stdout.
"""

import argparse
import resource
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench import FERRYNET, sh  # noqa: E402
from multihost import host_ns, lab_down, lab_up  # noqa: E402

LAB = "bslv"
BORINGTUN = shutil.which("boringtun-cli") or os.path.expanduser("~/.cargo/bin/boringtun-cli")

RR_SERVER = r"""
import socket
s=socket.socket();s.setsockopt(socket.SOL_SOCKET,socket.SO_REUSEADDR,1);s.bind(('0.0.0.0',7100));s.listen(8)
while True:
    c,_=s.accept();c.setsockopt(socket.IPPROTO_TCP,socket.TCP_NODELAY,1)
    while True:
        d=c.recv(64)
        if not d: break
        c.sendall(d)
    c.close()
"""

RR_CLIENT = r"""
import socket,sys,time,json
n=int(sys.argv[2]);s=socket.create_connection((sys.argv[1],7100));s.setsockopt(socket.IPPROTO_TCP,socket.TCP_NODELAY,1)
m=b'x'*64;ts=[]
for _ in range(100): s.sendall(m);s.recv(64)
for _ in range(n):
    t=time.perf_counter();s.sendall(m);got=0
    while got<64: got+=len(s.recv(64))
    ts.append(time.perf_counter()-t)
print(json.dumps(ts))
"""

REACH = r"""
import socket,sys,time
t0=time.perf_counter()
while time.perf_counter()-t0<30:
    try:
        socket.create_connection((sys.argv[1],7100),timeout=0.2).close();break
    except OSError:
        time.sleep(0.02)
print(time.perf_counter()-t0)
"""


def ferry(host, *args):
    state = f"/run/ferrynet-lab/{LAB}/{host}"
    return sh("nsenter", f"--net=/run/netns/{host_ns(LAB, host)}", FERRYNET, "--state-dir", state, *args)


def container(host, name, net):
    ferry(host, "run", "--name", name, "--net", net, "--", "sleep", "infinity")
    ps = json.loads(ferry(host, "ps", "--json").stdout)
    ip = next(c for c in ps if c["name"] == name)["ips"][0].split("/")[0]
    return f"fnc-{name}", ip


# Processes whose CPU time counts besides the iperf3 pair: the agents (the sleeve's threads)
# and boringtun-cli. The machine is shared, so its total busy time would count others' work.
TRACKED = []
TICK = os.sysconf("SC_CLK_TCK")


def tracked_cpu():
    total = 0.0
    for pid in TRACKED:
        try:
            with open(f"/proc/{pid}/stat") as f:
                v = f.read().rsplit(")", 1)[1].split()
            total += (int(v[11]) + int(v[12])) / TICK
        except OSError:
            pass
    return total


def children_cpu():
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def iperf(server_ns, client_ns, addr, secs):
    """Rate (bit/s) and CPU seconds per Gbit of one iperf3 run: the iperf3 pair (with the
    kernel work done in their context), the agents and boringtun-cli."""
    c0, p0 = children_cpu(), tracked_cpu()
    srv = subprocess.Popen(["ip", "netns", "exec", server_ns, "iperf3", "-s", "-1", "-p", "5201"],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(0.3)
    out = sh("ip", "netns", "exec", client_ns, "iperf3", "-c", addr, "-p", "5201", "-t", str(secs), "-J").stdout
    srv.wait(timeout=10)
    cpu = children_cpu() - c0 + tracked_cpu() - p0
    end = json.loads(out)["end"]
    rate = end["sum_received"]["bits_per_second"]
    gbits = rate * end["sum_received"]["seconds"] / 1e9
    return rate, cpu / gbits


def uapi(iface, text):
    s = socket.socket(socket.AF_UNIX)
    s.connect(f"/var/run/wireguard/{iface}.sock")
    s.sendall(text.encode() + b"\n\n")
    reply = s.recv(4096).decode()
    s.close()
    if "errno=0" not in reply:
        raise RuntimeError(f"boringtun {iface}: {reply}")


def boringtun_pair():
    """boringtun-cli in h1 and h2 (10.81.0.1/.2, port 51900), keys from `wg`-less UAPI."""
    if not os.path.exists(BORINGTUN):
        raise SystemExit("boringtun-cli is missing: cargo install boringtun-cli")
    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
    from cryptography.hazmat.primitives import serialization as ser
    raw = ser.Encoding.Raw
    keys = []
    for _ in range(2):
        k = X25519PrivateKey.generate()
        keys.append((k.private_bytes(raw, ser.PrivateFormat.Raw, ser.NoEncryption()).hex(),
                     k.public_key().public_bytes(raw, ser.PublicFormat.Raw).hex()))
    procs = []
    for i, h in ((0, "h1"), (1, "h2")):
        iface = f"wgb{LAB}{i}"
        env = dict(os.environ, WG_SUDO="1")
        procs.append(subprocess.Popen(
            ["ip", "netns", "exec", host_ns(LAB, h), BORINGTUN, iface, "--foreground",
             "--disable-drop-privileges", "--log", f"/tmp/{iface}.log"],
            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
    time.sleep(1)
    for i, h in ((0, "h1"), (1, "h2")):
        iface, peer = f"wgb{LAB}{i}", 1 - i
        uapi(iface, f"set=1\nprivate_key={keys[i][0]}\nlisten_port=51900\n"
                    f"public_key={keys[peer][1]}\nendpoint=172.31.0.{peer + 1}:51900\nallowed_ip=10.81.0.0/24")
        sh("ip", "-n", host_ns(LAB, h), "addr", "add", f"10.81.0.{i + 1}/24", "dev", iface)
        sh("ip", "-n", host_ns(LAB, h), "link", "set", iface, "mtu", "1420", "up")
    return procs


def pct(xs, q):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


def rr(client_ns, server_ns, addr, n):
    srv = subprocess.Popen(["ip", "netns", "exec", server_ns, "python3", "-c", RR_SERVER],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(0.5)
    try:
        ts = json.loads(sh("ip", "netns", "exec", client_ns, "python3", "-c", RR_CLIENT, addr, str(n)).stdout)
    finally:
        srv.kill()
        srv.wait()
    return pct(ts, 0.5), pct(ts, 0.99)


def restart_reach(s1, s2, ip1):
    srv = subprocess.Popen(["ip", "netns", "exec", s1, "python3", "-c", RR_SERVER],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        time.sleep(0.5)
        sh(FERRYNET, "lab", "stop-agent", "--name", LAB, "h1", "--kill")
        sh(FERRYNET, "lab", "start-agent", "--name", LAB, "h1")
        t0 = time.perf_counter()
        sh("ip", "netns", "exec", s2, "python3", "-c", REACH, ip1)
        return time.perf_counter() - t0
    finally:
        srv.kill()
        srv.wait()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--secs", type=int, default=5)
    ap.add_argument("--rr", type=int, default=5000)
    ap.add_argument("--no-boringtun", action="store_true",
                    help="leave out the boringtun-cli anchor (sleeve vs VXLAN only)")
    a = ap.parse_args()
    paths = ("sleeve", "vxlan") if a.no_boringtun else ("sleeve", "vxlan", "boringtun")
    procs = []
    try:
        lab_up(LAB, 2, "sleeve")
        ferry("h1", "network", "create", "vx", "--subnet", "10.30.0.0/16", "--backend", "vxlan")
        time.sleep(2)
        s1, sip1 = container("h1", f"{LAB}s1", "fabric")
        s2, _ = container("h2", f"{LAB}s2", "fabric")
        v1, vip1 = container("h1", f"{LAB}v1", "vx")
        v2, _ = container("h2", f"{LAB}v2", "vx")
        with open(f"/run/ferrynet-lab/{LAB}/lab.json") as f:
            TRACKED.extend(pid for pid, what in json.load(f)["pids"] if what.startswith("agent"))
        if not a.no_boringtun:
            procs = boringtun_pair()
            TRACKED.extend(p.pid for p in procs)
        b1, b2 = host_ns(LAB, "h1"), host_ns(LAB, "h2")
        iperf(s1, s2, sip1, 1)
        iperf(v1, v2, vip1, 1)
        if not a.no_boringtun:
            iperf(b1, b2, "10.81.0.1", 1)
        res = {k: [] for k in paths}
        for _ in range(a.reps):
            res["vxlan"].append(iperf(v1, v2, vip1, a.secs))
            res["sleeve"].append(iperf(s1, s2, sip1, a.secs))
            if not a.no_boringtun:
                res["boringtun"].append(iperf(b1, b2, "10.81.0.1", a.secs))
        med = {k: (statistics.median(r for r, _ in v), statistics.median(c for _, c in v)) for k, v in res.items()}
        lat = {"sleeve": rr(s2, s1, sip1, a.rr), "vxlan": rr(v2, v1, vip1, a.rr)}
        if not a.no_boringtun:
            lat["boringtun"] = rr(b2, b1, "10.81.0.1", a.rr)
        back = restart_reach(s1, s2, sip1)
    finally:
        for p in procs:
            p.kill()
            p.wait()
        # `lab down` removes the containers `ferrynet run` made on its hosts.
        lab_down(LAB)
    print(f"\n### Cross-host TCP throughput (iperf3 container h2 -> container h1, {a.secs} s x {a.reps}, median)\n")
    print("| path | Gbit/s | CPU s per Gbit |")
    print("|---|---|---|")
    for k in paths:
        print(f"| {k} | {med[k][0] / 1e9:.2f} | {med[k][1]:.2f} |")
    anchor = "" if a.no_boringtun else \
        f"sleeve / boringtun-cli: {med['sleeve'][0] / med['boringtun'][0]:.2f} (target >= 1.0); "
    print(f"\nsleeve / vxlan: {med['sleeve'][0] / med['vxlan'][0]:.2f} (target >= 0.5); {anchor}"
          f"CPU per Gbit/s sleeve / vxlan: {med['sleeve'][1] / med['vxlan'][1]:.2f}")
    print("\nper rep (Gbit/s): " + "; ".join(
        f"{k} " + " ".join(f"{r / 1e9:.2f}" for r, _ in res[k]) for k in paths))
    print(f"\n### TCP_RR (64-byte request/response, python, {a.rr} round trips)\n")
    print("| path | p50 µs | p99 µs |")
    print("|---|---|---|")
    for k in paths:
        print(f"| {k} | {lat[k][0] * 1e6:.0f} | {lat[k][1] * 1e6:.0f} |")
    print(f"\nsleeve / vxlan: p50 {lat['sleeve'][0] / lat['vxlan'][0]:.2f}, p99 {lat['sleeve'][1] / lat['vxlan'][1]:.2f}")
    print(f"\nAgent kill -9 + restart on h1 -> h2's container connects to h1's again: {back:.2f} s")


if __name__ == "__main__":
    main()
