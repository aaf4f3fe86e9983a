//! Faults under the redesigned lock service: a lock session killed, a
//! PostgreSQL crash, a frozen database link, PostgreSQL's lock table full,
//! keys crafted to collide with vitals' own locks, programs that lock
//! the same keys with plain SQL, and a key one replica keeps busy.
//!
//! Waiting is on something observable (a reply, `pg_locks`, the lock
//! table), never on a sleep; the only sleeps are a client's keep-alive pace.

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use sqlx::{Connection, Executor, PgConnection};
use tonic::{Code, Status, transport::Channel};
use tonic_types::StatusExt;
use vitals::proto::{health_check_service_client::HealthCheckServiceClient, with_lock_response::Event};

use crate::{
    cluster::PrivateCluster,
    harness::{Backend, PATIENCE, TestApp, TestDb, assert_reason, eventually, until, until_count},
    proxy::{Proxy, url_addr, url_via},
    withlock::{Held, LockClient, keep_alive, lock, submit},
};

// ---------------------------------------------------------------------------
// What PostgreSQL sees.
// ---------------------------------------------------------------------------

/// The vitals-lock backend holding each of `keys` that such a backend holds
/// (as PostgreSQL names a client key: one bigint, `objsubid = 1`).
async fn key_holders(conn: &mut PgConnection, keys: &[String]) -> Vec<(String, i32)> {
    sqlx::query_as(
        "SELECT k, l.pid FROM unnest($1::text[]) AS k \
         JOIN pg_locks l ON l.locktype = 'advisory' AND l.granted AND l.objsubid = 1 \
             AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database()) \
             AND ((l.classid::int8 << 32) | l.objid::int8) = hashtextextended('lock:' || k, 0) \
         JOIN pg_stat_activity a ON a.pid = l.pid AND a.application_name = 'vitals-lock' \
         ORDER BY k",
    )
    .bind(keys)
    .fetch_all(conn)
    .await
    .expect("read pg_locks")
}

/// The vitals-lock backends of this database.
async fn lock_session_pids(conn: &mut PgConnection) -> Vec<i32> {
    sqlx::query_scalar(
        "SELECT pid FROM pg_stat_activity WHERE application_name = 'vitals-lock' \
         AND datname = current_database() ORDER BY pid",
    )
    .fetch_all(conn)
    .await
    .expect("read pg_stat_activity")
}

/// Advisory locks granted to the backends `pids`: a query light enough to
/// run while PostgreSQL's lock table is full (it takes fast-path locks only).
async fn advisory_locks_of(conn: &mut PgConnection, pids: &[i32]) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND granted AND pid = ANY($1)")
        .bind(pids)
        .fetch_one(conn)
        .await
        .expect("read pg_locks")
}

