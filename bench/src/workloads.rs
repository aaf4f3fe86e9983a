//! The operations the benchmark sends: vitals' EvaluateHealth, SubmitRun and
//! WithLock, and etcd's Lease and Lock APIs, each as a [`Worker`].

use std::{net::SocketAddr, sync::Arc, time::Duration};

use anyhow::{Context, Result};
use etcd_client::LockOptions;
use futures::{FutureExt, future::BoxFuture};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{
    Code, Status,
    transport::{Channel, Endpoint},
};
use vitals::proto::{
    self, EvaluateHealthRequest, SubmitRunRequest, WithLockRequest,
    health_check_service_client::HealthCheckServiceClient, lock_service_client::LockServiceClient, thresholds::Mode,
    with_lock_request::Action, with_lock_response::Event,
};

use crate::load::{Outcome, Worker};

/// Systems the `submit` workload spreads its runs over.
pub(crate) const SYSTEMS: u32 = 1_000;
/// Checks per system.
pub(crate) const CHECKS_PER_SYSTEM: u32 = 3;
/// The one key of the contended lock workloads.
pub(crate) const CONTENDED_KEY: &str = "bench-contended";

/// The canonical name of a gRPC status code, as the tables print it.
pub(crate) fn code_name(code: Code) -> &'static str {
    match code {
        Code::Ok => "OK",
        Code::Cancelled => "CANCELLED",
        Code::Unknown => "UNKNOWN",
        Code::InvalidArgument => "INVALID_ARGUMENT",
        Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
        Code::NotFound => "NOT_FOUND",
        Code::AlreadyExists => "ALREADY_EXISTS",
        Code::PermissionDenied => "PERMISSION_DENIED",
        Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
        Code::FailedPrecondition => "FAILED_PRECONDITION",
        Code::Aborted => "ABORTED",
        Code::OutOfRange => "OUT_OF_RANGE",
        Code::Unimplemented => "UNIMPLEMENTED",
        Code::Internal => "INTERNAL",
        Code::Unavailable => "UNAVAILABLE",
        Code::DataLoss => "DATA_LOSS",
        Code::Unauthenticated => "UNAUTHENTICATED",
    }
}

/// A plaintext HTTP/2 channel to `addr` with TCP_NODELAY set.
pub(crate) async fn channel(addr: SocketAddr) -> Result<Channel> {
    Endpoint::from_shared(format!("http://{addr}"))?
        .tcp_nodelay(true)
        .connect_timeout(Duration::from_secs(5))
        .connect()
        .await
        .with_context(|| format!("connecting to {addr}"))
}

/// `n` channels to `addr`; workers take them round robin, so one HTTP/2
/// connection does not become the bottleneck of the client.
pub(crate) async fn channels(addr: SocketAddr, n: usize) -> Result<Vec<Channel>> {
    let mut out = Vec::with_capacity(n);
    for _ in 0..n.max(1) {
        out.push(channel(addr).await?);
    }
    Ok(out)
}

// ------------------------------------------------------------------ evaluate

/// Pre-built EvaluateHealth requests: 10 to 100 random statuses, with the
/// consecutive defaults, custom consecutive thresholds or a window.
pub(crate) fn evaluate_requests(n: usize, seed: u64) -> Arc<Vec<EvaluateHealthRequest>> {
    let mut rng = fastrand::Rng::with_seed(seed);
    let requests = (0..n)
        .map(|i| {
            let statuses = (0..rng.usize(10..=100)).map(|_| rng.i32(1..=3)).collect();
            let thresholds = match i % 3 {
                0 => None,
                1 => Some(proto::Thresholds {
                    mode: Some(Mode::Consecutive(proto::ConsecutiveThresholds {
                        healthy_min_success_count: 2,
                        degraded_min_failure_count: 3,
                        unhealthy_min_failure_count: 6,
                    })),
                }),
                _ => Some(proto::Thresholds {
                    mode: Some(Mode::Window(proto::WindowThresholds {
                        window_size: 20,
                        degraded_min_failure_count: 5,
                        unhealthy_min_failure_count: 12,
                    })),
                }),
            };
            EvaluateHealthRequest { statuses, thresholds }
        })
        .collect();
    Arc::new(requests)
}

