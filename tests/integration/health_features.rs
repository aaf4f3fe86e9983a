//! The health features a platform on vitals needs beyond ingestion: finding
//! systems (ListSystems), retiring them (DeleteCheck, DeleteSystem),
//! silencing them (maintenance windows), measuring them (GetUptime), calming
//! them (flapping) and naming the root cause of an outage (dependencies).
//!
//! Every body runs on PostgreSQL and on the embedded store ([`both_backends!`]).

use prost_types::Timestamp;
use tonic::{Code, Streaming, transport::Channel};
use tonic_types::StatusExt;
use vitals::proto::{
    self, ClearMaintenanceRequest, ConfigureCheckRequest, ConfigureSystemRequest, DeleteCheckRequest,
    DeleteSystemRequest, GetSystemHealthRequest, GetUptimeRequest, GetUptimeResponse, HealthStatus, HealthTransition,
    ListRunsRequest, ListSystemsRequest, ListTransitionsRequest, SetMaintenanceRequest, SubmitRunRequest,
    SubmitRunResponse, SystemHealth, SystemSummary, Thresholds, WatchTransitionsRequest, WatchTransitionsResponse,
    health_check_service_client::HealthCheckServiceClient, thresholds::Mode,
};

use HealthStatus::{Degraded, Healthy, Unhealthy};

use crate::harness::{Backend, PATIENCE, TestApp, TestDb, assert_reason};

type Client = HealthCheckServiceClient<Channel>;

// ---- helpers ----

/// Whole seconds an hour before the first call, the same for every call of
/// the test binary (a test that reads it twice must not see the clock tick
/// between), so offsets never pass the 5-minute future limit.
fn base_time() -> i64 {
    static BASE: std::sync::OnceLock<i64> = std::sync::OnceLock::new();
    *BASE.get_or_init(|| chrono::Utc::now().timestamp() - 3600)
}

fn run(system: &str, check: &str, run_id: &str, status: HealthStatus, second: i64) -> SubmitRunRequest {
    SubmitRunRequest {
        run_id: run_id.to_owned(),
        system_id: system.to_owned(),
        check_id: check.to_owned(),
        status: status as i32,
        observed_at: Some(Timestamp {
            seconds: base_time() + second,
            nanos: 0,
        }),
        latency: None,
        message: String::new(),
    }
}

async fn submit(client: &mut Client, req: SubmitRunRequest) -> SubmitRunResponse {
    client
        .submit_run(req)
        .await
        .unwrap_or_else(|e| panic!("SubmitRun failed: {e:?}"))
        .into_inner()
}

/// Submits `statuses` in order as runs `<prefix>0..` of `system`'s `check`.
async fn submit_all(client: &mut Client, system: &str, check: &str, prefix: &str, statuses: &[HealthStatus]) {
    for (i, status) in statuses.iter().enumerate() {
        let second = i64::try_from(i).unwrap();
        submit(client, run(system, check, &format!("{prefix}{i}"), *status, second)).await;
    }
}

async fn serve(backend: Backend) -> (TestDb, TestApp, Client) {
    let db = TestDb::create(backend).await;
    let app = TestApp::start(&db, &[]).await;
    let client = app.health_client().await;
    (db, app, client)
}

/// Walks ListSystems page by page; the ids seen and the size of each page.
async fn all_systems(
    client: &mut Client,
    status: HealthStatus,
    prefix: &str,
    page_size: i32,
) -> (Vec<SystemSummary>, Vec<usize>) {
    let (mut systems, mut pages) = (Vec::new(), Vec::new());
    let mut page_token = String::new();
    loop {
        let page = client
            .list_systems(ListSystemsRequest {
                status: status as i32,
                system_id_prefix: prefix.to_owned(),
                page_size,
                page_token,
            })
            .await
            .unwrap()
            .into_inner();
        pages.push(page.systems.len());
        systems.extend(page.systems);
        if page.next_page_token.is_empty() {
            return (systems, pages);
        }
        assert!(pages.len() < 100, "ListSystems never ends");
        page_token = page.next_page_token;
    }
}

/// Thresholds under which one failure degrades a check and two make it
/// unhealthy; one success recovers it.
fn sensitive() -> Thresholds {
    Thresholds {
        mode: Some(Mode::Consecutive(proto::ConsecutiveThresholds {
            healthy_min_success_count: 1,
            degraded_min_failure_count: 1,
            unhealthy_min_failure_count: 2,
        })),
    }
}

async fn make_sensitive(client: &mut Client, system: &str, check: &str) {
    client
        .configure_check(ConfigureCheckRequest {
            system_id: system.into(),
            check_id: check.into(),
            thresholds: Some(sensitive()),
            ..Default::default()
        })
        .await
        .unwrap();
}

