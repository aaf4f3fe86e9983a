//! The latency a run reports, bounded and at the precision it is stored with.
//!
//! A run is idempotent by its id: a retry with the same content must be recognised as the same
//! run. That holds only if the value stored, the value replied and the value a retry is compared
//! with are one and the same, so the latency is cut to whole microseconds (what storage keeps)
//! and bounded (so a microsecond count always fits storage's 64-bit integer) once, where it
//! enters, and everything after uses that value.

use std::time::Duration;

use super::FieldViolation;

/// The longest latency a run may report. A health check that takes a day has timed out; the
/// bound keeps every accepted value exactly representable in storage.
pub const MAX_LATENCY: Duration = Duration::from_secs(24 * 60 * 60);

/// A run's latency: at most [`MAX_LATENCY`], in whole microseconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Latency(Duration);

impl Latency {
    /// Validates `value`, cut to whole microseconds; a violation names `field`.
    pub fn parse(field: &str, value: Duration) -> Result<Self, FieldViolation> {
        if value > MAX_LATENCY {
            return Err(FieldViolation::new(field, "must be at most 24h"));
        }
        let micros = u64::try_from(value.as_micros()).map_err(|_| FieldViolation::new(field, "must be at most 24h"))?;
        Ok(Latency(Duration::from_micros(micros)))
    }

    /// The latency.
    pub fn duration(self) -> Duration {
        self.0
    }

    /// Whole microseconds, as stored.
    pub fn as_micros(self) -> i64 {
        // At most 86,400,000,000: the bound makes this exact.
        i64::try_from(self.0.as_micros()).unwrap_or(i64::MAX)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_latency_is_cut_to_whole_microseconds() {
        let Ok(latency) = Latency::parse("latency", Duration::new(1, 2_345_678)) else {
            panic!("a second is a valid latency");
        };
        assert_eq!(latency.duration(), Duration::new(1, 2_345_000));
        assert_eq!(latency.as_micros(), 1_002_345);
    }

    #[test]
    fn the_bound_is_inclusive_and_one_nanosecond_more_is_refused() {
        let Ok(longest) = Latency::parse("latency", MAX_LATENCY) else {
            panic!("24h is accepted");
        };
        assert_eq!(longest.as_micros(), 86_400_000_000);
        for too_long in [
            MAX_LATENCY + Duration::from_nanos(1),
            Duration::from_secs(u64::MAX),
            Duration::MAX,
        ] {
            let Err(violation) = Latency::parse("latency", too_long) else {
                panic!("{too_long:?} must be refused");
            };
            assert_eq!(violation.field, "latency");
            assert_eq!(violation.description, "must be at most 24h");
        }
    }

    #[test]
    fn zero_is_a_latency() {
        assert_eq!(Latency::parse("latency", Duration::ZERO).map(Latency::as_micros), Ok(0));
    }
}
