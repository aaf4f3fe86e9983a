//! `vitals.v1.LockService`: one WithLock stream is one critical section.
//!
//! The response stream owns the held lock. Whatever ends the stream (release,
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
            // Shutdown first: a holder ended by shutdown hands its lock to
            // the next waiter at that very moment, and that waiter must
            // hear SHUTTING_DOWN, not be granted the lock.
            biased;
            () = &mut shutdown => return Err(Error::ShuttingDown.into()),
            held = self.locks.acquire(permit, key, wait) => held?,
        };
        tracing::debug!(
            key = held.key().as_str(),
            owner = owner.as_str(),
            token = held.fencing_token,
            "lock granted"
        );

        let lease = self.locks.lease();
        let acquired = proto::WithLockResponse {
            event: Some(Event::Acquired(proto::Acquired {
                fencing_token: held.fencing_token,
                acquired_at: Some(timestamp_out(held.acquired_at)),
                lease: Some(duration_out(lease)),
            })),
        };
        let holding = Holding {
            held: Some(held),
            inbound,
            lease,
            lease_ends: tokio::time::Instant::now() + lease,
            locks: self.locks.clone(),
        };
        let replies = futures::stream::once(async move { Ok(acquired) }).chain(futures::stream::unfold(
            Some(holding),
            |state| async move {
                let mut holding = state?;
                match holding.next().await {
                    Step::Reply(reply) => Some((Ok(reply), Some(holding))),
                    Step::End(last) => last.map(|last| (last, None)),
                }
            },
        ));
        Ok(Response::new(Box::pin(replies)))
    }
}

/// A held lock and its stream: the response stream owns it, so there is no
/// task and no channel per lock, and whatever ends the response stream (the
/// client resetting it, the connection closing) drops the lock with it.
struct Holding {
    /// Taken when the stream ends.
    held: Option<HeldLock>,
    inbound: Streaming<proto::WithLockRequest>,
    lease: Duration,
    /// When the lock is lost unless a keep_alive or release arrives.
    lease_ends: tokio::time::Instant,
    locks: Locks,
}

/// What a held lock's stream does next.
enum Step {
    /// Send this and go on holding.
    Reply(proto::WithLockResponse),
    /// The lock is released; send this last (`None`: end silently).
    End(Option<Result<proto::WithLockResponse, Status>>),
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

impl Holding {
    /// Serves the lock until there is something to send.
    async fn next(&mut self) -> Step {
        let Some(held) = self.held.as_mut() else {
            return Step::End(None);
        };
        let end = match until_end(held, &mut self.inbound, self.lease, &mut self.lease_ends, &self.locks).await {
            Ok(reply) => return Step::Reply(reply),
            Err(end) => end,
        };
        // The stream ends: the lock goes with it, released before the client
        // hears why, so a client that retries at once finds it free.
        let Some(held) = self.held.take() else {
            return Step::End(None);
        };
        match end {
            End::Release => Step::End(Some(match held.release().await {
                Ok(held_for) => Ok(proto::WithLockResponse {
                    event: Some(Event::Released(proto::Released {
                        held_for: Some(duration_out(held_for)),
                    })),
                }),
                Err(err) => Err(err.into()),
            })),
            End::Fail(status) => {
                let_go(held).await;
                Step::End(Some(Err(status)))
            }
            End::Gone => {
                let_go(held).await;
                Step::End(None)
            }
        }
    }
}

/// Waits for the next message or event on a held lock's stream: a reply to
/// send while the lock stays held, or how the stream ends.
async fn until_end(
    held: &mut HeldLock,
    inbound: &mut Streaming<proto::WithLockRequest>,
    lease: Duration,
    lease_ends: &mut tokio::time::Instant,
    locks: &Locks,
) -> Result<proto::WithLockResponse, End> {
    let shutdown = locks.shutting_down();
    tokio::pin!(shutdown);
    let next = tokio::select! {
        // Shutdown first: it also closes the lock sessions, which marks
        // their locks lost, and a stream ending because of shutdown
        // must say SHUTTING_DOWN, not LOCK_LOST.
        biased;
        () = &mut shutdown => return Err(End::Fail(Error::ShuttingDown.into())),
        next = inbound.next() => next,
        () = tokio::time::sleep_until(*lease_ends) => {
            return Err(End::Fail(held.lost_error("no keep_alive or release within the lease").into()));
        }
        () = held.lost() => {
            // Shutdown closes the lock sessions too (and may do so while
            // this select is being polled): the client should hear why.
            if locks.is_shutting_down() {
                return Err(End::Fail(Error::ShuttingDown.into()));
            }
            return Err(End::Fail(held.lost_error("the lock's database session ended").into()));
        }
    };
    let action = match next {
        // Half-close: the critical section is over.
        None => return Err(End::Release),
        // The client's stream broke (cancel, disconnect).
        Some(Err(_)) => return Err(End::Gone),
        Some(Ok(message)) => message.action,
    };
    match action {
        Some(Action::Release(_)) => Err(End::Release),
        Some(Action::KeepAlive(_)) => {
            if let Err(err) = held.keep_alive().await {
                // The session was closed by shutdown, not lost.
                if locks.is_shutting_down() {
                    return Err(End::Fail(Error::ShuttingDown.into()));
                }
                return Err(End::Fail(err.into()));
            }
            *lease_ends = tokio::time::Instant::now() + lease;
            let expires = Utc::now() + chrono::Duration::from_std(lease).unwrap_or(chrono::Duration::MAX);
            Ok(proto::WithLockResponse {
                event: Some(Event::KeptAlive(proto::KeptAlive {
                    lease_expires_at: Some(timestamp_out(expires)),
                })),
            })
        }
        Some(Action::Acquire(_)) => Err(End::Fail(protocol("action", "acquire was already sent on this stream"))),
        None => Err(End::Fail(
            Error::invalid("action", "set acquire, keep_alive or release").into(),
        )),
    }
}

/// Releases a lock the stream is ending without a `released` reply, before
/// the client hears why: a client that retries at once finds it free.
async fn let_go(held: HeldLock) {
    if let Err(err) = held.release().await {
        tracing::debug!(error = %err, "lock already lost when letting go");
    }
}