fn now_plus(seconds: i64) -> Timestamp {
    Timestamp {
        seconds: chrono::Utc::now().timestamp() + seconds,
        nanos: 0,
    }
}

async fn system_health(client: &mut Client, system: &str) -> SystemHealth {
    client
        .get_system_health(GetSystemHealthRequest {
            system_id: system.to_owned(),
        })
        .await
        .unwrap()
        .into_inner()
        .system_health
        .unwrap()
}

async fn watch(
    client: &mut Client,
    after_sequence: u64,
    exclude_maintenance: bool,
    exclude_flapping: bool,
) -> Streaming<WatchTransitionsResponse> {
    client
        .watch_transitions(WatchTransitionsRequest {
            system_id: String::new(),
            after_sequence,
            exclude_maintenance,
            exclude_flapping,
        })
        .await
        .unwrap()
        .into_inner()
}

/// The transitions a watch delivers up to and including `last_sequence`.
async fn watched_until(stream: &mut Streaming<WatchTransitionsResponse>, last_sequence: u64) -> Vec<HealthTransition> {
    let mut seen: Vec<HealthTransition> = Vec::new();
    while seen.last().is_none_or(|t| t.sequence < last_sequence) {
        let next = tokio::time::timeout(PATIENCE, stream.message())
            .await
            .expect("a transition arrives in time")
            .unwrap()
            .unwrap();
        seen.push(next.transition.unwrap());
    }
    seen
}

fn ids(systems: &[SystemSummary]) -> Vec<&str> {
    systems.iter().map(|s| s.system_id.as_str()).collect()
}

// ---- ListSystems ----

both_backends!(list_systems_filters_by_status_and_prefix_and_pages_through_each_system_once_in_byte_order);
async fn list_systems_filters_by_status_and_prefix_and_pages_through_each_system_once_in_byte_order(backend: Backend) {
    let (_db, _app, mut client) = serve(backend).await;
    // Two failures make a check degraded (the consecutive defaults).
    for system in ["eu-web", "eu-db", "us-web", "Eu-cache", "eu-api"] {
        submit_all(&mut client, system, "http", system, &[Healthy]).await;
    }
    submit_all(&mut client, "eu-db", "disk", "eu-db-disk", &[Unhealthy, Unhealthy]).await;

    let (every, pages) = all_systems(&mut client, HealthStatus::Unspecified, "", 2).await;
    assert_eq!(
        ids(&every),
        ["Eu-cache", "eu-api", "eu-db", "eu-web", "us-web"],
        "byte order"
    );
    assert_eq!(pages, [2, 2, 1]);

    let (eu, _) = all_systems(&mut client, HealthStatus::Unspecified, "eu-", 10).await;
    assert_eq!(ids(&eu), ["eu-api", "eu-db", "eu-web"]);
    let db = &eu[1];
    assert_eq!(db.status(), Degraded);
    assert_eq!(db.check_count, 2);
    assert_eq!(db.last_run_at.as_ref().map(|t| t.seconds), Some(base_time() + 1));
    assert!(!db.in_maintenance && !db.flapping);

    let (degraded, _) = all_systems(&mut client, Degraded, "", 10).await;
    assert_eq!(ids(&degraded), ["eu-db"]);
    let (healthy_eu, _) = all_systems(&mut client, Healthy, "eu-", 1).await;
    assert_eq!(ids(&healthy_eu), ["eu-api", "eu-web"]);
    let (none, pages) = all_systems(&mut client, Unhealthy, "", 10).await;
    assert!(none.is_empty());
    assert_eq!(pages, [0]);
}

