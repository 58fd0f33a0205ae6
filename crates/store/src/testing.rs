//! Throwaway etcd servers for tests (this crate's and others'): the Debian `etcd` binary
//! (package `etcd-server`) on 127.0.0.1 (or another local address a lab test chooses), on free
//! ports, in a temp dir that goes with it.
//!
//! Enabled by the `testing` feature. Start one with [`EtcdServer::start`] (plain) or
//! [`EtcdServer::start_tls`] (TLS with a client certificate, made with the `openssl` tool) and
//! connect to [`EtcdServer::url`]. Dropping the server kills etcd (also when a test panics) and
//! removes its directory; etcd is also killed if the test process dies without unwinding.

use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{mpsc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use crate::{EtcdConfig, EtcdStore, StoreConfig};

/// Where Debian's `etcd-server` package puts the server.
pub const ETCD_BIN: &str = "/usr/bin/etcd";
/// Environment variable naming another etcd binary (e.g. on a non-Debian machine).
pub const ETCD_BIN_ENV: &str = "FERRYNET_ETCD";
/// How long etcd may take to become healthy (a loaded 2-core CI machine is slow).
const HEALTH_TIMEOUT: Duration = Duration::from_secs(60);
/// Attempts at starting, for the rare case that a probed free port was taken meanwhile.
const START_ATTEMPTS: usize = 3;

/// Why a test etcd could not be started.
#[derive(Debug, thiserror::Error)]
pub enum EtcdServerError {
    /// The etcd binary is missing.
    #[error("{0} not found: install the Debian package etcd-server (scripts/deps.sh test), or set FERRYNET_ETCD to an etcd binary")]
    NotInstalled(PathBuf),
    /// The `openssl` tool is missing (needed for TLS test certificates).
    #[error("the openssl command is missing: install the Debian package openssl")]
    NoOpenssl,
    /// An `openssl` step failed.
    #[error("openssl ({step}) failed: {detail}")]
    Openssl {
        /// Which certificate was being made.
        step: String,
        /// The tool's output.
        detail: String,
    },
    /// etcd exited while starting.
    #[error("etcd exited while starting ({status}); its log ends with:\n{log}")]
    Exited {
        /// Its exit status.
        status: ExitStatus,
        /// The end of its log.
        log: String,
    },
    /// etcd did not report healthy in time.
    #[error("etcd did not become healthy within {waited:?}; its log ends with:\n{log}")]
    NotHealthy {
        /// How long we waited.
        waited: Duration,
        /// The end of its log.
        log: String,
    },
    /// Creating files or processes failed.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// The error.
        source: std::io::Error,
    },
}

type Result<T> = std::result::Result<T, EtcdServerError>;

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> EtcdServerError {
    let what = what.into();
    move |source| EtcdServerError::Io { what, source }
}

/// The certificates of a TLS test server (all PEM, in the server's directory).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    /// The CA that signed both certificates.
    pub ca: PathBuf,
    /// Server certificate (for the listen address, 127.0.0.1 and localhost).
    pub server_cert: PathBuf,
    /// Server key.
    pub server_key: PathBuf,
    /// Client certificate the server requires.
    pub client_cert: PathBuf,
    /// Client key.
    pub client_key: PathBuf,
}

/// How to start a test etcd.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EtcdServerOptions {
    /// The etcd binary.
    pub binary: PathBuf,
    /// Serve clients over TLS and require a client certificate.
    pub tls: bool,
    /// The address etcd listens on (clients, peers, health). Loopback by default; a multi-host
    /// lab test may give an address of its own that its host namespaces can reach.
    pub listen: IpAddr,
}

impl Default for EtcdServerOptions {
    /// [`ETCD_BIN`] (or `$FERRYNET_ETCD`), plain.
    fn default() -> Self {
        EtcdServerOptions {
            binary: std::env::var_os(ETCD_BIN_ENV)
                .map(PathBuf::from)
                .unwrap_or_else(|| PathBuf::from(ETCD_BIN)),
            tls: false,
            listen: IpAddr::V4(Ipv4Addr::LOCALHOST),
        }
    }
}

/// A running single-member etcd for one test; killed and removed on drop.
#[derive(Debug)]
pub struct EtcdServer {
    /// The store location to connect to (`etcd://127.0.0.1:port`, or `etcds://…?ca=…&cert=…&key=…`).
    pub url: String,
    /// The client endpoint, `127.0.0.1:port` (the listen address and the client port).
    pub endpoint: String,
    /// The certificates, for a TLS server.
    pub tls: Option<TlsFiles>,
    pid: u32,
    child: Option<Child>,
    /// What a restart needs: the binary, ports and data dir of the running member.
    launch: LaunchSpec,
    dir: tempfile::TempDir,
}

