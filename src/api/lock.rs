//! `vitals.v1.LockService`: one WithLock stream is one critical section.
//!
//! The stream's task owns the held lock. Whatever ends the stream (release,
//! half-close, the client vanishing, a lapsed lease, a protocol error,
//! shutdown) releases the lock right there, before the client is told, so a
//! lock never outlives the client that holds it and a client that retries at
//! once finds it free. A lock lost underneath (its PostgreSQL session broke
//! or could not prove it was alive) is reported the moment it is known.
//!
//! Every stream is bounded: it holds a place in the client budget
//! (`VITALS_MAX_LOCKS`) from its first byte, must send `acquire` within
//! [`ACQUIRE_MESSAGE_TIMEOUT`], waits at most `VITALS_MAX_LOCK_WAIT_MS`, and
//! ends with `SHUTTING_DOWN` once the shutdown grace is over.

use std::{pin::Pin, time::Duration};

use futures::{Stream, StreamExt};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use super::convert::{Violations, duration_in, duration_out, timestamp_out};
use crate::{
    domain::{FieldViolation, LockKey, Owner},
    error::Error,
    lock::{ACQUIRE_MESSAGE_TIMEOUT, HeldLock, Locks},
    proto::{self, lock_service_server::LockService, with_lock_request::Action, with_lock_response::Event},
};
use chrono::Utc;

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
        let permit = self.locks.admit()?;
        let mut inbound = request.into_inner();
        let shutdown = self.locks.shutting_down();
        tokio::pin!(shutdown);
        let first = tokio::select! {
            first = tokio::time::timeout(ACQUIRE_MESSAGE_TIMEOUT, inbound.next()) => first,
            () = &mut shutdown => return Err(Error::ShuttingDown.into()),
        };
        let first = match first {
            Ok(Some(Ok(message))) => message,
            Ok(Some(Err(status))) => return Err(status),
            Ok(None) => return Err(protocol("action", "the stream ended before acquire")),
            Err(_elapsed) => {
                return Err(protocol(
                    "action",
                    "acquire must be sent within 5 seconds of opening the stream",
                ));
            }
        };
        let Some(Action::Acquire(acquire)) = first.action else {
            return Err(protocol("action", "the first message must be acquire"));
        };
        let (key, wait, owner) = parse_acquire(acquire)?;
        let held = tokio::select! {
            held = self.locks.acquire(permit, key, wait) => held?,
            () = &mut shutdown => return Err(Error::ShuttingDown.into()),
        };
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
        tokio::spawn(hold(held, inbound, tx, lease, self.locks.shutting_down()));
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}

/// How a held lock's stream ends.
enum End {
    /// Tell the client this and let go.
    Fail(Status),
    /// Release and confirm.
    Release,
    /// Nobody listens any more: let go silently.
    Gone,
}

/// Serves one held lock until it is released or lost.
async fn hold(
    mut held: HeldLock,
    mut inbound: Streaming<proto::WithLockRequest>,
    tx: mpsc::Sender<Result<proto::WithLockResponse, Status>>,
    lease: Duration,
    shutdown: impl std::future::Future<Output = ()>,
) {
    tokio::pin!(shutdown);
    let mut lease_ends = tokio::time::Instant::now() + lease;
    let end = loop {
        let next = tokio::select! {
            next = inbound.next() => next,
            () = tokio::time::sleep_until(lease_ends) => {
                break End::Fail(held.lost_error("no keep_alive or release within the lease").into());
            }
            () = held.lost() => {
                break End::Fail(held.lost_error("the lock's database session ended").into());
            }
            () = &mut shutdown => break End::Fail(Error::ShuttingDown.into()),
            // The client reset the stream: nobody is listening, let go now.
            () = tx.closed() => break End::Gone,
        };
        let action = match next {
            // Half-close: the critical section is over.
            None => break End::Release,
            // The client's stream broke (cancel, disconnect).
            Some(Err(_)) => break End::Gone,
            Some(Ok(message)) => message.action,
        };
        match action {
            Some(Action::Release(_)) => break End::Release,
            Some(Action::KeepAlive(_)) => {
                if let Err(err) = held.keep_alive().await {
                    break End::Fail(err.into());
                }
                lease_ends = tokio::time::Instant::now() + lease;
                let expires = Utc::now() + chrono::Duration::from_std(lease).unwrap_or(chrono::Duration::MAX);
                let ack = proto::WithLockResponse {
                    event: Some(Event::KeptAlive(proto::KeptAlive {
                        lease_expires_at: Some(timestamp_out(expires)),
                    })),
                };
                // A client that does not read its acknowledgements must not
                // stall its own lock's lease timer: drop the ack instead.
                let _ = tx.try_send(Ok(ack));
            }
            Some(Action::Acquire(_)) => break End::Fail(protocol("action", "acquire was already sent on this stream")),
            None => break End::Fail(Error::invalid("action", "set acquire, keep_alive or release").into()),
        }
    };
    match end {
        End::Release => {
            let reply = match held.release().await {
                Ok(held_for) => Ok(proto::WithLockResponse {
                    event: Some(Event::Released(proto::Released {
                        held_for: Some(duration_out(held_for)),
                    })),
                }),
                Err(err) => Err(err.into()),
            };
            let _ = tx.send(reply).await;
        }
        End::Fail(status) => {
            let_go(held).await;
            let _ = tx.send(Err(status)).await;
        }
        End::Gone => let_go(held).await,
    }
}

/// Releases a lock the stream is ending without a `released` reply, before
/// the client hears why: a client that retries at once finds it free.
async fn let_go(held: HeldLock) {
    if let Err(err) = held.release().await {
        tracing::debug!(error = %err, "lock already lost when letting go");
    }
}
