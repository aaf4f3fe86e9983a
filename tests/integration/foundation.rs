//! The server as a whole: health, reflection, configuration, the two pools,
//! shutdown.

use std::time::{Duration, Instant};

use sqlx::{Connection, Executor, Row};
use tonic::Code;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_reflection::pb::v1::{
    ServerReflectionRequest, server_reflection_client::ServerReflectionClient,
    server_reflection_request::MessageRequest, server_reflection_response::MessageResponse,
};
use vitals::{Config, db::Pools, proto};

use crate::harness::{Backend, TestApp, TestDb, assert_reason};

both_backends!(health_reports_serving_for_every_vitals_service_once_the_database_answers);
async fn health_reports_serving_for_every_vitals_service_once_the_database_answers(backend: Backend) {
    let db = TestDb::create(backend).await;
    let app = TestApp::start(&db, &[]).await;
    for service in ["", "vitals.v1.HealthCheckService", "vitals.v1.LockService"] {
        assert_eq!(app.serving_status(service).await, ServingStatus::Serving, "{service:?}");
    }
    app.stop().await;
}

#[tokio::test]
async fn before_the_database_is_reachable_health_says_not_serving_and_rpcs_fail_fast() {
    // Port 1 on loopback refuses connections: a database that is down.
    let app = TestApp::start_unready("postgres://vitals:vitals@127.0.0.1:1/vitals", &[]).await;
    assert_eq!(
        app.serving_status("vitals.v1.LockService").await,
        ServingStatus::NotServing
    );
    let mut client = app.health_client().await;
    let started = Instant::now();
    let err = client
        .get_system_health(proto::GetSystemHealthRequest { system_id: "a".into() })
        .await
        .unwrap_err();
    assert_reason(&err, Code::Unavailable, "DATABASE_UNAVAILABLE");
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "took {:?}",
        started.elapsed()
    );
    app.stop().await;
}

