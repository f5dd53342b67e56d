//! `SyncStore` cases: every store operation and the allocation policy.

use futures::future::join_all;
use tokenserver_core::sync::users::{resolve, Status};
use tokenserver_store::sync::{Allocate, NewNode, NodeChange, NodeUsers, OldRecord, OldRecordsQuery, UserChange};
use tokenserver_store::{StoreError, SyncStore};

const SVC: &str = "sync-1.5";
const RATE: f64 = 0.1;

fn alloc<'a>(email: &'a str, expected: Option<i64>, now: i64) -> Allocate<'a> {
    Allocate {
        service: SVC,
        email,
        generation: 10,
        client_state: "aaaa",
        keys_changed_at: Some(10),
        expected_current: expected,
        now_ms: now,
        release_rate: RATE,
        bucket: None,
    }
}

async fn node(
    s: &dyn SyncStore,
    url: &str,
    capacity: i64,
    available: i64,
    load: i64,
    downed: bool,
    backoff: bool,
) -> i64 {
    s.add_node(&NewNode { service: SVC, node: url, capacity, available, current_load: load, downed, backoff })
        .await
        .unwrap()
        .state
        .id
}

/// (available, current_load) of every node, by id.
async fn loads(s: &dyn SyncStore) -> Vec<(i64, i64, i64)> {
    s.list_nodes(Some(SVC))
        .await
        .unwrap()
        .into_iter()
        .map(|n| (n.state.id, n.state.available, n.state.current_load))
        .collect()
}

pub async fn migrate_is_idempotent_and_seeds_sync15(s: &dyn SyncStore) {
    assert!(s.migrate().await.unwrap().applied.is_empty());
    let id = s.ensure_service(SVC, "{node}/1.5/{uid}").await.unwrap();
    assert_eq!(s.ensure_service(SVC, "{node}/1.5/{uid}").await.unwrap(), id);
    let other = s.ensure_service("notes-2", "{node}/2/{uid}").await.unwrap();
    assert_ne!(other, id);
    s.check().await.unwrap();
}

pub async fn new_user_is_allocated_to_the_least_loaded_node(s: &dyn SyncStore) {
    let n1 = node(s, "https://n1", 100, 10, 2, false, false).await;
    let n2 = node(s, "https://n2", 100, 10, 3, false, false).await;
    let n3 = node(s, "https://n3", 100, 10, 1, false, false).await;
    assert!(s.user_rows(SVC, "a@x").await.unwrap().is_empty());
    let row = s.allocate_user(&alloc("a@x", None, 1000)).await.unwrap();
    assert_eq!((row.node_id, row.node.as_deref()), (Some(n3), Some("https://n3")));
    assert_eq!(
        (row.generation, row.keys_changed_at, row.client_state.as_str(), row.created_at),
        (10, Some(10), "aaaa", 1000)
    );
    assert_eq!(loads(s).await, vec![(n1, 10, 2), (n2, 10, 3), (n3, 9, 2)]);
    let rows = s.user_rows(SVC, "a@x").await.unwrap();
    assert_eq!(rows, vec![row]);
}

pub async fn allocation_skips_downed_backoff_and_full_nodes(s: &dyn SyncStore) {
    node(s, "https://down", 100, 10, 0, true, false).await;
    node(s, "https://back", 100, 10, 0, false, true).await;
    node(s, "https://full", 10, 10, 10, false, false).await;
    let ok = node(s, "https://ok", 100, 10, 50, false, false).await;
    let row = s.allocate_user(&alloc("a@x", None, 1)).await.unwrap();
    assert_eq!(row.node_id, Some(ok));
}

pub async fn ties_go_to_more_available_then_the_lowest_node_id(s: &dyn SyncStore) {
    let first = node(s, "https://b", 100, 10, 5, false, false).await;
    node(s, "https://a", 100, 10, 5, false, false).await;
    assert_eq!(s.allocate_user(&alloc("a@x", None, 1)).await.unwrap().node_id, Some(first));
    // Two empty nodes: the large fresh one added later beats the small one added first, whatever
    // ids the database handed out.
    node(s, "https://small", 10, 2, 0, false, false).await;
    let big = node(s, "https://big", 5000, 500, 0, false, false).await;
    assert_eq!(s.allocate_user(&alloc("b@x", None, 1)).await.unwrap().node_id, Some(big));
    // Same ratio (both empty), same available: the lowest id.
    let e1 = node(s, "https://e1", 100, 600, 0, false, false).await;
    node(s, "https://e2", 100, 600, 0, false, false).await;
    assert_eq!(s.allocate_user(&alloc("c@x", None, 1)).await.unwrap().node_id, Some(e1));
}

