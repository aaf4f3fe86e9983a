//! The server as a library value: [`Application::build`] binds its port and
//! wires the parts; [`Application::run_until_stopped`] serves until the given
//! future resolves, then shuts down in order.
//!
//! Shutdown is a sequence: health NOT_SERVING and new business RPCs refused,
//! watchers ended with `SHUTTING_DOWN` (a watch has no end of its own to wait
//! for), the retention pass stopped (after the delete in progress, a short
//! one), stop accepting, drain in-flight RPCs for up to `VITALS_SHUTDOWN_GRACE_MS`,
//! end what is left (open lock streams end with `SHUTTING_DOWN` and their
//! locks are released; the lock sessions close), close the pools (embedded:
//! the SQLite connections, then the data directory's lock). The process is
//! done within the grace plus [`CLOSE_LIMIT`], whatever clients do.

use std::{future::Future, net::SocketAddr, sync::Arc, time::Duration};

use tokio::{net::TcpListener, sync::watch};
use tonic::transport::Server;
use tonic_health::{ServingStatus, server::HealthReporter};

use crate::{
    api::{HealthApi, LockApi},
    config::Config,
    db::{Database, OpenError},
    lock::Locks,
    middleware::{EdgeLayer, Readiness},
    proto::{self, health_check_service_server::HealthCheckServiceServer, lock_service_server::LockServiceServer},
    service::HealthService,
    store::{RetentionPass, Store, TransitionFeed, TransitionNotifier, WatchLimits, WriteRules},
    telemetry::{
        endpoint,
        metrics::{Metrics, Pool, PoolUse, UPKEEP_INTERVAL},
    },
};

