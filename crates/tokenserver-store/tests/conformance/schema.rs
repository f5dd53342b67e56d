//! Migrations share a database politely with Mozilla's server, scripts and syncstorage, on every
//! network SQL backend; the schemas themselves are checked in `postgres_only.rs` and
//! `mysql_only.rs`.

use sqlx::{Connection, Row};
use tokenserver_store::testing::fresh;
use tokenserver_store::{Backend, StoreSettings};

pub async fn migrated(backend: Backend) -> Option<tokenserver_store::testing::FreshDb> {
    let db = fresh(backend).await?;
    let store = tokenserver_store::open_sync(&db.url, &StoreSettings::default()).await.unwrap();
    store.migrate().await.unwrap();
    Some(db)
}

/// Mozilla tables without bookkeeping (databases that predate diesel): adopted, nothing changed.
pub async fn adopts_existing_tables(backend: Backend, ddl: &[&str]) {
    let Some(db) = fresh(backend).await else { return };
    let store = tokenserver_store::open_sync(&db.url, &StoreSettings::default()).await.unwrap();
    let run = |sql: &'static str| {
        let url = db.url.clone();
        async move {
            match backend {
                Backend::Postgres => {
                    let mut c = sqlx::PgConnection::connect(&url).await.unwrap();
                    sqlx::query(sql).execute(&mut c).await.unwrap();
                }
                _ => {
                    let mut c = sqlx::MySqlConnection::connect(&url).await.unwrap();
                    sqlx::query(sql).execute(&mut c).await.unwrap();
                }
            }
        }
    };
    for sql in ddl {
        let sql: &'static str = Box::leak(sql.to_string().into_boxed_str());
        run(sql).await;
    }
    assert!(store.migrate().await.unwrap().applied.is_empty());
    // No bookkeeping table was created, no row added.
    let count_sql = match backend {
        Backend::Postgres => "SELECT COUNT(*) FROM information_schema.tables WHERE table_schema = current_schema() AND table_name = '__diesel_schema_migrations'",
        _ => "SELECT COUNT(*) FROM information_schema.tables WHERE table_schema = DATABASE() AND table_name = '__diesel_schema_migrations'",
    };
    let n: i64 = match backend {
        Backend::Postgres => {
            let mut c = sqlx::PgConnection::connect(&db.url).await.unwrap();
            sqlx::query(count_sql).fetch_one(&mut c).await.unwrap().get(0)
        }
        _ => {
            let mut c = sqlx::MySqlConnection::connect(&db.url).await.unwrap();
            sqlx::query(count_sql).fetch_one(&mut c).await.unwrap().get(0)
        }
    };
    assert_eq!(n, 0);
    assert!(store.user_rows("sync-1.5", "a@x").await.unwrap().is_empty());
    drop(store);
    db.drop_now().await;
}

/// syncstorage's diesel rows in a shared database are left alone and ours are added.
#[tokio::test]
async fn shared_bookkeeping_keeps_other_rows() {
    for backend in [Backend::Postgres, Backend::MySql] {
        let Some(db) = fresh(backend).await else { continue };
        let create = "CREATE TABLE __diesel_schema_migrations (version VARCHAR(50) PRIMARY KEY NOT NULL, run_on TIMESTAMP NOT NULL DEFAULT CURRENT_TIMESTAMP)";
        let insert = "INSERT INTO __diesel_schema_migrations (version) VALUES ('20180101000000')";
        let count = "SELECT COUNT(*) FROM __diesel_schema_migrations WHERE version = '20180101000000'";
        let store = tokenserver_store::open_sync(&db.url, &StoreSettings::default()).await.unwrap();
        let n: i64 = if backend == Backend::Postgres {
            let mut c = sqlx::PgConnection::connect(&db.url).await.unwrap();
            sqlx::query(create).execute(&mut c).await.unwrap();
            sqlx::query(insert).execute(&mut c).await.unwrap();
            assert!(!store.migrate().await.unwrap().applied.is_empty());
            sqlx::query(count).fetch_one(&mut c).await.unwrap().get(0)
        } else {
            let mut c = sqlx::MySqlConnection::connect(&db.url).await.unwrap();
            sqlx::query(create).execute(&mut c).await.unwrap();
            sqlx::query(insert).execute(&mut c).await.unwrap();
            assert!(!store.migrate().await.unwrap().applied.is_empty());
            sqlx::query(count).fetch_one(&mut c).await.unwrap().get(0)
        };
        assert_eq!(n, 1, "{backend:?}");
        assert!(store.migrate().await.unwrap().applied.is_empty());
        drop(store);
        db.drop_now().await;
    }
}
