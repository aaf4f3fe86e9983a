//! `vitals.v1.LockService`: one WithLock stream is one critical section.
//!
//! The stream's task owns the held lock. Whatever ends the stream (release,
//! half-close, the client vanishing, a lapsed lease, a protocol error)
//! releases the lock right there, before the client is told, so a lock never
//! outlives the client that holds it and a client that retries at once finds
//! it free.

use std::{pin::Pin, time::Duration};

use futures::{Stream, StreamExt};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use super::convert::{Violations, duration_in, duration_out, timestamp_out};
use crate::{
    domain::{FieldViolation, LockKey, Owner},
    error::Error,
    lock::{HeldLock, Locks},
    proto::{self, lock_service_server::LockService, with_lock_request::Action, with_lock_response::Event},
};

/// The handler state.
#[derive(Debug, Clone)]
pub struct LockApi {
    locks: Locks,
}

impl LockApi {
    /// Handlers over `locks`.
    pub fn new(locks: Locks) -> Self {
        LockApi { locks }
    }
}

type LockStream = Pin<Box<dyn Stream<Item = Result<proto::WithLockResponse, Status>> + Send>>;

fn protocol(field: &str, description: &str) -> Status {
    Error::LockProtocol(FieldViolation::new(field, description)).into()
}

fn parse_acquire(acquire: proto::Acquire) -> Result<(LockKey, Option<Duration>, Owner), Error> {
    let mut v = Violations::default();
    let key = v.take(LockKey::parse("acquire.key", acquire.key));
    let wait = match &acquire.wait_timeout {
        None => Some(None),
        Some(d) => v.take(duration_in("acquire.wait_timeout", d)).map(Some),
    };
    let owner = v.take(Owner::parse("acquire.owner", acquire.owner));
    v.finish(|| Some((key?, wait?, owner?)))
}

#[tonic::async_trait]
impl LockService for LockApi {
    type WithLockStream = LockStream;

    async fn with_lock(
        &self,
        request: Request<Streaming<proto::WithLockRequest>>,
    ) -> Result<Response<Self::WithLockStream>, Status> {
        let mut inbound = request.into_inner();
        let first = match inbound.next().await {
            Some(Ok(message)) => message,
            Some(Err(status)) => return Err(status),
            None => return Err(protocol("action", "the stream ended before acquire")),
        };
        let Some(Action::Acquire(acquire)) = first.action else {
            return Err(protocol("action", "the first message must be acquire"));
        };
        let (key, wait, owner) = parse_acquire(acquire)?;
        let held = self.locks.acquire(key, wait).await?;
        tracing::debug!(
            key = held.key().as_str(),
            owner = owner.as_str(),
            token = held.fencing_token,
            "lock granted"
        );

        let lease = self.locks.lease();
        let (tx, rx) = mpsc::channel(4);
        let acquired = proto::WithLockResponse {
            event: Some(Event::Acquired(proto::Acquired {
                fencing_token: held.fencing_token,
                acquired_at: Some(timestamp_out(held.acquired_at)),
                lease: Some(duration_out(lease)),
            })),
        };
        // Capacity 4 and nothing queued yet: this cannot fail for lack of room.
        let _ = tx.try_send(Ok(acquired));
        tokio::spawn(hold(held, inbound, tx, lease));
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}

/// Serves one held lock until it is released or lost.
async fn hold(
    mut held: HeldLock,
    mut inbound: Streaming<proto::WithLockRequest>,
    tx: mpsc::Sender<Result<proto::WithLockResponse, Status>>,
    lease: Duration,
) {
    loop {
        let next = tokio::select! {
            next = tokio::time::timeout(lease, inbound.next()) => next,
            // The client reset the stream: nobody is listening, let go now.
            () = tx.closed() => return let_go(held).await,
        };
        match next {
            Err(_elapsed) => {
                let lost = held.lost("no keep_alive or release within the lease");
                let_go(held).await;
                let _ = tx.send(Err(lost.into())).await;
                return;
            }
            // Release, or half-close: the critical section is over.
            Ok(
                None
                | Some(Ok(proto::WithLockRequest {
                    action: Some(Action::Release(_)),
                })),
            ) => {
                let reply = match held.release().await {
                    Ok(held_for) => Ok(proto::WithLockResponse {
                        event: Some(Event::Released(proto::Released {
                            held_for: Some(duration_out(held_for)),
                        })),
                    }),
                    Err(err) => Err(err.into()),
                };
                let _ = tx.send(reply).await;
                return;
            }
            Ok(Some(Ok(proto::WithLockRequest {
                action: Some(Action::KeepAlive(_)),
            }))) => {
                if let Err(err) = held.keep_alive().await {
                    let _ = tx.send(Err(err.into())).await;
                    return;
                }
            }
            Ok(Some(Ok(proto::WithLockRequest {
                action: Some(Action::Acquire(_)),
            }))) => {
                let_go(held).await;
                let _ = tx
                    .send(Err(protocol("action", "acquire was already sent on this stream")))
                    .await;
                return;
            }
            Ok(Some(Ok(proto::WithLockRequest { action: None }))) => {
                let_go(held).await;
                let _ = tx
                    .send(Err(
                        Error::invalid("action", "set acquire, keep_alive or release").into()
                    ))
                    .await;
                return;
            }
            // The client's stream broke (cancel, disconnect).
            Ok(Some(Err(_))) => return let_go(held).await,
        }
    }
}

/// Releases a lock the stream is ending without a `released` reply, before
/// the client hears why: a client that retries at once finds it free. If the
/// rollback fails the session is closed, which frees the lock as well.
async fn let_go(held: HeldLock) {
    if let Err(err) = held.release().await {
        tracing::debug!(error = %err, "lock session already gone when letting go");
    }
}
