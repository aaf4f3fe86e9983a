//! The lock service at scale and at its edges: ten thousand locks held at
//! once on default settings, streams that never ask for anything, SIGTERM
//! with locks held, and keep-alives that stay off the database.
//!
//! Waiting is on something observable (a reply, the end of a stream, the
//! lock table, `pg_locks`, the exit of a process), never on a sleep; the
//! only timed windows are the durations under test.

use std::{
    process::Stdio,
    time::{Duration, Instant},
};

use futures::{StreamExt, future::join_all};
use sqlx::{Connection, PgConnection};
use tokio::{
    io::{AsyncBufReadExt, BufReader},
    sync::mpsc,
};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Code, Status, transport::Endpoint};
use tonic_types::StatusExt;
use vitals::{
    lock::ACQUIRE_MESSAGE_TIMEOUT,
    proto::{self, with_lock_response::Event},
};

use crate::harness::{Backend, PATIENCE, Replicas, TestApp, TestDb, admin_url, assert_reason, eventually, until};
use crate::withlock::{Held, LockClient, LockStream, acquire, keep_alive, lock};

/// `channels` lock clients on connections of their own: the load is spread
/// over several HTTP/2 connections, as many clients would spread it.
async fn lock_clients(app: &TestApp, channels: usize) -> Vec<LockClient> {
    join_all((0..channels).map(|_| app.lock_client())).await
}

/// This process's resident set size, in bytes.
fn rss_bytes() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").expect("read /proc/self/status");
    let kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS in /proc/self/status");
    kb * 1024
}

/// Granted client advisory locks (`objsubid = 1`) of this test's database
/// held by vitals' lock sessions, and the advisory locks of any kind there.
async fn client_locks_held(conn: &mut PgConnection) -> (i64, i64) {
    sqlx::query_as(
        "SELECT count(*) FILTER (WHERE l.objsubid = 1 AND l.granted AND a.application_name = 'vitals-lock'), \
                count(*) \
         FROM pg_locks l LEFT JOIN pg_stat_activity a ON a.pid = l.pid \
         WHERE l.locktype = 'advisory' \
           AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())",
    )
    .fetch_one(conn)
    .await
    .expect("read pg_locks")
}

/// vitals-lock backends on this test's database.
async fn lock_backends(conn: &mut PgConnection) -> i64 {
    sqlx::query_scalar(
        "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND application_name = 'vitals-lock'",
    )
    .fetch_one(conn)
    .await
    .expect("read pg_stat_activity")
}

// ---------------------------------------------------------------------------
// Ten thousand locks.
// ---------------------------------------------------------------------------

/// Sends keep_alive, as a client holding locks for long would, on every
/// stream that has gone half the lease (120 s in the test) without one, and
/// waits for each `kept_alive`. On a loaded machine the first of ten
/// thousand locks can otherwise come near its lease before it is released.
async fn keep_alive_the_oldest(held: &mut [(Instant, Held)], in_flight: usize) {
    const HALF_LEASE: Duration = Duration::from_secs(60);
    let due: Vec<&mut (Instant, Held)> = held.iter_mut().filter(|(at, _)| at.elapsed() > HALF_LEASE).collect();
    if due.is_empty() {
        return;
    }
    let (n, started) = (due.len(), Instant::now());
    futures::stream::iter(due)
        .for_each_concurrent(in_flight, |(at, held)| async move {
            held.keep_alive().await;
            *at = Instant::now();
        })
        .await;
    eprintln!("ten thousand locks: kept {n} locks alive in {:?}", started.elapsed());
}

