//! The VXLAN guard on a real kernel with a real etcd: in 3-host `ferrynet lab`s, a VXLAN frame
//! carrying an inner UDP datagram to a container on h2 is decapsulated and delivered when a
//! registered peer sends it, and dropped (and counted) when an unregistered machine on the
//! underlay, a container on another host or a container on h2 itself sends it. Deleting the guard makes the same probes arrive (so the
//! test cannot pass vacuously), and the agents rebuild it. The peer sets follow hosts that
//! leave and come back; `auto` over two underlay subnets keeps its VXLAN peers talking.

mod common;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::lab::{Container, Lab};
use common::{out, try_within, within, Proc};
use serde_json::Value;

const TABLE: &str = "ferrynet-fabric";
/// The UDP port the inner datagrams are addressed to (a listener in the target container).
const INNER_PORT: u16 = 9999;

impl Lab {
    /// `hosts` hosts with `subnets` underlay subnets, on `backend`, and `extra` flags.
    fn sized(name: &str, hosts: u8, subnets: u8, backend: &str, extra: &[&str]) -> Lab {
        let h = hosts.to_string();
        let s = subnets.to_string();
        let mut args = vec!["--hosts", &h, "--subnets", &s, "--backend", backend];
        args.extend_from_slice(extra);
        Lab::up(name, &args)
    }

    /// `cmd` in namespace `ns`, which must succeed; its stdout.
    fn in_ns(&self, ns: &str, cmd: &[&str]) -> String {
        let o = Command::new("ip")
            .args(["netns", "exec", ns])
            .args(cmd)
            .output()
            .expect("ip netns exec");
        assert!(o.status.success(), "{cmd:?} in {ns}: {}", out(&o));
        String::from_utf8_lossy(&o.stdout).into_owned()
    }
}

/// One TCP round trip from `from` to `addr`:7000 (retried for up to 5 s).
fn echo(from: &Container, addr: &str) -> Result<(), String> {
    let code = format!(
        "import socket\ns=socket.create_connection(('{addr}',7000),timeout=2)\ns.sendall(b'ping')\nassert s.recv(4)==b'ping'\n"
    );
    try_within(Duration::from_secs(5), || {
        let o = Command::new("ip")
            .args(["netns", "exec", &from.netns(), "python3", "-c", &code])
            .output()
            .expect("python3");
        if o.status.success() {
            Ok(())
        } else {
            Err(format!("{} -> {addr}: {}", from.name, out(&o)))
        }
    })
}

fn all_pairs(cs: &[Container]) {
    let mut failures = Vec::new();
    for a in cs {
        for b in cs.iter().filter(|b| b.name != a.name) {
            for addr in [&b.v4, &b.v6] {
                if let Err(e) = echo(a, addr) {
                    failures.push(e);
                }
            }
        }
    }
    assert!(failures.is_empty(), "unreachable:\n{}", failures.join("\n"));
}

fn three_containers(lab: &mut Lab) -> Vec<Container> {
    ["h1", "h2", "h3"]
        .iter()
        .enumerate()
        .map(|(i, h)| lab.container(h, &format!("c{}", i + 1)))
        .collect()
}

/// The `nft -j` listing `what` (e.g. `["set", "vtep_peers4"]`) of the guard table in `ns`;
/// None when it is not there.
fn guard_listing(ns: &str, what: &[&str]) -> Option<Value> {
    let mut args = vec!["netns", "exec", ns, "nft", "-j", "list"];
    args.push(what[0]);
    args.extend_from_slice(&["inet", TABLE]);
    args.extend_from_slice(&what[1..]);
    let o = Command::new("ip").args(&args).output().expect("nft");
    o.status
        .success()
        .then(|| serde_json::from_slice(&o.stdout).ok())
        .flatten()
}

/// The peer addresses in the guard's set `set` on host namespace `ns` (empty: no table).
fn peers(ns: &str, set: &str) -> Vec<String> {
    guard_listing(ns, &["set", set])
        .and_then(|v| {
            v["nftables"]
                .as_array()?
                .iter()
                .find_map(|x| x.get("set"))?
                .get("elem")?
                .as_array()
                .cloned()
        })
        .unwrap_or_default()
        .iter()
        .filter_map(|e| e.as_str().map(str::to_string))
        .collect()
}

