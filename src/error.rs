//! The one error type of vitals and its one mapping to a gRPC status.
//!
//! Every failure a client can see is a variant here; each variant documents
//! the code and `ErrorInfo.reason` it produces. Database and internal errors
//! keep their cause (as `source()`, and in their `Display`, which is what the
//! log shows); they are logged where they are mapped and never sent: the
//! client gets the reason, not our SQL.

use std::collections::HashMap;

use tonic::{Code, Status};
use tonic_types::{ErrorDetails, StatusExt};

use crate::domain::FieldViolation;

/// `ErrorInfo.domain` of every vitals error.
pub const ERROR_DOMAIN: &str = "vitals.dev";

/// Which pool a connection was wanted from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PoolKind {
    /// The work pool: reads and writes.
    Work,
    /// The lock pool: advisory lock holders.
    Lock,
}

/// What a principal was refused, for [`Error::PermissionDenied`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("principal {principal:?} lacks {missing}")]
pub struct Denied {
    /// The principal's name.
    pub principal: String,
    /// What it lacks.
    pub missing: Missing,
}

/// The scope or the resource a principal lacks.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Missing {
    /// The RPC's scope (`health.read`, ...).
    #[error("scope {0}")]
    Scope(&'static str),
    /// A system outside the principal's `systems`.
    #[error("access to system {0:?}")]
    System(String),
    /// A lock key outside the principal's `lock_keys`.
    #[error("access to lock key {0:?}")]
    LockKey(String),
}

