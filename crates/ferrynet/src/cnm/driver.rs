//! `NetworkDriver.*`: Docker networks as ferrynet networks, Docker endpoints as ferrynet
//! endpoints whose veth pair Docker moves into the container itself.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use ferrynet_model::fabric::Backend;
use ferrynet_model::ipam::validate_network_subnets;
use ferrynet_model::names::{format_mac, host_veth_name, parse_mac, temp_peer_name};
use ferrynet_model::network::{Endpoint, EndpointOwner, Network, NetworkMode, Subnet};
use ipnet::IpNet;
use serde_json::{json, Value};

use super::error::{CnmError, Result};
use super::options::{
    bindings_of, derived_name, endpoint_mac, families, network_options, parse_addr, parse_pool,
    port_bindings, resolve_bindings, subnet_for_pool, NetworkOptions,
};
use super::protocol::*;
use super::records::{DockerNetwork, PoolRecord, DOCKER_IFNAME, IPAM_OWNER};
use super::Plugin;
use crate::control::cnm_endpoint::HostPair;
use crate::control::ipam::HeldPort;
use crate::control::Control;
use crate::error::ControlError;

/// A Docker endpoint's port being built in the background (see `Plugin::ports`): the pair and
/// this host's view of the network it was built on.
pub(crate) type PortTask =
    tokio::task::JoinHandle<std::result::Result<(HostPair, Network), ControlError>>;

/// Everything `Join` needs before it answers: this host's view of `net` (a multi-host
/// network's bridge carries this host's block gateways), the port built on it, and the store
/// synced, so the records RequestAddress and CreateEndpoint wrote with deferred durability are
/// durable before a container can run on them.
async fn ready_port(
    ctl: &Control,
    net: &Network,
    ep: &Endpoint,
) -> std::result::Result<(HostPair, Network), ControlError> {
    let view = match net.fabric {
        Some(_) => ctl.host_view(net).await?.net,
        None => net.clone(),
    };
    // The sync waits on the disk in the blocking pool while the port is built.
    let (pair, ()) = tokio::try_join!(build_port(ctl, &view, ep), ctl.sync_store())?;
    Ok((pair, view))
}

/// Build a Docker endpoint's port: the veth pair on the bridge of `net` (this host's view of
/// it: a multi-host network's bridge carries this host's block gateways) and its anti-spoofing
/// elements. A pair whose guard fails is removed again.
async fn build_port(
    ctl: &Control,
    net: &Network,
    ep: &Endpoint,
) -> std::result::Result<HostPair, ControlError> {
    let host_name = ep
        .host_veth
        .clone()
        .unwrap_or_else(|| host_veth_name(&net.name, &ep.container_id, DOCKER_IFNAME));
    let peer_name = temp_peer_name(&net.name, &ep.container_id, DOCKER_IFNAME);
    let mac = match &ep.mac {
        Some(m) => Some(parse_mac(m).map_err(|e| ControlError::InvalidConfig(e.to_string()))?),
        None => None,
    };
    let pair = ctl
        .create_host_pair(net, &host_name, &peer_name, mac, &ep.ips)
        .await?;
    // The container's MAC is the one CreateEndpoint recorded (the peer is born with it).
    let mut guarded = ep.clone();
    guarded.host_veth = Some(host_name.clone());
    guarded.mac = Some(format_mac(&pair.peer_mac));
    if let Err(e) = ctl.guard_endpoint(&guarded, net.mode).await {
        let _ = ctl.delete_host_link(&host_name).await;
        return Err(e);
    }
    Ok(pair)
}

/// Prefix Docker gives the interface in the container (it appends a number: `eth0`).
pub const DST_PREFIX: &str = "eth";

/// One pool of a `CreateNetwork` request, parsed.
struct PoolData {
    pool: IpNet,
    gateway: Option<IpAddr>,
    aux: Vec<IpAddr>,
}

