//! Locks of the embedded store, held in process: one vitals process owns its
//! data directory (see [`crate::db::embedded`]), so its memory is the only
//! place a lock can be held.
//!
//! The contract is PostgreSQL's: a fair (first come, first served) queue per
//! key, try-lock and bounded waits, release the moment the holder lets go or
//! vanishes, `DATABASE_LOCK_POOL_MAX` locks held or awaited at once with the
//! client budget inside it, and fencing tokens that only ever rise, across
//! restarts too: they are handed out from blocks reserved in the database
//! (hi-lo), so a restart continues above everything handed out before.

use std::{
    collections::HashMap,
    future::Future,
    sync::{
        Arc, Mutex, PoisonError,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use tokio::sync::{OwnedMutexGuard, OwnedSemaphorePermit, Semaphore};

use crate::{
    db::EmbeddedDb,
    error::{Error, PoolKind, Result},
};

/// Fencing tokens reserved per write to the database.
const TOKEN_BLOCK: u64 = 1000;

/// In-process exclusive locks by key. A key has an entry only while someone
/// holds or waits for it, so the table never grows with the number of keys
/// or acquisitions, only with the locks in use.
#[derive(Debug, Clone, Default)]
pub struct KeyLocks {
    table: Arc<KeyTable>,
}

#[derive(Debug, Default)]
struct KeyTable {
    keys: Mutex<HashMap<String, Entry>>,
    /// Acquirers currently queued for a held key.
    waiting: AtomicUsize,
}

#[derive(Debug)]
struct Entry {
    /// Tokio's mutex queues waiters fairly, like PostgreSQL's lock queue.
    lock: Arc<tokio::sync::Mutex<()>>,
    /// Holders and waiters of the key; the entry goes when it drops to zero.
    users: usize,
}

/// One user's interest in a key; the last one to go removes the entry.
#[derive(Debug)]
struct KeyUse {
    table: Arc<KeyTable>,
    key: String,
}

impl Drop for KeyUse {
    fn drop(&mut self) {
        let mut keys = self.table.keys.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(entry) = keys.get_mut(&self.key) {
            entry.users = entry.users.saturating_sub(1);
            if entry.users == 0 {
                keys.remove(&self.key);
            }
        }
    }
}

/// A held key: dropping it releases the key to the next waiter.
#[derive(Debug)]
pub struct KeyGuard {
    // Field order is drop order: release the lock, then leave the table.
    _guard: OwnedMutexGuard<()>,
    _use: KeyUse,
}

/// Counts a queued acquirer for as long as it waits (or until it is dropped).
struct Waiting<'a>(&'a AtomicUsize);

impl<'a> Waiting<'a> {
    fn new(count: &'a AtomicUsize) -> Self {
        count.fetch_add(1, Ordering::SeqCst);
        Waiting(count)
    }
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

impl KeyLocks {
    /// Takes `key`, waiting at most `wait` (zero: try once). `None` when it
    /// was not granted in time. Dropping the future gives up the wait.
    pub async fn lock(&self, key: &str, wait: Duration) -> Option<KeyGuard> {
        let (key_use, lock) = {
            let mut keys = self.table.keys.lock().unwrap_or_else(PoisonError::into_inner);
            let entry = keys.entry(key.to_owned()).or_insert_with(|| Entry {
                lock: Arc::default(),
                users: 0,
            });
            entry.users += 1;
            let key_use = KeyUse {
                table: self.table.clone(),
                key: key.to_owned(),
            };
            (key_use, entry.lock.clone())
        };
        let guard = match lock.clone().try_lock_owned() {
            Ok(guard) => Some(guard),
            Err(_) if wait.is_zero() => None,
            Err(_) => {
                let _waiting = Waiting::new(&self.table.waiting);
                tokio::time::timeout(wait, lock.lock_owned()).await.ok()
            }
        };
        // Without a guard, `key_use` goes here and may remove the entry.
        guard.map(|guard| KeyGuard {
            _guard: guard,
            _use: key_use,
        })
    }

    /// Keys held or waited for right now.
    pub fn keys_in_use(&self) -> usize {
        self.table.keys.lock().unwrap_or_else(PoisonError::into_inner).len()
    }

    /// Acquirers queued for a held key right now.
    pub fn waiting(&self) -> usize {
        self.table.waiting.load(Ordering::SeqCst)
    }
}

/// Fencing tokens handed out in order from blocks reserved in the database.
#[derive(Debug, Clone)]
struct FencingTokens {
    db: EmbeddedDb,
    block: Arc<tokio::sync::Mutex<TokenBlock>>,
}

/// Tokens `next..=last` are reserved and not handed out yet.
#[derive(Debug)]
struct TokenBlock {
    next: u64,
    last: u64,
}

impl FencingTokens {
    fn new(db: EmbeddedDb) -> Self {
        FencingTokens {
            db,
            // Empty: the first token reserves a block.
            block: Arc::new(tokio::sync::Mutex::new(TokenBlock { next: 1, last: 0 })),
        }
    }

    /// The next token: above every token handed out before, by this process
    /// or any earlier one on the same data directory.
    async fn next(&self) -> Result<u64> {
        let mut block = self.block.lock().await;
        if block.next > block.last {
            let mut conn = self.db.writer().await?;
            let reserved: i64 = sqlx::query_scalar(
                "UPDATE fencing_tokens SET reserved_through = reserved_through + $1 WHERE id = 1 \
                 RETURNING reserved_through",
            )
            .bind(i64::try_from(TOKEN_BLOCK).unwrap_or(1000))
            .fetch_one(&mut *conn)
            .await?;
            let last = u64::try_from(reserved)
                .ok()
                .filter(|last| *last >= TOKEN_BLOCK)
                .ok_or_else(|| Error::Internal(format!("stored fencing token block {reserved} is invalid")))?;
            *block = TokenBlock {
                next: last - TOKEN_BLOCK + 1,
                last,
            };
        }
        let token = block.next;
        block.next += 1;
        Ok(token)
    }
}

/// What an embedded lock holds until it is released.
#[derive(Debug)]
pub(super) struct LocalHold {
    _key: KeyGuard,
    _slot: OwnedSemaphorePermit,
}

/// The embedded lock service's state.
#[derive(Debug, Clone)]
pub(super) struct LocalLocks {
    keys: KeyLocks,
    /// Locks held or waited for at once, clients' and vitals' own: what the
    /// lock pool's size (`DATABASE_LOCK_POOL_MAX`) bounds with PostgreSQL.
    slots: Arc<Semaphore>,
    /// How long to wait for a slot: `DATABASE_POOL_CONNECTION_TIMEOUT_MS`.
    slot_wait: Duration,
    /// How long vitals' own serialisation waits: `DATABASE_LOCK_TIMEOUT_MS`.
    system_wait: Duration,
    tokens: FencingTokens,
}

impl LocalLocks {
    pub(super) fn new(db: EmbeddedDb, slots: u32, slot_wait: Duration, system_wait: Duration) -> Self {
        LocalLocks {
            keys: KeyLocks::default(),
            slots: Arc::new(Semaphore::new(usize::try_from(slots).unwrap_or(1).max(1))),
            slot_wait,
            system_wait,
            tokens: FencingTokens::new(db),
        }
    }

    pub(super) fn keys(&self) -> &KeyLocks {
        &self.keys
    }

    async fn slot(&self, deadline: tokio::time::Instant) -> Result<OwnedSemaphorePermit> {
        tokio::time::timeout_at(deadline, self.slots.clone().acquire_owned())
            .await
            .map_err(|_| Error::PoolExhausted(PoolKind::Lock))?
            .map_err(|_| Error::ShuttingDown)
    }

    /// Runs `work` holding `key`; see [`super::Locks::with_xact_lock`].
    pub(super) async fn with_xact_lock<T, F, Fut>(&self, key: &str, work: F) -> Result<T>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<T>>,
    {
        let _slot = self.slot(tokio::time::Instant::now() + self.slot_wait).await?;
        let Some(_held) = self.keys.lock(key, self.system_wait).await else {
            let system_id = key.strip_prefix("health:").unwrap_or(key).to_owned();
            return Err(Error::SystemBusy { system_id });
        };
        work().await
    }

    /// Takes the client lock `full_key` with a slot drawn by `deadline`,
    /// waiting at most `wait` for the key (zero: try once). `None` when it
    /// was not granted in time; otherwise the hold and its fencing token.
    pub(super) async fn acquire(
        &self,
        deadline: tokio::time::Instant,
        full_key: &str,
        wait: Duration,
    ) -> Result<Option<(LocalHold, u64)>> {
        let slot = self.slot(deadline).await?;
        let Some(key) = self.keys.lock(full_key, wait).await else {
            return Ok(None);
        };
        // Drawn while the key is held, so tokens rise in grant order. If
        // this fails, the key is released on the way out.
        let token = self.tokens.next().await?;
        Ok(Some((LocalHold { _key: key, _slot: slot }, token)))
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    const SHORT: Duration = Duration::from_millis(50);

    #[tokio::test]
    async fn a_held_key_is_refused_to_a_try_and_granted_in_turn_to_a_waiter() {
        let locks = KeyLocks::default();
        let held = locks.lock("k", Duration::ZERO).await.expect("a free key");
        assert!(locks.lock("k", Duration::ZERO).await.is_none(), "try on a held key");
        assert!(locks.lock("k", SHORT).await.is_none(), "a short wait times out");
        assert!(
            locks.lock("other", Duration::ZERO).await.is_some(),
            "keys are independent"
        );
        let waiter = tokio::spawn({
            let locks = locks.clone();
            async move { locks.lock("k", Duration::from_secs(10)).await.is_some() }
        });
        while locks.waiting() == 0 {
            tokio::task::yield_now().await;
        }
        drop(held);
        assert!(waiter.await.unwrap(), "the waiter gets the released key");
    }

    #[tokio::test]
    async fn waiters_are_served_first_come_first_served() {
        let locks = KeyLocks::default();
        let held = locks.lock("k", Duration::ZERO).await.unwrap();
        let order = Arc::new(Mutex::new(Vec::new()));
        let mut waiters = Vec::new();
        for i in 0..5 {
            let (waiter, order) = (locks.clone(), order.clone());
            waiters.push(tokio::spawn(async move {
                let _g = waiter.lock("k", Duration::from_secs(10)).await.unwrap();
                order.lock().unwrap().push(i);
            }));
            while locks.waiting() < i + 1 {
                tokio::task::yield_now().await;
            }
        }
        drop(held);
        for w in waiters {
            w.await.unwrap();
        }
        assert_eq!(*order.lock().unwrap(), [0, 1, 2, 3, 4]);
    }

    #[tokio::test]
    async fn the_table_holds_no_entry_for_a_key_nobody_holds_or_waits_for() {
        let locks = KeyLocks::default();
        for i in 0..2000 {
            let key = format!("key-{}", i % 7);
            let _held = locks.lock(&key, Duration::ZERO).await.unwrap();
        }
        assert_eq!(locks.keys_in_use(), 0);

        // A waiter that times out, and one whose wait is dropped, leave nothing behind.
        let held = locks.lock("k", Duration::ZERO).await.unwrap();
        assert!(locks.lock("k", SHORT).await.is_none());
        let abandoned = tokio::spawn({
            let locks = locks.clone();
            async move { locks.lock("k", Duration::from_secs(60)).await.is_some() }
        });
        while locks.waiting() == 0 {
            tokio::task::yield_now().await;
        }
        abandoned.abort();
        assert!(abandoned.await.unwrap_err().is_cancelled());
        assert_eq!(locks.waiting(), 0);
        assert_eq!(locks.keys_in_use(), 1, "only the held key");
        drop(held);
        assert_eq!(locks.keys_in_use(), 0);
    }

    #[tokio::test]
    async fn fencing_tokens_rise_across_reopening_the_data_dir() {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("--database-url=sqlite://{}/vitals.db", dir.path().display());
        let config = crate::Config::from_flags([url]).unwrap();
        let mut last = 0;
        for _ in 0..3 {
            let db = EmbeddedDb::open(&config).await.unwrap();
            let tokens = FencingTokens::new(db.clone());
            for _ in 0..1500 {
                let token = tokens.next().await.unwrap();
                assert!(token > last, "{token} after {last}");
                last = token;
            }
            db.close().await;
        }
    }
}
