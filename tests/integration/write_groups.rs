//! Group writes on PostgreSQL: runs of different systems that wait while
//! the writes before them run are stored by one statement, with the same
//! answers, transitions and gap-free sequences as one at a time; a group one
//! member of which is refused is written member by member, so the refusal is
//! that member's alone.
//!
//! Groups form when writes queue: two stalled writes (their systems' rows
//! held by another session) occupy the two group tasks while the writes
//! under test queue behind them, and the stall ends once they all wait.

use std::time::{Duration, Instant};

use chrono::{TimeDelta, Utc};
use sqlx::PgConnection;
use tokio::task::JoinHandle;
use vitals::{
    domain::{CheckId, RunId, RunMessage, Status, SystemId},
    error::Error,
    store::{NewRun, Store, SubmitOutcome, WriteGroups, WriteRules},
};

use crate::harness::{PATIENCE, TestDb, WORK_SESSIONS_BLOCKED, until, until_count};

async fn open_store(db: &TestDb) -> (vitals::db::Database, Store) {
    let config = vitals::Config::from_flags(["--database-url", db.url.as_str()]).unwrap();
    let database = vitals::db::Database::open(&config).await.unwrap();
    database.migrate().await.unwrap();
    let store = Store::open(&database, vitals::store::TransitionNotifier::default());
    (database, store)
}

fn new_run(system: &str, check: &str, run_id: &str, status: Status, seconds_ago: i64) -> NewRun {
    NewRun {
        run_id: RunId::parse("run_id", run_id.into()).unwrap(),
        system_id: SystemId::parse("system_id", system.into()).unwrap(),
        check_id: CheckId::parse("check_id", check.into()).unwrap(),
        status,
        observed_at: Utc::now() - TimeDelta::seconds(seconds_ago),
        observed_at_given: true,
        latency: None,
        message: RunMessage::parse("message", String::new()).unwrap(),
    }
}

async fn submit(store: &Store, run: NewRun) -> SubmitOutcome {
    store.submit_run(&run, &WriteRules::default()).await.unwrap()
}

fn spawn_submit(store: &Store, run: NewRun) -> JoinHandle<Result<SubmitOutcome, Error>> {
    let store = store.clone();
    tokio::spawn(async move { store.submit_run(&run, &WriteRules::default()).await })
}

/// Holds the rows of `systems` in an open transaction of another session.
async fn hold_rows(db: &TestDb, systems: &[&str]) -> PgConnection {
    let mut blocker = db.connect().await;
    sqlx::query("BEGIN").execute(&mut blocker).await.unwrap();
    let held: i64 =
        sqlx::query_scalar("SELECT count(*) FROM (SELECT FROM systems WHERE system_id = ANY($1) FOR UPDATE) s")
            .bind(systems)
            .fetch_one(&mut blocker)
            .await
            .unwrap();
    assert_eq!(held, i64::try_from(systems.len()).unwrap());
    blocker
}

/// Every stored transition's sequence, in order.
async fn sequences(db: &TestDb) -> Vec<i64> {
    sqlx::query_scalar("SELECT sequence FROM transitions ORDER BY sequence")
        .fetch_all(&mut db.connect().await)
        .await
        .unwrap()
}

/// Starts two writes that stall on held rows (filling both group tasks),
/// then `queued`, waits until all of those queue, and ends the stall.
/// Returns the outcomes of `queued`, in order.
async fn queued_behind_a_stall(db: &TestDb, store: &Store, queued: Vec<NewRun>) -> Vec<Result<SubmitOutcome, Error>> {
    for system in ["stall-a", "stall-b"] {
        submit(store, new_run(system, "c", &format!("{system}-0"), Status::Healthy, 60)).await;
    }
    let mut blocker = hold_rows(db, &["stall-a", "stall-b"]).await;
    // One after the other: started together, they would be one group.
    let mut probe = db.connect().await;
    let mut stalled = Vec::new();
    for (tasks, system) in [(1, "stall-a"), (2, "stall-b")] {
        stalled.push(spawn_submit(
            store,
            new_run(system, "c", &format!("{system}-1"), Status::Healthy, 30),
        ));
        until_count(
            &mut probe,
            WORK_SESSIONS_BLOCKED,
            tasks,
            "a group task waits for a held row",
        )
        .await;
    }

    let how_many = queued.len();
    let waiting: Vec<_> = queued.into_iter().map(|run| spawn_submit(store, run)).collect();
    until(PATIENCE, "the writes under test queue for a group", || {
        store.writes_waiting() == how_many
    })
    .await;
    sqlx::query("ROLLBACK").execute(&mut blocker).await.unwrap();

    for stalled in stalled {
        assert!(!stalled.await.unwrap().unwrap().duplicate);
    }
    let mut outcomes = Vec::new();
    for waiting in waiting {
        outcomes.push(
            tokio::time::timeout(Duration::from_secs(30), waiting)
                .await
                .unwrap()
                .unwrap(),
        );
    }
    outcomes
}

