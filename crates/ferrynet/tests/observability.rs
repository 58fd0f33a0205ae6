//! The agent's HTTP listener (issue 16, parts 2 and 3) in real labs on etcd: Debian's
//! Prometheus scrapes two agents and a PromQL query returns the lab's endpoint count;
//! `/healthz` turns 503 while etcd is stopped and 200 again after; headless Chromium loads the
//! topology page with no console error, shows the lab's hosts and endpoints, follows a
//! container started afterwards without a reload, and is screenshotted. Hostile probes: forged
//! store records with markup in their keys reach the page as text only (no element, no
//! script), and the listener is bound only where it was told (a container reaches none of it).

mod common;

use std::io::{BufRead, BufReader, Write};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::time::Duration;

use common::lab::Lab;
use common::{need, out, tag, within, Proc};
use serde_json::Value;

/// GET `url` from inside namespace `ns`: (status, body); status 0 when nothing answered.
fn http_get(ns: &str, url: &str) -> (u16, String) {
    let code = "import sys,urllib.request,urllib.error\n\
        try:\n  r=urllib.request.urlopen(sys.argv[1],timeout=10);print(r.status);sys.stdout.write(r.read().decode())\n\
        except urllib.error.HTTPError as e:\n  print(e.code);sys.stdout.write(e.read().decode())\n\
        except Exception as e:\n  print(0);sys.stdout.write(str(e))\n";
    let o = Command::new("ip")
        .args(["netns", "exec", ns, "python3", "-c", code, url])
        .output()
        .expect("python3");
    let text = String::from_utf8_lossy(&o.stdout).into_owned();
    let (status, body) = text.split_once('\n').unwrap_or((text.as_str(), ""));
    (status.trim().parse().unwrap_or(0), body.to_string())
}

/// POST a JSON document (given on stdin: it may be larger than an argument) from inside `ns`;
/// the answer's body.
fn http_post(ns: &str, url: &str, body: &Value) -> String {
    let code = "import sys,urllib.request\n\
        r=urllib.request.Request(sys.argv[1],data=sys.stdin.buffer.read(),headers={'Content-Type':'application/json'})\n\
        sys.stdout.write(urllib.request.urlopen(r,timeout=10).read().decode())\n";
    let mut child = Command::new("ip")
        .args(["netns", "exec", ns, "python3", "-c", code, url])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("python3");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(body.to_string().as_bytes())
        .expect("write the body");
    let o = child.wait_with_output().expect("python3");
    assert!(o.status.success(), "POST {url}: {}", out(&o));
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// Write `key` = `value` into the lab's etcd through its JSON gateway, from namespace `ns`.
fn etcd_put(ns: &str, key: &str, value: &[u8]) {
    use base64::Engine;
    let b64 = |b: &[u8]| base64::engine::general_purpose::STANDARD.encode(b);
    http_post(
        ns,
        "http://172.31.0.253:2379/v3/kv/put",
        &serde_json::json!({ "key": b64(key.as_bytes()), "value": b64(value) }),
    );
}

/// Sum of a metric's samples whose line contains every `needle`.
fn metric_sum(text: &str, name: &str, needles: &[&str]) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(name) && needles.iter().all(|n| l.contains(n)))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

