//! Network policy: policy records (`policies/<name>`), endpoint labels, and the policy table of
//! this host (`inet ferrynet-policy`) with the conntrack entries it no longer allows.
//! The agent keeps the table in line with the store (`agent/policy.rs`); on a host without an
//! agent (one host, embedded store) every change applies it once here.

use std::collections::{BTreeMap, BTreeSet};

use ferrynet_model::network::{keys, Endpoint, Network, NetworkMode};
use ferrynet_model::policy::document::keys as policy_keys;
use ferrynet_model::policy::render::{self, Desired};
use ferrynet_model::policy::{
    decide, EndpointIndex, Interner, Policy, PolicyBook, PolicyEndpoint, Proto,
};
use ferrynet_store::{Compare, Op};

use super::{decode, decode_all, encode, Control};
use crate::error::{ControlError, Result};

/// etcd refuses transactions of more than 128 operations.
const TXN_OPS: usize = 100;

/// An endpoint as policy sees it (None: a host-network endpoint, which has no address of its
/// own to police).
pub fn policy_endpoint(ep: &Endpoint) -> Option<PolicyEndpoint> {
    if ep.ips.is_empty() {
        return None;
    }
    Some(PolicyEndpoint::of(ep.clone(), 0, &Interner::default()))
}

/// The book of `policies` with the default-deny networks among `networks`.
pub fn book_of(policies: Vec<Policy>, networks: &[Network]) -> PolicyBook {
    let deny: BTreeSet<String> = networks
        .iter()
        .filter(|n| n.default_deny && n.mode == NetworkMode::Bridge)
        .map(|n| n.name.clone())
        .collect();
    PolicyBook::new(policies, deny)
}

/// True when `ep` lives on host `me` (a single-host network's endpoint has no host: it is on
/// whichever host reads it).
pub fn is_local_on(me: &str, ep: &PolicyEndpoint) -> bool {
    ep.host.as_deref().is_none_or(|h| h == me)
}

impl Control {
    /// Store `docs` (already checked as a whole): created or replaced. Returns for each name
    /// whether it was new, and the store revision that holds them all.
    pub async fn apply_policies(&self, docs: &[Policy]) -> Result<(Vec<(String, bool)>, u64)> {
        let (have, _) = self.store.range(&policy_keys::policies()).await?;
        let known: BTreeSet<&str> = have.iter().map(|kv| kv.key.as_str()).collect();
        let mut out = Vec::new();
        let mut ops = Vec::new();
        for p in docs {
            let key = policy_keys::policy(&p.name);
            out.push((p.name.clone(), !known.contains(key.as_str())));
            ops.push(Op::put(key, encode(p)));
        }
        let mut rev = 0;
        for chunk in ops.chunks(TXN_OPS) {
            rev = self.store.txn(vec![], chunk.to_vec()).await?.revision;
        }
        self.sync_policy_without_agent().await;
        Ok((out, rev))
    }

    /// Every stored policy (rejected records are skipped).
    pub async fn policies(&self) -> Result<Vec<Policy>> {
        let (kvs, _) = self.store.range(&policy_keys::policies()).await?;
        Ok(decode_all(&kvs))
    }

    /// Remove a policy: the store revision without it, None when there was none.
    pub async fn remove_policy(&self, name: &str) -> Result<Option<u64>> {
        let key = policy_keys::policy(name);
        let r = self
            .store
            .txn(vec![Compare::Exists(key.clone())], vec![Op::delete(key)])
            .await?;
        self.sync_policy_without_agent().await;
        Ok(r.succeeded.then_some(r.revision))
    }

    /// The policies and every endpoint, as the verdict and the nft table see them.
    pub async fn policy_inputs(&self) -> Result<(PolicyBook, EndpointIndex)> {
        let networks = self.networks().await?;
        let (kvs, _) = self.store.range(&keys::all_endpoints()).await?;
        let eps: Vec<Endpoint> = decode_all(&kvs);
        let list = eps.iter().filter_map(policy_endpoint).collect();
        Ok((
            book_of(self.policies().await?, &networks),
            EndpointIndex::new(list),
        ))
    }

