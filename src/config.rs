//! Every setting vitals reads, its default and its validation, in one typed struct.
//!
//! Each setting is an environment variable with a matching command-line flag. A
//! malformed value stops start-up with a message naming the variable and the
//! accepted range: upstream silently replaced bad values with defaults, which
//! hid misconfigured pools until they deadlocked.

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use clap::{Args, ValueEnum};

/// The largest `VITALS_MAX_CHECKS_PER_SYSTEM`: a reply with this many checks,
/// every id as long as allowed, still fits a client's default 4 MiB message
/// limit (tested in `api::convert`).
pub const MAX_CHECKS_PER_SYSTEM: u32 = 10_000;

/// `VITALS_MAX_CHECKS_PER_SYSTEM` when unset: far more checks than a system
/// has in practice, with a tenth of the largest reply.
pub const DEFAULT_MAX_CHECKS_PER_SYSTEM: u32 = 1000;

/// A database URL whose password `Debug` never prints: a configuration is
/// logged and printed in panics and test failures, a password must not be.
#[derive(Clone, PartialEq, Eq)]
pub struct DatabaseUrl(String);

impl DatabaseUrl {
    /// The URL itself, password included, for the driver only.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::str::FromStr for DatabaseUrl {
    type Err = std::convert::Infallible;

    fn from_str(raw: &str) -> Result<Self, Self::Err> {
        Ok(DatabaseUrl(raw.to_owned()))
    }
}

impl std::fmt::Debug for DatabaseUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:?}", redact_password(&self.0))
    }
}

/// `url` with the password of its user info and of a `password=` query
/// parameter replaced by `***`.
pub fn redact_password(url: &str) -> String {
    let mut out = url.to_owned();
    if let Some(scheme_end) = url.find("://") {
        let rest = &url[scheme_end + 3..];
        let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
        if let Some(at) = rest[..authority_end].rfind('@')
            && let Some(colon) = rest[..at].find(':')
        {
            let start = scheme_end + 3 + colon + 1;
            let end = scheme_end + 3 + at;
            out.replace_range(start..end, "***");
        }
    }
    if let Some(query_at) = out.find('?') {
        let (head, query) = out.split_at(query_at + 1);
        let redacted: Vec<String> = query
            .split('&')
            .map(|pair| match pair.split_once('=') {
                Some((key, _)) if key.eq_ignore_ascii_case("password") => format!("{key}=***"),
                _ => pair.to_owned(),
            })
            .collect();
        out = format!("{head}{}", redacted.join("&"));
    }
    out
}

/// Where the data lives, resolved from `DATABASE_URL`, the `PG*` variables or
/// the embedded default.
#[derive(Clone, PartialEq, Eq)]
pub enum DatabaseTarget {
    /// A PostgreSQL URL given explicitly.
    PostgresUrl(String),
    /// No URL, but `PGHOST` is set: libpq's `PG*` variables describe the server.
    PostgresFromEnv,
    /// No PostgreSQL configured: the embedded single-replica store in this
    /// data directory (the SQLite file `vitals.db` inside).
    Embedded(PathBuf),
    /// `DATABASE_URL=sqlite://PATH`: the embedded store in the SQLite file PATH.
    EmbeddedUrl(String),
}

impl std::fmt::Debug for DatabaseTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DatabaseTarget::PostgresUrl(url) => f.debug_tuple("PostgresUrl").field(&redact_password(url)).finish(),
            DatabaseTarget::PostgresFromEnv => f.write_str("PostgresFromEnv"),
            DatabaseTarget::Embedded(dir) => f.debug_tuple("Embedded").field(dir).finish(),
            DatabaseTarget::EmbeddedUrl(url) => f.debug_tuple("EmbeddedUrl").field(url).finish(),
        }
    }
}

/// Log line format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Default)]
pub enum LogFormat {
    /// Human readable lines.
    #[default]
    Text,
    /// One JSON object per line, for log shippers.
    Json,
}

