//! The etcd v3 backend: the [`Store`] trait mapped one to one onto etcd's KV, Watch and Lease APIs.
//!
//! Revisions are etcd's own (i64 there, u64 here). Every request runs under the configured
//! timeout, because tonic's balancing channel waits for a ready endpoint instead of failing:
//! without a deadline a dead etcd would hang a CNI call. When a request is slow, the endpoints
//! are probed with a plain TCP connect, so a refused connection fails at once (naming the
//! endpoint and the reason) and a real timeout can say whether anything was listening.
//!
//! An [`Unavailable`](StoreError::Unavailable) from a write means its outcome is unknown (the
//! request may have been applied just before the connection broke), as with any etcd client.

use std::collections::VecDeque;
use std::future::Future;
use std::time::Duration;

use async_trait::async_trait;
use etcd_client::{
    Certificate, Client, CompareOp, ConnectOptions, DeleteOptions, EventType, GetOptions, Identity,
    KvClient, LeaseClient, PutOptions, TlsOptions, Txn, TxnOp, WatchClient, WatchOptions,
};
use futures::stream::BoxStream;
use futures::StreamExt;
use tokio::time::Instant;
use tonic::Code;

use crate::config::{EtcdConfig, Password, ETCD_PASSWORD_ENV};
use crate::{
    Compare, EventKind, KeyValue, LeaseId, Op, Result, Revision, Store, StoreError, TxnResult,
    WatchEvent,
};

/// A request still pending after this long makes us probe the endpoints (usually it is < 5 ms).
const PROBE_AFTER: Duration = Duration::from_millis(250);
/// How long one TCP probe of one endpoint may take.
const PROBE_TIMEOUT: Duration = Duration::from_millis(500);
/// HTTP/2 ping interval: finds a silently dead connection under an idle watch.
const KEEP_ALIVE_INTERVAL: Duration = Duration::from_secs(10);
/// Largest response accepted (gRPC's default of 4 MiB is small for a cluster-wide range).
const MAX_MESSAGE: usize = 64 * 1024 * 1024;
/// Keys per range request by default; larger ranges are read in pages at one revision.
pub const DEFAULT_RANGE_PAGE: u32 = 10_000;
/// Backoff bounds for re-creating a broken watch.
const WATCH_RETRY_MIN: Duration = Duration::from_millis(200);
const WATCH_RETRY_MAX: Duration = Duration::from_secs(5);

/// A [`Store`] on an etcd v3 cluster; cheap to clone (clones share one connection).
///
/// Bound to the tokio runtime it was created on (the gRPC channel runs a task there).
#[derive(Clone)]
pub struct EtcdStore {
    kv: KvClient,
    watch: WatchClient,
    lease: LeaseClient,
    endpoints: Vec<String>,
    /// The endpoints as shown in error messages.
    shown: String,
    timeout: Duration,
    range_page: u32,
}

impl std::fmt::Debug for EtcdStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EtcdStore")
            .field("endpoints", &self.endpoints)
            .field("timeout", &self.timeout)
            .finish()
    }
}

/// What an etcd call returns before we translate its error.
type EtcdResult<T> = std::result::Result<T, etcd_client::Error>;

/// What the TCP probe of the endpoints found.
struct Probe {
    /// No endpoint accepted a TCP connection.
    all_failed: bool,
    /// Per endpoint, for people.
    text: String,
}

/// The password `user` logs in with: from the config, else its password file (one line).
fn login_password(cfg: &EtcdConfig, user: &str) -> Result<Password> {
    if let Some(p) = &cfg.password {
        return Ok(p.clone());
    }
    let Some(path) = &cfg.password_file else {
        return Err(StoreError::Io(format!(
            "etcd user {user} has no password: give password-file= in the store URL or set {ETCD_PASSWORD_ENV}"
        )));
    };
    let text = std::fs::read_to_string(path).map_err(|e| {
        StoreError::Io(format!(
            "reading the etcd password file {}: {e}",
            path.display()
        ))
    })?;
    let line = text.lines().next().unwrap_or("");
    if line.is_empty() {
        return Err(StoreError::Io(format!(
            "the etcd password file {} is empty",
            path.display()
        )));
    }
    Ok(Password::new(line))
}

