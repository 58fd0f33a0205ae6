//! ferrynet as Docker's network and IPAM driver, against the machine's real Docker engine.
//!
//! Each test serves the plugin under its own driver name (`/run/docker/plugins/fnt-<tag>.sock`)
//! with its own state directory, imports its own busybox image, and removes every container,
//! network, image, namespace and socket it made in Drop guards, also when it fails. Docker's
//! containers live in the real host namespace, where ferrynet keeps one nftables table, so the
//! tests take turns (`common::docker::turn`). Docker missing is a failure, not a skip.

mod common;

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use common::docker::*;
use common::{bin, out, sh, tag};
use serde_json::{json, Value};

#[test]
fn docker_containers_talk_publish_a_port_and_leave_nothing() {
    require_docker();
    let _turn = turn();
    let mut plugin = Plugin::start();
    let mut made = Made::default();
    let image = import_image(&mut made);
    let d = plugin.driver.clone();
    let net = format!("{d}-net");
    made.networks.push(net.clone());
    let netid = docker_ok(&[
        "network",
        "create",
        "-d",
        &d,
        "--ipam-driver",
        &d,
        "--subnet",
        "10.231.1.0/24",
        "-o",
        "com.docker.network.driver.mtu=1400",
        &net,
    ]);
    let fname = format!("docker-{}", &netid[..12]);

    // The CLI shows the Docker network under its derived name, with Docker's short id.
    let ls = out(&plugin.cli(&["network", "ls"]));
    assert!(
        ls.contains(&fname)
            && ls.contains("10.231.1.0/24")
            && ls.contains(&format!("docker={}", &netid[..12]))
            && ls.contains("1400"),
        "{ls}"
    );

    // ferrynet's CLI leaves a Docker network to Docker.
    let o = plugin.cli(&["network", "rm", &fname]);
    assert!(
        !o.status.success() && out(&o).contains("docker network rm"),
        "{}",
        out(&o)
    );

    let server = format!("{d}-srv");
    let web = format!("{d}-web");
    made.containers.extend([server.clone(), web.clone()]);
    echo_server(&server, &net, &image, "pong");
    docker_ok(&[
        "run",
        "-d",
        "--name",
        &web,
        "--network",
        &net,
        "-p",
        "18080:80",
        &image,
        "/bin/httpd",
        "-f",
        "-p",
        "80",
        "-h",
        "/www",
    ]);
    let srv_ip = ip_of(&server);
    let web_ip = ip_of(&web);
    assert!(
        srv_ip.starts_with("10.231.1.") && web_ip.starts_with("10.231.1."),
        "{srv_ip} {web_ip}"
    );
    assert_ne!(srv_ip, web_ip);

    // Inside: eth0 with the network's MTU, the default route via the bridge's gateway.
    assert_eq!(
        docker_ok(&["exec", &server, "/bin/cat", "/sys/class/net/eth0/mtu"]),
        "1400"
    );
    let routes = docker_ok(&["exec", &server, "/bin/ip", "route"]);
    assert!(routes.contains("default via 10.231.1.1"), "{routes}");

    // Two containers reach each other over TCP.
    let reply = eventually("pong from the server container", || {
        nc_reply(&["exec", &web, "/bin/nc", "-w", "3", &srv_ip, "7000"])
    });
    assert_eq!(reply, "pong");
    // Docker's embedded DNS knows containers of a ferrynet network by name.
    let dns = docker_ok(&["exec", &web, "/bin/nslookup", &server, "127.0.0.11"]);
    assert!(dns.contains(&srv_ip), "{dns}");

    // The published port answers a client in another namespace, through the host's address.
    let (client, host_ip) = outside_client(1);
    let page = eventually("the published port", || {
        let o = client.run(&[
            "/bin/busybox",
            "sh",
            "-c",
            &format!("printf 'GET / HTTP/1.0\\r\\n\\r\\n' | /bin/busybox nc -w 3 {host_ip} 18080"),
        ]);
        let text = String::from_utf8_lossy(&o.stdout).into_owned();
        text.contains("200 OK").then_some(text)
    });
    assert!(
        page.contains("hello from a docker container on ferrynet"),
        "{page}"
    );
    assert_eq!(map_len("pm4_any"), 1, "one published port element");

    // The driver reports the mapping in its endpoint info (docker inspect may not show it).
    let links = host_links(&["fnv"]);
    assert_eq!(links.len(), 2, "one host veth per container: {links:?}");

    // Removal leaves nothing: no links, no nftables elements, no records.
    docker_ok(&["rm", "-f", &server, &web]);
    assert_eq!(
        map_len("pm4_any"),
        0,
        "the published port is withdrawn with the container"
    );
    docker_ok(&["network", "rm", &net]);
    made.networks.clear();
    made.containers.clear();
    let left = host_links(&["fnv", "fnp"]);
    assert!(left.is_empty(), "veths left: {left:?}");
    let ls = out(&plugin.cli(&["network", "ls", "--json"]));
    assert_eq!(ls.trim(), "[]", "{ls}");
    assert!(
        !sh(&["nft", "list", "table", "inet", "ferrynet"])
            .status
            .success(),
        "the nftables table goes with the last network"
    );
    let keys = plugin.store_keys();
    assert!(keys.is_empty(), "records left in the store: {keys:?}");

    // SIGTERM: a clean exit that removes the socket.
    let (status, gone) = plugin.stop().expect("plugin was running");
    assert!(
        status.success(),
        "exit status {status}: {}",
        plugin.log_text()
    );
    assert!(gone, "the socket is removed on SIGTERM");
}

