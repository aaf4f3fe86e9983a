//! Local arbitration: one fair queue per lock in process, so that only the
//! head of a key's queue ever involves PostgreSQL, and a waiter behind a
//! holder of the same replica costs nothing there.
//!
//! Owning a lock locally is a value, [`Owned`]: whoever has it may use the
//! lock; dropping it passes the lock to the next live waiter (or releases it
//! when nobody waits). Waiters that time out or vanish leave the queue on
//! their own drop, so a queue never holds more entries than live waiters,
//! and a turn sent to a waiter that has just gone comes back and is passed on.
//!
//! A lock held in PostgreSQL is handed from one local holder to the next
//! without a round trip. After [`MAX_STREAK`] of back-to-back hand-offs the
//! next local holder asks PostgreSQL whether another replica waits for the
//! lock (waiters announce themselves, see [`super::id::INTEREST_SPACE`]):
//! if one does, it releases the lock there and pauses [`FAIR_PAUSE`] before
//! it tries again, so those waiters (who try every [`super::session::POLL`])
//! get their turn; if none does, the streak goes on. Programs that wait in
//! PostgreSQL itself announce nothing, so every [`KEEP_STREAKS`] + 1 streaks
//! the lock is released and paused for anyway.

use std::{
    collections::{HashMap, VecDeque, hash_map},
    sync::{
        Arc, Mutex, PoisonError,
        atomic::{AtomicU64, AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use tokio::sync::oneshot;

use super::{LockId, session::SessionHold};

/// How long a lock held in PostgreSQL is handed from local holder to local
/// holder before it is released there for other replicas.
pub const MAX_STREAK: Duration = Duration::from_millis(200);
/// How long the next local waiter lets other replicas try after such a release.
pub const FAIR_PAUSE: Duration = Duration::from_millis(10);
/// Streaks in a row that may end with the lock kept in PostgreSQL because no
/// other replica waited; the next one releases it whatever the answer.
pub const KEEP_STREAKS: u32 = 4;

/// Where a locally owned lock is held beyond this process.
#[derive(Debug)]
pub enum Remote {
    /// Nowhere else: the embedded store's locks live only here.
    Local,
    /// A session-level advisory lock on one of the lock manager's sessions,
    /// with the fencing tokens reserved for its next local holders.
    Session(SessionHold, Tokens),
}

/// Fencing tokens reserved (durably) while a lock was held in PostgreSQL.
/// They rise above every earlier grant of the lock, on any replica, because
/// they were drawn after PostgreSQL granted it; they are handed to its next
/// local holders and thrown away when it is released there.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Tokens {
    /// Descending, so the smallest is popped first.
    rest: Vec<u64>,
}

impl Tokens {
    /// `drawn`, in any order.
    pub fn from(mut drawn: Vec<u64>) -> Self {
        drawn.sort_unstable_by(|a, b| b.cmp(a));
        Tokens { rest: drawn }
    }

    /// The next token, if one is left.
    pub fn take(&mut self) -> Option<u64> {
        self.rest.pop()
    }
}

/// Releases a lock beyond this process.
pub trait Release: Send + Sync + std::fmt::Debug + 'static {
    /// Releases `id` held as `remote`; `ack` is told once it is released.
    fn release(&self, id: LockId, remote: SessionHold, ack: Option<oneshot::Sender<()>>);
}

/// The in-process lock table.
#[derive(Debug, Clone)]
pub struct Table {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    slots: Mutex<HashMap<LockId, Slot>>,
    /// Acquirers queued behind a local owner right now.
    waiting: AtomicUsize,
    next_waiter: AtomicU64,
    release: Arc<dyn Release>,
    /// Streaks that ended in a release whether or not anyone waited elsewhere.
    periodic_releases: AtomicU64,
}

/// A lock somebody owns locally, with what queues behind the owner: boxed,
/// as every held lock has a slot and most never have a waiter.
#[derive(Debug, Default)]
struct Slot(Option<Box<Queue>>);

/// The waiters behind a lock's owner, and its streak of hand-offs.
#[derive(Debug, Default)]
struct Queue {
    waiters: VecDeque<(u64, oneshot::Sender<Turn>)>,
    /// When the current run of local hand-offs of a lock held in PostgreSQL began.
    streak_since: Option<Instant>,
    /// Streaks in a row that ended with the lock kept in PostgreSQL.
    kept: u32,
}

impl Slot {
    fn queue(&mut self) -> &mut Queue {
        self.0.get_or_insert_with(Box::default)
    }

    fn len(&self) -> usize {
        self.0.as_ref().map_or(0, |q| q.waiters.len())
    }

    fn pop_front(&mut self) -> Option<(u64, oneshot::Sender<Turn>)> {
        self.0.as_mut()?.waiters.pop_front()
    }
}

/// The local ownership of a lock, passed on when dropped.
#[derive(Debug)]
pub struct Owned {
    inner: Arc<Inner>,
    id: LockId,
    /// `None`: owned here but not (yet) held beyond this process.
    pub remote: Option<Remote>,
    /// Cleared once the ownership has been passed on explicitly.
    armed: bool,
}

/// Ownership handed to a waiter.
#[derive(Debug)]
pub struct Turn {
    /// The lock, and where it is already held.
    pub owned: Owned,
    /// Released in PostgreSQL at the end of a streak: let other replicas try
    /// first for [`FAIR_PAUSE`].
    pub pause: bool,
    /// Still held in PostgreSQL at the end of a streak: ask whether another
    /// replica waits for it, and if one does, release it and pause.
    pub check: bool,
}

/// What [`Table::enter`] gives: the lock at once, or a place in its queue.
#[derive(Debug)]
pub enum Entry {
    /// Nobody owned it: it is the caller's.
    Owner(Owned),
    /// Somebody owns it: wait for the turn.
    Queued(Queued),
    /// Somebody owns it and the caller would not wait.
    Busy,
}

/// A place in a lock's queue; leaves the queue when dropped.
#[derive(Debug)]
pub struct Queued {
    inner: Arc<Inner>,
    id: LockId,
    waiter: u64,
    turn: Option<oneshot::Receiver<Turn>>,
}

impl Table {
    /// An empty table whose locks held beyond this process are released by `release`.
    pub fn new(release: Arc<dyn Release>) -> Self {
        Table {
            inner: Arc::new(Inner {
                slots: Mutex::default(),
                waiting: AtomicUsize::new(0),
                next_waiter: AtomicU64::new(0),
                release,
                periodic_releases: AtomicU64::new(0),
            }),
        }
    }

    /// Streaks of local hand-offs that ended in a release in PostgreSQL
    /// without asking whether anyone waited elsewhere (every
    /// [`KEEP_STREAKS`] + 1), since the start.
    pub fn periodic_releases(&self) -> u64 {
        self.inner.periodic_releases.load(Ordering::Relaxed)
    }

    /// Takes ownership of `id`, or queues for it (`queue`), or reports it busy.
    pub fn enter(&self, id: LockId, queue: bool) -> Entry {
        let mut slots = self.inner.slots.lock().unwrap_or_else(PoisonError::into_inner);
        match slots.entry(id) {
            hash_map::Entry::Vacant(vacant) => {
                vacant.insert(Slot::default());
                Entry::Owner(Owned {
                    inner: self.inner.clone(),
                    id,
                    remote: None,
                    armed: true,
                })
            }
            hash_map::Entry::Occupied(_) if !queue => Entry::Busy,
            hash_map::Entry::Occupied(mut occupied) => {
                let waiter = self.inner.next_waiter.fetch_add(1, Ordering::Relaxed);
                let (tx, rx) = oneshot::channel();
                occupied.get_mut().queue().waiters.push_back((waiter, tx));
                self.inner.waiting.fetch_add(1, Ordering::SeqCst);
                Entry::Queued(Queued {
                    inner: self.inner.clone(),
                    id,
                    waiter,
                    turn: Some(rx),
                })
            }
        }
    }

    /// Locks owned or queued for right now.
    pub fn keys_in_use(&self) -> usize {
        self.inner.slots.lock().unwrap_or_else(PoisonError::into_inner).len()
    }

    /// Acquirers queued behind a local owner right now.
    pub fn waiting(&self) -> usize {
        self.inner.waiting.load(Ordering::SeqCst)
    }

    /// Whether somebody owns or waits for `id` here right now.
    pub fn in_use(&self, id: LockId) -> bool {
        self.inner
            .slots
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .contains_key(&id)
    }

    /// Acquirers queued for `id` right now.
    pub fn queued(&self, id: LockId) -> usize {
        self.inner
            .slots
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(&id)
            .map_or(0, Slot::len)
    }
}

impl Queued {
    /// Waits for the turn. `None` if the table dropped the queue entry
    /// without a turn, which only happens if the owner's side is gone.
    pub async fn turn(&mut self) -> Option<Turn> {
        let rx = self.turn.as_mut()?;
        let turn = rx.await.ok();
        self.turn = None;
        turn
    }
}

impl Drop for Queued {
    fn drop(&mut self) {
        let mut slots = self.inner.slots.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(Slot(Some(queue))) = slots.get_mut(&self.id)
            && let Some(at) = queue.waiters.iter().position(|(w, _)| *w == self.waiter)
        {
            queue.waiters.remove(at);
        }
        drop(slots);
        self.inner.waiting.fetch_sub(1, Ordering::SeqCst);
        // A turn already sent to this waiter is dropped with the receiver
        // (after this), which passes it on.
    }
}

impl Owned {
    /// The lock owned.
    pub fn id(&self) -> LockId {
        self.id
    }

    /// Passes the lock on now; `ack` is told when whatever had to happen
    /// beyond this process (a release in PostgreSQL) has happened.
    pub fn pass_on(mut self, ack: Option<oneshot::Sender<()>>) {
        self.armed = false;
        let remote = self.remote.take();
        self.inner.clone().pass_on(self.id, remote, ack);
    }
}

impl Drop for Owned {
    fn drop(&mut self) {
        if self.armed {
            self.armed = false;
            let remote = self.remote.take();
            self.inner.clone().pass_on(self.id, remote, None);
        }
    }
}

impl Inner {
    fn pass_on(self: Arc<Self>, id: LockId, mut remote: Option<Remote>, mut ack: Option<oneshot::Sender<()>>) {
        loop {
            // The release beyond this process is sent while the table is
            // locked: a later acquirer of the same lock, who can only enter
            // the table after this, sends its try after this release, so a
            // session never sees a try for a lock ahead of its release.
            let (next, pause, check) = {
                let mut slots = self.slots.lock().unwrap_or_else(PoisonError::into_inner);
                let popped = slots.get_mut(&id).map(|slot| (slot.pop_front(), slot));
                let decided = match popped {
                    // Not in the table: nothing to hand on; release what is held.
                    None => (None, remote.take(), false, false),
                    Some((Some((_, tx)), slot)) => {
                        let slot = slot.queue();
                        if matches!(remote, Some(Remote::Session(..))) {
                            let since = *slot.streak_since.get_or_insert_with(Instant::now);
                            if since.elapsed() < MAX_STREAK {
                                (Some(tx), None, false, false)
                            } else if slot.kept < KEEP_STREAKS {
                                slot.streak_since = None;
                                slot.kept += 1;
                                (Some(tx), None, false, true)
                            } else {
                                slot.streak_since = None;
                                slot.kept = 0;
                                self.periodic_releases.fetch_add(1, Ordering::Relaxed);
                                (Some(tx), remote.take(), true, false)
                            }
                        } else {
                            slot.streak_since = None;
                            (Some(tx), None, false, false)
                        }
                    }
                    Some((None, _)) => {
                        slots.remove(&id);
                        (None, remote.take(), false, false)
                    }
                };
                let (next, release, pause, check) = decided;
                match release {
                    Some(Remote::Session(hold, _)) => self.release.release(id, hold, ack.take()),
                    Some(Remote::Local) | None => {}
                }
                (next, pause, check)
            };
            let Some(tx) = next else {
                if let Some(ack) = ack.take() {
                    let _ = ack.send(());
                }
                return;
            };
            let turn = Turn {
                owned: Owned {
                    inner: self.clone(),
                    id,
                    remote: remote.take(),
                    armed: true,
                },
                pause,
                check,
            };
            match tx.send(turn) {
                Ok(()) => {
                    // Handed on locally: the lock stays held, nothing to wait for.
                    if let Some(ack) = ack.take() {
                        let _ = ack.send(());
                    }
                    return;
                }
                // The waiter is gone: take the lock back and try the next one.
                Err(mut turn) => {
                    turn.owned.armed = false;
                    remote = turn.owned.remote.take();
                }
            }
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[derive(Debug, Default)]
    struct NoRemote;

    impl Release for NoRemote {
        fn release(&self, _: LockId, _: SessionHold, _: Option<oneshot::Sender<()>>) {}
    }

    fn table() -> Table {
        Table::new(Arc::new(NoRemote))
    }

    const K: LockId = LockId::Client(7);

    fn owner(entry: Entry) -> Owned {
        match entry {
            Entry::Owner(owned) => owned,
            other => panic!("expected ownership, got {other:?}"),
        }
    }

    fn queued(entry: Entry) -> Queued {
        match entry {
            Entry::Queued(q) => q,
            other => panic!("expected a queue place, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn an_owned_lock_is_busy_to_a_try_and_passes_to_waiters_in_arrival_order() {
        let table = table();
        let first = owner(table.enter(K, true));
        assert!(matches!(table.enter(K, false), Entry::Busy));
        assert!(matches!(table.enter(LockId::Client(8), false), Entry::Owner(_)));
        let mut waiters: Vec<Queued> = (0..5).map(|_| queued(table.enter(K, true))).collect();
        assert_eq!(table.waiting(), 5);
        drop(first);
        for w in &mut waiters {
            let turn = w.turn().await.expect("a turn");
            assert!(!turn.pause);
            drop(turn);
        }
        drop(waiters);
        assert_eq!(table.waiting(), 0);
        assert_eq!(table.keys_in_use(), 0);
    }

    #[tokio::test]
    async fn a_waiter_that_leaves_is_skipped_and_leaves_nothing_behind() {
        let table = table();
        let first = owner(table.enter(K, true));
        let gone = queued(table.enter(K, true));
        let mut next = queued(table.enter(K, true));
        drop(gone);
        drop(first);
        let turn = next.turn().await.expect("the live waiter gets the lock");
        drop(turn);
        drop(next);
        assert_eq!(table.keys_in_use(), 0);
        assert_eq!(table.waiting(), 0);
    }

    #[tokio::test]
    async fn a_turn_sent_to_a_waiter_that_then_leaves_is_passed_on() {
        let table = table();
        let first = owner(table.enter(K, true));
        let leaving = queued(table.enter(K, true));
        let mut last = queued(table.enter(K, true));
        // The turn reaches `leaving`'s channel, which is dropped unread.
        drop(first);
        drop(leaving);
        assert!(last.turn().await.is_some());
    }

    proptest::proptest! {
        /// Whatever the interleaving of entering, leaving and releasing, at
        /// most one owner exists per lock and the table empties at the end.
        #[test]
        fn at_most_one_owner_and_nothing_left_behind(ops in proptest::collection::vec(0u8..4, 1..200)) {
            let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
            rt.block_on(async {
                let table = table();
                let mut owner_: Option<Owned> = None;
                let mut queue: VecDeque<Queued> = VecDeque::new();
                for op in ops {
                    match op {
                        0 => match table.enter(K, true) {
                            Entry::Owner(o) => { assert!(owner_.is_none()); owner_ = Some(o); }
                            Entry::Queued(q) => queue.push_back(q),
                            Entry::Busy => unreachable!(),
                        },
                        1 => { owner_ = None; }
                        2 => { queue.pop_back(); }
                        _ => {
                            if owner_.is_none() && let Some(mut q) = queue.pop_front() {
                                // Once nobody owns it, the first live waiter has its turn.
                                let turn = q.turn().await.expect("turn");
                                owner_ = Some(turn.owned);
                            }
                        }
                    }
                }
                drop(owner_);
                while let Some(mut q) = queue.pop_front() {
                    drop(q.turn().await);
                }
                assert_eq!(table.keys_in_use(), 0);
                assert_eq!(table.waiting(), 0);
            });
        }
    }
}
