//! Starts a real vitals on port 0 against a fresh database per test: a
//! PostgreSQL database, or an embedded store in a fresh temporary data dir.
//!
//! `DATABASE_URL` names an admin connection (scripts/test.sh provides one);
//! each PostgreSQL [`TestDb`] creates its own database from it, so tests never
//! share state and run in parallel.
//!
//! [`both_backends!`] runs one test body against each backend.

use std::{
    net::SocketAddr,
    ops::Index,
    path::Path,
    sync::Arc,
    time::{Duration, Instant},
};

use sqlx::{
    Connection, Executor, PgConnection, SqliteConnection,
    sqlite::{SqliteConnectOptions, SqliteRow},
};
use tokio::{sync::oneshot, task::JoinHandle};
use tonic::{
    Code, Status,
    transport::{Channel, ClientTlsConfig, Endpoint},
};
use tonic_types::{ErrorInfo, StatusExt};
use vitals::{
    Application, Config,
    auth::reload::ReloadCounts,
    lock::{LocalLockStats, Locks},
    proto::{health_check_service_client::HealthCheckServiceClient, lock_service_client::LockServiceClient},
    store::{FeedStats, Store, TransitionFeed},
};

/// Instantiates test bodies for both backends. For each `name`, an
/// `async fn name(backend: Backend)` in the same module is the body, and
/// `both_backends!(name)` adds the tests `name::postgres` and
/// `name::embedded`. `both_backends!(multi_thread: name)` runs them on a
/// two-thread runtime.
macro_rules! both_backends {
    (multi_thread: $($name:ident),+ $(,)?) => {
        $(both_backends!(@one [tokio::test(flavor = "multi_thread", worker_threads = 2)] $name);)+
    };
    ($($name:ident),+ $(,)?) => {
        $(both_backends!(@one [tokio::test] $name);)+
    };
    (@one [$($test:tt)+] $name:ident) => {
        mod $name {
            #[$($test)+]
            async fn postgres() {
                super::$name(crate::harness::Backend::Postgres).await;
            }

            #[$($test)+]
            async fn embedded() {
                super::$name(crate::harness::Backend::Embedded).await;
            }
        }
    };
}

/// Which store a test's vitals runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// A fresh PostgreSQL database on the `DATABASE_URL` server.
    Postgres,
    /// The embedded SQLite store in a fresh temporary data directory.
    Embedded,
}

/// The admin URL tests create their databases from.
pub fn admin_url() -> String {
    std::env::var("DATABASE_URL").unwrap_or_else(|_| {
        panic!("DATABASE_URL must name a PostgreSQL server for the integration tests; run scripts/test.sh")
    })
}

/// `url` with its database name replaced by `db`.
pub fn with_database(url: &str, db: &str) -> String {
    let (base, query) = match url.split_once('?') {
        Some((b, q)) => (b, Some(q)),
        None => (url, None),
    };
    let scheme_end = base.find("://").map_or(0, |i| i + 3);
    let base = match base[scheme_end..].find('/') {
        Some(slash) => &base[..scheme_end + slash],
        None => base,
    };
    match query {
        Some(q) => format!("{base}/{db}?{q}"),
        None => format!("{base}/{db}"),
    }
}

/// A database of one test, dropped when the value is.
pub struct TestDb {
    pub backend: Backend,
    pub name: String,
    /// What vitals is given as `--database-url`: a PostgreSQL URL, or
    /// `sqlite://<data dir>/vitals.db`.
    pub url: String,
    /// The embedded store's data directory, removed on drop.
    dir: Option<tempfile::TempDir>,
}

impl TestDb {
    /// A fresh database of `backend`.
    pub async fn create(backend: Backend) -> TestDb {
        match backend {
            Backend::Postgres => Self::postgres().await,
            Backend::Embedded => Self::embedded(),
        }
    }

