//! The baselines: pgbench running the SQL that vitals runs, and the minimal
//! statement set of SubmitRun's durable work, directly against the same
//! database at the same concurrency.
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

use anyhow::{Context, Result, bail};
use vitals::{
    domain::MAX_RUNS_CONSIDERED,
    lock::id::{CLIENT_KEY_PREFIX, SYSTEM_SPACE},
    store::postgres::sql::{LOAD_SYSTEM, WRITE_SYSTEM},
};

use crate::{
    load::{Summary, summarise},
    services::{CpuTargets, CpuUse, cpu_window},
    workloads::{CHECKS_PER_SYSTEM, CONTENDED_KEY, SYSTEMS},
};

/// pgbench turns every `:name` in a script into a parameter, even inside a
/// string literal, so literals with a colon (lock keys, encoded thresholds)
/// are passed as `-D` variables and bound as parameters, as vitals binds them.
fn defines() -> Vec<(&'static str, String)> {
    vec![
        ("lockprefix", format!("{CLIENT_KEY_PREFIX}bench-")),
        ("lockone", format!("{CLIENT_KEY_PREFIX}{CONTENDED_KEY}")),
        // Thresholds::default() and an evaluation of it, as the store encodes them.
        ("thresholds", "c:1:2:5".to_owned()),
        ("evaluation", "3:2:100:5:0:0|c:1:2:5".to_owned()),
        ("window", full_window()),
    ]
}

/// A full run window as the store encodes it (`src/store/codec.rs`): the
/// newest 100 runs, newest first, each `<observed_at µs>\x1f<status>\x1f<run
/// id>`, joined by `\x1e`, with run ids as long as the generated ones
/// (UUIDs). It is what every baseline write stores for its check: the bytes
/// vitals writes, and a window vitals reads back when it runs on the same
/// database afterwards (its times are in the past, so new runs go first).
fn full_window() -> String {
    const NEWEST_US: i64 = 1_767_225_600_000_000; // 2026-01-01T00:00:00Z
    (0..i64::try_from(MAX_RUNS_CONSIDERED).unwrap_or(100))
        .map(|i| {
            format!(
                "{}\u{1f}{}\u{1f}00000000-0000-7000-8000-{:012}",
                NEWEST_US - i * 5_000_000,
                1 + i % 3,
                99 - i
            )
        })
        .collect::<Vec<_>>()
        .join("\u{1e}")
}

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

/// `sql` with every `$n` replaced by `args[n - 1]`, ended with `;`: the
/// store numbers its parameters, a pgbench script names variables (`:name`,
/// which pgbench binds as parameters with `-M prepared`) or computes values
/// in SQL. An argument other than a lone `:name` or number is put in
/// parentheses, so that it stays one operand wherever the parameter stood.
/// Quoted literals are left alone. Fails when a `$n` has no argument or an
/// argument is never used: either means the store's statement changed.
pub(crate) fn pgbench_sql(sql: &str, args: &[&str]) -> Result<String> {
    let word = |w: &str| !w.is_empty() && w.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
    let simple = |a: &str| a.strip_prefix(':').is_some_and(word) || (word(a) && a.chars().all(|c| c.is_ascii_digit()));
    let mut used = vec![false; args.len()];
    let mut out = String::with_capacity(sql.len() + 64);
    let mut chars = sql.chars().peekable();
    let mut quoted = false;
    while let Some(c) = chars.next() {
        if c == '\'' {
            quoted = !quoted;
        }
        if c != '$' || quoted {
            out.push(c);
            continue;
        }
        let mut digits = String::new();
        while let Some(&d) = chars.peek() {
            if !d.is_ascii_digit() {
                break;
            }
            digits.push(d);
            chars.next();
        }
        let n: usize = digits
            .parse()
            .with_context(|| format!("a `$` not followed by a parameter number in {sql:?}"))?;
        let arg = n
            .checked_sub(1)
            .and_then(|i| args.get(i))
            .with_context(|| format!("${n} has no pgbench argument ({} given) in {sql:?}", args.len()))?;
        used[n - 1] = true;
        if simple(arg) {
            out.push_str(arg);
        } else {
            out.push('(');
            out.push_str(arg);
            out.push(')');
        }
    }
    if let Some(unused) = used.iter().position(|u| !u) {
        bail!(
            "pgbench argument {} ({:?}) matches no parameter of {sql:?}",
            unused + 1,
            args[unused]
        );
    }
    out.push(';');
    Ok(out)
}

