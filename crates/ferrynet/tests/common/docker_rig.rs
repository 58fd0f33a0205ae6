//! A private dockerd with ferrynet's agent serving the Docker driver, in a "host" namespace of
//! their own, for tests that drive Docker containers on a ferrynet network.

use std::process::{Command, Stdio};

use super::dockerd::{import_busybox, Dockerd};
use super::*;

/// A private dockerd in a "host" namespace of its own with the agent serving the driver there,
/// one ferrynet Docker network; everything removed on drop (containers and network through
/// the engine, then the engine, the agent, the namespaces).
pub struct DockerRig {
    /// The engine.
    pub docker: Dockerd,
    agent: Proc,
    socket: std::path::PathBuf,
    state: tempfile::TempDir,
    _client: Ns,
    /// The "host" namespace of the engine and the agent.
    pub host: Ns,
    /// The busybox image imported into the engine.
    pub image: String,
    /// The Docker network's name.
    pub net: String,
    attached: Vec<String>,
}

impl DockerRig {
    /// The rig with a network on 10.234.0.0/24 and no further options.
    pub fn new() -> DockerRig {
        DockerRig::with_network(&[])
    }

    /// The rig with a network on 10.234.0.0/24 created with `extra` arguments (`-o …`).
    pub fn with_network(extra: &[&str]) -> DockerRig {
        DockerRig::with_network_ipam(extra, true)
    }

    /// [`DockerRig::with_network`], with ferrynet's IPAM driver or Docker's own (`ours`
    /// false: another IPAM, which gives the pool's prefix).
    pub fn with_network_ipam(extra: &[&str], ours: bool) -> DockerRig {
        assert!(
            std::path::Path::new("/bin/busybox").exists(),
            "apt-get install busybox-static"
        );
        need("dockerd", "docker.io");
        let t = tag();
        let host = Ns::new("sh");
        let client = Ns::new("sc");
        wire_client(
            Some(&host),
            &client,
            &format!("fsh{t}"),
            "10.253.7.1",
            "10.253.7.2",
        );
        // The agent's underlay is the default route's interface.
        host.must(&["ip", "route", "add", "default", "via", "10.253.7.2"]);
        let driver = format!("fnt-{t}");
        let socket = std::path::PathBuf::from(format!("/run/docker/plugins/{driver}.sock"));
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
        let image = format!("fnt-busybox:{t}");
        import_busybox(&docker.host(), &image);
        let net = format!("{driver}-net");
        let mut args = vec!["network", "create", "-d", &driver];
        if ours {
            args.extend_from_slice(&["--ipam-driver", &driver]);
        }
        args.extend_from_slice(&["--subnet", "10.234.0.0/24"]);
        args.extend_from_slice(extra);
        args.push(&net);
        docker.docker_ok(&args);
        DockerRig {
            docker,
            agent,
            socket,
            state,
            _client: client,
            host,
            image,
            net,
            attached: Vec::new(),
        }
    }

    /// `docker run -d --name NAME` a sleeping container; its network namespace, attached under
    /// a name of ours (detached on drop).
    pub fn run(&mut self, name: &str) -> String {
        self.docker.docker_ok(&[
            "run",
            "-d",
            "--name",
            name,
            "--network",
            &self.net,
            &self.image,
            "sleep",
            "3600",
        ]);
        let pid = self
            .docker
            .docker_ok(&["inspect", "-f", "{{.State.Pid}}", name]);
        let ns = format!("fnt-d{name}-{}", tag());
        must(&["ip", "netns", "attach", &ns, &pid]);
        self.attached.push(ns.clone());
        ns
    }

    /// Container `name`'s IPv4 address on its network, as Docker reports it.
    pub fn ip_of(&self, name: &str) -> String {
        self.docker.docker_ok(&[
            "inspect",
            "-f",
            "{{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}}",
            name,
        ])
    }

    /// The ferrynet CLI in the host namespace with the agent's state directory.
    pub fn cli(&self, args: &[&str]) -> std::process::Output {
        let e = self.host.enter();
        let state = self.state.path().display().to_string();
        let mut v = vec!["nsenter", e.as_str(), bin(), "--state-dir", &state];
        v.extend_from_slice(args);
        sh(&v)
    }
}

impl Drop for DockerRig {
    fn drop(&mut self) {
        for ns in &self.attached {
            let _ = sh(&["ip", "netns", "del", ns]);
        }
        let ids = self.docker.docker(&["ps", "-aq"]);
        for id in String::from_utf8_lossy(&ids.stdout).split_whitespace() {
            let _ = self.docker.docker(&["rm", "-f", id]);
        }
        let _ = self.docker.docker(&["network", "rm", &self.net]);
        self.docker.stop();
        let _ = self.agent.0.kill();
        let _ = self.agent.0.wait();
        let _ = std::fs::remove_file(&self.socket);
    }
}
