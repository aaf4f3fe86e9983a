//! The one write path of both stores: SubmitRun and ConfigureCheck.
//!
//! The caller holds the system's lock (see [`crate::service`]). A write then
//! 1. loads the system: its status and version, every check, and the changed
//!    check's run window ([`Statements::load`]);
//! 2. decides in Rust, with [`crate::domain`]: places the run into the window
//!    (or applies the configuration change), evaluates the check, derives the
//!    system's status from its enabled checks, and whether that status
//!    changed ([`Change`]);
//! 3. writes all of it at once ([`Statements::write`]): the run into the
//!    history, the check, the system and, when the status changed, the
//!    transition.
//!
//! The write is applied only if the system's version is still the one loaded.
//! Under the system's lock it always is; if the lock was lost meanwhile (a
//! holder cancelled while its write was still committing, a lock session that
//! died) the write finds a newer version, changes nothing and the whole path
//! runs again on the newer state, so a transition is neither missed nor
//! recorded twice. A run id that is already stored is recognised from the
//! window (a retry of a recent run) or by the history's key when the write
//! inserts it (any other), and answered from what is stored.
//!
//! The backends implement only the statements, which is where they truly
//! differ: PostgreSQL runs the load and the write as two statements that each
//! commit on their own (the version check makes the pair atomic enough, and
//! it saves the round trips of a transaction's BEGIN and COMMIT); the
//! embedded store runs them in one `BEGIN IMMEDIATE` transaction of its one
//! writer connection.

use std::future::Future;

use chrono::{DateTime, Utc};
use tracing::Instrument;

use super::{
    CheckRecord, CheckUpdate, ConfigureOutcome, DeleteCheckOutcome, NewRun, Run, SubmitOutcome, SystemRecord,
    Transition,
};
use crate::{
    config::{Config, DEFAULT_MAX_CHECKS_PER_SYSTEM},
    domain::{
        CheckId, Evaluation, Placement, RunId, RunWindow, Status, SystemId, Thresholds, WindowRun, evaluate,
        is_flapping, system_status,
    },
    error::{Error, Result},
};

/// How many times a write is planned anew after finding its system changed
/// since it loaded it. Each time, the newer write has committed (the stale
/// one waited for it), so a second attempt succeeds unless yet another write
/// of the same system slipped in without its lock.
const MAX_ATTEMPTS: usize = 4;

/// Limits a write checks before it changes anything.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WriteRules {
    /// The most checks a system may have (`VITALS_MAX_CHECKS_PER_SYSTEM`): a
    /// reply carries every check of its system, and must stay below a
    /// client's message limit.
    pub max_checks_per_system: u32,
}

impl WriteRules {
    /// The limits `config` sets.
    pub fn from_config(config: &Config) -> Self {
        WriteRules {
            max_checks_per_system: config.max_checks_per_system,
        }
    }
}

impl Default for WriteRules {
    /// The limits of a default configuration.
    fn default() -> Self {
        WriteRules {
            max_checks_per_system: DEFAULT_MAX_CHECKS_PER_SYSTEM,
        }
    }
}

/// What a write reads of a system before it decides anything.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Loaded {
    /// The system's stored status and version; `None` for a system never
    /// written.
    pub(crate) system: Option<SystemState>,
    /// Every check of the system; ordered by `check_id` (byte order) once
    /// [`load`] returns it, in any order as [`Statements::load`] does.
    pub(crate) checks: Vec<CheckRecord>,
    /// The run window of the check being written; empty for a new check.
    pub(crate) window: RunWindow,
}

/// A system's stored status and the version it was written at.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct SystemState {
    /// The status the next transition starts from.
    pub(crate) status: Status,
    /// Incremented by every write of the system.
    pub(crate) version: i64,
    /// The status a notifier hiding flagged transitions last saw.
    pub(crate) announced: Status,
}

