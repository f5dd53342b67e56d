//! `POST /1.0/webhooks/fxa/events`: FxA security event tokens (spec §1.8).
//!
//! The SET is verified (RS256, `aud`, `iss`, `exp` if present); `delete-user` retires the account
//! and `password-change` raises its generation to `changeTime - 1`, so the first client presenting
//! the new generation passes. Events apply to every configured application. The body is ignored.

use axum::extract::State;
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::Router;

use crate::http::error::SyncError;
use crate::ops::account;
use crate::state::SyncFamily;
use crate::sync::bearer_token;

const DELETE_USER: &str = "https://schemas.accounts.firefox.com/event/delete-user";
const PASSWORD_CHANGE: &str = "https://schemas.accounts.firefox.com/event/password-change";

/// Routes of this module.
pub fn router() -> Router<SyncFamily> {
    Router::new().route("/1.0/webhooks/fxa/events", post(handle_fxa_events))
}

async fn handle_fxa_events(State(state): State<SyncFamily>, headers: HeaderMap) -> Response {
    match process(&state, &headers).await {
        Ok(()) => StatusCode::OK.into_response(),
        Err(e) => e.into_response(),
    }
}

async fn process(state: &SyncFamily, headers: &HeaderMap) -> Result<(), SyncError> {
    let token = bearer_token(headers.get(header::AUTHORIZATION).map(HeaderValue::as_bytes)).map_err(SyncError::from)?;
    let claims = state.verifier.verify_set(token).await.map_err(|e| {
        tracing::info!(reason = %e, "webhook SET refused");
        SyncError::invalid_credentials()
    })?;
    let Some(events) = claims.events.as_object() else {
        return Ok(());
    };
    metrics::counter!("tokenserver_webhook_events_received_total").increment(events.len() as u64);
    if state.config.webhook.metrics_only {
        return Ok(());
    }
    let email = format!("{}@{}", claims.sub, state.config.sync.email_domain);
    let services: Vec<&str> = state.config.sync.services();
    let store = state.store.as_ref();
    for (event, data) in events {
        match event.as_str() {
            DELETE_USER => {
                account::retire(store, &services, &email, crate::ops::now_ms())
                    .await
                    .map_err(|e| SyncError::from(&e))?;
                metrics::counter!("tokenserver_webhook_events_processed_total", "event_type" => "delete_user")
                    .increment(1);
            }
            PASSWORD_CHANGE => {
                let Some(change_time) = data.get("changeTime").and_then(serde_json::Value::as_i64) else {
                    continue;
                };
                account::raise_generation(store, &services, &email, change_time.saturating_sub(1))
                    .await
                    .map_err(|e| SyncError::from(&e))?;
                metrics::counter!("tokenserver_webhook_events_processed_total", "event_type" => "password_change")
                    .increment(1);
            }
            other => tracing::info!(event = other, "ignoring unknown FxA event"),
        }
    }
    Ok(())
}