/// Whether server reflection is open to anyone who can connect.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Default)]
pub enum AuthReflection {
    /// Reflection answers without credentials, like grpc.health.v1.
    #[default]
    Open,
    /// Reflection needs a known principal (any scope) once VITALS_AUTH_FILE is set.
    Required,
}

/// The service's configuration. Field docs are the `--help` text.
#[derive(Debug, Clone, Args)]
pub struct Config {
    /// gRPC listen address.
    #[arg(
        long = "listen-addr",
        env = "VITALS_LISTEN_ADDR",
        value_name = "VITALS_LISTEN_ADDR",
        default_value = "127.0.0.1:50051"
    )]
    pub listen_addr: SocketAddr,

    /// PostgreSQL URL (or sqlite://PATH for the embedded store). Unset: the PG* variables when PGHOST is set, else the embedded store.
    #[arg(
        long = "database-url",
        env = "DATABASE_URL",
        value_name = "DATABASE_URL",
        hide_env_values = true
    )]
    pub database_url: Option<DatabaseUrl>,

    /// Directory of the embedded store: vitals.db and its lock file (used when no PostgreSQL is configured).
    #[arg(
        long = "data-dir",
        env = "VITALS_DATA_DIR",
        value_name = "VITALS_DATA_DIR",
        default_value = "./vitals-data"
    )]
    pub data_dir: PathBuf,

    /// Work pool size (connections for reads and writes).
    #[arg(long = "database-pool-max", env = "DATABASE_POOL_MAX", value_name = "DATABASE_POOL_MAX", default_value_t = 20, value_parser = count_in(1, 10_000))]
    pub pool_max: u32,

    /// Lock sessions: long-lived PostgreSQL connections that hold every advisory lock of this replica, many per session.
    #[arg(long = "database-lock-pool-max", env = "DATABASE_LOCK_POOL_MAX", value_name = "DATABASE_LOCK_POOL_MAX", default_value_t = 2, value_parser = count_in(1, 10_000))]
    pub lock_pool_max: u32,

    /// Ignored since locks share sessions (kept so existing deployments still start).
    #[arg(long = "lock-reserve", env = "VITALS_LOCK_RESERVE", value_name = "VITALS_LOCK_RESERVE", default_value_t = 2, value_parser = count_in(0, 10_000), hide = true)]
    pub lock_reserve: u32,

    /// Client locks held or waited for at once on this replica (WithLock streams); past it LOCK_LIMIT_REACHED.
    #[arg(long = "max-locks", env = "VITALS_MAX_LOCKS", value_name = "VITALS_MAX_LOCKS", default_value_t = 10_000, value_parser = count_in(1, 1_000_000))]
    pub max_locks: u32,

    /// Checks a system may have; a run or configuration that would add one more is refused with TOO_MANY_CHECKS.
    /// Every SubmitRun and ConfigureCheck reply carries all of its system's checks: at the largest value it
    /// still fits a client's default 4 MiB message limit.
    #[arg(long = "max-checks-per-system", env = "VITALS_MAX_CHECKS_PER_SYSTEM", value_name = "VITALS_MAX_CHECKS_PER_SYSTEM", default_value_t = DEFAULT_MAX_CHECKS_PER_SYSTEM, value_parser = count_in(1, MAX_CHECKS_PER_SYSTEM))]
    pub max_checks_per_system: u32,

    /// WatchTransitions streams open at once on this replica; past it WATCHER_LIMIT_REACHED.
    #[arg(long = "max-watchers", env = "VITALS_MAX_WATCHERS", value_name = "VITALS_MAX_WATCHERS", default_value_t = 10_000, value_parser = count_in(1, 1_000_000))]
    pub max_watchers: u32,

    /// Transitions that may wait in vitals for one watcher; one more and the watcher ends with WATCHER_TOO_SLOW.
    #[arg(long = "watcher-buffer", env = "VITALS_WATCHER_BUFFER", value_name = "VITALS_WATCHER_BUFFER", default_value_t = 256, value_parser = count_in(1, 65_536))]
    pub watcher_buffer: u32,

    /// How long a transition may wait in vitals for a watcher that does not read; then the watcher ends with WATCHER_TOO_SLOW.
    #[arg(long = "watcher-max-lag-ms", env = "VITALS_WATCHER_MAX_LAG_MS", value_name = "VITALS_WATCHER_MAX_LAG_MS", default_value_t = 10_000, value_parser = millis_in(100, 3_600_000))]
    pub watcher_max_lag_ms: u64,

    /// Longest wait_timeout a WithLock client may ask for; longer ones are shortened to it.
    #[arg(long = "max-lock-wait-ms", env = "VITALS_MAX_LOCK_WAIT_MS", value_name = "VITALS_MAX_LOCK_WAIT_MS", default_value_t = 300_000, value_parser = millis_in(1, 86_400_000))]
    pub max_lock_wait_ms: u64,

    /// Longest wait for a connection from either pool before failing with UNAVAILABLE.
    #[arg(long = "database-pool-connection-timeout-ms", env = "DATABASE_POOL_CONNECTION_TIMEOUT_MS", value_name = "DATABASE_POOL_CONNECTION_TIMEOUT_MS", default_value_t = 10_000, value_parser = millis_in(1, 3_600_000))]
    pub pool_connection_timeout_ms: u64,

    /// Idle pooled connections are closed after this long.
    #[arg(long = "database-pool-idle-timeout-ms", env = "DATABASE_POOL_IDLE_TIMEOUT_MS", value_name = "DATABASE_POOL_IDLE_TIMEOUT_MS", default_value_t = 30_000, value_parser = millis_in(1, 86_400_000))]
    pub pool_idle_timeout_ms: u64,

    /// The WithLock lease, and how long a lock session may go without proving alive before its locks count as lost (PostgreSQL ends it 1 s later).
    #[arg(long = "database-lock-idle-tx-timeout-ms", env = "DATABASE_LOCK_IDLE_TX_TIMEOUT_MS", value_name = "DATABASE_LOCK_IDLE_TX_TIMEOUT_MS", default_value_t = 30_000, value_parser = millis_in(100, 86_400_000))]
    pub lock_idle_tx_timeout_ms: u64,

    /// How long SubmitRun and ConfigureCheck wait for their system's lock (then SYSTEM_BUSY); also WithLock's default wait.
    #[arg(long = "database-lock-timeout-ms", env = "DATABASE_LOCK_TIMEOUT_MS", value_name = "DATABASE_LOCK_TIMEOUT_MS", default_value_t = 30_000, value_parser = millis_in(1, 86_400_000))]
    pub lock_timeout_ms: u64,

    /// Deadline of unary RPCs whose client sent no `grpc-timeout`.
    #[arg(long = "request-timeout-ms", env = "VITALS_REQUEST_TIMEOUT_MS", value_name = "VITALS_REQUEST_TIMEOUT_MS", default_value_t = 15_000, value_parser = millis_in(1, 3_600_000))]
    pub request_timeout_ms: u64,

    /// Business RPCs in flight at once; past it requests are shed with RESOURCE_EXHAUSTED.
    #[arg(long = "max-concurrent-requests", env = "VITALS_MAX_CONCURRENT_REQUESTS", value_name = "VITALS_MAX_CONCURRENT_REQUESTS", default_value_t = 1024, value_parser = count_in(1, 1_000_000))]
    pub max_concurrent_requests: u32,

    /// Largest accepted request message in bytes.
    #[arg(long = "max-request-bytes", env = "VITALS_MAX_REQUEST_BYTES", value_name = "VITALS_MAX_REQUEST_BYTES", default_value_t = 64 * 1024, value_parser = count_in(1024, 256 * 1024 * 1024))]
    pub max_request_bytes: u32,

    /// Runs older than this are deleted (never a check's newest 100): a number with s, m, h or d.
    #[arg(long = "run-retention", env = "VITALS_RUN_RETENTION", value_name = "VITALS_RUN_RETENTION", default_value = "7d", value_parser = parse_retention)]
    pub run_retention: Duration,

    /// Time between retention passes (the first pass starts this long after start-up).
    #[arg(long = "retention-interval-ms", env = "VITALS_RETENTION_INTERVAL_MS", value_name = "VITALS_RETENTION_INTERVAL_MS", default_value_t = 300_000, value_parser = millis_in(10, 86_400_000))]
    pub retention_interval_ms: u64,

    /// How long shutdown waits for in-flight RPCs before closing them.
    #[arg(long = "shutdown-grace-ms", env = "VITALS_SHUTDOWN_GRACE_MS", value_name = "VITALS_SHUTDOWN_GRACE_MS", default_value_t = 10_000, value_parser = millis_in(0, 600_000))]
    pub shutdown_grace_ms: u64,

    /// Interval of the background database readiness check.
    #[arg(long = "readiness-interval-ms", env = "VITALS_READINESS_INTERVAL_MS", value_name = "VITALS_READINESS_INTERVAL_MS", default_value_t = 500, value_parser = millis_in(10, 60_000))]
    pub readiness_interval_ms: u64,

    /// PEM certificate chain of the gRPC listener. With VITALS_TLS_KEY_FILE the listener speaks TLS only; reloaded when the file changes and on SIGHUP.
    #[arg(
        long = "tls-cert-file",
        env = "VITALS_TLS_CERT_FILE",
        value_name = "VITALS_TLS_CERT_FILE"
    )]
    pub tls_cert_file: Option<PathBuf>,

    /// PEM private key of VITALS_TLS_CERT_FILE (PKCS#8, PKCS#1 or SEC1).
    #[arg(
        long = "tls-key-file",
        env = "VITALS_TLS_KEY_FILE",
        value_name = "VITALS_TLS_KEY_FILE"
    )]
    pub tls_key_file: Option<PathBuf>,

    /// PEM CA certificates: when set, every client must present a certificate they issued (mTLS).
    #[arg(
        long = "tls-client-ca-file",
        env = "VITALS_TLS_CLIENT_CA_FILE",
        value_name = "VITALS_TLS_CLIENT_CA_FILE"
    )]
    pub tls_client_ca_file: Option<PathBuf>,

    /// Principals, their credentials, scopes and namespaces (TOML). Unset: no authentication.
    #[arg(long = "auth-file", env = "VITALS_AUTH_FILE", value_name = "VITALS_AUTH_FILE")]
    pub auth_file: Option<PathBuf>,

    /// Whether server reflection needs a known principal (any scope): open or required.
    #[arg(long = "auth-reflection", env = "VITALS_AUTH_REFLECTION", value_name = "VITALS_AUTH_REFLECTION", value_enum, default_value_t = AuthReflection::Open)]
    pub auth_reflection: AuthReflection,

    /// How often the TLS and auth files are read for changes (SIGHUP reads them at once).
    #[arg(long = "file-reload-interval-ms", env = "VITALS_FILE_RELOAD_INTERVAL_MS", value_name = "VITALS_FILE_RELOAD_INTERVAL_MS", default_value_t = 1_000, value_parser = millis_in(10, 3_600_000))]
    pub file_reload_interval_ms: u64,

    /// Plaintext listener serving only grpc.health.v1, for kubelet gRPC probes. Unset: none.
    #[arg(long = "probe-addr", env = "VITALS_PROBE_ADDR", value_name = "VITALS_PROBE_ADDR")]
    pub probe_addr: Option<SocketAddr>,

    /// Client connections open at once on the gRPC listener; past it a new connection is closed at once.
    #[arg(long = "max-connections", env = "VITALS_MAX_CONNECTIONS", value_name = "VITALS_MAX_CONNECTIONS", default_value_t = 10_000, value_parser = count_in(1, 1_000_000))]
    pub max_connections: u32,

    /// HTTP/2 streams (RPCs) open at once on one connection; a client waits for a free one past it.
    #[arg(long = "max-streams-per-connection", env = "VITALS_MAX_STREAMS_PER_CONNECTION", value_name = "VITALS_MAX_STREAMS_PER_CONNECTION", default_value_t = 1_024, value_parser = count_in(1, 100_000))]
    pub max_streams_per_connection: u32,

    /// Log format: text or json.
    #[arg(long = "log-format", env = "VITALS_LOG_FORMAT", value_name = "VITALS_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,

    /// Address serving GET /metrics (Prometheus text format); empty: no metrics.
    #[arg(
        long = "metrics-addr",
        env = "VITALS_METRICS_ADDR",
        value_name = "VITALS_METRICS_ADDR",
        default_value = "127.0.0.1:9464",
        value_parser = parse_metrics_addr
    )]
    pub metrics_addr: MetricsAddr,

    /// How often the systems are counted per status for vitals_systems.
    #[arg(long = "metrics-systems-interval-ms", env = "VITALS_METRICS_SYSTEMS_INTERVAL_MS", value_name = "VITALS_METRICS_SYSTEMS_INTERVAL_MS", default_value_t = 15_000, value_parser = millis_in(100, 3_600_000))]
    pub metrics_systems_interval_ms: u64,

    /// How this replica is named in lock listings (ListLocks, GetLock); unset
    /// or empty: the host name and a random suffix, new at every start.
    #[arg(
        long = "replica-name",
        env = "VITALS_REPLICA_NAME",
        value_name = "VITALS_REPLICA_NAME"
    )]
    pub replica_name: Option<String>,

    /// OTLP/gRPC collector that spans are exported to (http://host:4317); unset or empty: no traces.
    #[arg(
        long = "otel-exporter-otlp-endpoint",
        env = "OTEL_EXPORTER_OTLP_ENDPOINT",
        value_name = "OTEL_EXPORTER_OTLP_ENDPOINT"
    )]
    pub otlp_endpoint: Option<String>,
}

