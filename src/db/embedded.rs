//! The embedded store's database: one SQLite file (bundled SQLite, no server)
//! in the data directory, and a lock file beside it that one vitals process
//! holds for its whole life.
//!
//! SQLite has one writer at a time. vitals gives it exactly one writer
//! connection, so concurrent writes queue fairly in the pool (bounded by
//! `DATABASE_POOL_CONNECTION_TIMEOUT_MS`, then `WORK_POOL_EXHAUSTED`) instead
//! of spinning in SQLite's busy handler, and every write transaction starts
//! with `BEGIN IMMEDIATE`. Reads have a pool of their own and, in WAL mode,
//! see the last committed state while a write is in progress.
//!
//! The lock file is what makes this safe: a second process pointed at the
//! same data directory refuses to start instead of splitting locks (the
//! in-process lock table would exist twice) or interleaving writers.

use std::{
    fs::{File, OpenOptions, TryLockError},
    io::{Read, Write},
    path::{Path, PathBuf},
    str::FromStr,
    sync::{Arc, OnceLock},
    time::Duration,
};

use sqlx::{
    Executor, Sqlite, SqlitePool,
    pool::PoolConnection,
    sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous},
};

use super::OpenError;
use crate::{
    config::{Config, DatabaseTarget},
    error::{Error, PoolKind, Result},
    telemetry::metrics::{PoolMetrics, PoolUse},
};

/// The database file inside the data directory.
pub const DATABASE_FILE: &str = "vitals.db";

/// The embedded store's connections and its data-directory lock.
#[derive(Debug, Clone)]
pub struct EmbeddedDb {
    /// The one connection that writes: SQLite admits one writer at a time, and
    /// a pool of one makes writers queue in order, with a bounded wait.
    writer: SqlitePool,
    /// Reads, concurrent with the writer (WAL).
    readers: SqlitePool,
    /// One connection for the readiness probe: busy readers are busy, not down.
    probe: SqlitePool,
    /// The SQLite file.
    path: PathBuf,
    /// Held from start to close: the single-writer guarantee.
    lock: Arc<DataDirLock>,
    /// Where waits for a connection are counted, once the server set it;
    /// shared by every clone.
    metrics: Arc<OnceLock<PoolMetrics>>,
}

/// Where the embedded store lives for `target`: its SQLite file.
pub fn database_path(target: &DatabaseTarget) -> std::result::Result<PathBuf, OpenError> {
    match target {
        DatabaseTarget::Embedded(dir) => Ok(dir.join(DATABASE_FILE)),
        DatabaseTarget::EmbeddedUrl(url) => {
            let in_memory = url.contains(":memory:") || url.contains("mode=memory");
            let options = SqliteConnectOptions::from_str(url).map_err(OpenError::SqliteUrl)?;
            let path = options.get_filename();
            if in_memory || path.as_os_str().is_empty() {
                return Err(OpenError::InMemory);
            }
            Ok(path.to_owned())
        }
        DatabaseTarget::PostgresUrl(_) | DatabaseTarget::PostgresFromEnv => Err(OpenError::NotEmbedded),
    }
}

/// How [`OpenError::InUse`] names the other process: its pid, as its lock
/// file says, or nothing when the file says nothing.
pub(super) fn holder_note(holder: Option<&str>) -> String {
    holder.map(|pid| format!(" (pid {pid})")).unwrap_or_default()
}

/// The lock file of the database file `path`: `vitals.db.lock` beside `vitals.db`.
pub fn lock_path(path: &Path) -> PathBuf {
    let mut name = path.file_name().map(ToOwned::to_owned).unwrap_or_default();
    name.push(".lock");
    path.with_file_name(name)
}

/// An exclusive lock on the lock file, held while the value lives (or until
/// [`DataDirLock::release`]). The kernel drops it when the process dies, so a
/// crash never leaves a stale lock behind.
#[derive(Debug)]
struct DataDirLock {
    file: File,
}

