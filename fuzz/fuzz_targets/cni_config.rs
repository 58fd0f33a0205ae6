//! The CNI input edge: a network config or conflist (Go-style JSON), and the environment
//! (`CNI_COMMAND`, `CNI_ARGS`). Any input is an error or a value, never a panic.
#![no_main]

use ferrynet_model::cni::{parse_cni_args, Command, NetConf, NetConfList};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(conf) = NetConf::parse(data) {
        let _ = conf.runtime_config.parsed_ips();
        let _ = conf.parsed_prev_result();
    }
    let _ = NetConfList::parse(data);
    let _ = NetConfList::parse_any(data);
    if let Ok(s) = std::str::from_utf8(data) {
        let _ = Command::parse(s);
        let _ = parse_cni_args(s);
    }
});
