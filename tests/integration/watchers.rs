//! WatchTransitions at scale: one feed per replica reads each transition
//! once for any number of watchers; watchers are bounded in number
//! (`VITALS_MAX_WATCHERS`) and in what waits for them (a watcher that stops
//! reading is ended with a status it resumes from); the PostgreSQL listener
//! comes back after its session is killed; shutdown ends watchers at once.

use std::time::{Duration, Instant};

use futures::future::join_all;
use prost_types::Timestamp;
use sqlx::Connection as _;
use tonic::{Code, Status, Streaming, transport::Channel};
use tonic_types::StatusExt;
use vitals::proto::{
    ConfigureCheckRequest, ConsecutiveThresholds, GetSystemHealthRequest, HealthStatus, HealthTransition,
    SubmitRunRequest, Thresholds, WatchTransitionsRequest, WatchTransitionsResponse,
    health_check_service_client::HealthCheckServiceClient, thresholds::Mode,
};

use crate::harness::{Backend, PATIENCE, TestApp, TestDb, admin_url, assert_reason, until};

type Client = HealthCheckServiceClient<Channel>;

/// A check of `system` on which every run flips the system's status (one
/// failure degrades, one success heals).
async fn flipping_check(client: &mut Client, system: &str) {
    client
        .configure_check(ConfigureCheckRequest {
            system_id: system.into(),
            check_id: "probe".into(),
            thresholds: Some(Thresholds {
                mode: Some(Mode::Consecutive(ConsecutiveThresholds {
                    healthy_min_success_count: 1,
                    degraded_min_failure_count: 1,
                    unhealthy_min_failure_count: 5,
                })),
            }),
            enabled: None,
            flapping: None,
        })
        .await
        .expect("ConfigureCheck");
}

/// Submits the `i`-th run of the flipping check (odd: a failure, even: a
/// success) and returns the sequence of the transition it caused.
async fn flip(client: &mut Client, system: &str, i: i64) -> u64 {
    let status = if i % 2 == 1 {
        HealthStatus::Degraded
    } else {
        HealthStatus::Healthy
    };
    let reply = client
        .submit_run(SubmitRunRequest {
            run_id: format!("{system}-{i}"),
            system_id: system.into(),
            check_id: "probe".into(),
            status: status as i32,
            // A day back: however many runs a test sends, none is in the future.
            observed_at: Some(Timestamp {
                seconds: chrono::Utc::now().timestamp() - 86_400 + i,
                nanos: 0,
            }),
            latency: None,
            message: String::new(),
        })
        .await
        .expect("SubmitRun")
        .into_inner();
    reply.transition.expect("every run flips the status").sequence
}

async fn watch(
    client: &mut Client,
    system: &str,
    after_sequence: u64,
) -> Result<Streaming<WatchTransitionsResponse>, Status> {
    client
        .watch_transitions(WatchTransitionsRequest {
            system_id: system.to_owned(),
            after_sequence,
            ..Default::default()
        })
        .await
        .map(tonic::Response::into_inner)
}

/// The next message of a watch, failing after [`PATIENCE`].
async fn next(stream: &mut Streaming<WatchTransitionsResponse>) -> Result<Option<HealthTransition>, Status> {
    tokio::time::timeout(PATIENCE, stream.message())
        .await
        .expect("the watch answers in time")
        .map(|m| m.and_then(|m| m.transition))
}

async fn next_sequence(stream: &mut Streaming<WatchTransitionsResponse>) -> u64 {
    next(stream)
        .await
        .expect("the watch does not fail")
        .expect("the watch stays open")
        .sequence
}

