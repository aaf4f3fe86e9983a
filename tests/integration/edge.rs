//! Failing fast at the edge: shedding, deadlines, limits on requests, and
//! readiness under database loss.

use std::time::{Duration, Instant};

use sqlx::PgConnection;
use tonic::{Code, Request};
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_types::StatusExt;
use vitals::{lock::LocalLockStats, proto};

use crate::{
    harness::{PATIENCE, TestApp, TestDb, WORK_SESSIONS_BLOCKED, assert_reason, eventually, until_count},
    metrics::Scraped,
    proxy::{Proxy, url_addr, url_via},
    withlock::acquire,
};

/// Takes system `stuck`'s serialisation lock the way vitals names it in
/// PostgreSQL (`("vits", hashtext(system_id))`), so its SubmitRuns wait.
const LOCK_STUCK_SYSTEM: &str = "SELECT pg_advisory_lock(x'76697473'::int, hashtext('stuck'))";

fn stuck_run(run_id: &str) -> proto::SubmitRunRequest {
    proto::SubmitRunRequest {
        run_id: run_id.into(),
        system_id: "stuck".into(),
        check_id: "c".into(),
        status: proto::HealthStatus::Healthy as i32,
        ..Default::default()
    }
}

/// Business-RPC slots held by SubmitRuns waiting for system `stuck`'s lock,
/// which the test holds from outside. (WithLock streams take no slot: they
/// are bounded by `--max-locks`.)
struct FilledSlots {
    holder: PgConnection,
    runs: Vec<tokio::task::JoinHandle<Result<(), tonic::Status>>>,
}

impl FilledSlots {
    /// Fills `n` slots; returns once every run waits for the lock: the
    /// first tries it in PostgreSQL, the others queue behind it in the
    /// server's lock table.
    async fn fill(app: &TestApp, db: &TestDb, n: usize) -> FilledSlots {
        let mut holder = db.connect().await;
        sqlx::query(LOCK_STUCK_SYSTEM).execute(&mut holder).await.unwrap();
        let mut runs = Vec::new();
        for i in 0..n {
            let mut client = app.health_client().await;
            runs.push(tokio::spawn(async move {
                client.submit_run(stuck_run(&format!("stuck-{i}"))).await.map(|_| ())
            }));
        }
        let want = LocalLockStats {
            keys: 1,
            waiting: n - 1,
        };
        eventually(PATIENCE, "every run waits on the held lock", async || {
            let stats = app.local_lock_stats();
            if stats == want {
                Ok(())
            } else {
                Err(format!("{stats:?}, expected {want:?}"))
            }
        })
        .await;
        FilledSlots { holder, runs }
    }

    /// Lets the system's lock go and waits for every run to finish.
    async fn release(mut self) {
        sqlx::query("SELECT pg_advisory_unlock_all()")
            .execute(&mut self.holder)
            .await
            .unwrap();
        for run in self.runs {
            run.await.unwrap().expect("a run that waited for the lock completes");
        }
    }
}

#[tokio::test]
async fn past_the_concurrency_limit_business_rpcs_are_shed_while_health_and_reflection_answer() {
    let db = TestDb::postgres().await;
    let app = TestApp::start(&db, &["--max-concurrent-requests", "2"]).await;
    let slots = FilledSlots::fill(&app, &db, 2).await;
    let started = Instant::now();
    let err = app
        .health_client()
        .await
        .evaluate_health(proto::EvaluateHealthRequest::default())
        .await
        .unwrap_err();
    assert_reason(&err, Code::ResourceExhausted, "OVERLOADED");
    // Shed at once: without shedding the call would wait for the held slots,
    // which are never let go before the assertion. The bound leaves room for
    // a new connection on a loaded 2-core machine.
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "shed after {:?}",
        started.elapsed()
    );
    // Counted like any other status, by its code and its reason.
    let scraped = Scraped::parse(app.scrape().await);
    assert_eq!(
        scraped.get(
            "grpc_server_handled_total",
            &[("grpc_method", "EvaluateHealth"), ("grpc_code", "ResourceExhausted")]
        ),
        1.0
    );
    assert_eq!(scraped.get("vitals_errors_total", &[("reason", "OVERLOADED")]), 1.0);
    assert_eq!(
        app.serving_status("vitals.v1.HealthCheckService").await,
        ServingStatus::Serving
    );
    slots.release().await;
    app.stop().await;
}

