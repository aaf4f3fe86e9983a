//! Persistence of runs, checks, system health and transitions.
//!
//! The records here are what the API layer converts to and from the wire.
//! [`Store`] is the one interface the use cases ([`crate::service`]) use; the SQL lives in its two
//! implementations, [`postgres`] and the embedded [`sqlite`]. Every write that
//! can change a system's status runs inside that system's lock, taken by the
//! caller through [`crate::lock`] before the store takes a work connection,
//! and follows the one write path of `pipeline` (load, decide with
//! [`crate::domain`], write), whose statements are all that the backends
//! implement differently.
//! [`feed`] reads new transitions once per replica and hands them to
//! WatchTransitions' watchers. [`retention`] deletes old runs and transitions
//! in short steps that a shutdown can stop between.

mod codec;
pub mod feed;
mod pipeline;
pub mod postgres;
pub mod retention;
pub mod sqlite;

use std::time::Duration;

use crate::{
    db::Database,
    domain::{
        CheckId, Evaluation, FlappingSettings, Latency, MaintenanceWindow, Namespace, RunId, RunMessage, Span, Status,
        StatusChange, SystemId, Thresholds, prefix_end,
    },
    error::{Error, Result},
};
use chrono::{DateTime, Utc};

pub use feed::{FeedStats, Subscription, TransitionFeed, TransitionNotifier, WatchLimits};
pub use pipeline::WriteRules;
pub use postgres::{PgStore, WriteGroups};
pub use retention::{PassStats, RetentionPass, TRANSITION_RETENTION};
pub use sqlite::SqliteStore;

/// The store of one vitals process: the same operations on either backend.
#[derive(Debug, Clone)]
pub enum Store {
    /// PostgreSQL, on the work pool.
    Postgres(PgStore),
    /// The embedded SQLite store.
    Embedded(SqliteStore),
}

impl Store {
    /// The store of `database`. The embedded store wakes the feed through
    /// `notifier` after each commit that wrote a transition; PostgreSQL's
    /// commits wake every replica's feed through `NOTIFY`.
    pub fn open(database: &Database, notifier: TransitionNotifier) -> Store {
        match database {
            Database::Postgres(pools) => Store::Postgres(PgStore::new(pools.work.clone())),
            Database::Embedded(db) => Store::Embedded(SqliteStore::new(db.clone(), notifier)),
        }
    }

    /// What PostgreSQL's groups of writes did since the store was opened
    /// (the embedded store writes one at a time: none).
    pub fn write_groups(&self) -> WriteGroups {
        match self {
            Store::Postgres(s) => s.write_groups(),
            Store::Embedded(_) => WriteGroups::default(),
        }
    }

    /// Writes waiting for a group to take them (PostgreSQL).
    pub fn writes_waiting(&self) -> usize {
        match self {
            Store::Postgres(s) => s.writes_waiting(),
            Store::Embedded(_) => 0,
        }
    }

    /// How many reads of transitions after a sequence (the feed's, and
    /// watchers' replays) this store ran since it was opened.
    pub fn transition_reads(&self) -> u64 {
        match self {
            Store::Postgres(s) => s.transition_reads(),
            Store::Embedded(s) => s.transition_reads(),
        }
    }

    /// Records a run and re-evaluates its check and system, within `rules`.
    /// The caller holds the system's lock.
    pub async fn submit_run(&self, new: &NewRun, rules: &WriteRules) -> Result<SubmitOutcome> {
        match self {
            Store::Postgres(s) => s.submit_run(new, rules).await,
            Store::Embedded(s) => s.submit_run(new, rules).await,
        }
    }

    /// Creates or updates a check and re-evaluates its system, within
    /// `rules`. The caller holds the system's lock.
    pub async fn configure_check(&self, update: &CheckUpdate, rules: &WriteRules) -> Result<ConfigureOutcome> {
        match self {
            Store::Postgres(s) => s.configure_check(update, rules).await,
            Store::Embedded(s) => s.configure_check(update, rules).await,
        }
    }

    /// The stored health of a system, or `None` if it has never been seen.
    pub async fn system(&self, system_id: &SystemId) -> Result<Option<SystemRecord>> {
        match self {
            Store::Postgres(s) => s.system(system_id).await,
            Store::Embedded(s) => s.system(system_id).await,
        }
    }

