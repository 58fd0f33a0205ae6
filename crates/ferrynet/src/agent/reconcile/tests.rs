//! The reconciler's fabric path over the recording kernel and nft fakes and a redb store in a
//! temp dir (no root): what it programs for a peer, that it changes the kernel by diff only,
//! and how it cleans up after a peer or a network. What the kernel does with the calls is the
//! integration tests' part (`tests/partition.rs`, `tests/fabric*.rs`).

use std::sync::{Arc, Mutex};
use std::time::Instant;

use ferrynet_dataplane::kernel::fake::{Recording, RecordingNft};
use ferrynet_dataplane::kernel::Kernel;
use ferrynet_model::fabric::{vxlan_dev_name, FabricRoute};
use ferrynet_model::network::{keys, Network};
use ferrynet_store::{EmbeddedStore, Store};
use ipnet::IpNet;

use super::Reconciler;
use crate::agent::status::AgentStatus;
use crate::agent::underlay::Underlay;
use crate::agent::view::ClusterView;
use crate::control::Control;

fn cidr(s: &str) -> IpNet {
    s.parse().unwrap()
}

struct Lab {
    _dir: tempfile::TempDir,
    store: Arc<dyn Store>,
    kernel: Recording,
    status: Arc<Mutex<AgentStatus>>,
    rec: Reconciler,
    net: Network,
}

impl Lab {
    /// This host (`test`, underlay 192.168.50.1) and peer h2 (192.168.50.2) on multi-host
    /// network `far` (VXLAN, blocks of 8 in 10.7.0.0/27): this host holds 10.7.0.0/29, h2
    /// 10.7.0.8/29.
    async fn new() -> Lab {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn Store> = Arc::new(EmbeddedStore::open(dir.path().join("s")).unwrap());
        let kernel = Recording::default();
        let ctl = Arc::new(Control::with_parts(
            store.clone(),
            Arc::new(RecordingNft::default()),
            Arc::new(kernel.clone()),
            dir.path(),
        ));
        let mut net = Network::bridged("far", [cidr("10.7.0.0/27")]);
        net.fabric = Some(
            serde_json::from_value(serde_json::json!({
                "backend": "vxlan", "vni": 7, "blockV4": 29, "blockV6": 125
            }))
            .unwrap(),
        );
        let net = ctl.create_network(net).await.unwrap();
        for (host, addr) in [("test", "192.168.50.1/24"), ("h2", "192.168.50.2/24")] {
            let rec = serde_json::json!({
                "name": host, "underlay": [addr], "underlayMtu": 1500
            });
            store
                .put(&keys::host(host), serde_json::to_vec(&rec).unwrap())
                .await
                .unwrap();
        }
        let lab_store = store.clone();
        let status = Arc::new(Mutex::new(AgentStatus::default()));
        let underlay = Underlay {
            dev: "eth9".into(),
            index: 9,
            addrs: vec![cidr("192.168.50.1/24")],
            mtu: 1500,
        };
        let rec = Reconciler::new(ctl, kernel.host().unwrap(), underlay, status.clone());
        let lab = Lab {
            _dir: dir,
            store: lab_store,
            kernel,
            status,
            rec,
            net,
        };
        lab.claim("10.7.0.0/29", "test").await;
        lab.claim("10.7.0.8/29", "h2").await;
        lab
    }

    async fn claim(&self, block: &str, host: &str) {
        let c = serde_json::json!({ "host": host });
        self.store
            .put(
                &keys::block("far", &cidr(block)),
                serde_json::to_vec(&c).unwrap(),
            )
            .await
            .unwrap();
    }

    /// The cluster as the store holds it now.
    async fn view(&self) -> ClusterView {
        let (kvs, _) = self.store.range(keys::ROOT).await.unwrap();
        let mut v = ClusterView::default();
        v.reset(&kvs, Instant::now());
        v
    }

    fn errors(&self) -> Vec<String> {
        self.status.lock().unwrap().errors.clone()
    }

    fn routes(&self) -> Vec<FabricRoute> {
        self.kernel.state().fabric.routes.iter().cloned().collect()
    }
}

