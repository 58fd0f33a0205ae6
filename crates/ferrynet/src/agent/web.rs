//! The agent's HTTP listener (`--http`, default 127.0.0.1:9470): `/metrics` (Prometheus
//! text), `/healthz`, `/api/topology` (JSON), `/api/events` (server-sent events on every
//! change) and `/`, the topology page.
//!
//! It reads the cluster feed's discovery view (hosts, networks, blocks, endpoints, services,
//! producers, health), whose records DNS, the load balancer and policy share: it holds no copy
//! of its own and never slows the reconciler; everything it serves is read-only. It binds only the addresses it is given: anyone who can reach one can read the
//! whole topology, so the default is loopback.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, LazyLock, Mutex, RwLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use ferrynet_dataplane::nft::NftExecutor;
use ferrynet_model::discovery::DiscoveryView;
use ferrynet_model::topology::{self, LocalPolicies, PeerLink};
use http_body_util::{combinators::UnsyncBoxBody, BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{header, Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::{watch, Semaphore};

use super::metrics::{self, DropCount};
use super::status::AgentStatus;
use crate::control::trace::TraceRequest;
use crate::control::Control;
use crate::error::ControlError;
use crate::feed::ViewRx;

/// The default listener.
pub const DEFAULT_ADDR: &str = "127.0.0.1:9470";
/// Connections served at once; more wait in the kernel's backlog.
const MAX_CONNS: usize = 64;
/// Event streams open at once (each holds a connection for as long as the page is open).
const MAX_STREAMS: usize = 32;
/// How long `/healthz` waits for the store.
const STORE_PROBE: Duration = Duration::from_secs(2);
/// Events are sent at most this often (a burst of store changes becomes one).
const EVENT_COALESCE: Duration = Duration::from_millis(200);

const PAGE: &str = include_str!("page.html");

/// The page's script, allowed by hash in the Content-Security-Policy: an injected script or
/// event handler would not run even if escaping failed.
static CSP: LazyLock<String> = LazyLock::new(|| {
    use base64::Engine;
    use sha2::Digest;
    let script = PAGE
        .split_once("<script>")
        .and_then(|(_, rest)| rest.split_once("</script>"))
        .map(|(s, _)| s)
        .unwrap_or_default();
    let hash = base64::engine::general_purpose::STANDARD.encode(sha2::Sha256::digest(script));
    format!(
        "default-src 'none'; script-src 'sha256-{hash}'; style-src 'unsafe-inline'; \
         connect-src 'self'; img-src data:; base-uri 'none'; form-action 'none'; \
         frame-ancestors 'none'"
    )
});

/// Parse `--http` values: addresses, or `none` (no listener).
pub fn parse_addrs(values: &[String]) -> Result<Vec<SocketAddr>, String> {
    if values.iter().any(|v| v == "none") {
        if values.len() > 1 {
            return Err("--http none cannot be combined with addresses".into());
        }
        return Ok(Vec::new());
    }
    values
        .iter()
        .map(|v| {
            v.parse::<SocketAddr>()
                .map_err(|_| format!("--http {v:?} is not ADDRESS:PORT (or none)"))
        })
        .collect()
}

/// What the listener serves from.
pub struct Web {
    /// The host's name, store and nft executor, and `/api/trace` (the same operation
    /// `ferrynet trace` runs).
    ctl: Arc<Control>,
    status: Arc<Mutex<AgentStatus>>,
    /// The newest discovery view (shared with the feed's other consumers).
    view: RwLock<Arc<DiscoveryView>>,
    /// The topology's metrics text and the view version it was made from.
    topo_text: Mutex<(u64, Arc<str>)>,
    /// The kernel's drop counters and when they were read.
    drops: Mutex<Option<(Instant, Vec<DropCount>)>>,
    /// Bumped on every change of the followed view.
    version: watch::Sender<u64>,
    streams: Arc<Semaphore>,
}

impl Web {
    /// A listener's state for host `host`.
    pub fn new(ctl: Arc<Control>, status: Arc<Mutex<AgentStatus>>) -> Arc<Web> {
        Arc::new(Web {
            ctl,
            status,
            view: RwLock::new(Arc::new(DiscoveryView::default())),
            topo_text: Mutex::new((u64::MAX, Arc::from(""))),
            drops: Mutex::new(None),
            version: watch::channel(0).0,
            streams: Arc::new(Semaphore::new(MAX_STREAMS)),
        })
    }

    fn status(&self) -> AgentStatus {
        self.status.lock().map(|s| s.clone()).unwrap_or_default()
    }

    fn bump(&self) {
        self.version.send_modify(|v| *v += 1);
    }
}

/// Take each new discovery view until the feed ends (the agent is stopping).
pub async fn follow(web: Arc<Web>, mut views: ViewRx) {
    loop {
        let v = views.borrow_and_update().clone();
        if let Ok(mut held) = web.view.write() {
            *held = v;
        }
        web.bump();
        if views.changed().await.is_err() {
            return;
        }
    }
}

impl Web {
    /// The newest view.
    fn view(&self) -> Arc<DiscoveryView> {
        match self.view.read() {
            Ok(v) => v.clone(),
            Err(p) => p.into_inner().clone(),
        }
    }
}

/// Bind every address (all must bind: an operator who asked for a listener expects it).
pub async fn bind(addrs: &[SocketAddr]) -> anyhow::Result<Vec<TcpListener>> {
    let mut out = Vec::new();
    for a in addrs {
        let l = TcpListener::bind(a)
            .await
            .map_err(|e| anyhow::anyhow!("binding the HTTP listener on {a}: {e}"))?;
        out.push(l);
    }
    Ok(out)
}

/// Serve `listener` until the task is dropped.
pub async fn serve(listener: TcpListener, web: Arc<Web>) {
    let conns = Arc::new(Semaphore::new(MAX_CONNS));
    loop {
        let Ok(permit) = conns.clone().acquire_owned().await else {
            return;
        };
        let (stream, _) = match listener.accept().await {
            Ok(s) => s,
            Err(e) => {
                tracing::debug!(error = %e, "http accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let web = web.clone();
        tokio::spawn(async move {
            let svc = service_fn(move |req| {
                let web = web.clone();
                async move { Ok::<_, Infallible>(route(&web, req).await) }
            });
            let conn = http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(Duration::from_secs(10))
                .serve_connection(TokioIo::new(stream), svc);
            let _ = conn.await;
            drop(permit);
        });
    }
}

type Body = UnsyncBoxBody<Bytes, Infallible>;

fn full(status: StatusCode, ctype: &str, body: impl Into<Bytes>) -> Response<Body> {
    let mut r = Response::new(Full::new(body.into()).boxed_unsync());
    *r.status_mut() = status;
    let h = r.headers_mut();
    if let Ok(v) = header::HeaderValue::from_str(ctype) {
        h.insert(header::CONTENT_TYPE, v);
    }
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        header::HeaderValue::from_static("nosniff"),
    );
    h.insert(
        header::CACHE_CONTROL,
        header::HeaderValue::from_static("no-store"),
    );
    r
}

async fn route(web: &Arc<Web>, req: Request<Incoming>) -> Response<Body> {
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return full(
            StatusCode::METHOD_NOT_ALLOWED,
            "text/plain",
            "only GET is served\n",
        );
    }
    match req.uri().path() {
        "/" => {
            let mut r = full(StatusCode::OK, "text/html; charset=utf-8", PAGE);
            if let Ok(v) = header::HeaderValue::from_str(&CSP) {
                r.headers_mut().insert(header::CONTENT_SECURITY_POLICY, v);
            }
            r
        }
        "/metrics" => {
            let text = scrape(web).await;
            full(
                StatusCode::OK,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
                text,
            )
        }
        "/healthz" => healthz(web).await,
        "/api/topology" => {
            let body = topology_json(web);
            full(StatusCode::OK, "application/json", body)
        }
        "/api/events" => events(web),
        "/api/trace" => trace(web, req.uri().query().unwrap_or_default()).await,
        _ => full(StatusCode::NOT_FOUND, "text/plain", "not found\n"),
    }
}

/// Drop counters are read from the kernel at most this often; scrapes in between reuse them.
const DROPS_MAX_AGE: Duration = Duration::from_secs(1);

/// The metrics text now.
pub async fn scrape(web: &Arc<Web>) -> String {
    let drops = drops_now(web).await;
    let status = web.status();
    let topo_text = topology_text(web);
    metrics::render_with(metrics::instruments(), &topo_text, &status, &drops)
}

/// The topology's metrics text, encoded again only when the followed view changed since.
fn topology_text(web: &Web) -> Arc<str> {
    let version = *web.version.borrow();
    if let Ok(cached) = web.topo_text.lock() {
        if cached.0 == version {
            return cached.1.clone();
        }
    }
    let text: Arc<str> = Arc::from(metrics::render_topology(web.ctl.host(), &web.view()));
    if let Ok(mut cached) = web.topo_text.lock() {
        *cached = (version, text.clone());
    }
    text
}

/// The drop counters, read again when older than `DROPS_MAX_AGE` (each read lists several nft
/// tables through libnftables, which costs more than the rest of a scrape).
async fn drops_now(web: &Arc<Web>) -> Vec<DropCount> {
    if let Ok(cached) = web.drops.lock() {
        if let Some((at, d)) = cached.as_ref() {
            if at.elapsed() < DROPS_MAX_AGE {
                return d.clone();
            }
        }
    }
    let nft = web.ctl.nft_handle();
    let drops = tokio::task::spawn_blocking(move || read_drops(nft.as_ref()))
        .await
        .unwrap_or_default();
    if let Ok(mut cached) = web.drops.lock() {
        *cached = Some((Instant::now(), drops.clone()));
    }
    drops
}

/// The named drop counters of ferrynet's tables (absent tables count nothing).
fn read_drops(nft: &dyn NftExecutor) -> Vec<DropCount> {
    use ferrynet_model::guard::in_reason_order;
    let mut sources: Vec<(&'static str, &str, &str)> = ferrynet_model::guard::TABLES
        .iter()
        .map(|(f, t)| ("spoofing", *f, *t))
        .collect();
    sources.push(("isolation", "inet", ferrynet_model::edge::TABLE));
    sources.push(("policy", "inet", ferrynet_model::policy::render::TABLE));
    sources.push(("underlay", "inet", ferrynet_model::fabric_guard::TABLE));
    let mut out: Vec<DropCount> = Vec::new();
    for (reason, family, table) in sources {
        let listed = match nft.list_counters(family, table) {
            Ok(Some(v)) => v,
            Ok(None) => continue,
            Err(e) => {
                tracing::debug!(error = %e, table, "reading drop counters");
                continue;
            }
        };
        let mut listed = listed;
        in_reason_order(&mut listed);
        for (counter, packets, bytes) in listed {
            match out
                .iter_mut()
                .find(|d| d.reason == reason && d.counter == counter)
            {
                Some(d) => {
                    d.packets += packets;
                    d.bytes += bytes;
                }
                None => out.push(DropCount {
                    reason,
                    counter,
                    packets,
                    bytes,
                }),
            }
        }
    }
    out
}

/// This host's peers and local policies from the agent's status, in the model's terms.
pub fn links_of(status: &AgentStatus) -> (Vec<PeerLink>, Vec<LocalPolicies>) {
    let peers = status
        .networks
        .iter()
        .flat_map(|n| {
            n.peers.iter().map(|p| PeerLink {
                network: n.name.clone(),
                host: p.host.clone(),
                backend: p.backend.clone(),
                state: if p.backend.is_some() && p.errors.is_empty() {
                    "up".into()
                } else {
                    "down".into()
                },
                reason: p.reason.clone(),
                errors: p.errors.clone(),
            })
        })
        .collect();
    let local = status
        .policy
        .local
        .iter()
        .map(|l| LocalPolicies {
            id: l.id.clone(),
            ingress: l.ingress.clone(),
            egress: l.egress.clone(),
        })
        .collect();
    (peers, local)
}

fn topology_json(web: &Web) -> String {
    let status = web.status();
    let (peers, local) = links_of(&status);
    let doc = topology::document(&web.view(), web.ctl.host(), &peers, &local);
    serde_json::to_string(&doc).unwrap_or_else(|e| format!("{{\"error\":{:?}}}", e.to_string()))
}

/// Longest `src` or `dst` a trace request may carry (a name, an address and a port).
const MAX_TRACE_WORD: usize = 300;

/// The `src` and `dst` of a `/api/trace` query string, percent-decoded; None when either is
/// missing, empty, too long or not UTF-8.
pub fn trace_query(query: &str) -> Option<(String, String)> {
    let mut src = None;
    let mut dst = None;
    for pair in query.split('&') {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        let v = percent_decode(v)?;
        if v.is_empty() || v.len() > MAX_TRACE_WORD {
            return None;
        }
        match k {
            "src" => src = Some(v),
            "dst" => dst = Some(v),
            _ => {}
        }
    }
    Some((src?, dst?))
}

/// `%XX` and `+` decoded (a form's encoding); None on a bad escape or bytes that are not UTF-8.
fn percent_decode(s: &str) -> Option<String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'%' => {
                let hex = s.get(i + 1..i + 3)?;
                out.push(u8::from_str_radix(hex, 16).ok()?);
                i += 3;
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            c => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8(out).ok()
}

/// `/api/trace?src=…&dst=…`: the hop-by-hop trace `ferrynet trace --json` prints (without
/// `--live`: the page never injects packets).
async fn trace(web: &Web, query: &str) -> Response<Body> {
    let Some((src, dst)) = trace_query(query) else {
        return full(
            StatusCode::BAD_REQUEST,
            "application/json",
            "{\"error\":\"give src and dst (each 1-300 characters)\"}",
        );
    };
    let req = TraceRequest {
        src: &src,
        dst: &dst,
        ipv6: false,
        spoof: None,
    };
    match web.ctl.trace(&req).await {
        Ok((t, _, _)) => {
            let body = serde_json::json!({ "host": web.ctl.host(), "trace": t });
            full(StatusCode::OK, "application/json", body.to_string())
        }
        Err(e) => {
            let code = match e {
                ControlError::Trace(_) => StatusCode::BAD_REQUEST,
                _ => StatusCode::SERVICE_UNAVAILABLE,
            };
            let body = serde_json::json!({ "error": e.to_string() });
            full(code, "application/json", body.to_string())
        }
    }
}

async fn healthz(web: &Web) -> Response<Body> {
    let store = match tokio::time::timeout(STORE_PROBE, web.ctl.store_revision()).await {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err(format!("no answer within {} s", STORE_PROBE.as_secs_f64())),
    };
    let status = web.status();
    let (ok, doc) = health_verdict(store, &status);
    let code = if ok {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    full(code, "application/json", doc.to_string())
}

/// Healthy: the store answers now, and the last reconcile ran without error.
pub fn health_verdict(
    store: Result<(), String>,
    status: &AgentStatus,
) -> (bool, serde_json::Value) {
    let reconcile_ok = status.reconciles > 0 && status.errors.is_empty() && status.store_ok;
    let ok = store.is_ok() && reconcile_ok;
    let doc = serde_json::json!({
        "ok": ok,
        "store": match &store { Ok(()) => "ok".to_string(), Err(e) => e.clone() },
        "reconciles": status.reconciles,
        "reconcileErrors": status.errors,
        "lastReconcileOk": reconcile_ok,
    });
    (ok, doc)
}

/// What changes in the status shows on the page (peers, their backends and states).
fn status_digest(s: &AgentStatus) -> String {
    let (peers, _) = links_of(s);
    serde_json::to_string(&peers).unwrap_or_default()
}

fn events(web: &Arc<Web>) -> Response<Body> {
    let Ok(permit) = web.streams.clone().try_acquire_owned() else {
        return full(
            StatusCode::SERVICE_UNAVAILABLE,
            "text/plain",
            "too many event streams\n",
        );
    };
    struct State {
        web: Arc<Web>,
        rx: watch::Receiver<u64>,
        digest: String,
        first: bool,
        last_sent: Instant,
        _permit: tokio::sync::OwnedSemaphorePermit,
    }
    let st = State {
        web: web.clone(),
        rx: web.version.subscribe(),
        digest: status_digest(&web.status()),
        first: true,
        last_sent: Instant::now(),
        _permit: permit,
    };
    let stream = futures::stream::unfold(st, |mut st| async move {
        if st.first {
            st.first = false;
            st.rx.mark_unchanged();
            let v = *st.rx.borrow();
            return Some((Ok(Frame::data(sse("change", v))), st));
        }
        let mut keepalive = tokio::time::interval(Duration::from_secs(15));
        keepalive.tick().await;
        let mut poll = tokio::time::interval(Duration::from_millis(500));
        loop {
            tokio::select! {
                r = st.rx.changed() => {
                    if r.is_err() {
                        return None;
                    }
                    break;
                }
                _ = poll.tick() => {
                    let d = status_digest(&st.web.status());
                    if d != st.digest {
                        st.digest = d;
                        break;
                    }
                }
                _ = keepalive.tick() => {
                    return Some((Ok(Frame::data(Bytes::from_static(b": keepalive\n\n"))), st));
                }
            }
        }
        // Coalesce a burst: one event per EVENT_COALESCE at most.
        let since = st.last_sent.elapsed();
        if since < EVENT_COALESCE {
            tokio::time::sleep(EVENT_COALESCE - since).await;
        }
        st.rx.mark_unchanged();
        st.last_sent = Instant::now();
        let v = *st.rx.borrow();
        Some((Ok::<_, Infallible>(Frame::data(sse("change", v))), st))
    });
    let mut r = Response::new(BodyExt::boxed_unsync(StreamBody::new(stream)));
    let h = r.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("text/event-stream"),
    );
    h.insert(
        header::CACHE_CONTROL,
        header::HeaderValue::from_static("no-store"),
    );
    r
}

fn sse(event: &str, version: u64) -> Bytes {
    Bytes::from(format!("event: {event}\ndata: {version}\n\n"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trace_queries_are_decoded_and_bounded() {
        assert_eq!(
            trace_query("src=blue%2Fweb&dst=db%3A5432%2Ftcp"),
            Some(("blue/web".into(), "db:5432/tcp".into()))
        );
        assert_eq!(
            trace_query("dst=%5Bfd20%3A%3A5%5D%3A80&src=c1&x=1"),
            Some(("c1".into(), "[fd20::5]:80".into()))
        );
        assert_eq!(trace_query("src=c1"), None);
        assert_eq!(trace_query("src=&dst=c2"), None);
        assert_eq!(trace_query("src=c1&dst=%zz"), None);
        assert_eq!(trace_query("src=c1&dst=%ff%fe"), None, "not UTF-8");
        assert_eq!(trace_query("src=c1&dst=%4"), None, "cut escape");
        let long = "a".repeat(MAX_TRACE_WORD + 1);
        assert_eq!(trace_query(&format!("src=c1&dst={long}")), None);
    }

    #[test]
    fn http_flag_values() {
        assert_eq!(parse_addrs(&["none".into()]).unwrap(), vec![]);
        assert_eq!(
            parse_addrs(&["127.0.0.1:9470".into(), "[::1]:9470".into()]).unwrap(),
            vec![
                "127.0.0.1:9470".parse().unwrap(),
                "[::1]:9470".parse().unwrap()
            ]
        );
        assert!(parse_addrs(&["none".into(), "127.0.0.1:1".into()]).is_err());
        assert!(parse_addrs(&["localhost:9470".into()]).is_err());
        assert!(parse_addrs(&["127.0.0.1".into()]).is_err());
    }

    #[test]
    fn health_needs_store_and_a_clean_reconcile() {
        let mut s = AgentStatus {
            store_ok: true,
            reconciles: 3,
            ..Default::default()
        };
        assert!(health_verdict(Ok(()), &s).0);
        assert!(!health_verdict(Err("down".into()), &s).0);
        s.errors = vec!["route to h2: unreachable".into()];
        let (ok, doc) = health_verdict(Ok(()), &s);
        assert!(!ok);
        assert_eq!(doc["reconcileErrors"][0], "route to h2: unreachable");
        s.errors.clear();
        s.reconciles = 0;
        assert!(
            !health_verdict(Ok(()), &s).0,
            "healthy before the first reconcile"
        );
    }

    #[test]
    fn the_page_is_self_contained() {
        // No external resource: everything is inline (the CSP allows nothing else anyway).
        for needle in ["src=\"http", "href=\"http", "//cdn", "@import", "src=\"//"] {
            assert!(!PAGE.contains(needle), "{needle}");
        }
        // Data reaches the DOM as text, never as markup.
        assert!(!PAGE.contains("innerHTML") && !PAGE.contains("outerHTML"));
        assert!(!PAGE.contains("insertAdjacentHTML") && !PAGE.contains("document.write"));
        assert!(!PAGE.contains("eval("));
        assert_eq!(PAGE.matches("<script>").count(), 1);
        assert!(CSP.contains("script-src 'sha256-"));
    }
}
