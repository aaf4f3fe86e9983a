//! The lock manager of one replica: fencing-token locks for clients'
//! `WithLock` streams and vitals' own per-system serialisation.
//!
//! A held lock costs almost nothing: an entry in the in-process lock table
//! ([`table`]) and, with PostgreSQL, a session-level advisory lock on one of
//! `DATABASE_LOCK_POOL_MAX` long-lived sessions the manager owns
//! ([`session`]), many locks per session. Only the head of a key's local
//! queue involves PostgreSQL; the other waiters wait here. With the embedded
//! store the table is all there is ([`embedded`] keeps the tokens).
//!
//! The pool rule stays: a request takes its lock (on the lock sessions)
//! before it takes a work connection, never the reverse, and lock sessions
//! never wait for a work connection, so the upstream pool-starvation
//! deadlock cannot form.
//!
//! # Layout
//! - [`id`]: what a lock is called in PostgreSQL; client keys and vitals'
//!   own locks live in advisory-lock spaces that cannot meet.
//! - [`table`]: fair local queues, hand-off between local holders.
//! - [`shared`]: a key's shared holders of one replica, held as one group.
//! - [`semaphore`]: keys held by at most N holders, as N slots.
//! - [`session`]: the PostgreSQL sessions, batching, heartbeats, fencing
//!   tokens, lease under faults.
//! - [`embedded`]: the embedded store's fencing tokens.
//! - [`inventory`]: who holds and waits for which key, on every replica.
//! - [`election`]: leadership as a lock, and its observers.

pub mod election;
pub mod embedded;
pub mod id;
pub mod inventory;
mod pghash;
pub mod semaphore;
pub mod session;
pub mod shared;
pub mod table;

use std::{
    future::Future,
    sync::{
        Arc, OnceLock,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use chrono::{DateTime, Utc};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, oneshot, watch};
use tokio_util::sync::{CancellationToken, WaitForCancellationFutureOwned};
use tracing::Instrument;

pub use self::id::{CLIENT_KEY_PREFIX, LockId};
use self::{
    embedded::FencingTokens,
    inventory::{Inventory, Listing, Row},
    semaphore::{SemaphoreUse, Semaphores},
    session::{SessionHold, Sessions, Timing, TryOutcome},
    shared::{Member, Readers, Step},
    table::{Entry, FAIR_PAUSE, Owned, Release, Remote, Table, Tokens},
};
use crate::{
    config::Config,
    db::Database,
    domain::{LockKey, Namespace, Owner, SystemId},
    error::{Error, Result},
    telemetry::metrics::{Holding, LockMetrics, LostReason},
};

/// Why a lock is lost when its holder sent neither `keep_alive` nor `release`
/// within the lease.
pub const LEASE_LAPSED: &str = "no keep_alive or release within the lease";

/// How long the first semaphore acquire of a key on a replica waits for the
/// sizes other replicas published of it before it goes on without them.
const SIZE_CHECK_TIMEOUT: Duration = Duration::from_secs(1);

/// How long a WithLock stream may take to send its `acquire`.
pub const ACQUIRE_MESSAGE_TIMEOUT: Duration = Duration::from_secs(5);

/// How long before its request's deadline a wait for a system's lock gives
/// up. The client's clock started when it sent the request, the server's
/// when it arrived, so the client gives up earlier by the request's one-way
/// trip; a refusal sent at the server's deadline would find nobody waiting.
/// Sent before it, the client hears `SYSTEM_BUSY`, which says "retry", where
/// `DEADLINE_EXCEEDED` says nothing.
pub const SYSTEM_BUSY_MARGIN: Duration = Duration::from_millis(250);

/// Until when a request that arrived at `now` waits for a system's lock:
/// `system_wait` at most, and no later than [`SYSTEM_BUSY_MARGIN`] before
/// its `deadline`. `None`: no time is left to wait, try once (a free lock is
/// still taken).
fn system_wait_until(
    now: tokio::time::Instant,
    system_wait: Duration,
    deadline: Option<tokio::time::Instant>,
) -> Option<tokio::time::Instant> {
    let mut until = now + system_wait;
    if let Some(deadline) = deadline {
        until = until.min(deadline.checked_sub(SYSTEM_BUSY_MARGIN).unwrap_or(now));
    }
    (until > now).then_some(until)
}

/// The lock service of one vitals process.
#[derive(Debug, Clone)]
pub struct Locks {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    table: Table,
    /// Shared holders, by key.
    readers: Readers,
    /// Semaphores in use here, by key.
    semaphores: Semaphores,
    /// This replica's WithLock streams, for listings.
    inventory: Inventory,
    /// Where the other replicas' streams are read (PostgreSQL's work pool).
    published: Option<sqlx::PgPool>,
    /// Elections' leaders, for observers.
    elections: election::Elections,
    backend: Backend,
    /// Client locks held, waited for or about to be asked for:
    /// `VITALS_MAX_LOCKS`.
    budget: Arc<Semaphore>,
    /// The WithLock lease.
    lease: Duration,
    /// WithLock's wait when the client gives none.
    default_wait: Duration,
    /// The longest wait a client may ask for.
    max_wait: Duration,
    /// How long vitals' own serialisation waits.
    system_wait: Duration,
    /// Turns true when the lock sessions must close.
    shutdown: watch::Sender<bool>,
    /// Streaks that ended in a release because another replica waited.
    yields: AtomicU64,
    /// Cancelled at the same moment: lock streams wait on it, and a
    /// cancellation future is small and nameable, which keeps what a held
    /// lock's stream stores small.
    stop: CancellationToken,
    /// Where grants, waits, holds and losses are counted, once the server
    /// set it ([`Locks::report_to`]).
    metrics: OnceLock<LockMetrics>,
}

/// Where locks are held beyond the table.
#[derive(Debug, Clone)]
enum Backend {
    Postgres(Arc<Sessions>),
    Embedded(FencingTokens),
}

/// The embedded store holds locks only in the table: releasing beyond it is
/// nothing.
#[derive(Debug)]
struct NothingBeyond;

impl Release for NothingBeyond {
    fn release(&self, _: LockId, _: SessionHold, ack: Option<oneshot::Sender<()>>) {
        if let Some(ack) = ack {
            let _ = ack.send(());
        }
    }
}

/// What the lock table holds right now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LocalLockStats {
    /// Locks owned or waited for.
    pub keys: usize,
    /// Acquirers queued behind a local owner.
    pub waiting: usize,
}

