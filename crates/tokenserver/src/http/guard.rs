//! Who may call the internal listener's routes: the admin key, and each family's API key
//! ([`crate::keys`]), answered in the v1 envelope.

use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use axum::http::{HeaderMap, StatusCode};

use crate::http::error::ApiError;
use crate::keys::{BearerKey, RouteAccess};

/// A family's handler state, reachable only through a key check: its fields are private to this
/// module, so a handler gets the family's service from [`Keyed`] (the family's API key) or
/// [`AdminKeyed`] (the admin key) and from nothing else. A route added later without one of them
/// has no service to call.
#[derive(Clone)]
pub struct Guarded<T> {
    service: T,
    key: RouteAccess,
    /// The setting that holds `key`, named in refusals.
    setting: &'static str,
    admin_key: Option<BearerKey>,
}

impl<T> Guarded<T> {
    /// `service` behind `key` (held by the setting `setting`) and, for the routes that need it
    /// instead, the admin key.
    pub fn new(service: T, key: RouteAccess, setting: &'static str, admin_key: Option<BearerKey>) -> Self {
        Self { service, key, setting, admin_key }
    }
}

/// The family's service, handed out once the family's API key is checked. A handler's first
/// extractor, so the key is checked before its path or body is read; an extractor rather than a
/// middleware layer, since a layer boxes and clones one more service on every request (2,800 of
/// an access `authorize`'s 51,000 instructions).
pub struct Keyed<T>(pub T);

impl<T: Clone + Send + Sync> FromRequestParts<Guarded<T>> for Keyed<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &Guarded<T>) -> Result<Self, Self::Rejection> {
        check_route_key(&state.key, &parts.headers, state.setting)?;
        Ok(Self(state.service.clone()))
    }
}

/// The family's service, handed out once the admin key is checked: for the routes that read
/// every record of a family (the session dumps).
pub struct AdminKeyed<T>(pub T);

impl<T: Clone + Send + Sync> FromRequestParts<Guarded<T>> for AdminKeyed<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &Guarded<T>) -> Result<Self, Self::Rejection> {
        check_admin_key(state.admin_key.as_ref(), &parts.headers)?;
        Ok(Self(state.service.clone()))
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
fn check_route_key(access: &RouteAccess, headers: &HeaderMap, setting: &str) -> Result<(), ApiError> {
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