/// Where `/metrics` is served: an address, or nowhere (`VITALS_METRICS_ADDR`
/// empty).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MetricsAddr(pub Option<SocketAddr>);

/// Parses `VITALS_METRICS_ADDR`: an IP address and port, or empty (off).
fn parse_metrics_addr(raw: &str) -> Result<MetricsAddr, InvalidSetting> {
    let raw = raw.trim();
    if raw.is_empty() {
        return Ok(MetricsAddr(None));
    }
    raw.parse()
        .map(|addr| MetricsAddr(Some(addr)))
        .map_err(|_| InvalidSetting::Address)
}

/// Why a setting's value is refused. clap puts the variable's name and the
/// value in front of it, so the message says only what is accepted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InvalidSetting {
    /// Not a count in the accepted range.
    #[error("must be an integer between {min} and {max}")]
    Count {
        /// The smallest accepted.
        min: u32,
        /// The largest accepted.
        max: u32,
    },
    /// Not a number of milliseconds in the accepted range.
    #[error("must be an integer number of milliseconds between {min} and {max}")]
    Millis {
        /// The smallest accepted.
        min: u64,
        /// The largest accepted.
        max: u64,
    },
    /// Not a retention vitals understands.
    #[error("must be a whole number followed by s, m, h or d (for example 7d), at least 1m")]
    Retention,
    /// Not an address to listen on.
    #[error("must be an IP address and port (for example 127.0.0.1:9464), or empty")]
    Address,
}

