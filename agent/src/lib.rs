//! The hitless node agent: loads the eBPF datapath, keeps it pinned, and mirrors the
//! registry into its maps in the one order that is safe for readers in the kernel.
//!
//! Modules, lowest first: [`abi`] (map layouts shared with the C datapath),
//! [`registry`] (the registry file), [`desired`] (what the maps should hold),
//! [`writer`] (the only writer of the maps), [`sys`] and [`cgroup`] (kernel
//! plumbing), [`loader`] (load, pin, attach, swap, detach), and the two sources of the
//! registry: [`static_mode`] (a file) and [`link`] (the coordinator); [`caps`] (the
//! capabilities checked before loading) and [`local_api`] (the node-local API for
//! instances hitless does not run).

pub mod abi;
pub mod apply;
pub mod caps;
pub mod cgroup;
pub mod desired;
pub mod driver;
pub mod inflight;
pub mod link;
pub mod loader;
pub mod local_api;
pub mod metrics;
pub mod outlier;
pub mod static_mode;
pub mod sys;
pub mod writer;

/// The registry file format, shared with the coordinator.
pub use hitless_model::registry;
