//! Endpoints whose container side a runtime plumbs itself (Docker's libnetwork): addresses
//! reserved before any endpoint exists (an IPAM driver's), endpoints that take or reference
//! addresses, ports published after the endpoint exists, and a veth pair left whole in the
//! host namespace for the runtime to move.
//!
//! Everything shares the CNI path's keys (`ipam/<network>/<ip>`, `ports/…`, `endpoints/…`), so
//! a Docker container and a CNI container on one network never get the same address or port.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::sync::Mutex;

use ferrynet_dataplane::hostpair::PairSpec;
use ferrynet_model::ipam::{plan_allocation, validate_network_subnets, IpamError, ResolvedSubnet};
use ferrynet_model::network::{keys, Endpoint, Network, NetworkMode};
use ferrynet_model::portmap::PortMapping;
use ferrynet_model::reservation::{plan_reservation, AddressRequest};
use ferrynet_store::{Compare, Op};
use ipnet::IpNet;

use super::ipam::{lock, reservation_error, reservation_writes};
use super::transact::Round;
use super::{decode, encode, Control};
use crate::error::{ControlError, Result};

/// The veth pair made for a runtime that moves the container end itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostPair {
    /// The end on the bridge.
    pub host_name: String,
    /// Its MAC.
    pub host_mac: [u8; 6],
    /// The end the runtime moves.
    pub peer_name: String,
    /// Its MAC.
    pub peer_mac: [u8; 6],
}

fn ipam_error(net: &Network, e: IpamError) -> ControlError {
    ControlError::Ipam(format!("network {}: {e}", net.name))
}

fn owner_of(ep: &Endpoint) -> String {
    format!("{}/{}", ep.container_id, ep.ifname)
}

/// The addresses of an endpoint that only references `requested` (each with its subnet's prefix
/// length, IPv4 first), or None when that is not enough: an address outside every subnet, two in
/// one subnet, or a family in `allocate` (IPv4, IPv6) left without one.
fn referenced_only(
    subnets: &[ResolvedSubnet],
    requested: &[IpAddr],
    allocate: (bool, bool),
) -> Option<Vec<IpNet>> {
    if requested.is_empty() {
        return None;
    }
    let mut ips: Vec<IpNet> = Vec::new();
    for &ip in requested {
        let s = subnets.iter().find(|s| s.cidr.contains(&ip))?;
        if ips.iter().any(|o| s.cidr.contains(&o.addr())) {
            return None;
        }
        ips.push(IpNet::new(ip, s.cidr.prefix_len()).ok()?);
    }
    let have = |v4: bool| ips.iter().any(|i| i.addr().is_ipv4() == v4);
    let unserved = subnets.iter().any(|s| {
        let v4 = s.cidr.addr().is_ipv4();
        (if v4 { allocate.0 } else { allocate.1 }) && !have(v4)
    });
    if unserved {
        return None;
    }
    ips.sort_by_key(|i| !i.addr().is_ipv4());
    Some(ips)
}

/// The subnet `cidr` of `net`, with a requested address checked to lie in it.
fn subnet_for(net: &Network, cidr: IpNet, requested: Option<IpAddr>) -> Result<ResolvedSubnet> {
    let subnet = validate_network_subnets(&net.subnets)
        .map_err(|e| ControlError::InvalidConfig(e.to_string()))?
        .into_iter()
        .find(|s| s.cidr == cidr)
        .ok_or_else(|| ControlError::Ipam(format!("network {} has no subnet {cidr}", net.name)))?;
    if let Some(ip) = requested {
        if !cidr.contains(&ip) {
            return Err(ipam_error(net, IpamError::NotInPool(ip)));
        }
    }
    Ok(subnet)
}

