//! Crash points (issue 17, part 3): every step of CNI ADD and DEL and of network create/rm is
//! killed (`abort` at `FERRYNET_FAILPOINT=NAME`) in turn, then the runtime's normal next call
//! is made: after a killed ADD a DEL, a retried ADD (which must work) then DEL, and a GC; after
//! a killed DEL another DEL; after a killed create or rm, `network rm`. Afterwards nothing is
//! leaked: no link, no port-map or anti-spoofing element, no endpoint, address or port claim,
//! no bridge or record of a removed network.
//!
//! Needs a binary built with `--features ferrynet/failpoints` (`scripts/test.sh` builds so).

mod common;

use std::process::{Command, Stdio};

use common::{first_v4, links_in, map_elements, Lab, Ns};
use ferrynet_store::{EmbeddedStore, Store};
use serde_json::{json, Value};

/// Every crash point of ADD, DEL and network create/rm, as `src/failpoint.rs` lists them.
const ADD_POINTS: &[&str] = &[
    "add-reserved",
    "add-bridge",
    "add-veth",
    "add-guarded",
    "add-published",
    "add-recorded",
];
const DEL_POINTS: &[&str] = &["del-unpublished", "del-unplugged", "del-released"];
const NETWORK_POINTS: &[&str] = &[
    "network-create-recorded",
    "network-rm-detached",
    "network-rm-deleted",
];

fn assert_failpoints_built() {
    let o = Command::new(common::bin())
        .arg("--version")
        .output()
        .expect("ferrynet --version");
    let v = String::from_utf8_lossy(&o.stdout);
    assert!(
        v.contains("crash points enabled"),
        "this ferrynet ({v}) has no crash points: run the tests with --features ferrynet/failpoints (scripts/test.sh does)"
    );
}

/// A CNI call with `FERRYNET_FAILPOINT=point` (or none); true when the plugin aborted there.
fn call(lab: &Lab, cmd: &str, conf: &Value, id: &str, ns: &Ns, point: Option<&str>) -> (bool, i32) {
    let mut c = Command::new("nsenter");
    c.args([&lab.host.enter(), common::bin()])
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("CNI_COMMAND", cmd)
        .env("CNI_CONTAINERID", id)
        .env("CNI_NETNS", ns.path())
        .env("CNI_IFNAME", "eth0")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    if let Some(p) = point {
        c.env("FERRYNET_FAILPOINT", p);
    }
    let mut child = c.spawn().expect("spawn plugin");
    use std::io::Write;
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(conf.to_string().as_bytes())
        .expect("write conf");
    let o = child.wait_with_output().expect("plugin");
    let aborted = String::from_utf8_lossy(&o.stderr).contains("crash point");
    (aborted, o.status.code().unwrap_or(-1))
}

/// Records under a prefix in the lab's store.
fn keys_under(lab: &Lab, prefix: &str) -> Vec<String> {
    let store = EmbeddedStore::open(lab.state.path().join("store.redb")).expect("open store");
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("runtime");
    rt.block_on(store.range(prefix))
        .expect("range")
        .0
        .into_iter()
        .map(|kv| kv.key)
        .collect()
}

/// Elements of one set of the anti-spoofing table.
fn guard_elements(lab: &Lab, set: &str) -> usize {
    common::guard_elements(Some(&lab.host.name), set).len()
}

/// Nothing of `network`'s containers is left on the host or in the store.
fn assert_no_attachment(lab: &Lab, network: &str, after: &str) {
    use ferrynet_model::network::keys;
    let links = lab.host_links("fnv");
    assert!(links.is_empty(), "{after}: links left {links:?}");
    for (what, prefix) in [
        ("endpoints", keys::endpoints(network)),
        ("addresses", keys::ipam_prefix(network)),
        ("port claims", keys::port_claims()),
        ("old-layout port keys", keys::host_ports()),
    ] {
        let left = keys_under(lab, &prefix);
        assert!(left.is_empty(), "{after}: {what} left {left:?}");
    }
    for map in ["pm4_any", "pm6_any"] {
        let left = map_elements(Some(&lab.host.name), map);
        assert!(left.is_empty(), "{after}: {map} elements left {left:?}");
    }
    for set in ["macs", "src4", "src6", "arp_src", "na_src"] {
        assert_eq!(guard_elements(lab, set), 0, "{after}: {set} elements left");
    }
}

fn conf(lab: &Lab, name: &str, v4: &str, v6: &str) -> Value {
    let mut c = lab.conf(name, v4, Some(v6));
    c["capabilities"] = json!({"portMappings": true});
    c["runtimeConfig"] =
        json!({"portMappings": [{"hostPort": 18080, "containerPort": 80, "protocol": "tcp"}]});
    c
}

