//! Attaching containers to networks and detaching them: the ADD/DEL/CHECK/GC flows.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::path::Path;

use ferrynet_dataplane::error::DataplaneError;
use ferrynet_dataplane::kernel::Links;
use ferrynet_dataplane::netlink::RouteSpec;
use ferrynet_dataplane::veth::{ContainerIface, VethSpec};
use ferrynet_model::bandwidth::Bandwidth;
use ferrynet_model::blocks::HostView;
use ferrynet_model::gc::{gc_verdict, legacy_owner, GcVerdict};
use ferrynet_model::ipam::{validate_network_subnets, ResolvedSubnet};
use ferrynet_model::names::{format_mac, host_veth_name};
use ferrynet_model::network::{keys, Endpoint, EndpointOwner, Network, NetworkMode};
use ferrynet_model::pod::PodIdentity;
use ferrynet_model::portmap::PortMapping;
use ferrynet_model::routed;
use ipnet::IpNet;

use super::{decode, shaping, Control};
use crate::error::{ControlError, Result};
use ferrynet_model::validate::Validate;

/// What a runtime asks for when it attaches a container.
#[derive(Debug, Clone)]
pub struct AttachRequest {
    /// The runtime's container id.
    pub container_id: String,
    /// Interface name inside the container.
    pub ifname: String,
    /// Path of the container's network namespace.
    pub netns: String,
    /// Static addresses (empty: allocate).
    pub static_ips: Vec<IpAddr>,
    /// Static MAC address.
    pub mac: Option<[u8; 6]>,
    /// Ports to publish.
    pub port_mappings: Vec<PortMapping>,
    /// The container's DNS name on the network.
    pub name: Option<String>,
    /// Further DNS names.
    pub aliases: Vec<String>,
    /// The runtime asking, recorded so GC releases only its own runtime's endpoints.
    pub owner: EndpointOwner,
    /// The Kubernetes pod (from `CNI_ARGS`).
    pub pod: Option<PodIdentity>,
    /// Labels for policy.
    pub labels: BTreeMap<String, String>,
    /// Bandwidth limits (the `bandwidth` capability).
    pub bandwidth: Option<Bandwidth>,
}

/// The gateway of the subnet holding `ip`.
pub fn gateway_for(subnets: &[ResolvedSubnet], ip: IpAddr) -> Option<IpAddr> {
    subnets
        .iter()
        .find(|s| s.cidr.contains(&ip))
        .map(|s| s.gateway)
}

/// The gateway a container's routes use for `ip`: its subnet's, or on a routed network the
/// link-local gateway of its family.
pub fn container_gateway(net: &Network, subnets: &[ResolvedSubnet], ip: IpAddr) -> Option<IpAddr> {
    if net.mode == NetworkMode::Routed {
        return Some(routed::gateway_of(ip));
    }
    gateway_for(subnets, ip)
}

/// The addresses a container's interface holds: as allocated, or host prefixes on a routed
/// network (no on-link subnet).
pub fn container_addresses(net: &Network, ips: &[IpNet]) -> Vec<IpNet> {
    if net.mode == NetworkMode::Routed {
        return routed::container_addresses(ips);
    }
    ips.to_vec()
}

/// Routes a container gets: a default route per address family via that family's gateway,
/// none on internal networks (the subnet route comes with the address itself); on a routed
/// network on-link to the link-local gateway.
pub fn container_routes(
    net: &Network,
    subnets: &[ResolvedSubnet],
    ips: &[IpNet],
) -> Vec<RouteSpec> {
    if net.mode == NetworkMode::Routed {
        return routed::container_routes(ips)
            .into_iter()
            .map(|r| RouteSpec {
                dst: r.dst,
                gateway: r.gateway,
                onlink: true,
            })
            .collect();
    }
    if net.internal {
        return Vec::new();
    }
    let mut seen = BTreeSet::new();
    ips.iter()
        .filter_map(|ip| {
            let gw = gateway_for(subnets, ip.addr())?;
            let dst: IpNet = if ip.addr().is_ipv4() {
                "0.0.0.0/0".parse().ok()?
            } else {
                "::/0".parse().ok()?
            };
            seen.insert(dst).then_some(RouteSpec {
                dst,
                gateway: Some(gw),
                onlink: false,
            })
        })
        .collect()
}

