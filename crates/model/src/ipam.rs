//! Address management decisions: which addresses a subnet may hand out and which one is next.
//! Pure: the caller reads what is taken from the store and commits the choice in a transaction.

use std::collections::BTreeSet;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipnet::IpNet;

use crate::network::Subnet;

/// Why an address could not be planned.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IpamError {
    /// A subnet definition is unusable.
    #[error("subnet {cidr}: {why}")]
    InvalidSubnet {
        /// The subnet as given.
        cidr: String,
        /// What is wrong.
        why: String,
    },
    /// Two subnets of one network overlap.
    #[error("subnets {a} and {b} overlap")]
    Overlap {
        /// One subnet.
        a: IpNet,
        /// The other.
        b: IpNet,
    },
    /// The pool has no subnet at all.
    #[error("the network has no subnets")]
    NoSubnets,
    /// Every address of the range is taken.
    #[error("no free address left in {subnet} (range {start}-{end})")]
    Exhausted {
        /// The subnet.
        subnet: IpNet,
        /// First address of the range.
        start: IpAddr,
        /// Last address of the range.
        end: IpAddr,
    },
    /// A requested address is already allocated.
    #[error("address {0} is already in use")]
    AddressInUse(IpAddr),
    /// A requested address is in none of the network's subnets.
    #[error("address {0} is not in any subnet of the network")]
    NotInPool(IpAddr),
    /// A requested address is the gateway, network, broadcast or an excluded address.
    #[error("address {ip} is reserved ({why})")]
    Reserved {
        /// The address.
        ip: IpAddr,
        /// Which reservation.
        why: &'static str,
    },
    /// Two requested addresses of the same family.
    #[error("more than one address requested in subnet {0}")]
    TwoInOneSubnet(IpNet),
}

/// A subnet with every default filled in and checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResolvedSubnet {
    /// The subnet.
    pub cidr: IpNet,
    /// The gateway (the bridge's address).
    pub gateway: IpAddr,
    /// First address handed out.
    pub range_start: IpAddr,
    /// Last address handed out.
    pub range_end: IpAddr,
    /// Never handed out.
    pub exclude: Vec<IpNet>,
}

fn to_u128(ip: IpAddr) -> u128 {
    match ip {
        IpAddr::V4(a) => u32::from(a) as u128,
        IpAddr::V6(a) => u128::from(a),
    }
}

fn from_u128(v: u128, v4: bool) -> IpAddr {
    if v4 {
        IpAddr::V4(Ipv4Addr::from(v as u32))
    } else {
        IpAddr::V6(Ipv6Addr::from(v))
    }
}

fn bounds(n: &IpNet) -> (u128, u128) {
    (to_u128(n.network()), to_u128(n.broadcast()))
}

impl ResolvedSubnet {
    /// The gateway with the subnet's prefix length (the bridge address).
    pub fn gateway_net(&self) -> IpNet {
        IpNet::new(self.gateway, self.cidr.prefix_len()).unwrap_or(self.cidr)
    }

    /// Why `ip` cannot be given to a container, if it cannot (range limits not applied).
    fn reservation(&self, ip: IpAddr) -> Option<&'static str> {
        if !self.cidr.contains(&ip) {
            return Some("outside the subnet");
        }
        if ip == self.gateway {
            return Some("the gateway");
        }
        let (net, bcast) = bounds(&self.cidr);
        let v = to_u128(ip);
        if self.cidr.addr().is_ipv4() && self.cidr.prefix_len() < 31 && (v == net || v == bcast) {
            return Some(if v == net {
                "the network address"
            } else {
                "the broadcast address"
            });
        }
        if self.cidr.addr().is_ipv6() && v == net {
            return Some("the subnet-router anycast address");
        }
        if self.exclude.iter().any(|e| e.contains(&ip)) {
            return Some("excluded");
        }
        None
    }

    /// True when `ip` is inside the allocation range and not reserved.
    pub fn contains_allocatable(&self, ip: IpAddr) -> bool {
        let v = to_u128(ip);
        self.reservation(ip).is_none()
            && v >= to_u128(self.range_start)
            && v <= to_u128(self.range_end)
    }
}

