//! Group writes: the runs of SubmitRuns of different systems that reach the
//! write at the same time are stored by one statement, which commits them
//! together.
//!
//! Most of what PostgreSQL spends on a write is not the rows but the
//! statement around them: starting the executor for its six parts, the
//! commit and its WAL flush, the round trip. Under load, writes arrive while
//! others run; the ones that queued meanwhile go together in one
//! [`super::sql::WRITE_SYSTEMS`], so those costs are paid once for all of
//! them. Alone, a write is the one statement it always was
//! ([`super::sql::WRITE_SYSTEM`]).
//!
//! What stays exactly as it is for a write of its own: each member is
//! applied only if its system's version is still the one it loaded, its run
//! id is new, and its transition's sequence is drawn from the counter row
//! held to the commit. A group is applied whole or not at all; when it is
//! refused (one member's system changed, a run id is taken, a row lock was
//! not granted in time), each member is written again on its own, so it
//! gets its own answer and no other member's refusal.
//!
//! Groups run on a task of their own, on the connection of the write that
//! started it, so a client that goes away does not take the others' writes
//! with it; a group all of whose clients went away is ended in the database
//! as an abandoned write of its own is (its connection closed).

use std::{
    collections::{HashSet, VecDeque},
    panic::AssertUnwindSafe,
    sync::{
        Arc, Mutex, PoisonError,
        atomic::{AtomicU64, Ordering},
    },
};

use chrono::{DateTime, Utc};
use futures::FutureExt;
use sqlx::{Row, pool::PoolConnection, postgres::PgRow};
use tokio::sync::oneshot;

use super::{WriteConnection, sql};
use crate::{
    db::WorkPool,
    error::{Error, Result},
    store::pipeline::Written,
};

/// SQLSTATE of a statement PostgreSQL ended to break a deadlock.
const DEADLOCK_DETECTED: &str = "40P01";

/// At most this many writes in one statement: its parameters stay well
/// below a megabyte (a run window is at most about 8 KiB).
const MAX_MEMBERS: usize = 64;

/// Groups that may run at once, each on a connection of its own. More than
/// one, so a group never waits for the one before it to commit: the next
/// forms and runs meanwhile.
const MAX_RUNNING: usize = 2;

/// One write as a group stores it: [`super::super::pipeline::Write`] with its
/// values encoded and owned, so it can travel to the group's task.
#[derive(Debug)]
pub(super) struct Member {
    pub(super) system_id: String,
    pub(super) check_id: String,
    pub(super) status: i16,
    pub(super) loaded_version: Option<i64>,
    pub(super) thresholds: String,
    pub(super) enabled: bool,
    pub(super) check_status: i16,
    pub(super) evaluation: String,
    pub(super) runs_considered: i32,
    pub(super) last_run_at: Option<DateTime<Utc>>,
    pub(super) window: String,
    /// The run (none: a configuration change, never grouped).
    pub(super) run: Option<MemberRun>,
    pub(super) transition_from: Option<i16>,
    /// The check's flapping settings, encoded ("" when off).
    pub(super) flapping_settings: String,
    /// Whether the check flaps.
    pub(super) flapping: bool,
    /// The transition resolves an announced problem (see [`sql::WRITE_SYSTEM`]).
    pub(super) resolves: bool,
    /// The transition carries `flapping`.
    pub(super) transition_flapping: bool,
}

/// The run a write adds to the history.
#[derive(Debug)]
pub(super) struct MemberRun {
    pub(super) run_id: String,
    pub(super) status: i16,
    pub(super) observed_at: DateTime<Utc>,
    pub(super) latency_us: Option<i64>,
    pub(super) message: String,
}

/// A member waiting for its group, and where its answer goes.
struct Waiting {
    member: Member,
    answer: oneshot::Sender<Result<Written>>,
}

#[derive(Default)]
struct Queue {
    waiting: VecDeque<Waiting>,
    /// Group tasks running.
    running: usize,
}

/// Forms and runs the groups of one store.
pub(super) struct Batcher {
    work: WorkPool,
    queue: Mutex<Queue>,
    stats: Arc<Stats>,
}

/// What the groups of a store did since it was opened (writes alone are not
/// counted).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct WriteGroups {
    /// Groups of two or more writes stored by one statement.
    pub applied: u64,
    /// Writes stored in those groups.
    pub members: u64,
    /// Groups refused as a whole, whose members were then written one by one.
    pub refused: u64,
}

#[derive(Default)]
struct Stats {
    applied: AtomicU64,
    members: AtomicU64,
    refused: AtomicU64,
}

