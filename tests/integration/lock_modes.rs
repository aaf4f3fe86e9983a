//! Shared locks: many shared holders at once, excluded by an exclusive
//! holder, on one replica and across two; writers not starved by readers.
//!
//! Waiting is on something observable: a reply, the server's lock table
//! (where a waiting writer queues) and its shared holders' groups (where a
//! waiting reader counts), or PostgreSQL's `pg_locks`. The one sleep is the
//! duration under test: how long a group of readers admits newcomers before
//! it asks whether a writer of another replica waits.

use std::{
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    time::Duration,
};

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
         AND objsubid = 2 AND granted \
         AND database = (SELECT oid FROM pg_database WHERE datname = current_database())",
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

/// `acquire` of the semaphore `key` of `max` holders.
fn acquire_semaphore(key: &str, wait: Option<Duration>, max: u32) -> vitals::proto::WithLockRequest {
    let mut request = acquire(key, wait);
    if let Some(vitals::proto::with_lock_request::Action::Acquire(acquire)) = &mut request.action {
        acquire.max_holders = max;
    }
    request
}

both_backends!(multi_thread: a_semaphore_of_three_with_ten_contenders_on_two_replicas_never_has_more_than_three_holders);
async fn a_semaphore_of_three_with_ten_contenders_on_two_replicas_never_has_more_than_three_holders(backend: Backend) {
    const CONTENDERS: usize = 10;
    const SECTIONS: usize = 15;
    let db = TestDb::create(backend).await;
    let replicas = Replicas::start(&db, 2, &[]).await;
    let inside = Arc::new(AtomicUsize::new(0));
    let most = Arc::new(AtomicUsize::new(0));
    let tokens = Arc::new(Mutex::new(Vec::new()));
    let done = Arc::new(AtomicBool::new(false));

    // PostgreSQL's view, sampled for as long as the contenders run: granted
    // slot locks of the semaphore.
    let sampler = match backend {
        Backend::Postgres => {
            let mut conn = db.connect().await;
            let slots: Vec<i64> = (0..3)
                .map(|i| vitals::lock::semaphore::slot("pool", i).key_number().unwrap())
                .collect();
            let done = done.clone();
            Some(tokio::spawn(async move {
                let (mut samples, mut most) = (0_u64, 0_i64);
                while !done.load(Ordering::SeqCst) {
                    let held: i64 = sqlx::query_scalar(
                        "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND objsubid = 1 AND granted \
                         AND database = (SELECT oid FROM pg_database WHERE datname = current_database()) \
                         AND ((classid::int8 << 32) | objid::int8) = ANY($1)",
                    )
                    .bind(&slots)
                    .fetch_one(&mut conn)
                    .await
                    .unwrap();
                    most = most.max(held);
                    samples += 1;
                }
                (samples, most)
            }))
        }
        Backend::Embedded => None,
    };

    let mut contenders = Vec::new();
    for i in 0..CONTENDERS {
        let mut client = replicas[i % 2].lock_client().await;
        let (inside, most, tokens) = (inside.clone(), most.clone(), tokens.clone());
        contenders.push(tokio::spawn(async move {
            for _ in 0..SECTIONS {
                let held = lock_with(&mut client, "pool", acquire_semaphore("pool", WAIT, 3))
                    .await
                    .unwrap();
                let now = inside.fetch_add(1, Ordering::SeqCst) + 1;
                most.fetch_max(now, Ordering::SeqCst);
                tokens.lock().unwrap().push(held.token());
                // The critical section's length, under test: long enough
                // that holders overlap.
                tokio::time::sleep(Duration::from_millis(5)).await;
                inside.fetch_sub(1, Ordering::SeqCst);
                held.release().await;
            }
        }));
    }
    for contender in contenders {
        contender.await.unwrap();
    }
    done.store(true, Ordering::SeqCst);
    let most = most.load(Ordering::SeqCst);
    assert!(most <= 3, "{most} holders at once");
    assert_eq!(most, 3, "three holders held it together at some point");
    let mut tokens = std::mem::take(&mut *tokens.lock().unwrap());
    assert_eq!(tokens.len(), CONTENDERS * SECTIONS);
    tokens.sort_unstable();
    tokens.dedup();
    assert_eq!(
        tokens.len(),
        CONTENDERS * SECTIONS,
        "every holder has a token of its own"
    );
    if let Some(sampler) = sampler {
        let (samples, most) = sampler.await.unwrap();
        assert!(samples > 0);
        assert!(most <= 3, "PostgreSQL saw {most} slots held at once");
    }
    replicas.stop().await;
}