    /// A fresh embedded store: an empty temporary data directory.
    pub fn embedded() -> TestDb {
        let dir = tempfile::Builder::new()
            .prefix("vitals-test-")
            .tempdir()
            .expect("create a temporary data directory");
        TestDb {
            backend: Backend::Embedded,
            name: dir.path().display().to_string(),
            url: format!("sqlite://{}", dir.path().join("vitals.db").display()),
            dir: Some(dir),
        }
    }

    /// A fresh PostgreSQL database.
    pub async fn postgres() -> TestDb {
        Self::postgres_created_with("").await
    }

    /// A fresh database of `backend` whose text order is not byte order: a
    /// PostgreSQL database with ICU's root collation as its default (`"a" <
    /// "B" < "b"`), where the test cluster's own is byte order. The embedded
    /// store has no such setting; it compares text byte by byte.
    pub async fn create_with_linguistic_collation(backend: Backend) -> TestDb {
        match backend {
            Backend::Postgres => {
                Self::postgres_created_with(" TEMPLATE template0 LOCALE_PROVIDER icu ICU_LOCALE 'und'").await
            }
            Backend::Embedded => Self::embedded(),
        }
    }

    /// A fresh PostgreSQL database, `options` appended to its CREATE DATABASE.
    async fn postgres_created_with(options: &str) -> TestDb {
        let name = format!("vitals_test_{}", uuid::Uuid::new_v4().simple());
        let admin = admin_url();
        let mut conn = PgConnection::connect(&admin)
            .await
            .expect("connect to the admin database");
        conn.execute(format!("CREATE DATABASE {name}{options}").as_str())
            .await
            .unwrap_or_else(|e| panic!("create the test database{options}: {e}"));
        conn.close().await.ok();
        TestDb {
            backend: Backend::Postgres,
            url: with_database(&admin, &name),
            name,
            dir: None,
        }
    }

    /// The embedded store's data directory.
    pub fn data_dir(&self) -> &Path {
        self.dir
            .as_ref()
            .expect("an embedded store has a data directory")
            .path()
    }

    /// A direct connection to this test's PostgreSQL database, for assertions.
    pub async fn connect(&self) -> PgConnection {
        assert_eq!(self.backend, Backend::Postgres, "connect() is for PostgreSQL tests");
        PgConnection::connect(&self.url)
            .await
            .expect("connect to the test database")
    }

    /// A direct connection to this test's embedded store, for assertions.
    pub async fn connect_embedded(&self) -> SqliteConnection {
        let options = SqliteConnectOptions::new().filename(self.data_dir().join("vitals.db"));
        SqliteConnection::connect_with(&options)
            .await
            .expect("open the embedded store")
    }

    /// The integer `sql` returns for its one parameter `$1 = arg`, on either
    /// backend (the tables and columns are the same).
    pub async fn scalar(&self, sql: &str, arg: &str) -> i64 {
        match self.backend {
            Backend::Postgres => {
                let mut conn = self.connect().await;
                sqlx::query_scalar(sql).bind(arg).fetch_one(&mut conn).await.unwrap()
            }
            Backend::Embedded => {
                let mut conn = self.connect_embedded().await;
                sqlx::query_scalar(sql).bind(arg).fetch_one(&mut conn).await.unwrap()
            }
        }
    }

    /// Runs `sql` (any number of statements, no parameters) on a direct
    /// connection: rows written behind vitals' back.
    pub async fn execute(&self, sql: &str) {
        match self.backend {
            Backend::Postgres => {
                let mut conn = self.connect().await;
                sqlx::raw_sql(sql).execute(&mut conn).await.unwrap();
            }
            Backend::Embedded => {
                let mut conn = self.connect_embedded().await;
                sqlx::raw_sql(sql).execute(&mut conn).await.unwrap();
            }
        }
    }