/// The network's subnets with their gateways, or a configuration error.
fn resolved(net: &Network) -> Result<Vec<ResolvedSubnet>> {
    validate_network_subnets(&net.subnets).map_err(|e| ControlError::InvalidConfig(e.to_string()))
}

/// The endpoint an attach reserves, refused here when no reader would accept it or when the
/// network cannot serve what is asked (limits or ports with host networking, ports on an
/// internal network).
fn endpoint_template(net: &Network, req: &AttachRequest) -> Result<Endpoint> {
    let template = Endpoint {
        netns: Some(req.netns.clone()),
        mac: req.mac.map(|m| format_mac(&m)),
        port_mappings: req.port_mappings.clone(),
        name: req.name.clone(),
        aliases: req.aliases.clone(),
        owner: req.owner,
        pod: req.pod.clone(),
        labels: req.labels.clone(),
        bandwidth: req.bandwidth.filter(|b| !b.is_unlimited()),
        ..Endpoint::new(&net.name, &req.container_id, &req.ifname)
    };
    // Refuse at the write edge what every reader would refuse (ferrynet_model::validate).
    template
        .validate()
        .map_err(|e| ControlError::InvalidConfig(format!("endpoint: {e}")))?;
    if net.mode == NetworkMode::Host {
        if template.bandwidth.is_some() {
            return Err(ControlError::InvalidConfig(format!(
                "network {} uses host networking: there is no interface of the container's own to limit",
                net.name
            )));
        }
        if !req.port_mappings.is_empty() {
            return Err(ControlError::InvalidConfig(format!(
                "network {} uses host networking: the container already listens on host ports, so portMappings cannot apply",
                net.name
            )));
        }
    } else if net.internal && !req.port_mappings.is_empty() {
        return Err(ControlError::InvalidConfig(format!(
            "network {} is internal: it takes no traffic from outside, so ports cannot be published on it",
            net.name
        )));
    }
    Ok(template)
}

impl Control {
    /// Attach a container to the network of `view` (derived once by the caller); safe to retry
    /// with the same container id and ifname. On failure nothing is left: no link, no
    /// allocation, no nft element. Returns the endpoint and the view that holds it (grown when
    /// the reservation claimed a block).
    pub async fn attach(
        &self,
        view: &HostView,
        req: AttachRequest,
    ) -> Result<(Endpoint, HostView)> {
        let net = &view.net;
        let template = endpoint_template(net, &req)?;
        if net.mode == NetworkMode::Host {
            let (ep, _) = self.reserve_host_mode(net, template).await?;
            return Ok((ep, view.clone()));
        }
        // A multi-host network's view may hold no block yet (the reservation claims one), so
        // its subnets are checked after the reservation instead.
        let subnets = if net.fabric.is_some() {
            Vec::new()
        } else {
            resolved(net)?
        };
        let links = self.container_links(&req.netns)?;
        let host = links.as_ref();

        let (ep, fresh, view) = self.reserve(view, template, &req.static_ips).await?;
        crate::failpoint::hit("add-reserved");
        if !fresh && self.resume(host, &view, &req, &ep).await? {
            return Ok((ep, view));
        }

        // The reservation may have claimed a new block: plumb with the view it returned.
        let net = &view.net;
        let subnets = if view.is_multi_host() {
            resolved(net)?
        } else {
            subnets
        };
        match self.plumb(net, &subnets, host, &ep).await {
            Ok(done) => {
                if let Err(e) = self.update_endpoint(&done).await {
                    // Superseded by a concurrent DEL/ADD of the container: the identity this
                    // call allowed on the port is no longer recorded anywhere.
                    self.unguard_endpoint(&done);
                    return Err(e);
                }
                crate::failpoint::hit("add-recorded");
                tracing::info!(container = %done.container_id, network = %net.name, ips = ?done.ips, "attached");
                Ok((done, view))
            }
            Err(e) => {
                self.undo_attach(host, net, &ep, &e).await;
                Err(e)
            }
        }
    }

