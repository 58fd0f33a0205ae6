//! Service discovery end to end, in one 3-host `ferrynet lab` on a real etcd (VXLAN): producers
//! are `ferrynet run --service web:80 --check tcp:80` containers on every host, clients run
//! inside containers with the resolver ferrynet gave them (`ferrynet exec`: glibc through
//! getent and python, dig against the container's nameserver). What the other tests prove
//! piece by piece (dns.rs: names from records written by hand; lb.rs: the VIP spread and
//! ingress; registry.rs: the checks; render.rs: render on one store) is proven here together:
//! the name, its VIP, `tasks.`, SRV and the LB follow the registry and the health checks on
//! every host, a producer that moves is reached at the same name and VIP, and `render` on one
//! host follows registrations made on another. The lab and everything in it are removed on
//! drop, also when the test fails.

mod common;

use std::collections::BTreeMap;
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use common::lab::{Container, Lab};
use common::{bin, need, out, try_within, Proc};
use serde_json::Value;

const LAB: &str = "e2edisc";
const ZONE: &str = "fabric.ferrynet.internal";
const HOSTS: [&str; 3] = ["h1", "h2", "h3"];
/// The health check bound: interval 300 ms × fall 2, plus generous slack for the watch, the
/// zone, the nft transaction and a noisy machine.
const CONVERGE: Duration = Duration::from_secs(15);

impl Lab {
    /// The 3-host VXLAN lab `LAB`, with the clients the test needs.
    fn e2e() -> Lab {
        need("dig", "dnsutils");
        need("getent", "libc-bin");
        Lab::vxlan3(LAB)
    }

    /// `ferrynet run` a sleeping container on `host` with `extra` flags.
    fn sleeper(&mut self, host: &str, short: &str, extra: &[&str]) -> Container {
        self.run(host, short, extra, &["sleep", "600"])
    }

    /// A producer of `web` on `host`: registered by `ferrynet run --service` with a TCP check.
    fn producer(&mut self, host: &str, short: &str) -> Container {
        self.sleeper(
            host,
            short,
            &[
                "--service",
                "web:80",
                "--check",
                "tcp:80",
                "--interval",
                "300ms",
                "--timeout",
                "500ms",
                "--fall",
                "2",
            ],
        )
    }

    /// `ferrynet exec` inside container `c` (its resolv.conf in place).
    fn inside(&self, c: &Container, cmd: &[&str]) -> Output {
        let mut args = vec!["exec", &c.name, "--"];
        args.extend_from_slice(cmd);
        self.exec(&c.host, &args)
    }

    /// `dig +short` inside `c` at its own resolver; sorted lines.
    fn dig(&self, c: &Container, name: &str, qtype: &str) -> Vec<String> {
        let o = self.inside(c, &["dig", "+short", "+tries=1", "+time=3", name, qtype]);
        let mut v: Vec<String> = String::from_utf8_lossy(&o.stdout)
            .lines()
            .filter(|l| !l.is_empty())
            .map(str::to_string)
            .collect();
        v.sort();
        v
    }

    /// `getent hosts NAME` inside `c` (glibc, resolv.conf's search domain): the addresses.
    fn getent(&self, c: &Container, name: &str) -> Vec<String> {
        let o = self.inside(c, &["getent", "ahosts", name]);
        let mut v: Vec<String> = String::from_utf8_lossy(&o.stdout)
            .lines()
            .filter_map(|l| l.split_whitespace().next())
            .map(str::to_string)
            .collect();
        v.sort();
        v.dedup();
        v
    }

    /// Start the server answering `id` on port 80 in `c`'s network namespace.
    fn serve(&mut self, c: &Container, id: &str) {
        let child = Command::new("nsenter")
            .arg(format!("--net=/run/netns/fnc-{}", c.name))
            .args(["python3", "-c", &server_code(id)])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("python3 server");
        if let Some(old) = self.servers.insert(c.name.clone(), Proc(child)) {
            old.kill();
        }
    }

