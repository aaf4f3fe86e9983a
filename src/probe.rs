//! `vitals probe`: a gRPC health probe that needs nothing but this binary.
//!
//! Meshes and orchestrators can speak `grpc.health.v1` themselves; this is
//! for exec probes and container HEALTHCHECKs, where a one-line reason on
//! failure is what an operator reads.

use std::{path::PathBuf, process::ExitCode, time::Duration};

use clap::Args;
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity};
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
    /// PEM CA certificates to verify the server with: speak TLS (as an
    /// address starting with https:// does, trusting the system's CAs).
    #[arg(long = "ca-file")]
    pub ca_file: Option<PathBuf>,
    /// PEM client certificate to present (mTLS), with --key-file.
    #[arg(long = "cert-file", requires = "key_file")]
    pub cert_file: Option<PathBuf>,
    /// PEM private key of --cert-file.
    #[arg(long = "key-file", requires = "cert_file")]
    pub key_file: Option<PathBuf>,
    /// The name the server's certificate must carry (default: the address's host).
    #[arg(long = "server-name")]
    pub server_name: Option<String>,
    /// Bearer token sent as `authorization: Bearer <token>`; VITALS_PROBE_TOKEN
    /// keeps it off the command line.
    #[arg(long, env = "VITALS_PROBE_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
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
    let tls = tls_config(args)?;
    let uri = if args.addr.contains("://") {
        args.addr.clone()
    } else if tls.is_some() {
        format!("https://{}", args.addr)
    } else {
        format!("http://{}", args.addr)
    };
    let mut endpoint = Endpoint::from_shared(uri)
        .map_err(|e| ProbeFailure::Refused(format!("bad address: {e}")))?
        .tcp_nodelay(true)
        .connect_timeout(args.timeout)
        .timeout(args.timeout);
    if let Some(tls) = tls {
        endpoint = endpoint
            .tls_config(tls)
            .map_err(|e| ProbeFailure::Refused(format!("TLS: {}", root_cause(&e))))?;
    }
    let mut request = tonic::Request::new(HealthCheckRequest {
        service: args.service.clone(),
    });
    if let Some(token) = &args.token {
        let value = format!("Bearer {token}")
            .parse()
            .map_err(|_| ProbeFailure::Refused("the token is not a valid header value".into()))?;
        request.metadata_mut().insert("authorization", value);
    }
    let attempt = async {
        let channel = endpoint
            .connect()
            .await
            .map_err(|e| ProbeFailure::Refused(root_cause(&e)))?;
        let reply = HealthClient::new(channel)
            .check(request)
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

/// The client TLS the flags ask for, if any.
fn tls_config(args: &ProbeArgs) -> Result<Option<ClientTlsConfig>, ProbeFailure> {
    if args.ca_file.is_none() && args.cert_file.is_none() && !args.addr.starts_with("https://") {
        return Ok(None);
    }
    let read = |path: &PathBuf| {
        std::fs::read(path).map_err(|e| ProbeFailure::Refused(format!("cannot read {}: {e}", path.display())))
    };
    let mut tls = ClientTlsConfig::new();
    tls = match &args.ca_file {
        Some(ca) => tls.ca_certificate(Certificate::from_pem(read(ca)?)),
        None => tls.with_native_roots(),
    };
    if let (Some(cert), Some(key)) = (&args.cert_file, &args.key_file) {
        tls = tls.identity(Identity::from_pem(read(cert)?, read(key)?));
    }
    if let Some(name) = &args.server_name {
        tls = tls.domain_name(name.clone());
    }
    Ok(Some(tls))
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
