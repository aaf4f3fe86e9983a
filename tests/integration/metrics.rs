//! `/metrics`: a real server's scrape, parsed with an exposition-format
//! parser and checked with `promtool check metrics` (Debian's `prometheus`
//! package; scripts/test.sh and .ci/run install it), counts known traffic
//! exactly; a real Prometheus server scrapes it and evaluates every query of
//! the dashboard; the dashboard and the alert rules (`promtool check rules`)
//! use only metrics a scrape has.

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
    let app = TestApp::start(
        &db,
        &["--max-request-bytes", "1024", "--metrics-systems-interval-ms", "100"],
    )
    .await;
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
    // One run at a time: each write is alone, never a group.
    for outcome in ["applied", "refused"] {
        assert_eq!(after.get("vitals_db_write_groups_total", &[("outcome", outcome)]), 0.0);
    }
    assert_eq!(after.get("vitals_db_write_group_members_total", &[]), 0.0);
    assert!(
        after.get("vitals_db_pool_connections", &[("pool", "work"), ("state", "idle")])
            + after.get("vitals_db_pool_connections", &[("pool", "work"), ("state", "in_use")])
            >= 1.0
    );
    // A lock is held: with PostgreSQL, on a connected lock session that
    // holds something; the embedded store has no lock connections.
    let lock_sessions = |state| after.get("vitals_db_pool_connections", &[("pool", "lock"), ("state", state)]);
    match backend {
        Backend::Postgres => assert!(lock_sessions("in_use") >= 1.0, "no lock session holds the lock"),
        Backend::Embedded => assert_eq!(lock_sessions("idle") + lock_sessions("in_use"), 0.0),
    }

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

const DASHBOARD: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/grafana/vitals.json");
const ALERTS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/prometheus/alerts.yml");

/// The metric names `text` mentions: identifiers starting `grpc_server_` or
/// `vitals_`.
fn metric_names(text: &str) -> BTreeSet<String> {
    text.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
        .filter(|word| word.starts_with("grpc_server_") || word.starts_with("vitals_"))
        .map(str::to_owned)
        .collect()
}

/// The PromQL expressions of the dashboard's panels, with Grafana's
/// variables replaced as Grafana would (every instance, a one-minute rate).
fn dashboard_queries() -> Vec<String> {
    let dashboard: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(DASHBOARD).expect("read the dashboard")).expect("JSON");
    let mut queries = Vec::new();
    for panel in dashboard["panels"].as_array().expect("panels") {
        for target in panel["targets"].as_array().into_iter().flatten() {
            let expr = target["expr"].as_str().expect("a PromQL expression");
            queries.push(expr.replace("$instance", ".*").replace("$__rate_interval", "1m"));
        }
    }
    assert!(queries.len() >= 15, "the dashboard has its panels: {queries:?}");
    queries
}

#[tokio::test]
async fn the_alert_rules_pass_promtool_and_the_dashboard_and_alerts_use_only_exported_metrics() {
    promtool(&["check", "rules", ALERTS], "").await;
    let db = TestDb::embedded();
    let app = TestApp::start(&db, &[]).await;
    let scraped = Scraped::parse(app.scrape().await);
    let exported = scraped.names();
    let dashboard = std::fs::read_to_string(DASHBOARD).expect("read the dashboard");
    let alerts = std::fs::read_to_string(ALERTS).expect("read the alert rules");
    for (file, text) in [(DASHBOARD, dashboard), (ALERTS, alerts)] {
        let used = metric_names(&text);
        assert!(used.len() >= 4, "{file} uses metrics: {used:?}");
        let missing: Vec<_> = used.difference(&exported).collect();
        assert!(
            missing.is_empty(),
            "{file} uses {missing:?}, which vitals does not export"
        );
    }
    app.stop().await;
}

