//! ferrynet first in a chain, followed by the reference plugins (Debian's
//! containernetworking-plugins), executed exactly as a runtime executes a conflist.

mod common;

use common::*;
use serde_json::{json, Value};

const PLUGIN_DIRS: [&str; 2] = ["/usr/lib/cni", "/opt/cni/bin"];

fn plugin_path(name: &str) -> String {
    if name == "ferrynet" {
        return bin().to_string();
    }
    PLUGIN_DIRS
        .iter()
        .map(|d| format!("{d}/{name}"))
        .find(|p| std::path::Path::new(p).exists())
        .unwrap_or_else(|| panic!("reference CNI plugin {name} is not installed (apt-get install containernetworking-plugins)"))
}

/// Build plugin `i`'s config from a conflist the way a runtime does.
fn plugin_conf(list: &Value, i: usize, prev: Option<&Value>, runtime: &Value) -> Value {
    let mut c = list["plugins"][i].clone();
    c["cniVersion"] = list["cniVersion"].clone();
    c["name"] = list["name"].clone();
    if let Some(caps) = c.get("capabilities").and_then(Value::as_object).cloned() {
        let mut rc = json!({});
        for (k, on) in caps {
            if on == true {
                if let Some(v) = runtime.get(&k) {
                    rc[k] = v.clone();
                }
            }
        }
        c["runtimeConfig"] = rc;
    }
    if let Some(p) = prev {
        c["prevResult"] = p.clone();
    }
    c
}

#[test]
fn ferrynet_then_portmap_tuning_bandwidth_firewall() {
    let lab = Lab::new();
    let name = format!("chn{}", lab.tag);
    let list = json!({
        "cniVersion": "1.0.0",
        "name": name,
        "plugins": [
            {"type": "ferrynet", "subnets": [{"cidr": "10.230.0.0/24"}, {"cidr": "fd23::/64"}], "stateDir": lab.state.path().display().to_string(),
             "capabilities": {"portMappings": true}},
            {"type": "portmap", "capabilities": {"portMappings": true}, "snat": true},
            {"type": "tuning", "sysctl": {"net.ipv4.conf.eth0.accept_redirects": "0"}},
            {"type": "bandwidth", "ingressRate": 100000000, "ingressBurst": 1000000, "egressRate": 100000000, "egressBurst": 1000000},
            {"type": "firewall", "backend": "iptables"}
        ]
    });
    let runtime =
        json!({"portMappings": [{"hostPort": 8181, "containerPort": 80, "protocol": "tcp"}]});
    let ctr = Ns::new("c");
    let p = ctr.path();
    let env = [
        ("CNI_CONTAINERID", "chain1"),
        ("CNI_NETNS", p.as_str()),
        ("CNI_IFNAME", "eth0"),
    ];

    // ADD through the whole chain, each plugin getting the previous result.
    let mut prev: Option<Value> = None;
    let n = list["plugins"].as_array().unwrap().len();
    for i in 0..n {
        let ty = list["plugins"][i]["type"].as_str().unwrap();
        let conf = plugin_conf(&list, i, prev.as_ref(), &runtime);
        let c = lab.call_plugin(&plugin_path(ty), "ADD", &conf, &env);
        assert_eq!(c.code, 0, "{ty} ADD failed: {} {}", c.json, c.stderr);
        prev = Some(c.json);
    }
    let result = prev.clone().unwrap();
    assert_eq!(first_v4(&result), "10.230.0.2", "{result}");
    // tuning applied its sysctl inside the container; bandwidth shaped the host veth.
    assert_eq!(
        ctr.must(&["cat", "/proc/sys/net/ipv4/conf/eth0/accept_redirects"])
            .trim(),
        "0"
    );
    let veth = lab.host_links("fnv");
    assert_eq!(veth.len(), 1);
    let qd = lab.host.must(&["tc", "qdisc", "show", "dev", &veth[0]]);
    assert!(
        qd.contains("tbf") || qd.contains("ingress"),
        "bandwidth did not shape {}: {qd}",
        veth[0]
    );
    // The container still has connectivity through the chain's firewall.
    ctr.must(&["ping", "-c1", "-W2", "10.230.0.1"]);

    // CHECK through the chain with the final result. The reference portmap (Debian 1.1.1) fails
    // its own CHECK whatever comes before it: single-stack it looks for an ip6tables chain it
    // never created, dual-stack it looks for the IPv4 rules in the IPv6 chain. Its CHECK is
    // skipped; every other plugin, ferrynet included, is checked.
    for i in 0..n {
        let ty = list["plugins"][i]["type"].as_str().unwrap();
        if ty == "portmap" {
            continue;
        }
        let conf = plugin_conf(&list, i, Some(&result), &runtime);
        let c = lab.call_plugin(&plugin_path(ty), "CHECK", &conf, &env);
        assert_eq!(c.code, 0, "{ty} CHECK failed: {} {}", c.json, c.stderr);
    }

    // DEL in reverse order; twice, as runtimes do on retries.
    for _ in 0..2 {
        for i in (0..n).rev() {
            let ty = list["plugins"][i]["type"].as_str().unwrap();
            let conf = plugin_conf(&list, i, Some(&result), &runtime);
            let c = lab.call_plugin(&plugin_path(ty), "DEL", &conf, &env);
            assert_eq!(c.code, 0, "{ty} DEL failed: {} {}", c.json, c.stderr);
        }
    }
    assert!(lab.host_links("fnv").is_empty());
    assert!(Lab::addrs(&ctr, "eth0").is_empty());
}
