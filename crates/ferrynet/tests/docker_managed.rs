//! ferrynet as a managed (v2) Docker plugin, built by `scripts/docker-plugin.sh` and run by a
//! private dockerd inside a "host" network namespace (so the plugin's agent, in the host's
//! network namespace as plugins with host networking are, has that namespace to itself). The
//! machine's shared engine is never touched. Everything is removed on drop, also on failure.

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::dockerd::{import_busybox, Dockerd, DockerdOpts};
use common::{out, tag, Lab};

fn eventually<T>(what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let t0 = Instant::now();
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "timed out waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// An HTTP GET of `/` as a shell command (busybox nc; its wget crashes here).
fn http_get(ip: &str, port: u16) -> String {
    format!("printf 'GET / HTTP/1.0\\r\\n\\r\\n' | nc -w 2 {ip} {port}")
}

/// The plugin made by the script, removed (disabled first) on drop.
struct ManagedPlugin<'a> {
    engine: &'a Dockerd,
    name: String,
}

impl ManagedPlugin<'_> {
    /// Build it with `scripts/docker-plugin.sh` into `engine`.
    fn create<'a>(engine: &'a Dockerd, name: &str) -> ManagedPlugin<'a> {
        let script = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../scripts/docker-plugin.sh"
        );
        let o = Command::new("bash")
            .args([script, name, common::bin()])
            .env("DOCKER_HOST", engine.host())
            .output()
            .expect("running scripts/docker-plugin.sh");
        assert!(o.status.success(), "docker-plugin.sh: {}", out(&o));
        ManagedPlugin {
            engine,
            name: name.to_string(),
        }
    }
}

impl Drop for ManagedPlugin<'_> {
    fn drop(&mut self) {
        let _ = self.engine.docker(&["plugin", "disable", "-f", &self.name]);
        let _ = self.engine.docker(&["plugin", "rm", "-f", &self.name]);
    }
}

#[test]
fn the_managed_plugin_serves_networks_and_published_ports() {
    assert!(
        std::path::Path::new("/bin/busybox").exists(),
        "this test needs /bin/busybox: apt-get install busybox-static"
    );
    let lab = Lab::new();
    let (client, host_ip, client_ip) = lab.outside(71);
    // A host has a default route; the agent picks its underlay from it.
    lab.host
        .must(&["ip", "route", "add", "default", "via", &client_ip]);
    let t = tag();
    let d = Dockerd::start_opts(
        &format!("m{t}"),
        DockerdOpts {
            netns: Some(lab.host.name.clone()),
            hostname: Some(format!("fnm-{t}")),
            ..Default::default()
        },
    );
    let name = format!("fnt/ferrynet:m{t}");
    let plugin = ManagedPlugin::create(&d, &name);
    let state = tempfile::tempdir().expect("state dir");
    d.docker_ok(&[
        "plugin",
        "set",
        &name,
        &format!("state.source={}", state.path().display()),
        &format!("docker-api.source={}", d.sock.display()),
    ]);
    d.docker_ok(&["plugin", "enable", &name]);
    let image = format!("fnm-busybox:{t}");
    import_busybox(&d.host(), &image);

    // A network of the plugin; two containers talk, and a published port answers outside.
    let net = format!("mnet{t}");
    d.docker_ok(&[
        "network",
        "create",
        "-d",
        &name,
        "--ipam-driver",
        &name,
        "--subnet",
        "10.76.0.0/24",
        &net,
    ]);
    let web = d.docker_ok(&[
        "run",
        "-d",
        "--name",
        "mweb",
        "--network",
        &net,
        "-p",
        "18080:80",
        &image,
        "httpd",
        "-f",
        "-p",
        "80",
        "-h",
        "/www",
    ]);
    let ip = d.docker_ok(&[
        "inspect",
        "-f",
        "{{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}}",
        "mweb",
    ]);
    assert!(ip.starts_with("10.76.0."), "mweb's address {ip}");
    let page = eventually("a container to reach mweb", || {
        let o = d.docker(&[
            "run",
            "--rm",
            "--network",
            &net,
            &image,
            "sh",
            "-c",
            &http_get(&ip, 80),
        ]);
        let s = String::from_utf8_lossy(&o.stdout).into_owned();
        s.contains("200 OK").then_some(s)
    });
    assert!(page.contains("hello from a private engine"), "{page}");
    eventually("the published port from outside", || {
        let o = client.run(&["busybox", "sh", "-c", &http_get(&host_ip, 18080)]);
        String::from_utf8_lossy(&o.stdout)
            .contains("200 OK")
            .then_some(())
    });
    // The plugin's state directory is ferrynet's usual one: the host's CLI reads it.
    let ls = || {
        let o = Command::new(common::bin())
            .args(["--state-dir", &state.path().display().to_string()])
            .args(["network", "ls", "--json"])
            .output()
            .expect("network ls");
        String::from_utf8_lossy(&o.stdout).into_owned()
    };
    assert!(ls().contains("10.76.0.0/24"), "{}", ls());

    // Removal leaves nothing: no veth or bridge in the host namespace, no ferrynet network.
    d.docker_ok(&["rm", "-f", &web]);
    d.docker_ok(&["network", "rm", &net]);
    let links = lab.host.must(&["ip", "-br", "link"]);
    assert!(
        !links
            .lines()
            .any(|l| l.starts_with("fnv") || l.starts_with("fn-")),
        "links left: {links}"
    );
    assert!(!ls().contains("10.76.0.0/24"), "{}", ls());
    drop(plugin);
}
