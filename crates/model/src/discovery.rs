//! What service discovery knows: networks, endpoints (container names and addresses),
//! services, producers, their health and the live hosts. Fed by a store snapshot and then by
//! watch events (pure: no I/O), read by the DNS server, the load balancer, the health checker
//! and `ferrynet render`.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::sync::Arc;

use ipnet::IpNet;
use serde::de::DeserializeOwned;

use crate::host::{BlockClaim, HostRecord};
use crate::validate::{check_host_name, check_producer_on, Validate};

use crate::network::{keys as nkeys, Endpoint, Network};
use crate::policy::document::keys as pkeys;
use crate::policy::{EndpointIndex, Interner, Policy, PolicyEndpoint};
use crate::service::{keys as skeys, HealthRecord, Producer, Service, VipRanges};

/// The store prefixes discovery follows.
pub fn prefixes() -> Vec<String> {
    vec![
        nkeys::networks(),
        nkeys::all_endpoints(),
        nkeys::hosts(),
        nkeys::all_blocks(),
        skeys::services(),
        skeys::producers(),
        skeys::all_health(),
        skeys::vip_ranges(),
        skeys::kvs(),
        pkeys::policies(),
    ]
}

/// Discovery's view of the cluster.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct DiscoveryView {
    /// Networks by name.
    pub networks: BTreeMap<String, Network>,
    /// Endpoints by id (`network/container/ifname`, their store key without the prefix), one
    /// shared record each: the policy table reads this index too.
    pub endpoints: EndpointIndex,
    /// Network policies by name.
    pub policies: BTreeMap<String, Policy>,
    /// Hosts whose registration is live.
    pub live_hosts: BTreeSet<String>,
    /// Their records, for the topology page (underlay, capabilities, version); a live host
    /// whose record does not pass its checks is live by name but absent here.
    pub host_records: imbl::OrdMap<String, Arc<HostRecord>>,
    /// Block claims of multi-host networks: (network, block) -> owning host.
    pub blocks: BTreeMap<(String, IpNet), String>,
    /// Services by name.
    pub services: BTreeMap<String, Service>,
    /// Producers by (service, id).
    pub producers: BTreeMap<(String, String), Producer>,
    /// Health records by (service, id).
    pub health: BTreeMap<(String, String), HealthRecord>,
    /// The cluster's virtual IP ranges.
    pub vip_ranges: VipRanges,
    /// Free-form values (`ferrynet render` templates read them).
    pub kv: BTreeMap<String, String>,
    /// The store revision this view reflects.
    pub revision: u64,
    /// Records refused (undecodable or invalid), by key, with the reason; they count as absent.
    pub rejected: BTreeMap<String, String>,
    /// Shares the strings and label sets endpoint records repeat.
    pub interner: Interner,
}

/// The endpoint id under an endpoint key.
fn endpoint_id(key: &str) -> Option<&str> {
    key.strip_prefix(nkeys::ROOT)?.strip_prefix("endpoints/")
}

impl DiscoveryView {
    /// Decode and check the record under `key`; a bad one is listed in `rejected` with its key
    /// (the agent logs it) and read as absent so it never reaches nft, DNS or a path.
    fn record<T: DeserializeOwned + Validate>(&mut self, key: &str, value: &[u8]) -> Option<T> {
        let checked = serde_json::from_slice::<T>(value)
            .map_err(|e| format!("undecodable: {e}"))
            .and_then(|r| r.validate_at(key).map(|()| r).map_err(|e| e.to_string()));
        match checked {
            Ok(r) => {
                self.rejected.remove(key);
                Some(r)
            }
            Err(why) => {
                self.rejected.insert(key.to_string(), why);
                None
            }
        }
    }

    /// A producer is also refused when its network is known and its addresses are not in it.
    fn producer(&mut self, key: &str, value: &[u8]) -> Option<Producer> {
        let p: Producer = self.record(key, value)?;
        let net = p.network.as_ref().and_then(|n| self.networks.get(n));
        if let Some(Err(e)) = net.map(|n| check_producer_on(&p, n)) {
            self.rejected.insert(key.to_string(), e.to_string());
            return None;
        }
        Some(p)
    }
}

