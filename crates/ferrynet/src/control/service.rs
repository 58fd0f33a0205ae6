//! The service registry in the store: register and deregister services and producers, each
//! change one transaction (the service record, its VIP claims and the producer together).

use std::collections::BTreeMap;
use std::net::IpAddr;

use ferrynet_model::discovery::DiscoveryView;
use ferrynet_model::network::{keys as nkeys, Endpoint};
use ferrynet_model::registry::{plan_service, validate_producer_for, ServiceRequest};
use ferrynet_model::service::{keys, Producer, Service, VipRanges};
use ferrynet_store::{Compare, Op};

use super::transact::Round;
use super::{decode, encode, Control};
use crate::error::{ControlError, Result};

/// What a registration stored.
#[derive(Debug, Clone)]
pub struct Registration {
    /// The service record as stored.
    pub service: Service,
    /// The producer, when one was registered.
    pub producer: Option<Producer>,
}

/// Prefix of one service's health records.
fn health_of(service: &str) -> String {
    format!("{}{service}/", keys::all_health())
}

impl Control {
    /// The cluster's VIP ranges (the defaults when none are stored).
    pub async fn vip_ranges(&self) -> Result<VipRanges> {
        match self.store.get(&keys::vip_ranges()).await? {
            Some(kv) => decode(&kv),
            None => Ok(VipRanges::default()),
        }
    }

    /// Create or update a service and (optionally) one of its producers, in one transaction:
    /// new VIPs are claimed with `Compare::Missing` beside the service put, which is guarded
    /// by the revision it was planned from; a lost race plans again.
    pub async fn register_service(
        &self,
        req: &ServiceRequest,
        producer: Option<Producer>,
    ) -> Result<Registration> {
        let ranges = self.vip_ranges().await?;
        let key = &keys::service(&req.name);
        let (producer, ranges) = (&producer, &ranges);
        let what = || format!("register service {}", req.name);
        let reg = self
            .transact(what, || {
                Box::pin(async move {
                    let current = self.store.get(key).await?;
                    let rev = current.as_ref().map(|kv| kv.mod_revision).unwrap_or(0);
                    let existing: Option<Service> = current.as_ref().map(decode).transpose()?;
                    let (claims, _) = self.store.range(&keys::vips()).await?;
                    let taken: BTreeMap<IpAddr, String> = claims
                        .iter()
                        .filter_map(|kv| {
                            let ip = kv.key.strip_prefix(&keys::vips())?.parse().ok()?;
                            Some((ip, String::from_utf8_lossy(&kv.value).into_owned()))
                        })
                        .collect();
                    let plan = plan_service(existing.as_ref(), req, &taken, ranges)
                        .map_err(|e| ControlError::InvalidConfig(e.to_string()))?;
                    if let Some(p) = producer {
                        validate_producer_for(p, &plan.service)
                            .map_err(|e| ControlError::InvalidConfig(e.to_string()))?;
                    }
                    let mut compares = vec![Compare::ModRevision(key.clone(), rev)];
                    let mut ops = vec![Op::put(key.clone(), encode(&plan.service))];
                    for ip in &plan.claim {
                        compares.push(Compare::Missing(keys::vip(*ip)));
                        ops.push(Op::put(keys::vip(*ip), req.name.clone().into_bytes()));
                    }
                    for ip in &plan.release {
                        ops.push(Op::delete(keys::vip(*ip)));
                    }
                    if let Some(p) = producer {
                        ops.push(Op::put(keys::producer(&p.service, &p.id), encode(p)));
                    }
                    let reg = Registration {
                        service: plan.service,
                        producer: producer.clone(),
                    };
                    Ok(Round::commit(compares, ops, reg))
                })
            })
            .await?;
        if let Some(p) = &reg.producer {
            self.journal_producer(p);
        }
        tracing::info!(service = %req.name, vips = ?reg.service.vips, producer = ?reg.producer.as_ref().map(|p| &p.id), "service registered");
        Ok(reg)
    }

