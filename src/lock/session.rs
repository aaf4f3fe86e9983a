//! The lock manager's PostgreSQL sessions: `DATABASE_LOCK_POOL_MAX`
//! long-lived connections, each holding many session-level advisory locks,
//! each driven by one task that sends whatever arrived meanwhile as one
//! statement (releases, tries, fencing tokens, over arrays of bound keys).
//!
//! # Promises under faults
//! - A session proves it is alive with a statement at least every
//!   [`Timing::heartbeat`] while it holds locks. Its locks are valid until
//!   the moment the last successful statement was *sent* plus the lease
//!   ([`Timing::window`]); PostgreSQL ends the session (`idle_session_timeout`)
//!   only after it has been idle longer than that plus a margin. So a holder
//!   is told `LOCK_LOST` (the generation's `lost` flag) before PostgreSQL can
//!   give its lock to anybody else, whether the link froze, vitals stalled
//!   or PostgreSQL went away; every statement is bounded by that validity.
//! - A session that broke is replaced by a new *generation*; everything held
//!   by the old one is lost, and releases addressed to it are ignored.
//! - Fencing tokens come from a sequence (`vitals_fencing_tokens`) drawn in
//!   the statement that grants the locks, which also takes a transaction id
//!   so that its commit (`synchronous_commit=on`) flushes them before the
//!   reply: a token is reported only once no later grant, on any replica,
//!   after any crash, can draw it or a lower one.
//! - Sessions take turns: while one has a statement in flight, another that
//!   has work waits up to [`TURN_WAIT`] for it, and sends what arrived
//!   meanwhile as one larger batch. PostgreSQL's cost is mostly per
//!   statement, so the same locks cost it less; a session whose statement
//!   hangs holds the others up by [`TURN_WAIT`] per statement at most.
//! - A batch that runs out of PostgreSQL's shared lock table
//!   (`out of shared memory`) may have taken some of its locks before the
//!   error (session locks outlive the failed statement): the session reads
//!   back what it holds from `pg_locks` and releases what nobody owns.

use std::{
    collections::{HashMap, HashSet},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use sqlx::{Connection, PgConnection, Row, postgres::PgConnectOptions};
use tokio::sync::{Semaphore, mpsc, oneshot, watch};
use tokio_util::sync::CancellationToken;

use super::{LockId, table::Release};
use crate::error::{Error, Result, is_connection_lost, sqlstate};

/// How often the head of a key held elsewhere (another replica, another
/// program) tries again.
pub const POLL: Duration = Duration::from_millis(5);

/// SQLSTATE `out_of_memory`: PostgreSQL's shared lock table is full.
const OUT_OF_SHARED_MEMORY: &str = "53200";

/// How long a session with work waits for another session's statement to
/// end before it sends its own anyway.
pub const TURN_WAIT: Duration = Duration::from_millis(1);

/// Commands taken per statement at most.
const MAX_BATCH: usize = 4096;

/// Releases (locks, and interest no longer held, `$9`/`$10`), announces
/// this replica's interest in locks it waits for (`$11`/`$12`, shared locks
/// in [`super::id::INTEREST_SPACE`]), finds which locks held here nobody
/// else announced interest in (`$13`/`$14`: a momentary exclusive try of
/// their interest lock; the rows marked `unwanted`), then tries, then draws
/// the fencing tokens each granted client lock asked for (`$5`) plus `$8`
/// more, all in one autocommitted statement. An interest lock is only ever
/// held exclusively inside one `CASE`, so announcing one waits at most for
/// that.
/// The `CASE` on `released.n` makes every try wait for the releases. The
/// tokens come from a sequence, which no session waits for. A sequence
/// WAL-logs 32 values ahead, and only the `nextval` that writes that record
/// gives its transaction an id (whose commit waits for the flush); the next
/// 31 values may be drawn by other sessions, in transactions that commit
/// without a flush, while the record is still unflushed. `txid_current()`
/// gives every drawing statement a transaction id, so its commit flushes all
/// WAL before it, the sequence's record included: no token is reported
/// before it is durable (and on a synchronous standby).
const BATCH_SQL: &str = "\
WITH released AS MATERIALIZED (
    SELECT (SELECT count(*) FROM unnest($1::int8[]) AS u(k) WHERE pg_advisory_unlock(u.k))
         + (SELECT count(*) FROM unnest($2::int4[], $3::int4[]) AS u(a, b) WHERE pg_advisory_unlock(u.a, u.b))
         + (SELECT count(*) FROM unnest($9::int4[], $10::int4[]) AS u(a, b) WHERE pg_advisory_unlock_shared(u.a, u.b))
         + (SELECT count(*) FROM unnest($11::int4[], $12::int4[]) AS u(a, b)
            WHERE pg_advisory_lock_shared(u.a, u.b)::text IS NOT NULL) AS n),
unwanted AS MATERIALIZED (
    SELECT t.a, t.b FROM released, unnest($13::int4[], $14::int4[]) AS t(a, b)
    WHERE CASE WHEN released.n >= 0 AND pg_try_advisory_lock(t.a, t.b) THEN pg_advisory_unlock(t.a, t.b) ELSE false END),