impl Control {
    /// Reserve one address of the subnet `cidr` of `net` for `owner`, without an endpoint
    /// record: `requested`, or else the next free one. The address comes back with the subnet's
    /// prefix length. Fails when the address is taken, reserved or outside the subnet.
    ///
    /// On a multi-host network (`net` as stored, the whole pool) the address comes from this
    /// host's blocks of `cidr`, with a block's prefix length; a block is claimed when the host
    /// has none or its blocks are full, and a requested address must be in one of them.
    pub async fn reserve_address(
        &self,
        net: &Network,
        cidr: IpNet,
        requested: Option<IpAddr>,
        owner: &str,
    ) -> Result<IpNet> {
        let subnet = subnet_for(net, cidr, requested)?;
        if let (Some(ip), None) = (requested, net.fabric) {
            if let Some(got) = self.reserve_requested(net, &subnet, ip, owner).await? {
                return Ok(got);
            }
        }
        let blocks = match net.fabric {
            Some(_) => {
                let view = self.host_view(net).await?;
                Some(Mutex::new(self.with_first_blocks(view).await?))
            }
            None => None,
        };
        let blocks = &blocks;
        let subnet = &subnet;
        let what = || format!("reserve an address on network {}", net.name);
        let ip = self
            .transact(what, || {
                Box::pin(async move {
                    let candidates =
                        self.candidates(net, subnet, blocks.as_ref(), cidr, requested)?;
                    let held = self.held_addresses(&net.name).await?;
                    // The rotation hint only steers automatic picks.
                    let last = match requested {
                        Some(_) => BTreeMap::new(),
                        None => self.last_allocated(&net.name).await?,
                    };
                    let wanted: Vec<IpAddr> = requested.into_iter().collect();
                    let v6 = cidr.addr().is_ipv6();
                    let pick = requested.is_none();
                    let req = AddressRequest {
                        subnets: &candidates,
                        held: &held,
                        requested: &wanted,
                        pick: (pick && !v6, pick && v6),
                        owner,
                        shared_owner: None,
                        last: &last,
                        can_claim_block: blocks.is_some(),
                    };
                    let Some(plan) = self.plan_or_grow(&net.name, &req, blocks.as_ref()).await?
                    else {
                        return Ok(Round::Again);
                    };
                    let Some(ip) = plan.ips.first().copied() else {
                        return Err(ControlError::Ipam(format!(
                            "network {}: no address planned in {cidr}",
                            net.name
                        )));
                    };
                    let (compares, ops) = reservation_writes(&net.name, &plan, owner, None);
                    Ok(Round::commit(compares, ops, ip))
                })
            })
            .await?;
        tracing::debug!(network = %net.name, %ip, owner, "address reserved");
        Ok(ip)
    }

    /// A requested address (`--ip`, Docker's preferred address) on a single-host network
    /// needs no read first: the subnet's own rules are checked here, and the transaction's
    /// `Missing` compare is the check against every holder. None: taken (the caller's read
    /// names its holder). (On a multi-host network `reserve_address` also checks it lies in
    /// this host's blocks.)
    async fn reserve_requested(
        &self,
        net: &Network,
        subnet: &ResolvedSubnet,
        ip: IpAddr,
        owner: &str,
    ) -> Result<Option<IpNet>> {
        let planned = plan_allocation(
            std::slice::from_ref(subnet),
            &BTreeSet::new(),
            &[ip],
            &|_| None,
        )
        .map_err(|e| ipam_error(net, e))?;
        let Some(&got) = planned.first() else {
            return Ok(None);
        };
        let key = keys::ipam(&net.name, ip);
        let done = self
            .store
            .txn(
                vec![Compare::Missing(key.clone())],
                vec![Op::put(key, owner.as_bytes().to_vec())],
            )
            .await?
            .succeeded;
        if done {
            tracing::debug!(network = %net.name, ip = %got, owner, "address reserved");
        }
        Ok(done.then_some(got))
    }

    /// Where to pick from: the subnet, or this host's blocks inside it (a borrowed address
    /// where the network allows it, as `reserve`); a requested address must be in them.
    fn candidates(
        &self,
        net: &Network,
        subnet: &ResolvedSubnet,
        blocks: Option<&Mutex<ferrynet_model::blocks::HostView>>,
        cidr: IpNet,
        requested: Option<IpAddr>,
    ) -> Result<Vec<ResolvedSubnet>> {
        let Some(b) = blocks else {
            return Ok(vec![subnet.clone()]);
        };
        let asked: Vec<IpAddr> = requested.into_iter().collect();
        let view = lock(b).borrowing(&asked).net;
        let candidates: Vec<ResolvedSubnet> = validate_network_subnets(&view.subnets)
            .map_err(|e| ControlError::InvalidConfig(e.to_string()))?
            .into_iter()
            .filter(|s| cidr.contains(&s.cidr))
            .collect();
        if let Some(ip) = requested {
            if !candidates.iter().any(|s| s.cidr.contains(&ip)) {
                return Err(ControlError::Ipam(format!(
                    "network {}: address {ip} is not in a block of host {} ({}): on a multi-host network each host hands out the addresses of its own blocks",
                    net.name,
                    self.host,
                    candidates
                        .iter()
                        .map(|s| s.cidr.to_string())
                        .collect::<Vec<_>>()
                        .join(", ")
                )));
            }
        }
        Ok(candidates)
    }

