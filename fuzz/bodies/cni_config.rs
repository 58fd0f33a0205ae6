//! The CNI input edge: a network config or conflist (Go-style JSON), and the environment
//! (`CNI_COMMAND`, `CNI_ARGS`). Any input is an error or a value, never a panic.
use ferrynet_model::cni::{parse_cni_args, Command, NetConf, NetConfList};

/// One input: an error or a value, never a panic (nor a broken invariant).
pub fn run(data: &[u8]) {
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
}