granted AS MATERIALIZED (
    SELECT t.k, NULL::int4 AS a, NULL::int4 AS b, t.tok
    FROM released, unnest($4::int8[], $5::int4[]) AS t(k, tok)
    WHERE CASE WHEN released.n >= 0 THEN pg_try_advisory_lock(t.k) END
    UNION ALL
    SELECT NULL::int8, t.a, t.b, 0
    FROM released, unnest($6::int4[], $7::int4[]) AS t(a, b)
    WHERE CASE WHEN released.n >= 0 THEN pg_try_advisory_lock(t.a, t.b) END),
wanted AS MATERIALIZED (SELECT coalesce(sum(tok), 0) + $8::int8 AS n FROM granted),
drawn AS MATERIALIZED (
    SELECT nextval('vitals_fencing_tokens') AS token FROM wanted, generate_series(1, wanted.n)),
durable AS MATERIALIZED (
    SELECT CASE WHEN wanted.n > 0 THEN txid_current() END AS xid FROM wanted)
SELECT k, a, b, NULL::int8 AS token, NULL::int8 AS xid, false AS unwanted FROM granted
UNION ALL
SELECT NULL, NULL, NULL, token, (SELECT xid FROM durable), false FROM drawn
UNION ALL
SELECT NULL, a, b, NULL, NULL, true FROM unwanted";

/// [`BATCH_SQL`] for the session that holds client locks shared: the same
/// statement, with shared releases and tries of client locks.
static SHARED_BATCH_SQL: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
    BATCH_SQL
        .replace("pg_advisory_unlock(u.k)", "pg_advisory_unlock_shared(u.k)")
        .replace("pg_try_advisory_lock(t.k)", "pg_try_advisory_lock_shared(t.k)")
});

/// [`UNLOCK_ALL_SQL`] for the session that holds client locks shared.
static SHARED_UNLOCK_ALL_SQL: std::sync::LazyLock<String> =
    std::sync::LazyLock::new(|| UNLOCK_ALL_SQL.replace("pg_advisory_unlock(u.k)", "pg_advisory_unlock_shared(u.k)"));

/// What this session holds, as `pg_locks` shows it.
const HELD_SQL: &str = "SELECT objsubid::int4 AS sub, classid::int8 AS hi, objid::int8 AS lo FROM pg_locks \
     WHERE locktype = 'advisory' AND pid = pg_backend_pid() AND granted";

/// The timing every session keeps.
#[derive(Debug, Clone, Copy)]
pub struct Timing {
    /// How long a lock stays valid after its session last proved alive: the lease.
    pub window: Duration,
    /// How often a session holding locks proves it is alive.
    pub heartbeat: Duration,
    /// The longest wait for a new connection.
    pub connect: Duration,
}

impl Timing {
    /// The timing for a lease: heartbeats four times per lease, at most every 250 ms.
    pub fn for_lease(lease: Duration, connect: Duration) -> Self {
        Timing {
            window: lease,
            heartbeat: (lease / 4).clamp(Duration::from_millis(10), Duration::from_millis(250)),
            connect,
        }
    }
}

/// One life of a session: from connect to the first failure.
#[derive(Debug)]
pub struct Generation {
    number: u64,
    origin: Instant,
    /// Milliseconds after `origin` at which the last successful statement was sent.
    alive_ms: AtomicU64,
    /// Cancelled when the generation is lost.
    lost: CancellationToken,
    /// Cancelled when the generation is lost or the server shuts down (a
    /// child of the shutdown token): what a held lock's stream waits on, one
    /// wait instead of two.
    ended: CancellationToken,
    window: Duration,
}

impl Generation {
    fn new(number: u64, window: Duration, stop: &CancellationToken) -> Arc<Self> {
        Arc::new(Generation {
            number,
            origin: Instant::now(),
            alive_ms: AtomicU64::new(0),
            lost: CancellationToken::new(),
            ended: stop.child_token(),
            window,
        })
    }

    fn proved_alive_at(&self, sent: Instant) {
        let ms = u64::try_from(sent.saturating_duration_since(self.origin).as_millis()).unwrap_or(u64::MAX);
        self.alive_ms.fetch_max(ms, Ordering::SeqCst);
    }

    /// When the session last proved alive (the send time of its last good statement).
    pub fn alive_at(&self) -> Instant {
        self.origin + Duration::from_millis(self.alive_ms.load(Ordering::SeqCst))
    }

    /// Until when what this generation holds is valid.
    pub fn valid_until(&self) -> Instant {
        self.alive_at() + self.window
    }

    /// Whether the generation was lost.
    pub fn is_lost(&self) -> bool {
        self.lost.is_cancelled()
    }

    /// Cancelled when the generation is lost or the server shuts down.
    pub fn ended(&self) -> CancellationToken {
        self.ended.clone()
    }

    fn mark_lost(&self) {
        self.lost.cancel();
        self.ended.cancel();
    }
}

/// A lock held on a session, as its owner knows it.
#[derive(Debug, Clone)]
pub struct SessionHold {
    /// Which session.
    pub index: usize,
    /// Which life of it.
    pub generation: Arc<Generation>,
}

/// What a try gave.
#[derive(Debug)]
pub enum TryOutcome {
    /// Granted, with the fencing tokens asked for, in ascending order.
    Granted(SessionHold, Vec<u64>),
    /// Held by another session (another replica, another program).
    Busy,
}

