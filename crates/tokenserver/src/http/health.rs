//! Dockerflow health routes: `/__heartbeat__` (checks the database), `/__lbheartbeat__`,
//! `/__version__`. The public listener's heartbeat checks the Sync database (what it serves);
//! the internal listener's checks the store of every family that is on.
//!
//! The heartbeat asks the database for a read and for a write connection, each within a short
//! bound (`database_request_timeout`, 2 s when unset): a database that answers reads while writes
//! are stuck (a lock held elsewhere, an exhausted write pool) cannot serve new users or key
//! changes, and a load balancer should hear so. Mozilla's body shape is kept; a failure adds
//! `failed` (`database_read` or `database_write`) and `database_msg`.

use std::time::Duration;

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde_json::json;

use crate::state::{AppState, SyncFamily};

/// Crate version, reported by the heartbeat and `/__version__`.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// The public listener's health routes.
pub fn router() -> Router<SyncFamily> {
    Router::new()
        .route("/__heartbeat__", get(heartbeat))
        .route("/__lbheartbeat__", get(lbheartbeat))
        .route("/__version__", get(version))
}

/// The internal listener's (its `/__lbheartbeat__` is the admin router's).
pub fn internal_router() -> Router<AppState> {
    Router::new().route("/__heartbeat__", get(internal_heartbeat)).route("/__version__", get(version))
}

/// How long each heartbeat check may take when `database_request_timeout` is unset.
const CHECK_BOUND: Duration = Duration::from_secs(2);

/// What a check found, for the message.
fn outcome(
    result: Result<Result<(), tokenserver_store::StoreError>, tokio::time::error::Elapsed>,
    limit: Duration,
) -> Result<(), String> {
    match result {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => {
            tracing::warn!(error = %e, "heartbeat check failed");
            Err("the database refused".into())
        }
        Err(_) => Err(format!("no answer within {}", humantime::format_duration(limit))),
    }
}

/// The Sync database's read and write checks: `Err((failed, database, message))`.
async fn sync_checks(sync: &SyncFamily, limit: Duration) -> Result<(), (&'static str, &'static str, String)> {
    let (read, write) = tokio::join!(
        tokio::time::timeout(limit, sync.store.check()),
        tokio::time::timeout(limit, sync.store.check_write()),
    );
    match (outcome(read, limit), outcome(write, limit)) {
        (Ok(()), Ok(())) => Ok(()),
        (Err(msg), _) => Err(("database_read", "Unknown", format!("read: {msg}"))),
        (Ok(()), Err(msg)) => Err(("database_write", "Err", format!("write: {msg}"))),
    }
}

fn unavailable(body: serde_json::Value) -> Response {
    let retry = crate::http::error::RETRY_AFTER_S.to_string();
    (StatusCode::SERVICE_UNAVAILABLE, [("retry-after", retry.as_str())], Json(body)).into_response()
}

async fn heartbeat(State(state): State<SyncFamily>) -> Response {
    let limit = state.config.database.request_timeout.unwrap_or(CHECK_BOUND);
    match sync_checks(&state, limit).await {
        Ok(()) => (StatusCode::OK, Json(json!({"version": VERSION, "database": "Ok", "status": "Ok"}))).into_response(),
        Err((failed, database, msg)) => unavailable(
            json!({"version": VERSION, "status": "Err", "database": database, "failed": failed, "database_msg": msg}),
        ),
    }
}

/// One family's store check into the internal heartbeat's body: `name` is `Ok` or `Err`, with
/// `<name>_msg` and `failed` (the first failure) on error.
async fn family_check(
    body: &mut serde_json::Value,
    failed: &mut Option<&'static str>,
    name: &'static str,
    check: impl std::future::Future<Output = Result<(), tokenserver_store::StoreError>>,
    limit: Duration,
) {
    let result = outcome(tokio::time::timeout(limit, check).await, limit);
    body[name] = json!(if result.is_ok() { "Ok" } else { "Err" });
    if let Err(msg) = result {
        body[format!("{name}_msg")] = json!(msg);
        *failed = failed.or(Some(name));
    }
}

/// Every enabled family's store: `database` (Sync), `sessions`, `access`, each `Ok` or `Err`;
/// `failed` names the first that failed.
async fn internal_heartbeat(State(state): State<AppState>) -> Response {
    let limit = state.config.database.request_timeout.unwrap_or(CHECK_BOUND);
    let mut body = json!({"version": VERSION, "status": "Ok"});
    let mut failed: Option<&'static str> = None;
    if let Some(sync) = &state.sync {
        match sync_checks(sync, limit).await {
            Ok(()) => body["database"] = json!("Ok"),
            Err((which, database, msg)) => {
                body["database"] = json!(database);
                body["database_msg"] = json!(msg);
                failed = failed.or(Some(which));
            }
        }
    }
    if let Some(sessions) = &state.sessions {
        family_check(&mut body, &mut failed, "sessions", sessions.store().check(), limit).await;
    }
    if let Some(access) = &state.access {
        family_check(&mut body, &mut failed, "access", access.store().check(), limit).await;
    }
    match failed {
        None => (StatusCode::OK, Json(body)).into_response(),
        Some(which) => {
            body["status"] = json!("Err");
            body["failed"] = json!(which);
            unavailable(body)
        }
    }
}

/// Liveness: answers without touching the database.
pub async fn lbheartbeat() -> Response {
    Json(json!({})).into_response()
}

async fn version() -> Response {
    Json(json!({
        "build": option_env!("TOKENSERVER_BUILD").unwrap_or("local"),
        "commit": option_env!("TOKENSERVER_COMMIT").unwrap_or("unknown"),
        "source": "https://github.com/tokenserver/tokenserver",
        "version": VERSION,
    }))
    .into_response()
}