/// Whether etcd refused a login (as opposed to being unreachable).
fn is_auth_refusal(chain: &str) -> bool {
    chain.contains("authentication failed") || chain.contains("invalid user ID or password")
}

impl EtcdStore {
    /// A client for `cfg` (validated first). TLS files are read now, so a missing or bad
    /// certificate fails here; the network is not touched until the first operation.
    pub async fn connect(cfg: &EtcdConfig) -> Result<EtcdStore> {
        cfg.validate()
            .map_err(|e| StoreError::Io(format!("invalid etcd configuration: {e}")))?;
        let shown = cfg.endpoints.join(",");
        let mut opts = ConnectOptions::new()
            .with_connect_timeout(cfg.timeout)
            .with_keep_alive(KEEP_ALIVE_INTERVAL, cfg.timeout)
            .with_keep_alive_while_idle(true)
            // A member cut off from its leader answers "no leader" at once instead of
            // serving (or stalling) until the timeout; watches on it are cancelled.
            .with_require_leader(true);
        if let Some(user) = &cfg.user {
            opts = opts.with_user(user.clone(), login_password(cfg, user)?.expose());
        }
        let scheme = if cfg.tls {
            opts = opts.with_tls(tls_options(cfg)?);
            "https"
        } else {
            "http"
        };
        let urls: Vec<String> = cfg
            .endpoints
            .iter()
            .map(|ep| format!("{scheme}://{ep}"))
            .collect();
        let client = match tokio::time::timeout(cfg.timeout, Client::connect(urls, Some(opts)))
            .await
        {
            Ok(Ok(c)) => c,
            Ok(Err(e)) => {
                let chain = error_chain(&e);
                if let Some(user) = cfg.user.as_deref().filter(|_| is_auth_refusal(&chain)) {
                    return Err(StoreError::Io(format!(
                            "etcd at {shown}: user {user} could not log in (wrong user name or password?): {chain}"
                        )));
                }
                return Err(StoreError::Io(format!(
                    "etcd at {shown}: setting up the client: {chain}"
                )));
            }
            Err(_) => {
                return Err(StoreError::Unavailable(format!(
                    "etcd at {shown}: setting up the client took more than {:?}",
                    cfg.timeout
                )))
            }
        };
        Ok(EtcdStore {
            kv: client
                .kv_client()
                .max_decoding_message_size(MAX_MESSAGE)
                .max_encoding_message_size(MAX_MESSAGE),
            watch: client.watch_client().max_decoding_message_size(MAX_MESSAGE),
            lease: client.lease_client(),
            endpoints: cfg.endpoints.clone(),
            shown,
            timeout: cfg.timeout,
            range_page: DEFAULT_RANGE_PAGE,
        })
    }

    /// The same store reading ranges `keys` keys per request (at least 1); smaller pages keep
    /// each response small, and all pages of one range are read at the same revision.
    pub fn with_range_page(mut self, keys: u32) -> EtcdStore {
        self.range_page = keys.max(1);
        self
    }

    /// The per-request timeout.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// Run one etcd call under the timeout; probe the endpoints if it is slow.
    ///
    /// The outer error is ours (timeout, nothing listening); the inner one is etcd's, left for
    /// the caller to interpret (lease-not-found needs the lease id).
    async fn call<T>(
        &self,
        what: &str,
        fut: impl Future<Output = EtcdResult<T>>,
    ) -> Result<EtcdResult<T>> {
        let deadline = Instant::now() + self.timeout;
        tokio::pin!(fut);
        if let Ok(r) = tokio::time::timeout(PROBE_AFTER.min(self.timeout), &mut fut).await {
            return Ok(r);
        }
        let probe = self.probe();
        tokio::pin!(probe);
        let mut probed: Option<Probe> = None;
        loop {
            tokio::select! {
                r = &mut fut => return Ok(r),
                p = &mut probe, if probed.is_none() => {
                    if p.all_failed {
                        return Err(StoreError::Unavailable(format!(
                            "etcd at {}: {what}: cannot connect ({})", self.shown, p.text
                        )));
                    }
                    probed = Some(p);
                }
                _ = tokio::time::sleep_until(deadline) => {
                    let hint = match probed {
                        Some(p) => format!(
                            "; {} (overloaded, without a leader, or a TLS mismatch?)", p.text
                        ),
                        None => String::new(),
                    };
                    return Err(StoreError::Unavailable(format!(
                        "etcd at {}: {what}: no answer within {:?}{hint}",
                        self.shown, self.timeout
                    )));
                }
            }
        }
    }

