//! Network policy, end to end: a truth-table suite on one 3-host vxlan lab (etcd), in the
//! spirit of the Kubernetes network-policy conformance tests and cyclonus. Three label groups
//! (app=a, app=b, app=c) of three containers, one of each group per host, and an "outside"
//! namespace on the underlay. For every case the full probe matrix (every source to every
//! destination, TCP and UDP, IPv4 and IPv6) is compared with a matrix written by hand, and a
//! sample of it with `ferrynet policy test` (the model the nft rules encode). Then: an
//! established connection cut by a new policy, a default-deny network, and bad policy files.

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::lab::{Container, Lab};
use common::{must, out};
use serde_json::Value;

/// Every container's program: TCP 80, 8080 and 9000 answer `ok\n` then echo; UDP 53 and 9000
/// answer `ok`; both families.
const SERVER: &str = "import socket,threading\n\
def tcp(p):\n  s=socket.socket(socket.AF_INET6);s.setsockopt(socket.SOL_SOCKET,socket.SO_REUSEADDR,1)\n  \
s.setsockopt(socket.IPPROTO_IPV6,socket.IPV6_V6ONLY,0);s.bind(('::',p));s.listen(512)\n  \
def serve(c):\n    try:\n      c.sendall(b'ok\\n')\n      while True:\n        d=c.recv(4096)\n        \
if not d: break\n        c.sendall(d)\n    except OSError: pass\n    c.close()\n  \
while True:\n    c,a=s.accept();threading.Thread(target=serve,args=(c,),daemon=True).start()\n\
def udp(p):\n  u=socket.socket(socket.AF_INET6,socket.SOCK_DGRAM)\n  \
u.setsockopt(socket.IPPROTO_IPV6,socket.IPV6_V6ONLY,0);u.bind(('::',p))\n  \
while True:\n    d,a=u.recvfrom(2000);u.sendto(b'ok',a)\n\
for p in (80,8080,9000): threading.Thread(target=tcp,args=(p,),daemon=True).start()\n\
for p in (53,9000): threading.Thread(target=udp,args=(p,),daemon=True).start()\n\
threading.Event().wait()\n";

/// Probes `[[addr, port, proto], …]` (argv 1) in parallel: 1 when the server answered, 0 when
/// nothing came back within 1.5 s (a dropped SYN or datagram). Prints the list as JSON.
const PROBE: &str = "import socket,threading,json,sys\n\
targets=json.loads(sys.argv[1]);res=[0]*len(targets)\n\
def one(i,a,p,proto):\n  fam=socket.AF_INET6 if ':' in a else socket.AF_INET\n  try:\n    \
if proto=='tcp':\n      s=socket.create_connection((a,p),timeout=1.5);s.settimeout(1.5);ok=s.recv(3)==b'ok\\n'\n    \
else:\n      s=socket.socket(fam,socket.SOCK_DGRAM);s.settimeout(1.5);s.connect((a,p));s.send(b'x');ok=s.recv(10)==b'ok'\n    \
s.close();res[i]=1 if ok else 0\n  except Exception: res[i]=0\n\
ts=[threading.Thread(target=one,args=(i,*t)) for i,t in enumerate(targets)]\n\
[t.start() for t in ts];[t.join() for t in ts]\nprint(json.dumps(res))\n";

/// Row and column order of every matrix: a1 a2 a3 b1 b2 b3 c1 c2 c3 out (container N of a
/// group runs on host hN).
const NAMES: [&str; 10] = ["a1", "a2", "a3", "b1", "b2", "b3", "c1", "c2", "c3", "out"];

/// The outside namespace's addresses on the underlay.
const OUT4: &str = "172.31.0.200";
const OUT6: &str = "fd31::c8";