/// Fill in a subnet's defaults and check it.
pub fn validate_subnet(s: &Subnet) -> Result<ResolvedSubnet, IpamError> {
    let bad = |why: String| IpamError::InvalidSubnet {
        cidr: s.cidr.to_string(),
        why,
    };
    let cidr = s.cidr;
    if cidr.trunc() != cidr {
        return Err(bad(format!(
            "host bits are set; the network address is {}",
            cidr.trunc()
        )));
    }
    let v4 = cidr.addr().is_ipv4();
    let (net, bcast) = bounds(&cidr);
    let (first, last) = if v4 {
        (net + 1, bcast - 1)
    } else {
        (net + 1, bcast)
    };
    let too_small = if v4 {
        cidr.prefix_len() > 30
    } else {
        cidr.prefix_len() > 126
    };
    if too_small {
        return Err(bad(
            "too small: it needs a gateway and at least one container address".into(),
        ));
    }
    let inside = |what: &str, ip: IpAddr| -> Result<u128, IpamError> {
        if ip.is_ipv4() != v4 || !cidr.contains(&ip) {
            return Err(bad(format!("{what} {ip} is outside the subnet")));
        }
        Ok(to_u128(ip))
    };
    let gateway = match s.gateway {
        Some(g) => {
            let v = inside("gateway", g)?;
            if v == net || (v4 && v == bcast) {
                return Err(bad(format!(
                    "gateway {g} is the network or broadcast address"
                )));
            }
            g
        }
        None => from_u128(first, v4),
    };
    let gw = to_u128(gateway);
    let start = match s.range_start {
        Some(a) => inside("rangeStart", a)?,
        None if gw == first => first + 1,
        None => first,
    };
    let end = match s.range_end {
        Some(a) => inside("rangeEnd", a)?,
        None => last,
    };
    if start > end {
        return Err(bad(format!(
            "rangeStart {} is after rangeEnd {}",
            from_u128(start, v4),
            from_u128(end, v4)
        )));
    }
    for e in &s.exclude {
        if e.addr().is_ipv4() != v4
            || !cidr.contains(&e.network())
            || !cidr.contains(&e.broadcast())
        {
            return Err(bad(format!("excluded block {e} is not inside the subnet")));
        }
    }
    Ok(ResolvedSubnet {
        cidr,
        gateway,
        range_start: from_u128(start, v4),
        range_end: from_u128(end, v4),
        exclude: s.exclude.clone(),
    })
}

/// Resolve every subnet of a network; at least one, none overlapping.
pub fn validate_network_subnets(subnets: &[Subnet]) -> Result<Vec<ResolvedSubnet>, IpamError> {
    if subnets.is_empty() {
        return Err(IpamError::NoSubnets);
    }
    let resolved = subnets
        .iter()
        .map(validate_subnet)
        .collect::<Result<Vec<_>, _>>()?;
    for (i, a) in resolved.iter().enumerate() {
        if let Some(b) = resolved[i + 1..]
            .iter()
            .find(|b| overlaps(&a.cidr, &b.cidr))
        {
            return Err(IpamError::Overlap {
                a: a.cidr,
                b: b.cidr,
            });
        }
    }
    Ok(resolved)
}

/// True when two prefixes share any address (never across families).
pub fn overlaps(a: &IpNet, b: &IpNet) -> bool {
    if a.addr().is_ipv4() != b.addr().is_ipv4() {
        return false;
    }
    let (a0, a1) = bounds(a);
    let (b0, b1) = bounds(b);
    a0 <= b1 && b0 <= a1
}

/// The first of `candidate` that overlaps one of `existing` (owner name, prefix).
pub fn find_overlap(
    candidate: &[IpNet],
    existing: &[(String, IpNet)],
) -> Option<(IpNet, String, IpNet)> {
    candidate.iter().find_map(|c| {
        existing
            .iter()
            .find(|(_, e)| overlaps(c, e))
            .map(|(n, e)| (*c, n.clone(), *e))
    })
}