/// Everything that can go wrong in a request.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// INVALID_ARGUMENT, reason `INVALID_ARGUMENT`, with a `BadRequest` listing every violation.
    #[error("invalid argument")]
    InvalidArgument(Vec<FieldViolation>),

    /// FAILED_PRECONDITION, reason `LOCK_PROTOCOL_VIOLATION`: a WithLock message out of order.
    #[error("lock protocol violation: {0}")]
    LockProtocol(FieldViolation),

    /// NOT_FOUND, reason `SYSTEM_NOT_FOUND`.
    #[error("system not found")]
    SystemNotFound {
        /// The system asked for.
        system_id: String,
    },

    /// FAILED_PRECONDITION, reason `TOO_MANY_CHECKS`, with a `PreconditionFailure`: the run or
    /// the configuration would add a check to a system that has `VITALS_MAX_CHECKS_PER_SYSTEM`.
    #[error("too many checks")]
    TooManyChecks {
        /// The system.
        system_id: String,
        /// The most checks a system may have.
        limit: u32,
    },

    /// FAILED_PRECONDITION, reason `TOO_MANY_MAINTENANCE_WINDOWS`, with a `PreconditionFailure`:
    /// the system would have more than 100 open and upcoming maintenance windows.
    #[error("too many maintenance windows")]
    TooManyWindows {
        /// The system.
        system_id: String,
        /// The most open and upcoming windows a system may have.
        limit: usize,
    },

    /// ALREADY_EXISTS, reason `RUN_ID_CONFLICT`: the run_id is stored in the system with other content.
    #[error("run id conflict")]
    RunConflict {
        /// The reused run id.
        run_id: String,
    },

    /// ABORTED, reason `LOCK_NOT_AVAILABLE`: the lock was not granted within the wait.
    #[error("lock not available")]
    LockNotAvailable {
        /// The client's key.
        key: String,
    },

    /// FAILED_PRECONDITION, reason `LOCK_MODE_MISMATCH`, metadata `key` and
    /// `held_as`: the key is in use here as a semaphore of another size, or
    /// as a semaphore by an acquire of a plain lock (or the other way round).
    #[error("lock mode mismatch")]
    LockModeMismatch {
        /// The client's key.
        key: String,
        /// How the key is in use: `exclusive or shared`, or `semaphore of N`.
        held_as: String,
    },

    /// NOT_FOUND, reason `LOCK_NOT_HELD`, metadata `key`: GetLock of a key
    /// nobody holds or waits for.
    #[error("lock not held")]
    LockNotHeld {
        /// The client's key.
        key: String,
    },

    /// ABORTED, reason `LOCK_LOST`: the lease ran out or the lock connection died.
    #[error("lock lost")]
    LockLost {
        /// The client's key.
        key: String,
        /// Why, for the client.
        why: &'static str,
    },

    /// ABORTED, reason `WATCHER_TOO_SLOW`: a WatchTransitions client fell behind and was ended;
    /// it resumes with `after_sequence` = the `last_sequence` in the metadata.
    #[error("watcher too slow")]
    WatcherTooSlow {
        /// The last sequence the stream delivered (or the one it resumed after).
        last_sequence: u64,
    },

    /// UNAVAILABLE, reason `WORK_POOL_EXHAUSTED` or `LOCK_POOL_EXHAUSTED`.
    #[error("{0:?} pool exhausted")]
    PoolExhausted(PoolKind),

    /// UNAVAILABLE, reason `LOCK_LIMIT_REACHED`: `VITALS_MAX_LOCKS` client locks are held or awaited on this replica.
    #[error("lock limit reached")]
    LockLimitReached,

    /// RESOURCE_EXHAUSTED, reason `WATCHER_LIMIT_REACHED`: `VITALS_MAX_WATCHERS` watch streams are open on this replica.
    #[error("watcher limit reached")]
    WatcherLimitReached,

    /// UNAVAILABLE, reason `LOCK_CAPACITY_EXHAUSTED`: PostgreSQL's shared lock table is full.
    #[error("lock capacity exhausted")]
    LockCapacityExhausted,

    /// UNAVAILABLE, reason `SYSTEM_BUSY`: a system's serialisation lock was not granted in time.
    #[error("system busy")]
    SystemBusy {
        /// The system whose lock timed out.
        system_id: String,
    },

    /// UNAVAILABLE, reason `DATABASE_UNAVAILABLE`: the database cannot be reached or is not ready.
    #[error("database unavailable")]
    DatabaseUnavailable(#[source] Option<sqlx::Error>),

    /// UNAVAILABLE, reason `SHUTTING_DOWN`.
    #[error("shutting down")]
    ShuttingDown,

    /// RESOURCE_EXHAUSTED, reason `OVERLOADED`: `VITALS_MAX_CONCURRENT_REQUESTS` business RPCs are in flight.
    #[error("overloaded")]
    Overloaded,

    /// DEADLINE_EXCEEDED, reason `DEADLINE_EXCEEDED`, metadata `deadline_ms`: the unary RPC's deadline passed.
    #[error("deadline exceeded after {after:?}")]
    DeadlineExceeded {
        /// The deadline the RPC had, from its start.
        after: std::time::Duration,
    },

    /// RESOURCE_EXHAUSTED, reason `REQUEST_TOO_LARGE`: a request message declares more than `VITALS_MAX_REQUEST_BYTES`.
    #[error("request message too large")]
    RequestTooLarge,

    /// INVALID_ARGUMENT, reason `MALFORMED_REQUEST`: the request is not a sequence of protobuf messages.
    #[error("malformed request: {0}")]
    MalformedRequest(&'static str),

    /// UNAUTHENTICATED, reason `UNAUTHENTICATED`: authentication is on and the
    /// request carries no credentials, or none that name a principal.
    #[error("unauthenticated")]
    Unauthenticated,

    /// PERMISSION_DENIED, reason `PERMISSION_DENIED`, metadata `principal`
    /// and the missing `scope` or the refused `system_id` or `key`.
    #[error("permission denied: {0}")]
    PermissionDenied(Denied),

    /// INTERNAL, reason `INTERNAL`: the database failed in a way that is no
    /// outage (a constraint, a type mismatch, a missing table). Logged, never sent.
    #[error("database error: {0}")]
    Database(#[source] sqlx::Error),

    /// INTERNAL, reason `INTERNAL`: the migrations cannot be applied (one is
    /// missing, changed or failed to parse). Logged, never sent.
    #[error("migration failed: {0}")]
    Migrate(#[source] sqlx::migrate::MigrateError),

    /// INTERNAL, reason `INTERNAL`: a stored value vitals cannot read back.
    /// Logged with what was read, never sent.
    #[error("corrupt stored data: {0}")]
    Corrupt(#[from] Corrupt),

    /// INTERNAL, reason `INTERNAL`: the transition feed task ended without a
    /// shutdown (a bug); watchers end with this rather than wait on nothing.
    #[error("the transition feed stopped")]
    FeedStopped,

    /// INTERNAL, reason `INTERNAL`: something vitals relies on did not hold
    /// (a bug). Says which. Logged, never sent.
    #[error("broken invariant: {0}")]
    Invariant(&'static str),
}

/// A stored value that does not decode, with what was read: the rows were
/// written by vitals, so this is a bug or someone else's write.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Corrupt {
    /// A status column outside the known statuses.
    #[error("stored status {0} is not a status")]
    Status(i64),
    /// A time column outside what a timestamp can hold.
    #[error("stored time {0} (microseconds) is out of range")]
    Time(i64),
    /// A thresholds column that does not decode.
    #[error("stored thresholds {0:?} do not decode")]
    Thresholds(String),
    /// An evaluation column that does not decode.
    #[error("stored evaluation {0:?} does not decode")]
    Evaluation(String),
    /// A check's flapping settings that do not decode.
    #[error("stored flapping settings {0:?} do not decode")]
    Flapping(String),
    /// A check's run window that does not decode, or breaks a window's rules.
    #[error("stored run window {0:?} does not decode")]
    Window(String),
    /// The embedded store's fencing-token reservation below one block.
    #[error("stored fencing token block {0} is invalid")]
    FencingTokenBlock(i64),
}

/// Shorthand for results of vitals operations.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// Every `ErrorInfo.reason` vitals sends: what [`Error::reason`] returns,
    /// plus the reason of the retired lock-pool exhaustion. A closed list,
    /// so that it can label metrics.
    pub const REASONS: &'static [&'static str] = &[
        "INVALID_ARGUMENT",
        "LOCK_PROTOCOL_VIOLATION",
        "SYSTEM_NOT_FOUND",
        "RUN_ID_CONFLICT",
        "TOO_MANY_CHECKS",
        "TOO_MANY_MAINTENANCE_WINDOWS",
        "LOCK_NOT_AVAILABLE",
        "LOCK_MODE_MISMATCH",
        "LOCK_NOT_HELD",
        "LOCK_LOST",
        "WATCHER_TOO_SLOW",
        "WORK_POOL_EXHAUSTED",
        "LOCK_POOL_EXHAUSTED",
        "LOCK_LIMIT_REACHED",
        "WATCHER_LIMIT_REACHED",
        "LOCK_CAPACITY_EXHAUSTED",
        "SYSTEM_BUSY",
        "DATABASE_UNAVAILABLE",
        "SHUTTING_DOWN",
        "OVERLOADED",
        "DEADLINE_EXCEEDED",
        "REQUEST_TOO_LARGE",
        "MALFORMED_REQUEST",
        "INTERNAL",
    ];

    /// One invalid field.
    pub fn invalid(field: impl Into<String>, description: impl Into<String>) -> Self {
        Error::InvalidArgument(vec![FieldViolation {
            field: field.into(),
            description: description.into(),
        }])
    }

    /// Classifies an error from acquiring a connection of `pool`.
    pub fn acquire(pool: PoolKind, err: sqlx::Error) -> Self {
        match err {
            sqlx::Error::PoolTimedOut => Error::PoolExhausted(pool),
            other => Error::from(other),
        }
    }

    /// The `ErrorInfo.reason` of this error.
    pub fn reason(&self) -> &'static str {
        match self {
            Error::InvalidArgument(_) => "INVALID_ARGUMENT",
            Error::LockProtocol(_) => "LOCK_PROTOCOL_VIOLATION",
            Error::SystemNotFound { .. } => "SYSTEM_NOT_FOUND",
            Error::TooManyChecks { .. } => "TOO_MANY_CHECKS",
            Error::TooManyWindows { .. } => "TOO_MANY_MAINTENANCE_WINDOWS",
            Error::RunConflict { .. } => "RUN_ID_CONFLICT",
            Error::LockNotAvailable { .. } => "LOCK_NOT_AVAILABLE",
            Error::LockModeMismatch { .. } => "LOCK_MODE_MISMATCH",
            Error::LockNotHeld { .. } => "LOCK_NOT_HELD",
            Error::LockLost { .. } => "LOCK_LOST",
            Error::WatcherTooSlow { .. } => "WATCHER_TOO_SLOW",
            Error::PoolExhausted(PoolKind::Work) => "WORK_POOL_EXHAUSTED",
            Error::PoolExhausted(PoolKind::Lock) => "LOCK_POOL_EXHAUSTED",
            Error::LockLimitReached => "LOCK_LIMIT_REACHED",
            Error::WatcherLimitReached => "WATCHER_LIMIT_REACHED",
            Error::LockCapacityExhausted => "LOCK_CAPACITY_EXHAUSTED",
            Error::SystemBusy { .. } => "SYSTEM_BUSY",
            Error::DatabaseUnavailable(_) => "DATABASE_UNAVAILABLE",
            Error::ShuttingDown => "SHUTTING_DOWN",
            Error::Overloaded => "OVERLOADED",
            Error::DeadlineExceeded { .. } => "DEADLINE_EXCEEDED",
            Error::RequestTooLarge => "REQUEST_TOO_LARGE",
            Error::MalformedRequest(_) => "MALFORMED_REQUEST",
            Error::Unauthenticated => "UNAUTHENTICATED",
            Error::PermissionDenied(_) => "PERMISSION_DENIED",
            Error::Database(_) | Error::Migrate(_) | Error::Corrupt(_) | Error::FeedStopped | Error::Invariant(_) => {
                "INTERNAL"
            }
        }
    }

    /// The gRPC code of this error.
    pub fn code(&self) -> Code {
        match self {
            Error::InvalidArgument(_) | Error::MalformedRequest(_) => Code::InvalidArgument,
            Error::LockProtocol(_)
            | Error::TooManyChecks { .. }
            | Error::TooManyWindows { .. }
            | Error::LockModeMismatch { .. } => Code::FailedPrecondition,
            Error::SystemNotFound { .. } | Error::LockNotHeld { .. } => Code::NotFound,
            Error::RunConflict { .. } => Code::AlreadyExists,
            Error::LockNotAvailable { .. } | Error::LockLost { .. } | Error::WatcherTooSlow { .. } => Code::Aborted,
            Error::WatcherLimitReached | Error::Overloaded | Error::RequestTooLarge => Code::ResourceExhausted,
            Error::PoolExhausted(_)
            | Error::LockLimitReached
            | Error::LockCapacityExhausted
            | Error::SystemBusy { .. }
            | Error::DatabaseUnavailable(_)
            | Error::ShuttingDown => Code::Unavailable,
            Error::DeadlineExceeded { .. } => Code::DeadlineExceeded,
            Error::Unauthenticated => Code::Unauthenticated,
            Error::PermissionDenied(_) => Code::PermissionDenied,
            Error::Database(_) | Error::Migrate(_) | Error::Corrupt(_) | Error::FeedStopped | Error::Invariant(_) => {
                Code::Internal
            }
        }
    }

    /// The client-facing message: fixed text, never an internal error's.
    fn public_message(&self) -> String {
        match self {
            Error::InvalidArgument(v) => {
                let fields: Vec<&str> = v.iter().map(|f| f.field.as_str()).collect();
                format!("invalid argument: {}", fields.join(", "))
            }
            Error::LockProtocol(v) => format!("{}: {}", v.field, v.description),
            Error::SystemNotFound { system_id } => format!("system {system_id:?} not found"),
            Error::TooManyChecks { system_id, limit } => {
                format!("system {system_id:?} has {limit} checks, the most a system may have")
            }
            Error::TooManyWindows { system_id, limit } => {
                format!("system {system_id:?} would have more than {limit} open and upcoming maintenance windows")
            }
            Error::RunConflict { run_id } => {
                format!("run {run_id:?} already exists with different content")
            }
            Error::LockNotAvailable { key } => format!("lock {key:?} not available"),
            Error::LockNotHeld { key } => format!("lock {key:?} is neither held nor waited for"),
            Error::LockModeMismatch { key, held_as } => {
                format!("lock {key:?} is in use as {held_as}; every acquire of a key must name the same max_holders")
            }
            Error::LockLost { key, why } => format!("lock {key:?} lost: {why}"),
            Error::WatcherTooSlow { last_sequence } => {
                format!("watcher too slow: resume with after_sequence {last_sequence}")
            }
            Error::WatcherLimitReached => "this server has as many watchers as it may, retry later or elsewhere".into(),
            Error::PoolExhausted(PoolKind::Work) => "no database connection available, retry".into(),
            Error::PoolExhausted(PoolKind::Lock) => "no lock connection available, retry".into(),
            Error::LockLimitReached => "this server holds as many locks as it may, retry later or elsewhere".into(),
            Error::LockCapacityExhausted => "the database's lock table is full, retry later".into(),
            Error::SystemBusy { system_id } => format!("system {system_id:?} is busy, retry"),
            Error::DatabaseUnavailable(_) => "database unavailable, retry".into(),
            Error::ShuttingDown => "server shutting down, retry elsewhere".into(),
            Error::Overloaded => "too many requests in flight, retry later".into(),
            Error::DeadlineExceeded { .. } => "deadline exceeded".into(),
            Error::RequestTooLarge => "request message larger than the server accepts".into(),
            Error::MalformedRequest(why) => (*why).into(),
            Error::Unauthenticated => "no credentials, or none that this server knows".into(),
            Error::PermissionDenied(denied) => denied.to_string(),
            Error::Database(_) | Error::Migrate(_) | Error::Corrupt(_) | Error::FeedStopped | Error::Invariant(_) => {
                "internal error".into()
            }
        }
    }

    fn metadata(&self) -> HashMap<String, String> {
        let mut m = HashMap::new();
        match self {
            Error::SystemNotFound { system_id } | Error::SystemBusy { system_id } => {
                m.insert("system_id".into(), system_id.clone());
            }
            Error::RunConflict { run_id } => {
                m.insert("run_id".into(), run_id.clone());
            }
            Error::TooManyChecks { system_id, limit } => {
                m.insert("system_id".into(), system_id.clone());
                m.insert("limit".into(), limit.to_string());
            }
            Error::TooManyWindows { system_id, limit } => {
                m.insert("system_id".into(), system_id.clone());
                m.insert("limit".into(), limit.to_string());
            }
            Error::LockModeMismatch { key, held_as } => {
                m.insert("key".into(), key.clone());
                m.insert("held_as".into(), held_as.clone());
            }
            Error::LockNotAvailable { key } | Error::LockLost { key, .. } | Error::LockNotHeld { key } => {
                m.insert("key".into(), key.clone());
            }
            Error::WatcherTooSlow { last_sequence } => {
                m.insert("last_sequence".into(), last_sequence.to_string());
            }
            Error::DeadlineExceeded { after } => {
                m.insert("deadline_ms".into(), after.as_millis().to_string());
            }
            Error::PermissionDenied(Denied { principal, missing }) => {
                m.insert("principal".into(), principal.clone());
                let (key, value) = match missing {
                    Missing::Scope(scope) => ("scope", (*scope).to_owned()),
                    Missing::System(system_id) => ("system_id", system_id.clone()),
                    Missing::LockKey(key) => ("key", key.clone()),
                };
                m.insert(key.into(), value);
            }
            _ => {}
        }
        m
    }
}

impl From<sqlx::Error> for Error {
    fn from(err: sqlx::Error) -> Self {
        if is_unavailable(&err) {
            return Error::DatabaseUnavailable(Some(err));
        }
        Error::Database(err)
    }
}

impl From<sqlx::migrate::MigrateError> for Error {
    /// A migration whose statement failed is that statement's database
    /// error (an outage stays UNAVAILABLE, so start-up retries it); any
    /// other migration problem is vitals' own.
    fn from(err: sqlx::migrate::MigrateError) -> Self {
        match err {
            sqlx::migrate::MigrateError::Execute(inner) => Error::from(inner),
            other => Error::Migrate(other),
        }
    }
}

/// True when a database error means "cannot reach or use the server now",
/// which a client should retry, rather than a bug.
pub fn is_unavailable(err: &sqlx::Error) -> bool {
    match err {
        sqlx::Error::Io(_)
        | sqlx::Error::Tls(_)
        | sqlx::Error::PoolClosed
        | sqlx::Error::PoolTimedOut
        | sqlx::Error::WorkerCrashed
        | sqlx::Error::Protocol(_) => true,
        sqlx::Error::Database(db) if db.try_downcast_ref::<sqlx::sqlite::SqliteError>().is_some() => {
            // The embedded store's (extended) result codes; the primary code
            // is the low byte. BUSY and LOCKED: another program holds the
            // file; IOERR, FULL, CANTOPEN: the disk.
            db.code()
                .and_then(|code| code.parse::<i32>().ok())
                .is_some_and(|code| matches!(code & 0xff, 5 | 6 | 10 | 13 | 14))
        }
        sqlx::Error::Database(db) => db.code().is_some_and(|code| {
            // 08: connection exceptions; 57P0x: admin shutdown, crash
            // shutdown, cannot connect now; 53: insufficient resources (too
            // many connections, out of (shared) memory: a full lock table,
            // disk full); 57014: a statement cancelled, by the work
            // sessions' statement_timeout (the database is too slow to
            // answer within a request's deadline) or an administrator.
            code.starts_with("08") || code.starts_with("57P") || code.starts_with("53") || code == "57014"
        }),
        _ => false,
    }
}

/// True when `err` means the connection it happened on is gone (the socket
/// broke, the server ended the session), so a statement sent on it never ran
/// or its transaction was rolled back with the session: the work may be
/// retried on another connection. Not pool exhaustion or a refused connect.
pub fn is_connection_lost(err: &sqlx::Error) -> bool {
    match err {
        sqlx::Error::Io(_) | sqlx::Error::Protocol(_) | sqlx::Error::WorkerCrashed => true,
        sqlx::Error::Database(db) if db.try_downcast_ref::<sqlx::postgres::PgDatabaseError>().is_some() => {
            // 08: connection exceptions; 57P01/57P02: the session was
            // terminated (administrator command, crash of another backend);
            // 57P05/25P03: the server ended an idle session (idle session,
            // idle in transaction timeouts).
            db.code().is_some_and(|code| {
                code.starts_with("08") || matches!(code.as_ref(), "57P01" | "57P02" | "57P05" | "25P03")
            })
        }
        _ => false,
    }
}

/// The SQLSTATE of a database error, if it is one.
pub fn sqlstate(err: &sqlx::Error) -> Option<String> {
    match err {
        sqlx::Error::Database(db) => db.code().map(|c| c.into_owned()),
        _ => None,
    }
}

impl From<Error> for Status {
    fn from(err: Error) -> Self {
        match &err {
            _ if err.code() == Code::Internal => tracing::error!(error = %err, "internal error"),
            Error::DatabaseUnavailable(Some(source)) => {
                tracing::warn!(error = %source, "database unavailable");
            }
            _ => tracing::debug!(reason = err.reason(), "request failed"),
        }
        let mut details = ErrorDetails::with_error_info(err.reason(), ERROR_DOMAIN, err.metadata());
        match &err {
            Error::InvalidArgument(violations) => {
                for v in violations {
                    details.add_bad_request_violation(v.field.clone(), v.description.clone());
                }
            }
            Error::LockProtocol(v) => {
                details.add_precondition_failure_violation("LOCK_PROTOCOL", v.field.clone(), v.description.clone());
            }
            Error::TooManyChecks { system_id, limit } => {
                details.add_precondition_failure_violation(
                    "TOO_MANY_CHECKS",
                    system_id.clone(),
                    format!("a system has at most {limit} checks (VITALS_MAX_CHECKS_PER_SYSTEM)"),
                );
            }
            Error::TooManyWindows { system_id, limit } => {
                details.add_precondition_failure_violation(
                    "TOO_MANY_MAINTENANCE_WINDOWS",
                    system_id.clone(),
                    format!("a system has at most {limit} open and upcoming maintenance windows"),
                );
            }
            Error::PoolExhausted(_) | Error::DatabaseUnavailable(_) | Error::SystemBusy { .. } => {
                details.set_retry_info(Some(std::time::Duration::from_millis(100)));
            }
            Error::LockLimitReached | Error::LockCapacityExhausted | Error::WatcherLimitReached => {
                details.set_retry_info(Some(std::time::Duration::from_secs(1)));
            }
            _ => {}
        }
        Status::with_error_details(err.code(), err.public_message(), details)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[test]
    fn an_internal_database_error_is_internal_with_a_public_message_and_keeps_its_source() {
        let err = Error::from(sqlx::Error::ColumnNotFound("secret_column_of_runs".into()));
        assert!(matches!(err, Error::Database(_)), "{err:?}");
        let source = std::error::Error::source(&err).expect("the database error is kept as the source");
        assert!(source.to_string().contains("secret_column_of_runs"), "{source}");
        let status = Status::from(err);
        assert_eq!(status.code(), Code::Internal);
        assert_eq!(status.message(), "internal error");
        let info = status.get_details_error_info().unwrap();
        assert_eq!(info.reason, "INTERNAL");
        assert_eq!(info.domain, ERROR_DOMAIN);
        assert!(info.metadata.is_empty(), "{:?}", info.metadata);
    }

    #[test]
    fn corrupt_stored_data_is_internal_and_what_was_read_stays_in_the_log() {
        let err = Error::from(Corrupt::Thresholds("{\"mode\":\"x\"}".into()));
        assert!(err.to_string().contains("mode"), "the log says what was read: {err}");
        let status = Status::from(err);
        assert_eq!(status.code(), Code::Internal);
        assert_eq!(status.message(), "internal error");
        assert_eq!(status.get_details_error_info().unwrap().reason, "INTERNAL");
    }

    #[test]
    fn a_failed_migration_statement_is_its_database_error_and_any_other_migration_problem_is_internal() {
        let outage = sqlx::Error::Io(std::io::Error::from(std::io::ErrorKind::ConnectionReset));
        let err = Error::from(sqlx::migrate::MigrateError::Execute(outage));
        assert!(matches!(err, Error::DatabaseUnavailable(Some(_))), "{err:?}");
        let err = Error::from(sqlx::migrate::MigrateError::VersionMissing(3));
        assert!(matches!(err, Error::Migrate(_)), "{err:?}");
        assert_eq!(Status::from(err).code(), Code::Internal);
    }

    #[test]
    fn invalid_argument_lists_every_violation() {
        let status = Status::from(Error::InvalidArgument(vec![
            FieldViolation {
                field: "a".into(),
                description: "x".into(),
            },
            FieldViolation {
                field: "b".into(),
                description: "y".into(),
            },
        ]));
        assert_eq!(status.code(), Code::InvalidArgument);
        let bad = status.get_details_bad_request().unwrap();
        let fields: Vec<_> = bad.field_violations.iter().map(|v| v.field.as_str()).collect();
        assert_eq!(fields, ["a", "b"]);
    }

    #[test]
    fn too_many_checks_is_a_failed_precondition_naming_the_system_and_the_limit() {
        let s = Status::from(Error::TooManyChecks {
            system_id: "checkout".into(),
            limit: 1000,
        });
        assert_eq!(s.code(), Code::FailedPrecondition);
        let info = s.get_details_error_info().unwrap();
        assert_eq!(info.reason, "TOO_MANY_CHECKS");
        assert_eq!(info.metadata.get("system_id").map(String::as_str), Some("checkout"));
        assert_eq!(info.metadata.get("limit").map(String::as_str), Some("1000"));
        let violation = &s.get_details_precondition_failure().unwrap().violations[0];
        assert_eq!(
            (violation.r#type.as_str(), violation.subject.as_str()),
            ("TOO_MANY_CHECKS", "checkout")
        );
        assert!(
            s.get_details_retry_info().is_none(),
            "retrying the same run cannot help"
        );
    }

    #[test]
    fn pool_timeouts_become_unavailable_with_the_pool_named() {
        let s = Status::from(Error::acquire(PoolKind::Lock, sqlx::Error::PoolTimedOut));
        assert_eq!(s.code(), Code::Unavailable);
        assert_eq!(s.get_details_error_info().unwrap().reason, "LOCK_POOL_EXHAUSTED");
        let s = Status::from(Error::acquire(PoolKind::Work, sqlx::Error::PoolTimedOut));
        assert_eq!(s.get_details_error_info().unwrap().reason, "WORK_POOL_EXHAUSTED");
    }

    #[test]
    fn every_reason_sent_is_in_the_closed_list_of_reasons() {
        let every = [
            Error::InvalidArgument(Vec::new()),
            Error::LockProtocol(FieldViolation::new("a", "b")),
            Error::SystemNotFound { system_id: "s".into() },
            Error::RunConflict { run_id: "r".into() },
            Error::TooManyChecks {
                system_id: "s".into(),
                limit: 1,
            },
            Error::TooManyWindows {
                system_id: "s".into(),
                limit: 1,
            },
            Error::LockNotAvailable { key: "k".into() },
            Error::LockLost {
                key: "k".into(),
                why: "w",
            },
            Error::WatcherTooSlow { last_sequence: 1 },
            Error::PoolExhausted(PoolKind::Work),
            Error::PoolExhausted(PoolKind::Lock),
            Error::LockModeMismatch {
                key: "k".into(),
                held_as: "a semaphore of 2".into(),
            },
            Error::LockNotHeld { key: "k".into() },
            Error::LockLimitReached,
            Error::WatcherLimitReached,
            Error::LockCapacityExhausted,
            Error::SystemBusy { system_id: "s".into() },
            Error::DatabaseUnavailable(None),
            Error::ShuttingDown,
            Error::Overloaded,
            Error::DeadlineExceeded {
                after: std::time::Duration::ZERO,
            },
            Error::RequestTooLarge,
            Error::MalformedRequest("m"),
            Error::FeedStopped,
        ];
        let sent: std::collections::BTreeSet<_> = every.iter().map(Error::reason).collect();
        let listed: std::collections::BTreeSet<_> = Error::REASONS.iter().copied().collect();
        assert_eq!(sent, listed);
        assert_eq!(listed.len(), Error::REASONS.len(), "no reason is listed twice");
    }

    #[test]
    fn a_watcher_too_slow_is_aborted_and_says_where_to_resume() {
        let s = Status::from(Error::WatcherTooSlow { last_sequence: 41 });
        assert_eq!(s.code(), Code::Aborted);
        let info = s.get_details_error_info().unwrap();
        assert_eq!(info.reason, "WATCHER_TOO_SLOW");
        assert_eq!(info.metadata.get("last_sequence").map(String::as_str), Some("41"));
        let s = Status::from(Error::WatcherLimitReached);
        assert_eq!(s.code(), Code::ResourceExhausted);
        assert_eq!(s.get_details_error_info().unwrap().reason, "WATCHER_LIMIT_REACHED");
        assert!(s.get_details_retry_info().is_some());
    }
}
