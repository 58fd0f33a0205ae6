//! Re-asserting a host's own records after a partition (issue 17, part 1).
//!
//! When a host is cut off from the store for longer than its lease and grace period, its peers
//! release its blocks, endpoints and producers while its containers keep running. The host
//! keeps a local journal of what it recorded; on re-registering, each journaled endpoint whose
//! link is still in the kernel is put back, unless the store now gives its address or block to
//! someone else (then it is a conflict, reported, never overwritten). This module decides; the
//! control layer reads the journal, the kernel and the store, and commits.

use std::collections::BTreeMap;
use std::net::IpAddr;

use ipnet::IpNet;

use crate::network::{Endpoint, FabricSpec};

/// What the store holds now for one journaled endpoint.
#[derive(Debug, Clone, Default)]
pub struct StoreFacts {
    /// The endpoint's record, if present.
    pub record: Option<Endpoint>,
    /// Owner value of each of its address keys that exists.
    pub address_owners: BTreeMap<IpAddr, String>,
    /// Owner host of each block of the network that is claimed.
    pub block_owners: BTreeMap<IpNet, String>,
}

/// The decision for one journaled endpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reassert {
    /// Its link is gone: the container left while the host was cut off; drop the journal entry.
    Forget,
    /// The store still holds it as journaled.
    Keep,
    /// Put it back: its record, its address keys, and the blocks it needs that are free.
    Restore {
        /// Blocks to claim again for this host.
        blocks: Vec<IpNet>,
    },
    /// Someone else holds what it needs now; it is reported, not taken back.
    Conflict(String),
}

/// Decide what to do with journaled endpoint `ep` of `host`, whose host-side link is
/// `link_alive`, given `facts` from the store and `blocks`: the network's blocks that hold
/// `ep`'s addresses (empty for a single-host network). `borrow`: the network lets a container
/// keep an address of another host's block (`bgp::policy::may_borrow`); a block taken
/// meanwhile is then no conflict, the addresses come back as borrowed ones (announced as host
/// routes) as long as nobody else holds them.
pub fn plan(
    ep: &Endpoint,
    host: &str,
    link_alive: bool,
    facts: &StoreFacts,
    blocks: &[IpNet],
    borrow: bool,
) -> Reassert {
    if !link_alive {
        return Reassert::Forget;
    }
    let owner = format!("{}/{}", ep.container_id, ep.ifname);
    if let Some(rec) = &facts.record {
        if rec.ips == ep.ips {
            return Reassert::Keep;
        }
        return Reassert::Conflict(format!(
            "container {} on network {} is recorded with other addresses ({}) than it has ({})",
            ep.container_id,
            ep.network,
            list(&rec.ips),
            list(&ep.ips)
        ));
    }
    for ip in &ep.ips {
        if let Some(o) = facts.address_owners.get(&ip.addr()) {
            if *o != owner {
                return Reassert::Conflict(format!(
                    "address {} of container {} on network {} is now held by {o}",
                    ip.addr(),
                    ep.container_id,
                    ep.network
                ));
            }
        }
    }
    let mut claim = Vec::new();
    for b in blocks {
        match facts.block_owners.get(b) {
            Some(h) if h == host => {}
            Some(_) if borrow => {}
            Some(h) => {
                return Reassert::Conflict(format!(
                    "block {b} of network {} (container {}) now belongs to host {h}",
                    ep.network, ep.container_id
                ))
            }
            None => claim.push(*b),
        }
    }
    Reassert::Restore { blocks: claim }
}

/// The blocks of a multi-host network (`spec`) that hold `ep`'s addresses.
pub fn blocks_of(ep: &Endpoint, spec: &FabricSpec) -> Vec<IpNet> {
    let mut out: Vec<IpNet> = ep
        .ips
        .iter()
        .filter_map(|ip| IpNet::new(ip.addr(), spec.block_len(ip.addr().is_ipv6())).ok())
        .map(|b| b.trunc())
        .collect();
    out.sort();
    out.dedup();
    out
}

