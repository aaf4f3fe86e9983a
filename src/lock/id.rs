//! What a lock is called inside PostgreSQL, and therefore in vitals' own
//! lock table.
//!
//! PostgreSQL has two advisory lock spaces that never meet: one keyed by a
//! single `bigint`, one by a pair of `int4` (`pg_locks.objsubid` 1 and 2).
//! Client keys live in the first, as `hashtextextended('lock:' || key, 0)`,
//! so any program that locks a key with that SQL conflicts with vitals'
//! holder of the key. vitals' own locks (a system's serialisation, the
//! transition sequence, migrations) live in the second, so no client key,
//! however chosen, can ever block them: the hash is invertible, but it only
//! ever produces single-`bigint` locks.

use super::pghash;

/// Prefix of client keys inside PostgreSQL, kept from the first release so
/// programs that lock `'lock:' || key` themselves keep conflicting with vitals.
pub const CLIENT_KEY_PREFIX: &str = "lock:";

/// The first `int4` of vitals' internal locks that are one of a kind
/// (`"vita"` in ASCII).
pub const INTERNAL_SPACE: i32 = 0x7669_7461;
/// The first `int4` of systems' serialisation locks (`"vits"`); the second
/// is `hashtext(system_id)`.
pub const SYSTEM_SPACE: i32 = 0x7669_7473;
/// `(INTERNAL_SPACE, TRANSITION_SEQUENCE)`: serialised transition sequence
/// numbers until they came from the `transition_sequence` counter row; kept
/// reserved so that no other internal lock takes its number while replicas
/// of both versions may meet during an upgrade.
pub const TRANSITION_SEQUENCE: i32 = 1;
/// `(INTERNAL_SPACE, MIGRATIONS)`: serialises migrations across replicas.
pub const MIGRATIONS: i32 = 2;
/// The first `int4` of waiters' interest (`"vitw"`): a replica whose
/// acquirer waits for a lock held elsewhere holds a *shared* lock on
/// `(INTEREST_SPACE, lock.interest())`, which tells the holding replica to
/// let the lock go at the end of its streak of local hand-offs. Two locks
/// may share an interest lock; that only ends a streak needlessly.
pub const INTEREST_SPACE: i32 = 0x7669_7477;

/// The identity of one lock: what PostgreSQL would lock.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum LockId {
    /// A client key: `pg_advisory_lock(hashtextextended('lock:' || key, 0))`.
    Client(i64),
    /// A client key held shared: `pg_advisory_lock_shared` of the same
    /// number. Another lock than [`LockId::Client`] to the lock table and the
    /// sessions, which keep the two modes apart; the same lock to
    /// PostgreSQL, which makes them exclude each other across sessions.
    Shared(i64),
    /// vitals' own: `pg_advisory_lock(space, object)`.
    Internal {
        /// The first key.
        space: i32,
        /// The second key.
        object: i32,
    },
}

impl LockId {
    /// The lock of the client key `key`. Two keys whose hashes collide are
    /// one lock, here as in PostgreSQL.
    pub fn client(key: &str) -> Self {
        let mut full = String::with_capacity(CLIENT_KEY_PREFIX.len() + key.len());
        full.push_str(CLIENT_KEY_PREFIX);
        full.push_str(key);
        LockId::Client(pghash::hashtextextended(&full, 0))
    }

    /// The key's number in PostgreSQL's single-`bigint` space, whatever
    /// the mode (`None` for vitals' own locks).
    pub fn key_number(self) -> Option<i64> {
        match self {
            LockId::Client(h) | LockId::Shared(h) => Some(h),
            LockId::Internal { .. } => None,
        }
    }

    /// The serialisation lock of a system.
    pub fn system(system_id: &str) -> Self {
        LockId::Internal {
            space: SYSTEM_SPACE,
            object: pghash::hashtext(system_id),
        }
    }

    /// The interest lock of this lock: `(INTEREST_SPACE, the returned int4)`.
    pub(super) fn interest(self) -> (i32, i32) {
        let folded = match self {
            // Readers and writers of a key wait for the same lock.
            LockId::Client(h) | LockId::Shared(h) => {
                let h = h.cast_unsigned();
                h ^ (h >> 32)
            }
            LockId::Internal { space, object } => {
                (u64::from(space.cast_unsigned()) << 32 | u64::from(object.cast_unsigned()))
                    .wrapping_mul(0x9E37_79B9_7F4A_7C15)
                    >> 32
            }
        };
        // Truncation intended: the interest space has 32 bits.
        #[allow(clippy::cast_possible_truncation)]
        let object = folded as u32;
        (INTEREST_SPACE, object.cast_signed())
    }

    /// Spreads locks over `n` sessions.
    pub(super) fn shard(self, n: usize) -> usize {
        let n = u64::try_from(n.max(1)).unwrap_or(1);
        let mixed = match self {
            // Already a well-mixed hash.
            LockId::Client(h) | LockId::Shared(h) => h.cast_unsigned(),
            LockId::Internal { space, object } => (u64::from(space.cast_unsigned()) << 32
                | u64::from(object.cast_unsigned()))
            .wrapping_mul(0x9E37_79B9_7F4A_7C15),
        };
        usize::try_from((mixed >> 16) % n).unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn client_and_internal_locks_are_different_kinds_whatever_the_key() {
        // The key that collided with `health:checkout` in the single-bigint
        // space when system locks lived there too.
        let client = LockId::client("xxxxxxx={/koGGgb#^#");
        assert!(matches!(client, LockId::Client(_)));
        assert_ne!(client, LockId::system("checkout"));
    }

    #[test]
    fn interest_locks_live_apart_from_every_other_internal_lock() {
        for key in ["a", "b", "checkout", "x".repeat(100).as_str()] {
            for id in [LockId::client(key), LockId::system(key)] {
                let (space, _) = id.interest();
                assert_eq!(space, INTEREST_SPACE);
                assert_ne!(space, SYSTEM_SPACE);
                assert_ne!(space, INTERNAL_SPACE);
            }
        }
        assert_ne!(LockId::client("a").interest(), LockId::client("b").interest());
    }

    #[test]
    fn shards_stay_in_range() {
        for n in 1..20 {
            for key in ["a", "b", "c", "health", "x".repeat(100).as_str()] {
                assert!(LockId::client(key).shard(n) < n);
                assert!(LockId::system(key).shard(n) < n);
            }
        }
    }
}