/// Parser for a count in `min..=max`; the message names the accepted range.
fn count_in(min: u32, max: u32) -> impl Fn(&str) -> Result<u32, InvalidSetting> + Clone + Send + Sync + 'static {
    move |raw| {
        raw.trim()
            .parse::<i64>()
            .ok()
            .and_then(|v| u32::try_from(v).ok())
            .filter(|v| (min..=max).contains(v))
            .ok_or(InvalidSetting::Count { min, max })
    }
}

/// Parser for milliseconds in `min..=max`.
fn millis_in(min: u64, max: u64) -> impl Fn(&str) -> Result<u64, InvalidSetting> + Clone + Send + Sync + 'static {
    move |raw| {
        raw.trim()
            .parse::<i64>()
            .ok()
            .and_then(|v| u64::try_from(v).ok())
            .filter(|v| (min..=max).contains(v))
            .ok_or(InvalidSetting::Millis { min, max })
    }
}

/// Parses a retention such as `7d`, `36h`, `90m` or `3600s`, at least one minute.
fn parse_retention(raw: &str) -> Result<Duration, InvalidSetting> {
    let raw = raw.trim();
    let split = raw.len().saturating_sub(1);
    let (number, unit) = (raw.get(..split).unwrap_or(""), raw.get(split..).unwrap_or(""));
    let number: u64 = number.parse().map_err(|_| InvalidSetting::Retention)?;
    let seconds = match unit {
        "s" => Some(number),
        "m" => number.checked_mul(60),
        "h" => number.checked_mul(3600),
        "d" => number.checked_mul(86_400),
        _ => None,
    };
    seconds
        .filter(|s| (60..=10 * 365 * 86_400).contains(s))
        .map(Duration::from_secs)
        .ok_or(InvalidSetting::Retention)
}

