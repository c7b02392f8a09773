//! nines-jepsen: a Jepsen-like fault-injection harness for nines.
//!
//! A run starts a real cluster of node processes, drives concurrent clients
//! while a nemesis injects faults on a seeded schedule, heals everything,
//! reads the final state, checks the history and writes a report. See
//! `jepsen-like-tests/README.md` for the commands and what each run found.
//!
//! # Layout
//!
//! - `cluster`: the nodes of one run (start, kill, pause, probe): processes
//!   on loopback, or the compose cluster's containers (`--docker`).
//! - `compose`: the compose cluster, driven through the `docker` command.
//! - `nemesis`: the faults and their schedule.
//! - `workload`: the `register`, `set` and `lww` clients and final reads.
//! - `history`: operations as recorded, and `history.jsonl`.
//! - `checker`: linearizability (Wing-Gong-Lowe), set and convergence checks.
//! - `report`: `results.json`, the plots and `index.html`; RPO and RTO.
//! - `run`: one run from start to verdict; `suite`: every nemesis against
//!   every workload, as a table.

pub mod checker;
pub mod cluster;
pub mod compose;
pub mod history;
pub mod nemesis;
pub mod report;
pub mod run;
pub mod suite;
pub mod workload;
