//! The sleeve (encrypted userspace overlay) on `ferrynet lab`s with a real etcd: all-pairs TCP
//! and UDP between containers (inner IPv4 and IPv6) over `--backend sleeve`, `--encrypt` on
//! vxlan, and `auto` with a peer behind NAT and a peer whose VXLAN port is blocked; the sleeve
//! over an IPv6 underlay; a capture on the underlay that never shows a marker sent between
//! containers and shows nothing but the sleeve's UDP between hosts; replayed, tampered and
//! unknown-key packets dropped and counted; a changed key re-handshaken; an agent killed with
//! SIGKILL and restarted. Every lab is removed on drop, also when a test fails.

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::capture::Capture;
use common::lab::{Container, Lab};
use common::{bin, out, try_within, within};
use serde_json::Value;

/// The marker sent between containers; it must never appear on the underlay.
const MARKER: &str = "FERRYNET-SLEEVE-PLAINTEXT-MARKER";

/// One TCP and one UDP round trip carrying the marker (4 KiB over TCP, so segments are full
/// size) from `from` to `addr`:7000, retried for up to `wait`.
fn echo(from: &Container, addr: &str, wait: Duration) -> Result<(), String> {
    let code = format!(
        "import socket\nm=b'{MARKER}'*128\n\
         s=socket.create_connection(('{addr}',7000),timeout=2);s.sendall(m);got=b''\n\
         while len(got)<len(m):\n  d=s.recv(65536)\n  assert d\n  got+=d\nassert got==m\n\
         fam=socket.AF_INET6 if ':' in '{addr}' else socket.AF_INET\n\
         u=socket.socket(fam,socket.SOCK_DGRAM);u.settimeout(1)\n\
         for _ in range(3):\n  u.sendto(b'{MARKER}-udp',('{addr}',7000))\n  try:\n    assert u.recv(100)==b'{MARKER}-udp';break\n  except socket.timeout:\n    pass\nelse:\n  raise SystemExit('udp: no echo')\n"
    );
    try_within(wait, || {
        let o = Command::new("ip")
            .args(["netns", "exec", &from.netns(), "python3", "-c", &code])
            .output()
            .map_err(|e| e.to_string())?;
        if o.status.success() {
            Ok(())
        } else {
            Err(format!("{} -> {addr}: {}", from.name, out(&o)))
        }
    })
}

fn all_pairs(cs: &[Container]) {
    common::lab::all_pairs_with(cs, |a, addr| echo(a, addr, Duration::from_secs(10)));
}

/// The capture holds no marker and nothing between hosts but the sleeve's UDP.
fn assert_encrypted(cap: &Capture) {
    assert!(
        !cap.contains(MARKER),
        "the marker crossed the underlay in clear"
    );
    let clear = clear_traffic(cap);
    assert!(
        clear.is_empty(),
        "not the sleeve's UDP:\n{}",
        clear.join("\n")
    );
}

/// Host-to-host traffic on the underlay other than the sleeve's port, the store and address
/// resolution: what an encrypted lab must never show.
fn clear_traffic(cap: &Capture) -> Vec<String> {
    cap.matching("ip or ip6")
        .into_iter()
        .filter(|l| !l.contains(".6784 ") && !l.contains(".6784:"))
        .filter(|l| !l.contains("172.31.0.253.2379") && !l.contains("> 172.31.0.253.2379"))
        .filter(|l| !l.contains("ICMP6, neighbor") && !l.contains("ICMP6, router"))
        .collect()
}

fn sleeve_of(status: &Value) -> &Value {
    &status["sleeve"]
}

fn dropped(lab: &Lab, host: &str, counter: &str) -> u64 {
    sleeve_of(&lab.status(host))["dropped"][counter]
        .as_u64()
        .unwrap_or_else(|| panic!("no sleeve counter {counter} on {host}"))
}

fn peer_backend(status: &Value, peer: &str) -> (String, String) {
    let p = status["networks"][0]["peers"]
        .as_array()
        .and_then(|ps| ps.iter().find(|p| p["host"] == peer))
        .cloned()
        .unwrap_or(Value::Null);
    (
        p["backend"].as_str().unwrap_or("-").to_string(),
        p["reason"].as_str().unwrap_or("").to_string(),
    )
}

