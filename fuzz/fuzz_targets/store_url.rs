//! The store URL (`--store`, `host.json`): any string is a config or an error, and a config
//! prints back (with its password hidden) without panicking.
#![no_main]

#[path = "../bodies/store_url.rs"]
mod body;

libfuzzer_sys::fuzz_target!(|data: &[u8]| body::run(data));
