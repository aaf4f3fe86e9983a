//! Opaque, signed page tokens.
//!
//! A token is the cursor of the next page plus the request's filter, signed
//! with HMAC-SHA-256 under the deployment's key ([`PageTokenKey`], made once
//! and kept in the database, so every replica takes every other's tokens).
//! A token that was altered, truncated, replayed against a different filter,
//! made by another deployment or made up by a client is refused with
//! INVALID_ARGUMENT instead of silently returning the wrong page: a client
//! cannot steer a listing to a cursor of its choosing.

use std::sync::OnceLock;

use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD};
use chrono::{DateTime, Utc};
use hmac::{Hmac, Mac};
use sha2::{Digest, Sha256};

use crate::domain::FieldViolation;

/// 2: signed with the deployment's key (1 was a fixed-key checksum; its
/// tokens are refused, and a client starts its listing again).
const VERSION: u8 = 2;
/// Bytes of the signature kept in a token: 128 bits.
const CHECK_LEN: usize = 16;

/// The deployment's page token key, set once the database has answered
/// (business RPCs are refused until then, so no listing runs without it).
#[derive(Debug, Default)]
pub struct PageTokenKey(OnceLock<[u8; 32]>);

impl PageTokenKey {
    /// From now on tokens are signed and checked with `key`. The first key
    /// stays: every replica reads the same one.
    pub fn set(&self, key: [u8; 32]) {
        let _ = self.0.set(key);
    }

    /// Whether the key is known yet.
    pub fn is_set(&self) -> bool {
        self.0.get().is_some()
    }

    fn get(&self) -> Result<&[u8; 32], crate::error::Error> {
        self.0.get().ok_or(crate::error::Error::Invariant(
            "a listing ran before the page token key was read",
        ))
    }

    fn mac(key: &[u8; 32], payload: &[u8]) -> Hmac<Sha256> {
        let mut mac =
            <Hmac<Sha256> as Mac>::new_from_slice(key).unwrap_or_else(|_| unreachable!("HMAC takes any key length"));
        mac.update(payload);
        mac
    }
}

/// Kinds of listing, so a runs token is never taken for a transitions token.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub(crate) enum Kind {
    Runs = 1,
    Transitions = 2,
    Systems = 3,
    Locks = 4,
}

fn filter_digest(filter: &str) -> [u8; 8] {
    let digest = Sha256::digest(filter.as_bytes());
    let mut out = [0u8; 8];
    out.copy_from_slice(&digest[..8]);
    out
}

/// Encodes a cursor (`body`) of `kind` for a request filtered by `filter`.
pub(crate) fn encode(key: &PageTokenKey, kind: Kind, filter: &str, body: &[u8]) -> Result<String, crate::error::Error> {
    let mut payload = vec![VERSION, kind as u8];
    payload.extend_from_slice(&filter_digest(filter));
    payload.extend_from_slice(body);
    let signature = PageTokenKey::mac(key.get()?, &payload).finalize().into_bytes();
    payload.extend_from_slice(&signature[..CHECK_LEN]);
    Ok(URL_SAFE_NO_PAD.encode(payload))
}

/// Decodes a token made by [`encode`] with the same key, kind and filter.
pub(crate) fn decode(
    key: &PageTokenKey,
    field: &str,
    kind: Kind,
    filter: &str,
    token: &str,
) -> Result<Vec<u8>, FieldViolation> {
    let invalid = || {
        FieldViolation::new(
            field,
            "is not a page token of this listing; pass next_page_token unchanged",
        )
    };
    let Ok(key) = key.get() else {
        return Err(invalid());
    };
    let raw = URL_SAFE_NO_PAD.decode(token).map_err(|_| invalid())?;
    if raw.len() < 2 + 8 + CHECK_LEN {
        return Err(invalid());
    }
    let (payload, check) = raw.split_at(raw.len() - CHECK_LEN);
    // verify_truncated_left compares in constant time.
    if PageTokenKey::mac(key, payload).verify_truncated_left(check).is_err()
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

    fn key(byte: u8) -> PageTokenKey {
        let key = PageTokenKey::default();
        key.set([byte; 32]);
        key
    }

    #[test]
    fn a_token_round_trips_for_its_own_listing_only() {
        let k = key(1);
        let token = encode(&k, Kind::Runs, "sys-a", b"cursor").unwrap();
        assert_eq!(
            decode(&k, "page_token", Kind::Runs, "sys-a", &token).unwrap(),
            b"cursor"
        );
        assert!(decode(&k, "page_token", Kind::Runs, "sys-b", &token).is_err());
        assert!(decode(&k, "page_token", Kind::Transitions, "sys-a", &token).is_err());
    }

    #[test]
    fn a_token_of_another_deployment_or_of_the_old_fixed_key_scheme_is_refused() {
        let token = encode(&key(1), Kind::Runs, "sys-a", b"cursor").unwrap();
        assert!(decode(&key(2), "page_token", Kind::Runs, "sys-a", &token).is_err());
        assert!(decode(&PageTokenKey::default(), "page_token", Kind::Runs, "sys-a", &token).is_err());
        // What a client could compute from the source: the old checksum.
        let mut forged = vec![1, Kind::Runs as u8];
        forged.extend_from_slice(&filter_digest("sys-a"));
        forged.extend_from_slice(b"cursor");
        let digest = Sha256::new()
            .chain_update(b"vitals.v1 page token")
            .chain_update(&forged)
            .finalize();
        forged.extend_from_slice(&digest[..12]);
        let forged = URL_SAFE_NO_PAD.encode(forged);
        assert!(decode(&key(1), "page_token", Kind::Runs, "sys-a", &forged).is_err());
    }

    #[test]
    fn any_single_byte_change_is_refused() {
        let k = key(3);
        let token = encode(&k, Kind::Transitions, "", &42u64.to_be_bytes()).unwrap();
        let raw = URL_SAFE_NO_PAD.decode(&token).unwrap();
        for i in 0..raw.len() {
            let mut bad = raw.clone();
            bad[i] ^= 0x01;
            assert!(
                decode(&k, "t", Kind::Transitions, "", &URL_SAFE_NO_PAD.encode(bad)).is_err(),
                "byte {i}"
            );
        }
        for bad in ["", "!!!", "AAAA", &token[..token.len() - 1]] {
            assert!(decode(&k, "t", Kind::Transitions, "", bad).is_err(), "{bad}");
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