    /// Kill the server running in `c` (by its PID).
    fn kill_server(&mut self, c: &Container) {
        self.servers
            .remove(&c.name)
            .unwrap_or_else(|| panic!("no server runs in {}", c.name))
            .kill();
    }

    /// What a failed convergence reports: each host's health checks, LB and agent log tail.
    fn diagnose(&self) -> String {
        let mut s = String::new();
        for h in HOSTS {
            let st = self.exec(h, &["status"]);
            s += &format!("--- {h}\n{}\n{}\n", out(&st), self.agent_log_tail(h, 10));
        }
        s
    }

    /// Retry `f` until it returns Ok, for up to `CONVERGE`; then panic with what was seen.
    fn converge<T>(&self, what: &str, f: impl FnMut() -> Result<T, String>) -> T {
        try_within(CONVERGE, f).unwrap_or_else(|seen| {
            panic!(
                "{what}: not converged within {CONVERGE:?}; last seen: {seen}\n{}",
                self.diagnose()
            )
        })
    }
}

/// Answers every connection on port 80 (IPv4 and IPv6) with `<id>\n`.
fn server_code(id: &str) -> String {
    format!(
        "import socket\n\
         s=socket.socket(socket.AF_INET6);s.setsockopt(socket.SOL_SOCKET,socket.SO_REUSEADDR,1)\n\
         s.setsockopt(socket.IPPROTO_IPV6,socket.IPV6_V6ONLY,0);s.bind(('::',80));s.listen(512)\n\
         while True:\n  c,a=s.accept()\n  \
         try: c.sendall(b'{id}\\n')\n  \
         except OSError: pass\n  c.close()\n"
    )
}

/// Opens `n` connections to `web:80` by name (getaddrinfo through the container's resolver);
/// prints {"counts": {id: n}, "errors": [..], "nerrors": n}.
fn client_code(n: u32) -> String {
    format!(
        "import socket,json\n\
         counts={{}};errors=[]\n\
         for i in range({n}):\n  \
         try:\n    s=socket.create_connection(('web',80),timeout=3);l=s.makefile().readline().strip();s.close()\n    \
         counts[l]=counts.get(l,0)+1\n  \
         except Exception as e:\n    errors.append(type(e).__name__+': '+str(e))\n\
         print(json.dumps({{'counts':counts,'errors':errors[:3],'nerrors':len(errors)}}))\n"
    )
}

/// Connections to `web:80` from inside `c`: producer id -> count, and the failures.
fn connect(lab: &Lab, c: &Container, n: u32) -> (BTreeMap<String, u64>, u64, String) {
    let o = lab.inside(c, &["python3", "-c", &client_code(n)]);
    let v: Value = serde_json::from_slice(&o.stdout)
        .unwrap_or_else(|e| panic!("client in {} ({e}): {}", c.name, out(&o)));
    let counts = v["counts"]
        .as_object()
        .expect("counts")
        .iter()
        .map(|(k, n)| (k.clone(), n.as_u64().unwrap_or(0)))
        .collect();
    (
        counts,
        v["nerrors"].as_u64().unwrap_or(u64::MAX),
        v["errors"].to_string(),
    )
}

fn sorted(mut v: Vec<String>) -> Vec<String> {
    v.sort();
    v
}

fn srv_lines(ids: &[&str]) -> Vec<String> {
    sorted(
        ids.iter()
            .map(|id| format!("0 10 80 {id}.tasks.web.{ZONE}."))
            .collect(),
    )
}

