#!/usr/bin/env python3
"""The agent's /metrics at scale (docs/BENCHMARKS.md, "Metrics"):

    cargo build --release -p ferrynet
    sudo python3 bench/metrics.py [--hosts 1000] [--endpoints 100000] [--scrapes 20] [--rounds 3]

A one-host lab whose agent is stopped while etcd receives HOSTS simulated hosts, their blocks
and ENDPOINTS endpoints (bench/policy.py's scale writer, no policies); then the agent starts
and is waited for until its /metrics counts every endpoint.

Measured, from inside h1's namespace (its 127.0.0.1:9470):
  scrape   SCRAPES sequential GETs of /metrics: time to the last byte (median, max) and size;
           anchor: as many GETs of /healthz on the same listener (one store round trip);
  reconcile  the agent's reconcile time (`ferrynet status`: lastReconcileTookMs, read over
           the unix socket) over rounds of 10 store changes it must reconcile (one simulated
           host's record rewritten), alternately without scraping and while a scraper GETs
           /metrics every second. Reported: median and max of each mode and the ratio of the
           medians (scraped / not scraped).
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench import FERRYNET, cleanup, sh  # noqa: E402
from multihost import lab_down, lab_up  # noqa: E402
from policy import WRITER  # noqa: E402

LAB = "bmetr"
H1 = f"{LAB}-h1"
ETCD = f"{LAB}-etcd"
URL = "http://127.0.0.1:9470/metrics"

SCRAPER = r"""
import sys,time,urllib.request,urllib.error
url,n,every=sys.argv[1],int(sys.argv[2]),float(sys.argv[3])
for _ in range(n):
    t=time.perf_counter()
    try:
        body=urllib.request.urlopen(url,timeout=30).read()
    except urllib.error.HTTPError as e:
        sys.exit(f"{url}: HTTP {e.code}: {e.read().decode(errors='replace')[:2000]}")
    dt=time.perf_counter()-t
    print(f"{dt:.6f} {len(body)}",flush=True)
    if every>0: time.sleep(max(0,every-dt))
"""

TOUCH = r"""
import base64,json,sys,urllib.request
def b64(s): return base64.b64encode(s.encode()).decode()
k='/ferrynet/v1/hosts/sim0001'
r=json.loads(urllib.request.urlopen(urllib.request.Request('http://172.31.0.253:2379/v3/kv/range',
  data=json.dumps({'key':b64(k)}).encode(),method='POST')).read())
v=json.loads(base64.b64decode(r['kvs'][0]['value']))
v['startedAt']=int(sys.argv[1])
urllib.request.urlopen(urllib.request.Request('http://172.31.0.253:2379/v3/kv/put',
  data=json.dumps({'key':b64(k),'value':b64(json.dumps(v))}).encode(),method='POST')).read()
