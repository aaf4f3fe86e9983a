//! Advisory locks on the dedicated lock pool, with fencing tokens.
//!
//! Two users share one mechanism: vitals' own per-system serialisation
//! ([`Locks::with_xact_lock`], upstream's `withXactLock`) and clients'
//! `WithLock` streams ([`Locks::acquire`]). Both take a transaction-level
//! advisory lock on a lock-pool connection and only then, if at all, a work
//! connection: the acquisition order is always lock pool, then work pool, so
//! the upstream pool-starvation deadlock cannot form.
//!
//! A lock connection whose state is unknown (a statement was in flight when
//! its future was dropped, or an error left the transaction in doubt) is
//! closed, never returned to the pool: closing the session is what releases
//! any lock it may hold.

use std::{
    future::Future,
    sync::Arc,
    time::{Duration, Instant},
};

use chrono::{DateTime, Utc};
use sqlx::{Executor, PgConnection, Postgres, Row, pool::PoolConnection};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::{
    db::LockPool,
    domain::LockKey,
    error::{Error, PoolKind, Result, sqlstate},
};

/// Prefix of client keys, so they never collide with vitals' internal keys
/// such as `health:<system_id>`.
pub const CLIENT_KEY_PREFIX: &str = "lock:";

/// SQLSTATE `lock_not_available`: `lock_timeout` expired.
const LOCK_NOT_AVAILABLE: &str = "55P03";

/// A lock-pool connection that is closed instead of returned unless the code
/// that used it declared it clean (no transaction open, nothing in flight).
struct LockConn {
    conn: Option<PoolConnection<Postgres>>,
    clean: bool,
}

impl LockConn {
    fn new(conn: PoolConnection<Postgres>) -> Self {
        LockConn {
            conn: Some(conn),
            clean: true,
        }
    }

    fn conn(&mut self) -> Result<&mut PgConnection> {
        self.clean = false;
        self.conn
            .as_deref_mut()
            .ok_or_else(|| Error::Internal("lock connection already released".into()))
    }

    /// Ends the transaction and marks the connection fit for reuse.
    async fn finish(&mut self, commit: bool) -> Result<()> {
        let sql = if commit { "COMMIT" } else { "ROLLBACK" };
        self.conn()?.execute(sql).await?;
        self.clean = true;
        Ok(())
    }
}

impl Drop for LockConn {
    fn drop(&mut self) {
        if !self.clean {
            if let Some(conn) = self.conn.take() {
                // Dropping the detached connection closes its socket; the
                // server then ends the session and with it any lock.
                tracing::debug!("closing a lock connection in an unknown state");
                drop(conn.detach());
            }
        }
    }
}

/// The lock service of one vitals process.
#[derive(Debug, Clone)]
pub struct Locks {
    pool: LockPool,
    /// Lock connections clients may occupy (held or waiting), so that clients
    /// can never starve vitals' own serialisation of SubmitRun.
    client_budget: Arc<Semaphore>,
    /// How long a client waits for a place in the budget.
    budget_wait: Duration,
    /// The WithLock lease.
    lease: Duration,
    /// WithLock's wait when the client gives none.
    default_wait: Duration,
}

/// A client's granted lock. Dropping it without [`HeldLock::release`] rolls
/// the lock's transaction back in the background.
pub struct HeldLock {
    conn: LockConn,
    key: LockKey,
    /// Strictly increasing across all grants.
    pub fencing_token: u64,
    /// When the lock was granted.
    pub acquired_at: DateTime<Utc>,
    started: Instant,
    _permit: OwnedSemaphorePermit,
}

impl std::fmt::Debug for HeldLock {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HeldLock")
            .field("key", &self.key.as_str())
            .field("fencing_token", &self.fencing_token)
            .finish()
    }
}

impl Locks {
    /// Locks on `pool`. `client_budget` lock connections at most go to clients.
    pub fn new(
        pool: LockPool,
        client_budget: u32,
        budget_wait: Duration,
        lease: Duration,
        default_wait: Duration,
    ) -> Self {
        Locks {
            pool,
            client_budget: Arc::new(Semaphore::new(usize::try_from(client_budget).unwrap_or(1).max(1))),
            budget_wait,
            lease,
            default_wait,
        }
    }

    /// The lease clients must renew within.
    pub fn lease(&self) -> Duration {
        self.lease
    }

    /// Runs `work` under the transaction-level advisory lock `key`, held on a
    /// lock-pool connection. `work` takes its own work-pool connection: the
    /// lock connection comes first, never the other way round. The lock is
    /// released when this returns, or when the future is dropped.
    pub async fn with_xact_lock<T, F, Fut>(&self, key: &str, work: F) -> Result<T>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<T>>,
    {
        let mut conn = LockConn::new(self.pool.acquire().await?);
        conn.conn()?.execute("BEGIN").await?;
        let locked = sqlx::query("SELECT pg_advisory_xact_lock(hashtextextended($1, 0))")
            .bind(key)
            .execute(conn.conn()?)
            .await;
        if let Err(err) = locked {
            let timed_out = sqlstate(&err).as_deref() == Some(LOCK_NOT_AVAILABLE);
            conn.finish(false).await?;
            if timed_out {
                let system_id = key.strip_prefix("health:").unwrap_or(key).to_owned();
                return Err(Error::SystemBusy { system_id });
            }
            return Err(err.into());
        }
        let result = work().await;
        conn.finish(result.is_ok()).await?;
        result
    }

