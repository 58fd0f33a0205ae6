//! BGP decisions (pure): the store's BGP records and their checks, which sessions a host
//! opens, what it announces and accepts, best-path selection, and the kernel routes that
//! follow. The speaker (`ferrynet-bgp`) and the agent carry them out.

pub mod config;
pub mod peers;
pub mod policy;
pub mod rib;

pub use config::{keys, BgpConfig, NodeConfig, PeerRecord, RecordError};
