//! The agent's Prometheus metrics: instruments the agent's loops update as they run (reconcile,
//! store watch, nft batches, DNS, health checks), and gauges derived at scrape time from the
//! followed topology, the agent's status and the kernel's drop counters.
//!
//! Names follow Prometheus conventions: `ferrynet_` prefix, base units in the name
//! (`_seconds`, `_bytes`), counters end in `_total` (the encoder appends it).

use std::collections::BTreeMap;
use std::sync::LazyLock;
use std::time::Duration;

use ferrynet_model::discovery::DiscoveryView;
use ferrynet_model::topology;
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::{Registry, Unit};

use super::status::AgentStatus;

type Labels = Vec<(&'static str, String)>;

/// Where the counters the agent updates live (one set per process).
pub struct Instruments {
    reconcile_runs: Counter,
    reconcile_errors: Counter,
    reconcile_duration: Histogram,
    watch_lag: Histogram,
    nft_batches: Family<Labels, Counter>,
    nft_duration: Histogram,
    dns_queries: Family<Labels, Counter>,
    dns_duration: Family<Labels, Histogram>,
    health_checks: Family<Labels, Counter>,
    /// Per DNS result, made once so the query path does no label lookup.
    dns_by_result: Vec<(DnsResult, Counter, Histogram)>,
}

/// How a DNS query ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DnsResult {
    /// Answered from the cluster's zone.
    Answered,
    /// Forwarded and the upstream's answer relayed.
    Forwarded,
    /// SERVFAIL: no upstream answered, or the forward limits were reached.
    Servfail,
    /// REFUSED: the client may not ask this gateway.
    Refused,
    /// Not answered (malformed, a response, forged source).
    Dropped,
}

impl DnsResult {
    const ALL: [DnsResult; 5] = [
        DnsResult::Answered,
        DnsResult::Forwarded,
        DnsResult::Servfail,
        DnsResult::Refused,
        DnsResult::Dropped,
    ];

    /// The `result` label.
    pub fn as_str(self) -> &'static str {
        match self {
            DnsResult::Answered => "answered",
            DnsResult::Forwarded => "forwarded",
            DnsResult::Servfail => "servfail",
            DnsResult::Refused => "refused",
            DnsResult::Dropped => "dropped",
        }
    }
}

fn seconds_buckets() -> impl Iterator<Item = f64> {
    // 100 µs .. ~13 s.
    exponential_buckets(0.0001, 2.0, 18)
}

fn new_histogram() -> Histogram {
    Histogram::new(seconds_buckets())
}

impl Instruments {
    fn new() -> Instruments {
        let dns_queries: Family<Labels, Counter> = Family::default();
        let dns_duration: Family<Labels, Histogram> =
            Family::new_with_constructor(new_histogram as fn() -> Histogram);
        let dns_by_result = DnsResult::ALL
            .iter()
            .map(|r| {
                let l = vec![("result", r.as_str().to_string())];
                (
                    *r,
                    dns_queries.get_or_create_owned(&l),
                    dns_duration.get_or_create_owned(&l),
                )
            })
            .collect();
        Instruments {
            reconcile_runs: Counter::default(),
            reconcile_errors: Counter::default(),
            reconcile_duration: new_histogram(),
            watch_lag: new_histogram(),
            nft_batches: Family::default(),
            nft_duration: new_histogram(),
            dns_queries,
            dns_duration,
            health_checks: Family::default(),
            dns_by_result,
        }
    }

    /// A reconcile finished after `took`, with `errors` errors.
    pub fn reconciled(&self, took: Duration, errors: usize) {
        self.reconcile_runs.inc();
        self.reconcile_errors.inc_by(errors as u64);
        self.reconcile_duration.observe(took.as_secs_f64());
    }

    /// Store events took `lag` from their arrival to the end of the reconcile applying them.
    pub fn watch_lag(&self, lag: Duration) {
        self.watch_lag.observe(lag.as_secs_f64());
    }

    /// An nft batch ran for `took`; `ok` false when the kernel refused it.
    pub fn nft_batch(&self, took: Duration, ok: bool) {
        let result = if ok { "ok" } else { "failed" };
        self.nft_batches
            .get_or_create(&vec![("result", result.to_string())])
            .inc();
        self.nft_duration.observe(took.as_secs_f64());
    }

    /// A DNS query ended with `result` after `took`.
    pub fn dns(&self, result: DnsResult, took: Duration) {
        if let Some((_, c, h)) = self.dns_by_result.iter().find(|(r, _, _)| *r == result) {
            c.inc();
            h.observe(took.as_secs_f64());
        }
    }

