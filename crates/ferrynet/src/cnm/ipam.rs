//! `IpamDriver.*`: pools are ferrynet subnets, addresses come from the same store keys as CNI's.

use std::collections::BTreeMap;
use std::net::IpAddr;

use ferrynet_model::ipam::{overlaps, validate_network_subnets, validate_subnet};
use ferrynet_model::network::{Network, NetworkMode, Subnet};
use ipnet::IpNet;

use super::error::{CnmError, Result};
use super::options::{check_sub_pool, parse_addr, parse_pool, OPT_NETWORK};
use super::protocol::*;
use super::records::{PoolRecord, IPAM_OWNER};
use super::Plugin;
use crate::control::network::subnet_list;

/// Address space names (ferrynet has one space; Docker insists on names).
pub const LOCAL_SPACE: &str = "ferrynet-local";
/// Address space of global-scope networks.
pub const GLOBAL_SPACE: &str = "ferrynet-global";
/// Most addresses remembered between `RequestAddress` and `CreateEndpoint`.
const MAX_RESERVED_HINTS: usize = 4096;

fn with_len(ip: IpAddr, pool: &IpNet) -> String {
    format!("{ip}/{}", pool.prefix_len())
}

/// The subnet of the existing network `name` a pool adopts: `want` when given, else its first
/// of the family.
fn adopted_subnet(net: &Network, name: &str, want: Option<IpNet>, v6: bool) -> Result<IpNet> {
    let family: Vec<&Subnet> = net
        .subnets
        .iter()
        .filter(|s| s.cidr.addr().is_ipv6() == v6)
        .collect();
    let s = match want {
        Some(p) => family.iter().find(|s| s.cidr == p).ok_or_else(|| {
            CnmError::Invalid(format!(
                "ferrynet network {name} has no subnet {p} (it has {})",
                subnet_list(net)
            ))
        })?,
        None => family.first().ok_or_else(|| {
            CnmError::Invalid(format!(
                "ferrynet network {name} has no IPv{} subnet",
                if v6 { 6 } else { 4 }
            ))
        })?,
    };
    Ok(s.cidr)
}

/// A pool overlaps no pool already given out, and its sub-range lies inside it and is not
/// asked of an adopted network (`adopted`, its name).
fn check_pool(
    taken: &[PoolRecord],
    pool: IpNet,
    sub_pool: Option<IpNet>,
    adopted: Option<&str>,
) -> Result<()> {
    if let Some(t) = taken.iter().find(|t| overlaps(&t.pool, &pool)) {
        return Err(CnmError::Invalid(format!(
            "pool {pool} overlaps pool {} already given to a Docker network{}",
            t.pool,
            t.network
                .as_ref()
                .map(|n| format!(" (ferrynet network {n})"))
                .unwrap_or_default()
        )));
    }
    if let Some(sp) = sub_pool {
        check_sub_pool(sp, pool)?;
        if let Some(name) = adopted {
            return Err(CnmError::Invalid(format!(
                "--ip-range cannot change the existing ferrynet network {name}; set its range with ferrynet"
            )));
        }
    }
    Ok(())
}

impl Plugin {
    /// `IpamDriver.GetCapabilities`.
    pub fn ipam_capabilities(&self) -> IpamCapabilitiesResponse {
        IpamCapabilitiesResponse {
            requires_mac_address: false,
            requires_request_replay: false,
        }
    }

    /// `IpamDriver.GetDefaultAddressSpaces`.
    pub fn address_spaces(&self) -> AddressSpacesResponse {
        AddressSpacesResponse {
            local_default_address_space: LOCAL_SPACE.into(),
            global_default_address_space: GLOBAL_SPACE.into(),
        }
    }

