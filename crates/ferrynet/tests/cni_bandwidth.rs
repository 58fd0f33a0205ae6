//! The `bandwidth` capability on a real kernel: iperf3 between containers of one bridge
//! measures both directions under a limit and without one; the limit lives on the host side
//! (a container's own tc changes do not lift it); DEL, GC and a failed ADD leave no IFB device.
//! Correctness, not timing: a limited rate must stay under 1.5× the limit while the unlimited
//! one is far above it.

mod common;

use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;
use serde_json::{json, Value};

/// Traffic to the container (ingress) and from it (egress), bit/s.
const INGRESS: u64 = 8_000_000;
const EGRESS: u64 = 4_000_000;
/// Buckets well above the MTU, small against a second of traffic.
const BURST: u64 = 256_000;

fn with_bandwidth(conf: &Value, bw: Value) -> Value {
    let mut c = conf.clone();
    c["capabilities"] = json!({"bandwidth": true});
    // containerd's spelling (go-cni's structs have no JSON tags).
    c["runtimeConfig"] = json!({ "bandwidth": bw });
    c
}

fn limits() -> Value {
    json!({"IngressRate": INGRESS, "IngressBurst": BURST,
           "EgressRate": EGRESS, "EgressBurst": BURST})
}

/// An iperf3 server in `ns` for one test (killed on drop).
fn iperf_server(ns: &Ns) -> Proc {
    need("iperf3", "iperf3");
    let child = Command::new("nsenter")
        .args([&ns.enter(), "iperf3", "-s", "-p", "5201"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start iperf3 server");
    Proc(child)
}

/// Bits per second the receiver measured for 3 s of TCP from `client` to `server_ip`
/// (`reverse`: from the server to `client`).
fn measure(client: &Ns, server_ip: &str, reverse: bool) -> f64 {
    let mut args = vec![
        "iperf3",
        "-c",
        server_ip,
        "-p",
        "5201",
        "-t",
        "3",
        "-J",
        "--connect-timeout",
        "2000",
    ];
    if reverse {
        args.push("-R");
    }
    within(Duration::from_secs(20), || {
        let o = client.run(&args);
        let v: Value =
            serde_json::from_slice(&o.stdout).map_err(|e| format!("{e}: {}", out(&o)))?;
        v["end"]["sum_received"]["bits_per_second"]
            .as_f64()
            .filter(|_| o.status.success())
            .ok_or_else(|| format!("iperf3: {}", out(&o)))
    })
}

/// The IFB name of an endpoint: `fnb` + the first 6 bytes of sha256(network\0id\0ifname).
fn ifb_of(network: &str, id: &str, ifname: &str) -> String {
    let code = format!(
        "import hashlib;print('fnb'+hashlib.sha256(b'{network}\\0{id}\\0{ifname}').hexdigest()[:12])"
    );
    must(&["python3", "-c", &code]).trim().to_string()
}

#[test]
fn limits_hold_in_both_directions_and_only_where_asked() {
    let lab = Lab::new();
    let net = format!("bw{}", lab.tag);
    let conf = lab.conf(&net, "10.235.0.0/24", None);
    let (server, limited, free) = (Ns::new("c"), Ns::new("c"), Ns::new("c"));
    let server_ip = first_v4(&lab.add(&conf, "srv", &server, "eth0"));
    let add = lab.cni(
        "ADD",
        &with_bandwidth(&conf, limits()),
        &[
            ("CNI_CONTAINERID", "lim"),
            ("CNI_NETNS", &limited.path()),
            ("CNI_IFNAME", "eth0"),
        ],
    );
    assert_eq!(add.code, 0, "{} {}", add.json, add.stderr);
    lab.add(&conf, "free", &free, "eth0");
    let _srv = iperf_server(&server);

    let ifb = ifb_of(&net, "lim", "eth0");
    assert_eq!(lab.host_links("fnb"), vec![ifb.clone()]);

    let (lim_out, lim_in) = (
        measure(&limited, &server_ip, false),
        measure(&limited, &server_ip, true),
    );
    let (free_out, free_in) = (
        measure(&free, &server_ip, false),
        measure(&free, &server_ip, true),
    );
    let report = format!(
        "egress {lim_out:.0} (limit {EGRESS}), ingress {lim_in:.0} (limit {INGRESS}), \
         unlimited {free_out:.0} / {free_in:.0}"
    );
    eprintln!("bandwidth: {report}");
    assert!(lim_out < 1.5 * EGRESS as f64, "{report}");
    assert!(lim_in < 1.5 * INGRESS as f64, "{report}");
    // The limit shapes, it does not cut: traffic still flows at a fair share of it.
    assert!(
        lim_out > 0.3 * EGRESS as f64 && lim_in > 0.3 * INGRESS as f64,
        "{report}"
    );
    assert!(
        free_out > 10.0 * INGRESS as f64 && free_in > 10.0 * INGRESS as f64,
        "{report}"
    );

    // The container cannot lift its limit: its own qdiscs are not where the limit is.
    limited.run(&["tc", "qdisc", "del", "dev", "eth0", "root"]);
    limited.run(&["tc", "qdisc", "del", "dev", "eth0", "ingress"]);
    limited.must(&[
        "tc",
        "qdisc",
        "replace",
        "dev",
        "eth0",
        "root",
        "pfifo_fast",
    ]);
    let again = measure(&limited, &server_ip, true);
    assert!(
        again < 1.5 * INGRESS as f64,
        "after the container's tc: {again:.0}"
    );
    let again = measure(&limited, &server_ip, false);
    assert!(
        again < 1.5 * EGRESS as f64,
        "after the container's tc: {again:.0}"
    );

    // The endpoint record says what was applied.
    let o = lab.cli(&["network", "inspect", &net]);
    let v: Value = serde_json::from_slice(&o.stdout).expect("inspect json");
    let rec = v["endpoints"]
        .as_array()
        .and_then(|a| a.iter().find(|e| e["containerId"] == "lim"))
        .cloned()
        .unwrap_or_default();
    assert_eq!(rec["bandwidth"]["ingressRate"], INGRESS, "{rec}");
    assert_eq!(rec["bandwidth"]["egressBurst"], BURST, "{rec}");

    // CHECK sees the limits, and misses them once they are gone.
    let check_env = [
        ("CNI_CONTAINERID", "lim"),
        ("CNI_NETNS", &limited.path()),
        ("CNI_IFNAME", "eth0"),
    ];
    let limited_conf = with_bandwidth(&conf, limits());
    let c = lab.cni("CHECK", &limited_conf, &check_env);
    assert_eq!(c.code, 0, "{} {}", c.json, c.stderr);
    let host_veth = rec["hostVeth"]
        .as_str()
        .expect("host veth recorded")
        .to_string();
    lab.host
        .must(&["tc", "qdisc", "del", "dev", &host_veth, "root"]);
    let c = lab.cni("CHECK", &limited_conf, &check_env);
    assert_ne!(c.code, 0, "CHECK without the tbf: {}", c.json);
    assert!(
        c.json["msg"].as_str().unwrap_or_default().contains("tbf"),
        "{}",
        c.json
    );
    assert_eq!(lab.host_links("fnb"), vec![ifb.clone()]);

    // DEL leaves no IFB.
    let del = lab.del(&conf, "lim", Some(&limited), "eth0");
    assert_eq!(del.code, 0, "{}", del.stderr);
    assert!(
        lab.host_links("fnb").is_empty(),
        "{:?}",
        lab.host_links("fnb")
    );
    for id in ["srv", "free"] {
        lab.del(&conf, id, None, "eth0");
    }
}

#[test]
fn gc_bad_limits_and_failed_adds_leave_no_ifb() {
    let lab = Lab::new();
    let net = format!("bg{}", lab.tag);
    let conf = lab.conf(&net, "10.236.0.0/24", None);
    let ns = Ns::new("c");
    let env = |id: &'static str, p: &str| {
        vec![
            ("CNI_CONTAINERID", id),
            ("CNI_NETNS", p),
            ("CNI_IFNAME", "eth0"),
        ]
        .into_iter()
        .map(|(k, v)| (k, v.to_string()))
        .collect::<Vec<_>>()
    };
    let call = |cmd: &str, c: &Value, id: &'static str, p: &str| {
        let e = env(id, p);
        let e: Vec<(&str, &str)> = e.iter().map(|(k, v)| (*k, v.as_str())).collect();
        lab.cni(cmd, c, &e)
    };
    let path = ns.path();

    // Bad limits: code 7, nothing made.
    for bw in [
        json!({"IngressRate": 1000000}),
        json!({"EgressRate": 1000000, "EgressBurst": 8000}),
        json!({"EgressRate": 1000000, "EgressBurst": 40_000_000_000u64}),
    ] {
        let c = call("ADD", &with_bandwidth(&conf, bw.clone()), "bad", &path);
        assert_eq!(c.json["code"], 7, "{bw}: {}", c.json);
        assert!(lab.host_links("fnv").is_empty() && lab.host_links("fnb").is_empty());
    }

    // GC releases an endpoint the runtime no longer lists, IFB included.
    let c = call("ADD", &with_bandwidth(&conf, limits()), "gone", &path);
    assert_eq!(c.code, 0, "{} {}", c.json, c.stderr);
    assert_eq!(lab.host_links("fnb").len(), 1);
    let mut gc = conf.clone();
    gc["cni.dev/valid-attachments"] = json!([]);
    let g = lab.cni("GC", &gc, &[]);
    assert_eq!(g.code, 0, "{} {}", g.json, g.stderr);
    assert!(
        lab.host_links("fnb").is_empty(),
        "{:?}",
        lab.host_links("fnb")
    );
    assert!(lab.host_links("fnv").is_empty());

    // A failed ADD (the IFB's name is taken by a device that is not an IFB) undoes the veth,
    // the record and the device of its name.
    let ns2 = Ns::new("c");
    let squat = ifb_of(&net, "fail", "eth0");
    lab.host
        .must(&["ip", "link", "add", &squat, "type", "bridge"]);
    let c = call("ADD", &with_bandwidth(&conf, limits()), "fail", &ns2.path());
    assert_ne!(c.code, 0, "{}", c.json);
    assert!(
        c.json["msg"]
            .as_str()
            .unwrap_or_default()
            .contains("not an IFB"),
        "{}",
        c.json
    );
    assert!(
        lab.host_links("fnv").is_empty(),
        "{:?}",
        lab.host_links("fnv")
    );
    assert!(
        lab.host_links("fnb").is_empty(),
        "{:?}",
        lab.host_links("fnb")
    );
    assert!(links_in(Some(&ns2.name), &["eth0"]).is_empty());
    let o = lab.cli(&["network", "inspect", &net]);
    let v: Value = serde_json::from_slice(&o.stdout).unwrap_or(Value::Null);
    assert_eq!(v["endpoints"], json!([]), "{v}");
    // And a retry then succeeds.
    let c = call("ADD", &with_bandwidth(&conf, limits()), "fail", &ns2.path());
    assert_eq!(c.code, 0, "{} {}", c.json, c.stderr);
    assert_eq!(lab.del(&conf, "fail", Some(&ns2), "eth0").code, 0);
    assert!(lab.host_links("fnb").is_empty());
}