enum Cmd {
    Try {
        id: LockId,
        tokens: u32,
        /// The acquirer tried before and waits: announce its interest.
        interest: bool,
        reply: oneshot::Sender<Result<TryOutcome>>,
    },
    /// The acquirer that announced interest in `id` stopped waiting.
    Uninterest { id: LockId },
    /// Whether another replica announced interest in `id`, held here.
    Wanted {
        id: LockId,
        generation: u64,
        reply: oneshot::Sender<Result<bool>>,
    },
    Token {
        generation: u64,
        count: u32,
        reply: oneshot::Sender<Result<Vec<u64>>>,
    },
    Unlock {
        id: LockId,
        generation: u64,
        ack: Option<oneshot::Sender<()>>,
    },
    Ping {
        generation: u64,
        reply: oneshot::Sender<bool>,
    },
}

/// The sessions of one replica: `DATABASE_LOCK_POOL_MAX` that hold locks
/// exclusively, and one more, last, that holds them shared.
#[derive(Debug)]
pub struct Sessions {
    senders: Vec<mpsc::UnboundedSender<Cmd>>,
    timing: Timing,
    states: Vec<Arc<SessionState>>,
}

/// What a session's task last reported of its connection, for metrics.
#[derive(Debug, Default)]
struct SessionState {
    connected: AtomicBool,
    holding: AtomicBool,
}

/// The lock sessions' connections, split as a pool's are.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SessionUse {
    /// Connected, holding nothing.
    pub idle: u64,
    /// Connected, holding locks (or waiting for some held elsewhere).
    pub holding: u64,
}

impl std::fmt::Debug for Cmd {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Cmd::Try { .. } => "Try",
            Cmd::Uninterest { .. } => "Uninterest",
            Cmd::Wanted { .. } => "Wanted",
            Cmd::Token { .. } => "Token",
            Cmd::Unlock { .. } => "Unlock",
            Cmd::Ping { .. } => "Ping",
        })
    }
}

fn gone() -> Error {
    Error::DatabaseUnavailable(None)
}

impl Sessions {
    /// Starts `n` session tasks connecting with `options` (lazily, at their
    /// first command); they close their connections when `shutdown` turns
    /// true, after `stop` is cancelled.
    pub fn start(
        n: u32,
        options: PgConnectOptions,
        timing: Timing,
        shutdown: watch::Receiver<bool>,
        stop: &CancellationToken,
    ) -> Arc<Self> {
        // One statement in flight across the sessions at a time (see
        // TURN_WAIT): each turn's batch is larger, so PostgreSQL runs fewer
        // statements for the same locks.
        let turn = Arc::new(Semaphore::new(1));
        let mut states = Vec::new();
        // One more session than asked for, last, holds shared locks: a
        // session's own locks never conflict in PostgreSQL, so shared and
        // exclusive holds of one key must live on different sessions for
        // PostgreSQL to keep them apart. It connects at its first use.
        let exclusive = n.max(1);
        let senders = (0..=exclusive)
            .map(|index| {
                let (tx, rx) = mpsc::unbounded_channel();
                let state = Arc::new(SessionState::default());
                states.push(state.clone());
                let session = Session {
                    index: usize::try_from(index).unwrap_or(0),
                    options: options.clone(),
                    timing,
                    rx,
                    live: None,
                    generations: 0,
                    turn: turn.clone(),
                    state,
                    shared: index == exclusive,
                    stop: stop.clone(),
                };
                tokio::spawn(session.run(shutdown.clone()));
                tx
            })
            .collect();
        Arc::new(Sessions {
            senders,
            timing,
            states,
        })
    }

    /// How many sessions are connected, and how many of them hold locks.
    pub fn usage(&self) -> SessionUse {
        let mut usage = SessionUse::default();
        for state in &self.states {
            if state.connected.load(Ordering::Relaxed) {
                if state.holding.load(Ordering::Relaxed) {
                    usage.holding += 1;
                } else {
                    usage.idle += 1;
                }
            }
        }
        usage
    }

    /// The timing of the sessions.
    pub fn timing(&self) -> Timing {
        self.timing
    }

    /// The session that holds `id`: shared holds on the last one, the
    /// others spread over the rest.
    fn index_of(&self, id: LockId) -> usize {
        let exclusive = self.senders.len().saturating_sub(1).max(1);
        match id {
            LockId::Shared(_) => exclusive,
            _ => id.shard(exclusive),
        }
    }

    fn send(&self, index: usize, cmd: Cmd) {
        if let Some(tx) = self.senders.get(index) {
            // A closed channel means shutdown: the reply channel drops, which
            // the caller reads as "gone".
            let _ = tx.send(cmd);
        }
    }

    /// Tries `id` on its session once; granted, it draws `tokens` fencing
    /// tokens in the same statement.
    /// With `interest`, the acquirer waits for `id` (it tried before): the
    /// session announces that to other replicas until [`Sessions::uninterest`]
    /// or a grant.
    pub async fn try_lock(&self, id: LockId, tokens: u32, interest: bool) -> Result<TryOutcome> {
        let (reply, rx) = oneshot::channel();
        self.send(
            self.index_of(id),
            Cmd::Try {
                id,
                tokens,
                interest,
                reply,
            },
        );
        let mut pending = PendingTry {
            rx: Some(rx),
            id,
            sessions: self,
        };
        let outcome = match pending.rx.as_mut() {
            Some(rx) => rx.await.map_err(|_| Error::ShuttingDown)?,
            None => Err(Error::ShuttingDown),
        };
        pending.rx = None;
        outcome
    }

