//! The embedded store: the same records and rules as [`super::postgres`], on
//! the SQLite file of [`EmbeddedDb`].
//!
//! The writes (SubmitRun, ConfigureCheck) follow the `pipeline` module, whose
//! statements run here in one `BEGIN IMMEDIATE` transaction on the single
//! writer connection, so the previous status they read is the last committed
//! one and nothing can commit between that read and their own commit: each
//! transition appears exactly once, and transition sequences (max + 1 inside
//! that transaction) commit in order. A cancelled request cannot break this
//! either: its transaction commits or rolls back before the writer connection
//! serves the next writer.
//!
//! Times are stored as INTEGER microseconds since the epoch.

use std::{
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use chrono::{DateTime, Utc};
use sqlx::{Connection, Row, SqliteConnection, sqlite::SqliteRow};

use super::{
    CheckRecord, CheckUpdate, ConfigureOutcome, DeleteCheckOutcome, NewRun, Run, RunCursor, SubmitOutcome,
    SystemRecord, SystemSummary, Transition, TransitionNotifier,
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
    db::EmbeddedDb,
    domain::{
        CheckId, MAX_OPEN_WINDOWS, MaintenanceWindow, Namespace, RunId, RunWindow, Status, StatusChange, SystemId,
        Thresholds, evaluate, merge,
    },
    error::{Corrupt, Error, Result},
};

const RUN_COLUMNS: &str = "run_id, system_id, check_id, status, observed_at, latency_us, message, recorded_at";
const CHECK_COLUMNS: &str =
    "check_id, thresholds, enabled, status, evaluation, runs_considered, last_run_at, flapping_settings, flapping";
const TRANSITION_COLUMNS: &str = "sequence, system_id, check_id, from_status, to_status, transitioned_at, evaluation, \
                                  in_maintenance, flapping, caused_by, check_deleted";

/// The SQLite implementation of the store.
#[derive(Debug, Clone)]
pub struct SqliteStore {
    db: EmbeddedDb,
    /// Wakes this process's transition feed after a commit that wrote a
    /// transition.
    notifier: TransitionNotifier,
    /// Reads by [`SqliteStore::transitions_after`], shared by clones.
    transition_reads: Arc<AtomicU64>,
}

fn micros(t: DateTime<Utc>) -> i64 {
    t.timestamp_micros()
}

fn time_of(us: i64) -> Result<DateTime<Utc>> {
    DateTime::from_timestamp_micros(us).ok_or(Error::Corrupt(Corrupt::Time(us)))
}

/// Now, at the stored precision.
fn now() -> DateTime<Utc> {
    let now = Utc::now();
    DateTime::from_timestamp_micros(now.timestamp_micros()).unwrap_or(now)
}

fn status_of(raw: i64) -> Result<Status> {
    i16::try_from(raw)
        .ok()
        .and_then(Status::from_i16)
        .ok_or(Error::Corrupt(Corrupt::Status(raw)))
}

fn thresholds_of(text: &str) -> Result<Thresholds> {
    decode_thresholds(text).ok_or_else(|| Corrupt::Thresholds(text.to_owned()).into())
}

fn bigint(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

fn run_from_row(row: &SqliteRow) -> Result<Run> {
    let latency_us: Option<i64> = row.try_get("latency_us")?;
    Ok(Run {
        run_id: row.try_get("run_id")?,
        system_id: row.try_get("system_id")?,
        check_id: row.try_get("check_id")?,
        status: status_of(row.try_get("status")?)?,
        observed_at: time_of(row.try_get("observed_at")?)?,
        latency: latency_us
            .and_then(|us| u64::try_from(us).ok())
            .map(Duration::from_micros),
        message: row.try_get("message")?,
        recorded_at: time_of(row.try_get("recorded_at")?)?,
    })
}

fn check_from_row(row: &SqliteRow) -> Result<CheckRecord> {
    let thresholds = thresholds_of(&row.try_get::<String, _>("thresholds")?)?;
    let evaluation_text: String = row.try_get("evaluation")?;
    // A check created by ConfigureCheck before any run has no stored
    // evaluation yet; evaluating no runs is cheap and exact.
    let evaluation = decode_evaluation(&evaluation_text).unwrap_or_else(|| evaluate(&[], &thresholds));
    let runs_considered: i64 = row.try_get("runs_considered")?;
    Ok(CheckRecord {
        check_id: row.try_get("check_id")?,
        thresholds,
        enabled: row.try_get("enabled")?,
        evaluation,
        runs_considered: u32::try_from(runs_considered).unwrap_or(0),
        last_run_at: row.try_get::<Option<i64>, _>("last_run_at")?.map(time_of).transpose()?,
        flapping_settings: {
            let text: String = row.try_get("flapping_settings")?;
            decode_flapping(&text).ok_or(Corrupt::Flapping(text))?
        },
        flapping: row.try_get("flapping")?,
    })
}

fn transition_from_row(row: &SqliteRow) -> Result<Transition> {
    let evaluation_text: String = row.try_get("evaluation")?;
    let sequence: i64 = row.try_get("sequence")?;
    Ok(Transition {
        sequence: u64::try_from(sequence).unwrap_or(0),
        system_id: row.try_get("system_id")?,
        check_id: row.try_get("check_id")?,
        from: status_of(row.try_get("from_status")?)?,
        to: status_of(row.try_get("to_status")?)?,
        transitioned_at: time_of(row.try_get("transitioned_at")?)?,
        evaluation: decode_evaluation(&evaluation_text).ok_or_else(|| Corrupt::Evaluation(evaluation_text.clone()))?,
        in_maintenance: row.try_get("in_maintenance")?,
        flapping: row.try_get("flapping")?,
        caused_by: decode_ids(row.try_get("caused_by")?),
        check_deleted: row.try_get("check_deleted")?,
    })
}

impl SqliteStore {
    /// A store on `db`; committed transitions are announced on `notifier`.
    pub fn new(db: EmbeddedDb, notifier: TransitionNotifier) -> Self {
        SqliteStore {
            db,
            notifier,
            transition_reads: Arc::new(AtomicU64::new(0)),
        }
    }

    /// Reads by [`SqliteStore::transitions_after`] since the store was created.
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

    /// How many systems have each status (statuses no system has are left out).
    pub async fn count_systems(&self) -> Result<Vec<(Status, u64)>> {
        let mut conn = self.db.reader().await?;
        let rows: Vec<(i64, i64)> = sqlx::query_as("SELECT status, count(*) FROM systems GROUP BY status")
            .fetch_all(&mut *conn)
            .await?;
        rows.into_iter()
            .map(|(status, n)| Ok((status_of(status)?, u64::try_from(n).unwrap_or(0))))
            .collect()
    }

    /// The stored health of a system, or `None` if it has never been seen.
    pub async fn system(&self, system_id: &SystemId) -> Result<Option<SystemRecord>> {
        let mut conn = self.db.reader().await?;
        // Two statements: one snapshot, so the checks match the system row.
        let mut tx = conn.begin().await?;
        let system = system_in(&mut tx, system_id.as_str()).await?;
        tx.rollback().await?;
        Ok(system)
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
        // As in PostgreSQL: one index range per span, read only as far as
        // the page needs, and only the conditions that apply.
        let status_filter = if status.is_some() {
            "s.status = $1"
        } else {
            "$1 IS NULL"
        };
        let after_filter = if after.is_some() {
            "s.system_id > $2"
        } else {
            "$2 IS NULL"
        };
        let (branches, values) = span_union(&spans, "s.system_id", 5, |c| {
            format!(
                "SELECT system_id FROM (SELECT s.system_id FROM systems s \
                 WHERE {status_filter} AND {after_filter} AND {c} ORDER BY s.system_id LIMIT $3)"
            )
        });
        let sql = format!(
            "WITH page AS (SELECT system_id FROM ({branches}) ORDER BY system_id LIMIT $3) \
             SELECT s.system_id, s.status, s.evaluated_at, \
                    (SELECT count(*) FROM checks c WHERE c.system_id = s.system_id) AS check_count, \
                    (SELECT max(c.last_run_at) FROM checks c WHERE c.system_id = s.system_id) AS last_run_at, \
                    EXISTS (SELECT 1 FROM checks c WHERE c.system_id = s.system_id AND c.flapping AND c.enabled) \
                        AS flapping, \
                    EXISTS (SELECT 1 FROM maintenance_windows m WHERE m.system_id = s.system_id \
                            AND m.starts_at <= $4 AND m.ends_at > $4) AS in_maintenance \
             FROM page JOIN systems s ON s.system_id = page.system_id \
             ORDER BY s.system_id"
        );
        // Not kept prepared: its text varies with the caller's namespace and
        // filters, and each shape would take a place in the connection's
        // statement cache from the statements every write uses.
        let mut query = sqlx::query(&sql)
            .persistent(false)
            .bind(status.map(Status::as_i16))
            .bind(after)
            .bind(i64::from(limit))
            .bind(micros(now()));
        for value in &values {
            query = query.bind(value.as_str());
        }
        let mut conn = self.db.reader().await?;
        let rows = query.fetch_all(&mut *conn).await?;
        rows.iter()
            .map(|row| {
                let check_count: i64 = row.try_get("check_count")?;
                Ok(SystemSummary {
                    system_id: row.try_get("system_id")?,
                    status: status_of(row.try_get("status")?)?,
                    check_count: u32::try_from(check_count).unwrap_or(u32::MAX),
                    last_run_at: row.try_get::<Option<i64>, _>("last_run_at")?.map(time_of).transpose()?,
                    in_maintenance: row.try_get("in_maintenance")?,
                    flapping: row.try_get("flapping")?,
                    evaluated_at: time_of(row.try_get("evaluated_at")?)?,
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
    /// write transaction. True when it existed. The caller holds the
    /// system's lock.
    pub async fn delete_system(&self, system_id: &SystemId) -> Result<bool> {
        let mut tx = self.db.begin_write().await?;
        let existed = sqlx::query("DELETE FROM systems WHERE system_id = $1")
            .bind(system_id.as_str())
            .execute(&mut *tx)
            .await?
            .rows_affected()
            > 0;
        for table in ["checks", "runs", "maintenance_windows", "system_dependencies"] {
            sqlx::query(&format!("DELETE FROM {table} WHERE system_id = $1"))
                .bind(system_id.as_str())
                .execute(&mut *tx)
                .await?;
        }
        tx.commit().await?;
        Ok(existed)
    }

    /// Adds a maintenance window, merged with those it meets, in one write
    /// transaction (see [`super::Store::set_maintenance`]).
    pub async fn set_maintenance(
        &self,
        system_id: &SystemId,
        window: MaintenanceWindow,
    ) -> Result<(MaintenanceWindow, SystemRecord)> {
        let now = now();
        let mut tx = self.db.begin_write().await?;
        sqlx::query(
            "INSERT INTO systems (system_id, status, evaluated_at, created_at) VALUES ($1, 1, $2, $2) \
             ON CONFLICT DO NOTHING",
        )
        .bind(system_id.as_str())
        .bind(micros(now))
        .execute(&mut *tx)
        .await?;
        let rows = sqlx::query(
            "SELECT starts_at, ends_at, reason FROM maintenance_windows \
             WHERE system_id = $1 AND starts_at <= $3 AND ends_at >= $2",
        )
        .bind(system_id.as_str())
        .bind(micros(window.starts_at))
        .bind(micros(window.ends_at))
        .fetch_all(&mut *tx)
        .await?;
        let met = rows.iter().map(window_from_row).collect::<Result<Vec<_>>>()?;
        // Windows are kept as long as transitions, for uptime.
        sqlx::query("DELETE FROM maintenance_windows WHERE system_id = $1 AND ends_at < $2")
            .bind(system_id.as_str())
            .bind(micros(now - super::TRANSITION_RETENTION))
            .execute(&mut *tx)
            .await?;
        let (merged, replaced) = merge(window, &met);
        for starts_at in replaced {
            sqlx::query("DELETE FROM maintenance_windows WHERE system_id = $1 AND starts_at = $2")
                .bind(system_id.as_str())
                .bind(micros(starts_at))
                .execute(&mut *tx)
                .await?;
        }
        sqlx::query("INSERT INTO maintenance_windows (system_id, starts_at, ends_at, reason) VALUES ($1, $2, $3, $4)")
            .bind(system_id.as_str())
            .bind(micros(merged.starts_at))
            .bind(micros(merged.ends_at))
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

    /// Ends the open window now and removes the upcoming ones, in one write
    /// transaction (see [`super::Store::clear_maintenance`]).
    pub async fn clear_maintenance(&self, system_id: &SystemId) -> Result<(u32, Option<SystemRecord>)> {
        let now = micros(now());
        let mut tx = self.db.begin_write().await?;
        let ended = sqlx::query(
            "UPDATE maintenance_windows SET ends_at = $2 WHERE system_id = $1 AND starts_at < $2 AND ends_at > $2",
        )
        .bind(system_id.as_str())
        .bind(now)
        .execute(&mut *tx)
        .await?
        .rows_affected();
        let removed = sqlx::query("DELETE FROM maintenance_windows WHERE system_id = $1 AND starts_at >= $2")
            .bind(system_id.as_str())
            .bind(now)
            .execute(&mut *tx)
            .await?
            .rows_affected();
        let system = system_in(&mut tx, system_id.as_str()).await?;
        tx.commit().await?;
        Ok((u32::try_from(ended + removed).unwrap_or(u32::MAX), system))
    }

    /// Replaces a system's dependencies in one write transaction (the one
    /// writer serialises every such change), walking the dependencies of the
    /// new ones level by level to refuse a cycle.
    pub async fn configure_system(&self, system_id: &SystemId, depends_on: &[SystemId]) -> Result<SystemRecord> {
        let now = now();
        let mut tx = self.db.begin_write().await?;
        let mut edges: Vec<(String, String)> = Vec::new();
        let mut seen: std::collections::BTreeSet<String> = std::collections::BTreeSet::new();
        let mut frontier: Vec<String> = depends_on.iter().map(|d| d.as_str().to_owned()).collect();
        while let Some(node) = frontier.pop() {
            if node == system_id.as_str() || !seen.insert(node.clone()) {
                continue;
            }
            let next: Vec<String> =
                sqlx::query_scalar("SELECT depends_on FROM system_dependencies WHERE system_id = $1")
                    .bind(node.as_str())
                    .fetch_all(&mut *tx)
                    .await?;
            for n in next {
                edges.push((node.clone(), n.clone()));
                frontier.push(n);
            }
        }
        refuse_cycle(system_id, depends_on, edges)?;
        sqlx::query(
            "INSERT INTO systems (system_id, status, evaluated_at, created_at) VALUES ($1, 1, $2, $2) \
             ON CONFLICT DO NOTHING",
        )
        .bind(system_id.as_str())
        .bind(micros(now))
        .execute(&mut *tx)
        .await?;
        sqlx::query("DELETE FROM system_dependencies WHERE system_id = $1")
            .bind(system_id.as_str())
            .execute(&mut *tx)
            .await?;
        for dependency in depends_on {
            sqlx::query("INSERT INTO system_dependencies (system_id, depends_on) VALUES ($1, $2)")
                .bind(system_id.as_str())
                .bind(dependency.as_str())
                .execute(&mut *tx)
                .await?;
        }
        let system = system_in(&mut tx, system_id.as_str())
            .await?
            .ok_or(Error::Invariant("a configured system is stored"))?;
        tx.commit().await?;
        Ok(system)
    }

    /// When a system was first written and its status now.
    pub async fn system_origin(&self, system_id: &SystemId) -> Result<Option<(DateTime<Utc>, Status)>> {
        let mut conn = self.db.reader().await?;
        let row: Option<(i64, i64)> = sqlx::query_as("SELECT created_at, status FROM systems WHERE system_id = $1")
            .bind(system_id.as_str())
            .fetch_optional(&mut *conn)
            .await?;
        row.map(|(created_at, status)| Ok((time_of(created_at)?, status_of(status)?)))
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
        let mut conn = self.db.reader().await?;
        let rows: Vec<(i64, i64, i64, i64)> = sqlx::query_as(
            "SELECT * FROM ( \
                 SELECT * FROM (SELECT sequence, transitioned_at, from_status, to_status FROM transitions \
                  WHERE $5 AND system_id = $1 AND transitioned_at <= $2 ORDER BY sequence DESC LIMIT 1) \
                 UNION ALL \
                 SELECT * FROM (SELECT sequence, transitioned_at, from_status, to_status FROM transitions \
                  WHERE system_id = $1 AND transitioned_at > $2 AND sequence > $3 ORDER BY sequence LIMIT $4)) \
             ORDER BY sequence",
        )
        .bind(system_id.as_str())
        .bind(micros(from))
        .bind(after.map_or(0, bigint))
        .bind(i64::from(limit))
        .bind(after.is_none())
        .fetch_all(&mut *conn)
        .await?;
        rows.into_iter()
            .map(|(sequence, at, from, to)| {
                Ok((
                    u64::try_from(sequence).unwrap_or(0),
                    StatusChange {
                        at: time_of(at)?,
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
        let mut conn = self.db.reader().await?;
        let rows = sqlx::query(
            "SELECT starts_at, ends_at, reason FROM maintenance_windows \
             WHERE system_id = $1 AND ends_at > $2 AND starts_at < $3 ORDER BY starts_at LIMIT $4",
        )
        .bind(system_id.as_str())
        .bind(micros(from))
        .bind(micros(to))
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
        let mut conn = self.db.reader().await?;
        // Only the conditions that apply, so SQLite picks the matching index.
        let check = if check_id.is_some() {
            "AND check_id = $2"
        } else {
            "AND $2 IS NULL"
        };
        let cursor = if after.is_some() {
            "AND (observed_at, run_id) < ($3, $4)"
        } else {
            "AND $3 IS NULL AND $4 IS NULL"
        };
        let rows = sqlx::query(&format!(
            "SELECT {RUN_COLUMNS} FROM runs WHERE system_id = $1 {check} {cursor} \
             ORDER BY observed_at DESC, run_id DESC LIMIT $5"
        ))
        .bind(system_id.as_str())
        .bind(check_id.map(CheckId::as_str))
        .bind(after.map(|c| micros(c.observed_at)))
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
        let mut conn = self.db.reader().await?;
        let rows = sqlx::query(&format!(
            "SELECT {TRANSITION_COLUMNS} FROM transitions \
             WHERE ($1 IS NULL OR system_id = $1) AND ($2 IS NULL OR sequence < $2) \
             ORDER BY sequence DESC LIMIT $3"
        ))
        .bind(system_id.map(SystemId::as_str))
        .bind(before.map(bigint))
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
        let mut conn = self.db.reader().await?;
        let rows = sqlx::query(&format!(
            "SELECT {TRANSITION_COLUMNS} FROM transitions \
             WHERE ($1 IS NULL OR system_id = $1) AND sequence > $2 \
             ORDER BY sequence LIMIT $3"
        ))
        .bind(system_id.map(SystemId::as_str))
        .bind(bigint(after))
        .bind(i64::from(limit))
        .fetch_all(&mut *conn)
        .await?;
        rows.iter().map(transition_from_row).collect()
    }

    /// A page of at most `limit` checks after `after` in key order, each
    /// marked when it has runs observed before `runs_before` that are not
    /// among its newest (see [`super::retention`]). Read on a reader
    /// connection: finding what to delete never holds the writer.
    pub(crate) async fn retention_checks(
        &self,
        after: &(String, String),
        limit: u32,
        runs_before: DateTime<Utc>,
    ) -> Result<Vec<CheckCandidate>> {
        let mut conn = self.db.reader().await?;
        let rows = sqlx::query(
            "SELECT p.system_id, p.check_id, \
                    CASE WHEN p.oldest < $3 THEN ( \
                        SELECT 1 FROM runs k WHERE k.system_id = p.system_id AND k.check_id = p.check_id \
                        LIMIT 1 OFFSET $4) IS NOT NULL \
                    ELSE 0 END AS prunable \
             FROM (SELECT c.system_id, c.check_id, \
                          (SELECT min(o.observed_at) FROM runs o \
                           WHERE o.system_id = c.system_id AND o.check_id = c.check_id) AS oldest \
                   FROM checks c WHERE (c.system_id, c.check_id) > ($1, $2) \
                   ORDER BY c.system_id, c.check_id LIMIT $5) p \
             ORDER BY p.system_id, p.check_id",
        )
        .bind(after.0.as_str())
        .bind(after.1.as_str())
        .bind(micros(runs_before))
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
    /// check's index. Returns how many went and how long the writer was held.
    pub(crate) async fn delete_old_runs(
        &self,
        system_id: &str,
        check_id: &str,
        runs_before: DateTime<Utc>,
        batch: u32,
    ) -> Result<(u64, Duration)> {
        let mut conn = self.db.writer().await?;
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
        .bind(micros(runs_before))
        .bind(RUNS_KEPT)
        .bind(i64::from(batch))
        .execute(&mut *conn)
        .await?
        .rows_affected();
        Ok((deleted, started.elapsed()))
    }

    /// A page of at most `limit` systems after `after` in key order, each with
    /// its newest transition's sequence when its oldest transition was
    /// recorded before `transitions_before` and is not that newest one. Read
    /// on a reader connection.
    pub(crate) async fn retention_systems(
        &self,
        after: &str,
        limit: u32,
        transitions_before: DateTime<Utc>,
    ) -> Result<Vec<SystemCandidate>> {
        let mut conn = self.db.reader().await?;
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
        .bind(micros(transitions_before))
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
    /// writer was held.
    pub(crate) async fn delete_old_transitions(
        &self,
        system_id: &str,
        below: i64,
        transitions_before: DateTime<Utc>,
        batch: u32,
    ) -> Result<(u64, Duration)> {
        let mut conn = self.db.writer().await?;
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
        .bind(micros(transitions_before))
        .bind(i64::from(batch))
        .execute(&mut *conn)
        .await?
        .rows_affected();
        Ok((deleted, started.elapsed()))
    }
}

/// Reads a system and its checks on `conn`.
async fn system_in(conn: &mut SqliteConnection, system_id: &str) -> Result<Option<SystemRecord>> {
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
    let now = now();
    let windows = sqlx::query(
        "SELECT starts_at, ends_at, reason FROM maintenance_windows \
         WHERE system_id = $1 AND ends_at > $2 ORDER BY starts_at",
    )
    .bind(system_id)
    .bind(micros(now))
    .fetch_all(&mut *conn)
    .await?;
    let maintenance_windows: Vec<MaintenanceWindow> = windows.iter().map(window_from_row).collect::<Result<_>>()?;
    let depends_on: Vec<String> =
        sqlx::query_scalar("SELECT depends_on FROM system_dependencies WHERE system_id = $1 ORDER BY depends_on")
            .bind(system_id)
            .fetch_all(&mut *conn)
            .await?;
    Ok(Some(SystemRecord {
        depends_on,
        system_id: system_id.to_owned(),
        status: status_of(system.try_get("status")?)?,
        checks: checks.iter().map(check_from_row).collect::<Result<_>>()?,
        evaluated_at: Some(time_of(system.try_get("evaluated_at")?)?),
        in_maintenance: maintenance_windows.iter().any(|w| w.is_open_at(now)),
        maintenance_windows,
    }))
}

fn window_from_row(row: &SqliteRow) -> Result<MaintenanceWindow> {
    Ok(MaintenanceWindow {
        starts_at: time_of(row.try_get("starts_at")?)?,
        ends_at: time_of(row.try_get("ends_at")?)?,
        reason: row.try_get("reason")?,
    })
}

/// The transition `run` caused, if it caused one and it is still kept.
/// A transition written with the run has the run's `recorded_at` (one `now`
/// for the whole transaction); an older one under the same id belongs to a
/// run that retention deleted before the id was used again.
async fn transition_caused_by(conn: &mut SqliteConnection, run: &Run) -> Result<Option<Transition>> {
    let row = sqlx::query(&format!(
        "SELECT {TRANSITION_COLUMNS} FROM transitions WHERE system_id = $1 AND run_id = $2 AND transitioned_at >= $3 \
         ORDER BY sequence DESC LIMIT 1"
    ))
    .bind(run.system_id.as_str())
    .bind(run.run_id.as_str())
    .bind(micros(run.recorded_at))
    .fetch_optional(&mut *conn)
    .await?;
    row.as_ref().map(transition_from_row).transpose()
}

/// What a write reads of a system (see the PostgreSQL store's
/// `LOAD_SYSTEM`): its status and version, every check (the pipeline sorts
/// them), the run window of check `$2` only.
const LOAD_SYSTEM: &str = "SELECT s.status AS system_status, s.version, s.announced_status, \
        c.check_id, c.thresholds, c.enabled, c.status, c.evaluation, c.runs_considered, c.last_run_at, \
        c.flapping_settings, c.flapping, \
        CASE WHEN c.check_id = $2 THEN c.run_window END AS run_window \
    FROM systems s LEFT JOIN checks c ON c.system_id = s.system_id \
    WHERE s.system_id = $1";

/// The flags of a transition of `system_id` from `from` to `to` written at
/// `at` (see the PostgreSQL store's `WRITE_SYSTEM`): whether a maintenance
/// window is open then (unless the transition `resolves`), and, when the
/// status got worse, the dependencies that are non-healthy.
async fn flags_of(
    tx: &mut sqlx::Transaction<'static, sqlx::Sqlite>,
    system_id: &SystemId,
    from: Status,
    to: Status,
    resolves: bool,
    at: DateTime<Utc>,
) -> Result<(bool, Vec<String>)> {
    let in_maintenance = !resolves
        && sqlx::query_scalar::<_, bool>(
            "SELECT EXISTS (SELECT 1 FROM maintenance_windows \
             WHERE system_id = $1 AND starts_at <= $2 AND ends_at > $2)",
        )
        .bind(system_id.as_str())
        .bind(micros(at))
        .fetch_one(&mut **tx)
        .await?;
    let caused_by = if to > from {
        sqlx::query_scalar(
            "SELECT d.depends_on FROM system_dependencies d JOIN systems x ON x.system_id = d.depends_on \
             WHERE d.system_id = $1 AND x.status <> 1 ORDER BY d.depends_on",
        )
        .bind(system_id.as_str())
        .fetch_all(&mut **tx)
        .await?
    } else {
        Vec::new()
    };
    Ok((in_maintenance, caused_by))
}

/// A transition as the embedded store inserts it.
struct TransitionRow<'a> {
    system_id: &'a str,
    check_id: &'a str,
    from: Status,
    to: Status,
    at: DateTime<Utc>,
    evaluation: &'a crate::domain::Evaluation,
    run_id: Option<&'a str>,
    in_maintenance: bool,
    flapping: bool,
    caused_by: &'a [String],
    check_deleted: bool,
}

impl TransitionRow<'_> {
    /// Inserts it with the next sequence: one writer, so max + 1 inside its
    /// transaction commits in order.
    async fn insert(&self, tx: &mut sqlx::Transaction<'static, sqlx::Sqlite>) -> Result<u64> {
        let sequence: i64 = sqlx::query_scalar(
            "INSERT INTO transitions \
                 (sequence, system_id, check_id, from_status, to_status, transitioned_at, evaluation, run_id, \
                  in_maintenance, flapping, caused_by, check_deleted) \
             SELECT coalesce(max(sequence), 0) + 1, $1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11 FROM transitions \
             RETURNING sequence",
        )
        .bind(self.system_id)
        .bind(self.check_id)
        .bind(self.from.as_i16())
        .bind(self.to.as_i16())
        .bind(micros(self.at))
        .bind(encode_evaluation(self.evaluation))
        .bind(self.run_id)
        .bind(self.in_maintenance)
        .bind(self.flapping)
        .bind(super::codec::encode_ids(self.caused_by))
        .bind(self.check_deleted)
        .fetch_one(&mut **tx)
        .await?;
        Ok(u64::try_from(sequence).unwrap_or(0))
    }
}

impl Statements for SqliteStore {
    /// The writer connection's `BEGIN IMMEDIATE` transaction: nothing else
    /// commits between its load and its commit.
    type Unit = sqlx::Transaction<'static, sqlx::Sqlite>;

    async fn begin(&self) -> Result<Self::Unit> {
        self.db.begin_write().await
    }

    async fn load(&self, tx: &mut Self::Unit, system_id: &SystemId, check_id: &CheckId) -> Result<Loaded> {
        let rows = sqlx::query(LOAD_SYSTEM)
            .bind(system_id.as_str())
            .bind(check_id.as_str())
            .fetch_all(&mut **tx)
            .await?;
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

    async fn write(&self, tx: &mut Self::Unit, write: &Write<'_>) -> Result<Written> {
        let now = now();
        let check = write.check;
        // The run first: a run id already stored ends the write before
        // anything else was written (the caller rolls back in any case).
        if let Some(run) = write.run {
            let inserted = sqlx::query(
                "INSERT INTO runs (run_id, system_id, check_id, status, observed_at, latency_us, message, recorded_at) \
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
            )
            .bind(run.run_id.as_str())
            .bind(write.system_id.as_str())
            .bind(check.check_id.as_str())
            .bind(run.status.as_i16())
            .bind(micros(run.observed_at))
            .bind(run.latency_us())
            .bind(run.message.as_str())
            .bind(micros(now))
            .execute(&mut **tx)
            .await;
            match inserted {
                Ok(_) => {}
                Err(err) if err.as_database_error().is_some_and(|db| db.is_unique_violation()) => {
                    return Ok(Written::RunIdTaken);
                }
                Err(err) => return Err(err.into()),
            }
        }
        let flags = match write.transition_from {
            Some(from) => Some(flags_of(tx, write.system_id, from, write.status, write.resolves, now).await?),
            None => None,
        };
        let announced = flags
            .as_ref()
            .filter(|(in_maintenance, _)| !in_maintenance && !write.flapping)
            .map(|_| write.status.as_i16());
        let applied = sqlx::query(
            "INSERT INTO systems (system_id, status, evaluated_at, version, created_at, announced_status) \
             VALUES ($1, $2, $3, 1, $3, coalesce($5, 1)) \
             ON CONFLICT (system_id) DO UPDATE \
                 SET status = excluded.status, evaluated_at = excluded.evaluated_at, version = systems.version + 1, \
                     announced_status = coalesce($5, systems.announced_status) \
                 WHERE systems.version = $4 \
             RETURNING version",
        )
        .bind(write.system_id.as_str())
        .bind(write.status.as_i16())
        .bind(micros(now))
        .bind(write.loaded_version)
        .bind(announced)
        .fetch_optional(&mut **tx)
        .await?;
        if applied.is_none() {
            return Ok(Written::Stale);
        }
        sqlx::query(
            "INSERT INTO checks (system_id, check_id, thresholds, enabled, status, evaluation, runs_considered, \
                                 last_run_at, run_window, updated_at, flapping_settings, flapping) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12) \
             ON CONFLICT (system_id, check_id) DO UPDATE \
                 SET thresholds = excluded.thresholds, enabled = excluded.enabled, status = excluded.status, \
                     evaluation = excluded.evaluation, runs_considered = excluded.runs_considered, \
                     last_run_at = excluded.last_run_at, run_window = excluded.run_window, \
                     updated_at = excluded.updated_at, flapping_settings = excluded.flapping_settings, \
                     flapping = excluded.flapping",
        )
        .bind(write.system_id.as_str())
        .bind(check.check_id.as_str())
        .bind(encode_thresholds(&check.thresholds))
        .bind(check.enabled)
        .bind(check.evaluation.status.as_i16())
        .bind(encode_evaluation(&check.evaluation))
        .bind(i64::from(check.runs_considered))
        .bind(check.last_run_at.map(micros))
        .bind(encode_window(write.window))
        .bind(micros(now))
        .bind(encode_flapping(check.flapping_settings.as_ref()))
        .bind(check.flapping)
        .execute(&mut **tx)
        .await?;
        let (sequence, in_maintenance, caused_by) = match (write.transition_from, flags) {
            (Some(from), Some((in_maintenance, caused_by))) => {
                let record = TransitionRow {
                    system_id: write.system_id.as_str(),
                    check_id: check.check_id.as_str(),
                    from,
                    to: write.status,
                    at: now,
                    evaluation: &check.evaluation,
                    run_id: write.run.map(|r| r.run_id.as_str()),
                    in_maintenance,
                    flapping: write.flapping,
                    caused_by: &caused_by,
                    check_deleted: false,
                };
                (Some(record.insert(tx).await?), in_maintenance, caused_by)
            }
            _ => (None, false, Vec::new()),
        };
        Ok(Written::Applied {
            at: now,
            sequence,
            flags: Flags {
                in_maintenance,
                caused_by,
            },
        })
    }

    async fn remove_check(&self, tx: &mut Self::Unit, removal: &Removal<'_>) -> Result<Written> {
        let now = now();
        let flags = match removal.transition_from {
            Some(from) => Some(flags_of(tx, removal.system_id, from, removal.status, removal.resolves, now).await?),
            None => None,
        };
        let announced = flags
            .as_ref()
            .filter(|(in_maintenance, _)| !in_maintenance)
            .map(|_| removal.status.as_i16());
        let applied = sqlx::query(
            "UPDATE systems SET status = $2, evaluated_at = $3, version = version + 1, \
                 announced_status = coalesce($5, announced_status) \
             WHERE system_id = $1 AND version = $4",
        )
        .bind(removal.system_id.as_str())
        .bind(removal.status.as_i16())
        .bind(micros(now))
        .bind(removal.loaded_version)
        .bind(announced)
        .execute(&mut **tx)
        .await?;
        if applied.rows_affected() == 0 {
            return Ok(Written::Stale);
        }
        for table in ["checks", "runs"] {
            sqlx::query(&format!("DELETE FROM {table} WHERE system_id = $1 AND check_id = $2"))
                .bind(removal.system_id.as_str())
                .bind(removal.check_id)
                .execute(&mut **tx)
                .await?;
        }
        let (sequence, in_maintenance, caused_by) = match (removal.transition_from, flags) {
            (Some(from), Some((in_maintenance, caused_by))) => {
                let record = TransitionRow {
                    system_id: removal.system_id.as_str(),
                    check_id: removal.check_id,
                    from,
                    to: removal.status,
                    at: now,
                    evaluation: removal.evaluation,
                    run_id: None,
                    in_maintenance,
                    flapping: false,
                    caused_by: &caused_by,
                    check_deleted: true,
                };
                (Some(record.insert(tx).await?), in_maintenance, caused_by)
            }
            _ => (None, false, Vec::new()),
        };
        Ok(Written::Applied {
            at: now,
            sequence,
            flags: Flags {
                in_maintenance,
                caused_by,
            },
        })
    }

    async fn commit(&self, tx: Self::Unit, wrote_transition: bool) -> Result<()> {
        tx.commit().await?;
        if wrote_transition {
            self.notifier.notify();
        }
        Ok(())
    }

    async fn stored_run(&self, tx: &mut Self::Unit, system_id: &SystemId, run_id: &RunId) -> Result<Option<Run>> {
        let row = sqlx::query(&format!(
            "SELECT {RUN_COLUMNS} FROM runs WHERE system_id = $1 AND run_id = $2"
        ))
        .bind(system_id.as_str())
        .bind(run_id.as_str())
        .fetch_optional(&mut **tx)
        .await?;
        row.as_ref().map(run_from_row).transpose()
    }

    async fn system(&self, tx: &mut Self::Unit, system_id: &str) -> Result<Option<SystemRecord>> {
        system_in(tx, system_id).await
    }

    async fn transition_caused_by(&self, tx: &mut Self::Unit, run: &Run) -> Result<Option<Transition>> {
        transition_caused_by(tx, run).await
    }

    fn lost_before_writing(&self, _err: &Error) -> bool {
        // A local file: nothing to reconnect to.
        false
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use crate::{config::Config, domain::RunMessage, store::TransitionNotifier};

    async fn store(dir: &tempfile::TempDir) -> (SqliteStore, EmbeddedDb) {
        let url = format!("--database-url=sqlite://{}/vitals.db", dir.path().display());
        let db = EmbeddedDb::open(&Config::from_flags([url]).unwrap()).await.unwrap();
        (SqliteStore::new(db.clone(), TransitionNotifier::default()), db)
    }

    fn run(run_id: &str, check: &str, status: Status, observed_at: DateTime<Utc>) -> NewRun {
        NewRun {
            run_id: RunId::parse("run_id", run_id.to_owned()).unwrap(),
            system_id: SystemId::parse("system_id", "sys".to_owned()).unwrap(),
            check_id: CheckId::parse("check_id", check.to_owned()).unwrap(),
            status,
            observed_at,
            observed_at_given: true,
            latency: None,
            message: RunMessage::parse("message", String::new()).unwrap(),
        }
    }

    #[tokio::test]
    async fn times_round_trip_at_microsecond_precision() {
        let dir = tempfile::tempdir().unwrap();
        let (store, db) = store(&dir).await;
        let at = DateTime::from_timestamp_micros(1_700_000_000_123_456).unwrap();
        let outcome = store
            .submit_run(&run("r", "c", Status::Degraded, at), &WriteRules::default())
            .await
            .unwrap();
        assert_eq!(outcome.run.observed_at, at);
        let system = SystemId::parse("system_id", "sys".to_owned()).unwrap();
        let stored = store.list_runs(&system, None, None, 10).await.unwrap();
        assert_eq!(stored, [outcome.run]);
        db.close().await;
    }
}
