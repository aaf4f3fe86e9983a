//! The baseline: pgbench running the SQL that vitals runs, directly against
//! the same database at the same concurrency.
//!
//! Latencies come from pgbench's per-transaction log (`-l`), so the baseline
//! gets the same percentiles and the same warm-up cut as the vitals cells.

use std::{
    collections::BTreeMap,
    fs,
    path::{Path, PathBuf},
    process::Stdio,
    time::Duration,
};

use anyhow::{Context, Result};

use crate::{
    load::{Summary, summarise},
    services::{CpuTargets, CpuUse, cpu_window},
    workloads::{CHECKS_PER_SYSTEM, SYSTEMS},
};

/// pgbench turns every `:name` in a script into a parameter, even inside a
/// string literal, so literals with a colon (lock keys, encoded thresholds)
/// are passed as `-D` variables and bound as parameters, as vitals binds them.
const DEFINES: [(&str, &str); 6] = [
    ("lockprefix", "lock:bench-"),
    ("lockone", "lock:bench-contended"),
    ("healthprefix", "health:bench-sys-"),
    ("thresholds", "c:1:2:5"),
    ("evaluation", "3:2:100:5:0:0|c:1:2:5"),
    ("seqlock", "vitals:transition-sequence"),
];

/// `BEGIN; pg_advisory_xact_lock(random key); COMMIT`: what WithLock costs
/// PostgreSQL when nothing else is in the way. Same key space and hashing as
/// vitals (`lock:` prefix, `hashtextextended(key, 0)`).
const LOCK_RANDOM: &str = r"\set k random(1, 1000000000000)
BEGIN;
SELECT pg_advisory_xact_lock(hashtextextended(:lockprefix::text || :k::text, 0));
COMMIT;
";

/// The same on one key.
const LOCK_ONE: &str = r"BEGIN;
SELECT pg_advisory_xact_lock(hashtextextended(:lockone::text, 0));
COMMIT;
";

/// SubmitRun's SQL work, statement for statement as `PgStore::submit_run`
/// and `reevaluate` send it: the run insert with the system row lock, the
/// check upsert with the system's checks and the check's newest 100 runs, the
/// check update with the system upsert (and the transition-sequence lock when
/// the status changed), under the system's `pg_advisory_xact_lock`, on one
/// connection. The transition insert (after the transition-sequence lock)
/// runs in the same share of transactions as it did in vitals' own run at
/// this concurrency (`-D tpm`, per 10,000).
fn submit() -> String {
    let systems = SYSTEMS - 1;
    let checks = CHECKS_PER_SYSTEM - 1;
    let sys = "'bench-sys-' || :s::text";
    let chk = "'check-' || :c::text";
    let cols = "check_id, thresholds, enabled, status, evaluation, runs_considered, last_run_at";
    format!(
        r"\set s random(0, {systems})
\set c random(0, {checks})
\set st random(1, 3)
\set t random(1, 10000)
BEGIN;
SELECT pg_advisory_xact_lock(hashtextextended(:healthprefix::text || :s::text, 0));
WITH inserted AS (INSERT INTO runs (run_id, system_id, check_id, status, observed_at, latency_us, message) VALUES (gen_random_uuid()::text, {sys}, {chk}, :st, now(), 250000, '') ON CONFLICT (run_id) DO NOTHING RETURNING recorded_at), locked AS (SELECT status FROM systems WHERE system_id = {sys} FOR UPDATE) SELECT (SELECT recorded_at FROM inserted) AS recorded_at, (SELECT status FROM locked) AS previous;
WITH created AS (INSERT INTO checks (system_id, check_id, thresholds) VALUES ({sys}, {chk}, :thresholds) ON CONFLICT (system_id, check_id) DO NOTHING RETURNING {cols}), target AS (SELECT {cols} FROM created UNION ALL SELECT {cols} FROM checks WHERE system_id = {sys} AND check_id = {chk} LIMIT 1), recent AS (SELECT status, observed_at, run_id FROM runs WHERE system_id = {sys} AND check_id = {chk} ORDER BY observed_at DESC, run_id DESC LIMIT 100) SELECT {cols}, true AS target, (SELECT array_agg(status ORDER BY observed_at DESC, run_id DESC) FROM recent) AS recent_statuses, (SELECT max(observed_at) FROM recent) AS recent_last FROM target UNION ALL SELECT {cols}, false, NULL, NULL FROM checks WHERE system_id = {sys} AND check_id <> {chk} ORDER BY check_id;
WITH updated AS (UPDATE checks SET status = :st, evaluation = :evaluation, runs_considered = 100, last_run_at = now(), updated_at = now() WHERE system_id = {sys} AND check_id = {chk}), upserted AS (INSERT INTO systems (system_id, status, evaluated_at) VALUES ({sys}, :st, now()) ON CONFLICT (system_id) DO UPDATE SET status = excluded.status, evaluated_at = excluded.evaluated_at RETURNING evaluated_at) SELECT evaluated_at, (SELECT count(*) FROM (SELECT pg_advisory_xact_lock(hashtextextended(:seqlock::text, 0)) WHERE :t::int <= :tpm::int) l) AS sequence_locked FROM upserted;
\if :t <= :tpm
WITH t AS (INSERT INTO transitions (sequence, system_id, check_id, from_status, to_status, evaluation, run_id) SELECT coalesce(max(sequence), 0) + 1, {sys}, {chk}, 1, :st, :evaluation, gen_random_uuid()::text FROM transitions RETURNING sequence, system_id, check_id, from_status, to_status, transitioned_at, evaluation) SELECT t.*, pg_notify('vitals_transitions', t.sequence::text) FROM t;
\endif
COMMIT;
"
    )
}

