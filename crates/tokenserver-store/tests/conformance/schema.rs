//! The schemas are Mozilla's, column for column and index for index, and migrations share a
//! database politely with Mozilla's server, scripts and syncstorage.

use sqlx::{Connection, Row};
use tokenserver_store::testing::fresh;
use tokenserver_store::{Backend, PoolSettings};

async fn migrated(backend: Backend) -> Option<tokenserver_store::testing::FreshDb> {
    let db = fresh(backend).await?;
    let store = tokenserver_store::open_sync(&db.url, &PoolSettings::default()).await.unwrap();
    store.migrate().await.unwrap();
    Some(db)
}

const PG_COLUMNS: &str = "SELECT table_name::TEXT, column_name::TEXT, data_type::TEXT, is_nullable::TEXT, \
    COALESCE(character_maximum_length, 0)::BIGINT FROM information_schema.columns \
    WHERE table_schema = current_schema() AND table_name IN ('services', 'nodes', 'users') \
    ORDER BY table_name, ordinal_position";

#[tokio::test]
async fn postgres_schema_is_mozillas() {
    let Some(db) = migrated(Backend::Postgres).await else { return };
    let mut c = sqlx::PgConnection::connect(&db.url).await.unwrap();
    let cols: Vec<(String, String, String, String, i64)> = sqlx::query_as(PG_COLUMNS).fetch_all(&mut c).await.unwrap();
    let got: Vec<String> = cols.iter().map(|(t, c, ty, n, len)| format!("{t}.{c} {ty}({len}) {n}")).collect();
    #[rustfmt::skip]
    let want = [
        "nodes.id bigint(0) NO", "nodes.service integer(0) NO", "nodes.node character varying(64) NO",
        "nodes.available integer(0) NO", "nodes.current_load integer(0) NO", "nodes.capacity integer(0) NO",
        "nodes.downed integer(0) NO", "nodes.backoff integer(0) NO",
        "services.id integer(0) NO", "services.service character varying(30) YES", "services.pattern character varying(128) YES",
        "users.uid bigint(0) NO", "users.service integer(0) NO", "users.email character varying(255) NO",
        "users.generation bigint(0) NO", "users.client_state character varying(32) NO", "users.created_at bigint(0) NO",
        "users.replaced_at bigint(0) YES", "users.nodeid bigint(0) NO", "users.keys_changed_at bigint(0) YES",
    ];
    assert_eq!(got, want);
    let indexes: Vec<String> = sqlx::query_scalar(
        "SELECT indexname::TEXT FROM pg_indexes WHERE schemaname = current_schema() ORDER BY indexname",
    )
    .fetch_all(&mut c)
    .await
    .unwrap();
    #[rustfmt::skip]
    let want_idx = ["__diesel_schema_migrations_pkey", "lookup_idx", "node_idx", "nodes_pkey", "nodes_service_node_key",
        "replaced_at_idx", "services_pkey", "services_service_key", "users_pkey"];
    assert_eq!(indexes, want_idx);
    let fks: i64 = sqlx::query_scalar(
        "SELECT COUNT(*) FROM information_schema.table_constraints WHERE table_schema = current_schema() AND constraint_type = 'FOREIGN KEY'",
    )
    .fetch_one(&mut c)
    .await
    .unwrap();
    assert_eq!(fks, 0);
    let versions: Vec<String> =
        sqlx::query_scalar("SELECT version::TEXT FROM __diesel_schema_migrations").fetch_all(&mut c).await.unwrap();
    assert_eq!(versions, ["20250902195720"]);
    let svc: (String, String) =
        sqlx::query_as("SELECT service::TEXT, pattern::TEXT FROM services").fetch_one(&mut c).await.unwrap();
    assert_eq!(svc, ("sync-1.5".to_string(), "{node}/1.5/{uid}".to_string()));
    // Explicit ids are allowed (Mozilla's integration tests insert node id 800).
    sqlx::query("INSERT INTO nodes (id, service, node, available, current_load, capacity, downed, backoff) VALUES (800, 1, 'https://example.com', 100, 0, 100, 0, 0)")
        .execute(&mut c)
        .await
        .unwrap();
    c.close().await.unwrap();
    db.drop_now().await;
}

