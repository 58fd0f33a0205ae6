#!/usr/bin/env python3
"""ferrynet's multi-host benchmarks, on `ferrynet lab` (hosts as network namespaces, real etcd).

    sudo python3 bench/multihost.py throughput    # route vs underlay, vxlan vs a hand-built VXLAN pair
    sudo python3 bench/multihost.py convergence [--n 100]
    sudo python3 bench/multihost.py scale [--hosts 1000 --endpoints 100000]

All traffic stays inside namespaces the lab or this script creates; everything is removed at
the end. Results are printed as Markdown tables.
"""

import argparse
import base64
import json
import os
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench import FERRYNET, cleanup, iperf, ms, netns, pct, run_plugin, sh  # noqa: E402

LAB_ROOT = "/run/ferrynet-lab"


def lab_up(name, hosts, backend=None, subnets=1, extra=()):
    sh(FERRYNET, "lab", "down", "--name", name, check=False)
    args = [FERRYNET, "lab", "up", "--name", name, "--hosts", str(hosts), "--subnets", str(subnets)]
    if backend:
        args += ["--backend", backend]
    sh(*args, *extra)


def lab_down(name):
    sh(FERRYNET, "lab", "down", "--name", name, check=False)


def host_ns(lab, host):
    return f"{lab}-{host}"


def cni(lab, host, cmd, cid, ns):
    conf = {"cniVersion": "1.1.0", "name": "fabric", "type": "ferrynet",
            "stateDir": f"{LAB_ROOT}/{lab}/{host}"}
    env = {"CNI_CONTAINERID": cid, "CNI_NETNS": f"/run/netns/{ns}", "CNI_IFNAME": "eth0"}
    dt, rc, out, _ = run_plugin(host_ns(lab, host), FERRYNET, cmd, conf, env)
    if rc != 0:
        raise RuntimeError(f"{cmd} on {host} failed: {out}")
    return dt, out


def addr(result):
    return result["ips"][0]["address"].split("/")[0]


def hand_built_vxlan(lab):
    """The vxlan anchor, over the same lab underlay between the same two hosts: a VXLAN pair
    built by hand (static remote, another VNI, same MTU); returns (server ns, client ns, addr)."""
    for me, peer in (("1", "2"), ("2", "1")):
        ns = host_ns(lab, f"h{me}")
        sh("ip", "-n", ns, "link", "add", "vxb", "type", "vxlan", "id", "4242", "local", f"172.31.0.{me}",
           "remote", f"172.31.0.{peer}", "dstport", "4789", "dev", "eth0")
        sh("ip", "-n", ns, "link", "set", "vxb", "mtu", "1450", "up")
        sh("ip", "-n", ns, "addr", "add", f"10.80.0.{me}/24", "dev", "vxb")
    return host_ns(lab, "h1"), host_ns(lab, "h2"), "10.80.0.1"


def underlay(lab):
    """The route anchor: the underlay itself, host h2 to host h1."""
    return host_ns(lab, "h1"), host_ns(lab, "h2"), "172.31.0.1"


def container_vs_anchor(lab, backend, anchor, reps):
    """Median iperf3 rate container h2 -> container h1 and over the anchor, alternating."""
    try:
        lab_up(lab, 2, backend)
        c1, c2 = netns("c"), netns("c")
        _, r1 = cni(lab, "h1", "ADD", "t1", c1)
        cni(lab, "h2", "ADD", "t2", c2)
        a, b, a_addr = anchor(lab)
        ours, theirs = [], []
        for _ in range(reps):
            theirs.append(iperf(a, b, a_addr))
            ours.append(iperf(c1, c2, addr(r1)))
        cni(lab, "h1", "DEL", "t1", c1)
        cni(lab, "h2", "DEL", "t2", c2)
        return statistics.median(ours), statistics.median(theirs)
    finally:
        lab_down(lab)
        cleanup()


