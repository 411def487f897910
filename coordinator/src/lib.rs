//! The hitless rollout coordinator's brain: strategies as pure transitions, and the
//! fix-point planner that chains them into a plan, with the plan's renderings. The
//! `hitless` binary is the command line over it.

pub mod planner;
pub mod render;
pub mod strategy;
pub mod target;

pub use planner::{plan, Plan, PlanError, Step};
pub use strategy::{Amount, Gate, GateSpec, Order, Strategy, Transition};
pub use target::Target;
