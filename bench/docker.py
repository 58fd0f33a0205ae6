#!/usr/bin/env python3
"""ferrynet as Docker's network driver, beside Docker's own bridge driver, in one run.

    sudo python3 bench/docker.py startup [--n 50] [--served-by plugin|agent] [--raw PATH]
    sudo python3 bench/docker.py ports   [--reps 3] [--served-by plugin|agent]

startup: time from `docker run -d --network N IMAGE <tcp server>` to the first TCP connection the
         new container answers, for N containers per network, ferrynet and bridge alternating.
         The client is a prober container on the same network: a Python loop run in the prober's
         network namespace (nsenter --net), connecting to the container's address (given with
         --ip, so no `docker inspect` sits between `docker run` returning and the first try).
         Each ratio comes with a 95% bootstrap interval (the rounds' pairs resampled);
         --raw PATH keeps every sample as JSON.
ports:   new TCP connections per second through a published port (`-p HOSTPORT:80`) with 0 and
         1,000 other ports published (five containers, `-p 20000-20199:20000-20199` and so on),
         ferrynet and Docker's bridge (iptables DNAT + docker-proxy) alternating. The client
         (connrate) runs in a network namespace wired to the host by a veth (10.251.61.0/30).

The ferrynet driver is `target/release/ferrynet docker-plugin` (or the agent, --served-by agent)
with a fresh state directory, on /run/docker/plugins/fnb-<pid>.sock. Everything this script
makes -- containers, networks, the image, namespaces, veths, processes, temp dirs -- is removed
at the end, also on failure or Ctrl-C; Docker objects that existed before are never touched.
Results are printed as Markdown tables (progress on stderr). FNB_DRIVER_LOG=path keeps the
driver's log there; with FERRYNET_LOG=debug it times every handler in microseconds.
"""

import argparse
import http.client
import ipaddress
import json
import os
import random
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench import CONNRATE, FERRYNET, ms, pct  # noqa: E402
DOCKER_SOCK = "/var/run/docker.sock"
TAG = f"{os.getpid() % 100000}"
DRIVER = f"fnb-{TAG}"
PLUGIN_SOCK = f"/run/docker/plugins/{DRIVER}.sock"
IMAGE = f"fnb-docker:{TAG}"
SUBNETS = {}  # system -> "10.252.N.0/24", picked free at start
CLIENT_NET = 61  # 10.251.61.0/30 between the host and the ports client

DEBUG = {"on": os.environ.get("FNB_DEBUG") == "1"}

# Everything made here, for cleanup (names are unique to this run).
MADE = {"containers": [], "networks": [], "images": [], "netns": [], "procs": [], "dirs": []}
DRIVERS = []  # ferrynet driver processes (their state dirs, for leftover networks)


def log(msg):
    print(msg, file=sys.stderr, flush=True)


def sh(*args, check=True, **kw):
    p = subprocess.run(args, capture_output=True, text=True, **kw)
    if check and p.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} failed ({p.returncode}): {p.stderr.strip() or p.stdout.strip()}")
    return p


# --- Docker ------------------------------------------------------------------------------------

class UnixHTTP(http.client.HTTPConnection):
    def __init__(self, path):
        super().__init__("localhost", timeout=30)
        self.unix_path = path

    def connect(self):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(30)
        self.sock.connect(self.unix_path)


def engine_get(path):
    """GET on Docker's Engine API (a few ms, unlike a `docker inspect` process)."""
    c = UnixHTTP(DOCKER_SOCK)
    try:
        c.request("GET", path)
        r = c.getresponse()
        body = r.read()
        if r.status != 200:
            raise RuntimeError(f"GET {path}: {r.status} {body[:200]!r}")
        return json.loads(body)
    finally:
        c.close()


def container_ip(name, network):
    return engine_get(f"/containers/{name}/json")["NetworkSettings"]["Networks"][network]["IPAddress"]


def container_pid(name):
    return engine_get(f"/containers/{name}/json")["State"]["Pid"]