impl std::fmt::Debug for Batcher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Batcher").finish_non_exhaustive()
    }
}

impl Batcher {
    pub(super) fn new(work: WorkPool) -> Self {
        Batcher {
            work,
            queue: Mutex::new(Queue::default()),
            stats: Arc::default(),
        }
    }

    pub(super) fn groups(&self) -> WriteGroups {
        WriteGroups {
            applied: self.stats.applied.load(Ordering::Relaxed),
            members: self.stats.members.load(Ordering::Relaxed),
            refused: self.stats.refused.load(Ordering::Relaxed),
        }
    }

    /// Writes waiting for a group to take them.
    pub(super) fn waiting(&self) -> usize {
        self.queue.lock().unwrap_or_else(PoisonError::into_inner).waiting.len()
    }

    /// Stores `member` with whatever other writes are waiting. When fewer
    /// than [`MAX_RUNNING`] groups run, a new one starts on `conn`'s
    /// connection; otherwise the connection goes back to the pool. Either way
    /// the write no longer has it, and takes another if it needs one.
    pub(super) async fn write(self: &Arc<Self>, conn: &mut WriteConnection, member: Member) -> Result<Written> {
        let (answer, answered) = oneshot::channel();
        let start = {
            let mut queue = self.queue.lock().unwrap_or_else(PoisonError::into_inner);
            queue.waiting.push_back(Waiting { member, answer });
            let start = queue.running < MAX_RUNNING && conn.conn.is_some();
            if start {
                queue.running += 1;
            }
            start
        };
        match conn.conn.take() {
            Some(lent) if start => drop(tokio::spawn(Arc::clone(self).run(lent))),
            // Back to the pool while the write waits for a group, for the
            // loads of the writes that will join it.
            idle => drop(idle),
        }
        answered
            .await
            .map_err(|_| Error::Invariant("a group ended without answering a member"))?
    }

    /// Runs groups while writes wait, then gives the connection back.
    async fn run(self: Arc<Self>, conn: PoolConnection<sqlx::Postgres>) {
        let mut conn = WriteConnection {
            conn: Some(conn),
            in_flight: false,
        };
        loop {
            let group = {
                let mut queue = self.queue.lock().unwrap_or_else(PoisonError::into_inner);
                let group = take_group(&mut queue.waiting);
                if group.is_empty() {
                    queue.running -= 1;
                    return;
                }
                group
            };
            if conn.conn.is_none() {
                match self.work.acquire().await {
                    Ok(fresh) => conn.conn = Some(fresh),
                    Err(err) => {
                        refuse(group, &err);
                        continue;
                    }
                }
            }
            let applied = AssertUnwindSafe(apply(&mut conn, group, &self.work, &self.stats))
                .catch_unwind()
                .await;
            if applied.is_err() {
                // The group's members heard of it (their answers were
                // dropped); the connection's state is unknown.
                tracing::error!("a group write panicked; its connection is closed");
                abandon(&mut conn);
            }
        }
    }
}

/// The next group: the oldest waiting writes, at most one per system (a
/// statement may change a row once), up to [`MAX_MEMBERS`].
fn take_group(waiting: &mut VecDeque<Waiting>) -> Vec<Waiting> {
    let mut group = Vec::new();
    let mut systems = HashSet::new();
    let mut index = 0;
    while index < waiting.len() && group.len() < MAX_MEMBERS {
        if waiting[index].answer.is_closed() {
            // Nobody waits for it (the request ended): not written at all.
            waiting.remove(index);
        } else if systems.insert(waiting[index].member.system_id.clone())
            && let Some(taken) = waiting.remove(index)
        {
            group.push(taken);
        } else {
            index += 1;
        }
    }
    group
}

/// Answers every member of `group` with `err` (no connection to write on).
fn refuse(group: Vec<Waiting>, err: &Error) {
    for waiting in group {
        let copy = match err {
            Error::PoolExhausted(kind) => Error::PoolExhausted(*kind),
            _ => Error::DatabaseUnavailable(None),
        };
        let _ = waiting.answer.send(Err(copy));
    }
}

