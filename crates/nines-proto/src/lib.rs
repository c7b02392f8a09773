//! The nines wire protocol, generated from `proto/nines/v1/*.proto`.
//!
//! # Layout
//!
//! - `v1`: every message and service of version 1 of the API: the client `Kv`
//!   service, the `Admin` service and the internal `Raft` transport.

/// Version 1 of the nines API.
pub mod v1 {
    #![allow(missing_docs, clippy::all)]
    tonic::include_proto!("nines.v1");

    /// The encoded descriptors of every message and service, for gRPC
    /// reflection (`grpcurl list`).
    pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("nines_descriptor");
}

/// gRPC metadata keys that are part of the wire contract.
pub mod metadata {
    /// On an error: the gRPC address of the node believed to lead, so the
    /// client can retry there.
    pub const LEADER_HINT: &str = "nines-leader";
    /// On an error: present when the server guarantees the request had no
    /// effect, so it is safe to retry even if it is not idempotent.
    pub const RETRY_SAFE: &str = "nines-retry-safe";
    /// On an error: the write repeated a session write whose result is no
    /// longer kept; it was not applied again, and whether it applied before
    /// is unknown. Do not retry it.
    pub const SESSION_EXPIRED: &str = "nines-session-expired";
    /// On a request: how many times it has been forwarded between nodes.
    pub const FORWARDED: &str = "nines-forwarded";
}