/// Send `payload` as one UDP datagram to `dst` from the underlay namespace (another address
/// than any host's: a replay or forgery seen on the wire needs no host key).
fn inject(lab: &Lab, dst: &str, payload: &[u8]) {
    let hex: String = payload.iter().map(|b| format!("{b:02x}")).collect();
    let o = Command::new("ip")
        .args(["netns", "exec", &format!("{}-ul", lab.name), "python3", "-c"])
        .arg(format!(
            "import socket\ns=socket.socket(socket.AF_INET,socket.SOCK_DGRAM)\ns.sendto(bytes.fromhex('{hex}'),('{dst}',6784))\n"
        ))
        .output()
        .expect("python3");
    assert!(o.status.success(), "inject: {}", out(&o));
}

#[test]
fn sleeve_all_pairs_encrypted_replay_tamper_unknown_key_restart_and_rekey() {
    let mut lab = Lab::up("slvA", &["--hosts", "3", "--backend", "sleeve"]);
    let cs: Vec<Container> = ["h1", "h2", "h3"]
        .iter()
        .enumerate()
        .map(|(i, h)| lab.echo_container(h, &format!("c{i}")))
        .collect();
    let mtu = common::must(&["ip", "-n", &cs[0].netns(), "-o", "link", "show", "eth0"]);
    assert!(
        mtu.contains("mtu 1408"),
        "sleeve MTU = underlay - 92: {mtu}"
    );
    // Sessions first, so the capture holds data messages.
    all_pairs(&cs);

    let mut cap = Capture::start(&lab);
    all_pairs(&cs);
    cap.stop();
    assert_encrypted(&cap);
    // One datagram, not a GSO run of several (the capture sees those whole on the veths).
    let to_h2 = cap.payloads("udp dst port 6784 and dst host 172.31.0.2");
    let data = to_h2
        .iter()
        .find(|p| p.first() == Some(&4) && p.len() > 64 && p.len() <= 1440)
        .cloned()
        .expect("a captured data message to h2");
    let status = lab.status("h2");
    let h1_endpoint = sleeve_of(&status)["peers"][0]["endpoint"].clone();
    assert_eq!(h1_endpoint, "172.31.0.1:6784", "{status}");

    // A replayed message is dropped and counted; so is a tampered one; neither moves the peer.
    let replayed = dropped(&lab, "h2", "replayed");
    inject(&lab, "172.31.0.2", &data);
    within(Duration::from_secs(5), || {
        let n = dropped(&lab, "h2", "replayed");
        (n > replayed)
            .then_some(())
            .ok_or(format!("replayed still {n}"))
    });
    let forged = dropped(&lab, "h2", "authFailed");
    // A counter never used (else the replay check drops it first) and a flipped byte.
    let mut tampered = data.clone();
    let counter = u64::from_le_bytes(tampered[8..16].try_into().unwrap()) + 1_000;
    tampered[8..16].copy_from_slice(&counter.to_le_bytes());
    let last = tampered.len() - 20;
    tampered[last] ^= 0x55;
    inject(&lab, "172.31.0.2", &tampered);
    within(Duration::from_secs(5), || {
        let n = dropped(&lab, "h2", "authFailed");
        (n > forged)
            .then_some(())
            .ok_or(format!("authFailed still {n}"))
    });
    // A datagram larger than any packet the MTU allows, on a live session: dropped and
    // counted, the decrypting thread unharmed.
    let malformed = dropped(&lab, "h2", "malformed");
    let mut big = data.clone();
    big.resize(8000, 0xab);
    inject(&lab, "172.31.0.2", &big);
    within(Duration::from_secs(5), || {
        let n = dropped(&lab, "h2", "malformed");
        (n > malformed)
            .then_some(())
            .ok_or(format!("malformed still {n}"))
    });
    let status = lab.status("h2");
    assert_eq!(
        sleeve_of(&status)["peers"][0]["endpoint"],
        h1_endpoint,
        "{status}"
    );

    // h1 speaking for h3's container (a raw packet from h1's host into the sleeve with
    // h3's container as its source): h2 decrypts it, finds the source outside h1's blocks,
    // drops and counts it.
    let spoofed = dropped(&lab, "h2", "spoofedSource");
    let raw = format!(
        "import socket,struct\np=b'spoof'\n\
         src=socket.inet_aton('{}');dst=socket.inet_aton('{}')\n\
         udp=struct.pack('!HHHH',40000,7000,8+len(p),0)+p\n\
         ip=struct.pack('!BBHHHBBH4s4s',0x45,0,20+len(udp),0,0,64,17,0,src,dst)\n\
         s=socket.socket(socket.AF_INET,socket.SOCK_RAW,socket.IPPROTO_RAW)\n\
         s.sendto(ip+udp,('{}',0))\n",
        cs[2].v4, cs[1].v4, cs[1].v4
    );
    let o = Command::new("ip")
        .args(["netns", "exec", &lab.host_ns("h1"), "python3", "-c", &raw])
        .output()
        .expect("python3");
    assert!(o.status.success(), "raw send on h1: {}", out(&o));
    within(Duration::from_secs(5), || {
        let n = dropped(&lab, "h2", "spoofedSource");
        (n > spoofed)
            .then_some(())
            .ok_or(format!("spoofedSource still {n}"))
    });

    // A handshake from a key no host registered gets no answer and is counted.
    let unknown = dropped(&lab, "h2", "unknownKey");
    let h2_key = sleeve_of(&status)["publicKey"]
        .as_str()
        .unwrap()
        .to_string();
    let o = Command::new("ip")
        .args([
            "netns",
            "exec",
            &format!("{}-ul", lab.name),
            bin(),
            "sleeve",
            "hello",
        ])
        .args(["--endpoint", "172.31.0.2:6784", "--public-key", &h2_key])
        .output()
        .expect("sleeve hello");
    assert!(
        !o.status.success() && out(&o).contains("no answer"),
        "{}",
        out(&o)
    );
    within(Duration::from_secs(5), || {
        let n = dropped(&lab, "h2", "unknownKey");
        (n > unknown)
            .then_some(())
            .ok_or(format!("unknownKey still {n}"))
    });
    all_pairs(&cs);

    // kill -9 and restart: the TUN device persisted (no clear traffic meanwhile), the new
    // agent handshakes at once.
    lab.lab(&["stop-agent", "h2", "--kill"]);
    lab.lab(&["start-agent", "h2"]);
    let t0 = Instant::now();
    echo(&cs[0], &cs[1].v4, Duration::from_secs(15)).expect("h1 -> h2 after kill -9");
    echo(&cs[1], &cs[2].v6, Duration::from_secs(15)).expect("h2 -> h3 after kill -9");
    eprintln!(
        "re-established {:?} after the agent's restart",
        t0.elapsed()
    );

    // A new key on h3: peers learn it from the store and handshake with it.
    let old = lab.status("h3")["sleeve"]["publicKey"].clone();
    lab.lab(&["stop-agent", "h3"]);
    std::fs::remove_file(format!("/run/ferrynet-lab/{}/h3/sleeve.key", lab.name))
        .expect("remove h3's key");
    lab.lab(&["start-agent", "h3"]);
    let new = within(Duration::from_secs(15), || {
        // The agent's socket appears once it runs.
        let o = lab.exec("h3", &["status", "--json"]);
        let s: Value = serde_json::from_slice(&o.stdout).map_err(|e| e.to_string())?;
        let k = s["sleeve"]["publicKey"].clone();
        (k.is_string() && k != old)
            .then_some(k)
            .ok_or("old key".to_string())
    });
    within(Duration::from_secs(15), || {
        let s = lab.status("h1");
        let seen = sleeve_of(&s)["peers"]
            .as_array()
            .and_then(|ps| ps.iter().find(|p| p["host"] == "h3"))
            .map(|p| p["publicKey"].clone());
        (seen.as_ref() == Some(&new))
            .then_some(())
            .ok_or(format!("h1 sees h3 as {seen:?}"))
    });
    all_pairs(&cs);
}

