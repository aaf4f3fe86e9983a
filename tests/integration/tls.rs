//! TLS and mTLS on the gRPC listener, certificate rotation, and the
//! plaintext probe listener. Certificates are made by each test (pki.rs).
//! TLS does not touch the store, so these run on the embedded one.

use std::time::Duration;

use tonic::{Code, transport::Channel};
use tonic_health::pb::{HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient};
use vitals::proto::{self, health_check_service_client::HealthCheckServiceClient};

use crate::{
    harness::{PATIENCE, TestApp, TestDb, eventually, plaintext_endpoint, tls_endpoint, until},
    pki::{Ca, ServerFiles, as_strs},
};

fn evaluate() -> proto::EvaluateHealthRequest {
    proto::EvaluateHealthRequest {
        statuses: vec![proto::HealthStatus::Unhealthy as i32],
        ..Default::default()
    }
}

/// Whether an EvaluateHealth over `channel` succeeds.
async fn served(channel: Channel) -> Result<(), tonic::Status> {
    HealthCheckServiceClient::new(channel)
        .evaluate_health(evaluate())
        .await
        .map(|_| ())
}

/// Whether a new connection configured by `endpoint` is served.
async fn connects(endpoint: tonic::transport::Endpoint) -> Result<(), String> {
    let channel = endpoint.connect().await.map_err(|e| format!("connect: {e:?}"))?;
    served(channel).await.map_err(|status| format!("{status:?}"))
}

#[tokio::test]
async fn a_client_trusting_the_ca_is_served_and_plaintext_or_another_ca_is_refused() {
    let db = TestDb::embedded();
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new("server CA");
    let files = ServerFiles::write(dir.path(), &ca.server(), None);
    let app = TestApp::start_tls(&db, &as_strs(&files.flags(false)), ca.trusted_by_client()).await;

    served(app.channel().await).await.unwrap();
    assert!(
        connects(plaintext_endpoint(app.addr)).await.is_err(),
        "no plaintext gRPC when TLS is configured"
    );
    let stranger = Ca::new("another CA");
    assert!(
        connects(tls_endpoint(app.addr, stranger.trusted_by_client()))
            .await
            .is_err(),
        "a server certificate the client's CA did not issue"
    );
    // And the listener still serves after the refusals.
    served(app.channel().await).await.unwrap();
    app.stop().await;
}

#[tokio::test]
async fn mtls_serves_a_client_certificate_of_the_ca_and_refuses_none_another_cas_or_an_expired_one() {
    let db = TestDb::embedded();
    let dir = tempfile::tempdir().unwrap();
    let server_ca = Ca::new("server CA");
    let client_ca = Ca::new("client CA");
    let files = ServerFiles::write(dir.path(), &server_ca.server(), Some(&client_ca));
    let client = client_ca.client("spiffe://test/client");
    let app = TestApp::start_tls(
        &db,
        &as_strs(&files.flags(true)),
        client.presented(server_ca.trusted_by_client()),
    )
    .await;
    served(app.channel().await).await.unwrap();

    let trusting = server_ca.trusted_by_client();
    let refusals = [
        ("no client certificate", trusting.clone()),
        (
            "a certificate of another CA",
            Ca::new("rogue CA")
                .client("spiffe://test/client")
                .presented(trusting.clone()),
        ),
        (
            "an expired certificate",
            client_ca
                .expired_client("spiffe://test/client")
                .presented(trusting.clone()),
        ),
    ];
    for (what, tls) in refusals {
        let outcome = connects(tls_endpoint(app.addr, tls)).await;
        assert!(outcome.is_err(), "{what} is refused: {outcome:?}");
    }
    assert!(connects(plaintext_endpoint(app.addr)).await.is_err());
    served(app.channel().await).await.unwrap();
    app.stop().await;
}

#[tokio::test]
async fn a_rotated_certificate_reaches_new_connections_while_an_old_one_keeps_working_and_a_bad_one_is_not_taken() {
    let db = TestDb::embedded();
    let dir = tempfile::tempdir().unwrap();
    let first_ca = Ca::new("first CA");
    let second_ca = Ca::new("second CA");
    let files = ServerFiles::write(dir.path(), &first_ca.server(), None);
    let app = TestApp::start_tls(&db, &as_strs(&files.flags(false)), first_ca.trusted_by_client()).await;
    // One connection, kept open across the rotation.
    let old = app.channel().await;
    served(old.clone()).await.unwrap();

    files.replace(&second_ca.server());
    eventually(
        Duration::from_secs(10),
        "a new connection is served the rotated certificate",
        async || connects(tls_endpoint(app.addr, second_ca.trusted_by_client())).await,
    )
    .await;
    served(old.clone())
        .await
        .expect("the connection opened before the rotation still works");
    assert!(
        connects(tls_endpoint(app.addr, first_ca.trusted_by_client()))
            .await
            .is_err(),
        "new connections no longer get the old certificate"
    );

    // A certificate whose key is not in the key file, then a file that is
    // not PEM: each is refused and the rotated certificate stays.
    let reloads = app.tls_reloads.clone().expect("TLS is on");
    let refused = reloads.refused();
    let third = Ca::new("third CA").server();
    crate::pki::write_whole(&files.cert, &third.cert);
    until(PATIENCE, "the mismatched certificate is refused", || {
        reloads.refused() > refused
    })
    .await;
    crate::pki::write_whole(&files.cert, "not a certificate");
    until(PATIENCE, "the garbage file is refused", || {
        reloads.refused() > refused + 1
    })
    .await;
    connects(tls_endpoint(app.addr, second_ca.trusted_by_client()))
        .await
        .expect("the last good certificate is still served");
    served(old).await.unwrap();
    app.stop().await;
}

#[tokio::test]
async fn the_probe_listener_answers_health_in_plaintext_and_nothing_else() {
    let db = TestDb::embedded();
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new("server CA");
    let files = ServerFiles::write(dir.path(), &ca.server(), Some(&Ca::new("client CA")));
    let mut flags = files.flags(true);
    flags.extend(["--probe-addr".to_owned(), "127.0.0.1:0".to_owned()]);
    let app = TestApp::start_unready(&db.url, &as_strs(&flags)).await;
    let probe = plaintext_endpoint(app.probe_addr.expect("a probe listener"))
        .connect()
        .await
        .unwrap();

    let mut health = HealthClient::new(probe.clone());
    let status = eventually(PATIENCE, "the probe listener says SERVING", async || {
        let reply = health
            .check(HealthCheckRequest {
                service: "vitals.v1.HealthCheckService".into(),
            })
            .await
            .map_err(|s| format!("{s:?}"))?;
        match reply.into_inner().status() {
            ServingStatus::Serving => Ok(ServingStatus::Serving),
            other => Err(format!("{other:?}")),
        }
    })
    .await;
    assert_eq!(status, ServingStatus::Serving);

    let refused = HealthCheckServiceClient::new(probe.clone())
        .evaluate_health(evaluate())
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::Unimplemented, "{refused:?}");
    let mut reflection = tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient::new(probe.clone());
    let request = tonic_reflection::pb::v1::ServerReflectionRequest {
        host: String::new(),
        message_request: Some(
            tonic_reflection::pb::v1::server_reflection_request::MessageRequest::ListServices(String::new()),
        ),
    };
    let refused = reflection
        .server_reflection_info(futures::stream::iter([request]))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::Unimplemented, "{refused:?}");
    // The main listener still speaks mTLS only.
    assert!(connects(plaintext_endpoint(app.addr)).await.is_err());
    app.stop().await;
}