    /// Stored transitions (sequence, system, check, from, to), in sequence order.
    pub async fn stored_transitions(&self) -> Vec<(i64, String, String, i16, i16)> {
        const SQL: &str =
            "SELECT sequence, system_id, check_id, from_status, to_status FROM transitions ORDER BY sequence";
        match self.backend {
            Backend::Postgres => {
                let mut conn = self.connect().await;
                sqlx::query_as(SQL).fetch_all(&mut conn).await.unwrap()
            }
            Backend::Embedded => {
                let mut conn = self.connect_embedded().await;
                let rows: Vec<SqliteRow> = sqlx::query(SQL).fetch_all(&mut conn).await.unwrap();
                rows.iter()
                    .map(|r| {
                        use sqlx::Row;
                        (r.get(0), r.get(1), r.get(2), r.get(3), r.get(4))
                    })
                    .collect()
            }
        }
    }
}

/// How long a test waits for something that should happen promptly. Only a
/// guard that turns a hang into a failure, never the thing under test, so it
/// is generous: a loaded 2-core CI machine runs the whole suite at once.
pub const PATIENCE: Duration = Duration::from_secs(20);

/// The pause between two tries of a polled condition: short against the
/// waits it serves, long enough that polling does not take a core from the
/// servers under test (a `yield_now` loop against PostgreSQL does).
const POLL_PAUSE: Duration = Duration::from_millis(10);

/// Polls `probe` until it returns `Ok`, pausing briefly between tries, and
/// returns its value: a state observed (a lock table, a count in PostgreSQL)
/// rather than assumed after a sleep. Panics after `within`, naming `what`
/// was awaited (a state: "the lock table is empty") and the last `Err`,
/// what was seen instead.
pub async fn eventually<T, E: std::fmt::Display>(
    within: Duration,
    what: &str,
    mut probe: impl AsyncFnMut() -> Result<T, E>,
) -> T {
    let deadline = Instant::now() + within;
    loop {
        match probe().await {
            Ok(value) => return value,
            Err(seen) => assert!(
                Instant::now() < deadline,
                "timed out after {within:?} waiting until {what}: {seen}"
            ),
        }
        tokio::time::sleep(POLL_PAUSE).await;
    }
}

/// [`eventually`] for a condition read without I/O.
pub async fn until(within: Duration, what: &str, mut condition: impl FnMut() -> bool) {
    eventually(within, what, async || {
        if condition() {
            Ok(())
        } else {
            Err("the condition still does not hold")
        }
    })
    .await;
}

/// Returns once the count `sql` reads on `conn` equals `expected` (a session
/// queued on a lock, say). Panics naming `what` after [`PATIENCE`].
pub async fn until_count(conn: &mut PgConnection, sql: &str, expected: i64, what: &str) {
    eventually(PATIENCE, what, async || {
        let count: i64 = sqlx::query_scalar(sql).fetch_one(&mut *conn).await.unwrap();
        if count == expected {
            Ok(())
        } else {
            Err(format!("the count is {count}, expected {expected}"))
        }
    })
    .await;
}

/// `GET path` on `addr` over HTTP/1.1 (TCP_NODELAY, `Connection: close`):
/// the status line and headers, and the body.
pub async fn http_get(addr: SocketAddr, path: &str) -> (String, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let exchange = async {
        let mut stream = tokio::net::TcpStream::connect(addr).await.expect("connect over HTTP");
        stream.set_nodelay(true).expect("TCP_NODELAY");
        let request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
        stream.write_all(request.as_bytes()).await.expect("send the request");
        let mut reply = Vec::new();
        stream.read_to_end(&mut reply).await.expect("read the reply");
        String::from_utf8(reply).expect("a UTF-8 reply")
    };
    let reply = tokio::time::timeout(PATIENCE, exchange)
        .await
        .unwrap_or_else(|_| panic!("GET {path} on {addr} did not answer"));
    let (head, body) = reply.split_once("\r\n\r\n").expect("a reply with headers");
    (head.to_owned(), body.to_owned())
}