#[tokio::test]
async fn runs_of_different_systems_that_queue_are_stored_by_one_statement_with_gap_free_transitions() {
    let db = TestDb::postgres().await;
    let (database, store) = open_store(&db).await;
    // Each system's first failure is a blip; the second degrades it.
    let systems = ["g1", "g2", "g3", "g4"];
    for system in systems {
        submit(
            &store,
            new_run(system, "c", &format!("{system}-0"), Status::Unhealthy, 50),
        )
        .await;
    }
    let before = store.write_groups();
    let queued = systems
        .iter()
        .enumerate()
        .map(|(i, system)| {
            // g4 recovers instead: no transition, in the same group.
            let status = if i == 3 { Status::Healthy } else { Status::Unhealthy };
            new_run(system, "c", &format!("{system}-1"), status, 40)
        })
        .collect();
    let outcomes = queued_behind_a_stall(&db, &store, queued).await;

    let groups = store.write_groups();
    assert_eq!(
        (
            groups.applied - before.applied,
            groups.members - before.members,
            groups.refused
        ),
        (1, 4, 0),
        "one statement stored the four: {groups:?}"
    );
    let mut replied = Vec::new();
    for (system, outcome) in systems.iter().zip(outcomes) {
        let outcome = outcome.unwrap();
        assert!(!outcome.duplicate, "{system}");
        if *system == "g4" {
            assert!(outcome.transition.is_none());
            assert_eq!(outcome.health.status, Status::Healthy);
        } else {
            let transition = outcome.transition.unwrap_or_else(|| panic!("{system} degrades"));
            assert_eq!(transition.system_id, *system);
            assert_eq!(outcome.health.status, Status::Degraded, "{system}");
            replied.push(i64::try_from(transition.sequence).unwrap());
        }
    }
    replied.sort_unstable();
    let stored = sequences(&db).await;
    assert_eq!(
        stored,
        (1..=i64::try_from(stored.len()).unwrap()).collect::<Vec<_>>(),
        "gap-free"
    );
    assert_eq!(replied, stored, "each reply names its own transition, each stored once");
    let runs: i64 = sqlx::query_scalar("SELECT count(*) FROM runs WHERE system_id LIKE 'g%'")
        .fetch_one(&mut db.connect().await)
        .await
        .unwrap();
    assert_eq!(runs, 8);
    database.close().await;
}

#[tokio::test]
async fn a_group_with_a_refused_member_is_written_member_by_member_and_only_that_member_is_refused() {
    let db = TestDb::postgres().await;
    let (database, store) = open_store(&db).await;
    for system in ["r1", "r2", "r3"] {
        submit(
            &store,
            new_run(system, "c", &format!("{system}-0"), Status::Unhealthy, 50),
        )
        .await;
    }
    // r2 stored `taken` for another check: a run of check `c` under that id
    // passes the check's own window and is refused by the runs' key, which
    // refuses the whole statement it is in.
    submit(&store, new_run("r2", "other", "taken", Status::Healthy, 45)).await;
    let queued = vec![
        new_run("r1", "c", "r1-1", Status::Unhealthy, 40),
        new_run("r2", "c", "taken", Status::Unhealthy, 40),
        new_run("r3", "c", "r3-1", Status::Unhealthy, 40),
    ];
    let outcomes = queued_behind_a_stall(&db, &store, queued).await;

    assert_eq!(
        store.write_groups(),
        WriteGroups {
            applied: 0,
            members: 0,
            refused: 1
        }
    );
    let mut outcomes = outcomes.into_iter();
    let first = outcomes.next().unwrap().unwrap();
    let conflict = outcomes.next().unwrap().unwrap_err();
    let third = outcomes.next().unwrap().unwrap();
    assert!(matches!(conflict, Error::RunConflict { .. }), "{conflict:?}");
    let mut replied = Vec::new();
    for outcome in [first, third] {
        assert!(!outcome.duplicate);
        replied.push(i64::try_from(outcome.transition.expect("the second failure degrades").sequence).unwrap());
    }
    replied.sort_unstable();
    assert_eq!(
        sequences(&db).await,
        replied,
        "r2 wrote nothing, and no sequence was skipped"
    );
    let r2_runs: i64 = sqlx::query_scalar("SELECT count(*) FROM runs WHERE system_id = 'r2'")
        .fetch_one(&mut db.connect().await)
        .await
        .unwrap();
    assert_eq!(r2_runs, 2, "the refused run was not stored");
    database.close().await;
}