/// Refusals at the edge answer on a request's headers, before anything reads
/// the body, so the body's DATA frames can arrive after the refusal. If
/// nothing reads them, they arrive on a stream h2 has already reset, and h2
/// (0.4.20) charges each small one to a per-connection budget for small DATA
/// frames (512 KiB here, about 2,200 frames) without ever refunding it; when
/// it runs out, h2 ends the client's whole connection with GOAWAY
/// ENHANCE_YOUR_CALM, failing every call on it. vitals reads a refused body
/// to its end (`drain` in `src/middleware/refusal.rs`), which refunds every frame.
///
/// h2 charges only frames for the last 50 streams it reset, for a second
/// (frames for older ones are answered with RST_STREAM and cost nothing), so
/// refused unary calls, one frame each, need about 45 s of refusals at 50 a
/// second or more to get there (the soak's database outages did). This test
/// gets there at once, deterministically: refused WithLock streams whose
/// messages (an acquire, then keep-alives, each its own small frame) are all
/// sent after the refusal arrived. Without the drain the server ends the
/// connection at the 23rd stream.
#[tokio::test]
async fn body_frames_arriving_after_their_refusal_never_end_the_connection() {
    use crate::raw_h2::{DATA, END_STREAM, GOAWAY, HEADERS, RST_STREAM, RawH2};
    use prost::Message;
    use proto::with_lock_request::Action;

    // No database answers, so every business RPC is refused on its headers
    // (UNAVAILABLE) while health and reflection answer.
    let app = TestApp::start_unready("postgres://vitals@127.0.0.1:1/unreachable", &[]).await;
    let mut conn = RawH2::connect(app.addr).await;
    const REFUSED_STREAMS: u32 = 40;
    const MESSAGES_PER_STREAM: usize = 100;
    let message = |action| proto::WithLockRequest { action: Some(action) }.encode_to_vec();
    let acquire = message(Action::Acquire(proto::Acquire {
        key: "refused".into(),
        ..Default::default()
    }));
    let keep_alive = message(Action::KeepAlive(proto::KeepAlive {}));
    let mut ended = None;
    'streams: for i in 0..REFUSED_STREAMS {
        let stream = 2 * i + 1;
        conn.grpc_headers(stream, "/vitals.v1.LockService/WithLock").await;
        loop {
            let Some(frame) = conn.next_frame().await else {
                ended = Some((i, "the connection closed".to_owned()));
                break 'streams;
            };
            if frame.kind == GOAWAY {
                ended = Some((i, format!("GOAWAY, error code {:?}", frame.error_code())));
                break 'streams;
            }
            if frame.kind == HEADERS && frame.stream == stream && frame.flags & END_STREAM != 0 {
                break;
            }
            assert!(
                frame.kind != RST_STREAM || frame.stream != stream || frame.error_code() == Some(0),
                "refused stream {i} was reset with an error: {frame:?}"
            );
        }
        conn.grpc_message(stream, &acquire, false).await;
        for _ in 1..MESSAGES_PER_STREAM {
            conn.grpc_message(stream, &keep_alive, false).await;
        }
        conn.send(DATA, END_STREAM, stream, &[]).await;
    }
    assert_eq!(ended, None, "the server ended the connection at this refused stream");

    // A call on the same connection is still answered: health says
    // NOT_SERVING (no database), in a message of its own.
    let stream = 2 * REFUSED_STREAMS + 1;
    conn.grpc_headers(stream, "/grpc.health.v1.Health/Check").await;
    conn.grpc_message(stream, &[], true).await;
    let reply = loop {
        let frame = conn.next_frame().await.expect("the connection stays open");
        assert_ne!(frame.kind, GOAWAY, "the server ended the connection: {frame:?}");
        if frame.kind == DATA && frame.stream == stream {
            break frame.payload;
        }
    };
    let not_serving = tonic_health::pb::HealthCheckResponse {
        status: ServingStatus::NotServing as i32,
    };
    assert_eq!(reply.get(5..), Some(&not_serving.encode_to_vec()[..]), "{reply:?}");
    drop(conn);
    app.stop().await;
}

