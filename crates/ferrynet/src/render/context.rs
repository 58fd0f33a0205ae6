//! What a template sees: the discovery view turned into plain records (addresses as strings,
//! producers resolved to their ports, only healthy ones under each service), sorted so the same
//! cluster state always renders the same bytes.

use std::collections::BTreeMap;
use std::net::IpAddr;

use ferrynet_model::discovery::DiscoveryView;
use ferrynet_model::service::{Producer, Service};
use serde::Serialize;

/// Everything a template can read.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RenderContext {
    /// This host's name.
    pub host: String,
    /// Services by name, each with its healthy producers.
    pub services: Vec<ServiceCtx>,
    /// Every producer of every service, healthy or not (`healthy` says which).
    pub all_producers: Vec<ProducerCtx>,
    /// Free-form values from `ferrynet kv`.
    pub kv: BTreeMap<String, String>,
    /// Networks by name.
    pub networks: Vec<NetworkCtx>,
    /// One entry per container interface on a network.
    pub endpoints: Vec<EndpointCtx>,
    /// The store revision the context reflects.
    pub revision: u64,
}

/// A service port.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PortCtx {
    /// Its name (`http`, or `p80` for a bare port).
    pub name: String,
    /// The port on the VIP.
    pub port: u16,
    /// `tcp`, `udp` or `sctp`.
    pub protocol: String,
}

/// A port published on every host.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct IngressCtx {
    /// The port open on every host.
    pub published: u16,
    /// The service port it leads to.
    pub target: u16,
    /// `tcp`, `udp` or `sctp`.
    pub protocol: String,
}

/// A service as templates see it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ServiceCtx {
    /// The service name.
    pub name: String,
    /// Its IPv4 VIP, else its IPv6 one.
    pub vip: Option<String>,
    /// Its IPv4 VIP.
    pub vip4: Option<String>,
    /// Its IPv6 VIP.
    pub vip6: Option<String>,
    /// All its VIPs.
    pub vips: Vec<String>,
    /// The first port's number (the one to use when a service has one port).
    pub port: Option<u16>,
    /// All its ports.
    pub ports: Vec<PortCtx>,
    /// Networks it is visible on (empty: all).
    pub networks: Vec<String>,
    /// Client-IP affinity.
    pub affinity: bool,
    /// Ports published on every host.
    pub ingress: Vec<IngressCtx>,
    /// The healthy producers, in id order.
    pub producers: Vec<ProducerCtx>,
}

/// A producer as templates see it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ProducerCtx {
    /// Its id within the service.
    pub id: String,
    /// The service it serves.
    pub service: String,
    /// Its IPv4 address, else its IPv6 one.
    pub addr: String,
    /// All its addresses.
    pub addrs: Vec<String>,
    /// Its port for the service's first port.
    pub port: Option<u16>,
    /// Service port name -> its port for it (`p.ports.http`).
    pub ports: BTreeMap<String, u16>,
    /// The host it runs on.
    pub host: Option<String>,
    /// The network it is on.
    pub network: Option<String>,
    /// The container it runs in.
    pub container: Option<String>,
    /// Whether it takes traffic (host live, check passing).
    pub healthy: bool,
    /// What its last health check said.
    pub health_output: Option<String>,
}

/// A network as templates see it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct NetworkCtx {
    /// The network name.
    pub name: String,
    /// Its subnets (CIDR).
    pub subnets: Vec<String>,
    /// Its gateways, where set.
    pub gateways: Vec<String>,
    /// True for a network spanning hosts.
    pub multi_host: bool,
    /// No route out.
    pub internal: bool,
}

/// A container's interface on one network.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct EndpointCtx {
    /// The container's name on the network (its id when it has none).
    pub name: String,
    /// The runtime's container id.
    pub container_id: String,
    /// The network.
    pub network: String,
    /// Its addresses without prefix length.
    pub ips: Vec<String>,
    /// Further DNS names.
    pub aliases: Vec<String>,
    /// Its host (multi-host networks).
    pub host: Option<String>,
}

