//! The one integration-test binary: every test starts a real vitals on port 0
//! against a fresh database. The HealthCheckService and LockService tests run
//! each body twice, on PostgreSQL and on the embedded store
//! ([`harness::both_backends!`]); tests of PostgreSQL itself (pools, sessions,
//! outages, replicas) run on PostgreSQL only.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, unreachable_pub, dead_code)]

#[macro_use]
mod harness;

mod audit;
mod auth;
mod bad_input;
mod cluster;
mod db_tls;
mod edge;
mod elections;
mod embedded;
mod faults;
mod foundation;
mod health_features;
mod health_service;
mod limits;
mod lock_capacity;
mod lock_faults;
mod lock_inventory;
mod lock_modes;
mod lock_service;
mod metrics;
mod pki;
mod probe;
mod proxy;
mod raw_h2;
mod round_trips;
mod tls;
mod traces;
mod upgrade;
mod watchers;
mod withlock;
mod write_groups;