// ---------------------------------------------------------------------------
// 1. A lock session killed.
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_a_lock_session_tells_every_holder_on_it_lock_lost_within_a_second_and_leaves_other_locks_alone() {
    let db = TestDb::postgres().await;
    let app = TestApp::start(
        &db,
        &[
            "--database-lock-pool-max",
            "2",
            "--database-lock-idle-tx-timeout-ms",
            "5000",
        ],
    )
    .await;
    let mut conn = db.connect().await;
    let mut client = app.lock_client().await;
    let keys: Vec<String> = (0..20).map(|i| format!("killed-session-{i}")).collect();
    let mut held = Vec::new();
    for key in &keys {
        held.push(lock(&mut client, key, None).await.expect("a free key is granted"));
    }
    let holders = key_holders(&mut conn, &keys).await;
    assert_eq!(
        holders.len(),
        keys.len(),
        "every key is locked by a vitals-lock backend: {holders:?}"
    );
    let mut pids: Vec<i32> = holders.iter().map(|(_, pid)| *pid).collect();
    pids.sort_unstable();
    pids.dedup();
    assert_eq!(pids.len(), 2, "both lock sessions hold some of the keys: {holders:?}");
    let victim = pids[0];
    let on_victim: Vec<&String> = holders.iter().filter(|(_, p)| *p == victim).map(|(k, _)| k).collect();
    eprintln!(
        "killing lock session {victim}, which holds {} of {} keys",
        on_victim.len(),
        keys.len()
    );

    let (lost, kept): (Vec<Held>, Vec<Held>) = held.into_iter().partition(|h| on_victim.contains(&&h.key));
    let old_max = lost.iter().map(|h| h.token()).max().unwrap();
    let killed_at = Instant::now();
    let terminated: bool = sqlx::query_scalar("SELECT pg_terminate_backend($1)")
        .bind(victim)
        .fetch_one(&mut conn)
        .await
        .unwrap();
    assert!(terminated);
    let told = futures::future::join_all(lost.into_iter().map(|mut h| async move {
        let result = tokio::time::timeout(Duration::from_secs(5), h.stream.next()).await;
        (h.key.clone(), result, killed_at.elapsed())
    }))
    .await;
    let mut slowest = Duration::ZERO;
    for (key, result, after) in told {
        let status = match result {
            Ok(Err(status)) => status,
            other => panic!("{key:?} was on the killed session: expected LOCK_LOST, got {other:?}"),
        };
        let info = assert_reason(&status, Code::Aborted, "LOCK_LOST");
        assert_eq!(info.metadata.get("key"), Some(&key));
        slowest = slowest.max(after);
    }
    eprintln!("killed lock session: the last of its holders heard LOCK_LOST after {slowest:?}");
    assert!(slowest < Duration::from_secs(1), "LOCK_LOST after {slowest:?}");
    // Each lost lock counts once, though the loss is both told and found
    // again by the release that lets it go (before the client hears).
    let lost_count =
        crate::metrics::Scraped::parse(app.scrape().await).get("vitals_lock_lost_total", &[("reason", "session")]);
    assert_eq!(
        lost_count,
        on_victim.len() as f64,
        "vitals_lock_lost_total{{reason=\"session\"}}"
    );

    // The other session's locks are untouched, to the client and in PostgreSQL.
    let mut kept = kept;
    for h in &mut kept {
        h.keep_alive().await;
    }
    let kept_keys: Vec<String> = kept.iter().map(|h| h.key.clone()).collect();
    let still = key_holders(&mut conn, &kept_keys).await;
    assert_eq!(still.len(), kept_keys.len(), "{still:?}");
    assert!(still.iter().all(|(_, pid)| *pid == pids[1]), "{still:?}");

    // The manager reconnected: the lost keys are free and granted again.
    let mut again = Vec::new();
    for key in &on_victim {
        let h = lock(&mut client, key, Some(Duration::from_secs(5)))
            .await
            .expect("a lost key can be taken again");
        assert!(h.token() > old_max, "{} after {old_max}", h.token());
        again.push(h);
    }
    let retaken: Vec<String> = on_victim.iter().map(|k| (*k).clone()).collect();
    let holders = key_holders(&mut conn, &retaken).await;
    assert_eq!(holders.len(), retaken.len(), "{holders:?}");
    assert!(holders.iter().all(|(_, pid)| *pid != victim), "{holders:?}");
    for h in again.into_iter().chain(kept) {
        h.release().await;
    }
    app.stop().await;
}

// ---------------------------------------------------------------------------
// 2. PostgreSQL crashes.
// ---------------------------------------------------------------------------

/// Takes and releases each of `keys` `rounds` times on `app`; the tokens in grant order.
async fn grants(app: &TestApp, keys: &[&str], rounds: usize) -> Vec<u64> {
    let mut client = app.lock_client().await;
    let mut tokens = Vec::new();
    for _ in 0..rounds {
        for key in keys {
            let h = lock(&mut client, key, Some(Duration::from_secs(5)))
                .await
                .expect("granted");
            tokens.push(h.token());
            h.release().await;
        }
    }
    tokens
}

