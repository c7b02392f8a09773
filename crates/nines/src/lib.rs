//! nines: a replicated key-value store. This crate is the node: storage,
//! Raft, the gRPC services and the `nines` command line.
//!
//! # Layout
//!
//! - [`limits`]: every size and count limit, with its reason.
//! - [`hlc`]: the hybrid logical clock that stamps versions.
//! - [`types`]: openraft's type configuration: commands, results, members.
//! - [`storage`]: the Raft log and the state machine on sled.
//! - [`network`]: the Raft transport client (tonic).
//! - [`server`]: the gRPC services (client `Kv`, `Admin`, internal `Raft`).
//! - [`http`]: the admin HTTP port: probes, metrics, the status page.
//! - [`telemetry`]: Prometheus metrics.
//! - [`config`]: a node's configuration file.
//! - [`node`]: wires a node together, runs it and stops it.
//! - [`replication`]: cross-region shipping, roles and divergence.
//! - [`faults`]: test-only fault hooks (off unless configured).
//! - [`error`]: the error type at the service boundary and its gRPC mapping.
//! - [`view`]: the whole cluster as one document (status page, `nines status`).
//! - [`cli`]: the `nines` command line, including `nines up`.

pub mod cli;
pub mod config;
pub mod error;
pub mod faults;
pub mod hlc;
pub mod http;
pub mod limits;
pub mod network;
pub mod node;
pub mod replication;
pub mod server;
pub mod storage;
pub mod telemetry;
pub mod types;
pub mod view;