#[tokio::test]
async fn an_oversized_request_is_refused_with_resource_exhausted() {
    let db = TestDb::postgres().await;
    let app = TestApp::start(&db, &["--max-request-bytes", "1024"]).await;
    let mut client = app.health_client().await;
    let err = client
        .evaluate_health(proto::EvaluateHealthRequest {
            statuses: vec![1; 2000],
            thresholds: None,
        })
        .await
        .unwrap_err();
    assert_reason(&err, Code::ResourceExhausted, "REQUEST_TOO_LARGE");
    // A request under the limit still works.
    client
        .evaluate_health(proto::EvaluateHealthRequest {
            statuses: vec![1; 10],
            thresholds: None,
        })
        .await
        .unwrap();
    app.stop().await;
}

#[tokio::test]
async fn an_oversized_message_on_a_stream_or_to_grpc_health_is_refused_with_resource_exhausted_too() {
    let db = TestDb::postgres().await;
    let app = TestApp::start(&db, &["--max-request-bytes", "1024"]).await;
    let refused = |err: tonic::Status| {
        let reason = err.get_details_error_info().map(|info| info.reason);
        (err.code(), reason)
    };
    let too_large = (Code::ResourceExhausted, Some("REQUEST_TOO_LARGE".to_owned()));

    // Refused as the message streams in, before the handler decodes it (a
    // key this long would be INVALID_ARGUMENT).
    let mut locks = app.lock_client().await;
    let err = locks
        .with_lock(tokio_stream::iter([acquire(&"k".repeat(2000), None)]))
        .await
        .unwrap_err();
    assert_eq!(refused(err), too_large);

    let mut health = app.grpc_health().await;
    let err = health
        .check(tonic_health::pb::HealthCheckRequest {
            service: "s".repeat(2000),
        })
        .await
        .unwrap_err();
    assert_eq!(refused(err), too_large);
    assert_eq!(app.serving_status("").await, ServingStatus::Serving);
    app.stop().await;
}

/// The status of a raw reply: in its headers when it is trailers-only, or
/// else in its trailers.
async fn reply_status(reply: http::Response<tonic::body::Body>) -> tonic::Status {
    use http_body::Body as _;
    if let Some(status) = tonic::Status::from_header_map(reply.headers()) {
        return status;
    }
    let mut body = std::pin::pin!(reply.into_body());
    while let Some(frame) = std::future::poll_fn(|cx| body.as_mut().poll_frame(cx)).await {
        if let Ok(trailers) = frame.expect("a readable reply").into_trailers() {
            return tonic::Status::from_header_map(&trailers).expect("a grpc-status");
        }
    }
    panic!("the reply carried no grpc-status");
}

#[tokio::test]
async fn a_request_body_that_ends_inside_its_message_is_invalid_argument() {
    use tower::ServiceExt;
    let db = TestDb::postgres().await;
    let app = TestApp::start(&db, &[]).await;
    let channel = app.channel().await;
    // The prefix declares a 16-byte GetSystemHealthRequest; 3 bytes follow.
    let request = http::Request::post("/vitals.v1.HealthCheckService/GetSystemHealth")
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(tonic::body::Body::new(String::from("\0\0\0\0\x10\x0a\x01a")))
        .unwrap();
    let status = reply_status(channel.clone().oneshot(request).await.unwrap()).await;
    assert_reason(&status, Code::InvalidArgument, "MALFORMED_REQUEST");
    // The same message, whole, is answered.
    let request = http::Request::post("/vitals.v1.HealthCheckService/GetSystemHealth")
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(tonic::body::Body::new(String::from("\0\0\0\0\x03\x0a\x01a")))
        .unwrap();
    let status = reply_status(channel.oneshot(request).await.unwrap()).await;
    assert_eq!(status.code(), Code::NotFound, "{status:?}");
    app.stop().await;
}

