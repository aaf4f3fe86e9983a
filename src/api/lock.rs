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
    sync::Arc,
    task::{Context, Poll, ready},
    time::Duration,
};

use futures::{Stream, StreamExt};
use pin_project_lite::pin_project;
use tokio::time::Sleep;
use tokio_util::sync::WaitForCancellationFutureOwned;
use tonic::{Request, Response, Status, Streaming};

use super::{
    convert::{Violations, duration_in, duration_out, timestamp_out},
    page_token::{self, Kind, PageTokenKey},
};
use crate::{
    auth::Access,
    domain::{FieldViolation, LockKey, Namespace, Owner},
    error::Error,
    lock::{
        ACQUIRE_MESSAGE_TIMEOUT, HeldLock, LEASE_LAPSED, Locks, Mode,
        election::{Elections, Leader},
        inventory::{self, KeyInfo, Listing},
        semaphore::MAX_HOLDERS,
    },
    proto::{self, lock_service_server::LockService, with_lock_request::Action, with_lock_response::Event},
};
use chrono::Utc;

/// The handler state.
#[derive(Debug, Clone)]
pub struct LockApi {
    locks: Locks,
    page_tokens: Arc<PageTokenKey>,
}

impl LockApi {
    /// Handlers over `locks`, signing page tokens with `page_tokens`.
    pub fn new(locks: Locks, page_tokens: Arc<PageTokenKey>) -> Self {
        LockApi { locks, page_tokens }
    }
}

/// ListLocks' page size when the request names none.
const DEFAULT_PAGE_SIZE: u32 = 100;
/// ListLocks' largest page.
const MAX_PAGE_SIZE: u32 = 1000;

fn mode_out(mode: Mode) -> (proto::LockMode, u32) {
    match mode {
        Mode::Exclusive => (proto::LockMode::Exclusive, 0),
        Mode::Shared => (proto::LockMode::Shared, 0),
        Mode::Semaphore(n) => (proto::LockMode::Exclusive, n),
    }
}

