//! What the benchmark runs against, all on loopback and all stopped on exit:
//! a throw-away PostgreSQL cluster (or a fresh database on `DATABASE_URL`),
//! the vitals release binary and etcd.
//!
//! Every process is stopped by its own pid when its guard drops, so an error
//! or Ctrl-C anywhere still leaves nothing running.

use std::{
    collections::BTreeMap,
    fs,
    io::Write,
    net::{SocketAddr, TcpListener},
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, anyhow, bail};
use tonic_health::pb::{HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient};

/// A free TCP port on 127.0.0.1 (the listener is closed before returning).
pub(crate) fn free_port() -> Result<u16> {
    let listener = TcpListener::bind("127.0.0.1:0").context("binding a free port on 127.0.0.1")?;
    Ok(listener.local_addr()?.port())
}

/// Runs `cmd`, failing with its output when it exits non-zero.
fn run(cmd: &mut Command, what: &str) -> Result<String> {
    let out = cmd.output().with_context(|| format!("{what}: could not start"))?;
    stdout_of(&out, what)
}

/// The standard output of a finished command, or its whole output as the
/// error when it exited non-zero.
fn stdout_of(out: &std::process::Output, what: &str) -> Result<String> {
    if !out.status.success() {
        bail!(
            "{what} failed ({}):\n{}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// [`run`] without blocking the runtime's thread.
async fn run_async(cmd: Command, what: &str) -> Result<String> {
    let out = tokio::process::Command::from(cmd)
        .stdin(Stdio::null())
        .output()
        .await
        .with_context(|| format!("{what}: could not start"))?;
    stdout_of(&out, what)
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

/// Appends `pid name` to the work directory's pid file, so that the wrapper
/// script can stop what an aborted run left behind.
fn note_pid(work_dir: &Path, pid: u32, name: &str) {
    if let Ok(mut f) = fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(work_dir.join("pids"))
    {
        let _ = writeln!(f, "{pid} {name}");
    }
}

// ------------------------------------------------------------------ process

/// A child process stopped (SIGTERM, then SIGKILL after `grace`) on drop.
pub(crate) struct Proc {
    name: &'static str,
    child: Child,
    log: PathBuf,
}

impl Proc {
    fn spawn(name: &'static str, cmd: &mut Command, log: PathBuf, work_dir: &Path) -> Result<Self> {
        let out = fs::File::create(&log).with_context(|| format!("creating {}", log.display()))?;
        let err = out.try_clone()?;
        let child = cmd
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .with_context(|| format!("starting {name}"))?;
        note_pid(work_dir, child.id(), name);
        Ok(Proc { name, child, log })
    }

    /// The process id.
    pub(crate) fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Fails with the log's tail when the process has exited.
    fn check_alive(&mut self) -> Result<()> {
        if let Some(status) = self.child.try_wait()? {
            bail!(
                "{} exited early ({status}); log tail:\n{}",
                self.name,
                tail(&self.log, 30)
            );
        }
        Ok(())
    }

    /// SIGTERM, wait up to `grace`, then SIGKILL.
    pub(crate) fn stop(&mut self, grace: Duration) {
        if matches!(self.child.try_wait(), Ok(Some(_))) {
            return;
        }
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .stderr(Stdio::null())
            .status();
        let deadline = Instant::now() + grace;
        while Instant::now() < deadline {
            if matches!(self.child.try_wait(), Ok(Some(_))) {
                return;
            }
            thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.stop(Duration::from_secs(10));
    }
}

/// The last `lines` lines of a log file.
pub(crate) fn tail(path: &Path, lines: usize) -> String {
    let text = fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

// --------------------------------------------------------------- PostgreSQL

/// The database the benchmark uses, and how to reach and describe it.
pub(crate) struct Postgres {
    /// URL of the benchmark database (sqlx and libpq both accept it).
    pub(crate) url: String,
    /// host:port of the server (for the round-trip counting proxy).
    pub(crate) addr: Option<SocketAddr>,
    /// Directory of psql and pgbench.
    pub(crate) bindir: Option<PathBuf>,
    /// `postmaster` pid, when this benchmark started the cluster.
    pub(crate) postmaster_pid: Option<u32>,
    /// Held for its drop: stops the cluster the benchmark started.
    _cluster: Option<Cluster>,
    /// Held for its drop: drops the database created on `DATABASE_URL`.
    _external: Option<External>,
}

/// A cluster started by the benchmark, stopped and removed on drop.
struct Cluster {
    data: PathBuf,
    pg_ctl: PathBuf,
    as_postgres: bool,
    /// The server's options (`pg_ctl -o`) and log, to start it again.
    opts: String,
    log: PathBuf,
}

impl Cluster {
    /// `pg_ctl` with `args` after the data directory, as its owner.
    fn pg_ctl(&self, args: &[&str]) -> Command {
        let mut cmd = pg_command(self.as_postgres, &self.pg_ctl);
        cmd.arg("-D").arg(&self.data).args(args);
        cmd
    }

    fn start_command(&self) -> Command {
        let mut cmd = self.pg_ctl(&["-w", "-t", "60", "-o", &self.opts, "-l"]);
        cmd.arg(&self.log).arg("start");
        cmd
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let _ = self
            .pg_ctl(&["-m", "fast", "-w", "-t", "30", "stop"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

/// A database created on a server given by `DATABASE_URL`, dropped on drop.
struct External {
    admin_url: String,
    database: String,
    psql: PathBuf,
}

impl Drop for External {
    fn drop(&mut self) {
        let _ = Command::new(&self.psql)
            .args(["-X", "-q", "-v", "ON_ERROR_STOP=1", &self.admin_url, "-c"])
            .arg(format!("DROP DATABASE IF EXISTS \"{}\" WITH (FORCE)", self.database))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

fn pg_command(as_postgres: bool, program: &Path) -> Command {
    if as_postgres {
        let mut cmd = Command::new("runuser");
        cmd.args(["-u", "postgres", "--"]).arg(program);
        cmd
    } else {
        Command::new(program)
    }
}

/// The newest `/usr/lib/postgresql/*/bin` with initdb and pg_ctl, else the
/// directory of `pg_ctl` on PATH.
fn pg_bindir() -> Option<PathBuf> {
    let mut dirs: Vec<(u32, PathBuf)> = fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let version = e.file_name().to_string_lossy().parse::<u32>().ok()?;
            let bin = e.path().join("bin");
            (bin.join("initdb").exists() && bin.join("pg_ctl").exists()).then_some((version, bin))
        })
        .collect();
    dirs.sort();
    if let Some((_, bin)) = dirs.pop() {
        return Some(bin);
    }
    let out = Command::new("sh").args(["-c", "command -v pg_ctl"]).output().ok()?;
    let path = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
    let path = fs::canonicalize(path).ok()?;
    path.parent().map(Path::to_path_buf)
}

impl Postgres {
    /// A fresh database on `DATABASE_URL` if given, else a throw-away cluster
    /// in `work_dir` on a free loopback port.
    pub(crate) fn start(database_url: Option<&str>, work_dir: &Path, nonce: &str) -> Result<Self> {
        match database_url {
            Some(url) => Self::external(url, nonce),
            None => Self::own_cluster(work_dir),
        }
    }

    /// The program `name` (psql, pgbench) from the server's bindir or PATH.
    pub(crate) fn tool(&self, name: &str) -> PathBuf {
        if let Some(dir) = &self.bindir {
            let p = dir.join(name);
            if p.exists() {
                return p;
            }
        }
        PathBuf::from(name)
    }

    fn external(admin_url: &str, nonce: &str) -> Result<Self> {
        let mut url = url::Url::parse(admin_url).context("DATABASE_URL is not a URL")?;
        let database = format!("vitals_bench_{nonce}");
        let psql = PathBuf::from("psql");
        run(
            Command::new(&psql)
                .args(["-X", "-q", "-v", "ON_ERROR_STOP=1", admin_url, "-c"])
                .arg(format!("CREATE DATABASE \"{database}\"")),
            "creating the benchmark database",
        )?;
        url.set_path(&format!("/{database}"));
        let addr = match (url.host_str(), url.port().unwrap_or(5432)) {
            (Some(host), port) if !host.is_empty() => {
                format!("{host}:{port}").parse::<SocketAddr>().ok().or_else(|| {
                    std::net::ToSocketAddrs::to_socket_addrs(&(host, port))
                        .ok()?
                        .find(SocketAddr::is_ipv4)
                })
            }
            _ => None,
        };
        Ok(Postgres {
            url: url.to_string(),
            addr,
            bindir: None,
            postmaster_pid: None,
            _cluster: None,
            _external: Some(External {
                admin_url: admin_url.to_owned(),
                database,
                psql,
            }),
        })
    }

    fn own_cluster(work_dir: &Path) -> Result<Self> {
        let bindir = pg_bindir().ok_or_else(|| {
            anyhow!("PostgreSQL server binaries not found (apt-get install postgresql), and DATABASE_URL is not set")
        })?;
        let as_postgres = is_root();
        let dir = work_dir.join("pg");
        fs::create_dir_all(&dir)?;
        if as_postgres {
            // initdb refuses to run as root: the cluster belongs to postgres.
            fs::set_permissions(work_dir, fs::Permissions::from_mode(0o755))?;
            run(
                Command::new("chown").args(["postgres:postgres"]).arg(&dir),
                "chown of the cluster directory to postgres",
            )?;
        }
        let data = dir.join("data");
        run(
            pg_command(as_postgres, &bindir.join("initdb"))
                .arg("-D")
                .arg(&data)
                .args(["-U", "postgres", "-A", "trust", "-E", "UTF8", "--no-sync"]),
            "initdb",
        )?;
        let port = free_port()?;
        // Defaults otherwise (fsync and synchronous_commit on): the durable
        // configuration a production vitals would run against. The lock
        // table sized as the README advises for 10,000 session advisory
        // locks per replica (the held-locks measurement holds that many).
        let opts = format!(
            "-p {port} -k {} -c listen_addresses=127.0.0.1 -c max_connections=200 -c max_locks_per_transaction=256",
            dir.display()
        );
        let cluster = Cluster {
            data: data.clone(),
            pg_ctl: bindir.join("pg_ctl"),
            as_postgres,
            opts,
            log: dir.join("server.log"),
        };
        run(&mut cluster.start_command(), "pg_ctl start")?;
        let postmaster_pid = fs::read_to_string(data.join("postmaster.pid"))
            .ok()
            .and_then(|s| s.lines().next()?.trim().parse().ok());
        let admin = format!("postgres://postgres@127.0.0.1:{port}/postgres?sslmode=disable");
        run(
            Command::new(bindir.join("psql")).args([
                "-X",
                "-q",
                "-v",
                "ON_ERROR_STOP=1",
                &admin,
                "-c",
                "CREATE DATABASE vitals_bench",
            ]),
            "creating the benchmark database",
        )?;
        Ok(Postgres {
            url: format!("postgres://postgres@127.0.0.1:{port}/vitals_bench?sslmode=disable"),
            addr: Some(SocketAddr::from(([127, 0, 0, 1], port))),
            bindir: Some(bindir),
            postmaster_pid,
            _cluster: Some(cluster),
            _external: None,
        })
    }

    /// Stops the cluster the benchmark started (fast shutdown: sessions are
    /// ended), keeps it down for `down`, and starts it again on the same
    /// port. Returns how long it was unreachable.
    pub(crate) async fn restart(&self, down: Duration) -> Result<Duration> {
        let cluster = self
            ._cluster
            .as_ref()
            .context("only a cluster the benchmark started can be restarted (not one on DATABASE_URL)")?;
        let started = Instant::now();
        run_async(cluster.pg_ctl(&["-m", "fast", "-w", "-t", "60", "stop"]), "pg_ctl stop").await?;
        tokio::time::sleep(down).await;
        run_async(cluster.start_command(), "pg_ctl start").await?;
        Ok(started.elapsed())
    }

    /// Runs one SQL query with psql and returns its unaligned output.
    pub(crate) fn query(&self, sql: &str) -> Result<String> {
        run(
            Command::new(self.tool("psql")).args([
                "-X",
                "-A",
                "-t",
                "-F",
                "|",
                "-v",
                "ON_ERROR_STOP=1",
                &self.url,
                "-c",
                sql,
            ]),
            "psql",
        )
        .map(|s| s.trim().to_owned())
    }

    /// The same database reached through `proxy` instead of directly.
    pub(crate) fn url_via(&self, proxy: SocketAddr) -> Result<String> {
        let mut url = url::Url::parse(&self.url)?;
        url.set_host(Some(&proxy.ip().to_string()))?;
        url.set_port(Some(proxy.port()))
            .map_err(|()| anyhow!("cannot set the port"))?;
        let others: Vec<(String, String)> = url
            .query_pairs()
            .filter(|(k, _)| k != "sslmode")
            .map(|(k, v)| (k.into_owned(), v.into_owned()))
            .collect();
        url.query_pairs_mut()
            .clear()
            .extend_pairs(others)
            .append_pair("sslmode", "disable");
        Ok(url.to_string())
    }
}

// -------------------------------------------------------------------- vitals

/// A vitals server process.
pub(crate) struct Vitals {
    pub(crate) addr: SocketAddr,
    pub(crate) proc: Proc,
}

impl Vitals {
    /// Starts `bin` on a free loopback port against `database_url` and waits
    /// until it is SERVING.
    pub(crate) async fn start(bin: &Path, database_url: &str, work_dir: &Path, name: &str) -> Result<Self> {
        Self::start_with(bin, database_url, work_dir, name, &[]).await
    }

    /// [`Vitals::start`] with extra environment variables (`VITALS_*`
    /// settings) for the process.
    pub(crate) async fn start_with(
        bin: &Path,
        database_url: &str,
        work_dir: &Path,
        name: &str,
        env: &[(&str, String)],
    ) -> Result<Self> {
        let log = work_dir.join(format!("{name}.log"));
        Self::start_logged(bin, database_url, work_dir, log, env).await
    }

    /// [`Vitals::start_with`], its output going to `log` (which may lie
    /// outside the work directory, to outlive it).
    pub(crate) async fn start_logged(
        bin: &Path,
        database_url: &str,
        work_dir: &Path,
        log: PathBuf,
        env: &[(&str, String)],
    ) -> Result<Self> {
        if !bin.exists() {
            bail!(
                "vitals binary {} not found: build it with `cargo build --release --locked` (or pass --vitals-bin)",
                bin.display()
            );
        }
        let addr = SocketAddr::from(([127, 0, 0, 1], free_port()?));
        let mut cmd = Command::new(bin);
        for (key, _) in std::env::vars() {
            if key.starts_with("PG") || key.starts_with("DATABASE_") || key.starts_with("VITALS_") {
                cmd.env_remove(key);
            }
        }
        cmd.env("DATABASE_URL", database_url)
            .env("VITALS_LISTEN_ADDR", addr.to_string())
            // Metrics on, as in production, on a port of their own: several
            // servers run side by side.
            .env("VITALS_METRICS_ADDR", "127.0.0.1:0")
            .env(
                "RUST_LOG",
                std::env::var("VITALS_BENCH_RUST_LOG").unwrap_or_else(|_| "info,sqlx=warn".to_owned()),
            );
        for (key, value) in env {
            cmd.env(key, value);
        }
        let mut proc = Proc::spawn("vitals", &mut cmd, log, work_dir)?;
        wait_serving(addr, &mut proc).await?;
        Ok(Vitals { addr, proc })
    }
}

async fn wait_serving(addr: SocketAddr, proc: &mut Proc) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        proc.check_alive()?;
        if let Ok(channel) = crate::workloads::channel(addr).await {
            let mut health = HealthClient::new(channel);
            let ready = health
                .check(HealthCheckRequest {
                    service: "vitals.v1.HealthCheckService".to_owned(),
                })
                .await
                .map(|r| r.get_ref().status == ServingStatus::Serving as i32)
                .unwrap_or(false);
            if ready {
                return Ok(());
            }
        }
        if Instant::now() > deadline {
            bail!(
                "vitals did not become SERVING within 60 s; log tail:\n{}",
                tail(&proc.log, 30)
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// VmRSS of `pid` in kB.
pub(crate) fn rss_kb(pid: u32) -> Option<u64> {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

// ---------------------------------------------------------------------- etcd

/// An etcd member with a temporary data directory on loopback ports.
pub(crate) struct Etcd {
    pub(crate) addr: SocketAddr,
    pub(crate) proc: Proc,
    pub(crate) version: String,
}

impl Etcd {
    /// Starts `bin` (default configuration: the WAL is fsynced, like
    /// PostgreSQL's commits) and waits until it answers.
    pub(crate) async fn start(bin: &Path, work_dir: &Path) -> Result<Self> {
        let version = Command::new(bin).arg("--version").output().with_context(|| {
            format!(
                "{} not found: install Debian's etcd-server (apt-get install etcd-server) or pass --etcd-bin",
                bin.display()
            )
        })?;
        let version = String::from_utf8_lossy(&version.stdout)
            .lines()
            .next()
            .unwrap_or("etcd")
            .to_owned();
        let client_port = free_port()?;
        let peer_port = free_port()?;
        let data = work_dir.join("etcd");
        fs::create_dir_all(&data)?;
        let client_url = format!("http://127.0.0.1:{client_port}");
        let peer_url = format!("http://127.0.0.1:{peer_port}");
        let mut cmd = Command::new(bin);
        for (key, _) in std::env::vars() {
            if key.starts_with("ETCD") {
                cmd.env_remove(key);
            }
        }
        cmd.arg("--name")
            .arg("bench")
            .arg("--data-dir")
            .arg(&data)
            .args(["--listen-client-urls", &client_url])
            .args(["--advertise-client-urls", &client_url])
            .args(["--listen-peer-urls", &peer_url])
            .args(["--initial-advertise-peer-urls", &peer_url])
            .args(["--initial-cluster", &format!("bench={peer_url}")])
            .args(["--initial-cluster-state", "new"])
            .args(["--logger", "zap", "--log-outputs", "stderr", "--log-level", "warn"]);
        let mut proc = Proc::spawn("etcd", &mut cmd, work_dir.join("etcd.log"), work_dir)?;
        let addr = SocketAddr::from(([127, 0, 0, 1], client_port));
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            proc.check_alive()?;
            if let Ok(mut client) = crate::workloads::etcd_client(addr).await {
                if client.get("bench-ready", None).await.is_ok() {
                    break;
                }
            }
            if Instant::now() > deadline {
                bail!("etcd did not answer within 30 s; log tail:\n{}", tail(&proc.log, 30));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Ok(Etcd { addr, proc, version })
    }
}

// ----------------------------------------------------------------------- cpu

/// Clock ticks per second of /proc/PID/stat times.
fn clock_ticks() -> f64 {
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse::<f64>().ok())
        .filter(|t| *t > 0.0)
        .unwrap_or(100.0)
}

/// utime + stime (ticks) and the parent pid of `pid`.
fn proc_times(pid: u32) -> Option<(u64, u32)> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may contain spaces; fields after it are plain.
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split(' ').collect();
    let ppid = fields.get(1)?.parse().ok()?;
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some((utime + stime, ppid))
}

/// Busy ticks of the whole machine (all CPUs), from /proc/stat.
fn machine_busy_ticks() -> Option<u64> {
    let stat = fs::read_to_string("/proc/stat").ok()?;
    let line = stat.lines().next()?;
    let v: Vec<u64> = line.split_whitespace().skip(1).filter_map(|x| x.parse().ok()).collect();
    // user nice system idle iowait irq softirq steal ...
    let idle = v.get(3)? + v.get(4).copied().unwrap_or(0);
    Some(v.iter().take(8).sum::<u64>() - idle)
}

/// Which processes to account CPU time to.
#[derive(Debug, Clone, Default)]
pub(crate) struct CpuTargets {
    pub(crate) vitals: Option<u32>,
    pub(crate) etcd: Option<u32>,
    pub(crate) postmaster: Option<u32>,
    pub(crate) pgbench: Option<u32>,
}

/// CPU ticks at one instant.
#[derive(Debug, Clone, Default)]
pub(crate) struct CpuSample {
    at: Option<Instant>,
    client: u64,
    vitals: u64,
    etcd: u64,
    /// Ticks per PostgreSQL process.
    postgres: BTreeMap<u32, u64>,
    pgbench: u64,
    machine: u64,
}

/// Cores used on average over a window (1.0 = one core fully busy).
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
pub(crate) struct CpuUse {
    pub(crate) client: f64,
    pub(crate) vitals: f64,
    pub(crate) postgres: f64,
    pub(crate) etcd: f64,
    pub(crate) pgbench: f64,
    pub(crate) machine: f64,
    /// Machine busy time not accounted to any of the above: other users.
    pub(crate) other: f64,
}

impl CpuTargets {
    pub(crate) fn sample(&self) -> CpuSample {
        let t = |pid: Option<u32>| pid.and_then(proc_times).map_or(0, |(ticks, _)| ticks);
        // PostgreSQL: the postmaster and every backend it forked, per pid,
        // so that a backend ending during the window does not make the sum
        // go backwards.
        let mut postgres = BTreeMap::new();
        if let Some(pm) = self.postmaster {
            postgres.insert(pm, t(Some(pm)));
            if let Ok(dir) = fs::read_dir("/proc") {
                for entry in dir.filter_map(|e| e.ok()) {
                    if let Some(pid) = entry.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) {
                        if let Some((ticks, ppid)) = proc_times(pid) {
                            if ppid == pm {
                                postgres.insert(pid, ticks);
                            }
                        }
                    }
                }
            }
        }
        CpuSample {
            at: Some(Instant::now()),
            client: t(Some(std::process::id())),
            vitals: t(self.vitals),
            etcd: t(self.etcd),
            postgres,
            pgbench: t(self.pgbench),
            machine: machine_busy_ticks().unwrap_or(0),
        }
    }
}

impl CpuSample {
    /// Average cores used between `self` and `later`.
    pub(crate) fn until(&self, later: &CpuSample) -> CpuUse {
        let (Some(a), Some(b)) = (self.at, later.at) else {
            return CpuUse::default();
        };
        let secs = b.duration_since(a).as_secs_f64().max(1e-3);
        let hz = clock_ticks();
        let cores = |x: u64, y: u64| (y.saturating_sub(x)) as f64 / hz / secs;
        let mut u = CpuUse {
            client: cores(self.client, later.client),
            vitals: cores(self.vitals, later.vitals),
            postgres: later
                .postgres
                .iter()
                .map(|(pid, ticks)| cores(self.postgres.get(pid).copied().unwrap_or(0), *ticks))
                .sum(),
            etcd: cores(self.etcd, later.etcd),
            pgbench: cores(self.pgbench, later.pgbench),
            machine: cores(self.machine, later.machine),
            other: 0.0,
        };
        u.other = (u.machine - u.client - u.vitals - u.postgres - u.etcd - u.pgbench).max(0.0);
        u
    }
}

/// Samples CPU at `warmup` and at `warmup + duration` from now, in the
/// background; the handle yields the use over the measured window.
pub(crate) fn cpu_window(targets: CpuTargets, warmup: Duration, duration: Duration) -> tokio::task::JoinHandle<CpuUse> {
    tokio::spawn(async move {
        tokio::time::sleep(warmup).await;
        let a = targets.sample();
        tokio::time::sleep(duration).await;
        let b = targets.sample();
        a.until(&b)
    })
}
