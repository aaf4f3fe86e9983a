//! HealthCheckService against the real server and database —
//! ingestion, idempotency, thresholds, pagination, transitions across
//! replicas and resumable watches.
//!
//! Every body runs on PostgreSQL and on the embedded store
//! ([`both_backends!`]). Where a test speaks of replicas, the embedded store
//! (a single replica) runs them all on its one server ([`Replicas`]).

use std::{collections::HashSet, time::Duration};

use futures::{StreamExt, stream};
use prost_types::Timestamp;
use tonic::{Code, Status, Streaming, transport::Channel};
use tonic_types::StatusExt;
use vitals::proto::{
    self, ConfigureCheckRequest, ConfigureCheckResponse, EvaluateHealthRequest, EvaluateHealthResponse, EvaluationMode,
    EvaluationRule, GetSystemHealthRequest, HealthStatus, HealthTransition, ListRunsRequest, ListRunsResponse,
    ListTransitionsRequest, Run, SubmitRunRequest, SubmitRunResponse, SystemHealth, Thresholds,
    WatchTransitionsRequest, WatchTransitionsResponse, health_check_service_client::HealthCheckServiceClient,
    thresholds::Mode,
};

use HealthStatus::{Degraded, Healthy, Unhealthy};

use crate::harness::{Backend, PATIENCE, Replicas, TestApp, TestDb, assert_reason, eventually};

type Client = HealthCheckServiceClient<Channel>;

// ---- helpers ----

/// Whole seconds an hour ago: a base for `observed_at` that offsets never push
/// past the 5-minute future limit.
fn base_time() -> i64 {
    chrono::Utc::now().timestamp() - 3600
}

fn at(seconds: i64) -> Timestamp {
    Timestamp { seconds, nanos: 0 }
}

fn run(
    system: &str,
    check: &str,
    run_id: &str,
    status: HealthStatus,
    observed_at: Option<Timestamp>,
) -> SubmitRunRequest {
    SubmitRunRequest {
        run_id: run_id.to_owned(),
        system_id: system.to_owned(),
        check_id: check.to_owned(),
        status: status as i32,
        observed_at,
        latency: None,
        message: String::new(),
    }
}

fn failing(i: usize) -> HealthStatus {
    if i.is_multiple_of(2) { Degraded } else { Unhealthy }
}

async fn submit(client: &mut Client, req: SubmitRunRequest) -> SubmitRunResponse {
    client
        .submit_run(req)
        .await
        .unwrap_or_else(|e| panic!("SubmitRun failed: {e:?}"))
        .into_inner()
}

/// Submits, retrying what the server marks retryable (UNAVAILABLE). Returns
/// the reply and the reasons of the refused attempts.
async fn submit_retrying(client: &mut Client, req: SubmitRunRequest) -> (SubmitRunResponse, Vec<String>) {
    let mut refused = Vec::new();
    loop {
        match client.submit_run(req.clone()).await {
            Ok(reply) => return (reply.into_inner(), refused),
            Err(err) if err.code() == Code::Unavailable && refused.len() < 500 => {
                refused.push(err.get_details_error_info().map(|i| i.reason).unwrap_or_default());
                // Back off as the server's RetryInfo asks; not a synchronisation.
                let delay = err
                    .get_details_retry_info()
                    .and_then(|r| r.retry_delay)
                    .unwrap_or(Duration::from_millis(100));
                tokio::time::sleep(delay).await;
            }
            Err(err) => panic!("SubmitRun failed: {err:?}"),
        }
    }
}

/// A ConfigureCheck that sets the thresholds of `system`'s `check` and leaves
/// `enabled` as it is.
fn set_thresholds(system: &str, check: &str, thresholds: Thresholds) -> ConfigureCheckRequest {
    ConfigureCheckRequest {
        system_id: system.into(),
        check_id: check.into(),
        thresholds: Some(thresholds),
        enabled: None,
        flapping: None,
    }
}

async fn configure(client: &mut Client, req: ConfigureCheckRequest) -> ConfigureCheckResponse {
    client
        .configure_check(req)
        .await
        .unwrap_or_else(|e| panic!("ConfigureCheck failed: {e:?}"))
        .into_inner()
}

async fn system_health(client: &mut Client, system: &str) -> SystemHealth {
    client
        .get_system_health(GetSystemHealthRequest {
            system_id: system.to_owned(),
        })
        .await
        .unwrap_or_else(|e| panic!("GetSystemHealth failed: {e:?}"))
        .into_inner()
        .system_health
        .expect("system_health is set")
}

fn status_of(reply: &SubmitRunResponse) -> HealthStatus {
    reply.system_health.as_ref().expect("system_health is set").status()
}

fn window(window_size: u32, degraded: u32, unhealthy: u32) -> Thresholds {
    Thresholds {
        mode: Some(Mode::Window(proto::WindowThresholds {
            window_size,
            degraded_min_failure_count: degraded,
            unhealthy_min_failure_count: unhealthy,
        })),
    }
}

fn consecutive(healthy: u32, degraded: u32, unhealthy: u32) -> Thresholds {
    Thresholds {
        mode: Some(Mode::Consecutive(proto::ConsecutiveThresholds {
            healthy_min_success_count: healthy,
            degraded_min_failure_count: degraded,
            unhealthy_min_failure_count: unhealthy,
        })),
    }
}

/// The fields of the BadRequest of an INVALID_ARGUMENT, sorted.
fn violated_fields(err: &Status) -> Vec<String> {
    assert_reason(err, Code::InvalidArgument, "INVALID_ARGUMENT");
    let mut fields: Vec<String> = err
        .get_details_bad_request()
        .expect("INVALID_ARGUMENT carries a BadRequest")
        .field_violations
        .into_iter()
        .map(|v| v.field)
        .collect();
    fields.sort();
    fields
}

async fn count_rows(db: &TestDb, sql: &str, system: &str) -> i64 {
    db.scalar(sql, system).await
}

/// Stored runs of `system`.
async fn runs_of(db: &TestDb, system: &str) -> i64 {
    count_rows(db, "SELECT count(*) FROM runs WHERE system_id = $1", system).await
}

/// Stored transitions of `system`.
async fn transitions_of(db: &TestDb, system: &str) -> i64 {
    count_rows(db, "SELECT count(*) FROM transitions WHERE system_id = $1", system).await
}

/// A fresh database of `backend`, a server on it, and a client of that server.
async fn serve(backend: Backend) -> (TestDb, TestApp, Client) {
    let db = TestDb::create(backend).await;
    let app = TestApp::start(&db, &[]).await;
    let client = app.health_client().await;
    (db, app, client)
}

/// Stored transitions (sequence, system, check, from, to), in sequence order.
async fn stored_transitions(db: &TestDb) -> Vec<(i64, String, String, i16, i16)> {
    db.stored_transitions().await
}

fn from_to(t: &HealthTransition) -> (HealthStatus, HealthStatus) {
    (t.from_status(), t.to_status())
}

async fn watch(client: &mut Client, system: &str, after_sequence: u64) -> Streaming<WatchTransitionsResponse> {
    client
        .watch_transitions(WatchTransitionsRequest {
            system_id: system.to_owned(),
            after_sequence,
            ..Default::default()
        })
        .await
        .unwrap_or_else(|e| panic!("WatchTransitions failed: {e:?}"))
        .into_inner()
}

/// The next transition of a watch, failing after [`PATIENCE`].
async fn next_transition(stream: &mut Streaming<WatchTransitionsResponse>) -> HealthTransition {
    tokio::time::timeout(PATIENCE, stream.message())
        .await
        .expect("a transition arrives in time")
        .expect("the watch stream does not fail")
        .expect("the watch stream stays open")
        .transition
        .expect("transition is set")
}

/// Reads a watch until it delivered `last_sequence`; everything it delivered.
async fn transitions_until(stream: &mut Streaming<WatchTransitionsResponse>, last_sequence: u64) -> Vec<u64> {
    let mut seen = Vec::new();
    while seen.last().is_none_or(|s| *s < last_sequence) {
        seen.push(next_transition(stream).await.sequence);
    }
    seen
}

async fn list_runs(client: &mut Client, req: ListRunsRequest) -> Result<ListRunsResponse, Status> {
    client.list_runs(req).await.map(tonic::Response::into_inner)
}

/// Walks ListRuns page by page; returns the runs and the size of each page.
async fn all_runs(client: &mut Client, system: &str, check: &str, page_size: i32) -> (Vec<Run>, Vec<usize>) {
    let (mut runs, mut pages) = (Vec::new(), Vec::new());
    let mut page_token = String::new();
    loop {
        let page = list_runs(
            client,
            ListRunsRequest {
                system_id: system.to_owned(),
                check_id: check.to_owned(),
                page_size,
                page_token,
            },
        )
        .await
        .unwrap();
        pages.push(page.runs.len());
        runs.extend(page.runs);
        if page.next_page_token.is_empty() {
            return (runs, pages);
        }
        assert!(pages.len() < 100, "ListRuns never ends");
        page_token = page.next_page_token;
    }
}

/// Walks ListTransitions page by page; returns the transitions and page sizes.
async fn all_transitions(client: &mut Client, system: &str, page_size: i32) -> (Vec<HealthTransition>, Vec<usize>) {
    let (mut transitions, mut pages) = (Vec::new(), Vec::new());
    let mut page_token = String::new();
    loop {
        let page = client
            .list_transitions(ListTransitionsRequest {
                system_id: system.to_owned(),
                page_size,
                page_token,
            })
            .await
            .unwrap()
            .into_inner();
        pages.push(page.transitions.len());
        transitions.extend(page.transitions);
        if page.next_page_token.is_empty() {
            return (transitions, pages);
        }
        assert!(pages.len() < 100, "ListTransitions never ends");
        page_token = page.next_page_token;
    }
}

/// Drives `system` through `cycles` rounds of degraded and back (two failures,
/// one success): two transitions per round. Runs are observed one second
/// apart from `t0`, so they evaluate in submission order.
async fn flap(mut client: Client, system: String, cycles: usize, t0: i64) {
    for cycle in 0..cycles {
        for (step, status) in [Degraded, Unhealthy, Healthy].into_iter().enumerate() {
            let i = cycle * 3 + step;
            let seconds = t0 + i64::try_from(i).unwrap();
            let req = run(
                &system,
                "probe",
                &format!("{system}-{seconds}"),
                status,
                Some(at(seconds)),
            );
            let (reply, _) = submit_retrying(&mut client, req).await;
            assert_eq!(reply.transition.is_some(), step != 0, "{system} run {i}");
        }
    }
}

