//! Who holds and who waits for which client key, on every replica.
//!
//! Each replica lists its own WithLock streams in memory ([`Inventory`]):
//! a stream enters the list when its `acquire` is accepted and leaves it
//! when it ends; its grant and keep-alives update the entry in place. That is
//! all the grant path pays: no statement, no write.
//!
//! With PostgreSQL a task of each replica ([`publish`]) copies what changed
//! in its list, every [`PUBLISH_EVERY`], to the `lock_inventory` table, which
//! is `UNLOGGED` (no WAL, no flush: it is a cache of what the replicas hold,
//! rebuilt by them after a crash), and says the replica is alive in
//! `lock_replicas`. Changes that cancel out within one period (a lock taken
//! and released in the meantime) are never written, so short critical
//! sections cost PostgreSQL nothing at all. A listing reads the answering
//! replica's own list (exact) and the other live replicas' published rows
//! (as of at most [`PUBLISH_EVERY`] ago), leaving out any holder whose lease
//! has ended and any replica not seen for [`REPLICA_TIMEOUT`].

use std::{
    borrow::Cow,
    collections::HashMap,
    sync::{
        Arc, Mutex, PoisonError, Weak,
        atomic::{AtomicBool, AtomicI64, AtomicU32, AtomicU64, Ordering},
    },
    time::Duration,
};

use chrono::{DateTime, Utc};
use sqlx::{PgPool, Row as _};
use tokio::sync::watch;

use super::Mode;
use crate::{
    domain::{LockKey, Namespace, Owner},
    error::{Error, Result},
};

/// How often a replica publishes what changed in its list.
pub const PUBLISH_EVERY: Duration = Duration::from_millis(250);

/// A replica not seen for this long is left out of listings (and its rows
/// are removed).
pub const REPLICA_TIMEOUT: Duration = Duration::from_secs(5);

/// Shards of the in-memory list, so that grants on many cores rarely meet.
const SHARDS: usize = 16;

/// Rows per publishing statement: a replica that holds many locks renews
/// them all within one lease, and one statement for all of them would build
/// its whole parameter buffer at once.
const ROWS_PER_STATEMENT: usize = 500;

/// `Entry::published` of an entry never published (or to publish again).
const UNPUBLISHED: i64 = i64::MIN;

/// The WithLock streams of this replica.
#[derive(Debug, Clone)]
pub struct Inventory {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    /// How this replica is named in listings.
    replica: String,
    shards: Vec<Mutex<HashMap<u64, Arc<Entry>>>>,
    next: AtomicU64,
    /// Publishing rounds begun; an entry is published once a whole round
    /// has passed since it was listed.
    round: AtomicU32,
    /// Published entries that left the list since the last round.
    gone: Mutex<Vec<u64>>,
}

/// One stream's entry: every held lock keeps one, so it is kept small (key
/// and owner in one allocation, times as microseconds).
#[derive(Debug)]
struct Entry {
    id: u64,
    /// The key, then the owner.
    text: Box<str>,
    key_len: u16,
    holding: AtomicBool,
    /// The publishing round the entry was listed in.
    listed_in: u32,
    mode: Mode,
    token: AtomicU64,
    acquired_at_us: AtomicI64,
    lease_expires_us: AtomicI64,
    /// What was last published of it ([`Entry::state`]), or
    /// [`UNPUBLISHED`]. Written under its shard's lock.
    published: AtomicI64,
    inventory: Weak<Inner>,
}

/// A stream's place in the list; leaves it when dropped.
#[derive(Debug)]
pub struct Listing(Arc<Entry>);

/// One holder or waiter, as a listing shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Row {
    /// The client's key.
    pub key: String,
    /// How the key is held.
    pub mode: Mode,
    /// Who, as the client said.
    pub owner: String,
    /// Holding (else waiting).
    pub holding: bool,
    /// Its fencing token (0 while waiting).
    pub token: u64,
    /// When it was granted.
    pub acquired_at: Option<DateTime<Utc>>,
    /// When its lease ends unless renewed.
    pub lease_expires_at: Option<DateTime<Utc>>,
    /// Which replica.
    pub replica: String,
}

