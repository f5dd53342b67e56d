//! Dockerflow health routes: `/__heartbeat__` (checks the database), `/__lbheartbeat__`,
//! `/__version__`.

use std::time::Duration;

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde_json::json;

use crate::app::AppState;

/// Crate version, reported by the heartbeat and `/__version__`.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// Routes of this module.
pub fn router() -> Router<AppState> {
    Router::new()
        .route("/__heartbeat__", get(heartbeat))
        .route("/__lbheartbeat__", get(lbheartbeat))
        .route("/__version__", get(version))
}

async fn heartbeat(State(state): State<AppState>) -> Response {
    let limit = state.config.database.request_timeout.unwrap_or(Duration::from_secs(5));
    let ok = matches!(tokio::time::timeout(limit, state.store.check()).await, Ok(Ok(())));
    if ok {
        (StatusCode::OK, Json(json!({"version": VERSION, "database": "Ok", "status": "Ok"}))).into_response()
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, Json(json!({"version": VERSION, "status": "Err", "database": "Unknown"})))
            .into_response()
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
