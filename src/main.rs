//! The `vitals` binary: parse the configuration, start logging, serve until
//! SIGINT or SIGTERM; or, as `vitals probe`, ask a running vitals whether it
//! is SERVING.

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use vitals::{Application, Config, telemetry};

#[derive(Debug, Parser)]
#[command(
    name = "vitals",
    version,
    about = "Health-check evaluation and distributed locks over gRPC"
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    config: Config,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Serve gRPC (the default).
    Serve,
    /// Ask a running vitals whether it is SERVING (grpc.health.v1); exits 0
    /// only then. For Kubernetes exec probes and container HEALTHCHECKs.
    Probe(vitals::probe::ProbeArgs),
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command.unwrap_or(Command::Serve) {
        Command::Serve => serve(cli.config).await,
        Command::Probe(args) => vitals::probe::run(&args).await,
    }
}

async fn serve(config: Config) -> ExitCode {
    let telemetry = telemetry::init(&config);
    let app = match Application::build(config).await {
        Ok(app) => app,
        Err(err) => {
            eprintln!("vitals: {err}");
            telemetry.shutdown().await;
            return ExitCode::FAILURE;
        }
    };
    let code = match app.run_until_stopped(shutdown_signal()).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("vitals: {err}");
            ExitCode::FAILURE
        }
    };
    telemetry.shutdown().await;
    code
}

/// Resolves on SIGINT or SIGTERM.
async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {}
        () = term => {}
    }
}
