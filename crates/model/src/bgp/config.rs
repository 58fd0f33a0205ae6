//! BGP records in the store: the cluster's settings, per-host overrides and external peers.
//! Values read back are input: [`BgpConfig::check`], [`NodeConfig::check`] and
//! [`PeerRecord::check`] run on write and again on read.

use std::net::IpAddr;

use serde::{Deserialize, Serialize};

/// The private 2-byte ASN Calico uses by default; every host of the mesh takes it.
pub const DEFAULT_ASN: u32 = 64512;
/// AS_TRANS (RFC 6793): stands in for a 4-byte ASN in a 2-byte field, never a real AS.
pub const AS_TRANS: u32 = 23456;
/// Longest TCP-MD5 key the kernel accepts (`TCP_MD5SIG_MAXKEYLEN`).
pub const MD5_MAX_KEY: usize = 80;

/// Store keys of the BGP records.
pub mod keys {
    use crate::network::keys::ROOT;

    /// The cluster's BGP settings ([`super::BgpConfig`]).
    pub fn config() -> String {
        format!("{ROOT}bgp/config")
    }
    /// A host's own settings ([`super::NodeConfig`]).
    pub fn node(host: &str) -> String {
        format!("{ROOT}bgp/nodes/{host}")
    }
    /// Prefix of all hosts' settings.
    pub fn nodes() -> String {
        format!("{ROOT}bgp/nodes/")
    }
    /// An external peer ([`super::PeerRecord`]).
    pub fn peer(name: &str) -> String {
        format!("{ROOT}bgp/peers/{name}")
    }
    /// Prefix of all external peers.
    pub fn peers() -> String {
        format!("{ROOT}bgp/peers/")
    }
    /// Prefix of every BGP record (one watch follows them all).
    pub fn all() -> String {
        format!("{ROOT}bgp/")
    }
}

/// A BGP record that cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RecordError {
    /// ASN 0 and AS_TRANS are reserved.
    #[error("AS number {0} is reserved (0 and 23456 cannot be used)")]
    ReservedAsn(u32),
    /// Hold time 1 or 2 (RFC 4271: 0 or at least 3).
    #[error("hold time {0} s: use 0 (no keepalives) or at least 3 s")]
    HoldTime(u16),
    /// Keepalive not below the hold time.
    #[error("keepalive {keepalive} s must be below the hold time {hold} s")]
    Keepalive {
        /// Keepalive interval.
        keepalive: u16,
        /// Hold time.
        hold: u16,
    },
    /// A peer name breaks the naming rule.
    #[error("invalid peer name {0:?}: 1-63 of letters, digits, '_', '.', '-', starting with a letter or digit")]
    Name(String),
    /// An address nothing can peer with.
    #[error("peer address {0} cannot be used (unspecified, multicast or broadcast)")]
    Address(IpAddr),
    /// A TCP-MD5 key the kernel refuses.
    #[error("the TCP-MD5 password must be 1-{MD5_MAX_KEY} bytes")]
    Password,
    /// A record whose key and content disagree.
    #[error("record {key} names {name:?}")]
    KeyMismatch {
        /// The key.
        key: String,
        /// The name inside.
        name: String,
    },
}

/// The cluster's BGP settings, under `bgp/config` (defaults when missing).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct BgpConfig {
    /// The hosts' AS (a host's [`NodeConfig`] may override it).
    pub asn: u32,
    /// Full iBGP mesh among the ferrynet hosts (off when hosts peer with their ToR instead).
    pub mesh: bool,
    /// Hold time offered in OPEN, seconds.
    pub hold_time: u16,
    /// Keepalive interval, seconds (None: a third of the negotiated hold time).
    pub keepalive: Option<u16>,
    /// Graceful-restart time offered (RFC 4724), seconds: how long peers keep this host's
    /// routes while its agent restarts, and how long this host keeps a restarting peer's.
    pub restart_time: u16,
}

impl Default for BgpConfig {
    fn default() -> Self {
        BgpConfig {
            asn: DEFAULT_ASN,
            mesh: true,
            hold_time: 90,
            keepalive: None,
            restart_time: 120,
        }
    }
}

fn check_asn(asn: u32) -> Result<(), RecordError> {
    if asn == 0 || asn == AS_TRANS {
        return Err(RecordError::ReservedAsn(asn));
    }
    Ok(())
}

fn check_timers(hold: u16, keepalive: Option<u16>) -> Result<(), RecordError> {
    if hold == 1 || hold == 2 {
        return Err(RecordError::HoldTime(hold));
    }
    match keepalive {
        Some(k) if hold > 0 && k >= hold => Err(RecordError::Keepalive { keepalive: k, hold }),
        _ => Ok(()),
    }
}

