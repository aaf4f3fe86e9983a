//! Shared locks: many shared holders at once, excluded by an exclusive
//! holder, on one replica and across two; writers not starved by readers.
//!
//! Waiting is on something observable: a reply, the server's lock table
//! (where a waiting writer queues) and its shared holders' groups (where a
//! waiting reader counts), or PostgreSQL's `pg_locks`. The one sleep is the
//! duration under test: how long a group of readers admits newcomers before
//! it asks whether a writer of another replica waits.

use std::time::Duration;

use tonic::Code;
use vitals::lock::table::MAX_STREAK;

use crate::{
    harness::{Backend, PATIENCE, Replicas, TestApp, TestDb, assert_reason, eventually},
    withlock::{Held, acquire, acquire_as, lock, lock_shared, lock_with},
};

const WAIT: Option<Duration> = Some(Duration::from_secs(20));

/// Returns once `app` counts `holders` shared holders of `key` and `waiting`
/// shared acquirers waiting for it.
async fn until_shared(app: &TestApp, key: &str, holders: usize, waiting: usize) {
    eventually(
        PATIENCE,
        &format!("{key:?} has {holders} shared holder(s) and {waiting} waiting"),
        async || {
            let stats = app.locks().shared_stats(key);
            if stats == (holders, waiting) {
                Ok(())
            } else {
                Err(format!("{stats:?}"))
            }
        },
    )
    .await;
}

/// Returns once `n` acquirers queue in `app`'s lock table.
async fn until_queued(app: &TestApp, n: usize) {
    eventually(PATIENCE, &format!("{n} acquirer(s) queue"), async || {
        let stats = app.local_lock_stats();
        if stats.waiting == n {
            Ok(())
        } else {
            Err(format!("{stats:?}"))
        }
    })
    .await;
}

/// An acquire that waits, in a task of its own: a WithLock stream's
/// headers arrive with its grant.
type Waiting = tokio::task::JoinHandle<Held>;

/// Starts `first` (an acquire of `key`) on `app`; its grant is read later.
async fn waiting(app: &TestApp, key: &str, first: vitals::proto::WithLockRequest) -> Waiting {
    let mut client = app.lock_client().await;
    let key = key.to_owned();
    tokio::spawn(async move { lock_with(&mut client, &key, first).await.expect("granted") })
}

/// The grant of a waiting acquire.
async fn granted(waiting: Waiting) -> Held {
    tokio::time::timeout(PATIENCE, waiting)
        .await
        .expect("granted in time")
        .expect("the acquirer did not panic")
}

both_backends!(shared_holders_hold_a_key_together_across_replicas_and_exclude_an_exclusive_holder);
async fn shared_holders_hold_a_key_together_across_replicas_and_exclude_an_exclusive_holder(backend: Backend) {
    let db = TestDb::create(backend).await;
    let replicas = Replicas::start(&db, 2, &[]).await;
    let (mut a, mut b) = (replicas[0].lock_client().await, replicas[1].lock_client().await);

    let before = lock(&mut a, "doc", WAIT).await.unwrap();
    let before_token = before.token();
    before.release().await;

    let r1 = lock_shared(&mut a, "doc", Some(Duration::ZERO)).await.unwrap();
    let r2 = lock_shared(&mut b, "doc", Some(Duration::ZERO)).await.unwrap();
    let r3 = lock_shared(&mut a, "doc", Some(Duration::ZERO)).await.unwrap();
    assert!(r1.token() > before_token && r2.token() > before_token && r3.token() > before_token);
    let mut tokens = vec![r1.token(), r2.token(), r3.token()];
    tokens.sort_unstable();
    tokens.dedup();
    assert_eq!(tokens.len(), 3, "every shared holder has a token of its own");

    // An exclusive try fails on both replicas while readers hold the key.
    for client in [&mut a, &mut b] {
        let refused = lock(client, "doc", Some(Duration::ZERO)).await.err().expect("refused");
        assert_reason(&refused, Code::Aborted, "LOCK_NOT_AVAILABLE");
    }

    // A waiting writer is granted once the last reader has gone, with a
    // token above every reader's.
    let writer = waiting(&replicas[1], "doc", acquire("doc", WAIT)).await;
    r1.release().await;
    r3.release().await;
    r2.release().await;
    let writer = granted(writer).await;
    assert!(writer.token() > tokens[2]);

    // And a reader waits for the writer.
    let refused = lock_shared(&mut a, "doc", Some(Duration::ZERO))
        .await
        .err()
        .expect("refused");
    assert_reason(&refused, Code::Aborted, "LOCK_NOT_AVAILABLE");
    let reader = waiting(
        &replicas[0],
        "doc",
        acquire_as("doc", WAIT, vitals::proto::LockMode::Shared),
    )
    .await;
    let writer_token = writer.token();
    writer.release().await;
    let reader = granted(reader).await;
    assert!(reader.token() > writer_token);
    reader.release().await;
    replicas.stop().await;
}