fn micros(at: DateTime<Utc>) -> i64 {
    at.timestamp_micros()
}

fn from_micros(us: i64) -> Option<DateTime<Utc>> {
    (us != 0).then(|| DateTime::from_timestamp_micros(us)).flatten()
}

impl Inventory {
    /// An empty list of the replica named `replica`.
    pub fn new(replica: String) -> Self {
        Inventory {
            inner: Arc::new(Inner {
                replica,
                shards: (0..SHARDS).map(|_| Mutex::default()).collect(),
                next: AtomicU64::new(1),
                round: AtomicU32::new(0),
                gone: Mutex::default(),
            }),
        }
    }

    /// This replica's name.
    pub fn replica(&self) -> &str {
        &self.inner.replica
    }

    /// Lists a stream that asks for `key` as `mode`, for `owner`.
    pub fn enter(&self, key: &LockKey, owner: &Owner, mode: Mode) -> Listing {
        let id = self.inner.next.fetch_add(1, Ordering::Relaxed);
        let (key, owner) = (key.as_str(), owner.as_str());
        let mut text = String::with_capacity(key.len() + owner.len());
        text.push_str(key);
        text.push_str(owner);
        let entry = Arc::new(Entry {
            id,
            text: text.into_boxed_str(),
            // Keys are at most 512 bytes.
            key_len: u16::try_from(key.len()).unwrap_or(u16::MAX),
            holding: AtomicBool::new(false),
            listed_in: self.inner.round.load(Ordering::Relaxed),
            mode,
            token: AtomicU64::new(0),
            acquired_at_us: AtomicI64::new(0),
            lease_expires_us: AtomicI64::new(0),
            published: AtomicI64::new(UNPUBLISHED),
            inventory: Arc::downgrade(&self.inner),
        });
        self.inner
            .shard(id)
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(id, entry.clone());
        Listing(entry)
    }

    /// What this replica's streams hold and wait for, of keys starting
    /// with `prefix` (only `prefix` itself, with `exact`), after `after` and
    /// in `visible`.
    pub fn local(&self, prefix: &str, visible: &Namespace, after: Option<&str>, exact: bool) -> Vec<Row> {
        let mut entries = Vec::new();
        for shard in &self.inner.shards {
            // Under the lock grants take, only what is cheap; the rest after.
            let shard = shard.lock().unwrap_or_else(PoisonError::into_inner);
            entries.extend(shard.values().filter(|e| e.key().starts_with(prefix)).cloned());
        }
        entries
            .iter()
            .filter(|e| {
                let key = e.key();
                after.is_none_or(|a| key > a) && (!exact || key == prefix) && visible.contains(key)
            })
            .map(|e| e.row(&self.inner.replica))
            .collect()
    }

    /// Whether published entries left since the last round began.
    fn has_gone(&self) -> bool {
        !self
            .inner
            .gone
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .is_empty()
    }
}

impl Inner {
    fn shard(&self, id: u64) -> &Mutex<HashMap<u64, Arc<Entry>>> {
        &self.shards[usize::try_from(id % SHARDS as u64).unwrap_or(0)]
    }
}

impl Entry {
    fn key(&self) -> &str {
        self.text.get(..usize::from(self.key_len)).unwrap_or_default()
    }

    fn owner(&self) -> &str {
        self.text.get(usize::from(self.key_len)..).unwrap_or_default()
    }

    /// What a listing would show of it that can change: the lease's end
    /// while holding, 0 while waiting.
    fn state(&self) -> i64 {
        if self.holding.load(Ordering::Acquire) {
            self.lease_expires_us.load(Ordering::Relaxed)
        } else {
            0
        }
    }

    fn row(&self, replica: &str) -> Row {
        Row {
            key: self.key().to_owned(),
            mode: self.mode,
            owner: self.owner().to_owned(),
            holding: self.holding.load(Ordering::Acquire),
            token: self.token.load(Ordering::Relaxed),
            acquired_at: from_micros(self.acquired_at_us.load(Ordering::Relaxed)),
            lease_expires_at: from_micros(self.lease_expires_us.load(Ordering::Relaxed)),
            replica: replica.to_owned(),
        }
    }
}

