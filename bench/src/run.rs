//! The benchmark: its options, the set-up, one function per workload and
//! baseline, the memory soak, the held locks, and the results.
//!
//! [`run`] reads as the run's table of contents; [`Bench`] carries what
//! the phases share (the plan, the processes started, the report).

use std::{
    collections::BTreeMap,
    fs,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use tonic::transport::Channel;

use crate::{
    held::{self, HoldPlan},
    load::{Plan, Recorded, Summary, Worker, drive},
    machine::{loadavg, machine},
    pgbench::{Pgbench, Script},
    report::{self, Cell, Memory, Report, Settings},
    roundtrips,
    services::{CpuTargets, CpuUse, Etcd, Postgres, Vitals, cpu_window, rss_kb},
    workloads::{
        self, EtcdLockWorker, EvaluateWorker, Hold, Keys, Lease, LockWorker, MIXED_LOCK, MIXED_SUBMIT, MixedWorker,
        SubmitWorker,
    },
};

/// The cells of the `lock-modes` workload and how each holds its key.
const LOCK_MODES: [(&str, Hold); 3] = [
    ("lock-shared", Hold::Shared),
    ("lock-semaphore", Hold::Semaphore(4)),
    ("campaign", Hold::Campaign),
];

const WORKLOADS: [&str; 5] = ["evaluate", "submit", "lock", "lock-modes", "mixed"];

/// Clients of the metrics cost phase (its target's concurrency).
const METRICS_CLIENTS: usize = 32;

/// Benchmark of vitals against pgbench (same SQL) and etcd (Lock API).
#[derive(Debug, clap::Args)]
pub(crate) struct BenchArgs {
    /// Measured seconds per cell (one workload, one system, one concurrency).
    #[arg(long, env = "VITALS_BENCH_DURATION", default_value_t = 7.0)]
    duration: f64,
    /// Unmeasured seconds before each cell's window.
    #[arg(long, env = "VITALS_BENCH_WARMUP", default_value_t = 1.0)]
    warmup: f64,
    /// Concurrencies (closed-loop clients), comma separated.
    #[arg(long, value_delimiter = ',', default_value = "1,8,32,64")]
    clients: Vec<usize>,
    /// Workloads to run, comma separated: evaluate, submit, lock, lock-modes
    /// (shared locks, a semaphore, an election, each on one key), mixed; or
    /// `none`: no timed workload and no soak, only the held-locks measurement
    /// (`--workloads none --hold-locks 10000`).
    #[arg(long, value_delimiter = ',', default_value = "evaluate,submit,lock,lock-modes,mixed")]
    workloads: Vec<String>,
    /// Skip the pgbench baseline.
    #[arg(long)]
    no_pgbench: bool,
    /// Skip the etcd peer.
    #[arg(long)]
    no_etcd: bool,
    /// Skip the metrics cost: with `submit` or `lock` selected, the run
    /// otherwise drives `submit` and/or `lock-uncontended` at 32 clients (or
    /// the largest of --clients below it) against two fresh vitals, metrics
    /// off (`vitals-metrics-off`) and on (`vitals-metrics-on`), in the order
    /// off, on, on, off.
    #[arg(long)]
    no_metrics_off: bool,
    /// Seconds of the `mixed` soak during which vitals' RSS is sampled (the
    /// RSS target asks for 300; 0 skips the soak; `--workloads none` skips it too).
    /// The soak with PostgreSQL restarts is the `soak` subcommand.
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
    pub(crate) client_threads: usize,
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
    /// Where the results go (default: bench/results): results.md and
    /// summary.json, and under raw/ (not committed) the whole results.json
    /// and the plot.
    #[arg(long)]
    out_dir: Option<PathBuf>,
    /// Scratch directory (cluster, logs); default: a temporary one, removed at exit.
    #[arg(long)]
    work_dir: Option<PathBuf>,
    /// Re-render results.md, summary.json and the plot from a results.json
    /// into --out-dir, running nothing.
    #[arg(long, value_name = "RESULTS_JSON")]
    replot: Option<PathBuf>,
    /// Admin URL of a PostgreSQL to use instead of a throw-away cluster; a
    /// fresh database is created on it and dropped at exit.
    #[arg(long, env = "DATABASE_URL", hide_env_values = true)]
    database_url: Option<String>,
}

/// A scratch directory: given (kept) or temporary (removed on drop).
pub(crate) enum WorkDir {
    Given(PathBuf),
    Temp(tempfile::TempDir),
}

impl WorkDir {
    /// `dir` (created if missing), or a new temporary directory.
    pub(crate) fn new(dir: Option<&Path>) -> Result<Self> {
        Ok(match dir {
            Some(dir) => {
                fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
                WorkDir::Given(fs::canonicalize(dir)?)
            }
            None => WorkDir::Temp(tempfile::Builder::new().prefix("vitals-bench-").tempdir()?),
        })
    }

    pub(crate) fn path(&self) -> &Path {
        match self {
            WorkDir::Given(p) => p,
            WorkDir::Temp(t) => t.path(),
        }
    }
}

/// The vitals release binary of this workspace, unless one is given.
pub(crate) fn vitals_bin(given: Option<&Path>) -> PathBuf {
    given.map_or_else(
        || Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/release/vitals"),
        Path::to_path_buf,
    )
}

/// What to run, checked, and what follows from it.
#[derive(Debug)]
struct Options {
    /// The timed workloads, in `WORKLOADS` spelling; empty for `none`.
    workloads: Vec<String>,
    /// Seconds of the memory soak (0: none).
    soak: f64,
    run_pgbench: bool,
    run_etcd: bool,
    /// Clients of the metrics cost phase; None: not run.
    metrics_clients: Option<usize>,
    plan: Plan,
    hold: HoldPlan,
    hold_rounds: usize,
    out_dir: PathBuf,
}

impl Options {
    fn from_args(args: &BenchArgs) -> Result<Self> {
        // `none`: no timed workload and no soak (the held-locks measurement only).
        let workloads: Vec<String> = if args.workloads.iter().any(|w| w == "none") {
            if args.workloads.len() > 1 {
                bail!("--workloads none cannot be combined with other workloads");
            }
            Vec::new()
        } else {
            args.workloads.clone()
        };
        for w in &workloads {
            if !WORKLOADS.contains(&w.as_str()) {
                bail!("unknown workload {w:?} (known: {}, or none)", WORKLOADS.join(", "));
            }
        }
        if args.clients.is_empty() || args.clients.contains(&0) {
            bail!("--clients needs positive numbers");
        }
        let wants_lock = workloads.iter().any(|w| w == "lock");
        let wants_submit = workloads.iter().any(|w| w == "submit");
        // 32 clients, as the target says, or the closest below it.
        let metrics_clients = if !args.no_metrics_off && (wants_submit || wants_lock) {
            args.clients.iter().copied().filter(|&c| c <= METRICS_CLIENTS).max()
        } else {
            None
        };
        Ok(Options {
            soak: if workloads.is_empty() { 0.0 } else { args.soak },
            run_pgbench: !args.no_pgbench,
            run_etcd: !args.no_etcd && wants_lock,
            metrics_clients,
            plan: Plan {
                warmup: Duration::from_secs_f64(args.warmup.max(0.0)),
                duration: Duration::from_secs_f64(args.duration.max(0.1)),
                max_requests: args.max_requests,
                op_timeout: Duration::from_secs(30),
            },
            hold: HoldPlan {
                locks: args.hold_locks,
                per_connection: usize::try_from(args.hold_locks_per_connection).unwrap_or(100),
                concurrency: usize::try_from(args.hold_locks_concurrency).unwrap_or(200),
            },
            hold_rounds: usize::try_from(args.hold_locks_rounds).unwrap_or(1).max(1),
            out_dir: args
                .out_dir
                .clone()
                .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("results")),
            workloads,
        })
    }

    fn wants(&self, workload: &str) -> bool {
        self.workloads.iter().any(|w| w == workload)
    }

    /// The metrics cost phase's workloads (in cell spelling), if it runs.
    fn metrics_workloads(&self) -> Vec<&'static str> {
        if self.metrics_clients.is_none() {
            return Vec::new();
        }
        [("submit", "submit"), ("lock", "lock-uncontended")]
            .into_iter()
            .filter(|(selected, _)| self.wants(selected))
            .map(|(_, workload)| workload)
            .collect()
    }

    /// Timed cells: one per workload, system and concurrency, and the
    /// metrics cost phase's two per workload.
    fn cells(&self, clients: usize) -> usize {
        let (pgbench, etcd) = (usize::from(self.run_pgbench), usize::from(self.run_etcd));
        clients
            * (usize::from(self.wants("evaluate"))
                + usize::from(self.wants("submit")) * (1 + 2 * pgbench)
                + usize::from(self.wants("lock")) * (2 + 2 * pgbench + 3 * etcd)
                + usize::from(self.wants("lock-modes")) * LOCK_MODES.len()
                + usize::from(self.wants("mixed")))
            + 4 * self.metrics_workloads().len()
    }

    /// Seconds the whole run takes, roughly.
    fn estimate(&self, args: &BenchArgs) -> f64 {
        // Held locks: about 12 s per round and backend for 10,000 locks on 2 cores.
        let hold = if self.hold.locks > 0 {
            2.0 * self.hold_rounds as f64 * (9.0 + self.hold.locks as f64 / 3000.0)
        } else {
            0.0
        };
        self.cells(args.clients.len()) as f64 * (args.warmup + args.duration + 0.3) + self.soak + hold + 25.0
    }

    /// VITALS_MAX_LOCKS (default 10,000) must admit the held locks.
    fn vitals_env(&self) -> Vec<(&'static str, String)> {
        if self.hold.locks > 10_000 {
            vec![("VITALS_MAX_LOCKS", self.hold.locks.to_string())]
        } else {
            Vec::new()
        }
    }
}