/// Everything that identifies one etcd member on disk and on the network.
#[derive(Debug, Clone)]
struct LaunchSpec {
    binary: PathBuf,
    listen: IpAddr,
    ports: Ports,
    data_dir: PathBuf,
    tls: Option<TlsFiles>,
}

/// The member's loopback ports.
#[derive(Debug, Clone, Copy)]
struct Ports {
    client: u16,
    peer: u16,
    metrics: u16,
}

impl EtcdServer {
    /// Start a plain etcd and wait until it is healthy.
    pub fn start() -> Result<EtcdServer> {
        EtcdServer::start_with(&EtcdServerOptions::default())
    }

    /// Start an etcd that serves TLS and requires a client certificate; [`url`](Self::url)
    /// carries the CA and client certificate.
    pub fn start_tls() -> Result<EtcdServer> {
        EtcdServer::start_with(&EtcdServerOptions {
            tls: true,
            ..EtcdServerOptions::default()
        })
    }

    /// Start an etcd as `opts` say and wait until it is healthy.
    pub fn start_with(opts: &EtcdServerOptions) -> Result<EtcdServer> {
        if !opts.binary.is_file() {
            return Err(EtcdServerError::NotInstalled(opts.binary.clone()));
        }
        let dir = tempfile::Builder::new()
            .prefix("ferrynet-etcd-")
            .tempdir()
            .map_err(io("creating a temp dir for etcd"))?;
        let tls = if opts.tls {
            Some(make_certs(dir.path(), opts.listen)?)
        } else {
            None
        };
        let mut last_err = None;
        for attempt in 0..START_ATTEMPTS {
            let spec = LaunchSpec {
                binary: opts.binary.clone(),
                listen: opts.listen,
                ports: free_ports(opts.listen)?,
                data_dir: dir.path().join(format!("data-{attempt}")),
                tls: tls.clone(),
            };
            match launch(&spec, dir.path())? {
                Ok(child) => {
                    let endpoint = SocketAddr::new(opts.listen, spec.ports.client).to_string();
                    let mut cfg = EtcdConfig::new([endpoint.clone()]);
                    if let Some(t) = &tls {
                        cfg.tls = true;
                        cfg.ca = Some(t.ca.clone());
                        cfg.cert = Some(t.client_cert.clone());
                        cfg.key = Some(t.client_key.clone());
                    }
                    return Ok(EtcdServer {
                        url: cfg.to_string(),
                        endpoint,
                        tls,
                        pid: child.id(),
                        child: Some(child),
                        launch: spec,
                        dir,
                    });
                }
                // Most likely a port taken between probing and binding: new ports, new data dir.
                Err(e) => last_err = Some(e),
            }
        }
        Err(last_err.unwrap_or(EtcdServerError::NotHealthy {
            waited: HEALTH_TIMEOUT,
            log: String::new(),
        }))
    }

    /// The etcd process id.
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// The temp dir holding etcd's data, log and certificates.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The end of etcd's log, for failure messages.
    pub fn log_tail(&self) -> String {
        log_tail(self.dir.path())
    }

    /// [`url`](Self::url) parsed.
    pub fn config(&self) -> StoreConfig {
        // The url was printed from a valid config, so it parses; fall back to the plain endpoint.
        self.url
            .parse()
            .unwrap_or_else(|_| StoreConfig::Etcd(EtcdConfig::new([self.endpoint.clone()])))
    }

    /// A client for this server (with the TLS files, for a TLS server).
    pub async fn connect(&self) -> crate::Result<EtcdStore> {
        match self.config() {
            StoreConfig::Etcd(cfg) => EtcdStore::connect(&cfg).await,
            StoreConfig::Embedded(_) => Err(crate::StoreError::Io("not an etcd url".into())),
        }
    }

