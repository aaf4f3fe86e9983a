//! A check's newest runs, kept up to date one run at a time.
//!
//! Evaluation reads a check's newest [`MAX_RUNS_CONSIDERED`] runs in `observed_at` order. Reading
//! them from the history on every submission costs the database far more than the rest of the
//! submission, so the check keeps them itself: a [`RunWindow`] holds exactly those runs (their
//! time, id and status, nothing else), and each new run is placed into it. A late run slots into
//! its place by `observed_at`; one older than a full window changes nothing. The verdict is the
//! same [`evaluate`] over the window's statuses as over the newest stored runs, which the property
//! tests below check for any order of submissions, duplicates included.
//!
//! The order is `observed_at`, newest first, then `run_id`, greater first, compared byte by byte:
//! two runs observed in the same microsecond still have one place each, on every backend.

use super::evaluation::{Evaluation, MAX_RUNS_CONSIDERED, evaluate};
use super::status::Status;
use super::thresholds::Thresholds;

/// One run as the window keeps it: what ordering and evaluation need.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct WindowRun {
    /// When it ran, in microseconds since the Unix epoch (the stored precision).
    pub observed_at_micros: i64,
    /// Its id: orders runs observed in the same microsecond, and recognises a run seen before.
    pub run_id: String,
    /// Its outcome.
    pub status: Status,
}

impl WindowRun {
    /// Whether `self` comes before `other` in the window (is newer).
    fn is_newer_than(&self, other: &WindowRun) -> bool {
        (self.observed_at_micros, self.run_id.as_str()) > (other.observed_at_micros, other.run_id.as_str())
    }
}

/// Where [`RunWindow::place`] put a run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Placement {
    /// The run is in the window now, at this index (0 is the newest); the oldest run may have left.
    Inserted(usize),
    /// A run with this id is in the window already; nothing changed.
    AlreadyPresent,
    /// The window is full and every run in it is newer: the run belongs to the history only and
    /// changes nothing about the verdict.
    OlderThanWindow,
}

/// The newest runs of a check, at most [`MAX_RUNS_CONSIDERED`], newest first.
///
/// The invariants (order, distinct ids, the cap) hold for every value: the only ways to make one
/// are [`RunWindow::default`], [`RunWindow::place`] and [`RunWindow::from_newest_first`], which
/// refuses a list that breaks them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RunWindow {
    newest_first: Vec<WindowRun>,
}

impl RunWindow {
    /// The window of `runs` as stored, newest first; `None` when they are out of order, repeat an
    /// id or are more than [`MAX_RUNS_CONSIDERED`]: such a list was not written by a window.
    pub fn from_newest_first(runs: Vec<WindowRun>) -> Option<RunWindow> {
        let ordered = runs.windows(2).all(|pair| pair[0].is_newer_than(&pair[1]));
        // Ordered runs observed at different times cannot share an id with a neighbour, but ids
        // may repeat further apart.
        let mut ids: Vec<&str> = runs.iter().map(|r| r.run_id.as_str()).collect();
        ids.sort_unstable();
        let distinct = ids.windows(2).all(|pair| pair[0] != pair[1]);
        (ordered && distinct && runs.len() <= MAX_RUNS_CONSIDERED).then_some(RunWindow { newest_first: runs })
    }

    /// Places `run` where it belongs by `observed_at` (then `run_id`), keeping the newest
    /// [`MAX_RUNS_CONSIDERED`].
    ///
    /// A run whose id is in the window already is not placed again. The window cannot know runs
    /// that left it: telling a resubmission of one of those from a new run is the history's job.
    pub fn place(&mut self, run: WindowRun) -> Placement {
        if self.contains(&run.run_id) {
            return Placement::AlreadyPresent;
        }
        let at = self.newest_first.partition_point(|kept| kept.is_newer_than(&run));
        if at >= MAX_RUNS_CONSIDERED {
            return Placement::OlderThanWindow;
        }
        self.newest_first.insert(at, run);
        self.newest_first.truncate(MAX_RUNS_CONSIDERED);
        Placement::Inserted(at)
    }

    /// Whether a run with this id is in the window.
    pub fn contains(&self, run_id: &str) -> bool {
        self.newest_first.iter().any(|r| r.run_id == run_id)
    }

    /// The runs, newest first.
    pub fn runs(&self) -> &[WindowRun] {
        &self.newest_first
    }

    /// The newest run, if any.
    pub fn newest(&self) -> Option<&WindowRun> {
        self.newest_first.first()
    }