/// IPv4 first, then IPv6, numerically: the order `addr` and `addrs` use.
fn sorted_addrs(addrs: &[IpAddr]) -> Vec<IpAddr> {
    let mut v = addrs.to_vec();
    v.sort_by_key(|a| (a.is_ipv6(), *a));
    v.dedup();
    v
}

fn producer_ctx(view: &DiscoveryView, svc: Option<&Service>, p: &Producer) -> ProducerCtx {
    let addrs = sorted_addrs(&p.addrs);
    let ports = svc
        .map(|s| {
            s.ports
                .iter()
                .map(|sp| (sp.name.clone(), p.target_port(sp.port)))
                .collect()
        })
        .unwrap_or_default();
    ProducerCtx {
        id: p.id.clone(),
        service: p.service.clone(),
        addr: addrs.first().map(ToString::to_string).unwrap_or_default(),
        addrs: addrs.iter().map(ToString::to_string).collect(),
        port: svc
            .and_then(|s| s.ports.first())
            .map(|sp| p.target_port(sp.port)),
        ports,
        host: p.host.clone(),
        network: p.network.clone(),
        container: p.container.clone(),
        healthy: view.is_healthy(p),
        health_output: view
            .health
            .get(&(p.service.clone(), p.id.clone()))
            .map(|h| h.output.clone()),
    }
}

fn service_ctx(view: &DiscoveryView, s: &Service) -> ServiceCtx {
    let vips = sorted_addrs(&s.vips);
    let s4 = s.vip(false).map(|a| a.to_string());
    let s6 = s.vip(true).map(|a| a.to_string());
    ServiceCtx {
        name: s.name.clone(),
        vip: s4.clone().or_else(|| s6.clone()),
        vip4: s4,
        vip6: s6,
        vips: vips.iter().map(ToString::to_string).collect(),
        port: s.ports.first().map(|p| p.port),
        ports: s
            .ports
            .iter()
            .map(|p| PortCtx {
                name: p.name.clone(),
                port: p.port,
                protocol: p.protocol.as_str().to_string(),
            })
            .collect(),
        networks: s.networks.clone(),
        affinity: s.affinity,
        ingress: s
            .ingress
            .iter()
            .map(|i| IngressCtx {
                published: i.published,
                target: i.target,
                protocol: i.protocol.as_str().to_string(),
            })
            .collect(),
        producers: view
            .healthy_producers(&s.name)
            .into_iter()
            .map(|p| producer_ctx(view, Some(s), p))
            .collect(),
    }
}

