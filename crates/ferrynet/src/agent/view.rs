//! The agent's in-memory view of the cluster, fed by a snapshot and then by watch events.
//! Pure: no I/O, so the rules (who is a peer, which blocks are whose, when a host is gone) are
//! unit-tested here.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use ferrynet_model::blocks::host_view;
use ferrynet_model::fabric::{vtep_mac, Peer};
use ferrynet_model::host::{BlockClaim, HostRecord};
use ferrynet_model::network::{keys, Network};
use ferrynet_model::validate::{check_block_on, Validate};
use ferrynet_store::{EventKind, KeyValue, WatchEvent};
use ipnet::IpNet;
use serde::de::DeserializeOwned;

/// What the agent knows about the cluster.
#[derive(Debug, Default, Clone)]
pub struct ClusterView {
    /// Networks by name (only multi-host ones matter to the fabric).
    pub networks: BTreeMap<String, Network>,
    /// Live hosts (their registration exists).
    pub hosts: BTreeMap<String, HostRecord>,
    /// Hosts whose registration vanished, with their last record and when it vanished; they
    /// keep their routes until the grace period ends, so an agent restart drops nothing.
    pub departed: BTreeMap<String, (HostRecord, Instant)>,
    /// Block claims per network: block -> owning host.
    pub blocks: BTreeMap<String, BTreeMap<IpNet, String>>,
    /// Records refused (undecodable or invalid), by key, with the reason; they count as absent.
    pub rejected: BTreeMap<String, String>,
}

/// Decode and check one record; a bad one goes into `rejected` (and the log) with its key.
fn record<T: DeserializeOwned + Validate>(
    rejected: &mut BTreeMap<String, String>,
    kv: &KeyValue,
) -> Option<T> {
    let checked = serde_json::from_slice::<T>(&kv.value)
        .map_err(|e| format!("undecodable: {e}"))
        .and_then(|r| {
            r.validate_at(&kv.key)
                .map(|()| r)
                .map_err(|e| e.to_string())
        });
    match checked {
        Ok(r) => {
            rejected.remove(&kv.key);
            Some(r)
        }
        Err(why) => {
            if rejected.get(&kv.key) != Some(&why) {
                tracing::warn!(key = %kv.key.escape_debug(), reason = %why, "rejected a store record");
            }
            rejected.insert(kv.key.clone(), why);
            None
        }
    }
}

impl ClusterView {
    /// Apply one stored key (from a snapshot or a put event).
    pub fn put(&mut self, kv: &KeyValue) {
        let Some(rest) = kv.key.strip_prefix(keys::ROOT) else {
            return;
        };
        // A refused record reads as absent: what an earlier good version set up is removed.
        if let Some(name) = rest.strip_prefix("networks/") {
            match record::<Network>(&mut self.rejected, kv) {
                Some(n) => self.networks.insert(name.to_string(), n),
                None => self.networks.remove(name),
            };
        } else if let Some(name) = rest.strip_prefix("hosts/") {
            match record::<HostRecord>(&mut self.rejected, kv) {
                Some(h) => {
                    self.departed.remove(name);
                    self.hosts.insert(name.to_string(), h);
                }
                None => {
                    if let Some(h) = self.hosts.remove(name) {
                        self.departed.insert(name.to_string(), (h, Instant::now()));
                    }
                }
            }
        } else if let Some((net, block)) = keys::parse_block(&kv.key) {
            // A claim is kept whatever its network says (it is checked again at use, and when
            // the network changes), so the view never depends on which record came first.
            match record::<BlockClaim>(&mut self.rejected, kv) {
                Some(c) => {
                    self.blocks
                        .entry(net.clone())
                        .or_default()
                        .insert(block, c.host);
                    self.check_claim(&net, &block);
                }
                None => {
                    self.blocks.get_mut(&net).and_then(|m| m.remove(&block));
                }
            }
        }
        if let Some(name) = rest.strip_prefix("networks/") {
            self.check_claims(name);
        }
    }