// ---- SubmitRun and GetSystemHealth ----

both_backends!(failing_runs_take_a_new_system_through_degraded_to_unhealthy_and_a_success_brings_it_back);
async fn failing_runs_take_a_new_system_through_degraded_to_unhealthy_and_a_success_brings_it_back(backend: Backend) {
    let (db, app, mut client) = serve(backend).await;
    let t0 = base_time();

    // The run's status, then the system's status the reply must report.
    let script = [
        (Degraded, Healthy), // one failure: a blip below the degraded threshold
        (Unhealthy, Degraded),
        (Degraded, Degraded),
        (Unhealthy, Degraded),
        (Degraded, Unhealthy), // the fifth failure in a row
        (Unhealthy, Unhealthy),
        (Healthy, Healthy),
    ];
    let mut previous = Healthy;
    let mut transitions = Vec::new();
    for (i, (status, want)) in script.into_iter().enumerate() {
        let seconds = t0 + i64::try_from(i).unwrap();
        let reply = submit(
            &mut client,
            run("checkout", "http", &format!("run-{i}"), status, Some(at(seconds))),
        )
        .await;
        assert!(!reply.duplicate, "run {i}");
        assert_eq!(status_of(&reply), want, "system status after run {i}");
        assert_eq!(reply.run.as_ref().unwrap().run_id, format!("run-{i}"));
        match &reply.transition {
            Some(t) => {
                assert_ne!(previous, want, "run {i} reported a transition without a change");
                assert_eq!(from_to(t), (previous, want), "run {i}");
                assert_eq!((t.system_id.as_str(), t.check_id.as_str()), ("checkout", "http"));
                transitions.push(t.clone());
            }
            None => assert_eq!(previous, want, "run {i} changed the status without a transition"),
        }
        previous = want;
    }

    let changes: Vec<_> = transitions.iter().map(from_to).collect();
    assert_eq!(
        changes,
        [(Healthy, Degraded), (Degraded, Unhealthy), (Unhealthy, Healthy)]
    );
    assert!(transitions.windows(2).all(|w| w[0].sequence < w[1].sequence));
    let explained: Vec<_> = transitions
        .iter()
        .map(|t| {
            let e = t.evaluation.as_ref().unwrap();
            (e.rule(), e.leading_failure_streak, e.leading_success_streak)
        })
        .collect();
    assert_eq!(
        explained,
        [
            (EvaluationRule::DegradedThresholdReached, 2, 0),
            (EvaluationRule::UnhealthyThresholdReached, 5, 0),
            (EvaluationRule::RecoveryConfirmed, 0, 1),
        ]
    );

    let health = system_health(&mut client, "checkout").await;
    assert_eq!(health.status(), Healthy);
    assert!(health.evaluated_at.is_some());
    let [check] = health.checks.as_slice() else {
        panic!("one check expected: {:?}", health.checks)
    };
    assert_eq!(check.check_id, "http");
    assert_eq!(check.status(), Healthy);
    assert!(check.enabled);
    assert_eq!(check.runs_considered, 7);
    assert_eq!(check.last_run_at, Some(at(t0 + 6)));
    assert_eq!(
        check.thresholds,
        Some(consecutive(1, 2, 5)),
        "a new check gets the defaults"
    );
    assert_eq!(
        check.evaluation.as_ref().unwrap().rule(),
        EvaluationRule::RecoveryConfirmed
    );

    let stored = transitions_of(&db, "checkout").await;
    assert_eq!(stored, 3);
    app.stop().await;
}

both_backends!(the_health_of_a_system_never_seen_is_not_found_with_reason_system_not_found);
async fn the_health_of_a_system_never_seen_is_not_found_with_reason_system_not_found(backend: Backend) {
    let (_db, app, mut client) = serve(backend).await;
    submit(&mut client, run("known", "http", "r1", Healthy, None)).await;

    let err = client
        .get_system_health(GetSystemHealthRequest {
            system_id: "unknown".into(),
        })
        .await
        .unwrap_err();
    assert_reason(&err, Code::NotFound, "SYSTEM_NOT_FOUND");
    assert_eq!(
        err.get_details_error_info()
            .unwrap()
            .metadata
            .get("system_id")
            .map(String::as_str),
        Some("unknown")
    );
    assert_eq!(system_health(&mut client, "known").await.status(), Healthy);
    app.stop().await;
}

both_backends!(a_run_with_missing_fields_or_observed_too_far_in_the_future_is_refused_naming_every_field);
async fn a_run_with_missing_fields_or_observed_too_far_in_the_future_is_refused_naming_every_field(backend: Backend) {
    let (db, app, mut client) = serve(backend).await;
    let future = at(chrono::Utc::now().timestamp() + 600);
    let mut req = run("", "http", "r1", HealthStatus::Unspecified, Some(future));
    req.latency = Some(prost_types::Duration { seconds: -1, nanos: 0 });
    let err = client.submit_run(req).await.unwrap_err();
    assert_eq!(violated_fields(&err), ["latency", "observed_at", "status", "system_id"]);

    let err = client
        .submit_run(run("sys", "", &"x".repeat(257), Healthy, None))
        .await
        .unwrap_err();
    assert_eq!(violated_fields(&err), ["check_id", "run_id"]);
    assert_eq!(
        count_rows(&db, "SELECT count(*) FROM runs WHERE system_id <> $1", "").await,
        0
    );
    app.stop().await;
}

// ---- duplicate delivery ----

both_backends!(every_run_delivered_twice_is_stored_once_and_the_second_reply_is_a_duplicate_with_the_same_transition);
async fn every_run_delivered_twice_is_stored_once_and_the_second_reply_is_a_duplicate_with_the_same_transition(
    backend: Backend,
) {
    let db = TestDb::create(backend).await;
    // The retry lands on another replica, as it would behind a load balancer.
    let replicas = Replicas::start(&db, 2, &[]).await;
    let mut first_client = replicas[0].health_client().await;
    let mut second_client = replicas[1].health_client().await;
    let t0 = base_time();

    let mut transitions = 0;
    for i in 0..6 {
        let status = if i < 5 { failing(i) } else { Healthy };
        let mut req = run(
            "billing",
            "db",
            &format!("delivery-{i}"),
            status,
            Some(at(t0 + i64::try_from(i).unwrap())),
        );
        req.latency = Some(prost_types::Duration {
            seconds: 0,
            nanos: 1_500_000,
        });
        req.message = format!("attempt {i}");
        let first = submit(&mut first_client, req.clone()).await;
        let second = submit(&mut second_client, req).await;
        assert!(!first.duplicate, "run {i}");
        assert!(second.duplicate, "run {i}");
        assert_eq!(
            second.transition, first.transition,
            "a duplicate reports the transition its run caused, and only that (run {i})"
        );
        assert_eq!(status_of(&second), status_of(&first), "run {i}");
        assert_eq!(
            second.run, first.run,
            "the duplicate reply carries the stored run (run {i})"
        );
        transitions += usize::from(first.transition.is_some());
    }
    assert_eq!(transitions, 3, "healthy -> degraded -> unhealthy -> healthy");
    assert_eq!(runs_of(&db, "billing").await, 6);
    assert_eq!(transitions_of(&db, "billing").await, 3);
    replicas.stop().await;
}

both_backends!(reusing_a_run_id_with_different_content_is_already_exists_with_reason_run_id_conflict);
async fn reusing_a_run_id_with_different_content_is_already_exists_with_reason_run_id_conflict(backend: Backend) {
    let (db, app, mut client) = serve(backend).await;
    let t0 = base_time();
    let mut original = run("search", "query", "r1", Healthy, Some(at(t0)));
    original.message = "fine".into();
    submit(&mut client, original.clone()).await;

    type Change = fn(&mut SubmitRunRequest);
    let variants: [(&str, Change); 5] = [
        ("status", |r| r.status = Degraded as i32),
        ("message", |r| r.message = "not fine".into()),
        ("observed_at", |r| {
            r.observed_at = Some(at(r.observed_at.unwrap().seconds + 1))
        }),
        ("latency", |r| {
            r.latency = Some(prost_types::Duration { seconds: 1, nanos: 0 })
        }),
        ("check_id", |r| r.check_id = "index".into()),
    ];
    for (what, change) in variants {
        let mut req = original.clone();
        change(&mut req);
        let err = client.submit_run(req).await.unwrap_err();
        assert_reason(&err, Code::AlreadyExists, "RUN_ID_CONFLICT");
        assert_eq!(
            err.get_details_error_info()
                .unwrap()
                .metadata
                .get("run_id")
                .map(String::as_str),
            Some("r1"),
            "{what}"
        );
    }

    assert_eq!(
        count_rows(&db, "SELECT count(*) FROM runs WHERE run_id = $1", "r1").await,
        1
    );
    assert_eq!(
        count_rows(&db, "SELECT count(*) FROM runs WHERE run_id = $1 AND status = 1", "r1").await,
        1,
        "the stored run is unchanged"
    );
    let err = client
        .get_system_health(GetSystemHealthRequest {
            system_id: "index".into(),
        })
        .await
        .unwrap_err();
    assert_reason(&err, Code::NotFound, "SYSTEM_NOT_FOUND");
    // The original content is still a plain duplicate.
    assert!(submit(&mut client, original).await.duplicate);
    app.stop().await;
}

both_backends!(a_retry_of_a_request_without_observed_at_is_still_a_duplicate);
async fn a_retry_of_a_request_without_observed_at_is_still_a_duplicate(backend: Backend) {
    let (db, app, mut client) = serve(backend).await;
    let mut req = run("mail", "smtp", "no-clock", Degraded, None);
    req.message = "timeout".into();

    let first = submit(&mut client, req.clone()).await;
    let retry = submit(&mut client, req).await;
    assert!(!first.duplicate);
    assert!(retry.duplicate);
    assert!(retry.transition.is_none());
    assert_eq!(
        retry.run.as_ref().unwrap().observed_at,
        first.run.as_ref().unwrap().observed_at,
        "the stored observed_at is kept, not the retry's now"
    );
    assert_eq!(runs_of(&db, "mail").await, 1);
    app.stop().await;
}