#[tokio::test]
async fn the_request_id_is_echoed_or_generated() {
    let db = TestDb::postgres().await;
    let app = TestApp::start(&db, &[]).await;
    let mut client = app.health_client().await;
    let mut request = Request::new(proto::EvaluateHealthRequest::default());
    request
        .metadata_mut()
        .insert("x-request-id", "req-123".parse().unwrap());
    let reply = client.evaluate_health(request).await.unwrap();
    assert_eq!(reply.metadata().get("x-request-id").unwrap(), "req-123");
    let reply = client
        .evaluate_health(proto::EvaluateHealthRequest::default())
        .await
        .unwrap();
    let generated = reply
        .metadata()
        .get("x-request-id")
        .unwrap()
        .to_str()
        .unwrap()
        .to_owned();
    assert_eq!(generated.len(), 36, "{generated}");
    // Errors carry it too.
    let mut request = Request::new(proto::GetSystemHealthRequest {
        system_id: String::new(),
    });
    request
        .metadata_mut()
        .insert("x-request-id", "req-err".parse().unwrap());
    let err = client.get_system_health(request).await.unwrap_err();
    assert_eq!(err.metadata().get("x-request-id").unwrap(), "req-err");
    app.stop().await;
}

#[tokio::test]
async fn a_unary_rpc_stuck_on_the_database_ends_at_the_server_deadline() {
    let db = TestDb::postgres().await;
    let app = TestApp::start(&db, &["--request-timeout-ms", "300"]).await;
    let mut client = app.health_client().await;
    client.submit_run(stuck_run("before")).await.unwrap();
    // Make the database slow for system `stuck`: its run inserts sleep. (A
    // write waiting for another's row lock, like a wait for the system's
    // lock, ends with SYSTEM_BUSY before the deadline; see faults.rs.)
    let mut conn = db.connect().await;
    for sql in [
        "CREATE FUNCTION stall() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN PERFORM pg_sleep(5); RETURN NEW; END $$",
        "CREATE TRIGGER stall BEFORE INSERT ON runs FOR EACH ROW WHEN (NEW.system_id = 'stuck') \
         EXECUTE FUNCTION stall()",
    ] {
        sqlx::query(sql).execute(&mut conn).await.unwrap();
    }
    let started = Instant::now();
    let err = client.submit_run(stuck_run("")).await.unwrap_err();
    let took = started.elapsed();
    assert_eq!(err.code(), Code::DeadlineExceeded, "{err:?}");
    assert!(
        took >= Duration::from_millis(250) && took < Duration::from_secs(3),
        "took {took:?}"
    );
    // The client's own shorter deadline wins too.
    let mut request = Request::new(stuck_run(""));
    request.set_timeout(Duration::from_millis(100));
    let started = Instant::now();
    let err = client.submit_run(request).await.unwrap_err();
    assert!(
        matches!(err.code(), Code::DeadlineExceeded | Code::Cancelled),
        "{err:?}"
    );
    assert!(
        started.elapsed() < Duration::from_millis(280),
        "took {:?}",
        started.elapsed()
    );
    // Once the database is quick again the system works, and nothing stayed
    // locked.
    sqlx::query("DROP TRIGGER stall ON runs")
        .execute(&mut conn)
        .await
        .unwrap();
    client.submit_run(stuck_run("after")).await.unwrap();
    app.stop().await;
}

#[tokio::test]
async fn a_run_whose_lock_try_hangs_on_the_database_ends_at_the_deadline_not_as_system_busy() {
    // Nobody holds the system: a try of its lock that PostgreSQL does not
    // answer is a slow database, not a busy system. The wait for other
    // holders ends 250 ms before the deadline; the try itself may run to it.
    let db = TestDb::postgres().await;
    let proxy = Proxy::start(url_addr(&db.url)).await;
    let app = TestApp::start_unready(&url_via(&db.url, proxy.addr), &["--request-timeout-ms", "1000"]).await;
    app.wait_serving("").await;
    let mut client = app.health_client().await;
    client.submit_run(stuck_run("warm")).await.unwrap();

    proxy.freeze();
    let started = Instant::now();
    let err = client.submit_run(stuck_run("")).await.unwrap_err();
    let took = started.elapsed();
    proxy.thaw();
    assert_eq!(err.code(), Code::DeadlineExceeded, "{err:?}");
    assert!(took >= Duration::from_millis(950), "took {took:?}");
    app.stop().await;
}

