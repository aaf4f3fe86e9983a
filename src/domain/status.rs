//! The three statuses a run, a check or a system can have.
//!
//! The variants are declared in order of severity so that `Ord` answers "which is worse", which is
//! all the aggregation of a system needs.

use std::fmt;

/// The status of a run, of a check, or of a system.
///
/// Ordered by severity: `Healthy < Degraded < Unhealthy`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Status {
    /// Working as expected.
    Healthy,
    /// Working, but impaired. Counts as a failure for thresholds.
    Degraded,
    /// Not working. Counts as a failure for thresholds.
    Unhealthy,
}

impl Status {
    /// Every status, mildest first.
    pub const ALL: [Status; 3] = [Status::Healthy, Status::Degraded, Status::Unhealthy];

    /// Whether a run with this status counts towards the failure thresholds.
    ///
    /// A degraded run is a failure too: thresholds count "not fully working", and the severity of
    /// the result comes from how many such runs there are, not from how bad each one was.
    pub fn is_failure(self) -> bool {
        matches!(self, Status::Degraded | Status::Unhealthy)
    }

    /// The lowercase name used in storage and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Healthy => "healthy",
            Status::Degraded => "degraded",
            Status::Unhealthy => "unhealthy",
        }
    }

    /// The inverse of [`Status::as_str`]; anything else is `None`.
    pub fn parse(s: &str) -> Option<Status> {
        Status::ALL.into_iter().find(|status| status.as_str() == s)
    }

    /// The number of this status in the `vitals.v1.HealthStatus` proto enum (and in storage).
    pub fn as_i16(self) -> i16 {
        match self {
            Status::Healthy => 1,
            Status::Degraded => 2,
            Status::Unhealthy => 3,
        }
    }

    /// The inverse of [`Status::as_i16`]; `0` (unspecified) and unknown numbers are `None`.
    pub fn from_i16(value: i16) -> Option<Status> {
        Status::ALL.into_iter().find(|status| status.as_i16() == value)
    }
}

impl fmt::Display for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The most severe of `statuses`, or `Healthy` when there are none.
///
/// Nothing known to be wrong is reported as healthy, the same baseline a system without runs has.
pub fn worst<I: IntoIterator<Item = Status>>(statuses: I) -> Status {
    statuses.into_iter().max().unwrap_or(Status::Healthy)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn severity_orders_healthy_below_degraded_below_unhealthy() {
        assert!(Status::Healthy < Status::Degraded);
        assert!(Status::Degraded < Status::Unhealthy);
    }

    #[test]
    fn degraded_and_unhealthy_are_failures_and_healthy_is_not() {
        assert!(!Status::Healthy.is_failure());
        assert!(Status::Degraded.is_failure());
        assert!(Status::Unhealthy.is_failure());
    }

    #[test]
    fn names_are_lowercase_and_round_trip() {
        let table = [
            (Status::Healthy, "healthy"),
            (Status::Degraded, "degraded"),
            (Status::Unhealthy, "unhealthy"),
        ];
        for (status, name) in table {
            assert_eq!(status.as_str(), name);
            assert_eq!(status.to_string(), name);
            assert_eq!(Status::parse(name), Some(status));
        }
    }

    #[test]
    fn parsing_rejects_unknown_and_differently_cased_names() {
        for name in ["", "HEALTHY", "Healthy", "ok", " healthy", "unspecified"] {
            assert_eq!(Status::parse(name), None, "{name:?}");
        }
    }

    #[test]
    fn numbers_match_the_proto_enum_and_round_trip() {
        let table = [(Status::Healthy, 1), (Status::Degraded, 2), (Status::Unhealthy, 3)];
        for (status, number) in table {
            assert_eq!(status.as_i16(), number);
            assert_eq!(Status::from_i16(number), Some(status));
        }
    }

    #[test]
    fn unspecified_and_unknown_numbers_are_not_statuses() {
        for number in [0, -1, 4, i16::MIN, i16::MAX] {
            assert_eq!(Status::from_i16(number), None, "{number}");
        }
    }

    #[test]
    fn the_worst_of_nothing_is_healthy() {
        assert_eq!(worst([]), Status::Healthy);
    }

    #[test]
    fn the_worst_status_wins_regardless_of_order() {
        use Status::{Degraded as D, Healthy as H, Unhealthy as U};
        let table: [(&[Status], Status); 6] = [
            (&[H], H),
            (&[H, H], H),
            (&[H, D], D),
            (&[D, H], D),
            (&[U, D, H], U),
            (&[H, D, U, H], U),
        ];
        for (statuses, expected) in table {
            assert_eq!(worst(statuses.iter().copied()), expected, "{statuses:?}");
        }
    }
}
