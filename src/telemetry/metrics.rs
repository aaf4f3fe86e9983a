//! The Prometheus metrics of one vitals server: every series it exports,
//! registered once, and the handles the parts of vitals update.
//!
//! Each [`crate::Application`] has its own registry (a
//! [`PrometheusRecorder`] that is never installed as the process's global
//! recorder), so servers that share a process, as the tests' do, count only
//! their own traffic. Handles are created when the server is built; what a
//! request or a lock grant does is an atomic update of a handle it already
//! has, never a lookup by name, an allocation for a label or a formatted
//! string.
//!
//! Labels are closed sets: gRPC methods come from the services' descriptors
//! (anything else is `unknown`), codes and reasons from fixed lists,
//! statuses and pools from enums. No system id, key or request id is ever a
//! label.
//!
//! Counters, the gRPC and lock figures are updated where things happen;
//! gauges that mirror state held elsewhere (pool connections, watchers,
//! readiness) are read when `/metrics` is scraped ([`Metrics::render`] runs
//! the server's refresh first); the systems per status come from a
//! background count (see [`crate::app`]), never from a scrape.

use std::{
    collections::HashMap,
    sync::{
        Arc, OnceLock,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use metrics::{Counter, Gauge, Histogram, Key, KeyName, Label, Level, Metadata, Recorder, SharedString};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle, PrometheusRecorder};
use prost::Message;
use tonic::Code;

use crate::{domain::Status, error::Error};

/// `grpc_server_handling_seconds` buckets: go-grpc-prometheus's defaults, so
/// that dashboards written for it read ours alike.
const RPC_BUCKETS: &[f64] = &[0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0];

/// Waits for a connection: from a free one (microseconds) to the acquire
/// timeout (10 s by default).
const ACQUIRE_BUCKETS: &[f64] = &[0.0001, 0.0005, 0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0];

/// Waits for a lock: a free one (a round trip), a queue behind a holder, up
/// to `VITALS_MAX_LOCK_WAIT_MS` (5 minutes).
const LOCK_WAIT_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0, 300.0,
];

/// Critical sections: from a millisecond to hours of keep-alives.
const LOCK_HOLD_BUCKETS: &[f64] = &[0.001, 0.01, 0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0, 300.0, 3600.0];

/// Every metric: name, kind, help. [`Metrics`] describes each (a `# HELP`
/// line, which `promtool check metrics` asks for) and registers its series.
const GRPC_STARTED: &str = "grpc_server_started_total";
const GRPC_HANDLED: &str = "grpc_server_handled_total";
const GRPC_SECONDS: &str = "grpc_server_handling_seconds";
const ERRORS: &str = "vitals_errors_total";
const POOL_CONNECTIONS: &str = "vitals_db_pool_connections";
const POOL_ACQUIRE: &str = "vitals_db_pool_acquire_seconds";
const POOL_TIMEOUTS: &str = "vitals_db_pool_timeouts_total";
const LOCKS_HELD: &str = "vitals_locks_held";
const LOCKS_WAITING: &str = "vitals_locks_waiting";
const LOCK_WAIT: &str = "vitals_lock_wait_seconds";
const LOCK_HOLD: &str = "vitals_lock_hold_seconds";
const LOCK_GRANTS: &str = "vitals_lock_grants_total";
const LOCK_LOST: &str = "vitals_lock_lost_total";
const WRITE_GROUPS: &str = "vitals_db_write_groups_total";
const WRITE_GROUP_MEMBERS: &str = "vitals_db_write_group_members_total";
const RUNS: &str = "vitals_runs_submitted_total";
const TRANSITIONS: &str = "vitals_transitions_total";
const SYSTEMS: &str = "vitals_systems";
const WATCHERS: &str = "vitals_watchers";
const READY: &str = "vitals_ready";
const BUILD_INFO: &str = "vitals_build_info";

/// Which kind of series a name is, for its description.
#[derive(Clone, Copy)]
enum Kind {
    Counter,
    Gauge,
    Histogram,
}