impl DiscoveryView {
    /// Apply one stored key (a snapshot entry or a put event). Undecodable values are ignored,
    /// as if the key were absent.
    pub fn put(&mut self, key: &str, value: &[u8]) {
        let Some(rest) = key.strip_prefix(nkeys::ROOT) else {
            return;
        };
        if let Some(name) = rest.strip_prefix("networks/") {
            match self.record::<Network>(key, value) {
                Some(n) => self.networks.insert(name.to_string(), n),
                None => self.networks.remove(name),
            };
        } else if let Some(id) = endpoint_id(key) {
            self.put_endpoint(id, key, value, 0);
        } else if let Some(name) = rest.strip_prefix("hosts/") {
            // Discovery needs only liveness; the agent's cluster view checks the whole record.
            match check_host_name("host", name) {
                Ok(()) => {
                    self.rejected.remove(key);
                    let record = serde_json::from_slice::<HostRecord>(value)
                        .ok()
                        .filter(|h| h.validate_at(key).is_ok());
                    match record {
                        Some(h) => self.host_records.insert(name.to_string(), Arc::new(h)),
                        None => self.host_records.remove(name),
                    };
                    self.live_hosts.insert(name.to_string())
                }
                Err(e) => {
                    self.rejected.insert(key.to_string(), e.to_string());
                    self.host_records.remove(name);
                    self.live_hosts.remove(name)
                }
            };
        } else if let Some(block) = nkeys::parse_block(key) {
            match self.record::<BlockClaim>(key, value) {
                Some(c) => self.blocks.insert(block, c.host),
                None => self.blocks.remove(&block),
            };
        } else if let Some(name) = rest.strip_prefix("services/") {
            match self.record::<Service>(key, value) {
                Some(s) => self.services.insert(name.to_string(), s),
                None => self.services.remove(name),
            };
        } else if let Some(pair) = skeys::parse_pair(key, "producers") {
            match self.producer(key, value) {
                Some(p) => self.producers.insert(pair, p),
                None => self.producers.remove(&pair),
            };
        } else if let Some(pair) = skeys::parse_pair(key, "health") {
            match self.record::<HealthRecord>(key, value) {
                Some(h) => self.health.insert(pair, h),
                None => self.health.remove(&pair),
            };
        } else if key == skeys::vip_ranges() {
            self.vip_ranges = self.record(key, value).unwrap_or_default();
        } else if let Some(name) = rest.strip_prefix("kv/") {
            self.kv.insert(
                name.to_string(),
                String::from_utf8_lossy(value).into_owned(),
            );
        } else if let Some(name) = rest.strip_prefix("policies/") {
            match self.record::<Policy>(key, value) {
                Some(p) => self.policies.insert(name.to_string(), p),
                None => self.policies.remove(name),
            };
        }
    }

    /// Decode an endpoint record into its shared form; the raw record is not kept.
    fn put_endpoint(&mut self, id: &str, key: &str, value: &[u8], created: u64) {
        match self.record::<Endpoint>(key, value) {
            Some(e) => self
                .endpoints
                .upsert(PolicyEndpoint::of(e, created, &self.interner)),
            None => {
                self.endpoints.remove(id);
            }
        }
    }

    /// Apply one stored key with the revision that created it (a watch event or a snapshot
    /// entry that carries it).
    pub fn put_created(&mut self, key: &str, value: &[u8], create_revision: u64) {
        match endpoint_id(key) {
            Some(id) => self.put_endpoint(id, key, value, create_revision),
            None => self.put(key, value),
        }
    }

    /// When the endpoint record `id` was created (0: unknown, older than any known).
    pub fn created(&self, id: &str) -> u64 {
        self.endpoints.list.get(id).map_or(0, |e| e.created)
    }

    /// Apply a deletion.
    pub fn delete(&mut self, key: &str) {
        self.rejected.remove(key);
        let Some(rest) = key.strip_prefix(nkeys::ROOT) else {
            return;
        };
        if let Some(name) = rest.strip_prefix("networks/") {
            self.networks.remove(name);
        } else if let Some(id) = endpoint_id(key) {
            self.endpoints.remove(id);
        } else if let Some(name) = rest.strip_prefix("hosts/") {
            self.host_records.remove(name);
            self.live_hosts.remove(name);
        } else if let Some(block) = nkeys::parse_block(key) {
            self.blocks.remove(&block);
        } else if let Some(name) = rest.strip_prefix("services/") {
            self.services.remove(name);
        } else if let Some(pair) = skeys::parse_pair(key, "producers") {
            self.producers.remove(&pair);
        } else if let Some(pair) = skeys::parse_pair(key, "health") {
            self.health.remove(&pair);
        } else if key == skeys::vip_ranges() {
            self.vip_ranges = VipRanges::default();
        } else if let Some(name) = rest.strip_prefix("kv/") {
            self.kv.remove(name);
        } else if let Some(name) = rest.strip_prefix("policies/") {
            self.policies.remove(name);
        }
    }

