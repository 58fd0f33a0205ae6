//! Living beside Docker and other iptables users.
//!
//! Docker sets the iptables FORWARD policy to DROP, and with br_netfilter even frames bridged
//! between two containers traverse it. A drop in any netfilter base chain is final, so accepting
//! in ferrynet's own table is not enough: ferrynet's interfaces (all named `fn-*`) are accepted in
//! FORWARD too, while isolation between ferrynet networks stays in ferrynet's own nft chain.
//!
//! The accepts live in their own chain, [`CHAIN`], whose one jump sits right after Docker's own
//! jumps (DOCKER-USER, DOCKER-FORWARD, DOCKER-ISOLATION-STAGE-1): the administrator's
//! DOCKER-USER rules and Docker's isolation see ferrynet's traffic first, and traffic into a
//! Docker bridge is left to Docker's rules (the chain returns for it). Nothing of Docker's is
//! changed. This spawns iptables, so it runs when a bridge is created or the load balancer
//! first serves ingress, not on every container ADD; each run moves the jump back below
//! Docker's if a restarted dockerd inserted its jumps above it.

use std::io::Write;
use std::process::{Command, Stdio};

use crate::error::{DataplaneError, Result};

/// The connection mark of ingress connections, as `VALUE/MASK` (see
/// [`ferrynet_model::lb::INGRESS_MARK`]).
const INGRESS_CONNMARK: &str = "0x400000/0x400000";

/// ferrynet's chain in the filter table, jumped to from FORWARD.
pub const CHAIN: &str = "FERRYNET-FORWARD";

/// Docker's unconditional jumps at the top of FORWARD, which must run before [`CHAIN`].
pub const DOCKER_JUMPS: [&str; 3] = ["DOCKER-USER", "DOCKER-FORWARD", "DOCKER-ISOLATION-STAGE-1"];

/// The rules of [`CHAIN`], in order: traffic into a Docker bridge is Docker's to decide (its
/// published-port and established accepts come later in FORWARD or earlier in DOCKER-FORWARD);
/// then traffic in and out of `fn-*` interfaces, and ingress connections the load balancer
/// forwards to another host (underlay to underlay or tunnel, both directions), which it marks
/// in conntrack. Routed networks' containers send and receive through their own `fnv*` ports
/// (no bridge), so those are accepted too.
pub const RULES: [&[&str]; 7] = [
    &["-o", "docker0", "-j", "RETURN"],
    &["-o", "br-+", "-j", "RETURN"],
    &["-i", "fn-+", "-j", "ACCEPT"],
    &["-o", "fn-+", "-j", "ACCEPT"],
    &["-i", "fnv+", "-j", "ACCEPT"],
    &["-o", "fnv+", "-j", "ACCEPT"],
    &["-m", "connmark", "--mark", INGRESS_CONNMARK, "-j", "ACCEPT"],
];

/// Accepts that earlier versions inserted at the top of FORWARD itself, ahead of DOCKER-USER;
/// removed wherever found.
pub const LEGACY_RULES: [&[&str]; 3] = [
    &["-i", "fn-+", "-j", "ACCEPT"],
    &["-o", "fn-+", "-j", "ACCEPT"],
    &["-m", "connmark", "--mark", INGRESS_CONNMARK, "-j", "ACCEPT"],
];

/// The `iptables -S` form of a rule in `chain`.
fn spec(chain: &str, rule: &[&str]) -> String {
    format!("-A {chain} {}", rule.join(" "))
}