/// The system and check of a baseline transaction, as SQL expressions.
const SYSTEM: &str = "'bench-sys-' || :s::text";
const CHECK: &str = "'check-' || :c::text";

/// The random system, check and status of a baseline transaction.
fn pick() -> String {
    let systems = SYSTEMS - 1;
    let checks = CHECKS_PER_SYSTEM - 1;
    format!(
        r"\set s random(0, {systems})
\set c random(0, {checks})
\set st random(1, 3)
"
    )
}

/// SubmitRun's SQL work as vitals does it: the very statements of the store
/// (`vitals::store::postgres::sql`), the load and the write, each committing
/// on its own, under the system's serialisation lock on the same two keys
/// (vitals holds it on a lock session; here a session lock of the same
/// connection, taken and released by a statement each). The write stores a
/// full run window, under the version the load read (`\aset`: every row
/// carries it; none for a new system, whose write then inserts it), and
/// records a transition in the same share of transactions as vitals did in
/// its own run at this concurrency (`-D tpm`, per 10,000).
fn submit() -> Result<String> {
    let load = pgbench_sql(LOAD_SYSTEM, &[SYSTEM, CHECK])?;
    let load = load.strip_suffix(';').unwrap_or(&load);
    let runs = MAX_RUNS_CONSIDERED.to_string();
    let write = pgbench_sql(
        WRITE_SYSTEM,
        &[
            SYSTEM,
            CHECK,
            ":st",
            ":version",
            ":thresholds",
            "true",
            ":st",
            ":evaluation",
            &runs,
            "now()",
            ":window",
            "gen_random_uuid()::text",
            ":st",
            "now()",
            "250000",
            "''",
            ":t::int <= :tpm::int",
            "1",
            // No flapping settings, not flapping, no recovery of an
            // announced problem, no flapping flag: a check as the bench
            // configures it.
            "''",
            "false",
            "false",
            "false",
        ],
    )?;
    Ok(format!(
        r"{pick}\set t random(1, 10000)
\set version 0
SELECT pg_advisory_lock({SYSTEM_SPACE}, hashtext({SYSTEM}));
{load} \aset
{write}
SELECT pg_advisory_unlock({SYSTEM_SPACE}, hashtext({SYSTEM}));
",
        pick = pick()
    ))
}

/// The same durable work in its minimal form: under the system's lock,
/// insert the run, read the check's newest 100 statuses with their times,
/// upsert the system's status; one transaction, synchronous commit.
fn submit_minimal() -> String {
    format!(
        r"{pick}BEGIN;
SELECT pg_advisory_xact_lock({SYSTEM_SPACE}, hashtext({SYSTEM}));
INSERT INTO runs (run_id, system_id, check_id, status, observed_at, latency_us, message) VALUES (gen_random_uuid()::text, {SYSTEM}, {CHECK}, :st, now(), 250000, '');
SELECT status, observed_at FROM runs WHERE system_id = {SYSTEM} AND check_id = {CHECK} ORDER BY observed_at DESC, run_id DESC LIMIT {MAX_RUNS_CONSIDERED};
INSERT INTO systems (system_id, status, evaluated_at) VALUES ({SYSTEM}, :st, now()) ON CONFLICT (system_id) DO UPDATE SET status = excluded.status, evaluated_at = excluded.evaluated_at;
COMMIT;
",
        pick = pick()
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
    /// The minimal statement set of SubmitRun's durable work.
    SubmitMinimal,
}

impl Script {
    fn name(self) -> &'static str {
        match self {
            Script::LockRandom => "lock-random",
            Script::LockOne => "lock-one",
            Script::Submit { .. } => "submit",
            Script::SubmitMinimal => "submit-minimal",
        }
    }

    fn text(self) -> Result<String> {
        match self {
            Script::LockRandom => Ok(LOCK_RANDOM.to_owned()),
            Script::LockOne => Ok(LOCK_ONE.to_owned()),
            Script::Submit { .. } => submit(),
            Script::SubmitMinimal => Ok(submit_minimal()),
        }
    }

    /// The script and its `-D` variables, for the report (the run window
    /// abridged).
    pub(crate) fn source(self) -> Result<String> {
        let defines: Vec<String> = defines()
            .iter()
            .map(|(k, v)| match *k {
                "window" => format!("-D {k}='<{} runs, {} bytes>'", MAX_RUNS_CONSIDERED, v.len()),
                _ => format!("-D {k}='{v}'"),
            })
            .collect();
        Ok(format!("{}\n(pgbench {})", self.text()?, defines.join(" ")))
    }
}

