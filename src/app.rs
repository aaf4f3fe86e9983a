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

use std::{future::Future, net::SocketAddr, path::PathBuf, sync::Arc, time::Duration};

use tokio::{net::TcpListener, sync::watch, task::JoinHandle};
use tonic::transport::Server;
use tonic_health::{ServingStatus, server::HealthReporter};

use crate::{
    api::{HealthApi, LockApi, PageTokenKey},
    auth::{
        Principals, TlsFiles, TlsSettings,
        reload::{self, ReloadCounts},
        tls::TlsError,
    },
    config::{AuthReflection, Config},
    db::{Database, OpenError},
    listener::Listener,
    lock::Locks,
    middleware::{EdgeLayer, Readiness, auth::Authenticator},
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
    /// The TLS settings or files cannot be used.
    #[error("TLS: {0}")]
    Tls(#[from] TlsError),
    /// The auth file cannot be read or is not valid.
    #[error("VITALS_AUTH_FILE: {0}")]
    Auth(String),
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

/// HTTP/2 header block a client may send on one request (names, values and
/// per-field overhead): ample for gRPC metadata, a bearer token and a
/// request id, and far below what would let a client pin memory with
/// headers alone.
pub const MAX_HEADER_LIST_BYTES: u32 = 16 * 1024;

/// Streams a client may reset before the server has accepted them, per
/// connection, beyond which h2 ends the connection (the "rapid reset"
/// flood); h2's default, stated so it cannot silently change.
pub const MAX_PENDING_ACCEPT_RESETS: usize = 20;

/// Streams the server may reset on one connection for a client's errors
/// (streams past the per-connection limit among them) before h2 ends it:
/// hyper's default, which tonic's `None` would remove.
pub const MAX_LOCAL_ERROR_RESETS: usize = 1024;

/// Connections the probe listener keeps open at once: kubelet and a few
/// tools, never the clients.
const PROBE_MAX_CONNECTIONS: usize = 64;

/// The TLS of the gRPC listener and what to reload it from.
struct Tls {
    counts: Arc<ReloadCounts>,
    files: TlsFiles,
    settings: Arc<TlsSettings>,
    /// The files' contents in force.
    loaded: Vec<Vec<u8>>,
}

/// The principals and what to reload them from.
struct Auth {
    counts: Arc<ReloadCounts>,
    file: PathBuf,
    authenticator: Arc<Authenticator>,
    /// The file's contents in force.
    loaded: Vec<Vec<u8>>,
}

/// A built, bound, not yet serving vitals.
pub struct Application {
    config: Config,
    listener: TcpListener,
    addr: SocketAddr,
    /// The plaintext grpc.health.v1 listener (`VITALS_PROBE_ADDR`).
    probe: Option<(TcpListener, SocketAddr)>,
    tls: Option<Tls>,
    auth: Option<Auth>,
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
        let probe = match config.probe_addr {
            None => None,
            Some(probe_addr) => {
                let bind = |source| StartError::Bind {
                    addr: probe_addr,
                    source,
                };
                let listener = TcpListener::bind(probe_addr).await.map_err(bind)?;
                let addr = listener.local_addr().map_err(bind)?;
                Some((listener, addr))
            }
        };
        crate::auth::tls::install_crypto_provider();
        let tls = match TlsFiles::from_config(&config)? {
            None => None,
            Some(files) => {
                let loaded = reload::read_all(&files.paths()).map_err(|why| TlsError::Pem {
                    path: files.cert.clone(),
                    why,
                })?;
                let settings = TlsSettings::new(files.build(&loaded)?);
                tracing::info!(mtls = files.client_ca.is_some(), "TLS on the gRPC listener");
                Some(Tls {
                    counts: ReloadCounts::new(),
                    files,
                    settings,
                    loaded,
                })
            }
        };
        let auth = match &config.auth_file {
            None => None,
            Some(file) => {
                let loaded = reload::read_all(std::slice::from_ref(file)).map_err(StartError::Auth)?;
                let text = std::str::from_utf8(&loaded[0]).map_err(|_| StartError::Auth("not UTF-8".into()))?;
                let principals = Principals::parse(text).map_err(|e| StartError::Auth(e.to_string()))?;
                tracing::info!(principals = principals.len(), "authentication on");
                let authenticator = Authenticator::new(principals, config.auth_reflection == AuthReflection::Required);
                Some(Auth {
                    counts: ReloadCounts::new(),
                    file: file.clone(),
                    authenticator,
                    loaded,
                })
            }
        };
        if !addr.ip().is_loopback() && tls.is_none() && auth.is_none() {
            tracing::warn!(
                %addr,
                "listening on a non-loopback address with neither TLS nor authentication: anyone who reaches \
                 the port can submit runs, configure checks and take locks (set VITALS_TLS_CERT_FILE and \
                 VITALS_TLS_KEY_FILE, and VITALS_AUTH_FILE)"
            );
        }
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
            probe,
            tls,
            auth,
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

    /// The bound address of the probe listener, when there is one.
    pub fn probe_addr(&self) -> Option<SocketAddr> {
        self.probe.as_ref().map(|(_, addr)| *addr)
    }

    /// How the TLS files' reloads went, when TLS is on.
    pub fn tls_reloads(&self) -> Option<Arc<ReloadCounts>> {
        self.tls.as_ref().map(|tls| tls.counts.clone())
    }

    /// How the auth file's reloads went, when authentication is on.
    pub fn auth_reloads(&self) -> Option<Arc<ReloadCounts>> {
        self.auth.as_ref().map(|auth| auth.counts.clone())
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
            probe,
            tls,
            auth,
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

        let page_tokens = Arc::new(PageTokenKey::default());
        let mut readiness = tokio::spawn(readiness_loop(
            database.clone(),
            config.clone(),
            page_tokens.clone(),
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
                    store.clone(),
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
        let mut reloaders = Vec::new();
        let tls_settings = tls.map(
            |Tls {
                 counts,
                 files,
                 settings,
                 loaded,
             }| {
                let target = settings.clone();
                let paths = files.paths();
                reloaders.push(reload::spawn(
                    "TLS certificate",
                    paths,
                    loaded,
                    config.file_reload_interval(),
                    move |contents| {
                        target.replace(files.build(contents).map_err(|e| e.to_string())?);
                        Ok(())
                    },
                    counts,
                    stopping_rx.clone(),
                ));
                settings
            },
        );
        let authenticator = auth.map(
            |Auth {
                 counts,
                 file,
                 authenticator,
                 loaded,
             }| {
                let target = authenticator.clone();
                reloaders.push(reload::spawn(
                    "auth file",
                    vec![file],
                    loaded,
                    config.file_reload_interval(),
                    move |contents| {
                        let text = contents
                            .first()
                            .and_then(|c| std::str::from_utf8(c).ok())
                            .ok_or("not UTF-8")?;
                        let principals = Principals::parse(text).map_err(|e| e.to_string())?;
                        tracing::info!(principals = principals.len(), "principals loaded");
                        target.replace(principals);
                        Ok(())
                    },
                    counts,
                    stopping_rx.clone(),
                ));
                authenticator
            },
        );
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
        let health_api = HealthCheckServiceServer::new(HealthApi::new(health_checks, page_tokens.clone()))
            .max_decoding_message_size(max_bytes);
        let lock_api =
            LockServiceServer::new(LockApi::new(locks.clone(), page_tokens)).max_decoding_message_size(max_bytes);

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

        // The probe listener serves grpc.health.v1 alone, in plaintext and
        // without credentials (kubelet speaks neither TLS nor tokens); any
        // other path there is tonic's UNIMPLEMENTED. It stops with the rest
        // of the background work, after the main server, so probes see
        // NOT_SERVING during the drain.
        let mut probe_server = probe.map(|(probe_listener, probe_addr)| {
            tracing::info!(%probe_addr, "probe listener (grpc.health.v1 only, plaintext)");
            let mut stopping = stopping_rx.clone();
            let server = limits(Server::builder())
                .add_service(health_service.clone())
                .serve_with_incoming_shutdown(
                    Listener::new(probe_listener, PROBE_MAX_CONNECTIONS, None).incoming(),
                    async move {
                        let _ = stopping.wait_for(|stop| *stop).await;
                    },
                );
            tokio::spawn(server)
        });

        tracing::info!(%addr, tls = tls_settings.is_some(), auth = authenticator.is_some(), "vitals listening");
        let max_connections = usize::try_from(config.max_connections).unwrap_or(usize::MAX);
        let server = limits(Server::builder())
            .max_concurrent_streams(config.max_streams_per_connection)
            .layer(EdgeLayer::new(&config, gate, metrics.grpc(), authenticator))
            .add_service(health_service)
            .add_service(reflection_v1)
            .add_service(reflection_v1alpha)
            .add_service(health_api)
            .add_service(lock_api)
            // Our own accept loop: the connection cap, TCP_NODELAY and the
            // TLS handshake with reloadable certificates (crate::listener).
            .serve_with_incoming_shutdown(
                Listener::new(listener, max_connections, tls_settings).incoming(),
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
            for reloader in &mut reloaders {
                let _ = reloader.await;
            }
            if let Some(probe_server) = &mut probe_server {
                let _ = probe_server.await;
            }
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
            reloaders.iter().for_each(JoinHandle::abort);
            if let Some(probe_server) = &probe_server {
                probe_server.abort();
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
    store: Store,
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
        let groups = store.write_groups();
        metrics.set_write_groups(groups.applied, groups.refused, groups.members);
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

/// The HTTP/2 limits of both listeners, each set here explicitly: tonic
/// hands hyper `None` for the ones it is not given, which for the streams
/// per connection and the locally reset streams means no limit at all.
/// Keep-alive pings find a client that vanished (a watch or a lock stream
/// would otherwise hold its place until TCP gives up).
fn limits(builder: Server) -> Server {
    builder
        .tcp_nodelay(true)
        .http2_keepalive_interval(Some(Duration::from_secs(20)))
        .http2_keepalive_timeout(Some(Duration::from_secs(10)))
        .http2_max_header_list_size(MAX_HEADER_LIST_BYTES)
        .http2_max_pending_accept_reset_streams(Some(MAX_PENDING_ACCEPT_RESETS))
        .http2_max_local_error_reset_streams(Some(MAX_LOCAL_ERROR_RESETS))
}

/// Keeps health and the readiness gate in step with the database. Runs the
/// migrations the first time the database answers, then reads the page token
/// key (vitals serves only once it has it).
async fn readiness_loop(
    database: Database,
    config: Config,
    page_tokens: Arc<PageTokenKey>,
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
        if up && migrated && !page_tokens.is_set() {
            match database.page_token_key().await {
                Ok(key) => page_tokens.set(key),
                Err(err) => {
                    tracing::warn!(error = %err, "cannot read the page token key; will retry");
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
