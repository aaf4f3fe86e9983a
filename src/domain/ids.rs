//! Identifiers and free text, validated once where they enter the service.
//!
//! Holding a `SystemId` rather than a `String` proves the value was checked, so storage, lock keys
//! and logs never see an empty id, a control character that would break a log line, or a NUL byte
//! that PostgreSQL `text` cannot store.

use std::fmt;

use super::FieldViolation;

/// What a kind of text must satisfy.
struct Rules {
    /// Whether the empty string is acceptable.
    allow_empty: bool,
    /// The maximum length in UTF-8 bytes, which is what storage and the wire pay for.
    max_bytes: usize,
    /// Whether every control character is rejected; otherwise only NUL is.
    forbid_control: bool,
    /// Whether leading or trailing whitespace is rejected, because ids that differ only by an
    /// invisible space are a lookup bug waiting to happen.
    forbid_surrounding_whitespace: bool,
}

/// Rules for ids a client chooses: systems, checks and runs.
const ID: Rules = Rules {
    allow_empty: false,
    max_bytes: 256,
    forbid_control: true,
    forbid_surrounding_whitespace: true,
};

/// Checks `value` against `rules`, naming `field` in the violation.
fn check(field: &str, value: &str, rules: &Rules) -> Result<(), FieldViolation> {
    let problem = if value.is_empty() {
        (!rules.allow_empty).then(|| "must not be empty".to_owned())
    } else if value.len() > rules.max_bytes {
        Some(format!("must be at most {} bytes", rules.max_bytes))
    } else if rules.forbid_control && value.chars().any(char::is_control) {
        Some("must not contain control characters".to_owned())
    } else if value.contains('\0') {
        Some("must not contain NUL characters".to_owned())
    } else if rules.forbid_surrounding_whitespace && value.trim() != value {
        Some("must not start or end with whitespace".to_owned())
    } else {
        None
    };
    match problem {
        Some(description) => Err(FieldViolation::new(field, description)),
        None => Ok(()),
    }
}