/// A matrix: rows are sources, columns destinations; `1` answered, `0` not, `-` not probed
/// (itself, and outside to outside).
type Grid = [&'static str; 10];

const ALL_OPEN: Grid = [
    "-111111111",
    "1-11111111",
    "11-1111111",
    "111-111111",
    "1111-11111",
    "11111-1111",
    "111111-111",
    "1111111-11",
    "11111111-1",
    "111111111-",
];

/// One case: the policies (YAML, `{B2}`/`{B2_6}` stand for h2's blocks), then what each
/// probe matrix must be; `None` repeats the IPv4 TCP matrix.
struct Case {
    name: &'static str,
    yaml: &'static str,
    tcp4: Grid,
    udp4: Option<Grid>,
    tcp6: Option<Grid>,
    udp6: Option<Grid>,
}

struct Suite {
    lab: Lab,
    cs: Vec<Container>,
    out_ns: String,
    dir: tempfile::TempDir,
}

impl Suite {
    fn setup() -> Suite {
        let mut lab = Lab::vxlan3(&format!("pol{}", std::process::id() % 10000));
        let mut cs = Vec::new();
        for g in ["a", "b", "c"] {
            for h in 1..=3 {
                let label = format!("app={g}");
                let host = format!("h{h}");
                let c = lab.run(
                    &host,
                    &format!("{g}{h}"),
                    &["--label", &label],
                    &["sleep", "infinity"],
                );
                cs.push(c);
            }
        }
        for c in &cs {
            lab.servers.insert(c.name.clone(), serve(&c.netns()));
        }
        let out_ns = outside(&mut lab);
        lab.procs.push(serve(&out_ns));
        let s = Suite {
            lab,
            cs,
            out_ns,
            dir: tempfile::tempdir().expect("tempdir"),
        };
        // Every agent knows every endpoint before the first case.
        s.wait_for(
            |st| st["policy"]["endpoints"].as_u64() >= Some(9),
            "9 endpoints",
        );
        s
    }

    fn wait_for(&self, ok: impl Fn(&Value) -> bool, what: &str) {
        self.wait_for_on(&["h1", "h2", "h3"], ok, what)
    }

    /// Wait until `ok` holds for the status of each of `hosts` (30 s each at most).
    fn wait_for_on(&self, hosts: &[&str], ok: impl Fn(&Value) -> bool, what: &str) {
        for &h in hosts {
            let deadline = Instant::now() + Duration::from_secs(30);
            loop {
                let st = self.lab.status(h);
                if ok(&st) {
                    break;
                }
                assert!(
                    Instant::now() < deadline,
                    "{h} never reached {what}: {}",
                    st["policy"]
                );
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }

    /// Wait until every agent enforces store revision `rev` or later.
    fn settle(&self, output: &str) {
        let rev: u64 = output
            .lines()
            .find_map(|l| l.strip_prefix("store revision "))
            .and_then(|r| r.trim().parse().ok())
            .unwrap_or_else(|| panic!("no store revision in {output:?}"));
        self.wait_for(
            |st| {
                st["policy"]["appliedRevision"].as_u64() >= Some(rev)
                    && st["policy"]["error"].is_null()
            },
            &format!("revision {rev}"),
        );
    }

    fn apply(&self, yaml: &str) -> String {
        let f = self.dir.path().join("p.yaml");
        std::fs::write(&f, yaml).expect("write policy");
        let o = self
            .lab
            .ok("h1", &["policy", "apply", "-f", f.to_str().unwrap()]);
        self.settle(&o);
        o
    }

    fn remove_all(&self) {
        let list: Vec<Value> =
            serde_json::from_str(&self.lab.ok("h2", &["policy", "ls", "--json"])).unwrap();
        for p in list {
            let o = self
                .lab
                .ok("h2", &["policy", "rm", p["name"].as_str().unwrap()]);
            self.settle(&o);
        }
    }

    fn addr(&self, i: usize, v6: bool) -> String {
        match (i, v6) {
            (9, false) => OUT4.into(),
            (9, true) => OUT6.into(),
            (i, false) => self.cs[i].v4.clone(),
            (i, true) => self.cs[i].v6.clone(),
        }
    }

    fn ns(&self, i: usize) -> String {
        if i == 9 {
            self.out_ns.clone()
        } else {
            self.cs[i].netns()
        }
    }

    /// The four matrices (tcp4, udp4, tcp6, udp6), probed from every source in parallel.
    fn probe(&self) -> [Vec<String>; 4] {
        let kinds = [
            ("tcp", 80, false),
            ("udp", 53, false),
            ("tcp", 80, true),
            ("udp", 53, true),
        ];
        let mut children = Vec::new();
        for src in 0..10 {
            let mut targets = Vec::new();
            for (k, (proto, port, v6)) in kinds.iter().enumerate() {
                for dst in 0..10 {
                    if dst != src {
                        targets.push((
                            k,
                            dst,
                            serde_json::json!([self.addr(dst, *v6), port, proto]),
                        ));
                    }
                }
            }
            let list: Vec<&Value> = targets.iter().map(|t| &t.2).collect();
            let child = Command::new("nsenter")
                .args([
                    &format!("--net=/run/netns/{}", self.ns(src)),
                    "python3",
                    "-c",
                    PROBE,
                ])
                .arg(serde_json::to_string(&list).unwrap())
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .expect("probe");
            children.push((src, targets, child));
        }
        let mut grids: [Vec<Vec<u8>>; 4] = std::array::from_fn(|_| vec![vec![b'-'; 10]; 10]);
        for (src, targets, child) in children {
            let o = child.wait_with_output().expect("probe output");
            assert!(o.status.success(), "probe from {}: {}", NAMES[src], out(&o));
            let res: Vec<u8> = serde_json::from_slice(&o.stdout).expect("probe json");
            for ((k, dst, _), r) in targets.iter().zip(res) {
                grids[*k][src][*dst] = b'0' + r;
            }
        }
        grids.map(|g| {
            g.into_iter()
                .map(|r| String::from_utf8(r).unwrap())
                .collect()
        })
    }

    /// Probe and compare with the case's matrices; also ask the model for a sample of pairs.
    fn check(&self, case: &Case) {
        let want = [
            case.tcp4,
            case.udp4.unwrap_or(case.tcp4),
            case.tcp6.unwrap_or(case.tcp4),
            case.udp6.or(case.udp4).or(case.tcp6).unwrap_or(case.tcp4),
        ];
        let got = self.probe();
        let mut bad = Vec::new();
        for (k, kind) in ["tcp4", "udp4", "tcp6", "udp6"].iter().enumerate() {
            // Outside to outside is never probed; the grid's own `-` marks the diagonal.
            let want_k: Vec<String> = want[k]
                .iter()
                .enumerate()
                .map(|(r, row)| {
                    row.char_indices()
                        .map(|(c, ch)| if r == 9 && c == 9 { '-' } else { ch })
                        .collect()
                })
                .collect();
            if got[k] != want_k {
                bad.push(format!(
                    "{kind}:\n      {}\n{}",
                    NAMES.map(|n| format!("{n:>3}")).join(""),
                    (0..10)
                        .map(|r| format!("  {:>3} got {}  want {}", NAMES[r], got[k][r], want_k[r]))
                        .collect::<Vec<_>>()
                        .join("\n")
                ));
            }
        }
        assert!(bad.is_empty(), "case {}:\n{}", case.name, bad.join("\n"));
        // The model agrees (tcp/80 over IPv4) on a sample of container pairs.
        for (s, d) in [(0, 1), (3, 2), (6, 1), (2, 4), (4, 6), (8, 0), (1, 7)] {
            let dst = format!("{}:80/tcp", self.cs[d].name);
            let o = self
                .lab
                .ok("h3", &["policy", "test", "--json", &self.cs[s].name, &dst]);
            let v: Value = serde_json::from_str(&o).expect("policy test json");
            let want_allowed = case.tcp4[s].as_bytes()[d] == b'1';
            assert_eq!(
                v["allowed"].as_bool(),
                Some(want_allowed),
                "case {}: policy test {} -> {dst}: {o}",
                case.name,
                self.cs[s].name
            );
        }
    }

    /// Apply a case's policies (after removing every earlier one) and check it.
    fn run_case(&self, case: &Case) {
        self.remove_all();
        if !case.yaml.is_empty() {
            let b2 = self.block_of("h2", false);
            let b2_6 = self.block_of("h2", true);
            self.apply(&case.yaml.replace("{B2_6}", &b2_6).replace("{B2}", &b2));
        }
        self.check(case);
    }

    /// `host`'s block holding its containers (beside it the host keeps an empty spare).
    fn block_of(&self, host: &str, v6: bool) -> String {
        let st = self.lab.status(host);
        let c = self
            .cs
            .iter()
            .find(|c| c.host == host)
            .expect("a container");
        let ip: std::net::IpAddr = if v6 { &c.v6 } else { &c.v4 }.parse().expect("address");
        st["networks"][0]["blocks"]
            .as_array()
            .and_then(|b| {
                b.iter()
                    .filter_map(Value::as_str)
                    .find(|b| b.parse::<ipnet::IpNet>().is_ok_and(|n| n.contains(&ip)))
            })
            .unwrap_or_else(|| panic!("no block on {host}: {}", st["networks"]))
            .to_string()
    }
}

/// The lab's outside namespace (172.31.0.200, fd31::c8) with routes to the fabric through h1.
fn outside(lab: &mut Lab) -> String {
    let ns = lab.outside();
    let st = lab.status("h1");
    let h1: Vec<String> = st["underlay"]
        .as_array()
        .expect("underlay")
        .iter()
        .filter_map(|a| a.as_str()?.split('/').next().map(str::to_string))
        .collect();
    let h1_4 = h1.iter().find(|a| !a.contains(':')).expect("h1 IPv4");
    let h1_6 = h1.iter().find(|a| a.contains(':')).expect("h1 IPv6");
    must(&["ip", "-n", &ns, "route", "add", "10.20.0.0/16", "via", h1_4]);
    must(&[
        "ip",
        "-n",
        &ns,
        "-6",
        "route",
        "add",
        "fd20::/64",
        "via",
        h1_6,
    ]);
    ns
}

/// Start the test server in namespace `ns`.
fn serve(ns: &str) -> common::Proc {
    let p = Command::new("nsenter")
        .args([&format!("--net=/run/netns/{ns}"), "python3", "-c", SERVER])
        .spawn()
        .expect("python3 server");
    common::Proc(p)
}

#[path = "policy/cases.rs"]
mod cases;

#[test]
fn truth_table() {
    common::need("python3", "python3");
    let s = Suite::setup();
    for case in cases::CASES {
        s.run_case(case);
    }
    // Policies added and removed: the last case's policy goes, everything is open again.
    s.remove_all();
    s.check(&Case {
        name: "all removed",
        yaml: "",
        tcp4: ALL_OPEN,
        udp4: None,
        tcp6: None,
        udp6: None,
    });
    labels_changed_on_a_running_container(&s);
    a_deleted_table_is_rebuilt(&s);
    established_connections_are_cut(&s);
    bad_files_are_refused_whole(&s);
}

/// deny-in plus a-from-b; relabelling c1 to app=b lets it reach the a containers, and
/// relabelling it back takes that away again.
fn labels_changed_on_a_running_container(s: &Suite) {
    s.remove_all();
    s.apply(cases::A_FROM_B);
    s.check(&cases::A_FROM_B_CASE);
    let c1 = &s.cs[6].name;
    let o = s.lab.ok("h1", &["label", c1, "app=b"]);
    assert!(o.contains("app=b"), "{o}");
    s.settle(&o);
    s.check(&cases::A_FROM_B_C1_RELABELLED);
    let o = s.lab.ok("h1", &["label", c1, "app=c"]);
    s.settle(&o);
    s.check(&cases::A_FROM_B_CASE);
    // ps and network inspect show labels.
    let ps = s.lab.ok("h1", &["ps", "--json"]);
    assert!(ps.contains("\"app\": \"c\""), "{ps}");
    let inspect = s.lab.ok("h1", &["network", "inspect", "fabric"]);
    assert!(inspect.contains("\"labels\""), "{inspect}");
}

/// Someone deletes h2's policy table (as `nft flush ruleset` would): its agent notices and
/// builds it again (within its 5 s check), and what was denied is denied again.
fn a_deleted_table_is_rebuilt(s: &Suite) {
    s.remove_all();
    s.apply(cases::A_FROM_B);
    let rebuilds = || {
        s.lab.status("h2")["policy"]["rebuilds"]
            .as_u64()
            .unwrap_or(0)
    };
    let before = rebuilds();
    must(&[
        "ip",
        "netns",
        "exec",
        &s.lab.host_ns("h2"),
        "nft",
        "delete",
        "table",
        "inet",
        "ferrynet-policy",
    ]);
    s.wait_for_on(
        &["h2"],
        |st| st["policy"]["rebuilds"].as_u64().unwrap_or(0) > before,
        "the policy table rebuilt",
    );
    s.check(&cases::A_FROM_B_CASE);
}

/// A long-lived connection b1 -> a2 echoes; a policy that denies it cuts it (its conntrack
/// entry goes, the next segment meets the rules); a b1 -> a3 connection that stays allowed
/// keeps echoing.
fn established_connections_are_cut(s: &Suite) {
    s.remove_all();
    let hold = "import socket,sys\n\
        s=socket.create_connection((sys.argv[1],80),timeout=2);s.settimeout(2)\n\
        assert s.recv(3)==b'ok\\n'\nprint('connected',flush=True)\nsys.stdin.readline()\n\
        try:\n  s.sendall(b'ping');print('echo' if s.recv(4)==b'ping' else 'bad')\n\
        except Exception as e: print('cut')\n";
    let open = |dst: &str| {
        let mut c = Command::new("nsenter")
            .args([
                &format!("--net=/run/netns/{}", s.cs[3].netns()),
                "python3",
                "-u",
                "-c",
                hold,
                dst,
            ])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect("hold");
        let mut line = String::new();
        use std::io::BufRead;
        let mut r = std::io::BufReader::new(c.stdout.take().unwrap());
        r.read_line(&mut line).unwrap();
        assert_eq!(line.trim(), "connected");
        (c, r)
    };
    let (mut to_a2, mut r2) = open(&s.cs[1].v4);
    let (mut to_a3, mut r3) = open(&s.cs[2].v6);
    s.apply(&format!(
        "name: cut\nselector: app=a\ningress:\n- action: deny\n  from: [{{cidr: {}/32}}]\n  ports: [tcp/80]\n- {{}}\n",
        s.cs[3].v4
    ));
    let finish = |c: &mut std::process::Child,
                  r: &mut std::io::BufReader<std::process::ChildStdout>| {
        use std::io::{BufRead, Write};
        c.stdin.as_mut().unwrap().write_all(b"go\n").unwrap();
        let mut line = String::new();
        r.read_line(&mut line).unwrap();
        let _ = c.wait();
        line.trim().to_string()
    };
    assert_eq!(
        finish(&mut to_a2, &mut r2),
        "cut",
        "the denied connection was not cut"
    );
    assert_eq!(
        finish(&mut to_a3, &mut r3),
        "echo",
        "the allowed one was cut"
    );
    let cut: u64 = ["h1", "h2", "h3"]
        .iter()
        .map(|h| s.lab.status(h)["policy"]["cut"].as_u64().unwrap_or(0))
        .sum();
    assert!(cut >= 1, "no agent reports a cut connection");
}

/// Unknown fields, bad values and a bad second document: the whole file is refused, naming
/// the document and the field, and nothing is stored. A selector that matches nothing is
/// applied with a warning.
fn bad_files_are_refused_whole(s: &Suite) {
    s.remove_all();
    let f = s.dir.path().join("bad.yaml");
    let cases: [(&str, &str); 6] = [
        (
            "name: ok\n---\nname: bad\nselektor: app=a\n",
            "document 2 (bad): selektor: unknown field `selektor`",
        ),
        (
            "name: p\ningress: [{from: [{selector: app=a}], ports: [tcp/0]}]\n",
            "ingress[0].ports[0]",
        ),
        (
            "name: p\ningress: [{from: [{cidr: 10.0.0.0/8, except: [11.0.0.0/8]}]}]\n",
            "ingress[0].from[0].except[0]",
        ),
        (
            "name: p\negress: [{from: [{selector: x}]}]\n",
            "egress[0].from",
        ),
        ("name: p\nselector: app in (a\n", "selector"),
        ("{\"name\": \"p\", \"order\": \"first\"}", "order"),
    ];
    for (text, what) in cases {
        std::fs::write(&f, text).unwrap();
        let o = s
            .lab
            .exec("h1", &["policy", "apply", "-f", f.to_str().unwrap()]);
        let msg = out(&o);
        assert!(
            !o.status.success() && msg.contains(what) && msg.contains("nothing was applied"),
            "{text:?}: {msg}"
        );
    }
    let list = s.lab.ok("h1", &["policy", "ls", "--json"]);
    assert_eq!(list.trim(), "[]", "a refused file stored something");
    std::fs::write(&f, "name: nobody\nselector: role=none\ningress: []\n").unwrap();
    let o = s
        .lab
        .exec("h1", &["policy", "apply", "-f", f.to_str().unwrap()]);
    assert!(
        o.status.success() && out(&o).contains("matches no endpoint"),
        "{}",
        out(&o)
    );
    s.settle(&String::from_utf8_lossy(&o.stdout));
    s.check(&Case {
        name: "selector matching nothing",
        yaml: "",
        tcp4: ALL_OPEN,
        udp4: None,
        tcp6: None,
        udp6: None,
    });
    let show = s.lab.ok("h1", &["policy", "show", "nobody"]);
    assert!(show.contains("selects 0 endpoint(s)"), "{show}");
}

/// A network created with --default-deny: its containers are closed both ways until a policy
/// allows; the fabric network's containers are not affected.
#[test]
fn default_deny_network() {
    common::need("python3", "python3");
    let mut lab = Lab::vxlan3(&format!("pdd{}", std::process::id() % 10000));
    lab.ok(
        "h1",
        &[
            "network",
            "create",
            "closed",
            "--subnet",
            "10.21.0.0/16",
            "--subnet",
            "fd21::/64",
            "--backend",
            "vxlan",
            "--default-deny",
        ],
    );
    let x = lab.run_on(
        "h1",
        "x",
        "closed",
        &["--label", "role=x"],
        &["sleep", "infinity"],
    );
    let y = lab.run_on(
        "h2",
        "y",
        "closed",
        &["--label", "role=y"],
        &["sleep", "infinity"],
    );
    for c in [&x, &y] {
        lab.servers.insert(c.name.clone(), serve(&c.netns()));
    }
    let probe = |from: &Container, to: &Container| -> Vec<u8> {
        let t = serde_json::json!([[to.v4, 80, "tcp"], [to.v6, 53, "udp"]]);
        let o = Command::new("nsenter")
            .args([
                &format!("--net=/run/netns/{}", from.netns()),
                "python3",
                "-c",
                PROBE,
                &t.to_string(),
            ])
            .output()
            .expect("probe");
        serde_json::from_slice(&o.stdout).unwrap_or_else(|_| panic!("probe: {}", out(&o)))
    };
    let wait = |rev_out: &str| {
        let rev: u64 = rev_out
            .lines()
            .find_map(|l| l.strip_prefix("store revision "))
            .and_then(|r| r.trim().parse().ok())
            .unwrap_or(0);
        for h in ["h1", "h2"] {
            let deadline = Instant::now() + Duration::from_secs(30);
            while lab.status(h)["policy"]["appliedRevision"].as_u64() < Some(rev)
                || lab.status(h)["policy"]["endpoints"].as_u64() < Some(2)
            {
                assert!(
                    Instant::now() < deadline,
                    "{h} did not apply revision {rev}"
                );
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    };
    wait("store revision 0");
    assert_eq!(probe(&x, &y), [0, 0], "x -> y on a default-deny network");
    assert_eq!(probe(&y, &x), [0, 0], "y -> x on a default-deny network");
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("p.yaml");
    std::fs::write(
        &f,
        "name: x-to-y\nnetwork: closed\nselector: role=y\ningress: [{from: [{selector: role=x}]}]\n---\nname: x-out\nnetwork: closed\nselector: role=x\negress: [{to: [{selector: role=y}]}]\n",
    )
    .unwrap();
    let o = lab.ok("h3", &["policy", "apply", "-f", f.to_str().unwrap()]);
    wait(&o);
    assert_eq!(probe(&x, &y), [1, 1], "x -> y allowed by both sides");
    assert_eq!(probe(&y, &x), [0, 0], "y -> x still closed");
    let status = lab.ok("h1", &["status"]);
    assert!(
        status.contains("role=x") && status.contains("x-out"),
        "{status}"
    );
}

/// One host, no agent, CNI: labels from `args.cni.labels` and the pod's namespace, the table
/// applied by the commands themselves (policy apply, ADD, DEL), over IPv4 and IPv6.
#[test]
fn single_host_cni_without_an_agent() {
    common::need("python3", "python3");
    let lab = common::Lab::new();
    let mut conf = lab.conf(
        &format!("pc{}", lab.tag),
        "10.242.0.0/24",
        Some("fd42::/64"),
    );
    let pods = [
        ("web", "app", "web"),
        ("cli", "role", "client"),
        ("oth", "role", "other"),
    ];
    let mut ns = Vec::new();
    let mut ips = Vec::new();
    let mut servers = Vec::new();
    for (id, k, v) in pods {
        conf["args"] = serde_json::json!({"cni": {"labels": [{"key": k, "value": v}]}});
        let n = common::Ns::new("p");
        let call = lab.cni(
            "ADD",
            &conf,
            &[
                ("CNI_CONTAINERID", id),
                ("CNI_NETNS", &n.path()),
                ("CNI_IFNAME", "eth0"),
                (
                    "CNI_ARGS",
                    &format!("K8S_POD_NAMESPACE=shop;K8S_POD_NAME={id}"),
                ),
            ],
        );
        assert_eq!(call.code, 0, "ADD {id}: {} {}", call.json, call.stderr);
        let addrs: Vec<String> = call.json["ips"]
            .as_array()
            .unwrap()
            .iter()
            .map(|i| {
                i["address"]
                    .as_str()
                    .unwrap()
                    .split('/')
                    .next()
                    .unwrap()
                    .to_string()
            })
            .collect();
        servers.push(serve(&n.name));
        ips.push(addrs);
        ns.push(n);
    }
    let probe = |from: usize| -> Vec<u8> {
        let t = serde_json::json!([
            [ips[0][0], 80, "tcp"],
            [ips[0][1], 80, "tcp"],
            [ips[0][0], 53, "udp"]
        ]);
        let o = Command::new("nsenter")
            .args([&ns[from].enter(), "python3", "-c", PROBE, &t.to_string()])
            .output()
            .expect("probe");
        serde_json::from_slice(&o.stdout).unwrap_or_else(|_| panic!("probe: {}", out(&o)))
    };
    assert_eq!(probe(2), [1, 1, 1], "no policy: open");
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("p.json");
    std::fs::write(
        &f,
        r#"[{"name": "web-in", "selector": "app=web,namespace=shop", "ingress": [{"from": [{"selector": "role=client"}], "ports": ["tcp/80"]}]}]"#,
    )
    .unwrap();
    let o = lab.cli(&["policy", "apply", "-f", f.to_str().unwrap()]);
    assert!(o.status.success(), "{}", out(&o));
    assert_eq!(probe(1), [1, 1, 0], "the client: tcp/80 only");
    assert_eq!(probe(2), [0, 0, 0], "another pod");
    let o = lab.cli(&[
        "policy",
        "test",
        &ips[2][1],
        &format!("[{}]:80/tcp", ips[0][1]),
    ]);
    assert!(
        out(&o).contains("DENY") && out(&o).contains("web-in"),
        "{}",
        out(&o)
    );
    // A pod added later (a second client) is admitted by the ADD itself.
    conf["args"] = serde_json::json!({"labels": {"role": "client"}});
    let n = common::Ns::new("p");
    lab.add(&conf, "cli2", &n, "eth0");
    let t = serde_json::json!([[ips[0][0], 80, "tcp"]]);
    let o = Command::new("nsenter")
        .args([&n.enter(), "python3", "-c", PROBE, &t.to_string()])
        .output()
        .expect("probe");
    assert_eq!(
        String::from_utf8_lossy(&o.stdout).trim(),
        "[1]",
        "{}",
        out(&o)
    );
    let o = lab.cli(&["policy", "rm", "web-in"]);
    assert!(o.status.success(), "{}", out(&o));
    assert_eq!(probe(2), [1, 1, 1], "policy removed: open again");
    let tables = must(&[
        "ip",
        "netns",
        "exec",
        &lab.host.name,
        "nft",
        "list",
        "tables",
    ]);
    assert!(!tables.contains("ferrynet-policy"), "{tables}");
    drop(servers);
    for (i, (id, _, _)) in pods.iter().enumerate() {
        lab.del(&conf, id, Some(&ns[i]), "eth0");
    }
    lab.del(&conf, "cli2", Some(&n), "eth0");
}

/// Hostile probe for the one base chain: an egress allow hands the packet to the destination's
/// ingress policies (`goto ingress`), it never accepts it. A container whose egress policy
/// allows a peer cannot reach it while the peer's ingress denies it (both on one host, so one
/// table decides both sides); without the peer's policy it can (the probe can fail).
#[test]
fn egress_allow_does_not_bypass_ingress() {
    common::need("python3", "python3");
    let lab = common::Lab::new();
    let conf = |labels: serde_json::Value| {
        let mut c = lab.conf(
            &format!("pe{}", lab.tag),
            "10.243.0.0/24",
            Some("fd43::/64"),
        );
        c["args"] = serde_json::json!({ "labels": labels });
        c
    };
    let (nx, ny) = (common::Ns::new("p"), common::Ns::new("p"));
    let cx = conf(serde_json::json!({"role": "x"}));
    let cy = conf(serde_json::json!({"app": "y"}));
    lab.add(&cx, "x", &nx, "eth0");
    let call = lab.add(&cy, "y", &ny, "eth0");
    let ys: Vec<String> = call["ips"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| {
            i["address"]
                .as_str()
                .unwrap()
                .split('/')
                .next()
                .unwrap()
                .to_string()
        })
        .collect();
    let server = serve(&ny.name);
    let probe = || -> Vec<u8> {
        let t = serde_json::json!([[ys[0], 80, "tcp"], [ys[1], 80, "tcp"], [ys[0], 53, "udp"]]);
        let o = Command::new("nsenter")
            .args([&nx.enter(), "python3", "-c", PROBE, &t.to_string()])
            .output()
            .expect("probe");
        serde_json::from_slice(&o.stdout).unwrap_or_else(|_| panic!("probe: {}", out(&o)))
    };
    let apply = |doc: &str| {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("p.yaml");
        std::fs::write(&f, doc).unwrap();
        let o = lab.cli(&["policy", "apply", "-f", f.to_str().unwrap()]);
        assert!(o.status.success(), "{}", out(&o));
    };
    // The server is up once it answers (no policy yet: everything is open).
    common::within(Duration::from_secs(20), || match probe() {
        p if p == [1, 1, 1] => Ok(()),
        p => Err(format!("no policy, server starting: {p:?}")),
    });
    apply("name: x-out\nselector: role=x\negress: [{to: [{selector: app=y}]}]\n---\nname: y-in\nselector: app=y\ningress: []\n");
    assert_eq!(
        probe(),
        [0, 0, 0],
        "x's egress allows y, y's ingress denies x"
    );
    let o = lab.cli(&["policy", "rm", "y-in"]);
    assert!(o.status.success(), "{}", out(&o));
    assert_eq!(
        probe(),
        [1, 1, 1],
        "y's ingress open again: x's egress allows"
    );
    let o = lab.cli(&["policy", "rm", "x-out"]);
    assert!(o.status.success(), "{}", out(&o));
    drop(server);
    lab.del(&cx, "x", Some(&nx), "eth0");
    lab.del(&cy, "y", Some(&ny), "eth0");
}