    /// `count` fresh fencing tokens, ascending, drawn on `hold`'s session,
    /// if it is still alive.
    pub async fn tokens(&self, hold: &SessionHold, count: u32) -> Result<Vec<u64>> {
        let (reply, rx) = oneshot::channel();
        let generation = hold.generation.number;
        self.send(
            hold.index,
            Cmd::Token {
                generation,
                count,
                reply,
            },
        );
        rx.await.map_err(|_| Error::ShuttingDown)?
    }

    /// The acquirer that tried `id` with interest stopped waiting.
    pub fn uninterest(&self, id: LockId) {
        self.send(self.index_of(id), Cmd::Uninterest { id });
    }

    /// Whether another replica waits for `id`, held on `hold`'s session.
    pub async fn wanted(&self, hold: &SessionHold, id: LockId) -> Result<bool> {
        let (reply, rx) = oneshot::channel();
        let generation = hold.generation.number;
        self.send(hold.index, Cmd::Wanted { id, generation, reply });
        rx.await.map_err(|_| Error::ShuttingDown)?
    }

    /// Whether `hold`'s session answers a statement now.
    pub async fn ping(&self, hold: &SessionHold) -> bool {
        let (reply, rx) = oneshot::channel();
        let generation = hold.generation.number;
        self.send(hold.index, Cmd::Ping { generation, reply });
        rx.await.unwrap_or(false)
    }
}

/// A try whose answer has not been read. Dropped unread (the acquirer gave
/// up), a grant already sitting in the channel is released; one that comes
/// later finds the channel closed and is released by the session.
struct PendingTry<'a> {
    rx: Option<oneshot::Receiver<Result<TryOutcome>>>,
    id: LockId,
    sessions: &'a Sessions,
}

impl Drop for PendingTry<'_> {
    fn drop(&mut self) {
        if let Some(mut rx) = self.rx.take() {
            rx.close();
            if let Ok(Ok(TryOutcome::Granted(hold, _))) = rx.try_recv() {
                self.sessions.release(self.id, hold, None);
            }
        }
    }
}

impl Release for Sessions {
    fn release(&self, id: LockId, hold: SessionHold, ack: Option<oneshot::Sender<()>>) {
        // A lost generation's connection is gone, and its locks with it:
        // nothing to send, and nothing to wait for behind a session task
        // that may be reconnecting for a while.
        if hold.generation.is_lost() {
            if let Some(ack) = ack {
                let _ = ack.send(());
            }
            return;
        }
        let generation = hold.generation.number;
        self.send(hold.index, Cmd::Unlock { id, generation, ack });
    }
}

/// A connected session.
struct Live {
    index: usize,
    conn: PgConnection,
    generation: Arc<Generation>,
    /// Locks held, with PostgreSQL's count of each (always 1 unless a try
    /// overtook the release of the same lock).
    held: HashMap<LockId, u32>,
    /// Granted to acquirers that had gone by the time the grant arrived.
    orphans: Vec<LockId>,
    /// Locks whose interest this session announces (held shared in
    /// PostgreSQL), for an acquirer of this replica that waits for them.
    interest: HashSet<LockId>,
    /// Interest to withdraw with the next statement (its acquirer was granted).
    withdrawn: Vec<LockId>,
    /// Holds its client locks shared.
    shared: bool,
}

struct Session {
    index: usize,
    options: PgConnectOptions,
    timing: Timing,
    rx: mpsc::UnboundedReceiver<Cmd>,
    live: Option<Live>,
    generations: u64,
    /// Shared by the sessions: held while a statement is in flight.
    turn: Arc<Semaphore>,
    /// What this task reports of its connection.
    state: Arc<SessionState>,
    /// Holds its client locks shared ([`LockId::Shared`]).
    shared: bool,
    /// The server's shutdown: each generation's `ended` is its child.
    stop: CancellationToken,
}

/// One statement's worth of commands, sorted.
#[derive(Default)]
struct Batch {
    unlock_client: Vec<i64>,
    unlock_a: Vec<i32>,
    unlock_b: Vec<i32>,
    unlocked: Vec<LockId>,
    acks: Vec<oneshot::Sender<()>>,
    tries: Vec<(LockId, u32, oneshot::Sender<Result<TryOutcome>>)>,
    tokens: Vec<(u32, oneshot::Sender<Result<Vec<u64>>>)>,
    pings: Vec<oneshot::Sender<bool>>,
    /// Interest to withdraw and to announce. The statement runs the two in
    /// no particular order, so one batch never has both for a lock unless
    /// the withdrawal came first (then either order leaves it held).
    interest_off: Vec<LockId>,
    interest_on: Vec<LockId>,
    /// Whether other replicas wait, by interest lock.
    wanted: Vec<((i32, i32), WantedReply)>,
}

/// The answer to [`Cmd::Wanted`].
type WantedReply = oneshot::Sender<Result<bool>>;

/// Why a statement failed.
enum Failure {
    /// The session is gone or its state unknown: its locks are lost.
    Lost(Error),
    /// PostgreSQL's lock table is full; the session is fine.
    Capacity,
}