/// Checks the code, `ErrorInfo.reason` and `ErrorInfo.domain` of `status`
/// and returns the `ErrorInfo`.
pub fn assert_reason(status: &Status, code: Code, reason: &str) -> ErrorInfo {
    assert_eq!(status.code(), code, "{status:?}");
    let info = status
        .get_details_error_info()
        .unwrap_or_else(|| panic!("no ErrorInfo in {status:?}"));
    assert_eq!(info.reason, reason, "{status:?}");
    assert_eq!(info.domain, vitals::error::ERROR_DOMAIN);
    info
}

/// Counts this test database's work-pool sessions blocked on a lock.
pub const WORK_SESSIONS_BLOCKED: &str = "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() \
     AND application_name = 'vitals-work' AND wait_event_type = 'Lock'";

impl Drop for TestDb {
    fn drop(&mut self) {
        if self.backend == Backend::Embedded {
            return; // the TempDir removes itself
        }
        let name = self.name.clone();
        let admin = admin_url();
        // Drop runs outside any runtime guarantee: use a thread of its own.
        let _ = std::thread::spawn(move || {
            let Ok(rt) = tokio::runtime::Builder::new_current_thread().enable_all().build() else {
                return;
            };
            rt.block_on(async move {
                if let Ok(mut conn) = PgConnection::connect(&admin).await {
                    let _ = conn
                        .execute(format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)").as_str())
                        .await;
                }
            });
        })
        .join();
    }
}

/// A running vitals.
pub struct TestApp {
    pub addr: SocketAddr,
    /// Where it serves `/metrics` (port 0 bound like the gRPC port), if it does.
    pub metrics_addr: Option<SocketAddr>,
    /// The plaintext grpc.health.v1 listener, with `--probe-addr`.
    pub probe_addr: Option<SocketAddr>,
    /// How the server's TLS and auth files were reloaded.
    pub tls_reloads: Option<Arc<ReloadCounts>>,
    pub auth_reloads: Option<Arc<ReloadCounts>>,
    /// How this test's own channels speak TLS to the server (`None`:
    /// plaintext).
    client_tls: Option<ClientTlsConfig>,
    /// Its lock service, to look into the embedded lock table.
    locks: Locks,
    /// Its store and transition feed, to count reads and watchers.
    store: Store,
    feed: TransitionFeed,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<Result<(), vitals::app::StartError>>>,
}

/// A plaintext endpoint for `addr`.
pub fn plaintext_endpoint(addr: SocketAddr) -> Endpoint {
    Endpoint::from_shared(format!("http://{addr}"))
        .expect("valid endpoint")
        .tcp_nodelay(true)
        .connect_timeout(Duration::from_secs(5))
}

/// A TLS endpoint for `addr` configured by `tls`.
pub fn tls_endpoint(addr: SocketAddr, tls: ClientTlsConfig) -> Endpoint {
    Endpoint::from_shared(format!("https://{addr}"))
        .expect("valid endpoint")
        .tls_config(tls)
        .expect("a valid client TLS configuration")
        .tcp_nodelay(true)
        .connect_timeout(Duration::from_secs(5))
}

/// Flags every test server gets: port 0 (for `/metrics` too), quick
/// readiness checks. Systems are counted for `vitals_systems` only hourly, so
/// that the count's query does not join the statements and connections
/// other tests count; the metrics tests ask for it sooner.
pub fn base_flags(database_url: &str) -> Vec<String> {
    [
        "--listen-addr",
        "127.0.0.1:0",
        "--metrics-addr",
        "127.0.0.1:0",
        "--metrics-systems-interval-ms",
        "3600000",
        "--database-url",
        database_url,
        "--readiness-interval-ms",
        "100",
        "--shutdown-grace-ms",
        "2000",
    ]
    .iter()
    .map(|s| (*s).to_owned())
    .collect()
}

impl TestApp {
    /// Starts vitals on `db` with extra flags, and waits until it serves.
    pub async fn start(db: &TestDb, extra: &[&str]) -> TestApp {
        let app = Self::start_unready(&db.url, extra).await;
        app.wait_serving("").await;
        app
    }