/// Releases in PostgreSQL at the end of a streak of local hand-offs (see
/// [`table`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StreakReleases {
    /// Because another replica announced that it waits.
    pub for_waiters: u64,
    /// Every [`table::KEEP_STREAKS`] + 1 streaks, for programs that wait in
    /// PostgreSQL itself.
    pub periodic: u64,
}

/// A place in the client budget, taken when a WithLock stream opens.
#[derive(Debug)]
pub struct LockPermit {
    _permit: OwnedSemaphorePermit,
}

/// How a client holds a key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Alone.
    Exclusive,
    /// With other shared holders, never with an exclusive one.
    Shared,
    /// With at most this many holders (2 to [`semaphore::MAX_HOLDERS`]).
    Semaphore(u32),
}

/// What a granted lock holds.
#[derive(Debug)]
enum Hold {
    /// The key, alone.
    Exclusive(Owned),
    /// A place in the key's group of shared holders (boxed: every held
    /// lock's stream stores a `Hold`, and most are exclusive).
    Shared(Box<Member>),
}

/// A client's granted lock. Dropping it releases it (or hands it to the
/// next local waiter).
pub struct HeldLock {
    hold: Hold,
    key: LockKey,
    /// Strictly increasing across all grants.
    pub fencing_token: u64,
    /// When the lock was granted.
    pub acquired_at: DateTime<Utc>,
    started: Instant,
    /// Cancelled at shutdown, or when the lock is lost (see [`HeldLock::ended`]).
    ended: CancellationToken,
    sessions: Option<Arc<Sessions>>,
    _permit: LockPermit,
    /// Counts the lock as held until it is dropped.
    holding: Option<Holding>,
    /// Keeps the size of the key's semaphore while held (boxed, as rare).
    _semaphore: Option<Box<SemaphoreUse>>,
}

impl std::fmt::Debug for HeldLock {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HeldLock")
            .field("key", &self.key.as_str())
            .field("fencing_token", &self.fencing_token)
            .finish_non_exhaustive()
    }
}

/// An acquirer's announced interest in a lock held elsewhere, withdrawn
/// when it stops waiting (granted, gave up or gone).
struct Interest {
    sessions: Option<Arc<Sessions>>,
    id: LockId,
}

impl Drop for Interest {
    fn drop(&mut self) {
        if let Some(sessions) = self.sessions.take() {
            sessions.uninterest(self.id);
        }
    }
}

/// A lock owned here, with its token.
struct Grant {
    owned: Owned,
    token: Option<u64>,
}

impl Locks {
    /// The locks of `database`, configured by `config`. With PostgreSQL the
    /// sessions connect at their first use.
    pub fn for_database(database: &Database, config: &Config) -> Self {
        let (shutdown, shutdown_rx) = watch::channel(false);
        let stop = CancellationToken::new();
        let inventory = Inventory::new(config.replica_name());
        let published = match database {
            Database::Postgres(pools) => {
                let pool = pools.work.pool().clone();
                tokio::spawn(inventory::publish(inventory.clone(), pool.clone(), shutdown_rx.clone()));
                Some(pool)
            }
            Database::Embedded(_) => None,
        };
        let (backend, release): (Backend, Arc<dyn Release>) = match database {
            Database::Postgres(pools) => {
                let timing = Timing::for_lease(config.lock_lease(), config.pool_connection_timeout());
                let sessions = Sessions::start(config.lock_pool_max, pools.lock.options(), timing, shutdown_rx, &stop);
                (Backend::Postgres(sessions.clone()), sessions)
            }
            Database::Embedded(db) => (
                Backend::Embedded(FencingTokens::new(db.clone())),
                Arc::new(NothingBeyond),
            ),
        };
        Locks {
            inner: Arc::new(Inner {
                table: Table::new(release.clone()),
                readers: Readers::new(release),
                semaphores: Semaphores::default(),
                inventory,
                elections: election::Elections::new(published.clone()),
                published,
                backend,
                budget: Arc::new(Semaphore::new(usize::try_from(config.max_locks).unwrap_or(10_000))),
                lease: config.lock_lease(),
                default_wait: config.lock_timeout().min(config.max_lock_wait()),
                max_wait: config.max_lock_wait(),
                system_wait: config.lock_timeout(),
                shutdown,
                yields: AtomicU64::new(0),
                stop,
                metrics: OnceLock::new(),
            }),
        }
    }

