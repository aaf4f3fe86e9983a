//! vitals: health-check evaluation and distributed advisory locks over gRPC.
//!
//! Services submit health-check runs; vitals stores them, evaluates each
//! system's health with thresholds and emits every status change exactly
//! once, however many replicas and duplicate deliveries there are. Other
//! services take distributed locks with fencing tokens through one streaming
//! RPC whose lifetime is the critical section.
//!
//! # Layout
//! - [`proto`]: the generated contract (`proto/vitals/v1/*.proto`), encoded
//!   by [`codec`] (prost with small per-stream buffers).
//! - [`config`]: every setting, its default and validation.
//! - [`domain`]: pure rules: statuses, thresholds, evaluation, validated ids.
//! - [`db`]: the database: PostgreSQL's two pools (work, lock) and their
//!   session settings, or the embedded SQLite store of a single replica.
//! - [`store`]: persistence of runs, checks, health and transitions, one
//!   interface over a PostgreSQL and an embedded implementation, whose writes
//!   follow one path (load, decide in [`domain`], write) over the statements
//!   each backend implements; and the
//!   one feed per replica that reads new transitions once and hands them
//!   to every WatchTransitions watcher.
//! - [`lock`]: the lock manager: fair in-process queues, and with PostgreSQL
//!   session-level advisory locks held many per session on the lock
//!   sessions, fencing tokens, leases under faults.
//! - [`service`]: the use cases the handlers call: submit a run or
//!   configure a check under its system's lock, read health, page through
//!   runs and transitions, watch transitions.
//! - [`api`]: the tonic handlers, thin: parse, call, convert.
//! - [`middleware`]: the one tower stack in front of the services.
//! - [`auth`]: TLS settings and their reload, principals, scopes and
//!   namespaces (enforced by [`middleware`] and the handlers; the namespace
//!   type is [`domain::Namespace`], which listings read as index ranges).
//! - [`listener`]: the listening sockets: the connection cap, TCP_NODELAY
//!   and the TLS handshake, before HTTP/2.
//! - [`error`]: the one error enum (causes kept as sources) and its mapping
//!   to gRPC statuses.
//! - [`probe`]: `vitals probe`, a one-shot grpc.health.v1 check.
//! - [`telemetry`]: log set-up (`RUST_LOG`, text or JSON lines), the
//!   Prometheus metrics and their `/metrics` endpoint, OTLP traces.
//! - [`app`]: the server as a value tests start on port 0.
//!
//! Dependencies point inward: `api` parses into `domain` values, calls
//! `service` (or, for WithLock, the lock manager directly: one call per
//! stream message) and reads the request deadline [`middleware`] hands it;
//! `service` uses `store` and `lock`; `store` and `lock` use `domain`;
//! `domain` uses nothing of ours. A request takes its lock (from the lock
//! manager) before a work connection, never the reverse, and [`service`] is
//! where that order is written. Only [`db`], [`store`] and [`lock`] know
//! which backend runs ([`app`] opens it).

pub mod api;
pub mod app;
pub mod auth;
pub mod codec;
pub mod config;
pub mod db;
pub mod domain;
pub mod error;
pub mod listener;
pub mod lock;
pub mod middleware;
pub mod probe;
pub mod service;
pub mod store;
pub mod telemetry;

/// The generated `vitals.v1` types, clients and servers.
#[allow(unreachable_pub, missing_docs, clippy::all, clippy::pedantic)]
pub mod proto {
    tonic::include_proto!("vitals.v1");

    /// The encoded descriptor set served by reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("vitals_descriptor");
}

pub use app::Application;
pub use config::Config;
