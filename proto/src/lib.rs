//! The gRPC contract of hitless, package `hitless.v1`: the `Registry`, `AgentLink`
//! and `Coordinator` services, and the agent's node-local `Node` service. The `.proto`
//! files under `proto/hitless/v1/` are the contract; this crate is generated from them
//! at build time.

#![allow(clippy::all, missing_docs)]

/// Generated messages and services of `hitless.v1`.
pub mod v1 {
    tonic::include_proto!("hitless.v1");
}

/// The encoded `FileDescriptorSet` of every `.proto`, for gRPC reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("hitless_descriptor");