pub async fn capacity_is_released_gradually_with_mozillas_rounding(s: &dyn SyncStore) {
    let n1 = node(s, "https://n1", 10, 0, 1, false, false).await;
    let n2 = node(s, "https://n2", 100, 0, 0, false, false).await;
    let n3 = node(s, "https://n3", 8, 0, 5, false, false).await;
    let n4 = node(s, "https://n4", 10, 0, 0, false, true).await;
    let n5 = node(s, "https://n5", 10, 0, 0, true, false).await;
    let row = s.allocate_user(&alloc("a@x", None, 1)).await.unwrap();
    assert_eq!(row.node_id, Some(n2));
    // n1: 10 × 0.1 = 1; n2: 10, chosen → 9; n3: LEAST(0.8, 3) rounds to 1; backoff n4 gets
    // capacity but is not chosen; downed n5 gets none.
    assert_eq!(loads(s).await, vec![(n1, 1, 1), (n2, 9, 1), (n3, 1, 5), (n4, 1, 0), (n5, 0, 0)]);
}

pub async fn all_nodes_full_is_no_node_available_and_writes_nothing(s: &dyn SyncStore) {
    assert!(matches!(s.allocate_user(&alloc("a@x", None, 1)).await, Err(StoreError::NoNodeAvailable)));
    let n = node(s, "https://full", 5, 0, 5, false, false).await;
    assert!(matches!(s.allocate_user(&alloc("a@x", None, 1)).await, Err(StoreError::NoNodeAvailable)));
    assert!(s.user_rows(SVC, "a@x").await.unwrap().is_empty());
    assert_eq!(loads(s).await, vec![(n, 0, 5)]);
}

pub async fn allocation_conflicts_when_the_user_changed_meanwhile(s: &dyn SyncStore) {
    let n = node(s, "https://n", 100, 10, 0, false, false).await;
    let row = s.allocate_user(&alloc("a@x", None, 1)).await.unwrap();
    // Someone else created the user first.
    assert!(matches!(s.allocate_user(&alloc("a@x", None, 2)).await, Err(StoreError::Conflict)));
    // The current row is assigned: nothing to re-allocate.
    assert!(matches!(s.allocate_user(&alloc("a@x", Some(row.uid), 2)).await, Err(StoreError::Conflict)));
    assert_eq!(s.user_rows(SVC, "a@x").await.unwrap().len(), 1);
    assert_eq!(loads(s).await, vec![(n, 9, 1)]);
}

pub async fn replaced_user_is_reallocated_with_its_account_state(s: &dyn SyncStore) {
    node(s, "https://n", 100, 10, 0, false, false).await;
    let first = s.allocate_user(&alloc("a@x", None, 100)).await.unwrap();
    s.replace_rows(SVC, &[first.uid], 150).await.unwrap();
    let r = resolve(&s.user_rows(SVC, "a@x").await.unwrap()).unwrap();
    assert_eq!(r.status, Status::NeedsNode);
    let mut req = alloc("a@x", Some(first.uid), 200);
    req.generation = 42;
    let second = s.allocate_user(&req).await.unwrap();
    assert_ne!(second.uid, first.uid);
    let r = resolve(&s.user_rows(SVC, "a@x").await.unwrap()).unwrap();
    assert_eq!((r.current.uid, r.status, r.current.generation), (second.uid, Status::Assigned, 42));
    // Re-allocating the old row again is a conflict.
    assert!(matches!(s.allocate_user(&alloc("a@x", Some(first.uid), 300)).await, Err(StoreError::Conflict)));
}

pub async fn retired_nodeless_user_is_never_allocated(s: &dyn SyncStore) {
    node(s, "https://n", 100, 10, 0, false, false).await;
    let row = s.allocate_user(&alloc("a@x", None, 100)).await.unwrap();
    assert_eq!(s.retire_user(SVC, "a@x", 200).await.unwrap(), 1);
    let r = resolve(&s.user_rows(SVC, "a@x").await.unwrap()).unwrap();
    assert_eq!((r.current.generation, r.current.replaced_at), (i64::MAX, Some(200)));
    // Retired but still on its node: served as is (status Assigned), never re-allocated.
    assert_eq!(r.status, Status::Assigned);
    assert!(matches!(s.allocate_user(&alloc("a@x", Some(row.uid), 300)).await, Err(StoreError::Conflict)));
}

pub async fn update_is_guarded_and_never_lowers(s: &dyn SyncStore) {
    node(s, "https://n", 100, 10, 0, false, false).await;
    let row = s.allocate_user(&alloc("a@x", None, 100)).await.unwrap();
    let up = UserChange::Update { generation: 20, keys_changed_at: Some(15) };
    assert_eq!(s.change_user(SVC, "a@x", row.uid, &up, 200).await.unwrap(), row.uid);
    let cur = &s.user_rows(SVC, "a@x").await.unwrap()[0];
    assert_eq!((cur.generation, cur.keys_changed_at), (20, Some(15)));
    // The SQL guard refuses to lower either value.
    let down = UserChange::Update { generation: 5, keys_changed_at: Some(15) };
    s.change_user(SVC, "a@x", row.uid, &down, 300).await.unwrap();
    let down_kca = UserChange::Update { generation: 30, keys_changed_at: Some(1) };
    s.change_user(SVC, "a@x", row.uid, &down_kca, 300).await.unwrap();
    let cur = &s.user_rows(SVC, "a@x").await.unwrap()[0];
    assert_eq!((cur.generation, cur.keys_changed_at), (20, Some(15)));
}