#[tokio::test]
async fn a_member_whose_row_another_session_holds_is_answered_system_busy_without_holding_up_its_group() {
    let db = TestDb::postgres().await;
    let (database, store) = open_store(&db).await;
    // `a-held` sorts first: the members after it must not wait for it.
    for system in ["a-held", "g1", "g2"] {
        submit(
            &store,
            new_run(system, "c", &format!("{system}-0"), Status::Healthy, 50),
        )
        .await;
    }
    let mut holder = hold_rows(&db, &["a-held"]).await;
    let queued = ["a-held", "g1", "g2"]
        .iter()
        .map(|system| new_run(system, "c", &format!("{system}-1"), Status::Unhealthy, 40))
        .collect();
    let started = Instant::now();
    let outcomes = queued_behind_a_stall(&db, &store, queued).await;
    let took = started.elapsed();
    sqlx::query("ROLLBACK").execute(&mut holder).await.unwrap();

    let mut outcomes = outcomes.into_iter();
    let busy = outcomes.next().unwrap().unwrap_err();
    assert!(matches!(busy, Error::SystemBusy { .. }), "{busy:?}");
    for outcome in outcomes {
        assert!(!outcome.unwrap().duplicate);
    }
    // The work sessions' lock_timeout is 14.75 s: nobody waited for it.
    assert!(took < Duration::from_secs(10), "answered after {took:?}");
    assert_eq!(store.write_groups().refused, 1);
    database.close().await;
}

#[tokio::test]
async fn a_group_task_whose_connection_was_killed_takes_another_for_the_next_group() {
    let db = TestDb::postgres().await;
    let (database, store) = open_store(&db).await;
    for system in ["stall-a", "stall-b", "k1", "k2"] {
        submit(
            &store,
            new_run(system, "c", &format!("{system}-0"), Status::Healthy, 60),
        )
        .await;
    }
    let mut blocker = hold_rows(&db, &["stall-a", "stall-b"]).await;
    let mut probe = db.connect().await;
    let mut stalled = Vec::new();
    for (tasks, system) in [(1, "stall-a"), (2, "stall-b")] {
        stalled.push(spawn_submit(
            &store,
            new_run(system, "c", &format!("{system}-1"), Status::Healthy, 30),
        ));
        until_count(
            &mut probe,
            WORK_SESSIONS_BLOCKED,
            tasks,
            "a group task waits for a held row",
        )
        .await;
    }
    let queued: Vec<_> = ["k1", "k2"]
        .iter()
        .map(|system| {
            spawn_submit(
                &store,
                new_run(system, "c", &format!("{system}-1"), Status::Unhealthy, 40),
            )
        })
        .collect();
    until(PATIENCE, "the writes under test queue for a group", || {
        store.writes_waiting() == 2
    })
    .await;

    // Both group tasks' connections die under their statements.
    let killed: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM (SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
         WHERE datname = current_database() AND application_name = 'vitals-work' AND wait_event_type = 'Lock') k",
    )
    .fetch_one(&mut probe)
    .await
    .unwrap();
    assert_eq!(killed, 2);
    for stalled in stalled {
        let err = stalled.await.unwrap().unwrap_err();
        assert!(matches!(err, Error::DatabaseUnavailable(_)), "{err:?}");
    }
    for waiting in queued {
        let outcome = tokio::time::timeout(Duration::from_secs(30), waiting)
            .await
            .unwrap()
            .unwrap();
        assert!(!outcome.expect("written on another connection").duplicate);
    }
    sqlx::query("ROLLBACK").execute(&mut blocker).await.unwrap();
    database.close().await;
}

#[tokio::test]
async fn transitions_written_in_a_group_carry_the_maintenance_and_dependency_flags_a_write_of_their_own_would() {
    let db = TestDb::postgres().await;
    let (database, store) = open_store(&db).await;
    let id = |s: &str| SystemId::parse("system_id", s.to_owned()).unwrap();
    // `root` is already degraded; `child` depends on it; `quiet` is in a
    // maintenance window that opened a minute ago.
    for run in ["root-0", "root-1"] {
        submit(&store, new_run("root", "c", run, Status::Unhealthy, 60)).await;
    }
    store.configure_system(&id("child"), &[id("root")]).await.unwrap();
    let window = vitals::domain::MaintenanceWindow {
        starts_at: Utc::now() - TimeDelta::minutes(1),
        ends_at: Utc::now() + TimeDelta::hours(1),
        reason: String::new(),
    };
    store.set_maintenance(&id("quiet"), window).await.unwrap();
    for system in ["child", "quiet"] {
        submit(
            &store,
            new_run(system, "c", &format!("{system}-0"), Status::Unhealthy, 50),
        )
        .await;
    }
    let before = store.write_groups();
    let queued = ["child", "quiet"]
        .iter()
        .map(|system| new_run(system, "c", &format!("{system}-1"), Status::Unhealthy, 40))
        .collect();
    let outcomes = queued_behind_a_stall(&db, &store, queued).await;
    let groups = store.write_groups();
    assert_eq!(
        groups.applied - before.applied,
        1,
        "one statement stored both: {groups:?}"
    );
    let mut outcomes = outcomes.into_iter().map(|o| o.unwrap().transition.unwrap());
    let child = outcomes.next().unwrap();
    assert_eq!(
        (child.caused_by.clone(), child.in_maintenance),
        (vec!["root".to_owned()], false)
    );
    let quiet = outcomes.next().unwrap();
    assert_eq!((quiet.caused_by.is_empty(), quiet.in_maintenance), (true, true));
    database.close().await;
}