    /// A retried ADD (the reservation was there): true when the interface is in place with the
    /// same addresses (whatever the interrupted attempt left undone after it is done now);
    /// false when it is missing and the attach goes on with the recorded addresses.
    async fn resume(
        &self,
        host: &dyn Links,
        view: &HostView,
        req: &AttachRequest,
        ep: &Endpoint,
    ) -> Result<bool> {
        let net = &view.net;
        if ep.netns.as_deref() != Some(req.netns.as_str()) {
            return Err(ControlError::IfaceExists(format!(
                "container {} already has {} on network {} in netns {}",
                ep.container_id,
                ep.ifname,
                net.name,
                ep.netns.as_deref().unwrap_or("?")
            )));
        }
        let state = host
            .inspect(&req.ifname)
            .await
            .map_err(ControlError::dataplane(format!(
                "inspecting {} in {}",
                req.ifname, req.netns
            )))?;
        let Some(state) = state else {
            tracing::info!(container = %ep.container_id, "resuming an interrupted ADD with its recorded addresses");
            // The interrupted attempt's port may be guarded for a MAC the new link will not have.
            self.unguard_endpoint(ep);
            return Ok(false);
        };
        if !container_addresses(net, &ep.ips)
            .iter()
            .all(|ip| state.addresses.contains(ip))
        {
            return Err(ControlError::IfaceExists(format!(
                "interface {} already exists in netns {} with other addresses",
                req.ifname, req.netns
            )));
        }
        tracing::info!(container = %ep.container_id, "ADD repeated; endpoint already in place");
        let host_name = host_veth_name(&net.name, &ep.container_id, &ep.ifname);
        let index = host
            .link_index(&host_name)
            .await
            .map_err(ControlError::dataplane(format!("looking up {host_name}")))?;
        if let Some(index) = index {
            if net.mode == NetworkMode::Routed {
                // The interrupted attempt may have stopped before the host routes.
                let subnets = resolved(net)?;
                self.ensure_bridge(host, net).await?;
                self.plumb_routed_port(host, net, &subnets, &host_name, index, &ep.ips)
                    .await?;
            }
            shaping::shape(host, net, ep, index).await?;
        }
        self.guard_endpoint(ep, net.mode).await?;
        self.publish_ports(ep).await?;
        Ok(true)
    }

    /// Undo a failed attach in reverse: ports, link, limits, reservation. Errors here are
    /// logged; the attach's own error is the one returned.
    async fn undo_attach(&self, host: &dyn Links, net: &Network, ep: &Endpoint, e: &ControlError) {
        if let Err(u) = self.unpublish_ports(ep).await {
            tracing::warn!(error = %u, "cleanup: unpublishing ports failed");
        }
        let host_name = host_veth_name(&net.name, &ep.container_id, &ep.ifname);
        if !matches!(e, ControlError::IfaceExists(_)) {
            if let Err(u) = host.detach_veth(&ep.ifname, &host_name).await {
                tracing::warn!(error = %u, "cleanup: removing the veth failed");
            }
        } else {
            // The container's interface of that name is not ours: the host end only.
            let undone = match self.host_links() {
                Ok(h) => h
                    .detach_veth(&ep.ifname, &host_name)
                    .await
                    .map_err(|e| e.to_string()),
                Err(e) => Err(e.to_string()),
            };
            if let Err(u) = undone {
                tracing::warn!(error = %u, "cleanup: removing the host veth failed");
            }
        }
        if let Err(u) = shaping::unshape(host, &net.name, &ep.container_id, &ep.ifname).await {
            tracing::warn!(error = %u, "cleanup: removing the IFB device failed");
        }
        if let Err(u) = self.release_own(ep).await {
            tracing::warn!(error = %u, "cleanup: releasing the reservation failed");
        }
    }

    /// The kernel side of an attach: bridge, veth, addresses, routes, published ports.
    async fn plumb(
        &self,
        net: &Network,
        subnets: &[ResolvedSubnet],
        host: &dyn Links,
        ep: &Endpoint,
    ) -> Result<Endpoint> {
        let device = self.ensure_bridge(host, net).await?;
        crate::failpoint::hit("add-bridge");
        let routed = net.mode == NetworkMode::Routed;
        let host_name = host_veth_name(&net.name, &ep.container_id, &ep.ifname);
        let mac = match &ep.mac {
            Some(m) => Some(
                ferrynet_model::names::parse_mac(m)
                    .map_err(|e| ControlError::InvalidConfig(e.to_string()))?,
            ),
            None => None,
        };
        let spec = VethSpec {
            host_name: host_name.clone(),
            bridge_index: (!routed).then_some(device),
            mtu: net.mtu,
            hairpin: true,
            container: ContainerIface {
                ifname: ep.ifname.clone(),
                mac,
                mtu: net.mtu,
                addresses: container_addresses(net, &ep.ips),
                routes: container_routes(net, subnets, &ep.ips),
            },
        };
        let attached = host.attach_veth(&spec).await.map_err(|e| match e {
            DataplaneError::Conflict(m) => ControlError::IfaceExists(m),
            other => ControlError::Dataplane {
                context: format!("attaching {} to {}", ep.container_id, net.bridge),
                source: other,
            },
        })?;
        crate::failpoint::hit("add-veth");
        if routed {
            self.plumb_routed_port(host, net, subnets, &host_name, attached.host_index, &ep.ips)
                .await?;
            self.sync_proxy_ndp(host, net).await;
        }
        // Limits before anything is published: the container never sends unshaped.
        shaping::shape(host, net, ep, attached.host_index).await?;
        let mut done = ep.clone();
        done.mac = Some(format_mac(&attached.container_mac));
        done.host_veth = Some(host_name);
        done.host_mac = Some(format_mac(&attached.host_mac));
        // Until its elements exist the port drops everything (anti-spoofing default deny).
        self.guard_endpoint(&done, net.mode).await?;
        crate::failpoint::hit("add-guarded");
        if let Err(e) = self.publish_ports(ep).await {
            self.unguard_endpoint(&done);
            return Err(e);
        }
        crate::failpoint::hit("add-published");
        Ok(done)
    }