    /// Kill etcd now (SIGKILL) and reap it; the directory stays until drop.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            // Already exited is fine: either way it is gone.
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl EtcdServer {
    /// Kill etcd (if running) and start it again on the same ports with the same data, as a
    /// crashed and restarted member would be; waits until it is healthy.
    pub fn restart(&mut self) -> Result<()> {
        self.kill();
        let child = launch(&self.launch, self.dir.path())??;
        self.pid = child.id();
        self.child = Some(child);
        Ok(())
    }
}

impl Drop for EtcdServer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Three distinct free ports on `ip` (held together while picked, so they differ).
fn free_ports(ip: IpAddr) -> Result<Ports> {
    let bind = || TcpListener::bind((ip, 0)).map_err(io(format!("finding a free port on {ip}")));
    let ls = [bind()?, bind()?, bind()?];
    let port = |l: &TcpListener| Ok(l.local_addr().map_err(io("finding a free port"))?.port());
    Ok(Ports {
        client: port(&ls[0])?,
        peer: port(&ls[1])?,
        metrics: port(&ls[2])?,
    })
}

/// Start `spec` and wait until healthy. The outer error is ours (files, spawning); the inner
/// one is etcd failing to come up, which a retry on other ports may cure.
fn launch(spec: &LaunchSpec, dir: &Path) -> Result<Result<Child>> {
    let Ports {
        client,
        peer,
        metrics,
    } = spec.ports;
    let (bin, tls) = (&spec.binary, spec.tls.as_ref());
    let scheme = if tls.is_some() { "https" } else { "http" };
    let at = |port| SocketAddr::new(spec.listen, port);
    let client_url = format!("{scheme}://{}", at(client));
    let peer_url = format!("http://{}", at(peer));
    let log_path = dir.join("etcd.log");
    // Appending: a restarted member's log follows the first run's.
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log_path)
        .map_err(io("opening etcd.log"))?;
    let log_err = log.try_clone().map_err(io("creating etcd.log"))?;
    let mut cmd = Command::new(bin);
    cmd.arg("--name")
        .arg("ferrynet-test")
        .arg("--data-dir")
        .arg(&spec.data_dir)
        .arg("--listen-client-urls")
        .arg(&client_url)
        .arg("--advertise-client-urls")
        .arg(&client_url)
        .arg("--listen-peer-urls")
        .arg(&peer_url)
        .arg("--initial-advertise-peer-urls")
        .arg(&peer_url)
        .arg("--initial-cluster")
        .arg(format!("ferrynet-test={peer_url}"))
        .arg("--initial-cluster-state")
        .arg("new")
        // Plain HTTP /health even when clients need TLS: readiness without a client cert.
        .arg("--listen-metrics-urls")
        .arg(format!("http://{}", at(metrics)))
        .arg("--logger")
        .arg("zap")
        .arg("--log-outputs")
        .arg("stderr");
    if let Some(t) = tls {
        cmd.arg("--cert-file")
            .arg(&t.server_cert)
            .arg("--key-file")
            .arg(&t.server_key)
            .arg("--trusted-ca-file")
            .arg(&t.ca)
            .arg("--client-cert-auth");
    }
    // etcd reads ETCD_* variables as flags; the caller's must not change the test server.
    for (k, _) in std::env::vars_os() {
        if k.to_string_lossy().starts_with("ETCD_") {
            cmd.env_remove(k);
        }
    }
    cmd.stdin(Stdio::null())
        .stdout(Stdio::from(log))
        .stderr(Stdio::from(log_err));
    let mut child =
        spawn_tied_to_process(cmd).map_err(io(format!("starting {}", bin.display())))?;
    let started = Instant::now();
    let health = at(metrics);
    loop {
        match child.try_wait() {
            Ok(Some(status)) => {
                return Ok(Err(EtcdServerError::Exited {
                    status,
                    log: log_tail(dir),
                }))
            }
            Ok(None) => {}
            Err(e) => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(io("waiting for etcd")(e));
            }
        }
        if healthy(health) {
            return Ok(Ok(child));
        }
        if started.elapsed() > HEALTH_TIMEOUT {
            let _ = child.kill();
            let _ = child.wait();
            return Ok(Err(EtcdServerError::NotHealthy {
                waited: HEALTH_TIMEOUT,
                log: log_tail(dir),
            }));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Whether etcd's `/health` says `"health":"true"` (it has a leader and no alarm).
fn healthy(addr: SocketAddr) -> bool {
    let Ok(mut s) = TcpStream::connect_timeout(&addr, Duration::from_secs(1)) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(3)));
    if s.write_all(format!("GET /health HTTP/1.0\r\nHost: {addr}\r\n\r\n").as_bytes())
        .is_err()
    {
        return false;
    }
    let mut body = String::new();
    let _ = s.read_to_string(&mut body);
    body.contains("\"health\":\"true\"")
}

fn log_tail(dir: &Path) -> String {
    let text = std::fs::read_to_string(dir.join("etcd.log")).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(20)..].join("\n")
}

/// A request to the spawner thread: the command and where to send the child.
type SpawnRequest = (Command, mpsc::Sender<std::io::Result<Child>>);

