//! This host's journal of what it recorded in a shared store (multi-host endpoints and its
//! producers), kept as one file per record under `<state-dir>/journal/`, and the re-assertion
//! that puts them back after a partition longer than the lease and grace period
//! (`model::journal` decides). Single-host networks are not journaled: nobody else releases
//! them.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::path::PathBuf;

use ferrynet_model::host::BlockClaim;
use ferrynet_model::ipam::validate_network_subnets;
use ferrynet_model::journal::{
    blocks_of, moves, plan, plan_move, renumber_needed, Move, NetworkFacts, Reassert, Renumber,
    StoreFacts,
};
use ferrynet_model::names::host_veth_name;
use ferrynet_model::network::{keys, Endpoint, Network, NetworkMode};
use ferrynet_model::service::{keys as skeys, Producer};
use ferrynet_store::{Compare, Op};
use ipnet::IpNet;
use serde::{Deserialize, Serialize};

use super::endpoint::{container_addresses, container_routes};
use super::transact::Round;
use super::{decode, encode, Control};
use crate::error::{ControlError, Result};

/// What one re-assertion did.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct ReassertReport {
    /// Endpoints put back into the store.
    pub restored: usize,
    /// Producers put back into the store.
    pub producers_restored: usize,
    /// Journal entries dropped (the container left meanwhile).
    pub forgotten: usize,
    /// What others hold now that this host's containers still use.
    pub conflicts: Vec<String>,
    /// Containers given new addresses because another host took their block.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub moved: Vec<Moved>,
}

/// A container `ferrynet run` started, moved to other addresses after a partition.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct Moved {
    /// The container.
    pub container: String,
    /// The network.
    pub network: String,
    /// Its addresses before.
    pub from: Vec<IpNet>,
    /// Its addresses now.
    pub to: Vec<IpNet>,
    /// Why: which block which host took.
    pub reason: String,
}

/// `ep`'s moved record: the new addresses, the rest as journaled.
fn moved_endpoint(ep: &Endpoint, mv: &Move) -> Endpoint {
    Endpoint {
        ips: mv.to.clone(),
        ..ep.clone()
    }
}

