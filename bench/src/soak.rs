//! `vitals-bench soak`: mixed load at the concurrency limit while PostgreSQL
//! is restarted twice; reports requests per status code and latency, and
//! fails if an acknowledged run was lost or a call ended other than OK,
//! UNAVAILABLE or ABORTED (never INTERNAL, never a torn-down connection).
//! vitals' log is kept in a file (`--log`; `VITALS_SOAK_RUST_LOG` sets its
//! filter).
//!
//! With `--lock-cycles N` it runs N WithLock acquire/release cycles instead
//! (nothing may grow per acquisition) and compares vitals' memory and its
//! lock sessions after the first 1,000 cycles with those after all N.
//!
//! It starts what the benchmark starts ([`crate::services`]): always its own
//! throw-away PostgreSQL cluster (so that it can restart it; `DATABASE_URL`
//! is not used) and its own vitals on loopback, and stops both at the end.
//! Bounded in time; loopback only.

use std::{
    collections::{BTreeMap, HashSet},
    path::PathBuf,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use sqlx::Connection;
use tonic::transport::Channel;
use vitals::proto::{
    self, health_check_service_client::HealthCheckServiceClient, lock_service_client::LockServiceClient,
};

use crate::{
    run::{WorkDir, vitals_bin},
    services::{Postgres, Vitals, rss_kb},
    workloads::{self, with_lock_once},
};

/// How long PostgreSQL stays down at each restart.
const DOWN: Duration = Duration::from_secs(3);

/// The soak test.
#[derive(Debug, clap::Args)]
pub(crate) struct SoakArgs {
    /// Minutes of mixed load.
    #[arg(long, default_value_t = 10.0)]
    minutes: f64,
    /// Clients, and vitals' VITALS_MAX_CONCURRENT_REQUESTS.
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u64).range(1..=10_000))]
    concurrency: u64,
    /// Instead of the mixed load: this many WithLock acquire/release cycles,
    /// vitals' memory and lock sessions after all of them compared with
    /// those after the first 1,000.
    #[arg(long)]
    lock_cycles: Option<u64>,
    /// The vitals binary (default: target/release/vitals of this workspace).
    #[arg(long, env = "VITALS_BIN")]
    vitals_bin: Option<PathBuf>,
    /// Scratch directory (the cluster); default: a temporary one, removed at exit.
    #[arg(long)]
    work_dir: Option<PathBuf>,
    /// Where vitals' log is kept (default: vitals-soak-PID.log in the
    /// system's temporary directory).
    #[arg(long)]
    log: Option<PathBuf>,
    /// Threads of the load generator's runtime.
    #[arg(long, default_value_t = 2)]
    pub(crate) client_threads: usize,
}

/// Runs the soak; an error when it failed.
pub(crate) async fn run(args: SoakArgs) -> Result<()> {
    let work = WorkDir::new(args.work_dir.as_deref())?;
    let bin = vitals_bin(args.vitals_bin.as_deref());
    let log = args
        .log
        .clone()
        .unwrap_or_else(|| std::env::temp_dir().join(format!("vitals-soak-{}.log", std::process::id())));
    let concurrency = usize::try_from(args.concurrency).context("--concurrency")?;
    let pg = Postgres::start(None, work.path(), "soak")?;
    let env = [
        ("VITALS_MAX_CONCURRENT_REQUESTS", concurrency.to_string()),
        ("DATABASE_POOL_CONNECTION_TIMEOUT_MS", "2000".to_owned()),
        ("VITALS_REQUEST_TIMEOUT_MS", "5000".to_owned()),
        (
            "RUST_LOG",
            std::env::var("VITALS_SOAK_RUST_LOG").unwrap_or_else(|_| "warn".to_owned()),
        ),
    ];
    // Returns once vitals is SERVING, or fails after 60 s.
    let vitals = Vitals::start_logged(&bin, &pg.url, work.path(), log.clone(), &env).await?;
    let channel = workloads::channel(vitals.addr).await?;
    match args.lock_cycles {
        Some(cycles) => lock_cycles(&channel, &vitals, &pg.url, concurrency, cycles).await,
        None => mixed(&args, concurrency, channel, vitals, &pg, &log).await,
    }
}

