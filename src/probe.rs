//! `vitals probe`: a gRPC health probe that needs nothing but this binary.
//!
//! Meshes and orchestrators can speak `grpc.health.v1` themselves; this is
//! for exec probes and container HEALTHCHECKs, where a one-line reason on
//! failure is what an operator reads.

use std::{process::ExitCode, time::Duration};

use clap::Args;
use tonic::transport::Endpoint;
use tonic_health::pb::{HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient};

/// Flags of `vitals probe`.
#[derive(Debug, Clone, Args)]
pub struct ProbeArgs {
    /// Address of the vitals to probe.
    #[arg(long, default_value = "127.0.0.1:50051")]
    pub addr: String,
    /// Service name to ask about; empty means the whole server.
    #[arg(long, default_value = "")]
    pub service: String,
    /// Give up after this long (e.g. 1s, 500ms).
    #[arg(long, default_value = "1s", value_parser = parse_timeout)]
    pub timeout: Duration,
}

fn parse_timeout(raw: &str) -> Result<Duration, String> {
    let raw = raw.trim();
    let (number, scale) = if let Some(ms) = raw.strip_suffix("ms") {
        (ms, 1)
    } else if let Some(s) = raw.strip_suffix('s') {
        (s, 1000)
    } else {
        return Err("must be a whole number of s or ms, e.g. 1s or 500ms".into());
    };
    number
        .parse::<u64>()
        .ok()
        .filter(|n| *n > 0)
        .and_then(|n| n.checked_mul(scale))
        .map(Duration::from_millis)
        .ok_or_else(|| "must be a whole number of s or ms, e.g. 1s or 500ms".into())
}

/// Why a probe did not find the service SERVING.
#[derive(Debug, PartialEq, Eq)]
pub enum ProbeFailure {
    /// Nothing listens, or the address is wrong.
    Refused(String),
    /// No answer within the timeout.
    Timeout,
    /// The server answered with another status.
    NotServing(String),
    /// The server answered with an error (e.g. an unknown service name).
    Error(String),
}

impl std::fmt::Display for ProbeFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ProbeFailure::Refused(why) => write!(f, "refused: {why}"),
            ProbeFailure::Timeout => write!(f, "timeout"),
            ProbeFailure::NotServing(status) => write!(f, "{status}"),
            ProbeFailure::Error(why) => write!(f, "error: {why}"),
        }
    }
}

/// Probes once: `Ok` only when the service is SERVING.
pub async fn check(args: &ProbeArgs) -> Result<(), ProbeFailure> {
    let uri = if args.addr.contains("://") {
        args.addr.clone()
    } else {
        format!("http://{}", args.addr)
    };
    let endpoint = Endpoint::from_shared(uri)
        .map_err(|e| ProbeFailure::Refused(format!("bad address: {e}")))?
        .tcp_nodelay(true)
        .connect_timeout(args.timeout)
        .timeout(args.timeout);
    let attempt = async {
        let channel = endpoint
            .connect()
            .await
            .map_err(|e| ProbeFailure::Refused(root_cause(&e)))?;
        let reply = HealthClient::new(channel)
            .check(HealthCheckRequest {
                service: args.service.clone(),
            })
            .await
            .map_err(|status| ProbeFailure::Error(format!("{:?}: {}", status.code(), status.message())))?;
        match reply.into_inner().status() {
            ServingStatus::Serving => Ok(()),
            other => Err(ProbeFailure::NotServing(other.as_str_name().to_owned())),
        }
    };
    tokio::time::timeout(args.timeout, attempt)
        .await
        .map_err(|_| ProbeFailure::Timeout)?
}

fn root_cause(err: &dyn std::error::Error) -> String {
    let mut cause = err;
    while let Some(next) = cause.source() {
        cause = next;
    }
    cause.to_string()
}

/// Runs the probe and prints a one-line verdict.
pub async fn run(args: &ProbeArgs) -> ExitCode {
    match check(args).await {
        Ok(()) => {
            println!("SERVING");
            ExitCode::SUCCESS
        }
        Err(failure) => {
            eprintln!("vitals probe {}: {failure}", args.addr);
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timeouts_parse_in_seconds_and_milliseconds() {
        assert_eq!(parse_timeout("1s"), Ok(Duration::from_secs(1)));
        assert_eq!(parse_timeout("250ms"), Ok(Duration::from_millis(250)));
        for bad in ["", "1", "0s", "1m", "-1s", "1.5s"] {
            assert!(parse_timeout(bad).is_err(), "{bad}");
        }
    }
}