def docker_run(name, network, args, ports=()):
    """`docker run -d`; the name is recorded before, so a half-made container is removed too."""
    MADE["containers"].append(name)
    cmd = ["docker", "run", "-d", "--name", name, "--network", network]
    for p in ports:
        cmd += ["-p", p]
    sh(*cmd, IMAGE, *args)


def docker_rm(names):
    """One `docker rm -f` at a time: Docker 20.10 removing many containers of one network in
    parallel (which `docker rm -f A B C...` does) can lose count of the network's endpoints, and
    the network then refuses `docker network rm` ("has active endpoints") until dockerd restarts."""
    for n in names:
        sh("docker", "rm", "-f", n, check=False)
        if n in MADE["containers"]:
            MADE["containers"].remove(n)


def build_image():
    """busybox (sleep) and connrate with the shared libraries it links, imported as one image."""
    root = tempfile.mkdtemp(prefix="fnb-img-")
    MADE["dirs"].append(root)
    os.makedirs(f"{root}/bin")
    shutil.copy("/bin/busybox", f"{root}/bin/busybox")
    for applet in ("sh", "sleep"):
        os.symlink("busybox", f"{root}/bin/{applet}")
    shutil.copy(CONNRATE, f"{root}/bin/connrate")
    for line in sh("ldd", CONNRATE).stdout.splitlines():
        parts = line.split()
        path = parts[2] if "=>" in parts and len(parts) > 2 else parts[0]
        if not path.startswith("/"):
            continue  # linux-vdso
        dst = root + path
        os.makedirs(os.path.dirname(dst), exist_ok=True)
        shutil.copy(os.path.realpath(path), dst)
    sh("tar", "-C", root, "-cf", f"{root}.tar", ".")
    MADE["images"].append(IMAGE)
    try:
        sh("docker", "import", f"{root}.tar", IMAGE)
    finally:
        os.unlink(f"{root}.tar")


# --- the ferrynet driver -----------------------------------------------------------------------

class Driver:
    """`ferrynet docker-plugin` or `ferrynet agent --docker-socket`, fresh state dir."""

    def __init__(self, served_by):
        self.state = tempfile.mkdtemp(prefix="fnb-state-")
        MADE["dirs"].append(self.state)
        DRIVERS.append(self)
        self.log = open(os.path.join(self.state, "driver.log"), "w")
        if served_by == "agent":
            args = ["agent", "--no-dns", "--docker-socket", PLUGIN_SOCK]
        else:
            args = ["docker-plugin", "--socket", PLUGIN_SOCK]
        self.proc = subprocess.Popen([FERRYNET, "--state-dir", self.state] + args,
                                     stdout=subprocess.DEVNULL, stderr=self.log)
        MADE["procs"].append(self.proc)
        deadline = time.monotonic() + 20
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the driver exited ({self.proc.returncode}): {self.log_text()}")
            try:
                s = socket.socket(socket.AF_UNIX)
                s.connect(PLUGIN_SOCK)
                s.close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"the driver never listened: {self.log_text()}")
                time.sleep(0.05)

    def log_text(self):
        with open(os.path.join(self.state, "driver.log")) as f:
            return f.read()[-2000:]

    def leftover_networks(self):
        """ferrynet networks still in this state dir (after a failure), removed with --force."""
        o = sh(FERRYNET, "--state-dir", self.state, "network", "ls", "--json", check=False)
        try:
            nets = json.loads(o.stdout or "[]")
        except ValueError:
            nets = []
        for n in nets:
            sh(FERRYNET, "--state-dir", self.state, "network", "rm", "--force", n["name"], check=False)


