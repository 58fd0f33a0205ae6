//! The control layer's attach and detach flows over the recording kernel and nft fakes
//! (`ferrynet_dataplane::kernel::fake`) and an embedded store in a temp dir: no root needed.
//! What the kernel really does with these calls is the integration tests' part.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::Arc;

use ferrynet_dataplane::kernel::fake::{Recording, RecordingNft};
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
