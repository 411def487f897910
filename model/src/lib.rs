//! The architecture model of hitless: what should run (the architecture file, typed and
//! validated as a whole) and what runs now (the cluster of instance groups).
//!
//! Everything here is pure: no I/O, no clock. Callers read files and hand the text to
//! [`Architecture::parse`]; the planner and the engine work on [`Cluster`] values.

mod architecture;
mod cluster;
mod decode;
mod duration;
mod error;
pub mod registry;
mod validate;

pub use architecture::{Architecture, Health, PreStop, RunSpec, Service};
pub use cluster::{Cluster, Group, Instance, InstanceState, ServiceState, DEFAULT_WEIGHT};
pub use duration::{Duration, DurationError};
pub use error::{short_key, FieldError, ModelError, Quoted};
