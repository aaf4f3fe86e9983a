//! `vitals-bench`: how close vitals comes to what PostgreSQL itself can do on
//! the same machine (pgbench running the same SQL), and how it compares with
//! a peer lock service (etcd's v3 Lock API).
//!
//! One run starts everything it needs on loopback (a throw-away PostgreSQL
//! cluster or a fresh database on `DATABASE_URL`, the vitals release binary,
//! etcd), drives each workload at each concurrency for a fixed time, runs the
//! baselines and the peer, soaks `mixed` while sampling vitals' RSS, counts
//! round trips per SubmitRun on the wire, measures vitals' RSS per held
//! WithLock lock on both backends, writes Markdown, JSON and a plot, and
//! stops everything it started.
//!
//! # Layout
//! - [`load`]: the closed-loop driver and latency percentiles.
//! - [`workloads`]: vitals' and etcd's operations as workers.
//! - [`pgbench`]: the baseline scripts, run and read back from pgbench's log.
//! - [`services`]: PostgreSQL, vitals and etcd processes; CPU and RSS sampling.
//! - [`wire`]: a PostgreSQL wire proxy that counts round trips.
//! - [`roundtrips`]: round trips per SubmitRun / WithLock through that proxy.
//! - [`held`]: vitals' RSS while it holds many WithLock locks at once.
//! - [`report`]: the results, their Markdown, JSON and plot.

mod held;
mod load;
mod pgbench;
mod report;
mod roundtrips;
mod services;
mod wire;
mod workloads;