/// Errors that stop the server from starting or running.
///
/// `Display` is the whole message the operator reads (the binary prints it
/// and exits), the cause included; the cause is also `source()`.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The listen address could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
    /// The metrics address (`VITALS_METRICS_ADDR`) could not be bound.
    #[error("cannot serve metrics on {addr} (VITALS_METRICS_ADDR; empty turns metrics off): {source}")]
    BindMetrics {
        /// The address.
        addr: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
    /// The configured database cannot be opened.
    #[error(transparent)]
    Database(#[from] OpenError),
    /// The reflection services cannot be built from the descriptor sets
    /// compiled into the binary (a build problem).
    #[error("reflection: {0}")]
    Reflection(#[source] tonic_reflection::server::Error),
    /// The gRPC server failed.
    #[error("server error: {0}")]
    Serve(#[from] tonic::transport::Error),
    /// The task serving gRPC panicked.
    #[error("server task failed: {0}")]
    ServerTask(#[source] tokio::task::JoinError),
}

/// Names under which health is reported.
const HEALTH_SERVICES: [&str; 3] = ["", "vitals.v1.HealthCheckService", "vitals.v1.LockService"];

/// How long closing the database may take after the grace.
pub const CLOSE_LIMIT: Duration = Duration::from_millis(800);

/// How long, of [`CLOSE_LIMIT`], the lock streams ended after the grace
/// have to deliver `SHUTTING_DOWN` before their connections are cut.
const STREAMS_END_LIMIT: Duration = Duration::from_millis(400);

/// Rows per retention delete: one check's oldest runs through its index, a
/// few milliseconds of the embedded store's writer (see
/// [`crate::store::retention`]).
const RETENTION_BATCH: u32 = 1000;

/// A built, bound, not yet serving vitals.
pub struct Application {
    config: Config,
    listener: TcpListener,
    addr: SocketAddr,
    database: Database,
    locks: Locks,
    store: Store,
    feed: TransitionFeed,
    metrics: Metrics,
    /// `/metrics`, bound; `None` when `VITALS_METRICS_ADDR` is empty.
    metrics_listener: Option<(TcpListener, SocketAddr)>,
}

impl std::fmt::Debug for Application {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Application")
            .field("addr", &self.addr)
            .field("metrics_addr", &self.metrics_addr())
            .finish_non_exhaustive()
    }
}

/// Says at start how long SubmitRun and ConfigureCheck wait for their
/// system's lock when the request deadline, not `DATABASE_LOCK_TIMEOUT_MS`,
/// decides it, and warns when that leaves no wait at all.
fn warn_on_system_wait(config: &Config) {
    let deadline = config.request_timeout();
    let margin = crate::lock::SYSTEM_BUSY_MARGIN;
    if deadline <= margin {
        tracing::warn!(
            request_timeout_ms = config.request_timeout_ms,
            margin_ms = margin.as_millis(),
            "VITALS_REQUEST_TIMEOUT_MS leaves no time to wait for a system's lock: a SubmitRun or ConfigureCheck \
             whose system is busy is refused with SYSTEM_BUSY at once unless its client allows a longer deadline"
        );
    } else if config.lock_timeout() > deadline - margin {
        tracing::info!(
            wait_ms = (deadline - margin).as_millis(),
            "the wait for a system's lock ends before the request deadline (VITALS_REQUEST_TIMEOUT_MS minus the \
             SYSTEM_BUSY margin), not after DATABASE_LOCK_TIMEOUT_MS"
        );
    }
}

async fn set_health(reporter: &HealthReporter, status: ServingStatus) {
    for name in HEALTH_SERVICES {
        reporter.set_service_status(name, status).await;
    }
}

impl Application {
    /// Binds the listen address (port 0 picks a free port) and prepares the
    /// database. Does not wait for PostgreSQL: until it answers, health says
    /// NOT_SERVING and business RPCs answer UNAVAILABLE. The embedded store is
    /// local: it is opened, locked against other processes and migrated here,
    /// and start-up fails with a message if that is not possible.
    pub async fn build(config: Config) -> Result<Self, StartError> {
        let listener = TcpListener::bind(config.listen_addr)
            .await
            .map_err(|source| StartError::Bind {
                addr: config.listen_addr,
                source,
            })?;
        let addr = listener.local_addr().map_err(|source| StartError::Bind {
            addr: config.listen_addr,
            source,
        })?;
        let metrics_listener = match config.metrics_addr.0 {
            Some(addr) => Some(
                endpoint::bind(addr)
                    .await
                    .map_err(|source| StartError::BindMetrics { addr, source })?,
            ),
            None => None,
        };
        let metrics = if metrics_listener.is_some() {
            Metrics::new()
        } else {
            Metrics::disabled()
        };
        let database = Database::open(&config).await?;
        database.report_to(metrics.pool(Pool::Work));
        if matches!(database, Database::Postgres(_)) && config.request_timeout_ms >= config.lock_idle_tx_timeout_ms {
            tracing::warn!(
                "VITALS_REQUEST_TIMEOUT_MS is not below DATABASE_LOCK_IDLE_TX_TIMEOUT_MS: a slow request can outlive its \
                 system lock (its writes stay correct, but serialisation falls back to row locks)"
            );
        }
        warn_on_system_wait(&config);
        let locks = Locks::for_database(&database, &config);
        locks.report_to(metrics.locks());
        let notifier = TransitionNotifier::default();
        let store = Store::open(&database, notifier.clone());
        let feed = TransitionFeed::new(store.clone(), &notifier, WatchLimits::from_config(&config));
        Ok(Application {
            config,
            listener,
            addr,
            database,
            locks,
            store,
            feed,
            metrics,
            metrics_listener,
        })
    }

    /// Where `/metrics` is served, if it is (port 0 bound to a free port).
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics_listener.as_ref().map(|(_, addr)| *addr)
    }

    /// The server's metrics.
    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    /// The bound address.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// The lock service, for introspection (for example
    /// [`Locks::local_stats`] of the embedded store).
    pub fn locks(&self) -> &Locks {
        &self.locks
    }

    /// The store, for introspection ([`Store::transition_reads`]).
    pub fn store(&self) -> &Store {
        &self.store
    }

    /// The transition feed, for introspection ([`TransitionFeed::stats`]).
    pub fn feed(&self) -> &TransitionFeed {
        &self.feed
    }

    /// Serves until `shutdown` resolves, then shuts down in order.
    pub async fn run_until_stopped(
        self,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> Result<(), StartError> {
        let Application {
            config,
            listener,
            addr,
            database,
            locks,
            store,
            feed,
            metrics,
            metrics_listener,
        } = self;
        let (health_reporter, health_service) = tonic_health::server::health_reporter();
        set_health(&health_reporter, ServingStatus::NotServing).await;

        let gate = Readiness::new();
        // `stopping` tells background tasks to end; `abort` ends open streams
        // once the drain grace is over.
        let (stopping_tx, stopping_rx) = watch::channel(false);

        let mut readiness = tokio::spawn(readiness_loop(
            database.clone(),
            config.clone(),
            gate.clone(),
            health_reporter.clone(),
            stopping_rx.clone(),
        ));
        let mut following = feed.start(&database, stopping_rx.clone());
        // Metrics answer until the end, the drain included: a scrape then
        // shows what is left.
        let mut metrics_tasks = match metrics_listener {
            Some((listener, metrics_addr)) => {
                tracing::info!(%metrics_addr, "metrics listening");
                let render = scrape(
                    metrics.clone(),
                    database.clone(),
                    locks.clone(),
                    feed.clone(),
                    gate.clone(),
                );
                let serving = tokio::spawn(endpoint::serve(listener, render, stopping_rx.clone()));
                let counting = tokio::spawn(count_systems(
                    store.clone(),
                    metrics.clone(),
                    gate.clone(),
                    config.metrics_systems_interval(),
                    stopping_rx.clone(),
                ));
                vec![serving, counting]
            }
            None => Vec::new(),
        };
        // Retention stops as soon as shutdown begins, not after the drain: it
        // must not hold the embedded writer while requests finish.
        let (retention_stop_tx, retention_stop_rx) = watch::channel(false);
        let mut retention = tokio::spawn(retention_loop(
            store.clone(),
            config.run_retention,
            Duration::from_millis(config.retention_interval_ms),
            retention_stop_rx,
        ));
        // The edge refuses a larger message first, with its own status (see
        // middleware::framing); tonic's limit only backs it up, on every
        // service.
        let max_bytes = config.max_request_size();
        let health_service = health_service.max_decoding_message_size(max_bytes);
        let health_checks = HealthService::new(store, locks.clone(), feed.clone(), WriteRules::from_config(&config))
            .with_metrics(metrics.runs());
        let health_api =
            HealthCheckServiceServer::new(HealthApi::new(health_checks)).max_decoding_message_size(max_bytes);
        let lock_api = LockServiceServer::new(LockApi::new(locks.clone())).max_decoding_message_size(max_bytes);

        // Both reflection versions describe the same files: the contract,
        // grpc.health.v1, and the google.rpc error details every error
        // carries (so grpcurl and buf curl decode them without local protos).
        let reflection = || {
            [
                proto::FILE_DESCRIPTOR_SET,
                tonic_health::pb::FILE_DESCRIPTOR_SET,
                tonic_types::pb::FILE_DESCRIPTOR_SET,
            ]
            .into_iter()
            .fold(tonic_reflection::server::Builder::configure(), |builder, set| {
                builder.register_encoded_file_descriptor_set(set)
            })
        };
        let reflection_v1 = reflection()
            .build_v1()
            .map_err(StartError::Reflection)?
            .max_decoding_message_size(max_bytes);
        let reflection_v1alpha = reflection()
            .build_v1alpha()
            .map_err(StartError::Reflection)?
            .max_decoding_message_size(max_bytes);

        let (drained_tx, drained_rx) = tokio::sync::oneshot::channel::<()>();
        let shutdown_gate = gate.clone();
        let shutdown_reporter = health_reporter.clone();
        let shutdown_feed = feed.clone();
        let stop_accepting = async move {
            shutdown.await;
            tracing::info!("shutting down: draining in-flight requests");
            let _ = retention_stop_tx.send(true);
            shutdown_gate.start_draining();
            // Watchers never finish on their own: ended now, their clients
            // resume elsewhere at once and their connections can close
            // within the grace.
            shutdown_feed.shut_down();
            set_health(&shutdown_reporter, ServingStatus::NotServing).await;
            let _ = drained_tx.send(());
        };

        tracing::info!(%addr, "vitals listening");
        let server = Server::builder()
            .tcp_nodelay(true)
            .http2_keepalive_interval(Some(Duration::from_secs(20)))
            .http2_keepalive_timeout(Some(Duration::from_secs(10)))
            .layer(EdgeLayer::new(&config, gate, metrics.grpc()))
            .add_service(health_service)
            .add_service(reflection_v1)
            .add_service(reflection_v1alpha)
            .add_service(health_api)
            .add_service(lock_api)
            // The builder's tcp_nodelay applies only to listeners tonic binds
            // itself; without it on our own listener every reply waits for the
            // client's delayed ACK (~40 ms on loopback).
            .serve_with_incoming_shutdown(
                tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true)),
                stop_accepting,
            );
        let mut server = tokio::spawn(server);

        let mut close_limit = CLOSE_LIMIT;
        let result = tokio::select! {
            result = &mut server => result,
            _ = drained_rx => {
                let grace = Duration::from_millis(config.shutdown_grace_ms);
                match tokio::time::timeout(grace, &mut server).await {
                    Ok(result) => result,
                    Err(_) => {
                        tracing::warn!(?grace, "drain grace over: ending the remaining requests");
                        locks.shut_down();
                        // Lock streams end now with SHUTTING_DOWN; let their
                        // connections deliver it (the server is done once
                        // every connection has closed) before the rest is
                        // cut off. Taken from the close limit.
                        let ending = tokio::time::Instant::now();
                        let ended = tokio::time::timeout(STREAMS_END_LIMIT, &mut server).await;
                        close_limit = close_limit.saturating_sub(ending.elapsed());
                        match ended {
                            Ok(result) => result,
                            Err(_) => {
                                server.abort();
                                let _ = (&mut server).await;
                                Ok(Ok(()))
                            }
                        }
                    }
                }
            }
        };
        locks.shut_down();
        let _ = stopping_tx.send(true);
        // The background tasks end at their next step; a database that does
        // not answer must not keep the process beyond the close limit.
        let ending = tokio::time::Instant::now();
        let tasks_ended = tokio::time::timeout(close_limit, async {
            let _ = tokio::join!(
                &mut readiness,
                &mut retention,
                &mut following,
                futures::future::join_all(metrics_tasks.iter_mut())
            );
        })
        .await;
        if tasks_ended.is_err() {
            tracing::warn!("background tasks still busy at exit; ending them");
            readiness.abort();
            retention.abort();
            following.abort();
            for task in &metrics_tasks {
                task.abort();
            }
        }
        close_limit = close_limit.saturating_sub(ending.elapsed());
        if tokio::time::timeout(close_limit, database.close()).await.is_err() {
            tracing::warn!("database connections still busy at exit; closing them with the process");
        }
        tracing::info!("vitals stopped");
        match result {
            Ok(inner) => inner.map_err(StartError::from),
            Err(join) => Err(StartError::ServerTask(join)),
        }
    }
}

/// What a scrape renders: the registry, after the gauges that mirror state
/// held elsewhere (connections, watchers, readiness) are read. Reading them
/// costs no query.
fn scrape(
    metrics: Metrics,
    database: Database,
    locks: Locks,
    feed: TransitionFeed,
    gate: Arc<Readiness>,
) -> endpoint::Render {
    Arc::new(move || {
        metrics.set_pool_use(Pool::Work, database.work_usage());
        let sessions = locks.session_usage();
        metrics.set_pool_use(
            Pool::Lock,
            PoolUse {
                idle: sessions.idle,
                in_use: sessions.holding,
            },
        );
        metrics.set_watchers(feed.stats().watchers);
        metrics.set_ready(gate.is_ready());
        metrics.render()
    })
}

/// Counts the systems per status every `every` while the database is
/// ready, for `vitals_systems`: one query per interval, however often
/// `/metrics` is scraped. Also folds the histograms' observations into
/// their buckets at least every [`UPKEEP_INTERVAL`], so a server nobody
/// scrapes does not keep them.
async fn count_systems(
    store: Store,
    metrics: Metrics,
    gate: Arc<Readiness>,
    every: Duration,
    mut stopping: watch::Receiver<bool>,
) {
    let mut next_count = tokio::time::Instant::now();
    loop {
        let now = tokio::time::Instant::now();
        if now >= next_count && gate.is_ready() {
            match store.count_systems().await {
                Ok(counts) => metrics.set_systems(&counts),
                Err(err) => tracing::debug!(error = %err, "counting systems for vitals_systems failed; will retry"),
            }
            next_count = now + every;
        }
        metrics.upkeep();
        tokio::select! {
            () = tokio::time::sleep(UPKEEP_INTERVAL.min(every)) => {}
            _ = stopping.wait_for(|stop| *stop) => return,
        }
    }
}

/// Keeps health and the readiness gate in step with the database. Runs the
/// migrations the first time the database answers.
async fn readiness_loop(
    database: Database,
    config: Config,
    gate: Arc<Readiness>,
    reporter: HealthReporter,
    mut stopping: watch::Receiver<bool>,
) {
    let interval = Duration::from_millis(config.readiness_interval_ms);
    let mut migrated = false;
    loop {
        let mut up = database.ping(interval.max(Duration::from_millis(500))).await;
        if up && !migrated {
            match database.migrate().await {
                Ok(()) => {
                    migrated = true;
                    if let Err(err) = database.check_sizing(&config).await {
                        tracing::warn!(error = %err, "could not read max_connections");
                    }
                }
                Err(err) => {
                    tracing::warn!(error = %err, "migrations failed; will retry");
                    up = false;
                }
            }
        }
        if up != gate.is_ready() && !*stopping.borrow() {
            gate.set_ready(up);
            if up {
                tracing::info!("database reachable: serving");
                set_health(&reporter, ServingStatus::Serving).await;
            } else {
                tracing::warn!("database unreachable: not serving");
                set_health(&reporter, ServingStatus::NotServing).await;
            }
        }
        tokio::select! {
            () = tokio::time::sleep(interval) => {}
            _ = stopping.changed() => return,
        }
    }
}

/// Runs a retention pass every `every` until `stop` says shutdown began,
/// checking it between the pass's steps (see [`crate::store::retention`]),
/// so a stop waits for one short step at most.
async fn retention_loop(store: Store, retention: Duration, every: Duration, mut stop: watch::Receiver<bool>) {
    loop {
        tokio::select! {
            () = tokio::time::sleep(every) => {}
            _ = stop.changed() => return,
        }
        let started = tokio::time::Instant::now();
        let mut pass = RetentionPass::new(retention, RETENTION_BATCH);
        while !pass.is_done() {
            if *stop.borrow() {
                tracing::debug!(deleted = pass.stats().deleted, "retention pass stopped by shutdown");
                return;
            }
            if let Err(err) = store.prune_step(&mut pass).await {
                tracing::debug!(error = %err, "retention pass failed; will retry");
                break;
            }
        }
        let stats = pass.stats();
        if stats.deleted > 0 {
            tracing::info!(
                deleted = stats.deleted,
                batches = stats.batches,
                elapsed_ms = started.elapsed().as_millis(),
                longest_batch_ms = stats.longest_batch.as_millis(),
                "retention pruned old rows"
            );
        }
    }
}