    /// [`call`](Self::call) with etcd's error translated.
    async fn rpc<T>(&self, what: &str, fut: impl Future<Output = EtcdResult<T>>) -> Result<T> {
        self.call(what, fut).await?.map_err(|e| self.error(what, e))
    }

    /// TCP-connect to every endpoint at once.
    async fn probe(&self) -> Probe {
        let results = futures::future::join_all(self.endpoints.iter().map(|ep| async move {
            match tokio::time::timeout(PROBE_TIMEOUT, tokio::net::TcpStream::connect(ep.as_str()))
                .await
            {
                Ok(Ok(_)) => (ep, None),
                Ok(Err(e)) => (ep, Some(e.to_string())),
                Err(_) => (
                    ep,
                    Some(format!("TCP connect timed out after {PROBE_TIMEOUT:?}")),
                ),
            }
        }))
        .await;
        let all_failed = results.iter().all(|(_, e)| e.is_some());
        let text = results
            .iter()
            .map(|(ep, e)| match e {
                Some(e) => format!("{ep}: {e}"),
                None => format!("{ep} accepts TCP connections"),
            })
            .collect::<Vec<_>>()
            .join("; ");
        Probe { all_failed, text }
    }

    /// Translate an etcd client error into ours.
    fn error(&self, what: &str, e: etcd_client::Error) -> StoreError {
        use etcd_client::Error as E;
        let msg = |detail: String| format!("etcd at {}: {what}: {detail}", self.shown);
        match &e {
            E::GRpcStatus(s) => match s.code() {
                // Transient by etcd's own contract: no leader, leader changed, request timed out,
                // too many requests, database space exceeded (writes resume after an operator
                // frees space), or the connection broke.
                Code::Unavailable
                | Code::DeadlineExceeded
                | Code::Cancelled
                | Code::Aborted
                | Code::ResourceExhausted
                | Code::Unknown => StoreError::Unavailable(msg(status_text(s))),
                _ => StoreError::Io(msg(status_text(s))),
            },
            E::TransportError(_) | E::IoError(_) | E::WatchError(_) | E::LeaseKeepAliveError(_) => {
                StoreError::Unavailable(msg(error_chain(&e)))
            }
            _ => StoreError::Io(msg(error_chain(&e))),
        }
    }

    /// Lease not found (revoked, expired, never granted), from any lease-related call.
    fn is_lease_not_found(e: &etcd_client::Error) -> bool {
        match e {
            etcd_client::Error::GRpcStatus(s) => {
                s.code() == Code::NotFound && s.message().contains("lease not found")
            }
            // keep_alive reports a TTL of 0 (etcd's answer for an unknown lease) this way.
            etcd_client::Error::LeaseKeepAliveError(m) => m.contains("not found"),
            _ => false,
        }
    }

    /// Which lease of `ops` etcd did not find: the only one, or the first that has no TTL.
    async fn missing_lease(&self, leases: &[LeaseId]) -> Result<LeaseId> {
        if let [only] = leases {
            return Ok(*only);
        }
        for &id in leases {
            let mut lease = self.lease.clone();
            let ttl = self
                .rpc("lease time-to-live", lease.time_to_live(id, None))
                .await?;
            if ttl.ttl() < 0 {
                return Ok(id);
            }
        }
        // All exist now (one expired and was re-granted? impossible: ids are not reused).
        Ok(leases.first().copied().unwrap_or_default())
    }

    /// Open a watch stream on `prefix` from the first revision after `after`.
    async fn open_watch(&self, prefix: &str, after: Revision) -> Result<etcd_client::WatchStream> {
        // Revisions past i64::MAX cannot exist; asking for one simply waits forever.
        let start = i64::try_from(after.saturating_add(1)).unwrap_or(i64::MAX);
        let opts = WatchOptions::new().with_prefix().with_start_revision(start);
        let mut watch = self.watch.clone();
        self.rpc(&format!("watch {prefix}"), watch.watch(prefix, Some(opts)))
            .await
    }
}

