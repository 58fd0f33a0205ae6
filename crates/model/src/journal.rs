//! Re-asserting a host's own records after a partition (issue 17, part 1).
//!
//! When a host is cut off from the store for longer than its lease and grace period, its peers
//! release its blocks, endpoints and producers while its containers keep running. The host
//! keeps a local journal of what it recorded; on re-registering, each journaled endpoint whose
//! link is still in the kernel is put back, unless the store now gives its address or block to
//! someone else (then it is a conflict, reported, never overwritten). A container whose block
//! another host took may move to free addresses instead ([`plan_move`]). This module decides; the
//! control layer reads the journal, the kernel and the store, and commits.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use ipnet::IpNet;

use crate::blocks::{block_subnets, next_block};
use crate::ipam::{next_free, validate_subnet};
use crate::network::{Endpoint, EndpointOwner, FabricSpec, Subnet};

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
    /// Another host took the block of some of its addresses (and the network does not let it
    /// borrow them): not taken back; the container may move ([`plan_move`]). The reason.
    Taken(String),
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
    // A block another host took: its addresses there are that host's to give now.
    let taken = |a: IpAddr| {
        blocks
            .iter()
            .filter(|b| b.contains(&a))
            .find_map(|b| facts.block_owners.get(b).filter(|h| *h != host && !borrow))
            .is_some()
    };
    for ip in &ep.ips {
        if let Some(o) = facts.address_owners.get(&ip.addr()) {
            if *o != owner && !taken(ip.addr()) {
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
    let mut lost = None;
    for b in blocks {
        match facts.block_owners.get(b) {
            Some(h) if h == host => {}
            Some(_) if borrow => {}
            Some(h) => {
                lost.get_or_insert_with(|| {
                    format!(
                        "block {b} of network {} (container {}) now belongs to host {h}",
                        ep.network, ep.container_id
                    )
                });
            }
            None => claim.push(*b),
        }
    }
    if let Some(m) = lost {
        return Reassert::Taken(m);
    }
    Reassert::Restore { blocks: claim }
}

/// Whether a container whose block another host took moves ([`plan_move`]): only those
/// `ferrynet run` started. A runtime (CNI, Docker) recorded the address it was given and hands
/// it on (pod status, service endpoints, `docker inspect`); renumbering behind its back would
/// send its clients to whoever gets that address next, so those stay a reported conflict.
pub fn moves(owner: EndpointOwner) -> bool {
    owner == EndpointOwner::Cli
}

/// Where a returning container's addresses go when another host took the block of some of
/// them while its host was cut off (and the network does not let it borrow them).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Move {
    /// Its addresses as journaled.
    pub from: Vec<IpNet>,
    /// Its addresses after the move: each one whose block is still this host's (or free) is
    /// kept; each other one is replaced by a free address of the same family.
    pub to: Vec<IpNet>,
    /// Free blocks to claim: for the new addresses (none when this host's blocks had room),
    /// and the released blocks of the addresses it keeps.
    pub claim: Vec<IpNet>,
    /// The blocks other hosts took, with the taker (for the event and the status).
    pub taken: Vec<(IpNet, String)>,
}

/// The network as a move sees it (read from the store in the same transaction).
#[derive(Debug, Clone, Copy)]
pub struct NetworkFacts<'a> {
    /// The network's pool.
    pub subnets: &'a [Subnet],
    /// Its block sizes.
    pub spec: &'a FabricSpec,
    /// Every claimed block of the network, with its host.
    pub claims: &'a BTreeMap<IpNet, String>,
    /// Blocks kept for other hosts that are cut off (never taken by a move).
    pub orphans: &'a [IpNet],
    /// Every address held in the network (its address keys).
    pub used: &'a BTreeSet<IpAddr>,
}