/// Everything one write stores.
#[derive(Debug)]
pub(crate) struct Write<'a> {
    /// The system.
    pub(crate) system_id: &'a SystemId,
    /// The version loaded; `None` when the system had no row. The write is
    /// applied only if it still is.
    pub(crate) loaded_version: Option<i64>,
    /// The system's status after the write.
    pub(crate) status: Status,
    /// The changed check, as it is after the write.
    pub(crate) check: &'a CheckRecord,
    /// Its run window after the write.
    pub(crate) window: &'a RunWindow,
    /// The run to add to the history (SubmitRun).
    pub(crate) run: Option<&'a NewRun>,
    /// The status before, when the write changes the system's status: a
    /// transition is recorded, caused by `run` if there is one.
    pub(crate) transition_from: Option<Status>,
    /// The transition is the recovery of a status announced as non-healthy:
    /// it carries no flag, whatever window is open or check flaps.
    pub(crate) resolves: bool,
    /// The transition carries `flapping`.
    pub(crate) flapping: bool,
}

/// Everything DeleteCheck stores.
#[derive(Debug)]
pub(crate) struct Removal<'a> {
    /// The system.
    pub(crate) system_id: &'a SystemId,
    /// The check to delete, with its runs.
    pub(crate) check_id: &'a str,
    /// The version loaded; the removal applies only if it still is.
    pub(crate) loaded_version: i64,
    /// The system's status without the check.
    pub(crate) status: Status,
    /// The status before, when removing the check changes it.
    pub(crate) transition_from: Option<Status>,
    /// As for [`Write::resolves`].
    pub(crate) resolves: bool,
    /// The deleted check's last evaluation, for the transition.
    pub(crate) evaluation: &'a Evaluation,
}

/// What a write did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Written {
    /// Everything was written at `at` (the system's `evaluated_at`, the run's
    /// `recorded_at`, the transition's time); `sequence` is the transition's.
    Applied {
        /// The time of the write.
        at: DateTime<Utc>,
        /// The recorded transition's sequence.
        sequence: Option<u64>,
        /// What the store decided about the transition.
        flags: Flags,
    },
    /// Another write of the system committed since the load; nothing was
    /// written.
    Stale,
    /// The run's id is stored already; nothing was written.
    RunIdTaken,
}

/// The statements of the write path, which differ between the backends.
pub(crate) trait Statements: Sync {
    /// What one attempt's statements run on.
    type Unit: Send;

    /// Starts an attempt: takes the connection (embedded: and opens the
    /// write transaction).
    fn begin(&self) -> impl Future<Output = Result<Self::Unit>> + Send;

    /// Reads the system, its checks (in any order) and `check_id`'s window.
    fn load(
        &self,
        unit: &mut Self::Unit,
        system_id: &SystemId,
        check_id: &CheckId,
    ) -> impl Future<Output = Result<Loaded>> + Send;

