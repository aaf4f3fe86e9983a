//! Soak test: mixed load at the concurrency limit while PostgreSQL is
//! restarted twice; reports requests per status code, latency, and verifies
//! that no acknowledged run was lost and that every failed call ended with
//! UNAVAILABLE or ABORTED (never INTERNAL or a torn-down connection). vitals'
//! log is kept in a file (`VITALS_SOAK_RUST_LOG` sets its filter).
//!
//! With `--lock-cycles N` it runs N WithLock acquire/release cycles instead
//! (nothing may grow per acquisition) and compares vitals' memory and
//! its lock sessions after the first 1,000 cycles with those after all N.
//!
//! Run with `scripts/soak.sh` (builds the release binary first). It starts its
//! own throw-away PostgreSQL cluster (so it can restart it) and its own vitals
//! on loopback, and stops both at the end. Bounded in time; loopback only.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::{
    collections::{BTreeMap, HashSet},
    net::TcpListener,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::{Channel, Endpoint};
use vitals::proto::{
    self, health_check_service_client::HealthCheckServiceClient, lock_service_client::LockServiceClient,
    with_lock_request::Action,
};

struct Args {
    minutes: f64,
    concurrency: usize,
    vitals_bin: PathBuf,
    lock_cycles: Option<u64>,
}

fn parse_args() -> Args {
    let mut args = Args {
        minutes: 10.0,
        concurrency: 64,
        vitals_bin: PathBuf::from("target/release/vitals"),
        lock_cycles: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let value = it.next().unwrap_or_else(|| panic!("{flag} needs a value"));
        match flag.as_str() {
            "--minutes" => args.minutes = value.parse().expect("--minutes is a number"),
            "--concurrency" => args.concurrency = value.parse().expect("--concurrency is a count"),
            "--vitals-bin" => args.vitals_bin = PathBuf::from(value),
            "--lock-cycles" => args.lock_cycles = Some(value.parse().expect("--lock-cycles is a count")),
            other => panic!("unknown flag {other} (known: --minutes, --concurrency, --vitals-bin, --lock-cycles)"),
        }
    }
    args
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// A throw-away cluster owned by the `postgres` user (initdb refuses root).
struct Cluster {
    dir: PathBuf,
    port: u16,
    bin: PathBuf,
}

fn pg_bin() -> PathBuf {
    let mut versions: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .expect("PostgreSQL server binaries (apt-get install postgresql)")
        .filter_map(|e| e.ok().map(|e| e.path().join("bin")))
        .filter(|p| p.join("initdb").exists())
        .collect();
    versions.sort();
    versions.pop().expect("an initdb under /usr/lib/postgresql/*/bin")
}

fn as_postgres(cmd: &Path, args: &[&str]) -> Command {
    let mut c = if nix_is_root() {
        let mut c = Command::new("runuser");
        c.args(["-u", "postgres", "--"]).arg(cmd);
        c
    } else {
        Command::new(cmd)
    };
    c.args(args);
    c
}

fn nix_is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| o.stdout.starts_with(b"0"))
        .unwrap_or(false)
}