both_backends!(a_writer_waiting_for_a_shared_key_goes_before_readers_that_arrive_after_it);
async fn a_writer_waiting_for_a_shared_key_goes_before_readers_that_arrive_after_it(backend: Backend) {
    let db = TestDb::create(backend).await;
    let app = TestApp::start(&db, &[]).await;
    let mut client = app.lock_client().await;

    let first = lock_shared(&mut client, "doc", WAIT).await.unwrap();
    let writer = waiting(&app, "doc", acquire("doc", WAIT)).await;
    until_queued(&app, 1).await;
    // A reader arriving now would be let in by the readers, but a writer waits.
    let late = waiting(&app, "doc", acquire_as("doc", WAIT, vitals::proto::LockMode::Shared)).await;
    until_shared(&app, "doc", 1, 1).await;

    first.release().await;
    let writer = granted(writer).await;
    // The late reader still waits, behind the writer.
    assert_eq!(app.locks().shared_stats("doc"), (0, 1));
    writer.release().await;
    let late = granted(late).await;
    late.release().await;
    app.stop().await;
}

both_backends!(readers_waiting_behind_a_writer_are_all_let_in_together_when_it_leaves);
async fn readers_waiting_behind_a_writer_are_all_let_in_together_when_it_leaves(backend: Backend) {
    let db = TestDb::create(backend).await;
    let app = TestApp::start(&db, &[]).await;
    let mut client = app.lock_client().await;

    let writer = lock(&mut client, "doc", WAIT).await.unwrap();
    let mut readers = Vec::new();
    for _ in 0..5 {
        readers.push(waiting(&app, "doc", acquire_as("doc", WAIT, vitals::proto::LockMode::Shared)).await);
    }
    // One of them queues in the table for the group, the others wait for it.
    until_shared(&app, "doc", 0, 5).await;
    // A second writer arrives after them.
    let second = waiting(&app, "doc", acquire("doc", WAIT)).await;
    until_queued(&app, 2).await;
    writer.release().await;

    let mut held = Vec::new();
    for reader in readers {
        held.push(granted(reader).await);
    }
    assert_eq!(
        app.locks().shared_stats("doc"),
        (5, 0),
        "all five readers hold the key together"
    );
    for reader in held {
        reader.release().await;
    }
    let second = granted(second).await;
    second.release().await;
    app.stop().await;
}

#[tokio::test]
async fn a_writer_on_another_replica_closes_the_door_to_later_readers_after_a_streak() {
    let db = TestDb::create(Backend::Postgres).await;
    let replicas = Replicas::start(&db, 2, &[]).await;
    let (a, b) = (&replicas[0], &replicas[1]);
    let mut client_a = a.lock_client().await;

    let first = lock_shared(&mut client_a, "doc", WAIT).await.unwrap();
    let writer = waiting(b, "doc", acquire("doc", WAIT)).await;
    // The writer announces that it waits: a shared interest lock of its
    // session on top of the readers' group's own.
    let mut conn = db.connect().await;
    crate::harness::until_count(
        &mut conn,
        "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND classid::int8 = 1986622583 \
         AND objsubid = 2 AND granted",
        1,
        "the writer's interest lock",
    )
    .await;
    // Readers arriving within a streak of the grant join; once it is over,
    // the group asks whether a writer waits, and closes its door.
    tokio::time::sleep(MAX_STREAK).await;
    let late = waiting(a, "doc", acquire_as("doc", WAIT, vitals::proto::LockMode::Shared)).await;
    until_shared(a, "doc", 1, 1).await;

    first.release().await;
    // Had the late reader joined, the writer would never be granted here.
    let writer = granted(writer).await;
    assert_eq!(a.locks().shared_stats("doc"), (0, 1));
    writer.release().await;
    let late = granted(late).await;
    late.release().await;
    replicas.stop().await;
}