both_backends!(multi_thread: ten_thousand_locks_are_held_at_once_on_default_settings_and_excluded_on_a_second_replica);
async fn ten_thousand_locks_are_held_at_once_on_default_settings_and_excluded_on_a_second_replica(backend: Backend) {
    const LOCKS: usize = 10_000;
    const CHANNELS: usize = 64;
    const IN_FLIGHT: usize = 512;
    /// Every `SAMPLE_EVERY`th key is tried on the second replica.
    const SAMPLE_EVERY: usize = 20;
    let db = TestDb::create(backend).await;
    // The embedded store serves one replica, so the "second replica" is a
    // second client of the same server, whose budget must leave room for
    // its tries beyond the 10,000 held; PostgreSQL runs on defaults.
    // The lease is raised from its default (30 s): a debug build on a loaded
    // 2-core machine has taken 38 s to acquire all ten thousand, and the
    // first would lapse before the last is granted. Capacity, not the
    // lease, is what this test is about.
    let flags: &[&str] = match backend {
        Backend::Postgres => &["--database-lock-idle-tx-timeout-ms", "120000"],
        Backend::Embedded => &["--max-locks", "10500", "--database-lock-idle-tx-timeout-ms", "120000"],
    };
    let max_locks = match backend {
        Backend::Postgres => 10_000,
        Backend::Embedded => 10_500,
    };
    let replicas = Replicas::start(&db, 2, flags).await;
    let app = &replicas[0];
    let key = |i: usize| format!("capacity-{i}");

    let clients = lock_clients(app, CHANNELS).await;
    let rss_before = rss_bytes();
    let started = Instant::now();
    let results: Vec<Result<(Instant, Held), Status>> = futures::stream::iter(0..LOCKS)
        .map(|i| {
            let mut client = clients[i % CHANNELS].clone();
            let key = key(i);
            async move { lock(&mut client, &key, None).await.map(|s| (Instant::now(), s)) }
        })
        .buffer_unordered(IN_FLIGHT)
        .collect()
        .await;
    let took = started.elapsed();
    let rss_held = rss_bytes();
    let failures: Vec<&Status> = results.iter().filter_map(|r| r.as_ref().err()).collect();
    assert!(
        failures.is_empty(),
        "{} of {LOCKS} acquisitions failed, first: {:?}",
        failures.len(),
        failures.first()
    );
    let mut held: Vec<(Instant, Held)> = results.into_iter().map(Result::unwrap).collect();
    eprintln!(
        "ten thousand locks ({backend:?}): {LOCKS} acquired in {took:?} ({:.0} locks/s) over {CHANNELS} connections, \
         {IN_FLIGHT} in flight",
        LOCKS as f64 / took.as_secs_f64()
    );
    eprintln!(
        "ten thousand locks ({backend:?}): RSS {} MiB before, {} MiB held: {} bytes per held lock \
         (server+client in one process: an upper bound for the server)",
        rss_before >> 20,
        rss_held >> 20,
        rss_held.saturating_sub(rss_before) / LOCKS as u64
    );
    assert_eq!(app.local_lock_stats().keys, LOCKS);
    assert_eq!(app.lock_budget_available(), max_locks - LOCKS);

    if backend == Backend::Postgres {
        // The budget is full on defaults: the next stream is refused at once.
        let mut extra = clients[0].clone();
        let refused = LockStream::open(&mut extra, acquire("one-too-many", Some(Duration::ZERO)))
            .await
            .err()
            .expect("the 10,001st stream is refused");
        assert_reason(&refused, Code::Unavailable, "LOCK_LIMIT_REACHED");

        let mut conn = db.connect().await;
        let backends = lock_backends(&mut conn).await;
        let (client_locks, _) = client_locks_held(&mut conn).await;
        eprintln!("ten thousand locks (Postgres): {backends} vitals-lock backends hold {client_locks} advisory locks");
        assert!(
            (1..=2).contains(&backends),
            "{backends} vitals-lock backends, DATABASE_LOCK_POOL_MAX is 2"
        );
        assert_eq!(client_locks, i64::try_from(LOCKS).unwrap());
    }

    keep_alive_the_oldest(&mut held, IN_FLIGHT).await;

    // Every sampled key is busy to a try on the second replica.
    let second = lock_clients(&replicas[1], 8).await;
    let sample: Vec<usize> = (0..LOCKS).step_by(SAMPLE_EVERY).collect();
    let started = Instant::now();
    let tries: Vec<Result<LockStream, Status>> = futures::stream::iter(sample.iter().copied())
        .map(|i| {
            let mut client = second[i % second.len()].clone();
            let key = key(i);
            async move { LockStream::open(&mut client, acquire(&key, Some(Duration::ZERO))).await }
        })
        .buffer_unordered(IN_FLIGHT)
        .collect()
        .await;
    eprintln!(
        "ten thousand locks ({backend:?}): {} tries on the second replica answered in {:?}",
        sample.len(),
        started.elapsed()
    );
    for outcome in &tries {
        match outcome {
            Ok(_) => panic!("a key held on the first replica was granted on the second"),
            Err(status) => {
                assert_reason(status, Code::Aborted, "LOCK_NOT_AVAILABLE");
            }
        }
    }

    keep_alive_the_oldest(&mut held, IN_FLIGHT).await;

    // A sample releases and waits for `released`; the other streams just
    // end (the client drops them), which lets go of their locks as surely
    // and keeps the whole test well inside the lease of the oldest lock.
    let started = Instant::now();
    let (confirmed, ended): (Vec<_>, Vec<_>) = held.into_iter().enumerate().partition(|(i, _)| i % SAMPLE_EVERY == 0);
    drop(ended);
    futures::stream::iter(confirmed.into_iter().map(|(_, (_, held))| held))
        .for_each_concurrent(IN_FLIGHT, |held| async move {
            held.release().await;
        })
        .await;
    until(Duration::from_secs(20), "the lock table is empty", || {
        app.local_lock_stats().keys == 0
    })
    .await;
    eprintln!(
        "ten thousand locks ({backend:?}): {} released, {} ended, table empty in {:?}",
        LOCKS.div_ceil(SAMPLE_EVERY),
        LOCKS - LOCKS.div_ceil(SAMPLE_EVERY),
        started.elapsed()
    );
    assert_eq!(
        replicas[1].local_lock_stats().keys,
        0,
        "the second replica holds nothing"
    );
    until(PATIENCE, "the budget is whole again", || {
        app.lock_budget_available() == max_locks
    })
    .await;
    if backend == Backend::Postgres {
        let mut conn = db.connect().await;
        eventually(
            PATIENCE,
            "no advisory lock is left",
            async || match client_locks_held(&mut conn).await {
                (0, 0) => Ok(()),
                left => Err(format!("advisory locks left: {left:?}")),
            },
        )
        .await;
        eprintln!(
            "ten thousand locks (Postgres): no advisory lock left after {:?}",
            started.elapsed()
        );
    }
    replicas.stop().await;
}