fn parse_pools(data: &[IpamData], v6: bool) -> Result<Vec<PoolData>> {
    data.iter()
        .map(|d| {
            let pool = parse_pool("pool", &d.pool)?;
            if pool.addr().is_ipv6() != v6 || pool.prefix_len() == 0 {
                return Err(CnmError::Invalid(format!(
                    "pool {pool} is not a usable IPv{} subnet (is an IPAM driver with real pools in use?)",
                    if v6 { 6 } else { 4 }
                )));
            }
            let gateway = match d.gateway.trim() {
                "" => None,
                g => Some(parse_addr("gateway", g)?),
            };
            let aux = d
                .aux_addresses
                .values()
                .map(|a| parse_addr("auxiliary address", a))
                .collect::<Result<Vec<_>>>()?;
            Ok(PoolData { pool, gateway, aux })
        })
        .collect()
}

fn need(what: &str, v: &str) -> Result<()> {
    if v.trim().is_empty() {
        return Err(CnmError::Invalid(format!("the request has no {what}")));
    }
    Ok(())
}

impl Plugin {
    /// `NetworkDriver.GetCapabilities`: local, or global on a shared store (see [`super::scope`]).
    pub async fn capabilities(&self) -> CapabilitiesResponse {
        let s = self.scope().await.as_str();
        CapabilitiesResponse {
            scope: s.into(),
            connectivity_scope: s.into(),
        }
    }

    /// The binding of a Docker network id, from the cache or the store.
    pub(crate) async fn binding(&self, docker_id: &str) -> Result<Option<DockerNetwork>> {
        if let Some(b) = self.cached_binding(docker_id) {
            return Ok(Some(b));
        }
        let b = self.ctl.docker_binding(docker_id).await?;
        if let Some(b) = &b {
            if let Ok(mut cache) = self.bindings.lock() {
                cache.insert(docker_id.to_string(), b.clone());
            }
        }
        Ok(b)
    }

    fn cached_binding(&self, docker_id: &str) -> Option<DockerNetwork> {
        self.bindings.lock().ok()?.get(docker_id).cloned()
    }

    fn forget_binding(&self, docker_id: &str) {
        if let Ok(mut cache) = self.bindings.lock() {
            cache.remove(docker_id);
        }
    }

    /// The ferrynet network behind a Docker network id.
    async fn bound(&self, docker_id: &str) -> Result<(DockerNetwork, Network)> {
        need("NetworkID", docker_id)?;
        let b = self.binding(docker_id).await?.ok_or_else(|| {
            CnmError::NotFound(format!(
                "Docker network {docker_id} is not a ferrynet network"
            ))
        })?;
        let (net, _) = self.ctl.network(&b.name).await?.ok_or_else(|| {
            CnmError::NotFound(format!(
                "ferrynet network {} of Docker network {docker_id} no longer exists",
                b.name
            ))
        })?;
        Ok((b, net))
    }

    /// `NetworkDriver.CreateNetwork`: create (or adopt) the ferrynet network and bind it to
    /// Docker's id. Repeating it for a bound id succeeds.
    pub async fn create_network(&self, req: CreateNetworkRequest) -> Result<Empty> {
        need("NetworkID", &req.network_id)?;
        let opts = network_options(&req.options)?;
        let mut pools = parse_pools(&req.ipv4_data, false)?;
        pools.extend(parse_pools(&req.ipv6_data, true)?);
        if pools.is_empty() {
            return Err(CnmError::Invalid(
                "Docker passed no address pool; create the network with --subnet or an IPAM driver"
                    .into(),
            ));
        }
        let _g = self.lock.lock().await;
        let ctl = &self.ctl;
        if let Some(b) = self.binding(&req.network_id).await? {
            tracing::info!(docker = %req.network_id, network = %b.name, "CreateNetwork repeated");
            return Ok(Empty {});
        }
        // Pools from ferrynet's IPAM carry their sub-range and, when adopted, their network.
        let mut records = Vec::new();
        for p in &pools {
            records.push(ctl.docker_pool(&p.pool.to_string()).await?);
        }
        let name = network_name(&records, &opts, &req.network_id)?;
        if let Some(other) = ctl
            .docker_bindings()
            .await?
            .into_iter()
            .find(|d| d.name == name)
        {
            return Err(CnmError::Invalid(format!(
                "ferrynet network {name} is already Docker network {}",
                other.docker_id
            )));
        }
        // A global-scope network spans the engines sharing the cluster store, so it is a
        // multi-host ferrynet network (each host hands out addresses from its own blocks).
        let spans_hosts = self.scope().await == super::scope::Scope::Global;
        let fabric = opts.fabric(spans_hosts.then_some(Backend::Auto))?;
        let adopt = match ctl.network(&name).await? {
            Some((existing, _)) => {
                check_adoptable(&existing, &pools, &opts)?;
                true
            }
            None => {
                let net = new_network(&name, &opts, &pools, &records, fabric)?;
                ctl.create_network(net).await?;
                false
            }
        };
        let binding = DockerNetwork {
            docker_id: req.network_id.clone(),
            name: name.clone(),
            adopted: adopt,
            ipv6: opts.ipv6,
        };
        let pool_records: Vec<(PoolRecord, u64)> = records.iter().flatten().cloned().collect();
        let res = ctl.bind_docker_network(&binding, &pool_records).await;
        if !matches!(res, Ok(true)) {
            if !adopt {
                if let Err(e) = ctl.delete_network(&name, true).await {
                    tracing::warn!(error = %e, network = %name, "cleanup: removing the network failed");
                }
            }
            res?;
            return Err(CnmError::Invalid(format!(
                "Docker network {} or its pools changed meanwhile; try again",
                req.network_id
            )));
        }
        tracing::info!(docker = %req.network_id, network = %name, adopted = adopt, "Docker network bound");
        Ok(Empty {})
    }