fn assert_rising(tokens: &[u64], what: &str) {
    assert!(
        tokens.windows(2).all(|w| w[0] < w[1]),
        "{what}: tokens not rising: {tokens:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fencing_tokens_rise_across_a_postgresql_crash_restart() {
    use tonic_health::pb::health_check_response::ServingStatus;
    const KEYS: [&str; 5] = ["crash-a", "crash-b", "crash-c", "crash-d", "crash-e"];
    // The WAL writer flushes what asynchronous commits left behind only
    // every 10 s here, so a token is durable at the crash only if the grant
    // itself flushed it, as vitals' grants must.
    let cluster = PrivateCluster::start(&["max_connections=50", "wal_writer_delay=10000ms"]).await;
    let url = cluster.url();
    let flags = [
        "--database-lock-idle-tx-timeout-ms",
        "2000",
        "--database-pool-connection-timeout-ms",
        "2000",
    ];
    let a = TestApp::start_unready(&url, &flags).await;
    a.wait_serving("").await;
    let before = grants(&a, &KEYS, 10).await;
    assert_rising(&before, "before the crash");
    let max_before = *before.iter().max().unwrap();

    // One lock still held at the crash: its holder is told it is lost.
    let mut held = lock(&mut a.lock_client().await, "crash-held", None).await.unwrap();
    let max_before = max_before.max(held.token());
    let crashed_at = Instant::now();
    cluster.crash().await;
    let status = tokio::time::timeout(Duration::from_secs(5), held.stream.next())
        .await
        .expect("the holder hears about the crash")
        .expect_err("the stream ends with an error");
    eprintln!(
        "PostgreSQL crash: the holder heard LOCK_LOST {:?} after pg_ctl stop began",
        crashed_at.elapsed()
    );
    assert_reason(&status, Code::Aborted, "LOCK_LOST");
    a.wait_status("", ServingStatus::NotServing).await;
    cluster.restart().await;
    a.wait_serving("").await;

    let after = grants(&a, &KEYS, 10).await;
    assert_rising(&after, "after the restart");
    let min_after = *after.iter().min().unwrap();
    eprintln!("fencing tokens: at most {max_before} before the crash, from {min_after} after it");
    assert!(
        min_after > max_before,
        "{min_after} after the crash <= {max_before} before it"
    );

    // A second replica, started after the restart, grants the same keys.
    let b = TestApp::start_unready(&url, &flags).await;
    b.wait_serving("").await;
    let mut interleaved = Vec::new();
    for _ in 0..5 {
        interleaved.extend(grants(&b, &KEYS, 1).await);
        interleaved.extend(grants(&a, &KEYS, 1).await);
    }
    interleaved.extend(grants(&b, &["crash-held"], 1).await);
    assert_rising(&interleaved, "two replicas after the restart");
    assert!(*interleaved.first().unwrap() > *after.iter().max().unwrap());
    tokio::join!(b.stop(), a.stop());
}

// ---------------------------------------------------------------------------
// 3. A frozen link to PostgreSQL.
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_database_link_tells_the_holder_lock_lost_no_later_than_another_replica_is_granted() {
    const KEY: &str = "frozen-link";
    let db = TestDb::postgres().await;
    let proxy = Proxy::start(url_addr(&db.url)).await;
    let flags = ["--database-lock-idle-tx-timeout-ms", "1500"];
    let a = TestApp::start_unready(&url_via(&db.url, proxy.addr), &flags).await;
    a.wait_serving("").await;
    let b = TestApp::start(&db, &flags).await;

    let mut holder = lock(&mut a.lock_client().await, KEY, None).await.unwrap();
    let a_token = holder.token();
    // The holder keeps alive every 300 ms on its own and notes when it hears the end.
    let keeper = tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_millis(300));
        loop {
            tokio::select! {
                reply = holder.stream.next() => match reply {
                    Ok(Some(Event::KeptAlive(_))) => {}
                    Ok(other) => panic!("expected kept_alive or an error, got {other:?}"),
                    Err(status) => return (status, Instant::now()),
                },
                _ = tick.tick() => {
                    // The stream may be ending already; its status follows.
                    let _ = holder.stream.requests.send(keep_alive()).await;
                }
            }
        }
    });
    // The link has carried heartbeats and keep-alives for a while.
    let mut conn = db.connect().await;
    assert_eq!(key_holders(&mut conn, &[KEY.to_owned()]).await.len(), 1);

    proxy.freeze();
    let frozen_at = Instant::now();
    let mut b_client = b.lock_client().await;
    let waiter = tokio::spawn(async move {
        let h = lock(&mut b_client, KEY, Some(Duration::from_secs(20))).await;
        (h, Instant::now())
    });
    let (granted, granted_at) = waiter.await.unwrap();
    let granted = granted.expect("the other replica is granted once PostgreSQL ends the frozen session");
    let (status, lost_at) = tokio::time::timeout(Duration::from_secs(20), keeper)
        .await
        .expect("the holder hears the end")
        .unwrap();
    eprintln!(
        "frozen link (lease 1500ms): holder heard {:?} after {:?}; the other replica was granted after {:?}",
        status.code(),
        lost_at - frozen_at,
        granted_at - frozen_at
    );
    assert_reason(&status, Code::Aborted, "LOCK_LOST");
    assert!(
        lost_at <= granted_at,
        "the holder heard LOCK_LOST {:?} after the other replica was granted",
        lost_at - granted_at
    );
    assert!(granted.token() > a_token);
    granted.release().await;
    proxy.thaw();
    b.stop().await;
    drop(a);
}

