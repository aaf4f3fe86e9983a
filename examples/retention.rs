//! Measures retention passes over many runs: how long a pass takes, and the
//! longest single delete (on the embedded store, the longest the one writer is
//! held), while a client keeps submitting runs of another system.
//!
//! ```sh
//! cargo run --release --example retention -- --database-url sqlite:///tmp/r/vitals.db
//! cargo run --release --example retention -- --database-url postgres://.../empty_db
//! ```
//!
//! The database must be empty; it is migrated and seeded with SQL directly:
//! `--checks` checks spread over `--systems` systems, with `--runs-per-check`
//! runs each, a minute apart (every check runs at the same moments) and all
//! 30 days old, so that the first pass (retention 7 days) deletes all but each
//! check's newest 100 and the second finds nothing to delete.

#![allow(clippy::expect_used)]

use std::time::{Duration, Instant};

use clap::Parser;
use vitals::{
    Config,
    db::Database,
    domain::{CheckId, RunId, RunMessage, Status, SystemId},
    store::{NewRun, RetentionPass, Store, TransitionNotifier, WriteRules},
};

#[derive(Debug, Parser)]
struct Args {
    /// The empty database: a PostgreSQL URL or sqlite://PATH.
    #[arg(long)]
    database_url: String,
    /// Systems the checks belong to.
    #[arg(long, default_value_t = 200)]
    systems: u32,
    /// Checks to seed.
    #[arg(long, default_value_t = 1_000)]
    checks: u32,
    /// Runs of each check.
    #[arg(long, default_value_t = 1_000)]
    runs_per_check: u32,
    /// Rows per delete statement (the server uses 1000).
    #[arg(long, default_value_t = 1_000)]
    batch: u32,
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args = Args::parse();
    let config = Config::from_flags(["--database-url", args.database_url.as_str()])?;
    let database = Database::open(&config).await?;
    database.migrate().await?;
    let started = Instant::now();
    seed(&database, args.systems, args.checks, args.runs_per_check).await?;
    println!(
        "seeded {} runs ({} systems, {} checks x {}) in {:.1} s",
        u64::from(args.checks) * u64::from(args.runs_per_check),
        args.systems,
        args.checks,
        args.runs_per_check,
        started.elapsed().as_secs_f64()
    );
    let store = Store::open(&database, TransitionNotifier::default());
    for label in ["first pass", "second pass"] {
        pass(&store, label, args.batch).await?;
    }
    database.close().await;
    Ok(())
}

