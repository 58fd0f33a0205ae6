#!/usr/bin/env python3
"""Network policy benchmarks (docs/BENCHMARKS.md, "Network policy"):

    cargo build --release -p ferrynet -p connrate
    sudo python3 bench/policy.py conn [--rules 1000,10000] [--addrs 100000] [--secs 4] [--rounds 3] [--before BIN]
    sudo python3 bench/policy.py propagation [--n 100]
    sudo python3 bench/policy.py scale [--hosts 1000] [--endpoints 100000] [--policies 0,1000]

conn: one host namespace, a ferrynet network (CNI, no agent: the policy commands apply the
table themselves), a server container (app=srv, `connrate server`) and a client container
(role=client, `connrate client`, 4 in flight). Modes, alternated in every round:
  none     no policy: the 0-rule reference;
  nft-N    ferrynet's table: one policy selecting the server with N ingress rules, N-1 of them
           allowing other /32 blocks to tcp/7000 and the last allowing `role=client` (whose set
           is filled with ADDRS more addresses): the client's SYN matches only the last rule;
  ipt-N    the anchor, the same rules in the layout Calico's Felix writes (iptables, which is
           iptables-nft on Debian 12): FORWARD jumps to a per-endpoint chain (`-d SERVER`), which
           accepts established flows and jumps to a chain per policy holding a rule per peer
           CIDR (`-s CIDR -p tcp --dport 7000 -j ACCEPT`), then drops;
  old-N    with --before BINARY: ferrynet's table as that (older) build writes it.
Reported: new connections per second, median of the rounds, and each mode's ratio to `none`.

propagation: `ferrynet lab` (3 hosts, etcd, vxlan), a labelled container on every host. N times,
alternately, `ferrynet policy apply` of a changed policy and `ferrynet label` of a container,
run on h1; each agent reports the store revision it enforces and the wall-clock time of that
transaction (`ferrynet status`: policy.appliedRevision, policy.appliedAtMs). Timed from just
before the command starts to the last host's transaction; p50/p99, with the command's own run
time as the anchor.

scale: a one-host lab whose agent is stopped while etcd receives HOSTS simulated hosts,
ENDPOINTS labelled endpoints (app=app0..app99, spread over the hosts; the first host's share
are h1's own),
POLICIES policies (each selecting one app and admitting the next app's endpoints on tcp/80)
through etcd's JSON gateway; then the agent starts. Measured: start -> table in place, one
remote endpoint's label change in etcd -> the agent's transaction (median/max of 10), and the
agent's peak RSS; once per policy count, 0 being the anchor (the same agent and endpoints
without policy: what its other watchers cost).
"""

import argparse
import ipaddress
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench  # noqa: E402
from bench import CONNRATE, FERRYNET, cleanup, ms, netns, pct, sh  # noqa: E402

POLICY_TABLE = ("inet", "ferrynet-policy")


# --- conn ----------------------------------------------------------------------------------------

def cni_add(host, state, cid, ns, labels):
    conf = {"cniVersion": "1.0.0", "name": "bench", "type": "ferrynet", "subnets": [{"cidr": "10.77.0.0/16"}],
            "stateDir": state, "args": {"labels": labels}}
    env = {"CNI_CONTAINERID": cid, "CNI_NETNS": f"/run/netns/{ns}", "CNI_IFNAME": "eth0"}
    _, rc, out, _ = bench.run_plugin(host, FERRYNET, "ADD", conf, env)
    if rc != 0:
        raise RuntimeError(f"ADD {cid}: {out}")
    return out["ips"][0]["address"].split("/")[0]


def fn(host, state, *args, stdin=None, binary=None):
    return subprocess.run(["ip", "netns", "exec", host, binary or FERRYNET, "--state-dir", state, *args],
                          check=True, capture_output=True, text=True, input=stdin)


def other_blocks(n):
    """n-1 distinct /32 blocks that hold neither container (10.200.0.0/14)."""
    base = int(ipaddress.ip_address("10.200.0.0"))
    return [f"{ipaddress.ip_address(base + i + 1)}/32" for i in range(n - 1)]


