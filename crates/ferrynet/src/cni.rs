//! The CNI plugin: selected when `CNI_COMMAND` is set; config on stdin, result on stdout.

use std::collections::BTreeMap;
use std::io::Read;
use std::net::IpAddr;
use std::path::PathBuf;

use ferrynet_dataplane::vxlan::VXLAN_PORT;
use ferrynet_model::blocks::HostView;
use ferrynet_model::cni::{
    check_args, CniEnv, CniError, CniResult, Command, Dns, Interface, IpConfig, NetConf, Route,
    KNOWN_ARGS,
};
use ferrynet_model::ipam::validate_network_subnets;
use ferrynet_model::names::parse_mac;
use ferrynet_model::network::{Endpoint, EndpointOwner, Network, NetworkMode, Subnet};
use ferrynet_model::pod::{pod_args, PodArgs};
use ferrynet_model::reserved::{check_host_ports, host_ports};
use ferrynet_model::validate::{check_bridge_name, check_dns_name};
use ipnet::IpNet;
use serde_json::Value;

use crate::control::endpoint::{
    container_addresses, container_gateway, container_routes, AttachRequest,
};
use crate::control::shaping::DEFAULT_MTU;
use crate::control::{Control, Paths};
use crate::error::ControlError;

/// Run as a CNI plugin; returns the process exit code.
pub fn main() -> i32 {
    let mut stdin = Vec::new();
    if let Err(e) = std::io::stdin().read_to_end(&mut stdin) {
        return emit_error(
            &CniError::io(format!("reading the network configuration from stdin: {e}")),
            "1.1.0",
        );
    }
    let version = serde_json::from_slice::<Value>(&stdin)
        .ok()
        .and_then(|v| {
            v.get("cniVersion")
                .and_then(Value::as_str)
                .map(str::to_string)
        })
        .unwrap_or_else(|| "1.1.0".to_string());
    let env = match CniEnv::from_vars(|k| std::env::var(k).ok()) {
        Ok(env) => env,
        Err(e) => return emit_error(&e, &version),
    };
    if env.command == Command::Version {
        println!("{}", ferrynet_model::cni::version_result(&version));
        return 0;
    }
    let conf = match NetConf::parse(&stdin) {
        Ok(c) => c,
        Err(e) => return emit_error(&e, &version),
    };
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            return emit_error(
                &CniError::io(format!("starting the async runtime: {e}")),
                &version,
            )
        }
    };
    match runtime.block_on(dispatch(&env, &conf)) {
        Ok(Some(out)) => {
            println!("{out}");
            0
        }
        Ok(None) => 0,
        Err(e) => emit_error(&e, &conf.cni_version),
    }
}

fn emit_error(e: &CniError, version: &str) -> i32 {
    tracing::error!(code = e.code, "{}", e.msg);
    println!("{}", e.to_json(version));
    1
}

fn ctl_err(e: ControlError) -> CniError {
    e.to_cni()
}

async fn dispatch(env: &CniEnv, conf: &NetConf) -> Result<Option<Value>, CniError> {
    let paths = Paths::resolve(conf_str(conf, "stateDir").map(PathBuf::from).as_deref());
    let ctl = Control::open_with(paths, conf_str(conf, "store"), None)
        .await
        .map_err(|e| match e {
            ControlError::Store(_) => {
                CniError::try_again_later(format!("cannot open the ferrynet store: {e}"))
            }
            other => ctl_err(other),
        })?;
    match env.command {
        Command::Add => add(&ctl, env, conf).await.map(Some),
        Command::Del => del(&ctl, env, conf).await.map(|_| None),
        Command::Check => check(&ctl, env, conf).await.map(|_| None),
        Command::Gc => gc(&ctl, conf).await.map(|_| None),
        Command::Status => status(&ctl).await.map(|_| None),
        Command::Version => Ok(Some(ferrynet_model::cni::version_result(&conf.cni_version))),
    }
}

