//! ListLocks and GetLock: every replica lists the locks held on every
//! replica, with their holders, tokens, leases and waiters.
//!
//! Another replica's locks are published every 250 ms: the tests wait for
//! them with a bounded poll of the listing, never a sleep.

use std::time::Duration;

use tonic::Code;
use vitals::proto::{self, LockMode, with_lock_request::Action};

use crate::{
    harness::{Backend, PATIENCE, Replicas, TestApp, TestDb, assert_reason, eventually},
    withlock::{LockClient, acquire, acquire_as, lock_with},
};

const WAIT: Option<Duration> = Some(Duration::from_secs(20));

/// `request` with `owner` as its acquire's owner (and `max_holders`).
fn as_owner(mut request: proto::WithLockRequest, owner: &str, max_holders: u32) -> proto::WithLockRequest {
    if let Some(Action::Acquire(acquire)) = &mut request.action {
        acquire.owner = owner.into();
        acquire.max_holders = max_holders;
    }
    request
}

/// Every page of ListLocks of `prefix`, `page_size` keys per page.
async fn list_all(client: &mut LockClient, prefix: &str, page_size: i32) -> Vec<Vec<proto::LockInfo>> {
    let mut pages = Vec::new();
    let mut page_token = String::new();
    loop {
        let page = client
            .list_locks(proto::ListLocksRequest {
                key_prefix: prefix.into(),
                page_size,
                page_token,
            })
            .await
            .expect("ListLocks answers")
            .into_inner();
        pages.push(page.locks);
        if page.next_page_token.is_empty() {
            return pages;
        }
        page_token = page.next_page_token;
    }
}

/// What a listing says of a key: (key, mode, max_holders, [(owner, replica)], waiters).
type Summary = (String, i32, u32, Vec<(String, String)>, u32);

fn summary(info: &proto::LockInfo) -> Summary {
    let mut holders: Vec<(String, String)> = info
        .holders
        .iter()
        .map(|h| (h.owner.clone(), h.replica.clone()))
        .collect();
    holders.sort();
    (info.key.clone(), info.mode, info.max_holders, holders, info.waiters)
}

