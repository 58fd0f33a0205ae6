//! Ports the hosts need are not taken: `ferrynet service register` on a real etcd (on a
//! loopback port of its own) refuses ingress on etcd's ports (the defaults and the store
//! URL's), the VXLAN port, SSH and DNS, and a `--vip` outside the VIP ranges, each naming
//! the conflict and `--force`; with `--force` each is stored. Only the store is touched.

use std::process::{Command, Output};

use ferrynet_store::testing::EtcdServer;

fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_ferrynet")
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

struct Env {
    etcd: EtcdServer,
    dir: tempfile::TempDir,
}

impl Env {
    fn cli(&self, args: &[&str]) -> Output {
        Command::new(bin())
            .arg("--state-dir")
            .arg(self.dir.path())
            .args(["--store", &self.etcd.url])
            .args(args)
            .output()
            .expect("ferrynet")
    }

    /// `service register NAME` with a TCP and a UDP port 80 and `extra`.
    fn register(&self, name: &str, extra: &[&str]) -> Output {
        let mut a = vec![
            "service", "register", name, "--port", "t=80", "--port", "u=80/udp",
        ];
        a.extend_from_slice(extra);
        self.cli(&a)
    }
}

#[test]
fn ingress_and_vips_refuse_what_the_hosts_need_unless_forced() {
    let env = Env {
        etcd: EtcdServer::start().unwrap_or_else(|e| panic!("cannot start a test etcd: {e}")),
        dir: tempfile::tempdir().expect("tempdir"),
    };
    let store_port = env
        .etcd
        .endpoint
        .rsplit_once(':')
        .map(|(_, p)| p.to_string())
        .expect("endpoint port");
    let refusals = [
        ("2379:80".to_string(), "etcd's client port"),
        ("2380:80".to_string(), "etcd's peer port"),
        (format!("{store_port}:80"), "the store's (etcd) port"),
        ("4789:80/udp".to_string(), "the VXLAN port"),
        ("22:80".to_string(), "SSH"),
        ("53:80/udp".to_string(), "DNS"),
        ("53:80".to_string(), "DNS"),
    ];
    for (i, (spec, what)) in refusals.iter().enumerate() {
        let name = format!("s{i}");
        let o = env.register(&name, &["--ingress", "8080:80", "--ingress", spec]);
        let t = text(&o);
        assert!(!o.status.success(), "--ingress {spec} was taken: {t}");
        assert!(
            t.contains(what) && t.contains("--force"),
            "--ingress {spec}: {t}"
        );
        // Nothing was stored.
        let inspect = env.cli(&["service", "inspect", &name]);
        assert!(
            !inspect.status.success(),
            "{name} stored: {}",
            text(&inspect)
        );
        // Forced, it is stored with that ingress port.
        let o = env.register(&name, &["--ingress", spec, "--force"]);
        assert!(o.status.success(), "--ingress {spec} --force: {}", text(&o));
        let inspect = text(&env.cli(&["service", "inspect", &name]));
        let published = spec.split(':').next().unwrap_or_default();
        assert!(
            inspect.contains(&format!("\"published\": {published}")),
            "{inspect}"
        );
    }
    // An ordinary ingress port needs no force.
    let o = env.register(
        "plain",
        &["--ingress", "8080:80", "--ingress", "5353:80/udp"],
    );
    assert!(o.status.success(), "{}", text(&o));

    // VIPs: inside the ranges fine, outside refused (either family), forced stored.
    let o = env.register("inrange", &["--vip", "10.96.44.4", "--vip", "fd00:96::44"]);
    assert!(o.status.success(), "{}", text(&o));
    for vip in ["127.0.0.2", "172.31.0.253", "fd31::2"] {
        let o = env.register("outside", &["--vip", vip]);
        let t = text(&o);
        assert!(!o.status.success(), "--vip {vip} was taken: {t}");
        assert!(
            t.contains("outside the VIP ranges") && t.contains("--force"),
            "--vip {vip}: {t}"
        );
    }
    let o = env.register("outside", &["--vip", "192.0.2.7", "--force"]);
    assert!(o.status.success(), "{}", text(&o));
    let inspect = text(&env.cli(&["service", "inspect", "outside"]));
    assert!(inspect.contains("192.0.2.7"), "{inspect}");
}
