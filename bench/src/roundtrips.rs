//! Round trips to PostgreSQL per SubmitRun and per WithLock, counted on the
//! wire: a second vitals process talks to PostgreSQL through [`WireProxy`],
//! the benchmark sends it sequential requests after a warm-up and attributes
//! every round trip of the work and lock pools to the request in flight.

use std::{collections::BTreeMap, path::Path, time::Duration};

use anyhow::{Context, Result};
use vitals::proto::{
    SubmitRunRequest, health_check_service_client::HealthCheckServiceClient, lock_service_client::LockServiceClient,
};

use crate::{
    report::RoundTripStat,
    services::{Postgres, Vitals},
    wire::{Event, SYNC_ONLY, WireProxy},
    workloads::{self, check_id, system_id, with_lock_once},
};

/// The pools whose round trips a request causes (the probe and LISTEN
/// connections are background work).
const POOLS: [&str; 2] = ["vitals-lock", "vitals-work"];

/// Sequential SubmitRuns and WithLocks through the counting proxy.
pub(crate) async fn measure(
    pg: &Postgres,
    vitals_bin: &Path,
    work_dir: &Path,
    requests: usize,
    nonce: &str,
) -> Result<Vec<RoundTripStat>> {
    let upstream = pg
        .addr
        .context("the database address is not a TCP host:port; round trips not counted")?;
    let proxy = WireProxy::start(upstream).await?;
    let url = pg.url_via(proxy.addr)?;
    let vitals = Vitals::start(vitals_bin, &url, work_dir, "vitals-roundtrips").await?;
    let channel = workloads::channel(vitals.addr).await?;
    let mut health = HealthCheckServiceClient::new(channel.clone());
    let mut locks = LockServiceClient::new(channel);
    let mut rng = fastrand::Rng::with_seed(7);
    let mut seq = 0u64;
    let mut submit = |rng: &mut fastrand::Rng| {
        seq += 1;
        SubmitRunRequest {
            run_id: format!("rt-{nonce}-{seq}"),
            system_id: system_id(rng.u32(..4)),
            check_id: check_id(rng.u32(..3)),
            status: rng.i32(1..=3),
            observed_at: None,
            latency: None,
            message: String::new(),
        }
    };
    // Warm-up: every pooled connection has prepared its statements, every
    // system and check exists.
    for _ in 0..40 {
        health.submit_run(submit(&mut rng)).await.context("warm-up SubmitRun")?;
    }
    for i in 0..10 {
        with_lock_once(&mut locks, format!("rt-warm-{i}"), Duration::from_secs(5))
            .await
            .context("warm-up WithLock")?;
    }

    proxy.set_tracing(true);
    let mut kinds = Vec::new();
    for i in 0..requests {
        proxy.mark(format!("submit {i}"));
        let reply = health.submit_run(submit(&mut rng)).await.context("SubmitRun")?;
        kinds.push(if reply.get_ref().transition.is_some() {
            "SubmitRun, status changed (transition written)"
        } else {
            "SubmitRun, no transition"
        });
    }
    for i in 0..requests.div_ceil(2) {
        proxy.mark(format!("lock {i}"));
        with_lock_once(&mut locks, format!("rt-{i}"), Duration::from_secs(5))
            .await
            .context("WithLock")?;
        kinds.push("WithLock acquire + release");
    }
    proxy.mark("end".to_owned());
    // Let the last COMMIT's ReadyForQuery be read by the proxy.
    tokio::time::sleep(Duration::from_millis(200)).await;
    proxy.set_tracing(false);
    drop(vitals);

    // Split the events at the markers: the round trips between marker i and
    // i + 1 belong to request i.
    let mut per_request: Vec<Vec<Trip>> = Vec::new();
    let mut last_at = 0u64;
    let mut current: Option<usize> = None;
    for event in proxy.events() {
        match event {
            Event::Marker(label, at_us) => {
                current = (label != "end").then_some(per_request.len());
                if current.is_some() {
                    per_request.push(Vec::new());
                }
                last_at = at_us;
            }
            Event::RoundTrip {
                app,
                what,
                statements,
                parses,
                waited_us,
                at_us,
            } => {
                if let Some(i) = current {
                    if POOLS.contains(&app.as_str()) {
                        // Time vitals spent between the previous round trip
                        // (or the request's start) and this one's first byte.
                        let gap_us = at_us.saturating_sub(waited_us).saturating_sub(last_at);
                        per_request[i].push(Trip {
                            app,
                            what,
                            statements,
                            parses,
                            waited_us,
                            gap_us,
                        });
                        last_at = at_us;
                    }
                }
            }
        }
    }
    // A bare Sync is a ping. After a statement of the same pool in the same
    // request it is sqlx's ping when the connection goes back to the pool
    // (always sent); before any, it is the pool's check of a connection that
    // idled over a second (vitals' `before_acquire`), or the previous
    // request's release ping arriving after that request's reply.
    for trips in &mut per_request {
        let mut used = Vec::new();
        for t in trips.iter_mut() {
            if t.what == SYNC_ONLY {
                t.what = if used.contains(&t.app) {
                    "Sync only: sqlx's ping when the connection goes back to the pool".to_owned()
                } else {
                    "Sync only: a ping before any statement (the pool's check of a connection idle over 1 s, \
                     or the previous request's release ping arriving late)"
                        .to_owned()
                };
            } else if !used.contains(&t.app) {
                used.push(t.app.clone());
            }
        }
    }
    let mut by_kind: BTreeMap<&str, Vec<&Vec<Trip>>> = BTreeMap::new();
    for (kind, trips) in kinds.iter().zip(&per_request) {
        by_kind.entry(kind).or_default().push(trips);
    }
    let mut stats = Vec::new();
    for (kind, requests) in by_kind {
        let n = requests.len();
        let counts: Vec<usize> = requests.iter().map(|r| r.len()).collect();
        let mut by_pool = BTreeMap::new();
        for r in &requests {
            for t in r.iter() {
                *by_pool.entry(t.app.clone()).or_insert(0.0) += 1.0 / n as f64;
            }
        }
        let statements: u32 = requests.iter().flat_map(|r| r.iter().map(|t| t.statements)).sum();
        let parses: u32 = requests.iter().flat_map(|r| r.iter().map(|t| t.parses)).sum();
        let waited: u64 = requests.iter().flat_map(|r| r.iter().map(|t| t.waited_us)).sum();
        // The example is the first request with the median count.
        let typical = median(&counts);
        let example = requests
            .iter()
            .find(|r| r.len() == typical)
            .map(|r| {
                r.iter()
                    .map(|t| {
                        (
                            t.app.clone(),
                            format!("{} ({} us; {} us in vitals before it)", t.what, t.waited_us, t.gap_us),
                        )
                    })
                    .collect()
            })
            .unwrap_or_default();
        stats.push(RoundTripStat {
            kind: kind.to_owned(),
            requests: n,
            round_trips_mean: counts.iter().sum::<usize>() as f64 / n as f64,
            round_trips_min: counts.iter().copied().min().unwrap_or(0),
            round_trips_max: counts.iter().copied().max().unwrap_or(0),
            statements_mean: f64::from(statements) / n as f64,
            prepares_mean: f64::from(parses) / n as f64,
            database_ms_mean: waited as f64 / 1000.0 / n as f64,
            by_pool,
            example,
        });
    }
    Ok(stats)
}

/// One round trip attributed to a request.
struct Trip {
    app: String,
    what: String,
    statements: u32,
    parses: u32,
    waited_us: u64,
    gap_us: u64,
}

fn median(xs: &[usize]) -> usize {
    let mut v = xs.to_vec();
    v.sort_unstable();
    v.get(v.len() / 2).copied().unwrap_or(0)
}
