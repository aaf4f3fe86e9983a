//! The limits that turn a history of runs into a status, and their validation.
//!
//! Validation lives next to the types so every entry point (the API, configuration, a stored row)
//! applies the same limits, and it reports every problem at once so a client fixes its input in a
//! single round trip.

use super::FieldViolation;

/// The smallest accepted `window_size`: with fewer runs a window is just a streak.
pub const MIN_WINDOW_SIZE: u32 = 3;

/// The largest accepted `window_size`: evaluation never looks at more runs than this.
pub const MAX_WINDOW_SIZE: u32 = 100;

/// Judge a check by the streak of its newest runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ConsecutiveThresholds {
    /// Successes in a row needed to confirm recovery; fewer keep the earlier status (hysteresis).
    pub healthy_min_success_count: u32,
    /// Failures in a row that make the check degraded.
    pub degraded_min_failure_count: u32,
    /// Failures in a row that make the check unhealthy.
    pub unhealthy_min_failure_count: u32,
}

impl Default for ConsecutiveThresholds {
    fn default() -> Self {
        Self {
            healthy_min_success_count: 1,
            degraded_min_failure_count: 2,
            unhealthy_min_failure_count: 5,
        }
    }
}

/// Judge a check by the failures among its newest runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct WindowThresholds {
    /// How many of the newest runs are counted.
    pub window_size: u32,
    /// Failures in the window that make the check degraded.
    pub degraded_min_failure_count: u32,
    /// Failures in the window that make the check unhealthy.
    pub unhealthy_min_failure_count: u32,
}

impl Default for WindowThresholds {
    fn default() -> Self {
        Self {
            window_size: 10,
            degraded_min_failure_count: 3,
            unhealthy_min_failure_count: 7,
        }
    }
}

/// The evaluation mode of a check together with its limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Thresholds {
    /// Streak based evaluation.
    Consecutive(ConsecutiveThresholds),
    /// Window based evaluation.
    Window(WindowThresholds),
}

impl Default for Thresholds {
    /// The consecutive defaults, which is what a check without thresholds gets.
    fn default() -> Self {
        Thresholds::Consecutive(ConsecutiveThresholds::default())
    }
}

/// The rule family of a [`Thresholds`], without its limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Mode {
    /// Streak based evaluation.
    Consecutive,
    /// Window based evaluation.
    Window,
}

impl Mode {
    /// The lowercase name used in storage and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Consecutive => "consecutive",
            Mode::Window => "window",
        }
    }
}

impl Thresholds {
    /// Which rule family these thresholds select.
    pub fn mode(&self) -> Mode {
        match self {
            Thresholds::Consecutive(_) => Mode::Consecutive,
            Thresholds::Window(_) => Mode::Window,
        }
    }

    /// Checks the limits, reporting every violation at once.
    ///
    /// `field_prefix` is the path of these thresholds in the request (e.g. `thresholds`), so the
    /// violations name fields like `thresholds.window.window_size`.
    ///
    /// A relation between two fields (degraded at most unhealthy, unhealthy at most the window) is
    /// only checked when both fields are valid on their own: "must be at most 0" would send the
    /// client after the wrong field.
    pub fn validate(&self, field_prefix: &str) -> Result<(), Vec<FieldViolation>> {
        let mut violations = Vec::new();
        match self {
            Thresholds::Consecutive(t) => {
                let path = |name: &str| format!("{field_prefix}.consecutive.{name}");
                // No other field relates to the success count, so its validity is not needed.
                at_least_one(
                    &mut violations,
                    path("healthy_min_success_count"),
                    t.healthy_min_success_count,
                );
                let degraded_ok = at_least_one(
                    &mut violations,
                    path("degraded_min_failure_count"),
                    t.degraded_min_failure_count,
                );
                let unhealthy_ok = at_least_one(
                    &mut violations,
                    path("unhealthy_min_failure_count"),
                    t.unhealthy_min_failure_count,
                );
                if degraded_ok && unhealthy_ok && t.degraded_min_failure_count > t.unhealthy_min_failure_count {
                    violations.push(degraded_above_unhealthy(
                        path("degraded_min_failure_count"),
                        t.unhealthy_min_failure_count,
                    ));
                }
            }
            Thresholds::Window(t) => {
                let path = |name: &str| format!("{field_prefix}.window.{name}");
                let window_ok = (MIN_WINDOW_SIZE..=MAX_WINDOW_SIZE).contains(&t.window_size);
                if !window_ok {
                    violations.push(FieldViolation::new(
                        path("window_size"),
                        format!("must be between {MIN_WINDOW_SIZE} and {MAX_WINDOW_SIZE}"),
                    ));
                }
                let degraded_ok = at_least_one(
                    &mut violations,
                    path("degraded_min_failure_count"),
                    t.degraded_min_failure_count,
                );
                let unhealthy_ok = at_least_one(
                    &mut violations,
                    path("unhealthy_min_failure_count"),
                    t.unhealthy_min_failure_count,
                );
                if degraded_ok && unhealthy_ok && t.degraded_min_failure_count > t.unhealthy_min_failure_count {
                    violations.push(degraded_above_unhealthy(
                        path("degraded_min_failure_count"),
                        t.unhealthy_min_failure_count,
                    ));
                }
                if window_ok && unhealthy_ok && t.unhealthy_min_failure_count > t.window_size {
                    violations.push(FieldViolation::new(
                        path("unhealthy_min_failure_count"),
                        format!("must be between 1 and window_size ({})", t.window_size),
                    ));
                }
            }
        }
        if violations.is_empty() { Ok(()) } else { Err(violations) }
    }
}