    /// Stores `write` if the system's version is still the one loaded.
    fn write(&self, unit: &mut Self::Unit, write: &Write<'_>) -> impl Future<Output = Result<Written>> + Send;

    /// Deletes the check of `removal` with its runs and stores the system
    /// without it, if the system's version is still the one loaded.
    fn remove_check(
        &self,
        unit: &mut Self::Unit,
        removal: &Removal<'_>,
    ) -> impl Future<Output = Result<Written>> + Send;

    /// Ends an attempt whose write was applied (embedded: commits, and wakes
    /// the feed when a transition was written).
    fn commit(&self, unit: Self::Unit, wrote_transition: bool) -> impl Future<Output = Result<()>> + Send;

    /// The run `system_id` stored under `run_id`, if any.
    fn stored_run(
        &self,
        unit: &mut Self::Unit,
        system_id: &SystemId,
        run_id: &RunId,
    ) -> impl Future<Output = Result<Option<Run>>> + Send;

    /// The stored health of a system.
    fn system(
        &self,
        unit: &mut Self::Unit,
        system_id: &str,
    ) -> impl Future<Output = Result<Option<SystemRecord>>> + Send;

    /// The transition `run` caused, if it caused one and it is still kept.
    fn transition_caused_by(
        &self,
        unit: &mut Self::Unit,
        run: &Run,
    ) -> impl Future<Output = Result<Option<Transition>>> + Send;

    /// True when `err`, raised before anything was written, means the
    /// connection was found broken and the attempt may run again on another.
    fn lost_before_writing(&self, err: &Error) -> bool;
}

/// Records `new` and re-evaluates its check and system; a run already
/// stored is answered as a duplicate (or `RUN_ID_CONFLICT`). The caller holds
/// the system's lock.
pub(crate) async fn submit_run<S: Statements>(s: &S, new: &NewRun, rules: &WriteRules) -> Result<SubmitOutcome> {
    for _ in 0..MAX_ATTEMPTS {
        let (mut unit, loaded) = load(s, &new.system_id, &new.check_id).await?;
        let Some(change) = Change::of_run(loaded, new, rules)? else {
            return resubmitted(s, unit, new).await;
        };
        let written = s
            .write(&mut unit, &change.write(&new.system_id, Some(new)))
            .instrument(statement("write"))
            .await?;
        match written {
            Written::Applied { at, sequence, flags } => {
                s.commit(unit, sequence.is_some())
                    .instrument(statement("commit"))
                    .await?;
                let (health, transition) = change.outcome(&new.system_id, at, sequence, flags)?;
                return Ok(SubmitOutcome {
                    run: new.recorded(at),
                    health,
                    transition,
                    duplicate: false,
                });
            }
            Written::RunIdTaken => return resubmitted(s, unit, new).await,
            Written::Stale => {}
        }
    }
    Err(busy(&new.system_id))
}

/// Creates or changes a check and re-evaluates its system. The caller holds
/// the system's lock.
pub(crate) async fn configure_check<S: Statements>(
    s: &S,
    update: &CheckUpdate,
    rules: &WriteRules,
) -> Result<ConfigureOutcome> {
    for _ in 0..MAX_ATTEMPTS {
        let (mut unit, loaded) = load(s, &update.system_id, &update.check_id).await?;
        let change = Change::of_update(loaded, update, rules)?;
        let written = s
            .write(&mut unit, &change.write(&update.system_id, None))
            .instrument(statement("write"))
            .await?;
        match written {
            Written::Applied { at, sequence, flags } => {
                s.commit(unit, sequence.is_some())
                    .instrument(statement("commit"))
                    .await?;
                let check = change.checks[change.target].clone();
                let (health, transition) = change.outcome(&update.system_id, at, sequence, flags)?;
                return Ok(ConfigureOutcome {
                    check,
                    health,
                    transition,
                });
            }
            Written::Stale => {}
            Written::RunIdTaken => return Err(Error::Invariant("a configuration change inserts no run")),
        }
    }
    Err(busy(&update.system_id))
}

/// Deletes a check with its runs and re-evaluates its system without it.
/// The caller holds the system's lock. A check (or system) that does not
/// exist is no error: nothing is written and `deleted` is false.
pub(crate) async fn delete_check<S: Statements>(
    s: &S,
    system_id: &SystemId,
    check_id: &CheckId,
) -> Result<DeleteCheckOutcome> {
    for _ in 0..MAX_ATTEMPTS {
        let (mut unit, loaded) = load(s, system_id, check_id).await?;
        let Some(state) = loaded.system else {
            return Ok(DeleteCheckOutcome {
                deleted: false,
                health: None,
                transition: None,
            });
        };
        let mut checks = loaded.checks;
        let Some(target) = checks.iter().position(|c| c.check_id == check_id.as_str()) else {
            let health = s.system(&mut unit, system_id.as_str()).await?;
            return Ok(DeleteCheckOutcome {
                deleted: false,
                health,
                transition: None,
            });
        };
        let removed = checks.remove(target);
        let status = system_status(checks.iter().filter(|c| c.enabled).map(|c| c.evaluation.status));
        let transition_from = (status != state.status).then_some(state.status);
        let removal = Removal {
            system_id,
            check_id: check_id.as_str(),
            loaded_version: state.version,
            status,
            transition_from,
            resolves: resolves(status, state.announced),
            evaluation: &removed.evaluation,
        };
        let written = s
            .remove_check(&mut unit, &removal)
            .instrument(statement("write"))
            .await?;
        match written {
            Written::Applied { at, sequence, flags } => {
                s.commit(unit, sequence.is_some())
                    .instrument(statement("commit"))
                    .await?;
                let transition = match (transition_from, sequence) {
                    (None, None) => None,
                    (Some(from), Some(sequence)) => Some(Transition {
                        sequence,
                        system_id: system_id.as_str().to_owned(),
                        check_id: removed.check_id.clone(),
                        from,
                        to: status,
                        transitioned_at: at,
                        evaluation: removed.evaluation,
                        in_maintenance: flags.in_maintenance,
                        flapping: false,
                        caused_by: flags.caused_by,
                        check_deleted: true,
                    }),
                    _ => {
                        return Err(Error::Invariant(
                            "a transition is recorded exactly when the status changed",
                        ));
                    }
                };
                let health = SystemRecord {
                    system_id: system_id.as_str().to_owned(),
                    status,
                    checks,
                    evaluated_at: Some(at),
                    maintenance_windows: Vec::new(),
                    in_maintenance: false,
                    depends_on: Vec::new(),
                };
                return Ok(DeleteCheckOutcome {
                    deleted: true,
                    health: Some(health),
                    transition,
                });
            }
            Written::Stale => {}
            Written::RunIdTaken => return Err(Error::Invariant("a deletion inserts no run")),
        }
    }
    Err(busy(system_id))
}

/// A change to `to` resolves a problem a notifier was told of: it must reach
/// whoever saw the problem, so it is never flagged.
fn resolves(to: Status, announced: Status) -> bool {
    to == Status::Healthy && announced != Status::Healthy
}

/// What the store decided about a transition it wrote.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Flags {
    /// The transition was written in an open maintenance window (the store
    /// judges it at the write's time).
    pub(crate) in_maintenance: bool,
    /// The dependencies the store found non-healthy for the transition.
    pub(crate) caused_by: Vec<String>,
}

