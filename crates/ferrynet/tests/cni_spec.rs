//! CNI behaviour, driven as a container runtime would: environment, stdin config, stdout
//! result, exit codes; real namespaces, veths, bridges and nftables inside a throwaway host netns.

mod common;

use common::*;
use serde_json::{json, Value};

#[test]
fn version_lists_supported_versions() {
    let lab = Lab::new();
    let c = lab.cni("VERSION", &json!({"cniVersion": "1.0.0"}), &[]);
    assert_eq!(c.code, 0, "{:?}", c);
    let v: Vec<&str> = c.json["supportedVersions"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(Value::as_str)
        .collect();
    for want in ["0.3.1", "0.4.0", "1.0.0", "1.1.0"] {
        assert!(v.contains(&want), "{v:?} lacks {want}");
    }
}

#[test]
fn add_check_del_lifecycle_v4_v6() {
    let lab = Lab::new();
    let net = format!("life{}", lab.tag);
    let conf = lab.conf(&net, "10.201.0.0/24", Some("fd20:1::/64"));
    let ctr = Ns::new("c");
    let res = lab.add(&conf, "ctr1", &ctr, "eth0");

    // The result: two interfaces (host veth, container), two addresses on the container iface.
    assert_eq!(res["cniVersion"], "1.1.0");
    let ips = res["ips"].as_array().unwrap();
    assert_eq!(ips.len(), 2, "{res}");
    assert_eq!(ips[0]["address"], "10.201.0.2/24");
    assert_eq!(ips[0]["gateway"], "10.201.0.1");
    let idx = ips[0]["interface"].as_u64().unwrap() as usize;
    assert_eq!(res["interfaces"][idx]["name"], "eth0");
    assert_eq!(res["interfaces"][idx]["sandbox"], ctr.path());

    // The kernel agrees.
    let addrs = Lab::addrs(&ctr, "eth0");
    assert!(addrs.contains(&"10.201.0.2/24".to_string()), "{addrs:?}");
    assert!(addrs.iter().any(|a| a.starts_with("fd20:1::")), "{addrs:?}");
    let routes = ctr.must(&["ip", "route", "show", "default"]);
    assert!(routes.contains("via 10.201.0.1"), "{routes}");
    // IPv6 usable at once (no DAD wait): ping the gateway over both families.
    ctr.must(&["ping", "-c1", "-W2", "10.201.0.1"]);
    ctr.must(&["ping", "-6", "-c1", "-W2", "fd20:1::1"]);

    // CHECK passes with the prevResult.
    let mut check_conf = conf.clone();
    check_conf["prevResult"] = res.clone();
    let env = [
        ("CNI_CONTAINERID", "ctr1"),
        ("CNI_NETNS", &ctr.path() as &str),
        ("CNI_IFNAME", "eth0"),
    ];
    let c = lab.cni("CHECK", &check_conf, &env);
    assert_eq!(c.code, 0, "{:?}", c);

    // DEL removes everything; a second DEL succeeds too; CHECK now says unknown container.
    assert_eq!(lab.del(&conf, "ctr1", Some(&ctr), "eth0").code, 0);
    assert!(Lab::addrs(&ctr, "eth0").is_empty());
    assert!(
        lab.host_links("fnv").is_empty(),
        "{:?}",
        lab.host_links("fnv")
    );
    assert_eq!(lab.del(&conf, "ctr1", Some(&ctr), "eth0").code, 0);
    let c = lab.cni("CHECK", &check_conf, &env);
    assert_eq!(c.json["code"], 3, "{:?}", c);
}

#[test]
fn check_detects_a_removed_interface() {
    let lab = Lab::new();
    let conf = lab.conf(&format!("chk{}", lab.tag), "10.202.0.0/24", None);
    let ctr = Ns::new("c");
    let res = lab.add(&conf, "c1", &ctr, "eth0");
    ctr.must(&["ip", "link", "del", "eth0"]);
    let mut cc = conf.clone();
    cc["prevResult"] = res;
    let c = lab.cni(
        "CHECK",
        &cc,
        &[
            ("CNI_CONTAINERID", "c1"),
            ("CNI_NETNS", &ctr.path()),
            ("CNI_IFNAME", "eth0"),
        ],
    );
    assert_ne!(c.code, 0);
    assert!(
        c.json["msg"].as_str().unwrap_or("").contains("missing"),
        "{:?}",
        c
    );
    assert_eq!(lab.del(&conf, "c1", Some(&ctr), "eth0").code, 0);
}

#[test]
fn repeated_add_returns_the_same_address() {
    let lab = Lab::new();
    let conf = lab.conf(&format!("rep{}", lab.tag), "10.203.0.0/24", None);
    let ctr = Ns::new("c");
    let a = lab.add(&conf, "same", &ctr, "eth0");
    let b = lab.add(&conf, "same", &ctr, "eth0");
    assert_eq!(first_v4(&a), first_v4(&b));
    // A different container gets a different address.
    let ctr2 = Ns::new("c");
    let c = lab.add(&conf, "other", &ctr2, "eth0");
    assert_ne!(first_v4(&a), first_v4(&c));
}

#[test]
fn del_is_idempotent_for_unknown_containers_and_vanished_netns() {
    let lab = Lab::new();
    let conf = lab.conf(&format!("del{}", lab.tag), "10.204.0.0/24", None);
    // Never added, network never created: still success.
    assert_eq!(lab.del(&conf, "ghost", None, "eth0").code, 0);
    // The DEL a runtime sends after an ADD refused for an invalid option succeeds too
    // (containerd keeps the sandbox until it does).
    let mut bad = conf.clone();
    bad["ipMasq"] = serde_json::json!("sometimes");
    let ctr = Ns::new("c");
    let add = lab.cni(
        "ADD",
        &bad,
        &[
            ("CNI_CONTAINERID", "refused"),
            ("CNI_NETNS", &ctr.path()),
            ("CNI_IFNAME", "eth0"),
        ],
    );
    assert_eq!(add.json["code"], 7, "{add:?}");
    let del = lab.del(&bad, "refused", Some(&ctr), "eth0");
    assert_eq!(del.code, 0, "{del:?}");
    drop(ctr);
    // Added, then the netns vanished before DEL.
    let ctr = Ns::new("c");
    lab.add(&conf, "gone", &ctr, "eth0");
    let path = ctr.path();
    drop(ctr);
    let c = lab.cni(
        "DEL",
        &conf,
        &[
            ("CNI_CONTAINERID", "gone"),
            ("CNI_NETNS", &path),
            ("CNI_IFNAME", "eth0"),
        ],
    );
    assert_eq!(c.code, 0, "{:?}", c);
    assert!(lab.host_links("fnv").is_empty());
    // Its address is free again: the next container can take it.
    let ctr = Ns::new("c");
    let r = lab.add(&conf, "next", &ctr, "eth0");
    assert!(!first_v4(&r).is_empty());
}

/// What is wrong, the config, the environment, the expected CNI error code.
type BadCase<'a> = (&'a str, Value, Vec<(&'a str, &'a str)>, u64);