fn conf_str<'a>(conf: &'a NetConf, key: &str) -> Option<&'a str> {
    conf.extra.get(key).and_then(Value::as_str)
}

/// The network a config describes: from its own keys (`subnets`, or host-local style
/// `ipam.subnet` / `ipam.ranges`), or None when it only names a network made by the CLI.
pub fn network_from_conf(conf: &NetConf) -> Result<Option<Network>, CniError> {
    let mode = match conf_str(conf, "mode") {
        None => NetworkMode::Bridge,
        Some(m) => m.parse::<NetworkMode>().map_err(CniError::invalid_config)?,
    };
    let mut subnets: Vec<Subnet> = match conf.extra.get("subnets") {
        Some(v) => serde_json::from_value(v.clone()).map_err(|e| {
            CniError::invalid_config(format!(
                "subnets: {e} (expected [{{\"cidr\": \"10.88.0.0/16\"}}, ...])"
            ))
        })?,
        None => Vec::new(),
    };
    if let Some(ipam) = &conf.ipam {
        subnets.extend(subnets_from_ipam(ipam)?);
    }
    if subnets.is_empty() && mode.gives_interfaces() {
        return Ok(None);
    }
    let mtu = match conf.extra.get("mtu") {
        None => None,
        Some(v) => Some(
            v.as_u64()
                .and_then(|m| u32::try_from(m).ok())
                .ok_or_else(|| {
                    CniError::invalid_config(format!("mtu must be a number, not {v}"))
                })?,
        ),
    };
    let flag = |k: &str, default: bool| -> Result<bool, CniError> {
        match conf.extra.get(k) {
            None => Ok(default),
            Some(Value::Bool(b)) => Ok(*b),
            Some(v) => Err(CniError::invalid_config(format!(
                "{k} must be true or false, not {v}"
            ))),
        }
    };
    let internal = flag("internal", false)?;
    let bridge = conf_str(conf, "bridge").unwrap_or_default();
    if !bridge.is_empty() {
        check_bridge_name(bridge).map_err(|e| CniError::invalid_config(e.to_string()))?;
    }
    Ok(Some(crate::control::network::with_defaults(Network {
        name: conf.name.clone(),
        mode,
        bridge: bridge.to_string(),
        subnets,
        mtu,
        internal,
        ip_masq: flag("ipMasq", !internal)?,
        fabric: None,
        // Network policy: restricted until a policy allows (docs/POLICY.md).
        default_deny: flag("defaultDeny", false)?,
    })))
}

/// Accept the host-local IPAM shapes so existing conflists work: `subnet` (+ `gateway`,
/// `rangeStart`, `rangeEnd`) or `ranges: [[{subnet, gateway, rangeStart, rangeEnd}]]`.
/// ferrynet does the allocation itself either way.
fn subnets_from_ipam(ipam: &Value) -> Result<Vec<Subnet>, CniError> {
    let kind = ipam
        .get("type")
        .and_then(Value::as_str)
        .unwrap_or("ferrynet");
    if !matches!(kind, "ferrynet" | "host-local") {
        return Err(CniError::unsupported_field(
            "ipam.type",
            format!("{kind} (ferrynet allocates addresses itself; use \"ferrynet\" or host-local-style ranges)"),
        ));
    }
    let one = |v: &Value| -> Result<Subnet, CniError> {
        let get_ip = |k: &str| -> Result<Option<IpAddr>, CniError> {
            match v.get(k).and_then(Value::as_str) {
                None => Ok(None),
                Some(s) => s.parse().map(Some).map_err(|_| {
                    CniError::invalid_config(format!("ipam {k} {s:?} is not an IP address"))
                }),
            }
        };
        let cidr: IpNet = v
            .get("subnet")
            .and_then(Value::as_str)
            .ok_or_else(|| CniError::invalid_config("ipam range without \"subnet\""))?
            .parse()
            .map_err(|_| {
                CniError::invalid_config(format!("ipam subnet {} is not a CIDR", v["subnet"]))
            })?;
        let mut s = Subnet::new(cidr);
        s.gateway = get_ip("gateway")?;
        s.range_start = get_ip("rangeStart")?;
        s.range_end = get_ip("rangeEnd")?;
        Ok(s)
    };
    let mut out = Vec::new();
    if ipam.get("subnet").is_some() {
        out.push(one(ipam)?);
    }
    if let Some(ranges) = ipam.get("ranges").and_then(Value::as_array) {
        for set in ranges {
            let set = set
                .as_array()
                .ok_or_else(|| CniError::invalid_config("ipam ranges must be a list of lists"))?;
            for r in set {
                out.push(one(r)?);
            }
        }
    }
    Ok(out)
}