/// Packets counted by the guard's named counter `name` on host namespace `ns`.
fn counter(ns: &str, name: &str) -> u64 {
    guard_listing(ns, &["counter", name])
        .and_then(|v| {
            v["nftables"]
                .as_array()?
                .iter()
                .find_map(|x| x.get("counter"))?
                .get("packets")?
                .as_u64()
        })
        .unwrap_or(0)
}

/// The guard is programmed whole on `ns` (after a deletion: rebuilt by the agent).
fn guard_complete(ns: &str) -> Result<(), String> {
    match guard_listing(ns, &["table"]) {
        Some(v) if v.to_string().contains("from_strangers") => Ok(()),
        other => Err(format!("no complete table inet {TABLE} on {ns}: {other:?}")),
    }
}

/// Builds a VXLAN frame: VXLAN header, inner Ethernet to the receiving VTEP's MAC, inner IPv4
/// or IPv6 with a UDP datagram (checksums computed), sent three times to `outer_dst`:4789.
const SENDER: &str = r#"
import socket,struct,sys
outer,vni,mac,src,dst,dport,payload=sys.argv[1],int(sys.argv[2]),sys.argv[3],sys.argv[4],sys.argv[5],int(sys.argv[6]),sys.argv[7].encode()
def csum(b):
    if len(b)%2: b+=b'\0'
    s=sum(struct.unpack('!%dH'%(len(b)//2),b))
    while s>>16: s=(s&0xffff)+(s>>16)
    return (~s)&0xffff
ulen=8+len(payload)
if ':' in dst:
    s6=socket.inet_pton(socket.AF_INET6,src); d6=socket.inet_pton(socket.AF_INET6,dst)
    u=struct.pack('!HHHH',40000,dport,ulen,0)+payload
    c=csum(s6+d6+struct.pack('!IxxxB',ulen,17)+u) or 0xffff
    u=struct.pack('!HHHH',40000,dport,ulen,c)+payload
    ip=struct.pack('!IHBB',6<<28,ulen,17,64)+s6+d6+u
    et=0x86dd
else:
    h=struct.pack('!BBHHHBBH4s4s',0x45,0,20+ulen,1,0,64,17,0,socket.inet_aton(src),socket.inet_aton(dst))
    h=h[:10]+struct.pack('!H',csum(h))+h[12:]
    ip=h+struct.pack('!HHHH',40000,dport,ulen,0)+payload
    et=0x0800
eth=bytes.fromhex(mac.replace(':',''))+bytes.fromhex('02000000beef')+struct.pack('!H',et)
frame=struct.pack('!II',0x08000000,vni<<8)+eth+ip
s=socket.socket(socket.AF_INET6 if ':' in outer else socket.AF_INET,socket.SOCK_DGRAM)
for _ in range(3): s.sendto(frame,(outer,4789))
"#;

/// Prints every datagram received on INNER_PORT (IPv4 and IPv6), one per line.
const LISTENER: &str = "import socket,sys\n\
    s=socket.socket(socket.AF_INET6,socket.SOCK_DGRAM)\n\
    s.setsockopt(socket.IPPROTO_IPV6,socket.IPV6_V6ONLY,0);s.bind(('::',9999))\n\
    while True:\n  d,_=s.recvfrom(2048);sys.stdout.write(d.decode(errors='replace')+'\\n');sys.stdout.flush()\n";

/// An injected frame: VNI, the receiving VTEP's MAC, inner source and destination.
struct Frame {
    vni: u32,
    mac: String,
    src: String,
    dst: String,
}

/// Send `f` with `payload` from namespace `ns` to `outer`:4789.
fn inject(ns: &str, outer: &str, f: &Frame, payload: &str) {
    let o = Command::new("ip")
        .args(["netns", "exec", ns, "python3", "-c", SENDER, outer])
        .args([&f.vni.to_string(), &f.mac, &f.src, &f.dst])
        .args([&INNER_PORT.to_string(), payload])
        .output()
        .expect("python3");
    assert!(o.status.success(), "injecting from {ns}: {}", out(&o));
}

/// What the listener received so far.
fn received(file: &std::path::Path) -> String {
    std::fs::read_to_string(file).unwrap_or_default()
}

/// Wait until `payload` arrived at the listener.
fn arrives(file: &std::path::Path, payload: &str) {
    within(Duration::from_secs(10), || {
        let got = received(file);
        if got.lines().any(|l| l == payload) {
            Ok(())
        } else {
            Err(format!("{payload} never arrived; got {got:?}"))
        }
    });
}

/// `payload` sent from `ns` does not arrive: a marker sent afterwards by the registered peer
/// h1 (same path on h2) arrives, and the probe is still absent.
fn dropped(lab: &Lab, file: &std::path::Path, ns: &str, outer: &str, f: &Frame, payload: &str) {
    inject(ns, outer, f, payload);
    let marker = format!("{payload}-marker");
    inject(&lab.host_ns("h1"), outer, f, &marker);
    arrives(file, &marker);
    assert!(
        !received(file).lines().any(|l| l == payload),
        "{payload} from {ns} reached the container"
    );
}

#[test]
fn vxlan_port_accepts_only_registered_peers() {
    let mut lab = Lab::sized("fgvx", 3, 1, "vxlan", &[]);
    let cs = three_containers(&mut lab);
    all_pairs(&cs);
    let (h1, h2) = (lab.host_ns("h1"), lab.host_ns("h2"));
    let outer = "172.31.0.2";

    // A listener in c2 writing what it receives to a file.
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("received");
    let log = std::fs::File::create(&file).expect("file");
    let child = Command::new("ip")
        .args([
            "netns",
            "exec",
            &cs[1].netns(),
            "python3",
            "-u",
            "-c",
            LISTENER,
        ])
        .stdout(log)
        .stderr(Stdio::null())
        .spawn()
        .expect("listener");
    lab.procs.push(Proc(child));

    // An unregistered machine on the underlay.
    let rogue = "fgvx-rogue";
    lab.add_netns(rogue);
    let ul = format!("{}-ul", lab.name);
    lab.in_ns(
        &ul,
        &[
            "ip", "link", "add", "rogue", "type", "veth", "peer", "name", "eth0", "netns", rogue,
        ],
    );
    lab.in_ns(&ul, &["ip", "link", "set", "rogue", "master", "ul0", "up"]);
    lab.in_ns(
        rogue,
        &["ip", "addr", "add", "172.31.0.99/24", "dev", "eth0"],
    );
    lab.in_ns(rogue, &["ip", "link", "set", "eth0", "up"]);

    let st = lab.status("h2");
    let vni = st["networks"][0]["vni"].as_u64().expect("vni") as u32;
    let links: Value =
        serde_json::from_str(&lab.in_ns(&h2, &["ip", "-j", "link", "show", "type", "vxlan"]))
            .expect("ip -j");
    let mac = links[0]["address"].as_str().expect("vxlan mac").to_string();
    let frames = [
        Frame {
            vni,
            mac: mac.clone(),
            src: cs[0].v4.clone(),
            dst: cs[1].v4.clone(),
        },
        Frame {
            vni,
            mac,
            src: cs[0].v6.clone(),
            dst: cs[1].v6.clone(),
        },
    ];

    let strangers = counter(&h2, "from_strangers");
    let containers = counter(&h1, "from_containers");
    for (i, f) in frames.iter().enumerate() {
        // A registered peer's frame is decapsulated and delivered: the probe works.
        inject(&h1, outer, f, &format!("peer{i}"));
        arrives(&file, &format!("peer{i}"));
        // (a) an unregistered machine on the underlay, (b) a container on h1 (its frame would
        // leave h1 masqueraded to h1's registered address).
        dropped(&lab, &file, rogue, outer, f, &format!("rogue{i}"));
        dropped(
            &lab,
            &file,
            &cs[0].netns(),
            outer,
            f,
            &format!("container{i}"),
        );
        // (c) a container on h2 to its own host.
        let local = format!("local{i}");
        dropped(&lab, &file, &cs[1].netns(), outer, f, &local);
    }
    assert!(
        counter(&h2, "from_strangers") >= strangers + 6,
        "h2 counted the rogue frames"
    );
    assert!(
        counter(&h1, "from_containers") >= containers + 6,
        "h1 counted c1's frames"
    );
    assert!(
        counter(&h2, "from_containers") >= 6,
        "h2 counted c2's frames"
    );

    // Without the guard the same probes arrive, so the test above cannot pass vacuously.
    for ns in [&h1, &h2] {
        lab.in_ns(ns, &["nft", "delete", "table", "inet", TABLE]);
    }
    inject(rogue, outer, &frames[0], "rogue-open");
    arrives(&file, "rogue-open");
    inject(&cs[0].netns(), outer, &frames[0], "container-open");
    arrives(&file, "container-open");
    inject(&cs[1].netns(), outer, &frames[0], "local-open");
    arrives(&file, "local-open");

    // The agents' periodic reconcile rebuilds the table; a flushed chain is repaired too.
    for ns in [&h1, &h2] {
        within(Duration::from_secs(90), || guard_complete(ns));
    }
    lab.in_ns(&h2, &["nft", "flush", "chain", "inet", TABLE, "input"]);
    let t0 = Instant::now();
    within(Duration::from_secs(90), || {
        let v = guard_listing(&h2, &["chain", "input"]).unwrap_or(Value::Null);
        if v.to_string().contains("from_strangers") {
            Ok(())
        } else {
            Err(format!("input chain not repaired after {:?}", t0.elapsed()))
        }
    });
    // `ferrynet status` reports the guard: its peers (h1 and h3, both families) and builds
    // (the first, after the deletion, after the flush).
    within(Duration::from_secs(60), || {
        let g = lab.status("h2")["vxlanGuard"].clone();
        if g["peers"] == 4 && g["rebuilds"].as_u64() >= Some(3) {
            Ok(())
        } else {
            Err(format!("status vxlanGuard on h2: {g}"))
        }
    });
    dropped(&lab, &file, rogue, outer, &frames[0], "rogue-again");
    dropped(
        &lab,
        &file,
        &cs[0].netns(),
        outer,
        &frames[1],
        "container-again",
    );
    dropped(
        &lab,
        &file,
        &cs[1].netns(),
        outer,
        &frames[1],
        "local-again",
    );
}

#[test]
fn peer_set_follows_hosts_leaving_and_joining() {
    let lab = Lab::sized(
        "fgpeer",
        3,
        1,
        "vxlan",
        &["--grace", "3s", "--lease-ttl", "2s"],
    );
    let h1 = lab.host_ns("h1");
    let has = |set: &str, addr: &str| peers(&h1, set).iter().any(|a| a == addr);
    within(Duration::from_secs(30), || {
        let (v4, v6) = (peers(&h1, "vtep_peers4"), peers(&h1, "vtep_peers6"));
        if v4 == ["172.31.0.2", "172.31.0.3"] && v6 == ["fd31::2", "fd31::3"] {
            Ok(())
        } else {
            Err(format!("h1's peers: {v4:?} {v6:?}"))
        }
    });
    // h3 goes away: after its lease and grace period it is no longer a peer.
    lab.lab(&["stop-agent", "h3", "--kill"]);
    within(Duration::from_secs(60), || {
        if has("vtep_peers4", "172.31.0.3") || has("vtep_peers6", "fd31::3") {
            Err(format!("h3 still a peer: {:?}", peers(&h1, "vtep_peers4")))
        } else {
            Ok(())
        }
    });
    assert!(has("vtep_peers4", "172.31.0.2"), "h2 stays a peer");
    // It registers again: a peer again.
    lab.lab(&["start-agent", "h3"]);
    within(Duration::from_secs(60), || {
        if has("vtep_peers4", "172.31.0.3") && has("vtep_peers6", "fd31::3") {
            Ok(())
        } else {
            Err(format!("h3 not back: {:?}", peers(&h1, "vtep_peers4")))
        }
    });
}

#[test]
fn auto_over_two_subnets_keeps_vxlan_peers_talking() {
    let mut lab = Lab::sized("fgauto", 3, 2, "auto", &[]);
    let cs = three_containers(&mut lab);
    all_pairs(&cs);
    let h1 = lab.host_ns("h1");
    let st = lab.status("h1");
    let backend = st["networks"][0]["peers"]
        .as_array()
        .and_then(|p| p.iter().find(|p| p["host"] == "h2"))
        .map(|p| p["backend"].clone());
    assert_eq!(backend, Some(Value::from("vxlan")), "{st}");
    // h2 (the other subnet) and h3 (same link) are both admitted.
    assert_eq!(peers(&h1, "vtep_peers4"), ["172.31.0.3", "172.31.1.2"]);
    guard_complete(&h1).expect("guard on h1");
}
