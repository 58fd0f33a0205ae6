//! Living beside Docker and other iptables users.
//!
//! Docker sets the iptables FORWARD policy to DROP, and with br_netfilter even frames bridged
//! between two containers traverse it. A drop in any netfilter base chain is final, so accepting
//! in ferrynet's own table is not enough: ferrynet's interfaces (all named `fn-*`) are accepted in
//! FORWARD too, while isolation between ferrynet networks stays in ferrynet's own nft chain.
//! Nothing of Docker's is changed. This spawns iptables, so it runs when a bridge is created,
//! not on every container ADD.

use std::process::Command;

use crate::error::{DataplaneError, Result};

/// The connection mark of ingress connections, as `VALUE/MASK` (see
/// [`ferrynet_model::lb::INGRESS_MARK`]).
const INGRESS_CONNMARK: &str = "0x400000/0x400000";

/// The rules ensured in FORWARD: traffic in and out of `fn-*` interfaces, and ingress
/// connections the load balancer forwards to another host (underlay to underlay or tunnel,
/// both directions), which it marks in conntrack.
pub const RULES: [&[&str]; 3] = [
    &["-i", "fn-+", "-j", "ACCEPT"],
    &["-o", "fn-+", "-j", "ACCEPT"],
    &["-m", "connmark", "--mark", INGRESS_CONNMARK, "-j", "ACCEPT"],
];

fn run(bin: &str, args: &[&str]) -> Option<bool> {
    Command::new(bin)
        .args(args)
        .output()
        .ok()
        .map(|o| o.status.success())
}

fn tools() -> [&'static str; 2] {
    ["iptables", "ip6tables"]
}

/// Make sure both FORWARD accepts exist in iptables and ip6tables (checked first; inserted at
/// the top when missing). Absent tools mean there is nothing to coexist with.
pub fn ensure_forward_accept() -> Result<()> {
    for bin in tools() {
        for rule in RULES {
            let mut check = vec!["-w", "5", "-C", "FORWARD"];
            check.extend_from_slice(rule);
            match run(bin, &check) {
                None => break, // tool not installed
                Some(true) => continue,
                Some(false) => {}
            }
            let mut insert = vec!["-w", "5", "-I", "FORWARD", "1"];
            insert.extend_from_slice(rule);
            if run(bin, &insert) != Some(true) {
                return Err(DataplaneError::Conflict(format!(
                    "{bin} {} failed",
                    insert.join(" ")
                )));
            }
            tracing::info!("{bin}: accepting forwarded traffic {}", rule.join(" "));
        }
    }
    Ok(())
}

/// Remove the accepts (for a full uninstall).
pub fn remove_forward_accept() -> Result<()> {
    for bin in tools() {
        for rule in RULES {
            let mut del = vec!["-w", "5", "-D", "FORWARD"];
            del.extend_from_slice(rule);
            while run(bin, &del) == Some(true) {}
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn ingress_connmark_is_the_load_balancers() {
        let m = ferrynet_model::lb::INGRESS_MARK;
        assert_eq!(super::INGRESS_CONNMARK, format!("{m:#x}/{m:#x}"));
    }
}
