//! Turning the newest runs of a check into its status.
//!
//! This is the rule the whole service exists to apply, so it is a pure function over statuses:
//! the store decides which runs to read, the API decides what to do with the verdict, and this
//! module can be tested exhaustively without either.

use super::status::{Status, worst};
use super::thresholds::{ConsecutiveThresholds, MAX_WINDOW_SIZE, Mode, Thresholds, WindowThresholds};

/// At most this many of the newest runs are looked at, whatever the thresholds say.
///
/// It bounds the work and the rows read per evaluation, and it is the largest window a check can
/// configure, so window mode never needs more.
pub const MAX_RUNS_CONSIDERED: usize = 100;

/// The rule that decided an evaluation, judged at the newest end of the runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Rule {
    /// There were no runs: healthy.
    NoRuns,
    /// Failures reached the unhealthy threshold.
    UnhealthyThresholdReached,
    /// Failures reached the degraded threshold but not the unhealthy one.
    DegradedThresholdReached,
    /// Failures stayed below the degraded threshold. In window mode the check is healthy; in
    /// consecutive mode the status comes from the runs before the failures (healthy if none).
    BelowDegradedThreshold,
    /// Enough successes in a row confirmed the check healthy.
    RecoveryConfirmed,
    /// Too few successes in a row to confirm recovery: the status comes from the runs before them
    /// (healthy if none).
    RecoveryNotConfirmed,
}

impl Rule {
    /// The snake_case name used in storage and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            Rule::NoRuns => "no_runs",
            Rule::UnhealthyThresholdReached => "unhealthy_threshold_reached",
            Rule::DegradedThresholdReached => "degraded_threshold_reached",
            Rule::BelowDegradedThreshold => "below_degraded_threshold",
            Rule::RecoveryConfirmed => "recovery_confirmed",
            Rule::RecoveryNotConfirmed => "recovery_not_confirmed",
        }
    }
}

/// A status together with the facts that explain it, so a client can see why a check is where it
/// is without re-deriving the rules.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Evaluation {
    /// The verdict.
    pub status: Status,
    /// The rule family that was applied.
    pub mode: Mode,
    /// How many of the newest runs the verdict depends on. Window mode: the runs in the window.
    /// Consecutive mode: the runs up to the end of the streak that decided.
    pub runs_considered: u32,
    /// Consecutive mode: failures in a row at the newest end (0 in window mode).
    pub leading_failure_streak: u32,
    /// Consecutive mode: successes in a row at the newest end (0 in window mode).
    pub leading_success_streak: u32,
    /// Window mode: failures among the runs considered (0 in consecutive mode).
    pub failures_in_window: u32,
    /// The rule that decided, judged at the newest end of the runs.
    pub rule: Rule,
    /// The thresholds that were applied. Identical to the ones given when they are valid; see
    /// [`evaluate`] for what happens to invalid ones.
    pub thresholds: Thresholds,
}

/// Evaluates a check from its run statuses, newest first.
///
/// Only the newest [`MAX_RUNS_CONSIDERED`] statuses are looked at.
///
/// Meant for validated thresholds, but it accepts any: an evaluation must never fail once a run
/// has been stored. A count or window size of 0 is applied as 1, because "escalate after zero
/// failures" would mark a check that never failed as broken; a window larger than
/// [`MAX_RUNS_CONSIDERED`] is applied as that maximum. [`Evaluation::thresholds`] reports the
/// values actually applied.
///
/// # Window mode
/// The failures among the newest `window_size` runs (fewer if fewer exist) are counted: at least
/// `unhealthy_min_failure_count` is unhealthy, at least `degraded_min_failure_count` is degraded,
/// anything less is healthy.
///
/// # Consecutive mode
/// The runs are read as alternating streaks, newest first, until one decides:
/// - `F` failures in a row: `F >= unhealthy_min_failure_count` is unhealthy,
///   `F >= degraded_min_failure_count` is degraded; a shorter streak is a blip that does not change
///   the status, which comes from the runs before it.
/// - `S` successes in a row: `S >= healthy_min_success_count` is healthy; a shorter streak has not
///   confirmed recovery yet, so the status comes from the runs before it.
/// - Running out of runs is healthy.
///
/// With `healthy_min_success_count = 1` every success streak decides, which is exactly upstream
/// 1.5.0 (a blip below the degraded threshold is healthy).
pub fn evaluate(statuses_newest_first: &[Status], thresholds: &Thresholds) -> Evaluation {
    let runs = &statuses_newest_first[..statuses_newest_first.len().min(MAX_RUNS_CONSIDERED)];
    let applied = applicable(*thresholds);
    if runs.is_empty() {
        return Evaluation {
            status: Status::Healthy,
            mode: applied.mode(),
            runs_considered: 0,
            leading_failure_streak: 0,
            leading_success_streak: 0,
            failures_in_window: 0,
            rule: Rule::NoRuns,
            thresholds: applied,
        };
    }
    match applied {
        Thresholds::Consecutive(t) => evaluate_consecutive(runs, t),
        Thresholds::Window(t) => evaluate_window(runs, t),
    }
}

