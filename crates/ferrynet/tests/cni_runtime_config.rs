//! Runtime configuration the way Go runtimes send it (containerd's untagged structs), and
//! published ports on `0.0.0.0` / `::`: real kernel, a client namespace outside the host.

mod common;

use common::*;
use serde_json::{json, Value};

/// An outside client wired to the lab's host over IPv4 and IPv6; returns the client and the
/// host's two addresses on that link.
fn dual_stack_client(lab: &Lab, n: u8) -> (Ns, String, String) {
    let client = Ns::new("o");
    let link = format!("fto{}", tag());
    let (h4, c4) = (format!("10.251.{n}.1"), format!("10.251.{n}.2"));
    let (h6, c6) = (format!("fd51:{n}::1"), format!("fd51:{n}::2"));
    wire_client(Some(&lab.host), &client, &link, &h4, &c4);
    lab.host.must(&[
        "ip",
        "-6",
        "addr",
        "add",
        &format!("{h6}/64"),
        "dev",
        &link,
        "nodad",
    ]);
    client.must(&[
        "ip",
        "-6",
        "addr",
        "add",
        &format!("{c6}/64"),
        "dev",
        "ext0",
        "nodad",
    ]);
    client.must(&["ip", "-6", "route", "add", "default", "via", &h6]);
    (client, h4, h6)
}

/// The plugin config containerd 1.6 hands over (go-cni's structs have no JSON tags).
fn containerd_conf(base: &Value, mappings: Value) -> Value {
    let mut c = base.clone();
    c["capabilities"] = json!({"portMappings": true, "bandwidth": true});
    c["runtimeConfig"] = json!({ "portMappings": mappings });
    c
}

fn add_env<'a>(id: &'a str, ns: &'a str) -> Vec<(&'a str, &'a str)> {
    vec![
        ("CNI_CONTAINERID", id),
        ("CNI_NETNS", ns),
        ("CNI_IFNAME", "eth0"),
        (
            "CNI_ARGS",
            "IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME=web;K8S_POD_UID=u1",
        ),
    ]
}

fn keys_of(elems: &[Value]) -> String {
    serde_json::to_string(elems).unwrap_or_default()
}

#[test]
fn containerd_port_mappings_on_the_any_address_of_each_family() {
    let lab = Lab::new();
    let base = lab.conf(
        &format!("rc{}", lab.tag),
        "10.231.0.0/24",
        Some("fd23:1::/64"),
    );
    let (client, h4, h6) = dual_stack_client(&lab, 31);
    let web = Ns::new("c");
    let conf = containerd_conf(
        &base,
        json!([
            {"HostPort": 18090, "ContainerPort": 80, "Protocol": "tcp", "HostIP": "0.0.0.0"},
            {"HostPort": 18091, "ContainerPort": 80, "Protocol": "tcp", "HostIP": "::"},
            {"HostPort": 18092, "ContainerPort": 80, "Protocol": "TCP", "HostIP": ""}
        ]),
    );
    let add = lab.cni("ADD", &conf, &add_env("web", &web.path()));
    assert_eq!(add.code, 0, "{} {}", add.json, add.stderr);
    let _srv = tcp_server(&web, 80, "web");

    // 0.0.0.0 answers on every IPv4 address, :: on every IPv6 one, "" on both.
    assert!(
        tcp_get(&client, &h4, 18090).is_some(),
        "0.0.0.0:18090 over IPv4"
    );
    assert!(
        tcp_get(&client, &h6, 18091).is_some(),
        "[::]:18091 over IPv6"
    );
    assert!(
        tcp_get(&client, &h4, 18092).is_some(),
        "\"\":18092 over IPv4"
    );
    assert!(
        tcp_get(&client, &h6, 18092).is_some(),
        "\"\":18092 over IPv6"
    );
    // Each family's "any" stays in its family.
    assert!(
        tcp_get(&client, &h6, 18090).is_none(),
        "0.0.0.0 must not answer IPv6"
    );
    assert!(
        tcp_get(&client, &h4, 18091).is_none(),
        ":: must not answer IPv4"
    );
    // No element is keyed by an unspecified address (it would match nothing).
    let (p4, p6) = (
        map_elements(Some(&lab.host.name), "pm4_any"),
        map_elements(Some(&lab.host.name), "pm6_any"),
    );
    assert_eq!(
        (p4.len(), p6.len()),
        (2, 2),
        "{} {}",
        keys_of(&p4),
        keys_of(&p6)
    );
    assert_eq!(lab.map_len("pm4_ip") + lab.map_len("pm6_ip"), 0);

    // The claims follow the families: another pod can take 18090 on IPv6 but not on IPv4.
    let other = Ns::new("c");
    let conf_v4 = containerd_conf(
        &base,
        json!([{"HostPort": 18090, "ContainerPort": 80, "HostIP": "127.0.0.1"}]),
    );
    let taken = lab.cni("ADD", &conf_v4, &add_env("other", &other.path()));
    assert_ne!(
        taken.code, 0,
        "18090 on 127.0.0.1 overlaps 0.0.0.0: {}",
        taken.json
    );
    let conf_v6 = containerd_conf(
        &base,
        json!([{"HostPort": 18090, "ContainerPort": 80, "HostIP": "::"}]),
    );
    let ok = lab.cni("ADD", &conf_v6, &add_env("other", &other.path()));
    assert_eq!(ok.code, 0, "[::]:18090 is free: {} {}", ok.json, ok.stderr);
    assert_eq!(lab.del(&conf_v6, "other", Some(&other), "eth0").code, 0);

    assert_eq!(lab.del(&conf, "web", Some(&web), "eth0").code, 0);
    assert_eq!(lab.map_len("pm4_any") + lab.map_len("pm6_any"), 0);
    assert!(tcp_get(&client, &h4, 18090).is_none());
}