use std::{
    collections::BTreeMap,
    fs,
    path::{Path, PathBuf},
    process::{Command, ExitCode},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use clap::Parser;
use tonic::transport::Channel;

use crate::{
    load::{Plan, Recorded, Summary, Worker, drive},
    pgbench::{Pgbench, Script},
    report::{Cell, Machine, Memory, Report, Settings},
    services::{CpuTargets, CpuUse, Etcd, Postgres, Vitals, cpu_window, rss_kb},
    workloads::{
        EtcdLockWorker, EvaluateWorker, Keys, Lease, LockWorker, MIXED_LOCK, MIXED_SUBMIT, MixedWorker, SubmitWorker,
    },
};

const WORKLOADS: [&str; 4] = ["evaluate", "submit", "lock", "mixed"];

/// Benchmark of vitals against pgbench (same SQL) and etcd (Lock API).
#[derive(Debug, Parser)]
#[command(name = "vitals-bench", version)]
struct Cli {
    /// Measured seconds per cell (one workload, one system, one concurrency).
    #[arg(long, env = "VITALS_BENCH_DURATION", default_value_t = 7.0)]
    duration: f64,
    /// Unmeasured seconds before each cell's window.
    #[arg(long, env = "VITALS_BENCH_WARMUP", default_value_t = 1.0)]
    warmup: f64,
    /// Concurrencies (closed-loop clients), comma separated.
    #[arg(long, value_delimiter = ',', default_value = "1,8,32,64")]
    clients: Vec<usize>,
    /// Workloads to run, comma separated: evaluate, submit, lock, mixed; or
    /// `none`: no timed workload and no soak, only the held-locks measurement
    /// (`--workloads none --hold-locks 10000`).
    #[arg(long, value_delimiter = ',', default_value = "evaluate,submit,lock,mixed")]
    workloads: Vec<String>,
    /// Skip the pgbench baseline.
    #[arg(long)]
    no_pgbench: bool,
    /// Skip the etcd peer.
    #[arg(long)]
    no_etcd: bool,
    /// Seconds of the `mixed` soak during which vitals' RSS is sampled (the
    /// RSS target asks for 300; 0 skips the soak; `--workloads none` skips it too).
    #[arg(long, env = "VITALS_BENCH_SOAK", default_value_t = 60.0)]
    soak: f64,
    /// Seconds at the start of the soak not judged (pools and caches fill).
    #[arg(long, default_value_t = 15.0)]
    soak_warmup: f64,
    /// Clients of the soak.
    #[arg(long, default_value_t = 32)]
    soak_clients: usize,
    /// Sequential SubmitRuns whose PostgreSQL round trips are counted (0 skips).
    #[arg(long, default_value_t = 40)]
    round_trip_requests: usize,
    /// HTTP/2 connections the clients share, round robin (the same for etcd).
    #[arg(long, default_value_t = 4)]
    connections: usize,
    /// Threads of the load generator's runtime.
    #[arg(long, default_value_t = 2)]
    client_threads: usize,
    /// WithLock locks held at once for the held-locks measurement, after the
    /// workloads, on each backend: the PostgreSQL vitals and a second vitals
    /// on the embedded SQLite store. Reports vitals' RSS per held lock
    /// (goal <= 4 KiB) and the time to acquire them all. 0 skips it.
    #[arg(long, default_value_t = 10_000)]
    hold_locks: usize,
    /// Held-locks measurement: WithLock streams per HTTP/2 connection (the
    /// server allows about 200 concurrent streams per connection).
    #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u64).range(1..=200))]
    hold_locks_per_connection: u64,
    /// Held-locks measurement: rounds per backend on the same vitals process.
    /// Round 1 gives the figure per lock; a later round shows whether the
    /// memory kept after a release is reused (no growth) or leaked.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u64).range(1..=5))]
    hold_locks_rounds: u64,
    /// Held-locks measurement: streams acquiring (later releasing) at once.
    #[arg(long, default_value_t = 200, value_parser = clap::value_parser!(u64).range(1..=100_000))]
    hold_locks_concurrency: u64,
    /// Upper bound on requests per cell.
    #[arg(long, default_value_t = 5_000_000)]
    max_requests: u64,
    /// Share of SubmitRun in `mixed`, percent (the rest is WithLock).
    #[arg(long, default_value_t = 80)]
    mixed_submit_percent: u32,
    /// WithLock wait_timeout, seconds.
    #[arg(long, default_value_t = 10)]
    lock_wait: u64,
    /// The vitals binary (default: target/release/vitals of this workspace).
    #[arg(long, env = "VITALS_BIN")]
    vitals_bin: Option<PathBuf>,
    /// The etcd binary.
    #[arg(long, env = "ETCD_BIN", default_value = "etcd")]
    etcd_bin: PathBuf,
    /// Where results.{md,json} and the plot go (default: bench/results).
    #[arg(long)]
    out_dir: Option<PathBuf>,
    /// Scratch directory (cluster, logs); default: a temporary one, removed at exit.
    #[arg(long)]
    work_dir: Option<PathBuf>,
    /// Re-render results.md and the plot from a results.json into --out-dir,
    /// running nothing.
    #[arg(long, value_name = "RESULTS_JSON")]
    replot: Option<PathBuf>,
    /// Admin URL of a PostgreSQL to use instead of a throw-away cluster; a
    /// fresh database is created on it and dropped at exit.
    #[arg(long, env = "DATABASE_URL", hide_env_values = true)]
    database_url: Option<String>,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(cli.client_threads.max(1))
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(err) => {
            eprintln!("vitals-bench: {err}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        tokio::select! {
            r = run(cli) => r,
            () = interrupted() => Err(anyhow::anyhow!("interrupted; stopped everything that was started")),
        }
    });
    runtime.shutdown_timeout(Duration::from_secs(2));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("vitals-bench: {err:#}");
            ExitCode::FAILURE
        }
    }
}

async fn interrupted() {
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        () = term => {}
    }
}

/// A scratch directory: given (kept) or temporary (removed on drop).
enum WorkDir {
    Given(PathBuf),
    Temp(tempfile::TempDir),
}

impl WorkDir {
    fn path(&self) -> &Path {
        match self {
            WorkDir::Given(p) => p,
            WorkDir::Temp(t) => t.path(),
        }
    }
}

/// What the cells share.
struct Bench {
    plan: Plan,
    started: Instant,
    cpu: CpuTargets,
    vitals_pid: u32,
    report: Report,
}

impl Bench {
    /// Drives `workers`, samples CPU over the measured window.
    async fn drive<W: Worker>(&self, kinds: usize, workers: Vec<W>) -> (Recorded, Option<CpuUse>) {
        let cpu = cpu_window(self.cpu.clone(), self.plan.warmup, self.plan.duration);
        let recorded = drive(self.plan, kinds, workers).await;
        let cpu = cpu.await.ok();
        (recorded, cpu)
    }

