//! Conntrack follows producers (issue 19), in 3-host VXLAN labs on a real etcd: a UDP client
//! sending from a fixed source port every 100 ms keeps one conntrack entry alive forever, so
//! these tests fail when entries toward a departed producer or a replaced container are left
//! behind (the flow would keep going to the old address). Every lab, its containers and the
//! "outside" namespace are removed on drop, also when a test fails.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};
use std::sync::mpsc::{channel, Receiver};
use std::time::{Duration, Instant};

use common::lab::{Container, Lab};
use common::{out, Proc};

const VIP: &str = "10.96.0.20";
const OTHER_VIP: &str = "10.96.0.21";

/// A producer: UDP and TCP on port 5300. UDP answers `<id>`; TCP sends `<id>\n`, then echoes.
fn server_code(id: &str) -> String {
    format!(
        "import socket,threading\n\
         u=socket.socket(socket.AF_INET,socket.SOCK_DGRAM);u.bind(('0.0.0.0',5300))\n\
         def udp():\n  while True:\n    d,a=u.recvfrom(512);u.sendto(b'{id}',a)\n\
         threading.Thread(target=udp,daemon=True).start()\n\
         s=socket.socket();s.setsockopt(socket.SOL_SOCKET,socket.SO_REUSEADDR,1)\n\
         s.bind(('0.0.0.0',5300));s.listen(64)\n\
         def serve(c):\n  try:\n    c.sendall(b'{id}\\n')\n    while True:\n      d=c.recv(4096)\n      \
         if not d: break\n      c.sendall(d)\n  except OSError: pass\n  c.close()\n\
         while True:\n  c,a=s.accept();threading.Thread(target=serve,args=(c,),daemon=True).start()\n"
    )
}

