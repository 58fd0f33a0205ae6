#!/usr/bin/env python3
"""Soak: churn in a 3-host `ferrynet lab` (real etcd, vxlan), then a zero-leak audit.

    sudo python3 bench/soak.py [--minutes 30] [--rate 10] [--kill-every 120] [--etcd-every 600]
                               [--json FILE]

For --minutes: containers start and stop at --rate operations per second in all (one worker
per host, each keeping up to 12 containers of its own; a third of them are producers of one
of three services with a TCP health check against a server that listens 4 s out of every 8,
so checks flap); every 20 s a service is registered and another deregistered; every 2
minutes (--kill-every) h2's or h3's agent is killed with SIGKILL and started again (h1's lives the whole run,
so its memory and descriptors can be compared over time); every 10 minutes (--etcd-every) etcd is stopped
and started again on its data. Every 10 s the RSS and open descriptors of every agent are
sampled.

At the end every container is removed and the lab audited against what should be left, from
each host's kernel (ferrynet container links, published-port and anti-spoofing elements,
proto-113 routes and VXLAN FDB entries only towards live hosts' blocks) and from the store
(no endpoint, address, port claim or producer of a removed container). It fails (exit 1)
on any leak, on an agent that grew more than 20 % RSS or 10 descriptors between the first
and the last fifth of the run (h1; runs under 10 minutes check descriptors only), or on
errors of the operations beyond 1 %.

Uses target/release/ferrynet (or $FERRYNET_BIN). The lab is removed at the end, also on
failure. Results are printed as Markdown.
"""

import argparse
import json
import os
import random
import subprocess
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench import FERRYNET  # noqa: E402

LAB = "soak"
HOSTS = ["h1", "h2", "h3"]
NET = "fabric"

FLAPPER = (
    "import socket,time\n"
    "while True:\n"
    " s=socket.socket();s.setsockopt(socket.SOL_SOCKET,socket.SO_REUSEADDR,1)\n"
    " s.bind(('0.0.0.0',7000));s.listen(16);t=time.time()+4\n"
    " s.settimeout(0.2)\n"
    " while time.time()<t:\n"
    "  try:\n"
    "   c,_=s.accept();c.close()\n"
    "  except OSError: pass\n"
    " s.close();time.sleep(4)\n"
)


def run(*args, check=True, timeout=120):
    p = subprocess.run(args, capture_output=True, text=True, timeout=timeout)
    if check and p.returncode != 0:
        raise RuntimeError(f"{' '.join(args)}: {p.stdout}{p.stderr}")
    return p


def fn(host, *args, check=True, timeout=120):
    return run(FERRYNET, "lab", "exec", "--name", LAB, host, "--", FERRYNET, *args,
               check=check, timeout=timeout)


def log_tail(host, lines=40):
    """The last lines of a lab host's agent log (for a failure's report)."""
    try:
        with open(f"/run/ferrynet-lab/{LAB}/{host}/agent.log", errors="replace") as f:
            return "".join(f.readlines()[-lines:])
    except OSError as e:
        return f"(no log: {e})"


def lab(*args, check=True):
    return run(FERRYNET, "lab", *args, "--name", LAB, check=check)


def lab_record():
    with open(f"/run/ferrynet-lab/{LAB}/lab.json") as f:
        return json.load(f)


def agent_pid(host):
    for pid, what in lab_record()["pids"]:
        if what == f"agent {host}":
            return pid
    return None


def sample(pid):
    try:
        with open(f"/proc/{pid}/status") as f:
            rss = next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))
        fds = len(os.listdir(f"/proc/{pid}/fd"))
        return rss, fds
    except (OSError, StopIteration):
        return None


class Stats:
    def __init__(self):
        self.lock = threading.Lock()
        self.ops = 0
        self.errors = []

    def done(self, err=None):
        with self.lock:
            self.ops += 1
            if err:
                self.errors.append(err)