    /// How many systems have each status, for `vitals_systems`: one short
    /// read of the systems table.
    pub async fn count_systems(&self) -> Result<Vec<(Status, u64)>> {
        match self {
            Store::Postgres(s) => s.count_systems().await,
            Store::Embedded(s) => s.count_systems().await,
        }
    }

    /// One page of systems in byte order of their ids, after `after`, with
    /// `status` (any when `None`), ids starting with `prefix` and in
    /// `visible` (filtered before the page is cut, so it is full).
    pub async fn list_systems(
        &self,
        status: Option<Status>,
        prefix: &str,
        visible: &Namespace,
        after: Option<&str>,
        limit: u32,
    ) -> Result<Vec<SystemSummary>> {
        match self {
            Store::Postgres(s) => s.list_systems(status, prefix, visible, after, limit).await,
            Store::Embedded(s) => s.list_systems(status, prefix, visible, after, limit).await,
        }
    }

    /// Deletes a check and its runs and re-evaluates its system. The caller
    /// holds the system's lock.
    pub async fn delete_check(&self, system_id: &SystemId, check_id: &CheckId) -> Result<DeleteCheckOutcome> {
        match self {
            Store::Postgres(s) => s.delete_check(system_id, check_id).await,
            Store::Embedded(s) => s.delete_check(system_id, check_id).await,
        }
    }

    /// Deletes a system with its runs, checks, maintenance windows and
    /// dependencies; its transitions stay. True when it existed. The caller
    /// holds the system's lock.
    pub async fn delete_system(&self, system_id: &SystemId) -> Result<bool> {
        match self {
            Store::Postgres(s) => s.delete_system(system_id).await,
            Store::Embedded(s) => s.delete_system(system_id).await,
        }
    }

    /// Adds `window` to the system's maintenance windows, merged with those
    /// it meets, creating the system if needed; the window as stored and the
    /// system after. The caller holds the system's lock.
    pub async fn set_maintenance(
        &self,
        system_id: &SystemId,
        window: MaintenanceWindow,
    ) -> Result<(MaintenanceWindow, SystemRecord)> {
        match self {
            Store::Postgres(s) => s.set_maintenance(system_id, window).await,
            Store::Embedded(s) => s.set_maintenance(system_id, window).await,
        }
    }

    /// Ends the system's open window now and removes its upcoming ones; how
    /// many, and the system after (`None`: no such system). The caller holds
    /// the system's lock.
    pub async fn clear_maintenance(&self, system_id: &SystemId) -> Result<(u32, Option<SystemRecord>)> {
        match self {
            Store::Postgres(s) => s.clear_maintenance(system_id).await,
            Store::Embedded(s) => s.clear_maintenance(system_id).await,
        }
    }

    /// Replaces what a system depends on (creating the system if needed),
    /// refusing a cycle; the system after. Serialised against every other
    /// such change, so two changes can never close a cycle together.
    pub async fn configure_system(&self, system_id: &SystemId, depends_on: &[SystemId]) -> Result<SystemRecord> {
        match self {
            Store::Postgres(s) => s.configure_system(system_id, depends_on).await,
            Store::Embedded(s) => s.configure_system(system_id, depends_on).await,
        }
    }

    /// When a system was first written and its status now; `None` for an
    /// unknown system.
    pub async fn system_origin(&self, system_id: &SystemId) -> Result<Option<(DateTime<Utc>, Status)>> {
        match self {
            Store::Postgres(s) => s.system_origin(system_id).await,
            Store::Embedded(s) => s.system_origin(system_id).await,
        }
    }

    /// A page of a system's transitions for uptime, in sequence order: with
    /// `after` `None`, the newest recorded at or before `from` (if any), then
    /// those recorded after `from`; with `after`, those after that sequence
    /// recorded after `from`.
    pub async fn status_changes(
        &self,
        system_id: &SystemId,
        from: DateTime<Utc>,
        after: Option<u64>,
        limit: u32,
    ) -> Result<Vec<(u64, StatusChange)>> {
        match self {
            Store::Postgres(s) => s.status_changes(system_id, from, after, limit).await,
            Store::Embedded(s) => s.status_changes(system_id, from, after, limit).await,
        }
    }

    /// A system's maintenance windows that overlap `[from, to)`, at most
    /// `limit`.
    pub async fn windows_between(
        &self,
        system_id: &SystemId,
        from: DateTime<Utc>,
        to: DateTime<Utc>,
        limit: u32,
    ) -> Result<Vec<MaintenanceWindow>> {
        match self {
            Store::Postgres(s) => s.windows_between(system_id, from, to, limit).await,
            Store::Embedded(s) => s.windows_between(system_id, from, to, limit).await,
        }
    }

