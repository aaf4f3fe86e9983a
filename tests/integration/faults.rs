//! Database loss mid-load and stalled critical sections: every call still
//! ends with a precise status, and the server serves again by itself.

use std::{
    collections::BTreeSet,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use tonic::Code;
use tonic_types::StatusExt;
use vitals::proto;

use crate::{
    harness::{PATIENCE, TestApp, TestDb, WORK_SESSIONS_BLOCKED, until, until_count},
    proxy::{Proxy, url_addr, url_via},
};

fn run(system: usize, i: usize) -> proto::SubmitRunRequest {
    proto::SubmitRunRequest {
        run_id: format!("s{system}-r{i}"),
        system_id: format!("sys-{system}"),
        check_id: "c".into(),
        status: if i.is_multiple_of(3) {
            proto::HealthStatus::Unhealthy
        } else {
            proto::HealthStatus::Healthy
        } as i32,
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_outage_mid_load_loses_no_acknowledged_run_and_the_service_recovers() {
    let db = TestDb::postgres().await;
    let proxy = Arc::new(Proxy::start(url_addr(&db.url)).await);
    let app = TestApp::start_unready(
        &url_via(&db.url, proxy.addr),
        &[
            "--database-pool-connection-timeout-ms",
            "500",
            "--request-timeout-ms",
            "2000",
        ],
    )
    .await;
    app.wait_serving("").await;

    let acknowledged = Arc::new(Mutex::new(BTreeSet::new()));
    let (cut_tx, cut_rx) = tokio::sync::watch::channel(0u8);
    let mut workers = Vec::new();
    for system in 0..8 {
        let mut client = app.health_client().await;
        let acknowledged = acknowledged.clone();
        let mut phase = cut_rx.clone();
        workers.push(tokio::spawn(async move {
            let mut codes = Vec::new();
            let mut i = 0;
            // Submit until the outage has come and gone and a few more runs landed.
            while *phase.borrow_and_update() < 2 || i < 400 {
                let started = Instant::now();
                let result = client.submit_run(run(system, i)).await;
                assert!(
                    started.elapsed() < Duration::from_secs(5),
                    "a request hung for {:?}",
                    started.elapsed()
                );
                match result {
                    Ok(_) => {
                        acknowledged.lock().unwrap().insert(format!("s{system}-r{i}"));
                    }
                    Err(status) => codes.push(status.code()),
                }
                i += 1;
                if i > 5000 {
                    break;
                }
            }
            codes
        }));
    }
    // Let load build up, cut the database, then restore it.
    until(PATIENCE, "100 runs are acknowledged before the outage", || {
        acknowledged.lock().unwrap().len() >= 100
    })
    .await;
    proxy.cut();
    app.wait_status("", tonic_health::pb::health_check_response::ServingStatus::NotServing)
        .await;
    let during = acknowledged.lock().unwrap().len();
    cut_tx.send_replace(1);
    proxy.restore();
    app.wait_serving("").await;
    cut_tx.send_replace(2);

    let mut failures = Vec::new();
    for w in workers {
        failures.extend(w.await.unwrap());
    }
    for code in &failures {
        assert!(
            matches!(code, Code::Unavailable | Code::DeadlineExceeded),
            "a failure during the outage was {code:?}, not a retryable code"
        );
    }
    let acked = acknowledged.lock().unwrap().clone();
    assert!(acked.len() > during, "no run was acknowledged after recovery");
    let mut conn = db.connect().await;
    let stored: BTreeSet<String> = sqlx::query_scalar("SELECT run_id FROM runs")
        .fetch_all(&mut conn)
        .await
        .unwrap()
        .into_iter()
        .collect();
    let lost: Vec<_> = acked.difference(&stored).collect();
    assert!(lost.is_empty(), "acknowledged runs missing from the database: {lost:?}");
    // No lock is left behind by the sessions the outage killed.
    let held: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM pg_locks l JOIN pg_stat_activity a USING (pid) \
         WHERE l.locktype = 'advisory' AND a.datname = current_database()",
    )
    .fetch_one(&mut conn)
    .await
    .unwrap();
    assert_eq!(held, 0, "advisory locks leaked");
    app.stop().await;
}

/// A critical section blocked in the database longer than the lease lets its
/// system's lock go (the lock manager stops waiting for it; the system's row
/// lock keeps the writes serialised), so the next run of the system is not
/// stuck behind it.
#[tokio::test]
async fn a_critical_section_stalled_past_the_lease_lets_its_system_lock_go_and_waiters_proceed() {
    const LEASE: Duration = Duration::from_millis(500);
    let db = TestDb::postgres().await;
    let app = TestApp::start(
        &db,
        &[
            "--database-lock-idle-tx-timeout-ms",
            "500",
            "--request-timeout-ms",
            "20000",
        ],
    )
    .await;
    // Hold a conflicting uncommitted insert so the first SubmitRun stalls
    // inside its critical section, holding the lock of system `sys`.
    let mut blocker = db.connect().await;
    sqlx::query("BEGIN").execute(&mut blocker).await.unwrap();
    sqlx::query(
        "INSERT INTO runs (run_id, system_id, check_id, status, observed_at) VALUES ('stall', 'sys', 'c', 1, now())",
    )
    .execute(&mut blocker)
    .await
    .unwrap();
    let mut stalled_client = app.health_client().await;
    let stalled_sent = Instant::now();
    let stalled = tokio::spawn(async move {
        stalled_client
            .submit_run(proto::SubmitRunRequest {
                run_id: "stall".into(),
                system_id: "sys".into(),
                check_id: "c".into(),
                status: proto::HealthStatus::Healthy as i32,
                ..Default::default()
            })
            .await
    });
    // Wait until the stalled request is inside its critical section.
    let mut probe = db.connect().await;
    until_count(&mut probe, WORK_SESSIONS_BLOCKED, 1, "the first SubmitRun stalled").await;
    // A second run of the same system waits for the system's lock and gets
    // it once the stalled section has held it for a lease.
    let started = Instant::now();
    let mut client = app.health_client().await;
    client
        .submit_run(proto::SubmitRunRequest {
            run_id: "waiter".into(),
            system_id: "sys".into(),
            check_id: "c".into(),
            status: proto::HealthStatus::Healthy as i32,
            ..Default::default()
        })
        .await
        .expect("the waiter proceeds");
    let waited = started.elapsed();
    let since_stall = stalled_sent.elapsed();
    eprintln!(
        "stalled critical section: the next run waited {waited:?}, {since_stall:?} after the stalled one (lease {LEASE:?})"
    );
    // The stalled section kept the lock for its lease, and not much longer.
    assert!(since_stall >= LEASE, "the lock was let go after {since_stall:?}");
    assert!(waited < LEASE + Duration::from_secs(2), "waited {waited:?}");
    sqlx::query("ROLLBACK").execute(&mut blocker).await.unwrap();
    // The stalled request finishes; it never hangs. Its write was planned on
    // the system as it was before the waiter's run; finding the system
    // written since, it is planned again on the newer state instead of
    // overwriting it: the check's window holds both runs. (Written as
    // planned, it would hold only `stall`.)
    let outcome = tokio::time::timeout(Duration::from_secs(10), stalled)
        .await
        .expect("the stalled request ends");
    let reply = outcome.unwrap().expect("the stalled run is stored").into_inner();
    assert!(!reply.duplicate);
    let health = reply.system_health.unwrap();
    assert_eq!(health.checks.len(), 1);
    assert_eq!(health.checks[0].runs_considered, 2, "{health:?}");
    let mut client = app.health_client().await;
    let stored = client
        .get_system_health(proto::GetSystemHealthRequest {
            system_id: "sys".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .system_health
        .unwrap();
    assert_eq!(stored, health);
    app.stop().await;
}

/// Holds system `held`'s row in a session of its own, as a write of the
/// system still committing would, until the returned connection rolls back.
async fn hold_system_row(db: &TestDb) -> sqlx::PgConnection {
    let mut blocker = db.connect().await;
    sqlx::query("BEGIN").execute(&mut blocker).await.unwrap();
    let held: i64 =
        sqlx::query_scalar("SELECT count(*) FROM (SELECT FROM systems WHERE system_id = 'held' FOR UPDATE) s")
            .fetch_one(&mut blocker)
            .await
            .unwrap();
    assert_eq!(held, 1);
    blocker
}

fn held_run(run_id: &str) -> proto::SubmitRunRequest {
    proto::SubmitRunRequest {
        run_id: run_id.into(),
        system_id: "held".into(),
        check_id: "c".into(),
        status: proto::HealthStatus::Unhealthy as i32,
        ..Default::default()
    }
}

/// A client gives up while its run's write waits for a row lock: the write
/// ends in the database within about a second of the request, instead of
/// waiting on, holding its own locks, until the row is free or its
/// statement_timeout. Fails without closing the connection of an abandoned
/// write (the backend waits for the whole 10 s of `until_count`).
#[tokio::test]
async fn a_write_abandoned_by_its_client_while_it_waits_for_a_row_lock_ends_in_the_database() {
    let db = TestDb::postgres().await;
    let app = TestApp::start(&db, &[]).await;
    let mut client = app.health_client().await;
    client.submit_run(held_run("r0")).await.unwrap();
    let mut blocker = hold_system_row(&db).await;

    let mut impatient = client.clone();
    let waiting = tokio::spawn(async move {
        let mut request = tonic::Request::new(held_run("r1"));
        request.set_timeout(Duration::from_millis(1500));
        impatient.submit_run(request).await
    });
    let mut probe = db.connect().await;
    until_count(
        &mut probe,
        WORK_SESSIONS_BLOCKED,
        1,
        "the write waits for the system's row",
    )
    .await;
    let err = waiting.await.unwrap().unwrap_err();
    assert!(
        matches!(err.code(), Code::Cancelled | Code::DeadlineExceeded),
        "{err:?}"
    );
    let gave_up = Instant::now();
    until_count(&mut probe, WORK_SESSIONS_BLOCKED, 0, "the abandoned write ends").await;
    let ended_after = gave_up.elapsed();
    eprintln!("abandoned write ended {ended_after:?} after its client gave up");
    assert!(ended_after < Duration::from_secs(5), "{ended_after:?}");

    sqlx::query("ROLLBACK").execute(&mut blocker).await.unwrap();
    let stored: i64 = sqlx::query_scalar("SELECT count(*) FROM runs WHERE run_id = 'r1'")
        .fetch_one(&mut probe)
        .await
        .unwrap();
    assert_eq!(stored, 0, "the abandoned write wrote nothing");
    let reply = client.submit_run(held_run("r1")).await.unwrap().into_inner();
    assert!(!reply.duplicate);
    app.stop().await;
}

/// A write that waits for a row lock longer than a request may wait for its
/// system answers SYSTEM_BUSY before the request's deadline (the work
/// sessions' lock_timeout), and leaves nothing waiting.
#[tokio::test]
async fn a_write_waiting_for_a_row_lock_past_the_lock_wait_answers_system_busy_before_the_deadline() {
    let db = TestDb::postgres().await;
    let app = TestApp::start(&db, &["--request-timeout-ms", "1500"]).await;
    let mut client = app.health_client().await;
    client.submit_run(held_run("r0")).await.unwrap();
    let mut blocker = hold_system_row(&db).await;

    let started = Instant::now();
    let err = client.submit_run(held_run("r1")).await.unwrap_err();
    let took = started.elapsed();
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    assert_eq!(err.get_details_error_info().unwrap().reason, "SYSTEM_BUSY");
    assert!(took < Duration::from_millis(1500), "answered after {took:?}");
    let mut probe = db.connect().await;
    until_count(&mut probe, WORK_SESSIONS_BLOCKED, 0, "nothing waits after SYSTEM_BUSY").await;

    sqlx::query("ROLLBACK").execute(&mut blocker).await.unwrap();
    let reply = client.submit_run(held_run("r1")).await.unwrap().into_inner();
    assert!(!reply.duplicate, "the refused write wrote nothing");
    app.stop().await;
}