    /// The host end of a routed container's veth: the link-local gateways, a /32 and /128 to
    /// the container sourced from the network's gateways (see [`ferrynet_model::routed`]).
    pub(crate) async fn plumb_routed_port(
        &self,
        host: &dyn Links,
        net: &Network,
        subnets: &[ResolvedSubnet],
        port: &str,
        index: u32,
        ips: &[IpNet],
    ) -> Result<()> {
        let gateways: Vec<IpAddr> = subnets.iter().map(|s| s.gateway).collect();
        let spec = routed::host_port(port, ips, &gateways);
        host.plumb_routed_port(index, &spec)
            .await
            .map_err(ControlError::dataplane(format!(
                "routing {port} on network {}",
                net.name
            )))
    }

    /// A routed network's proxy NDP entries on this host's ports, made exactly what
    /// `routed::proxy_ndp` says from the store (this host's endpoints and every held address
    /// of the network). Best effort: a failure is logged, never fails the caller (only
    /// containers given their pool's prefix by another IPAM depend on it).
    pub async fn sync_proxy_ndp(&self, host: &dyn Links, net: &Network) {
        if net.mode != NetworkMode::Routed {
            return;
        }
        let res: Result<Vec<String>> = async {
            let ports: Vec<(String, Vec<IpNet>)> = self
                .local_endpoints(&net.name)
                .await?
                .into_iter()
                .filter_map(|e| Some((e.host_veth?, e.ips)))
                .collect();
            let held: Vec<IpAddr> = self.held_addresses(&net.name).await?.into_keys().collect();
            let want = routed::proxy_ndp(&ports, &held);
            let names: Vec<String> = ports.into_iter().map(|(p, _)| p).collect();
            host.sync_proxy_ndp(&names, &want)
                .await
                .map_err(ControlError::dataplane(format!(
                    "proxy NDP entries of network {}",
                    net.name
                )))
        }
        .await;
        match res {
            Ok(failures) => {
                for f in failures {
                    tracing::warn!(network = %net.name, error = %f, "proxy NDP");
                }
            }
            Err(e) => tracing::warn!(network = %net.name, error = %e, "proxy NDP"),
        }
    }

    /// [`Control::sync_proxy_ndp`] for network `name` in the host's namespace.
    pub async fn resync_proxy_ndp(&self, name: &str) {
        let net = match self.network(name).await {
            Ok(Some((net, _))) if net.mode == NetworkMode::Routed => net,
            _ => return,
        };
        match self.host_links() {
            Ok(host) => self.sync_proxy_ndp(host.as_ref(), &net).await,
            Err(e) => tracing::warn!(network = %name, error = %e, "proxy NDP"),
        }
    }

    /// Host networking: record the endpoint (so GC and `ps` know it) and create nothing.
    async fn reserve_host_mode(
        &self,
        net: &Network,
        template: Endpoint,
    ) -> Result<(Endpoint, bool)> {
        let key = keys::endpoint(&net.name, &template.container_id, &template.ifname);
        if let Some(kv) = self.store.get(&key).await? {
            return Ok((decode(&kv)?, false));
        }
        self.store
            .txn(
                vec![ferrynet_store::Compare::Missing(key.clone())],
                vec![ferrynet_store::Op::put(key, super::encode(&template))],
            )
            .await?;
        Ok((template, true))
    }