/// The reason a move gives in the status and the event.
fn move_reason(mv: &Move) -> String {
    mv.taken
        .iter()
        .map(|(b, h)| format!("block {b} was taken by host {h}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Producer addresses after a move: each moved address replaced by its successor.
fn moved_addrs(addrs: &[IpAddr], mv: &Move) -> Vec<IpAddr> {
    addrs
        .iter()
        .map(|a| {
            mv.from
                .iter()
                .zip(&mv.to)
                .find(|(f, _)| f.addr() == *a)
                .map_or(*a, |(_, t)| t.addr())
        })
        .collect()
}

/// One move (or its retry) at a time: the re-assertion and the reconciler both renumber.
static MOVES: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// After a container left addresses: delete this host's conntrack entries with one of them
/// at either end, so no flow of the block's new owner is matched to this container's old
/// ones (and NAT state of the old address does not linger). Logged, not returned: the move is
/// done, a stale entry costs a flow.
async fn flush_left_addresses(old: &Endpoint, new: &Endpoint) {
    let left: BTreeSet<IpAddr> = old
        .ips
        .iter()
        .map(|a| a.addr())
        .filter(|a| !new.ips.iter().any(|n| n.addr() == *a))
        .collect();
    if left.is_empty() || !ferrynet_dataplane::conntrack::flush_enabled() {
        return;
    }
    let res =
        tokio::task::spawn_blocking(move || ferrynet_dataplane::conntrack::flush_addresses(&left))
            .await
            .map_err(|e| e.to_string())
            .and_then(|r| r.map_err(|e| e.to_string()));
    match res {
        Ok(st) => tracing::info!(
            container = %new.container_id,
            deleted = st.deleted,
            "conntrack entries of a moved container's old addresses deleted"
        ),
        Err(e) => {
            tracing::warn!(error = %e, container = %new.container_id, "deleting a moved container's conntrack entries failed")
        }
    }
}

impl ReassertReport {
    /// Fold a later re-assertion into this one: counts add up (a host may re-register more
    /// than once, and a later pass that finds everything in place must not hide an earlier
    /// restore), conflicts are the later pass's (what still conflicts now).
    pub fn absorb(&mut self, later: ReassertReport) {
        self.restored += later.restored;
        self.producers_restored += later.producers_restored;
        self.forgotten += later.forgotten;
        self.conflicts = later.conflicts;
        // Moves happened: a later pass that finds nothing to do must not hide them.
        self.moved.extend(later.moved);
    }
}

fn list(ips: &[IpNet]) -> String {
    ips.iter()
        .map(|i| i.addr().to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

/// A producer's journal file name, when its names are safe as one.
fn producer_file(service: &str, id: &str) -> Option<String> {
    let safe = |s: &str| {
        !s.is_empty()
            && s.len() <= 100
            && s.chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
            && !s.starts_with('.')
    };
    (safe(service) && safe(id)).then(|| format!("{service}@{id}.json"))
}

impl Control {
    fn journal_dir(&self, kind: &str) -> PathBuf {
        self.paths().state_dir.join("journal").join(kind)
    }

    /// Write `value` as `<journal>/<kind>/<file>` (through a temporary file, so a crash
    /// leaves the old entry or the new one). Failures are logged: the journal only matters
    /// after a partition.
    fn journal_write<T: Serialize>(&self, kind: &str, file: &str, value: &T) {
        let dir = self.journal_dir(kind);
        let path = dir.join(file);
        let tmp = dir.join(format!(".{file}.tmp"));
        let res = std::fs::create_dir_all(&dir)
            .and_then(|()| std::fs::write(&tmp, encode(value)))
            .and_then(|()| std::fs::rename(&tmp, &path));
        if let Err(e) = res {
            tracing::warn!(error = %e, path = %path.display(), "writing the local journal");
        }
    }

    fn journal_remove(&self, kind: &str, file: &str) {
        let path = self.journal_dir(kind).join(file);
        match std::fs::remove_file(&path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                tracing::warn!(error = %e, path = %path.display(), "removing a journal entry")
            }
            _ => {}
        }
    }

    /// Every entry of one journal directory that decodes.
    fn journal_entries<T: serde::de::DeserializeOwned>(&self, kind: &str) -> Vec<(String, T)> {
        let Ok(dir) = std::fs::read_dir(self.journal_dir(kind)) else {
            return Vec::new();
        };
        dir.filter_map(|e| e.ok())
            .filter_map(|e| {
                let name = e.file_name().to_string_lossy().into_owned();
                if name.starts_with('.') {
                    return None;
                }
                let v = serde_json::from_slice(&std::fs::read(e.path()).ok()?).ok()?;
                Some((name, v))
            })
            .collect()
    }

    fn endpoint_file(ep: &Endpoint) -> String {
        format!(
            "{}.json",
            host_veth_name(&ep.network, &ep.container_id, &ep.ifname)
        )
    }

    /// Journal an endpoint this host recorded on a multi-host network.
    pub fn journal_endpoint(&self, ep: &Endpoint) {
        if ep.host.as_deref() == Some(self.host()) {
            self.journal_write("endpoints", &Self::endpoint_file(ep), ep);
        }
    }

    /// Drop an endpoint's journal entry (it was released).
    pub fn forget_journaled(&self, ep: &Endpoint) {
        if ep.host.as_deref() == Some(self.host()) {
            self.journal_remove("endpoints", &Self::endpoint_file(ep));
        }
    }

    /// Journal a producer this host checks.
    pub fn journal_producer(&self, p: &Producer) {
        if p.host.as_deref() == Some(self.host()) {
            if let Some(f) = producer_file(&p.service, &p.id) {
                self.journal_write("producers", &f, p);
            }
        }
    }

    /// Drop a producer's journal entry.
    pub fn forget_journaled_producer(&self, service: &str, id: &str) {
        if let Some(f) = producer_file(service, id) {
            self.journal_remove("producers", &f);
        }
    }

    /// Drop the journal entries of every producer of `service`.
    pub fn forget_journaled_service(&self, service: &str) {
        for (file, p) in self.journal_entries::<Producer>("producers") {
            if p.service == service {
                self.journal_remove("producers", &file);
            }
        }
    }

    /// Put back what this host recorded and the store lost while it was cut off: every
    /// journaled endpoint whose link is still here, and every journaled producer whose
    /// container still runs. What someone else holds now is reported, never taken.
    pub async fn reassert_local(&self) -> Result<ReassertReport> {
        let mut report = ReassertReport::default();
        // A move whose renumbering failed before is finished first (errors are logged).
        let _still = self.converge_moves().await;
        // Blocks released from this host while it was cut off and still unclaimed come back
        // first, its empty ones included, so its journaled containers find them its own.
        for net in self.networks().await? {
            if net.fabric.is_some() {
                self.reclaim_quarantined(&net).await?;
            }
        }
        let nl = self.host_links()?;
        for (file, ep) in self.journal_entries::<Endpoint>("endpoints") {
            let port = host_veth_name(&ep.network, &ep.container_id, &ep.ifname);
            let alive = nl
                .link_index(ep.host_veth.as_deref().unwrap_or(&port))
                .await
                .map_err(ControlError::dataplane("looking up a journaled link"))?
                .is_some();
            let Some((net, _)) = self.network(&ep.network).await? else {
                // The network was removed meanwhile: nothing to put back into.
                self.journal_remove("endpoints", &file);
                report.forgotten += 1;
                continue;
            };
            let blocks = net
                .fabric
                .as_ref()
                .map(|f| blocks_of(&ep, f))
                .unwrap_or_default();
            let borrow = ferrynet_model::bgp::policy::may_borrow(&net);
            match self.reassert_endpoint(&ep, alive, &blocks, borrow).await? {
                Reassert::Forget => {
                    self.journal_remove("endpoints", &file);
                    report.forgotten += 1;
                }
                Reassert::Keep => {}
                Reassert::Restore { .. } => report.restored += 1,
                Reassert::Conflict(m) => {
                    tracing::error!(conflict = %m, "cannot re-assert a container's records");
                    report.conflicts.push(m);
                }
                Reassert::Taken(m) if !moves(ep.owner) => {
                    let m = format!(
                        "{m}; the container keeps its address because its runtime recorded it: \
                         restart it to give it a new one"
                    );
                    tracing::error!(conflict = %m, "cannot re-assert a container's records");
                    report.conflicts.push(m);
                }
                Reassert::Taken(m) => match self.move_endpoint(&ep, &net).await? {
                    Err(why) => {
                        let m = format!("{m}; not moved: {why}");
                        tracing::error!(conflict = %m, "cannot re-assert a container's records");
                        report.conflicts.push(m);
                    }
                    Ok(mv) => {
                        let moved = self.finish_move(&file, &ep, &net, &mv).await;
                        tracing::warn!(
                            container = %ep.container_id,
                            network = %ep.network,
                            from = %list(&mv.from),
                            to = %list(&mv.to),
                            reason = %moved.reason,
                            "moved a container to addresses of this host: another host took its block while this host was cut off"
                        );
                        report.moved.push(moved);
                    }
                },
            }
        }
        self.reassert_producers(&mut report).await?;
        if report != ReassertReport::default() {
            tracing::info!(
                moved = report.moved.len(),
                restored = report.restored,
                producers = report.producers_restored,
                forgotten = report.forgotten,
                conflicts = report.conflicts.len(),
                "re-asserted this host's records"
            );
        }
        Ok(report)
    }

    /// Put back every journaled producer whose container still runs and whose service still
    /// exists (only where the store has none); forget those whose container is gone.
    async fn reassert_producers(&self, report: &mut ReassertReport) -> Result<()> {
        for (file, p) in self.journal_entries::<Producer>("producers") {
            let gone = p
                .netns
                .as_deref()
                .is_some_and(|n| !std::path::Path::new(n).exists());
            if gone {
                self.journal_remove("producers", &file);
                report.forgotten += 1;
                continue;
            }
            let key = skeys::producer(&p.service, &p.id);
            let res = self
                .store
                .txn(
                    vec![
                        Compare::Missing(key.clone()),
                        Compare::Exists(skeys::service(&p.service)),
                    ],
                    vec![Op::put(key, encode(&p))],
                )
                .await?;
            if res.succeeded {
                report.producers_restored += 1;
            }
        }
        Ok(())
    }

    /// Move journaled endpoint `ep` of multi-host network `pool` off the blocks other hosts
    /// took: plan from the network's claims and held addresses, and write its new record,
    /// address keys and block claims in one transaction guarded by what was read. Err (the
    /// reason) when no move is possible.
    async fn move_endpoint(
        &self,
        ep: &Endpoint,
        pool: &Network,
    ) -> Result<std::result::Result<Move, String>> {
        let Some(spec) = &pool.fabric else {
            return Ok(Err("the network is not multi-host".into()));
        };
        let ep_key = &keys::endpoint(&ep.network, &ep.container_id, &ep.ifname);
        let owner = &format!("{}/{}", ep.container_id, ep.ifname);
        let what = || format!("move {} on network {}", ep.container_id, ep.network);
        self.transact(what, || {
            Box::pin(async move {
                if self.store.get(ep_key).await?.is_some() {
                    return Ok(Round::Done(Err("its record came back meanwhile".into())));
                }
                let mut compares = vec![Compare::Missing(ep_key.clone())];
                let (kvs, _) = self.store.range(&keys::blocks(&ep.network)).await?;
                let mut claims = BTreeMap::new();
                let mut revision = BTreeMap::new();
                for kv in &kvs {
                    if let Some((_, b)) = keys::parse_block(&kv.key) {
                        let c: BlockClaim = decode(kv)?;
                        claims.insert(b, c.host);
                        revision.insert(b, kv.mod_revision);
                    }
                }
                // Blocks kept for other cut-off hosts; this host's own are its to take.
                let orphans: Vec<IpNet> = self
                    .quarantined(pool)
                    .await?
                    .into_iter()
                    .filter(|(_, q)| q.host != self.host())
                    .map(|(b, _)| b)
                    .collect();
                let held = self.held_addresses(&ep.network).await?;
                let used: BTreeSet<IpAddr> = held.keys().copied().collect();
                let facts = NetworkFacts {
                    subnets: &pool.subnets,
                    spec,
                    claims: &claims,
                    orphans: &orphans,
                    used: &used,
                };
                let mv = match plan_move(ep, self.host(), &facts) {
                    Ok(m) => m,
                    Err(why) => return Ok(Round::Done(Err(why))),
                };
                let mut ops = vec![Op::put(ep_key.clone(), encode(&moved_endpoint(ep, &mv)))];
                for a in &mv.to {
                    let k = keys::ipam(&ep.network, a.addr());
                    match held.get(&a.addr()) {
                        // A kept address someone else holds now: no move takes it over.
                        Some(o) if o != owner => {
                            return Ok(Round::Done(Err(format!(
                                "address {} is now held by {o}",
                                a.addr()
                            ))))
                        }
                        Some(o) => compares.push(Compare::Value(k.clone(), o.as_bytes().to_vec())),
                        None => compares.push(Compare::Missing(k.clone())),
                    }
                    ops.push(Op::put(k, owner.clone()));
                }
                // Its own keys of the addresses it leaves (none after a release) go.
                for a in mv.from.iter().filter(|a| !mv.to.contains(a)) {
                    let k = keys::ipam(&ep.network, a.addr());
                    if held.get(&a.addr()) == Some(owner) {
                        compares.push(Compare::Value(k.clone(), owner.as_bytes().to_vec()));
                        ops.push(Op::delete(k));
                    }
                }
                // Every block it leaves or lands in is as read: taken, this host's, or free
                // and claimed now.
                let touched: BTreeSet<IpNet> = mv
                    .from
                    .iter()
                    .chain(&mv.to)
                    .filter_map(|a| claims.keys().find(|b| b.contains(&a.addr())).copied())
                    .collect();
                for b in touched {
                    if let Some(r) = revision.get(&b) {
                        compares.push(Compare::ModRevision(keys::block(&ep.network, &b), *r));
                    }
                }
                for b in &mv.claim {
                    let k = keys::block(&ep.network, b);
                    let c = BlockClaim {
                        host: self.host().to_string(),
                    };
                    compares.push(Compare::Missing(k.clone()));
                    ops.push(Op::put(k, encode(&c)));
                    ops.push(Op::delete(keys::orphan_block(&ep.network, b)));
                }
                Ok(Round::commit(compares, ops, Ok(mv)))
            })
        })
        .await
    }

    /// After a move is recorded: the container's interface, the bridge's gateways, the port's
    /// anti-spoofing elements, published ports, the journal and the container's producers
    /// follow. A kernel step that fails is logged and named in the returned entry's reason:
    /// the store holds the new addresses and the next move or restart finishes the job.
    async fn finish_move(&self, file: &str, ep: &Endpoint, pool: &Network, mv: &Move) -> Moved {
        let _one = MOVES.lock().await;
        let moved = moved_endpoint(ep, mv);
        let mut reason = move_reason(mv);
        // Until the kernel side is done, a marker keeps what the container had: the agent's
        // next reconcile renumbers it again (`converge_moves`).
        self.journal_write("renumber", file, ep);
        self.journal_write("endpoints", file, &moved);
        match self.renumber(ep, &moved, pool).await {
            Ok(()) => self.journal_remove("renumber", file),
            Err(e) => {
                tracing::error!(error = %e, container = %ep.container_id, "renumbering a moved container; retried at the next reconcile");
                reason = format!("{reason}; renumbering its interface failed (retried): {e}");
            }
        }
        if let Err(e) = self.drop_taken_gateways(pool, mv).await {
            tracing::warn!(error = %e, network = %pool.name, "removing a taken block's gateway from the bridge");
        }
        if let Err(e) = self.move_container_record(&moved).await {
            tracing::warn!(error = %e, container = %ep.container_id, "updating a moved container's record");
        }
        for (f, mut p) in self.journal_entries::<Producer>("producers") {
            let mine = p.container.as_deref() == Some(ep.container_id.as_str())
                && p.network.as_deref() == Some(ep.network.as_str());
            if !mine {
                continue;
            }
            p.addrs = moved_addrs(&p.addrs, mv);
            self.journal_write("producers", &f, &p);
            // A producer still recorded (its service kept it) gets the new addresses too.
            let key = skeys::producer(&p.service, &p.id);
            let res = match self.store.get(&key).await {
                Ok(Some(kv)) => self
                    .store
                    .txn(
                        vec![Compare::ModRevision(key.clone(), kv.mod_revision)],
                        vec![Op::put(key, encode(&p))],
                    )
                    .await
                    .map(|_| ()),
                Ok(None) => Ok(()),
                Err(e) => Err(e),
            };
            if let Err(e) = res {
                tracing::warn!(error = %e, service = %p.service, "updating a moved producer");
            }
        }
        Moved {
            container: ep.container_id.clone(),
            network: ep.network.clone(),
            from: mv.from.clone(),
            to: mv.to.clone(),
            reason,
        }
    }

    /// The bridge keeps the gateway of each block another host took until no journaled
    /// container of this host is left in it; then it goes, so the block's connected route goes
    /// with it and the fabric routes the block to the host that took it.
    async fn drop_taken_gateways(&self, pool: &Network, mv: &Move) -> Result<()> {
        let left: Vec<Endpoint> = self
            .journal_entries::<Endpoint>("endpoints")
            .into_iter()
            .map(|(_, e)| e)
            .filter(|e| e.network == pool.name)
            .collect();
        let nl = self.host_links()?;
        let what = || format!("bridge {}", pool.bridge);
        let Some(index) = nl
            .link_index(&pool.bridge)
            .await
            .map_err(ControlError::dataplane(what()))?
        else {
            return Ok(());
        };
        for (b, _) in &mv.taken {
            if left
                .iter()
                .any(|e| e.ips.iter().any(|a| b.contains(&a.addr())))
            {
                continue;
            }
            let subs = ferrynet_model::blocks::block_subnets(&pool.subnets, &[*b]);
            let resolved = validate_network_subnets(&subs)
                .map_err(|e| ControlError::InvalidConfig(e.to_string()))?;
            for r in resolved {
                nl.delete_address(index, r.gateway_net())
                    .await
                    .map_err(ControlError::dataplane(what()))?;
            }
        }
        Ok(())
    }

    /// `ferrynet ps` and `inspect` show the new addresses: the CLI container's record follows
    /// its endpoint, unless it was removed or replaced meanwhile.
    async fn move_container_record(&self, moved: &Endpoint) -> Result<()> {
        let key = keys::container(&moved.container_id);
        let Some(kv) = self.store.get(&key).await? else {
            return Ok(());
        };
        let mut c: crate::container::Container = decode(&kv)?;
        if c.network != moved.network || c.ifname != moved.ifname {
            return Ok(());
        }
        c.ips = moved.ips.clone();
        self.store
            .txn(
                vec![Compare::ModRevision(key.clone(), kv.mod_revision)],
                vec![Op::put(key, encode(&c))],
            )
            .await?;
        Ok(())
    }

    /// Finish the kernel side of moves whose renumbering failed (each has a marker in the
    /// journal holding the container's record before the move): compare what its moved record
    /// wants on the interface with what the kernel shows (`model::journal::renumber_needed`),
    /// renumber again where they differ, and drop the marker once they agree or the container
    /// left. Returns the errors of the containers still not converged.
    pub async fn converge_moves(&self) -> Vec<String> {
        let pending = self.journal_entries::<Endpoint>("renumber");
        if pending.is_empty() {
            return Vec::new();
        }
        let _one = MOVES.lock().await;
        let mut errors = Vec::new();
        // Read again under the lock: a move that just finished removed its marker.
        for (file, old) in self.journal_entries::<Endpoint>("renumber") {
            if let Err(e) = self.converge_move(&file, &old).await {
                tracing::warn!(error = %e, container = %old.container_id, "renumbering a moved container again failed; retrying at the next reconcile");
                errors.push(format!(
                    "renumbering moved container {}: {e}",
                    old.container_id
                ));
            }
        }
        errors
    }

    async fn converge_move(&self, file: &str, old: &Endpoint) -> Result<()> {
        let current = self
            .journal_entries::<Endpoint>("endpoints")
            .into_iter()
            .find(|(f, _)| f == file)
            .map(|(_, e)| e);
        let network = self.network(&old.network).await?;
        let (Some(new), Some((pool, _))) = (current, network) else {
            // The container left (its entry went) or its network did: nothing to converge.
            self.journal_remove("renumber", file);
            return Ok(());
        };
        let kernel = self.interface_addresses(&new).await?;
        let want = container_addresses(&pool, &new.ips);
        let left = container_addresses(&pool, &old.ips);
        match renumber_needed(&want, &left, kernel.as_deref()) {
            Renumber::Gone | Renumber::Done => {}
            Renumber::Again => {
                self.renumber(old, &new, &pool).await?;
                tracing::info!(container = %new.container_id, network = %new.network, to = %list(&new.ips), "renumbered a moved container");
            }
        }
        self.journal_remove("renumber", file);
        Ok(())
    }

    /// The addresses of `ep`'s interface in its container; None when the namespace or the
    /// interface is gone.
    async fn interface_addresses(&self, ep: &Endpoint) -> Result<Option<Vec<IpNet>>> {
        let Some(netns) = ep.netns.as_deref() else {
            return Ok(None);
        };
        if !std::path::Path::new(netns).exists() {
            return Ok(None);
        }
        let what = || format!("reading {}'s addresses in {netns}", ep.container_id);
        let container = self
            .kernel
            .container(netns)
            .map_err(ControlError::dataplane(what()))?;
        let Some(index) = container
            .link_index(&ep.ifname)
            .await
            .map_err(ControlError::dataplane(what()))?
        else {
            return Ok(None);
        };
        Ok(Some(
            container
                .addresses(index)
                .await
                .map_err(ControlError::dataplane(what()))?,
        ))
    }

    /// The kernel side of a move: the bridge gets this host's blocks' gateways (a block claimed
    /// for the move included), the port's routes, anti-spoofing elements and published ports
    /// follow, then the container's interface gets its new addresses and default routes, and
    /// the host's conntrack entries of the old addresses go. Idempotent: a retry redoes it.
    async fn renumber(&self, old: &Endpoint, new: &Endpoint, pool: &Network) -> Result<()> {
        if crate::failpoint::fails_once("move-renumber") {
            return Err(ControlError::dataplane(format!(
                "renumbering {} (fail point move-renumber)",
                old.container_id
            ))(
                ferrynet_dataplane::error::DataplaneError::NotFound("fail point".into()),
            ));
        }
        let view = self.host_view(pool).await?;
        let net = &view.net;
        let subnets = validate_network_subnets(&net.subnets)
            .map_err(|e| ControlError::InvalidConfig(e.to_string()))?;
        let host = self
            .kernel
            .host()
            .map_err(ControlError::dataplane("opening the host's namespace"))?;
        self.ensure_bridge(&*host, net).await?;
        let netns = old.netns.as_deref().ok_or_else(|| {
            ControlError::InvalidConfig(format!(
                "container {} has no recorded namespace",
                old.container_id
            ))
        })?;
        let what = || format!("renumbering {} in {netns}", old.container_id);
        // The container's interface comes last: once it holds the record's addresses, every
        // step before it is done, which is what `converge_moves` checks.
        if net.mode == NetworkMode::Routed {
            let port = new
                .host_veth
                .clone()
                .unwrap_or_else(|| host_veth_name(&new.network, &new.container_id, &new.ifname));
            if let Some(index) = host
                .link_index(&port)
                .await
                .map_err(ControlError::dataplane(what()))?
            {
                self.plumb_routed_port(&*host, net, &subnets, &port, index, &new.ips)
                    .await?;
            }
        }
        self.move_resolver(netns, net, &subnets, new)?;
        self.unguard_endpoint(old);
        self.guard_endpoint(new, net.mode).await?;
        let h = self.unpublish_ports_in_background(old);
        self.finish_unpublish(old, h).await?;
        self.publish_ports(new).await?;
        let container = self
            .kernel
            .container(netns)
            .map_err(ControlError::dataplane(what()))?;
        container
            .renumber(
                &old.ifname,
                &container_addresses(net, &old.ips),
                &container_addresses(net, &new.ips),
                &container_routes(net, &subnets, &new.ips),
            )
            .await
            .map_err(ControlError::dataplane(what()))?;
        flush_left_addresses(old, new).await;
        Ok(())
    }

    /// The resolv.conf ferrynet wrote for a container names its old block's gateway (now
    /// another host's): rewrite it in place (the container sees it through a bind mount).
    fn move_resolver(
        &self,
        netns: &str,
        net: &Network,
        subnets: &[ferrynet_model::ipam::ResolvedSubnet],
        new: &Endpoint,
    ) -> Result<()> {
        let path = std::path::Path::new(netns);
        let (Some(_), Some(name)) = (
            crate::container::resolv_conf_of(Some(path)),
            path.file_name().and_then(|n| n.to_str()),
        ) else {
            return Ok(());
        };
        let Some(dns) = super::host::LocalConfig::load(&self.paths().state_dir)?.dns else {
            return Ok(());
        };
        let mut gws: Vec<IpAddr> = Vec::new();
        for ip in &new.ips {
            if let Some(g) = super::endpoint::gateway_for(subnets, ip.addr()) {
                if !gws.contains(&g) {
                    gws.push(g);
                }
            }
        }
        if !gws.is_empty() {
            let content = crate::container::resolv_conf(&gws, &net.name, &dns.domain);
            crate::container::write_resolv_conf(name, &content)?;
        }
        Ok(())
    }

    /// One journaled endpoint: read what the store holds, decide, and put it back in one
    /// transaction guarded by what was read.
    async fn reassert_endpoint(
        &self,
        ep: &Endpoint,
        alive: bool,
        blocks: &[ipnet::IpNet],
        borrow: bool,
    ) -> Result<Reassert> {
        let ep_key = &keys::endpoint(&ep.network, &ep.container_id, &ep.ifname);
        let owner = &format!("{}/{}", ep.container_id, ep.ifname);
        let what = || format!("re-assert {} on network {}", ep.container_id, ep.network);
        self.transact(what, || {
            Box::pin(async move {
                let mut facts = StoreFacts::default();
                let mut compares = Vec::new();
                match self.store.get(ep_key).await? {
                    Some(kv) => facts.record = Some(decode(&kv)?),
                    None => compares.push(Compare::Missing(ep_key.clone())),
                }
                for ip in &ep.ips {
                    let k = keys::ipam(&ep.network, ip.addr());
                    match self.store.get(&k).await? {
                        Some(kv) => {
                            let o = String::from_utf8_lossy(&kv.value).into_owned();
                            compares.push(Compare::Value(k, kv.value));
                            facts.address_owners.insert(ip.addr(), o);
                        }
                        None => compares.push(Compare::Missing(k)),
                    }
                }
                for b in blocks {
                    let k = keys::block(&ep.network, b);
                    match self.store.get(&k).await? {
                        Some(kv) => {
                            let claim: BlockClaim = decode(&kv)?;
                            compares.push(Compare::ModRevision(k, kv.mod_revision));
                            facts.block_owners.insert(*b, claim.host);
                        }
                        None => compares.push(Compare::Missing(k)),
                    }
                }
                let decision = plan(ep, self.host(), alive, &facts, blocks, borrow);
                let Reassert::Restore { blocks: claim } = &decision else {
                    return Ok(Round::Done(decision));
                };
                let mut ops = vec![Op::put(ep_key.clone(), encode(ep))];
                for ip in &ep.ips {
                    ops.push(Op::put(keys::ipam(&ep.network, ip.addr()), owner.clone()));
                }
                for b in claim {
                    let c = BlockClaim {
                        host: self.host().to_string(),
                    };
                    ops.push(Op::put(keys::block(&ep.network, b), encode(&c)));
                    ops.push(Op::delete(keys::orphan_block(&ep.network, b)));
                }
                Ok(Round::commit(compares, ops, decision))
            })
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use ferrynet_model::host::BlockClaim;
    use ferrynet_model::network::{keys, Endpoint, EndpointOwner, Network};
    use ferrynet_store::{EmbeddedStore, Store};
    use ipnet::IpNet;

    use super::{encode, moved_addrs, producer_file, Control, ReassertReport};

    fn net(s: &str) -> IpNet {
        s.parse().unwrap()
    }

    /// Network blue, 10.7.0.0/27 in blocks of 8, and a store where `claims` are written and
    /// `held` addresses given to other containers.
    async fn lab(claims: &[(&str, &str)], held: &[&str]) -> (tempfile::TempDir, Control, Network) {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn Store> = Arc::new(EmbeddedStore::open(dir.path().join("s")).unwrap());
        let mut pool = Network::bridged("blue", [net("10.7.0.0/27")]);
        pool.fabric = Some(
            serde_json::from_value(serde_json::json!({
                "backend": "vxlan", "vni": 7, "blockV4": 29, "blockV6": 125
            }))
            .unwrap(),
        );
        for (b, h) in claims {
            let c = BlockClaim {
                host: h.to_string(),
            };
            store
                .put(&keys::block("blue", &net(b)), encode(&c))
                .await
                .unwrap();
        }
        for a in held {
            let k = keys::ipam("blue", a.parse().unwrap());
            store.put(&k, b"other/eth0".to_vec()).await.unwrap();
        }
        (dir, Control::for_tests(store), pool)
    }

    fn journaled() -> Endpoint {
        let mut ep = Endpoint::new("blue", "c1", "eth0");
        ep.ips = vec![net("10.7.0.10/29")];
        ep.owner = EndpointOwner::Cli;
        ep.host = Some("test".into());
        ep
    }

    async fn get(ctl: &Control, key: &str) -> Option<String> {
        let kv = ctl.store.get(key).await.unwrap()?;
        Some(String::from_utf8_lossy(&kv.value).into_owned())
    }

    #[tokio::test]
    async fn a_move_records_new_addresses_and_claims_a_free_block_in_one_write() {
        // h3 took this host's block 10.7.0.8/29 and gave .10 away; h1 holds 10.7.0.0/29.
        let (_d, ctl, pool) = lab(
            &[("10.7.0.0/29", "h1"), ("10.7.0.8/29", "h3")],
            &["10.7.0.2", "10.7.0.10"],
        )
        .await;
        let mv = ctl
            .move_endpoint(&journaled(), &pool)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(mv.to, vec![net("10.7.0.18/29")]);
        assert_eq!(mv.claim, vec![net("10.7.0.16/29")]);
        let rec: Endpoint = serde_json::from_str(
            &get(&ctl, &keys::endpoint("blue", "c1", "eth0"))
                .await
                .unwrap(),
        )
        .unwrap();
        assert_eq!(rec.ips, mv.to);
        let k = |a: &str| keys::ipam("blue", a.parse().unwrap());
        assert_eq!(get(&ctl, &k("10.7.0.18")).await.as_deref(), Some("c1/eth0"));
        // What the other host gave away stays its container's.
        assert_eq!(
            get(&ctl, &k("10.7.0.10")).await.as_deref(),
            Some("other/eth0")
        );
        assert_eq!(ctl.block_claims("blue").await.unwrap().len(), 3);
        assert!(ctl.my_blocks("blue").await.unwrap() == vec![net("10.7.0.16/29")]);
        // Its record back meanwhile (another pass): no second move.
        let again = ctl.move_endpoint(&journaled(), &pool).await.unwrap();
        assert!(again.is_err());
    }

    #[tokio::test]
    async fn a_forged_claim_cannot_renumber_a_container_onto_held_addresses() {
        // A store writer gives this host's block to h3, gives h1's full block (.2 to .6 held)
        // to this host, and claims the rest of the pool for a made-up host.
        let (_d, ctl, pool) = lab(
            &[
                ("10.7.0.0/29", "test"),
                ("10.7.0.8/29", "h3"),
                ("10.7.0.16/29", "h9"),
                ("10.7.0.24/29", "h9"),
            ],
            &["10.7.0.2", "10.7.0.3", "10.7.0.4", "10.7.0.5", "10.7.0.6"],
        )
        .await;
        let why = ctl
            .move_endpoint(&journaled(), &pool)
            .await
            .unwrap()
            .unwrap_err();
        assert!(why.contains("no address of the pool is free"), "{why}");
        assert!(ctl
            .store
            .get(&keys::endpoint("blue", "c1", "eth0"))
            .await
            .unwrap()
            .is_none());
        for a in 2..=6 {
            let k = keys::ipam("blue", format!("10.7.0.{a}").parse().unwrap());
            assert_eq!(get(&ctl, &k).await.as_deref(), Some("other/eth0"));
        }
    }

    #[tokio::test]
    async fn quarantined_blocks_go_back_to_their_host_and_to_others_last() {
        // "test" is this host. h1 holds the first block; the second was released from this
        // host, the third from h9 long ago; a forged record names a block outside the pool,
        // and a malformed one the last block.
        let (_d, ctl, pool) = lab(&[("10.7.0.0/29", "h1")], &[]).await;
        ctl.store
            .put(&keys::network("blue"), encode(&pool))
            .await
            .unwrap();
        let quarantine = |host: &str, at: u64| {
            ferrynet_model::blocks::Quarantine {
                host: host.into(),
                released_at: at,
            }
            .encode()
        };
        let put = |b: &str, v: Vec<u8>| {
            let k = keys::orphan_block("blue", &net(b));
            let store = ctl.store.clone();
            async move { store.put(&k, v).await.unwrap() }
        };
        put("10.7.0.8/29", quarantine("test", 200)).await;
        put("10.7.0.16/29", quarantine("h9", 100)).await;
        put("10.99.0.0/29", quarantine("test", 1)).await;
        put("10.7.0.24/29", b"{not json".to_vec()).await;
        // Another host takes the one block nobody is quarantined for (the malformed record
        // is ignored), then, with nothing else free, h9's (released longest ago).
        let mut other = Control::for_tests(ctl.store.clone());
        other.host = "h3".into();
        assert_eq!(
            other.claim_block(&pool, false).await.unwrap(),
            Some(net("10.7.0.24/29"))
        );
        assert_eq!(
            other.claim_block(&pool, false).await.unwrap(),
            Some(net("10.7.0.16/29"))
        );
        assert!(get(&ctl, &keys::orphan_block("blue", &net("10.7.0.16/29")))
            .await
            .is_none());
        // This host takes its own back, and only what lies in the pool.
        assert_eq!(
            ctl.reclaim_quarantined(&pool).await.unwrap(),
            vec![net("10.7.0.8/29")]
        );
        assert_eq!(
            ctl.my_blocks("blue").await.unwrap(),
            vec![net("10.7.0.8/29")]
        );
        assert!(get(&ctl, &keys::orphan_block("blue", &net("10.7.0.8/29")))
            .await
            .is_none());
        assert!(ctl.reclaim_quarantined(&pool).await.unwrap().is_empty());
        // The pool is full now.
        assert_eq!(other.claim_block(&pool, false).await.unwrap(), None);
    }

    #[test]
    fn producers_follow_the_moved_addresses() {
        let mv = ferrynet_model::journal::Move {
            from: vec![net("10.7.0.10/29"), net("fd07::a/125")],
            to: vec![net("10.7.0.18/29"), net("fd07::a/125")],
            claim: vec![],
            taken: vec![],
        };
        let addrs = ["10.7.0.10", "fd07::a", "192.0.2.1"].map(|a| a.parse().unwrap());
        assert_eq!(
            moved_addrs(&addrs, &mv),
            ["10.7.0.18", "fd07::a", "192.0.2.1"].map(|a| a.parse::<std::net::IpAddr>().unwrap())
        );
    }

    #[test]
    fn later_passes_add_up_and_keep_only_current_conflicts() {
        let mut r = ReassertReport {
            restored: 2,
            conflicts: vec!["old".into()],
            ..Default::default()
        };
        r.absorb(ReassertReport::default());
        assert_eq!((r.restored, r.conflicts.len()), (2, 0));
        r.absorb(ReassertReport {
            restored: 1,
            producers_restored: 1,
            forgotten: 3,
            conflicts: vec!["new".into()],
            ..Default::default()
        });
        assert_eq!(
            (r.restored, r.producers_restored, r.forgotten, r.conflicts),
            (3, 1, 3, vec!["new".to_string()])
        );
    }

    #[test]
    fn producer_files_only_for_plain_names() {
        assert_eq!(producer_file("web", "c1").as_deref(), Some("web@c1.json"));
        for (s, i) in [("web", "../x"), ("", "a"), ("web", ".hidden"), ("a/b", "c")] {
            assert_eq!(producer_file(s, i), None, "{s} {i}");
        }
    }
}
