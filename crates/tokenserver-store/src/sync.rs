//! `SyncStore`: the node-assignment database of the Sync token protocol (Mozilla's schema).

use async_trait::async_trait;
use tokenserver_core::sync::allocation::NodeState;
use tokenserver_core::sync::users::UserRow;

use crate::StoreError;

/// Result alias for store calls.
pub type Result<T> = std::result::Result<T, StoreError>;

/// The account state a new assignment row starts with.
#[derive(Debug, Clone, PartialEq)]
pub struct Allocate<'a> {
    /// Service name, e.g. `sync-1.5`.
    pub service: &'a str,
    /// `<fxa_uid>@<domain>`.
    pub email: &'a str,
    /// Generation of the new row.
    pub generation: i64,
    /// Client state of the new row.
    pub client_state: &'a str,
    /// keys_changed_at of the new row.
    pub keys_changed_at: Option<i64>,
    /// The uid of the current row the caller saw (`None`: the user had no rows). If the current
    /// row is no longer this one, or no longer needs a node, the call fails with
    /// [`StoreError::Conflict`] and changes nothing.
    pub expected_current: Option<i64>,
    /// `created_at` of the new row, ms.
    pub now_ms: i64,
    /// Capacity release rate.
    pub release_rate: f64,
    /// Bucketed assignment: the user's bucket. The bucket's node takes the user (unless downed;
    /// a bucket without a node gets one by the policy, recorded for the next users).
    pub bucket: Option<i64>,
}

/// An [`Allocate`] that owns its strings, to cross into a task or thread of its own.
#[derive(Debug, Clone)]
pub(crate) struct OwnedAllocate {
    service: String,
    email: String,
    generation: i64,
    client_state: String,
    keys_changed_at: Option<i64>,
    expected_current: Option<i64>,
    now_ms: i64,
    release_rate: f64,
    bucket: Option<i64>,
}

impl OwnedAllocate {
    pub(crate) fn new(r: &Allocate<'_>) -> Self {
        Self {
            service: r.service.to_owned(),
            email: r.email.to_owned(),
            generation: r.generation,
            client_state: r.client_state.to_owned(),
            keys_changed_at: r.keys_changed_at,
            expected_current: r.expected_current,
            now_ms: r.now_ms,
            release_rate: r.release_rate,
            bucket: r.bucket,
        }
    }

    pub(crate) fn borrow(&self) -> Allocate<'_> {
        Allocate {
            service: &self.service,
            email: &self.email,
            generation: self.generation,
            client_state: &self.client_state,
            keys_changed_at: self.keys_changed_at,
            expected_current: self.expected_current,
            now_ms: self.now_ms,
            release_rate: self.release_rate,
            bucket: self.bucket,
        }
    }

    /// The service, for ordering a batch.
    pub(crate) fn service(&self) -> &str {
        &self.service
    }
}

/// A [`UserChange`] that owns its strings.
#[derive(Debug, Clone)]
pub(crate) struct OwnedUserChange {
    generation: i64,
    keys_changed_at: Option<i64>,
    /// `Some` for [`UserChange::NewClientState`], with the node.
    new_client_state: Option<(String, i64)>,
}

impl OwnedUserChange {
    pub(crate) fn new(c: &UserChange<'_>) -> Self {
        match c {
            UserChange::Update { generation, keys_changed_at } => {
                Self { generation: *generation, keys_changed_at: *keys_changed_at, new_client_state: None }
            }
            UserChange::NewClientState { generation, keys_changed_at, client_state, node_id } => Self {
                generation: *generation,
                keys_changed_at: *keys_changed_at,
                new_client_state: Some((client_state.to_string(), *node_id)),
            },
        }
    }

    pub(crate) fn borrow(&self) -> UserChange<'_> {
        let (generation, keys_changed_at) = (self.generation, self.keys_changed_at);
        match &self.new_client_state {
            None => UserChange::Update { generation, keys_changed_at },
            Some((client_state, node_id)) => {
                UserChange::NewClientState { generation, keys_changed_at, client_state, node_id: *node_id }
            }
        }
    }
}

