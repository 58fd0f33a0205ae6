//! Routes learned over BGP: main-table routes with [`RTPROT_FERRYNET_BGP`], read back and
//! changed by diff like the fabric's, and never a route of another protocol.

use std::collections::{BTreeMap, BTreeSet};

use ferrynet_model::fabric::FabricRoute;
use futures::StreamExt;
use ipnet::IpNet;

use crate::error::Result;
use crate::fabric::{gone, route_message_of, RTPROT_FERRYNET_BGP};
use crate::netlink::Netlink;

/// Route requests in flight at once.
const IN_FLIGHT: usize = 64;

impl Netlink {
    /// The routes the BGP speaker installed (output index mapped to the device name).
    pub async fn read_bgp_routes(&self) -> Result<BTreeSet<FabricRoute>> {
        let mut out = BTreeSet::new();
        let mut names: BTreeMap<u32, Option<String>> = BTreeMap::new();
        for r in self.main_routes().await? {
            let (Some(gateway), Some(oif), RTPROT_FERRYNET_BGP) = (r.gateway, r.oif, r.protocol)
            else {
                continue;
            };
            if let std::collections::btree_map::Entry::Vacant(e) = names.entry(oif) {
                e.insert(self.link_by_index(oif).await?.map(|l| l.name));
            }
            let Some(Some(dev)) = names.get(&oif) else {
                continue;
            };
            out.insert(FabricRoute {
                dst: r.dst,
                gateway,
                dev: dev.clone(),
                onlink: r.onlink,
                src: r.prefsrc,
            });
        }
        Ok(out)
    }

    /// Delete `del`, then add (replace) `add`; a destination held by a route of another
    /// protocol is left alone and reported. Per-route failures come back as lines.
    pub async fn apply_bgp_routes(
        &self,
        del: &[FabricRoute],
        add: &[FabricRoute],
    ) -> Result<Vec<String>> {
        let mut failures = Vec::new();
        let mut index: BTreeMap<String, Option<u32>> = BTreeMap::new();
        for r in del.iter().chain(add) {
            if let std::collections::btree_map::Entry::Vacant(e) = index.entry(r.dev.clone()) {
                e.insert(self.link_index(&r.dev).await?);
            }
        }
        // Requests are pipelined (up to IN_FLIGHT at once): a full table is 10,000 routes, and
        // one round trip each would be the whole cost.
        let mut dels = Vec::new();
        for r in del {
            let Some(Some(oif)) = index.get(&r.dev) else {
                continue;
            };
            if let Ok(msg) = route_message_of(r, *oif, RTPROT_FERRYNET_BGP) {
                dels.push(async move { (r, self.handle.route().del(msg).execute().await) });
            }
        }
        let mut done = futures::stream::iter(dels).buffer_unordered(IN_FLIGHT);
        while let Some((r, res)) = done.next().await {
            match res {
                Err(e) if !gone(&e) => failures.push(format!("deleting {r}: {e}")),
                _ => {}
            }
        }
        if add.is_empty() {
            return Ok(failures);
        }
        let mut foreign: BTreeMap<IpNet, u8> = BTreeMap::new();
        for r in self.main_routes().await? {
            if r.protocol != RTPROT_FERRYNET_BGP {
                foreign.entry(r.dst).or_insert(r.protocol);
            }
        }
        let mut adds = Vec::new();
        for r in add {
            if let Some(p) = foreign.get(&r.dst.trunc()) {
                failures.push(format!(
                    "adding {r}: a route to {} with protocol {p} is in the main table; left alone",
                    r.dst
                ));
                continue;
            }
            let Some(Some(oif)) = index.get(&r.dev) else {
                failures.push(format!("adding {r}: device {} does not exist", r.dev));
                continue;
            };
            match route_message_of(r, *oif, RTPROT_FERRYNET_BGP) {
                Ok(msg) => {
                    adds.push(
                        async move { (r, self.handle.route().add(msg).replace().execute().await) },
                    )
                }
                Err(e) => failures.push(format!("adding {r}: {e}")),
            }
        }
        let mut done = futures::stream::iter(adds).buffer_unordered(IN_FLIGHT);
        while let Some((r, res)) = done.next().await {
            if let Err(e) = res {
                failures.push(format!("adding {r}: {e}"));
            }
        }
        Ok(failures)
    }
}
