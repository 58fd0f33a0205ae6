//! The Docker plugin's own records (pools, network bindings): the types and keys are in
//! `ferrynet_model::docker`, their reads and writes in `control::docker`.

pub use ferrynet_model::docker::*;
