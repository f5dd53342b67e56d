//! The internal listener: node administration and Prometheus metrics, behind the admin key
//! (`Authorization: Bearer <key>`, see [`crate::keys`]). Without a key every admin route answers
//! 403; only `/__lbheartbeat__` is open.

use axum::extract::{Path, Query, Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;

use crate::http::error::ApiError;
use crate::ops::node::{self, NodePatch, NodeSpec};
use crate::state::AppState;

/// Routes of the internal listener (state still to be applied).
pub fn router(state: AppState) -> Router<AppState> {
    Router::new()
        .route("/metrics", get(metrics))
        .route("/v1/nodes", get(list_nodes).post(add_node))
        // The node's URL is the last segment, percent-encoded (`https%3A%2F%2Fsync-1.example.com`).
        .route("/v1/services/{service}/nodes/{node}", get(show_node).patch(update_node).delete(remove_node))
        .route("/v1/services/{service}/nodes/{node}/drain", post(drain_node))
        .route("/v1/services/{service}/nodes/{node}/unassign", post(unassign_node))
        .layer(axum::middleware::from_fn_with_state(state, require_admin_key))
        .route("/__lbheartbeat__", get(crate::http::health::lbheartbeat))
}

async fn require_admin_key(State(state): State<AppState>, req: Request, next: Next) -> Response {
    match crate::http::guard::check_admin_key(state.admin_key.as_ref(), req.headers()) {
        Ok(()) => next.run(req).await,
        Err(refused) => refused.into_response(),
    }
}

async fn metrics(State(state): State<AppState>) -> Response {
    match &state.metrics {
        Some(handle) => ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], handle.render()).into_response(),
        None => ApiError::new(StatusCode::NOT_FOUND, "metrics_disabled", "metrics are not enabled").into_response(),
    }
}

#[derive(Deserialize)]
struct ListQuery {
    service: Option<String>,
}

async fn list_nodes(State(state): State<AppState>, Query(q): Query<ListQuery>) -> Result<Response, ApiError> {
    let nodes = node::list(state.store.as_ref(), q.service.as_deref()).await?;
    Ok(Json(serde_json::json!({ "nodes": nodes })).into_response())
}

async fn add_node(State(state): State<AppState>, body: axum::body::Bytes) -> Result<Response, ApiError> {
    let spec: NodeSpec = serde_json::from_slice(&body)
        .map_err(|e| ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, "invalid_body", e.to_string()))?;
    let view = node::add(state.store.as_ref(), &spec, state.config.sync.release_rate).await?;
    Ok((StatusCode::CREATED, Json(view)).into_response())
}

type NodePath = Path<(String, String)>;

async fn show_node(State(state): State<AppState>, Path((service, url)): NodePath) -> Result<Response, ApiError> {
    Ok(Json(node::view(state.store.as_ref(), &service, &url).await?).into_response())
}

async fn update_node(
    State(state): State<AppState>,
    Path((service, url)): NodePath,
    body: axum::body::Bytes,
) -> Result<Response, ApiError> {
    let patch: NodePatch = serde_json::from_slice(&body)
        .map_err(|e| ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, "invalid_body", e.to_string()))?;
    Ok(Json(node::update(state.store.as_ref(), &service, &url, &patch).await?).into_response())
}

async fn drain_node(State(state): State<AppState>, Path((service, url)): NodePath) -> Result<Response, ApiError> {
    Ok(Json(node::drain(state.store.as_ref(), &service, &url).await?).into_response())
}

async fn unassign_node(State(state): State<AppState>, Path((service, url)): NodePath) -> Result<Response, ApiError> {
    let unassigned = node::unassign(state.store.as_ref(), &service, &url).await?;
    Ok(Json(serde_json::json!({ "unassigned": unassigned })).into_response())
}

async fn remove_node(State(state): State<AppState>, Path((service, url)): NodePath) -> Result<Response, ApiError> {
    let unassigned = node::remove(state.store.as_ref(), &service, &url).await?;
    Ok(Json(serde_json::json!({ "removed": url, "unassigned": unassigned })).into_response())
}
