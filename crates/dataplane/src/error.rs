//! Dataplane errors, each naming the object it concerns.

/// What went wrong in the kernel or around it.
#[derive(Debug, thiserror::Error)]
pub enum DataplaneError {
    /// A netlink request failed.
    #[error("{op}: {source}")]
    Netlink {
        /// The operation, with the object's name.
        op: String,
        /// The netlink error.
        source: rtnetlink::Error,
    },
    /// A file or socket operation failed.
    #[error("{op}: {source}")]
    Io {
        /// The operation.
        op: String,
        /// The I/O error.
        source: std::io::Error,
    },
    /// A system call failed.
    #[error("{op}: {source}")]
    Nix {
        /// The operation.
        op: String,
        /// The errno.
        source: nix::Error,
    },
    /// Something expected is missing.
    #[error("{0}")]
    NotFound(String),
    /// Something is in the way (a name already taken).
    #[error("{0}")]
    Conflict(String),
}

/// Result alias for the dataplane.
pub type Result<T> = std::result::Result<T, DataplaneError>;

/// The errno of a netlink error, if it is one (positive, e.g. 17 for EEXIST).
pub fn errno(e: &rtnetlink::Error) -> Option<i32> {
    match e {
        rtnetlink::Error::NetlinkError(m) => Some(m.raw_code().abs()),
        _ => None,
    }
}

/// Wrap a netlink error with the operation.
pub fn nl(op: impl Into<String>) -> impl FnOnce(rtnetlink::Error) -> DataplaneError {
    let op = op.into();
    move |source| DataplaneError::Netlink { op, source }
}

/// Wrap an I/O error with the operation.
pub fn io(op: impl Into<String>) -> impl FnOnce(std::io::Error) -> DataplaneError {
    let op = op.into();
    move |source| DataplaneError::Io { op, source }
}

/// Wrap a nix error with the operation.
pub fn sys(op: impl Into<String>) -> impl FnOnce(nix::Error) -> DataplaneError {
    let op = op.into();
    move |source| DataplaneError::Nix { op, source }
}
