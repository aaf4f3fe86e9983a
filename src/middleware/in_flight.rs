//! The in-flight limit: at most `VITALS_MAX_CONCURRENT_REQUESTS` business
//! RPCs run at once; past that a new one is refused at once with
//! RESOURCE_EXHAUSTED / OVERLOADED (load shedding) rather than queued, so
//! that overload shows as refusals a client can back off from, not as a
//! queue that hides it until every call times out.
//!
//! An RPC holds its slot until its handler has answered. Streams take no
//! slot: a held or awaited lock and a watch are long-lived and bounded by
//! their own budgets (`VITALS_MAX_LOCKS`, `VITALS_MAX_WATCHERS`); a few
//! thousand of them would otherwise shed every other client's calls. Health
//! and reflection take none either, so they answer under overload.
//!
//! tower's `ConcurrencyLimit` and `LoadShed` do not fit; the module docs of
//! [`crate::middleware`] say why.

use std::{
    future::Future,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll, ready},
};

use http::{Request, Response};
use pin_project_lite::pin_project;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tonic::body::Body;
use tower::{Layer, Service};

use super::{
    Rpc,
    refusal::{Refusable, refuse},
};
use crate::error::Error;

/// A budget of `max_in_flight` slots.
pub fn budget(max_in_flight: u32) -> Arc<Semaphore> {
    let slots = usize::try_from(max_in_flight).unwrap_or(Semaphore::MAX_PERMITS);
    Arc::new(Semaphore::new(slots.min(Semaphore::MAX_PERMITS)))
}

/// Installs [`InFlightLimit`].
#[derive(Debug, Clone)]
pub struct InFlightLimitLayer {
    budget: Arc<Semaphore>,
}

impl InFlightLimitLayer {
    /// The limit drawing on `budget` (see [`budget`]).
    pub fn new(budget: Arc<Semaphore>) -> Self {
        InFlightLimitLayer { budget }
    }
}

impl<S> Layer<S> for InFlightLimitLayer {
    type Service = InFlightLimit<S>;

    fn layer(&self, inner: S) -> Self::Service {
        InFlightLimit {
            inner,
            budget: self.budget.clone(),
        }
    }
}

/// See the module docs.
#[derive(Debug, Clone)]
pub struct InFlightLimit<S> {
    inner: S,
    budget: Arc<Semaphore>,
}

/// Whether an RPC takes a slot.
fn metered(rpc: Rpc) -> bool {
    match rpc {
        Rpc::Unary => true,
        Rpc::Watch | Rpc::WithLock | Rpc::Infrastructure => false,
    }
}

impl<S, B> Service<Request<B>> for InFlightLimit<S>
where
    S: Service<Request<B>, Response = Response<Body>>,
    B: http_body::Body + Send + 'static,
    B::Data: Send,
{
    type Response = Response<Body>;
    type Error = S::Error;
    type Future = Refusable<InFlight<S::Future>, S::Error>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<B>) -> Self::Future {
        let slot = if metered(Rpc::of(&request)) {
            match self.budget.clone().try_acquire_owned() {
                Ok(slot) => Some(slot),
                Err(_) => return refuse(request, Error::Overloaded),
            }
        } else {
            None
        };
        Refusable::Right(InFlight {
            inner: self.inner.call(request),
            slot,
        })
    }
}

pin_project! {
    /// The inner future, holding the RPC's slot until it is ready (or
    /// dropped: a client that goes away frees its slot).
    #[derive(Debug)]
    pub struct InFlight<F> {
        #[pin]
        inner: F,
        slot: Option<OwnedSemaphorePermit>,
    }
}

impl<F: Future> Future for InFlight<F> {
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let output = ready!(this.inner.poll(cx));
        this.slot.take();
        Poll::Ready(output)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use std::convert::Infallible;

    use futures::{FutureExt, future::Pending};
    use tonic::Code;
    use tower::{ServiceExt, service_fn};

    use super::*;
    use crate::middleware::{
        LOCK_STREAM_PATH, WATCH_PATH,
        testing::{self, HEALTH_CHECK, REFLECTION_V1, SUBMIT_RUN},
    };

    type Answer = Result<Response<Body>, Infallible>;

    /// A limit of `slots` over a handler that never answers, so every
    /// admitted call keeps its slot for as long as its future lives.
    fn stuck(
        slots: u32,
    ) -> InFlightLimit<
        impl Service<Request<Body>, Response = Response<Body>, Error = Infallible, Future = Pending<Answer>>,
    > {
        let inner = service_fn(|_: Request<Body>| futures::future::pending::<Answer>());
        InFlightLimitLayer::new(budget(slots)).layer(inner)
    }

    /// Calls `path`; `Some` with the reply if it was refused at once.
    fn call<S>(limit: &mut S, path: &str) -> (S::Future, Option<(Code, Option<String>)>)
    where
        S: Service<Request<Body>, Response = Response<Body>, Error = Infallible>,
        S::Future: Unpin,
    {
        let mut future = limit.call(testing::request(path));
        let refused = (&mut future).now_or_never().map(|r| testing::outcome(&r.unwrap()));
        (future, refused)
    }

    #[tokio::test]
    async fn past_the_limit_business_rpcs_are_refused_at_once_with_overloaded() {
        let mut limit = stuck(2);
        let (first, refused) = call(&mut limit, SUBMIT_RUN);
        assert_eq!(refused, None);
        let (second, refused) = call(&mut limit, "/vitals.v1.HealthCheckService/EvaluateHealth");
        assert_eq!(refused, None);
        for path in [SUBMIT_RUN, "/vitals.v1.LockService/NoSuchMethod"] {
            let (_, refused) = call(&mut limit, path);
            assert_eq!(
                refused,
                Some((Code::ResourceExhausted, Some("OVERLOADED".into()))),
                "{path}"
            );
        }
        // A call that goes away (its client cancelled) frees its slot.
        drop(first);
        let (third, refused) = call(&mut limit, SUBMIT_RUN);
        assert_eq!(refused, None);
        drop((second, third));
    }

    #[tokio::test]
    async fn streams_health_and_reflection_take_no_slot_and_pass_when_the_limit_is_reached() {
        let mut limit = stuck(1);
        let (_held, refused) = call(&mut limit, SUBMIT_RUN);
        assert_eq!(refused, None);
        let mut passed = Vec::new();
        for path in [LOCK_STREAM_PATH, WATCH_PATH, HEALTH_CHECK, REFLECTION_V1] {
            for _ in 0..3 {
                let (future, refused) = call(&mut limit, path);
                assert_eq!(refused, None, "{path}");
                passed.push(future);
            }
        }
        assert_eq!(call(&mut limit, SUBMIT_RUN).1.unwrap().0, Code::ResourceExhausted);
    }

    #[tokio::test]
    async fn an_answered_rpc_frees_its_slot() {
        let (inner, calls) = testing::answering();
        let mut limit = InFlightLimitLayer::new(budget(1)).layer(inner);
        for _ in 0..3 {
            let response = limit
                .ready()
                .await
                .unwrap()
                .call(testing::request(SUBMIT_RUN))
                .await
                .unwrap();
            assert_eq!(testing::outcome(&response), (Code::Ok, None));
        }
        assert_eq!(calls.load(std::sync::atomic::Ordering::SeqCst), 3);
    }
}