    /// Starts vitals on `db` with extra flags (its TLS among them), and
    /// waits until it serves, asking over TLS configured by `client_tls`,
    /// which every channel of [`Self::channel`] then uses.
    pub async fn start_tls(db: &TestDb, extra: &[&str], client_tls: ClientTlsConfig) -> TestApp {
        let mut app = Self::start_unready(&db.url, extra).await;
        app.client_tls = Some(client_tls);
        app.wait_serving("").await;
        app
    }

    /// Starts vitals without waiting for the database. A flag in `extra`
    /// replaces the base flag of the same name.
    pub async fn start_unready(database_url: &str, extra: &[&str]) -> TestApp {
        let base = base_flags(database_url);
        let mut flags: Vec<String> = base
            .chunks(2)
            .filter(|pair| !extra.contains(&pair[0].as_str()))
            .flatten()
            .cloned()
            .collect();
        flags.extend(extra.iter().map(|s| (*s).to_owned()));
        let config = Config::from_flags(flags).expect("valid test configuration");
        let app = Application::build(config).await.expect("build the application");
        let addr = app.local_addr();
        let metrics_addr = app.metrics_addr();
        let probe_addr = app.probe_addr();
        let tls_reloads = app.tls_reloads();
        let auth_reloads = app.auth_reloads();
        let locks = app.locks().clone();
        let store = app.store().clone();
        let feed = app.feed().clone();
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(app.run_until_stopped(async move {
            let _ = stopped.await;
        }));
        TestApp {
            addr,
            metrics_addr,
            probe_addr,
            tls_reloads,
            auth_reloads,
            client_tls: None,
            locks,
            store,
            feed,
            stop: Some(stop),
            task: Some(task),
        }
    }

    /// Its lock service.
    pub fn locks(&self) -> &Locks {
        &self.locks
    }

    /// What the server's lock table holds.
    pub fn local_lock_stats(&self) -> LocalLockStats {
        self.locks.local_stats()
    }

    /// How this server's streaks of local hand-offs ended so far.
    pub fn streak_releases(&self) -> vitals::lock::StreakReleases {
        self.locks.streak_releases()
    }

    /// Holds `system`'s serialisation lock in this server, as a SubmitRun
    /// stalled in its critical section would, until the returned sender is
    /// used or dropped. Returns once the lock is held.
    pub async fn hold_system_lock(&self, system: &str) -> oneshot::Sender<()> {
        let system = vitals::domain::SystemId::parse("system_id", system.to_owned()).expect("a valid system id");
        let locks = self.locks.clone();
        let (held_tx, held_rx) = oneshot::channel();
        let (release_tx, release_rx) = oneshot::channel::<()>();
        tokio::spawn(async move {
            let held = locks
                .with_system_lock(&system, None, || async move {
                    let _ = held_tx.send(());
                    let _ = release_rx.await;
                    Ok(())
                })
                .await;
            held.expect("the system's lock is taken and released");
        });
        tokio::time::timeout(Duration::from_secs(10), held_rx)
            .await
            .expect("the system's lock is granted in time")
            .expect("the holder reports the grant");
        release_tx
    }

    /// Reads of transitions after a sequence the server's store ran (the
    /// feed's and watchers' replays).
    pub fn transition_reads(&self) -> u64 {
        self.store.transition_reads()
    }

    /// What the server's transition feed and its watchers are doing.
    pub fn feed_stats(&self) -> FeedStats {
        self.feed.stats()
    }

    /// Places free in the server's client lock budget (`VITALS_MAX_LOCKS`).
    pub fn lock_budget_available(&self) -> usize {
        self.locks.budget_available()
    }

