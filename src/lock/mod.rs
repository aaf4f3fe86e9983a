//! Locks with fencing tokens: PostgreSQL advisory locks on the dedicated lock
//! pool, or, with the embedded store, locks held in process.
//!
//! Two users share one mechanism: vitals' own per-system serialisation
//! ([`Locks::with_xact_lock`], upstream's `withXactLock`) and clients'
//! `WithLock` streams ([`Locks::acquire`]). Both take the lock first and only
//! then, if at all, a work connection: the acquisition order is always lock
//! (pool), then work pool, so the upstream pool-starvation deadlock cannot
//! form.
//!
//! [`Locks`] and [`HeldLock`] are the one interface; which backend runs is an
//! enum inside them (`postgres`: transaction-level advisory locks, a lock
//! connection per lock; [`embedded`]: a fair in-process queue per key, a slot
//! per lock). The client budget, the lease and the defaults are shared.

pub mod embedded;
mod postgres;

use std::{
    future::Future,
    sync::Arc,
    time::{Duration, Instant},
};

use chrono::{DateTime, Utc};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use self::{embedded::LocalLocks, postgres::LockConn};
use crate::{
    config::Config,
    db::{Database, EmbeddedDb, LockPool},
    domain::LockKey,
    error::{Error, PoolKind, Result},
};

/// Prefix of client keys, so they never collide with vitals' internal keys
/// such as `health:<system_id>`.
pub const CLIENT_KEY_PREFIX: &str = "lock:";

/// The lock service of one vitals process.
#[derive(Debug, Clone)]
pub struct Locks {
    backend: Backend,
    /// Locks clients may occupy (held or waiting), so that clients can never
    /// starve vitals' own serialisation of SubmitRun.
    client_budget: Arc<Semaphore>,
    /// How long a client waits for a place in the budget.
    budget_wait: Duration,
    /// The WithLock lease.
    lease: Duration,
    /// WithLock's wait when the client gives none.
    default_wait: Duration,
}

/// Where locks are held.
#[derive(Debug, Clone)]
enum Backend {
    /// Advisory locks on lock-pool connections.
    Postgres(LockPool),
    /// In-process locks of the embedded store.
    Embedded(LocalLocks),
}

/// What in-process locks are in use right now (embedded store only).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LocalLockStats {
    /// Keys held or waited for: the lock table's size.
    pub keys: usize,
    /// Acquirers queued for a held key.
    pub waiting: usize,
}

/// A client's granted lock. Dropping it without [`HeldLock::release`]
/// releases it at once (with PostgreSQL: rolls the lock's transaction back
/// in the background).
pub struct HeldLock {
    hold: Hold,
    key: LockKey,
    /// Strictly increasing across all grants.
    pub fencing_token: u64,
    /// When the lock was granted.
    pub acquired_at: DateTime<Utc>,
    started: Instant,
    _permit: OwnedSemaphorePermit,
}

/// What keeps a granted lock held.
enum Hold {
    /// The lock connection with its open transaction.
    Postgres(LockConn),
    /// The key's in-process guard and the lock's slot, released by their drop.
    Embedded { _hold: embedded::LocalHold },
    /// Released (embedded): nothing is held any more.
    Released,
}

impl std::fmt::Debug for HeldLock {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HeldLock")
            .field("key", &self.key.as_str())
            .field("fencing_token", &self.fencing_token)
            .finish()
    }
}

fn semaphore(permits: u32) -> Arc<Semaphore> {
    Arc::new(Semaphore::new(usize::try_from(permits).unwrap_or(1).max(1)))
}

impl Locks {
    /// Advisory locks on `pool`. `client_budget` lock connections at most go
    /// to clients.
    pub fn postgres(
        pool: LockPool,
        client_budget: u32,
        budget_wait: Duration,
        lease: Duration,
        default_wait: Duration,
    ) -> Self {
        Locks {
            backend: Backend::Postgres(pool),
            client_budget: semaphore(client_budget),
            budget_wait,
            lease,
            default_wait,
        }
    }

    /// In-process locks for the embedded store `db`, sized and timed by
    /// `config` as the lock pool would be: `DATABASE_LOCK_POOL_MAX` locks held
    /// or awaited at once, of which the client budget goes to clients.
    pub fn embedded(db: EmbeddedDb, config: &Config) -> Self {
        Locks {
            backend: Backend::Embedded(LocalLocks::new(
                db,
                config.lock_pool_max,
                config.pool_connection_timeout(),
                config.lock_timeout(),
            )),
            client_budget: semaphore(config.client_lock_budget()),
            budget_wait: config.pool_connection_timeout(),
            lease: config.lock_lease(),
            default_wait: config.lock_timeout(),
        }
    }