fn tls_options(cfg: &EtcdConfig) -> Result<TlsOptions> {
    let read = |what: &str, p: &std::path::Path| {
        std::fs::read(p)
            .map_err(|e| StoreError::Io(format!("reading the etcd {what} {}: {e}", p.display())))
    };
    let mut tls = TlsOptions::new();
    tls = match &cfg.ca {
        Some(ca) => tls.ca_certificate(Certificate::from_pem(read("CA bundle", ca)?)),
        None => tls.with_native_roots(),
    };
    if let (Some(cert), Some(key)) = (&cfg.cert, &cfg.key) {
        tls = tls.identity(Identity::from_pem(
            read("client certificate", cert)?,
            read("client key", key)?,
        ));
    }
    Ok(tls)
}

/// A gRPC status as people read it: etcd's message, plus the transport cause if any.
fn status_text(s: &tonic::Status) -> String {
    let mut text = match s.message() {
        "" => format!("{:?}", s.code()),
        m => m.to_string(),
    };
    let mut source = std::error::Error::source(s);
    while let Some(e) = source {
        let part = e.to_string();
        if !text.contains(&part) {
            text.push_str(": ");
            text.push_str(&part);
        }
        source = e.source();
    }
    text
}

/// An error and its causes, joined (tonic's top-level messages alone say little).
fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(inner) = source {
        let part = inner.to_string();
        if !text.contains(&part) {
            text.push_str(": ");
            text.push_str(&part);
        }
        source = inner.source();
    }
    text
}

fn revision(rev: i64) -> Result<Revision> {
    Revision::try_from(rev).map_err(|_| StoreError::Corrupt(format!("negative revision {rev}")))
}

fn header_revision(header: Option<&etcd_client::ResponseHeader>) -> Result<Revision> {
    let header =
        header.ok_or_else(|| StoreError::Corrupt("etcd response without a header".into()))?;
    revision(header.revision())
}

fn key_value(kv: &etcd_client::KeyValue) -> Result<KeyValue> {
    to_key_value(
        kv.key(),
        kv.value(),
        kv.create_revision(),
        kv.mod_revision(),
        kv.lease(),
    )
}

/// etcd's key-value fields as ours: UTF-8 key, unsigned revisions, lease 0 = none.
fn to_key_value(
    key: &[u8],
    value: &[u8],
    create_revision: i64,
    mod_revision: i64,
    lease: i64,
) -> Result<KeyValue> {
    let key = std::str::from_utf8(key)
        .map_err(|_| StoreError::Corrupt(format!("key is not UTF-8: {key:?}")))?;
    Ok(KeyValue {
        key: key.to_string(),
        value: value.to_vec(),
        create_revision: revision(create_revision)?,
        mod_revision: revision(mod_revision)?,
        lease: (lease != 0).then_some(lease),
    })
}

fn compare(c: Compare) -> etcd_client::Compare {
    match c {
        // etcd reads a missing key as create_revision 0 (and mod_revision 0).
        Compare::Exists(k) => etcd_client::Compare::create_revision(k, CompareOp::Greater, 0),
        Compare::Missing(k) => etcd_client::Compare::create_revision(k, CompareOp::Equal, 0),
        Compare::ModRevision(k, rev) => match i64::try_from(rev) {
            Ok(rev) => etcd_client::Compare::mod_revision(k, CompareOp::Equal, rev),
            // No key has such a revision: a compare that never holds keeps it one txn.
            Err(_) => etcd_client::Compare::mod_revision(k, CompareOp::Less, 0),
        },
        // etcd fails a value compare on a missing key, as our contract wants.
        Compare::Value(k, v) => etcd_client::Compare::value(k, CompareOp::Equal, v),
    }
}

fn txn_op(op: Op) -> TxnOp {
    match op {
        Op::Put { key, value, lease } => {
            TxnOp::put(key, value, lease.map(|id| PutOptions::new().with_lease(id)))
        }
        Op::Delete(key) => TxnOp::delete(key, None),
        Op::DeletePrefix(prefix) => TxnOp::delete(prefix, Some(DeleteOptions::new().with_prefix())),
    }
}

/// The smallest key greater than every key starting with `key` (etcd's range end for a page).
fn after_key(key: &[u8]) -> Vec<u8> {
    let mut next = key.to_vec();
    next.push(0);
    next
}

#[async_trait]
impl Store for EtcdStore {
    fn is_shared(&self) -> bool {
        true
    }

