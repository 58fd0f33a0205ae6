//! The Docker plugin's request decoding, for every method: the first byte picks the method,
//! the rest is the body. Any body is an error or a request, never a panic.
#![no_main]

#[path = "../bodies/cnm_request.rs"]
mod body;

libfuzzer_sys::fuzz_target!(|data: &[u8]| body::run(data));
