//! The `SyncStore` and `SyncTx` implementations shared by the SQL backends, stamped out per
//! backend by [`sync_store!`](crate::sql_backend::sync_store).
//!
//! A backend module provides, in scope of the macro call:
//! * `sql::*` — its SQL, one `const` per statement, with the same bind order on every backend
//!   (PostgreSQL repeats a value as `$5` rather than reusing `$1`); `sql::LOCK_USER` is
//!   `Option<&str>`, `None` where writes are already serialized;
//! * `insert_id(query, executor)` — runs an `INSERT` and returns the new row's id
//!   (`RETURNING` or `LAST_INSERT_ID()`);
//! * on the store: `reader()`, `writer()` pools and `begin_write()`, `probe()` (the health
//!   check: a round trip on the connections the request path reads through), plus
//!   `run_migrations()` (which
//!   takes the backend's migration lock and calls the generated `apply_migrations`) and
//!   `generated_secret()`;
//! * `sql::EXISTING_TABLES`, `sql::APPLIED_VERSIONS`, `sql::RECORD_VERSION` for the bookkeeping;
//! * `request_path:` the methods serving the request path's read, allocation and change — the
//!   generated `leased_user_rows` (given `leased_reads:`, the store's
//!   [`crate::read_pool::ReadPool`] field), `sqlx_allocate`, `sqlx_change`, or faster ones of its
//!   own.
//!
//! Everything else — what each method does and the transactional logic of `tx.rs` — is
//! written once.