    /// `IpamDriver.RequestPool`: a new pool overlapping no ferrynet network, no other pool and no
    /// host route; or, with `--ipam-opt ferrynet.network=NAME`, a subnet of that existing network.
    pub async fn request_pool(&self, req: RequestPoolRequest) -> Result<RequestPoolResponse> {
        for k in req.options.keys() {
            if k.starts_with("ferrynet.") && k != OPT_NETWORK {
                return Err(CnmError::Invalid(format!(
                    "unknown IPAM option {k}; ferrynet's IPAM understands {OPT_NETWORK}"
                )));
            }
        }
        let _g = self.lock.lock().await;
        let ctl = &self.ctl;
        let adopt = req.options.get(OPT_NETWORK).map(|s| s.trim().to_string());
        let want_pool = match req.pool.trim() {
            "" => None,
            p => Some(parse_pool("pool", p)?),
        };
        if let Some(p) = want_pool {
            if p.addr().is_ipv6() != req.v6 {
                return Err(CnmError::Invalid(format!(
                    "pool {p} is not an IPv{} pool",
                    if req.v6 { 6 } else { 4 }
                )));
            }
        }
        let sub_pool = match req.sub_pool.trim() {
            "" => None,
            s => Some(parse_pool("ip range", s)?),
        };
        let taken: Vec<PoolRecord> = ctl.docker_pools().await?;
        let (pool, adopted_net) = match &adopt {
            Some(name) => {
                let (net, _) = ctl.network(name).await?.ok_or_else(|| {
                    CnmError::NotFound(format!(
                        "ferrynet network {name} (--ipam-opt {OPT_NETWORK}) does not exist; to name a new network use -o {OPT_NETWORK}={name}"
                    ))
                })?;
                let cidr = adopted_subnet(&net, name, want_pool, req.v6)?;
                (cidr, Some(net.clone()))
            }
            None => {
                let space = ctl.subnet_space().await?;
                let pool = match want_pool {
                    Some(p) => {
                        if let Some(c) = space.conflict(&p) {
                            return Err(CnmError::Invalid(format!("pool {p} overlaps {c}")));
                        }
                        p
                    }
                    None => {
                        let pools: Vec<IpNet> = taken.iter().map(|t| t.pool).collect();
                        space.pick(req.v6, &pools).ok_or_else(|| {
                            CnmError::Invalid("no free subnet left to pick; pass --subnet".into())
                        })?
                    }
                };
                (pool, None)
            }
        };
        check_pool(
            &taken,
            pool,
            sub_pool,
            adopt.as_deref().filter(|_| adopted_net.is_some()),
        )?;
        // Check the subnet is usable at all (size, host bits) before giving it out.
        validate_subnet(&Subnet::new(pool)).map_err(|e| CnmError::Invalid(e.to_string()))?;
        let id = pool.to_string();
        let rec = PoolRecord {
            pool,
            sub_pool,
            gateway: None,
            aux: Vec::new(),
            network: adopted_net.as_ref().map(|n| n.name.clone()),
            adopted: adopted_net.is_some(),
        };
        if !ctl.claim_docker_pool(&id, &rec).await? {
            return Err(CnmError::Invalid(format!(
                "pool {pool} is already given to a Docker network"
            )));
        }
        let mut data = BTreeMap::new();
        if let Some(net) = &adopted_net {
            // Tell Docker the network's gateway so it does not ask for another one.
            let subnets = validate_network_subnets(&net.subnets)
                .map_err(|e| CnmError::Invalid(e.to_string()))?;
            if let Some(s) = subnets.iter().find(|s| s.cidr == pool) {
                data.insert(GATEWAY_TYPE.to_string(), with_len(s.gateway, &pool));
            }
        }
        tracing::info!(pool = %id, adopted = ?rec.network, "pool given to Docker");
        Ok(RequestPoolResponse {
            pool_id: id,
            pool: pool.to_string(),
            data,
        })
    }

    /// `IpamDriver.ReleasePool`: forget the pool (the network itself goes with `DeleteNetwork`).
    pub async fn release_pool(&self, req: ReleasePoolRequest) -> Result<Empty> {
        if req.pool_id.trim().is_empty() {
            return Err(CnmError::Invalid("ReleasePool needs a PoolID".into()));
        }
        let _g = self.lock.lock().await;
        self.ctl.release_docker_pool(&req.pool_id).await?;
        tracing::info!(pool = %req.pool_id, "pool released");
        Ok(Empty {})
    }

    /// The network a pool serves, if it exists now.
    async fn pool_network(&self, rec: &PoolRecord) -> Result<Option<Network>> {
        match &rec.network {
            Some(n) => Ok(self.ctl.network(n).await?.map(|(net, _)| net)),
            None => Ok(None),
        }
    }