    fn push(
        &mut self,
        workload: &str,
        system: &str,
        clients: usize,
        summary: Summary,
        cpu: Option<CpuUse>,
        transitions_share: Option<f64>,
    ) {
        eprintln!(
            "[{:>4.0}s] {system:<22} {workload:<16} {clients:>3} clients: {:>9} /s  p50 {:>8.3} ms  p99 {:>8.3} ms  max {:>8.1} ms  {}",
            self.started.elapsed().as_secs_f64(),
            report::num(summary.throughput),
            summary.p50_ms,
            summary.p99_ms,
            summary.max_ms,
            summary
                .codes
                .iter()
                .map(|(k, v)| format!("{k}={v}"))
                .collect::<Vec<_>>()
                .join(" ")
        );
        self.report.cells.push(Cell {
            workload: workload.to_owned(),
            system: system.to_owned(),
            clients,
            summary,
            cpu,
            vitals_rss_kb: rss_kb(self.vitals_pid),
            loadavg: loadavg(),
            transitions_share,
        });
    }
}

fn loadavg() -> String {
    fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

fn sh(cmd: &str) -> String {
    Command::new("sh")
        .args(["-c", cmd])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default()
}

fn machine() -> Machine {
    let cpuinfo = fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let meminfo = fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let mem_kb: f64 = meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0.0);
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let commit = sh(&format!(
        "cd '{}' && git rev-parse --short HEAD 2>/dev/null && (git status --porcelain -- src migrations proto Cargo.toml | grep -q . && echo '(with uncommitted changes)' || true)",
        root.display()
    ))
    .replace('\n', " ");
    Machine {
        cpu_model: cpuinfo
            .lines()
            .find_map(|l| l.strip_prefix("model name"))
            .map(|v| v.trim_start_matches([' ', '\t', ':']).to_owned())
            .unwrap_or_default(),
        cores: std::thread::available_parallelism().map_or(0, |n| n.get()),
        memory_gib: mem_kb / 1024.0 / 1024.0,
        kernel: fs::read_to_string("/proc/sys/kernel/osrelease")
            .unwrap_or_default()
            .trim()
            .to_owned(),
        loadavg_start: loadavg(),
        top_processes_start: sh(
            "ps -eo pcpu=,comm= --sort=-pcpu | head -n 6 | awk '{print $2\" \"$1\"%\"}' | paste -sd ';'",
        ),
        vitals_commit: if commit.is_empty() { "unknown".into() } else { commit },
        ..Machine::default()
    }
}

/// `--replot`: results.md and the plot again from a results.json.
fn replot(json: &Path, out_dir: &Path) -> Result<()> {
    let text = fs::read_to_string(json).with_context(|| format!("reading {}", json.display()))?;
    let mut r: Report = serde_json::from_str(&text).with_context(|| format!("parsing {}", json.display()))?;
    r.derive();
    fs::create_dir_all(out_dir)?;
    fs::write(out_dir.join("results.md"), report::markdown(&r))?;
    if r.cells.is_empty() {
        eprintln!(
            "vitals-bench: wrote results.md (no cells to plot) in {}",
            out_dir.display()
        );
    } else {
        report::plot(&r, &out_dir.join("throughput-p99.png"))?;
        eprintln!(
            "vitals-bench: wrote results.md and throughput-p99.png in {}",
            out_dir.display()
        );
    }
    Ok(())
}

