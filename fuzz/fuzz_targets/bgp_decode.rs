//! The BGP decoder on arbitrary bytes: every input must decode to messages or to a
//! NOTIFICATION, never panic, and decoded announcements must pass through the import policy.
#![no_main]

#[path = "../bodies/bgp_decode.rs"]
mod body;

libfuzzer_sys::fuzz_target!(|data: &[u8]| body::run(data));
