//! The PostgreSQL store: every statement vitals runs on the work pool.
//!
//! Methods that change a system's health expect the caller to hold that
//! system's lock (see [`crate::lock::Locks::with_system_lock`]); they then lock the
//! system's row and read the previous status under both locks, which is what
//! makes each transition appear exactly once however many replicas evaluate
//! the same system (the row lock covers the moments the advisory lock does
//! not, see [`lock_system`]).

use std::{
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use chrono::{DateTime, Utc};
use sqlx::{PgConnection, Row, postgres::PgRow};

use super::{
    CheckRecord, CheckUpdate, ConfigureOutcome, NewRun, Run, RunCursor, SubmitOutcome, SystemRecord, Transition,
    codec::{decode_evaluation, decode_thresholds, encode_evaluation, encode_thresholds},
    retention::{CheckCandidate, RUNS_KEPT, SystemCandidate},
};
use crate::{
    db::WorkPool,
    domain::{CheckId, MAX_RUNS_CONSIDERED, RunId, Status, SystemId, Thresholds, evaluate},
    error::{Corrupt, Error, Result},
};

pub mod sql;

pub use sql::TRANSITIONS_CHANNEL;
use sql::{CHECK_COLUMNS, TRANSITION_COLUMNS};

// The transition-sequence lock ([`crate::lock::id::TRANSITION_SEQUENCE`])
// serialises the assignment of transition sequences, so that sequences commit
// in order. A transaction-level lock on the work connection, held only for
// the tail of a transaction that already changed a status, which is rare.

/// The PostgreSQL implementation of the store.
#[derive(Debug, Clone)]
pub struct PgStore {
    work: WorkPool,
    /// Reads by [`PgStore::transitions_after`], shared by clones.
    transition_reads: Arc<AtomicU64>,
}

fn status_of(raw: i16) -> Result<Status> {
    Status::from_i16(raw).ok_or(Error::Corrupt(Corrupt::Status(i64::from(raw))))
}

fn u32_of(raw: i32) -> u32 {
    u32::try_from(raw).unwrap_or(0)
}

fn run_from_row(row: &PgRow) -> Result<Run> {
    let latency_us: Option<i64> = row.try_get("latency_us")?;
    Ok(Run {
        run_id: row.try_get("run_id")?,
        system_id: row.try_get("system_id")?,
        check_id: row.try_get("check_id")?,
        status: status_of(row.try_get("status")?)?,
        observed_at: row.try_get("observed_at")?,
        latency: latency_us
            .and_then(|us| u64::try_from(us).ok())
            .map(Duration::from_micros),
        message: row.try_get("message")?,
        recorded_at: row.try_get("recorded_at")?,
    })
}

fn check_from_row(row: &PgRow) -> Result<CheckRecord> {
    let thresholds_text: String = row.try_get("thresholds")?;
    let thresholds = decode_thresholds(&thresholds_text).ok_or_else(|| Corrupt::Thresholds(thresholds_text.clone()))?;
    let evaluation_text: String = row.try_get("evaluation")?;
    // A check created by ConfigureCheck before any run has no stored
    // evaluation yet; evaluating no runs is cheap and exact.
    let evaluation = decode_evaluation(&evaluation_text).unwrap_or_else(|| evaluate(&[], &thresholds));
    Ok(CheckRecord {
        check_id: row.try_get("check_id")?,
        thresholds,
        enabled: row.try_get("enabled")?,
        evaluation,
        runs_considered: u32_of(row.try_get("runs_considered")?),
        last_run_at: row.try_get("last_run_at")?,
    })
}

fn transition_from_row(row: &PgRow) -> Result<Transition> {
    let evaluation_text: String = row.try_get("evaluation")?;
    let sequence: i64 = row.try_get("sequence")?;
    Ok(Transition {
        sequence: u64::try_from(sequence).unwrap_or(0),
        system_id: row.try_get("system_id")?,
        check_id: row.try_get("check_id")?,
        from: status_of(row.try_get("from_status")?)?,
        to: status_of(row.try_get("to_status")?)?,
        transitioned_at: row.try_get("transitioned_at")?,
        evaluation: decode_evaluation(&evaluation_text).ok_or_else(|| Corrupt::Evaluation(evaluation_text.clone()))?,
    })
}

const RUN_COLUMNS: &str = "run_id, system_id, check_id, status, observed_at, latency_us, message, recorded_at";

impl PgStore {
    /// A store on the work pool.
    pub fn new(work: WorkPool) -> Self {
        PgStore {
            work,
            transition_reads: Arc::new(AtomicU64::new(0)),
        }
    }

    /// Reads by [`PgStore::transitions_after`] since the store was created.
    pub fn transition_reads(&self) -> u64 {
        self.transition_reads.load(Ordering::Relaxed)
    }

    /// Records a run and re-evaluates its check and system. The caller holds
    /// the system's lock.
    ///
    /// A connection found lost before COMMIT was sent (its backend died while
    /// it was idle in the pool) committed nothing, so the whole transaction
    /// is run once more on a connection the pool checks first; SubmitRun is
    /// idempotent by run id in any case.
    pub async fn submit_run(&self, new: &NewRun) -> Result<SubmitOutcome> {
        let mut committing = false;
        match self.submit_run_once(new, &mut committing).await {
            Err(err) if !committing && self.work.health().check(&err) => {
                tracing::debug!(error = %err, "work connection found broken; retrying SubmitRun on another");
                self.submit_run_once(new, &mut committing).await
            }
            outcome => outcome,
        }
    }

    async fn submit_run_once(&self, new: &NewRun, committing: &mut bool) -> Result<SubmitOutcome> {
        let mut conn = self.work.acquire().await?;
        let mut tx = sqlx::Connection::begin(&mut *conn).await?;

        // The run insert and the system's row lock in one statement: the
        // insert needs nothing the lock protects, and every statement after
        // this one sees what the previous holder of the row committed.
        let row = sqlx::query(sql::INSERT_RUN)
            .bind(new.run_id.as_str())
            .bind(new.system_id.as_str())
            .bind(new.check_id.as_str())
            .bind(new.status.as_i16())
            .bind(new.observed_at)
            .bind(new.latency_us())
            .bind(new.message.as_str())
            .fetch_one(&mut *tx)
            .await?;
        let recorded_at: Option<DateTime<Utc>> = row.try_get("recorded_at")?;

        let Some(recorded_at) = recorded_at else {
            let row = sqlx::query(&format!("SELECT {RUN_COLUMNS} FROM runs WHERE run_id = $1"))
                .bind(new.run_id.as_str())
                .fetch_one(&mut *tx)
                .await?;
            let stored = run_from_row(&row)?;
            let health = system_in(&mut tx, stored.system_id.as_str()).await?;
            let transition = transition_caused_by(&mut tx, &stored).await?;
            tx.rollback().await?;
            return new.resubmitted(stored, health, transition);
        };
        let run = new.recorded(recorded_at);

        let previous = match row.try_get::<Option<i16>, _>("previous")? {
            Some(raw) => status_of(raw)?,
            // A new system: its row is created (and locked) here.
            None => create_system(&mut tx, new.system_id.as_str()).await?,
        };

        let (health, transition) =
            reevaluate(&mut tx, &new.system_id, &new.check_id, previous, Some(&new.run_id)).await?;
        *committing = true;
        tx.commit().await?;
        Ok(SubmitOutcome {
            run,
            health,
            transition,
            duplicate: false,
        })
    }

    /// Creates or updates a check and re-evaluates its system. The caller
    /// holds the system's lock.
    pub async fn configure_check(&self, update: &CheckUpdate) -> Result<ConfigureOutcome> {
        let mut conn = self.work.acquire().await?;
        let mut tx = sqlx::Connection::begin(&mut *conn).await?;
        let previous = lock_system(&mut tx, update.system_id.as_str()).await?;
        sqlx::query(
            "INSERT INTO checks (system_id, check_id, thresholds, enabled) \
             VALUES ($1, $2, coalesce($3, $4), coalesce($5, true)) \
             ON CONFLICT (system_id, check_id) DO UPDATE SET \
                 thresholds = coalesce($3, checks.thresholds), \
                 enabled = coalesce($5, checks.enabled), \
                 updated_at = now() \
",
        )
        .bind(update.system_id.as_str())
        .bind(update.check_id.as_str())
        .bind(update.thresholds.as_ref().map(encode_thresholds))
        .bind(encode_thresholds(&Thresholds::default()))
        .bind(update.enabled)
        .execute(&mut *tx)
        .await?;
        let (health, transition) = reevaluate(&mut tx, &update.system_id, &update.check_id, previous, None).await?;
        tx.commit().await?;
        let check = health
            .checks
            .iter()
            .find(|c| c.check_id == update.check_id.as_str())
            .cloned()
            .ok_or(Error::Invariant("a configured check is in its system's health"))?;
        Ok(ConfigureOutcome {
            check,
            health,
            transition,
        })
    }

    /// The stored health of a system, or `None` if it has never been seen.
    pub async fn system(&self, system_id: &SystemId) -> Result<Option<SystemRecord>> {
        let mut conn = self.work.acquire().await?;
        system_in(&mut conn, system_id.as_str()).await
    }

    /// One page of a system's runs, newest first, after `cursor`.
    pub async fn list_runs(
        &self,
        system_id: &SystemId,
        check_id: Option<&CheckId>,
        after: Option<&RunCursor>,
        limit: u32,
    ) -> Result<Vec<Run>> {
        let mut conn = self.work.acquire().await?;
        let rows = sqlx::query(&format!(
            "SELECT {RUN_COLUMNS} FROM runs \
             WHERE system_id = $1 AND ($2::text IS NULL OR check_id = $2) \
               AND ($3::timestamptz IS NULL OR (observed_at, run_id) < ($3, $4)) \
             ORDER BY observed_at DESC, run_id DESC LIMIT $5"
        ))
        .bind(system_id.as_str())
        .bind(check_id.map(CheckId::as_str))
        .bind(after.map(|c| c.observed_at))
        .bind(after.map(|c| c.run_id.as_str()))
        .bind(i64::from(limit))
        .fetch_all(&mut *conn)
        .await?;
        rows.iter().map(run_from_row).collect()
    }

    /// One page of transitions, highest sequence first, below `before`.
    pub async fn list_transitions(
        &self,
        system_id: Option<&SystemId>,
        before: Option<u64>,
        limit: u32,
    ) -> Result<Vec<Transition>> {
        let mut conn = self.work.acquire().await?;
        let rows = sqlx::query(&format!(
            "SELECT {TRANSITION_COLUMNS} FROM transitions \
             WHERE ($1::text IS NULL OR system_id = $1) AND ($2::bigint IS NULL OR sequence < $2) \
             ORDER BY sequence DESC LIMIT $3"
        ))
        .bind(system_id.map(SystemId::as_str))
        .bind(before.map(|s| i64::try_from(s).unwrap_or(i64::MAX)))
        .bind(i64::from(limit))
        .fetch_all(&mut *conn)
        .await?;
        rows.iter().map(transition_from_row).collect()
    }

    /// Transitions with a sequence above `after`, in sequence order.
    pub async fn transitions_after(
        &self,
        system_id: Option<&SystemId>,
        after: u64,
        limit: u32,
    ) -> Result<Vec<Transition>> {
        self.transition_reads.fetch_add(1, Ordering::Relaxed);
        let mut conn = self.work.acquire().await?;
        let rows = sqlx::query(sql::TRANSITIONS_AFTER)
            .bind(system_id.map(SystemId::as_str))
            .bind(i64::try_from(after).unwrap_or(i64::MAX))
            .bind(i64::from(limit))
            .fetch_all(&mut *conn)
            .await?;
        rows.iter().map(transition_from_row).collect()
    }

    /// A page of at most `limit` checks after `after` in key order, each
    /// marked when it has runs observed before `runs_before` that are not
    /// among its newest (see [`super::retention`]).
    pub(crate) async fn retention_checks(
        &self,
        after: &(String, String),
        limit: u32,
        runs_before: DateTime<Utc>,
    ) -> Result<Vec<CheckCandidate>> {
        let mut conn = self.work.acquire().await?;
        let rows = sqlx::query(
            "SELECT p.system_id, p.check_id, \
                    CASE WHEN p.oldest < $3 THEN ( \
                        SELECT 1 FROM runs k WHERE k.system_id = p.system_id AND k.check_id = p.check_id \
                        LIMIT 1 OFFSET $4) IS NOT NULL \
                    ELSE false END AS prunable \
             FROM (SELECT c.system_id, c.check_id, \
                          (SELECT min(o.observed_at) FROM runs o \
                           WHERE o.system_id = c.system_id AND o.check_id = c.check_id) AS oldest \
                   FROM checks c WHERE (c.system_id, c.check_id) > ($1, $2) \
                   ORDER BY c.system_id, c.check_id LIMIT $5) p \
             ORDER BY p.system_id, p.check_id",
        )
        .bind(after.0.as_str())
        .bind(after.1.as_str())
        .bind(runs_before)
        .bind(RUNS_KEPT)
        .bind(i64::from(limit))
        .fetch_all(&mut *conn)
        .await?;
        rows.iter()
            .map(|row| {
                Ok(CheckCandidate {
                    system_id: row.try_get("system_id")?,
                    check_id: row.try_get("check_id")?,
                    prunable: row.try_get("prunable")?,
                })
            })
            .collect()
    }

    /// Deletes at most `batch` of the check's runs observed before
    /// `runs_before` and not among its newest, oldest first, through the
    /// check's index. Returns how many went and how long the statement took.
    pub(crate) async fn delete_old_runs(
        &self,
        system_id: &str,
        check_id: &str,
        runs_before: DateTime<Utc>,
        batch: u32,
    ) -> Result<(u64, Duration)> {
        let mut conn = self.work.acquire().await?;
        let started = std::time::Instant::now();
        let deleted = sqlx::query(
            "DELETE FROM runs WHERE run_id IN ( \
                 SELECT r.run_id FROM runs r \
                 WHERE r.system_id = $1 AND r.check_id = $2 AND r.observed_at < $3 \
                   AND (r.observed_at, r.run_id) < ( \
                       SELECT k.observed_at, k.run_id FROM runs k WHERE k.system_id = $1 AND k.check_id = $2 \
                       ORDER BY k.observed_at DESC, k.run_id DESC LIMIT 1 OFFSET $4 - 1) \
                 ORDER BY r.observed_at, r.run_id LIMIT $5)",
        )
        .bind(system_id)
        .bind(check_id)
        .bind(runs_before)
        .bind(RUNS_KEPT)
        .bind(i64::from(batch))
        .execute(&mut *conn)
        .await?
        .rows_affected();
        Ok((deleted, started.elapsed()))
    }

    /// A page of at most `limit` systems after `after` in key order, each with
    /// its newest transition's sequence when its oldest transition was
    /// recorded before `transitions_before` and is not that newest one.
    pub(crate) async fn retention_systems(
        &self,
        after: &str,
        limit: u32,
        transitions_before: DateTime<Utc>,
    ) -> Result<Vec<SystemCandidate>> {
        let mut conn = self.work.acquire().await?;
        let rows = sqlx::query(
            "SELECT p.system_id, \
                    CASE WHEN p.oldest < p.newest AND \
                              (SELECT t.transitioned_at FROM transitions t WHERE t.sequence = p.oldest) < $2 \
                         THEN p.newest END AS prunable_below \
             FROM (SELECT s.system_id, \
                          (SELECT min(t.sequence) FROM transitions t WHERE t.system_id = s.system_id) AS oldest, \
                          (SELECT max(t.sequence) FROM transitions t WHERE t.system_id = s.system_id) AS newest \
                   FROM systems s WHERE s.system_id > $1 ORDER BY s.system_id LIMIT $3) p \
             ORDER BY p.system_id",
        )
        .bind(after)
        .bind(transitions_before)
        .bind(i64::from(limit))
        .fetch_all(&mut *conn)
        .await?;
        rows.iter()
            .map(|row| {
                Ok(SystemCandidate {
                    system_id: row.try_get("system_id")?,
                    prunable_below: row.try_get("prunable_below")?,
                })
            })
            .collect()
    }

    /// Looks at the system's `batch` oldest transitions below sequence
    /// `below` and deletes those recorded before `transitions_before`.
    /// Sequences follow commit order, so these are the old ones; a batch that
    /// meets a younger one stops there. Returns how many went and how long the
    /// statement took.
    pub(crate) async fn delete_old_transitions(
        &self,
        system_id: &str,
        below: i64,
        transitions_before: DateTime<Utc>,
        batch: u32,
    ) -> Result<(u64, Duration)> {
        let mut conn = self.work.acquire().await?;
        let started = std::time::Instant::now();
        let deleted = sqlx::query(
            "DELETE FROM transitions WHERE sequence IN ( \
                 SELECT f.sequence FROM ( \
                     SELECT t.sequence, t.transitioned_at FROM transitions t \
                     WHERE t.system_id = $1 AND t.sequence < $2 ORDER BY t.sequence LIMIT $4) f \
                 WHERE f.transitioned_at < $3)",
        )
        .bind(system_id)
        .bind(below)
        .bind(transitions_before)
        .bind(i64::from(batch))
        .execute(&mut *conn)
        .await?
        .rows_affected();
        Ok((deleted, started.elapsed()))
    }
}

/// Reads a system and its checks on `conn`.
async fn system_in(conn: &mut PgConnection, system_id: &str) -> Result<Option<SystemRecord>> {
    let system = sqlx::query("SELECT status, evaluated_at FROM systems WHERE system_id = $1")
        .bind(system_id)
        .fetch_optional(&mut *conn)
        .await?;
    let Some(system) = system else { return Ok(None) };
    let checks = sqlx::query(&format!(
        "SELECT {CHECK_COLUMNS} FROM checks WHERE system_id = $1 ORDER BY check_id"
    ))
    .bind(system_id)
    .fetch_all(&mut *conn)
    .await?;
    Ok(Some(SystemRecord {
        system_id: system_id.to_owned(),
        status: status_of(system.try_get("status")?)?,
        checks: checks.iter().map(check_from_row).collect::<Result<_>>()?,
        evaluated_at: system.try_get::<Option<DateTime<Utc>>, _>("evaluated_at")?,
    }))
}

/// The transition `run` caused, if it caused one and it is still kept.
/// A transition written with the run has the run's `recorded_at` (both are
/// the transaction's `now()`); an older one under the same id belongs to a
/// run that retention deleted before the id was used again.
async fn transition_caused_by(conn: &mut PgConnection, run: &Run) -> Result<Option<Transition>> {
    let row = sqlx::query(&format!(
        "SELECT {TRANSITION_COLUMNS} FROM transitions WHERE run_id = $1 AND transitioned_at >= $2 \
         ORDER BY sequence DESC LIMIT 1"
    ))
    .bind(run.run_id.as_str())
    .bind(run.recorded_at)
    .fetch_optional(&mut *conn)
    .await?;
    row.as_ref().map(transition_from_row).transpose()
}

/// Locks the system's row until the end of the transaction and returns its
/// status: the status the next transition starts from. A new system gets its
/// row here, with the baseline `healthy`.
///
/// The system's lock already serialises writers; this row
/// lock makes that serialisation hold even when the system's lock is released
/// before this transaction has finished committing (a request cancelled during
/// its COMMIT releases the system's lock while the server completes the
/// commit). A writer that gets the system's lock then
/// waits here for the commit, and every statement after this one sees it.
/// Callers take it before any other lock of the system's rows. SubmitRun
/// takes the same row lock inside its run insert (one round trip fewer) and
/// calls [`create_system`] itself when the row does not exist yet.
async fn lock_system(tx: &mut PgConnection, system_id: &str) -> Result<Status> {
    let locked = sqlx::query("SELECT status FROM systems WHERE system_id = $1 FOR UPDATE")
        .bind(system_id)
        .fetch_optional(&mut *tx)
        .await?;
    match locked {
        Some(row) => status_of(row.try_get("status")?),
        None => create_system(tx, system_id).await,
    }
}

/// The second half of [`lock_system`] for a system without a row: creates it
/// with the baseline `healthy` and locks it. ON CONFLICT DO UPDATE locks a row
/// another writer created meanwhile and returns its newest version.
async fn create_system(tx: &mut PgConnection, system_id: &str) -> Result<Status> {
    let row = sqlx::query(
        "INSERT INTO systems (system_id, status, evaluated_at) VALUES ($1, $2, now()) \
         ON CONFLICT (system_id) DO UPDATE SET status = systems.status RETURNING status",
    )
    .bind(system_id)
    .bind(Status::Healthy.as_i16())
    .fetch_one(&mut *tx)
    .await?;
    status_of(row.try_get("status")?)
}

/// Re-evaluates one check from its newest runs, then its system; writes the
/// transition when the system's status changed from `previous`. Runs inside
/// the caller's transaction, under the system's lock and after
/// [`lock_system`], which read `previous` (so every statement here sees what
/// the previous writer committed). Creates the check, with default
/// thresholds, if it does not exist yet. `caused_by` is the run being
/// submitted (none for a configuration change); the transition records it,
/// so that a duplicate of the run can report it.
///
/// Two statements, three with a transition: one reads the system's checks
/// and the check's newest runs, one writes the check and the system (and
/// takes the transition-sequence lock when the status changed), one inserts
/// the transition. The reply's health is built from what they read and wrote
/// instead of read back.
async fn reevaluate(
    tx: &mut PgConnection,
    system_id: &SystemId,
    check_id: &CheckId,
    previous: Status,
    caused_by: Option<&RunId>,
) -> Result<(SystemRecord, Option<Transition>)> {
    // Ordered by observed_at, so a late run slots into its place in history.
    // The created check is not visible to the same statement's scan of
    // `checks`, so it comes from RETURNING.
    let rows = sqlx::query(sql::REEVALUATE_READ)
        .bind(system_id.as_str())
        .bind(check_id.as_str())
        .bind(encode_thresholds(&Thresholds::default()))
        .bind(i64::try_from(MAX_RUNS_CONSIDERED).unwrap_or(100))
        .fetch_all(&mut *tx)
        .await?;

    let mut checks = Vec::with_capacity(rows.len());
    let mut target = None;
    let mut others: Option<Status> = None;
    for row in &rows {
        let check = check_from_row(row)?;
        if row.try_get::<bool, _>("target")? {
            let statuses = row
                .try_get::<Option<Vec<i16>>, _>("recent_statuses")?
                .unwrap_or_default()
                .into_iter()
                .map(status_of)
                .collect::<Result<Vec<_>>>()?;
            let last_run_at: Option<DateTime<Utc>> = row.try_get("recent_last")?;
            target = Some((checks.len(), statuses, last_run_at));
        } else if check.enabled {
            let status: Status = status_of(row.try_get("status")?)?;
            others = Some(others.map_or(status, |o| o.max(status)));
        }
        checks.push(check);
    }
    let (index, statuses, last_run_at) =
        target.ok_or(Error::Invariant("the re-evaluated check is among its system's checks"))?;
    let check = &mut checks[index];
    let evaluation = evaluate(&statuses, &check.thresholds);
    let mut current = others.unwrap_or(Status::Healthy);
    if check.enabled {
        current = current.max(evaluation.status);
    }
    let runs_considered = u32::try_from(statuses.len()).unwrap_or(u32::MAX);
    check.evaluation = evaluation;
    check.runs_considered = runs_considered;
    check.last_run_at = last_run_at;

    let from = previous;
    let changed = from != current;
    // The transition-sequence lock, when the status changed, is taken here
    // so that the transition insert (the next statement) reads the highest
    // sequence after the lock was granted.
    let row = sqlx::query(sql::REEVALUATE_WRITE)
        .bind(system_id.as_str())
        .bind(check_id.as_str())
        .bind(evaluation.status.as_i16())
        .bind(encode_evaluation(&evaluation))
        .bind(i32::try_from(statuses.len()).unwrap_or(i32::MAX))
        .bind(last_run_at)
        .bind(current.as_i16())
        .bind(crate::lock::id::INTERNAL_SPACE)
        .bind(changed)
        .bind(crate::lock::id::TRANSITION_SEQUENCE)
        .fetch_one(&mut *tx)
        .await?;
    let evaluated_at: DateTime<Utc> = row.try_get("evaluated_at")?;

    let transition = if changed {
        let row = sqlx::query(sql::INSERT_TRANSITION)
            .bind(system_id.as_str())
            .bind(check_id.as_str())
            .bind(from.as_i16())
            .bind(current.as_i16())
            .bind(encode_evaluation(&evaluation))
            .bind(caused_by.map(RunId::as_str))
            .fetch_one(&mut *tx)
            .await?;
        Some(transition_from_row(&row)?)
    } else {
        None
    };

    let health = SystemRecord {
        system_id: system_id.as_str().to_owned(),
        status: current,
        checks,
        evaluated_at: Some(evaluated_at),
    };
    Ok((health, transition))
}
