//! The DNS server, differentially: wherever the hand-written fast path answers a packet,
//! hickory's general path must give the same bytes; neither may panic on any packet.
#![no_main]

#[path = "../bodies/dns_diff.rs"]
mod body;

libfuzzer_sys::fuzz_target!(|data: &[u8]| body::run(data));
