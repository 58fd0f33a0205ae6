//! The CLI as a person uses it: networks, containers, published ports, and its error messages.

mod common;

use common::*;

fn out(o: &std::process::Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// Removes CLI containers (by name) when the test ends, also on failure.
struct Containers<'a>(&'a Lab, Vec<String>);
impl Drop for Containers<'_> {
    fn drop(&mut self) {
        for n in &self.1 {
            let _ = self.0.cli(&["rm", "--force", n]);
        }
    }
}

#[test]
fn networks_containers_and_a_published_port() {
    let lab = Lab::new();
    let net = format!("cl{}", lab.tag);
    let o = lab.cli(&[
        "network",
        "create",
        &net,
        "--subnet",
        "10.240.0.0/24",
        "--subnet",
        "fd24::/64",
    ]);
    assert!(o.status.success(), "{}", out(&o));
    let ls = out(&lab.cli(&["network", "ls"]));
    assert!(ls.contains(&net) && ls.contains("10.240.0.0/24"), "{ls}");

    // Errors a person must understand, each a non-zero exit.
    let dup = lab.cli(&["network", "create", &net, "--subnet", "10.241.0.0/24"]);
    assert!(
        !dup.status.success() && out(&dup).contains("already exists"),
        "{}",
        out(&dup)
    );
    let ov = lab.cli(&[
        "network",
        "create",
        &format!("{net}b"),
        "--subnet",
        "10.240.0.128/25",
    ]);
    assert!(
        !ov.status.success() && out(&ov).contains("overlaps"),
        "{}",
        out(&ov)
    );
    let bad = lab.cli(&["network", "create", "x", "--subnet", "10.0.0.0/33"]);
    assert!(!bad.status.success(), "{}", out(&bad));
    let hostbits = lab.cli(&[
        "network",
        "create",
        &format!("{net}c"),
        "--subnet",
        "10.242.0.5/24",
    ]);
    assert!(
        !hostbits.status.success() && out(&hostbits).contains("10.242.0.0/24"),
        "{}",
        out(&hostbits)
    );

    let a = format!("a{}", lab.tag);
    let b = format!("b{}", lab.tag);
    let _guard = Containers(&lab, vec![a.clone(), b.clone()]);
    let server = "import http.server as h; h.HTTPServer(('0.0.0.0', 80), h.SimpleHTTPRequestHandler).serve_forever()";
    let o = lab.cli(&[
        "run", "--name", &a, "--net", &net, "-p", "8080:80", "--", "python3", "-c", server,
    ]);
    assert!(o.status.success(), "{}", out(&o));
    let o = lab.cli(&["run", "--name", &b, "--net", &net, "--", "sleep", "300"]);
    assert!(o.status.success(), "{}", out(&o));
    let taken = lab.cli(&["run", "--name", &a, "--net", &net, "--", "sleep", "1"]);
    assert!(
        !taken.status.success() && out(&taken).contains("already exists"),
        "{}",
        out(&taken)
    );
    let port_taken = lab.cli(&[
        "run",
        "--name",
        &format!("x{}", lab.tag),
        "--net",
        &net,
        "-p",
        "8080:80",
        "--",
        "sleep",
        "1",
    ]);
    assert!(
        !port_taken.status.success() && out(&port_taken).contains("8080"),
        "{}",
        out(&port_taken)
    );

    let ps = out(&lab.cli(&["ps"]));
    assert!(
        ps.contains(&a) && ps.contains("running") && ps.contains("8080->80/tcp"),
        "{ps}"
    );
    let js: serde_json::Value = serde_json::from_slice(&lab.cli(&["ps", "--json"]).stdout).unwrap();
    let a_ip = js
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == a.as_str())
        .unwrap()["ips"][0]
        .as_str()
        .unwrap()
        .split('/')
        .next()
        .unwrap()
        .to_string();

    // b talks to a by address (wait for the server to listen).
    let url = format!("http://{a_ip}:80/");
    let fetch = format!(
        "import urllib.request,time\nfor i in range(50):\n  try:\n    print(urllib.request.urlopen('{url}',timeout=2).status);break\n  except Exception: time.sleep(0.1)"
    );
    let got = out(&lab.cli(&["exec", &b, "--", "python3", "-c", &fetch]));
    assert!(got.contains("200"), "{got}");

    // A client outside reaches a through the host's published port.
    let (client, host_ip, _) = lab.outside(40);
    let o = client.must(&["python3", "-c", &format!("import urllib.request;print(urllib.request.urlopen('http://{host_ip}:8080/',timeout=3).status)")]);
    assert!(o.contains("200"), "{o}");

    // Removing the network is refused while containers are attached.
    let rm = lab.cli(&["network", "rm", &net]);
    assert!(
        !rm.status.success() && out(&rm).contains("endpoint"),
        "{}",
        out(&rm)
    );
    // rm refuses a running container without --force, then removes it with it.
    let rm = lab.cli(&["rm", &b]);
    assert!(
        !rm.status.success() && out(&rm).contains("running"),
        "{}",
        out(&rm)
    );
    assert!(lab.cli(&["rm", "--force", &a]).status.success());
    assert!(lab.cli(&["rm", "--force", &b]).status.success());
    assert!(!std::path::Path::new(&format!("/run/netns/fnc-{a}")).exists());
    assert!(lab.host_links("fnv").is_empty());
    assert_eq!(lab.map_len("pm4_any"), 0);
    let rm = lab.cli(&["network", "rm", &net]);
    assert!(rm.status.success(), "{}", out(&rm));
    assert!(
        lab.host_links("fn-").is_empty(),
        "{:?}",
        lab.host_links("fn-")
    );
}

