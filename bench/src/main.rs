//! `vitals-bench`: how close vitals comes to what PostgreSQL itself can do on
//! the same machine (pgbench running the same SQL), and how it compares with
//! a peer lock service (etcd's v3 Lock API). And `vitals-bench soak`:
//! vitals under load while PostgreSQL restarts, or through many lock cycles.
//!
//! One run starts everything it needs on loopback (a throw-away PostgreSQL
//! cluster or a fresh database on `DATABASE_URL`, the vitals release binary,
//! etcd), drives each workload at each concurrency for a fixed time, runs the
//! baselines and the peer, soaks `mixed` while sampling vitals' RSS, counts
//! round trips per SubmitRun on the wire, measures vitals' RSS per held
//! WithLock lock on both backends, writes Markdown, a JSON summary and a
//! plot, and stops everything it started.
//!
//! # Layout
//! - [`run`]: the benchmark's options and phases, one function each.
//! - [`soak`]: the `soak` subcommand, on the same set-up.
//! - [`load`]: the closed-loop driver and latency percentiles.
//! - [`workloads`]: vitals' and etcd's operations as workers.
//! - [`pgbench`]: the baseline scripts, built from the store's SQL, run and
//!   read back from pgbench's log.
//! - [`services`]: PostgreSQL, vitals and etcd processes; CPU and RSS sampling.
//! - [`machine`]: what the run ran on.
//! - [`wire`]: a PostgreSQL wire proxy that counts round trips.
//! - [`roundtrips`]: round trips per SubmitRun / WithLock through that proxy.
//! - [`held`]: vitals' RSS while it holds many WithLock locks at once.
//! - [`report`]: the results, their Markdown, JSON summary and plot.

mod held;
mod load;
mod machine;
mod pgbench;
mod report;
mod roundtrips;
mod run;
mod services;
mod soak;
mod wire;
mod workloads;

use std::{process::ExitCode, time::Duration};

use clap::{Parser, Subcommand};

/// Benchmark of vitals against pgbench (same SQL) and etcd (Lock API); with
/// `soak`, the soak test.
#[derive(Debug, Parser)]
#[command(name = "vitals-bench", version, args_conflicts_with_subcommands = true)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    bench: run::BenchArgs,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Mixed load at the concurrency limit while PostgreSQL restarts twice
    /// (or, with --lock-cycles, many WithLock cycles); fails if an
    /// acknowledged run is lost or a call ends other than OK, UNAVAILABLE
    /// or ABORTED.
    Soak(soak::SoakArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let threads = match &cli.command {
        Some(Command::Soak(args)) => args.client_threads,
        None => cli.bench.client_threads,
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads.max(1))
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
        let work = async {
            match cli.command {
                Some(Command::Soak(args)) => soak::run(args).await,
                None => run::run(cli.bench).await,
            }
        };
        tokio::select! {
            r = work => r,
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
