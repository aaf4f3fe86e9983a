//! The health features a platform on vitals needs beyond ingestion: finding
//! systems (ListSystems), retiring them (DeleteCheck, DeleteSystem),
//! silencing them (maintenance windows), measuring them (GetUptime), calming
//! them (flapping) and naming the root cause of an outage (dependencies).
//!
//! Every body runs on PostgreSQL and on the embedded store ([`both_backends!`]).

use prost_types::Timestamp;
use tonic::{Code, transport::Channel};
use vitals::proto::{
    ConfigureCheckRequest, DeleteCheckRequest, DeleteSystemRequest, GetSystemHealthRequest, HealthStatus,
    ListRunsRequest, ListSystemsRequest, SubmitRunRequest, SubmitRunResponse, SystemSummary,
    health_check_service_client::HealthCheckServiceClient,
};

use HealthStatus::{Degraded, Healthy, Unhealthy};

use crate::harness::{Backend, TestApp, TestDb, assert_reason};

type Client = HealthCheckServiceClient<Channel>;

// ---- helpers ----

/// Whole seconds an hour ago, so offsets never pass the 5-minute future limit.
fn base_time() -> i64 {
    chrono::Utc::now().timestamp() - 3600
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
