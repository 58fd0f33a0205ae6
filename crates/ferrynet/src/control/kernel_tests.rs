//! The control layer's attach and detach flows over the recording kernel and nft fakes
//! (`ferrynet_dataplane::kernel::fake`) and an embedded store in a temp dir: no root needed.
//! What the kernel really does with these calls is the integration tests' part.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::Arc;

use ferrynet_dataplane::kernel::fake::{Recording, RecordingNft, LOOPBACK};
use ferrynet_model::bandwidth::Bandwidth;
use ferrynet_model::blocks::HostView;
use ferrynet_model::network::{keys, EndpointOwner, Network};
use ferrynet_store::{EmbeddedStore, Store};

use super::endpoint::AttachRequest;
use super::Control;
use crate::error::ControlError;

struct Lab {
    dir: tempfile::TempDir,
    ctl: Control,
    kernel: Recording,
    nft: RecordingNft,
    view: HostView,
}

impl Lab {
    async fn new() -> Lab {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn Store> = Arc::new(EmbeddedStore::open(dir.path().join("s")).unwrap());
        let (kernel, nft) = (Recording::default(), RecordingNft::default());
        let ctl = Control::with_parts(
            store,
            Arc::new(nft.clone()),
            Arc::new(kernel.clone()),
            dir.path(),
        );
        let net = ctl
            .create_network(Network::bridged("blue", ["10.5.0.0/24".parse().unwrap()]))
            .await
            .unwrap();
        Lab {
            dir,
            ctl,
            kernel,
            nft,
            view: HostView::single(net),
        }
    }

    /// A namespace path that exists (detach only enters namespaces that do).
    fn netns(&self, name: &str) -> String {
        let p = self.dir.path().join(name);
        std::fs::write(&p, b"").unwrap();
        p.display().to_string()
    }

    fn request(&self, id: &str) -> AttachRequest {
        AttachRequest {
            container_id: id.into(),
            ifname: "eth0".into(),
            netns: self.netns(id),
            static_ips: Vec::new(),
            mac: None,
            port_mappings: Vec::new(),
            name: None,
            aliases: Vec::new(),
            owner: EndpointOwner::Cni,
            pod: None,
            labels: BTreeMap::new(),
            bandwidth: None,
        }
    }

    async fn keys(&self, prefix: &str) -> Vec<String> {
        let (kvs, _) = self.ctl.store.range(prefix).await.unwrap();
        kvs.into_iter().map(|kv| kv.key).collect()
    }
}

#[tokio::test]
async fn attach_plumbs_then_records_and_detach_undoes_it() {
    let lab = Lab::new().await;
    let (ep, _) = lab.ctl.attach(&lab.view, lab.request("c1")).await.unwrap();
    let ip = ep.ips[0].addr();
    assert!(lab.view.net.subnets[0].cidr.contains(&ip));
    // Bridge first (and ferrynet's iptables chain with a new bridge), then the veth.
    let calls = lab.kernel.calls();
    let pos = |op: &str| calls.iter().position(|c| c.starts_with(op)).unwrap();
    assert!(pos("ensure_bridge") < pos("ensure_forward_accept"));
    assert!(pos("ensure_forward_accept") < pos("attach_veth"));
    // The record carries what the kernel made.
    let host_veth = ep.host_veth.clone().expect("host end recorded");
    assert!(lab.kernel.state().host_links.contains_key(&host_veth));
    assert!(ep.mac.is_some() && ep.host_mac.is_some());
    assert_eq!(lab.keys(&keys::all_endpoints()).await.len(), 1);
    assert_eq!(
        lab.keys(&keys::ipam_prefix("blue")).await,
        vec![keys::ipam("blue", ip)]
    );
    // The port's anti-spoofing elements went to nft with the address.
    assert!(lab
        .nft
        .batches()
        .iter()
        .any(|b| b.contains(&host_veth) && b.contains(&ip.to_string())));

    // A retried ADD finds the interface in place: same address, no second veth.
    let (again, _) = lab.ctl.attach(&lab.view, lab.request("c1")).await.unwrap();
    assert_eq!(again.ips, ep.ips);
    assert_eq!(lab.kernel.calls_of("attach_veth").len(), 1);

    let net = lab.view.net.clone();
    lab.ctl
        .detach(&net, "c1", "eth0", ep.netns.as_deref())
        .await
        .unwrap();
    {
        let st = lab.kernel.state();
        assert!(!st.host_links.contains_key(&host_veth));
        assert!(st.containers.values().all(|m| m.is_empty()));
    }
    assert!(lab.keys(&keys::all_endpoints()).await.is_empty());
    assert!(lab.keys(&keys::ipam_prefix("blue")).await.is_empty());
    // A repeated DEL succeeds and touches no container namespace.
    lab.ctl.detach(&net, "c1", "eth0", None).await.unwrap();
}