/// Runs the benchmark (or `--replot`s).
pub(crate) async fn run(args: BenchArgs) -> Result<()> {
    let started = Instant::now();
    let opts = Options::from_args(&args)?;
    if let Some(json) = &args.replot {
        return replot(json, &opts.out_dir);
    }
    if opts.workloads.is_empty() && opts.hold.locks == 0 {
        bail!("nothing to run: --workloads none and --hold-locks 0");
    }
    let mut bench = Bench::start(args, opts, started).await?;
    bench.round_trips().await;
    bench.connect().await?;
    if bench.opts.wants("evaluate") {
        bench.evaluate().await;
    }
    if bench.opts.wants("submit") {
        let shares = bench.submit().await;
        if bench.opts.run_pgbench {
            bench.pgbench_submit(&shares).await?;
        }
    }
    if bench.opts.wants("lock") {
        bench.lock().await;
        if bench.opts.run_pgbench {
            bench.pgbench_lock().await?;
        }
        if bench.opts.run_etcd {
            bench.etcd_lock().await?;
        }
    }
    if bench.opts.wants("lock-modes") {
        bench.lock_modes().await;
    }
    if bench.opts.wants("mixed") {
        bench.mixed().await;
    }
    if let Some(clients) = bench.opts.metrics_clients {
        bench.metrics_cost(clients).await?;
    }
    if bench.opts.soak > 0.0 {
        bench.memory_soak().await;
    }
    if bench.opts.hold.locks > 0 {
        bench.held_locks().await?;
    }
    bench.finish()
}