#[test]
fn cni_and_docker_containers_share_one_network() {
    require_docker();
    let _turn = turn();
    let plugin = Plugin::start();
    let mut made = Made::default();
    let image = import_image(&mut made);
    let d = plugin.driver.clone();
    let net = format!("{d}-net");
    let fname = format!("shared{}", tag());
    made.networks.push(net.clone());
    docker_ok(&[
        "network",
        "create",
        "-d",
        &d,
        "--ipam-driver",
        &d,
        "--subnet",
        "10.231.2.0/24",
        "--gateway",
        "10.231.2.254",
        "-o",
        &format!("ferrynet.network={fname}"),
        &net,
    ]);

    let dock = format!("{d}-dock");
    made.containers.push(dock.clone());
    echo_server(&dock, &net, &image, "from-docker");
    let dock_ip = ip_of(&dock);

    // A CLI container on the same ferrynet network gets another address from the same pool.
    let cni = format!("c{}", tag());
    made.cli_containers
        .push((plugin.state.path().to_path_buf(), cni.clone()));
    let o = plugin.cli(&[
        "run",
        "--name",
        &cni,
        "--net",
        &fname,
        "--",
        "/bin/busybox",
        "nc",
        "-ll",
        "-p",
        "7001",
        "-e",
        "/bin/busybox",
        "echo",
        "from-cni",
    ]);
    assert!(o.status.success(), "{}", out(&o));
    let line = String::from_utf8_lossy(&o.stdout).into_owned();
    let cni_ip = line
        .split_whitespace()
        .nth(1)
        .unwrap_or_default()
        .to_string();
    assert!(
        cni_ip.starts_with("10.231.2.") && cni_ip != dock_ip,
        "{line} vs {dock_ip}"
    );

    // Docker cannot take the CNI container's address: both use one allocation table.
    let o = docker(&[
        "run",
        "--rm",
        "--network",
        &net,
        "--ip",
        &cni_ip,
        &image,
        "/bin/true",
    ]);
    assert!(!o.status.success(), "a second container got {cni_ip}");
    assert!(out(&o).contains("already in use"), "{}", out(&o));

    // Both ways over TCP.
    let r = eventually("the CLI container from a Docker container", || {
        nc_reply(&[
            "run",
            "--rm",
            "--network",
            &net,
            &image,
            "/bin/nc",
            "-w",
            "3",
            &cni_ip,
            "7001",
        ])
    });
    assert_eq!(r, "from-cni");
    let r = eventually("the Docker container from the CLI container", || {
        let o = plugin.cli(&[
            "exec",
            &cni,
            "--",
            "/bin/busybox",
            "nc",
            "-w",
            "3",
            &dock_ip,
            "7000",
        ]);
        let s = String::from_utf8_lossy(&o.stdout).trim().to_string();
        (o.status.success() && !s.is_empty()).then_some(s)
    });
    assert_eq!(r, "from-docker");
    // The gateway Docker asked for is the bridge's address.
    let routes = docker_ok(&["exec", &dock, "/bin/ip", "route"]);
    assert!(routes.contains("default via 10.231.2.254"), "{routes}");

    // Removing the Docker network while the CLI container still uses it keeps the ferrynet
    // network (no longer marked as Docker's) for that container.
    docker_ok(&["rm", "-f", &dock]);
    made.containers.clear();
    docker_ok(&["network", "rm", &net]);
    made.networks.clear();
    let ls = out(&plugin.cli(&["network", "ls"]));
    assert!(ls.contains(&fname) && !ls.contains("docker="), "{ls}");
    let o = plugin.cli(&["rm", "--force", &cni]);
    assert!(o.status.success(), "{}", out(&o));
    made.cli_containers.clear();
    let o = plugin.cli(&["network", "rm", &fname]);
    assert!(o.status.success(), "{}", out(&o));
    let keys = plugin.store_keys();
    assert!(keys.is_empty(), "records left in the store: {keys:?}");
    assert!(host_links(&["fnv", "fnp"]).is_empty());
}