#[tokio::test]
async fn a_peer_block_is_programmed_once_and_left_alone_while_nothing_changes() {
    let mut lab = Lab::new().await;
    let dev = vxlan_dev_name("far");
    let view = lab.view().await;
    lab.rec.run(&view).await;
    assert!(lab.errors().is_empty(), "{:?}", lab.errors());
    let calls = lab.kernel.calls();
    let pos = |op: &str| calls.iter().position(|c| c.starts_with(op)).unwrap();
    // This host's bridge and VXLAN device come before the entries that point into them.
    assert!(pos(&format!("ensure_bridge {}", lab.net.bridge)) < pos("apply_fabric"));
    assert!(pos(&format!("ensure_vxlan {dev} vni 7")) < pos("read_fabric"));
    assert!(pos("read_fabric") < pos("apply_fabric"));
    let routes = lab.routes();
    assert_eq!(routes.len(), 1, "{routes:?}");
    assert_eq!(
        (routes[0].dst, routes[0].dev.as_str()),
        (cidr("10.7.0.8/29"), dev.as_str())
    );
    {
        let st = lab.kernel.state();
        assert!(st
            .fabric
            .fdb
            .iter()
            .any(|e| e.dev == dev && e.dst.to_string() == "192.168.50.2"));
        assert_eq!(st.fabric.neigh.len(), 1);
    }
    // The same view again: the kernel is read, nothing is written.
    lab.rec.run(&view).await;
    assert_eq!(lab.kernel.calls_of("read_fabric").len(), 2);
    assert_eq!(lab.kernel.calls_of("apply_fabric").len(), 1);
}

#[tokio::test]
async fn entries_nobody_wants_go_and_others_devices_are_not_read() {
    let mut lab = Lab::new().await;
    let dev = vxlan_dev_name("far");
    {
        // A route of ours to a block its peer released, and an FDB entry on someone else's
        // VXLAN device.
        let mut st = lab.kernel.state();
        st.fabric.routes.insert(FabricRoute {
            dst: cidr("10.7.0.24/29"),
            gateway: "10.7.0.24".parse().unwrap(),
            dev: dev.clone(),
            onlink: true,
            src: None,
        });
        st.fabric.fdb.insert(ferrynet_model::fabric::FdbEntry {
            dev: "vxlan-other".into(),
            mac: [2, 0, 0, 0, 0, 1],
            dst: "192.0.2.1".parse().unwrap(),
        });
    }
    let view = lab.view().await;
    lab.rec.run(&view).await;
    let routes = lab.routes();
    assert_eq!(
        routes.iter().map(|r| r.dst).collect::<Vec<_>>(),
        vec![cidr("10.7.0.8/29")]
    );
    assert!(lab
        .kernel
        .state()
        .fabric
        .fdb
        .iter()
        .any(|e| e.dev == "vxlan-other"));
}

#[tokio::test]
async fn a_failed_apply_is_reported_and_the_next_reconcile_applies_it_again() {
    let mut lab = Lab::new().await;
    let view = lab.view().await;
    lab.kernel.fail("apply_fabric");
    lab.rec.run(&view).await;
    let errors = lab.errors();
    assert!(
        errors
            .iter()
            .any(|e| e.contains("applying the fabric") && e.contains("injected failure")),
        "{errors:?}"
    );
    assert!(lab.routes().is_empty());
    lab.kernel.state().failing.clear();
    lab.rec.run(&view).await;
    assert!(lab.errors().is_empty(), "{:?}", lab.errors());
    assert_eq!(lab.routes().len(), 1);
}

#[tokio::test]
async fn a_removed_network_takes_its_entries_vxlan_device_and_bridge_along() {
    let mut lab = Lab::new().await;
    let dev = vxlan_dev_name("far");
    let view = lab.view().await;
    lab.rec.run(&view).await;
    assert!(lab.kernel.state().host_links.contains_key(&dev));
    // Another host removed the network (its keys with it).
    lab.store.delete(&keys::network("far")).await.unwrap();
    let view = lab.view().await;
    lab.rec.run(&view).await;
    assert!(lab.errors().is_empty(), "{:?}", lab.errors());
    let st = lab.kernel.state();
    assert!(st.fabric.is_empty(), "{:?}", st.fabric);
    assert!(!st.host_links.contains_key(&dev));
    assert!(!st.bridges.contains(&lab.net.bridge));
    let calls = &st.calls;
    let pos = |op: &str| calls.iter().rposition(|c| c.starts_with(op)).unwrap();
    assert!(pos(&format!("delete_link {dev}")) < pos(&format!("delete_bridge {}", lab.net.bridge)));
}
