//! The edge's explicit limits under floods: connections per replica,
//! streams per connection, the header block. Each test shows the limit
//! holding and the clients within it served all along.

use tonic::{Code, Request, transport::Channel};
use vitals::proto::{self, health_check_service_client::HealthCheckServiceClient};

use crate::{
    harness::{PATIENCE, TestApp, TestDb, eventually, plaintext_endpoint},
    withlock::lock,
};

fn evaluate() -> proto::EvaluateHealthRequest {
    proto::EvaluateHealthRequest {
        statuses: vec![proto::HealthStatus::Degraded as i32],
        ..Default::default()
    }
}

async fn served(channel: &Channel) -> Result<(), String> {
    HealthCheckServiceClient::new(channel.clone())
        .evaluate_health(evaluate())
        .await
        .map(drop)
        .map_err(|s| format!("{s:?}"))
}

/// A new connection, and whether a call on it is served.
async fn new_connection(app: &TestApp) -> Result<Channel, String> {
    let channel = plaintext_endpoint(app.addr)
        .connect()
        .await
        .map_err(|e| format!("connect: {e:?}"))?;
    served(&channel).await?;
    Ok(channel)
}

#[tokio::test]
async fn past_vitals_max_connections_a_new_connection_is_closed_and_the_open_ones_are_served() {
    let db = TestDb::embedded();
    let app = TestApp::start(&db, &["--max-connections", "2"]).await;
    // The harness's own connection (its wait for SERVING) may still be
    // closing: each place is taken once it is free.
    let first = eventually(PATIENCE, "a first connection is served", async || {
        new_connection(&app).await
    })
    .await;
    let second = eventually(PATIENCE, "a second connection is served", async || {
        new_connection(&app).await
    })
    .await;

    for attempt in 0..20 {
        let refused = new_connection(&app).await;
        assert!(refused.is_err(), "connection {} past the limit was served", attempt + 3);
    }
    served(&first).await.unwrap();
    served(&second).await.unwrap();

    drop(first);
    eventually(
        PATIENCE,
        "a closed connection's place is taken by a new one",
        async || new_connection(&app).await,
    )
    .await;
    served(&second).await.unwrap();
    app.stop().await;
}

#[tokio::test]
async fn past_the_streams_per_connection_a_call_waits_while_other_connections_are_served() {
    let db = TestDb::embedded();
    let app = TestApp::start(&db, &["--max-streams-per-connection", "2"]).await;
    let mut crowded = app.lock_client().await;
    let mut first = lock(&mut crowded, "streams-1", None).await.unwrap();
    let _second = lock(&mut crowded, "streams-2", None).await.unwrap();
    let budget = app.lock_budget_available();

    // A third stream on the same connection is not opened by the server:
    // its acquire waits in the client, and no lock place is taken for it.
    let mut queued_client = crowded.clone();
    let third = tokio::spawn(async move { lock(&mut queued_client, "streams-3", None).await.map(|held| held.key) });
    // Another connection is served meanwhile, a lock stream included.
    let mut other = app.lock_client().await;
    let elsewhere = lock(&mut other, "streams-elsewhere", None).await.unwrap();
    assert_eq!(
        app.lock_budget_available(),
        budget - 1,
        "only the other connection's stream opened"
    );
    assert!(
        !third.is_finished(),
        "the third stream waits for a place on its connection"
    );

    // A stream of the crowded connection ends: the third one is opened.
    first.stream.send(crate::withlock::release()).await;
    assert!(matches!(first.stream.next().await, Ok(Some(_))));
    let key = tokio::time::timeout(PATIENCE, third).await.unwrap().unwrap().unwrap();
    assert_eq!(key, "streams-3");
    elsewhere.release().await;
    app.stop().await;
}

#[tokio::test]
async fn a_header_block_over_16_kib_is_refused_and_the_connection_and_others_are_served() {
    let db = TestDb::embedded();
    let app = TestApp::start(&db, &[]).await;
    let channel = app.channel().await;
    let mut client = HealthCheckServiceClient::new(channel.clone());
    served(&channel).await.unwrap();
    let mut flood = Request::new(evaluate());
    flood
        .metadata_mut()
        .insert("x-padding", "a".repeat(20 * 1024).parse().unwrap());
    let refused = client.evaluate_health(flood).await.unwrap_err();
    // HTTP/2 refuses the header block before any gRPC code runs: hyper
    // answers HTTP 431, which gRPC clients map to UNKNOWN naming the 431.
    assert_eq!(refused.code(), Code::Unknown, "{refused:?}");
    assert!(refused.message().contains("431"), "{refused:?}");

    let mut within = Request::new(evaluate());
    within
        .metadata_mut()
        .insert("x-padding", "a".repeat(8 * 1024).parse().unwrap());
    // The refused request's channel goes on (reconnecting if the server
    // ended its connection), and a new connection is served at once.
    eventually(PATIENCE, "the refused request's channel is served again", async || {
        served(&channel).await
    })
    .await;
    HealthCheckServiceClient::new(app.channel().await)
        .evaluate_health(within)
        .await
        .expect("8 KiB of metadata is within the limit");
    app.stop().await;
}

