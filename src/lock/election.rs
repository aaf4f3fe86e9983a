//! Elections: leadership held like a lock, and observers told of each
//! leader.
//!
//! A candidate campaigns by taking the election's lock (an ordinary
//! exclusive lock with a number of its own, apart from every client key), so
//! leadership has a lease, keep-alives and a fencing token like any lock, and
//! fails over when the leader's lease ends or its stream does.
//!
//! Observers learn who leads from the leader's replica: with PostgreSQL it
//! writes the leader (value, token, lease end) to the `UNLOGGED`
//! `election_leaders` table when elected, renews the lease end at each
//! keep-alive and deletes the row when leadership ends; every replica with
//! observers of an election reads that row every [`POLL`] (one read per
//! election, whatever the number of observers). The embedded store keeps the
//! leader in memory. An observer is told each leader once, in token order
//! (tokens of one election only rise), and never one whose lease has ended
//! by the time it would be told.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex, PoisonError},
    time::Duration,
};

use chrono::{DateTime, Utc};
use sqlx::{PgPool, Row as _};
use tokio::sync::watch;

use super::LockId;
use crate::error::{Error, Result};

/// How often a replica with observers of an election reads its leader.
pub const POLL: Duration = Duration::from_millis(100);

/// How long a write of the leader may take before the campaign or the
/// keep-alive gives up on it.
const WRITE_TIMEOUT: Duration = Duration::from_secs(5);

/// The lock of the election `name`: apart from every client key (no key
/// contains NUL) and from semaphore slots.
pub fn lock_id(name: &str) -> LockId {
    LockId::client(&format!("{name}\0election"))
}

/// An election's leader.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Leader {
    /// What the leader campaigned with.
    pub value: String,
    /// Its fencing token.
    pub token: u64,
    /// When it was elected.
    pub elected_at: DateTime<Utc>,
    /// When its lease ends unless renewed.
    pub lease_expires_at: DateTime<Utc>,
    /// The replica it campaigned on.
    pub replica: String,
}

/// Whether an observer that was last told of token `last` is told of
/// `leader` at `now`: a newer leader whose lease still runs.
pub fn tell(leader: &Leader, last: u64, now: DateTime<Utc>) -> bool {
    leader.token > last && leader.lease_expires_at > now
}

/// The elections of this replica: where leaders are written and read.
#[derive(Debug, Clone)]
pub struct Elections {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    /// PostgreSQL's work pool; `None`: the embedded store (in memory).
    pool: Option<PgPool>,
    /// The newest leader known here, by election, while anyone watches
    /// (or, embedded, while it leads).
    known: Mutex<HashMap<String, watch::Sender<Option<Leader>>>>,
}

impl Elections {
    /// Elections written to `pool` (`None`: kept in memory).
    pub fn new(pool: Option<PgPool>) -> Self {
        Elections {
            inner: Arc::new(Inner {
                pool,
                known: Mutex::default(),
            }),
        }
    }

    fn sender(&self, election: &str) -> watch::Sender<Option<Leader>> {
        self.inner
            .known
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .entry(election.to_owned())
            .or_insert_with(|| watch::Sender::new(None))
            .clone()
    }

    /// Makes `leader` known as the leader of `election`.
    pub async fn elected(&self, election: &str, leader: &Leader) -> Result<()> {
        if let Some(pool) = &self.inner.pool {
            let write = sqlx::query(
                "INSERT INTO election_leaders (election, value, token, replica, elected_at_us, lease_expires_us) \
                 VALUES ($1, $2, $3, $4, $5, $6) \
                 ON CONFLICT (election) DO UPDATE SET value = excluded.value, token = excluded.token, \
                     replica = excluded.replica, elected_at_us = excluded.elected_at_us, \
                     lease_expires_us = excluded.lease_expires_us \
                 WHERE election_leaders.token < excluded.token",
            )
            .bind(election)
            .bind(&leader.value)
            .bind(i64::try_from(leader.token).unwrap_or(i64::MAX))
            .bind(&leader.replica)
            .bind(leader.elected_at.timestamp_micros())
            .bind(leader.lease_expires_at.timestamp_micros())
            .execute(pool);
            tokio::time::timeout(WRITE_TIMEOUT, write)
                .await
                .map_err(|_| Error::DatabaseUnavailable(None))??;
        }
        self.sender(election)
            .send_if_modified(|known| newer(known, leader.clone()));
        Ok(())
    }

    /// The leader of `election` with `token` renewed its lease until `until`.
    pub async fn renewed(&self, election: &str, token: u64, until: DateTime<Utc>) {
        if let Some(pool) = &self.inner.pool {
            let write =
                sqlx::query("UPDATE election_leaders SET lease_expires_us = $3 WHERE election = $1 AND token = $2")
                    .bind(election)
                    .bind(i64::try_from(token).unwrap_or(i64::MAX))
                    .bind(until.timestamp_micros())
                    .execute(pool);
            // Not renewed there, observers stop reporting it at the old end:
            // early, never late.
            if let Err(err) = tokio::time::timeout(WRITE_TIMEOUT, write)
                .await
                .unwrap_or(Err(sqlx::Error::PoolTimedOut))
            {
                tracing::debug!(error = %err, "leader's lease not renewed for observers");
            }
        }
        self.sender(election).send_if_modified(|known| match known {
            Some(leader) if leader.token == token => {
                leader.lease_expires_at = until;
                true
            }
            _ => false,
        });
    }

