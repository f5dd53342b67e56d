//! Path and query extractors for the v1 APIs, whose rejections are envelope errors: axum's own
//! answer in plain text, and some of them repeat the path, which may hold a token.

use axum::extract::{FromRequestParts, Path, Query};
use axum::http::request::Parts;
use axum::http::StatusCode;
use serde::de::DeserializeOwned;

use crate::http::error::ApiError;

/// The route's path parameters, strings (a number is parsed by its handler, which can say what it
/// expected). A segment that does not decode (percent-encoded bytes that are not UTF-8) names
/// nothing: 404 `not_found`, without repeating it.
pub struct V1Path<T>(pub T);

impl<T: DeserializeOwned + Send, S: Send + Sync> FromRequestParts<S> for V1Path<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        match Path::<T>::from_request_parts(parts, state).await {
            Ok(Path(v)) => Ok(Self(v)),
            Err(_) => Err(ApiError::new(StatusCode::NOT_FOUND, "not_found", "a path segment is not valid UTF-8")),
        }
    }
}

/// The query string's parameters; one that does not parse is 400 `invalid_query`, with serde's
/// account of which and why.
pub struct V1Query<T>(pub T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequestParts<S> for V1Query<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        match Query::<T>::from_request_parts(parts, state).await {
            Ok(Query(v)) => Ok(Self(v)),
            Err(rejection) => Err(ApiError::new(StatusCode::BAD_REQUEST, "invalid_query", rejection.body_text())),
        }
    }
}
