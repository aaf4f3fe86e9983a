//! The PostgreSQL store: every statement vitals runs on the work pool.
//!
//! The writes (SubmitRun, ConfigureCheck) follow the `pipeline` module; this
//! module gives it two statements, [`sql::LOAD_SYSTEM`] and
//! [`sql::WRITE_SYSTEM`], each committing on its own: no BEGIN, no COMMIT, two
//! round trips on the reply's path. The write applies only if the system's
//! version is still the one the load read, which is what keeps each
//! transition exactly once when the system's lock alone cannot (a holder
//! cancelled while its write commits releases the lock early, a write
//! stalled past the lease lets it go).

use std::{
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use chrono::{DateTime, Utc};
use sqlx::{Connection, PgConnection, Row, postgres::PgRow};

use super::{
    CheckRecord, CheckUpdate, ConfigureOutcome, DeleteCheckOutcome, NewRun, Run, RunCursor, SubmitOutcome,
    SystemRecord, SystemSummary, Transition,
    codec::{
        decode_evaluation, decode_flapping, decode_ids, decode_thresholds, decode_window, encode_evaluation,
        encode_flapping, encode_thresholds, encode_window,
    },
    pipeline::{self, Flags, Loaded, Removal, Statements, SystemState, Write, WriteRules, Written},
    refuse_cycle,
    retention::{CheckCandidate, RUNS_KEPT, SystemCandidate},
    span_union,
};
use crate::{
    db::WorkPool,
    domain::{
        CheckId, MAX_OPEN_WINDOWS, MaintenanceWindow, Namespace, RunId, RunWindow, Status, StatusChange, SystemId,
        evaluate, merge,
    },
    error::{Corrupt, Error, Result},
};

mod batch;
pub mod sql;

pub use batch::WriteGroups;

pub use sql::TRANSITIONS_CHANNEL;
use sql::{CHECK_COLUMNS, TRANSITION_COLUMNS};

/// The PostgreSQL implementation of the store.
#[derive(Debug, Clone)]
pub struct PgStore {
    work: WorkPool,
    /// Groups the writes of runs that arrive together, shared by clones.
    batcher: Arc<batch::Batcher>,
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
        flapping_settings: flapping_of(row.try_get("flapping_settings")?)?,
        flapping: row.try_get("flapping")?,
    })
}

fn flapping_of(text: String) -> Result<Option<crate::domain::FlappingSettings>> {
    decode_flapping(&text).ok_or_else(|| Corrupt::Flapping(text).into())
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
        in_maintenance: row.try_get("in_maintenance")?,
        flapping: row.try_get("flapping")?,
        caused_by: decode_ids(row.try_get("caused_by")?),
        check_deleted: row.try_get("check_deleted")?,
    })
}

/// What [`sql::WRITE_SYSTEM`] and [`sql::REMOVE_CHECK`] return.
pub(super) fn written_from_row(row: &PgRow) -> Result<Written> {
    let sequence: Option<i64> = row.try_get("sequence")?;
    let caused_by: Option<String> = row.try_get("caused_by")?;
    Ok(Written::Applied {
        at: row.try_get("evaluated_at")?,
        sequence: sequence.map(|s| u64::try_from(s).unwrap_or(0)),
        flags: Flags {
            in_maintenance: row.try_get::<Option<bool>, _>("in_maintenance")?.unwrap_or(false),
            caused_by: caused_by.as_deref().map(decode_ids).unwrap_or_default(),
        },
    })
}

const RUN_COLUMNS: &str = "run_id, system_id, check_id, status, observed_at, latency_us, message, recorded_at";

impl PgStore {
    /// A store on the work pool.
    pub fn new(work: WorkPool) -> Self {
        PgStore {
            batcher: Arc::new(batch::Batcher::new(work.clone())),
            work,
            transition_reads: Arc::new(AtomicU64::new(0)),
        }
    }

    /// What the store's groups of writes did since it was created.
    pub fn write_groups(&self) -> WriteGroups {
        self.batcher.groups()
    }

    /// Writes waiting for a group to take them.
    pub fn writes_waiting(&self) -> usize {
        self.batcher.waiting()
    }

    /// Reads by [`PgStore::transitions_after`] since the store was created.
    pub fn transition_reads(&self) -> u64 {
        self.transition_reads.load(Ordering::Relaxed)
    }

