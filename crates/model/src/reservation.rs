//! The one reservation decision every frontend shares: which addresses an attachment gets,
//! which it only references (held by the runtime's IPAM for it), which it must claim, when a
//! multi-host network needs another block first, and how the rotation hint moves.
//!
//! CNI ADD, `ferrynet run`, Docker's `RequestAddress` and `CreateEndpoint` all plan here; the
//! control layer reads what is held, calls [`plan_reservation`] and commits the plan in one
//! transaction whose compares are exactly what the plan relied on.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use ipnet::IpNet;
use thiserror::Error;

use crate::ipam::{plan_allocation, IpamError, ResolvedSubnet};

/// What to reserve, over what is held.
#[derive(Debug, Clone, Copy)]
pub struct AddressRequest<'a> {
    /// The subnets to pick from: a network's, or this host's blocks of a multi-host network.
    pub subnets: &'a [ResolvedSubnet],
    /// Every held address of the network, with its owner (`container/ifname`, or an IPAM id).
    pub held: &'a BTreeMap<IpAddr, String>,
    /// Addresses asked for by the runtime; empty: pick.
    pub requested: &'a [IpAddr],
    /// Families (IPv4, IPv6) that get a picked address when no requested one is of that family
    /// (only the families the subnets have).
    pub pick: (bool, bool),
    /// The attachment's own owner string.
    pub owner: &'a str,
    /// A requested address held by this owner (the runtime's IPAM, for this attachment) is
    /// referenced instead of claimed.
    pub shared_owner: Option<&'a str>,
    /// Last address handed out per subnet (`cidr` string): picks continue after it.
    pub last: &'a BTreeMap<String, IpAddr>,
    /// Whether a full family may be answered with [`ReservationError::NeedBlock`] (a multi-host
    /// network picking automatically) rather than exhaustion.
    pub can_claim_block: bool,
}

/// The decision: commit it with `Missing` compares on `claim`, `Value(shared_owner)` compares
/// on `reference`, and the rotation hint when it changed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReservationPlan {
    /// The attachment's addresses with their subnets' prefix lengths, IPv4 first.
    pub ips: Vec<IpNet>,
    /// Addresses to claim for the owner (each must still be free).
    pub claim: Vec<IpAddr>,
    /// Addresses it uses that stay the shared owner's (each must still be theirs).
    pub reference: Vec<IpAddr>,
    /// The new rotation hint, when a pick moved it.
    pub last: Option<BTreeMap<String, IpAddr>>,
}

