//! SQLite only. Users' rows and access tokens are served from caches on the request path: a
//! write by any other connection (another process, the CLI) must be visible to the very next
//! read, and so must the store's own writes, from any task. And a session table of an earlier
//! layout is rewritten on open.

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

/// Access tokens read through the cache: each change made elsewhere (an update, a delete, a
/// token added, a log restarted by a checkpoint) shows in the very next read.
#[tokio::test]
async fn sqlite_access_tokens_see_other_connections_writes_at_once() {
    use tokenserver_core::clock::now_ms;
    use tokenserver_store::access::NewToken;
    let Some(db) = tokenserver_store::testing::fresh(Backend::Sqlite).await else { return };
    let (store, db) = crate::open_access(db).await;
    let now = now_ms();
    let new =
        |token: &'static str| NewToken { service: "svc", token, app_id: "app-0", user_id: None, expires_at: None, now };
    store.create(&new("tok")).await.unwrap();
    let mut other = sqlx::SqliteConnection::connect(&db.url).await.unwrap();
    for i in 0..40 {
        for _ in 0..2 {
            let t = store.get("svc", "tok", now).await.unwrap().unwrap();
            assert_eq!(t.grant.app_id, format!("app-{i}"), "iteration {i}");
        }
        if i % 10 == 9 {
            sqlx::query("PRAGMA wal_checkpoint(TRUNCATE)").execute(&mut other).await.unwrap();
        }
        sqlx::query("UPDATE tokenserver_access_tokens SET app_id = ? WHERE token = 'tok'")
            .bind(format!("app-{}", i + 1))
            .execute(&mut other)
            .await
            .unwrap();
    }
    // Expired elsewhere: gone at once.
    sqlx::query("UPDATE tokenserver_access_tokens SET expires_at = ? WHERE token = 'tok'")
        .bind(now as i64)
        .execute(&mut other)
        .await
        .unwrap();
    assert!(store.get("svc", "tok", now).await.unwrap().is_none());
    // Deleted elsewhere, after being read again.
    store.create(&new("tok2")).await.unwrap();
    assert!(store.get("svc", "tok2", now).await.unwrap().is_some());
    sqlx::query("DELETE FROM tokenserver_access_tokens WHERE token = 'tok2'").execute(&mut other).await.unwrap();
    assert!(store.get("svc", "tok2", now).await.unwrap().is_none());
    // Added elsewhere (a copy of a row under another service) where the cache had none.
    store.create(&new("tok3")).await.unwrap();
    assert!(store.get("other", "tok3", now).await.unwrap().is_none());
    sqlx::query(
        "INSERT INTO tokenserver_access_tokens (service, token_hash, token, app_id, user_id, expires_at, created_at) \
         SELECT 'other', token_hash, token, 'app-x', user_id, expires_at, created_at \
         FROM tokenserver_access_tokens WHERE token = 'tok3'",
    )
    .execute(&mut other)
    .await
    .unwrap();
    assert_eq!(store.get("other", "tok3", now).await.unwrap().unwrap().grant.app_id, "app-x");
    db.drop_now().await;
}

/// The store's own writes keep the tokens it did not touch cached, so many tasks create, read,
/// delete and read again at once: each must see its own change at once, and at the end the
/// reads must agree with the table.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sqlite_access_tokens_read_their_own_writes_under_concurrency() {
    use tokenserver_core::clock::now_ms;
    use tokenserver_store::access::NewToken;
    let Some(db) = tokenserver_store::testing::fresh(Backend::Sqlite).await else { return };
    let (store, db) = crate::open_access(db).await;
    let now = now_ms();
    let tasks = (0..32).map(|t| {
        let store = store.clone();
        tokio::spawn(async move {
            for round in 0..20 {
                let token = format!("t{t}-{round}");
                let app = format!("app-{t}-{round}");
                assert!(store.get("svc", &token, now).await.unwrap().is_none());
                let new =
                    NewToken { service: "svc", token: &token, app_id: &app, user_id: None, expires_at: None, now };
                store.create(&new).await.unwrap();
                assert_eq!(store.get("svc", &token, now).await.unwrap().unwrap().grant.app_id, app);
                if round % 2 == 0 {
                    assert!(store.delete("svc", &token, now).await.unwrap());
                    assert!(store.get("svc", &token, now).await.unwrap().is_none(), "{token} after delete");
                }
            }
            // Revoking an application's tokens takes the cached ones with it.
            assert_eq!(store.revoke_app("svc", &format!("app-{t}-1"), now).await.unwrap(), 1);
            assert!(store.get("svc", &format!("t{t}-1"), now).await.unwrap().is_none());
        })
    });
    for task in futures::future::join_all(tasks).await {
        task.unwrap();
    }
    let mut other = sqlx::SqliteConnection::connect(&db.url).await.unwrap();
    let stored: i64 =
        sqlx::query_scalar("SELECT COUNT(*) FROM tokenserver_access_tokens").fetch_one(&mut other).await.unwrap();
    assert_eq!(stored, 32 * 9);
    for t in 0..32 {
        for round in 0..20 {
            let live = round % 2 == 1 && round != 1;
            let found = store.get("svc", &format!("t{t}-{round}"), now).await.unwrap();
            assert_eq!(found.is_some(), live, "t{t}-{round}");
        }
    }
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
