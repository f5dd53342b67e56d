//! Error bodies, and the one place where the flows' errors (and the store's) become HTTP answers.
//! `SyncError` renders Mozilla's Cornice shape byte for byte (spec §1.5):
//! `{"status":…,"errors":[{"location":…,"name":…,"description":…}]}`. `ApiError` renders our own
//! v1 envelope `{"error":…,"message":…}` for the internal APIs. Driver text never reaches a
//! client: it is logged here.

use std::borrow::Cow;

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use tokenserver_core::sync::consistency::Violation;
use tokenserver_core::sync::keyid::KeyIdError;
use tokenserver_store::StoreError;

use crate::access::AccessError;
use crate::ops::OpsError;
use crate::session::SessionError;
use crate::sync::IssueError;

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

impl From<KeyIdError> for SyncError {
    fn from(e: KeyIdError) -> Self {
        match e {
            KeyIdError::Missing => SyncError::missing_key_id(),
            KeyIdError::NotVisibleAscii => SyncError::invalid_key_id(),
            KeyIdError::NoSeparator | KeyIdError::BadClientState | KeyIdError::BadKeysChangedAt => {
                SyncError::invalid_credentials()
            }
            KeyIdError::BadClientStateHeader => SyncError::invalid_client_state_header(),
            KeyIdError::ClientStateMismatch => SyncError::client_state_mismatch(),
        }
    }
}

impl From<&StoreError> for SyncError {
    /// The catalogue's answer to a store failure; the detail goes to the log only.
    fn from(e: &StoreError) -> Self {
        match e {
            StoreError::Timeout => SyncError::elapsed(),
            StoreError::NoNodeAvailable => {
                tracing::warn!("no node can take a new user: add capacity with `tokenserver node add`");
                SyncError::unavailable()
            }
            StoreError::Unavailable(detail) => {
                tracing::error!(error = %detail, "database unavailable");
                SyncError::unavailable()
            }
            StoreError::Conflict | StoreError::Abandoned | StoreError::Full(_) => SyncError::unavailable(),
            other => {
                tracing::error!(error = %other, "database error");
                SyncError::internal()
            }
        }
    }
}

impl From<IssueError> for SyncError {
    fn from(e: IssueError) -> Self {
        match e {
            IssueError::Unauthorized => SyncError::unauthorized(),
            IssueError::UnsupportedScheme => SyncError::unsupported(),
            IssueError::InvalidCredentials(_) => SyncError::invalid_credentials(),
            IssueError::IdentityUnavailable => SyncError::resource_unavailable(),
            IssueError::KeyId(k) => k.into(),
            IssueError::UnsupportedApplication => SyncError::unsupported_application(),
            IssueError::UnsupportedVersion(v) => SyncError::unsupported_version(&v),
            IssueError::NewUsersDisabled => SyncError::new_users_disabled(),
            IssueError::NewUsersThrottled(t) => {
                let mut e = SyncError::unavailable();
                // Whole seconds, rounded up: a client coming back sooner is refused again.
                e.retry_after = Some(t.wait().as_secs_f64().ceil().max(1.0) as u64);
                e
            }
            IssueError::Overloaded => SyncError::unavailable(),
            IssueError::InvalidQuery => SyncError::invalid_query(),
            IssueError::Consistency(v) => v.into(),
            IssueError::Store(s) => (&s).into(),
            IssueError::Contended => SyncError::unavailable(),
            IssueError::Retired | IssueError::Internal(_) => SyncError::internal(),
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

impl ApiError {
    /// A session store failure, as the session APIs answer it.
    pub fn session_store(e: &StoreError) -> Self {
        match e {
            StoreError::Full(_) => {
                tracing::warn!(error = %e, "session store full");
                ApiError::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "store_full",
                    "the session store holds as many sessions as it may",
                )
            }
            StoreError::InvalidInput(m) => ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, "invalid_cursor", m.clone()),
            StoreError::Unavailable(_) | StoreError::Conflict | StoreError::Timeout | StoreError::Abandoned => {
                tracing::warn!(error = %e, "session store unavailable");
                ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "store_unavailable", "the session store is unavailable")
            }
            other => {
                tracing::error!(error = %other, "session store failed");
                ApiError::internal()
            }
        }
    }

    /// 500 with nothing of the cause.
    pub fn internal() -> Self {
        ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal_error", "internal error")
    }
}

