//! Multi-host fabric: how a host reaches the other hosts' address blocks.

use serde::{Deserialize, Serialize};

/// How hosts reach each other's blocks on a multi-host network.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Backend {
    /// Kernel routes via the peer's underlay address (hosts share a link; Flannel host-gw).
    Route,
    /// A kernel VXLAN device per network with static FDB and neighbour entries.
    Vxlan,
    /// Route to peers on a shared underlay subnet, VXLAN to the others.
    Auto,
}

impl std::str::FromStr for Backend {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "route" => Ok(Backend::Route),
            "vxlan" => Ok(Backend::Vxlan),
            "auto" => Ok(Backend::Auto),
            other => Err(format!(
                "unknown backend {other:?}: expected route, vxlan or auto"
            )),
        }
    }
}

impl std::fmt::Display for Backend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Backend::Route => "route",
            Backend::Vxlan => "vxlan",
            Backend::Auto => "auto",
        })
    }
}