impl Session {
    async fn run(mut self, mut shutdown: watch::Receiver<bool>) {
        loop {
            let holding = self.live.as_ref().is_some_and(|l| !l.held.is_empty());
            // Interest of an acquirer granted here is withdrawn at once, not
            // with whatever statement comes next (maybe none for a while).
            let withdrawing = self.live.as_ref().is_some_and(|l| !l.withdrawn.is_empty());
            let first = tokio::select! {
                biased;
                () = std::future::ready(()), if withdrawing => None,
                cmd = self.rx.recv() => match cmd {
                    Some(cmd) => Some(cmd),
                    None => break,
                },
                () = tokio::time::sleep(self.timing.heartbeat), if holding => None,
                _ = shutdown.wait_for(|stop| *stop) => break,
            };
            // Never closed, so an error cannot happen; and a turn not had in
            // time is simply not waited for.
            let turn = self.turn.clone();
            let _turn = tokio::time::timeout(TURN_WAIT, turn.acquire()).await;
            let mut cmds: Vec<Cmd> = first.into_iter().collect();
            while cmds.len() < MAX_BATCH {
                match self.rx.try_recv() {
                    Ok(cmd) => cmds.push(cmd),
                    Err(_) => break,
                }
            }
            self.serve(cmds).await;
            let (connected, holding) = match &self.live {
                Some(live) => (true, !live.held.is_empty() || !live.interest.is_empty()),
                None => (false, false),
            };
            self.state.connected.store(connected, Ordering::Relaxed);
            self.state.holding.store(holding, Ordering::Relaxed);
        }
        self.state.connected.store(false, Ordering::Relaxed);
        self.state.holding.store(false, Ordering::Relaxed);
        // Closing the connection releases every lock it holds.
        if let Some(live) = self.live.take() {
            live.generation.mark_lost();
            let _ = tokio::time::timeout(Duration::from_millis(500), live.conn.close()).await;
        }
    }

    async fn connect(&mut self) -> Result<()> {
        if self.live.is_some() {
            return Ok(());
        }
        let conn = tokio::time::timeout(self.timing.connect, PgConnection::connect_with(&self.options))
            .await
            .map_err(|_| gone())??;
        self.generations += 1;
        let generation = Generation::new(self.generations, self.timing.window, &self.stop);
        generation.proved_alive_at(Instant::now());
        tracing::debug!(
            session = self.index,
            generation = self.generations,
            "lock session connected"
        );
        self.live = Some(Live {
            index: self.index,
            conn,
            generation,
            held: HashMap::new(),
            orphans: Vec::new(),
            interest: HashSet::new(),
            withdrawn: Vec::new(),
            shared: self.shared,
        });
        Ok(())
    }

    fn lose(&mut self, why: &Error) {
        if let Some(live) = self.live.take() {
            if live.held.is_empty() {
                // PostgreSQL ends idle sessions (idle_session_timeout); one
                // that held nothing is simply replaced.
                tracing::debug!(session = self.index, error = %why, "idle lock session ended");
            } else {
                tracing::warn!(session = self.index, held = live.held.len(), error = %why, "lock session lost; its locks are lost");
            }
            live.generation.mark_lost();
            // Dropped, not closed: on a frozen link a polite close would hang.
            drop(live.conn);
        }
    }

    async fn serve(&mut self, cmds: Vec<Cmd>) {
        // Without a live connection every generation so far is gone: what
        // was addressed to one is answered now, not after a reconnect that
        // may hang as long as the connect timeout (a frozen link).
        let cmds = if self.live.is_none() { answer_stale(cmds) } else { cmds };
        if cmds.is_empty() && self.live.is_none() {
            return;
        }
        let fresh = self.live.is_none();
        if let Err(err) = self.connect().await {
            if !cmds.is_empty() {
                tracing::debug!(session = self.index, error = %err, "lock session cannot connect");
            }
            fail(cmds);
            return;
        }
        let Some(live) = self.live.as_mut() else {
            return fail(cmds);
        };
        let batch = sort(cmds, live);
        // A session that holds nothing loses nothing by breaking: a
        // connection PostgreSQL ended while idle is replaced and the
        // statement sent again, once.
        let may_retry = !fresh && live.held.is_empty() && batch.unlocked.is_empty();
        let mut retried = false;
        loop {
            let Some(live) = self.live.as_mut() else {
                return batch.fail();
            };
            match run_batch(live, &batch, self.timing).await {
                Ok(rows) => return finish(live, batch, rows),
                Err(Failure::Capacity) => {
                    let tried: Vec<LockId> = batch.tries.iter().map(|(id, _, _)| *id).collect();
                    let reconciled = reconcile(live, &tried, self.timing).await;
                    answer_capacity(live, batch);
                    if let Err(err) = reconciled {
                        self.lose(&err);
                    }
                    return;
                }
                Err(Failure::Lost(err)) => {
                    self.lose(&err);
                    if may_retry && !retried && self.connect().await.is_ok() {
                        retried = true;
                        continue;
                    }
                    return batch.fail();
                }
            }
        }
    }
}

