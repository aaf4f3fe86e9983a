//! The results: one JSON document, one Markdown page and one plot.
//!
//! What is committed (bench/results/) is the Markdown page and a summary of
//! the JSON document: the figures docs/PERFORMANCE.md cites. The whole
//! document (every RSS sample, CPU breakdowns, example round trips) and the
//! plot go to `raw/` under the same directory, which git ignores.

use std::{collections::BTreeMap, fmt::Write as _, fs, path::Path};

use anyhow::{Context, Result, anyhow};
use plotters::prelude::*;
use serde::{Deserialize, Serialize};

use crate::{load::Summary, services::CpuUse};

/// One measured cell: a workload on one system at one concurrency.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct Cell {
    /// `evaluate`, `submit`, `lock-uncontended`, `lock-contended`, `mixed`,
    /// `mixed:submit`, `mixed:lock`, `soak`.
    pub(crate) workload: String,
    /// `vitals`, `pgbench`, `pgbench-minimal`, `etcd` (lease per session),
    /// `etcd-lease-per-request`, or for the metrics cost `vitals-metrics-off`
    /// (a second vitals, metrics off) and `vitals-metrics-on` (the main
    /// vitals again, right after it).
    pub(crate) system: String,
    pub(crate) clients: usize,
    #[serde(flatten)]
    pub(crate) summary: Summary,
    /// Average cores used during the measured window.
    pub(crate) cpu: Option<CpuUse>,
    /// vitals' resident set size after the cell, kB.
    pub(crate) vitals_rss_kb: Option<u64>,
    /// /proc/loadavg after the cell.
    pub(crate) loadavg: String,
    /// SubmitRun: share of replies that carried a transition.
    pub(crate) transitions_share: Option<f64>,
}

/// vitals against a baseline or peer at one concurrency.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct Ratio {
    pub(crate) workload: String,
    pub(crate) clients: usize,
    pub(crate) against: String,
    pub(crate) vitals_per_s: f64,
    pub(crate) other_per_s: f64,
    /// vitals throughput / other throughput.
    pub(crate) throughput_ratio: f64,
    pub(crate) vitals_p99_ms: f64,
    pub(crate) other_p99_ms: f64,
}

/// One target of the benchmark and whether this run met it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct Target {
    pub(crate) target: String,
    pub(crate) goal: String,
    pub(crate) measured: String,
    /// None: not measured in this run.
    pub(crate) met: Option<bool>,
}

/// RSS of vitals during the mixed soak.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct Memory {
    pub(crate) clients: usize,
    pub(crate) soak_seconds: f64,
    pub(crate) warmup_seconds: f64,
    /// (seconds since the soak started, RSS kB).
    pub(crate) samples: Vec<(f64, u64)>,
    pub(crate) baseline_kb: u64,
    pub(crate) min_kb: u64,
    pub(crate) max_kb: u64,
    pub(crate) last_kb: u64,
    /// Largest distance from the baseline, percent of the baseline.
    pub(crate) max_deviation_pct: f64,
    /// Least-squares slope after the warm-up.
    pub(crate) slope_kb_per_min: f64,
    pub(crate) within_10_pct: bool,
}

impl Memory {
    pub(crate) fn from_samples(
        clients: usize,
        soak_seconds: f64,
        warmup_seconds: f64,
        samples: Vec<(f64, u64)>,
    ) -> Option<Self> {
        let after: Vec<(f64, u64)> = samples.iter().copied().filter(|s| s.0 >= warmup_seconds).collect();
        let baseline_kb = after.first()?.1;
        let min_kb = after.iter().map(|s| s.1).min()?;
        let max_kb = after.iter().map(|s| s.1).max()?;
        let last_kb = after.last()?.1;
        let dev = |kb: u64| (kb as f64 - baseline_kb as f64).abs() / baseline_kb.max(1) as f64 * 100.0;
        let max_deviation_pct = after.iter().map(|s| dev(s.1)).fold(0.0, f64::max);
        let n = after.len() as f64;
        let mx = after.iter().map(|s| s.0).sum::<f64>() / n;
        let my = after.iter().map(|s| s.1 as f64).sum::<f64>() / n;
        let sxy: f64 = after.iter().map(|s| (s.0 - mx) * (s.1 as f64 - my)).sum();
        let sxx: f64 = after.iter().map(|s| (s.0 - mx).powi(2)).sum();
        let slope_kb_per_min = if sxx > 0.0 { sxy / sxx * 60.0 } else { 0.0 };
        Some(Memory {
            clients,
            soak_seconds,
            warmup_seconds,
            samples,
            baseline_kb,
            min_kb,
            max_kb,
            last_kb,
            max_deviation_pct,
            slope_kb_per_min,
            within_10_pct: max_deviation_pct <= 10.0,
        })
    }
}

/// vitals' memory while it holds many WithLock locks at once, on one backend.
#[derive(Debug, Clone, Serialize, Deserialize, Default)]
pub(crate) struct HeldLocks {
    /// `postgres` or `embedded` (the SQLite store).
    pub(crate) backend: String,
    /// 1 for the first round on a vitals process; later rounds run on the
    /// same process after the earlier ones released everything.
    #[serde(default)]
    pub(crate) round: usize,
    /// Streams opened, one distinct key each.
    pub(crate) requested: usize,
    /// Streams that received `acquired`.
    pub(crate) acquired: usize,
    /// Streams that did not, by status code.
    pub(crate) acquire_failures: BTreeMap<String, u64>,
    /// HTTP/2 connections the streams were spread over.
    pub(crate) connections: usize,
    /// Streams acquiring (and later releasing) at once, at most.
    pub(crate) acquire_concurrency: usize,
    /// keep_alive messages sent while the locks were held, and kept_alive
    /// replies received.
    pub(crate) keep_alives_sent: u64,
    pub(crate) keep_alives_acked: u64,
    /// Seconds from the first acquire to the release.
    pub(crate) held_for_s: f64,
    /// vitals' VmRSS (kB) before connecting, with the connections open, while
    /// every lock was held (the largest of the samples), after the release and
    /// after the connections were closed.
    pub(crate) rss_before_kb: u64,
    pub(crate) rss_connected_kb: u64,
    pub(crate) rss_held_kb: u64,
    pub(crate) rss_held_samples_kb: Vec<u64>,
    pub(crate) rss_released_kb: u64,
    pub(crate) rss_closed_kb: u64,
    /// (held - before) / acquired, bytes: connections included.
    pub(crate) per_lock_bytes: f64,
    /// (held - connected) / acquired, bytes: the streams alone.
    pub(crate) per_lock_stream_bytes: f64,
    /// (held - round 1's before) / acquired, bytes: what the locks cost once
    /// earlier rounds have come and gone (the allocator reuses freed memory
    /// but touches new pages of it), i.e. in a replica that has churned.
    #[serde(default)]
    pub(crate) per_lock_since_first_bytes: f64,
    /// Seconds from the first acquire sent to the last `acquired`, and the rate.
    pub(crate) acquire_s: f64,
    pub(crate) acquire_per_s: f64,
    /// Seconds from the release signal to the last `released`, and the rate.
    pub(crate) release_s: f64,
    pub(crate) released: usize,
    pub(crate) release_per_s: f64,
    /// Streams whose lock was lost or not released cleanly, by reason.
    pub(crate) release_failures: BTreeMap<String, u64>,
    /// PostgreSQL: backends with application_name `vitals-lock` while held.
    pub(crate) lock_backends: Option<i64>,
    /// PostgreSQL: granted client-key advisory locks while held.
    pub(crate) advisory_locks: Option<i64>,
}

