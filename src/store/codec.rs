//! Compact text encodings of thresholds, evaluations and run windows for
//! storage.
//!
//! They are small records read on every evaluation; a short text column
//! keeps them readable in `psql` and portable to the embedded store without a
//! JSON dependency.

use crate::domain::{
    ConsecutiveThresholds, Evaluation, FlappingSettings, Mode, Rule, RunWindow, Status, Thresholds, WindowRun,
    WindowThresholds,
};

/// Separates the runs of an encoded window (ASCII record separator). Ids
/// never contain control characters, so neither separator can occur inside
/// a field.
const RUN_SEPARATOR: char = '\u{1e}';
/// Separates the fields of one run (ASCII unit separator).
const FIELD_SEPARATOR: char = '\u{1f}';

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

/// `""` when flapping detection is off, else `f:<runs>:<start>:<stop>`.
pub(crate) fn encode_flapping(settings: Option<&FlappingSettings>) -> String {
    settings.map_or_else(String::new, |f| {
        format!("f:{}:{}:{}", f.runs, f.start_changes, f.stop_changes)
    })
}

/// The settings [`encode_flapping`] wrote; `Some(None)` when off, `None`
/// when the text is no such encoding.
pub(crate) fn decode_flapping(s: &str) -> Option<Option<FlappingSettings>> {
    if s.is_empty() {
        return Some(None);
    }
    let mut parts = s.strip_prefix("f:")?.split(':');
    let mut n = || parts.next()?.parse::<u32>().ok();
    let (runs, start_changes, stop_changes) = (n()?, n()?, n()?);
    Some(Some(FlappingSettings {
        runs,
        start_changes,
        stop_changes,
    }))
}

/// Ids joined by the unit separator, which ids cannot hold.
pub(crate) fn decode_ids(s: &str) -> Vec<String> {
    if s.is_empty() {
        Vec::new()
    } else {
        s.split(FIELD_SEPARATOR).map(str::to_owned).collect()
    }
}

/// The inverse of [`decode_ids`].
pub(crate) fn encode_ids<S: AsRef<str>>(ids: &[S]) -> String {
    let mut out = String::new();
    for (i, id) in ids.iter().enumerate() {
        if i > 0 {
            out.push(FIELD_SEPARATOR);
        }
        out.push_str(id.as_ref());
    }
    out
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

/// A check's run window, newest first: `<observed_at µs>␟<status>␟<run_id>`
/// per run, joined by `␞`; empty without runs. The migration that built the
/// windows from the runs table writes the same text.
pub(crate) fn encode_window(window: &RunWindow) -> String {
    let mut out = String::with_capacity(window.len() * 40);
    for (i, run) in window.runs().iter().enumerate() {
        if i > 0 {
            out.push(RUN_SEPARATOR);
        }
        out.push_str(&run.observed_at_micros.to_string());
        out.push(FIELD_SEPARATOR);
        out.push_str(&run.status.as_i16().to_string());
        out.push(FIELD_SEPARATOR);
        out.push_str(&run.run_id);
    }
    out
}

/// The window [`encode_window`] wrote; `None` for anything else, a window
/// out of order or over its size included.
pub(crate) fn decode_window(s: &str) -> Option<RunWindow> {
    if s.is_empty() {
        return Some(RunWindow::default());
    }
    let runs = s
        .split(RUN_SEPARATOR)
        .map(|run| {
            let mut fields = run.splitn(3, FIELD_SEPARATOR);
            let observed_at_micros = fields.next()?.parse::<i64>().ok()?;
            let status = Status::from_i16(fields.next()?.parse::<i16>().ok()?)?;
            let run_id = fields.next().filter(|id| !id.is_empty())?.to_owned();
            Some(WindowRun {
                observed_at_micros,
                run_id,
                status,
            })
        })
        .collect::<Option<Vec<_>>>()?;
    RunWindow::from_newest_first(runs)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::domain::evaluate;

    #[test]
    fn flapping_settings_and_id_lists_round_trip() {
        let settings = FlappingSettings {
            runs: 20,
            start_changes: 8,
            stop_changes: 3,
        };
        assert_eq!(decode_flapping(&encode_flapping(Some(&settings))), Some(Some(settings)));
        assert_eq!(decode_flapping(&encode_flapping(None)), Some(None));
        assert_eq!(decode_flapping("x:1"), None);
        for ids in [
            vec![],
            vec!["db".to_owned()],
            vec!["db".to_owned(), "dns, eu".to_owned()],
        ] {
            assert_eq!(decode_ids(&encode_ids(&ids)), ids);
        }
    }

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
    fn windows_round_trip_through_their_text() {
        let mut window = RunWindow::default();
        assert_eq!(encode_window(&window), "");
        assert_eq!(decode_window(""), Some(window.clone()));
        for (at, id, status) in [
            (-62_135_596_800_000_000, "year one", Status::Degraded),
            (1_700_000_000_123_456, "r:1|2", Status::Unhealthy),
            (1_700_000_000_123_456, "r:1|3", Status::Healthy),
        ] {
            window.place(WindowRun {
                observed_at_micros: at,
                run_id: id.to_owned(),
                status,
            });
        }
        let text = encode_window(&window);
        assert_eq!(
            text,
            "1700000000123456\u{1f}1\u{1f}r:1|3\u{1e}1700000000123456\u{1f}3\u{1f}r:1|2\u{1e}\
             -62135596800000000\u{1f}2\u{1f}year one"
        );
        assert_eq!(decode_window(&text), Some(window));
    }

    #[test]
    fn a_window_that_a_window_could_not_have_written_does_not_decode() {
        for bad in [
            "x\u{1f}1\u{1f}a",
            "1\u{1f}9\u{1f}a",
            "1\u{1f}1\u{1f}",
            "1\u{1f}1",
            "1\u{1f}1\u{1f}a\u{1e}",
            // Oldest first.
            "1\u{1f}1\u{1f}a\u{1e}2\u{1f}1\u{1f}b",
            // One id twice.
            "2\u{1f}1\u{1f}a\u{1e}1\u{1f}1\u{1f}a",
        ] {
            assert_eq!(decode_window(bad), None, "{bad:?}");
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
