//! Compact text encodings of thresholds and evaluations for storage.
//!
//! They are small fixed records read on every evaluation; a short text column
//! keeps them readable in `psql` and portable to the embedded store without a
//! JSON dependency.

use crate::domain::{ConsecutiveThresholds, Evaluation, Mode, Rule, Status, Thresholds, WindowThresholds};

/// `c:<success>:<degraded>:<unhealthy>` or `w:<window>:<degraded>:<unhealthy>`.
pub(crate) fn encode_thresholds(t: &Thresholds) -> String {
    match t {
        Thresholds::Consecutive(c) => format!(
            "c:{}:{}:{}",
            c.healthy_min_success_count, c.degraded_min_failure_count, c.unhealthy_min_failure_count
        ),
        Thresholds::Window(w) => {
            format!(
                "w:{}:{}:{}",
                w.window_size, w.degraded_min_failure_count, w.unhealthy_min_failure_count
            )
        }
    }
}

pub(crate) fn decode_thresholds(s: &str) -> Option<Thresholds> {
    let mut parts = s.split(':');
    let mode = parts.next()?;
    let mut n = || parts.next()?.parse::<u32>().ok();
    let (a, b, c) = (n()?, n()?, n()?);
    match mode {
        "c" => Some(Thresholds::Consecutive(ConsecutiveThresholds {
            healthy_min_success_count: a,
            degraded_min_failure_count: b,
            unhealthy_min_failure_count: c,
        })),
        "w" => Some(Thresholds::Window(WindowThresholds {
            window_size: a,
            degraded_min_failure_count: b,
            unhealthy_min_failure_count: c,
        })),
        _ => None,
    }
}

fn rule_code(rule: Rule) -> u8 {
    match rule {
        Rule::NoRuns => 1,
        Rule::UnhealthyThresholdReached => 2,
        Rule::DegradedThresholdReached => 3,
        Rule::BelowDegradedThreshold => 4,
        Rule::RecoveryConfirmed => 5,
        Rule::RecoveryNotConfirmed => 6,
    }
}

fn rule_from_code(code: u8) -> Option<Rule> {
    Some(match code {
        1 => Rule::NoRuns,
        2 => Rule::UnhealthyThresholdReached,
        3 => Rule::DegradedThresholdReached,
        4 => Rule::BelowDegradedThreshold,
        5 => Rule::RecoveryConfirmed,
        6 => Rule::RecoveryNotConfirmed,
        _ => return None,
    })
}

/// `<status>:<rule>:<runs>:<failure streak>:<success streak>:<failures in window>|<thresholds>`.
pub(crate) fn encode_evaluation(e: &Evaluation) -> String {
    format!(
        "{}:{}:{}:{}:{}:{}|{}",
        e.status.as_i16(),
        rule_code(e.rule),
        e.runs_considered,
        e.leading_failure_streak,
        e.leading_success_streak,
        e.failures_in_window,
        encode_thresholds(&e.thresholds)
    )
}

pub(crate) fn decode_evaluation(s: &str) -> Option<Evaluation> {
    let (head, thresholds) = s.split_once('|')?;
    let thresholds = decode_thresholds(thresholds)?;
    let mut parts = head.split(':').map(str::parse::<u32>);
    let mut n = || parts.next()?.ok();
    let status = Status::from_i16(i16::try_from(n()?).ok()?)?;
    let rule = rule_from_code(u8::try_from(n()?).ok()?)?;
    let mode = match thresholds {
        Thresholds::Consecutive(_) => Mode::Consecutive,
        Thresholds::Window(_) => Mode::Window,
    };
    Some(Evaluation {
        status,
        mode,
        rule,
        runs_considered: n()?,
        leading_failure_streak: n()?,
        leading_success_streak: n()?,
        failures_in_window: n()?,
        thresholds,
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::domain::evaluate;

    #[test]
    fn evaluations_and_thresholds_round_trip() {
        let window = Thresholds::Window(WindowThresholds {
            window_size: 12,
            degraded_min_failure_count: 4,
            unhealthy_min_failure_count: 9,
        });
        for thresholds in [Thresholds::default(), window] {
            assert_eq!(decode_thresholds(&encode_thresholds(&thresholds)), Some(thresholds));
            let statuses = [Status::Unhealthy, Status::Degraded, Status::Healthy, Status::Unhealthy];
            let e = evaluate(&statuses, &thresholds);
            assert_eq!(decode_evaluation(&encode_evaluation(&e)).unwrap(), e);
        }
    }

    #[test]
    fn garbage_does_not_decode() {
        for bad in [
            "",
            "x:1:2:3",
            "c:1:2",
            "c:a:b:c",
            "1:2:3|c:1:2:5",
            "9:1:0:0:0:0|c:1:2:5",
        ] {
            assert!(
                decode_thresholds(bad).is_none() || decode_evaluation(bad).is_none(),
                "{bad}"
            );
        }
    }
}
