//! Flapping: a check whose runs keep changing status is noise, not news.
//!
//! A check with flapping detection on counts how often its run status changed
//! between neighbouring runs among its newest `runs`. At `start_changes` or
//! more it starts flapping; it stops only once the count falls below
//! `stop_changes` (Nagios-style hysteresis: with `stop_changes` below
//! `start_changes`, a count that hovers around one bound does not toggle the
//! state on every run). Flapping changes no status; it marks the transitions
//! written while it lasts so a notifier can stay quiet.

use super::{FieldViolation, MAX_WINDOW_SIZE, Status};

/// The fewest runs a flapping window may look at: two runs make one change.
pub const MIN_FLAPPING_RUNS: u32 = 3;

/// Per-check flapping detection settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct FlappingSettings {
    /// How many of the newest runs are looked at (3 to 100).
    pub runs: u32,
    /// Status changes among them that start flapping (at least 2, below `runs`).
    pub start_changes: u32,
    /// Flapping stops once the changes fall below this (at least 1, at most
    /// `start_changes`).
    pub stop_changes: u32,
}

impl FlappingSettings {
    /// Every problem with the settings, each naming its field under `field`.
    pub fn validate(&self, field: &str) -> Result<(), Vec<FieldViolation>> {
        let mut problems = Vec::new();
        if !(MIN_FLAPPING_RUNS..=MAX_WINDOW_SIZE).contains(&self.runs) {
            problems.push(FieldViolation::new(
                format!("{field}.runs"),
                format!("must be between {MIN_FLAPPING_RUNS} and {MAX_WINDOW_SIZE}"),
            ));
        }
        if self.start_changes < 2 || self.start_changes >= self.runs.max(2) {
            problems.push(FieldViolation::new(
                format!("{field}.start_changes"),
                "must be at least 2 and below runs",
            ));
        }
        if self.stop_changes < 1 || self.stop_changes > self.start_changes {
            problems.push(FieldViolation::new(
                format!("{field}.stop_changes"),
                "must be at least 1 and at most start_changes",
            ));
        }
        if problems.is_empty() { Ok(()) } else { Err(problems) }
    }
}

/// Status changes between neighbouring runs among the newest `runs` of
/// `statuses_newest_first`.
pub fn status_changes(statuses_newest_first: &[Status], runs: u32) -> u32 {
    let considered = usize::try_from(runs).unwrap_or(usize::MAX);
    let newest = &statuses_newest_first[..statuses_newest_first.len().min(considered)];
    let changes = newest.windows(2).filter(|pair| pair[0] != pair[1]).count();
    u32::try_from(changes).unwrap_or(u32::MAX)
}

/// Whether a check flaps after its runs became `statuses_newest_first`, given
/// whether it flapped before: off without settings; otherwise it starts at
/// `start_changes` and stops only below `stop_changes`.
pub fn is_flapping(settings: Option<&FlappingSettings>, was_flapping: bool, statuses_newest_first: &[Status]) -> bool {
    let Some(settings) = settings else { return false };
    let changes = status_changes(statuses_newest_first, settings.runs);
    if was_flapping {
        changes >= settings.stop_changes
    } else {
        changes >= settings.start_changes
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use proptest::prelude::*;

    use super::*;
    use Status::{Degraded, Healthy, Unhealthy};

    const SETTINGS: FlappingSettings = FlappingSettings {
        runs: 10,
        start_changes: 5,
        stop_changes: 2,
    };

    #[test]
    fn changes_are_counted_between_neighbours_among_the_newest_runs_only() {
        let statuses = [Healthy, Unhealthy, Unhealthy, Healthy, Degraded, Healthy];
        assert_eq!(status_changes(&statuses, 100), 4);
        assert_eq!(status_changes(&statuses, 3), 1);
        assert_eq!(status_changes(&[], 10), 0);
        assert_eq!(status_changes(&[Unhealthy], 10), 0);
    }

    #[test]
    fn a_check_starts_flapping_at_the_start_bound_and_stops_only_below_the_stop_bound() {
        let alternating: Vec<_> = (0..6).map(|i| if i % 2 == 0 { Healthy } else { Unhealthy }).collect();
        assert_eq!(status_changes(&alternating, 10), 5);
        assert!(is_flapping(Some(&SETTINGS), false, &alternating));
        // Three changes: not enough to start, enough to keep flapping.
        let calmer = [Healthy, Unhealthy, Healthy, Unhealthy, Unhealthy, Unhealthy];
        assert!(!is_flapping(Some(&SETTINGS), false, &calmer));
        assert!(is_flapping(Some(&SETTINGS), true, &calmer));
        // One change: below the stop bound.
        let settled = [Healthy, Healthy, Healthy, Unhealthy];
        assert!(!is_flapping(Some(&SETTINGS), true, &settled));
    }

    #[test]
    fn without_settings_a_check_never_flaps() {
        let alternating: Vec<_> = (0..20).map(|i| if i % 2 == 0 { Healthy } else { Degraded }).collect();
        assert!(!is_flapping(None, true, &alternating));
    }

    #[test]
    fn settings_outside_their_bounds_name_every_offending_field() {
        let bad = FlappingSettings {
            runs: 2,
            start_changes: 1,
            stop_changes: 0,
        };
        let fields: Vec<_> = bad
            .validate("flapping")
            .unwrap_err()
            .into_iter()
            .map(|v| v.field)
            .collect();
        assert_eq!(
            fields,
            ["flapping.runs", "flapping.start_changes", "flapping.stop_changes"]
        );
        assert_eq!(SETTINGS.validate("flapping"), Ok(()));
        let stop_above_start = FlappingSettings {
            stop_changes: 6,
            ..SETTINGS
        };
        assert_eq!(stop_above_start.validate("f").unwrap_err()[0].field, "f.stop_changes");
    }

    fn status() -> impl Strategy<Value = Status> {
        prop_oneof![Just(Healthy), Just(Degraded), Just(Unhealthy)]
    }

    proptest! {
        #[test]
        fn flapping_is_monotonic_in_the_previous_state_and_bounded_by_the_two_thresholds(
            statuses in proptest::collection::vec(status(), 0..40),
            (runs, start, stop) in (3u32..=30)
                .prop_flat_map(|runs| (Just(runs), 2..runs))
                .prop_flat_map(|(runs, start)| (Just(runs), Just(start), 1..=start)),
        ) {
            let settings = FlappingSettings { runs, start_changes: start, stop_changes: stop };
            prop_assert_eq!(settings.validate("f"), Ok(()));
            let changes = status_changes(&statuses, runs);
            prop_assert!(changes < runs);
            let from_calm = is_flapping(Some(&settings), false, &statuses);
            let from_flapping = is_flapping(Some(&settings), true, &statuses);
            // Hysteresis: whatever starts flapping also keeps it.
            prop_assert!(!from_calm || from_flapping);
            prop_assert_eq!(from_calm, changes >= start);
            prop_assert_eq!(from_flapping, changes >= stop);
        }
    }
}
