//! What is particular to a store that lives in one data directory —
//! a restart continues where it stopped (run on both backends), and a second
//! process on the same data directory refuses to start (the real binary).

use std::{path::Path, process::Stdio, time::Duration};

use tokio::{
    io::{AsyncBufReadExt, BufReader},
    process::{Child, Command},
};
use vitals::proto::{
    self, GetSystemHealthRequest, HealthStatus, ListRunsRequest, ListTransitionsRequest, SubmitRunRequest,
    WatchTransitionsRequest, WithLockRequest, health_check_service_client::HealthCheckServiceClient,
    lock_service_client::LockServiceClient, with_lock_request::Action, with_lock_response::Event,
};

use crate::harness::{Backend, TestApp, TestDb};

const PATIENCE: Duration = Duration::from_secs(20);

fn run(run_id: &str, status: HealthStatus, seconds: i64) -> SubmitRunRequest {
    SubmitRunRequest {
        run_id: run_id.into(),
        system_id: "restarted".into(),
        check_id: "probe".into(),
        status: status as i32,
        observed_at: Some(prost_types::Timestamp { seconds, nanos: 0 }),
        ..Default::default()
    }
}

/// Takes and releases the lock `key`; returns its fencing token.
async fn fencing_token(client: &mut LockServiceClient<tonic::transport::Channel>, key: &str) -> u64 {
    let messages = [
        WithLockRequest {
            action: Some(Action::Acquire(proto::Acquire {
                key: key.into(),
                wait_timeout: Some(prost_types::Duration { seconds: 5, nanos: 0 }),
                owner: "restart test".into(),
                ..Default::default()
            })),
        },
        WithLockRequest {
            action: Some(Action::Release(proto::Release {})),
        },
    ];
    let mut replies = client
        .with_lock(tokio_stream::iter(messages))
        .await
        .unwrap()
        .into_inner();
    let token = match replies.message().await.unwrap().and_then(|m| m.event) {
        Some(Event::Acquired(acquired)) => acquired.fencing_token,
        other => panic!("expected acquired, got {other:?}"),
    };
    assert!(matches!(
        replies.message().await.unwrap().and_then(|m| m.event),
        Some(Event::Released(_))
    ));
    token
}

