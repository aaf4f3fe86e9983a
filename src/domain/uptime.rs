//! Uptime: how a system's time divides between healthy, degraded and
//! unhealthy, from its transitions, exact to the microsecond.
//!
//! A system's status is a step function whose steps are its transitions, so
//! the time in each status is the sum of the steps' lengths. Time in a
//! maintenance window is counted apart and left out of the shares: planned
//! work is not an outage. Time before the system was first written is not
//! counted at all. The status before the oldest transition read is that
//! transition's `from`, which is what lets the count start at a window's
//! edge even after retention removed older transitions.

use chrono::{DateTime, TimeDelta, Utc};

use super::{MaintenanceWindow, Status, covered};

/// One change of a system's status.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StatusChange {
    /// When it was recorded.
    pub at: DateTime<Utc>,
    /// The status before.
    pub from: Status,
    /// The status after.
    pub to: Status,
}

/// The time of a range in each status, and in maintenance.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Uptime {
    /// Where counting started: the later of the range's start and the
    /// system's creation.
    pub counted_from: DateTime<Utc>,
    /// Healthy, outside maintenance.
    pub healthy: TimeDelta,
    /// Degraded, outside maintenance.
    pub degraded: TimeDelta,
    /// Unhealthy, outside maintenance.
    pub unhealthy: TimeDelta,
    /// In maintenance, whatever the status.
    pub maintenance: TimeDelta,
}

impl Uptime {
    /// The share of `status` in the time outside maintenance, as a
    /// percentage; 0 when no such time was counted.
    pub fn percent(&self, status: Status) -> f64 {
        let part = match status {
            Status::Healthy => self.healthy,
            Status::Degraded => self.degraded,
            Status::Unhealthy => self.unhealthy,
        };
        let total = self.healthy + self.degraded + self.unhealthy;
        match (part.num_microseconds(), total.num_microseconds()) {
            (Some(part), Some(total)) if total > 0 => {
                #[allow(clippy::cast_precision_loss)]
                let share = part as f64 * 100.0 / total as f64;
                share
            }
            _ => 0.0,
        }
    }
}

/// Folds a system's transitions, oldest first, into its [`Uptime`] over
/// `[from, to)`: fed in pages, so a long history is never held at once.
#[derive(Debug, Clone)]
pub struct UptimeCount<'a> {
    to: DateTime<Utc>,
    windows: &'a [MaintenanceWindow],
    /// The status since `cursor`; `None` until the first change is seen.
    status: Option<Status>,
    cursor: DateTime<Utc>,
    uptime: Uptime,
}

impl<'a> UptimeCount<'a> {
    /// A count over `[from, to)` of a system created at `created_at`, with
    /// its maintenance `windows`.
    pub fn new(
        from: DateTime<Utc>,
        to: DateTime<Utc>,
        created_at: DateTime<Utc>,
        windows: &'a [MaintenanceWindow],
    ) -> Self {
        let start = from.max(created_at).min(to);
        UptimeCount {
            to,
            windows,
            status: None,
            cursor: start,
            uptime: Uptime {
                counted_from: start,
                healthy: TimeDelta::zero(),
                degraded: TimeDelta::zero(),
                unhealthy: TimeDelta::zero(),
                maintenance: covered(windows, start, to),
            },
        }
    }

    /// Adds the time in `status` from the cursor to `until`.
    fn advance(&mut self, status: Status, until: DateTime<Utc>) {
        let until = until.min(self.to);
        if until <= self.cursor {
            return;
        }
        let outside = (until - self.cursor) - covered(self.windows, self.cursor, until);
        match status {
            Status::Healthy => self.uptime.healthy += outside,
            Status::Degraded => self.uptime.degraded += outside,
            Status::Unhealthy => self.uptime.unhealthy += outside,
        }
        self.cursor = until;
    }

    /// The next transition (in sequence order). One recorded before the
    /// counted range only sets the status the range starts in.
    pub fn push(&mut self, change: StatusChange) {
        let before = self.status.unwrap_or(change.from);
        self.advance(before, change.at);
        self.status = Some(change.to);
    }

