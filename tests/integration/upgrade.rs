//! Upgrading in place: a database written before checks kept their run
//! windows migrates to the same statuses, transitions and ListRuns pages, and
//! goes on evaluating as if it had always kept them.
//!
//! The history is written through the server, then the database is taken back
//! to the schema before the windows migration (its columns, its table and its
//! record in `_sqlx_migrations` removed; the test checks that this is exactly
//! the schema the earlier migrations build). What is left is what the
//! previous version wrote: its rows hold the same values, because a check's
//! evaluation is the same function of its newest 100 runs either way.

use std::borrow::Cow;

use prost_types::Timestamp;
use sqlx::{Connection, Executor, SqliteConnection, migrate::Migrator};
use tonic::transport::Channel;
use vitals::proto::{
    self, ConfigureCheckRequest, EvaluateHealthRequest, GetSystemHealthRequest, HealthStatus, ListRunsRequest,
    ListRunsResponse, ListTransitionsRequest, ListTransitionsResponse, SubmitRunRequest, SubmitRunResponse,
    SystemHealth, Thresholds, health_check_service_client::HealthCheckServiceClient, thresholds::Mode,
};

use HealthStatus::{Degraded, Healthy, Unhealthy};

use crate::harness::{Backend, TestApp, TestDb};

type Client = HealthCheckServiceClient<Channel>;

/// The migration that gives checks their run windows.
const WINDOWS_MIGRATION: i64 = 20_261_203_000_001;

/// Undoes what [`WINDOWS_MIGRATION`] and the migrations after it added on
/// both backends.
const DOWNGRADE: [&str; 17] = [
    "DROP TABLE maintenance_windows",
    "DROP TABLE system_dependencies",
    "ALTER TABLE systems DROP COLUMN created_at",
    "ALTER TABLE systems DROP COLUMN announced_status",
    "ALTER TABLE checks DROP COLUMN flapping_settings",
    "ALTER TABLE checks DROP COLUMN flapping",
    "ALTER TABLE transitions DROP COLUMN in_maintenance",
    "ALTER TABLE transitions DROP COLUMN flapping",
    "ALTER TABLE transitions DROP COLUMN caused_by",
    "ALTER TABLE transitions DROP COLUMN check_deleted",
    "DELETE FROM _sqlx_migrations WHERE version = 20261206000001",
    "ALTER TABLE checks DROP COLUMN run_window",
    "ALTER TABLE systems DROP COLUMN version",
    "DELETE FROM _sqlx_migrations WHERE version = 20261203000001",
    "DROP TABLE deployment_secrets",
    "DELETE FROM _sqlx_migrations WHERE version = 20261204000001",
    "DELETE FROM _sqlx_migrations WHERE version = 20261207000001",
];

/// And on PostgreSQL, which draws transition sequences from a counter (the
/// embedded store's one writer takes max + 1), and where run ids compared in
/// the database's collation before (SQLite's were always byte order).
const DOWNGRADE_POSTGRES: [&str; 6] = [
    "DROP INDEX systems_by_id_bytes",
    "DROP TABLE transition_sequence",
    "DROP TABLE lock_inventory",
    "DROP TABLE lock_replicas",
    "DROP TABLE election_leaders",
    "ALTER TABLE runs ALTER COLUMN run_id TYPE text COLLATE \"default\"",
];

/// And what the migration that keys runs by system and run id changed, on
/// PostgreSQL ...
const DOWNGRADE_RUN_KEY_POSTGRES: [&str; 5] = [
    "DROP INDEX transitions_by_run",
    "CREATE INDEX transitions_by_run ON transitions (run_id) WHERE run_id IS NOT NULL",
    "ALTER TABLE runs DROP CONSTRAINT runs_pkey",
    "ALTER TABLE runs ADD CONSTRAINT runs_pkey PRIMARY KEY (run_id)",
    "DELETE FROM _sqlx_migrations WHERE version = 20261205000001",
];

/// ... and on SQLite, where a table's key changes only by moving its rows.
const DOWNGRADE_RUN_KEY_EMBEDDED: [&str; 9] = [
    "CREATE TABLE runs_keyed_by_id (run_id TEXT PRIMARY KEY NOT NULL, system_id TEXT NOT NULL, \
     check_id TEXT NOT NULL, status INTEGER NOT NULL, observed_at INTEGER NOT NULL, latency_us INTEGER, \
     message TEXT NOT NULL DEFAULT '', recorded_at INTEGER NOT NULL)",
    "INSERT INTO runs_keyed_by_id SELECT run_id, system_id, check_id, status, observed_at, latency_us, message, \
     recorded_at FROM runs",
    "DROP TABLE runs",
    "ALTER TABLE runs_keyed_by_id RENAME TO runs",
    "CREATE INDEX runs_by_check ON runs (system_id, check_id, observed_at DESC, run_id DESC)",
    "CREATE INDEX runs_by_system ON runs (system_id, observed_at DESC, run_id DESC)",
    "DROP INDEX transitions_by_run",
    "CREATE INDEX transitions_by_run ON transitions (run_id) WHERE run_id IS NOT NULL",
    "DELETE FROM _sqlx_migrations WHERE version = 20261205000001",
];