    /// Records a run and re-evaluates its check and system (see
    /// the `pipeline` module). The caller holds the system's lock.
    pub async fn submit_run(&self, new: &NewRun, rules: &WriteRules) -> Result<SubmitOutcome> {
        pipeline::submit_run(self, new, rules).await
    }

    /// Creates or updates a check and re-evaluates its system. The caller
    /// holds the system's lock.
    pub async fn configure_check(&self, update: &CheckUpdate, rules: &WriteRules) -> Result<ConfigureOutcome> {
        pipeline::configure_check(self, update, rules).await
    }

    /// The stored health of a system, or `None` if it has never been seen.
    pub async fn system(&self, system_id: &SystemId) -> Result<Option<SystemRecord>> {
        let mut conn = self.work.acquire().await?;
        system_in(&mut conn, system_id.as_str()).await
    }

    /// How many systems have each status (statuses no system has are left out).
    pub async fn count_systems(&self) -> Result<Vec<(Status, u64)>> {
        let mut conn = self.work.acquire().await?;
        let rows: Vec<(i16, i64)> = sqlx::query_as("SELECT status, count(*) FROM systems GROUP BY status")
            .fetch_all(&mut *conn)
            .await?;
        rows.into_iter()
            .map(|(status, n)| Ok((status_of(status)?, u64::try_from(n).unwrap_or(0))))
            .collect()
    }

    /// One page of systems in byte order of their ids (see [`super::Store::list_systems`]).
    pub async fn list_systems(
        &self,
        status: Option<Status>,
        prefix: &str,
        visible: &Namespace,
        after: Option<&str>,
        limit: u32,
    ) -> Result<Vec<SystemSummary>> {
        let spans = visible.spans(prefix);
        if spans.is_empty() {
            return Ok(Vec::new());
        }
        // Only the conditions that apply (see `list_runs`).
        let status_filter = if status.is_some() {
            "s.status = $1"
        } else {
            "$1::smallint IS NULL"
        };
        let after_filter = if after.is_some() {
            "s.system_id COLLATE \"C\" > $2"
        } else {
            "$2::text IS NULL"
        };
        // One index range per span, each read only as far as the page
        // needs: a page costs what it shows, however many systems the caller
        // may not see lie between.
        let (branches, values) = span_union(&spans, "s.system_id COLLATE \"C\"", 4, |c| {
            format!(
                "(SELECT s.system_id FROM systems s WHERE {status_filter} AND {after_filter} AND {c} \
                 ORDER BY s.system_id COLLATE \"C\" LIMIT $3)"
            )
        });
        let sql = format!(
            "WITH page AS (SELECT system_id FROM ({branches}) b ORDER BY system_id COLLATE \"C\" LIMIT $3) \
             SELECT s.system_id, s.status, s.evaluated_at, k.check_count, k.last_run_at, k.flapping, \
                    EXISTS (SELECT FROM maintenance_windows m WHERE m.system_id = s.system_id \
                            AND m.starts_at <= now() AND m.ends_at > now()) AS in_maintenance \
             FROM page JOIN systems s USING (system_id) \
             CROSS JOIN LATERAL ( \
                 SELECT count(*) AS check_count, max(c.last_run_at) AS last_run_at, \
                        coalesce(bool_or(c.flapping AND c.enabled), false) AS flapping \
                 FROM checks c WHERE c.system_id = s.system_id) k \
             ORDER BY s.system_id COLLATE \"C\""
        );
        // Not kept prepared: its text varies with the caller's namespace and
        // filters, and each shape would take a place in the connection's
        // statement cache from the statements every write uses.
        let mut query = sqlx::query(&sql)
            .persistent(false)
            .bind(status.map(Status::as_i16))
            .bind(after)
            .bind(i64::from(limit));
        for value in &values {
            query = query.bind(value.as_str());
        }
        let mut conn = self.work.acquire().await?;
        let rows = query.fetch_all(&mut *conn).await?;
        rows.iter()
            .map(|row| {
                let check_count: i64 = row.try_get("check_count")?;
                Ok(SystemSummary {
                    system_id: row.try_get("system_id")?,
                    status: status_of(row.try_get("status")?)?,
                    check_count: u32::try_from(check_count).unwrap_or(u32::MAX),
                    last_run_at: row.try_get("last_run_at")?,
                    in_maintenance: row.try_get("in_maintenance")?,
                    flapping: row.try_get("flapping")?,
                    evaluated_at: row.try_get("evaluated_at")?,
                })
            })
            .collect()
    }

