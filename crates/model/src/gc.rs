//! CNI GC: which endpoints a `GC` call may release. A runtime's GC speaks for the attachments
//! it made through CNI on this host only; `ferrynet run` containers, Docker endpoints and other
//! hosts' endpoints share the network's records but are none of its business.

use std::collections::BTreeSet;

use crate::names::bridge_name;
use crate::network::{Endpoint, EndpointOwner, Network};

/// Interface name in the records of Docker (CNM) endpoints: Docker names the real interface.
pub const DOCKER_IFNAME: &str = "docker";

/// The owner of an endpoint, inferring it for records written before owners were recorded.
///
/// An old record is Docker's when its ifname is [`DOCKER_IFNAME`], the CLI's when a
/// `ferrynet run` container of that name is recorded on that network (`cli` holds
/// (network, container name)), and CNI's only when its container id is 64 hex digits, the id
/// containerd, CRI-O and Podman pass as `CNI_CONTAINERID`. Anything else stays Unknown and GC
/// keeps it: a leaked address costs less than a live container's interface, and a runtime
/// still releases it with DEL.
pub fn legacy_owner(ep: &Endpoint, cli: &BTreeSet<(String, String)>) -> EndpointOwner {
    if ep.owner != EndpointOwner::Unknown {
        return ep.owner;
    }
    if ep.ifname == DOCKER_IFNAME {
        return EndpointOwner::Docker;
    }
    if cli.contains(&(ep.network.clone(), ep.container_id.clone())) {
        return EndpointOwner::Cli;
    }
    let runtime_id =
        ep.container_id.len() == 64 && ep.container_id.bytes().all(|b| b.is_ascii_hexdigit());
    if runtime_id {
        EndpointOwner::Cni
    } else {
        EndpointOwner::Unknown
    }
}

/// What GC does with one endpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GcVerdict {
    /// A CNI attachment of this host the runtime no longer lists: detach it.
    Release,
    /// The runtime listed it in `cni.dev/valid-attachments`.
    Valid,
    /// Another runtime made it (or its maker is unknown).
    NotCni(EndpointOwner),
    /// It lives on another host of a multi-host network.
    OtherHost(String),
}

/// The verdict for `ep` (its owner already resolved with [`legacy_owner`]) in a GC on host
/// `this_host` with the runtime's `valid` (container id, ifname) list.
pub fn gc_verdict(
    ep: &Endpoint,
    owner: EndpointOwner,
    valid: &[(String, String)],
    this_host: &str,
) -> GcVerdict {
    if let Some(h) = ep.host.as_deref().filter(|h| *h != this_host) {
        return GcVerdict::OtherHost(h.to_string());
    }
    if owner != EndpointOwner::Cni {
        return GcVerdict::NotCni(owner);
    }
    if valid
        .iter()
        .any(|(c, i)| *c == ep.container_id && *i == ep.ifname)
    {
        return GcVerdict::Valid;
    }
    GcVerdict::Release
}

/// The routed networks' `unreachable` prefixes among `unreachable` (ferrynet's, read from the
/// kernel) that lie in no routed network of `networks`: left by a routed network removed while
/// this host's agent was away. Each still refuses its addresses, so a newer network on that
/// subnet would be black-holed.
pub fn stale_unreachable(unreachable: &[ipnet::IpNet], networks: &[Network]) -> Vec<ipnet::IpNet> {
    let pools: Vec<ipnet::IpNet> = networks
        .iter()
        .filter(|n| n.mode == crate::network::NetworkMode::Routed)
        .flat_map(|n| n.subnets.iter().map(|s| s.cidr))
        .collect();
    unreachable
        .iter()
        .filter(|u| !pools.iter().any(|p| p.contains(*u)))
        .copied()
        .collect()
}

