//! ferrynet's BGP-4 speaker: the wire codec (on netgauze-bgp-pkt) and the sessions (RFC 4271
//! FSM, 4-byte ASNs, MP-BGP IPv4/IPv6 unicast, route refresh, graceful restart, TCP-MD5).
//! Policy, RIB and kernel-route decisions are `ferrynet_model::bgp`'s.

mod md5;
mod session;
pub mod speaker;
pub mod wire;

pub use speaker::{Exports, PeerState, Policy, Settings, Speaker, BGP_PORT};

/// Shared constants.
pub mod config {
    pub use ferrynet_model::bgp::config::AS_TRANS;
}
