//! Retention: deleting old runs and transitions in passes of short steps.
//!
//! A pass must neither hold up shutdown nor, on the embedded store, keep the
//! one writer connection from the requests it serves. So a pass is a
//! sequence of steps, each of which either reads (a page of checks or
//! systems, to find which have something to delete) or deletes at most one
//! batch of one check's runs or one system's transitions through that
//! check's or system's own index. No step scans anything but the rows it
//! deletes and a check's newest runs; the caller may stop between any two
//! steps, and the embedded writer is free again after each one.
//!
//! The rules: a run goes once it is older than the retention and is not among
//! its check's [`MAX_RUNS_CONSIDERED`] newest (the runs evaluation reads); a
//! transition goes once it is older than [`TRANSITION_RETENTION`] and is not
//! its system's newest. A check or system created, or a run submitted late,
//! while a pass runs is considered by the next pass.

use std::{collections::VecDeque, time::Duration};

use chrono::{DateTime, TimeDelta, Utc};

use super::Store;
use crate::{domain::MAX_RUNS_CONSIDERED, error::Result};

/// Transitions are kept this long, except each system's newest.
pub const TRANSITION_RETENTION: TimeDelta = TimeDelta::days(90);

/// How long one delete should take at most (on the embedded store, how long
/// it holds the writer): after a slower one the pass halves its batch, down
/// to [`MIN_BATCH`] rows; after one under a quarter of this it doubles it
/// again, up to the batch it was given.
pub const BATCH_TIME_TARGET: Duration = Duration::from_millis(50);

/// The fewest rows a delete is asked for.
pub const MIN_BATCH: u32 = 10;

/// Checks (or systems) read per page when looking for something to delete.
/// A page costs one short read: an index lookup of each check's oldest run
/// and, only for a check with runs past the retention, a count of its runs
/// up to `RUNS_KEPT` + 1 in its index.
pub const PAGE: u32 = 500;

/// The runs a check keeps whatever their age: the ones evaluation reads.
pub(crate) const RUNS_KEPT: i64 = MAX_RUNS_CONSIDERED as i64;

/// Where a check's or a system's rows are still to be deleted.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Target {
    /// Runs of one check.
    Runs { system_id: String, check_id: String },
    /// Transitions of one system below its newest, `newest`, when it was read.
    Transitions { system_id: String, newest: i64 },
}

/// A check read while looking for old runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct CheckCandidate {
    pub(crate) system_id: String,
    pub(crate) check_id: String,
    /// True when its oldest run is past the retention and it has more than
    /// `RUNS_KEPT` runs (so that oldest one is not among the newest): a
    /// delete will find something.
    pub(crate) prunable: bool,
}

/// A system read while looking for old transitions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct SystemCandidate {
    pub(crate) system_id: String,
    /// Its newest transition's sequence, when its oldest transition is past
    /// the retention and is not that newest one.
    pub(crate) prunable_below: Option<i64>,
}

/// What a pass has done so far.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PassStats {
    /// Rows deleted.
    pub deleted: u64,
    /// Delete statements run.
    pub batches: u64,
    /// The longest delete statement (embedded: how long it held the writer).
    pub longest_batch: Duration,
}

/// One retention pass, advanced by [`Store::prune_step`] until
/// [`RetentionPass::is_done`].
#[derive(Debug)]
pub struct RetentionPass {
    /// Runs observed before this may go.
    runs_before: DateTime<Utc>,
    /// Transitions recorded before this may go.
    transitions_before: DateTime<Utc>,
    /// Rows the next delete statement may delete.
    batch: u32,
    /// What `batch` may grow back to.
    max_batch: u32,
    /// Checks and systems found with rows to delete, in key order.
    targets: VecDeque<Target>,
    /// The key after which the next page of checks starts; `None` once every
    /// check was read.
    checks_after: Option<(String, String)>,
    /// The key after which the next page of systems starts; `None` once every
    /// system was read.
    systems_after: Option<String>,
    stats: PassStats,
}

impl RetentionPass {
    /// A pass starting now that deletes runs older than `retention` and
    /// transitions older than [`TRANSITION_RETENTION`], at most `batch` rows
    /// (at least one) per delete statement, fewer while deletes take longer
    /// than [`BATCH_TIME_TARGET`].
    pub fn new(retention: Duration, batch: u32) -> Self {
        let now = Utc::now();
        let before = |age: Option<TimeDelta>| {
            age.and_then(|age| now.checked_sub_signed(age))
                .unwrap_or(DateTime::<Utc>::MIN_UTC)
        };
        RetentionPass {
            runs_before: before(TimeDelta::from_std(retention).ok()),
            transitions_before: before(Some(TRANSITION_RETENTION)),
            batch: batch.max(1),
            max_batch: batch.max(1),
            targets: VecDeque::new(),
            checks_after: Some((String::new(), String::new())),
            systems_after: Some(String::new()),
            stats: PassStats::default(),
        }
    }

    /// True when nothing is left to do.
    pub fn is_done(&self) -> bool {
        self.targets.is_empty() && self.checks_after.is_none() && self.systems_after.is_none()
    }

    /// What the pass has done so far.
    pub fn stats(&self) -> PassStats {
        self.stats
    }

