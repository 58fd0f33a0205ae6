//! Anti-spoofing on container ports: a container sends only from its own MAC and addresses;
//! forged sources, gratuitous ARP and neighbour advertisements for others' addresses, router
//! advertisements, redirects and DHCP server replies are dropped at its host-side veth and
//! counted, while honest traffic keeps flowing. Hostile frames are made with python3 raw
//! sockets inside the container namespaces; every receiver checks what reached it after an
//! honest marker sent behind the hostile frames has arrived (no timing assumptions).

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::docker_rig::DockerRig;
use common::lab::Lab as Cluster;
use common::*;
use serde_json::Value;

/// A receiver in a namespace: UDP on `port` (both families), the DHCP client ports 68 and
/// 546, and every router advertisement, neighbour solicitation and advertisement and redirect
/// (raw ICMPv6). Each arrival is one line: `udp <source> <payload>` or
/// `icmp6 <type> <source> <ND target>`.
struct Recorder {
    lines: Arc<Mutex<Vec<String>>>,
    _proc: Proc,
}

const RECORDER: &str = r#"
import socket,select,sys
port=int(sys.argv[1])
u=socket.socket(socket.AF_INET6,socket.SOCK_DGRAM)
u.setsockopt(socket.IPPROTO_IPV6,socket.IPV6_V6ONLY,0);u.bind(('::',port))
d4=socket.socket(socket.AF_INET,socket.SOCK_DGRAM);d4.setsockopt(socket.SOL_SOCKET,socket.SO_BROADCAST,1);d4.bind(('0.0.0.0',68))
d6=socket.socket(socket.AF_INET6,socket.SOCK_DGRAM);d6.setsockopt(socket.IPPROTO_IPV6,socket.IPV6_V6ONLY,1);d6.bind(('::',546))
r=socket.socket(socket.AF_INET6,socket.SOCK_RAW,socket.IPPROTO_ICMPV6)
print('ready',flush=True)
while True:
  rd,_,_=select.select([u,d4,d6,r],[],[])
  for s in rd:
    data,a=s.recvfrom(4096)
    src=a[0][7:] if a[0].startswith('::ffff:') else a[0]
    if s is r:
      if data[0] in (134,135,136,137):
        t=socket.inet_ntop(socket.AF_INET6,data[8:24]) if len(data)>=24 else '-'
        print('icmp6',data[0],src,t,flush=True)
    else:
      print('udp',src,data.decode(errors='replace'),flush=True)
"#;

impl Recorder {
    fn start(netns: &str, port: u16) -> Recorder {
        let mut child = Command::new("ip")
            .args(["netns", "exec", netns, "python3", "-u", "-c", RECORDER])
            .arg(port.to_string())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("start recorder");
        let mut out = BufReader::new(child.stdout.take().expect("stdout"));
        let mut first = String::new();
        out.read_line(&mut first).expect("recorder output");
        assert_eq!(first.trim(), "ready", "recorder did not start");
        let lines = Arc::new(Mutex::new(Vec::new()));
        let sink = lines.clone();
        std::thread::spawn(move || {
            for l in out.lines().map_while(Result::ok) {
                sink.lock().expect("lines").push(l);
            }
        });
        Recorder {
            lines,
            _proc: Proc(child),
        }
    }

    fn lines(&self) -> Vec<String> {
        self.lines.lock().expect("lines").clone()
    }

    /// Wait until a line containing `needle` has arrived.
    fn wait_for(&self, needle: &str) {
        self.wait_until(needle, |l| l.contains(needle));
    }

    /// Wait until a line satisfying `pred` has arrived (`what` names it in the failure).
    fn wait_until(&self, what: &str, pred: impl Fn(&str) -> bool) {
        within(Duration::from_secs(10), || {
            let l = self.lines();
            l.iter()
                .any(|x| pred(x))
                .then_some(())
                .ok_or_else(|| format!("{what} never arrived; got {l:?}"))
        })
    }

    /// The lines containing `needle`.
    fn with(&self, needle: &str) -> Vec<String> {
        self.lines()
            .into_iter()
            .filter(|l| l.contains(needle))
            .collect()
    }
}

fn py(netns: &str, code: &str, args: &[&str]) -> std::process::Output {
    let mut v = vec!["ip", "netns", "exec", netns, "python3", "-c", code];
    v.extend_from_slice(args);
    sh(&v)
}