    /// Counts grants, waits, holds and losses of client locks into
    /// `metrics` from now on (in every clone).
    pub fn report_to(&self, metrics: LockMetrics) {
        let _ = self.inner.metrics.set(metrics);
    }

    /// The lease clients must renew within.
    pub fn lease(&self) -> Duration {
        self.inner.lease
    }

    /// What the lock table holds right now.
    pub fn local_stats(&self) -> LocalLockStats {
        LocalLockStats {
            keys: self.inner.table.keys_in_use(),
            waiting: self.inner.table.waiting(),
        }
    }

    /// How the streaks of local hand-offs of keys also wanted elsewhere
    /// ended, since the start.
    pub fn streak_releases(&self) -> StreakReleases {
        StreakReleases {
            for_waiters: self.inner.yields.load(Ordering::Relaxed),
            periodic: self.inner.table.periodic_releases(),
        }
    }

    /// Lists a WithLock stream that asks for `key` as `mode` for `owner`,
    /// until the returned listing is dropped.
    pub fn list(&self, key: &LockKey, owner: &Owner, mode: Mode) -> Listing {
        self.inner.inventory.enter(key, owner, mode)
    }

    /// This replica's name in listings.
    pub fn replica(&self) -> &str {
        self.inner.inventory.replica()
    }

    /// The holders and waiters of keys starting with `prefix`, after
    /// `after` and in `visible`, on this replica and the others: enough rows
    /// for the first `keys` held keys in key order (see [`inventory`]).
    pub async fn inventory(
        &self,
        prefix: &str,
        visible: &Namespace,
        after: Option<&str>,
        keys: usize,
        exact: bool,
    ) -> Result<Vec<Row>> {
        let mut rows: Vec<Row> = self.inner.inventory.local(prefix, visible, after, exact);
        if let Some(pool) = &self.inner.published {
            let remote = inventory::remote(
                pool,
                self.replica(),
                prefix,
                visible,
                after,
                i64::try_from(keys).unwrap_or(i64::MAX),
                exact,
            )
            .await?;
            // Keys held here but not elsewhere may have waiters elsewhere.
            let seen: std::collections::HashSet<&str> = remote.iter().map(|r| r.key.as_str()).collect();
            let mut held_here: Vec<String> = rows
                .iter()
                .filter(|r| r.holding && !seen.contains(r.key.as_str()))
                .map(|r| r.key.clone())
                .collect();
            held_here.sort_unstable();
            held_here.dedup();
            held_here.truncate(keys);
            let waiting = if exact || held_here.is_empty() {
                Vec::new()
            } else {
                inventory::remote_keys(pool, self.replica(), &held_here).await?
            };
            rows.extend(remote);
            rows.extend(waiting);
        }
        Ok(rows)
    }

    /// Shared holders of the client key `key` on this replica right now,
    /// and shared acquirers waiting for it.
    pub fn shared_stats(&self, key: &str) -> (usize, usize) {
        let Some(k) = LockId::client(key).key_number() else {
            return (0, 0);
        };
        (self.inner.readers.holders(k), self.inner.readers.waiting(k))
    }

    /// The lock sessions' connections (none with the embedded store).
    pub fn session_usage(&self) -> session::SessionUse {
        match &self.inner.backend {
            Backend::Postgres(sessions) => sessions.usage(),
            Backend::Embedded(_) => session::SessionUse::default(),
        }
    }

    /// Client places free in the budget right now.
    pub fn budget_available(&self) -> usize {
        self.inner.budget.available_permits()
    }

    /// A place in the client budget, or `LOCK_LIMIT_REACHED` at once.
    pub fn admit(&self) -> Result<LockPermit> {
        if self.is_shutting_down() {
            return Err(Error::ShuttingDown);
        }
        self.inner
            .budget
            .clone()
            .try_acquire_owned()
            .map(|permit| LockPermit { _permit: permit })
            .map_err(|_| Error::LockLimitReached)
    }

    /// Resolves once lock streams must end (the shutdown grace is over).
    pub fn shutting_down(&self) -> WaitForCancellationFutureOwned {
        self.inner.stop.clone().cancelled_owned()
    }

    /// Ends every lock stream (they answer `SHUTTING_DOWN`) and closes the
    /// lock sessions, which releases everything they hold.
    pub fn shut_down(&self) {
        self.inner.stop.cancel();
        self.inner.shutdown.send_replace(true);
    }

