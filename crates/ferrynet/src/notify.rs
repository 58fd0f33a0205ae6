//! systemd's readiness protocol (`Type=notify`): `READY=1` once the service does its job,
//! `STOPPING=1` when it shuts down, `STATUS=` lines for `systemctl status`.
//!
//! One datagram to `$NOTIFY_SOCKET` (a path, or `@name` for an abstract socket), nothing when
//! the variable is unset. Written here rather than with the `sd-notify` crate because the send
//! must never block: the crate's socket is blocking, and a receiver that stops reading (a
//! stalled service manager, a test's socket) would then freeze the agent's loop once its queue
//! fills. Here a full queue drops the message, which only costs a status line.

use std::os::unix::net::{SocketAddr, UnixDatagram};

fn target() -> Option<SocketAddr> {
    let path = std::env::var_os("NOTIFY_SOCKET")?;
    let bytes = std::os::unix::ffi::OsStrExt::as_bytes(path.as_os_str());
    match bytes.strip_prefix(b"@") {
        Some(name) => {
            use std::os::linux::net::SocketAddrExt;
            SocketAddr::from_abstract_name(name).ok()
        }
        None => SocketAddr::from_pathname(&path).ok(),
    }
}

fn send(msg: &str) {
    let Some(addr) = target() else {
        return;
    };
    let sent = UnixDatagram::unbound().and_then(|s| {
        s.set_nonblocking(true)?;
        s.send_to_addr(msg.as_bytes(), &addr)
    });
    if let Err(e) = sent {
        // Readiness is advisory for us: a broken socket must not stop the network.
        tracing::warn!(error = %e, "could not notify the service manager");
    }
}

/// A status line without newlines (they would start a new assignment).
fn status_line(s: &str) -> String {
    format!("STATUS={}", s.replace('\n', " "))
}

/// The service is up: `READY=1` with a status line.
pub fn ready(status: &str) {
    send(&format!("READY=1\n{}\n", status_line(status)));
}

/// The service is shutting down: `STOPPING=1`.
pub fn stopping() {
    send("STOPPING=1\nSTATUS=stopping\n");
}

/// A status line for `systemctl status` (e.g. while the store is unreachable).
pub fn status(status: &str) {
    send(&format!("{}\n", status_line(status)));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_status_cannot_inject_an_assignment() {
        assert_eq!(status_line("a\nREADY=1"), "STATUS=a READY=1");
    }
}
