//! Expired access tokens leave nothing behind in the store itself: many short-lived tokens, of
//! applications and users that are never listed, then the sweep, then the store read directly
//! (SQL rows; Redis keys of every token hash and index set). The conformance cases see the store
//! only through its trait, which cannot tell a forgotten index entry from none.

use tokenserver_core::clock::now_ms;
use tokenserver_store::access::NewToken;
use tokenserver_store::testing::fresh;
use tokenserver_store::Backend;

async fn expired_tokens_leave_no_entry(backend: Backend) {
    let Some(db) = fresh(backend).await else { return };
    let (store, db) = crate::open_access(db).await;
    let now = now_ms();
    for i in 0..600 {
        let (token, app, user) = (format!("short-{i}"), format!("app-{}", i % 7), format!("user-{}", i % 13));
        let t = NewToken {
            service: if i % 2 == 0 { "svc-a" } else { "svc-b" },
            token: &token,
            app_id: &app,
            user_id: (i % 3 != 0).then_some(user.as_str()),
            expires_at: Some(now + 5),
            now,
        };
        store.create(&t).await.unwrap();
    }
    store
        .create(&NewToken {
            service: "svc-a",
            token: "kept",
            app_id: "app-0",
            user_id: Some("u"),
            expires_at: None,
            now,
        })
        .await
        .unwrap();
    let before = db.access_entries().await.unwrap();
    assert!(before > 600, "the inspection sees the tokens: {before}");
    assert_eq!(store.purge(now + 10).await.unwrap(), 600);
    let after = db.access_entries().await.unwrap();
    let one_token = match backend {
        // The token's row.
        Backend::Sqlite | Backend::Postgres | Backend::MySql => 1,
        // Its hash and its application's, user's and service's sets.
        _ => 4,
    };
    assert_eq!(after, one_token, "only the permanent token's entries remain ({before} before)");
    store.delete("svc-a", "kept", now + 10).await.unwrap();
    assert_eq!(db.access_entries().await.unwrap(), 0);
    db.drop_now().await;
}

macro_rules! per_backend {
    ($($name:ident => $backend:expr),+ $(,)?) => { $(
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn $name() { expired_tokens_leave_no_entry($backend).await }
    )+ };
}

mod expired_access_tokens_leave_no_entry {
    use super::*;
    per_backend! {
        sqlite => Backend::Sqlite,
        postgres => Backend::Postgres,
        mysql => Backend::MySql,
        redis => Backend::Redis,
        redis_cluster => Backend::RedisCluster,
    }
}
