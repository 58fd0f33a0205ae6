//! Registering services: how a registration request and the stored service combine into the
//! new record, and which virtual IPs that claims and releases (pure; the control layer writes
//! the result in one store transaction).

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use crate::service::{
    pick_vip, validate_producer, validate_service, HealthCheck, IngressPort, Producer, Service,
    ServiceError, ServicePort, VipRanges,
};

/// How a service gets a virtual IP (`--vip auto|none|IP`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VipChoice {
    /// One per family from the cluster's VIP ranges.
    Auto,
    /// No virtual IP (DNS answers with the producers' addresses).
    None,
    /// This address.
    Ip(IpAddr),
}

impl std::str::FromStr for VipChoice {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(VipChoice::Auto),
            "none" => Ok(VipChoice::None),
            _ => s
                .parse()
                .map(VipChoice::Ip)
                .map_err(|_| format!("--vip {s:?}: expected auto, none or an IP address")),
        }
    }
}

/// What a registration asks for; `None` fields keep what the stored service has (a new
/// service gets the defaults: no ports, automatic VIPs, every network, no check).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ServiceRequest {
    /// Service name.
    pub name: String,
    /// Replace the ports.
    pub ports: Option<Vec<ServicePort>>,
    /// Ports that must exist (added unless a port of that number and protocol is there):
    /// what `ferrynet run --service web:80` needs without disturbing the others.
    pub ensure_ports: Vec<ServicePort>,
    /// Replace the VIP choice.
    pub vips: Option<Vec<VipChoice>>,
    /// Replace the networks the name is visible on.
    pub networks: Option<Vec<String>>,
    /// Replace the ingress ports.
    pub ingress: Option<Vec<IngressPort>>,
    /// Set client-IP affinity.
    pub affinity: Option<bool>,
    /// Set (`Some(Some)`) or remove (`Some(None)`) the service's default check.
    pub check: Option<Option<HealthCheck>>,
}

/// Why a registration is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RegistryError {
    /// The record itself is invalid.
    #[error(transparent)]
    Invalid(#[from] ServiceError),
    /// `--vip` was contradictory.
    #[error("service {service}: {reason}")]
    BadVips {
        /// The service.
        service: String,
        /// What is wrong.
        reason: String,
    },
    /// A requested VIP belongs to another service.
    #[error("virtual IP {ip} already belongs to service {owner}")]
    VipTaken {
        /// The address.
        ip: IpAddr,
        /// Its service.
        owner: String,
    },
    /// A producer maps a port the service does not have.
    #[error("producer {id}: --target {port}:…: service {service} has no port {port}")]
    UnknownServicePort {
        /// The service.
        service: String,
        /// The producer.
        id: String,
        /// The port.
        port: u16,
    },
    /// A producer no agent would check.
    #[error("producer {id} has no host (--host none), so no agent would run its health check; give it a host or no check")]
    UncheckedProducer {
        /// The producer.
        id: String,
    },
}

/// The outcome of planning a registration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServicePlan {
    /// The record to store.
    pub service: Service,
    /// VIPs to claim (`vips/<ip>` must be missing).
    pub claim: Vec<IpAddr>,
    /// VIPs the service held and gives up.
    pub release: Vec<IpAddr>,
}

/// Combine `req` with the stored service (if any). `taken` maps every claimed VIP to its
/// service. VIPs stay what they were unless `req.vips` asks otherwise, so re-registering is
/// idempotent.
pub fn plan_service(
    existing: Option<&Service>,
    req: &ServiceRequest,
    taken: &BTreeMap<IpAddr, String>,
    ranges: &VipRanges,
) -> Result<ServicePlan, RegistryError> {
    let mut svc = existing
        .cloned()
        .unwrap_or_else(|| Service::named(&req.name));
    if let Some(p) = &req.ports {
        svc.ports = p.clone();
    }
    for p in &req.ensure_ports {
        if !svc
            .ports
            .iter()
            .any(|q| q.port == p.port && q.protocol == p.protocol)
        {
            svc.ports.push(p.clone());
        }
    }
    if let Some(n) = &req.networks {
        svc.networks = n.clone();
    }
    if let Some(i) = &req.ingress {
        svc.ingress = i.clone();
    }
    if let Some(a) = req.affinity {
        svc.affinity = a;
    }
    if let Some(c) = &req.check {
        svc.check = c.clone();
    }
    validate_service(&svc)?;

    let old: Vec<IpAddr> = existing.map(|s| s.vips.clone()).unwrap_or_default();
    let choices = match (&req.vips, existing) {
        (Some(c), _) => c.clone(),
        // Kept as they are (a service registered with `--vip none` stays without).
        (None, Some(_)) => return Ok(finish(svc, old.clone(), &old)),
        (None, None) => vec![VipChoice::Auto],
    };
    let wanted = wanted_vips(&svc.name, &choices, &old, taken, ranges)?;
    Ok(finish(svc, wanted, &old))
}