    /// Deletes a check and its runs and re-evaluates its system. The caller
    /// holds the system's lock.
    pub async fn delete_check(&self, system_id: &SystemId, check_id: &CheckId) -> Result<DeleteCheckOutcome> {
        pipeline::delete_check(self, system_id, check_id).await
    }

    /// Deletes a system with everything of it but its transitions, in one
    /// statement. True when it existed. The caller holds the system's lock.
    pub async fn delete_system(&self, system_id: &SystemId) -> Result<bool> {
        let mut conn = self.work.acquire().await?;
        let existed: bool = sqlx::query_scalar(
            "WITH sys AS (DELETE FROM systems WHERE system_id = $1 RETURNING 1), \
                  chk AS (DELETE FROM checks WHERE system_id = $1), \
                  gone AS (DELETE FROM runs WHERE system_id = $1), \
                  win AS (DELETE FROM maintenance_windows WHERE system_id = $1), \
                  dep AS (DELETE FROM system_dependencies WHERE system_id = $1) \
             SELECT EXISTS (SELECT FROM sys)",
        )
        .bind(system_id.as_str())
        .fetch_one(&mut *conn)
        .await?;
        Ok(existed)
    }

    /// Adds a maintenance window, merged with those it meets, in one
    /// transaction (see [`super::Store::set_maintenance`]).
    pub async fn set_maintenance(
        &self,
        system_id: &SystemId,
        window: MaintenanceWindow,
    ) -> Result<(MaintenanceWindow, SystemRecord)> {
        let mut conn = self.work.acquire().await?;
        let mut tx = conn.begin().await?;
        sqlx::query(
            "INSERT INTO systems (system_id, status, evaluated_at) VALUES ($1, 1, now()) ON CONFLICT DO NOTHING",
        )
        .bind(system_id.as_str())
        .execute(&mut *tx)
        .await?;
        let rows = sqlx::query(
            "SELECT starts_at, ends_at, reason FROM maintenance_windows \
             WHERE system_id = $1 AND starts_at <= $3 AND ends_at >= $2",
        )
        .bind(system_id.as_str())
        .bind(window.starts_at)
        .bind(window.ends_at)
        .fetch_all(&mut *tx)
        .await?;
        let met = rows.iter().map(window_from_row).collect::<Result<Vec<_>>>()?;
        // Windows are kept as long as transitions, for uptime.
        sqlx::query("DELETE FROM maintenance_windows WHERE system_id = $1 AND ends_at < $2")
            .bind(system_id.as_str())
            .bind(Utc::now() - super::TRANSITION_RETENTION)
            .execute(&mut *tx)
            .await?;
        let (merged, replaced) = merge(window, &met);
        sqlx::query("DELETE FROM maintenance_windows WHERE system_id = $1 AND starts_at = ANY($2)")
            .bind(system_id.as_str())
            .bind(&replaced)
            .execute(&mut *tx)
            .await?;
        sqlx::query("INSERT INTO maintenance_windows (system_id, starts_at, ends_at, reason) VALUES ($1, $2, $3, $4)")
            .bind(system_id.as_str())
            .bind(merged.starts_at)
            .bind(merged.ends_at)
            .bind(merged.reason.as_str())
            .execute(&mut *tx)
            .await?;
        let system = system_in(&mut tx, system_id.as_str())
            .await?
            .ok_or(Error::Invariant("a system with a maintenance window is stored"))?;
        if system.maintenance_windows.len() > MAX_OPEN_WINDOWS {
            tx.rollback().await?;
            return Err(Error::TooManyWindows {
                system_id: system_id.as_str().to_owned(),
                limit: MAX_OPEN_WINDOWS,
            });
        }
        tx.commit().await?;
        Ok((merged, system))
    }

    /// Ends the open window now and removes the upcoming ones, in one
    /// transaction (see [`super::Store::clear_maintenance`]).
    pub async fn clear_maintenance(&self, system_id: &SystemId) -> Result<(u32, Option<SystemRecord>)> {
        let mut conn = self.work.acquire().await?;
        let mut tx = conn.begin().await?;
        let ended = sqlx::query(
            "UPDATE maintenance_windows SET ends_at = now() \
             WHERE system_id = $1 AND starts_at < now() AND ends_at > now()",
        )
        .bind(system_id.as_str())
        .execute(&mut *tx)
        .await?
        .rows_affected();
        let removed = sqlx::query("DELETE FROM maintenance_windows WHERE system_id = $1 AND starts_at >= now()")
            .bind(system_id.as_str())
            .execute(&mut *tx)
            .await?
            .rows_affected();
        let system = system_in(&mut tx, system_id.as_str()).await?;
        tx.commit().await?;
        Ok((u32::try_from(ended + removed).unwrap_or(u32::MAX), system))
    }

