//! HaKr/token_server's API, unchanged: `POST /token` (text/plain token), `PUT /token` (always 200
//! with `{"Ok":{token,meta}}` or `{"Err":"InvalidToken"}`), `DELETE /token` (always 202), and the
//! opt-in `HEAD /dump`. Request rejections are axum's plain-text ones, as HaKr's were. Beyond
//! HaKr: metadata limits (413/422 in text), reuse detection and the grace window, and a dump
//! that needs the admin key, runs one at a time and logs in lines of [`DUMP_CHUNK`] sessions
//! (HaKr wrote every session into one line).

use std::sync::Arc;

use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{head, post};
use axum::Router;
use serde::Deserialize;
use serde_json::{Map, Value};
use tokenserver_core::session::RotateOutcome;
use tokenserver_core::session::{MetaError, MetaUpdate};

use super::json::FastJson as Json;
use super::sessions::{dump_slot, meta_status, SessionsState};
use crate::http::error::hakr_failure;
use crate::http::guard::{AdminKeyed, Keyed};
use crate::session::Sessions;

/// Most sessions one `HEAD /dump` writes to the log.
const MAX_LOGGED_DUMP: usize = 10_000;
/// Sessions per dump log line (and per store read).
const DUMP_CHUNK: usize = 100;

/// `/token`.
pub fn router() -> Router<SessionsState> {
    Router::new().route("/token", post(create).put(update).delete(remove))
}

/// `/dump` when enabled and DEBUG logging is on for tokenserver (HaKr's rule).
pub fn dump_router(dump_enabled: bool) -> Router<SessionsState> {
    let debug = tracing::enabled!(target: "tokenserver", tracing::Level::DEBUG);
    if dump_enabled && debug {
        return Router::new().route("/dump", head(dump));
    }
    if dump_enabled {
        tracing::warn!("HEAD /dump will not provide logging; use RUST_LOG='tokenserver=debug'");
    }
    Router::new()
}

// Names and shapes are HaKr's: serde's messages (`expected struct CreatePayload with 1 element`)
// carry them into the 422 bodies.
#[derive(Deserialize)]
struct CreatePayload {
    meta: Map<String, Value>,
}

#[derive(Deserialize)]
struct UpdatePayload {
    token: String,
    meta: Option<Map<String, Value>>,
}

#[derive(Deserialize)]
struct RemovePayload {
    token: String,
}

fn limit_error(e: &MetaError) -> Response {
    (meta_status(e), e.to_string()).into_response()
}

async fn create(Keyed(sessions): Keyed<Arc<Sessions>>, Json(p): Json<CreatePayload>) -> Response {
    match sessions.create(p.meta, None).await {
        Ok(issued) => issued.token.encode().into_response(),
        Err(e) => hakr_failure(e),
    }
}

async fn update(Keyed(sessions): Keyed<Arc<Sessions>>, Json(p): Json<UpdatePayload>) -> Response {
    let update = p.meta.filter(|m| !m.is_empty()).map(MetaUpdate::Shallow);
    let body = match sessions.rotate(&p.token, update).await {
        Ok(RotateOutcome::Rotated { token, record } | RotateOutcome::Replayed { token, record }) => {
            let meta = if record.meta.is_empty() { "{}" } else { record.meta.as_str() };
            format!(r#"{{"Ok":{{"token":"{}","meta":{meta}}}}}"#, token.encode())
        }
        Ok(RotateOutcome::Refused(_) | RotateOutcome::Revoked) => r#"{"Err":"InvalidToken"}"#.to_string(),
        Ok(RotateOutcome::Rejected(e)) => return limit_error(&e),
        Err(e) => return hakr_failure(e),
    };
    (StatusCode::OK, [(header::CONTENT_TYPE, "application/json")], body).into_response()
}

async fn remove(Keyed(sessions): Keyed<Arc<Sessions>>, Json(p): Json<RemovePayload>) -> Response {
    match sessions.end(&p.token).await {
        Ok(_) => StatusCode::ACCEPTED.into_response(),
        Err(e) => hakr_failure(e),
    }
}

/// `YYYY-MM-DD HH:MM:SS` in UTC, as HaKr's dump writes expiry.
fn hakr_time(ms: u64) -> String {
    let text = crate::http::json::rfc3339(ms);
    text.trim_end_matches('Z').replacen('T', " ", 1)
}

async fn dump(AdminKeyed(sessions): AdminKeyed<Arc<Sessions>>) -> Response {
    let slot = match dump_slot(&sessions) {
        Ok(slot) => slot,
        Err(refused) => return refused.into_response(),
    };
    let (mut after, mut logged, mut part) = (None, 0usize, 0usize);
    while logged < MAX_LOGGED_DUMP {
        let page = match sessions.dump(&slot, after.as_deref(), DUMP_CHUNK.min(MAX_LOGGED_DUMP - logged)).await {
            Ok(page) => page,
            Err(e) => {
                tracing::error!(error = %e, "DUMP failed");
                break;
            }
        };
        let items: Vec<String> = page
            .entries
            .iter()
            .map(|e| {
                let meta = if e.meta.is_empty() { "{}" } else { e.meta.as_str() };
                format!(r#"{{"expires":"{}","meta":{meta}}}"#, hakr_time(e.expires_at))
            })
            .collect();
        logged += items.len();
        part += 1;
        tracing::debug!(target: "tokenserver::session_dump", part, "DUMP: [{}]", items.join(","));
        after = page.next;
        if after.is_none() {
            break;
        }
    }
    StatusCode::ACCEPTED.into_response()
}