both_backends!(five_hundred_watchers_of_one_system_cost_one_database_read_per_transition);
async fn five_hundred_watchers_of_one_system_cost_one_database_read_per_transition(backend: Backend) {
    const WATCHERS: usize = 500;
    const TRANSITIONS: i64 = 10;
    let db = TestDb::create(backend).await;
    let app = TestApp::start(&db, &[]).await;
    let mut writer = app.health_client().await;
    flipping_check(&mut writer, "crowd").await;
    assert_eq!(flip(&mut writer, "crowd", 1).await, 1);

    // All on one connection, as the 3,000 were.
    let watcher_client = app.health_client().await;
    let mut streams = join_all((0..WATCHERS).map(|_| {
        let mut client = watcher_client.clone();
        async move { watch(&mut client, "crowd", 0).await.expect("WatchTransitions") }
    }))
    .await;
    let first = join_all(streams.iter_mut().map(next_sequence)).await;
    assert!(
        first.iter().all(|s| *s == 1),
        "every watcher replays the first transition"
    );
    until(PATIENCE, "every watcher replayed and follows the feed", || {
        let stats = app.feed_stats();
        stats.watchers == WATCHERS && stats.registered == WATCHERS && stats.replaying == 0
    })
    .await;

    let reads_before = app.transition_reads();
    let started = Instant::now();
    for i in 2..=TRANSITIONS + 1 {
        let sequence = flip(&mut writer, "crowd", i).await;
        let seen = join_all(streams.iter_mut().map(next_sequence)).await;
        assert!(
            seen.iter().all(|s| *s == sequence),
            "every watcher receives transition {sequence} next"
        );
    }
    let reads = app.transition_reads() - reads_before;
    // One read per notification, plus the feed's safety polls (and one for
    // a listener that happened to reconnect); a read per watcher would be
    // 5,000.
    let polls = started.elapsed().as_secs() / 5 + 2;
    eprintln!(
        "{WATCHERS} watchers ({backend:?}), {TRANSITIONS} transitions in {:?}: {reads} transition reads",
        started.elapsed()
    );
    assert!(
        reads <= TRANSITIONS as u64 + polls,
        "{reads} reads for {TRANSITIONS} transitions and {WATCHERS} watchers"
    );
    drop(streams);
    until(PATIENCE, "every watcher's place is free again", || {
        app.feed_stats().watchers == 0
    })
    .await;
    app.stop().await;
}

both_backends!(a_watcher_past_vitals_max_watchers_is_refused_with_resource_exhausted_and_watchers_take_no_request_slot);
async fn a_watcher_past_vitals_max_watchers_is_refused_with_resource_exhausted_and_watchers_take_no_request_slot(
    backend: Backend,
) {
    let db = TestDb::create(backend).await;
    let app = TestApp::start(&db, &["--max-watchers", "3", "--max-concurrent-requests", "2"]).await;
    let mut client = app.health_client().await;
    flipping_check(&mut client, "limited").await;

    let mut open = Vec::new();
    for _ in 0..3 {
        open.push(
            watch(&mut client, "limited", 0)
                .await
                .expect("a watcher within the limit"),
        );
    }
    let refused = watch(&mut client, "", 0)
        .await
        .expect_err("a fourth watcher is refused");
    assert_reason(&refused, Code::ResourceExhausted, "WATCHER_LIMIT_REACHED");
    assert!(refused.get_details_retry_info().is_some(), "{refused:?}");

    // Three open watches and two places for unary calls: both are served.
    let calls = join_all((0..2).map(|_| {
        let mut client = client.clone();
        async move {
            client
                .get_system_health(GetSystemHealthRequest {
                    system_id: "limited".into(),
                })
                .await
        }
    }))
    .await;
    for call in calls {
        call.expect("a unary call beside the watchers");
    }
    let sequence = flip(&mut client, "limited", 1).await;
    for stream in &mut open {
        assert_eq!(next_sequence(stream).await, sequence);
    }

    // A watcher that goes away frees its place.
    open.pop();
    until(PATIENCE, "the closed watcher's place is free", || {
        app.feed_stats().watchers == 2
    })
    .await;
    let mut again = watch(&mut client, "limited", 0)
        .await
        .expect("a watcher in the freed place");
    assert_eq!(next_sequence(&mut again).await, sequence);
    app.stop().await;
}

