//! The names services give on one network: their VIPs (else their healthy producers), `tasks.`
//! and SRV records. Services are few, so this part is compiled whole, and only when a service,
//! producer, health record, live host or network changed.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::IpAddr;

use ferrynet_model::discovery::DiscoveryView;
use ferrynet_model::network::Network;
use ferrynet_model::service::{HealthRecord, Producer, Service};

use super::{label, push_unique, Task};

/// One network's service names; they win over container, alias and pod names.
#[derive(Debug, Clone, Default, PartialEq)]
pub(super) struct ServiceNames {
    /// Service name -> its VIPs, else its healthy producers' addresses.
    pub(super) names: HashMap<String, Vec<IpAddr>>,
    /// Service -> its healthy producers (`tasks.X`, `<id>.tasks.X`).
    pub(super) tasks: HashMap<String, Vec<Task>>,
    /// `_<port>._<proto>.X` -> (producer label, port).
    pub(super) srv: HashMap<String, Vec<(String, u16)>>,
    /// VIP -> service name.
    pub(super) ptr: HashMap<IpAddr, String>,
}

impl ServiceNames {
    /// Compile the service names visible on `network`.
    pub(super) fn on(view: &DiscoveryView, network: &str) -> ServiceNames {
        let mut z = ServiceNames::default();
        for svc in view.services_on(network) {
            let sname = svc.name.to_ascii_lowercase();
            let healthy = view.healthy_producers(&svc.name);
            let tasks: Vec<Task> = healthy
                .iter()
                .map(|p| Task {
                    label: label(&p.id),
                    addrs: p.addrs.clone(),
                })
                .collect();
            let addrs = if svc.vips.is_empty() {
                // No virtual IP: round robin over the producers, as Docker's dnsrr mode.
                let mut v = Vec::new();
                for t in &tasks {
                    for a in &t.addrs {
                        push_unique(&mut v, *a);
                    }
                }
                v
            } else {
                svc.vips.clone()
            };
            for v in &svc.vips {
                z.ptr.insert(*v, sname.clone());
            }
            for port in &svc.ports {
                let key = format!("_{}._{}.{sname}", label(&port.name), port.protocol.as_str());
                let targets = healthy
                    .iter()
                    .map(|p| (label(&p.id), p.target_port(port.port)))
                    .collect();
                z.srv.insert(key, targets);
            }
            z.names.insert(sname.clone(), addrs);
            z.tasks.insert(sname, tasks);
        }
        z
    }
}

/// What the service names are compiled from; equal inputs give equal names.
#[derive(Debug, Clone, Default, PartialEq)]
pub(super) struct ServiceInputs {
    networks: BTreeMap<String, Network>,
    services: BTreeMap<String, Service>,
    producers: BTreeMap<(String, String), Producer>,
    health: BTreeMap<(String, String), HealthRecord>,
    live_hosts: BTreeSet<String>,
}

impl ServiceInputs {
    /// The inputs as `view` has them.
    pub(super) fn of(view: &DiscoveryView) -> ServiceInputs {
        ServiceInputs {
            networks: view.networks.clone(),
            services: view.services.clone(),
            producers: view.producers.clone(),
            health: view.health.clone(),
            live_hosts: view.live_hosts.clone(),
        }
    }

    /// Whether `view` has these inputs (no copy made).
    pub(super) fn same_as(&self, view: &DiscoveryView) -> bool {
        self.networks == view.networks
            && self.services == view.services
            && self.producers == view.producers
            && self.health == view.health
            && self.live_hosts == view.live_hosts
    }
}