impl Cluster {
    fn create() -> Cluster {
        let dir = std::env::temp_dir().join(format!("vitals-soak-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let _ = Command::new("chown").args(["postgres", dir.to_str().unwrap()]).status();
        let bin = pg_bin();
        let data = dir.join("data");
        let ok = as_postgres(
            &bin.join("initdb"),
            &["-D", data.to_str().unwrap(), "-U", "postgres", "--auth=trust"],
        )
        .stdout(Stdio::null())
        .status()
        .unwrap()
        .success();
        assert!(ok, "initdb failed");
        let cluster = Cluster {
            dir,
            port: free_port(),
            bin,
        };
        cluster.start();
        cluster
    }

    fn pg_ctl(&self, args: &[&str]) -> bool {
        let data = self.dir.join("data");
        let mut all = vec!["-D", data.to_str().unwrap()];
        all.extend_from_slice(args);
        as_postgres(&self.bin.join("pg_ctl"), &all)
            .stdout(Stdio::null())
            .status()
            .unwrap()
            .success()
    }

    fn start(&self) {
        let opts = format!(
            "-p {} -k {} -c max_connections=200 -c listen_addresses=127.0.0.1",
            self.port,
            self.dir.display()
        );
        let log = self.dir.join("log");
        assert!(
            self.pg_ctl(&["-w", "-l", log.to_str().unwrap(), "-o", &opts, "start"]),
            "pg_ctl start failed"
        );
    }

    fn stop(&self) {
        self.pg_ctl(&["-w", "-m", "fast", "stop"]);
    }

    fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        self.pg_ctl(&["-m", "immediate", "stop"]);
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

struct Vitals(Child);

/// How long vitals may take from its start to SERVING.
const START_LIMIT: Duration = Duration::from_secs(30);

impl Vitals {
    /// Panics, naming its log, when the vitals process has exited.
    fn assert_running(&mut self, log_path: &Path) {
        if let Ok(Some(status)) = self.0.try_wait() {
            panic!(
                "vitals exited ({status}) before serving; its log: {}",
                log_path.display()
            );
        }
    }
}

impl Drop for Vitals {
    fn drop(&mut self) {
        let _ = Command::new("kill").arg(self.0.id().to_string()).status();
        let _ = self.0.wait();
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
}

async fn lock_once(client: &mut LockServiceClient<Channel>, key: String) -> Result<(), tonic::Status> {
    let (tx, rx) = mpsc::channel(2);
    let acquire = proto::WithLockRequest {
        action: Some(Action::Acquire(proto::Acquire {
            key,
            wait_timeout: Some(prost_types::Duration { seconds: 1, nanos: 0 }),
            owner: "soak".into(),
        })),
    };
    tx.send(acquire).await.map_err(|_| tonic::Status::internal("send"))?;
    let mut replies = client.with_lock(ReceiverStream::new(rx)).await?.into_inner();
    replies.message().await?;
    tx.send(proto::WithLockRequest {
        action: Some(Action::Release(proto::Release {})),
    })
    .await
    .map_err(|_| tonic::Status::internal("send"))?;
    while replies.message().await?.is_some() {}
    Ok(())
}

impl Stats {
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

#[tokio::main]
async fn main() {
    let args = parse_args();
    assert!(
        args.vitals_bin.exists(),
        "{} missing: cargo build --release",
        args.vitals_bin.display()
    );
    let cluster = Cluster::create();
    let port = free_port();
    // vitals' own log (warnings and errors), kept after the run.
    let log_path = std::env::temp_dir().join(format!("vitals-soak-{}.log", std::process::id()));
    let mut vitals = Vitals(
        Command::new(&args.vitals_bin)
            .env("DATABASE_URL", cluster.url())
            .env("VITALS_LISTEN_ADDR", format!("127.0.0.1:{port}"))
            .env("VITALS_MAX_CONCURRENT_REQUESTS", args.concurrency.to_string())
            .env("DATABASE_POOL_CONNECTION_TIMEOUT_MS", "2000")
            .env("VITALS_REQUEST_TIMEOUT_MS", "5000")
            .env(
                "RUST_LOG",
                std::env::var("VITALS_SOAK_RUST_LOG").unwrap_or_else(|_| "warn".to_owned()),
            )
            .stderr(Stdio::from(
                std::fs::File::create(&log_path).expect("create the vitals log"),
            ))
            .spawn()
            .expect("start vitals"),
    );
    let endpoint = Endpoint::from_shared(format!("http://127.0.0.1:{port}"))
        .unwrap()
        .tcp_nodelay(true);
    // vitals may fail to start (a port taken meanwhile, a bad binary) or never
    // reach its database: both waits are bounded, and a vitals that exited is
    // reported at once.
    let deadline = Instant::now() + START_LIMIT;
    let channel = loop {
        if let Ok(c) = endpoint.connect().await {
            break c;
        }
        vitals.assert_running(&log_path);
        assert!(
            Instant::now() < deadline,
            "vitals did not accept connections on port {port} within {START_LIMIT:?}; its log: {}",
            log_path.display()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    // Wait for SERVING before the clock starts.
    let mut health = tonic_health::pb::health_client::HealthClient::new(channel.clone());
    loop {
        let serving = health
            .check(tonic_health::pb::HealthCheckRequest { service: String::new() })
            .await
            .map(|r| r.into_inner().status() == tonic_health::pb::health_check_response::ServingStatus::Serving)
            .unwrap_or(false);
        if serving {
            break;
        }
        vitals.assert_running(&log_path);
        assert!(
            Instant::now() < deadline,
            "vitals did not report SERVING within {START_LIMIT:?}; its log: {}",
            log_path.display()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    if let Some(cycles) = args.lock_cycles {
        let ok = lock_cycles(&channel, vitals.0.id(), &cluster.url(), args.concurrency, cycles).await;
        drop(vitals);
        if !ok {
            std::process::exit(1);
        }
        return;
    }

    let total = Duration::from_secs_f64(args.minutes * 60.0);
    let started = Instant::now();
    let stats = Arc::new(Mutex::new(Stats::default()));
    let acked = Arc::new(Mutex::new(Vec::<String>::new()));
    let mut workers = Vec::new();
    for worker in 0..args.concurrency {
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
                        acked.lock().unwrap().push(run_id);
                    }
                    let mut stats = stats.lock().unwrap();
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
                    let mut stats = stats.lock().unwrap();
                    stats.sample("get", &result);
                    stats.record("get", &code, t.elapsed());
                } else {
                    let result = lock_once(&mut locks, format!("key-{}", i % 50)).await;
                    let mut stats = stats.lock().unwrap();
                    stats.sample("lock", &result);
                    stats.record("lock", &code_name(&result), t.elapsed());
                }
                if started.elapsed() > total {
                    break;
                }
            }
        }));
    }

    // Restart the database twice, at a third and two thirds of the run.
    let mut restarts = Vec::new();
    for n in 1..=2u32 {
        let at = total.mul_f64(f64::from(n) / 3.0);
        tokio::time::sleep(at.saturating_sub(started.elapsed())).await;
        let t = Instant::now();
        cluster.stop();
        tokio::time::sleep(Duration::from_secs(3)).await;
        cluster.start();
        restarts.push(format!(
            "restart {n} at {:.0?}: down for {:.1?}",
            started.elapsed(),
            t.elapsed()
        ));
    }
    for w in workers {
        w.await.unwrap();
    }
    let elapsed = started.elapsed();
    drop(vitals);

    // Verify: every acknowledged run is stored.
    let acked = acked.lock().unwrap().clone();
    let pool = sqlx::PgPool::connect(&cluster.url()).await.unwrap();
    let stored: HashSet<String> = sqlx::query_scalar("SELECT run_id FROM runs")
        .fetch_all(&pool)
        .await
        .unwrap()
        .into_iter()
        .collect();
    let lost = acked.iter().filter(|r| !stored.contains(*r)).count();
    pool.close().await;

    let stats = stats.lock().unwrap();
    println!(
        "# vitals soak: {:.1} min, concurrency {}",
        elapsed.as_secs_f64() / 60.0,
        args.concurrency
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
    println!("\nvitals' log: {}", log_path.display());
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
        std::process::exit(1);
    }
}

/// What lock traffic has left behind: vitals' resident memory and the
/// database's view of the lock pool.
#[derive(Debug, PartialEq)]
struct Footprint {
    rss_kb: u64,
    lock_sessions: i64,
    idle_in_transaction: i64,
    advisory_locks: i64,
    sessions_opened: i64,
}

async fn footprint(pid: u32, pool: &sqlx::PgPool) -> Footprint {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let rss_kb = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap();
    let (lock_sessions, idle_in_transaction): (i64, i64) = sqlx::query_as(
        "SELECT count(*), count(*) FILTER (WHERE state = 'idle in transaction') \
         FROM pg_stat_activity WHERE application_name = 'vitals-lock'",
    )
    .fetch_one(pool)
    .await
    .unwrap();
    let advisory_locks: i64 = sqlx::query_scalar("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory'")
        .fetch_one(pool)
        .await
        .unwrap();
    let sessions_opened: i64 =
        sqlx::query_scalar("SELECT sessions FROM pg_stat_database WHERE datname = current_database()")
            .fetch_one(pool)
            .await
            .unwrap();
    Footprint {
        rss_kb,
        lock_sessions,
        idle_in_transaction,
        advisory_locks,
        sessions_opened,
    }
}

/// Runs `count` WithLock cycles from `clients` clients, each on its own
/// rotating keys; returns how long it took and the non-OK outcomes.
async fn cycles(channel: &Channel, clients: usize, count: u64) -> (Duration, BTreeMap<String, u64>) {
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
        for (code, n) in t.await.unwrap() {
            *failed.entry(code).or_insert(0) += n;
        }
    }
    (started.elapsed(), failed)
}

/// Memory and pool state after `total` acquire/release cycles equal
/// those after 1,000. RSS may move by allocator noise; 10 % is the bound.
async fn lock_cycles(channel: &Channel, pid: u32, url: &str, clients: usize, total: u64) -> bool {
    const FIRST: u64 = 1_000;
    let pool = sqlx::PgPool::connect(url).await.unwrap();
    let (took_first, failed_first) = cycles(channel, clients, FIRST).await;
    let after_first = footprint(pid, &pool).await;
    let (took_rest, failed_rest) = cycles(channel, clients, total.saturating_sub(FIRST)).await;
    let after_all = footprint(pid, &pool).await;
    pool.close().await;

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
    ok
}
