//! The `SyncStore` and `SyncTx` implementations shared by PostgreSQL and MySQL, written once and
//! stamped out per backend by [`sync_store!`] into a module of its own (`stamped`), because sqlx's
//! types differ per database. What a backend supplies is named in the call, as code:
//!
//! * `sql:` its statements, a type implementing [`crate::sql::SyncSql`];
//! * `insert_id:` a function running an `INSERT` and returning the new row's id (`RETURNING`, or
//!   `LAST_INSERT_ID()`);
//! * `lock_users:`, `users_rows:`, `insert_users:` the set-based steps of a batch of allocations
//!   ([`crate::sql::tx::SyncTx`]): one statement for many users where the backend can;
//! * `store:` the store type, with fields `pool` (writes), `reads`
//!   ([`crate::sql::read_pool::ReadPool`]: the request path's reads and the health check),
//!   `user_reads` (a [`crate::batch::Batcher`] of users' rows reads, one statement for the reads
//!   waiting at that moment: the backend's `rows_many`) and `allocations` (its
//!   [`crate::sql::alloc_queue`]), and a `run_migrations()` method that takes the backend's
//!   migration lock and calls the stamped `apply_migrations`;
//! * `db:`, `row:`, `conn:` sqlx's database, row and connection types.
//!
//! Every write runs as a [`crate::caller::transaction`]: on a task of its own, looking at its
//! caller before each statement, so a request that times out or whose client leaves never cuts a
//! statement short. What each method does and the transactional logic of `tx.rs` are the same on
//! both backends.