/// The status of a system from the statuses of its enabled checks: the worst of them, healthy if
/// there are none. Disabled checks must not be passed in; a paused check does not count.
pub fn system_status<I: IntoIterator<Item = Status>>(enabled_check_statuses: I) -> Status {
    worst(enabled_check_statuses)
}

/// The thresholds as they will be applied: zeros raised to 1 and the window capped.
fn applicable(thresholds: Thresholds) -> Thresholds {
    match thresholds {
        Thresholds::Consecutive(t) => Thresholds::Consecutive(ConsecutiveThresholds {
            healthy_min_success_count: t.healthy_min_success_count.max(1),
            degraded_min_failure_count: t.degraded_min_failure_count.max(1),
            unhealthy_min_failure_count: t.unhealthy_min_failure_count.max(1),
        }),
        Thresholds::Window(t) => Thresholds::Window(WindowThresholds {
            window_size: t.window_size.clamp(1, MAX_WINDOW_SIZE),
            degraded_min_failure_count: t.degraded_min_failure_count.max(1),
            unhealthy_min_failure_count: t.unhealthy_min_failure_count.max(1),
        }),
    }
}

/// A count of runs as the `u32` the API reports; never saturates in practice (at most 100).
fn count(n: usize) -> u32 {
    u32::try_from(n).unwrap_or(u32::MAX)
}

fn evaluate_window(runs: &[Status], t: WindowThresholds) -> Evaluation {
    let size = usize::try_from(t.window_size).unwrap_or(usize::MAX).min(runs.len());
    let failures = count(runs[..size].iter().filter(|s| s.is_failure()).count());
    let (status, rule) = if failures >= t.unhealthy_min_failure_count {
        (Status::Unhealthy, Rule::UnhealthyThresholdReached)
    } else if failures >= t.degraded_min_failure_count {
        (Status::Degraded, Rule::DegradedThresholdReached)
    } else {
        (Status::Healthy, Rule::BelowDegradedThreshold)
    };
    Evaluation {
        status,
        mode: Mode::Window,
        runs_considered: count(size),
        leading_failure_streak: 0,
        leading_success_streak: 0,
        failures_in_window: failures,
        rule,
        thresholds: Thresholds::Window(t),
    }
}

