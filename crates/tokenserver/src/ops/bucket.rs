//! Bucketed assignment operations: list the buckets' nodes, move a bucket to another node. Used
//! by `tokenserver bucket …` and `/v1/services/{service}/buckets…`.

use serde::Serialize;
use tokenserver_store::SyncStore;

use super::OpsError;

/// One bucket and its node.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct BucketView {
    /// The bucket, `0 ≤ bucket < buckets`.
    pub bucket: i64,
    /// Its node; `null` when that node was removed (a new one is chosen on its next allocation).
    pub node: Option<String>,
}

/// The configured bucket count, or why the operation makes no sense.
fn total(buckets: Option<i64>) -> Result<i64, OpsError> {
    buckets
        .ok_or_else(|| OpsError::Invalid("buckets_off", "bucketed assignment is off (set tokenserver.buckets)".into()))
}

/// The buckets of `service` that have a node (the others get one with their first user).
pub async fn list(store: &dyn SyncStore, buckets: Option<i64>, service: &str) -> Result<Vec<BucketView>, OpsError> {
    total(buckets)?;
    store.enable_buckets().await?;
    let rows = store.buckets(service).await?;
    Ok(rows.into_iter().map(|r| BucketView { bucket: r.bucket, node: r.node }).collect())
}

/// Assigns `bucket` to `node`; its users on other nodes are given `node` on their next request.
/// Returns how many were unassigned.
pub async fn move_to(
    store: &dyn SyncStore,
    buckets: Option<i64>,
    service: &str,
    bucket: i64,
    node: &str,
) -> Result<u64, OpsError> {
    let total = total(buckets)?;
    if !(0..total).contains(&bucket) {
        return Err(OpsError::Invalid("invalid_bucket", format!("bucket must be in 0..{total}")));
    }
    store.enable_buckets().await?;
    Ok(store.move_bucket(service, bucket, total, node, super::now_ms()).await?)
}
