//! Locks as PostgreSQL transaction-level advisory locks on the lock pool.
//!
//! A lock connection whose state is unknown (a statement was in flight when
//! its future was dropped, or an error left the transaction in doubt) is
//! closed, never returned to the pool: closing the session is what releases
//! any lock it may hold.

use std::{future::Future, time::Duration};

use sqlx::{Executor, PgConnection, Postgres, Row, pool::PoolConnection, postgres::PgRow};

use crate::{
    db::LockPool,
    error::{Error, PoolKind, Result, is_connection_lost, sqlstate},
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

/// `key` as a PostgreSQL string literal, whatever `standard_conforming_strings`
/// says: an escape string (`E'...'`) in which backslashes and quotes are
/// doubled. Keys are text, which never contains NUL.
fn escape_literal(key: &str) -> String {
    let mut out = String::with_capacity(key.len() + 3);
    out.push_str("E'");
    for c in key.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '\'' => out.push_str("''"),
            c => out.push(c),
        }
    }
    out.push('\'');
    out
}

/// `BEGIN` and the lock on `key` in one round trip: a simple-query message
/// carrying both statements (unprepared; PostgreSQL parses and plans it
/// anew each time, which for this statement costs less than a round trip).
/// The transaction stays open after it, holding the lock.
fn begin_and_lock_sql(key: &str) -> String {
    format!(
        "BEGIN; SELECT pg_advisory_xact_lock(hashtextextended({}, 0))",
        escape_literal(key)
    )
}

/// A lock connection with `BEGIN` and `sql` (which starts with `BEGIN;` and
/// takes the lock) sent on it. A connection found broken by that first round
/// trip (its backend died while it was idle in the pool) cannot be holding
/// anything, so it is closed and `sql` sent once more on a connection the
/// pool checks first.
async fn begin_locked(
    pool: &LockPool,
    deadline: Option<tokio::time::Instant>,
    sql: &str,
) -> Result<(LockConn, std::result::Result<Vec<PgRow>, sqlx::Error>)> {
    let mut retried = false;
    loop {
        let conn = match deadline {
            Some(deadline) => tokio::time::timeout_at(deadline, pool.acquire())
                .await
                .map_err(|_| Error::PoolExhausted(PoolKind::Lock))??,
            None => pool.acquire().await?,
        };
        let mut conn = LockConn::new(conn);
        // A `&str` without arguments goes out as one simple-query message.
        let sent = conn.conn()?.fetch_all(sql).await;
        match sent {
            Err(err) if !retried && is_connection_lost(&err) => {
                pool.health().note_broken();
                tracing::debug!(error = %err, "lock connection found broken; retrying on another");
                retried = true;
                // Dropped unclean: closed, never returned to the pool.
                drop(conn);
            }
            sent => return Ok((conn, sent)),
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
    let (mut conn, locked) = begin_locked(pool, None, &begin_and_lock_sql(key)).await?;
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
    // BEGIN, the lock and the fencing token in one round trip (see
    // `begin_and_lock_sql`).
    let sql = if wait.is_zero() {
        format!(
            "BEGIN; WITH l AS MATERIALIZED (SELECT pg_try_advisory_xact_lock(hashtextextended({}, 0)) AS got) \
             SELECT CASE WHEN got THEN nextval('lock_fencing_tokens') END AS token FROM l",
            escape_literal(full_key)
        )
    } else {
        // lock_timeout is read when the wait begins, after set_config ran.
        let millis = wait.as_millis().clamp(1, i32::MAX as u128);
        format!(
            "BEGIN; SELECT set_config('lock_timeout', '{millis}ms', true), \
                    pg_advisory_xact_lock(hashtextextended({}, 0)), \
                    nextval('lock_fencing_tokens') AS token",
            escape_literal(full_key)
        )
    };
    let (mut conn, granted) = begin_locked(pool, Some(deadline), &sql).await?;
    let token = match granted {
        Ok(rows) => match rows.first() {
            Some(row) => row.try_get::<Option<i64>, _>("token")?,
            None => return Err(Error::Internal("the lock statement returned no row".into())),
        },
        Err(err) if sqlstate(&err).as_deref() == Some(LOCK_NOT_AVAILABLE) => None,
        Err(err) => return Err(err.into()),
    };
    let Some(token) = token else {
        conn.finish(false).await?;
        return Ok(None);
    };
    Ok(Some((conn, u64::try_from(token).unwrap_or(0))))
}

#[cfg(test)]
mod tests {
    use super::escape_literal;

    #[test]
    fn keys_become_escape_string_literals() {
        assert_eq!(escape_literal("health:sys"), "E'health:sys'");
        assert_eq!(escape_literal("a'b"), "E'a''b'");
        assert_eq!(escape_literal(r"a\b"), r"E'a\\b'");
        assert_eq!(escape_literal(r"'\'; DROP TABLE x; --"), r"E'''\\''; DROP TABLE x; --'");
    }
}