/// Why nothing can be reserved (yet).
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum ReservationError {
    /// Address management refused (a subnet rule, exhaustion, a reserved address).
    #[error(transparent)]
    Ipam(#[from] IpamError),
    /// A requested address belongs to someone else.
    #[error("address {ip} is already in use by {owner}")]
    HeldBy {
        /// The address.
        ip: IpAddr,
        /// Its holder.
        owner: String,
    },
    /// A requested address is held under this attachment's own name without its record: a
    /// leftover the runtime must clean up (DEL) first.
    #[error("address {ip} is held by a stale record of endpoint {owner}")]
    Stale {
        /// The address.
        ip: IpAddr,
        /// This attachment's owner string.
        owner: String,
    },
    /// This host's blocks of the family are full: claim a block and plan again.
    #[error("this host's blocks of the IPv{} pool are full", if *v6 { 6 } else { 4 })]
    NeedBlock {
        /// The family to claim a block of.
        v6: bool,
    },
}

/// Plan one attachment's addresses (see [`AddressRequest`]).
pub fn plan_reservation(req: &AddressRequest<'_>) -> Result<ReservationPlan, ReservationError> {
    if req.subnets.is_empty() {
        return Err(IpamError::NoSubnets.into());
    }
    let mut ips = Vec::new();
    let mut claim = Vec::new();
    let mut reference = Vec::new();
    let mut fresh = Vec::new();
    for &ip in req.requested {
        match req.held.get(&ip) {
            Some(o) if Some(o.as_str()) == req.shared_owner => {
                let s = req
                    .subnets
                    .iter()
                    .find(|s| s.cidr.contains(&ip))
                    .ok_or(IpamError::NotInPool(ip))?;
                ips.push(IpNet::new(ip, s.cidr.prefix_len()).unwrap_or(s.cidr));
                reference.push(ip);
            }
            // Only an attachment that also references a runtime's addresses has a record to
            // be stale against; elsewhere the owner string is shared (Docker's IPAM id).
            Some(o) if o == req.owner && req.shared_owner.is_some() => {
                return Err(ReservationError::Stale {
                    ip,
                    owner: o.clone(),
                })
            }
            Some(o) => {
                return Err(ReservationError::HeldBy {
                    ip,
                    owner: o.clone(),
                })
            }
            None => fresh.push(ip),
        }
    }
    let used: BTreeSet<IpAddr> = req.held.keys().copied().collect();
    if !fresh.is_empty() {
        for ip in plan_allocation(req.subnets, &used, &fresh, &|_| None)? {
            if ips.iter().any(|o: &IpNet| o.contains(&ip.addr())) {
                return Err(IpamError::TwoInOneSubnet(ip.trunc()).into());
            }
            claim.push(ip.addr());
            ips.push(ip);
        }
    }
    let have = |ips: &[IpNet], v4: bool| ips.iter().any(|i| i.addr().is_ipv4() == v4);
    let mut missing: Vec<ResolvedSubnet> = req
        .subnets
        .iter()
        .filter(|s| {
            let v4 = s.cidr.addr().is_ipv4();
            (if v4 { req.pick.0 } else { req.pick.1 }) && !have(&ips, v4)
        })
        .cloned()
        .collect();
    if req.can_claim_block {
        // A host's blocks: fill those already in use before taking an empty one (the spare
        // block the agent claimed ahead) into use, so the host holds one spare, not several
        // half-used blocks. Stable: among used (or empty) blocks the view's order stays.
        missing.sort_by_key(|s| {
            used.range(s.cidr.network()..=s.cidr.broadcast())
                .next()
                .is_none()
        });
    }
    let mut last = None;
    if !missing.is_empty() {
        let picked = plan_allocation(&missing, &used, &[], &|c| {
            req.last.get(&c.to_string()).copied()
        })
        .map_err(|e| match e {
            IpamError::Exhausted { subnet, .. } if req.can_claim_block => {
                ReservationError::NeedBlock {
                    v6: subnet.addr().is_ipv6(),
                }
            }
            e => e.into(),
        })?;
        let mut hint = req.last.clone();
        for ip in picked {
            if let Some(s) = missing.iter().find(|s| s.cidr.contains(&ip.addr())) {
                hint.insert(s.cidr.to_string(), ip.addr());
            }
            claim.push(ip.addr());
            ips.push(ip);
        }
        last = Some(hint);
    }
    ips.sort_by_key(|i| !i.addr().is_ipv4());
    Ok(ReservationPlan {
        ips,
        claim,
        reference,
        last,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ipam::validate_network_subnets;
    use crate::network::Subnet;

    fn subnets(cidrs: &[&str]) -> Vec<ResolvedSubnet> {
        let s: Vec<Subnet> = cidrs
            .iter()
            .map(|c| Subnet::new(c.parse().unwrap()))
            .collect();
        validate_network_subnets(&s).unwrap()
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn req<'a>(
        subnets: &'a [ResolvedSubnet],
        held: &'a BTreeMap<IpAddr, String>,
        requested: &'a [IpAddr],
        last: &'a BTreeMap<String, IpAddr>,
    ) -> AddressRequest<'a> {
        AddressRequest {
            subnets,
            held,
            requested,
            pick: (true, true),
            owner: "c1/eth0",
            shared_owner: None,
            last,
            can_claim_block: false,
        }
    }

    #[test]
    fn picks_one_address_per_family_after_the_hint() {
        let s = subnets(&["10.1.0.0/24", "fd01::/64"]);
        let held = BTreeMap::from([(ip("10.1.0.2"), "other/eth0".to_string())]);
        let last = BTreeMap::new();
        let p = plan_reservation(&req(&s, &held, &[], &last)).unwrap();
        assert_eq!(
            p.ips,
            vec![
                "10.1.0.3/24".parse().unwrap(),
                "fd01::2/64".parse().unwrap()
            ]
        );
        assert_eq!(p.claim, vec![ip("10.1.0.3"), ip("fd01::2")]);
        let hint = p.last.unwrap();
        assert_eq!(hint["10.1.0.0/24"], ip("10.1.0.3"));
        // The next plan continues after the hint.
        let p2 = plan_reservation(&req(&s, &BTreeMap::new(), &[], &hint)).unwrap();
        assert_eq!(p2.ips[0], "10.1.0.4/24".parse().unwrap());
    }

    #[test]
    fn a_hosts_blocks_in_use_fill_before_its_empty_spare() {
        // The spare (10.1.0.0/26) comes first in the view; the used block still has room.
        let s = subnets(&["10.1.0.0/26", "10.1.0.64/26"]);
        let held = BTreeMap::from([(ip("10.1.0.66"), "other/eth0".to_string())]);
        let last = BTreeMap::new();
        let multi = AddressRequest {
            can_claim_block: true,
            ..req(&s, &held, &[], &last)
        };
        assert_eq!(
            plan_reservation(&multi).unwrap().claim,
            vec![ip("10.1.0.67")]
        );
        // A single-host network keeps its subnets' order.
        let single = plan_reservation(&req(&s, &held, &[], &last)).unwrap();
        assert_eq!(single.claim, vec![ip("10.1.0.2")]);
        // Nothing in use: the first block, as before.
        let none = BTreeMap::new();
        let fresh = AddressRequest {
            can_claim_block: true,
            ..req(&s, &none, &[], &last)
        };
        assert_eq!(
            plan_reservation(&fresh).unwrap().claim,
            vec![ip("10.1.0.2")]
        );
    }

    #[test]
    fn requested_addresses_are_checked_and_do_not_move_the_hint() {
        let s = subnets(&["10.1.0.0/24"]);
        let held = BTreeMap::from([(ip("10.1.0.9"), "other/eth0".to_string())]);
        let last = BTreeMap::new();
        let asked = [ip("10.1.0.7")];
        let p = plan_reservation(&req(&s, &held, &asked, &last)).unwrap();
        assert_eq!(p.claim, vec![ip("10.1.0.7")]);
        assert_eq!(p.last, None);
        let taken = [ip("10.1.0.9")];
        assert_eq!(
            plan_reservation(&req(&s, &held, &taken, &last)),
            Err(ReservationError::HeldBy {
                ip: ip("10.1.0.9"),
                owner: "other/eth0".into()
            })
        );
        let gateway = [ip("10.1.0.1")];
        assert!(matches!(
            plan_reservation(&req(&s, &held, &gateway, &last)),
            Err(ReservationError::Ipam(IpamError::Reserved { .. }))
        ));
        let outside = [ip("10.2.0.1")];
        assert!(matches!(
            plan_reservation(&req(&s, &held, &outside, &last)),
            Err(ReservationError::Ipam(IpamError::NotInPool(_)))
        ));
    }

    #[test]
    fn a_shared_owners_address_is_referenced_and_the_other_family_picked() {
        let s = subnets(&["10.1.0.0/24", "fd01::/64"]);
        let held = BTreeMap::from([
            (ip("10.1.0.5"), "ipam-x".to_string()),
            (ip("10.1.0.6"), "c1/eth0".to_string()),
        ]);
        let last = BTreeMap::new();
        let asked = [ip("10.1.0.5")];
        let mut r = req(&s, &held, &asked, &last);
        r.shared_owner = Some("ipam-x");
        let p = plan_reservation(&r).unwrap();
        assert_eq!(p.reference, vec![ip("10.1.0.5")]);
        assert_eq!(p.claim, vec![ip("fd01::2")]);
        assert_eq!(p.ips[0], "10.1.0.5/24".parse().unwrap());
        // Its own name on an address without a record: a leftover, refused.
        let stale = [ip("10.1.0.6")];
        r.requested = &stale;
        assert!(matches!(
            plan_reservation(&r),
            Err(ReservationError::Stale { .. })
        ));
        // Without a shared owner the same address is simply in use (Docker's IPAM reserves
        // every container's address under one owner id).
        r.shared_owner = None;
        assert!(matches!(
            plan_reservation(&r),
            Err(ReservationError::HeldBy { .. })
        ));
    }

    #[test]
    fn a_full_block_asks_for_another_only_when_one_can_be_claimed() {
        let s = subnets(&["10.1.0.0/30"]);
        let held = BTreeMap::from([(ip("10.1.0.2"), "other/eth0".to_string())]);
        let last = BTreeMap::new();
        let mut r = req(&s, &held, &[], &last);
        assert!(matches!(
            plan_reservation(&r),
            Err(ReservationError::Ipam(IpamError::Exhausted { .. }))
        ));
        r.can_claim_block = true;
        assert_eq!(
            plan_reservation(&r),
            Err(ReservationError::NeedBlock { v6: false })
        );
        // Only the families asked for are picked.
        r.pick = (false, false);
        assert!(plan_reservation(&r).unwrap().ips.is_empty());
    }

    #[test]
    fn two_requested_addresses_in_one_subnet_are_refused() {
        let s = subnets(&["10.1.0.0/24"]);
        let held = BTreeMap::new();
        let last = BTreeMap::new();
        let asked = [ip("10.1.0.7"), ip("10.1.0.8")];
        assert!(matches!(
            plan_reservation(&req(&s, &held, &asked, &last)),
            Err(ReservationError::Ipam(IpamError::TwoInOneSubnet(_)))
        ));
    }
}