// ---------------------------------------------------------------------------
// 4. PostgreSQL's lock table full.
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_grant_that_finds_postgresqls_lock_table_full_answers_lock_capacity_exhausted_and_disturbs_nothing_else() {
    const BOUND: usize = 5000;
    const WAVE: usize = 50;
    const STREAMS_PER_CHANNEL: usize = 100;
    let cluster = PrivateCluster::start(&["max_connections=20", "max_locks_per_transaction=10", "fsync=off"]).await;
    let app = TestApp::start_unready(
        &cluster.url(),
        &[
            "--database-pool-max",
            "4",
            "--database-lock-pool-max",
            "2",
            "--database-lock-idle-tx-timeout-ms",
            "10000",
        ],
    )
    .await;
    app.wait_serving("").await;
    let mut conn = PgConnection::connect(&cluster.url()).await.unwrap();
    let mut clients: Vec<LockClient> = Vec::new();
    let mut held: Vec<Held> = Vec::new();
    let mut refused: Vec<Status> = Vec::new();
    let started = Instant::now();
    let mut pids = Vec::new();
    while refused.is_empty() {
        assert!(
            held.len() < BOUND,
            "{BOUND} locks granted and PostgreSQL's lock table never filled up"
        );
        while clients.len() * STREAMS_PER_CHANNEL < held.len() + WAVE {
            clients.push(app.lock_client().await);
        }
        let base = held.len();
        let wave = futures::future::join_all((0..WAVE).map(|i| {
            let n = base + i;
            let mut client = clients[n / STREAMS_PER_CHANNEL].clone();
            async move { lock(&mut client, &format!("full-{n}"), Some(Duration::ZERO)).await }
        }))
        .await;
        for result in wave {
            match result {
                Ok(h) => held.push(h),
                Err(status) => refused.push(status),
            }
        }
        if pids.is_empty() {
            // Read while there is room: the first wave connected both sessions.
            pids = lock_session_pids(&mut conn).await;
            assert_eq!(pids.len(), 2, "two lock sessions");
        }
    }
    eprintln!(
        "lock table full after {} grants ({} refused in the last wave) in {:?}",
        held.len(),
        refused.len(),
        started.elapsed()
    );
    // The refused batch may have got part of the way (its locks released
    // again): fill what is left one key at a time, until a lone grant is
    // refused too.
    let mut singles = 0;
    loop {
        let n = held.len();
        while clients.len() * STREAMS_PER_CHANNEL <= n {
            clients.push(app.lock_client().await);
        }
        match lock(
            &mut clients[n / STREAMS_PER_CHANNEL],
            &format!("full-{n}-single"),
            Some(Duration::ZERO),
        )
        .await
        {
            Ok(h) => held.push(h),
            Err(status) => {
                refused.push(status);
                break;
            }
        }
        singles += 1;
        assert!(singles < BOUND, "single grants never ran out");
    }
    eprintln!("then {singles} more one at a time: {} locks held", held.len());
    for status in &refused {
        assert_reason(status, Code::Unavailable, "LOCK_CAPACITY_EXHAUSTED");
        assert!(status.get_details_retry_info().is_some(), "{status:?}");
    }

    // The failed batches left nothing behind, and every grant still holds.
    let advisory = advisory_locks_of(&mut conn, &pids).await;
    assert_eq!(
        advisory,
        i64::try_from(held.len()).unwrap(),
        "advisory locks of vitals-lock backends"
    );
    futures::future::join_all(held.iter_mut().map(Held::keep_alive)).await;

    let mut health: HealthCheckServiceClient<Channel> = app.health_client().await;
    // A run needs lock-table room too (its system lock, its transaction's
    // locks): it may be refused, but as a retryable UNAVAILABLE, never as an
    // internal error.
    let while_full = health.submit_run(submit("while-full", "full-system")).await;
    eprintln!(
        "SubmitRun while the lock table is full: {:?}",
        while_full
            .as_ref()
            .map(|_| "ok")
            .map_err(|s| (s.code(), s.message().to_owned()))
    );
    if let Err(status) = &while_full {
        assert_eq!(status.code(), Code::Unavailable, "{status:?}");
        assert!(status.get_details_retry_info().is_some(), "{status:?}");
    }

    // Room again: a new grant, and SubmitRun, which takes a system lock.
    for h in held.drain(..5) {
        h.release().await;
    }
    let fresh = lock(&mut clients[0], "full-fresh", Some(Duration::ZERO))
        .await
        .expect("a grant succeeds once locks were released");
    held.push(fresh);
    health
        .submit_run(submit("after-release", "full-system"))
        .await
        .expect("SubmitRun runs once the lock table has room");
    // The run's system lock is let go after its COMMIT, a moment after the
    // reply: wait for it, then only the clients' locks remain.
    let want = i64::try_from(held.len()).unwrap();
    eventually(PATIENCE, "only the held streams' advisory locks remain", async || {
        let advisory = advisory_locks_of(&mut conn, &pids).await;
        if advisory == want {
            Ok(())
        } else {
            Err(format!(
                "advisory locks of vitals-lock backends: {advisory}, {want} held streams"
            ))
        }
    })
    .await;
    futures::future::join_all(held.into_iter().map(Held::release)).await;
    app.stop().await;
}