#[test]
fn bad_inputs_get_the_right_error_codes() {
    let lab = Lab::new();
    let conf = lab.conf(&format!("bad{}", lab.tag), "10.205.0.0/24", None);
    let ctr = Ns::new("c");
    let p = ctr.path();
    let cases: Vec<BadCase> = vec![
        (
            "missing netns",
            conf.clone(),
            vec![("CNI_CONTAINERID", "x"), ("CNI_IFNAME", "eth0")],
            4,
        ),
        (
            "missing container id",
            conf.clone(),
            vec![("CNI_NETNS", &p), ("CNI_IFNAME", "eth0")],
            4,
        ),
        (
            "ifname too long",
            conf.clone(),
            vec![
                ("CNI_CONTAINERID", "x"),
                ("CNI_NETNS", &p),
                ("CNI_IFNAME", "abcdefghijklmnop"),
            ],
            4,
        ),
        (
            "netns path absent",
            conf.clone(),
            vec![
                ("CNI_CONTAINERID", "x"),
                ("CNI_NETNS", "/run/netns/fnt-none"),
                ("CNI_IFNAME", "eth0"),
            ],
            4,
        ),
        (
            "unsupported version",
            json!({"cniVersion": "9.9.9", "name": "n", "type": "ferrynet"}),
            vec![
                ("CNI_CONTAINERID", "x"),
                ("CNI_NETNS", &p),
                ("CNI_IFNAME", "eth0"),
            ],
            1,
        ),
        (
            "missing name",
            json!({"cniVersion": "1.0.0", "type": "ferrynet"}),
            vec![
                ("CNI_CONTAINERID", "x"),
                ("CNI_NETNS", &p),
                ("CNI_IFNAME", "eth0"),
            ],
            7,
        ),
        (
            "bad subnet",
            {
                let mut c = conf.clone();
                c["subnets"] = json!([{"cidr": "10.205.0.0/33"}]);
                c
            },
            vec![
                ("CNI_CONTAINERID", "x"),
                ("CNI_NETNS", &p),
                ("CNI_IFNAME", "eth0"),
            ],
            7,
        ),
        (
            "ipam dhcp",
            {
                let mut c = conf.clone();
                c["ipam"] = json!({"type": "dhcp"});
                c
            },
            vec![
                ("CNI_CONTAINERID", "x"),
                ("CNI_NETNS", &p),
                ("CNI_IFNAME", "eth0"),
            ],
            2,
        ),
    ];
    for (what, c, env, code) in cases {
        let r = lab.cni("ADD", &c, &env);
        assert_ne!(r.code, 0, "{what}: exit 0");
        assert_eq!(r.json["code"].as_u64(), Some(code), "{what}: {:?}", r);
        assert!(
            !r.json["msg"].as_str().unwrap_or("").is_empty(),
            "{what}: no msg"
        );
    }
    // Not JSON at all: decode failure.
    let mut cmd = std::process::Command::new("nsenter");
    cmd.args([&lab.host.enter(), bin()])
        .env("CNI_COMMAND", "ADD")
        .env("CNI_CONTAINERID", "x")
        .env("CNI_NETNS", &p)
        .env("CNI_IFNAME", "eth0")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped());
    let mut ch = cmd.spawn().unwrap();
    std::io::Write::write_all(&mut ch.stdin.take().unwrap(), b"{not json").unwrap();
    let o = ch.wait_with_output().unwrap();
    let v: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["code"], 6);
    // A runtime that lost CNI_COMMAND (the rest of CNI's environment present, no arguments)
    // gets an error object with code 4, not the CLI's usage text.
    let mut cmd = std::process::Command::new("nsenter");
    cmd.args([&lab.host.enter(), bin()])
        .env_remove("CNI_COMMAND")
        .env("CNI_CONTAINERID", "x")
        .env("CNI_NETNS", &p)
        .env("CNI_IFNAME", "eth0")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped());
    let mut ch = cmd.spawn().unwrap();
    std::io::Write::write_all(
        &mut ch.stdin.take().unwrap(),
        serde_json::to_string(&conf).unwrap().as_bytes(),
    )
    .unwrap();
    let o = ch.wait_with_output().unwrap();
    assert!(!o.status.success(), "exit 0 without CNI_COMMAND");
    let v: Value = serde_json::from_slice(&o.stdout)
        .unwrap_or_else(|e| panic!("no CNI error object on stdout ({e}): {o:?}"));
    assert_eq!(v["code"], 4, "{v}");
    assert!(
        v["msg"].as_str().unwrap_or("").contains("CNI_COMMAND"),
        "{v}"
    );
    // Nothing was left behind by any failure.
    assert!(
        lab.host_links("fnv").is_empty(),
        "{:?}",
        lab.host_links("fnv")
    );
}