impl From<SessionError> for ApiError {
    fn from(e: SessionError) -> Self {
        match e {
            SessionError::Meta(m) => crate::http::sessions::meta_error(&m),
            SessionError::InvalidTtl { .. } => {
                ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, "invalid_ttl", e.to_string())
            }
            SessionError::Store(s) => ApiError::session_store(&s),
        }
    }
}

impl From<AccessError> for ApiError {
    fn from(e: AccessError) -> Self {
        use tokenserver_core::access::AuthorizeError;
        let status = |s: StatusCode, code: &'static str| ApiError::new(s, code, e.to_string());
        match &e {
            AccessError::Format(_) => status(StatusCode::UNPROCESSABLE_ENTITY, "access_token_format_invalid"),
            AccessError::Id { .. } => status(StatusCode::UNPROCESSABLE_ENTITY, "invalid_id"),
            AccessError::Ttl(_) => status(StatusCode::UNPROCESSABLE_ENTITY, "access_token_invalid_ttl"),
            AccessError::AlreadyExists(_) => status(StatusCode::CONFLICT, "access_token_already_exists"),
            AccessError::NotFound(_) => status(StatusCode::NOT_FOUND, "access_token_invalid"),
            AccessError::Authorize(AuthorizeError::InvalidToken(_)) => {
                status(StatusCode::NOT_FOUND, "access_token_invalid")
            }
            AccessError::Authorize(AuthorizeError::NoApplication) => {
                status(StatusCode::NOT_FOUND, "application_not_found")
            }
            AccessError::InvalidLimit => status(StatusCode::UNPROCESSABLE_ENTITY, "invalid_limit"),
            AccessError::Store(store) => ApiError::access_store(store),
        }
    }
}

impl ApiError {
    /// An access-token store failure, as the v1 API answers it.
    pub fn access_store(e: &StoreError) -> Self {
        match e {
            StoreError::InvalidInput(m) => ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, "invalid_cursor", m.clone()),
            StoreError::Full(_) => {
                tracing::warn!(error = %e, "access-token store full");
                ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "store_full", "the access-token store is full")
            }
            StoreError::Unavailable(_) | StoreError::Conflict | StoreError::Timeout | StoreError::Abandoned => {
                tracing::warn!(error = %e, "access-token store unavailable");
                ApiError::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "store_unavailable",
                    "the access-token store is unavailable",
                )
            }
            other => {
                tracing::error!(error = %other, "access-token store failed");
                ApiError::internal()
            }
        }
    }
}

impl From<OpsError> for ApiError {
    fn from(e: OpsError) -> Self {
        match e {
            OpsError::Invalid(code, m) => ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, code, m),
            OpsError::UnknownUser(who) => {
                ApiError::new(StatusCode::NOT_FOUND, "unknown_user", format!("no user {who}"))
            }
            OpsError::Store(StoreError::AlreadyExists(m)) => {
                ApiError::new(StatusCode::CONFLICT, "node_already_exists", m)
            }
            OpsError::Store(StoreError::UnknownService(s)) => {
                ApiError::new(StatusCode::NOT_FOUND, "unknown_service", format!("no service {s:?}"))
            }
            OpsError::Store(StoreError::NotFound(m)) => {
                ApiError::new(StatusCode::NOT_FOUND, "unknown_node", format!("no {m}"))
            }
            OpsError::Store(StoreError::Unavailable(_) | StoreError::Timeout | StoreError::Abandoned) => {
                ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "database_unavailable", "the database is unavailable")
            }
            OpsError::Store(other) => {
                tracing::error!(error = %other, "operator API call failed");
                ApiError::internal()
            }
        }
    }
}

/// A session failure as HaKr's routes answer it: text, 500 for any store failure (HaKr's
/// `InternalServerError`), 503 `StoreFull` when the memory store is full, limits as 413/422.
pub fn hakr_failure(e: SessionError) -> Response {
    match e {
        SessionError::Meta(m) => (crate::http::sessions::meta_status(&m), m.to_string()).into_response(),
        SessionError::Store(StoreError::Full(why)) => {
            tracing::warn!(%why, "session store full");
            (StatusCode::SERVICE_UNAVAILABLE, "StoreFull").into_response()
        }
        other => {
            tracing::error!(error = %other, "could not acquire read/write lock (session store failed)");
            (StatusCode::INTERNAL_SERVER_ERROR, "InternalServerError").into_response()
        }
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
