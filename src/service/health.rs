//! The health-check use cases: submit a run and configure a check, each
//! under its system's lock; read a system's health; page through runs and
//! transitions; follow new transitions.
//!
//! The two writes are why this module exists. Each takes its system's lock
//! from the lock manager first and only then lets the store take a work
//! connection: that order keeps the upstream pool-starvation deadlock from
//! forming, and reading the previous status inside the lock is what makes
//! every change of a system's status appear exactly once, however many
//! replicas evaluate it. The wait for the lock is bounded by the request's
//! deadline (see [`Locks::with_system_lock`]), so a busy system answers
//! `SYSTEM_BUSY` while the client still listens.

use tokio::time::Instant;
use tracing::Instrument;

use crate::{
    domain::{
        CheckId, Evaluation, MAX_OPEN_WINDOWS, MaintenanceWindow, Namespace, Status, SystemId, Thresholds, Uptime,
        UptimeCount, evaluate,
    },
    error::{Error, Result},
    lock::Locks,
    store::{
        CheckUpdate, ConfigureOutcome, DeleteCheckOutcome, NewRun, Run, RunCursor, Store, SubmitOutcome, Subscription,
        SystemRecord, SystemSummary, Transition, TransitionFeed, WriteRules,
    },
    telemetry::metrics::{RunMetrics, RunOutcome},
};

/// The health-check use cases of one replica.
#[derive(Debug, Clone)]
pub struct HealthService {
    /// Runs, checks, health and transitions.
    store: Store,
    /// The systems' serialisation locks, taken before the store is written.
    locks: Locks,
    /// The one feed per replica that watchers follow.
    feed: TransitionFeed,
    /// Limits every write checks (checks per system).
    rules: WriteRules,
    /// Runs by outcome, transitions by status.
    metrics: RunMetrics,
}

/// One page of a listing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Page<T> {
    /// At most the page size, in the listing's order.
    pub items: Vec<T>,
    /// True when more follow the last item: the caller hands out a token
    /// that resumes after it.
    pub more: bool,
}

impl<T> Page<T> {
    /// The page of `limit` from up to `limit + 1` items read: reading one
    /// more than the page is how a listing learns that another page follows
    /// without counting.
    fn from_overfetch(mut items: Vec<T>, limit: u32) -> Self {
        let limit = usize::try_from(limit).unwrap_or(usize::MAX);
        let more = items.len() > limit;
        items.truncate(limit);
        Page { items, more }
    }
}

/// Says once, in the log, that a system's status changed, with the change.
/// The ids are the client's text: recorded as `&str`, which the text format
/// writes quoted and escaped, so a bidi override or an escape sequence in an
/// id never reaches a log line as such.
fn log_transition(t: &Transition) {
    tracing::info!(
        system_id = t.system_id.as_str(),
        check_id = t.check_id.as_str(),
        from = t.from.as_str(),
        to = t.to.as_str(),
        sequence = t.sequence,
        "system status changed"
    );
}

impl HealthService {
    /// The use cases over `store`, serialised per system by `locks`, each
    /// write within `rules`; watchers follow `feed`.
    pub fn new(store: Store, locks: Locks, feed: TransitionFeed, rules: WriteRules) -> Self {
        HealthService {
            store,
            locks,
            feed,
            rules,
            metrics: RunMetrics::disabled(),
        }
    }

    /// The same use cases, counting runs and transitions into `metrics`.
    #[must_use]
    pub fn with_metrics(mut self, metrics: RunMetrics) -> Self {
        self.metrics = metrics;
        self
    }

    /// Evaluates `statuses` (newest first) with `thresholds`; stores nothing.
    pub fn evaluate(&self, statuses: &[Status], thresholds: &Thresholds) -> Evaluation {
        evaluate(statuses, thresholds)
    }

