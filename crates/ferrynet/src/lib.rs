//! ferrynet as a library: the binary's modules, also reachable from the fuzz targets
//! (`fuzz/`) and other tools. The binary (`main.rs`) only picks CNI or CLI mode.

pub mod agent;
pub mod cli;
pub mod cni;
pub mod cnm;
pub mod container;
pub mod control;
pub mod error;
pub mod failpoint;
pub mod feed;
pub mod logging;
pub mod notify;
pub mod render;
