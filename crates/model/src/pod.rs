//! Kubernetes pod identity: what a runtime passes in `CNI_ARGS` (`K8S_POD_NAMESPACE`,
//! `K8S_POD_NAME`, `K8S_POD_UID`, `K8S_POD_INFRA_CONTAINER_ID`), recorded on the endpoint so
//! DNS can answer `POD.NAMESPACE` and policy can select by the `namespace` label.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::validate::{check_container_id, check_dns_label, check_dns_name, RecordError};

/// The label holding a pod's namespace.
pub const NAMESPACE_LABEL: &str = "namespace";

/// The pod an endpoint belongs to.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PodIdentity {
    /// The pod's namespace: one DNS label.
    pub namespace: String,
    /// The pod's name: DNS labels.
    pub name: String,
    /// The pod's UID (a UUID), when given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uid: Option<String>,
    /// The sandbox (pause) container's id, when given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub infra_container_id: Option<String>,
}

impl PodIdentity {
    /// Its DNS name relative to the network's zone: `POD.NAMESPACE`, lower case. The namespace
    /// is one label and always last, so two pods' names never meet unless both parts do.
    pub fn dns_name(&self) -> String {
        format!("{}.{}", self.name, self.namespace).to_ascii_lowercase()
    }

    /// Every field is what a runtime may pass (see [`pod_args`]).
    pub fn validate(&self) -> Result<(), RecordError> {
        check_dns_label("pod.namespace", &self.namespace)?;
        check_dns_name("pod.name", &self.name)?;
        if let Some(u) = &self.uid {
            check_dns_label("pod.uid", u)?;
        }
        if let Some(c) = &self.infra_container_id {
            check_container_id(c)?;
        }
        Ok(())
    }
}

/// What `CNI_ARGS` says about the pod: its identity when both namespace and name are given,
/// and the labels (the namespace whenever it is given).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct PodArgs {
    /// Namespace and name (with UID and sandbox id when given).
    pub pod: Option<PodIdentity>,
    /// A name without a namespace (a runtime that names containers only): the legacy DNS name.
    pub bare_name: Option<String>,
    /// Labels for policy: `namespace`.
    pub labels: BTreeMap<String, String>,
}

/// Reads the pod identity from `CNI_ARGS` pairs (first occurrence of a key wins, empty values
/// count as absent); a value that is not DNS labels (a container id for the sandbox) is refused
/// with the key's name.
pub fn pod_args(args: &[(String, String)]) -> Result<PodArgs, RecordError> {
    let get = |key: &str| {
        args.iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
            .filter(|v| !v.is_empty())
    };
    let namespace = get("K8S_POD_NAMESPACE");
    let name = get("K8S_POD_NAME");
    let uid = get("K8S_POD_UID");
    let infra = get("K8S_POD_INFRA_CONTAINER_ID");
    if let Some(n) = namespace {
        check_dns_label("K8S_POD_NAMESPACE", n)?;
    }
    if let Some(n) = name {
        check_dns_name("K8S_POD_NAME", n)?;
    }
    if let Some(u) = uid {
        check_dns_label("K8S_POD_UID", u)?;
    }
    if let Some(c) = infra {
        check_container_id(c)
            .map_err(|e| RecordError::new("K8S_POD_INFRA_CONTAINER_ID", c, e.why))?;
    }
    let mut out = PodArgs::default();
    if let Some(ns) = namespace {
        out.labels
            .insert(NAMESPACE_LABEL.to_string(), ns.to_string());
    }
    match (namespace, name) {
        (Some(ns), Some(n)) => {
            out.pod = Some(PodIdentity {
                namespace: ns.to_string(),
                name: n.to_string(),
                uid: uid.map(str::to_string),
                infra_container_id: infra.map(str::to_string),
            })
        }
        (None, Some(n)) => out.bare_name = Some(n.to_string()),
        _ => {}
    }
    Ok(out)
}

