//! Conntrack flushing on a real kernel: in a private network namespace (gone with its thread,
//! and its veth pair with it),
//! an nft output DNAT turns datagrams to a "VIP" into local flows; `conntrack::flush` with a
//! model rule deletes exactly the entries the rule names and leaves the others.

use std::net::{IpAddr, UdpSocket};
use std::process::Command;
use std::time::Duration;

use ferrynet_dataplane::conntrack::{flush, Conntrack};
use ferrynet_model::conntrack::{FlushRule, Frontend, Stale};
use ferrynet_model::portmap::Protocol;

fn must(args: &[&str]) {
    let o = Command::new(args[0])
        .args(&args[1..])
        .output()
        .unwrap_or_else(|e| panic!("running {args:?}: {e}"));
    assert!(
        o.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
}

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

/// Send one datagram from `from_port` to `to` and wait for the echo (so the entry is
/// confirmed and has seen a reply).
fn exchange(from_port: u16, to: &str) {
    let s = UdpSocket::bind(("10.77.0.1", from_port)).expect("bind client");
    s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    s.send_to(b"x", to).expect("send");
    let mut b = [0u8; 16];
    s.recv_from(&mut b).expect("echo");
}

fn echo(port: u16) {
    let s = UdpSocket::bind(("10.77.0.1", port)).expect("bind server");
    std::thread::spawn(move || {
        let mut b = [0u8; 64];
        while let Ok((n, from)) = s.recv_from(&mut b) {
            let _ = s.send_to(&b[..n], from);
        }
    });
}

fn flows(ct: &mut Conntrack) -> Vec<(u16, u16, bool)> {
    let mut v: Vec<_> = ct
        .dump()
        .expect("dump")
        .into_iter()
        .filter(|e| e.flow.protocol == 17 && e.flow.orig_src == ip("10.77.0.1"))
        .map(|e| (e.flow.orig_sport, e.flow.reply_sport, e.flow.dnat))
        .collect();
    v.sort();
    v
}

#[test]
fn flush_deletes_only_the_entries_its_rules_name() {
    std::thread::spawn(|| {
        nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET).expect("unshare (root)");
        must(&["ip", "link", "set", "lo", "up"]);
        must(&[
            "ip", "link", "add", "d0", "type", "veth", "peer", "name", "d1",
        ]);
        must(&["ip", "link", "set", "d1", "up"]);
        must(&["ip", "addr", "add", "10.77.0.1/24", "dev", "d0"]);
        must(&["ip", "link", "set", "d0", "up"]);
        must(&[
            "nft",
            "add table ip t; add chain ip t out { type nat hook output priority -100; }; \
             add rule ip t out ip daddr 10.77.0.9 udp dport 53 dnat to 10.77.0.1:5300; \
             add rule ip t out ip daddr 10.77.0.9 udp dport 54 dnat to 10.77.0.1:5301",
        ]);
        echo(5300);
        echo(5301);
        exchange(40001, "10.77.0.9:53"); // DNATed to :5300
        exchange(40002, "10.77.0.9:54"); // DNATed to :5301
        exchange(40003, "10.77.0.1:5300"); // direct, no NAT
        let mut ct = Conntrack::open().expect("ctnetlink");
        assert_eq!(
            flows(&mut ct),
            vec![
                (40001, 5300, true),
                (40002, 5301, true),
                (40003, 5300, false)
            ]
        );
        // The VIP port 53 lost its target 10.77.0.1:5300: only that flow goes; the same
        // target reached directly, and the other VIP port, stay.
        let rule = FlushRule {
            protocol: Protocol::Udp,
            frontend: Frontend::Address {
                addr: ip("10.77.0.9"),
                port: 53,
            },
            stale: Stale::DnatNotIn {
                targets: Default::default(),
                draining: Default::default(),
            },
        };
        let st = flush(std::slice::from_ref(&rule)).expect("flush");
        assert_eq!(st.deleted, 1, "{st:?}");
        assert_eq!(
            flows(&mut ct),
            vec![(40002, 5301, true), (40003, 5300, false)]
        );
        // Again: nothing left to delete (idempotent).
        assert_eq!(flush(&[rule]).expect("flush").deleted, 0);
        // Undelivered flows to a local port: the direct one.
        let undelivered = FlushRule {
            protocol: Protocol::Udp,
            frontend: Frontend::AnyLocal {
                v6: false,
                port: 5300,
            },
            stale: Stale::Undelivered,
        };
        assert_eq!(flush(&[undelivered]).expect("flush").deleted, 1);
        assert_eq!(flows(&mut ct), vec![(40002, 5301, true)]);
        // A TCP rule never touches UDP entries.
        let tcp = FlushRule {
            protocol: Protocol::Tcp,
            frontend: Frontend::Address {
                addr: ip("10.77.0.9"),
                port: 54,
            },
            stale: Stale::DnatNotIn {
                targets: Default::default(),
                draining: Default::default(),
            },
        };
        assert_eq!(flush(&[tcp]).expect("flush").deleted, 0);
        assert_eq!(flows(&mut ct), vec![(40002, 5301, true)]);
    })
    .join()
    .expect("thread");
}