// ---------------------------------------------------------------------------
// 5. Keys that collide with vitals' own locks.
// ---------------------------------------------------------------------------

/// The key whose `hashtextextended('lock:' || key, 0)` equals
/// `hashtextextended('health:checkout', 0)`, the single-bigint lock system
/// `checkout`'s runs were serialised on before the redesign: holding it
/// blocked every run of that system.
const COLLIDING_KEY: &str = "xxxxxxx={/koGGgb#^#";

both_backends!(holding_a_key_whose_old_hash_equals_a_systems_lock_never_blocks_that_systems_runs);
/// No client key can reach vitals' internal locks any more, whatever it is:
/// a client key becomes one single-`bigint` advisory lock
/// (`pg_locks.objsubid = 1`), while vitals' own locks (a system's
/// serialisation `(0x76697473, hashtext(system))`, the transition sequence,
/// migrations) are two-`int4` advisory locks (`objsubid = 2`). PostgreSQL
/// keeps the two kinds in different lock-tag spaces: they never conflict,
/// even when the 64 bits coincide. (A run's system lock is held only for a
/// moment, so the test shows the client lock's kind and that the run is not
/// blocked rather than catching both in `pg_locks` at once.)
async fn holding_a_key_whose_old_hash_equals_a_systems_lock_never_blocks_that_systems_runs(backend: Backend) {
    let db = TestDb::create(backend).await;
    let app = TestApp::start(&db, &["--database-lock-timeout-ms", "2000"]).await;
    if backend == Backend::Postgres {
        let mut conn = db.connect().await;
        let collides: bool =
            sqlx::query_scalar("SELECT hashtextextended('lock:' || $1, 0) = hashtextextended('health:checkout', 0)")
                .bind(COLLIDING_KEY)
                .fetch_one(&mut conn)
                .await
                .unwrap();
        assert!(collides, "the key is the one whose hash equals the old system lock's");
    }
    let held = lock(&mut app.lock_client().await, COLLIDING_KEY, None).await.unwrap();
    if backend == Backend::Postgres {
        let mut conn = db.connect().await;
        let kinds: Vec<(i16, i64, i64)> = sqlx::query_as(
            "SELECT l.objsubid, l.classid::int8, l.objid::int8 FROM pg_locks l \
             JOIN pg_stat_activity a ON a.pid = l.pid AND a.application_name = 'vitals-lock' \
             WHERE l.locktype = 'advisory' AND l.granted \
               AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())",
        )
        .fetch_all(&mut conn)
        .await
        .unwrap();
        assert_eq!(kinds.len(), 1, "only the client's lock is held: {kinds:?}");
        assert_eq!(
            kinds[0].0, 1,
            "a client key is a single-bigint advisory lock: {kinds:?}"
        );
        assert_eq!(key_holders(&mut conn, &[COLLIDING_KEY.to_owned()]).await.len(), 1);
    }
    let mut health = app.health_client().await;
    for i in 0..3 {
        let started = Instant::now();
        let reply = tokio::time::timeout(
            Duration::from_secs(5),
            health.submit_run(submit(&format!("collide-{i}"), "checkout")),
        )
        .await
        .expect("SubmitRun answers");
        let took = started.elapsed();
        eprintln!("SubmitRun for checkout while {COLLIDING_KEY:?} is held: {took:?}");
        reply.expect("the run is not blocked by the client's lock");
        assert!(took < Duration::from_secs(1), "took {took:?}");
    }
    held.release().await;
    app.stop().await;
}