macro_rules! sync_store {
    (
        store: $store:ty, db: $db:ty, row: $row:ty, conn: $conn:ty,
        request_path: ($user_rows:ident, $allocate:ident, $change:ident)
        $(, leased_reads: $reads:ident)? $(,)?
    ) => {
        use async_trait::async_trait;
        use sqlx::Row;
        use tokenserver_core::sync::allocation::NodeState;
        use tokenserver_core::sync::users::UserRow;

        use crate::sync::{Allocate, MigrationReport, NewNode, NodeRecord, Result, SyncStore, UserChange};
        use crate::tx::{self, NewUser, SyncTx};
        use crate::StoreError;

        fn user_row(r: &$row) -> std::result::Result<UserRow, sqlx::Error> {
            Ok(UserRow {
                uid: r.try_get(0)?,
                node_id: r.try_get(1)?,
                node: r.try_get(2)?,
                generation: r.try_get(3)?,
                keys_changed_at: r.try_get(4)?,
                client_state: r.try_get(5)?,
                created_at: r.try_get(6)?,
                replaced_at: r.try_get(7)?,
            })
        }

        fn node_state(r: &$row, offset: usize) -> std::result::Result<NodeState, sqlx::Error> {
            Ok(NodeState {
                id: r.try_get(offset)?,
                node: r.try_get(offset + 1)?,
                available: r.try_get(offset + 2)?,
                current_load: r.try_get(offset + 3)?,
                capacity: r.try_get(offset + 4)?,
                downed: r.try_get(offset + 5)?,
                backoff: r.try_get(offset + 6)?,
            })
        }

        async fn rows_of(conn: &mut $conn, service: &str, email: &str) -> Result<Vec<UserRow>> {
            let rows = sqlx::query(sql::USER_ROWS).bind(email).bind(service).fetch_all(conn).await?;
            Ok(rows.iter().map(user_row).collect::<std::result::Result<_, _>>()?)
        }

        async fn service_id(conn: &mut $conn, service: &str) -> Result<Option<i64>> {
            Ok(sqlx::query_scalar::<_, i64>(sql::SERVICE_ID).bind(service).fetch_optional(conn).await?)
        }

        async fn require_service(conn: &mut $conn, service: &str) -> Result<i64> {
            service_id(conn, service).await?.ok_or_else(|| StoreError::UnknownService(service.to_string()))
        }

        /// Brings the schema up to date on `conn` (which holds the backend's migration lock):
        /// reads what exists, plans with [`crate::migrate::plan`], applies and records.
        pub(super) async fn apply_migrations(
            conn: &mut $conn,
            all: &[crate::migrate::Migration],
        ) -> Result<MigrationReport> {
            let tables: Vec<String> = sqlx::query_scalar(sql::EXISTING_TABLES).fetch_all(&mut *conn).await?;
            let has_bookkeeping = tables.iter().any(|t| t == "__diesel_schema_migrations");
            let applied: Vec<String> = if has_bookkeeping {
                sqlx::query_scalar(sql::APPLIED_VERSIONS).fetch_all(&mut *conn).await?
            } else {
                Vec::new()
            };
            let existing = crate::migrate::Existing {
                schema_tables: tables.iter().filter(|t| !t.starts_with("__")).count(),
                has_bookkeeping,
                applied,
            };
            let todo = crate::migrate::plan(all, &existing);
            if !todo.is_empty() && !has_bookkeeping {
                sqlx::query(crate::migrate::CREATE_BOOKKEEPING).execute(&mut *conn).await?;
            }
            let mut report = MigrationReport::default();
            for m in todo {
                for statement in m.statements() {
                    sqlx::query(statement).execute(&mut *conn).await?;
                }
                sqlx::query(sql::RECORD_VERSION).bind(m.version).execute(&mut *conn).await?;
                report.applied.push(m.version.to_string());
            }
            Ok(report)
        }

        impl $store {
            /// `allocate_user` in a sqlx write transaction.
            async fn sqlx_allocate(&self, req: &Allocate<'_>) -> Result<UserRow> {
                let mut tx = Tx(self.begin_write().await?);
                let row = tx::allocate(&mut tx, req).await?;
                tx.0.commit().await?;
                Ok(row)
            }

            /// `change_user` in a sqlx write transaction.
            async fn sqlx_change(
                &self,
                service: &str,
                email: &str,
                expected_current: i64,
                change: &UserChange<'_>,
                now_ms: i64,
            ) -> Result<i64> {
                let mut tx = Tx(self.begin_write().await?);
                let uid = tx::change(&mut tx, service, email, expected_current, change, now_ms).await?;
                tx.0.commit().await?;
                Ok(uid)
            }

            $(
            /// A user's rows on a connection of the store's [`crate::read_pool`] (no ping when
            /// it goes back).
            async fn leased_user_rows(&self, service: &str, email: &str) -> Result<Vec<UserRow>> {
                let mut lease = self.$reads.get().await?;
                let rows = rows_of(&mut lease, service, email).await?;
                lease.keep();
                Ok(rows)
            }
            )?
        }

        #[async_trait]
        impl crate::alloc_queue::BatchAllocator for $store {
            async fn allocate_batch(&self, reqs: &[Allocate<'_>]) -> Result<Vec<Result<UserRow>>> {
                let mut tx = Tx(self.begin_write().await?);
                let results = tx::allocate_batch(&mut tx, reqs).await?;
                tx.0.commit().await?;
                Ok(results)
            }

            async fn allocate_one(&self, req: &Allocate<'_>) -> Result<UserRow> {
                self.sqlx_allocate(req).await
            }
        }

        /// A write transaction.
        struct Tx(sqlx::Transaction<'static, $db>);

        #[async_trait]
        impl SyncTx for Tx {
            async fn service_id(&mut self, service: &str) -> Result<Option<i64>> {
                service_id(&mut self.0, service).await
            }

            async fn lock_user(&mut self, service_id: i64, email: &str) -> Result<()> {
                if let Some(lock) = sql::LOCK_USER {
                    sqlx::query(lock).bind(email).bind(service_id).fetch_all(&mut *self.0).await?;
                }
                Ok(())
            }

            async fn user_rows(&mut self, service: &str, email: &str) -> Result<Vec<UserRow>> {
                rows_of(&mut self.0, service, email).await
            }

            async fn lock_nodes(&mut self, service_id: i64) -> Result<Vec<NodeState>> {
                let rows = sqlx::query(sql::LOCK_NODES).bind(service_id).fetch_all(&mut *self.0).await?;
                Ok(rows.iter().map(|r| node_state(r, 0)).collect::<std::result::Result<_, _>>()?)
            }

            async fn set_available(&mut self, node_id: i64, available: i64) -> Result<()> {
                sqlx::query(sql::RELEASE).bind(available).bind(node_id).execute(&mut *self.0).await?;
                Ok(())
            }

            async fn add_user_to_node(&mut self, node_id: i64) -> Result<()> {
                sqlx::query(sql::ADD_USER_TO_NODE).bind(node_id).execute(&mut *self.0).await?;
                Ok(())
            }

            async fn insert_user(&mut self, u: NewUser<'_>) -> Result<i64> {
                let q = sqlx::query(sql::POST_USER)
                    .bind(u.service_id)
                    .bind(u.email)
                    .bind(u.generation)
                    .bind(u.client_state)
                    .bind(u.created_at)
                    .bind(u.node_id)
                    .bind(u.keys_changed_at);
                insert_id(q, &mut *self.0).await
            }

            async fn put_user(
                &mut self,
                service_id: i64,
                email: &str,
                generation: i64,
                kca: Option<i64>,
            ) -> Result<()> {
                sqlx::query(sql::PUT_USER)
                    .bind(generation)
                    .bind(kca)
                    .bind(service_id)
                    .bind(email)
                    .bind(generation)
                    .bind(kca)
                    .execute(&mut *self.0)
                    .await?;
                Ok(())
            }

            async fn replace_others(&mut self, service_id: i64, email: &str, keep_uid: i64, now_ms: i64) -> Result<()> {
                sqlx::query(sql::REPLACE_OTHERS)
                    .bind(now_ms)
                    .bind(service_id)
                    .bind(email)
                    .bind(keep_uid)
                    .execute(&mut *self.0)
                    .await?;
                Ok(())
            }
        }

        #[async_trait]
        impl SyncStore for $store {
            async fn migrate(&self) -> Result<MigrationReport> {
                self.run_migrations().await
            }

            async fn check(&self) -> Result<()> {
                self.probe().await
            }

            async fn user_rows(&self, service: &str, email: &str) -> Result<Vec<UserRow>> {
                self.$user_rows(service, email).await
            }

            async fn allocate_user(&self, req: &Allocate<'_>) -> Result<UserRow> {
                self.$allocate(req).await
            }

            async fn change_user(
                &self,
                service: &str,
                email: &str,
                expected_current: i64,
                change: &UserChange<'_>,
                now_ms: i64,
            ) -> Result<i64> {
                self.$change(service, email, expected_current, change, now_ms).await
            }

            async fn replace_rows(&self, service: &str, uids: &[i64], replaced_at: i64) -> Result<()> {
                let mut tx = self.begin_write().await?;
                for uid in uids {
                    sqlx::query(sql::REPLACE_USER).bind(replaced_at).bind(service).bind(uid).execute(&mut *tx).await?;
                }
                tx.commit().await?;
                Ok(())
            }

            async fn retire_user(&self, service: &str, email: &str, now_ms: i64) -> Result<u64> {
                let done = sqlx::query(sql::RETIRE_USER)
                    .bind(tokenserver_core::sync::MAX_GENERATION)
                    .bind(now_ms)
                    .bind(service)
                    .bind(email)
                    .execute(self.writer())
                    .await?;
                Ok(done.rows_affected())
            }

            async fn update_user_generation(
                &self,
                service: &str,
                email: &str,
                generation: Option<i64>,
                keys_changed_at: Option<i64>,
            ) -> Result<u64> {
                let done = sqlx::query(sql::UPDATE_USER_GENERATION)
                    .bind(generation)
                    .bind(keys_changed_at)
                    .bind(service)
                    .bind(email)
                    .bind(generation)
                    .bind(keys_changed_at)
                    .execute(self.writer())
                    .await?;
                Ok(done.rows_affected())
            }

            async fn add_node(&self, node: &NewNode<'_>) -> Result<NodeRecord> {
                let mut tx = self.begin_write().await?;
                let service = require_service(&mut tx, node.service).await?;
                let q = sqlx::query(sql::INSERT_NODE)
                    .bind(service)
                    .bind(node.node)
                    .bind(node.available)
                    .bind(node.current_load)
                    .bind(node.capacity)
                    .bind(i64::from(node.downed))
                    .bind(i64::from(node.backoff));
                let id = insert_id(q, &mut *tx).await.map_err(|e| match e {
                    StoreError::AlreadyExists(_) => StoreError::AlreadyExists(format!("node {}", node.node)),
                    other => other,
                })?;
                tx.commit().await?;
                Ok(crate::sync::node_record(node, id))
            }

            async fn init_node(&self, service: &str, node: &str, capacity: i64) -> Result<bool> {
                let mut tx = self.begin_write().await?;
                let service = require_service(&mut tx, service).await?;
                let done = sqlx::query(sql::INIT_NODE)
                    .bind(service)
                    .bind(node)
                    .bind(capacity)
                    .bind(capacity)
                    .execute(&mut *tx)
                    .await?;
                tx.commit().await?;
                Ok(done.rows_affected() > 0)
            }

            async fn list_nodes(&self, service: Option<&str>) -> Result<Vec<NodeRecord>> {
                let rows = sqlx::query(sql::LIST_NODES).bind(service).bind(service).fetch_all(self.reader()).await?;
                rows.iter()
                    .map(|r| Ok(NodeRecord { service: r.try_get(0)?, state: node_state(r, 1)? }))
                    .collect::<std::result::Result<_, sqlx::Error>>()
                    .map_err(StoreError::from)
            }

            async fn ensure_service(&self, service: &str, pattern: &str) -> Result<i64> {
                let mut conn = self.writer().acquire().await?;
                if let Some(id) = service_id(&mut conn, service).await? {
                    return Ok(id);
                }
                // No transaction: a unique violation (another process inserted it meanwhile) is
                // fine, and would abort a PostgreSQL transaction.
                if let Err(e) = sqlx::query(sql::INSERT_SERVICE).bind(service).bind(pattern).execute(&mut *conn).await {
                    match StoreError::from(e) {
                        StoreError::AlreadyExists(_) => {}
                        other => return Err(other),
                    }
                }
                require_service(&mut conn, service).await
            }

            async fn generated_master_secret(
                &self,
                generate: &(dyn Fn() -> String + Send + Sync),
            ) -> Result<(String, bool)> {
                self.generated_secret(generate).await
            }
        }
    };
}

pub(crate) use sync_store;