/// Declares a validated string newtype: `parse` at the edge, then read-only access.
macro_rules! validated_text {
    ($(#[$doc:meta])* $name:ident, $rules:expr) => {
        $(#[$doc])*
        #[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub struct $name(String);

        impl $name {
            /// Validates `value`; a violation names `field`, the path of the value in the request.
            pub fn parse(field: &str, value: String) -> Result<Self, FieldViolation> {
                check(field, &value, &$rules)?;
                Ok(Self(value))
            }

            /// The validated text.
            pub fn as_str(&self) -> &str {
                &self.0
            }

            /// The validated text, without copying it.
            pub fn into_inner(self) -> String {
                self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl AsRef<str> for $name {
            fn as_ref(&self) -> &str {
                &self.0
            }
        }
    };
}

validated_text!(
    /// The id of a system: non-empty, at most 256 bytes, no control characters, no surrounding
    /// whitespace.
    SystemId,
    ID
);

validated_text!(
    /// The id of a check within a system, with the same rules as [`SystemId`].
    CheckId,
    ID
);

validated_text!(
    /// The client-chosen id of a run, with the same rules as [`SystemId`]; it is the idempotency
    /// key that makes a redelivered run a no-op.
    RunId,
    ID
);

validated_text!(
    /// The name of an advisory lock: non-empty, at most 512 bytes, no NUL.
    ///
    /// Any other character is allowed because keys are shared with other services on the same
    /// database, which may use any text they like.
    LockKey,
    Rules {
        allow_empty: false,
        max_bytes: 512,
        forbid_control: false,
        forbid_surrounding_whitespace: false,
    }
);

validated_text!(
    /// Who holds a lock, for diagnostics: may be empty, at most 256 bytes, no control characters.
    Owner,
    Rules {
        allow_empty: true,
        max_bytes: 256,
        forbid_control: true,
        forbid_surrounding_whitespace: false,
    }
);

validated_text!(
    /// The free-text message of a run: may be empty or span lines, at most 4096 bytes, no NUL.
    RunMessage,
    Rules {
        allow_empty: true,
        max_bytes: 4096,
        forbid_control: false,
        forbid_surrounding_whitespace: false,
    }
);

#[cfg(test)]
mod tests {
    use super::*;

    fn description<T>(result: Result<T, FieldViolation>) -> Option<String> {
        result.err().map(|v| v.description)
    }

    #[test]
    fn a_valid_id_keeps_its_text() {
        let Ok(id) = SystemId::parse("system_id", "sys-42".to_owned()) else {
            panic!("sys-42 is a valid id");
        };
        assert_eq!(id.as_str(), "sys-42");
        assert_eq!(id.to_string(), "sys-42");
        assert_eq!(id.as_ref(), "sys-42");
        assert_eq!(id.into_inner(), "sys-42");
    }

    #[test]
    fn the_violation_names_the_field_it_was_given() {
        let Err(violation) = CheckId::parse("checks[2].check_id", String::new()) else {
            panic!("an empty check id must be rejected");
        };
        assert_eq!(violation.field, "checks[2].check_id");
        assert_eq!(violation.description, "must not be empty");
    }

    #[test]
    fn ids_reject_each_kind_of_bad_text() {
        let table = [
            ("".to_owned(), Some("must not be empty")),
            ("a".repeat(256), None),
            ("a".repeat(257), Some("must be at most 256 bytes")),
            // 128 two-byte characters are 256 bytes; one more is too many even at 129 characters.
            ("é".repeat(128), None),
            ("é".repeat(129), Some("must be at most 256 bytes")),
            ("a\nb".to_owned(), Some("must not contain control characters")),
            ("a\tb".to_owned(), Some("must not contain control characters")),
            ("a\0b".to_owned(), Some("must not contain control characters")),
            ("a\u{7f}".to_owned(), Some("must not contain control characters")),
            (" a".to_owned(), Some("must not start or end with whitespace")),
            ("a ".to_owned(), Some("must not start or end with whitespace")),
            ("a\u{a0}".to_owned(), Some("must not start or end with whitespace")),
            (" ".to_owned(), Some("must not start or end with whitespace")),
            ("a b".to_owned(), None),
            ("système/检查:1".to_owned(), None),
        ];
        for (value, expected) in table {
            let expected = expected.map(str::to_owned);
            assert_eq!(description(SystemId::parse("id", value.clone())), expected, "{value:?}");
            assert_eq!(description(CheckId::parse("id", value.clone())), expected, "{value:?}");
            assert_eq!(description(RunId::parse("id", value.clone())), expected, "{value:?}");
        }
    }

    #[test]
    fn lock_keys_allow_anything_but_nul_emptiness_and_excess_length() {
        let table = [
            ("health:sys-42".to_owned(), None),
            (" spaced key \n".to_owned(), None),
            ("tab\there".to_owned(), None),
            ("a".repeat(512), None),
            ("a".repeat(513), Some("must be at most 512 bytes")),
            (String::new(), Some("must not be empty")),
            ("a\0b".to_owned(), Some("must not contain NUL characters")),
        ];
        for (value, expected) in table {
            assert_eq!(
                description(LockKey::parse("key", value.clone())),
                expected.map(str::to_owned),
                "{value:?}"
            );
        }
    }

    #[test]
    fn owners_may_be_empty_but_not_contain_control_characters() {
        let table = [
            (String::new(), None),
            ("worker-1 (pod a)".to_owned(), None),
            (" padded ".to_owned(), None),
            ("a".repeat(256), None),
            ("a".repeat(257), Some("must be at most 256 bytes")),
            ("line\nbreak".to_owned(), Some("must not contain control characters")),
        ];
        for (value, expected) in table {
            assert_eq!(
                description(Owner::parse("owner", value.clone())),
                expected.map(str::to_owned),
                "{value:?}"
            );
        }
    }

    #[test]
    fn run_messages_are_free_text_without_nul() {
        let table = [
            (String::new(), None),
            ("timeout after 5s\nretrying\t(1/3)".to_owned(), None),
            ("a".repeat(4096), None),
            ("a".repeat(4097), Some("must be at most 4096 bytes")),
            ("bad\0byte".to_owned(), Some("must not contain NUL characters")),
        ];
        for (value, expected) in table {
            assert_eq!(
                description(RunMessage::parse("message", value.clone())),
                expected.map(str::to_owned),
                "{value:?}"
            );
        }
    }
}