    /// `NetworkDriver.DeleteNetwork`: remove the ferrynet network (unless it was adopted or
    /// containers outside Docker still use it) and the binding. Unknown ids succeed.
    pub async fn delete_network(&self, req: NetworkRequest) -> Result<Empty> {
        need("NetworkID", &req.network_id)?;
        let _g = self.lock.lock().await;
        let ctl = &self.ctl;
        // Forgotten first: whatever happens below, the next call reads the store.
        self.forget_binding(&req.network_id);
        let Some(b) = ctl.docker_binding(&req.network_id).await? else {
            return Ok(Empty {});
        };
        if !b.adopted && ctl.network(&b.name).await?.is_some() {
            let others: Vec<String> = ctl
                .endpoints(&b.name)
                .await?
                .into_iter()
                .filter(|e| e.ifname != DOCKER_IFNAME)
                .map(|e| e.container_id)
                .collect();
            if others.is_empty() {
                ctl.delete_network(&b.name, true).await?;
            } else {
                tracing::warn!(
                    network = %b.name,
                    containers = %others.join(","),
                    "Docker network removed; the ferrynet network stays for its other containers"
                );
            }
        }
        ctl.unbind_docker_network(&req.network_id).await?;
        // Again: a call that read the binding meanwhile may have cached it.
        self.forget_binding(&req.network_id);
        tracing::info!(docker = %req.network_id, network = %b.name, "Docker network unbound");
        Ok(Empty {})
    }

    /// `NetworkDriver.AllocateNetwork`: only swarm managers call it, for global-scope drivers;
    /// a local network needs nothing allocated cluster-wide.
    pub fn allocate_network(&self, req: AllocateNetworkRequest) -> Result<AllocateNetworkResponse> {
        need("NetworkID", &req.network_id)?;
        Ok(AllocateNetworkResponse::default())
    }

    /// `NetworkDriver.FreeNetwork`: nothing was allocated.
    pub fn free_network(&self, req: NetworkRequest) -> Result<Empty> {
        need("NetworkID", &req.network_id)?;
        Ok(Empty {})
    }

    /// The recorded endpoint of a Docker endpoint.
    /// Start building `ep`'s port in the background (see `Plugin::ports`).
    fn start_port(&self, net: &Network, ep: &Endpoint) {
        let Ok(mut ports) = self.ports.lock() else {
            return; // Join then builds the port itself.
        };
        // A repeated CreateEndpoint keeps the task already building (or built) this port: a
        // second one would delete and recreate the same pair under the first.
        if ports.contains_key(&ep.container_id) {
            return;
        }
        let (ctl, net, ep) = (self.ctl.clone(), net.clone(), ep.clone());
        let id = ep.container_id.clone();
        // Docker builds the sandbox meanwhile; Join awaits this task.
        let task = tokio::spawn(async move { ready_port(&ctl, &net, &ep).await });
        ports.insert(id, task);
    }

    /// The background task building endpoint `id`'s port, if one was started.
    fn take_port(&self, id: &str) -> Option<PortTask> {
        self.ports.lock().ok()?.remove(id)
    }