    /// Runs `work` holding `system_id`'s serialisation lock. `work` takes its
    /// own work connection: the lock comes first, never the other way
    /// round. The lock is released when `work` is done (after its COMMIT),
    /// or when the future is dropped. Not granted within
    /// `DATABASE_LOCK_TIMEOUT_MS`, nor by [`SYSTEM_BUSY_MARGIN`] before the
    /// request's `deadline`: `SYSTEM_BUSY`.
    pub async fn with_system_lock<T, F, Fut>(
        &self,
        system_id: &SystemId,
        deadline: Option<tokio::time::Instant>,
        work: F,
    ) -> Result<T>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<T>>,
    {
        let wait_until = system_wait_until(tokio::time::Instant::now(), self.inner.system_wait, deadline);
        // A try of the lock in PostgreSQL is not a wait for another holder:
        // under a request deadline it is left to that deadline (and the
        // lease), so that a slow database (or a lock session still
        // connecting) ends as DEADLINE_EXCEEDED, not as a SYSTEM_BUSY that
        // blames the system.
        let tries_until = if deadline.is_some() { None } else { wait_until };
        let Some(grant) = self
            .take(LockId::system(system_id.as_str()), wait_until, tries_until, false)
            .instrument(tracing::debug_span!("lock wait", lock = "system"))
            .await?
        else {
            return Err(Error::SystemBusy {
                system_id: system_id.as_str().to_owned(),
            });
        };
        // A critical section stalled longer than the lease (its work
        // blocked in the database) lets the lock go, as PostgreSQL's idle
        // timer did when these were transaction locks: waiters proceed, and
        // the system's row lock keeps the writes serialised.
        let work = work();
        tokio::pin!(work);
        let mut owned = Some(grant.owned);
        let stall = tokio::time::sleep(self.inner.lease);
        tokio::pin!(stall);
        loop {
            tokio::select! {
                result = &mut work => return result,
                () = &mut stall, if owned.is_some() => {
                    tracing::warn!(system_id = system_id.as_str(), "a critical section outlived the lease; releasing its system lock");
                    owned = None;
                }
            }
        }
    }

    /// Takes a client's lock `key` in `mode`, waiting at most `wait`
    /// (`None`: the server's default; zero: try once; capped at
    /// `VITALS_MAX_LOCK_WAIT_MS`).
    pub async fn acquire(
        &self,
        permit: LockPermit,
        key: LockKey,
        wait: Option<Duration>,
        mode: Mode,
    ) -> Result<HeldLock> {
        match mode {
            Mode::Exclusive => self.acquire_exclusive(permit, key, wait).await,
            Mode::Shared => self.acquire_shared(permit, key, wait).await,
            Mode::Semaphore(max) => self.acquire_semaphore(permit, key, wait, max).await,
        }
    }

    /// LOCK_MODE_MISMATCH when `id` is in use here as a semaphore (a plain
    /// acquire of it asks for one holder).
    fn refuse_semaphore(&self, key: &LockKey, id: LockId) -> Result<()> {
        match id.key_number().and_then(|k| self.inner.semaphores.size_of(k)) {
            Some(max) => Err(Error::LockModeMismatch {
                key: key.as_str().to_owned(),
                held_as: format!("a semaphore of {max}"),
            }),
            None => Ok(()),
        }
    }

