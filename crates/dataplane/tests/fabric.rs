//! The fabric on a real kernel: two "hosts" (network namespaces joined by a veth underlay), each
//! with a bridge and one "container" namespace behind it, programmed with `model::fabric::desired`
//! and the dataplane's `ensure_vxlan` / `read_fabric` / `apply_fabric`; reachability is proven
//! with ping between the containers. All traffic stays inside the namespaces made here, and they
//! are deleted on drop, also when a test fails.

use std::net::IpAddr;
use std::process::{Command, Output};
use std::sync::atomic::{AtomicU32, Ordering};

use ferrynet_dataplane::fabric::RTPROT_FERRYNET;
use ferrynet_dataplane::netlink::Netlink;
use ferrynet_dataplane::netns::Netns;
use ferrynet_dataplane::vxlan::{VxlanSpec, VXLAN_PORT};
use ferrynet_model::fabric::{
    desired, diff, vtep_mac, vxlan_dev_name, vxlan_local, vxlan_mtu, Backend, FabricInput,
    FabricState, Peer, PeerStatus,
};
use ipnet::IpNet;

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// A per-test random tag: names of this test's namespaces never collide with another run's.
fn tag() -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    let mix = nanos ^ (std::process::id() << 12) ^ (COUNTER.fetch_add(1, Ordering::SeqCst) << 28);
    format!("{:06x}", mix & 0xff_ffff)
}

fn sh(args: &[&str]) -> Output {
    Command::new(args[0])
        .args(&args[1..])
        .output()
        .unwrap_or_else(|e| panic!("running {args:?}: {e}"))
}

