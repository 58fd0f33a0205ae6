//! Health checks of the producers on this host: one task per checked producer (from the
//! discovery feed), TCP connect, HTTP GET or a command in the producer's network namespace,
//! counted by [`HealthState`]; `health/<service>/<id>` is written on this host's lease at the
//! first verdict, on every change and again whenever the lease changes, never otherwise.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::AsRawFd;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use ferrynet_model::health::HealthState;
use ferrynet_model::service::{keys, CheckKind, HealthCheck, HealthRecord, Producer};
use ferrynet_store::{Compare, LeaseId, Op, Store};
use http_body_util::Empty;
use hyper_util::rt::TokioIo;
use nix::sched::CloneFlags;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use super::discovery::ViewRx;
use super::status::AgentStatus;

/// A producer: (service, id).
type Key = (String, String);

/// What a check task runs on; a change restarts the task.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Target {
    addrs: Vec<IpAddr>,
    netns: Option<String>,
    check: HealthCheck,
}

impl Target {
    fn of(p: &Producer, check: &HealthCheck) -> Target {
        Target {
            addrs: p.addrs.clone(),
            netns: p.netns.clone(),
            check: check.clone(),
        }
    }
    /// The address checks connect to: IPv4 when the producer has one.
    fn addr(&self) -> Option<IpAddr> {
        self.addrs
            .iter()
            .find(|a| a.is_ipv4())
            .or(self.addrs.first())
            .copied()
    }
}

/// One producer's checks as `ferrynet status` shows them.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct HealthReport {
    /// Service.
    pub service: String,
    /// Producer id.
    pub id: String,
    /// The check, as `--check` spells it.
    pub check: String,
    /// The verdict (None: not decided yet).
    pub healthy: Option<bool>,
    /// Unix time (ms) of the last change.
    pub since_ms: u64,
    /// What the last check said.
    pub output: String,
    /// Checks run.
    pub checks: u64,
}

/// `--check` syntax of a check.
pub fn describe(k: &CheckKind) -> String {
    match k {
        CheckKind::Tcp { port } => format!("tcp:{port}"),
        CheckKind::Http { port, path, status } => format!("http:{port}{path}={status}"),
        CheckKind::Exec { command } => format!("exec:{}", command.join(" ")),
    }
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Follow the discovery feed and keep one check task per producer checked on `host`.
pub async fn run(
    host: String,
    store: Arc<dyn Store>,
    mut disc_rx: ViewRx,
    lease_rx: watch::Receiver<Option<LeaseId>>,
    status: Arc<Mutex<AgentStatus>>,
) {
    let mut tasks: BTreeMap<Key, (Target, JoinHandle<()>)> = BTreeMap::new();
    loop {
        let view = disc_rx.borrow_and_update().clone();
        let want: BTreeMap<Key, Target> = view
            .checked_on(&host)
            .filter_map(|p| {
                let check = p.effective_check(view.services.get(&p.service))?;
                Some(((p.service.clone(), p.id.clone()), Target::of(p, check)))
            })
            .collect();
        let mut stopped = Vec::new();
        tasks.retain(|k, (t, h)| {
            let keep = want.get(k) == Some(t);
            if !keep {
                h.abort();
                stopped.push(k.clone());
            }
            keep
        });
        for k in stopped {
            if !want.contains_key(&k) {
                if let Ok(mut s) = status.lock() {
                    s.health.remove(&format!("{}/{}", k.0, k.1));
                }
                // Still registered but no longer ours to check (check removed, moved host):
                // our record goes, a newer one of another host stays.
                if view.producers.contains_key(&k) {
                    forget_record(&store, &k, &host).await;
                }
            }
        }
        for (k, t) in want {
            if tasks.contains_key(&k) {
                continue;
            }
            // After an agent restart the old verdict holds until the thresholds change it.
            let seed = view
                .health
                .get(&k)
                .filter(|h| h.host == host)
                .map(|h| h.healthy);
            let task = tokio::spawn(check_loop(
                k.clone(),
                t.clone(),
                host.clone(),
                store.clone(),
                lease_rx.clone(),
                seed,
                status.clone(),
            ));
            tasks.insert(k, (t, task));
        }
        if disc_rx.changed().await.is_err() {
            break;
        }
    }
    for (_, (_, h)) in tasks {
        h.abort();
    }
}

/// Delete this host's health record of `k`, unless another host wrote it since.
async fn forget_record(store: &Arc<dyn Store>, k: &Key, host: &str) {
    let key = keys::health(&k.0, &k.1);
    let Ok(Some(kv)) = store.get(&key).await else {
        return;
    };
    let mine = serde_json::from_slice::<HealthRecord>(&kv.value).is_ok_and(|h| h.host == host);
    if mine {
        let _ = store
            .txn(
                vec![Compare::ModRevision(key.clone(), kv.mod_revision)],
                vec![Op::delete(key)],
            )
            .await;
    }
}

async fn check_loop(
    k: Key,
    t: Target,
    host: String,
    store: Arc<dyn Store>,
    mut lease_rx: watch::Receiver<Option<LeaseId>>,
    seed: Option<bool>,
    status: Arc<Mutex<AgentStatus>>,
) {
    let status_key = format!("{}/{}", k.0, k.1);
    let mut report = HealthReport {
        service: k.0.clone(),
        id: k.1.clone(),
        check: describe(&t.check.kind),
        healthy: seed,
        since_ms: now_ms(),
        ..Default::default()
    };
    let mut state = HealthState::new(seed);
    let mut first = true;
    let mut dirty = false;
    let mut tick = tokio::time::interval(t.check.interval());
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {
                let r = probe(&t).await;
                let (ok, output) = (r.is_ok(), r.unwrap_or_else(|e| e));
                report.checks += 1;
                report.output = output;
                if state.observe(ok, t.check.rise, t.check.fall) {
                    report.since_ms = now_ms();
                    report.healthy = state.healthy;
                    tracing::info!(service = %k.0, id = %k.1, healthy = ?state.healthy, output = %report.output, "producer health changed");
                    dirty = true;
                }
                if first {
                    first = false;
                    dirty = true;
                }
                if let Ok(mut s) = status.lock() {
                    s.health.insert(status_key.clone(), report.clone());
                }
            }
            r = lease_rx.changed() => {
                if r.is_err() {
                    return;
                }
                // The old lease took our records with it (or will): write them again.
                dirty = true;
            }
        }
        if !dirty {
            continue;
        }
        let (Some(healthy), Some(lease)) = (state.healthy, *lease_rx.borrow()) else {
            continue;
        };
        let rec = HealthRecord {
            healthy,
            host: host.clone(),
            since_ms: report.since_ms,
            output: report.output.chars().take(512).collect(),
        };
        let put = Op::Put {
            key: keys::health(&k.0, &k.1),
            value: serde_json::to_vec(&rec).unwrap_or_default(),
            lease: Some(lease),
        };
        // Only while the producer is still registered (a deregistered one would otherwise
        // get its record back).
        let guard = Compare::Exists(keys::producer(&k.0, &k.1));
        match store.txn(vec![guard], vec![put]).await {
            Ok(_) => dirty = false,
            Err(e) => {
                tracing::warn!(service = %k.0, id = %k.1, error = %e, "writing the health record; retrying at the next check")
            }
        }
    }
}