/// Which baseline script.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Script {
    LockRandom,
    LockOne,
    /// With the share of transactions (per 10,000) that insert a transition.
    Submit {
        transitions_per_10k: u32,
    },
}

impl Script {
    fn name(self) -> &'static str {
        match self {
            Script::LockRandom => "lock-random",
            Script::LockOne => "lock-one",
            Script::Submit { .. } => "submit",
        }
    }

    fn text(self) -> String {
        match self {
            Script::LockRandom => LOCK_RANDOM.to_owned(),
            Script::LockOne => LOCK_ONE.to_owned(),
            Script::Submit { .. } => submit(),
        }
    }

    /// The script and its `-D` variables, for the report.
    pub(crate) fn source(self) -> String {
        let defines: Vec<String> = DEFINES.iter().map(|(k, v)| format!("-D {k}='{v}'")).collect();
        format!("{}\n(pgbench {})", self.text(), defines.join(" "))
    }
}

/// A pgbench run's result.
pub(crate) struct PgbenchResult {
    pub(crate) summary: Summary,
    pub(crate) cpu: CpuUse,
    /// pgbench's own tps line (including the warm-up), for cross-checking.
    pub(crate) reported_tps: Option<f64>,
}

/// Runs pgbench.
pub(crate) struct Pgbench {
    pub(crate) bin: PathBuf,
    pub(crate) url: String,
    pub(crate) dir: PathBuf,
}

