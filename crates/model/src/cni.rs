//! CNI protocol types (spec 1.1.0, accepting 0.3.0 … 1.1.0 on input): the
//! environment, the network configuration, results, errors and versions.
//!
//! Everything here is pure: callers read the environment and stdin and hand
//! the values in, so every decision is testable without a runtime.

mod conf;
mod env;
mod error;
pub mod gojson;
mod result;
mod version;

pub use conf::{
    canonical_conf, Attachment, IpRange, NetConf, NetConfList, RuntimeConfig, RuntimeDns,
};
pub use env::{
    check_args, parse_cni_args, validate_container_id, validate_ifname, CniEnv, Command, KNOWN_ARGS,
};
pub use error::CniError;
pub use result::{CniResult, Dns, Interface, IpConfig, Route};
pub use version::{
    compare_versions, highest_supported, is_supported, version_result, LATEST_VERSION,
    SUPPORTED_VERSIONS,
};