/// A span for one class of statement of a write, beneath its work
/// transaction's (traces only; disabled at the default log level).
fn statement(class: &'static str) -> tracing::Span {
    tracing::debug_span!("db.statement", otel.name = class, db.statement_class = class)
}

/// Writes of one system kept finding it changed: others write it without
/// its lock. Retryable, as for a lock that was not granted.
fn busy(system_id: &SystemId) -> Error {
    Error::SystemBusy {
        system_id: system_id.as_str().to_owned(),
    }
}

/// Begins an attempt and loads; once more on another connection when the
/// first was found broken (nothing was written yet).
async fn load<S: Statements>(s: &S, system_id: &SystemId, check_id: &CheckId) -> Result<(S::Unit, Loaded)> {
    async fn once<S: Statements>(s: &S, system_id: &SystemId, check_id: &CheckId) -> Result<(S::Unit, Loaded)> {
        let mut unit = s.begin().instrument(statement("begin")).await?;
        let mut loaded = s
            .load(&mut unit, system_id, check_id)
            .instrument(statement("load"))
            .await?;
        loaded.checks.sort_unstable_by(|a, b| a.check_id.cmp(&b.check_id));
        Ok((unit, loaded))
    }
    match once(s, system_id, check_id).await {
        Err(err) if s.lost_before_writing(&err) => {
            tracing::debug!(error = %err, "work connection found broken; loading again on another");
            once(s, system_id, check_id).await
        }
        outcome => outcome,
    }
}

/// The answer to a run whose id is stored: a duplicate, with its system's
/// health and the transition the stored run caused, or `RUN_ID_CONFLICT`.
async fn resubmitted<S: Statements>(s: &S, mut unit: S::Unit, new: &NewRun) -> Result<SubmitOutcome> {
    let stored = s
        .stored_run(&mut unit, &new.system_id, &new.run_id)
        .instrument(statement("stored_run"))
        .await?
        .ok_or(Error::Invariant("a run id found taken is stored"))?;
    let health = s
        .system(&mut unit, &stored.system_id)
        .instrument(statement("system"))
        .await?;
    let transition = s
        .transition_caused_by(&mut unit, &stored)
        .instrument(statement("transition_caused_by"))
        .await?;
    new.resubmitted(stored, health, transition)
}