    /// Takes a client's lock `key`, waiting at most `wait` (`None`: the
    /// server's default; zero: try once).
    ///
    /// A place in the client budget and then a lock connection are waited
    /// for together, within one `DATABASE_POOL_CONNECTION_TIMEOUT_MS`: a
    /// client that waited most of it for the budget does not wait that long
    /// again for the pool (SubmitRun may hold every connection the budget
    /// leaves free).
    pub async fn acquire(&self, key: LockKey, wait: Option<Duration>) -> Result<HeldLock> {
        let exhausted = |_| Error::PoolExhausted(PoolKind::Lock);
        let deadline = tokio::time::Instant::now() + self.budget_wait;
        let permit = tokio::time::timeout_at(deadline, self.client_budget.clone().acquire_owned())
            .await
            .map_err(exhausted)?
            .map_err(|_| Error::ShuttingDown)?;
        let conn = tokio::time::timeout_at(deadline, self.pool.acquire())
            .await
            .map_err(exhausted)??;
        let mut conn = LockConn::new(conn);
        let wait = wait.unwrap_or(self.default_wait);
        let full_key = format!("{CLIENT_KEY_PREFIX}{}", key.as_str());

        conn.conn()?.execute("BEGIN").await?;
        let granted = if wait.is_zero() {
            sqlx::query(
                "WITH l AS MATERIALIZED (SELECT pg_try_advisory_xact_lock(hashtextextended($1, 0)) AS got) \
                 SELECT CASE WHEN got THEN nextval('lock_fencing_tokens') END AS token FROM l",
            )
            .bind(&full_key)
            .fetch_one(conn.conn()?)
            .await
        } else {
            // lock_timeout is read when the wait begins, after set_config ran.
            let millis = wait.as_millis().clamp(1, i32::MAX as u128);
            sqlx::query(
                "SELECT set_config('lock_timeout', $2, true), \
                        pg_advisory_xact_lock(hashtextextended($1, 0)), \
                        nextval('lock_fencing_tokens') AS token",
            )
            .bind(&full_key)
            .bind(format!("{millis}ms"))
            .fetch_one(conn.conn()?)
            .await
        };
        let token = match granted {
            Ok(row) => row.try_get::<Option<i64>, _>("token")?,
            Err(err) if sqlstate(&err).as_deref() == Some(LOCK_NOT_AVAILABLE) => None,
            Err(err) => return Err(err.into()),
        };
        let Some(token) = token else {
            conn.finish(false).await?;
            return Err(Error::LockNotAvailable { key: key.into_inner() });
        };
        Ok(HeldLock {
            conn,
            key,
            fencing_token: u64::try_from(token).unwrap_or(0),
            acquired_at: Utc::now(),
            started: Instant::now(),
            _permit: permit,
        })
    }
}

impl HeldLock {
    /// The client's key.
    pub fn key(&self) -> &LockKey {
        &self.key
    }

    /// Proves the lock is still held and restarts the server's idle timer
    /// (`idle_in_transaction_session_timeout`).
    pub async fn keep_alive(&mut self) -> Result<()> {
        let alive = match self.conn.conn() {
            Ok(conn) => conn.execute("SELECT 1").await.is_ok(),
            Err(_) => false,
        };
        if alive {
            Ok(())
        } else {
            Err(self.lost("the lock's database session ended"))
        }
    }

    /// Releases the lock; returns how long it was held.
    pub async fn release(mut self) -> Result<Duration> {
        let held_for = self.started.elapsed();
        match self.conn.finish(false).await {
            Ok(()) => Ok(held_for),
            Err(_) => Err(self.lost("the lock's database session ended before release")),
        }
    }

    /// LOCK_LOST for this lock.
    pub fn lost(&self, why: &'static str) -> Error {
        Error::LockLost {
            key: self.key.as_str().to_owned(),
            why,
        }
    }
}

impl Drop for HeldLock {
    fn drop(&mut self) {
        if self.conn.clean {
            return;
        }
        // The client went away without releasing: roll back now rather than
        // wait for a timeout, so the next waiter gets the lock within one
        // round trip. If the runtime is gone, LockConn's drop closes the
        // session, which releases the lock too.
        let mut conn = LockConn {
            conn: self.conn.conn.take(),
            clean: false,
        };
        if let Ok(handle) = tokio::runtime::Handle::try_current() {
            handle.spawn(async move {
                if let Err(err) = conn.finish(false).await {
                    tracing::debug!(error = %err, "rollback of an abandoned lock failed; closing its session");
                }
            });
        }
    }
}