    /// Records `run` and re-evaluates its check and system, under the
    /// system's lock. `deadline`: the request's, which bounds the wait for
    /// the lock (`SYSTEM_BUSY` before it). A duplicate writes nothing and
    /// carries the transition its first delivery caused.
    pub async fn submit_run(&self, run: &NewRun, deadline: Option<Instant>) -> Result<SubmitOutcome> {
        let outcome = self
            .locks
            .with_system_lock(&run.system_id, deadline, || {
                self.store
                    .submit_run(run, &self.rules)
                    .instrument(tracing::debug_span!("work transaction", db.operation = "submit_run"))
            })
            .await;
        let outcome = match outcome {
            Ok(outcome) => outcome,
            Err(err) => {
                if matches!(err, Error::RunConflict { .. }) {
                    self.metrics.run(RunOutcome::Conflict);
                }
                return Err(err);
            }
        };
        if outcome.duplicate {
            self.metrics.run(RunOutcome::Duplicate);
        } else {
            self.metrics.run(RunOutcome::New);
            if let Some(t) = &outcome.transition {
                log_transition(t);
                self.metrics.transition(t.to);
            }
        }
        Ok(outcome)
    }

    /// Creates or changes a check and re-evaluates its system, under the
    /// system's lock (bounded by `deadline` as for [`Self::submit_run`]).
    pub async fn configure_check(&self, update: &CheckUpdate, deadline: Option<Instant>) -> Result<ConfigureOutcome> {
        let outcome = self
            .locks
            .with_system_lock(&update.system_id, deadline, || {
                self.store
                    .configure_check(update, &self.rules)
                    .instrument(tracing::debug_span!(
                        "work transaction",
                        db.operation = "configure_check"
                    ))
            })
            .await?;
        if let Some(t) = &outcome.transition {
            log_transition(t);
            self.metrics.transition(t.to);
        }
        Ok(outcome)
    }

    /// The stored health of a system; `SYSTEM_NOT_FOUND` when no run or
    /// check of it was ever stored.
    pub async fn system(&self, system_id: &SystemId) -> Result<SystemRecord> {
        self.store
            .system(system_id)
            .instrument(tracing::debug_span!("read", db.operation = "system"))
            .await?
            .ok_or_else(|| Error::SystemNotFound {
                system_id: system_id.as_str().to_owned(),
            })
    }

    /// Up to `limit` systems in byte order of their ids after `after`, with
    /// `status` (any when `None`), ids starting with `prefix` and in `visible`.
    pub async fn list_systems(
        &self,
        status: Option<Status>,
        prefix: &str,
        visible: &Namespace,
        after: Option<&str>,
        limit: u32,
    ) -> Result<Page<SystemSummary>> {
        let systems = self
            .store
            .list_systems(status, prefix, visible, after, limit.saturating_add(1))
            .instrument(tracing::debug_span!("read", db.operation = "list_systems"))
            .await?;
        Ok(Page::from_overfetch(systems, limit))
    }

    /// Deletes a check with its runs and re-evaluates its system, under the
    /// system's lock (bounded by `deadline` as for [`Self::submit_run`]).
    pub async fn delete_check(
        &self,
        system_id: &SystemId,
        check_id: &CheckId,
        deadline: Option<Instant>,
    ) -> Result<DeleteCheckOutcome> {
        let outcome = self
            .locks
            .with_system_lock(system_id, deadline, || {
                self.store
                    .delete_check(system_id, check_id)
                    .instrument(tracing::debug_span!("work transaction", db.operation = "delete_check"))
            })
            .await?;
        if let Some(t) = &outcome.transition {
            log_transition(t);
            self.metrics.transition(t.to);
        }
        Ok(outcome)
    }

    /// Deletes a system with everything of it but its transitions, under its
    /// lock. True when it existed.
    pub async fn delete_system(&self, system_id: &SystemId, deadline: Option<Instant>) -> Result<bool> {
        self.locks
            .with_system_lock(system_id, deadline, || {
                self.store
                    .delete_system(system_id)
                    .instrument(tracing::debug_span!("work transaction", db.operation = "delete_system"))
            })
            .await
    }