both_backends!(after_a_restart_health_runs_transitions_and_fencing_tokens_continue_where_they_were);
async fn after_a_restart_health_runs_transitions_and_fencing_tokens_continue_where_they_were(backend: Backend) {
    let db = TestDb::create(backend).await;
    let t0 = chrono::Utc::now().timestamp() - 3600;
    let app = TestApp::start(&db, &[]).await;
    let mut health = app.health_client().await;
    health.submit_run(run("r0", HealthStatus::Degraded, t0)).await.unwrap();
    let degraded = health
        .submit_run(run("r1", HealthStatus::Unhealthy, t0 + 1))
        .await
        .unwrap()
        .into_inner()
        .transition
        .expect("two failures degrade");
    let mut locks = app.lock_client().await;
    let mut tokens = vec![fencing_token(&mut locks, "restart").await];
    tokens.push(fencing_token(&mut locks, "restart").await);
    let before = health
        .get_system_health(GetSystemHealthRequest {
            system_id: "restarted".into(),
        })
        .await
        .unwrap()
        .into_inner();
    app.stop().await;

    let app = TestApp::start(&db, &[]).await;
    let mut health: HealthCheckServiceClient<_> = app.health_client().await;
    let after = health
        .get_system_health(GetSystemHealthRequest {
            system_id: "restarted".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(after, before, "the stored health is what it was");
    assert_eq!(
        after.system_health.as_ref().map(proto::SystemHealth::status),
        Some(HealthStatus::Degraded)
    );
    let runs = health
        .list_runs(ListRunsRequest {
            system_id: "restarted".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .runs;
    let ids: Vec<_> = runs.iter().map(|r| r.run_id.as_str()).collect();
    assert_eq!(ids, ["r1", "r0"]);
    let again = health
        .submit_run(run("r1", HealthStatus::Unhealthy, t0 + 1))
        .await
        .unwrap()
        .into_inner();
    assert!(again.duplicate, "run ids are remembered across the restart");

    // Three more failures: five in a row, unhealthy. The evaluation counts the
    // runs from before the restart, and the sequence continues.
    let mut unhealthy = None;
    for i in 2..5 {
        let reply = health
            .submit_run(run(&format!("r{i}"), HealthStatus::Unhealthy, t0 + i))
            .await
            .unwrap()
            .into_inner();
        unhealthy = unhealthy.or(reply.transition);
    }
    let unhealthy = unhealthy.expect("the fifth failure makes the system unhealthy");
    assert_eq!(unhealthy.sequence, degraded.sequence + 1);
    assert_eq!(
        (unhealthy.from_status(), unhealthy.to_status()),
        (HealthStatus::Degraded, HealthStatus::Unhealthy)
    );
    let listed: Vec<u64> = health
        .list_transitions(ListTransitionsRequest::default())
        .await
        .unwrap()
        .into_inner()
        .transitions
        .iter()
        .map(|t| t.sequence)
        .collect();
    assert_eq!(listed, [unhealthy.sequence, degraded.sequence]);
    let mut watch = health
        .watch_transitions(WatchTransitionsRequest {
            system_id: "restarted".into(),
            after_sequence: 0,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    for want in [degraded.sequence, unhealthy.sequence] {
        let got = tokio::time::timeout(PATIENCE, watch.message())
            .await
            .expect("the watch replays stored transitions")
            .unwrap()
            .and_then(|m| m.transition)
            .map(|t| t.sequence);
        assert_eq!(got, Some(want));
    }

    let mut locks = app.lock_client().await;
    tokens.push(fencing_token(&mut locks, "restart").await);
    tokens.push(fencing_token(&mut locks, "another key").await);
    assert!(
        tokens.windows(2).all(|w| w[0] < w[1]),
        "fencing tokens do not rise across the restart: {tokens:?}"
    );
    app.stop().await;
}

/// Starts the real binary on the embedded store in `data_dir`, logging to a pipe.
fn spawn_vitals(data_dir: &Path) -> Child {
    spawn_vitals_with(data_dir, &[])
}

/// [`spawn_vitals`] with more flags.
pub fn spawn_vitals_with(data_dir: &Path, flags: &[&std::ffi::OsStr]) -> Child {
    Command::new(env!("CARGO_BIN_EXE_vitals"))
        .args(flags)
        .arg("--listen-addr")
        .arg("127.0.0.1:0")
        // Processes run side by side: metrics on ports of their own too.
        .arg("--metrics-addr")
        .arg("127.0.0.1:0")
        .arg("--data-dir")
        .arg(data_dir)
        // The embedded store is the default: no PostgreSQL may be configured.
        .env_remove("DATABASE_URL")
        .env_remove("PGHOST")
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("start the vitals binary")
}

/// Reads `child`'s log until it listens; returns the lines read. The rest of
/// the log is drained in the background so the child never blocks on it.
async fn until_listening(child: &mut Child) -> Vec<String> {
    let stderr = child.stderr.take().expect("stderr is piped");
    let mut lines = BufReader::new(stderr).lines();
    let mut seen = Vec::new();
    let read = async {
        while let Some(line) = lines.next_line().await.expect("read the log") {
            let listening = line.contains("vitals listening");
            seen.push(line);
            if listening {
                return;
            }
        }
        panic!("vitals exited before listening: {seen:?}");
    };
    tokio::time::timeout(PATIENCE, read)
        .await
        .expect("vitals starts listening");
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    seen
}

#[tokio::test]
async fn a_second_process_on_the_same_data_dir_refuses_to_start_and_says_why() {
    let scratch = tempfile::tempdir().unwrap();
    // Not there yet: the first start creates it.
    let data_dir = scratch.path().join("vitals-data");
    let mut first = spawn_vitals(&data_dir);
    let log = until_listening(&mut first).await;
    assert!(
        log.iter().any(|l| l.contains("single replica")),
        "the start-up log says embedded mode is for a single replica: {log:?}"
    );
    assert!(data_dir.join("vitals.db").is_file(), "the database was created");

    let second = tokio::time::timeout(PATIENCE, spawn_vitals(&data_dir).wait_with_output())
        .await
        .expect("the second process ends")
        .unwrap();
    let stderr = String::from_utf8_lossy(&second.stderr);
    assert!(!second.status.success(), "a second process started: {stderr}");
    assert!(stderr.contains("in use by another vitals process"), "{stderr}");
    assert!(
        stderr.contains(&format!("pid {}", first.id().expect("the first still runs"))),
        "{stderr}"
    );
    assert!(stderr.contains("single replica"), "{stderr}");
    assert!(first.try_wait().unwrap().is_none(), "the first process is undisturbed");

    // Killed without a chance to clean up, the first leaves no stale lock.
    first.kill().await.unwrap();
    let mut third = spawn_vitals(&data_dir);
    until_listening(&mut third).await;
    third.kill().await.unwrap();
}

#[tokio::test]
async fn a_data_dir_that_cannot_be_created_stops_start_up_naming_it() {
    let scratch = tempfile::tempdir().unwrap();
    let not_a_dir = scratch.path().join("a-file");
    std::fs::write(&not_a_dir, b"").unwrap();
    let url = format!("sqlite://{}", not_a_dir.join("vitals.db").display());
    let flags = ["--listen-addr", "127.0.0.1:0", "--database-url", url.as_str()];
    let err = vitals::Application::build(vitals::Config::from_flags(flags).unwrap())
        .await
        .expect_err("the store cannot be created inside a file");
    let message = err.to_string();
    assert!(message.contains("cannot create the data directory"), "{message}");
    assert!(message.contains(&not_a_dir.display().to_string()), "{message}");
}
