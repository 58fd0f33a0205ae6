//! Anti-spoofing on container ports: the `bridge ferrynet` table and its per-port elements.
//!
//! The rules are in [`ferrynet_model::guard`]; here they meet the kernel. A port's elements are
//! added right after its veth is created (the skeleton drops everything from an `fnv…` port
//! without elements until then) and removed when it is detached.

use std::net::IpAddr;

use ferrynet_model::guard::{
    add_port, add_ports, delete_table, in_reason_order, remove_listed_port, remove_port_tolerant,
    skeleton, GuardedPort, TABLES,
};
use ferrynet_model::names::{host_veth_name, parse_mac};
use ferrynet_model::network::{Endpoint, NetworkMode};

use super::Control;
use crate::error::{ControlError, Result};

/// The guard's view of an endpoint of a network in `mode`: its host port, MAC and addresses;
/// None until both the port and the MAC are known (host networking has neither).
pub fn guarded_port(ep: &Endpoint, mode: NetworkMode) -> Option<GuardedPort> {
    let port = ep.host_veth.clone()?;
    let mac = parse_mac(ep.mac.as_deref()?).ok()?;
    Some(GuardedPort {
        port,
        mac,
        ips: ep.ips.iter().map(|n| n.addr()).collect::<Vec<IpAddr>>(),
        routed: mode == NetworkMode::Routed,
    })
}

/// One drop counter of the guard.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct GuardCounter {
    /// The reason (counter name).
    pub reason: String,
    /// Frames dropped.
    pub packets: u64,
    /// Bytes dropped.
    pub bytes: u64,
}

impl Control {
    /// Let `port` send from its MAC and addresses. If the table was removed behind our back,
    /// the guard is rebuilt from the store and the port added again.
    pub async fn guard_port(&self, port: &GuardedPort) -> Result<()> {
        let batch = add_port(port);
        if let Err(first) = self.nft.apply(&batch) {
            tracing::warn!(error = %first, port = %port.port, "guarding a port failed; rebuilding the anti-spoofing table");
            self.reload_guard().await?;
            self.nft
                .apply(&batch)
                .map_err(ControlError::firewall(format!("guarding {}", port.port)))?;
        }
        Ok(())
    }

    /// Guard an endpoint's port, of a network in `mode`, when its record names one (see
    /// [`guarded_port`]).
    pub async fn guard_endpoint(&self, ep: &Endpoint, mode: NetworkMode) -> Result<()> {
        match guarded_port(ep, mode) {
            Some(p) => self.guard_port(&p).await,
            None => Ok(()),
        }
    }

    /// Forget an endpoint's elements; succeeds when they or the table are gone. Without a
    /// recorded MAC (an ADD interrupted after the guard) the port's elements are found by
    /// listing the table.
    pub fn unguard_endpoint(&self, ep: &Endpoint) {
        // Removal covers every guard table, so the network's mode does not matter here.
        let (port, batch) = match guarded_port(ep, NetworkMode::Bridge) {
            Some(p) => (p.port.clone(), remove_port_tolerant(&p)),
            None => {
                let port = ep
                    .host_veth
                    .clone()
                    .unwrap_or_else(|| host_veth_name(&ep.network, &ep.container_id, &ep.ifname));
                return self.unguard_port(&port);
            }
        };
        if batch.is_empty() {
            return;
        }
        // Without the table there is nothing to remove; a rebuild reads only live records.
        if let Err(e) = self.nft.apply(&batch) {
            tracing::debug!(error = %e, port = %port, "anti-spoofing elements already gone");
        }
    }

    /// Forget every element of host port `port`, found by listing the table; succeeds when
    /// there are none or no table.
    pub fn unguard_port(&self, port: &str) {
        // Bridged ports are in `bridge ferrynet`, routed ones in the routed tables.
        let mut batch = String::new();
        for (family, name) in TABLES {
            if let Ok(Some(t)) = self.nft.list_table(family, name) {
                batch.push_str(&remove_listed_port(&t, port, &format!("{family} {name}")));
            }
        }
        if !batch.is_empty() {
            if let Err(e) = self.nft.apply(&batch) {
                tracing::debug!(error = %e, %port, "anti-spoofing elements already gone");
            }
        }
    }

