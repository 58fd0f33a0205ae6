//! Where this host's DNS server listens: every gateway address of every bridged network on
//! this host (pure).

use std::collections::BTreeMap;
use std::net::IpAddr;

use ferrynet_model::blocks::host_view;
use ferrynet_model::discovery::DiscoveryView;
use ferrynet_model::ipam::{validate_network_subnets, ResolvedSubnet};

/// Gateway address -> the network it serves. Single-host networks: each subnet's gateway;
/// multi-host networks: the gateways of the blocks this host owns.
pub fn gateways(view: &DiscoveryView, host: &str) -> BTreeMap<IpAddr, String> {
    let mut out = BTreeMap::new();
    for (name, subnets) in local_subnets(view, host) {
        for s in subnets {
            out.insert(s.gateway, name.clone());
        }
    }
    out
}

/// Each bridged network on this host with the subnets its bridge holds here: all of a
/// single-host network's, only this host's blocks of a multi-host one.
pub fn local_subnets(view: &DiscoveryView, host: &str) -> Vec<(String, Vec<ResolvedSubnet>)> {
    let mut out = Vec::new();
    for (name, net) in &view.networks {
        if !net.mode.gives_interfaces() {
            continue;
        }
        let local = if net.fabric.is_some() {
            host_view(net, &view.blocks_of(name, host), None)
        } else {
            net.clone()
        };
        // A network whose subnets do not validate has no bridge either.
        let Ok(subnets) = validate_network_subnets(&local.subnets) else {
            continue;
        };
        out.push((name.clone(), subnets));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferrynet_model::fabric::Backend;
    use ferrynet_model::network::{keys, FabricSpec, Network};

    fn net(name: &str, cidrs: &[&str], fabric: bool) -> Network {
        Network {
            fabric: fabric.then_some(FabricSpec {
                backend: Backend::Vxlan,
                vni: 7,
                block_v4: 26,
                block_v6: 122,
                encrypt: false,
            }),
            ..Network::bridged(name, cidrs.iter().map(|c| c.parse().unwrap()))
        }
    }

    #[test]
    fn single_and_multi_host_gateways() {
        let mut v = DiscoveryView::default();
        let mut blue = net("blue", &["10.30.0.0/24", "fd00:30::/64"], false);
        blue.subnets[0].gateway = Some("10.30.0.254".parse().unwrap());
        v.put(&keys::network("blue"), &serde_json::to_vec(&blue).unwrap());
        let wide = net("wide", &["10.40.0.0/16"], true);
        v.put(&keys::network("wide"), &serde_json::to_vec(&wide).unwrap());
        let b1 = "10.40.0.64/26".parse().unwrap();
        let b2 = "10.40.0.128/26".parse().unwrap();
        v.put(&keys::block("wide", &b1), br#"{"host":"h1"}"#);
        v.put(&keys::block("wide", &b2), br#"{"host":"h2"}"#);
        let g = gateways(&v, "h1");
        let want: BTreeMap<IpAddr, String> = [
            ("10.30.0.254", "blue"),
            ("fd00:30::1", "blue"),
            ("10.40.0.65", "wide"),
        ]
        .into_iter()
        .map(|(a, n)| (a.parse().unwrap(), n.to_string()))
        .collect();
        assert_eq!(g, want);
        assert!(!gateways(&v, "h3").values().any(|n| n == "wide"));
    }
}
