#!/usr/bin/env python3
"""Pod sandbox lifecycle over CRI: ferrynet against the reference CNI chain, one containerd, one run.

    sudo python3 bench/cri.py [--n 50] [--no-ports]

A private containerd (Debian's 1.6, CRI plugin on, native snapshotter, a busybox pause image
built and imported here, no registry) runs in a network namespace of its own with two runtime
handlers on the same runc: `fn`, whose CNI conf dir holds a ferrynet conflist, and `ref`, whose
conf dir holds the reference chain bridge + host-local + portmap (Debian's
containernetworking-plugins). Pods of the two handlers alternate, so both see the same
containerd, the same machine load and the same number of pods on their network.

Measured, per pod, over the CRI gRPC API (tests/cri/cri.py's client, PyPI's
container-runtime-interface-api):
  run:  RunPodSandbox until it returns and PodSandboxStatus says SANDBOX_READY with an IP;
  stop+remove: StopPodSandbox then RemovePodSandbox.
Each pod publishes one hostPort (a distinct port, to container port 8080) unless --no-ports,
so portmap and ferrynet's port publishing both do their work. p50/p95 per system and the ratio
ferrynet / reference are printed as a Markdown table (progress on stderr).

ferrynet is target/release/ferrynet (FERRYNET_BIN overrides) with a fresh state directory.
Everything made here -- namespace, containerd, pods, directories -- is removed at the end,
also on failure or Ctrl-C.
"""

import argparse
import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
from bench import FERRYNET, ms, pct  # noqa: E402

# The tests' CRI client (this file is also called cri.py, so it is loaded by path).
_spec = importlib.util.spec_from_file_location(
    "cri_client", os.path.join(ROOT, "crates", "ferrynet", "tests", "cri", "cri.py")
)
cri_client = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(cri_client)

TAG = f"{os.getpid() % 100000}"
NS = f"fnb-cri-{TAG}"
DIR = f"/tmp/fnb-cri-{TAG}"
RUN = f"/run/fnb-cri-{TAG}"
SOCK = f"{RUN}/containerd.sock"
PAUSE = "fnt.local/pause:1"
REF = "/usr/lib/cni"
STATE = {"proc": None}


def log(msg):
    print(msg, file=sys.stderr, flush=True)


def sh(*args, check=True):
    p = subprocess.run(args, capture_output=True, text=True)
    if check and p.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} failed: {p.stderr.strip() or p.stdout.strip()}")
    return p


def config():
    handlers = ""
    for h in ("fn", "ref"):
        handlers += f"""
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.{h}]
      runtime_type = "io.containerd.runc.v2"
      cni_conf_dir = "{DIR}/conf-{h}"
      cni_max_conf_num = 1
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.{h}.options]
        Root = "{RUN}/runc"
"""
    return f"""version = 2
root = "{DIR}/root"
state = "{RUN}/state"
[grpc]
  address = "{SOCK}"
[ttrpc]
  address = "{SOCK}.ttrpc"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "{PAUSE}"
  restrict_oom_score_adj = true
  netns_mounts_under_state_dir = true
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "native"
    default_runtime_name = "fn"
{handlers}
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "{DIR}/bin"
    conf_dir = "{DIR}/conf-fn"
    max_conf_num = 1
"""


def setup():
    for d in (DIR, RUN, f"{DIR}/bin", f"{DIR}/conf-fn", f"{DIR}/conf-ref", f"{DIR}/state"):
        os.makedirs(d, exist_ok=True)
    shutil.copy(FERRYNET, f"{DIR}/bin/ferrynet")
    for p in ("loopback", "bridge", "host-local", "portmap"):
        os.symlink(f"{REF}/{p}", f"{DIR}/bin/{p}")
    with open(f"{DIR}/conf-fn/10-ferrynet.conflist", "w") as f:
        json.dump(
            {
                "cniVersion": "1.0.0",
                "name": "fnbench",
                "plugins": [
                    {
                        "type": "ferrynet",
                        "subnets": [{"cidr": "10.236.0.0/16"}],
                        "stateDir": f"{DIR}/state",
                        "capabilities": {"portMappings": True},
                    }
                ],
            },
            f,
        )
    with open(f"{DIR}/conf-ref/10-ref.conflist", "w") as f:
        json.dump(
            {
                "cniVersion": "1.0.0",
                "name": "refbench",
                "plugins": [
                    {
                        "type": "bridge",
                        "bridge": "cni-fnb",
                        "isGateway": True,
                        "ipMasq": True,
                        "hairpinMode": True,
                        "ipam": {
                            "type": "host-local",
                            "ranges": [[{"subnet": "10.237.0.0/16"}]],
                            "routes": [{"dst": "0.0.0.0/0"}],
                            "dataDir": f"{DIR}/host-local",
                        },
                    },
                    {"type": "portmap", "capabilities": {"portMappings": True}},
                ],
            },
            f,
        )
    with open(f"{DIR}/config.toml", "w") as f:
        f.write(config())
    sh("ip", "netns", "add", NS)
    sh("ip", "-n", NS, "link", "set", "lo", "up")
    logf = open(f"{DIR}/containerd.log", "w")
    STATE["proc"] = subprocess.Popen(
        ["nsenter", f"--net=/run/netns/{NS}", "containerd", "--config", f"{DIR}/config.toml"],
        stdout=logf,
        stderr=logf,
        stdin=subprocess.DEVNULL,
    )
    client = cri_client.Cri(SOCK)
    t0 = time.time()
    while True:
        try:
            ready = client.ready()
            if all(v[0] for v in ready.values()):
                break
        except Exception as e:  # noqa: BLE001 - containerd is still starting
            ready = str(e)
        if STATE["proc"].poll() is not None or time.time() - t0 > 60:
            raise RuntimeError(f"containerd not ready: {ready}; see {DIR}/containerd.log")
        time.sleep(0.2)
    cri_client.build_image(f"{DIR}/pause.tar", PAUSE)
    sh("ctr", "--address", SOCK, "-n", "k8s.io", "images", "import", "--snapshotter", "native",
       f"{DIR}/pause.tar")
    return client


