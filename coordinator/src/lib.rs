//! The hitless rollout coordinator: strategies as pure transitions and the fix-point
//! planner that chains them into a plan (pure), the rollout engine, the built-in registry
//! with its durable store, and the gRPC server agents and the CLI talk to. The `hitless`
//! binary (the `hitless-cli` crate) is the command line over it.

pub mod engine;
pub mod planner;
pub mod registry;
pub mod server;
pub mod store;
pub mod strategy;
pub mod target;

pub use planner::{plan, Plan, PlanError, Step};
pub use strategy::{Amount, Gate, GateSpec, Inconclusive, Order, Strategy, Transition};
pub use target::Target;
