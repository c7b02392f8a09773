//! The gRPC services a node serves (the client ones on its client port,
//! Raft and shipments on its peer port), as thin adapters
//! over the [`crate::node::Node`] handle: each decodes a request (through
//! [`crate::convert`] and [`crate::validate`]), calls the node, and encodes
//! the answer.
//!
//! - [`kv`]: the client API (`nines.v1.Kv`).
//! - [`admin`]: bootstrap, membership and node status (`nines.v1.Admin`).
//! - [`region`]: region roles, the divergence record and the test fault
//!   hooks (`nines.v1.RegionAdmin`).
//! - [`replication`]: a peer region's shipments (`nines.v1.Replication`);
//!   the protocol is in [`crate::replication`].
//! - [`raft`]: the internal Raft transport (`nines.v1.Raft`).
//! - [`forward`]: forwarding a request to the leader.
//! - [`guard`]: admitting or refusing each call before a service sees it;
//!   [`shed`]: refusing client calls beyond the node's budget.
//!
//! A request that needs the leader and arrives at a follower is forwarded
//! once to the leader it knows; if none is known, or the request was already
//! forwarded, the caller gets `UNAVAILABLE` with a leader hint instead.

pub mod admin;
pub mod forward;
pub mod guard;
pub mod kv;
pub mod raft;
pub mod region;
pub mod replication;
pub mod shed;