both_backends!(health_turns_not_serving_when_shutdown_begins);
async fn health_turns_not_serving_when_shutdown_begins(backend: Backend) {
    let db = TestDb::create(backend).await;
    let app = TestApp::start(&db, &[]).await;
    let mut health = app.grpc_health().await;
    let mut stream = health
        .watch(tonic_health::pb::HealthCheckRequest {
            service: "vitals.v1.HealthCheckService".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        stream.message().await.unwrap().unwrap().status(),
        ServingStatus::Serving
    );
    let stopping = tokio::spawn(app.stop());
    let next = tokio::time::timeout(Duration::from_secs(10), stream.message())
        .await
        .expect("an update arrives");
    assert_eq!(next.unwrap().unwrap().status(), ServingStatus::NotServing);
    stopping.await.unwrap();
}

async fn reflection_services(app: &TestApp) -> Vec<String> {
    let mut client = ServerReflectionClient::new(app.channel().await);
    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut replies = client
        .server_reflection_info(tokio_stream::iter([request]))
        .await
        .unwrap()
        .into_inner();
    let reply = replies.message().await.unwrap().unwrap();
    match reply.message_response {
        Some(MessageResponse::ListServicesResponse(list)) => list.service.into_iter().map(|s| s.name).collect(),
        other => panic!("unexpected reflection reply {other:?}"),
    }
}

#[tokio::test]
async fn reflection_lists_both_vitals_services_and_grpc_health() {
    let db = TestDb::postgres().await;
    let app = TestApp::start(&db, &[]).await;
    let services = reflection_services(&app).await;
    for want in [
        "vitals.v1.HealthCheckService",
        "vitals.v1.LockService",
        "grpc.health.v1.Health",
    ] {
        assert!(services.iter().any(|s| s == want), "{want} missing from {services:?}");
    }
    // v1alpha answers too (grpcurl speaks only v1alpha).
    let mut alpha =
        tonic_reflection::pb::v1alpha::server_reflection_client::ServerReflectionClient::new(app.channel().await);
    let request = tonic_reflection::pb::v1alpha::ServerReflectionRequest {
        host: String::new(),
        message_request: Some(
            tonic_reflection::pb::v1alpha::server_reflection_request::MessageRequest::ListServices(String::new()),
        ),
    };
    let mut replies = alpha
        .server_reflection_info(tokio_stream::iter([request]))
        .await
        .unwrap()
        .into_inner();
    let reply = replies.message().await.unwrap().unwrap();
    assert!(format!("{reply:?}").contains("vitals.v1.LockService"));
    app.stop().await;
}

/// Whether reflection protocol `$pb` (v1 or v1alpha; their messages are
/// the same but distinct types) resolves `$symbol` to a file descriptor.
macro_rules! resolves_symbol {
    ($($pb:ident)::+, $channel:expr, $symbol:expr) => {{
        use $($pb)::+::{
            ServerReflectionRequest, server_reflection_client::ServerReflectionClient,
            server_reflection_request::MessageRequest, server_reflection_response::MessageResponse,
        };
        let request = ServerReflectionRequest {
            host: String::new(),
            message_request: Some(MessageRequest::FileContainingSymbol($symbol.into())),
        };
        let reply = ServerReflectionClient::new($channel)
            .server_reflection_info(tokio_stream::iter([request]))
            .await
            .unwrap()
            .into_inner()
            .message()
            .await;
        // An unknown symbol ends the stream with NOT_FOUND.
        matches!(
            reply,
            Ok(Some(r)) if matches!(r.message_response, Some(MessageResponse::FileDescriptorResponse(ref f)) if !f.file_descriptor_proto.is_empty())
        )
    }};
}

/// The error details every error carries resolve through reflection, on
/// both protocol versions, so grpcurl and buf curl can print them without
/// local protos.
#[tokio::test]
async fn reflection_resolves_the_error_detail_types() {
    let db = TestDb::embedded();
    let app = TestApp::start(&db, &[]).await;
    for symbol in ["google.rpc.ErrorInfo", "google.rpc.BadRequest", "google.rpc.RetryInfo"] {
        assert!(
            resolves_symbol!(tonic_reflection::pb::v1, app.channel().await, symbol),
            "v1 cannot resolve {symbol}"
        );
        assert!(
            resolves_symbol!(tonic_reflection::pb::v1alpha, app.channel().await, symbol),
            "v1alpha cannot resolve {symbol}"
        );
    }
    // A symbol nobody registered is not found, so the check above can fail.
    assert!(!resolves_symbol!(
        tonic_reflection::pb::v1,
        app.channel().await,
        "google.rpc.NoSuchType"
    ));
    app.stop().await;
}

#[test]
fn a_malformed_environment_variable_stops_start_up_naming_the_variable() {
    for (var, value) in [
        ("DATABASE_POOL_MAX", "abc"),
        ("DATABASE_LOCK_POOL_MAX", "0"),
        ("DATABASE_POOL_CONNECTION_TIMEOUT_MS", "-5"),
        ("DATABASE_LOCK_TIMEOUT_MS", "1.5"),
    ] {
        let output = std::process::Command::new(env!("CARGO_BIN_EXE_vitals"))
            .env(var, value)
            .env("DATABASE_URL", "postgres://127.0.0.1:1/none")
            .output()
            .unwrap();
        assert!(!output.status.success(), "{var}={value} was accepted");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(stderr.contains(var), "{var}: {stderr}");
        assert!(
            stderr.contains("between"),
            "{var}: the accepted range is missing from {stderr}"
        );
    }
}

/// Pools larger than the server accepts start anyway (a replica count is
/// not known here) but say so in the log, with both figures.
#[test]
fn pools_larger_than_the_server_accepts_are_warned_about_at_start() {
    use std::io::{BufRead, BufReader};
    let db = tokio::runtime::Runtime::new().unwrap().block_on(TestDb::postgres());
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_vitals"))
        .env("DATABASE_URL", &db.url)
        .env("VITALS_LISTEN_ADDR", "127.0.0.1:0")
        .env("VITALS_METRICS_ADDR", "127.0.0.1:0")
        .env("DATABASE_POOL_MAX", "5000")
        .env("RUST_LOG", "warn")
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    // Read on a thread, so the deadline holds even if the log stays silent.
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut seen = Vec::new();
    let warning = loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(line) if line.contains("exceeds the server's max_connections") => break Some(line),
            Ok(line) => seen.push(line),
            Err(_) => break None,
        }
    };
    let _ = child.kill();
    let _ = child.wait();
    let warning = warning.unwrap_or_else(|| panic!("no sizing warning; log: {seen:#?}"));
    // 5000 + 2 + 3 connections wanted (with the shared-lock session).
    assert!(warning.contains("wanted=5005"), "{warning}");
    assert!(warning.contains("available="), "{warning}");
}

