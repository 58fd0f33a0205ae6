//! The CLI's small languages: `-p` publish specs and `--check` health checks. The first byte
//! picks the parser.
#![no_main]

#[path = "../bodies/cli_specs.rs"]
mod body;

libfuzzer_sys::fuzz_target!(|data: &[u8]| body::run(data));