/// Plan the move of journaled endpoint `ep` of `host`: keep the addresses whose block is not
/// another host's, and give each other one a free address of its family, first from this
/// host's own blocks, then from a free block to claim (never an orphan kept for another cut-off
/// host). Err (the reason, for the conflict report) when nothing needs moving or no address
/// is free.
pub fn plan_move(ep: &Endpoint, host: &str, net: &NetworkFacts) -> Result<Move, String> {
    let block_of = |a: IpAddr| {
        IpNet::new(a, net.spec.block_len(a.is_ipv6()))
            .map(|b| b.trunc())
            .ok()
    };
    let mut taken: Vec<(IpNet, String)> = Vec::new();
    let mut claim: Vec<IpNet> = Vec::new();
    let mut picked: BTreeSet<IpAddr> = BTreeSet::new();
    let mut to = Vec::new();
    for ip in &ep.ips {
        let Some(b) = block_of(ip.addr()) else {
            return Err(format!("address {} fits no block", ip.addr()));
        };
        match net.claims.get(&b) {
            Some(h) if h != host => taken.push((b, h.clone())),
            Some(_) => {
                to.push(*ip);
                continue;
            }
            // Kept in a block released meanwhile: claimed again with the move.
            None => {
                if !claim.contains(&b) {
                    claim.push(b);
                }
                to.push(*ip);
                continue;
            }
        }
        let v6 = ip.addr().is_ipv6();
        let mine = net
            .claims
            .iter()
            .filter(|(_, h)| *h == host)
            .map(|(b, _)| *b)
            .chain(claim.iter().copied())
            .filter(|b| b.addr().is_ipv6() == v6)
            .collect::<Vec<_>>();
        let free_in = |b: &IpNet| {
            let sub = block_subnets(net.subnets, &[*b]).pop()?;
            let r = validate_subnet(&sub).ok()?;
            let held: BTreeSet<IpAddr> = net
                .used
                .iter()
                .chain(picked.iter())
                .filter(|a| b.contains(*a))
                .copied()
                .collect();
            next_free(&r, &held, None).and_then(|a| IpNet::new(a, b.prefix_len()).ok())
        };
        let mut new = mine.iter().find_map(free_in);
        if new.is_none() {
            let avoid: Vec<IpNet> = net
                .claims
                .keys()
                .chain(net.orphans)
                .chain(claim.iter())
                .copied()
                .collect();
            if let Some(b) = next_block(net.subnets, net.spec, v6, &avoid) {
                new = free_in(&b);
                if new.is_some() {
                    claim.push(b);
                }
            }
        }
        match new {
            Some(n) => {
                picked.insert(n.addr());
                to.push(n);
            }
            _ => {
                return Err(format!(
                    "block {b} of network {} (container {}) now belongs to host {}, and no \
                     address of the pool is free to move it to",
                    ep.network,
                    ep.container_id,
                    net.claims.get(&b).map(String::as_str).unwrap_or("?")
                ))
            }
        }
    }
    if taken.is_empty() {
        return Err(format!(
            "container {} on network {}: none of its blocks is another host's",
            ep.container_id, ep.network
        ));
    }
    Ok(Move {
        from: ep.ips.clone(),
        to,
        claim,
        taken,
    })
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

/// What a moved container's interface still needs, by comparing what its moved record wants
/// there with what the kernel shows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Renumber {
    /// The interface (or its namespace) is gone: the container left, nothing to converge.
    Gone,
    /// The interface holds every wanted address and none it left: converged.
    Done,
    /// Addresses are missing or left ones are still there: renumber again.
    Again,
}

