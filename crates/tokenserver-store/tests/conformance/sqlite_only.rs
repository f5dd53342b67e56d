//! SQLite only. Users' rows are served from a cache on the request path: a write by any other
//! connection (another process, the CLI) must be visible to the very next read. And a session
//! table of an earlier layout is rewritten on open.

use sqlx::Connection;
use tokenserver_store::sync::{Allocate, NewNode};
use tokenserver_store::Backend;

const SVC: &str = "sync-1.5";

#[tokio::test]
async fn sqlite_user_rows_see_other_connections_writes_at_once() {
    let Some(db) = tokenserver_store::testing::fresh(Backend::Sqlite).await else { return };
    let (store, db) = crate::open_sync(db).await;
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
        bucket: None,
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
    let Some(db) = tokenserver_store::testing::fresh(Backend::Sqlite).await else { return };
    let (store, db) = crate::open_sync(db).await;
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
                bucket: None,
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

/// A session table of an earlier SQLite layout is rewritten on open, keeping its rows: a token
/// issued before the upgrade (first format, keyed by its whole SHA-256) still rotates, and the
/// table ends keyed by token hash alone with only the expiry index.
async fn earlier_session_layout_is_migrated(create: &[&str]) {
    use tokenserver_core::clock::now_ms;
    use tokenserver_core::session::{MetaLimits, RotateOutcome, RotateRequest, RotationPolicy};

    let Some(db) = tokenserver_store::testing::fresh(Backend::Sqlite).await else { return };
    let token = crate::session_cases::first_format_token();
    let now = now_ms() as i64;
    {
        let options: sqlx::sqlite::SqliteConnectOptions = db.url.parse().unwrap();
        let mut c = sqlx::SqliteConnection::connect_with(&options.create_if_missing(true)).await.unwrap();
        for sql in create {
            sqlx::query(sql).execute(&mut c).await.unwrap();
        }
        sqlx::query("INSERT INTO tokenserver_sessions (token_hash, chain, meta, expires_at, deadline, ttl_ms) VALUES (?, ?, ?, ?, ?, ?)")
            .bind(&token.hash().0[..])
            .bind(&token.chain().0[..])
            .bind(r#"{"u":1}"#)
            .bind(now + 60_000)
            .bind(now + 3_600_000)
            .bind(60_000i64)
            .execute(&mut c)
            .await
            .unwrap();
    }
    let store = tokenserver_store::open_sessions(&db.url, &tokenserver_store::StoreSettings::default()).await.unwrap();
    let policy = RotationPolicy { grace_ms: 0, reuse_detection: true, limits: MetaLimits::default() };
    let req = RotateRequest { presented: token.clone(), successor: token.successor(), update: None, now: now as u64 };
    match store.rotate(&req, &policy).await.unwrap() {
        RotateOutcome::Rotated { record, .. } => assert_eq!(record.meta, r#"{"u":1}"#),
        other => panic!("expected a rotation, got {other:?}"),
    }
    let mut c = sqlx::SqliteConnection::connect(&db.url).await.unwrap();
    let indexes: Vec<String> = sqlx::query_scalar(
        "SELECT name FROM sqlite_master WHERE tbl_name = 'tokenserver_sessions' AND type = 'index' AND sql IS NOT NULL ORDER BY name",
    )
    .fetch_all(&mut c)
    .await
    .unwrap();
    assert_eq!(indexes, ["tokenserver_sessions_expiry_idx"]);
    let columns: Vec<(String, i64)> =
        sqlx::query_as("SELECT name, pk FROM pragma_table_info('tokenserver_sessions') ORDER BY cid")
            .fetch_all(&mut c)
            .await
            .unwrap();
    let names: Vec<&str> = columns.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(names, ["token_hash", "meta", "expires_at", "deadline", "ttl_ms", "rotated_at", "successor", "sealed"]);
    let pk: Vec<&str> = columns.iter().filter(|(_, pk)| *pk > 0).map(|(n, _)| n.as_str()).collect();
    assert_eq!(pk, ["token_hash"]);
    let rows: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM tokenserver_sessions").fetch_one(&mut c).await.unwrap();
    assert_eq!(rows, 2, "the rotated record and its successor");
    let tables: i64 = sqlx::query_scalar(
        "SELECT COUNT(*) FROM sqlite_master WHERE name LIKE 'tokenserver_sessions_%' AND type = 'table'",
    )
    .fetch_one(&mut c)
    .await
    .unwrap();
    assert_eq!(tables, 0, "the moved-aside table is gone");
}

/// The first layout: keyed by token hash, with a session-id index.
#[tokio::test]
async fn sqlite_session_table_of_the_first_layout_is_migrated() {
    earlier_session_layout_is_migrated(&[
        "CREATE TABLE tokenserver_sessions (token_hash BLOB PRIMARY KEY NOT NULL, chain BLOB NOT NULL, \
         meta TEXT NOT NULL, expires_at INTEGER NOT NULL, deadline INTEGER NOT NULL, ttl_ms INTEGER NOT NULL, \
         rotated_at INTEGER, successor BLOB, sealed BLOB) WITHOUT ROWID",
        "CREATE INDEX tokenserver_sessions_chain_idx ON tokenserver_sessions (chain)",
        "CREATE INDEX tokenserver_sessions_expiry_idx ON tokenserver_sessions (expires_at)",
    ])
    .await;
}

/// The second layout: keyed by (session id, token hash).
#[tokio::test]
async fn sqlite_session_table_of_the_second_layout_is_migrated() {
    earlier_session_layout_is_migrated(&[
        "CREATE TABLE tokenserver_sessions (chain BLOB NOT NULL, token_hash BLOB NOT NULL, \
         meta TEXT NOT NULL, expires_at INTEGER NOT NULL, deadline INTEGER NOT NULL, ttl_ms INTEGER NOT NULL, \
         rotated_at INTEGER, successor BLOB, sealed BLOB, PRIMARY KEY (chain, token_hash)) WITHOUT ROWID",
        "CREATE INDEX tokenserver_sessions_expiry_idx ON tokenserver_sessions (expires_at)",
    ])
    .await;
}

#[cfg(unix)]
#[tokio::test]
async fn sqlite_files_are_created_readable_by_their_owner_only() {
    use std::os::unix::fs::PermissionsExt;
    let Some(db) = tokenserver_store::testing::fresh(Backend::Sqlite).await else { return };
    let (store, db) = crate::open_sync(db).await;
    store.ensure_service("notes-2", "{node}/2/{uid}").await.unwrap();
    let file = db.url.trim_start_matches("sqlite://").to_string();
    for path in [file.clone(), format!("{file}-wal"), format!("{file}-shm")] {
        let mode = std::fs::metadata(&path).unwrap_or_else(|e| panic!("{path}: {e}")).permissions().mode();
        assert_eq!(mode & 0o777, 0o600, "{path}: {mode:o}");
    }
    drop(store);
    db.drop_now().await;
}