    /// List (or unlist) the claim of `block` on `network` as refused when it lies outside the
    /// network's pool; a claim of an unknown network is not judged.
    fn check_claim(&mut self, network: &str, block: &IpNet) {
        let key = keys::block(network, block);
        match self.networks.get(network).map(|n| check_block_on(block, n)) {
            Some(Err(e)) => {
                if self.rejected.get(&key) != Some(&e.to_string()) {
                    tracing::warn!(key = %key.escape_debug(), reason = %e, "rejected a store record");
                }
                self.rejected.insert(key, e.to_string());
            }
            _ => {
                self.rejected.remove(&key);
            }
        }
    }

    /// Judge every claim on `network` again (its record changed or went).
    fn check_claims(&mut self, network: &str) {
        let claimed: Vec<IpNet> = self
            .blocks
            .get(network)
            .map(|m| m.keys().copied().collect())
            .unwrap_or_default();
        for b in claimed {
            self.check_claim(network, &b);
        }
    }

    /// Apply a deletion seen at `now`.
    pub fn delete(&mut self, key: &str, now: Instant) {
        self.rejected.remove(key);
        let Some(rest) = key.strip_prefix(keys::ROOT) else {
            return;
        };
        if let Some(name) = rest.strip_prefix("networks/") {
            // Its claims stay until their own deletes: they read as absent without their
            // network (`block_fits`), and a network put back finds them, as a snapshot would.
            self.networks.remove(name);
            self.check_claims(name);
        } else if let Some(name) = rest.strip_prefix("hosts/") {
            if let Some(h) = self.hosts.remove(name) {
                self.departed.insert(name.to_string(), (h, now));
            }
        } else if let Some((net, block)) = keys::parse_block(key) {
            if let Some(m) = self.blocks.get_mut(&net) {
                m.remove(&block);
            }
        }
    }

    /// Apply a watch event.
    pub fn apply(&mut self, ev: &WatchEvent, now: Instant) {
        match ev.kind {
            EventKind::Put => self.put(&ev.kv),
            EventKind::Delete => self.delete(&ev.kv.key, now),
        }
    }

    /// Replace everything with a fresh snapshot; hosts that disappeared since become departed.
    pub fn reset(&mut self, kvs: &[KeyValue], now: Instant) {
        let before = std::mem::take(&mut self.hosts);
        self.networks.clear();
        self.blocks.clear();
        self.rejected.clear();
        for kv in kvs {
            self.put(kv);
        }
        for (name, rec) in before {
            if !self.hosts.contains_key(&name) && !self.departed.contains_key(&name) {
                self.departed.insert(name, (rec, now));
            }
        }
    }

    /// Multi-host networks.
    pub fn fabric_networks(&self) -> impl Iterator<Item = &Network> {
        self.networks.values().filter(|n| n.fabric.is_some())
    }

    /// Blocks of `network` owned by `host`.
    pub fn blocks_of(&self, network: &str, host: &str) -> Vec<IpNet> {
        self.blocks
            .get(network)
            .map(|m| {
                m.iter()
                    .filter(|(b, h)| *h == host && self.block_fits(network, b))
                    .map(|(b, _)| *b)
                    .collect()
            })
            .unwrap_or_default()
    }

    /// True when `block` lies in `network`'s pool (claims that arrived before their network
    /// are checked here, at use).
    pub fn block_fits(&self, network: &str, block: &IpNet) -> bool {
        self.networks
            .get(network)
            .is_some_and(|n| check_block_on(block, n).is_ok())
    }

    /// The record of a live or departed (still in grace) host.
    pub fn host(&self, name: &str) -> Option<&HostRecord> {
        self.hosts
            .get(name)
            .or_else(|| self.departed.get(name).map(|(h, _)| h))
    }

