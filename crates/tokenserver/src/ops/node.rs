//! Node operations: add and list.

use serde::{Deserialize, Serialize};
use tokenserver_store::sync::{NewNode, NodeRecord};
use tokenserver_store::{StoreError, SyncStore};

use crate::config::check_node_url;

/// A node to add, as the CLI and the API take it.
#[derive(Debug, Clone, Deserialize)]
pub struct NodeSpec {
    /// Node URL.
    pub node: String,
    /// Maximum users.
    pub capacity: i64,
    /// Slots available now; default `ceil(capacity * release_rate)` as Mozilla's `add_node.py`.
    #[serde(default)]
    pub available: Option<i64>,
    /// Initial load.
    #[serde(default)]
    pub current_load: i64,
    /// Take no new users and release no capacity.
    #[serde(default)]
    pub downed: bool,
    /// Take no new users.
    #[serde(default)]
    pub backoff: bool,
    /// Service; default `sync-1.5`.
    #[serde(default)]
    pub service: Option<String>,
}

/// A node as shown to operators.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct NodeView {
    /// `nodes.id`.
    pub id: i64,
    /// Service name.
    pub service: String,
    /// URL.
    pub node: String,
    /// Slots available before capacity is released again.
    pub available: i64,
    /// Assignments made.
    pub current_load: i64,
    /// Maximum users.
    pub capacity: i64,
    /// Downed flag.
    pub downed: bool,
    /// Backoff flag.
    pub backoff: bool,
}

impl From<NodeRecord> for NodeView {
    fn from(r: NodeRecord) -> Self {
        Self {
            id: r.state.id,
            service: r.service,
            node: r.state.node,
            available: r.state.available,
            current_load: r.state.current_load,
            capacity: r.state.capacity,
            downed: r.state.downed != 0,
            backoff: r.state.backoff != 0,
        }
    }
}

/// Why an operation failed.
#[derive(Debug, thiserror::Error)]
pub enum OpsError {
    /// Bad input from the operator.
    #[error("{0}")]
    Invalid(String),
    /// The store refused.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Adds a node.
pub async fn add(store: &dyn SyncStore, spec: &NodeSpec, release_rate: f64) -> Result<NodeView, OpsError> {
    check_node_url(&spec.node).map_err(OpsError::Invalid)?;
    if spec.capacity < 1 {
        return Err(OpsError::Invalid("capacity must be at least 1".into()));
    }
    let available = spec.available.unwrap_or_else(|| ((spec.capacity as f64) * release_rate).ceil() as i64);
    if available < 0 || spec.current_load < 0 {
        return Err(OpsError::Invalid("available and current_load must not be negative".into()));
    }
    let service = spec.service.as_deref().unwrap_or("sync-1.5");
    let record = store
        .add_node(&NewNode {
            service,
            node: &spec.node,
            capacity: spec.capacity,
            available,
            current_load: spec.current_load,
            downed: spec.downed,
            backoff: spec.backoff,
        })
        .await?;
    Ok(record.into())
}

/// Lists nodes.
pub async fn list(store: &dyn SyncStore, service: Option<&str>) -> Result<Vec<NodeView>, OpsError> {
    Ok(store.list_nodes(service).await?.into_iter().map(NodeView::from).collect())
}