    async fn docker_endpoint(
        &self,
        network_id: &str,
        endpoint_id: &str,
    ) -> Result<(Network, Endpoint)> {
        need("EndpointID", endpoint_id)?;
        let (_, net) = self.bound(network_id).await?;
        let ep = self
            .ctl
            .endpoint(&net.name, endpoint_id, DOCKER_IFNAME)
            .await?
            .ok_or_else(|| {
                CnmError::NotFound(format!(
                    "endpoint {endpoint_id} does not exist on ferrynet network {}",
                    net.name
                ))
            })?;
        Ok((net, ep))
    }

    /// `NetworkDriver.CreateEndpoint`: record the endpoint with the addresses Docker's IPAM gave
    /// (ferrynet's own or another), allocating a family Docker left empty, and a MAC.
    pub async fn create_endpoint(
        &self,
        req: CreateEndpointRequest,
    ) -> Result<CreateEndpointResponse> {
        need("EndpointID", &req.endpoint_id)?;
        let (binding, net) = self.bound(&req.network_id).await?;
        if !net.mode.gives_interfaces() {
            return Err(CnmError::Invalid(format!(
                "ferrynet network {} uses host networking: it has no interfaces to give",
                net.name
            )));
        }
        let iface = req.interface.clone().unwrap_or_default();
        let mut requested = Vec::new();
        if !iface.address.trim().is_empty() {
            requested.push(parse_addr("Address", &iface.address)?);
        }
        if !iface.address_ipv6.trim().is_empty() {
            requested.push(parse_addr("AddressIPv6", &iface.address_ipv6)?);
        }
        let docker_mac = match iface.mac_address.trim() {
            "" => None,
            m => Some(parse_mac(m).map_err(|e| CnmError::Invalid(e.to_string()))?),
        };
        let base = net.clone();
        // On a multi-host network the endpoint lives in this host's view: its blocks, and
        // where the network lets containers borrow (bgp + routed) the blocks of the requested
        // addresses, as ferrynet's IPAM reserved them.
        let net = match net.fabric {
            Some(_) => self.ctl.host_view(&net).await?.borrowing(&requested).net,
            None => net,
        };
        if net.fabric.is_some() {
            if let Some(ip) = requested
                .iter()
                .find(|ip| !net.subnets.iter().any(|s| s.cidr.contains(*ip)))
            {
                return Err(CnmError::Invalid(format!(
                    "address {ip} is not in a block of host {} on multi-host ferrynet network {}: each host hands out the addresses of its own blocks, so use ferrynet's IPAM driver (--ipam-driver) and no --ip from another host's block",
                    self.ctl.host(), net.name
                )));
            }
        }
        let (has4, has6) = families(&net.subnets);
        let allocate = (
            has4 && iface.address.trim().is_empty(),
            has6 && binding.ipv6 && iface.address_ipv6.trim().is_empty(),
        );
        let v4 = requested.iter().copied().find(IpAddr::is_ipv4);
        let mac = docker_mac.unwrap_or_else(|| endpoint_mac(v4, &req.endpoint_id));
        let template = Endpoint {
            mac: Some(format_mac(&mac)),
            host_veth: Some(host_veth_name(&net.name, &req.endpoint_id, DOCKER_IFNAME)),
            host: net.fabric.is_some().then(|| self.ctl.host().to_string()),
            owner: EndpointOwner::Docker,
            ..Endpoint::new(&net.name, &req.endpoint_id, DOCKER_IFNAME)
        };
        // Every requested address just reserved by this driver's IPAM: one transaction, no reads.
        let mut expect_shared = !requested.is_empty();
        for ip in &requested {
            expect_shared &= self.take_reserved(&net.name, *ip);
        }
        let _g = self.lock.lock().await;
        // Synced by the port task below before Join answers: no container runs on a record
        // that could still be lost (see `deferring_durability`).
        let (ep, fresh) = ferrynet_store::deferring_durability(self.ctl.record_endpoint(
            &net,
            template,
            &requested,
            allocate,
            IPAM_OWNER,
            expect_shared,
        ))
        .await?;
        crate::failpoint::hit("cnm-endpoint-recorded");
        if !fresh {
            tracing::info!(endpoint = %req.endpoint_id, "CreateEndpoint repeated");
        }
        self.start_port(&base, &ep);
        let mut out = EndpointInterface::default();
        for ip in &ep.ips {
            if requested.contains(&ip.addr()) {
                continue;
            }
            if ip.addr().is_ipv4() {
                out.address = ip.to_string();
            } else {
                out.address_ipv6 = ip.to_string();
            }
        }
        if docker_mac.is_none() {
            out.mac_address = ep.mac.clone().unwrap_or_default();
        }
        tracing::info!(endpoint = %req.endpoint_id, network = %net.name, ips = ?ep.ips, "Docker endpoint created");
        Ok(CreateEndpointResponse {
            interface: (out != EndpointInterface::default()).then_some(out),
        })
    }