pub async fn new_client_state_inserts_a_row_and_replaces_the_others(s: &dyn SyncStore) {
    let n = node(s, "https://n", 100, 10, 0, false, false).await;
    let row = s.allocate_user(&alloc("a@x", None, 100)).await.unwrap();
    let ch = UserChange::NewClientState { generation: 20, keys_changed_at: Some(20), client_state: "bbbb", node_id: n };
    let uid = s.change_user(SVC, "a@x", row.uid, &ch, 200).await.unwrap();
    assert_ne!(uid, row.uid);
    let rows = s.user_rows(SVC, "a@x").await.unwrap();
    assert_eq!(rows.len(), 2);
    assert_eq!(
        (rows[0].uid, rows[0].client_state.as_str(), rows[0].replaced_at, rows[0].created_at),
        (uid, "bbbb", None, 200)
    );
    assert_eq!((rows[1].uid, rows[1].replaced_at), (row.uid, Some(200)));
    assert_eq!(rows[0].node_id, Some(n));
    // No load change.
    assert_eq!(loads(s).await, vec![(n, 9, 1)]);
    let r = resolve(&rows).unwrap();
    assert_eq!(r.old_client_states, vec!["aaaa".to_string()]);
}

pub async fn change_conflicts_when_the_row_is_no_longer_current(s: &dyn SyncStore) {
    let n = node(s, "https://n", 100, 10, 0, false, false).await;
    let row = s.allocate_user(&alloc("a@x", None, 100)).await.unwrap();
    let ch = UserChange::NewClientState { generation: 20, keys_changed_at: Some(20), client_state: "bbbb", node_id: n };
    s.change_user(SVC, "a@x", row.uid, &ch, 200).await.unwrap();
    let up = UserChange::Update { generation: 30, keys_changed_at: Some(20) };
    assert!(matches!(s.change_user(SVC, "a@x", row.uid, &up, 300).await, Err(StoreError::Conflict)));
    assert!(matches!(s.change_user(SVC, "nobody@x", 1, &up, 300).await, Err(StoreError::Conflict)));
}

pub async fn race_recovery_marks_rows_replaced(s: &dyn SyncStore) {
    node(s, "https://n", 100, 10, 0, false, false).await;
    let a = s.allocate_user(&alloc("a@x", None, 100)).await.unwrap();
    s.replace_rows(SVC, &[a.uid], 150).await.unwrap();
    // Replaced rows keep their first replaced_at.
    s.replace_rows(SVC, &[a.uid], 999).await.unwrap();
    assert_eq!(s.user_rows(SVC, "a@x").await.unwrap()[0].replaced_at, Some(150));
}

pub async fn retire_and_password_change(s: &dyn SyncStore) {
    node(s, "https://n", 100, 10, 0, false, false).await;
    s.allocate_user(&alloc("a@x", None, 100)).await.unwrap();
    assert_eq!(s.update_user_generation(SVC, "a@x", Some(4999), None).await.unwrap(), 1);
    let cur = &s.user_rows(SVC, "a@x").await.unwrap()[0];
    assert_eq!((cur.generation, cur.keys_changed_at), (4999, Some(10)));
    // Never lowered.
    assert_eq!(s.update_user_generation(SVC, "a@x", Some(5), None).await.unwrap(), 0);
    assert_eq!(s.update_user_generation(SVC, "nobody@x", Some(5), None).await.unwrap(), 0);
    assert_eq!(s.retire_user(SVC, "a@x", 7000).await.unwrap(), 1);
    assert_eq!(s.retire_user(SVC, "a@x", 8000).await.unwrap(), 0);
    let cur = &s.user_rows(SVC, "a@x").await.unwrap()[0];
    assert_eq!((cur.generation, cur.replaced_at), (i64::MAX, Some(7000)));
}

pub async fn node_operations(s: &dyn SyncStore) {
    let id = node(s, "https://n", 100, 10, 0, false, false).await;
    let dup = s
        .add_node(&NewNode {
            service: SVC,
            node: "https://n",
            capacity: 1,
            available: 1,
            current_load: 0,
            downed: false,
            backoff: false,
        })
        .await;
    assert!(matches!(dup, Err(StoreError::AlreadyExists(_))), "{dup:?}");
    assert!(!s.init_node(SVC, "https://n", 5).await.unwrap());
    assert!(s.init_node(SVC, "https://m", 5).await.unwrap());
    let nodes = s.list_nodes(None).await.unwrap();
    assert_eq!(nodes.len(), 2);
    assert_eq!((nodes[0].state.id, nodes[0].service.as_str()), (id, SVC));
    let m = &nodes[1].state;
    assert_eq!(
        (m.node.as_str(), m.available, m.capacity, m.current_load, m.downed, m.backoff),
        ("https://m", 5, 5, 0, 0, 0)
    );
    assert!(s.list_nodes(Some("other-1")).await.unwrap().is_empty());
}