/// HTTP/2's "rapid reset" flood: a client opens streams and resets each at
/// once, so the server starts work for each and the client pays nothing.
/// Past 20 streams reset before the server accepted them, the connection is
/// ended with GOAWAY ENHANCE_YOUR_CALM; other connections are served.
#[tokio::test]
async fn a_rapid_reset_flood_ends_its_connection_and_other_clients_are_served() {
    use crate::raw_h2::{END_HEADERS, GOAWAY, HEADERS, RST_STREAM, RawH2, frame, grpc_header_block};
    const ENHANCE_YOUR_CALM: u32 = 0xb;
    const CANCEL: u32 = 0x8;

    let db = TestDb::embedded();
    let app = TestApp::start(&db, &[]).await;
    let bystander = app.channel().await;
    let mut conn = RawH2::connect(app.addr).await;
    let block = grpc_header_block("/grpc.health.v1.Health/Check");
    // 1,000 opened and reset streams in one burst, repeated until the
    // server says something (a bound on the flood, not a wait).
    let mut burst = Vec::new();
    let mut next_stream = 1_u32;
    let mut answer = None;
    for _ in 0..20 {
        burst.clear();
        for _ in 0..1_000 {
            burst.extend(frame(HEADERS, END_HEADERS, next_stream, &block));
            burst.extend(frame(RST_STREAM, 0, next_stream, &CANCEL.to_be_bytes()));
            next_stream += 2;
        }
        if !conn.send_burst(&burst).await {
            break;
        }
        served(&bystander)
            .await
            .expect("another connection is served during the flood");
        // Whatever the server sent meanwhile: a GOAWAY ends the flood.
        if let Ok(Some(frame)) = tokio::time::timeout(std::time::Duration::from_millis(200), async {
            loop {
                match conn.next_frame().await {
                    Some(frame) if frame.kind == GOAWAY => return Some(frame),
                    Some(_) => {}
                    None => return None,
                }
            }
        })
        .await
        {
            answer = Some(frame);
            break;
        }
    }
    let goaway = answer.expect("the server ended the flooding connection with GOAWAY");
    assert_eq!(goaway.error_code(), Some(ENHANCE_YOUR_CALM), "{goaway:?}");
    served(&bystander).await.unwrap();
    served(&app.channel().await).await.unwrap();
    app.stop().await;
}

/// Streams the server must refuse (past `VITALS_MAX_STREAMS_PER_CONNECTION`)
/// cost it work each; past 1024 such resets on one connection the
/// connection is ended with GOAWAY ENHANCE_YOUR_CALM. (tonic would otherwise
/// pass hyper no limit, which means none.)
#[tokio::test]
async fn a_flood_of_refused_streams_ends_its_connection_and_other_clients_are_served() {
    use crate::raw_h2::{DATA, END_HEADERS, END_STREAM, GOAWAY, HEADERS, RawH2, frame, grpc_header_block};
    const ENHANCE_YOUR_CALM: u32 = 0xb;

    let db = TestDb::embedded();
    let app = TestApp::start(&db, &["--max-streams-per-connection", "1"]).await;
    let bystander = app.channel().await;
    let mut conn = RawH2::connect(app.addr).await;
    // The one stream allowed: a health watch that stays open. Its first
    // reply also shows the settings were exchanged.
    conn.grpc_headers(1, "/grpc.health.v1.Health/Watch").await;
    conn.grpc_message(1, &[], true).await;
    loop {
        let frame = conn.next_frame().await.expect("the watch is answered");
        if frame.kind == DATA && frame.stream == 1 {
            break;
        }
    }
    let block = grpc_header_block("/grpc.health.v1.Health/Check");
    let mut next_stream = 3_u32;
    let mut answer = None;
    for _ in 0..10 {
        let mut burst = Vec::new();
        for _ in 0..300 {
            burst.extend(frame(HEADERS, END_HEADERS | END_STREAM, next_stream, &block));
            next_stream += 2;
        }
        if !conn.send_burst(&burst).await {
            break;
        }
        served(&bystander)
            .await
            .expect("another connection is served during the flood");
        let goaway = tokio::time::timeout(std::time::Duration::from_millis(200), async {
            while let Some(frame) = conn.next_frame().await {
                if frame.kind == GOAWAY {
                    return Some(frame);
                }
            }
            None
        })
        .await;
        if let Ok(Some(frame)) = goaway {
            answer = Some((frame, (next_stream - 3) / 2));
            break;
        }
    }
    let (goaway, sent) = answer.expect("the server ended the flooding connection with GOAWAY");
    assert_eq!(goaway.error_code(), Some(ENHANCE_YOUR_CALM), "{goaway:?}");
    assert!(sent > 1024, "not before 1024 refused streams: {sent}");
    served(&bystander).await.unwrap();
    app.stop().await;
}