const MYSQL_COLUMNS: &str = "SELECT CAST(table_name AS CHAR), CAST(column_name AS CHAR), CAST(column_type AS CHAR), \
    CAST(is_nullable AS CHAR), CAST(COALESCE(column_default, 'none') AS CHAR), CAST(extra AS CHAR) \
    FROM information_schema.columns WHERE table_schema = DATABASE() AND table_name IN ('services', 'nodes', 'users') \
    ORDER BY table_name, ordinal_position";

async fn mysql_shape(url: &str) -> (Vec<String>, Vec<String>, i64) {
    let mut c = sqlx::MySqlConnection::connect(url).await.unwrap();
    let cols: Vec<(String, String, String, String, String, String)> =
        sqlx::query_as(MYSQL_COLUMNS).fetch_all(&mut c).await.unwrap();
    let cols = cols
        .iter()
        .map(|(t, c, ty, n, d, x)| {
            // MariaDB spells the default of a nullable column `NULL`, MySQL leaves it NULL.
            let d = if d == "NULL" { "none" } else { d };
            format!("{t}.{c} {ty} {n} default={d} {x}").trim_end().to_string()
        })
        .collect();
    let idx: Vec<(String, String, i64, i64)> = sqlx::query_as(
        "SELECT CAST(table_name AS CHAR), CAST(index_name AS CHAR), CAST(seq_in_index AS SIGNED), CAST(non_unique AS SIGNED) \
         FROM information_schema.statistics WHERE table_schema = DATABASE() AND table_name IN ('services', 'nodes', 'users') \
         ORDER BY table_name, index_name, seq_in_index",
    )
    .fetch_all(&mut c)
    .await
    .unwrap();
    let mut idx: Vec<String> = idx.iter().map(|(t, i, s, u)| format!("{t}.{i}#{s} unique={}", *u == 0)).collect();
    idx.sort();
    let fks: i64 = sqlx::query_scalar(
        "SELECT COUNT(*) FROM information_schema.referential_constraints WHERE constraint_schema = DATABASE()",
    )
    .fetch_one(&mut c)
    .await
    .unwrap();
    (cols, idx, fks)
}

#[tokio::test]
async fn mysql_schema_is_mozillas() {
    let Some(db) = migrated(Backend::MySql).await else { return };
    let (cols, idx, fks) = mysql_shape(&db.url).await;
    #[rustfmt::skip]
    let want = [
        "nodes.id bigint(20) NO default=none auto_increment", "nodes.service int(11) NO default=none",
        "nodes.node varchar(64) NO default=none", "nodes.available int(11) NO default=none",
        "nodes.current_load int(11) NO default=none", "nodes.capacity int(11) NO default=none",
        "nodes.downed int(11) NO default=none", "nodes.backoff int(11) NO default=none",
        "services.id int(11) NO default=none auto_increment", "services.service varchar(30) YES default=none",
        "services.pattern varchar(128) YES default=none",
        "users.uid bigint(20) NO default=none auto_increment", "users.service int(11) NO default=none",
        "users.email varchar(255) NO default=none", "users.generation bigint(20) NO default=none",
        "users.client_state varchar(32) NO default=none", "users.created_at bigint(20) NO default=none",
        "users.replaced_at bigint(20) YES default=none", "users.nodeid bigint(20) NO default=none",
        "users.keys_changed_at bigint(20) YES default=none",
    ];
    // MySQL 8 omits integer display widths; MariaDB prints them.
    let normalise = |s: &str| s.replace("(20)", "").replace("(11)", "");
    assert_eq!(
        cols.iter().map(|c| normalise(c)).collect::<Vec<_>>(),
        want.iter().map(|c| normalise(c)).collect::<Vec<_>>()
    );
    #[rustfmt::skip]
    let want_idx = [
        "nodes.PRIMARY#1 unique=true", "nodes.unique_idx#1 unique=true", "nodes.unique_idx#2 unique=true",
        "services.PRIMARY#1 unique=true", "services.service#1 unique=true",
        "users.PRIMARY#1 unique=true", "users.lookup_idx#1 unique=false", "users.lookup_idx#2 unique=false",
        "users.lookup_idx#3 unique=false", "users.node_idx#1 unique=false", "users.replaced_at_idx#1 unique=false",
        "users.replaced_at_idx#2 unique=false",
    ];
    assert_eq!(idx, want_idx);
    assert_eq!(fks, 0);
    let mut c = sqlx::MySqlConnection::connect(&db.url).await.unwrap();
    let versions: Vec<String> =
        sqlx::query_scalar("SELECT CAST(version AS CHAR) FROM __diesel_schema_migrations ORDER BY version")
            .fetch_all(&mut c)
            .await
            .unwrap();
    #[rustfmt::skip]
    assert_eq!(versions, ["20210716001122", "20210803234845", "20210930142643", "20210930142654", "20210930142746",
        "20210930144043", "20210930144225", "20211222160451", "202602261853170000"]);
    // As on a fresh Mozilla database: ids 1 and 2 were consumed, sync-1.5 is id 3.
    let svc: (i64, String) = sqlx::query_as("SELECT CAST(id AS SIGNED), CAST(service AS CHAR) FROM services")
        .fetch_one(&mut c)
        .await
        .unwrap();
    assert_eq!(svc, (3, "sync-1.5".to_string()));
    let collation: String = sqlx::query_scalar(
        "SELECT CAST(table_collation AS CHAR) FROM information_schema.tables WHERE table_schema = DATABASE() AND table_name = 'users'",
    )
    .fetch_one(&mut c)
    .await
    .unwrap();
    assert!(collation.starts_with("utf8"), "{collation}");
    c.close().await.unwrap();
    db.drop_now().await;
}