pub async fn node_lifecycle_update_drain_unassign_remove(s: &dyn SyncStore) {
    let a = node(s, "https://a", 100, 10, 0, true, true).await;
    let b = node(s, "https://b", 100, 10, 0, false, false).await;
    // Clear both flags (Mozilla's script can only set them) and set the numbers; `None` keeps.
    let clear = NodeChange { downed: Some(false), backoff: Some(false), available: Some(50), ..NodeChange::default() };
    s.update_node(SVC, "https://a", &clear).await.unwrap();
    let state = |nodes: Vec<tokenserver_store::sync::NodeRecord>, id: i64| {
        let n = nodes.into_iter().find(|n| n.state.id == id).unwrap().state;
        (n.available, n.current_load, n.capacity, n.downed, n.backoff)
    };
    assert_eq!(state(s.list_nodes(Some(SVC)).await.unwrap(), a), (50, 0, 100, 0, 0));
    let set = NodeChange { capacity: Some(500), current_load: Some(7), backoff: Some(true), ..NodeChange::default() };
    s.update_node(SVC, "https://a", &set).await.unwrap();
    assert_eq!(state(s.list_nodes(Some(SVC)).await.unwrap(), a), (50, 7, 500, 0, 1));
    let missing = s.update_node(SVC, "https://none", &clear).await;
    assert!(matches!(missing, Err(StoreError::NotFound(_))), "{missing:?}");
    assert!(matches!(s.update_node("other-1", "https://a", &clear).await, Err(StoreError::NotFound(_))));

    // a is in backoff: users go to b. Drained (available 0, backoff), b keeps its users.
    for i in 0..3 {
        assert_eq!(s.allocate_user(&alloc(&format!("u{i}@x"), None, 10)).await.unwrap().node_id, Some(b));
    }
    let drain = NodeChange { available: Some(0), backoff: Some(true), ..NodeChange::default() };
    s.update_node(SVC, "https://b", &drain).await.unwrap();
    s.update_node(SVC, "https://a", &NodeChange { backoff: Some(false), ..NodeChange::default() }).await.unwrap();
    let rows = s.user_rows(SVC, "u0@x").await.unwrap();
    assert_eq!((rows.len(), rows[0].node_id, rows[0].replaced_at), (1, Some(b), None));
    assert_eq!(s.allocate_user(&alloc("new@x", None, 11)).await.unwrap().node_id, Some(a));
    assert_eq!(
        s.node_users().await.unwrap(),
        vec![NodeUsers { node_id: a, live: 1 }, NodeUsers { node_id: b, live: 3 }]
    );

    // Unassign b: its users' rows are replaced and they get a node again, keeping their state.
    assert_eq!(s.unassign_node(SVC, "https://b", 20).await.unwrap(), 3);
    assert_eq!(s.unassign_node(SVC, "https://b", 21).await.unwrap(), 0);
    let rows = s.user_rows(SVC, "u1@x").await.unwrap();
    assert_eq!((rows[0].node_id, rows[0].replaced_at), (Some(b), Some(20)));
    assert_eq!(s.node_users().await.unwrap(), vec![NodeUsers { node_id: a, live: 1 }]);
    let again = s.allocate_user(&alloc("u1@x", Some(rows[0].uid), 30)).await.unwrap();
    assert_eq!((again.node_id, again.generation, again.client_state.as_str()), (Some(a), 10, "aaaa"));

    // Remove a: the node is gone and its users are unassigned in the same step.
    assert_eq!(s.remove_node(SVC, "https://a", 40).await.unwrap(), 2);
    let nodes = s.list_nodes(Some(SVC)).await.unwrap();
    assert_eq!(nodes.iter().map(|n| n.state.id).collect::<Vec<_>>(), vec![b]);
    let rows = s.user_rows(SVC, "new@x").await.unwrap();
    assert_eq!((rows.len(), rows[0].node_id, rows[0].replaced_at), (1, None, Some(40)));
    assert_eq!(resolve(&rows).unwrap().status, Status::NeedsNode);
    assert!(matches!(s.remove_node(SVC, "https://a", 41).await, Err(StoreError::NotFound(_))));
    assert!(matches!(s.unassign_node(SVC, "https://a", 41).await, Err(StoreError::NotFound(_))));
    assert!(s.node_users().await.unwrap().is_empty());
}