async fn resolve_network(ctl: &Control, conf: &NetConf) -> Result<HostView, CniError> {
    let net = match network_from_conf(conf)? {
        Some(net) => ctl.ensure_network(net).await.map_err(ctl_err)?,
        None => ctl.network(&conf.name).await.map_err(ctl_err)?.map(|(n, _)| n).ok_or_else(|| {
            CniError::invalid_config(format!(
                "network {} has no subnets in its config and does not exist in the store (create it with `ferrynet network create`)",
                conf.name
            ))
        })?,
    };
    // A multi-host network is seen through this host's blocks: derived here, once per call.
    ctl.host_view(&net).await.map_err(ctl_err)
}

/// Static addresses and MAC: from the `ips`/`mac` capabilities or `CNI_ARGS` `IP=`/`MAC=`.
fn static_requests(
    env: &CniEnv,
    conf: &NetConf,
) -> Result<(Vec<IpAddr>, Option<[u8; 6]>), CniError> {
    let mut ips = Vec::new();
    let mut from_args = Vec::new();
    let mut mac_s = conf.runtime_config.mac.clone();
    for (k, v) in &env.args {
        match k.as_str() {
            "IP" => from_args.extend(v.split(',').map(str::to_string)),
            "MAC" => mac_s = Some(v.clone()),
            _ => {}
        }
    }
    for s in conf.runtime_config.ips.iter().chain(from_args.iter()) {
        let s = s.trim();
        let ip = s
            .split('/')
            .next()
            .and_then(|a| a.parse::<IpAddr>().ok())
            .ok_or_else(|| {
                CniError::invalid_config(format!("requested address {s:?} is not an IP address"))
            })?;
        ips.push(ip);
    }
    let mac = match mac_s {
        Some(m) => {
            Some(parse_mac(&m).map_err(|e| CniError::invalid_config(format!("mac {m:?}: {e}")))?)
        }
        None => None,
    };
    Ok((ips, mac))
}

/// The CNI result for an endpoint, merged after a previous plugin's result if there is one.
pub fn build_result(
    net: &Network,
    ep: &Endpoint,
    prev: Option<CniResult>,
    version: &str,
) -> Result<CniResult, CniError> {
    let mut res = prev.unwrap_or_else(|| CniResult {
        cni_version: version.to_string(),
        ..Default::default()
    });
    res.cni_version = version.to_string();
    if net.mode == NetworkMode::Host {
        // Honest: host networking creates no interface and assigns no address.
        return Ok(res);
    }
    let subnets = validate_network_subnets(&net.subnets)
        .map_err(|e| CniError::invalid_config(e.to_string()))?;
    if let Some(hv) = &ep.host_veth {
        res.interfaces.push(Interface {
            name: hv.clone(),
            mac: ep.host_mac.clone(),
            ..Default::default()
        });
    }
    let idx = res.interfaces.len();
    res.interfaces.push(Interface {
        name: ep.ifname.clone(),
        mac: ep.mac.clone(),
        mtu: net.mtu,
        sandbox: ep.netns.clone(),
        ..Default::default()
    });
    // A routed container holds host prefixes and uses the link-local gateways.
    for ip in &container_addresses(net, &ep.ips) {
        res.ips.push(IpConfig {
            address: *ip,
            gateway: container_gateway(net, &subnets, ip.addr()),
            interface: Some(idx),
        });
    }
    for r in container_routes(net, &subnets, &ep.ips) {
        res.routes.push(Route::new(r.dst, r.gateway));
    }
    Ok(res)
}