impl Pgbench {
    /// `clients` connections for `warmup + duration`, prepared statements,
    /// two threads (the machine's cores) at most.
    pub(crate) async fn run(
        &self,
        script: Script,
        clients: usize,
        warmup: Duration,
        duration: Duration,
        cpu: CpuTargets,
    ) -> Result<PgbenchResult> {
        fs::create_dir_all(&self.dir)?;
        let script_path = self.dir.join(format!("{}.sql", script.name()));
        fs::write(&script_path, script.text())?;
        let prefix = format!("log-{}-{clients}", script.name());
        for old in log_files(&self.dir, &prefix) {
            let _ = fs::remove_file(old);
        }
        // Two extra seconds cover connection set-up and keep the CPU window
        // inside the run; the latency window is cut from the log.
        let seconds = (warmup + duration).as_secs_f64().ceil() as u64 + 2;
        let threads = clients.clamp(1, 2);
        let mut cmd = tokio::process::Command::new(&self.bin);
        cmd.current_dir(&self.dir)
            .args(["-n", "-M", "prepared", "-l", "--log-prefix", &prefix])
            .args(["-c", &clients.to_string(), "-j", &threads.to_string()])
            .args(["-T", &seconds.to_string()])
            .arg("-f")
            .arg(&script_path);
        for (name, value) in DEFINES {
            cmd.args(["-D", &format!("{name}={value}")]);
        }
        if let Script::Submit { transitions_per_10k } = script {
            cmd.args(["-D", &format!("tpm={transitions_per_10k}")]);
        }
        cmd.arg(&self.url)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        let child = cmd.spawn().context("starting pgbench")?;
        let cpu = cpu_window(
            CpuTargets {
                pgbench: child.id(),
                ..cpu
            },
            warmup + Duration::from_millis(300),
            duration,
        );
        let out = child.wait_with_output().await.context("waiting for pgbench")?;
        let cpu = cpu.await.unwrap_or_default();
        let stdout = String::from_utf8_lossy(&out.stdout);
        let stderr = String::from_utf8_lossy(&out.stderr);
        let reported_tps = stdout
            .lines()
            .find(|l| l.starts_with("tps = "))
            .and_then(|l| l.trim_start_matches("tps = ").split_whitespace().next()?.parse().ok());

        let mut completions = Vec::new();
        let mut codes = BTreeMap::<String, u64>::new();
        for file in log_files(&self.dir, &prefix) {
            let text = fs::read_to_string(&file).with_context(|| format!("reading {}", file.display()))?;
            for line in text.lines() {
                // client_id transaction_no time script_no time_epoch time_us [...]
                let f: Vec<&str> = line.split_whitespace().collect();
                if f.len() < 6 {
                    continue;
                }
                let (Ok(epoch), Ok(us)) = (f[4].parse::<u64>(), f[5].parse::<u64>()) else {
                    continue;
                };
                let at_us = epoch * 1_000_000 + us;
                match f[2].parse::<u64>() {
                    Ok(latency_us) => completions.push((at_us, Some(latency_us))),
                    Err(_) => completions.push((at_us, None)),
                }
            }
            let _ = fs::remove_file(&file);
        }
        let first = completions.iter().map(|c| c.0).min().unwrap_or(0);
        let from = first + u64::try_from(warmup.as_micros()).unwrap_or(0);
        let to = from + u64::try_from(duration.as_micros()).unwrap_or(0);
        let mut latencies_ns = Vec::new();
        let mut last = 0;
        for (at, latency) in completions {
            if at < from || at > to {
                continue;
            }
            last = last.max(at);
            match latency {
                Some(us) => {
                    latencies_ns.push(us * 1_000);
                    *codes.entry("OK".to_owned()).or_default() += 1;
                }
                None => *codes.entry("FAILED".to_owned()).or_default() += 1,
            }
        }
        if !out.status.success() {
            let aborted = stdout
                .lines()
                .chain(stderr.lines())
                .filter(|l| l.contains("aborted") || l.contains("ERROR") || l.contains("FATAL"))
                .take(3)
                .collect::<Vec<_>>()
                .join(" | ");
            eprintln!(
                "vitals-bench: pgbench {} -c {clients} exited with {}: {aborted}",
                script.name(),
                out.status
            );
            *codes.entry("PGBENCH_ABORTED_CLIENTS".to_owned()).or_default() += 1;
        }
        let mut window = duration;
        if last > 0 && last < to && to - last > 500_000 {
            // pgbench ended early (aborted clients): measure what it ran.
            window = Duration::from_micros(last - from);
        }
        Ok(PgbenchResult {
            summary: summarise(latencies_ns, codes, window),
            cpu,
            reported_tps,
        })
    }
}

fn log_files(dir: &Path, prefix: &str) -> Vec<PathBuf> {
    let wanted = format!("{prefix}.");
    fs::read_dir(dir)
        .map(|d| {
            d.filter_map(|e| e.ok())
                .filter(|e| e.file_name().to_string_lossy().starts_with(&wanted))
                .map(|e| e.path())
                .collect()
        })
        .unwrap_or_default()
}