/// A change to a user's current row, applied only if it is still current.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UserChange<'a> {
    /// Update generation / keys_changed_at in place (Mozilla's `put_user`, with its guards).
    Update {
        /// New generation.
        generation: i64,
        /// New keys_changed_at.
        keys_changed_at: Option<i64>,
    },
    /// Insert a row with a new client state on the same node, and mark every other live row of
    /// the user replaced at `now_ms`.
    NewClientState {
        /// New generation.
        generation: i64,
        /// New keys_changed_at.
        keys_changed_at: Option<i64>,
        /// New client state.
        client_state: &'a str,
        /// The node of the current row.
        node_id: i64,
    },
}

/// A node row with its service name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeRecord {
    /// Service name.
    pub service: String,
    /// Node columns.
    pub state: NodeState,
}

/// A node to insert.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewNode<'a> {
    /// Service name.
    pub service: &'a str,
    /// Node URL (≤ 64 chars).
    pub node: &'a str,
    /// Maximum users.
    pub capacity: i64,
    /// Slots available right away.
    pub available: i64,
    /// Initial load.
    pub current_load: i64,
    /// Downed flag.
    pub downed: bool,
    /// Backoff flag.
    pub backoff: bool,
}

/// Changes to a node's columns; `None` leaves one as it is.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NodeChange {
    /// Maximum users.
    pub capacity: Option<i64>,
    /// Slots available before capacity is released again.
    pub available: Option<i64>,
    /// Assignments made.
    pub current_load: Option<i64>,
    /// Downed flag (set or clear).
    pub downed: Option<bool>,
    /// Backoff flag (set or clear).
    pub backoff: Option<bool>,
}

/// Live (not replaced) users of one node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NodeUsers {
    /// `nodes.id`.
    pub node_id: i64,
    /// Rows with this node and no `replaced_at`.
    pub live: i64,
}

/// Which replaced rows [`SyncStore::old_records`] returns: those of `service` replaced before
/// `replaced_before`, with uid strictly between `uid_above` and `uid_below` (Mozilla's
/// `--range_start` / `--range_end`), after the cursor `after`, oldest `replaced_at` first.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OldRecordsQuery<'a> {
    /// Service name.
    pub service: &'a str,
    /// Rows with `replaced_at` strictly before this, ms.
    pub replaced_before: i64,
    /// Exclusive lower uid bound.
    pub uid_above: Option<i64>,
    /// Exclusive upper uid bound.
    pub uid_below: Option<i64>,
    /// `(replaced_at, uid)` of the last row of the previous page: rows after it only.
    pub after: Option<(i64, i64)>,
    /// At most this many rows.
    pub limit: i64,
}

/// A replaced `users` row, with what purging it needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OldRecord {
    /// `users.uid`.
    pub uid: i64,
    /// `<fxa_uid>@<domain>`.
    pub email: String,
    /// Generation.
    pub generation: i64,
    /// keys_changed_at.
    pub keys_changed_at: Option<i64>,
    /// Client state (hex).
    pub client_state: String,
    /// The node's URL; `None` when the node was removed.
    pub node: Option<String>,
    /// The node's downed flag (false when it was removed).
    pub downed: bool,
    /// created_at, ms.
    pub created_at: i64,
    /// replaced_at, ms.
    pub replaced_at: i64,
}

/// A connection pool as it stands, for the metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PoolState {
    /// Connections open.
    pub open: u32,
    /// Of those, idle.
    pub idle: u32,
    /// The most it opens.
    pub max: u32,
}

/// A bucket and the node it is assigned to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BucketRecord {
    /// The bucket.
    pub bucket: i64,
    /// Its node's URL; `None` when that node was removed (the bucket gets a new one on its next
    /// allocation).
    pub node: Option<String>,
}