fn need<'a>(v: &'a Option<String>, name: &str) -> Result<&'a str, CniError> {
    v.as_deref()
        .ok_or_else(|| CniError::invalid_env(format!("{name} is required")))
}

async fn add(ctl: &Control, env: &CniEnv, conf: &NetConf) -> Result<Value, CniError> {
    // Refused before anything is reserved or created: unknown CNI_ARGS keys without
    // IgnoreUnknown (code 4), pod identity that is not DNS labels (code 7).
    check_args(&env.args, &KNOWN_ARGS)?;
    let pod =
        pod_args(&env.args).map_err(|e| CniError::invalid_config(format!("CNI_ARGS: {e}")))?;
    // A pod's hostPort is runtime input: one the host needs (DNS on the gateways, the VXLAN
    // port, SSH, etcd) would divert the host's own traffic to it. Refused before anything.
    let reserved = host_ports(ctl.store_url(), VXLAN_PORT);
    check_host_ports(&conf.runtime_config.port_mappings, &reserved)
        .map_err(|e| CniError::plugin(crate::error::codes::PORT_IN_USE, e.to_string()))?;
    let view = resolve_network(ctl, conf).await?;
    let net = &view.net;
    // Zero ports and unusable bandwidth limits (code 7), with the interface's MTU.
    conf.runtime_config
        .validate(net.mtu.unwrap_or(DEFAULT_MTU))?;
    let netns = need(&env.netns, "CNI_NETNS")?;
    if net.mode.gives_interfaces() && !std::path::Path::new(netns).exists() {
        return Err(CniError::invalid_env(format!(
            "CNI_NETNS {netns} does not exist"
        )));
    }
    let (static_ips, mac) = static_requests(env, conf)?;
    let prev = match &conf.prev_result {
        Some(v) => Some(CniResult::from_prev_result(v, &conf.cni_version)?),
        None => None,
    };
    let (ep, view) = ctl
        .attach(
            &view,
            AttachRequest {
                container_id: need(&env.container_id, "CNI_CONTAINERID")?.to_string(),
                ifname: need(&env.ifname, "CNI_IFNAME")?.to_string(),
                netns: netns.to_string(),
                static_ips,
                mac,
                port_mappings: conf.runtime_config.port_mappings.clone(),
                name: dns_name(conf, &pod)?,
                aliases: dns_aliases(conf)?,
                owner: EndpointOwner::Cni,
                pod: pod.pod.clone(),
                labels: conf_labels(conf, &pod)?,
                bandwidth: conf.runtime_config.bandwidth,
            },
        )
        .await
        .map_err(ctl_err)?;
    ctl.sync_policy_without_agent().await;
    // The view the attach returned holds the endpoint (with any block it claimed).
    let net = &view.net;
    let mut res = build_result(net, &ep, prev, &conf.cni_version)?;
    if let Some(dns) = &conf.dns {
        res.dns = dns.clone();
    } else if let Some(d) = crate::control::host::LocalConfig::load(&ctl.paths().state_dir)
        .map_err(ctl_err)?
        .dns
    {
        // This host's agent answers DNS on the network's gateways (a routed network's are
        // on its anchor: the container reaches them through its link-local gateway).
        let subnets = validate_network_subnets(&net.subnets)
            .map_err(|e| CniError::invalid_config(e.to_string()))?;
        let gateways = ep.ips.iter().filter_map(|ip| {
            // A borrowed address (outside this host's blocks) asks a gateway of its family.
            crate::control::endpoint::gateway_for(&subnets, ip.addr()).or_else(|| {
                subnets
                    .iter()
                    .find(|s| s.gateway.is_ipv6() == ip.addr().is_ipv6())
                    .map(|s| s.gateway)
            })
        });
        res.dns = agent_dns(gateways, &net.name, &d.domain);
    }
    Ok(res.to_json_for_version(&conf.cni_version))
}