    /// The leader of `election` with `token` stepped down or lost its lease.
    pub async fn ended(&self, election: &str, token: u64) {
        if let Some(pool) = &self.inner.pool {
            let write = sqlx::query("DELETE FROM election_leaders WHERE election = $1 AND token = $2")
                .bind(election)
                .bind(i64::try_from(token).unwrap_or(i64::MAX))
                .execute(pool);
            if let Err(err) = tokio::time::timeout(WRITE_TIMEOUT, write)
                .await
                .unwrap_or(Err(sqlx::Error::PoolTimedOut))
            {
                tracing::debug!(error = %err, "ended leadership not removed; its lease ends it for observers");
            }
        }
        let sender = self.sender(election);
        sender.send_if_modified(|known| match known {
            Some(leader) if leader.token == token => {
                *known = None;
                true
            }
            _ => false,
        });
        self.forget_unwatched(election);
    }

    fn forget_unwatched(&self, election: &str) {
        let mut known = self.inner.known.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(sender) = known.get(election)
            && sender.receiver_count() == 0
            && sender.borrow().is_none()
        {
            known.remove(election);
        }
    }

    /// Watches the leader of `election`: the newest known, refreshed from
    /// PostgreSQL every [`POLL`] while anyone watches.
    pub fn watch(&self, election: &str) -> Watch {
        let sender = self.sender(election);
        let receiver = sender.subscribe();
        if let Some(pool) = &self.inner.pool
            && sender.receiver_count() == 1
        {
            tokio::spawn(poll(pool.clone(), election.to_owned(), sender));
        }
        Watch {
            elections: self.clone(),
            election: election.to_owned(),
            receiver,
        }
    }
}

/// Replaces `known` with `leader` if it is newer.
fn newer(known: &mut Option<Leader>, leader: Leader) -> bool {
    if known
        .as_ref()
        .is_none_or(|k| k.token < leader.token || (k.token == leader.token && *k != leader))
    {
        *known = Some(leader);
        true
    } else {
        false
    }
}

/// Reads the leader of `election` every [`POLL`] into `sender` while it has receivers.
async fn poll(pool: PgPool, election: String, sender: watch::Sender<Option<Leader>>) {
    while sender.receiver_count() > 0 {
        let read = sqlx::query(
            "SELECT value, token, replica, elected_at_us, lease_expires_us FROM election_leaders WHERE election = $1",
        )
        .bind(&election)
        .fetch_optional(&pool);
        match tokio::time::timeout(POLL * 10, read).await {
            Ok(Ok(row)) => {
                let leader = row.and_then(|row| decode(&row).ok());
                sender.send_if_modified(|known| match leader {
                    Some(leader) => newer(known, leader),
                    // Gone from the table: ended (or never written).
                    None => known.take().is_some(),
                });
            }
            Ok(Err(err)) => tracing::debug!(error = %err, "election leader not read; will retry"),
            Err(_) => tracing::debug!("election leader read timed out; will retry"),
        }
        tokio::select! {
            () = tokio::time::sleep(POLL) => {}
            () = sender.closed() => break,
        }
    }
}

fn decode(row: &sqlx::postgres::PgRow) -> std::result::Result<Leader, sqlx::Error> {
    let at = |us: i64| DateTime::from_timestamp_micros(us).unwrap_or_default();
    Ok(Leader {
        value: row.try_get("value")?,
        token: u64::try_from(row.try_get::<i64, _>("token")?).unwrap_or(0),
        replica: row.try_get("replica")?,
        elected_at: at(row.try_get("elected_at_us")?),
        lease_expires_at: at(row.try_get("lease_expires_us")?),
    })
}

/// One observer's view of an election's leader.
#[derive(Debug)]
pub struct Watch {
    elections: Elections,
    election: String,
    receiver: watch::Receiver<Option<Leader>>,
}

impl Watch {
    /// The next leader to tell an observer last told of token `last`:
    /// newer, its lease still running. Waits for one.
    pub async fn next(&mut self, last: u64) -> Result<Leader> {
        loop {
            let current = self.receiver.borrow_and_update().clone();
            let now = Utc::now();
            match current {
                Some(leader) if tell(&leader, last, now) => return Ok(leader),
                // A leader whose lease ended is never told; one that is
                // still told about is looked at again when its lease ends.
                Some(leader) if leader.token > last => {
                    let left = (leader.lease_expires_at - now).to_std().unwrap_or_default();
                    let _ = tokio::time::timeout(left.max(POLL), self.receiver.changed()).await;
                    continue;
                }
                _ => {}
            }
            self.receiver.changed().await.map_err(|_| Error::ShuttingDown)?;
        }
    }
}

impl Drop for Watch {
    fn drop(&mut self) {
        self.elections.forget_unwatched(&self.election);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn leader(token: u64, lease_left_ms: i64) -> Leader {
        let now = Utc::now();
        Leader {
            value: format!("v{token}"),
            token,
            elected_at: now,
            lease_expires_at: now + chrono::Duration::milliseconds(lease_left_ms),
            replica: "r".into(),
        }
    }

    #[test]
    fn an_observer_is_told_of_newer_leaders_whose_lease_runs_only() {
        let now = Utc::now();
        assert!(tell(&leader(5, 1000), 4, now));
        assert!(!tell(&leader(5, 1000), 5, now), "told once");
        assert!(!tell(&leader(4, 1000), 5, now), "never an older one");
        assert!(!tell(&leader(6, -1), 5, now), "never one whose lease ended");
    }

    #[test]
    fn a_known_leader_is_replaced_only_by_a_newer_one() {
        let mut known = None;
        assert!(newer(&mut known, leader(3, 1000)));
        assert!(!newer(&mut known, leader(2, 1000)));
        assert!(newer(&mut known, leader(4, 1000)));
        assert_eq!(known.map(|l| l.token), Some(4));
    }
}
