//! Network policy: label selectors, policy documents, the verdict on a connection, and its
//! nft encoding (see docs/POLICY.md).

pub mod document;
pub mod render;
pub mod selector;
pub mod verdict;

pub use document::{parse_documents, Action, Peer, Policy, PortRange, Proto, Rule};
pub use selector::Selector;
pub use verdict::{
    decide, Decision, Direction, EndpointIndex, Interner, Labels, PolicyBook, PolicyEndpoint,
    Verdict,
};