    /// Start removing a recorded endpoint's anti-spoofing elements on a blocking thread, so a
    /// DEL overlaps it with the kernel's link deletion; None when there is nothing to remove
    /// or the port must be found by listing the table (then [`Control::unguard_endpoint`]).
    pub fn unguard_in_background(&self, ep: &Endpoint) -> Option<tokio::task::JoinHandle<()>> {
        let p = guarded_port(ep, NetworkMode::Bridge)?;
        let batch = remove_port_tolerant(&p);
        if batch.is_empty() {
            return None;
        }
        let nft = self.nft.clone();
        Some(tokio::task::spawn_blocking(move || {
            if let Err(e) = nft.apply(&batch) {
                tracing::debug!(error = %e, port = %p.port, "anti-spoofing elements already gone");
            }
        }))
    }

    /// Rebuild the guard from the store: skeleton plus every local endpoint's port, one
    /// transaction. Returns the number of ports.
    pub async fn reload_guard(&self) -> Result<usize> {
        let mut ports = Vec::new();
        for net in self.networks().await? {
            if !net.mode.gives_interfaces() {
                continue;
            }
            // Endpoints of other hosts (multi-host networks) have no port here.
            for ep in self.local_endpoints(&net.name).await? {
                ports.extend(guarded_port(&ep, net.mode));
            }
        }
        let batch = format!("{}{}", skeleton(), add_ports(&ports));
        self.nft
            .apply(&batch)
            .map_err(ControlError::firewall("rebuilding the anti-spoofing table"))?;
        Ok(ports.len())
    }

    /// Remove the guard's tables (no network left).
    pub fn remove_guard(&self) -> Result<()> {
        // Tolerant of tables already gone (add, then delete).
        self.nft
            .apply(&delete_table())
            .map_err(ControlError::firewall("deleting the anti-spoofing tables"))
    }

    /// The drop counters, per reason, summed over the bridge and the routed tables (empty when
    /// the tables are missing).
    pub fn guard_counters(&self) -> Result<Vec<GuardCounter>> {
        let mut out: Vec<GuardCounter> = Vec::new();
        for (family, name) in TABLES {
            // The counters alone: a listing of the table would read the whole ruleset.
            let mut counters = self
                .nft
                .list_counters(family, name)
                .map_err(ControlError::firewall("reading the anti-spoofing counters"))?
                .unwrap_or_default();
            in_reason_order(&mut counters);
            for (reason, packets, bytes) in counters {
                match out.iter_mut().find(|c| c.reason == reason) {
                    Some(c) => {
                        c.packets += packets;
                        c.bytes += bytes;
                    }
                    None => out.push(GuardCounter {
                        reason,
                        packets,
                        bytes,
                    }),
                }
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_port_is_guarded_only_with_its_link_and_mac_known() {
        let mut ep = Endpoint::new("n", "c", "eth0");
        ep.ips = vec!["10.5.0.2/24".parse().unwrap()];
        assert_eq!(guarded_port(&ep, NetworkMode::Bridge), None);
        ep.host_veth = Some("fnv0123456789ab".into());
        assert_eq!(guarded_port(&ep, NetworkMode::Bridge), None);
        ep.mac = Some("02:42:0a:05:00:02".into());
        let p = guarded_port(&ep, NetworkMode::Bridge).unwrap();
        assert!(!p.routed);
        assert!(guarded_port(&ep, NetworkMode::Routed).unwrap().routed);
        assert_eq!(p.port, "fnv0123456789ab");
        assert_eq!(p.ips, vec!["10.5.0.2".parse::<IpAddr>().unwrap()]);
        ep.mac = Some("garbage".into());
        assert_eq!(guarded_port(&ep, NetworkMode::Bridge), None);
    }
}