    /// The peers of `me` on `network`: every other live or departed host that owns blocks there.
    pub fn peers(&self, network: &str, me: &str) -> Vec<Peer> {
        let mut owners: BTreeMap<&str, Vec<IpNet>> = BTreeMap::new();
        if let Some(m) = self.blocks.get(network) {
            for (b, h) in m {
                if h != me && self.block_fits(network, b) {
                    owners.entry(h.as_str()).or_default().push(*b);
                }
            }
        }
        owners
            .into_iter()
            .filter_map(|(h, blocks)| {
                let rec = self.host(h)?;
                Some(Peer {
                    host: h.to_string(),
                    underlay: rec.underlay.clone(),
                    vtep_mac: vtep_mac(h, network),
                    blocks,
                })
            })
            .collect()
    }

    /// Owners of blocks that have no record at all (neither live nor departed): hosts that left
    /// while this agent was not watching. Their grace period starts now.
    pub fn unknown_owners(&self) -> Vec<String> {
        // Claims outside their network's pool count as absent here too, as in `peers`.
        let mut out: Vec<String> = self
            .blocks
            .iter()
            .flat_map(|(net, m)| m.iter().filter(|(b, _)| self.block_fits(net, b)))
            .map(|(_, h)| h)
            .filter(|h| self.host(h).is_none())
            .cloned()
            .collect();
        out.sort();
        out.dedup();
        out
    }

    /// Departed hosts whose grace period is over at `now`.
    pub fn expired(&self, now: Instant, grace: Duration) -> Vec<String> {
        self.departed
            .iter()
            .filter(|(_, (_, since))| now.duration_since(*since) >= grace)
            .map(|(h, _)| h.clone())
            .collect()
    }

    /// The network as host `me` sees it (its own blocks as subnets, the overlay MTU).
    pub fn host_view(&self, net: &Network, me: &str) -> Network {
        host_view(net, &self.blocks_of(&net.name, me), self.host(me))
    }
}