/// Compare `want` (the addresses the moved record gives the interface) and `left` (the ones
/// it had before the move) with `kernel` (the interface's addresses; None: it is gone).
/// Link-local and other addresses the kernel adds itself are not compared.
pub fn renumber_needed(want: &[IpNet], left: &[IpNet], kernel: Option<&[IpNet]>) -> Renumber {
    let Some(kernel) = kernel else {
        return Renumber::Gone;
    };
    let has = |a: &IpNet| kernel.iter().any(|k| k.addr() == a.addr());
    let complete = want.iter().all(|w| {
        kernel
            .iter()
            .any(|k| k.addr() == w.addr() && k.prefix_len() == w.prefix_len())
    });
    let stale = left
        .iter()
        .filter(|l| !want.iter().any(|w| w.addr() == l.addr()))
        .any(has);
    if complete && !stale {
        Renumber::Done
    } else {
        Renumber::Again
    }
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
    fn a_moved_interface_converges_to_its_record() {
        let n = |s: &str| s.parse::<IpNet>().unwrap();
        let want = [n("10.7.0.18/24"), n("fd07::a/64")];
        let left = [n("10.7.0.10/24"), n("fd07::a/64")];
        let ll = n("fe80::1/64");
        // The renumber never ran: still the old addresses.
        let before = [n("10.7.0.10/24"), n("fd07::a/64"), ll];
        assert_eq!(
            renumber_needed(&want, &left, Some(&before)),
            Renumber::Again
        );
        // Half done: the new one added, the old one still there.
        let half = [n("10.7.0.10/24"), n("10.7.0.18/24"), n("fd07::a/64")];
        assert_eq!(renumber_needed(&want, &left, Some(&half)), Renumber::Again);
        // A wanted address with the wrong prefix is not converged.
        let wrong = [n("10.7.0.18/32"), n("fd07::a/64")];
        assert_eq!(renumber_needed(&want, &left, Some(&wrong)), Renumber::Again);
        // Done: the kept IPv6 address is wanted, not stale; link-local is ignored.
        let done = [n("10.7.0.18/24"), n("fd07::a/64"), ll];
        assert_eq!(renumber_needed(&want, &left, Some(&done)), Renumber::Done);
        assert_eq!(renumber_needed(&want, &left, None), Renumber::Gone);
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
        let Reassert::Taken(m) = plan(&e, "h2", true, &facts, &[block()], false) else {
            panic!("expected a taken block");
        };
        assert!(m.contains("h1") && m.contains("10.1.0.0/26"), "{m}");
        // Its address in the taken block given away meanwhile: still a taken block (a move
        // fixes both), not an address conflict.
        facts
            .address_owners
            .insert("10.1.0.5".parse().unwrap(), "other/eth0".into());
        assert!(matches!(
            plan(&e, "h2", true, &facts, &[block()], false),
            Reassert::Taken(_)
        ));
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

    /// A vxlan network 10.7.0.0/27 + fd07::/125 in blocks of 8 (/29, /125).
    fn pool() -> (Vec<Subnet>, FabricSpec) {
        let subnets = vec![
            serde_json::from_value(serde_json::json!({"cidr": "10.7.0.0/27"})).unwrap(),
            serde_json::from_value(serde_json::json!({"cidr": "fd07::/120"})).unwrap(),
        ];
        let spec = serde_json::from_value(serde_json::json!({
            "backend": "vxlan", "vni": 1, "blockV4": 29, "blockV6": 125
        }))
        .unwrap();
        (subnets, spec)
    }

    fn moving() -> Endpoint {
        serde_json::from_value(serde_json::json!({
            "network": "blue", "containerId": "c1", "ifname": "eth0",
            "ips": ["10.7.0.10/29", "fd07::a/125"]
        }))
        .unwrap()
    }

    fn net(s: &str) -> IpNet {
        s.parse().unwrap()
    }

    fn claims(list: &[(&str, &str)]) -> BTreeMap<IpNet, String> {
        list.iter().map(|(b, h)| (net(b), h.to_string())).collect()
    }

    fn used(list: &[&str]) -> BTreeSet<IpAddr> {
        list.iter().map(|a| a.parse().unwrap()).collect()
    }

    #[test]
    fn a_taken_block_moves_the_container_to_a_free_block_and_keeps_the_rest() {
        let (subnets, spec) = pool();
        // h3 took h2's v4 block 10.7.0.8/29 (and gave .10 away); h2 got its v6 block back.
        let c = claims(&[
            ("10.7.0.0/29", "h1"),
            ("10.7.0.8/29", "h3"),
            ("fd07::8/125", "h2"),
        ]);
        let u = used(&["10.7.0.10", "fd07::a"]);
        let f = NetworkFacts {
            subnets: &subnets,
            spec: &spec,
            claims: &c,
            orphans: &[],
            used: &u,
        };
        let m = plan_move(&moving(), "h2", &f).unwrap();
        // The first free block (10.7.0.16/29): its first address is the gateway.
        assert_eq!(m.claim, vec![net("10.7.0.16/29")]);
        assert_eq!(m.to, vec![net("10.7.0.18/29"), net("fd07::a/125")]);
        assert_eq!(m.from, moving().ips);
        assert_eq!(m.taken, vec![(net("10.7.0.8/29"), "h3".to_string())]);
    }

    #[test]
    fn a_move_prefers_room_in_its_own_blocks_and_never_takes_an_orphan() {
        let (subnets, spec) = pool();
        // h2 already holds 10.7.0.24/29 with .26 used; 10.7.0.16/29 is kept for a cut-off h4.
        let c = claims(&[
            ("10.7.0.0/29", "h1"),
            ("10.7.0.8/29", "h3"),
            ("10.7.0.24/29", "h2"),
            ("fd07::8/125", "h2"),
        ]);
        let u = used(&["10.7.0.26", "fd07::a"]);
        let orphans = [net("10.7.0.16/29")];
        let f = NetworkFacts {
            subnets: &subnets,
            spec: &spec,
            claims: &c,
            orphans: &orphans,
            used: &u,
        };
        let m = plan_move(&moving(), "h2", &f).unwrap();
        assert_eq!(m.claim, vec![]);
        assert_eq!(m.to[0], net("10.7.0.27/29"));
        // Its own block full and only the orphan free: no move, a reason naming the taker.
        let full: Vec<String> = (25..32).map(|i| format!("10.7.0.{i}")).collect();
        let u = used(&full.iter().map(String::as_str).collect::<Vec<_>>());
        let f = NetworkFacts { used: &u, ..f };
        let e = plan_move(&moving(), "h2", &f).unwrap_err();
        assert!(e.contains("10.7.0.8/29") && e.contains("h3"), "{e}");
    }

    #[test]
    fn both_families_taken_move_together_and_nothing_taken_is_no_move() {
        let (subnets, spec) = pool();
        let c = claims(&[("10.7.0.8/29", "h3"), ("fd07::8/125", "h1")]);
        let u = used(&[]);
        let f = NetworkFacts {
            subnets: &subnets,
            spec: &spec,
            claims: &c,
            orphans: &[],
            used: &u,
        };
        let m = plan_move(&moving(), "h2", &f).unwrap();
        assert_eq!(m.claim, vec![net("10.7.0.0/29"), net("fd07::/125")]);
        assert_eq!(m.to, vec![net("10.7.0.2/29"), net("fd07::2/125")]);
        assert_eq!(m.taken.len(), 2);
        // Its v6 block released meanwhile: kept, and claimed again with the move.
        let c = claims(&[("10.7.0.8/29", "h3")]);
        let f2 = NetworkFacts { claims: &c, ..f };
        let m = plan_move(&moving(), "h2", &f2).unwrap();
        assert_eq!(m.to[1], net("fd07::a/125"));
        assert_eq!(m.claim, vec![net("10.7.0.0/29"), net("fd07::8/125")]);
        // Blocks free or its own: nothing to move.
        let c = claims(&[("10.7.0.8/29", "h2")]);
        let f = NetworkFacts { claims: &c, ..f };
        assert!(plan_move(&moving(), "h2", &f).is_err());
    }

    #[test]
    fn only_containers_ferrynet_started_move() {
        assert!(moves(EndpointOwner::Cli));
        for o in [
            EndpointOwner::Cni,
            EndpointOwner::Docker,
            EndpointOwner::Unknown,
        ] {
            assert!(!moves(o), "{o:?}");
        }
    }

    #[test]
    fn a_forged_claim_never_moves_a_container_onto_a_held_address() {
        let (subnets, spec) = pool();
        // A store writer gives h2's block to h3, gives h1's block 10.7.0.0/29 (its containers
        // hold .2 to .6) to h2, and claims every other block for a made-up host.
        let c = claims(&[
            ("10.7.0.0/29", "h2"),
            ("10.7.0.8/29", "h3"),
            ("10.7.0.16/29", "h9"),
            ("10.7.0.24/29", "h9"),
            ("fd07::8/125", "h2"),
        ]);
        let held = ["10.7.0.2", "10.7.0.3", "10.7.0.4", "10.7.0.5", "10.7.0.6"];
        let u = used(&held);
        let f = NetworkFacts {
            subnets: &subnets,
            spec: &spec,
            claims: &c,
            orphans: &[],
            used: &u,
        };
        // Every address of the block it is offered is held: no move, h1's addresses stay h1's.
        let e = plan_move(&moving(), "h2", &f).unwrap_err();
        assert!(e.contains("no address of the pool is free"), "{e}");
        // With one address released there, the move takes only that one.
        let u = used(&held[..4]);
        let f = NetworkFacts { used: &u, ..f };
        let m = plan_move(&moving(), "h2", &f).unwrap();
        assert_eq!(m.to[0], net("10.7.0.6/29"));
        assert!(m.to.iter().all(|a| !u.contains(&a.addr())));
        assert!(m.claim.is_empty());
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