    /// Takes one of the `max` slots of the semaphore `key` (see [`semaphore`]).
    async fn acquire_semaphore(
        &self,
        permit: LockPermit,
        key: LockKey,
        wait: Option<Duration>,
        max: u32,
    ) -> Result<HeldLock> {
        let wait = wait.unwrap_or(self.inner.default_wait).min(self.inner.max_wait);
        let deadline = (!wait.is_zero()).then(|| tokio::time::Instant::now() + wait);
        let id = LockId::client(key.as_str());
        let number = id
            .key_number()
            .ok_or(Error::Invariant("a client key has a key number"))?;
        let mismatch = |held_as: String| Error::LockModeMismatch {
            key: key.as_str().to_owned(),
            held_as,
        };
        let used = self
            .inner
            .semaphores
            .enter(number, max)
            .map_err(|held| mismatch(format!("a semaphore of {held}")))?;
        if self.inner.table.in_use(id) || self.inner.readers.holders(number) + self.inner.readers.waiting(number) > 0 {
            return Err(mismatch("an exclusive or shared lock".to_owned()));
        }
        if used.first
            && let Some(pool) = &self.inner.published
        {
            // Best effort: an answer that does not come soon is no answer.
            let asked = inventory::other_mode(pool, self.replica(), key.as_str(), Mode::Semaphore(max));
            match tokio::time::timeout(SIZE_CHECK_TIMEOUT, asked).await {
                Ok(Ok(Some(Mode::Semaphore(other)))) => return Err(mismatch(format!("a semaphore of {other}"))),
                Ok(Ok(Some(Mode::Exclusive | Mode::Shared))) => {
                    return Err(mismatch("an exclusive or shared lock".to_owned()));
                }
                Ok(Ok(None)) => {}
                Ok(Err(err)) => tracing::debug!(error = %err, "semaphore size not compared with other replicas"),
                Err(_) => tracing::debug!("semaphore size not compared with other replicas in time"),
            }
        }
        let metrics = self.inner.metrics.get();
        let asked = Instant::now();
        let waiting = metrics.map(LockMetrics::waiting);
        let slots: Vec<LockId> = (0..max).map(|i| semaphore::slot(key.as_str(), i)).collect();
        // Acquirers start their round at different slots, so that they
        // spread over the free ones rather than all try the first.
        let mut start = self.inner.semaphores.next_start();
        let grant = 'granted: loop {
            for j in 0..slots.len() {
                let slot = slots[(start + j) % slots.len()];
                if let Some(grant) = self.take(slot, None, deadline, true).await? {
                    break 'granted grant;
                }
            }
            let now = tokio::time::Instant::now();
            let Some(deadline) = deadline.filter(|d| now < *d) else {
                return Err(Error::LockNotAvailable { key: key.into_inner() });
            };
            let until = deadline.min(now + semaphore::SLOT_QUEUE);
            if let Some(grant) = self
                .take(slots[start % slots.len()], Some(until), Some(until), true)
                .await?
            {
                break grant;
            }
            start += 1;
        };
        drop(waiting);
        Ok(self.held(grant, key, permit, asked, Some(Box::new(used))))
    }

    async fn acquire_exclusive(&self, permit: LockPermit, key: LockKey, wait: Option<Duration>) -> Result<HeldLock> {
        let id = LockId::client(key.as_str());
        self.refuse_semaphore(&key, id)?;
        self.acquire_id(permit, key, id, wait).await
    }

    /// Runs for leadership of `election`: takes its lock (see [`election`]),
    /// waiting as [`Locks::acquire`] does.
    pub async fn campaign(&self, permit: LockPermit, election: LockKey, wait: Option<Duration>) -> Result<HeldLock> {
        let id = election::lock_id(election.as_str());
        self.acquire_id(permit, election, id, wait).await
    }

    /// The elections of this replica.
    pub fn elections(&self) -> &election::Elections {
        &self.inner.elections
    }

    /// Takes `id` exclusively for the client, who knows it as `key`.
    async fn acquire_id(
        &self,
        permit: LockPermit,
        key: LockKey,
        id: LockId,
        wait: Option<Duration>,
    ) -> Result<HeldLock> {
        let wait = wait.unwrap_or(self.inner.default_wait).min(self.inner.max_wait);
        let deadline = (!wait.is_zero()).then(|| tokio::time::Instant::now() + wait);
        let metrics = self.inner.metrics.get();
        let asked = Instant::now();
        let waiting = metrics.map(LockMetrics::waiting);
        let Some(grant) = self
            .take(id, deadline, deadline, true)
            .instrument(tracing::debug_span!("lock wait", lock = "client"))
            .await?
        else {
            return Err(Error::LockNotAvailable { key: key.into_inner() });
        };
        drop(waiting);
        Ok(self.held(grant, key, permit, asked, None))
    }

    /// The client's lock from `grant`, asked for at `asked`: watched for the
    /// loss of its PostgreSQL session, counted as held from now.
    fn held(
        &self,
        grant: Grant,
        key: LockKey,
        permit: LockPermit,
        asked: Instant,
        semaphore: Option<Box<SemaphoreUse>>,
    ) -> HeldLock {
        let now = Instant::now();
        let (ended, sessions) = match (&grant.owned.remote, &self.inner.backend) {
            (Some(Remote::Session(hold, _)), Backend::Postgres(sessions)) => {
                (hold.generation.ended(), Some(sessions.clone()))
            }
            _ => (self.inner.stop.clone(), None),
        };
        HeldLock {
            fencing_token: grant.token.unwrap_or(0),
            hold: Hold::Exclusive(grant.owned),
            key,
            acquired_at: Utc::now(),
            started: now,
            ended,
            sessions,
            _permit: permit,
            holding: self.inner.metrics.get().map(|m| m.granted(asked, now)),
            _semaphore: semaphore,
        }
    }

    /// Owns `id` here and beyond, waiting for other holders until `deadline`
    /// (`None`: try once); one try in PostgreSQL may run until `tries_until`
    /// (`None`: bounded by the lease). `None` when it was not granted in time.
    async fn take(
        &self,
        id: LockId,
        deadline: Option<tokio::time::Instant>,
        tries_until: Option<tokio::time::Instant>,
        token: bool,
    ) -> Result<Option<Grant>> {
        let (mut owned, mut pause, check) = match self.inner.table.enter(id, deadline.is_some()) {
            Entry::Busy => return Ok(None),
            Entry::Owner(owned) => (owned, false, false),
            Entry::Queued(mut queued) => {
                let Some(deadline) = deadline else { return Ok(None) };
                match tokio::time::timeout_at(deadline, queued.turn()).await {
                    Ok(Some(turn)) => (turn.owned, turn.pause, turn.check),
                    Ok(None) => return Err(Error::ShuttingDown),
                    Err(_elapsed) => return Ok(None),
                }
            }
        };
        if check && self.wanted_elsewhere(id, &owned).await {
            self.inner.yields.fetch_add(1, Ordering::Relaxed);
            if let (Backend::Postgres(sessions), Some(Remote::Session(hold, _))) =
                (&self.inner.backend, owned.remote.take())
            {
                sessions.release(id, hold, None);
            }
            pause = true;
        }
        // Declared after `owned`, so dropped before it: the withdrawal
        // reaches the session before the next local waiter's first try.
        let mut interest = Interest { sessions: None, id };
        if pause {
            let until = tokio::time::Instant::now() + FAIR_PAUSE;
            tokio::time::sleep_until(deadline.map_or(until, |d| d.min(until))).await;
        }
        loop {
            match (&self.inner.backend, owned.remote.take()) {
                (Backend::Embedded(tokens), _) => {
                    owned.remote = Some(Remote::Local);
                    let token = if token { Some(tokens.next().await?) } else { None };
                    return Ok(Some(Grant { owned, token }));
                }
                // Handed on by a local holder: held in PostgreSQL already,
                // with tokens reserved for the next holders.
                (Backend::Postgres(sessions), Some(Remote::Session(hold, mut tokens))) => {
                    if hold.generation.is_lost() {
                        continue;
                    }
                    if !token {
                        owned.remote = Some(Remote::Session(hold, tokens));
                        return Ok(Some(Grant { owned, token: None }));
                    }
                    if let Some(t) = tokens.take() {
                        owned.remote = Some(Remote::Session(hold, tokens));
                        return Ok(Some(Grant { owned, token: Some(t) }));
                    }
                    // The hold stays with `owned` while the tokens are
                    // drawn: if this future is dropped meanwhile, the lock is
                    // released, not forgotten.
                    owned.remote = Some(Remote::Session(hold.clone(), Tokens::default()));
                    let count = self.token_block(id);
                    match sessions.tokens(&hold, count).await {
                        Ok(drawn) => {
                            let mut tokens = Tokens::from(drawn);
                            let t = tokens.take();
                            owned.remote = Some(Remote::Session(hold, tokens));
                            return Ok(Some(Grant { owned, token: t }));
                        }
                        // Its session died meanwhile: nothing is held any
                        // more; take it anew.
                        Err(_) if hold.generation.is_lost() => {
                            owned.remote = None;
                            continue;
                        }
                        // Dropping `owned` releases the lock.
                        Err(err) => return Err(err),
                    }
                }
                (Backend::Postgres(sessions), _) => {
                    let count = if token { self.token_block(id) } else { 0 };
                    let waiting = interest.sessions.is_some();
                    match self.try_until(sessions, id, count, waiting, tries_until).await? {
                        TryOutcome::Granted(hold, drawn) => {
                            let mut tokens = Tokens::from(drawn);
                            let t = if token { tokens.take() } else { None };
                            owned.remote = Some(Remote::Session(hold, tokens));
                            return Ok(Some(Grant { owned, token: t }));
                        }
                        TryOutcome::Busy => {
                            // Tried again, the try announces that this
                            // replica waits, so the holder lets it go at the
                            // end of its streak.
                            interest.sessions.get_or_insert_with(|| sessions.clone());
                            let now = tokio::time::Instant::now();
                            match deadline {
                                Some(deadline) if now < deadline => {
                                    tokio::time::sleep_until((now + session::POLL).min(deadline)).await;
                                }
                                _ => return Ok(None),
                            }
                        }
                    }
                }
            }
        }
    }
}