#[tokio::test]
async fn mysql_database_at_an_older_mozilla_level_is_upgraded_like_diesel_would() {
    let Some(reference) = migrated(Backend::MySql).await else { return };
    let want = mysql_shape(&reference.url).await;
    // A database Mozilla's server migrated up to 2021-08-03 only: original DDL with foreign
    // keys and defaults, two bookkeeping rows.
    let db = fresh(Backend::MySql).await.unwrap();
    let mut c = sqlx::MySqlConnection::connect(&db.url).await.unwrap();
    for statement in [
        "CREATE TABLE __diesel_schema_migrations (version VARCHAR(50) PRIMARY KEY NOT NULL, run_on TIMESTAMP NOT NULL DEFAULT CURRENT_TIMESTAMP)",
        "INSERT INTO __diesel_schema_migrations (version) VALUES ('20210716001122'), ('20210803234845')",
        "CREATE TABLE services (id int NOT NULL AUTO_INCREMENT, service varchar(30) DEFAULT NULL, pattern varchar(128) DEFAULT NULL, PRIMARY KEY (id), UNIQUE KEY service (service))",
        "CREATE TABLE nodes (id bigint NOT NULL AUTO_INCREMENT, service int NOT NULL, node varchar(64) NOT NULL, available int NOT NULL DEFAULT '0', current_load int NOT NULL DEFAULT '0', capacity int NOT NULL DEFAULT '0', downed int NOT NULL DEFAULT '0', backoff int NOT NULL DEFAULT '0', PRIMARY KEY (id), KEY service (service), CONSTRAINT nodes_ibfk_1 FOREIGN KEY (service) REFERENCES services (id))",
        "CREATE TABLE users (uid bigint NOT NULL AUTO_INCREMENT, service int NOT NULL, email varchar(255) NOT NULL, generation bigint NOT NULL, client_state varchar(32) NOT NULL, created_at bigint NOT NULL, replaced_at bigint DEFAULT NULL, nodeid bigint NOT NULL, keys_changed_at bigint DEFAULT NULL, PRIMARY KEY (uid), KEY nodeid (nodeid), CONSTRAINT users_ibfk_1 FOREIGN KEY (nodeid) REFERENCES nodes (id)) ENGINE=InnoDB AUTO_INCREMENT=4 DEFAULT CHARSET=utf8",
        "INSERT INTO services (id, service, pattern) VALUES (1, 'sync-1.1', '{node}/1.1/{uid}'), (2, 'sync-1.5', '{node}/1.5/{uid}')",
    ] {
        sqlx::query(statement).execute(&mut c).await.unwrap();
    }
    let store = tokenserver_store::open_sync(&db.url, &PoolSettings::default()).await.unwrap();
    let report = store.migrate().await.unwrap();
    assert_eq!(report.applied.len(), 7, "{report:?}");
    assert_eq!(mysql_shape(&db.url).await, want);
    c.close().await.unwrap();
    reference.drop_now().await;
    db.drop_now().await;
}