/// The `dns` of a result when the agent serves DNS: the container's gateways as nameservers,
/// its network's domain to search.
fn agent_dns(gateways: impl Iterator<Item = IpAddr>, network: &str, domain: &str) -> Dns {
    let mut nameservers: Vec<String> = Vec::new();
    for g in gateways {
        let g = g.to_string();
        if !nameservers.contains(&g) {
            nameservers.push(g);
        }
    }
    if nameservers.is_empty() {
        return Dns::default();
    }
    Dns {
        nameservers,
        domain: None,
        search: vec![format!("{}.{domain}", network.to_ascii_lowercase())],
        options: vec!["ndots:1".into()],
    }
}

/// The container's DNS name: `args.ferrynet.name` in the configuration (DNS labels, else code
/// 7), else the `K8S_POD_NAME` of a runtime that passes no namespace. A pod with a namespace
/// is named `POD.NAMESPACE` through its pod identity instead: a bare pod name would mix the
/// namespaces' pods.
fn dns_name(conf: &NetConf, pod: &PodArgs) -> Result<Option<String>, CniError> {
    let from_conf = conf
        .args
        .as_ref()
        .and_then(|a| a.get("ferrynet")?.get("name")?.as_str())
        .filter(|n| !n.is_empty());
    if let Some(n) = from_conf {
        check_dns_name("args.ferrynet.name", n)
            .map_err(|e| CniError::invalid_config(e.to_string()))?;
        return Ok(Some(n.to_string()));
    }
    Ok(pod.bare_name.clone())
}

/// Labels for network policy: the CNI `args` convention's `args.cni.labels` (a list of
/// `{"key": …, "value": …}`) and `args.labels` (the same list, or an object of strings), with
/// the pod's namespace (`K8S_POD_NAMESPACE`) as `namespace`, which the configuration cannot
/// override. Bad keys or values are code 7.
fn conf_labels(conf: &NetConf, pod: &PodArgs) -> Result<BTreeMap<String, String>, CniError> {
    let bad = |why: String| CniError::invalid_config(format!("args labels: {why}"));
    let mut out = BTreeMap::new();
    let args = conf.args.as_ref();
    for list in [
        args.and_then(|a| a.get("cni")?.get("labels")),
        args.and_then(|a| a.get("labels")),
    ]
    .into_iter()
    .flatten()
    {
        match list {
            Value::Array(items) => {
                for it in items {
                    let k = it.get("key").and_then(Value::as_str);
                    let v = it.get("value").and_then(Value::as_str);
                    let (Some(k), Some(v)) = (k, v) else {
                        return Err(bad(format!("{it} is not {{\"key\": …, \"value\": …}}")));
                    };
                    out.insert(k.to_string(), v.to_string());
                }
            }
            Value::Object(m) => {
                for (k, v) in m {
                    let v = v
                        .as_str()
                        .ok_or_else(|| bad(format!("{k}: {v} is not a string")))?;
                    out.insert(k.clone(), v.to_string());
                }
            }
            other => return Err(bad(format!("{other} is neither a list nor an object"))),
        }
    }
    out.extend(pod.labels.clone());
    ferrynet_model::pod::check_labels(&out, pod.pod.as_ref()).map_err(|e| bad(e.to_string()))?;
    Ok(out)
}