/// A check as a write creates it: default thresholds, enabled, no runs.
fn new_check(check_id: &CheckId) -> CheckRecord {
    let thresholds = Thresholds::default();
    CheckRecord {
        check_id: check_id.as_str().to_owned(),
        thresholds,
        enabled: true,
        evaluation: evaluate(&[], &thresholds),
        runs_considered: 0,
        last_run_at: None,
        flapping_settings: None,
        flapping: false,
    }
}

/// What a write changes, decided from what was loaded.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Change {
    /// The system's version loaded (`None`: no row yet).
    loaded_version: Option<i64>,
    /// The system's status before the write.
    previous: Status,
    /// The status a notifier hiding flagged transitions last saw.
    announced: Status,
    /// Every check after the write, ordered by `check_id`.
    checks: Vec<CheckRecord>,
    /// Which of them the write changes.
    target: usize,
    /// Its run window after the write.
    window: RunWindow,
    /// The system's status after the write.
    status: Status,
}

impl Change {
    /// The change a new run makes; `None` when its id is in the window
    /// already (a resubmission).
    fn of_run(loaded: Loaded, new: &NewRun, rules: &WriteRules) -> Result<Option<Change>> {
        if loaded.window.contains(new.run_id.as_str()) {
            return Ok(None);
        }
        let mut change = Change::of(loaded, &new.system_id, &new.check_id, rules)?;
        match change.window.place(WindowRun {
            observed_at_micros: new.observed_at.timestamp_micros(),
            run_id: new.run_id.as_str().to_owned(),
            status: new.status,
        }) {
            Placement::Inserted(_) | Placement::OlderThanWindow => {}
            Placement::AlreadyPresent => return Ok(None),
        }
        change.evaluate();
        Ok(Some(change))
    }

    /// The change a configuration update makes.
    fn of_update(loaded: Loaded, update: &CheckUpdate, rules: &WriteRules) -> Result<Change> {
        let mut change = Change::of(loaded, &update.system_id, &update.check_id, rules)?;
        let check = &mut change.checks[change.target];
        if let Some(thresholds) = update.thresholds {
            check.thresholds = thresholds;
        }
        if let Some(enabled) = update.enabled {
            check.enabled = enabled;
        }
        if let Some(flapping) = update.flapping {
            check.flapping_settings = flapping;
        }
        change.evaluate();
        Ok(change)
    }

    /// The loaded system with `check_id` among its checks (created with
    /// defaults if it was not), before anything else changes.
    fn of(loaded: Loaded, system_id: &SystemId, check_id: &CheckId, rules: &WriteRules) -> Result<Change> {
        let Loaded {
            system,
            mut checks,
            window,
        } = loaded;
        let target = match checks.iter().position(|c| c.check_id == check_id.as_str()) {
            Some(index) => index,
            None => {
                if checks.len() >= usize::try_from(rules.max_checks_per_system).unwrap_or(usize::MAX) {
                    return Err(Error::TooManyChecks {
                        system_id: system_id.as_str().to_owned(),
                        limit: rules.max_checks_per_system,
                    });
                }
                let index = checks.partition_point(|c| c.check_id.as_str() < check_id.as_str());
                checks.insert(index, new_check(check_id));
                index
            }
        };
        let previous = system.map_or(Status::Healthy, |s| s.status);
        Ok(Change {
            loaded_version: system.map(|s| s.version),
            previous,
            announced: system.map_or(Status::Healthy, |s| s.announced),
            checks,
            target,
            window,
            status: previous,
        })
    }

    /// Evaluates the changed check from its window and the system from its
    /// enabled checks, with the domain's rules.
    fn evaluate(&mut self) {
        let check = &mut self.checks[self.target];
        check.evaluation = self.window.evaluate(&check.thresholds);
        check.runs_considered = u32::try_from(self.window.len()).unwrap_or(u32::MAX);
        check.last_run_at = self
            .window
            .newest()
            .and_then(|r| DateTime::from_timestamp_micros(r.observed_at_micros));
        // Only a check with detection on pays for its window's statuses.
        check.flapping = check.flapping_settings.is_some()
            && is_flapping(
                check.flapping_settings.as_ref(),
                check.flapping,
                &self.window.statuses(),
            );
        self.status = system_status(self.checks.iter().filter(|c| c.enabled).map(|c| c.evaluation.status));
    }