/// A parser that holds only `Config`, so tests can build one from flags alone.
#[derive(Debug, clap::Parser)]
#[command(name = "vitals")]
struct ConfigOnly {
    #[command(flatten)]
    config: Config,
}

impl Config {
    /// Builds a configuration from flags only, ignoring the process environment
    /// except for variables the flags leave unset. Tests pass every value they
    /// care about as a flag so parallel tests never depend on one another.
    pub fn from_flags<I, S>(flags: I) -> Result<Self, clap::Error>
    where
        I: IntoIterator<Item = S>,
        S: Into<std::ffi::OsString> + Clone,
    {
        use clap::Parser;
        let args = std::iter::once(std::ffi::OsString::from("vitals")).chain(flags.into_iter().map(Into::into));
        ConfigOnly::try_parse_from(args).map(|c| c.config)
    }

    /// Resolves which store to use.
    pub fn database_target(&self) -> DatabaseTarget {
        match self.database_url.as_ref().map(|url| url.expose().trim()) {
            Some(url) if url.starts_with("sqlite:") => DatabaseTarget::EmbeddedUrl(url.to_owned()),
            Some(url) if !url.is_empty() => DatabaseTarget::PostgresUrl(url.to_owned()),
            _ if std::env::var_os("PGHOST").is_some_and(|h| !h.is_empty()) => DatabaseTarget::PostgresFromEnv,
            _ => DatabaseTarget::Embedded(self.data_dir.clone()),
        }
    }