/// Run one check within its timeout; Ok(what it saw) when it passed, Err(why) when not.
async fn probe(t: &Target) -> Result<String, String> {
    let timeout = t.check.timeout();
    let late = || format!("no answer within {timeout:?}");
    match &t.check.kind {
        CheckKind::Tcp { port } => {
            let addr = SocketAddr::new(t.addr().ok_or("producer has no address")?, *port);
            tokio::time::timeout(timeout, tokio::net::TcpStream::connect(addr))
                .await
                .map_err(|_| format!("connecting to {addr}: {}", late()))?
                .map(|_| format!("connected to {addr}"))
                .map_err(|e| format!("connecting to {addr}: {e}"))
        }
        CheckKind::Http { port, path, status } => {
            let addr = SocketAddr::new(t.addr().ok_or("producer has no address")?, *port);
            let got = tokio::time::timeout(timeout, http_get(addr, path))
                .await
                .map_err(|_| late())
                .and_then(|r| r)
                .map_err(|e| format!("GET http://{addr}{path}: {e}"))?;
            if got == *status {
                Ok(format!("GET http://{addr}{path}: {got}"))
            } else {
                Err(format!(
                    "GET http://{addr}{path}: status {got}, expected {status}"
                ))
            }
        }
        CheckKind::Exec { command } => exec(t.netns.as_deref(), command, timeout).await,
    }
}

/// The status code of `GET path` on `addr` (HTTP/1.1, hyper's client).
async fn http_get(addr: SocketAddr, path: &str) -> Result<u16, String> {
    let stream = tokio::net::TcpStream::connect(addr)
        .await
        .map_err(|e| e.to_string())?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| e.to_string())?;
    let driver = tokio::spawn(conn);
    let req = hyper::Request::get(path)
        .header(hyper::header::HOST, addr.to_string())
        .header(hyper::header::USER_AGENT, "ferrynet-health")
        .body(Empty::<Bytes>::new())
        .map_err(|e| e.to_string());
    let res = match req {
        Ok(req) => sender
            .send_request(req)
            .await
            .map(|r| r.status().as_u16())
            .map_err(|e| e.to_string()),
        Err(e) => Err(e),
    };
    driver.abort();
    res
}

/// Run `argv` in `netns` (None: this host's) as its own process group; the whole group is
/// killed when it outlives `timeout`.
async fn exec(netns: Option<&str>, argv: &[String], timeout: Duration) -> Result<String, String> {
    let (prog, args) = argv.split_first().ok_or("no command")?;
    let ns = match netns {
        Some(p) => Some(std::fs::File::open(p).map_err(|e| format!("opening netns {p}: {e}"))?),
        None => None,
    };
    let mut cmd = tokio::process::Command::new(prog);
    cmd.args(args)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .process_group(0)
        .kill_on_drop(true);
    let fd = ns.as_ref().map(|f| f.as_raw_fd());
    // SAFETY: only setns(2), async-signal-safe, between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            if let Some(fd) = fd {
                if libc::setns(fd, CloneFlags::CLONE_NEWNET.bits()) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
    let child = cmd.spawn().map_err(|e| format!("starting {prog}: {e}"))?;
    drop(ns);
    let pid = child.id();
    match tokio::time::timeout(timeout, child.wait_with_output()).await {
        Ok(Ok(out)) => {
            let text = String::from_utf8_lossy(if out.stdout.is_empty() {
                &out.stderr
            } else {
                &out.stdout
            })
            .trim()
            .chars()
            .take(256)
            .collect::<String>();
            let what = format!(
                "{prog}: {}{}",
                out.status,
                if text.is_empty() {
                    String::new()
                } else {
                    format!(": {text}")
                }
            );
            if out.status.success() {
                Ok(what)
            } else {
                Err(what)
            }
        }
        Ok(Err(e)) => Err(format!("{prog}: {e}")),
        Err(_) => {
            if let Some(pid) = pid {
                let _ = nix::sys::signal::killpg(
                    nix::unistd::Pid::from_raw(pid as i32),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
            Err(format!("{prog}: killed after {timeout:?}"))
        }
    }
}
