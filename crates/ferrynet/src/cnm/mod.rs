//! Docker's Container Network Model: ferrynet as a libnetwork remote network driver and IPAM
//! driver, served as HTTP/1.1 + JSON on a unix socket that Docker discovers under
//! `/run/docker/plugins/<driver-name>.sock`.
//!
//! The driver and the IPAM share ferrynet's store with the CNI plugin and the CLI, so Docker and
//! CNI containers on one network get distinct addresses and reach each other. See
//! `docs/ARCHITECTURE.md` ("Docker (CNM)") for the mapping and `docs/DOCKER.md` for usage.

pub mod driver;
pub mod error;
pub mod ipam;
pub mod names;
pub mod options;
pub mod protocol;
pub mod records;
pub mod scope;
pub mod server;
pub mod sweep;

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::net::IpAddr;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{bail, Context};
use tokio::net::UnixListener;

use crate::control::Control;

/// Where Docker looks for the plugin by default (driver name `ferrynet`).
pub const DEFAULT_SOCKET: &str = "/run/docker/plugins/ferrynet.sock";

/// The plugin's state: the control plane and a lock that serialises its multi-key updates.
pub struct Plugin {
    /// ferrynet's control plane.
    pub ctl: Arc<Control>,
    /// Held while a handler reads and rewrites pool, binding and endpoint records.
    pub(crate) lock: tokio::sync::Mutex<()>,
    /// Docker network id → its binding, as read from the store. A binding never changes while
    /// it exists and only this driver's `DeleteNetwork` removes it, so entries stay true until
    /// then; it saves a store read in every endpoint call.
    pub(crate) bindings: std::sync::Mutex<HashMap<String, records::DockerNetwork>>,
    /// (ferrynet network, address) reserved by `RequestAddress` and not yet taken up by a
    /// `CreateEndpoint`: only a hint that lets `CreateEndpoint` try one transaction without reads
    /// first (a wrong hint costs a failed transaction, never a wrong record).
    pub(crate) reserved: std::sync::Mutex<HashSet<(String, IpAddr)>>,
    /// Endpoint id → its port (veth pair and anti-spoofing elements) being built since
    /// `CreateEndpoint`. Docker creates the container's sandbox between `CreateEndpoint` and
    /// `Join`, so the port is ready by then and off the path `docker run` waits on; `Join`
    /// (or `DeleteEndpoint`, if Docker gives up first) takes and awaits it.
    pub(crate) ports: std::sync::Mutex<HashMap<String, driver::PortTask>>,
    /// Joined endpoints go here to get their container's name from the Engine API (None: no
    /// naming, e.g. no Engine API socket).
    pub(crate) namer: Option<tokio::sync::mpsc::UnboundedSender<names::NameJob>>,
    /// What `--docker-scope` asked for.
    pub(crate) scope_setting: scope::ScopeSetting,
    /// The Engine API, asked whether the engine has a cluster store.
    pub(crate) api_socket: PathBuf,
    /// The scope once decided for good (the engine answered, or nothing needed asking).
    scope_known: std::sync::Mutex<Option<scope::Scope>>,
    /// Signalled by every `Plugin.Activate` (a dockerd start): sweep for endpoints Docker forgot.
    pub(crate) activated: tokio::sync::Notify,
}

impl Plugin {
    /// A plugin over `ctl`.
    pub fn new(ctl: Arc<Control>) -> Plugin {
        Plugin {
            ctl,
            lock: tokio::sync::Mutex::new(()),
            bindings: std::sync::Mutex::new(HashMap::new()),
            reserved: std::sync::Mutex::new(HashSet::new()),
            ports: std::sync::Mutex::new(HashMap::new()),
            namer: None,
            scope_setting: scope::ScopeSetting::Auto,
            api_socket: names::docker_api_socket(),
            scope_known: std::sync::Mutex::new(None),
            activated: tokio::sync::Notify::new(),
        }
    }

    /// The scope to answer Docker with: decided from `--docker-scope`, the store and, under
    /// `auto` on a shared store, the engine's `GET /info` (asked again while it does not answer).
    pub async fn scope(&self) -> scope::Scope {
        if let Some(s) = self.scope_known.lock().ok().and_then(|g| *g) {
            return s;
        }
        let shared = self.ctl.store_is_shared();
        let ask = self.scope_setting == scope::ScopeSetting::Auto && shared;
        let engine = if ask {
            // Short: a starting engine activates plugins before its API answers.
            match tokio::time::timeout(
                std::time::Duration::from_secs(2),
                names::get_json(&self.api_socket, "/info"),
            )
            .await
            {
                Ok(Ok(Some(info))) => scope::engine_store(&info),
                Ok(Ok(None)) => scope::EngineStore::Unknown,
                Ok(Err(e)) => {
                    tracing::debug!(error = %e, "asking the engine for its cluster store");
                    scope::EngineStore::Unknown
                }
                Err(_) => scope::EngineStore::Unknown,
            }
        } else {
            scope::EngineStore::Unknown
        };
        let (s, why) = scope::decide(self.scope_setting, shared, engine);
        if let Some(why) = why {
            tracing::warn!("{why}");
        }
        if !ask || engine != scope::EngineStore::Unknown {
            if let Ok(mut g) = self.scope_known.lock() {
                *g = Some(s);
            }
        }
        tracing::info!(scope = s.as_str(), "driver scope");
        s
    }
}