#[test]
fn zero_ports_are_refused_with_code_7_and_leave_nothing() {
    let lab = Lab::new();
    let net = format!("rz{}", lab.tag);
    let base = lab.conf(&net, "10.232.0.0/24", None);
    let ns = Ns::new("c");
    for mappings in [
        json!([{"HostPort": 0, "ContainerPort": 80, "Protocol": "tcp"}]),
        json!([{"ContainerPort": 80}]),
        json!([{"HostPort": 18093, "ContainerPort": 80},
               {"HostPort": 18094, "ContainerPort": 0}]),
    ] {
        let c = lab.cni(
            "ADD",
            &containerd_conf(&base, mappings.clone()),
            &add_env("zero", &ns.path()),
        );
        assert_eq!(c.code, 1, "{mappings}: {}", c.json);
        assert_eq!(c.json["code"], 7, "{mappings}: {}", c.json);
        let msg = c.json["msg"].as_str().unwrap_or_default();
        assert!(
            msg.contains("Port") && msg.contains("portMappings"),
            "{msg}"
        );
    }
    // Nothing half done: no link in either namespace, no element, no endpoint.
    assert!(
        lab.host_links("fnv").is_empty(),
        "{:?}",
        lab.host_links("fnv")
    );
    assert!(links_in(Some(&ns.name), &["eth0"]).is_empty());
    assert_eq!(lab.map_len("pm4_any"), 0);
    let o = lab.cli(&["network", "inspect", &net]);
    if o.status.success() {
        let v: Value = serde_json::from_slice(&o.stdout).unwrap_or(Value::Null);
        assert_eq!(v["endpoints"], json!([]), "{v}");
    }
}

#[test]
fn unknown_cni_args_follow_the_ignore_unknown_convention() {
    let lab = Lab::new();
    let base = lab.conf(&format!("ra{}", lab.tag), "10.233.0.0/24", None);
    let ns = Ns::new("c");
    let env = |args: &'static str| {
        vec![
            ("CNI_CONTAINERID", "argsc"),
            ("CNI_IFNAME", "eth0"),
            ("CNI_ARGS", args),
        ]
    };
    let path = ns.path();
    let call = |args: &'static str| {
        let mut e = env(args);
        e.push(("CNI_NETNS", &path));
        lab.cni("ADD", &base, &e)
    };
    let c = call("K8S_POD_NAMESPACE=default;FOO=bar");
    assert_eq!(c.json["code"], 4, "{}", c.json);
    assert!(c.json["msg"].as_str().unwrap_or_default().contains("FOO"));
    assert!(lab.host_links("fnv").is_empty());
    // Not DNS labels: refused, nothing made.
    let c = call("IgnoreUnknown=1;K8S_POD_NAMESPACE=a.b;K8S_POD_NAME=x");
    assert_eq!(c.json["code"], 7, "{}", c.json);
    assert!(c.json["msg"]
        .as_str()
        .unwrap_or_default()
        .contains("K8S_POD_NAMESPACE"));
    assert!(lab.host_links("fnv").is_empty());
    let c = call("IgnoreUnknown=1;FOO=bar;K8S_POD_NAMESPACE=default;K8S_POD_NAME=x");
    assert_eq!(c.code, 0, "{} {}", c.json, c.stderr);
    // DEL never refuses: it must always be able to clean up.
    let d = lab.cni(
        "DEL",
        &base,
        &[
            ("CNI_CONTAINERID", "argsc"),
            ("CNI_IFNAME", "eth0"),
            ("CNI_ARGS", "FOO=bar;K8S_POD_NAME=not a label"),
        ],
    );
    assert_eq!(d.code, 0, "{} {}", d.json, d.stderr);
    assert!(lab.host_links("fnv").is_empty());
}
