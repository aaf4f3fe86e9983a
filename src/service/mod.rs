//! Use cases: what vitals does for a request once its handler has parsed it.
//!
//! A handler in [`crate::api`] parses the wire request into domain values,
//! calls one method here and converts what it returns. How a request is
//! carried out lives here, written once whichever RPC (or test) asks: which
//! lock comes before which work connection, what is logged, what an unknown
//! system means, how a page knows another follows. Nothing here knows the
//! wire types, so the rules can be read, and tested, without gRPC.

pub mod health;

pub use health::{HealthService, Page};
