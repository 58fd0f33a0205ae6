//! Names of links and objects: deterministic, within Linux's 15-byte interface name limit.

use sha2::{Digest, Sha256};

/// Errors for names and MAC addresses given by users.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NameError {
    /// A network or container name breaks the naming rule.
    #[error("invalid {what} name {name:?}: use 1-63 characters, letters, digits, '_', '.', '-', starting with a letter or digit (a DNS label: no empty part)")]
    BadName {
        /// "network" or "container".
        what: &'static str,
        /// The name given.
        name: String,
    },
    /// A MAC address that cannot be used.
    #[error("invalid MAC address {mac:?}: {why}")]
    BadMac {
        /// The text given.
        mac: String,
        /// What is wrong with it.
        why: &'static str,
    },
}

pub(crate) fn hash12(parts: &[&str]) -> String {
    let mut h = Sha256::new();
    for (i, p) in parts.iter().enumerate() {
        if i > 0 {
            h.update([0u8]);
        }
        h.update(p.as_bytes());
    }
    h.finalize()
        .iter()
        .take(6)
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn name_ok(name: &str, max: usize) -> bool {
    let mut chars = name.chars();
    match chars.next() {
        Some(c) if c.is_ascii_alphanumeric() => {}
        _ => return false,
    }
    // No empty dot-separated part: the name becomes DNS labels (`web.<network>.<domain>`).
    name.len() <= max
        && !name.contains("..")
        && !name.ends_with('.')
        && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'))
}

/// Bridge of a network: `fn-<name>` when the name is 1-12 of `[a-z0-9-]`, else `fn-` + a hash.
/// Every ferrynet bridge starts with `fn-`: firewall rules match on that prefix, and bridge
/// names read back from the store must pass [`crate::validate::check_bridge_name`].
pub fn bridge_name(network: &str) -> String {
    let plain = network
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
    if plain && name_ok(network, 12) {
        format!("fn-{network}")
    } else {
        format!("fn-{}", hash12(&[network]))
    }
}

/// Host end of a container's veth: a hash of (network, container, ifname), so a retried ADD or
/// a DEL without state finds the same link.
pub fn host_veth_name(network: &str, container_id: &str, ifname: &str) -> String {
    format!("fnv{}", hash12(&[network, container_id, ifname]))
}

/// IFB device of a container's egress bandwidth limit (traffic from the container is
/// redirected to it from the host end's ingress): `fnb` + the host end's hash, so a DEL or GC
/// without state finds it, and outside the `fnv*` (guarded ports) and `fn-*` (bridges) patterns.
pub fn ifb_name(network: &str, container_id: &str, ifname: &str) -> String {
    format!("fnb{}", hash12(&[network, container_id, ifname]))
}

/// Temporary name of the container end, before it moves into the netns and is renamed.
pub fn temp_peer_name(network: &str, container_id: &str, ifname: &str) -> String {
    format!("fnp{}", hash12(&[network, container_id, ifname]))
}

/// Check a network name: 1–63 of `[A-Za-z0-9_.-]`, starting with a letter or digit.
pub fn validate_network_name(name: &str) -> Result<(), NameError> {
    name_ok(name, 63).then_some(()).ok_or(NameError::BadName {
        what: "network",
        name: name.to_string(),
    })
}

/// Check a CLI container name (same rule as networks).
pub fn validate_container_name(name: &str) -> Result<(), NameError> {
    name_ok(name, 63).then_some(()).ok_or(NameError::BadName {
        what: "container",
        name: name.to_string(),
    })
}

/// Parse `aa:bb:cc:dd:ee:ff`; refuses multicast and all-zero addresses.
pub fn parse_mac(s: &str) -> Result<[u8; 6], NameError> {
    let bad = |why| NameError::BadMac {
        mac: s.to_string(),
        why,
    };
    let parts: Vec<&str> = s.trim().split(':').collect();
    if parts.len() != 6 {
        return Err(bad("expected six hex octets separated by ':'"));
    }
    let mut mac = [0u8; 6];
    for (o, p) in mac.iter_mut().zip(&parts) {
        if p.len() != 2 {
            return Err(bad("each octet is two hex digits"));
        }
        *o = u8::from_str_radix(p, 16).map_err(|_| bad("not hexadecimal"))?;
    }
    if mac[0] & 1 == 1 {
        return Err(bad("a multicast address cannot be an interface address"));
    }
    if mac == [0; 6] {
        return Err(bad("all zeros"));
    }
    Ok(mac)
}

/// Format a MAC as lowercase `aa:bb:cc:dd:ee:ff`.
pub fn format_mac(mac: &[u8; 6]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn bridge_names() {
        assert_eq!(bridge_name("blue"), "fn-blue");
        assert_eq!(bridge_name("abcdefghijkl"), "fn-abcdefghijkl");
        let long = bridge_name("abcdefghijklm");
        assert!(long.starts_with("fn-") && long.len() == 15);
        assert_ne!(bridge_name("-x"), "fn--x");
    }

    #[test]
    fn veth_names_are_deterministic_and_distinct() {
        let a = host_veth_name("n", "c", "eth0");
        assert_eq!(a, host_veth_name("n", "c", "eth0"));
        assert_ne!(a, host_veth_name("n", "c", "eth1"));
        assert_ne!(
            a,
            host_veth_name("nc", "", "eth0"),
            "separator must keep parts apart"
        );
        assert_ne!(&a[3..], &temp_peer_name("x", "c", "eth0")[3..]);
        assert!(a.starts_with("fnv") && temp_peer_name("n", "c", "eth0").starts_with("fnp"));
    }

    #[test]
    fn validates_names() {
        assert!(validate_network_name("blue-1.net_x").is_ok());
        for bad in ["", "-a", ".a", "a b", "a/b", &"x".repeat(64), "a..b", "a."] {
            assert!(validate_network_name(bad).is_err(), "{bad:?}");
        }
        assert!(validate_container_name("bad name")
            .unwrap_err()
            .to_string()
            .contains("container"));
    }

    #[test]
    fn macs() {
        assert_eq!(
            parse_mac("02:00:00:AA:bb:cc").unwrap(),
            [2, 0, 0, 0xaa, 0xbb, 0xcc]
        );
        assert_eq!(
            format_mac(&[2, 0, 0, 0xaa, 0xbb, 0xcc]),
            "02:00:00:aa:bb:cc"
        );
        for bad in [
            "01:00:00:00:00:01",
            "00:00:00:00:00:00",
            "02:00:00:00:00",
            "02:00:00:00:00:zz",
            "2:00:00:00:00:01",
        ] {
            assert!(parse_mac(bad).is_err(), "{bad}");
        }
    }

    proptest! {
        #[test]
        fn names_fit_in_ifnamsiz(net in ".{0,80}", cid in ".{0,80}", ifn in ".{0,20}") {
            prop_assert!(bridge_name(&net).len() <= 15);
            prop_assert!(host_veth_name(&net, &cid, &ifn).len() <= 15);
            prop_assert!(temp_peer_name(&net, &cid, &ifn).len() <= 15);
        }
    }
}