fn lock_info(info: KeyInfo) -> proto::LockInfo {
    let (mode, max_holders) = mode_out(info.mode);
    proto::LockInfo {
        key: info.key,
        mode: mode as i32,
        max_holders,
        holders: info
            .holders
            .into_iter()
            .map(|h| proto::LockHolder {
                owner: h.owner,
                fencing_token: h.token,
                acquired_at: h.acquired_at.map(timestamp_out),
                lease_expires_at: h.lease_expires_at.map(timestamp_out),
                replica: h.replica,
            })
            .collect(),
        waiters: info.waiters,
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

/// A Campaign stream's messages, as WithLock messages: `campaign` is its
/// `acquire`, `resign` its `release`.
fn campaign_request(request: Result<proto::CampaignRequest, Status>) -> Result<proto::WithLockRequest, Status> {
    use proto::campaign_request::Action as C;
    let action = request?.action.map(|action| match action {
        C::Campaign(_) => Action::Acquire(proto::Acquire::default()),
        C::KeepAlive(k) => Action::KeepAlive(k),
        C::Resign(_) => Action::Release(proto::Release {}),
    });
    Ok(proto::WithLockRequest { action })
}

/// A WithLock reply as a Campaign reply.
fn campaign_response(response: Result<proto::WithLockResponse, Status>) -> Result<proto::CampaignResponse, Status> {
    use proto::campaign_response::Event as C;
    let event = response?.event.map(|event| match event {
        Event::Acquired(a) => C::Elected(a),
        Event::KeptAlive(k) => C::KeptAlive(k),
        Event::Released(r) => C::Resigned(r),
    });
    Ok(proto::CampaignResponse { event })
}

/// The inbound side of a Campaign stream, as WithLock messages.
type CampaignInbound = futures::stream::Map<
    Streaming<proto::CampaignRequest>,
    fn(Result<proto::CampaignRequest, Status>) -> Result<proto::WithLockRequest, Status>,
>;

/// The most bytes of a candidate's value.
const MAX_CANDIDATE_VALUE: usize = 1024;

/// Reads a stream's first message within [`ACQUIRE_MESSAGE_TIMEOUT`], or
/// the refusal to send; `what` names it.
async fn first_message<T>(
    inbound: &mut Streaming<T>,
    shutdown: &mut Pin<&mut WaitForCancellationFutureOwned>,
    what: &str,
) -> Result<T, Status> {
    let first = tokio::select! {
        first = tokio::time::timeout(ACQUIRE_MESSAGE_TIMEOUT, inbound.next()) => first,
        () = shutdown.as_mut() => return Err(Error::ShuttingDown.into()),
    };
    match first {
        Ok(Some(Ok(message))) => Ok(message),
        Ok(Some(Err(status))) => Err(status),
        Ok(None) => Err(protocol("action", &format!("the stream ended before {what}"))),
        Err(_elapsed) => Err(protocol(
            "action",
            &format!("{what} must be sent within 5 seconds of opening the stream"),
        )),
    }
}

#[tonic::async_trait]
impl LockService for LockApi {
    type WithLockStream = LockStream;
    type CampaignStream = Pin<Box<dyn Stream<Item = Result<proto::CampaignResponse, Status>> + Send>>;
    type ObserveLeaderStream = Pin<Box<dyn Stream<Item = Result<proto::ObserveLeaderResponse, Status>> + Send>>;

    async fn campaign(
        &self,
        request: Request<Streaming<proto::CampaignRequest>>,
    ) -> Result<Response<Self::CampaignStream>, Status> {
        let access = Access::of(&request)?;
        let permit = self.locks.admit()?;
        let mut inbound = request.into_inner();
        let shutdown = self.locks.shutting_down();
        tokio::pin!(shutdown);
        let first = first_message(&mut inbound, &mut shutdown, "campaign").await?;
        let Some(proto::campaign_request::Action::Campaign(campaign)) = first.action else {
            return Err(protocol("action", "the first message must be campaign"));
        };
        let mut v = Violations::default();
        let election = v.take(LockKey::parse("campaign.election", campaign.election));
        if campaign.candidate_value.len() > MAX_CANDIDATE_VALUE || campaign.candidate_value.contains('\0') {
            v.push(
                "campaign.candidate_value",
                format!("must be at most {MAX_CANDIDATE_VALUE} bytes, without NUL"),
            );
        }
        let wait = match &campaign.wait_timeout {
            None => Some(None),
            Some(d) => v.take(duration_in("campaign.wait_timeout", d)).map(Some),
        };
        let (election, wait) = v.finish(|| Some((election?, wait?)))?;
        access.check_lock_key(election.as_str())?;
        let held = tokio::select! {
            biased;
            () = &mut shutdown => return Err(Error::ShuttingDown.into()),
            held = self.locks.campaign(permit, election.clone(), wait) => held?,
        };
        let lease = self.locks.lease();
        let leader = Leader {
            value: campaign.candidate_value,
            token: held.fencing_token,
            elected_at: held.acquired_at,
            lease_expires_at: held.acquired_at + chrono::Duration::from_std(lease).unwrap_or(chrono::Duration::MAX),
            replica: self.locks.replica().to_owned(),
        };
        // Observers must be able to learn of a leader before it acts as one;
        // if they cannot, it does not lead (the lock goes with `held`).
        self.locks.elections().elected(election.as_str(), &leader).await?;
        tracing::info!(
            election = election.as_str(),
            token = held.fencing_token,
            "leader elected"
        );
        let leading = Leading {
            elections: self.locks.elections().clone(),
            election: election.into_inner(),
            token: held.fencing_token,
        };
        let inbound: CampaignInbound = inbound.map(campaign_request as fn(_) -> _);
        let stream = LockStream::new(held, None, inbound, lease, &self.locks, None, Some(Box::new(leading)));
        Ok(Response::new(Box::pin(stream.map(campaign_response))))
    }

    async fn observe_leader(
        &self,
        request: Request<proto::ObserveLeaderRequest>,
    ) -> Result<Response<Self::ObserveLeaderStream>, Status> {
        let access = Access::of(&request)?;
        let req = request.into_inner();
        let election = LockKey::parse("election", req.election).map_err(|v| Error::InvalidArgument(vec![v]))?;
        access.check_lock_key(election.as_str())?;
        // An observer holds a place in the lock budget, as a lock stream does.
        let permit = self.locks.admit()?;
        let watch = self.locks.elections().watch(election.as_str());
        let shutdown = Box::pin(self.locks.shutting_down());
        let state = Some((watch, req.after_token, permit, shutdown));
        let stream = futures::stream::unfold(state, |state| async move {
            let (mut watch, last, permit, mut shutdown) = state?;
            tokio::select! {
                () = &mut shutdown => Some((Err(Error::ShuttingDown.into()), None)),
                leader = watch.next(last) => match leader {
                    Ok(leader) => {
                        let token = leader.token;
                        let reply = proto::ObserveLeaderResponse {
                            leader: Some(proto::Leader {
                                value: leader.value,
                                fencing_token: leader.token,
                                elected_at: Some(timestamp_out(leader.elected_at)),
                                lease_expires_at: Some(timestamp_out(leader.lease_expires_at)),
                                replica: leader.replica,
                            }),
                        };
                        Some((Ok(reply), Some((watch, token, permit, shutdown))))
                    }
                    Err(err) => Some((Err(err.into()), None)),
                },
            }
        });
        Ok(Response::new(Box::pin(stream)))
    }

    async fn list_locks(
        &self,
        request: Request<proto::ListLocksRequest>,
    ) -> Result<Response<proto::ListLocksResponse>, Status> {
        let access = Access::of(&request)?;
        let req = request.into_inner();
        let mut v = Violations::default();
        if req.key_prefix.len() > 512 || req.key_prefix.contains('\0') {
            v.push("key_prefix", "must be at most 512 bytes, without NUL");
        }
        let limit = match u32::try_from(req.page_size) {
            Ok(0) => DEFAULT_PAGE_SIZE,
            Ok(n) if n <= MAX_PAGE_SIZE => n,
            _ => {
                v.push("page_size", format!("must be between 0 and {MAX_PAGE_SIZE}"));
                DEFAULT_PAGE_SIZE
            }
        };
        let after = if req.page_token.is_empty() {
            Some(None)
        } else {
            v.take(
                page_token::decode(
                    &self.page_tokens,
                    "page_token",
                    Kind::Locks,
                    &req.key_prefix,
                    &req.page_token,
                )
                .and_then(|body| {
                    String::from_utf8(body)
                        .map(Some)
                        .map_err(|_| FieldViolation::new("page_token", "is not a valid page token"))
                }),
            )
        };
        let after = v.finish(|| after)?;
        let limit = usize::try_from(limit).unwrap_or(100);
        let rows = self
            .locks
            .inventory(&req.key_prefix, access.lock_keys(), after.as_deref(), limit + 1, false)
            .await?;
        let (keys, more) = inventory::group(rows, limit, false);
        let next_page_token = match keys.last() {
            Some(last) if more => {
                page_token::encode(&self.page_tokens, Kind::Locks, &req.key_prefix, last.key.as_bytes())?
            }
            _ => String::new(),
        };
        Ok(Response::new(proto::ListLocksResponse {
            locks: keys.into_iter().map(lock_info).collect(),
            next_page_token,
        }))
    }

    async fn get_lock(
        &self,
        request: Request<proto::GetLockRequest>,
    ) -> Result<Response<proto::GetLockResponse>, Status> {
        let access = Access::of(&request)?;
        let req = request.into_inner();
        let key = LockKey::parse("key", req.key).map_err(|v| Error::InvalidArgument(vec![v]))?;
        access.check_lock_key(key.as_str())?;
        let rows = self
            .locks
            .inventory(key.as_str(), &Namespace::All, None, 1, true)
            .await?
            .into_iter()
            .filter(|row| row.key == key.as_str())
            .collect();
        let (keys, _) = inventory::group(rows, 1, true);
        let Some(info) = keys.into_iter().next() else {
            return Err(Error::LockNotHeld { key: key.into_inner() }.into());
        };
        Ok(Response::new(proto::GetLockResponse {
            lock: Some(lock_info(info)),
        }))
    }

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
        let listing = self.locks.list(&key, &owner, mode);
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
        listing.granted(
            held.fencing_token,
            held.acquired_at,
            held.acquired_at + chrono::Duration::from_std(lease).unwrap_or(chrono::Duration::MAX),
        );
        Ok(Response::new(LockStream::new(
            held,
            Some(listing),
            inbound,
            lease,
            &self.locks,
            // Kept for the release's audit line only: a span kept open
            // holds its data for as long as the lock is held.
            audited.then(|| Box::new(tracing::Span::current())),
            None,
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
    pub struct LockStream<S = Streaming<proto::WithLockRequest>> {
        // The `acquired` reply is still to be sent (it is built from `held`
        // then, not stored meanwhile).
        announce: bool,
        // Taken when the stream ends (or lent to a running keep-alive).
        held: Option<HeldLock>,
        // The stream's entry in the replica's inventory (none for a campaign).
        listing: Option<Listing>,
        inbound: S,
        locks: Locks,
        // The leadership this lock is, for a Campaign stream.
        leading: Option<Box<Leading>>,
        // A keep-alive or the final release, while it runs.
        busy: Option<Pin<Box<dyn Future<Output = Busy> + Send>>>,
        // When the lock is lost unless a keep_alive or release arrives.
        #[pin]
        lease_ends: Sleep,
        // Shutdown, or the loss of the lock's PostgreSQL session.
        #[pin]
        ended: WaitForCancellationFutureOwned,
        // The request's span (request id, principal), for the release's
        // audit line: the stream is polled outside the handler's future.
        // None when nothing is audited (boxed: most streams have none).
        span: Option<Box<tracing::Span>>,
    }
}

/// What a keep-alive or a release that ran to its end leaves.
// Only ever the output of a running keep-alive or release, moved once, never
// stored with a held lock: boxing the lock would cost an allocation each time.
#[allow(clippy::large_enum_variant)]
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

/// A Campaign stream's leadership: what observers are told of it.
#[derive(Debug)]
struct Leading {
    elections: Elections,
    election: String,
    token: u64,
}

impl Drop for Leading {
    fn drop(&mut self) {
        let (elections, election, token) = (self.elections.clone(), std::mem::take(&mut self.election), self.token);
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(async move { elections.ended(&election, token).await });
        }
    }
}

impl<S> LockStream<S> {
    fn new(
        held: HeldLock,
        listing: Option<Listing>,
        inbound: S,
        lease: Duration,
        locks: &Locks,
        span: Option<Box<tracing::Span>>,
        leading: Option<Box<Leading>>,
    ) -> Self {
        LockStream {
            announce: true,
            ended: held.ended(),
            held: Some(held),
            listing,
            inbound,
            locks: locks.clone(),
            leading,
            busy: None,
            lease_ends: tokio::time::sleep(lease),
            span,
        }
    }
}

/// The first reply of a held lock's stream.
fn acquired(held: &HeldLock, lease: Duration) -> proto::WithLockResponse {
    proto::WithLockResponse {
        event: Some(Event::Acquired(proto::Acquired {
            fencing_token: held.fencing_token,
            acquired_at: Some(timestamp_out(held.acquired_at)),
            lease: Some(duration_out(lease)),
        })),
    }
}

/// The stream ends: the lock goes with it, released before the client hears
/// why, so a client that retries at once finds it free.
fn ending(
    held: HeldLock,
    leading: Option<Box<Leading>>,
    end: End,
    span: Option<&tracing::Span>,
) -> Pin<Box<dyn Future<Output = Busy> + Send>> {
    // Observers stop being told of this leader now.
    drop(leading);
    let how = match &end {
        End::Release => "released",
        End::Fail(_) => "ended by the server",
        End::Gone => "client gone",
    };
    match span {
        None => tracing::debug!(
            key = held.key().as_str(),
            token = held.fencing_token,
            how,
            "lock released"
        ),
        Some(span) => {
            tracing::info!(parent: span, key = held.key().as_str(), token = held.fencing_token, how, "lock released");
        }
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

impl<S> Stream for LockStream<S>
where
    S: Stream<Item = Result<proto::WithLockRequest, Status>> + Unpin,
{
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
                        this.lease_ends.as_mut().reset(now + this.locks.lease());
                        let expires = Utc::now()
                            + chrono::Duration::from_std(this.locks.lease()).unwrap_or(chrono::Duration::MAX);
                        if let Some(listing) = this.listing.as_ref() {
                            listing.kept_alive(expires);
                        }
                        if let Some(leading) = this.leading.as_ref() {
                            let (elections, election, token) =
                                (leading.elections.clone(), leading.election.clone(), leading.token);
                            tokio::spawn(async move { elections.renewed(&election, token, expires).await });
                        }
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
                        *this.busy = Some(ending(
                            held,
                            this.leading.take(),
                            End::Fail(status),
                            this.span.as_deref(),
                        ));
                        continue;
                    }
                    Busy::Ended(last) => return Poll::Ready(last),
                }
            }
            let Some(held) = this.held.take() else {
                return Poll::Ready(None);
            };
            if std::mem::take(this.announce) {
                let reply = acquired(&held, this.locks.lease());
                *this.held = Some(held);
                return Poll::Ready(Some(Ok(reply)));
            }
            // First: a lock lost, or a server shutting down, ends the stream
            // whatever the client says meanwhile.
            if this.ended.as_mut().poll(cx).is_ready() {
                // Shutdown also closes the lock sessions, which loses their
                // locks: the client should hear why.
                let status = if this.locks.is_shutting_down() {
                    Error::ShuttingDown.into()
                } else {
                    held.lost_error("the lock's database session ended").into()
                };
                *this.busy = Some(ending(
                    held,
                    this.leading.take(),
                    End::Fail(status),
                    this.span.as_deref(),
                ));
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
                *this.busy = Some(ending(held, this.leading.take(), end, this.span.as_deref()));
                continue;
            }
            if this.lease_ends.as_mut().poll(cx).is_ready() {
                let status = held.lost_error(LEASE_LAPSED).into();
                *this.busy = Some(ending(
                    held,
                    this.leading.take(),
                    End::Fail(status),
                    this.span.as_deref(),
                ));
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