def policy_doc(n):
    rules = [{"from": [{"cidr": c}], "ports": ["tcp/7000"]} for c in other_blocks(n)]
    rules.append({"from": [{"selector": "role=client"}], "ports": ["tcp/7000"]})
    return json.dumps({"name": "srv-in", "selector": "app=srv", "ingress": rules})


def fill_client_set(host, addrs):
    """Put `addrs` more addresses into the client selector's sets (other hosts' endpoints)."""
    listing = sh("ip", "netns", "exec", host, "nft", "-j", "list", "table", *POLICY_TABLE).stdout
    sets = [o["set"]["name"] for o in json.loads(listing)["nftables"]
            if "set" in o and o["set"]["name"].endswith("_4")]
    if len(sets) != 1:
        raise RuntimeError(f"expected one IPv4 peer set, found {sets}")
    base = int(ipaddress.ip_address("10.120.0.0"))
    lines = []
    for k in range(0, addrs, 5000):
        chunk = ", ".join(str(ipaddress.ip_address(base + i)) for i in range(k, min(addrs, k + 5000)))
        lines.append(f"add element {' '.join(POLICY_TABLE)} {sets[0]} {{ {chunk} }}")
    sh("ip", "netns", "exec", host, "nft", "-f", "-", input="\n".join(lines) + "\n")


def felix_rules(n, srv_ip, cli_ip):
    lines = ["*filter", ":cali-tw-srv - [0:0]", ":cali-pi-srv-in - [0:0]",
             f"-I FORWARD 1 -d {srv_ip}/32 -j cali-tw-srv",
             "-A cali-tw-srv -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT",
             "-A cali-tw-srv -j cali-pi-srv-in",
             "-A cali-tw-srv -j DROP"]
    for c in other_blocks(n):
        lines.append(f"-A cali-pi-srv-in -s {c} -p tcp --dport 7000 -j ACCEPT")
    lines.append(f"-A cali-pi-srv-in -s {cli_ip}/32 -p tcp --dport 7000 -j ACCEPT")
    lines.append("COMMIT")
    return "\n".join(lines) + "\n"


def felix_off(host, srv_ip):
    for args in (["-D", "FORWARD", "-d", f"{srv_ip}/32", "-j", "cali-tw-srv"],
                 ["-F", "cali-tw-srv"], ["-F", "cali-pi-srv-in"], ["-X", "cali-tw-srv"], ["-X", "cali-pi-srv-in"]):
        sh("ip", "netns", "exec", host, "iptables", *args, check=False)


def bench_conn(rule_counts, addrs, secs, rounds, before=None):
    host = netns("h")
    state = tempfile.mkdtemp(prefix="fnb-state-")
    srv = None
    try:
        c_srv, c_cli = netns("c"), netns("c")
        srv_ip = cni_add(host, state, "srv", c_srv, {"app": "srv"})
        cli_ip = cni_add(host, state, "cli", c_cli, {"role": "client"})
        srv = subprocess.Popen(["ip", "netns", "exec", c_srv, CONNRATE, "server", "7000", "2"], stdout=subprocess.PIPE)
        srv.stdout.readline()
        sh("ip", "netns", "exec", c_cli, "sysctl", "-qw", "net.ipv4.ip_local_port_range=1024 65000")
        sh("ip", "netns", "exec", c_cli, "sysctl", "-qw", "net.ipv4.tcp_tw_reuse=1")
        docs = {n: policy_doc(n) for n in rule_counts}
        felix = {n: felix_rules(n, srv_ip, cli_ip) for n in rule_counts}
        kinds = ("nft", "old", "ipt") if before else ("nft", "ipt")
        modes = ["none"] + [f"{k}-{n}" for n in rule_counts for k in kinds]
        binary = {"nft": FERRYNET, "old": before}
        results = {m: [] for m in modes}
        for r in range(rounds):
            order = modes if r % 2 == 0 else list(reversed(modes))
            for m in order:
                kind, _, n = m.partition("-")
                if kind in ("nft", "old"):
                    fn(host, state, "policy", "apply", "-f", "-", stdin=docs[int(n)], binary=binary[kind])
                    fill_client_set(host, addrs)
                elif kind == "ipt":
                    sh("ip", "netns", "exec", host, "iptables-restore", "--noflush", input=felix[int(n)])
                out = sh("ip", "netns", "exec", c_cli, CONNRATE, "client", srv_ip, "7000", str(secs), "4").stdout
                rate = float(out.split()[0])
                results[m].append(rate)
                print(f"  round {r} {m}: {out.strip()}", file=sys.stderr)
                if kind in ("nft", "old"):
                    fn(host, state, "policy", "rm", "srv-in", binary=binary[kind])
                elif kind == "ipt":
                    felix_off(host, srv_ip)
        return {m: statistics.median(v) for m, v in results.items()}
    finally:
        if srv:
            srv.kill()
            srv.wait()
        felix_off(host, locals().get("srv_ip", "0.0.0.0"))
        cleanup()
        shutil.rmtree(state, ignore_errors=True)