fn base_time() -> i64 {
    chrono::Utc::now().timestamp() - 3600
}

fn run(check: &str, run_id: &str, status: HealthStatus, observed_at: i64) -> SubmitRunRequest {
    SubmitRunRequest {
        run_id: run_id.to_owned(),
        system_id: "legacy".to_owned(),
        check_id: check.to_owned(),
        status: status as i32,
        observed_at: Some(Timestamp {
            seconds: observed_at,
            nanos: 0,
        }),
        latency: None,
        message: String::new(),
    }
}

async fn submit(client: &mut Client, req: SubmitRunRequest) -> SubmitRunResponse {
    client.submit_run(req).await.unwrap().into_inner()
}

/// What clients can read: every system's health, every page of transitions
/// and of runs (system-wide and per check), page tokens included.
#[derive(Debug, PartialEq)]
struct Snapshot {
    health: Vec<SystemHealth>,
    transitions: Vec<ListTransitionsResponse>,
    runs: Vec<ListRunsResponse>,
}

const SYSTEMS: [&str; 2] = ["legacy", "other"];
const CHECKS: [&str; 5] = ["", "http", "late", "ties", "paused"];

impl Snapshot {
    async fn take(client: &mut Client) -> Snapshot {
        let mut health = Vec::new();
        for system in SYSTEMS {
            let reply = client
                .get_system_health(GetSystemHealthRequest {
                    system_id: system.to_owned(),
                })
                .await
                .unwrap()
                .into_inner();
            health.extend(reply.system_health);
        }
        let mut transitions = Vec::new();
        let mut page_token = String::new();
        loop {
            let mut page = client
                .list_transitions(ListTransitionsRequest {
                    system_id: String::new(),
                    page_size: 2,
                    page_token,
                })
                .await
                .unwrap()
                .into_inner();
            // Tokens are signed with the deployment's key, which the
            // downgrade drops with its table: the pages are compared, and
            // how many there are, not the tokens' bytes.
            page_token = std::mem::take(&mut page.next_page_token);
            transitions.push(page);
            if page_token.is_empty() {
                break;
            }
        }
        let mut runs = Vec::new();
        for check in CHECKS {
            let mut page_token = String::new();
            loop {
                let mut page = client
                    .list_runs(ListRunsRequest {
                        system_id: "legacy".to_owned(),
                        check_id: check.to_owned(),
                        page_size: 7,
                        page_token,
                    })
                    .await
                    .unwrap()
                    .into_inner();
                page_token = std::mem::take(&mut page.next_page_token);
                runs.push(page);
                if page_token.is_empty() {
                    break;
                }
            }
        }
        Snapshot {
            health,
            transitions,
            runs,
        }
    }
}

/// Runs `sql` statements on the test database.
async fn execute(db: &TestDb, statements: &[&str]) {
    match db.backend {
        Backend::Postgres => {
            let mut conn = db.connect().await;
            for sql in statements {
                conn.execute(*sql).await.unwrap();
            }
        }
        Backend::Embedded => {
            let mut conn = db.connect_embedded().await;
            for sql in statements {
                conn.execute(*sql).await.unwrap();
            }
            conn.close().await.unwrap();
        }
    }
}

/// The indexes and primary keys of the test database, by table.
async fn indexes(db: &TestDb) -> Vec<(String, String)> {
    match db.backend {
        Backend::Postgres => {
            sqlx::query_as("SELECT tablename::text, indexdef FROM pg_indexes WHERE schemaname = 'public' ORDER BY 1, 2")
                .fetch_all(&mut db.connect().await)
                .await
                .unwrap()
        }
        Backend::Embedded => {
            let mut conn = db.connect_embedded().await;
            let rows = sqlx::query_as(
                "SELECT tbl_name, sql FROM sqlite_master WHERE type = 'index' AND sql IS NOT NULL \
                 UNION ALL \
                 SELECT m.name, 'primary key ' || group_concat(p.name) \
                 FROM sqlite_master m, pragma_table_info(m.name) p \
                 WHERE m.type = 'table' AND p.pk > 0 GROUP BY m.name ORDER BY 1, 2",
            )
            .fetch_all(&mut conn)
            .await
            .unwrap();
            conn.close().await.unwrap();
            rows
        }
    }
}