#[test]
fn default_subnet_is_picked_and_host_networks_create_nothing() {
    let lab = Lab::new();
    let net = format!("df{}", lab.tag);
    let o = lab.cli(&["network", "create", &net]);
    assert!(o.status.success(), "{}", out(&o));
    let v: serde_json::Value =
        serde_json::from_slice(&lab.cli(&["network", "inspect", &net]).stdout).unwrap();
    assert!(
        v["network"]["subnets"][0]["cidr"]
            .as_str()
            .unwrap()
            .starts_with("10.89."),
        "{v}"
    );

    let h = format!("hn{}", lab.tag);
    assert!(lab
        .cli(&["network", "create", &h, "--host"])
        .status
        .success());
    let c = format!("h{}", lab.tag);
    let _guard = Containers(&lab, vec![c.clone()]);
    let o = lab.cli(&["run", "--name", &c, "--net", &h, "--", "sleep", "30"]);
    assert!(o.status.success(), "{}", out(&o));
    assert!(lab.host_links("fnv").is_empty());
    let o = lab.cli(&[
        "run",
        "--name",
        &format!("hp{}", lab.tag),
        "--net",
        &h,
        "-p",
        "80:80",
        "--",
        "sleep",
        "1",
    ]);
    assert!(
        !o.status.success() && out(&o).contains("host networking"),
        "{}",
        out(&o)
    );
}

#[test]
fn helpful_errors_for_unknown_things() {
    let lab = Lab::new();
    for (args, want) in [
        (
            vec!["run", "--name", "z", "--net", "nonexistent", "--", "true"],
            "does not exist",
        ),
        (vec!["exec", "nobody", "--", "true"], "no container"),
        (vec!["network", "rm", "nonexistent"], "does not exist"),
        (
            vec!["run", "--name", "bad name", "--net", "x", "--", "true"],
            "name",
        ),
    ] {
        let o = lab.cli(&args);
        assert!(!o.status.success(), "{args:?} succeeded");
        assert!(
            out(&o).to_lowercase().contains(want),
            "{args:?}: {}",
            out(&o)
        );
    }
}