def create_networks(served_by):
    """(driver, {"ferrynet": network name, "bridge": network name})."""
    driver = Driver(served_by)
    fn, br = f"fnb-fn-{TAG}", f"fnb-br-{TAG}"
    MADE["networks"] += [fn, br]
    routes = [ipaddress.ip_network(x["dst"], strict=False)
              for x in json.loads(sh("ip", "-j", "route").stdout) if x["dst"] != "default"]
    free = [c for c in (ipaddress.ip_network(f"10.252.{n}.0/24") for n in range(1, 255))
            if not any(c.overlaps(r) for r in routes)][:2]
    if len(free) < 2:
        raise RuntimeError("no two free /24s in 10.252.0.0/16")
    SUBNETS["ferrynet"], SUBNETS["bridge"] = (str(c) for c in free)
    sh("docker", "network", "create", "-d", DRIVER, "--ipam-driver", DRIVER, "--subnet", SUBNETS["ferrynet"], fn)
    sh("docker", "network", "create", "-d", "bridge", "--subnet", SUBNETS["bridge"], br)
    return driver, {"ferrynet": fn, "bridge": br}


# --- cleanup -----------------------------------------------------------------------------------


def cleanup():
    # A second Ctrl-C must not cut the cleanup short.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    docker_rm(list(MADE["containers"]))
    for n in reversed(MADE["networks"]):
        for _ in range(3):
            o = sh("docker", "network", "rm", n, check=False)
            if o.returncode == 0 or "No such network" in o.stderr or "not found" in o.stderr:
                break
            time.sleep(2)
        else:
            log(f"WARNING: could not remove Docker network {n}: {o.stderr.strip()}")
    MADE["networks"].clear()
    for d in DRIVERS:
        d.leftover_networks()
    for p in MADE["procs"]:
        if p.poll() is None:
            p.terminate()
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
    MADE["procs"].clear()
    if os.path.exists(PLUGIN_SOCK):
        # Only ours: the socket name carries this run's pid.
        os.unlink(PLUGIN_SOCK)
    for i in MADE["images"]:
        sh("docker", "rmi", "-f", i, check=False)
    MADE["images"].clear()
    for n in MADE["netns"]:
        sh("ip", "netns", "del", n, check=False)  # takes the veth pair with it
    MADE["netns"].clear()
    keep = os.environ.get("FNB_DRIVER_LOG")
    for i, d in enumerate(DRIVERS):
        # FNB_DRIVER_LOG=path keeps the driver's log (FERRYNET_LOG=debug adds each handler's µs).
        if keep and os.path.exists(os.path.join(d.state, "driver.log")):
            shutil.copy(os.path.join(d.state, "driver.log"), f"{keep}.{i}" if i else keep)
    for d in MADE["dirs"]:
        shutil.rmtree(d, ignore_errors=True)
    MADE["dirs"].clear()


def on_signal(signum, _frame):
    raise SystemExit(f"interrupted by signal {signum}")


# --- startup -----------------------------------------------------------------------------------

PROBE = r"""
import socket, sys, time
for line in sys.stdin:
    ip, port = line.split()
    deadline = time.monotonic() + 30
    n = 0
    first = None
    while True:
        n += 1
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.settimeout(0.25)
        try:
            s.connect((ip, int(port)))
            t = time.monotonic()
            s.close()
            print("ok", repr(t), n, first, flush=True)
            break
        except OSError as e:
            s.close()
            first = first or type(e).__name__
            if time.monotonic() > deadline:
                print("fail", repr(str(e)), n, flush=True)
                break
            time.sleep(0.001)
"""