    /// Longest wait for a pooled connection.
    pub fn pool_connection_timeout(&self) -> Duration {
        Duration::from_millis(self.pool_connection_timeout_ms)
    }

    /// Idle time after which pooled connections close.
    pub fn pool_idle_timeout(&self) -> Duration {
        Duration::from_millis(self.pool_idle_timeout_ms)
    }

    /// How this replica is named in lock listings: `VITALS_REPLICA_NAME`, or
    /// the host name and a random suffix (at most 128 bytes either way).
    pub fn replica_name(&self) -> String {
        let mut name = match self.replica_name.as_deref().map(str::trim) {
            Some(name) if !name.is_empty() => name.to_owned(),
            _ => {
                let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
                let host = host.trim();
                let suffix = uuid::Uuid::new_v4().simple().to_string();
                format!("{}-{}", if host.is_empty() { "vitals" } else { host }, &suffix[..8])
            }
        };
        name.retain(|c| !c.is_control());
        while name.len() > 128 {
            name.pop();
        }
        name
    }

    /// The WithLock lease, equal to the lock pool's idle-in-transaction timeout.
    pub fn lock_lease(&self) -> Duration {
        Duration::from_millis(self.lock_idle_tx_timeout_ms)
    }

    /// Default wait for a lock.
    pub fn lock_timeout(&self) -> Duration {
        Duration::from_millis(self.lock_timeout_ms)
    }