pub async fn unknown_service_is_reported(s: &dyn SyncStore) {
    let mut req = alloc("a@x", None, 1);
    req.service = "nope-1";
    assert!(matches!(s.allocate_user(&req).await, Err(StoreError::UnknownService(_))));
    let nn = NewNode {
        service: "nope-1",
        node: "https://n",
        capacity: 1,
        available: 1,
        current_load: 0,
        downed: false,
        backoff: false,
    };
    assert!(matches!(s.add_node(&nn).await, Err(StoreError::UnknownService(_))));
    assert!(s.user_rows("nope-1", "a@x").await.unwrap().is_empty());
}

pub async fn concurrent_first_allocations_create_one_row(s: &dyn SyncStore) {
    let n = node(s, "https://n", 100, 100, 0, false, false).await;
    let results = futures_join(s, 20, |_| "a@x".to_string()).await;
    let ok = results.iter().filter(|r| r.is_ok()).count();
    assert_eq!(ok, 1, "{results:?}");
    assert!(results.iter().all(|r| matches!(r, Ok(_) | Err(StoreError::Conflict))), "{results:?}");
    assert_eq!(s.user_rows(SVC, "a@x").await.unwrap().len(), 1);
    assert_eq!(loads(s).await, vec![(n, 99, 1)]);
}

pub async fn concurrent_allocations_respect_capacity(s: &dyn SyncStore) {
    let n = node(s, "https://n", 10, 10, 0, false, false).await;
    let results = futures_join(s, 30, |i| format!("user{i}@x")).await;
    let ok = results.iter().filter(|r| r.is_ok()).count();
    assert_eq!(ok, 10, "{results:?}");
    assert!(results.iter().all(|r| matches!(r, Ok(_) | Err(StoreError::NoNodeAvailable))), "{results:?}");
    assert_eq!(loads(s).await, vec![(n, 0, 10)]);
}

pub async fn concurrent_changes_leave_one_live_row(s: &dyn SyncStore) {
    let n = node(s, "https://n", 100, 100, 0, false, false).await;
    let row = s.allocate_user(&alloc("a@x", None, 100)).await.unwrap();
    let states: Vec<String> = (0..20).map(|i| format!("{i:032x}")).collect();
    let futs = states.iter().enumerate().map(|(i, cs)| {
        let ch = UserChange::NewClientState {
            generation: 20 + i as i64,
            keys_changed_at: Some(20 + i as i64),
            client_state: cs,
            node_id: n,
        };
        async move { s.change_user(SVC, "a@x", row.uid, &ch, 200 + i as i64).await }
    });
    let results = join_all(futs).await;
    assert_eq!(results.iter().filter(|r| r.is_ok()).count(), 1, "{results:?}");
    let rows = s.user_rows(SVC, "a@x").await.unwrap();
    assert_eq!(rows.len(), 2);
    assert_eq!(rows.iter().filter(|r| r.replaced_at.is_none()).count(), 1);
}

/// Reads of many users at once (the network stores share one statement among them) each get
/// exactly what reading that user alone gives: the user's rows, newest first, none of another
/// user's; nothing for an unknown user or service. Emails are asked as the database compares
/// them (MySQL's collation ignores case), so each is also asked in capitals.
pub async fn concurrent_reads_each_get_their_own_rows(s: &dyn SyncStore) {
    let n = node(s, "https://n", 1000, 1000, 0, false, false).await;
    for u in 0..30i64 {
        let email = format!("u{u}@x");
        let row = s.allocate_user(&alloc(&email, None, 100 + u)).await.unwrap();
        // Users with one, two and three rows.
        for k in 0..u % 3 {
            let cs = format!("{:032x}", u * 10 + k);
            let ch = UserChange::NewClientState {
                generation: 20 + k,
                keys_changed_at: Some(20 + k),
                client_state: &cs,
                node_id: n,
            };
            let current = s.user_rows(SVC, &email).await.unwrap()[0].uid;
            assert!(current >= row.uid);
            s.change_user(SVC, &email, current, &ch, 200 + u * 10 + k).await.unwrap();
        }
    }
    let mut asked: Vec<(String, String)> = Vec::new();
    for u in 0..30 {
        asked.push((SVC.into(), format!("u{u}@x")));
        asked.push((SVC.into(), format!("U{u}@X")));
    }
    asked.push((SVC.into(), "nobody@x".into()));
    asked.push(("no-such-service".into(), "u1@x".into()));
    let mut alone = Vec::new();
    for (service, email) in &asked {
        alone.push(s.user_rows(service, email).await.unwrap());
    }
    assert_eq!(alone[0].len(), 1);
    assert_eq!(alone[2 * 2].len(), 3, "u2 has three rows");
    assert!(alone[alone.len() - 2].is_empty() && alone[alone.len() - 1].is_empty());
    // Every read at once, five times over, in shuffled orders.
    for round in 0..5 {
        let order: Vec<usize> = (0..asked.len()).map(|i| (i * 7 + round * 13) % asked.len()).collect();
        let together = join_all(order.iter().map(|&i| s.user_rows(&asked[i].0, &asked[i].1))).await;
        for (i, rows) in order.iter().zip(together) {
            assert_eq!(rows.unwrap(), alone[*i], "{:?}", asked[*i]);
        }
    }
}

