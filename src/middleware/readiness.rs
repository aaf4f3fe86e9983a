//! The readiness gate: business RPCs are refused at once while the database
//! is unreachable (UNAVAILABLE / DATABASE_UNAVAILABLE) or the server drains
//! (UNAVAILABLE / SHUTTING_DOWN).
//!
//! Without it a request would take a slot, wait for a connection that cannot
//! come and fail only at its deadline. grpc.health.v1 and reflection pass:
//! health is how a client learns that the database is back.

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    task::{Context, Poll},
};

use http::{Request, Response};
use tonic::body::Body;
use tower::{Layer, Service};

use super::{
    Rpc,
    refusal::{Refusable, refuse},
};
use crate::error::Error;

/// Whether business RPCs are admitted: the readiness probe's verdict on the
/// database, and whether shutdown has begun.
#[derive(Debug, Default)]
pub struct Readiness {
    ready: AtomicBool,
    draining: AtomicBool,
}

impl Readiness {
    /// Not ready until the probe says the database answers.
    pub fn new() -> Arc<Self> {
        Arc::new(Readiness::default())
    }

    /// Records whether the database answers.
    pub fn set_ready(&self, ready: bool) {
        self.ready.store(ready, Ordering::SeqCst);
    }

    /// Whether the database answered the last probe.
    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::SeqCst)
    }

    /// From now on business RPCs are refused with SHUTTING_DOWN.
    pub fn start_draining(&self) {
        self.draining.store(true, Ordering::SeqCst);
    }

    /// Why a business RPC is refused now, if it is.
    fn refusal(&self) -> Option<Error> {
        if self.draining.load(Ordering::SeqCst) {
            Some(Error::ShuttingDown)
        } else if !self.is_ready() {
            Some(Error::DatabaseUnavailable(None))
        } else {
            None
        }
    }
}

/// Installs [`ReadinessGate`].
#[derive(Debug, Clone)]
pub struct ReadinessLayer {
    readiness: Arc<Readiness>,
}

impl ReadinessLayer {
    /// The gate over `readiness`.
    pub fn new(readiness: Arc<Readiness>) -> Self {
        ReadinessLayer { readiness }
    }
}

impl<S> Layer<S> for ReadinessLayer {
    type Service = ReadinessGate<S>;

    fn layer(&self, inner: S) -> Self::Service {
        ReadinessGate {
            inner,
            readiness: self.readiness.clone(),
        }
    }
}

/// See the module docs.
#[derive(Debug, Clone)]
pub struct ReadinessGate<S> {
    inner: S,
    readiness: Arc<Readiness>,
}

impl<S, B> Service<Request<B>> for ReadinessGate<S>
where
    S: Service<Request<B>, Response = Response<Body>>,
    B: http_body::Body + Send + 'static,
    B::Data: Send,
{
    type Response = Response<Body>;
    type Error = S::Error;
    type Future = Refusable<S::Future, S::Error>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<B>) -> Self::Future {
        if Rpc::of(&request) != Rpc::Infrastructure
            && let Some(why) = self.readiness.refusal()
        {
            return refuse(request, why);
        }
        Refusable::Right(self.inner.call(request))
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use std::sync::atomic::Ordering;

    use tonic::Code;
    use tower::ServiceExt;

    use super::*;
    use crate::middleware::{
        LOCK_STREAM_PATH, WATCH_PATH,
        testing::{self, HEALTH_CHECK, REFLECTION_V1, REFLECTION_V1ALPHA, SUBMIT_RUN},
    };

    const BUSINESS: [&str; 3] = [SUBMIT_RUN, LOCK_STREAM_PATH, WATCH_PATH];
    const INFRASTRUCTURE: [&str; 3] = [HEALTH_CHECK, REFLECTION_V1, REFLECTION_V1ALPHA];

    async fn outcome(readiness: &Arc<Readiness>, path: &str) -> (Code, Option<String>, usize) {
        let (inner, calls) = testing::answering();
        let gate = ReadinessLayer::new(readiness.clone()).layer(inner);
        let response = gate.oneshot(testing::request(path)).await.unwrap();
        let (code, reason) = testing::outcome(&response);
        (code, reason, calls.load(Ordering::SeqCst))
    }

    #[tokio::test]
    async fn business_rpcs_are_refused_until_the_database_answers_and_pass_once_it_does() {
        let readiness = Readiness::new();
        for path in BUSINESS {
            assert_eq!(
                outcome(&readiness, path).await,
                (Code::Unavailable, Some("DATABASE_UNAVAILABLE".into()), 0),
                "{path}"
            );
        }
        readiness.set_ready(true);
        for path in BUSINESS {
            assert_eq!(outcome(&readiness, path).await, (Code::Ok, None, 1), "{path}");
        }
        readiness.set_ready(false);
        assert_eq!(outcome(&readiness, SUBMIT_RUN).await.0, Code::Unavailable);
    }

    #[tokio::test]
    async fn while_draining_business_rpcs_are_refused_with_shutting_down_even_with_the_database_up() {
        let readiness = Readiness::new();
        readiness.set_ready(true);
        readiness.start_draining();
        for path in BUSINESS {
            assert_eq!(
                outcome(&readiness, path).await,
                (Code::Unavailable, Some("SHUTTING_DOWN".into()), 0),
                "{path}"
            );
        }
        readiness.set_ready(false);
        assert_eq!(
            outcome(&readiness, SUBMIT_RUN).await.1.as_deref(),
            Some("SHUTTING_DOWN")
        );
    }

    #[tokio::test]
    async fn health_and_reflection_pass_while_the_database_is_down_and_while_draining() {
        let readiness = Readiness::new();
        for path in INFRASTRUCTURE {
            assert_eq!(outcome(&readiness, path).await, (Code::Ok, None, 1), "{path}");
        }
        readiness.start_draining();
        for path in INFRASTRUCTURE {
            assert_eq!(outcome(&readiness, path).await, (Code::Ok, None, 1), "{path}");
        }
    }
}