    async fn get(&self, key: &str) -> Result<Option<KeyValue>> {
        let mut kv = self.kv.clone();
        let resp = self.rpc(&format!("get {key}"), kv.get(key, None)).await?;
        resp.kvs().first().map(key_value).transpose()
    }

    async fn range(&self, prefix: &str) -> Result<(Vec<KeyValue>, Revision)> {
        let mut out = Vec::new();
        let rev = self
            .range_pages(prefix, &mut |mut page| out.append(&mut page))
            .await?;
        Ok((out, rev))
    }

    async fn range_pages(
        &self,
        prefix: &str,
        each: &mut (dyn FnMut(Vec<KeyValue>) + Send),
    ) -> Result<Revision> {
        let what = format!("range {prefix}");
        let mut kv = self.kv.clone();
        let first = self
            .rpc(
                &what,
                kv.get(
                    prefix,
                    Some(
                        GetOptions::new()
                            .with_prefix()
                            .with_limit(i64::from(self.range_page)),
                    ),
                ),
            )
            .await?;
        let rev = first
            .header()
            .map(|h| h.revision())
            .ok_or_else(|| StoreError::Corrupt("etcd response without a header".into()))?;
        let mut page = first
            .kvs()
            .iter()
            .map(key_value)
            .collect::<Result<Vec<_>>>()?;
        let mut more = first.more();
        drop(first);
        loop {
            let last = page.last().map(|kv| after_key(kv.key.as_bytes()));
            each(std::mem::take(&mut page));
            let Some(after) = last.filter(|_| more) else {
                break;
            };
            // Next page: keys after the last one, still under the prefix, at the same revision.
            let opts = GetOptions::new()
                .with_range(prefix_end(prefix.as_bytes()))
                .with_limit(i64::from(self.range_page))
                .with_revision(rev);
            let resp = match self.call(&what, kv.get(after, Some(opts))).await? {
                Ok(resp) => resp,
                // Revision `rev` was compacted between two pages: a retry reads a newer one.
                Err(etcd_client::Error::GRpcStatus(s)) if s.code() == Code::OutOfRange => {
                    return Err(StoreError::Unavailable(format!(
                        "etcd at {}: {what}: revision {rev} was compacted while reading it \
                         in pages; retry",
                        self.shown
                    )))
                }
                Err(e) => return Err(self.error(&what, e)),
            };
            page = resp
                .kvs()
                .iter()
                .map(key_value)
                .collect::<Result<Vec<_>>>()?;
            more = resp.more();
        }
        revision(rev)
    }

    async fn txn(&self, compares: Vec<Compare>, ops: Vec<Op>) -> Result<TxnResult> {
        // etcd would refuse it with InvalidArgument; say why before the round trip.
        crate::check_txn_size(&compares, &ops)?;
        let mut leases: Vec<LeaseId> = Vec::new();
        for op in &ops {
            if let Op::Put {
                lease: Some(id), ..
            } = op
            {
                if !leases.contains(id) {
                    leases.push(*id);
                }
            }
        }
        let txn = Txn::new()
            .when(compares.into_iter().map(compare).collect::<Vec<_>>())
            .and_then(ops.into_iter().map(txn_op).collect::<Vec<_>>());
        let mut kv = self.kv.clone();
        let resp = match self.call("txn", kv.txn(txn)).await? {
            Ok(r) => r,
            Err(e) if Self::is_lease_not_found(&e) && !leases.is_empty() => {
                return Err(StoreError::LeaseNotFound(
                    self.missing_lease(&leases).await?,
                ))
            }
            Err(e) => return Err(self.error("txn", e)),
        };
        Ok(TxnResult {
            succeeded: resp.succeeded(),
            revision: header_revision(resp.header())?,
        })
    }

    async fn put(&self, key: &str, value: Vec<u8>) -> Result<Revision> {
        let mut kv = self.kv.clone();
        let resp = self
            .rpc(&format!("put {key}"), kv.put(key, value, None))
            .await?;
        header_revision(resp.header())
    }

    /// One DeleteRange (atomic), unlike the provided get-then-delete.
    async fn delete(&self, key: &str) -> Result<bool> {
        let mut kv = self.kv.clone();
        let resp = self
            .rpc(&format!("delete {key}"), kv.delete(key, None))
            .await?;
        Ok(resp.deleted() > 0)
    }

