//! The rollout engine: executes a plan through the agents, step by step, and can be
//! killed at any moment and resumed. [`decide`] is its pure core.

pub mod decide;