#[test]
fn prometheus_scrapes_two_agents_and_counts_their_endpoints() {
    need("prometheus", "prometheus");
    let mut lab = Lab::up(
        &format!("ob{}", tag()),
        &["--hosts", "2", "--backend", "vxlan"],
    );
    lab.container("h1", "a");
    lab.container("h1", "b");
    lab.container("h2", "c");
    let outside = lab.outside();

    // Every agent sees every endpoint; its own /metrics says so before Prometheus asks.
    for (host, addr) in [("h1", "172.31.0.1"), ("h2", "172.31.0.2")] {
        within(Duration::from_secs(30), || {
            let (code, text) = http_get(&outside, &format!("http://{addr}:9470/metrics"));
            let n = metric_sum(&text, "ferrynet_endpoints{", &["network=\"fabric\""]);
            (code == 200 && n == 3.0)
                .then_some(())
                .ok_or(format!("{host}: {code}, {n} endpoints"))
        });
    }

    let dir = tempfile::tempdir().expect("tempdir");
    let config = dir.path().join("prometheus.yml");
    std::fs::write(
        &config,
        "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n\
         scrape_configs:\n  - job_name: ferrynet\n    static_configs:\n      \
         - targets: ['172.31.0.1:9470', '172.31.0.2:9470']\n",
    )
    .expect("write prometheus.yml");
    let log = std::fs::File::create(dir.path().join("prometheus.log")).expect("log");
    let prom = Command::new("ip")
        .args(["netns", "exec", &outside, "prometheus"])
        .arg(format!("--config.file={}", config.display()))
        .arg(format!(
            "--storage.tsdb.path={}",
            dir.path().join("data").display()
        ))
        .args(["--web.listen-address=127.0.0.1:19090"])
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("start prometheus");
    lab.procs.push(Proc(prom));

    let query = |q: &str| -> Result<Vec<Value>, String> {
        let url = format!("http://127.0.0.1:19090/api/v1/query?query={}", urlencode(q));
        let (code, body) = http_get(&outside, &url);
        let v: Value = serde_json::from_str(&body).map_err(|e| format!("{code} {body}: {e}"))?;
        v["data"]["result"]
            .as_array()
            .cloned()
            .ok_or(format!("{code} {body}"))
    };
    let value = |r: &Value| -> f64 {
        r["value"][1]
            .as_str()
            .unwrap_or("nan")
            .parse()
            .unwrap_or(f64::NAN)
    };
    let logs = || std::fs::read_to_string(dir.path().join("prometheus.log")).unwrap_or_default();

    // Both targets up.
    within(Duration::from_secs(60), || {
        let r = query("sum(up{job=\"ferrynet\"})")?;
        (r.len() == 1 && value(&r[0]) == 2.0)
            .then_some(())
            .ok_or(format!("up: {r:?}\n{}", logs()))
    });
    // The endpoint count of the lab, per reporting agent and per host.
    within(Duration::from_secs(30), || {
        let r = query("sum by (instance) (ferrynet_endpoints{network=\"fabric\"})")?;
        (r.len() == 2 && r.iter().all(|s| value(s) == 3.0))
            .then_some(())
            .ok_or(format!("per instance: {r:?}"))
    });
    let r = query("max by (host) (ferrynet_endpoints{network=\"fabric\"})").expect("query");
    let by_host: std::collections::BTreeMap<String, f64> = r
        .iter()
        .map(|s| {
            (
                s["metric"]["host"].as_str().unwrap_or("").to_string(),
                value(s),
            )
        })
        .collect();
    assert_eq!(
        by_host,
        [("h1".to_string(), 2.0), ("h2".to_string(), 1.0)].into(),
        "{r:?}"
    );
    // Reconciles are counted, and the free addresses of the blocks add up.
    let r = query("sum(ferrynet_reconcile_runs_total)").expect("query");
    assert!(value(&r[0]) >= 2.0, "{r:?}");
    let r = query("sum(ferrynet_block_addresses{instance=\"172.31.0.1:9470\"}) - sum(ferrynet_block_free_addresses{instance=\"172.31.0.1:9470\"})").expect("query");
    // Three dual-stack containers hold an IPv4 and an IPv6 address each.
    assert_eq!(value(&r[0]), 6.0, "addresses held in blocks: {r:?}");
}

/// Packets `ns`'s agent reports dropped for `reason`.
fn drops(ns: &str, reason: &str) -> f64 {
    let (_, text) = http_get(ns, "http://127.0.0.1:9470/metrics");
    metric_sum(
        &text,
        "ferrynet_dropped_packets_total{",
        &[&format!("reason=\"{reason}\"")],
    )
}

fn urlencode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

