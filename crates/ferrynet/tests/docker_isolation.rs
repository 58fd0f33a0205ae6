//! Isolation by source network for Docker (CNM) networks: a private dockerd in a "host"
//! namespace of its own, the ferrynet agent serving the driver beside it, two ferrynet Docker
//! networks (IPv4 and IPv6). Containers of one network reach each other but not the other
//! network's containers, in either direction; a port the other network publishes answers
//! through the host's address. The machine's shared Docker engine is never used.

mod common;

use std::path::PathBuf;
use std::process::{Command, Stdio};

use common::dockerd::{import_busybox, Dockerd};
use common::*;

/// The rig's host-side addresses on its outside link (published ports answer there).
const HOST4: &str = "10.253.41.1";
const HOST6: &str = "fd53:41::1";

/// A private dockerd with the agent in one namespace; containers and networks removed through
/// the engine on drop, then the engine, the agent and the namespaces.
struct Rig {
    docker: Dockerd,
    agent: Proc,
    socket: PathBuf,
    _state: tempfile::TempDir,
    driver: String,
    image: String,
    _client: Ns,
    host: Ns,
    nets: Vec<String>,
}

impl Rig {
    fn new() -> Rig {
        assert!(
            std::path::Path::new("/bin/busybox").exists(),
            "apt-get install busybox-static"
        );
        need("dockerd", "docker.io");
        need("python3", "python3");
        let t = tag();
        let host = Ns::new("dh");
        let client = Ns::new("dk");
        let link = format!("fdh{t}");
        wire_client(Some(&host), &client, &link, HOST4, "10.253.41.2");
        host.must(&[
            "ip",
            "addr",
            "add",
            &format!("{HOST6}/64"),
            "dev",
            &link,
            "nodad",
        ]);
        // The agent's underlay is the default route's interface.
        host.must(&["ip", "route", "add", "default", "via", "10.253.41.2"]);
        let driver = format!("fni-{t}");
        let socket = PathBuf::from(format!("/run/docker/plugins/{driver}.sock"));
        let state = tempfile::tempdir().expect("state dir");
        let log = state.path().join("agent.log");
        let logf = std::fs::File::create(&log).expect("agent log");
        let child = Command::new("nsenter")
            .arg(host.enter())
            .args([bin(), "--state-dir"])
            .arg(state.path())
            .args(["agent", "--no-dns", "--docker-socket"])
            .arg(&socket)
            .env("DOCKER_HOST", format!("unix:///run/fnd-{t}.sock"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(logf)
            .spawn()
            .expect("start the agent");
        let mut child = Some(child);
        wait_for_socket(&mut child, &socket, "agent", || {
            std::fs::read_to_string(&log).unwrap_or_default()
        });
        let agent = Proc(child.expect("agent running"));
        let docker = Dockerd::start(&t, Some(&host.name));
        let image = format!("fni-busybox:{t}");
        import_busybox(&docker.host(), &image);
        Rig {
            docker,
            agent,
            socket,
            _state: state,
            driver,
            image,
            _client: client,
            host,
            nets: Vec::new(),
        }
    }

    /// A dual-stack ferrynet Docker network named `<driver>-<short>`.
    fn network(&mut self, short: &str, v4: &str, v6: &str) -> String {
        let net = format!("{}-{short}", self.driver);
        self.docker.docker_ok(&[
            "network",
            "create",
            "-d",
            &self.driver,
            "--ipam-driver",
            &self.driver,
            "--ipv6",
            "--subnet",
            v4,
            "--subnet",
            v6,
            &net,
        ]);
        self.nets.push(net.clone());
        net
    }

    /// `docker run -d --name NAME --network NET EXTRA` a sleeping container; its namespace
    /// (attached under a name of ours, detached when dropped, before the rig goes) and its
    /// (IPv4, IPv6) addresses.
    fn run(&mut self, name: &str, net: &str, extra: &[&str]) -> (Ns, String, String) {
        let mut args = vec!["run", "-d", "--name", name, "--network", net];
        args.extend_from_slice(extra);
        args.extend_from_slice(&[&self.image, "sleep", "3600"]);
        self.docker.docker_ok(&args);
        let pid = self
            .docker
            .docker_ok(&["inspect", "-f", "{{.State.Pid}}", name]);
        let ns = Ns {
            name: format!("fnt-i{name}-{}", tag()),
        };
        must(&["ip", "netns", "attach", &ns.name, &pid]);
        let addr = |field: &str| {
            self.docker.docker_ok(&[
                "inspect",
                "-f",
                &format!("{{{{range .NetworkSettings.Networks}}}}{{{{.{field}}}}}{{{{end}}}}"),
                name,
            ])
        };
        let (v4, v6) = (addr("IPAddress"), addr("GlobalIPv6Address"));
        assert!(
            !v4.is_empty() && !v6.is_empty(),
            "{name}: dual-stack addresses, got {v4:?} {v6:?}"
        );
        (ns, v4, v6)
    }

    /// An nft set of the host's `inet ferrynet` table.
    fn set(&self, set: &str) -> String {
        self.host
            .must(&["nft", "list", "set", "inet", "ferrynet", set])
    }
}

impl Drop for Rig {
    fn drop(&mut self) {
        let ids = self.docker.docker(&["ps", "-aq"]);
        for id in String::from_utf8_lossy(&ids.stdout).split_whitespace() {
            let _ = self.docker.docker(&["rm", "-f", id]);
        }
        for net in &self.nets {
            let _ = self.docker.docker(&["network", "rm", net]);
        }
        self.docker.stop();
        let _ = self.agent.0.kill();
        let _ = self.agent.0.wait();
        let _ = std::fs::remove_file(&self.socket);
    }
}

#[test]
fn docker_networks_are_isolated_by_source_network() {
    let mut rig = Rig::new();
    let a = rig.network("a", "10.237.0.0/24", "fd37:a::/64");
    let b = rig.network("b", "10.238.0.0/24", "fd37:b::/64");
    let (a1, a1v4, a1v6) = rig.run("a1", &a, &[]);
    let (a2, a2v4, a2v6) = rig.run("a2", &a, &[]);
    let (b1, b1v4, b1v6) = rig.run("b1", &b, &["-p", "8080:7000"]);
    let _servers = [
        tcp_server(&a1, 7000, "a1"),
        tcp_server(&a2, 7000, "a2"),
        tcp_server(&b1, 7000, "b1"),
    ];

    // Both Docker networks are in the isolation sets.
    let nets4 = rig.set("nets4");
    let nets6 = rig.set("nets6");
    assert!(
        nets4.contains("10.237.0.0/24") && nets4.contains("10.238.0.0/24"),
        "{nets4}"
    );
    assert!(
        nets6.contains("fd37:a::/64") && nets6.contains("fd37:b::/64"),
        "{nets6}"
    );

    // Controls: the same network works, both families, both directions.
    for (from, to, name) in [(&a1, &a2v4, "a2"), (&a1, &a2v6, "a2"), (&a2, &a1v4, "a1")] {
        let r = within(std::time::Duration::from_secs(15), || {
            tcp_get(from, to, 7000).ok_or(format!("{} -> {to}", from.name))
        });
        assert!(r.starts_with(name), "{r}");
    }
    assert!(tcp_get(&a2, &a1v6, 7000).is_some(), "a2 -> a1 over IPv6");

    // Across the networks: refused, both directions, both families.
    let refused = |layer: &str| {
        for (from, to) in [
            (&a1, &b1v4),
            (&a1, &b1v6),
            (&a2, &b1v4),
            (&b1, &a1v4),
            (&b1, &a1v6),
            (&b1, &a2v6),
        ] {
            assert_eq!(
                tcp_get(from, to, 7000),
                None,
                "{layer}: {} reached {to} on the other network",
                from.name
            );
        }
    };
    refused("all rules");
    // The source-network sets hold on their own: without the per-bridge rules (what a
    // routed path that bypasses the bridges would meet), the same probes are refused.
    let forward = rig
        .host
        .must(&["nft", "-a", "list", "chain", "inet", "ferrynet", "forward"]);
    let handles: Vec<&str> = forward
        .lines()
        .filter(|l| l.contains("comment \"isolate docker-"))
        .filter_map(|l| l.rsplit("# handle ").next())
        .collect();
    assert_eq!(
        handles.len(),
        2,
        "one per-bridge rule per network: {forward}"
    );
    for h in handles {
        rig.host.must(&[
            "nft", "delete", "rule", "inet", "ferrynet", "forward", "handle", h,
        ]);
    }
    refused("the sets alone");

    // b1's published port answers a1 through the host's addresses, replies flowing back.
    for host in [HOST4, HOST6] {
        let r = within(std::time::Duration::from_secs(15), || {
            tcp_get(&a1, host, 8080).ok_or(format!("a1 -> {host}:8080"))
        });
        assert!(r.starts_with("b1"), "{host}: {r}");
    }
}