both_backends!(a_retry_of_a_run_reports_the_transition_that_run_caused_and_no_other);
async fn a_retry_of_a_run_reports_the_transition_that_run_caused_and_no_other(backend: Backend) {
    let (db, app, mut client) = serve(backend).await;
    let t0 = base_time();
    // The first failure is a blip; the second degrades the system.
    let blip = run("orders", "api", "o-1", Degraded, Some(at(t0)));
    let degrading = run("orders", "api", "o-2", Unhealthy, Some(at(t0 + 1)));
    assert!(submit(&mut client, blip.clone()).await.transition.is_none());
    let caused = submit(&mut client, degrading.clone())
        .await
        .transition
        .expect("the second failure degrades the system");

    // The system changes twice more: once by a run, once by a configuration
    // change that follows a run which changed nothing itself.
    let healing = submit(&mut client, run("orders", "api", "o-3", Healthy, Some(at(t0 + 2)))).await;
    assert!(healing.transition.is_some());
    let second_blip = run("orders", "api", "o-4", Degraded, Some(at(t0 + 3)));
    assert!(submit(&mut client, second_blip.clone()).await.transition.is_none());
    let reconfigured = configure(&mut client, set_thresholds("orders", "api", consecutive(1, 1, 5))).await;
    assert!(reconfigured.transition.is_some(), "one failure now degrades");

    // A retry, as after a reply that never arrived, reports the transition
    // its run caused, not the ones after it.
    let retry = submit(&mut client, degrading).await;
    assert!(retry.duplicate);
    assert_eq!(retry.transition.as_ref(), Some(&caused));
    assert_eq!(status_of(&retry), Degraded, "the health is today's");
    for quiet in [blip, second_blip] {
        let retry = submit(&mut client, quiet).await;
        assert!(retry.duplicate);
        assert_eq!(retry.transition, None, "{}", retry.run.unwrap().run_id);
    }
    assert_eq!(stored_transitions(&db).await.len(), 3, "a retry writes nothing");
    app.stop().await;
}

both_backends!(the_same_run_id_in_two_systems_is_two_runs_each_retried_as_its_own_duplicate);
async fn the_same_run_id_in_two_systems_is_two_runs_each_retried_as_its_own_duplicate(backend: Backend) {
    let (db, app, mut client) = serve(backend).await;
    let t0 = base_time();
    // Another system's client takes the id first, with other content: the
    // id is an idempotency key within a system, so this cannot refuse the
    // run that comes later.
    let mut taken_first = run("squatter", "probe", "shared-id", Healthy, Some(at(t0)));
    taken_first.message = "first".into();
    assert!(!submit(&mut client, taken_first.clone()).await.duplicate);
    let blip = run("payments", "api", "blip", Unhealthy, Some(at(t0)));
    assert!(submit(&mut client, blip).await.transition.is_none());
    let mut degrading = run("payments", "api", "shared-id", Unhealthy, Some(at(t0 + 1)));
    degrading.message = "second".into();
    let reply = submit(&mut client, degrading.clone()).await;
    assert!(
        !reply.duplicate,
        "a run of another system under the same id is a new run"
    );
    let caused = reply.transition.expect("the second failure degrades payments");

    for (system, message) in [("squatter", "first"), ("payments", "second")] {
        assert_eq!(
            count_rows(&db, "SELECT count(*) FROM runs WHERE system_id = $1", system).await,
            if system == "payments" { 2 } else { 1 },
            "{system}"
        );
        let runs = list_runs(
            &mut client,
            ListRunsRequest {
                system_id: system.into(),
                ..Default::default()
            },
        )
        .await
        .unwrap()
        .runs;
        let shared: Vec<_> = runs.iter().filter(|r| r.run_id == "shared-id").collect();
        assert_eq!(shared.len(), 1, "{system}");
        assert_eq!(shared[0].message, message, "{system}");
    }

    // Each retry is a duplicate of its own system's run, with the transition
    // that run caused: none for the first system, payments' for the second.
    let retry = submit(&mut client, taken_first).await;
    assert!(retry.duplicate);
    assert_eq!(retry.run.as_ref().map(|r| r.system_id.as_str()), Some("squatter"));
    assert_eq!(retry.transition, None);
    let retry = submit(&mut client, degrading).await;
    assert!(retry.duplicate);
    assert_eq!(retry.transition.as_ref(), Some(&caused));
    app.stop().await;
}

// ---- input bounds ----

both_backends!(an_observed_at_before_year_1_or_after_9999_is_refused_naming_the_field_on_every_backend);
async fn an_observed_at_before_year_1_or_after_9999_is_refused_naming_the_field_on_every_backend(backend: Backend) {
    let (db, app, mut client) = serve(backend).await;
    let year_one = -62_135_596_800;
    let refused = [
        // About 251,000 BC: PostgreSQL's timestamptz ends at 4713 BC.
        (
            "ancient",
            Timestamp {
                seconds: -8_000_000_000_000,
                nanos: 0,
            },
        ),
        (
            "the last instant of 1 BC",
            Timestamp {
                seconds: year_one - 1,
                nanos: 999_999_999,
            },
        ),
        (
            "year 10000",
            Timestamp {
                seconds: 253_402_300_800,
                nanos: 0,
            },
        ),
        (
            "i64::MIN",
            Timestamp {
                seconds: i64::MIN,
                nanos: 0,
            },
        ),
    ];
    for (what, observed_at) in refused {
        let err = client
            .submit_run(run("old", "c", what, Healthy, Some(observed_at)))
            .await
            .unwrap_err();
        assert_eq!(violated_fields(&err), ["observed_at"], "{what}");
    }
    assert_eq!(runs_of(&db, "old").await, 0);

    // The first instant of year 1 is stored as sent, retried as a duplicate,
    // and listings page across it.
    let first = Timestamp {
        seconds: year_one,
        nanos: 0,
    };
    let second = Timestamp {
        seconds: year_one + 1,
        nanos: 0,
    };
    let reply = submit(&mut client, run("old", "c", "year-1", Degraded, Some(first))).await;
    assert_eq!(reply.run.as_ref().unwrap().observed_at, Some(first));
    assert!(
        submit(&mut client, run("old", "c", "year-1", Degraded, Some(first)))
            .await
            .duplicate
    );
    submit(
        &mut client,
        run("old", "c", "year-1-and-a-second", Degraded, Some(second)),
    )
    .await;
    let recent = at(base_time());
    submit(&mut client, run("old", "c", "recent", Healthy, Some(recent))).await;
    let (runs, pages) = all_runs(&mut client, "old", "", 1).await;
    assert_eq!(pages, [1, 1, 1]);
    let listed: Vec<_> = runs
        .iter()
        .map(|r| (r.run_id.as_str(), r.observed_at.unwrap()))
        .collect();
    assert_eq!(
        listed,
        [("recent", recent), ("year-1-and-a-second", second), ("year-1", first)]
    );
    app.stop().await;
}

both_backends!(a_latency_above_24_hours_is_refused_and_an_accepted_one_is_stored_replied_and_retried_as_one_value);
async fn a_latency_above_24_hours_is_refused_and_an_accepted_one_is_stored_replied_and_retried_as_one_value(
    backend: Backend,
) {
    let (_db, app, mut client) = serve(backend).await;
    let t0 = base_time();
    let with_latency = |run_id: &str, seconds: i64, nanos: i32| {
        let mut req = run("timed", "c", run_id, Healthy, Some(at(t0)));
        req.latency = Some(prost_types::Duration { seconds, nanos });
        req
    };
    let refused = [
        ("i64::MAX seconds", i64::MAX, 0),
        ("24h and 1ns", 86_400, 1),
        ("negative", -1, 0),
        ("negative nanos", 0, -1),
        ("a whole second of nanos", 0, 1_000_000_000),
    ];
    for (what, seconds, nanos) in refused {
        let err = client.submit_run(with_latency(what, seconds, nanos)).await.unwrap_err();
        assert_eq!(violated_fields(&err), ["latency"], "{what}");
    }

    // (run, latency sent, latency stored: whole microseconds)
    let accepted = [
        ("a day", (86_400, 0), (86_400, 0)),
        ("a day less a nanosecond", (86_399, 999_999_999), (86_399, 999_999_000)),
        ("sub-microsecond", (1, 500_999), (1, 500_000)),
        ("zero", (0, 0), (0, 0)),
    ];
    let mut replied = Vec::new();
    for (run_id, (seconds, nanos), stored) in accepted {
        let req = with_latency(run_id, seconds, nanos);
        let first = submit(&mut client, req.clone()).await;
        let latency = first.run.as_ref().unwrap().latency;
        assert_eq!(
            latency,
            Some(prost_types::Duration {
                seconds: stored.0,
                nanos: stored.1
            }),
            "{run_id}"
        );
        let retry = submit(&mut client, req).await;
        assert!(retry.duplicate, "{run_id}: an identical retry is a duplicate");
        assert_eq!(retry.run, first.run, "{run_id}");
        replied.push((run_id.to_owned(), latency));
    }
    let (runs, _) = all_runs(&mut client, "timed", "", 50).await;
    let mut listed: Vec<_> = runs.into_iter().map(|r| (r.run_id, r.latency)).collect();
    listed.sort_by(|a, b| a.0.cmp(&b.0));
    replied.sort_by(|a, b| a.0.cmp(&b.0));
    assert_eq!(listed, replied, "ListRuns agrees with the replies");
    app.stop().await;
}

both_backends!(a_run_without_a_run_id_gets_a_generated_one_and_is_never_taken_for_a_duplicate);
async fn a_run_without_a_run_id_gets_a_generated_one_and_is_never_taken_for_a_duplicate(backend: Backend) {
    let (db, app, mut client) = serve(backend).await;
    let req = run("cron", "job", "", Healthy, Some(at(base_time())));
    let first = submit(&mut client, req.clone()).await;
    let second = submit(&mut client, req).await;
    assert!(!first.duplicate && !second.duplicate);
    let (first_id, second_id) = (
        &first.run.as_ref().unwrap().run_id,
        &second.run.as_ref().unwrap().run_id,
    );
    assert!(!first_id.is_empty());
    assert_ne!(first_id, second_id);
    assert_eq!(runs_of(&db, "cron").await, 2);
    app.stop().await;
}

// ---- late runs ----