def print_conn(res, addrs, secs, rounds):
    print(f"\n### New TCP connections per second to a selected endpoint ({rounds} alternating rounds of {secs} s, "
          f"median; {addrs:,} more addresses in the client's set)\n")
    print("| mode | rules | conn/s | / no policy |")
    print("|---|---|---|---|")
    base = res["none"]
    for m, v in res.items():
        kind, _, n = m.partition("-")
        name = {"none": "no policy", "nft": "ferrynet (nft verdict map, sets)",
                "old": "ferrynet before (--before: its own binary)", "ipt": "anchor: Felix layout (iptables)"}[kind]
        print(f"| {name} | {n or 0} | {v:.0f} | {v / base:.3f} |")
    print("\nTarget: ferrynet >= 0.9 of no policy at 10,000 rules")


# --- propagation ---------------------------------------------------------------------------------

LAB = "bpol"


def lab(*args, check=True):
    return sh(FERRYNET, "lab", *args, check=check)


def on(host, *args, stdin=None):
    return subprocess.run([FERRYNET, "lab", "exec", "--name", LAB, host, "--", FERRYNET, *args],
                          check=True, capture_output=True, text=True, input=stdin)


def revision(out):
    return next(int(l.split()[-1]) for l in out.splitlines() if l.startswith("store revision "))


def applied(host):
    st = json.loads(on(host, "status", "--json").stdout)["policy"]
    return st["appliedRevision"], st["appliedAtMs"] / 1000.0


def bench_propagation(n):
    hosts = ["h1", "h2", "h3"]
    try:
        lab("down", "--name", LAB, check=False)
        lab("up", "--name", LAB, "--hosts", "3", "--backend", "vxlan")
        for i, h in enumerate(hosts):
            on(h, "run", "--name", f"{LAB}{i}", "--net", "fabric", "--label", "app=web", "--", "sleep", "infinity")
        totals, per_host, cmd = [], {h: [] for h in hosts}, []
        for i in range(n):
            t0 = time.time()
            if i % 2 == 0:
                doc = json.dumps({"name": "prop", "selector": "app=web",
                                  "ingress": [{"from": [{"selector": "role=client"}], "ports": [f"tcp/{1000 + i}"]}]})
                out = on("h1", "policy", "apply", "-f", "-", stdin=doc).stdout
            else:
                out = on("h1", "label", f"{LAB}{i % 3}", f"role={'client' if i % 4 == 1 else 'other'}").stdout
            cmd.append(time.time() - t0)
            rev = revision(out)
            last = 0.0
            for h in hosts:
                deadline = time.time() + 30
                while True:
                    r, at = applied(h)
                    if r >= rev:
                        break
                    if time.time() > deadline:
                        raise RuntimeError(f"{h} never applied revision {rev}")
                    time.sleep(0.005)
                per_host[h].append(at - t0)
                last = max(last, at - t0)
            totals.append(last)
    finally:
        for i, h in enumerate(hosts):
            subprocess.run([FERRYNET, "lab", "exec", "--name", LAB, h, "--", FERRYNET, "rm", "-f", f"{LAB}{i}"],
                           capture_output=True)
        lab("down", "--name", LAB, check=False)
    print(f"\n### Policy propagation on 3 hosts (vxlan lab, etcd), {n} changes (half `policy apply`, half `label`)\n")
    print("| measure | p50 ms | p99 ms |")
    print("|---|---|---|")
    print(f"| anchor: the command on h1 (process, etcd transaction, exit) | {ms(pct(cmd, 0.5))} | {ms(pct(cmd, 0.99))} |")
    for h in hosts:
        print(f"| command start -> {h}'s transaction | {ms(pct(per_host[h], 0.5))} | {ms(pct(per_host[h], 0.99))} |")
    print(f"| command start -> enforced on all 3 hosts | {ms(pct(totals, 0.5))} | {ms(pct(totals, 0.99))} |")
    print("\nTarget: p99 <= 100 ms")