/// What `migrate` did.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct MigrationReport {
    /// Versions applied by this call.
    pub applied: Vec<String>,
}

/// The Sync node-assignment store. Implementations make each method atomic.
#[async_trait]
pub trait SyncStore: Send + Sync + 'static {
    /// Creates or upgrades the schema; a no-op on an up-to-date database.
    async fn migrate(&self) -> Result<MigrationReport>;

    /// Cheap liveness check: one round trip on the connections reads use.
    async fn check(&self) -> Result<()>;

    /// A write could run now: a write connection (SQLite: the write lock, through the writer's
    /// queue) is had and answers a round trip. Callers bound how long they wait.
    async fn check_write(&self) -> Result<()>;

    /// Up to 20 newest rows of a user, newest `created_at` first, then highest `uid`, joined with
    /// their node. One indexed read.
    async fn user_rows(&self, service: &str, email: &str) -> Result<Vec<UserRow>>;

    /// Atomically: checks that the user's current row is still `expected_current` (and, if one,
    /// that it still needs a node), picks a node by the allocation policy (releasing capacity as
    /// needed), bumps its load and inserts the new current row. Returns the new row.
    async fn allocate_user(&self, req: &Allocate<'_>) -> Result<UserRow>;

    /// Atomically applies `change` if `expected_current` is still the user's live current row,
    /// else fails with [`StoreError::Conflict`]. Returns the uid of the row now current.
    async fn change_user(
        &self,
        service: &str,
        email: &str,
        expected_current: i64,
        change: &UserChange<'_>,
        now_ms: i64,
    ) -> Result<i64>;

    /// Race recovery: marks the given older rows replaced at `replaced_at` if they are still live.
    async fn replace_rows(&self, service: &str, uids: &[i64], replaced_at: i64) -> Result<()>;

    /// FxA delete-user: sets `generation = MAX_GENERATION, replaced_at = now` on live rows.
    async fn retire_user(&self, service: &str, email: &str, now_ms: i64) -> Result<u64>;

    /// FxA password-change: raises generation / keys_changed_at on the live rows, never lowering.
    async fn update_user_generation(
        &self,
        service: &str,
        email: &str,
        generation: Option<i64>,
        keys_changed_at: Option<i64>,
    ) -> Result<u64>;

    /// Inserts a node; [`StoreError::AlreadyExists`] if (service, node) exists.
    async fn add_node(&self, node: &NewNode<'_>) -> Result<NodeRecord>;

    /// Inserts a node with `available = capacity` unless one with that URL exists (Mozilla's
    /// `init_node_url`). Returns true when a row was added.
    async fn init_node(&self, service: &str, node: &str, capacity: i64) -> Result<bool>;

    /// All nodes, optionally of one service, by id.
    async fn list_nodes(&self, service: Option<&str>) -> Result<Vec<NodeRecord>>;

    /// Applies `change` to the node `node` of `service`; [`StoreError::NotFound`] if there is none.
    async fn update_node(&self, service: &str, node: &str, change: &NodeChange) -> Result<()>;

    /// Marks every live user of the node replaced at `now_ms` (they are allocated a node again
    /// on their next request, keeping their account state). Returns how many;
    /// [`StoreError::NotFound`] if there is no such node.
    async fn unassign_node(&self, service: &str, node: &str, now_ms: i64) -> Result<u64>;

    /// Unassigns the node's users (as [`Self::unassign_node`]) and deletes the node, atomically.
    /// Returns how many users were unassigned.
    async fn remove_node(&self, service: &str, node: &str, now_ms: i64) -> Result<u64>;

    /// Live users per node (nodes without any are absent). A scan of the users table: an
    /// operator's call, not the request path's.
    async fn node_users(&self) -> Result<Vec<NodeUsers>>;

    /// The email of the row `uid` of `service`, if there is one.
    async fn user_email(&self, service: &str, uid: i64) -> Result<Option<String>>;

    /// Atomically puts the user on the node `node` (an operator's choice: capacity and flags are
    /// not checked, the node's load is bumped): a new current row on it carrying the current
    /// row's generation, client state and keys_changed_at (a new user starts at generation 0,
    /// empty client state), every other live row replaced at `now_ms`. Already live on that node:
    /// nothing changes. Returns the current row; [`StoreError::NotFound`] for an unknown node.
    async fn assign_user(&self, service: &str, email: &str, node: &str, now_ms: i64) -> Result<UserRow>;

    /// Live rows (`replaced_at IS NULL`) created at or before `created_before` ms, of one service
    /// or of all (Mozilla's `count_users`).
    async fn count_users(&self, service: Option<&str>, created_before: i64) -> Result<i64>;

    /// A page of replaced rows for purging (see [`OldRecordsQuery`]). One indexed range read.
    async fn old_records(&self, query: &OldRecordsQuery<'_>) -> Result<Vec<OldRecord>>;

    /// Deletes the row `uid` of `service`, atomically freeing the user's slot on its node when
    /// no other row of the user is on that node (`current_load - 1` floored at 0, `available + 1`
    /// up to what capacity leaves). Returns whether a row was deleted.
    async fn delete_user_record(&self, service: &str, uid: i64) -> Result<bool>;

    /// Sets `replaced_at = now_ms` on the replaced row `uid` (a purge that failed for it tries
    /// again after another grace period).
    async fn bump_replaced_at(&self, service: &str, uid: i64, now_ms: i64) -> Result<()>;

    /// Creates the bucket table if missing (`tokenserver_buckets`, outside Mozilla's schema and
    /// its migration bookkeeping: only deployments that turn buckets on have it).
    async fn enable_buckets(&self) -> Result<()>;

    /// The buckets of `service` that have a node, by bucket.
    async fn buckets(&self, service: &str) -> Result<Vec<BucketRecord>>;

    /// Atomically assigns `bucket` (of `total`) to the node `node` and unassigns the bucket's live
    /// users on other nodes (replaced at `now_ms`: they are given the bucket's node on their next
    /// request). Returns how many; [`StoreError::NotFound`] for an unknown node.
    async fn move_bucket(&self, service: &str, bucket: i64, total: i64, node: &str, now_ms: i64) -> Result<u64>;

    /// The write pool's state, where there is one (PostgreSQL, MySQL; SQLite writes through one
    /// connection and has none).
    fn pool_state(&self) -> Option<PoolState> {
        None
    }

    /// Inserts the service row if missing (by name). Returns its id.
    async fn ensure_service(&self, service: &str, pattern: &str) -> Result<i64>;

    /// The generated secret kept under `name` (`master_secret`, `admin_key`, …), created with
    /// `generate` on first call: the secret and whether it was just created. `None` when the
    /// backend keeps no generated secrets (Mozilla's PostgreSQL and MySQL schemas have nowhere
    /// to put them: such deployments configure every secret).
    async fn generated_secret(
        &self,
        name: &str,
        generate: &(dyn Fn() -> String + Send + Sync),
    ) -> Result<Option<(String, bool)>>;

    /// Appends `fresh` to the generated secrets kept under `name` (one per line, newest last;
    /// the first when there are none) and returns the list. `None` when the backend keeps no
    /// generated secrets.
    async fn add_generated_secret(&self, name: &str, fresh: &str) -> Result<Option<Vec<String>>> {
        let _ = (name, fresh);
        Ok(None)
    }
}

/// The record of a node just inserted with `id`.
pub(crate) fn node_record(node: &NewNode<'_>, id: i64) -> NodeRecord {
    NodeRecord {
        service: node.service.to_string(),
        state: NodeState {
            id,
            node: node.node.to_string(),
            available: node.available,
            current_load: node.current_load,
            capacity: node.capacity,
            downed: i64::from(node.downed),
            backoff: i64::from(node.backoff),
        },
    }
}