"""


def in_ns(ns, *args, **kw):
    r = subprocess.run(["ip", "netns", "exec", ns, *args], capture_output=True, text=True, **kw)
    if r.returncode != 0:
        # Say what failed (an HTTP status, a timeout), not only that it did.
        sys.stderr.write(r.stderr[-2000:])
        raise subprocess.CalledProcessError(r.returncode, r.args, r.stdout, r.stderr)
    return r


def metrics_text():
    return in_ns(H1, "python3", "-c",
                 "import urllib.request;print(urllib.request.urlopen('%s',timeout=30).read().decode())"
                 % URL).stdout


def sample(text, name):
    return sum(float(l.rsplit(" ", 1)[1]) for l in text.splitlines()
               if l.startswith(name + " ") or l.startswith(name + "{"))


def status():
    out = sh(FERRYNET, "lab", "exec", "--name", LAB, "h1", "--", FERRYNET, "status", "--json").stdout
    return json.loads(out)


def reconciles(n, start):
    """Trigger n reconciles (one store change each, waiting for each, read through the agent's
    unix socket so the "not scraped" rounds scrape nothing); their durations in seconds."""
    took = []
    done = status()["reconciles"]
    for i in range(n):
        in_ns(ETCD, "python3", "-c", TOUCH, str(start + i))
        t0 = time.time()
        while True:
            st = status()
            if st["reconciles"] > done:
                done = st["reconciles"]
                took.append(st["lastReconcileTookMs"] / 1000.0)
                break
            if time.time() - t0 > 60:
                raise RuntimeError("no reconcile after a store change")
            time.sleep(0.05)
        time.sleep(0.3)
    return took


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--hosts", type=int, default=1000)
    ap.add_argument("--endpoints", type=int, default=100000)
    ap.add_argument("--scrapes", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=3)
    a = ap.parse_args()
    try:
        lab_up(LAB, 1)
        sh(FERRYNET, "lab", "stop-agent", "--name", LAB, "h1")
        n = in_ns(ETCD, "python3", "-c", WRITER, "bulk", str(a.hosts), str(a.endpoints), "0").stdout.strip()
        sh(FERRYNET, "lab", "start-agent", "--name", LAB, "h1")
        t0 = time.time()
        while True:
            try:
                got = sample(metrics_text(), "ferrynet_endpoints")
            except subprocess.CalledProcessError:
                got = 0
            # Ready: every endpoint counted and the first reconcile done (/healthz answers 503
            # until then, which would fail the anchor below).
            if got >= a.endpoints and status().get("reconciles", 0) > 0:
                break
            if time.time() - t0 > 600:
                raise RuntimeError(f"the agent counts {got} endpoints")
            time.sleep(0.5)
        out = in_ns(H1, "python3", "-c", SCRAPER, URL, str(a.scrapes), "0").stdout.split("\n")
        times = [float(l.split()[0]) for l in out if l.strip()]
        size = int(out[0].split()[1])
        # The anchor: the same listener's /healthz (one store round trip, no derivation), in
        # the same run, so the machine's load shows in both.
        out = in_ns(H1, "python3", "-c", SCRAPER, URL.replace("/metrics", "/healthz"),
                    str(a.scrapes), "0").stdout.split("\n")
        anchor = [float(l.split()[0]) for l in out if l.strip()]
        plain, scraped = [], []
        k = 0
        for _ in range(a.rounds):
            plain += reconciles(10, k)
            k += 10
            scraper = subprocess.Popen(["ip", "netns", "exec", H1, "python3", "-c", SCRAPER, URL,
                                        "100000", "1"], stdout=subprocess.DEVNULL)
            try:
                scraped += reconciles(10, k)
                k += 10
            finally:
                scraper.kill()
                scraper.wait()
        med = statistics.median
        print(f"\n### /metrics at {a.hosts:,} simulated hosts, {a.endpoints:,} endpoints "
              f"({n} keys in etcd)\n")
        print("| measure | value |")
        print("|---|---|")
        print(f"| scrape time, median / max of {a.scrapes} | {statistics.median(times) * 1000:.1f} ms / "
              f"{max(times) * 1000:.1f} ms |")
        print(f"| anchor: GET /healthz, median of {a.scrapes} | {statistics.median(anchor) * 1000:.1f} ms |")
        print(f"| ratio scrape / anchor (medians) | {statistics.median(times) / statistics.median(anchor):.1f} |")
        print(f"| scrape size | {size / 1024:.0f} KiB ({size:,} bytes) |")
        print(f"| reconcile time, not scraped (median / max of {len(plain)}) | "
              f"{med(plain) * 1000:.1f} ms / {max(plain) * 1000:.1f} ms |")
        print(f"| reconcile time, scraped every second (median / max of {len(scraped)}) | "
              f"{med(scraped) * 1000:.1f} ms / {max(scraped) * 1000:.1f} ms |")
        print(f"| ratio scraped / not scraped (medians) | {med(scraped) / med(plain):.2f} |")
        print("\nTargets: scrape <= 100 ms; reconcile ratio ~1.00")
    finally:
        lab_down(LAB)
        cleanup()


if __name__ == "__main__":
    main()