/// Checks an endpoint's labels: keys 1-253 of `[A-Za-z0-9_./-]`, values at most 63 of
/// `[A-Za-z0-9_.-]`, and the `namespace` label equal to the pod's namespace when there is a pod
/// (a forged label would let a record dodge a namespace's policy).
pub fn check_labels(
    labels: &BTreeMap<String, String>,
    pod: Option<&PodIdentity>,
) -> Result<(), RecordError> {
    for (k, v) in labels {
        let key_ok = !k.is_empty()
            && k.len() <= 253
            && k.bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'/' | b'-'));
        if !key_ok {
            return Err(RecordError::new(
                "labels",
                k,
                "label keys must be 1-253 of [A-Za-z0-9_./-]",
            ));
        }
        let value_ok = v.len() <= 63
            && v.bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'));
        if !value_ok {
            return Err(RecordError::new(
                "labels",
                v,
                "label values must be at most 63 of [A-Za-z0-9_.-]",
            ));
        }
    }
    if let Some(p) = pod {
        if labels.get(NAMESPACE_LABEL) != Some(&p.namespace) {
            return Err(RecordError::new(
                "labels",
                labels
                    .get(NAMESPACE_LABEL)
                    .map(String::as_str)
                    .unwrap_or(""),
                format!(
                    "the namespace label must be the pod's namespace {:?}",
                    p.namespace
                ),
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cni::parse_cni_args;

    fn parse(s: &str) -> Result<PodArgs, RecordError> {
        pod_args(&parse_cni_args(s).unwrap())
    }

    #[test]
    fn what_containerd_sends() {
        let a = parse(
            "IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME=web-0;\
             K8S_POD_INFRA_CONTAINER_ID=9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08;\
             K8S_POD_UID=5f2e0c1a-8d1e-4c1b-9a3e-1f2e3d4c5b6a",
        )
        .unwrap();
        let p = a.pod.unwrap();
        assert_eq!(
            (p.namespace.as_str(), p.name.as_str()),
            ("default", "web-0")
        );
        assert_eq!(
            p.uid.as_deref(),
            Some("5f2e0c1a-8d1e-4c1b-9a3e-1f2e3d4c5b6a")
        );
        assert_eq!(p.infra_container_id.as_ref().unwrap().len(), 64);
        assert_eq!(p.dns_name(), "web-0.default");
        assert_eq!(
            a.labels.get("namespace").map(String::as_str),
            Some("default")
        );
        assert_eq!(a.bare_name, None);
        p.validate().unwrap();
        check_labels(&a.labels, Some(&p)).unwrap();
    }

    #[test]
    fn partial_identities() {
        let a = parse("K8S_POD_NAME=solo").unwrap();
        assert_eq!((a.pod, a.bare_name.as_deref()), (None, Some("solo")));
        assert!(a.labels.is_empty());
        let a = parse("K8S_POD_NAMESPACE=team-a").unwrap();
        assert_eq!(a.pod, None);
        assert_eq!(
            a.labels.get("namespace").map(String::as_str),
            Some("team-a")
        );
        let a = parse("K8S_POD_NAMESPACE=;K8S_POD_NAME=").unwrap();
        assert_eq!(a, PodArgs::default());
        assert_eq!(parse("").unwrap(), PodArgs::default());
        // Pod names may be dotted (DNS subdomains); namespaces may not.
        assert_eq!(
            parse("K8S_POD_NAMESPACE=a;K8S_POD_NAME=web.x")
                .unwrap()
                .pod
                .unwrap()
                .dns_name(),
            "web.x.a"
        );
    }

    #[test]
    fn hostile_values_are_refused_naming_the_key() {
        for (args, key) in [
            ("K8S_POD_NAMESPACE=a.b;K8S_POD_NAME=x", "K8S_POD_NAMESPACE"),
            ("K8S_POD_NAMESPACE=a b;K8S_POD_NAME=x", "K8S_POD_NAMESPACE"),
            ("K8S_POD_NAMESPACE=a;K8S_POD_NAME=x}", "K8S_POD_NAME"),
            ("K8S_POD_NAMESPACE=a;K8S_POD_NAME=x..y", "K8S_POD_NAME"),
            (
                "K8S_POD_NAMESPACE=a;K8S_POD_NAME=x\" flush ruleset",
                "K8S_POD_NAME",
            ),
            ("K8S_POD_UID=../../etc", "K8S_POD_UID"),
            (
                "K8S_POD_INFRA_CONTAINER_ID=-rf",
                "K8S_POD_INFRA_CONTAINER_ID",
            ),
        ] {
            let e = parse(args).unwrap_err();
            assert_eq!(e.field, key, "{args}: {e}");
        }
        let long = format!("K8S_POD_NAMESPACE={};K8S_POD_NAME=x", "a".repeat(64));
        assert_eq!(parse(&long).unwrap_err().field, "K8S_POD_NAMESPACE");
    }

    #[test]
    fn labels_on_read_back() {
        let pod = PodIdentity {
            namespace: "a".into(),
            name: "x".into(),
            uid: None,
            infra_container_id: None,
        };
        let mut l = BTreeMap::from([("namespace".to_string(), "a".to_string())]);
        check_labels(&l, Some(&pod)).unwrap();
        // A record whose label says another namespace than its pod is forged.
        l.insert("namespace".into(), "kube-system".into());
        assert!(check_labels(&l, Some(&pod)).is_err());
        l.clear();
        assert!(check_labels(&l, Some(&pod)).is_err());
        check_labels(&l, None).unwrap();
        for (k, v) in [
            ("bad key", "v"),
            ("k", "v v"),
            ("k", &"v".repeat(64)[..]),
            ("", "v"),
        ] {
            let l = BTreeMap::from([(k.to_string(), v.to_string())]);
            assert!(check_labels(&l, None).is_err(), "{k:?}={v:?}");
        }
        let l = BTreeMap::from([("app.kubernetes.io/name".to_string(), "web".to_string())]);
        check_labels(&l, None).unwrap();
    }
}
