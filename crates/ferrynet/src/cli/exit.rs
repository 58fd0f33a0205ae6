//! Exit codes: each failure class has its own, so scripts and service managers can tell a
//! typo from a missing container, a conflict, an unreachable store or a kernel refusal. The
//! typed errors below and the control layer's decide; `code` maps them at the edge.

use ferrynet_store::StoreError;

use crate::error::ControlError;

/// Any other failure.
pub const GENERIC: u8 = 1;
/// The command line is wrong (clap's own code for usage errors too).
pub const USAGE: u8 = 2;
/// A named network, container or record does not exist.
pub const NOT_FOUND: u8 = 3;
/// It exists already, or is in use (a host port, a running container, an address).
pub const CONFLICT: u8 = 4;
/// The store cannot be reached or used (etcd down, the embedded file unreadable).
pub const STORE: u8 = 5;
/// The kernel refused (netlink, nftables), or ferrynet lacks the privilege to ask it.
pub const SYSTEM: u8 = 6;

/// For `--help`: what each exit code means.
pub const HELP: &str = "\
Exit status:
  0  success (`exec`: the command's own status)
  1  any other error
  2  usage: a wrong flag, argument or value
  3  not found: no such network, container or record
  4  conflict: exists already or in use (name, address, host port, running container)
  5  store unreachable or unusable (etcd, the embedded store file)
  6  system: the kernel refused (netlink, nftables) or not running as root";

/// A CLI failure with its class, for errors the CLI itself detects.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    /// Something named does not exist.
    #[error("{0}")]
    NotFound(String),
    /// The request conflicts with what exists.
    #[error("{0}")]
    Conflict(String),
    /// The arguments are wrong in a way clap cannot see.
    #[error("{0}")]
    Usage(String),
    /// Not allowed: not root, or the kernel said no.
    #[error("{0}")]
    System(String),
}

fn store_code(e: &StoreError) -> u8 {
    match e {
        StoreError::Unavailable(_) | StoreError::Io(_) => STORE,
        _ => GENERIC,
    }
}

fn control_code(e: &ControlError) -> u8 {
    match e {
        ControlError::UnknownContainer(_) => NOT_FOUND,
        ControlError::AlreadyExists(_)
        | ControlError::PortInUse(_)
        | ControlError::PortsPublished(_)
        | ControlError::IfaceExists(_) => CONFLICT,
        ControlError::Store(s) => store_code(s),
        ControlError::Dataplane { .. } | ControlError::Firewall { .. } => SYSTEM,
        ControlError::Io { source, .. }
            if source.kind() == std::io::ErrorKind::PermissionDenied =>
        {
            SYSTEM
        }
        _ => GENERIC,
    }
}

/// The exit code for `err`: the first typed cause in its chain decides.
pub fn code(err: &anyhow::Error) -> u8 {
    for cause in err.chain() {
        if let Some(e) = cause.downcast_ref::<CliError>() {
            return match e {
                CliError::NotFound(_) => NOT_FOUND,
                CliError::Conflict(_) => CONFLICT,
                CliError::Usage(_) => USAGE,
                CliError::System(_) => SYSTEM,
            };
        }
        if let Some(e) = cause.downcast_ref::<ControlError>() {
            return control_code(e);
        }
        if let Some(e) = cause.downcast_ref::<StoreError>() {
            return store_code(e);
        }
        if cause
            .downcast_ref::<ferrynet_dataplane::error::DataplaneError>()
            .is_some()
            || cause
                .downcast_ref::<ferrynet_dataplane::nft::NftError>()
                .is_some()
        {
            return SYSTEM;
        }
        if let Some(e) = cause.downcast_ref::<std::io::Error>() {
            if e.kind() == std::io::ErrorKind::PermissionDenied {
                return SYSTEM;
            }
        }
    }
    GENERIC
}

/// Shorthand: a not-found error.
pub fn not_found(msg: impl Into<String>) -> anyhow::Error {
    CliError::NotFound(msg.into()).into()
}

/// Shorthand: a conflict error.
pub fn conflict(msg: impl Into<String>) -> anyhow::Error {
    CliError::Conflict(msg.into()).into()
}

#[cfg(test)]
mod tests {
    use super::*;
    use anyhow::Context;

    #[test]
    fn the_first_typed_cause_decides() {
        let e = anyhow::Error::from(ControlError::Store(StoreError::Unavailable("down".into())))
            .context("listing networks");
        assert_eq!(code(&e), STORE);
        let e = Err::<(), _>(ControlError::PortInUse("8080".into()))
            .context("running web")
            .unwrap_err();
        assert_eq!(code(&e), CONFLICT);
        assert_eq!(code(&not_found("no container named x")), NOT_FOUND);
        assert_eq!(code(&anyhow::anyhow!("something else")), GENERIC);
        let denied = std::io::Error::from(std::io::ErrorKind::PermissionDenied);
        assert_eq!(
            code(&anyhow::Error::from(denied).context("opening")),
            SYSTEM
        );
    }

    #[test]
    fn every_code_is_documented_once() {
        for c in [GENERIC, USAGE, NOT_FOUND, CONFLICT, STORE, SYSTEM] {
            assert_eq!(
                HELP.lines()
                    .filter(|l| l.trim_start().starts_with(&format!("{c} ")))
                    .count(),
                1,
                "code {c}"
            );
        }
    }
}