def worker(host, stop, stats, rate, seq):
    live = []
    # Containers whose run or rm failed (etcd restarting): removed as a user would, later.
    retry = []
    period = 1.0 / rate
    rng = random.Random(host)
    while not stop.is_set():
        t0 = time.monotonic()
        name = None
        try:
            if retry:
                name = retry.pop(0)
                p = fn(host, "rm", "--force", name, check=False)
                # A run that failed before recording anything leaves nothing to remove.
                if p.returncode != 0 and "no container named" not in p.stderr + p.stdout:
                    raise RuntimeError(f"rm --force {name}: {p.stdout}{p.stderr}")
                name = None
            elif len(live) < 12 and (not live or rng.random() < 0.55):
                with seq[1]:
                    seq[0] += 1
                    name = f"sk{seq[0]}"
                args = ["run", "--name", name, "--net", NET]
                if rng.random() < 1 / 3:
                    svc = f"svc{rng.randrange(3)}"
                    args += ["--service", f"{svc}:7000", "--check", "tcp:7000",
                             "--", "python3", "-c", FLAPPER]
                else:
                    args += ["--", "sleep", "7200"]
                fn(host, *args)
                live.append(name)
                name = None
            else:
                name = live.pop(rng.randrange(len(live)))
                fn(host, "rm", "--force", name)
                name = None
            stats.done()
        except Exception as e:  # noqa: BLE001 - counted and reported
            if name:
                retry.append(name)
            stats.done(f"{host}: {e}"[:400])
        time.sleep(max(0.0, period - (time.monotonic() - t0)))
    for name in live + retry:
        for _ in range(20):
            if fn(host, "rm", "--force", name, check=False).returncode == 0:
                break
            time.sleep(1)


def services(stop, stats):
    i = 0
    while not stop.wait(20):
        i += 1
        name = f"flap{i}"
        try:
            fn("h1", "service", "register", name, "--port", "80")
            if i > 1:
                fn("h2", "service", "deregister", f"flap{i - 1}")
            stats.done()
        except Exception as e:  # noqa: BLE001
            stats.done(f"service: {e}"[:300])
    fn("h1", "service", "deregister", f"flap{i}", check=False)


def chaos(stop, stats, kill_every, etcd_every):
    start = time.monotonic()
    kills, etcd = 0, 0
    victim = 0
    while not stop.wait(1):
        t = time.monotonic() - start
        if t >= (kills + 1) * kill_every:
            kills += 1
            host = ["h2", "h3"][victim % 2]
            victim += 1
            try:
                lab("stop-agent", host, "--kill")
                lab("start-agent", host)
            except Exception as e:  # noqa: BLE001
                stats.errors.append(f"agent restart {host}: {e}"[:300])
        if t >= (etcd + 1) * etcd_every:
            etcd += 1
            try:
                lab("stop-etcd")
                time.sleep(2)
                lab("start-etcd")
            except Exception as e:  # noqa: BLE001
                stats.errors.append(f"etcd restart: {e}"[:300])
    return kills, etcd


def sampler(stop, series):
    while True:
        now = time.monotonic()
        for h in HOSTS:
            pid = agent_pid(h)
            s = pid and sample(pid)
            if s:
                series.setdefault(h, []).append((now, pid, s[0], s[1]))
        if stop.wait(10):
            return


def ns_json(host, *args):
    p = run("ip", "netns", "exec", f"{LAB}-{host}", *args, check=False)
    try:
        return json.loads(p.stdout or "null")
    except json.JSONDecodeError:
        return None


def nft_elements(host, family, table, name, kind="set"):
    v = ns_json(host, "nft", "-j", "list", kind, family, table, name)
    n = 0
    for x in (v or {}).get("nftables", []):
        n += len((x.get(kind) or {}).get("elem", []) or [])
    return n


def audit():
    """What is left after every container went: returns a list of leaks."""
    leaks = []
    for h in HOSTS:
        links = ns_json(h, "ip", "-j", "link", "show") or []
        ours = [link["ifname"] for link in links if link["ifname"].startswith("fnv")]
        if ours:
            leaks.append(f"{h}: container links {ours}")
        for m in ["pm4_any", "pm6_any", "pm4_ip", "pm6_ip"]:
            n = nft_elements(h, "inet", "ferrynet", m, kind="map")
            if n:
                leaks.append(f"{h}: {n} elements in {m}")
        for s in ["macs", "src4", "src6", "arp_src", "na_src"]:
            n = nft_elements(h, "bridge", "ferrynet", s)
            if n:
                leaks.append(f"{h}: {n} anti-spoofing elements in {s}")
    inspect = json.loads(fn("h1", "network", "inspect", NET).stdout)
    if inspect["endpoints"]:
        leaks.append(f"store: {len(inspect['endpoints'])} endpoints left")
    for svc in ["svc0", "svc1", "svc2"]:
        p = fn("h1", "service", "inspect", svc, check=False)
        if p.returncode == 0:
            v = json.loads(p.stdout)
            prods = v.get("producers") or []
            if prods:
                leaks.append(f"store: service {svc} keeps {len(prods)} producers")
    # Routes and FDB entries only towards live hosts' blocks (every host is live here).
    p = fn("h1", "status", "--json", check=False)
    if p.returncode != 0:
        raise RuntimeError(f"h1's agent does not answer: {p.stderr.strip()}\n"
                           f"the end of its log:\n{log_tail('h1')}")
    st = json.loads(p.stdout)
    peers = {p["host"] for n in st.get("networks", []) for p in n.get("peers", [])}
    if peers - set(HOSTS):
        leaks.append(f"h1 routes to departed hosts {peers - set(HOSTS)}")
    return leaks