/// The first allocatable address in [a, b] not in `used`, jumping over the gateway, excluded
/// blocks and runs of used addresses (never enumerating the whole range).
fn first_free_in(s: &ResolvedSubnet, used: &BTreeSet<IpAddr>, a: u128, b: u128) -> Option<u128> {
    let v4 = s.cidr.addr().is_ipv4();
    let mut x = a;
    while x <= b {
        let ip = from_u128(x, v4);
        if let Some(e) = s.exclude.iter().find(|e| e.contains(&ip)) {
            x = bounds(e).1.checked_add(1)?;
            continue;
        }
        if ip == s.gateway || s.reservation(ip).is_some() {
            x = x.checked_add(1)?;
            continue;
        }
        if used.contains(&ip) {
            // Skip the whole run of consecutive used addresses in one walk.
            let mut next = x;
            for u in used.range(ip..) {
                if to_u128(*u) != next {
                    break;
                }
                next = next.checked_add(1)?;
            }
            x = next;
            continue;
        }
        return Some(x);
    }
    None
}

/// The next free address of a subnet after `start_after` (wrapping to the range start), so a
/// just-released address is not reused at once.
pub fn next_free(
    subnet: &ResolvedSubnet,
    used: &BTreeSet<IpAddr>,
    start_after: Option<IpAddr>,
) -> Option<IpAddr> {
    let v4 = subnet.cidr.addr().is_ipv4();
    let (lo, hi) = (to_u128(subnet.range_start), to_u128(subnet.range_end));
    let from = match start_after.map(to_u128) {
        Some(p) if p >= lo && p < hi && start_after.map(|a| a.is_ipv4()) == Some(v4) => p + 1,
        _ => lo,
    };
    first_free_in(subnet, used, from, hi)
        .or_else(|| {
            if from > lo {
                first_free_in(subnet, used, lo, from - 1)
            } else {
                None
            }
        })
        .map(|v| from_u128(v, v4))
}

