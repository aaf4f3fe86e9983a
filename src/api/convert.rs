//! Conversions between the wire types and the domain, in one place.
//!
//! Inbound conversions collect every field violation of a request before
//! failing, so a client fixes all of its mistakes in one round trip.

use std::time::Duration;

use chrono::{DateTime, TimeZone, Utc};

use crate::{
    domain::{
        ConsecutiveThresholds, Evaluation, FieldViolation, FlappingSettings, MaintenanceWindow, Mode, Rule, Status,
        Thresholds, WindowThresholds,
    },
    proto,
    store::{CheckRecord, Run, SystemRecord, SystemSummary, Transition},
};

/// Collects violations while a request is parsed.
#[derive(Debug, Default)]
pub(crate) struct Violations(pub(crate) Vec<FieldViolation>);

impl Violations {
    /// Keeps the value, or records the violation and yields `None`.
    pub(crate) fn take<T>(&mut self, result: Result<T, FieldViolation>) -> Option<T> {
        match result {
            Ok(v) => Some(v),
            Err(v) => {
                self.0.push(v);
                None
            }
        }
    }

    /// Like [`Violations::take`] for results that carry several violations.
    pub(crate) fn take_all<T>(&mut self, result: Result<T, Vec<FieldViolation>>) -> Option<T> {
        match result {
            Ok(v) => Some(v),
            Err(v) => {
                self.0.extend(v);
                None
            }
        }
    }

    /// Records one violation.
    pub(crate) fn push(&mut self, field: &str, description: impl Into<String>) {
        self.0.push(FieldViolation::new(field, description));
    }

    /// `Ok(value)` when nothing was recorded (`value` is then always `Some`).
    pub(crate) fn finish<T>(self, value: impl FnOnce() -> Option<T>) -> crate::error::Result<T> {
        if !self.0.is_empty() {
            return Err(crate::error::Error::InvalidArgument(self.0));
        }
        value().ok_or(crate::error::Error::Invariant(
            "a request without violations parses completely",
        ))
    }
}

/// A required status.
pub(crate) fn status_in(field: &str, raw: i32) -> Result<Status, FieldViolation> {
    match proto::HealthStatus::try_from(raw) {
        Ok(proto::HealthStatus::Healthy) => Ok(Status::Healthy),
        Ok(proto::HealthStatus::Degraded) => Ok(Status::Degraded),
        Ok(proto::HealthStatus::Unhealthy) => Ok(Status::Unhealthy),
        Ok(proto::HealthStatus::Unspecified) => Err(FieldViolation::new(field, "must be specified")),
        Err(_) => Err(FieldViolation::new(field, format!("unknown status value {raw}"))),
    }
}

pub(crate) fn status_out(status: Status) -> proto::HealthStatus {
    match status {
        Status::Healthy => proto::HealthStatus::Healthy,
        Status::Degraded => proto::HealthStatus::Degraded,
        Status::Unhealthy => proto::HealthStatus::Unhealthy,
    }
}

/// Optional thresholds: an unset message is `None`; a message without a mode
/// is a violation (a client that meant the defaults leaves it unset).
pub(crate) fn thresholds_in(
    field: &str,
    raw: Option<proto::Thresholds>,
) -> Result<Option<Thresholds>, Vec<FieldViolation>> {
    let Some(raw) = raw else { return Ok(None) };
    let thresholds = match raw.mode {
        None => {
            return Err(vec![FieldViolation::new(
                format!("{field}.mode"),
                "set consecutive or window",
            )]);
        }
        Some(proto::thresholds::Mode::Consecutive(c)) => Thresholds::Consecutive(ConsecutiveThresholds {
            healthy_min_success_count: c.healthy_min_success_count,
            degraded_min_failure_count: c.degraded_min_failure_count,
            unhealthy_min_failure_count: c.unhealthy_min_failure_count,
        }),
        Some(proto::thresholds::Mode::Window(w)) => Thresholds::Window(WindowThresholds {
            window_size: w.window_size,
            degraded_min_failure_count: w.degraded_min_failure_count,
            unhealthy_min_failure_count: w.unhealthy_min_failure_count,
        }),
    };
    thresholds.validate(field)?;
    Ok(Some(thresholds))
}

