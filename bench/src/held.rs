//! Held locks: what one WithLock lock held costs vitals in memory.
//!
//! Opens `locks` WithLock streams on distinct keys, spread over
//! `locks / per_connection` HTTP/2 connections (the server's limit of
//! concurrent streams per connection is about 200), at most `concurrency`
//! acquiring at once. Every stream keeps its lock alive on its own, sending
//! `keep_alive` at a third of the lease the server announced in `acquired`,
//! so no lock lapses however long acquiring all of them takes, and the server
//! runs with its default lease. Once all are held, vitals' RSS (VmRSS of the
//! vitals process, not of this one) is sampled, then every stream sends
//! `release` and reads `released` (again at most `concurrency` at once).
//!
//! RSS is sampled before connecting, with the connections open but no lock,
//! while every lock is held, after every lock is released and after the
//! connections are closed; each figure is the largest of a few samples a few
//! hundred milliseconds apart.
//!
//! [`measure_rounds`] repeats this on the same process: memory freed at a
//! release stays with the allocator, and a later round shows whether it is
//! reused (growth shrinking round by round) or leaked (constant growth).

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::Result;
use tokio::sync::{Semaphore, mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Status, Streaming, transport::Channel};
use vitals::proto::{
    self, WithLockRequest, WithLockResponse, lock_service_client::LockServiceClient, with_lock_request::Action,
    with_lock_response::Event,
};

use crate::{
    report::{HeldLocks, num},
    services::{Postgres, rss_kb},
    workloads::{self, code_name},
};

/// Longest wait for one `acquired` (keys are distinct: nobody waits for a
/// holder, only for the server).
const ACQUIRE_TIMEOUT: Duration = Duration::from_secs(30);
/// Longest the whole acquiring phase may take before the measurement gives
/// up on the streams not acquired yet.
const ACQUIRE_PHASE_LIMIT: Duration = Duration::from_secs(90);
/// Longest the whole releasing phase may take.
const RELEASE_PHASE_LIMIT: Duration = Duration::from_secs(60);
/// Longest wait for one `released` or `kept_alive`.
const REPLY_TIMEOUT: Duration = Duration::from_secs(30);
/// Pause before the RSS samples of a phase.
const SETTLE: Duration = Duration::from_millis(500);
/// RSS samples per phase and the pause between them.
const SAMPLES: usize = 5;
const SAMPLE_EVERY: Duration = Duration::from_millis(300);

/// How many locks, over how many connections, how fast.
#[derive(Debug, Clone, Copy)]
pub(crate) struct HoldPlan {
    pub(crate) locks: usize,
    pub(crate) per_connection: usize,
    pub(crate) concurrency: usize,
}

impl HoldPlan {
    /// HTTP/2 connections the streams are spread over.
    pub(crate) fn connections(&self) -> usize {
        self.locks.div_ceil(self.per_connection.max(1)).max(1)
    }
}

/// Keep-alives sent and acknowledged by every stream together.
#[derive(Debug, Default)]
struct KeepAlives {
    sent: AtomicU64,
    acked: AtomicU64,
}