/// Every metric vitals exports, with its kind and help text, in the order
/// `/metrics` is documented (README, Observability).
pub const METRICS: &[(&str, &str)] = &[
    (GRPC_STARTED, "RPCs started on the server."),
    (
        GRPC_HANDLED,
        "RPCs completed on the server, whatever their status (refusals at the edge included).",
    ),
    (
        GRPC_SECONDS,
        "Seconds from an RPC's arrival to its status (streams: to their end).",
    ),
    (ERRORS, "Error statuses sent, by their ErrorInfo reason."),
    (POOL_CONNECTIONS, "Database connections open, by pool and state."),
    (POOL_ACQUIRE, "Seconds a request waited for a work connection."),
    (
        POOL_TIMEOUTS,
        "Waits for a connection that ran out of time (WORK_POOL_EXHAUSTED).",
    ),
    (
        WRITE_GROUPS,
        "Statements that stored the runs of several systems at once, by outcome (applied; refused: written one by one).",
    ),
    (WRITE_GROUP_MEMBERS, "Runs stored by applied group statements."),
    (LOCKS_HELD, "WithLock locks held now."),
    (LOCKS_WAITING, "WithLock streams waiting for their lock now."),
    (
        LOCK_WAIT,
        "Seconds a WithLock stream waited until its lock was granted.",
    ),
    (LOCK_HOLD, "Seconds a WithLock lock was held."),
    (LOCK_GRANTS, "WithLock locks granted."),
    (
        LOCK_LOST,
        "WithLock locks lost while held, by why (lease: no keep_alive in time; session: its database session ended).",
    ),
    (RUNS, "SubmitRun requests by outcome (new, duplicate, conflict)."),
    (
        TRANSITIONS,
        "System status changes recorded by this server, by the new status.",
    ),
    (SYSTEMS, "Systems by their status, as last counted in the database."),
    (WATCHERS, "WatchTransitions streams open now."),
    (READY, "1 while the database answers and the server serves, else 0."),
    (BUILD_INFO, "Always 1; the version label says which vitals runs."),
];

fn kind_of(name: &str) -> Kind {
    match name {
        GRPC_SECONDS | POOL_ACQUIRE | LOCK_WAIT | LOCK_HOLD => Kind::Histogram,
        POOL_CONNECTIONS | LOCKS_HELD | LOCKS_WAITING | SYSTEMS | WATCHERS | READY | BUILD_INFO => Kind::Gauge,
        _ => Kind::Counter,
    }
}

/// gRPC code names as go-grpc-prometheus spells them (Go's `codes.Code`),
/// indexed by the code's number.
const CODE_NAMES: [&str; 17] = [
    "OK",
    "Canceled",
    "Unknown",
    "InvalidArgument",
    "DeadlineExceeded",
    "NotFound",
    "AlreadyExists",
    "PermissionDenied",
    "ResourceExhausted",
    "FailedPrecondition",
    "Aborted",
    "OutOfRange",
    "Unimplemented",
    "Internal",
    "Unavailable",
    "DataLoss",
    "Unauthenticated",
];

/// The label of a pool.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pool {
    /// The work pool (embedded: the writer and the readers).
    Work,
    /// The lock sessions (PostgreSQL only).
    Lock,
}

impl Pool {
    fn label(self) -> &'static str {
        match self {
            Pool::Work => "work",
            Pool::Lock => "lock",
        }
    }
}

/// Open connections of a pool, split by whether a request uses them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PoolUse {
    /// Open and idle.
    pub idle: u64,
    /// Open and taken.
    pub in_use: u64,
}

/// How a SubmitRun ended, for `vitals_runs_submitted_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RunOutcome {
    /// A run stored for the first time.
    New,
    /// A repeated `run_id` with the same content: nothing written.
    Duplicate,
    /// A repeated `run_id` with other content: `RUN_ID_CONFLICT`.
    Conflict,
}

/// Why a held lock was lost, for `vitals_lock_lost_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LostReason {
    /// No keep_alive or release within the lease.
    Lease,
    /// The lock's database session ended or stopped answering.
    Session,
}