/// The acceptance goal of RSS per held lock, bytes.
pub(crate) const HELD_LOCK_GOAL_BYTES: f64 = 4096.0;

/// SubmitRun/s at 32 clients before SubmitRun had one write path and kept
/// each check's run window (docs/PERFORMANCE.md): the figure the target
/// doubles.
const SUBMIT_BEFORE: f64 = 1831.0;

/// Throughput vitals may lose to its Prometheus metrics, percent.
const METRICS_COST_GOAL_PCT: f64 = 3.0;

/// Round trips of one request kind, from the counting proxy.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct RoundTripStat {
    pub(crate) kind: String,
    pub(crate) requests: usize,
    pub(crate) round_trips_mean: f64,
    pub(crate) round_trips_min: usize,
    pub(crate) round_trips_max: usize,
    pub(crate) statements_mean: f64,
    pub(crate) prepares_mean: f64,
    /// Mean time spent waiting for PostgreSQL (sum of the round trips as the
    /// proxy saw them), ms.
    pub(crate) database_ms_mean: f64,
    /// Mean round trips per pool (`vitals-lock`, `vitals-work`).
    pub(crate) by_pool: BTreeMap<String, f64>,
    /// Every round trip of one such request, in order: (pool, what).
    pub(crate) example: Vec<(String, String)>,
}

/// The machine and the software measured.
#[derive(Debug, Clone, Serialize, Deserialize, Default)]
pub(crate) struct Machine {
    pub(crate) cpu_model: String,
    pub(crate) cores: usize,
    pub(crate) memory_gib: f64,
    pub(crate) kernel: String,
    pub(crate) loadavg_start: String,
    pub(crate) loadavg_end: String,
    /// The busiest processes when the run started (other users' builds show
    /// up here).
    pub(crate) top_processes_start: String,
    pub(crate) postgres: String,
    pub(crate) postgres_settings: String,
    pub(crate) etcd: String,
    pub(crate) vitals_commit: String,
}

/// How the run was configured.
#[derive(Debug, Clone, Serialize, Deserialize, Default)]
pub(crate) struct Settings {
    pub(crate) duration_s: f64,
    pub(crate) warmup_s: f64,
    pub(crate) clients: Vec<usize>,
    pub(crate) connections: usize,
    pub(crate) client_threads: usize,
    pub(crate) soak_s: f64,
    pub(crate) soak_warmup_s: f64,
    pub(crate) soak_clients: usize,
    pub(crate) mixed_submit_percent: u32,
    pub(crate) lock_wait_s: u64,
    pub(crate) max_requests_per_cell: u64,
    /// Locks of the held-locks measurement (0: not run).
    #[serde(default)]
    pub(crate) hold_locks: usize,
    /// Rounds of the held-locks measurement per backend.
    #[serde(default)]
    pub(crate) hold_locks_rounds: usize,
}

/// Everything one run produced.
#[derive(Debug, Clone, Serialize, Deserialize, Default)]
pub(crate) struct Report {
    pub(crate) started_at: String,
    pub(crate) total_seconds: f64,
    pub(crate) machine: Machine,
    pub(crate) settings: Settings,
    pub(crate) cells: Vec<Cell>,
    pub(crate) ratios: Vec<Ratio>,
    pub(crate) targets: Vec<Target>,
    pub(crate) memory: Option<Memory>,
    pub(crate) round_trips: Vec<RoundTripStat>,
    /// RSS per held lock, one entry per backend.
    #[serde(default)]
    pub(crate) held_locks: Vec<HeldLocks>,
    pub(crate) pgbench_scripts: BTreeMap<String, String>,
    pub(crate) notes: Vec<String>,
}

impl Report {
    fn find(&self, workload: &str, system: &str, clients: usize) -> Option<&Cell> {
        self.cells
            .iter()
            .find(|c| c.workload == workload && c.system == system && c.clients == clients)
    }

