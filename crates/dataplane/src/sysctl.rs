//! Kernel parameters under /proc/sys. The `net` subtree follows the network namespace of the
//! thread that opens the file, so callers run this in the namespace they mean.

use crate::error::{io, sys, Result};

/// The /proc/sys path of a key: either `net.ipv4.ip_forward` or, when a component (an interface
/// name) may contain dots, the path form `net/ipv4/conf/fn-a.b/route_localnet`.
pub fn path_of(key: &str) -> String {
    if key.contains('/') {
        format!("/proc/sys/{key}")
    } else {
        format!("/proc/sys/{}", key.replace('.', "/"))
    }
}

/// Read a value (trimmed).
pub fn get(key: &str) -> Result<String> {
    let p = path_of(key);
    Ok(std::fs::read_to_string(&p)
        .map_err(io(format!("reading {p}")))?
        .trim()
        .to_string())
}

/// Write a value unless it is already set.
pub fn set(key: &str, value: &str) -> Result<()> {
    if get(key).map(|v| v == value).unwrap_or(false) {
        return Ok(());
    }
    let p = path_of(key);
    std::fs::write(&p, value).map_err(io(format!("writing {value} to {p}")))
}

/// Make /proc/sys writable where it is mounted read-only (Docker runs managed plugins so):
/// remount it read-write in this mount namespace. Ok(true) when it was read-only and now is
/// not, Ok(false) when it was writable already.
pub fn ensure_writable() -> Result<bool> {
    use nix::mount::{mount, MsFlags};
    use nix::sys::statvfs::{statvfs, FsFlags};
    let st = statvfs("/proc/sys").map_err(sys("checking /proc/sys"))?;
    if !st.flags().contains(FsFlags::ST_RDONLY) {
        return Ok(false);
    }
    mount(
        None::<&str>,
        "/proc/sys",
        None::<&str>,
        MsFlags::MS_REMOUNT | MsFlags::MS_BIND,
        None::<&str>,
    )
    .map_err(sys("remounting /proc/sys read-write"))?;
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths() {
        assert_eq!(
            path_of("net.ipv4.ip_forward"),
            "/proc/sys/net/ipv4/ip_forward"
        );
        assert_eq!(
            path_of("net/ipv4/conf/fn-a.b/route_localnet"),
            "/proc/sys/net/ipv4/conf/fn-a.b/route_localnet"
        );
    }

    #[test]
    fn set_and_get_in_a_private_netns() {
        let host_before = get("net.ipv4.ip_forward").unwrap();
        let (after_zero, after_one) = std::thread::spawn(|| {
            nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET)
                .expect("unshare (run as root)");
            set("net.ipv4.ip_forward", "0").unwrap();
            let zero = get("net.ipv4.ip_forward").unwrap();
            set("net.ipv4.ip_forward", "1").unwrap();
            (zero, get("net.ipv4.ip_forward").unwrap())
        })
        .join()
        .unwrap();
        assert_eq!((after_zero.as_str(), after_one.as_str()), ("0", "1"));
        // The writes stayed in the thread's namespace.
        assert_eq!(get("net.ipv4.ip_forward").unwrap(), host_before);
    }
}
