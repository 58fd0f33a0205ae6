//! The control layer's errors, each mapped to a CNI error code.

use ferrynet_model::cni::CniError;
use ferrynet_store::StoreError;

/// Plugin-specific CNI codes (the spec reserves 0–99).
pub mod codes {
    /// No free address, or a requested address is taken or outside the pool.
    pub const IPAM: u32 = 100;
    /// A requested host port is already published.
    pub const PORT_IN_USE: u32 = 101;
    /// A netlink operation failed (link, address, route).
    pub const DATAPLANE: u32 = 102;
    /// An nftables transaction failed.
    pub const FIREWALL: u32 = 103;
    /// The interface name already exists in the container.
    pub const IFACE_EXISTS: u32 = 104;
    /// CHECK found the container's network different from what was set up.
    pub const CHECK_FAILED: u32 = 105;
}

/// What can go wrong while attaching or detaching containers and managing networks.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    /// The configuration or a request is invalid.
    #[error("{0}")]
    InvalidConfig(String),
    /// The store is unavailable; retry later.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// A record to be created exists already (or a compare failed on a concurrent create).
    #[error("{0}")]
    AlreadyExists(String),
    /// An endpoint publishes other ports than the ones asked for.
    #[error("{0}")]
    PortsPublished(String),
    /// A concurrent call for the same container replaced the record this call was working on
    /// (a DEL and a re-ADD racing it); the runtime should retry.
    #[error("{0}")]
    Superseded(String),
    /// Address management failed.
    #[error("{0}")]
    Ipam(String),
    /// A host port is already published by another container.
    #[error("{0}")]
    PortInUse(String),
    /// Kernel networking failed.
    #[error("{context}: {source}")]
    Dataplane {
        /// What was being done.
        context: String,
        /// The dataplane error.
        source: ferrynet_dataplane::error::DataplaneError,
    },
    /// nftables failed.
    #[error("{context}: {source}")]
    Firewall {
        /// What was being done.
        context: String,
        /// The nft error.
        source: ferrynet_dataplane::nft::NftError,
    },
    /// The interface already exists in the container's namespace.
    #[error("{0}")]
    IfaceExists(String),
    /// No such container/endpoint.
    #[error("{0}")]
    UnknownContainer(String),
    /// CHECK found a difference.
    #[error("{0}")]
    CheckFailed(String),
    /// A file could not be read or written.
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: String,
        /// The I/O error.
        source: std::io::Error,
    },
    /// Stored data could not be decoded.
    #[error("corrupt record {key}: {source}")]
    Decode {
        /// The store key.
        key: String,
        /// The JSON error.
        source: serde_json::Error,
    },
    /// A trace request names nothing known, or its destination is malformed.
    #[error(transparent)]
    Trace(#[from] ferrynet_model::trace::TraceError),
    /// A stored record decoded but breaks the rules for names, addresses or ports.
    #[error("rejected record {key}: {source}")]
    Rejected {
        /// The store key.
        key: String,
        /// What is wrong with it.
        source: ferrynet_model::validate::RecordError,
    },
}

impl ControlError {
    /// Wrap a dataplane error with what was being done.
    pub fn dataplane(
        context: impl Into<String>,
    ) -> impl FnOnce(ferrynet_dataplane::error::DataplaneError) -> ControlError {
        let context = context.into();
        move |source| ControlError::Dataplane { context, source }
    }
    /// Wrap an nft error with what was being done.
    pub fn firewall(
        context: impl Into<String>,
    ) -> impl FnOnce(ferrynet_dataplane::nft::NftError) -> ControlError {
        let context = context.into();
        move |source| ControlError::Firewall { context, source }
    }
    /// Wrap an I/O error with what was being done.
    pub fn io(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> ControlError {
        let context = context.into();
        move |source| ControlError::Io { context, source }
    }

    /// The CNI error object for this failure.
    pub fn to_cni(&self) -> CniError {
        let msg = self.to_string();
        match self {
            ControlError::InvalidConfig(_)
            | ControlError::Trace(_)
            | ControlError::AlreadyExists(_)
            | ControlError::PortsPublished(_) => CniError::invalid_config(msg),
            ControlError::Store(StoreError::Unavailable(_)) | ControlError::Superseded(_) => {
                CniError::try_again_later(msg)
            }
            ControlError::Store(_) => CniError::io(msg),
            ControlError::Ipam(_) => CniError::plugin(codes::IPAM, msg),
            ControlError::PortInUse(_) => CniError::plugin(codes::PORT_IN_USE, msg),
            ControlError::Dataplane { .. } => CniError::plugin(codes::DATAPLANE, msg),
            ControlError::Firewall { .. } => CniError::plugin(codes::FIREWALL, msg),
            ControlError::IfaceExists(_) => CniError::plugin(codes::IFACE_EXISTS, msg),
            ControlError::UnknownContainer(_) => CniError::unknown_container(msg),
            ControlError::CheckFailed(_) => CniError::plugin(codes::CHECK_FAILED, msg),
            ControlError::Io { .. } => CniError::io(msg),
            ControlError::Decode { .. } | ControlError::Rejected { .. } => CniError::io(msg),
        }
    }
}

/// Result alias for the control layer.
pub type Result<T> = std::result::Result<T, ControlError>;
