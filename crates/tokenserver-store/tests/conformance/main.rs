//! One conformance suite per family, run against every backend that holds it. Each case is a
//! plain async function over the family's trait (`sync_cases.rs`, `session_cases.rs`), stamped
//! out as `<family>::<backend>::<case>` by [`stamp!`]: `cargo test sync::postgres` runs one
//! backend, `cargo test sessions::` one family. Backends whose URL variable is unset are skipped
//! with a printed notice. Cases that hold for one backend only live in `<backend>_only.rs`.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod access_cases;
mod access_storage;
mod mysql_only;
mod postgres_only;
mod schema;
mod session_cases;
mod sqlite_only;
mod sync_cases;

use std::sync::Arc;

use tokenserver_store::testing::FreshDb;
use tokenserver_store::{AccessStore, SessionStore, StoreSettings, SyncStore};

/// A migrated Sync store on `db`.
pub async fn open_sync(db: FreshDb) -> (Arc<dyn SyncStore>, FreshDb) {
    let store = tokenserver_store::open_sync(&db.url, &StoreSettings::default()).await.unwrap();
    store.migrate().await.unwrap();
    (store, db)
}

/// A session store on `db` (64 memory shards).
pub async fn open_sessions(db: FreshDb) -> (Arc<dyn SessionStore>, FreshDb) {
    let mut settings = StoreSettings::default();
    settings.memory.shards = 64;
    (tokenserver_store::open_sessions(&db.url, &settings).await.unwrap(), db)
}

/// An access-token store on `db`.
pub async fn open_access(db: FreshDb) -> (Arc<dyn AccessStore>, FreshDb) {
    (tokenserver_store::open_access(&db.url, &StoreSettings::default()).await.unwrap(), db)
}

/// Stamps `<family>::<backend>::<case>` tests: each gets a fresh database from its backend's
/// expression (`Option<FreshDb>`: `None` skips), opens it with `open`, runs
/// `crate::<cases>::<case>` on the store, then drops the database.
macro_rules! stamp {
    (
        family: $family:ident, open: $open:path, cases_in: $cases:ident,
        backends: [$($backend:ident => $db:expr),+ $(,)?],
        cases: $list:tt $(,)?
    ) => {
        mod $family { $( stamp!(@backend $open, $cases, $backend, $db, $list); )+ }
    };
    (@backend $open:path, $cases:ident, $backend:ident, $db:expr, [$($case:ident),+ $(,)?]) => {
        pub mod $backend { $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn $case() {
                #[allow(unused_imports)]
                use tokenserver_store::{testing::{fresh, sqlite_in_memory}, Backend};
                let Some(db) = $db else { return };
                let (store, db) = $open(db).await;
                crate::$cases::$case(store.as_ref()).await;
                drop(store);
                db.drop_now().await;
            }
        )+ }
    };
}

stamp! {
    family: sync, open: crate::open_sync, cases_in: sync_cases,
    backends: [
        sqlite => fresh(Backend::Sqlite).await,
        sqlite_memory => Some(sqlite_in_memory()),
        postgres => fresh(Backend::Postgres).await,
        mysql => fresh(Backend::MySql).await,
    ],
    cases: [
        migrate_is_idempotent_and_seeds_sync15,
        new_user_is_allocated_to_the_least_loaded_node,
        allocation_skips_downed_backoff_and_full_nodes,
        ties_go_to_more_available_then_the_lowest_node_id,
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
        node_lifecycle_update_drain_unassign_remove,
        users_are_looked_up_assigned_to_a_node_and_counted,
        old_records_page_in_order_and_deleting_them_frees_slots,
        buckets_pin_users_to_their_node_and_move_together,
        unknown_service_is_reported,
        concurrent_first_allocations_create_one_row,
        concurrent_allocations_respect_capacity,
        concurrent_changes_leave_one_live_row,
        concurrent_reads_each_get_their_own_rows,
        cancelled_calls_leave_whole_rows,
    ],
}

stamp! {
    family: sessions, open: crate::open_sessions, cases_in: session_cases,
    backends: [
        memory => fresh(Backend::Memory).await,
        sqlite => fresh(Backend::Sqlite).await,
        sqlite_memory => Some(sqlite_in_memory()),
        postgres => fresh(Backend::Postgres).await,
        redis => fresh(Backend::Redis).await,
        redis_cluster => fresh(Backend::RedisCluster).await,
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

stamp! {
    family: access, open: crate::open_access, cases_in: access_cases,
    backends: [
        sqlite => fresh(Backend::Sqlite).await,
        sqlite_memory => Some(sqlite_in_memory()),
        postgres => fresh(Backend::Postgres).await,
        mysql => fresh(Backend::MySql).await,
        redis => fresh(Backend::Redis).await,
        redis_cluster => fresh(Backend::RedisCluster).await,
    ],
    cases: [
        create_get_delete,
        tokens_of_any_shape_round_trip,
        expired_tokens_are_invisible_at_once_and_can_be_created_again,
        listing_pages_cover_every_token_once,
        long_and_short_tokens_share_one_listing,
        revocations_count_the_live_tokens_they_remove,
        purge_reclaims_expired_tokens,
        concurrent_creates_of_one_token_have_one_winner,
        cancelled_calls_change_all_or_nothing,
    ],
}