# --- scale ---------------------------------------------------------------------------------------

WRITER = r"""
import base64,json,sys,urllib.request,ipaddress,time
ETCD='http://172.31.0.253:2379'
def b64(s): return base64.b64encode(s.encode()).decode()
def txn(puts):
    body=json.dumps({'success':[{'requestPut':{'key':b64(k),'value':b64(v)}} for k,v in puts]}).encode()
    r=urllib.request.urlopen(urllib.request.Request(ETCD+'/v3/kv/txn',data=body,method='POST'))
    return int(json.loads(r.read())['header']['revision'])
R='/ferrynet/v1/'
pool=ipaddress.ip_network('10.0.0.0/8')
def ep(i,j,app,host):
    ip=str(ipaddress.ip_address(int(pool.network_address)+(i+1)*64+2+(j%60)))
    cid='sim%04d-%03d'%(i,j)
    return (R+'endpoints/scale/%s/eth0'%cid,json.dumps({'network':'scale','containerId':cid,'ifname':'eth0',
            'ips':[ip+'/26'],'host':host,'labels':{'app':app}}))
mode=sys.argv[1]
if mode=='bulk':
    hosts,eps,pols=int(sys.argv[2]),int(sys.argv[3]),int(sys.argv[4])
    net={'name':'scale','mode':'bridge','bridge':'fn-scale','subnets':[{'cidr':'10.0.0.0/8'}],'internal':False,'ipMasq':True,
         'fabric':{'backend':'vxlan','vni':4242,'blockV4':26,'blockV6':122}}
    puts=[(R+'networks/scale',json.dumps(net)),(R+'vni/4242','scale')]
    for i in range(hosts):
        h='sim%04d'%i if i else 'h1'
        u=ipaddress.ip_address('10.99.0.0')+i+1
        if i: puts.append((R+'hosts/'+h,json.dumps({'name':h,'underlay':[str(u)+'/16'],'underlayMtu':1500})))
        b=ipaddress.ip_network((int(pool.network_address)+(i+1)*64,26))
        puts.append((R+'blocks/scale/'+str(b).replace('/','_'),json.dumps({'host':h})))
    per=max(1,eps//max(hosts,1))
    n=0
    for i in range(hosts):
        for j in range(per):
            if n>=eps: break
            # Host 0 is h1 (the real one): its endpoints are local, one app each.
            puts.append(ep(i,j,'app%d'%((i*per+j)%100),'h1' if i==0 else 'sim%04d'%i))
            n+=1
    for p in range(pols):
        a=p%100
        puts.append((R+'policies/p%04d'%p,json.dumps({'name':'p%04d'%p,'network':'scale','selector':'app=app%d'%a,'order':p,
            'ingress':[{'from':[{'selector':'app=app%d'%((a+1)%100)}],'ports':['tcp/%d'%(80+p//100)]}]})))
    for k in range(0,len(puts),120):
        txn(puts[k:k+120])
    print(len(puts))
else:
    i=int(sys.argv[2]); per=int(sys.argv[3])
    k,v=ep(10+i,0,'app%d'%(50+i),'sim%04d'%(10+i))
    t0=time.time()
    rev=txn([(k,v)])
    print(rev,t0)
"""