/// Optional flapping settings: unset keeps (`None`); all zero turns
/// detection off (`Some(None)`); anything else must be valid settings.
pub(crate) fn flapping_in(
    field: &str,
    raw: Option<proto::FlappingSettings>,
) -> Result<Option<Option<FlappingSettings>>, Vec<FieldViolation>> {
    let Some(raw) = raw else { return Ok(None) };
    if raw.runs == 0 && raw.start_changes == 0 && raw.stop_changes == 0 {
        return Ok(Some(None));
    }
    let settings = FlappingSettings {
        runs: raw.runs,
        start_changes: raw.start_changes,
        stop_changes: raw.stop_changes,
    };
    settings.validate(field)?;
    Ok(Some(Some(settings)))
}

pub(crate) fn thresholds_out(t: &Thresholds) -> proto::Thresholds {
    let mode = match t {
        Thresholds::Consecutive(c) => proto::thresholds::Mode::Consecutive(proto::ConsecutiveThresholds {
            healthy_min_success_count: c.healthy_min_success_count,
            degraded_min_failure_count: c.degraded_min_failure_count,
            unhealthy_min_failure_count: c.unhealthy_min_failure_count,
        }),
        Thresholds::Window(w) => proto::thresholds::Mode::Window(proto::WindowThresholds {
            window_size: w.window_size,
            degraded_min_failure_count: w.degraded_min_failure_count,
            unhealthy_min_failure_count: w.unhealthy_min_failure_count,
        }),
    };
    proto::Thresholds { mode: Some(mode) }
}

fn rule_out(rule: Rule) -> proto::EvaluationRule {
    match rule {
        Rule::NoRuns => proto::EvaluationRule::NoRuns,
        Rule::UnhealthyThresholdReached => proto::EvaluationRule::UnhealthyThresholdReached,
        Rule::DegradedThresholdReached => proto::EvaluationRule::DegradedThresholdReached,
        Rule::BelowDegradedThreshold => proto::EvaluationRule::BelowDegradedThreshold,
        Rule::RecoveryConfirmed => proto::EvaluationRule::RecoveryConfirmed,
        Rule::RecoveryNotConfirmed => proto::EvaluationRule::RecoveryNotConfirmed,
    }
}

pub(crate) fn evaluation_out(e: &Evaluation) -> proto::Evaluation {
    proto::Evaluation {
        mode: match e.mode {
            Mode::Consecutive => proto::EvaluationMode::Consecutive,
            Mode::Window => proto::EvaluationMode::Window,
        } as i32,
        runs_considered: e.runs_considered,
        leading_failure_streak: e.leading_failure_streak,
        leading_success_streak: e.leading_success_streak,
        failures_in_window: e.failures_in_window,
        rule: rule_out(e.rule) as i32,
        thresholds: Some(thresholds_out(&e.thresholds)),
    }
}

/// Wire timestamp from a database time.
pub(crate) fn timestamp_out(t: DateTime<Utc>) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: t.timestamp(),
        nanos: i32::try_from(t.timestamp_subsec_nanos()).unwrap_or(0),
    }
}

/// The first second protobuf's `Timestamp` can express: 0001-01-01T00:00:00Z.
pub(crate) const TIMESTAMP_MIN_SECONDS: i64 = -62_135_596_800;
/// The last second protobuf's `Timestamp` can express: 9999-12-31T23:59:59Z.
pub(crate) const TIMESTAMP_MAX_SECONDS: i64 = 253_402_300_799;