#[test]
fn add_fails_cleanly_when_ifname_exists_in_container() {
    let lab = Lab::new();
    let conf = lab.conf(&format!("dup{}", lab.tag), "10.206.0.0/24", None);
    let ctr = Ns::new("c");
    ctr.must(&[
        "ip", "link", "add", "eth0", "type", "veth", "peer", "name", "eth0p",
    ]);
    let r = lab.cni(
        "ADD",
        &conf,
        &[
            ("CNI_CONTAINERID", "d"),
            ("CNI_NETNS", &ctr.path()),
            ("CNI_IFNAME", "eth0"),
        ],
    );
    assert_ne!(r.code, 0);
    assert!(
        r.json["msg"].as_str().unwrap_or("").contains("eth0"),
        "{:?}",
        r
    );
    assert!(lab.host_links("fnv").is_empty());
    assert!(lab.host_links("fnp").is_empty());
    // The failed attempt left no allocation: after a successful ADD exactly one endpoint exists.
    ctr.must(&["ip", "link", "del", "eth0"]);
    let ok = lab.add(&conf, "d", &ctr, "eth0");
    assert!(first_v4(&ok).starts_with("10.206.0."));
    let name = conf["name"].as_str().unwrap();
    let v: Value = serde_json::from_slice(&lab.cli(&["network", "inspect", name]).stdout).unwrap();
    assert_eq!(v["endpoints"].as_array().map(|a| a.len()), Some(1), "{v}");
}

