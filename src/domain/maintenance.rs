//! Maintenance windows: planned periods in which a system's changes are
//! expected, so notifiers stay quiet and uptime leaves the time out.
//!
//! A system's windows never overlap: a new window that overlaps or touches
//! existing ones is merged with them into one spanning all of them (and
//! takes the new reason), so setting the same window twice changes nothing
//! and a client never has to find and edit the window it meant.

use chrono::{DateTime, TimeDelta, Utc};

use super::FieldViolation;

/// The longest reason, in UTF-8 bytes.
pub const MAX_REASON_BYTES: usize = 1024;
/// The most open and upcoming windows a system may have: each is in every
/// GetSystemHealth reply.
pub const MAX_OPEN_WINDOWS: usize = 100;
/// How far ahead a window may end.
pub const MAX_WINDOW_AHEAD: TimeDelta = TimeDelta::days(366);

/// One window of a system: open from `starts_at` (inclusive) to `ends_at`
/// (exclusive).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MaintenanceWindow {
    /// When it opens.
    pub starts_at: DateTime<Utc>,
    /// When it closes; after `starts_at`.
    pub ends_at: DateTime<Utc>,
    /// Why.
    pub reason: String,
}

impl MaintenanceWindow {
    /// A window requested at `now`, with every problem of it at once: it must
    /// close after it opens, in the future, at most [`MAX_WINDOW_AHEAD`]
    /// from `now`, with a reason of at most [`MAX_REASON_BYTES`] bytes
    /// without control characters other than line breaks and tabs.
    pub fn requested(
        starts_at: DateTime<Utc>,
        ends_at: DateTime<Utc>,
        reason: String,
        now: DateTime<Utc>,
    ) -> Result<MaintenanceWindow, Vec<FieldViolation>> {
        let mut problems = Vec::new();
        if ends_at <= starts_at {
            problems.push(FieldViolation::new("ends_at", "must be after starts_at"));
        } else if ends_at <= now {
            problems.push(FieldViolation::new("ends_at", "must be in the future"));
        } else if ends_at > now + MAX_WINDOW_AHEAD {
            problems.push(FieldViolation::new("ends_at", "must be at most 366 days from now"));
        }
        if reason.len() > MAX_REASON_BYTES {
            problems.push(FieldViolation::new(
                "reason",
                format!("must be at most {MAX_REASON_BYTES} bytes"),
            ));
        } else if reason
            .chars()
            .any(|c| c.is_control() && !matches!(c, '\n' | '\r' | '\t'))
        {
            problems.push(FieldViolation::new("reason", "must not contain control characters"));
        }
        if problems.is_empty() {
            Ok(MaintenanceWindow {
                starts_at,
                ends_at,
                reason,
            })
        } else {
            Err(problems)
        }
    }

    /// Whether the window is open at `t`.
    pub fn is_open_at(&self, t: DateTime<Utc>) -> bool {
        self.starts_at <= t && t < self.ends_at
    }

    /// Whether the two windows share a moment or one ends where the other
    /// starts: such windows are merged.
    pub fn meets(&self, other: &MaintenanceWindow) -> bool {
        self.starts_at <= other.ends_at && other.starts_at <= self.ends_at
    }
}

/// `new` merged with those of `existing` it meets (transitively: a window
/// grown by a merge may meet another), and the start times of the existing
/// windows it replaces.
pub fn merge(new: MaintenanceWindow, existing: &[MaintenanceWindow]) -> (MaintenanceWindow, Vec<DateTime<Utc>>) {
    let mut merged = new;
    let mut replaced: Vec<DateTime<Utc>> = Vec::new();
    loop {
        let mut grew = false;
        for window in existing {
            if !replaced.contains(&window.starts_at) && merged.meets(window) {
                merged.starts_at = merged.starts_at.min(window.starts_at);
                merged.ends_at = merged.ends_at.max(window.ends_at);
                replaced.push(window.starts_at);
                grew = true;
            }
        }
        if !grew {
            replaced.sort_unstable();
            return (merged, replaced);
        }
    }
}

