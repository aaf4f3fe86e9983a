//! The gRPC handlers: convert wire types to domain types, call the use cases
//! ([`crate::service`]) or the lock service, convert back. Errors are mapped
//! once, by `From<Error> for Status` in [`crate::error`].

mod convert;
mod health;
mod lock;
mod page_token;

pub use health::HealthApi;
pub use lock::LockApi;
pub use page_token::PageTokenKey;
