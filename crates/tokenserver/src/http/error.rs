//! Error bodies. `SyncError` renders Mozilla's Cornice shape byte for byte (spec §1.5):
//! `{"status":…,"errors":[{"location":…,"name":…,"description":…}]}`. `ApiError` renders our own
//! v1 envelope `{"error":…,"message":…}` for the internal APIs.

use std::borrow::Cow;

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use tokenserver_core::sync::consistency::Violation;

/// Seconds clients are asked to wait after a 503.
pub const RETRY_AFTER_S: u64 = 10;

/// One catalogue error of the Sync protocol.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SyncError {
    /// HTTP status.
    pub http: StatusCode,
    /// `status` field.
    pub status: &'static str,
    /// `errors[0].location`.
    pub location: &'static str,
    /// `errors[0].name`.
    pub name: Cow<'static, str>,
    /// `errors[0].description`.
    pub description: &'static str,
    /// Adds `Retry-After` (and `X-Backoff`) to tell clients when to come back.
    pub retry_after: Option<u64>,
}

const fn err(
    http: StatusCode,
    status: &'static str,
    location: &'static str,
    name: &'static str,
    description: &'static str,
) -> SyncError {
    SyncError { http, status, location, name: Cow::Borrowed(name), description, retry_after: None }
}

impl SyncError {
    /// A1–A3: missing or malformed `Authorization`.
    pub const fn unauthorized() -> Self {
        err(StatusCode::UNAUTHORIZED, "error", "body", "", "Unauthorized")
    }
    /// A4: a scheme other than `Bearer`.
    pub const fn unsupported() -> Self {
        err(StatusCode::UNAUTHORIZED, "error", "body", "", "Unsupported")
    }
    /// A5, K3, K4, K7: the credentials are not acceptable.
    pub const fn invalid_credentials() -> Self {
        err(StatusCode::UNAUTHORIZED, "invalid-credentials", "body", "", "Unauthorized")
    }
    /// A6: the identity provider did not answer in time.
    pub const fn resource_unavailable() -> Self {
        let mut e = err(StatusCode::SERVICE_UNAVAILABLE, "error", "body", "", "Resource is not available");
        e.retry_after = Some(RETRY_AFTER_S);
        e
    }
    /// K1.
    pub const fn missing_key_id() -> Self {
        err(StatusCode::UNAUTHORIZED, "invalid-key-id", "header", "", "Missing X-KeyID header")
    }
    /// K2.
    pub const fn invalid_key_id() -> Self {
        err(StatusCode::UNAUTHORIZED, "invalid-key-id", "header", "", "Invalid X-KeyID header")
    }
    /// K5.
    pub const fn invalid_client_state_header() -> Self {
        err(StatusCode::BAD_REQUEST, "error", "header", "X-Client-State", "Invalid client state value")
    }
    /// K6.
    pub const fn client_state_mismatch() -> Self {
        err(StatusCode::UNAUTHORIZED, "invalid-client-state", "body", "", "Unauthorized")
    }
    /// P1.
    pub const fn unsupported_application() -> Self {
        err(StatusCode::NOT_FOUND, "error", "url", "application", "Unsupported application")
    }
    /// P2: `name` is the requested version, as Mozilla does.
    pub fn unsupported_version(version: &str) -> Self {
        let mut e = err(StatusCode::NOT_FOUND, "error", "url", "", "Unsupported application version");
        e.name = Cow::Owned(version.to_string());
        e
    }
    /// U1.
    pub const fn new_users_disabled() -> Self {
        err(StatusCode::FORBIDDEN, "new-users-disabled", "body", "", "New users are not allowed")
    }
    /// D1, U3, X1: an internal failure. The detail is logged, never sent.
    pub const fn internal() -> Self {
        err(StatusCode::INTERNAL_SERVER_ERROR, "internal-error", "internal", "", "Server error")
    }
    /// U2 and an unreachable database: 503 with the internal-error body, plus `Retry-After`.
    pub const fn unavailable() -> Self {
        let mut e = err(StatusCode::SERVICE_UNAVAILABLE, "internal-error", "internal", "", "Server error");
        e.retry_after = Some(RETRY_AFTER_S);
        e
    }
    /// Q1.
    pub const fn invalid_query() -> Self {
        err(StatusCode::BAD_REQUEST, "error", "url", "", "invalid query params")
    }
    /// T1: a database call exceeded `database_request_timeout`.
    pub const fn elapsed() -> Self {
        err(StatusCode::GATEWAY_TIMEOUT, "elapsed", "body", "", "Elapsed")
    }
}