    /// Fills `ratios` and `targets` from the cells.
    pub(crate) fn derive(&mut self) {
        let pairs = [
            ("lock-uncontended", "pgbench"),
            ("lock-uncontended", "etcd"),
            ("lock-uncontended", "etcd-lease-per-request"),
            ("lock-contended", "pgbench"),
            ("lock-contended", "etcd"),
            ("submit", "pgbench"),
            ("submit", "pgbench-minimal"),
        ];
        let mut ratios = Vec::new();
        for (workload, against) in pairs {
            for &clients in &self.settings.clients {
                if let (Some(v), Some(o)) = (
                    self.find(workload, "vitals", clients),
                    self.find(workload, against, clients),
                ) {
                    ratios.push(Ratio {
                        workload: workload.to_owned(),
                        clients,
                        against: against.to_owned(),
                        vitals_per_s: v.summary.throughput,
                        other_per_s: o.summary.throughput,
                        throughput_ratio: if o.summary.throughput > 0.0 {
                            v.summary.throughput / o.summary.throughput
                        } else {
                            0.0
                        },
                        vitals_p99_ms: v.summary.p99_ms,
                        other_p99_ms: o.summary.p99_ms,
                    });
                }
            }
        }
        self.ratios = ratios;

        let ratio = |w: &str, a: &str| {
            self.ratios
                .iter()
                .find(|r| r.workload == w && r.against == a && r.clients == 32)
        };
        let mut targets = Vec::new();
        let r = ratio("lock-uncontended", "pgbench");
        targets.push(Target {
            target: "lock uncontended vs pgbench `BEGIN; pg_advisory_xact_lock; COMMIT`, 32 clients".into(),
            goal: ">= 40 %".into(),
            measured: r.map_or("not measured".into(), |r| {
                format!(
                    "{:.0} % ({} vs {} /s)",
                    r.throughput_ratio * 100.0,
                    num(r.vitals_per_s),
                    num(r.other_per_s)
                )
            }),
            met: r.map(|r| r.throughput_ratio >= 0.40),
        });
        // Judged against the faster etcd variant: the stricter comparison.
        let etcd = [
            ratio("lock-uncontended", "etcd"),
            ratio("lock-uncontended", "etcd-lease-per-request"),
        ]
        .into_iter()
        .flatten()
        .min_by(|a, b| a.throughput_ratio.total_cmp(&b.throughput_ratio));
        targets.push(Target {
            target: "lock uncontended vs etcd Lock API, 32 clients (the faster etcd variant)".into(),
            goal: ">= 3x".into(),
            measured: etcd.map_or("not measured".into(), |r| {
                format!(
                    "{:.2}x ({} vs {} /s, {})",
                    r.throughput_ratio,
                    num(r.vitals_per_s),
                    num(r.other_per_s),
                    r.against
                )
            }),
            met: etcd.map(|r| r.throughput_ratio >= 3.0),
        });
        let r = ratio("submit", "pgbench");
        targets.push(Target {
            target: "submit vs pgbench of the same SQL work, 32 clients".into(),
            goal: ">= 60 %".into(),
            measured: r.map_or("not measured".into(), |r| {
                format!(
                    "{:.0} % ({} vs {} /s)",
                    r.throughput_ratio * 100.0,
                    num(r.vitals_per_s),
                    num(r.other_per_s)
                )
            }),
            met: r.map(|r| r.throughput_ratio >= 0.60),
        });
        let s = self.find("submit", "vitals", 32);
        targets.push(Target {
            target: format!(
                "submit, 32 clients, against {} /s before one write path (docs/PERFORMANCE.md)",
                num(SUBMIT_BEFORE)
            ),
            goal: format!(">= 2x ({} /s)", num(2.0 * SUBMIT_BEFORE)),
            measured: s.map_or("not measured".into(), |c| {
                format!(
                    "{:.2}x ({} /s)",
                    c.summary.throughput / SUBMIT_BEFORE,
                    num(c.summary.throughput)
                )
            }),
            met: s.map(|c| c.summary.throughput >= 2.0 * SUBMIT_BEFORE),
        });
        let r = ratio("submit", "pgbench-minimal");
        targets.push(Target {
            target: "submit vs pgbench of the minimal statement set (lock, insert the run, read the check's 100 \
                     newest statuses, upsert the system; one transaction), 32 clients"
                .into(),
            goal: ">= 50 %".into(),
            measured: r.map_or("not measured".into(), |r| {
                format!(
                    "{:.0} % ({} vs {} /s)",
                    r.throughput_ratio * 100.0,
                    num(r.vitals_per_s),
                    num(r.other_per_s)
                )
            }),
            met: r.map(|r| r.throughput_ratio >= 0.50),
        });
        let per_request_ms = |c: &Cell, cores: fn(&CpuUse) -> f64| {
            c.cpu
                .as_ref()
                .filter(|_| c.summary.throughput > 0.0)
                .map(|cpu| cores(cpu) / c.summary.throughput * 1000.0)
        };
        let pg_ms = s.and_then(|c| per_request_ms(c, |cpu| cpu.postgres));
        let vitals_ms = s.and_then(|c| per_request_ms(c, |cpu| cpu.vitals));
        targets.push(Target {
            target: "PostgreSQL CPU per SubmitRun, 32 clients".into(),
            goal: "<= 0.3 ms".into(),
            measured: pg_ms.map_or("not measured".into(), |ms| {
                format!(
                    "{ms:.3} ms (vitals {})",
                    vitals_ms.map_or("?".into(), |v| format!("{v:.3} ms"))
                )
            }),
            met: pg_ms.map(|ms| ms <= 0.3),
        });
        targets.push(Target {
            target: "submit p99, 32 clients".into(),
            goal: "< 20 ms".into(),
            measured: s.map_or("not measured".into(), |c| format!("{:.1} ms", c.summary.p99_ms)),
            met: s.map(|c| c.summary.p99_ms < 20.0),
        });
        let e = self.find("evaluate", "vitals", 32);
        targets.push(Target {
            target: "evaluate, 32 clients".into(),
            goal: ">= 30,000 req/s".into(),
            measured: e.map_or("not measured".into(), |c| {
                format!("{} req/s", num(c.summary.throughput))
            }),
            met: e.map(|c| c.summary.throughput >= 30_000.0),
        });
        for (workload, name) in [("submit", "submit"), ("lock-uncontended", "lock uncontended")] {
            targets.push(self.metrics_cost(workload, name));
        }
        let m = self.memory.as_ref();
        targets.push(Target {
            target: "vitals RSS flat during `mixed` after warm-up".into(),
            goal: "within 10 % over 5 min".into(),
            measured: m.map_or("not measured".into(), |m| {
                format!(
                    "max {:.1} % from {} MiB over {:.0} s{}",
                    m.max_deviation_pct,
                    m.baseline_kb / 1024,
                    m.soak_seconds - m.warmup_seconds,
                    if m.soak_seconds < 300.0 {
                        " (shorter soak than the 5 min of the target)"
                    } else {
                        ""
                    }
                )
            }),
            met: m.map(|m| m.within_10_pct),
        });
        let first_rounds: Vec<&HeldLocks> = self.held_locks.iter().filter(|h| h.round <= 1).collect();
        if first_rounds.is_empty() {
            targets.push(Target {
                target: "vitals RSS per held WithLock lock".into(),
                goal: "<= 4 KiB".into(),
                measured: "not measured".into(),
                met: None,
            });
        }
        for h in first_rounds {
            let rounds: Vec<&HeldLocks> = self.held_locks.iter().filter(|x| x.backend == h.backend).collect();
            let complete = rounds.iter().all(|x| x.acquired == x.requested && x.acquired > 0);
            let last = rounds.last().copied().unwrap_or(h);
            let worst = rounds
                .iter()
                .map(|x| x.per_lock_bytes.max(x.per_lock_since_first_bytes))
                .fold(h.per_lock_bytes, f64::max);
            let churned = if last.round > 1 {
                format!(
                    "; {:.2} KiB after {} rounds (RSS {} MiB)",
                    last.per_lock_since_first_bytes / 1024.0,
                    last.round,
                    last.rss_held_kb / 1024
                )
            } else {
                String::new()
            };
            targets.push(Target {
                target: format!("vitals RSS per held WithLock lock, {} backend", h.backend),
                goal: "<= 4 KiB".into(),
                measured: format!(
                    "{:.2} KiB on a fresh process ({} locks, RSS {} -> {} MiB){churned}{}",
                    h.per_lock_bytes / 1024.0,
                    num(h.acquired as f64),
                    h.rss_before_kb / 1024,
                    h.rss_held_kb / 1024,
                    if complete { "" } else { "; not every lock was acquired" }
                ),
                met: Some(complete && worst <= HELD_LOCK_GOAL_BYTES),
            });
        }
        self.targets = targets;
    }