/// Mozilla tables without bookkeeping (databases that predate diesel): adopted, nothing changed.
async fn adopts_existing_tables(backend: Backend, ddl: &[&str]) {
    let Some(db) = fresh(backend).await else { return };
    let store = tokenserver_store::open_sync(&db.url, &PoolSettings::default()).await.unwrap();
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

#[tokio::test]
async fn postgres_adopts_a_database_without_bookkeeping() {
    adopts_existing_tables(Backend::Postgres, &[
        "CREATE TABLE services (id INTEGER GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY, service VARCHAR(30) UNIQUE, pattern VARCHAR(128))",
        "CREATE TABLE nodes (id BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY, service INTEGER NOT NULL, node VARCHAR(64) NOT NULL, available INTEGER NOT NULL, current_load INTEGER NOT NULL, capacity INTEGER NOT NULL, downed INTEGER NOT NULL, backoff INTEGER NOT NULL, UNIQUE (service, node))",
        "CREATE TABLE users (uid BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY, service INTEGER NOT NULL, email VARCHAR(255) NOT NULL, generation BIGINT NOT NULL, client_state VARCHAR(32) NOT NULL, created_at BIGINT NOT NULL, replaced_at BIGINT, nodeid BIGINT NOT NULL, keys_changed_at BIGINT)",
    ])
    .await;
}

#[tokio::test]
async fn mysql_adopts_a_database_without_bookkeeping() {
    adopts_existing_tables(Backend::MySql, &[
        "CREATE TABLE services (id int NOT NULL AUTO_INCREMENT, service varchar(30) DEFAULT NULL, pattern varchar(128) DEFAULT NULL, PRIMARY KEY (id), UNIQUE KEY service (service))",
        "CREATE TABLE nodes (id bigint NOT NULL AUTO_INCREMENT, service int NOT NULL, node varchar(64) NOT NULL, available int NOT NULL, current_load int NOT NULL, capacity int NOT NULL, downed int NOT NULL, backoff int NOT NULL, PRIMARY KEY (id), UNIQUE KEY unique_idx (service, node))",
        "CREATE TABLE users (uid bigint NOT NULL AUTO_INCREMENT, service int NOT NULL, email varchar(255) NOT NULL, generation bigint NOT NULL, client_state varchar(32) NOT NULL, created_at bigint NOT NULL, replaced_at bigint DEFAULT NULL, nodeid bigint NOT NULL, keys_changed_at bigint DEFAULT NULL, PRIMARY KEY (uid))",
    ])
    .await;
}

/// syncstorage's diesel rows in a shared database are left alone and ours are added.
#[tokio::test]
async fn shared_bookkeeping_keeps_other_rows() {
    for backend in [Backend::Postgres, Backend::MySql] {
        let Some(db) = fresh(backend).await else { continue };
        let create = "CREATE TABLE __diesel_schema_migrations (version VARCHAR(50) PRIMARY KEY NOT NULL, run_on TIMESTAMP NOT NULL DEFAULT CURRENT_TIMESTAMP)";
        let insert = "INSERT INTO __diesel_schema_migrations (version) VALUES ('20180101000000')";
        let count = "SELECT COUNT(*) FROM __diesel_schema_migrations WHERE version = '20180101000000'";
        let store = tokenserver_store::open_sync(&db.url, &PoolSettings::default()).await.unwrap();
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

/// A session table of an earlier SQLite layout is rewritten on open, keeping its rows: a token
/// issued before the upgrade (first format, keyed by its whole SHA-256) still rotates, and the
/// table ends keyed by token hash alone with only the expiry index.
async fn earlier_session_layout_is_migrated(create: &[&str]) {
    use tokenserver_core::session::{MetaLimits, RotateRequest, RotationPolicy};
    use tokenserver_store::session::{now_ms, RotateOutcome};

    let Some(db) = fresh(Backend::Sqlite).await else { return };
    let token = crate::session::first_format_token();
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
    let store = tokenserver_store::session::open(
        &db.url,
        &PoolSettings::default(),
        tokenserver_store::session::MemoryOptions { shards: 1, ..Default::default() },
    )
    .await
    .unwrap();
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