impl From<Violation> for SyncError {
    fn from(v: Violation) -> Self {
        let cs = |description| {
            err(StatusCode::UNAUTHORIZED, "invalid-client-state", "header", "X-Client-State", description)
        };
        match v {
            Violation::KeysChangedAfterGeneration
            | Violation::KeysChangedAtBackwards
            | Violation::KeysChangedAtMissing => {
                err(StatusCode::UNAUTHORIZED, "invalid-keysChangedAt", "body", "", "Unauthorized")
            }
            Violation::EmptyClientState => cs("Unacceptable client-state value empty string"),
            Violation::StaleClientState => cs("Unacceptable client-state value stale value"),
            Violation::ClientStateWithoutGenerationChange => {
                cs("Unacceptable client-state value new value with no generation change")
            }
            Violation::ClientStateWithoutKeysChange => {
                cs("Unacceptable client-state value new value with no keys_changed_at change")
            }
            Violation::GenerationBackwards => {
                err(StatusCode::UNAUTHORIZED, "invalid-generation", "body", "", "Unauthorized")
            }
        }
    }
}

#[derive(Serialize)]
struct Instance<'a> {
    location: &'a str,
    name: &'a str,
    description: &'a str,
}

#[derive(Serialize)]
struct Body<'a> {
    status: &'a str,
    errors: [Instance<'a>; 1],
}

impl SyncError {
    /// The exact JSON body.
    pub fn body(&self) -> String {
        let body = Body {
            status: self.status,
            errors: [Instance { location: self.location, name: &self.name, description: self.description }],
        };
        serde_json::to_string(&body).unwrap_or_default()
    }
}

impl IntoResponse for SyncError {
    fn into_response(self) -> Response {
        let mut resp = (self.http, [(header::CONTENT_TYPE, HeaderValue::from_static("application/json"))], self.body())
            .into_response();
        if let Some(secs) = self.retry_after {
            let v = HeaderValue::from(secs);
            resp.headers_mut().insert(header::RETRY_AFTER, v.clone());
            resp.headers_mut().insert("x-backoff", v);
        }
        resp
    }
}

/// Our own APIs' error envelope: `{"error": "<code>", "message": "..."}`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    /// HTTP status.
    pub http: StatusCode,
    /// Stable machine-readable code.
    pub code: &'static str,
    /// Human-readable text (never secrets or driver text).
    pub message: String,
}

impl ApiError {
    /// Builds one.
    pub fn new(http: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self { http, code, message: message.into() }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = serde_json::json!({ "error": self.code, "message": self.message });
        (self.http, axum::Json(body)).into_response()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bodies_are_byte_identical_to_mozillas() {
        assert_eq!(
            SyncError::unsupported_application().body(),
            r#"{"status":"error","errors":[{"location":"url","name":"application","description":"Unsupported application"}]}"#
        );
        assert_eq!(
            SyncError::unsupported_version("1.2").body(),
            r#"{"status":"error","errors":[{"location":"url","name":"1.2","description":"Unsupported application version"}]}"#
        );
        assert_eq!(
            SyncError::from(Violation::StaleClientState).body(),
            r#"{"status":"invalid-client-state","errors":[{"location":"header","name":"X-Client-State","description":"Unacceptable client-state value stale value"}]}"#
        );
    }
}
