//! Published ports, hairpin, localhost access, masquerade and isolation, with real traffic
//! between namespaces of this test.

mod common;

use common::*;
use serde_json::json;

fn with_ports(conf: &serde_json::Value, ports: serde_json::Value) -> serde_json::Value {
    let mut c = conf.clone();
    c["runtimeConfig"] = json!({ "portMappings": ports });
    c
}

#[test]
fn published_port_from_outside_host_itself_localhost_and_hairpin() {
    let lab = Lab::new();
    let conf = lab.conf(&format!("pub{}", lab.tag), "10.220.0.0/24", None);
    let (client, host_ip, client_ip) = lab.outside(20);
    let web = Ns::new("c");
    let res = lab.add(
        &with_ports(
            &conf,
            json!([{"hostPort": 8080, "containerPort": 80, "protocol": "tcp"}]),
        ),
        "web",
        &web,
        "eth0",
    );
    let web_ip = first_v4(&res);
    let _srv = tcp_server(&web, 80, "web");
    assert_eq!(lab.map_len("pm4_any"), 1);

    // From outside: DNAT, and the server sees the client's real address (no proxy).
    let got = tcp_get(&client, &host_ip, 8080).expect("outside client reaches the published port");
    assert_eq!(got, format!("web {client_ip}"));

    // From the host itself, on its own address and on 127.0.0.1.
    assert!(
        tcp_get(&lab.host, &host_ip, 8080).is_some(),
        "host -> own address:8080"
    );
    assert!(
        tcp_get(&lab.host, "127.0.0.1", 8080).is_some(),
        "host -> 127.0.0.1:8080"
    );

    // Hairpin: the container reaches its own published port through the host's address,
    // and so does a neighbour on the same network.
    assert!(tcp_get(&web, &host_ip, 8080).is_some(), "hairpin to itself");
    let nb = Ns::new("c");
    lab.add(&conf, "nb", &nb, "eth0");
    assert!(
        tcp_get(&nb, &host_ip, 8080).is_some(),
        "neighbour via host address"
    );
    // And directly, by container address.
    assert!(tcp_get(&nb, &web_ip, 80).is_some());

    // DEL withdraws the mapping.
    assert_eq!(lab.del(&conf, "web", Some(&web), "eth0").code, 0);
    assert_eq!(lab.map_len("pm4_any"), 0);
    assert!(tcp_get(&client, &host_ip, 8080).is_none());
}

#[test]
fn outbound_traffic_is_masqueraded_and_internal_networks_stay_inside() {
    let lab = Lab::new();
    let (client, host_ip, _client_ip) = lab.outside(21);
    let _srv = tcp_server(&client, 9000, "outside");
    let conf = lab.conf(&format!("out{}", lab.tag), "10.221.0.0/24", None);
    let c = Ns::new("c");
    lab.add(&conf, "c", &c, "eth0");
    let got = tcp_get(&c, "10.250.21.2", 9000).expect("container reaches outside");
    assert_eq!(
        got,
        format!("outside {host_ip}"),
        "source must be the host's address"
    );

    let mut internal = lab.conf(&format!("int{}", lab.tag), "10.222.0.0/24", None);
    internal["internal"] = json!(true);
    let i = Ns::new("c");
    lab.add(&internal, "i", &i, "eth0");
    assert!(
        tcp_get(&i, "10.250.21.2", 9000).is_none(),
        "internal network must not reach outside"
    );
}

#[test]
fn networks_are_isolated_from_each_other() {
    let lab = Lab::new();
    let a = lab.conf(&format!("isa{}", lab.tag), "10.223.0.0/24", None);
    let b = lab.conf(&format!("isb{}", lab.tag), "10.224.0.0/24", None);
    let (ca, cb) = (Ns::new("c"), Ns::new("c"));
    lab.add(&a, "a", &ca, "eth0");
    let rb = lab.add(&b, "b", &cb, "eth0");
    let _srv = tcp_server(&cb, 80, "b");
    assert!(
        tcp_get(&ca, &first_v4(&rb), 80).is_none(),
        "network a must not reach network b"
    );
    // The same container on both networks (two interfaces) reaches b.
    lab.add(&b, "a", &ca, "eth1");
    assert!(tcp_get(&ca, &first_v4(&rb), 80).is_some());
}