impl BgpConfig {
    /// Refuse reserved ASNs and impossible timers.
    pub fn check(&self) -> Result<(), RecordError> {
        check_asn(self.asn)?;
        check_timers(self.hold_time, self.keepalive)
    }
}

/// One host's settings, under `bgp/nodes/<host>`: Calico's AS-per-rack or AS-per-host models
/// give hosts their own AS.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct NodeConfig {
    /// This host's AS (None: the cluster's).
    pub asn: Option<u32>,
}

impl NodeConfig {
    /// Refuse reserved ASNs.
    pub fn check(&self) -> Result<(), RecordError> {
        self.asn.map_or(Ok(()), check_asn)
    }
}

/// An external peer (a ToR, a route reflector), under `bgp/peers/<name>`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PeerRecord {
    /// The peer's name.
    pub name: String,
    /// Its address (the session's TCP destination).
    pub address: IpAddr,
    /// Its AS.
    pub asn: u32,
    /// Only this host peers with it (None: every host).
    #[serde(default)]
    pub host: Option<String>,
    /// TCP-MD5 key (RFC 2385), if the peer wants one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub password: Option<String>,
    /// Also accept a default route from it.
    #[serde(default)]
    pub accept_default: bool,
}

impl PeerRecord {
    /// Check the name, ASN, address and password.
    pub fn check(&self) -> Result<(), RecordError> {
        check_peer_name(&self.name)?;
        check_asn(self.asn)?;
        let bad = match self.address {
            IpAddr::V4(a) => a.is_unspecified() || a.is_multicast() || a.is_broadcast(),
            IpAddr::V6(a) => a.is_unspecified() || a.is_multicast(),
        };
        if bad {
            return Err(RecordError::Address(self.address));
        }
        if let Some(p) = &self.password {
            if p.is_empty() || p.len() > MD5_MAX_KEY {
                return Err(RecordError::Password);
            }
        }
        Ok(())
    }

    /// Check a record read from `key`: its content, and that the key names it.
    pub fn check_at(&self, key: &str) -> Result<(), RecordError> {
        self.check()?;
        if key != keys::peer(&self.name) {
            return Err(RecordError::KeyMismatch {
                key: key.to_string(),
                name: self.name.clone(),
            });
        }
        Ok(())
    }
}

/// A peer name: 1-63 of `[A-Za-z0-9_.-]`, starting with a letter or digit.
pub fn check_peer_name(name: &str) -> Result<(), RecordError> {
    crate::names::validate_network_name(name).map_err(|_| RecordError::Name(name.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peer() -> PeerRecord {
        PeerRecord {
            name: "tor1".into(),
            address: "172.31.0.254".parse().unwrap(),
            asn: 4_200_000_001,
            host: None,
            password: None,
            accept_default: false,
        }
    }

    #[test]
    fn defaults_are_calicos() {
        let c: BgpConfig = serde_json::from_str("{}").unwrap();
        assert_eq!(c, BgpConfig::default());
        assert_eq!(c.asn, 64512);
        assert!(c.mesh);
        c.check().unwrap();
    }

    #[test]
    fn reserved_asns_and_bad_timers_are_refused() {
        for asn in [0, AS_TRANS] {
            let c = BgpConfig {
                asn,
                ..Default::default()
            };
            assert_eq!(c.check(), Err(RecordError::ReservedAsn(asn)));
            assert!(NodeConfig { asn: Some(asn) }.check().is_err());
        }
        for hold in [1, 2] {
            let c = BgpConfig {
                hold_time: hold,
                ..Default::default()
            };
            assert_eq!(c.check(), Err(RecordError::HoldTime(hold)));
        }
        let c = BgpConfig {
            hold_time: 9,
            keepalive: Some(9),
            ..Default::default()
        };
        assert!(c.check().is_err());
        let c = BgpConfig {
            hold_time: 0,
            keepalive: Some(9),
            ..Default::default()
        };
        c.check().unwrap();
    }

    #[test]
    fn peer_records_are_checked() {
        peer().check().unwrap();
        peer().check_at(&keys::peer("tor1")).unwrap();
        assert!(peer().check_at(&keys::peer("tor2")).is_err());
        let mut p = peer();
        p.name = "-x".into();
        assert!(p.check().is_err());
        let mut p = peer();
        p.address = "224.0.0.5".parse().unwrap();
        assert!(p.check().is_err());
        let mut p = peer();
        p.address = "::".parse().unwrap();
        assert!(p.check().is_err());
        let mut p = peer();
        p.password = Some("x".repeat(81));
        assert_eq!(p.check(), Err(RecordError::Password));
        p.password = Some("x".repeat(80));
        p.check().unwrap();
    }
}
