//! Reservations in the store: addresses and host ports, taken in one transaction per endpoint.
//!
//! The decision (which address) is the model's pure `plan_allocation`; this module only reads
//! what is taken and commits the choice with preconditions, retrying when a concurrent ADD won
//! the race. An address is never given to two containers: the commit requires each chosen
//! address key to be missing.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use ferrynet_model::ipam::{plan_allocation, validate_network_subnets, IpamError};
use ferrynet_model::network::{keys, Endpoint, Network};
use ferrynet_model::portmap::{host_ips_overlap, PortMapping};
use ferrynet_store::{Compare, Op};
use ipnet::IpNet;

use super::{decode, decode_plain, encode, Control};
use crate::error::{ControlError, Result};

/// How often a reservation is retried after losing a race before giving up.
const MAX_ATTEMPTS: usize = 64;

/// A published host port already held by someone.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HeldPort {
    /// Protocol name (`tcp`, `udp`, `sctp`).
    pub proto: String,
    /// Host address, None for every address.
    pub host_ip: Option<IpAddr>,
    /// Host port.
    pub port: u16,
    /// The owning endpoint's key.
    pub owner: String,
}

/// Parse a `ports/<proto>/<ip|*>/<port>` key back into its parts.
pub fn parse_port_key(key: &str, owner: String) -> Option<HeldPort> {
    let rest = key.strip_prefix(&keys::host_ports())?;
    let mut parts = rest.splitn(3, '/');
    let proto = parts.next()?.to_string();
    let ip = parts.next()?;
    let port = parts.next()?.parse().ok()?;
    let host_ip = if ip == "*" {
        None
    } else {
        Some(ip.parse().ok()?)
    };
    Some(HeldPort {
        proto,
        host_ip,
        port,
        owner,
    })
}

/// The first requested mapping that clashes with a held port or with another requested one:
/// same protocol and port, and host addresses that overlap (`host_ips_overlap`: equal, or
/// either side on every address, of both families or of the other's).
pub fn port_conflict(held: &[HeldPort], wanted: &[PortMapping]) -> Option<String> {
    let clash = host_ips_overlap;
    for (i, m) in wanted.iter().enumerate() {
        let proto = m.protocol.as_str();
        if let Some(h) = held
            .iter()
            .find(|h| h.proto == proto && h.port == m.host_port && clash(h.host_ip, m.host_ip))
        {
            return Some(format!(
                "host port {}/{proto}{} is already published by {}",
                m.host_port,
                h.host_ip.map(|ip| format!(" on {ip}")).unwrap_or_default(),
                h.owner
                    .rsplit_once("endpoints/")
                    .map(|(_, o)| o)
                    .unwrap_or(&h.owner)
            ));
        }
        if wanted[..i].iter().any(|o| {
            o.protocol == m.protocol && o.host_port == m.host_port && clash(o.host_ip, m.host_ip)
        }) {
            return Some(format!(
                "host port {}/{proto} is requested twice",
                m.host_port
            ));
        }
    }
    None
}