async fn futures_join(
    s: &dyn SyncStore,
    n: usize,
    email: impl Fn(usize) -> String,
) -> Vec<Result<tokenserver_core::sync::users::UserRow, StoreError>> {
    let emails: Vec<String> = (0..n).map(email).collect();
    join_all(emails.iter().map(|e| async move { s.allocate_user(&alloc(e, None, 1)).await })).await
}

/// Calls cut short at random points (their futures dropped after 0–3 ms, as a request timeout or
/// a client that leaves does) leave whole rows behind, and the store takes the next write.
pub async fn cancelled_calls_leave_whole_rows(s: &dyn SyncStore) {
    let n = node(s, "https://n", 1_000_000, 1_000_000, 0, false, false).await;
    let emails: Vec<String> = (0..400).map(|i| format!("u{i}@x")).collect();
    for (round, chunk) in emails.chunks(40).enumerate() {
        join_all(chunk.iter().enumerate().map(|(i, email)| async move {
            let limit = std::time::Duration::from_micros(rand::random::<u64>() % 3000);
            let _ = tokio::time::timeout(limit, async {
                let row = s.allocate_user(&alloc(email, None, 1)).await?;
                let cs = format!("{i:032x}");
                let ch = UserChange::NewClientState {
                    generation: 20,
                    keys_changed_at: Some(20),
                    client_state: &cs,
                    node_id: n,
                };
                s.change_user(SVC, email, row.uid, &ch, 2).await?;
                // Downed: takes no users, so every allocation above goes to `n`.
                let url = format!("https://m{round}-{i}");
                s.add_node(&NewNode {
                    service: SVC,
                    node: &url,
                    capacity: 1,
                    available: 1,
                    current_load: 0,
                    downed: true,
                    backoff: false,
                })
                .await
            })
            .await;
        }))
        .await;
    }
    // The next writes answer.
    node(s, "https://after", 10, 10, 0, true, false).await;
    s.allocate_user(&alloc("after@x", None, 1)).await.unwrap();
    // Every allocation is whole (a row and its node's load, or neither); every user has one live row.
    let mut users = 1;
    for email in &emails {
        let rows = s.user_rows(SVC, email).await.unwrap();
        assert!(rows.len() <= 2, "{email}: {rows:?}");
        if !rows.is_empty() {
            users += 1;
            assert_eq!(rows.iter().filter(|r| r.replaced_at.is_none()).count(), 1, "{email}: {rows:?}");
        }
    }
    let load = loads(s).await.into_iter().find(|(id, ..)| *id == n).unwrap();
    assert_eq!((load.1, load.2), (1_000_000 - users, users));
}

pub async fn users_are_looked_up_assigned_to_a_node_and_counted(s: &dyn SyncStore) {
    let a = node(s, "https://a", 100, 10, 0, false, false).await;
    let b = node(s, "https://b", 100, 10, 0, true, false).await;
    let first = s.allocate_user(&alloc("u@x", None, 10)).await.unwrap();
    assert_eq!(first.node_id, Some(a));
    assert_eq!(s.user_email(SVC, first.uid).await.unwrap().as_deref(), Some("u@x"));
    assert_eq!(s.user_email(SVC, first.uid + 1000).await.unwrap(), None);
    assert_eq!(s.user_email("other-1", first.uid).await.unwrap(), None);

    // An operator's choice goes even to a downed node; the account state moves with the user.
    let moved = s.assign_user(SVC, "u@x", "https://b", 20).await.unwrap();
    assert_eq!(
        (moved.node_id, moved.generation, moved.keys_changed_at, moved.client_state.as_str(), moved.created_at),
        (Some(b), 10, Some(10), "aaaa", 20)
    );
    let rows = s.user_rows(SVC, "u@x").await.unwrap();
    assert_eq!(
        rows.iter().map(|r| (r.uid, r.replaced_at)).collect::<Vec<_>>(),
        vec![(moved.uid, None), (first.uid, Some(20))]
    );
    assert_eq!(resolve(&rows).unwrap().current, moved);
    assert_eq!(loads(s).await, vec![(a, 9, 1), (b, 9, 1)]);
    // Already there: nothing changes.
    assert_eq!(s.assign_user(SVC, "u@x", "https://b", 25).await.unwrap(), moved);
    assert_eq!(s.user_rows(SVC, "u@x").await.unwrap().len(), 2);
    assert_eq!(loads(s).await, vec![(a, 9, 1), (b, 9, 1)]);
    // A new user starts at generation 0 with no client state.
    let fresh = s.assign_user(SVC, "n@x", "https://a", 30).await.unwrap();
    assert_eq!(
        (fresh.node_id, fresh.generation, fresh.keys_changed_at, fresh.client_state.as_str()),
        (Some(a), 0, None, "")
    );
    let missing = s.assign_user(SVC, "u@x", "https://none", 40).await;
    assert!(matches!(missing, Err(StoreError::NotFound(_))), "{missing:?}");
    assert!(matches!(s.assign_user("nope-1", "u@x", "https://a", 40).await, Err(StoreError::UnknownService(_))));

    // count_users: live rows created at or before the timestamp, one service or all.
    s.ensure_service("notes-2", "{node}/2/{uid}").await.unwrap();
    assert_eq!(s.count_users(Some(SVC), 19).await.unwrap(), 0);
    assert_eq!(s.count_users(Some(SVC), 20).await.unwrap(), 1);
    assert_eq!(s.count_users(Some(SVC), 30).await.unwrap(), 2);
    assert_eq!(s.count_users(None, 30).await.unwrap(), 2);
    assert_eq!(s.count_users(Some("notes-2"), 30).await.unwrap(), 0);
}