both_backends!(a_late_run_slots_into_place_by_observed_at_and_can_cause_the_transition);
async fn a_late_run_slots_into_place_by_observed_at_and_can_cause_the_transition(backend: Backend) {
    let (_db, app, mut client) = serve(backend).await;
    let t0 = base_time();

    // Newest first by observed_at: F(30) H(10) -> a one-failure blip over a success: healthy.
    let r = submit(&mut client, run("cdn", "edge", "t10", Healthy, Some(at(t0 + 10)))).await;
    assert_eq!(status_of(&r), Healthy);
    let r = submit(&mut client, run("cdn", "edge", "t30", Degraded, Some(at(t0 + 30)))).await;
    assert_eq!(status_of(&r), Healthy);
    assert!(r.transition.is_none());

    // The late failure lands between them: F(30) F(20) H(10) is a streak of two.
    // Taken in arrival order (F(20) H(10) F(30)) it would be a blip.
    let r = submit(&mut client, run("cdn", "edge", "t20", Unhealthy, Some(at(t0 + 20)))).await;
    assert_eq!(status_of(&r), Degraded);
    let t = r.transition.expect("the late run crossed the degraded threshold");
    assert_eq!(from_to(&t), (Healthy, Degraded));
    let e = t.evaluation.unwrap();
    assert_eq!(
        (e.rule(), e.leading_failure_streak),
        (EvaluationRule::DegradedThresholdReached, 2)
    );

    // A run older than all of them changes nothing at the newest end.
    let r = submit(&mut client, run("cdn", "edge", "t5", Healthy, Some(at(t0 + 5)))).await;
    assert_eq!(status_of(&r), Degraded);
    assert!(r.transition.is_none());

    let health = system_health(&mut client, "cdn").await;
    assert_eq!(
        health.checks[0].last_run_at,
        Some(at(t0 + 30)),
        "the newest by observed_at"
    );
    let (runs, _) = all_runs(&mut client, "cdn", "", 10).await;
    let order: Vec<_> = runs.iter().map(|r| r.run_id.as_str()).collect();
    assert_eq!(order, ["t30", "t20", "t10", "t5"]);
    app.stop().await;
}

// ---- ConfigureCheck ----

both_backends!(switching_a_check_to_window_thresholds_re_evaluates_it_and_reports_the_transition);
async fn switching_a_check_to_window_thresholds_re_evaluates_it_and_reports_the_transition(backend: Backend) {
    let (_db, app, mut client) = serve(backend).await;
    let t0 = base_time();

    // Alternating failures never make a streak: healthy in consecutive mode.
    for (i, status) in [Degraded, Healthy, Unhealthy, Healthy, Degraded]
        .into_iter()
        .enumerate()
    {
        let seconds = t0 + i64::try_from(i).unwrap();
        let r = submit(
            &mut client,
            run("api", "ping", &format!("p{i}"), status, Some(at(seconds))),
        )
        .await;
        assert_eq!(status_of(&r), Healthy);
        assert!(r.transition.is_none());
    }

    let reply = configure(&mut client, set_thresholds("api", "ping", window(5, 3, 4))).await;
    let check = reply.check.unwrap();
    assert_eq!(check.thresholds, Some(window(5, 3, 4)));
    assert_eq!(check.status(), Degraded);
    let e = check.evaluation.unwrap();
    assert_eq!(e.mode(), EvaluationMode::Window);
    assert_eq!((e.failures_in_window, e.runs_considered), (3, 5));
    assert_eq!(e.rule(), EvaluationRule::DegradedThresholdReached);
    assert_eq!(reply.system_health.unwrap().status(), Degraded);
    let t = reply.transition.expect("the new thresholds changed the status");
    assert_eq!(from_to(&t), (Healthy, Degraded));
    assert_eq!(t.check_id, "ping");

    // The window now holds H D H U H... newest first: H(5) D(4) H(3) U(2) H(1): two failures.
    let r = submit(&mut client, run("api", "ping", "p5", Healthy, Some(at(t0 + 5)))).await;
    assert_eq!(from_to(r.transition.as_ref().unwrap()), (Degraded, Healthy));

    // Configuring what is already configured changes nothing.
    let reply = configure(
        &mut client,
        ConfigureCheckRequest {
            system_id: "api".into(),
            check_id: "ping".into(),
            thresholds: Some(window(5, 3, 4)),
            enabled: Some(true),
            flapping: None,
        },
    )
    .await;
    assert!(reply.transition.is_none());
    let health = system_health(&mut client, "api").await;
    assert_eq!(health.checks[0].thresholds, Some(window(5, 3, 4)));
    assert_eq!(health.status(), Healthy);
    app.stop().await;
}

both_backends!(a_disabled_check_stops_counting_towards_its_system_until_it_is_enabled_again);
async fn a_disabled_check_stops_counting_towards_its_system_until_it_is_enabled_again(backend: Backend) {
    let (db, app, mut client) = serve(backend).await;
    let t0 = base_time();
    let toggle = |enabled: bool| ConfigureCheckRequest {
        system_id: "shop".into(),
        check_id: "db".into(),
        thresholds: None,
        enabled: Some(enabled),
        flapping: None,
    };

    submit(&mut client, run("shop", "web", "w0", Healthy, Some(at(t0)))).await;
    submit(&mut client, run("shop", "db", "d0", Degraded, Some(at(t0)))).await;
    let r = submit(&mut client, run("shop", "db", "d1", Degraded, Some(at(t0 + 1)))).await;
    assert_eq!(status_of(&r), Degraded);

    let reply = configure(&mut client, toggle(false)).await;
    let t = reply.transition.expect("disabling the failing check heals the system");
    assert_eq!(from_to(&t), (Degraded, Healthy));
    assert_eq!(t.check_id, "db");
    let check = reply.check.unwrap();
    assert!(!check.enabled);
    assert_eq!(check.status(), Degraded, "the check keeps its own status");
    assert_eq!(check.thresholds, Some(consecutive(1, 2, 5)));
    assert_eq!(reply.system_health.unwrap().status(), Healthy);

    // Runs of a paused check are recorded and evaluated but do not count.
    for i in 2..5 {
        let r = submit(
            &mut client,
            run("shop", "db", &format!("d{i}"), Unhealthy, Some(at(t0 + i))),
        )
        .await;
        assert_eq!(status_of(&r), Healthy);
        assert!(r.transition.is_none());
    }
    let health = system_health(&mut client, "shop").await;
    assert_eq!(health.status(), Healthy);
    let db_check = health.checks.iter().find(|c| c.check_id == "db").unwrap();
    assert_eq!((db_check.status(), db_check.enabled), (Unhealthy, false));

    let reply = configure(&mut client, toggle(true)).await;
    let t = reply.transition.expect("enabling the failing check counts it again");
    assert_eq!(from_to(&t), (Healthy, Unhealthy));
    assert_eq!(t.check_id, "db");
    assert_eq!(
        reply.check.unwrap().thresholds,
        Some(consecutive(1, 2, 5)),
        "unset thresholds are kept"
    );

    let stored = stored_transitions(&db).await;
    let checks: Vec<_> = stored.iter().map(|t| (t.2.as_str(), t.3, t.4)).collect();
    assert_eq!(checks, [("db", 1, 2), ("db", 2, 1), ("db", 1, 3)]);
    app.stop().await;
}

both_backends!(invalid_thresholds_are_refused_with_a_field_violation_for_each_offending_field);
async fn invalid_thresholds_are_refused_with_a_field_violation_for_each_offending_field(backend: Backend) {
    let (_db, app, mut client) = serve(backend).await;
    let cases: [(&str, Thresholds, &[&str]); 6] = [
        (
            "ping",
            consecutive(0, 3, 2),
            &[
                "thresholds.consecutive.degraded_min_failure_count",
                "thresholds.consecutive.healthy_min_success_count",
            ],
        ),
        (
            "ping",
            consecutive(1, 0, 0),
            &[
                "thresholds.consecutive.degraded_min_failure_count",
                "thresholds.consecutive.unhealthy_min_failure_count",
            ],
        ),
        (
            "ping",
            window(2, 0, 5),
            &[
                "thresholds.window.degraded_min_failure_count",
                "thresholds.window.window_size",
            ],
        ),
        (
            "ping",
            window(10, 3, 11),
            &["thresholds.window.unhealthy_min_failure_count"],
        ),
        ("ping", Thresholds { mode: None }, &["thresholds.mode"]),
        ("", window(101, 3, 7), &["check_id", "thresholds.window.window_size"]),
    ];
    for (check, thresholds, want) in cases {
        let err = client
            .configure_check(set_thresholds("strict", check, thresholds))
            .await
            .unwrap_err();
        assert_eq!(violated_fields(&err), want, "{thresholds:?}");
    }
    let err = client
        .get_system_health(GetSystemHealthRequest {
            system_id: "strict".into(),
        })
        .await
        .unwrap_err();
    assert_reason(&err, Code::NotFound, "SYSTEM_NOT_FOUND");
    app.stop().await;
}

// ---- EvaluateHealth ----

both_backends!(evaluate_health_returns_the_verdict_with_the_rule_and_streaks_that_decided_it);
async fn evaluate_health_returns_the_verdict_with_the_rule_and_streaks_that_decided_it(backend: Backend) {
    let (_db, app, mut client) = serve(backend).await;
    /// What EvaluateHealth answers for `statuses` under `thresholds`.
    async fn evaluate(
        client: &mut Client,
        statuses: &[HealthStatus],
        thresholds: Option<Thresholds>,
    ) -> EvaluateHealthResponse {
        let request = EvaluateHealthRequest {
            statuses: statuses.iter().map(|s| *s as i32).collect(),
            thresholds,
        };
        client.evaluate_health(request).await.unwrap().into_inner()
    }

    let reply = evaluate(&mut client, &[Unhealthy, Degraded, Healthy], None).await;
    assert_eq!(reply.status(), Degraded);
    let e = reply.evaluation.unwrap();
    assert_eq!(e.mode(), EvaluationMode::Consecutive);
    assert_eq!(e.rule(), EvaluationRule::DegradedThresholdReached);
    assert_eq!(
        (e.leading_failure_streak, e.leading_success_streak, e.runs_considered),
        (2, 0, 2)
    );
    assert_eq!(e.thresholds, Some(consecutive(1, 2, 5)), "defaults are filled in");

    // Two successes do not confirm recovery when three are required: the
    // five failures before them decide.
    let statuses = [
        Healthy, Healthy, Degraded, Degraded, Unhealthy, Degraded, Degraded, Healthy,
    ];
    let reply = evaluate(&mut client, &statuses, Some(consecutive(3, 2, 5))).await;
    assert_eq!(reply.status(), Unhealthy);
    let e = reply.evaluation.unwrap();
    assert_eq!(e.rule(), EvaluationRule::RecoveryNotConfirmed);
    assert_eq!(
        (e.leading_failure_streak, e.leading_success_streak, e.runs_considered),
        (0, 2, 7)
    );

    // A single failure under the default thresholds is a blip.
    let reply = evaluate(&mut client, &[Degraded, Healthy], None).await;
    assert_eq!(reply.status(), Healthy);
    assert_eq!(reply.evaluation.unwrap().rule(), EvaluationRule::BelowDegradedThreshold);

    // Window mode counts failures among the newest window_size runs only.
    let statuses = [
        Healthy, Degraded, Healthy, Unhealthy, Healthy, Degraded, Degraded, Degraded,
    ];
    let reply = evaluate(&mut client, &statuses, Some(window(5, 2, 3))).await;
    assert_eq!(reply.status(), Degraded);
    let e = reply.evaluation.unwrap();
    assert_eq!(e.mode(), EvaluationMode::Window);
    assert_eq!((e.failures_in_window, e.runs_considered), (2, 5));

    let reply = evaluate(&mut client, &[], None).await;
    assert_eq!(reply.status(), Healthy);
    assert_eq!(reply.evaluation.unwrap().rule(), EvaluationRule::NoRuns);
    app.stop().await;
}