impl Listing {
    /// The stream was granted the key.
    pub fn granted(&self, token: u64, acquired_at: DateTime<Utc>, lease_expires_at: DateTime<Utc>) {
        self.0.token.store(token, Ordering::Relaxed);
        self.0.acquired_at_us.store(micros(acquired_at), Ordering::Relaxed);
        self.0
            .lease_expires_us
            .store(micros(lease_expires_at), Ordering::Relaxed);
        self.0.holding.store(true, Ordering::Release);
    }

    /// The stream's lease was renewed until `lease_expires_at`.
    pub fn kept_alive(&self, lease_expires_at: DateTime<Utc>) {
        self.0
            .lease_expires_us
            .store(micros(lease_expires_at), Ordering::Relaxed);
    }
}

impl Drop for Listing {
    fn drop(&mut self) {
        let Some(inner) = self.0.inventory.upgrade() else {
            return;
        };
        let published = {
            let mut shard = inner.shard(self.0.id).lock().unwrap_or_else(PoisonError::into_inner);
            shard.remove(&self.0.id);
            // Read under the shard's lock, where the publisher marks it: a
            // row published meanwhile is either seen here or never written.
            self.0.published.load(Ordering::Relaxed) != UNPUBLISHED
        };
        if published {
            inner
                .gone
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .push(self.0.id);
        }
    }
}

/// The stored spelling of a mode: `exclusive`, `shared` or the size of a semaphore.
fn mode_text(mode: Mode) -> Cow<'static, str> {
    match mode {
        Mode::Exclusive => Cow::Borrowed("exclusive"),
        Mode::Shared => Cow::Borrowed("shared"),
        Mode::Semaphore(n) => Cow::Owned(n.to_string()),
    }
}

fn mode_of(text: &str) -> Option<Mode> {
    match text {
        "exclusive" => Some(Mode::Exclusive),
        "shared" => Some(Mode::Shared),
        n => n.parse().ok().map(Mode::Semaphore),
    }
}

/// One publishing round's work: what changed since the last.
#[derive(Debug, Default)]
struct Changes {
    /// Entries to write, each with the state written.
    upserts: Vec<(Arc<Entry>, i64)>,
    /// Published entries that left.
    gone: Vec<i64>,
    /// Whether any entry is published (so the replica must say it is alive).
    any_published: bool,
}

impl Inventory {
    /// Begins a publishing round: marks what changed as published, to be
    /// written by the caller (with `all`, every entry listed a whole round).
    /// An entry whose write fails is published again by a round with `all`.
    fn changes(&self, all: bool) -> Changes {
        let round = self.inner.round.fetch_add(1, Ordering::Relaxed);
        let mut changes = Changes {
            gone: std::mem::take(&mut *self.inner.gone.lock().unwrap_or_else(PoisonError::into_inner))
                .into_iter()
                .filter_map(|id| i64::try_from(id).ok())
                .collect(),
            ..Changes::default()
        };
        for shard in &self.inner.shards {
            let shard = shard.lock().unwrap_or_else(PoisonError::into_inner);
            // Listed since the last round began (or since this one did, which
            // wraps to a huge age): not a whole round yet.
            for entry in shard
                .values()
                .filter(|e| (1..u32::MAX / 2).contains(&round.wrapping_sub(e.listed_in)))
            {
                let state = entry.state();
                if all || entry.published.load(Ordering::Relaxed) != state {
                    entry.published.store(state, Ordering::Relaxed);
                    changes.upserts.push((entry.clone(), state));
                }
                changes.any_published = true;
            }
        }
        changes
    }
}