    /// Release an address if `owner` holds it; true when it did.
    pub async fn release_address(&self, network: &str, ip: IpAddr, owner: &str) -> Result<bool> {
        let key = keys::ipam(network, ip);
        let res = self
            .store
            .txn(
                vec![Compare::Value(key.clone(), owner.as_bytes().to_vec())],
                vec![Op::delete(key)],
            )
            .await?;
        Ok(res.succeeded)
    }

    /// Record an endpoint with the addresses a runtime chose (`requested`) plus, for each family
    /// in `allocate` (IPv4, IPv6) that has none, the next free one. A requested address already
    /// held by `shared_owner` (the runtime's IPAM) is referenced, a free one is taken for the
    /// endpoint, one held by anyone else is refused. An existing record is returned unchanged
    /// with `false`. `expect_shared`: the caller believes `shared_owner` holds every requested
    /// address (it just reserved them), so one transaction is tried first, without reads.
    pub async fn record_endpoint(
        &self,
        net: &Network,
        template: Endpoint,
        requested: &[IpAddr],
        allocate: (bool, bool),
        shared_owner: &str,
        expect_shared: bool,
    ) -> Result<(Endpoint, bool)> {
        let (ep, created) = self
            .record_endpoint_once(
                net,
                template,
                requested,
                allocate,
                shared_owner,
                expect_shared,
            )
            .await?;
        if created {
            self.journal_endpoint(&ep);
        }
        Ok((ep, created))
    }

    async fn record_endpoint_once(
        &self,
        net: &Network,
        template: Endpoint,
        requested: &[IpAddr],
        allocate: (bool, bool),
        shared_owner: &str,
        expect_shared: bool,
    ) -> Result<(Endpoint, bool)> {
        let subnets = validate_network_subnets(&net.subnets)
            .map_err(|e| ControlError::InvalidConfig(e.to_string()))?;
        let ep_key = keys::endpoint(&net.name, &template.container_id, &template.ifname);
        let owner = owner_of(&template);
        if let Some(ips) = expect_shared
            .then(|| referenced_only(&subnets, requested, allocate))
            .flatten()
        {
            // The compares carry every check the read path below makes for this case: no record
            // yet, each address still held by `shared_owner`. If one fails (a repeated call, an
            // address released meanwhile) the read path decides, as if this was not tried.
            let mut compares = vec![Compare::Missing(ep_key.clone())];
            compares.extend(requested.iter().map(|&ip| {
                Compare::Value(keys::ipam(&net.name, ip), shared_owner.as_bytes().to_vec())
            }));
            let mut ep = template.clone();
            ep.ips = ips;
            let ops = vec![Op::put(ep_key.clone(), encode(&ep))];
            if self.store.txn(compares, ops).await?.succeeded {
                tracing::debug!(endpoint = %ep_key, ips = ?ep.ips, "endpoint recorded");
                return Ok((ep, true));
            }
        }
        let (ep_key, owner, template, subnets) = (&ep_key, &owner, &template, &subnets);
        let what = || {
            format!(
                "record endpoint {} on network {}",
                template.container_id, net.name
            )
        };
        let (ep, created) = self
            .transact(what, || {
                Box::pin(async move {
                    if let Some(kv) = self.store.get(ep_key).await? {
                        return Ok(Round::Done((decode(&kv)?, false)));
                    }
                    let held = self.held_addresses(&net.name).await?;
                    let last = self.last_allocated(&net.name).await?;
                    let plan = plan_reservation(&AddressRequest {
                        subnets,
                        held: &held,
                        requested,
                        pick: allocate,
                        owner,
                        shared_owner: Some(shared_owner),
                        last: &last,
                        can_claim_block: false,
                    })
                    .map_err(|e| reservation_error(&net.name, e))?;
                    let (mut compares, mut ops) =
                        reservation_writes(&net.name, &plan, owner, Some(shared_owner));
                    compares.push(Compare::Missing(ep_key.clone()));
                    let mut ep = template.clone();
                    ep.ips = plan.ips;
                    ops.push(Op::put(ep_key.clone(), encode(&ep)));
                    Ok(Round::commit(compares, ops, (ep, true)))
                })
            })
            .await?;
        if created {
            tracing::debug!(endpoint = %ep_key, ips = ?ep.ips, "endpoint recorded");
        }
        Ok((ep, created))
    }