    /// One page of a system's runs, newest first, after `cursor`.
    pub async fn list_runs(
        &self,
        system_id: &SystemId,
        check_id: Option<&CheckId>,
        after: Option<&RunCursor>,
        limit: u32,
    ) -> Result<Vec<Run>> {
        match self {
            Store::Postgres(s) => s.list_runs(system_id, check_id, after, limit).await,
            Store::Embedded(s) => s.list_runs(system_id, check_id, after, limit).await,
        }
    }

    /// One page of transitions, highest sequence first, below `before`.
    pub async fn list_transitions(
        &self,
        system_id: Option<&SystemId>,
        before: Option<u64>,
        limit: u32,
    ) -> Result<Vec<Transition>> {
        match self {
            Store::Postgres(s) => s.list_transitions(system_id, before, limit).await,
            Store::Embedded(s) => s.list_transitions(system_id, before, limit).await,
        }
    }

    /// Transitions with a sequence above `after`, in sequence order.
    pub async fn transitions_after(
        &self,
        system_id: Option<&SystemId>,
        after: u64,
        limit: u32,
    ) -> Result<Vec<Transition>> {
        match self {
            Store::Postgres(s) => s.transitions_after(system_id, after, limit).await,
            Store::Embedded(s) => s.transitions_after(system_id, after, limit).await,
        }
    }
}

/// A run as submitted, validated.
#[derive(Debug, Clone)]
pub struct NewRun {
    /// The idempotency key.
    pub run_id: RunId,
    /// The system.
    pub system_id: SystemId,
    /// The check.
    pub check_id: CheckId,
    /// Outcome.
    pub status: Status,
    /// When it ran, truncated to microseconds (the database's precision).
    pub observed_at: DateTime<Utc>,
    /// False when the server filled in `observed_at`: a retry of such a request
    /// carries another "now" and must still count as the same run.
    pub observed_at_given: bool,
    /// How long it took, at the stored precision: what is stored, replied
    /// and compared with a retry is this one value.
    pub latency: Option<Latency>,
    /// Free text.
    pub message: RunMessage,
}

impl NewRun {
    /// The run as stored, once the database recorded it at `recorded_at`.
    pub(crate) fn recorded(&self, recorded_at: DateTime<Utc>) -> Run {
        Run {
            run_id: self.run_id.as_str().to_owned(),
            system_id: self.system_id.as_str().to_owned(),
            check_id: self.check_id.as_str().to_owned(),
            status: self.status,
            observed_at: self.observed_at,
            latency: self.latency.map(Latency::duration),
            message: self.message.as_str().to_owned(),
            recorded_at,
        }
    }

    /// The latency in the database's unit.
    pub(crate) fn latency_us(&self) -> Option<i64> {
        self.latency.map(Latency::as_micros)
    }

    /// True when `stored` (found under this run's id) has this run's content.
    fn matches(&self, stored: &Run) -> bool {
        stored.system_id == self.system_id.as_str()
            && stored.check_id == self.check_id.as_str()
            && stored.status == self.status
            && (!self.observed_at_given || stored.observed_at == self.observed_at)
            && stored.latency == self.latency.map(Latency::duration)
            && stored.message == self.message.as_str()
    }

    /// The outcome of submitting this run again, given what is stored under
    /// its id, its system's stored health and the transition the stored run
    /// caused: a duplicate, changing nothing, or `RUN_CONFLICT` when the id
    /// was reused for other content.
    ///
    /// The duplicate carries that transition because the first reply may
    /// never have arrived (a connection lost during COMMIT answers
    /// UNAVAILABLE for a run that committed): the retry is then the caller's
    /// only way to learn of the change its run caused.
    pub(crate) fn resubmitted(
        &self,
        stored: Run,
        health: Option<SystemRecord>,
        transition: Option<Transition>,
    ) -> Result<SubmitOutcome> {
        if !self.matches(&stored) {
            return Err(Error::RunConflict {
                run_id: self.run_id.as_str().to_owned(),
            });
        }
        Ok(SubmitOutcome {
            run: stored,
            health: health.unwrap_or_else(|| SystemRecord::unknown(self.system_id.as_str())),
            transition,
            duplicate: true,
        })
    }
}