/// Sorts commands into one statement's arrays. Commands for an earlier
/// generation are answered at once: what they refer to is gone.
fn sort(cmds: Vec<Cmd>, live: &mut Live) -> Batch {
    let current = live.generation.number;
    let mut batch = Batch::default();
    let orphans = std::mem::take(&mut live.orphans);
    batch.interest_off.append(&mut live.withdrawn);
    let unlocks = orphans
        .into_iter()
        .map(|id| Cmd::Unlock {
            id,
            generation: current,
            ack: None,
        })
        .chain(cmds);
    for cmd in unlocks {
        match cmd {
            Cmd::Unlock { id, generation, ack } => {
                if generation == current
                    && let Some(count) = live.held.get_mut(&id)
                {
                    *count = count.saturating_sub(1);
                    if *count == 0 {
                        live.held.remove(&id);
                    }
                    match id {
                        LockId::Client(k) | LockId::Shared(k) => batch.unlock_client.push(k),
                        LockId::Internal { space, object } => {
                            batch.unlock_a.push(space);
                            batch.unlock_b.push(object);
                        }
                    }
                    batch.unlocked.push(id);
                }
                batch.acks.extend(ack);
            }
            Cmd::Try {
                id,
                tokens,
                interest,
                reply,
            } => {
                if interest && live.interest.insert(id) {
                    batch.interest_on.push(id);
                }
                batch.tries.push((id, tokens, reply));
            }
            Cmd::Uninterest { id } => {
                if live.interest.remove(&id) {
                    match batch.interest_on.iter().position(|on| *on == id) {
                        Some(at) => {
                            batch.interest_on.swap_remove(at);
                        }
                        None => batch.interest_off.push(id),
                    }
                }
            }
            Cmd::Wanted { id, generation, reply } => {
                if generation == current {
                    batch.wanted.push((id.interest(), reply));
                } else {
                    let _ = reply.send(Err(gone()));
                }
            }
            Cmd::Token {
                generation,
                count,
                reply,
            } => {
                if generation == current {
                    batch.tokens.push((count.max(1), reply));
                } else {
                    let _ = reply.send(Err(gone()));
                }
            }
            Cmd::Ping { generation, reply } => {
                if generation == current {
                    batch.pings.push(reply);
                } else {
                    let _ = reply.send(false);
                }
            }
        }
    }
    batch
}

/// One row of [`BATCH_SQL`]'s answer: a granted lock, or the token total.
struct Granted {
    id: Option<LockId>,
    token: Option<i64>,
    /// An interest lock nobody else holds (`id` is its pair then).
    unwanted: bool,
}

async fn run_batch(live: &mut Live, batch: &Batch, timing: Timing) -> std::result::Result<Vec<Granted>, Failure> {
    let mut try_client = Vec::new();
    let mut try_token = Vec::new();
    let (mut try_a, mut try_b) = (Vec::new(), Vec::new());
    for (id, tokens, _) in &batch.tries {
        match *id {
            LockId::Client(k) | LockId::Shared(k) => {
                try_client.push(k);
                try_token.push(i32::try_from(*tokens).unwrap_or(i32::MAX));
            }
            LockId::Internal { space, object } => {
                try_a.push(space);
                try_b.push(object);
            }
        }
    }
    let extra: i64 = batch.tokens.iter().map(|(count, _)| i64::from(*count)).sum();
    let (wanted_a, wanted_b): (Vec<i32>, Vec<i32>) = batch.wanted.iter().map(|(pair, _)| *pair).unzip();
    let (off_a, off_b): (Vec<i32>, Vec<i32>) = batch.interest_off.iter().map(|id| id.interest()).unzip();
    let (on_a, on_b): (Vec<i32>, Vec<i32>) = batch.interest_on.iter().map(|id| id.interest()).unzip();
    // Bounded by the validity of what the session holds; a session holding
    // nothing has a whole window.
    let sent = Instant::now();
    let deadline = if live.held.is_empty() {
        sent + timing.window
    } else {
        live.generation.valid_until()
    };
    let sql: &str = if live.shared { &SHARED_BATCH_SQL } else { BATCH_SQL };
    let query = sqlx::query(sql)
        .bind(&batch.unlock_client)
        .bind(&batch.unlock_a)
        .bind(&batch.unlock_b)
        .bind(&try_client)
        .bind(&try_token)
        .bind(&try_a)
        .bind(&try_b)
        .bind(extra)
        .bind(&off_a)
        .bind(&off_b)
        .bind(&on_a)
        .bind(&on_b)
        .bind(&wanted_a)
        .bind(&wanted_b);
    let rows = match tokio::time::timeout_at(deadline.into(), query.fetch_all(&mut live.conn)).await {
        Err(_) => return Err(Failure::Lost(gone())),
        Ok(Err(err)) if sqlstate(&err).as_deref() == Some(OUT_OF_SHARED_MEMORY) => return Err(Failure::Capacity),
        Ok(Err(err)) if is_connection_lost(&err) => return Err(Failure::Lost(err.into())),
        Ok(Err(err)) => {
            tracing::error!(error = %err, "lock statement failed");
            return Err(Failure::Lost(gone()));
        }
        Ok(Ok(rows)) => rows,
    };
    live.generation.proved_alive_at(sent);
    let shared = live.shared;
    let mut out = Vec::with_capacity(rows.len());
    for row in rows {
        let decoded = (|| -> std::result::Result<Granted, sqlx::Error> {
            let k: Option<i64> = row.try_get("k")?;
            let a: Option<i32> = row.try_get("a")?;
            let b: Option<i32> = row.try_get("b")?;
            let id = match (k, a, b) {
                (Some(k), _, _) if shared => Some(LockId::Shared(k)),
                (Some(k), _, _) => Some(LockId::Client(k)),
                (None, Some(space), Some(object)) => Some(LockId::Internal { space, object }),
                _ => None,
            };
            Ok(Granted {
                id,
                token: row.try_get("token")?,
                unwanted: row.try_get::<Option<bool>, _>("unwanted")?.unwrap_or(false),
            })
        })();
        match decoded {
            Ok(granted) => out.push(granted),
            Err(err) => {
                tracing::error!(error = %err, "lock statement answered an unexpected row");
                return Err(Failure::Lost(gone()));
            }
        }
    }
    Ok(out)
}

