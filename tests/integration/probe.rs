//! `vitals probe` as an exec probe would run it.

use tokio::process::Command;

use crate::harness::{TestApp, TestDb};

async fn probe(args: &[&str]) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_vitals"))
        .arg("probe")
        .args(args)
        .output()
        .await
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text.trim().to_owned())
}

#[tokio::test]
async fn the_probe_exits_zero_only_when_serving_and_says_why_otherwise() {
    let db = TestDb::postgres().await;
    let app = TestApp::start(&db, &[]).await;
    let addr = app.addr.to_string();
    let (ok, out) = probe(&["--addr", &addr, "--service", "vitals.v1.LockService"]).await;
    assert!(ok, "{out}");
    assert_eq!(out, "SERVING");
    let (ok, out) = probe(&["--addr", &addr, "--service", "no.such.Service"]).await;
    assert!(!ok);
    assert!(out.contains("NotFound"), "{out}");
    app.stop().await;
    let (ok, out) = probe(&["--addr", &addr, "--timeout", "500ms"]).await;
    assert!(!ok);
    assert!(out.contains("refused"), "{out}");
    assert_eq!(out.lines().count(), 1, "one line: {out}");
}

#[tokio::test]
async fn the_probe_reports_not_serving_while_the_database_is_down() {
    let app = TestApp::start_unready("postgres://vitals:vitals@127.0.0.1:1/vitals", &[]).await;
    let (ok, out) = probe(&["--addr", &app.addr.to_string()]).await;
    assert!(!ok);
    assert!(out.ends_with("NOT_SERVING"), "{out}");
    app.stop().await;
}

#[tokio::test]
async fn the_probe_speaks_tls_and_mtls_with_the_ca_and_certificate_it_is_given() {
    use crate::pki::{Ca, ServerFiles, as_strs};
    let db = TestDb::embedded();
    let dir = tempfile::tempdir().unwrap();
    let server_ca = Ca::new("server CA");
    let client_ca = Ca::new("client CA");
    let files = ServerFiles::write(dir.path(), &server_ca.server(), Some(&client_ca));
    let client = client_ca.client("spiffe://test/probe");
    let app = TestApp::start_tls(
        &db,
        &as_strs(&files.flags(true)),
        client.presented(server_ca.trusted_by_client()),
    )
    .await;
    let write = |name: &str, text: &str| {
        let path = dir.path().join(name);
        std::fs::write(&path, text).unwrap();
        path.display().to_string()
    };
    let ca = write("probe-ca.crt", &server_ca.pem);
    let cert = write("probe.crt", &client.cert);
    let key = write("probe.key", &client.key);
    let addr = app.addr.to_string();
    let tls = ["--ca-file", ca.as_str(), "--server-name", "localhost"];

    let mut args = vec!["--addr", addr.as_str()];
    args.extend(tls);
    args.extend([
        "--cert-file",
        cert.as_str(),
        "--key-file",
        key.as_str(),
        "--token",
        "unused",
    ]);
    let (ok, out) = probe(&args).await;
    assert!(ok, "{out}");
    assert_eq!(out, "SERVING");

    let mut without_certificate = vec!["--addr", addr.as_str()];
    without_certificate.extend(tls);
    let (ok, out) = probe(&without_certificate).await;
    assert!(!ok, "mTLS refuses a probe without a client certificate: {out}");
    let (ok, out) = probe(&["--addr", &addr]).await;
    assert!(!ok, "the listener speaks no plaintext: {out}");
    app.stop().await;
}