impl DataDirLock {
    fn acquire(lock_file: &Path, database: &Path) -> std::result::Result<Self, OpenError> {
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(lock_file)
            .map_err(|source| OpenError::OpenLockFile {
                path: lock_file.to_owned(),
                source,
            })?;
        match file.try_lock() {
            Ok(()) => {}
            Err(TryLockError::WouldBlock) => {
                let mut holder = String::new();
                let _ = file.read_to_string(&mut holder);
                let holder = holder.trim();
                return Err(OpenError::InUse {
                    database: database.to_owned(),
                    lock_file: lock_file.to_owned(),
                    holder: (!holder.is_empty()).then(|| holder.to_owned()),
                });
            }
            Err(TryLockError::Error(source)) => {
                return Err(OpenError::LockFile {
                    path: lock_file.to_owned(),
                    source,
                });
            }
        }
        // Who holds it, for the message above; the lock itself is what counts.
        let _ = file.set_len(0).and_then(|()| writeln!(file, "{}", std::process::id()));
        Ok(DataDirLock { file })
    }

    fn release(&self) {
        let _ = self.file.unlock();
    }
}

impl EmbeddedDb {
    /// Creates the data directory if needed, takes its lock, opens (creating
    /// on first start) and migrates the database. Fails with a message for the
    /// operator: the directory cannot be created, another process holds it,
    /// the file cannot be opened or migrated.
    pub async fn open(config: &Config) -> std::result::Result<Self, OpenError> {
        let path = database_path(&config.database_target())?;
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|source| OpenError::CreateDataDir {
                dir: dir.to_owned(),
                source,
            })?;
        }
        let lock = Arc::new(DataDirLock::acquire(&lock_path(&path), &path)?);

        let wait = config.pool_connection_timeout();
        let base = SqliteConnectOptions::new()
            .filename(&path)
            .journal_mode(SqliteJournalMode::Wal)
            // An acknowledged write survives a power cut, as with PostgreSQL.
            .synchronous(SqliteSynchronous::Full)
            // Only another program (a sqlite3 shell) can make SQLite busy:
            // vitals' own writers queue for the one writer connection.
            .busy_timeout(wait);
        let pool = |max: u32| {
            SqlitePoolOptions::new()
                .max_connections(max)
                .min_connections(0)
                .acquire_timeout(wait)
                // A local file does not go stale the way a socket does.
                .test_before_acquire(false)
        };
        let writer = pool(1)
            .idle_timeout(None)
            .connect_with(base.clone().create_if_missing(true))
            .await
            .map_err(|source| OpenError::OpenStore {
                path: path.clone(),
                source,
            })?;
        let read_only = base.pragma("query_only", "ON");
        let readers = pool(config.pool_max)
            .idle_timeout(Some(config.pool_idle_timeout()))
            .connect_lazy_with(read_only.clone());
        let probe = pool(1)
            .idle_timeout(Some(config.pool_idle_timeout()))
            .connect_lazy_with(read_only);
        let db = EmbeddedDb {
            writer,
            readers,
            probe,
            path,
            lock,
            metrics: Arc::default(),
        };
        if let Err(source) = db.migrate().await {
            db.close().await;
            return Err(OpenError::MigrateStore {
                path: db.path.clone(),
                source,
            });
        }
        tracing::info!(
            database = %db.path.display(),
            "embedded store (SQLite): for a single replica only; run several replicas on PostgreSQL (DATABASE_URL)"
        );
        Ok(db)
    }

    /// The SQLite file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The writer connection, or `WORK_POOL_EXHAUSTED` after the acquire timeout.
    pub async fn writer(&self) -> Result<PoolConnection<Sqlite>> {
        self.acquire(&self.writer).await
    }

    /// The writer connection in a new `BEGIN IMMEDIATE` transaction (the
    /// write lock is taken at once, so nothing can commit between its reads
    /// and its commit), or `WORK_POOL_EXHAUSTED` after the acquire timeout.
    /// Dropped without a commit, it rolls back before the connection serves
    /// the next writer.
    pub async fn begin_write(&self) -> Result<sqlx::Transaction<'static, Sqlite>> {
        self.writer
            .begin_with("BEGIN IMMEDIATE")
            .await
            .map_err(|e| Error::acquire(PoolKind::Work, e))
    }

    /// A reader connection, or `WORK_POOL_EXHAUSTED` after the acquire timeout.
    pub async fn reader(&self) -> Result<PoolConnection<Sqlite>> {
        self.acquire(&self.readers).await
    }

    /// A connection of `pool`, the wait counted as the work pool's.
    async fn acquire(&self, pool: &SqlitePool) -> Result<PoolConnection<Sqlite>> {
        let metrics = self.metrics.get();
        let started = metrics.map(|_| std::time::Instant::now());
        let acquired = pool.acquire().await;
        if let (Some(metrics), Some(started)) = (metrics, started) {
            metrics.acquired(started, matches!(acquired, Err(sqlx::Error::PoolTimedOut)));
        }
        acquired.map_err(|e| Error::acquire(PoolKind::Work, e))
    }

    /// Where waits for a connection are counted (see
    /// [`crate::db::Database::report_to`]).
    pub(crate) fn metrics(&self) -> &OnceLock<PoolMetrics> {
        &self.metrics
    }

    /// The open connections of the writer and the readers.
    pub fn usage(&self) -> PoolUse {
        let writer = super::pool_use(self.writer.size(), self.writer.num_idle());
        let readers = super::pool_use(self.readers.size(), self.readers.num_idle());
        PoolUse {
            idle: writer.idle + readers.idle,
            in_use: writer.in_use + readers.in_use,
        }
    }

    /// True when the database answers a query within `timeout`.
    pub async fn ping(&self, timeout: Duration) -> bool {
        matches!(
            tokio::time::timeout(timeout, self.probe.execute("SELECT 1")).await,
            Ok(Ok(_))
        )
    }

    /// Applies the embedded store's own migrations (`migrations/sqlite`).
    pub async fn migrate(&self) -> Result<()> {
        sqlx::migrate!("./migrations/sqlite")
            .run(&self.writer)
            .await
            .map_err(Error::from)
    }

    /// Closes every connection, then gives up the data-directory lock.
    pub async fn close(&self) {
        tokio::join!(self.readers.close(), self.probe.close());
        self.writer.close().await;
        self.lock.release();
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[test]
    fn the_database_lives_in_the_data_dir_or_where_a_sqlite_url_says() {
        let dir = DatabaseTarget::Embedded(PathBuf::from("./vitals-data"));
        assert_eq!(database_path(&dir).unwrap(), PathBuf::from("./vitals-data/vitals.db"));
        let url = DatabaseTarget::EmbeddedUrl("sqlite:///var/lib/vitals/v.db".into());
        assert_eq!(database_path(&url).unwrap(), PathBuf::from("/var/lib/vitals/v.db"));
        let relative = DatabaseTarget::EmbeddedUrl("sqlite://data/v.db".into());
        assert_eq!(database_path(&relative).unwrap(), PathBuf::from("data/v.db"));
        assert_eq!(
            lock_path(Path::new("./vitals-data/vitals.db")),
            PathBuf::from("./vitals-data/vitals.db.lock")
        );
    }

    #[test]
    fn an_in_memory_sqlite_url_is_refused() {
        for url in ["sqlite::memory:", "sqlite://?mode=memory"] {
            let err = database_path(&DatabaseTarget::EmbeddedUrl(url.into())).unwrap_err();
            assert!(matches!(err, OpenError::InMemory), "{url}: {err:?}");
            assert!(err.to_string().contains("needs a file"), "{url}: {err}");
        }
    }

    #[tokio::test]
    async fn a_second_open_of_the_same_data_dir_is_refused_until_the_first_closes() {
        let dir = tempfile::tempdir().unwrap();
        let config = Config::from_flags([format!("--database-url=sqlite://{}/v.db", dir.path().display())]).unwrap();
        let first = EmbeddedDb::open(&config).await.unwrap();
        let err = EmbeddedDb::open(&config).await.unwrap_err();
        assert!(matches!(err, OpenError::InUse { .. }), "{err:?}");
        let err = err.to_string();
        assert!(err.contains("in use by another vitals process"), "{err}");
        assert!(err.contains(&format!("pid {}", std::process::id())), "{err}");
        first.close().await;
        let again = EmbeddedDb::open(&config).await.expect("the lock is free after close");
        again.close().await;
    }
}
