//! `/metrics`: a real server's scrape, parsed with an exposition-format
//! parser and checked with `promtool check metrics` (Debian's `prometheus`
//! package; scripts/test.sh and .ci/run install it), counts known traffic
//! exactly; the dashboard and the alert rules use only metrics a scrape has.

use std::{collections::BTreeSet, process::Stdio, time::Duration};

use tokio::io::AsyncWriteExt;
use tonic::Code;
use vitals::proto;

use crate::{
    harness::{Backend, PATIENCE, TestApp, TestDb, assert_reason, eventually},
    withlock::lock,
};

/// A parsed scrape.
pub struct Scraped {
    samples: Vec<prometheus_parse::Sample>,
    text: String,
}

impl Scraped {
    pub fn parse(text: String) -> Scraped {
        let lines = text.lines().map(|line| Ok(line.to_owned()));
        let scrape = prometheus_parse::Scrape::parse(lines).expect("the scrape parses");
        Scraped {
            samples: scrape.samples,
            text,
        }
    }

    /// The value of the one sample of `name` whose labels include `labels`:
    /// a counter, gauge, or a histogram's `_count`/`_sum`. `None`: no such
    /// sample.
    pub fn value(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        let mut found = self
            .samples
            .iter()
            .filter(|s| s.metric == name && labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v)));
        let sample = found.next()?;
        assert!(found.next().is_none(), "{name}{labels:?} names more than one series");
        match sample.value {
            prometheus_parse::Value::Counter(v)
            | prometheus_parse::Value::Gauge(v)
            | prometheus_parse::Value::Untyped(v) => Some(v),
            ref other => panic!("{name}{labels:?} is {other:?}, not a number"),
        }
    }

    /// [`Scraped::value`], which must exist.
    pub fn get(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.value(name, labels)
            .unwrap_or_else(|| panic!("no {name}{labels:?} in the scrape:\n{}", self.text))
    }

    /// Every metric name the scrape has a sample of (histograms under their
    /// own name and their `_bucket`, `_count` and `_sum` series).
    pub fn names(&self) -> BTreeSet<String> {
        let mut names = BTreeSet::new();
        for sample in &self.samples {
            names.insert(sample.metric.clone());
            if matches!(sample.value, prometheus_parse::Value::Histogram(_)) {
                names.insert(format!("{}_bucket", sample.metric));
            }
        }
        names
    }
}