    /// The metrics cost target of `workload`: the throughput the main
    /// vitals (metrics on) lost against the one with metrics off, from the
    /// means of the `vitals-metrics-on` and `vitals-metrics-off` cells (run
    /// off, on, on, off).
    fn metrics_cost(&self, workload: &str, name: &str) -> Target {
        let clients = self
            .cells
            .iter()
            .find(|c| c.workload == workload && c.system == "vitals-metrics-off")
            .map(|c| c.clients);
        let mean = |system: &str| {
            let rates: Vec<f64> = self
                .cells
                .iter()
                .filter(|c| c.workload == workload && c.system == system && Some(c.clients) == clients)
                .map(|c| c.summary.throughput)
                .collect();
            (!rates.is_empty()).then(|| rates.iter().sum::<f64>() / rates.len() as f64)
        };
        let pair = mean("vitals-metrics-on").zip(mean("vitals-metrics-off"));
        let loss = pair
            .filter(|(_, off)| *off > 0.0)
            .map(|(on, off)| (1.0 - on / off) * 100.0);
        Target {
            target: format!("metrics cost, {name}, {} clients", clients.unwrap_or(32)),
            goal: format!("<= {METRICS_COST_GOAL_PCT:.0} % throughput loss"),
            measured: match (pair, loss) {
                (Some((on, off)), Some(loss)) => format!(
                    "{loss:.1} % (on {} /s vs off {} /s, means of the cells run off, on, on, off)",
                    num(on),
                    num(off)
                ),
                _ => "not measured".into(),
            },
            met: loss.map(|l| l <= METRICS_COST_GOAL_PCT),
        }
    }
}

/// Writes results.md and summary.json into `out_dir`, and the plot and
/// (with `raw_json`) the whole report as results.json into `out_dir/raw`.
/// Returns what it wrote, relative to `out_dir`. A plot that cannot be drawn
/// (no font) is reported and skipped.
pub(crate) fn write(r: &Report, out_dir: &Path, raw_json: bool) -> Result<Vec<String>> {
    let raw = out_dir.join("raw");
    fs::create_dir_all(&raw).with_context(|| format!("creating {}", raw.display()))?;
    let mut written = Vec::new();
    let mut put = |name: &str, text: String| -> Result<()> {
        let path = out_dir.join(name);
        fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?;
        written.push(name.to_owned());
        Ok(())
    };
    put("results.md", markdown(r))?;
    put("summary.json", summary(r)?)?;
    if raw_json {
        put("raw/results.json", serde_json::to_string_pretty(r)?)?;
    }
    if !r.cells.is_empty() {
        match plot(r, &raw.join("throughput-p99.png")) {
            Ok(()) => written.push("raw/throughput-p99.png".to_owned()),
            Err(err) => eprintln!("vitals-bench: no plot: {err:#}"),
        }
    }
    Ok(written.iter().map(|w| format!("{}/{w}", out_dir.display())).collect())
}

/// A JSON object written one field per line, and a list one element per
/// line: small, and a new run's diff reads cell by cell.
struct Lines(String);

impl Lines {
    fn new() -> Self {
        Lines(String::from("{\n"))
    }

    fn field<T: Serialize + ?Sized>(&mut self, key: &str, value: &T) -> Result<()> {
        let _ = writeln!(self.0, "  {key:?}: {},", serde_json::to_string(value)?);
        Ok(())
    }

    fn list<T: Serialize>(&mut self, key: &str, items: impl IntoIterator<Item = T>) -> Result<()> {
        let items = items
            .into_iter()
            .map(|item| serde_json::to_string(&item).map(|json| format!("    {json}")))
            .collect::<Result<Vec<_>, _>>()?;
        if items.is_empty() {
            let _ = writeln!(self.0, "  {key:?}: [],");
        } else {
            let _ = writeln!(self.0, "  {key:?}: [\n{}\n  ],", items.join(",\n"));
        }
        Ok(())
    }

    fn finish(mut self) -> String {
        if self.0.ends_with(",\n") {
            self.0.truncate(self.0.len() - 2);
            self.0.push('\n');
        }
        self.0.push_str("}\n");
        self.0
    }
}

/// Rounded to `places` decimals, for a summary that diffs well.
fn round(x: f64, places: i32) -> f64 {
    let scale = 10f64.powi(places);
    (x * scale).round() / scale
}

fn is_zero(x: &f64) -> bool {
    *x == 0.0
}

/// A cell as the summary keeps it.
#[derive(Serialize)]
struct CellLine<'a> {
    workload: &'a str,
    system: &'a str,
    clients: usize,
    per_s: f64,
    p50_ms: f64,
    p99_ms: f64,
    max_ms: f64,
    codes: &'a BTreeMap<String, u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    cpu_cores: Option<CpuLine>,
    #[serde(skip_serializing_if = "Option::is_none")]
    transitions_share: Option<f64>,
}

/// Cores busy during a cell, those of 0.00 left out.
#[derive(Serialize)]
struct CpuLine {
    #[serde(skip_serializing_if = "is_zero")]
    client: f64,
    #[serde(skip_serializing_if = "is_zero")]
    vitals: f64,
    #[serde(skip_serializing_if = "is_zero")]
    postgres: f64,
    #[serde(skip_serializing_if = "is_zero")]
    etcd: f64,
    #[serde(skip_serializing_if = "is_zero")]
    pgbench: f64,
    other: f64,
}

impl<'a> From<&'a Cell> for CellLine<'a> {
    fn from(c: &'a Cell) -> Self {
        CellLine {
            workload: &c.workload,
            system: &c.system,
            clients: c.clients,
            per_s: round(c.summary.throughput, 0),
            p50_ms: round(c.summary.p50_ms, 3),
            p99_ms: round(c.summary.p99_ms, 3),
            max_ms: round(c.summary.max_ms, 1),
            codes: &c.summary.codes,
            cpu_cores: c.cpu.as_ref().map(|u| CpuLine {
                client: round(u.client, 2),
                vitals: round(u.vitals, 2),
                postgres: round(u.postgres, 2),
                etcd: round(u.etcd, 2),
                pgbench: round(u.pgbench, 2),
                other: round(u.other, 2),
            }),
            transitions_share: c.transitions_share.map(|t| round(t, 3)),
        }
    }
}

