//! The host's own routes that new subnets must not overlap, read from the main table over
//! netlink in the caller's namespace (both families).

use std::collections::BTreeMap;

use ferrynet_model::subnets::{counts, HostRoute};

use crate::error::DataplaneError;
use crate::netlink::Netlink;

/// The main table's routes that count against new subnets (see [`counts`]).
pub async fn host_routes() -> Result<Vec<HostRoute>, DataplaneError> {
    let nl = Netlink::current()?;
    let names: BTreeMap<u32, String> = nl
        .links()
        .await?
        .into_iter()
        .map(|l| (l.index, l.name))
        .collect();
    let mut out = Vec::new();
    for (r, linkdown) in nl.main_routes_linkdown().await? {
        let Some(dev) = r.oif.and_then(|i| names.get(&i)).cloned() else {
            continue;
        };
        if counts(&r.dst, &dev, linkdown) {
            out.push(HostRoute {
                dst: r.dst,
                dev,
                linkdown,
            });
        }
    }
    Ok(out)
}