both_backends!(a_list_systems_page_token_is_only_taken_with_the_filter_it_was_made_for);
async fn a_list_systems_page_token_is_only_taken_with_the_filter_it_was_made_for(backend: Backend) {
    let (_db, _app, mut client) = serve(backend).await;
    for system in ["a1", "a2", "a3"] {
        submit_all(&mut client, system, "http", system, &[Healthy]).await;
    }
    let first = client
        .list_systems(ListSystemsRequest {
            status: 0,
            system_id_prefix: "a".into(),
            page_size: 1,
            page_token: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(!first.next_page_token.is_empty());
    let err = client
        .list_systems(ListSystemsRequest {
            status: 0,
            system_id_prefix: "a2".into(),
            page_size: 1,
            page_token: first.next_page_token,
        })
        .await
        .unwrap_err();
    assert_reason(&err, Code::InvalidArgument, "INVALID_ARGUMENT");
    let err = client
        .list_systems(ListSystemsRequest {
            status: 9,
            system_id_prefix: "x".repeat(257),
            page_size: 1001,
            page_token: String::new(),
        })
        .await
        .unwrap_err();
    assert_reason(&err, Code::InvalidArgument, "INVALID_ARGUMENT");
}

// ---- DeleteCheck and DeleteSystem ----

both_backends!(deleting_the_failing_check_recovers_the_system_with_a_transition_and_deleting_it_again_is_a_no_op);
async fn deleting_the_failing_check_recovers_the_system_with_a_transition_and_deleting_it_again_is_a_no_op(
    backend: Backend,
) {
    let (db, _app, mut client) = serve(backend).await;
    submit_all(&mut client, "shop", "http", "h", &[Healthy, Healthy]).await;
    submit_all(&mut client, "shop", "disk", "d", &[Unhealthy, Unhealthy]).await;
    let runs_of_disk = "SELECT count(*) FROM runs WHERE system_id = 'shop' AND check_id = $1";
    assert_eq!(db.scalar(runs_of_disk, "disk").await, 2);

    let reply = client
        .delete_check(DeleteCheckRequest {
            system_id: "shop".into(),
            check_id: "disk".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(reply.deleted);
    let health = reply.system_health.unwrap();
    assert_eq!(health.status(), Healthy);
    assert_eq!(health.checks.len(), 1);
    let transition = reply
        .transition
        .expect("removing the degraded check changed the status");
    assert_eq!((transition.from_status(), transition.to_status()), (Degraded, Healthy));
    assert_eq!(transition.check_id, "disk");
    assert!(transition.check_deleted);

    assert_eq!(db.scalar(runs_of_disk, "disk").await, 0, "its runs went");
    assert_eq!(db.scalar(runs_of_disk, "http").await, 2, "the other check's stayed");
    let stored = db.stored_transitions().await;
    assert_eq!(stored.len(), 2, "the degradation stays as history: {stored:?}");

    let again = client
        .delete_check(DeleteCheckRequest {
            system_id: "shop".into(),
            check_id: "disk".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(!again.deleted);
    assert!(again.transition.is_none());
    assert_eq!(again.system_health.unwrap().checks.len(), 1);
    let never = client
        .delete_check(DeleteCheckRequest {
            system_id: "never-seen".into(),
            check_id: "disk".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(!never.deleted && never.system_health.is_none());

    // A deleted check's id starts afresh.
    let reply = submit(&mut client, run("shop", "disk", "d-new", Unhealthy, 10)).await;
    assert_eq!(
        reply.system_health.unwrap().status(),
        Healthy,
        "one failure is below the threshold"
    );
}

both_backends!(deleting_a_healthy_check_writes_no_transition);
async fn deleting_a_healthy_check_writes_no_transition(backend: Backend) {
    let (db, _app, mut client) = serve(backend).await;
    submit_all(&mut client, "shop", "http", "h", &[Healthy]).await;
    submit_all(&mut client, "shop", "disk", "d", &[Healthy]).await;
    let reply = client
        .delete_check(DeleteCheckRequest {
            system_id: "shop".into(),
            check_id: "http".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(reply.deleted && reply.transition.is_none());
    assert!(db.stored_transitions().await.is_empty());
}

both_backends!(deleting_a_system_removes_its_runs_and_checks_keeps_its_transitions_and_is_idempotent);
async fn deleting_a_system_removes_its_runs_and_checks_keeps_its_transitions_and_is_idempotent(backend: Backend) {
    let (db, _app, mut client) = serve(backend).await;
    submit_all(&mut client, "old", "http", "o", &[Unhealthy, Unhealthy]).await;
    submit_all(&mut client, "kept", "http", "k", &[Healthy]).await;
    let deleted = client
        .delete_system(DeleteSystemRequest {
            system_id: "old".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(deleted.deleted);
    let err = client
        .get_system_health(GetSystemHealthRequest {
            system_id: "old".into(),
        })
        .await
        .unwrap_err();
    assert_reason(&err, Code::NotFound, "SYSTEM_NOT_FOUND");
    assert_eq!(
        db.scalar("SELECT count(*) FROM runs WHERE system_id = $1", "old").await,
        0
    );
    assert_eq!(
        db.scalar("SELECT count(*) FROM checks WHERE system_id = $1", "old")
            .await,
        0
    );
    assert_eq!(
        db.scalar("SELECT count(*) FROM transitions WHERE system_id = $1", "old")
            .await,
        1
    );
    let listed = client
        .list_runs(ListRunsRequest {
            system_id: "kept".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(listed.runs.len(), 1, "other systems are untouched");
    let (systems, _) = all_systems(&mut client, HealthStatus::Unspecified, "", 10).await;
    assert_eq!(ids(&systems), ["kept"]);

    let again = client
        .delete_system(DeleteSystemRequest {
            system_id: "old".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(!again.deleted);

    // ConfigureCheck of a deleted system starts it afresh.
    let reply = client
        .configure_check(ConfigureCheckRequest {
            system_id: "old".into(),
            check_id: "http".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(reply.system_health.unwrap().status(), Healthy);
}

// ---- maintenance windows ----

both_backends!(
    transitions_in_a_window_are_marked_and_hidden_from_a_quiet_watcher_except_the_resolution_of_an_announced_problem
);
async fn transitions_in_a_window_are_marked_and_hidden_from_a_quiet_watcher_except_the_resolution_of_an_announced_problem(
    backend: Backend,
) {
    let (_db, _app, mut client) = serve(backend).await;
    make_sensitive(&mut client, "shop", "http").await;
    // Degraded before any window: announced.
    let before = submit(&mut client, run("shop", "http", "r0", Degraded, 0)).await;
    let announced = before.transition.unwrap();
    assert!(!announced.in_maintenance);

    // A window that started a minute ago and ends in an hour.
    let set = client
        .set_maintenance(SetMaintenanceRequest {
            system_id: "shop".into(),
            starts_at: Some(now_plus(-60)),
            ends_at: Some(now_plus(3600)),
            reason: "database upgrade".into(),
        })
        .await
        .unwrap()
        .into_inner();
    let health = set.system_health.unwrap();
    assert!(health.in_maintenance);
    assert_eq!(health.maintenance_windows.len(), 1);
    assert_eq!(health.maintenance_windows[0].reason, "database upgrade");

    let worse = submit(&mut client, run("shop", "http", "r1", Unhealthy, 1)).await;
    let worse = worse.transition.unwrap();
    assert_eq!((worse.to_status(), worse.in_maintenance), (Unhealthy, true));
    // The problem announced before the window is resolved: never hidden.
    let resolved = submit(&mut client, run("shop", "http", "r2", Healthy, 2)).await;
    let resolved = resolved.transition.unwrap();
    assert_eq!((resolved.to_status(), resolved.in_maintenance), (Healthy, false));
    // A problem that starts and ends inside the window stays hidden, both ways.
    let hidden = submit(&mut client, run("shop", "http", "r3", Degraded, 3))
        .await
        .transition
        .unwrap();
    let hidden_recovery = submit(&mut client, run("shop", "http", "r4", Healthy, 4))
        .await
        .transition
        .unwrap();
    assert!(hidden.in_maintenance && hidden_recovery.in_maintenance);

    // Another system, outside any window, marks the end of the story.
    make_sensitive(&mut client, "marker", "http").await;
    let marker = submit(&mut client, run("marker", "http", "m0", Degraded, 0))
        .await
        .transition
        .unwrap();
    assert!(!marker.in_maintenance);

    let mut quiet = watch(&mut client, 0, true, false).await;
    let seen: Vec<u64> = watched_until(&mut quiet, marker.sequence)
        .await
        .iter()
        .map(|t| t.sequence)
        .collect();
    assert_eq!(seen, [announced.sequence, resolved.sequence, marker.sequence]);
    let mut everything = watch(&mut client, 0, false, false).await;
    let all = watched_until(&mut everything, marker.sequence).await;
    assert_eq!(all.len(), 6);
    assert_eq!(all.iter().filter(|t| t.in_maintenance).count(), 3);

    let (listed, _) = all_systems(&mut client, HealthStatus::Unspecified, "", 10).await;
    assert_eq!(
        listed
            .iter()
            .map(|s| (s.system_id.as_str(), s.in_maintenance))
            .collect::<Vec<_>>(),
        [("marker", false), ("shop", true)]
    );
}

both_backends!(
    overlapping_windows_merge_repeating_one_changes_nothing_and_clear_ends_the_open_one_and_drops_the_upcoming
);
async fn overlapping_windows_merge_repeating_one_changes_nothing_and_clear_ends_the_open_one_and_drops_the_upcoming(
    backend: Backend,
) {
    let (_db, _app, mut client) = serve(backend).await;
    let now = chrono::Utc::now().timestamp();
    let at = move |seconds: i64| Timestamp {
        seconds: now + seconds,
        nanos: 0,
    };
    let set = async |client: &mut Client, from: i64, to: i64, reason: &str| {
        client
            .set_maintenance(SetMaintenanceRequest {
                system_id: "planned".into(),
                starts_at: Some(at(from)),
                ends_at: Some(at(to)),
                reason: reason.into(),
            })
            .await
            .unwrap()
            .into_inner()
    };
    // A window for a system never seen creates it.
    set(&mut client, 3600, 7200, "first").await;
    set(&mut client, 10_000, 11_000, "apart").await;
    let merged = set(&mut client, 7000, 8000, "longer").await;
    let window = merged.window.unwrap();
    assert_eq!(window.reason, "longer");
    assert_eq!(
        window.ends_at.unwrap().seconds - window.starts_at.unwrap().seconds,
        4400,
        "one window from the first's start to the new end"
    );
    let health = merged.system_health.unwrap();
    assert_eq!(health.maintenance_windows.len(), 2);
    assert!(!health.in_maintenance, "nothing is open yet");
    assert_eq!(health.status(), Healthy);
    assert!(health.checks.is_empty());
    let again = set(&mut client, 7000, 8000, "longer").await;
    assert_eq!(again.window.unwrap(), window, "the same request again changes nothing");
    assert_eq!(again.system_health.unwrap().maintenance_windows.len(), 2);

    // Open one now too, then clear: it ends now, the upcoming ones go.
    set(&mut client, -10, 600, "now").await;
    assert!(system_health(&mut client, "planned").await.in_maintenance);
    let cleared = client
        .clear_maintenance(ClearMaintenanceRequest {
            system_id: "planned".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(cleared.cleared, 3);
    let health = cleared.system_health.unwrap();
    assert!(!health.in_maintenance && health.maintenance_windows.is_empty());
    let nothing = client
        .clear_maintenance(ClearMaintenanceRequest {
            system_id: "planned".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(nothing.cleared, 0);
}

both_backends!(a_window_in_the_past_backwards_or_without_an_end_is_refused_naming_each_field);
async fn a_window_in_the_past_backwards_or_without_an_end_is_refused_naming_each_field(backend: Backend) {
    let (_db, _app, mut client) = serve(backend).await;
    let refused = async |client: &mut Client, req: SetMaintenanceRequest| {
        let err = client.set_maintenance(req).await.unwrap_err();
        assert_reason(&err, Code::InvalidArgument, "INVALID_ARGUMENT");
        let mut fields: Vec<String> = err
            .get_details_bad_request()
            .unwrap()
            .field_violations
            .into_iter()
            .map(|v| v.field)
            .collect();
        fields.sort();
        fields
    };
    let past = SetMaintenanceRequest {
        system_id: "s".into(),
        starts_at: Some(now_plus(-600)),
        ends_at: Some(now_plus(-60)),
        reason: String::new(),
    };
    assert_eq!(refused(&mut client, past).await, ["ends_at"]);
    let backwards = SetMaintenanceRequest {
        system_id: String::new(),
        starts_at: Some(now_plus(600)),
        ends_at: Some(now_plus(60)),
        reason: "x".repeat(1025),
    };
    assert_eq!(
        refused(&mut client, backwards).await,
        ["ends_at", "reason", "system_id"]
    );
    let open_ended = SetMaintenanceRequest {
        system_id: "s".into(),
        ..Default::default()
    };
    assert_eq!(refused(&mut client, open_ended).await, ["ends_at"]);
    let err = client
        .get_system_health(GetSystemHealthRequest { system_id: "s".into() })
        .await
        .unwrap_err();
    assert_reason(&err, Code::NotFound, "SYSTEM_NOT_FOUND");
}

// ---- uptime ----

fn days_ago_sql(backend: Backend, days: u32) -> String {
    match backend {
        Backend::Postgres => format!("(now() - interval '{days} days')"),
        Backend::Embedded => format!("(unixepoch('now', '-{days} days') * 1000000)"),
    }
}

async fn uptime(client: &mut Client, system: &str, days: i64) -> GetUptimeResponse {
    client
        .get_uptime(GetUptimeRequest {
            system_id: system.into(),
            window: Some(prost_types::Duration {
                seconds: days * 86_400,
                nanos: 0,
            }),
        })
        .await
        .unwrap()
        .into_inner()
}

/// Microseconds from `a` to `b`.
fn micros_between(a: &Timestamp, b: &Timestamp) -> i64 {
    (b.seconds - a.seconds) * 1_000_000 + i64::from(b.nanos - a.nanos) / 1000
}

fn micros_of(d: Option<&prost_types::Duration>) -> i64 {
    d.map_or(0, |d| d.seconds * 1_000_000 + i64::from(d.nanos) / 1000)
}

both_backends!(uptime_is_exact_from_transitions_starts_from_the_oldest_kept_one_across_retention_and_caps_at_90_days);
async fn uptime_is_exact_from_transitions_starts_from_the_oldest_kept_one_across_retention_and_caps_at_90_days(
    backend: Backend,
) {
    let (db, _app, mut client) = serve(backend).await;
    submit(&mut client, run("legacy", "http", "r0", Healthy, 0)).await;
    // A system written 200 days ago whose older transitions retention took:
    // the one kept says it was unhealthy until 10 days ago.
    db.execute(&format!(
        "UPDATE systems SET created_at = {} WHERE system_id = 'legacy'; \
         INSERT INTO transitions (sequence, system_id, check_id, from_status, to_status, transitioned_at, evaluation) \
         SELECT 1000, 'legacy', 'http', 3, 1, {}, evaluation FROM checks WHERE system_id = 'legacy';",
        days_ago_sql(backend, 200),
        days_ago_sql(backend, 10)
    ))
    .await;
    let recovered_at = client
        .list_transitions(ListTransitionsRequest {
            system_id: "legacy".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .transitions[0]
        .transitioned_at
        .unwrap();

    let month = uptime(&mut client, "legacy", 30).await;
    let (start, end) = (month.window_start.unwrap(), month.window_end.unwrap());
    assert_eq!(micros_between(&start, &end), 30 * 86_400 * 1_000_000);
    assert_eq!(month.counted_from, month.window_start);
    assert_eq!(
        micros_of(month.unhealthy.as_ref()),
        micros_between(&start, &recovered_at)
    );
    assert_eq!(micros_of(month.healthy.as_ref()), micros_between(&recovered_at, &end));
    assert_eq!(
        micros_of(month.degraded.as_ref()) + micros_of(month.maintenance.as_ref()),
        0
    );
    assert!(
        (month.unhealthy_percent - 200.0 / 3.0).abs() < 0.01,
        "{}",
        month.unhealthy_percent
    );
    assert!((month.healthy_percent + month.unhealthy_percent - 100.0).abs() < 1e-6);

    // A year is capped at the 90 days transitions are kept.
    let year = uptime(&mut client, "legacy", 365).await;
    let (start, end) = (year.window_start.unwrap(), year.window_end.unwrap());
    assert_eq!(micros_between(&start, &end), 90 * 86_400 * 1_000_000);
    assert_eq!(
        micros_of(year.unhealthy.as_ref()),
        micros_between(&start, &recovered_at)
    );

    // Time before the system existed is not counted.
    submit(&mut client, run("young", "http", "y0", Healthy, 0)).await;
    let young = uptime(&mut client, "young", 30).await;
    assert!(young.counted_from.unwrap().seconds > young.window_start.unwrap().seconds);
    assert!((young.healthy_percent - 100.0).abs() < 1e-9);

    let err = client
        .get_uptime(GetUptimeRequest {
            system_id: "never".into(),
            window: Some(prost_types::Duration { seconds: 60, nanos: 0 }),
        })
        .await
        .unwrap_err();
    assert_reason(&err, Code::NotFound, "SYSTEM_NOT_FOUND");
    let err = client
        .get_uptime(GetUptimeRequest {
            system_id: "legacy".into(),
            window: None,
        })
        .await
        .unwrap_err();
    assert_reason(&err, Code::InvalidArgument, "INVALID_ARGUMENT");
}

both_backends!(time_in_maintenance_is_reported_apart_and_left_out_of_the_percentages);
async fn time_in_maintenance_is_reported_apart_and_left_out_of_the_percentages(backend: Backend) {
    let (db, _app, mut client) = serve(backend).await;
    make_sensitive(&mut client, "shop", "http").await;
    db.execute(&format!(
        "UPDATE systems SET created_at = {} WHERE system_id = 'shop'",
        days_ago_sql(backend, 2)
    ))
    .await;
    let window = client
        .set_maintenance(SetMaintenanceRequest {
            system_id: "shop".into(),
            starts_at: Some(now_plus(-3600)),
            ends_at: Some(now_plus(3600)),
            reason: "upgrade".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .window
        .unwrap();
    // Down only inside the window.
    submit(&mut client, run("shop", "http", "r0", Unhealthy, 0)).await;
    let day = uptime(&mut client, "shop", 1).await;
    let end = day.window_end.unwrap();
    assert_eq!(
        micros_of(day.maintenance.as_ref()),
        micros_between(&window.starts_at.unwrap(), &end)
    );
    assert_eq!(micros_of(day.unhealthy.as_ref()), 0);
    assert_eq!(
        micros_of(day.healthy.as_ref()) + micros_of(day.maintenance.as_ref()),
        86_400 * 1_000_000
    );
    assert!((day.healthy_percent - 100.0).abs() < 1e-9);
}

// ---- flapping ----

both_backends!(a_check_flaps_from_the_start_bound_until_below_the_stop_bound_and_its_transitions_meanwhile_are_marked);
async fn a_check_flaps_from_the_start_bound_until_below_the_stop_bound_and_its_transitions_meanwhile_are_marked(
    backend: Backend,
) {
    let (_db, _app, mut client) = serve(backend).await;
    let configured = client
        .configure_check(ConfigureCheckRequest {
            system_id: "flappy".into(),
            check_id: "http".into(),
            thresholds: Some(sensitive()),
            enabled: None,
            flapping: Some(proto::FlappingSettings {
                runs: 10,
                start_changes: 4,
                stop_changes: 2,
            }),
        })
        .await
        .unwrap()
        .into_inner();
    let check = configured.check.unwrap();
    assert!(!check.flapping);
    assert_eq!(check.flapping_settings.unwrap().start_changes, 4);

    let mut transitions = Vec::new();
    let mut flapping_after = Vec::new();
    // Alternating: the fourth change (r4) starts flapping.
    for (i, status) in [Healthy, Degraded, Healthy, Degraded, Healthy, Degraded, Healthy]
        .into_iter()
        .enumerate()
    {
        let second = i64::try_from(i).unwrap();
        let reply = submit(&mut client, run("flappy", "http", &format!("r{i}"), status, second)).await;
        flapping_after.push(reply.system_health.unwrap().checks[0].flapping);
        transitions.extend(reply.transition);
    }
    assert_eq!(flapping_after, [false, false, false, false, true, true, true]);
    let flags: Vec<(u64, bool)> = transitions.iter().map(|t| (t.sequence, t.flapping)).collect();
    assert_eq!(transitions.len(), 6);
    // r4 resolves the degradation r3 announced: never marked. r5 and r6 are.
    assert_eq!(
        flags.iter().map(|(_, f)| *f).collect::<Vec<_>>(),
        [false, false, false, false, true, true]
    );
    let (listed, _) = all_systems(&mut client, HealthStatus::Unspecified, "flappy", 10).await;
    assert!(listed[0].flapping);

    // Steady runs: the changes fall below the start bound first (still
    // flapping: hysteresis), then below the stop bound (calm again).
    let mut calm_at = None;
    for i in 7..20 {
        let reply = submit(&mut client, run("flappy", "http", &format!("r{i}"), Healthy, i)).await;
        let check = &reply.system_health.unwrap().checks[0];
        if i == 12 {
            assert!(check.flapping, "3 changes: below start, not below stop");
        }
        if !check.flapping && calm_at.is_none() {
            calm_at = Some(i);
        }
    }
    assert_eq!(calm_at, Some(14), "one change left among the newest 10");
    let (listed, _) = all_systems(&mut client, HealthStatus::Unspecified, "flappy", 10).await;
    assert!(!listed[0].flapping);
    let calm = submit(&mut client, run("flappy", "http", "r20", Degraded, 20))
        .await
        .transition
        .unwrap();
    assert!(!calm.flapping);

    let mut quiet = watch(&mut client, 0, false, true).await;
    let seen: Vec<u64> = watched_until(&mut quiet, calm.sequence)
        .await
        .iter()
        .map(|t| t.sequence)
        .collect();
    let mut expected: Vec<u64> = flags.iter().filter(|(_, f)| !f).map(|(s, _)| *s).collect();
    expected.push(calm.sequence);
    assert_eq!(seen, expected);

    // Turning detection off clears the state at once.
    let off = client
        .configure_check(ConfigureCheckRequest {
            system_id: "flappy".into(),
            check_id: "http".into(),
            flapping: Some(proto::FlappingSettings::default()),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .check
        .unwrap();
    assert!(!off.flapping && off.flapping_settings.is_none());
    let err = client
        .configure_check(ConfigureCheckRequest {
            system_id: "flappy".into(),
            check_id: "http".into(),
            flapping: Some(proto::FlappingSettings {
                runs: 200,
                start_changes: 1,
                stop_changes: 5,
            }),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_reason(&err, Code::InvalidArgument, "INVALID_ARGUMENT");
    let mut fields: Vec<String> = err
        .get_details_bad_request()
        .unwrap()
        .field_violations
        .into_iter()
        .map(|v| v.field)
        .collect();
    fields.sort();
    assert_eq!(
        fields,
        ["flapping.runs", "flapping.start_changes", "flapping.stop_changes"]
    );
}

// ---- dependencies ----

async fn depend(client: &mut Client, system: &str, on: &[&str]) -> Result<SystemHealth, tonic::Status> {
    client
        .configure_system(ConfigureSystemRequest {
            system_id: system.into(),
            depends_on: on.iter().map(|s| (*s).to_owned()).collect(),
        })
        .await
        .map(|r| r.into_inner().system_health.unwrap())
}

both_backends!(along_a_chain_of_three_each_outage_names_the_dependency_already_down_and_no_recovery_names_any);
async fn along_a_chain_of_three_each_outage_names_the_dependency_already_down_and_no_recovery_names_any(
    backend: Backend,
) {
    let (_db, _app, mut client) = serve(backend).await;
    for system in ["web", "api", "db"] {
        make_sensitive(&mut client, system, "http").await;
    }
    // web -> api -> db; api also names a system never seen.
    let web = depend(&mut client, "web", &["api"]).await.unwrap();
    assert_eq!(web.depends_on, ["api"]);
    let api = depend(&mut client, "api", &["db", "queue", "db"]).await.unwrap();
    assert_eq!(api.depends_on, ["db", "queue"], "sorted, repeats once");
    assert_eq!(system_health(&mut client, "api").await.depends_on, ["db", "queue"]);

    let db_down = submit(&mut client, run("db", "http", "d0", Degraded, 0))
        .await
        .transition
        .unwrap();
    assert!(db_down.caused_by.is_empty(), "db depends on nothing");
    let api_down = submit(&mut client, run("api", "http", "a0", Degraded, 0))
        .await
        .transition
        .unwrap();
    assert_eq!(api_down.caused_by, ["db"]);
    let web_down = submit(&mut client, run("web", "http", "w0", Degraded, 0))
        .await
        .transition
        .unwrap();
    assert_eq!(web_down.caused_by, ["api"], "the direct dependency");
    // Worse still: still caused by api.
    let web_worse = submit(&mut client, run("web", "http", "w1", Unhealthy, 1))
        .await
        .transition
        .unwrap();
    assert_eq!(
        (web_worse.to_status(), web_worse.caused_by.clone()),
        (Unhealthy, vec!["api".to_owned()])
    );
    // Recoveries never carry it, even while dependencies are still down.
    let web_up = submit(&mut client, run("web", "http", "w2", Healthy, 2))
        .await
        .transition
        .unwrap();
    assert!(web_up.caused_by.is_empty());
    // Once api recovered, a new outage of web is its own.
    submit(&mut client, run("api", "http", "a1", Healthy, 1)).await;
    let web_alone = submit(&mut client, run("web", "http", "w3", Degraded, 3))
        .await
        .transition
        .unwrap();
    assert!(web_alone.caused_by.is_empty());
}

both_backends!(a_dependency_that_would_close_a_cycle_is_refused_naming_depends_on_and_changes_nothing);
async fn a_dependency_that_would_close_a_cycle_is_refused_naming_depends_on_and_changes_nothing(backend: Backend) {
    let (_db, _app, mut client) = serve(backend).await;
    depend(&mut client, "web", &["api"]).await.unwrap();
    depend(&mut client, "api", &["db"]).await.unwrap();
    let fields = |err: tonic::Status| {
        assert_reason(&err, Code::InvalidArgument, "INVALID_ARGUMENT");
        err.get_details_bad_request()
            .unwrap()
            .field_violations
            .into_iter()
            .map(|v| (v.field, v.description))
            .collect::<Vec<_>>()
    };
    let cycle = fields(depend(&mut client, "db", &["web"]).await.unwrap_err());
    assert_eq!(cycle.len(), 1);
    assert_eq!(cycle[0].0, "depends_on");
    assert!(cycle[0].1.ends_with("cycle: db, web, api, db"), "{}", cycle[0].1);
    let own = fields(depend(&mut client, "db", &["db"]).await.unwrap_err());
    assert_eq!(own[0].0, "depends_on");
    let err = client
        .get_system_health(GetSystemHealthRequest { system_id: "db".into() })
        .await
        .unwrap_err();
    assert_reason(&err, Code::NotFound, "SYSTEM_NOT_FOUND");
    // Replacing web's dependency removes the path: db may now depend on web.
    depend(&mut client, "web", &[]).await.unwrap();
    assert_eq!(depend(&mut client, "db", &["web"]).await.unwrap().depends_on, ["web"]);
    let too_many: Vec<String> = (0..33).map(|i| format!("s{i}")).collect();
    let err = client
        .configure_system(ConfigureSystemRequest {
            system_id: "many".into(),
            depends_on: too_many,
        })
        .await
        .unwrap_err();
    assert_eq!(fields(err)[0].0, "depends_on");
}
