//! `GET /1.0/{application}/{version}`: the Sync token endpoint.

use axum::extract::rejection::PathRejection;
use axum::extract::{Path, RawQuery, State};
use axum::http::{header, HeaderMap, HeaderValue};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;

use crate::state::SyncFamily;
use crate::sync::TokenRequest;

/// Routes of this module.
pub fn router() -> Router<SyncFamily> {
    // Only GET is registered upstream: HEAD is a 405 there too (axum would route it to GET).
    Router::new().route(
        "/1.0/{application}/{version}",
        get(get_token).head(|| async { axum::http::StatusCode::METHOD_NOT_ALLOWED }),
    )
}

async fn get_token(
    State(state): State<SyncFamily>,
    path: Result<Path<(String, String)>, PathRejection>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
) -> Response {
    // A segment that does not decode (e.g. `%FF`) names no application: the flow still checks
    // the credentials first and then answers the catalogue's 404, never axum's plain-text 400.
    let (application, version) = path.map(|Path(p)| p).unwrap_or_default();
    let req = TokenRequest {
        authorization: headers.get(header::AUTHORIZATION).map(HeaderValue::as_bytes),
        key_id: headers.get("x-keyid").map(HeaderValue::as_bytes),
        client_state: headers.get("x-client-state").map(HeaderValue::as_bytes),
        application: &application,
        version: &version,
        query: query.as_deref(),
    };
    match state.tokens.issue(req).await {
        Ok(issued) => {
            metrics::counter!("tokenserver_token_requests_total", "status" => "200").increment(1);
            // One line per token is DEBUG: at INFO it is a large share of the endpoint's cost
            // (bench/results/tuning-notes.md); request counts are in the metrics.
            // MozLog's names (`syncserver:log` request lines), so existing log pipelines parse it.
            tracing::debug!(
                uri.method = "GET",
                uri.path = %format_args!("/1.0/{application}/{version}"),
                ua = headers.get(header::USER_AGENT).and_then(|v| v.to_str().ok()).unwrap_or_default(),
                token_type = "OAuth",
                uid = %issued.metrics_uid_full,
                metrics_uid = %issued.response.hashed_fxa_uid,
                first_seen_at = issued.first_seen_at,
                "token issued"
            );
            let body = serde_json::to_string(&issued.response).unwrap_or_default();
            (
                [
                    (header::CONTENT_TYPE, HeaderValue::from_static("application/json")),
                    (header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff")),
                    (header::HeaderName::from_static("x-timestamp"), HeaderValue::from(issued.timestamp)),
                ],
                body,
            )
                .into_response()
        }
        Err(e) => {
            let e = crate::http::error::SyncError::from(e);
            metrics::counter!("tokenserver_token_requests_total", "status" => e.http.as_str().to_owned()).increment(1);
            e.into_response()
        }
    }
}
