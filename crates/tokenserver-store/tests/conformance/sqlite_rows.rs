//! SQLite serves users' rows from a cache on the request path: a write by any other connection
//! (another process, the CLI) must be visible to the very next read.

use sqlx::Connection;
use tokenserver_store::sync::{Allocate, NewNode};
use tokenserver_store::Backend;

const SVC: &str = "sync-1.5";

#[tokio::test]
async fn sqlite_user_rows_see_other_connections_writes_at_once() {
    let Some((store, db)) = crate::open(Backend::Sqlite).await else { return };
    store
        .add_node(&NewNode {
            service: SVC,
            node: "https://n1",
            capacity: 100,
            available: 100,
            current_load: 0,
            downed: false,
            backoff: false,
        })
        .await
        .unwrap();
    let alloc = Allocate {
        service: SVC,
        email: "a@x",
        generation: 10,
        client_state: "aaaa",
        keys_changed_at: Some(10),
        expected_current: None,
        now_ms: 1000,
        release_rate: 0.1,
    };
    let row = store.allocate_user(&alloc).await.unwrap();
    assert!(store.user_rows(SVC, "b@x").await.unwrap().is_empty());
    let mut other = sqlx::SqliteConnection::connect(&db.url).await.unwrap();
    for i in 0..40i64 {
        // Read twice (the second read is the cached one), then change the row elsewhere.
        for _ in 0..2 {
            let rows = store.user_rows(SVC, "a@x").await.unwrap();
            assert_eq!(rows.len(), 1);
            assert_eq!(rows[0].generation, if i == 0 { 10 } else { 100 + i - 1 }, "iteration {i}");
        }
        if i % 10 == 9 {
            // The log starts over after a full checkpoint: its header must still read as changed.
            sqlx::query("PRAGMA wal_checkpoint(TRUNCATE)").execute(&mut other).await.unwrap();
        }
        sqlx::query("UPDATE users SET generation = ? WHERE uid = ?")
            .bind(100 + i)
            .bind(row.uid)
            .execute(&mut other)
            .await
            .unwrap();
    }
    // A user created elsewhere shows up where the cache had none.
    sqlx::query(
        "INSERT INTO users (service, email, generation, client_state, created_at, nodeid) \
         SELECT service, 'b@x', 1, '', 5, nodeid FROM users WHERE uid = ?",
    )
    .bind(row.uid)
    .execute(&mut other)
    .await
    .unwrap();
    assert_eq!(store.user_rows(SVC, "b@x").await.unwrap().len(), 1);
    // And a retired user disappears from the live set at once.
    sqlx::query("UPDATE users SET replaced_at = 7 WHERE email = 'a@x'").execute(&mut other).await.unwrap();
    assert_eq!(store.user_rows(SVC, "a@x").await.unwrap()[0].replaced_at, Some(7));
    db.drop_now().await;
}

/// The request-path writer's own commits keep other users' cached rows, so reads and writes
/// interleave here from many tasks at once: after its write returns, each task must read its
/// own change, and at the end every user's rows must be what the database holds.
#[tokio::test]
async fn sqlite_user_rows_read_their_own_writes_under_concurrency() {
    use tokenserver_store::sync::UserChange;
    let Some((store, db)) = crate::open(Backend::Sqlite).await else { return };
    store
        .add_node(&NewNode {
            service: SVC,
            node: "https://n1",
            capacity: 1000,
            available: 1000,
            current_load: 0,
            downed: false,
            backoff: false,
        })
        .await
        .unwrap();
    let tasks = (0..32i64).map(|t| {
        let store = store.clone();
        tokio::spawn(async move {
            let email = format!("u{t}@x");
            let alloc = Allocate {
                service: SVC,
                email: &email,
                generation: 1,
                client_state: "aaaa",
                keys_changed_at: Some(1),
                expected_current: None,
                now_ms: 1000,
                release_rate: 0.1,
            };
            let uid = store.allocate_user(&alloc).await.unwrap().uid;
            for generation in 2..22i64 {
                let before = store.user_rows(SVC, &email).await.unwrap();
                assert_eq!(before[0].generation, generation - 1, "{email} before {generation}");
                let change = UserChange::Update { generation, keys_changed_at: Some(generation) };
                store.change_user(SVC, &email, uid, &change, 1000 + generation).await.unwrap();
                let after = store.user_rows(SVC, &email).await.unwrap();
                assert_eq!(after[0].generation, generation, "{email} after {generation}");
            }
        })
    });
    for task in futures::future::join_all(tasks).await {
        task.unwrap();
    }
    let mut other = sqlx::SqliteConnection::connect(&db.url).await.unwrap();
    for t in 0..32i64 {
        let email = format!("u{t}@x");
        let stored: i64 = sqlx::query_scalar("SELECT generation FROM users WHERE email = ?")
            .bind(&email)
            .fetch_one(&mut other)
            .await
            .unwrap();
        assert_eq!((stored, store.user_rows(SVC, &email).await.unwrap()[0].generation), (21, 21), "{email}");
    }
    db.drop_now().await;
}