    /// Adds a maintenance window to a system, under its lock; the window as
    /// stored (merged) and the system after.
    pub async fn set_maintenance(
        &self,
        system_id: &SystemId,
        window: MaintenanceWindow,
        deadline: Option<Instant>,
    ) -> Result<(MaintenanceWindow, SystemRecord)> {
        self.locks
            .with_system_lock(system_id, deadline, || {
                self.store
                    .set_maintenance(system_id, window)
                    .instrument(tracing::debug_span!(
                        "work transaction",
                        db.operation = "set_maintenance"
                    ))
            })
            .await
    }

    /// Ends a system's open maintenance window and removes its upcoming
    /// ones, under its lock.
    pub async fn clear_maintenance(
        &self,
        system_id: &SystemId,
        deadline: Option<Instant>,
    ) -> Result<(u32, Option<SystemRecord>)> {
        self.locks
            .with_system_lock(system_id, deadline, || {
                self.store.clear_maintenance(system_id).instrument(tracing::debug_span!(
                    "work transaction",
                    db.operation = "clear_maintenance"
                ))
            })
            .await
    }

    /// Replaces what a system depends on, under its lock; refuses a cycle.
    pub async fn configure_system(
        &self,
        system_id: &SystemId,
        depends_on: &[SystemId],
        deadline: Option<Instant>,
    ) -> Result<SystemRecord> {
        self.locks
            .with_system_lock(system_id, deadline, || {
                self.store
                    .configure_system(system_id, depends_on)
                    .instrument(tracing::debug_span!(
                        "work transaction",
                        db.operation = "configure_system"
                    ))
            })
            .await
    }

    /// A system's uptime over `[from, to)`, folded from its transitions read
    /// a page at a time; `SYSTEM_NOT_FOUND` for an unknown system.
    pub async fn uptime(
        &self,
        system_id: &SystemId,
        from: chrono::DateTime<chrono::Utc>,
        to: chrono::DateTime<chrono::Utc>,
    ) -> Result<Uptime> {
        const PAGE: u32 = 5000;
        let span = tracing::debug_span!("read", db.operation = "uptime");
        async {
            let (created_at, current) =
                self.store
                    .system_origin(system_id)
                    .await?
                    .ok_or_else(|| Error::SystemNotFound {
                        system_id: system_id.as_str().to_owned(),
                    })?;
            // Windows never overlap and are kept as long as transitions, so
            // a range holds a bounded number; more than that many open ones
            // at once cannot exist.
            let limit = u32::try_from(MAX_OPEN_WINDOWS * 100).unwrap_or(u32::MAX);
            let windows = self.store.windows_between(system_id, from, to, limit).await?;
            let mut count = UptimeCount::new(from, to, created_at, &windows);
            let mut after = None;
            loop {
                let page = self.store.status_changes(system_id, from, after, PAGE).await?;
                let read = page.len();
                for (sequence, change) in page {
                    count.push(change);
                    after = Some(sequence);
                }
                // The first page may hold one extra (the change before the range).
                if read < usize::try_from(PAGE).unwrap_or(usize::MAX) {
                    break;
                }
            }
            Ok(count.finish(current))
        }
        .instrument(span)
        .await
    }

    /// Up to `limit` runs of a system (of one check, with `check_id`), newest
    /// first, after `after`.
    pub async fn list_runs(
        &self,
        system_id: &SystemId,
        check_id: Option<&CheckId>,
        after: Option<&RunCursor>,
        limit: u32,
    ) -> Result<Page<Run>> {
        let runs = self
            .store
            .list_runs(system_id, check_id, after, limit.saturating_add(1))
            .instrument(tracing::debug_span!("read", db.operation = "list_runs"))
            .await?;
        Ok(Page::from_overfetch(runs, limit))
    }

