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
use ferrynet_model::portmap::PortMapping;
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

use ferrynet_model::portclaim::PortClaim;
pub use ferrynet_model::portclaim::{parse_port_key, port_conflict, HeldPort};

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
                    // A requested address outside this host's blocks is planned in its own
                    // block where the network lets containers borrow (announced as a host
                    // route); elsewhere it is refused as not in this host's blocks.
                    let seen = match blocks {
                        Some(b) => lock(b).borrowing(requested).net,
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
                        let (c, o) = self.port_claims(ep_key, &template.port_mappings).await?;
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
            self.journal_endpoint(&ep);
        }
        let view = match blocks {
            Some(b) => lock(b).clone(),
            None => view.clone(),
        };
        Ok((ep, created, view))
    }

    /// Every host port claimed in the store: the claim records, and the one-key-per-port
    /// layout of older versions.
    pub async fn held_ports(&self) -> Result<Vec<HeldPort>> {
        let (claims, _) = self.store.range(&keys::port_claims()).await?;
        let (old, _) = self.store.range(&keys::host_ports()).await?;
        let mut held: Vec<HeldPort> = claims
            .iter()
            .filter_map(|kv| PortClaim::decode(&kv.value))
            .flat_map(|c| c.held().collect::<Vec<_>>())
            .collect();
        held.extend(old.iter().filter_map(|kv| {
            parse_port_key(&kv.key, String::from_utf8_lossy(&kv.value).into_owned())
        }));
        Ok(held)
    }

    /// The preconditions and writes that claim `mappings` for the endpoint at `ep_key`, after
    /// checking them against the ports already held. One record per endpoint whatever the
    /// number of ports.
    pub async fn port_claims(
        &self,
        ep_key: &str,
        mappings: &[PortMapping],
    ) -> Result<(Vec<Compare>, Vec<Op>)> {
        // Serialize publishers: an "any address" and a "specific address" claim of one port
        // are different records, so every publisher bumps one sequence key and commits only
        // if nobody published since it read the held ports. Read the sequence first: a claim
        // committed after it is then caught by the compare.
        let seq_key = keys::host_ports_seq();
        let seq_rev = self
            .store
            .get(&seq_key)
            .await?
            .map(|kv| kv.mod_revision)
            .unwrap_or(0);
        let held: Vec<HeldPort> = self
            .held_ports()
            .await?
            .into_iter()
            .filter(|h| h.owner != ep_key)
            .collect();
        if let Some(msg) = port_conflict(&held, mappings) {
            return Err(ControlError::PortInUse(msg));
        }
        let claim_key = claim_key_of(ep_key)?;
        // A claim of this endpoint left by an interrupted attempt is replaced.
        let claim_rev = self
            .store
            .get(&claim_key)
            .await?
            .map(|kv| kv.mod_revision)
            .unwrap_or(0);
        let compares = vec![
            Compare::ModRevision(seq_key.clone(), seq_rev),
            Compare::ModRevision(claim_key.clone(), claim_rev),
        ];
        let claim = PortClaim::new(ep_key, mappings);
        let ops = vec![
            Op::put(seq_key, Vec::new()),
            Op::put(claim_key, encode(&claim)),
        ];
        Ok((compares, ops))
    }

    /// The writes that drop the port claims an endpoint holds (its record, and keys of the
    /// one-key-per-port layout that are still its own).
    pub(super) async fn unclaim_ports(&self, ep: &Endpoint) -> Result<Vec<Op>> {
        let ep_key = keys::endpoint(&ep.network, &ep.container_id, &ep.ifname);
        let mut ops = Vec::new();
        let claim_key = keys::port_claim(&ep.network, &ep.container_id, &ep.ifname);
        if let Some(kv) = self.store.get(&claim_key).await? {
            if PortClaim::decode(&kv.value).is_none_or(|c| c.endpoint == ep_key) {
                ops.push(Op::delete(claim_key));
            }
        }
        if ep.port_mappings.is_empty() {
            return Ok(ops);
        }
        // Older records: only read when the layout is still in use.
        let (old, _) = self.store.range(&keys::host_ports()).await?;
        ops.extend(
            old.into_iter()
                .filter(|kv| kv.value == ep_key.as_bytes())
                .map(|kv| Op::delete(kv.key)),
        );
        Ok(ops)
    }

    /// Update a recorded endpoint (after the dataplane filled in MACs and names), only while
    /// the record is still the reservation `ep` came from (same addresses): a concurrent DEL
    /// and re-ADD of the container may have replaced it, and overwriting the new record with
    /// the old addresses would leave the new ones held by nothing.
    pub async fn update_endpoint(&self, ep: &Endpoint) -> Result<()> {
        let key = &keys::endpoint(&ep.network, &ep.container_id, &ep.ifname);
        let what = || {
            format!(
                "record endpoint {} on network {}",
                ep.container_id, ep.network
            )
        };
        self.transact(what, || {
            Box::pin(async move {
                let superseded = || {
                    ControlError::Superseded(format!(
                        "container {} on network {}: a concurrent call removed or replaced its reservation; retry",
                        ep.container_id, ep.network
                    ))
                };
                let kv = self.store.get(key).await?.ok_or_else(superseded)?;
                let current: Endpoint = decode(&kv)?;
                if current.ips != ep.ips {
                    return Err(superseded());
                }
                Ok(Round::commit(
                    vec![Compare::ModRevision(key.clone(), kv.mod_revision)],
                    vec![Op::put(key.clone(), encode(ep))],
                    (),
                ))
            })
        })
        .await?;
        self.journal_endpoint(ep);
        Ok(())
    }

    /// Release everything an endpoint holds: its record, addresses and host ports.
    /// Only keys still owned by this endpoint are deleted, and only the record as read in the
    /// same round: when a concurrent DEL and re-ADD of the same container replaced the record
    /// in between, the round plans again and releases the new record whole (a stale read must
    /// not delete a record whose addresses it does not know, leaving them held by nothing).
    /// `ep` serves when no record is left (an ADD undone before it recorded).
    pub async fn release(&self, ep: &Endpoint) -> Result<()> {
        self.release_where(ep, false).await
    }

    /// Undo this call's own reservation: like [`Control::release`], but a record with other
    /// addresses than `ep`'s (a concurrent re-ADD's) is left alone.
    pub async fn release_own(&self, ep: &Endpoint) -> Result<()> {
        self.release_where(ep, true).await
    }

    async fn release_where(&self, ep: &Endpoint, only_own: bool) -> Result<()> {
        let ep_key = &keys::endpoint(&ep.network, &ep.container_id, &ep.ifname);
        let owner = &format!("{}/{}", ep.container_id, ep.ifname);
        let what = || format!("release {} on network {}", ep.container_id, ep.network);
        self.transact(what, || {
            Box::pin(async move {
                let (current, guard) = match self.store.get(ep_key).await? {
                    Some(kv)
                        if only_own && decode::<Endpoint>(&kv).is_ok_and(|c| c.ips != ep.ips) =>
                    {
                        return Ok(Round::Done(()));
                    }
                    Some(kv) => (
                        // A record that does not decode is still removed, with what the caller knows.
                        decode::<Endpoint>(&kv).unwrap_or_else(|_| ep.clone()),
                        Compare::ModRevision(ep_key.clone(), kv.mod_revision),
                    ),
                    None => (ep.clone(), Compare::Missing(ep_key.clone())),
                };
                let mut compares = vec![guard];
                let mut ops = vec![Op::delete(ep_key.clone())];
                for ip in &current.ips {
                    let k = keys::ipam(&current.network, ip.addr());
                    if let Some(kv) = self.store.get(&k).await? {
                        if kv.value == owner.as_bytes() {
                            compares.push(Compare::Value(k.clone(), kv.value));
                            ops.push(Op::delete(k));
                        }
                    }
                }
                ops.extend(self.unclaim_ports(&current).await?);
                Ok(Round::commit(compares, ops, ()))
            })
        })
        .await?;
        self.forget_journaled(ep);
        Ok(())
    }
}

/// The claim record's key for the endpoint at `ep_key`.
fn claim_key_of(ep_key: &str) -> Result<String> {
    ep_key
        .strip_prefix(&keys::all_endpoints())
        .map(|rest| format!("{}{rest}", keys::port_claims()))
        .ok_or_else(|| ControlError::InvalidConfig(format!("not an endpoint key: {ep_key}")))
}