/// Serve the Docker plugin API on `listener` until `shutdown` completes (for the per-host
/// agent to mount; `ferrynet docker-plugin` runs it in the foreground).
pub async fn serve(
    control: Arc<Control>,
    listener: UnixListener,
    scope: scope::ScopeSetting,
    shutdown: impl Future<Output = ()>,
) -> std::io::Result<()> {
    let mut plugin = Plugin::new(control);
    plugin.scope_setting = scope;
    // Always on: only Docker calls Join, so its API is normally there; when it is not where
    // expected, each join logs why its endpoint stays unnamed.
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    plugin.namer = Some(tx);
    let plugin = Arc::new(plugin);
    let namer = tokio::spawn(names::run(plugin.clone(), plugin.api_socket.clone(), rx));
    let sweeper = tokio::spawn(sweep::run(plugin.clone(), plugin.api_socket.clone()));
    let served = server::run(plugin, listener, shutdown).await;
    namer.abort();
    sweeper.abort();
    served
}

/// Arguments of `ferrynet docker-plugin`.
#[derive(clap::Args, Debug)]
pub struct PluginArgs {
    /// Unix socket to serve; Docker knows the driver by the file's name without `.sock`.
    #[arg(long, default_value = DEFAULT_SOCKET, value_name = "PATH")]
    pub socket: PathBuf,
    /// Scope to tell Docker: `auto` is global when ferrynet's store is etcd and the engine runs
    /// with a cluster store (`dockerd --cluster-store`), else local.
    #[arg(long, value_enum, default_value_t = scope::ScopeSetting::Auto)]
    pub docker_scope: scope::ScopeSetting,
}

/// Bind the socket: refuse if a live plugin already answers there, remove a stale file.
pub fn bind_socket(path: &Path) -> anyhow::Result<UnixListener> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_socket() => {
            if std::os::unix::net::UnixStream::connect(path).is_ok() {
                bail!(
                    "{} is served by another running plugin; stop it first",
                    path.display()
                );
            }
            std::fs::remove_file(path)
                .with_context(|| format!("removing the stale socket {}", path.display()))?;
            tracing::info!(socket = %path.display(), "removed a stale socket");
        }
        Ok(_) => bail!("{} exists and is not a socket", path.display()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).with_context(|| format!("inspecting {}", path.display())),
    }
    let l = UnixListener::bind(path).with_context(|| format!("binding {}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o660))
        .with_context(|| format!("setting permissions of {}", path.display()))?;
    Ok(l)
}

/// Completes on SIGTERM or SIGINT. The handlers are installed by this call, before READY=1
/// is sent, not when the future is first polled.
fn termination() -> anyhow::Result<impl Future<Output = ()>> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    Ok(async move {
        tokio::select! {
            _ = term.recv() => tracing::info!("SIGTERM: shutting down"),
            _ = int.recv() => tracing::info!("SIGINT: shutting down"),
        }
    })
}

/// `ferrynet docker-plugin`: serve in the foreground until SIGTERM/SIGINT, then remove the socket.
pub async fn run_plugin(ctl: Arc<Control>, args: PluginArgs) -> anyhow::Result<()> {
    let listener = bind_socket(&args.socket)?;
    ctl.keep_store_open();
    let driver = args
        .socket
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    tracing::info!(
        socket = %args.socket.display(),
        driver = %driver,
        state = %ctl.paths().state_dir.display(),
        "serving the Docker network and IPAM driver (docker network create -d {driver} --ipam-driver {driver} ...)"
    );
    let stop = termination()?;
    // The socket listens: Docker can activate the driver from now on (Type=notify).
    crate::notify::ready(&format!(
        "serving driver {driver} on {}",
        args.socket.display()
    ));
    let served = serve(ctl, listener, args.docker_scope, async {
        stop.await;
        crate::notify::stopping();
    })
    .await;
    if let Err(e) = std::fs::remove_file(&args.socket) {
        if e.kind() != std::io::ErrorKind::NotFound {
            tracing::warn!(error = %e, socket = %args.socket.display(), "removing the socket failed");
        }
    }
    served.context("serving the plugin API")?;
    tracing::info!("stopped");
    Ok(())
}