/// One UDP datagram from `src`:`sport` to `dst`:`port` (IP_TRANSPARENT, so any source can be
/// bound without adding it to an interface). Sending must succeed locally.
fn udp(netns: &str, src: &str, sport: u16, dst: &str, port: u16, payload: &str) {
    const CODE: &str = r#"
import socket,sys
src,sport,dst,port,payload=sys.argv[1],int(sys.argv[2]),sys.argv[3],int(sys.argv[4]),sys.argv[5]
fam=socket.AF_INET6 if ':' in dst else socket.AF_INET
s=socket.socket(fam,socket.SOCK_DGRAM)
if fam==socket.AF_INET: s.setsockopt(socket.SOL_IP,19,1)
else: s.setsockopt(socket.IPPROTO_IPV6,75,1)
s.setsockopt(socket.SOL_SOCKET,socket.SO_BROADCAST,1)
s.bind((src,sport))
s.sendto(payload.encode(),(dst,port))
"#;
    let o = py(
        netns,
        CODE,
        &[src, &sport.to_string(), dst, &port.to_string(), payload],
    );
    assert!(o.status.success(), "udp {src} -> {dst}: {}", out(&o));
}

/// Gratuitous ARP requests from `eth0` with its own MAC claiming each of `ips`.
fn garp(netns: &str, ips: &[&str]) {
    const CODE: &str = r#"
import socket,struct,sys
mac=bytes.fromhex(open('/sys/class/net/eth0/address').read().strip().replace(':',''))
s=socket.socket(socket.AF_PACKET,socket.SOCK_RAW);s.bind(('eth0',0))
for ip in sys.argv[1:]:
  a=socket.inet_aton(ip)
  for op in (1,2):
    arp=struct.pack('!HHBBH',1,0x0800,6,4,op)+mac+a+(b'\xff'*6 if op==2 else b'\0'*6)+a
    s.send(b'\xff'*6+mac+b'\x08\x06'+arp)
"#;
    let o = py(netns, CODE, ips);
    assert!(o.status.success(), "garp: {}", out(&o));
}

/// ICMPv6 from `netns` to `dst` (hop limit 255, the kernel fills the checksum): `kind` is
/// `na <target>` (unsolicited, override, with eth0's MAC as target link-layer address), `ra`
/// (default router with a prefix) or `redirect <target>`.
fn icmp6(netns: &str, dst: &str, kind: &str, target: &str) {
    const CODE: &str = r#"
import socket,struct,sys
dst,kind,target=sys.argv[1],sys.argv[2],sys.argv[3]
mac=bytes.fromhex(open('/sys/class/net/eth0/address').read().strip().replace(':',''))
s=socket.socket(socket.AF_INET6,socket.SOCK_RAW,socket.IPPROTO_ICMPV6)
s.setsockopt(socket.IPPROTO_IPV6,socket.IPV6_MULTICAST_HOPS,255)
s.setsockopt(socket.IPPROTO_IPV6,socket.IPV6_UNICAST_HOPS,255)
s.setsockopt(socket.SOL_SOCKET,socket.SO_BINDTODEVICE,b'eth0')
t=socket.inet_pton(socket.AF_INET6,target)
if kind=='na':
  m=struct.pack('!BBHI',136,0,0,0x20000000)+t+bytes([2,1])+mac
elif kind=='ra':
  pfx=struct.pack('!BBBBIII',3,4,64,0xc0,3600,1800,0)+socket.inet_pton(socket.AF_INET6,'fd99::')
  m=struct.pack('!BBHBBHII',134,0,0,64,0,1800,0,0)+bytes([1,1])+mac+pfx
else:
  m=struct.pack('!BBHI',137,0,0,0)+t+socket.inet_pton(socket.AF_INET6,'fd31::99')
s.sendto(m,(dst,0,0,socket.if_nametoindex('eth0')))
"#;
    let o = py(netns, CODE, &[dst, kind, target]);
    assert!(o.status.success(), "icmp6 {kind}: {}", out(&o));
}

