//! The control layer: decisions from the model, state in the store, effects in the dataplane.
//!
//! Every operation here is safe to repeat and safe to interrupt: state is written to the store
//! before the kernel is touched (so a crash leaves a record that DEL or GC can clean up), and
//! every kernel change is idempotent.

pub mod bgp;
pub mod cnm_endpoint;
pub mod containers;
pub mod docker;
pub mod edge;
pub mod endpoint;
pub mod guard;
pub mod host;
pub mod ipam;
pub mod journal;
pub mod kv;
pub mod network;
pub mod policy;
pub mod service;
pub mod shaping;
pub mod stale;
pub mod subnets;
pub mod trace;
pub mod transact;

#[cfg(test)]
mod kernel_tests;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use ferrynet_dataplane::kernel::{Kernel, Links, Linux};
use ferrynet_dataplane::nft::{default_executor, NftExecutor};
use ferrynet_model::validate::Validate;
use ferrynet_store::config::StoreConfig;
use ferrynet_store::{EmbeddedStore, KeyValue, Store};
use serde::de::DeserializeOwned;

use crate::error::{ControlError, Result};
use host::{system_hostname, LocalConfig};

/// Default location of ferrynet's state on a host.
pub const DEFAULT_STATE_DIR: &str = "/var/lib/ferrynet";

/// Where ferrynet keeps its files; `FERRYNET_STATE_DIR` overrides the default.
#[derive(Debug, Clone)]
pub struct Paths {
    /// The state directory.
    pub state_dir: PathBuf,
    /// The agent's unix socket when given (`--agent-socket`); else `agent::api::socket_path`.
    pub agent_socket: Option<PathBuf>,
}

impl Paths {
    /// Paths from an explicit state directory, else `FERRYNET_STATE_DIR`, else the default.
    pub fn resolve(explicit: Option<&Path>) -> Paths {
        let state_dir = explicit
            .map(Path::to_path_buf)
            .or_else(|| std::env::var_os("FERRYNET_STATE_DIR").map(PathBuf::from))
            .unwrap_or_else(|| PathBuf::from(DEFAULT_STATE_DIR));
        Paths {
            state_dir,
            agent_socket: None,
        }
    }
    /// The agent's unix socket (status API).
    pub fn agent_socket(&self) -> PathBuf {
        self.agent_socket
            .clone()
            .unwrap_or_else(|| crate::agent::api::socket_path(&self.state_dir))
    }
    /// The embedded store file.
    pub fn store_file(&self) -> PathBuf {
        self.state_dir.join("store.redb")
    }
    /// Directory for a CLI container's files (log, resolv.conf).
    pub fn container_dir(&self, name: &str) -> PathBuf {
        self.state_dir.join("containers").join(name)
    }
}

/// The control plane of one host: a store and a firewall executor.
pub struct Control {
    /// Cluster state.
    store: Arc<dyn Store>,
    /// nftables transactions (shared so a transaction can run on a blocking thread).
    nft: Arc<dyn NftExecutor>,
    /// Links, addresses, routes and qdiscs (the real kernel, or a recording fake in tests).
    kernel: Arc<dyn Kernel>,
    /// Where files live.
    paths: Paths,
    /// This host's name in the cluster (from host.json, else the system host name).
    host: String,
    /// The store URL it was opened with (None: the embedded file).
    store_url: Option<String>,
}

impl Control {
    /// Open the store this host is configured for (an explicit URL, else `FERRYNET_STORE`, else
    /// host.json, else the embedded file in the state directory) and load the nft executor; an
    /// explicit host name likewise wins over `FERRYNET_HOST`, host.json and the system's.
    pub async fn open_with(
        paths: Paths,
        store: Option<&str>,
        host: Option<&str>,
    ) -> Result<Control> {
        // The state directory holds the store and its lock: root's only (0700).
        ferrynet_store::perms::private_dir(&paths.state_dir)?;
        let local = LocalConfig::load(&paths.state_dir)?;
        let url = store
            .map(str::to_string)
            .or_else(|| {
                std::env::var("FERRYNET_STORE")
                    .ok()
                    .filter(|s| !s.is_empty())
            })
            .or(local.store);
        let store = open_store(&paths, url.as_deref()).await?;
        let host = host
            .map(str::to_string)
            .or_else(|| {
                std::env::var("FERRYNET_HOST")
                    .ok()
                    .filter(|s| !s.is_empty())
            })
            .or(local.host)
            .unwrap_or_else(system_hostname);
        Ok(Control {
            store,
            nft: Arc::from(default_executor()),
            kernel: Arc::new(Linux),
            paths,
            host,
            store_url: url,
        })
    }

    /// Handles on the host's namespace for one operation.
    pub(crate) fn host_links(&self) -> Result<Box<dyn Links>> {
        self.kernel
            .host()
            .map_err(ControlError::dataplane("opening netlink"))
    }

    /// Handles on the host's namespace and the container's at `netns`, for one operation.
    pub(crate) fn container_links(&self, netns: &str) -> Result<Box<dyn Links>> {
        self.kernel
            .container(netns)
            .map_err(ControlError::dataplane(format!("opening netns {netns}")))
    }

    /// This host's name in the cluster.
    pub fn host(&self) -> &str {
        &self.host
    }

