//! The audit trail an operator reads with authentication on: every lock grant
//! and release and every ConfigureCheck is a log line naming the principal and
//! the request id. Logs are the process's, so this runs the real binary and
//! reads its stderr.

use std::{path::Path, time::Duration};

use sha2::{Digest, Sha256};
use tokio::{
    io::{AsyncBufReadExt, BufReader},
    process::Child,
    sync::mpsc,
};
use tonic::{Request, transport::Channel};
use vitals::proto::{
    self, health_check_service_client::HealthCheckServiceClient, lock_service_client::LockServiceClient,
    with_lock_response::Event,
};

use crate::{
    harness::PATIENCE,
    pki::write_whole,
    withlock::{acquire, release},
};

const TOKEN: &str = "audit-token";

/// Starts the binary on the embedded store in `dir` with one principal,
/// `ops`, that may configure checks and take locks; it logs text to a pipe.
fn spawn_vitals(dir: &Path) -> Child {
    let auth = dir.join("auth.toml");
    write_whole(
        &auth,
        &format!(
            "[[principal]]\nname = \"ops\"\ntoken_sha256 = {:?}\nscopes = [\"health.admin\", \"locks\"]\n",
            hex::encode(Sha256::digest(TOKEN.as_bytes()))
        ),
    );
    crate::embedded::spawn_vitals_with(&dir.join("data"), &["--auth-file".as_ref(), auth.as_os_str()])
}

/// `message` sent as principal `ops` with request id `id`.
fn as_ops<T>(message: T, id: &str) -> Request<T> {
    let mut request = Request::new(message);
    let metadata = request.metadata_mut();
    metadata.insert("authorization", format!("Bearer {TOKEN}").parse().unwrap());
    metadata.insert("x-request-id", id.parse().unwrap());
    request
}

/// The next log line containing every one of `needles`, within [`PATIENCE`].
async fn line_with(lines: &mut mpsc::UnboundedReceiver<String>, needles: &[&str]) -> String {
    let found = async {
        while let Some(line) = lines.recv().await {
            if needles.iter().all(|n| line.contains(n)) {
                return line;
            }
        }
        panic!("vitals' log ended without a line containing {needles:?}");
    };
    tokio::time::timeout(PATIENCE, found)
        .await
        .unwrap_or_else(|_| panic!("no log line containing {needles:?}"))
}

#[tokio::test]
async fn with_authentication_every_grant_release_and_check_change_is_logged_with_principal_and_request_id() {
    let scratch = tempfile::tempdir().unwrap();
    let mut child = spawn_vitals(scratch.path());
    let stderr = child.stderr.take().expect("stderr is piped");
    let (tx, mut lines) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        let mut reader = BufReader::new(stderr).lines();
        while let Ok(Some(line)) = reader.next_line().await {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let listening = line_with(&mut lines, &["vitals listening"]).await;
    let addr = listening
        .split_whitespace()
        .find_map(|field| field.strip_prefix("addr="))
        .unwrap_or_else(|| panic!("no address in {listening:?}"));
    let channel = Channel::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect_timeout(Duration::from_secs(5))
        .connect()
        .await
        .unwrap();
    // It listens before its store is open; the health stream says when it serves.
    let mut health = tonic_health::pb::health_client::HealthClient::new(channel.clone())
        .watch(tonic_health::pb::HealthCheckRequest { service: String::new() })
        .await
        .unwrap()
        .into_inner();
    let serving = async {
        while let Some(reply) = health.message().await.unwrap() {
            if reply.status() == tonic_health::pb::health_check_response::ServingStatus::Serving {
                return;
            }
        }
        panic!("the health stream ended before SERVING");
    };
    tokio::time::timeout(PATIENCE, serving).await.expect("vitals serves");
    drop(health);

    let (requests, rx) = mpsc::channel(4);
    requests.send(acquire("audited/key", None)).await.unwrap();
    let mut replies = LockServiceClient::new(channel.clone())
        .with_lock(as_ops(tokio_stream::wrappers::ReceiverStream::new(rx), "req-lock-1"))
        .await
        .unwrap()
        .into_inner();
    let token = match replies.message().await.unwrap().and_then(|m| m.event) {
        Some(Event::Acquired(acquired)) => acquired.fencing_token,
        other => panic!("expected acquired, got {other:?}"),
    };
    let granted = line_with(&mut lines, &["lock granted"]).await;
    for needle in [
        "request_id=\"req-lock-1\"",
        "principal=\"ops\"",
        "key=\"audited/key\"",
        &format!("token={token}"),
    ] {
        assert!(granted.contains(needle), "{needle:?} missing from {granted:?}");
    }
    requests.send(release()).await.unwrap();
    assert!(matches!(
        replies.message().await.unwrap().and_then(|m| m.event),
        Some(Event::Released(_))
    ));
    let released = line_with(&mut lines, &["lock released"]).await;
    for needle in ["request_id=\"req-lock-1\"", "principal=\"ops\"", "key=\"audited/key\""] {
        assert!(released.contains(needle), "{needle:?} missing from {released:?}");
    }

    HealthCheckServiceClient::new(channel)
        .configure_check(as_ops(
            proto::ConfigureCheckRequest {
                system_id: "payments".into(),
                check_id: "api".into(),
                thresholds: None,
                enabled: Some(false),
                flapping: None,
            },
            "req-config-1",
        ))
        .await
        .unwrap();
    let configured = line_with(&mut lines, &["check configured"]).await;
    for needle in [
        "request_id=\"req-config-1\"",
        "principal=\"ops\"",
        "system_id=\"payments\"",
        "check_id=\"api\"",
        "enabled=false",
    ] {
        assert!(configured.contains(needle), "{needle:?} missing from {configured:?}");
    }
    child.kill().await.unwrap();
}