/// Every client (one container per host) sees `web` as expected: the name (glibc, bare name
/// through resolv.conf's search domain) -> `vips`; `tasks.web` -> the producers' addresses;
/// SRV -> one record per producer; connections to `web:80` reach exactly `answers`.
fn converged(lab: &Lab, what: &str, clients: &[Container], vips: &[String], ps: &[&Container]) {
    let tasks = sorted(ps.iter().map(|p| p.v4.clone()).collect());
    let ids: Vec<&str> = ps.iter().map(|p| p.name.as_str()).collect();
    let srv = srv_lines(&ids);
    let answers: Vec<String> = sorted(ps.iter().map(|p| answer(p)).collect());
    for c in clients {
        lab.converge(&format!("{what}: seen from {}", c.host), || {
            let got = lab.getent(c, "web");
            if got != vips {
                return Err(format!(
                    "getent ahosts web = {got:?}, want the VIPs {vips:?}"
                ));
            }
            let got = lab.dig(c, &format!("tasks.web.{ZONE}"), "A");
            if got != tasks {
                return Err(format!("tasks.web = {got:?}, want {tasks:?}"));
            }
            let got = lab.dig(c, &format!("_p80._tcp.web.{ZONE}"), "SRV");
            if got != srv {
                return Err(format!("SRV = {got:?}, want {srv:?}"));
            }
            // 100 new connections: all answered, by exactly these producers.
            let (counts, nerrors, errors) = connect(lab, c, 100);
            let reached: Vec<String> = counts.keys().cloned().collect();
            if nerrors != 0 || reached != answers {
                return Err(format!(
                    "web:80 reached {counts:?} with {nerrors} failures {errors}, want {answers:?}"
                ));
            }
            Ok(())
        });
    }
}

/// What the server in `p` answers: its container name and host.
fn answer(p: &Container) -> String {
    format!("{}@{}", p.name, p.host)
}

