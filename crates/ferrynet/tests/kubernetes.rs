//! deploy/kubernetes/ferrynet.yaml, parsed and linted: the kinds, host networking and
//! privileges, the host paths the CNI plugin and the agent share, and every container's
//! command line parsed by ferrynet's own CLI definition with the variables the manifest gives
//! it (so a renamed flag or subcommand breaks this test, not a cluster).

use std::collections::BTreeMap;

use ferrynet::cli::env::{all_vars, FlagVar};
use serde::Deserialize;
use serde_json::Value;

fn manifest_text() -> String {
    let p = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../deploy/kubernetes/ferrynet.yaml"
    );
    std::fs::read_to_string(p).unwrap_or_else(|e| panic!("reading {p}: {e}"))
}

/// Every YAML document of the file, as JSON values.
fn documents(text: &str) -> Vec<Value> {
    serde_norway::Deserializer::from_str(text)
        .map(|d| Value::deserialize(d).expect("a YAML document"))
        .filter(|v| !v.is_null())
        .collect()
}

/// Variables ferrynet reads that are not flags.
const OTHER_VARS: &[&str] = &[
    "FERRYNET_LOG",
    "FERRYNET_ETCD_USER",
    "FERRYNET_ETCD_PASSWORD",
];

fn truthy(v: &str) -> bool {
    matches!(v, "true" | "1" | "yes" | "on" | "y")
}