pub async fn old_records_page_in_order_and_deleting_them_frees_slots(s: &dyn SyncStore) {
    let a = node(s, "https://a", 10, 10, 0, false, false).await;
    let b = node(s, "https://b", 10, 10, 0, false, true).await;
    let r1 = s.allocate_user(&alloc("u@x", None, 10)).await.unwrap();
    let change =
        UserChange::NewClientState { generation: 11, keys_changed_at: Some(11), client_state: "bbbb", node_id: a };
    let uid2 = s.change_user(SVC, "u@x", r1.uid, &change, 20).await.unwrap();
    let r3 = s.assign_user(SVC, "u@x", "https://b", 30).await.unwrap();
    let other = s.allocate_user(&alloc("v@x", None, 35)).await.unwrap();
    assert_eq!(loads(s).await, vec![(a, 8, 2), (b, 9, 1)]);

    let page = |replaced_before, uid_above, uid_below, after, limit| {
        let q = OldRecordsQuery { service: SVC, replaced_before, uid_above, uid_below, after, limit };
        async move { s.old_records(&q).await.unwrap().into_iter().map(|r| r.uid).collect::<Vec<_>>() }
    };
    let all = s.old_records(&OldRecordsQuery {
        service: SVC,
        replaced_before: 100,
        uid_above: None,
        uid_below: None,
        after: None,
        limit: 10,
    });
    assert_eq!(
        all.await.unwrap(),
        vec![
            OldRecord {
                uid: r1.uid,
                email: "u@x".into(),
                generation: 10,
                keys_changed_at: Some(10),
                client_state: "aaaa".into(),
                node: Some("https://a".into()),
                downed: false,
                created_at: 10,
                replaced_at: 20,
            },
            OldRecord {
                uid: uid2,
                email: "u@x".into(),
                generation: 11,
                keys_changed_at: Some(11),
                client_state: "bbbb".into(),
                node: Some("https://a".into()),
                downed: false,
                created_at: 20,
                replaced_at: 30,
            },
        ]
    );
    assert_eq!(page(100, None, None, None, 1).await, vec![r1.uid]);
    assert_eq!(page(100, None, None, Some((20, r1.uid)), 1).await, vec![uid2]);
    assert_eq!(page(100, None, None, Some((30, uid2)), 1).await, Vec::<i64>::new());
    assert_eq!(page(30, None, None, None, 10).await, vec![r1.uid], "strictly before");
    assert_eq!(page(100, Some(r1.uid), None, None, 10).await, vec![uid2]);
    assert_eq!(page(100, None, Some(uid2), None, 10).await, vec![r1.uid]);
    assert!(s
        .old_records(&OldRecordsQuery {
            service: "nope-1",
            ..OldRecordsQuery {
                service: SVC,
                replaced_before: 100,
                uid_above: None,
                uid_below: None,
                after: None,
                limit: 10,
            }
        })
        .await
        .unwrap()
        .is_empty());

    // The user still has a row on a: deleting the first frees nothing, the second frees a slot.
    assert!(s.delete_user_record(SVC, r1.uid).await.unwrap());
    assert_eq!(loads(s).await, vec![(a, 8, 2), (b, 9, 1)]);
    assert!(s.delete_user_record(SVC, uid2).await.unwrap());
    assert_eq!(loads(s).await, vec![(a, 9, 1), (b, 9, 1)]);
    assert!(!s.delete_user_record(SVC, uid2).await.unwrap());
    assert_eq!(s.user_rows(SVC, "u@x").await.unwrap().iter().map(|r| r.uid).collect::<Vec<_>>(), vec![r3.uid]);

    // A full node's freed slot is available again, never past capacity.
    s.update_node(
        SVC,
        "https://a",
        &NodeChange { available: Some(0), current_load: Some(10), ..NodeChange::default() },
    )
    .await
    .unwrap();
    s.unassign_node(SVC, "https://a", 50).await.unwrap();
    assert!(s.delete_user_record(SVC, other.uid).await.unwrap());
    assert_eq!(loads(s).await[0], (a, 1, 9));

    // bump_replaced_at re-stamps replaced rows only.
    s.remove_node(SVC, "https://b", 60).await.unwrap();
    let gone = s.old_records(&OldRecordsQuery {
        service: SVC,
        replaced_before: 100,
        uid_above: None,
        uid_below: None,
        after: None,
        limit: 10,
    });
    let gone = gone.await.unwrap();
    assert_eq!(
        gone.iter().map(|r| (r.uid, r.node.clone(), r.downed, r.replaced_at)).collect::<Vec<_>>(),
        vec![(r3.uid, None, false, 60)]
    );
    s.bump_replaced_at(SVC, r3.uid, 70).await.unwrap();
    assert_eq!(page(70, None, None, None, 10).await, Vec::<i64>::new());
    assert_eq!(page(71, None, None, None, 10).await, vec![r3.uid]);
    // The node is gone: deleting the row frees nothing anywhere.
    assert!(s.delete_user_record(SVC, r3.uid).await.unwrap());
    assert_eq!(loads(s).await, vec![(a, 1, 9)]);
    assert_eq!(s.count_users(None, 1000).await.unwrap(), 0);
}