#[test]
fn docker_network_adopts_an_existing_ferrynet_network() {
    require_docker();
    let _turn = turn();
    let plugin = Plugin::start();
    let mut made = Made::default();
    let image = import_image(&mut made);
    let d = plugin.driver.clone();
    let fname = format!("adopt{}", tag());
    let o = plugin.cli(&["network", "create", &fname, "--subnet", "10.231.3.0/24"]);
    assert!(o.status.success(), "{}", out(&o));

    // Without naming it, an overlapping pool is refused with a clear message.
    let clash = format!("{d}-clash");
    made.networks.push(clash.clone());
    let o = docker(&[
        "network",
        "create",
        "-d",
        &d,
        "--ipam-driver",
        &d,
        "--subnet",
        "10.231.3.0/25",
        &clash,
    ]);
    assert!(!o.status.success(), "an overlapping pool was accepted");
    assert!(
        out(&o).contains(&format!(
            "overlaps subnet 10.231.3.0/24 of ferrynet network {fname}"
        )),
        "{}",
        out(&o)
    );

    // Naming it (IPAM option and driver option) makes the Docker network that ferrynet network.
    let net = format!("{d}-net");
    made.networks.push(net.clone());
    docker_ok(&[
        "network",
        "create",
        "-d",
        &d,
        "--ipam-driver",
        &d,
        "--ipam-opt",
        &format!("ferrynet.network={fname}"),
        "-o",
        &format!("ferrynet.network={fname}"),
        &net,
    ]);
    let subnet = docker_ok(&[
        "network",
        "inspect",
        "-f",
        "{{range .IPAM.Config}}{{.Subnet}} {{.Gateway}}{{end}}",
        &net,
    ]);
    assert_eq!(subnet, "10.231.3.0/24 10.231.3.1");
    let c = format!("{d}-c");
    made.containers.push(c.clone());
    docker_ok(&[
        "run",
        "-d",
        "--name",
        &c,
        "--network",
        &net,
        &image,
        "/bin/sleep",
        "600",
    ]);
    assert!(ip_of(&c).starts_with("10.231.3."));
    docker_ok(&["rm", "-f", &c]);
    made.containers.clear();
    docker_ok(&["network", "rm", &net]);
    made.networks.clear();
    // The adopted network outlives the Docker network.
    let ls = out(&plugin.cli(&["network", "ls"]));
    assert!(ls.contains(&fname), "{ls}");
    let o = plugin.cli(&["network", "rm", &fname]);
    assert!(o.status.success(), "{}", out(&o));
    assert!(plugin.store_keys().is_empty(), "{:?}", plugin.store_keys());
}

