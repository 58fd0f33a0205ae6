//! Stale bridges: a bridge whose network is gone keeps its gateway address and a `linkdown`
//! route that still takes its subnet's traffic, black-holing a newer network on the same subnet
//! (seen: a published port of the new network answered nothing). The overlap check counts such
//! routes, `ferrynet reload` removes such bridges, and the last CNI DEL of a network only a CNI
//! config defines removes its bridge and record.

mod common;

use std::time::Duration;

use common::*;
use serde_json::json;

/// The main-table routes of `ns` as `ip -j route` objects.
fn routes(ns: &Ns) -> Vec<serde_json::Value> {
    serde_json::from_str(&ns.must(&["ip", "-j", "route", "show"])).unwrap_or_default()
}

#[test]
fn a_linkdown_route_counts_as_taken_until_reload_removes_its_stale_bridge() {
    let lab = Lab::new();
    // What a network removed behind ferrynet's back leaves: its bridge, up, no ports, with the
    // gateway address; the kernel keeps the subnet route and marks it linkdown.
    let stale = format!("fn-st{}", lab.tag);
    lab.host
        .must(&["ip", "link", "add", &stale, "type", "bridge"]);
    lab.host
        .must(&["ip", "addr", "add", "10.213.0.1/24", "dev", &stale]);
    lab.host.must(&["ip", "link", "set", &stale, "up"]);
    // Its last port came and went: the bridge loses carrier and the route turns linkdown.
    let port = format!("fsp{}", lab.tag);
    let peer = format!("fsq{}", lab.tag);
    lab.host.must(&[
        "ip", "link", "add", &port, "type", "veth", "peer", "name", &peer,
    ]);
    lab.host
        .must(&["ip", "link", "set", &port, "master", &stale, "up"]);
    lab.host.must(&["ip", "link", "set", &peer, "up"]);
    within(Duration::from_secs(10), || {
        let l = lab.host.must(&["ip", "-j", "link", "show", &stale]);
        l.contains("\"operstate\":\"UP\"").then_some(()).ok_or(l)
    });
    lab.host.must(&["ip", "link", "del", &port]);
    within(Duration::from_secs(10), || {
        let r = routes(&lab.host);
        r.iter()
            .find(|r| r["dst"] == "10.213.0.0/24")
            .filter(|r| r["flags"].to_string().contains("linkdown"))
            .map(|_| ())
            .ok_or(format!("no linkdown subnet route: {r:?}"))
    });

    let net = format!("sb{}", lab.tag);
    let o = lab.cli(&["network", "create", &net, "--subnet", "10.213.0.0/24"]);
    let msg = out(&o);
    assert!(
        !o.status.success(),
        "a subnet under a linkdown route was accepted: {msg}"
    );
    assert!(
        msg.contains(&stale) && msg.contains("linkdown"),
        "the error must name the device and say linkdown: {msg}"
    );

    // reload removes bridges of networks that no longer exist (and no other bridge).
    let keep = format!("kb{}", lab.tag);
    lab.host
        .must(&["ip", "link", "add", &keep, "type", "bridge"]);
    let o = lab.cli(&["reload"]);
    assert!(o.status.success(), "{}", out(&o));
    assert!(out(&o).contains(&stale), "{}", out(&o));
    assert!(
        lab.host_links(&stale).is_empty(),
        "stale bridge still there"
    );
    assert_eq!(
        lab.host_links(&keep),
        vec![keep.clone()],
        "reload removed a foreign bridge"
    );

    let o = lab.cli(&["network", "create", &net, "--subnet", "10.213.0.0/24"]);
    assert!(o.status.success(), "{}", out(&o));
    // A live network's bridge is kept by reload, and a network made with `network create`
    // is not retired by its last CNI DEL.
    let conf = json!({"cniVersion": "1.1.0", "name": net, "type": "ferrynet",
        "stateDir": lab.state.path().display().to_string()});
    let c = Ns::new("c");
    lab.add(&conf, "k1", &c, "eth0");
    let o = lab.cli(&["reload"]);
    assert!(o.status.success(), "{}", out(&o));
    assert_eq!(lab.host_links(&format!("fn-{net}")).len(), 1);
    c.must(&["ping", "-c1", "-W2", "10.213.0.1"]);
    assert_eq!(lab.del(&conf, "k1", Some(&c), "eth0").code, 0);
    let ls = out(&lab.cli(&["network", "ls"]));
    assert!(ls.contains(&net), "a created network was retired: {ls}");
    let o = lab.cli(&["network", "rm", &net]);
    assert!(o.status.success(), "{}", out(&o));
}

#[test]
fn the_last_cni_del_removes_a_config_networks_bridge_so_a_new_network_on_its_subnet_works() {
    let lab = Lab::new();
    let old = format!("old{}", lab.tag);
    let conf = lab.conf(&old, "10.214.0.0/24", None);
    let c1 = Ns::new("c");
    let c2 = Ns::new("c");
    lab.add(&conf, "o1", &c1, "eth0");
    lab.add(&conf, "o2", &c2, "eth0");
    let bridge = format!("fn-{old}");
    assert_eq!(lab.host_links(&bridge).len(), 1);

    // Not the last: the bridge stays for the other container.
    assert_eq!(lab.del(&conf, "o1", Some(&c1), "eth0").code, 0);
    assert_eq!(lab.host_links(&bridge).len(), 1);
    c2.must(&["ping", "-c1", "-W2", "10.214.0.1"]);
    // The last: bridge, address, route and record go.
    assert_eq!(lab.del(&conf, "o2", Some(&c2), "eth0").code, 0);
    assert!(
        lab.host_links(&bridge).is_empty(),
        "bridge kept after the last DEL"
    );
    assert!(
        !routes(&lab.host)
            .iter()
            .any(|r| r["dst"] == "10.214.0.0/24"),
        "{:?}",
        routes(&lab.host)
    );
    let ls = out(&lab.cli(&["network", "ls"]));
    assert!(
        !ls.contains(&old),
        "the network outlived its last container: {ls}"
    );

    // A new network on the same subnet, with a published port: reachable from outside.
    let new = format!("new{}", lab.tag);
    let mut conf2 = lab.conf(&new, "10.214.0.0/24", None);
    conf2["runtimeConfig"] =
        json!({"portMappings": [{"hostPort": 8214, "containerPort": 80, "protocol": "tcp"}]});
    let c3 = Ns::new("c");
    let res = lab.add(&conf2, "n1", &c3, "eth0");
    assert_eq!(first_v4(&res), "10.214.0.2", "{res}");
    let _server = tcp_server(&c3, 80, "hello");
    let (client, host_ip, _) = lab.outside(214);
    let got = tcp_get(&client, &host_ip, 8214);
    assert!(
        got.as_deref().is_some_and(|g| g.starts_with("hello")),
        "published port of the new network: {got:?}"
    );

    // The same config again after its last DEL: the next ADD recreates the network.
    assert_eq!(lab.del(&conf2, "n1", Some(&c3), "eth0").code, 0);
    let res = lab.add(&conf, "o3", &c1, "eth0");
    assert_eq!(first_v4(&res), "10.214.0.2", "{res}");
    assert_eq!(lab.del(&conf, "o3", Some(&c1), "eth0").code, 0);
}