    /// Replaces a system's dependencies in one transaction that holds the
    /// dependency table against other such changes (reads and SubmitRun are
    /// not held up), so two changes can never close a cycle together.
    pub async fn configure_system(&self, system_id: &SystemId, depends_on: &[SystemId]) -> Result<SystemRecord> {
        let mut conn = self.work.acquire().await?;
        let mut tx = conn.begin().await?;
        sqlx::query("LOCK TABLE system_dependencies IN SHARE ROW EXCLUSIVE MODE")
            .execute(&mut *tx)
            .await?;
        let wanted: Vec<&str> = depends_on.iter().map(SystemId::as_str).collect();
        // Every edge reachable from the new dependencies, not through the
        // system itself (its own edges are being replaced).
        let edges: Vec<(String, String)> = sqlx::query_as(
            "WITH RECURSIVE reach(system_id) AS ( \
                 SELECT unnest($2::text[]) \
                 UNION \
                 SELECT d.depends_on FROM system_dependencies d JOIN reach r ON d.system_id = r.system_id \
                 WHERE d.system_id <> $1) \
             SELECT d.system_id, d.depends_on FROM system_dependencies d JOIN reach r ON d.system_id = r.system_id \
             WHERE d.system_id <> $1",
        )
        .bind(system_id.as_str())
        .bind(&wanted)
        .fetch_all(&mut *tx)
        .await?;
        refuse_cycle(system_id, depends_on, edges)?;
        sqlx::query(
            "INSERT INTO systems (system_id, status, evaluated_at) VALUES ($1, 1, now()) ON CONFLICT DO NOTHING",
        )
        .bind(system_id.as_str())
        .execute(&mut *tx)
        .await?;
        sqlx::query("DELETE FROM system_dependencies WHERE system_id = $1")
            .bind(system_id.as_str())
            .execute(&mut *tx)
            .await?;
        sqlx::query("INSERT INTO system_dependencies (system_id, depends_on) SELECT $1, unnest($2::text[])")
            .bind(system_id.as_str())
            .bind(&wanted)
            .execute(&mut *tx)
            .await?;
        let system = system_in(&mut tx, system_id.as_str())
            .await?
            .ok_or(Error::Invariant("a configured system is stored"))?;
        tx.commit().await?;
        Ok(system)
    }

    /// When a system was first written and its status now.
    pub async fn system_origin(&self, system_id: &SystemId) -> Result<Option<(DateTime<Utc>, Status)>> {
        let mut conn = self.work.acquire().await?;
        let row: Option<(DateTime<Utc>, i16)> =
            sqlx::query_as("SELECT created_at, status FROM systems WHERE system_id = $1")
                .bind(system_id.as_str())
                .fetch_optional(&mut *conn)
                .await?;
        row.map(|(created_at, status)| Ok((created_at, status_of(status)?)))
            .transpose()
    }

    /// A page of a system's transitions for uptime (see [`super::Store::status_changes`]).
    pub async fn status_changes(
        &self,
        system_id: &SystemId,
        from: DateTime<Utc>,
        after: Option<u64>,
        limit: u32,
    ) -> Result<Vec<(u64, StatusChange)>> {
        let mut conn = self.work.acquire().await?;
        // The newest before the range only on the first page.
        let before = if after.is_none() {
            "(SELECT sequence, transitioned_at, from_status, to_status FROM transitions \
              WHERE system_id = $1 AND transitioned_at <= $2 ORDER BY sequence DESC LIMIT 1) UNION ALL"
        } else {
            ""
        };
        let rows: Vec<(i64, DateTime<Utc>, i16, i16)> = sqlx::query_as(&format!(
            "SELECT * FROM ({before} \
              (SELECT sequence, transitioned_at, from_status, to_status FROM transitions \
               WHERE system_id = $1 AND transitioned_at > $2 AND sequence > $3 ORDER BY sequence LIMIT $4)) c \
             ORDER BY sequence"
        ))
        .bind(system_id.as_str())
        .bind(from)
        .bind(after.map_or(0, |a| i64::try_from(a).unwrap_or(i64::MAX)))
        .bind(i64::from(limit))
        .fetch_all(&mut *conn)
        .await?;
        rows.into_iter()
            .map(|(sequence, at, from, to)| {
                Ok((
                    u64::try_from(sequence).unwrap_or(0),
                    StatusChange {
                        at,
                        from: status_of(from)?,
                        to: status_of(to)?,
                    },
                ))
            })
            .collect()
    }