    /// A health check of `service` ran and passed (`ok`) or failed.
    pub fn health_check(&self, service: &str, ok: bool) {
        let result = if ok { "pass" } else { "fail" };
        self.health_checks
            .get_or_create(&esc(vec![
                ("service", service.to_string()),
                ("result", result.to_string()),
            ]))
            .inc();
    }
}

static INSTRUMENTS: LazyLock<Instruments> = LazyLock::new(Instruments::new);

/// The process's instruments.
pub fn instruments() -> &'static Instruments {
    &INSTRUMENTS
}

/// Packets and bytes one named nft counter dropped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DropCount {
    /// `isolation`, `spoofing` or `policy`.
    pub reason: &'static str,
    /// The nft counter's name (`ip4_spoof`, `policy_deny`, …).
    pub counter: String,
    /// Packets.
    pub packets: u64,
    /// Bytes.
    pub bytes: u64,
}

fn gauge_family() -> Family<Labels, Gauge> {
    Family::default()
}

/// Label values escaped as the text format wants (`\\`, `\"`, `\n`): prometheus-client
/// writes them as given, and a value from the store (a host name, a network) must not end the
/// label or the line.
fn esc(labels: Labels) -> Labels {
    labels
        .into_iter()
        .map(|(k, v)| {
            let v = v
                .replace('\\', "\\\\")
                .replace('"', "\\\"")
                .replace('\n', "\\n");
            (k, v)
        })
        .collect()
}

fn set(f: &Family<Labels, Gauge>, labels: Labels, v: u64) {
    f.get_or_create(&esc(labels))
        .set(i64::try_from(v).unwrap_or(i64::MAX));
}

/// The gauges derived from the followed topology alone, as text without the closing `# EOF`.
/// They change only when the store does, so the listener keeps this text per view version and a
/// scrape at 100,000 endpoints does not encode them again.
pub fn render_topology(host: &str, view: &DiscoveryView) -> String {
    let mut reg = Registry::with_prefix("ferrynet");
    let endpoints = gauge_family();
    for ((net, h), n) in topology::endpoints_by_network_host(view, host) {
        set(&endpoints, vec![("network", net), ("host", h)], n);
    }
    reg.register("endpoints", "Endpoints per network and host", endpoints);
    let hosts = Gauge::<i64>::default();
    hosts.set(view.live_hosts.len() as i64);
    reg.register("hosts", "Live hosts", hosts);
    let free = gauge_family();
    let capacity = gauge_family();
    for b in topology::block_usage(view) {
        let l = vec![
            ("network", b.network.clone()),
            ("block", b.block.to_string()),
            ("host", b.host.clone()),
        ];
        set(&free, l.clone(), b.free);
        set(&capacity, l, b.capacity);
    }
    reg.register(
        "block_free_addresses",
        "Addresses of a block not held by an endpoint",
        free,
    );
    reg.register(
        "block_addresses",
        "Addresses of a block a container can get",
        capacity,
    );
    let producers = gauge_family();
    let healthy = gauge_family();
    for (svc, (all, ok)) in topology::producers_by_service(view) {
        set(&producers, vec![("service", svc.clone())], all);
        set(&healthy, vec![("service", svc)], ok);
    }
    reg.register("service_producers", "Producers per service", producers);
    reg.register(
        "service_producers_healthy",
        "Healthy producers per service",
        healthy,
    );
    let rejected = Gauge::<i64>::default();
    rejected.set(view.rejected.len() as i64);
    reg.register(
        "store_records_rejected",
        "Store records refused as invalid",
        rejected,
    );
    let mut out = encoded(&reg);
    if out.ends_with(EOF) {
        out.truncate(out.len() - EOF.len());
    }
    out
}

/// The text format's last line.
const EOF: &str = "# EOF\n";

fn encoded(reg: &Registry) -> String {
    let mut out = String::new();
    if let Err(e) = encode(&mut out, reg) {
        tracing::warn!(error = %e, "encoding metrics");
    }
    out
}

/// The metrics document from the topology's text (`render_topology`) and the instruments,
/// status and drop counters as they are now.
pub fn render_with(
    ins: &Instruments,
    topology_text: &str,
    status: &AgentStatus,
    drops: &[DropCount],
) -> String {
    let mut reg = Registry::with_prefix("ferrynet");
    register_instruments(&mut reg, ins, status);
    register_drops(&mut reg, drops);
    register_peers(&mut reg, status);
    if let Some(b) = &status.bgp {
        register_bgp(&mut reg, b);
    }
    if let Some(s) = &status.sleeve {
        register_sleeve(&mut reg, s);
    }
    let mut out = String::with_capacity(topology_text.len() + 16 * 1024);
    out.push_str(topology_text);
    out.push_str(&encoded(&reg));
    out
}