/// What the phases share. The processes stop when it drops, in the order
/// of the fields: the clients' connections, etcd, vitals, PostgreSQL, and
/// last the work directory they lived in.
struct Bench {
    args: BenchArgs,
    opts: Options,
    started: Instant,
    /// Keeps this run's run ids and database apart from earlier runs'.
    nonce: String,
    vitals_bin: PathBuf,
    /// Whose CPU time each cell accounts.
    cpu: CpuTargets,
    report: Report,
    pgbench: Pgbench,
    /// The clients' HTTP/2 connections to vitals, shared round robin.
    channels: Vec<Channel>,
    etcd: Option<Etcd>,
    vitals: Vitals,
    pg: Postgres,
    work: WorkDir,
}

impl Bench {
    /// Starts PostgreSQL, vitals and (for the lock workloads) etcd.
    async fn start(args: BenchArgs, opts: Options, started: Instant) -> Result<Self> {
        let nonce = format!("{:08x}", fastrand::u32(..));
        let work = WorkDir::new(args.work_dir.as_deref())?;
        let vitals_bin = vitals_bin(args.vitals_bin.as_deref());
        let estimate = opts.estimate(&args);
        eprintln!(
            "vitals-bench: {} cells of {:.0}+{:.0} s, soak {:.0} s, {} held locks x {} rounds per backend: \
             about {:.0} s ({:.1} min)",
            opts.cells(args.clients.len()),
            args.warmup,
            args.duration,
            opts.soak,
            opts.hold.locks,
            opts.hold_rounds,
            estimate,
            estimate / 60.0
        );

        let mut machine = machine();
        eprintln!(
            "vitals-bench: load average {} ; busiest processes: {}",
            machine.loadavg_start, machine.top_processes_start
        );
        let pg = Postgres::start(args.database_url.as_deref(), work.path(), &nonce)?;
        machine.postgres = pg.query("select version()").unwrap_or_default();
        machine.postgres_settings = pg
            .query(
                "select string_agg(name || '=' || setting || coalesce(unit, ''), ', ' order by name) from pg_settings \
                 where name in ('fsync', 'synchronous_commit', 'max_connections', 'max_locks_per_transaction', \
                 'shared_buffers', 'wal_level')",
            )
            .unwrap_or_default();
        eprintln!("vitals-bench: PostgreSQL ready: {}", machine.postgres);
        let vitals = Vitals::start_with(&vitals_bin, &pg.url, work.path(), "vitals", &opts.vitals_env()).await?;
        eprintln!(
            "vitals-bench: vitals serving on {} (pid {})",
            vitals.addr,
            vitals.proc.pid()
        );
        let etcd = if opts.run_etcd {
            let etcd = Etcd::start(&args.etcd_bin, work.path()).await?;
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

        let report = Report {
            started_at: chrono::Utc::now().format("%Y-%m-%d %H:%M UTC").to_string(),
            machine,
            settings: Settings {
                duration_s: args.duration,
                warmup_s: args.warmup,
                clients: args.clients.clone(),
                connections: args.connections,
                client_threads: args.client_threads,
                soak_s: opts.soak,
                soak_warmup_s: args.soak_warmup,
                soak_clients: args.soak_clients,
                mixed_submit_percent: args.mixed_submit_percent,
                lock_wait_s: args.lock_wait,
                max_requests_per_cell: args.max_requests,
                hold_locks: opts.hold.locks,
                hold_locks_rounds: opts.hold_rounds,
            },
            ..Report::default()
        };
        Ok(Bench {
            cpu: CpuTargets {
                vitals: Some(vitals.proc.pid()),
                etcd: etcd.as_ref().map(|e| e.proc.pid()),
                postmaster: pg.postmaster_pid,
                pgbench: None,
            },
            pgbench: Pgbench {
                bin: pg.tool("pgbench"),
                url: pg.url.clone(),
                dir: work.path().join("pgbench"),
            },
            report,
            args,
            opts,
            started,
            nonce,
            vitals_bin,
            channels: Vec::new(),
            etcd,
            vitals,
            pg,
            work,
        })
    }

    /// Round trips per SubmitRun and WithLock, counted on the wire by a
    /// second vitals; a failure is a note in the report, not the run's end.
    async fn round_trips(&mut self) {
        if self.args.round_trip_requests == 0 || !self.opts.wants("submit") {
            return;
        }
        let measured = roundtrips::measure(
            &self.pg,
            &self.vitals_bin,
            self.work.path(),
            self.args.round_trip_requests,
            &self.nonce,
        )
        .await;
        match measured {
            Ok(stats) => {
                for s in &stats {
                    eprintln!(
                        "vitals-bench: {}: {:.1} round trips to PostgreSQL ({} requests)",
                        s.kind, s.round_trips_mean, s.requests
                    );
                }
                self.report.round_trips = stats;
            }
            Err(err) => self.report.notes.push(format!("Round trips not counted: {err:#}.")),
        }
    }

    /// The clients' HTTP/2 connections.
    async fn connect(&mut self) -> Result<()> {
        self.channels = workloads::channels(self.vitals.addr, self.args.connections).await?;
        Ok(())
    }

    /// Client `i`'s connection.
    fn channel(&self, i: usize) -> Channel {
        self.channels[i % self.channels.len()].clone()
    }

    fn lock_wait(&self) -> Duration {
        Duration::from_secs(self.args.lock_wait)
    }

    /// Drives `workers`, samples CPU over the measured window.
    async fn drive<W: Worker>(&self, kinds: usize, workers: Vec<W>) -> (Recorded, Option<CpuUse>) {
        self.drive_on(self.cpu.clone(), kinds, workers).await
    }

    /// [`Bench::drive`], CPU accounted to `targets`.
    async fn drive_on<W: Worker>(
        &self,
        targets: CpuTargets,
        kinds: usize,
        workers: Vec<W>,
    ) -> (Recorded, Option<CpuUse>) {
        let cpu = cpu_window(targets, self.opts.plan.warmup, self.opts.plan.duration);
        let recorded = drive(self.opts.plan, kinds, workers).await;
        let cpu = cpu.await.ok();
        (recorded, cpu)
    }

    /// Records one cell and prints its line.
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
            vitals_rss_kb: rss_kb(self.vitals.proc.pid()),
            loadavg: loadavg(),
            transitions_share,
        });
    }

    /// `evaluate` at each concurrency.
    async fn evaluate(&mut self) {
        let requests = workloads::evaluate_requests(4096, 1);
        for c in self.args.clients.clone() {
            let workers = (0..c)
                .map(|i| EvaluateWorker::new(self.channel(i), requests.clone(), i))
                .collect();
            let (rec, cpu) = self.drive(1, workers).await;
            self.push("evaluate", "vitals", c, rec.summary(0), cpu, None);
        }
    }

    /// `submit` at each concurrency. Returns the share of replies that
    /// carried a transition, per concurrency, for the pgbench baseline.
    async fn submit(&mut self) -> BTreeMap<usize, f64> {
        let mut shares = BTreeMap::new();
        for c in self.args.clients.clone() {
            let workers = (0..c)
                .map(|i| SubmitWorker::new(self.channel(i), format!("{}-s{c}-{i}", self.nonce), seed(c, i)))
                .collect();
            let (rec, cpu) = self.drive(1, workers).await;
            let summary = rec.summary(0);
            let share = rec.flags(0) as f64 / summary.requests.max(1) as f64;
            shares.insert(c, share);
            self.push("submit", "vitals", c, summary, cpu, Some(share));
        }
        shares
    }

    /// pgbench running SubmitRun's SQL, writing transitions in the share
    /// vitals wrote them at the same concurrency; then the minimal statement
    /// set of the same durable work.
    async fn pgbench_submit(&mut self, shares: &BTreeMap<usize, f64>) -> Result<()> {
        for c in self.args.clients.clone() {
            let tpm = (shares.get(&c).copied().unwrap_or(0.5) * 10_000.0).round() as u32;
            let script = Script::Submit {
                transitions_per_10k: tpm,
            };
            let plan = self.opts.plan;
            let r = self
                .pgbench
                .run(script, c, plan.warmup, plan.duration, self.cpu.clone())
                .await?;
            self.push("submit", "pgbench", c, r.summary, Some(r.cpu), None);
        }
        let source = Script::Submit { transitions_per_10k: 0 }.source()?;
        self.report.pgbench_scripts.insert("submit".into(), source);
        for c in self.args.clients.clone() {
            let plan = self.opts.plan;
            let r = self
                .pgbench
                .run(Script::SubmitMinimal, c, plan.warmup, plan.duration, self.cpu.clone())
                .await?;
            self.push("submit", "pgbench-minimal", c, r.summary, Some(r.cpu), None);
        }
        let source = Script::SubmitMinimal.source()?;
        self.report.pgbench_scripts.insert("submit-minimal".into(), source);
        Ok(())
    }

    /// `lock-uncontended` and `lock-contended` at each concurrency.
    async fn lock(&mut self) {
        for (workload, keys) in [("lock-uncontended", Keys::Random), ("lock-contended", Keys::One)] {
            for c in self.args.clients.clone() {
                let workers = (0..c)
                    .map(|i| LockWorker::new(self.channel(i), keys, self.lock_wait(), seed(c, i)))
                    .collect();
                let (rec, cpu) = self.drive(1, workers).await;
                self.push(workload, "vitals", c, rec.summary(0), cpu, None);
            }
        }
    }

    /// The other ways to hold a key, each on one key that every client
    /// takes: `lock-shared` (readers that never wait for each other),
    /// `lock-semaphore` (4 holders at a time), `campaign` (an election,
    /// campaign then resign).
    async fn lock_modes(&mut self) {
        for (workload, hold) in LOCK_MODES {
            for c in self.args.clients.clone() {
                let workers = (0..c)
                    .map(|i| LockWorker::new(self.channel(i), Keys::One, self.lock_wait(), seed(c, i)).holding(hold))
                    .collect();
                let (rec, cpu) = self.drive(1, workers).await;
                self.push(workload, "vitals", c, rec.summary(0), cpu, None);
            }
        }
    }

    /// pgbench's `BEGIN; pg_advisory_xact_lock; COMMIT` on random keys and
    /// on one key.
    async fn pgbench_lock(&mut self) -> Result<()> {
        for (workload, script) in [
            ("lock-uncontended", Script::LockRandom),
            ("lock-contended", Script::LockOne),
        ] {
            for c in self.args.clients.clone() {
                let plan = self.opts.plan;
                let r = self
                    .pgbench
                    .run(script, c, plan.warmup, plan.duration, self.cpu.clone())
                    .await?;
                self.push(workload, "pgbench", c, r.summary, Some(r.cpu), None);
            }
            self.report.pgbench_scripts.insert(workload.into(), script.source()?);
        }
        Ok(())
    }

    /// etcd's Lock + Unlock with a lease per client session, on random keys
    /// and on one key, and with a lease per request.
    async fn etcd_lock(&mut self) -> Result<()> {
        let Some(addr) = self.etcd.as_ref().map(|e| e.addr) else {
            return Ok(());
        };
        let mut clients = Vec::new();
        for _ in 0..self.args.connections.max(1) {
            clients.push(workloads::etcd_client(addr).await?);
        }
        let mut admin = clients[0].clone();
        for (workload, keys, per_request) in [
            ("lock-uncontended", Keys::Random, false),
            ("lock-contended", Keys::One, false),
            ("lock-uncontended", Keys::Random, true),
        ] {
            for c in self.args.clients.clone() {
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
                let (rec, cpu) = self.drive(1, workers).await;
                let system = if per_request { "etcd-lease-per-request" } else { "etcd" };
                self.push(workload, system, c, rec.summary(0), cpu, None);
                for id in leases {
                    let _ = admin.lease_revoke(id).await;
                }
            }
        }
        Ok(())
    }

    /// `mixed`'s workers: SubmitRun and WithLock on random keys, in the
    /// configured share.
    fn mixed_workers(&self, c: usize, tag: &str) -> Vec<MixedWorker> {
        (0..c)
            .map(|i| {
                MixedWorker::new(
                    SubmitWorker::new(self.channel(i), format!("{}-{tag}{c}-{i}", self.nonce), seed(c, i)),
                    LockWorker::new(self.channel(i), Keys::Random, self.lock_wait(), seed(c, i) ^ 0x5555),
                    self.args.mixed_submit_percent,
                    seed(c, i) ^ 0xaaaa,
                )
            })
            .collect()
    }

    /// `mixed` at each concurrency, in all and per operation.
    async fn mixed(&mut self) {
        for c in self.args.clients.clone() {
            let (rec, cpu) = self.drive(2, self.mixed_workers(c, "m")).await;
            let (submit, lock) = (rec.summary(MIXED_SUBMIT), rec.summary(MIXED_LOCK));
            self.push("mixed", "vitals", c, rec.total(), cpu, None);
            self.push("mixed:submit", "vitals", c, submit, None, None);
            self.push("mixed:lock", "vitals", c, lock, None, None);
        }
    }

    /// What vitals' Prometheus metrics cost: `submit` and/or
    /// `lock-uncontended` (as selected) at `c` clients against two fresh
    /// vitals processes on the same database with the same settings, one with
    /// `VITALS_METRICS_ADDR` empty (metrics off), one serving metrics (on, on
    /// a port of its own, unscraped), in the order off, on, on, off: a
    /// workload that slows as the database grows (`submit`) then weighs on
    /// both sides alike, and the target compares the means. Both fresh, so
    /// that what a process gathers over the earlier workloads (its heap,
    /// its connections' plans) is on neither side.
    async fn metrics_cost(&mut self, c: usize) -> Result<()> {
        let mut env = self.opts.vitals_env();
        env.push(("VITALS_METRICS_ADDR", String::new()));
        let mut processes = Vec::with_capacity(2);
        for (name, env) in [
            ("vitals-metrics-off", env),
            ("vitals-metrics-on", self.opts.vitals_env()),
        ] {
            let vitals = Vitals::start_with(&self.vitals_bin, &self.pg.url, self.work.path(), name, &env).await?;
            eprintln!(
                "vitals-bench: {name} serving on {} (pid {})",
                vitals.addr,
                vitals.proc.pid()
            );
            processes.push(vitals);
        }
        let mut sides = Vec::with_capacity(2);
        for ((system, tag), vitals) in [("vitals-metrics-off", "moff"), ("vitals-metrics-on", "mon")]
            .into_iter()
            .zip(&processes)
        {
            sides.push(Side {
                system,
                tag,
                channels: workloads::channels(vitals.addr, self.args.connections).await?,
                cpu: CpuTargets {
                    vitals: Some(vitals.proc.pid()),
                    ..self.cpu.clone()
                },
                pid: vitals.proc.pid(),
            });
        }
        for workload in self.opts.metrics_workloads() {
            for (round, side) in [(1, &sides[0]), (1, &sides[1]), (2, &sides[1]), (2, &sides[0])] {
                self.metrics_cell(workload, c, side, round).await;
            }
        }
        // The channels close before the processes stop.
        drop(sides);
        drop(processes);
        Ok(())
    }

    /// One cell of the metrics cost phase on `side`'s vitals. Its RSS is
    /// that process's; both sides' workers take the same seeds (the same
    /// systems, checks and keys in the same order).
    async fn metrics_cell(&mut self, workload: &str, c: usize, side: &Side, round: u32) {
        let (rec, cpu) = if workload == "submit" {
            let workers = (0..c)
                .map(|i| {
                    SubmitWorker::new(
                        side.channel(i),
                        format!("{}-{}{round}-{c}-{i}", self.nonce, side.tag),
                        seed(c, i),
                    )
                })
                .collect();
            self.drive_on(side.cpu.clone(), 1, workers).await
        } else {
            let workers = (0..c)
                .map(|i| LockWorker::new(side.channel(i), Keys::Random, self.lock_wait(), seed(c, i)))
                .collect();
            self.drive_on(side.cpu.clone(), 1, workers).await
        };
        self.push(workload, side.system, c, rec.summary(0), cpu, None);
        if let Some(cell) = self.report.cells.last_mut() {
            cell.vitals_rss_kb = rss_kb(side.pid);
        }
    }

    /// `mixed` for `--soak` seconds while vitals' RSS is sampled every second.
    async fn memory_soak(&mut self) {
        let soak = self.opts.soak;
        let c = self.args.soak_clients.max(1);
        let warmup = self.args.soak_warmup.min(soak / 2.0);
        let plan = Plan {
            warmup: Duration::from_secs_f64(warmup),
            duration: Duration::from_secs_f64(soak - warmup),
            ..self.opts.plan
        };
        eprintln!("vitals-bench: soaking mixed at {c} clients for {soak:.0} s, sampling vitals RSS every second");
        let pid = self.vitals.proc.pid();
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
        let cpu = cpu_window(self.cpu.clone(), plan.warmup, plan.duration);
        let rec = drive(plan, 2, self.mixed_workers(c, "soak")).await;
        let cpu = cpu.await.ok();
        let samples = sampler.await.unwrap_or_default();
        self.push("soak (mixed)", "vitals", c, rec.total(), cpu, None);
        self.report.memory = Memory::from_samples(c, soak, plan.warmup.as_secs_f64(), samples);
    }

    /// RSS per held WithLock lock: on the PostgreSQL vitals, then on a fresh
    /// one on the embedded store.
    async fn held_locks(&mut self) -> Result<()> {
        // Closed first, so that what vitals keeps for the workloads'
        // connections is not counted as the held locks' cost.
        self.channels.clear();
        let (hold, rounds) = (self.opts.hold, self.opts.hold_rounds);
        let prefix = format!("bench-held-{}", self.nonce);
        let results = held::measure_rounds(
            "postgres",
            rounds,
            self.vitals.addr,
            self.vitals.proc.pid(),
            hold,
            &format!("{prefix}-pg"),
            Some(&self.pg),
        )
        .await?;
        self.report.held_locks.extend(results);
        let dir = self.work.path().join("embedded");
        fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let url = format!("sqlite://{}/vitals.db", dir.display());
        let embedded = Vitals::start_with(
            &self.vitals_bin,
            &url,
            self.work.path(),
            "vitals-embedded",
            &self.opts.vitals_env(),
        )
        .await?;
        eprintln!(
            "vitals-bench: embedded vitals serving on {} (pid {}, {url})",
            embedded.addr,
            embedded.proc.pid()
        );
        let results = held::measure_rounds(
            "embedded",
            rounds,
            embedded.addr,
            embedded.proc.pid(),
            hold,
            &format!("{prefix}-embedded"),
            None,
        )
        .await?;
        self.report.held_locks.extend(results);
        Ok(())
    }

    /// Notes that explain how to read the numbers.
    fn notes(&mut self) {
        let (wants_submit, wants_lock) = (self.opts.wants("submit"), self.opts.wants("lock"));
        let soak = self.opts.soak;
        let r = &mut self.report;
        r.notes.push(format!(
            "vitals runs with its defaults: DATABASE_POOL_MAX 20, DATABASE_LOCK_POOL_MAX 2 (the lock sessions every \
             WithLock lock of the replica shares, many advisory locks per session), VITALS_MAX_LOCKS {}, lease \
             (DATABASE_LOCK_IDLE_TX_TIMEOUT_MS) 30 s, RUST_LOG info,sqlx=warn. PostgreSQL runs with \
             max_locks_per_transaction=256 (the README's sizing for 10,000 locks per replica) when the benchmark \
             starts its own cluster.",
            report::num(self.opts.hold.locks.max(10_000) as f64)
        ));
        if self.opts.run_pgbench && (wants_submit || wants_lock) {
            r.notes.push(
                "pgbench: prepared statements (-M prepared), one connection per client, 2 threads; latency \
                 percentiles from its per-transaction log, with the same warm-up cut."
                    .into(),
            );
        }
        if let Some(c) = self.opts.metrics_clients {
            r.notes.push(format!(
                "Metrics cost: two fresh vitals processes started after the other workloads, on the same \
                 database with the same settings: `vitals-metrics-off` with VITALS_METRICS_ADDR empty (metrics \
                 off) and `vitals-metrics-on` serving metrics on a port of its own. Their cells ({c} clients) \
                 run in the order off, on, on, off, so that a workload slowing as the database grows weighs on \
                 both alike, and the target compares their means. Nothing scrapes /metrics during the run."
            ));
        }
        if self.opts.run_etcd {
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
    }

    /// Writes the results; everything started stops as `self` drops.
    fn finish(mut self) -> Result<()> {
        self.notes();
        let r = &mut self.report;
        r.machine.loadavg_end = loadavg();
        r.total_seconds = self.started.elapsed().as_secs_f64();
        r.derive();
        let written = report::write(r, &self.opts.out_dir, true)?;
        println!("{}", report::markdown(r));
        eprintln!(
            "vitals-bench: wrote {} in {:.0} s",
            written.join(", "),
            self.started.elapsed().as_secs_f64()
        );
        Ok(())
    }
}