/// The memory soak without its samples.
#[derive(Serialize)]
struct MemoryLine {
    clients: usize,
    soak_seconds: f64,
    warmup_seconds: f64,
    baseline_kb: u64,
    min_kb: u64,
    max_kb: u64,
    last_kb: u64,
    max_deviation_pct: f64,
    slope_kb_per_min: f64,
    within_10_pct: bool,
}

/// One round of held locks, without the samples and failure details.
#[derive(Serialize)]
struct HeldLine<'a> {
    backend: &'a str,
    round: usize,
    requested: usize,
    acquired: usize,
    rss_before_kb: u64,
    rss_held_kb: u64,
    rss_released_kb: u64,
    per_lock_kib: f64,
    per_lock_since_first_kib: f64,
    acquire_per_s: f64,
    release_per_s: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    lock_backends: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    advisory_locks: Option<i64>,
}

/// Round trips of one kind of request, without the example.
#[derive(Serialize)]
struct RoundTripLine<'a> {
    kind: &'a str,
    requests: usize,
    mean: f64,
    min: usize,
    max: usize,
    by_pool: BTreeMap<&'a str, f64>,
}

/// vitals against a baseline, the ratio only.
#[derive(Serialize)]
struct RatioLine<'a> {
    workload: &'a str,
    clients: usize,
    against: &'a str,
    ratio: f64,
}

/// summary.json: the figures of a run, without what only explains them (RSS
/// samples, load averages, example round trips). results.md renders the
/// whole report; summary.json is what a program compares across runs.
pub(crate) fn summary(r: &Report) -> Result<String> {
    let m = &r.machine;
    let mut out = Lines::new();
    out.field("started_at", &r.started_at)?;
    out.field("total_seconds", &round(r.total_seconds, 0))?;
    out.field("vitals_commit", &m.vitals_commit)?;
    out.field(
        "machine",
        &format!(
            "{} ({} cores), {:.0} GiB, Linux {}",
            m.cpu_model, m.cores, m.memory_gib, m.kernel
        ),
    )?;
    out.field("postgres", &m.postgres)?;
    out.field("postgres_settings", &m.postgres_settings)?;
    out.field("etcd", &m.etcd)?;
    out.field("settings", &r.settings)?;
    out.list("targets", &r.targets)?;
    out.list(
        "ratios",
        r.ratios.iter().map(|x| RatioLine {
            workload: &x.workload,
            clients: x.clients,
            against: &x.against,
            ratio: round(x.throughput_ratio, 3),
        }),
    )?;
    out.list("cells", r.cells.iter().map(CellLine::from))?;
    out.field(
        "memory",
        &r.memory.as_ref().map(|m| MemoryLine {
            clients: m.clients,
            soak_seconds: m.soak_seconds,
            warmup_seconds: m.warmup_seconds,
            baseline_kb: m.baseline_kb,
            min_kb: m.min_kb,
            max_kb: m.max_kb,
            last_kb: m.last_kb,
            max_deviation_pct: round(m.max_deviation_pct, 2),
            slope_kb_per_min: round(m.slope_kb_per_min, 1),
            within_10_pct: m.within_10_pct,
        }),
    )?;
    out.list(
        "held_locks",
        r.held_locks.iter().map(|h| HeldLine {
            backend: &h.backend,
            round: h.round,
            requested: h.requested,
            acquired: h.acquired,
            rss_before_kb: h.rss_before_kb,
            rss_held_kb: h.rss_held_kb,
            rss_released_kb: h.rss_released_kb,
            per_lock_kib: round(h.per_lock_bytes / 1024.0, 2),
            per_lock_since_first_kib: round(h.per_lock_since_first_bytes / 1024.0, 2),
            acquire_per_s: round(h.acquire_per_s, 0),
            release_per_s: round(h.release_per_s, 0),
            lock_backends: h.lock_backends,
            advisory_locks: h.advisory_locks,
        }),
    )?;
    out.list(
        "round_trips",
        r.round_trips.iter().map(|t| RoundTripLine {
            kind: &t.kind,
            requests: t.requests,
            mean: round(t.round_trips_mean, 2),
            min: t.round_trips_min,
            max: t.round_trips_max,
            by_pool: t.by_pool.iter().map(|(k, v)| (k.as_str(), round(*v, 2))).collect(),
        }),
    )?;
    out.field("pgbench_scripts", &r.pgbench_scripts)?;
    Ok(out.finish())
}