/// Registers series on one recorder, or hands out no-op handles when the
/// metrics are off.
struct Registrar<'a>(Option<&'a PrometheusRecorder>);

static METADATA: Metadata<'static> = Metadata::new(module_path!(), Level::INFO, Some(module_path!()));

impl Registrar<'_> {
    fn key(name: &'static str, labels: &[(&'static str, SharedString)]) -> Key {
        let labels: Vec<Label> = labels.iter().map(|(k, v)| Label::new(*k, v.clone())).collect();
        Key::from_parts(name, labels)
    }

    fn counter(&self, name: &'static str, labels: &[(&'static str, SharedString)]) -> Counter {
        self.0.map_or(Counter::noop(), |r| {
            r.register_counter(&Self::key(name, labels), &METADATA)
        })
    }

    fn gauge(&self, name: &'static str, labels: &[(&'static str, SharedString)]) -> Gauge {
        self.0
            .map_or(Gauge::noop(), |r| r.register_gauge(&Self::key(name, labels), &METADATA))
    }

    fn histogram(&self, name: &'static str, labels: &[(&'static str, SharedString)]) -> Histogram {
        self.0.map_or(Histogram::noop(), |r| {
            r.register_histogram(&Self::key(name, labels), &METADATA)
        })
    }
}

fn label(value: &'static str) -> SharedString {
    SharedString::const_str(value)
}

/// The metrics of one server. Cheap to clone; [`Metrics::disabled`] when
/// `VITALS_METRICS_ADDR` is empty: every handle is a no-op.
#[derive(Clone)]
pub struct Metrics {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics")
            .field("enabled", &self.inner.recorder.is_some())
            .finish_non_exhaustive()
    }
}

struct Inner {
    /// The registry every series lives in; `None` when off.
    recorder: Option<Arc<PrometheusRecorder>>,
    /// Renders the registry.
    handle: Option<PrometheusHandle>,
    grpc: Arc<GrpcMetrics>,
    pools: [PoolMetrics; 2],
    pool_connections: [[Gauge; 2]; 2],
    locks: LockMetrics,
    runs: RunMetrics,
    systems: [Gauge; 3],
    watchers: Gauge,
    ready: Gauge,
    /// `vitals_db_write_groups_total` applied and refused, and
    /// `vitals_db_write_group_members_total`: the store counts, a scrape copies.
    write_groups: [Counter; 3],
}

impl Metrics {
    /// A registry with every series of vitals registered.
    pub fn new() -> Self {
        Self::build(true)
    }

    /// No registry: every handle does nothing and [`Metrics::render`] is
    /// empty.
    pub fn disabled() -> Self {
        Self::build(false)
    }