fn evaluate_consecutive(runs: &[Status], t: ConsecutiveThresholds) -> Evaluation {
    // The definition is recursive ("otherwise, the evaluation of the runs after the streak"); the
    // loop walks the same streaks and stops at the first one that decides. Only the newest streak
    // is reported as the rule, because that is what a client sees changing run by run.
    let mut newest: Option<(Rule, u32, u32)> = None;
    let mut rest = runs;
    let status = loop {
        let Some(first) = rest.first() else {
            break Status::Healthy;
        };
        let failing = first.is_failure();
        let len = rest.iter().take_while(|s| s.is_failure() == failing).count();
        rest = rest.get(len..).unwrap_or_default();
        let streak = count(len);
        let (rule, decided) = if failing {
            if streak >= t.unhealthy_min_failure_count {
                (Rule::UnhealthyThresholdReached, Some(Status::Unhealthy))
            } else if streak >= t.degraded_min_failure_count {
                (Rule::DegradedThresholdReached, Some(Status::Degraded))
            } else {
                (Rule::BelowDegradedThreshold, None)
            }
        } else if streak >= t.healthy_min_success_count {
            (Rule::RecoveryConfirmed, Some(Status::Healthy))
        } else {
            (Rule::RecoveryNotConfirmed, None)
        };
        if newest.is_none() {
            let (failures, successes) = if failing { (streak, 0) } else { (0, streak) };
            newest = Some((rule, failures, successes));
        }
        if let Some(status) = decided {
            break status;
        }
    };
    // `runs` is never empty here, so the first streak always set `newest`.
    let (rule, leading_failure_streak, leading_success_streak) = newest.unwrap_or((Rule::NoRuns, 0, 0));
    Evaluation {
        status,
        mode: Mode::Consecutive,
        runs_considered: count(runs.len() - rest.len()),
        leading_failure_streak,
        leading_success_streak,
        failures_in_window: 0,
        rule,
        thresholds: Thresholds::Consecutive(t),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::{
        MIN_WINDOW_SIZE,
        thresholds::shorthand::{consecutive, window},
    };
    use proptest::prelude::*;

    /// Statuses from a compact picture, newest first: `H`, `D`, `U`; spaces are ignored.
    fn runs(picture: &str) -> Vec<Status> {
        picture
            .chars()
            .filter(|c| !c.is_whitespace())
            .map(|c| match c {
                'H' => Status::Healthy,
                'D' => Status::Degraded,
                'U' => Status::Unhealthy,
                other => panic!("unknown status {other:?} in {picture:?}"),
            })
            .collect()
    }

    fn status(picture: &str, thresholds: Thresholds) -> Status {
        evaluate(&runs(picture), &thresholds).status
    }

    // ---- upstream's test cases, ported ----

    #[test]
    fn upstream_one_failure_then_recovery_never_leaves_healthy_with_default_thresholds() {
        let defaults = Thresholds::default();
        assert_eq!(status("U", defaults), Status::Healthy);
        assert_eq!(status("HU", defaults), Status::Healthy);
    }

    #[test]
    fn upstream_a_single_leading_failure_below_the_degraded_threshold_stays_healthy() {
        assert_eq!(status("UHUUU", consecutive(1, 2, 3)), Status::Healthy);
    }

    #[test]
    fn upstream_window_mode_catches_a_mostly_failing_system_consecutive_mode_ignores() {
        // Upstream before 1.5.0 reported unhealthy here in consecutive mode, off the single newest
        // failure; that was the bug 1.5.0 fixed.
        let history = "U H UUU";
        assert_eq!(status(history, consecutive(1, 2, 3)), Status::Healthy);
        let by_window = evaluate(&runs(history), &window(5, 2, 4));
        assert_eq!(by_window.status, Status::Unhealthy);
        assert_eq!(by_window.failures_in_window, 4);
    }

    #[test]
    fn upstream_window_mode_shows_recovery_when_mostly_healthy() {
        assert_eq!(status("HUHHH", window(5, 2, 4)), Status::Healthy);
    }

    #[test]
    fn upstream_returns_healthy_when_no_runs_exist() {
        assert_eq!(status("", Thresholds::default()), Status::Healthy);
    }

    #[test]
    fn upstream_consecutive_mode_cases_agree_where_upstream_honours_the_success_count() {
        let t = consecutive(2, 2, 4);
        let table = [
            ("HHU", Status::Healthy),
            ("HH", Status::Healthy),
            ("UDH", Status::Degraded),
            ("UUDUH", Status::Unhealthy),
            // One success, two needed, nothing older: healthy, as upstream.
            ("H", Status::Healthy),
            ("DU", Status::Degraded),
        ];
        for (history, expected) in table {
            assert_eq!(status(history, t), expected, "{history}");
        }
    }

    #[test]
    fn one_success_after_failures_does_not_confirm_recovery_when_two_are_required() {
        // Upstream ignores `minSuccessCount` and reports healthy here ("resets count when streak
        // breaks"); vitals deliberately honours it as hysteresis, so the two failures still count.
        let evaluation = evaluate(&runs("HUU"), &consecutive(2, 2, 4));
        assert_eq!(evaluation.status, Status::Degraded);
        assert_eq!(evaluation.rule, Rule::RecoveryNotConfirmed);
    }

    #[test]
    fn upstream_window_mode_cases() {
        let t = window(5, 2, 4);
        let table = [
            ("HUHHH", Status::Healthy),
            ("UUHHH", Status::Degraded),
            ("UDUUH", Status::Unhealthy),
            // Failures outside the window do not count.
            ("HHHHH UUUU", Status::Healthy),
        ];
        for (history, expected) in table {
            assert_eq!(status(history, t), expected, "{history}");
        }
        assert_eq!(status("UUHU", window(3, 2, 3)), Status::Degraded);
    }

    #[test]
    fn upstream_default_thresholds_are_degraded_after_two_and_unhealthy_after_five_failures() {
        let defaults = Thresholds::default();
        assert_eq!(status("H", defaults), Status::Healthy);
        assert_eq!(status("UU", defaults), Status::Degraded);
        assert_eq!(status("UUUU", defaults), Status::Degraded);
        assert_eq!(status("UUUUU", defaults), Status::Unhealthy);
    }

    // ---- every rule, with every reported fact ----

    struct Case {
        history: &'static str,
        thresholds: Thresholds,
        status: Status,
        rule: Rule,
        runs_considered: u32,
        leading_failure_streak: u32,
        leading_success_streak: u32,
        failures_in_window: u32,
    }

    fn check(cases: &[Case]) {
        for case in cases {
            let expected = Evaluation {
                status: case.status,
                mode: case.thresholds.mode(),
                runs_considered: case.runs_considered,
                leading_failure_streak: case.leading_failure_streak,
                leading_success_streak: case.leading_success_streak,
                failures_in_window: case.failures_in_window,
                rule: case.rule,
                thresholds: case.thresholds,
            };
            let found = evaluate(&runs(case.history), &case.thresholds);
            assert_eq!(found, expected, "{} with {:?}", case.history, case.thresholds);
        }
    }

    #[test]
    fn each_consecutive_rule_reports_its_status_and_facts() {
        use Rule::*;
        use Status::{Degraded, Healthy, Unhealthy};
        let d = Thresholds::default();
        #[rustfmt::skip]
        let cases = [
            // history, thresholds, status, rule, considered, failure streak, success streak
            ("",        d, Healthy,   NoRuns,                    0, 0, 0),
            ("UUUUU",   d, Unhealthy, UnhealthyThresholdReached, 5, 5, 0),
            ("UUUUUUUH",d, Unhealthy, UnhealthyThresholdReached, 7, 7, 0),
            ("DDDDD",   d, Unhealthy, UnhealthyThresholdReached, 5, 5, 0),
            ("DU",      d, Degraded,  DegradedThresholdReached,  2, 2, 0),
            ("UUH",     d, Degraded,  DegradedThresholdReached,  2, 2, 0),
            ("UDUUHUU", d, Degraded,  DegradedThresholdReached,  4, 4, 0),
            ("U",       d, Healthy,   BelowDegradedThreshold,    1, 1, 0),
            ("UHUUUUU", d, Healthy,   BelowDegradedThreshold,    2, 1, 0),
            ("H",       d, Healthy,   RecoveryConfirmed,         1, 0, 1),
            ("HHUUUUU", d, Healthy,   RecoveryConfirmed,         2, 0, 2),
            // Recovery hysteresis: two successes needed.
            ("H",      consecutive(2, 2, 5), Healthy,   RecoveryNotConfirmed,   1, 0, 1),
            ("HUUUUU", consecutive(2, 2, 5), Unhealthy, RecoveryNotConfirmed,   6, 0, 1),
            ("HUU",    consecutive(2, 2, 5), Degraded,  RecoveryNotConfirmed,   3, 0, 1),
            ("HUHH",   consecutive(2, 2, 5), Healthy,   RecoveryNotConfirmed,   4, 0, 1),
            ("HHU",    consecutive(2, 2, 5), Healthy,   RecoveryConfirmed,      2, 0, 2),
            ("UHUUU",  consecutive(2, 2, 5), Degraded,  BelowDegradedThreshold, 5, 1, 0),
            ("UHUHU",  consecutive(2, 2, 5), Healthy,   BelowDegradedThreshold, 5, 1, 0),
            ("UHHUUUUU", consecutive(3, 2, 5), Unhealthy, BelowDegradedThreshold, 8, 1, 0),
        ]
        .map(|(history, thresholds, status, rule, runs_considered, failures, successes)| Case {
            history,
            thresholds,
            status,
            rule,
            runs_considered,
            leading_failure_streak: failures,
            leading_success_streak: successes,
            failures_in_window: 0,
        });
        check(&cases);
    }

    #[test]
    fn each_window_rule_reports_its_status_and_facts() {
        use Rule::*;
        use Status::{Degraded, Healthy, Unhealthy};
        let d = Thresholds::Window(WindowThresholds::default());
        #[rustfmt::skip]
        let cases = [
            // history, thresholds, status, rule, considered, failures in window
            ("",                  d, Healthy,   NoRuns,                    0, 0),
            ("UUUUUUU HHH",       d, Unhealthy, UnhealthyThresholdReached, 10, 7),
            ("UHUHUHUUUU HHH",    d, Unhealthy, UnhealthyThresholdReached, 10, 7),
            ("UUUUUU HHHH UUUU",  d, Degraded,  DegradedThresholdReached,  10, 6),
            ("HHHHHHH UUU",       d, Degraded,  DegradedThresholdReached,  10, 3),
            ("DDD",               d, Degraded,  DegradedThresholdReached,  3, 3),
            ("HHHHHHHH UU UUUUU", d, Healthy,   BelowDegradedThreshold,    10, 2),
            ("H",                 d, Healthy,   BelowDegradedThreshold,    1, 0),
            ("UU",                d, Healthy,   BelowDegradedThreshold,    2, 2),
        ]
        .map(|(history, thresholds, status, rule, runs_considered, failures)| Case {
            history,
            thresholds,
            status,
            rule,
            runs_considered,
            leading_failure_streak: 0,
            leading_success_streak: 0,
            failures_in_window: failures,
        });
        check(&cases);
    }

    #[test]
    fn a_single_failure_below_the_degraded_threshold_stays_healthy() {
        let evaluation = evaluate(&runs("U"), &Thresholds::default());
        assert_eq!(evaluation.status, Status::Healthy);
        assert_eq!(evaluation.rule, Rule::BelowDegradedThreshold);
    }

    #[test]
    fn a_blip_keeps_an_unconfirmed_earlier_failure_streak() {
        // Newest first: one failure, one success (two are needed), then five failures.
        assert_eq!(status("U H UUUUU", consecutive(2, 2, 5)), Status::Unhealthy);
    }

    #[test]
    fn runs_beyond_the_newest_hundred_are_ignored() {
        // Alternating runs never decide with two successes required, so evaluation reaches the end
        // of the runs it considers; the five older failures would join run 100 into a streak.
        let mut history: Vec<Status> = (0..MAX_RUNS_CONSIDERED)
            .map(|i| if i % 2 == 0 { Status::Healthy } else { Status::Unhealthy })
            .collect();
        history.extend([Status::Unhealthy; 5]);
        let evaluation = evaluate(&history, &consecutive(2, 2, 5));
        assert_eq!(evaluation.status, Status::Healthy);
        assert_eq!(evaluation.runs_considered, 100);

        let all_failing = vec![Status::Unhealthy; 150];
        let evaluation = evaluate(&all_failing, &Thresholds::default());
        assert_eq!(evaluation.runs_considered, 100);
        assert_eq!(evaluation.leading_failure_streak, 100);

        let mut window_history = vec![Status::Healthy; 100];
        window_history.extend([Status::Unhealthy; 50]);
        let evaluation = evaluate(&window_history, &window(100, 1, 1));
        assert_eq!(evaluation.status, Status::Healthy);
        assert_eq!(evaluation.failures_in_window, 0);
    }

    #[test]
    fn zero_thresholds_are_applied_as_one_and_reported_as_applied() {
        let evaluation = evaluate(&runs("HH"), &consecutive(0, 0, 0));
        assert_eq!(evaluation.status, Status::Healthy);
        assert_eq!(evaluation.thresholds, consecutive(1, 1, 1));

        let evaluation = evaluate(&runs("U"), &consecutive(0, 0, 0));
        assert_eq!(evaluation.status, Status::Unhealthy);

        let evaluation = evaluate(&runs("HHHU"), &window(0, 0, 0));
        assert_eq!(evaluation.status, Status::Healthy);
        assert_eq!(evaluation.runs_considered, 1);
        assert_eq!(evaluation.thresholds, window(1, 1, 1));

        let evaluation = evaluate(&runs("HHHU"), &window(1000, 1, 1));
        assert_eq!(evaluation.status, Status::Unhealthy);
        assert_eq!(evaluation.thresholds, window(100, 1, 1));
    }

    #[test]
    fn a_degraded_threshold_above_the_unhealthy_one_still_reports_unhealthy_first() {
        assert_eq!(status("UUU", consecutive(1, 9, 3)), Status::Unhealthy);
        assert_eq!(status("UUU", window(5, 9, 3)), Status::Unhealthy);
    }

    #[test]
    fn rule_names_are_snake_case() {
        let table = [
            (Rule::NoRuns, "no_runs"),
            (Rule::UnhealthyThresholdReached, "unhealthy_threshold_reached"),
            (Rule::DegradedThresholdReached, "degraded_threshold_reached"),
            (Rule::BelowDegradedThreshold, "below_degraded_threshold"),
            (Rule::RecoveryConfirmed, "recovery_confirmed"),
            (Rule::RecoveryNotConfirmed, "recovery_not_confirmed"),
        ];
        for (rule, name) in table {
            assert_eq!(rule.as_str(), name);
        }
    }

    #[test]
    fn a_system_is_as_bad_as_its_worst_enabled_check() {
        assert_eq!(system_status([]), Status::Healthy);
        assert_eq!(
            system_status([Status::Healthy, Status::Unhealthy, Status::Degraded]),
            Status::Unhealthy
        );
    }

    // ---- monotonicity in failures ----
    //
    // Window mode, and consecutive mode with `healthy_min_success_count = 1`, never get better when
    // a healthy run becomes a failure. Consecutive mode with recovery hysteresis does NOT have this
    // property: a new failure can merge with an older blip into a streak that decides "degraded"
    // before the evaluation reaches an older, longer streak that would have decided "unhealthy".
    // With thresholds 2/2/4 (success/degraded/unhealthy), newest first:
    //   U H U H UUUU -> blip, unconfirmed recovery, blip, unconfirmed recovery, 4 failures: unhealthy
    //   U U U H UUUU -> 3 failures in a row decide first:                                  degraded
    // What does hold in general: a failure never turns a failing check healthy, because a healthy
    // verdict needs a long enough success streak (which a new failure can only shorten) or running
    // out of runs (which a decision by a newer streak only pre-empts). It is also fully monotonic
    // when degraded and unhealthy thresholds are equal, since every failure decision is then
    // "unhealthy".

    #[test]
    fn with_recovery_hysteresis_a_new_failure_can_lower_unhealthy_to_degraded() {
        let t = consecutive(2, 2, 4);
        assert_eq!(status("U H U H UUUU", t), Status::Unhealthy);
        assert_eq!(status("U U U H UUUU", t), Status::Degraded);
    }

    fn any_status() -> impl Strategy<Value = Status> {
        prop::sample::select(Status::ALL.to_vec())
    }

    fn history(max_len: usize) -> impl Strategy<Value = Vec<Status>> {
        prop::collection::vec(any_status(), 0..=max_len)
    }

    fn valid_window() -> impl Strategy<Value = WindowThresholds> {
        (MIN_WINDOW_SIZE..=MAX_WINDOW_SIZE)
            .prop_flat_map(|size| (Just(size), 1..=size))
            .prop_flat_map(|(size, unhealthy)| (Just(size), 1..=unhealthy, Just(unhealthy)))
            .prop_map(|(window_size, degraded, unhealthy)| WindowThresholds {
                window_size,
                degraded_min_failure_count: degraded,
                unhealthy_min_failure_count: unhealthy,
            })
    }

    fn valid_consecutive(healthy: std::ops::RangeInclusive<u32>) -> impl Strategy<Value = ConsecutiveThresholds> {
        (healthy, 1..=110u32)
            .prop_flat_map(|(healthy, unhealthy)| (Just(healthy), 1..=unhealthy, Just(unhealthy)))
            .prop_map(|(healthy, degraded, unhealthy)| ConsecutiveThresholds {
                healthy_min_success_count: healthy,
                degraded_min_failure_count: degraded,
                unhealthy_min_failure_count: unhealthy,
            })
    }

    /// Small thresholds so random histories actually cross them.
    fn small_consecutive(healthy: std::ops::RangeInclusive<u32>) -> impl Strategy<Value = ConsecutiveThresholds> {
        (healthy, 1..=8u32)
            .prop_flat_map(|(healthy, unhealthy)| (Just(healthy), 1..=unhealthy, Just(unhealthy)))
            .prop_map(|(healthy, degraded, unhealthy)| ConsecutiveThresholds {
                healthy_min_success_count: healthy,
                degraded_min_failure_count: degraded,
                unhealthy_min_failure_count: unhealthy,
            })
    }

    /// `history` with one of its healthy runs (chosen by `pick`) turned into `failure`, if it has
    /// any healthy run.
    fn with_one_more_failure(history: &[Status], pick: prop::sample::Index, failure: Status) -> Option<Vec<Status>> {
        let healthy: Vec<usize> = (0..history.len()).filter(|&i| history[i] == Status::Healthy).collect();
        if healthy.is_empty() {
            return None;
        }
        let mut changed = history.to_vec();
        changed[*pick.get(&healthy)] = failure;
        Some(changed)
    }

    fn any_failure() -> impl Strategy<Value = Status> {
        prop::sample::select(vec![Status::Degraded, Status::Unhealthy])
    }

    fn either_consecutive_or_small() -> impl Strategy<Value = ConsecutiveThresholds> {
        prop_oneof![valid_consecutive(1..=1), small_consecutive(1..=1)]
    }

    proptest! {
        #[test]
        fn window_mode_never_improves_when_a_healthy_run_becomes_a_failure(
            t in valid_window(),
            history in history(120),
            pick in any::<prop::sample::Index>(),
            failure in any_failure(),
        ) {
            let thresholds = Thresholds::Window(t);
            if let Some(changed) = with_one_more_failure(&history, pick, failure) {
                prop_assert!(evaluate(&changed, &thresholds).status >= evaluate(&history, &thresholds).status);
            }
        }

        #[test]
        fn consecutive_mode_without_hysteresis_never_improves_when_a_healthy_run_becomes_a_failure(
            t in either_consecutive_or_small(),
            history in history(120),
            pick in any::<prop::sample::Index>(),
            failure in any_failure(),
        ) {
            let thresholds = Thresholds::Consecutive(t);
            if let Some(changed) = with_one_more_failure(&history, pick, failure) {
                prop_assert!(evaluate(&changed, &thresholds).status >= evaluate(&history, &thresholds).status);
            }
        }

        #[test]
        fn consecutive_mode_with_equal_failure_thresholds_never_improves_when_a_healthy_run_becomes_a_failure(
            healthy in 1..=6u32,
            failures in 1..=8u32,
            history in history(120),
            pick in any::<prop::sample::Index>(),
            failure in any_failure(),
        ) {
            let thresholds = consecutive(healthy, failures, failures);
            if let Some(changed) = with_one_more_failure(&history, pick, failure) {
                prop_assert!(evaluate(&changed, &thresholds).status >= evaluate(&history, &thresholds).status);
            }
        }

        #[test]
        fn consecutive_mode_never_turns_a_failing_check_healthy_when_a_healthy_run_becomes_a_failure(
            t in small_consecutive(1..=6),
            history in history(120),
            pick in any::<prop::sample::Index>(),
            failure in any_failure(),
        ) {
            let thresholds = Thresholds::Consecutive(t);
            if let Some(changed) = with_one_more_failure(&history, pick, failure) {
                let before = evaluate(&history, &thresholds).status;
                let after = evaluate(&changed, &thresholds).status;
                prop_assert!(after >= before.min(Status::Degraded), "{before:?} -> {after:?}");
            }
        }

        #[test]
        fn window_mode_ignores_runs_older_than_the_window(
            t in valid_window(),
            seed in history(120),
            older in history(60),
        ) {
            // Only histories that fill the window: a shorter one legitimately grows its window.
            let thresholds = Thresholds::Window(t);
            let size = usize::try_from(t.window_size).unwrap_or(usize::MAX);
            let mut full: Vec<Status> = seed.iter().copied().cycle().take(size).collect();
            full.resize(size, Status::Healthy);
            let mut longer = full.clone();
            longer.extend(older);
            prop_assert_eq!(evaluate(&longer, &thresholds), evaluate(&full, &thresholds));
        }

        #[test]
        fn default_thresholds_equal_upstream_1_5_0(history in history(150)) {
            prop_assert_eq!(
                evaluate(&history, &Thresholds::default()).status,
                upstream_1_5_0(&history, 2, 5)
            );
        }

        #[test]
        fn a_success_count_of_one_equals_upstream_1_5_0_for_any_failure_thresholds(
            t in either_consecutive_or_small(),
            history in history(150),
        ) {
            prop_assert_eq!(
                evaluate(&history, &Thresholds::Consecutive(t)).status,
                upstream_1_5_0(
                    &history,
                    t.degraded_min_failure_count,
                    t.unhealthy_min_failure_count
                )
            );
        }

        #[test]
        fn consecutive_evaluation_equals_its_recursive_definition(
            t in small_consecutive(1..=6),
            history in history(120),
        ) {
            let capped = &history[..history.len().min(MAX_RUNS_CONSIDERED)];
            let evaluation = evaluate(&history, &Thresholds::Consecutive(t));
            prop_assert_eq!(
                (evaluation.status, evaluation.runs_considered),
                recursive_definition(capped, &t, 0)
            );
        }

        #[test]
        fn evaluation_never_panics_and_stays_within_the_runs_it_may_consider(
            thresholds in any_thresholds(),
            history in history(250),
        ) {
            let evaluation = evaluate(&history, &thresholds);
            let limit = count(history.len().min(MAX_RUNS_CONSIDERED));
            prop_assert!(evaluation.runs_considered <= limit);
            prop_assert!(evaluation.leading_failure_streak <= evaluation.runs_considered);
            prop_assert!(evaluation.leading_success_streak <= evaluation.runs_considered);
            prop_assert!(evaluation.failures_in_window <= evaluation.runs_considered);
            prop_assert!(evaluation.leading_failure_streak == 0 || evaluation.leading_success_streak == 0);
            prop_assert_eq!(evaluation.mode, thresholds.mode());
            prop_assert_eq!(evaluation.rule == Rule::NoRuns, history.is_empty());
        }
    }

    fn any_thresholds() -> impl Strategy<Value = Thresholds> {
        let count = || prop_oneof![0..=6u32, any::<u32>()];
        prop_oneof![
            (count(), count(), count()).prop_map(|(h, d, u)| consecutive(h, d, u)),
            (count(), count(), count()).prop_map(|(s, d, u)| window(s, d, u)),
        ]
    }

    /// Upstream 1.5.0's consecutive rule, written from its description: only the newest failure
    /// streak matters, and anything that does not reach a failure threshold is healthy.
    fn upstream_1_5_0(history: &[Status], degraded: u32, unhealthy: u32) -> Status {
        let failures = count(history.iter().take_while(|s| s.is_failure()).count());
        if failures >= unhealthy {
            Status::Unhealthy
        } else if failures >= degraded {
            Status::Degraded
        } else {
            Status::Healthy
        }
    }

    /// The consecutive rule exactly as specified, recursively: `(status, runs examined)`, where
    /// `skipped` counts the runs already examined before `history`.
    fn recursive_definition(history: &[Status], t: &ConsecutiveThresholds, skipped: u32) -> (Status, u32) {
        let Some(first) = history.first() else {
            return (Status::Healthy, skipped);
        };
        let len = history
            .iter()
            .take_while(|s| s.is_failure() == first.is_failure())
            .count();
        let examined = skipped + count(len);
        let streak = count(len);
        if first.is_failure() {
            if streak >= t.unhealthy_min_failure_count {
                return (Status::Unhealthy, examined);
            }
            if streak >= t.degraded_min_failure_count {
                return (Status::Degraded, examined);
            }
        } else if streak >= t.healthy_min_success_count {
            return (Status::Healthy, examined);
        }
        recursive_definition(&history[len..], t, examined)
    }
}
