//! Runtimes that misbehave (issue 17, part 5): DEL with another network's config, CHECK after
//! the netns is gone, 100 concurrent ADD/DEL of one container ID, a runtime killed mid-ADD and
//! never calling DEL (GC collects it), and a config whose subnet changes under live
//! containers. Each gets a clear answer and leaves nothing half done: after the runtime's
//! normal next call, the host has no link, no anti-spoofing element and the store no
//! address or endpoint that nothing uses.

mod common;

use std::process::{Command, Stdio};
use std::time::Duration;

use common::{first_v4, Lab, Ns};
use ferrynet_store::{EmbeddedStore, Store};
use serde_json::{json, Value};

/// Endpoint records and address keys of `network` in the lab's store.
fn store_counts(lab: &Lab, network: &str) -> (usize, usize) {
    let store = EmbeddedStore::open(lab.state.path().join("store.redb")).expect("open store");
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let eps = store
            .range(&ferrynet_model::network::keys::endpoints(network))
            .await
            .expect("range")
            .0
            .len();
        let ips = store
            .range(&ferrynet_model::network::keys::ipam_prefix(network))
            .await
            .expect("range")
            .0
            .len();
        (eps, ips)
    })
}

/// Anti-spoofing elements (the `src4` set) in the lab host's `bridge ferrynet` table.
fn guard_elements(lab: &Lab) -> usize {
    let o = lab
        .host
        .run(&["nft", "-j", "list", "set", "bridge", "ferrynet", "src4"]);
    let v: Value = serde_json::from_slice(&o.stdout).unwrap_or(Value::Null);
    v["nftables"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|x| x["set"]["elem"].as_array())
        .map(|e| e.len())
        .sum()
}

fn env<'a>(id: &'a str, ns: &'a str) -> Vec<(&'a str, &'a str)> {
    vec![
        ("CNI_CONTAINERID", id),
        ("CNI_NETNS", ns),
        ("CNI_IFNAME", "eth0"),
    ]
}

#[test]
fn del_with_another_networks_config_leaves_the_attachment() {
    let lab = Lab::new();
    let a = lab.conf(&format!("mra{}", lab.tag), "10.211.0.0/24", None);
    let b = lab.conf(&format!("mrb{}", lab.tag), "10.212.0.0/24", None);
    let ctr = Ns::new("c");
    let r = lab.add(&a, "x", &ctr, "eth0");
    let ip = first_v4(&r);
    // The runtime sends the wrong network's config: nothing of network a is touched.
    let del = lab.del(&b, "x", Some(&ctr), "eth0");
    assert_eq!(del.code, 0, "{del:?}");
    assert!(
        Lab::addrs(&ctr, "eth0").iter().any(|x| x.starts_with(&ip)),
        "the attachment on {} lost its address",
        a["name"]
    );
    assert_eq!(lab.host_links("fnv").len(), 1);
    assert_eq!(store_counts(&lab, a["name"].as_str().unwrap()), (1, 1));
    let check = lab.cni("CHECK", &a, &env("x", &ctr.path()));
    assert_eq!(check.code, 0, "{check:?}");
    // The right config removes it.
    assert_eq!(lab.del(&a, "x", Some(&ctr), "eth0").code, 0);
    assert!(lab.host_links("fnv").is_empty());
    assert_eq!(store_counts(&lab, a["name"].as_str().unwrap()), (0, 0));
}

#[test]
fn check_after_the_netns_is_gone_is_an_error_and_del_cleans_up() {
    let lab = Lab::new();
    let conf = lab.conf(&format!("mrc{}", lab.tag), "10.213.0.0/24", None);
    let ctr = Ns::new("c");
    lab.add(&conf, "y", &ctr, "eth0");
    let path = ctr.path();
    drop(ctr);
    let check = lab.cni("CHECK", &conf, &env("y", &path));
    assert_ne!(check.code, 0, "CHECK of a vanished netns passed: {check:?}");
    let code = check.json["code"].as_u64().unwrap_or(0);
    assert!(code > 0, "no CNI error object: {check:?}");
    let msg = check.json["msg"].as_str().unwrap_or_default().to_string()
        + check.json["details"].as_str().unwrap_or_default();
    assert!(
        msg.contains("netns") || msg.contains("namespace"),
        "{check:?}"
    );
    // The runtime's next call, DEL, removes what is left.
    let del = lab.cni("DEL", &conf, &env("y", &path));
    assert_eq!(del.code, 0, "{del:?}");
    assert!(lab.host_links("fnv").is_empty());
    assert_eq!(guard_elements(&lab), 0);
    assert_eq!(store_counts(&lab, conf["name"].as_str().unwrap()), (0, 0));
}