/// The counters and histograms the agent's loops update, and the store and reconcile state.
fn register_instruments(reg: &mut Registry, ins: &Instruments, status: &AgentStatus) {
    reg.register(
        "reconcile_runs",
        "Reconciles run",
        ins.reconcile_runs.clone(),
    );
    reg.register(
        "reconcile_errors",
        "Errors met by reconciles",
        ins.reconcile_errors.clone(),
    );
    reg.register_with_unit(
        "reconcile_duration",
        "Time a reconcile took",
        Unit::Seconds,
        ins.reconcile_duration.clone(),
    );
    let last_ok = Gauge::<i64>::default();
    last_ok.set(i64::from(status.errors.is_empty() && status.reconciles > 0));
    reg.register(
        "reconcile_last_ok",
        "1 when the last reconcile had no error",
        last_ok,
    );
    reg.register_with_unit(
        "store_watch_lag",
        "Time from a store event's arrival to the end of the reconcile applying it",
        Unit::Seconds,
        ins.watch_lag.clone(),
    );
    let store_up = Gauge::<i64>::default();
    store_up.set(i64::from(status.store_ok));
    reg.register("store_up", "1 while the store is reachable", store_up);
    reg.register(
        "nft_batches",
        "nftables batches applied, by result",
        ins.nft_batches.clone(),
    );
    reg.register_with_unit(
        "nft_batch_duration",
        "Time an nftables batch took",
        Unit::Seconds,
        ins.nft_duration.clone(),
    );
    reg.register(
        "dns_queries",
        "DNS queries by result (answered, forwarded, servfail, refused, dropped)",
        ins.dns_queries.clone(),
    );
    reg.register_with_unit(
        "dns_query_duration",
        "Time to answer a DNS query, by result",
        Unit::Seconds,
        ins.dns_duration.clone(),
    );
    reg.register(
        "health_checks",
        "Health checks run, by service and result",
        ins.health_checks.clone(),
    );
}

/// The kernel's drop counters, by reason.
fn register_drops(reg: &mut Registry, drops: &[DropCount]) {
    let dropped_packets: Family<Labels, Counter> = Family::default();
    let dropped_bytes: Family<Labels, Counter> = Family::default();
    for d in drops {
        let l = esc(vec![
            ("reason", d.reason.to_string()),
            ("counter", d.counter.clone()),
        ]);
        dropped_packets.get_or_create(&l).inc_by(d.packets);
        dropped_bytes.get_or_create(&l).inc_by(d.bytes);
    }
    reg.register(
        "dropped_packets",
        "Packets dropped by reason (isolation, spoofing, policy), from nftables counters",
        dropped_packets,
    );
    reg.register_with_unit(
        "dropped",
        "Bytes dropped by reason, from nftables counters",
        Unit::Bytes,
        dropped_bytes,
    );
}

/// This host's peers per network, backend and state.
fn register_peers(reg: &mut Registry, status: &AgentStatus) {
    let peers = gauge_family();
    for n in &status.networks {
        let mut by: BTreeMap<(String, &str), u64> = BTreeMap::new();
        for p in &n.peers {
            let backend = p.backend.clone().unwrap_or_else(|| "none".into());
            let state = if p.backend.is_some() && p.errors.is_empty() {
                "up"
            } else {
                "down"
            };
            *by.entry((backend, state)).or_default() += 1;
        }
        for ((backend, state), c) in by {
            set(
                &peers,
                vec![
                    ("network", n.name.clone()),
                    ("backend", backend),
                    ("state", state.to_string()),
                ],
                c,
            );
        }
    }
    reg.register(
        "peers",
        "This host's peers per network, backend and state",
        peers,
    );
}

/// The BGP speaker's sessions and prefixes.
fn register_bgp(reg: &mut Registry, b: &super::bgp::BgpStatus) {
    let sessions = gauge_family();
    let mut by: BTreeMap<String, u64> = BTreeMap::new();
    for p in &b.peers {
        *by.entry(p.state.clone()).or_default() += 1;
    }
    for (state, c) in by {
        set(&sessions, vec![("state", state)], c);
    }
    reg.register("bgp_sessions", "BGP sessions by state", sessions);
    let exported = Gauge::<i64>::default();
    exported.set(b.exported.len() as i64);
    reg.register("bgp_prefixes_exported", "Prefixes announced", exported);
    let received = gauge_family();
    for p in &b.peers {
        set(
            &received,
            vec![("peer", p.name.clone())],
            p.prefixes_in as u64,
        );
    }
    reg.register(
        "bgp_prefixes_received",
        "Prefixes received per peer",
        received,
    );
    let installed = Gauge::<i64>::default();
    installed.set(b.routes_installed as i64);
    reg.register(
        "bgp_routes_installed",
        "BGP routes in the kernel",
        installed,
    );
}

