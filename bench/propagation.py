#!/usr/bin/env python3
"""Discovery propagation on `ferrynet lab` (3 hosts as namespaces, real etcd, vxlan):

    cargo build --release -p ferrynet
    sudo python3 bench/propagation.py [--n 100]

A producer (a TCP server answering `up`, container `bpropsrv` on h1) is registered as a new
service N times with `ferrynet service register prop<i> --port 80 --addr <its IP> --id psrv`
run on h1. Pollers inside containers on h2 and h3 are told the name first; each asks its own
host's DNS server (the container's nameserver, its gateway) for `prop<i>.fabric.ferrynet.internal`
A until it answers with an address (the VIP), then connects to VIP:80 until the server answers.
Timed from just before the register command starts (wall clock; one machine, so one clock) to
the answer on each host; p50/p99 of "resolvable" and "reachable" are printed as Markdown, with
the register command's own duration (process start, etcd transaction, exit) as the anchor.
All traffic stays inside the lab's namespaces; the lab is removed at the end.
"""

import argparse
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench import FERRYNET, ms, pct, sh  # noqa: E402

LAB = "bprop"
NET = "fabric"
DOMAIN = "ferrynet.internal"
SRV = f"{LAB}srv"

SERVER = r"""
import socket
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(('0.0.0.0', 80)); s.listen(512)
while True:
    c, _ = s.accept()
    try: c.sendall(b'up\n')
    except OSError: pass
    c.close()
"""

# Reads service names on stdin; for each, polls DNS (A query to its gateway, the host's
# resolver) until the name has an address, then TCP until the VIP answers; prints the wall time.
POLLER = r"""
import os, random, socket, struct, sys, time
gw = sys.argv[1]; suffix = sys.argv[2]
def query(name):
    qid = random.randrange(65536)
    q = struct.pack('>HHHHHH', qid, 0x0100, 1, 0, 0, 0)
    for label in name.split('.'):
        q += bytes([len(label)]) + label.encode()
    q += b'\0' + struct.pack('>HH', 1, 1)
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.settimeout(0.02)
    try:
        s.sendto(q, (gw, 53)); r = s.recv(4096)
    except OSError:
        return None
    finally:
        s.close()
    if len(r) < 12 or struct.unpack('>H', r[:2])[0] != qid or r[3] & 0xF != 0:
        return None
    an = struct.unpack('>H', r[6:8])[0]
    i = 12
    while r[i] != 0: i += r[i] + 1
    i += 5
    for _ in range(an):
        if r[i] & 0xC0 == 0xC0: i += 2
        else:
            while r[i] != 0: i += r[i] + 1
            i += 1
        typ, _, _, ln = struct.unpack('>HHIH', r[i:i+10]); i += 10
        if typ == 1 and ln == 4: return socket.inet_ntoa(r[i:i+4])
        i += ln
    return None
def reach(ip):
    # A short timeout: a SYN sent before the VIP is programmed is lost, a new one goes next.
    s = socket.socket(); s.settimeout(0.02)
    try:
        s.connect((ip, 80)); return s.recv(16).startswith(b'up')
    except OSError:
        return False
    finally:
        s.close()
print('ready', flush=True)
for line in sys.stdin:
    name = line.strip(); t0 = time.time(); vip = None; resolved = None
    while time.time() - t0 < 10:
        if not vip:
            vip = query(name + '.' + suffix)
            if vip: resolved = time.time()
        if vip and reach(vip): break
        time.sleep(0.0005)
    else:
        print('timeout', name, vip, flush=True); continue
    print(resolved, time.time(), vip, flush=True)
"""


def lab(*args, check=True):
    return sh(FERRYNET, "lab", *args, check=check)


def on(host, *cmd, check=True):
    return lab("exec", "--name", LAB, host, "--", *cmd, check=check)


def gateway(container_host, name):
    out = on(container_host, FERRYNET, "exec", name, "--", "ip", "-4", "route", "show", "default").stdout
    return out.split()[2]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=100)
    a = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("run as root")
    lab("down", "--name", LAB, check=False)
    pollers = []
    containers = [("h1", SRV)]
    try:
        lab("up", "--name", LAB, "--hosts", "3", "--backend", "vxlan")
        out = on("h1", FERRYNET, "run", "--name", SRV, "--net", NET, "--", "python3", "-c", SERVER).stdout
        srv_ip = out.split()[1].split(",")[0]
        for h in ("h2", "h3"):
            on(h, FERRYNET, "run", "--name", f"{LAB}{h}", "--net", NET, "--", "sleep", "infinity")
            containers.append((h, f"{LAB}{h}"))
            gw = gateway(h, f"{LAB}{h}")
            p = subprocess.Popen(
                [FERRYNET, "lab", "exec", "--name", LAB, h, "--", FERRYNET, "exec", f"{LAB}{h}", "--",
                 "python3", "-c", POLLER, gw, f"{NET}.{DOMAIN}"],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
            assert p.stdout.readline().strip() == "ready"
            pollers.append((h, p))
        resolved = {h: [] for h, _ in pollers}
        reached = {h: [] for h, _ in pollers}
        cli = []
        for i in range(a.n):
            name = f"prop{i}"
            # The pollers start asking before the registration starts.
            for h, p in pollers:
                p.stdin.write(name + "\n")
                p.stdin.flush()
            time.sleep(0.005)
            t0 = time.time()
            on("h1", FERRYNET, "service", "register", name, "--port", "80", "--addr", srv_ip, "--id", "psrv")
            cli.append(time.time() - t0)
            for h, p in pollers:
                line = p.stdout.readline().split()
                if not line or line[0] == "timeout":
                    raise RuntimeError(f"{name} never became reachable on {h}: {line}")
                resolved[h].append(float(line[0]) - t0)
                reached[h].append(float(line[1]) - t0)
        both = [max(x) for x in zip(*reached.values())]
    finally:
        for _, p in pollers:
            # End of input ends the poller inside the container (killing `lab exec` would not).
            p.stdin.close()
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        for h, c in containers:
            on(h, FERRYNET, "rm", "--force", c, check=False)
        lab("down", "--name", LAB, check=False)
    print(f"\n{a.n} services registered on h1, measured from containers on h2 and h3 (vxlan, etcd)\n")
    print("| from just before `service register` until | p50 ms | p99 ms | max ms |")
    print("|---|---|---|---|")
    print(f"| the register command exited (anchor) | {ms(pct(cli, 0.5))} | {ms(pct(cli, 0.99))} | {ms(max(cli))} |")
    for h in resolved:
        xs = resolved[h]
        print(f"| resolvable on {h} (DNS answers the VIP) | {ms(pct(xs, 0.5))} | {ms(pct(xs, 0.99))} | {ms(max(xs))} |")
    for h in reached:
        xs = reached[h]
        print(f"| reachable on {h} (TCP through the VIP) | {ms(pct(xs, 0.5))} | {ms(pct(xs, 0.99))} | {ms(max(xs))} |")
    print(f"| **resolvable and reachable on both h2 and h3** | {ms(pct(both, 0.5))} | {ms(pct(both, 0.99))} | {ms(max(both))} |")
    print("\nTarget: p99 <= 100 ms (includes the register command: process start, etcd txn).")

if __name__ == "__main__":
    main()