/// How much of `[from, to)` the windows cover, each moment counted once.
pub fn covered(windows: &[MaintenanceWindow], from: DateTime<Utc>, to: DateTime<Utc>) -> TimeDelta {
    let mut spans: Vec<(DateTime<Utc>, DateTime<Utc>)> = windows
        .iter()
        .map(|w| (w.starts_at.max(from), w.ends_at.min(to)))
        .filter(|(a, b)| a < b)
        .collect();
    spans.sort_unstable();
    let mut total = TimeDelta::zero();
    let mut current: Option<(DateTime<Utc>, DateTime<Utc>)> = None;
    for (a, b) in spans {
        current = match current {
            Some((ca, cb)) if a <= cb => Some((ca, cb.max(b))),
            Some((ca, cb)) => {
                total += cb - ca;
                Some((a, b))
            }
            None => Some((a, b)),
        };
    }
    if let Some((ca, cb)) = current {
        total += cb - ca;
    }
    total
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn t(seconds: i64) -> DateTime<Utc> {
        DateTime::from_timestamp(1_800_000_000 + seconds, 0).unwrap()
    }

    fn w(from: i64, to: i64, reason: &str) -> MaintenanceWindow {
        MaintenanceWindow {
            starts_at: t(from),
            ends_at: t(to),
            reason: reason.to_owned(),
        }
    }

    #[test]
    fn a_window_that_started_in_the_past_and_ends_in_the_future_is_accepted() {
        let window = MaintenanceWindow::requested(t(-60), t(60), "deploy".into(), t(0)).unwrap();
        assert!(window.is_open_at(t(0)));
        assert!(window.is_open_at(t(-60)), "open from its start");
        assert!(!window.is_open_at(t(60)), "closed at its end");
    }

    #[test]
    fn a_window_in_the_past_backwards_or_too_far_ahead_is_refused_naming_the_field() {
        let field = |r: Result<MaintenanceWindow, Vec<FieldViolation>>| {
            r.unwrap_err().into_iter().map(|v| v.field).collect::<Vec<_>>()
        };
        assert_eq!(
            field(MaintenanceWindow::requested(t(-60), t(-1), String::new(), t(0))),
            ["ends_at"]
        );
        assert_eq!(
            field(MaintenanceWindow::requested(t(60), t(60), String::new(), t(0))),
            ["ends_at"]
        );
        let too_far = t(0) + MAX_WINDOW_AHEAD + TimeDelta::seconds(1);
        assert_eq!(
            field(MaintenanceWindow::requested(t(0), too_far, String::new(), t(0))),
            ["ends_at"]
        );
        assert_eq!(
            field(MaintenanceWindow::requested(t(0), t(1), "x".repeat(1025), t(0))),
            ["reason"]
        );
        assert_eq!(
            field(MaintenanceWindow::requested(t(0), t(1), "bell\u{7}".into(), t(0))),
            ["reason"]
        );
        assert!(MaintenanceWindow::requested(t(0), t(1), "line\nbreak".into(), t(0)).is_ok());
    }

    #[test]
    fn overlapping_and_touching_windows_merge_into_one_with_the_new_reason() {
        let existing = [w(0, 10, "a"), w(20, 30, "b"), w(40, 50, "c")];
        // Touches the first, overlaps the second: both merge, the third stays.
        let (merged, replaced) = merge(w(10, 25, "new"), &existing);
        assert_eq!(merged, w(0, 30, "new"));
        assert_eq!(replaced, [t(0), t(20)]);
        // The same request again replaces the merged window with itself.
        let (again, replaced) = merge(w(10, 25, "new"), &[merged.clone(), w(40, 50, "c")]);
        assert_eq!(again, merged);
        assert_eq!(replaced, [t(0)]);
        // Apart from everything: nothing replaced.
        assert_eq!(merge(w(60, 70, "d"), &existing), (w(60, 70, "d"), vec![]));
    }

    #[test]
    fn covered_time_counts_each_moment_once_and_only_inside_the_range() {
        let windows = [w(0, 10, ""), w(5, 15, ""), w(20, 30, "")];
        assert_eq!(covered(&windows, t(0), t(100)), TimeDelta::seconds(25));
        assert_eq!(covered(&windows, t(8), t(25)), TimeDelta::seconds(12));
        assert_eq!(covered(&[], t(0), t(100)), TimeDelta::zero());
    }

    proptest! {
        #[test]
        fn a_merged_window_covers_everything_it_replaced_and_meets_nothing_it_left(
            spans in proptest::collection::vec((0i64..200, 1i64..30), 0..8),
            new in (0i64..200, 1i64..30),
        ) {
            // Existing windows never overlap: keep only those that do not.
            let mut existing: Vec<MaintenanceWindow> = Vec::new();
            for (start, len) in spans {
                let candidate = w(start, start + len, "");
                if existing.iter().all(|e| !e.meets(&candidate)) {
                    existing.push(candidate);
                }
            }
            let (merged, replaced) = merge(w(new.0, new.0 + new.1, "n"), &existing);
            prop_assert!(merged.starts_at <= t(new.0) && merged.ends_at >= t(new.0 + new.1));
            for e in &existing {
                if replaced.contains(&e.starts_at) {
                    prop_assert!(merged.starts_at <= e.starts_at && e.ends_at <= merged.ends_at);
                } else {
                    prop_assert!(!merged.meets(e));
                }
            }
            let mut after: Vec<MaintenanceWindow> =
                existing.iter().filter(|e| !replaced.contains(&e.starts_at)).cloned().collect();
            after.push(merged.clone());
            // Nothing of the old cover is lost.
            let before = covered(&existing, t(-10), t(300));
            let before_and_new = covered(&[existing.clone(), vec![w(new.0, new.0 + new.1, "")]].concat(), t(-10), t(300));
            let now_covered = covered(&after, t(-10), t(300));
            prop_assert!(now_covered >= before);
            prop_assert_eq!(now_covered, before_and_new);
        }
    }
}
