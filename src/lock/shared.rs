//! Shared holders of a client key on one replica.
//!
//! The readers of a key on one replica hold it as a *group*: one member
//! takes it (the group's ownership of the key in the lock table, and with
//! PostgreSQL one shared advisory lock on the shared session), the others
//! join that hold without a round trip, and the last to leave lets it go. In
//! the lock table the group is one owner among the key's writers, so readers
//! and writers of one replica take turns in arrival order; across replicas
//! PostgreSQL keeps shared and exclusive holds apart.
//!
//! Writers are not starved by a stream of readers: a reader joins a group's
//! hold only while no writer waits for the key, and only within
//! [`MAX_STREAK`] of the last time the group found no writer waiting on
//! another replica (announced through the key's interest lock, see
//! [`super::id::INTEREST_SPACE`]). Once a writer waits, later readers wait
//! for the group to empty and for the writer's turn. Readers that arrived
//! before the group's hold was granted join it whatever waits, so readers
//! are not starved by writers either.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex, PoisonError},
    time::Instant,
};

use tokio::sync::{oneshot, watch};

use super::{
    LockId,
    session::SessionHold,
    table::{MAX_STREAK, Owned, Release, Tokens},
};

/// The groups of shared holders of this replica, by key number.
#[derive(Debug, Clone)]
pub struct Readers {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    groups: Mutex<HashMap<i64, Group>>,
    release: Arc<dyn Release>,
}

/// The readers of one key on this replica.
#[derive(Debug)]
struct Group {
    /// Members holding the key now.
    holders: usize,
    /// Readers that arrived and neither hold nor gave up.
    waiting: usize,
    /// The next arrival's ticket.
    next_ticket: u64,
    /// Readers whose ticket is below this arrived before the hold was
    /// granted: they join it whatever waits.
    admit_below: u64,
    state: State,
    /// The last hold was let go for a writer: the next taker lets writers
    /// of other replicas (who try every [`super::session::POLL`]) try
    /// first, for [`super::table::FAIR_PAUSE`].
    pause_next: bool,
    /// Bumped at every change a waiting reader may care about.
    changed: watch::Sender<u64>,
}

/// Where a group's hold is.
#[derive(Debug)]
enum State {
    /// Nobody holds the key here and nobody takes it.
    Idle,
    /// A member is taking it.
    Taking,
    /// Held.
    Held(Hold),
}

/// A group's hold of its key.
#[derive(Debug)]
struct Hold {
    /// The key's slot in the lock table, which keeps this replica's writers out.
    owned: Owned,
    /// The shared advisory lock (`None` with the embedded store).
    pg: Option<SessionHold>,
    /// Tokens reserved for the next members.
    tokens: Arc<tokio::sync::Mutex<Tokens>>,
    /// Since when new readers join without asking whether a writer of
    /// another replica waits.
    streak_since: Instant,
    /// A writer waits: nobody joins any more (but early arrivals).
    closed: bool,
    /// A member is asking whether a writer of another replica waits.
    checking: bool,
}

/// A reader that arrived and holds nothing yet; leaves the group when dropped.
#[derive(Debug)]
pub struct Arrival {
    readers: Readers,
    key: i64,
    ticket: u64,
    /// Cleared once the arrival became a member.
    armed: bool,
    /// It is taking the key for the group.
    taking: bool,
}

/// What an arrival does next.
#[derive(Debug)]
pub enum Step {
    /// Joined the hold: a member now.
    Joined(Member),
    /// Nobody holds the key here: take it (after [`super::table::FAIR_PAUSE`]
    /// if `pause`), then [`Arrival::taken`] or [`Arrival::take_failed`].
    Take {
        /// Let a writer of another replica try first.
        pause: bool,
    },
    /// The hold's streak is over: ask whether a writer of another replica
    /// waits for the key held as `hold`, then [`Arrival::checked`].
    Check(SessionHold),
    /// Wait for a change (or for long enough that a writer's queue may have
    /// changed).
    Wait(watch::Receiver<u64>),
}