#[test]
fn sleeve_over_an_ipv6_underlay() {
    let mut lab = Lab::up("slvB", &["--hosts", "2", "--backend", "sleeve"]);
    // The IPv4 path of the sleeve's port is firewalled between the hosts; the restarted
    // agents find no answer there and move to the peers' IPv6 endpoints.
    let nft = |args: &str| {
        let mut a = vec!["ip", "netns", "exec", "slvB-ul", "nft"];
        a.extend(args.split(' '));
        common::must(&a);
    };
    nft("add table bridge blk4");
    nft("add chain bridge blk4 forward_filter { type filter hook forward priority 0 ; }");
    nft("add rule bridge blk4 forward_filter ip protocol udp udp dport 6784 drop");
    for h in ["h1", "h2"] {
        lab.lab(&["stop-agent", h, "--kill"]);
        lab.lab(&["start-agent", h]);
    }
    let cs: Vec<Container> = ["h1", "h2"]
        .iter()
        .enumerate()
        .map(|(i, h)| lab.echo_container(h, &format!("c{i}")))
        .collect();
    echo(&cs[0], &cs[1].v4, Duration::from_secs(30)).expect("over the IPv6 underlay");
    let mut cap = Capture::start(&lab);
    all_pairs(&cs);
    cap.stop();
    assert_encrypted(&cap);
    assert!(
        cap.matching("ip and udp port 6784").is_empty(),
        "IPv4 sleeve traffic passed"
    );
    assert!(
        !cap.matching("ip6 and udp port 6784").is_empty(),
        "no IPv6 sleeve traffic"
    );
    let s = lab.status("h1");
    let ep = sleeve_of(&s)["peers"][0]["endpoint"]
        .as_str()
        .unwrap_or("")
        .to_string();
    assert_eq!(ep, "[fd31::2]:6784", "{s}");
}