/// The problems found in the manifest's documents (empty: it passes).
fn lint(docs: &[Value]) -> Vec<String> {
    let mut bad = Vec::new();
    let kind = |k: &str| docs.iter().find(|d| d["kind"] == k);
    let Some(cm) = kind("ConfigMap") else {
        return vec!["no ConfigMap".into()];
    };
    let Some(ds) = kind("DaemonSet") else {
        return vec!["no DaemonSet".into()];
    };
    for d in docs {
        let k = d["kind"].as_str().unwrap_or("");
        if [
            "ClusterRole",
            "Role",
            "ClusterRoleBinding",
            "RoleBinding",
            "ServiceAccount",
        ]
        .contains(&k)
        {
            bad.push(format!("{k}: ferrynet needs no RBAC"));
        }
    }
    let cm_name = cm["metadata"]["name"].as_str().unwrap_or("");
    let cm_data: BTreeMap<String, String> = cm["data"]
        .as_object()
        .map(|m| {
            m.iter()
                .map(|(k, v)| (k.clone(), v.as_str().unwrap_or("").to_string()))
                .collect()
        })
        .unwrap_or_default();
    if !cm_data
        .get("FERRYNET_STORE")
        .is_some_and(|s| s.starts_with("etcd"))
    {
        bad.push("the ConfigMap sets no etcd FERRYNET_STORE".into());
    }
    let spec = &ds["spec"]["template"]["spec"];
    if spec["hostNetwork"] != true {
        bad.push("hostNetwork is not true".into());
    }
    let host_paths: BTreeMap<String, String> = spec["volumes"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|v| {
            Some((
                v["name"].as_str()?.to_string(),
                v["hostPath"]["path"].as_str()?.to_string(),
            ))
        })
        .collect();
    let cmd = ferrynet::cli::command();
    let vars = all_vars(&cmd);
    let known: Vec<&str> = vars
        .iter()
        .map(|v| v.var.as_str())
        .chain(OTHER_VARS.iter().copied())
        .collect();
    for k in cm_data.keys() {
        if k.starts_with("FERRYNET_") && !known.contains(&k.as_str()) {
            bad.push(format!("ConfigMap: {k} is no variable ferrynet reads"));
        }
    }
    // (container, host path, path inside) of every host path mount.
    let mut mounted: Vec<(String, String, String)> = Vec::new();
    let mut networks: Vec<String> = Vec::new();
    let containers = spec["initContainers"]
        .as_array()
        .into_iter()
        .flatten()
        .chain(spec["containers"].as_array().into_iter().flatten());
    let mut agent_seen = false;
    for c in containers {
        let name = c["name"].as_str().unwrap_or("?");
        if c["securityContext"]["privileged"] != true {
            bad.push(format!("{name}: not privileged"));
        }
        let mut mounts: BTreeMap<String, String> = BTreeMap::new();
        for m in c["volumeMounts"].as_array().into_iter().flatten() {
            if let Some(p) = m["name"].as_str().and_then(|n| host_paths.get(n)) {
                let inside = m["mountPath"].as_str().unwrap_or("").to_string();
                mounted.push((name.to_string(), p.clone(), inside.clone()));
                mounts.insert(p.clone(), inside);
            }
        }
        // The container's variables: the ConfigMap (when it is read) and its own.
        let mut env: BTreeMap<String, String> = BTreeMap::new();
        for f in c["envFrom"].as_array().into_iter().flatten() {
            if f["configMapRef"]["name"] == cm_name {
                env.extend(cm_data.clone());
            } else {
                bad.push(format!("{name}: envFrom names an unknown ConfigMap"));
            }
        }
        for e in c["env"].as_array().into_iter().flatten() {
            let k = e["name"].as_str().unwrap_or("").to_string();
            if k.starts_with("FERRYNET_") && !known.contains(&k.as_str()) {
                bad.push(format!("{name}: {k} is no variable ferrynet reads"));
            }
            // A value from the downward API: any placeholder parses like the real one.
            let v = e["value"].as_str().unwrap_or("node-1").to_string();
            env.insert(k, v);
        }
        let argv: Vec<String> = c["command"]
            .as_array()
            .into_iter()
            .flatten()
            .chain(c["args"].as_array().into_iter().flatten())
            .filter_map(|v| v.as_str().map(str::to_string))
            .collect();
        if argv.first().map(String::as_str) != Some("/usr/bin/ferrynet") {
            bad.push(format!(
                "{name}: the command is not /usr/bin/ferrynet: {argv:?}"
            ));
            continue;
        }
        let path = subcommand_path(&cmd, &argv[1..]);
        if path == "agent" {
            agent_seen = true;
            let caps = &c["securityContext"]["capabilities"]["add"];
            if !caps
                .as_array()
                .into_iter()
                .flatten()
                .any(|v| v == "NET_ADMIN")
            {
                bad.push(format!("{name}: no NET_ADMIN"));
            }
            // The probes must reach the listener the agent is told to open.
            let http = env.get("FERRYNET_AGENT_HTTP").cloned().unwrap_or_default();
            for probe in ["livenessProbe", "readinessProbe"] {
                let port = &c[probe]["httpGet"]["port"];
                if !port.is_u64() || !http.ends_with(&format!(":{port}")) {
                    bad.push(format!("{name}: {probe} port {port} is not --http {http}"));
                }
            }
        }
        if path == "network create" {
            networks.push(argv.get(3).cloned().unwrap_or_default());
        }
        if path == "install-cni" {
            let value = |flag: &str| {
                let i = argv.iter().position(|a| a == flag);
                i.and_then(|i| argv.get(i + 1)).cloned().unwrap_or_default()
            };
            networks.push(value("--network"));
            // It writes where the node's directories are mounted.
            for (flag, host) in [
                ("--bin-dir", "/opt/cni/bin"),
                ("--conf-dir", "/etc/cni/net.d"),
            ] {
                if mounts.get(host) != Some(&value(flag)) {
                    bad.push(format!(
                        "{name}: {flag} {} is not where host path {host} is mounted",
                        value(flag)
                    ));
                }
            }
        }
        if path == "agent" {
            // The CNI plugin and `ferrynet status` on the node look at these very paths.
            for p in ["/var/lib/ferrynet", "/run/ferrynet"] {
                if mounts.get(p).map(String::as_str) != Some(p) {
                    bad.push(format!("{name}: host path {p} is not mounted at {p}"));
                }
            }
        }
        let mut full = argv.clone();
        full.extend(flags_from_env(&vars, &path, &env));
        if let Err(e) = ferrynet::cli::check_args(&full) {
            bad.push(format!("{name}: {full:?} does not parse: {e}"));
        }
    }
    if !agent_seen {
        bad.push("no container runs `ferrynet agent`".into());
    }
    if networks.len() != 2 || networks[0] != networks[1] {
        bad.push(format!(
            "the network created and the one install-cni installs differ: {networks:?}"
        ));
    }
    for p in [
        "/opt/cni/bin",
        "/etc/cni/net.d",
        "/run/ferrynet",
        "/var/lib/ferrynet",
    ] {
        if !mounted.iter().any(|(_, host, _)| host == p) {
            bad.push(format!("host path {p} is not mounted"));
        }
    }
    bad
}