/// Stores `group` on `conn` and answers each member; ends the statement (by
/// closing the connection) if every member's client went away meanwhile, and
/// closes a connection found broken, so the next group takes another.
async fn apply(conn: &mut WriteConnection, mut group: Vec<Waiting>, work: &WorkPool, stats: &Stats) {
    // Byte order, as `WRITE_SYSTEMS` orders them with `COLLATE "C"`: every
    // group locks its systems' rows in this order.
    group.sort_unstable_by(|a, b| a.member.system_id.cmp(&b.member.system_id));
    let (members, mut answers): (Vec<Member>, Vec<oneshot::Sender<Result<Written>>>) =
        group.into_iter().map(|w| (w.member, w.answer)).unzip();
    let outcomes = {
        let all_gone = all_gone(&mut answers);
        tokio::select! {
            outcomes = write_all(conn, &members, stats) => Some(outcomes),
            () = all_gone => None,
        }
    };
    let Some(outcomes) = outcomes else {
        abandon(conn);
        return;
    };
    let broken = outcomes
        .iter()
        .any(|o| matches!(o, Err(err) if work.health().check(err)));
    answer(answers, outcomes);
    if broken {
        abandon(conn);
    }
}

/// The outcome of each of `members`, in their order.
async fn write_all(conn: &mut WriteConnection, members: &[Member], stats: &Stats) -> Vec<Result<Written>> {
    if let [alone] = members {
        return vec![write_one(conn, alone).await];
    }
    match write_group(conn, members).await {
        Ok(rows) => {
            stats.applied.fetch_add(1, Ordering::Relaxed);
            stats.members.fetch_add(members.len() as u64, Ordering::Relaxed);
            members.iter().map(|m| applied(&rows, &m.system_id)).collect()
        }
        Err(err) if crate::error::is_connection_lost(&err) => {
            // The statement's outcome is unknown, and the connection gone:
            // each member hears UNAVAILABLE, as a write of its own would.
            let err = Error::from(err);
            let mut outcomes = Vec::with_capacity(members.len());
            outcomes.push(Err(err));
            outcomes.extend(members[1..].iter().map(|_| Err(Error::DatabaseUnavailable(None))));
            outcomes
        }
        Err(err) => {
            // Nothing of the group was written (the statement failed as a
            // whole): each member on its own, for its own answer, with the
            // group's short wait for a row another session holds.
            stats.refused.fetch_add(1, Ordering::Relaxed);
            tracing::debug!(error = %err, members = members.len(), "group write refused; writing its members one by one");
            let mut outcomes = Vec::with_capacity(members.len());
            for member in members {
                let outcome = match write_group(conn, std::slice::from_ref(member)).await {
                    Ok(rows) => applied(&rows, &member.system_id),
                    Err(err) => refused(err, &member.system_id),
                };
                outcomes.push(outcome);
            }
            outcomes
        }
    }
}

/// A member's outcome from the rows a group statement returned.
fn applied(rows: &[PgRow], system_id: &str) -> Result<Written> {
    let row = rows
        .iter()
        .find(|r| r.try_get::<&str, _>("system_id").is_ok_and(|s| s == system_id))
        .ok_or(Error::Invariant(
            "a group write that was not refused wrote each of its systems",
        ))?;
    super::written_from_row(row)
}

/// Resolves once no member of a group waits for its answer any more.
async fn all_gone(answers: &mut [oneshot::Sender<Result<Written>>]) {
    futures::future::join_all(answers.iter_mut().map(oneshot::Sender::closed)).await;
}

fn answer(answers: Vec<oneshot::Sender<Result<Written>>>, outcomes: Vec<Result<Written>>) {
    for (answer, outcome) in answers.into_iter().zip(outcomes) {
        let _ = answer.send(outcome);
    }
}

/// A statement nobody waits for any more: closes the connection (which ends
/// the statement in the database, see [`WriteConnection`]); the task takes
/// another for the next group.
fn abandon(conn: &mut WriteConnection) {
    if let Some(lost) = conn.conn.take() {
        if conn.in_flight {
            drop(lost.detach());
        } else {
            drop(lost);
        }
    }
    conn.in_flight = false;
}

/// One write, in [`sql::WRITE_SYSTEM`].
pub(super) async fn write_one(conn: &mut WriteConnection, m: &Member) -> Result<Written> {
    let run = m.run.as_ref();
    let Some(target) = conn.start() else {
        return Err(Error::DatabaseUnavailable(None));
    };
    let row = sqlx::query(sql::WRITE_SYSTEM)
        .bind(m.system_id.as_str())
        .bind(m.check_id.as_str())
        .bind(m.status)
        .bind(m.loaded_version)
        .bind(m.thresholds.as_str())
        .bind(m.enabled)
        .bind(m.check_status)
        .bind(m.evaluation.as_str())
        .bind(m.runs_considered)
        .bind(m.last_run_at)
        .bind(m.window.as_str())
        .bind(run.map(|r| r.run_id.as_str()))
        .bind(run.map(|r| r.status))
        .bind(run.map(|r| r.observed_at))
        .bind(run.and_then(|r| r.latency_us))
        .bind(run.map(|r| r.message.as_str()))
        .bind(m.transition_from.is_some())
        .bind(m.transition_from)
        .bind(m.flapping_settings.as_str())
        .bind(m.flapping)
        .bind(m.resolves)
        .bind(m.transition_flapping)
        .fetch_optional(target)
        .await;
    conn.done();
    let row = match row {
        Ok(Some(row)) => row,
        Err(err) => return refused(err, &m.system_id),
        Ok(None) => return Err(Error::Invariant("a write that was not refused wrote its system")),
    };
    super::written_from_row(&row)
}