#[derive(Default)]
struct Stats {
    /// (operation, code) -> count
    codes: BTreeMap<(&'static str, String), u64>,
    /// The first few messages of each code other than OK and UNAVAILABLE.
    samples: BTreeMap<String, Vec<String>>,
    latencies: BTreeMap<&'static str, Vec<u32>>,
}

impl Stats {
    fn record(&mut self, op: &'static str, code: &str, took: Duration) {
        *self.codes.entry((op, code.to_owned())).or_default() += 1;
        self.latencies
            .entry(op)
            .or_default()
            .push(u32::try_from(took.as_micros()).unwrap_or(u32::MAX));
    }

    /// Keeps the message of an unexpected outcome, to say what it was.
    fn sample(&mut self, op: &'static str, result: &Result<(), tonic::Status>) {
        if let Err(status) = result
            && !matches!(status.code(), tonic::Code::Unavailable | tonic::Code::NotFound)
        {
            let kept = self.samples.entry(format!("{op} {:?}", status.code())).or_default();
            if kept.len() < 3 {
                kept.push(status.message().to_owned());
            }
        }
    }
}

fn code_name(result: &Result<(), tonic::Status>) -> String {
    match result {
        Ok(()) => "OK".into(),
        Err(s) => format!("{:?}", s.code()),
    }
}

/// A WithLock cycle on `key`, waiting at most a second for it.
async fn lock_once(client: &mut LockServiceClient<Channel>, key: String) -> Result<(), tonic::Status> {
    with_lock_once(client, key, Duration::from_secs(1)).await
}

/// The mixed load with two restarts of PostgreSQL, then the checks.
async fn mixed(
    args: &SoakArgs,
    concurrency: usize,
    channel: Channel,
    vitals: Vitals,
    pg: &Postgres,
    log: &std::path::Path,
) -> Result<()> {
    let total = Duration::from_secs_f64(args.minutes.max(0.0) * 60.0);
    let started = Instant::now();
    let stats = Arc::new(Mutex::new(Stats::default()));
    let acked = Arc::new(Mutex::new(Vec::<String>::new()));
    let mut workers = Vec::new();
    for worker in 0..concurrency {
        let channel = channel.clone();
        let stats = stats.clone();
        let acked = acked.clone();
        workers.push(tokio::spawn(async move {
            let mut health = HealthCheckServiceClient::new(channel.clone());
            let mut locks = LockServiceClient::new(channel);
            let mut i: u64 = 0;
            while started.elapsed() < total {
                i += 1;
                let pick = (i * 7 + worker as u64) % 10;
                let t = Instant::now();
                if pick < 7 {
                    let run_id = format!("w{worker}-{i}");
                    let result = health
                        .submit_run(proto::SubmitRunRequest {
                            run_id: run_id.clone(),
                            system_id: format!("sys-{}", (i + worker as u64) % 500),
                            check_id: format!("c{}", i % 3),
                            status: [1, 1, 1, 2, 3][(i % 5) as usize],
                            ..Default::default()
                        })
                        .await
                        .map(|_| ());
                    if result.is_ok() {
                        acked.lock().unwrap_or_else(|e| e.into_inner()).push(run_id);
                    }
                    let mut stats = stats.lock().unwrap_or_else(|e| e.into_inner());
                    stats.sample("submit", &result);
                    stats.record("submit", &code_name(&result), t.elapsed());
                } else if pick < 8 {
                    let result = health
                        .get_system_health(proto::GetSystemHealthRequest {
                            system_id: format!("sys-{}", i % 500),
                        })
                        .await
                        .map(|_| ());
                    let code = match &result {
                        Err(s) if s.code() == tonic::Code::NotFound => "OK".to_owned(),
                        other => code_name(other),
                    };
                    let mut stats = stats.lock().unwrap_or_else(|e| e.into_inner());
                    stats.sample("get", &result);
                    stats.record("get", &code, t.elapsed());
                } else {
                    let result = lock_once(&mut locks, format!("key-{}", i % 50)).await;
                    let mut stats = stats.lock().unwrap_or_else(|e| e.into_inner());
                    stats.sample("lock", &result);
                    stats.record("lock", &code_name(&result), t.elapsed());
                }
            }
        }));
    }

    // Restart the database twice, at a third and two thirds of the run.
    let mut restarts = Vec::new();
    for n in 1..=2u32 {
        let at = total.mul_f64(f64::from(n) / 3.0);
        tokio::time::sleep(at.saturating_sub(started.elapsed())).await;
        let at = started.elapsed();
        let down = pg.restart(DOWN).await?;
        restarts.push(format!("restart {n} at {at:.0?}: down for {down:.1?}"));
    }
    for w in workers {
        w.await.context("a soak worker panicked")?;
    }
    let elapsed = started.elapsed();
    drop(channel);
    drop(vitals);

    // Every acknowledged run is stored.
    let acked = acked.lock().unwrap_or_else(|e| e.into_inner()).clone();
    let pool = sqlx::PgPool::connect(&pg.url)
        .await
        .context("connecting to check the runs")?;
    let stored: HashSet<String> = sqlx::query_scalar("SELECT run_id FROM runs")
        .fetch_all(&pool)
        .await?
        .into_iter()
        .collect();
    let lost = acked.iter().filter(|r| !stored.contains(*r)).count();
    pool.close().await;

    let stats = stats.lock().unwrap_or_else(|e| e.into_inner());
    println!(
        "# vitals soak: {:.1} min, concurrency {concurrency}",
        elapsed.as_secs_f64() / 60.0
    );
    for r in &restarts {
        println!("- {r}");
    }
    println!("\n| operation | code | count |\n|---|---|---|");
    for ((op, code), n) in &stats.codes {
        println!("| {op} | {code} | {n} |");
    }
    println!("\n| operation | requests | p50 ms | p99 ms | max ms |\n|---|---|---|---|---|");
    for (op, lat) in &stats.latencies {
        let mut lat = lat.clone();
        lat.sort_unstable();
        let pct = |p: f64| f64::from(lat[((lat.len() as f64 - 1.0) * p) as usize]) / 1000.0;
        println!(
            "| {op} | {} | {:.2} | {:.2} | {:.1} |",
            lat.len(),
            pct(0.5),
            pct(0.99),
            pct(1.0)
        );
    }
    if !stats.samples.is_empty() {
        println!("\nmessages of other failures (first 3 of each):");
        for (what, messages) in &stats.samples {
            for m in messages {
                println!("- {what}: {m}");
            }
        }
    }
    println!("\nvitals' log: {}", log.display());
    println!(
        "\nacknowledged runs: {}, stored: {}, lost: {lost}",
        acked.len(),
        stored.len()
    );
    // During a restart a call may be refused (UNAVAILABLE) or lose its lock
    // (ABORTED); anything else (INTERNAL, or a transport error because a
    // connection was torn down) is a failure of the soak.
    let unexpected: Vec<String> = stats
        .codes
        .iter()
        .filter(|((_, code), _)| !matches!(code.as_str(), "OK" | "Unavailable" | "Aborted"))
        .map(|((op, code), n)| format!("{op} {code} x{n}"))
        .collect();
    if !unexpected.is_empty() {
        println!("unexpected outcomes: {}", unexpected.join(", "));
    }
    if lost > 0 || !unexpected.is_empty() {
        bail!("soak failed: {lost} acknowledged runs lost, unexpected outcomes: {unexpected:?}");
    }
    Ok(())
}

/// What lock traffic has left behind: vitals' resident memory and the
/// database's view of the lock sessions.
#[derive(Debug, PartialEq)]
struct Footprint {
    rss_kb: u64,
    lock_sessions: i64,
    idle_in_transaction: i64,
    advisory_locks: i64,
    sessions_opened: i64,
}

async fn footprint(pid: u32, conn: &mut sqlx::PgConnection) -> Result<Footprint> {
    let rss_kb = rss_kb(pid).context("vitals' RSS")?;
    let (lock_sessions, idle_in_transaction): (i64, i64) = sqlx::query_as(
        "SELECT count(*), count(*) FILTER (WHERE state = 'idle in transaction') \
         FROM pg_stat_activity WHERE application_name = 'vitals-lock'",
    )
    .fetch_one(&mut *conn)
    .await?;
    let advisory_locks: i64 = sqlx::query_scalar("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory'")
        .fetch_one(&mut *conn)
        .await?;
    let sessions_opened: i64 =
        sqlx::query_scalar("SELECT sessions FROM pg_stat_database WHERE datname = current_database()")
            .fetch_one(&mut *conn)
            .await?;
    Ok(Footprint {
        rss_kb,
        lock_sessions,
        idle_in_transaction,
        advisory_locks,
        sessions_opened,
    })
}

/// Runs `count` WithLock cycles from `clients` clients, each on its own
/// rotating keys; returns how long it took and the non-OK outcomes.
async fn cycles(channel: &Channel, clients: usize, count: u64) -> Result<(Duration, BTreeMap<String, u64>)> {
    let started = Instant::now();
    let per_client = count / clients as u64;
    let mut tasks = Vec::new();
    for c in 0..clients {
        let mut locks = LockServiceClient::new(channel.clone());
        tasks.push(tokio::spawn(async move {
            let mut failed = BTreeMap::new();
            for i in 0..per_client {
                let result = lock_once(&mut locks, format!("cycle-{c}-{}", i % 100)).await;
                if result.is_err() {
                    *failed.entry(code_name(&result)).or_insert(0) += 1;
                }
            }
            failed
        }));
    }
    let mut failed = BTreeMap::new();
    for t in tasks {
        for (code, n) in t.await.context("a lock-cycle client panicked")? {
            *failed.entry(code).or_insert(0) += n;
        }
    }
    Ok((started.elapsed(), failed))
}

/// Memory and lock sessions after `total` acquire/release cycles equal
/// those after 1,000. RSS may move by allocator noise; 10 % is the bound.
async fn lock_cycles(channel: &Channel, vitals: &Vitals, url: &str, clients: usize, total: u64) -> Result<()> {
    const FIRST: u64 = 1_000;
    let pid = vitals.proc.pid();
    // One connection, opened before the first footprint: a pool would open
    // more while sqlx pings the one it was given back, and they would count
    // as sessions opened.
    let mut conn = sqlx::PgConnection::connect(url)
        .await
        .context("connecting to watch the lock sessions")?;
    let (took_first, failed_first) = cycles(channel, clients, FIRST).await?;
    let after_first = footprint(pid, &mut conn).await?;
    let (took_rest, failed_rest) = cycles(channel, clients, total.saturating_sub(FIRST)).await?;
    let after_all = footprint(pid, &mut conn).await?;
    let _ = conn.close().await;

    println!("# vitals lock cycles: {total} WithLock acquire/release cycles, {clients} clients");
    println!(
        "\n| after | cycles/s | failed | RSS kB | lock sessions | idle in transaction | advisory locks | sessions opened (database total) |"
    );
    println!("|---|---|---|---|---|---|---|---|");
    for (label, n, took, failed, f) in [
        ("1,000", FIRST, took_first, &failed_first, &after_first),
        ("all", total, took_rest, &failed_rest, &after_all),
    ] {
        let rate = n.saturating_sub(if label == "all" { FIRST } else { 0 }) as f64 / took.as_secs_f64();
        println!(
            "| {label} | {rate:.0} | {failed:?} | {} | {} | {} | {} | {} |",
            f.rss_kb, f.lock_sessions, f.idle_in_transaction, f.advisory_locks, f.sessions_opened
        );
    }
    let growth = (after_all.rss_kb as f64 / after_first.rss_kb as f64 - 1.0) * 100.0;
    let same_pool = after_all.lock_sessions <= after_first.lock_sessions
        && after_all.idle_in_transaction == 0
        && after_all.advisory_locks == 0
        && after_all.sessions_opened == after_first.sessions_opened;
    let ok = failed_first.is_empty() && failed_rest.is_empty() && same_pool && growth.abs() <= 10.0;
    println!(
        "\nRSS change {growth:+.1} %; no session opened, no lock left: {same_pool}; {}",
        if ok { "PASS" } else { "FAIL" }
    );
    if !ok {
        bail!("lock cycles failed");
    }
    Ok(())
}