    fn build(enabled: bool) -> Self {
        let recorder = enabled.then(|| {
            let builder = [
                (GRPC_SECONDS, RPC_BUCKETS),
                (POOL_ACQUIRE, ACQUIRE_BUCKETS),
                (LOCK_WAIT, LOCK_WAIT_BUCKETS),
                (LOCK_HOLD, LOCK_HOLD_BUCKETS),
            ]
            .into_iter()
            .try_fold(PrometheusBuilder::new(), |builder, (name, buckets)| {
                builder.set_buckets_for_metric(Matcher::Full(name.to_owned()), buckets)
            })
            // Only an empty bucket list is refused, and none is; were one,
            // the histograms would render as summaries.
            .unwrap_or_else(|_| PrometheusBuilder::new());
            Arc::new(builder.build_recorder())
        });
        let handle = recorder.as_deref().map(PrometheusRecorder::handle);
        if let Some(recorder) = &recorder {
            for (name, help) in METRICS {
                let name = KeyName::from_const_str(name);
                let help = SharedString::const_str(help);
                match kind_of(name.as_str()) {
                    Kind::Counter => recorder.describe_counter(name, None, help),
                    Kind::Gauge => recorder.describe_gauge(name, None, help),
                    Kind::Histogram => recorder.describe_histogram(name, None, help),
                }
            }
        }
        let r = Registrar(recorder.as_deref());
        let pool = |pool: Pool| PoolMetrics {
            acquire: r.histogram(POOL_ACQUIRE, &[("pool", label(pool.label()))]),
            timeouts: r.counter(POOL_TIMEOUTS, &[("pool", label(pool.label()))]),
        };
        let connections = |pool: Pool| {
            ["idle", "in_use"].map(|state| {
                r.gauge(
                    POOL_CONNECTIONS,
                    &[("pool", label(pool.label())), ("state", label(state))],
                )
            })
        };
        let locks = LockMetrics {
            inner: Arc::new(LockHandles {
                held: r.gauge(LOCKS_HELD, &[]),
                waiting: r.gauge(LOCKS_WAITING, &[]),
                wait: r.histogram(LOCK_WAIT, &[]),
                hold: r.histogram(LOCK_HOLD, &[]),
                grants: r.counter(LOCK_GRANTS, &[]),
                lost_lease: r.counter(LOCK_LOST, &[("reason", label("lease"))]),
                lost_session: r.counter(LOCK_LOST, &[("reason", label("session"))]),
            }),
        };
        let runs = RunMetrics {
            inner: Arc::new(RunHandles {
                new: r.counter(RUNS, &[("outcome", label("new"))]),
                duplicate: r.counter(RUNS, &[("outcome", label("duplicate"))]),
                conflict: r.counter(RUNS, &[("outcome", label("conflict"))]),
                transitions: Status::ALL.map(|s| r.counter(TRANSITIONS, &[("to_status", label(s.as_str()))])),
            }),
        };
        r.gauge(BUILD_INFO, &[("version", label(env!("CARGO_PKG_VERSION")))])
            .set(1.0);
        let grpc = Arc::new(GrpcMetrics::new(recorder.clone()));
        let inner = Inner {
            grpc,
            pools: [pool(Pool::Work), pool(Pool::Lock)],
            pool_connections: [connections(Pool::Work), connections(Pool::Lock)],
            locks,
            runs,
            systems: Status::ALL.map(|s| r.gauge(SYSTEMS, &[("status", label(s.as_str()))])),
            watchers: r.gauge(WATCHERS, &[]),
            ready: r.gauge(READY, &[]),
            write_groups: [
                r.counter(WRITE_GROUPS, &[("outcome", label("applied"))]),
                r.counter(WRITE_GROUPS, &[("outcome", label("refused"))]),
                r.counter(WRITE_GROUP_MEMBERS, &[]),
            ],
            handle,
            recorder,
        };
        Metrics { inner: Arc::new(inner) }
    }

    /// Whether a registry backs these metrics.
    pub fn is_enabled(&self) -> bool {
        self.inner.recorder.is_some()
    }

    /// The registry in the Prometheus text format (version 0.0.4).
    pub fn render(&self) -> String {
        self.inner
            .handle
            .as_ref()
            .map(PrometheusHandle::render)
            .unwrap_or_default()
    }

    /// Folds the histograms' recent observations into their buckets. The
    /// exporter keeps each observation until then, so a server that nobody
    /// scrapes runs this periodically to keep that memory small.
    pub fn upkeep(&self) {
        if let Some(handle) = &self.inner.handle {
            handle.run_upkeep();
        }
    }

    /// The gRPC series, for the edge's metrics layer.
    pub fn grpc(&self) -> Arc<GrpcMetrics> {
        self.inner.grpc.clone()
    }

    /// The handles of the lock manager.
    pub fn locks(&self) -> LockMetrics {
        self.inner.locks.clone()
    }

    /// The handles of `pool`'s waits.
    pub fn pool(&self, pool: Pool) -> PoolMetrics {
        self.inner.pools[pool as usize].clone()
    }

    /// The handles of the health-check use cases.
    pub fn runs(&self) -> RunMetrics {
        self.inner.runs.clone()
    }

    /// Sets `vitals_db_pool_connections` of `pool`.
    pub fn set_pool_use(&self, pool: Pool, usage: PoolUse) {
        let [idle, in_use] = &self.inner.pool_connections[pool as usize];
        idle.set(usage.idle as f64);
        in_use.set(usage.in_use as f64);
    }