#[tokio::test]
async fn a_held_address_is_refused_before_the_kernel_is_touched() {
    let lab = Lab::new().await;
    let (first, _) = lab.ctl.attach(&lab.view, lab.request("c1")).await.unwrap();
    let held = first.ips[0].addr();
    let mut req = lab.request("c2");
    req.static_ips = vec![held];
    let err = lab.ctl.attach(&lab.view, req).await.unwrap_err();
    assert!(err.to_string().contains(&held.to_string()), "{err}");
    // No veth for c2, no record, and c1's address still c1's.
    assert_eq!(lab.kernel.calls_of("attach_veth").len(), 1);
    assert!(lab
        .ctl
        .endpoint("blue", "c2", "eth0")
        .await
        .unwrap()
        .is_none());
    assert_eq!(lab.keys(&keys::ipam_prefix("blue")).await.len(), 1);
}

#[tokio::test]
async fn concurrent_attaches_race_in_the_store_and_never_share_an_address() {
    let lab = Lab::new().await;
    let reqs: Vec<_> = (0..8).map(|i| lab.request(&format!("c{i}"))).collect();
    let attaches = reqs.into_iter().map(|r| lab.ctl.attach(&lab.view, r));
    let results = futures::future::join_all(attaches).await;
    let mut ips: Vec<IpAddr> = results
        .into_iter()
        .map(|r| r.unwrap().0.ips[0].addr())
        .collect();
    ips.sort();
    ips.dedup();
    assert_eq!(ips.len(), 8, "an address was given twice");
    assert_eq!(lab.keys(&keys::ipam_prefix("blue")).await.len(), 8);
}

#[tokio::test]
async fn a_failure_after_the_veth_undoes_link_limits_and_reservation() {
    let lab = Lab::new().await;
    lab.kernel.fail("apply_shaping");
    let mut req = lab.request("c1");
    req.bandwidth = Some(Bandwidth {
        ingress_rate: 1_000_000,
        ingress_burst: 100_000,
        egress_rate: 1_000_000,
        egress_burst: 100_000,
    });
    let err = lab.ctl.attach(&lab.view, req).await.unwrap_err();
    assert!(matches!(err, ControlError::Dataplane { .. }), "{err}");
    // In reverse: the veth, the IFB, then the reservation.
    let calls = lab.kernel.calls();
    let pos = |op: &str| calls.iter().position(|c| c.starts_with(op)).unwrap();
    assert!(pos("attach_veth") < pos("apply_shaping"));
    assert!(pos("apply_shaping") < pos("detach_veth"));
    assert!(pos("detach_veth") < pos("remove_ifb"));
    {
        let st = lab.kernel.state();
        assert!(st.containers.values().all(|m| m.is_empty()));
        assert_eq!(
            st.host_links.len(),
            1,
            "only the bridge is left: {:?}",
            st.host_links
        );
    }
    assert!(lab.keys(&keys::all_endpoints()).await.is_empty());
    assert!(lab.keys(&keys::ipam_prefix("blue")).await.is_empty());
}

#[tokio::test]
async fn a_foreign_interface_of_that_name_is_left_alone() {
    let lab = Lab::new().await;
    let req = lab.request("c1");
    // Someone else's eth0 is in the container already.
    let foreign = ferrynet_dataplane::veth::IfaceState {
        index: 99,
        mac: [2, 0, 0, 0, 0, 99],
        mtu: 1500,
        up: true,
        addresses: vec!["192.0.2.9/24".parse().unwrap()],
        routes: Vec::new(),
    };
    lab.kernel
        .state()
        .containers
        .entry(req.netns.clone())
        .or_default()
        .insert("eth0".into(), foreign.clone());
    let err = lab.ctl.attach(&lab.view, req.clone()).await.unwrap_err();
    assert!(matches!(err, ControlError::IfaceExists(_)), "{err}");
    // Its interface survives (only the host end was cleaned up); nothing stays reserved.
    assert_eq!(
        lab.kernel.state().containers[&req.netns].get("eth0"),
        Some(&foreign)
    );
    assert!(lab
        .kernel
        .calls_of("detach_veth")
        .iter()
        .all(|c| !c.contains(&req.netns)));
    assert!(lab.keys(&keys::ipam_prefix("blue")).await.is_empty());
}

