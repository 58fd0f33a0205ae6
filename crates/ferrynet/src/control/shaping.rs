//! Bandwidth limits of an endpoint: the model's token buckets carried out by
//! `ferrynet_dataplane::tc` on the host end of its veth and on its IFB device.

use ferrynet_dataplane::kernel::Links;
use ferrynet_model::names::ifb_name;
use ferrynet_model::network::{Endpoint, Network};

use crate::error::{ControlError, Result};

/// The MTU of a veth whose network sets none (the kernel's default).
pub const DEFAULT_MTU: u32 = 1500;

/// Apply `ep`'s bandwidth limits to its host end `host_index` (idempotent; nothing to do
/// without limits). Refused limits are a configuration error.
pub async fn shape(host: &dyn Links, net: &Network, ep: &Endpoint, host_index: u32) -> Result<()> {
    let Some(bw) = ep.bandwidth.filter(|b| !b.is_unlimited()) else {
        return Ok(());
    };
    let mtu = net.mtu.unwrap_or(DEFAULT_MTU);
    let shaping = bw
        .shaping(mtu)
        .map_err(|e| ControlError::InvalidConfig(e.to_string()))?;
    let ifb = ifb_name(&ep.network, &ep.container_id, &ep.ifname);
    host.apply_shaping(host_index, &ifb, mtu, &shaping)
        .await
        .map_err(ControlError::dataplane(format!(
            "limiting the bandwidth of {} on {}",
            ep.container_id, net.name
        )))
}

/// Remove the endpoint's IFB device, if any (its veth's qdiscs go with the veth).
pub async fn unshape(
    host: &dyn Links,
    network: &str,
    container_id: &str,
    ifname: &str,
) -> Result<()> {
    let ifb = ifb_name(network, container_id, ifname);
    host.remove_ifb(&ifb)
        .await
        .map_err(ControlError::dataplane(format!(
            "removing IFB device {ifb}"
        )))?;
    Ok(())
}

/// What is missing of `ep`'s bandwidth limits on host end `host_index` (empty: in place, or no
/// limits); for CNI CHECK.
pub async fn problems(
    host: &dyn Links,
    net: &Network,
    ep: &Endpoint,
    host_index: u32,
) -> Result<Vec<String>> {
    let Some(bw) = ep.bandwidth.filter(|b| !b.is_unlimited()) else {
        return Ok(Vec::new());
    };
    let shaping = bw
        .shaping(net.mtu.unwrap_or(DEFAULT_MTU))
        .map_err(|e| ControlError::InvalidConfig(e.to_string()))?;
    let ifb = ifb_name(&ep.network, &ep.container_id, &ep.ifname);
    host.shaping_problems(host_index, &ifb, &shaping)
        .await
        .map_err(ControlError::dataplane(format!(
            "reading the bandwidth limits of {}",
            ep.container_id
        )))
}