    /// The body of `GET /metrics`, checked to be a 200 in the Prometheus
    /// text format.
    pub async fn scrape(&self) -> String {
        let addr = self.metrics_addr.expect("this server serves /metrics");
        let (head, body) = http_get(addr, "/metrics").await;
        assert!(head.starts_with("HTTP/1.1 200"), "GET /metrics: {head}");
        assert!(
            head.to_ascii_lowercase()
                .contains("content-type: text/plain; version=0.0.4"),
            "GET /metrics: {head}"
        );
        body
    }

    pub fn endpoint(&self) -> Endpoint {
        match &self.client_tls {
            None => plaintext_endpoint(self.addr),
            Some(tls) => tls_endpoint(self.addr, tls.clone()),
        }
    }

    pub async fn channel(&self) -> Channel {
        self.endpoint().connect().await.expect("connect to vitals")
    }

    pub async fn health_client(&self) -> HealthCheckServiceClient<Channel> {
        HealthCheckServiceClient::new(self.channel().await)
    }

    pub async fn lock_client(&self) -> LockServiceClient<Channel> {
        LockServiceClient::new(self.channel().await)
    }

    pub async fn grpc_health(&self) -> tonic_health::pb::health_client::HealthClient<Channel> {
        tonic_health::pb::health_client::HealthClient::new(self.channel().await)
    }

    /// The serving status of `service` as grpc.health.v1 reports it.
    pub async fn serving_status(&self, service: &str) -> tonic_health::pb::health_check_response::ServingStatus {
        let mut client = self.grpc_health().await;
        let reply = client
            .check(tonic_health::pb::HealthCheckRequest {
                service: service.to_owned(),
            })
            .await
            .expect("health check answers");
        reply.into_inner().status()
    }

    /// Waits (by watching the health stream, not by sleeping) until `service` is SERVING.
    pub async fn wait_serving(&self, service: &str) {
        self.wait_status(service, tonic_health::pb::health_check_response::ServingStatus::Serving)
            .await;
    }

    /// Waits until `service` reports `want`, failing after 20 s.
    pub async fn wait_status(&self, service: &str, want: tonic_health::pb::health_check_response::ServingStatus) {
        let mut client = self.grpc_health().await;
        let mut stream = client
            .watch(tonic_health::pb::HealthCheckRequest {
                service: service.to_owned(),
            })
            .await
            .expect("health watch")
            .into_inner();
        let wait = async {
            while let Some(Ok(reply)) = stream.message().await.transpose() {
                if reply.status() == want {
                    return;
                }
            }
            panic!("health stream ended before {want:?}");
        };
        tokio::time::timeout(Duration::from_secs(20), wait)
            .await
            .unwrap_or_else(|_| panic!("{service:?} never became {want:?}"));
    }

    /// Stops the server and waits for its shutdown sequence to finish.
    pub async fn stop(mut self) {
        self.stop_in_place().await;
    }

    async fn stop_in_place(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            let result = tokio::time::timeout(Duration::from_secs(30), task)
                .await
                .expect("shutdown finishes");
            result.expect("server task").expect("server ran cleanly");
        }
    }
}

impl Drop for TestApp {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

/// The replicas of one test, all on one database. With PostgreSQL each is a
/// server of its own; the embedded store serves a single replica, so one
/// server stands in for all of them. `replicas[i]` is replica `i`.
pub struct Replicas(Vec<TestApp>);

impl Replicas {
    /// Starts `n` replicas on `db` with `extra` flags and waits until they serve.
    pub async fn start(db: &TestDb, n: usize, extra: &[&str]) -> Replicas {
        let servers = match db.backend {
            Backend::Postgres => n,
            Backend::Embedded => 1,
        };
        let apps = futures::future::join_all((0..servers).map(|_| TestApp::start(db, extra))).await;
        Replicas(apps)
    }

    /// Stops every server.
    pub async fn stop(self) {
        futures::future::join_all(self.0.into_iter().map(TestApp::stop)).await;
    }
}

impl Index<usize> for Replicas {
    type Output = TestApp;

    fn index(&self, i: usize) -> &TestApp {
        &self.0[i % self.0.len()]
    }
}
