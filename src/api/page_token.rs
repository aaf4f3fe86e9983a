//! Opaque, checked page tokens.
//!
//! A token is the cursor of the next page plus the request's filter, with a
//! checksum. A token that was altered, truncated, or replayed against a
//! different filter is refused with INVALID_ARGUMENT instead of silently
//! returning the wrong page. The checksum is keyed with a fixed string, so it
//! detects accidents and casual edits, not a determined forger; a forged
//! token can only point at data the same caller could list anyway.

use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD};
use chrono::{DateTime, Utc};
use sha2::{Digest, Sha256};

use crate::domain::FieldViolation;

const VERSION: u8 = 1;
const KEY: &[u8] = b"vitals.v1 page token";
const CHECK_LEN: usize = 12;

/// Kinds of listing, so a runs token is never taken for a transitions token.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub(crate) enum Kind {
    Runs = 1,
    Transitions = 2,
}

fn checksum(payload: &[u8]) -> [u8; CHECK_LEN] {
    let digest = Sha256::new().chain_update(KEY).chain_update(payload).finalize();
    let mut out = [0u8; CHECK_LEN];
    out.copy_from_slice(&digest[..CHECK_LEN]);
    out
}

fn filter_digest(filter: &str) -> [u8; 8] {
    let digest = Sha256::digest(filter.as_bytes());
    let mut out = [0u8; 8];
    out.copy_from_slice(&digest[..8]);
    out
}

/// Encodes a cursor (`body`) of `kind` for a request filtered by `filter`.
pub(crate) fn encode(kind: Kind, filter: &str, body: &[u8]) -> String {
    let mut payload = vec![VERSION, kind as u8];
    payload.extend_from_slice(&filter_digest(filter));
    payload.extend_from_slice(body);
    let check = checksum(&payload);
    payload.extend_from_slice(&check);
    URL_SAFE_NO_PAD.encode(payload)
}

/// Decodes a token made by [`encode`] with the same kind and filter.
pub(crate) fn decode(field: &str, kind: Kind, filter: &str, token: &str) -> Result<Vec<u8>, FieldViolation> {
    let invalid = || {
        FieldViolation::new(
            field,
            "is not a page token of this listing; pass next_page_token unchanged",
        )
    };
    let raw = URL_SAFE_NO_PAD.decode(token).map_err(|_| invalid())?;
    if raw.len() < 2 + 8 + CHECK_LEN {
        return Err(invalid());
    }
    let (payload, check) = raw.split_at(raw.len() - CHECK_LEN);
    if checksum(payload) != check
        || payload[0] != VERSION
        || payload[1] != kind as u8
        || payload[2..10] != filter_digest(filter)
    {
        return Err(invalid());
    }
    Ok(payload[10..].to_vec())
}

/// Body of a runs cursor: observed_at in microseconds, then the run id.
pub(crate) fn run_cursor_body(observed_at: DateTime<Utc>, run_id: &str) -> Vec<u8> {
    let mut body = observed_at.timestamp_micros().to_be_bytes().to_vec();
    body.extend_from_slice(run_id.as_bytes());
    body
}

/// The oldest instant PostgreSQL's `timestamptz` holds (4714-11-24T00:00:00Z
/// BC, proleptic Gregorian), in microseconds since the Unix epoch. A cursor
/// older than this cannot be compared with stored runs there; a newer one
/// can, including those of runs stored before `observed_at` was bounded to
/// protobuf's range, so their listings still page.
const OLDEST_CURSOR_MICROS: i64 = -210_866_803_200_000_000;

/// The newest cursor a stored run can have: protobuf's last `Timestamp`
/// (`observed_at` was never accepted later than a few minutes from now).
const NEWEST_CURSOR_MICROS: i64 = 253_402_300_799_999_999;

/// Parses [`run_cursor_body`]. A cursor outside the instants a store can
/// compare with is refused like any other altered token.
pub(crate) fn parse_run_cursor(body: &[u8]) -> Option<(DateTime<Utc>, String)> {
    let (micros, run_id) = body.split_at_checked(8)?;
    let micros = i64::from_be_bytes(micros.try_into().ok()?);
    if !(OLDEST_CURSOR_MICROS..=NEWEST_CURSOR_MICROS).contains(&micros) {
        return None;
    }
    Some((
        DateTime::from_timestamp_micros(micros)?,
        String::from_utf8(run_id.to_vec()).ok()?,
    ))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn a_token_round_trips_for_its_own_listing_only() {
        let token = encode(Kind::Runs, "sys-a", b"cursor");
        assert_eq!(decode("page_token", Kind::Runs, "sys-a", &token).unwrap(), b"cursor");
        assert!(decode("page_token", Kind::Runs, "sys-b", &token).is_err());
        assert!(decode("page_token", Kind::Transitions, "sys-a", &token).is_err());
    }

    #[test]
    fn any_single_byte_change_is_refused() {
        let token = encode(Kind::Transitions, "", &42u64.to_be_bytes());
        let raw = URL_SAFE_NO_PAD.decode(&token).unwrap();
        for i in 0..raw.len() {
            let mut bad = raw.clone();
            bad[i] ^= 0x01;
            assert!(
                decode("t", Kind::Transitions, "", &URL_SAFE_NO_PAD.encode(bad)).is_err(),
                "byte {i}"
            );
        }
        for bad in ["", "!!!", "AAAA", &token[..token.len() - 1]] {
            assert!(decode("t", Kind::Transitions, "", bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn run_cursors_round_trip() {
        let at = DateTime::from_timestamp_micros(1_700_000_000_123_456).unwrap();
        let body = run_cursor_body(at, "run-ü");
        assert_eq!(parse_run_cursor(&body), Some((at, "run-ü".to_owned())));
    }

    #[test]
    fn a_cursor_outside_what_a_store_compares_with_is_refused() {
        let oldest = chrono::NaiveDate::from_ymd_opt(-4713, 11, 24)
            .unwrap()
            .and_hms_opt(0, 0, 0)
            .unwrap()
            .and_utc();
        assert_eq!(oldest.timestamp_micros(), OLDEST_CURSOR_MICROS);
        let newest = chrono::NaiveDate::from_ymd_opt(9999, 12, 31)
            .unwrap()
            .and_hms_micro_opt(23, 59, 59, 999_999)
            .unwrap()
            .and_utc();
        assert_eq!(newest.timestamp_micros(), NEWEST_CURSOR_MICROS);
        for at in [oldest, newest] {
            assert_eq!(parse_run_cursor(&run_cursor_body(at, "r")), Some((at, "r".to_owned())));
        }
        let micro = chrono::TimeDelta::microseconds(1);
        for at in [oldest - micro, newest + micro, DateTime::<Utc>::MIN_UTC] {
            assert_eq!(parse_run_cursor(&run_cursor_body(at, "r")), None, "{at}");
        }
    }
}
