//! HTTP routers: the public listener (Sync token API, webhook, health) and the internal one
//! (node administration, session tokens, metrics).

pub mod access;
pub mod admin;
pub mod apisonator;
pub mod error;
pub mod extract;
pub mod guard;
pub mod hakr;
pub mod health;
pub mod json;
pub mod observe;
pub mod serve;
pub mod sessions;
pub mod sync;
pub mod webhook;

use std::convert::Infallible;
use std::future::{ready, Ready};
use std::task::{Context, Poll};

use axum::body::Body;
use axum::extract::{DefaultBodyLimit, Request};
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::future::RouteFuture;
use axum::routing::get;
use axum::Router;
use futures_util::future::Either;
use tower::{Layer, Service};
use tower_http::limit::RequestBodyLimitLayer;

use crate::state::{AppState, SyncFamily};

/// Total size of request headers accepted (names + values).
pub const MAX_HEADER_BYTES: usize = 32 * 1024;
/// Largest request body accepted anywhere.
pub const MAX_BODY_BYTES: usize = 64 * 1024;

/// A router behind the header-size check: requests whose headers exceed [`MAX_HEADER_BYTES`]
/// get 431. It wraps the whole router rather than each route (`Router::layer`), which would box
/// and clone one more service per request.
#[derive(Clone)]
pub struct HeaderLimit<S> {
    inner: S,
}

impl<S> HeaderLimit<S> {
    /// `inner` behind the check.
    pub fn new(inner: S) -> Self {
        Self { inner }
    }
}

impl<S> Service<Request> for HeaderLimit<S>
where
    S: Service<Request, Response = Response, Error = Infallible>,
{
    type Response = Response;
    type Error = Infallible;
    type Future = Either<Ready<Result<Response, Infallible>>, S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request) -> Self::Future {
        let size: usize = req.headers().iter().map(|(k, v)| k.as_str().len() + v.len()).sum();
        if size > MAX_HEADER_BYTES {
            return Either::Left(ready(Ok(StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE.into_response())));
        }
        Either::Right(self.inner.call(req))
    }
}

/// Unknown paths: Mozilla keeps an empty 404 under `/1.0/` and answers the JSON number `0`
/// (Weave's "unknown error") elsewhere.
async fn not_found(req: Request) -> Response {
    if req.uri().path().starts_with("/1.0/") {
        return StatusCode::NOT_FOUND.into_response();
    }
    let mut resp = Response::new(Body::from("0"));
    *resp.status_mut() = StatusCode::NOT_FOUND;
    resp.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    resp
}

/// Unknown paths on the internal listener: the v1 envelope under `/v1/` (our own APIs); the empty
/// 404 HaKr's and apisonator's routes always had elsewhere. The path is not echoed: it may hold a
/// token.
async fn internal_not_found(req: Request) -> Response {
    if req.uri().path().starts_with("/v1/") {
        return error::ApiError::new(StatusCode::NOT_FOUND, "not_found", "no such route").into_response();
    }
    StatusCode::NOT_FOUND.into_response()
}

/// A known internal path with a method it does not take (axum adds the `Allow` header).
async fn internal_method_not_allowed(req: Request) -> Response {
    if req.uri().path().starts_with("/v1/") {
        let message = format!("{} is not allowed here (see the Allow header)", req.method());
        return error::ApiError::new(StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed", message).into_response();
    }
    StatusCode::METHOD_NOT_ALLOWED.into_response()
}

async fn root() -> Response {
    (StatusCode::FOUND, [(header::LOCATION, "https://mozilla-services.readthedocs.io/en/latest/token/apis.html")])
        .into_response()
}

/// The public listener's service (the Sync family's).
pub fn public_service(state: SyncFamily) -> HeaderLimit<Router> {
    HeaderLimit::new(public_router(state))
}

/// The internal listener's service: the header check, then the body limit, then the routes. The
/// limit (`DefaultBodyLimit`: the v1 extractors honour it and answer an oversized body in the
/// envelope, 413 `body_too_large`, whether its size is announced or found while reading;
/// apisonator's create answers it in its XML, with the same code) is set once around the router:
/// as a `Router::layer` it would wrap each route in one more boxed service (1,300 of an access
/// `authorize`'s 48,000 instructions). The session routes set their own
/// (`sessions.max_body_bytes`), which takes its place.
pub fn internal_service(
    state: AppState,
) -> HeaderLimit<impl Service<Request, Response = Response, Error = Infallible, Future = RouteFuture<Infallible>> + Clone>
{
    HeaderLimit::new(DefaultBodyLimit::max(MAX_BODY_BYTES).layer(internal_router(state)))
}

/// The public listener's routes (without the header check: see [`public_service`]).
pub fn public_router(state: SyncFamily) -> Router {
    let mut router = Router::new().route("/", get(root)).merge(sync::router()).merge(health::router());
    if state.config.webhook.enabled {
        router = router.merge(webhook::router());
    }
    router
        .fallback(not_found)
        .layer(RequestBodyLimitLayer::new(MAX_BODY_BYTES))
        .layer(observe::ObserveLayer::new("public"))
        .with_state(state)
}

/// The internal listener's routes (without the header check and the body limit: see
/// [`internal_service`]).
fn internal_router(state: AppState) -> Router {
    let mut router = admin::router(state.clone());
    // Session routes carry their own body limit (`sessions.max_body_bytes`, enforced by the JSON
    // extractor so rejections read as HaKr's did).
    if let Some(sessions) = sessions::router(&state) {
        router = router.merge(sessions);
    }
    if let Some(access) = access::router(&state) {
        router = router.merge(access);
    }
    if let Some(apisonator) = apisonator::router(&state) {
        // Their body limit is `internal_service`'s, answered in their XML (`apisonator::create`).
        router = router.merge(apisonator);
    }
    router
        .fallback(internal_not_found)
        .method_not_allowed_fallback(internal_method_not_allowed)
        .layer(observe::ObserveLayer::new("internal"))
        .with_state(state)
}
