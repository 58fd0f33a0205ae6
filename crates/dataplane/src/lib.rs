//! ferrynet's side effects on Linux: network namespaces, links, addresses and routes through
//! netlink, sysctls, and nftables transactions. Decisions are made elsewhere (ferrynet-model);
//! this crate only carries them out, each call aimed at one network namespace.

pub mod bgp_routes;
pub mod bridge;
pub mod conntrack;
pub mod error;
pub mod fabric;
pub mod firewall_compat;
pub mod hostpair;
pub mod kernel;
pub mod netfilter;
pub mod netlink;
pub mod netns;
pub mod nft;
pub mod nft_netlink;
pub mod route_get;
pub mod routed;
pub mod routes;
pub mod sysctl;
pub mod tc;
pub mod veth;
pub mod vxlan;