    /// How many runs the window holds: the runs an evaluation is given.
    pub fn len(&self) -> usize {
        self.newest_first.len()
    }

    /// True without runs.
    pub fn is_empty(&self) -> bool {
        self.newest_first.is_empty()
    }

    /// The statuses, newest first: what [`evaluate`] takes.
    pub fn statuses(&self) -> Vec<Status> {
        self.newest_first.iter().map(|r| r.status).collect()
    }

    /// The check's verdict with `thresholds`: [`evaluate`] over the window.
    pub fn evaluate(&self, thresholds: &Thresholds) -> Evaluation {
        evaluate(&self.statuses(), thresholds)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::collections::HashSet;

    use proptest::prelude::*;

    use super::*;
    use crate::domain::{ConsecutiveThresholds, WindowThresholds};

    fn run(at: i64, id: &str, status: Status) -> WindowRun {
        WindowRun {
            observed_at_micros: at,
            run_id: id.to_owned(),
            status,
        }
    }

    fn ids(window: &RunWindow) -> Vec<&str> {
        window.runs().iter().map(|r| r.run_id.as_str()).collect()
    }

    #[test]
    fn runs_are_kept_newest_first_and_a_late_run_slots_into_its_place() {
        let mut window = RunWindow::default();
        assert_eq!(window.place(run(10, "a", Status::Healthy)), Placement::Inserted(0));
        assert_eq!(window.place(run(30, "c", Status::Unhealthy)), Placement::Inserted(0));
        assert_eq!(window.place(run(20, "b", Status::Degraded)), Placement::Inserted(1));
        assert_eq!(ids(&window), ["c", "b", "a"]);
        assert_eq!(
            window.statuses(),
            [Status::Unhealthy, Status::Degraded, Status::Healthy]
        );
        assert_eq!(window.newest().map(|r| r.observed_at_micros), Some(30));
    }

    #[test]
    fn runs_observed_in_the_same_microsecond_order_by_run_id_greater_first() {
        let mut window = RunWindow::default();
        window.place(run(5, "b", Status::Healthy));
        window.place(run(5, "a", Status::Unhealthy));
        window.place(run(5, "c", Status::Degraded));
        // Byte order: an upper-case letter sorts before every lower-case one.
        window.place(run(5, "Z", Status::Degraded));
        assert_eq!(ids(&window), ["c", "b", "a", "Z"]);
    }

    #[test]
    fn a_run_already_in_the_window_is_not_placed_twice() {
        let mut window = RunWindow::default();
        window.place(run(1, "a", Status::Healthy));
        // Same id, other content: still the same run as far as the window goes.
        assert_eq!(window.place(run(9, "a", Status::Unhealthy)), Placement::AlreadyPresent);
        assert_eq!(window.runs(), [run(1, "a", Status::Healthy)]);
    }

    #[test]
    fn a_full_window_keeps_the_newest_100_and_ignores_a_run_older_than_all_of_them() {
        let mut window = RunWindow::default();
        for i in 0..150 {
            window.place(run(i, &format!("r{i:03}"), Status::Healthy));
        }
        assert_eq!(window.len(), MAX_RUNS_CONSIDERED);
        assert_eq!(window.runs().last().map(|r| r.observed_at_micros), Some(50));
        assert_eq!(
            window.place(run(10, "late", Status::Unhealthy)),
            Placement::OlderThanWindow
        );
        // Older only by its id, in the same microsecond as the oldest kept run.
        assert_eq!(
            window.place(run(50, "r000", Status::Unhealthy)),
            Placement::OlderThanWindow
        );
        assert_eq!(window.len(), MAX_RUNS_CONSIDERED);
        // A late run newer than the oldest pushes that one out.
        assert_eq!(
            window.place(run(60, "r059z", Status::Unhealthy)),
            Placement::Inserted(90)
        );
        assert_eq!(window.len(), MAX_RUNS_CONSIDERED);
        assert_eq!(window.runs().last().map(|r| r.run_id.as_str()), Some("r051"));
        assert!(!window.contains("r050"));
    }

    #[test]
    fn only_a_list_a_window_could_have_written_is_accepted() {
        let good = vec![
            run(2, "b", Status::Healthy),
            run(2, "a", Status::Healthy),
            run(1, "z", Status::Healthy),
        ];
        assert!(RunWindow::from_newest_first(good).is_some());
        assert!(RunWindow::from_newest_first(Vec::new()).is_some());
        let out_of_order = vec![run(1, "a", Status::Healthy), run(2, "b", Status::Healthy)];
        assert!(RunWindow::from_newest_first(out_of_order).is_none());
        let tie_out_of_order = vec![run(2, "a", Status::Healthy), run(2, "b", Status::Healthy)];
        assert!(RunWindow::from_newest_first(tie_out_of_order).is_none());
        let repeated = vec![
            run(3, "a", Status::Healthy),
            run(2, "b", Status::Healthy),
            run(1, "a", Status::Healthy),
        ];
        assert!(RunWindow::from_newest_first(repeated).is_none());
        let too_many = (0..101)
            .rev()
            .map(|i| run(i, &format!("r{i}"), Status::Healthy))
            .collect();
        assert!(RunWindow::from_newest_first(too_many).is_none());
    }

    // ---- the window against the history ----

    /// A submission: when, which id (from a small pool, so ids repeat), what status.
    fn submission() -> impl Strategy<Value = WindowRun> {
        (
            // Few distinct times, so that ties are common.
            prop_oneof![0..8i64, 0..400i64],
            0..160u32,
            prop::sample::select(Status::ALL.to_vec()),
        )
            .prop_map(|(at, id, status)| run(at, &format!("r{id}"), status))
    }

    fn any_thresholds() -> impl Strategy<Value = Thresholds> {
        prop_oneof![
            (1..=4u32, 1..=6u32, 1..=9u32).prop_map(|(h, d, u)| Thresholds::Consecutive(ConsecutiveThresholds {
                healthy_min_success_count: h,
                degraded_min_failure_count: d,
                unhealthy_min_failure_count: u,
            })),
            (3..=100u32, 1..=30u32, 1..=60u32).prop_map(|(s, d, u)| Thresholds::Window(WindowThresholds {
                window_size: s,
                degraded_min_failure_count: d,
                unhealthy_min_failure_count: u,
            })),
        ]
    }

    /// What the store does with each submission, modelled: the history keeps the first run of each
    /// id (a later one is a duplicate or a conflict, and is not stored); a new run is placed into
    /// the window.
    fn submit_all(submissions: &[WindowRun]) -> (RunWindow, Vec<WindowRun>) {
        let mut window = RunWindow::default();
        let mut history: Vec<WindowRun> = Vec::new();
        let mut seen = HashSet::new();
        for s in submissions {
            if !seen.insert(s.run_id.clone()) {
                continue;
            }
            history.push(s.clone());
            window.place(s.clone());
        }
        (window, history)
    }

    /// The newest runs of the history as evaluation used to read them: sorted, the first 100.
    fn newest_stored(history: &[WindowRun]) -> Vec<WindowRun> {
        let mut sorted = history.to_vec();
        sorted
            .sort_by(|a, b| (b.observed_at_micros, b.run_id.as_str()).cmp(&(a.observed_at_micros, a.run_id.as_str())));
        sorted.truncate(MAX_RUNS_CONSIDERED);
        sorted
    }

    proptest! {
        #[test]
        fn the_window_gives_the_verdict_of_evaluate_over_the_stored_runs_in_any_order_of_submission(
            submissions in prop::collection::vec(submission(), 0..260),
            thresholds in any_thresholds(),
        ) {
            let (window, history) = submit_all(&submissions);
            let stored = newest_stored(&history);
            let statuses: Vec<Status> = stored.iter().map(|r| r.status).collect();
            prop_assert_eq!(window.evaluate(&thresholds), evaluate(&statuses, &thresholds));
            prop_assert_eq!(window.runs(), stored.as_slice());
        }

        #[test]
        fn a_resubmission_inside_the_window_is_recognised_and_changes_nothing(
            submissions in prop::collection::vec(submission(), 1..200),
            pick in any::<prop::sample::Index>(),
            status in prop::sample::select(Status::ALL.to_vec()),
        ) {
            let (mut window, _) = submit_all(&submissions);
            if window.is_empty() {
                return Ok(());
            }
            let before = window.clone();
            let again = &before.runs()[pick.index(before.len())];
            let resubmitted = run(again.observed_at_micros + 1, &again.run_id, status);
            prop_assert_eq!(window.place(resubmitted), Placement::AlreadyPresent);
            prop_assert_eq!(window, before);
        }

        #[test]
        fn a_window_read_back_from_its_runs_is_the_same_window(
            submissions in prop::collection::vec(submission(), 0..200),
        ) {
            let (window, _) = submit_all(&submissions);
            prop_assert_eq!(RunWindow::from_newest_first(window.runs().to_vec()), Some(window));
        }
    }
}
