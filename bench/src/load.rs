//! The closed-loop driver: `clients` workers, each sending its next request as
//! soon as the previous one answered, for a warm-up and then a measured
//! window. Bounded in time and in requests.

use std::{
    collections::BTreeMap,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use futures::future::BoxFuture;
use serde::{Deserialize, Serialize};

/// What one request ended with.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Outcome {
    /// Which operation of a mixed workload (0 for single-operation ones).
    pub(crate) kind: usize,
    /// The gRPC status code name (`OK`, `UNAVAILABLE`, ...) or a client-side
    /// reason (`CLIENT_TIMEOUT`, `TRANSPORT`).
    pub(crate) code: &'static str,
    /// A per-workload flag worth counting (SubmitRun: the reply carried a
    /// transition).
    pub(crate) flag: bool,
}

impl Outcome {
    pub(crate) fn ok(kind: usize) -> Self {
        Outcome {
            kind,
            code: "OK",
            flag: false,
        }
    }

    pub(crate) fn code(kind: usize, code: &'static str) -> Self {
        Outcome {
            kind,
            code,
            flag: false,
        }
    }
}

/// One client of a workload: owns its connection handle and random state.
pub(crate) trait Worker: Send + 'static {
    /// Sends one request and waits for its end.
    fn call(&mut self) -> BoxFuture<'_, Outcome>;
}

/// How long and how hard to drive.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Plan {
    /// Not measured: connections warm up, pools fill, caches settle.
    pub(crate) warmup: Duration,
    /// The measured window.
    pub(crate) duration: Duration,
    /// Hard bound on requests started in one cell (warm-up included).
    pub(crate) max_requests: u64,
    /// A request still running after this counts as `CLIENT_TIMEOUT`.
    pub(crate) op_timeout: Duration,
}

/// Latencies and codes of one kind of operation.
#[derive(Debug, Default, Clone)]
pub(crate) struct KindRecord {
    pub(crate) latencies_ns: Vec<u64>,
    pub(crate) codes: BTreeMap<String, u64>,
    pub(crate) flags: u64,
}

impl KindRecord {
    fn merge(&mut self, other: KindRecord) {
        self.latencies_ns.extend(other.latencies_ns);
        for (code, n) in other.codes {
            *self.codes.entry(code).or_default() += n;
        }
        self.flags += other.flags;
    }
}

/// What a cell measured, per kind of operation.
#[derive(Debug, Clone)]
pub(crate) struct Recorded {
    pub(crate) kinds: Vec<KindRecord>,
    /// The measured window actually covered (shorter than planned only when
    /// the request bound was hit).
    pub(crate) window: Duration,
}

/// Latency summary of one kind of operation.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub(crate) struct Summary {
    pub(crate) requests: u64,
    pub(crate) seconds: f64,
    pub(crate) throughput: f64,
    pub(crate) p50_ms: f64,
    pub(crate) p90_ms: f64,
    pub(crate) p99_ms: f64,
    pub(crate) max_ms: f64,
    pub(crate) codes: BTreeMap<String, u64>,
}

/// Nearest-rank percentile of sorted values.
fn percentile(sorted: &[u64], p: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    let rank = (p * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// Summarises latencies (nanoseconds) over a window.
pub(crate) fn summarise(mut latencies_ns: Vec<u64>, codes: BTreeMap<String, u64>, window: Duration) -> Summary {
    latencies_ns.sort_unstable();
    let ms = |ns: u64| ns as f64 / 1e6;
    let seconds = window.as_secs_f64();
    let requests = latencies_ns.len() as u64;
    Summary {
        requests,
        seconds,
        throughput: if seconds > 0.0 { requests as f64 / seconds } else { 0.0 },
        p50_ms: ms(percentile(&latencies_ns, 0.50)),
        p90_ms: ms(percentile(&latencies_ns, 0.90)),
        p99_ms: ms(percentile(&latencies_ns, 0.99)),
        max_ms: ms(latencies_ns.last().copied().unwrap_or(0)),
        codes,
    }
}

impl Recorded {
    /// Summary of one kind.
    pub(crate) fn summary(&self, kind: usize) -> Summary {
        let k = self.kinds.get(kind).cloned().unwrap_or_default();
        summarise(k.latencies_ns, k.codes, self.window)
    }

    /// Summary of all kinds together.
    pub(crate) fn total(&self) -> Summary {
        let mut all = KindRecord::default();
        for k in &self.kinds {
            all.merge(k.clone());
        }
        summarise(all.latencies_ns, all.codes, self.window)
    }

    /// Flags counted for one kind.
    pub(crate) fn flags(&self, kind: usize) -> u64 {
        self.kinds.get(kind).map_or(0, |k| k.flags)
    }
}

/// Drives `workers` (one per client) through `plan`; `kinds` is the number of
/// operation kinds the workers report.
pub(crate) async fn drive<W: Worker>(plan: Plan, kinds: usize, workers: Vec<W>) -> Recorded {
    let start = Instant::now();
    let measure_from = start + plan.warmup;
    let end = measure_from + plan.duration;
    let started = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::with_capacity(workers.len());
    for mut worker in workers {
        let started = started.clone();
        tasks.push(tokio::spawn(async move {
            let mut records = vec![KindRecord::default(); kinds];
            let mut last_recorded = None;
            let mut capped = false;
            loop {
                if Instant::now() >= end {
                    break;
                }
                if started.fetch_add(1, Ordering::Relaxed) >= plan.max_requests {
                    capped = true;
                    break;
                }
                let t0 = Instant::now();
                let outcome = tokio::time::timeout(plan.op_timeout, worker.call())
                    .await
                    .unwrap_or(Outcome::code(0, "CLIENT_TIMEOUT"));
                let t1 = Instant::now();
                if t1 >= measure_from && t1 <= end {
                    let record = &mut records[outcome.kind.min(kinds - 1)];
                    record
                        .latencies_ns
                        .push(u64::try_from((t1 - t0).as_nanos()).unwrap_or(u64::MAX));
                    *record.codes.entry(outcome.code.to_owned()).or_default() += 1;
                    record.flags += u64::from(outcome.flag);
                    last_recorded = Some(t1);
                }
            }
            (records, last_recorded, capped)
        }));
    }
    let mut merged = vec![KindRecord::default(); kinds];
    let mut last = None;
    let mut capped = false;
    for task in tasks {
        if let Ok((records, last_recorded, was_capped)) = task.await {
            for (into, from) in merged.iter_mut().zip(records) {
                into.merge(from);
            }
            last = last.max(last_recorded);
            capped |= was_capped;
        }
    }
    let window = match (capped, last) {
        (true, Some(last)) => last.saturating_duration_since(measure_from),
        _ => plan.duration,
    };
    Recorded { kinds: merged, window }
}
