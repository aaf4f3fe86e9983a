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
