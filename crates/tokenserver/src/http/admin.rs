//! The internal listener: Sync operations (nodes, users, account events, purge) and Prometheus
//! metrics, behind the admin key
//! (`Authorization: Bearer <key>`, see [`crate::keys`]). Without a key every admin route answers
//! 403; only `/__lbheartbeat__` is open.

use axum::extract::{Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::{Json, Router};
use serde::Deserialize;

use crate::http::error::ApiError;
use crate::http::extract::{V1Path, V1Query};
use crate::http::json::V1Bytes;
use crate::ops::node::{self, NodePatch, NodeSpec};
use crate::ops::purge::PurgeOptions;
use crate::ops::user::{self, UserRef};
use crate::ops::{account, bucket, OpsError};
use crate::state::{AppState, SyncFamily};

/// Routes of the internal listener (state still to be applied): metrics and, when the Sync
/// family is on, its operations, behind the admin key; the health routes open.
pub fn router(state: AppState) -> Router<AppState> {
    let mut router = Router::new().route("/metrics", get(metrics));
    if let Some(sync) = state.sync.clone() {
        router = router.merge(sync_router().with_state(sync));
    }
    router
        .layer(axum::middleware::from_fn_with_state(state, require_admin_key))
        .route("/__lbheartbeat__", get(crate::http::health::lbheartbeat))
        .merge(crate::http::health::internal_router())
}

/// The Sync operations.
fn sync_router() -> Router<SyncFamily> {
    Router::new()
        .route("/v1/nodes", get(list_nodes).post(add_node))
        // The node's URL is the last segment, percent-encoded (`https%3A%2F%2Fsync-1.example.com`).
        .route("/v1/services/{service}/nodes/{node}", get(show_node).patch(update_node).delete(remove_node))
        .route("/v1/services/{service}/nodes/{node}/drain", post(drain_node))
        .route("/v1/services/{service}/nodes/{node}/unassign", post(unassign_node))
        // A user is its email (`<fxa_uid>@<domain>`, percent-encoded) or a row's uid.
        .route("/v1/services/{service}/users/{user}", get(show_user))
        .route("/v1/services/{service}/users/{user}/node", put(assign_user))
        .route("/v1/services/{service}/buckets", get(list_buckets))
        .route("/v1/services/{service}/buckets/{bucket}", put(move_bucket))
        .route("/v1/count_users", get(count_users))
        .route("/v1/account_events", post(account_events))
        .route("/v1/purge", post(purge))
}

async fn require_admin_key(State(state): State<AppState>, req: Request, next: Next) -> Response {
    match crate::http::guard::check_admin_key(state.admin_key.as_ref(), req.headers()) {
        Ok(()) => next.run(req).await,
        Err(refused) => refused.into_response(),
    }
}

async fn metrics(State(state): State<AppState>) -> Response {
    // Gauges of what stands now, read at scrape time.
    metrics::gauge!("tokenserver_runtime_workers")
        .set(tokio::runtime::Handle::current().metrics().num_workers() as f64);
    if let Some(sync) = &state.sync {
        metrics::gauge!("tokenserver_db_requests_in_flight").set(sync.tokens.in_flight() as f64);
    }
    if let Some(pool) = state.sync.as_ref().and_then(|s| s.store.pool_state()) {
        metrics::gauge!("tokenserver_db_pool_connections", "state" => "idle").set(f64::from(pool.idle));
        metrics::gauge!("tokenserver_db_pool_connections", "state" => "in_use")
            .set(f64::from(pool.open - pool.idle.min(pool.open)));
        metrics::gauge!("tokenserver_db_pool_max_connections").set(f64::from(pool.max));
    }
    match &state.metrics {
        Some(handle) => ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], handle.render()).into_response(),
        None => ApiError::new(StatusCode::NOT_FOUND, "metrics_disabled", "metrics are not enabled").into_response(),
    }
}

#[derive(Deserialize)]
struct ListQuery {
    service: Option<String>,
}

async fn list_nodes(State(state): State<SyncFamily>, V1Query(q): V1Query<ListQuery>) -> Result<Response, ApiError> {
    let nodes = node::list(state.store.as_ref(), q.service.as_deref()).await?;
    Ok(Json(serde_json::json!({ "nodes": nodes })).into_response())
}

async fn add_node(State(state): State<SyncFamily>, V1Bytes(body): V1Bytes) -> Result<Response, ApiError> {
    let spec: NodeSpec = json_body(&body)?;
    let view = node::add(state.store.as_ref(), &spec, state.config.sync.release_rate).await?;
    Ok((StatusCode::CREATED, Json(view)).into_response())
}

type NodePath = V1Path<(String, String)>;

async fn show_node(State(state): State<SyncFamily>, V1Path((service, url)): NodePath) -> Result<Response, ApiError> {
    Ok(Json(node::view(state.store.as_ref(), &service, &url).await?).into_response())
}

async fn update_node(
    State(state): State<SyncFamily>,
    V1Path((service, url)): NodePath,
    V1Bytes(body): V1Bytes,
) -> Result<Response, ApiError> {
    let patch: NodePatch = json_body(&body)?;
    Ok(Json(node::update(state.store.as_ref(), &service, &url, &patch).await?).into_response())
}

async fn drain_node(State(state): State<SyncFamily>, V1Path((service, url)): NodePath) -> Result<Response, ApiError> {
    Ok(Json(node::drain(state.store.as_ref(), &service, &url).await?).into_response())
}

