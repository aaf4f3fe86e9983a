//! The transition feed of one replica: it reads each new transition once and
//! hands it to every WatchTransitions watcher of the replica.
//!
//! Why: a watcher that read the table itself on every notification cost the
//! database one transaction per watcher per notification (and one per
//! watcher every poll), so the database's load grew with the number of
//! watchers, not with the number of transitions. Here one task per replica
//! reads what committed after the last sequence it saw, in pages, when
//! PostgreSQL's `LISTEN` (or, embedded, the store after a commit) says
//! something may have changed, after its listening session reconnects, and
//! every [`SAFETY_POLL`] otherwise; then `fanout` pushes each transition
//! into the bounded queue of each watcher that follows its system. The cost
//! of a notification is one read, however many watchers there are.
//!
//! A watcher ([`TransitionFeed::subscribe`]) holds a place in
//! `VITALS_MAX_WATCHERS`, registers with the feed, replays the stored
//! transitions after its sequence from the database (a task of its own, so a
//! client that does not read never holds a database connection), then
//! follows its queue (see `fanout` for the hand-over and the slow-consumer
//! rule). Every way the feed stops ends the watchers with a status: shutdown
//! with `SHUTTING_DOWN`, anything else (a bug) with `INTERNAL`; no watcher
//! ever waits on a feed that is gone.

mod fanout;
mod listener;

use std::{
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    task::{Context, Poll},
    time::{Duration, Instant},
};

use futures::Stream;
use tokio::{
    sync::{Notify, OwnedSemaphorePermit, Semaphore, mpsc, watch},
    task::JoinHandle,
};

use self::{
    fanout::{End, FeedState, Next, Registry, SlowRule, Watcher},
    listener::{Backoff, pause},
};
use super::{Store, Transition};
use crate::{
    config::Config,
    db::Database,
    domain::SystemId,
    error::{Error, Result},
};

/// The feed reads at least this often when nothing wakes it, in case a
/// notification was lost.
pub const SAFETY_POLL: Duration = Duration::from_secs(5);
/// Transitions per read, of the feed and of a replay.
const PAGE: u32 = 256;
/// First delay before the feed reads again after a failed read.
const READ_RETRY_MIN: Duration = Duration::from_millis(100);
/// Longest delay between the feed's failed reads.
const READ_RETRY_MAX: Duration = Duration::from_secs(1);
/// How long a new watcher waits for the feed to find the end of the table
/// (it starts when the database first answers).
const START_WAIT: Duration = Duration::from_secs(5);
/// Replayed transitions a watcher's replay may read ahead of its stream.
const REPLAY_AHEAD: usize = 16;

/// Wakes the feed: the embedded store calls [`TransitionNotifier::notify`]
/// after each commit that wrote a transition.
#[derive(Debug, Clone, Default)]
pub struct TransitionNotifier(Arc<Notify>);

impl TransitionNotifier {
    /// Something may have been committed: the feed reads (once, however
    /// often this is called before it gets to it).
    pub fn notify(&self) {
        self.0.notify_one();
    }
}

/// The limits of the watchers of one replica.
#[derive(Debug, Clone, Copy)]
pub struct WatchLimits {
    /// `VITALS_MAX_WATCHERS`: watch streams open at once.
    pub max_watchers: u32,
    /// `VITALS_WATCHER_BUFFER`: transitions that may wait for one watcher.
    pub buffer: u32,
    /// `VITALS_WATCHER_MAX_LAG_MS`: how long a transition may wait for one.
    pub max_lag: Duration,
}

impl WatchLimits {
    /// The limits `config` sets.
    pub fn from_config(config: &Config) -> Self {
        WatchLimits {
            max_watchers: config.max_watchers,
            buffer: config.watcher_buffer,
            max_lag: Duration::from_millis(config.watcher_max_lag_ms),
        }
    }
}

