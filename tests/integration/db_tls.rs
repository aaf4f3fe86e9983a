//! TLS to PostgreSQL: a throw-away cluster of the test's own, with `ssl=on`,
//! a server certificate from a CA the test made, and `hostssl` as the only
//! way in, so a plaintext connection cannot succeed.
//!
//! The cluster is started from the locally installed server binaries (as
//! scripts/test.sh starts its own when `DATABASE_URL` is unset); as root,
//! as the `postgres` user, since initdb refuses to run as root.

use std::{
    net::TcpListener,
    path::{Path, PathBuf},
    process::Command,
};

use sqlx::Connection;
use tonic_health::pb::health_check_response::ServingStatus;
use vitals::proto;

use crate::{
    harness::{PATIENCE, TestApp, assert_reason, eventually},
    pki::Ca,
    withlock::submit,
};

/// The newest PostgreSQL server binaries here.
fn bindir() -> PathBuf {
    let mut dirs: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .map(|entries| entries.filter_map(Result::ok).map(|e| e.path().join("bin")).collect())
        .unwrap_or_default();
    dirs.retain(|d| d.join("initdb").exists() && d.join("pg_ctl").exists());
    dirs.sort_by_key(|d| {
        d.parent()
            .and_then(|v| v.file_name())
            .and_then(|v| v.to_str())
            .and_then(|v| v.parse::<u32>().ok())
    });
    dirs.pop()
        .expect("PostgreSQL server binaries in /usr/lib/postgresql/*/bin (apt-get install postgresql)")
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
}

/// Runs `program` (as `postgres` when we are root) and panics with its
/// output when it fails.
fn run_as_cluster_owner(program: &Path, args: &[&str]) {
    let output = if is_root() {
        Command::new("runuser")
            .args(["-u", "postgres", "--"])
            .arg(program)
            .args(args)
            .output()
    } else {
        Command::new(program).args(args).output()
    }
    .unwrap();
    assert!(
        output.status.success(),
        "{} {args:?}: {}{}",
        program.display(),
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

/// Hands `path` to the `postgres` user, when we are root.
fn give_to_cluster_owner(path: &Path) {
    if is_root() {
        let status = Command::new("chown")
            .args(["-R", "postgres:"])
            .arg(path)
            .status()
            .unwrap();
        assert!(status.success(), "chown {}", path.display());
    }
}

/// A running cluster that speaks only TLS; stopped when dropped.
struct TlsCluster {
    bindir: PathBuf,
    data: PathBuf,
    port: u16,
    /// The CA that issued the server certificate, PEM, in a file.
    ca_file: PathBuf,
    _dir: tempfile::TempDir,
}

impl TlsCluster {
    fn start() -> TlsCluster {
        let bindir = bindir();
        let dir = tempfile::Builder::new().prefix("vitals-pg-tls-").tempdir().unwrap();
        let data = dir.path().join("data");
        let ca = Ca::new("database CA");
        let server = ca.server();
        let ca_file = dir.path().join("ca.crt");
        std::fs::write(&ca_file, &ca.pem).unwrap();
        std::fs::write(dir.path().join("server.crt"), &server.cert).unwrap();
        let key = dir.path().join("server.key");
        std::fs::write(&key, &server.key).unwrap();
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
            std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        }
        give_to_cluster_owner(dir.path());
        let data_arg = data.display().to_string();
        run_as_cluster_owner(
            &bindir.join("initdb"),
            &[
                "-D",
                &data_arg,
                "-U",
                "postgres",
                "-E",
                "UTF8",
                "--no-sync",
                "--auth=trust",
            ],
        );
        // TLS or nothing: no `host` line, so a plaintext TCP connection is
        // refused by pg_hba.conf.
        std::fs::write(
            data.join("pg_hba.conf"),
            "local all all trust\nhostssl all all 127.0.0.1/32 trust\n",
        )
        .unwrap();
        give_to_cluster_owner(&data.join("pg_hba.conf"));
        let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let options = format!(
            "-p {port} -k {dir} -c listen_addresses=127.0.0.1 -c ssl=on -c ssl_cert_file={dir}/server.crt \
             -c ssl_key_file={dir}/server.key -c fsync=off -c max_locks_per_transaction=256",
            dir = dir.path().display()
        );
        let log = dir.path().join("server.log").display().to_string();
        run_as_cluster_owner(
            &bindir.join("pg_ctl"),
            &["-D", &data_arg, "-l", &log, "-w", "-t", "60", "-o", &options, "start"],
        );
        TlsCluster {
            bindir,
            data,
            port,
            ca_file,
            _dir: dir,
        }
    }

    /// A URL of the `postgres` database with `sslmode` (and, when given,
    /// `sslrootcert`).
    fn url(&self, sslmode: &str, root_cert: Option<&Path>) -> String {
        let mut url = format!("postgres://postgres@localhost:{}/postgres?sslmode={sslmode}", self.port);
        if let Some(root) = root_cert {
            url.push_str(&format!("&sslrootcert={}", root.display()));
        }
        url
    }
}

impl Drop for TlsCluster {
    fn drop(&mut self) {
        let pg_ctl = self.bindir.join("pg_ctl");
        let data = self.data.display().to_string();
        let mut command = if is_root() {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(pg_ctl);
            c
        } else {
            Command::new(pg_ctl)
        };
        let _ = command.args(["-D", &data, "-m", "immediate", "stop"]).output();
    }
}

#[tokio::test]
async fn vitals_speaks_tls_to_postgresql_with_sslmode_require_and_verify_full_and_refuses_an_unknown_ca() {
    let cluster = TlsCluster::start();
    assert!(
        sqlx::PgConnection::connect(&cluster.url("disable", None))
            .await
            .is_err(),
        "the cluster takes TLS connections only"
    );

    for url in [
        cluster.url("verify-full", Some(&cluster.ca_file)),
        cluster.url("verify-ca", Some(&cluster.ca_file)),
        cluster.url("require", None),
    ] {
        let app = TestApp::start_unready(&url, &[]).await;
        app.wait_serving("").await;
        let mut client = app.health_client().await;
        client
            .submit_run(submit(&uuid::Uuid::new_v4().to_string(), "over-tls"))
            .await
            .unwrap_or_else(|s| panic!("{url}: {s:?}"));
        let mut conn = sqlx::PgConnection::connect(&url).await.unwrap();
        let plaintext: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM pg_stat_activity a JOIN pg_stat_ssl s USING (pid) \
             WHERE a.application_name LIKE 'vitals-%' AND NOT s.ssl",
        )
        .fetch_one(&mut conn)
        .await
        .unwrap();
        assert_eq!(plaintext, 0, "{url}");
        app.stop().await;
    }

    // verify-full with a CA that did not issue the server's certificate:
    // vitals never reaches the database, and says so.
    let stranger = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(stranger.path(), Ca::new("another CA").pem).unwrap();
    let app = TestApp::start_unready(&cluster.url("verify-full", Some(stranger.path())), &[]).await;
    let status = eventually(PATIENCE, "vitals reports that it cannot serve", async || {
        match app.serving_status("").await {
            ServingStatus::NotServing => Ok(ServingStatus::NotServing),
            other => Err(format!("{other:?}")),
        }
    })
    .await;
    assert_eq!(status, ServingStatus::NotServing);
    let refused = app
        .health_client()
        .await
        .evaluate_health(proto::EvaluateHealthRequest::default())
        .await
        .unwrap_err();
    assert_reason(&refused, tonic::Code::Unavailable, "DATABASE_UNAVAILABLE");
    app.stop().await;
}
