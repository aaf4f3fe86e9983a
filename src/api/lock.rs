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

use std::{
    future::Future,
    pin::Pin,
    task::{Context, Poll, ready},
    time::Duration,
};

use futures::{Stream, StreamExt};
use pin_project_lite::pin_project;
use tokio::time::Sleep;
use tokio_util::sync::WaitForCancellationFutureOwned;
use tonic::{Request, Response, Status, Streaming};

use super::convert::{Violations, duration_in, duration_out, timestamp_out};
use crate::{
    auth::Access,
    domain::{FieldViolation, LockKey, Owner},
    error::Error,
    lock::{ACQUIRE_MESSAGE_TIMEOUT, HeldLock, LEASE_LAPSED, Locks, Mode, semaphore::MAX_HOLDERS},
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

fn protocol(field: &str, description: &str) -> Status {
    Error::LockProtocol(FieldViolation::new(field, description)).into()
}

/// An `acquire`, parsed.
struct Acquire {
    key: LockKey,
    wait: Option<Duration>,
    owner: Owner,
    mode: Mode,
}

fn parse_acquire(acquire: proto::Acquire) -> Result<Acquire, Error> {
    let mut v = Violations::default();
    let mode = match (proto::LockMode::try_from(acquire.mode), acquire.max_holders) {
        (Err(_), _) => {
            v.push("acquire.mode", "must be a LockMode");
            None
        }
        (_, n) if n > MAX_HOLDERS => {
            v.push("acquire.max_holders", format!("must be at most {MAX_HOLDERS}"));
            None
        }
        (Ok(proto::LockMode::Shared), 0 | 1) => Some(Mode::Shared),
        (Ok(proto::LockMode::Shared), _) => {
            v.push("acquire.max_holders", "a semaphore is held in LOCK_MODE_EXCLUSIVE");
            None
        }
        (Ok(proto::LockMode::Unspecified | proto::LockMode::Exclusive), 0 | 1) => Some(Mode::Exclusive),
        (Ok(proto::LockMode::Unspecified | proto::LockMode::Exclusive), n) => Some(Mode::Semaphore(n)),
    };
    let key = v.take(LockKey::parse("acquire.key", acquire.key));
    let wait = match &acquire.wait_timeout {
        None => Some(None),
        Some(d) => v.take(duration_in("acquire.wait_timeout", d)).map(Some),
    };
    let owner = v.take(Owner::parse("acquire.owner", acquire.owner));
    v.finish(|| {
        Some(Acquire {
            key: key?,
            wait: wait?,
            owner: owner?,
            mode: mode?,
        })
    })
}

#[tonic::async_trait]
impl LockService for LockApi {
    type WithLockStream = LockStream;

    async fn with_lock(
        &self,
        request: Request<Streaming<proto::WithLockRequest>>,
    ) -> Result<Response<Self::WithLockStream>, Status> {
        let access = Access::of(&request)?;
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
        let Acquire { key, wait, owner, mode } = parse_acquire(acquire)?;
        access.check_lock_key(key.as_str())?;
        let held = tokio::select! {
            // Shutdown first: a holder ended by shutdown hands its lock to
            // the next waiter at that very moment, and that waiter must
            // hear SHUTTING_DOWN, not be granted the lock.
            biased;
            () = &mut shutdown => return Err(Error::ShuttingDown.into()),
            held = self.locks.acquire(permit, key, wait, mode) => held?,
        };
        // With authentication on, grants and releases are an audit record:
        // who held which key, with which token (the request id and principal
        // are the span's). Without it there is nobody to name, and a line
        // per grant and release would cost more than the lock.
        let audited = !matches!(access, Access::Open);
        if audited {
            tracing::info!(
                key = held.key().as_str(),
                owner = owner.as_str(),
                token = held.fencing_token,
                principal = access.name(),
                "lock granted"
            );
        } else {
            tracing::debug!(
                key = held.key().as_str(),
                owner = owner.as_str(),
                token = held.fencing_token,
                "lock granted"
            );
        }

        let lease = self.locks.lease();
        let acquired = proto::WithLockResponse {
            event: Some(Event::Acquired(proto::Acquired {
                fencing_token: held.fencing_token,
                acquired_at: Some(timestamp_out(held.acquired_at)),
                lease: Some(duration_out(lease)),
            })),
        };
        Ok(Response::new(LockStream::new(
            held,
            acquired,
            inbound,
            lease,
            &self.locks,
            // Kept for the release's audit line only: a span kept open
            // holds its data for as long as the lock is held.
            if audited {
                tracing::Span::current()
            } else {
                tracing::Span::none()
            },
        )))
    }
}

pin_project! {
    /// A held lock and its stream: the response stream owns it, so there is
    /// no task and no channel per lock, and whatever ends the response stream
    /// (the client resetting it, the connection closing) drops the lock with
    /// it.
    ///
    /// Written as a plain state machine rather than an `async` block because
    /// it is what every held lock keeps in memory: each field is stored once,
    /// and the futures of a keep-alive or a release exist only while they run.
    pub struct LockStream {
        // The `acquired` reply, sent first.
        acquired: Option<proto::WithLockResponse>,
        // Taken when the stream ends (or lent to a running keep-alive).
        held: Option<HeldLock>,
        inbound: Streaming<proto::WithLockRequest>,
        lease: Duration,
        locks: Locks,
        // A keep-alive or the final release, while it runs.
        busy: Option<Pin<Box<dyn Future<Output = Busy> + Send>>>,
        // When the lock is lost unless a keep_alive or release arrives.
        #[pin]
        lease_ends: Sleep,
        #[pin]
        shutdown: WaitForCancellationFutureOwned,
        // The lock's PostgreSQL session was lost (never, when embedded).
        #[pin]
        lost: Option<WaitForCancellationFutureOwned>,
        // The request's span (request id, principal), for the release's
        // audit line: the stream is polled outside the handler's future.
        // None when nothing is audited.
        span: tracing::Span,
    }
}

/// What a keep-alive or a release that ran to its end leaves.
enum Busy {
    /// The keep-alive's outcome, and the lock back.
    KeptAlive(HeldLock, Result<(), Error>),
    /// The lock is released; send this last (`None`: end silently).
    Ended(Option<Result<proto::WithLockResponse, Status>>),
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

impl LockStream {
    fn new(
        held: HeldLock,
        acquired: proto::WithLockResponse,
        inbound: Streaming<proto::WithLockRequest>,
        lease: Duration,
        locks: &Locks,
        span: tracing::Span,
    ) -> Self {
        LockStream {
            acquired: Some(acquired),
            lost: held.lost_signal(),
            held: Some(held),
            inbound,
            lease,
            locks: locks.clone(),
            busy: None,
            lease_ends: tokio::time::sleep(lease),
            shutdown: locks.shutting_down(),
            span,
        }
    }
}

/// The stream ends: the lock goes with it, released before the client hears
/// why, so a client that retries at once finds it free.
fn ending(held: HeldLock, end: End, span: &tracing::Span) -> Pin<Box<dyn Future<Output = Busy> + Send>> {
    let how = match &end {
        End::Release => "released",
        End::Fail(_) => "ended by the server",
        End::Gone => "client gone",
    };
    if span.is_none() {
        tracing::debug!(
            key = held.key().as_str(),
            token = held.fencing_token,
            how,
            "lock released"
        );
    } else {
        tracing::info!(parent: span, key = held.key().as_str(), token = held.fencing_token, how, "lock released");
    }
    Box::pin(async move {
        Busy::Ended(match end {
            End::Release => Some(match held.release().await {
                Ok(held_for) => Ok(proto::WithLockResponse {
                    event: Some(Event::Released(proto::Released {
                        held_for: Some(duration_out(held_for)),
                    })),
                }),
                Err(err) => Err(err.into()),
            }),
            End::Fail(status) => {
                let_go(held).await;
                Some(Err(status))
            }
            End::Gone => {
                let_go(held).await;
                None
            }
        })
    })
}

impl Stream for LockStream {
    type Item = Result<proto::WithLockResponse, Status>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let mut this = self.project();
        loop {
            if let Some(busy) = this.busy.as_mut() {
                let done = ready!(busy.as_mut().poll(cx));
                *this.busy = None;
                match done {
                    Busy::KeptAlive(held, Ok(())) => {
                        *this.held = Some(held);
                        let now = tokio::time::Instant::now();
                        this.lease_ends.as_mut().reset(now + *this.lease);
                        let expires =
                            Utc::now() + chrono::Duration::from_std(*this.lease).unwrap_or(chrono::Duration::MAX);
                        return Poll::Ready(Some(Ok(proto::WithLockResponse {
                            event: Some(Event::KeptAlive(proto::KeptAlive {
                                lease_expires_at: Some(timestamp_out(expires)),
                            })),
                        })));
                    }
                    Busy::KeptAlive(held, Err(err)) => {
                        // The session was closed by shutdown, not lost.
                        let status = if this.locks.is_shutting_down() {
                            Error::ShuttingDown.into()
                        } else {
                            err.into()
                        };
                        *this.busy = Some(ending(held, End::Fail(status), this.span));
                        continue;
                    }
                    Busy::Ended(last) => return Poll::Ready(last),
                }
            }
            if let Some(acquired) = this.acquired.take() {
                return Poll::Ready(Some(Ok(acquired)));
            }
            let Some(held) = this.held.take() else {
                return Poll::Ready(None);
            };
            // Shutdown first: it also closes the lock sessions, which marks
            // their locks lost, and a stream ending because of shutdown must
            // say SHUTTING_DOWN, not LOCK_LOST.
            if this.shutdown.as_mut().poll(cx).is_ready() {
                *this.busy = Some(ending(held, End::Fail(Error::ShuttingDown.into()), this.span));
                continue;
            }
            if let Poll::Ready(next) = this.inbound.poll_next_unpin(cx) {
                let end = match next {
                    // Half-close: the critical section is over.
                    None => End::Release,
                    // The client's stream broke (cancel, disconnect).
                    Some(Err(_)) => End::Gone,
                    Some(Ok(message)) => match message.action {
                        Some(Action::Release(_)) => End::Release,
                        Some(Action::KeepAlive(_)) => {
                            *this.busy = Some(Box::pin(async move {
                                let mut held = held;
                                let outcome = held.keep_alive().await;
                                Busy::KeptAlive(held, outcome)
                            }));
                            continue;
                        }
                        Some(Action::Acquire(_)) => {
                            End::Fail(protocol("action", "acquire was already sent on this stream"))
                        }
                        None => End::Fail(Error::invalid("action", "set acquire, keep_alive or release").into()),
                    },
                };
                *this.busy = Some(ending(held, end, this.span));
                continue;
            }
            if this.lease_ends.as_mut().poll(cx).is_ready() {
                let status = held.lost_error(LEASE_LAPSED).into();
                *this.busy = Some(ending(held, End::Fail(status), this.span));
                continue;
            }
            if let Some(lost) = this.lost.as_mut().as_pin_mut()
                && lost.poll(cx).is_ready()
            {
                // Shutdown closes the lock sessions too (and may do so while
                // this stream is being polled): the client should hear why.
                let status = if this.locks.is_shutting_down() {
                    Error::ShuttingDown.into()
                } else {
                    held.lost_error("the lock's database session ended").into()
                };
                *this.busy = Some(ending(held, End::Fail(status), this.span));
                continue;
            }
            *this.held = Some(held);
            return Poll::Pending;
        }
    }
}

/// Releases a lock the stream is ending without a `released` reply, before
/// the client hears why: a client that retries at once finds it free.
async fn let_go(held: HeldLock) {
    if let Err(err) = held.release().await {
        tracing::debug!(error = %err, "lock already lost when letting go");
    }
}
