//! Reservations in the store: addresses and host ports, taken in one transaction per endpoint.
//!
//! The decision (which address) is the model's pure `plan_allocation`; this module only reads
//! what is taken and commits the choice with preconditions, retrying when a concurrent ADD won
//! the race. An address is never given to two containers: the commit requires each chosen
//! address key to be missing.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::Mutex;

use ferrynet_model::blocks::HostView;
use ferrynet_model::ipam::validate_network_subnets;
use ferrynet_model::network::{keys, Endpoint};
use ferrynet_model::portmap::{host_ips_overlap, PortMapping};
use ferrynet_model::reservation::{
    plan_reservation, AddressRequest, ReservationError, ReservationPlan,
};
use ferrynet_store::{Compare, Op};

use super::transact::Round;
use super::{decode, decode_plain, encode, Control};
use crate::error::{ControlError, Result};

/// The host view of a reservation in progress (never held across an await).
pub(super) fn lock(b: &Mutex<HostView>) -> std::sync::MutexGuard<'_, HostView> {
    // A panic while holding it cannot leave it half-updated: each update is one assignment.
    b.lock().unwrap_or_else(|e| e.into_inner())
}

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

/// The control error for a reservation the model refused.
pub(super) fn reservation_error(network: &str, e: ReservationError) -> ControlError {
    ControlError::Ipam(format!("network {network}: {e}"))
}

/// The compares and writes that commit an address plan for `owner`: each claimed address must
/// still be free, each referenced one still the shared owner's; the rotation hint follows.
pub(super) fn reservation_writes(
    network: &str,
    plan: &ReservationPlan,
    owner: &str,
    shared_owner: Option<&str>,
) -> (Vec<Compare>, Vec<Op>) {
    let mut compares = Vec::new();
    let mut ops = Vec::new();
    for ip in &plan.claim {
        let k = keys::ipam(network, *ip);
        compares.push(Compare::Missing(k.clone()));
        ops.push(Op::put(k, owner.as_bytes().to_vec()));
    }
    if let Some(shared) = shared_owner {
        compares.extend(
            plan.reference
                .iter()
                .map(|ip| Compare::Value(keys::ipam(network, *ip), shared.as_bytes().to_vec())),
        );
    }
    if let Some(last) = &plan.last {
        ops.push(Op::put(keys::ipam_last(network), encode(last)));
    }
    (compares, ops)
}

impl Control {
    /// Addresses of a network that are held, with their owners.
    pub(super) async fn held_addresses(&self, network: &str) -> Result<BTreeMap<IpAddr, String>> {
        let (kvs, _) = self.store.range(&keys::ipam_prefix(network)).await?;
        Ok(kvs
            .iter()
            .filter_map(|kv| {
                let ip = kv.key.rsplit('/').next()?.parse().ok()?;
                Some((ip, String::from_utf8_lossy(&kv.value).into_owned()))
            })
            .collect())
    }

    /// Rotation hints of a network (last address handed out per subnet).
    pub(super) async fn last_allocated(&self, network: &str) -> Result<BTreeMap<String, IpAddr>> {
        Ok(match self.store.get(&keys::ipam_last(network)).await? {
            Some(kv) => decode_plain(&kv).unwrap_or_default(),
            None => BTreeMap::new(),
        })
    }

    /// Claim one more block of a family into `view`; an error when the pool has none left.
    pub(super) async fn grow(&self, view: &Mutex<HostView>, v6: bool) -> Result<()> {
        let pool = lock(view).pool.clone();
        let Some(block) = self.claim_block(&pool, v6).await? else {
            return Err(ControlError::Ipam(format!(
                "network {}: every block of the pool is claimed and host {}'s blocks are full",
                pool.name, self.host
            )));
        };
        let grown = lock(view).with_block(block);
        *lock(view) = grown;
        Ok(())
    }

    /// Plan with `req`; when this host's blocks are full, claim one more into `blocks` and
    /// return None: the caller plans again over the grown view.
    pub(super) async fn plan_or_grow(
        &self,
        network: &str,
        req: &AddressRequest<'_>,
        blocks: Option<&Mutex<HostView>>,
    ) -> Result<Option<ReservationPlan>> {
        match plan_reservation(req) {
            Ok(p) => Ok(Some(p)),
            Err(ReservationError::NeedBlock { v6 }) => {
                if let Some(b) = blocks {
                    self.grow(b, v6).await?;
                }
                Ok(None)
            }
            Err(e) => Err(reservation_error(network, e)),
        }
    }

    /// Reserve addresses (and host ports) for `template` on the network of `view` and record the
    /// endpoint, in one transaction. `requested` are static addresses; empty means "pick".
    /// If the endpoint is already recorded, that record is returned unchanged (a retried ADD).
    /// Also returns the view after the reservation (grown when it claimed blocks).
    pub async fn reserve(
        &self,
        view: &HostView,
        template: Endpoint,
        requested: &[IpAddr],
    ) -> Result<(Endpoint, bool, HostView)> {
        let net = &view.pool;
        // A multi-host network allocates inside this host's blocks, claiming blocks as needed.
        let mut template = template;
        let blocks = if view.is_multi_host() {
            template.host = Some(self.host.clone());
            Some(Mutex::new(self.with_first_blocks(view.clone()).await?))
        } else {
            None
        };
        let (blocks, template) = (&blocks, &template);
        let ep_key = &keys::endpoint(&net.name, &template.container_id, &template.ifname);
        let owner = &format!("{}/{}", template.container_id, template.ifname);
        let pick = requested.is_empty();
        let what = || format!("reserve an address on network {}", net.name);
        let (ep, created) = self
            .transact(what, || {
                Box::pin(async move {
                    if let Some(kv) = self.store.get(ep_key).await? {
                        return Ok(Round::Done((decode(&kv)?, false)));
                    }
                    let seen = match blocks {
                        Some(b) => lock(b).net.clone(),
                        None => view.net.clone(),
                    };
                    let subnets = validate_network_subnets(&seen.subnets)
                        .map_err(|e| ControlError::InvalidConfig(e.to_string()))?;
                    let held = self.held_addresses(&net.name).await?;
                    let last = self.last_allocated(&net.name).await?;
                    let req = AddressRequest {
                        subnets: &subnets,
                        held: &held,
                        requested,
                        pick: (pick, pick),
                        owner,
                        shared_owner: None,
                        last: &last,
                        can_claim_block: blocks.is_some(),
                    };
                    let Some(plan) = self.plan_or_grow(&net.name, &req, blocks.as_ref()).await?
                    else {
                        return Ok(Round::Again);
                    };
                    let (mut compares, mut ops) = reservation_writes(&net.name, &plan, owner, None);
                    compares.push(Compare::Missing(ep_key.clone()));
                    if !template.port_mappings.is_empty() {
                        let (c, o) = self
                            .port_claims(ep_key, &template.port_mappings, None)
                            .await?;
                        compares.extend(c);
                        ops.extend(o);
                    }
                    let mut ep = template.clone();
                    ep.ips = plan.ips;
                    ops.push(Op::put(ep_key.clone(), encode(&ep)));
                    Ok(Round::commit(compares, ops, (ep, true)))
                })
            })
            .await?;
        if created {
            tracing::debug!(endpoint = %ep_key, ips = ?ep.ips, "reserved");
        }
        let view = match blocks {
            Some(b) => lock(b).clone(),
            None => view.clone(),
        };
        Ok((ep, created, view))
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