impl Locks {
    /// One try of `id` on its session, bounded by the caller's deadline (a
    /// try-once by the lease): a link that hangs must not hold the caller
    /// past it. A grant that arrives after the caller gave up is released
    /// by the session.
    async fn try_until(
        &self,
        sessions: &Sessions,
        id: LockId,
        tokens: u32,
        interest: bool,
        deadline: Option<tokio::time::Instant>,
    ) -> Result<TryOutcome> {
        let bound = deadline.unwrap_or_else(|| tokio::time::Instant::now() + self.inner.lease);
        match tokio::time::timeout_at(bound, sessions.try_lock(id, tokens, interest)).await {
            Ok(outcome) => outcome,
            Err(_) if deadline.is_some() => Ok(TryOutcome::Busy),
            Err(_) => Err(Error::DatabaseUnavailable(None)),
        }
    }

    /// At the end of a streak of local hand-offs of `id`, still held in
    /// PostgreSQL: whether another replica announced that it waits for it.
    /// A session that fails to answer within the lease counts as yes (the
    /// lock is released, as it was before waiters announced themselves).
    async fn wanted_elsewhere(&self, id: LockId, owned: &table::Owned) -> bool {
        let (Backend::Postgres(sessions), Some(Remote::Session(hold, _))) = (&self.inner.backend, &owned.remote) else {
            return false;
        };
        if hold.generation.is_lost() {
            return false;
        }
        match tokio::time::timeout(self.inner.lease, sessions.wanted(hold, id)).await {
            Ok(Ok(wanted)) => wanted,
            Ok(Err(_)) | Err(_) => true,
        }
    }

    /// How many fencing tokens to reserve when `id` is granted in
    /// PostgreSQL: one when nobody waits for it here; a whole block when
    /// local waiters are queued, who will take it over without going back to
    /// PostgreSQL. A queue tends to stay (each holder that leaves comes back
    /// to its end), and every exhausted block is a durable commit on the
    /// path of a hand-off, while unused tokens only leave gaps.
    fn token_block(&self, id: LockId) -> u32 {
        const BLOCK: u32 = 1024;
        if self.inner.table.queued(id) == 0 { 1 } else { BLOCK }
    }

