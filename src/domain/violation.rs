//! One reason a piece of input was rejected.
//!
//! Kept free of any transport type so the domain can report bad input precisely; the API layer
//! turns a list of these into a `google.rpc.BadRequest` detail.

use std::fmt;

/// A rejected input field: where it is and what would have been accepted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldViolation {
    /// The path of the field in the request, e.g. `thresholds.window.window_size`, so a client can
    /// point at the exact input to fix.
    pub field: String,
    /// A short human sentence naming what is accepted, e.g. `must be between 3 and 100`.
    pub description: String,
}

impl FieldViolation {
    /// A violation of `field`, described by `description`.
    pub fn new(field: impl Into<String>, description: impl Into<String>) -> Self {
        Self {
            field: field.into(),
            description: description.into(),
        }
    }
}

impl fmt::Display for FieldViolation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.field, self.description)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_violation_displays_its_field_then_its_description() {
        let violation = FieldViolation::new("system_id", "must not be empty");
        assert_eq!(violation.to_string(), "system_id: must not be empty");
    }
}
