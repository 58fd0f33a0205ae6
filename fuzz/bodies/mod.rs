//! The fuzz targets' bodies, shared by the cargo-fuzz targets (`fuzz_targets/`) and the
//! stable replay test that CI runs (`crates/ferrynet/tests/fuzz_replay.rs`).

pub mod bgp_decode;
pub mod cli_specs;
pub mod cni_config;
pub mod cnm_request;
pub mod dns_diff;
pub mod store_url;
pub mod template;