def bench_throughput(reps=5):
    rows = []
    x, y = container_vs_anchor("bthr", "route", underlay, reps)
    rows.append(("route: container h2 -> container h1", x, "underlay: host h2 -> host h1", y))
    x, y = container_vs_anchor("bthv", "vxlan", hand_built_vxlan, reps)
    rows.append(("vxlan: container h2 -> container h1", x,
                 "hand-built kernel VXLAN pair between the same hosts, MTU 1450", y))
    print(f"\n### Cross-host TCP throughput (iperf3, 5 s x {reps}, median)\n")
    print("| ferrynet path | Gbit/s | anchor | Gbit/s | ratio |")
    print("|---|---|---|---|---|")
    for what, x, anchor, y in rows:
        print(f"| {what} | {x / 1e9:.2f} | {anchor} | {y / 1e9:.2f} | {x / y:.2f} |")
    print("\nTarget: ratio >= 0.95")


PROBE = """
import socket,sys,time,errno
ip=sys.argv[1];t0=time.perf_counter()
while True:
    s=socket.socket(socket.AF_INET);s.settimeout(0.005)
    try:
        s.connect((ip,9))
    except ConnectionRefusedError:
        break
    except OSError:
        pass
    finally:
        s.close()
    if time.perf_counter()-t0>5: print('timeout');sys.exit(1)
print(time.perf_counter()-t0)
"""


def bench_convergence(n=100):
    lab = "bconv"
    adds, totals = [], []
    try:
        lab_up(lab, 2, "vxlan")
        probe = netns("p")
        cni(lab, "h2", "ADD", "probe", probe)
        for i in range(n):
            ns = netns("c")
            t0 = time.perf_counter()
            dt, res = cni(lab, "h1", "ADD", f"conv{i}", ns)
            # Reachable = the new container's kernel answers a TCP SYN to a closed port (RST).
            p = sh("ip", "netns", "exec", probe, "python3", "-c", PROBE, addr(res))
            waited = float(p.stdout.split()[0])
            adds.append(dt)
            totals.append(dt + waited)
            cni(lab, "h1", "DEL", f"conv{i}", ns)
            sh("ip", "netns", "del", ns, check=False)
        _ = t0
    finally:
        lab_down(lab)
        cleanup()
    print(f"\n### Convergence: container ADD on h1 until reachable from a container on h2 (vxlan, {n} containers)\n")
    print("| measure | p50 ms | p99 ms |")
    print("|---|---|---|")
    print(f"| CNI ADD on h1 | {ms(pct(adds, 0.5))} | {ms(pct(adds, 0.99))} |")
    print(f"| ADD start -> first answer from h2 | {ms(pct(totals, 0.5))} | {ms(pct(totals, 0.99))} |")
    print("\nTarget: p99 <= 100 ms")


def b64(s):
    return base64.b64encode(s.encode() if isinstance(s, str) else s).decode()


WRITER = r"""
import base64,json,sys,urllib.request,ipaddress
ETCD='http://172.31.0.253:2379'
def b64(s): return base64.b64encode(s.encode()).decode()
def txn(puts):
    body=json.dumps({'success':[{'requestPut':{'key':b64(k),'value':b64(v)}} for k,v in puts]}).encode()
    r=urllib.request.urlopen(urllib.request.Request(ETCD+'/v3/kv/txn',data=body,method='POST'))
    r.read()
mode=sys.argv[1]
R='/ferrynet/v1/'
if mode=='bulk':
    hosts,eps=int(sys.argv[2]),int(sys.argv[3])
    net={'name':'scale','mode':'bridge','bridge':'fn-scale','subnets':[{'cidr':'10.0.0.0/8'}],'internal':False,'ipMasq':True,
         'fabric':{'backend':'vxlan','vni':4242,'blockV4':26,'blockV6':122}}
    puts=[(R+'networks/scale',json.dumps(net)),(R+'vni/4242','scale')]
    pool=ipaddress.ip_network('10.0.0.0/8')
    for i in range(hosts):
        h='sim%04d'%i
        u=ipaddress.ip_address('10.99.0.0')+i+1
        puts.append((R+'hosts/'+h,json.dumps({'name':h,'underlay':[str(u)+'/16'],'underlayMtu':1500})))
        b=ipaddress.ip_network((int(pool.network_address)+(i+1)*64,26))
        puts.append((R+'blocks/scale/'+str(b).replace('/','_'),json.dumps({'host':h})))
    per=max(1,eps//max(hosts,1))
    n=0
    for i in range(hosts):
        h='sim%04d'%i
        b=int(pool.network_address)+(i+1)*64
        for j in range(per):
            if n>=eps: break
            ip=str(ipaddress.ip_address(b+2+(j%60)))
            cid='sim%04d-%03d'%(i,j)
            ep={'network':'scale','containerId':cid,'ifname':'eth0','ips':[ip+'/26'],'host':h}
            puts.append((R+'endpoints/scale/%s/eth0'%cid,json.dumps(ep)))
            n+=1
    for k in range(0,len(puts),120):
        txn(puts[k:k+120])
    print(len(puts))
else:
    i=int(sys.argv[2]); h='sim%04d'%i
    pool=ipaddress.ip_network('10.0.0.0/8')
    b=ipaddress.ip_network((int(pool.network_address)+(100000+i)*64,26))
    import time
    t0=time.time()
    txn([(R+'blocks/scale/'+str(b).replace('/','_'),json.dumps({'host':h}))])
    print(b,t0)
"""


