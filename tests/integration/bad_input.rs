//! Hostile input. Random bytes and random valid-shaped messages go
//! to every RPC through a real client; the server never panics, never answers
//! INTERNAL for a client's mistake, and stays healthy.

use bytes::{Buf, BufMut};
use http::uri::PathAndQuery;
use proptest::{
    prelude::*,
    strategy::{Strategy, ValueTree},
    test_runner::TestRunner,
};
use tonic::{
    Code, Request, Status,
    codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder},
    transport::Channel,
};
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_types::StatusExt;
use vitals::proto;

use crate::harness::{TestApp, TestDb, assert_reason};

/// Sends and receives message bodies as raw bytes.
#[derive(Debug, Clone, Default)]
struct RawCodec;
#[derive(Debug, Clone, Default)]
struct RawEncoder;
#[derive(Debug, Clone, Default)]
struct RawDecoder;

impl Codec for RawCodec {
    type Encode = Vec<u8>;
    type Decode = Vec<u8>;
    type Encoder = RawEncoder;
    type Decoder = RawDecoder;
    fn encoder(&mut self) -> RawEncoder {
        RawEncoder
    }
    fn decoder(&mut self) -> RawDecoder {
        RawDecoder
    }
}

impl Encoder for RawEncoder {
    type Item = Vec<u8>;
    type Error = Status;
    fn encode(&mut self, item: Vec<u8>, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        dst.put_slice(&item);
        Ok(())
    }
}

impl Decoder for RawDecoder {
    type Item = Vec<u8>;
    type Error = Status;
    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Vec<u8>>, Status> {
        let bytes = src.chunk().to_vec();
        src.advance(bytes.len());
        Ok(Some(bytes))
    }
}

const UNARY: [&str; 6] = [
    "/vitals.v1.HealthCheckService/EvaluateHealth",
    "/vitals.v1.HealthCheckService/SubmitRun",
    "/vitals.v1.HealthCheckService/GetSystemHealth",
    "/vitals.v1.HealthCheckService/ListRuns",
    "/vitals.v1.HealthCheckService/ListTransitions",
    "/vitals.v1.HealthCheckService/ConfigureCheck",
];

async fn raw_unary(channel: &Channel, path: &'static str, body: Vec<u8>) -> Result<(), Status> {
    let mut grpc = tonic::client::Grpc::new(channel.clone());
    grpc.ready().await.map_err(|e| Status::unavailable(e.to_string()))?;
    grpc.unary(Request::new(body), PathAndQuery::from_static(path), RawCodec)
        .await
        .map(|_| ())
}

async fn raw_stream(channel: &Channel, path: &'static str, bodies: Vec<Vec<u8>>) -> Result<(), Status> {
    let mut grpc = tonic::client::Grpc::new(channel.clone());
    grpc.ready().await.map_err(|e| Status::unavailable(e.to_string()))?;
    let mut replies = grpc
        .streaming(
            Request::new(tokio_stream::iter(bodies)),
            PathAndQuery::from_static(path),
            RawCodec,
        )
        .await?
        .into_inner();
    while replies.message().await?.is_some() {}
    Ok(())
}

/// A client mistake must never come back as INTERNAL or UNKNOWN.
fn assert_not_internal(what: &str, result: &Result<(), Status>) {
    if let Err(status) = result {
        assert!(
            !matches!(status.code(), Code::Internal | Code::Unknown | Code::DataLoss),
            "{what}: {status:?}"
        );
    }
}

#[tokio::test]
async fn random_bytes_to_every_rpc_never_produce_internal_errors() {
    let db = TestDb::postgres().await;
    let app = TestApp::start(&db, &["--database-lock-timeout-ms", "200"]).await;
    let channel = app.channel().await;
    let mut runner = TestRunner::deterministic();
    let bytes = proptest::collection::vec(any::<u8>(), 0..300);
    for round in 0..60 {
        for path in UNARY {
            let body = bytes.new_tree(&mut runner).unwrap().current();
            let result = raw_unary(&channel, path, body.clone()).await;
            assert_not_internal(&format!("round {round} {path} {body:?}"), &result);
        }
        let bodies: Vec<Vec<u8>> = (0..3).map(|_| bytes.new_tree(&mut runner).unwrap().current()).collect();
        let result = raw_stream(&channel, "/vitals.v1.LockService/WithLock", bodies.clone()).await;
        assert_not_internal(&format!("round {round} WithLock {bodies:?}"), &result);
        // A valid watch request opens an endless stream: only an early error matters here.
        let watch = raw_stream(
            &channel,
            "/vitals.v1.HealthCheckService/WatchTransitions",
            vec![bodies[0].clone()],
        );
        if let Ok(result) = tokio::time::timeout(std::time::Duration::from_millis(200), watch).await {
            assert_not_internal(&format!("round {round} WatchTransitions"), &result);
        }
    }
    assert_eq!(app.serving_status("").await, ServingStatus::Serving);
    app.stop().await;
}

#[tokio::test]
async fn a_string_field_that_is_not_utf8_is_invalid_argument() {
    let db = TestDb::postgres().await;
    let app = TestApp::start(&db, &[]).await;
    let channel = app.channel().await;
    // GetSystemHealthRequest.system_id (field 1, length-delimited) = 0xff 0xfe.
    let err = raw_unary(
        &channel,
        "/vitals.v1.HealthCheckService/GetSystemHealth",
        vec![0x0a, 2, 0xff, 0xfe],
    )
    .await
    .unwrap_err();
    assert_reason(&err, Code::InvalidArgument, "MALFORMED_REQUEST");
    app.stop().await;
}