def cleanup(client):
    if client is not None and STATE["proc"] is not None and STATE["proc"].poll() is None:
        try:
            for p in client.list():
                try:
                    client.stop(p["id"])
                    client.remove(p["id"])
                except Exception as e:  # noqa: BLE001 - best effort, then by PID below
                    log(f"cleanup of {p['id'][:12]}: {e}")
        except Exception as e:  # noqa: BLE001
            log(f"cleanup: {e}")
    proc = STATE["proc"]
    if proc is not None and proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    root = f"{RUN}/runc/k8s.io"
    ids = sh("runc", "--root", root, "list", "-q", check=False).stdout.split()
    for cid in ids:
        sh("runc", "--root", root, "kill", cid, "KILL", check=False)
        sh("runc", "--root", root, "delete", "--force", cid, check=False)
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmd = f.read().decode(errors="replace")
        except OSError:
            continue
        if cmd.startswith("/usr/bin/containerd-shim") and SOCK in cmd:
            os.kill(int(pid), signal.SIGKILL)
    with open("/proc/self/mountinfo") as f:
        points = [l.split()[4] for l in f]
    for p in sorted((p for p in points if p.startswith((DIR + "/", RUN + "/"))), key=len, reverse=True):
        sh("umount", "-l", p, check=False)
    sh("ip", "netns", "del", NS, check=False)
    shutil.rmtree(DIR, ignore_errors=True)
    shutil.rmtree(RUN, ignore_errors=True)


def run_pod(client, handler, i, ports):
    port_specs = [f"{20000 + i}:8080"] if ports else []
    cfg = client.pod_config(f"{handler}-{i}", "bench", f"uid-{handler}-{i}-{TAG}", port_specs)
    t0 = time.perf_counter()
    pod_id = client.run(cfg, handler)
    st = client.status(pod_id)
    while st["state"] != "SANDBOX_READY" or not st["ips"]:
        time.sleep(0.005)
        st = client.status(pod_id)
    return pod_id, time.perf_counter() - t0


def remove_pod(client, pod_id):
    t0 = time.perf_counter()
    client.stop(pod_id)
    client.remove(pod_id)
    return time.perf_counter() - t0


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=50, help="pods per system")
    ap.add_argument("--no-ports", action="store_true", help="pods publish no hostPort")
    a = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("run as root")
    if not os.path.exists(FERRYNET):
        sys.exit(f"{FERRYNET} is missing: cargo build --release -p ferrynet")
    client = None
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))
    load0 = os.getloadavg()
    try:
        client = setup()
        systems = ("fn", "ref")
        runs = {s: [] for s in systems}
        dels = {s: [] for s in systems}
        pods = {s: [] for s in systems}
        # One warm-up pod each (first bridge, first nft table, page cache), not counted.
        for s in systems:
            pid, _ = run_pod(client, s, a.n + 1, not a.no_ports)
            remove_pod(client, pid)
        for i in range(a.n):
            order = systems if i % 2 == 0 else systems[::-1]
            for s in order:
                pid, t = run_pod(client, s, i if s == "fn" else a.n + 2 + i, not a.no_ports)
                pods[s].append(pid)
                runs[s].append(t)
            if (i + 1) % 10 == 0:
                log(f"{i + 1}/{a.n} pods per system running")
        for i in range(a.n):
            order = systems if i % 2 == 0 else systems[::-1]
            for s in order:
                dels[s].append(remove_pod(client, pods[s][i]))
        names = {"fn": "ferrynet", "ref": "bridge+host-local+portmap"}
        print(f"\n{a.n} pods per system, {'one hostPort each' if not a.no_ports else 'no hostPort'}, "
              "one containerd (Debian 1.6.20), alternating\n")
        print("| system | run p50 ms | run p95 ms | stop+remove p50 ms | stop+remove p95 ms |")
        print("|---|---|---|---|---|")
        for s in systems:
            print(f"| {names[s]} | {ms(pct(runs[s], .5))} | {ms(pct(runs[s], .95))} | "
                  f"{ms(pct(dels[s], .5))} | {ms(pct(dels[s], .95))} |")
        load1 = os.getloadavg()
        print(f"\nload average (1 min) {load0[0]:.2f} before, {load1[0]:.2f} after")
        r = lambda d, q: pct(d["fn"], q) / pct(d["ref"], q)  # noqa: E731
        print(f"\n**ferrynet / reference: run p50 {r(runs, .5):.2f}×, p95 {r(runs, .95):.2f}×; "
              f"stop+remove p50 {r(dels, .5):.2f}×, p95 {r(dels, .95):.2f}×** (target ≤ 0.8×)")
    finally:
        cleanup(client)


if __name__ == "__main__":
    main()