pub async fn buckets_pin_users_to_their_node_and_move_together(s: &dyn SyncStore) {
    use tokenserver_core::sync::buckets::bucket_of;
    use tokenserver_store::sync::BucketRecord;
    s.enable_buckets().await.unwrap();
    s.enable_buckets().await.unwrap();
    let a = node(s, "https://a", 100, 100, 0, false, false).await;
    let b = node(s, "https://b", 100, 100, 50, false, false).await;
    // Five users of bucket 0 and two of bucket 1 (of 2).
    let of = |bucket: i64, n: usize| -> Vec<String> {
        (0..).map(|i| format!("u{i}@x")).filter(|e| bucket_of(e, 2) == bucket).take(n).collect()
    };
    let (zero, one) = (of(0, 4), of(1, 2));
    fn alloc_in(email: &str, expected: Option<i64>, now: i64) -> Allocate<'_> {
        Allocate { bucket: Some(bucket_of(email, 2)), ..alloc(email, expected, now) }
    }
    let first = s.allocate_user(&alloc_in(&zero[0], None, 10)).await.unwrap();
    assert_eq!(first.node_id, Some(a), "an unassigned bucket gets a node by the policy");
    assert_eq!(s.allocate_user(&alloc_in(&one[0], None, 11)).await.unwrap().node_id, Some(a));
    assert_eq!(
        s.buckets(SVC).await.unwrap(),
        vec![
            BucketRecord { bucket: 0, node: Some("https://a".into()) },
            BucketRecord { bucket: 1, node: Some("https://a".into()) }
        ]
    );

    // Moving bucket 0 unassigns its users elsewhere, and only them.
    assert_eq!(s.move_bucket(SVC, 0, 2, "https://b", 20).await.unwrap(), 1);
    let rows = s.user_rows(SVC, &zero[0]).await.unwrap();
    assert_eq!((rows[0].uid, rows[0].replaced_at), (first.uid, Some(20)));
    assert_eq!(s.user_rows(SVC, &one[0]).await.unwrap()[0].replaced_at, None);
    // The bucket's node takes its users, though the policy would pick the emptier a.
    assert_eq!(s.allocate_user(&alloc_in(&zero[1], None, 21)).await.unwrap().node_id, Some(b));
    let again = s.allocate_user(&alloc_in(&zero[0], Some(first.uid), 22)).await.unwrap();
    assert_eq!((again.node_id, again.generation, again.client_state.as_str()), (Some(b), 10, "aaaa"));
    assert_eq!(s.allocate_user(&alloc_in(&one[1], None, 23)).await.unwrap().node_id, Some(a));
    assert_eq!(s.move_bucket(SVC, 0, 2, "https://b", 24).await.unwrap(), 0, "nothing left elsewhere");
    // A downed bucket node gives way: the bucket is given another by the policy.
    s.update_node(SVC, "https://b", &NodeChange { downed: Some(true), ..NodeChange::default() }).await.unwrap();
    assert_eq!(s.allocate_user(&alloc_in(&zero[2], None, 30)).await.unwrap().node_id, Some(a));
    assert_eq!(s.buckets(SVC).await.unwrap()[0], BucketRecord { bucket: 0, node: Some("https://a".into()) });
    let missing = s.move_bucket(SVC, 0, 2, "https://none", 40).await;
    assert!(matches!(missing, Err(StoreError::NotFound(_))), "{missing:?}");
    // A removed node leaves its buckets without one until their next allocation.
    s.move_bucket(SVC, 1, 2, "https://b", 50).await.unwrap();
    s.remove_node(SVC, "https://b", 51).await.unwrap();
    assert_eq!(s.buckets(SVC).await.unwrap()[1], BucketRecord { bucket: 1, node: None });
    assert_eq!(s.allocate_user(&alloc_in(&zero[3], None, 52)).await.unwrap().node_id, Some(a));
}
