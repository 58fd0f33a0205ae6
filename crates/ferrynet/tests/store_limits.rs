//! Store writes that grow with the cluster stay within etcd's 128 operations per transaction
//! (issue 17, part 2), on a lab's real etcd: a departed host with 500 endpoints and 1,000
//! producers is released; a 1,001-port range is published, refused to a second container and
//! released; a service with 1,000 producers is deregistered.

mod common;

use std::future::Future;
use std::net::IpAddr;
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::lab::Lab;
use common::out;
use ferrynet_dataplane::netns::Netns;
use ferrynet_model::network::{keys, Endpoint, Network};
use ferrynet_model::service::{keys as skeys, Producer};
use ferrynet_store::{Op, Store, StoreConfig, MAX_TXN_OPS};

/// The lab's etcd, as its hosts reach it.
const LAB_ETCD: &str = "etcd://172.31.0.253:2379";

/// Run `f` against the lab's etcd from inside lab host `host`'s namespace (the root namespace
/// has no route to it).
fn with_store<T, F, Fut>(lab: &Lab, host: &str, f: F) -> T
where
    T: Send + 'static,
    F: FnOnce(Arc<dyn Store>) -> Fut + Send + 'static,
    Fut: Future<Output = T>,
{
    let ns = Netns::open(Netns::named_path(&lab.host_ns(host))).expect("open the host netns");
    ns.run_in(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        rt.block_on(async move {
            let cfg = StoreConfig::parse(LAB_ETCD).expect("store url");
            let store = ferrynet_store::open(&cfg)
                .await
                .expect("open the lab's etcd");
            f(store).await
        })
    })
    .expect("run in the host netns")
}

/// Write `ops` in transactions of at most `MAX_TXN_OPS` writes.
async fn put_all(store: &Arc<dyn Store>, ops: Vec<Op>) {
    let mut ops = ops;
    while !ops.is_empty() {
        let rest = ops.split_off(ops.len().min(MAX_TXN_OPS));
        let res = store.txn(vec![], ops).await.expect("write records");
        assert!(res.succeeded);
        ops = rest;
    }
}

/// `n` producers of `service` on `host`, as that host's registrations would write them.
fn producers(service: &str, host: &str, n: usize) -> Vec<Op> {
    (0..n)
        .map(|i| {
            let p = Producer {
                service: service.to_string(),
                id: format!("p{i}"),
                host: Some(host.to_string()),
                network: None,
                container: None,
                netns: None,
                addrs: vec![IpAddr::from([192, 0, 2, (i % 250) as u8 + 1])],
                ports: Default::default(),
                check: None,
            };
            Op::put(
                skeys::producer(service, &p.id),
                serde_json::to_vec(&p).unwrap(),
            )
        })
        .collect()
}

/// How many records under `prefix` satisfy `pred`.
fn count<P>(lab: &Lab, prefix: String, pred: P) -> usize
where
    P: Fn(&[u8]) -> bool + Send + 'static,
{
    with_store(lab, "h1", move |s| async move {
        let (kvs, _) = s.range(&prefix).await.expect("range");
        kvs.iter().filter(|kv| pred(&kv.value)).count()
    })
}