/// Further DNS names: `args.ferrynet.aliases` (a list of strings, each DNS labels; else code 7).
fn dns_aliases(conf: &NetConf) -> Result<Vec<String>, CniError> {
    let aliases: Vec<String> = conf
        .args
        .as_ref()
        .and_then(|a| a.get("ferrynet")?.get("aliases")?.as_array().cloned())
        .unwrap_or_default()
        .iter()
        .filter_map(|v| v.as_str().map(str::to_string))
        .collect();
    for a in &aliases {
        check_dns_name("args.ferrynet.aliases", a)
            .map_err(|e| CniError::invalid_config(e.to_string()))?;
    }
    Ok(aliases)
}

async fn del(ctl: &Control, env: &CniEnv, conf: &NetConf) -> Result<(), CniError> {
    let cid = need(&env.container_id, "CNI_CONTAINERID")?;
    let ifname = need(&env.ifname, "CNI_IFNAME")?;
    // DEL must succeed for networks that were never set up: use the config's definition, or
    // the stored one, and if neither exists there is nothing to remove.
    // A config whose network keys are invalid never set anything up under them; the runtime
    // still calls DEL to clean up a failed ADD (containerd keeps the sandbox, "unknown", until
    // DEL succeeds), so it falls back to the stored network of that name, else nothing to do.
    let from_conf = network_from_conf(conf).unwrap_or_else(|e| {
        tracing::warn!(network = %conf.name, error = %e.msg, "DEL with an invalid network configuration");
        None
    });
    let net = match from_conf {
        Some(n) => match ctl.network(&n.name).await.map_err(ctl_err)? {
            Some((stored, _)) => stored,
            None => n,
        },
        None => match ctl.network(&conf.name).await.map_err(ctl_err)? {
            Some((n, _)) => n,
            None => return Ok(()),
        },
    };
    ctl.detach(
        &net,
        cid,
        ifname,
        env.netns.as_deref().filter(|s| !s.is_empty()),
    )
    .await
    .map_err(ctl_err)?;
    ctl.sync_policy_without_agent().await;
    // The last container of a network that only its config defines: no bridge stays behind
    // to shadow a later network on the same subnet. DEL itself has succeeded either way.
    if let Err(e) = ctl.retire_cni_network(&net).await {
        tracing::warn!(network = %net.name, error = %e, "could not remove the network after its last DEL");
    }
    Ok(())
}

async fn check(ctl: &Control, env: &CniEnv, conf: &NetConf) -> Result<(), CniError> {
    let view = resolve_network(ctl, conf).await?;
    let ep = ctl
        .check(
            &view.net,
            need(&env.container_id, "CNI_CONTAINERID")?,
            need(&env.ifname, "CNI_IFNAME")?,
            need(&env.netns, "CNI_NETNS")?,
        )
        .await
        .map_err(ctl_err)?;
    if let Some(prev) = &conf.prev_result {
        let prev = CniResult::from_prev_result(prev, &conf.cni_version)?;
        for ip in &ep.ips {
            if !prev.ips.iter().any(|p| p.address == *ip) {
                return Err(CniError::plugin(
                    crate::error::codes::CHECK_FAILED,
                    format!("address {ip} of {} is missing from prevResult", ep.ifname),
                ));
            }
        }
    }
    Ok(())
}

async fn gc(ctl: &Control, conf: &NetConf) -> Result<(), CniError> {
    let Some((net, _)) = ctl.network(&conf.name).await.map_err(ctl_err)? else {
        return Ok(());
    };
    let valid: Vec<(String, String)> = conf
        .valid_attachments
        .iter()
        .map(|a| (a.container_id.clone(), a.ifname.clone()))
        .collect();
    let (removed, errors) = ctl.gc(&net, &valid).await.map_err(ctl_err)?;
    tracing::info!(network = %net.name, removed, "gc done");
    if !errors.is_empty() {
        return Err(CniError::io(format!(
            "gc removed {removed} attachment(s) but failed on: {}",
            errors.join("; ")
        )));
    }
    Ok(())
}

