//! The rules of the service, with no I/O.
//!
//! Everything that decides an outcome lives here as plain data and pure functions: what a status
//! is, which thresholds are acceptable, how runs become a status, and what a valid id looks like.
//! Keeping it free of the database, the wire format and the runtime means the rules can be tested
//! exhaustively (tables and properties), and the same rules serve every caller: the gRPC handlers,
//! the store and the configuration convert their own types into these and back.
//!
//! Dependencies point inward: other modules use `domain`; `domain` uses nothing else of ours.
//!
//! # Layout
//! - `status`: [`Status`], ordered by severity, and [`worst`].
//! - `thresholds`: [`Thresholds`] in their two modes, their defaults and their validation.
//! - `evaluation`: [`evaluate`], which turns the newest runs of a check into an [`Evaluation`].
//! - `window`: [`RunWindow`], a check's newest runs kept up to date one run at a time, so that a
//!   submission evaluates without reading the history.
//! - `dependencies`: [`find_cycle`], the rule that systems never depend on themselves.
//! - `flapping`: [`FlappingSettings`] and [`is_flapping`], a check's status-change count with
//!   hysteresis.
//! - `ids`: validated newtypes ([`SystemId`], [`LockKey`], ...) parsed where input enters.
//! - `maintenance`: [`MaintenanceWindow`]s, how they [`merge`], and the time they cover.
//! - `namespace`: [`Namespace`], the names one caller may touch.
//! - `latency`: [`Latency`], a run's reported duration, bounded and at the stored precision.
//! - `uptime`: [`UptimeCount`], a system's time per status from its transitions.
//! - `violation`: [`FieldViolation`], one reason an input was rejected.

mod dependencies;
mod evaluation;
mod flapping;
mod ids;
mod latency;
mod maintenance;
mod namespace;
mod status;
mod thresholds;
mod uptime;
mod violation;
mod window;

pub use dependencies::{MAX_DEPENDENCIES, find_cycle};
pub use evaluation::{Evaluation, MAX_RUNS_CONSIDERED, Rule, evaluate, system_status};
pub use flapping::{FlappingSettings, MIN_FLAPPING_RUNS, is_flapping, status_changes};
pub use ids::{CheckId, LockKey, Owner, RunId, RunMessage, SystemId};
pub use latency::{Latency, MAX_LATENCY};
pub use maintenance::{MAX_OPEN_WINDOWS, MAX_REASON_BYTES, MAX_WINDOW_AHEAD, MaintenanceWindow, covered, merge};
pub use namespace::{MAX_PATTERNS, Namespace, Pattern, Span, prefix_end};
pub use status::{Status, worst};
pub use thresholds::{ConsecutiveThresholds, MAX_WINDOW_SIZE, MIN_WINDOW_SIZE, Mode, Thresholds, WindowThresholds};
pub use uptime::{StatusChange, Uptime, UptimeCount};
pub use violation::FieldViolation;
pub use window::{Placement, RunWindow, WindowRun};