/// `--replot`: results.md, summary.json and the plot again from a results.json.
fn replot(json: &Path, out_dir: &Path) -> Result<()> {
    let text = fs::read_to_string(json).with_context(|| format!("reading {}", json.display()))?;
    let mut r: Report = serde_json::from_str(&text).with_context(|| format!("parsing {}", json.display()))?;
    r.derive();
    let written = report::write(&r, out_dir, false)?;
    eprintln!("vitals-bench: wrote {}", written.join(", "));
    Ok(())
}

/// A vitals process the metrics cost phase drives.
struct Side {
    /// The cells' system name.
    system: &'static str,
    /// Run ids' tag, apart from the other cells'.
    tag: &'static str,
    /// The clients' HTTP/2 connections to it, shared round robin.
    channels: Vec<Channel>,
    /// Whose CPU time its cells account: this process as vitals.
    cpu: CpuTargets,
    pid: u32,
}

impl Side {
    /// Client `i`'s connection.
    fn channel(&self, i: usize) -> Channel {
        self.channels[i % self.channels.len()].clone()
    }
}

/// A per-worker seed, different per cell.
fn seed(clients: usize, worker: usize) -> u64 {
    (clients as u64) << 32 | worker as u64
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[derive(Debug, Parser)]
    struct Cli {
        #[command(flatten)]
        bench: BenchArgs,
    }

    fn options(args: &[&str]) -> Result<Options> {
        let cli = Cli::try_parse_from(std::iter::once("vitals-bench").chain(args.iter().copied()))?;
        Options::from_args(&cli.bench)
    }

    #[test]
    fn none_runs_no_workload_and_no_soak_and_cannot_be_combined() {
        let opts = options(&["--workloads", "none"]).unwrap();
        assert!(opts.workloads.is_empty());
        assert_eq!(opts.soak, 0.0);
        assert!(!opts.run_etcd);
        assert_eq!(opts.cells(4), 0);
        assert!(options(&["--workloads", "none,lock"]).is_err());
    }

    #[test]
    fn an_unknown_workload_or_no_clients_is_refused() {
        let err = options(&["--workloads", "submit,locks"]).unwrap_err().to_string();
        assert!(err.contains("unknown workload \"locks\""), "{err}");
        assert!(options(&["--clients", "1,0"]).is_err());
    }

    #[test]
    fn every_system_of_a_workload_is_a_cell_at_each_concurrency() {
        // submit: vitals + 2 pgbench; lock: 2 vitals + 2 pgbench + 3 etcd.
        let no_metrics = ["--no-metrics-off", "--workloads", "submit,lock"];
        assert_eq!(options(&no_metrics).unwrap().cells(2), 2 * (3 + 7));
        assert_eq!(
            options(&[&no_metrics[..], &["--no-pgbench", "--no-etcd"]].concat())
                .unwrap()
                .cells(2),
            2 * (1 + 2)
        );
        // etcd only runs with the lock workloads.
        assert!(!options(&["--workloads", "submit"]).unwrap().run_etcd);
    }

    #[test]
    fn the_metrics_cost_runs_at_32_clients_or_the_most_below_for_submit_and_lock_only() {
        // submit and lock-uncontended, each off, on, on, off: 8 more cells.
        let opts = options(&["--workloads", "submit,lock", "--no-pgbench", "--no-etcd"]).unwrap();
        assert_eq!(opts.metrics_clients, Some(32));
        assert_eq!(opts.metrics_workloads(), ["submit", "lock-uncontended"]);
        assert_eq!(opts.cells(4), 4 * (1 + 2) + 8);
        let opts = options(&["--workloads", "lock", "--clients", "1,8,64"]).unwrap();
        assert_eq!(opts.metrics_clients, Some(8));
        assert_eq!(opts.metrics_workloads(), ["lock-uncontended"]);
        assert_eq!(
            options(&["--workloads", "submit", "--clients", "64"])
                .unwrap()
                .metrics_clients,
            None
        );
        assert_eq!(
            options(&["--workloads", "evaluate,mixed"]).unwrap().metrics_clients,
            None
        );
        assert!(
            options(&["--workloads", "submit", "--no-metrics-off"])
                .unwrap()
                .metrics_workloads()
                .is_empty()
        );
    }
}
