//! Traces: the vitals binary, run as deployed with `OTEL_EXPORTER_OTLP_ENDPOINT`
//! set, exports its spans to an OTLP/gRPC collector running in the test (the
//! trace service of opentelemetry-proto on tonic). A request carrying a W3C
//! `traceparent` yields the RPC's server span in that trace, under the
//! client's span, with its lock wait and work transaction beneath it; the
//! JSON log lines of the request carry the RPC span's ids.
//!
//! A process of its own, because a tracing subscriber is global: this one
//! must be vitals' own, installed by its `main`.

use std::{
    net::SocketAddr,
    process::Stdio,
    sync::{Arc, Mutex},
};

use opentelemetry_proto::tonic::{
    collector::trace::v1::{
        ExportTraceServiceRequest, ExportTraceServiceResponse,
        trace_service_server::{TraceService, TraceServiceServer},
    },
    trace::v1::{Span, span::SpanKind},
};
use tokio::io::AsyncBufReadExt;
use tonic::{Request, Response, Status, transport::Server};
use tonic_health::pb::{HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient};
use vitals::proto::{self, health_check_service_client::HealthCheckServiceClient};

use crate::harness::{Backend, PATIENCE, TestDb, eventually};

/// What the collector received.
#[derive(Clone, Default)]
struct Received(Arc<Mutex<Vec<Span>>>);

#[tonic::async_trait]
impl TraceService for Received {
    async fn export(
        &self,
        request: Request<ExportTraceServiceRequest>,
    ) -> Result<Response<ExportTraceServiceResponse>, Status> {
        let spans = request
            .into_inner()
            .resource_spans
            .into_iter()
            .flat_map(|r| r.scope_spans)
            .flat_map(|s| s.spans);
        self.0.lock().unwrap().extend(spans);
        Ok(Response::new(ExportTraceServiceResponse::default()))
    }
}

impl Received {
    fn spans(&self) -> Vec<Span> {
        self.0.lock().unwrap().clone()
    }
}

/// An OTLP/gRPC collector on a free loopback port.
async fn collector() -> (SocketAddr, Received) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let received = Received::default();
    let service = TraceServiceServer::new(received.clone());
    tokio::spawn(
        Server::builder()
            .tcp_nodelay(true)
            .add_service(service)
            .serve_with_incoming(tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true))),
    );
    (addr, received)
}

/// The vitals binary, exporting to `collector`, its log lines (JSON) kept.
struct Vitals {
    _child: tokio::process::Child,
    lines: Arc<Mutex<Vec<serde_json::Value>>>,
}

impl Vitals {
    async fn start(db: &TestDb, collector: SocketAddr) -> (Vitals, SocketAddr) {
        let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_vitals"))
            .args(["--listen-addr", "127.0.0.1:0", "--metrics-addr", ""])
            .args([
                "--database-url",
                &db.url,
                "--readiness-interval-ms",
                "100",
                "--log-format",
                "json",
            ])
            .env("OTEL_EXPORTER_OTLP_ENDPOINT", format!("http://{collector}"))
            // Batches leave every 100 ms instead of every 5 s.
            .env("OTEL_BSP_SCHEDULE_DELAY", "100")
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("start the vitals binary");
        let lines = Arc::new(Mutex::new(Vec::new()));
        let mut stderr = tokio::io::BufReader::new(child.stderr.take().expect("vitals' stderr")).lines();
        let kept = lines.clone();
        tokio::spawn(async move {
            while let Ok(Some(line)) = stderr.next_line().await {
                let parsed = serde_json::from_str(&line).unwrap_or_else(|_| serde_json::Value::String(line.clone()));
                kept.lock().unwrap().push(parsed);
            }
        });
        let vitals = Vitals { _child: child, lines };
        let addr = eventually(PATIENCE, "vitals logs its address", async || {
            vitals
                .line(|l| l["message"] == "vitals listening")
                .and_then(|l| l["addr"].as_str().and_then(|a| a.parse().ok()))
                .ok_or_else(|| format!("its log so far: {:?}", vitals.lines.lock().unwrap()))
        })
        .await;
        (vitals, addr)
    }