/// EvaluateHealth: the pure CPU path.
pub(crate) struct EvaluateWorker {
    client: HealthCheckServiceClient<Channel>,
    requests: Arc<Vec<EvaluateHealthRequest>>,
    next: usize,
}

impl EvaluateWorker {
    pub(crate) fn new(channel: Channel, requests: Arc<Vec<EvaluateHealthRequest>>, worker: usize) -> Self {
        EvaluateWorker {
            client: HealthCheckServiceClient::new(channel),
            requests,
            next: worker * 7919,
        }
    }
}

impl Worker for EvaluateWorker {
    fn call(&mut self) -> BoxFuture<'_, Outcome> {
        async move {
            let request = self.requests[self.next % self.requests.len()].clone();
            self.next = self.next.wrapping_add(1);
            match self.client.evaluate_health(request).await {
                Ok(_) => Outcome::ok(0),
                Err(status) => Outcome::code(0, code_name(status.code())),
            }
        }
        .boxed()
    }
}

// -------------------------------------------------------------------- submit

/// SubmitRun of a random status to one of 1,000 systems x 3 checks. Run ids
/// are unique per benchmark run, so every request writes.
pub(crate) struct SubmitWorker {
    client: HealthCheckServiceClient<Channel>,
    rng: fastrand::Rng,
    run_prefix: String,
    seq: u64,
}

impl SubmitWorker {
    pub(crate) fn new(channel: Channel, run_prefix: String, seed: u64) -> Self {
        SubmitWorker {
            client: HealthCheckServiceClient::new(channel),
            rng: fastrand::Rng::with_seed(seed),
            run_prefix,
            seq: 0,
        }
    }

    fn request(&mut self) -> SubmitRunRequest {
        self.seq += 1;
        SubmitRunRequest {
            run_id: format!("{}-{}", self.run_prefix, self.seq),
            system_id: system_id(self.rng.u32(..SYSTEMS)),
            check_id: check_id(self.rng.u32(..CHECKS_PER_SYSTEM)),
            status: self.rng.i32(1..=3),
            observed_at: None,
            latency: Some(prost_types::Duration {
                seconds: 0,
                nanos: self.rng.i32(1_000_000..500_000_000),
            }),
            message: String::new(),
        }
    }

    /// One SubmitRun; `flag` says whether the reply carried a transition.
    pub(crate) async fn submit(&mut self, kind: usize) -> Outcome {
        let request = self.request();
        match self.client.submit_run(request).await {
            Ok(reply) => Outcome {
                kind,
                code: "OK",
                flag: reply.get_ref().transition.is_some(),
            },
            Err(status) => Outcome::code(kind, code_name(status.code())),
        }
    }
}

/// The id of benchmark system `n`.
pub(crate) fn system_id(n: u32) -> String {
    format!("bench-sys-{n}")
}

/// The id of benchmark check `n`.
pub(crate) fn check_id(n: u32) -> String {
    format!("check-{n}")
}

impl Worker for SubmitWorker {
    fn call(&mut self) -> BoxFuture<'_, Outcome> {
        self.submit(0).boxed()
    }
}

// ---------------------------------------------------------------------- lock

/// Which keys a lock workload takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Keys {
    /// A random key per request: no two requests wait for each other.
    Random,
    /// [`CONTENDED_KEY`] for every request.
    One,
}

impl Keys {
    fn pick(self, rng: &mut fastrand::Rng) -> String {
        match self {
            Keys::Random => format!("bench-{:016x}", rng.u64(..)),
            Keys::One => CONTENDED_KEY.to_owned(),
        }
    }
}

/// How a lock workload holds its keys.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Hold {
    /// WithLock, exclusive.
    Exclusive,
    /// WithLock, `LOCK_MODE_SHARED`.
    Shared,
    /// WithLock, a semaphore of this many holders.
    Semaphore(u32),
    /// Campaign, then resign: leadership of the key as an election.
    Campaign,
}

/// One WithLock critical section: acquire, wait for `acquired`, release,
/// wait for `released` and the end of the stream.
pub(crate) async fn with_lock_once(
    client: &mut LockServiceClient<Channel>,
    key: String,
    wait: Duration,
) -> Result<(), Status> {
    hold_once(client, key, wait, Hold::Exclusive).await
}