    /// `NetworkDriver.EndpointOperInfo`: addresses, MAC, host link and published ports.
    pub async fn endpoint_info(&self, req: EndpointRequest) -> Result<EndpointInfoResponse> {
        need("NetworkID", &req.network_id)?;
        need("EndpointID", &req.endpoint_id)?;
        // Docker asks twice per container: one read (the endpoint), the network's name from the
        // binding.
        let b = self.binding(&req.network_id).await?.ok_or_else(|| {
            CnmError::NotFound(format!(
                "Docker network {} is not a ferrynet network",
                req.network_id
            ))
        })?;
        let ep = self
            .ctl
            .endpoint(&b.name, &req.endpoint_id, DOCKER_IFNAME)
            .await?
            .ok_or_else(|| {
                CnmError::NotFound(format!(
                    "endpoint {} does not exist on ferrynet network {}",
                    req.endpoint_id, b.name
                ))
            })?;
        let v4 = ep.ips.iter().map(|i| i.addr()).find(IpAddr::is_ipv4);
        let mut value = BTreeMap::new();
        value.insert("ferrynet.network".into(), Value::String(b.name.clone()));
        value.insert(
            "ferrynet.addresses".into(),
            json!(ep.ips.iter().map(|i| i.to_string()).collect::<Vec<_>>()),
        );
        if let Some(m) = &ep.mac {
            value.insert("com.docker.network.endpoint.macaddress".into(), json!(m));
        }
        if let Some(h) = &ep.host_veth {
            value.insert("ferrynet.host_veth".into(), json!(h));
        }
        value.insert(PORTMAP.into(), json!(bindings_of(&ep.port_mappings, v4)));
        Ok(EndpointInfoResponse { value })
    }

    /// `NetworkDriver.DeleteEndpoint`: remove the veth if still there, withdraw ports, release
    /// what the endpoint holds. Unknown endpoints succeed.
    pub async fn delete_endpoint(&self, req: EndpointRequest) -> Result<Empty> {
        need("EndpointID", &req.endpoint_id)?;
        // A port still being built (Docker gave up before Join) is finished first, then removed
        // (`forget_endpoint` takes its guard elements).
        if let Some(task) = self.take_port(&req.endpoint_id) {
            let _ = task.await;
        }
        let Some(b) = self.binding(&req.network_id).await? else {
            return Ok(Empty {});
        };
        let _g = self.lock.lock().await;
        let Some(ep) = self
            .ctl
            .endpoint(&b.name, &req.endpoint_id, DOCKER_IFNAME)
            .await?
        else {
            return Ok(Empty {});
        };
        let host = ep
            .host_veth
            .clone()
            .unwrap_or_else(|| host_veth_name(&b.name, &req.endpoint_id, DOCKER_IFNAME));
        self.ctl.delete_host_link(&host).await?;
        crate::failpoint::hit("cnm-endpoint-unlinked");
        self.ctl.forget_endpoint(&ep).await?;
        // Its addresses are no neighbour to proxy any more (routed networks).
        self.ctl.resync_proxy_ndp(&b.name).await;
        tracing::info!(endpoint = %req.endpoint_id, network = %b.name, "Docker endpoint deleted");
        Ok(Empty {})
    }