    /// Sets the group-write counters to the store's counts since it opened.
    pub fn set_write_groups(&self, applied: u64, refused: u64, members: u64) {
        let [applied_total, refused_total, members_total] = &self.inner.write_groups;
        applied_total.absolute(applied);
        refused_total.absolute(refused);
        members_total.absolute(members);
    }

    /// Sets `vitals_watchers`.
    pub fn set_watchers(&self, watchers: usize) {
        self.inner.watchers.set(watchers as f64);
    }

    /// Sets `vitals_ready`.
    pub fn set_ready(&self, ready: bool) {
        self.inner.ready.set(if ready { 1.0 } else { 0.0 });
    }

    /// Sets `vitals_systems` from a count of systems per status.
    pub fn set_systems(&self, counts: &[(Status, u64)]) {
        for (status, gauge) in Status::ALL.iter().zip(&self.inner.systems) {
            let count = counts.iter().filter(|(s, _)| s == status).map(|(_, n)| *n).sum::<u64>();
            gauge.set(count as f64);
        }
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::disabled()
    }
}

/// The handles of a pool's waits for a connection.
#[derive(Debug, Clone)]
pub struct PoolMetrics {
    acquire: Histogram,
    timeouts: Counter,
}

impl PoolMetrics {
    /// Handles that do nothing.
    pub fn disabled() -> Self {
        PoolMetrics {
            acquire: Histogram::noop(),
            timeouts: Counter::noop(),
        }
    }

    /// A wait that began at `started` got a connection, or (`timed_out`)
    /// ran out of time.
    pub fn acquired(&self, started: Instant, timed_out: bool) {
        self.acquire.record(started.elapsed().as_secs_f64());
        if timed_out {
            self.timeouts.increment(1);
        }
    }
}

impl Default for PoolMetrics {
    fn default() -> Self {
        PoolMetrics::disabled()
    }
}

/// The lock manager's handles: one allocation, shared by every held lock.
#[derive(Debug, Clone)]
pub struct LockMetrics {
    inner: Arc<LockHandles>,
}

#[derive(Debug)]
struct LockHandles {
    held: Gauge,
    waiting: Gauge,
    wait: Histogram,
    hold: Histogram,
    grants: Counter,
    lost_lease: Counter,
    lost_session: Counter,
}

impl LockMetrics {
    /// Handles that do nothing.
    pub fn disabled() -> Self {
        LockMetrics {
            inner: Arc::new(LockHandles {
                held: Gauge::noop(),
                waiting: Gauge::noop(),
                wait: Histogram::noop(),
                hold: Histogram::noop(),
                grants: Counter::noop(),
                lost_lease: Counter::noop(),
                lost_session: Counter::noop(),
            }),
        }
    }

    /// A stream starts waiting for its lock; it stops when the guard drops.
    pub fn waiting(&self) -> Waiting<'_> {
        self.inner.waiting.increment(1.0);
        Waiting(&self.inner.waiting)
    }

    /// A lock was granted at `now` after a wait since `asked`; it counts as
    /// held until the returned guard drops.
    pub fn granted(&self, asked: Instant, now: Instant) -> Holding {
        self.inner.grants.increment(1);
        self.inner
            .wait
            .record(now.saturating_duration_since(asked).as_secs_f64());
        self.inner.held.increment(1.0);
        Holding {
            handles: self.inner.clone(),
            since: now,
            lost: AtomicBool::new(false),
        }
    }
}

impl Default for LockMetrics {
    fn default() -> Self {
        LockMetrics::disabled()
    }
}

/// A wait for a lock in progress (see [`LockMetrics::waiting`]).
#[derive(Debug)]
pub struct Waiting<'a>(&'a Gauge);

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.decrement(1.0);
    }
}

/// A held lock (see [`LockMetrics::granted`]): dropping it records how long
/// it was held.
#[derive(Debug)]
pub struct Holding {
    handles: Arc<LockHandles>,
    since: Instant,
    /// Counted as lost already: a loss is told to the client and found
    /// again by the release that follows, and counts once.
    lost: AtomicBool,
}

