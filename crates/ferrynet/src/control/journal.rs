//! This host's journal of what it recorded in a shared store (multi-host endpoints and its
//! producers), kept as one file per record under `<state-dir>/journal/`, and the re-assertion
//! that puts them back after a partition longer than the lease and grace period
//! (`model::journal` decides). Single-host networks are not journaled: nobody else releases
//! them.

use std::path::PathBuf;

use ferrynet_dataplane::netlink::Netlink;
use ferrynet_model::host::BlockClaim;
use ferrynet_model::journal::{blocks_of, plan, Reassert, StoreFacts};
use ferrynet_model::names::host_veth_name;
use ferrynet_model::network::{keys, Endpoint};
use ferrynet_model::service::{keys as skeys, Producer};
use ferrynet_store::{Compare, Op};
use serde::{Deserialize, Serialize};

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
    }
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
        let nl = Netlink::current().map_err(ControlError::dataplane("opening netlink"))?;
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
            }
        }
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
        if report != ReassertReport::default() {
            tracing::info!(
                restored = report.restored,
                producers = report.producers_restored,
                forgotten = report.forgotten,
                conflicts = report.conflicts.len(),
                "re-asserted this host's records"
            );
        }
        Ok(report)
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
    use super::{producer_file, ReassertReport};

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