/// A reader that holds the key with its group. Dropping it leaves the group.
#[derive(Debug)]
pub struct Member {
    readers: Readers,
    key: i64,
    /// The group's shared advisory lock, for keep-alives and loss.
    pub pg: Option<SessionHold>,
    /// Tokens reserved for the group's members.
    pub tokens: Arc<tokio::sync::Mutex<Tokens>>,
    armed: bool,
}

impl Readers {
    /// No readers; holds beyond this process are released by `release`.
    pub fn new(release: Arc<dyn Release>) -> Self {
        Readers {
            inner: Arc::new(Inner {
                groups: Mutex::default(),
                release,
            }),
        }
    }

    /// A reader of `key` arrives.
    pub fn arrive(&self, key: i64) -> Arrival {
        let mut groups = self.inner.groups.lock().unwrap_or_else(PoisonError::into_inner);
        let group = groups.entry(key).or_insert_with(|| Group {
            holders: 0,
            waiting: 0,
            next_ticket: 0,
            admit_below: 0,
            state: State::Idle,
            pause_next: false,
            changed: watch::Sender::new(0),
        });
        let ticket = group.next_ticket;
        group.next_ticket += 1;
        group.waiting += 1;
        Arrival {
            readers: self.clone(),
            key,
            ticket,
            armed: true,
            taking: false,
        }
    }

    /// Keys with readers (holding or waiting) right now.
    pub fn keys_in_use(&self) -> usize {
        self.inner.groups.lock().unwrap_or_else(PoisonError::into_inner).len()
    }

    /// Members holding `key` right now.
    pub fn holders(&self, key: i64) -> usize {
        self.inner
            .groups
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(&key)
            .map_or(0, |g| g.holders)
    }

    /// Readers waiting for `key` right now.
    pub fn waiting(&self, key: i64) -> usize {
        self.inner
            .groups
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(&key)
            .map_or(0, |g| g.waiting)
    }

    fn with_group<T>(&self, key: i64, f: impl FnOnce(&mut Group) -> T) -> Option<T> {
        let mut groups = self.inner.groups.lock().unwrap_or_else(PoisonError::into_inner);
        let group = groups.get_mut(&key)?;
        let out = f(group);
        if group.holders == 0 && group.waiting == 0 && matches!(group.state, State::Idle) {
            groups.remove(&key);
        }
        Some(out)
    }
}

impl Group {
    fn bump(&self) {
        self.changed.send_modify(|n| *n = n.wrapping_add(1));
    }
}

impl Arrival {
    /// What to do next. `writer_waits`: whether a writer of this replica
    /// queues for the key.
    pub fn step(&mut self, writer_waits: bool) -> Step {
        let ticket = self.ticket;
        let key = self.key;
        let readers = self.readers.clone();
        let step = readers.with_group(key, |group| {
            let early = ticket < group.admit_below;
            match &mut group.state {
                State::Idle => {
                    group.state = State::Taking;
                    Step::Take {
                        pause: std::mem::take(&mut group.pause_next),
                    }
                }
                State::Taking => Step::Wait(group.changed.subscribe()),
                State::Held(hold) => {
                    let lost = hold.pg.as_ref().is_some_and(|pg| pg.generation.is_lost());
                    if lost || (!early && (hold.closed || writer_waits)) {
                        if writer_waits {
                            hold.closed = true;
                        }
                        return Step::Wait(group.changed.subscribe());
                    }
                    if !early
                        && hold.streak_since.elapsed() >= MAX_STREAK
                        && let Some(pg) = &hold.pg
                    {
                        if hold.checking {
                            return Step::Wait(group.changed.subscribe());
                        }
                        hold.checking = true;
                        return Step::Check(pg.clone());
                    }
                    let member = Member {
                        readers: readers.clone(),
                        key,
                        pg: hold.pg.clone(),
                        tokens: hold.tokens.clone(),
                        armed: true,
                    };
                    group.holders += 1;
                    group.waiting -= 1;
                    Step::Joined(member)
                }
            }
        });
        match step {
            Some(Step::Joined(member)) => {
                self.armed = false;
                Step::Joined(member)
            }
            Some(step @ Step::Take { .. }) => {
                self.taking = true;
                step
            }
            Some(step @ Step::Wait(_)) => {
                // A hold nobody may join any more is let go by the last
                // member; one that has none left goes now.
                readers.settle(key, None);
                step
            }
            Some(step) => step,
            // The group always exists while an arrival is armed.
            None => Step::Wait(watch::Sender::new(0).subscribe()),
        }
    }