// ---------------------------------------------------------------------------
// Streams that never ask.
// ---------------------------------------------------------------------------

both_backends!(multi_thread: two_thousand_streams_that_never_send_acquire_do_not_delay_a_submitrun);
async fn two_thousand_streams_that_never_send_acquire_do_not_delay_a_submitrun(backend: Backend) {
    const IDLE: usize = 2_000;
    const CHANNELS: usize = 32;
    let db = TestDb::create(backend).await;
    let app = TestApp::start(&db, &[]).await;
    let whole = app.lock_budget_available();
    let clients = lock_clients(&app, CHANNELS).await;

    // Each call is its own task: the server answers nothing until the first
    // message, and the request sender stays alive (unused) in the task.
    let mut idle = Vec::with_capacity(IDLE);
    for i in 0..IDLE {
        let mut client = clients[i % CHANNELS].clone();
        let (requests, rx) = mpsc::channel::<proto::WithLockRequest>(1);
        idle.push(tokio::spawn(async move {
            let opened = Instant::now();
            let outcome = client.with_lock(ReceiverStream::new(rx)).await.map(drop);
            drop(requests);
            (outcome, opened.elapsed())
        }));
    }
    until(PATIENCE, "every idle stream is open", || {
        app.lock_budget_available() == whole - IDLE
    })
    .await;

    let mut health = app.health_client().await;
    let started = Instant::now();
    let reply = health
        .submit_run(proto::SubmitRunRequest {
            run_id: "run-1".into(),
            system_id: "sys-1".into(),
            check_id: "c".into(),
            status: proto::HealthStatus::Healthy as i32,
            ..Default::default()
        })
        .await;
    let submit_took = started.elapsed();
    eprintln!("idle lock streams ({backend:?}): SubmitRun with {IDLE} idle lock streams open took {submit_took:?}");
    reply.expect("SubmitRun succeeds");
    assert!(submit_took < Duration::from_secs(1), "SubmitRun took {submit_took:?}");
    assert_eq!(
        app.lock_budget_available(),
        whole - IDLE,
        "the idle streams were still open during the SubmitRun"
    );

    let mut longest = Duration::ZERO;
    for call in join_all(idle).await {
        let (outcome, lived) = call.expect("the call's task");
        let status = outcome.expect_err("an idle stream ends with an error");
        assert_reason(&status, Code::FailedPrecondition, "LOCK_PROTOCOL_VIOLATION");
        assert!(lived >= ACQUIRE_MESSAGE_TIMEOUT, "ended after {lived:?}");
        longest = longest.max(lived);
    }
    eprintln!("idle lock streams ({backend:?}): every idle stream ended by {longest:?}");
    assert!(
        longest < ACQUIRE_MESSAGE_TIMEOUT + Duration::from_secs(3),
        "{longest:?}"
    );
    assert_eq!(app.lock_budget_available(), whole, "the budget is whole again");
    app.stop().await;
}