    /// Replace the labels of an endpoint (compare-and-swap on its record, so a concurrent
    /// change is not lost). A pod's `namespace` label cannot be changed.
    pub async fn set_labels(
        &self,
        network: &str,
        container_id: &str,
        ifname: &str,
        labels: BTreeMap<String, String>,
    ) -> Result<(Endpoint, u64)> {
        let key = keys::endpoint(network, container_id, ifname);
        for _ in 0..16 {
            let kv = self.store.get(&key).await?.ok_or_else(|| {
                ControlError::InvalidConfig(format!(
                    "no endpoint {container_id}/{ifname} on {network}"
                ))
            })?;
            let mut ep: Endpoint = decode(&kv)?;
            ep.labels = labels.clone();
            ferrynet_model::pod::check_labels(&ep.labels, ep.pod.as_ref())
                .map_err(|e| ControlError::InvalidConfig(e.to_string()))?;
            let r = self
                .store
                .txn(
                    vec![Compare::ModRevision(key.clone(), kv.mod_revision)],
                    vec![Op::put(key.clone(), encode(&ep))],
                )
                .await?;
            if r.succeeded {
                self.sync_policy_without_agent().await;
                return Ok((ep, r.revision));
            }
        }
        Err(ControlError::InvalidConfig(format!(
            "endpoint {container_id}/{ifname} kept changing; try again"
        )))
    }

    /// On a host without an agent, bring the policy table in line with the store now (the
    /// agent does it on hosts that run one). Failures are logged: the records are stored, and
    /// `ferrynet reload` or the next change applies them.
    pub async fn sync_policy_without_agent(&self) {
        let agent = super::host::LocalConfig::load(&self.paths.state_dir)
            .map(|c| c.host.is_some())
            .unwrap_or(false);
        if agent {
            return;
        }
        if let Err(e) = self.sync_policy_once().await {
            tracing::warn!(error = %e, "applying network policy on this host");
        }
    }

    /// Rebuild this host's policy table from the store in one transaction and cut the
    /// connections it no longer allows.
    pub async fn sync_policy_once(&self) -> Result<Option<Desired>> {
        // Without policies or default-deny networks there is nothing to enforce: a host that
        // never had a table (the marker file) is left alone, which keeps CNI ADDs cheap.
        let marker = self.paths.state_dir.join("policy.active");
        let networks = self.networks().await?;
        let policies = self.policies().await?;
        if policies.is_empty() && !networks.iter().any(|n| n.default_deny) && !marker.exists() {
            return Ok(None);
        }
        let (kvs, _) = self.store.range(&keys::all_endpoints()).await?;
        let eps: Vec<Endpoint> = decode_all(&kvs);
        let eps = EndpointIndex::new(eps.iter().filter_map(policy_endpoint).collect());
        let book = book_of(policies, &networks);
        let me = self.host.clone();
        let want = render::desired(&book, &eps, &|e| is_local_on(&me, e));
        let batch = render::plan(None, want.as_ref());
        self.nft
            .apply(&batch)
            .map_err(ControlError::firewall("applying the network policy table"))?;
        if want.is_some() {
            let _ = std::fs::write(&marker, b"");
        } else {
            let _ = std::fs::remove_file(&marker);
        }
        cut_denied(&book, &eps, &me);
        Ok(want)
    }
}

/// Delete the conntrack entries of this host's endpoints whose connection the policies now
/// deny, so an established connection is cut like a new one would be refused. Returns the
/// number deleted; failures are logged (they leave the connection running, not more open).
pub fn cut_denied(book: &PolicyBook, eps: &EndpointIndex, me: &str) -> usize {
    if book.policies.is_empty() && book.default_deny.is_empty() {
        return 0;
    }
    let mut ct = match ferrynet_dataplane::conntrack::Conntrack::open() {
        Ok(c) => c,
        Err(e) => {
            tracing::warn!(error = %e, "opening conntrack to cut denied connections");
            return 0;
        }
    };
    let entries = match ct.dump() {
        Ok(e) => e,
        Err(e) => {
            tracing::warn!(error = %e, "dumping conntrack");
            return 0;
        }
    };
    let local = |ip| render::is_local(eps, &|e| is_local_on(me, e), ip);
    let mut cut = 0;
    for e in &entries {
        let f = &e.flow;
        // The destination after DNAT is where the connection really goes.
        let (src, dst) = (f.orig_src, f.reply_src);
        if !local(src) && !local(dst) {
            continue;
        }
        let v = decide(
            book,
            eps,
            src,
            dst,
            Proto::from_number(f.protocol),
            f.reply_sport,
        );
        if !v.allowed && ct.delete(e).unwrap_or(false) {
            cut += 1;
        }
    }
    if cut > 0 {
        tracing::info!(cut, "cut connections the network policy no longer allows");
    }
    cut
}
