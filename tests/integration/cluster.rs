//! A throw-away PostgreSQL cluster owned by one test, for fault tests that
//! crash or restart PostgreSQL itself.
//!
//! Every other PostgreSQL test shares the cluster of `DATABASE_URL` (a
//! database each, see [`crate::harness`]) and runs in parallel with the rest,
//! so crashing or restarting that cluster would fail whatever else is running
//! at the time. A [`PrivateCluster`] is a cluster of its own instead: `initdb`
//! into a fresh temporary directory, started on a free 127.0.0.1 port, crashed
//! with `pg_ctl stop -m immediate` and started again on the same port and data
//! directory (so crash recovery runs), and stopped and removed when dropped.
//!
//! The binaries are found as scripts/test.sh finds them: the newest
//! `/usr/lib/postgresql/*/bin` with `initdb` and `pg_ctl`, else `PATH`.
//! `initdb` refuses to run as root, and CI runs the tests as root: as root,
//! every `initdb` and `pg_ctl` runs as the `postgres` user (through `runuser`),
//! who owns the directory.
//!
//! Unlike the shared cluster, `fsync` stays on and `synchronous_commit` at its
//! default: a crash test checks that what was acknowledged survives.

use std::{
    fmt::Write as _,
    net::{Ipv4Addr, SocketAddr, TcpListener},
    os::unix::fs::{MetadataExt, PermissionsExt},
    path::{Path, PathBuf},
    process::{Output, Stdio},
    time::{Duration, Instant},
};

use sqlx::{Connection, Executor, PgConnection};
use tokio::process::Command;

/// How long `pg_ctl` may wait for a start or a stop (its `-t`).
const PG_CTL_WAIT_SECS: u64 = 60;
/// The bound on any one child process: `pg_ctl`'s own, and some.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(PG_CTL_WAIT_SECS + 30);
/// How long a started server may take to accept a connection.
const ACCEPT_TIMEOUT: Duration = Duration::from_secs(30);
/// Ports tried when another process takes the free port first.
const PORT_ATTEMPTS: usize = 5;
/// Lines of the server log a failure shows.
const LOG_TAIL_LINES: usize = 50;

/// A PostgreSQL cluster of one test; stopped and removed on drop.
pub struct PrivateCluster {
    /// Holds `data/`, `server.log`, `pwfile` and the Unix socket.
    dir: tempfile::TempDir,
    /// The directory of `initdb`, `pg_ctl` and `postgres`.
    bin: PathBuf,
    /// Run the binaries as the `postgres` user (the tests run as root).
    as_postgres: bool,
    port: u16,
    /// The password of the `postgres` user.
    password: String,
    /// The server's options (`pg_ctl -o`), the same at every start.
    options: String,
}

impl PrivateCluster {
    /// `initdb` into a fresh temporary directory, then starts the cluster on a
    /// free 127.0.0.1 port with `settings` (each `name=value`, given as `-c`),
    /// and waits until it accepts connections.
    pub async fn start(settings: &[&str]) -> PrivateCluster {
        let bin = bindir();
        let dir = tempfile::Builder::new()
            .prefix("vitals-pg-")
            .tempdir()
            .expect("create a temporary directory for a private PostgreSQL cluster");
        // The new directory belongs to the effective user: root hands it to postgres.
        let as_postgres = dir
            .path()
            .metadata()
            .expect("stat the private cluster's directory")
            .uid()
            == 0;
        let mut cluster = PrivateCluster {
            dir,
            bin,
            as_postgres,
            port: 0,
            password: uuid::Uuid::new_v4().simple().to_string(),
            options: String::new(),
        };
        cluster.initdb().await;
        for attempt in 1..=PORT_ATTEMPTS {
            cluster.port = free_port();
            cluster.options = server_options(cluster.port, cluster.dir.path(), settings);
            let log_before = cluster.server_log().len();
            let Err(e) = cluster.pg_ctl_start().await else {
                break;
            };
            // Another process may have bound the port since free_port(): then try another.
            let port_taken = cluster
                .server_log()
                .get(log_before..)
                .is_some_and(|new| new.contains("Address already in use"));
            if !port_taken || attempt == PORT_ATTEMPTS {
                cluster.fail(&format!("pg_ctl start failed: {e}"));
            }
        }
        cluster.wait_accepting().await;
        cluster
    }