/// What the feed and its watchers are doing, for tests and operators.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FeedStats {
    /// Watch streams open (each holds a place in `VITALS_MAX_WATCHERS`).
    pub watchers: usize,
    /// Of those, registered with the feed and not ended.
    pub registered: usize,
    /// Of those, still replaying from the database.
    pub replaying: usize,
    /// Transitions waiting in watchers' queues.
    pub buffered: usize,
    /// Watchers ended as too slow since start.
    pub ended_too_slow: u64,
    /// Reads of new transitions by the feed since start.
    pub feed_reads: u64,
    /// Attempts to open the PostgreSQL listening session.
    pub listener_attempts: u64,
    /// Of those, the ones that ended up listening.
    pub listener_connects: u64,
}

/// State shared by the feed's task, its listener, and every subscription.
#[derive(Debug)]
pub(crate) struct Shared {
    store: Store,
    registry: Registry,
    /// Wakes the feed to read.
    wake: Arc<Notify>,
    /// True once the feed follows the table (or closed): watchers waiting
    /// to register look again.
    started: watch::Sender<bool>,
    /// `VITALS_MAX_WATCHERS` places.
    budget: Arc<Semaphore>,
    max_watchers: usize,
    max_lag: Duration,
    feed_reads: AtomicU64,
    pub(crate) listener_attempts: AtomicU64,
    pub(crate) listener_connects: AtomicU64,
}

impl Shared {
    fn close(&self, end: End) {
        self.registry.close(end);
        self.started.send_replace(true);
    }
}

/// The feed of one replica; clones share it.
#[derive(Debug, Clone)]
pub struct TransitionFeed {
    shared: Arc<Shared>,
}

impl TransitionFeed {
    /// A feed reading `store`, woken by `notifier` (and, with PostgreSQL,
    /// by its listener once [`TransitionFeed::start`]ed).
    pub fn new(store: Store, notifier: &TransitionNotifier, limits: WatchLimits) -> Self {
        let max_watchers = usize::try_from(limits.max_watchers).unwrap_or(10_000);
        TransitionFeed {
            shared: Arc::new(Shared {
                store,
                registry: Registry::new(SlowRule {
                    buffer: usize::try_from(limits.buffer).unwrap_or(256).max(1),
                    max_lag: limits.max_lag,
                }),
                wake: notifier.0.clone(),
                started: watch::channel(false).0,
                budget: Arc::new(Semaphore::new(max_watchers)),
                max_watchers,
                max_lag: limits.max_lag,
                feed_reads: AtomicU64::new(0),
                listener_attempts: AtomicU64::new(0),
                listener_connects: AtomicU64::new(0),
            }),
        }
    }

    /// Starts the feed's task (and, with PostgreSQL, its listener). It ends
    /// when `stopping` changes; however it ends, every watcher is ended with
    /// a status and no new one is admitted.
    pub fn start(&self, database: &Database, stopping: watch::Receiver<bool>) -> JoinHandle<()> {
        let shared = self.shared.clone();
        let listen_pool = match database {
            Database::Postgres(pools) => Some(pools.listen.clone()),
            Database::Embedded(_) => None,
        };
        tokio::spawn(async move {
            let _close = CloseOnExit {
                shared: shared.clone(),
                stopping: stopping.clone(),
            };
            let listening =
                listen_pool.map(|pool| tokio::spawn(listener::listen(pool, shared.clone(), stopping.clone())));
            follow(&shared, stopping).await;
            if let Some(listening) = listening
                && let Err(err) = listening.await
            {
                tracing::error!(error = %err, "the transition listener failed");
            }
        })
    }

    /// Ends every watcher with `SHUTTING_DOWN` and admits no more.
    pub fn shut_down(&self) {
        self.shared.close(End::ShuttingDown);
    }