    /// Replace everything with a snapshot of `(key, value)` pairs taken at `revision`.
    pub fn reset<'a>(&mut self, kvs: impl IntoIterator<Item = (&'a str, &'a [u8])>, revision: u64) {
        *self = DiscoveryView {
            interner: self.interner.clone(),
            ..DiscoveryView::default()
        };
        for (k, v) in kvs {
            self.put(k, v);
        }
        self.revision = revision;
    }

    /// True when the producer may receive traffic: its host (if it has one) is live, and its
    /// check (if any) last passed. A producer with a check but no health record yet is not
    /// healthy: it has not passed once.
    pub fn is_healthy(&self, p: &Producer) -> bool {
        if let Some(h) = &p.host {
            if !self.live_hosts.contains(h) {
                return false;
            }
        }
        let svc = self.services.get(&p.service);
        match p.effective_check(svc) {
            None => true,
            Some(_) => self
                .health
                .get(&(p.service.clone(), p.id.clone()))
                .is_some_and(|h| h.healthy),
        }
    }

    /// Every producer of `service`, in id order.
    pub fn producers_of<'a>(&'a self, service: &str) -> impl Iterator<Item = &'a Producer> + 'a {
        let service = service.to_string();
        self.producers
            .range((service.clone(), String::new())..)
            .take_while(move |((s, _), _)| *s == service)
            .map(|(_, p)| p)
    }

    /// The healthy producers of `service`, in id order.
    pub fn healthy_producers(&self, service: &str) -> Vec<&Producer> {
        self.producers_of(service)
            .filter(|p| self.is_healthy(p))
            .collect()
    }

    /// Services whose names containers on `network` resolve.
    pub fn services_on<'a>(&'a self, network: &'a str) -> impl Iterator<Item = &'a Service> {
        self.services
            .values()
            .filter(move |s| s.visible_on(network))
    }

    /// Endpoints on `network`.
    pub fn endpoints_on<'a>(
        &'a self,
        network: &'a str,
    ) -> impl Iterator<Item = &'a PolicyEndpoint> {
        self.endpoints
            .iter()
            .filter(move |e| &*e.network == network)
    }

    /// The pods on `network` by DNS name (`POD.NAMESPACE`, lower case), each the newest of its
    /// endpoints (store create revision, then id): a pod re-created under its name (a new
    /// sandbox, a new address) takes the name while the old sandbox's record still exists.
    pub fn pods_on<'a>(&'a self, network: &'a str) -> BTreeMap<String, &'a PolicyEndpoint> {
        let mut best: BTreeMap<String, (u64, &str, &PolicyEndpoint)> = BTreeMap::new();
        for e in self.endpoints_on(network) {
            let Some(pod) = &e.pod else { continue };
            let rank = (e.created, &*e.id);
            let entry = best.entry(pod.dns_name()).or_insert((rank.0, rank.1, e));
            if rank > (entry.0, entry.1) {
                *entry = (rank.0, rank.1, e);
            }
        }
        best.into_iter().map(|(k, (_, _, e))| (k, e)).collect()
    }

    /// Producers whose health this host's agent checks: those on `host` with a check.
    pub fn checked_on<'a>(&'a self, host: &'a str) -> impl Iterator<Item = &'a Producer> {
        self.producers.values().filter(move |p| {
            p.host.as_deref() == Some(host)
                && p.effective_check(self.services.get(&p.service)).is_some()
        })
    }

    /// The blocks of `network` that `host` owns.
    pub fn blocks_of(&self, network: &str, host: &str) -> Vec<IpNet> {
        self.blocks
            .iter()
            .filter(|((n, _), h)| n == network && h.as_str() == host)
            .map(|((_, b), _)| *b)
            .collect()
    }

    /// Every virtual IP in use, with its service.
    pub fn vips(&self) -> BTreeMap<IpAddr, &str> {
        self.services
            .values()
            .flat_map(|s| s.vips.iter().map(move |v| (*v, s.name.as_str())))
            .collect()
    }
}

