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
use ferrynet_model::trace::{
    parse_dst, resolve, trace, Facts, ProducerFact, Query, RouteLookup, Trace,
};

use super::policy::{book_of, policy_endpoint};
use super::{decode, decode_all, Control};
use crate::error::{ControlError, Result};

/// What to trace, as the CLI and the agent's page ask it.
#[derive(Debug, Clone)]
pub struct TraceRequest<'a> {
    /// The source: a container (`NAME` or `NETWORK/NAME`), an address, `host` or a host's name.
    pub src: &'a str,
    /// The destination, with `:PORT[/tcp|udp]` (no port: an ICMP echo).
    pub dst: &'a str,
    /// Use the IPv6 addresses of named containers and hosts.
    pub ipv6: bool,
    /// Send from this forged source instead of SRC's own.
    pub spoof: Option<IpAddr>,
}

/// How many times a trace asks this host's kernel again (each pass may need more addresses
/// looked up: after DNAT, per hop).
const KERNEL_PASSES: usize = 4;

impl Control {
    /// Trace `req`: the store's facts, this host's kernel asked what the model needs, and the
    /// model's hop-by-hop verdict; the facts and the query come back for `--live`.
    pub async fn trace(&self, req: &TraceRequest<'_>) -> Result<(Trace, Facts, Query)> {
        let mut facts = self.trace_facts().await?;
        let (dst_word, port, l4) = parse_dst(req.dst)?;
        let q = Query {
            src: resolve(&facts, req.src)?,
            dst: resolve(&facts, &dst_word)?,
            port,
            l4,
            v6: req.ipv6
                || req.spoof.is_some_and(|s| s.is_ipv6())
                || dst_word.parse::<IpAddr>().is_ok_and(|d| d.is_ipv6()),
            spoof: req.spoof,
        };
        let mut t = trace(&facts, &q)?;
        for _ in 0..KERNEL_PASSES {
            if t.lookups.is_empty() && t.guard_lookup.is_none() && t.vxlan_lookups.is_empty() {
                break;
            }
            if !t.vxlan_lookups.is_empty() {
                let state = self.trace_vxlan(&t.vxlan_lookups).await?;
                for dev in &t.vxlan_lookups {
                    facts.kernel.vxlan.insert(dev.clone(), state.clone());
                }
            }
            for (addr, r) in self.trace_routes(&t.lookups).await? {
                facts.kernel.routes.insert(addr, r);
            }
            if let Some((port, mac, addr, routed)) = &t.guard_lookup {
                facts.kernel.guard_entry = Some(self.trace_guard_entry(port, mac, *addr, *routed)?);
            }
            t = trace(&facts, &q)?;
        }
        Ok((t, facts, q))
    }

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