both_backends!(every_replica_lists_the_locks_held_on_every_replica_with_their_holders_and_waiters);
async fn every_replica_lists_the_locks_held_on_every_replica_with_their_holders_and_waiters(backend: Backend) {
    let db = TestDb::create(backend).await;
    let replicas = Replicas::start(&db, 2, &[]).await;
    let (ra, rb) = (
        replicas[0].locks().replica().to_owned(),
        replicas[1].locks().replica().to_owned(),
    );
    let (mut a, mut b) = (replicas[0].lock_client().await, replicas[1].lock_client().await);

    let x = lock_with(&mut a, "inv/x", as_owner(acquire("inv/x", WAIT), "alice", 0))
        .await
        .unwrap();
    let y1 = lock_with(
        &mut b,
        "inv/y",
        as_owner(acquire_as("inv/y", WAIT, LockMode::Shared), "bob", 0),
    )
    .await
    .unwrap();
    let y2 = lock_with(
        &mut a,
        "inv/y",
        as_owner(acquire_as("inv/y", WAIT, LockMode::Shared), "carol", 0),
    )
    .await
    .unwrap();
    let z = lock_with(&mut b, "inv/z", as_owner(acquire("inv/z", WAIT), "dave", 3))
        .await
        .unwrap();
    let outside = lock_with(&mut a, "other/q", acquire("other/q", WAIT)).await.unwrap();
    // A waiter for inv/x on the other replica.
    let mut waiter_client = replicas[1].lock_client().await;
    let waiter = tokio::spawn(async move {
        lock_with(&mut waiter_client, "inv/x", as_owner(acquire("inv/x", WAIT), "erin", 0))
            .await
            .unwrap()
    });

    let expected: Vec<Summary> = vec![
        (
            "inv/x".into(),
            LockMode::Exclusive as i32,
            0,
            vec![("alice".into(), ra.clone())],
            1,
        ),
        (
            "inv/y".into(),
            LockMode::Shared as i32,
            0,
            vec![("bob".into(), rb.clone()), ("carol".into(), ra.clone())],
            0,
        ),
        (
            "inv/z".into(),
            LockMode::Exclusive as i32,
            3,
            vec![("dave".into(), rb.clone())],
            0,
        ),
    ];
    for (name, client) in [("a", &mut a), ("b", &mut b)] {
        eventually(
            PATIENCE,
            &format!("replica {name} lists every replica's locks"),
            async || {
                let pages = list_all(client, "inv/", 0).await;
                let got: Vec<Summary> = pages.concat().iter().map(summary).collect();
                if got == expected {
                    Ok(())
                } else {
                    Err(format!("{got:?}"))
                }
            },
        )
        .await;
        // One key per page: three pages, in key order.
        let pages = list_all(client, "inv/", 1).await;
        let keys: Vec<Vec<String>> = pages
            .iter()
            .map(|p| p.iter().map(|l| l.key.clone()).collect())
            .collect();
        assert_eq!(keys, [vec!["inv/x"], vec!["inv/y"], vec!["inv/z"]]);
    }

    let got = a
        .get_lock(proto::GetLockRequest { key: "inv/x".into() })
        .await
        .unwrap()
        .into_inner()
        .lock
        .unwrap();
    let holder = &got.holders[0];
    assert_eq!(holder.fencing_token, x.token());
    // Listings keep microseconds.
    let micros = |t: Option<prost_types::Timestamp>| t.map(|t| (t.seconds, t.nanos / 1000));
    assert_eq!(micros(holder.acquired_at), micros(x.acquired.acquired_at));
    let acquired = std::time::SystemTime::try_from(holder.acquired_at.unwrap()).unwrap();
    let expires = std::time::SystemTime::try_from(holder.lease_expires_at.unwrap()).unwrap();
    assert!(expires > acquired);
    assert_eq!(got.waiters, 1);
    let tokens: Vec<u64> = list_all(&mut b, "inv/y", 0).await.concat()[0]
        .holders
        .iter()
        .map(|h| h.fencing_token)
        .collect();
    let mut own = vec![y1.token(), y2.token()];
    own.sort_unstable();
    assert_eq!(tokens, own, "holders in token order");

    let refused = b
        .get_lock(proto::GetLockRequest { key: "inv/none".into() })
        .await
        .unwrap_err();
    assert_reason(&refused, Code::NotFound, "LOCK_NOT_HELD");

    x.release().await;
    let erin = tokio::time::timeout(PATIENCE, waiter).await.unwrap().unwrap();
    for held in [erin, y1, y2, z, outside] {
        held.release().await;
    }
    for (name, client) in [("a", &mut a), ("b", &mut b)] {
        eventually(
            PATIENCE,
            &format!("replica {name} lists nothing once all is released"),
            async || {
                let pages = list_all(client, "", 0).await;
                if pages.concat().is_empty() {
                    Ok(())
                } else {
                    Err(format!("{pages:?}"))
                }
            },
        )
        .await;
    }
    replicas.stop().await;
}

/// A replica with a fixed name that crashed leaves its published rows; the
/// one restarted under that name must not keep them alive by saying, under
/// the same name, that it is alive.
#[tokio::test]
async fn a_replica_restarted_under_its_name_drops_the_rows_its_predecessor_left() {
    let db = TestDb::postgres().await;
    let b = TestApp::start(&db, &[]).await;
    let mut sql = db.connect().await;
    sqlx::query("INSERT INTO lock_replicas (replica, seen_at) VALUES ('fixed', now())")
        .execute(&mut sql)
        .await
        .unwrap();
    sqlx::query(
        "INSERT INTO lock_inventory VALUES ('fixed', 1000000, 'inv/ghost', 'gone', 'exclusive', true, 7, 0, \
         (extract(epoch FROM now()) * 1000000)::int8 + 3600000000)",
    )
    .execute(&mut sql)
    .await
    .unwrap();
    let a = TestApp::start(&db, &["--replica-name", "fixed"]).await;
    let mut on_a = a.lock_client().await;
    let held = lock_with(&mut on_a, "inv/real", acquire("inv/real", WAIT))
        .await
        .unwrap();
    let mut on_b = b.lock_client().await;
    eventually(
        PATIENCE,
        "the other replica lists what `fixed` holds now, only",
        async || {
            let keys: Vec<String> = list_all(&mut on_b, "inv/", 100)
                .await
                .concat()
                .into_iter()
                .map(|l| l.key)
                .collect();
            if keys == ["inv/real"] {
                Ok(())
            } else {
                Err(format!("{keys:?}"))
            }
        },
    )
    .await;
    held.release().await;
    a.stop().await;
    b.stop().await;
}