fn must(args: &[&str]) -> String {
    let o = sh(args);
    assert!(
        o.status.success(),
        "{args:?} failed: {}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// Namespaces deleted on drop.
struct Guard(Vec<String>);

impl Drop for Guard {
    fn drop(&mut self) {
        for n in &self.0 {
            let _ = Netns::delete_named(n);
        }
    }
}

/// One "host": its namespace, underlay addresses, block and container.
struct Host {
    name: &'static str,
    ns: String,
    container: String,
    underlay: Vec<IpNet>,
    blocks: Vec<IpNet>,
    /// The container's addresses (IPv4, IPv6).
    addrs: (IpAddr, IpAddr),
}

struct Lab {
    hosts: [Host; 2],
    network: String,
    _guard: Guard,
}

fn net(s: &str) -> IpNet {
    s.parse().expect("test prefix")
}

/// Two hosts whose underlay interfaces `ul0` are a veth pair; host N (1 or 2) has underlay
/// `under4[N-1]`/`under6[N-1]`, block 10.201.N.0/24 + fd20:1:N::/64 on bridge `br0` and a
/// container at .2 / ::2 with default routes via the bridge.
fn lab(under4: [&str; 2], under6: [&str; 2], extra_routes: bool) -> Lab {
    let t = tag();
    let mut guard = Guard(Vec::new());
    let mut hosts = Vec::new();
    for (i, name) in ["h1", "h2"].into_iter().enumerate() {
        let n = i + 1;
        let ns = format!("fnf{t}{name}");
        let container = format!("fnf{t}c{n}");
        for x in [&ns, &container] {
            Netns::create_named(x).expect("create netns");
            guard.0.push(x.clone());
            must(&["ip", "-n", x, "link", "set", "lo", "up"]);
        }
        hosts.push(Host {
            name,
            ns,
            container,
            underlay: vec![net(under4[i]), net(under6[i])],
            blocks: vec![
                net(&format!("10.201.{n}.0/24")),
                net(&format!("fd20:1:{n}::/64")),
            ],
            addrs: (
                format!("10.201.{n}.2").parse().expect("ip"),
                format!("fd20:1:{n}::2").parse().expect("ip"),
            ),
        });
    }
    let (h1, h2) = (&hosts[0].ns, &hosts[1].ns);
    must(&[
        "ip", "-n", h1, "link", "add", "ul0", "type", "veth", "peer", "name", "ul0", "netns", h2,
    ]);
    for h in &hosts {
        let x = h.ns.as_str();
        for a in &h.underlay {
            let a = a.to_string();
            let mut cmd = vec!["ip", "-n", x, "addr", "add", &a, "dev", "ul0"];
            if a.contains(':') {
                cmd.push("nodad");
            }
            must(&cmd);
        }
        must(&["ip", "-n", x, "link", "set", "ul0", "up"]);
        must(&["ip", "-n", x, "link", "add", "br0", "type", "bridge"]);
        let (g4, g6) = (
            ferrynet_model::fabric::block_gateway(&h.blocks[0]),
            ferrynet_model::fabric::block_gateway(&h.blocks[1]),
        );
        let g4s = format!("{g4}/24");
        let g6s = format!("{g6}/64");
        must(&["ip", "-n", x, "addr", "add", &g4s, "dev", "br0"]);
        must(&["ip", "-n", x, "addr", "add", &g6s, "dev", "br0", "nodad"]);
        must(&["ip", "-n", x, "link", "set", "br0", "up"]);
        must(&[
            "ip",
            "-n",
            x,
            "link",
            "add",
            "vc",
            "type",
            "veth",
            "peer",
            "name",
            "eth0",
            "netns",
            &h.container,
        ]);
        must(&["ip", "-n", x, "link", "set", "vc", "master", "br0", "up"]);
        for s in ["net.ipv4.ip_forward=1", "net.ipv6.conf.all.forwarding=1"] {
            must(&["ip", "netns", "exec", x, "sysctl", "-qw", s]);
        }
        let c = h.container.as_str();
        let a4 = format!("{}/24", h.addrs.0);
        let a6 = format!("{}/64", h.addrs.1);
        must(&["ip", "-n", c, "addr", "add", &a4, "dev", "eth0"]);
        must(&["ip", "-n", c, "addr", "add", &a6, "dev", "eth0", "nodad"]);
        must(&["ip", "-n", c, "link", "set", "eth0", "up"]);
        must(&[
            "ip",
            "-n",
            c,
            "route",
            "add",
            "default",
            "via",
            &g4.to_string(),
        ]);
        must(&[
            "ip",
            "-n",
            c,
            "-6",
            "route",
            "add",
            "default",
            "via",
            &g6.to_string(),
        ]);
    }
    if extra_routes {
        // Underlay subnets that differ but are reachable on the wire (a routed underlay in
        // miniature): the route backend cannot use them, VXLAN can.
        for (me, other) in [(&hosts[0], &hosts[1]), (&hosts[1], &hosts[0])] {
            for a in &other.underlay {
                let dst = a.trunc().to_string();
                must(&["ip", "-n", &me.ns, "route", "add", &dst, "dev", "ul0"]);
            }
        }
    }
    let [a, b]: [Host; 2] = hosts.try_into().ok().expect("two hosts");
    Lab {
        hosts: [a, b],
        network: format!("t{t}"),
        _guard: guard,
    }
}

impl Lab {
    fn peers(&self) -> Vec<Peer> {
        self.hosts
            .iter()
            .map(|h| Peer {
                host: h.name.to_string(),
                underlay: h.underlay.clone(),
                vtep_mac: vtep_mac(h.name, &self.network),
                blocks: h.blocks.clone(),
            })
            .collect()
    }

    fn vx(&self) -> String {
        vxlan_dev_name(&self.network)
    }

    fn nl(&self, h: usize) -> Netlink {
        let ns = Netns::open(Netns::named_path(&self.hosts[h].ns)).expect("open netns");
        Netlink::in_netns(&ns).expect("netlink in netns")
    }

    /// One reconcile of host `h` against `peers`, with host `h`'s underlay seen as `my_underlay`:
    /// ensure the VXLAN device, compute, read, diff, apply. Returns the desired state, the peer
    /// statuses and the apply failures.
    async fn reconcile(
        &self,
        h: usize,
        my_underlay: &[IpNet],
        backend: Backend,
        peers: &[Peer],
    ) -> (FabricState, Vec<PeerStatus>, Vec<String>) {
        let nl = self.nl(h);
        let host = &self.hosts[h];
        let vx = self.vx();
        let ul = nl
            .link_by_name("ul0")
            .await
            .expect("ul0")
            .expect("ul0 exists");
        let local = vxlan_local(my_underlay).expect("an underlay address");
        let spec = VxlanSpec {
            name: vx.clone(),
            vni: 4242,
            local,
            underlay_index: Some(ul.index),
            port: VXLAN_PORT,
            mtu: vxlan_mtu(ul.mtu, local.is_ipv6()),
            mac: vtep_mac(host.name, &self.network),
        };
        nl.ensure_vxlan(&spec).await.expect("ensure_vxlan");
        let (want, status) = desired(&FabricInput {
            me: host.name,
            my_underlay,
            underlay_dev: "ul0",
            vxlan_dev: &vx,
            backend,
            peers,
            my_blocks: &host.blocks,
        });
        let current = nl
            .read_fabric(std::slice::from_ref(&vx))
            .await
            .expect("read_fabric");
        let d = diff(&current, &want);
        let failures = nl.apply_fabric(&d).await.expect("apply_fabric");
        (want, status, failures)
    }

    async fn read(&self, h: usize) -> FabricState {
        self.nl(h)
            .read_fabric(&[self.vx()])
            .await
            .expect("read_fabric")
    }

    /// Ping from host `from`'s container to host `to`'s container address (v6 or v4).
    fn ping(&self, from: usize, to: usize, v6: bool) -> bool {
        let dst = if v6 {
            self.hosts[to].addrs.1
        } else {
            self.hosts[to].addrs.0
        }
        .to_string();
        let c = &self.hosts[from].container;
        // A first packet may be lost while ARP/NDP resolves on the underlay: allow a retry.
        (0..3).any(|_| {
            sh(&[
                "ip", "netns", "exec", c, "ping", "-c1", "-W1", "-n", "-q", &dst,
            ])
            .status
            .success()
        })
    }

    fn ping_all(&self) -> bool {
        [(0, 1, false), (1, 0, false), (0, 1, true), (1, 0, true)]
            .into_iter()
            .all(|(a, b, v6)| self.ping(a, b, v6))
    }

    fn vxlan_tx_packets(&self, h: usize) -> u64 {
        let out = must(&[
            "ip",
            "-n",
            &self.hosts[h].ns,
            "-j",
            "-s",
            "link",
            "show",
            "dev",
            &self.vx(),
        ]);
        let v: serde_json::Value = serde_json::from_str(&out).expect("ip -j output");
        v[0]["stats64"]["tx"]["packets"]
            .as_u64()
            .expect("tx packets")
    }

    fn ip_routes(&self, h: usize, args: &[&str]) -> String {
        let mut cmd = vec!["ip", "-n", &self.hosts[h].ns];
        cmd.extend_from_slice(args);
        must(&cmd)
    }
}

async fn converge(lab: &Lab, backend: Backend, underlays: [&[IpNet]; 2]) -> [FabricState; 2] {
    let peers = lab.peers();
    let mut out = Vec::new();
    for (h, ul) in underlays.into_iter().enumerate() {
        let (want, status, failures) = lab.reconcile(h, ul, backend, &peers).await;
        assert!(failures.is_empty(), "apply failures: {failures:?}");
        assert_eq!(status.len(), 1, "only the other host is a peer: {status:?}");
        assert!(status[0].errors.is_empty(), "{status:?}");
        assert_eq!(lab.read(h).await, want, "read back equals desired");
        // A second reconcile changes nothing.
        let (_, _, failures) = lab.reconcile(h, ul, backend, &peers).await;
        assert!(failures.is_empty());
        let again = lab.read(h).await;
        assert!(
            diff(&again, &want).is_empty(),
            "second reconcile is a no-op"
        );
        out.push(want);
    }
    [out.remove(0), out.remove(0)]
}

#[tokio::test]
async fn route_backend_reaches_the_other_host_v4_and_v6() {
    let lab = lab(
        ["192.168.77.1/24", "192.168.77.2/24"],
        ["fd77::1/64", "fd77::2/64"],
        false,
    );
    assert!(
        !lab.ping(0, 1, false),
        "no path before the fabric is programmed"
    );

    // A route we did not make: left alone, and never read as ours.
    lab.ip_routes(
        0,
        &[
            "route",
            "add",
            "10.250.0.0/24",
            "via",
            "192.168.77.2",
            "proto",
            "static",
        ],
    );
    // And one in the way of a peer block: reported, not replaced.
    lab.ip_routes(
        0,
        &[
            "route",
            "add",
            "10.201.9.0/24",
            "via",
            "192.168.77.2",
            "proto",
            "static",
        ],
    );

    let u0 = lab.hosts[0].underlay.clone();
    let u1 = lab.hosts[1].underlay.clone();
    let [s0, _] = converge(&lab, Backend::Route, [&u0, &u1]).await;
    assert_eq!(s0.routes.len(), 2);
    assert!(s0.routes.iter().all(|r| r.dev == "ul0" && !r.onlink));
    assert!(s0.fdb.is_empty() && s0.neigh.is_empty());
    let shown = lab.ip_routes(0, &["route", "show", "proto", &RTPROT_FERRYNET.to_string()]);
    assert!(
        shown.contains("10.201.2.0/24 via 192.168.77.2 dev ul0"),
        "{shown}"
    );
    let shown6 = lab.ip_routes(
        0,
        &["-6", "route", "show", "proto", &RTPROT_FERRYNET.to_string()],
    );
    assert!(
        shown6.contains("fd20:1:2::/64 via fd77::2 dev ul0"),
        "{shown6}"
    );

    assert!(
        lab.ping_all(),
        "containers reach each other over routes, IPv4 and IPv6"
    );
    assert_eq!(lab.vxlan_tx_packets(0), 0, "nothing went through VXLAN");

    // A third host claiming a block that a foreign route holds: the route is reported, not
    // clobbered; the foreign routes stay.
    let mut peers = lab.peers();
    peers.push(Peer {
        host: "h3".into(),
        underlay: vec![net("192.168.77.3/24")],
        vtep_mac: vtep_mac("h3", &lab.network),
        blocks: vec![net("10.201.9.0/24")],
    });
    let (_, _, failures) = lab.reconcile(0, &u0, Backend::Route, &peers).await;
    assert_eq!(failures.len(), 1, "{failures:?}");
    assert!(failures[0].contains("10.201.9.0/24") && failures[0].contains("left alone"));
    let main = lab.ip_routes(0, &["route", "show"]);
    assert!(
        main.contains("10.250.0.0/24 via 192.168.77.2 dev ul0 proto static"),
        "{main}"
    );
    assert!(
        main.contains("10.201.9.0/24 via 192.168.77.2 dev ul0 proto static"),
        "{main}"
    );
    assert!(!lab
        .read(0)
        .await
        .routes
        .iter()
        .any(|r| r.dst == net("10.250.0.0/24")));

    // Removing the peer removes its routes (and only those): the path is gone.
    let only_me: Vec<Peer> = lab.peers().into_iter().filter(|p| p.host == "h1").collect();
    let (want, _, failures) = lab.reconcile(0, &u0, Backend::Route, &only_me).await;
    assert!(failures.is_empty() && want.routes.is_empty());
    assert_eq!(lab.read(0).await, FabricState::default());
    assert!(lab
        .ip_routes(0, &["route", "show"])
        .contains("10.250.0.0/24"));
    assert!(!lab.ping(0, 1, false) && !lab.ping(0, 1, true));
}

async fn vxlan_case(underlay_v6: bool) {
    let lab = lab(
        ["192.168.77.1/24", "192.168.77.2/24"],
        ["fd77::1/64", "fd77::2/64"],
        false,
    );
    // The tunnel family follows the underlay handed to `desired` and `ensure_vxlan`.
    let pick = |h: &Host| -> Vec<IpNet> {
        h.underlay
            .iter()
            .filter(|a| a.addr().is_ipv6() == underlay_v6)
            .copied()
            .collect()
    };
    let (u0, u1) = (pick(&lab.hosts[0]), pick(&lab.hosts[1]));
    let [s0, s1] = converge(&lab, Backend::Vxlan, [&u0, &u1]).await;
    for (s, peer) in [(&s0, &lab.hosts[1]), (&s1, &lab.hosts[0])] {
        assert_eq!(s.routes.len(), 2);
        assert!(s.routes.iter().all(|r| r.dev == lab.vx() && r.onlink));
        assert_eq!(s.neigh.len(), 2);
        assert_eq!(s.fdb.len(), 1);
        let dst = s.fdb.iter().next().expect("fdb").dst;
        assert!(peer.underlay.iter().any(|a| a.addr() == dst));
        assert_eq!(dst.is_ipv6(), underlay_v6);
    }
    let dev = lab.ip_routes(0, &["-d", "link", "show", "dev", &lab.vx()]);
    assert!(
        dev.contains("vxlan id 4242") && dev.contains("nolearning"),
        "{dev}"
    );
    assert!(
        dev.contains(&format!("mtu {}", if underlay_v6 { 1430 } else { 1450 })),
        "{dev}"
    );

    let before = lab.vxlan_tx_packets(0);
    assert!(
        lab.ping_all(),
        "containers reach each other through VXLAN, IPv4 and IPv6"
    );
    assert!(
        lab.vxlan_tx_packets(0) >= before + 2,
        "the pings went through VXLAN"
    );

    // Every route through the tunnel leaves from this host's gateway in the network (the
    // device has no address): its first IPv4 and IPv6 block's first address.
    for (s, me) in [(&s0, &lab.hosts[0]), (&s1, &lab.hosts[1])] {
        for r in &s.routes {
            let mine = me
                .blocks
                .iter()
                .find(|b| b.addr().is_ipv6() == r.dst.addr().is_ipv6())
                .expect("a block of the family");
            assert_eq!(
                r.src,
                Some(ferrynet_model::fabric::block_gateway(mine)),
                "{r}"
            );
        }
    }
    // A source this host does not hold: the route still goes in, without it, and says so;
    // the next reconcile puts the right source back.
    let nl = lab.nl(0);
    let r = s0
        .routes
        .iter()
        .find(|r| r.dst.addr().is_ipv4())
        .expect("v4 route");
    let bad = ferrynet_model::fabric::FabricRoute {
        src: Some("10.250.250.250".parse().unwrap()),
        ..r.clone()
    };
    let failures = nl
        .apply_fabric(&ferrynet_model::fabric::FabricDiff {
            add_routes: vec![bad],
            ..Default::default()
        })
        .await
        .expect("apply");
    assert!(
        failures.len() == 1 && failures[0].contains("added without its source"),
        "{failures:?}"
    );
    let read = lab.read(0).await;
    let now = read
        .routes
        .iter()
        .find(|x| x.dst == r.dst)
        .expect("route kept");
    assert_eq!(now.src, None, "{now}");
    let (_, _, failures) = lab.reconcile(0, &u0, Backend::Vxlan, &lab.peers()).await;
    assert!(failures.is_empty(), "{failures:?}");
    assert_eq!(lab.read(0).await, s0);

    // ensure_vxlan is stable: same device, same index.
    let idx = nl.link_index(&lab.vx()).await.expect("lookup");
    lab.reconcile(0, &u0, Backend::Vxlan, &lab.peers()).await;
    assert_eq!(nl.link_index(&lab.vx()).await.expect("lookup"), idx);

    // Removing the peer removes its routes, FDB and neighbour entries.
    let only_me: Vec<Peer> = lab.peers().into_iter().filter(|p| p.host == "h1").collect();
    let (want, _, failures) = lab.reconcile(0, &u0, Backend::Vxlan, &only_me).await;
    assert!(failures.is_empty() && want == FabricState::default());
    assert_eq!(lab.read(0).await, FabricState::default());
    assert!(!lab.ping(0, 1, false) && !lab.ping(0, 1, true));

    // Back again, then a VNI change recreates the device, which drops its entries; the next
    // reconcile restores them.
    converge(&lab, Backend::Vxlan, [&u0, &u1]).await;
    assert!(lab.ping(0, 1, true));
    let ul = nl.link_by_name("ul0").await.expect("ul0").expect("ul0");
    let local = vxlan_local(&u0).expect("local");
    let spec = VxlanSpec {
        name: lab.vx(),
        vni: 4243,
        local,
        underlay_index: Some(ul.index),
        port: VXLAN_PORT,
        mtu: vxlan_mtu(ul.mtu, local.is_ipv6()),
        mac: vtep_mac("h1", &lab.network),
    };
    let new_idx = nl.ensure_vxlan(&spec).await.expect("recreate");
    assert_ne!(new_idx, idx.expect("index"));
    assert!(
        lab.read(0).await.fdb.is_empty(),
        "a new device starts empty"
    );
}

#[tokio::test]
async fn vxlan_backend_over_ipv4_underlay_v4_and_v6() {
    vxlan_case(false).await;
}

#[tokio::test]
async fn vxlan_backend_over_ipv6_underlay_v4_and_v6() {
    vxlan_case(true).await;
}

#[tokio::test]
async fn auto_uses_vxlan_when_hosts_do_not_share_a_subnet() {
    // Different underlay subnets (routed to each other): route refuses, auto picks VXLAN.
    let lab = lab(
        ["192.168.77.1/24", "192.168.78.2/24"],
        ["fd77::1/64", "fd78::2/64"],
        true,
    );
    let u0 = lab.hosts[0].underlay.clone();
    let u1 = lab.hosts[1].underlay.clone();
    let (want, status, failures) = lab.reconcile(0, &u0, Backend::Route, &lab.peers()).await;
    assert!(failures.is_empty() && want.routes.is_empty());
    assert_eq!(status[0].backend, None);
    assert!(
        status[0].errors[0].contains("is not on a shared link with h1"),
        "{status:?}"
    );
    assert!(!lab.ping(0, 1, false));

    converge(&lab, Backend::Auto, [&u0, &u1]).await;
    let (_, status, _) = lab.reconcile(0, &u0, Backend::Auto, &lab.peers()).await;
    assert_eq!(status[0].backend, Some(Backend::Vxlan));
    assert!(lab.ping_all());
}