/// A UDP client in namespace `ns`: from source port `sport`, one datagram to `addr`:`port`
/// every 100 ms; prints `<id>` for each answer and `-` for each 100 ms without one.
fn udp_client(ns: &str, addr: &str, port: u16, sport: u16) -> (Proc, Receiver<String>) {
    let code = format!(
        "import socket,time\n\
         s=socket.socket(socket.AF_INET,socket.SOCK_DGRAM);s.bind(('0.0.0.0',{sport}))\n\
         s.settimeout(0.1)\n\
         while True:\n  t=time.time();s.sendto(b'q',('{addr}',{port}))\n  \
         try:\n    d,_=s.recvfrom(512);print(d.decode(),flush=True)\n  \
         except socket.timeout: print('-',flush=True)\n  \
         except OSError: print('-',flush=True)\n  \
         time.sleep(max(0,0.1-(time.time()-t)))\n"
    );
    let mut child = Command::new("nsenter")
        .args([
            &format!("--net=/run/netns/{ns}"),
            "python3",
            "-u",
            "-c",
            &code,
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("python3");
    let stdout = child.stdout.take().expect("stdout");
    let (tx, rx) = channel();
    std::thread::spawn(move || {
        for l in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(l.trim().to_string()).is_err() {
                break;
            }
        }
    });
    (Proc(child), rx)
}

/// The first answer on `rx` that `want` accepts, within `within`; the answers seen meanwhile.
fn wait_answer(
    rx: &Receiver<String>,
    within: Duration,
    want: impl Fn(&str) -> bool,
) -> Result<String, Vec<String>> {
    let until = Instant::now() + within;
    let mut seen = Vec::new();
    while let Some(left) = until.checked_duration_since(Instant::now()) {
        match rx.recv_timeout(left) {
            Ok(l) if want(&l) => return Ok(l),
            Ok(l) => {
                if seen.last() != Some(&l) {
                    seen.push(l);
                }
            }
            Err(_) => break,
        }
    }
    Err(seen)
}

/// Drop what the client printed so far.
fn drain(rx: &Receiver<String>) {
    while rx.try_recv().is_ok() {}
}

/// A TCP connection through `addr`:53 that reached producer `want`; it echoes a line every
/// 50 ms until its stdin closes, then prints `ok N`; exits non-zero on any error.
fn tcp_long_lived(ns: &str, addr: &str, want: &str) -> std::process::Child {
    let code = format!(
        "import socket,time,sys,select\n\
         for i in range(200):\n  \
         s=socket.create_connection(('{addr}',53),timeout=5);f=s.makefile('rb')\n  \
         if f.readline().strip()==b'{want}': break\n  s.close()\n\
         else:\n  sys.exit('never reached {want}')\n\
         print('connected',flush=True)\n\
         s.settimeout(30)\n\
         n=0\n\
         while not select.select([sys.stdin],[],[],0)[0]:\n  s.sendall(b'x'*16+b'\\n');l=f.readline()\n  \
         assert l==b'x'*16+b'\\n',('bad echo',l)\n  n+=1;time.sleep(0.05)\n\
         print('ok',n,flush=True)\n"
    );
    let mut child = Command::new("nsenter")
        .args([
            &format!("--net=/run/netns/{ns}"),
            "python3",
            "-u",
            "-c",
            &code,
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("python3");
    let mut line = String::new();
    BufReader::new(child.stdout.as_mut().expect("stdout"))
        .read_line(&mut line)
        .expect("read");
    assert_eq!(line.trim(), "connected", "TCP connection to {want}");
    child
}

fn producer(lab: &mut Lab, host: &str, id: &str) -> Container {
    let code = server_code(id);
    lab.run(host, id, &[], &["python3", "-c", &code])
}

/// `service register NAME` with one UDP and one TCP port 53 (→ 5300) for producer `c`.
fn register(lab: &Lab, service: &str, vip: &str, c: &Container, id: &str) {
    let args = [
        "service",
        "register",
        service,
        "--port",
        "dns=53/udp",
        "--port",
        "dnst=53/tcp",
        "--vip",
        vip,
        "--addr",
        &c.v4,
        "--id",
        id,
        "--target",
        "53:5300",
    ];
    let o = lab.exec(&c.host, &args);
    assert!(o.status.success(), "register {id}: {}", out(&o));
}

/// Conntrack entries the agent on `host` deleted since it started.
fn deleted_on(lab: &Lab, host: &str) -> u64 {
    lab.status(host)["lb"]["conntrackDeleted"]
        .as_u64()
        .unwrap_or_else(|| panic!("no lb.conntrackDeleted in {host}'s status"))
}

fn nft_and_log(lab: &Lab) -> String {
    let o = Command::new("nsenter")
        .args([
            &format!("--net=/run/netns/{}", lab.host_ns("h1")),
            "nft",
            "list",
            "table",
            "inet",
            "ferrynet-svc",
        ])
        .output()
        .expect("nft");
    format!("{}\n{}", out(&o), lab.agent_log_tail("h1", 20))
}

#[test]
fn a_udp_flow_to_a_vip_moves_when_its_producer_leaves_and_other_flows_stay() {
    let mut lab = Lab::vxlan3("ctvip");
    let u2 = producer(&mut lab, "h2", "u2");
    let u3 = producer(&mut lab, "h3", "u3");
    let client = lab.run("h1", "cl", &[], &["sleep", "infinity"]);
    register(&lab, "dns", VIP, &u2, "u2");
    register(&lab, "dns", VIP, &u3, "u3");

    // The flow settles on one producer (the agents converge first).
    let (udp, rx) = udp_client(&client.netns(), VIP, 53, 40000);
    let first = wait_answer(&rx, Duration::from_secs(30), |l| l != "-").unwrap_or_else(|seen| {
        panic!(
            "no UDP answer through {VIP}: {seen:?}\n{}",
            nft_and_log(&lab)
        )
    });
    let (gone, stays, gone_c) = if first == "u2" {
        ("u2", "u3", &u2)
    } else {
        ("u3", "u2", &u3)
    };
    // Both producers serve the VIP on h1 before one leaves.
    let t = tcp_long_lived(&client.netns(), VIP, stays);
    let t_gone = tcp_long_lived(&client.netns(), VIP, gone);
    // Another service whose only producer is the departing container, at the same address
    // and port: its flow must not be touched when `gone` leaves `dns`.
    register(&lab, "stats", OTHER_VIP, gone_c, gone);
    let (other, other_rx) = udp_client(&client.netns(), OTHER_VIP, 53, 40001);
    wait_answer(&other_rx, Duration::from_secs(30), |l| l == gone)
        .unwrap_or_else(|seen| panic!("no answer through {OTHER_VIP}: {seen:?}"));
    let before = deleted_on(&lab, "h1");

    // `gone` leaves dns; its container keeps running and would go on answering a stale flow.
    let o = lab.exec("h1", &["service", "deregister", "dns", "--id", gone]);
    assert!(o.status.success(), "deregister: {}", out(&o));
    drain(&rx);
    let moved = Instant::now();
    wait_answer(&rx, Duration::from_secs(10), |l| l == stays).unwrap_or_else(|seen| {
        panic!(
            "the UDP flow did not move from {gone} to {stays} within 10 s: {seen:?}\n{}",
            nft_and_log(&lab)
        )
    });
    eprintln!("UDP flow moved after {:?}", moved.elapsed());
    // And stays moved.
    drain(&rx);
    std::thread::sleep(Duration::from_secs(1));
    let after: Vec<String> = rx.try_iter().collect();
    assert!(
        !after.is_empty() && after.iter().all(|l| l == stays),
        "after the move: {after:?}"
    );

    // The other service's flow to the same container never moved nor broke.
    let seen: Vec<String> = other_rx.try_iter().collect();
    assert!(
        !seen.is_empty() && seen.iter().all(|l| l == gone),
        "{OTHER_VIP}'s flow: {seen:?}"
    );
    // Exactly one entry went on h1: the dns UDP flow (the TCP connection to the departed,
    // still running container drains; the one to the remaining producer is untouched).
    assert_eq!(deleted_on(&lab, "h1") - before, 1, "{}", nft_and_log(&lab));
    for (c, what) in [
        (t, "TCP to the remaining producer"),
        (t_gone, "TCP to the draining producer"),
    ] {
        let mut c = c;
        drop(c.stdin.take());
        let o = c.wait_with_output().expect("wait");
        assert!(o.status.success(), "{what} broke: {}", out(&o));
    }
    drop(udp);
    drop(other);
}

#[test]
fn a_udp_flow_to_a_vip_moves_when_its_producer_is_removed() {
    // `ferrynet rm` of the answering producer: the container is gone, so its TCP connections
    // are cut too (the next segment meets the other producer and is reset at once).
    let mut lab = Lab::vxlan3("ctrm");
    let u2 = producer(&mut lab, "h2", "u2");
    let u3 = producer(&mut lab, "h3", "u3");
    let client = lab.run("h1", "cl", &[], &["sleep", "infinity"]);
    register(&lab, "dns", VIP, &u2, "u2");
    register(&lab, "dns", VIP, &u3, "u3");
    let (udp, rx) = udp_client(&client.netns(), VIP, 53, 40000);
    let first = wait_answer(&rx, Duration::from_secs(30), |l| l != "-")
        .unwrap_or_else(|seen| panic!("no UDP answer through {VIP}: {seen:?}"));
    let (gone, stays) = if first == "u2" {
        (u2, "u3")
    } else {
        (u3, "u2")
    };
    let mut tcp = tcp_long_lived(&client.netns(), VIP, &first);
    lab.rm(&gone);
    drain(&rx);
    wait_answer(&rx, Duration::from_secs(10), |l| l == stays).unwrap_or_else(|seen| {
        panic!(
            "the UDP flow did not move to {stays} within 10 s: {seen:?}\n{}",
            nft_and_log(&lab)
        )
    });
    // The TCP connection to the removed container fails fast (reset), not after minutes.
    let until = Instant::now() + Duration::from_secs(10);
    let ended = loop {
        if let Some(st) = tcp.try_wait().expect("try_wait") {
            break Some(st);
        }
        if Instant::now() >= until {
            break None;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let _ = tcp.stdin.take().map(|mut s| s.write_all(b"x"));
    let _ = tcp.kill();
    let o = tcp.wait_with_output().expect("wait");
    assert!(
        matches!(ended, Some(st) if !st.success()),
        "TCP to the removed producer should fail at once: {}",
        out(&o)
    );
    drop(udp);
}

#[test]
fn a_udp_flow_to_a_published_port_reaches_the_recreated_container() {
    let mut lab = Lab::vxlan3("ctpub");
    let out_ns = format!("{}-out", lab.name);
    let _ = Command::new("ip").args(["netns", "del", &out_ns]).output();
    lab.add_netns(&out_ns);
    let ul = format!("{}-ul", lab.name);
    let ip = |args: &[&str]| {
        let o = Command::new("ip").args(args).output().expect("ip");
        assert!(o.status.success(), "ip {args:?}: {}", out(&o));
    };
    ip(&["-n", &out_ns, "link", "set", "lo", "up"]);
    ip(&[
        "-n", &ul, "link", "add", "out", "type", "veth", "peer", "name", "eth0", "netns", &out_ns,
    ]);
    ip(&["-n", &ul, "link", "set", "out", "master", "ul0", "up"]);
    ip(&[
        "-n",
        &out_ns,
        "addr",
        "add",
        "172.31.0.200/24",
        "dev",
        "eth0",
    ]);
    ip(&["-n", &out_ns, "link", "set", "eth0", "up"]);

    let code = server_code("s1");
    let s1 = lab.run(
        "h1",
        "s1",
        &["-p", "5353:5300/udp"],
        &["python3", "-c", &code],
    );
    let (udp, rx) = udp_client(&out_ns, "172.31.0.1", 5353, 40000);
    wait_answer(&rx, Duration::from_secs(30), |l| l == "s1")
        .unwrap_or_else(|seen| panic!("no answer from s1: {seen:?}"));

    // Replaced: removed, then a new container with a new address publishes the same port.
    lab.rm(&s1);
    // Holds s1's old address if the allocator reuses the lowest free one.
    let _filler = lab.run("h1", "fill", &[], &["sleep", "infinity"]);
    let code = server_code("s2");
    let s2 = lab.run(
        "h1",
        "s2",
        &["-p", "5353:5300/udp"],
        &["python3", "-c", &code],
    );
    assert_ne!(s1.v4, s2.v4, "the new container must have a new address");
    drain(&rx);
    wait_answer(&rx, Duration::from_secs(10), |l| l == "s2").unwrap_or_else(|seen| {
        panic!(
            "the UDP flow did not reach the recreated container within 10 s: {seen:?}\n{}",
            lab.agent_log_tail("h1", 10)
        )
    });
    drop(udp);
}
