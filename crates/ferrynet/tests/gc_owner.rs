//! CNI GC releases only what CNI made on this host: `ferrynet run` containers, Docker (CNM)
//! endpoints and other hosts' endpoints on the same network survive a GC that lists none of
//! them as valid.

mod common;

use std::io::Write;
use std::process::{Command, Stdio};

use common::*;
use ferrynet_model::network::{keys, Endpoint, EndpointOwner};
use ferrynet_store::{EmbeddedStore, Store};
use serde_json::{json, Value};

/// `ferrynet rm --force` of the CLI containers on drop.
struct Containers<'a>(&'a Lab, Vec<String>);

impl Drop for Containers<'_> {
    fn drop(&mut self) {
        for n in &self.1 {
            let _ = self.0.cli(&["rm", "--force", n]);
        }
    }
}

fn block_on<T>(f: impl std::future::Future<Output = T>) -> T {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
        .block_on(f)
}

/// Write `ep` straight into the lab's embedded store (no ferrynet process holds it meanwhile).
fn put_endpoint(lab: &Lab, ep: &Endpoint) {
    let store = EmbeddedStore::open(lab.state.path().join("store.redb")).expect("open store");
    let key = keys::endpoint(&ep.network, &ep.container_id, &ep.ifname);
    block_on(store.put(&key, serde_json::to_vec(ep).expect("encode"))).expect("put");
}

/// The endpoint records of `net` in the lab's embedded store, as (container id, ifname).
fn endpoint_ids(lab: &Lab, net: &str) -> Vec<(String, String)> {
    let store = EmbeddedStore::open(lab.state.path().join("store.redb")).expect("open store");
    let (kvs, _) = block_on(store.range(&keys::endpoints(net))).expect("range");
    kvs.iter()
        .filter_map(|kv| serde_json::from_slice::<Endpoint>(&kv.value).ok())
        .map(|e| (e.container_id, e.ifname))
        .collect()
}