    /// Takes the client key `key` shared: joins this replica's group of its
    /// shared holders, or takes it for the group (see [`shared`]).
    async fn acquire_shared(&self, permit: LockPermit, key: LockKey, wait: Option<Duration>) -> Result<HeldLock> {
        let wait = wait.unwrap_or(self.inner.default_wait).min(self.inner.max_wait);
        let deadline = (!wait.is_zero()).then(|| tokio::time::Instant::now() + wait);
        let id = LockId::client(key.as_str());
        let number = id
            .key_number()
            .ok_or(Error::Invariant("a client key has a key number"))?;
        self.refuse_semaphore(&key, id)?;
        let metrics = self.inner.metrics.get();
        let asked = Instant::now();
        let waiting = metrics.map(LockMetrics::waiting);
        let mut arrival = self.inner.readers.arrive(number);
        let member = loop {
            let writer_waits = self.inner.table.queued(id) > 0;
            match arrival.step(writer_waits) {
                Step::Joined(member) => break member,
                Step::Take { pause } => match self.take_for_group(id, number, deadline, pause).await {
                    Ok(Some((owned, pg, tokens))) => arrival.taken(owned, pg, tokens),
                    Ok(None) => {
                        arrival.take_failed();
                        return Err(Error::LockNotAvailable { key: key.into_inner() });
                    }
                    Err(err) => {
                        arrival.take_failed();
                        return Err(err);
                    }
                },
                Step::Check(hold) => {
                    let wanted = match &self.inner.backend {
                        Backend::Postgres(sessions) => matches!(
                            tokio::time::timeout(self.inner.lease, sessions.wanted(&hold, LockId::Shared(number)))
                                .await,
                            Ok(Ok(true)) | Ok(Err(_)) | Err(_)
                        ),
                        Backend::Embedded(_) => false,
                    };
                    arrival.checked(wanted);
                }
                Step::Wait(mut changed) => {
                    // A writer's queue here changes without a word to the
                    // readers: look again now and then.
                    let now = tokio::time::Instant::now();
                    let recheck = now + session::POLL * 10;
                    let until = deadline.map_or(now, |d| d.min(recheck));
                    if deadline.is_none_or(|d| now >= d) {
                        return Err(Error::LockNotAvailable { key: key.into_inner() });
                    }
                    let _ = tokio::time::timeout_at(until, changed.changed()).await;
                }
            }
        };
        drop(arrival);
        drop(waiting);
        let fencing_token = self.member_token(&member).await?;
        let now = Instant::now();
        let (ended, sessions) = match (&member.pg, &self.inner.backend) {
            (Some(hold), Backend::Postgres(sessions)) => (hold.generation.ended(), Some(sessions.clone())),
            _ => (self.inner.stop.clone(), None),
        };
        Ok(HeldLock {
            fencing_token,
            hold: Hold::Shared(Box::new(member)),
            key,
            acquired_at: Utc::now(),
            started: now,
            ended,
            sessions,
            _permit: permit,
            holding: metrics.map(|m| m.granted(asked, now)),
            _semaphore: None,
        })
    }

    /// Takes `id` for its group of shared holders: its slot in the lock
    /// table (in turn with this replica's writers), then with PostgreSQL its
    /// shared advisory lock, waiting until `deadline` (`None`: try once).
    async fn take_for_group(
        &self,
        id: LockId,
        number: i64,
        deadline: Option<tokio::time::Instant>,
        pause: bool,
    ) -> Result<Option<(Owned, Option<SessionHold>, Tokens)>> {
        let mut owned = match self.inner.table.enter(id, deadline.is_some()) {
            Entry::Busy => return Ok(None),
            Entry::Owner(owned) => owned,
            Entry::Queued(mut queued) => {
                let Some(deadline) = deadline else { return Ok(None) };
                match tokio::time::timeout_at(deadline, queued.turn()).await {
                    Ok(Some(turn)) => turn.owned,
                    Ok(None) => return Err(Error::ShuttingDown),
                    Err(_elapsed) => return Ok(None),
                }
            }
        };
        let sessions = match &self.inner.backend {
            Backend::Embedded(_) => return Ok(Some((owned, None, Tokens::default()))),
            Backend::Postgres(sessions) => sessions,
        };
        // Handed on by a writer still holding it exclusively in PostgreSQL:
        // the group's hold is a shared one of its own.
        if let Some(Remote::Session(hold, _)) = owned.remote.take() {
            sessions.release(id, hold, None);
        }
        if pause {
            let until = tokio::time::Instant::now() + FAIR_PAUSE;
            tokio::time::sleep_until(deadline.map_or(until, |d| d.min(until))).await;
        }
        let shared = LockId::Shared(number);
        let mut interest = Interest {
            sessions: None,
            id: shared,
        };
        let count = 1 + u32::try_from(self.inner.readers.waiting(number)).unwrap_or(0).min(1023);
        loop {
            let waiting = interest.sessions.is_some();
            match self.try_until(sessions, shared, count, waiting, deadline).await? {
                TryOutcome::Granted(hold, drawn) => {
                    drop(interest);
                    return Ok(Some((owned, Some(hold), Tokens::from(drawn))));
                }
                TryOutcome::Busy => {
                    interest.sessions.get_or_insert_with(|| sessions.clone());
                    let now = tokio::time::Instant::now();
                    match deadline {
                        Some(deadline) if now < deadline => {
                            tokio::time::sleep_until((now + session::POLL).min(deadline)).await;
                        }
                        _ => return Ok(None),
                    }
                }
            }
        }
    }