/// Publishes `inventory` to `pool` every [`PUBLISH_EVERY`] until `stop` turns
/// true; then removes this replica's rows. Only streams listed for a whole
/// round are published, so a lock held for less costs PostgreSQL nothing,
/// and a replica with nothing to publish sends no statement at all.
pub async fn publish(inventory: Inventory, pool: PgPool, mut stop: watch::Receiver<bool>) {
    // After a failed statement the rows are unknown: start over. So too at
    // the start: a replica restarted under the same name (a fixed
    // VITALS_REPLICA_NAME) must not keep its predecessor's rows alive.
    let mut resync = true;
    // Rows of this replica may be in the table.
    let mut stored = true;
    let mut ticks: u64 = 0;
    loop {
        tokio::select! {
            () = tokio::time::sleep(PUBLISH_EVERY) => {}
            _ = stop.wait_for(|s| *s) => break,
        }
        ticks += 1;
        let changes = inventory.changes(resync);
        // While it has rows, the replica says it is alive every period.
        if changes.upserts.is_empty() && changes.gone.is_empty() && !changes.any_published && !(resync && stored) {
            continue;
        }
        // Dead replicas' rows go now and then.
        let sweep = ticks.is_multiple_of(20);
        stored = true;
        match write(&pool, inventory.replica(), &changes, resync, sweep).await {
            Ok(()) => {
                stored = changes.any_published;
                resync = false;
            }
            Err(err) => {
                tracing::debug!(error = %err, "lock inventory not published; will retry");
                resync = true;
            }
        }
    }
    // A stream that left during the last round may still have its row.
    if stored || inventory.has_gone() {
        let _ = tokio::time::timeout(
            Duration::from_secs(1),
            sqlx::query("DELETE FROM lock_inventory WHERE replica = $1")
                .bind(inventory.replica())
                .execute(&pool),
        )
        .await;
    }
}

