//! Node operations: add, list (with live user counts), update, drain, unassign and remove.
//! One implementation, used by the CLI (`tokenserver node …`) and the internal API (`/v1/nodes`).

use serde::{Deserialize, Serialize};
use tokenserver_store::sync::{NewNode, NodeChange, NodeRecord};
use tokenserver_store::{StoreError, SyncStore};

pub use super::OpsError;

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
    /// Users assigned to it now (rows not replaced).
    pub live_users: i64,
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
            live_users: 0,
        }
    }
}

/// Adds a node.
pub async fn add(store: &dyn SyncStore, spec: &NodeSpec, release_rate: f64) -> Result<NodeView, OpsError> {
    check_node_url(&spec.node).map_err(|m| OpsError::Invalid("invalid_node", m))?;
    if let Some(warning) = crate::config::loopback_node_warning(&spec.node) {
        tracing::warn!("{warning}");
    }
    if spec.capacity < 1 {
        return Err(OpsError::Invalid("invalid_node", "capacity must be at least 1".into()));
    }
    let available = spec.available.unwrap_or_else(|| ((spec.capacity as f64) * release_rate).ceil() as i64);
    if available < 0 || spec.current_load < 0 {
        return Err(OpsError::Invalid("invalid_node", "available and current_load must not be negative".into()));
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

/// Lists nodes, each with its live user count.
pub async fn list(store: &dyn SyncStore, service: Option<&str>) -> Result<Vec<NodeView>, OpsError> {
    let counts: std::collections::HashMap<i64, i64> =
        store.node_users().await?.into_iter().map(|c| (c.node_id, c.live)).collect();
    let views = store.list_nodes(service).await?.into_iter().map(NodeView::from);
    Ok(views.map(|v| NodeView { live_users: counts.get(&v.id).copied().unwrap_or(0), ..v }).collect())
}

/// Changes to a node as the CLI (`node update` flags) and the API (JSON body) take them; absent
/// fields are kept.
#[derive(Debug, Clone, Default, Deserialize, clap::Args)]
#[serde(deny_unknown_fields)]
pub struct NodePatch {
    /// Maximum number of users.
    #[serde(default)]
    #[arg(long, allow_negative_numbers = true, value_parser = clap::value_parser!(i64).range(1..))]
    pub capacity: Option<i64>,
    /// Slots available now.
    #[serde(default)]
    #[arg(long, allow_negative_numbers = true, value_parser = clap::value_parser!(i64).range(0..))]
    pub available: Option<i64>,
    /// Assignments counted.
    #[serde(default)]
    #[arg(long, allow_negative_numbers = true, value_parser = clap::value_parser!(i64).range(0..))]
    pub current_load: Option<i64>,
    /// Set (true) or clear (false) the downed flag.
    #[serde(default)]
    #[arg(long)]
    pub downed: Option<bool>,
    /// Set (true) or clear (false) the backoff flag.
    #[serde(default)]
    #[arg(long)]
    pub backoff: Option<bool>,
}

impl NodePatch {
    fn change(&self) -> Result<NodeChange, OpsError> {
        if self.capacity.is_some_and(|c| c < 1) {
            return Err(OpsError::Invalid("invalid_node", "capacity must be at least 1".into()));
        }
        if self.available.is_some_and(|n| n < 0) || self.current_load.is_some_and(|n| n < 0) {
            return Err(OpsError::Invalid("invalid_node", "available and current_load must not be negative".into()));
        }
        let change = NodeChange {
            capacity: self.capacity,
            available: self.available,
            current_load: self.current_load,
            downed: self.downed,
            backoff: self.backoff,
        };
        if change == NodeChange::default() {
            return Err(OpsError::Invalid(
                "invalid_node",
                "nothing to change: give capacity, available, current_load, downed or backoff".into(),
            ));
        }
        Ok(change)
    }
}

/// The node `url` of `service` as it is now.
pub async fn view(store: &dyn SyncStore, service: &str, url: &str) -> Result<NodeView, OpsError> {
    list(store, Some(service))
        .await?
        .into_iter()
        .find(|n| n.node == url)
        .ok_or_else(|| OpsError::Store(StoreError::NotFound(format!("node {url} of service {service}"))))
}

/// Applies `patch` to a node; returns it as it is afterwards.
pub async fn update(store: &dyn SyncStore, service: &str, url: &str, patch: &NodePatch) -> Result<NodeView, OpsError> {
    store.update_node(service, url, &patch.change()?).await?;
    view(store, service, url).await
}

/// Drains a node: no new users (`available = 0`, `backoff` set); its users keep it.
pub async fn drain(store: &dyn SyncStore, service: &str, url: &str) -> Result<NodeView, OpsError> {
    update(store, service, url, &NodePatch { available: Some(0), backoff: Some(true), ..NodePatch::default() }).await
}

/// Unassigns every user of a node (each is given a node again on its next request); how many.
pub async fn unassign(store: &dyn SyncStore, service: &str, url: &str) -> Result<u64, OpsError> {
    Ok(store.unassign_node(service, url, super::now_ms()).await?)
}

/// Deletes a node and unassigns its users; how many users were unassigned.
pub async fn remove(store: &dyn SyncStore, service: &str, url: &str) -> Result<u64, OpsError> {
    Ok(store.remove_node(service, url, super::now_ms()).await?)
}