async fn run(cli: Cli) -> Result<()> {
    let started = Instant::now();
    // `none`: no timed workload and no soak (the held-locks measurement only).
    let workloads: Vec<String> = if cli.workloads.iter().any(|w| w == "none") {
        if cli.workloads.len() > 1 {
            bail!("--workloads none cannot be combined with other workloads");
        }
        Vec::new()
    } else {
        cli.workloads.clone()
    };
    for w in &workloads {
        if !WORKLOADS.contains(&w.as_str()) {
            bail!("unknown workload {w:?} (known: {}, or none)", WORKLOADS.join(", "));
        }
    }
    let soak = if workloads.is_empty() { 0.0 } else { cli.soak };
    if cli.clients.is_empty() || cli.clients.contains(&0) {
        bail!("--clients needs positive numbers");
    }
    let out_dir = cli
        .out_dir
        .clone()
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("results"));
    if let Some(json) = &cli.replot {
        return replot(json, &out_dir);
    }
    if workloads.is_empty() && cli.hold_locks == 0 {
        bail!("nothing to run: --workloads none and --hold-locks 0");
    }
    let wants = |w: &str| workloads.iter().any(|x| x == w);
    let nonce = format!("{:08x}", fastrand::u32(..));
    let work = match &cli.work_dir {
        Some(dir) => {
            fs::create_dir_all(dir)?;
            WorkDir::Given(fs::canonicalize(dir)?)
        }
        None => WorkDir::Temp(tempfile::Builder::new().prefix("vitals-bench-").tempdir()?),
    };
    let vitals_bin = cli
        .vitals_bin
        .clone()
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/release/vitals"));
    let plan = Plan {
        warmup: Duration::from_secs_f64(cli.warmup.max(0.0)),
        duration: Duration::from_secs_f64(cli.duration.max(0.1)),
        max_requests: cli.max_requests,
        op_timeout: Duration::from_secs(30),
    };
    let run_pgbench = !cli.no_pgbench;
    let run_etcd = !cli.no_etcd && wants("lock");

    let n = cli.clients.len();
    let cells = n
        * (usize::from(wants("evaluate"))
            + usize::from(wants("submit")) * (1 + usize::from(run_pgbench))
            + usize::from(wants("lock")) * (2 + 2 * usize::from(run_pgbench) + 3 * usize::from(run_etcd))
            + usize::from(wants("mixed")));
    let hold = held::HoldPlan {
        locks: cli.hold_locks,
        per_connection: usize::try_from(cli.hold_locks_per_connection).unwrap_or(100),
        concurrency: usize::try_from(cli.hold_locks_concurrency).unwrap_or(200),
    };
    let hold_rounds = usize::try_from(cli.hold_locks_rounds).unwrap_or(1).max(1);
    // Held locks: about 12 s per round and backend for 10,000 locks on 2 cores.
    let hold_estimate = if hold.locks > 0 {
        2.0 * hold_rounds as f64 * (9.0 + hold.locks as f64 / 3000.0)
    } else {
        0.0
    };
    let estimate = cells as f64 * (cli.warmup + cli.duration + 0.3) + soak + hold_estimate + 25.0;
    eprintln!(
        "vitals-bench: {cells} cells of {:.0}+{:.0} s, soak {:.0} s, {} held locks x {hold_rounds} rounds per backend: \
         about {:.0} s ({:.1} min)",
        cli.warmup,
        cli.duration,
        soak,
        hold.locks,
        estimate,
        estimate / 60.0
    );

    let mut machine = machine();
    eprintln!(
        "vitals-bench: load average {} ; busiest processes: {}",
        machine.loadavg_start, machine.top_processes_start
    );
    let pg = Postgres::start(cli.database_url.as_deref(), work.path(), &nonce)?;
    machine.postgres = pg.query("select version()").unwrap_or_default();
    machine.postgres_settings = pg
        .query(
            "select string_agg(name || '=' || setting || coalesce(unit, ''), ', ' order by name) from pg_settings \
             where name in ('fsync', 'synchronous_commit', 'max_connections', 'max_locks_per_transaction', \
             'shared_buffers', 'wal_level')",
        )
        .unwrap_or_default();
    eprintln!("vitals-bench: PostgreSQL ready: {}", machine.postgres);
    // VITALS_MAX_LOCKS (default 10,000) must admit the held locks.
    let max_locks_env = if hold.locks > 10_000 {
        vec![("VITALS_MAX_LOCKS", hold.locks.to_string())]
    } else {
        Vec::new()
    };
    let vitals = Vitals::start_with(&vitals_bin, &pg.url, work.path(), "vitals", &max_locks_env).await?;
    eprintln!(
        "vitals-bench: vitals serving on {} (pid {})",
        vitals.addr,
        vitals.proc.pid()
    );
    let etcd = if run_etcd {
        let etcd = Etcd::start(&cli.etcd_bin, work.path()).await?;
        eprintln!(
            "vitals-bench: {} on {} (pid {})",
            etcd.version,
            etcd.addr,
            etcd.proc.pid()
        );
        machine.etcd = etcd.version.clone();
        Some(etcd)
    } else {
        None
    };

    let mut bench = Bench {
        plan,
        started,
        cpu: CpuTargets {
            vitals: Some(vitals.proc.pid()),
            etcd: etcd.as_ref().map(|e| e.proc.pid()),
            postmaster: pg.postmaster_pid,
            pgbench: None,
        },
        vitals_pid: vitals.proc.pid(),
        report: Report {
            started_at: chrono::Utc::now().format("%Y-%m-%d %H:%M UTC").to_string(),
            machine,
            settings: Settings {
                duration_s: cli.duration,
                warmup_s: cli.warmup,
                clients: cli.clients.clone(),
                connections: cli.connections,
                client_threads: cli.client_threads,
                soak_s: soak,
                soak_warmup_s: cli.soak_warmup,
                soak_clients: cli.soak_clients,
                mixed_submit_percent: cli.mixed_submit_percent,
                lock_wait_s: cli.lock_wait,
                max_requests_per_cell: cli.max_requests,
                hold_locks: hold.locks,
                hold_locks_rounds: hold_rounds,
            },
            ..Report::default()
        },
    };
    let pgbench = Pgbench {
        bin: pg.tool("pgbench"),
        url: pg.url.clone(),
        dir: work.path().join("pgbench"),
    };

    if cli.round_trip_requests > 0 && wants("submit") {
        match roundtrips::measure(&pg, &vitals_bin, work.path(), cli.round_trip_requests, &nonce).await {
            Ok(stats) => {
                for s in &stats {
                    eprintln!(
                        "vitals-bench: {}: {:.1} round trips to PostgreSQL ({} requests)",
                        s.kind, s.round_trips_mean, s.requests
                    );
                }
                bench.report.round_trips = stats;
            }
            Err(err) => bench.report.notes.push(format!("Round trips not counted: {err:#}.")),
        }
    }

    let channels = workloads::channels(vitals.addr, cli.connections).await?;
    let ch = |i: usize| -> Channel { channels[i % channels.len()].clone() };
    let wait = Duration::from_secs(cli.lock_wait);

    if wants("evaluate") {
        let requests = workloads::evaluate_requests(4096, 1);
        for &c in &cli.clients {
            let workers = (0..c)
                .map(|i| EvaluateWorker::new(ch(i), requests.clone(), i))
                .collect();
            let (rec, cpu) = bench.drive(1, workers).await;
            bench.push("evaluate", "vitals", c, rec.summary(0), cpu, None);
        }
    }

    if wants("submit") {
        let mut shares = BTreeMap::new();
        for &c in &cli.clients {
            let workers = (0..c)
                .map(|i| SubmitWorker::new(ch(i), format!("{nonce}-s{c}-{i}"), seed(c, i)))
                .collect();
            let (rec, cpu) = bench.drive(1, workers).await;
            let summary = rec.summary(0);
            let share = rec.flags(0) as f64 / summary.requests.max(1) as f64;
            shares.insert(c, share);
            bench.push("submit", "vitals", c, summary, cpu, Some(share));
        }
        if run_pgbench {
            for &c in &cli.clients {
                let tpm = (shares.get(&c).copied().unwrap_or(0.5) * 10_000.0).round() as u32;
                let script = Script::Submit {
                    transitions_per_10k: tpm,
                };
                let r = pgbench
                    .run(script, c, plan.warmup, plan.duration, bench.cpu.clone())
                    .await?;
                bench.push("submit", "pgbench", c, r.summary, Some(r.cpu), None);
                let _ = r.reported_tps;
            }
            bench
                .report
                .pgbench_scripts
                .insert("submit".into(), Script::Submit { transitions_per_10k: 0 }.source()?);
        }
    }

    if wants("lock") {
        for (workload, keys) in [("lock-uncontended", Keys::Random), ("lock-contended", Keys::One)] {
            for &c in &cli.clients {
                let workers = (0..c).map(|i| LockWorker::new(ch(i), keys, wait, seed(c, i))).collect();
                let (rec, cpu) = bench.drive(1, workers).await;
                bench.push(workload, "vitals", c, rec.summary(0), cpu, None);
            }
        }
        if run_pgbench {
            for (workload, script) in [
                ("lock-uncontended", Script::LockRandom),
                ("lock-contended", Script::LockOne),
            ] {
                for &c in &cli.clients {
                    let r = pgbench
                        .run(script, c, plan.warmup, plan.duration, bench.cpu.clone())
                        .await?;
                    bench.push(workload, "pgbench", c, r.summary, Some(r.cpu), None);
                }
                bench.report.pgbench_scripts.insert(workload.into(), script.source()?);
            }
        }
        if let Some(etcd) = &etcd {
            let mut clients = Vec::new();
            for _ in 0..cli.connections.max(1) {
                clients.push(workloads::etcd_client(etcd.addr).await?);
            }
            let mut admin = clients[0].clone();
            for (workload, keys, per_request) in [
                ("lock-uncontended", Keys::Random, false),
                ("lock-contended", Keys::One, false),
                ("lock-uncontended", Keys::Random, true),
            ] {
                for &c in &cli.clients {
                    let mut leases = Vec::new();
                    let mut workers = Vec::new();
                    for i in 0..c {
                        let lease = if per_request {
                            Lease::PerRequest
                        } else {
                            let id = admin.lease_grant(workloads::ETCD_LEASE_TTL, None).await?.id();
                            leases.push(id);
                            Lease::Session(id)
                        };
                        workers.push(EtcdLockWorker::new(
                            clients[i % clients.len()].clone(),
                            keys,
                            lease,
                            seed(c, i),
                        ));
                    }
                    let (rec, cpu) = bench.drive(1, workers).await;
                    let system = if per_request { "etcd-lease-per-request" } else { "etcd" };
                    bench.push(workload, system, c, rec.summary(0), cpu, None);
                    for id in leases {
                        let _ = admin.lease_revoke(id).await;
                    }
                }
            }
        }
    }

    let mixed_workers = |c: usize, tag: &str| -> Vec<MixedWorker> {
        (0..c)
            .map(|i| {
                MixedWorker::new(
                    SubmitWorker::new(ch(i), format!("{nonce}-{tag}{c}-{i}"), seed(c, i)),
                    LockWorker::new(ch(i), Keys::Random, wait, seed(c, i) ^ 0x5555),
                    cli.mixed_submit_percent,
                    seed(c, i) ^ 0xaaaa,
                )
            })
            .collect()
    };
    if wants("mixed") {
        for &c in &cli.clients {
            let (rec, cpu) = bench.drive(2, mixed_workers(c, "m")).await;
            let (submit, lock) = (rec.summary(MIXED_SUBMIT), rec.summary(MIXED_LOCK));
            bench.push("mixed", "vitals", c, rec.total(), cpu, None);
            bench.push("mixed:submit", "vitals", c, submit, None, None);
            bench.push("mixed:lock", "vitals", c, lock, None, None);
        }
    }

    if soak > 0.0 {
        let c = cli.soak_clients.max(1);
        let soak_plan = Plan {
            warmup: Duration::from_secs_f64(cli.soak_warmup.min(soak / 2.0)),
            duration: Duration::from_secs_f64(soak - cli.soak_warmup.min(soak / 2.0)),
            ..plan
        };
        eprintln!("vitals-bench: soaking mixed at {c} clients for {soak:.0} s, sampling vitals RSS every second");
        let pid = vitals.proc.pid();
        let total = Duration::from_secs_f64(soak);
        let sampler = tokio::spawn(async move {
            let t0 = Instant::now();
            let mut samples = Vec::new();
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            while t0.elapsed() <= total {
                tick.tick().await;
                if let Some(kb) = rss_kb(pid) {
                    samples.push((t0.elapsed().as_secs_f64(), kb));
                }
            }
            samples
        });
        let cpu = cpu_window(bench.cpu.clone(), soak_plan.warmup, soak_plan.duration);
        let rec = drive(soak_plan, 2, mixed_workers(c, "soak")).await;
        let cpu = cpu.await.ok();
        let samples = sampler.await.unwrap_or_default();
        bench.push("soak (mixed)", "vitals", c, rec.total(), cpu, None);
        bench.report.memory = Memory::from_samples(c, soak, soak_plan.warmup.as_secs_f64(), samples);
    }

    if hold.locks > 0 {
        drop(channels);
        let prefix = format!("bench-held-{nonce}");
        let results = held::measure_rounds(
            "postgres",
            hold_rounds,
            vitals.addr,
            vitals.proc.pid(),
            hold,
            &format!("{prefix}-pg"),
            Some(&pg),
        )
        .await?;
        bench.report.held_locks.extend(results);
        let dir = work.path().join("embedded");
        fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let url = format!("sqlite://{}/vitals.db", dir.display());
        let embedded = Vitals::start_with(&vitals_bin, &url, work.path(), "vitals-embedded", &max_locks_env).await?;
        eprintln!(
            "vitals-bench: embedded vitals serving on {} (pid {}, {url})",
            embedded.addr,
            embedded.proc.pid()
        );
        let results = held::measure_rounds(
            "embedded",
            hold_rounds,
            embedded.addr,
            embedded.proc.pid(),
            hold,
            &format!("{prefix}-embedded"),
            None,
        )
        .await?;
        bench.report.held_locks.extend(results);
        drop(embedded);
    }

    // Notes that explain how to read the numbers.
    let r = &mut bench.report;
    r.notes.push(format!(
        "vitals runs with its defaults: DATABASE_POOL_MAX 20, DATABASE_LOCK_POOL_MAX 2 (the lock sessions every \
         WithLock lock of the replica shares, many advisory locks per session), VITALS_MAX_LOCKS {}, lease \
         (DATABASE_LOCK_IDLE_TX_TIMEOUT_MS) 30 s, RUST_LOG info,sqlx=warn. PostgreSQL runs with \
         max_locks_per_transaction=256 (the README's sizing for 10,000 locks per replica) when the benchmark \
         starts its own cluster.",
        report::num(hold.locks.max(10_000) as f64)
    ));
    if run_pgbench && (wants("submit") || wants("lock")) {
        r.notes.push(
            "pgbench: prepared statements (-M prepared), one connection per client, 2 threads; latency \
             percentiles from its per-transaction log, with the same warm-up cut."
                .into(),
        );
    }
    if run_etcd {
        r.notes.push(
            "etcd: one member, default settings (WAL fsynced per commit, like PostgreSQL's synchronous commit). \
             `etcd` = one lease per client session, then Lock + Unlock per request (what etcd's own \
             concurrency.Mutex does); `etcd-lease-per-request` = LeaseGrant + Lock + Unlock + LeaseRevoke per request."
                .into(),
        );
    }
    r.notes.push(
        "Load generator, vitals, PostgreSQL, pgbench and etcd all share the machine's cores; a closed-loop \
         client on the same cores takes CPU from the server it measures (see the CPU column)."
            .into(),
    );
    if let Some(load) = r
        .machine
        .loadavg_start
        .split_whitespace()
        .next()
        .and_then(|l| l.parse::<f64>().ok())
    {
        if load > 0.5 {
            r.notes.push(format!(
                "The machine was possibly shared: load average {load} when the run started (busiest processes: {}); \
                 the `other` CPU column shows what other processes used during each cell.",
                r.machine.top_processes_start
            ));
        }
    }
    if soak > 0.0 && soak < 300.0 {
        r.notes.push(format!(
            "The memory soak lasted {soak:.0} s, shorter than the 5 minutes of the target, to keep the whole run under \
             10 minutes; `scripts/bench.sh --soak 300` runs the full soak."
        ));
    }
    r.machine.loadavg_end = loadavg();
    r.total_seconds = started.elapsed().as_secs_f64();
    r.derive();

    fs::create_dir_all(&out_dir).with_context(|| format!("creating {}", out_dir.display()))?;
    let md = report::markdown(r);
    fs::write(out_dir.join("results.md"), &md)?;
    fs::write(out_dir.join("results.json"), serde_json::to_string_pretty(r)?)?;
    let png = out_dir.join("throughput-p99.png");
    let plotted = if r.cells.is_empty() {
        false
    } else if let Err(err) = report::plot(r, &png) {
        eprintln!("vitals-bench: no plot: {err:#}");
        false
    } else {
        true
    };
    println!("{md}");
    eprintln!(
        "vitals-bench: wrote {}/results.md, results.json{} in {:.0} s",
        out_dir.display(),
        if plotted { " and throughput-p99.png" } else { "" },
        started.elapsed().as_secs_f64()
    );
    drop(etcd);
    drop(vitals);
    drop(pg);
    drop(work);
    Ok(())
}

/// A per-worker seed, different per cell.
fn seed(clients: usize, worker: usize) -> u64 {
    (clients as u64) << 32 | worker as u64
}