/// Percent-encodes `s` for a URL's query.
fn url_encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// A Prometheus server (Debian's `prometheus`) on a free loopback port,
/// scraping `target` every 2 seconds with the alert rules loaded; killed on
/// drop.
struct Prometheus {
    addr: std::net::SocketAddr,
    _child: tokio::process::Child,
    dir: tempfile::TempDir,
}

impl Prometheus {
    async fn start(target: std::net::SocketAddr) -> Prometheus {
        let dir = tempfile::tempdir().expect("a directory for Prometheus");
        let config = format!(
            "global:\n  scrape_interval: 2s\n  scrape_timeout: 2s\n  evaluation_interval: 2s\nrule_files:\n  - {ALERTS}\n\
             scrape_configs:\n  - job_name: vitals\n    static_configs:\n      - targets: ['{target}']\n"
        );
        std::fs::write(dir.path().join("prometheus.yml"), config).expect("write prometheus.yml");
        let addr = {
            let free = std::net::TcpListener::bind("127.0.0.1:0").expect("a free port");
            free.local_addr().expect("its address")
        };
        let log = std::fs::File::create(dir.path().join("prometheus.log")).expect("a log file");
        let child = tokio::process::Command::new("prometheus")
            .arg(format!("--config.file={}", dir.path().join("prometheus.yml").display()))
            .arg(format!("--storage.tsdb.path={}", dir.path().join("data").display()))
            .arg(format!("--web.listen-address={addr}"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .unwrap_or_else(|err| panic!("prometheus not found ({err}): install Debian's prometheus package"));
        Prometheus {
            addr,
            _child: child,
            dir,
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("prometheus.log")).unwrap_or_default()
    }

    /// The `data` of an instant query, or why there is none.
    async fn query(&self, promql: &str) -> Result<serde_json::Value, String> {
        let path = format!("/api/v1/query?query={}", url_encode(promql));
        // Until Prometheus listens, connecting fails: not ready yet.
        tokio::net::TcpStream::connect(self.addr)
            .await
            .map_err(|e| e.to_string())?;
        let (head, body) = crate::harness::http_get(self.addr, &path).await;
        let reply: serde_json::Value = serde_json::from_str(&body).map_err(|e| format!("{head}\n{body}: {e}"))?;
        if reply["status"] == "success" {
            Ok(reply["data"].clone())
        } else {
            Err(format!("{promql}: {reply}"))
        }
    }
}

#[tokio::test]
async fn a_prometheus_server_scrapes_vitals_and_evaluates_every_dashboard_query() {
    let db = TestDb::embedded();
    let app = TestApp::start(&db, &[]).await;
    app.health_client()
        .await
        .submit_run(run("scraped-1", proto::HealthStatus::Healthy, ""))
        .await
        .expect("the run is stored");
    let prometheus = Prometheus::start(app.metrics_addr.expect("metrics are on")).await;
    let query = r#"grpc_server_handled_total{grpc_service="vitals.v1.HealthCheckService",grpc_method="SubmitRun",grpc_code="OK"}"#;
    // Prometheus starts, then scrapes every 2 s: on a loaded machine the
    // first scrapes may time out.
    let value = eventually(PATIENCE * 3, "Prometheus has scraped SubmitRun's count", async || {
        let data = prometheus
            .query(query)
            .await
            .map_err(|e| format!("{e}\nprometheus log:\n{}", prometheus.log()))?;
        match data["result"][0]["value"][1].as_str() {
            Some(value) => Ok(value.to_owned()),
            None => {
                let targets = crate::harness::http_get(prometheus.addr, "/api/v1/targets").await.1;
                Err(format!("no sample yet: {data}; targets: {targets}"))
            }
        }
    })
    .await;
    assert_eq!(value, "1");
    for promql in dashboard_queries() {
        prometheus
            .query(&promql)
            .await
            .unwrap_or_else(|e| panic!("the dashboard's query does not evaluate: {e}"));
    }
    app.stop().await;
}