#[test]
fn healthz_turns_unavailable_while_etcd_is_stopped() {
    let lab = Lab::up(
        &format!("oh{}", tag()),
        &["--hosts", "2", "--backend", "vxlan"],
    );
    let ns = lab.host_ns("h1");
    let url = "http://127.0.0.1:9470/healthz";
    within(Duration::from_secs(30), || {
        let (code, body) = http_get(&ns, url);
        (code == 200).then_some(()).ok_or(format!("{code} {body}"))
    });
    lab.lab(&["stop-etcd"]);
    let body = within(Duration::from_secs(30), || {
        let (code, body) = http_get(&ns, url);
        (code == 503)
            .then_some(body.clone())
            .ok_or(format!("{code} {body}"))
    });
    let v: Value = serde_json::from_str(&body).expect("healthz json");
    assert_eq!(v["ok"], false, "{v}");
    assert_ne!(v["store"], "ok", "{v}");
    // /metrics still answers without the store, and says so.
    let (code, text) = http_get(&ns, "http://127.0.0.1:9470/metrics");
    assert_eq!(code, 200);
    within(Duration::from_secs(30), || {
        let (_, text) = http_get(&ns, "http://127.0.0.1:9470/metrics");
        (metric_sum(&text, "ferrynet_store_up", &[]) == 0.0)
            .then_some(())
            .ok_or(text)
    });
    drop(text);
    lab.lab(&["start-etcd"]);
    within(Duration::from_secs(60), || {
        let (code, body) = http_get(&ns, url);
        (code == 200).then_some(()).ok_or(format!("{code} {body}"))
    });
}

/// The DevTools driver (tests/observability/cdp.py) running Chromium in a lab namespace.
struct Browser {
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
    _profile: tempfile::TempDir,
}

impl Browser {
    fn open(ns: &str, url: &str) -> Browser {
        need("chromium", "chromium");
        let profile = tempfile::tempdir().expect("profile dir");
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/observability/cdp.py");
        let mut child = Command::new("ip")
            .args(["netns", "exec", ns, "python3", script, url])
            .arg(profile.path())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start the browser driver");
        let stdin = child.stdin.take().expect("stdin");
        let stdout = BufReader::new(child.stdout.take().expect("stdout"));
        Browser {
            child,
            stdin,
            stdout,
            _profile: profile,
        }
    }

    fn cmd(&mut self, line: &str) -> Value {
        writeln!(self.stdin, "{line}").expect("to the driver");
        self.stdin.flush().expect("flush");
        let mut answer = String::new();
        self.stdout.read_line(&mut answer).expect("from the driver");
        let v: Value = serde_json::from_str(&answer)
            .unwrap_or_else(|e| panic!("driver said {answer:?} to {line:?}: {e}"));
        assert!(v.get("fail").is_none(), "{line}: {v}");
        v
    }

    fn eval(&mut self, expr: &str) -> Value {
        self.cmd(&format!("eval {expr}"))["value"].clone()
    }

    fn errors(&mut self) -> Vec<Value> {
        self.cmd("errors")["errors"]
            .as_array()
            .cloned()
            .unwrap_or_default()
    }

