//! The instance driver: runs a node's instances as processes (being written; see the
//! issue on instances and the rollout engine).