/// Spawn `cmd` so that the kernel kills it when this process dies (even by SIGKILL).
///
/// PR_SET_PDEATHSIG fires when the *thread* that forked exits, so children are forked by one
/// thread that lives as long as the process, not by the (short-lived) test thread.
fn spawn_tied_to_process(mut cmd: Command) -> std::io::Result<Child> {
    // SAFETY: the closure only makes the async-signal-safe prctl(2) call.
    unsafe {
        cmd.pre_exec(|| {
            nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGKILL)
                .map_err(std::io::Error::from)
        });
    }
    static SPAWNER: OnceLock<Option<Mutex<mpsc::Sender<SpawnRequest>>>> = OnceLock::new();
    let spawner = SPAWNER.get_or_init(|| {
        let (tx, rx) = mpsc::channel::<SpawnRequest>();
        std::thread::Builder::new()
            .name("etcd-spawner".into())
            .spawn(move || {
                for (mut cmd, reply) in rx {
                    let _ = reply.send(cmd.spawn());
                }
            })
            .ok()
            .map(|_| Mutex::new(tx))
    });
    let Some(spawner) = spawner else {
        // No spawner thread: fork here; the child then dies with this thread at worst.
        return cmd.spawn();
    };
    let (reply_tx, reply_rx) = mpsc::channel();
    let sent = spawner
        .lock()
        .map_err(|_| std::io::Error::other("etcd spawner lock poisoned"))?
        .send((cmd, reply_tx));
    if sent.is_err() {
        return Err(std::io::Error::other("etcd spawner thread is gone"));
    }
    reply_rx
        .recv()
        .map_err(|_| std::io::Error::other("etcd spawner thread is gone"))?
}

/// A self-signed CA, a server certificate for `listen`, 127.0.0.1 and localhost, and a client
/// certificate.
fn make_certs(dir: &Path, listen: IpAddr) -> Result<TlsFiles> {
    // clientAuth too: etcd's own gRPC gateway dials the server with this certificate.
    let server_ext = format!(
        "subjectAltName=IP:{listen},IP:127.0.0.1,DNS:localhost\n\
         extendedKeyUsage=serverAuth,clientAuth\n"
    );
    let tls = dir.join("tls");
    std::fs::create_dir_all(&tls).map_err(io("creating the tls dir"))?;
    let p = |name: &str| tls.join(name);
    let ec = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
    ];
    openssl(
        &tls,
        "CA",
        &[
            &["req", "-x509"][..],
            &ec,
            &[
                "-keyout",
                "ca.key",
                "-out",
                "ca.crt",
                "-days",
                "2",
                "-subj",
                "/CN=ferrynet test CA",
                "-addext",
                "basicConstraints=critical,CA:TRUE",
                "-addext",
                "keyUsage=critical,keyCertSign,cRLSign",
            ],
        ]
        .concat(),
    )?;
    for (name, cn, ext) in [
        ("server", "ferrynet-test-etcd", server_ext.as_str()),
        ("client", "ferrynet-client", "extendedKeyUsage=clientAuth\n"),
    ] {
        let ext_file = format!("{name}.ext");
        let common = "basicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\n";
        std::fs::write(p(&ext_file), format!("{common}{ext}"))
            .map_err(io(format!("writing {ext_file}")))?;
        let (key, csr, crt, subj) = (
            format!("{name}.key"),
            format!("{name}.csr"),
            format!("{name}.crt"),
            format!("/CN={cn}"),
        );
        openssl(
            &tls,
            name,
            &[
                &["req"][..],
                &ec,
                &["-keyout", &key, "-out", &csr, "-subj", &subj],
            ]
            .concat(),
        )?;
        openssl(
            &tls,
            name,
            &[
                "x509",
                "-req",
                "-in",
                &csr,
                "-CA",
                "ca.crt",
                "-CAkey",
                "ca.key",
                "-CAcreateserial",
                "-out",
                &crt,
                "-days",
                "2",
                "-extfile",
                &ext_file,
            ],
        )?;
    }
    Ok(TlsFiles {
        ca: p("ca.crt"),
        server_cert: p("server.crt"),
        server_key: p("server.key"),
        client_cert: p("client.crt"),
        client_key: p("client.key"),
    })
}

fn openssl(dir: &Path, step: &str, args: &[&str]) -> Result<()> {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => EtcdServerError::NoOpenssl,
            _ => EtcdServerError::Io {
                what: "running openssl".into(),
                source: e,
            },
        })?;
    if !out.status.success() {
        return Err(EtcdServerError::Openssl {
            step: step.into(),
            detail: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(())
}