#[test]
fn a_hundred_concurrent_adds_and_dels_of_one_container() {
    let lab = Lab::new();
    let conf = lab.conf(
        &format!("mrh{}", lab.tag),
        "10.214.0.0/24",
        Some("fd14::/64"),
    );
    let name = conf["name"].as_str().unwrap().to_string();
    let ctr = Ns::new("c");
    let path = ctr.path();
    let calls: Vec<(String, i32, Value)> = std::thread::scope(|s| {
        let hs: Vec<_> = (0..100)
            .map(|i| {
                let cmd = if i % 2 == 0 { "ADD" } else { "DEL" };
                let (lab, conf, path) = (&lab, &conf, &path);
                s.spawn(move || {
                    let c = lab.cni(cmd, conf, &env("same", path));
                    (cmd.to_string(), c.code, c.json)
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    // Every call succeeded or failed with a CNI error object that says why.
    for (cmd, code, json) in &calls {
        if *code != 0 {
            assert!(
                json["code"].as_u64().is_some_and(|c| c > 0)
                    && json["msg"].as_str().is_some_and(|m| !m.is_empty()),
                "{cmd} exited {code} without an error object: {json}"
            );
        }
    }
    // Whatever the interleaving, the state is one of "attached" or "not attached", whole.
    let links = lab.host_links("fnv").len();
    let addrs = Lab::addrs(&ctr, "eth0");
    let (eps, ips) = store_counts(&lab, &name);
    assert!(links <= 1 && eps <= 1, "{links} links, {eps} endpoints");
    if eps == 1 {
        assert_eq!(
            (links, ips),
            (1, 2),
            "a recorded endpoint without its link or addresses"
        );
        let check = lab.cni("CHECK", &conf, &env("same", &path));
        assert_eq!(check.code, 0, "recorded but broken: {check:?}");
    } else {
        assert_eq!(ips, 0, "addresses held by no endpoint");
    }
    // The runtime's last word, DEL, leaves nothing; a new ADD then works.
    assert_eq!(lab.cni("DEL", &conf, &env("same", &path)).code, 0);
    assert!(lab.host_links("fnv").is_empty());
    assert!(Lab::addrs(&ctr, "eth0").is_empty(), "{addrs:?}");
    assert_eq!(guard_elements(&lab), 0);
    assert_eq!(store_counts(&lab, &name), (0, 0));
    lab.add(&conf, "same", &ctr, "eth0");
}

#[test]
fn a_runtime_killed_mid_add_is_collected_by_gc() {
    let lab = Lab::new();
    let conf = lab.conf(
        &format!("mrk{}", lab.tag),
        "10.215.0.0/24",
        Some("fd15::/64"),
    );
    let name = conf["name"].as_str().unwrap().to_string();
    let keep = Ns::new("c");
    lab.add(&conf, "keep", &keep, "eth0");
    // The plugin is killed at different points of its ADD (the delays spread the kill over
    // the reservation, the link, the addresses and the record); the runtime never calls DEL.
    let mut victims = Vec::new();
    for (i, ms) in [0u64, 5, 10, 20, 30, 45, 60, 90, 130, 200]
        .iter()
        .enumerate()
    {
        let ns = Ns::new("c");
        let id = format!("killed{i}");
        let mut c = Command::new("nsenter");
        c.args([&lab.host.enter(), common::bin()])
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("CNI_COMMAND", "ADD")
            .env("CNI_CONTAINERID", &id)
            .env("CNI_NETNS", ns.path())
            .env("CNI_IFNAME", "eth0")
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        let mut child = c.spawn().expect("spawn plugin");
        use std::io::Write;
        child
            .stdin
            .take()
            .expect("stdin")
            .write_all(conf.to_string().as_bytes())
            .expect("write conf");
        std::thread::sleep(Duration::from_millis(*ms));
        // nsenter execs the plugin in place: its PID is the plugin's.
        let _ = child.kill();
        let _ = child.wait();
        victims.push(ns);
    }
    // GC with only the kept container valid collects every half-done ADD.
    let mut gc = conf.clone();
    gc["cni.dev/valid-attachments"] = json!([{"containerID": "keep", "ifname": "eth0"}]);
    let c = lab.cni("GC", &gc, &[]);
    assert_eq!(c.code, 0, "{c:?}");
    assert_eq!(
        lab.host_links("fnv").len(),
        1,
        "{:?}",
        lab.host_links("fnv")
    );
    assert_eq!(store_counts(&lab, &name), (1, 2));
    assert_eq!(guard_elements(&lab), 1);
    for ns in &victims {
        assert!(Lab::addrs(ns, "eth0").is_empty());
    }
    // The kept container still works: CHECK passes.
    let check = lab.cni("CHECK", &conf, &env("keep", &keep.path()));
    assert_eq!(check.code, 0, "{check:?}");
}

#[test]
fn a_subnet_changed_under_live_containers_is_refused_whole() {
    let lab = Lab::new();
    let name = format!("mrs{}", lab.tag);
    let conf = lab.conf(&name, "10.216.0.0/24", None);
    let ctr = Ns::new("c");
    let ip = first_v4(&lab.add(&conf, "live", &ctr, "eth0"));
    // The runtime's config now says another subnet for the same network.
    let changed = lab.conf(&name, "10.217.0.0/24", None);
    let other = Ns::new("c");
    let add = lab.cni("ADD", &changed, &env("new", &other.path()));
    assert_ne!(add.code, 0, "ADD under a changed subnet passed: {add:?}");
    assert_eq!(add.json["code"], 7, "{add:?}");
    let msg = add.json["msg"].as_str().unwrap_or_default().to_string()
        + add.json["details"].as_str().unwrap_or_default();
    assert!(
        msg.contains("10.216.0.0/24") && msg.contains("10.217.0.0/24"),
        "{msg}"
    );
    // Nothing half done: no link, no address for the refused one; the live one is intact.
    assert!(Lab::addrs(&other, "eth0").is_empty());
    assert_eq!(lab.host_links("fnv").len(), 1);
    assert_eq!(store_counts(&lab, &name), (1, 1));
    assert!(Lab::addrs(&ctr, "eth0").iter().any(|a| a.starts_with(&ip)));
    // DEL of the refused one succeeds (runtimes send it), the live one is untouched.
    assert_eq!(lab.cni("DEL", &changed, &env("new", &other.path())).code, 0);
    assert_eq!(store_counts(&lab, &name), (1, 1));
    // Once the last container is gone the network takes its new subnet.
    assert_eq!(lab.del(&conf, "live", Some(&ctr), "eth0").code, 0);
    let r = lab.add(&changed, "new", &other, "eth0");
    assert!(first_v4(&r).starts_with("10.217.0."), "{r}");
}
