//! The service registry and health checks on a real kernel with a real etcd: `ferrynet lab`
//! hosts with an agent each; services registered with the CLI and by `ferrynet run
//! --service`; TCP, HTTP and exec checks run by the producer's agent against real servers
//! and commands in the producer's namespace; a stopped host's producers leave. Every lab is
//! removed on drop, also when a test fails.

mod common;

use std::collections::BTreeSet;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::lab::Lab;
use common::Proc;
use serde_json::Value;

impl Lab {
    /// `hosts` hosts (the lab's default backend) with `extra` flags (lease TTL, grace).
    fn hosts(name: &str, hosts: u8, extra: &[&str]) -> Lab {
        let h = hosts.to_string();
        let mut args = vec!["--hosts", h.as_str()];
        args.extend_from_slice(extra);
        Lab::up(name, &args)
    }

    fn inspect(&self, host: &str, service: &str) -> Value {
        serde_json::from_str(&self.ok(host, &["service", "inspect", service])).expect("json")
    }

    /// The producer `id` of `service` as `service inspect` on `host` shows it (Null if absent).
    fn producer(&self, host: &str, service: &str, id: &str) -> Value {
        self.inspect(host, service)["producers"]
            .as_array()
            .and_then(|a| a.iter().find(|p| p["id"] == id).cloned())
            .unwrap_or(Value::Null)
    }