#[tokio::test]
async fn the_two_pools_carry_their_own_application_name_and_session_settings() {
    let db = TestDb::postgres().await;
    let config = Config::from_flags([
        "--database-url",
        db.url.as_str(),
        "--database-lock-idle-tx-timeout-ms",
        "4321",
        "--database-lock-timeout-ms",
        "1234",
    ])
    .unwrap();
    let pools = Pools::connect_lazy(&config).unwrap();
    let mut lock = sqlx::PgConnection::connect_with(&pools.lock.options()).await.unwrap();
    let mut work = pools.work.acquire().await.unwrap();
    let show = |name: &'static str| format!("SHOW {name}");
    for (name, lock_want, work_want) in [
        ("application_name", "vitals-lock", "vitals-work"),
        ("idle_session_timeout", "5321ms", "0"),
        // Work: the wait for the system's lock (1.234 s, under the 15 s
        // request deadline); no statement outlives that deadline by more
        // than a second; either session ends what its vanished client sent.
        ("lock_timeout", "4321ms", "1234ms"),
        ("statement_timeout", "0", "16s"),
        ("client_connection_check_interval", "1s", "1s"),
        // Both plan each statement once per session.
        ("plan_cache_mode", "force_generic_plan", "force_generic_plan"),
        ("synchronous_commit", "on", "off"),
        // The lock session probes only after the lease (4.321 s) and its margin.
        ("tcp_keepalives_idle", "16", "10"),
    ] {
        let l: String = sqlx::query_scalar(&show(name)).fetch_one(&mut lock).await.unwrap();
        let w: String = sqlx::query_scalar(&show(name)).fetch_one(&mut *work).await.unwrap();
        assert_eq!((name, l.as_str(), w.as_str()), (name, lock_want, work_want));
    }
    // The server sees both sessions by name.
    let mut admin = db.connect().await;
    let names: Vec<String> = sqlx::query(
        "SELECT application_name FROM pg_stat_activity WHERE datname = current_database() \
         AND application_name LIKE 'vitals-%' ORDER BY 1",
    )
    .fetch_all(&mut admin)
    .await
    .unwrap()
    .iter()
    .map(|r| r.get(0))
    .collect();
    assert_eq!(names, ["vitals-lock", "vitals-work"]);
    drop((lock, work));
    pools.close().await;
    admin.close().await.unwrap();
}

#[tokio::test]
async fn a_broken_idle_connection_is_replaced_without_failing_requests() {
    let db = TestDb::postgres().await;
    let app = TestApp::start(&db, &[]).await;
    let mut client = app.health_client().await;
    let submit = |run: &str| proto::SubmitRunRequest {
        run_id: run.into(),
        system_id: "sys".into(),
        check_id: "c".into(),
        status: proto::HealthStatus::Healthy as i32,
        ..Default::default()
    };
    client.submit_run(submit("r1")).await.unwrap();
    // Kill every vitals backend: the pooled idle connections are now dead.
    let mut admin = db.connect().await;
    admin
        .execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
             WHERE datname = current_database() AND application_name IN ('vitals-work', 'vitals-lock')",
        )
        .await
        .unwrap();
    client
        .submit_run(submit("r2"))
        .await
        .expect("a dead idle connection is replaced");
    // Again, with a resubmission (the duplicate path) and a run of a new
    // system: connections in steady use are not pinged before use, so the
    // request itself finds the dead connection and retries on a checked one.
    // The last one kills only the work connections, which the lock's
    // first round trip then does not notice for them.
    for (run, apps) in [
        ("r2", "('vitals-work', 'vitals-lock')"),
        ("r3", "('vitals-work', 'vitals-lock')"),
        ("r4", "('vitals-work')"),
    ] {
        if run == "r4" {
            // Every pooled connection back in use since the last broken one
            // was seen, so none is suspect and pinged before use.
            for i in 0..4 {
                client.submit_run(submit(&format!("r4-{i}"))).await.unwrap();
            }
        }
        admin
            .execute(
                format!(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
                     WHERE datname = current_database() AND application_name IN {apps}"
                )
                .as_str(),
            )
            .await
            .unwrap();
        let mut request = submit(run);
        if run == "r3" {
            request.system_id = "sys-new".into();
        }
        let reply = client
            .submit_run(request)
            .await
            .expect("a dead idle connection is replaced")
            .into_inner();
        assert_eq!(reply.duplicate, run == "r2", "{run}");
    }
    app.stop().await;
}