#[test]
fn every_add_and_del_step_killed_then_the_next_call_leaves_nothing() {
    assert_failpoints_built();
    let lab = Lab::new();
    let name = format!("cp{}", lab.tag);
    let conf = conf(&lab, &name, "10.218.0.0/24", "fd18::/64");
    for (i, point) in ADD_POINTS.iter().enumerate() {
        // Killed, then DEL.
        let ns = Ns::new("c");
        let id = format!("a{i}");
        let (aborted, code) = call(&lab, "ADD", &conf, &id, &ns, Some(point));
        assert!(aborted, "ADD never reached {point} (exit {code})");
        let (_, code) = call(&lab, "DEL", &conf, &id, &ns, None);
        assert_eq!(code, 0, "DEL after {point}");
        assert_no_attachment(&lab, &name, &format!("ADD killed at {point}, then DEL"));

        // Killed, then a retried ADD works (CHECK passes), then DEL.
        let (aborted, _) = call(&lab, "ADD", &conf, &id, &ns, Some(point));
        assert!(aborted, "second ADD never reached {point}");
        let r = lab.add(&conf, &id, &ns, "eth0");
        assert!(!first_v4(&r).is_empty(), "retried ADD after {point}: {r}");
        let (_, code) = call(&lab, "CHECK", &conf, &id, &ns, None);
        assert_eq!(code, 0, "CHECK after a retried ADD after {point}");
        assert_eq!(map_elements(Some(&lab.host.name), "pm4_any").len(), 1);
        let (_, code) = call(&lab, "DEL", &conf, &id, &ns, None);
        assert_eq!(code, 0);
        assert_no_attachment(&lab, &name, &format!("ADD killed at {point}, retried, DEL"));

        // Killed, and the runtime forgets it: GC collects it.
        let (aborted, _) = call(&lab, "ADD", &conf, &id, &ns, Some(point));
        assert!(aborted);
        let mut gc = conf.clone();
        gc["cni.dev/valid-attachments"] = json!([]);
        let c = lab.cni("GC", &gc, &[]);
        assert_eq!(c.code, 0, "GC after {point}: {c:?}");
        assert_no_attachment(&lab, &name, &format!("ADD killed at {point}, then GC"));
    }
    for (i, point) in DEL_POINTS.iter().enumerate() {
        let ns = Ns::new("c");
        let id = format!("d{i}");
        lab.add(&conf, &id, &ns, "eth0");
        let (aborted, code) = call(&lab, "DEL", &conf, &id, &ns, Some(point));
        assert!(aborted, "DEL never reached {point} (exit {code})");
        let (_, code) = call(&lab, "DEL", &conf, &id, &ns, None);
        assert_eq!(code, 0, "DEL after {point}");
        assert_no_attachment(&lab, &name, &format!("DEL killed at {point}, then DEL"));
    }
}

#[test]
fn network_create_and_rm_killed_then_rm_leaves_nothing() {
    assert_failpoints_built();
    let lab = Lab::new();
    let bridges = || {
        links_in(Some(&lab.host.name), &["fn-"])
            .into_iter()
            .filter(|l| !l.starts_with("fnv"))
            .collect::<Vec<_>>()
    };
    let cli = |point: Option<&str>, args: &[&str]| {
        let state = lab.state.path().display().to_string();
        let mut c = Command::new("nsenter");
        c.args([
            lab.host.enter().as_str(),
            common::bin(),
            "--state-dir",
            &state,
        ])
        .args(args);
        if let Some(p) = point {
            c.env("FERRYNET_FAILPOINT", p);
        }
        c.output().expect("ferrynet")
    };
    for (i, point) in NETWORK_POINTS.iter().enumerate() {
        let name = format!("cpn{i}{}", lab.tag);
        let create = [
            "network",
            "create",
            name.as_str(),
            "--subnet",
            "10.219.0.0/24",
        ];
        let rm = ["network", "rm", "--force", name.as_str()];
        let ctr = format!("cpc{i}{}", lab.tag);
        let o = if point.starts_with("network-create") {
            cli(Some(point), &create)
        } else {
            let o = cli(None, &create);
            assert!(o.status.success(), "{}", common::out(&o));
            // A container on it, so the bridge exists and rm has something to detach.
            let o = cli(
                None,
                &["run", "--name", &ctr, "--net", &name, "--", "sleep", "300"],
            );
            assert!(o.status.success(), "{}", common::out(&o));
            assert_eq!(bridges().len(), 1);
            cli(Some(point), &rm)
        };
        assert!(
            common::out(&o).contains("crash point"),
            "never reached {point}: {}",
            common::out(&o)
        );
        // The user's next commands: remove the network (again) and the container.
        let _ = cli(None, &rm);
        let _ = cli(None, &["rm", "--force", &ctr]);
        assert!(
            lab.host_links("fnv").is_empty(),
            "after {point}: container links left"
        );
        let o = cli(None, &["network", "ls", "--json"]);
        assert!(
            !String::from_utf8_lossy(&o.stdout).contains(&name),
            "after {point}: still listed"
        );
        assert!(
            bridges().is_empty(),
            "after {point}: bridges {:?}",
            bridges()
        );
        let left = keys_under(&lab, &ferrynet_model::network::keys::network(&name));
        assert!(left.is_empty(), "after {point}: {left:?}");
    }
}
