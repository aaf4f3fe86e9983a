//! Locks as PostgreSQL transaction-level advisory locks on the lock pool.
//!
//! A lock connection whose state is unknown (a statement was in flight when
//! its future was dropped, or an error left the transaction in doubt) is
//! closed, never returned to the pool: closing the session is what releases
//! any lock it may hold.

use std::{future::Future, time::Duration};

use sqlx::{Executor, PgConnection, Postgres, Row, pool::PoolConnection};

use crate::{
    db::LockPool,
    error::{Error, PoolKind, Result, sqlstate},
};

/// SQLSTATE `lock_not_available`: `lock_timeout` expired.
const LOCK_NOT_AVAILABLE: &str = "55P03";

/// A lock-pool connection that is closed instead of returned unless the code
/// that used it declared it clean (no transaction open, nothing in flight).
pub(super) struct LockConn {
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

    /// Proves the lock is still held and restarts the server's idle timer
    /// (`idle_in_transaction_session_timeout`).
    pub(super) async fn keep_alive(&mut self) -> bool {
        match self.conn() {
            Ok(conn) => conn.execute("SELECT 1").await.is_ok(),
            Err(_) => false,
        }
    }

    /// Releases the lock by rolling its transaction back.
    pub(super) async fn release(&mut self) -> Result<()> {
        self.finish(false).await
    }

    /// The holder went away without releasing: roll back now rather than
    /// wait for a timeout, so the next waiter gets the lock within one round
    /// trip. If the runtime is gone, LockConn's drop closes the session,
    /// which releases the lock too.
    pub(super) fn abandon(&mut self) {
        if self.clean {
            return;
        }
        let mut conn = LockConn {
            conn: self.conn.take(),
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

impl Drop for LockConn {
    fn drop(&mut self) {
        if !self.clean
            && let Some(conn) = self.conn.take()
        {
            // Dropping the detached connection closes its socket; the
            // server then ends the session and with it any lock.
            tracing::debug!("closing a lock connection in an unknown state");
            drop(conn.detach());
        }
    }
}

/// Runs `work` under the transaction-level advisory lock `key`, held on a
/// lock-pool connection; see [`super::Locks::with_xact_lock`].
pub(super) async fn with_xact_lock<T, F, Fut>(pool: &LockPool, key: &str, work: F) -> Result<T>
where
    F: FnOnce() -> Fut,
    Fut: Future<Output = Result<T>>,
{
    let mut conn = LockConn::new(pool.acquire().await?);
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

/// Takes the client lock `full_key` on a lock connection drawn by `deadline`,
/// waiting at most `wait` for the lock (zero: try once). `None` when it was
/// not granted in time; otherwise the held connection and the fencing token,
/// a PostgreSQL sequence read after the grant.
pub(super) async fn acquire(
    pool: &LockPool,
    deadline: tokio::time::Instant,
    full_key: &str,
    wait: Duration,
) -> Result<Option<(LockConn, u64)>> {
    let conn = tokio::time::timeout_at(deadline, pool.acquire())
        .await
        .map_err(|_| Error::PoolExhausted(PoolKind::Lock))??;
    let mut conn = LockConn::new(conn);

    conn.conn()?.execute("BEGIN").await?;
    let granted = if wait.is_zero() {
        sqlx::query(
            "WITH l AS MATERIALIZED (SELECT pg_try_advisory_xact_lock(hashtextextended($1, 0)) AS got) \
             SELECT CASE WHEN got THEN nextval('lock_fencing_tokens') END AS token FROM l",
        )
        .bind(full_key)
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
        .bind(full_key)
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
        return Ok(None);
    };
    Ok(Some((conn, u64::try_from(token).unwrap_or(0))))
}