/// A stored run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Run {
    /// Unique id.
    pub run_id: String,
    /// The system.
    pub system_id: String,
    /// The check.
    pub check_id: String,
    /// Outcome.
    pub status: Status,
    /// When it ran.
    pub observed_at: DateTime<Utc>,
    /// How long it took.
    pub latency: Option<Duration>,
    /// Free text.
    pub message: String,
    /// When it was stored.
    pub recorded_at: DateTime<Utc>,
}

/// The stored state of one check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckRecord {
    /// The check.
    pub check_id: String,
    /// Its thresholds.
    pub thresholds: Thresholds,
    /// Whether it counts towards the system's status.
    pub enabled: bool,
    /// Its last evaluation.
    pub evaluation: Evaluation,
    /// Stored runs the evaluation was given (at most 100).
    pub runs_considered: u32,
    /// observed_at of its newest run.
    pub last_run_at: Option<DateTime<Utc>>,
    /// Its flapping detection; `None` when off.
    pub flapping_settings: Option<FlappingSettings>,
    /// Whether it flaps now (always false with detection off).
    pub flapping: bool,
}

/// The stored health of a system.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SystemRecord {
    /// The system.
    pub system_id: String,
    /// Worst status of its enabled checks.
    pub status: Status,
    /// All its checks, ordered by check_id.
    pub checks: Vec<CheckRecord>,
    /// When it was last evaluated.
    pub evaluated_at: Option<DateTime<Utc>>,
    /// Its open and upcoming maintenance windows, by start; empty in the
    /// outcomes of the write path, which reads none.
    pub maintenance_windows: Vec<MaintenanceWindow>,
    /// One of `maintenance_windows` is open now.
    pub in_maintenance: bool,
    /// What it depends on, in byte order; empty in the outcomes of the
    /// write path, as `maintenance_windows`.
    pub depends_on: Vec<String>,
}

impl SystemRecord {
    /// The health of a system not stored yet: no checks, so healthy.
    pub(crate) fn unknown(system_id: &str) -> SystemRecord {
        SystemRecord {
            system_id: system_id.to_owned(),
            status: Status::Healthy,
            checks: Vec::new(),
            evaluated_at: None,
            maintenance_windows: Vec::new(),
            in_maintenance: false,
            depends_on: Vec::new(),
        }
    }
}

/// A stored change of a system's status.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Transition {
    /// Global, strictly increasing position.
    pub sequence: u64,
    /// The system.
    pub system_id: String,
    /// The check that caused it.
    pub check_id: String,
    /// Status before.
    pub from: Status,
    /// Status after.
    pub to: Status,
    /// When it was recorded.
    pub transitioned_at: DateTime<Utc>,
    /// The causing check's evaluation.
    pub evaluation: Evaluation,
    /// Written while a maintenance window of the system was open (and not
    /// the recovery that resolves an announced problem).
    pub in_maintenance: bool,
    /// Written while the causing check was flapping (and not the recovery
    /// that resolves an announced problem).
    pub flapping: bool,
    /// The system's dependencies that were already non-healthy when it
    /// became worse; empty otherwise.
    pub caused_by: Vec<String>,
    /// Caused by deleting the check.
    pub check_deleted: bool,
}

/// What SubmitRun did.
#[derive(Debug, Clone)]
pub struct SubmitOutcome {
    /// The stored run.
    pub run: Run,
    /// The system's health after the run.
    pub health: SystemRecord,
    /// Set when the run changed the system's status (for a duplicate: when
    /// the stored run did, and that transition is still kept).
    pub transition: Option<Transition>,
    /// True when the run was already stored; nothing was written.
    pub duplicate: bool,
}

/// A change to a check's configuration.
#[derive(Debug, Clone)]
pub struct CheckUpdate {
    /// The system.
    pub system_id: SystemId,
    /// The check.
    pub check_id: CheckId,
    /// New thresholds, or keep.
    pub thresholds: Option<Thresholds>,
    /// New enabled flag, or keep.
    pub enabled: Option<bool>,
    /// New flapping detection (`Some(None)`: off), or keep.
    pub flapping: Option<Option<FlappingSettings>>,
}

/// What ConfigureCheck did.
#[derive(Debug, Clone)]
pub struct ConfigureOutcome {
    /// The check after the change.
    pub check: CheckRecord,
    /// The system after the change.
    pub health: SystemRecord,
    /// Set when the system's status changed.
    pub transition: Option<Transition>,
}