/// 12345.6 -> "12,346".
pub(crate) fn num(x: f64) -> String {
    let n = x.round() as i64;
    let s = n.abs().to_string();
    let mut out = String::new();
    for (i, ch) in s.chars().enumerate() {
        if i > 0 && (s.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(ch);
    }
    if n < 0 { format!("-{out}") } else { out }
}

fn ms(x: f64) -> String {
    if x < 1.0 { format!("{x:.3}") } else { format!("{x:.1}") }
}

fn codes(c: &BTreeMap<String, u64>) -> String {
    c.iter()
        .map(|(k, v)| format!("{k} {}", num(*v as f64)))
        .collect::<Vec<_>>()
        .join(", ")
}

fn cpu(c: Option<&CpuUse>) -> String {
    let Some(c) = c else { return String::new() };
    let mut parts = Vec::new();
    for (name, v) in [
        ("client", c.client),
        ("vitals", c.vitals),
        ("pg", c.postgres),
        ("etcd", c.etcd),
        ("pgbench", c.pgbench),
    ] {
        if v >= 0.005 {
            parts.push(format!("{name} {v:.2}"));
        }
    }
    parts.push(format!("other {:.2}", c.other));
    parts.join(", ")
}

/// The Markdown page.
pub(crate) fn markdown(r: &Report) -> String {
    let mut md = String::new();
    let m = &r.machine;
    let s = &r.settings;
    let _ = writeln!(md, "# vitals benchmark: {}\n", r.started_at);
    let _ = writeln!(
        md,
        "Machine: {} ({} cores), {:.0} GiB, Linux {}. Load average at start {}, at end {}.  ",
        m.cpu_model, m.cores, m.memory_gib, m.kernel, m.loadavg_start, m.loadavg_end
    );
    let _ = writeln!(md, "PostgreSQL: {} ({}).  ", m.postgres, m.postgres_settings);
    let _ = writeln!(md, "etcd: {}. vitals: {}.  ", m.etcd, m.vitals_commit);
    let _ = writeln!(
        md,
        "Each cell: {:.0} s warm-up, {:.0} s measured, closed loop (each client sends its next request when the \
         previous one answered); {} client connections, {} client threads; clients {:?}. Whole run: {:.0} s.\n",
        s.warmup_s, s.duration_s, s.connections, s.client_threads, s.clients, r.total_seconds
    );
    for note in &r.notes {
        let _ = writeln!(md, "- {note}");
    }
    if !r.notes.is_empty() {
        md.push('\n');
    }

    let _ = writeln!(md, "## Targets\n");
    let _ = writeln!(md, "| target | goal | measured | met |\n|---|---|---|---|");
    for t in &r.targets {
        let met = match t.met {
            Some(true) => "yes",
            Some(false) => "**no**",
            None => "-",
        };
        let _ = writeln!(md, "| {} | {} | {} | {} |", t.target, t.goal, t.measured, met);
    }

    if !r.ratios.is_empty() {
        ratios_section(&mut md, r);
    }
    if !r.cells.is_empty() {
        cells_section(&mut md, r);
    }
    if let Some(mem) = &r.memory {
        memory_section(&mut md, mem);
    }
    if !r.held_locks.is_empty() {
        held_locks_section(&mut md, r);
    }
    if !r.round_trips.is_empty() {
        round_trips_section(&mut md, r);
    }
    md
}

fn ratios_section(md: &mut String, r: &Report) {
    let _ = writeln!(md, "\n## Ratios\n");
    let _ = writeln!(
        md,
        "| workload | clients | against | vitals /s | other /s | vitals / other | vitals p99 ms | other p99 ms |\n\
         |---|---:|---|---:|---:|---:|---:|---:|"
    );
    for x in &r.ratios {
        let _ = writeln!(
            md,
            "| {} | {} | {} | {} | {} | {:.2} | {} | {} |",
            x.workload,
            x.clients,
            x.against,
            num(x.vitals_per_s),
            num(x.other_per_s),
            x.throughput_ratio,
            ms(x.vitals_p99_ms),
            ms(x.other_p99_ms)
        );
    }
}

fn cells_section(md: &mut String, r: &Report) {
    let _ = writeln!(md, "\n## Throughput and latency\n");
    let _ = writeln!(
        md,
        "Latencies in ms. CPU: average cores busy during the measured window (2 = the whole machine); \
         `other` is busy time of processes outside the benchmark.\n"
    );
    let _ = writeln!(
        md,
        "| workload | system | clients | req/s | p50 | p90 | p99 | max | status codes | CPU (cores) |\n\
         |---|---|---:|---:|---:|---:|---:|---:|---|---|"
    );
    for c in &r.cells {
        let _ = writeln!(
            md,
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            c.workload,
            c.system,
            c.clients,
            num(c.summary.throughput),
            ms(c.summary.p50_ms),
            ms(c.summary.p90_ms),
            ms(c.summary.p99_ms),
            ms(c.summary.max_ms),
            codes(&c.summary.codes),
            cpu(c.cpu.as_ref())
        );
    }
    let shares: Vec<String> = r
        .cells
        .iter()
        .filter_map(|c| {
            c.transitions_share
                .map(|t| format!("{} {}: {:.0} %", c.workload, c.clients, t * 100.0))
        })
        .collect();
    if !shares.is_empty() {
        let _ = writeln!(
            md,
            "\nSubmitRun replies carrying a transition (the pgbench submit baseline inserts a transition in the same \
             share): {}.",
            shares.join("; ")
        );
    }
}

fn memory_section(md: &mut String, mem: &Memory) {
    let _ = writeln!(md, "\n## Memory: vitals RSS during `mixed`\n");
    let _ = writeln!(
        md,
        "{} clients for {:.0} s; the first {:.0} s are warm-up. After warm-up: baseline {} kB, min {} kB, max {} kB, \
         last {} kB; largest deviation {:.1} % ({}); trend {:+.0} kB/min.",
        mem.clients,
        mem.soak_seconds,
        mem.warmup_seconds,
        num(mem.baseline_kb as f64),
        num(mem.min_kb as f64),
        num(mem.max_kb as f64),
        num(mem.last_kb as f64),
        mem.max_deviation_pct,
        if mem.within_10_pct {
            "within 10 %"
        } else {
            "**more than 10 %**"
        },
        mem.slope_kb_per_min
    );
}

fn held_locks_section(md: &mut String, r: &Report) {
    let _ = writeln!(md, "\n## Held locks: vitals RSS per WithLock lock held\n");
    if let Some(h) = r.held_locks.first() {
        let _ = writeln!(
            md,
            "{} WithLock streams on distinct keys per backend, spread over {} HTTP/2 connections, at most {} acquiring \
             (later releasing) at once; every stream sends `keep_alive` at a third of the lease the server announced \
             (vitals' default lease, 30 s, unchanged), so none lapses. RSS is vitals' VmRSS from /proc/PID/status \
             (the vitals process, not the load generator), the largest of 5 samples 300 ms apart after a 0.5 s \
             settle. Per lock = (held - before) / locks held, the connections' share included; streams only = \
             (held - connected) / locks held. `postgres` is the vitals the other workloads ran against (after them, \
             when they ran); `embedded` is a fresh vitals on `sqlite://WORK_DIR/embedded/vitals.db`. {}\n",
            num(h.requested as f64),
            num(h.connections as f64),
            h.acquire_concurrency,
            if r.settings.hold_locks_rounds > 1 {
                format!(
                    "Each backend ran {} rounds on the same process. Round 1 is the cost on a fresh process. A later \
                     round starts from what the earlier ones left: its own growth shrinks round by round (the \
                     allocator reuses the memory freed at release but touches pages of it the first round left \
                     untouched), and `per lock since round 1` = (held - round 1's before) / locks held is what the \
                     locks cost in a replica that has churned; the target is judged on the larger figure. Growth \
                     that stayed constant round after round would be a leak.",
                    r.settings.hold_locks_rounds
                )
            } else {
                String::new()
            }
        );
    }
    let mib = |kb: u64| format!("{:.1}", kb as f64 / 1024.0);
    let _ = writeln!(
        md,
        "| backend | round | locks held | RSS before MiB | connected MiB | held MiB | per lock KiB | streams only KiB | \
         per lock since round 1 KiB | \
         acquire all | release all | after release MiB (returned) | connections closed MiB | PostgreSQL while held |\n\
         |---|---:|---:|---:|---:|---:|---:|---:|---:|---|---|---|---:|---|"
    );
    for h in &r.held_locks {
        let grown = h.rss_held_kb as f64 - h.rss_before_kb as f64;
        let returned = if grown > 0.0 {
            let pct = (h.rss_held_kb as f64 - h.rss_released_kb as f64) / grown * 100.0;
            if pct >= 0.5 {
                format!(" ({pct:.0} %)")
            } else {
                " (none)".to_owned()
            }
        } else {
            String::new()
        };
        let postgres = match (h.lock_backends, h.advisory_locks) {
            (Some(s), Some(l)) => format!("{s} `vitals-lock` backends, {} client advisory locks", num(l as f64)),
            (Some(s), None) => format!("{s} `vitals-lock` backends"),
            _ => "-".into(),
        };
        let _ = writeln!(
            md,
            "| {} | {} | {} of {} | {} | {} | {} | {:.2} | {:.2} | {:.2} | {:.2} s ({} /s) | {:.2} s ({} /s) | {}{} | {} | {} |",
            h.backend,
            h.round.max(1),
            num(h.acquired as f64),
            num(h.requested as f64),
            mib(h.rss_before_kb),
            mib(h.rss_connected_kb),
            mib(h.rss_held_kb),
            h.per_lock_bytes / 1024.0,
            h.per_lock_stream_bytes / 1024.0,
            h.per_lock_since_first_bytes / 1024.0,
            h.acquire_s,
            num(h.acquire_per_s),
            h.release_s,
            num(h.release_per_s),
            mib(h.rss_released_kb),
            returned,
            mib(h.rss_closed_kb),
            postgres
        );
    }
    for h in &r.held_locks {
        let _ = writeln!(
            md,
            "\n{} round {}: held for {:.1} s; {} keep_alive sent, {} kept_alive received; {} released.{}{}",
            h.backend,
            h.round.max(1),
            h.held_for_s,
            num(h.keep_alives_sent as f64),
            num(h.keep_alives_acked as f64),
            num(h.released as f64),
            if h.acquire_failures.is_empty() {
                String::new()
            } else {
                format!(" Not acquired: {}.", codes(&h.acquire_failures))
            },
            if h.release_failures.is_empty() {
                String::new()
            } else {
                format!(" Lost or not released cleanly: {}.", codes(&h.release_failures))
            }
        );
    }
}

fn round_trips_section(md: &mut String, r: &Report) {
    let _ = writeln!(md, "\n## Round trips to PostgreSQL per request\n");
    let _ = writeln!(
        md,
        "Counted by a wire-protocol proxy between a second vitals process and PostgreSQL (one `ReadyForQuery` = \
         one round trip), sequential requests after warm-up.\n"
    );
    let _ = writeln!(
        md,
        "| request | n | round trips (mean, min-max) | by pool | statements | prepares | ms waiting for PostgreSQL |\n\
         |---|---:|---|---|---:|---:|---:|"
    );
    for t in &r.round_trips {
        let pools = t
            .by_pool
            .iter()
            .map(|(k, v)| format!("{k} {v:.1}"))
            .collect::<Vec<_>>()
            .join(", ");
        let _ = writeln!(
            md,
            "| {} | {} | {:.1} ({}-{}) | {} | {:.1} | {:.2} | {:.2} |",
            t.kind,
            t.requests,
            t.round_trips_mean,
            t.round_trips_min,
            t.round_trips_max,
            pools,
            t.statements_mean,
            t.prepares_mean,
            t.database_ms_mean
        );
    }
    for t in &r.round_trips {
        if t.example.is_empty() {
            continue;
        }
        let _ = writeln!(md, "\n{} ({} round trips):\n", t.kind, t.example.len());
        for (i, (pool, what)) in t.example.iter().enumerate() {
            let _ = writeln!(md, "{}. `{pool}`: {}", i + 1, what.replace('|', "\\|"));
        }
    }
}

// ---------------------------------------------------------------------- plot

fn register_font() -> Result<()> {
    let mut candidates = Vec::new();
    if let Ok(out) = std::process::Command::new("fc-match")
        .args(["-f", "%{file}", "sans-serif"])
        .output()
    {
        candidates.push(String::from_utf8_lossy(&out.stdout).into_owned());
    }
    candidates.extend(
        [
            "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
            "/usr/share/fonts/truetype/liberation/LiberationSans-Regular.ttf",
            "/usr/share/fonts/TTF/DejaVuSans.ttf",
        ]
        .map(String::from),
    );
    for path in candidates {
        if let Ok(bytes) = fs::read(path.trim()) {
            let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
            if plotters::style::register_font("sans-serif", FontStyle::Normal, bytes).is_ok() {
                return Ok(());
            }
        }
    }
    Err(anyhow!(
        "no TrueType font found for the plot's labels (apt-get install fonts-dejavu-core)"
    ))
}

/// The plotted series: (label, workload, system, colour).
const SERIES: [(&str, &str, &str, RGBColor); 11] = [
    ("vitals evaluate", "evaluate", "vitals", RGBColor(0, 0, 0)),
    ("vitals submit", "submit", "vitals", RGBColor(31, 119, 180)),
    ("pgbench submit", "submit", "pgbench", RGBColor(140, 190, 230)),
    (
        "pgbench submit, minimal",
        "submit",
        "pgbench-minimal",
        RGBColor(23, 190, 207),
    ),
    ("vitals lock", "lock-uncontended", "vitals", RGBColor(214, 39, 40)),
    ("pgbench lock", "lock-uncontended", "pgbench", RGBColor(255, 152, 150)),
    ("etcd lock", "lock-uncontended", "etcd", RGBColor(44, 160, 44)),
    (
        "vitals lock, one key",
        "lock-contended",
        "vitals",
        RGBColor(148, 103, 189),
    ),
    (
        "pgbench lock, one key",
        "lock-contended",
        "pgbench",
        RGBColor(197, 176, 213),
    ),
    ("etcd lock, one key", "lock-contended", "etcd", RGBColor(152, 223, 138)),
    ("vitals mixed", "mixed", "vitals", RGBColor(255, 127, 14)),
];

/// Throughput and p99 against clients, one PNG with two panels.
pub(crate) fn plot(r: &Report, path: &Path) -> Result<()> {
    register_font()?;
    let root = BitMapBackend::new(path, (1500, 620)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| anyhow!("{e}"))?;
    let (left, right) = root.split_horizontally(750);
    panel(r, &left, "Throughput (requests/s, log scale)", |c| c.summary.throughput)?;
    panel(r, &right, "p99 latency (ms, log scale)", |c| c.summary.p99_ms)?;
    root.present()
        .map_err(|e| anyhow!("{e}"))
        .with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}

/// One plotted line: label, colour, (log2 clients, value) points.
type Line<'a> = (&'a str, RGBColor, Vec<(f64, f64)>);