macro_rules! sync_store {
    (
        store: $store:ty, sql: $sql:ty, insert_id: $insert_id:path,
        lock_users: $lock_users:path, users_rows: $users_rows:path, insert_users: $insert_users:path,
        db: $db:ty, row: $row:ty, conn: $conn:ty $(,)?
    ) => {
        /// The shared Sync implementation, stamped for this backend (see [`crate::sql::sync`]).
        pub(crate) mod stamped {
            use async_trait::async_trait;
            use sqlx::Row;
            use tokenserver_core::sync::allocation::NodeState;
            use tokenserver_core::sync::users::UserRow;

            use crate::caller::Caller;
            use crate::sql::tx::{self, NewUser, SyncTx};
            use crate::sql::SyncSql;
            use crate::sync::{
                Allocate, MigrationReport, NewNode, NodeChange, NodeRecord, NodeUsers, OldRecord, OldRecordsQuery,
                OwnedAllocate, OwnedUserChange, Result, SyncStore, UserChange,
            };
            use crate::StoreError;

            type Sql = $sql;

            fn user_row(r: &$row) -> std::result::Result<UserRow, sqlx::Error> {
                user_row_at(r, 0)
            }

            /// A user row whose columns start at `at` ([`SyncSql::USER_ROWS`]'s, after the
            /// position a batch read puts first).
            pub(crate) fn user_row_at(r: &$row, at: usize) -> std::result::Result<UserRow, sqlx::Error> {
                Ok(UserRow {
                    uid: r.try_get(at)?,
                    node_id: r.try_get(at + 1)?,
                    node: r.try_get(at + 2)?,
                    generation: r.try_get(at + 3)?,
                    keys_changed_at: r.try_get(at + 4)?,
                    client_state: r.try_get(at + 5)?,
                    created_at: r.try_get(at + 6)?,
                    replaced_at: r.try_get(at + 7)?,
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
                let rows = sqlx::query(Sql::USER_ROWS).bind(email).bind(service).fetch_all(conn).await?;
                Ok(rows.iter().map(user_row).collect::<std::result::Result<_, _>>()?)
            }

            async fn service_id(conn: &mut $conn, service: &str) -> Result<Option<i64>> {
                Ok(sqlx::query_scalar::<_, i64>(Sql::SERVICE_ID).bind(service).fetch_optional(conn).await?)
            }

            async fn require_service(conn: &mut $conn, service: &str) -> Result<i64> {
                service_id(conn, service).await?.ok_or_else(|| StoreError::UnknownService(service.to_string()))
            }

            /// The id of `node` of `service`, or [`StoreError::NotFound`].
            async fn node_id(conn: &mut $conn, service: &str, node: &str) -> Result<i64> {
                sqlx::query_scalar::<_, i64>(Sql::NODE_ID)
                    .bind(service)
                    .bind(node)
                    .fetch_optional(conn)
                    .await?
                    .ok_or_else(|| StoreError::NotFound(format!("node {node} of service {service}")))
            }

            /// Marks the node's live users replaced; how many.
            async fn unassign(conn: &mut $conn, node_id: i64, now_ms: i64) -> Result<u64> {
                let done = sqlx::query(Sql::UNASSIGN_NODE).bind(now_ms).bind(node_id).execute(conn).await?;
                Ok(done.rows_affected())
            }

            /// Brings the schema up to date on `conn` (which holds the backend's migration lock):
            /// reads what exists, plans with [`crate::sql::migrate::plan`], applies and records.
            pub(crate) async fn apply_migrations(
                conn: &mut $conn,
                all: &[crate::sql::migrate::Migration],
            ) -> Result<MigrationReport> {
                let tables: Vec<String> = sqlx::query_scalar(Sql::EXISTING_TABLES).fetch_all(&mut *conn).await?;
                let applied: Vec<String> = if crate::sql::migrate::has_bookkeeping(&tables) {
                    sqlx::query_scalar(Sql::APPLIED_VERSIONS).fetch_all(&mut *conn).await?
                } else {
                    Vec::new()
                };
                let existing = crate::sql::migrate::Existing::new(&tables, applied);
                let todo = crate::sql::migrate::plan(all, &existing);
                if !todo.is_empty() && !existing.has_bookkeeping {
                    sqlx::query(crate::sql::migrate::CREATE_BOOKKEEPING).execute(&mut *conn).await?;
                }
                let mut report = MigrationReport::default();
                for m in todo {
                    for statement in m.statements() {
                        sqlx::query(statement).execute(&mut *conn).await?;
                    }
                    sqlx::query(Sql::RECORD_VERSION).bind(m.version).execute(&mut *conn).await?;
                    report.applied.push(m.version.to_string());
                }
                Ok(report)
            }

            impl $store {
                /// `allocate_user` in a transaction of its own, abandoned if `also` goes away.
                async fn allocate_alone(&self, req: OwnedAllocate, also: Caller) -> Result<UserRow> {
                    crate::caller::transaction_with(&self.pool, Sql::ALLOCATION_BEGIN, also, move |tx, caller| {
                        Box::pin(async move { tx::allocate(&mut Tx { tx, caller }, &req.borrow()).await })
                    })
                    .await
                }
            }

            #[async_trait]
            impl crate::sql::alloc_queue::BatchAllocator for $store {
                async fn allocate_batch(
                    &self,
                    reqs: Vec<OwnedAllocate>,
                    callers: Caller,
                ) -> Result<Vec<Result<UserRow>>> {
                    crate::caller::transaction_with(&self.pool, Sql::ALLOCATION_BEGIN, callers, move |tx, caller| {
                        Box::pin(async move {
                            let borrowed: Vec<Allocate<'_>> = reqs.iter().map(OwnedAllocate::borrow).collect();
                            tx::allocate_batch(&mut Tx { tx, caller }, &borrowed).await
                        })
                    })
                    .await
                }

                async fn allocate_one(&self, req: OwnedAllocate, caller: Caller) -> Result<UserRow> {
                    self.allocate_alone(req, caller).await
                }
            }

            /// A write transaction, checking its caller before every statement.
            struct Tx<'t> {
                tx: &'t mut sqlx::Transaction<'static, $db>,
                caller: &'t Caller,
            }

            impl Tx<'_> {
                /// The connection for the next statement, unless the caller has gone.
                fn conn(&mut self) -> Result<&mut $conn> {
                    self.caller.check()?;
                    Ok(&mut *self.tx)
                }
            }

            #[async_trait]
            impl SyncTx for Tx<'_> {
                async fn service_id(&mut self, service: &str) -> Result<Option<i64>> {
                    service_id(self.conn()?, service).await
                }

                async fn lock_user(&mut self, service_id: i64, email: &str) -> Result<()> {
                    if let Some(lock) = Sql::LOCK_USER {
                        sqlx::query(lock).bind(email).bind(service_id).fetch_all(self.conn()?).await?;
                    }
                    Ok(())
                }

                async fn user_rows(&mut self, service: &str, email: &str) -> Result<Vec<UserRow>> {
                    rows_of(self.conn()?, service, email).await
                }

                async fn lock_nodes(&mut self, service_id: i64) -> Result<Vec<NodeState>> {
                    let rows = sqlx::query(Sql::LOCK_NODES).bind(service_id).fetch_all(self.conn()?).await?;
                    Ok(rows.iter().map(|r| node_state(r, 0)).collect::<std::result::Result<_, _>>()?)
                }

                async fn set_available(&mut self, node_id: i64, available: i64) -> Result<()> {
                    sqlx::query(Sql::RELEASE).bind(available).bind(node_id).execute(self.conn()?).await?;
                    Ok(())
                }

                async fn add_users_to_node(&mut self, node_id: i64, n: i64) -> Result<()> {
                    sqlx::query(Sql::ADD_USERS_TO_NODE).bind(n).bind(n).bind(node_id).execute(self.conn()?).await?;
                    Ok(())
                }

                async fn lock_users(&mut self, service_id: i64, emails: &[&str]) -> Result<()> {
                    $lock_users(self.conn()?, service_id, emails).await
                }

                async fn users_rows(&mut self, service: &str, emails: &[&str]) -> Result<Vec<Vec<UserRow>>> {
                    let keys: Vec<(&str, &str)> = emails.iter().map(|e| (service, *e)).collect();
                    $users_rows(self.conn()?, &keys).await
                }

                async fn insert_users(&mut self, users: &[NewUser<'_>]) -> Result<Vec<i64>> {
                    $insert_users(self.conn()?, users).await
                }

                async fn insert_user(&mut self, u: NewUser<'_>) -> Result<i64> {
                    let q = sqlx::query(Sql::POST_USER)
                        .bind(u.service_id)
                        .bind(u.email)
                        .bind(u.generation)
                        .bind(u.client_state)
                        .bind(u.created_at)
                        .bind(u.node_id)
                        .bind(u.keys_changed_at);
                    $insert_id(q, self.conn()?).await
                }

                async fn put_user(
                    &mut self,
                    service_id: i64,
                    email: &str,
                    generation: i64,
                    kca: Option<i64>,
                ) -> Result<()> {
                    sqlx::query(Sql::PUT_USER)
                        .bind(generation)
                        .bind(kca)
                        .bind(service_id)
                        .bind(email)
                        .bind(generation)
                        .bind(kca)
                        .execute(self.conn()?)
                        .await?;
                    Ok(())
                }

                async fn replace_others(
                    &mut self,
                    service_id: i64,
                    email: &str,
                    keep_uid: i64,
                    now_ms: i64,
                ) -> Result<()> {
                    sqlx::query(Sql::REPLACE_OTHERS)
                        .bind(now_ms)
                        .bind(service_id)
                        .bind(email)
                        .bind(keep_uid)
                        .execute(self.conn()?)
                        .await?;
                    Ok(())
                }

                async fn record_of(&mut self, service_id: i64, uid: i64) -> Result<Option<(String, Option<i64>)>> {
                    let row =
                        sqlx::query(Sql::RECORD_OF).bind(service_id).bind(uid).fetch_optional(self.conn()?).await?;
                    Ok(row.map(|r| Ok::<_, sqlx::Error>((r.try_get(0)?, r.try_get(1)?))).transpose()?)
                }

                async fn free_slot(&mut self, node_id: i64) -> Result<()> {
                    sqlx::query(Sql::FREE_SLOT).bind(node_id).execute(self.conn()?).await?;
                    Ok(())
                }

                async fn delete_row(&mut self, service_id: i64, uid: i64) -> Result<bool> {
                    let done = sqlx::query(Sql::DELETE_USER).bind(service_id).bind(uid).execute(self.conn()?).await?;
                    Ok(done.rows_affected() > 0)
                }

                async fn bucket_node(&mut self, service_id: i64, bucket: i64) -> Result<Option<i64>> {
                    let q = sqlx::query_scalar::<_, i64>(Sql::BUCKET_NODE).bind(service_id).bind(bucket);
                    Ok(q.fetch_optional(self.conn()?).await?)
                }

                async fn set_bucket_node(&mut self, service_id: i64, bucket: i64, node_id: i64) -> Result<()> {
                    let q = sqlx::query(Sql::SET_BUCKET_NODE).bind(service_id).bind(bucket).bind(node_id);
                    q.execute(self.conn()?).await?;
                    Ok(())
                }

                async fn live_rows(&mut self, service_id: i64) -> Result<Vec<(i64, String, i64)>> {
                    let rows = sqlx::query(Sql::LIVE_ROWS).bind(service_id).fetch_all(self.conn()?).await?;
                    Ok(rows
                        .iter()
                        .map(|r| Ok::<_, sqlx::Error>((r.try_get(0)?, r.try_get(1)?, r.try_get(2)?)))
                        .collect::<std::result::Result<_, _>>()?)
                }

                async fn replace_uid(&mut self, service_id: i64, uid: i64, now_ms: i64) -> Result<()> {
                    let q = sqlx::query(Sql::REPLACE_UID).bind(now_ms).bind(service_id).bind(uid);
                    q.execute(self.conn()?).await?;
                    Ok(())
                }
            }

            fn old_record(r: &$row) -> std::result::Result<OldRecord, sqlx::Error> {
                Ok(OldRecord {
                    uid: r.try_get(0)?,
                    email: r.try_get(1)?,
                    generation: r.try_get(2)?,
                    keys_changed_at: r.try_get(3)?,
                    client_state: r.try_get(4)?,
                    node: r.try_get(5)?,
                    downed: r.try_get::<i64, _>(6)? != 0,
                    created_at: r.try_get(7)?,
                    replaced_at: r.try_get(8)?,
                })
            }

            #[async_trait]
            impl SyncStore for $store {
                async fn migrate(&self) -> Result<MigrationReport> {
                    self.run_migrations().await
                }

                async fn check(&self) -> Result<()> {
                    self.reads.probe().await
                }

                async fn check_write(&self) -> Result<()> {
                    crate::caller::transaction(&self.pool, Caller::default(), |tx, _| {
                        Box::pin(async move {
                            sqlx::query("SELECT 1").execute(&mut **tx).await?;
                            Ok(())
                        })
                    })
                    .await
                }

                async fn user_rows(&self, service: &str, email: &str) -> Result<Vec<UserRow>> {
                    // Concurrent requests' reads share one statement (the backend's `rows_many`).
                    self.user_reads.call((service.to_string(), email.to_string())).await
                }

                async fn allocate_user(&self, req: &Allocate<'_>) -> Result<UserRow> {
                    crate::sql::alloc_queue::allocate_via(self.allocations.as_ref(), self, req).await
                }

                async fn change_user(
                    &self,
                    service: &str,
                    email: &str,
                    expected_current: i64,
                    change: &UserChange<'_>,
                    now_ms: i64,
                ) -> Result<i64> {
                    let (service, email, change) =
                        (service.to_string(), email.to_string(), OwnedUserChange::new(change));
                    crate::caller::transaction(&self.pool, Caller::default(), move |tx, caller| {
                        Box::pin(async move {
                            let change = change.borrow();
                            tx::change(&mut Tx { tx, caller }, &service, &email, expected_current, &change, now_ms)
                                .await
                        })
                    })
                    .await
                }

                async fn replace_rows(&self, service: &str, uids: &[i64], replaced_at: i64) -> Result<()> {
                    let (service, uids) = (service.to_string(), uids.to_vec());
                    crate::caller::transaction(&self.pool, Caller::default(), move |tx, caller| {
                        Box::pin(async move {
                            let mut tx = Tx { tx, caller };
                            for uid in uids {
                                sqlx::query(Sql::REPLACE_USER)
                                    .bind(replaced_at)
                                    .bind(&service)
                                    .bind(uid)
                                    .execute(tx.conn()?)
                                    .await?;
                            }
                            Ok(())
                        })
                    })
                    .await
                }

                async fn retire_user(&self, service: &str, email: &str, now_ms: i64) -> Result<u64> {
                    let (service, email) = (service.to_string(), email.to_string());
                    crate::caller::transaction(&self.pool, Caller::default(), move |tx, _| {
                        Box::pin(async move {
                            let done = sqlx::query(Sql::RETIRE_USER)
                                .bind(tokenserver_core::sync::MAX_GENERATION)
                                .bind(now_ms)
                                .bind(&service)
                                .bind(&email)
                                .execute(&mut **tx)
                                .await?;
                            Ok(done.rows_affected())
                        })
                    })
                    .await
                }

                async fn update_user_generation(
                    &self,
                    service: &str,
                    email: &str,
                    generation: Option<i64>,
                    keys_changed_at: Option<i64>,
                ) -> Result<u64> {
                    let (service, email) = (service.to_string(), email.to_string());
                    crate::caller::transaction(&self.pool, Caller::default(), move |tx, _| {
                        Box::pin(async move {
                            let done = sqlx::query(Sql::UPDATE_USER_GENERATION)
                                .bind(generation)
                                .bind(keys_changed_at)
                                .bind(&service)
                                .bind(&email)
                                .bind(generation)
                                .bind(keys_changed_at)
                                .execute(&mut **tx)
                                .await?;
                            Ok(done.rows_affected())
                        })
                    })
                    .await
                }

                async fn add_node(&self, node: &NewNode<'_>) -> Result<NodeRecord> {
                    let (service, url) = (node.service.to_string(), node.node.to_string());
                    let (capacity, available, load) = (node.capacity, node.available, node.current_load);
                    let (downed, backoff) = (i64::from(node.downed), i64::from(node.backoff));
                    let id = crate::caller::transaction(&self.pool, Caller::default(), move |tx, caller| {
                        Box::pin(async move {
                            let mut tx = Tx { tx, caller };
                            let service = require_service(tx.conn()?, &service).await?;
                            let q = sqlx::query(Sql::INSERT_NODE)
                                .bind(service)
                                .bind(&url)
                                .bind(available)
                                .bind(load)
                                .bind(capacity)
                                .bind(downed)
                                .bind(backoff);
                            $insert_id(q, tx.conn()?).await.map_err(|e| match e {
                                StoreError::AlreadyExists(_) => StoreError::AlreadyExists(format!("node {url}")),
                                other => other,
                            })
                        })
                    })
                    .await?;
                    Ok(crate::sync::node_record(node, id))
                }

                async fn init_node(&self, service: &str, node: &str, capacity: i64) -> Result<bool> {
                    let (service, node) = (service.to_string(), node.to_string());
                    crate::caller::transaction(&self.pool, Caller::default(), move |tx, caller| {
                        Box::pin(async move {
                            let mut tx = Tx { tx, caller };
                            let service = require_service(tx.conn()?, &service).await?;
                            let done = sqlx::query(Sql::INIT_NODE)
                                .bind(service)
                                .bind(&node)
                                .bind(capacity)
                                .bind(capacity)
                                .execute(tx.conn()?)
                                .await?;
                            Ok(done.rows_affected() > 0)
                        })
                    })
                    .await
                }

                async fn update_node(&self, service: &str, node: &str, change: &NodeChange) -> Result<()> {
                    let (service, node, c) = (service.to_string(), node.to_string(), change.clone());
                    crate::caller::transaction(&self.pool, Caller::default(), move |tx, caller| {
                        Box::pin(async move {
                            let mut tx = Tx { tx, caller };
                            let id = node_id(tx.conn()?, &service, &node).await?;
                            sqlx::query(Sql::UPDATE_NODE)
                                .bind(c.capacity)
                                .bind(c.available)
                                .bind(c.current_load)
                                .bind(c.downed.map(i64::from))
                                .bind(c.backoff.map(i64::from))
                                .bind(id)
                                .execute(tx.conn()?)
                                .await?;
                            Ok(())
                        })
                    })
                    .await
                }

                async fn unassign_node(&self, service: &str, node: &str, now_ms: i64) -> Result<u64> {
                    let (service, node) = (service.to_string(), node.to_string());
                    crate::caller::transaction(&self.pool, Caller::default(), move |tx, caller| {
                        Box::pin(async move {
                            let mut tx = Tx { tx, caller };
                            let id = node_id(tx.conn()?, &service, &node).await?;
                            unassign(tx.conn()?, id, now_ms).await
                        })
                    })
                    .await
                }

                async fn remove_node(&self, service: &str, node: &str, now_ms: i64) -> Result<u64> {
                    let (service, node) = (service.to_string(), node.to_string());
                    crate::caller::transaction(&self.pool, Caller::default(), move |tx, caller| {
                        Box::pin(async move {
                            let mut tx = Tx { tx, caller };
                            let id = node_id(tx.conn()?, &service, &node).await?;
                            let unassigned = unassign(tx.conn()?, id, now_ms).await?;
                            sqlx::query(Sql::DELETE_NODE).bind(id).execute(tx.conn()?).await?;
                            Ok(unassigned)
                        })
                    })
                    .await
                }

                async fn node_users(&self) -> Result<Vec<NodeUsers>> {
                    let rows =
                        crate::sql::read_pool::read!(self.reads, |c| sqlx::query(Sql::NODE_USERS).fetch_all(c).await)?;
                    rows.iter()
                        .map(|r| Ok(NodeUsers { node_id: r.try_get(0)?, live: r.try_get(1)? }))
                        .collect::<std::result::Result<_, sqlx::Error>>()
                        .map_err(StoreError::from)
                }

                async fn list_nodes(&self, service: Option<&str>) -> Result<Vec<NodeRecord>> {
                    let rows = crate::sql::read_pool::read!(self.reads, |c| sqlx::query(Sql::LIST_NODES)
                        .bind(service)
                        .bind(service)
                        .fetch_all(c)
                        .await)?;
                    rows.iter()
                        .map(|r| Ok(NodeRecord { service: r.try_get(0)?, state: node_state(r, 1)? }))
                        .collect::<std::result::Result<_, sqlx::Error>>()
                        .map_err(StoreError::from)
                }

                async fn user_email(&self, service: &str, uid: i64) -> Result<Option<String>> {
                    crate::sql::read_pool::read!(self.reads, |c| {
                        sqlx::query_scalar::<_, String>(Sql::USER_EMAIL).bind(service).bind(uid).fetch_optional(c).await
                    })
                }

                async fn assign_user(&self, service: &str, email: &str, node: &str, now_ms: i64) -> Result<UserRow> {
                    let (service, email, node) = (service.to_string(), email.to_string(), node.to_string());
                    crate::caller::transaction(&self.pool, Caller::default(), move |tx, caller| {
                        Box::pin(
                            async move { tx::assign(&mut Tx { tx, caller }, &service, &email, &node, now_ms).await },
                        )
                    })
                    .await
                }

                async fn count_users(&self, service: Option<&str>, created_before: i64) -> Result<i64> {
                    crate::sql::read_pool::read!(self.reads, |c| {
                        sqlx::query_scalar::<_, i64>(Sql::COUNT_USERS)
                            .bind(created_before)
                            .bind(service)
                            .bind(service)
                            .fetch_one(c)
                            .await
                    })
                }

                async fn old_records(&self, q: &OldRecordsQuery<'_>) -> Result<Vec<OldRecord>> {
                    let (after_at, after_uid) = q.after.unwrap_or((i64::MIN, i64::MIN));
                    let rows = crate::sql::read_pool::read!(self.reads, |c| {
                        sqlx::query(Sql::OLD_RECORDS)
                            .bind(q.service)
                            .bind(q.replaced_before)
                            .bind(after_at)
                            .bind(after_at)
                            .bind(after_uid)
                            .bind(q.uid_above.unwrap_or(i64::MIN))
                            .bind(q.uid_below.unwrap_or(i64::MAX))
                            .bind(q.limit)
                            .fetch_all(c)
                            .await
                    })?;
                    Ok(rows.iter().map(old_record).collect::<std::result::Result<_, _>>()?)
                }

                async fn delete_user_record(&self, service: &str, uid: i64) -> Result<bool> {
                    let service = service.to_string();
                    crate::caller::transaction(&self.pool, Caller::default(), move |tx, caller| {
                        Box::pin(async move { tx::delete_record(&mut Tx { tx, caller }, &service, uid).await })
                    })
                    .await
                }

                async fn bump_replaced_at(&self, service: &str, uid: i64, now_ms: i64) -> Result<()> {
                    let service = service.to_string();
                    crate::caller::transaction(&self.pool, Caller::default(), move |tx, caller| {
                        Box::pin(async move {
                            let mut tx = Tx { tx, caller };
                            sqlx::query(Sql::BUMP_REPLACED)
                                .bind(now_ms)
                                .bind(&service)
                                .bind(uid)
                                .execute(tx.conn()?)
                                .await?;
                            Ok(())
                        })
                    })
                    .await
                }

                async fn enable_buckets(&self) -> Result<()> {
                    let pool = self.pool.clone();
                    crate::caller::detached(move |_| async move {
                        sqlx::query(Sql::CREATE_BUCKETS).execute(&pool).await?;
                        Ok(())
                    })
                    .await
                }

                async fn buckets(&self, service: &str) -> Result<Vec<crate::sync::BucketRecord>> {
                    let rows = crate::sql::read_pool::read!(self.reads, |c| sqlx::query(Sql::LIST_BUCKETS)
                        .bind(service)
                        .fetch_all(c)
                        .await)?;
                    rows.iter()
                        .map(|r| Ok(crate::sync::BucketRecord { bucket: r.try_get(0)?, node: r.try_get(1)? }))
                        .collect::<std::result::Result<_, sqlx::Error>>()
                        .map_err(StoreError::from)
                }

                async fn move_bucket(
                    &self,
                    service: &str,
                    bucket: i64,
                    total: i64,
                    node: &str,
                    now_ms: i64,
                ) -> Result<u64> {
                    let (service, node) = (service.to_string(), node.to_string());
                    crate::caller::transaction(&self.pool, Caller::default(), move |tx, caller| {
                        Box::pin(async move {
                            tx::move_bucket(&mut Tx { tx, caller }, &service, bucket, total, &node, now_ms).await
                        })
                    })
                    .await
                }

                fn pool_state(&self) -> Option<crate::sync::PoolState> {
                    let open = self.pool.size();
                    let idle = u32::try_from(self.pool.num_idle()).unwrap_or(open);
                    Some(crate::sync::PoolState { open, idle, max: self.pool.options().get_max_connections() })
                }

                async fn ensure_service(&self, service: &str, pattern: &str) -> Result<i64> {
                    let (service, pattern) = (service.to_string(), pattern.to_string());
                    let pool = self.pool.clone();
                    crate::caller::detached(move |_| async move {
                        let mut conn = pool.acquire().await?;
                        if let Some(id) = service_id(&mut conn, &service).await? {
                            return Ok(id);
                        }
                        // No transaction: a unique violation (another process inserted it meanwhile)
                        // is fine, and would abort a PostgreSQL transaction.
                        if let Err(e) =
                            sqlx::query(Sql::INSERT_SERVICE).bind(&service).bind(&pattern).execute(&mut *conn).await
                        {
                            match StoreError::from(e) {
                                StoreError::AlreadyExists(_) => {}
                                other => return Err(other),
                            }
                        }
                        require_service(&mut conn, &service).await
                    })
                    .await
                }

                async fn generated_secret(
                    &self,
                    _name: &str,
                    _generate: &(dyn Fn() -> String + Send + Sync),
                ) -> Result<Option<(String, bool)>> {
                    Ok(None)
                }
            }
        }
    };
}

pub(crate) use sync_store;