impl Holding {
    /// The held lock was lost (counted the first time only).
    pub fn lost(&self, why: LostReason) {
        if self.lost.swap(true, Ordering::Relaxed) {
            return;
        }
        match why {
            LostReason::Lease => self.handles.lost_lease.increment(1),
            LostReason::Session => self.handles.lost_session.increment(1),
        }
    }
}

impl Drop for Holding {
    fn drop(&mut self) {
        self.handles.held.decrement(1.0);
        self.handles.hold.record(self.since.elapsed().as_secs_f64());
    }
}

/// The handles of the health-check use cases.
#[derive(Debug, Clone)]
pub struct RunMetrics {
    inner: Arc<RunHandles>,
}

#[derive(Debug)]
struct RunHandles {
    new: Counter,
    duplicate: Counter,
    conflict: Counter,
    /// Indexed like [`Status::ALL`].
    transitions: [Counter; 3],
}

impl RunMetrics {
    /// Handles that do nothing.
    pub fn disabled() -> Self {
        RunMetrics {
            inner: Arc::new(RunHandles {
                new: Counter::noop(),
                duplicate: Counter::noop(),
                conflict: Counter::noop(),
                transitions: [Counter::noop(), Counter::noop(), Counter::noop()],
            }),
        }
    }

    /// A SubmitRun ended with `outcome`.
    pub fn run(&self, outcome: RunOutcome) {
        match outcome {
            RunOutcome::New => &self.inner.new,
            RunOutcome::Duplicate => &self.inner.duplicate,
            RunOutcome::Conflict => &self.inner.conflict,
        }
        .increment(1);
    }

    /// A system's status changed to `to`.
    pub fn transition(&self, to: Status) {
        if let Some(i) = Status::ALL.iter().position(|s| *s == to) {
            self.inner.transitions[i].increment(1);
        }
    }
}

impl Default for RunMetrics {
    fn default() -> Self {
        RunMetrics::disabled()
    }
}

/// What go-grpc-prometheus calls `grpc_type`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum RpcType {
    Unary,
    ClientStream,
    ServerStream,
    BidiStream,
}

impl RpcType {
    fn of(client_streaming: bool, server_streaming: bool) -> Self {
        match (client_streaming, server_streaming) {
            (false, false) => RpcType::Unary,
            (true, false) => RpcType::ClientStream,
            (false, true) => RpcType::ServerStream,
            (true, true) => RpcType::BidiStream,
        }
    }

    fn label(self) -> &'static str {
        match self {
            RpcType::Unary => "unary",
            RpcType::ClientStream => "client_stream",
            RpcType::ServerStream => "server_stream",
            RpcType::BidiStream => "bidi_stream",
        }
    }
}

/// The descriptor sets of every service the server registers.
const SERVED: [&[u8]; 4] = [
    crate::proto::FILE_DESCRIPTOR_SET,
    tonic_health::pb::FILE_DESCRIPTOR_SET,
    tonic_reflection::pb::v1::FILE_DESCRIPTOR_SET,
    tonic_reflection::pb::v1alpha::FILE_DESCRIPTOR_SET,
];

/// The gRPC series of one method.
struct Method {
    labels: [(&'static str, SharedString); 3],
    started: Counter,
    seconds: Histogram,
    /// Indexed by code; registered at the code's first use (most methods
    /// never see most codes), `OK` at start.
    handled: [OnceLock<Counter>; 17],
}

/// The gRPC series of every method the server serves, found by path.
pub struct GrpcMetrics {
    /// The registry, for the series of codes registered at their first use.
    recorder: Option<Arc<PrometheusRecorder>>,
    methods: Vec<Method>,
    /// `/package.Service/Method` -> index in `methods`.
    by_path: HashMap<String, usize>,
    /// Index of the `unknown` method, for paths nobody serves.
    unknown: usize,
    /// Indexed like [`Error::REASONS`]; shared with [`Metrics`].
    errors: Vec<Counter>,
}

impl std::fmt::Debug for GrpcMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GrpcMetrics")
            .field("methods", &self.methods.len())
            .finish_non_exhaustive()
    }
}

