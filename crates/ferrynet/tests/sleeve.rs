//! The sleeve (encrypted userspace overlay) on `ferrynet lab`s with a real etcd: all-pairs TCP
//! and UDP between containers (inner IPv4 and IPv6) over `--backend sleeve`, `--encrypt` on
//! vxlan, and `auto` with a peer behind NAT and a peer whose VXLAN port is blocked; the sleeve
//! over an IPv6 underlay; a capture on the underlay that never shows a marker sent between
//! containers and shows nothing but the sleeve's UDP between hosts; replayed, tampered and
//! unknown-key packets dropped and counted; a changed key re-handshaken; an agent killed with
//! SIGKILL and restarted. Every lab is removed on drop, also when a test fails.

mod common;

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::lab::{Container, Lab};
use common::{bin, need, out, try_within, within, Proc};
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

/// tcpdump on every port of the lab's underlay bridge (in the underlay namespace), to a file.
struct Capture {
    file: PathBuf,
    proc: Option<Proc>,
}

impl Capture {
    fn start(lab: &Lab) -> Capture {
        need("tcpdump", "tcpdump");
        let file = PathBuf::from(format!("/run/ferrynet-lab/{}/underlay.pcap", lab.name));
        let _ = std::fs::remove_file(&file);
        let child = Command::new("ip")
            .args([
                "netns",
                "exec",
                &format!("{}-ul", lab.name),
                "tcpdump",
                "-i",
                "any",
            ])
            .args(["-U", "-n", "-s", "0", "-w"])
            .arg(&file)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("tcpdump");
        let cap = Capture {
            file,
            proc: Some(Proc(child)),
        };
        // The file exists (with its header) once tcpdump captures.
        within(Duration::from_secs(10), || {
            match std::fs::metadata(&cap.file) {
                Ok(m) if m.len() >= 24 => Ok(()),
                _ => Err("tcpdump has not started".into()),
            }
        });
        std::thread::sleep(Duration::from_millis(300));
        cap
    }

    /// Stop capturing; the packets matching `filter` as tcpdump prints them.
    fn stop(&mut self) {
        if let Some(p) = self.proc.take() {
            std::thread::sleep(Duration::from_millis(300));
            p.kill();
        }
    }

    fn matching(&self, filter: &str) -> Vec<String> {
        let o = Command::new("tcpdump")
            .args(["-r"])
            .arg(&self.file)
            .args(["-n", filter])
            .output()
            .expect("tcpdump -r");
        String::from_utf8_lossy(&o.stdout)
            .lines()
            .map(str::to_string)
            .collect()
    }

    /// The UDP payloads of packets matching `filter` (hex dumps parsed back).
    fn payloads(&self, filter: &str) -> Vec<Vec<u8>> {
        let o = Command::new("tcpdump")
            .args(["-r"])
            .arg(&self.file)
            .args(["-n", "-x", filter])
            .output()
            .expect("tcpdump -r -x");
        let mut packets: Vec<Vec<u8>> = Vec::new();
        for line in String::from_utf8_lossy(&o.stdout).lines() {
            let t = line.trim_start();
            if let Some(hex) = t.strip_prefix("0x").and_then(|r| r.split_once(':')) {
                let bytes = hex.1.split_whitespace().flat_map(|w| {
                    (0..w.len() / 2).map(move |i| u8::from_str_radix(&w[2 * i..2 * i + 2], 16))
                });
                if let Some(p) = packets.last_mut() {
                    p.extend(bytes.filter_map(Result::ok));
                }
            } else {
                packets.push(Vec::new());
            }
        }
        packets
            .into_iter()
            .filter_map(|ip| {
                let hdr = match ip.first()? >> 4 {
                    4 => usize::from(ip[0] & 0x0f) * 4,
                    6 => 40,
                    _ => return None,
                };
                ip.get(hdr + 8..).map(<[u8]>::to_vec)
            })
            .collect()
    }

    fn contains_marker(&self) -> bool {
        let raw = std::fs::read(&self.file).expect("read capture");
        raw.windows(MARKER.len()).any(|w| w == MARKER.as_bytes())
    }
}

impl Drop for Capture {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The capture holds no marker and nothing between hosts but the sleeve's UDP.
fn assert_encrypted(cap: &Capture) {
    assert!(
        !cap.contains_marker(),
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
        mtu.contains("mtu 1420"),
        "sleeve MTU = underlay - 80: {mtu}"
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
        .find(|p| p.first() == Some(&4) && p.len() > 64 && p.len() <= 1452)
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