/// What `ensure` must change, as an `iptables-restore --noflush` script, given
/// `iptables -S FORWARD` and `iptables -S FERRYNET-FORWARD` (None: the chain is missing).
/// None when everything is in place: the chain holds exactly [`RULES`], no legacy accept is
/// left in FORWARD, and FORWARD jumps to the chain once, after every Docker jump.
pub fn plan(forward: &str, chain: Option<&str>) -> Option<String> {
    let jump = spec("FORWARD", &["-j", CHAIN]);
    let rules: Vec<&str> = forward
        .lines()
        .map(str::trim)
        .filter(|l| l.starts_with("-A "))
        .collect();
    let want_chain: Vec<String> = RULES.iter().map(|r| spec(CHAIN, r)).collect();
    let chain_ok = chain.is_some_and(|c| {
        let have: Vec<&str> = c
            .lines()
            .map(str::trim)
            .filter(|l| l.starts_with("-A "))
            .collect();
        have == want_chain
    });
    let legacy: Vec<String> = LEGACY_RULES.iter().map(|r| spec("FORWARD", r)).collect();
    let is_docker = |l: &str| {
        DOCKER_JUMPS
            .iter()
            .any(|d| l == spec("FORWARD", &["-j", d]))
    };
    let last_docker = rules.iter().rposition(|l| is_docker(l));
    let jumps: Vec<usize> = (0..rules.len()).filter(|&i| rules[i] == jump).collect();
    let jump_ok = jumps.len() == 1 && last_docker.is_none_or(|d| jumps[0] > d);
    let has_legacy = rules.iter().any(|l| legacy.iter().any(|g| g == l));
    if chain_ok && jump_ok && !has_legacy {
        return None;
    }

    let mut script = String::from("*filter\n");
    if !chain_ok {
        // Declaring the chain under --noflush creates it or empties it, in the same
        // transaction as the refill.
        script += &format!(":{CHAIN} - [0:0]\n");
        for r in &want_chain {
            script += r;
            script.push('\n');
        }
    }
    // Delete by specification (first match each time), then insert the jump at its place in
    // what remains.
    let mut remaining: Vec<&str> = rules.clone();
    let delete = |what: &str, script: &mut String, remaining: &mut Vec<&str>| {
        while let Some(i) = remaining.iter().position(|l| *l == what) {
            remaining.remove(i);
            *script += &format!("-D{}\n", &what[2..]);
        }
    };
    for g in &legacy {
        delete(g, &mut script, &mut remaining);
    }
    if !jump_ok {
        delete(&jump, &mut script, &mut remaining);
        let at = remaining
            .iter()
            .rposition(|l| is_docker(l))
            .map_or(1, |d| d + 2);
        script += &format!("-I FORWARD {at} -j {CHAIN}\n");
    }
    script += "COMMIT\n";
    Some(script)
}

fn run(bin: &str, args: &[&str]) -> Option<std::process::Output> {
    Command::new(bin).args(args).output().ok()
}