/// One RPC in progress, from [`GrpcMetrics::start`] to
/// [`GrpcMetrics::finish`].
#[derive(Debug, Clone, Copy)]
pub struct RpcCall {
    method: usize,
    started: Instant,
}

impl GrpcMetrics {
    fn new(recorder: Option<Arc<PrometheusRecorder>>) -> Self {
        let r = Registrar(recorder.as_deref());
        let mut methods = Vec::new();
        let mut by_path = HashMap::new();
        let mut add = |service: String, method: String, kind: RpcType| {
            let path = format!("/{service}/{method}");
            let labels = [
                ("grpc_service", SharedString::from(service)),
                ("grpc_method", SharedString::from(method)),
                ("grpc_type", label(kind.label())),
            ];
            let handled: [OnceLock<Counter>; 17] = Default::default();
            let mut with_code = labels.to_vec();
            with_code.push(("grpc_code", label(CODE_NAMES[0])));
            let _ = handled[0].set(r.counter(GRPC_HANDLED, &with_code));
            let m = Method {
                started: r.counter(GRPC_STARTED, &labels),
                seconds: r.histogram(GRPC_SECONDS, &labels),
                handled,
                labels,
            };
            by_path.insert(path, methods.len());
            methods.push(m);
            methods.len() - 1
        };
        for set in SERVED {
            let Ok(files) = prost_types::FileDescriptorSet::decode(set) else {
                continue;
            };
            for file in files.file {
                let package = file.package.unwrap_or_default();
                for service in file.service {
                    let service_name = match (package.as_str(), service.name.as_deref()) {
                        ("", Some(name)) => name.to_owned(),
                        (package, Some(name)) => format!("{package}.{name}"),
                        (_, None) => continue,
                    };
                    for method in service.method {
                        let Some(name) = method.name.clone() else { continue };
                        let kind = RpcType::of(method.client_streaming(), method.server_streaming());
                        let _ = add(service_name.clone(), name, kind);
                    }
                }
            }
        }
        let unknown = add("unknown".into(), "unknown".into(), RpcType::Unary);
        let errors = Error::REASONS
            .iter()
            .map(|reason| r.counter(ERRORS, &[("reason", label(reason))]))
            .collect();
        GrpcMetrics {
            recorder,
            methods,
            by_path,
            unknown,
            errors,
        }
    }

    /// An RPC on `path` arrived: `grpc_server_started_total`.
    pub fn start(&self, path: &str) -> RpcCall {
        let method = self.by_path.get(path).copied().unwrap_or(self.unknown);
        if let Some(m) = self.methods.get(method) {
            m.started.increment(1);
        }
        RpcCall {
            method,
            started: Instant::now(),
        }
    }

    /// The RPC ended with `code`: `grpc_server_handled_total` and
    /// `grpc_server_handling_seconds`.
    pub fn finish(&self, call: RpcCall, code: Code) {
        let Some(m) = self.methods.get(call.method) else { return };
        m.seconds.record(call.started.elapsed().as_secs_f64());
        let index = usize::try_from(i32::from(code)).unwrap_or(2).min(16);
        if let Some(counter) = m.handled.get(index) {
            counter
                .get_or_init(|| {
                    let mut labels = m.labels.to_vec();
                    labels.push(("grpc_code", label(CODE_NAMES[index])));
                    Registrar(self.recorder.as_deref()).counter(GRPC_HANDLED, &labels)
                })
                .increment(1);
        }
    }

    /// An error status carrying an ErrorInfo with `reason` was sent:
    /// `vitals_errors_total`. Reasons vitals does not send are not counted.
    pub fn error(&self, reason: &str) {
        if let Some(i) = Error::REASONS.iter().position(|r| *r == reason) {
            self.errors[i].increment(1);
        }
    }
}

/// How long at most between two [`Metrics::upkeep`]s.
pub const UPKEEP_INTERVAL: Duration = Duration::from_secs(5);