    /// A watcher of `system` (`None`: every system) that first replays the
    /// stored transitions after `after_sequence`, then follows new ones.
    /// Past `VITALS_MAX_WATCHERS`: `WATCHER_LIMIT_REACHED` at once.
    pub async fn subscribe(&self, system: Option<SystemId>, after_sequence: u64) -> Result<Subscription> {
        let permit = self
            .shared
            .budget
            .clone()
            .try_acquire_owned()
            .map_err(|_| Error::WatcherLimitReached)?;
        let mut started = self.shared.started.subscribe();
        if tokio::time::timeout(START_WAIT, started.wait_for(|started| *started))
            .await
            .is_err()
        {
            return Err(Error::DatabaseUnavailable(None));
        }
        let watcher = self
            .shared
            .registry
            .register(system.as_ref().map(|s| s.as_str().to_owned()))
            .map_err(|state| match state {
                FeedState::Closed(end) => end_error(end, after_sequence),
                FeedState::Starting | FeedState::Following => Error::DatabaseUnavailable(None),
            })?;
        let (tx, rx) = mpsc::channel(REPLAY_AHEAD);
        tokio::spawn(replay(self.shared.clone(), watcher.clone(), system, after_sequence, tx));
        Ok(Subscription {
            shared: self.shared.clone(),
            watcher,
            replay: Some(rx),
            last: after_sequence,
            finished: false,
            _permit: permit,
        })
    }

    /// What the feed and its watchers are doing now.
    pub fn stats(&self) -> FeedStats {
        let counts = self.shared.registry.counts();
        FeedStats {
            watchers: self.shared.max_watchers - self.shared.budget.available_permits(),
            registered: counts.registered,
            replaying: counts.replaying,
            buffered: counts.buffered,
            ended_too_slow: counts.too_slow,
            feed_reads: self.shared.feed_reads.load(Ordering::Relaxed),
            listener_attempts: self.shared.listener_attempts.load(Ordering::Relaxed),
            listener_connects: self.shared.listener_connects.load(Ordering::Relaxed),
        }
    }
}

/// Ends the watchers when the feed's task ends, however it ends (a panic
/// too): with `SHUTTING_DOWN` when the process stops, else `INTERNAL`.
struct CloseOnExit {
    shared: Arc<Shared>,
    stopping: watch::Receiver<bool>,
}

impl Drop for CloseOnExit {
    fn drop(&mut self) {
        if *self.stopping.borrow() {
            self.shared.close(End::ShuttingDown);
        } else {
            tracing::error!("the transition feed stopped: ending every watcher");
            self.shared.close(End::FeedStopped);
        }
    }
}

/// The feed's task: finds the end of the table, then reads and publishes
/// what commits after it, until `stopping` changes.
async fn follow(shared: &Shared, mut stopping: watch::Receiver<bool>) {
    let mut backoff = Backoff::new(READ_RETRY_MIN, READ_RETRY_MAX);
    let mut head = loop {
        let newest = tokio::select! {
            newest = shared.store.list_transitions(None, None, 1) => newest,
            _ = stopping.changed() => return,
        };
        match newest {
            Ok(newest) => break newest.first().map_or(0, |t| t.sequence),
            Err(err) => {
                tracing::debug!(error = %err, "transition feed cannot read yet; will retry");
                if !pause(backoff.next_delay(), &mut stopping).await {
                    return;
                }
            }
        }
    };
    backoff.reset();
    shared.registry.following();
    shared.started.send_replace(true);
    tracing::debug!(head, "transition feed following");
    loop {
        // Read until caught up.
        loop {
            let page = tokio::select! {
                page = shared.store.transitions_after(None, head, PAGE) => page,
                _ = stopping.changed() => return,
            };
            shared.feed_reads.fetch_add(1, Ordering::Relaxed);
            match page {
                Ok(page) => {
                    backoff.reset();
                    let full = page.len() == PAGE as usize;
                    if let Some(t) = page.last() {
                        head = t.sequence;
                    }
                    let page: Vec<Arc<Transition>> = page.into_iter().map(Arc::new).collect();
                    shared.registry.publish(&page, Instant::now());
                    if !full {
                        break;
                    }
                }
                Err(err) => {
                    tracing::debug!(error = %err, "transition feed read failed; will retry");
                    if !pause(backoff.next_delay(), &mut stopping).await {
                        return;
                    }
                }
            }
        }
        tokio::select! {
            () = shared.wake.notified() => {}
            () = tokio::time::sleep(SAFETY_POLL) => {}
            _ = stopping.changed() => return,
        }
    }
}