    /// (host nodes, endpoint nodes, updates) drawn now; zeros while the page is still loading.
    fn counts(&mut self) -> (u64, u64, u64) {
        let v = self.eval(
            "(()=>{const m=document.getElementById('map');return m ? [m.querySelectorAll('g.host').length,m.querySelectorAll('g.endpoint').length,Number(m.dataset.updates||0)] : [0,0,0]})()",
        );
        let n = |i: usize| v[i].as_u64().unwrap_or(0);
        (n(0), n(1), n(2))
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        // The driver kills Chromium when its stdin closes or on quit; then it is ended by PID.
        let _ = writeln!(self.stdin, "quit");
        let _ = self.stdin.flush();
        std::thread::sleep(Duration::from_millis(300));
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn topology_page_in_headless_chromium() {
    let mut lab = Lab::up(
        &format!("op{}", tag()),
        &["--hosts", "2", "--backend", "vxlan"],
    );
    let a = lab.container("h1", "a");
    let bc = lab.container("h2", "b");
    let outside = lab.outside();

    // Forged records whose keys carry markup; their values are junk, so the agent refuses
    // them and the page lists the keys, as text.
    let payload = "<img src=x onerror=\"window.__pwned=1\">";
    let forged = [
        format!("/ferrynet/v1/endpoints/fabric/{payload}/eth0"),
        "/ferrynet/v1/hosts/<script>window.__pwned=2</script>".to_string(),
        format!("/ferrynet/v1/networks/{}", "x".repeat(100_000)),
    ];
    etcd_put(&outside, &forged[0], b"{\"network\":\"</script><b>\"}");
    etcd_put(&outside, &forged[1], b"not json");
    etcd_put(&outside, &forged[2], &vec![b'<'; 200_000]);

    let ns = lab.host_ns("h1");
    // The JSON carries them escaped, and nothing forged became a node.
    within(Duration::from_secs(30), || {
        let (code, body) = http_get(&ns, "http://127.0.0.1:9470/api/topology");
        let v: Value = serde_json::from_str(&body).map_err(|e| format!("{code}: {e}"))?;
        let rejected = v["rejected"].as_array().cloned().unwrap_or_default();
        (rejected.len() == 3 && v["endpoints"].as_array().map(Vec::len) == Some(2))
            .then_some(())
            .ok_or(format!("{v}"))
    });

    let mut b = Browser::open(&ns, "http://127.0.0.1:9470/");
    within(Duration::from_secs(30), || {
        let c = b.counts();
        (c.0 == 2 && c.1 == 2).then_some(()).ok_or(format!("{c:?}"))
    });
    b.eval("window.__marker = 'same page'");
    // No markup from the store became an element or ran.
    assert_eq!(b.eval("document.querySelectorAll('img').length"), 0);
    assert_eq!(b.eval("document.scripts.length"), 1);
    assert_eq!(b.eval("typeof window.__pwned"), "undefined");
    let rejected = b.eval("document.getElementById('rejected').textContent");
    assert!(
        rejected.as_str().unwrap_or("").contains("<img src=x"),
        "{rejected}"
    );
    // Clicking an endpoint shows its addresses.
    b.eval("document.querySelector('g.endpoint').dispatchEvent(new MouseEvent('click', {bubbles: true}))");
    let details = b.eval("document.getElementById('details').textContent");
    let details = details.as_str().unwrap_or("");
    assert!(
        details.contains("Addresses") && (details.contains(&a.v4) || details.contains("10.20.")),
        "{details}"
    );

    // The trace form asks the agent (`/api/trace`, as `ferrynet trace --json`): a on h1 to b
    // on h2 over VXLAN is delivered; an address nobody holds is refused with the reason.
    let ask = |b: &mut Browser, src: &str, dst: &str| {
        b.eval(&format!(
            "document.getElementById('tsrc').value = {src:?}; document.getElementById('tdst').value = {dst:?}; document.getElementById('verdict').dataset.delivered = ''; document.getElementById('traceform').requestSubmit(); 0"
        ));
    };
    ask(&mut b, &a.v4, &bc.v4);
    within(Duration::from_secs(20), || {
        let v = b.eval("document.getElementById('verdict').dataset.delivered || ''");
        let text = b.eval("document.getElementById('verdict').textContent");
        let hops = b.eval("document.getElementById('trace').children.length");
        (v.as_str() == Some("true") && hops.as_u64().unwrap_or(0) >= 3)
            .then_some(())
            .ok_or(format!("{v} {text} hops {hops}"))
    });
    ask(&mut b, &a.v4, "no-such-container");
    within(Duration::from_secs(20), || {
        let text = b.eval("document.getElementById('verdict').textContent");
        text.as_str()
            .is_some_and(|t| t.starts_with("error:") && t.contains("no-such-container"))
            .then_some(())
            .ok_or(format!("{text}"))
    });

    // A container started now appears without a reload (server-sent events).
    let (_, _, updates) = b.counts();
    lab.container("h2", "c");
    within(Duration::from_secs(30), || {
        let c = b.counts();
        (c.1 == 3 && c.2 > updates)
            .then_some(())
            .ok_or(format!("{c:?}"))
    });
    assert_eq!(b.eval("window.__marker"), "same page", "the page reloaded");

    let shot = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("observability-topology.png");
    let n = b.cmd(&format!("shot {}", shot.display()))["bytes"]
        .as_u64()
        .unwrap_or(0);
    assert!(n > 1000, "screenshot of {n} bytes");
    assert!(std::fs::metadata(&shot).map(|m| m.len()).unwrap_or(0) == n);
    // The one error expected: Chromium logs the 400 the agent gave the deliberate trace of a
    // name nobody has. Anything else fails the test.
    let errors: Vec<Value> = b
        .errors()
        .into_iter()
        .filter(|e| {
            let e = e.as_str().unwrap_or_default();
            !(e.contains("status of 400")
                && e.contains("/api/trace?")
                && e.contains("no-such-container"))
        })
        .collect();
    assert!(errors.is_empty(), "console errors: {errors:?}");
}

#[test]
fn listener_is_bound_only_where_configured() {
    let mut lab = Lab::up(
        &format!("ol{}", tag()),
        &["--hosts", "2", "--backend", "vxlan"],
    );
    let c = lab.container("h1", "a");
    let ns = lab.host_ns("h1");
    // Exactly the two addresses the lab gave: loopback and the underlay address.
    let o = Command::new("ip")
        .args(["netns", "exec", &ns, "ss", "-Htln", "sport = :9470"])
        .output()
        .expect("ss");
    let mut bound: Vec<String> = String::from_utf8_lossy(&o.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().nth(3).map(str::to_string))
        .collect();
    bound.sort();
    assert_eq!(
        bound,
        vec!["127.0.0.1:9470", "172.31.0.1:9470"],
        "{}",
        out(&o)
    );
    // A container reaches neither its own loopback's 9470 (its own namespace) nor the
    // host's listener through its gateway (nothing bound there).
    let status = lab.status("h1");
    let gw = status["networks"][0]["blocks"][0]
        .as_str()
        .and_then(|b| b.split('/').next())
        .map(|a| {
            let mut o: Vec<u8> = a.split('.').filter_map(|x| x.parse().ok()).collect();
            if let Some(l) = o.last_mut() {
                *l += 1;
            }
            o.iter().map(u8::to_string).collect::<Vec<_>>().join(".")
        })
        .expect("a block on h1");
    for target in ["127.0.0.1", gw.as_str()] {
        let (code, body) = http_get(&c.netns(), &format!("http://{target}:9470/metrics"));
        assert_eq!(code, 0, "a container reached {target}:9470: {body}");
    }
    // Drops are counted by reason from the nft tables' named counters: a container of another
    // network pinging `c` is dropped by isolation, and the metric counts it.
    let other = format!("{}o", lab.name);
    lab.ok(
        "h1",
        &["network", "create", &other, "--subnet", "10.77.0.0/24"],
    );
    let d = lab.run_on("h1", "d", &other, &[], &["sleep", "600"]);
    let before = drops(&ns, "isolation");
    let _ = Command::new("ip")
        .args([
            "netns",
            "exec",
            &d.netns(),
            "ping",
            "-c",
            "3",
            "-i",
            "0.2",
            "-W",
            "1",
            &c.v4,
        ])
        .output();
    within(Duration::from_secs(10), || {
        let now = drops(&ns, "isolation");
        (now >= before + 3.0)
            .then_some(())
            .ok_or(format!("isolation drops {before} -> {now}"))
    });
    let (_, text) = http_get(&ns, "http://127.0.0.1:9470/metrics");
    assert!(
        text.contains("ferrynet_dropped_packets_total{reason=\"spoofing\",counter=\"ip4_spoof\"}"),
        "{text}"
    );
    // Methods other than GET are refused; unknown paths are 404.
    let o = Command::new("ip")
        .args([
            "netns", "exec", &ns, "python3", "-c",
            "import urllib.request,urllib.error\ntry:\n  urllib.request.urlopen(urllib.request.Request('http://127.0.0.1:9470/metrics',data=b'x',method='POST'))\nexcept urllib.error.HTTPError as e:\n  print(e.code)",
        ])
        .output()
        .expect("python3");
    assert_eq!(String::from_utf8_lossy(&o.stdout).trim(), "405");
    assert_eq!(http_get(&ns, "http://127.0.0.1:9470/nope").0, 404);
    // The page comes with a policy that allows only its own script.
    let o = Command::new("ip")
        .args([
            "netns", "exec", &ns, "python3", "-c",
            "import urllib.request\nprint(urllib.request.urlopen('http://127.0.0.1:9470/').headers['Content-Security-Policy'])",
        ])
        .output()
        .expect("python3");
    let csp = String::from_utf8_lossy(&o.stdout);
    assert!(
        csp.contains("script-src 'sha256-") && csp.contains("default-src 'none'"),
        "{csp}"
    );
}