    /// The URL of database `postgres` as user `postgres` (password, SCRAM).
    pub fn url(&self) -> String {
        self.url_for("postgres")
    }

    /// The URL of database `db` (which this does not create).
    pub fn url_for(&self, db: &str) -> String {
        format!(
            "postgres://postgres:{}@127.0.0.1:{}/{}",
            self.password,
            self.port,
            percent_encode(db)
        )
    }

    /// Where the server listens.
    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from((Ipv4Addr::LOCALHOST, self.port))
    }

    /// Everything the server has logged so far (all its starts).
    pub fn server_log(&self) -> String {
        std::fs::read(self.log_path())
            .map(|bytes| String::from_utf8_lossy(&bytes).into_owned())
            .unwrap_or_default()
    }

    /// `pg_ctl stop -m immediate`: a crash. The server and its sessions are
    /// killed, nothing is checkpointed; [`restart`](Self::restart) recovers
    /// from the WAL.
    pub async fn crash(&self) {
        let mut cmd = self.pg("pg_ctl");
        cmd.arg("stop")
            .arg("-D")
            .arg(self.data_dir())
            .args(["-m", "immediate", "-w", "-t"])
            .arg(PG_CTL_WAIT_SECS.to_string());
        if let Err(e) = run(cmd).await {
            self.fail(&format!("pg_ctl stop -m immediate failed: {e}"));
        }
    }

    /// Starts the cluster again after [`crash`](Self::crash), on the same
    /// port and data directory (crash recovery runs), and waits until it
    /// accepts connections.
    pub async fn restart(&self) {
        if let Err(e) = self.pg_ctl_start().await {
            self.fail(&format!("pg_ctl start (restart) failed: {e}"));
        }
        self.wait_accepting().await;
    }

    fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("server.log")
    }

    /// A command running `program` of the PostgreSQL binaries, as `postgres`
    /// when we are root, in the cluster's directory (the caller's own may be
    /// closed to `postgres`).
    fn pg_std(&self, program: &str) -> std::process::Command {
        let path = self.bin.join(program);
        let mut cmd = if self.as_postgres {
            let mut cmd = std::process::Command::new("runuser");
            cmd.args(["-u", "postgres", "--"]).arg(path);
            cmd
        } else {
            std::process::Command::new(path)
        };
        cmd.current_dir(self.dir.path());
        cmd
    }

    fn pg(&self, program: &str) -> Command {
        Command::from(self.pg_std(program))
    }

    async fn initdb(&self) {
        let pwfile = self.dir.path().join("pwfile");
        std::fs::write(&pwfile, format!("{}\n", self.password)).expect("write the private cluster's password file");
        if self.as_postgres {
            let mut chown = Command::new("chown");
            chown.arg("-R").arg("postgres:").arg(self.dir.path());
            if let Err(e) = run(chown).await {
                panic!(
                    "running as root, a private PostgreSQL cluster belongs to the 'postgres' user \
                     (installed with the postgresql package), but chown to it failed: {e}"
                );
            }
        }
        let mut cmd = self.pg("initdb");
        cmd.arg("-D")
            .arg(self.data_dir())
            // --locale=C: no dependency on the locales installed, and English
            // server messages (start() looks for one).
            .args(["-U", "postgres", "-E", "UTF8", "--locale=C"])
            .args(["--no-sync", "--auth=scram-sha-256"])
            .arg(format!("--pwfile={}", pwfile.display()));
        if let Err(e) = run(cmd).await {
            panic!(
                "initdb of a private PostgreSQL cluster in {} failed: {e}",
                self.dir.path().display()
            );
        }
    }

    /// `pg_ctl start`, waiting until the server is ready (or has failed).
    async fn pg_ctl_start(&self) -> Result<(), String> {
        let mut cmd = self.pg("pg_ctl");
        // -l also detaches the server from our pipes, so run() sees them close.
        cmd.arg("start")
            .arg("-D")
            .arg(self.data_dir())
            .arg("-l")
            .arg(self.log_path())
            .args(["-w", "-t"])
            .arg(PG_CTL_WAIT_SECS.to_string())
            .arg("-o")
            .arg(&self.options);
        run(cmd).await.map(drop)
    }

    /// Returns once a password login succeeds; `pg_ctl -w` has mostly waited already.
    async fn wait_accepting(&self) {
        let url = self.url();
        let deadline = Instant::now() + ACCEPT_TIMEOUT;
        loop {
            let error = match tokio::time::timeout(Duration::from_secs(5), PgConnection::connect(&url)).await {
                Ok(Ok(conn)) => {
                    let _ = conn.close().await;
                    return;
                }
                Ok(Err(e)) => e.to_string(),
                Err(_) => "connecting took over 5 s".to_owned(),
            };
            if Instant::now() >= deadline {
                self.fail(&format!("no connection within {ACCEPT_TIMEOUT:?}; last error: {error}"));
            }
            // Polling an external process that is not listening yet.
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Panics with `what` and the tail of the server log.
    fn fail(&self, what: &str) -> ! {
        let log = self.server_log();
        let lines: Vec<&str> = log.lines().collect();
        let tail = lines[lines.len().saturating_sub(LOG_TAIL_LINES)..].join("\n");
        panic!(
            "private PostgreSQL cluster in {} (port {}): {what}\n--- last lines of {} ---\n{tail}",
            self.dir.path().display(),
            self.port,
            self.log_path().display()
        );
    }
}

impl Drop for PrivateCluster {
    /// Best effort, never panics: stops the server if it runs (`-m immediate`),
    /// then the `TempDir` removes the directory.
    fn drop(&mut self) {
        if !self.data_dir().join("postmaster.pid").exists() {
            return; // never started, or crashed
        }
        let mut cmd = self.pg_std("pg_ctl");
        cmd.arg("stop")
            .arg("-D")
            .arg(self.data_dir())
            .args(["-m", "immediate", "-w", "-t", "30"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        let _ = cmd.status();
    }
}

/// Runs `cmd` to its end, bounded by [`COMMAND_TIMEOUT`]; `Err` describes a
/// failure with the command's output.
async fn run(mut cmd: Command) -> Result<Output, String> {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let shown = format!("{:?}", cmd.as_std());
    let output = match tokio::time::timeout(COMMAND_TIMEOUT, cmd.output()).await {
        Ok(Ok(output)) => output,
        Ok(Err(e)) => return Err(format!("could not run {shown}: {e}")),
        Err(_) => return Err(format!("{shown} still ran after {COMMAND_TIMEOUT:?}; killed")),
    };
    if output.status.success() {
        return Ok(output);
    }
    let mut message = format!("{shown} exited with {}", output.status);
    for (name, bytes) in [("stdout", &output.stdout), ("stderr", &output.stderr)] {
        let text = String::from_utf8_lossy(bytes);
        if !text.trim().is_empty() {
            let _ = write!(message, "\n--- {name} ---\n{}", text.trim_end());
        }
    }
    Err(message)
}

/// The directory of `initdb` and `pg_ctl`, as scripts/test.sh picks it: the
/// newest `/usr/lib/postgresql/<version>/bin` that has both, else where the
/// `pg_ctl` on `PATH` really is.
fn bindir() -> PathBuf {
    let has_both = |dir: &Path| is_executable(&dir.join("initdb")) && is_executable(&dir.join("pg_ctl"));
    let mut versions: Vec<(Vec<u64>, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| {
            let name = entry.file_name().into_string().ok()?;
            let version = name
                .split('.')
                .map(|part| part.parse().ok())
                .collect::<Option<Vec<u64>>>()?;
            Some((version, entry.path().join("bin")))
        })
        .filter(|(_, bin)| has_both(bin))
        .collect();
    versions.sort();
    if let Some((_, bin)) = versions.pop() {
        return bin;
    }
    let on_path = std::env::var_os("PATH")
        .map(|path| std::env::split_paths(&path).collect::<Vec<_>>())
        .unwrap_or_default()
        .into_iter()
        .map(|dir| dir.join("pg_ctl"))
        .find(|pg_ctl| is_executable(pg_ctl))
        .and_then(|pg_ctl| std::fs::canonicalize(pg_ctl).ok())
        .and_then(|pg_ctl| pg_ctl.parent().map(Path::to_path_buf))
        .filter(|bin| has_both(bin));
    on_path.unwrap_or_else(|| {
        panic!(
            "a private PostgreSQL cluster needs the server binaries (initdb, pg_ctl) in \
             /usr/lib/postgresql/*/bin or on PATH; Debian/Ubuntu: apt-get install postgresql"
        )
    })
}

fn is_executable(path: &Path) -> bool {
    path.metadata()
        .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// A port nobody listens on now: the one the kernel picks for a listener.
fn free_port() -> u16 {
    TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .and_then(|listener| listener.local_addr())
        .expect("bind 127.0.0.1:0 to find a free port")
        .port()
}

/// The server's options for `pg_ctl -o`, which a shell splits: every value is
/// single-quoted.
fn server_options(port: u16, socket_dir: &Path, settings: &[&str]) -> String {
    let mut options = format!(
        "-p {port} -k {} -c listen_addresses=127.0.0.1",
        shell_quote(&socket_dir.display().to_string())
    );
    for setting in settings {
        let _ = write!(options, " -c {}", shell_quote(setting));
    }
    options
}

fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// `s` as one URL path segment.
fn percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for byte in s.bytes() {
        if byte.is_ascii_alphanumeric() || b"-._~".contains(&byte) {
            out.push(char::from(byte));
        } else {
            let _ = write!(out, "%{byte:02X}");
        }
    }
    out
}

#[tokio::test]
async fn a_committed_row_survives_a_crash_and_a_restart() {
    let cluster = PrivateCluster::start(&["max_connections=50", "max_locks_per_transaction=256"]).await;
    let mut conn = PgConnection::connect(&cluster.url()).await.expect("connect");
    for (name, want) in [("max_connections", "50"), ("fsync", "on"), ("synchronous_commit", "on")] {
        let value: String = sqlx::query_scalar("SELECT current_setting($1)")
            .bind(name)
            .fetch_one(&mut conn)
            .await
            .unwrap();
        assert_eq!(value, want, "{name}");
    }
    conn.execute("CREATE TABLE survivors (id int PRIMARY KEY, note text NOT NULL)")
        .await
        .unwrap();
    conn.execute("INSERT INTO survivors VALUES (1, 'committed before the crash')")
        .await
        .unwrap();

    cluster.crash().await;
    assert!(conn.execute("SELECT 1").await.is_err(), "the crash ended the session");
    cluster.restart().await;

    let mut conn = PgConnection::connect(&cluster.url()).await.expect("reconnect");
    let note: String = sqlx::query_scalar("SELECT note FROM survivors WHERE id = 1")
        .fetch_one(&mut conn)
        .await
        .unwrap();
    assert_eq!(note, "committed before the crash");
    assert!(
        cluster.server_log().contains("automatic recovery in progress"),
        "the restart ran crash recovery:\n{}",
        cluster.server_log()
    );
}
