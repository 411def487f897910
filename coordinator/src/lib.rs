//! The hitless rollout coordinator.