/// A pgbench run's result.
pub(crate) struct PgbenchResult {
    pub(crate) summary: Summary,
    pub(crate) cpu: CpuUse,
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
        fs::write(&script_path, script.text()?)?;
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
        for (name, value) in defines() {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbered_parameters_become_the_arguments_in_their_places() {
        let args = [":a", "2", ":c", ":d", ":e", ":f", ":g", ":h", ":i", ":j"];
        let sql = pgbench_sql(
            "SELECT $10, $1, $2 WHERE x = $1 AND y IN ($3, $4, $5, $6, $7, $8, $9)",
            &args,
        )
        .unwrap();
        assert_eq!(
            sql,
            "SELECT :j, :a, 2 WHERE x = :a AND y IN (:c, :d, :e, :f, :g, :h, :i);"
        );
    }

    #[test]
    fn an_expression_argument_stays_one_operand() {
        let sql = pgbench_sql("SELECT * FROM t WHERE a = $1 AND $2", &["'p-' || :s::text", ":t <= :u"]).unwrap();
        assert_eq!(sql, "SELECT * FROM t WHERE a = ('p-' || :s::text) AND (:t <= :u);");
    }

    #[test]
    fn a_dollar_inside_a_quoted_literal_is_not_a_parameter() {
        let sql = pgbench_sql("SELECT 'costs $1', $1", &[":x"]).unwrap();
        assert_eq!(sql, "SELECT 'costs $1', :x;");
    }

    #[test]
    fn a_parameter_without_an_argument_or_an_argument_without_a_parameter_fails() {
        let missing = pgbench_sql("SELECT $1, $2", &[":a"]).unwrap_err().to_string();
        assert!(missing.contains("$2 has no pgbench argument"), "{missing}");
        let unused = pgbench_sql("SELECT $1", &[":a", ":b"]).unwrap_err().to_string();
        assert!(unused.contains("argument 2"), "{unused}");
        assert!(pgbench_sql("SELECT $x", &[]).is_err());
    }

    #[test]
    fn the_submit_script_runs_each_statement_of_the_store_with_every_parameter_replaced() {
        let script = submit().unwrap();
        for statement in [LOAD_SYSTEM, WRITE_SYSTEM] {
            // The text before the first parameter is the store's, unchanged.
            let head = &statement[..statement.find('$').unwrap()];
            assert_eq!(script.matches(head).count(), 1, "{head}");
        }
        let leftover = script
            .split('$')
            .skip(1)
            .find(|rest| rest.starts_with(|c: char| c.is_ascii_digit()));
        assert!(
            leftover.is_none(),
            "a parameter left in the script: ${}",
            leftover.unwrap_or_default()
        );
        assert!(script.contains(&format!("pg_advisory_lock({SYSTEM_SPACE}, hashtext(")));
        assert!(script.contains(&format!("pg_advisory_unlock({SYSTEM_SPACE}, hashtext(")));
        // pgbench needs every SQL command ended by a semicolon, or by
        // `\aset` in its place.
        let commands = script.lines().filter(|l| !l.starts_with('\\')).count();
        assert_eq!(
            script.matches(";\n").count() + script.matches(" \\aset\n").count(),
            commands
        );
        assert_eq!(script.matches(" \\aset\n").count(), 1);
    }

    #[test]
    fn the_minimal_script_takes_the_systems_lock_in_one_transaction() {
        let script = submit_minimal();
        assert!(script.contains(&format!("pg_advisory_xact_lock({SYSTEM_SPACE}, hashtext(")));
        let commands: Vec<&str> = script.lines().filter(|l| !l.starts_with('\\')).collect();
        assert_eq!(commands.first(), Some(&"BEGIN;"));
        assert_eq!(commands.last(), Some(&"COMMIT;"));
        assert!(commands.iter().all(|c| c.ends_with(';')));
    }

    #[test]
    fn the_window_is_a_full_window_in_the_stores_encoding() {
        let window = full_window();
        let runs: Vec<&str> = window.split('\u{1e}').collect();
        assert_eq!(runs.len(), MAX_RUNS_CONSIDERED);
        let times: Vec<i64> = runs
            .iter()
            .map(|r| r.split('\u{1f}').next().unwrap().parse().unwrap())
            .collect();
        assert!(times.windows(2).all(|t| t[0] > t[1]), "newest first");
        assert!(runs.iter().all(|r| r.split('\u{1f}').count() == 3));
    }
}
