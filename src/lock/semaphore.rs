//! Semaphores: a key held by at most N holders at once across replicas.
//!
//! A semaphore of N is N *slots*, each an ordinary exclusive lock with a
//! number of its own (the key's, with the slot's index, behind a NUL no
//! client key can contain), so each holder has a fencing token of its own and
//! PostgreSQL keeps the count across replicas exactly as it keeps one lock.
//! An acquirer takes any free slot; when every slot is taken it queues on
//! one for a short while, then looks at all of them again.
//!
//! Every acquire of a key must name the same N: a replica refuses an acquire
//! whose N differs from that of the key's holders and waiters there (a plain
//! lock counts as N = 1). The first semaphore acquire of a key on a replica
//! also compares its N with what the other replicas published of the key
//! ([`super::inventory`]: streams of at least a publication period), which
//! catches replicas configured differently, though not two that start using a
//! key within the same moment. Whatever slips through, a slot is the same lock
//! whatever the N: holders that disagree are still never more than the
//! largest N, and those that asked for N never take a slot beyond the N-th.

use std::{
    collections::HashMap,
    sync::{
        Arc, Mutex, PoisonError,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use super::LockId;

/// The largest semaphore.
pub const MAX_HOLDERS: u32 = 256;

/// How long an acquirer that found every slot taken queues on one of them
/// before it looks at all of them again.
pub const SLOT_QUEUE: Duration = Duration::from_millis(50);

/// The lock of slot `index` of the semaphore `key`.
pub fn slot(key: &str, index: u32) -> LockId {
    LockId::client(&format!("{key}\0semaphore\0{index}"))
}

/// The semaphores in use on this replica (held or waited for), by key
/// number, with their size.
#[derive(Debug, Clone, Default)]
pub struct Semaphores {
    inner: Arc<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    /// Key number -> (N, acquirers holding or waiting).
    sizes: Mutex<HashMap<i64, (u32, usize)>>,
    /// Keys in `sizes`: a plain acquire looks there only when there are any.
    keys: AtomicUsize,
    /// Where the next acquirer starts its round of the slots.
    starts: AtomicUsize,
}

/// An acquirer's use of a semaphore's key; ends when dropped.
#[derive(Debug)]
pub struct SemaphoreUse {
    inner: Arc<Inner>,
    key: i64,
    /// The first use of the key on this replica (nobody held or waited).
    pub first: bool,
}

impl Semaphores {
    /// Counts an acquirer of the semaphore `key` of size `max`, or returns
    /// the size the key is in use with here.
    pub fn enter(&self, key: i64, max: u32) -> Result<SemaphoreUse, u32> {
        let mut sizes = self.inner.sizes.lock().unwrap_or_else(PoisonError::into_inner);
        let entry = sizes.entry(key).or_insert_with(|| {
            self.inner.keys.fetch_add(1, Ordering::SeqCst);
            (max, 0)
        });
        if entry.0 != max {
            return Err(entry.0);
        }
        entry.1 += 1;
        Ok(SemaphoreUse {
            inner: self.inner.clone(),
            key,
            first: entry.1 == 1,
        })
    }

    /// Where an acquirer starts its round of the slots: each at another.
    pub fn next_start(&self) -> usize {
        self.inner.starts.fetch_add(1, Ordering::Relaxed)
    }

    /// The size of the semaphore `key` if one is in use here.
    pub fn size_of(&self, key: i64) -> Option<u32> {
        if self.inner.keys.load(Ordering::SeqCst) == 0 {
            return None;
        }
        let sizes = self.inner.sizes.lock().unwrap_or_else(PoisonError::into_inner);
        sizes.get(&key).map(|(max, _)| *max)
    }
}

impl Drop for SemaphoreUse {
    fn drop(&mut self) {
        let mut sizes = self.inner.sizes.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(entry) = sizes.get_mut(&self.key) {
            entry.1 = entry.1.saturating_sub(1);
            if entry.1 == 0 {
                sizes.remove(&self.key);
                self.inner.keys.fetch_sub(1, Ordering::SeqCst);
            }
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn slots_are_distinct_locks_apart_from_every_client_key() {
        let slots: Vec<LockId> = (0..MAX_HOLDERS).map(|i| slot("pool", i)).collect();
        let mut unique = slots.clone();
        unique.sort_unstable_by_key(|id| id.key_number());
        unique.dedup();
        assert_eq!(unique.len(), slots.len());
        assert!(!slots.contains(&LockId::client("pool")));
        assert_ne!(slot("pool", 0), slot("pool2", 0));
    }

    #[test]
    fn a_key_in_use_keeps_its_size_until_its_last_user_leaves() {
        let semaphores = Semaphores::default();
        assert_eq!(semaphores.size_of(7), None);
        let first = semaphores.enter(7, 3).unwrap();
        let second = semaphores.enter(7, 3).unwrap();
        assert_eq!(semaphores.enter(7, 4).unwrap_err(), 3);
        assert_eq!(semaphores.size_of(7), Some(3));
        drop(first);
        assert_eq!(semaphores.size_of(7), Some(3));
        drop(second);
        assert_eq!(semaphores.size_of(7), None);
        assert!(semaphores.enter(7, 4).is_ok());
    }
}
