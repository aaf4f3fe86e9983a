//! Wakes WatchTransitions subscribers when any replica commits a transition:
//! through PostgreSQL's `LISTEN/NOTIFY`, or, for the embedded store (one
//! replica), through a [`TransitionNotifier`] the store bumps after a commit.
//!
//! The feed carries no transitions itself, only "something may have changed":
//! subscribers then read `transitions` after their last sequence. Sequences
//! commit in order (see the store), so reading from the database is what
//! makes a resumed watcher miss none and see none twice; a lost notification
//! only delays a subscriber until the next poll.

use std::{sync::Arc, time::Duration};

use sqlx::postgres::{PgListener, PgPool};
use tokio::sync::watch;

use super::postgres::TRANSITIONS_CHANNEL;

/// Subscribers poll at least this often, covering notifications lost while
/// the listening connection was down.
pub(crate) const POLL_INTERVAL: Duration = Duration::from_secs(2);

/// A handle subscribers clone to wait for news.
#[derive(Debug, Clone)]
pub struct TransitionFeed {
    epoch: watch::Receiver<u64>,
}

impl TransitionFeed {
    /// Starts listening on a connection of `pool` (a pool of its own, so the
    /// long-lived LISTEN session never occupies a work or lock connection).
    /// The task ends when `shutdown` resolves.
    pub fn start(pool: PgPool, shutdown: watch::Receiver<bool>) -> Self {
        let (tx, epoch) = watch::channel(0u64);
        tokio::spawn(listen(pool, tx, shutdown));
        TransitionFeed { epoch }
    }

    /// A feed woken in process: the embedded store calls
    /// [`TransitionNotifier::notify`] after each commit that wrote a transition.
    pub fn in_process() -> (Self, TransitionNotifier) {
        let (tx, epoch) = watch::channel(0u64);
        (TransitionFeed { epoch }, TransitionNotifier(Arc::new(tx)))
    }

    /// A feed that is never woken (subscribers rely on polling).
    pub fn idle() -> Self {
        let (_tx, epoch) = watch::channel(0u64);
        TransitionFeed { epoch }
    }

    /// Waits until something may have changed, or the poll interval passed.
    pub async fn wait(&mut self) {
        let _ = tokio::time::timeout(POLL_INTERVAL, self.epoch.changed()).await;
    }

    /// Marks the current state as seen, so [`TransitionFeed::wait`] waits for
    /// news after this point.
    pub fn mark_seen(&mut self) {
        self.epoch.borrow_and_update();
    }
}

/// The sending side of an in-process [`TransitionFeed`].
#[derive(Debug, Clone)]
pub struct TransitionNotifier(Arc<watch::Sender<u64>>);

impl TransitionNotifier {
    /// Wakes every subscriber: something may have been committed.
    pub fn notify(&self) {
        self.0.send_modify(|e| *e = e.wrapping_add(1));
    }
}

async fn listen(pool: PgPool, tx: watch::Sender<u64>, mut shutdown: watch::Receiver<bool>) {
    let bump = |tx: &watch::Sender<u64>| tx.send_modify(|e| *e = e.wrapping_add(1));
    loop {
        let listener = async {
            let mut listener = PgListener::connect_with(&pool).await?;
            listener.listen(TRANSITIONS_CHANNEL).await?;
            // Anything committed while we were not listening is found by
            // the subscribers' next read.
            bump(&tx);
            loop {
                match listener.try_recv().await? {
                    Some(_) => bump(&tx),
                    None => bump(&tx), // reconnected: notifications may be lost
                }
            }
            #[allow(unreachable_code)]
            Ok::<(), sqlx::Error>(())
        };
        tokio::select! {
            result = listener => {
                if let Err(err) = result {
                    tracing::debug!(error = %err, "transition listener lost its connection");
                }
            }
            _ = shutdown.changed() => return,
        }
        tokio::select! {
            () = tokio::time::sleep(Duration::from_millis(500)) => {}
            _ = shutdown.changed() => return,
        }
    }
}