    /// The recorded endpoint, if any.
    pub async fn endpoint(
        &self,
        network: &str,
        container_id: &str,
        ifname: &str,
    ) -> Result<Option<Endpoint>> {
        match self
            .store
            .get(&keys::endpoint(network, container_id, ifname))
            .await?
        {
            Some(kv) => Ok(Some(decode(&kv)?)),
            None => Ok(None),
        }
    }

    /// Detach a container: idempotent, succeeds for unknown containers and vanished netns.
    pub async fn detach(
        &self,
        net: &Network,
        container_id: &str,
        ifname: &str,
        netns: Option<&str>,
    ) -> Result<()> {
        let ep = self.endpoint(&net.name, container_id, ifname).await?;
        if net.mode == NetworkMode::Host {
            if let Some(ep) = ep {
                self.release(&ep).await?;
            }
            return Ok(());
        }
        let withdrawing = ep
            .as_ref()
            .and_then(|e| self.unpublish_ports_in_background(e));
        // The port's anti-spoofing elements go while the kernel deletes the link.
        let unguarding = ep.as_ref().and_then(|e| self.unguard_in_background(e));
        let ns_path = netns
            .map(str::to_string)
            .or_else(|| ep.as_ref().and_then(|e| e.netns.clone()));
        // Only touch the container's interface when we recorded it: without a record it is not ours.
        let container = match (&ep, ns_path.as_deref()) {
            (Some(_), Some(p)) if !p.is_empty() && Path::new(p).exists() => {
                self.kernel.container(p).ok()
            }
            _ => None,
        };
        let host = match container {
            Some(links) => links,
            None => self.host_links()?,
        };
        let host_name = ep
            .as_ref()
            .and_then(|e| e.host_veth.clone())
            .unwrap_or_else(|| host_veth_name(&net.name, container_id, ifname));
        let unplugged =
            host.detach_veth(ifname, &host_name)
                .await
                .map_err(ControlError::dataplane(format!(
                    "removing {ifname} of {container_id}"
                )));
        // The IFB of a bandwidth limit; without a record it may be a crashed ADD's.
        let unshaped = if ep.as_ref().is_none_or(|e| e.bandwidth.is_some()) {
            shaping::unshape(host.as_ref(), &net.name, container_id, ifname).await
        } else {
            Ok(())
        };
        // Ports are withdrawn and the link is gone before the addresses are released.
        if let Some(ep) = &ep {
            self.finish_unpublish(ep, withdrawing).await?;
            crate::failpoint::hit("del-unpublished");
            match unguarding {
                Some(h) => {
                    let _ = h.await;
                }
                None => self.unguard_endpoint(ep),
            }
        }
        if ep.is_none() {
            // No record (a repeated DEL, or an ADD whose record a racing DEL took): whatever
            // identity an interrupted ADD allowed on this port name goes, found by listing.
            self.unguard_port(&host_name);
        }
        crate::failpoint::hit("del-unplugged");
        unplugged?;
        unshaped?;
        if let Some(ep) = &ep {
            self.release(ep).await?;
            crate::failpoint::hit("del-released");
            tracing::info!(container = %container_id, network = %net.name, "detached");
            // Its addresses are no neighbour to proxy any more.
            self.sync_proxy_ndp(host.as_ref(), net).await;
        }
        Ok(())
    }