fn finish(mut svc: Service, wanted: Vec<IpAddr>, old: &[IpAddr]) -> ServicePlan {
    let claim = wanted
        .iter()
        .filter(|a| !old.contains(a))
        .copied()
        .collect();
    let release = old
        .iter()
        .filter(|a| !wanted.contains(a))
        .copied()
        .collect();
    svc.vips = wanted;
    ServicePlan {
        service: svc,
        claim,
        release,
    }
}

/// The VIPs `choices` name: explicit addresses (one per family), `auto` filling the families
/// left (keeping a VIP the service already has in that family), `none` alone meaning none.
fn wanted_vips(
    name: &str,
    choices: &[VipChoice],
    old: &[IpAddr],
    taken: &BTreeMap<IpAddr, String>,
    ranges: &VipRanges,
) -> Result<Vec<IpAddr>, RegistryError> {
    let bad = |reason: &str| RegistryError::BadVips {
        service: name.to_string(),
        reason: reason.to_string(),
    };
    if choices.contains(&VipChoice::None) {
        if choices.len() > 1 {
            return Err(bad("--vip none cannot be combined with other --vip values"));
        }
        return Ok(Vec::new());
    }
    let mut out: Vec<IpAddr> = Vec::new();
    for c in choices {
        if let VipChoice::Ip(ip) = c {
            if out.iter().any(|a| a.is_ipv6() == ip.is_ipv6()) {
                return Err(bad("at most one virtual IP per address family"));
            }
            if ip.is_unspecified() || ip.is_loopback() || ip.is_multicast() {
                return Err(bad(&format!("{ip} cannot be a virtual IP")));
            }
            match taken.get(ip) {
                Some(owner) if owner != name => {
                    return Err(RegistryError::VipTaken {
                        ip: *ip,
                        owner: owner.clone(),
                    })
                }
                _ => out.push(*ip),
            }
        }
    }
    if choices.contains(&VipChoice::Auto) {
        let in_use: BTreeSet<IpAddr> = taken.keys().copied().collect();
        for (v6, range) in [(false, ranges.v4), (true, ranges.v6)] {
            let Some(range) = range else { continue };
            if out.iter().any(|a| a.is_ipv6() == v6) {
                continue;
            }
            // The service's own VIP of this family stays, wherever it came from.
            if let Some(keep) = old.iter().find(|a| a.is_ipv6() == v6) {
                out.push(*keep);
                continue;
            }
            out.push(pick_vip(range, &in_use, name)?);
        }
    }
    out.sort();
    Ok(out)
}

/// Check a producer against the service it joins: valid record, every mapped port one of the
/// service's, a host to check it when it has a check.
pub fn validate_producer_for(p: &Producer, svc: &Service) -> Result<(), RegistryError> {
    validate_producer(p)?;
    if let Some(port) = p
        .ports
        .keys()
        .find(|sp| !svc.ports.iter().any(|q| q.port == **sp))
    {
        return Err(RegistryError::UnknownServicePort {
            service: svc.name.clone(),
            id: p.id.clone(),
            port: *port,
        });
    }
    if p.host.is_none() && p.effective_check(Some(svc)).is_some() {
        return Err(RegistryError::UncheckedProducer { id: p.id.clone() });
    }
    Ok(())
}