// ---------------------------------------------------------------------------
// 6. Plain SQL holders of the same keys.
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn raw_sql_lock_holders_and_vitals_holders_of_a_key_exclude_each_other() {
    const KEY: &str = "shared-with-sql";
    let db = TestDb::postgres().await;
    let app = TestApp::start(&db, &[]).await;
    let mut client = app.lock_client().await;

    // Direction 1: a program holds the key with plain SQL.
    let mut sql = db.connect().await;
    sql.execute("BEGIN").await.unwrap();
    sqlx::query("SELECT pg_advisory_xact_lock(hashtextextended('lock:' || $1, 0))")
        .bind(KEY)
        .execute(&mut sql)
        .await
        .unwrap();
    let err = lock(&mut client, KEY, Some(Duration::ZERO))
        .await
        .err()
        .expect("a try on a key held with SQL is refused");
    assert_reason(&err, Code::Aborted, "LOCK_NOT_AVAILABLE");
    let mut waiter_client = client.clone();
    let waiter = tokio::spawn(async move {
        let h = lock(&mut waiter_client, KEY, Some(Duration::from_secs(10))).await;
        (h, Instant::now())
    });
    // The waiter is at the head of the local queue, trying PostgreSQL.
    until(PATIENCE, "the waiter is queued", || app.local_lock_stats().keys >= 1).await;
    let committed_at = Instant::now();
    sql.execute("COMMIT").await.unwrap();
    let (held, granted_at) = waiter.await.unwrap();
    let held = held.expect("the waiter is granted after the COMMIT");
    let after = granted_at - committed_at;
    eprintln!("granted {after:?} after the SQL holder's COMMIT");
    assert!(after < Duration::from_millis(50), "granted {after:?} after the COMMIT");

    // Direction 2: vitals holds the key; the program's try fails until release.
    let try_sql = "SELECT pg_try_advisory_xact_lock(hashtextextended('lock:' || $1, 0))";
    let got: bool = sqlx::query_scalar(try_sql).bind(KEY).fetch_one(&mut sql).await.unwrap();
    assert!(!got, "SQL gets a key vitals holds");
    held.release().await;
    let got: bool = sqlx::query_scalar(try_sql).bind(KEY).fetch_one(&mut sql).await.unwrap();
    assert!(got, "SQL gets the key once vitals released it");
    app.stop().await;
}

// ---------------------------------------------------------------------------
// 7. Acquirers that give up at any moment.
// ---------------------------------------------------------------------------

/// Advisory locks held right now by this test database's vitals-lock sessions.
const LOCK_SESSION_LOCKS: &str = "SELECT count(*) FROM pg_locks l JOIN pg_stat_activity a USING (pid) \
     WHERE l.locktype = 'advisory' AND l.granted AND a.datname = current_database() \
     AND a.application_name = 'vitals-lock'";