    /// Where ferrynet's files live.
    pub fn paths(&self) -> &Paths {
        &self.paths
    }

    /// The store URL it was opened with (None: the embedded file).
    pub fn store_url(&self) -> Option<&str> {
        self.store_url.as_deref()
    }

    /// For long-running processes (the agent, the Docker plugin): keep the store open between
    /// operations; CLI and CNI processes still get it whenever they ask.
    pub fn keep_store_open(&self) {
        if let Err(e) = self.store.keep_open() {
            // Correct either way: operations then open the store per call, as before.
            tracing::warn!(error = %e, "could not keep the store open; opening it per operation");
        }
    }

    /// Keep the store held open for at least `d` (a burst of calls is under way); see
    /// [`ferrynet_store::Store::hold_for`].
    pub fn hold_store_for(&self, d: std::time::Duration) {
        self.store.hold_for(d);
    }

    /// Make the writes this process deferred durable (see
    /// [`ferrynet_store::deferring_durability`]).
    pub async fn sync_store(&self) -> Result<()> {
        Ok(self.store.sync().await?)
    }

    /// The store, for the agent's and `render`'s watchers (the feed's consumers); every other
    /// caller goes through this layer's operations.
    pub(crate) fn store_handle(&self) -> Arc<dyn Store> {
        self.store.clone()
    }

    /// The nft executor, for the agent's own tables (the fabric guard).
    pub(crate) fn nft_handle(&self) -> Arc<dyn NftExecutor> {
        self.nft.clone()
    }

    /// Whether the store is shared by several hosts (etcd).
    pub fn store_is_shared(&self) -> bool {
        self.store.is_shared()
    }

    /// The store's current revision: a cheap proof that it is usable.
    pub async fn store_revision(&self) -> Result<u64> {
        Ok(self.store.revision().await?)
    }

    /// The endpoint recorded at `key`, if any.
    pub async fn endpoint_at(
        &self,
        key: &str,
    ) -> Result<Option<ferrynet_model::network::Endpoint>> {
        match self.store.get(key).await? {
            Some(kv) => Ok(Some(decode(&kv)?)),
            None => Ok(None),
        }
    }

    /// A control layer over `store` for unit tests (host `test`, the state in a temp path).
    #[cfg(test)]
    pub(crate) fn for_tests(store: Arc<dyn Store>) -> Control {
        Control::with_parts(
            store,
            Arc::from(default_executor()),
            Arc::new(Linux),
            &std::env::temp_dir().join("ferrynet-unit"),
        )
    }

    /// A control layer over given parts for unit tests (host `test`, the state in `dir`).
    #[cfg(test)]
    pub(crate) fn with_parts(
        store: Arc<dyn Store>,
        nft: Arc<dyn NftExecutor>,
        kernel: Arc<dyn Kernel>,
        dir: &Path,
    ) -> Control {
        Control {
            store,
            nft,
            kernel,
            paths: Paths::resolve(Some(dir)),
            host: "test".into(),
            store_url: None,
        }
    }
}

/// Open the store a URL names (`etcd://…`, `etcds://…`, a path or `file://…`); None is the
/// embedded file in the state directory.
pub async fn open_store(paths: &Paths, url: Option<&str>) -> Result<Arc<dyn Store>> {
    match url {
        None => Ok(Arc::new(EmbeddedStore::open(paths.store_file())?)),
        Some(u) => {
            let cfg = StoreConfig::parse(u).map_err(|e| {
                ControlError::InvalidConfig(format!(
                    "store {}: {e}",
                    ferrynet_store::config::redact_url(u)
                ))
            })?;
            Ok(ferrynet_store::config::open(&cfg).await?)
        }
    }
}

/// Decode a JSON record from the store and check it: stored records are input (see
/// ferrynet_model::validate), so a bad one is an error here, never a command later.
pub(crate) fn decode<T: DeserializeOwned + Validate>(kv: &KeyValue) -> Result<T> {
    let rec = decode_plain::<T>(kv)?;
    rec.validate_at(&kv.key)
        .map_err(|source| ControlError::Rejected {
            key: kv.key.clone(),
            source,
        })?;
    Ok(rec)
}

/// Decode a stored value that is not a record of names (a rotation hint): only its JSON shape
/// is checked.
pub(crate) fn decode_plain<T: DeserializeOwned>(kv: &KeyValue) -> Result<T> {
    serde_json::from_slice(&kv.value).map_err(|source| ControlError::Decode {
        key: kv.key.clone(),
        source,
    })
}

/// Decode every record of a listing, skipping (and logging with its key) each bad one, so one
/// forged or corrupt record never breaks the batch for the others.
pub(crate) fn decode_all<T: DeserializeOwned + Validate>(kvs: &[KeyValue]) -> Vec<T> {
    kvs.iter()
        .filter_map(|kv| match decode(kv) {
            Ok(r) => Some(r),
            Err(e) => {
                tracing::warn!(key = %kv.key.escape_debug(), error = %e, "skipping a rejected store record");
                None
            }
        })
        .collect()
}

/// Encode a record for the store.
pub(crate) fn encode<T: serde::Serialize>(v: &T) -> Vec<u8> {
    // Serializing our own plain structs cannot fail (no maps with non-string keys).
    serde_json::to_vec(v).unwrap_or_default()
}