/// A stand-in record for a block owner this agent never saw registered (it left while the
/// agent was down): no underlay, so nothing is routed to it, but its grace period runs.
pub fn placeholder(name: &str) -> HostRecord {
    HostRecord {
        name: name.to_string(),
        underlay: Vec::new(),
        underlay_mtu: 0,
        capabilities: Vec::new(),
        version: String::new(),
        started_at: 0,
        sleeve: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferrynet_model::fabric::Backend;
    use ferrynet_model::network::FabricSpec;

    fn kv(key: String, v: Vec<u8>) -> KeyValue {
        KeyValue {
            key,
            value: v,
            create_revision: 1,
            mod_revision: 1,
            lease: None,
        }
    }
    fn host(name: &str, ip: &str) -> KeyValue {
        let h = HostRecord {
            name: name.into(),
            underlay: vec![ip.parse().unwrap()],
            underlay_mtu: 1500,
            capabilities: vec![],
            version: String::new(),
            started_at: 0,
            sleeve: None,
        };
        kv(keys::host(name), serde_json::to_vec(&h).unwrap())
    }
    fn block(net: &str, b: &str, h: &str) -> KeyValue {
        kv(
            keys::block(net, &b.parse().unwrap()),
            serde_json::to_vec(&BlockClaim { host: h.into() }).unwrap(),
        )
    }
    fn net(backend: Backend) -> KeyValue {
        let n = Network {
            bridge: "fn-blue".into(),
            fabric: Some(FabricSpec {
                backend,
                vni: 7,
                block_v4: 26,
                block_v6: 122,
                encrypt: false,
            }),
            ..Network::bridged("blue", ["10.20.0.0/16".parse().unwrap()])
        };
        kv(keys::network("blue"), serde_json::to_vec(&n).unwrap())
    }

    fn sample() -> ClusterView {
        let mut v = ClusterView::default();
        let now = Instant::now();
        v.reset(
            &[
                net(Backend::Vxlan),
                host("h1", "192.168.1.1/24"),
                host("h2", "192.168.1.2/24"),
                block("blue", "10.20.0.0/26", "h1"),
                block("blue", "10.20.0.64/26", "h2"),
                block("blue", "10.20.0.128/26", "h2"),
            ],
            now,
        );
        v
    }

    #[test]
    fn peers_exclude_me_and_group_blocks() {
        let v = sample();
        let p = v.peers("blue", "h1");
        assert_eq!(p.len(), 1);
        assert_eq!(p[0].host, "h2");
        assert_eq!(p[0].blocks.len(), 2);
        assert_eq!(p[0].vtep_mac, vtep_mac("h2", "blue"));
        assert!(v.peers("blue", "h2").iter().all(|p| p.host == "h1"));
    }

    #[test]
    fn departed_host_keeps_routes_until_grace_ends() {
        let mut v = sample();
        let t0 = Instant::now();
        v.delete(&keys::host("h2"), t0);
        assert_eq!(v.peers("blue", "h1").len(), 1, "still routed during grace");
        assert!(v.expired(t0, Duration::from_secs(30)).is_empty());
        assert_eq!(
            v.expired(t0 + Duration::from_secs(31), Duration::from_secs(30)),
            vec!["h2".to_string()]
        );
        // It comes back: no longer departed.
        v.put(&host("h2", "192.168.1.2/24"));
        assert!(v.departed.is_empty());
    }

    #[test]
    fn block_owner_without_record_is_unknown() {
        let mut v = sample();
        v.put(&block("blue", "10.20.1.0/26", "h9"));
        assert_eq!(v.unknown_owners(), vec!["h9".to_string()]);
        assert!(v.peers("blue", "h1").iter().all(|p| p.host != "h9"));
    }

    #[test]
    fn host_view_uses_my_blocks_and_vxlan_mtu() {
        let v = sample();
        let n = v.networks["blue"].clone();
        let view = v.host_view(&n, "h2");
        assert_eq!(view.subnets.len(), 2);
        assert_eq!(view.mtu, Some(1450));
        assert_eq!(view.subnets[0].gateway, Some("10.20.0.65".parse().unwrap()));
    }

    #[test]
    fn network_delete_drops_blocks() {
        let mut v = sample();
        v.delete(&keys::network("blue"), Instant::now());
        assert!(v.peers("blue", "h1").is_empty());
        assert_eq!(v.fabric_networks().count(), 0);
    }

    #[test]
    fn hostile_records_are_skipped_and_listed() {
        let mut v = sample();
        let mut evil = serde_json::from_slice::<Network>(&net(Backend::Vxlan).value).unwrap();
        evil.name = "evil".into();
        evil.bridge = "fn-x\"; flush ruleset; \"".into();
        v.put(&kv(
            keys::network("evil"),
            serde_json::to_vec(&evil).unwrap(),
        ));
        // A host record whose underlay is multicast, and one under another host's key.
        let mut h3 = host("h3", "224.0.0.9/4");
        v.put(&h3);
        h3 = host("h1", "192.168.1.1/24");
        h3.key = keys::host("h4");
        v.put(&h3);
        v.put(&block("blue", "10.20.1.0/26", "h5\n"));
        // A claim outside the pool would route the world to h2.
        v.put(&block("blue", "0.0.0.0/0", "h2"));
        assert!(v.peers("blue", "h1")[0]
            .blocks
            .iter()
            .all(|b| b.prefix_len() == 26));
        assert!(!v.networks.contains_key("evil"));
        assert!(!v.hosts.contains_key("h3") && !v.hosts.contains_key("h4"));
        assert!(v.unknown_owners().is_empty(), "the bad claim is not kept");
        assert_eq!(v.rejected.len(), 5, "{:?}", v.rejected);
        // The good records are untouched.
        assert_eq!(v.peers("blue", "h1").len(), 1);
        // A good record that turns bad is dropped, not kept at its old value.
        v.put(&kv(keys::host("h2"), b"{\"name\":\"h2\"}".to_vec()));
        assert!(!v.hosts.contains_key("h2") && v.departed.contains_key("h2"));
        v.delete(&keys::network("evil"), Instant::now());
        assert_eq!(v.rejected.len(), 5);
    }
}
