//! The `/metrics` endpoint: `GET /metrics` on `VITALS_METRICS_ADDR`, in the
//! Prometheus text format, over HTTP/1.1 (what Prometheus scrapes with).
//!
//! A listener of its own rather than a route of the gRPC server: the gRPC
//! port speaks HTTP/2 only, and a scrape must work while the edge refuses
//! business RPCs (overload, readiness, shutdown drain). It is bound in
//! [`crate::Application::build`] like the gRPC port, so port 0 works and the
//! bound address is known (and logged) before serving.

use std::{convert::Infallible, net::SocketAddr, sync::Arc};

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::Full;
use hyper::{body::Incoming, service::service_fn};
use hyper_util::rt::TokioIo;
use tokio::{net::TcpListener, sync::watch, task::JoinSet};

/// What a scrape answers: the whole exposition, rendered at the scrape.
pub type Render = Arc<dyn Fn() -> String + Send + Sync>;

/// The exposition format's content type (text format 0.0.4).
const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Serves `render` at `GET /metrics` on `listener` until `stop` turns true;
/// then stops accepting and ends the open connections.
pub async fn serve(listener: TcpListener, render: Render, mut stop: watch::Receiver<bool>) {
    let mut connections = JoinSet::new();
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            _ = stop.wait_for(|stop| *stop) => break,
        };
        // Finished connections leave the set as new ones arrive.
        while connections.try_join_next().is_some() {}
        let (stream, peer) = match accepted {
            Ok(accepted) => accepted,
            Err(err) => {
                // Out of file descriptors, say: the next accept may work.
                tracing::debug!(error = %err, "metrics endpoint: accept failed");
                continue;
            }
        };
        // A scrape is one request and one reply: without NODELAY the reply's
        // last segment waits for the scraper's delayed ACK.
        let _ = stream.set_nodelay(true);
        let render = render.clone();
        connections.spawn(async move {
            let service = service_fn(move |request: Request<Incoming>| {
                let render = render.clone();
                async move { Ok::<_, Infallible>(answer(&request, &render)) }
            });
            if let Err(err) = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await
            {
                tracing::debug!(error = %err, %peer, "metrics endpoint: connection ended");
            }
        });
    }
    connections.shutdown().await;
}

/// The reply to one request.
fn answer<B>(request: &Request<B>, render: &Render) -> Response<Full<Bytes>> {
    let reply = |status: StatusCode, content_type: &'static str, body: Bytes| {
        let mut response = Response::new(Full::new(body));
        *response.status_mut() = status;
        response
            .headers_mut()
            .insert(header::CONTENT_TYPE, http::HeaderValue::from_static(content_type));
        response
    };
    match (request.method(), request.uri().path()) {
        (&Method::GET | &Method::HEAD, "/metrics") => reply(StatusCode::OK, CONTENT_TYPE, Bytes::from(render())),
        (_, "/metrics") => reply(
            StatusCode::METHOD_NOT_ALLOWED,
            "text/plain; charset=utf-8",
            Bytes::from_static(b"GET /metrics\n"),
        ),
        _ => reply(
            StatusCode::NOT_FOUND,
            "text/plain; charset=utf-8",
            Bytes::from_static(b"vitals serves GET /metrics here\n"),
        ),
    }
}

/// Binds `addr` for the endpoint.
pub async fn bind(addr: SocketAddr) -> std::io::Result<(TcpListener, SocketAddr)> {
    let listener = TcpListener::bind(addr).await?;
    let bound = listener.local_addr()?;
    Ok((listener, bound))
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    fn request(method: Method, path: &str) -> Request<()> {
        Request::builder().method(method).uri(path).body(()).unwrap()
    }

    #[test]
    fn only_get_metrics_is_answered_with_the_exposition() {
        let render: Render = Arc::new(|| "# HELP x_total X.\n".to_owned());
        let ok = answer(&request(Method::GET, "/metrics"), &render);
        assert_eq!(ok.status(), StatusCode::OK);
        assert_eq!(ok.headers()[header::CONTENT_TYPE], CONTENT_TYPE);
        assert_eq!(
            answer(&request(Method::POST, "/metrics"), &render).status(),
            StatusCode::METHOD_NOT_ALLOWED
        );
        assert_eq!(
            answer(&request(Method::GET, "/"), &render).status(),
            StatusCode::NOT_FOUND
        );
    }
}