    /// Up to `limit` transitions (of one system, with `system_id`), highest
    /// sequence first, below `before`.
    pub async fn list_transitions(
        &self,
        system_id: Option<&SystemId>,
        before: Option<u64>,
        limit: u32,
    ) -> Result<Page<Transition>> {
        let transitions = self
            .store
            .list_transitions(system_id, before, limit.saturating_add(1))
            .instrument(tracing::debug_span!("read", db.operation = "list_transitions"))
            .await?;
        Ok(Page::from_overfetch(transitions, limit))
    }

    /// The transitions after `after_sequence` (of one system, with
    /// `system_id`): the stored ones, then new ones as they commit.
    pub async fn watch(&self, system_id: Option<SystemId>, after_sequence: u64) -> Result<Subscription> {
        self.feed.subscribe(system_id, after_sequence).await
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use std::time::Duration;

    use chrono::DateTime;
    use tokio::sync::oneshot;

    use super::*;
    use crate::{
        config::Config,
        db::Database,
        domain::{RunId, RunMessage},
        store::{TransitionNotifier, WatchLimits},
    };

    /// The use cases on a fresh embedded store in `dir`, as the application
    /// wires them.
    async fn service(dir: &tempfile::TempDir) -> (HealthService, Locks, Database) {
        let url = format!("--database-url=sqlite://{}/vitals.db", dir.path().display());
        let config = Config::from_flags([url]).unwrap();
        let database = Database::open(&config).await.unwrap();
        let locks = Locks::for_database(&database, &config);
        let notifier = TransitionNotifier::default();
        let store = Store::open(&database, notifier.clone());
        let feed = TransitionFeed::new(store.clone(), &notifier, WatchLimits::from_config(&config));
        let rules = WriteRules::from_config(&config);
        (HealthService::new(store, locks.clone(), feed, rules), locks, database)
    }

    fn system(id: &str) -> SystemId {
        SystemId::parse("system_id", id.to_owned()).unwrap()
    }

    /// A run `seconds` after a fixed moment, so runs order as written.
    fn run(run_id: &str, system_id: &str, status: Status, seconds: i64) -> NewRun {
        NewRun {
            run_id: RunId::parse("run_id", run_id.to_owned()).unwrap(),
            system_id: system(system_id),
            check_id: CheckId::parse("check_id", "http".to_owned()).unwrap(),
            status,
            observed_at: DateTime::from_timestamp(1_700_000_000 + seconds, 0).unwrap(),
            observed_at_given: true,
            latency: None,
            message: RunMessage::parse("message", String::new()).unwrap(),
        }
    }

    #[test]
    fn client_text_in_a_transitions_log_line_is_escaped() {
        #[derive(Clone, Default)]
        struct Captured(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);
        impl std::io::Write for Captured {
            fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
                self.0.lock().unwrap().extend_from_slice(buf);
                Ok(buf.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let captured = Captured::default();
        let writer = captured.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_ansi(false)
            .with_writer(move || writer.clone())
            .finish();
        let transition = Transition {
            sequence: 7,
            system_id: "pay\u{202e}ments".to_owned(),
            check_id: "http\u{1b}[2J".to_owned(),
            from: Status::Healthy,
            to: Status::Degraded,
            transitioned_at: DateTime::from_timestamp(1_700_000_000, 0).unwrap(),
            evaluation: evaluate(&[], &Thresholds::default()),
            in_maintenance: false,
            flapping: false,
            caused_by: Vec::new(),
            check_deleted: false,
        };
        tracing::subscriber::with_default(subscriber, || log_transition(&transition));
        let line = String::from_utf8(captured.0.lock().unwrap().clone()).unwrap();
        assert!(line.contains(r#"system_id="pay\u{202e}ments""#), "{line}");
        assert!(line.contains(r#"check_id="http\u{1b}[2J""#), "{line}");
        assert!(!line.contains('\u{202e}') && !line.contains('\u{1b}'), "{line}");
    }

    #[test]
    fn a_page_says_more_follow_only_when_the_extra_item_was_read() {
        assert_eq!(
            Page::from_overfetch(vec![1, 2, 3], 2),
            Page {
                items: vec![1, 2],
                more: true
            }
        );
        assert_eq!(
            Page::from_overfetch(vec![1, 2], 2),
            Page {
                items: vec![1, 2],
                more: false
            }
        );
        assert_eq!(
            Page::from_overfetch(Vec::<u8>::new(), 2),
            Page {
                items: vec![],
                more: false
            }
        );
    }

    #[tokio::test]
    async fn a_submission_behind_a_held_system_lock_is_busy_before_its_deadline_and_writes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let (service, locks, database) = service(&dir).await;
        let (held_tx, held_rx) = oneshot::channel();
        let (release_tx, release_rx) = oneshot::channel::<()>();
        let holder = tokio::spawn({
            let locks = locks.clone();
            async move {
                locks
                    .with_system_lock(&system("checkout"), None, || async move {
                        let _ = held_tx.send(());
                        let _ = release_rx.await;
                        Ok(())
                    })
                    .await
            }
        });
        held_rx.await.expect("the holder takes the lock");

        let started = Instant::now();
        let deadline = started + Duration::from_secs(1);
        let refused = service
            .submit_run(&run("r1", "checkout", Status::Unhealthy, 0), Some(deadline))
            .await;
        assert!(
            matches!(&refused, Err(Error::SystemBusy { system_id }) if system_id == "checkout"),
            "{refused:?}"
        );
        assert!(
            Instant::now() < deadline,
            "refused before the deadline, while the client listens"
        );
        assert!(
            matches!(
                service.system(&system("checkout")).await,
                Err(Error::SystemNotFound { .. })
            ),
            "nothing was written"
        );

        // Another system is not held up by it.
        let other = service
            .submit_run(&run("r2", "payments", Status::Healthy, 0), Some(deadline))
            .await
            .unwrap();
        assert!(!other.duplicate);

        release_tx.send(()).unwrap();
        holder.await.unwrap().unwrap();
        let accepted = service
            .submit_run(
                &run("r1", "checkout", Status::Unhealthy, 0),
                Some(Instant::now() + Duration::from_secs(1)),
            )
            .await
            .unwrap();
        assert!(!accepted.duplicate);
        assert_eq!(service.system(&system("checkout")).await.unwrap().checks.len(), 1);
        database.close().await;
    }

    #[tokio::test]
    async fn listings_page_through_everything_once_and_the_last_page_says_so() {
        let dir = tempfile::tempdir().unwrap();
        let (service, _locks, database) = service(&dir).await;
        for (i, status) in [Status::Healthy, Status::Unhealthy, Status::Unhealthy, Status::Healthy]
            .into_iter()
            .enumerate()
        {
            let seconds = i64::try_from(i).unwrap();
            service
                .submit_run(&run(&format!("r{i}"), "checkout", status, seconds), None)
                .await
                .unwrap();
        }

        let first = service.list_runs(&system("checkout"), None, None, 3).await.unwrap();
        assert_eq!(first.items.len(), 3);
        assert!(first.more);
        let last = first.items.last().unwrap();
        let cursor = RunCursor {
            observed_at: last.observed_at,
            run_id: last.run_id.clone(),
        };
        let second = service
            .list_runs(&system("checkout"), None, Some(&cursor), 3)
            .await
            .unwrap();
        assert_eq!(second.items.len(), 1);
        assert!(!second.more);
        let mut seen: Vec<_> = first
            .items
            .iter()
            .chain(&second.items)
            .map(|r| r.run_id.clone())
            .collect();
        seen.sort();
        assert_eq!(seen, ["r0", "r1", "r2", "r3"]);

        // healthy -> degraded (second failure) -> healthy: two transitions.
        let transitions = service.list_transitions(None, None, 1).await.unwrap();
        assert_eq!(transitions.items.len(), 1);
        assert!(transitions.more);
        let all = service.list_transitions(None, None, 2).await.unwrap();
        assert_eq!(all.items.len(), 2);
        assert!(!all.more);
        database.close().await;
    }
}