/// A duplicate address detection probe (NS from `::`) for `target`, sent to all nodes as a
/// whole frame from `eth0`, so the unspecified source is kept.
fn dad_probe(netns: &str, target: &str) {
    const CODE: &str = r#"
import socket,struct,sys
def csum(b):
  s=sum(struct.unpack('!%dH'%(len(b)//2),b))
  while s>>16: s=(s&0xffff)+(s>>16)
  return ~s&0xffff
mac=bytes.fromhex(open('/sys/class/net/eth0/address').read().strip().replace(':',''))
t=socket.inet_pton(socket.AF_INET6,sys.argv[1])
src=bytes(16);dst=socket.inet_pton(socket.AF_INET6,'ff02::1')
icmp=struct.pack('!BBHI',135,0,0,0)+t
c=csum(src+dst+struct.pack('!I',len(icmp))+bytes([0,0,0,58])+icmp)
icmp=icmp[:2]+struct.pack('!H',c)+icmp[4:]
ip6=struct.pack('!IHBB',0x60000000,len(icmp),58,255)+src+dst
s=socket.socket(socket.AF_PACKET,socket.SOCK_RAW);s.bind(('eth0',0))
s.send(b'\x33\x33\x00\x00\x00\x01'+mac+b'\x86\xdd'+ip6+icmp)
"#;
    let o = py(netns, CODE, &[target]);
    assert!(o.status.success(), "dad probe: {}", out(&o));
}

/// TCP from `src` (which must be an address of `netns`) to `dst`:`port`; the reply or None.
fn tcp_from(netns: &str, src: &str, dst: &str, port: u16) -> Option<String> {
    let code = format!(
        "import socket\ns=socket.create_connection(('{dst}',{port}),timeout=3,source_address=('{src}',0))\nprint(s.recv(200).decode().strip())"
    );
    let o = py(netns, &code, &[]);
    o.status
        .success()
        .then(|| String::from_utf8_lossy(&o.stdout).trim().to_string())
}

/// One TCP SYN from `src` (any address: a raw IPv4 socket writes the header) to `dst`:`port`.
fn tcp_syn(netns: &str, src: &str, dst: &str, port: u16) {
    const CODE: &str = r#"
import socket,struct,sys
src,dst,port=sys.argv[1],sys.argv[2],int(sys.argv[3])
ip=struct.pack('!BBHHHBBH4s4s',0x45,0,40,1,0,64,6,0,socket.inet_aton(src),socket.inet_aton(dst))
tcp=struct.pack('!HHLLBBHHH',40000,port,1,0,5<<4,2,65535,0,0)
s=socket.socket(socket.AF_INET,socket.SOCK_RAW,socket.IPPROTO_RAW)
s.sendto(ip+tcp,(dst,0))
"#;
    let o = py(netns, CODE, &[src, dst, &port.to_string()]);
    assert!(o.status.success(), "tcp syn {src} -> {dst}: {}", out(&o));
}

/// TCP segments to port 5001 that reached `c` (a counter of the test's own in c's namespace).
fn syns(c: &Ns) -> u64 {
    let l = c.must(&["nft", "list", "chain", "inet", "fnt_syns", "in"]);
    l.split_whitespace()
        .skip_while(|w| *w != "packets")
        .nth(1)
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

/// TCP takes the guard's fast path (one lookup of port, MAC and address before the protocol
/// checks): a SYN from an address `a` was not given (unallocated, its neighbour's) or from a
/// forged MAC must still never reach `c`; an honest one does, so the count is not blind.
fn forged_tcp_never_arrives(a: &Ns, c: &Ns, a4: &str, b4: &str, c4: &str, a_mac: &str) {
    c.must(&["nft", "add", "table", "inet", "fnt_syns"]);
    c.must(&[
        "nft",
        "add",
        "chain",
        "inet",
        "fnt_syns",
        "in",
        "{ type filter hook prerouting priority -400; }",
    ]);
    c.must(&[
        "nft", "add", "rule", "inet", "fnt_syns", "in", "tcp", "dport", "5001", "counter",
    ]);
    tcp_syn(&a.name, "10.231.0.71", c4, 5001);
    tcp_syn(&a.name, b4, c4, 5001);
    a.must(&["ip", "link", "set", "eth0", "address", "02:00:00:00:00:98"]);
    tcp_syn(&a.name, a4, c4, 5001);
    a.must(&["ip", "link", "set", "eth0", "address", a_mac]);
    tcp_syn(&a.name, a4, c4, 5001);
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while syns(c) == 0 && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(syns(c), 1, "only the honest SYN may reach c");
}

fn ping(netns: &str, dst: &str) -> bool {
    sh(&["ip", "netns", "exec", netns, "ping", "-c1", "-W2", dst])
        .status
        .success()
}

fn mac_of(netns: &str, ifname: &str) -> String {
    let o = sh(&["ip", "-n", netns, "-j", "link", "show", "dev", ifname]);
    let v: Value = serde_json::from_slice(&o.stdout).unwrap_or(Value::Null);
    v[0]["address"].as_str().unwrap_or_default().to_string()
}

/// The link-layer address `netns` has for `ip` ("" when none).
fn neigh(netns: &str, ip: &str) -> String {
    let o = sh(&["ip", "-n", netns, "-j", "neigh", "show", ip]);
    let v: Value = serde_json::from_slice(&o.stdout).unwrap_or(Value::Null);
    v[0]["lladdr"].as_str().unwrap_or_default().to_string()
}

/// An ADD result's addresses (IPv4, IPv6), without prefix.
fn ips(res: &Value) -> (String, String) {
    let all: Vec<String> = res["ips"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|i| i["address"].as_str()?.split('/').next().map(str::to_string))
        .collect();
    let v4 = all
        .iter()
        .find(|a| !a.contains(':'))
        .cloned()
        .unwrap_or_default();
    let v6 = all
        .iter()
        .find(|a| a.contains(':'))
        .cloned()
        .unwrap_or_default();
    (v4, v6)
}

#[test]
fn a_container_sends_only_as_itself() {
    need("python3", "python3");
    let lab = Lab::new();
    let net = format!("sp{}", lab.tag);
    let conf = lab.conf(&net, "10.231.0.0/24", Some("fd31::/64"));
    let other = lab.conf(&format!("so{}", lab.tag), "10.232.0.0/24", None);
    let (a, b, c, d) = (Ns::new("c"), Ns::new("c"), Ns::new("c"), Ns::new("c"));
    let (a4, a6) = ips(&lab.add(&conf, "a", &a, "eth0"));
    let (b4, b6) = ips(&lab.add(&conf, "b", &b, "eth0"));
    let (c4, c6) = ips(&lab.add(&conf, "c", &c, "eth0"));
    let (d4, _) = ips(&lab.add(&other, "d", &d, "eth0"));
    let (gw4, gw6) = ("10.231.0.1", "fd31::1");
    let host = lab.host.name.clone();
    let a_mac = mac_of(&a.name, "eth0");

    // Honest traffic over both families, and neighbour entries the forgeries would overwrite.
    let _srv = tcp_server(&b, 80, "b");
    for dst in [&b4, &b6] {
        assert_eq!(
            tcp_get(&a, dst, 80).as_deref(),
            Some(format!("b {}", if dst.contains(':') { &a6 } else { &a4 }).as_str()),
            "honest TCP a -> {dst}"
        );
    }
    for (from, dst) in [
        (&a, &b4),
        (&a, &b6),
        (&c, &gw4.to_string()),
        (&c, &gw6.to_string()),
    ] {
        assert!(ping(&from.name, dst), "ping {} -> {dst}", from.name);
    }
    assert!(ping(&host, &b4), "host -> b");
    let (gw_mac, b_mac) = (neigh(&c.name, gw4), neigh(&host, &b4));
    assert!(!gw_mac.is_empty() && !b_mac.is_empty() && gw_mac != a_mac && b_mac != a_mac);
    assert!(!neigh(&c.name, gw6).is_empty(), "c knows the IPv6 gateway");

    let rec = Recorder::start(&c.name, 5000);

    // A source it was not given, even one it added to its own interface: no TCP handshake.
    a.must(&["ip", "addr", "add", "10.231.0.70/32", "dev", "eth0"]);
    assert_eq!(tcp_from(&a.name, "10.231.0.70", &b4, 80), None);
    // Forged sources: unallocated, b's, another network's, in both families.
    for src in [
        "10.231.0.71",
        b4.as_str(),
        d4.as_str(),
        "fd31::70",
        b6.as_str(),
    ] {
        let dst = if src.contains(':') { &c6 } else { &c4 };
        udp(&a.name, src, 0, dst, 5000, &format!("forged-{src}"));
    }
    // A forged MAC with its own address.
    a.must(&["ip", "link", "set", "eth0", "address", "02:00:00:00:00:99"]);
    udp(&a.name, &a4, 0, &c4, 5000, "forged-mac");
    a.must(&["ip", "link", "set", "eth0", "address", &a_mac]);
    forged_tcp_never_arrives(&a, &c, &a4, &b4, &c4, &a_mac);
    // Gratuitous ARP for the gateway and for b; an NA for the gateway; an RA; a redirect.
    garp(&a.name, &[gw4, &b4]);
    // Checked right away: a later ARP from the host would repair a poisoned entry.
    udp(&a.name, &a4, 0, &c4, 5000, "honest-after-garp");
    rec.wait_for("honest-after-garp");
    assert_eq!(neigh(&c.name, gw4), gw_mac, "c's entry for the gateway");
    assert_eq!(neigh(&host, &b4), b_mac, "the host's entry for b");
    icmp6(&a.name, "ff02::1", "na", gw6);
    icmp6(&a.name, "ff02::1", "ra", "::");
    icmp6(&a.name, &c6, "redirect", "fd31::98");
    // Duplicate address detection for b's address (a denial of b's address).
    dad_probe(&a.name, &b6);
    // DHCP and DHCPv6 server replies from its own addresses.
    udp(&a.name, &a4, 67, "255.255.255.255", 68, "forged-dhcp-offer");
    udp(&a.name, &a6, 547, &c6, 546, "forged-dhcp6-reply");

    // Honest frames of the same kinds, sent behind the forgeries: they arrive.
    icmp6(&a.name, "ff02::1", "na", &a6);
    dad_probe(&a.name, &a6);
    udp(
        &a.name,
        &a4,
        1067,
        "255.255.255.255",
        68,
        "honest-broadcast",
    );
    udp(&a.name, &a6, 1547, &c6, 546, "honest6-546");
    udp(&a.name, &a4, 0, &c4, 5000, "honest4");
    udp(&a.name, &a6, 0, &c6, 5000, "honest6");
    for m in ["honest4", "honest6", "honest-broadcast", "honest6-546"] {
        rec.wait_for(m);
    }
    let own_na = |l: &str| l.starts_with("icmp6 136 ") && l.ends_with(&format!(" {a6}"));
    rec.wait_until("a's NA for its own address", own_na);
    rec.wait_for(&format!("icmp6 135 :: {a6}"));
    assert_eq!(
        rec.with(&format!("icmp6 135 :: {b6}")),
        Vec::<String>::new(),
        "DAD probe for b's address"
    );
    assert_eq!(
        rec.with("forged"),
        Vec::<String>::new(),
        "forged datagrams reached c"
    );
    let forged_icmp6: Vec<String> = rec
        .with("icmp6 ")
        .into_iter()
        .filter(|l| {
            l.starts_with("icmp6 134 ")
                || l.starts_with("icmp6 137 ")
                || (l.starts_with("icmp6 136 ") && l.ends_with(&format!(" {gw6}")))
        })
        .collect();
    assert!(
        forged_icmp6.is_empty(),
        "RA, redirect or NA for the gateway reached c: {forged_icmp6:?}"
    );
    assert_ne!(neigh(&c.name, gw6), a_mac, "c's entry for the IPv6 gateway");
    assert!(
        sh(&["ip", "-n", &c.name, "-6", "route", "show", "proto", "ra"])
            .stdout
            .is_empty(),
        "c took a route from a's RA"
    );

    let n = lab.guard_counters();
    for reason in [
        "mac_spoof",
        "ip4_spoof",
        "ip6_spoof",
        "arp_spoof",
        "na_spoof",
        "router_advert",
        "icmp6_redirect",
        "dhcp_server",
        "dhcp6_server",
    ] {
        assert!(
            n.get(reason).copied().unwrap_or(0) > 0,
            "{reason} not counted: {n:?}"
        );
    }

    // Still honest after all that, over both families.
    for dst in [&b4, &b6] {
        assert!(
            tcp_get(&a, dst, 80).is_some(),
            "TCP a -> {dst} after the probes"
        );
    }

    // `ferrynet reload` rebuilds the guard after a flush: honest passes, forged does not.
    must(&[
        "ip", "netns", "exec", &host, "nft", "delete", "table", "bridge", "ferrynet",
    ]);
    let o = lab.cli(&["reload"]);
    assert!(o.status.success(), "reload: {}", out(&o));
    udp(&a.name, "10.231.0.72", 0, &c4, 5000, "forged-after-reload");
    udp(&a.name, &a4, 0, &c4, 5000, "honest-after-reload");
    rec.wait_for("honest-after-reload");
    assert_eq!(rec.with("forged"), Vec::<String>::new());

    // DEL takes a's elements away; b keeps its own.
    assert_eq!(lab.del(&conf, "a", Some(&a), "eth0").code, 0);
    let macs = must(&[
        "ip", "netns", "exec", &host, "nft", "list", "set", "bridge", "ferrynet", "macs",
    ]);
    assert!(!macs.contains(&a_mac), "a's MAC left in the guard: {macs}");
    assert!(
        macs.contains(&mac_of(&b.name, "eth0")),
        "b's MAC gone: {macs}"
    );
}

/// A port named like a container port but without elements (an attach not finished, a link
/// someone else made) drops everything: the guard is default deny.
#[test]
fn a_port_without_elements_passes_nothing() {
    need("python3", "python3");
    let lab = Lab::new();
    let conf = lab.conf(&format!("sd{}", lab.tag), "10.233.0.0/24", None);
    let c = Ns::new("c");
    let (c4, _) = ips(&lab.add(&conf, "c", &c, "eth0"));
    let rec = Recorder::start(&c.name, 5000);
    let rogue = Ns::new("c");
    let port = format!("fnv{}", tag());
    let bridge = lab.host_links("fn-").pop().expect("the network's bridge");
    lab.host.must(&[
        "ip",
        "link",
        "add",
        &port,
        "type",
        "veth",
        "peer",
        "name",
        "eth0",
        "netns",
        &rogue.name,
    ]);
    lab.host
        .must(&["ip", "link", "set", &port, "master", &bridge, "up"]);
    rogue.must(&["ip", "addr", "add", "10.233.0.200/24", "dev", "eth0"]);
    rogue.must(&["ip", "link", "set", "eth0", "up"]);
    udp(&rogue.name, "10.233.0.200", 0, &c4, 5000, "from-rogue");
    // An honest neighbour's datagram, sent after the rogue's, arrives.
    let c2 = Ns::new("c");
    lab.add(&conf, "c2", &c2, "eth0");
    udp(&c2.name, "0.0.0.0", 0, &c4, 5000, "honest-c2");
    rec.wait_for("honest-c2");
    assert_eq!(rec.with("from-rogue"), Vec::<String>::new());
    assert!(
        !ping(&rogue.name, "10.233.0.1"),
        "rogue port reached the gateway"
    );
    assert!(lab.guard_counters()["mac_spoof"] > 0);
    lab.host.must(&["ip", "link", "del", &port]);
}

/// The IPv4 default gateway of network namespace `netns`.
fn default_gateway(netns: &str) -> String {
    let o = Command::new("ip")
        .args(["-n", netns, "-j", "-4", "route", "show", "default"])
        .output()
        .expect("ip route");
    let v: Value = serde_json::from_slice(&o.stdout).expect("ip -j route");
    v[0]["gateway"]
        .as_str()
        .unwrap_or_else(|| panic!("no default gateway in {netns}: {v}"))
        .to_string()
}

/// Across hosts on `backend`'s fabric: a forged source from h1's container never reaches h2's
/// container (the frame is dropped at h1's port, before the fabric), while its honest
/// datagrams do; both families.
fn forged_sources_do_not_cross_the_fabric(name: &str, backend: &str) {
    need("python3", "python3");
    let mut lab = Cluster::up(name, &["--hosts", "3", "--backend", backend]);
    let sleep = ["sleep", "3600"];
    let c1 = lab.run("h1", "c1", &[], &sleep);
    let c2 = lab.run("h2", "c2", &[], &sleep);
    let c3 = lab.run("h3", "c3", &[], &sleep);
    let rec = Recorder::start(&c2.netns(), 5000);
    // The fabric is up once honest traffic flows both ways.
    within(Duration::from_secs(30), || {
        udp(&c1.netns(), &c1.v4, 0, &c2.v4, 5000, "warmup4");
        udp(&c1.netns(), &c1.v6, 0, &c2.v6, 5000, "warmup6");
        let l = rec.lines();
        (l.iter().any(|x| x.contains("warmup4")) && l.iter().any(|x| x.contains("warmup6")))
            .then_some(())
            .ok_or_else(|| format!("{backend}: no honest datagram from h1 yet: {l:?}"))
    });
    // h3's container's addresses, forged on h1.
    udp(&c1.netns(), &c3.v4, 0, &c2.v4, 5000, "forged-c3-v4");
    udp(&c1.netns(), &c3.v6, 0, &c2.v6, 5000, "forged-c3-v6");
    // h1's own gateway in the network: the source h1's host packets cross the fabric with
    // (`fabric::tunnel_source`), which the other hosts accept; a container must not borrow it.
    let gw4 = default_gateway(&c1.netns());
    udp(&c1.netns(), &gw4, 0, &c2.v4, 5000, "forged-gw-v4");
    udp(&c1.netns(), &c1.v4, 0, &c2.v4, 5000, "honest4");
    udp(&c1.netns(), &c1.v6, 0, &c2.v6, 5000, "honest6");
    rec.wait_for("honest4");
    rec.wait_for("honest6");
    assert_eq!(rec.with("forged"), Vec::<String>::new(), "{backend}");
    let o = lab.exec("h1", &["guard", "--json"]);
    assert!(o.status.success(), "guard on h1: {}", out(&o));
    let v: Value = serde_json::from_slice(&o.stdout).expect("guard json");
    let dropped = |reason: &str| {
        v.as_array()
            .into_iter()
            .flatten()
            .find(|c| c["reason"] == reason)
            .and_then(|c| c["packets"].as_u64())
            .unwrap_or(0)
    };
    assert!(
        dropped("ip4_spoof") > 0 && dropped("ip6_spoof") > 0,
        "{backend}: {v}"
    );
}

#[test]
fn forged_sources_do_not_cross_the_fabric_route() {
    forged_sources_do_not_cross_the_fabric("spfroute", "route");
}

#[test]
fn forged_sources_do_not_cross_the_fabric_vxlan() {
    forged_sources_do_not_cross_the_fabric("spfvx", "vxlan");
}

#[test]
fn forged_sources_do_not_cross_the_fabric_auto() {
    forged_sources_do_not_cross_the_fabric("spfauto", "auto");
}

/// The same guard on Docker's path: the port is created at `Join` with the MAC
/// `CreateEndpoint` chose, and `docker rm` takes its elements away.
#[test]
fn a_docker_container_sends_only_as_itself() {
    need("python3", "python3");
    let mut rig = DockerRig::new();
    let a = rig.run("ca");
    let c = rig.run("cc");
    let inspect = |n: &str| rig.ip_of(n);
    let (a4, c4, gw4) = (inspect("ca"), inspect("cc"), "10.234.0.1");
    let host = rig.host.name.clone();
    let a_mac = mac_of(&a, "eth0");
    assert!(ping(&a, &c4) && ping(&c, gw4), "honest pings");
    assert!(ping(&host, &c4), "host -> c");
    let gw_mac = neigh(&c, gw4);
    let c_mac = neigh(&host, &c4);
    assert!(!gw_mac.is_empty() && gw_mac != a_mac && !c_mac.is_empty());
    let rec = Recorder::start(&c, 5000);

    udp(&a, "10.234.0.70", 0, &c4, 5000, "forged-unallocated");
    udp(&a, gw4, 0, &c4, 5000, "forged-gateway");
    a_must(
        &a,
        &["ip", "link", "set", "eth0", "address", "02:00:00:00:00:98"],
    );
    udp(&a, &a4, 0, &c4, 5000, "forged-mac");
    a_must(&a, &["ip", "link", "set", "eth0", "address", &a_mac]);
    garp(&a, &[gw4, &c4]);
    udp(&a, &a4, 67, "255.255.255.255", 68, "forged-dhcp-offer");
    udp(&a, &a4, 0, &c4, 5000, "honest4");
    rec.wait_for("honest4");
    assert_eq!(neigh(&c, gw4), gw_mac, "c's entry for the gateway");
    assert_eq!(neigh(&host, &c4), c_mac, "the host's entry for c");
    assert_eq!(rec.with("forged"), Vec::<String>::new());

    let o = rig.cli(&["guard", "--json"]);
    assert!(o.status.success(), "guard: {}", out(&o));
    let v: Value = serde_json::from_slice(&o.stdout).expect("guard json");
    for reason in ["ip4_spoof", "mac_spoof", "arp_spoof", "dhcp_server"] {
        let n = v
            .as_array()
            .into_iter()
            .flatten()
            .find(|c| c["reason"] == reason)
            .and_then(|c| c["packets"].as_u64())
            .unwrap_or(0);
        assert!(n > 0, "{reason} not counted: {v}");
    }

    // `docker rm` removes a's elements, c's stay.
    rig.docker.docker_ok(&["rm", "-f", "ca"]);
    let macs = must(&[
        "ip", "netns", "exec", &host, "nft", "list", "set", "bridge", "ferrynet", "macs",
    ]);
    assert!(!macs.contains(&a_mac), "a's MAC left in the guard: {macs}");
    assert!(macs.contains(&mac_of(&c, "eth0")), "c's MAC gone: {macs}");
}

fn a_must(netns: &str, args: &[&str]) {
    let mut v = vec!["ip", "netns", "exec", netns];
    v.extend_from_slice(args);
    must(&v);
}

/// Containers attached before the guard existed (an upgrade: no `bridge ferrynet` table) keep
/// sending when a new network's bridge brings the guard, and are guarded from then on.
#[test]
fn containers_from_before_the_guard_keep_sending() {
    let lab = Lab::new();
    let old = lab.conf(&format!("su{}", lab.tag), "10.235.0.0/24", None);
    let (x, y) = (Ns::new("c"), Ns::new("c"));
    lab.add(&old, "x", &x, "eth0");
    let (y4, _) = ips(&lab.add(&old, "y", &y, "eth0"));
    lab.host
        .must(&["nft", "delete", "table", "bridge", "ferrynet"]);
    assert!(ping(&x.name, &y4), "x -> y without a guard");
    let new = lab.conf(&format!("sv{}", lab.tag), "10.236.0.0/24", None);
    let z = Ns::new("c");
    lab.add(&new, "z", &z, "eth0");
    assert!(ping(&x.name, &y4), "x -> y once the guard is back");
    let macs = lab
        .host
        .must(&["nft", "list", "set", "bridge", "ferrynet", "macs"]);
    assert!(
        macs.contains(&mac_of(&x.name, "eth0")),
        "x unguarded: {macs}"
    );
}

/// An ADD interrupted after its port was guarded but before the MAC was recorded leaves a
/// record without MAC: DEL still takes the port's elements away (found by listing the table).
#[test]
fn del_without_a_recorded_mac_still_removes_the_elements() {
    let lab = Lab::new();
    let net = format!("sw{}", lab.tag);
    let conf = lab.conf(&net, "10.237.0.0/24", None);
    let x = Ns::new("c");
    lab.add(&conf, "x", &x, "eth0");
    let x_mac = mac_of(&x.name, "eth0");
    // A second container keeps the network (a config network's last DEL retires it).
    let y = Ns::new("c");
    lab.add(&conf, "y", &y, "eth0");
    let y_mac = mac_of(&y.name, "eth0");
    // The record as the interrupted ADD left it: no MAC, no host link.
    let store = ferrynet_store::EmbeddedStore::open(lab.state.path().join("store.redb"))
        .expect("open the store");
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("runtime");
    let key = ferrynet_model::network::keys::endpoint(&net, "x", "eth0");
    rt.block_on(async {
        let kv = ferrynet_store::Store::get(&store, &key)
            .await
            .expect("read")
            .expect("the endpoint record");
        let mut rec: Value = serde_json::from_slice(&kv.value).expect("record json");
        let obj = rec.as_object_mut().expect("an object");
        obj.remove("mac");
        obj.remove("host_veth");
        obj.remove("host_mac");
        ferrynet_store::Store::put(&store, &key, rec.to_string().into_bytes())
            .await
            .expect("write");
    });
    drop(store);
    let list = || {
        lab.host
            .must(&["nft", "list", "set", "bridge", "ferrynet", "macs"])
    };
    assert!(list().contains(&x_mac), "x guarded after ADD");
    assert_eq!(lab.del(&conf, "x", Some(&x), "eth0").code, 0);
    assert!(
        !list().contains(&x_mac),
        "x's elements outlived DEL: {}",
        list()
    );
    assert!(list().contains(&y_mac), "y's elements went with x's");
    assert_eq!(lab.del(&conf, "y", Some(&y), "eth0").code, 0);
    // The guard goes with the last network (y's DEL retired the config network).
    assert!(
        !lab.host
            .run(&["nft", "list", "table", "bridge", "ferrynet"])
            .status
            .success(),
        "the guard's table outlived the last network"
    );
}