#[test]
fn malformed_and_unknown_requests_never_crash_the_server() {
    let _turn = turn();
    let plugin = Plugin::start();
    let s = plugin.socket.clone();

    let (st, v) = post(&s, "Plugin.Activate", "");
    assert_eq!(
        (st, v),
        (200, json!({"Implements": ["NetworkDriver", "IpamDriver"]}))
    );
    let (st, v) = post(&s, "NetworkDriver.GetCapabilities", "");
    assert_eq!(
        (st, v),
        (200, json!({"Scope": "local", "ConnectivityScope": "local"}))
    );
    let (st, v) = post(&s, "IpamDriver.GetCapabilities", "");
    assert_eq!(st, 200);
    assert_eq!(v["RequiresMACAddress"], false);

    for (method, body) in [
        ("NetworkDriver.CreateNetwork", "{\"NetworkID\":"),
        ("NetworkDriver.CreateNetwork", "[]"),
        ("NetworkDriver.CreateNetwork", "null"),
        ("NetworkDriver.Join", "{\"NetworkID\": 5}"),
        ("NetworkDriver.CreateEndpoint", ""),
        ("IpamDriver.RequestPool", "{\"V6\": \"yes\"}"),
        ("IpamDriver.RequestAddress", "\u{0}\u{1}garbage"),
    ] {
        let (st, v) = post(&s, method, body);
        assert_eq!(st, 400, "{method} {body:?}: {v}");
        assert!(
            v["Err"].as_str().is_some_and(|e| e.contains(method)),
            "{method}: {v}"
        );
    }
    let (st, v) = post(&s, "NetworkDriver.Teleport", "{}");
    assert_eq!(st, 404);
    assert!(
        v["Err"]
            .as_str()
            .is_some_and(|e| e.contains("does not implement NetworkDriver.Teleport")),
        "{v}"
    );
    let (st, _) = raw(
        &s,
        b"GET /Plugin.Activate HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    );
    assert_eq!(st, 405);
    let (st, _) = raw(&s, b"\x16\x03\x01 this is not http\r\n\r\n");
    assert!(st == 400 || st == 0, "garbage got {st}");
    let big = format!("{{\"NetworkID\":\"{}\"}}", "a".repeat(2 << 20));
    let (st, v) = post(&s, "NetworkDriver.DeleteNetwork", &big);
    assert_eq!(st, 400, "{v}");

    // Well-formed requests the driver refuses: HTTP 200 with the error in the body.
    let (st, v) = post(
        &s,
        "NetworkDriver.Join",
        "{\"NetworkID\":\"nope\",\"EndpointID\":\"e\"}",
    );
    assert_eq!(st, 200);
    assert!(
        v["Err"]
            .as_str()
            .is_some_and(|e| e.contains("not a ferrynet network")),
        "{v}"
    );
    let (st, v) = post(
        &s,
        "IpamDriver.RequestAddress",
        "{\"PoolID\":\"10.9.9.0/24\"}",
    );
    assert_eq!(st, 200);
    assert!(
        v["Error"]
            .as_str()
            .is_some_and(|e| e.contains("unknown pool")),
        "{v}"
    );
    let (st, v) = post(&s, "IpamDriver.RequestPool", "{\"Pool\":\"10.9.9.5/24\"}");
    assert_eq!(st, 200);
    assert!(
        v["Error"]
            .as_str()
            .is_some_and(|e| e.contains("10.9.9.0/24")),
        "{v}"
    );
    let (st, v) = post(&s, "NetworkDriver.CreateNetwork", "{\"NetworkID\":\"0123456789abcdef\",\"Options\":{\"com.docker.network.generic\":{\"ferrynet.bogus\":\"1\"}},\"IPv4Data\":[{\"Pool\":\"10.9.9.0/24\"}]}");
    assert_eq!(st, 200);
    assert!(
        v["Err"]
            .as_str()
            .is_some_and(|e| e.contains("unknown option ferrynet.bogus")),
        "{v}"
    );
    // Unknown things to delete are already deleted.
    let (st, v) = post(
        &s,
        "NetworkDriver.DeleteEndpoint",
        "{\"NetworkID\":\"x\",\"EndpointID\":\"y\"}",
    );
    assert_eq!((st, v), (200, json!({})));

    // Still serving, one request per connection or several on one.
    let (st, _) = post(&s, "Plugin.Activate", "");
    assert_eq!(st, 200);
    let two = "POST /Plugin.Activate HTTP/1.1\r\nHost: p\r\nContent-Length: 0\r\n\r\nPOST /NetworkDriver.GetCapabilities HTTP/1.1\r\nHost: p\r\nContent-Length: 0\r\nConnection: close\r\n\r\n";
    let mut c = UnixStream::connect(&s).expect("connect");
    c.write_all(two.as_bytes()).expect("write");
    let mut buf = String::new();
    let _ = c.read_to_string(&mut buf);
    assert_eq!(buf.matches("HTTP/1.1 200").count(), 2, "{buf}");
    assert!(plugin.store_keys().is_empty());
}

#[test]
fn the_driver_api_without_docker_publishes_and_cleans_up() {
    // The whole lifecycle as Docker drives it, with raw requests: pool, gateway, network,
    // address, endpoint, join (veth in the host namespace), ports, and back.
    let _turn = turn();
    let plugin = Plugin::start();
    let s = plugin.socket.clone();
    let ok = |method: &str, body: Value| -> Value {
        let (st, v) = post(&s, method, &body.to_string());
        assert_eq!(st, 200, "{method}: {v}");
        assert!(
            v.get("Err").is_none() && v.get("Error").is_none(),
            "{method}: {v}"
        );
        v
    };
    let pool = ok(
        "IpamDriver.RequestPool",
        json!({"AddressSpace": "ferrynet-local", "Pool": "", "SubPool": "", "Options": {}, "V6": false}),
    );
    let pool_id = pool["PoolID"].as_str().expect("pool id").to_string();
    let cidr = pool["Pool"].as_str().expect("pool").to_string();
    let again = post(
        &s,
        "IpamDriver.RequestPool",
        &json!({"Pool": cidr}).to_string(),
    )
    .1;
    assert!(
        again["Error"]
            .as_str()
            .is_some_and(|e| e.contains("already given")),
        "{again}"
    );
    let gw = ok(
        "IpamDriver.RequestAddress",
        json!({"PoolID": pool_id, "Address": "", "Options": {"RequestAddressType": "com.docker.network.gateway"}}),
    );
    let gw = gw["Address"].as_str().expect("gateway").to_string();
    let netid = format!("{:0>64}", tag());
    ok(
        "NetworkDriver.CreateNetwork",
        json!({"NetworkID": netid, "Options": {"com.docker.network.generic": {}},
        "IPv4Data": [{"AddressSpace": "ferrynet-local", "Pool": cidr, "Gateway": gw}], "IPv6Data": []}),
    );
    ok(
        "NetworkDriver.CreateNetwork",
        json!({"NetworkID": netid, "IPv4Data": [{"Pool": cidr, "Gateway": gw}]}),
    );
    let addr = ok(
        "IpamDriver.RequestAddress",
        json!({"PoolID": pool_id, "Address": "", "Options": {}}),
    );
    let addr = addr["Address"].as_str().expect("address").to_string();
    let epid = format!("{:f>64}", tag());
    let ce = ok(
        "NetworkDriver.CreateEndpoint",
        json!({"NetworkID": netid, "EndpointID": epid, "Interface": {"Address": addr}, "Options": {}}),
    );
    let mac = ce["Interface"]["MacAddress"]
        .as_str()
        .expect("the driver picks a MAC")
        .to_string();
    assert!(
        ce["Interface"].get("Address").is_none(),
        "Docker's address is kept: {ce}"
    );
    let join = ok(
        "NetworkDriver.Join",
        json!({"NetworkID": netid, "EndpointID": epid, "SandboxKey": "/var/run/docker/netns/x", "Options": {}}),
    );
    let src = join["InterfaceName"]["SrcName"]
        .as_str()
        .expect("src")
        .to_string();
    assert_eq!(join["InterfaceName"]["DstPrefix"], "eth");
    assert_eq!(join["Gateway"].as_str(), gw.split('/').next());
    let peer = sh(&["ip", "-j", "link", "show", "dev", &src]);
    let pv: Value = serde_json::from_slice(&peer.stdout).unwrap_or(Value::Null);
    assert_eq!(pv[0]["address"].as_str(), Some(mac.as_str()), "{pv}");
    assert_eq!(host_links(&["fnv"]).len(), 1);
    ok(
        "NetworkDriver.ProgramExternalConnectivity",
        json!({"NetworkID": netid, "EndpointID": epid, "Options": {
        "com.docker.network.portmap": [{"Proto": 6, "IP": "", "Port": 80, "HostIP": "", "HostPort": 0, "HostPortEnd": 0},
                                       {"Proto": 17, "IP": "", "Port": 53, "HostIP": "", "HostPort": 18053, "HostPortEnd": 18053}]}}),
    );
    assert_eq!(map_len("pm4_any"), 2);
    let info = ok(
        "NetworkDriver.EndpointOperInfo",
        json!({"NetworkID": netid, "EndpointID": epid}),
    );
    let pm = info["Value"]["com.docker.network.portmap"]
        .as_array()
        .expect("portmap")
        .clone();
    assert_eq!(pm.len(), 2);
    assert!(
        pm[0]["HostPort"].as_u64().is_some_and(|p| p >= 49153),
        "an ephemeral port: {info}"
    );
    ok(
        "NetworkDriver.RevokeExternalConnectivity",
        json!({"NetworkID": netid, "EndpointID": epid}),
    );
    assert_eq!(map_len("pm4_any"), 0);
    ok(
        "NetworkDriver.Leave",
        json!({"NetworkID": netid, "EndpointID": epid}),
    );
    assert!(host_links(&["fnv", "fnp"]).is_empty());
    ok(
        "NetworkDriver.DeleteEndpoint",
        json!({"NetworkID": netid, "EndpointID": epid}),
    );
    ok(
        "IpamDriver.ReleaseAddress",
        json!({"PoolID": pool_id, "Address": addr.split('/').next()}),
    );
    // Docker may give up between CreateEndpoint and Join (its sandbox failed): the port that
    // CreateEndpoint started building goes with DeleteEndpoint, its guard elements included.
    let addr2 = ok(
        "IpamDriver.RequestAddress",
        json!({"PoolID": pool_id, "Address": "", "Options": {}}),
    );
    let addr2 = addr2["Address"].as_str().expect("address").to_string();
    let ep2 = format!("{:e>64}", tag());
    let ce2 = ok(
        "NetworkDriver.CreateEndpoint",
        json!({"NetworkID": netid, "EndpointID": ep2, "Interface": {"Address": addr2}, "Options": {}}),
    );
    let mac2 = ce2["Interface"]["MacAddress"]
        .as_str()
        .expect("the driver picks a MAC")
        .to_string();
    ok(
        "NetworkDriver.DeleteEndpoint",
        json!({"NetworkID": netid, "EndpointID": ep2}),
    );
    assert!(host_links(&["fnv", "fnp"]).is_empty());
    let guard =
        String::from_utf8_lossy(&sh(&["nft", "list", "table", "bridge", "ferrynet"]).stdout)
            .to_string();
    let ip2 = addr2.split('/').next().expect("address").to_string();
    assert!(
        !guard.contains(&mac2) && !guard.contains(&ip2),
        "an endpoint never joined left guard elements: {guard}"
    );
    ok(
        "IpamDriver.ReleaseAddress",
        json!({"PoolID": pool_id, "Address": ip2}),
    );
    ok("NetworkDriver.DeleteNetwork", json!({"NetworkID": netid}));
    ok(
        "IpamDriver.ReleaseAddress",
        json!({"PoolID": pool_id, "Address": gw.split('/').next()}),
    );
    ok("IpamDriver.ReleasePool", json!({"PoolID": pool_id}));
    assert!(plugin.store_keys().is_empty(), "{:?}", plugin.store_keys());
}

#[test]
fn dual_stack_internal_network() {
    require_docker();
    let _turn = turn();
    let plugin = Plugin::start();
    let mut made = Made::default();
    let image = import_image(&mut made);
    let d = plugin.driver.clone();
    let net = format!("{d}-net");
    made.networks.push(net.clone());
    let netid = docker_ok(&[
        "network",
        "create",
        "-d",
        &d,
        "--ipam-driver",
        &d,
        "--ipv6",
        "--internal",
        "--subnet",
        "10.231.4.0/24",
        "--subnet",
        "fd31:4::/64",
        &net,
    ]);
    let ls = out(&plugin.cli(&["network", "ls"]));
    let row = ls
        .lines()
        .find(|l| l.contains(&netid[..12]))
        .unwrap_or_default()
        .to_string();
    assert!(
        row.contains("10.231.4.0/24,fd31:4::/64") && row.contains("internal"),
        "{ls}"
    );

    let a = format!("{d}-a");
    made.containers.push(a.clone());
    echo_server(&a, &net, &image, "pong6");
    let a6 = docker_ok(&[
        "inspect",
        "-f",
        "{{range .NetworkSettings.Networks}}{{.GlobalIPv6Address}}{{end}}",
        &a,
    ]);
    assert!(a6.starts_with("fd31:4::"), "{a6}");
    // Internal: no default route of either family.
    let r4 = docker_ok(&["exec", &a, "/bin/ip", "route"]);
    let r6 = docker_ok(&["exec", &a, "/bin/ip", "-6", "route"]);
    assert!(
        !r4.contains("default") && !r6.contains("default"),
        "{r4}\n{r6}"
    );
    let r = eventually("the IPv6 server", || {
        nc_reply(&[
            "run",
            "--rm",
            "--network",
            &net,
            &image,
            "/bin/nc",
            "-w",
            "3",
            &a6,
            "7000",
        ])
    });
    assert_eq!(r, "pong6");
    // Ports cannot be published on an internal network: Docker reports ferrynet's reason.
    let o = docker(&[
        "run",
        "--rm",
        "--network",
        &net,
        "-p",
        "18081:80",
        &image,
        "/bin/true",
    ]);
    if o.status.success() {
        // Docker skips external connectivity on networks it knows are internal.
        assert_eq!(map_len("pm4_any"), 0);
    } else {
        assert!(out(&o).contains("internal"), "{}", out(&o));
    }
    docker_ok(&["rm", "-f", &a]);
    made.containers.clear();
    docker_ok(&["network", "rm", &net]);
    made.networks.clear();
    assert!(plugin.store_keys().is_empty(), "{:?}", plugin.store_keys());
    assert!(host_links(&["fnv", "fnp"]).is_empty());
}

#[test]
fn a_stale_socket_is_replaced_and_a_live_one_kept() {
    let _turn = turn();
    // A socket file nobody listens on (a plugin that was killed) is replaced.
    let driver = format!("fnt-{}", tag());
    let path = PathBuf::from(format!("/run/docker/plugins/{driver}.sock"));
    std::fs::create_dir_all("/run/docker/plugins").expect("plugins dir");
    drop(std::os::unix::net::UnixListener::bind(&path).expect("bind a socket"));
    assert!(path.exists());
    // A child another test thread forked while the listener was open holds it until it execs
    // (long, on a loaded machine): the plugin would then find a live socket and refuse, and our
    // request get no answer. Wait until nobody listens.
    let t0 = Instant::now();
    while UnixStream::connect(&path).is_ok() {
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "the stale socket stays live"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    let state = tempfile::tempdir().expect("state");
    let s = state.path().display().to_string();
    let p = path.display().to_string();
    let log = state.path().join("plugin.log");
    let mut child = Command::new(bin())
        .args(["--state-dir", &s, "docker-plugin", "--socket", &p])
        .stderr(std::fs::File::create(&log).expect("log file"))
        .spawn()
        .expect("spawn");
    let guard = Proc(child.id());
    let deadline = Instant::now() + Duration::from_secs(20);
    while UnixStream::connect(&path).is_err() {
        assert!(
            child.try_wait().ok().flatten().is_none(),
            "the plugin exited"
        );
        assert!(Instant::now() < deadline, "the plugin never listened");
        std::thread::sleep(Duration::from_millis(50));
    }
    let first = post(&path, "Plugin.Activate", "").0;
    assert_eq!(
        first,
        200,
        "plugin exited: {:?}; log:\n{}",
        child.try_wait().ok().flatten(),
        std::fs::read_to_string(&log).unwrap_or_default()
    );
    // A second plugin on a live socket refuses to start and leaves it alone.
    let o = sh(&[bin(), "--state-dir", &s, "docker-plugin", "--socket", &p]);
    assert!(!o.status.success());
    assert!(out(&o).contains("another running plugin"), "{}", out(&o));
    assert_eq!(post(&path, "Plugin.Activate", "").0, 200);
    drop(guard);
    let st = child.wait().expect("wait");
    assert!(st.success(), "{st}");
    assert!(!path.exists(), "the socket is removed on SIGTERM");
}

/// SIGTERM to a process by PID on drop.
struct Proc(u32);
impl Drop for Proc {
    fn drop(&mut self) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.0 as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
    }
}

#[test]
fn docker_default_ipam_with_the_ferrynet_driver() {
    require_docker();
    let _turn = turn();
    let plugin = Plugin::start();
    let mut made = Made::default();
    let image = import_image(&mut made);
    let d = plugin.driver.clone();
    let net = format!("{d}-net");
    made.networks.push(net.clone());
    // Docker's own IPAM chooses the addresses; ferrynet records them on its endpoints.
    let netid = docker_ok(&[
        "network",
        "create",
        "-d",
        &d,
        "--subnet",
        "10.231.5.0/24",
        &net,
    ]);
    let a = format!("{d}-a");
    made.containers.push(a.clone());
    echo_server(&a, &net, &image, "pong");
    let ip = ip_of(&a);
    let r = eventually("the server", || {
        nc_reply(&[
            "run",
            "--rm",
            "--network",
            &net,
            &image,
            "/bin/nc",
            "-w",
            "3",
            &ip,
            "7000",
        ])
    });
    assert_eq!(r, "pong");
    let inspect = out(&plugin.cli(&["network", "inspect", &format!("docker-{}", &netid[..12])]));
    assert!(inspect.contains(&format!("{ip}/24")), "{inspect}");
    docker_ok(&["rm", "-f", &a]);
    made.containers.clear();
    docker_ok(&["network", "rm", &net]);
    made.networks.clear();
    assert!(plugin.store_keys().is_empty(), "{:?}", plugin.store_keys());
}

#[test]
fn agent_restart_keeps_docker_containers_talking() {
    require_docker();
    let _turn = turn();
    let mut agent = Plugin::start_agent();
    let mut made = Made::default();
    let image = import_image(&mut made);
    let d = agent.driver.clone();
    let net = format!("{d}-net");
    made.networks.push(net.clone());
    docker_ok(&[
        "network",
        "create",
        "-d",
        &d,
        "--ipam-driver",
        &d,
        "--subnet",
        "10.231.6.0/24",
        &net,
    ]);
    let (a, b) = (format!("{d}-a"), format!("{d}-b"));
    made.containers.extend([a.clone(), b.clone()]);
    for (name, reply, publish) in [
        (a.as_str(), "pong-a", Some("18082:7000")),
        (b.as_str(), "pong-b", None),
    ] {
        let mut args = vec!["run", "-d", "--name", name, "--network", net.as_str()];
        if let Some(p) = publish {
            args.extend(["-p", p]);
        }
        args.extend([
            image.as_str(),
            "/bin/nc",
            "-ll",
            "-p",
            "7000",
            "-e",
            "/bin/echo",
            reply,
        ]);
        docker_ok(&args);
    }
    let (a_ip, b_ip) = (ip_of(&a), ip_of(&b));
    assert_ne!(a_ip, b_ip);
    assert_eq!(
        eventually("a from b", || talk(&b, &a_ip)),
        "pong-a",
        "before the restart"
    );
    assert_eq!(eventually("b from a", || talk(&a, &b_ip)), "pong-b");
    let (client, host_ip) = outside_client(2);
    let via_port = || {
        let o = client.run(&["/bin/busybox", "nc", "-w", "3", &host_ip, "18082"]);
        let s = String::from_utf8_lossy(&o.stdout).trim().to_string();
        (o.status.success() && !s.is_empty()).then_some(s)
    };
    assert_eq!(eventually("the published port", via_port), "pong-a");

    // kill -9: the agent cleans nothing up; the kernel keeps bridge, veths and nftables.
    // (Results are checked once the agent is back, so a failure still cleans up through it.)
    let status = agent.kill9();
    let socket_left = agent.socket.exists();
    let while_dead = (talk(&b, &a_ip), talk(&a, &b_ip), via_port());
    agent.spawn();
    assert_eq!(
        std::os::unix::process::ExitStatusExt::signal(&status),
        Some(9),
        "{status}"
    );
    assert!(socket_left, "kill -9 leaves the socket file behind");
    assert_eq!(
        while_dead,
        (
            Some("pong-a".to_string()),
            Some("pong-b".to_string()),
            Some("pong-a".to_string())
        ),
        "the containers talk while the agent is dead"
    );

    // The restarted agent (same socket, same state): still talking, right away.
    assert_eq!(
        talk(&b, &a_ip).as_deref(),
        Some("pong-a"),
        "after the restart"
    );
    assert_eq!(talk(&a, &b_ip).as_deref(), Some("pong-b"));
    assert_eq!(via_port().as_deref(), Some("pong-a"));

    // A new container: Docker calls the restarted driver; the IPAM remembers a and b.
    let c = format!("{d}-c");
    made.containers.push(c.clone());
    echo_server(&c, &net, &image, "pong-c");
    let c_ip = ip_of(&c);
    assert!(
        c_ip.starts_with("10.231.6.") && c_ip != a_ip && c_ip != b_ip,
        "{c_ip} vs {a_ip} {b_ip}"
    );
    assert_eq!(eventually("a from c", || talk(&c, &a_ip)), "pong-a");
    assert_eq!(eventually("b from c", || talk(&c, &b_ip)), "pong-b");
    assert_eq!(eventually("c from a", || talk(&a, &c_ip)), "pong-c");
    assert_eq!(host_links(&["fnv"]).len(), 3, "one host veth per container");

    // Removal through the restarted agent leaves nothing behind. One container at a time:
    // Docker 20.10 removing several of one network in parallel can lose count of its endpoints.
    for x in [&a, &b, &c] {
        docker_ok(&["rm", "-f", x]);
    }
    made.containers.clear();
    assert_eq!(map_len("pm4_any"), 0, "the published port is withdrawn");
    docker_ok(&["network", "rm", &net]);
    made.networks.clear();
    let left = host_links(&["fnv", "fnp"]);
    assert!(left.is_empty(), "veths left: {left:?}");
    let ls = out(&agent.cli(&["network", "ls", "--json"]));
    assert_eq!(ls.trim(), "[]", "{ls}");
    assert!(
        !sh(&["nft", "list", "table", "inet", "ferrynet"])
            .status
            .success(),
        "the nftables table goes with the last network"
    );
    let keys = agent.store_keys();
    assert!(keys.is_empty(), "records left in the store: {keys:?}");
    drop(client);

    // SIGTERM: a clean exit that removes the Docker socket.
    let (status, gone) = agent.stop().expect("agent was running");
    assert!(
        status.success(),
        "exit status {status}: {}",
        agent.log_text()
    );
    assert!(gone, "the socket is removed on SIGTERM");
}

/// Docker never tells a network driver a container's name: the driver asks the Engine API after
/// the Join and records name and network aliases on the endpoint, beside a CLI container's.
#[test]
fn docker_endpoints_carry_their_container_names() {
    require_docker();
    let _turn = turn();
    let plugin = Plugin::start();
    let mut made = Made::default();
    let image = import_image(&mut made);
    let d = plugin.driver.clone();
    let net = format!("{d}-net");
    let fname = format!("named{}", tag());
    made.networks.push(net.clone());
    docker_ok(&[
        "network",
        "create",
        "-d",
        &d,
        "--ipam-driver",
        &d,
        "--subnet",
        "10.231.9.0/24",
        "-o",
        &format!("ferrynet.network={fname}"),
        &net,
    ]);
    let web = format!("{d}-web");
    made.containers.push(web.clone());
    docker_ok(&[
        "run",
        "-d",
        "--name",
        &web,
        "--network",
        &net,
        "--network-alias",
        "www",
        "--network-alias",
        "front",
        &image,
        "/bin/sleep",
        "600",
    ]);
    let ep_id = docker_ok(&[
        "inspect",
        "-f",
        "{{range .NetworkSettings.Networks}}{{.EndpointID}}{{end}}",
        &web,
    ]);
    let rec = eventually("the endpoint record to carry the container's name", || {
        plugin
            .docker_endpoint_record(&fname, &ep_id)
            .filter(|r| r["name"].as_str().is_some())
    });
    assert_eq!(rec["name"].as_str(), Some(web.as_str()), "{rec}");
    let aliases: Vec<&str> = rec["aliases"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(Value::as_str)
        .collect();
    assert!(
        aliases.contains(&"www") && aliases.contains(&"front") && !aliases.contains(&web.as_str()),
        "{rec}"
    );
    // The name was recorded over the record's other fields, not instead of them.
    assert!(
        rec["ips"].as_array().is_some_and(|a| !a.is_empty()),
        "{rec}"
    );
    assert!(rec["hostVeth"].as_str().is_some(), "{rec}");

    // A container without aliases: just its name.
    let plain = format!("{d}-plain");
    made.containers.push(plain.clone());
    docker_ok(&[
        "run",
        "-d",
        "--name",
        &plain,
        "--network",
        &net,
        &image,
        "/bin/sleep",
        "600",
    ]);
    let plain_ep = docker_ok(&[
        "inspect",
        "-f",
        "{{range .NetworkSettings.Networks}}{{.EndpointID}}{{end}}",
        &plain,
    ]);
    let rec = eventually("the second endpoint's name", || {
        plugin
            .docker_endpoint_record(&fname, &plain_ep)
            .filter(|r| r["name"].as_str().is_some())
    });
    assert_eq!(rec["name"].as_str(), Some(plain.as_str()), "{rec}");

    for c in [&web, &plain] {
        docker_ok(&["rm", "-f", c]);
    }
    made.containers.clear();
    docker_ok(&["network", "rm", &net]);
    made.networks.clear();
    let keys = plugin.store_keys();
    assert!(keys.is_empty(), "records left in the store: {keys:?}");
}
