//! nines: a replicated key-value store. This crate is the node: storage,
//! Raft, the gRPC services and the `nines` command line.
//!
//! # Layout
//!
//! Modules by floor: each imports only modules on floors below it (a test,
//! `tests/layering.rs`, checks that no import goes up or round in a circle).
//!
//! Leaves, importing nothing else of the crate (or only other leaves):
//! - [`limits`]: every size and count limit, with its reason.
//! - [`hlc`]: the hybrid logical clock that stamps versions.
//! - [`types`]: openraft's type configuration, commands and results, and the
//!   domain types of shipments and lag.
//! - [`config`]: a node's configuration file.
//! - [`telemetry`]: Prometheus recorders.
//! - [`rpc`]: the wire-level gRPC client the node's own tools use (admin,
//!   replication, the controller, tests); applications use `nines-client`.
//!
//! Storage and the wire:
//! - [`storage`]: the Raft log and the state machine on redb, fsynced.
//! - [`error`]: the error type at the service boundary and its gRPC mapping.
//! - [`faults`]: test-only fault hooks (off unless configured).
//! - [`validate`]: checks of client and peer input against the limits.
//! - [`convert`]: every proto <-> domain conversion.
//! - [`network`]: the Raft transport client (tonic).
//! - [`view`]: the whole cluster as one document (status page, `nines status`).
//!
//! The node:
//! - [`reads`]: leadership confirmations shared by concurrent linearizable
//!   reads (imports only `error`).
//! - [`node`]: the handle every service holds (`Node`): propose, write,
//!   linearizable reads, roles, lag, readiness, the write batcher.
//! - [`authority`]: the lease and epoch records in the authority region.
//! - [`lease`]: the primary's lease, kept by the primary region's leader.
//! - [`replication`]: cross-region shipping and receiving, roles and divergence.
//! - [`controller`]: the failover controller's decision, a pure function.
//! - [`stance`]: what a node whose clock ran ahead does, a pure function.
//! - [`takeover`]: a follower that refuses a candidate for its older log
//!   stands for election at once.
//! - [`server`]: the gRPC services, thin adapters over the node.
//! - [`http`]: the admin HTTP port: probes, metrics, the status page.
//! - [`backup`]: snapshot backups to an object store, verify, retention,
//!   restore, and the scheduled backups of a region's leader.
//! - [`daemon`]: wires a node together, runs it and stops it.
//!
//! On top:
//! - [`cli`]: the `nines` command line, including `nines up`.

pub mod authority;
pub mod backup;
pub mod certs;
pub mod cli;
pub mod config;
pub mod controller;
pub mod convert;
pub mod daemon;
pub mod error;
pub mod events;
pub mod faults;
pub mod hlc;
pub mod http;
pub mod lease;
pub mod limits;
pub mod network;
pub mod node;
pub mod reads;
pub mod replication;
pub mod rpc;
pub mod server;
pub mod stance;
pub mod storage;
pub mod takeover;
pub mod telemetry;
pub mod tls;
pub mod token;
pub mod types;
pub mod validate;
pub mod view;