class Prober:
    """A container on `network` and a connect loop running in its network namespace."""

    def __init__(self, network, name):
        docker_run(name, network, ["/bin/sleep", "1000000"])
        pid = container_pid(name)
        self.proc = subprocess.Popen(["nsenter", f"--net=/proc/{pid}/ns/net", "python3", "-u", "-c", PROBE],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        MADE["procs"].append(self.proc)

    def first_connect(self, ip, port):
        """CLOCK_MONOTONIC of the first accepted connection, the attempts it took and the first
        failure (None when the first attempt connected)."""
        self.proc.stdin.write(f"{ip} {port}\n")
        self.proc.stdin.flush()
        words = self.proc.stdout.readline().split()
        if not words or words[0] != "ok":
            raise RuntimeError(f"no connection to {ip}:{port}: {words}")
        return float(words[1]), int(words[2]), words[3]


def bench_startup(n, served_by, raw=None):
    if not 1 <= n <= 150:
        raise SystemExit("--n must be 1..150 (addresses .100 and up of a /24)")
    _, nets = create_networks(served_by)
    probers = {s: Prober(net, f"fnb-probe-{s[:2]}-{TAG}") for s, net in nets.items()}
    # One unmeasured server per network first: the image's first start and lazy setup.
    for s, net in nets.items():
        name = f"fnb-warm-{s[:2]}-{TAG}"
        docker_run(name, net, ["/bin/connrate", "server", "80", "1"])
        probers[s].first_connect(container_ip(name, net), 80)
    res = {s: {"total": [], "run": [], "after": [], "inspect": []} for s in nets}
    order = list(nets)
    prefix = {s: SUBNETS[s].rsplit(".", 1)[0] for s in nets}
    for i in range(n):
        for s in (order if i % 2 == 0 else order[::-1]):
            net = nets[s]
            name = f"fnb-s-{s[:2]}-{i}-{TAG}"
            # A fixed address (--ip, same pattern on both networks): the prober knows where to
            # connect the moment `docker run` returns, without asking Docker.
            ip = f"{prefix[s]}.{100 + i}"
            MADE["containers"].append(name)
            t0 = time.monotonic()
            sh("docker", "run", "-d", "--name", name, "--network", net, "--ip", ip,
               IMAGE, "/bin/connrate", "server", "80", "1")
            t_run = time.monotonic()
            t_ok, attempts, first_err = probers[s].first_connect(ip, 80)
            # Not part of the startup time: what `docker inspect` costs (Docker asks a remote
            # driver for its endpoint's details).
            t1 = time.monotonic()
            if container_ip(name, net) != ip:
                raise RuntimeError(f"{name} did not get {ip}")
            res[s]["inspect"].append(time.monotonic() - t1)
            if DEBUG["on"]:
                log(f"    {s} {name}: {ms(t_ok - t0)} ms, {attempts} attempts, first failure {first_err}")
            res[s]["total"].append(t_ok - t0)
            res[s]["run"].append(t_run - t0)
            res[s]["after"].append(t_ok - t_run)
            time.sleep(0.2)
        if (i + 1) % 10 == 0:
            log(f"  {i + 1}/{n}: " + ", ".join(f"{s} p50 {ms(pct(r['total'], .5))} ms" for s, r in res.items()))

    print(f"\n### Docker: `docker run -d` to the first answered TCP connection, {n} containers per network\n")
    print("| network driver | p50 ms | p95 ms | `docker run -d` returns, p50 ms | then to first connection, p50 ms "
          "| (not included) container inspect via the Engine API, p50 ms |")
    print("|---|---|---|---|---|---|")
    labels = {"ferrynet": f"ferrynet ({'agent' if served_by == 'agent' else 'docker-plugin'})",
              "bridge": "Docker bridge"}
    for s, r in res.items():
        print(f"| {labels[s]} | {ms(pct(r['total'], .5))} | {ms(pct(r['total'], .95))} | "
              f"{ms(pct(r['run'], .5))} | {ms(pct(r['after'], .5))} | {ms(pct(r['inspect'], .5))} |")
    f, b = res["ferrynet"]["total"], res["bridge"]["total"]
    print(f"\nferrynet / bridge: p50 {pct(f, .5) / pct(b, .5):.2f}, p95 {pct(f, .95) / pct(b, .95):.2f} "
          f"(target <= 1.0)")
    lo50, hi50 = ratio_interval(f, b, .5)
    lo95, hi95 = ratio_interval(f, b, .95)
    print(f"95% bootstrap intervals of the ratios (pairs resampled): p50 {lo50:.3f}-{hi50:.3f}, "
          f"p95 {lo95:.3f}-{hi95:.3f}")
    if raw:
        with open(raw, "w") as out:
            json.dump({"served_by": served_by, "n": n, "seconds": res}, out)


def ratio_interval(f, b, q, rounds=2000):
    """The 2.5th and 97.5th percentiles of pct(f, q) / pct(b, q) over bootstrap resamples of
    the (ferrynet, bridge) pairs -- the runs alternate, so a pair shares the machine's moment."""
    rng = random.Random(1)
    ratios = []
    for _ in range(rounds):
        idx = [rng.randrange(len(f)) for _ in f]
        ratios.append(pct([f[i] for i in idx], q) / pct([b[i] for i in idx], q))
    return pct(ratios, .025), pct(ratios, .975)


# --- ports -------------------------------------------------------------------------------------

def wire_client():
    """A client namespace wired to the host by a veth: (namespace, host address)."""
    host_ip, client_ip = f"10.251.{CLIENT_NET}.1", f"10.251.{CLIENT_NET}.2"
    pair = ipaddress.ip_network(f"10.251.{CLIENT_NET}.0/30")
    for x in json.loads(sh("ip", "-j", "route").stdout):
        if x["dst"] != "default" and pair.overlaps(ipaddress.ip_network(x["dst"], strict=False)):
            raise RuntimeError(f"{pair} is routed on this host already ({x['dst']}); change CLIENT_NET")
    ns = f"fnb-dock-o-{TAG}"
    sh("ip", "netns", "add", ns)
    MADE["netns"].append(ns)
    host_if = f"fnbdo{TAG}"[:15]
    sh("ip", "link", "add", host_if, "type", "veth", "peer", "name", "ext0", "netns", ns)
    sh("ip", "addr", "add", f"{host_ip}/30", "dev", host_if)
    sh("ip", "link", "set", host_if, "up")
    sh("ip", "-n", ns, "link", "set", "lo", "up")
    sh("ip", "-n", ns, "addr", "add", f"{client_ip}/30", "dev", "ext0")
    sh("ip", "-n", ns, "link", "set", "ext0", "up")
    sh("ip", "-n", ns, "route", "add", "default", "via", host_ip)
    for k, v in (("net.ipv4.ip_local_port_range", "1024 65000"), ("net.ipv4.tcp_tw_reuse", "1")):
        sh("ip", "netns", "exec", ns, "sysctl", "-qw", f"{k}={v}")
    return ns, host_ip


def conntrack_settle(max_wait=150):
    """Wait until the host's conntrack table is at most half full (earlier runs leave their
    connections there in TIME_WAIT for 120 s), so no run meets a full table."""
    path = "/proc/sys/net/netfilter/nf_conntrack_count"
    if not os.path.exists(path):
        return
    with open("/proc/sys/net/netfilter/nf_conntrack_max") as f:
        limit = int(f.read()) // 2
    deadline = time.monotonic() + max_wait
    while time.monotonic() < deadline:
        with open(path) as f:
            if int(f.read()) < limit:
                return
        time.sleep(1)


def conn_rate(client, addr, port, secs, runs):
    vals = []
    for _ in range(runs):
        conntrack_settle()
        out = sh("ip", "netns", "exec", client, CONNRATE, "client", addr, str(port), str(secs), "4").stdout
        words = out.split()
        ok, failed = int(words[2].lstrip("(")), int(words[4])
        if failed > ok // 100:
            raise RuntimeError(f"connrate to {addr}:{port}: {out.strip()}")
        vals.append(float(words[0]))
    return statistics.median(vals)


def bench_ports(reps, served_by, count=1000, secs=4, runs=2):
    if count % 5:
        raise SystemExit("--count must be a multiple of 5")
    _, nets = create_networks(served_by)
    measured = {"ferrynet": 18080, "bridge": 18081}
    for s, net in nets.items():
        docker_run(f"fnb-srv-{s[:2]}-{TAG}", net, ["/bin/connrate", "server", "80", "2"], [f"{measured[s]}:80"])
    client, addr = wire_client()
    for s in nets:  # both answer before anything is measured
        conn_rate(client, addr, measured[s], 1, 1)

    per = count // 5
    rates = {(s, c): [] for s in nets for c in (0, count)}
    publish_secs = {s: [] for s in nets}
    order = list(nets)
    for rep in range(reps):
        for c in (0, count):
            for s in (order if rep % 2 == 0 else order[::-1]):
                fill = []
                if c:
                    t0 = time.monotonic()
                    for k in range(5):
                        name = f"fnb-fill-{s[:2]}-{k}-{TAG}"
                        lo = 20000 + k * per
                        hi = lo + per - 1
                        docker_run(name, nets[s], ["/bin/sleep", "1000000"], [f"{lo}-{hi}:{lo}-{hi}"])
                        fill.append(name)
                    publish_secs[s].append(time.monotonic() - t0)
                    time.sleep(1)
                r = conn_rate(client, addr, measured[s], secs, runs)
                rates[(s, c)].append(r)
                log(f"  rep {rep + 1}/{reps}: {s} with {c} other ports: {r:.0f} conn/s")
                if DEBUG["on"]:
                    log(f"    docker-proxy processes: {len(sh('pgrep', '-x', 'docker-proxy', check=False).stdout.split())}; "
                        f"iptables DNAT rule of port {measured['bridge']}: " + " ".join(
                            " ".join(line.split()[:2]) for line in
                            sh("iptables", "-t", "nat", "-L", "DOCKER", "-v", "-n", "-x").stdout.splitlines()
                            if f"dpt:{measured['bridge']}" in line) + " (packets bytes)")
                docker_rm(fill)

    med = {k: statistics.median(v) for k, v in rates.items()}
    labels = {"ferrynet": f"ferrynet ({'agent' if served_by == 'agent' else 'docker-plugin'}, nftables maps)",
              "bridge": "Docker bridge (iptables DNAT, docker-proxy)"}
    print(f"\n### Docker: new TCP connections per second through a published port "
          f"(median of {reps} x {runs} runs of {secs} s, 4 client threads)\n")
    print(f"| network driver | conn/s, 0 other ports | conn/s, {count} other ports | {count} / 0 | "
          f"publishing the {count} (5 x `docker run -p`), median s |")
    print("|---|---|---|---|---|")
    for s in nets:
        print(f"| {labels[s]} | {med[(s, 0)]:.0f} | {med[(s, count)]:.0f} | {med[(s, count)] / med[(s, 0)]:.2f} | "
              f"{statistics.median(publish_secs[s]):.1f} |")
    print(f"\nferrynet / Docker bridge: {med[('ferrynet', 0)] / med[('bridge', 0)]:.2f} at 0, "
          f"{med[('ferrynet', count)] / med[('bridge', count)]:.2f} at {count} other ports")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("which", choices=["startup", "ports"])
    ap.add_argument("--n", type=int, default=50, help="containers per network (startup)")
    ap.add_argument("--reps", type=int, default=3, help="alternating repetitions (ports)")
    ap.add_argument("--count", type=int, default=1000, help="other published ports (ports)")
    ap.add_argument("--served-by", choices=["plugin", "agent"], default="plugin",
                    help="serve the driver with `ferrynet docker-plugin` or `ferrynet agent`")
    ap.add_argument("--raw", metavar="PATH", help="write every startup sample (seconds) there as JSON")
    a = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("run as root")
    for p in (FERRYNET, CONNRATE):
        if not os.path.exists(p):
            sys.exit(f"{p} missing: cargo build --release -p ferrynet -p connrate")
    if sh("docker", "info", "--format", "{{.ServerVersion}}", check=False).returncode != 0:
        sys.exit("no running Docker engine")
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    log(f"docker {sh('docker', 'version', '--format', '{{.Server.Version}}').stdout.strip()}, "
        f"kernel {os.uname().release}, driver {DRIVER}")
    try:
        build_image()
        if a.which == "startup":
            bench_startup(a.n, a.served_by, a.raw)
        else:
            bench_ports(a.reps, a.served_by, a.count)
    finally:
        cleanup()


if __name__ == "__main__":
    main()
