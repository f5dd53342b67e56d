//! The Sync read-modify-writes, written once over [`SyncTx`]: each backend supplies the SQL of
//! the steps and the locking that makes the whole transaction atomic (SQLite: one serialized
//! writer; PostgreSQL and MySQL: `SELECT … FOR UPDATE` on the service's nodes and on the user's
//! rows, in that order everywhere, so concurrent calls cannot deadlock).

use async_trait::async_trait;
use tokenserver_core::sync::allocation::{choose_node, released_available, NodeState, MAX_RELEASE_ROUNDS};
use tokenserver_core::sync::users::{resolve, Status, UserRow};

use crate::sync::{Allocate, Result, UserChange};
use crate::StoreError;

/// A new `users` row.
#[derive(Debug, Clone, Copy)]
pub(crate) struct NewUser<'a> {
    pub service_id: i64,
    pub email: &'a str,
    pub generation: i64,
    pub client_state: &'a str,
    pub created_at: i64,
    pub node_id: i64,
    pub keys_changed_at: Option<i64>,
}

/// The steps of a Sync write transaction.
#[async_trait]
pub(crate) trait SyncTx: Send {
    /// `services.id` of a service name.
    async fn service_id(&mut self, service: &str) -> Result<Option<i64>>;
    /// Locks the user's rows against concurrent writers (no-op where writes are serialized).
    async fn lock_user(&mut self, service_id: i64, email: &str) -> Result<()>;
    /// The user's rows, as `SyncStore::user_rows` reads them.
    async fn user_rows(&mut self, service: &str, email: &str) -> Result<Vec<UserRow>>;
    /// The service's nodes by id, locked against concurrent allocations.
    async fn lock_nodes(&mut self, service_id: i64) -> Result<Vec<NodeState>>;
    /// `UPDATE nodes SET available = ? WHERE id = ?`.
    async fn set_available(&mut self, node_id: i64, available: i64) -> Result<()>;
    /// `current_load + n`, `available - n` (floor 0).
    async fn add_users_to_node(&mut self, node_id: i64, n: i64) -> Result<()>;
    /// Inserts a row; returns its uid.
    async fn insert_user(&mut self, user: NewUser<'_>) -> Result<i64>;
    /// Locks the rows of each of `emails` ([`Self::lock_user`] of each, unless overridden by one
    /// statement).
    async fn lock_users(&mut self, service_id: i64, emails: &[&str]) -> Result<()> {
        for email in emails {
            self.lock_user(service_id, email).await?;
        }
        Ok(())
    }
    /// The rows of each of `emails`, in order ([`Self::user_rows`] of each, unless overridden).
    async fn users_rows(&mut self, service: &str, emails: &[&str]) -> Result<Vec<Vec<UserRow>>> {
        let mut all = Vec::with_capacity(emails.len());
        for email in emails {
            all.push(self.user_rows(service, email).await?);
        }
        Ok(all)
    }
    /// Inserts rows; their uids, in order ([`Self::insert_user`] of each, unless overridden).
    async fn insert_users(&mut self, users: &[NewUser<'_>]) -> Result<Vec<i64>> {
        let mut uids = Vec::with_capacity(users.len());
        for user in users {
            uids.push(self.insert_user(*user).await?);
        }
        Ok(uids)
    }
    /// Mozilla's guarded `put_user`.
    async fn put_user(&mut self, service_id: i64, email: &str, generation: i64, kca: Option<i64>) -> Result<()>;
    /// Marks every other live row of the user replaced.
    async fn replace_others(&mut self, service_id: i64, email: &str, keep_uid: i64, now_ms: i64) -> Result<()>;
    /// The email and node id of one row.
    async fn record_of(&mut self, service_id: i64, uid: i64) -> Result<Option<(String, Option<i64>)>>;
    /// `current_load - 1` floored at 0, `available + 1` up to what capacity leaves.
    async fn free_slot(&mut self, node_id: i64) -> Result<()>;
    /// Deletes one row; whether it existed.
    async fn delete_row(&mut self, service_id: i64, uid: i64) -> Result<bool>;
    /// The node a bucket is assigned to.
    async fn bucket_node(&mut self, service_id: i64, bucket: i64) -> Result<Option<i64>>;
    /// Assigns a bucket to a node (insert or replace).
    async fn set_bucket_node(&mut self, service_id: i64, bucket: i64, node_id: i64) -> Result<()>;
    /// (uid, email, node id) of every live row of the service.
    async fn live_rows(&mut self, service_id: i64) -> Result<Vec<(i64, String, i64)>>;
    /// Marks one live row replaced.
    async fn replace_uid(&mut self, service_id: i64, uid: i64, now_ms: i64) -> Result<()>;
}

async fn service_id(tx: &mut impl SyncTx, service: &str) -> Result<i64> {
    tx.service_id(service).await?.ok_or_else(|| StoreError::UnknownService(service.to_string()))
}

/// Picks one of the (locked) `nodes` by the policy, releasing capacity in up to
/// [`MAX_RELEASE_ROUNDS`] rounds.
async fn pick_node(tx: &mut impl SyncTx, nodes: &mut [NodeState], rate: f64) -> Result<NodeState> {
    for _ in 0..MAX_RELEASE_ROUNDS {
        if let Some(node) = choose_node(nodes) {
            return Ok(node.clone());
        }
        let mut released = false;
        for node in nodes.iter_mut() {
            if let Some(available) = released_available(node, rate) {
                tx.set_available(node.id, available).await?;
                node.available = available;
                released = true;
            }
        }
        if !released {
            break;
        }
    }
    choose_node(nodes).cloned().ok_or(StoreError::NoNodeAvailable)
}

/// `SyncStore::allocate_user`, inside the caller's transaction.
pub(crate) async fn allocate(tx: &mut impl SyncTx, req: &Allocate<'_>) -> Result<UserRow> {
    let service_id = service_id(tx, req.service).await?;
    // Nodes first, then the user: the one lock order of every write.
    let mut nodes = tx.lock_nodes(service_id).await?;
    allocate_locked(tx, req, service_id, &mut nodes).await
}

/// An allocation once the service's nodes are locked; `nodes` is kept equal to their rows.
async fn allocate_locked(
    tx: &mut impl SyncTx,
    req: &Allocate<'_>,
    service_id: i64,
    nodes: &mut [NodeState],
) -> Result<UserRow> {
    tx.lock_user(service_id, req.email).await?;
    let rows = tx.user_rows(req.service, req.email).await?;
    let still_expected = match (req.expected_current, resolve(&rows)) {
        (None, None) => true,
        (Some(uid), Some(r)) => r.current.uid == uid && r.status == Status::NeedsNode,
        _ => false,
    };
    if !still_expected {
        return Err(StoreError::Conflict);
    }
    let node = match req.bucket {
        None => pick_node(tx, nodes, req.release_rate).await?,
        Some(bucket) => {
            let mapped = tx.bucket_node(service_id, bucket).await?;
            // The bucket's node, whatever its load; a downed or removed one gives way.
            match mapped.and_then(|id| nodes.iter().find(|n| n.id == id && n.downed == 0)) {
                Some(n) => n.clone(),
                None => {
                    let n = pick_node(tx, nodes, req.release_rate).await?;
                    tx.set_bucket_node(service_id, bucket, n.id).await?;
                    n
                }
            }
        }
    };
    tx.add_users_to_node(node.id, 1).await?;
    // As `add_users_to_node` changed the row.
    if let Some(n) = nodes.iter_mut().find(|n| n.id == node.id) {
        n.current_load += 1;
        n.available = (n.available - 1).max(0);
    }
    let uid = tx
        .insert_user(NewUser {
            service_id,
            email: req.email,
            generation: req.generation,
            client_state: req.client_state,
            created_at: req.now_ms,
            node_id: node.id,
            keys_changed_at: req.keys_changed_at,
        })
        .await?;
    Ok(UserRow {
        uid,
        node_id: Some(node.id),
        node: Some(node.node),
        generation: req.generation,
        keys_changed_at: req.keys_changed_at,
        client_state: req.client_state.to_string(),
        created_at: req.now_ms,
        replaced_at: None,
    })
}

/// Allocations of one batch in the caller's transaction, in order, each seeing the rows of the
/// ones before, as if run one after another. Per run of one service (callers sort by service):
/// its nodes are locked and read once, the batch's users are locked and read in one step each,
/// every call is decided in memory against those rows and the nodes, and the new rows go in with
/// one insert (MariaDB: a few, in pieces; MySQL: one a row), the nodes' counters with one update
/// per node. A conflict writes nothing, so it is that call's answer; any other error ends the
/// batch, and the caller rolls the transaction back. Batches with bucketed calls take the
/// one-by-one path ([`allocate_batch_each`]).
pub(crate) async fn allocate_batch(tx: &mut impl SyncTx, reqs: &[Allocate<'_>]) -> Result<Vec<Result<UserRow>>> {
    if reqs.iter().any(|r| r.bucket.is_some()) {
        return allocate_batch_each(tx, reqs).await;
    }
    let mut out: Vec<Result<UserRow>> = Vec::with_capacity(reqs.len());
    for run in reqs.chunk_by(|a, b| a.service == b.service) {
        let service = run[0].service;
        let service_id = service_id(tx, service).await?;
        let mut nodes = tx.lock_nodes(service_id).await?;
        let mut emails: Vec<&str> = run.iter().map(|r| r.email).collect();
        emails.sort_unstable();
        emails.dedup();
        tx.lock_users(service_id, &emails).await?;
        let read = tx.users_rows(service, &emails).await?;
        let mut rows: std::collections::HashMap<&str, Vec<UserRow>> = emails.iter().copied().zip(read).collect();
        // (index in `out`, the row) of every allocation made, and the users each node gained.
        let mut made: Vec<(usize, NewUser<'_>)> = Vec::new();
        let mut gained: Vec<(i64, i64)> = Vec::new();
        for req in run {
            let user_rows = rows.entry(req.email).or_default();
            let still_expected = match (req.expected_current, resolve(user_rows)) {
                (None, None) => true,
                (Some(uid), Some(r)) => r.current.uid == uid && r.status == Status::NeedsNode,
                _ => false,
            };
            if !still_expected {
                out.push(Err(StoreError::Conflict));
                continue;
            }
            let node = pick_node(tx, &mut nodes, req.release_rate).await?;
            // As `add_users_to_node` will change the row.
            if let Some(n) = nodes.iter_mut().find(|n| n.id == node.id) {
                n.current_load += 1;
                n.available = (n.available - 1).max(0);
            }
            match gained.iter_mut().find(|(id, _)| *id == node.id) {
                Some((_, n)) => *n += 1,
                None => gained.push((node.id, 1)),
            }
            let row = UserRow {
                uid: 0,
                node_id: Some(node.id),
                node: Some(node.node),
                generation: req.generation,
                keys_changed_at: req.keys_changed_at,
                client_state: req.client_state.to_string(),
                created_at: req.now_ms,
                replaced_at: None,
            };
            // A later call for the same user sees this row (its uid is not known yet, and need
            // not be: no expectation names a row this batch makes).
            user_rows.insert(0, row.clone());
            made.push((
                out.len(),
                NewUser {
                    service_id,
                    email: req.email,
                    generation: req.generation,
                    client_state: req.client_state,
                    created_at: req.now_ms,
                    node_id: node.id,
                    keys_changed_at: req.keys_changed_at,
                },
            ));
            out.push(Ok(row));
        }
        let news: Vec<NewUser<'_>> = made.iter().map(|(_, u)| *u).collect();
        let uids = tx.insert_users(&news).await?;
        if uids.len() != made.len() {
            return Err(StoreError::Backend(format!("{} users inserted, {} asked", uids.len(), made.len())));
        }
        for ((at, _), uid) in made.iter().zip(uids) {
            if let Some(Ok(row)) = out.get_mut(*at) {
                row.uid = uid;
            }
        }
        for (node_id, n) in gained {
            tx.add_users_to_node(node_id, n).await?;
        }
    }
    Ok(out)
}

/// [`allocate_batch`] one call after another, each with its own statements (bucketed calls read
/// and assign their bucket's node as they go).
async fn allocate_batch_each(tx: &mut impl SyncTx, reqs: &[Allocate<'_>]) -> Result<Vec<Result<UserRow>>> {
    let mut out = Vec::with_capacity(reqs.len());
    let mut locked: Option<(&str, i64, Vec<NodeState>)> = None;
    for req in reqs {
        if !matches!(&locked, Some((service, ..)) if *service == req.service) {
            let id = service_id(tx, req.service).await?;
            let nodes = tx.lock_nodes(id).await?;
            locked = Some((req.service, id, nodes));
        }
        let Some((_, id, nodes)) = locked.as_mut() else {
            return Err(StoreError::Backend("allocation batch lost its locked nodes".into()));
        };
        match allocate_locked(tx, req, *id, nodes).await {
            Err(StoreError::Conflict) => out.push(Err(StoreError::Conflict)),
            other => out.push(Ok(other?)),
        }
    }
    Ok(out)
}

/// `SyncStore::change_user`, inside the caller's transaction.
pub(crate) async fn change(
    tx: &mut impl SyncTx,
    service: &str,
    email: &str,
    expected_current: i64,
    change: &UserChange<'_>,
    now_ms: i64,
) -> Result<i64> {
    let service_id = service_id(tx, service).await?;
    tx.lock_user(service_id, email).await?;
    let rows = tx.user_rows(service, email).await?;
    match resolve(&rows) {
        Some(r) if r.current.uid == expected_current && r.status == Status::Assigned => {}
        _ => return Err(StoreError::Conflict),
    }
    match change {
        UserChange::Update { generation, keys_changed_at } => {
            tx.put_user(service_id, email, *generation, *keys_changed_at).await?;
            Ok(expected_current)
        }
        UserChange::NewClientState { generation, keys_changed_at, client_state, node_id } => {
            let uid = tx
                .insert_user(NewUser {
                    service_id,
                    email,
                    generation: *generation,
                    client_state,
                    created_at: now_ms,
                    node_id: *node_id,
                    keys_changed_at: *keys_changed_at,
                })
                .await?;
            tx.replace_others(service_id, email, uid, now_ms).await?;
            Ok(uid)
        }
    }
}

/// `SyncStore::assign_user`, inside the caller's transaction.
pub(crate) async fn assign(
    tx: &mut impl SyncTx,
    service: &str,
    email: &str,
    node_url: &str,
    now_ms: i64,
) -> Result<UserRow> {
    let service_id = service_id(tx, service).await?;
    let node = tx
        .lock_nodes(service_id)
        .await?
        .into_iter()
        .find(|n| n.node == node_url)
        .ok_or_else(|| StoreError::NotFound(format!("node {node_url} of service {service}")))?;
    tx.lock_user(service_id, email).await?;
    let rows = tx.user_rows(service, email).await?;
    let current = resolve(&rows).map(|r| r.current);
    if let Some(c) = &current {
        if c.node_id == Some(node.id) && c.replaced_at.is_none() {
            return Ok(c.clone());
        }
    }
    let (generation, client_state, keys_changed_at) =
        current.map_or((0, String::new(), None), |c| (c.generation, c.client_state, c.keys_changed_at));
    let uid = tx
        .insert_user(NewUser {
            service_id,
            email,
            generation,
            client_state: &client_state,
            created_at: now_ms,
            node_id: node.id,
            keys_changed_at,
        })
        .await?;
    tx.replace_others(service_id, email, uid, now_ms).await?;
    tx.add_users_to_node(node.id, 1).await?;
    Ok(UserRow {
        uid,
        node_id: Some(node.id),
        node: Some(node.node),
        generation,
        keys_changed_at,
        client_state,
        created_at: now_ms,
        replaced_at: None,
    })
}

/// `SyncStore::delete_user_record`, inside the caller's transaction. Locks in the one order
/// (the service's nodes, then the user's rows), so it cannot deadlock with an allocation.
pub(crate) async fn delete_record(tx: &mut impl SyncTx, service: &str, uid: i64) -> Result<bool> {
    let Some(service_id) = tx.service_id(service).await? else {
        return Ok(false);
    };
    tx.lock_nodes(service_id).await?;
    let Some((email, node_id)) = tx.record_of(service_id, uid).await? else {
        return Ok(false);
    };
    tx.lock_user(service_id, &email).await?;
    let rows = tx.user_rows(service, &email).await?;
    // The user took one slot on the node when first put there: it is free once no row of the
    // user points there any more (Mozilla frees one per deleted row, so load drifts below zero).
    let still_there = rows.iter().any(|r| r.uid != uid && r.node_id == node_id);
    if let (Some(node_id), false) = (node_id, still_there) {
        tx.free_slot(node_id).await?;
    }
    tx.delete_row(service_id, uid).await
}

/// `SyncStore::move_bucket`, inside the caller's transaction (nodes locked first, as everywhere).
pub(crate) async fn move_bucket(
    tx: &mut impl SyncTx,
    service: &str,
    bucket: i64,
    total: i64,
    node_url: &str,
    now_ms: i64,
) -> Result<u64> {
    let service_id = service_id(tx, service).await?;
    let nodes = tx.lock_nodes(service_id).await?;
    let node = nodes
        .iter()
        .find(|n| n.node == node_url)
        .ok_or_else(|| StoreError::NotFound(format!("node {node_url} of service {service}")))?;
    tx.set_bucket_node(service_id, bucket, node.id).await?;
    let mut moved = 0;
    for (uid, email, node_id) in tx.live_rows(service_id).await? {
        if node_id != node.id && tokenserver_core::sync::buckets::bucket_of(&email, total) == bucket {
            tx.replace_uid(service_id, uid, now_ms).await?;
            moved += 1;
        }
    }
    Ok(moved)
}