/// The sleeve's peers and traffic.
fn register_sleeve(reg: &mut Registry, s: &ferrynet_sleeve::SleeveReport) {
    let peers = Gauge::<i64>::default();
    peers.set(s.peers.len() as i64);
    reg.register("sleeve_peers", "Sleeve peers", peers);
    let tx: Family<Labels, Counter> = Family::default();
    let rx: Family<Labels, Counter> = Family::default();
    for p in &s.peers {
        let l = esc(vec![("peer", p.host.clone())]);
        tx.get_or_create(&l).inc_by(p.tx_bytes);
        rx.get_or_create(&l).inc_by(p.rx_bytes);
    }
    reg.register_with_unit(
        "sleeve_transmitted",
        "Bytes sent to each sleeve peer",
        Unit::Bytes,
        tx,
    );
    reg.register_with_unit(
        "sleeve_received",
        "Bytes received from each sleeve peer",
        Unit::Bytes,
        rx,
    );
    let dropped: Family<Labels, Counter> = Family::default();
    for (reason, n) in &s.dropped {
        dropped
            .get_or_create(&esc(vec![("reason", reason.clone())]))
            .inc_by(*n);
    }
    reg.register(
        "sleeve_dropped_packets",
        "Packets the sleeve dropped, by reason",
        dropped,
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferrynet_model::network::{keys, Endpoint};
    use ferrynet_model::topology::is_metric_name;

    fn sample() -> String {
        let mut t = DiscoveryView::default();
        let mut e = Endpoint::new("fabric", "c1", "eth0");
        e.ips = vec!["10.1.0.2/16".parse().unwrap()];
        t.put(
            &keys::endpoint("fabric", "c1", "eth0"),
            &serde_json::to_vec(&e).unwrap(),
        );
        let ins = Instruments::new();
        ins.reconciled(Duration::from_millis(3), 1);
        ins.dns(DnsResult::Answered, Duration::from_micros(50));
        ins.nft_batch(Duration::from_millis(1), false);
        ins.health_check("web", true);
        let drops = vec![DropCount {
            reason: "spoofing",
            counter: "ip4_spoof".into(),
            packets: 3,
            bytes: 180,
        }];
        // The endpoint has no host: it counts under this host's name, which carries a quote
        // and a newline here to prove the encoder escapes label values.
        render_with(
            &ins,
            &render_topology("h\"1\n", &t),
            &AgentStatus::default(),
            &drops,
        )
    }

    #[test]
    fn names_follow_conventions() {
        let text = sample();
        let mut seen = 0;
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                let mut it = rest.split(' ');
                let (name, ty) = (it.next().unwrap(), it.next().unwrap());
                assert!(is_metric_name(name), "{name}");
                assert!(name.starts_with("ferrynet_"), "{name}");
                seen += 1;
                // Units go in names: anything timed is in seconds.
                assert!(!name.contains("_ms") && !name.contains("millis"), "{name}");
                if ty == "counter" {
                    assert!(
                        text.contains(&format!("\n{name}_total")),
                        "counter {name} has no _total sample"
                    );
                }
            }
        }
        assert!(seen >= 15, "{text}");
        assert!(text.contains("ferrynet_reconcile_runs_total 1"), "{text}");
        assert!(text.contains("ferrynet_reconcile_errors_total 1"));
        assert!(text.contains("ferrynet_reconcile_duration_seconds_bucket"));
        assert!(text.contains("ferrynet_dns_queries_total{result=\"answered\"} 1"));
        assert!(text.contains("ferrynet_nft_batches_total{result=\"failed\"} 1"));
        assert!(text.contains("ferrynet_health_checks_total{service=\"web\",result=\"pass\"} 1"));
        assert!(text.contains(
            "ferrynet_dropped_packets_total{reason=\"spoofing\",counter=\"ip4_spoof\"} 3"
        ));
        assert!(text.contains("ferrynet_dropped_bytes_total{"));
        assert!(text.ends_with("# EOF\n"));
    }

    #[test]
    fn label_values_are_escaped() {
        // A host name with a quote and a newline must not end the label or the line.
        let text = sample();
        let line = text
            .lines()
            .find(|l| l.starts_with("ferrynet_endpoints{"))
            .expect("endpoints sample");
        assert!(line.contains(r#"host="h\"1\n""#), "{line}");
        assert!(line.ends_with(" 1"), "{line}");
    }
}