async fn status(ctl: &Control) -> Result<(), CniError> {
    ctl.store_revision()
        .await
        .map_err(|e| CniError::not_available(format!("the ferrynet store is not usable: {e}")))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn conf(extra: Value) -> NetConf {
        let mut v = serde_json::json!({"cniVersion": "1.1.0", "name": "blue", "type": "ferrynet"});
        if let (Some(o), Some(e)) = (v.as_object_mut(), extra.as_object()) {
            for (k, val) in e {
                o.insert(k.clone(), val.clone());
            }
        }
        NetConf::parse(v.to_string().as_bytes()).unwrap()
    }

    #[test]
    fn a_routed_config_gives_host_prefixes_and_the_link_local_gateways() {
        let c = conf(
            serde_json::json!({"mode": "routed", "subnets": [{"cidr": "10.7.0.0/24"}, {"cidr": "fd07::/64"}]}),
        );
        let net = network_from_conf(&c).unwrap().unwrap();
        assert_eq!(net.mode, NetworkMode::Routed);
        let mut ep = Endpoint::new("blue", "c1", "eth0");
        ep.ips = vec![
            "10.7.0.5/24".parse().unwrap(),
            "fd07::5/64".parse().unwrap(),
        ];
        ep.host_veth = Some("fnv0123456789ab".into());
        let res = build_result(&net, &ep, None, "1.1.0").unwrap();
        let ips: Vec<(String, Option<String>)> = res
            .ips
            .iter()
            .map(|i| (i.address.to_string(), i.gateway.map(|g| g.to_string())))
            .collect();
        assert_eq!(
            ips,
            vec![
                ("10.7.0.5/32".to_string(), Some("169.254.1.1".to_string())),
                ("fd07::5/128".to_string(), Some("fe80::1".to_string())),
            ]
        );
        assert_eq!(res.interfaces[0].name, "fnv0123456789ab");
        let bad =
            conf(serde_json::json!({"mode": "bridged", "subnets": [{"cidr": "10.7.0.0/24"}]}));
        assert_eq!(network_from_conf(&bad).unwrap_err().code, 7);
    }

    #[test]
    fn hostile_names_at_the_write_edge_get_spec_codes() {
        for bridge in ["fn-x\"; flush ruleset; \"", "fn-a%d", "fn-Blue", "docker0"] {
            let c =
                conf(serde_json::json!({"subnets": [{"cidr": "10.7.0.0/24"}], "bridge": bridge}));
            assert_eq!(network_from_conf(&c).unwrap_err().code, 7, "{bridge:?}");
        }
        let c =
            conf(serde_json::json!({"args": {"ferrynet": {"name": "web}", "aliases": ["ok"]}}}));
        let vars = |args: &'static str| {
            move |k: &str| match k {
                "CNI_COMMAND" => Some("ADD".to_string()),
                "CNI_CONTAINERID" => Some("c1".to_string()),
                "CNI_NETNS" => Some("/run/netns/x".to_string()),
                "CNI_IFNAME" => Some("eth0".to_string()),
                "CNI_ARGS" => Some(args.to_string()),
                _ => None,
            }
        };
        let env = CniEnv::from_vars(vars("K8S_POD_NAME=web-0")).unwrap();
        let args = pod_args(&env.args).unwrap();
        assert_eq!(dns_name(&c, &args).unwrap_err().code, 7);
        let plain = conf(serde_json::json!({}));
        assert_eq!(dns_name(&plain, &args).unwrap().as_deref(), Some("web-0"));
        // With a namespace the pod is named through its identity, not by a bare name.
        let env = CniEnv::from_vars(vars("K8S_POD_NAMESPACE=a;K8S_POD_NAME=web-0")).unwrap();
        assert_eq!(
            dns_name(&plain, &pod_args(&env.args).unwrap()).unwrap(),
            None
        );
        let env = CniEnv::from_vars(vars("K8S_POD_NAME=a b")).unwrap();
        assert!(pod_args(&env.args).is_err());
        let c = conf(serde_json::json!({"args": {"ferrynet": {"aliases": ["a b"]}}}));
        assert_eq!(dns_aliases(&c).unwrap_err().code, 7);
    }

    #[test]
    fn network_from_subnets_key() {
        let n = network_from_conf(&conf(serde_json::json!({"subnets": [{"cidr": "10.7.0.0/24"}, {"cidr": "fd07::/64"}], "mtu": 1400})))
            .unwrap()
            .unwrap();
        assert_eq!(n.subnets.len(), 2);
        assert_eq!(n.mtu, Some(1400));
        assert_eq!(n.bridge, "fn-blue");
        assert!(n.ip_masq);
    }

    #[test]
    fn network_from_host_local_ranges() {
        let n = network_from_conf(&conf(serde_json::json!({"ipam": {"type": "host-local", "ranges": [[{"subnet": "10.8.0.0/24", "rangeStart": "10.8.0.10"}]]}})))
            .unwrap()
            .unwrap();
        assert_eq!(n.subnets[0].range_start, Some("10.8.0.10".parse().unwrap()));
    }

    #[test]
    fn name_only_config_defers_to_store() {
        assert!(network_from_conf(&conf(serde_json::json!({})))
            .unwrap()
            .is_none());
    }

    #[test]
    fn bad_keys_are_config_errors() {
        assert_eq!(
            network_from_conf(&conf(serde_json::json!({"mode": "weird"})))
                .unwrap_err()
                .code,
            7
        );
        assert_eq!(
            network_from_conf(&conf(serde_json::json!({"subnets": "x"})))
                .unwrap_err()
                .code,
            7
        );
        assert_eq!(
            network_from_conf(&conf(serde_json::json!({"ipam": {"type": "dhcp"}})))
                .unwrap_err()
                .code,
            2
        );
        assert_eq!(
            network_from_conf(&conf(
                serde_json::json!({"subnets": [{"cidr": "10.0.0.0/24"}], "ipMasq": "yes"})
            ))
            .unwrap_err()
            .code,
            7
        );
    }

    #[test]
    fn internal_defaults_to_no_masquerade() {
        let n = network_from_conf(&conf(
            serde_json::json!({"subnets": [{"cidr": "10.9.0.0/24"}], "internal": true}),
        ))
        .unwrap()
        .unwrap();
        assert!(n.internal && !n.ip_masq);
    }

    #[test]
    fn labels_come_from_args_and_the_pod_namespace() {
        let args = |a: Value| conf(serde_json::json!({ "args": a }));
        let pod = pod_args(&[
            ("K8S_POD_NAMESPACE".into(), "shop".into()),
            ("K8S_POD_NAME".into(), "web-0".into()),
        ])
        .unwrap();
        let c = args(serde_json::json!({"cni": {"labels": [{"key": "app", "value": "web"}]}}));
        let l = conf_labels(&c, &pod).unwrap();
        assert_eq!(l.get("app").map(String::as_str), Some("web"));
        assert_eq!(l.get("namespace").map(String::as_str), Some("shop"));
        // The configuration cannot move a pod to another namespace's policies.
        let c = args(serde_json::json!({"labels": {"namespace": "kube-system", "tier": "x"}}));
        let l = conf_labels(&c, &pod).unwrap();
        assert_eq!(l.get("namespace").map(String::as_str), Some("shop"));
        assert_eq!(l.get("tier").map(String::as_str), Some("x"));
        for bad in [
            serde_json::json!({"labels": {"app": "a b"}}),
            serde_json::json!({"labels": [{"key": "app"}]}),
            serde_json::json!({"labels": "app=web"}),
            serde_json::json!({"cni": {"labels": [{"key": "x\"; flush", "value": "v"}]}}),
        ] {
            let e = conf_labels(&args(bad.clone()), &PodArgs::default()).unwrap_err();
            assert_eq!(e.code, 7, "{bad}");
        }
    }
}