/// One round of publishing, as one transaction.
async fn write(pool: &PgPool, replica: &str, changes: &Changes, resync: bool, sweep: bool) -> Result<()> {
    let bound = tokio::time::Instant::now() + REPLICA_TIMEOUT;
    let work = async {
        let mut tx = pool.begin().await?;
        sqlx::query(
            "INSERT INTO lock_replicas (replica, seen_at) VALUES ($1, now()) \
             ON CONFLICT (replica) DO UPDATE SET seen_at = now()",
        )
        .bind(replica)
        .execute(&mut *tx)
        .await?;
        if resync {
            sqlx::query("DELETE FROM lock_inventory WHERE replica = $1")
                .bind(replica)
                .execute(&mut *tx)
                .await?;
        } else if !changes.gone.is_empty() {
            sqlx::query("DELETE FROM lock_inventory WHERE replica = $1 AND holder = ANY($2)")
                .bind(replica)
                .bind(&changes.gone)
                .execute(&mut *tx)
                .await?;
        }
        for chunk in changes.upserts.chunks(ROWS_PER_STATEMENT) {
            let mut ids = Vec::with_capacity(chunk.len());
            let (mut keys, mut owners, mut modes) = (Vec::new(), Vec::new(), Vec::new());
            let (mut holding, mut tokens, mut acquired, mut leases) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
            for (e, state) in chunk {
                ids.push(i64::try_from(e.id).unwrap_or(i64::MAX));
                keys.push(e.key());
                owners.push(e.owner());
                modes.push(mode_text(e.mode));
                // As marked published, so the row and the mark agree.
                holding.push(*state != 0);
                tokens.push(i64::try_from(e.token.load(Ordering::Relaxed)).unwrap_or(i64::MAX));
                acquired.push(e.acquired_at_us.load(Ordering::Relaxed));
                leases.push(*state);
            }
            sqlx::query(
                "INSERT INTO lock_inventory \
                     (replica, holder, key, owner, mode, holding, token, acquired_at_us, lease_expires_us) \
                 SELECT $1, * FROM unnest($2::int8[], $3::text[], $4::text[], $5::text[], $6::bool[], $7::int8[], \
                                          $8::int8[], $9::int8[]) \
                 ON CONFLICT (replica, holder) DO UPDATE SET key = excluded.key, owner = excluded.owner, \
                     mode = excluded.mode, holding = excluded.holding, token = excluded.token, \
                     acquired_at_us = excluded.acquired_at_us, lease_expires_us = excluded.lease_expires_us",
            )
            .bind(replica)
            .bind(&ids)
            .bind(&keys)
            .bind(&owners)
            .bind(&modes)
            .bind(&holding)
            .bind(&tokens)
            .bind(&acquired)
            .bind(&leases)
            .execute(&mut *tx)
            .await?;
        }
        if sweep {
            sqlx::query(
                "WITH dead AS (DELETE FROM lock_replicas WHERE seen_at < now() - make_interval(secs => $1) \
                               RETURNING replica) \
                 DELETE FROM lock_inventory WHERE replica IN (SELECT replica FROM dead)",
            )
            .bind(REPLICA_TIMEOUT.as_secs_f64() * 12.0)
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        Ok::<_, Error>(())
    };
    tokio::time::timeout_at(bound, work)
        .await
        .map_err(|_| Error::DatabaseUnavailable(None))?
}

/// The rows other live replicas published, of keys starting with `prefix`,
/// in `visible` and after `after`, for at most `keys` distinct held keys (the
/// first in key order); with `exact`, of the key `prefix` only, held or not.
/// Holders whose lease has ended are left out.
pub async fn remote(
    pool: &PgPool,
    replica: &str,
    prefix: &str,
    visible: &Namespace,
    after: Option<&str>,
    keys: i64,
    exact: bool,
) -> Result<Vec<Row>> {
    let (names, prefixes) = visible.exact_and_prefixes().unzip();
    let rows = sqlx::query(
        "WITH live AS (SELECT replica FROM lock_replicas \
                       WHERE seen_at > now() - make_interval(secs => $2) AND replica <> $1), \
              rows AS (SELECT i.* FROM lock_inventory i JOIN live USING (replica) \
                       WHERE left(i.key, length($3)) = $3 AND ($4::text IS NULL OR i.key > $4) \
                         AND (NOT $6 OR i.key = $3) \
                         AND ($7::text[] IS NULL OR i.key = ANY($7) \
                              OR EXISTS (SELECT FROM unnest($8::text[]) p WHERE left(i.key, length(p)) = p)) \
                         AND (NOT i.holding OR i.lease_expires_us > (extract(epoch FROM now()) * 1000000)::int8)), \
              first AS (SELECT DISTINCT key FROM rows WHERE holding OR $6 ORDER BY key LIMIT $5) \
         SELECT replica, key, owner, mode, holding, token, acquired_at_us, lease_expires_us \
         FROM rows WHERE key IN (SELECT key FROM first)",
    )
    .bind(replica)
    .bind(REPLICA_TIMEOUT.as_secs_f64())
    .bind(prefix)
    .bind(after)
    .bind(keys)
    .bind(exact)
    .bind(names)
    .bind(prefixes)
    .fetch_all(pool)
    .await?;
    rows.iter()
        .map(decode)
        .filter_map(Result::transpose)
        .map(|r| r.map_err(Error::from))
        .collect()
}

/// The rows other live replicas published of exactly `keys` (holders
/// whose lease has ended left out).
pub async fn remote_keys(pool: &PgPool, replica: &str, keys: &[String]) -> Result<Vec<Row>> {
    let rows = sqlx::query(
        "SELECT i.replica, i.key, i.owner, i.mode, i.holding, i.token, i.acquired_at_us, i.lease_expires_us \
         FROM lock_inventory i JOIN lock_replicas r USING (replica) \
         WHERE r.seen_at > now() - make_interval(secs => $2) AND i.replica <> $1 AND i.key = ANY($3) \
           AND (NOT i.holding OR i.lease_expires_us > (extract(epoch FROM now()) * 1000000)::int8)",
    )
    .bind(replica)
    .bind(REPLICA_TIMEOUT.as_secs_f64())
    .bind(keys)
    .fetch_all(pool)
    .await?;
    rows.iter()
        .map(decode)
        .filter_map(Result::transpose)
        .map(|r| r.map_err(Error::from))
        .collect()
}

fn decode(row: &sqlx::postgres::PgRow) -> std::result::Result<Option<Row>, sqlx::Error> {
    let mode: String = row.try_get("mode")?;
    let Some(mode) = mode_of(&mode) else { return Ok(None) };
    Ok(Some(Row {
        key: row.try_get("key")?,
        mode,
        owner: row.try_get("owner")?,
        holding: row.try_get("holding")?,
        token: u64::try_from(row.try_get::<i64, _>("token")?).unwrap_or(0),
        acquired_at: from_micros(row.try_get("acquired_at_us")?),
        lease_expires_at: from_micros(row.try_get("lease_expires_us")?),
        replica: row.try_get("replica")?,
    }))
}

/// How another live replica published that it uses `key`, if any of its
/// streams asks for it otherwise than `mode`.
pub async fn other_mode(pool: &PgPool, replica: &str, key: &str, mode: Mode) -> Result<Option<Mode>> {
    let found: Option<String> = sqlx::query_scalar(
        "SELECT i.mode FROM lock_inventory i JOIN lock_replicas r USING (replica) \
         WHERE i.key = $1 AND i.replica <> $2 AND i.mode <> $3 \
           AND r.seen_at > now() - make_interval(secs => $4) \
         LIMIT 1",
    )
    .bind(key)
    .bind(replica)
    .bind(mode_text(mode))
    .bind(REPLICA_TIMEOUT.as_secs_f64())
    .fetch_optional(pool)
    .await?;
    Ok(found.as_deref().and_then(mode_of))
}

/// A held key, as listings show it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyInfo {
    /// The key.
    pub key: String,
    /// How it is held.
    pub mode: Mode,
    /// Its holders, in token order.
    pub holders: Vec<Row>,
    /// Acquirers waiting for it, on every replica.
    pub waiters: u32,
}

