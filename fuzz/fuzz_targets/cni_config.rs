//! The CNI input edge: a network config or conflist (Go-style JSON), and the environment
//! (`CNI_COMMAND`, `CNI_ARGS`). Any input is an error or a value, never a panic.
#![no_main]

#[path = "../bodies/cni_config.rs"]
mod body;

libfuzzer_sys::fuzz_target!(|data: &[u8]| body::run(data));