    /// Record a container name, aliases and labels on the endpoint at `key` if it is still there;
    /// false if it is gone. Written only over the revision read, so a port publish or a Leave
    /// rewriting the record meanwhile is never undone.
    pub async fn set_endpoint_name(
        &self,
        key: &str,
        name: &str,
        aliases: &[String],
        labels: &std::collections::BTreeMap<String, String>,
    ) -> Result<bool> {
        let what = || format!("name endpoint {key}");
        self.transact(what, || {
            Box::pin(async move {
                let Some(kv) = self.store.get(key).await? else {
                    return Ok(Round::Done(false));
                };
                let mut ep: Endpoint = decode(&kv)?;
                if ep.name.as_deref() == Some(name) && ep.aliases == aliases && ep.labels == *labels
                {
                    return Ok(Round::Done(true));
                }
                ep.name = Some(name.to_string());
                ep.aliases = aliases.to_vec();
                ep.labels = labels.clone();
                Ok(Round::commit(
                    vec![Compare::ModRevision(key.to_string(), kv.mod_revision)],
                    vec![Op::put(key, encode(&ep))],
                    true,
                ))
            })
        })
        .await
    }

    /// Publish `mappings` for a recorded endpoint that has none yet (or exactly these): claim the
    /// host ports in the store, record them on the endpoint, then add the nftables elements. On
    /// failure nothing stays claimed.
    pub async fn claim_ports(&self, ep: &Endpoint, mappings: Vec<PortMapping>) -> Result<Endpoint> {
        let ep_key = &keys::endpoint(&ep.network, &ep.container_id, &ep.ifname);
        let mappings = &mappings;
        let what = || format!("publish ports of {}", ep.container_id);
        // The value: the endpoint, and whether this call claimed its ports.
        let (next, claimed) = self
            .transact(what, || {
                Box::pin(async move {
                    let kv = self.store.get(ep_key).await?.ok_or_else(|| {
                        ControlError::UnknownContainer(format!(
                            "endpoint {} on network {} is not recorded",
                            ep.container_id, ep.network
                        ))
                    })?;
                    let current: Endpoint = decode(&kv)?;
                    if current.port_mappings == *mappings {
                        return Ok(Round::Done((current, false)));
                    }
                    if !current.port_mappings.is_empty() {
                        return Err(ControlError::PortsPublished(format!(
                            "endpoint {} already publishes other ports; withdraw them first",
                            ep.container_id
                        )));
                    }
                    let (mut compares, mut ops) = self.port_claims(ep_key, mappings).await?;
                    compares.push(Compare::ModRevision(ep_key.clone(), kv.mod_revision));
                    let mut next = current.clone();
                    next.port_mappings = mappings.clone();
                    ops.push(Op::put(ep_key.clone(), encode(&next)));
                    Ok(Round::commit(compares, ops, (next, true)))
                })
            })
            .await?;
        if let Err(e) = self.publish_ports(&next).await {
            if claimed {
                if let Err(u) = self.forget_ports(&next).await {
                    tracing::warn!(error = %u, "cleanup: releasing claimed ports failed");
                }
            }
            return Err(e);
        }
        Ok(next)
    }

    /// Withdraw an endpoint's published ports: nftables elements first, then the store's claims;
    /// returns the endpoint as now recorded (unchanged if it is not recorded).
    pub async fn withdraw_ports(&self, ep: &Endpoint) -> Result<Endpoint> {
        let ep_key = keys::endpoint(&ep.network, &ep.container_id, &ep.ifname);
        let current: Endpoint = match self.store.get(&ep_key).await? {
            Some(kv) => decode(&kv)?,
            None => ep.clone(),
        };
        self.unpublish_ports(&current).await?;
        self.forget_ports(&current).await
    }

    /// Drop the store's claims of an endpoint's ports and clear them on its record.
    async fn forget_ports(&self, ep: &Endpoint) -> Result<Endpoint> {
        let ep_key = keys::endpoint(&ep.network, &ep.container_id, &ep.ifname);
        let mut ops = self.unclaim_ports(ep).await?;
        let mut next = ep.clone();
        next.port_mappings.clear();
        let mut compares = Vec::new();
        if self.store.get(&ep_key).await?.is_some() {
            compares.push(Compare::Exists(ep_key.clone()));
            ops.push(Op::put(ep_key, encode(&next)));
        }
        self.store.txn(compares, ops).await?;
        Ok(next)
    }