    /// A fencing token for a new member of a group of shared holders: one
    /// reserved when the group's hold was granted, or freshly drawn.
    async fn member_token(&self, member: &Member) -> Result<u64> {
        match (&self.inner.backend, &member.pg) {
            (Backend::Postgres(sessions), Some(hold)) => {
                let mut tokens = member.tokens.lock().await;
                if let Some(token) = tokens.take() {
                    return Ok(token);
                }
                let drawn = sessions.tokens(hold, 64).await?;
                *tokens = Tokens::from(drawn);
                tokens.take().ok_or(Error::Invariant("a token block is never empty"))
            }
            (Backend::Embedded(tokens), _) => tokens.next().await,
            (Backend::Postgres(_), None) => Err(Error::Invariant("a shared hold in PostgreSQL has a session")),
        }
    }

    /// Whether lock streams are being ended for shutdown.
    pub fn is_shutting_down(&self) -> bool {
        self.inner.stop.is_cancelled()
    }
}

impl HeldLock {
    fn count_lost(&self, why: LostReason) {
        if let Some(holding) = &self.holding {
            holding.lost(why);
        }
    }

    /// The client's key.
    pub fn key(&self) -> &LockKey {
        &self.key
    }

    /// Resolves when the lock's holder must stop: the server shuts down
    /// ([`Locks::is_shutting_down`] says so), or the lock is lost without a
    /// release (its PostgreSQL session broke or could not prove it was alive
    /// within the lease; never with the embedded store). One future for
    /// both, as a value a stream can keep: it is stored with every held lock.
    pub fn ended(&self) -> WaitForCancellationFutureOwned {
        self.ended.clone().cancelled_owned()
    }

    fn session(&self) -> Option<&SessionHold> {
        match &self.hold {
            Hold::Exclusive(owned) => match &owned.remote {
                Some(Remote::Session(hold, _)) => Some(hold),
                _ => None,
            },
            Hold::Shared(member) => member.pg.as_ref(),
        }
    }

    /// Confirms the lock is held now. With PostgreSQL, a session that proved
    /// alive within the last heartbeat answers at once; otherwise one
    /// statement on it decides (bounded by the lock's validity).
    pub async fn keep_alive(&mut self) -> Result<()> {
        let (Some(hold), Some(sessions)) = (self.session(), self.sessions.as_ref()) else {
            return Ok(());
        };
        if hold.generation.is_lost() {
            return Err(self.lost_error("the lock's database session ended"));
        }
        let fresh = hold.generation.alive_at().elapsed() <= sessions.timing().heartbeat * 2;
        if fresh {
            return Ok(());
        }
        let valid_until = hold.generation.valid_until();
        let alive = tokio::time::timeout_at(valid_until.into(), sessions.ping(hold))
            .await
            .unwrap_or(false);
        if alive {
            Ok(())
        } else {
            Err(self.lost_error("the lock's database session stopped answering"))
        }
    }

    /// Releases the lock, answering once it is released (in PostgreSQL too,
    /// unless a local waiter took it over); returns how long it was held.
    pub async fn release(self) -> Result<Duration> {
        let held_for = self.started.elapsed();
        let was_lost = self.session().is_some_and(|h| h.generation.is_lost());
        let key = self.key.as_str().to_owned();
        if was_lost {
            self.count_lost(LostReason::Session);
        }
        let (ack, acked) = oneshot::channel();
        match self.hold {
            Hold::Exclusive(owned) => owned.pass_on(Some(ack)),
            Hold::Shared(member) => (*member).leave(Some(ack)),
        }
        let _ = acked.await;
        if was_lost {
            return Err(Error::LockLost {
                key,
                why: "the lock's database session ended before release",
            });
        }
        Ok(held_for)
    }

    /// LOCK_LOST for this lock, counted as lost: to the lease when `why` is
    /// [`LEASE_LAPSED`], else to its session.
    pub fn lost_error(&self, why: &'static str) -> Error {
        self.count_lost(if why == LEASE_LAPSED {
            LostReason::Lease
        } else {
            LostReason::Session
        });
        Error::LockLost {
            key: self.key.as_str().to_owned(),
            why,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_system_lock_wait_ends_by_the_margin_before_the_request_deadline() {
        let now = tokio::time::Instant::now();
        let wait = Duration::from_secs(30);
        // No deadline: the configured wait.
        assert_eq!(system_wait_until(now, wait, None), Some(now + wait));
        // The default deadline (15 s) is shorter than the wait (30 s).
        let deadline = now + Duration::from_secs(15);
        assert_eq!(
            system_wait_until(now, wait, Some(deadline)),
            Some(deadline - SYSTEM_BUSY_MARGIN)
        );
        // A deadline far away leaves the configured wait.
        assert_eq!(
            system_wait_until(now, wait, Some(now + Duration::from_secs(60))),
            Some(now + wait)
        );
        // No time left for waiting: try once.
        for left in [Duration::ZERO, SYSTEM_BUSY_MARGIN / 2, SYSTEM_BUSY_MARGIN] {
            assert_eq!(system_wait_until(now, wait, Some(now + left)), None, "{left:?}");
        }
    }
}