/// A wire timestamp, truncated to microseconds (the database's precision).
///
/// Only protobuf's own range (0001-01-01 to 9999-12-31) is accepted: every
/// store can hold it (PostgreSQL's `timestamptz` ends at 4713 BC), and a
/// value outside it is no valid `Timestamp` however it is decoded.
pub(crate) fn timestamp_in(field: &str, t: &prost_types::Timestamp) -> Result<DateTime<Utc>, FieldViolation> {
    let invalid = || FieldViolation::new(field, "must be a valid timestamp");
    if !(0..1_000_000_000).contains(&t.nanos) {
        return Err(invalid());
    }
    if !(TIMESTAMP_MIN_SECONDS..=TIMESTAMP_MAX_SECONDS).contains(&t.seconds) {
        return Err(FieldViolation::new(
            field,
            "must be between 0001-01-01T00:00:00Z and 9999-12-31T23:59:59.999999999Z",
        ));
    }
    let micros = t.nanos / 1000;
    let nanos = u32::try_from(micros * 1000).map_err(|_| invalid())?;
    Utc.timestamp_opt(t.seconds, nanos).single().ok_or_else(invalid)
}

pub(crate) fn duration_out(d: Duration) -> prost_types::Duration {
    prost_types::Duration {
        seconds: i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
        nanos: i32::try_from(d.subsec_nanos()).unwrap_or(0),
    }
}

/// A non-negative wire duration (seconds and nanos both non-negative, nanos
/// below a second, as protobuf's `Duration` requires).
pub(crate) fn duration_in(field: &str, d: &prost_types::Duration) -> Result<Duration, FieldViolation> {
    let invalid = || FieldViolation::new(field, "must be a non-negative duration");
    let seconds = u64::try_from(d.seconds).map_err(|_| invalid())?;
    let nanos = u32::try_from(d.nanos).map_err(|_| invalid())?;
    if nanos >= 1_000_000_000 {
        return Err(invalid());
    }
    Ok(Duration::new(seconds, nanos))
}

pub(crate) fn run_out(r: &Run) -> proto::Run {
    proto::Run {
        run_id: r.run_id.clone(),
        system_id: r.system_id.clone(),
        check_id: r.check_id.clone(),
        status: status_out(r.status) as i32,
        observed_at: Some(timestamp_out(r.observed_at)),
        latency: r.latency.map(duration_out),
        message: r.message.clone(),
        recorded_at: Some(timestamp_out(r.recorded_at)),
    }
}

pub(crate) fn check_out(c: &CheckRecord) -> proto::CheckHealth {
    proto::CheckHealth {
        check_id: c.check_id.clone(),
        status: status_out(c.evaluation.status) as i32,
        evaluation: Some(evaluation_out(&c.evaluation)),
        runs_considered: c.runs_considered,
        last_run_at: c.last_run_at.map(timestamp_out),
        thresholds: Some(thresholds_out(&c.thresholds)),
        enabled: c.enabled,
        flapping: c.flapping,
        flapping_settings: c.flapping_settings.as_ref().map(|f| proto::FlappingSettings {
            runs: f.runs,
            start_changes: f.start_changes,
            stop_changes: f.stop_changes,
        }),
    }
}

pub(crate) fn system_out(s: &SystemRecord) -> proto::SystemHealth {
    proto::SystemHealth {
        system_id: s.system_id.clone(),
        status: status_out(s.status) as i32,
        checks: s.checks.iter().map(check_out).collect(),
        evaluated_at: s.evaluated_at.map(timestamp_out),
        maintenance_windows: s.maintenance_windows.iter().map(window_out).collect(),
        in_maintenance: s.in_maintenance,
        depends_on: s.depends_on.clone(),
    }
}

pub(crate) fn transition_out(t: &Transition) -> proto::HealthTransition {
    proto::HealthTransition {
        sequence: t.sequence,
        system_id: t.system_id.clone(),
        check_id: t.check_id.clone(),
        from_status: status_out(t.from) as i32,
        to_status: status_out(t.to) as i32,
        transitioned_at: Some(timestamp_out(t.transitioned_at)),
        evaluation: Some(evaluation_out(&t.evaluation)),
        check_deleted: t.check_deleted,
        in_maintenance: t.in_maintenance,
        flapping: t.flapping,
        caused_by: t.caused_by.clone(),
    }
}

pub(crate) fn window_out(w: &MaintenanceWindow) -> proto::MaintenanceWindow {
    proto::MaintenanceWindow {
        starts_at: Some(timestamp_out(w.starts_at)),
        ends_at: Some(timestamp_out(w.ends_at)),
        reason: w.reason.clone(),
    }
}