    async fn watch(
        &self,
        prefix: &str,
        after: Revision,
    ) -> Result<BoxStream<'static, Result<WatchEvent>>> {
        // Opened here, so an unreachable etcd fails the call rather than the first poll.
        let stream = self.open_watch(prefix, after).await?;
        let state = WatchState::new(self.clone(), prefix, after, stream);
        Ok(futures::stream::unfold(state, WatchState::next).boxed())
    }

    async fn grant_lease(&self, ttl: Duration) -> Result<LeaseId> {
        // etcd counts whole seconds (and may raise a TTL to its minimum); round up, at least 1.
        let secs = ttl.as_secs() + u64::from(ttl.subsec_nanos() > 0);
        let secs = i64::try_from(secs.max(1)).unwrap_or(i64::MAX);
        let mut lease = self.lease.clone();
        let resp = self.rpc("lease grant", lease.grant(secs, None)).await?;
        if !resp.error().is_empty() {
            return Err(StoreError::Io(format!(
                "etcd at {}: lease grant: {}",
                self.shown,
                resp.error()
            )));
        }
        Ok(resp.id())
    }

    async fn keep_alive(&self, id: LeaseId) -> Result<()> {
        let mut lease = self.lease.clone();
        // One request on a fresh keep-alive stream; the client turns a TTL of 0 into an error.
        match self.call("lease keep-alive", lease.keep_alive(id)).await? {
            Ok(_) => Ok(()),
            Err(e) if Self::is_lease_not_found(&e) => Err(StoreError::LeaseNotFound(id)),
            Err(e) => Err(self.error("lease keep-alive", e)),
        }
    }

    async fn revoke_lease(&self, id: LeaseId) -> Result<()> {
        let mut lease = self.lease.clone();
        match self.call("lease revoke", lease.revoke(id)).await? {
            Ok(_) => Ok(()),
            Err(e) if Self::is_lease_not_found(&e) => Err(StoreError::LeaseNotFound(id)),
            Err(e) => Err(self.error("lease revoke", e)),
        }
    }

    async fn revision(&self) -> Result<Revision> {
        // Any linearizable read carries the store revision in its header; count-only is cheapest.
        let mut kv = self.kv.clone();
        let resp = self
            .rpc(
                "revision",
                kv.get("\0", Some(GetOptions::new().with_count_only())),
            )
            .await?;
        header_revision(resp.header())
    }
}

/// The end of the range of keys starting with `prefix` (etcd's `with_prefix`).
fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    // Empty or all 0xff: every key from the start.
    vec![0]
}

/// A watcher: etcd's watch stream, re-created from the last seen revision when it breaks.
struct WatchState {
    store: EtcdStore,
    prefix: String,
    /// Every change up to this revision has been queued.
    last: Revision,
    /// The revision the current stream was opened after: nothing at or below it is new.
    opened_after: Revision,
    stream: Option<etcd_client::WatchStream>,
    /// Events and errors, in the order the consumer must see them.
    buf: VecDeque<Result<WatchEvent>>,
    /// Consecutive failures, for the reconnect backoff.
    failures: u32,
    /// No more items after `buf` (compacted history or data we cannot read).
    done: bool,
}

impl WatchState {
    fn new(
        store: EtcdStore,
        prefix: &str,
        after: Revision,
        stream: etcd_client::WatchStream,
    ) -> Self {
        WatchState {
            store,
            prefix: prefix.to_string(),
            last: after,
            opened_after: after,
            stream: Some(stream),
            buf: VecDeque::new(),
            failures: 0,
            done: false,
        }
    }

    async fn next(mut self) -> Option<(Result<WatchEvent>, WatchState)> {
        loop {
            if let Some(item) = self.buf.pop_front() {
                return Some((item, self));
            }
            if self.done {
                return None;
            }
            let Some(stream) = self.stream.as_mut() else {
                tokio::time::sleep(watch_backoff(self.failures)).await;
                match self.store.open_watch(&self.prefix, self.last).await {
                    Ok(s) => {
                        self.stream = Some(s);
                        self.opened_after = self.last;
                    }
                    Err(e) => {
                        self.failures = self.failures.saturating_add(1);
                        return Some((Err(e), self));
                    }
                }
                continue;
            };
            // No timeout here: an idle watch is silent by design; HTTP/2 keep-alive pings
            // break a dead connection, which ends up as an error below.
            match stream.message().await {
                Ok(Some(resp)) => self.absorb(&resp),
                Ok(None) => self.broken(StoreError::Unavailable(format!(
                    "etcd at {}: watch {}: etcd closed the stream",
                    self.store.shown, self.prefix
                ))),
                Err(e) => {
                    let e = self.store.error(&format!("watch {}", self.prefix), e);
                    self.broken(e);
                }
            }
        }
    }