/// Global addresses of `ifname` in the named namespace.
fn addrs_in(ns: &str, ifname: &str) -> Vec<String> {
    let o = sh(&["ip", "-n", ns, "-j", "addr", "show", "dev", ifname]);
    let v: Value = serde_json::from_slice(&o.stdout).unwrap_or(Value::Null);
    v.get(0)
        .and_then(|i| i["addr_info"].as_array())
        .map(|a| {
            a.iter()
                .filter(|x| x["scope"] == "global")
                .filter_map(|x| x["local"].as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn gc_releases_cni_attachments_only() {
    let lab = Lab::new();
    let net = format!("gco{}", lab.tag);
    let conf = lab.conf(&net, "10.209.0.0/24", Some("fd20:9::/64"));
    let ctr = Ns::new("c");
    lab.add(&conf, "cni1", &ctr, "eth0");

    // A `ferrynet run` container on the same network.
    let name = format!("gr{}", lab.tag);
    let _guard = Containers(&lab, vec![name.clone()]);
    let o = lab.cli(&["run", "--name", &name, "--net", &net, "--", "sleep", "300"]);
    assert!(o.status.success(), "{}", out(&o));
    let cli_ns = format!("fnc-{name}");
    let before = addrs_in(&cli_ns, "eth0");
    assert!(!before.is_empty(), "the CLI container has no address");

    // A Docker endpoint's record, a record from before owners were recorded whose id is no
    // runtime's, and one whose 64-hex id says a CNI runtime made it.
    let docker_id = "d".repeat(64);
    let runtime_id = "a".repeat(64);
    for (id, ifname, owner, ip) in [
        (
            docker_id.as_str(),
            "docker",
            EndpointOwner::Docker,
            "10.209.0.200/24",
        ),
        ("oldcli", "eth0", EndpointOwner::Unknown, "10.209.0.201/24"),
        (
            runtime_id.as_str(),
            "eth0",
            EndpointOwner::Unknown,
            "10.209.0.202/24",
        ),
    ] {
        put_endpoint(
            &lab,
            &Endpoint {
                ips: vec![ip.parse().expect("ip")],
                owner,
                ..Endpoint::new(&net, id, ifname)
            },
        );
    }

    let mut gc = conf.clone();
    gc["cni.dev/valid-attachments"] = json!([]);
    let c = lab.cni("GC", &gc, &[]);
    assert_eq!(c.code, 0, "{c:?}");

    // The CNI attachment (and the old runtime-shaped record) are gone ...
    assert!(Lab::addrs(&ctr, "eth0").is_empty());
    let left = endpoint_ids(&lab, &net);
    assert!(
        !left.contains(&("cni1".into(), "eth0".into())),
        "CNI endpoint kept: {left:?}"
    );
    assert!(
        !left.contains(&(runtime_id.clone(), "eth0".into())),
        "{left:?}"
    );
    // ... and everything else is untouched: the CLI container's interface, addresses, host
    // veth and record, the Docker record and the record of unknown origin.
    assert_eq!(addrs_in(&cli_ns, "eth0"), before);
    assert_eq!(
        lab.host_links("fnv").len(),
        1,
        "{:?}",
        lab.host_links("fnv")
    );
    for want in [
        (name.clone(), "eth0".to_string()),
        (docker_id, "docker".into()),
        ("oldcli".into(), "eth0".into()),
    ] {
        assert!(left.contains(&want), "{want:?} was released: {left:?}");
    }
    let ps = lab.cli(&["ps", "--json"]);
    assert!(
        String::from_utf8_lossy(&ps.stdout).contains(&name),
        "{}",
        out(&ps)
    );
    // The CLI container still reaches its gateway.
    let ping = sh(&[
        "ip",
        "netns",
        "exec",
        &cli_ns,
        "ping",
        "-c1",
        "-W2",
        "10.209.0.1",
    ]);
    assert!(ping.status.success(), "{}", out(&ping));
}

/// A CNI call on lab host `host` (its namespace, state dir and store), with `conf` on stdin.
fn lab_cni(
    lab: &common::lab::Lab,
    host: &str,
    cmd: &str,
    conf: &Value,
    env: &[(&str, &str)],
) -> (i32, String) {
    // The CNI variables go to the plugin only (through env(1)): with CNI_COMMAND set,
    // `ferrynet lab exec` itself would act as the plugin.
    let mut args: Vec<String> = ["lab", "exec", "--name", &lab.name, host, "--", "env"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    args.push(format!("CNI_COMMAND={cmd}"));
    args.push("CNI_PATH=/usr/lib/cni:/opt/cni/bin".into());
    args.extend(env.iter().map(|(k, v)| format!("{k}={v}")));
    args.push(bin().into());
    let mut c = Command::new(bin());
    c.args(&args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = c.spawn().expect("spawn lab exec");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(conf.to_string().as_bytes())
        .expect("write conf");
    let o = child.wait_with_output().expect("plugin output");
    (o.status.code().unwrap_or(-1), out(&o))
}

#[test]
fn gc_leaves_other_hosts_endpoints_alone() {
    let mut lab = common::lab::Lab::up("gcown", &["--hosts", "2", "--backend", "route"]);
    let conf = json!({"cniVersion": "1.1.0", "name": "fabric", "type": "ferrynet"});
    // A CNI container on each host of the multi-host network.
    for host in ["h1", "h2"] {
        let ns = format!("gcown-c{host}");
        lab.add_netns(&ns);
        let path = format!("/run/netns/{ns}");
        let env = [
            ("CNI_CONTAINERID", host),
            ("CNI_NETNS", path.as_str()),
            ("CNI_IFNAME", "eth0"),
        ];
        let (code, o) = lab_cni(&lab, host, "ADD", &conf, &env);
        assert_eq!(code, 0, "ADD on {host}: {o}");
        assert!(!addrs_in(&ns, "eth0").is_empty(), "{host}: no address");
    }
    // And a `ferrynet run` container on h1.
    let c = lab.run("h1", "r", &[], &["sleep", "300"]);

    let mut gc = conf.clone();
    gc["cni.dev/valid-attachments"] = json!([]);
    let (code, o) = lab_cni(&lab, "h1", "GC", &gc, &[]);
    assert_eq!(code, 0, "GC on h1: {o}");

    assert!(
        addrs_in("gcown-ch1", "eth0").is_empty(),
        "h1's CNI endpoint kept"
    );
    assert!(
        !addrs_in("gcown-ch2", "eth0").is_empty(),
        "h1's GC removed h2's endpoint"
    );
    assert!(
        !addrs_in(&c.netns(), "eth0").is_empty(),
        "the CLI container lost eth0"
    );
    // h2's record is still there: a CHECK on h2 finds it.
    let path = "/run/netns/gcown-ch2".to_string();
    let env = [
        ("CNI_CONTAINERID", "h2"),
        ("CNI_NETNS", path.as_str()),
        ("CNI_IFNAME", "eth0"),
    ];
    let (code, o) = lab_cni(&lab, "h2", "CHECK", &conf, &env);
    assert_eq!(code, 0, "CHECK on h2 after h1's GC: {o}");
    let (code, o) = lab_cni(&lab, "h2", "DEL", &conf, &env);
    assert_eq!(code, 0, "DEL on h2: {o}");
}