/// Groups `rows` by key, in key order, keeping keys with a holder (every
/// key, with `include_waiting`), at most `limit` of them; and whether more
/// keys followed.
pub fn group(rows: Vec<Row>, limit: usize, include_waiting: bool) -> (Vec<KeyInfo>, bool) {
    let mut keys: std::collections::BTreeMap<String, KeyInfo> = std::collections::BTreeMap::new();
    for row in rows {
        let info = keys.entry(row.key.clone()).or_insert_with(|| KeyInfo {
            key: row.key.clone(),
            mode: row.mode,
            holders: Vec::new(),
            waiters: 0,
        });
        if row.holding {
            // A holder says how the key is held; a waiter may have asked otherwise.
            if info.holders.is_empty() {
                info.mode = row.mode;
            }
            info.holders.push(row);
        } else {
            info.waiters = info.waiters.saturating_add(1);
        }
    }
    let mut held: Vec<KeyInfo> = keys
        .into_values()
        .filter(|k| include_waiting || !k.holders.is_empty())
        .collect();
    for info in &mut held {
        info.holders.sort_by_key(|h| h.token);
    }
    let more = held.len() > limit;
    held.truncate(limit);
    (held, more)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn a_stream_is_listed_from_its_acquire_until_it_ends_and_shows_its_grant() {
        let inventory = Inventory::new("r1".into());
        let key = LockKey::parse("key", "jobs/a".into()).unwrap();
        let owner = Owner::parse("owner", "worker 1".into()).unwrap();
        let listing = inventory.enter(&key, &owner, Mode::Exclusive);
        let rows = inventory.local("jobs/", &Namespace::All, None, false);
        assert_eq!(rows.len(), 1);
        assert!(!rows[0].holding);
        let at = Utc::now();
        listing.granted(42, at, at + chrono::Duration::seconds(30));
        let rows = inventory.local("jobs/", &Namespace::All, None, false);
        assert!(rows[0].holding);
        assert_eq!(rows[0].token, 42);
        assert_eq!(rows[0].replica, "r1");
        assert!(inventory.local("other/", &Namespace::All, None, false).is_empty());
        drop(listing);
        assert!(inventory.local("", &Namespace::All, None, false).is_empty());
    }

    fn ids(changes: &Changes) -> Vec<u64> {
        let mut ids: Vec<u64> = changes.upserts.iter().map(|(e, _)| e.id).collect();
        ids.sort_unstable();
        ids
    }

    #[test]
    fn a_round_publishes_what_changed_since_the_last_and_what_left_once_published() {
        let inventory = Inventory::new("r1".into());
        let owner = Owner::parse("owner", "w".into()).unwrap();
        let listing = |k: &str| inventory.enter(&LockKey::parse("key", k.into()).unwrap(), &owner, Mode::Exclusive);
        let a = listing("a");
        let changes = inventory.changes(false);
        assert!(changes.upserts.is_empty(), "listed less than a whole round");
        assert!(!changes.any_published);
        let b = listing("b");
        let changes = inventory.changes(false);
        assert_eq!(ids(&changes), [a.0.id], "a whole round listed: published, waiting");
        assert_eq!(changes.upserts[0].1, 0);
        let at = Utc::now();
        a.granted(7, at, at + chrono::Duration::seconds(30));
        let changes = inventory.changes(false);
        assert_eq!(ids(&changes), [a.0.id, b.0.id], "a's grant and b's first round");
        assert_eq!(
            changes.upserts.iter().find(|(e, _)| e.id == a.0.id).unwrap().1,
            micros(at + chrono::Duration::seconds(30))
        );
        let changes = inventory.changes(false);
        assert!(changes.upserts.is_empty(), "nothing changed");
        assert!(changes.any_published, "published rows keep the replica alive");
        a.kept_alive(at + chrono::Duration::seconds(40));
        assert_eq!(ids(&inventory.changes(false)), [a.0.id]);
        assert_eq!(
            ids(&inventory.changes(true)),
            [a.0.id, b.0.id],
            "after a failed round: everything again"
        );
        let (a_id, b_id) = (a.0.id, b.0.id);
        drop(a);
        let short = listing("c");
        drop(short);
        let changes = inventory.changes(false);
        assert_eq!(
            changes.gone,
            [i64::try_from(a_id).unwrap()],
            "a left; c was never published"
        );
        drop(b);
        let changes = inventory.changes(false);
        assert_eq!(changes.gone, [i64::try_from(b_id).unwrap()]);
        assert!(!changes.any_published);
        assert!(inventory.changes(false).gone.is_empty());
    }

    #[test]
    fn an_entry_keeps_its_key_and_owner_apart_in_one_allocation() {
        let inventory = Inventory::new("r1".into());
        let key = LockKey::parse("key", "jobs/é".into()).unwrap();
        let owner = Owner::parse("owner", "".into()).unwrap();
        let listing = inventory.enter(&key, &owner, Mode::Semaphore(3));
        assert_eq!(listing.0.key(), "jobs/é");
        assert_eq!(listing.0.owner(), "");
        let rows = inventory.local("jobs/", &Namespace::All, None, false);
        assert_eq!(
            (rows[0].key.as_str(), rows[0].owner.as_str(), rows[0].mode),
            ("jobs/é", "", Mode::Semaphore(3))
        );
    }

    fn row(key: &str, holding: bool, token: u64, replica: &str) -> Row {
        Row {
            key: key.into(),
            mode: Mode::Shared,
            owner: "o".into(),
            holding,
            token,
            acquired_at: None,
            lease_expires_at: None,
            replica: replica.into(),
        }
    }

    #[test]
    fn rows_of_every_replica_group_by_key_in_key_order_with_waiters_counted() {
        let rows = vec![
            row("b", true, 9, "r2"),
            row("a", true, 7, "r1"),
            row("b", true, 3, "r1"),
            row("b", false, 0, "r1"),
            row("b", false, 0, "r2"),
            row("c", false, 0, "r1"),
            row("d", true, 1, "r2"),
        ];
        let (keys, more) = group(rows.clone(), 2, false);
        assert!(more);
        assert_eq!(keys.iter().map(|k| k.key.as_str()).collect::<Vec<_>>(), ["a", "b"]);
        assert_eq!(keys[1].holders.iter().map(|h| h.token).collect::<Vec<_>>(), [3, 9]);
        assert_eq!(keys[1].waiters, 2);
        let (keys, more) = group(rows.clone(), 10, false);
        assert!(!more);
        assert_eq!(keys.len(), 3, "a key only waited for is not held");
        let (keys, _) = group(rows, 10, true);
        assert_eq!(keys.len(), 4);
    }

    #[test]
    fn replicas_publish_four_times_a_second_and_are_forgotten_after_seconds() {
        assert_eq!(PUBLISH_EVERY, Duration::from_millis(250));
        assert!(REPLICA_TIMEOUT >= PUBLISH_EVERY * 10);
    }

    #[test]
    fn every_mode_reads_back_as_it_was_stored() {
        for mode in [Mode::Exclusive, Mode::Shared, Mode::Semaphore(2), Mode::Semaphore(256)] {
            assert_eq!(mode_of(&mode_text(mode)), Some(mode));
        }
    }
}
