//! The facts `ferrynet trace` decides on: the store's records (networks, endpoints, hosts,
//! blocks, services, producers and their health, policies) and this host's kernel (route
//! lookups, the source port's anti-spoofing element). The decision is `model::trace`'s.

use std::net::IpAddr;

use ferrynet_dataplane::netlink::Netlink;
use ferrynet_dataplane::route_get::RouteAnswer;
use ferrynet_model::fabric::FabricState;
use ferrynet_model::host::{BlockClaim, HostRecord};
use ferrynet_model::network::{keys, Endpoint};
use ferrynet_model::policy::verdict::EndpointIndex;
use ferrynet_model::trace::{Facts, ProducerFact, RouteLookup};

use super::policy::{book_of, policy_endpoint};
use super::{decode, decode_all, Control};
use crate::error::{ControlError, Result};

impl Control {
    /// Every store record a trace needs, read once (the kernel facts are left empty).
    pub async fn trace_facts(&self) -> Result<Facts> {
        let networks = self.networks().await?;
        let (kvs, _) = self.store.range(&keys::all_endpoints()).await?;
        let endpoints: Vec<Endpoint> = decode_all(&kvs);
        let (kvs, _) = self.store.range(&keys::hosts()).await?;
        let hosts: Vec<HostRecord> = decode_all(&kvs);
        let (kvs, _) = self.store.range(&keys::all_blocks()).await?;
        let mut blocks = Vec::new();
        for kv in &kvs {
            if let Some((net, b)) = keys::parse_block(&kv.key) {
                if let Ok(c) = decode::<BlockClaim>(kv) {
                    blocks.push((net, b, c.host));
                }
            }
        }
        let view = self.registry_view().await?;
        let producers = view
            .producers
            .values()
            .map(|p| ProducerFact {
                producer: p.clone(),
                healthy: view.is_healthy(p),
            })
            .collect();
        let book = book_of(self.policies().await?, &networks);
        let eps = EndpointIndex::new(endpoints.iter().filter_map(policy_endpoint).collect());
        Ok(Facts {
            me: self.host.clone(),
            networks,
            endpoints,
            hosts,
            blocks,
            services: view.services.values().cloned().collect(),
            producers,
            book,
            eps,
            kernel: Default::default(),
        })
    }

    /// `ip route get` for each address, in this host's namespace.
    pub async fn trace_routes(&self, addrs: &[IpAddr]) -> Result<Vec<(IpAddr, RouteLookup)>> {
        let nl = Netlink::current().map_err(ControlError::dataplane("opening netlink"))?;
        let mut out = Vec::new();
        for a in addrs {
            let r = match nl
                .route_get(*a)
                .await
                .map_err(ControlError::dataplane(format!("route get {a}")))?
            {
                RouteAnswer::Route {
                    gateway,
                    dev,
                    protocol,
                    prefsrc,
                } => RouteLookup::Route {
                    gateway,
                    dev,
                    protocol,
                    prefsrc,
                },
                RouteAnswer::Refused(e) => RouteLookup::Error(e),
            };
            out.push((*a, r));
        }
        Ok(out)
    }

    /// The FDB and neighbour entries ferrynet programmed on these VXLAN devices of this host.
    pub async fn trace_vxlan(&self, devs: &[String]) -> Result<FabricState> {
        let nl = Netlink::current().map_err(ControlError::dataplane("opening netlink"))?;
        nl.read_fabric(devs)
            .await
            .map_err(ControlError::dataplane("reading the VXLAN entries"))
    }

    /// Whether the anti-spoofing set of `port`'s table holds `port . mac . addr` (the kernel's
    /// copy of what the store allows that port to send).
    pub fn trace_guard_entry(
        &self,
        port: &str,
        mac: &str,
        addr: IpAddr,
        routed: bool,
    ) -> Result<bool> {
        let (family, table) = if routed {
            ("inet", ferrynet_model::guard::ROUTED_TABLE)
        } else {
            ("bridge", ferrynet_model::guard::TABLE)
        };
        let set = if addr.is_ipv6() {
            ferrynet_model::guard::SRC6
        } else {
            ferrynet_model::guard::SRC4
        };
        let Some(json) = self
            .nft
            .list_table(family, table)
            .map_err(ControlError::firewall("listing the anti-spoofing table"))?
        else {
            return Ok(false);
        };
        let want = [port.to_string(), mac.to_ascii_lowercase(), addr.to_string()];
        let found = json["nftables"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|o| o.get("set"))
            .filter(|s| s["name"] == set)
            .filter_map(|s| s["elem"].as_array())
            .flatten()
            .any(|e| {
                let text = e.to_string().to_ascii_lowercase();
                want.iter().all(|w| text.contains(&format!("\"{w}\"")))
            });
        Ok(found)
    }
}
