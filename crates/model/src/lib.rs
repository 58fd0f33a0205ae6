pub mod cni;
pub mod edge;
pub mod fabric;
pub mod ipam;
pub mod names;
pub mod network;
pub mod portmap;