    /// The uptime, the system's status being `current` now (what it has
    /// been since the last transition, or always without one).
    pub fn finish(mut self, current: Status) -> Uptime {
        let status = self.status.unwrap_or(current);
        self.advance(status, self.to);
        self.uptime
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use proptest::prelude::*;

    use super::*;
    use Status::{Degraded, Healthy, Unhealthy};

    fn t(seconds: i64) -> DateTime<Utc> {
        DateTime::from_timestamp(1_800_000_000 + seconds, 0).unwrap()
    }

    fn change(at: i64, from: Status, to: Status) -> StatusChange {
        StatusChange { at: t(at), from, to }
    }

    fn secs(n: i64) -> TimeDelta {
        TimeDelta::seconds(n)
    }

    fn count(
        from: i64,
        to: i64,
        created: i64,
        windows: &[MaintenanceWindow],
        changes: &[StatusChange],
        current: Status,
    ) -> Uptime {
        let mut c = UptimeCount::new(t(from), t(to), t(created), windows);
        for ch in changes {
            c.push(*ch);
        }
        c.finish(current)
    }

    #[test]
    fn the_time_between_transitions_goes_to_the_status_they_left_the_system_in() {
        let changes = [
            change(10, Healthy, Degraded),
            change(40, Degraded, Unhealthy),
            change(70, Unhealthy, Healthy),
        ];
        let up = count(0, 100, -1000, &[], &changes, Healthy);
        assert_eq!((up.healthy, up.degraded, up.unhealthy), (secs(40), secs(30), secs(30)));
        assert!((up.percent(Healthy) - 40.0).abs() < 1e-9);
    }

    #[test]
    fn the_status_before_the_oldest_transition_kept_is_its_from() {
        // Retention removed what came before 50: the range starts unhealthy.
        let up = count(0, 100, -1000, &[], &[change(50, Unhealthy, Healthy)], Healthy);
        assert_eq!((up.healthy, up.unhealthy), (secs(50), secs(50)));
        // A transition before the range only sets the starting status.
        let up = count(0, 100, -1000, &[], &[change(-500, Healthy, Degraded)], Degraded);
        assert_eq!(up.degraded, secs(100));
        assert_eq!(up.counted_from, t(0));
    }

    #[test]
    fn without_transitions_the_whole_range_is_in_the_current_status() {
        let up = count(0, 100, -1000, &[], &[], Degraded);
        assert_eq!(up.degraded, secs(100));
        assert!((up.percent(Degraded) - 100.0).abs() < 1e-9);
    }

    #[test]
    fn time_before_the_system_existed_is_not_counted() {
        let up = count(0, 100, 60, &[], &[], Healthy);
        assert_eq!((up.counted_from, up.healthy), (t(60), secs(40)));
        let none = count(0, 100, 200, &[], &[], Healthy);
        assert_eq!(none.healthy + none.degraded + none.unhealthy, TimeDelta::zero());
        assert!(none.percent(Healthy).abs() < f64::EPSILON, "no time counted: 0 %");
    }

    #[test]
    fn maintenance_time_is_reported_apart_and_left_out_of_the_shares() {
        let windows = [MaintenanceWindow {
            starts_at: t(20),
            ends_at: t(60),
            reason: String::new(),
        }];
        let changes = [change(30, Healthy, Unhealthy), change(50, Unhealthy, Healthy)];
        let up = count(0, 100, -1000, &windows, &changes, Healthy);
        assert_eq!(up.maintenance, secs(40));
        assert_eq!((up.healthy, up.unhealthy), (secs(60), TimeDelta::zero()));
        assert!((up.percent(Healthy) - 100.0).abs() < 1e-9);
    }

    fn status() -> impl Strategy<Value = Status> {
        prop_oneof![Just(Healthy), Just(Degraded), Just(Unhealthy)]
    }

    proptest! {
        #[test]
        fn the_parts_always_add_up_to_the_counted_range(
            steps in proptest::collection::vec((1i64..50, status()), 0..20),
            first in status(),
            window in proptest::option::of((0i64..300, 1i64..100)),
            from in 0i64..200,
            len in 0i64..400,
        ) {
            let mut changes = Vec::new();
            let (mut at, mut previous) = (0, first);
            for (gap, to) in steps {
                at += gap;
                if to != previous {
                    changes.push(change(at, previous, to));
                    previous = to;
                }
            }
            let windows: Vec<MaintenanceWindow> = window
                .map(|(s, l)| MaintenanceWindow { starts_at: t(s), ends_at: t(s + l), reason: String::new() })
                .into_iter()
                .collect();
            let up = count(from, from + len, 0, &windows, &changes, previous);
            prop_assert_eq!(up.healthy + up.degraded + up.unhealthy + up.maintenance, secs(len));
            let shares = up.percent(Healthy) + up.percent(Degraded) + up.percent(Unhealthy);
            prop_assert!(shares.abs() < 1e-9 || (shares - 100.0).abs() < 1e-6);
        }
    }
}