#[test]
fn encrypt_on_vxlan_sends_nothing_in_clear() {
    let mut lab = Lab::up("slvC", &["--hosts", "3", "--backend", "vxlan", "--encrypt"]);
    let cs: Vec<Container> = ["h1", "h2", "h3"]
        .iter()
        .enumerate()
        .map(|(i, h)| lab.echo_container(h, &format!("c{i}")))
        .collect();
    all_pairs(&cs);
    let s = lab.status("h1");
    for peer in ["h2", "h3"] {
        let (b, why) = peer_backend(&s, peer);
        assert_eq!(b, "sleeve", "{peer}: {why}");
        assert!(why.contains("encrypted"), "{why}");
    }
    let mut cap = Capture::start(&lab);
    all_pairs(&cs);
    cap.stop();
    assert_encrypted(&cap);
    assert!(
        cap.matching("udp port 4789").is_empty(),
        "VXLAN on the underlay"
    );
}

#[test]
fn auto_picks_route_vxlan_and_sleeve_through_nat_and_a_blocked_port() {
    // h1 and h3 (behind NAT) on the first underlay subnet, h2 and h4 on the second; UDP 4789
    // to and from h2 is dropped.
    let mut lab = Lab::up(
        "slvD",
        &[
            "--hosts",
            "4",
            "--subnets",
            "2",
            "--backend",
            "auto",
            "--nat",
            "h3",
            "--block-vxlan",
            "h2",
        ],
    );
    let want = [
        ("h1", "h2", "sleeve"),
        ("h1", "h3", "sleeve"),
        ("h1", "h4", "vxlan"),
        ("h4", "h2", "route"),
        ("h4", "h3", "sleeve"),
        ("h3", "h1", "sleeve"),
        ("h2", "h1", "sleeve"),
    ];
    let cs: Vec<Container> = ["h1", "h2", "h3", "h4"]
        .iter()
        .enumerate()
        .map(|(i, h)| lab.echo_container(h, &format!("c{i}")))
        .collect();
    within(Duration::from_secs(30), || {
        let mut wrong = Vec::new();
        for (me, peer, backend) in want {
            let (b, why) = peer_backend(&lab.status(me), peer);
            if b != backend {
                wrong.push(format!("{me} -> {peer}: {b} ({why}), want {backend}"));
            }
        }
        wrong.is_empty().then_some(()).ok_or(wrong.join("; "))
    });
    let (_, why) = peer_backend(&lab.status("h1"), "h2");
    assert!(why.contains("only the sleeve port passes"), "{why}");
    all_pairs(&cs);
    // h1 learned h3's public endpoint (its router's) from h3's packets.
    let s = lab.status("h1");
    let h3 = sleeve_of(&s)["peers"]
        .as_array()
        .and_then(|ps| ps.iter().find(|p| p["host"] == "h3"))
        .cloned()
        .unwrap_or(Value::Null);
    assert_eq!(h3["learned"], true, "{h3}");
    let ep = h3["endpoint"].as_str().unwrap_or("");
    assert!(
        ep.starts_with("172.31.0.103:") || ep.starts_with("[fd31::67]:"),
        "{h3}"
    );
}

/// The sleeve's view of `peer` in a host's status.
fn sleeve_peer(status: &Value, peer: &str) -> Value {
    sleeve_of(status)["peers"]
        .as_array()
        .and_then(|ps| ps.iter().find(|p| p["host"] == peer))
        .cloned()
        .unwrap_or(Value::Null)
}