impl Control {
    /// Reserve addresses (and host ports) for `template` on `net` and record the endpoint, in one
    /// transaction. `requested` are static addresses; empty means "pick".
    /// If the endpoint is already recorded, that record is returned unchanged (a retried ADD).
    pub async fn reserve(
        &self,
        net: &Network,
        template: Endpoint,
        requested: &[IpAddr],
    ) -> Result<(Endpoint, bool)> {
        // A multi-host network allocates inside this host's blocks, claiming blocks as needed.
        let mut template = template;
        let (pool, mut mine, mut view) = match &net.fabric {
            Some(_) => {
                let (stored, _) = self.network(&net.name).await?.ok_or_else(|| {
                    ControlError::InvalidConfig(format!("network {} does not exist", net.name))
                })?;
                let mine = self.ensure_blocks(&stored).await?;
                let view = self.view_of(&stored, &mine).await?;
                template.host = Some(self.host.clone());
                (Some(stored), mine, view)
            }
            None => (None, Vec::new(), net.clone()),
        };
        let ep_key = keys::endpoint(&net.name, &template.container_id, &template.ifname);
        for _ in 0..MAX_ATTEMPTS {
            if let Some(kv) = self.store.get(&ep_key).await? {
                return Ok((decode(&kv)?, false));
            }
            let subnets = validate_network_subnets(&view.subnets)
                .map_err(|e| ControlError::InvalidConfig(e.to_string()))?;
            let (taken, _) = self.store.range(&keys::ipam_prefix(&net.name)).await?;
            let used: BTreeSet<IpAddr> = taken
                .iter()
                .filter_map(|kv| kv.key.rsplit('/').next().and_then(|s| s.parse().ok()))
                .collect();
            let last_kv = self.store.get(&keys::ipam_last(&net.name)).await?;
            let last: BTreeMap<String, IpAddr> = match &last_kv {
                Some(kv) => decode_plain(kv).unwrap_or_default(),
                None => BTreeMap::new(),
            };
            let planned = plan_allocation(&subnets, &used, requested, &|cidr: &IpNet| {
                last.get(&cidr.to_string()).copied()
            });
            let ips = match (planned, &pool) {
                (Ok(ips), _) => ips,
                // This host's blocks of that family are full: claim another and plan again.
                (Err(IpamError::Exhausted { subnet, .. }), Some(p)) => {
                    let Some(block) = self.claim_block(p, subnet.addr().is_ipv6()).await? else {
                        return Err(ControlError::Ipam(format!(
                            "network {}: every block of the pool is claimed and host {}'s blocks are full",
                            net.name, self.host
                        )));
                    };
                    mine.push(block);
                    view = self.view_of(p, &mine).await?;
                    continue;
                }
                (Err(e), _) => {
                    return Err(ControlError::Ipam(format!("network {}: {e}", net.name)))
                }
            };

            let mut compares = vec![Compare::Missing(ep_key.clone())];
            let mut ops = Vec::new();
            let owner = format!("{}/{}", template.container_id, template.ifname);
            let mut new_last = last.clone();
            for ip in &ips {
                let k = keys::ipam(&net.name, ip.addr());
                compares.push(Compare::Missing(k.clone()));
                ops.push(Op::put(k, owner.clone().into_bytes()));
                if let Some(s) = subnets.iter().find(|s| s.cidr.contains(&ip.addr())) {
                    new_last.insert(s.cidr.to_string(), ip.addr());
                }
            }
            ops.push(Op::put(keys::ipam_last(&net.name), encode(&new_last)));

            if !template.port_mappings.is_empty() {
                let (c, o) = self
                    .port_claims(&ep_key, &template.port_mappings, None)
                    .await?;
                compares.extend(c);
                ops.extend(o);
            }

            let mut ep = template.clone();
            ep.ips = ips;
            ops.push(Op::put(ep_key.clone(), encode(&ep)));
            if self.store.txn(compares, ops).await?.succeeded {
                tracing::debug!(endpoint = %ep_key, ips = ?ep.ips, "reserved");
                return Ok((ep, true));
            }
            tracing::debug!(endpoint = %ep_key, "reservation lost a race; retrying");
        }
        Err(ControlError::Store(ferrynet_store::StoreError::Unavailable(format!(
            "could not reserve an address on network {} after {MAX_ATTEMPTS} attempts (heavy contention)",
            net.name
        ))))
    }

    /// Every host port claimed in the store.
    pub async fn held_ports(&self) -> Result<Vec<HeldPort>> {
        let (kvs, _) = self.store.range(&keys::host_ports()).await?;
        Ok(kvs
            .iter()
            .filter_map(|kv| {
                parse_port_key(&kv.key, String::from_utf8_lossy(&kv.value).into_owned())
            })
            .collect())
    }

    /// The preconditions and writes that claim `mappings` for the endpoint at `ep_key`, after
    /// checking them against the ports already held (`held` when the caller has just read
    /// them, else read here).
    pub async fn port_claims(
        &self,
        ep_key: &str,
        mappings: &[PortMapping],
        held: Option<Vec<HeldPort>>,
    ) -> Result<(Vec<Compare>, Vec<Op>)> {
        let held = match held {
            Some(h) => h,
            None => self.held_ports().await?,
        };
        if let Some(msg) = port_conflict(&held, mappings) {
            return Err(ControlError::PortInUse(msg));
        }
        // Serialize publishers: an "any address" and a "specific address" claim of one port
        // have different keys, so guard the whole port table with one sequence key.
        let seq_key = keys::host_ports_seq();
        let seq_rev = self
            .store
            .get(&seq_key)
            .await?
            .map(|kv| kv.mod_revision)
            .unwrap_or(0);
        let mut compares = vec![Compare::ModRevision(seq_key.clone(), seq_rev)];
        let mut ops = vec![Op::put(seq_key, Vec::new())];
        for m in mappings {
            let k = keys::host_port(m.protocol.as_str(), m.host_ip, m.host_port);
            compares.push(Compare::Missing(k.clone()));
            ops.push(Op::put(k, ep_key.as_bytes().to_vec()));
        }
        Ok((compares, ops))
    }

    /// Update a recorded endpoint (after the dataplane filled in MACs and names).
    pub async fn update_endpoint(&self, ep: &Endpoint) -> Result<()> {
        let key = keys::endpoint(&ep.network, &ep.container_id, &ep.ifname);
        self.store
            .txn(
                vec![Compare::Exists(key.clone())],
                vec![Op::put(key, encode(ep))],
            )
            .await?;
        Ok(())
    }

