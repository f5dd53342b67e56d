//! One conformance suite, run against every backend: each case is a plain async function over
//! `&dyn SyncStore`, stamped out as `sync::<backend>::<case>` (`cargo test postgres` runs one
//! backend). Backends whose URL variable is unset are skipped with a printed notice.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod schema;
mod session;
mod sqlite_rows;
mod sync;

use std::sync::Arc;

use tokenserver_store::testing::{fresh, FreshDb};
use tokenserver_store::{Backend, PoolSettings, SyncStore};

/// A migrated store on a fresh database.
pub async fn open(backend: Backend) -> Option<(Arc<dyn SyncStore>, FreshDb)> {
    let db = fresh(backend).await?;
    let store = tokenserver_store::open_sync(&db.url, &PoolSettings::default()).await.unwrap();
    store.migrate().await.unwrap();
    Some((store, db))
}

macro_rules! conformance {
    (backends: [$($b:ident => $backend:expr),+ $(,)?], cases: $cases:tt $(,)?) => {
        mod stamped { $( conformance!(@one $b, $backend, $cases); )+ }
    };
    (@one $b:ident, $backend:expr, [$($case:ident),+ $(,)?]) => {
        pub mod $b { $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn $case() {
                let Some((store, db)) = crate::open($backend).await else { return };
                crate::sync::$case(store.as_ref()).await;
                drop(store);
                db.drop_now().await;
            }
        )+ }
    };
}

conformance! {
    backends: [
        sqlite => tokenserver_store::Backend::Sqlite,
        postgres => tokenserver_store::Backend::Postgres,
        mysql => tokenserver_store::Backend::MySql,
    ],
    cases: [
        migrate_is_idempotent_and_seeds_sync15,
        new_user_is_allocated_to_the_least_loaded_node,
        allocation_skips_downed_backoff_and_full_nodes,
        ties_go_to_the_lowest_node_id,
        capacity_is_released_gradually_with_mozillas_rounding,
        all_nodes_full_is_no_node_available_and_writes_nothing,
        allocation_conflicts_when_the_user_changed_meanwhile,
        replaced_user_is_reallocated_with_its_account_state,
        retired_nodeless_user_is_never_allocated,
        update_is_guarded_and_never_lowers,
        new_client_state_inserts_a_row_and_replaces_the_others,
        change_conflicts_when_the_row_is_no_longer_current,
        race_recovery_marks_rows_replaced,
        retire_and_password_change,
        node_operations,
        unknown_service_is_reported,
        concurrent_first_allocations_create_one_row,
        concurrent_allocations_respect_capacity,
        concurrent_changes_leave_one_live_row,
        cancelled_calls_leave_whole_rows,
    ],
}

/// A session store on a fresh database / key prefix.
pub async fn open_sessions(
    backend: tokenserver_store::session::SessionBackend,
) -> Option<(Arc<dyn tokenserver_store::SessionStore>, tokenserver_store::testing::SessionDb)> {
    let db = tokenserver_store::testing::fresh_sessions(backend).await?;
    let store = tokenserver_store::session::open(
        &db.url,
        &PoolSettings::default(),
        tokenserver_store::session::MemoryOptions { shards: 64, ..Default::default() },
    )
    .await
    .unwrap();
    Some((store, db))
}

macro_rules! session_conformance {
    (backends: [$($b:ident => $backend:expr),+ $(,)?], cases: $cases:tt $(,)?) => {
        mod sessions { $( session_conformance!(@one $b, $backend, $cases); )+ }
    };
    (@one $b:ident, $backend:expr, [$($case:ident),+ $(,)?]) => {
        pub mod $b { $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn $case() {
                let Some((store, db)) = crate::open_sessions($backend).await else { return };
                crate::session::$case(store.as_ref()).await;
                drop(store);
                db.drop_now().await;
            }
        )+ }
    };
}

session_conformance! {
    backends: [
        memory => tokenserver_store::session::SessionBackend::Memory,
        sqlite => tokenserver_store::session::SessionBackend::Sqlite,
        postgres => tokenserver_store::session::SessionBackend::Postgres,
        redis => tokenserver_store::session::SessionBackend::Redis,
        redis_cluster => tokenserver_store::session::SessionBackend::RedisCluster,
    ],
    cases: [
        rotation_chain_carries_metadata_and_consumes_each_token,
        unknown_and_expired_tokens_are_refused,
        metadata_is_merged_and_bounded,
        retry_inside_the_grace_window_gets_the_same_successor,
        reuse_after_the_grace_window_revokes_the_chain,
        first_format_tokens_keep_working,
        ending_a_session_revokes_it,
        dump_lists_live_sessions_without_tokens,
        dump_pages_cover_every_session_once,
        purge_removes_expired_records,
        concurrent_rotations_issue_one_successor,
        cancelled_calls_change_all_or_nothing,
    ],
}