/// Send `payload` as one UDP datagram from `src` to `dst` (socket addresses of one family)
/// out of namespace `ns`, through a raw socket: a relay can send from the port its agent holds.
fn inject_raw(ns: &str, src: &str, dst: &str, payload: &[u8]) {
    let hex: String = payload.iter().map(|b| format!("{b:02x}")).collect();
    let split = |a: &str| {
        let (h, p) = a.rsplit_once(':').expect("addr:port");
        (h.trim_matches(['[', ']']).to_string(), p.to_string())
    };
    let ((sa, sp), (da, dp)) = (split(src), split(dst));
    let code = [
        format!("p=bytes.fromhex('{hex}')"),
        format!("sa,sp,da,dp='{sa}',{sp},'{da}',{dp}"),
        "import socket,struct".into(),
        "def csum(b):".into(),
        "  b+=bytes(len(b)%2)".into(),
        "  s=sum(struct.unpack('!%dH'%(len(b)//2),b))".into(),
        "  while s>>16: s=(s&0xffff)+(s>>16)".into(),
        "  return (~s)&0xffff".into(),
        "n=8+len(p)".into(),
        "if ':' in da:".into(),
        "  s6=socket.inet_pton(socket.AF_INET6,sa);d6=socket.inet_pton(socket.AF_INET6,da)".into(),
        "  c=csum(s6+d6+struct.pack('!I3xB',n,17)+struct.pack('!HHHH',sp,dp,n,0)+p) or 0xffff".into(),
        "  pkt=struct.pack('!IHBB',6<<28,n,17,64)+s6+d6+struct.pack('!HHHH',sp,dp,n,c)+p".into(),
        "  s=socket.socket(socket.AF_INET6,socket.SOCK_RAW,socket.IPPROTO_RAW)".into(),
        "else:".into(),
        "  udp=struct.pack('!HHHH',sp,dp,n,0)+p".into(),
        "  pkt=struct.pack('!BBHHHBBH4s4s',0x45,0,20+n,0,0,64,17,0,socket.inet_aton(sa),socket.inet_aton(da))+udp".into(),
        "  s=socket.socket(socket.AF_INET,socket.SOCK_RAW,socket.IPPROTO_RAW)".into(),
        "s.sendto(pkt,(da,0))".into(),
    ]
    .join("\n");
    let o = Command::new("ip")
        .args(["netns", "exec", ns, "python3", "-c", &code])
        .output()
        .expect("python3");
    assert!(o.status.success(), "raw send in {ns}: {}", out(&o));
}

/// The address part of a socket address as JSON gives it (`a.b.c.d:p`, `[v6]:p`).
fn host_part(ep: &Value) -> String {
    let s = ep.as_str().unwrap_or("");
    s.rsplit_once(':')
        .map(|(h, _)| h.trim_matches(['[', ']']).to_string())
        .unwrap_or_default()
}

/// Wait until `host`'s drop counter `counter` rises above `before`.
fn rises(lab: &Lab, host: &str, counter: &str, before: u64) {
    within(Duration::from_secs(5), || {
        let n = dropped(lab, host, counter);
        (n > before)
            .then_some(())
            .ok_or(format!("{counter} on {host} still {n}"))
    });
}