/// Records a violation when `count` is zero and says whether it was valid.
fn at_least_one(violations: &mut Vec<FieldViolation>, field: String, count: u32) -> bool {
    if count == 0 {
        violations.push(FieldViolation::new(field, "must be at least 1"));
        return false;
    }
    true
}

fn degraded_above_unhealthy(field: String, unhealthy: u32) -> FieldViolation {
    FieldViolation::new(
        field,
        format!("must be between 1 and unhealthy_min_failure_count ({unhealthy})"),
    )
}

/// Shorthands for thresholds in the domain's tests.
#[cfg(test)]
pub(crate) mod shorthand {
    use super::{ConsecutiveThresholds, Thresholds, WindowThresholds};

    pub(crate) fn consecutive(healthy: u32, degraded: u32, unhealthy: u32) -> Thresholds {
        Thresholds::Consecutive(ConsecutiveThresholds {
            healthy_min_success_count: healthy,
            degraded_min_failure_count: degraded,
            unhealthy_min_failure_count: unhealthy,
        })
    }

    pub(crate) fn window(size: u32, degraded: u32, unhealthy: u32) -> Thresholds {
        Thresholds::Window(WindowThresholds {
            window_size: size,
            degraded_min_failure_count: degraded,
            unhealthy_min_failure_count: unhealthy,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::shorthand::{consecutive, window};
    use super::*;

    /// The violations as `(field, description)` pairs, empty when valid.
    fn violations(thresholds: Thresholds) -> Vec<(String, String)> {
        match thresholds.validate("thresholds") {
            Ok(()) => Vec::new(),
            Err(violations) => violations.into_iter().map(|v| (v.field, v.description)).collect(),
        }
    }

    fn pairs(expected: &[(&str, &str)]) -> Vec<(String, String)> {
        expected
            .iter()
            .map(|(field, description)| ((*field).to_owned(), (*description).to_owned()))
            .collect()
    }

    #[test]
    fn the_defaults_match_upstream() {
        assert_eq!(Thresholds::default(), consecutive(1, 2, 5));
        assert_eq!(Thresholds::Window(WindowThresholds::default()), window(10, 3, 7));
    }

    #[test]
    fn the_mode_follows_the_variant() {
        assert_eq!(consecutive(1, 2, 5).mode(), Mode::Consecutive);
        assert_eq!(window(10, 3, 7).mode(), Mode::Window);
        assert_eq!(Mode::Consecutive.as_str(), "consecutive");
        assert_eq!(Mode::Window.as_str(), "window");
    }

    #[test]
    fn the_defaults_are_valid() {
        assert_eq!(Thresholds::default().validate("thresholds"), Ok(()));
        assert_eq!(
            Thresholds::Window(WindowThresholds::default()).validate("thresholds"),
            Ok(())
        );
    }

    #[test]
    fn valid_thresholds_at_the_edges_of_their_ranges_are_accepted() {
        let table = [
            consecutive(1, 1, 1),
            consecutive(1, 2, 2),
            consecutive(7, 1, 100),
            consecutive(u32::MAX, u32::MAX, u32::MAX),
            window(3, 1, 1),
            window(3, 3, 3),
            window(100, 1, 100),
            window(100, 100, 100),
            window(10, 7, 7),
        ];
        for thresholds in table {
            assert_eq!(thresholds.validate("thresholds"), Ok(()), "{thresholds:?}");
        }
    }

    #[test]
    fn each_consecutive_violation_names_its_field_and_the_accepted_range() {
        let table: [(Thresholds, &[(&str, &str)]); 4] = [
            (
                consecutive(0, 2, 5),
                &[("thresholds.consecutive.healthy_min_success_count", "must be at least 1")],
            ),
            (
                consecutive(1, 0, 5),
                &[(
                    "thresholds.consecutive.degraded_min_failure_count",
                    "must be at least 1",
                )],
            ),
            (
                consecutive(1, 2, 0),
                &[(
                    "thresholds.consecutive.unhealthy_min_failure_count",
                    "must be at least 1",
                )],
            ),
            (
                consecutive(1, 6, 5),
                &[(
                    "thresholds.consecutive.degraded_min_failure_count",
                    "must be between 1 and unhealthy_min_failure_count (5)",
                )],
            ),
        ];
        for (thresholds, expected) in table {
            assert_eq!(violations(thresholds), pairs(expected), "{thresholds:?}");
        }
    }

    #[test]
    fn each_window_violation_names_its_field_and_the_accepted_range() {
        let table: [(Thresholds, &[(&str, &str)]); 8] = [
            (
                window(2, 1, 2),
                &[("thresholds.window.window_size", "must be between 3 and 100")],
            ),
            (
                window(0, 1, 2),
                &[("thresholds.window.window_size", "must be between 3 and 100")],
            ),
            (
                window(101, 3, 7),
                &[("thresholds.window.window_size", "must be between 3 and 100")],
            ),
            (
                window(10, 0, 7),
                &[("thresholds.window.degraded_min_failure_count", "must be at least 1")],
            ),
            (
                window(10, 3, 0),
                &[("thresholds.window.unhealthy_min_failure_count", "must be at least 1")],
            ),
            (
                window(10, 8, 7),
                &[(
                    "thresholds.window.degraded_min_failure_count",
                    "must be between 1 and unhealthy_min_failure_count (7)",
                )],
            ),
            (
                window(10, 3, 11),
                &[(
                    "thresholds.window.unhealthy_min_failure_count",
                    "must be between 1 and window_size (10)",
                )],
            ),
            (
                window(5, 6, 6),
                &[(
                    "thresholds.window.unhealthy_min_failure_count",
                    "must be between 1 and window_size (5)",
                )],
            ),
        ];
        for (thresholds, expected) in table {
            assert_eq!(violations(thresholds), pairs(expected), "{thresholds:?}");
        }
    }

    #[test]
    fn every_consecutive_violation_is_reported_at_once() {
        assert_eq!(
            violations(consecutive(0, 0, 0)),
            pairs(&[
                ("thresholds.consecutive.healthy_min_success_count", "must be at least 1"),
                (
                    "thresholds.consecutive.degraded_min_failure_count",
                    "must be at least 1"
                ),
                (
                    "thresholds.consecutive.unhealthy_min_failure_count",
                    "must be at least 1"
                ),
            ])
        );
        assert_eq!(
            violations(consecutive(0, 9, 4)),
            pairs(&[
                ("thresholds.consecutive.healthy_min_success_count", "must be at least 1"),
                (
                    "thresholds.consecutive.degraded_min_failure_count",
                    "must be between 1 and unhealthy_min_failure_count (4)"
                ),
            ])
        );
    }

    #[test]
    fn every_window_violation_is_reported_at_once() {
        assert_eq!(
            violations(window(1, 0, 0)),
            pairs(&[
                ("thresholds.window.window_size", "must be between 3 and 100"),
                ("thresholds.window.degraded_min_failure_count", "must be at least 1"),
                ("thresholds.window.unhealthy_min_failure_count", "must be at least 1"),
            ])
        );
        // Degraded above unhealthy and unhealthy beyond the window are independent mistakes.
        assert_eq!(
            violations(window(5, 9, 8)),
            pairs(&[
                (
                    "thresholds.window.degraded_min_failure_count",
                    "must be between 1 and unhealthy_min_failure_count (8)"
                ),
                (
                    "thresholds.window.unhealthy_min_failure_count",
                    "must be between 1 and window_size (5)"
                ),
            ])
        );
    }

    #[test]
    fn a_relation_is_not_reported_against_a_field_that_is_already_invalid() {
        // unhealthy = 0 is reported once; "degraded must be at most 0" would only mislead.
        assert_eq!(
            violations(consecutive(1, 3, 0)),
            pairs(&[(
                "thresholds.consecutive.unhealthy_min_failure_count",
                "must be at least 1"
            )])
        );
        // An invalid window size says nothing about whether unhealthy fits in it.
        assert_eq!(
            violations(window(500, 3, 200)),
            pairs(&[("thresholds.window.window_size", "must be between 3 and 100")])
        );
    }

    #[test]
    fn the_field_prefix_is_used_verbatim() {
        let Err(found) = window(2, 1, 1).validate("checks[3].thresholds") else {
            panic!("a window of 2 must be rejected");
        };
        assert_eq!(found.len(), 1);
        assert_eq!(found[0].field, "checks[3].thresholds.window.window_size");
    }
}