    /// Verify a container's attachment is as set up; returns the endpoint.
    pub async fn check(
        &self,
        net: &Network,
        container_id: &str,
        ifname: &str,
        netns: &str,
    ) -> Result<Endpoint> {
        let ep = self
            .endpoint(&net.name, container_id, ifname)
            .await?
            .ok_or_else(|| {
                ControlError::UnknownContainer(format!(
                    "container {container_id} has no {ifname} on network {}",
                    net.name
                ))
            })?;
        if net.mode == NetworkMode::Host {
            return Ok(ep);
        }
        let links = self.container_links(netns)?;
        let state = links
            .inspect(ifname)
            .await
            .map_err(ControlError::dataplane(format!("inspecting {ifname}")))?
            .ok_or_else(|| {
                ControlError::CheckFailed(format!(
                    "interface {ifname} is missing from netns {netns}"
                ))
            })?;
        for ip in &container_addresses(net, &ep.ips) {
            if !state.addresses.contains(ip) {
                return Err(ControlError::CheckFailed(format!(
                    "address {ip} is missing from {ifname}"
                )));
            }
        }
        if let Some(mac) = &ep.mac {
            if &format_mac(&state.mac) != mac {
                return Err(ControlError::CheckFailed(format!(
                    "{ifname} has MAC {} instead of {mac}",
                    format_mac(&state.mac)
                )));
            }
        }
        if !state.up {
            return Err(ControlError::CheckFailed(format!("{ifname} is down")));
        }
        let subnets = validate_network_subnets(&net.subnets)
            .map_err(|e| ControlError::InvalidConfig(e.to_string()))?;
        for r in container_routes(net, &subnets, &ep.ips) {
            if !state
                .routes
                .iter()
                .any(|have| have.dst == r.dst && have.gateway == r.gateway)
            {
                return Err(ControlError::CheckFailed(format!(
                    "route {} via {} is missing",
                    r.dst,
                    r.gateway.map(|g| g.to_string()).unwrap_or_default()
                )));
            }
        }
        if let Some(hv) = &ep.host_veth {
            let Some(index) = links
                .link_index(hv)
                .await
                .map_err(ControlError::dataplane("looking up host veth"))?
            else {
                return Err(ControlError::CheckFailed(format!(
                    "host interface {hv} is missing"
                )));
            };
            let missing = shaping::problems(links.as_ref(), net, &ep, index).await?;
            if !missing.is_empty() {
                return Err(ControlError::CheckFailed(missing.join("; ")));
            }
        }
        Ok(ep)
    }

    /// CNI GC: detach every CNI endpoint of `net` on this host not in `valid` (container id,
    /// ifname); `ferrynet run`, Docker and other hosts' endpoints are left alone. Keeps going
    /// past failures and returns how many were removed and the errors met.
    pub async fn gc(
        &self,
        net: &Network,
        valid: &[(String, String)],
    ) -> Result<(usize, Vec<String>)> {
        let cli: BTreeSet<(String, String)> = self
            .containers()
            .await?
            .into_iter()
            .map(|c| (c.network, c.name))
            .collect();
        let mut removed = 0;
        let mut errors = Vec::new();
        for ep in self.endpoints(&net.name).await? {
            let owner = legacy_owner(&ep, &cli);
            match gc_verdict(&ep, owner, valid, &self.host) {
                GcVerdict::Release => {}
                GcVerdict::Valid => continue,
                other => {
                    tracing::debug!(container = %ep.container_id, ifname = %ep.ifname, verdict = ?other, "gc keeps an endpoint it does not own");
                    continue;
                }
            }
            match self
                .detach(net, &ep.container_id, &ep.ifname, ep.netns.as_deref())
                .await
            {
                Ok(()) => removed += 1,
                Err(e) => errors.push(format!("{}/{}: {e}", ep.container_id, ep.ifname)),
            }
        }
        Ok((removed, errors))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferrynet_model::ipam::validate_network_subnets;
    use ferrynet_model::network::Subnet;

    fn net(internal: bool) -> Network {
        Network {
            name: "n".into(),
            mode: NetworkMode::Bridge,
            bridge: "fn-n".into(),
            subnets: vec![
                Subnet::new("10.5.0.0/24".parse().unwrap()),
                Subnet::new("fd05::/64".parse().unwrap()),
            ],
            mtu: None,
            internal,
            ip_masq: true,
            fabric: None,
            default_deny: false,
        }
    }

    #[test]
    fn default_routes_per_family_via_gateway() {
        let n = net(false);
        let subnets = validate_network_subnets(&n.subnets).unwrap();
        let ips: Vec<IpNet> = vec![
            "10.5.0.2/24".parse().unwrap(),
            "fd05::2/64".parse().unwrap(),
        ];
        let r = container_routes(&n, &subnets, &ips);
        assert_eq!(r.len(), 2);
        assert_eq!(r[0].dst.to_string(), "0.0.0.0/0");
        assert_eq!(r[0].gateway, Some("10.5.0.1".parse().unwrap()));
        assert_eq!(r[1].dst.to_string(), "::/0");
        assert_eq!(r[1].gateway, Some("fd05::1".parse().unwrap()));
    }

    #[test]
    fn internal_networks_get_no_default_route() {
        let n = net(true);
        let subnets = validate_network_subnets(&n.subnets).unwrap();
        assert!(container_routes(&n, &subnets, &["10.5.0.2/24".parse().unwrap()]).is_empty());
    }
}
