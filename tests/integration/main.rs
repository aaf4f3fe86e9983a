//! The one integration-test binary: every test starts a real vitals on port 0
//! against a fresh PostgreSQL database.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, unreachable_pub, dead_code)]

mod bad_input;
mod edge;
mod faults;
mod foundation;
mod harness;
mod health_service;
mod lock_service;
mod probe;
mod proxy;