    /// A system's maintenance windows overlapping `[from, to)`.
    pub async fn windows_between(
        &self,
        system_id: &SystemId,
        from: DateTime<Utc>,
        to: DateTime<Utc>,
        limit: u32,
    ) -> Result<Vec<MaintenanceWindow>> {
        let mut conn = self.work.acquire().await?;
        let rows = sqlx::query(
            "SELECT starts_at, ends_at, reason FROM maintenance_windows \
             WHERE system_id = $1 AND ends_at > $2 AND starts_at < $3 ORDER BY starts_at LIMIT $4",
        )
        .bind(system_id.as_str())
        .bind(from)
        .bind(to)
        .bind(i64::from(limit))
        .fetch_all(&mut *conn)
        .await?;
        rows.iter().map(window_from_row).collect()
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
        // Only the conditions that apply: work sessions plan every
        // statement once for any parameters (generic plans), and a condition
        // a NULL switches off would keep the plan from the matching index.
        let check = if check_id.is_some() {
            "AND check_id = $2"
        } else {
            "AND $2::text IS NULL"
        };
        let cursor = if after.is_some() {
            "AND (observed_at, run_id) < ($3, $4)"
        } else {
            "AND $3::timestamptz IS NULL AND $4::text IS NULL"
        };
        let rows = sqlx::query(&format!(
            "SELECT {RUN_COLUMNS} FROM runs WHERE system_id = $1 {check} {cursor} \
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
        // Only the conditions that apply (see `list_runs`).
        let system = if system_id.is_some() {
            "system_id = $1"
        } else {
            "$1::text IS NULL"
        };
        let before_sequence = if before.is_some() {
            "sequence < $2"
        } else {
            "$2::bigint IS NULL"
        };
        let rows = sqlx::query(&format!(
            "SELECT {TRANSITION_COLUMNS} FROM transitions WHERE {system} AND {before_sequence} \
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
        // Only the conditions that apply (see `list_runs`).
        let statement = if system_id.is_some() {
            sql::TRANSITIONS_AFTER_OF_SYSTEM
        } else {
            sql::TRANSITIONS_AFTER
        };
        let rows = sqlx::query(statement)
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
            "DELETE FROM runs WHERE system_id = $1 AND run_id IN ( \
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
        "SELECT {CHECK_COLUMNS} FROM checks WHERE system_id = $1 ORDER BY check_id COLLATE \"C\""
    ))
    .bind(system_id)
    .fetch_all(&mut *conn)
    .await?;
    let now = Utc::now();
    let windows = sqlx::query(
        "SELECT starts_at, ends_at, reason FROM maintenance_windows \
         WHERE system_id = $1 AND ends_at > $2 ORDER BY starts_at",
    )
    .bind(system_id)
    .bind(now)
    .fetch_all(&mut *conn)
    .await?;
    let maintenance_windows: Vec<MaintenanceWindow> = windows.iter().map(window_from_row).collect::<Result<_>>()?;
    let depends_on: Vec<String> = sqlx::query_scalar(
        "SELECT depends_on FROM system_dependencies WHERE system_id = $1 ORDER BY depends_on COLLATE \"C\"",
    )
    .bind(system_id)
    .fetch_all(&mut *conn)
    .await?;
    Ok(Some(SystemRecord {
        depends_on,
        system_id: system_id.to_owned(),
        status: status_of(system.try_get("status")?)?,
        checks: checks.iter().map(check_from_row).collect::<Result<_>>()?,
        evaluated_at: system.try_get::<Option<DateTime<Utc>>, _>("evaluated_at")?,
        in_maintenance: maintenance_windows.iter().any(|w| w.is_open_at(now)),
        maintenance_windows,
    }))
}

fn window_from_row(row: &PgRow) -> Result<MaintenanceWindow> {
    Ok(MaintenanceWindow {
        starts_at: row.try_get("starts_at")?,
        ends_at: row.try_get("ends_at")?,
        reason: row.try_get("reason")?,
    })
}

/// The transition `run` caused, if it caused one and it is still kept.
/// A transition written with the run has the run's `recorded_at` (both are
/// the transaction's `now()`); an older one under the same id belongs to a
/// run that retention deleted before the id was used again.
async fn transition_caused_by(conn: &mut PgConnection, run: &Run) -> Result<Option<Transition>> {
    let row = sqlx::query(&format!(
        "SELECT {TRANSITION_COLUMNS} FROM transitions WHERE system_id = $1 AND run_id = $2 AND transitioned_at >= $3 \
         ORDER BY sequence DESC LIMIT 1"
    ))
    .bind(run.system_id.as_str())
    .bind(run.run_id.as_str())
    .bind(run.recorded_at)
    .fetch_optional(&mut *conn)
    .await?;
    row.as_ref().map(transition_from_row).transpose()
}

/// The constraint a stale write violates: [`sql::WRITE_SYSTEM`] sets the version
/// of a system it read at an older version to 0, which this refuses.
const STALE_WRITE: &str = "systems_stale_write";

/// The history's key: a run id stored already.
const RUNS_KEY: &str = "runs_pkey";

/// SQLSTATE of a lock wait that reached `lock_timeout`.
const LOCK_NOT_AVAILABLE: &str = "55P03";

/// A work connection whose statements commit one by one, as a write uses it.
///
/// Dropped while a statement is in flight (its request ended: the deadline
/// passed, the client went away), its socket is closed at once instead of
/// the connection going back to the pool, where sqlx would wait for the
/// statement to finish: PostgreSQL then ends the statement within a second
/// (`client_connection_check_interval`) rather than letting it wait on for a
/// lock, holding its own, for nobody. At once, not with sqlx's graceful
/// close: over TLS that used up its whole 5 s timeout before the socket
/// closed (the abandoned-write test measured 5.2 s instead of about 1 s).
#[derive(Debug)]
pub struct WriteConnection {
    /// Taken by `drop`, and lent to a group of writes (see the `batch` module).
    conn: Option<sqlx::pool::PoolConnection<sqlx::Postgres>>,
    /// True from a statement's start until its reply was read.
    in_flight: bool,
}

impl WriteConnection {
    /// The connection, for one statement: call [`Self::done`] when its
    /// future completed. `None` when it was lent to a group of writes.
    fn start(&mut self) -> Option<&mut PgConnection> {
        let conn = self.conn.as_deref_mut()?;
        self.in_flight = true;
        Some(conn)
    }

    /// The connection, or another from the pool when it was lent to a group
    /// of writes (a resubmission's reads after the write).
    async fn ensure(&mut self, work: &WorkPool) -> Result<&mut PgConnection> {
        if self.conn.is_none() {
            self.conn = Some(work.acquire().await?);
        }
        self.conn
            .as_deref_mut()
            .ok_or(Error::Invariant("a connection just taken is there"))
    }

    fn done(&mut self) {
        self.in_flight = false;
    }
}

impl Drop for WriteConnection {
    fn drop(&mut self) {
        if self.in_flight
            && let Some(conn) = self.conn.take()
        {
            // Out of the pool (which may open another), then dropped: the
            // socket closes now.
            drop(conn.detach());
        }
    }
}

impl Statements for PgStore {
    type Unit = WriteConnection;

    async fn begin(&self) -> Result<Self::Unit> {
        Ok(WriteConnection {
            conn: Some(self.work.acquire().await?),
            in_flight: false,
        })
    }

    async fn load(&self, conn: &mut Self::Unit, system_id: &SystemId, check_id: &CheckId) -> Result<Loaded> {
        let rows = sqlx::query(sql::LOAD_SYSTEM)
            .bind(system_id.as_str())
            .bind(check_id.as_str())
            .fetch_all(
                conn.start()
                    .ok_or(Error::Invariant("an attempt loads on its own connection"))?,
            )
            .await;
        conn.done();
        let rows = rows?;
        let Some(first) = rows.first() else {
            return Ok(Loaded {
                system: None,
                checks: Vec::new(),
                window: RunWindow::default(),
            });
        };
        let system = SystemState {
            status: status_of(first.try_get("system_status")?)?,
            version: first.try_get("version")?,
            announced: status_of(first.try_get("announced_status")?)?,
        };
        let mut window = RunWindow::default();
        let mut checks = Vec::with_capacity(rows.len());
        for row in &rows {
            if row.try_get::<Option<String>, _>("check_id")?.is_none() {
                continue;
            }
            if let Some(text) = row.try_get::<Option<String>, _>("run_window")? {
                window = decode_window(&text).ok_or(Corrupt::Window(text))?;
            }
            checks.push(check_from_row(row)?);
        }
        Ok(Loaded {
            system: Some(system),
            checks,
            window,
        })
    }

    async fn write(&self, conn: &mut Self::Unit, write: &Write<'_>) -> Result<Written> {
        let check = write.check;
        let member = batch::Member {
            system_id: write.system_id.as_str().to_owned(),
            check_id: check.check_id.clone(),
            status: write.status.as_i16(),
            loaded_version: write.loaded_version,
            thresholds: encode_thresholds(&check.thresholds),
            enabled: check.enabled,
            check_status: check.evaluation.status.as_i16(),
            evaluation: encode_evaluation(&check.evaluation),
            runs_considered: i32::try_from(check.runs_considered).unwrap_or(i32::MAX),
            last_run_at: check.last_run_at,
            window: encode_window(write.window),
            run: write.run.map(|r| batch::MemberRun {
                run_id: r.run_id.as_str().to_owned(),
                status: r.status.as_i16(),
                observed_at: r.observed_at,
                latency_us: r.latency_us(),
                message: r.message.as_str().to_owned(),
            }),
            transition_from: write.transition_from.map(Status::as_i16),
            flapping_settings: encode_flapping(check.flapping_settings.as_ref()),
            flapping: check.flapping,
            resolves: write.resolves,
            transition_flapping: write.flapping,
        };
        if member.run.is_none() {
            // A configuration change: rare, and alone.
            return batch::write_one(conn, &member).await;
        }
        self.batcher.write(conn, member).await
    }

    async fn remove_check(&self, conn: &mut Self::Unit, removal: &Removal<'_>) -> Result<Written> {
        let row = sqlx::query(sql::REMOVE_CHECK)
            .bind(removal.system_id.as_str())
            .bind(removal.check_id)
            .bind(removal.status.as_i16())
            .bind(removal.loaded_version)
            .bind(removal.transition_from.is_some())
            .bind(removal.transition_from.map(Status::as_i16))
            .bind(encode_evaluation(removal.evaluation))
            .bind(removal.resolves)
            .fetch_optional(
                conn.start()
                    .ok_or(Error::Invariant("a removal writes on its own connection"))?,
            )
            .await;
        conn.done();
        match row {
            Ok(Some(row)) => written_from_row(&row),
            Err(err) if violates(&err, STALE_WRITE) => Ok(Written::Stale),
            Err(err) if crate::error::sqlstate(&err).as_deref() == Some(LOCK_NOT_AVAILABLE) => Err(Error::SystemBusy {
                system_id: removal.system_id.as_str().to_owned(),
            }),
            // The row went since the load: nothing was written.
            Ok(None) => Ok(Written::Stale),
            Err(err) => Err(err.into()),
        }
    }

    async fn commit(&self, _conn: Self::Unit, _wrote_transition: bool) -> Result<()> {
        // The write committed with its statement; NOTIFY went with it.
        Ok(())
    }

    async fn stored_run(&self, conn: &mut Self::Unit, system_id: &SystemId, run_id: &RunId) -> Result<Option<Run>> {
        let row = sqlx::query(&format!(
            "SELECT {RUN_COLUMNS} FROM runs WHERE system_id = $1 AND run_id = $2"
        ))
        .bind(system_id.as_str())
        .bind(run_id.as_str())
        .fetch_optional(conn.ensure(&self.work).await?)
        .await?;
        row.as_ref().map(run_from_row).transpose()
    }

    async fn system(&self, conn: &mut Self::Unit, system_id: &str) -> Result<Option<SystemRecord>> {
        system_in(conn.ensure(&self.work).await?, system_id).await
    }

    async fn transition_caused_by(&self, conn: &mut Self::Unit, run: &Run) -> Result<Option<Transition>> {
        transition_caused_by(conn.ensure(&self.work).await?, run).await
    }

    fn lost_before_writing(&self, err: &Error) -> bool {
        self.work.health().check(err)
    }
}

/// True when `err` is a violation of `constraint`.
fn violates(err: &sqlx::Error, constraint: &str) -> bool {
    err.as_database_error()
        .is_some_and(|db| db.constraint() == Some(constraint))
}
