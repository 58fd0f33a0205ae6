//! The driver's scope as Docker sees it (`NetworkDriver.GetCapabilities`).
//!
//! `local`: each Docker engine has its own networks, kept in its own state. `global`: one
//! Docker network spans every engine that shares a cluster store; Docker creates it once, on one
//! host, and then calls the driver of whichever host a container lands on (`CreateEndpoint`,
//! `Join` on that host only). ferrynet can answer `global` only when its own store is shared
//! too (etcd): the other hosts' drivers then find the network and its pools there.
//!
//! Docker accepts a global-scope legacy plugin only when the engine runs with a cluster store
//! (`dockerd --cluster-store`, Docker 20.10 and 22.06; swarm mode admits only managed plugins).
//! Without one, every `docker network create` with a global driver fails ("This node is not a
//! swarm manager"), so `auto` asks the Engine API first.

use serde_json::Value;

/// What `--docker-scope` asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum ScopeSetting {
    /// `global` on a shared store (etcd) when the engine has a cluster store, else `local`.
    #[default]
    Auto,
    /// Always `local`.
    Local,
    /// `global` (needs etcd as ferrynet's store and dockerd's cluster store).
    Global,
}

/// A scope Docker understands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    /// One engine's networks.
    Local,
    /// Networks shared by every engine on one cluster store.
    Global,
}

impl Scope {
    /// Its name in the protocol.
    pub fn as_str(self) -> &'static str {
        match self {
            Scope::Local => "local",
            Scope::Global => "global",
        }
    }
}

/// What the engine said about its cluster store.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EngineStore {
    /// `GET /info` names a cluster store.
    Cluster,
    /// `GET /info` answered without one.
    None,
    /// No answer (the engine is starting and activates plugins before it serves its API).
    Unknown,
}

/// From `GET /info`: whether the engine runs with a cluster store.
pub fn engine_store(info: &Value) -> EngineStore {
    match info.get("ClusterStore").and_then(Value::as_str) {
        Some(s) if !s.trim().is_empty() => EngineStore::Cluster,
        _ => EngineStore::None,
    }
}

/// The scope to answer. `global` is refused (answered `local`, with the reason) when ferrynet's
/// store is one host's file: the other hosts would not see the networks. Under `auto`, an
/// engine that did not answer gets `global` on a shared store: a restarting engine activates
/// plugins before its API listens, and answering `local` then would break its global networks,
/// while an engine without a cluster store never has any.
pub fn decide(
    setting: ScopeSetting,
    shared_store: bool,
    engine: EngineStore,
) -> (Scope, Option<&'static str>) {
    match (setting, shared_store, engine) {
        (ScopeSetting::Local, _, _) => (Scope::Local, None),
        (_, false, _) if setting == ScopeSetting::Global => (
            Scope::Local,
            Some("--docker-scope global needs a store other hosts share (etcd); answering local"),
        ),
        (_, false, _) => (Scope::Local, None),
        (ScopeSetting::Global, true, _) => (Scope::Global, None),
        (ScopeSetting::Auto, true, EngineStore::None) => (
            Scope::Local,
            Some("the Docker engine has no cluster store (dockerd --cluster-store): answering local scope; each engine's Docker network is its own (adopt one multi-host ferrynet network with -o ferrynet.network=NAME)"),
        ),
        (ScopeSetting::Auto, true, _) => (Scope::Global, None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn cluster_store_from_info() {
        assert_eq!(
            engine_store(&json!({"ClusterStore": "etcd://10.0.0.1:2379"})),
            EngineStore::Cluster
        );
        assert_eq!(
            engine_store(&json!({"ClusterStore": ""})),
            EngineStore::None
        );
        assert_eq!(
            engine_store(&json!({"ServerVersion": "28.2.2"})),
            EngineStore::None
        );
    }

    #[test]
    fn scope_rules() {
        use EngineStore::*;
        use ScopeSetting::*;
        // The embedded store is always local.
        for s in [Auto, Local, Global] {
            for e in [Cluster, None, Unknown] {
                assert_eq!(decide(s, false, e).0, Scope::Local, "{s:?} {e:?}");
            }
        }
        assert!(decide(Global, false, Cluster).1.is_some());
        assert!(decide(Auto, false, Cluster).1.is_none());
        // On etcd: auto follows the engine, unknown counts as a cluster store.
        assert_eq!(decide(Auto, true, Cluster), (Scope::Global, Option::None));
        assert_eq!(decide(Auto, true, Unknown).0, Scope::Global);
        assert_eq!(decide(Auto, true, None).0, Scope::Local);
        assert!(decide(Auto, true, None).1.is_some());
        // Explicit settings win.
        assert_eq!(decide(Global, true, None).0, Scope::Global);
        assert_eq!(decide(Local, true, Cluster).0, Scope::Local);
    }
}