#[cfg(test)]
mod incremental;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::portmap::Protocol;
    use crate::service::{CheckKind, HealthCheck, ServicePort};

    fn service(name: &str, check: bool) -> Service {
        Service {
            ports: vec![ServicePort {
                name: "http".into(),
                port: 80,
                protocol: Protocol::Tcp,
            }],
            vips: vec!["10.96.0.10".parse().unwrap()],
            networks: vec!["blue".into()],
            check: check.then(|| HealthCheck::new(CheckKind::Tcp { port: 80 })),
            ..Service::named(name)
        }
    }
    fn producer(svc: &str, id: &str, host: &str, ip: &str) -> Producer {
        Producer {
            service: svc.into(),
            id: id.into(),
            host: Some(host.into()),
            network: Some("blue".into()),
            container: Some(id.into()),
            netns: None,
            addrs: vec![ip.parse().unwrap()],
            ports: BTreeMap::new(),
            check: None,
        }
    }
    fn enc<T: serde::Serialize>(v: &T) -> Vec<u8> {
        serde_json::to_vec(v).unwrap()
    }

    fn sample(check: bool) -> DiscoveryView {
        let mut v = DiscoveryView::default();
        v.put(&nkeys::host("h1"), b"{}");
        v.put(&nkeys::host("h2"), b"{}");
        v.put(&skeys::service("web"), &enc(&service("web", check)));
        v.put(&skeys::service("webx"), &enc(&service("webx", false)));
        v.put(
            &skeys::producer("web", "a"),
            &enc(&producer("web", "a", "h1", "10.20.0.2")),
        );
        v.put(
            &skeys::producer("web", "b"),
            &enc(&producer("web", "b", "h2", "10.20.0.66")),
        );
        v.put(
            &skeys::producer("webx", "c"),
            &enc(&producer("webx", "c", "h2", "10.20.0.67")),
        );
        v
    }

    #[test]
    fn producers_of_does_not_leak_into_similar_names() {
        let v = sample(false);
        let ids: Vec<&str> = v.producers_of("web").map(|p| p.id.as_str()).collect();
        assert_eq!(ids, ["a", "b"]);
    }

    #[test]
    fn dead_host_takes_its_producers_out() {
        let mut v = sample(false);
        assert_eq!(v.healthy_producers("web").len(), 2);
        v.delete(&nkeys::host("h2"));
        let ids: Vec<&str> = v
            .healthy_producers("web")
            .iter()
            .map(|p| p.id.as_str())
            .collect();
        assert_eq!(ids, ["a"]);
    }

    #[test]
    fn checked_producers_need_a_passing_record() {
        let mut v = sample(true);
        assert!(v.healthy_producers("web").is_empty(), "not passed yet");
        let rec = |ok| HealthRecord {
            healthy: ok,
            host: "h1".into(),
            since_ms: 0,
            output: String::new(),
        };
        v.put(&skeys::health("web", "a"), &enc(&rec(true)));
        v.put(&skeys::health("web", "b"), &enc(&rec(false)));
        let ids: Vec<&str> = v
            .healthy_producers("web")
            .iter()
            .map(|p| p.id.as_str())
            .collect();
        assert_eq!(ids, ["a"]);
        assert_eq!(v.checked_on("h1").count(), 1);
        v.delete(&skeys::health("web", "a"));
        assert!(v.healthy_producers("web").is_empty());
    }

    #[test]
    fn visibility_and_vips() {
        let v = sample(false);
        assert_eq!(v.services_on("blue").count(), 2);
        assert_eq!(v.services_on("red").count(), 0);
        assert_eq!(
            v.vips().len(),
            1,
            "both services share one VIP in this sample"
        );
    }

    #[test]
    fn block_claims_by_host() {
        let mut v = DiscoveryView::default();
        let b1: IpNet = "10.20.0.0/26".parse().unwrap();
        let b2: IpNet = "10.20.0.64/26".parse().unwrap();
        v.put(&nkeys::block("blue", &b1), br#"{"host":"h1"}"#);
        v.put(&nkeys::block("blue", &b2), br#"{"host":"h2"}"#);
        assert_eq!(v.blocks_of("blue", "h1"), vec![b1]);
        v.delete(&nkeys::block("blue", &b1));
        assert!(v.blocks_of("blue", "h1").is_empty());
        assert_eq!(v.blocks_of("blue", "h2"), vec![b2]);
    }

    #[test]
    fn garbage_values_count_as_absent() {
        let mut v = sample(false);
        v.put(&skeys::service("web"), b"not json");
        assert!(!v.services.contains_key("web"));
        v.put(&skeys::kv("greeting"), b"hello");
        assert_eq!(v.kv["greeting"], "hello");
        v.reset([(skeys::kv("a").as_str(), &b"1"[..])], 9);
        assert_eq!(v.revision, 9);
        assert!(v.services.is_empty());
    }
}
