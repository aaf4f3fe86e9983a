//! Campaign and ObserveLeader: leadership held like a lock, failing over
//! when the leader's lease ends, and observers on every replica told of
//! each leader once, in order.
//!
//! Waiting is on replies only; the one wait that is not a reply is the
//! lease under test running out (a leader that sends no keep-alive).

use std::time::Duration;

use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Code, Streaming};
use vitals::proto::{self, campaign_request::Action, campaign_response::Event};

use crate::{
    harness::{Backend, PATIENCE, Replicas, TestApp, TestDb, assert_reason},
    withlock::LockClient,
};

/// The lease under test: short, so that a silent leader loses it soon.
const LEASE_FLAGS: [&str; 2] = ["--database-lock-idle-tx-timeout-ms", "1500"];

/// A candidate's open Campaign stream.
struct Candidate {
    requests: mpsc::Sender<proto::CampaignRequest>,
    replies: Streaming<proto::CampaignResponse>,
}

impl Candidate {
    /// Campaigns in `election` with `value`; resolves once elected.
    async fn elected(client: &mut LockClient, election: &str, value: &str) -> (Candidate, proto::Acquired) {
        let (requests, rx) = mpsc::channel(4);
        requests
            .send(proto::CampaignRequest {
                action: Some(Action::Campaign(proto::Campaign {
                    election: election.into(),
                    candidate_value: value.into(),
                    wait_timeout: Some(prost_types::Duration { seconds: 20, nanos: 0 }),
                })),
            })
            .await
            .unwrap();
        let mut replies = client.campaign(ReceiverStream::new(rx)).await.unwrap().into_inner();
        match replies.message().await.unwrap() {
            Some(proto::CampaignResponse {
                event: Some(Event::Elected(elected)),
            }) => (Candidate { requests, replies }, elected),
            other => panic!("expected elected, got {other:?}"),
        }
    }

    /// Resigns; resolves once the server confirmed and ended the stream.
    async fn resign(mut self) {
        self.requests
            .send(proto::CampaignRequest {
                action: Some(Action::Resign(proto::Resign {})),
            })
            .await
            .unwrap();
        assert!(matches!(
            self.replies.message().await.unwrap(),
            Some(proto::CampaignResponse {
                event: Some(Event::Resigned(_))
            })
        ));
        assert!(self.replies.message().await.unwrap().is_none());
    }
}

/// An open ObserveLeader stream.
async fn observe(app: &TestApp, election: &str, after_token: u64) -> Streaming<proto::ObserveLeaderResponse> {
    app.lock_client()
        .await
        .observe_leader(proto::ObserveLeaderRequest {
            election: election.into(),
            after_token,
        })
        .await
        .unwrap()
        .into_inner()
}

/// The next leader an observer is told of: (value, token).
async fn next_leader(observer: &mut Streaming<proto::ObserveLeaderResponse>) -> (String, u64) {
    let reply = tokio::time::timeout(PATIENCE, observer.message())
        .await
        .expect("a leader in time")
        .unwrap()
        .expect("the stream goes on");
    let leader = reply.leader.expect("a leader");
    let expires = std::time::SystemTime::try_from(leader.lease_expires_at.unwrap()).unwrap();
    assert!(
        expires > std::time::SystemTime::now(),
        "a leader whose lease ended was reported"
    );
    (leader.value, leader.fencing_token)
}

both_backends!(multi_thread: a_silent_leader_fails_over_and_observers_on_every_replica_see_each_leader_once_in_order);
async fn a_silent_leader_fails_over_and_observers_on_every_replica_see_each_leader_once_in_order(backend: Backend) {
    let db = TestDb::create(backend).await;
    let replicas = Replicas::start(&db, 2, &LEASE_FLAGS).await;
    let mut on_a = observe(&replicas[0], "leader", 0).await;
    let mut on_b = observe(&replicas[1], "leader", 0).await;

    let (mut a, mut b) = (replicas[0].lock_client().await, replicas[1].lock_client().await);
    let (mut first, elected) = Candidate::elected(&mut a, "leader", "first").await;
    let t1 = elected.fencing_token;
    assert_eq!(next_leader(&mut on_a).await, ("first".into(), t1));
    assert_eq!(next_leader(&mut on_b).await, ("first".into(), t1));

    // The second candidate waits on the other replica while the first
    // leads; the first sends no keep-alive, so its lease runs out.
    let second = tokio::spawn(async move { Candidate::elected(&mut b, "leader", "second").await });
    let lost = tokio::time::timeout(PATIENCE, first.replies.message())
        .await
        .expect("the silent leader hears in time")
        .expect_err("the silent leader loses");
    assert_reason(&lost, Code::Aborted, "LOCK_LOST");
    let (second, elected) = tokio::time::timeout(PATIENCE, second).await.unwrap().unwrap();
    let t2 = elected.fencing_token;
    assert!(t2 > t1);
    // Each observer is told of the second next: the first once only.
    assert_eq!(next_leader(&mut on_a).await, ("second".into(), t2));
    assert_eq!(next_leader(&mut on_b).await, ("second".into(), t2));

    // An observer resuming after the first leader starts with the second.
    let mut resumed = observe(&replicas[1], "leader", t1).await;
    assert_eq!(next_leader(&mut resumed).await, ("second".into(), t2));
    // One resuming after the second waits for the next.
    let mut after_second = observe(&replicas[0], "leader", t2).await;
    second.resign().await;
    let mut c = replicas[0].lock_client().await;
    let (third, elected) = Candidate::elected(&mut c, "leader", "third").await;
    let t3 = elected.fencing_token;
    assert!(t3 > t2);
    for observer in [&mut after_second, &mut on_a, &mut on_b, &mut resumed] {
        assert_eq!(next_leader(observer).await, ("third".into(), t3));
    }
    third.resign().await;
    replicas.stop().await;
}

both_backends!(an_election_and_a_lock_of_the_same_name_do_not_conflict);
async fn an_election_and_a_lock_of_the_same_name_do_not_conflict(backend: Backend) {
    let db = TestDb::create(backend).await;
    let app = TestApp::start(&db, &[]).await;
    let mut client = app.lock_client().await;
    let held = crate::withlock::lock(&mut client, "leader", Some(Duration::ZERO))
        .await
        .unwrap();
    let (leading, _) = Candidate::elected(&mut client, "leader", "me").await;
    leading.resign().await;
    held.release().await;
    app.stop().await;
}