fn cidr(s: &str) -> ipnet::IpNet {
    s.parse().unwrap()
}

/// A routed network's record (its gateways go on `lo`).
fn routed(name: &str, cidr_: &str) -> Network {
    let mut n = Network::bridged(name, [cidr(cidr_)]);
    n.mode = ferrynet_model::network::NetworkMode::Routed;
    n
}

impl Lab {
    /// The network's bridge or gateways, as an ADD leaves them.
    async fn plumb(&self, net: &Network) {
        let host = self.ctl.host_links().unwrap();
        self.ctl.ensure_bridge(&*host, net).await.unwrap();
    }

    /// Create `net` and plumb its bridge or gateways, as its first ADD would.
    async fn create_plumbed(&self, net: Network) -> Network {
        let net = self.ctl.create_network(net).await.unwrap();
        self.plumb(&net).await;
        net
    }

    /// The host addresses on `lo` and ferrynet's `unreachable` routes.
    fn gateways(&self) -> (Vec<ipnet::IpNet>, Vec<ipnet::IpNet>) {
        let st = self.kernel.state();
        let lo = st.addresses.get(&LOOPBACK).into_iter().flatten();
        (
            lo.copied().collect(),
            st.unreachable.iter().copied().collect(),
        )
    }

    fn pos(&self, call: &str) -> usize {
        let calls = self.kernel.calls();
        calls
            .iter()
            .position(|c| c.starts_with(call))
            .unwrap_or_else(|| panic!("no {call} in {calls:?}"))
    }
}

#[tokio::test]
async fn removing_the_last_network_detaches_then_deletes_its_bridge_then_the_forward_chain() {
    let lab = Lab::new().await;
    let (ep, _) = lab.ctl.attach(&lab.view, lab.request("c1")).await.unwrap();
    let bridge = lab.view.net.bridge.clone();
    assert!(lab.kernel.state().bridges.contains(&bridge));
    lab.ctl.delete_network("blue", true).await.unwrap();
    // The container's veth, then the bridge, then (no network left) ferrynet's FORWARD chain.
    assert!(lab.pos("detach_veth") < lab.pos(&format!("delete_bridge {bridge}")));
    assert!(lab.pos("delete_bridge") < lab.pos("remove_forward_accept"));
    let st = lab.kernel.state();
    assert!(st.host_links.is_empty(), "left: {:?}", st.host_links);
    assert!(st.bridges.is_empty() && st.masters.is_empty());
    assert!(!st.host_links.contains_key(ep.host_veth.as_deref().unwrap()));
}

#[tokio::test]
async fn removing_one_of_two_networks_keeps_the_other_bridge_and_the_forward_chain() {
    let lab = Lab::new().await;
    lab.plumb(&lab.view.net).await;
    let red = lab
        .create_plumbed(Network::bridged("red", [cidr("10.6.0.0/24")]))
        .await;
    lab.ctl.delete_network("blue", false).await.unwrap();
    assert_eq!(
        lab.kernel.calls_of("delete_bridge"),
        vec![format!("delete_bridge {}", lab.view.net.bridge)]
    );
    assert!(lab.kernel.calls_of("remove_forward_accept").is_empty());
    let st = lab.kernel.state();
    assert_eq!(st.bridges.iter().collect::<Vec<_>>(), vec![&red.bridge]);
    // Red's gateway stays on red's bridge.
    let red_index = st.host_links[&red.bridge];
    assert!(st.addresses[&red_index].contains(&cidr("10.6.0.1/24")));
}