fn text() -> impl Strategy<Value = String> {
    prop_oneof![
        Just(String::new()),
        "[a-z0-9_-]{1,12}",
        ".{0,40}",
        "[\\x00-\\x1f]{1,4}",
        Just("x".repeat(300)),
        Just(" padded ".to_owned()),
    ]
}

fn status_value() -> impl Strategy<Value = i32> {
    prop_oneof![0..4i32, any::<i32>()]
}

fn thresholds() -> impl Strategy<Value = Option<proto::Thresholds>> {
    let count = prop_oneof![0..12u32, any::<u32>()];
    prop_oneof![
        Just(None),
        Just(Some(proto::Thresholds { mode: None })),
        (count.clone(), count.clone(), count.clone()).prop_map(|(a, b, c)| Some(proto::Thresholds {
            mode: Some(proto::thresholds::Mode::Consecutive(proto::ConsecutiveThresholds {
                healthy_min_success_count: a,
                degraded_min_failure_count: b,
                unhealthy_min_failure_count: c,
            })),
        })),
        (count.clone(), count.clone(), count).prop_map(|(a, b, c)| Some(proto::Thresholds {
            mode: Some(proto::thresholds::Mode::Window(proto::WindowThresholds {
                window_size: a,
                degraded_min_failure_count: b,
                unhealthy_min_failure_count: c,
            })),
        })),
    ]
}

fn timestamp() -> impl Strategy<Value = Option<prost_types::Timestamp>> {
    prop_oneof![
        Just(None),
        (any::<i64>(), any::<i32>()).prop_map(|(seconds, nanos)| Some(prost_types::Timestamp { seconds, nanos })),
        (1_600_000_000i64..1_900_000_000, 0..1_000_000_000i32)
            .prop_map(|(seconds, nanos)| Some(prost_types::Timestamp { seconds, nanos })),
    ]
}

fn duration() -> impl Strategy<Value = Option<prost_types::Duration>> {
    prop_oneof![
        Just(None),
        (any::<i64>(), any::<i32>()).prop_map(|(seconds, nanos)| Some(prost_types::Duration { seconds, nanos })),
    ]
}

#[tokio::test]
async fn random_valid_shaped_messages_never_produce_internal_errors() {
    let db = TestDb::postgres().await;
    let app = TestApp::start(&db, &["--database-lock-timeout-ms", "200"]).await;
    let mut health = app.health_client().await;
    let mut runner = TestRunner::deterministic();
    let submit = (text(), text(), text(), status_value(), timestamp(), duration(), text()).prop_map(
        |(run_id, system_id, check_id, status, observed_at, latency, message)| proto::SubmitRunRequest {
            run_id,
            system_id,
            check_id,
            status,
            observed_at,
            latency,
            message,
        },
    );
    let evaluate = (proptest::collection::vec(status_value(), 0..130), thresholds())
        .prop_map(|(statuses, thresholds)| proto::EvaluateHealthRequest { statuses, thresholds });
    let configure = (text(), text(), thresholds(), proptest::option::of(any::<bool>())).prop_map(
        |(system_id, check_id, thresholds, enabled)| proto::ConfigureCheckRequest {
            system_id,
            check_id,
            thresholds,
            enabled,
            flapping: None,
        },
    );
    let list_runs = (text(), text(), any::<i32>(), text()).prop_map(|(system_id, check_id, page_size, page_token)| {
        proto::ListRunsRequest {
            system_id,
            check_id,
            page_size,
            page_token,
        }
    });
    let list_transitions =
        (text(), any::<i32>(), text()).prop_map(|(system_id, page_size, page_token)| proto::ListTransitionsRequest {
            system_id,
            page_size,
            page_token,
        });
    for round in 0..80 {
        let r = submit.new_tree(&mut runner).unwrap().current();
        let result = health.submit_run(r.clone()).await.map(|_| ());
        assert_not_internal(&format!("{round} {r:?}"), &result);
        let r = evaluate.new_tree(&mut runner).unwrap().current();
        let result = health.evaluate_health(r.clone()).await.map(|_| ());
        assert_not_internal(&format!("{round} {r:?}"), &result);
        let r = configure.new_tree(&mut runner).unwrap().current();
        let result = health.configure_check(r.clone()).await.map(|_| ());
        assert_not_internal(&format!("{round} {r:?}"), &result);
        let r = list_runs.new_tree(&mut runner).unwrap().current();
        let result = health.list_runs(r.clone()).await.map(|_| ());
        assert_not_internal(&format!("{round} {r:?}"), &result);
        let r = list_transitions.new_tree(&mut runner).unwrap().current();
        let result = health.list_transitions(r.clone()).await.map(|_| ());
        assert_not_internal(&format!("{round} {r:?}"), &result);
        let id = text().new_tree(&mut runner).unwrap().current();
        let result = health
            .get_system_health(proto::GetSystemHealthRequest { system_id: id.clone() })
            .await
            .map(|_| ());
        assert_not_internal(&format!("{round} {id:?}"), &result);
        if let Err(status) = &result
            && status.code() == Code::InvalidArgument
        {
            assert!(
                status.get_details_bad_request().is_some(),
                "no field violations: {status:?}"
            );
        }
    }
    assert_eq!(app.serving_status("").await, ServingStatus::Serving);
    app.stop().await;
}