def growth(series, minutes):
    """The long-lived agent's first and last fifth: RSS (kB) and descriptors."""
    pts = series.get("h1", [])
    if len(pts) < 10:
        return None
    pid = pts[-1][1]
    pts = [p for p in pts if p[1] == pid]
    k = max(1, len(pts) // 5)
    first, last = pts[:k], pts[-k:]
    avg = lambda xs, i: sum(x[i] for x in xs) / len(xs)  # noqa: E731
    return {
        "rss_first_kb": avg(first, 2), "rss_last_kb": avg(last, 2),
        "fds_first": avg(first, 3), "fds_last": avg(last, 3),
        "samples": len(pts), "restarted": len({p[1] for p in series["h1"]}) > 1,
    }


def main():
    global LAB
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--minutes", type=float, default=30)
    ap.add_argument("--rate", type=float, default=10, help="operations per second in all")
    ap.add_argument("--kill-every", type=float, default=120, help="seconds between agent kills")
    ap.add_argument("--etcd-every", type=float, default=600, help="seconds between etcd restarts")
    ap.add_argument("--name", default="soak", help="the lab's name")
    ap.add_argument("--json", help="write the results here")
    a = ap.parse_args()
    LAB = a.name
    if os.geteuid() != 0:
        sys.exit("run as root")
    lab("down", check=False)
    lab("up", "--hosts", "3", "--backend", "vxlan", "--lease-ttl", "5s", "--grace", "15s")
    stats = Stats()
    series = {}
    stop = threading.Event()
    seq = [0, threading.Lock()]
    result = {}
    try:
        threads = [threading.Thread(target=worker, args=(h, stop, stats, a.rate / 3, seq))
                   for h in HOSTS]
        threads.append(threading.Thread(target=services, args=(stop, stats)))
        samp = threading.Thread(target=sampler, args=(stop, series))
        chaos_out = {}
        ch = threading.Thread(target=lambda: chaos_out.update(
            zip(["kills", "etcd"], chaos(stop, stats, a.kill_every, a.etcd_every))))
        started = time.monotonic()
        for t in threads + [samp, ch]:
            t.start()
        time.sleep(a.minutes * 60)
        stop.set()
        for t in threads + [samp, ch]:
            t.join()
        took = time.monotonic() - started
        # Let the agents settle (health records, LB) before the audit.
        time.sleep(5)
        leaks = audit()
        g = growth(series, a.minutes)
        result = {
            "minutes": a.minutes, "ops": stats.ops, "ops_per_s": stats.ops / took,
            "errors": len(stats.errors), "error_samples": stats.errors[:5],
            "agent_kills": chaos_out.get("kills", 0), "etcd_restarts": chaos_out.get("etcd", 0),
            "leaks": leaks, "h1_agent": g,
        }
        print("| minutes | operations | per second | errors | agent kills | etcd restarts | leaks |")
        print("|---|---|---|---|---|---|---|")
        print(f"| {a.minutes} | {stats.ops} | {result['ops_per_s']:.1f} | {len(stats.errors)} "
              f"| {result['agent_kills']} | {result['etcd_restarts']} | {len(leaks)} |")
        if g:
            print(f"\nh1's agent ({g['samples']} samples): RSS {g['rss_first_kb']:.0f} kB -> "
                  f"{g['rss_last_kb']:.0f} kB, descriptors {g['fds_first']:.1f} -> {g['fds_last']:.1f}")
        for leak in leaks:
            print(f"LEAK: {leak}")
        for e in [e for e in stats.errors if "store unavailable" not in e][:5]:
            print(f"error: {e}")
        failed = bool(leaks)
        # While etcd restarts, "store unavailable" is the right answer; anything else is not.
        other = [e for e in stats.errors if "store unavailable" not in e]
        result["unexpected_errors"] = len(other)
        if stats.ops and len(other) / stats.ops > 0.01:
            print("FAIL: more than 1 % of operations failed for another reason than the store")
            failed = True
        if g and g["fds_last"] > g["fds_first"] + 10:
            print("FAIL: h1's agent's descriptors grew")
            failed = True
        if g and a.minutes >= 10 and g["rss_last_kb"] > 1.2 * g["rss_first_kb"]:
            print("FAIL: h1's agent's memory grew")
            failed = True
        if a.json:
            with open(a.json, "w") as f:
                json.dump({**result, "series": series}, f)
        sys.exit(1 if failed else 0)
    finally:
        stop.set()
        lab("down", check=False)


if __name__ == "__main__":
    main()
