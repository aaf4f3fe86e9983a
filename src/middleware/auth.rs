//! Authentication and scopes: with `VITALS_AUTH_FILE` set, every business
//! RPC must name a principal, by a bearer token (`authorization: Bearer
//! <token>`) or by a SAN of its verified client certificate, and that
//! principal must hold the RPC's scope.
//!
//! No or unknown credentials: UNAUTHENTICATED / UNAUTHENTICATED. A scope the
//! principal lacks: PERMISSION_DENIED / PERMISSION_DENIED with the scope in
//! the ErrorInfo metadata. A token that is sent is the credential, even on
//! a connection with a client certificate: a wrong token is refused rather
//! than silently replaced by the certificate's principal.
//!
//! What the principal may touch (its systems and lock keys) is in the
//! request's body, which this layer does not read: it hands the handlers an
//! [`Access`] in the request's extensions, and they check each system and
//! key ([`Access::check_system`], [`Access::check_lock_key`]) and filter what
//! they list. Without an auth file every request gets [`Access::Open`].
//!
//! grpc.health.v1 passes (probes have no credentials), and so does
//! reflection unless `VITALS_AUTH_REFLECTION=required`.

use std::{
    sync::{Arc, RwLock},
    task::{Context, Poll},
};

use http::{Request, Response, header::AUTHORIZATION};
use tonic::body::Body;
use tower::{Layer, Service};

use super::refusal::{Refusable, refuse};
use crate::{
    auth::{Access, Principal, Principals, Scope},
    error::{Denied, Error, Missing},
    listener::ConnInfo,
};

/// The principals requests are checked against, replaced whole when the
/// auth file is reloaded.
#[derive(Debug)]
pub struct Authenticator {
    principals: RwLock<Arc<Principals>>,
    /// `VITALS_AUTH_REFLECTION=required`.
    reflection_required: bool,
}

impl Authenticator {
    /// Checks against `principals`.
    pub fn new(principals: Principals, reflection_required: bool) -> Arc<Authenticator> {
        Arc::new(Authenticator {
            principals: RwLock::new(Arc::new(principals)),
            reflection_required,
        })
    }

    /// From now on requests are checked against `principals`.
    pub fn replace(&self, principals: Principals) {
        let principals = Arc::new(principals);
        match self.principals.write() {
            Ok(mut current) => *current = principals,
            Err(poisoned) => *poisoned.into_inner() = principals,
        }
    }

    fn current(&self) -> Arc<Principals> {
        match self.principals.read() {
            Ok(current) => current.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    /// The principal `request`'s credentials name, if any.
    fn principal<B>(&self, request: &Request<B>) -> Option<Arc<Principal>> {
        let principals = self.current();
        if let Some(header) = request.headers().get(AUTHORIZATION) {
            return bearer_token(header.as_bytes()).and_then(|token| principals.by_token(token));
        }
        let peer = request.extensions().get::<ConnInfo>()?.peer.as_ref()?;
        principals.by_san(peer.sans.iter().map(String::as_str))
    }
}

/// The token of an `authorization: Bearer <token>` value (the scheme is
/// case-insensitive, as in RFC 6750).
fn bearer_token(value: &[u8]) -> Option<&[u8]> {
    let (scheme, token) = value.split_at_checked(7)?;
    (scheme.eq_ignore_ascii_case(b"bearer ") && !token.is_empty()).then_some(token)
}

/// What a path needs from its caller.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Needs {
    /// Nothing (grpc.health.v1; reflection when open).
    Nothing,
    /// A principal, whatever its scopes (reflection when required; an
    /// unknown method of ours, which tonic answers UNIMPLEMENTED).
    Principal,
    /// A principal with this scope.
    Scope(Scope),
}

const REFLECTION_PREFIXES: [&str; 2] = [
    "/grpc.reflection.v1.ServerReflection/",
    "/grpc.reflection.v1alpha.ServerReflection/",
];

fn needs(path: &str, reflection_required: bool) -> Needs {
    let Some(method) = path.strip_prefix(super::BUSINESS_PREFIX) else {
        let reflection = REFLECTION_PREFIXES.iter().any(|p| path.starts_with(p));
        return if reflection && reflection_required {
            Needs::Principal
        } else {
            Needs::Nothing
        };
    };
    match method {
        "HealthCheckService/EvaluateHealth"
        | "HealthCheckService/GetSystemHealth"
        | "HealthCheckService/ListRuns"
        | "HealthCheckService/ListTransitions"
        | "HealthCheckService/WatchTransitions"
        | "HealthCheckService/ListSystems"
        | "HealthCheckService/GetUptime" => Needs::Scope(Scope::HealthRead),
        "HealthCheckService/SubmitRun" => Needs::Scope(Scope::HealthWrite),
        "HealthCheckService/ConfigureCheck"
        | "HealthCheckService/DeleteCheck"
        | "HealthCheckService/DeleteSystem"
        | "HealthCheckService/SetMaintenance"
        | "HealthCheckService/ClearMaintenance"
        | "HealthCheckService/ConfigureSystem" => Needs::Scope(Scope::HealthAdmin),
        "LockService/WithLock"
        | "LockService/ListLocks"
        | "LockService/GetLock"
        | "LockService/Campaign"
        | "LockService/ObserveLeader" => Needs::Scope(Scope::Locks),
        _ => Needs::Principal,
    }
}

/// Installs [`AuthGate`].
#[derive(Debug, Clone)]
pub struct AuthLayer {
    /// `None`: authentication is off.
    authenticator: Option<Arc<Authenticator>>,
}

impl AuthLayer {
    /// The gate checking against `authenticator`; `None` lets everything
    /// through with [`Access::Open`].
    pub fn new(authenticator: Option<Arc<Authenticator>>) -> Self {
        AuthLayer { authenticator }
    }
}

impl<S> Layer<S> for AuthLayer {
    type Service = AuthGate<S>;