/// What one stream's task ends with.
enum StreamEnd {
    /// Never held the lock (the acquire result was already reported).
    NotAcquired,
    /// Held it, then `released` arrived.
    Released,
    /// Held it, then lost it or failed to release it: why.
    Failed(&'static str),
}

/// Largest VmRSS of `pid` over a few samples, kB, and the samples.
async fn sample_rss(pid: u32) -> (u64, Vec<u64>) {
    tokio::time::sleep(SETTLE).await;
    let mut samples = Vec::with_capacity(SAMPLES);
    for i in 0..SAMPLES {
        if i > 0 {
            tokio::time::sleep(SAMPLE_EVERY).await;
        }
        if let Some(kb) = rss_kb(pid) {
            samples.push(kb);
        }
    }
    (samples.iter().copied().max().unwrap_or(0), samples)
}

/// Counts the lock sessions of vitals and the client-key advisory locks they
/// hold, in the benchmark's database.
fn postgres_counts(pg: &Postgres) -> (Option<i64>, Option<i64>) {
    let count = |sql: &str| pg.query(sql).ok().and_then(|s| s.trim().parse::<i64>().ok());
    let sessions = count(
        "select count(*) from pg_stat_activity where application_name = 'vitals-lock' \
         and datname = current_database()",
    );
    // Client keys are one int8 advisory lock (objsubid 1); vitals' own locks
    // use the two-int4 space (objsubid 2).
    let locks = count(
        "select count(*) from pg_locks where locktype = 'advisory' and granted and objsubid = 1 \
         and database = (select oid from pg_database where datname = current_database())",
    );
    (sessions, locks)
}

/// [`measure`] `rounds` times on the same vitals process, one after the
/// other; fills each round's growth since the first round's `before`.
pub(crate) async fn measure_rounds(
    backend: &str,
    rounds: usize,
    addr: SocketAddr,
    pid: u32,
    plan: HoldPlan,
    key_prefix: &str,
    pg: Option<&Postgres>,
) -> Result<Vec<HeldLocks>> {
    let mut results: Vec<HeldLocks> = Vec::with_capacity(rounds);
    for round in 1..=rounds.max(1) {
        let mut result = measure(backend, round, addr, pid, plan, &format!("{key_prefix}-{round}"), pg).await?;
        let first_before = results.first().map_or(result.rss_before_kb, |r| r.rss_before_kb);
        result.per_lock_since_first_bytes = if result.acquired == 0 {
            0.0
        } else {
            (result.rss_held_kb as f64 - first_before as f64) * 1024.0 / result.acquired as f64
        };
        if round > 1 {
            eprintln!(
                "vitals-bench: held locks ({backend}, round {round}): {:.2} KiB per lock counted from round 1's RSS \
                 before",
                result.per_lock_since_first_bytes / 1024.0
            );
        }
        results.push(result);
    }
    Ok(results)
}

/// Holds `plan.locks` locks on the vitals at `addr` (process `pid`) and
/// measures its RSS; `pg` is the database when the backend is PostgreSQL.
pub(crate) async fn measure(
    backend: &str,
    round: usize,
    addr: SocketAddr,
    pid: u32,
    plan: HoldPlan,
    key_prefix: &str,
    pg: Option<&Postgres>,
) -> Result<HeldLocks> {
    let n = plan.locks;
    let connections = plan.connections();
    eprintln!(
        "vitals-bench: held locks ({backend}, round {round}): {n} WithLock streams over {connections} connections, \
         at most {} acquiring at once",
        plan.concurrency
    );
    let (rss_before_kb, _) = sample_rss(pid).await;
    let channels = workloads::channels(addr, connections).await?;
    let (rss_connected_kb, _) = sample_rss(pid).await;

    let acquiring = Arc::new(Semaphore::new(plan.concurrency.max(1)));
    let releasing = Arc::new(Semaphore::new(plan.concurrency.max(1)));
    let keep_alives = Arc::new(KeepAlives::default());
    let (release_tx, release_rx) = watch::channel(false);
    let (acquired_tx, mut acquired_rx) = mpsc::channel::<Result<(), &'static str>>(n.max(1));
    let started = Instant::now();
    let mut tasks = Vec::with_capacity(n);
    for i in 0..n {
        tasks.push(tokio::spawn(hold_one(
            channels[i % channels.len()].clone(),
            format!("{key_prefix}-{i}"),
            Arc::clone(&acquiring),
            Arc::clone(&releasing),
            acquired_tx.clone(),
            release_rx.clone(),
            Arc::clone(&keep_alives),
        )));
    }
    drop(acquired_tx);
    let aborts: Vec<_> = tasks.iter().map(tokio::task::JoinHandle::abort_handle).collect();

    // Every stream reports once whether it got its lock.
    let deadline = tokio::time::Instant::now() + ACQUIRE_PHASE_LIMIT;
    let mut acquired = 0usize;
    let mut acquire_failures: BTreeMap<String, u64> = BTreeMap::new();
    let mut reported = 0usize;
    let mut last_report = Instant::now();
    while reported < n {
        match tokio::time::timeout_at(deadline, acquired_rx.recv()).await {
            Ok(Some(Ok(()))) => acquired += 1,
            Ok(Some(Err(code))) => *acquire_failures.entry(code.to_owned()).or_default() += 1,
            Ok(None) => break,
            Err(_) => {
                *acquire_failures.entry("NOT_ACQUIRED_IN_TIME".into()).or_default() += (n - reported) as u64;
                break;
            }
        }
        reported += 1;
        if last_report.elapsed() >= Duration::from_secs(5) {
            eprintln!(
                "vitals-bench: held locks ({backend}, round {round}): {acquired} of {n} acquired after {:.1} s",
                started.elapsed().as_secs_f64()
            );
            last_report = Instant::now();
        }
    }
    let acquire_s = started.elapsed().as_secs_f64();

    let (rss_held_kb, rss_held_samples_kb) = sample_rss(pid).await;
    let (lock_backends, advisory_locks) = match pg {
        Some(pg) => postgres_counts(pg),
        None => (None, None),
    };
    let held_for_s = started.elapsed().as_secs_f64();

    // Release: every stream sends release and reads released.
    let release_started = Instant::now();
    let _ = release_tx.send(true);
    let mut released = 0usize;
    let mut release_failures: BTreeMap<String, u64> = BTreeMap::new();
    match tokio::time::timeout(RELEASE_PHASE_LIMIT, futures::future::join_all(tasks)).await {
        Ok(ends) => {
            for end in ends {
                match end {
                    Ok(StreamEnd::Released) => released += 1,
                    Ok(StreamEnd::NotAcquired) => {}
                    Ok(StreamEnd::Failed(code)) => *release_failures.entry(code.to_owned()).or_default() += 1,
                    Err(_) => *release_failures.entry("CLIENT_TASK_FAILED".into()).or_default() += 1,
                }
            }
        }
        Err(_) => {
            for abort in &aborts {
                abort.abort();
            }
            *release_failures.entry("NOT_RELEASED_IN_TIME".into()).or_default() +=
                acquired.saturating_sub(released) as u64;
        }
    }
    let release_s = release_started.elapsed().as_secs_f64();
    let (rss_released_kb, _) = sample_rss(pid).await;
    drop(channels);
    let (rss_closed_kb, _) = sample_rss(pid).await;
    let lease_kept = (
        keep_alives.sent.load(Ordering::Relaxed),
        keep_alives.acked.load(Ordering::Relaxed),
    );

    let per_lock = |from_kb: u64| {
        if acquired == 0 {
            0.0
        } else {
            (rss_held_kb as f64 - from_kb as f64) * 1024.0 / acquired as f64
        }
    };
    let result = HeldLocks {
        backend: backend.to_owned(),
        round,
        requested: n,
        acquired,
        acquire_failures,
        connections,
        acquire_concurrency: plan.concurrency,
        keep_alives_sent: lease_kept.0,
        keep_alives_acked: lease_kept.1,
        held_for_s,
        rss_before_kb,
        rss_connected_kb,
        rss_held_kb,
        rss_held_samples_kb,
        rss_released_kb,
        rss_closed_kb,
        per_lock_bytes: per_lock(rss_before_kb),
        per_lock_stream_bytes: per_lock(rss_connected_kb),
        per_lock_since_first_bytes: 0.0,
        acquire_s,
        acquire_per_s: if acquire_s > 0.0 {
            acquired as f64 / acquire_s
        } else {
            0.0
        },
        release_s,
        released,
        release_per_s: if release_s > 0.0 {
            released as f64 / release_s
        } else {
            0.0
        },
        release_failures,
        lock_backends,
        advisory_locks,
    };
    eprintln!(
        "vitals-bench: held locks ({backend}, round {round}): {acquired}/{n} held in {acquire_s:.2} s ({} /s); vitals RSS \
         {} kB before, {} kB connected, {} kB held, {} kB released, {} kB closed: {:.0} B = {:.2} KiB per lock \
         ({:.2} KiB without the connections); released {released} in {release_s:.2} s; keep-alives {}/{}{}",
        num(result.acquire_per_s),
        num(rss_before_kb as f64),
        num(rss_connected_kb as f64),
        num(rss_held_kb as f64),
        num(rss_released_kb as f64),
        num(rss_closed_kb as f64),
        result.per_lock_bytes,
        result.per_lock_bytes / 1024.0,
        result.per_lock_stream_bytes / 1024.0,
        lease_kept.1,
        lease_kept.0,
        match (lock_backends, advisory_locks) {
            (Some(s), Some(l)) => format!("; PostgreSQL: {s} vitals-lock sessions holding {l} client advisory locks"),
            _ => String::new(),
        }
    );
    if !result.acquire_failures.is_empty() || !result.release_failures.is_empty() {
        eprintln!(
            "vitals-bench: held locks ({backend}, round {round}): acquire failures {:?}, release failures {:?}",
            result.acquire_failures, result.release_failures
        );
    }
    Ok(result)
}

fn acquire_request(key: String) -> WithLockRequest {
    WithLockRequest {
        action: Some(Action::Acquire(proto::Acquire {
            key,
            // Distinct keys: a grant never waits for a holder.
            wait_timeout: Some(prost_types::Duration { seconds: 10, nanos: 0 }),
            owner: "vitals-bench held locks".to_owned(),
            ..Default::default()
        })),
    }
}

/// Opens the stream and waits for `acquired`: the stream and the lease.
async fn open(
    channel: Channel,
    key: String,
) -> Result<(mpsc::Sender<WithLockRequest>, Streaming<WithLockResponse>, Duration), Status> {
    let (tx, rx) = mpsc::channel(4);
    tx.try_send(acquire_request(key))
        .map_err(|_| Status::internal("client: acquire not queued"))?;
    let mut client = LockServiceClient::new(channel);
    let mut inbound = client.with_lock(ReceiverStream::new(rx)).await?.into_inner();
    match inbound.message().await? {
        Some(WithLockResponse {
            event: Some(Event::Acquired(acquired)),
        }) => {
            let lease = acquired
                .lease
                .and_then(|d| Duration::try_from(d).ok())
                .unwrap_or(Duration::from_secs(30));
            Ok((tx, inbound, lease))
        }
        _ => Err(Status::internal("client: expected acquired")),
    }
}

/// One stream: acquire, keep alive until told to release, release.
async fn hold_one(
    channel: Channel,
    key: String,
    acquiring: Arc<Semaphore>,
    releasing: Arc<Semaphore>,
    acquired_tx: mpsc::Sender<Result<(), &'static str>>,
    mut release: watch::Receiver<bool>,
    keep_alives: Arc<KeepAlives>,
) -> StreamEnd {
    let Ok(permit) = acquiring.acquire_owned().await else {
        let _ = acquired_tx.send(Err("CLIENT_ERROR")).await;
        return StreamEnd::NotAcquired;
    };
    let opened = tokio::time::timeout(ACQUIRE_TIMEOUT, open(channel, key)).await;
    drop(permit);
    let (tx, mut inbound, lease) = match opened {
        Ok(Ok(held)) => held,
        Ok(Err(status)) => {
            let _ = acquired_tx.send(Err(code_name(status.code()))).await;
            return StreamEnd::NotAcquired;
        }
        Err(_) => {
            let _ = acquired_tx.send(Err("CLIENT_TIMEOUT")).await;
            return StreamEnd::NotAcquired;
        }
    };
    let _ = acquired_tx.send(Ok(())).await;
    drop(acquired_tx);

    // Renew at a third of the lease, like a careful client.
    let every = (lease / 3).max(Duration::from_millis(100));
    loop {
        tokio::select! {
            // The guard wait_for returns is not Send: drop it at once.
            () = async { drop(release.wait_for(|release| *release).await) } => break,
            () = tokio::time::sleep(every) => {
                let keep_alive = WithLockRequest { action: Some(Action::KeepAlive(proto::KeepAlive {})) };
                if tx.send(keep_alive).await.is_err() {
                    return StreamEnd::Failed("KEEP_ALIVE_NOT_SENT");
                }
                keep_alives.sent.fetch_add(1, Ordering::Relaxed);
                match tokio::time::timeout(REPLY_TIMEOUT, inbound.message()).await {
                    Ok(Ok(Some(WithLockResponse { event: Some(Event::KeptAlive(_)) }))) => {
                        keep_alives.acked.fetch_add(1, Ordering::Relaxed);
                    }
                    Ok(Err(status)) => return StreamEnd::Failed(code_name(status.code())),
                    Ok(Ok(_)) => return StreamEnd::Failed("UNEXPECTED_REPLY_TO_KEEP_ALIVE"),
                    Err(_) => return StreamEnd::Failed("CLIENT_TIMEOUT"),
                }
            }
        }
    }

    let Ok(_permit) = releasing.acquire().await else {
        return StreamEnd::Failed("CLIENT_ERROR");
    };
    let released = async {
        tx.send(WithLockRequest {
            action: Some(Action::Release(proto::Release {})),
        })
        .await
        .map_err(|_| Status::internal("client: release not sent"))?;
        drop(tx);
        match inbound.message().await? {
            Some(WithLockResponse {
                event: Some(Event::Released(_)),
            }) => {}
            _ => return Err(Status::internal("client: expected released")),
        }
        // The trailers carry the stream's final status.
        while inbound.message().await?.is_some() {}
        Ok::<(), Status>(())
    };
    match tokio::time::timeout(REPLY_TIMEOUT, released).await {
        Ok(Ok(())) => StreamEnd::Released,
        Ok(Err(status)) => StreamEnd::Failed(code_name(status.code())),
        Err(_) => StreamEnd::Failed("CLIENT_TIMEOUT"),
    }
}