/// The `fn-*` bridges among `bridges` that no network in `networks` uses: left behind by a
/// network removed elsewhere (another host, a crash, a wiped store). A down bridge keeps its
/// gateway address and a `linkdown` route that black-holes a newer network on the same subnet.
pub fn stale_bridges<'a>(
    bridges: impl IntoIterator<Item = &'a str>,
    networks: &[Network],
) -> Vec<String> {
    let used: BTreeSet<String> = networks
        .iter()
        .filter(|n| n.mode.gives_interfaces())
        .map(|n| {
            if n.bridge.is_empty() {
                bridge_name(&n.name)
            } else {
                n.bridge.clone()
            }
        })
        .collect();
    bridges
        .into_iter()
        .filter(|b| b.starts_with("fn-") && !used.contains(*b))
        .map(str::to_string)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bridges_of_no_network_are_stale() {
        let nets = vec![
            Network::bridged("blue", ["10.1.0.0/24".parse().unwrap()]),
            Network {
                bridge: "fn-custom".into(),
                ..Network::bridged("red", ["10.2.0.0/24".parse().unwrap()])
            },
        ];
        let found = [
            "fn-blue",
            "fn-custom",
            "fn-red",
            "fn-gone",
            "docker0",
            "br-1234",
        ];
        assert_eq!(stale_bridges(found, &nets), vec!["fn-red", "fn-gone"]);
        assert!(stale_bridges(["fn-blue"], &nets).is_empty());
    }

    const RUNTIME_ID: &str = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

    fn ep(id: &str, ifname: &str, owner: EndpointOwner, host: Option<&str>) -> Endpoint {
        Endpoint {
            owner,
            host: host.map(str::to_string),
            ..Endpoint::new("blue", id, ifname)
        }
    }

    #[test]
    fn releases_only_unlisted_cni_endpoints_of_this_host() {
        let valid = vec![("keep".to_string(), "eth0".to_string())];
        let gc = |e: &Endpoint| gc_verdict(e, e.owner, &valid, "h1");
        assert_eq!(
            gc(&ep("gone", "eth0", EndpointOwner::Cni, None)),
            GcVerdict::Release
        );
        assert_eq!(
            gc(&ep("gone", "eth0", EndpointOwner::Cni, Some("h1"))),
            GcVerdict::Release
        );
        assert_eq!(
            gc(&ep("keep", "eth0", EndpointOwner::Cni, None)),
            GcVerdict::Valid
        );
        // Same container, another interface: not listed.
        assert_eq!(
            gc(&ep("keep", "eth1", EndpointOwner::Cni, None)),
            GcVerdict::Release
        );
        for owner in [
            EndpointOwner::Cli,
            EndpointOwner::Docker,
            EndpointOwner::Unknown,
        ] {
            assert_eq!(
                gc(&ep("gone", "eth0", owner, None)),
                GcVerdict::NotCni(owner)
            );
        }
        assert_eq!(
            gc(&ep("gone", "eth0", EndpointOwner::Cni, Some("h2"))),
            GcVerdict::OtherHost("h2".into())
        );
    }

    #[test]
    fn old_records_get_an_owner_only_when_their_shape_proves_it() {
        let cli: BTreeSet<(String, String)> = [("blue".to_string(), RUNTIME_ID.to_string())]
            .into_iter()
            .collect();
        let none = BTreeSet::new();
        let u = EndpointOwner::Unknown;
        assert_eq!(
            legacy_owner(&ep(RUNTIME_ID, "docker", u, None), &none),
            EndpointOwner::Docker
        );
        assert_eq!(
            legacy_owner(&ep(RUNTIME_ID, "eth0", u, None), &cli),
            EndpointOwner::Cli
        );
        assert_eq!(
            legacy_owner(&ep(RUNTIME_ID, "eth0", u, None), &none),
            EndpointOwner::Cni
        );
        assert_eq!(
            legacy_owner(&ep("web1", "eth0", u, None), &none),
            EndpointOwner::Unknown
        );
        assert_eq!(
            legacy_owner(&ep(&RUNTIME_ID[1..], "eth0", u, None), &none),
            EndpointOwner::Unknown
        );
        // A recorded owner is never second-guessed.
        assert_eq!(
            legacy_owner(&ep("web1", "docker", EndpointOwner::Cni, None), &none),
            EndpointOwner::Cni
        );
    }

    #[test]
    fn a_record_without_owner_reads_as_unknown() {
        let old = r#"{"network":"blue","containerId":"c1","ifname":"eth0","ips":[]}"#;
        let e: Endpoint = serde_json::from_str(old).unwrap();
        assert_eq!(e.owner, EndpointOwner::Unknown);
        let new = serde_json::to_string(&ep("c1", "eth0", EndpointOwner::Cni, None)).unwrap();
        assert!(new.contains(r#""owner":"cni""#), "{new}");
    }

    #[test]
    fn unreachable_prefixes_outside_every_routed_network_are_stale() {
        let mut routed = Network::bridged("r", ["10.20.0.0/16".parse().unwrap()]);
        routed.mode = crate::network::NetworkMode::Routed;
        let bridged = Network::bridged("b", ["10.30.0.0/24".parse().unwrap()]);
        let have: Vec<ipnet::IpNet> = ["10.20.0.64/26", "10.30.0.0/24", "10.40.0.0/26"]
            .iter()
            .map(|s| s.parse().unwrap())
            .collect();
        assert_eq!(
            stale_unreachable(&have, &[routed, bridged]),
            vec![have[1], have[2]]
        );
    }
}
