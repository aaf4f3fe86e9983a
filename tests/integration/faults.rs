//! Database loss mid-load and stalled critical sections: every call still
//! ends with a precise status, and the server serves again by itself.

use std::{
    collections::BTreeSet,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use tonic::Code;
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
    // The stalled request finishes one way or the other; it never hangs.
    let outcome = tokio::time::timeout(Duration::from_secs(10), stalled)
        .await
        .expect("the stalled request ends");
    let _ = outcome.unwrap();
    app.stop().await;
}