#[test]
fn two_hosts_each_behind_its_own_nat_talk_through_a_relay() {
    // h2 and h3 each behind its own masquerading router: neither reaches the other's private
    // address nor passes its router's filter; both reach h1.
    let mut lab = Lab::up(
        "slvE",
        &["--hosts", "3", "--backend", "sleeve", "--nat", "h2,h3"],
    );
    let cs: Vec<Container> = ["h1", "h2", "h3"]
        .iter()
        .enumerate()
        .map(|(i, h)| lab.echo_container(h, &format!("c{i}")))
        .collect();
    // Each side tries the other's endpoints (5 s each unanswered), then relays through h1.
    echo(&cs[1], &cs[2].v4, Duration::from_secs(60)).expect("h2 -> h3 through a relay");
    all_pairs(&cs);
    for (me, peer) in [("h2", "h3"), ("h3", "h2")] {
        let s = lab.status(me);
        let p = sleeve_peer(&s, peer);
        assert_eq!(p["via"], "h1", "{me} -> {peer}: {p}");
        let path = p["path"].as_str().unwrap_or("");
        assert!(path.starts_with("relayed through h1"), "{path}");
        assert!(path.contains("end-to-end encrypted"), "{path}");
        // Sent to h1's address (whichever family reached it first).
        assert_eq!(p["endpoint"], sleeve_peer(&s, "h1")["endpoint"], "{s}");
    }
    // h1 reaches both directly, at their routers' addresses (learned), and relays for them.
    let s1 = lab.status("h1");
    for (peer, router) in [
        ("h2", ["172.31.0.102", "fd31::66"]),
        ("h3", ["172.31.0.103", "fd31::67"]),
    ] {
        let p = sleeve_peer(&s1, peer);
        assert!(p["via"].is_null(), "{p}");
        assert!(router.contains(&host_part(&p["endpoint"]).as_str()), "{p}");
        assert!(
            p["path"].as_str().unwrap_or("").contains("behind NAT"),
            "{p}"
        );
    }
    assert!(sleeve_of(&s1)["relayed"].as_u64() > Some(0), "{s1}");
    // Where h1 sends to h3 (h3's router), and from which of h1's addresses (as h3 sees it).
    let h3_at = sleeve_peer(&s1, "h3")["endpoint"]
        .as_str()
        .unwrap_or("")
        .to_string();
    let h1_for_h3 = sleeve_peer(&lab.status("h3"), "h1")["endpoint"]
        .as_str()
        .unwrap_or("")
        .to_string();
    let h2_router = host_part(&sleeve_peer(&s1, "h2")["endpoint"]);
    let h1_for_h2 = host_part(&sleeve_peer(&lab.status("h2"), "h1")["endpoint"]);

    // A capture at the relay's underlay port while every pair talks: the marker never
    // appears, though h2's and h3's traffic passes through h1.
    let h1_ns = lab.host_ns("h1");
    let mut cap = Capture::start_on(&lab, &h1_ns, "eth0");
    all_pairs(&cs);
    cap.stop();
    assert!(
        !cap.contains(MARKER),
        "the marker crossed the relay in clear"
    );
    // What h1 forwards to h3: the forwarded envelope (6, h2's key prefix) round a data message.
    let fwd = cap.payloads(&format!(
        "udp and src host {} and dst host {}",
        host_part(&Value::from(h1_for_h3.clone())),
        host_part(&Value::from(h3_at.clone()))
    ));
    let data = fwd
        .iter()
        .find(|p| p.len() > 64 && p[..4] == [6, 0, 0, 0] && p[12] == 4)
        .cloned()
        .expect("a data message h1 forwarded to h3");
    let asked = cap
        .payloads(&format!(
            "udp and src host {h2_router} and dst host {h1_for_h2}"
        ))
        .into_iter()
        .find(|p| p.len() > 64 && p[..4] == [5, 0, 0, 0])
        .expect("a datagram h2 asked h1 to relay");

    // The relay (or anyone on its address) replaying a forwarded message: dropped, counted.
    let before = dropped(&lab, "h3", "replayed");
    inject_raw(&h1_ns, &h1_for_h3, &h3_at, &data);
    rises(&lab, "h3", "replayed", before);
    // The relay forging one (a counter never used, a flipped byte): dropped, counted.
    let before = dropped(&lab, "h3", "authFailed");
    let mut forged = data.clone();
    let counter = u64::from_le_bytes(forged[20..28].try_into().unwrap()) + 1_000;
    forged[20..28].copy_from_slice(&counter.to_le_bytes());
    let last = forged.len() - 20;
    forged[last] ^= 0x55;
    inject_raw(&h1_ns, &h1_for_h3, &h3_at, &forged);
    rises(&lab, "h3", "authFailed", before);
    // The relay naming another sender than the session's: dropped, counted.
    let before = dropped(&lab, "h3", "authFailed");
    let mut renamed = data.clone();
    renamed[4..12].copy_from_slice(&[0xee; 8]);
    inject_raw(&h1_ns, &h1_for_h3, &h3_at, &renamed);
    rises(&lab, "h3", "authFailed", before);
    // A neighbour that is no peer asking h1 to relay: refused, counted (h1 is no open relay).
    let before = dropped(&lab, "h1", "relayRefused");
    inject(&lab, "172.31.0.1", &asked);
    rises(&lab, "h1", "relayRefused", before);

    // None of that moved anyone's path.
    let p = sleeve_peer(&lab.status("h3"), "h2");
    assert_eq!(p["via"], "h1", "{p}");
    all_pairs(&cs);
}