/// The id a producer registered by address gets when none is given: its first address, with
/// `:` (IPv6) spelled `-` so it is a valid key segment.
pub fn default_producer_id(addrs: &[IpAddr]) -> Option<String> {
    addrs.first().map(|a| a.to_string().replace(':', "-"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::portmap::Protocol;
    use crate::service::CheckKind;

    fn port(n: u16) -> ServicePort {
        ServicePort {
            name: format!("p{n}"),
            port: n,
            protocol: Protocol::Tcp,
        }
    }
    fn req(name: &str) -> ServiceRequest {
        ServiceRequest {
            name: name.into(),
            ports: Some(vec![port(80)]),
            ..Default::default()
        }
    }

    #[test]
    fn a_new_service_gets_one_vip_per_family() {
        let p = plan_service(None, &req("web"), &BTreeMap::new(), &VipRanges::default()).unwrap();
        assert_eq!(p.service.vips.len(), 2);
        assert!(p.service.vip(false).is_some() && p.service.vip(true).is_some());
        assert_eq!(p.claim, p.service.vips);
        assert!(p.release.is_empty());
    }

    #[test]
    fn re_registering_keeps_the_vips_and_claims_nothing() {
        let ranges = VipRanges::default();
        let first = plan_service(None, &req("web"), &BTreeMap::new(), &ranges).unwrap();
        let taken: BTreeMap<IpAddr, String> = first
            .service
            .vips
            .iter()
            .map(|v| (*v, "web".to_string()))
            .collect();
        let mut again = req("web");
        again.ports = None;
        let second = plan_service(Some(&first.service), &again, &taken, &ranges).unwrap();
        assert_eq!(second.service, first.service);
        assert!(second.claim.is_empty() && second.release.is_empty());
        // Explicitly asking for auto keeps them too.
        again.vips = Some(vec![VipChoice::Auto]);
        let third = plan_service(Some(&first.service), &again, &taken, &ranges).unwrap();
        assert_eq!(third.service.vips, first.service.vips);
    }

    #[test]
    fn explicit_none_and_taken_vips() {
        let ranges = VipRanges::default();
        let ip: IpAddr = "10.96.7.7".parse().unwrap();
        let mut r = req("web");
        r.vips = Some(vec![VipChoice::Ip(ip)]);
        let p = plan_service(None, &r, &BTreeMap::new(), &ranges).unwrap();
        assert_eq!(p.service.vips, vec![ip]);
        let taken: BTreeMap<IpAddr, String> = [(ip, "db".to_string())].into();
        assert!(matches!(
            plan_service(None, &r, &taken, &ranges),
            Err(RegistryError::VipTaken { .. })
        ));
        r.vips = Some(vec![VipChoice::Ip(ip), VipChoice::Auto]);
        let p = plan_service(None, &r, &BTreeMap::new(), &ranges).unwrap();
        assert_eq!(p.service.vips.len(), 2);
        assert_eq!(p.service.vip(false), Some(ip));
        // Switching to none releases both.
        let mut none = req("web");
        none.vips = Some(vec![VipChoice::None]);
        let q = plan_service(Some(&p.service), &none, &BTreeMap::new(), &ranges).unwrap();
        assert!(q.service.vips.is_empty());
        assert_eq!(q.release.len(), 2);
        none.vips = Some(vec![VipChoice::None, VipChoice::Auto]);
        assert!(plan_service(None, &none, &BTreeMap::new(), &ranges).is_err());
        r.vips = Some(vec![
            VipChoice::Ip(ip),
            VipChoice::Ip("10.96.7.8".parse().unwrap()),
        ]);
        assert!(plan_service(None, &r, &BTreeMap::new(), &ranges).is_err());
    }

    #[test]
    fn automatic_vips_avoid_taken_ones() {
        let ranges = VipRanges::default();
        let mut taken = BTreeMap::new();
        for i in 0..50 {
            let name = format!("s{i}");
            let p = plan_service(None, &req(&name), &taken, &ranges).unwrap();
            for v in p.claim {
                assert!(taken.insert(v, name.clone()).is_none(), "{v} given twice");
            }
        }
        assert_eq!(taken.len(), 100);
    }

    #[test]
    fn ensure_ports_adds_only_missing_ones() {
        let mut r = ServiceRequest {
            name: "web".into(),
            ensure_ports: vec![port(80)],
            ..Default::default()
        };
        let a = plan_service(None, &r, &BTreeMap::new(), &VipRanges::default()).unwrap();
        assert_eq!(a.service.ports, vec![port(80)]);
        r.ensure_ports = vec![port(80), port(443)];
        let b = plan_service(
            Some(&a.service),
            &r,
            &BTreeMap::new(),
            &VipRanges::default(),
        )
        .unwrap();
        assert_eq!(b.service.ports, vec![port(80), port(443)]);
    }

    #[test]
    fn bad_names_and_ports_are_refused() {
        assert!(plan_service(None, &req("Web"), &BTreeMap::new(), &VipRanges::default()).is_err());
        let mut r = req("web");
        r.ports = Some(vec![port(80), port(80)]);
        assert!(plan_service(None, &r, &BTreeMap::new(), &VipRanges::default()).is_err());
    }

    #[test]
    fn producers_are_checked_against_their_service() {
        let svc = plan_service(None, &req("web"), &BTreeMap::new(), &VipRanges::default())
            .unwrap()
            .service;
        let mut p = Producer {
            service: "web".into(),
            id: default_producer_id(&["fd00::1".parse().unwrap()]).unwrap(),
            host: Some("h1".into()),
            network: None,
            container: None,
            netns: None,
            addrs: vec!["fd00::1".parse().unwrap()],
            ports: [(80, 8080)].into(),
            check: None,
        };
        assert_eq!(p.id, "fd00--1");
        assert!(validate_producer_for(&p, &svc).is_ok());
        p.ports = [(81, 8080)].into();
        assert!(matches!(
            validate_producer_for(&p, &svc),
            Err(RegistryError::UnknownServicePort { port: 81, .. })
        ));
        p.ports.clear();
        p.host = None;
        assert!(validate_producer_for(&p, &svc).is_ok());
        p.check = Some(HealthCheck::new(CheckKind::Tcp { port: 80 }));
        assert!(matches!(
            validate_producer_for(&p, &svc),
            Err(RegistryError::UncheckedProducer { .. })
        ));
    }
}