    fn record(&mut self, deleted: u64, took: Duration) {
        self.stats.deleted += deleted;
        self.stats.batches += 1;
        self.stats.longest_batch = self.stats.longest_batch.max(took);
        // A full batch may have left more behind; anything less means this
        // target is done for this pass.
        if deleted < u64::from(self.batch) {
            self.targets.pop_front();
        }
        if took > BATCH_TIME_TARGET {
            self.batch = (self.batch / 2).max(MIN_BATCH.min(self.max_batch));
        } else if took < BATCH_TIME_TARGET / 4 && deleted >= u64::from(self.batch) {
            self.batch = self.batch.saturating_mul(2).min(self.max_batch);
        }
    }

    /// Rows the next delete may delete.
    pub fn batch(&self) -> u32 {
        self.batch
    }
}

impl Store {
    /// Runs the next step of `pass`: one read of a page of checks or systems,
    /// or one delete of at most the pass's batch of rows. Returns the rows
    /// deleted. A step that fails leaves the pass where it was.
    pub async fn prune_step(&self, pass: &mut RetentionPass) -> Result<u64> {
        if let Some(target) = pass.targets.front() {
            let (deleted, took) = match (self, target) {
                (Store::Postgres(s), Target::Runs { system_id, check_id }) => {
                    s.delete_old_runs(system_id, check_id, pass.runs_before, pass.batch)
                        .await?
                }
                (Store::Embedded(s), Target::Runs { system_id, check_id }) => {
                    s.delete_old_runs(system_id, check_id, pass.runs_before, pass.batch)
                        .await?
                }
                (Store::Postgres(s), Target::Transitions { system_id, newest }) => {
                    s.delete_old_transitions(system_id, *newest, pass.transitions_before, pass.batch)
                        .await?
                }
                (Store::Embedded(s), Target::Transitions { system_id, newest }) => {
                    s.delete_old_transitions(system_id, *newest, pass.transitions_before, pass.batch)
                        .await?
                }
            };
            pass.record(deleted, took);
            return Ok(deleted);
        }
        if let Some(after) = &pass.checks_after {
            let page = match self {
                Store::Postgres(s) => s.retention_checks(after, PAGE, pass.runs_before).await?,
                Store::Embedded(s) => s.retention_checks(after, PAGE, pass.runs_before).await?,
            };
            pass.checks_after = match page.last() {
                Some(last) if page.len() >= PAGE as usize => Some((last.system_id.clone(), last.check_id.clone())),
                _ => None,
            };
            pass.targets
                .extend(page.into_iter().filter(|c| c.prunable).map(|c| Target::Runs {
                    system_id: c.system_id,
                    check_id: c.check_id,
                }));
            return Ok(0);
        }
        if let Some(after) = &pass.systems_after {
            let page = match self {
                Store::Postgres(s) => s.retention_systems(after, PAGE, pass.transitions_before).await?,
                Store::Embedded(s) => s.retention_systems(after, PAGE, pass.transitions_before).await?,
            };
            pass.systems_after = match page.last() {
                Some(last) if page.len() >= PAGE as usize => Some(last.system_id.clone()),
                _ => None,
            };
            pass.targets.extend(page.into_iter().filter_map(|s| {
                s.prunable_below.map(|newest| Target::Transitions {
                    system_id: s.system_id,
                    newest,
                })
            }));
        }
        Ok(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pass_is_done_only_after_reading_every_check_and_system() {
        let pass = RetentionPass::new(Duration::from_secs(60), 0);
        assert!(!pass.is_done());
        assert_eq!(pass.batch, 1, "a batch deletes at least one row");
        assert!(pass.runs_before > pass.transitions_before);
    }

    #[test]
    fn a_slow_delete_halves_the_batch_and_quick_full_ones_grow_it_back() {
        let mut pass = RetentionPass::new(Duration::from_secs(60), 1000);
        pass.record(1000, BATCH_TIME_TARGET * 2);
        assert_eq!(pass.batch(), 500);
        for _ in 0..10 {
            pass.record(0, BATCH_TIME_TARGET * 2);
        }
        assert_eq!(pass.batch(), MIN_BATCH, "never below the minimum");
        pass.record(3, Duration::ZERO);
        assert_eq!(pass.batch(), MIN_BATCH, "a short batch says nothing about a full one");
        for _ in 0..10 {
            pass.record(u64::from(pass.batch()), Duration::ZERO);
        }
        assert_eq!(pass.batch(), 1000, "never above the batch it was given");
    }

    #[test]
    fn a_full_batch_keeps_its_target_and_a_short_one_moves_on() {
        let mut pass = RetentionPass::new(Duration::from_secs(60), 10);
        pass.checks_after = None;
        pass.systems_after = None;
        pass.targets.push_back(Target::Transitions {
            system_id: "s".into(),
            newest: 7,
        });
        pass.record(10, Duration::from_millis(3));
        assert!(!pass.is_done(), "a full batch may have left rows behind");
        pass.record(4, Duration::from_millis(1));
        assert!(pass.is_done());
        assert_eq!(
            pass.stats(),
            PassStats {
                deleted: 14,
                batches: 2,
                longest_batch: Duration::from_millis(3)
            }
        );
    }
}