/// Acquirers on a few keys, on two replicas, each abandoning its stream at a
/// different moment (while queued, while its try or its hand-off's tokens are
/// in flight, just after its grant, or after a release): once they are all
/// gone, no lock is left in PostgreSQL and the other replica takes every key
/// at once. A grant answered to an acquirer that had just given up, or a
/// hand-off dropped while it drew tokens, used to stay held in PostgreSQL
/// with no owner.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acquirers_that_give_up_at_any_moment_never_leave_a_lock_held() {
    const KEYS: [&str; 4] = ["abandon-a", "abandon-b", "abandon-c", "abandon-d"];
    let db = TestDb::postgres().await;
    let flags = ["--database-lock-pool-max", "1"];
    let a = TestApp::start(&db, &flags).await;
    let b = TestApp::start(&db, &flags).await;
    let mut clients = Vec::new();
    for i in 0..8 {
        let app = if i % 2 == 0 { &a } else { &b };
        clients.push(app.lock_client().await);
    }
    let mut tasks = Vec::new();
    for (i, client) in clients.into_iter().enumerate() {
        tasks.push(tokio::spawn(async move {
            let mut client = client;
            for round in 0..60_u64 {
                let key = KEYS[(i + usize::try_from(round).unwrap()) % KEYS.len()];
                // Give up after 0..1.5 ms, at a different point each time.
                let patience = Duration::from_micros((round * 97 + i as u64 * 131) % 1500);
                let attempt = lock(&mut client, key, Some(Duration::from_secs(2)));
                match tokio::time::timeout(patience, attempt).await {
                    Ok(Ok(held)) if round % 3 == 0 => {
                        held.release().await;
                    }
                    // Granted and dropped, refused, or abandoned mid-way.
                    _ => {}
                }
            }
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
    let mut conn = db.connect().await;
    // Abandoned streams are let go as the server notices them; wait until
    // PostgreSQL shows none of their locks.
    until_count(
        &mut conn,
        LOCK_SESSION_LOCKS,
        0,
        "every abandoned lock released in PostgreSQL",
    )
    .await;
    for app in [&a, &b] {
        let mut client = app.lock_client().await;
        for key in KEYS {
            let held = lock(&mut client, key, Some(Duration::ZERO))
                .await
                .unwrap_or_else(|status| panic!("{key:?} is still held by nobody: {status:?}"));
            held.release().await;
        }
    }
    tokio::join!(a.stop(), b.stop());
}

// ---------------------------------------------------------------------------
// 8. A key kept busy by one replica's queue.
// ---------------------------------------------------------------------------

/// `clients` clients of `app` taking `key` one after the other until `stop`
/// turns true (or `until` passes), counting grants in `granted`; each
/// returns the fencing tokens it got.
async fn keep_busy(
    app: &TestApp,
    key: &'static str,
    clients: usize,
    stop: &Arc<AtomicBool>,
    granted: &Arc<AtomicUsize>,
    until: Instant,
) -> Vec<tokio::task::JoinHandle<Vec<u64>>> {
    let mut tasks = Vec::new();
    for _ in 0..clients {
        let mut client = app.lock_client().await;
        let (stop, granted) = (stop.clone(), granted.clone());
        tasks.push(tokio::spawn(async move {
            let mut tokens = Vec::new();
            while !stop.load(Ordering::SeqCst) && Instant::now() < until {
                let held = lock(&mut client, key, Some(Duration::from_secs(20)))
                    .await
                    .expect("the busy key is granted");
                granted.fetch_add(1, Ordering::SeqCst);
                tokens.push(held.token());
                held.release().await;
            }
            tokens
        }));
    }
    tasks
}

/// A key handed from one local holder to the next is held in PostgreSQL
/// across the end of its streaks while no other replica waits for it: the
/// streak's end asks, and keeps it. Releasing it there throws away the rest
/// of its token block, so the tokens of one replica's grants leave no gap
/// (the sequence is this test database's own). Before, every streak
/// (200 ms) ended with a release, a pause and a new block: 4 gaps in 900 ms.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_busy_key_nobody_else_waits_for_stays_held_in_postgresql_at_the_end_of_its_streaks() {
    const KEY: &str = "busy-alone";
    let db = TestDb::postgres().await;
    let app = TestApp::start(&db, &[]).await;
    let stop = Arc::new(AtomicBool::new(false));
    // Less than the streaks a busy key may keep its lock through (4 x 200 ms).
    let until = Instant::now() + Duration::from_millis(900);
    let tasks = keep_busy(&app, KEY, 8, &stop, &Arc::default(), until).await;
    let mut tokens = Vec::new();
    for task in tasks {
        tokens.extend(task.await.expect("a client finished"));
    }
    tokens.sort_unstable();
    let gaps = tokens.windows(2).filter(|w| w[1] != w[0] + 1).count();
    eprintln!("{} grants, {gaps} gaps in the tokens", tokens.len());
    assert!(tokens.len() > 16, "only {} grants", tokens.len());
    // One gap is allowed: all 8 clients between a release and their next
    // acquire at once empties the queue, which releases the key for real.
    assert!(
        gaps <= 1,
        "{gaps} gaps in {} tokens: the key was released at streak ends",
        tokens.len()
    );
    app.stop().await;
}

/// While one replica's queue keeps a key busy, a client of another replica
/// that waits for it announces its interest, and the busy replica lets the
/// key go at the end of its current streak (200 ms) for it: the grant comes
/// from a release for the waiter (counted), not from the release the busy
/// replica makes anyway every 5 streaks, which the test waits to pass first.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_waiter_on_another_replica_is_granted_a_key_kept_busy_on_the_first_at_the_end_of_a_streak() {
    const KEY: &str = "busy-shared";
    let db = TestDb::postgres().await;
    let a = TestApp::start(&db, &[]).await;
    let b = TestApp::start(&db, &[]).await;
    let stop = Arc::new(AtomicBool::new(false));
    let granted = Arc::new(AtomicUsize::new(0));
    let tasks = keep_busy(&a, KEY, 8, &stop, &granted, Instant::now() + Duration::from_secs(60)).await;
    let mut client = b.lock_client().await;
    let mut waits = Vec::new();
    let mut yielded = 0;
    for _ in 0..3 {
        // Just after a periodic release (which would grant `b` whether or not
        // it announced itself), with the key held in PostgreSQL and handed
        // on locally again (`b`'s release and an immediate try would
        // otherwise take it straight back): the next four streak ends ask
        // whether another replica waits.
        let periodic = a.streak_releases().periodic;
        until(PATIENCE, "the busy replica releases the key periodically", || {
            a.streak_releases().periodic > periodic
        })
        .await;
        let since = granted.load(Ordering::SeqCst);
        until(PATIENCE, "the busy replica hands the key on", || {
            granted.load(Ordering::SeqCst) >= since + 20 && a.local_lock_stats().waiting >= 2
        })
        .await;
        let before = a.streak_releases();
        let asked = Instant::now();
        let held = lock(&mut client, KEY, Some(Duration::from_secs(20)))
            .await
            .expect("the other replica's waiter is granted");
        waits.push(asked.elapsed());
        let after = a.streak_releases();
        // Granted by a release for it, not by the next periodic one (unless
        // the machine stalled the waiter past four streaks).
        if after.for_waiters > before.for_waiters && after.periodic == before.periodic {
            yielded += 1;
        }
        held.release().await;
    }
    stop.store(true, Ordering::SeqCst);
    for task in tasks {
        task.await.expect("a client finished");
    }
    eprintln!("the other replica waited {waits:?}, {yielded} of 3 granted by a release for it");
    assert!(
        yielded >= 2,
        "the busy replica let the key go for the waiter {yielded} times of 3"
    );
    for wait in &waits {
        assert!(*wait < Duration::from_secs(2), "waited {wait:?} for a busy key");
    }
    a.stop().await;
    b.stop().await;
}

/// A program waiting in PostgreSQL itself announces nothing; the replica
/// that keeps a key busy still releases it every 5 streaks (about a second),
/// and the program gets it then.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_program_waiting_in_postgresql_is_granted_a_key_kept_busy_by_vitals_within_about_a_second() {
    const KEY: &str = "busy-with-sql";
    let db = TestDb::postgres().await;
    let app = TestApp::start(&db, &[]).await;
    let stop = Arc::new(AtomicBool::new(false));
    let granted = Arc::new(AtomicUsize::new(0));
    let tasks = keep_busy(&app, KEY, 8, &stop, &granted, Instant::now() + Duration::from_secs(60)).await;
    // Granted in PostgreSQL and handed on locally, not still connecting.
    until(PATIENCE, "the busy replica hands the key on", || {
        granted.load(Ordering::SeqCst) >= 20 && app.local_lock_stats().waiting >= 2
    })
    .await;
    let mut sql = db.connect().await;
    sql.execute("SET statement_timeout = '10s'").await.unwrap();
    sql.execute("BEGIN").await.unwrap();
    let asked = Instant::now();
    sqlx::query("SELECT pg_advisory_xact_lock(hashtextextended('lock:' || $1, 0))")
        .bind(KEY)
        .execute(&mut sql)
        .await
        .expect("the program is granted the key");
    let waited = asked.elapsed();
    sql.execute("COMMIT").await.unwrap();
    stop.store(true, Ordering::SeqCst);
    for task in tasks {
        task.await.expect("a client finished");
    }
    eprintln!("the program waited {waited:?}");
    assert!(waited < Duration::from_millis(2500), "the program waited {waited:?}");
    app.stop().await;
}