    /// Wait until producer `id` is (un)healthy; its last state on timeout.
    fn wait_health(&self, service: &str, id: &str, healthy: bool, within: Duration) {
        let until = Instant::now() + within;
        loop {
            let p = self.producer("h1", service, id);
            if p["healthy"] == healthy {
                return;
            }
            assert!(
                Instant::now() < until,
                "{service}/{id} not healthy={healthy} within {within:?}: {p}"
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

/// An HTTP server on `port` inside container `name`'s namespace.
fn http_server(container: &str, port: u16) -> Proc {
    Proc(
        Command::new("nsenter")
            .arg(format!("--net=/run/netns/fnc-{container}"))
            .args(["python3", "-m", "http.server", &port.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("python3 http.server"),
    )
}

fn vips_of(register_output: &str) -> String {
    register_output
        .split_whitespace()
        .nth(1)
        .unwrap_or_default()
        .to_string()
}

#[test]
fn register_deregister_ls_inspect_and_run_service() {
    let lab = Lab::hosts("rgreg", 1, &[]);
    let h = "h1";
    // Bad inputs: a non-zero exit and a message that says what is wrong.
    lab.fails(
        h,
        &["service", "register", "Web_1"],
        "must be 1-63 lowercase",
    );
    lab.fails(
        h,
        &["service", "register", "web", "--port", "0"],
        "is not a port",
    );
    lab.fails(
        h,
        &["service", "register", "web", "--port", "80/icmp"],
        "unknown protocol",
    );
    lab.fails(
        h,
        &["service", "register", "web", "--port", "80", "--port", "80"],
        "given twice",
    );
    lab.fails(
        h,
        &["service", "register", "web", "--check", "ping:1"],
        "unknown kind",
    );
    lab.fails(
        h,
        &[
            "service",
            "register",
            "web",
            "--port",
            "80",
            "--ingress",
            "8080:81",
        ],
        "does not have",
    );
    lab.fails(
        h,
        &["service", "register", "web", "--network", "nosuch"],
        "network nosuch does not exist",
    );
    lab.fails(
        h,
        &[
            "service", "register", "web", "--vip", "none", "--vip", "auto",
        ],
        "cannot be combined",
    );
    lab.fails(
        h,
        &[
            "service",
            "register",
            "web",
            "--addr",
            "192.0.2.9",
            "--host",
            "none",
            "--check",
            "tcp:80",
        ],
        "no agent would run",
    );
    lab.fails(h, &["service", "deregister", "nosuch"], "does not exist");
    lab.fails(h, &["service", "inspect", "nosuch"], "does not exist");

    // A service gets one VIP per family, kept across re-registrations.
    let first = lab.ok(h, &["service", "register", "web", "--port", "http=80"]);
    let vips = vips_of(&first);
    assert_eq!(vips.split(',').count(), 2, "{first}");
    assert!(
        vips.starts_with("10.96.") && vips.contains("fd00:96::"),
        "{first}"
    );
    let again = lab.ok(h, &["service", "register", "web", "--port", "http=80"]);
    assert_eq!(vips_of(&again), vips);
    let with_producer = lab.ok(
        h,
        &[
            "service",
            "register",
            "web",
            "--addr",
            "192.0.2.10",
            "--target",
            "80:8080",
        ],
    );
    assert_eq!(vips_of(&with_producer), vips, "{with_producer}");
    lab.fails(
        h,
        &[
            "service",
            "register",
            "web",
            "--addr",
            "192.0.2.11",
            "--target",
            "81:8080",
        ],
        "has no port 81",
    );
    // An explicit VIP of another service is refused.
    let v4 = vips.split(',').next().unwrap().to_string();
    lab.fails(
        h,
        &["service", "register", "db", "--vip", &v4],
        "already belongs to service web",
    );

    let p = lab.producer(h, "web", "192.0.2.10");
    assert_eq!(p["host"], "h1", "{p}");
    assert_eq!(p["ports"]["80"], 8080, "{p}");
    assert_eq!(p["healthy"], true, "no check, live host: {p}");
    let ls = lab.ok(h, &["service", "ls"]);
    assert!(
        ls.contains("web") && ls.contains("1/1 healthy") && ls.contains("http=80/tcp"),
        "{ls}"
    );
    lab.fails(
        h,
        &["service", "deregister", "web", "--id", "nosuch"],
        "has no producer nosuch",
    );
    lab.ok(h, &["service", "deregister", "web", "--id", "192.0.2.10"]);
    assert_eq!(lab.producer(h, "web", "192.0.2.10"), Value::Null);

    // 50 services: 100 distinct VIPs, each claimed once.
    for i in 0..50 {
        lab.ok(
            h,
            &["service", "register", &format!("s{i}"), "--port", "80"],
        );
    }
    // Racing registrations: of one name (one service, one VIP pair) and of different names
    // (no VIP twice); lost races retry.
    std::thread::scope(|sc| {
        for i in 0..8 {
            let lab = &lab;
            sc.spawn(move || {
                lab.ok(h, &["service", "register", "race", "--port", "80"]);
                lab.ok(
                    h,
                    &["service", "register", &format!("r{i}"), "--port", "80"],
                );
            });
        }
    });
    let ls: Vec<Value> =
        serde_json::from_str(&lab.ok(h, &["service", "ls", "--json"])).expect("ls json");
    let all: Vec<String> = ls
        .iter()
        .flat_map(|s| s["service"]["vips"].as_array().cloned().unwrap_or_default())
        .filter_map(|v| v.as_str().map(str::to_string))
        .collect();
    let unique: BTreeSet<&String> = all.iter().collect();
    assert_eq!(all.len(), (51 + 9) * 2, "{all:?}");
    assert_eq!(unique.len(), all.len(), "a VIP was given twice: {all:?}");

    // Deregistering a service releases its VIPs: registered again, it gets them back.
    lab.ok(h, &["service", "deregister", "s7"]);
    let before: Vec<String> = ls
        .iter()
        .find(|s| s["service"]["name"] == "s7")
        .map(|s| {
            s["service"]["vips"]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_str().unwrap().to_string())
                .collect()
        })
        .unwrap();
    let back = lab.ok(h, &["service", "register", "s7", "--port", "80"]);
    assert_eq!(vips_of(&back), before.join(","), "{back}");

    // `run --service` registers the container; `rm` deregisters it.
    lab.ok(
        h,
        &["network", "create", "rgnet", "--subnet", "10.231.0.0/24"],
    );
    let c = "rgregc1";
    lab.ok(
        h,
        &[
            "run",
            "--name",
            c,
            "--net",
            "rgnet",
            "--service",
            "web:80:8080",
            "--service",
            "web:443",
            "--service",
            "dns:53/udp",
            "--",
            "sleep",
            "600",
        ],
    );
    lab.fails(
        h,
        &[
            "run", "--name", "rgregc2", "--net", "rgnet", "--check", "tcp:80", "--", "true",
        ],
        "--check needs --service",
    );
    lab.fails(
        h,
        &[
            "run",
            "--name",
            "rgregc2",
            "--net",
            "rgnet",
            "--service",
            "Web:80",
            "--",
            "true",
        ],
        "lowercase",
    );
    lab.ok(h, &["network", "create", "rghost", "--host"]);
    lab.fails(
        h,
        &[
            "run",
            "--name",
            "rgregc2",
            "--net",
            "rghost",
            "--service",
            "web:80",
            "--",
            "true",
        ],
        "needs a bridged network",
    );
    // A registration failing after the container started (zz already names port p80 on
    // 8080, so adding p80=80 is refused) undoes the container and its earlier producer (aa).
    lab.ok(h, &["service", "register", "zz", "--port", "p80=8080"]);
    lab.fails(
        h,
        &[
            "run",
            "--name",
            "rgregc2",
            "--net",
            "rgnet",
            "--service",
            "aa:80",
            "--service",
            "zz:80",
            "--",
            "sleep",
            "600",
        ],
        "given twice",
    );
    assert_eq!(
        lab.producer(h, "aa", "rgregc2"),
        Value::Null,
        "aa kept the producer"
    );
    assert!(!std::path::Path::new("/run/netns/fnc-rgregc2").exists());
    let ps = lab.ok(h, &["ps"]);
    assert!(
        !ps.contains("rgregc2"),
        "a refused run left a container: {ps}"
    );
    let p = lab.producer(h, "web", c);
    assert_eq!(p["container"], c, "{p}");
    assert_eq!(p["network"], "rgnet", "{p}");
    assert_eq!(p["netns"], format!("/run/netns/fnc-{c}"), "{p}");
    assert!(
        p["addrs"][0].as_str().unwrap().starts_with("10.231.0."),
        "{p}"
    );
    assert_eq!(p["ports"]["80"], 8080, "{p}");
    let web = lab.inspect(h, "web");
    let ports: Vec<u64> = web["service"]["ports"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["port"].as_u64().unwrap())
        .collect();
    assert_eq!(ports, [80, 443], "{web}");
    assert_eq!(
        lab.inspect(h, "dns")["service"]["ports"][0]["protocol"],
        "udp"
    );
    assert_eq!(lab.producer(h, "dns", c)["healthy"], true);
    lab.ok(h, &["rm", "--force", c]);
    assert_eq!(
        lab.producer(h, "web", c),
        Value::Null,
        "rm left the producer"
    );
    assert_eq!(
        lab.producer(h, "dns", c),
        Value::Null,
        "rm left the producer"
    );
    assert_eq!(
        vips_of(&lab.ok(h, &["service", "register", "web"])),
        vips,
        "VIP kept"
    );

    // Removing a service takes its producers and VIPs.
    lab.ok(h, &["service", "register", "web", "--addr", "192.0.2.20"]);
    lab.ok(h, &["service", "deregister", "web"]);
    lab.fails(h, &["service", "inspect", "web"], "does not exist");
    lab.ok(h, &["service", "register", "other", "--vip", &v4]);
}

#[test]
fn health_checks_tcp_http_exec() {
    let lab = Lab::hosts("rghlth", 1, &[]);
    let h = "h1";
    lab.ok(
        h,
        &["network", "create", "rgnet", "--subnet", "10.232.0.0/24"],
    );
    let c = "rghlthc1";
    let ip = "10.232.0.50";
    lab.ok(
        h,
        &[
            "run",
            "--name",
            c,
            "--net",
            "rgnet",
            "--ip",
            ip,
            "--service",
            "web:80:8080",
            "--check",
            "tcp:8080",
            "--interval",
            "300ms",
            "--timeout",
            "500ms",
            "--fall",
            "2",
            "--",
            "sleep",
            "600",
        ],
    );
    // Nothing listens yet: out (it has never passed).
    let p = lab.producer(h, "web", c);
    assert_eq!(p["healthy"], false, "{p}");
    let server = http_server(c, 8080);
    lab.wait_health("web", c, true, Duration::from_secs(20));
    let p = lab.producer(h, "web", c);
    assert_eq!(p["health"]["host"], "h1", "{p}");
    assert!(
        p["health"]["output"]
            .as_str()
            .unwrap()
            .contains("connected"),
        "{p}"
    );
    drop(server);
    lab.wait_health("web", c, false, Duration::from_secs(20));
    let p = lab.producer(h, "web", c);
    assert!(
        p["health"]["output"].as_str().unwrap().contains("8080"),
        "{p}"
    );
    let _server = http_server(c, 8080);
    lab.wait_health("web", c, true, Duration::from_secs(20));

    // HTTP: the right status passes, a wrong one fails.
    let http = |id: &str, check: &str| {
        lab.ok(
            h,
            &[
                "service",
                "register",
                "api",
                "--addr",
                ip,
                "--id",
                id,
                "--check",
                check,
                "--interval",
                "300ms",
            ],
        );
    };
    http("good", "http:8080/=200");
    http("missing", "http:8080/nosuch=200");
    http("expects404", "http:8080/nosuch=404");
    lab.wait_health("api", "good", true, Duration::from_secs(20));
    lab.wait_health("api", "expects404", true, Duration::from_secs(20));
    let until = Instant::now() + Duration::from_secs(20);
    loop {
        let p = lab.producer(h, "api", "missing");
        let o = p["health"]["output"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        if o.contains("status 404, expected 200") {
            assert_eq!(p["healthy"], false, "{p}");
            break;
        }
        assert!(Instant::now() < until, "wrong status never reported: {p}");
        std::thread::sleep(Duration::from_millis(200));
    }

    // exec runs in the producer's namespace: only there does eth0 hold its address.
    let exec = |id: &str, cmd: &str, extra: &[&str]| {
        let check = format!("exec:{cmd}");
        let mut a = vec![
            "service",
            "register",
            "job",
            "--addr",
            ip,
            "--id",
            id,
            "--check",
            &check,
            "--interval",
            "300ms",
        ];
        a.extend_from_slice(extra);
        lab.ok(h, &a);
    };
    exec(
        "inside",
        &format!("sh -c 'ip -o addr show dev eth0 | grep -q \"inet {ip}/\"'"),
        &[],
    );
    exec("fails", "false", &[]);
    exec("slow", "sleep 30", &["--timeout", "300ms"]);
    lab.wait_health("job", "inside", true, Duration::from_secs(20));
    assert_eq!(
        lab.producer(h, "job", "inside")["netns"],
        format!("/run/netns/fnc-{c}")
    );
    let until = Instant::now() + Duration::from_secs(20);
    loop {
        let f = lab.producer(h, "job", "fails");
        let s = lab.producer(h, "job", "slow");
        let so = s["health"]["output"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        if f["health"]["healthy"] == false && so.contains("killed after") {
            assert_eq!(s["healthy"], false, "{s}");
            break;
        }
        assert!(Instant::now() < until, "exec failures not seen: {f} {s}");
        std::thread::sleep(Duration::from_millis(200));
    }
    // The timed-out command was killed: no `sleep 30` survives in the container's namespace.
    let ns_inode = std::fs::metadata(format!("/run/netns/fnc-{c}")).map(|m| {
        use std::os::unix::fs::MetadataExt;
        m.ino()
    });
    let ns_inode = ns_inode.expect("container netns");
    std::thread::sleep(Duration::from_secs(1));
    let lingering = std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| {
            let p = e.path();
            let cmd = std::fs::read(p.join("cmdline")).unwrap_or_default();
            let ns = std::fs::metadata(p.join("ns/net")).ok();
            cmd == b"sleep\x0030\x00"
                && ns.is_some_and(|m| {
                    use std::os::unix::fs::MetadataExt;
                    m.ino() == ns_inode
                })
        })
        .count();
    assert!(lingering <= 1, "{lingering} timed-out checks still running");

    // The agent's status lists the checks.
    let st = lab.ok(h, &["status"]);
    assert!(
        st.contains("api/missing") && st.contains("unhealthy"),
        "{st}"
    );

    // rm takes the container's producer and its health record.
    lab.ok(h, &["rm", "--force", c]);
    assert_eq!(lab.producer(h, "web", c), Value::Null);
}

#[test]
fn a_stopped_hosts_producers_leave_then_go() {
    let lab = Lab::hosts("rggone", 2, &["--grace", "3s", "--lease-ttl", "2s"]);
    lab.ok(
        "h2",
        &[
            "service",
            "register",
            "web",
            "--port",
            "80",
            "--addr",
            "192.0.2.30",
        ],
    );
    lab.ok(
        "h1",
        &["service", "register", "web", "--addr", "192.0.2.31"],
    );
    // Registered on h1 for h2: h2's agent runs the check, in h2's namespace (only there does
    // the underlay hold h2's address).
    let st: Value = serde_json::from_str(&lab.ok("h2", &["status", "--json"])).expect("status");
    let h2_v4 = st["underlay"]
        .as_array()
        .and_then(|a| {
            a.iter()
                .filter_map(Value::as_str)
                .find(|a| !a.contains(':'))
        })
        .and_then(|a| a.split('/').next())
        .expect("h2 underlay v4")
        .to_string();
    let check = format!("exec:sh -c 'ip -o addr | grep -q \"inet {h2_v4}/\"'");
    lab.ok(
        "h1",
        &[
            "service",
            "register",
            "web",
            "--addr",
            "192.0.2.33",
            "--host",
            "h2",
            "--check",
            &check,
            "--interval",
            "300ms",
        ],
    );
    lab.wait_health("web", "192.0.2.33", true, Duration::from_secs(20));
    assert_eq!(
        lab.producer("h1", "web", "192.0.2.33")["health"]["host"],
        "h2"
    );
    // Registered from h2 but owned by no host: it outlives h2.
    lab.ok(
        "h2",
        &[
            "service",
            "register",
            "web",
            "--addr",
            "192.0.2.32",
            "--host",
            "none",
        ],
    );
    let p = lab.producer("h1", "web", "192.0.2.30");
    assert_eq!(
        (p["host"].as_str(), p["healthy"].as_bool()),
        (Some("h2"), Some(true)),
        "{p}"
    );
    lab.lab(&["stop-agent", "h2", "--kill"]);
    // Out of service once its lease is gone, then deleted after the grace period.
    let until = Instant::now() + Duration::from_secs(30);
    let mut saw_out = false;
    loop {
        let p = lab.producer("h1", "web", "192.0.2.30");
        if p.is_null() {
            break;
        }
        if p["healthy"] == false {
            assert_eq!(p["hostLive"], false, "{p}");
            saw_out = true;
        }
        assert!(Instant::now() < until, "h2's producer still there: {p}");
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(
        saw_out,
        "the producer vanished without first leaving service"
    );
    // h1's own producer and the hostless one stay.
    assert_eq!(lab.producer("h1", "web", "192.0.2.31")["healthy"], true);
    assert_eq!(
        lab.producer("h1", "web", "192.0.2.33"),
        Value::Null,
        "h2's checked producer stayed"
    );
    let p = lab.producer("h1", "web", "192.0.2.32");
    assert_eq!(
        (p["healthy"].as_bool(), p.get("host")),
        (Some(true), None),
        "{p}"
    );
}

#[test]
fn health_survives_an_agent_restart() {
    let lab = Lab::hosts("rgrest", 1, &["--lease-ttl", "2s"]);
    let h = "h1";
    lab.ok(
        h,
        &["network", "create", "rgnet", "--subnet", "10.234.0.0/24"],
    );
    let c = "rgrestc1";
    lab.ok(
        h,
        &[
            "run",
            "--name",
            c,
            "--net",
            "rgnet",
            "--service",
            "web:8080",
            "--check",
            "tcp:8080",
            "--rise",
            "3",
            "--interval",
            "300ms",
            "--",
            "python3",
            "-m",
            "http.server",
            "8080",
        ],
    );
    lab.wait_health("web", c, true, Duration::from_secs(20));
    let since = lab.producer(h, "web", c)["health"]["sinceMs"].clone();
    lab.lab(&["stop-agent", h, "--kill"]);
    lab.lab(&["start-agent", h]);
    // The old lease expires (TTL 2 s); the new agent rewrote the record on its own lease,
    // keeping the verdict and its time (no transition: still healthy since the same moment).
    std::thread::sleep(Duration::from_secs(6));
    let p = lab.producer(h, "web", c);
    assert_eq!(p["healthy"], true, "{p}");
    assert_eq!(p["health"]["sinceMs"], since, "{p}");
}
