//! MySQL / MariaDB only: the schema is Mozilla's, a database at an older Mozilla migration level
//! is upgraded exactly as diesel would, and one without bookkeeping is adopted as it is.

use sqlx::Connection;
use tokenserver_store::testing::fresh;
use tokenserver_store::{Backend, StoreSettings};

use crate::schema::{adopts_existing_tables, migrated};

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
    let store = tokenserver_store::open_sync(&db.url, &StoreSettings::default()).await.unwrap();
    let report = store.migrate().await.unwrap();
    assert_eq!(report.applied.len(), 7, "{report:?}");
    assert_eq!(mysql_shape(&db.url).await, want);
    c.close().await.unwrap();
    reference.drop_now().await;
    db.drop_now().await;
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