// ---------------------------------------------------------------------------
// Keep-alives.
// ---------------------------------------------------------------------------

/// Committed transactions of database `name` so far, read from the admin
/// database (so the reading itself does not count).
async fn xact_commit(admin: &mut PgConnection, name: &str) -> i64 {
    sqlx::query_scalar("SELECT xact_commit FROM pg_stat_database WHERE datname = $1")
        .bind(name)
        .fetch_one(admin)
        .await
        .expect("read pg_stat_database")
}

/// Transactions committed on database `name` over a window that starts now,
/// runs `work`, and lasts until `work` is done plus [`FLUSH`]: long enough
/// for every busy backend to have flushed its statistics (at most once a
/// second while it runs statements).
const FLUSH: Duration = Duration::from_millis(1500);

async fn commits_during<F: Future<Output = ()>>(admin: &mut PgConnection, name: &str, work: F) -> (i64, Duration) {
    let before = xact_commit(admin, name).await;
    let started = Instant::now();
    work.await;
    let worked = started.elapsed();
    // The window under measurement: statistics flushed at most a second late.
    tokio::time::sleep(FLUSH).await;
    (xact_commit(admin, name).await - before, worked)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keep_alives_do_not_cost_a_database_round_trip_each() {
    const KEEP_ALIVES: usize = 200;
    let db = TestDb::postgres().await;
    let app = TestApp::start(&db, &[]).await;
    let mut client = app.lock_client().await;
    let mut held = lock(&mut client, "kept-alive", None).await.unwrap();
    let mut admin = PgConnection::connect(&admin_url()).await.unwrap();

    // The same window without keep-alives: heartbeats, readiness pings.
    let (background, _) = commits_during(&mut admin, &db.name, async {}).await;
    let (with_keep_alives, burst) = commits_during(&mut admin, &db.name, async {
        for _ in 0..KEEP_ALIVES {
            held.keep_alive().await;
        }
    })
    .await;
    let extra = with_keep_alives - background;
    eprintln!(
        "keep-alives: {KEEP_ALIVES} answered in {burst:?}; transactions committed on the test database: \
         {with_keep_alives} in a window with them, {background} in one without ({extra} more)"
    );
    assert!(
        extra < 40,
        "{KEEP_ALIVES} keep-alives cost {extra} more transactions than none ({with_keep_alives} vs {background})"
    );
    held.release().await;
    app.stop().await;
}

// ---------------------------------------------------------------------------
// SIGTERM with locks held.
// ---------------------------------------------------------------------------

/// A vitals binary started as a child process, its log read as it comes.
struct Child {
    process: tokio::process::Child,
    addr: String,
    log: mpsc::UnboundedReceiver<String>,
}

impl Child {
    /// Starts the binary on `db` with `args` and a port of its own, and
    /// waits until it says where it listens and reports SERVING.
    async fn start(db: &TestDb, args: &[&str]) -> Child {
        let mut process = tokio::process::Command::new(env!("CARGO_BIN_EXE_vitals"))
            .args(["--listen-addr", "127.0.0.1:0", "--metrics-addr", "127.0.0.1:0"])
            .args(["--database-url", &db.url])
            .args(args)
            .env("RUST_LOG", "info")
            .env("VITALS_LOG_FORMAT", "text")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("start the vitals binary");
        let stderr = process.stderr.take().expect("piped stderr");
        let (tx, mut log) = mpsc::unbounded_channel();
        // Keep reading to the end, so the child never blocks on a full pipe.
        tokio::spawn(async move {
            let mut lines = BufReader::new(stderr).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                let _ = tx.send(line);
            }
        });
        let mut seen = Vec::new();
        let addr = tokio::time::timeout(Duration::from_secs(20), async {
            while let Some(line) = log.recv().await {
                if line.contains("vitals listening")
                    && let Some(addr) = line.split("addr=").nth(1).and_then(|a| a.split_whitespace().next())
                {
                    return Some(addr.to_owned());
                }
                seen.push(line);
            }
            None
        })
        .await
        .ok()
        .flatten()
        .unwrap_or_else(|| panic!("the binary never said where it listens; log: {seen:#?}"));
        let child = Child { process, addr, log };
        child.wait_serving().await;
        child
    }

    fn endpoint(&self) -> Endpoint {
        Endpoint::from_shared(format!("http://{}", self.addr))
            .expect("valid endpoint")
            .tcp_nodelay(true)
            .connect_timeout(Duration::from_secs(5))
    }

    async fn lock_client(&self) -> LockClient {
        LockClient::new(self.endpoint().connect().await.expect("connect to the binary"))
    }

    /// Waits (on the health stream) until the binary serves; the stream is
    /// closed again before returning, so it does not delay a shutdown.
    async fn wait_serving(&self) {
        use tonic_health::pb::{HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient};
        let channel = self.endpoint().connect().await.expect("connect to the binary");
        let mut client = HealthClient::new(channel);
        let mut watch = client
            .watch(HealthCheckRequest { service: String::new() })
            .await
            .expect("health watch")
            .into_inner();
        tokio::time::timeout(Duration::from_secs(20), async {
            while let Some(reply) = watch.message().await.expect("health stream") {
                if reply.status() == ServingStatus::Serving {
                    return;
                }
            }
            panic!("the health stream ended before SERVING");
        })
        .await
        .expect("the binary never reported SERVING");
    }

    /// What the binary logged so far.
    fn drain_log(&mut self) -> Vec<String> {
        let mut lines = Vec::new();
        while let Ok(line) = self.log.try_recv() {
            lines.push(line);
        }
        lines
    }
}