    fn layer(&self, inner: S) -> Self::Service {
        AuthGate {
            inner,
            authenticator: self.authenticator.clone(),
        }
    }
}

/// See the module docs.
#[derive(Debug, Clone)]
pub struct AuthGate<S> {
    inner: S,
    authenticator: Option<Arc<Authenticator>>,
}

impl<S, B> Service<Request<B>> for AuthGate<S>
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

    fn call(&mut self, mut request: Request<B>) -> Self::Future {
        let Some(authenticator) = &self.authenticator else {
            request.extensions_mut().insert(Access::Open);
            return Refusable::Right(self.inner.call(request));
        };
        let needs = needs(request.uri().path(), authenticator.reflection_required);
        if needs == Needs::Nothing {
            return Refusable::Right(self.inner.call(request));
        }
        let Some(principal) = authenticator.principal(&request) else {
            return refuse(request, Error::Unauthenticated);
        };
        tracing::Span::current().record("principal", principal.name.as_str());
        if let Needs::Scope(scope) = needs
            && !principal.has(scope)
        {
            let denied = Denied {
                principal: principal.name.clone(),
                missing: Missing::Scope(scope.as_str()),
            };
            return refuse(request, Error::PermissionDenied(denied));
        }
        request.extensions_mut().insert(Access::Principal(principal));
        Refusable::Right(self.inner.call(request))
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use std::sync::atomic::Ordering;

    use sha2::{Digest, Sha256};
    use tonic::Code;
    use tower::ServiceExt;

    use super::*;
    use crate::{
        auth::PeerIdentity,
        middleware::testing::{self, HEALTH_CHECK, REFLECTION_V1, REFLECTION_V1ALPHA, SUBMIT_RUN},
        proto::{health_check_service_server, lock_service_server},
    };

    fn principals() -> Principals {
        let file = format!(
            r#"
            [[principal]]
            name = "reader"
            token_sha256 = "{}"
            scopes = ["health.read"]

            [[principal]]
            name = "writer"
            client_cert_san = "spiffe://test/writer"
            scopes = ["health.write"]
            "#,
            hex::encode(Sha256::digest(b"reader-token"))
        );
        Principals::parse(&file).unwrap()
    }

    fn with_token(path: &str, value: &str) -> Request<Body> {
        let mut request = testing::request(path);
        request
            .headers_mut()
            .insert(AUTHORIZATION, http::HeaderValue::from_str(value).unwrap());
        request
    }

    fn with_san(path: &str, san: &str) -> Request<Body> {
        let mut request = testing::request(path);
        request.extensions_mut().insert(ConnInfo {
            remote_addr: None,
            peer: Some(PeerIdentity {
                sans: vec!["localhost".to_owned(), san.to_owned()].into(),
            }),
        });
        request
    }

    async fn outcome(reflection_required: bool, request: Request<Body>) -> (Code, Option<String>, usize) {
        let (inner, calls) = testing::answering();
        let gate = AuthLayer::new(Some(Authenticator::new(principals(), reflection_required))).layer(inner);
        let response = gate.oneshot(request).await.unwrap();
        let (code, reason) = testing::outcome(&response);
        (code, reason, calls.load(Ordering::SeqCst))
    }

    const GET_HEALTH: &str = "/vitals.v1.HealthCheckService/GetSystemHealth";

    #[tokio::test]
    async fn no_unknown_or_malformed_credentials_are_unauthenticated() {
        let unauthenticated = (Code::Unauthenticated, Some("UNAUTHENTICATED".to_owned()), 0);
        for request in [
            testing::request(GET_HEALTH),
            with_token(GET_HEALTH, "Bearer wrong-token"),
            with_token(GET_HEALTH, "Basic cmVhZGVyLXRva2Vu"),
            with_token(GET_HEALTH, "Bearer "),
            with_token(GET_HEALTH, "reader-token"),
            with_san(GET_HEALTH, "spiffe://test/stranger"),
        ] {
            assert_eq!(outcome(false, request).await, unauthenticated);
        }
    }

    #[tokio::test]
    async fn a_known_principal_passes_with_its_scope_and_is_denied_without_it() {
        assert_eq!(
            outcome(false, with_token(GET_HEALTH, "Bearer reader-token")).await,
            (Code::Ok, None, 1)
        );
        assert_eq!(
            outcome(false, with_token(GET_HEALTH, "bearer reader-token")).await,
            (Code::Ok, None, 1)
        );
        assert_eq!(
            outcome(false, with_token(SUBMIT_RUN, "Bearer reader-token")).await,
            (Code::PermissionDenied, Some("PERMISSION_DENIED".to_owned()), 0)
        );
        assert_eq!(
            outcome(false, with_san(SUBMIT_RUN, "spiffe://test/writer")).await,
            (Code::Ok, None, 1)
        );
        let (inner, _) = testing::answering();
        let gate = AuthLayer::new(Some(Authenticator::new(principals(), false))).layer(inner);
        let response = gate
            .oneshot(with_san(GET_HEALTH, "spiffe://test/writer"))
            .await
            .unwrap();
        let metadata = testing::metadata(&response);
        assert_eq!(metadata["principal"], "writer");
        assert_eq!(metadata["scope"], "health.read");
    }

    #[tokio::test]
    async fn a_wrong_token_is_not_replaced_by_the_connections_certificate() {
        let mut request = with_san(SUBMIT_RUN, "spiffe://test/writer");
        request
            .headers_mut()
            .insert(AUTHORIZATION, http::HeaderValue::from_static("Bearer wrong"));
        assert_eq!(outcome(false, request).await.0, Code::Unauthenticated);
    }

    #[tokio::test]
    async fn health_is_open_and_reflection_is_open_unless_required() {
        for path in [HEALTH_CHECK, REFLECTION_V1, REFLECTION_V1ALPHA] {
            assert_eq!(
                outcome(false, testing::request(path)).await,
                (Code::Ok, None, 1),
                "{path}"
            );
        }
        assert_eq!(outcome(true, testing::request(HEALTH_CHECK)).await, (Code::Ok, None, 1));
        for path in [REFLECTION_V1, REFLECTION_V1ALPHA] {
            assert_eq!(
                outcome(true, testing::request(path)).await.0,
                Code::Unauthenticated,
                "{path}"
            );
            assert_eq!(
                outcome(true, with_token(path, "Bearer reader-token")).await,
                (Code::Ok, None, 1),
                "{path}"
            );
        }
    }

    #[tokio::test]
    async fn without_an_auth_file_everything_passes_with_open_access() {
        let inner = tower::service_fn(|request: Request<Body>| async move {
            assert!(matches!(request.extensions().get::<Access>(), Some(Access::Open)));
            Ok::<_, std::convert::Infallible>(testing::ok())
        });
        let response = AuthLayer::new(None)
            .layer(inner)
            .oneshot(testing::request(SUBMIT_RUN))
            .await
            .unwrap();
        assert_eq!(testing::outcome(&response).0, Code::Ok);
    }

    #[test]
    fn every_method_of_ours_has_its_scope() {
        let health = health_check_service_server::SERVICE_NAME;
        let locks = lock_service_server::SERVICE_NAME;
        for (method, scope) in [
            (format!("/{health}/EvaluateHealth"), Scope::HealthRead),
            (format!("/{health}/GetSystemHealth"), Scope::HealthRead),
            (format!("/{health}/ListRuns"), Scope::HealthRead),
            (format!("/{health}/ListTransitions"), Scope::HealthRead),
            (format!("/{health}/WatchTransitions"), Scope::HealthRead),
            (format!("/{health}/SubmitRun"), Scope::HealthWrite),
            (format!("/{health}/ConfigureCheck"), Scope::HealthAdmin),
            (format!("/{health}/ListSystems"), Scope::HealthRead),
            (format!("/{health}/GetUptime"), Scope::HealthRead),
            (format!("/{health}/DeleteCheck"), Scope::HealthAdmin),
            (format!("/{health}/DeleteSystem"), Scope::HealthAdmin),
            (format!("/{health}/SetMaintenance"), Scope::HealthAdmin),
            (format!("/{health}/ClearMaintenance"), Scope::HealthAdmin),
            (format!("/{health}/ConfigureSystem"), Scope::HealthAdmin),
            (format!("/{locks}/WithLock"), Scope::Locks),
            (format!("/{locks}/ListLocks"), Scope::Locks),
            (format!("/{locks}/GetLock"), Scope::Locks),
            (format!("/{locks}/Campaign"), Scope::Locks),
            (format!("/{locks}/ObserveLeader"), Scope::Locks),
        ] {
            assert_eq!(needs(&method, false), Needs::Scope(scope), "{method}");
        }
        assert_eq!(needs(&format!("/{health}/NoSuchMethod"), false), Needs::Principal);
    }
}