#[test]
fn names_health_moves_and_render_across_three_hosts() {
    let mut lab = Lab::e2e();

    // a. Three producers of `web` (one per host) and a client container on every host.
    let mut ps: Vec<Container> = HOSTS
        .iter()
        .enumerate()
        .map(|(i, h)| lab.producer(h, &format!("p{}", i + 1)))
        .collect();
    for p in ps.clone() {
        lab.serve(&p, &answer(&p));
    }
    let clients: Vec<Container> = HOSTS
        .iter()
        .enumerate()
        .map(|(i, h)| lab.sleeper(h, &format!("c{}", i + 1), &[]))
        .collect();
    let inspect = |lab: &Lab| -> Vec<String> {
        let v: Value =
            serde_json::from_str(&lab.ok("h1", &["service", "inspect", "web"])).expect("json");
        let mut vips: Vec<String> = v["service"]["vips"]
            .as_array()
            .unwrap_or_else(|| panic!("web has no VIPs: {v}"))
            .iter()
            .filter_map(|v| v.as_str().map(str::to_string))
            .collect();
        vips.sort();
        vips
    };
    let vips = inspect(&lab);
    assert_eq!(vips.len(), 2, "one VIP per family: {vips:?}");
    converged(
        &lab,
        "three producers",
        &clients,
        &vips,
        &[&ps[0], &ps[1], &ps[2]],
    );
    // One producer by its id.
    for c in &clients {
        let got = lab.dig(c, &format!("{}.tasks.web.{ZONE}", ps[1].name), "A");
        assert_eq!(got, std::slice::from_ref(&ps[1].v4), "from {}", c.host);
    }

    // b. p2's server dies: its check fails (every 300 ms, fall 2), and it leaves DNS and the
    // LB on every host; restarted, it comes back everywhere.
    let p2 = ps[1].clone();
    lab.kill_server(&p2);
    converged(
        &lab,
        "p2's server killed",
        &clients,
        &vips,
        &[&ps[0], &ps[2]],
    );
    lab.serve(&p2, &answer(&p2));
    converged(
        &lab,
        "p2's server restarted",
        &clients,
        &vips,
        &[&ps[0], &ps[1], &ps[2]],
    );

    // c. p3 moves from h3 to h2: removed, started again under the same name on another host
    // (another address block). The same name and VIP reach it at its new address only.
    let old = ps[2].clone();
    lab.rm(&old);
    let moved = lab.producer("h2", "p3");
    assert_ne!(moved.v4, old.v4, "a new host gives a new address");
    lab.serve(&moved, &answer(&moved));
    ps[2] = moved.clone();
    converged(
        &lab,
        "p3 moved to h2",
        &clients,
        &vips,
        &[&ps[0], &ps[1], &ps[2]],
    );
    for c in &clients {
        let got = lab.dig(c, &format!("{}.tasks.web.{ZONE}", moved.name), "A");
        assert_eq!(
            got,
            std::slice::from_ref(&moved.v4),
            "p3 by name from {}",
            c.host
        );
        let got = lab.dig(c, &format!("tasks.web.{ZONE}"), "A");
        assert!(!got.contains(&old.v4), "old address still served: {got:?}");
    }
    assert_eq!(inspect(&lab), vips, "the VIPs stayed");

    // d. `ferrynet render` on h3 follows registrations made on h1: the file is rewritten and
    // the reload runs once per change.
    let dir = Dir::new();
    let tpl = dir.0.join("web.tmpl");
    let file = dir.0.join("web.txt");
    let reloads = dir.0.join("reloads");
    let log = dir.0.join("render.log");
    std::fs::write(
        &tpl,
        "{% for p in service(\"web\").producers|sort_by(\"id\") %}{{ p.id }} {{ p.addr }}:{{ p.port }}\n{% endfor %}",
    )
    .expect("template");
    let logf = std::fs::File::create(&log).expect("render log");
    let render = Command::new("nsenter")
        .arg(format!("--net=/run/netns/{LAB}-h3"))
        .arg(bin())
        .args([
            "render",
            "-t",
            &format!("{}:{}", tpl.display(), file.display()),
            "--exec",
            &format!("echo reload >> {}", reloads.display()),
        ])
        .env("FERRYNET_STATE_DIR", format!("/run/ferrynet-lab/{LAB}/h3"))
        .env_remove("FERRYNET_STORE")
        .stdout(logf.try_clone().expect("log"))
        .stderr(logf)
        .spawn()
        .expect("ferrynet render");
    lab.procs.push(Proc(render));
    let line = |p: &Container| format!("{} {}:80\n", p.name, p.v4);
    let three: String = ps.iter().map(line).collect();
    let ext = "ext1 10.20.255.250:80\n";
    let four = format!("{three}{ext}");
    let step = |what: &str, content: &str, n: usize| {
        lab.converge(what, || {
            let got = std::fs::read_to_string(&file).unwrap_or_default();
            let runs = std::fs::read_to_string(&reloads)
                .unwrap_or_default()
                .lines()
                .count();
            if got == content && runs >= n {
                Ok(runs)
            } else {
                Err(format!(
                    "file {got:?} after {runs} reloads, want {content:?} after {n}\n{}",
                    std::fs::read_to_string(&log).unwrap_or_default()
                ))
            }
        })
    };
    assert_eq!(step("first render on h3", &three, 1), 1, "one reload");
    lab.ok(
        "h1",
        &[
            "service",
            "register",
            "web",
            "--addr",
            "10.20.255.250",
            "--id",
            "ext1",
        ],
    );
    let mut sorted_four: Vec<&str> = four.lines().collect();
    sorted_four.sort();
    let four: String = sorted_four.iter().map(|l| format!("{l}\n")).collect();
    assert_eq!(step("ext1 registered on h1", &four, 2), 2, "one reload");
    lab.ok("h1", &["service", "deregister", "web", "--id", "ext1"]);
    assert_eq!(step("ext1 deregistered on h1", &three, 3), 3, "one reload");
}

/// A scratch directory for render's files, removed on drop.
struct Dir(std::path::PathBuf);

impl Dir {
    fn new() -> Dir {
        let d = std::env::temp_dir().join(format!("ferrynet-e2e-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).expect("scratch dir");
        Dir(d)
    }
}

impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