    /// Create a veth pair in the host namespace: `host_name` on the network's bridge (created if
    /// missing), up, in hairpin mode; `peer_name` with `mac` and the network's MTU, left down for
    /// the runtime to move into the container.
    pub async fn create_host_pair(
        &self,
        net: &Network,
        host_name: &str,
        peer_name: &str,
        mac: Option<[u8; 6]>,
        ips: &[IpNet],
    ) -> Result<HostPair> {
        let host = self.host_links()?;
        let device = self.ensure_bridge(host.as_ref(), net).await?;
        let routed = net.mode == NetworkMode::Routed;
        let pair = host
            .create_pair(&PairSpec {
                host_name: host_name.to_string(),
                peer_name: peer_name.to_string(),
                bridge_index: (!routed).then_some(device),
                mtu: net.mtu,
                peer_mac: mac,
                hairpin: true,
            })
            .await
            .map_err(ControlError::dataplane(format!(
                "creating veth pair {host_name}/{peer_name} on {}",
                net.bridge
            )))?;
        if routed {
            let subnets = validate_network_subnets(&net.subnets)
                .map_err(|e| ControlError::InvalidConfig(e.to_string()))?;
            if let Err(e) = self
                .plumb_routed_port(
                    host.as_ref(),
                    net,
                    &subnets,
                    host_name,
                    pair.host_index,
                    ips,
                )
                .await
            {
                let _ = host.delete_link(host_name).await;
                return Err(e);
            }
            self.sync_proxy_ndp(host.as_ref(), net).await;
        }
        Ok(HostPair {
            host_name: host_name.to_string(),
            host_mac: pair.host_mac,
            peer_name: peer_name.to_string(),
            peer_mac: pair.peer_mac,
        })
    }

    /// Delete a link of the host namespace (a veth end takes its peer with it); true if it
    /// existed.
    pub async fn delete_host_link(&self, name: &str) -> Result<bool> {
        self.host_links()?
            .delete_link(name)
            .await
            .map_err(ControlError::dataplane(format!("deleting {name}")))
    }

    /// Forget a recorded endpoint: withdraw its ports and release what it holds (addresses it
    /// took itself, ports). Addresses it only referenced stay with their owner.
    pub async fn forget_endpoint(&self, ep: &Endpoint) -> Result<()> {
        let ep = self.withdraw_ports(ep).await?;
        self.unguard_endpoint(&ep);
        self.release(&ep).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferrynet_model::network::Subnet;

    fn resolved(cidrs: &[&str]) -> Vec<ResolvedSubnet> {
        let subnets: Vec<Subnet> = cidrs
            .iter()
            .map(|c| Subnet::new(c.parse().unwrap()))
            .collect();
        validate_network_subnets(&subnets).unwrap()
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn referenced_addresses_take_their_subnets_prefix_ipv4_first() {
        let subnets = resolved(&["10.1.0.0/24", "fd00:1::/64"]);
        let got = referenced_only(&subnets, &[ip("fd00:1::5"), ip("10.1.0.7")], (true, true));
        assert_eq!(
            got,
            Some(vec![
                "10.1.0.7/24".parse().unwrap(),
                "fd00:1::5/64".parse().unwrap()
            ])
        );
    }

    #[test]
    fn not_only_references_when_a_family_needs_an_allocation() {
        let subnets = resolved(&["10.1.0.0/24", "fd00:1::/64"]);
        assert_eq!(
            referenced_only(&subnets, &[ip("10.1.0.7")], (false, true)),
            None
        );
        assert!(referenced_only(&subnets, &[ip("10.1.0.7")], (true, false)).is_some());
    }

    #[test]
    fn not_only_references_for_no_foreign_or_doubled_addresses() {
        let subnets = resolved(&["10.1.0.0/24"]);
        assert_eq!(referenced_only(&subnets, &[], (false, false)), None);
        assert_eq!(
            referenced_only(&subnets, &[ip("10.2.0.7")], (false, false)),
            None
        );
        assert_eq!(
            referenced_only(&subnets, &[ip("10.1.0.7"), ip("10.1.0.8")], (false, false)),
            None
        );
    }
}