pub(crate) fn summary_out(s: &SystemSummary) -> proto::SystemSummary {
    proto::SystemSummary {
        system_id: s.system_id.clone(),
        status: status_out(s.status) as i32,
        check_count: s.check_count,
        last_run_at: s.last_run_at.map(timestamp_out),
        in_maintenance: s.in_maintenance,
        flapping: s.flapping,
        evaluated_at: Some(timestamp_out(s.evaluated_at)),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use prost::Message;

    use super::*;
    use crate::config::MAX_CHECKS_PER_SYSTEM;

    /// The largest id a client may choose (256 bytes), distinct per `n`.
    fn longest_id(n: u32) -> String {
        format!("{n:0>256}")
    }

    #[test]
    fn a_reply_with_the_most_checks_a_system_may_have_fits_a_clients_default_message_limit() {
        let latest = Utc.with_ymd_and_hms(9999, 12, 31, 23, 59, 59).unwrap() + chrono::TimeDelta::microseconds(999_999);
        let thresholds = Thresholds::Window(WindowThresholds {
            window_size: u32::MAX,
            degraded_min_failure_count: u32::MAX,
            unhealthy_min_failure_count: u32::MAX,
        });
        let evaluation = Evaluation {
            status: Status::Unhealthy,
            mode: Mode::Window,
            runs_considered: u32::MAX,
            leading_failure_streak: u32::MAX,
            leading_success_streak: u32::MAX,
            failures_in_window: u32::MAX,
            rule: Rule::RecoveryNotConfirmed,
            thresholds,
        };
        let checks = (0..MAX_CHECKS_PER_SYSTEM)
            .map(|n| CheckRecord {
                check_id: longest_id(n),
                thresholds,
                enabled: true,
                evaluation,
                runs_considered: u32::MAX,
                last_run_at: Some(latest),
                flapping_settings: Some(crate::domain::FlappingSettings {
                    runs: u32::MAX,
                    start_changes: u32::MAX,
                    stop_changes: u32::MAX,
                }),
                flapping: true,
            })
            .collect();
        let system = SystemRecord {
            system_id: longest_id(0),
            status: Status::Unhealthy,
            checks,
            evaluated_at: Some(latest),
            maintenance_windows: (0..crate::domain::MAX_OPEN_WINDOWS)
                .map(|_| crate::domain::MaintenanceWindow {
                    starts_at: latest,
                    ends_at: latest,
                    reason: "r".repeat(crate::domain::MAX_REASON_BYTES),
                })
                .collect(),
            in_maintenance: true,
            depends_on: (0..crate::domain::MAX_DEPENDENCIES).map(longest_id).collect(),
        };
        let run = Run {
            run_id: longest_id(1),
            system_id: longest_id(0),
            check_id: longest_id(2),
            status: Status::Unhealthy,
            observed_at: latest,
            latency: Some(Duration::from_secs(86_400)),
            message: "m".repeat(4096),
            recorded_at: latest,
        };
        let transition = Transition {
            sequence: u64::MAX,
            system_id: longest_id(0),
            check_id: longest_id(2),
            from: Status::Degraded,
            to: Status::Unhealthy,
            transitioned_at: latest,
            evaluation,
            in_maintenance: true,
            flapping: true,
            caused_by: (0..crate::domain::MAX_DEPENDENCIES).map(longest_id).collect(),
            check_deleted: true,
        };
        let reply = proto::SubmitRunResponse {
            system_health: Some(system_out(&system)),
            transition: Some(transition_out(&transition)),
            duplicate: true,
            run: Some(run_out(&run)),
        };
        let size = reply.encoded_len();
        assert!(size < 4 * 1024 * 1024, "{size} bytes");
        // ConfigureCheck's reply is the same system plus one of its checks.
        let configured = proto::ConfigureCheckResponse {
            check: reply.system_health.as_ref().map(|s| s.checks[0].clone()),
            system_health: reply.system_health,
            transition: reply.transition,
        };
        assert!(configured.encoded_len() < 4 * 1024 * 1024);
    }
}