    /// `NetworkDriver.Join`: a veth pair in the host namespace, one end on the bridge, the other
    /// for Docker to move into the container as `eth<N>`, plus the gateways.
    pub async fn join(&self, req: JoinRequest) -> Result<JoinResponse> {
        let (net, ep) = self
            .docker_endpoint(&req.network_id, &req.endpoint_id)
            .await?;
        // Built since CreateEndpoint; built here when that task is gone (a repeated Join, or a
        // plugin restarted in between). The record already names the host end; its
        // kernel-chosen MAC has no reader for Docker endpoints, so the Join writes nothing.
        let built = match self.take_port(&req.endpoint_id) {
            Some(task) => task.await.map_err(|e| {
                tracing::warn!(error = %e, endpoint = %ep.container_id, "the port's task ended early; building it again");
            }).ok(),
            None => None,
        };
        let (pair, net) = match built {
            Some(built) => built?,
            None => {
                let _g = self.lock.lock().await;
                ready_port(&self.ctl, &net, &ep).await?
            }
        };
        crate::failpoint::hit("cnm-joined");
        let mut resp = JoinResponse {
            interface_name: InterfaceName {
                src_name: pair.peer_name.clone(),
                dst_prefix: DST_PREFIX.into(),
            },
            disable_gateway_service: net.internal,
            ..Default::default()
        };
        if net.mode == NetworkMode::Routed {
            // Docker gives the address with its pool's prefix: the host end answers ARP for
            // the neighbours (proxy ARP); the link-local gateway needs an on-link route first.
            for ip in &ep.ips {
                let gw = ferrynet_model::routed::gateway_of(ip.addr());
                if ip.addr().is_ipv4() {
                    resp.gateway = gw.to_string();
                    resp.static_routes.push(StaticRoute {
                        destination: format!("{gw}/32"),
                        route_type: 1, // directly connected
                        next_hop: String::new(),
                    });
                } else {
                    resp.gateway_ipv6 = gw.to_string();
                }
            }
        } else if !net.internal {
            let subnets = validate_network_subnets(&net.subnets)
                .map_err(|e| CnmError::Invalid(e.to_string()))?;
            for ip in &ep.ips {
                let Some(s) = subnets.iter().find(|s| s.cidr.contains(&ip.addr())) else {
                    continue;
                };
                if ip.addr().is_ipv4() {
                    resp.gateway = s.gateway.to_string();
                } else {
                    resp.gateway_ipv6 = s.gateway.to_string();
                }
            }
        }
        if let Some(namer) = &self.namer {
            // Gone only when the server stops; then nobody needs the name.
            let _ = namer.send(super::names::NameJob {
                docker_network: req.network_id.clone(),
                endpoint_id: ep.container_id.clone(),
                network: net.name.clone(),
            });
        }
        tracing::info!(endpoint = %ep.container_id, network = %net.name, veth = %pair.host_name, "Docker endpoint joined");
        Ok(resp)
    }

    /// `NetworkDriver.Leave`: remove the veth pair (Docker has moved our end back or the
    /// container's namespace is gone). Unknown endpoints succeed.
    pub async fn leave(&self, req: EndpointRequest) -> Result<Empty> {
        need("EndpointID", &req.endpoint_id)?;
        let Some(b) = self.binding(&req.network_id).await? else {
            return Ok(Empty {});
        };
        let _g = self.lock.lock().await;
        let ep = self
            .ctl
            .endpoint(&b.name, &req.endpoint_id, DOCKER_IFNAME)
            .await?;
        let host = ep
            .as_ref()
            .and_then(|e| e.host_veth.clone())
            .unwrap_or_else(|| host_veth_name(&b.name, &req.endpoint_id, DOCKER_IFNAME));
        self.ctl.delete_host_link(&host).await?;
        crate::failpoint::hit("cnm-left");
        let peer = temp_peer_name(&b.name, &req.endpoint_id, DOCKER_IFNAME);
        self.ctl.delete_host_link(&peer).await?;
        if let Some(ep) = &ep {
            let mut guarded = ep.clone();
            guarded.host_veth = Some(host.clone());
            self.ctl.unguard_endpoint(&guarded);
        }
        // Records from before Joins stopped writing the host end's MAC.
        if let Some(mut ep) = ep.filter(|e| e.host_mac.is_some()) {
            ep.host_mac = None;
            self.ctl.update_endpoint(&ep).await?;
        }
        tracing::info!(endpoint = %req.endpoint_id, network = %b.name, "Docker endpoint left");
        Ok(Empty {})
    }