/// Answers a batch that ran.
fn finish(live: &mut Live, batch: Batch, rows: Vec<Granted>) {
    let mut granted: HashMap<LockId, ()> = HashMap::new();
    let mut unwanted: HashSet<(i32, i32)> = HashSet::new();
    let mut drawn = Vec::new();
    for row in rows {
        match (row.id, row.token) {
            (Some(LockId::Internal { space, object }), _) if row.unwanted => {
                unwanted.insert((space, object));
            }
            (Some(id), _) => {
                granted.insert(id, ());
            }
            (None, Some(token)) => drawn.extend(u64::try_from(token).ok()),
            (None, None) => {}
        }
    }
    // Handed out smallest first, so each acquirer's tokens ascend.
    drawn.sort_unstable();
    let mut drawn = drawn.into_iter();
    let mut draw = |count: u32| -> Option<Vec<u64>> {
        let tokens: Vec<u64> = drawn.by_ref().take(usize::try_from(count).unwrap_or(0)).collect();
        (tokens.len() == usize::try_from(count).unwrap_or(usize::MAX)).then_some(tokens)
    };
    let hold = SessionHold {
        index: live.index,
        generation: live.generation.clone(),
    };
    for (id, tokens, reply) in batch.tries {
        let outcome = if granted.contains_key(&id) {
            *live.held.entry(id).or_insert(0) += 1;
            if live.interest.remove(&id) {
                live.withdrawn.push(id);
            }
            match draw(tokens) {
                Some(drawn) => Ok(TryOutcome::Granted(hold.clone(), drawn)),
                None => {
                    // Taken but not handed out: nobody owns it.
                    live.orphans.push(id);
                    Err(Error::Invariant(
                        "a batch draws every fencing token its tries asked for",
                    ))
                }
            }
        } else {
            Ok(TryOutcome::Busy)
        };
        if let Err(Ok(TryOutcome::Granted(..))) = reply.send(outcome) {
            // The acquirer gave up while its try was in flight: nobody owns
            // the lock, so it is released with the next statement.
            live.orphans.push(id);
        }
    }
    for (count, reply) in batch.tokens {
        let _ = reply.send(draw(count).ok_or(Error::Invariant(
            "a batch draws every fencing token its tries asked for",
        )));
    }
    for reply in batch.pings {
        let _ = reply.send(true);
    }
    for (pair, reply) in batch.wanted {
        let _ = reply.send(Ok(!unwanted.contains(&pair)));
    }
    for ack in batch.acks {
        let _ = ack.send(());
    }
}

/// Releases each given lock as often as this session holds it: a
/// session-level advisory lock is re-entrant, and `pg_locks` shows one row
/// whatever the count. Returns how many releases succeeded.
const UNLOCK_ALL_SQL: &str = "\
SELECT (SELECT count(*) FROM unnest($1::int8[]) AS u(k) WHERE pg_advisory_unlock(u.k))
     + (SELECT count(*) FROM unnest($2::int4[], $3::int4[]) AS u(a, b) WHERE pg_advisory_unlock(u.a, u.b))";

/// After `out of shared memory`: the failed batch may have taken some of
/// its locks before the error (session locks outlive the statement). Every
/// lock PostgreSQL says this session holds, and every lock the batch tried,
/// that nobody here owns is released, as many times as it was taken. (A
/// tried lock is never owned here too: the table sends a lock's release
/// before any later try of it, and a batch runs its releases first.)
async fn reconcile(live: &mut Live, tried: &[LockId], timing: Timing) -> Result<()> {
    let deadline = Instant::now() + timing.window.min(Duration::from_secs(5));
    let rows = tokio::time::timeout_at(deadline.into(), sqlx::query(HELD_SQL).fetch_all(&mut live.conn))
        .await
        .map_err(|_| gone())??;
    let mut stray: Vec<LockId> = tried.to_vec();
    for row in rows {
        let sub: i32 = row.try_get("sub")?;
        let hi: i64 = row.try_get("hi")?;
        let lo: i64 = row.try_get("lo")?;
        stray.push(if sub == 2 {
            LockId::Internal {
                space: u32::try_from(hi).unwrap_or(0).cast_signed(),
                object: u32::try_from(lo).unwrap_or(0).cast_signed(),
            }
        } else {
            let hi = u64::try_from(hi).unwrap_or(0);
            let lo = u64::try_from(lo).unwrap_or(0);
            let k = (hi << 32 | lo).cast_signed();
            if live.shared {
                LockId::Shared(k)
            } else {
                LockId::Client(k)
            }
        });
    }
    // Interest locks are shared locks this session keeps on purpose.
    stray.retain(|id| {
        !live.held.contains_key(id)
            && !matches!(id, LockId::Internal { space, .. } if *space == super::id::INTEREST_SPACE)
    });
    stray.sort_unstable_by_key(|id| match *id {
        LockId::Client(k) | LockId::Shared(k) => (0, k),
        LockId::Internal { space, object } => (1, i64::from(space) << 32 | i64::from(object)),
    });
    stray.dedup();
    let (mut client, mut a, mut b) = (Vec::new(), Vec::new(), Vec::new());
    for id in &stray {
        match *id {
            LockId::Client(k) | LockId::Shared(k) => client.push(k),
            LockId::Internal { space, object } => {
                a.push(space);
                b.push(object);
            }
        }
    }
    // Each round releases each lock once more; a lock is taken at most a
    // few times over (one try per batch), so this ends quickly.
    for _ in 0..16 {
        if client.is_empty() && a.is_empty() {
            break;
        }
        let released: i64 = tokio::time::timeout_at(
            deadline.into(),
            sqlx::query_scalar(if live.shared {
                &SHARED_UNLOCK_ALL_SQL
            } else {
                UNLOCK_ALL_SQL
            })
            .bind(&client)
            .bind(&a)
            .bind(&b)
            .fetch_one(&mut live.conn),
        )
        .await
        .map_err(|_| gone())??;
        if released == 0 {
            break;
        }
        tracing::warn!(
            released,
            "released locks a failed batch took before PostgreSQL's lock table filled up"
        );
    }
    Ok(())
}