/// `INVALID_ARGUMENT` on `depends_on` when `system_id` depending on
/// `depends_on` closes a cycle, given the other dependencies `edges`
/// (system, what it depends on).
pub(crate) fn refuse_cycle(system_id: &SystemId, depends_on: &[SystemId], edges: Vec<(String, String)>) -> Result<()> {
    let mut graph: std::collections::BTreeMap<String, Vec<String>> = std::collections::BTreeMap::new();
    for (from, to) in edges {
        graph.entry(from).or_default().push(to);
    }
    let wanted: Vec<String> = depends_on.iter().map(|d| d.as_str().to_owned()).collect();
    match crate::domain::find_cycle(system_id.as_str(), &wanted, &graph) {
        None => Ok(()),
        Some(cycle) => Err(Error::invalid(
            "depends_on",
            format!("would close a dependency cycle: {}", cycle.join(", ")),
        )),
    }
}

/// One row of ListSystems.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SystemSummary {
    /// The system.
    pub system_id: String,
    /// Its stored status.
    pub status: Status,
    /// How many checks it has.
    pub check_count: u32,
    /// observed_at of the newest run of any of its checks.
    pub last_run_at: Option<DateTime<Utc>>,
    /// A maintenance window of it is open now.
    pub in_maintenance: bool,
    /// One of its enabled checks flaps.
    pub flapping: bool,
    /// When it was last evaluated.
    pub evaluated_at: DateTime<Utc>,
}

/// What DeleteCheck did.
#[derive(Debug, Clone)]
pub struct DeleteCheckOutcome {
    /// True when the check existed.
    pub deleted: bool,
    /// The system after the deletion; `None` when it does not exist.
    pub health: Option<SystemRecord>,
    /// Set when the system's status changed.
    pub transition: Option<Transition>,
}

/// Position after the last run of a page: runs are ordered newest first by
/// (observed_at, run_id).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunCursor {
    /// observed_at of the last run returned.
    pub observed_at: DateTime<Utc>,
    /// run_id of the last run returned.
    pub run_id: String,
}

/// A listing over `spans` as `UNION ALL` of one `branch` per span, each
/// given the span's condition on `column` (which an index on `column` ranges
/// over, in byte order: `COLLATE "C"` in PostgreSQL, SQLite's default), with
/// parameters numbered from `$first`; and the values they bind, in order.
fn span_union(
    spans: &[Span<'_>],
    column: &str,
    first: usize,
    branch: impl Fn(&str) -> String,
) -> (String, Vec<String>) {
    let (conditions, values) = span_conditions(spans, column, first);
    let union = conditions
        .iter()
        .map(|c| branch(c))
        .collect::<Vec<_>>()
        .join(" UNION ALL ");
    (union, values)
}

/// The condition of each span of [`span_union`], and the values they bind.
fn span_conditions(spans: &[Span<'_>], column: &str, first: usize) -> (Vec<String>, Vec<String>) {
    let mut n = first;
    let mut conditions = Vec::with_capacity(spans.len());
    let mut values = Vec::new();
    for span in spans {
        match span {
            Span::Name(name) => {
                conditions.push(format!("{column} = ${n}"));
                values.push((*name).to_owned());
                n += 1;
            }
            Span::Prefix(prefix) => match prefix_end(prefix) {
                Some(end) => {
                    conditions.push(format!("{column} >= ${n} AND {column} < ${}", n + 1));
                    values.push((*prefix).to_owned());
                    values.push(end);
                    n += 2;
                }
                None => {
                    conditions.push(format!("{column} >= ${n}"));
                    values.push((*prefix).to_owned());
                    n += 1;
                }
            },
        }
    }
    (conditions, values)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_span_is_one_index_range_with_its_values_numbered_in_order() {
        let spans = [Span::Name("a"), Span::Prefix("b/"), Span::Prefix("")];
        let (conditions, values) = span_conditions(&spans, "id", 4);
        assert_eq!(conditions, ["id = $4", "id >= $5 AND id < $6", "id >= $7"]);
        assert_eq!(values, ["a", "b/", "b0", ""]);
        let (union, _) = span_union(&spans[..2], "id", 1, |c| format!("(SELECT id WHERE {c})"));
        assert_eq!(
            union,
            "(SELECT id WHERE id = $1) UNION ALL (SELECT id WHERE id >= $2 AND id < $3)"
        );
    }
}