    /// `NetworkDriver.ProgramExternalConnectivity`: publish the container's `-p` ports through
    /// ferrynet's nftables maps.
    pub async fn program_external(&self, req: ProgramExternalRequest) -> Result<Empty> {
        let bindings = port_bindings(&req.options)?;
        if bindings.is_empty() {
            // Docker calls this for every container: without `-p` there is nothing to read.
            need("EndpointID", &req.endpoint_id)?;
            return Ok(Empty {});
        }
        let (net, ep) = self
            .docker_endpoint(&req.network_id, &req.endpoint_id)
            .await?;
        if net.internal {
            return Err(CnmError::Invalid(format!(
                "ferrynet network {} is internal: it takes no traffic from outside, so ports cannot be published on it",
                net.name
            )));
        }
        let _g = self.lock.lock().await;
        let ctl = &self.ctl;
        // Ports this endpoint already holds are not a conflict (a repeated call).
        let ep_key =
            ferrynet_model::network::keys::endpoint(&ep.network, &ep.container_id, &ep.ifname);
        // One read of every claimed port serves both the picks and the conflict check.
        let all = ctl.held_ports().await?;
        let held: Vec<_> = all.iter().filter(|h| h.owner != ep_key).cloned().collect();
        let mappings = match resolve_bindings(&bindings, &held, &BTreeMap::new()) {
            Ok(m) => m,
            // A conflict: say which container holds the port (read only on this path).
            Err(_) => resolve_bindings(&bindings, &held, &self.owner_names(&held).await)?,
        };
        let done = ctl.claim_ports(&ep, mappings).await.map_err(|e| match e {
            ControlError::PortsPublished(m) => {
                CnmError::Invalid(format!("{m} (RevokeExternalConnectivity first)"))
            }
            other => other.into(),
        })?;
        crate::failpoint::hit("cnm-published");
        tracing::info!(endpoint = %ep.container_id, ports = ?done.port_mappings, "ports published");
        Ok(Empty {})
    }

    /// The container names of the endpoints holding `held` (endpoint key → name), for
    /// messages; endpoints without a readable name are left out.
    async fn owner_names(&self, held: &[HeldPort]) -> BTreeMap<String, String> {
        let mut names = BTreeMap::new();
        let owners: BTreeSet<&str> = held.iter().map(|h| h.owner.as_str()).collect();
        for owner in owners {
            let Ok(Some(ep)) = self.ctl.endpoint_at(owner).await else {
                continue;
            };
            if let Some(name) = ep.name {
                names.insert(owner.to_string(), name);
            }
        }
        names
    }

    /// `NetworkDriver.RevokeExternalConnectivity`: withdraw the published ports. Unknown
    /// endpoints succeed.
    pub async fn revoke_external(&self, req: EndpointRequest) -> Result<Empty> {
        need("EndpointID", &req.endpoint_id)?;
        let Some(b) = self.binding(&req.network_id).await? else {
            return Ok(Empty {});
        };
        let _g = self.lock.lock().await;
        if let Some(ep) = self
            .ctl
            .endpoint(&b.name, &req.endpoint_id, DOCKER_IFNAME)
            .await?
        {
            self.ctl.withdraw_ports(&ep).await?;
            tracing::info!(endpoint = %req.endpoint_id, "ports withdrawn");
        }
        Ok(Empty {})
    }
}

/// The ferrynet network a Docker network becomes: the one its pools were adopted from, else
/// `-o ferrynet.network`, else a name derived from Docker's id.
fn network_name(
    records: &[Option<(PoolRecord, u64)>],
    opts: &NetworkOptions,
    network_id: &str,
) -> Result<String> {
    let adopted: Vec<String> = records
        .iter()
        .flatten()
        .filter(|(r, _)| r.adopted)
        .filter_map(|(r, _)| r.network.clone())
        .collect();
    match (adopted.first(), &opts.name) {
        (Some(a), Some(n)) if a != n => Err(CnmError::Invalid(format!(
            "the pools belong to ferrynet network {a} but -o ferrynet.network={n}"
        ))),
        (Some(a), _) => {
            if adopted.iter().any(|x| x != a) {
                return Err(CnmError::Invalid(
                    "the pools belong to different ferrynet networks".into(),
                ));
            }
            Ok(a.clone())
        }
        (None, Some(n)) => Ok(n.clone()),
        (None, None) => derived_name(network_id),
    }
}