#[test]
fn a_published_port_is_taken_once_and_failure_leaves_nothing() {
    let lab = Lab::new();
    let conf = lab.conf(&format!("prt{}", lab.tag), "10.225.0.0/24", None);
    let p = json!([{"hostPort": 8081, "containerPort": 80}]);
    let (a, b) = (Ns::new("c"), Ns::new("c"));
    lab.add(&with_ports(&conf, p.clone()), "a", &a, "eth0");
    let r = lab.cni(
        "ADD",
        &with_ports(&conf, p),
        &[
            ("CNI_CONTAINERID", "b"),
            ("CNI_NETNS", &b.path()),
            ("CNI_IFNAME", "eth0"),
        ],
    );
    assert_eq!(r.json["code"], 101, "{:?}", r);
    assert!(r.json["msg"].as_str().unwrap_or("").contains("8081"));
    assert!(Lab::addrs(&b, "eth0").is_empty());
    assert_eq!(lab.host_links("fnv").len(), 1);
    assert_eq!(lab.map_len("pm4_any"), 1);
    // A specific host address on a port that is free everywhere works, UDP on the same port too.
    let c = Ns::new("c");
    lab.add(
        &with_ports(&conf, json!([{"hostPort": 8081, "containerPort": 53, "protocol": "udp"}, {"hostPort": 8082, "containerPort": 80, "hostIP": "10.250.22.1"}])),
        "c",
        &c,
        "eth0",
    );
    assert_eq!(lab.map_len("pm4_ip"), 1);
}

#[test]
fn port_ranges_become_one_element_per_port() {
    let lab = Lab::new();
    let conf = lab.conf(&format!("rng{}", lab.tag), "10.226.0.0/24", None);
    let ports: Vec<_> = (0..500)
        .map(|i| json!({"hostPort": 20000 + i, "containerPort": 20000 + i}))
        .collect();
    let c = Ns::new("c");
    lab.add(&with_ports(&conf, json!(ports)), "r", &c, "eth0");
    assert_eq!(lab.map_len("pm4_any"), 500);
    assert_eq!(lab.del(&conf, "r", Some(&c), "eth0").code, 0);
    assert_eq!(lab.map_len("pm4_any"), 0);
}

#[test]
fn reload_restores_a_flushed_ruleset() {
    let lab = Lab::new();
    let conf = lab.conf(&format!("rl{}", lab.tag), "10.227.0.0/24", None);
    let (client, host_ip, _) = lab.outside(27);
    let web = Ns::new("c");
    lab.add(
        &with_ports(&conf, json!([{"hostPort": 8090, "containerPort": 80}])),
        "w",
        &web,
        "eth0",
    );
    let _srv = tcp_server(&web, 80, "w");
    assert!(tcp_get(&client, &host_ip, 8090).is_some());
    lab.host
        .must(&["nft", "delete", "table", "inet", "ferrynet"]);
    assert!(tcp_get(&client, &host_ip, 8090).is_none());
    let o = lab.cli(&["reload"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(tcp_get(&client, &host_ip, 8090).is_some());
}

#[test]
fn works_beside_a_forward_drop_policy_without_changing_it() {
    // What Docker does to every host it runs on: iptables FORWARD policy DROP. With
    // br_netfilter even bridged frames traverse it.
    let lab = Lab::new();
    lab.host.must(&["iptables", "-P", "FORWARD", "DROP"]);
    lab.host.must(&["ip6tables", "-P", "FORWARD", "DROP"]);
    lab.host.must(&["iptables", "-N", "DOCKER-USER"]);
    let conf = lab.conf(
        &format!("dk{}", lab.tag),
        "10.228.0.0/24",
        Some("fd22:8::/64"),
    );
    let (client, host_ip, _) = lab.outside(28);
    let (a, b) = (Ns::new("c"), Ns::new("c"));
    let ra = lab.add(
        &with_ports(&conf, json!([{"hostPort": 8095, "containerPort": 80}])),
        "a",
        &a,
        "eth0",
    );
    lab.add(&conf, "b", &b, "eth0");
    let _srv = tcp_server(&a, 80, "a");
    assert!(
        tcp_get(&b, &first_v4(&ra), 80).is_some(),
        "container to container across the bridge"
    );
    b.must(&["ping", "-6", "-c1", "-W2", "fd22:8::2"]);
    assert!(
        tcp_get(&client, &host_ip, 8095).is_some(),
        "outside client to the published port"
    );
    // The policies and the foreign chain are untouched.
    let rules = lab.host.must(&["iptables", "-S"]);
    assert!(
        rules.contains("-P FORWARD DROP") && rules.contains("-N DOCKER-USER"),
        "{rules}"
    );
    assert!(lab
        .host
        .must(&["ip6tables", "-S"])
        .contains("-P FORWARD DROP"));
}