/// How a lock stream of the SIGTERM test ended, and when.
type Ending = (Result<Option<Event>, Status>, Instant);

both_backends!(multi_thread: sigterm_with_held_locks_ends_lock_streams_with_shutting_down_and_exits_within_the_grace_plus_a_second);
async fn sigterm_with_held_locks_ends_lock_streams_with_shutting_down_and_exits_within_the_grace_plus_a_second(
    backend: Backend,
) {
    const GRACE: Duration = Duration::from_millis(1000);
    let db = TestDb::create(backend).await;
    let mut child = Child::start(&db, &["--shutdown-grace-ms", "1000"]).await;
    let mut client = child.lock_client().await;
    let mut other = child.lock_client().await;

    // A holder that sends nothing after its acquire (the lease is 30 s).
    let mut silent = lock(&mut other, "sigterm-silent", None).await.unwrap();
    // A holder that keeps its lease alive.
    let keeper = lock(&mut client, "sigterm-keeper", None).await.unwrap();
    // A waiter queued behind the silent holder, on the keeper's connection.
    let (waiter_requests, rx) = mpsc::channel(1);
    waiter_requests
        .send(acquire("sigterm-silent", Some(Duration::from_secs(30))))
        .await
        .unwrap();
    let mut waiter_client = client.clone();
    let waiter = tokio::spawn(async move {
        let outcome = waiter_client.with_lock(ReceiverStream::new(rx)).await.map(|_| None);
        (outcome, Instant::now())
    });
    // The acquire has left the channel (tonic took it), and a keep-alive
    // round trip on the same connection has come back after it.
    drop(waiter_requests.reserve().await.expect("the waiter's stream is open"));
    let LockStream {
        requests: keeper_requests,
        replies: mut keeper_replies,
    } = keeper.stream;
    keeper_requests.send(keep_alive()).await.unwrap();
    match keeper_replies.message().await {
        Ok(Some(proto::WithLockResponse {
            event: Some(Event::KeptAlive(_)),
        })) => {}
        other => panic!("expected kept_alive, got {other:?}"),
    }
    let keeper = tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_millis(100));
        loop {
            tokio::select! {
                _ = tick.tick() => {
                    let _ = keeper_requests.send(keep_alive()).await;
                }
                reply = keeper_replies.message() => match reply {
                    Ok(Some(proto::WithLockResponse { event: Some(Event::KeptAlive(_)) })) => {}
                    Ok(other) => return (Ok(other.and_then(|m| m.event)), Instant::now()),
                    Err(status) => return (Err(status), Instant::now()),
                }
            }
        }
    });
    let silent = tokio::spawn(async move {
        let outcome = silent.stream.next().await;
        (outcome, Instant::now())
    });

    let pid = child.process.id().expect("the binary runs");
    let signalled = Instant::now();
    let kill = std::process::Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .expect("run kill");
    assert!(kill.success(), "kill -TERM {pid}");
    let exit = tokio::time::timeout(GRACE + Duration::from_secs(5), child.process.wait())
        .await
        .unwrap_or_else(|_| {
            panic!(
                "the binary still runs {:?} after SIGTERM",
                GRACE + Duration::from_secs(5)
            )
        })
        .expect("wait for the binary");
    let exited_after = signalled.elapsed();
    let log = child.drain_log();

    let endings: Vec<(&str, Ending)> = vec![
        ("keep-alive holder", keeper.await.unwrap()),
        ("silent holder", silent.await.unwrap()),
        ("waiter", waiter.await.unwrap()),
    ];
    for (who, (outcome, at)) in &endings {
        eprintln!(
            "sigterm ({backend:?}): {who} ended {:?} after the signal: {}",
            at.saturating_duration_since(signalled),
            match outcome {
                Ok(event) => format!("OK {event:?}"),
                Err(status) => format!(
                    "{:?} {:?} {:?}",
                    status.code(),
                    status.get_details_error_info().map(|i| i.reason),
                    status.message()
                ),
            }
        );
    }
    eprintln!("sigterm ({backend:?}): the binary exited {exited_after:?} after the signal ({exit})");
    for (who, (outcome, _)) in &endings {
        match outcome {
            Err(status) => {
                assert_eq!(status.code(), Code::Unavailable, "{who}: {status:?}; log: {log:#?}");
                let reason = status.get_details_error_info().map(|i| i.reason);
                assert_eq!(
                    reason.as_deref(),
                    Some("SHUTTING_DOWN"),
                    "{who}: {status:?}; log: {log:#?}"
                );
            }
            Ok(event) => panic!("{who}'s stream ended with {event:?} instead of SHUTTING_DOWN"),
        }
    }
    assert!(exit.success(), "{exit}; log: {log:#?}");
    assert!(
        exited_after <= GRACE + Duration::from_secs(1),
        "the binary exited {exited_after:?} after SIGTERM with a {GRACE:?} grace; log: {log:#?}"
    );

    if backend == Backend::Postgres {
        // PostgreSQL ends the closed sessions' backends on its own time.
        let mut conn = db.connect().await;
        eventually(
            PATIENCE,
            "no advisory lock outlives the binary",
            async || match client_locks_held(&mut conn).await {
                (_, 0) => Ok(()),
                (_, any) => Err(format!("{any} advisory locks are left")),
            },
        )
        .await;
    }
}