    /// The locks of `database`, configured by `config`.
    pub fn for_database(database: &Database, config: &Config) -> Self {
        match database {
            Database::Postgres(pools) => Locks::postgres(
                pools.lock.clone(),
                config.client_lock_budget(),
                config.pool_connection_timeout(),
                config.lock_lease(),
                config.lock_timeout(),
            ),
            Database::Embedded(db) => Locks::embedded(db.clone(), config),
        }
    }

    /// The lease clients must renew within.
    pub fn lease(&self) -> Duration {
        self.lease
    }

    /// The in-process lock table's use, for the embedded store; `None` with
    /// PostgreSQL, whose `pg_locks` shows the same.
    pub fn local_stats(&self) -> Option<LocalLockStats> {
        match &self.backend {
            Backend::Postgres(_) => None,
            Backend::Embedded(local) => Some(LocalLockStats {
                keys: local.keys().keys_in_use(),
                waiting: local.keys().waiting(),
            }),
        }
    }

    /// Runs `work` under the lock `key` (with PostgreSQL, a transaction-level
    /// advisory lock held on a lock-pool connection). `work` takes its own
    /// work connection: the lock comes first, never the other way round. The
    /// lock is released when this returns, or when the future is dropped.
    /// Not granted within `DATABASE_LOCK_TIMEOUT_MS`: `SYSTEM_BUSY`.
    pub async fn with_xact_lock<T, F, Fut>(&self, key: &str, work: F) -> Result<T>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<T>>,
    {
        match &self.backend {
            Backend::Postgres(pool) => postgres::with_xact_lock(pool, key, work).await,
            Backend::Embedded(local) => local.with_xact_lock(key, work).await,
        }
    }

    /// Takes a client's lock `key`, waiting at most `wait` (`None`: the
    /// server's default; zero: try once).
    ///
    /// A place in the client budget and then a lock connection (embedded: a
    /// lock slot) are waited for together, within one
    /// `DATABASE_POOL_CONNECTION_TIMEOUT_MS`: a client that waited most of it
    /// for the budget does not wait that long again for the pool (SubmitRun
    /// may hold every connection the budget leaves free).
    pub async fn acquire(&self, key: LockKey, wait: Option<Duration>) -> Result<HeldLock> {
        let exhausted = |_| Error::PoolExhausted(PoolKind::Lock);
        let deadline = tokio::time::Instant::now() + self.budget_wait;
        let permit = tokio::time::timeout_at(deadline, self.client_budget.clone().acquire_owned())
            .await
            .map_err(exhausted)?
            .map_err(|_| Error::ShuttingDown)?;
        let wait = wait.unwrap_or(self.default_wait);
        let full_key = format!("{CLIENT_KEY_PREFIX}{}", key.as_str());
        let granted = match &self.backend {
            Backend::Postgres(pool) => postgres::acquire(pool, deadline, &full_key, wait)
                .await?
                .map(|(conn, token)| (Hold::Postgres(conn), token)),
            Backend::Embedded(local) => local
                .acquire(deadline, &full_key, wait)
                .await?
                .map(|(hold, token)| (Hold::Embedded { _hold: hold }, token)),
        };
        let Some((hold, fencing_token)) = granted else {
            return Err(Error::LockNotAvailable { key: key.into_inner() });
        };
        Ok(HeldLock {
            hold,
            key,
            fencing_token,
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

    /// Proves the lock is still held (with PostgreSQL, restarts the server's
    /// idle timer, `idle_in_transaction_session_timeout`).
    pub async fn keep_alive(&mut self) -> Result<()> {
        let alive = match &mut self.hold {
            Hold::Postgres(conn) => conn.keep_alive().await,
            Hold::Embedded { .. } => true,
            Hold::Released => false,
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
        let released = match &mut self.hold {
            Hold::Postgres(conn) => conn.release().await.is_ok(),
            Hold::Embedded { .. } => {
                self.hold = Hold::Released;
                true
            }
            Hold::Released => false,
        };
        if released {
            Ok(held_for)
        } else {
            Err(self.lost("the lock's database session ended before release"))
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
        // The client went away without releasing. In process the guard's
        // own drop releases the key; a PostgreSQL lock is rolled back now
        // rather than after a timeout, so the next waiter gets the lock
        // within one round trip.
        if let Hold::Postgres(conn) = &mut self.hold {
            conn.abandon();
        }
    }
}