/// Runs `promtool ARGS` with `stdin` and fails the test with its output
/// unless it succeeds.
pub async fn promtool(args: &[&str], stdin: &str) {
    let mut child = tokio::process::Command::new("promtool")
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap_or_else(|err| {
            panic!("promtool not found ({err}): install Debian's prometheus package (scripts/test.sh does)")
        });
    let mut input = child.stdin.take().expect("promtool's stdin");
    input.write_all(stdin.as_bytes()).await.expect("feed promtool");
    drop(input);
    let out = tokio::time::timeout(PATIENCE, child.wait_with_output())
        .await
        .expect("promtool finishes")
        .expect("promtool runs");
    assert!(
        out.status.success(),
        "promtool {args:?} failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

const SUBMIT_RUN: (&str, &str) = ("grpc_method", "SubmitRun");
const WITH_LOCK: (&str, &str) = ("grpc_method", "WithLock");

fn run(run_id: &str, status: proto::HealthStatus, message: &str) -> proto::SubmitRunRequest {
    proto::SubmitRunRequest {
        run_id: run_id.into(),
        system_id: "checkout".into(),
        check_id: "http".into(),
        status: status as i32,
        message: message.into(),
        ..Default::default()
    }
}

both_backends!(a_scrape_counts_runs_locks_refusals_and_errors_exactly);

/// Known traffic (three new runs, a duplicate, a conflict, two WithLocks
/// released and one held, one request refused at the edge) shows in the
/// scrape with exactly those counts and labels, and the scrape passes
/// `promtool check metrics`.
async fn a_scrape_counts_runs_locks_refusals_and_errors_exactly(backend: Backend) {
    let db = TestDb::create(backend).await;
    let app = TestApp::start(&db, &["--max-request-bytes", "1024"]).await;
    let before = Scraped::parse(app.scrape().await);
    promtool(&["check", "metrics"], &before.text).await;
    assert_eq!(before.get("grpc_server_started_total", &[SUBMIT_RUN]), 0.0);
    assert_eq!(before.get("vitals_ready", &[]), 1.0);
    assert_eq!(
        before.get("vitals_build_info", &[("version", env!("CARGO_PKG_VERSION"))]),
        1.0
    );

    let mut health = app.health_client().await;
    // Two failures cross the default degraded threshold: one transition.
    for (id, status) in [
        ("run-1", proto::HealthStatus::Unhealthy),
        ("run-2", proto::HealthStatus::Unhealthy),
        ("run-3", proto::HealthStatus::Unhealthy),
    ] {
        health
            .submit_run(run(id, status, ""))
            .await
            .expect("a new run is stored");
    }
    let duplicate = health
        .submit_run(run("run-1", proto::HealthStatus::Unhealthy, ""))
        .await
        .expect("a duplicate is answered");
    assert!(duplicate.into_inner().duplicate);
    let conflict = health
        .submit_run(run("run-1", proto::HealthStatus::Healthy, ""))
        .await
        .unwrap_err();
    assert_reason(&conflict, Code::AlreadyExists, "RUN_ID_CONFLICT");
    // Refused by the edge's framing, before any handler runs.
    let too_large = health
        .submit_run(run("run-4", proto::HealthStatus::Healthy, &"x".repeat(2000)))
        .await
        .unwrap_err();
    assert_reason(&too_large, Code::ResourceExhausted, "REQUEST_TOO_LARGE");

    let mut locks = app.lock_client().await;
    for key in ["report-a", "report-b"] {
        lock(&mut locks, key, None).await.expect("granted").release().await;
    }
    let held = lock(&mut locks, "report-held", None).await.expect("granted");
    // A second stream waits behind the holder.
    let mut waiter_client = app.lock_client().await;
    let waiter =
        tokio::spawn(async move { lock(&mut waiter_client, "report-held", Some(Duration::from_secs(60))).await });
    eventually(PATIENCE, "the waiter is counted as waiting", async || {
        let waiting = Scraped::parse(app.scrape().await).get("vitals_locks_waiting", &[]);
        if waiting == 1.0 {
            Ok(())
        } else {
            Err(format!("vitals_locks_waiting is {waiting}"))
        }
    })
    .await;

    let after = Scraped::parse(app.scrape().await);
    promtool(&["check", "metrics"], &after.text).await;
    let handled = |method: (&str, &str), code: &str| {
        after
            .value("grpc_server_handled_total", &[method, ("grpc_code", code)])
            .unwrap_or(0.0)
    };
    assert_eq!(after.get("grpc_server_started_total", &[SUBMIT_RUN]), 6.0);
    assert_eq!(
        after.get(
            "grpc_server_started_total",
            &[
                ("grpc_service", "vitals.v1.HealthCheckService"),
                SUBMIT_RUN,
                ("grpc_type", "unary")
            ]
        ),
        6.0
    );
    assert_eq!(handled(SUBMIT_RUN, "OK"), 4.0);
    assert_eq!(handled(SUBMIT_RUN, "AlreadyExists"), 1.0);
    assert_eq!(handled(SUBMIT_RUN, "ResourceExhausted"), 1.0);
    assert_eq!(after.get("grpc_server_handling_seconds_count", &[SUBMIT_RUN]), 6.0);
    assert_eq!(
        after.get("grpc_server_started_total", &[WITH_LOCK, ("grpc_type", "bidi_stream")]),
        4.0
    );
    assert_eq!(handled(WITH_LOCK, "OK"), 2.0);

    assert_eq!(after.get("vitals_runs_submitted_total", &[("outcome", "new")]), 3.0);
    assert_eq!(
        after.get("vitals_runs_submitted_total", &[("outcome", "duplicate")]),
        1.0
    );
    assert_eq!(
        after.get("vitals_runs_submitted_total", &[("outcome", "conflict")]),
        1.0
    );
    assert_eq!(after.get("vitals_transitions_total", &[("to_status", "degraded")]), 1.0);
    assert_eq!(
        after.get("vitals_transitions_total", &[("to_status", "unhealthy")]),
        0.0
    );
    assert_eq!(after.get("vitals_errors_total", &[("reason", "RUN_ID_CONFLICT")]), 1.0);
    assert_eq!(
        after.get("vitals_errors_total", &[("reason", "REQUEST_TOO_LARGE")]),
        1.0
    );
    assert_eq!(after.get("vitals_errors_total", &[("reason", "OVERLOADED")]), 0.0);

    assert_eq!(after.get("vitals_locks_held", &[]), 1.0);
    assert_eq!(after.get("vitals_locks_waiting", &[]), 1.0);
    assert_eq!(after.get("vitals_lock_grants_total", &[]), 3.0);
    assert_eq!(after.get("vitals_lock_wait_seconds_count", &[]), 3.0);
    assert_eq!(after.get("vitals_lock_hold_seconds_count", &[]), 2.0);
    assert!(after.get("vitals_db_pool_acquire_seconds_count", &[("pool", "work")]) >= 4.0);
    assert_eq!(after.get("vitals_db_pool_timeouts_total", &[("pool", "work")]), 0.0);
    assert!(
        after.get("vitals_db_pool_connections", &[("pool", "work"), ("state", "idle")])
            + after.get("vitals_db_pool_connections", &[("pool", "work"), ("state", "in_use")])
            >= 1.0
    );

    // The background count sees the degraded system.
    eventually(PATIENCE, "vitals_systems counts checkout as degraded", async || {
        let scraped = Scraped::parse(app.scrape().await);
        let degraded = scraped.get("vitals_systems", &[("status", "degraded")]);
        if degraded == 1.0 {
            Ok(())
        } else {
            Err(format!("vitals_systems{{status=\"degraded\"}} is {degraded}"))
        }
    })
    .await;

    // The holder lets go: the waiter gets the lock, and the waiting count
    // is back to zero.
    held.release().await;
    let waiter = waiter.await.unwrap().expect("the waiter is granted the lock");
    let released = Scraped::parse(app.scrape().await);
    assert_eq!(released.get("vitals_locks_waiting", &[]), 0.0);
    assert_eq!(released.get("vitals_locks_held", &[]), 1.0);
    assert_eq!(released.get("vitals_lock_hold_seconds_count", &[]), 3.0);
    drop(waiter);
    eventually(
        PATIENCE,
        "no lock is held once the waiter's stream is gone",
        async || {
            let scraped = Scraped::parse(app.scrape().await);
            let held = scraped.get("vitals_locks_held", &[]);
            let cancelled = scraped
                .value("grpc_server_handled_total", &[WITH_LOCK, ("grpc_code", "Canceled")])
                .unwrap_or(0.0);
            if held == 0.0 && cancelled == 1.0 {
                Ok(())
            } else {
                Err(format!("vitals_locks_held is {held}, WithLocks cancelled {cancelled}"))
            }
        },
    )
    .await;
    app.stop().await;
}

#[tokio::test]
async fn an_empty_metrics_address_serves_no_metrics() {
    let db = TestDb::embedded();
    let app = TestApp::start(&db, &["--metrics-addr", ""]).await;
    assert_eq!(app.metrics_addr, None);
    app.stop().await;
}
