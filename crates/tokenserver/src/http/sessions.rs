//! Session-token routes on the internal listener: the v1 API (`/v1/sessions…`, JSON envelope
//! errors, proper statuses) and, beside it, HaKr/token_server's `/token` routes ([`super::hakr`]).
//! Both share one body limit and `sessions.api_key` ([`crate::keys`]); the dumps, which read
//! every session's metadata, answer to the admin key instead, one at a time.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::extract::rejection::QueryRejection;
use axum::extract::{DefaultBodyLimit, Query};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use serde::Deserialize;
use serde_json::{Map, Value};
use tokenserver_core::session::RotateOutcome;
use tokenserver_core::session::{MetaError, MetaUpdate, SessionRecord, SessionToken};

use std::sync::Arc;

use crate::http::error::ApiError;
use crate::http::guard::{AdminKeyed, Guarded, Keyed};
use crate::http::json::{rfc3339, V1Json};
use crate::session::{DumpSlot, Sessions};
use crate::state::AppState;

/// Most sessions one dump returns.
pub const MAX_DUMP: usize = 1000;

/// What the session handlers share: the service, behind `sessions.api_key` ([`Keyed`]) or, for
/// the dumps, the admin key ([`AdminKeyed`]).
pub type SessionsState = Guarded<Arc<Sessions>>;

/// A dump slot (429 while another dump runs).
pub fn dump_slot(sessions: &Sessions) -> Result<DumpSlot, ApiError> {
    sessions.dump_slot().ok_or_else(|| {
        ApiError::new(StatusCode::TOO_MANY_REQUESTS, "dump_in_progress", "another dump is running; retry later")
    })
}

/// Session routes (HaKr's and v1), when sessions are enabled.
pub fn router(state: &AppState) -> Option<Router<AppState>> {
    let sessions = state.sessions.clone()?;
    let config = sessions.config();
    let router = Router::new()
        .route("/v1/sessions", post(create).delete(end))
        .route("/v1/sessions/rotate", post(rotate))
        .merge(super::hakr::router())
        // Every handler above gets the service from `sessions.api_key`'s check ([`Keyed`]); the
        // dumps from the admin key's ([`AdminKeyed`]).
        .route("/v1/sessions/dump", get(dump))
        .merge(super::hakr::dump_router(config.dump_enabled));
    let limit = DefaultBodyLimit::max(config.max_body_bytes);
    let guarded = Guarded::new(sessions, state.session_access.clone(), "sessions.api_key", state.admin_key.clone());
    Some(router.layer(limit).with_state(guarded))
}

/// The status of a metadata limit, on both APIs: size 413, shape 422.
pub fn meta_status(e: &MetaError) -> StatusCode {
    match e {
        MetaError::TooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
        MetaError::TooDeep { .. } | MetaError::TooManyKeys { .. } => StatusCode::UNPROCESSABLE_ENTITY,
    }
}

/// The v1 rendering of a metadata limit.
pub(crate) fn meta_error(e: &MetaError) -> ApiError {
    let code = match e {
        MetaError::TooLarge { .. } => "metadata_too_large",
        MetaError::TooDeep { .. } => "metadata_too_deep",
        MetaError::TooManyKeys { .. } => "metadata_too_many_keys",
    };
    ApiError::new(meta_status(e), code, e.to_string())
}

/// `{"token":…,"expires_at":…,"meta":…}`, written around the stored canonical metadata.
fn issued_body(token: &SessionToken, record: &SessionRecord) -> String {
    format!(
        r#"{{"token":"{}","expires_at":"{}","meta":{}}}"#,
        token.encode(),
        rfc3339(record.expires_at),
        if record.meta.is_empty() { "{}" } else { &record.meta }
    )
}

fn json_response(status: StatusCode, body: String) -> Response {
    (status, [(axum::http::header::CONTENT_TYPE, "application/json")], body).into_response()
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateBody {
    #[serde(default)]
    meta: Map<String, Value>,
    /// Idle lifetime, seconds.
    ttl: Option<u64>,
}

async fn create(Keyed(sessions): Keyed<Arc<Sessions>>, V1Json(body): V1Json<CreateBody>) -> Result<Response, ApiError> {
    let issued = sessions.create(body.meta, body.ttl.map(Duration::from_secs)).await.map_err(ApiError::from)?;
    Ok(json_response(StatusCode::CREATED, issued_body(&issued.token, &issued.record)))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RotateBody {
    token: String,
    /// JSON Merge Patch (RFC 7396) of the metadata.
    meta: Option<Value>,
}

fn invalid_token() -> ApiError {
    ApiError::new(StatusCode::UNAUTHORIZED, "invalid_token", "the session token is invalid, expired or revoked")
}

async fn rotate(Keyed(sessions): Keyed<Arc<Sessions>>, V1Json(body): V1Json<RotateBody>) -> Result<Response, ApiError> {
    let update = match body.meta {
        None => None,
        Some(patch) if patch.is_object() => Some(MetaUpdate::MergePatch(patch)),
        Some(_) => {
            return Err(ApiError::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "invalid_body",
                "meta must be a JSON object (a merge patch of the metadata)",
            ))
        }
    };
    match sessions.rotate(&body.token, update).await.map_err(ApiError::from)? {
        RotateOutcome::Rotated { token, record } | RotateOutcome::Replayed { token, record } => {
            Ok(json_response(StatusCode::OK, issued_body(&token, &record)))
        }
        RotateOutcome::Refused(_) | RotateOutcome::Revoked => Err(invalid_token()),
        RotateOutcome::Rejected(e) => Err(meta_error(&e)),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct EndBody {
    token: String,
}

async fn end(Keyed(sessions): Keyed<Arc<Sessions>>, V1Json(body): V1Json<EndBody>) -> Result<Response, ApiError> {
    if sessions.end(&body.token).await.map_err(ApiError::from)? {
        Ok(StatusCode::NO_CONTENT.into_response())
    } else {
        Err(ApiError::new(StatusCode::NOT_FOUND, "session_not_found", "no live session has this token"))
    }
}

#[derive(Deserialize)]
struct DumpQuery {
    limit: Option<usize>,
    cursor: Option<String>,
}

async fn dump(
    AdminKeyed(sessions): AdminKeyed<Arc<Sessions>>,
    query: Result<Query<DumpQuery>, QueryRejection>,
) -> Result<Response, ApiError> {
    // Metadata is personal data: the dump needs the admin key. The query is judged only after
    // the key, and in the API's JSON shape (axum's own rejection is plain text and would answer
    // before the key is checked).
    let slot = dump_slot(&sessions)?;
    let (limit, cursor) = match query {
        Ok(Query(q)) => (q.limit.unwrap_or(100), q.cursor),
        Err(_) => (0, None),
    };
    if limit == 0 || limit > MAX_DUMP {
        return Err(ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_limit",
            format!("limit must be between 1 and {MAX_DUMP}"),
        ));
    }
    let page = sessions.dump(&slot, cursor.as_deref(), limit).await.map_err(ApiError::from)?;
    let list: Vec<Value> = page
        .entries
        .iter()
        .map(|e| {
            let meta: Value = serde_json::from_str(&e.meta).unwrap_or(Value::Object(Map::new()));
            serde_json::json!({ "expires_at": rfc3339(e.expires_at), "ends_at": rfc3339(e.deadline), "meta": meta })
        })
        .collect();
    let body = serde_json::json!({
        "sessions": list,
        "truncated": page.next.is_some(),
        "next_cursor": page.next,
        "records": page.records,
        "generated_at": rfc3339(SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)),
    });
    Ok(axum::Json(body).into_response())
}