#[test]
fn sixteen_parallel_adds_get_distinct_addresses() {
    let lab = Lab::new();
    let conf = lab.conf(
        &format!("par{}", lab.tag),
        "10.207.0.0/24",
        Some("fd20:7::/64"),
    );
    let nss: Vec<Ns> = (0..16).map(|_| Ns::new("c")).collect();
    let results: Vec<Value> = std::thread::scope(|s| {
        let hs: Vec<_> = nss
            .iter()
            .enumerate()
            .map(|(i, ns)| {
                let (lab, conf) = (&lab, &conf);
                s.spawn(move || lab.add(conf, &format!("p{i}"), ns, "eth0"))
            })
            .collect();
        hs.into_iter()
            .map(|h| h.join().expect("ADD thread"))
            .collect()
    });
    let mut v4: Vec<String> = results.iter().map(first_v4).collect();
    v4.sort();
    v4.dedup();
    assert_eq!(v4.len(), 16, "duplicate addresses: {v4:?}");
    assert_eq!(lab.host_links("fnv").len(), 16);
    // Every container reaches the first one.
    let target = first_v4(&results[0]);
    for ns in &nss[1..] {
        ns.must(&["ping", "-c1", "-W2", &target]);
    }
    std::thread::scope(|s| {
        for (i, ns) in nss.iter().enumerate() {
            let (lab, conf) = (&lab, &conf);
            s.spawn(move || assert_eq!(lab.del(conf, &format!("p{i}"), Some(ns), "eth0").code, 0));
        }
    });
    assert!(lab.host_links("fnv").is_empty());
}

#[test]
fn gc_removes_attachments_not_in_the_valid_list() {
    let lab = Lab::new();
    let conf = lab.conf(&format!("gc{}", lab.tag), "10.208.0.0/24", None);
    let nss: Vec<Ns> = (0..3).map(|_| Ns::new("c")).collect();
    for (i, ns) in nss.iter().enumerate() {
        lab.add(&conf, &format!("g{i}"), ns, "eth0");
    }
    let mut gc = conf.clone();
    gc["cni.dev/valid-attachments"] = json!([{"containerID": "g1", "ifname": "eth0"}]);
    let c = lab.cni("GC", &gc, &[]);
    assert_eq!(c.code, 0, "{:?}", c);
    assert!(Lab::addrs(&nss[0], "eth0").is_empty());
    assert!(!Lab::addrs(&nss[1], "eth0").is_empty());
    assert!(Lab::addrs(&nss[2], "eth0").is_empty());
    assert_eq!(lab.host_links("fnv").len(), 1);
}

#[test]
fn status_reports_ready() {
    let lab = Lab::new();
    let conf = lab.conf(&format!("st{}", lab.tag), "10.209.0.0/24", None);
    let c = lab.cni("STATUS", &conf, &[]);
    assert_eq!(c.code, 0, "{:?}", c);
}

#[test]
fn older_versions_get_their_result_shape() {
    let lab = Lab::new();
    let mut conf = lab.conf(&format!("old{}", lab.tag), "10.210.0.0/24", None);
    conf["cniVersion"] = json!("0.4.0");
    let ctr = Ns::new("c");
    let r = lab.add(&conf, "o", &ctr, "eth0");
    assert_eq!(r["cniVersion"], "0.4.0");
    assert_eq!(r["ips"][0]["version"], "4", "{r}");
}

#[test]
fn static_ip_and_mac_via_runtime_config() {
    let lab = Lab::new();
    let mut conf = lab.conf(&format!("sta{}", lab.tag), "10.211.0.0/24", None);
    conf["runtimeConfig"] = json!({"ips": ["10.211.0.77/24"], "mac": "02:00:00:aa:bb:cc"});
    let ctr = Ns::new("c");
    let r = lab.add(&conf, "s", &ctr, "eth0");
    assert_eq!(first_v4(&r), "10.211.0.77");
    let link = ctr.must(&["ip", "link", "show", "eth0"]);
    assert!(link.contains("02:00:00:aa:bb:cc"), "{link}");
    // The same static address for another container is refused, and leaves nothing.
    let ctr2 = Ns::new("c");
    let c = lab.cni(
        "ADD",
        &conf,
        &[
            ("CNI_CONTAINERID", "s2"),
            ("CNI_NETNS", &ctr2.path()),
            ("CNI_IFNAME", "eth0"),
        ],
    );
    assert_eq!(c.json["code"], 100, "{:?}", c);
    assert_eq!(lab.host_links("fnv").len(), 1);
}