    /// Remove a service with its VIP claims, producers and health records, in one transaction.
    /// Returns the number of producers it had.
    pub async fn deregister_service(&self, name: &str) -> Result<usize> {
        let key = &keys::service(name);
        let what = || format!("deregister service {name}");
        let n = self
            .transact(what, || {
                Box::pin(async move {
                    let Some(kv) = self.store.get(key).await? else {
                        return Err(ControlError::InvalidConfig(format!(
                            "service {name} does not exist"
                        )));
                    };
                    let svc: Service = decode(&kv)?;
                    let (producers, _) = self.store.range(&keys::producers_of(name)).await?;
                    let mut ops = vec![
                        Op::delete(key.clone()),
                        Op::DeletePrefix(keys::producers_of(name)),
                        Op::DeletePrefix(health_of(name)),
                    ];
                    let mut compares = vec![Compare::ModRevision(key.clone(), kv.mod_revision)];
                    // Only claims that are ours are released (guarded by their value).
                    for ip in &svc.vips {
                        let claim = keys::vip(*ip);
                        if let Some(c) = self.store.get(&claim).await? {
                            if c.value == name.as_bytes() {
                                compares.push(Compare::Value(claim.clone(), c.value));
                                ops.push(Op::delete(claim));
                            }
                        }
                    }
                    Ok(Round::commit(compares, ops, producers.len()))
                })
            })
            .await?;
        self.forget_journaled_service(name);
        tracing::info!(service = %name, producers = n, "service deregistered");
        Ok(n)
    }

    /// Remove one producer and its health record.
    pub async fn deregister_producer(&self, service: &str, id: &str) -> Result<()> {
        let key = keys::producer(service, id);
        let r = self
            .store
            .txn(
                vec![Compare::Exists(key.clone())],
                vec![Op::delete(key), Op::delete(keys::health(service, id))],
            )
            .await?;
        if !r.succeeded {
            let what = if self.store.get(&keys::service(service)).await?.is_some() {
                format!("service {service} has no producer {id}")
            } else {
                format!("service {service} does not exist")
            };
            return Err(ControlError::InvalidConfig(what));
        }
        self.forget_journaled_producer(service, id);
        tracing::info!(%service, %id, "producer deregistered");
        Ok(())
    }

    /// Remove every producer that is the CLI container `container` on this host; returns
    /// their `(service, id)`.
    pub async fn deregister_container(&self, container: &str) -> Result<Vec<(String, String)>> {
        let (kvs, _) = self.store.range(&keys::producers()).await?;
        let mut ops = Vec::new();
        let mut gone = Vec::new();
        for kv in &kvs {
            let Ok(p) = serde_json::from_slice::<Producer>(&kv.value) else {
                continue;
            };
            if p.container.as_deref() == Some(container) && p.host.as_deref() == Some(&self.host) {
                ops.push(Op::delete(kv.key.clone()));
                ops.push(Op::delete(keys::health(&p.service, &p.id)));
                gone.push((p.service, p.id));
            }
        }
        if !ops.is_empty() {
            self.store.txn(vec![], ops).await?;
        }
        for (service, id) in &gone {
            self.forget_journaled_producer(service, id);
        }
        Ok(gone)
    }

    /// What discovery knows about services right now (hosts, services, producers, health),
    /// read once from the store.
    pub async fn registry_view(&self) -> Result<DiscoveryView> {
        let mut kvs = Vec::new();
        let mut top = 0;
        for prefix in [
            nkeys::hosts(),
            keys::services(),
            keys::producers(),
            keys::all_health(),
            keys::vip_ranges(),
        ] {
            let (mut part, rev) = self.store.range(&prefix).await?;
            kvs.append(&mut part);
            top = top.max(rev);
        }
        let mut v = DiscoveryView::default();
        v.reset(
            kvs.iter().map(|kv| (kv.key.as_str(), kv.value.as_slice())),
            top,
        );
        Ok(v)
    }

    /// The ferrynet endpoint holding `ip`, if any (found through the IPAM key of the network
    /// whose subnets contain it).
    pub async fn endpoint_by_addr(&self, ip: IpAddr) -> Result<Option<Endpoint>> {
        for net in self.networks().await? {
            if !net.subnets.iter().any(|s| s.cidr.contains(&ip)) {
                continue;
            }
            let Some(owner) = self.store.get(&nkeys::ipam(&net.name, ip)).await? else {
                continue;
            };
            let owner = String::from_utf8_lossy(&owner.value).into_owned();
            let Some((container, ifname)) = owner.rsplit_once('/') else {
                continue;
            };
            if let Some(ep) = self.endpoint(&net.name, container, ifname).await? {
                return Ok(Some(ep));
            }
        }
        Ok(None)
    }
}