#[tokio::test]
async fn a_bridge_that_cannot_be_deleted_fails_the_removal_and_the_sweep_takes_it_later() {
    let lab = Lab::new().await;
    lab.plumb(&lab.view.net).await;
    let bridge = lab.view.net.bridge.clone();
    lab.kernel.fail("delete_bridge");
    let err = lab.ctl.delete_network("blue", false).await.unwrap_err();
    assert!(matches!(err, ControlError::Dataplane { .. }), "{err}");
    assert!(err.to_string().contains(&bridge), "{err}");
    // The record is gone (the store goes first); the edge is not torn down past the failure.
    assert!(lab.ctl.network("blue").await.unwrap().is_none());
    assert!(lab.kernel.calls_of("remove_forward_accept").is_empty());
    assert!(lab.kernel.state().bridges.contains(&bridge));
    // `ferrynet reload` or the next agent start sweeps it.
    lab.kernel.state().failing.clear();
    assert_eq!(lab.ctl.remove_stale_bridges().await.unwrap(), vec![bridge]);
    assert!(lab.kernel.state().bridges.is_empty());
}

#[tokio::test]
async fn removing_a_routed_network_takes_only_its_gateways_and_unreachable_routes() {
    let lab = Lab::new().await;
    lab.create_plumbed(routed("green", "10.8.0.0/24")).await;
    lab.create_plumbed(routed("teal", "10.9.0.0/24")).await;
    let (lo, unreachable) = lab.gateways();
    assert_eq!((lo.len(), unreachable.len()), (2, 2));
    lab.ctl.delete_network("green", false).await.unwrap();
    // No bridge to delete: the gateways of green's pool go, teal's stay.
    assert!(lab.kernel.calls_of("delete_bridge").is_empty());
    assert_eq!(
        lab.kernel.calls_of("remove_gateways"),
        vec![format!("remove_gateways {:?}", vec![cidr("10.8.0.0/24")])]
    );
    assert_eq!(
        lab.gateways(),
        (vec![cidr("10.9.0.1/32")], vec![cidr("10.9.0.0/24")])
    );
}

#[tokio::test]
async fn the_sweep_removes_only_what_no_stored_network_uses() {
    let lab = Lab::new().await;
    lab.plumb(&lab.view.net).await;
    lab.create_plumbed(routed("teal", "10.9.0.0/24")).await;
    {
        let mut st = lab.kernel.state();
        // Left by networks removed while this host was away, and the host's own bridge.
        st.add_bridge("fn-gone", &[cidr("10.5.0.1/24")]);
        st.add_bridge("docker0", &[cidr("172.17.0.1/16")]);
        st.unreachable.insert(cidr("10.10.0.0/24"));
        // A removed routed network's gateway goes with its route; someone's host address on
        // lo outside any ferrynet route stays.
        let lo = st.addresses.entry(LOOPBACK).or_default();
        lo.insert(cidr("10.10.0.1/32"));
        lo.insert(cidr("192.0.2.7/32"));
    }
    let removed = lab.ctl.remove_stale_bridges().await.unwrap();
    assert_eq!(removed, vec!["fn-gone".to_string()]);
    let bridges: Vec<_> = lab.kernel.state().bridges.iter().cloned().collect();
    assert_eq!(
        bridges,
        vec!["docker0".to_string(), lab.view.net.bridge.clone()]
    );
    assert_eq!(
        lab.gateways(),
        (
            vec![cidr("10.9.0.1/32"), cidr("192.0.2.7/32")],
            vec![cidr("10.9.0.0/24")]
        )
    );
}

#[tokio::test]
async fn a_sweep_that_cannot_list_bridges_removes_nothing() {
    let lab = Lab::new().await;
    lab.kernel.state().add_bridge("fn-gone", &[]);
    lab.kernel.fail("bridges");
    assert!(lab.ctl.remove_stale_bridges().await.is_err());
    assert!(lab.kernel.calls_of("delete_bridge").is_empty());
    assert!(lab.kernel.calls_of("remove_gateways").is_empty());
}