async fn unassign_node(
    State(state): State<SyncFamily>,
    V1Path((service, url)): NodePath,
) -> Result<Response, ApiError> {
    let unassigned = node::unassign(state.store.as_ref(), &service, &url).await?;
    Ok(Json(serde_json::json!({ "unassigned": unassigned })).into_response())
}

async fn remove_node(State(state): State<SyncFamily>, V1Path((service, url)): NodePath) -> Result<Response, ApiError> {
    let unassigned = node::remove(state.store.as_ref(), &service, &url).await?;
    Ok(Json(serde_json::json!({ "removed": url, "unassigned": unassigned })).into_response())
}

/// A JSON object's body, or 422 `invalid_body` saying what is wrong with it.
fn json_body<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    serde_json::from_slice(body)
        .map(|crate::http::json::Object(v)| v)
        .map_err(|e| ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, "invalid_body", e.to_string()))
}

type UserPath = V1Path<(String, String)>;

async fn show_user(State(state): State<SyncFamily>, V1Path((service, who)): UserPath) -> Result<Response, ApiError> {
    Ok(Json(user::show(state.store.as_ref(), &service, &UserRef::parse(&who)).await?).into_response())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AssignBody {
    node: String,
}

async fn assign_user(
    State(state): State<SyncFamily>,
    V1Path((service, who)): UserPath,
    V1Bytes(body): V1Bytes,
) -> Result<Response, ApiError> {
    let AssignBody { node } = json_body(&body)?;
    Ok(Json(user::assign(state.store.as_ref(), &service, &UserRef::parse(&who), &node).await?).into_response())
}

async fn list_buckets(State(state): State<SyncFamily>, V1Path(service): V1Path<String>) -> Result<Response, ApiError> {
    let buckets = state.config.sync.buckets;
    let assigned = bucket::list(state.store.as_ref(), buckets, &service).await?;
    Ok(Json(serde_json::json!({ "buckets": buckets, "assigned": assigned })).into_response())
}

async fn move_bucket(
    State(state): State<SyncFamily>,
    V1Path((service, which)): V1Path<(String, String)>,
    V1Bytes(body): V1Bytes,
) -> Result<Response, ApiError> {
    let which: i64 = which
        .parse()
        .map_err(|_| OpsError::Invalid("invalid_bucket", format!("bucket must be a whole number, not {which:?}")))?;
    let AssignBody { node } = json_body(&body)?;
    let n = bucket::move_to(state.store.as_ref(), state.config.sync.buckets, &service, which, &node).await?;
    Ok(Json(serde_json::json!({ "bucket": which, "node": node, "unassigned": n })).into_response())
}

#[derive(Deserialize)]
struct CountQuery {
    service: Option<String>,
    timestamp: Option<i64>,
}

async fn count_users(State(state): State<SyncFamily>, V1Query(q): V1Query<CountQuery>) -> Result<Response, ApiError> {
    Ok(Json(user::count(state.store.as_ref(), q.service.as_deref(), q.timestamp).await?).into_response())
}

/// Warnings returned by `POST /v1/account_events` at most (the summary counts them all).
const MAX_EVENT_WARNINGS: usize = 100;

async fn account_events(State(state): State<SyncFamily>, V1Bytes(body): V1Bytes) -> Result<Response, ApiError> {
    let services: Vec<&str> = state.config.sync.services();
    let mut warnings = Vec::new();
    let summary = account::replay(state.store.as_ref(), &services, &body[..], |line, message| {
        if warnings.len() < MAX_EVENT_WARNINGS {
            warnings.push(serde_json::json!({ "line": line, "message": message }));
        }
    })
    .await
    .map_err(|e| {
        tracing::error!(error = %e, "account events stopped");
        ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "database_unavailable", e)
    })?;
    Ok(Json(serde_json::json!({ "summary": summary, "warnings": warnings })).into_response())
}

/// `POST /v1/purge`: one pass, as `tokenserver purge` (every field optional).
#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
struct PurgeBody {
    grace_period_s: Option<u64>,
    batch_size: Option<u32>,
    max_records: Option<u64>,
    dry_run: bool,
    force: bool,
    range_start: Option<i64>,
    range_end: Option<i64>,
    retries: Option<u32>,
    retry_backoff_ms: Option<u64>,
}

async fn purge(State(state): State<SyncFamily>, V1Bytes(body): V1Bytes) -> Result<Response, ApiError> {
    let b: PurgeBody = if body.is_empty() { PurgeBody::default() } else { json_body(&body)? };
    if b.batch_size == Some(0) {
        return Err(OpsError::Invalid("invalid_body", "batch_size must be at least 1".into()).into());
    }
    let defaults = PurgeOptions::default();
    let opts = PurgeOptions {
        grace_period: b.grace_period_s.map_or(defaults.grace_period, std::time::Duration::from_secs),
        batch_size: b.batch_size.map_or(defaults.batch_size, i64::from),
        max_records: b.max_records.unwrap_or(0),
        dry_run: b.dry_run,
        force: b.force,
        uid_above: b.range_start,
        uid_below: b.range_end,
        retries: b.retries.unwrap_or(defaults.retries),
        retry_backoff: b.retry_backoff_ms.map_or(defaults.retry_backoff, std::time::Duration::from_millis),
        ..defaults
    };
    Ok(Json(state.purger.run(&opts, |_| {}).await?).into_response())
}
