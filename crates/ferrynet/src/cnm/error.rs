//! Errors of the Docker plugin and how each is answered.

use crate::error::ControlError;

/// A failed plugin call.
#[derive(Debug, thiserror::Error)]
pub enum CnmError {
    /// The request could not be decoded (answered with HTTP 400, as the protocol asks).
    #[error("malformed request to {method}: {why}")]
    Malformed {
        /// The plugin method.
        method: String,
        /// What is wrong.
        why: String,
    },
    /// No such plugin method (answered with HTTP 404).
    #[error("ferrynet does not implement {0}")]
    UnknownMethod(String),
    /// The request is well-formed but asks for something ferrynet refuses.
    #[error("{0}")]
    Invalid(String),
    /// The request names a network, pool or endpoint ferrynet does not know.
    #[error("{0}")]
    NotFound(String),
    /// The control layer failed (store, IPAM, dataplane, firewall).
    #[error(transparent)]
    Control(#[from] ControlError),
}

impl From<ferrynet_store::StoreError> for CnmError {
    fn from(e: ferrynet_store::StoreError) -> Self {
        CnmError::Control(ControlError::Store(e))
    }
}

impl CnmError {
    /// The HTTP status: 400 and 404 for requests that cannot be served at all, else 200 with
    /// the error in the body (libnetwork reads `Err`/`Error` from a 200 answer).
    pub fn status(&self) -> u16 {
        match self {
            CnmError::Malformed { .. } => 400,
            CnmError::UnknownMethod(_) => 404,
            _ => 200,
        }
    }
}

/// Result alias for plugin handlers.
pub type Result<T> = std::result::Result<T, CnmError>;