fn on_host(host: &'static str) -> impl Fn(&[u8]) -> bool + Send + 'static {
    move |v| serde_json::from_slice::<serde_json::Value>(v).is_ok_and(|j| j["host"] == host)
}

/// On a 2-host lab: h2 holds a block through a real container, plus `forged` endpoints written
/// as h2's ADDs would have left them (each with its address key) and `producer_count` producers.
fn load_h2(lab: &mut Lab, forged: usize, producer_count: usize) {
    let c2 = lab.run("h2", "c2", &[], &["sleep", "600"]);
    let addr: IpAddr = c2.v4.parse().unwrap();
    with_store(lab, "h1", move |s| async move {
        let (eps, _) = s.range(&keys::endpoints("fabric")).await.unwrap();
        let model: Endpoint = eps
            .iter()
            .filter_map(|kv| serde_json::from_slice::<Endpoint>(&kv.value).ok())
            .find(|e| e.ips.iter().any(|i| i.addr() == addr))
            .expect("c2's endpoint");
        let net: Network = serde_json::from_slice(
            &s.get(&keys::network("fabric"))
                .await
                .unwrap()
                .unwrap()
                .value,
        )
        .unwrap();
        let pool = net
            .subnets
            .iter()
            .find_map(|sn| match sn.cidr {
                ipnet::IpNet::V4(p) => Some(p),
                _ => None,
            })
            .expect("an IPv4 pool");
        let mut ops = Vec::new();
        // From the top of the pool, far from the blocks the lab's hosts took first.
        for (i, ip) in pool.hosts().rev().take(forged).enumerate() {
            let mut ep = model.clone();
            ep.container_id = format!("forged{i:04}");
            ep.ips = vec![ipnet::IpNet::from(ipnet::Ipv4Net::new(ip, 32).unwrap())];
            let owner = format!("{}/{}", ep.container_id, ep.ifname);
            ops.push(Op::put(keys::ipam("fabric", IpAddr::V4(ip)), owner));
            ops.push(Op::put(
                keys::endpoint("fabric", &ep.container_id, &ep.ifname),
                serde_json::to_vec(&ep).unwrap(),
            ));
        }
        ops.extend(producers("bulk", "h2", producer_count));
        put_all(&s, ops).await;
    });
}

/// Wait (60 s at most) until h1's agent has released everything of h2: endpoints, forged
/// addresses, producers.
fn wait_h2_released(lab: &Lab) {
    let until = Instant::now() + Duration::from_secs(60);
    loop {
        let eps = count(lab, keys::endpoints("fabric"), on_host("h2"));
        let prods = count(lab, skeys::producers(), on_host("h2"));
        let addrs = count(lab, keys::ipam_prefix("fabric"), |v| {
            v.starts_with(b"forged")
        });
        if eps == 0 && prods == 0 && addrs == 0 {
            return;
        }
        assert!(
            Instant::now() < until,
            "after 60 s h2 still holds {eps} endpoints, {addrs} forged addresses, {prods} producers\n{}",
            lab.agent_log_tail("h1", 30)
        );
        std::thread::sleep(Duration::from_millis(500));
    }
}

#[test]
fn departed_host_with_500_endpoints_and_1000_producers_is_released() {
    let mut lab = Lab::up(
        "stbig",
        &[
            "--hosts",
            "2",
            "--backend",
            "vxlan",
            "--grace",
            "3s",
            "--lease-ttl",
            "2s",
        ],
    );
    load_h2(&mut lab, 499, 1000);
    assert_eq!(count(&lab, keys::endpoints("fabric"), on_host("h2")), 500);
    assert_eq!(count(&lab, skeys::producers(), on_host("h2")), 1000);

    // h2 disappears; after its lease and grace period h1's agent releases all of it.
    lab.lab(&["stop-agent", "h2", "--kill"]);
    wait_h2_released(&lab);
    let log = lab.agent_log_tail("h1", 400);
    assert!(!log.contains("too large"), "{log}");
}

#[test]
fn a_thousand_port_range_and_a_thousand_producers() {
    let mut lab = Lab::up("stports", &["--hosts", "2", "--backend", "vxlan"]);
    let server = "import socket\n\
        s=socket.socket();s.setsockopt(socket.SOL_SOCKET,socket.SO_REUSEADDR,1)\n\
        s.bind(('0.0.0.0',10999));s.listen(8)\n\
        while True:\n  c,_=s.accept();c.sendall(b'range');c.close()\n";
    let a = lab.run(
        "h1",
        "a",
        &["-p", "10000-11000:10000-11000"],
        &["python3", "-c", server],
    );
    // One claim record holds the whole range.
    let claims = count(&lab, keys::port_claims(), |_| true);
    assert_eq!(claims, 1);
    // The last port of the range answers on h1's underlay address, from h2.
    // Lab hosts are 172.31.0.<n> on the underlay.
    let h1_addr = "172.31.0.1";
    let probe = format!(
        "import socket\ns=socket.create_connection(('{h1_addr}',10999),timeout=2)\nassert s.recv(5)==b'range'\n"
    );
    let until = Instant::now() + Duration::from_secs(10);
    loop {
        let o = Command::new("ip")
            .args(["netns", "exec", &lab.host_ns("h2"), "python3", "-c", &probe])
            .output()
            .unwrap();
        if o.status.success() {
            break;
        }
        assert!(
            Instant::now() < until,
            "port 10999 never answered: {}",
            out(&o)
        );
        std::thread::sleep(Duration::from_millis(300));
    }
    // Any port of the range is refused to another container, naming the holder.
    let o = lab.exec(
        "h1",
        &[
            "run", "--name", "stportsb", "--net", "fabric", "-p", "10500:80", "--", "sleep", "60",
        ],
    );
    let text = out(&o);
    assert!(!o.status.success() && text.contains("10500"), "{text}");
    // Removing the holder frees the whole range.
    lab.rm(&a);
    assert_eq!(count(&lab, keys::port_claims(), |_| true), 0);
    lab.run("h1", "b", &["-p", "10500:80"], &["sleep", "60"]);

    // A service with 1,000 producers is deregistered in one go.
    lab.ok("h1", &["service", "register", "many", "--port", "80"]);
    with_store(&lab, "h1", |s| async move {
        put_all(&s, producers("many", "h1", 1000)).await;
    });
    assert_eq!(count(&lab, skeys::producers_of("many"), |_| true), 1000);
    lab.ok("h1", &["service", "deregister", "many"]);
    assert_eq!(count(&lab, skeys::producers_of("many"), |_| true), 0);
}

/// The releasing agent killed after its first transaction (crash point `agent-release-batched`)
/// leaves a release cut short; started again, it finishes it: nothing of the departed host stays.
#[test]
fn a_release_cut_short_by_a_crash_resumes_when_the_agent_is_back() {
    let mut lab = Lab::up(
        "strel",
        &[
            "--hosts",
            "2",
            "--backend",
            "vxlan",
            "--grace",
            "3s",
            "--lease-ttl",
            "2s",
        ],
    );
    // 300 endpoints (2 writes each) and 200 producers: several transactions of at most 128.
    load_h2(&mut lab, 299, 200);
    lab.lab(&["stop-agent", "h1"]);
    let o = Command::new(common::bin())
        .args(["lab", "start-agent", "h1", "--name", &lab.name])
        .env("FERRYNET_FAILPOINT", "agent-release-batched")
        .output()
        .expect("lab start-agent");
    assert!(o.status.success(), "start-agent: {}", out(&o));
    lab.lab(&["stop-agent", "h2", "--kill"]);
    let until = Instant::now() + Duration::from_secs(60);
    while !lab
        .agent_log_tail("h1", 50)
        .contains("crash point agent-release-batched reached")
    {
        assert!(
            Instant::now() < until,
            "h1's agent never reached the crash point\n{}",
            lab.agent_log_tail("h1", 30)
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let eps = count(&lab, keys::endpoints("fabric"), on_host("h2"));
    let prods = count(&lab, skeys::producers(), on_host("h2"));
    assert!(
        eps + prods > 0 && eps + prods < 500,
        "the crash cut the release short: {eps} endpoints and {prods} producers left"
    );
    lab.lab(&["start-agent", "h1"]);
    wait_h2_released(&lab);
}