    /// Release everything an endpoint holds: its record, addresses and host ports.
    /// Only keys still owned by this endpoint are deleted, so a concurrent re-ADD is safe.
    pub async fn release(&self, ep: &Endpoint) -> Result<()> {
        let ep_key = keys::endpoint(&ep.network, &ep.container_id, &ep.ifname);
        let owner = format!("{}/{}", ep.container_id, ep.ifname);
        let mut ops = vec![Op::delete(ep_key.clone())];
        for ip in &ep.ips {
            let k = keys::ipam(&ep.network, ip.addr());
            if let Some(kv) = self.store.get(&k).await? {
                if kv.value == owner.as_bytes() {
                    ops.push(Op::delete(k));
                }
            }
        }
        for m in &ep.port_mappings {
            let k = keys::host_port(m.protocol.as_str(), m.host_ip, m.host_port);
            if let Some(kv) = self.store.get(&k).await? {
                if kv.value == ep_key.as_bytes() {
                    ops.push(Op::delete(k));
                }
            }
        }
        self.store.txn(vec![], ops).await?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferrynet_model::portmap::Protocol;

    fn pm(port: u16, ip: Option<&str>, proto: Protocol) -> PortMapping {
        PortMapping {
            host_port: port,
            container_port: 80,
            protocol: proto,
            host_ip: ip.map(|s| s.parse().unwrap()),
        }
    }

    #[test]
    fn port_key_round_trip() {
        let k = keys::host_port("udp", Some("10.0.0.1".parse().unwrap()), 53);
        let h = parse_port_key(&k, "o".into()).unwrap();
        assert_eq!(
            (h.proto.as_str(), h.host_ip, h.port),
            ("udp", Some("10.0.0.1".parse().unwrap()), 53)
        );
        let k = keys::host_port("tcp", None, 8080);
        assert_eq!(parse_port_key(&k, "o".into()).unwrap().host_ip, None);
    }

    #[test]
    fn conflicts_between_any_and_specific_addresses() {
        let held = vec![HeldPort {
            proto: "tcp".into(),
            host_ip: None,
            port: 8080,
            owner: "/x/endpoints/n/c1/eth0".into(),
        }];
        let m = port_conflict(&held, &[pm(8080, Some("10.0.0.1"), Protocol::Tcp)]).unwrap();
        assert!(m.contains("8080/tcp") && m.contains("n/c1/eth0"), "{m}");
        assert!(port_conflict(&held, &[pm(8080, None, Protocol::Udp)]).is_none());
        assert!(port_conflict(&held, &[pm(8081, None, Protocol::Tcp)]).is_none());
        let held = vec![HeldPort {
            proto: "tcp".into(),
            host_ip: Some("10.0.0.1".parse().unwrap()),
            port: 80,
            owner: "o".into(),
        }];
        assert!(port_conflict(&held, &[pm(80, Some("10.0.0.2"), Protocol::Tcp)]).is_none());
        assert!(port_conflict(&held, &[pm(80, None, Protocol::Tcp)]).is_some());
    }

    #[test]
    fn unspecified_addresses_claim_their_family_only() {
        let held = |ip: &str| {
            vec![HeldPort {
                proto: "tcp".into(),
                host_ip: Some(ip.parse().unwrap()),
                port: 80,
                owner: "o".into(),
            }]
        };
        let v4 = held("0.0.0.0");
        assert!(port_conflict(&v4, &[pm(80, Some("127.0.0.1"), Protocol::Tcp)]).is_some());
        assert!(port_conflict(&v4, &[pm(80, None, Protocol::Tcp)]).is_some());
        assert!(port_conflict(&v4, &[pm(80, Some("::"), Protocol::Tcp)]).is_none());
        assert!(port_conflict(&v4, &[pm(80, Some("fd00::1"), Protocol::Tcp)]).is_none());
        let v6 = held("::");
        assert!(port_conflict(&v6, &[pm(80, Some("fd00::1"), Protocol::Tcp)]).is_some());
        assert!(port_conflict(&v6, &[pm(80, Some("0.0.0.0"), Protocol::Tcp)]).is_none());
        // Both families' "any" in one request is no duplicate (Docker-style callers send both).
        assert!(port_conflict(
            &[],
            &[
                pm(80, Some("0.0.0.0"), Protocol::Tcp),
                pm(80, Some("::"), Protocol::Tcp)
            ]
        )
        .is_none());
    }

    #[test]
    fn duplicate_in_one_request() {
        let m = port_conflict(
            &[],
            &[
                pm(80, None, Protocol::Tcp),
                pm(80, Some("1.2.3.4"), Protocol::Tcp),
            ],
        )
        .unwrap();
        assert!(m.contains("twice"));
    }
}
