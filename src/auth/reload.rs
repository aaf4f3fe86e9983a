//! Reading the TLS and auth files again when they change, without a restart.
//!
//! Certificates are rotated (cert-manager, a SPIFFE agent, an operator) and
//! principals change while vitals runs; a restart for each would drop every
//! watch and lock stream. A task per set of files reads them every
//! `VITALS_FILE_RELOAD_INTERVAL_MS`, and at once on SIGHUP, and applies them
//! when their bytes differ from what was applied. Reading the contents
//! rather than looking at modification times also follows the symlink swap
//! with which Kubernetes updates a mounted Secret.
//!
//! A version that does not load (a key that is not the certificate's, a file
//! caught half-written, a typo in a principal) is logged as an error once
//! and the previous one stays in force: a bad rotation must not take the
//! service down or open it.

use std::{
    path::PathBuf,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use tokio::{sync::watch, task::JoinHandle};

/// How many new versions of a set of files were applied and refused since
/// start: what an operator (or a test) reads to know a rotation was seen.
#[derive(Debug, Default)]
pub struct ReloadCounts {
    applied: AtomicU64,
    refused: AtomicU64,
}

impl ReloadCounts {
    /// Fresh counts, shared with the task that updates them.
    pub fn new() -> Arc<ReloadCounts> {
        Arc::new(ReloadCounts::default())
    }

    /// New versions applied.
    pub fn applied(&self) -> u64 {
        self.applied.load(Ordering::SeqCst)
    }

    /// New versions refused (unreadable or invalid), the previous one kept.
    pub fn refused(&self) -> u64 {
        self.refused.load(Ordering::SeqCst)
    }
}

/// Reads every file of `paths`, in order. The error names the file.
pub fn read_all(paths: &[PathBuf]) -> Result<Vec<Vec<u8>>, String> {
    paths
        .iter()
        .map(|path| std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display())))
        .collect()
}

/// Watches `paths` (already applied with the contents `applied`) and calls
/// `apply` with their contents whenever they change, until `stop` says so.
/// `what` names the files in log lines ("TLS certificate", "auth file");
/// `counts` counts what happened.
pub fn spawn<F>(
    what: &'static str,
    paths: Vec<PathBuf>,
    applied: Vec<Vec<u8>>,
    every: Duration,
    mut apply: F,
    counts: Arc<ReloadCounts>,
    mut stop: watch::Receiver<bool>,
) -> JoinHandle<()>
where
    F: FnMut(&[Vec<u8>]) -> Result<(), String> + Send + 'static,
{
    tokio::spawn(async move {
        let mut hangup = hangup_signal();
        let mut applied = applied;
        // The last contents or read error refused, logged once each.
        let mut refused: Option<Result<Vec<Vec<u8>>, String>> = None;
        loop {
            tokio::select! {
                () = tokio::time::sleep(every) => {}
                () = next_hangup(&mut hangup) => {
                    tracing::info!(files = %names(&paths), "SIGHUP: reading {what} again");
                }
                _ = stop.changed() => return,
            }
            let read = read_all(&paths);
            if read.as_ref().is_ok_and(|contents| *contents == applied) || refused.as_ref() == Some(&read) {
                continue;
            }
            match read.as_ref().map_err(Clone::clone).and_then(|contents| apply(contents)) {
                Ok(()) => {
                    tracing::info!(files = %names(&paths), "{what} reloaded");
                    counts.applied.fetch_add(1, Ordering::SeqCst);
                    if let Ok(contents) = read {
                        applied = contents;
                    }
                    refused = None;
                }
                Err(why) => {
                    tracing::error!(files = %names(&paths), error = %why, "{what} not reloaded: keeping the previous one");
                    refused = Some(read);
                    counts.refused.fetch_add(1, Ordering::SeqCst);
                }
            }
        }
    })
}

fn names(paths: &[PathBuf]) -> String {
    paths
        .iter()
        .map(|p| p.display().to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

#[cfg(unix)]
type Hangup = Option<tokio::signal::unix::Signal>;
#[cfg(not(unix))]
type Hangup = ();

#[cfg(unix)]
fn hangup_signal() -> Hangup {
    tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).ok()
}

#[cfg(not(unix))]
fn hangup_signal() -> Hangup {}

#[cfg(unix)]
async fn next_hangup(hangup: &mut Hangup) {
    match hangup {
        Some(signal) => {
            if signal.recv().await.is_none() {
                std::future::pending::<()>().await;
            }
        }
        None => std::future::pending::<()>().await,
    }
}

#[cfg(not(unix))]
async fn next_hangup(_: &mut Hangup) {
    std::future::pending::<()>().await;
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use std::sync::{Arc, Mutex};

    use super::*;

    #[tokio::test]
    async fn changed_contents_are_applied_and_refused_ones_leave_the_last_applied_in_force() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        std::fs::write(&path, "good-1").unwrap();
        let seen = Arc::new(Mutex::new(Vec::<String>::new()));
        let (stop_tx, stop_rx) = watch::channel(false);
        let record = seen.clone();
        let task = spawn(
            "test file",
            vec![path.clone()],
            read_all(std::slice::from_ref(&path)).unwrap(),
            Duration::from_millis(10),
            move |contents| {
                let text = String::from_utf8_lossy(&contents[0]).into_owned();
                if text.starts_with("bad") {
                    return Err("refused".into());
                }
                record.lock().unwrap().push(text);
                Ok(())
            },
            ReloadCounts::new(),
            stop_rx,
        );
        let wait_for = |want: Vec<&'static str>| {
            let seen = seen.clone();
            async move {
                for _ in 0..2000 {
                    if *seen.lock().unwrap() == want {
                        return;
                    }
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                panic!("never saw {want:?}: {:?}", seen.lock().unwrap());
            }
        };
        std::fs::write(&path, "bad").unwrap();
        std::fs::write(&path, "good-2").unwrap();
        wait_for(vec!["good-2"]).await;
        std::fs::write(&path, "bad-again").unwrap();
        std::fs::remove_file(&path).unwrap();
        std::fs::write(&path, "good-3").unwrap();
        wait_for(vec!["good-2", "good-3"]).await;
        stop_tx.send(true).unwrap();
        task.await.unwrap();
    }
}