/// Answers a batch whose statement ran out of shared lock memory.
fn answer_capacity(live: &Live, batch: Batch) {
    for (_, _, reply) in batch.tries {
        let _ = reply.send(Err(Error::LockCapacityExhausted));
    }
    for (_, reply) in batch.tokens {
        let _ = reply.send(Err(Error::LockCapacityExhausted));
    }
    let alive = !live.generation.is_lost();
    for reply in batch.pings {
        let _ = reply.send(alive);
    }
    // Unknown: let the lock go, as before interest was asked about.
    for (_, reply) in batch.wanted {
        let _ = reply.send(Ok(true));
    }
    for ack in batch.acks {
        let _ = ack.send(());
    }
}

impl Batch {
    /// Answers every command of a batch whose session failed.
    fn fail(self) {
        for (_, _, reply) in self.tries {
            let _ = reply.send(Err(gone()));
        }
        for (_, reply) in self.tokens {
            let _ = reply.send(Err(gone()));
        }
        for reply in self.pings {
            let _ = reply.send(false);
        }
        for (_, reply) in self.wanted {
            let _ = reply.send(Err(gone()));
        }
        // The session is closed, which released everything.
        for ack in self.acks {
            let _ = ack.send(());
        }
    }
}

/// Answers the commands addressed to a generation that is gone (releases
/// are done: the connection closed; tokens and pings fail) and returns the rest.
fn answer_stale(cmds: Vec<Cmd>) -> Vec<Cmd> {
    let mut rest = Vec::with_capacity(cmds.len());
    for cmd in cmds {
        match cmd {
            Cmd::Unlock { ack, .. } => {
                if let Some(ack) = ack {
                    let _ = ack.send(());
                }
            }
            Cmd::Token { reply, .. } => {
                let _ = reply.send(Err(gone()));
            }
            Cmd::Ping { reply, .. } => {
                let _ = reply.send(false);
            }
            Cmd::Wanted { reply, .. } => {
                let _ = reply.send(Err(gone()));
            }
            // The interest went with the connection.
            Cmd::Uninterest { .. } => {}
            cmd @ Cmd::Try { .. } => rest.push(cmd),
        }
    }
    rest
}

/// Answers commands that never reached a session.
fn fail(cmds: Vec<Cmd>) {
    for cmd in cmds {
        match cmd {
            Cmd::Try { reply, .. } => {
                let _ = reply.send(Err(gone()));
            }
            Cmd::Token { reply, .. } => {
                let _ = reply.send(Err(gone()));
            }
            Cmd::Unlock { ack, .. } => {
                if let Some(ack) = ack {
                    let _ = ack.send(());
                }
            }
            Cmd::Ping { reply, .. } => {
                let _ = reply.send(false);
            }
            Cmd::Wanted { reply, .. } => {
                let _ = reply.send(Err(gone()));
            }
            Cmd::Uninterest { .. } => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_shared_session_takes_and_releases_client_locks_shared_and_nothing_else() {
        let shared: &str = &SHARED_BATCH_SQL;
        assert_eq!(shared.matches("pg_advisory_unlock_shared(u.k)").count(), 1);
        assert_eq!(shared.matches("pg_try_advisory_lock_shared(t.k)").count(), 1);
        assert!(!shared.contains("pg_advisory_unlock(u.k)"));
        assert!(!shared.contains("pg_try_advisory_lock(t.k)"));
        // The interest check stays a momentary exclusive try.
        assert!(shared.contains("pg_try_advisory_lock(t.a, t.b) THEN pg_advisory_unlock(t.a, t.b)"));
        let unlock_all: &str = &SHARED_UNLOCK_ALL_SQL;
        assert!(unlock_all.contains("pg_advisory_unlock_shared(u.k)"));
        assert!(!unlock_all.contains("pg_advisory_unlock(u.k)"));
    }
}