/// The subcommand path the arguments select (`network create`).
fn subcommand_path(cmd: &clap::Command, args: &[String]) -> String {
    let mut path = Vec::new();
    let mut c = cmd;
    for a in args {
        match c.find_subcommand(a) {
            Some(s) => {
                path.push(s.get_name().to_string());
                c = s;
            }
            None => break,
        }
    }
    path.join(" ")
}

/// The variables of `env` that set flags of the command at `path` (or global ones), as flags:
/// what clap would read from the environment, given on the command line instead.
fn flags_from_env(vars: &[FlagVar], path: &str, env: &BTreeMap<String, String>) -> Vec<String> {
    let mut out = Vec::new();
    for v in vars {
        if !(v.path.is_empty() || v.path == path) {
            continue;
        }
        let Some(value) = env.get(&v.var) else {
            continue;
        };
        if v.takes_value {
            out.push(format!("--{}={value}", v.long));
        } else if truthy(value) {
            out.push(format!("--{}", v.long));
        }
    }
    out
}

#[test]
fn the_manifest_passes_the_lint() {
    let docs = documents(&manifest_text());
    let problems = lint(&docs);
    assert!(
        problems.is_empty(),
        "deploy/kubernetes/ferrynet.yaml: {problems:#?}"
    );
}

/// The lint is not blind: each broken copy of the manifest is caught for its own reason.
#[test]
fn the_lint_refuses_broken_manifests() {
    let text = manifest_text();
    let cases: &[(&str, &str, &str)] = &[
        ("hostNetwork: true", "hostNetwork: false", "hostNetwork"),
        (
            "\"network\", \"create\", \"k8s-pod-network\", \"--exist-ok\"",
            "\"network\", \"create\", \"k8s-pod-network\", \"--if-missing\"",
            "does not parse",
        ),
        (
            "command: [\"/usr/bin/ferrynet\", \"agent\"]",
            "command: [\"/usr/bin/ferrynet\", \"agentd\"]",
            "does not parse",
        ),
        (
            "FERRYNET_AGENT_HTTP: \"127.0.0.1:9470\"",
            "FERRYNET_AGENT_HTTP: \"127.0.0.1:9471\"",
            "livenessProbe",
        ),
        (
            "FERRYNET_LOG_FORMAT: \"json\"",
            "FERRYNET_LOG_FORMAT: \"yaml\"",
            "does not parse",
        ),
        (
            "FERRYNET_LOG: \"info\"",
            "FERRYNET_LOGLEVEL: \"info\"",
            "no variable",
        ),
        (
            "            - name: FERRYNET_AGENT_HOST_NAME",
            "            - name: FERRYNET_NODE_NAME",
            "no variable",
        ),
        (
            "              mountPath: /run/ferrynet\n",
            "              mountPath: /run/other\n",
            "/run/ferrynet",
        ),
        (
            "              mountPath: /host/opt/cni/bin\n",
            "              mountPath: /opt/cni/bin\n",
            "--bin-dir",
        ),
        ("path: /opt/cni/bin", "path: /opt/cni/bin2", "/opt/cni/bin"),
        (
            "            privileged: true\n            capabilities:",
            "            privileged: false\n            capabilities:",
            "not privileged",
        ),
        (
            "FERRYNET_STORE: \"etcd://10.0.0.10:2379\"",
            "FERRYNET_STORE: \"\"",
            "etcd",
        ),
    ];
    for (from, to, why) in cases {
        assert_eq!(
            text.matches(from).count(),
            1,
            "the manifest changed: {from:?}"
        );
        let broken = text.replacen(from, to, 1);
        let problems = lint(&documents(&broken));
        assert!(
            problems.iter().any(|p| p.contains(why)),
            "{from:?} → {to:?} should be refused for {why:?}; got {problems:#?}"
        );
    }
    let with_rbac =
        format!("{text}---\napiVersion: v1\nkind: ServiceAccount\nmetadata:\n  name: ferrynet\n");
    assert!(lint(&documents(&with_rbac))
        .iter()
        .any(|p| p.contains("RBAC")));
}