/// Plan a container's addresses. Without requests: one per address family of the pool, from the
/// first subnet of that family with room. With requests: exactly those, each checked. A
/// requested address may lie outside rangeStart..rangeEnd (that range only limits automatic
/// picks) but must be in a subnet and not reserved or used.
pub fn plan_allocation(
    subnets: &[ResolvedSubnet],
    used: &BTreeSet<IpAddr>,
    requested: &[IpAddr],
    last_allocated: &dyn Fn(&IpNet) -> Option<IpAddr>,
) -> Result<Vec<IpNet>, IpamError> {
    if subnets.is_empty() {
        return Err(IpamError::NoSubnets);
    }
    let with_prefix =
        |ip: IpAddr, s: &ResolvedSubnet| IpNet::new(ip, s.cidr.prefix_len()).unwrap_or(s.cidr);
    if !requested.is_empty() {
        let mut out: Vec<IpNet> = Vec::new();
        for &ip in requested {
            let s = subnets
                .iter()
                .find(|s| s.cidr.contains(&ip))
                .ok_or(IpamError::NotInPool(ip))?;
            if let Some(why) = s.reservation(ip) {
                return Err(IpamError::Reserved { ip, why });
            }
            if used.contains(&ip) {
                return Err(IpamError::AddressInUse(ip));
            }
            if out.iter().any(|o| s.cidr.contains(&o.addr())) {
                return Err(IpamError::TwoInOneSubnet(s.cidr));
            }
            out.push(with_prefix(ip, s));
        }
        return Ok(out);
    }
    let mut out = Vec::new();
    for v4 in [true, false] {
        let family: Vec<&ResolvedSubnet> = subnets
            .iter()
            .filter(|s| s.cidr.addr().is_ipv4() == v4)
            .collect();
        let Some(first) = family.first() else {
            continue;
        };
        let picked = family
            .iter()
            .find_map(|s| next_free(s, used, last_allocated(&s.cidr)).map(|ip| with_prefix(ip, s)));
        match picked {
            Some(ip) => out.push(ip),
            None => {
                return Err(IpamError::Exhausted {
                    subnet: first.cidr,
                    start: first.range_start,
                    end: first.range_end,
                });
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn sub(c: &str) -> Subnet {
        Subnet::new(c.parse().unwrap())
    }
    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }
    fn none(_: &IpNet) -> Option<IpAddr> {
        None
    }

    #[test]
    fn defaults_v4_and_v6() {
        let r = validate_subnet(&sub("10.0.0.0/24")).unwrap();
        assert_eq!(
            (r.gateway, r.range_start, r.range_end),
            (ip("10.0.0.1"), ip("10.0.0.2"), ip("10.0.0.254"))
        );
        assert_eq!(r.gateway_net().to_string(), "10.0.0.1/24");
        let r = validate_subnet(&sub("fd00::/64")).unwrap();
        assert_eq!((r.gateway, r.range_start), (ip("fd00::1"), ip("fd00::2")));
        assert_eq!(r.range_end, ip("fd00::ffff:ffff:ffff:ffff"));
    }

    #[test]
    fn rejects_bad_subnets() {
        let mut hostbits = sub("10.0.0.0/24");
        hostbits.cidr = "10.0.0.5/24".parse().unwrap();
        let e = validate_subnet(&hostbits).unwrap_err().to_string();
        assert!(e.contains("10.0.0.0/24"), "{e}");
        assert!(validate_subnet(&sub("10.0.0.0/31")).is_err());
        assert!(validate_subnet(&sub("fd00::/127")).is_err());
        let mut s = sub("10.0.0.0/24");
        s.gateway = Some(ip("10.0.1.1"));
        assert!(validate_subnet(&s)
            .unwrap_err()
            .to_string()
            .contains("outside"));
        let mut s = sub("10.0.0.0/24");
        s.range_start = Some(ip("10.0.0.100"));
        s.range_end = Some(ip("10.0.0.50"));
        assert!(validate_subnet(&s).is_err());
        assert!(validate_network_subnets(&[]).is_err());
        assert!(matches!(
            validate_network_subnets(&[sub("10.0.0.0/16"), sub("10.0.5.0/24")]),
            Err(IpamError::Overlap { .. })
        ));
    }

    #[test]
    fn custom_gateway_moves_the_range() {
        let mut s = sub("10.0.0.0/24");
        s.gateway = Some(ip("10.0.0.254"));
        let r = validate_subnet(&s).unwrap();
        assert_eq!(r.range_start, ip("10.0.0.1"));
        assert_eq!(next_free(&r, &BTreeSet::new(), None), Some(ip("10.0.0.1")));
        // The gateway inside the range is skipped.
        let used: BTreeSet<IpAddr> = (1..254)
            .map(|i| IpAddr::V4(Ipv4Addr::new(10, 0, 0, i)))
            .collect();
        assert_eq!(next_free(&r, &used, None), None);
    }

    #[test]
    fn skips_used_runs_exclusions_and_rotates() {
        let mut s = sub("10.0.0.0/24");
        s.exclude = vec!["10.0.0.4/30".parse().unwrap()];
        let r = validate_subnet(&s).unwrap();
        let used: BTreeSet<IpAddr> = [ip("10.0.0.2"), ip("10.0.0.3")].into();
        assert_eq!(next_free(&r, &used, None), Some(ip("10.0.0.8")));
        // Rotation: after .8 comes .9 even though .2 is free now.
        assert_eq!(
            next_free(&r, &BTreeSet::new(), Some(ip("10.0.0.8"))),
            Some(ip("10.0.0.9"))
        );
        // Wraps around at the end.
        assert_eq!(
            next_free(&r, &BTreeSet::new(), Some(ip("10.0.0.254"))),
            Some(ip("10.0.0.2"))
        );
    }

    #[test]
    fn plans_one_per_family_and_spills_to_the_next_subnet() {
        let subs =
            validate_network_subnets(&[sub("10.0.0.0/30"), sub("10.0.1.0/24"), sub("fd00::/64")])
                .unwrap();
        let p = plan_allocation(&subs, &BTreeSet::new(), &[], &none).unwrap();
        assert_eq!(
            p.iter().map(|n| n.to_string()).collect::<Vec<_>>(),
            vec!["10.0.0.2/30", "fd00::2/64"]
        );
        let used: BTreeSet<IpAddr> = [ip("10.0.0.2")].into();
        let p = plan_allocation(&subs, &used, &[], &none).unwrap();
        assert_eq!(p[0].to_string(), "10.0.1.2/24");
    }

    #[test]
    fn static_requests() {
        let subs = validate_network_subnets(&[sub("10.0.0.0/24")]).unwrap();
        let used: BTreeSet<IpAddr> = [ip("10.0.0.9")].into();
        assert_eq!(
            plan_allocation(&subs, &used, &[ip("10.0.0.77")], &none).unwrap()[0].to_string(),
            "10.0.0.77/24"
        );
        assert_eq!(
            plan_allocation(&subs, &used, &[ip("10.0.0.9")], &none),
            Err(IpamError::AddressInUse(ip("10.0.0.9")))
        );
        assert_eq!(
            plan_allocation(&subs, &used, &[ip("10.9.0.9")], &none),
            Err(IpamError::NotInPool(ip("10.9.0.9")))
        );
        assert!(matches!(
            plan_allocation(&subs, &used, &[ip("10.0.0.1")], &none),
            Err(IpamError::Reserved { .. })
        ));
        assert!(matches!(
            plan_allocation(&subs, &used, &[ip("10.0.0.255")], &none),
            Err(IpamError::Reserved { .. })
        ));
        assert!(matches!(
            plan_allocation(&subs, &used, &[ip("10.0.0.3"), ip("10.0.0.4")], &none),
            Err(IpamError::TwoInOneSubnet(_))
        ));
    }

    #[test]
    fn exhaustion_message() {
        let subs = validate_network_subnets(&[sub("10.0.0.0/30")]).unwrap();
        let used: BTreeSet<IpAddr> = [ip("10.0.0.2")].into();
        let e = plan_allocation(&subs, &used, &[], &none)
            .unwrap_err()
            .to_string();
        assert!(e.contains("no free address left in 10.0.0.0/30"), "{e}");
    }

    #[test]
    fn big_ipv6_and_dense_ipv4_are_fast() {
        let r = validate_subnet(&sub("10.0.0.0/16")).unwrap();
        let used: BTreeSet<IpAddr> = (2..60_000u32)
            .map(|i| IpAddr::V4(Ipv4Addr::from(0x0a00_0000 + i)))
            .collect();
        assert_eq!(
            next_free(&r, &used, None),
            Some(IpAddr::V4(Ipv4Addr::from(0x0a00_0000 + 60_000)))
        );
        let r = validate_subnet(&sub("fd00::/64")).unwrap();
        assert_eq!(
            next_free(&r, &BTreeSet::new(), Some(ip("fd00::ffff:ffff:ffff:fffe"))),
            Some(ip("fd00::ffff:ffff:ffff:ffff"))
        );
    }

    proptest! {
        #[test]
        fn sequential_allocations_are_distinct_then_exhausted(prefix in 26u8..=29, excl in 0u8..4) {
            let mut s = sub(&format!("10.1.0.0/{prefix}"));
            if excl > 0 {
                s.exclude = vec![format!("10.1.0.{}/32", 2 + excl).parse().unwrap()];
            }
            let subs = validate_network_subnets(&[s]).unwrap();
            let mut used = BTreeSet::new();
            let mut last = None;
            loop {
                let l = last;
                match plan_allocation(&subs, &used, &[], &move |_| l) {
                    Ok(p) => {
                        let a = p[0].addr();
                        prop_assert!(subs[0].contains_allocatable(a));
                        prop_assert!(used.insert(a), "duplicate {}", a);
                        last = Some(a);
                    }
                    Err(IpamError::Exhausted { .. }) => break,
                    Err(e) => prop_assert!(false, "{}", e),
                }
            }
            let size = 1u32 << (32 - prefix);
            let expect = size - 3 - u32::from(excl > 0);
            prop_assert_eq!(used.len() as u32, expect);
        }
    }
}