#[tokio::test]
async fn health_follows_the_database_down_and_up_again_within_two_seconds() {
    let db = TestDb::postgres().await;
    let proxy = Proxy::start(url_addr(&db.url)).await;
    let app = TestApp::start_unready(&url_via(&db.url, proxy.addr), &[]).await;
    app.wait_serving("vitals.v1.HealthCheckService").await;
    let mut client = app.health_client().await;
    let run = |id: &str| proto::SubmitRunRequest {
        run_id: id.into(),
        system_id: "s".into(),
        check_id: "c".into(),
        status: proto::HealthStatus::Unhealthy as i32,
        ..Default::default()
    };
    client.submit_run(run("before")).await.unwrap();

    proxy.cut();
    let cut_at = Instant::now();
    app.wait_status("vitals.v1.HealthCheckService", ServingStatus::NotServing)
        .await;
    assert!(
        cut_at.elapsed() < Duration::from_secs(2),
        "NOT_SERVING after {:?}",
        cut_at.elapsed()
    );
    let started = Instant::now();
    let err = client.submit_run(run("during")).await.unwrap_err();
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    assert!(
        started.elapsed() < Duration::from_millis(500),
        "took {:?}",
        started.elapsed()
    );

    proxy.restore();
    let restored_at = Instant::now();
    app.wait_serving("vitals.v1.HealthCheckService").await;
    assert!(
        restored_at.elapsed() < Duration::from_secs(2),
        "SERVING after {:?}",
        restored_at.elapsed()
    );
    client.submit_run(run("after")).await.unwrap();
    let mut conn = db.connect().await;
    let stored: Vec<String> = sqlx::query_scalar("SELECT run_id FROM runs ORDER BY run_id")
        .fetch_all(&mut conn)
        .await
        .unwrap();
    assert_eq!(stored, ["after", "before"]);
    app.stop().await;
}

#[tokio::test]
async fn a_starved_work_pool_answers_unavailable_after_the_connection_timeout() {
    let db = TestDb::postgres().await;
    let app = TestApp::start(
        &db,
        &[
            "--database-pool-max",
            "1",
            "--database-pool-connection-timeout-ms",
            "300",
        ],
    )
    .await;
    let mut client = app.health_client().await;
    client
        .submit_run(proto::SubmitRunRequest {
            system_id: "s".into(),
            check_id: "c".into(),
            status: proto::HealthStatus::Healthy as i32,
            ..Default::default()
        })
        .await
        .unwrap();
    // Block reads of `runs`: the first ListRuns holds the only work connection.
    let mut conn = db.connect().await;
    sqlx::query("BEGIN").execute(&mut conn).await.unwrap();
    sqlx::query("LOCK TABLE runs IN ACCESS EXCLUSIVE MODE")
        .execute(&mut conn)
        .await
        .unwrap();
    let mut first_client = app.health_client().await;
    let first = tokio::spawn(async move {
        first_client
            .list_runs(proto::ListRunsRequest {
                system_id: "s".into(),
                ..Default::default()
            })
            .await
    });
    let mut probe = db.connect().await;
    until_count(&mut probe, WORK_SESSIONS_BLOCKED, 1, "the first ListRuns blocked").await;
    let started = Instant::now();
    let err = client
        .get_system_health(proto::GetSystemHealthRequest { system_id: "s".into() })
        .await
        .unwrap_err();
    assert_reason(&err, Code::Unavailable, "WORK_POOL_EXHAUSTED");
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(250) && took < Duration::from_secs(2),
        "took {took:?}"
    );
    sqlx::query("ROLLBACK").execute(&mut conn).await.unwrap();
    first.await.unwrap().unwrap();
    app.stop().await;
}