/// Every check's stored run window, by system and check.
async fn windows(db: &TestDb) -> Vec<(String, String, String)> {
    const SQL: &str = "SELECT system_id, check_id, run_window FROM checks ORDER BY system_id, check_id";
    match db.backend {
        Backend::Postgres => sqlx::query_as(SQL).fetch_all(&mut db.connect().await).await.unwrap(),
        Backend::Embedded => {
            let mut conn = db.connect_embedded().await;
            let rows = sqlx::query_as(SQL).fetch_all(&mut conn).await.unwrap();
            conn.close().await.unwrap();
            rows
        }
    }
}

/// The tables and columns of the test database (with PostgreSQL, a
/// column's collation when it has its own).
async fn schema(db: &TestDb) -> Vec<(String, String)> {
    match db.backend {
        Backend::Postgres => sqlx::query_as(
            "SELECT table_name::text, \
                    concat_ws(' ', column_name::text, data_type::text, 'collate ' || collation_name::text) \
             FROM information_schema.columns WHERE table_schema = 'public' ORDER BY 1, 2",
        )
        .fetch_all(&mut db.connect().await)
        .await
        .unwrap(),
        Backend::Embedded => {
            let mut conn = db.connect_embedded().await;
            let rows = sqlx::query_as(
                "SELECT m.name, p.name || ' ' || p.type FROM sqlite_master m, pragma_table_info(m.name) p \
                 WHERE m.type = 'table' ORDER BY 1, 2",
            )
            .fetch_all(&mut conn)
            .await
            .unwrap();
            conn.close().await.unwrap();
            rows
        }
    }
}

/// A fresh database of `backend` with only the migrations before the windows.
async fn previous_schema(backend: Backend) -> TestDb {
    let keep_earlier = |mut migrator: Migrator| {
        let earlier: Vec<_> = migrator
            .migrations
            .iter()
            .filter(|m| m.version < WINDOWS_MIGRATION)
            .cloned()
            .collect();
        migrator.migrations = Cow::Owned(earlier);
        migrator
    };
    let db = TestDb::create(backend).await;
    match backend {
        Backend::Postgres => {
            let mut conn = db.connect().await;
            keep_earlier(sqlx::migrate!("./migrations/postgres"))
                .run(&mut conn)
                .await
                .unwrap();
        }
        Backend::Embedded => {
            let options = sqlx::sqlite::SqliteConnectOptions::new()
                .filename(db.data_dir().join("vitals.db"))
                .create_if_missing(true);
            let mut conn = SqliteConnection::connect_with(&options).await.unwrap();
            keep_earlier(sqlx::migrate!("./migrations/sqlite"))
                .run(&mut conn)
                .await
                .unwrap();
            conn.close().await.unwrap();
        }
    }
    db
}

/// The evaluation EvaluateHealth gives for the check's newest 100 stored
/// runs with its thresholds: what the check's evaluation must be.
async fn evaluated_from_history(client: &mut Client, check: &proto::CheckHealth) -> Option<proto::Evaluation> {
    let runs = client
        .list_runs(ListRunsRequest {
            system_id: "legacy".to_owned(),
            check_id: check.check_id.clone(),
            page_size: 100,
            page_token: String::new(),
        })
        .await
        .unwrap()
        .into_inner()
        .runs;
    client
        .evaluate_health(EvaluateHealthRequest {
            statuses: runs.iter().map(|r| r.status).collect(),
            thresholds: check.thresholds,
        })
        .await
        .unwrap()
        .into_inner()
        .evaluation
}

/// Every check of `health` is evaluated as EvaluateHealth evaluates its
/// stored runs.
async fn assert_evaluated_from_history(client: &mut Client, health: &SystemHealth) {
    for check in &health.checks {
        assert_eq!(
            check.evaluation,
            evaluated_from_history(client, check).await,
            "check {}",
            check.check_id
        );
    }
}

