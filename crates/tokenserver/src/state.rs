//! What every handler shares: the configuration, the stores, the flows and the keys. Built by
//! [`crate::app::build`]; the HTTP layer reads it and nothing here knows of HTTP.

use std::sync::Arc;

use metrics_exporter_prometheus::PrometheusHandle;
use tokenserver_auth::fxa::FxaVerifier;
use tokenserver_store::SyncStore;

use crate::config::Config;
use crate::sync::SyncTokens;

/// What the Sync family's handlers share (public listener, Sync operator routes).
#[derive(Clone)]
pub struct SyncFamily {
    /// Validated configuration.
    pub config: Arc<Config>,
    /// Sync node-assignment store.
    pub store: Arc<dyn SyncStore>,
    /// FxA verifier (OAuth tokens and SETs).
    pub verifier: Arc<FxaVerifier>,
    /// The Sync token flow.
    pub tokens: Arc<SyncTokens>,
    /// Purges old Sync records (`POST /v1/purge`, and the background job while this is held).
    pub purger: Arc<crate::ops::purge::Purger>,
}

/// Shared state of every handler.
#[derive(Clone)]
pub struct AppState {
    /// Validated configuration.
    pub config: Arc<Config>,
    /// The Sync family, when enabled (`sync.enabled`).
    pub sync: Option<SyncFamily>,
    /// Session tokens, when enabled.
    pub sessions: Option<Arc<crate::session::Sessions>>,
    /// The admin routes' key; `None`: they answer 403.
    pub admin_key: Option<crate::keys::BearerKey>,
    /// How the session routes are guarded.
    pub session_access: crate::keys::RouteAccess,
    /// Access tokens, when enabled.
    pub access: Option<Arc<crate::access::AccessTokens>>,
    /// How the v1 access-token routes are guarded.
    pub access_access: crate::keys::RouteAccess,
    /// Background jobs, stopped at shutdown.
    pub jobs: Arc<crate::jobs::Jobs>,
    /// Prometheus exporter, when this process installed one.
    pub metrics: Option<PrometheusHandle>,
}