/// One critical section held as `hold`.
pub(crate) async fn hold_once(
    client: &mut LockServiceClient<Channel>,
    key: String,
    wait: Duration,
    hold: Hold,
) -> Result<(), Status> {
    let wait_timeout = Some(prost_types::Duration {
        seconds: i64::try_from(wait.as_secs()).unwrap_or(i64::MAX),
        nanos: 0,
    });
    if hold == Hold::Campaign {
        return campaign_once(client, key, wait_timeout).await;
    }
    let (mode, max_holders) = match hold {
        Hold::Shared => (proto::LockMode::Shared, 0),
        Hold::Semaphore(n) => (proto::LockMode::Exclusive, n),
        Hold::Exclusive | Hold::Campaign => (proto::LockMode::Unspecified, 0),
    };
    let (tx, rx) = mpsc::channel(2);
    let acquire = WithLockRequest {
        action: Some(Action::Acquire(proto::Acquire {
            key,
            wait_timeout,
            owner: "vitals-bench".to_owned(),
            mode: mode as i32,
            max_holders,
        })),
    };
    tx.try_send(acquire)
        .map_err(|_| Status::internal("client: acquire not queued"))?;
    let mut inbound = client.with_lock(ReceiverStream::new(rx)).await?.into_inner();
    match inbound.message().await? {
        Some(proto::WithLockResponse {
            event: Some(Event::Acquired(_)),
        }) => {}
        _ => return Err(Status::internal("client: expected acquired")),
    }
    let release = WithLockRequest {
        action: Some(Action::Release(proto::Release {})),
    };
    tx.send(release)
        .await
        .map_err(|_| Status::internal("client: release not sent"))?;
    drop(tx);
    match inbound.message().await? {
        Some(proto::WithLockResponse {
            event: Some(Event::Released(_)),
        }) => {}
        _ => return Err(Status::internal("client: expected released")),
    }
    // The trailers carry the stream's final status.
    while inbound.message().await?.is_some() {}
    Ok(())
}

/// One leadership: campaign, wait for `elected`, resign, wait for
/// `resigned` and the end of the stream.
async fn campaign_once(
    client: &mut LockServiceClient<Channel>,
    election: String,
    wait_timeout: Option<prost_types::Duration>,
) -> Result<(), Status> {
    use proto::{campaign_request::Action as C, campaign_response::Event as E};
    let (tx, rx) = mpsc::channel(2);
    let campaign = proto::CampaignRequest {
        action: Some(C::Campaign(proto::Campaign {
            election,
            candidate_value: "vitals-bench".to_owned(),
            wait_timeout,
        })),
    };
    tx.try_send(campaign)
        .map_err(|_| Status::internal("client: campaign not queued"))?;
    let mut inbound = client.campaign(ReceiverStream::new(rx)).await?.into_inner();
    if !matches!(
        inbound.message().await?,
        Some(proto::CampaignResponse {
            event: Some(E::Elected(_))
        })
    ) {
        return Err(Status::internal("client: expected elected"));
    }
    let resign = proto::CampaignRequest {
        action: Some(C::Resign(proto::Resign {})),
    };
    tx.send(resign)
        .await
        .map_err(|_| Status::internal("client: resign not sent"))?;
    drop(tx);
    if !matches!(
        inbound.message().await?,
        Some(proto::CampaignResponse {
            event: Some(E::Resigned(_))
        })
    ) {
        return Err(Status::internal("client: expected resigned"));
    }
    while inbound.message().await?.is_some() {}
    Ok(())
}

/// WithLock acquire + release.
pub(crate) struct LockWorker {
    client: LockServiceClient<Channel>,
    rng: fastrand::Rng,
    keys: Keys,
    wait: Duration,
    hold: Hold,
}

impl LockWorker {
    pub(crate) fn new(channel: Channel, keys: Keys, wait: Duration, seed: u64) -> Self {
        LockWorker {
            client: LockServiceClient::new(channel),
            rng: fastrand::Rng::with_seed(seed),
            keys,
            wait,
            hold: Hold::Exclusive,
        }
    }

    /// The same worker, holding its keys as `hold`.
    pub(crate) fn holding(mut self, hold: Hold) -> Self {
        self.hold = hold;
        self
    }