/// A watcher's replay: reads the stored transitions after `last` (of
/// `system`) page by page and hands them to its stream, until a read finds
/// the end of the table and the watcher's queue takes over.
async fn replay(
    shared: Arc<Shared>,
    watcher: Arc<Watcher>,
    system: Option<SystemId>,
    mut last: u64,
    tx: mpsc::Sender<Result<Arc<Transition>>>,
) {
    loop {
        let page = tokio::select! {
            biased;
            () = watcher.ended.notified() => return,
            page = shared.store.transitions_after(system.as_ref(), last, PAGE) => page,
        };
        let page = match page {
            Ok(page) => page,
            Err(err) => {
                deliver(&shared, &watcher, &tx, Err(err)).await;
                return;
            }
        };
        let full = page.len() == PAGE as usize;
        for t in page {
            last = t.sequence;
            if !deliver(&shared, &watcher, &tx, Ok(Arc::new(t))).await {
                return;
            }
        }
        if !full && watcher.queue().caught_up() {
            return;
        }
    }
}

/// Hands one replayed item to the stream. False when the replay must stop:
/// the stream is gone, the watcher ended, or the stream took nothing for
/// `VITALS_WATCHER_MAX_LAG_MS` (then the watcher ends as too slow).
async fn deliver(
    shared: &Shared,
    watcher: &Watcher,
    tx: &mpsc::Sender<Result<Arc<Transition>>>,
    item: Result<Arc<Transition>>,
) -> bool {
    tokio::select! {
        biased;
        () = watcher.ended.notified() => false,
        sent = tokio::time::timeout(shared.max_lag, tx.send(item)) => match sent {
            Ok(Ok(())) => true,
            Ok(Err(_gone)) => false,
            Err(_elapsed) => {
                shared.registry.end(watcher, End::TooSlow);
                false
            }
        },
    }
}

/// The error a watcher ends with; `last`: the last sequence it delivered.
fn end_error(end: End, last: u64) -> Error {
    match end {
        End::TooSlow => Error::WatcherTooSlow { last_sequence: last },
        End::ShuttingDown => Error::ShuttingDown,
        End::FeedStopped => Error::FeedStopped,
    }
}

/// One watcher's transitions, in sequence order: the replay, then what the
/// feed publishes. Ends with an error when the watcher is ended (too slow,
/// shutdown) or its replay fails. Dropping it (the client went away) frees
/// its place and stops its replay.
#[derive(Debug)]
pub struct Subscription {
    shared: Arc<Shared>,
    watcher: Arc<Watcher>,
    /// The replay's output, until it hands over to the queue.
    replay: Option<mpsc::Receiver<Result<Arc<Transition>>>>,
    /// The last sequence delivered (at first, the one asked to resume after).
    last: u64,
    /// Ended: nothing more to yield.
    finished: bool,
    _permit: OwnedSemaphorePermit,
}

impl Subscription {
    fn finish(&mut self, error: Error) -> Poll<Option<Result<Arc<Transition>>>> {
        self.finished = true;
        self.replay = None;
        if matches!(error, Error::WatcherTooSlow { .. }) {
            tracing::info!(last_sequence = self.last, "watcher too slow: ended");
        }
        Poll::Ready(Some(Err(error)))
    }

    fn deliver(&mut self, t: Arc<Transition>) -> Poll<Option<Result<Arc<Transition>>>> {
        self.last = t.sequence;
        Poll::Ready(Some(Ok(t)))
    }
}

