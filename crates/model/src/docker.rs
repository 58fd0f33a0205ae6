//! What the Docker plugin keeps in ferrynet's store besides networks and endpoints: the pools
//! Docker was given and which Docker network is which ferrynet network.
//!
//! Keys, under `/ferrynet/v1/docker/`:
//! - `pools/<pool-id>` → [`PoolRecord`]; the pool id is the pool's CIDR (`10.7.0.0/24`), unique
//!   because pools never overlap.
//! - `networks/<docker-network-id>` → [`DockerNetwork`].
//!
//! Addresses handed out by the IPAM driver are ordinary `ipam/<network>/<ip>` keys owned by
//! [`IPAM_OWNER`]; Docker endpoints are ordinary endpoint records with the container id set to
//! Docker's endpoint id and the interface name [`DOCKER_IFNAME`].

use std::net::IpAddr;

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

use crate::names::validate_network_name;
use crate::network::keys::ROOT;
use crate::validate::{check_container_id, check_unicast, RecordError, Validate};

/// Owner recorded on addresses the IPAM driver hands out (Docker releases them itself).
pub const IPAM_OWNER: &str = "docker-ipam";
/// Interface name in the endpoint records of Docker endpoints (Docker names the real one).
pub const DOCKER_IFNAME: &str = crate::gc::DOCKER_IFNAME;

/// Key of a pool record.
pub fn pool_key(pool_id: &str) -> String {
    format!("{ROOT}docker/pools/{pool_id}")
}
/// Prefix of every pool record.
pub fn pools_prefix() -> String {
    format!("{ROOT}docker/pools/")
}
/// Key of a Docker network's binding.
pub fn network_key(docker_id: &str) -> String {
    format!("{ROOT}docker/networks/{docker_id}")
}
/// Prefix of every binding.
pub fn networks_prefix() -> String {
    format!("{ROOT}docker/networks/")
}

/// A pool given to Docker by `IpamDriver.RequestPool`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PoolRecord {
    /// The pool.
    pub pool: IpNet,
    /// `--ip-range`: containers get addresses from here.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sub_pool: Option<IpNet>,
    /// The gateway Docker asked for, until the network exists.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gateway: Option<IpAddr>,
    /// `--aux-address`es Docker reserved before the network existed.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub aux: Vec<IpAddr>,
    /// The ferrynet network whose subnet this pool is (known once it exists).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub network: Option<String>,
    /// The network existed before Docker asked (`--ipam-opt ferrynet.network=NAME`).
    #[serde(default)]
    pub adopted: bool,
}

/// Which ferrynet network a Docker network is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DockerNetwork {
    /// Docker's network id.
    pub docker_id: String,
    /// The ferrynet network.
    pub name: String,
    /// The ferrynet network existed before and outlives the Docker network.
    #[serde(default)]
    pub adopted: bool,
    /// Docker enabled IPv6 on it.
    #[serde(default)]
    pub ipv6: bool,
}

impl Validate for PoolRecord {
    fn validate(&self) -> std::result::Result<(), RecordError> {
        for a in self.gateway.iter().chain(&self.aux) {
            check_unicast("gateway/aux", *a)?;
        }
        if let Some(n) = &self.network {
            validate_network_name(n).map_err(|e| RecordError::new("network", n, e.to_string()))?;
        }
        Ok(())
    }
}

impl Validate for DockerNetwork {
    fn validate(&self) -> std::result::Result<(), RecordError> {
        check_container_id(&self.docker_id)
            .map_err(|e| RecordError::new("dockerId", &self.docker_id, e.why))?;
        validate_network_name(&self.name)
            .map_err(|e| RecordError::new("name", &self.name, e.to_string()))
    }
    fn check_key(&self, key: &str) -> std::result::Result<(), RecordError> {
        if key == network_key(&self.docker_id) {
            Ok(())
        } else {
            Err(RecordError::new(
                "dockerId",
                key,
                "record stored under the wrong key",
            ))
        }
    }
}