both_backends!(an_acquire_naming_another_size_for_a_key_in_use_is_refused);
async fn an_acquire_naming_another_size_for_a_key_in_use_is_refused(backend: Backend) {
    let db = TestDb::create(backend).await;
    let app = TestApp::start(&db, &[]).await;
    let mut client = app.lock_client().await;

    let held = lock_with(&mut client, "pool", acquire_semaphore("pool", WAIT, 3))
        .await
        .unwrap();
    for other in [
        acquire_semaphore("pool", WAIT, 4),
        acquire("pool", WAIT),
        acquire_as("pool", WAIT, vitals::proto::LockMode::Shared),
    ] {
        let refused = match lock_with(&mut client, "pool", other.clone()).await {
            Ok(held) => panic!("{other:?} granted: {:?}", held.acquired),
            Err(status) => status,
        };
        let info = assert_reason(&refused, Code::FailedPrecondition, "LOCK_MODE_MISMATCH");
        assert_eq!(
            info.metadata.get("held_as").map(String::as_str),
            Some("a semaphore of 3")
        );
    }
    // The same size is fine.
    let second = lock_with(&mut client, "pool", acquire_semaphore("pool", WAIT, 3))
        .await
        .unwrap();
    second.release().await;
    held.release().await;

    // Once nobody uses it, the key may be anything.
    let exclusive = lock(&mut client, "pool", WAIT).await.unwrap();
    let refused = lock_with(&mut client, "pool", acquire_semaphore("pool", WAIT, 4))
        .await
        .err()
        .expect("refused");
    assert_reason(&refused, Code::FailedPrecondition, "LOCK_MODE_MISMATCH");
    exclusive.release().await;
    let four = lock_with(&mut client, "pool", acquire_semaphore("pool", WAIT, 4))
        .await
        .unwrap();
    four.release().await;

    // Sizes out of range, and a shared semaphore, are invalid.
    for bad in [acquire_semaphore("pool", WAIT, 257), {
        let mut r = acquire_as("pool", WAIT, vitals::proto::LockMode::Shared);
        if let Some(vitals::proto::with_lock_request::Action::Acquire(a)) = &mut r.action {
            a.max_holders = 2;
        }
        r
    }] {
        let refused = lock_with(&mut client, "pool", bad).await.err().expect("refused");
        assert_reason(&refused, Code::InvalidArgument, "INVALID_ARGUMENT");
    }
    app.stop().await;
}

#[tokio::test]
async fn a_semaphore_of_another_size_than_another_replica_publishes_for_the_key_is_refused() {
    let db = TestDb::create(Backend::Postgres).await;
    let replicas = Replicas::start(&db, 2, &[]).await;
    let (mut a, mut b) = (replicas[0].lock_client().await, replicas[1].lock_client().await);
    let three = lock_with(&mut a, "pool", acquire_semaphore("pool", WAIT, 3))
        .await
        .unwrap();
    let plain = lock(&mut a, "plain", WAIT).await.unwrap();
    // Once the first replica has published its streams.
    for key in ["pool", "plain"] {
        eventually(PATIENCE, &format!("the other replica sees {key:?}"), async || {
            match b.get_lock(vitals::proto::GetLockRequest { key: key.into() }).await {
                Ok(_) => Ok(()),
                Err(status) => Err(format!("{status:?}")),
            }
        })
        .await;
    }
    let refused = lock_with(&mut b, "pool", acquire_semaphore("pool", WAIT, 4))
        .await
        .err()
        .expect("another size is refused");
    let info = assert_reason(&refused, Code::FailedPrecondition, "LOCK_MODE_MISMATCH");
    assert_eq!(
        info.metadata.get("held_as").map(String::as_str),
        Some("a semaphore of 3")
    );
    let refused = lock_with(&mut b, "plain", acquire_semaphore("plain", WAIT, 2))
        .await
        .err()
        .expect("a semaphore of a plain lock's key is refused");
    assert_reason(&refused, Code::FailedPrecondition, "LOCK_MODE_MISMATCH");
    // The same size is granted.
    let second = lock_with(&mut b, "pool", acquire_semaphore("pool", WAIT, 3))
        .await
        .unwrap();
    second.release().await;
    three.release().await;
    plain.release().await;
    replicas.stop().await;
}