both_backends!(
    a_watcher_that_stops_reading_is_ended_as_too_slow_after_its_last_delivered_transition_and_resumes_from_it
);
async fn a_watcher_that_stops_reading_is_ended_as_too_slow_after_its_last_delivered_transition_and_resumes_from_it(
    backend: Backend,
) {
    let db = TestDb::create(backend).await;
    let app = TestApp::start(&db, &["--watcher-buffer", "4", "--watcher-max-lag-ms", "300"]).await;
    let mut writer = app.health_client().await;
    flipping_check(&mut writer, "slow").await;

    // A client whose HTTP/2 window holds only a few transitions: once it
    // stops reading, what follows waits in vitals.
    let stalled_channel = app
        .endpoint()
        .initial_stream_window_size(Some(1024))
        .connect()
        .await
        .expect("connect");
    let mut stalled = watch(&mut HealthCheckServiceClient::new(stalled_channel), "slow", 0)
        .await
        .expect("WatchTransitions");
    until(PATIENCE, "the watcher follows the feed", || {
        app.feed_stats().registered == 1 && app.feed_stats().replaying == 0
    })
    .await;

    let mut produced = 0;
    let deadline = Instant::now() + PATIENCE;
    while app.feed_stats().ended_too_slow == 0 {
        assert!(
            Instant::now() < deadline,
            "the watcher that stopped reading was never ended"
        );
        produced = flip(&mut writer, "slow", i64::try_from(produced).unwrap() + 1).await;
        let stats = app.feed_stats();
        assert!(
            stats.buffered <= 4,
            "more than the buffer waits for the watcher: {stats:?}"
        );
    }
    let stats = app.feed_stats();
    assert_eq!(
        (stats.registered, stats.buffered),
        (0, 0),
        "the ended watcher holds nothing: {stats:?}"
    );

    // Reading again: every transition up to the end, then the status.
    let mut delivered = Vec::new();
    let status = loop {
        match next(&mut stalled).await {
            Ok(Some(t)) => delivered.push(t.sequence),
            Ok(None) => panic!("the stream ended without a status"),
            Err(status) => break status,
        }
    };
    let info = assert_reason(&status, Code::Aborted, "WATCHER_TOO_SLOW");
    let last: u64 = info.metadata["last_sequence"].parse().expect("a sequence");
    assert_eq!(
        delivered,
        (1..=last).collect::<Vec<u64>>(),
        "delivered without gaps up to last_sequence"
    );
    assert!(
        last < produced,
        "the stalled watcher was behind (last {last}, produced {produced})"
    );
    eprintln!("stalled watcher ({backend:?}) ended after {last} of {produced} transitions");

    let mut resumed = watch(&mut writer, "slow", last).await.expect("resume");
    let mut rest = Vec::new();
    while rest.last().is_none_or(|s| *s < produced) {
        rest.push(next_sequence(&mut resumed).await);
    }
    assert_eq!(
        rest,
        (last + 1..=produced).collect::<Vec<u64>>(),
        "resumed without gaps or repeats"
    );
    app.stop().await;
}

both_backends!(watchers_end_with_shutting_down_as_soon_as_the_server_starts_draining);
async fn watchers_end_with_shutting_down_as_soon_as_the_server_starts_draining(backend: Backend) {
    let db = TestDb::create(backend).await;
    // The harness gives every server a 2 s shutdown grace.
    let app = TestApp::start(&db, &[]).await;
    let mut client = app.health_client().await;
    let mut watchers = Vec::new();
    for system in ["", "quiet"] {
        watchers.push(watch(&mut client, system, 0).await.expect("WatchTransitions"));
    }
    until(PATIENCE, "both watchers follow the feed", || {
        app.feed_stats().registered == 2
    })
    .await;

    let started = Instant::now();
    let stopping = tokio::spawn(app.stop());
    for stream in &mut watchers {
        let status = next(stream).await.expect_err("the watch ends with a status");
        assert_reason(&status, Code::Unavailable, "SHUTTING_DOWN");
    }
    assert!(
        started.elapsed() < Duration::from_millis(1500),
        "watchers ended {:?} after shutdown began, not at once",
        started.elapsed()
    );
    drop(watchers);
    stopping.await.unwrap();
}