/// A new ferrynet network for Docker's pools (with the sub-ranges ferrynet's IPAM recorded).
fn new_network(
    name: &str,
    opts: &NetworkOptions,
    pools: &[PoolData],
    records: &[Option<(PoolRecord, u64)>],
    fabric: Option<ferrynet_model::network::FabricSpec>,
) -> Result<Network> {
    let mut subnets: Vec<Subnet> = Vec::new();
    for (p, rec) in pools.iter().zip(records) {
        let sub_pool = rec.as_ref().and_then(|(r, _)| r.sub_pool);
        let gateway = match fabric {
            Some(_) => multi_host_gateway(p)?,
            None => p.gateway,
        };
        subnets.push(subnet_for_pool(p.pool, gateway, sub_pool, &p.aux)?);
    }
    Ok(Network {
        name: name.to_string(),
        mode: opts.mode,
        bridge: opts.bridge.clone().unwrap_or_default(),
        subnets,
        mtu: opts.mtu,
        internal: opts.internal,
        ip_masq: opts.masquerade.unwrap_or(true) && !opts.internal,
        fabric,
        default_deny: false,
    })
}

/// The gateway a multi-host network's subnet keeps for a Docker pool: none of its own, since
/// each host's block is gatewayed by its first address. Docker always names one (its IPAM's
/// answer, the pool's first address, which is also the first block's gateway); another one
/// cannot be honoured and is refused.
fn multi_host_gateway(p: &PoolData) -> Result<Option<IpAddr>> {
    let first = Subnet::new(p.pool);
    let first = ferrynet_model::ipam::validate_subnet(&first)
        .map_err(|e| CnmError::Invalid(e.to_string()))?
        .gateway;
    match p.gateway {
        Some(g) if g != first => Err(CnmError::Invalid(format!(
            "gateway {g}: on a multi-host network each host's block is gatewayed by its first address; leave --gateway out (or use {first})"
        ))),
        _ => Ok(None),
    }
}

/// Whether an existing ferrynet network can serve as a Docker network with these pools and
/// options: every pool is one of its subnets (with the same gateway), and options given agree.
fn check_adoptable(net: &Network, pools: &[PoolData], opts: &NetworkOptions) -> Result<()> {
    let subnets = validate_network_subnets(&net.subnets)
        .map_err(|e| CnmError::Invalid(format!("ferrynet network {}: {e}", net.name)))?;
    let have = || {
        net.subnets
            .iter()
            .map(|s| s.cidr.to_string())
            .collect::<Vec<_>>()
            .join(", ")
    };
    for p in pools {
        let s = subnets.iter().find(|s| s.cidr == p.pool).ok_or_else(|| {
            CnmError::Invalid(format!(
                "ferrynet network {} exists with subnets {}; pool {} is not one of them",
                net.name,
                have(),
                p.pool
            ))
        })?;
        if let Some(g) = p.gateway.filter(|g| *g != s.gateway) {
            return Err(CnmError::Invalid(format!(
                "ferrynet network {} has the gateway {} in {}, not {g}",
                net.name, s.gateway, s.cidr
            )));
        }
    }
    let mismatch = |what: &str, theirs: String, ours: String| {
        CnmError::Invalid(format!(
            "ferrynet network {} exists with {what} {ours}; the Docker network asks for {theirs}",
            net.name
        ))
    };
    if let Some(m) = opts.mtu.filter(|m| Some(*m) != net.mtu) {
        return Err(mismatch("MTU", m.to_string(), format!("{:?}", net.mtu)));
    }
    if opts.internal && !net.internal {
        return Err(mismatch("internal", "true".into(), "false".into()));
    }
    if let Some(b) = opts.bridge.as_ref().filter(|b| **b != net.bridge) {
        return Err(mismatch("bridge", b.clone(), net.bridge.clone()));
    }
    // An encrypted Docker network over a clear ferrynet network would send in clear what the
    // user asked to encrypt.
    if opts.encrypt && !net.fabric.is_some_and(|f| f.encrypt) {
        return Err(mismatch("encrypt", "true".into(), "false".into()));
    }
    if let Some(b) = opts.backend {
        if net.fabric.map(|f| f.backend) != Some(b) {
            return Err(mismatch(
                "fabric",
                b.to_string(),
                net.fabric
                    .map(|f| f.backend.to_string())
                    .unwrap_or_else(|| "none (single host)".into()),
            ));
        }
    }
    Ok(())
}
