//! One network's names from its endpoints, kept per endpoint: adding, changing or removing an
//! endpoint costs that endpoint's own names and addresses, never a walk of the network.
//!
//! The maps are persistent (`imbl`), so handing a copy of the zone to the DNS server after each
//! change costs nothing, and each value keeps every holder of a name or address so that the
//! answer is the one a full compile gives, whatever order the holders came and went in.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::sync::Arc;

use ferrynet_model::policy::PolicyEndpoint;

/// Holders of one container name or alias: endpoint id -> its addresses.
type NameHolders = BTreeMap<Arc<str>, Vec<IpAddr>>;
/// Endpoints of one pod: (store create revision, endpoint id) -> addresses; the last holds it.
type PodHolders = BTreeMap<(u64, Arc<str>), Vec<IpAddr>>;

/// The names one network's endpoints give, with the rules of precedence a full compile has.
#[derive(Debug, Clone, Default)]
pub(super) struct EndpointNames {
    /// Container name or alias (lower case) -> who holds it.
    holders: imbl::HashMap<String, Arc<NameHolders>>,
    /// What each name answers: its holders' addresses in endpoint-id order, each once.
    names: imbl::HashMap<String, Arc<[IpAddr]>>,
    /// Address -> (endpoint id -> primary name): the highest id's name is the reverse.
    ptr: imbl::HashMap<IpAddr, Arc<BTreeMap<Arc<str>, String>>>,
    /// Pod name (`POD.NAMESPACE`) -> its endpoints; the newest answers for the pod.
    pods: imbl::HashMap<String, Arc<PodHolders>>,
    /// Address -> the pods whose newest endpoint has it: the last pod name is the reverse.
    pod_ptr: imbl::HashMap<IpAddr, Arc<BTreeSet<String>>>,
}

impl EndpointNames {
    /// Replace endpoint `old` with `new` (either may be absent: an addition, a removal).
    pub(super) fn apply(&mut self, old: Option<&PolicyEndpoint>, new: Option<&PolicyEndpoint>) {
        if let Some(e) = old {
            self.remove(e);
        }
        if let Some(e) = new {
            self.add(e);
        }
    }

    /// The addresses `name` answers with: a pod's (pods win over containers of that spelling),
    /// else the containers' and aliases'.
    pub(super) fn name(&self, name: &str) -> Option<&[IpAddr]> {
        match self.pods.get(name).and_then(|p| p.last_key_value()) {
            Some((_, addrs)) => Some(addrs),
            None => self.names.get(name).map(|a| &**a),
        }
    }

    /// Whether `name` is a pod's `POD.NAMESPACE`.
    pub(super) fn is_pod(&self, name: &str) -> bool {
        self.pods.contains_key(name)
    }

    /// The name `ip` reverses to: a pod's, else a container's.
    pub(super) fn ptr(&self, ip: &IpAddr) -> Option<&str> {
        if let Some(pod) = self.pod_ptr.get(ip).and_then(|s| s.last()) {
            return Some(pod);
        }
        self.ptr
            .get(ip)
            .and_then(|m| m.last_key_value())
            .map(|(_, n)| n.as_str())
    }

    /// Every name answered (containers, aliases, pods), for tests and listings.
    #[cfg(test)]
    pub(super) fn all_names(&self) -> BTreeSet<String> {
        self.names.keys().chain(self.pods.keys()).cloned().collect()
    }

    /// Every address with a reverse name, for tests.
    #[cfg(test)]
    pub(super) fn all_ptrs(&self) -> BTreeSet<IpAddr> {
        self.ptr
            .keys()
            .chain(self.pod_ptr.keys())
            .copied()
            .collect()
    }

    /// Every pod name, for tests.
    #[cfg(test)]
    pub(super) fn all_pods(&self) -> BTreeSet<String> {
        self.pods.keys().cloned().collect()
    }

    fn add(&mut self, e: &PolicyEndpoint) {
        for n in names_of(e) {
            let holders = self.holders.entry(n.clone()).or_default();
            Arc::make_mut(holders).insert(e.id.clone(), e.addrs.clone());
            self.rematerialize(&n);
        }
        if let Some(primary) = primary(e) {
            for a in &e.addrs {
                let m = self.ptr.entry(*a).or_default();
                Arc::make_mut(m).insert(e.id.clone(), primary.clone());
            }
        }
        if let Some(pod) = &e.pod {
            let name = pod.dns_name();
            self.change_pod(&name, |p| {
                p.insert((e.created, e.id.clone()), e.addrs.clone());
            });
        }
    }

    fn remove(&mut self, e: &PolicyEndpoint) {
        for n in names_of(e) {
            if let Some(holders) = self.holders.get_mut(&n) {
                Arc::make_mut(holders).remove(&e.id);
                if holders.is_empty() {
                    self.holders.remove(&n);
                }
            }
            self.rematerialize(&n);
        }
        if primary(e).is_some() {
            for a in &e.addrs {
                if let Some(m) = self.ptr.get_mut(a) {
                    Arc::make_mut(m).remove(&e.id);
                    if m.is_empty() {
                        self.ptr.remove(a);
                    }
                }
            }
        }
        if let Some(pod) = &e.pod {
            let name = pod.dns_name();
            self.change_pod(&name, |p| {
                p.remove(&(e.created, e.id.clone()));
            });
        }
    }

    /// Recompute what `name` answers from its holders (a handful: one name, few holders).
    fn rematerialize(&mut self, name: &str) {
        let Some(holders) = self.holders.get(name) else {
            self.names.remove(name);
            return;
        };
        let mut addrs: Vec<IpAddr> = Vec::new();
        for a in holders.values().flatten() {
            if !addrs.contains(a) {
                addrs.push(*a);
            }
        }
        self.names.insert(name.to_string(), addrs.into());
    }

    /// Change pod `name`'s endpoints with `f`, moving its reverse entries if the endpoint that
    /// holds the pod's name changed.
    fn change_pod(&mut self, name: &str, f: impl FnOnce(&mut PodHolders)) {
        let before = self.pod_addrs(name);
        let entry = self.pods.entry(name.to_string()).or_default();
        f(Arc::make_mut(entry));
        if entry.is_empty() {
            self.pods.remove(name);
        }
        let after = self.pod_addrs(name);
        if before == after {
            return;
        }
        for a in &before {
            if let Some(s) = self.pod_ptr.get_mut(a) {
                Arc::make_mut(s).remove(name);
                if s.is_empty() {
                    self.pod_ptr.remove(a);
                }
            }
        }
        for a in &after {
            Arc::make_mut(self.pod_ptr.entry(*a).or_default()).insert(name.to_string());
        }
    }

    /// The addresses of the endpoint that holds pod `name` now (none if no endpoint does).
    fn pod_addrs(&self, name: &str) -> Vec<IpAddr> {
        self.pods
            .get(name)
            .and_then(|p| p.last_key_value())
            .map(|(_, a)| a.clone())
            .unwrap_or_default()
    }
}

/// An endpoint's primary name, lower case.
fn primary(e: &PolicyEndpoint) -> Option<String> {
    e.name.as_deref().map(str::to_ascii_lowercase)
}

/// The names an endpoint answers to on its network: its primary name and aliases, lower case.
fn names_of(e: &PolicyEndpoint) -> BTreeSet<String> {
    primary(e)
        .into_iter()
        .chain(e.aliases.iter().map(|a| a.to_ascii_lowercase()))
        .collect()
}