    /// The first log line `matches` accepts.
    fn line(&self, matches: impl Fn(&serde_json::Value) -> bool) -> Option<serde_json::Value> {
        self.lines.lock().unwrap().iter().find(|l| matches(l)).cloned()
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

const TRACE_ID: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const CLIENT_SPAN_ID: &str = "00f067aa0ba902b7";

both_backends!(a_client_traceparent_continues_into_the_rpc_span_and_its_lock_and_transaction);

async fn a_client_traceparent_continues_into_the_rpc_span_and_its_lock_and_transaction(backend: Backend) {
    let db = TestDb::create(backend).await;
    let (collector, received) = collector().await;
    let (vitals, addr) = Vitals::start(&db, collector).await;
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .unwrap()
        .tcp_nodelay(true)
        .connect()
        .await
        .expect("connect to vitals");
    eventually(PATIENCE, "vitals serves", async || {
        match HealthClient::new(channel.clone())
            .check(HealthCheckRequest::default())
            .await
        {
            Ok(reply) if reply.get_ref().status() == ServingStatus::Serving => Ok(()),
            other => Err(format!("{other:?}")),
        }
    })
    .await;

    // The second failure changes the system's status, which vitals logs
    // inside the RPC's span.
    let mut client = HealthCheckServiceClient::new(channel);
    for run_id in ["traced-1", "traced-2"] {
        let mut request = Request::new(proto::SubmitRunRequest {
            run_id: run_id.into(),
            system_id: "checkout".into(),
            check_id: "http".into(),
            status: proto::HealthStatus::Unhealthy as i32,
            ..Default::default()
        });
        request.metadata_mut().insert(
            "traceparent",
            format!("00-{TRACE_ID}-{CLIENT_SPAN_ID}-01").parse().unwrap(),
        );
        client.submit_run(request).await.expect("the run is stored");
    }

    let rpc = eventually(PATIENCE, "both SubmitRun spans are exported", async || {
        let rpcs: Vec<Span> = received
            .spans()
            .into_iter()
            .filter(|s| s.name == "vitals.v1.HealthCheckService/SubmitRun")
            .collect();
        if rpcs.len() == 2 {
            Ok(rpcs)
        } else {
            Err(format!("{} exported so far", rpcs.len()))
        }
    })
    .await;
    for span in &rpc {
        assert_eq!(hex(&span.trace_id), TRACE_ID, "the client's trace continues");
        assert_eq!(hex(&span.parent_span_id), CLIENT_SPAN_ID, "under the client's span");
        assert_eq!(span.kind, SpanKind::Server as i32);
    }
    let children = |rpc: &Span, name: &str| {
        received
            .spans()
            .into_iter()
            .filter(|s| s.name == name && s.parent_span_id == rpc.span_id && s.trace_id == rpc.trace_id)
            .count()
    };
    let second = &rpc[1];
    eventually(
        PATIENCE,
        "the lock wait and the transaction are the RPC's children",
        async || {
            let (waits, transactions) = (children(second, "lock wait"), children(second, "work transaction"));
            if (waits, transactions) == (1, 1) {
                Ok(())
            } else {
                Err(format!("{waits} lock waits, {transactions} work transactions"))
            }
        },
    )
    .await;
    // Beneath the transaction, a span per class of statement of the write.
    let transaction = received
        .spans()
        .into_iter()
        .find(|s| s.name == "work transaction" && s.parent_span_id == second.span_id)
        .expect("the work transaction's span");
    eventually(PATIENCE, "the statements are the transaction's children", async || {
        let classes: Vec<usize> = ["load", "write", "commit"]
            .into_iter()
            .map(|class| children(&transaction, class))
            .collect();
        if classes == [1, 1, 1] {
            Ok(())
        } else {
            Err(format!("load, write, commit spans: {classes:?}"))
        }
    })
    .await;

    // The log line of the status change names the RPC span's ids.
    let changed = vitals
        .line(|l| l["message"] == "system status changed")
        .expect("the status change is logged");
    let ids = (&changed["span"]["trace_id"], &changed["span"]["span_id"]);
    let exported = rpc
        .iter()
        .map(|s| (hex(&s.trace_id), hex(&s.span_id)))
        .collect::<Vec<_>>();
    assert!(
        exported
            .iter()
            .any(|(t, s)| ids.0.as_str() == Some(t) && ids.1.as_str() == Some(s)),
        "{changed} names none of the exported RPC spans {exported:?}"
    );
}