both_backends!(evaluate_health_refuses_more_than_100_statuses_and_unspecified_ones);
async fn evaluate_health_refuses_more_than_100_statuses_and_unspecified_ones(backend: Backend) {
    let (_db, app, mut client) = serve(backend).await;

    let hundred = vec![Degraded as i32; 100];
    let reply = client
        .evaluate_health(EvaluateHealthRequest {
            statuses: hundred.clone(),
            thresholds: None,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(reply.status(), Unhealthy);
    assert_eq!(reply.evaluation.unwrap().leading_failure_streak, 100);

    let mut too_many = hundred;
    too_many.push(Healthy as i32);
    let err = client
        .evaluate_health(EvaluateHealthRequest {
            statuses: too_many,
            thresholds: None,
        })
        .await
        .unwrap_err();
    assert_eq!(violated_fields(&err), ["statuses"]);

    let err = client
        .evaluate_health(EvaluateHealthRequest {
            statuses: vec![Healthy as i32, HealthStatus::Unspecified as i32, 7],
            thresholds: Some(window(3, 4, 3)),
        })
        .await
        .unwrap_err();
    assert_eq!(
        violated_fields(&err),
        [
            "statuses[1]",
            "statuses[2]",
            "thresholds.window.degraded_min_failure_count"
        ]
    );
    app.stop().await;
}

// ---- pagination ----

both_backends!(list_runs_walks_every_run_exactly_once_newest_first_across_pages);
async fn list_runs_walks_every_run_exactly_once_newest_first_across_pages(backend: Backend) {
    let db = TestDb::create(backend).await;
    let app = TestApp::start(&db, &[]).await;
    let client = app.health_client().await;
    let t0 = base_time();

    // 237 runs over two checks; four at a time share an observed_at, and
    // run ids are shuffled against time, so ties are broken by run_id.
    let submitted: Vec<SubmitRunRequest> = (0..237usize)
        .map(|i| {
            let check = if i % 3 == 0 { "b" } else { "a" };
            let seconds = t0 + i64::try_from(i / 4).unwrap();
            run(
                "paged",
                check,
                &format!("r{:03}", (i * 89) % 237),
                failing(i),
                Some(at(seconds)),
            )
        })
        .collect();
    stream::iter(submitted.clone())
        .for_each_concurrent(8, |req| {
            let mut client = client.clone();
            async move {
                submit_retrying(&mut client, req).await;
            }
        })
        .await;
    let newest_first = |check: &str| {
        let mut want: Vec<(i64, String)> = submitted
            .iter()
            .filter(|r| check.is_empty() || r.check_id == check)
            .map(|r| (r.observed_at.unwrap().seconds, r.run_id.clone()))
            .collect();
        want.sort_unstable_by(|a, b| b.cmp(a));
        want
    };
    let key = |r: &Run| (r.observed_at.unwrap().seconds, r.run_id.clone());

    let mut client = client;
    let (runs, pages) = all_runs(&mut client, "paged", "", 50).await;
    assert_eq!(pages, [50, 50, 50, 50, 37]);
    assert_eq!(runs.iter().map(key).collect::<Vec<_>>(), newest_first(""));
    let ids: HashSet<_> = runs.iter().map(|r| r.run_id.as_str()).collect();
    assert_eq!(ids.len(), 237, "every run exactly once");

    let (runs, pages) = all_runs(&mut client, "paged", "b", 30).await;
    assert_eq!(pages, [30, 30, 19]);
    assert!(runs.iter().all(|r| r.check_id == "b"));
    assert_eq!(runs.iter().map(key).collect::<Vec<_>>(), newest_first("b"));

    // A page that ends exactly at the last run has no next page.
    let (_, pages) = all_runs(&mut client, "paged", "b", 79).await;
    assert_eq!(pages, [79]);
    app.stop().await;
}

both_backends!(runs_observed_in_the_same_microsecond_list_and_evaluate_in_run_id_byte_order_whatever_the_collation);
async fn runs_observed_in_the_same_microsecond_list_and_evaluate_in_run_id_byte_order_whatever_the_collation(
    backend: Backend,
) {
    let db = TestDb::create_with_linguistic_collation(backend).await;
    if backend == Backend::Postgres {
        let mut conn = db.connect().await;
        let linguistic: bool = sqlx::query_scalar("SELECT 'a' < 'B'")
            .fetch_one(&mut conn)
            .await
            .unwrap();
        assert!(
            linguistic,
            "the database must not sort text byte by byte, or this test shows nothing"
        );
    }
    let app = TestApp::start(&db, &[]).await;
    let mut client = app.health_client().await;
    let observed = at(base_time());

    // One instant, so only run ids order them. Greatest first byte by byte;
    // ICU's root collation would put `Z` first and `a` last. The five failures
    // lead the check in byte order (unhealthy); `Z` would lead it otherwise
    // (healthy).
    let byte_order = ["é", "b", "a1", "a-1", "a", "Z", "B"];
    let status = |id: &str| if matches!(id, "Z" | "B") { Healthy } else { Unhealthy };
    let mut last = None;
    for id in ["B", "a", "é", "Z", "a-1", "b", "a1"] {
        last = Some(submit(&mut client, run("ties", "c", id, status(id), Some(observed))).await);
    }
    let health = last
        .and_then(|r| r.system_health)
        .expect("a reply with the system's health");
    let check = &health.checks[0];
    assert_eq!(check.status, Unhealthy as i32, "{check:?}");

    for (check_id, page_size) in [("", 2), ("c", 3)] {
        let (runs, _) = all_runs(&mut client, "ties", check_id, page_size).await;
        let ids: Vec<_> = runs.iter().map(|r| r.run_id.as_str()).collect();
        assert_eq!(ids, byte_order, "ListRuns of check {check_id:?}, pages of {page_size}");
        // The check was evaluated over the runs ListRuns shows, in its order.
        let evaluated = client
            .evaluate_health(EvaluateHealthRequest {
                statuses: runs.iter().map(|r| r.status).collect(),
                thresholds: check.thresholds,
            })
            .await
            .unwrap()
            .into_inner()
            .evaluation;
        assert_eq!(evaluated, check.evaluation);
    }
    app.stop().await;
}

both_backends!(a_tampered_page_token_or_one_replayed_against_another_listing_is_invalid_argument);
async fn a_tampered_page_token_or_one_replayed_against_another_listing_is_invalid_argument(backend: Backend) {
    let (_db, app, mut client) = serve(backend).await;
    let t0 = base_time();
    for system in ["alpha", "beta"] {
        for (i, status) in [Degraded, Degraded, Healthy, Degraded, Degraded]
            .into_iter()
            .enumerate()
        {
            let seconds = t0 + i64::try_from(i).unwrap();
            submit(
                &mut client,
                run(system, "c", &format!("{system}-{i}"), status, Some(at(seconds))),
            )
            .await;
        }
    }
    let runs_page = |system: &str, check: &str, page_token: &str| ListRunsRequest {
        system_id: system.into(),
        check_id: check.into(),
        page_size: 2,
        page_token: page_token.into(),
    };
    let token = list_runs(&mut client, runs_page("alpha", "", ""))
        .await
        .unwrap()
        .next_page_token;
    assert!(!token.is_empty());

    let mut tampered = token.clone().into_bytes();
    let middle = tampered.len() / 2;
    tampered[middle] = if tampered[middle] == b'A' { b'B' } else { b'A' };
    let tampered = String::from_utf8(tampered).unwrap();
    for (what, req) in [
        ("tampered", runs_page("alpha", "", &tampered)),
        ("truncated", runs_page("alpha", "", &token[..token.len() - 2])),
        ("another system", runs_page("beta", "", &token)),
        ("another check filter", runs_page("alpha", "c", &token)),
    ] {
        let err = list_runs(&mut client, req).await.unwrap_err();
        assert_eq!(violated_fields(&err), ["page_token"], "{what}");
    }
    let err = client
        .list_transitions(ListTransitionsRequest {
            system_id: "alpha".into(),
            page_size: 2,
            page_token: token.clone(),
        })
        .await
        .unwrap_err();
    assert_eq!(violated_fields(&err), ["page_token"], "a runs token for transitions");
    // The untouched token still works.
    let next = list_runs(&mut client, runs_page("alpha", "", &token)).await.unwrap();
    let ids: Vec<_> = next.runs.iter().map(|r| r.run_id.as_str()).collect();
    assert_eq!(ids, ["alpha-2", "alpha-1"]);

    let first = client
        .list_transitions(ListTransitionsRequest {
            system_id: "alpha".into(),
            page_size: 1,
            page_token: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(!first.next_page_token.is_empty());
    for other in ["beta", ""] {
        let err = client
            .list_transitions(ListTransitionsRequest {
                system_id: other.into(),
                page_size: 1,
                page_token: first.next_page_token.clone(),
            })
            .await
            .unwrap_err();
        assert_eq!(
            violated_fields(&err),
            ["page_token"],
            "transitions token reused for {other:?}"
        );
    }
    app.stop().await;
}

both_backends!(list_transitions_pages_newest_first_through_gap_free_sequences_that_follow_commit_order);
async fn list_transitions_pages_newest_first_through_gap_free_sequences_that_follow_commit_order(backend: Backend) {
    let db = TestDb::create(backend).await;
    let replicas = Replicas::start(&db, 2, &[]).await;
    let t0 = base_time();

    // Three systems flap concurrently on two replicas: 3 x 4 x 2 = 24 transitions.
    let mut producers = Vec::new();
    for (n, system) in ["red", "green", "blue"].into_iter().enumerate() {
        let replica = &replicas[n % 2];
        producers.push(tokio::spawn(flap(replica.health_client().await, system.into(), 4, t0)));
    }
    for producer in producers {
        producer.await.unwrap();
    }

    let mut client = replicas[0].health_client().await;
    let (all, pages) = all_transitions(&mut client, "", 5).await;
    assert_eq!(pages, [5, 5, 5, 5, 4]);
    let sequences: Vec<u64> = all.iter().map(|t| t.sequence).collect();
    assert_eq!(
        sequences,
        (1..=24).rev().collect::<Vec<u64>>(),
        "gap-free, newest first"
    );

    for system in ["red", "green", "blue"] {
        let (mine, pages) = all_transitions(&mut client, system, 3).await;
        assert_eq!(pages, [3, 3, 2], "{system}");
        assert!(mine.iter().all(|t| t.system_id == system));
        assert!(mine.windows(2).all(|w| w[0].sequence > w[1].sequence), "{system}");
        // Oldest first, each transition starts where the one before ended:
        // sequence order is the order in which the system's changes committed.
        let mut expected_from = Healthy;
        for t in mine.iter().rev() {
            assert_eq!(t.from_status(), expected_from, "{system} at sequence {}", t.sequence);
            expected_from = t.to_status();
        }
        assert_eq!(expected_from, Healthy, "{system} ends healthy");
    }
    replicas.stop().await;
}

// ---- retention ----

/// A migrated database of `backend` and its store, as the server opens them
/// (the retention tests drive the store directly).
async fn migrated_store(db: &TestDb) -> (vitals::db::Database, vitals::store::Store) {
    let config = vitals::Config::from_flags(["--database-url", db.url.as_str()]).unwrap();
    let database = vitals::db::Database::open(&config).await.unwrap();
    database.migrate().await.unwrap();
    let store = vitals::store::Store::open(&database, vitals::store::TransitionNotifier::default());
    (database, store)
}

/// An SQL expression for the time `days` ago, as `backend` stores times.
fn days_ago_sql(backend: Backend, days: u32) -> String {
    match backend {
        Backend::Postgres => format!("(now() - interval '{days} days')"),
        Backend::Embedded => format!("(unixepoch('now', '-{days} days') * 1000000)"),
    }
}

/// Runs one retention pass of `store` to its end; returns what each delete
/// statement of it removed.
async fn retention_pass(store: &vitals::store::Store, retention: Duration, batch: u32) -> Vec<u64> {
    let mut pass = vitals::store::RetentionPass::new(retention, batch);
    let mut deletes = Vec::new();
    while !pass.is_done() {
        let batches = pass.stats().batches;
        let deleted = store.prune_step(&mut pass).await.unwrap();
        if pass.stats().batches > batches {
            deletes.push(deleted);
        }
    }
    deletes
}

both_backends!(retention_deletes_old_runs_and_transitions_but_never_a_checks_newest_100_or_a_systems_newest);
/// The retention pass of the store, driven directly (the server runs one
/// every `VITALS_RETENTION_INTERVAL_MS`).
async fn retention_deletes_old_runs_and_transitions_but_never_a_checks_newest_100_or_a_systems_newest(
    backend: Backend,
) {
    use vitals::domain::{CheckId, RunId, RunMessage, Status, SystemId};
    let db = TestDb::create(backend).await;
    let (database, store) = migrated_store(&db).await;
    let new_run = |run_id: String, check: &str, observed_at: chrono::DateTime<chrono::Utc>| vitals::store::NewRun {
        run_id: RunId::parse("run_id", run_id).unwrap(),
        system_id: SystemId::parse("system_id", "retained".into()).unwrap(),
        check_id: CheckId::parse("check_id", check.into()).unwrap(),
        status: Status::Healthy,
        observed_at,
        observed_at_given: true,
        latency: None,
        message: RunMessage::parse("message", String::new()).unwrap(),
    };
    // 130 old runs of one check, 5 old runs of another, 3 recent ones.
    let old = chrono::Utc::now() - chrono::TimeDelta::days(30);
    let at = |i: i64| old + chrono::TimeDelta::seconds(i);
    for i in 0..130 {
        store
            .submit_run(
                &new_run(format!("a{i:03}"), "a", at(i)),
                &vitals::store::WriteRules::default(),
            )
            .await
            .unwrap();
    }
    for i in 0..5 {
        store
            .submit_run(
                &new_run(format!("b{i}"), "b", at(i)),
                &vitals::store::WriteRules::default(),
            )
            .await
            .unwrap();
    }
    for i in 0..3 {
        store
            .submit_run(
                &new_run(format!("c{i}"), "c", chrono::Utc::now() - chrono::TimeDelta::seconds(i)),
                &vitals::store::WriteRules::default(),
            )
            .await
            .unwrap();
    }
    // A recent run of another system under the id of one of a's oldest:
    // a different run, which retention of `retained` leaves alone.
    let mut neighbour = new_run("a000".into(), "a", chrono::Utc::now());
    neighbour.system_id = SystemId::parse("system_id", "neighbour".into()).unwrap();
    store
        .submit_run(&neighbour, &vitals::store::WriteRules::default())
        .await
        .unwrap();
    // Transitions past the 90 days: three of `retained` (the newest stays),
    // one of `flapping` before a recent one, the only one of `quiet`.
    let (old, recent) = (days_ago_sql(backend, 100), days_ago_sql(backend, 1));
    db.execute(&format!(
        "INSERT INTO systems (system_id, status, evaluated_at) VALUES ('flapping', 1, {recent}), ('quiet', 1, {old}); \
         INSERT INTO transitions (sequence, system_id, check_id, from_status, to_status, transitioned_at, evaluation) \
         VALUES (1001, 'retained', 'a', 1, 2, {old}, ''), (1002, 'retained', 'a', 2, 1, {old}, ''), \
                (1003, 'retained', 'a', 1, 2, {old}, ''), (1004, 'flapping', 'x', 1, 3, {old}, ''), \
                (1005, 'flapping', 'x', 3, 1, {recent}, ''), (1006, 'quiet', 'q', 1, 2, {old}, '');"
    ))
    .await;

    let week = Duration::from_secs(7 * 86_400);
    // Check a's 30 oldest runs, in batches of at most 20 (fewer when a
    // delete is slow), then the old transitions of flapping and retained.
    let deletes = retention_pass(&store, week, 20).await;
    assert!(deletes.iter().all(|&n| n <= 20), "{deletes:?}");
    assert_eq!(deletes.iter().sum::<u64>(), 33, "{deletes:?}");
    assert!(deletes.len() >= 4, "{deletes:?}");
    assert_eq!(
        retention_pass(&store, week, 20).await,
        [] as [u64; 0],
        "a pass over what is kept deletes nothing and runs no delete"
    );
    assert_eq!(
        count_rows(
            &db,
            "SELECT count(*) FROM runs WHERE check_id = $1 AND system_id = 'retained'",
            "a"
        )
        .await,
        100
    );
    assert_eq!(
        count_rows(&db, "SELECT count(*) FROM runs WHERE run_id = $1", "a030").await,
        1,
        "the newest 100 stay"
    );
    assert_eq!(
        count_rows(&db, "SELECT count(*) FROM runs WHERE run_id = $1", "a029").await,
        0,
        "the oldest went"
    );
    assert_eq!(runs_of(&db, "retained").await, 108);
    assert_eq!(
        runs_of(&db, "neighbour").await,
        1,
        "another system's run under a deleted id stays"
    );
    let sequences: Vec<i64> = stored_transitions(&db).await.iter().map(|t| t.0).collect();
    assert_eq!(sequences, [1003, 1005, 1006], "each system's newest stays");
    database.close().await;
}

both_backends!(multi_thread: shutdown_during_a_long_retention_pass_ends_within_the_grace_and_close_limit);
/// A retention pass over many old runs stops between two deletes when
/// shutdown begins, so the server still ends within
/// `VITALS_SHUTDOWN_GRACE_MS` plus [`vitals::app::CLOSE_LIMIT`]; the next
/// pass finishes the job with the same rules.
async fn shutdown_during_a_long_retention_pass_ends_within_the_grace_and_close_limit(backend: Backend) {
    const CHECKS: u32 = 100;
    const RUNS_PER_CHECK: u32 = 2_000;
    const GRACE_MS: u64 = 200;
    let db = TestDb::create(backend).await;
    let (database, _store) = migrated_store(&db).await;
    database.close().await;
    // Every run is 30 days old; latency_us numbers a check's runs, oldest 0.
    let old = days_ago_sql(backend, 30);
    let (numbers, checks_sql, runs_sql) = match backend {
        Backend::Postgres => (
            String::new(),
            format!(
                "INSERT INTO checks (system_id, check_id, thresholds) \
                 SELECT 'old', 'c' || c, 'c:1:2:5' FROM generate_series(1, {CHECKS}) c;"
            ),
            format!(
                "INSERT INTO runs (run_id, system_id, check_id, status, observed_at, latency_us) \
                 SELECT 'r' || c || '-' || i, 'old', 'c' || c, 1, {old} + i * interval '1 second', i \
                 FROM generate_series(1, {CHECKS}) c, generate_series(0, {RUNS_PER_CHECK} - 1) i;"
            ),
        ),
        Backend::Embedded => (
            format!("WITH RECURSIVE n(i) AS (SELECT 0 UNION ALL SELECT i + 1 FROM n WHERE i + 1 < {RUNS_PER_CHECK}) "),
            format!(
                "INSERT INTO checks (system_id, check_id, thresholds, updated_at) \
                 SELECT 'old', 'c' || i, 'c:1:2:5', 0 FROM n WHERE i < {CHECKS};"
            ),
            format!(
                "INSERT INTO runs (run_id, system_id, check_id, status, observed_at, latency_us, recorded_at) \
                 SELECT 'r' || c.i || '-' || r.i, 'old', 'c' || c.i, 1, {old} + r.i * 1000000, r.i, 0 \
                 FROM n c, n r WHERE c.i < {CHECKS};"
            ),
        ),
    };
    db.execute(&format!("{numbers}{checks_sql} {numbers}{runs_sql}")).await;
    let seeded = i64::from(CHECKS * RUNS_PER_CHECK);
    let kept = i64::from(CHECKS * 100);
    let runs = || runs_of(&db, "old");
    assert_eq!(runs().await, seeded);

    let grace = GRACE_MS.to_string();
    let flags = [
        "--run-retention",
        "1d",
        "--retention-interval-ms",
        "10",
        "--shutdown-grace-ms",
        grace.as_str(),
    ];
    let app = TestApp::start(&db, &flags).await;
    eventually(PATIENCE, "retention has started", async || {
        if runs().await == seeded {
            Err("no run deleted yet")
        } else {
            Ok(())
        }
    })
    .await;
    let stopping = std::time::Instant::now();
    app.stop().await;
    let took = stopping.elapsed();
    let bound = Duration::from_millis(GRACE_MS) + vitals::app::CLOSE_LIMIT;
    let left = runs().await;
    assert!(
        took <= bound,
        "shutdown took {took:?} during a retention pass, more than the grace plus the close limit ({bound:?})"
    );
    assert!(
        left > kept,
        "the pass was still running when shutdown began ({left} runs left)"
    );

    // The next pass resumes and keeps each check's newest 100 exactly.
    let app = TestApp::start(&db, &flags).await;
    eventually(Duration::from_secs(60), "the next pass has finished", async || {
        let left = runs().await;
        if left > kept {
            Err(format!("{left} runs left"))
        } else {
            Ok(())
        }
    })
    .await;
    app.stop().await;
    assert_eq!(runs().await, kept);
    assert_eq!(
        count_rows(
            &db,
            &format!("SELECT count(*) FROM runs WHERE system_id = $1 AND latency_us >= {RUNS_PER_CHECK} - 100"),
            "old"
        )
        .await,
        kept,
        "the newest 100 of every check stay"
    );
}

// ---- concurrency across replicas ----

/// Sends 200 concurrent failing runs for one system, alternating between two
/// replicas started with `flags`, while two watchers (one per replica, one
/// filtered to the system) follow. Asserts that each status change is stored,
/// replied and streamed exactly once; returns the reasons of the attempts the
/// replicas refused (and the client retried).
async fn storm_of_200_failures(backend: Backend, flags: &[&str]) -> Vec<String> {
    let db = TestDb::create(backend).await;
    let replicas = Replicas::start(&db, 2, flags).await;
    let clients = [replicas[0].health_client().await, replicas[1].health_client().await];
    let mut watcher_client = replicas[0].health_client().await;
    let mut watcher = watch(&mut watcher_client, "storm", 0).await;
    let mut other_watcher_client = replicas[1].health_client().await;
    let mut unfiltered_watcher = watch(&mut other_watcher_client, "", 0).await;

    let started = std::time::Instant::now();
    let burst = (0..200usize).map(|i| {
        let mut client = clients[i % 2].clone();
        let req = run("storm", "probe", &format!("storm-{i}"), failing(i), None);
        tokio::spawn(async move { submit_retrying(&mut client, req).await })
    });
    let replies = futures::future::join_all(burst).await;
    let elapsed = started.elapsed();
    let mut reported = Vec::new();
    let mut refused = Vec::new();
    for reply in replies {
        let (reply, reasons) = reply.unwrap();
        assert!(!reply.duplicate);
        refused.extend(reasons);
        reported.extend(reply.transition);
    }
    let mut by_reason = std::collections::BTreeMap::<&str, usize>::new();
    for reason in &refused {
        *by_reason.entry(reason.as_str()).or_default() += 1;
    }
    eprintln!("200-run burst ({backend:?}) with {flags:?}: {elapsed:?}, attempts refused and retried: {by_reason:?}");

    assert_eq!(runs_of(&db, "storm").await, 200);
    let stored = stored_transitions(&db).await;
    let changes: Vec<_> = stored.iter().map(|t| (t.3, t.4)).collect();
    assert_eq!(changes, [(1, 2), (2, 3)], "one row per status change: {stored:?}");
    reported.sort_by_key(|t| t.sequence);
    assert_eq!(
        reported.iter().map(from_to).collect::<Vec<_>>(),
        [(Healthy, Degraded), (Degraded, Unhealthy)],
        "exactly one reply reports each change"
    );

    for stream in [&mut watcher, &mut unfiltered_watcher] {
        let first = next_transition(stream).await;
        let second = next_transition(stream).await;
        assert_eq!(
            [(first.sequence, from_to(&first)), (second.sequence, from_to(&second))],
            [
                (reported[0].sequence, (Healthy, Degraded)),
                (reported[1].sequence, (Degraded, Unhealthy))
            ]
        );
    }
    // The next thing each watcher sees is a new change, not a repeat.
    let mut client = clients[1].clone();
    let (recovery, _) = submit_retrying(&mut client, run("storm", "probe", "storm-ok", Healthy, None)).await;
    let recovery = recovery.transition.expect("a success heals the system");
    for stream in [&mut watcher, &mut unfiltered_watcher] {
        let next = next_transition(stream).await;
        assert_eq!(
            (next.sequence, from_to(&next)),
            (recovery.sequence, (Unhealthy, Healthy))
        );
    }
    replicas.stop().await;
    refused
}

both_backends!(two_replicas_taking_200_concurrent_failing_runs_emit_each_status_change_exactly_once);
async fn two_replicas_taking_200_concurrent_failing_runs_emit_each_status_change_exactly_once(backend: Backend) {
    let refused = storm_of_200_failures(backend, &[]).await;
    // With the default 30 s wait for a system's lock nothing needs refusing
    // at this size; if the machine is slow enough that something is, it is
    // the retryable SYSTEM_BUSY.
    assert!(refused.iter().all(|r| r == "SYSTEM_BUSY"), "{refused:?}");
}

both_backends!(runs_refused_as_system_busy_and_retried_still_emit_each_status_change_exactly_once);
async fn runs_refused_as_system_busy_and_retried_still_emit_each_status_change_exactly_once(backend: Backend) {
    // Every run of the burst is for one system, so they queue for its lock;
    // waiting at most 20 ms for it, most are refused with SYSTEM_BUSY at first
    // and retried after the RetryInfo's delay, some of them many times.
    let refused = storm_of_200_failures(backend, &["--database-lock-timeout-ms", "20"]).await;
    assert!(
        refused.iter().any(|r| r == "SYSTEM_BUSY"),
        "the 20 ms wait for the system's lock refused nothing: {refused:?}"
    );
    assert!(refused.iter().all(|r| r == "SYSTEM_BUSY"), "{refused:?}");
}

// ---- a busy system within the request's deadline ----

/// Holds the lock of a system on replica 0 (as a submission stalled in its
/// critical section would) and submits a run of that system to replica 1,
/// started with `flags` and sent with `client_deadline`: the run must be
/// refused with the retryable SYSTEM_BUSY after waiting, but before its
/// `deadline` (the shorter of the client's and the server's), and go through
/// once the lock is free.
async fn a_busy_system_answers_system_busy_within(
    backend: Backend,
    flags: &[&str],
    client_deadline: Option<Duration>,
    deadline: Duration,
) {
    let db = TestDb::create(backend).await;
    let replicas = Replicas::start(&db, 2, flags).await;
    let mut client = replicas[1].health_client().await;
    let req = run("busy", "c", "b-1", Degraded, Some(at(base_time())));
    let release = replicas[0].hold_system_lock("busy").await;

    let mut request = tonic::Request::new(req.clone());
    if let Some(timeout) = client_deadline {
        request.set_timeout(timeout);
    }
    let started = std::time::Instant::now();
    let err = client.submit_run(request).await.unwrap_err();
    let took = started.elapsed();
    assert_reason(&err, Code::Unavailable, "SYSTEM_BUSY");
    assert!(
        err.get_details_retry_info().and_then(|r| r.retry_delay).is_some(),
        "SYSTEM_BUSY carries RetryInfo: {err:?}"
    );
    assert!(took < deadline, "answered after the deadline: {took:?}");
    // It waited for the lock until shortly before the deadline (250 ms).
    assert!(took >= deadline - Duration::from_millis(500), "gave up early: {took:?}");

    release.send(()).unwrap();
    let (reply, _) = submit_retrying(&mut client, req).await;
    assert!(!reply.duplicate, "the refused run was not stored");
    replicas.stop().await;
}

both_backends!(a_run_for_a_busy_system_is_refused_with_system_busy_before_a_short_client_deadline);
async fn a_run_for_a_busy_system_is_refused_with_system_busy_before_a_short_client_deadline(backend: Backend) {
    // The server's defaults: a 30 s wait for the lock, a 15 s request deadline.
    let deadline = Duration::from_secs(2);
    a_busy_system_answers_system_busy_within(backend, &[], Some(deadline), deadline).await;
}

both_backends!(
    a_run_for_a_busy_system_is_refused_with_system_busy_before_the_server_deadline_shorter_than_the_lock_wait
);
async fn a_run_for_a_busy_system_is_refused_with_system_busy_before_the_server_deadline_shorter_than_the_lock_wait(
    backend: Backend,
) {
    // The default 30 s wait for a system's lock, longer than the deadline,
    // as with the default settings; the client sets no deadline.
    let deadline = Duration::from_secs(2);
    a_busy_system_answers_system_busy_within(backend, &["--request-timeout-ms", "2000"], None, deadline).await;
}

both_backends!(a_watcher_that_resumes_from_its_last_sequence_receives_exactly_the_transitions_it_missed);
async fn a_watcher_that_resumes_from_its_last_sequence_receives_exactly_the_transitions_it_missed(backend: Backend) {
    const SYSTEMS: usize = 8;
    const CYCLES: usize = 4;
    let total = u64::try_from(SYSTEMS * CYCLES * 2).unwrap();
    let db = TestDb::create(backend).await;
    let replicas = Replicas::start(&db, 2, &[]).await;
    let mut watcher_client = replicas[0].health_client().await;
    let mut live = watch(&mut watcher_client, "", 0).await;
    let mut one_system = watch(&mut watcher_client, "fleet-3", 0).await;
    let mut interrupted = watch(&mut watcher_client, "", 0).await;
    let t0 = base_time();

    // Producers flap half their cycles, wait for the gate, then flap the
    // rest, so transitions commit both while the watcher is away and while
    // it resumes.
    let (gate_tx, gate_rx) = tokio::sync::watch::channel(false);
    let mut producers = Vec::new();
    for n in 0..SYSTEMS {
        let client = replicas[n % 2].health_client().await;
        let mut gate = gate_rx.clone();
        producers.push(tokio::spawn(async move {
            let system = format!("fleet-{n}");
            flap(client.clone(), system.clone(), CYCLES / 2, t0).await;
            gate.wait_for(|open| *open).await.unwrap();
            let later = t0 + i64::try_from(CYCLES * 3).unwrap();
            flap(client, system, CYCLES / 2, later).await;
        }));
    }

    let mut before = Vec::new();
    for _ in 0..10 {
        before.push(next_transition(&mut interrupted).await.sequence);
    }
    assert_eq!(before, (1..=10).collect::<Vec<u64>>());
    drop(interrupted);
    gate_tx.send(true).unwrap();

    // Resume on the other replica while the second half commits.
    let mut resume_client = replicas[1].health_client().await;
    let mut resumed = watch(&mut resume_client, "", 10).await;
    for producer in producers {
        producer.await.unwrap();
    }
    let stored = stored_transitions(&db).await;
    assert_eq!(u64::try_from(stored.len()).unwrap(), total);

    let after = transitions_until(&mut resumed, total).await;
    assert_eq!(after, (11..=total).collect::<Vec<u64>>(), "none missing, none twice");
    let everything = transitions_until(&mut live, total).await;
    assert_eq!(
        everything,
        (1..=total).collect::<Vec<u64>>(),
        "a live watcher sees every sequence in order"
    );

    let mut expected_from = Healthy;
    let mut previous_sequence = 0;
    for _ in 0..CYCLES * 2 {
        let t = next_transition(&mut one_system).await;
        assert_eq!(t.system_id, "fleet-3");
        assert!(t.sequence > previous_sequence);
        assert_eq!(t.from_status(), expected_from, "at sequence {}", t.sequence);
        (previous_sequence, expected_from) = (t.sequence, t.to_status());
    }

    // Nothing else was pending: the next delivery is a new transition.
    let mut client = replicas[0].health_client().await;
    let t1 = t0 + 1000;
    submit(&mut client, run("late", "probe", "late-1", Degraded, Some(at(t1)))).await;
    let r = submit(&mut client, run("late", "probe", "late-2", Degraded, Some(at(t1 + 1)))).await;
    let sentinel = r.transition.expect("two failures degrade").sequence;
    assert_eq!(sentinel, total + 1);
    assert_eq!(next_transition(&mut resumed).await.sequence, sentinel);
    assert_eq!(next_transition(&mut live).await.sequence, sentinel);
    replicas.stop().await;
}

#[tokio::test]
async fn a_client_giving_up_while_its_run_commits_never_lets_another_submission_see_the_old_status() {
    // PostgreSQL only: it delays commits with a trigger. The embedded store
    // has one writer connection, which serves the next writer only after
    // the abandoned commit ended (see store::sqlite).
    let db = TestDb::postgres().await;
    let app = TestApp::start(&db, &[]).await;
    let mut client = app.health_client().await;
    let t0 = base_time();
    // One failure on each of two checks: a blip each, the system is healthy.
    submit(&mut client, run("slow", "probe", "p0", Degraded, Some(at(t0)))).await;
    submit(&mut client, run("slow", "other", "o0", Degraded, Some(at(t0)))).await;

    // Make every commit that wrote a transition take two seconds, as a busy
    // disk or a synchronous standby might.
    let mut conn = db.connect().await;
    for sql in [
        "CREATE FUNCTION slow_commit() RETURNS trigger LANGUAGE plpgsql AS \
         $$ BEGIN PERFORM pg_sleep(2); RETURN NULL; END $$",
        "CREATE CONSTRAINT TRIGGER slow_commit AFTER INSERT ON transitions \
         DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION slow_commit()",
    ] {
        sqlx::query(sql).execute(&mut conn).await.unwrap();
    }

    // The second failure of `probe` degrades the system, but its client stops
    // waiting while the commit is still in progress. vitals closes the
    // abandoned write's connection, so PostgreSQL ends it if it has not
    // committed yet; if it has, it stands.
    let mut impatient = tonic::Request::new(run("slow", "probe", "p1", Unhealthy, Some(at(t0 + 1))));
    impatient.set_timeout(Duration::from_millis(700));
    let err = client.submit_run(impatient).await.unwrap_err();
    // The client's own timer usually fires first (CANCELLED), else the server's deadline.
    assert!(
        matches!(err.code(), Code::Cancelled | Code::DeadlineExceeded),
        "{err:?}"
    );

    // The second failure of `other` is evaluated after the abandoned write
    // ended, whichever way: the system is degraded once, and the one reply
    // that says so is `o1`'s exactly when `p1` was not stored.
    let r = submit(&mut client, run("slow", "other", "o1", Degraded, Some(at(t0 + 1)))).await;
    assert_eq!(status_of(&r), Degraded);
    let p1_stored = count_rows(&db, "SELECT count(*) FROM runs WHERE run_id = $1", "p1").await == 1;
    assert_eq!(
        r.transition.is_some(),
        !p1_stored,
        "p1 stored: {p1_stored}, o1's transition: {:?}",
        r.transition
    );
    let stored = stored_transitions(&db).await;
    assert_eq!(stored.len(), 1, "{stored:?}");
    app.stop().await;
}

both_backends!(a_watcher_on_one_replica_is_woken_at_once_by_a_transition_committed_on_another);
async fn a_watcher_on_one_replica_is_woken_at_once_by_a_transition_committed_on_another(backend: Backend) {
    let db = TestDb::create(backend).await;
    let replicas = Replicas::start(&db, 2, &[]).await;
    let (watched, writer) = (&replicas[0], &replicas[1]);
    let mut writer_client = writer.health_client().await;
    let t0 = base_time();
    // A single failure degrades, a single success heals: every run flips.
    configure(
        &mut writer_client,
        set_thresholds("pager", "probe", consecutive(1, 1, 5)),
    )
    .await;
    submit(
        &mut writer_client,
        run("pager", "probe", "w1", Degraded, Some(at(t0 + 1))),
    )
    .await;

    let mut watcher_client = watched.health_client().await;
    let mut stream = watch(&mut watcher_client, "pager", 0).await;
    assert_eq!(next_transition(&mut stream).await.sequence, 1);
    // Each delivery restarts the watcher's fallback poll (2 s), so a
    // transition committed right after one arrives that fast only if the
    // other replica's NOTIFY (embedded: the in-process notification) woke it.
    for i in 2..5 {
        let status = if i % 2 == 0 { Healthy } else { Degraded };
        let started = std::time::Instant::now();
        let req = run("pager", "probe", &format!("w{i}"), status, Some(at(t0 + i)));
        let reply = submit(&mut writer_client, req).await;
        let sequence = reply.transition.expect("the run changes the status").sequence;
        assert_eq!(next_transition(&mut stream).await.sequence, sequence);
        assert!(
            started.elapsed() < Duration::from_secs(1),
            "transition {sequence} took {:?} to reach the watcher",
            started.elapsed()
        );
    }
    replicas.stop().await;
}

// ---- bounded work per system ----

both_backends!(a_check_beyond_the_checks_per_system_limit_is_refused_with_too_many_checks_and_nothing_is_written);
async fn a_check_beyond_the_checks_per_system_limit_is_refused_with_too_many_checks_and_nothing_is_written(
    backend: Backend,
) {
    let db = TestDb::create(backend).await;
    let app = TestApp::start(&db, &["--max-checks-per-system", "3"]).await;
    let mut client = app.health_client().await;
    let t0 = base_time();
    for (i, check) in ["a", "b", "c"].into_iter().enumerate() {
        let seconds = t0 + i64::try_from(i).unwrap();
        submit(
            &mut client,
            run("full", check, &format!("{check}1"), Unhealthy, Some(at(seconds))),
        )
        .await;
    }

    let err = client
        .submit_run(run("full", "d", "d1", Unhealthy, Some(at(t0 + 5))))
        .await
        .unwrap_err();
    let info = assert_reason(&err, Code::FailedPrecondition, "TOO_MANY_CHECKS");
    assert_eq!(info.metadata.get("system_id").map(String::as_str), Some("full"));
    assert_eq!(info.metadata.get("limit").map(String::as_str), Some("3"));
    let err = client
        .configure_check(ConfigureCheckRequest {
            system_id: "full".into(),
            check_id: "d".into(),
            thresholds: None,
            enabled: Some(false),
            flapping: None,
        })
        .await
        .unwrap_err();
    assert_reason(&err, Code::FailedPrecondition, "TOO_MANY_CHECKS");

    // Nothing of `d` was stored; the system's checks still work, and so does
    // another system.
    assert_eq!(
        count_rows(
            &db,
            "SELECT count(*) FROM runs WHERE system_id = $1 AND check_id = 'd'",
            "full"
        )
        .await,
        0
    );
    let health = system_health(&mut client, "full").await;
    let checks: Vec<_> = health.checks.iter().map(|c| c.check_id.as_str()).collect();
    assert_eq!(checks, ["a", "b", "c"]);
    let reply = submit(&mut client, run("full", "a", "a2", Unhealthy, Some(at(t0 + 6)))).await;
    assert_eq!(status_of(&reply), Degraded, "a second failure of `a`");
    assert_eq!(reply.system_health.unwrap().checks.len(), 3);
    submit(&mut client, run("roomy", "d", "r1", Healthy, Some(at(t0)))).await;
    app.stop().await;
}

both_backends!(a_page_token_of_another_deployment_is_refused_and_one_of_another_replica_is_taken);
async fn a_page_token_of_another_deployment_is_refused_and_one_of_another_replica_is_taken(backend: Backend) {
    // The same runs in two deployments: a token of one is no token of the
    // other, though its cursor would point at the same place.
    let (db, app, mut client) = serve(backend).await;
    let (_other_db, other_app, mut other_client) = serve(backend).await;
    let t0 = base_time();
    for c in [&mut client, &mut other_client] {
        for i in 0..3 {
            let seconds = t0 + i64::from(i);
            submit(c, run("paged", "c", &format!("r{i}"), Healthy, Some(at(seconds)))).await;
        }
    }
    let page = |page_token: &str| ListRunsRequest {
        system_id: "paged".into(),
        page_size: 1,
        page_token: page_token.into(),
        ..Default::default()
    };
    let token = list_runs(&mut client, page("")).await.unwrap().next_page_token;
    let err = list_runs(&mut other_client, page(&token)).await.unwrap_err();
    assert_eq!(violated_fields(&err), ["page_token"]);
    other_app.stop().await;

    // Another replica of the same deployment (with PostgreSQL a server of
    // its own on the same database) takes it.
    if backend == Backend::Postgres {
        let replica = TestApp::start(&db, &[]).await;
        let mut replica_client = replica.health_client().await;
        let next = list_runs(&mut replica_client, page(&token)).await.unwrap();
        assert_eq!(next.runs.len(), 1);
        assert_eq!(next.runs[0].run_id, "r1");
        replica.stop().await;
    }
    app.stop().await;
}