    /// What to store.
    fn write<'a>(&'a self, system_id: &'a SystemId, run: Option<&'a NewRun>) -> Write<'a> {
        let resolves = resolves(self.status, self.announced);
        Write {
            resolves,
            flapping: !resolves && self.checks[self.target].flapping,
            system_id,
            loaded_version: self.loaded_version,
            status: self.status,
            check: &self.checks[self.target],
            window: &self.window,
            run,
            transition_from: (self.previous != self.status).then_some(self.previous),
        }
    }

    /// The system's health after a write applied `at`, and the transition
    /// recorded as `sequence`.
    fn outcome(
        self,
        system_id: &SystemId,
        at: DateTime<Utc>,
        sequence: Option<u64>,
        flags: Flags,
    ) -> Result<(SystemRecord, Option<Transition>)> {
        let flapping = !resolves(self.status, self.announced) && self.checks[self.target].flapping;
        let transition = match (self.previous != self.status, sequence) {
            (false, None) => None,
            (true, Some(sequence)) => {
                let check = &self.checks[self.target];
                Some(Transition {
                    sequence,
                    system_id: system_id.as_str().to_owned(),
                    check_id: check.check_id.clone(),
                    from: self.previous,
                    to: self.status,
                    transitioned_at: at,
                    evaluation: check.evaluation,
                    in_maintenance: flags.in_maintenance,
                    flapping,
                    caused_by: flags.caused_by,
                    check_deleted: false,
                })
            }
            _ => {
                return Err(Error::Invariant(
                    "a transition is recorded exactly when the status changed",
                ));
            }
        };
        let health = SystemRecord {
            system_id: system_id.as_str().to_owned(),
            status: self.status,
            checks: self.checks,
            evaluated_at: Some(at),
            maintenance_windows: Vec::new(),
            in_maintenance: false,
            depends_on: Vec::new(),
        };
        Ok((health, transition))
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use crate::domain::{ConsecutiveThresholds, RunMessage};

    fn system() -> SystemId {
        SystemId::parse("system_id", "sys".to_owned()).unwrap()
    }

    fn check_id(id: &str) -> CheckId {
        CheckId::parse("check_id", id.to_owned()).unwrap()
    }

    fn run(run_id: &str, check: &str, status: Status, second: i64) -> NewRun {
        NewRun {
            run_id: RunId::parse("run_id", run_id.to_owned()).unwrap(),
            system_id: system(),
            check_id: check_id(check),
            status,
            observed_at: DateTime::from_timestamp(1_700_000_000 + second, 0).unwrap(),
            observed_at_given: true,
            latency: None,
            message: RunMessage::parse("message", String::new()).unwrap(),
        }
    }

    fn check(id: &str, status: Status, enabled: bool) -> CheckRecord {
        let failures = match status {
            Status::Healthy => vec![],
            Status::Degraded => vec![Status::Unhealthy; 2],
            Status::Unhealthy => vec![Status::Unhealthy; 5],
        };
        let mut c = new_check(&check_id(id));
        c.evaluation = evaluate(&failures, &c.thresholds);
        c.enabled = enabled;
        c
    }

    fn loaded(status: Status, checks: Vec<CheckRecord>, window: RunWindow) -> Loaded {
        Loaded {
            system: Some(SystemState {
                status,
                version: 7,
                announced: status,
            }),
            checks,
            window,
        }
    }

    fn window_of(runs: &[(&str, Status, i64)]) -> RunWindow {
        let mut window = RunWindow::default();
        for (id, status, second) in runs {
            window.place(WindowRun {
                observed_at_micros: (1_700_000_000 + second) * 1_000_000,
                run_id: (*id).to_owned(),
                status: *status,
            });
        }
        window
    }

    const RULES: WriteRules = WriteRules {
        max_checks_per_system: 3,
    };

    #[test]
    fn a_first_run_creates_system_and_check_with_defaults_and_changes_nothing_when_healthy() {
        let empty = Loaded {
            system: None,
            checks: vec![],
            window: RunWindow::default(),
        };
        let change = Change::of_run(empty, &run("r1", "http", Status::Healthy, 0), &RULES)
            .unwrap()
            .expect("a new run");
        let sys = system();
        let write = change.write(&sys, None);
        assert_eq!(write.loaded_version, None);
        assert_eq!(write.status, Status::Healthy);
        assert_eq!(write.transition_from, None);
        assert_eq!(write.check.runs_considered, 1);
        assert_eq!(
            write.check.last_run_at,
            DateTime::from_timestamp(1_700_000_000, 0),
            "the newest run's time"
        );
        assert_eq!(write.check.thresholds, Thresholds::default());
    }

    #[test]
    fn the_system_is_the_worst_of_its_enabled_checks_and_a_change_is_a_transition_from_the_stored_status() {
        // `db` is unhealthy but disabled; `api` degraded. A second failure of
        // `http` degrades it too: the system stays degraded, no transition.
        let checks = vec![
            check("api", Status::Degraded, true),
            check("db", Status::Unhealthy, false),
            check("http", Status::Healthy, true),
        ];
        let window = window_of(&[("h1", Status::Unhealthy, 1)]);
        let change = Change::of_run(
            loaded(Status::Degraded, checks.clone(), window.clone()),
            &run("h2", "http", Status::Unhealthy, 2),
            &RULES,
        )
        .unwrap()
        .unwrap();
        assert_eq!(change.status, Status::Degraded);
        assert_eq!(change.write(&system(), None).transition_from, None);
        assert_eq!(change.write(&system(), None).loaded_version, Some(7));

        // Enabling `db`, whose window holds five failures, makes the system
        // unhealthy: a transition from the stored degraded.
        let update = CheckUpdate {
            system_id: system(),
            check_id: check_id("db"),
            thresholds: None,
            enabled: Some(true),
            flapping: None,
        };
        let failures: Vec<_> = (0..5)
            .map(|i| {
                (
                    ["d0", "d1", "d2", "d3", "d4"][i],
                    Status::Unhealthy,
                    10 + i64::try_from(i).unwrap(),
                )
            })
            .collect();
        let change =
            Change::of_update(loaded(Status::Degraded, checks, window_of(&failures)), &update, &RULES).unwrap();
        assert_eq!(change.status, Status::Unhealthy);
        assert_eq!(change.write(&system(), None).transition_from, Some(Status::Degraded));
        let at = DateTime::from_timestamp(1_700_000_100, 0).unwrap();
        let (health, transition) = change.outcome(&system(), at, Some(12), Flags::default()).unwrap();
        let transition = transition.unwrap();
        assert_eq!(
            (
                transition.sequence,
                transition.from,
                transition.to,
                transition.check_id.as_str()
            ),
            (12, Status::Degraded, Status::Unhealthy, "db")
        );
        assert_eq!(transition.transitioned_at, at);
        assert_eq!(health.status, Status::Unhealthy);
        assert_eq!(health.evaluated_at, Some(at));
        assert_eq!(health.checks.len(), 3);
    }

    #[test]
    fn a_late_run_slots_into_the_window_and_decides_by_its_place() {
        // Newest first: U(3) H(1). A late failure at 2 makes U U H: degraded.
        let window = window_of(&[("a", Status::Healthy, 1), ("c", Status::Unhealthy, 3)]);
        let change = Change::of_run(
            loaded(Status::Healthy, vec![check("http", Status::Healthy, true)], window),
            &run("b", "http", Status::Unhealthy, 2),
            &RULES,
        )
        .unwrap()
        .unwrap();
        assert_eq!(change.checks[0].evaluation.status, Status::Degraded);
        assert_eq!(change.checks[0].last_run_at, DateTime::from_timestamp(1_700_000_003, 0));
        assert_eq!(change.status, Status::Degraded);
    }

    #[test]
    fn a_run_whose_id_is_in_the_window_is_a_resubmission() {
        let window = window_of(&[("a", Status::Healthy, 1)]);
        let again = run("a", "http", Status::Unhealthy, 9);
        let loaded = loaded(Status::Healthy, vec![check("http", Status::Healthy, true)], window);
        assert_eq!(Change::of_run(loaded, &again, &RULES).unwrap(), None);
    }

    #[test]
    fn a_new_check_beyond_the_limit_is_refused_and_an_existing_one_is_not() {
        let checks = vec![
            check("a", Status::Healthy, true),
            check("b", Status::Healthy, true),
            check("c", Status::Healthy, true),
        ];
        let refused = Change::of_run(
            loaded(Status::Healthy, checks.clone(), RunWindow::default()),
            &run("r", "d", Status::Healthy, 0),
            &RULES,
        );
        assert!(
            matches!(&refused, Err(Error::TooManyChecks { system_id, limit: 3 }) if system_id == "sys"),
            "{refused:?}"
        );
        let update = CheckUpdate {
            system_id: system(),
            check_id: check_id("d"),
            thresholds: None,
            enabled: Some(false),
            flapping: None,
        };
        assert!(matches!(
            Change::of_update(
                loaded(Status::Healthy, checks.clone(), RunWindow::default()),
                &update,
                &RULES
            ),
            Err(Error::TooManyChecks { .. })
        ));
        let fine = Change::of_run(
            loaded(Status::Healthy, checks, RunWindow::default()),
            &run("r", "b", Status::Healthy, 0),
            &RULES,
        );
        assert!(matches!(fine, Ok(Some(_))), "{fine:?}");
    }

    #[test]
    fn a_new_check_takes_its_place_in_check_id_order() {
        let checks = vec![check("a", Status::Healthy, true), check("c", Status::Healthy, true)];
        let change = Change::of_run(
            loaded(Status::Healthy, checks, RunWindow::default()),
            &run("r", "b", Status::Healthy, 0),
            &RULES,
        )
        .unwrap()
        .unwrap();
        let ids: Vec<_> = change.checks.iter().map(|c| c.check_id.as_str()).collect();
        assert_eq!(ids, ["a", "b", "c"]);
        assert_eq!(change.target, 1);
    }

    #[test]
    fn new_thresholds_re_evaluate_the_window() {
        let window = window_of(&[("a", Status::Unhealthy, 1), ("b", Status::Unhealthy, 2)]);
        let checks = vec![check("http", Status::Degraded, true)];
        let update = CheckUpdate {
            system_id: system(),
            check_id: check_id("http"),
            thresholds: Some(Thresholds::Consecutive(ConsecutiveThresholds {
                healthy_min_success_count: 1,
                degraded_min_failure_count: 1,
                unhealthy_min_failure_count: 2,
            })),
            enabled: None,
            flapping: None,
        };
        let change = Change::of_update(loaded(Status::Degraded, checks, window), &update, &RULES).unwrap();
        assert_eq!(change.checks[0].evaluation.status, Status::Unhealthy);
        assert_eq!(change.write(&system(), None).transition_from, Some(Status::Degraded));
    }

    #[test]
    fn an_outcome_without_the_transition_its_change_needs_is_a_broken_invariant() {
        let window = window_of(&[("a", Status::Unhealthy, 1)]);
        let change = Change::of_run(
            loaded(Status::Healthy, vec![check("http", Status::Healthy, true)], window),
            &run("b", "http", Status::Unhealthy, 2),
            &RULES,
        )
        .unwrap()
        .unwrap();
        assert_eq!(change.status, Status::Degraded);
        let at = DateTime::from_timestamp(1_700_000_100, 0).unwrap();
        assert!(matches!(
            change.clone().outcome(&system(), at, None, Flags::default()),
            Err(Error::Invariant(_))
        ));
        assert!(
            change
                .outcome(&system(), at, Some(1), Flags::default())
                .unwrap()
                .1
                .is_some()
        );
    }
}