fn panel(
    r: &Report,
    area: &DrawingArea<BitMapBackend<'_>, plotters::coord::Shift>,
    title: &str,
    value: fn(&Cell) -> f64,
) -> Result<()> {
    let mut lines: Vec<Line<'_>> = Vec::new();
    for (label, workload, system, colour) in SERIES {
        let mut points: Vec<(f64, f64)> = r
            .cells
            .iter()
            .filter(|c| c.workload == workload && c.system == system && c.summary.requests > 0)
            .map(|c| ((c.clients as f64).log2(), value(c)))
            .filter(|p| p.1 > 0.0)
            .collect();
        points.sort_by(|a, b| a.0.total_cmp(&b.0));
        if !points.is_empty() {
            lines.push((label, colour, points));
        }
    }
    let ys = lines.iter().flat_map(|l| l.2.iter().map(|p| p.1));
    let (lo, hi) = ys.fold((f64::MAX, f64::MIN), |(lo, hi), y| (lo.min(y), hi.max(y)));
    // Room below the lowest line for the legend.
    let (lo, hi) = if lo <= hi { (lo / 8.0, hi * 1.5) } else { (0.1, 10.0) };
    let max_x = r.settings.clients.iter().copied().max().unwrap_or(64).max(2) as f64;
    let err = |e: DrawingAreaErrorKind<_>| anyhow!("plot: {e}");
    let mut chart = ChartBuilder::on(area)
        .caption(title, ("sans-serif", 22))
        .margin(14)
        .x_label_area_size(40)
        .y_label_area_size(70)
        .build_cartesian_2d(-0.3f64..max_x.log2() + 0.3, (lo..hi).log_scale())
        .map_err(err)?;
    chart
        .configure_mesh()
        .x_desc("clients (log scale)")
        .x_labels(8)
        .x_label_formatter(&|x| {
            let c = 2f64.powf(x.round());
            if (x - x.round()).abs() < 0.05 {
                format!("{c:.0}")
            } else {
                String::new()
            }
        })
        .y_label_formatter(&|y| {
            if *y >= 1000.0 {
                format!("{:.0}k", y / 1000.0)
            } else if *y >= 1.0 {
                format!("{y:.0}")
            } else {
                format!("{y:.2}")
            }
        })
        .label_style(("sans-serif", 14))
        .draw()
        .map_err(err)?;
    for (label, colour, points) in lines {
        let style = colour.stroke_width(2);
        chart
            .draw_series(LineSeries::new(points.clone(), style))
            .map_err(err)?
            .label(label)
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], colour.stroke_width(3)));
        chart
            .draw_series(points.into_iter().map(|p| Circle::new(p, 4, colour.filled())))
            .map_err(err)?;
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .label_font(("sans-serif", 13))
        .position(SeriesLabelPosition::LowerRight)
        .draw()
        .map_err(err)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cell(workload: &str, system: &str, clients: usize, throughput: f64) -> Cell {
        Cell {
            workload: workload.into(),
            system: system.into(),
            clients,
            summary: Summary {
                throughput,
                ..Summary::default()
            },
            cpu: None,
            vitals_rss_kb: None,
            loadavg: String::new(),
            transitions_share: None,
        }
    }

    #[test]
    fn the_metrics_cost_compares_the_means_of_the_on_and_off_cells() {
        let mut r = Report {
            cells: vec![
                cell("submit", "vitals", 32, 5_000.0),
                cell("submit", "vitals-metrics-off", 32, 2_100.0),
                cell("submit", "vitals-metrics-on", 32, 2_000.0),
                cell("submit", "vitals-metrics-on", 32, 1_900.0),
                cell("submit", "vitals-metrics-off", 32, 1_900.0),
                cell("lock-uncontended", "vitals-metrics-off", 8, 10_000.0),
                cell("lock-uncontended", "vitals-metrics-on", 8, 9_000.0),
            ],
            ..Report::default()
        };
        r.derive();
        let target = |name: &str| r.targets.iter().find(|t| t.target.starts_with(name)).unwrap();
        let submit = target("metrics cost, submit,");
        assert_eq!(submit.target, "metrics cost, submit, 32 clients");
        assert_eq!(submit.goal, "<= 3 % throughput loss");
        assert_eq!(
            submit.measured,
            "2.5 % (on 1,950 /s vs off 2,000 /s, means of the cells run off, on, on, off)"
        );
        assert_eq!(submit.met, Some(true));
        let lock = target("metrics cost, lock uncontended,");
        assert_eq!(lock.target, "metrics cost, lock uncontended, 8 clients");
        assert_eq!(
            lock.measured,
            "10.0 % (on 9,000 /s vs off 10,000 /s, means of the cells run off, on, on, off)"
        );
        assert_eq!(lock.met, Some(false));
        r.cells.truncate(1);
        r.derive();
        let submit = r
            .targets
            .iter()
            .find(|t| t.target.starts_with("metrics cost, submit"))
            .unwrap();
        assert_eq!(
            (submit.target.as_str(), submit.measured.as_str(), submit.met),
            ("metrics cost, submit, 32 clients", "not measured", None)
        );
    }

    #[test]
    fn the_summary_keeps_the_figures_and_leaves_out_the_samples() {
        let samples = (0..60u32).map(|s| (f64::from(s), 13_000 + u64::from(s))).collect();
        let mut r = Report {
            memory: Memory::from_samples(32, 60.0, 15.0, samples),
            ..Report::default()
        };
        r.cells.push(Cell {
            workload: "submit".into(),
            system: "vitals".into(),
            clients: 32,
            summary: Summary {
                requests: 13_154,
                seconds: 7.0,
                throughput: 1_879.14,
                p50_ms: 14.1234,
                p90_ms: 30.8,
                p99_ms: 51.3,
                max_ms: 77.54,
                codes: BTreeMap::from([("OK".to_owned(), 13_154)]),
            },
            cpu: Some(CpuUse {
                vitals: 0.523,
                ..CpuUse::default()
            }),
            vitals_rss_kb: Some(13_000),
            loadavg: "1.00 1.00 1.00".into(),
            transitions_share: Some(0.1412),
        });
        let text = summary(&r).unwrap();
        let s: serde_json::Value = serde_json::from_str(&text).unwrap();
        let cell = &s["cells"][0];
        assert_eq!(cell["per_s"], 1_879.0);
        assert_eq!(cell["p50_ms"], 14.123);
        assert_eq!(cell["codes"]["OK"], 13_154);
        assert_eq!(cell["cpu_cores"]["vitals"], 0.52);
        assert!(cell["cpu_cores"].get("etcd").is_none());
        assert_eq!(cell["transitions_share"], 0.141);
        assert!(cell.get("loadavg").is_none());
        assert_eq!(s["memory"]["baseline_kb"], 13_015);
        assert!(s["memory"].get("samples").is_none());
        // One cell per line, in the order of the fields.
        assert!(
            text.lines()
                .any(|l| l.starts_with(r#"    {"workload":"submit","system":"vitals","clients":32,"#)),
            "{text}"
        );
    }
}
