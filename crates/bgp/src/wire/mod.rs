//! BGP messages as the speaker uses them, and their wire format. The parsing and writing
//! are netgauze-bgp-pkt's (RFC 4271, 4760, 6793, 4724, 2918); this module narrows its
//! general types to what a leaf speaker exchanges (IPv4 and IPv6 unicast) and turns every
//! parse error into the NOTIFICATION RFC 4271 section 6 asks for.

mod decode;
mod encode;

use std::net::{Ipv4Addr, Ipv6Addr};

use ipnet::IpNet;

pub use decode::Decoder;
pub use encode::{encode, end_of_rib, notification_frame, updates, Announce};

/// Largest message without the extended-message capability (RFC 4271 4.1).
pub const MAX_MESSAGE: usize = 4096;
/// Header size: marker, length, type.
pub const HEADER: usize = 19;

/// A message the speaker sends or receives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Msg {
    /// OPEN.
    Open(Open),
    /// UPDATE.
    Update(Update),
    /// KEEPALIVE.
    Keepalive,
    /// NOTIFICATION.
    Notification(Notify),
    /// ROUTE-REFRESH for IPv4 (false) or IPv6 (true) unicast.
    RouteRefresh(bool),
}

/// What an OPEN says, as far as the speaker cares.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Open {
    /// The sender's AS (the 4-byte capability's when present).
    pub asn: u32,
    /// Hold time offered.
    pub hold_time: u16,
    /// BGP identifier.
    pub router_id: Ipv4Addr,
    /// Multiprotocol IPv4 unicast capability.
    pub ipv4: bool,
    /// Multiprotocol IPv6 unicast capability.
    pub ipv6: bool,
    /// Route refresh capability (RFC 2918).
    pub route_refresh: bool,
    /// 4-byte AS capability (RFC 6793).
    pub asn4: bool,
    /// Graceful restart capability (RFC 4724).
    pub graceful_restart: Option<GracefulRestart>,
}

/// The graceful-restart capability.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GracefulRestart {
    /// R bit: the sender has restarted.
    pub restarting: bool,
    /// Restart time, seconds.
    pub time: u16,
    /// Families (false IPv4, true IPv6) with their F bit (forwarding state kept).
    pub families: Vec<(bool, bool)>,
}

/// Path attributes of an announcement.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Attrs {
    /// ORIGIN.
    pub origin: u8,
    /// AS_PATH flattened; AS_SETs count once (`as_path_len`).
    pub as_path: Vec<u32>,
    /// AS_PATH length for best-path selection.
    pub as_path_len: u32,
    /// NEXT_HOP (IPv4 NLRI).
    pub next_hop: Option<Ipv4Addr>,
    /// MP_REACH next hops for IPv6 NLRI: global and optional link-local.
    pub next_hop6: Option<(Ipv6Addr, Option<Ipv6Addr>)>,
    /// MULTI_EXIT_DISC.
    pub med: Option<u32>,
    /// LOCAL_PREF.
    pub local_pref: Option<u32>,
}

/// An UPDATE, both families together.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Update {
    /// Withdrawn prefixes (classic field and MP_UNREACH).
    pub withdrawn: Vec<IpNet>,
    /// Announced prefixes (classic NLRI and MP_REACH).
    pub announced: Vec<IpNet>,
    /// Their attributes (None for withdraw-only updates).
    pub attrs: Option<Attrs>,
    /// End-of-RIB marker (RFC 4724) of IPv4 (false) or IPv6 (true).
    pub end_of_rib: Option<bool>,
    /// Announcements to handle as withdrawals (RFC 7606): a mandatory attribute is missing.
    pub treat_as_withdraw: bool,
}

/// A NOTIFICATION: error code, subcode and data.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Notify {
    /// Error code (RFC 4271 4.5).
    pub code: u8,
    /// Subcode.
    pub subcode: u8,
    /// Data.
    pub data: Vec<u8>,
}

impl Notify {
    /// A notification without data.
    pub fn new(code: u8, subcode: u8) -> Self {
        Notify {
            code,
            subcode,
            data: Vec::new(),
        }
    }
}

impl std::fmt::Display for Notify {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let what = match self.code {
            1 => "message header error",
            2 => "OPEN message error",
            3 => "UPDATE message error",
            4 => "hold timer expired",
            5 => "finite state machine error",
            6 => "cease",
            7 => "route-refresh message error",
            _ => "unknown error",
        };
        write!(f, "{what} ({}/{})", self.code, self.subcode)
    }
}

/// NOTIFICATION codes the speaker sends itself.
pub mod codes {
    /// OPEN message error.
    pub const OPEN: u8 = 2;
    /// Bad peer AS.
    pub const BAD_PEER_AS: u8 = 2;
    /// Unacceptable hold time.
    pub const BAD_HOLD_TIME: u8 = 6;
    /// Hold timer expired.
    pub const HOLD_TIMER: u8 = 4;
    /// Finite state machine error.
    pub const FSM: u8 = 5;
    /// Cease.
    pub const CEASE: u8 = 6;
    /// Cease: peer de-configured.
    pub const PEER_DECONFIGURED: u8 = 3;
    /// Cease: administrative reset.
    pub const ADMIN_RESET: u8 = 4;
    /// Cease: connection rejected.
    pub const REJECTED: u8 = 5;
    /// Cease: connection collision resolution.
    pub const COLLISION: u8 = 7;
}

#[cfg(test)]
mod tests;
