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

use super::status::AgentStatus;
use crate::feed::ViewRx;

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
                .map(|h| (h.healthy, h.since_ms));
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
    seed: Option<(bool, u64)>,
    status: Arc<Mutex<AgentStatus>>,
) {
    let status_key = format!("{}/{}", k.0, k.1);
    let mut report = HealthReport {
        service: k.0.clone(),
        id: k.1.clone(),
        check: describe(&t.check.kind),
        healthy: seed.map(|s| s.0),
        since_ms: seed.map(|s| s.1).unwrap_or_else(now_ms),
        ..Default::default()
    };
    let mut state = HealthState::new(seed.map(|s| s.0));
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
                super::metrics::instruments().health_check(&k.0, ok);
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
    let req = hyper::Request::get(path)
        .header(hyper::header::HOST, addr.to_string())
        .header(hyper::header::USER_AGENT, "ferrynet-health")
        .body(Empty::<Bytes>::new())
        .map_err(|e| e.to_string())?;
    // The connection is driven in this future, so a timeout drops it with the request.
    let send = sender.send_request(req);
    tokio::pin!(send);
    let status = tokio::select! {
        biased;
        r = &mut send => r,
        // Closed after answering (HTTP/1.0 servers do): the answer is in `send` already.
        c = conn => match c {
            Ok(()) => send.await,
            Err(e) => return Err(e.to_string()),
        },
    };
    status
        .map(|r| r.status().as_u16())
        .map_err(|e| e.to_string())
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

#[cfg(test)]
mod tests {
    use super::*;
    use ferrynet_store::EmbeddedStore;

    async fn wait_until<F: Fn() -> bool>(what: &str, f: F) {
        let until = std::time::Instant::now() + Duration::from_secs(20);
        while !f() {
            assert!(std::time::Instant::now() < until, "{what}");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    fn checks(status: &Mutex<AgentStatus>) -> u64 {
        status
            .lock()
            .map(|s| s.health.get("web/a").map(|h| h.checks).unwrap_or(0))
            .unwrap_or(0)
    }

    fn http_target(port: u16, path: &str, status: u16) -> Target {
        let mut check = HealthCheck::new(CheckKind::Http {
            port,
            path: path.into(),
            status,
        });
        check.timeout_ms = 300;
        Target {
            addrs: vec!["127.0.0.1".parse().unwrap()],
            netns: None,
            check,
        }
    }

    /// HTTP checks: an answer followed by close (HTTP/1.0) counts, the status must match, a
    /// server that never answers fails at the timeout, a refused connection fails.
    #[tokio::test(flavor = "current_thread")]
    async fn http_checks() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let answering = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let a_port = answering.local_addr().unwrap().port();
        let answer = tokio::spawn(async move {
            loop {
                let Ok((mut c, _)) = answering.accept().await else {
                    continue;
                };
                let mut buf = [0u8; 1024];
                let n = c.read(&mut buf).await.unwrap_or(0);
                let req = String::from_utf8_lossy(&buf[..n]).to_string();
                let status = if req.starts_with("GET /ok ") {
                    "204 No Content"
                } else {
                    "404 Not Found"
                };
                let _ = c
                    .write_all(format!("HTTP/1.0 {status}\r\n\r\n").as_bytes())
                    .await;
            }
        });
        let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let s_port = silent.local_addr().unwrap().port();
        let hold = tokio::spawn(async move {
            let mut held = Vec::new();
            loop {
                if let Ok((c, _)) = silent.accept().await {
                    held.push(c);
                }
            }
        });
        let ok = probe(&http_target(a_port, "/ok", 204)).await;
        assert!(ok.as_deref().is_ok_and(|o| o.contains("204")), "{ok:?}");
        let wrong = probe(&http_target(a_port, "/nosuch", 204)).await;
        assert!(
            wrong
                .as_ref()
                .is_err_and(|e| e.contains("status 404, expected 204")),
            "{wrong:?}"
        );
        let hung = probe(&http_target(s_port, "/", 200)).await;
        assert!(
            hung.as_ref().is_err_and(|e| e.contains("no answer within")),
            "{hung:?}"
        );
        answer.abort();
        hold.abort();
        let _ = answer.await;
        let refused = probe(&http_target(a_port, "/ok", 204)).await;
        assert!(refused.is_err(), "{refused:?}");
    }

    /// The record is written at the first verdict, on each change and on a new lease, and
    /// not by the many checks in between (its revision stays).
    #[tokio::test(flavor = "current_thread")]
    async fn records_change_only_with_the_verdict_or_the_lease() {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn Store> = Arc::new(EmbeddedStore::open(dir.path().join("s")).unwrap());
        store
            .put(&keys::producer("web", "a"), b"{}".to_vec())
            .await
            .unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let server = tokio::spawn(async move {
            loop {
                let _ = listener.accept().await;
            }
        });
        let lease = store.grant_lease(Duration::from_secs(60)).await.unwrap();
        let (lease_tx, lease_rx) = watch::channel(Some(lease));
        let status = Arc::new(Mutex::new(AgentStatus::default()));
        let mut check = HealthCheck::new(CheckKind::Tcp { port });
        check.interval_ms = 20;
        check.fall = 2;
        let target = Target {
            addrs: vec!["127.0.0.1".parse().unwrap()],
            netns: None,
            check,
        };
        let key = ("web".to_string(), "a".to_string());
        let task = tokio::spawn(check_loop(
            key,
            target,
            "h1".into(),
            store.clone(),
            lease_rx,
            None,
            status.clone(),
        ));
        let hkey = keys::health("web", "a");
        let record = || async {
            store.get(&hkey).await.unwrap().map(|kv| {
                let h: HealthRecord = serde_json::from_slice(&kv.value).unwrap();
                (h.healthy, kv.mod_revision, kv.lease)
            })
        };
        wait_until("no first check", || checks(&status) >= 1).await;
        let mut first = None;
        for _ in 0..100 {
            first = record().await;
            if first.is_some() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let (healthy, rev, on) = first.expect("no record after the first check");
        assert!(healthy);
        assert_eq!(on, Some(lease));
        wait_until("checks stalled", || checks(&status) >= 20).await;
        assert_eq!(record().await.unwrap().1, rev, "rewritten without a change");

        server.abort();
        let _ = server.await;
        let mut down = None;
        for _ in 0..500 {
            down = record().await.filter(|r| !r.0);
            if down.is_some() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let (_, rev2, _) = down.expect("never unhealthy after the server went");
        let n = checks(&status);
        wait_until("checks stalled", || checks(&status) >= n + 20).await;
        assert_eq!(
            record().await.unwrap().1,
            rev2,
            "rewritten without a change"
        );

        let lease2 = store.grant_lease(Duration::from_secs(60)).await.unwrap();
        lease_tx.send_replace(Some(lease2));
        let mut moved = None;
        for _ in 0..500 {
            moved = record().await.filter(|r| r.2 == Some(lease2));
            if moved.is_some() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let (healthy, _, _) = moved.expect("record not rewritten on the new lease");
        assert!(!healthy);
        task.abort();
    }
}
