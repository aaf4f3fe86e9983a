//! A WithLock client, the way a service using vitals would write one, shared
//! by the lock test modules: the messages it sends, an open stream, a granted
//! lock.

use std::time::{Duration, SystemTime};

use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Status, Streaming, transport::Channel};
use vitals::proto::{
    self, lock_service_client::LockServiceClient, with_lock_request::Action, with_lock_response::Event,
};

/// A LockService client on a test server.
pub type LockClient = LockServiceClient<Channel>;

/// `acquire` of `key`, waiting at most `wait` (`None`: the server's default).
pub fn acquire(key: &str, wait: Option<Duration>) -> proto::WithLockRequest {
    proto::WithLockRequest {
        action: Some(Action::Acquire(proto::Acquire {
            key: key.into(),
            wait_timeout: wait.map(|d| prost_types::Duration::try_from(d).expect("a representable duration")),
            owner: "vitals integration tests".into(),
            ..Default::default()
        })),
    }
}

/// `acquire` of `key` in `mode`, waiting at most `wait`.
pub fn acquire_as(key: &str, wait: Option<Duration>, mode: proto::LockMode) -> proto::WithLockRequest {
    let mut request = acquire(key, wait);
    if let Some(Action::Acquire(acquire)) = &mut request.action {
        acquire.mode = mode as i32;
    }
    request
}

/// `keep_alive`.
pub fn keep_alive() -> proto::WithLockRequest {
    proto::WithLockRequest {
        action: Some(Action::KeepAlive(proto::KeepAlive {})),
    }
}

/// `release`.
pub fn release() -> proto::WithLockRequest {
    proto::WithLockRequest {
        action: Some(Action::Release(proto::Release {})),
    }
}

/// A SubmitRun of a healthy run of check `c`, for tests that mix runs and locks.
pub fn submit(run_id: &str, system_id: &str) -> proto::SubmitRunRequest {
    proto::SubmitRunRequest {
        run_id: run_id.into(),
        system_id: system_id.into(),
        check_id: "c".into(),
        status: proto::HealthStatus::Healthy as i32,
        ..Default::default()
    }
}

/// A proto duration as a std one; it must be set and non-negative.
pub fn std_duration(d: Option<prost_types::Duration>) -> Duration {
    Duration::try_from(d.expect("a duration is set")).expect("a non-negative duration")
}

/// One open WithLock stream.
pub struct LockStream {
    /// What the client sends; dropping it half-closes the stream.
    pub requests: mpsc::Sender<proto::WithLockRequest>,
    pub replies: Streaming<proto::WithLockResponse>,
}

impl LockStream {
    /// Opens a stream whose first message is `first`; resolves once the
    /// server has decided about it (headers, or an error).
    pub async fn open(client: &mut LockClient, first: proto::WithLockRequest) -> Result<LockStream, Status> {
        let (requests, rx) = mpsc::channel(8);
        requests.send(first).await.expect("the channel is open");
        let replies = client.with_lock(ReceiverStream::new(rx)).await?.into_inner();
        Ok(LockStream { requests, replies })
    }

    pub async fn send(&self, request: proto::WithLockRequest) {
        self.requests.send(request).await.expect("the stream is still open");
    }

    /// The next server event; `None` when the stream ended OK.
    pub async fn next(&mut self) -> Result<Option<Event>, Status> {
        Ok(self
            .replies
            .message()
            .await?
            .map(|m| m.event.expect("every reply carries an event")))
    }
}

/// A granted lock on its open stream.
pub struct Held {
    pub key: String,
    /// The server's `acquired`: fencing token, lease, times.
    pub acquired: proto::Acquired,
    pub stream: LockStream,
}

/// Takes `key`, waiting at most `wait` (`None`: the server's default);
/// resolves once `acquired` has arrived.
pub async fn lock(client: &mut LockClient, key: &str, wait: Option<Duration>) -> Result<Held, Status> {
    let mut stream = LockStream::open(client, acquire(key, wait)).await?;
    match stream.next().await? {
        Some(Event::Acquired(acquired)) => Ok(Held {
            key: key.to_owned(),
            acquired,
            stream,
        }),
        other => panic!("expected acquired for {key:?}, got {other:?}"),
    }
}

/// Takes `key` shared, waiting at most `wait`; resolves once `acquired` has arrived.
pub async fn lock_shared(client: &mut LockClient, key: &str, wait: Option<Duration>) -> Result<Held, Status> {
    lock_with(client, key, acquire_as(key, wait, proto::LockMode::Shared)).await
}

/// Opens a stream with `first` (an acquire of `key`); resolves once `acquired` has arrived.
pub async fn lock_with(client: &mut LockClient, key: &str, first: proto::WithLockRequest) -> Result<Held, Status> {
    let mut stream = LockStream::open(client, first).await?;
    match stream.next().await? {
        Some(Event::Acquired(acquired)) => Ok(Held {
            key: key.to_owned(),
            acquired,
            stream,
        }),
        other => panic!("expected acquired for {key:?}, got {other:?}"),
    }
}

impl Held {
    pub fn token(&self) -> u64 {
        self.acquired.fencing_token
    }

    /// Sends keep_alive and returns the `lease_expires_at` of the one
    /// `kept_alive` the server answers it with: the lock is still held.
    pub async fn keep_alive(&mut self) -> SystemTime {
        self.stream.send(keep_alive()).await;
        match self.stream.next().await {
            Ok(Some(Event::KeptAlive(kept))) => {
                let at = kept.lease_expires_at.expect("kept_alive carries lease_expires_at");
                SystemTime::try_from(at).expect("a representable lease_expires_at")
            }
            other => panic!("{:?} is still held: expected kept_alive, got {other:?}", self.key),
        }
    }

    /// Sends release and returns `held_for` once the server has confirmed
    /// and ended the stream OK. Anything else before `released` (an
    /// unread `kept_alive`, say) fails the test.
    pub async fn release(mut self) -> Duration {
        self.stream.send(release()).await;
        let held_for = match self.stream.next().await {
            Ok(Some(Event::Released(released))) => std_duration(released.held_for),
            other => panic!("expected released for {:?}, got {other:?}", self.key),
        };
        assert!(
            matches!(self.stream.next().await, Ok(None)),
            "the stream of {:?} ends OK after released",
            self.key
        );
        held_for
    }
}