    /// `IpamDriver.RequestAddress`: the gateway, an `--aux-address`, a container's `--ip`, or the
    /// next free address, from the same allocation keys the CNI plugin uses.
    pub async fn request_address(
        &self,
        req: RequestAddressRequest,
    ) -> Result<RequestAddressResponse> {
        let _g = self.lock.lock().await;
        let ctl = &self.ctl;
        let (mut rec, rev) = ctl
            .docker_pool(&req.pool_id)
            .await?
            .ok_or_else(|| CnmError::NotFound(format!("unknown pool {:?}", req.pool_id)))?;
        let pool = rec.pool;
        let wanted = match req.address.trim() {
            "" => None,
            a => Some(parse_addr("address", a)?),
        };
        if let Some(ip) = wanted {
            if !pool.contains(&ip) {
                return Err(CnmError::Invalid(format!(
                    "address {ip} is not in the pool {pool}"
                )));
            }
        }
        let is_gateway =
            req.options.get(REQUEST_ADDRESS_TYPE).map(String::as_str) == Some(GATEWAY_TYPE);
        let net = self.pool_network(&rec).await?;
        if is_gateway {
            if let Some(net) = &net {
                let subnets = validate_network_subnets(&net.subnets)
                    .map_err(|e| CnmError::Invalid(e.to_string()))?;
                let s = subnets.iter().find(|s| s.cidr == pool).ok_or_else(|| {
                    CnmError::Invalid(format!(
                        "ferrynet network {} has no subnet {pool}",
                        net.name
                    ))
                })?;
                if let Some(ip) = wanted.filter(|ip| *ip != s.gateway) {
                    return Err(CnmError::Invalid(format!(
                        "ferrynet network {} has the gateway {}, not {ip}",
                        net.name, s.gateway
                    )));
                }
                return Ok(RequestAddressResponse {
                    address: with_len(s.gateway, &pool),
                    data: BTreeMap::new(),
                });
            }
            let mut probe = Subnet::new(pool);
            probe.gateway = wanted;
            let resolved = validate_subnet(&probe).map_err(|e| CnmError::Invalid(e.to_string()))?;
            rec.gateway = Some(resolved.gateway);
            self.put_pool(&req.pool_id, &rec, rev).await?;
            return Ok(RequestAddressResponse {
                address: with_len(resolved.gateway, &pool),
                data: BTreeMap::new(),
            });
        }
        match (&net, wanted) {
            (Some(net), _) => {
                // Not synced here: CreateEndpoint follows at once, and the port it starts syncs
                // before Join answers (see `deferring_durability`).
                let ip = ferrynet_store::deferring_durability(ctl.reserve_address(
                    net,
                    pool,
                    wanted,
                    IPAM_OWNER,
                ))
                .await?;
                self.note_reserved(&net.name, ip.addr());
                // A routed network's container holds a host prefix (as Calico's IPAM answers):
                // everything, its neighbours included, goes through its link-local gateway.
                let address = match net.mode {
                    NetworkMode::Routed => with_len(ip.addr(), &IpNet::from(ip.addr())),
                    _ => ip.to_string(),
                };
                Ok(RequestAddressResponse {
                    address,
                    data: BTreeMap::new(),
                })
            }
            (None, Some(ip)) => {
                // An --aux-address before the network exists: excluded when it is created.
                if rec.gateway == Some(ip) || rec.aux.contains(&ip) {
                    return Err(CnmError::Invalid(format!("address {ip} is already reserved in {pool}")));
                }
                rec.aux.push(ip);
                self.put_pool(&req.pool_id, &rec, rev).await?;
                Ok(RequestAddressResponse {
                    address: with_len(ip, &pool),
                    data: BTreeMap::new(),
                })
            }
            (None, None) => Err(CnmError::Invalid(format!(
                "pool {pool} belongs to no ferrynet network yet: ferrynet's IPAM serves networks of the ferrynet driver (docker network create -d <ferrynet> --ipam-driver <ferrynet>)"
            ))),
        }
    }

    /// `IpamDriver.ReleaseAddress`: give back a gateway, an aux address or a container address.
    /// Releasing what is not held succeeds.
    pub async fn release_address(&self, req: ReleaseAddressRequest) -> Result<Empty> {
        let ip = parse_addr("address", &req.address)?;
        let _g = self.lock.lock().await;
        let Some((mut rec, rev)) = self.ctl.docker_pool(&req.pool_id).await? else {
            return Ok(Empty {});
        };
        if rec.gateway == Some(ip) || rec.aux.contains(&ip) {
            if rec.gateway == Some(ip) {
                rec.gateway = None;
            }
            rec.aux.retain(|a| *a != ip);
            self.put_pool(&req.pool_id, &rec, rev).await?;
            // An aux address of a live network is also held in the store: fall through.
        }
        if let Some(net) = &rec.network {
            self.take_reserved(net, ip);
            self.ctl.release_address(net, ip, IPAM_OWNER).await?;
        }
        Ok(Empty {})
    }

    /// Remember an address `RequestAddress` reserved, for the `CreateEndpoint` that follows.
    fn note_reserved(&self, network: &str, ip: IpAddr) {
        if let Ok(mut r) = self.reserved.lock() {
            // Addresses Docker never used for an endpoint would otherwise pile up.
            if r.len() >= MAX_RESERVED_HINTS {
                r.clear();
            }
            r.insert((network.to_string(), ip));
        }
    }

    /// Whether `RequestAddress` reserved this address (forgetting it).
    pub(crate) fn take_reserved(&self, network: &str, ip: IpAddr) -> bool {
        self.reserved
            .lock()
            .map(|mut r| r.remove(&(network.to_string(), ip)))
            .unwrap_or(false)
    }

    /// Write a pool record if it did not change since `rev`.
    pub(crate) async fn put_pool(&self, id: &str, rec: &PoolRecord, rev: u64) -> Result<()> {
        if !self.ctl.update_docker_pool(id, rec, rev).await? {
            return Err(CnmError::Invalid(format!(
                "pool {id} changed or was released meanwhile; try again"
            )));
        }
        Ok(())
    }
}
