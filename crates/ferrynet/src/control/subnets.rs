//! The subnet space a new network is chosen in: the store's networks and this host's routes
//! (`ferrynet_model::subnets` decides; the CLI and the Docker IPAM driver ask here).

use ferrynet_model::subnets::SubnetSpace;

use super::Control;
use crate::error::Result;

impl Control {
    /// Every network's subnets and this host's routes that count against a new subnet.
    ///
    /// Routes that cannot be read leave the route check out (logged), as a store that cannot be
    /// read fails the call: the store's networks are the part ferrynet must never overlap.
    pub async fn subnet_space(&self) -> Result<SubnetSpace> {
        let networks = self
            .networks()
            .await?
            .iter()
            .flat_map(|n| n.subnets.iter().map(move |s| (n.name.clone(), s.cidr)))
            .collect();
        let routes = match ferrynet_dataplane::routes::host_routes().await {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!(error = %e, "host routes unreadable; subnets not checked against them");
                Vec::new()
            }
        };
        Ok(SubnetSpace { networks, routes })
    }
}
