//! Who may call the internal listener's routes: the admin key, and each family's API key
//! ([`crate::keys`]), answered in the v1 envelope.

use axum::http::{HeaderMap, StatusCode};

use crate::http::error::ApiError;
use crate::keys::{BearerKey, RouteAccess};

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
