//! `ferrynet render` templates: any template text compiles or errors, and renders against a
//! context with services, producers and endpoints (or errors) without panicking.
#![no_main]

#[path = "../bodies/template.rs"]
mod body;

libfuzzer_sys::fuzz_target!(|data: &[u8]| body::run(data));