    pub(crate) async fn lock(&mut self, kind: usize) -> Outcome {
        let key = self.keys.pick(&mut self.rng);
        match hold_once(&mut self.client, key, self.wait, self.hold).await {
            Ok(()) => Outcome::ok(kind),
            Err(status) => Outcome::code(kind, code_name(status.code())),
        }
    }
}

impl Worker for LockWorker {
    fn call(&mut self) -> BoxFuture<'_, Outcome> {
        self.lock(0).boxed()
    }
}

// --------------------------------------------------------------------- mixed

/// Kind of a mixed request: SubmitRun.
pub(crate) const MIXED_SUBMIT: usize = 0;
/// Kind of a mixed request: WithLock on a random key.
pub(crate) const MIXED_LOCK: usize = 1;

/// `submit_percent` % SubmitRun, the rest WithLock on random keys.
pub(crate) struct MixedWorker {
    submit: SubmitWorker,
    lock: LockWorker,
    rng: fastrand::Rng,
    submit_percent: u32,
}

impl MixedWorker {
    pub(crate) fn new(submit: SubmitWorker, lock: LockWorker, submit_percent: u32, seed: u64) -> Self {
        MixedWorker {
            submit,
            lock,
            rng: fastrand::Rng::with_seed(seed),
            submit_percent,
        }
    }
}

impl Worker for MixedWorker {
    fn call(&mut self) -> BoxFuture<'_, Outcome> {
        async move {
            if self.rng.u32(..100) < self.submit_percent {
                self.submit.submit(MIXED_SUBMIT).await
            } else {
                self.lock.lock(MIXED_LOCK).await
            }
        }
        .boxed()
    }
}

// ---------------------------------------------------------------------- etcd

/// An etcd client on its own channel (TCP_NODELAY set like the vitals ones).
pub(crate) async fn etcd_client(addr: SocketAddr) -> Result<etcd_client::Client> {
    let channel = channel(addr).await?;
    etcd_client::Client::from_channel(etcd_client::Channel::Tonic(channel), None)
        .await
        .context("etcd client")
}

fn etcd_code(err: &etcd_client::Error) -> &'static str {
    match err {
        etcd_client::Error::GRpcStatus(status) => code_name(status.code()),
        etcd_client::Error::TransportError(_) => "TRANSPORT",
        _ => "CLIENT_ERROR",
    }
}

/// How an etcd lock worker gets the lease its lock is attached to.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Lease {
    /// One lease per worker, granted before the run (etcd's
    /// `concurrency.Session`, what its own clients do): Lock + Unlock per
    /// request.
    Session(i64),
    /// Lease grant, Lock, Unlock and lease revoke per request.
    PerRequest,
}

/// Lease TTL of the etcd lock workloads, seconds.
pub(crate) const ETCD_LEASE_TTL: i64 = 60;

/// etcd v3 Lock API: lock + unlock, with a lease per session or per request.
pub(crate) struct EtcdLockWorker {
    client: etcd_client::Client,
    rng: fastrand::Rng,
    keys: Keys,
    lease: Lease,
}

impl EtcdLockWorker {
    pub(crate) fn new(client: etcd_client::Client, keys: Keys, lease: Lease, seed: u64) -> Self {
        EtcdLockWorker {
            client,
            rng: fastrand::Rng::with_seed(seed),
            keys,
            lease,
        }
    }

    async fn once(&mut self) -> Result<(), etcd_client::Error> {
        let name = self.keys.pick(&mut self.rng);
        let lease = match self.lease {
            Lease::Session(id) => id,
            Lease::PerRequest => self.client.lease_grant(ETCD_LEASE_TTL, None).await?.id(),
        };
        let locked = self
            .client
            .lock(name, Some(LockOptions::new().with_lease(lease)))
            .await?;
        self.client.unlock(locked.key()).await?;
        if matches!(self.lease, Lease::PerRequest) {
            self.client.lease_revoke(lease).await?;
        }
        Ok(())
    }
}

impl Worker for EtcdLockWorker {
    fn call(&mut self) -> BoxFuture<'_, Outcome> {
        async move {
            match self.once().await {
                Ok(()) => Outcome::ok(0),
                Err(err) => Outcome::code(0, etcd_code(&err)),
            }
        }
        .boxed()
    }
}