fn restore(bin: &str, script: &str) -> Result<()> {
    let fail = |e: String| DataplaneError::Conflict(format!("{bin}-restore: {e}"));
    let mut child = Command::new(format!("{bin}-restore"))
        .args(["-w", "5", "--noflush"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| fail(e.to_string()))?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin
            .write_all(script.as_bytes())
            .map_err(|e| fail(e.to_string()))?;
    }
    let out = child.wait_with_output().map_err(|e| fail(e.to_string()))?;
    if !out.status.success() {
        return Err(fail(format!(
            "{} (script: {script:?})",
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(())
}

fn tools() -> [&'static str; 2] {
    ["iptables", "ip6tables"]
}

/// Make sure ferrynet's FORWARD accepts are in place in iptables and ip6tables, after Docker's
/// jumps (checked first; changed in one `iptables-restore` transaction when something is off).
/// Absent tools mean there is nothing to coexist with.
pub fn ensure_forward_accept() -> Result<()> {
    for bin in tools() {
        let Some(forward) = run(bin, &["-w", "5", "-S", "FORWARD"]) else {
            continue; // tool not installed
        };
        if !forward.status.success() {
            return Err(DataplaneError::Conflict(format!(
                "{bin} -S FORWARD: {}",
                String::from_utf8_lossy(&forward.stderr).trim()
            )));
        }
        let chain = run(bin, &["-w", "5", "-S", CHAIN])
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned());
        let forward = String::from_utf8_lossy(&forward.stdout);
        if let Some(script) = plan(&forward, chain.as_deref()) {
            restore(bin, &script)?;
            tracing::info!("{bin}: ferrynet's FORWARD accepts (re)placed after Docker's jumps");
        }
    }
    Ok(())
}

/// Remove the accepts, the chain and its jump (for a full uninstall).
pub fn remove_forward_accept() -> Result<()> {
    for bin in tools() {
        let jump: &[&str] = &["-j", CHAIN];
        for rule in LEGACY_RULES.iter().copied().chain([jump]) {
            let mut del = vec!["-w", "5", "-D", "FORWARD"];
            del.extend_from_slice(rule);
            while run(bin, &del).is_some_and(|o| o.status.success()) {}
        }
        let _ = run(bin, &["-w", "5", "-F", CHAIN]);
        let _ = run(bin, &["-w", "5", "-X", CHAIN]);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const DOCKER20: &str = "-P FORWARD DROP
-A FORWARD -j DOCKER-USER
-A FORWARD -j DOCKER-ISOLATION-STAGE-1
-A FORWARD -o docker0 -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT
-A FORWARD -o docker0 -j DOCKER
-A FORWARD -i docker0 ! -o docker0 -j ACCEPT
";

    fn chain_ok() -> String {
        let mut s = format!("-N {CHAIN}\n");
        for r in RULES {
            s += &spec(CHAIN, r);
            s.push('\n');
        }
        s
    }

    #[test]
    fn ingress_connmark_is_the_load_balancers() {
        let m = ferrynet_model::lb::INGRESS_MARK;
        assert_eq!(INGRESS_CONNMARK, format!("{m:#x}/{m:#x}"));
    }

    #[test]
    fn fresh_docker_host_gets_chain_and_jump_after_docker_jumps() {
        let s = plan(DOCKER20, None).unwrap();
        assert!(s.starts_with("*filter\n:FERRYNET-FORWARD - [0:0]\n"), "{s}");
        assert!(s.contains("-A FERRYNET-FORWARD -o docker0 -j RETURN\n"));
        // Position 3: after DOCKER-USER (1) and DOCKER-ISOLATION-STAGE-1 (2).
        assert!(
            s.ends_with("-I FORWARD 3 -j FERRYNET-FORWARD\nCOMMIT\n"),
            "{s}"
        );
        // Docker bridges are returned before anything is accepted.
        let ret = s.find("-o br-+ -j RETURN").unwrap();
        assert!(ret < s.find("-i fn-+ -j ACCEPT").unwrap());
    }

    #[test]
    fn host_without_docker_gets_the_jump_first() {
        let s = plan("-P FORWARD DROP\n", None).unwrap();
        assert!(s.contains("-I FORWARD 1 -j FERRYNET-FORWARD\n"), "{s}");
    }

    #[test]
    fn nothing_to_do_when_in_place() {
        let fwd = "-P FORWARD DROP
-A FORWARD -j DOCKER-USER
-A FORWARD -j DOCKER-FORWARD
-A FORWARD -j FERRYNET-FORWARD
-A FORWARD -o docker0 -j DOCKER
";
        assert_eq!(plan(fwd, Some(&chain_ok())), None);
    }

    #[test]
    fn jump_above_a_reinserted_docker_user_is_moved_below_it() {
        // dockerd restarted: it put its jumps back at the top, but ours came first before.
        let fwd = "-P FORWARD DROP
-A FORWARD -j FERRYNET-FORWARD
-A FORWARD -j DOCKER-USER
-A FORWARD -j DOCKER-ISOLATION-STAGE-1
-A FORWARD -o docker0 -j DOCKER
";
        let s = plan(fwd, Some(&chain_ok())).unwrap();
        assert_eq!(
            s,
            "*filter\n-D FORWARD -j FERRYNET-FORWARD\n-I FORWARD 3 -j FERRYNET-FORWARD\nCOMMIT\n"
        );
    }

    #[test]
    fn legacy_top_accepts_and_duplicate_jumps_are_removed() {
        let fwd = "-A FORWARD -i fn-+ -j ACCEPT
-A FORWARD -o fn-+ -j ACCEPT
-A FORWARD -m connmark --mark 0x400000/0x400000 -j ACCEPT
-A FORWARD -j DOCKER-USER
-A FORWARD -j FERRYNET-FORWARD
-A FORWARD -j FERRYNET-FORWARD
";
        let s = plan(fwd, Some(&chain_ok())).unwrap();
        assert!(!s.contains(":FERRYNET-FORWARD"), "chain intact: {s}");
        assert!(s.contains("-D FORWARD -i fn-+ -j ACCEPT\n"));
        assert!(s.contains("-D FORWARD -o fn-+ -j ACCEPT\n"));
        assert!(s.contains("-D FORWARD -m connmark --mark 0x400000/0x400000 -j ACCEPT\n"));
        assert_eq!(s.matches("-D FORWARD -j FERRYNET-FORWARD\n").count(), 2);
        // What remains is DOCKER-USER alone: the jump goes right after it.
        assert!(
            s.ends_with("-I FORWARD 2 -j FERRYNET-FORWARD\nCOMMIT\n"),
            "{s}"
        );
    }

    #[test]
    fn altered_chain_is_refilled() {
        let tampered = format!("{}-A {CHAIN} -j ACCEPT\n", chain_ok());
        let fwd = "-A FORWARD -j FERRYNET-FORWARD\n";
        let s = plan(fwd, Some(&tampered)).unwrap();
        assert!(s.contains(":FERRYNET-FORWARD - [0:0]\n"));
        assert!(!s.contains("-I FORWARD"), "jump already fine: {s}");
    }
}