#[tokio::test]
async fn a_listener_killed_with_pg_terminate_backend_reconnects_with_backoff_and_watchers_miss_nothing() {
    let db = TestDb::postgres().await;
    let app = TestApp::start(&db, &[]).await;
    let mut writer = app.health_client().await;
    flipping_check(&mut writer, "relisten").await;
    let mut stream = watch(&mut writer, "relisten", 0).await.expect("WatchTransitions");
    assert_eq!(flip(&mut writer, "relisten", 1).await, 1);
    assert_eq!(next_sequence(&mut stream).await, 1);
    until(PATIENCE, "the listener listens", || {
        app.feed_stats().listener_connects == 1
    })
    .await;

    // Enough idle work connections that nothing needs a new one while the
    // database refuses them.
    join_all((0..8).map(|_| {
        let mut client = writer.clone();
        async move {
            client
                .get_system_health(GetSystemHealthRequest {
                    system_id: "relisten".into(),
                })
                .await
                .expect("GetSystemHealth")
        }
    }))
    .await;

    let mut admin = sqlx::PgConnection::connect(&admin_url()).await.unwrap();
    sqlx::query(&format!("ALTER DATABASE {} ALLOW_CONNECTIONS false", db.name))
        .execute(&mut admin)
        .await
        .unwrap();
    let killed: Vec<bool> = sqlx::query_scalar(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
         WHERE datname = $1 AND application_name = 'vitals-listen'",
    )
    .bind(&db.name)
    .fetch_all(&mut admin)
    .await
    .unwrap();
    assert_eq!(killed, [true], "one listening session, terminated");
    let blocked = Instant::now();
    let attempts_before = app.feed_stats().listener_attempts;
    let reads_before = app.transition_reads();

    // Committed while nobody listens.
    assert_eq!(flip(&mut writer, "relisten", 2).await, 2);
    assert_eq!(flip(&mut writer, "relisten", 3).await, 3);
    until(PATIENCE, "the listener tried to reconnect four times", || {
        app.feed_stats().listener_attempts >= attempts_before + 4
    })
    .await;
    let refused_for = blocked.elapsed();
    // 100 + 200 + 400 + 800 ms between attempts; a loop would take
    // microseconds.
    assert!(
        refused_for >= Duration::from_millis(1200),
        "four reconnection attempts within {refused_for:?}: no backoff"
    );
    let reads = app.transition_reads() - reads_before;
    assert!(
        reads <= refused_for.as_secs() / 5 + 2,
        "{reads} reads in {refused_for:?} without a listener"
    );
    assert_eq!(app.feed_stats().listener_connects, 1, "not listening while refused");

    sqlx::query(&format!("ALTER DATABASE {} ALLOW_CONNECTIONS true", db.name))
        .execute(&mut admin)
        .await
        .unwrap();
    until(PATIENCE, "the listener listens again", || {
        app.feed_stats().listener_connects == 2
    })
    .await;
    assert_eq!(next_sequence(&mut stream).await, 2);
    assert_eq!(next_sequence(&mut stream).await, 3);

    // Notifications wake the feed again: sooner than its 5 s safety poll.
    let started = Instant::now();
    assert_eq!(flip(&mut writer, "relisten", 4).await, 4);
    assert_eq!(next_sequence(&mut stream).await, 4);
    assert!(
        started.elapsed() < Duration::from_millis(2500),
        "a transition took {:?} to reach the watcher after the listener came back",
        started.elapsed()
    );
    let listening: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM pg_stat_activity WHERE datname = $1 AND application_name = 'vitals-listen'",
    )
    .bind(&db.name)
    .fetch_one(&mut admin)
    .await
    .unwrap();
    assert_eq!(listening, 1, "one listening session");
    app.stop().await;
}
