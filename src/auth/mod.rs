//! Who may connect and what each caller may do.
//!
//! A port that anyone can reach must not let anyone submit runs, silence a
//! check or take any lock. This module holds what decides that, apart from
//! the request path that enforces it ([`crate::middleware::auth`] and the
//! handlers):
//!
//! - [`tls`]: the listener's rustls configuration from PEM files, with
//!   client certificates required and verified when a client CA is given.
//! - [`principal`]: the principals of `VITALS_AUTH_FILE`, how a request's
//!   credentials name one (a bearer token's SHA-256, a client certificate's
//!   SAN), its scopes and namespaces, and the [`Access`] a handler checks.
//! - [`reload`]: reads those files again when they change (and on SIGHUP),
//!   keeping what was loaded before when a new version does not load.

pub mod principal;
pub mod reload;
pub mod tls;

pub use principal::{Access, Principal, Principals, Scope};
pub use tls::{PeerIdentity, TlsFiles, TlsSettings};