    /// The key was taken for the group: in the lock table (`owned`) and in
    /// PostgreSQL (`pg`), with `tokens` reserved. Everyone who arrived so
    /// far may join.
    pub fn taken(&mut self, owned: Owned, pg: Option<SessionHold>, tokens: Tokens) {
        self.taking = false;
        self.readers.with_group(self.key, |group| {
            group.state = State::Held(Hold {
                owned,
                pg,
                tokens: Arc::new(tokio::sync::Mutex::new(tokens)),
                streak_since: Instant::now(),
                closed: false,
                checking: false,
            });
            group.admit_below = group.next_ticket;
            group.bump();
        });
    }

    /// Taking the key failed or timed out: somebody else may try.
    pub fn take_failed(&mut self) {
        self.taking = false;
        self.readers.with_group(self.key, |group| {
            group.state = State::Idle;
            group.bump();
        });
    }

    /// The answer to [`Step::Check`]: whether a writer of another replica waits.
    pub fn checked(&mut self, wanted: bool) {
        self.readers.with_group(self.key, |group| {
            if let State::Held(hold) = &mut group.state {
                hold.checking = false;
                if wanted {
                    hold.closed = true;
                } else {
                    hold.streak_since = Instant::now();
                }
            }
            group.bump();
        });
    }
}

impl Drop for Arrival {
    fn drop(&mut self) {
        if self.armed {
            let key = self.key;
            let taking = self.taking;
            self.readers.with_group(key, |group| {
                group.waiting -= 1;
                if taking {
                    group.state = State::Idle;
                }
                // A member-to-be that gave up while taking leaves it to the next.
                group.bump();
            });
            self.readers.settle(key, None);
        }
    }
}

impl Member {
    /// Leaves the group; `ack` is told once whatever had to be released is.
    pub fn leave(mut self, ack: Option<oneshot::Sender<()>>) {
        self.armed = false;
        self.readers.clone().leave(self.key, ack);
    }
}

impl Drop for Member {
    fn drop(&mut self) {
        if self.armed {
            self.armed = false;
            self.readers.clone().leave(self.key, None);
        }
    }
}

impl Readers {
    fn leave(&self, key: i64, ack: Option<oneshot::Sender<()>>) {
        self.with_group(key, |group| {
            group.holders = group.holders.saturating_sub(1);
        });
        self.settle(key, ack);
    }

    /// Lets the key go when its group holds it with no member and nobody
    /// who may still join.
    fn settle(&self, key: i64, ack: Option<oneshot::Sender<()>>) {
        let hold = self
            .with_group(key, |group| {
                let State::Held(hold) = &group.state else {
                    return None;
                };
                let lost = hold.pg.as_ref().is_some_and(|pg| pg.generation.is_lost());
                let may_join = group.waiting > 0 && !hold.closed && !lost;
                if group.holders > 0 || may_join {
                    return None;
                }
                let State::Held(hold) = std::mem::replace(&mut group.state, State::Idle) else {
                    return None;
                };
                group.pause_next = hold.closed;
                group.bump();
                Some(hold)
            })
            .flatten();
        match hold {
            Some(hold) => {
                // PostgreSQL's hold first, then the table's: the next writer
                // here tries after the release was sent.
                match hold.pg {
                    Some(pg) => self.inner.release.release(LockId::Shared(key), pg, ack),
                    None => {
                        if let Some(ack) = ack {
                            let _ = ack.send(());
                        }
                    }
                }
                drop(hold.owned);
            }
            None => {
                if let Some(ack) = ack {
                    let _ = ack.send(());
                }
            }
        }
    }
}