#[tokio::test]
async fn a_cni_network_is_not_retired_while_its_bridge_has_a_port() {
    let lab = Lab::new().await;
    let net = lab.view.net.clone();
    lab.ctl
        .store
        .put(&super::stale::cni_defined_key("blue"), Vec::new())
        .await
        .unwrap();
    lab.plumb(&net).await;
    // An ADD plumbing right now: its veth is on the bridge, its record not written yet.
    {
        let mut st = lab.kernel.state();
        st.add_link("fn-adding");
        st.masters.insert("fn-adding".into(), net.bridge.clone());
    }
    assert!(!lab.ctl.retire_cni_network(&net).await.unwrap());
    assert!(lab.ctl.network("blue").await.unwrap().is_some());
    assert!(lab.kernel.calls_of("delete_bridge").is_empty());
    // Once it is gone, the network goes with its bridge.
    lab.kernel.state().masters.clear();
    assert!(lab.ctl.retire_cni_network(&net).await.unwrap());
    assert!(lab.ctl.network("blue").await.unwrap().is_none());
    assert!(lab.kernel.state().bridges.is_empty());
}

/// Multi-host network `far` (blocks of 8 in 10.7.0.0/27) after a partition: host h3 took this
/// host's block 10.7.0.8/29 and gave .10 away, h1 holds 10.7.0.0/29, and container c1
/// (started by `ferrynet run`, so it moves) is journaled there with .10, its veth and bridge
/// still up. Returns the network and the journaled endpoint.
async fn partitioned(lab: &Lab) -> (Network, ferrynet_model::network::Endpoint) {
    use ferrynet_model::host::BlockClaim;
    let mut far = Network::bridged("far", [cidr("10.7.0.0/27")]);
    far.fabric = Some(
        serde_json::from_value(serde_json::json!({
            "backend": "vxlan", "vni": 7, "blockV4": 29, "blockV6": 125
        }))
        .unwrap(),
    );
    let far = lab.ctl.create_network(far).await.unwrap();
    // This host's agent is registered (a multi-host network's view needs it).
    let me =
        serde_json::json!({ "name": "test", "underlay": ["192.168.50.1/24"], "underlayMtu": 1500 });
    lab.ctl
        .store
        .put(&keys::host("test"), serde_json::to_vec(&me).unwrap())
        .await
        .unwrap();
    // Before the partition: this host's bridge with the gateway of its block .8/29.
    let mut before = far.clone();
    before.subnets = ferrynet_model::blocks::block_subnets(&far.subnets, &[cidr("10.7.0.8/29")]);
    before.fabric = None;
    lab.plumb(&before).await;
    for (b, h) in [("10.7.0.0/29", "h1"), ("10.7.0.8/29", "h3")] {
        let claim = BlockClaim { host: h.into() };
        lab.ctl
            .store
            .put(&keys::block("far", &cidr(b)), super::encode(&claim))
            .await
            .unwrap();
    }
    for a in ["10.7.0.2", "10.7.0.10"] {
        let k = keys::ipam("far", a.parse().unwrap());
        lab.ctl.store.put(&k, b"other/eth0".to_vec()).await.unwrap();
    }
    let mut ep = ferrynet_model::network::Endpoint::new("far", "c1", "eth0");
    ep.ips = vec![cidr("10.7.0.10/29")];
    ep.owner = EndpointOwner::Cli;
    ep.host = Some("test".into());
    ep.netns = Some(lab.netns("c1"));
    ep.host_veth = Some("fn-c1port".into());
    ep.mac = Some("02:00:00:00:00:02".into());
    {
        let mut st = lab.kernel.state();
        st.add_link("fn-c1port");
        let iface = ferrynet_dataplane::veth::IfaceState {
            index: 2,
            mac: [2, 0, 0, 0, 0, 2],
            mtu: 1450,
            up: true,
            addresses: ep.ips.clone(),
            routes: Vec::new(),
        };
        st.containers
            .entry(ep.netns.clone().unwrap())
            .or_default()
            .insert("eth0".into(), iface);
    }
    lab.ctl.journal_endpoint(&ep);
    (far, ep)
}

impl Lab {
    /// The container `c1`'s eth0 addresses in the fake kernel.
    fn c1_addresses(&self, ep: &ferrynet_model::network::Endpoint) -> Vec<ipnet::IpNet> {
        self.kernel.state().containers[ep.netns.as_deref().unwrap()]["eth0"]
            .addresses
            .clone()
    }

    /// c1's addresses in the store, and every journaled endpoint's as the files hold them.
    async fn recorded(&self) -> (Vec<ipnet::IpNet>, Vec<Vec<ipnet::IpNet>>) {
        let rec = self.ctl.endpoint("far", "c1", "eth0").await.unwrap();
        let dir = self.ctl.paths().state_dir.join("journal/endpoints");
        let journaled = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| {
                let bytes = std::fs::read(e.unwrap().path()).unwrap();
                serde_json::from_slice::<ferrynet_model::network::Endpoint>(&bytes)
                    .unwrap()
                    .ips
            })
            .collect();
        (rec.unwrap().ips, journaled)
    }
}