def fabric_routes(lab):
    return sh("ip", "-n", host_ns(lab, "h1"), "route", "show", "proto", "113").stdout.splitlines()


def agent_pid(lab):
    with open(f"{LAB_ROOT}/{lab}/lab.json") as f:
        rec = json.load(f)
    return next(p for p, w in rec["pids"] if w == "agent h1")


def status(lab):
    out = sh(FERRYNET, "lab", "exec", "--name", lab, "h1", "--", FERRYNET, "status", "--json", check=False).stdout
    return json.loads(out) if out.strip() else {}


def bench_scale(hosts=1000, endpoints=100000, changes=10):
    lab = "bscale"
    try:
        lab_up(lab, 1)
        sh(FERRYNET, "lab", "stop-agent", "--name", lab, "h1")
        etcd_ns = f"{lab}-etcd"
        t = time.perf_counter()
        n = sh("ip", "netns", "exec", etcd_ns, "python3", "-c", WRITER, "bulk", str(hosts), str(endpoints)).stdout.strip()
        write_s = time.perf_counter() - t
        t0 = time.perf_counter()
        sh(FERRYNET, "lab", "start-agent", "--name", lab, "h1")
        while len(fabric_routes(lab)) < hosts:
            if time.perf_counter() - t0 > 300:
                raise RuntimeError(f"initial sync incomplete: {len(fabric_routes(lab))} routes")
            time.sleep(0.02)
        sync_s = time.perf_counter() - t0
        st = status(lab)
        one = []
        for i in range(changes):
            # Timed from just before the write's request (wall clock, same machine) until the
            # route is in h1's kernel; polling `ip route` adds a few ms.
            block, t1 = sh("ip", "netns", "exec", etcd_ns, "python3", "-c", WRITER, "one", str(i)).stdout.split()
            t1 = float(t1)
            while not any(r.startswith(block) for r in fabric_routes(lab)):
                if time.time() - t1 > 30:
                    raise RuntimeError(f"change {block} never reached the kernel")
                time.sleep(0.002)
            one.append(time.time() - t1)
        with open(f"/proc/{agent_pid(lab)}/status") as f:
            hwm = next(int(l.split()[1]) for l in f if l.startswith("VmHWM"))
    finally:
        lab_down(lab)
        cleanup()
    print(f"\n### Control-plane scale: {hosts} simulated hosts, {endpoints} endpoints in etcd (vxlan network)\n")
    print("| measure | value | target |")
    print("|---|---|---|")
    print(f"| keys written | {n} ({write_s:.1f} s) | |")
    print(f"| agent start -> all {hosts} routes (+FDB, neighbours) in the kernel | {sync_s * 1000:.0f} ms "
          f"(last reconcile {st.get('lastReconcileTookMs', 0):.0f} ms) | |")
    print(f"| one new block in etcd -> its route in the kernel, median / max of {changes} | "
          f"{ms(statistics.median(one))} / {ms(max(one))} ms | <= 1000 ms |")
    print(f"| agent peak RSS | {hwm / 1024:.1f} MiB | <= 50 MB |")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("which", choices=["throughput", "convergence", "scale"])
    ap.add_argument("--n", type=int, default=100)
    ap.add_argument("--hosts", type=int, default=1000)
    ap.add_argument("--endpoints", type=int, default=100000)
    a = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("run as root")
    if a.which == "throughput":
        bench_throughput()
    elif a.which == "convergence":
        bench_convergence(a.n)
    else:
        bench_scale(a.hosts, a.endpoints)


if __name__ == "__main__":
    main()