/// Runs one pass while another task submits runs one after the other, and
/// prints the pass's figures and the slowest submission.
async fn pass(store: &Store, label: &str, batch: u32) -> Result<(), Box<dyn std::error::Error>> {
    let (done_tx, mut done_rx) = tokio::sync::watch::channel(false);
    let submitter = {
        let store = store.clone();
        tokio::spawn(async move {
            let mut slowest = Duration::ZERO;
            let mut submitted = 0_u64;
            while !*done_rx.borrow_and_update() {
                let run = NewRun {
                    run_id: RunId::parse("run_id", uuid::Uuid::new_v4().to_string()).expect("a valid id"),
                    system_id: SystemId::parse("system_id", "live".to_owned()).expect("a valid id"),
                    check_id: CheckId::parse("check_id", "http".to_owned()).expect("a valid id"),
                    status: Status::Healthy,
                    observed_at: chrono::Utc::now(),
                    observed_at_given: false,
                    latency: None,
                    message: RunMessage::parse("message", String::new()).expect("a valid message"),
                };
                let asked = Instant::now();
                store
                    .submit_run(&run, &WriteRules::default())
                    .await
                    .map_err(|e| e.to_string())?;
                slowest = slowest.max(asked.elapsed());
                submitted += 1;
            }
            Ok::<_, String>((submitted, slowest))
        })
    };
    let started = Instant::now();
    let mut pass = RetentionPass::new(Duration::from_secs(7 * 86_400), batch);
    let mut longest_read = Duration::ZERO;
    // Each delete step as the caller sees it: with the embedded store this
    // includes waiting for the writer behind a submission.
    let mut deletes = Vec::new();
    while !pass.is_done() {
        let batches = pass.stats().batches;
        let step = Instant::now();
        store.prune_step(&mut pass).await?;
        if pass.stats().batches == batches {
            longest_read = longest_read.max(step.elapsed());
        } else {
            deletes.push(step.elapsed());
        }
    }
    deletes.sort();
    let percentile = |p: usize| {
        deletes
            .get((deletes.len() * p / 100).min(deletes.len().saturating_sub(1)))
            .map_or(0.0, |d| d.as_secs_f64() * 1e3)
    };
    let took = started.elapsed();
    let _ = done_tx.send(true);
    let (submitted, slowest) = submitter.await??;
    let stats = pass.stats();
    println!(
        "{label}: {:.2} s, {} rows deleted in {} deletes (p50 {:.1} ms, p99 {:.1} ms), longest delete {:.1} ms, \
         longest read {:.1} ms; meanwhile {submitted} runs submitted, slowest {:.1} ms",
        took.as_secs_f64(),
        stats.deleted,
        stats.batches,
        percentile(50),
        percentile(99),
        stats.longest_batch.as_secs_f64() * 1e3,
        longest_read.as_secs_f64() * 1e3,
        slowest.as_secs_f64() * 1e3,
    );
    Ok(())
}

/// Seeds the runs with one statement per table.
async fn seed(database: &Database, systems: u32, checks: u32, runs_per_check: u32) -> Result<(), sqlx::Error> {
    match database {
        Database::Postgres(pools) => {
            let pool = pools.work.pool();
            sqlx::query(
                "INSERT INTO checks (system_id, check_id, thresholds) \
                 SELECT 's' || c % $2::bigint, 'c' || c, 'c:1:2:5' FROM generate_series(1, $1::bigint) c",
            )
            .bind(i64::from(checks))
            .bind(i64::from(systems))
            .execute(pool)
            .await?;
            sqlx::query(
                "INSERT INTO runs (run_id, system_id, check_id, status, observed_at, latency_us) \
                 SELECT 'r' || c || '-' || i, 's' || c % $3::bigint, 'c' || c, 1, \
                        now() - interval '30 days' + i * interval '1 minute', i \
                 FROM generate_series(0, $2::bigint - 1) i, generate_series(1, $1::bigint) c",
            )
            .bind(i64::from(checks))
            .bind(i64::from(runs_per_check))
            .bind(i64::from(systems))
            .execute(pool)
            .await?;
        }
        Database::Embedded(db) => {
            let mut conn = db.writer().await.map_err(|e| sqlx::Error::Protocol(e.to_string()))?;
            let numbers = "WITH RECURSIVE n(i) AS (SELECT 0 UNION ALL SELECT i + 1 FROM n WHERE i + 1 < $1) ";
            sqlx::query(&format!(
                "{numbers} INSERT INTO checks (system_id, check_id, thresholds, updated_at) \
                 SELECT 's' || (i % $2), 'c' || i, 'c:1:2:5', 0 FROM n"
            ))
            .bind(i64::from(checks))
            .bind(i64::from(systems))
            .execute(&mut *conn)
            .await?;
            sqlx::query(&format!(
                "{numbers} INSERT INTO runs (run_id, system_id, check_id, status, observed_at, latency_us, recorded_at) \
                 SELECT 'r' || c.check_id || '-' || n.i, c.system_id, c.check_id, 1, \
                        (unixepoch('now', '-30 days') + n.i * 60) * 1000000, n.i, 0 \
                 FROM n, checks c ORDER BY n.i, c.check_id"
            ))
            .bind(i64::from(runs_per_check))
            .execute(&mut *conn)
            .await?;
        }
    }
    Ok(())
}