    /// Default deadline of unary RPCs.
    pub fn request_timeout(&self) -> Duration {
        Duration::from_millis(self.request_timeout_ms)
    }

    /// The largest request message accepted, in bytes.
    pub fn max_request_size(&self) -> usize {
        usize::try_from(self.max_request_bytes).unwrap_or(usize::MAX)
    }

    /// How often the TLS and auth files are read for changes.
    pub fn file_reload_interval(&self) -> Duration {
        Duration::from_millis(self.file_reload_interval_ms)
    }

    /// The longest wait a WithLock client may ask for.
    pub fn max_lock_wait(&self) -> Duration {
        Duration::from_millis(self.max_lock_wait_ms)
    }

    /// The OTLP collector spans go to, if any (an empty value is none).
    pub fn otlp_endpoint(&self) -> Option<&str> {
        self.otlp_endpoint.as_deref().map(str::trim).filter(|e| !e.is_empty())
    }

    /// How often the systems are counted for `vitals_systems`.
    pub fn metrics_systems_interval(&self) -> Duration {
        Duration::from_millis(self.metrics_systems_interval_ms)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[test]
    fn defaults_match_the_documented_table() {
        let c = Config::from_flags(["--database-url", "postgres://x/y", "--database-pool-max", "20"]).unwrap();
        assert_eq!(c.pool_max, 20);
        assert_eq!(c.lock_pool_max, 2);
        assert_eq!(c.pool_connection_timeout_ms, 10_000);
        assert_eq!(c.pool_idle_timeout_ms, 30_000);
        assert_eq!(c.lock_idle_tx_timeout_ms, 30_000);
        assert_eq!(c.lock_timeout_ms, 30_000);
        assert_eq!(c.max_locks, 10_000);
        assert_eq!(c.max_lock_wait_ms, 300_000);
        assert_eq!(c.max_watchers, 10_000);
        assert_eq!(c.watcher_buffer, 256);
        assert_eq!(c.watcher_max_lag_ms, 10_000);
        assert_eq!(c.max_checks_per_system, 1000);
    }

    #[test]
    fn a_checks_per_system_limit_outside_its_range_is_refused_with_the_variable_name() {
        for bad in ["0", "10001", "many"] {
            let err = Config::from_flags([format!("--max-checks-per-system={bad}")])
                .unwrap_err()
                .to_string();
            assert!(err.contains("VITALS_MAX_CHECKS_PER_SYSTEM"), "{bad}: {err}");
        }
        let c = Config::from_flags(["--max-checks-per-system", "10000"]).unwrap();
        assert_eq!(c.max_checks_per_system, MAX_CHECKS_PER_SYSTEM);
    }

    #[test]
    fn metrics_defaults_match_the_documented_table() {
        let c = Config::from_flags(["--database-url", "postgres://x/y"]).unwrap();
        assert_eq!(
            c.metrics_addr,
            MetricsAddr(Some(SocketAddr::from(([127, 0, 0, 1], 9464))))
        );
        assert_eq!(c.metrics_systems_interval_ms, 15_000);
    }

    #[test]
    fn an_empty_metrics_address_turns_the_endpoint_off_and_a_host_name_is_refused() {
        let c = Config::from_flags(["--metrics-addr="]).unwrap();
        assert_eq!(c.metrics_addr, MetricsAddr(None));
        let c = Config::from_flags(["--metrics-addr", "[::1]:0"]).unwrap();
        assert_eq!(c.metrics_addr, MetricsAddr(Some("[::1]:0".parse().unwrap())));
        let err = Config::from_flags(["--metrics-addr", "localhost:9464"])
            .unwrap_err()
            .to_string();
        assert!(err.contains("VITALS_METRICS_ADDR"), "{err}");
        assert!(err.contains("IP address and port"), "{err}");
    }

    #[test]
    fn an_empty_otlp_endpoint_exports_nothing() {
        let c = Config::from_flags(["--otel-exporter-otlp-endpoint", " "]).unwrap();
        assert_eq!(c.otlp_endpoint(), None);
        let c = Config::from_flags(["--otel-exporter-otlp-endpoint", "http://127.0.0.1:4317"]).unwrap();
        assert_eq!(c.otlp_endpoint(), Some("http://127.0.0.1:4317"));
    }

    #[test]
    fn watcher_limits_outside_their_ranges_are_refused_with_the_variable_name() {
        for (flag, bad, variable) in [
            ("--max-watchers", "0", "VITALS_MAX_WATCHERS"),
            ("--watcher-buffer", "0", "VITALS_WATCHER_BUFFER"),
            ("--watcher-buffer", "65537", "VITALS_WATCHER_BUFFER"),
            ("--watcher-max-lag-ms", "99", "VITALS_WATCHER_MAX_LAG_MS"),
        ] {
            let err = Config::from_flags([format!("{flag}={bad}")]).unwrap_err().to_string();
            assert!(err.contains(variable), "{flag}={bad}: {err}");
        }
    }

    #[test]
    fn a_malformed_pool_size_is_refused_with_the_variable_name_and_range() {
        for bad in ["abc", "0", "-3", "1.5", ""] {
            let err = Config::from_flags([format!("--database-pool-max={bad}")])
                .unwrap_err()
                .to_string();
            assert!(err.contains("DATABASE_POOL_MAX"), "{bad:?}: {err}");
            assert!(err.contains("between 1 and 10000"), "{bad:?}: {err}");
        }
    }

    #[test]
    fn retention_accepts_units_and_refuses_garbage() {
        assert_eq!(parse_retention("7d"), Ok(Duration::from_secs(7 * 86_400)));
        assert_eq!(parse_retention("90m"), Ok(Duration::from_secs(5400)));
        for bad in ["", "7", "d", "7w", "-1d", "10s", "1.5h"] {
            assert!(parse_retention(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn the_database_password_never_reaches_debug_output() {
        let c = Config::from_flags(["--database-url", "postgres://vitals:s3cr%40t@db:5432/v?sslmode=require"]).unwrap();
        let printed = format!("{c:?} {:?}", c.database_target());
        assert!(!printed.contains("s3cr"), "{printed}");
        assert!(
            printed.contains("postgres://vitals:***@db:5432/v?sslmode=require"),
            "{printed}"
        );
        assert_eq!(
            redact_password("postgres://u@h/d?password=hunter2&sslmode=verify-full"),
            "postgres://u@h/d?password=***&sslmode=verify-full"
        );
        assert_eq!(redact_password("postgres://h/d"), "postgres://h/d");
    }

    #[test]
    fn a_sqlite_url_selects_the_embedded_store_and_a_postgres_url_postgres() {
        let c = Config::from_flags(["--database-url", "sqlite://some/dir/v.db"]).unwrap();
        assert_eq!(
            c.database_target(),
            DatabaseTarget::EmbeddedUrl("sqlite://some/dir/v.db".into())
        );
        let c = Config::from_flags(["--database-url", "postgres://x/y"]).unwrap();
        assert_eq!(
            c.database_target(),
            DatabaseTarget::PostgresUrl("postgres://x/y".into())
        );
    }
}