/// The template context for `view` as seen from `host`.
pub fn build(view: &DiscoveryView, host: &str) -> RenderContext {
    let mut endpoints: Vec<EndpointCtx> = view
        .endpoints
        .iter()
        .map(|e| EndpointCtx {
            name: e.name.as_deref().unwrap_or(e.container_id()).to_string(),
            container_id: e.container_id().to_string(),
            network: e.network.to_string(),
            ips: e.addrs.iter().map(|a| a.to_string()).collect(),
            aliases: e.aliases.clone(),
            host: e.host.as_deref().map(str::to_string),
        })
        .collect();
    endpoints.sort_by(|a, b| (&a.network, &a.name).cmp(&(&b.network, &b.name)));
    RenderContext {
        host: host.to_string(),
        services: view
            .services
            .values()
            .map(|s| service_ctx(view, s))
            .collect(),
        all_producers: view
            .producers
            .values()
            .map(|p| producer_ctx(view, view.services.get(&p.service), p))
            .collect(),
        kv: view.kv.clone(),
        networks: view
            .networks
            .values()
            .map(|n| NetworkCtx {
                name: n.name.clone(),
                subnets: n.subnets.iter().map(|s| s.cidr.to_string()).collect(),
                gateways: n
                    .subnets
                    .iter()
                    .filter_map(|s| s.gateway.map(|g| g.to_string()))
                    .collect(),
                multi_host: n.fabric.is_some(),
                internal: n.internal,
            })
            .collect(),
        endpoints,
        revision: view.revision,
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use ferrynet_model::network::keys as nkeys;
    use ferrynet_model::portmap::Protocol;
    use ferrynet_model::service::{
        keys as skeys, CheckKind, HealthCheck, HealthRecord, ServicePort,
    };

    fn enc<T: Serialize>(v: &T) -> Vec<u8> {
        serde_json::to_vec(v).unwrap()
    }

    /// `web` (VIP 10.96.0.10, ports http 80 and metrics 9100) with producers a (healthy, port
    /// 80 -> 8080) and b (failing its check); `db` without VIP or producers; one kv key.
    pub(crate) fn sample() -> DiscoveryView {
        let mut v = DiscoveryView::default();
        v.put(&nkeys::host("h1"), b"{}");
        let web = Service {
            name: "web".into(),
            ports: vec![
                ServicePort {
                    name: "http".into(),
                    port: 80,
                    protocol: Protocol::Tcp,
                },
                ServicePort {
                    name: "metrics".into(),
                    port: 9100,
                    protocol: Protocol::Tcp,
                },
            ],
            vips: vec!["fd00:96::a".parse().unwrap(), "10.96.0.10".parse().unwrap()],
            networks: vec![],
            ingress: vec![],
            affinity: false,
            check: Some(HealthCheck::new(CheckKind::Tcp { port: 80 })),
        };
        let db = Service {
            name: "db".into(),
            ports: vec![],
            vips: vec![],
            networks: vec!["blue".into()],
            ingress: vec![],
            affinity: true,
            check: None,
        };
        v.put(&skeys::service("web"), &enc(&web));
        v.put(&skeys::service("db"), &enc(&db));
        for (id, ip, ok) in [("a", "10.20.0.2", true), ("b", "10.20.0.3", false)] {
            let p = Producer {
                service: "web".into(),
                id: id.into(),
                host: Some("h1".into()),
                network: Some("blue".into()),
                container: Some(id.into()),
                netns: None,
                addrs: vec!["fd20::2".parse().unwrap(), ip.parse().unwrap()],
                ports: [(80, 8080)].into_iter().collect(),
                check: None,
            };
            v.put(&skeys::producer("web", id), &enc(&p));
            let h = HealthRecord {
                healthy: ok,
                host: "h1".into(),
                since_ms: 1,
                output: if ok { "ok".into() } else { "refused".into() },
            };
            v.put(&skeys::health("web", id), &enc(&h));
        }
        v.put(&skeys::kv("greeting"), b"hello");
        v.revision = 7;
        v
    }

    #[test]
    fn services_carry_only_healthy_producers_with_their_ports() {
        let c = build(&sample(), "h1");
        assert_eq!(c.host, "h1");
        let names: Vec<&str> = c.services.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(names, ["db", "web"], "sorted by name");
        let web = &c.services[1];
        assert_eq!(web.vip.as_deref(), Some("10.96.0.10"), "IPv4 first");
        assert_eq!(web.vip6.as_deref(), Some("fd00:96::a"));
        assert_eq!(web.vips, ["10.96.0.10", "fd00:96::a"]);
        assert_eq!(web.port, Some(80));
        assert_eq!(web.producers.len(), 1);
        let a = &web.producers[0];
        assert_eq!(a.id, "a");
        assert_eq!(a.addr, "10.20.0.2");
        assert_eq!(a.addrs, ["10.20.0.2", "fd20::2"]);
        assert_eq!(a.port, Some(8080), "the producer's port for port 80");
        assert_eq!(a.ports["http"], 8080);
        assert_eq!(a.ports["metrics"], 9100, "same as the service port");
        assert!(c.services[0].producers.is_empty());
        assert_eq!(c.services[0].vip, None);
    }

    #[test]
    fn all_producers_flag_health() {
        let c = build(&sample(), "h1");
        let flags: Vec<(&str, bool)> = c
            .all_producers
            .iter()
            .map(|p| (p.id.as_str(), p.healthy))
            .collect();
        assert_eq!(flags, [("a", true), ("b", false)]);
        assert_eq!(c.all_producers[1].health_output.as_deref(), Some("refused"));
        assert_eq!(c.kv["greeting"], "hello");
        assert_eq!(c.revision, 7);
    }

    #[test]
    fn same_view_same_context() {
        assert_eq!(build(&sample(), "h1"), build(&sample(), "h1"));
    }
}