both_backends!(a_database_written_before_run_windows_migrates_to_the_same_statuses_transitions_and_pages);
async fn a_database_written_before_run_windows_migrates_to_the_same_statuses_transitions_and_pages(backend: Backend) {
    let db = TestDb::create(backend).await;
    let app = TestApp::start(&db, &[]).await;
    let mut client = app.health_client().await;
    let t0 = base_time();

    // `http`: 130 runs, the newest 4 failures: degraded (the window keeps the
    // newest 100 of them).
    for i in 0..130 {
        let status = if i >= 126 { Unhealthy } else { Healthy };
        submit(&mut client, run("http", &format!("h{i:03}"), status, t0 - 1000 + i)).await;
    }
    // `late`: runs arriving out of order.
    for (id, status, second) in [("l3", Unhealthy, 30), ("l1", Healthy, 10), ("l2", Healthy, 20)] {
        submit(&mut client, run("late", id, status, t0 + second)).await;
    }
    // `ties`: window thresholds, and two runs in the same microsecond at the
    // window's edge, where only their order by run id decides.
    client
        .configure_check(ConfigureCheckRequest {
            system_id: "legacy".to_owned(),
            check_id: "ties".to_owned(),
            thresholds: Some(Thresholds {
                mode: Some(Mode::Window(proto::WindowThresholds {
                    window_size: 3,
                    degraded_min_failure_count: 1,
                    unhealthy_min_failure_count: 3,
                })),
            }),
            enabled: None,
            flapping: None,
        })
        .await
        .unwrap();
    for (id, status, second) in [
        ("t-a", Healthy, 1),
        ("t-b", Unhealthy, 1),
        ("t-c", Healthy, 2),
        ("t-d", Healthy, 3),
    ] {
        submit(&mut client, run("ties", id, status, t0 + second)).await;
    }
    // `paused`: configured disabled before its first run, then failing.
    client
        .configure_check(ConfigureCheckRequest {
            system_id: "legacy".to_owned(),
            check_id: "paused".to_owned(),
            thresholds: None,
            enabled: Some(false),
            flapping: None,
        })
        .await
        .unwrap();
    for i in 0..6 {
        submit(&mut client, run("paused", &format!("p{i}"), Unhealthy, t0 + i)).await;
    }
    let mut other = run("one", "o1", Degraded, t0);
    other.system_id = "other".to_owned();
    submit(&mut client, other).await;

    let before = Snapshot::take(&mut client).await;
    assert_eq!(before.health[0].status, Degraded as i32, "{:?}", before.health[0]);
    let windows_built_run_by_run = windows(&db).await;
    app.stop().await;

    match backend {
        Backend::Postgres => execute(&db, &DOWNGRADE_RUN_KEY_POSTGRES).await,
        Backend::Embedded => execute(&db, &DOWNGRADE_RUN_KEY_EMBEDDED).await,
    }
    execute(&db, &DOWNGRADE).await;
    if backend == Backend::Postgres {
        execute(&db, &DOWNGRADE_POSTGRES).await;
    }
    let previous = previous_schema(backend).await;
    assert_eq!(
        schema(&db).await,
        schema(&previous).await,
        "taken back to the schema before the windows"
    );
    assert_eq!(
        indexes(&db).await,
        indexes(&previous).await,
        "with the indexes and keys from before"
    );

    let app = TestApp::start(&db, &[]).await;
    let mut client = app.health_client().await;
    assert_eq!(Snapshot::take(&mut client).await, before);
    assert_eq!(
        windows(&db).await,
        windows_built_run_by_run,
        "the migration builds the windows the runs built one by one"
    );

    // It goes on as if it had always kept the windows. A fifth failure in a
    // row: unhealthy, the next transition in sequence.
    let last_sequence = before.transitions[0].transitions[0].sequence;
    let reply = submit(&mut client, run("http", "h130", Unhealthy, t0)).await;
    let transition = reply.transition.expect("a fifth failure makes the system unhealthy");
    assert_eq!(
        (transition.sequence, transition.from_status, transition.to_status),
        (last_sequence + 1, Degraded as i32, Unhealthy as i32)
    );
    // A late failure slots in next to the newest one: two in a row.
    let reply = submit(&mut client, run("late", "l2b", Unhealthy, t0 + 25)).await;
    let health = reply.system_health.unwrap();
    let late = health.checks.iter().find(|c| c.check_id == "late").unwrap();
    assert_eq!(late.status, Degraded as i32);
    assert_evaluated_from_history(&mut client, &health).await;
    // A run between the tied ones and the newer ones pushes `t-b`, the newer
    // of the tie, out of the window of 3.
    let reply = submit(&mut client, run("ties", "t-e", Healthy, t0 + 2)).await;
    let health = reply.system_health.unwrap();
    let ties = health.checks.iter().find(|c| c.check_id == "ties").unwrap();
    assert_eq!(ties.evaluation.unwrap().failures_in_window, 0);
    assert_evaluated_from_history(&mut client, &health).await;
    // Run ids are now keys within a system: the id `other` used is a new run
    // of `legacy`, and `other`'s own retry is still its duplicate.
    let reply = submit(&mut client, run("one", "o1", Healthy, t0)).await;
    assert!(!reply.duplicate, "another system's run id is a new run here");
    let mut retry = run("one", "o1", Degraded, t0);
    retry.system_id = "other".to_owned();
    assert!(submit(&mut client, retry).await.duplicate);
    app.stop().await;
}
