//! Who may call the internal listener's routes: the admin key, and each family's API key
//! ([`crate::keys`]), answered in the v1 envelope.

use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use axum::http::{HeaderMap, StatusCode};

use crate::http::error::ApiError;
use crate::keys::{BearerKey, RouteAccess};

/// A family's handler state that knows the key its routes answer to.
pub trait RouteKey {
    /// The routes' access, and the setting that holds the key (named in refusals).
    fn route_key(&self) -> (&RouteAccess, &'static str);
}

/// The family's API key, checked as a handler's first extractor, so before its path or body is
/// read. An extractor rather than a middleware layer: a layer boxes and clones one more service
/// on every request (2,800 of an access `authorize`'s 51,000 instructions).
pub struct Keyed;

impl<S: RouteKey + Send + Sync> FromRequestParts<S> for Keyed {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        let (access, setting) = state.route_key();
        check_route_key(access, &parts.headers, setting).map(|()| Self)
    }
}

/// `Err` with the answer when `headers` do not carry the admin key `key`.
pub fn check_admin_key(key: Option<&BearerKey>, headers: &HeaderMap) -> Result<(), ApiError> {
    match key {
        Some(key) if key.matches(headers) => Ok(()),
        Some(_) => Err(ApiError::new(StatusCode::UNAUTHORIZED, "unauthorized", "a valid admin key is required")),
        None => Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "admin_key_required",
            "the admin API is off: set internal.admin_key",
        )),
    }
}

/// `Err` with the answer when `headers` do not carry the family's key (`setting` names it in
/// the answer).
pub fn check_route_key(access: &RouteAccess, headers: &HeaderMap, setting: &str) -> Result<(), ApiError> {
    match access {
        RouteAccess::Open => Ok(()),
        RouteAccess::Key(key) if key.matches(headers) => Ok(()),
        RouteAccess::Key(_) => {
            Err(ApiError::new(StatusCode::UNAUTHORIZED, "unauthorized", format!("a valid {setting} is required")))
        }
        RouteAccess::Off => Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "api_key_required",
            format!("these routes are off: set {setting}"),
        )),
    }
}