impl Stream for Subscription {
    type Item = Result<Arc<Transition>>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        if this.finished {
            return Poll::Ready(None);
        }
        loop {
            let next = {
                let mut queue = this.watcher.queue();
                queue.set_waker(cx.waker());
                match queue.ended() {
                    Some(end) => Next::Ended(end),
                    None if this.replay.is_some() => Next::Replaying,
                    None => queue.next(this.last),
                }
            };
            match next {
                Next::Ended(end) => return this.finish(end_error(end, this.last)),
                Next::Transition(t) => return this.deliver(t),
                Next::Empty => return Poll::Pending,
                Next::Replaying => {}
            }
            let Some(replay) = this.replay.as_mut() else {
                // The replay ended without handing over or ending the
                // watcher: it can only have panicked.
                return this.finish(Error::Invariant(
                    "a watcher's replay ends by handing over or ending the watcher",
                ));
            };
            match replay.poll_recv(cx) {
                Poll::Ready(Some(Ok(t))) if t.sequence > this.last => return this.deliver(t),
                Poll::Ready(Some(Ok(_already_delivered))) => {}
                Poll::Ready(Some(Err(err))) => return this.finish(err),
                Poll::Ready(None) => {
                    this.replay = None;
                    if this.watcher.queue().replaying() {
                        return this.finish(Error::Invariant(
                            "a watcher's replay ends by handing over or ending the watcher",
                        ));
                    }
                }
                Poll::Pending => return Poll::Pending,
            }
        }
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        self.shared.registry.remove(&self.watcher);
        // Stops the replay, if it still runs.
        self.watcher.ended.notify_one();
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use futures::StreamExt;

    use super::*;
    use crate::store::TransitionNotifier;

    async fn embedded_feed(dir: &tempfile::TempDir, flags: &[&str]) -> (Database, TransitionFeed) {
        let mut args = vec![format!("--database-url=sqlite://{}/vitals.db", dir.path().display())];
        args.extend(flags.iter().map(|f| (*f).to_owned()));
        let config = Config::from_flags(args).unwrap();
        let database = Database::open(&config).await.unwrap();
        let notifier = TransitionNotifier::default();
        let store = Store::open(&database, notifier.clone());
        let feed = TransitionFeed::new(store, &notifier, WatchLimits::from_config(&config));
        (database, feed)
    }

    #[tokio::test]
    async fn watchers_of_a_feed_that_stopped_end_with_an_error_instead_of_waiting_on_it() {
        let dir = tempfile::tempdir().unwrap();
        let (database, feed) = embedded_feed(&dir, &[]).await;
        let (stop, stopping) = watch::channel(false);
        let task = feed.start(&database, stopping);
        let mut watcher = feed.subscribe(None, 0).await.unwrap();
        // The task ends without a shutdown, as if it had failed.
        drop(stop);
        task.await.unwrap();
        let ended = tokio::time::timeout(Duration::from_secs(5), watcher.next())
            .await
            .expect("the watcher ends at once");
        assert!(matches!(ended, Some(Err(Error::FeedStopped))), "{ended:?}");
        assert!(watcher.next().await.is_none(), "and yields nothing more");
        assert!(matches!(feed.subscribe(None, 0).await, Err(Error::FeedStopped)));
        database.close().await;
    }

    #[tokio::test]
    async fn a_watcher_past_the_limit_is_refused_and_a_closed_one_frees_its_place() {
        let dir = tempfile::tempdir().unwrap();
        let (database, feed) = embedded_feed(&dir, &["--max-watchers=2"]).await;
        let (_stop, stopping) = watch::channel(false);
        let _task = feed.start(&database, stopping);
        let first = feed.subscribe(None, 0).await.unwrap();
        let _second = feed.subscribe(None, 0).await.unwrap();
        assert!(matches!(feed.subscribe(None, 0).await, Err(Error::WatcherLimitReached)));
        assert_eq!(feed.stats().watchers, 2);
        drop(first);
        assert_eq!(feed.stats().watchers, 1);
        assert_eq!(feed.stats().registered, 1, "the closed watcher is forgotten");
        feed.subscribe(None, 0).await.unwrap();
        feed.shut_down();
        database.close().await;
    }
}
