//! Dockerflow health routes: `/__heartbeat__` (checks the database), `/__lbheartbeat__`,
//! `/__version__`.
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

use crate::state::AppState;

/// Crate version, reported by the heartbeat and `/__version__`.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// Routes of this module.
pub fn router() -> Router<AppState> {
    Router::new()
        .route("/__heartbeat__", get(heartbeat))
        .route("/__lbheartbeat__", get(lbheartbeat))
        .route("/__version__", get(version))
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

async fn heartbeat(State(state): State<AppState>) -> Response {
    let limit = state.config.database.request_timeout.unwrap_or(CHECK_BOUND);
    let (read, write) = tokio::join!(
        tokio::time::timeout(limit, state.store.check()),
        tokio::time::timeout(limit, state.store.check_write()),
    );
    let failure = match (outcome(read, limit), outcome(write, limit)) {
        (Ok(()), Ok(())) => {
            return (StatusCode::OK, Json(json!({"version": VERSION, "database": "Ok", "status": "Ok"})))
                .into_response()
        }
        (Err(msg), _) => ("database_read", "Unknown", format!("read: {msg}")),
        (Ok(()), Err(msg)) => ("database_write", "Err", format!("write: {msg}")),
    };
    let (failed, database, msg) = failure;
    let body =
        json!({"version": VERSION, "status": "Err", "database": database, "failed": failed, "database_msg": msg});
    let retry = crate::http::error::RETRY_AFTER_S.to_string();
    (StatusCode::SERVICE_UNAVAILABLE, [("retry-after", retry.as_str())], Json(body)).into_response()
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