fn list(ips: &[IpNet]) -> String {
    ips.iter()
        .map(|i| i.addr().to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ep() -> Endpoint {
        serde_json::from_value(serde_json::json!({
            "network": "blue", "containerId": "c1", "ifname": "eth0",
            "ips": ["10.1.0.5/32", "fd00::5/128"]
        }))
        .unwrap()
    }

    fn block() -> IpNet {
        "10.1.0.0/26".parse().unwrap()
    }

    #[test]
    fn a_gone_link_is_forgotten_and_an_intact_record_kept() {
        let e = ep();
        assert_eq!(
            plan(&e, "h2", false, &StoreFacts::default(), &[], false),
            Reassert::Forget
        );
        let facts = StoreFacts {
            record: Some(e.clone()),
            ..Default::default()
        };
        assert_eq!(
            plan(&e, "h2", true, &facts, &[block()], false),
            Reassert::Keep
        );
    }

    #[test]
    fn released_records_come_back_with_their_free_block() {
        let e = ep();
        let facts = StoreFacts::default();
        assert_eq!(
            plan(&e, "h2", true, &facts, &[block()], false),
            Reassert::Restore {
                blocks: vec![block()]
            }
        );
        // Its own block already reclaimed: nothing to claim; its own address keys are fine.
        let mut facts = StoreFacts::default();
        facts.block_owners.insert(block(), "h2".into());
        facts
            .address_owners
            .insert("10.1.0.5".parse().unwrap(), "c1/eth0".into());
        assert_eq!(
            plan(&e, "h2", true, &facts, &[block()], false),
            Reassert::Restore { blocks: vec![] }
        );
    }

    #[test]
    fn what_others_hold_now_is_a_conflict_never_taken() {
        let e = ep();
        let mut facts = StoreFacts::default();
        facts.block_owners.insert(block(), "h1".into());
        let Reassert::Conflict(m) = plan(&e, "h2", true, &facts, &[block()], false) else {
            panic!("expected a conflict");
        };
        assert!(m.contains("h1") && m.contains("10.1.0.0/26"), "{m}");
        let mut facts = StoreFacts::default();
        facts
            .address_owners
            .insert("fd00::5".parse().unwrap(), "other/eth0".into());
        let Reassert::Conflict(m) = plan(&e, "h2", true, &facts, &[], false) else {
            panic!("expected a conflict");
        };
        assert!(m.contains("fd00::5") && m.contains("other/eth0"), "{m}");
        let mut other = e.clone();
        other.ips.truncate(1);
        let facts = StoreFacts {
            record: Some(other),
            ..Default::default()
        };
        assert!(matches!(
            plan(&e, "h2", true, &facts, &[], false),
            Reassert::Conflict(_)
        ));
    }

    #[test]
    fn blocks_holding_its_addresses() {
        let spec: FabricSpec = serde_json::from_value(serde_json::json!({
            "backend": "vxlan", "vni": 1, "blockV4": 26, "blockV6": 120
        }))
        .unwrap();
        assert_eq!(
            blocks_of(&ep(), &spec),
            vec![block(), "fd00::/120".parse::<IpNet>().unwrap()]
        );
    }

    #[test]
    fn a_taken_block_is_borrowed_from_where_borrowing_is_allowed() {
        let e = ep();
        let mut facts = StoreFacts::default();
        facts.block_owners.insert(block(), "h1".into());
        assert_eq!(
            plan(&e, "h2", true, &facts, &[block()], true),
            Reassert::Restore { blocks: vec![] }
        );
        // Its address given to someone else meanwhile stays a conflict.
        facts
            .address_owners
            .insert("10.1.0.5".parse().unwrap(), "other/eth0".into());
        assert!(matches!(
            plan(&e, "h2", true, &facts, &[block()], true),
            Reassert::Conflict(_)
        ));
    }
}