def scale_run(hosts, endpoints, policies, changes):
    from multihost import agent_pid, lab_down, lab_up
    name = "bscale"
    etcd_ns = f"{name}-etcd"

    def st():
        out = sh(FERRYNET, "lab", "exec", "--name", name, "h1", "--", FERRYNET, "status", "--json", check=False).stdout
        return json.loads(out)["policy"] if out.strip() else {}
    try:
        lab_up(name, 1)
        sh(FERRYNET, "lab", "stop-agent", "--name", name, "h1")
        t = time.perf_counter()
        n = sh("ip", "netns", "exec", etcd_ns, "python3", "-c", WRITER, "bulk", str(hosts), str(endpoints),
               str(policies)).stdout.strip()
        write_s = time.perf_counter() - t
        t0 = time.time()
        sh(FERRYNET, "lab", "start-agent", "--name", name, "h1")
        while True:
            s = st()
            if s.get("endpoints", 0) >= endpoints and (s.get("table") or not policies):
                break
            if time.time() - t0 > 300:
                raise RuntimeError(f"initial policy sync incomplete: {s}")
            time.sleep(0.02)
        sync_s = s["appliedAtMs"] / 1000.0 - t0
        one = []
        for i in range(changes):
            rev, t1 = sh("ip", "netns", "exec", etcd_ns, "python3", "-c", WRITER, "one", str(i),
                         str(endpoints // hosts)).stdout.split()
            rev, t1 = int(rev), float(t1)
            while True:
                s = st()
                if s.get("appliedRevision", 0) >= rev:
                    break
                if time.time() - t1 > 60:
                    raise RuntimeError(f"change at revision {rev} never applied: {s}")
                time.sleep(0.005)
            one.append(s["appliedAtMs"] / 1000.0 - t1)
        # Steady: after the changes, once the agent has had a few quiet seconds.
        time.sleep(5)
        with open(f"/proc/{agent_pid(name)}/status") as f:
            mem = {l.split(":")[0]: int(l.split()[1]) for l in f if l.startswith(("VmHWM", "VmRSS"))}
        return n, write_s, sync_s, s.get("table"), one, mem["VmHWM"], mem["VmRSS"]
    finally:
        lab_down(name)
        cleanup()


def bench_scale(hosts, endpoints, policy_counts, changes=10):
    rows = [(p, *scale_run(hosts, endpoints, p, changes)) for p in policy_counts]
    print(f"\n### Policy control-plane scale: {hosts} simulated hosts, {endpoints:,} labelled endpoints in etcd\n")
    print("| policies | keys written | agent start -> table in place | one endpoint's label change -> "
          f"the agent's transaction, median / max of {changes} | agent peak RSS (VmHWM) | agent steady RSS (VmRSS) |")
    print("|---|---|---|---|---|---|")
    for p, n, write_s, sync_s, shape, one, hwm, rss in rows:
        table = (f" ({shape['policyChains']} policy chains, {shape['rules']} rules, {shape['sets']} sets, "
                 f"{shape['elements']:,} elements)") if shape else " (no table)"
        print(f"| {p} | {n} ({write_s:.1f} s) | {sync_s * 1000:.0f} ms{table} | "
              f"{ms(statistics.median(one))} / {ms(max(one))} ms | {hwm / 1024:.1f} MiB | {rss / 1024:.1f} MiB |")
    print("\nTargets: one change <= 1,000 ms; agent RSS <= 100 MB")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("which", choices=["conn", "propagation", "scale"])
    ap.add_argument("--rules", default="1000,10000")
    ap.add_argument("--addrs", type=int, default=100000)
    ap.add_argument("--secs", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--n", type=int, default=100)
    ap.add_argument("--hosts", type=int, default=1000)
    ap.add_argument("--endpoints", type=int, default=100000)
    ap.add_argument("--policies", default="0,1000", help="policy counts, one lab run each (0: the anchor)")
    ap.add_argument("--before", help="conn: also measure this ferrynet binary's table (an older build)")
    a = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("run as root")
    for p in (FERRYNET, CONNRATE):
        if not os.path.exists(p):
            sys.exit(f"{p} missing: cargo build --release -p ferrynet -p connrate")
    if a.which == "conn":
        res = bench_conn([int(x) for x in a.rules.split(",")], a.addrs, a.secs, a.rounds, a.before)
        print_conn(res, a.addrs, a.secs, a.rounds)
    elif a.which == "propagation":
        bench_propagation(a.n)
    else:
        bench_scale(a.hosts, a.endpoints, [int(x) for x in a.policies.split(",")])


if __name__ == "__main__":
    main()
