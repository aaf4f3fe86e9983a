//! The database of a vitals process: PostgreSQL's two pools and how their
//! sessions are configured, or the embedded store ([`embedded`]).
//!
//! Upstream deadlocked because lock holders and their work drew from one pool:
//! at concurrency >= pool size every connection held a lock and waited for a
//! work connection. vitals keeps locks on the lock manager's own sessions
//! (connected with [`LockPool`]'s settings) and work on a [`WorkPool`], two
//! distinct types so they cannot be swapped by mistake, and only ever takes a
//! lock before a work connection. The work pool fails fast after
//! `DATABASE_POOL_CONNECTION_TIMEOUT_MS` instead of waiting forever.
//!
//! [`Database`] is the one value the application holds: either backend, with
//! the same readiness, migration and shutdown operations.

pub mod embedded;

use std::{
    path::PathBuf,
    sync::{
        Arc, OnceLock,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use sqlx::{
    Connection, Executor, PgPool, Postgres,
    pool::PoolConnection,
    postgres::{PgConnectOptions, PgPoolOptions},
};

pub use self::embedded::EmbeddedDb;
use crate::{
    config::{Config, DatabaseTarget},
    error::{Error, PoolKind, Result},
    telemetry::metrics::{PoolMetrics, PoolUse},
};

/// TCP keepalive settings asked of the server for every session, so that
/// PostgreSQL notices a vanished vitals replica and ends its sessions (and so
/// releases its advisory locks) within `idle + interval * count` seconds.
pub const TCP_KEEPALIVES_IDLE_S: u64 = 10;
/// Seconds between keepalive probes.
pub const TCP_KEEPALIVES_INTERVAL_S: u64 = 5;
/// Unanswered probes before the server drops the session.
pub const TCP_KEEPALIVES_COUNT: u64 = 3;

/// How much longer than the lease PostgreSQL lets a lock session idle in its
/// transaction before ending it (and with it the lock).
pub const LEASE_BACKSTOP_MARGIN_MS: u64 = 1000;

/// Why the configured database cannot be opened, which stops start-up.
///
/// `Display` is the whole message the operator reads, the cause included;
/// the cause is also `source()`, for programs.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    /// `DATABASE_URL` does not parse as a PostgreSQL URL.
    #[error("DATABASE_URL is not a valid PostgreSQL URL: {0}")]
    PostgresUrl(#[source] sqlx::Error),
    /// PostgreSQL's pools were asked for, but no PostgreSQL is configured.
    #[error("no PostgreSQL configured: set DATABASE_URL or PGHOST")]
    NoPostgres,
    /// `DATABASE_URL=sqlite:...` does not parse.
    #[error("DATABASE_URL is not a valid sqlite URL (sqlite://PATH): {0}")]
    SqliteUrl(#[source] sqlx::Error),
    /// An in-memory SQLite database would lose every run at exit, and no
    /// lock file could keep a second process away from it.
    #[error("DATABASE_URL: the embedded store needs a file (sqlite://PATH), not an in-memory database")]
    InMemory,
    /// The embedded store was asked for, but PostgreSQL is configured.
    #[error("PostgreSQL is configured, not the embedded store")]
    NotEmbedded,
    /// The embedded store's directory cannot be created.
    #[error("cannot create the data directory {}: {source}", .dir.display())]
    CreateDataDir {
        /// The directory.
        dir: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The lock file beside the embedded store cannot be opened.
    #[error("cannot open the lock file {}: {source}", .path.display())]
    OpenLockFile {
        /// The lock file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// Locking the lock file failed (not because another process holds it).
    #[error("cannot lock {}: {source}", .path.display())]
    LockFile {
        /// The lock file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// Another process holds the embedded store's lock file.
    #[error(
        "the embedded store {} is in use by another vitals process{}, which holds {}; embedded mode serves a \
         single replica: stop the other process, give this one its own VITALS_DATA_DIR, or run several replicas \
         on PostgreSQL (DATABASE_URL)",
        .database.display(),
        embedded::holder_note(.holder.as_deref()),
        .lock_file.display()
    )]
    InUse {
        /// The SQLite file.
        database: PathBuf,
        /// The lock file the other process holds.
        lock_file: PathBuf,
        /// What the lock file says about its holder (its pid), if anything.
        holder: Option<String>,
    },
    /// The SQLite file cannot be opened or created.
    #[error("cannot open the embedded store {}: {source}", .path.display())]
    OpenStore {
        /// The SQLite file.
        path: PathBuf,
        /// Why.
        source: sqlx::Error,
    },
    /// The embedded store's migrations failed.
    #[error("cannot migrate the embedded store {}: {source}", .path.display())]
    MigrateStore {
        /// The SQLite file.
        path: PathBuf,
        /// Why.
        source: Error,
    },
}

/// The session settings of work connections: bounds, so that a statement
/// whose request has ended, or is about to, does not wait on in the database
/// holding locks.
///
/// - `statement_timeout`: no statement runs more than a second past the
///   longest deadline a request can have (`VITALS_REQUEST_TIMEOUT_MS`); the
///   second lets the request's own deadline answer first.
/// - `lock_timeout`: a statement waits for another's row lock (a write of the
///   same system that is still committing) no longer than a request waits
///   for its system's lock: `DATABASE_LOCK_TIMEOUT_MS`, and no later than the
///   `SYSTEM_BUSY` margin before the request's deadline. Such a write answers
///   `SYSTEM_BUSY`, in time for the client to hear it.
/// - `client_connection_check_interval`: a statement whose connection vitals
///   closed (its request ended while it ran, see
///   [`crate::store::PgStore`]) ends within a second instead of running on
///   for nobody.
/// - `plan_cache_mode`: every statement is planned once per session, for any
///   parameters. PostgreSQL would otherwise plan SubmitRun's write anew on
///   every call (a plan for its parameters looks a little cheaper than one
///   for any), which cost more than executing it. The store writes
///   statements whose plan does not depend on a parameter being NULL.
pub fn work_session_settings(config: &Config) -> [(&'static str, String); 4] {
    let deadline = Duration::from_millis(config.request_timeout_ms);
    let lock_wait = config
        .lock_timeout()
        .min(deadline.saturating_sub(crate::lock::SYSTEM_BUSY_MARGIN))
        // 0 would mean "wait forever".
        .max(Duration::from_millis(1));
    [
        ("statement_timeout", (config.request_timeout_ms + 1000).to_string()),
        ("lock_timeout", lock_wait.as_millis().to_string()),
        ("client_connection_check_interval", "1000".to_owned()),
        ("plan_cache_mode", "force_generic_plan".to_owned()),
    ]
}

/// A pooled connection idle at least this long is pinged before the pool
/// hands it out; one in steady use is not (sqlx also pings every connection
/// when it goes back to the pool, so a busy connection was checked moments
/// ago).
pub const IDLE_PING_AFTER: Duration = Duration::from_secs(1);

/// When a connection to the server was last found broken, shared by the
/// pools of one process: a connection that went idle before that moment may
/// have died in the same event (a restarted server, backends terminated by an
/// administrator), so the pool pings it before handing it out, however short
/// its idle time.
#[derive(Debug)]
pub struct ConnectionHealth {
    origin: Instant,
    /// Milliseconds after `origin` (plus one, so that 0 means never).
    last_broken_ms: AtomicU64,
}

impl ConnectionHealth {
    fn new() -> Self {
        ConnectionHealth {
            origin: Instant::now(),
            last_broken_ms: AtomicU64::new(0),
        }
    }

    fn now_ms(&self) -> u64 {
        u64::try_from(self.origin.elapsed().as_millis()).unwrap_or(u64::MAX - 1) + 1
    }

    /// Records that a connection was found broken now.
    pub fn note_broken(&self) {
        self.last_broken_ms.fetch_max(self.now_ms(), Ordering::Relaxed);
    }

    /// True when `err` says the connection it happened on is gone (see
    /// [`crate::error::is_connection_lost`]); records that.
    pub fn check(&self, err: &Error) -> bool {
        let lost = matches!(err, Error::DatabaseUnavailable(Some(e)) if crate::error::is_connection_lost(e));
        if lost {
            self.note_broken();
        }
        lost
    }

    /// Whether a connection idle for `idle_for` must be pinged before use.
    fn needs_ping(&self, idle_for: Duration) -> bool {
        if idle_for >= IDLE_PING_AFTER {
            return true;
        }
        let broken = self.last_broken_ms.load(Ordering::Relaxed);
        // Idle since (now - idle_for), rounded down a millisecond to be safe.
        let idle_since = self
            .now_ms()
            .saturating_sub(u64::try_from(idle_for.as_millis()).unwrap_or(u64::MAX))
            .saturating_sub(1);
        broken != 0 && broken >= idle_since
    }
}

/// Pool of connections for reads and writes. Never holds advisory locks.
#[derive(Debug, Clone)]
pub struct WorkPool {
    pool: PgPool,
    health: Arc<ConnectionHealth>,
    /// Where waits for a connection are counted, once the server set it
    /// (see [`Database::report_to`]); shared by every clone.
    metrics: Arc<OnceLock<PoolMetrics>>,
}

/// How the lock manager's sessions connect: they are long-lived connections
/// the manager owns (see [`crate::lock::session`]), never pooled, because a
/// session-level advisory lock must never be left on a connection another
/// request may later use.
#[derive(Debug, Clone)]
pub struct LockPool {
    options: Arc<PgConnectOptions>,
}

impl WorkPool {
    /// A work connection, or `WORK_POOL_EXHAUSTED` after the acquire timeout.
    pub async fn acquire(&self) -> Result<PoolConnection<Postgres>> {
        let metrics = self.metrics.get();
        let started = metrics.map(|_| Instant::now());
        let acquired = self.pool.acquire().await;
        if let (Some(metrics), Some(started)) = (metrics, started) {
            metrics.acquired(started, matches!(acquired, Err(sqlx::Error::PoolTimedOut)));
        }
        acquired.map_err(|e| Error::acquire(PoolKind::Work, e))
    }

    /// Open connections, idle and in use.
    pub fn usage(&self) -> PoolUse {
        pool_use(self.pool.size(), self.pool.num_idle())
    }

    /// The underlying pool, for queries that need no explicit connection.
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// Which connections are suspect (see [`ConnectionHealth`]).
    pub fn health(&self) -> &ConnectionHealth {
        &self.health
    }
}

impl LockPool {
    /// The lock sessions' connect options.
    pub fn options(&self) -> PgConnectOptions {
        (*self.options).clone()
    }
}

/// Both pools of one vitals process.
#[derive(Debug, Clone)]
pub struct Pools {
    /// Reads and writes.
    pub work: WorkPool,
    /// How lock sessions connect.
    pub lock: LockPool,
    /// One connection for LISTEN, so the long-lived listening session never
    /// occupies a work or lock connection.
    pub listen: PgPool,
    /// One connection for the readiness probe: it asks "is the database
    /// there", which a busy work pool must not answer with "no".
    probe: PgPool,
}

fn base_options(config: &Config) -> std::result::Result<PgConnectOptions, OpenError> {
    let options = match config.database_target() {
        DatabaseTarget::PostgresUrl(url) => url.parse::<PgConnectOptions>().map_err(OpenError::PostgresUrl)?,
        DatabaseTarget::PostgresFromEnv => PgConnectOptions::new(),
        DatabaseTarget::Embedded(_) | DatabaseTarget::EmbeddedUrl(_) => return Err(OpenError::NoPostgres),
    };
    let keepalives = [
        ("tcp_keepalives_idle", TCP_KEEPALIVES_IDLE_S.to_string()),
        ("tcp_keepalives_interval", TCP_KEEPALIVES_INTERVAL_S.to_string()),
        ("tcp_keepalives_count", TCP_KEEPALIVES_COUNT.to_string()),
    ];
    Ok(options.options(keepalives))
}

impl Pools {
    /// Builds both pools without connecting: the server starts and reports
    /// NOT_SERVING until the database answers, instead of failing to start.
    pub fn connect_lazy(config: &Config) -> std::result::Result<Self, OpenError> {
        let base = base_options(config)?;
        let work_options = base
            .clone()
            .application_name("vitals-work")
            .options(work_session_settings(config));
        let listen_options = base.clone().application_name("vitals-listen");
        let probe_options = base.clone().application_name("vitals-probe");
        let lock_options = base.application_name("vitals-lock").options([
            // A lock session proves it is alive at least every quarter
            // lease while it holds locks, and its holders count its locks as
            // lost one lease after the last proof. PostgreSQL ends a session
            // idle for longer than that plus a margin, releasing its locks
            // only after the holders were told.
            (
                "idle_session_timeout",
                (config.lock_idle_tx_timeout_ms + LEASE_BACKSTOP_MARGIN_MS).to_string(),
            ),
            // TCP keepalives must not end a lock session before its holders
            // count its locks as lost: on a link that drops packets, the
            // server's probes would otherwise free the locks after 25 s,
            // while a holder believes them valid for the whole lease. So on
            // lock sessions probing starts only after the lease and its
            // margin (idle_session_timeout ends a silent session first).
            (
                "tcp_keepalives_idle",
                ((config.lock_idle_tx_timeout_ms + LEASE_BACKSTOP_MARGIN_MS).div_ceil(1000) + TCP_KEEPALIVES_IDLE_S)
                    .to_string(),
            ),
            // A fencing token is reported only once its block is durable.
            ("synchronous_commit", "on".to_owned()),
            // The lock statement is always the same shape; planning it anew
            // for each batch's arrays (a custom plan) costs more than the
            // statement.
            ("plan_cache_mode", "force_generic_plan".to_owned()),
            // Lock sessions never wait for a lock; a bound for safety.
            ("lock_timeout", config.lock_idle_tx_timeout_ms.to_string()),
            // A statement whose client vanished ends within a second instead
            // of running on for nobody.
            ("client_connection_check_interval", "1000".to_owned()),
        ]);
        let health = Arc::new(ConnectionHealth::new());
        let pool = |max: u32| {
            let health = health.clone();
            PgPoolOptions::new()
                .max_connections(max)
                .min_connections(0)
                .acquire_timeout(config.pool_connection_timeout())
                .idle_timeout(Some(config.pool_idle_timeout()))
                // A connection whose backend died while idle is found here
                // and replaced instead of failing the request that drew it:
                // one idle for a while, or one idle since a connection was
                // last found broken. A connection in steady use is not
                // pinged (a round trip on every request's path); if its
                // backend dies in between, the request sees a lost
                // connection, which SubmitRun and the locks retry once on a
                // checked connection.
                .test_before_acquire(false)
                .before_acquire(move |conn, meta| {
                    let ping = health.needs_ping(meta.idle_for);
                    Box::pin(async move { Ok(!ping || conn.ping().await.is_ok()) })
                })
        };
        Ok(Pools {
            work: WorkPool {
                pool: pool(config.pool_max).connect_lazy_with(work_options),
                health: health.clone(),
                metrics: Arc::default(),
            },
            lock: LockPool {
                options: Arc::new(lock_options),
            },
            listen: pool(1).connect_lazy_with(listen_options),
            probe: pool(1).connect_lazy_with(probe_options),
        })
    }

    /// True when the database answers a query within `timeout`, on a
    /// connection of its own (a saturated pool is busy, not down).
    pub async fn ping(&self, timeout: Duration) -> bool {
        matches!(
            tokio::time::timeout(timeout, self.probe.execute("SELECT 1")).await,
            Ok(Ok(_))
        )
    }

    /// Applies the migrations. Replicas starting together are serialised by
    /// vitals' own migration lock, in the advisory-lock space no client key
    /// can reach (sqlx's lock lives in the clients' space), held on a
    /// connection of its own that is closed afterwards.
    pub async fn migrate(&self) -> Result<()> {
        let mut migrator = sqlx::migrate!("./migrations/postgres");
        migrator.set_locking(false);
        let mut conn = self.work.acquire().await?.detach();
        // A migration may rewrite every row of a large table, and waits for
        // the replica migrating before it: neither is a request.
        sqlx::query("SELECT set_config('statement_timeout', '0', false), set_config('lock_timeout', '0', false)")
            .execute(&mut conn)
            .await?;
        sqlx::query("SELECT pg_advisory_lock($1, $2)")
            .bind(crate::lock::id::INTERNAL_SPACE)
            .bind(crate::lock::id::MIGRATIONS)
            .execute(&mut conn)
            .await?;
        let result = migrator.run_direct(&mut conn).await.map_err(Error::from);
        // Closing the session releases the migration lock.
        let _ = conn.close().await;
        result
    }

    /// Logs the pool sizes and warns when they exceed what the server accepts.
    pub async fn check_sizing(&self, config: &Config) -> Result<()> {
        let row: (i32, i32, i32) = sqlx::query_as(
            "SELECT current_setting('max_connections')::int, \
                    current_setting('superuser_reserved_connections')::int, \
                    coalesce(nullif(current_setting('reserved_connections', true), ''), '0')::int",
        )
        .fetch_one(self.work.pool())
        .await?;
        let (max_connections, superuser_reserved, reserved) = row;
        self.check_lock_capacity(config).await?;
        self.log_encryption().await?;
        let available = i64::from(max_connections) - i64::from(superuser_reserved) - i64::from(reserved);
        // Plus the LISTEN connection, the readiness probe's and the lock
        // session that holds shared locks.
        let wanted = i64::from(config.pool_max) + i64::from(config.lock_pool_max) + 3;
        tracing::info!(
            work_pool_max = config.pool_max,
            lock_pool_max = config.lock_pool_max,
            max_locks = config.max_locks,
            max_connections,
            "database pools configured"
        );
        if wanted > available {
            tracing::warn!(
                wanted,
                available,
                "DATABASE_POOL_MAX + DATABASE_LOCK_POOL_MAX + 3 (the LISTEN, readiness and shared-lock connections) exceeds the \
                 server's max_connections minus reserved connections; size pools so that \
                 replicas * (DATABASE_POOL_MAX + DATABASE_LOCK_POOL_MAX + 3) <= max_connections - headroom"
            );
        }
        Ok(())
    }

    /// Says whether the link to PostgreSQL is encrypted: with `sslmode=prefer`
    /// (sqlx's default, like libpq's) a server without a certificate is
    /// spoken to in plaintext without a word, which an operator who meant
    /// `require` must learn from the log.
    async fn log_encryption(&self) -> Result<()> {
        let link: Option<(bool, bool)> = sqlx::query_as(
            "SELECT s.ssl, a.client_addr IS NULL FROM pg_stat_ssl s JOIN pg_stat_activity a USING (pid) \
             WHERE pid = pg_backend_pid()",
        )
        .fetch_optional(self.work.pool())
        .await?;
        match link {
            Some((true, _)) => tracing::info!("the database link is encrypted (TLS)"),
            Some((false, true)) => tracing::info!("the database link is a Unix socket"),
            _ => tracing::warn!(
                "the database link is plaintext: set sslmode=require, verify-ca or verify-full in DATABASE_URL (with \
                 sslrootcert) to refuse a server without TLS"
            ),
        }
        Ok(())
    }

    /// Logs how many advisory locks PostgreSQL's shared lock table holds and
    /// warns when that cannot hold `VITALS_MAX_LOCKS` of this replica.
    async fn check_lock_capacity(&self, config: &Config) -> Result<()> {
        let (per_transaction, connections, prepared): (i64, i64, i64) = sqlx::query_as(
            "SELECT current_setting('max_locks_per_transaction')::int8, current_setting('max_connections')::int8, \
                    current_setting('max_prepared_transactions')::int8",
        )
        .fetch_one(self.work.pool())
        .await?;
        let capacity = per_transaction * (connections + prepared);
        tracing::info!(
            capacity,
            max_locks_per_transaction = per_transaction,
            max_locks = config.max_locks,
            "PostgreSQL's shared lock table holds about this many locks, for every session of the cluster"
        );
        if capacity < i64::from(config.max_locks) {
            tracing::warn!(
                capacity,
                max_locks = config.max_locks,
                "max_locks_per_transaction * (max_connections + max_prepared_transactions) is below VITALS_MAX_LOCKS: \
                 grants past the table's size answer LOCK_CAPACITY_EXHAUSTED; raise max_locks_per_transaction \
                 (see README, Locks) or lower VITALS_MAX_LOCKS"
            );
        }
        Ok(())
    }

    /// Closes both pools, waiting for checked-out connections to return.
    pub async fn close(&self) {
        tokio::join!(self.work.pool.close(), self.listen.close(), self.probe.close());
    }
}

/// The database of one vitals process: PostgreSQL or the embedded store.
#[derive(Debug, Clone)]
pub enum Database {
    /// PostgreSQL through the work, lock, listen and probe pools; any number
    /// of replicas.
    Postgres(Pools),
    /// The embedded SQLite store of a single replica.
    Embedded(EmbeddedDb),
}

impl Database {
    /// Opens the configured database. PostgreSQL is connected lazily (the
    /// server starts NOT_SERVING until it answers); the embedded store is
    /// local, so it is opened, locked and migrated here, and any problem with
    /// it stops start-up with a message.
    pub async fn open(config: &Config) -> std::result::Result<Self, OpenError> {
        match config.database_target() {
            DatabaseTarget::Embedded(_) | DatabaseTarget::EmbeddedUrl(_) => {
                EmbeddedDb::open(config).await.map(Database::Embedded)
            }
            DatabaseTarget::PostgresUrl(_) | DatabaseTarget::PostgresFromEnv => {
                Pools::connect_lazy(config).map(Database::Postgres)
            }
        }
    }

    /// True when the database answers within `timeout`.
    pub async fn ping(&self, timeout: Duration) -> bool {
        match self {
            Database::Postgres(pools) => pools.ping(timeout).await,
            Database::Embedded(db) => db.ping(timeout).await,
        }
    }

    /// Applies the migrations of the backend.
    pub async fn migrate(&self) -> Result<()> {
        match self {
            Database::Postgres(pools) => pools.migrate().await,
            Database::Embedded(db) => db.migrate().await,
        }
    }

    /// The deployment's page token key: made and stored by the first
    /// replica that asks (after the migrations), read by every other.
    pub async fn page_token_key(&self) -> Result<[u8; 32]> {
        const INSERT: &str = "INSERT INTO deployment_secrets (name, secret) VALUES ('page_token', $1) \
                              ON CONFLICT (name) DO NOTHING";
        const SELECT: &str = "SELECT secret FROM deployment_secrets WHERE name = 'page_token'";
        let mut fresh = [0u8; 32];
        tokio_rustls::rustls::crypto::ring::default_provider()
            .secure_random
            .fill(&mut fresh)
            .map_err(|_| Error::Invariant("the system's random source failed"))?;
        let stored: Vec<u8> = match self {
            Database::Postgres(pools) => {
                sqlx::query(INSERT).bind(&fresh[..]).execute(pools.work.pool()).await?;
                sqlx::query_scalar(SELECT).fetch_one(pools.work.pool()).await?
            }
            Database::Embedded(db) => {
                let mut writer = db.writer().await?;
                sqlx::query(INSERT).bind(&fresh[..]).execute(&mut *writer).await?;
                sqlx::query_scalar(SELECT).fetch_one(&mut *writer).await?
            }
        };
        <[u8; 32]>::try_from(stored.as_slice())
            .map_err(|_| Error::Invariant("the stored page token key is not 32 bytes"))
    }

    /// Logs the pool sizes; with PostgreSQL, warns when they exceed what the
    /// server accepts.
    pub async fn check_sizing(&self, config: &Config) -> Result<()> {
        match self {
            Database::Postgres(pools) => pools.check_sizing(config).await,
            Database::Embedded(_) => {
                tracing::info!(
                    readers = config.pool_max,
                    writers = 1,
                    lock_slots = config.lock_pool_max,
                    max_locks = config.max_locks,
                    "embedded store configured"
                );
                Ok(())
            }
        }
    }

    /// Closes every connection (and, embedded, gives up the data-dir lock).
    pub async fn close(&self) {
        match self {
            Database::Postgres(pools) => pools.close().await,
            Database::Embedded(db) => db.close().await,
        }
    }

    /// Counts waits for a work connection into `metrics` from now on, in
    /// every clone of this database.
    pub fn report_to(&self, metrics: PoolMetrics) {
        let cell = match self {
            Database::Postgres(pools) => &pools.work.metrics,
            Database::Embedded(db) => db.metrics(),
        };
        let _ = cell.set(metrics);
    }

    /// The work pool's open connections (embedded: the writer's and the
    /// readers').
    pub fn work_usage(&self) -> PoolUse {
        match self {
            Database::Postgres(pools) => pools.work.usage(),
            Database::Embedded(db) => db.usage(),
        }
    }
}

/// [`PoolUse`] from a pool's size and idle count.
pub(crate) fn pool_use(size: u32, idle: usize) -> PoolUse {
    let idle = u64::try_from(idle).unwrap_or(u64::MAX);
    PoolUse {
        idle,
        in_use: u64::from(size).saturating_sub(idle),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn settings(flags: &[&str]) -> Vec<(&'static str, String)> {
        let mut all = vec!["--database-url", "postgres://x/y"];
        all.extend_from_slice(flags);
        work_session_settings(&Config::from_flags(all).unwrap()).to_vec()
    }

    fn setting(all: &[(&'static str, String)], name: &str) -> String {
        all.iter().find(|(n, _)| *n == name).map(|(_, v)| v.clone()).unwrap()
    }

    #[test]
    fn work_sessions_end_statements_after_the_longest_request_deadline_and_lock_waits_before_it() {
        let defaults = settings(&[]);
        assert_eq!(setting(&defaults, "statement_timeout"), "16000");
        // The lock wait (30 s) is cut to the margin before the deadline (15 s).
        assert_eq!(setting(&defaults, "lock_timeout"), "14750");
        assert_eq!(setting(&defaults, "client_connection_check_interval"), "1000");
        assert_eq!(setting(&defaults, "plan_cache_mode"), "force_generic_plan");

        let short_lock_wait = settings(&["--database-lock-timeout-ms", "200"]);
        assert_eq!(setting(&short_lock_wait, "lock_timeout"), "200");

        // A deadline inside the margin leaves the shortest wait, never 0 (no limit).
        let tiny = settings(&["--request-timeout-ms", "100"]);
        assert_eq!(setting(&tiny, "statement_timeout"), "1100");
        assert_eq!(setting(&tiny, "lock_timeout"), "1");
    }
}