    /// The stream failed: report it, then resume after `last` on the next poll.
    fn broken(&mut self, e: StoreError) {
        self.stream = None;
        self.failures = self.failures.saturating_add(1);
        self.buf.push_back(Err(e));
    }

    /// Queue one watch response's events (or its cancellation).
    fn absorb(&mut self, resp: &etcd_client::WatchResponse) {
        if resp.canceled() {
            if resp.compact_revision() > 0 {
                // The watcher must resync from a fresh read; continuing would skip changes.
                self.done = true;
                self.buf
                    .push_back(revision(resp.compact_revision()).and_then(|compacted| {
                        Err(StoreError::Compacted {
                            requested: self.last.saturating_add(1),
                            compacted,
                        })
                    }));
                return;
            }
            // E.g. "no leader": transient, the stream is re-created.
            self.broken(StoreError::Unavailable(format!(
                "etcd at {}: watch {}: cancelled by etcd: {}",
                self.store.shown,
                self.prefix,
                resp.cancel_reason()
            )));
            return;
        }
        self.failures = 0;
        for ev in resp.events() {
            let kv = match ev
                .kv()
                .ok_or_else(|| StoreError::Corrupt("watch event without a key".into()))
                .and_then(key_value)
            {
                Ok(kv) => kv,
                Err(e) => {
                    // Re-watching would meet the same event again: end with the error.
                    self.done = true;
                    self.buf.push_back(Err(e));
                    return;
                }
            };
            // etcd starts a re-created watch after `opened_after`; never yield a change twice.
            if kv.mod_revision <= self.opened_after {
                continue;
            }
            let kind = match ev.event_type() {
                EventType::Put => EventKind::Put,
                EventType::Delete => EventKind::Delete,
            };
            self.last = self.last.max(kv.mod_revision);
            self.buf.push_back(Ok(WatchEvent { kind, kv }));
        }
    }
}

fn watch_backoff(failures: u32) -> Duration {
    match failures {
        0 => Duration::ZERO,
        n => WATCH_RETRY_MIN
            .saturating_mul(1 << n.min(10).saturating_sub(1))
            .min(WATCH_RETRY_MAX),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefix_end_matches_etcd() {
        assert_eq!(prefix_end(b"/a/"), b"/a0");
        assert_eq!(prefix_end(b"a\xff"), b"b");
        assert_eq!(prefix_end(b"\xff\xff"), b"\0");
        assert_eq!(prefix_end(b""), b"\0");
        assert_eq!(after_key(b"/a/x"), b"/a/x\0");
    }

    #[test]
    fn watch_backoff_grows_and_caps() {
        assert_eq!(watch_backoff(0), Duration::ZERO);
        assert_eq!(watch_backoff(1), WATCH_RETRY_MIN);
        assert_eq!(watch_backoff(2), WATCH_RETRY_MIN * 2);
        assert_eq!(watch_backoff(100), WATCH_RETRY_MAX);
    }

    #[test]
    fn key_values_convert_and_reject_garbage() {
        assert_eq!(
            to_key_value(b"/k", b"v", 3, 5, 0).unwrap(),
            KeyValue {
                key: "/k".into(),
                value: b"v".to_vec(),
                create_revision: 3,
                mod_revision: 5,
                lease: None
            }
        );
        assert_eq!(to_key_value(b"/k", b"", 3, 5, 42).unwrap().lease, Some(42));
        assert!(matches!(
            to_key_value(&[0xff], b"", 1, 1, 0),
            Err(StoreError::Corrupt(_))
        ));
        assert!(matches!(
            to_key_value(b"/k", b"", -1, 1, 0),
            Err(StoreError::Corrupt(_))
        ));
    }
}