/// What [`Lab::recorded`] reads after c1 moved to 10.7.0`last`/29.
fn moved_to(last: &str) -> (Vec<ipnet::IpNet>, Vec<Vec<ipnet::IpNet>>) {
    let a = cidr(&format!("10.7.0{last}/29"));
    (vec![a], vec![vec![a]])
}

#[tokio::test]
async fn a_moved_container_is_renumbered_new_addresses_first_and_the_taken_gateway_goes() {
    let lab = Lab::new().await;
    let (far, ep) = partitioned(&lab).await;
    let report = lab.ctl.reassert_local().await.unwrap();
    assert_eq!(report.moved.len(), 1, "{report:?}");
    let moved = &report.moved[0];
    assert_eq!(moved.to, vec![cidr("10.7.0.18/29")]);
    assert!(!moved.reason.contains("failed"), "{}", moved.reason);
    // The bridge gets the new block's gateway, the container its address and default route,
    // and only then does the taken block's gateway leave the bridge.
    assert!(lab.pos("ensure_bridge fn-far") < lab.pos("renumber"));
    assert!(lab.pos("renumber") < lab.pos("delete_address"));
    assert_eq!(lab.c1_addresses(&ep), vec![cidr("10.7.0.18/29")]);
    {
        let st = lab.kernel.state();
        let iface = &st.containers[ep.netns.as_deref().unwrap()]["eth0"];
        assert!(
            iface
                .routes
                .iter()
                .any(|r| r.dst == cidr("0.0.0.0/0")
                    && r.gateway == Some("10.7.0.17".parse().unwrap()))
        );
        let bridge = &st.addresses[&st.host_links[&far.bridge]];
        assert!(
            bridge.iter().any(|a| a.addr().to_string() == "10.7.0.17"),
            "{bridge:?}"
        );
        assert!(
            !bridge.iter().any(|a| a.addr().to_string() == "10.7.0.9"),
            "{bridge:?}"
        );
    }
    // The port's anti-spoofing elements follow; the journal and the store hold the new address.
    assert!(lab
        .nft
        .batches()
        .iter()
        .any(|b| b.contains("fn-c1port") && b.contains("10.7.0.18")));
    assert_eq!(lab.recorded().await, moved_to(".18"));
}

#[tokio::test]
async fn a_renumbering_that_fails_is_reported_and_leaves_the_interface_to_the_retry() {
    let lab = Lab::new().await;
    let (_far, ep) = partitioned(&lab).await;
    lab.kernel.fail("renumber");
    let report = lab.ctl.reassert_local().await.unwrap();
    assert_eq!(report.moved.len(), 1, "{report:?}");
    let reason = &report.moved[0].reason;
    assert!(
        reason.contains("renumbering its interface failed"),
        "{reason}"
    );
    assert!(reason.contains("injected failure: renumber"), "{reason}");
    // The container keeps what it had. The port followed the record first (the interface is
    // the last step, so a retry that finds it renumbered knows the rest is done): the
    // anti-spoofing elements admit the recorded address.
    assert_eq!(lab.c1_addresses(&ep), vec![cidr("10.7.0.10/29")]);
    assert!(lab.nft.batches().iter().any(|b| b.contains("10.7.0.18")));
    // The move itself stands (store and journal): a restart or the next move finishes the job.
    assert_eq!(lab.recorded().await, moved_to(".18"));
}

#[tokio::test]
async fn a_container_whose_namespace_is_gone_is_not_renumbered() {
    let lab = Lab::new().await;
    let (_far, ep) = partitioned(&lab).await;
    let netns = ep.netns.clone().unwrap();
    lab.kernel.state().missing_netns.insert(netns.clone());
    let report = lab.ctl.reassert_local().await.unwrap();
    let reason = &report.moved[0].reason;
    assert!(
        reason.contains("renumbering its interface failed"),
        "{reason}"
    );
    assert!(reason.contains(&netns), "{reason}");
    assert!(lab.kernel.calls_of("renumber").is_empty());
}