/// What a refused write means for its member.
fn refused(err: sqlx::Error, system_id: &str) -> Result<Written> {
    if super::violates(&err, super::STALE_WRITE) {
        return Ok(Written::Stale);
    }
    if super::violates(&err, super::RUNS_KEY) {
        return Ok(Written::RunIdTaken);
    }
    // Another write of the system held its row past `lock_timeout`, or
    // waited for this one's while this one waited for it.
    if matches!(
        crate::error::sqlstate(&err).as_deref(),
        Some(super::LOCK_NOT_AVAILABLE | DEADLOCK_DETECTED)
    ) {
        return Err(Error::SystemBusy {
            system_id: system_id.to_owned(),
        });
    }
    Err(err.into())
}

/// Several writes, of distinct systems ordered by id, in
/// [`sql::WRITE_SYSTEMS`]: the rows it returned, or its error (nothing
/// written).
async fn write_group(conn: &mut WriteConnection, members: &[Member]) -> std::result::Result<Vec<PgRow>, sqlx::Error> {
    let column = |f: &dyn Fn(&Member) -> String| members.iter().map(f).collect::<Vec<String>>();
    let system_ids = column(&|m| m.system_id.clone());
    let check_ids = column(&|m| m.check_id.clone());
    let thresholds = column(&|m| m.thresholds.clone());
    let evaluations = column(&|m| m.evaluation.clone());
    let windows = column(&|m| m.window.clone());
    let run_ids = column(&|m| m.run.as_ref().map_or_else(String::new, |r| r.run_id.clone()));
    let messages = column(&|m| m.run.as_ref().map_or_else(String::new, |r| r.message.clone()));
    let statuses: Vec<i16> = members.iter().map(|m| m.status).collect();
    let versions: Vec<Option<i64>> = members.iter().map(|m| m.loaded_version).collect();
    let enabled: Vec<bool> = members.iter().map(|m| m.enabled).collect();
    let check_statuses: Vec<i16> = members.iter().map(|m| m.check_status).collect();
    let considered: Vec<i32> = members.iter().map(|m| m.runs_considered).collect();
    let last_run_at: Vec<Option<DateTime<Utc>>> = members.iter().map(|m| m.last_run_at).collect();
    let run_statuses: Vec<i16> = members.iter().map(|m| m.run.as_ref().map_or(0, |r| r.status)).collect();
    let observed_at: Vec<DateTime<Utc>> = members
        .iter()
        .map(|m| m.run.as_ref().map_or(DateTime::UNIX_EPOCH, |r| r.observed_at))
        .collect();
    let latencies: Vec<Option<i64>> = members
        .iter()
        .map(|m| m.run.as_ref().and_then(|r| r.latency_us))
        .collect();
    let from: Vec<Option<i16>> = members.iter().map(|m| m.transition_from).collect();
    let resolves: Vec<bool> = members.iter().map(|m| m.resolves).collect();
    let transition_flapping: Vec<bool> = members.iter().map(|m| m.transition_flapping).collect();
    let flapping_settings = column(&|m| m.flapping_settings.clone());
    let flapping: Vec<bool> = members.iter().map(|m| m.flapping).collect();

    let Some(target) = conn.start() else {
        return Err(sqlx::Error::PoolClosed);
    };
    let rows = sqlx::query(sql::WRITE_SYSTEMS)
        .bind(&system_ids)
        .bind(&check_ids)
        .bind(&statuses)
        .bind(&versions)
        .bind(&thresholds)
        .bind(&enabled)
        .bind(&check_statuses)
        .bind(&evaluations)
        .bind(&considered)
        .bind(&last_run_at)
        .bind(&windows)
        .bind(&run_ids)
        .bind(&run_statuses)
        .bind(&observed_at)
        .bind(&latencies)
        .bind(&messages)
        .bind(&from)
        .bind(&resolves)
        .bind(&transition_flapping)
        .bind(&flapping_settings)
        .bind(&flapping)
        .fetch_all(target)
        .await;
    conn.done();
    rows
}
