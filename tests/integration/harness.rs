//! Starts a real vitals on port 0 against a fresh PostgreSQL database per test.
//!
//! `DATABASE_URL` names an admin connection (scripts/test.sh provides one);
//! each [`TestApp`] creates its own database from it, so tests never share
//! state and run in parallel.

use std::{net::SocketAddr, time::Duration};

use sqlx::{Connection, Executor, PgConnection};
use tokio::{sync::oneshot, task::JoinHandle};
use tonic::transport::{Channel, Endpoint};
use vitals::{
    Application, Config,
    proto::{health_check_service_client::HealthCheckServiceClient, lock_service_client::LockServiceClient},
};

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
    pub name: String,
    pub url: String,
}

impl TestDb {
    pub async fn create() -> TestDb {
        let name = format!("vitals_test_{}", uuid::Uuid::new_v4().simple());
        let admin = admin_url();
        let mut conn = PgConnection::connect(&admin)
            .await
            .expect("connect to the admin database");
        conn.execute(format!("CREATE DATABASE {name}").as_str())
            .await
            .expect("create the test database");
        conn.close().await.ok();
        TestDb {
            url: with_database(&admin, &name),
            name,
        }
    }

    /// A direct connection to this test's database, for assertions.
    pub async fn connect(&self) -> PgConnection {
        PgConnection::connect(&self.url)
            .await
            .expect("connect to the test database")
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
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
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<Result<(), vitals::app::StartError>>>,
}

/// Flags every test server gets: port 0, quick readiness checks.
pub fn base_flags(database_url: &str) -> Vec<String> {
    [
        "--listen-addr",
        "127.0.0.1:0",
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

    /// Starts vitals without waiting for the database.
    pub async fn start_unready(database_url: &str, extra: &[&str]) -> TestApp {
        let mut flags = base_flags(database_url);
        flags.extend(extra.iter().map(|s| (*s).to_owned()));
        let config = Config::from_flags(flags).expect("valid test configuration");
        let app = Application::build(config).await.expect("build the application");
        let addr = app.local_addr();
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(app.run_until_stopped(async move {
            let _ = stopped.await;
        }));
        TestApp {
            addr,
            stop: Some(stop),
            task: Some(task),
        }
    }

    pub fn endpoint(&self) -> Endpoint {
        Endpoint::from_shared(format!("http://{}", self.addr))
            .expect("valid endpoint")
            .tcp_nodelay(true)
            .connect_timeout(Duration::from_secs(5))
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
