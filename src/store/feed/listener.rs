//! PostgreSQL's `LISTEN` for the feed: every replica's commits of a
//! transition wake this replica's feed.
//!
//! The listening session is a connection of its own (the listen pool's one),
//! so it never takes a work or lock connection. When it breaks (a restart,
//! `pg_terminate_backend`, a network fault) it is opened again after a delay
//! that doubles from [`RECONNECT_MIN`] to [`RECONNECT_MAX`], never in a tight
//! loop; once it listens again the feed reads, because notifications sent
//! while nobody listened are lost.

use std::{
    sync::{Arc, atomic::Ordering},
    time::{Duration, Instant},
};

use sqlx::postgres::{PgListener, PgPool};
use tokio::sync::watch;

use super::Shared;
use crate::store::postgres::TRANSITIONS_CHANNEL;

/// First delay before opening the listening session again.
pub(crate) const RECONNECT_MIN: Duration = Duration::from_millis(100);
/// Longest delay between attempts.
pub(crate) const RECONNECT_MAX: Duration = Duration::from_secs(5);

/// A delay that doubles from `min` to `max` with each failure.
#[derive(Debug, Clone)]
pub(crate) struct Backoff {
    min: Duration,
    max: Duration,
    next: Duration,
}

impl Backoff {
    pub(crate) fn new(min: Duration, max: Duration) -> Self {
        Backoff { min, max, next: min }
    }

    /// The delay before the next attempt.
    pub(crate) fn next_delay(&mut self) -> Duration {
        let delay = self.next;
        self.next = (self.next * 2).min(self.max);
        delay
    }

    /// After a success: the next failure waits `min` again.
    pub(crate) fn reset(&mut self) {
        self.next = self.min;
    }
}

/// Waits `delay`; false if the process is stopping meanwhile.
pub(crate) async fn pause(delay: Duration, stopping: &mut watch::Receiver<bool>) -> bool {
    tokio::select! {
        () = tokio::time::sleep(delay) => true,
        _ = stopping.changed() => false,
    }
}

/// Listens until `stopping` changes, waking the feed on every notification
/// and after every (re)connection.
pub(crate) async fn listen(pool: PgPool, shared: Arc<Shared>, mut stopping: watch::Receiver<bool>) {
    let mut backoff = Backoff::new(RECONNECT_MIN, RECONNECT_MAX);
    let mut was_lost = false;
    loop {
        shared.listener_attempts.fetch_add(1, Ordering::Relaxed);
        let connect = async {
            let mut listener = PgListener::connect_with(&pool).await?;
            // A lost connection is reopened here, with the backoff, not
            // inside try_recv.
            listener.eager_reconnect(false);
            listener.listen(TRANSITIONS_CHANNEL).await?;
            Ok::<_, sqlx::Error>(listener)
        };
        let connected = tokio::select! {
            connected = connect => connected,
            _ = stopping.changed() => return,
        };
        match connected {
            Ok(mut listener) => {
                let since = Instant::now();
                shared.listener_connects.fetch_add(1, Ordering::Relaxed);
                if was_lost {
                    tracing::info!("transition listener listening again");
                }
                // Listening now; what committed before is found by reading.
                shared.wake.notify_one();
                let lost = tokio::select! {
                    lost = receive(&mut listener, &shared) => lost,
                    _ = stopping.changed() => return,
                };
                match lost {
                    Some(err) => tracing::warn!(error = %err, "transition listener lost its connection; reconnecting"),
                    None => tracing::warn!("transition listener lost its connection; reconnecting"),
                }
                was_lost = true;
                // A session that lived a while resets the delay; one that
                // breaks at once keeps doubling it.
                if since.elapsed() >= RECONNECT_MAX {
                    backoff.reset();
                }
            }
            Err(err) => tracing::debug!(error = %err, "transition listener could not connect; will retry"),
        }
        if !pause(backoff.next_delay(), &mut stopping).await {
            return;
        }
    }
}

/// Wakes the feed for each notification until the connection is lost;
/// returns why, if sqlx said.
async fn receive(listener: &mut PgListener, shared: &Shared) -> Option<sqlx::Error> {
    loop {
        match listener.try_recv().await {
            Ok(Some(_)) => shared.wake.notify_one(),
            Ok(None) => return None,
            Err(err) => return Some(err),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_backoff_doubles_to_its_maximum_and_a_reset_starts_it_over() {
        let mut backoff = Backoff::new(RECONNECT_MIN, RECONNECT_MAX);
        let delays: Vec<u128> = (0..8).map(|_| backoff.next_delay().as_millis()).collect();
        assert_eq!(delays, [100, 200, 400, 800, 1600, 3200, 5000, 5000]);
        backoff.reset();
        assert_eq!(backoff.next_delay(), RECONNECT_MIN);
    }
}
