//! Storage: SeaORM entities and every query the service makes, behind one
//! type, [`Store`]. SQLite (the embedded default) and PostgreSQL share all of
//! it; the only difference is how connections are pooled.

pub mod audit;
mod cache;
pub mod commits;
pub mod entities;

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use migration::{Migrator, MigratorTrait};
use sea_orm::sqlx::sqlite::{SqliteJournalMode, SqliteSynchronous};
use sea_orm::{
    ActiveValue::Set, ColumnTrait, ConnectOptions, ConnectionTrait, Database, DatabaseConnection,
    DbErr, EntityTrait, PaginatorTrait, QueryFilter, QueryOrder, QuerySelect, TransactionTrait,
};
use serde_json::Value;

use crate::domain::data::JsonMap;
use crate::domain::definition::{ConcurrencyMode, ConcurrencyPolicy, PipelineSpec};
use crate::domain::model::{self, Event, Execution, Pipeline, StepRun, Trigger};
use crate::domain::status::{EventKind, ExecutionStatus, StepStatus, TriggerKind};
use crate::telemetry::metrics::{DbOp, Metrics};
use entities::{execution, execution_event, execution_label, execution_step, pipeline};

/// Everything storage can fail with.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database error: {0}")]
    Database(#[from] DbErr),
    /// A row that cannot be read back into the domain model.
    #[error("corrupt row: {0}")]
    Corrupt(String),
    #[error("{kind} '{id}' not found")]
    NotFound { kind: &'static str, id: String },
    #[error("{kind} '{id}' already exists")]
    AlreadyExists { kind: &'static str, id: String },
    /// The row was not in the state the write expected.
    #[error("{0}")]
    Conflict(String),
    /// A request id was used before for a different request.
    #[error("request_id '{0}' was already used for a different request")]
    RequestIdReused(String),
    /// A pipeline's concurrency cap refuses a new execution.
    #[error("{0}")]
    LimitReached(String),
    /// Another replica has taken the execution over: this one's lease on it
    /// ran out.
    #[error("execution '{0}' is no longer leased to this replica")]
    LeaseLost(String),
}

impl StoreError {
    /// Whether the database is out of reach (down, restarting, the network
    /// cut): trying again later may work.
    pub fn is_unavailable(&self) -> bool {
        use sea_orm::sqlx::Error as Sqlx;
        let Self::Database(error) = self else {
            return false;
        };
        let sqlx = match error {
            DbErr::Conn(_) | DbErr::ConnectionAcquire(_) => return true,
            DbErr::Exec(sea_orm::RuntimeErr::SqlxError(e))
            | DbErr::Query(sea_orm::RuntimeErr::SqlxError(e)) => e,
            _ => return false,
        };
        match sqlx.as_ref() {
            Sqlx::Io(_) | Sqlx::PoolTimedOut | Sqlx::PoolClosed | Sqlx::WorkerCrashed => true,
            // PostgreSQL's classes 08 (connection exception) and 57P
            // (operator intervention: shutting down, starting up).
            Sqlx::Database(db) => db
                .code()
                .is_some_and(|code| code.starts_with("08") || code.starts_with("57P")),
            _ => false,
        }
    }
}

type Result<T> = std::result::Result<T, StoreError>;

/// Statuses of executions that are not finished.
pub const ACTIVE_STATUSES: [ExecutionStatus; 6] = [
    ExecutionStatus::Queued,
    ExecutionStatus::Pending,
    ExecutionStatus::Running,
    ExecutionStatus::Paused,
    ExecutionStatus::Stopping,
    ExecutionStatus::Terminating,
];

/// The PostgreSQL notification channel on which every commit of events is
/// announced, as `replica execution_id first_sequence last_sequence`. The
/// events themselves are read from the table, so the 8000-byte payload
/// limit never loses anything.
pub const EVENTS_CHANNEL: &str = "pipelined_events";

/// The PostgreSQL notification channel that tells the replica running an
/// execution (payload: its id) that another replica left it a request.
pub const REQUESTS_CHANNEL: &str = "pipelined_requests";

/// Statuses that hold one of a pipeline's concurrency slots.
pub const SLOT_STATUSES: [ExecutionStatus; 5] = [
    ExecutionStatus::Pending,
    ExecutionStatus::Running,
    ExecutionStatus::Paused,
    ExecutionStatus::Stopping,
    ExecutionStatus::Terminating,
];

/// What [`Store::admit_execution`] did.
#[derive(Debug)]
pub enum Admission {
    /// Stored as pending (it may start) or queued (it waits for a slot).
    /// `to_cancel` lists executions the `cancel_oldest` policy evicts.
    Created { to_cancel: Vec<String> },
    /// The request id was seen before with the same request: that execution.
    Existing(Box<Execution>),
}

/// Filter and page of `ListExecutions`.
#[derive(Debug, Clone, Default)]
pub struct ExecutionFilter {
    pub pipeline_name: Option<String>,
    pub statuses: Vec<ExecutionStatus>,
    /// Only executions with an id lower than this (ids are time-ordered).
    pub before_id: Option<String>,
    pub correlation_id: Option<String>,
    /// Only executions carrying every one of these labels.
    pub labels: BTreeMap<String, String>,
    pub limit: u64,
}

/// The database, with one pool for writes and one for reads. On SQLite the
/// write pool has a single connection (SQLite has a single writer anyway, and
/// this avoids lock upgrades failing with SQLITE_BUSY) and reads use WAL
/// snapshots in parallel; on PostgreSQL both are the same pool.
///
/// Every active execution is leased to one replica (`owner`, until
/// `lease_expires_at`): only the owner writes its state, and a replica whose
/// lease ran out finds its writes refused ([`StoreError::LeaseLost`]) once
/// another replica has claimed the execution.
#[derive(Clone)]
pub struct Store {
    writer: DatabaseConnection,
    reader: DatabaseConnection,
    /// This replica's id, the `owner` of the executions it runs.
    replica: Arc<str>,
    /// How long a lease lasts unless renewed.
    lease: Duration,
    /// Writes runners' state changes in groups.
    committer: commits::Committer,
    /// Recently read finished executions and latest pipeline versions,
    /// when this process is the only writer (SQLite); `None` on PostgreSQL.
    caches: Option<Arc<Caches>>,
    /// This server's metrics; database operations are timed here.
    metrics: Arc<Metrics>,
}

/// See [`cache`].
#[derive(Default)]
struct Caches {
    /// Finished executions, by id.
    finished: cache::ReadCache<Execution>,
    /// The latest version of each pipeline, by name.
    pipelines: cache::ReadCache<Pipeline>,
}

impl Store {
    /// Connects to `url` (`sqlite://path?mode=rwc` or `postgres://...`) and
    /// runs the migrations. `replica` names this server in leases; database
    /// operations are timed into `metrics`.
    pub async fn connect(
        url: &str,
        replica: &str,
        lease: Duration,
        metrics: Arc<Metrics>,
    ) -> Result<Self> {
        let replica: Arc<str> = Arc::from(replica);
        let store = if url.starts_with("sqlite:") {
            let writer = Database::connect(sqlite_options(url, 1)).await?;
            Migrator::up(&writer, None).await?;
            let reader = Database::connect(sqlite_options(url, 8)).await?;
            Self {
                committer: commits::Committer::start(
                    writer.clone(),
                    Arc::clone(&replica),
                    Arc::clone(&metrics),
                ),
                caches: Some(Arc::default()),
                metrics,
                writer,
                reader,
                replica,
                lease,
            }
        } else {
            let mut options = ConnectOptions::new(url);
            options
                .max_connections(16)
                .connect_timeout(Duration::from_secs(10))
                .sqlx_logging(false);
            let pool = Database::connect(options).await?;
            Migrator::up(&pool, None).await?;
            Self {
                committer: commits::Committer::start(
                    pool.clone(),
                    Arc::clone(&replica),
                    Arc::clone(&metrics),
                ),
                caches: None,
                metrics,
                writer: pool.clone(),
                reader: pool,
                replica,
                lease,
            }
        };
        Ok(store)
    }

    /// This server's metrics (see [`crate::telemetry::metrics`]).
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// How many executions are not finished, by pipeline and status.
    pub async fn count_active(&self) -> Result<Vec<(String, String, i64)>> {
        use sea_orm::sea_query::{Expr, ExprTrait};
        let active = [
            ExecutionStatus::Queued,
            ExecutionStatus::Pending,
            ExecutionStatus::Running,
            ExecutionStatus::Paused,
            ExecutionStatus::Stopping,
            ExecutionStatus::Terminating,
        ];
        Ok(execution::Entity::find()
            .select_only()
            .column(execution::Column::PipelineName)
            .column(execution::Column::Status)
            .column_as(Expr::col(execution::Column::Id).count(), "count")
            .filter(execution::Column::Status.is_in(active.map(ExecutionStatus::as_str)))
            .group_by(execution::Column::PipelineName)
            .group_by(execution::Column::Status)
            .into_tuple()
            .all(&self.reader)
            .await?)
    }

    /// This replica's id.
    pub fn replica(&self) -> &str {
        &self.replica
    }

    /// Whether several replicas may share this database (PostgreSQL).
    pub fn is_shared(&self) -> bool {
        self.writer.get_database_backend() == sea_orm::DbBackend::Postgres
    }

    /// A listener for the notifications other replicas send when they
    /// commit events ([`EVENTS_CHANNEL`]); `None` on SQLite.
    pub async fn listen_for_events(&self) -> Result<Option<sea_orm::sqlx::postgres::PgListener>> {
        if !self.is_shared() {
            return Ok(None);
        }
        // A connection of its own, not one of the pool's.
        let options = self.writer.get_postgres_connection_pool().connect_options();
        let pool = sea_orm::sqlx::postgres::PgPoolOptions::new()
            .max_connections(1)
            .connect_lazy_with((*options).clone());
        let mut listener = sea_orm::sqlx::postgres::PgListener::connect_with(&pool)
            .await
            .map_err(|e| {
                StoreError::Database(DbErr::Conn(sea_orm::RuntimeErr::SqlxError(e.into())))
            })?;
        listener
            .listen_all([EVENTS_CHANNEL, REQUESTS_CHANNEL])
            .await
            .map_err(|e| {
                StoreError::Database(DbErr::Conn(sea_orm::RuntimeErr::SqlxError(e.into())))
            })?;
        Ok(Some(listener))
    }

    /// How long a lease lasts unless renewed.
    pub fn lease(&self) -> Duration {
        self.lease
    }

    fn lease_until(&self) -> chrono::DateTime<chrono::Utc> {
        model::now() + self.lease
    }

    /// The database's time on PostgreSQL, so that replicas whose clocks
    /// differ agree on when a lease ends; this server's time on SQLite.
    fn now_expr(&self) -> sea_orm::sea_query::SimpleExpr {
        if self.is_shared() {
            sea_orm::sea_query::Expr::cust("now()")
        } else {
            sea_orm::sea_query::Expr::value(model::now())
        }
    }

    /// When a lease taken now ends, by [`Self::now_expr`]'s clock.
    fn lease_until_expr(&self) -> sea_orm::sea_query::SimpleExpr {
        if self.is_shared() {
            sea_orm::sea_query::Expr::cust(format!(
                "now() + interval '{} milliseconds'",
                self.lease.as_millis()
            ))
        } else {
            sea_orm::sea_query::Expr::value(self.lease_until())
        }
    }

    /// Claims up to `limit` active executions that no replica holds: never
    /// leased, released, or leased until a time that has passed. Returns
    /// their ids.
    /// On PostgreSQL, rows other replicas are claiming are skipped
    /// (`FOR UPDATE SKIP LOCKED`), so concurrent claims never collide.
    pub async fn claim_orphans(&self, limit: u64) -> Result<Vec<String>> {
        let txn = self.writer.begin().await?;
        let free = sea_orm::Condition::any()
            .add(execution::Column::Owner.is_null())
            .add(sea_orm::sea_query::ExprTrait::lt(
                sea_orm::sea_query::Expr::col(execution::Column::LeaseExpiresAt),
                self.now_expr(),
            ));
        let mut query = execution::Entity::find()
            .select_only()
            .column(execution::Column::Id)
            .filter(execution::Column::Status.is_in(SLOT_STATUSES.map(ExecutionStatus::as_str)))
            .filter(free)
            .order_by_asc(execution::Column::Id)
            .limit(limit);
        if txn.get_database_backend() == sea_orm::DbBackend::Postgres {
            query = query.lock_with_behavior(
                sea_orm::sea_query::LockType::Update,
                sea_orm::sea_query::LockBehavior::SkipLocked,
            );
        }
        let ids: Vec<String> = query.into_tuple().all(&txn).await?;
        if !ids.is_empty() {
            execution::Entity::update_many()
                .col_expr(execution::Column::Owner, self.replica.as_ref().into())
                .col_expr(execution::Column::LeaseExpiresAt, self.lease_until_expr())
                .filter(execution::Column::Id.is_in(ids.iter().cloned()))
                .exec(&txn)
                .await?;
        }
        txn.commit().await?;
        Ok(ids)
    }

    /// Leaves `action` on an active execution for the replica that runs it
    /// (replacing an earlier request not carried out yet) and tells it.
    /// Returns false if the execution is not active.
    pub async fn request_action(&self, id: &str, action: &str) -> Result<bool> {
        // A pending cancel is not replaced by a pause or resume, nor a
        // pending terminate by a graceful cancel.
        let weaker: &[&str] = match action {
            "terminate" => &["pause", "resume", "cancel", "terminate"],
            "cancel" => &["pause", "resume", "cancel"],
            _ => &["pause", "resume"],
        };
        let txn = self.writer.begin().await?;
        let active = execution::Entity::find_by_id(id.to_string())
            .filter(execution::Column::Status.is_in(SLOT_STATUSES.map(ExecutionStatus::as_str)))
            .count(&txn)
            .await?
            == 1;
        if !active {
            return Ok(false);
        }
        let updated = execution::Entity::update_many()
            .col_expr(execution::Column::RequestedAction, action.into())
            .filter(execution::Column::Id.eq(id))
            .filter(
                sea_orm::Condition::any()
                    .add(execution::Column::RequestedAction.is_null())
                    .add(execution::Column::RequestedAction.is_in(weaker.iter().copied())),
            )
            .exec(&txn)
            .await?
            .rows_affected;
        if updated == 1 && txn.get_database_backend() == sea_orm::DbBackend::Postgres {
            notify(&txn, REQUESTS_CHANNEL, id.to_string()).await?;
        }
        txn.commit().await?;
        Ok(true)
    }

    /// Takes (reads and clears) the requests left for `ids`, executions
    /// this replica holds and has runners for.
    pub async fn take_requests(&self, ids: &[String]) -> Result<Vec<(String, String)>> {
        let mut requests = Vec::new();
        for chunk in ids.chunks(500) {
            let txn = self.writer.begin().await?;
            let mut query = execution::Entity::find()
                .select_only()
                .column(execution::Column::Id)
                .column(execution::Column::RequestedAction)
                .filter(execution::Column::Owner.eq(self.replica.as_ref()))
                .filter(execution::Column::RequestedAction.is_not_null())
                .filter(execution::Column::Id.is_in(chunk.iter().cloned()));
            // Locked, so that a request written meanwhile waits for the
            // clear below instead of being erased by it.
            if txn.get_database_backend() == sea_orm::DbBackend::Postgres {
                query = query
                    .lock(sea_orm::sea_query::LockType::Update)
                    .order_by_asc(execution::Column::Id);
            }
            let taken: Vec<(String, String)> = query.into_tuple().all(&txn).await?;
            if !taken.is_empty() {
                execution::Entity::update_many()
                    .col_expr(
                        execution::Column::RequestedAction,
                        sea_orm::sea_query::Expr::value(Option::<String>::None),
                    )
                    .filter(execution::Column::Id.is_in(taken.iter().map(|(id, _)| id.clone())))
                    .exec(&txn)
                    .await?;
            }
            txn.commit().await?;
            requests.extend(taken);
        }
        Ok(requests)
    }

    /// Extends this replica's leases on `ids` (the executions it has
    /// runners for) and returns the ids it still held: a runner whose id is
    /// missing lost its lease and must stop.
    pub async fn renew_leases(&self, ids: &[String]) -> Result<Vec<String>> {
        let mut held = Vec::with_capacity(ids.len());
        for chunk in ids.chunks(500) {
            let txn = self.writer.begin().await?;
            let mut query = execution::Entity::find()
                .select_only()
                .column(execution::Column::Id)
                .filter(execution::Column::Owner.eq(self.replica.as_ref()))
                .filter(execution::Column::Id.is_in(chunk.iter().cloned()))
                .filter(
                    execution::Column::Status.is_in(SLOT_STATUSES.map(ExecutionStatus::as_str)),
                );
            if txn.get_database_backend() == sea_orm::DbBackend::Postgres {
                query = query
                    .lock(sea_orm::sea_query::LockType::Update)
                    .order_by_asc(execution::Column::Id);
            }
            let mine: Vec<String> = query.into_tuple().all(&txn).await?;
            if !mine.is_empty() {
                execution::Entity::update_many()
                    .col_expr(execution::Column::LeaseExpiresAt, self.lease_until_expr())
                    .filter(execution::Column::Id.is_in(mine.iter().cloned()))
                    .exec(&txn)
                    .await?;
            }
            txn.commit().await?;
            held.extend(mine);
        }
        Ok(held)
    }

    /// Gives up the leases of active executions: this replica's own (at
    /// start, when it has no runner yet), or with `all` every one (SQLite,
    /// where this is the only server). They can then be claimed at once.
    pub async fn release_leases(&self, all: bool) -> Result<()> {
        let mut update = execution::Entity::update_many()
            .col_expr(
                execution::Column::Owner,
                sea_orm::sea_query::Expr::value(Option::<String>::None),
            )
            .filter(execution::Column::Status.is_in(SLOT_STATUSES.map(ExecutionStatus::as_str)));
        if !all {
            update = update.filter(execution::Column::Owner.eq(self.replica.as_ref()));
        }
        update.exec(&self.writer).await?;
        Ok(())
    }

    // ----- pipelines -----

    /// Stores version 1 of a new pipeline.
    pub async fn create_pipeline(&self, spec: &PipelineSpec) -> Result<Pipeline> {
        let txn = self.writer.begin().await?;
        if latest_version(&txn, &spec.name).await?.is_some() {
            return Err(StoreError::AlreadyExists {
                kind: "pipeline",
                id: spec.name.clone(),
            });
        }
        // A concurrent create of the same name loses on the unique index.
        let stored = insert_pipeline(&txn, spec, 1).await.map_err(|e| {
            if is_unique_violation(&e) {
                StoreError::AlreadyExists {
                    kind: "pipeline",
                    id: spec.name.clone(),
                }
            } else {
                e
            }
        })?;
        let _changed = self.pipeline_changed(&spec.name);
        txn.commit().await?;
        Ok(stored)
    }

    /// Stores the next version of an existing pipeline.
    pub async fn update_pipeline(&self, spec: &PipelineSpec) -> Result<Pipeline> {
        let txn = self.writer.begin().await?;
        let Some(latest) = latest_version(&txn, &spec.name).await? else {
            return Err(StoreError::NotFound {
                kind: "pipeline",
                id: spec.name.clone(),
            });
        };
        let stored = insert_pipeline(&txn, spec, latest + 1).await.map_err(|e| {
            if is_unique_violation(&e) {
                StoreError::Conflict(format!(
                    "pipeline '{}' was updated concurrently; try again",
                    spec.name
                ))
            } else {
                e
            }
        })?;
        let _changed = self.pipeline_changed(&spec.name);
        txn.commit().await?;
        Ok(stored)
    }

    /// The latest version, or `version` if given.
    pub async fn get_pipeline(&self, name: &str, version: Option<i64>) -> Result<Pipeline> {
        let (Some(caches), None) = (&self.caches, version) else {
            return self.read_pipeline(name, version).await;
        };
        if let Some(pipeline) = caches.pipelines.get(name) {
            return Ok(Pipeline::clone(&pipeline));
        }
        let epoch = caches.pipelines.epoch();
        let pipeline = self.read_pipeline(name, None).await?;
        caches.pipelines.insert(name, pipeline.clone(), epoch);
        Ok(pipeline)
    }

    /// Forgets the cached latest version of `name` when dropped: hold it
    /// across the commit of a write to that pipeline.
    fn pipeline_changed(&self, name: &str) -> Option<cache::InvalidateOnDrop<'_, Pipeline>> {
        self.caches
            .as_ref()
            .map(|caches| caches.pipelines.invalidate_on_drop(name))
    }

    async fn read_pipeline(&self, name: &str, version: Option<i64>) -> Result<Pipeline> {
        let _timer = self.metrics.db_timer(DbOp::GetPipeline);
        let mut query = pipeline::Entity::find().filter(pipeline::Column::Name.eq(name));
        query = match version {
            Some(v) => query.filter(pipeline::Column::Version.eq(v)),
            None => query.order_by_desc(pipeline::Column::Version),
        };
        let row = query
            .one(&self.reader)
            .await?
            .ok_or_else(|| StoreError::NotFound {
                kind: "pipeline",
                id: match version {
                    Some(v) => format!("{name}@{v}"),
                    None => name.to_string(),
                },
            })?;
        pipeline_from_row(row)
    }

    /// Latest versions of pipelines named after `after_name`, by name.
    pub async fn list_pipelines(
        &self,
        after_name: Option<&str>,
        limit: u64,
    ) -> Result<Vec<Pipeline>> {
        let mut latest = pipeline::Entity::find()
            .select_only()
            .column(pipeline::Column::Name)
            .column_as(pipeline::Column::Version.max(), "version")
            .group_by(pipeline::Column::Name)
            .order_by_asc(pipeline::Column::Name)
            .limit(limit);
        if let Some(after) = after_name {
            latest = latest.filter(pipeline::Column::Name.gt(after));
        }
        let latest: HashMap<String, i64> = latest
            .into_tuple()
            .all(&self.reader)
            .await?
            .into_iter()
            .collect();
        let rows = pipeline::Entity::find()
            .filter(pipeline::Column::Name.is_in(latest.keys().cloned()))
            .order_by_asc(pipeline::Column::Name)
            .all(&self.reader)
            .await?;
        rows.into_iter()
            .filter(|row| latest.get(&row.name) == Some(&row.version))
            .map(pipeline_from_row)
            .collect()
    }

    /// Deletes every version of a pipeline, unless one of its executions is
    /// active ([`StoreError::Conflict`]).
    pub async fn delete_pipeline(&self, name: &str) -> Result<()> {
        let txn = self.writer.begin().await?;
        if latest_version(&txn, name).await?.is_none() {
            return Err(StoreError::NotFound {
                kind: "pipeline",
                id: name.to_string(),
            });
        }
        let active = execution::Entity::find()
            .filter(execution::Column::PipelineName.eq(name))
            .filter(execution::Column::Status.is_in(ACTIVE_STATUSES.map(ExecutionStatus::as_str)))
            .limit(1)
            .one(&txn)
            .await?;
        if let Some(active) = active {
            return Err(StoreError::Conflict(format!(
                "pipeline '{name}' has an active execution ({} is {}); cancel it or wait for it to finish",
                active.id, active.status
            )));
        }
        pipeline::Entity::delete_many()
            .filter(pipeline::Column::Name.eq(name))
            .exec(&txn)
            .await?;
        let _changed = self.pipeline_changed(name);
        txn.commit().await?;
        Ok(())
    }

    // ----- executions -----

    /// Stores a new execution with its steps and labels, atomically applying
    /// its request id and its pipeline's concurrency cap: a known request id
    /// returns the stored execution (or fails if the request differs); at the
    /// cap the execution is queued, refused or queued while the oldest active
    /// ones are evicted, as the policy says. `exec.status` must be `Pending`;
    /// it becomes `Queued` (with its first event) if it has to wait.
    /// `exec.id` and `exec.created_at` are assigned here, under the admission
    /// lock, so that id order is admission order: queued executions start in
    /// id order, and none of them can have been created before one that was
    /// admitted ahead of it.
    ///
    /// On SQLite the admission is written by the group committer, in the
    /// same transaction as whatever runners' writes are waiting (the single
    /// writer serialises admissions all the same); on PostgreSQL in a
    /// transaction of its own, under an advisory lock on the pipeline.
    pub async fn admit_execution(
        &self,
        exec: &mut Execution,
        cap: Option<&ConcurrencyPolicy>,
    ) -> Result<Admission> {
        if !self.is_shared() {
            let (admission, admitted) = self
                .committer
                .admit(commits::Admit {
                    store: self.clone(),
                    exec: exec.clone(),
                    cap: cap.cloned(),
                })
                .await?;
            *exec = admitted;
            return Ok(admission);
        }
        let txn = self.writer.begin().await?;
        let admission = self.admit_in(&txn, exec, cap).await?;
        txn.commit().await?;
        Ok(admission)
    }

    /// The admission of [`Self::admit_execution`] inside `txn`, which the
    /// caller commits. It writes nothing unless it returns `Created`.
    pub(crate) async fn admit_in(
        &self,
        txn: &impl ConnectionTrait,
        exec: &mut Execution,
        cap: Option<&ConcurrencyPolicy>,
    ) -> Result<Admission> {
        lock_pipeline(txn, &exec.pipeline_name).await?;
        if let Some(request_id) = &exec.request_id {
            let existing = execution::Entity::find()
                .filter(execution::Column::RequestId.eq(request_id))
                .one(txn)
                .await?;
            if let Some(row) = existing {
                if row.request_fingerprint != exec.request_fingerprint {
                    return Err(StoreError::RequestIdReused(request_id.clone()));
                }
                let steps = steps_of(txn, &row.id).await?;
                return Ok(Admission::Existing(Box::new(execution_from_rows(
                    row, steps,
                )?)));
            }
        }
        exec.id = uuid::Uuid::now_v7().to_string();
        exec.created_at = model::now();
        let mut to_cancel = Vec::new();
        if let Some(cap) = cap.filter(|c| c.max_active > 0) {
            let holding: Vec<(String, String)> = execution::Entity::find()
                .select_only()
                .column(execution::Column::Id)
                .column(execution::Column::Status)
                .filter(execution::Column::PipelineName.eq(&exec.pipeline_name))
                .filter(
                    execution::Column::Status.is_in(
                        SLOT_STATUSES
                            .iter()
                            .chain([&ExecutionStatus::Queued])
                            .map(|s| s.as_str()),
                    ),
                )
                .order_by_asc(execution::Column::Id)
                .into_tuple()
                .all(txn)
                .await?;
            let queued = holding
                .iter()
                .filter(|(_, s)| s == ExecutionStatus::Queued.as_str())
                .count();
            let active: Vec<&(String, String)> = holding
                .iter()
                .filter(|(_, s)| s != ExecutionStatus::Queued.as_str())
                .collect();
            let max = cap.max_active as usize;
            if active.len() >= max || queued > 0 {
                match cap.mode {
                    ConcurrencyMode::Reject => {
                        return Err(StoreError::LimitReached(format!(
                            "pipeline '{}' already has {} active executions, its limit \
                             (concurrency.max_active = {max}, mode reject); try again later",
                            exec.pipeline_name,
                            active.len()
                        )));
                    }
                    ConcurrencyMode::CancelOldest => {
                        // Evict enough of the oldest to make room for every
                        // queued execution and this one; ones already on
                        // their way out count as evicted.
                        let excess = (active.len() + queued + 1).saturating_sub(max);
                        to_cancel = active
                            .iter()
                            .take(excess)
                            .filter(|(_, s)| s != ExecutionStatus::Terminating.as_str())
                            .map(|(id, _)| id.clone())
                            .collect();
                    }
                    ConcurrencyMode::Queue => {}
                }
                exec.status = ExecutionStatus::Queued;
            }
        }
        let mut row = execution_row(exec);
        if exec.status == ExecutionStatus::Pending {
            row.owner = Set(Some(self.replica.to_string()));
            row.lease_expires_at = Set(Some(self.lease_until()));
        }
        execution::Entity::insert(row)
            .exec_without_returning(txn)
            .await
            .map_err(|error| match (&exec.request_id, error.sql_err()) {
                // Another pipeline's execution took the id first.
                (Some(id), Some(sea_orm::SqlErr::UniqueConstraintViolation(_))) => {
                    StoreError::RequestIdReused(id.clone())
                }
                _ => error.into(),
            })?;
        execution_step::Entity::insert_many(
            exec.steps
                .iter()
                .enumerate()
                .map(|(i, s)| step_row(&exec.id, i, s)),
        )
        .exec_without_returning(txn)
        .await?;
        if !exec.labels.is_empty() {
            execution_label::Entity::insert_many(exec.labels.iter().map(|(key, value)| {
                execution_label::ActiveModel {
                    execution_id: Set(exec.id.clone()),
                    key: Set(key.clone()),
                    value: Set(value.clone()),
                }
            }))
            .exec_without_returning(txn)
            .await?;
        }
        if exec.status == ExecutionStatus::Queued {
            exec.last_sequence = 1;
            let event = Event {
                message: format!(
                    "waiting for a slot: pipeline '{}' is at its concurrency limit",
                    exec.pipeline_name
                ),
                ..Event::new(exec, 1, EventKind::ExecutionQueued)
            };
            execution::Entity::update_many()
                .col_expr(execution::Column::LastSequence, 1.into())
                .filter(execution::Column::Id.eq(&exec.id))
                .exec(txn)
                .await?;
            execution_event::Entity::insert(event_row(&event))
                .exec_without_returning(txn)
                .await?;
            self.announce(txn, std::slice::from_ref(&event)).await?;
        }
        Ok(Admission::Created { to_cancel })
    }

    /// Moves the oldest queued executions of a pipeline to pending while it
    /// has free slots under `cap` (all of them when there is no cap), and
    /// returns them.
    pub async fn promote_queued(
        &self,
        pipeline_name: &str,
        cap: Option<&ConcurrencyPolicy>,
    ) -> Result<Vec<Execution>> {
        let txn = self.writer.begin().await?;
        lock_pipeline(&txn, pipeline_name).await?;
        let free = match cap.filter(|c| c.max_active > 0) {
            Some(cap) => {
                let active = execution::Entity::find()
                    .filter(execution::Column::PipelineName.eq(pipeline_name))
                    .filter(
                        execution::Column::Status.is_in(SLOT_STATUSES.map(ExecutionStatus::as_str)),
                    )
                    .count(&txn)
                    .await?;
                (cap.max_active as u64).saturating_sub(active)
            }
            // No cap: every queued one (`limit` takes at most i64::MAX).
            None => i64::MAX as u64,
        };
        if free == 0 {
            return Ok(Vec::new());
        }
        let rows = execution::Entity::find()
            .filter(execution::Column::PipelineName.eq(pipeline_name))
            .filter(execution::Column::Status.eq(ExecutionStatus::Queued.as_str()))
            .order_by_asc(execution::Column::Id)
            .limit(free)
            .all(&txn)
            .await?;
        let mut promoted = Vec::with_capacity(rows.len());
        for row in rows {
            // Still queued: a concurrent cancel may have won.
            let updated = execution::Entity::update_many()
                .col_expr(
                    execution::Column::Status,
                    ExecutionStatus::Pending.as_str().into(),
                )
                .col_expr(execution::Column::Owner, self.replica.as_ref().into())
                .col_expr(execution::Column::LeaseExpiresAt, self.lease_until_expr())
                .col_expr(
                    execution::Column::RequestedAction,
                    sea_orm::sea_query::Expr::value(Option::<String>::None),
                )
                .filter(execution::Column::Id.eq(&row.id))
                .filter(execution::Column::Status.eq(ExecutionStatus::Queued.as_str()))
                .exec(&txn)
                .await?;
            if updated.rows_affected != 1 {
                continue;
            }
            let steps = steps_of(&txn, &row.id).await?;
            let mut exec = execution_from_rows(row, steps)?;
            exec.set_status(ExecutionStatus::Pending);
            promoted.push(exec);
        }
        txn.commit().await?;
        Ok(promoted)
    }

    /// Names of pipelines with queued executions.
    pub async fn pipelines_with_queued(&self) -> Result<Vec<String>> {
        Ok(execution::Entity::find()
            .select_only()
            .column(execution::Column::PipelineName)
            .filter(execution::Column::Status.eq(ExecutionStatus::Queued.as_str()))
            .distinct()
            .into_tuple()
            .all(&self.reader)
            .await?)
    }

    /// Commits a state change of `exec`: the execution row, the steps at
    /// `changed_steps`, and `events`, all or nothing. Without `expect` (a
    /// runner's write), the write happens only while this replica holds the
    /// execution's lease, else [`StoreError::LeaseLost`]; it is committed
    /// together with the other runners' waiting writes (see [`commits`]).
    /// With `expect` (an execution without a runner: a retry, a queued
    /// cancel), it happens only if the stored status is still `expect`, and
    /// leases the execution to this replica. Either way the events must
    /// continue the stored log: a writer with a stale copy of the execution
    /// cannot add to it.
    pub async fn save(
        &self,
        exec: &Execution,
        changed_steps: &[usize],
        events: &[Event],
        expect: Option<ExecutionStatus>,
    ) -> Result<()> {
        let previous = exec.last_sequence - events.len() as i64;
        let steps = changed_steps
            .iter()
            .map(|&i| step_row(&exec.id, i, &exec.steps[i]));
        let Some(expected) = expect else {
            return self
                .committer
                .commit(commits::Change {
                    execution_id: exec.id.clone(),
                    previous_sequence: previous,
                    execution: execution_changes(exec),
                    steps: steps.collect(),
                    events: events.iter().map(event_row).collect(),
                    announcement: self.announcement(events),
                })
                .await;
        };
        let _timer = self.metrics.db_timer(DbOp::Save);
        let txn = self.writer.begin().await?;
        let updated = execution::Entity::update_many()
            .set(execution_changes(exec))
            .filter(execution::Column::Id.eq(&exec.id))
            .filter(execution::Column::LastSequence.eq(previous))
            .filter(execution::Column::Status.eq(expected.as_str()))
            .col_expr(execution::Column::Owner, self.replica.as_ref().into())
            .col_expr(execution::Column::LeaseExpiresAt, self.lease_until_expr())
            .col_expr(
                execution::Column::RequestedAction,
                sea_orm::sea_query::Expr::value(Option::<String>::None),
            )
            .exec(&txn)
            .await?
            .rows_affected;
        if updated != 1 {
            return Err(StoreError::Conflict(format!(
                "execution '{}' changed concurrently; try again",
                exec.id
            )));
        }
        if !changed_steps.is_empty() {
            execution_step::Entity::insert_many(steps)
                .on_conflict(commits::step_upsert())
                .exec_without_returning(&txn)
                .await?;
        }
        if !events.is_empty() {
            execution_event::Entity::insert_many(events.iter().map(event_row))
                .exec_without_returning(&txn)
                .await?;
            self.announce(&txn, events).await?;
        }
        let _changed = self
            .caches
            .as_ref()
            .map(|caches| caches.finished.invalidate_on_drop(&exec.id));
        txn.commit().await?;
        Ok(())
    }

    /// Tells the other replicas (PostgreSQL) about `events` when the
    /// transaction commits.
    async fn announce(&self, txn: &impl ConnectionTrait, events: &[Event]) -> Result<()> {
        let Some(payload) = self.announcement(events) else {
            return Ok(());
        };
        Ok(notify(txn, EVENTS_CHANNEL, payload).await?)
    }

    /// The notification payload announcing `events` to the other replicas:
    /// `replica execution_id first_sequence last_sequence` (PostgreSQL only).
    fn announcement(&self, events: &[Event]) -> Option<String> {
        let (first, last) = (events.first()?, events.last()?);
        self.is_shared().then(|| {
            format!(
                "{} {} {} {}",
                self.replica, first.execution_id, first.sequence, last.sequence
            )
        })
    }

    pub async fn get_execution(&self, id: &str) -> Result<Execution> {
        let Some(caches) = &self.caches else {
            return self.read_execution(id).await;
        };
        if let Some(exec) = caches.finished.get(id) {
            return Ok(Execution::clone(&exec));
        }
        let epoch = caches.finished.epoch();
        let exec = self.read_execution(id).await?;
        // Only finished ones: a retry (through `save` with an expected
        // status) is the only write that changes them again.
        if exec.status.is_terminal() {
            caches.finished.insert(id, exec.clone(), epoch);
        }
        Ok(exec)
    }

    async fn read_execution(&self, id: &str) -> Result<Execution> {
        let _timer = self.metrics.db_timer(DbOp::GetExecution);
        let row = execution::Entity::find_by_id(id.to_string())
            .one(&self.reader)
            .await?
            .ok_or_else(|| StoreError::NotFound {
                kind: "execution",
                id: id.to_string(),
            })?;
        let steps = steps_of(&self.reader, id).await?;
        execution_from_rows(row, steps)
    }

    /// Status and latest sequence of an execution, without its steps.
    pub async fn execution_head(&self, id: &str) -> Result<(ExecutionStatus, i64)> {
        let _timer = self.metrics.db_timer(DbOp::ExecutionHead);
        let head: Option<(String, i64)> = execution::Entity::find_by_id(id.to_string())
            .select_only()
            .column(execution::Column::Status)
            .column(execution::Column::LastSequence)
            .into_tuple()
            .one(&self.reader)
            .await?;
        let (status, sequence) = head.ok_or_else(|| StoreError::NotFound {
            kind: "execution",
            id: id.to_string(),
        })?;
        Ok((parse_status(&status)?, sequence))
    }

    /// Executions matching `filter`, newest first; step outputs are left out.
    pub async fn list_executions(&self, filter: &ExecutionFilter) -> Result<Vec<Execution>> {
        let _timer = self.metrics.db_timer(DbOp::ListExecutions);
        let mut query = execution::Entity::find()
            .order_by_desc(execution::Column::Id)
            .limit(filter.limit);
        if let Some(name) = &filter.pipeline_name {
            query = query.filter(execution::Column::PipelineName.eq(name));
        }
        if !filter.statuses.is_empty() {
            query = query.filter(
                execution::Column::Status.is_in(filter.statuses.iter().map(|s| s.as_str())),
            );
        }
        if let Some(before) = &filter.before_id {
            query = query.filter(execution::Column::Id.lt(before));
        }
        if let Some(correlation_id) = &filter.correlation_id {
            query = query.filter(execution::Column::CorrelationId.eq(correlation_id));
        }
        for (key, value) in &filter.labels {
            query = query.filter(
                execution::Column::Id.in_subquery(
                    sea_orm::sea_query::Query::select()
                        .column(execution_label::Column::ExecutionId)
                        .from(execution_label::Entity)
                        .and_where(execution_label::Column::Key.eq(key))
                        .and_where(execution_label::Column::Value.eq(value))
                        .to_owned(),
                ),
            );
        }
        let rows = query.all(&self.reader).await?;
        let mut steps: HashMap<String, Vec<execution_step::Model>> = HashMap::new();
        for step in execution_step::Entity::find()
            .filter(execution_step::Column::ExecutionId.is_in(rows.iter().map(|r| r.id.clone())))
            .order_by_asc(execution_step::Column::Position)
            .all(&self.reader)
            .await?
        {
            steps
                .entry(step.execution_id.clone())
                .or_default()
                .push(step);
        }
        rows.into_iter()
            .map(|row| {
                let mut exec =
                    execution_from_rows(row.clone(), steps.remove(&row.id).unwrap_or_default())?;
                exec.steps.iter_mut().for_each(|s| s.output = None);
                Ok(exec)
            })
            .collect()
    }

    /// Up to `limit` events of an execution with a sequence above `after`.
    pub async fn events_after(&self, id: &str, after: i64, limit: u64) -> Result<Vec<Event>> {
        let _timer = self.metrics.db_timer(DbOp::ReadEvents);
        execution_event::Entity::find()
            .filter(execution_event::Column::ExecutionId.eq(id))
            .filter(execution_event::Column::Sequence.gt(after))
            .order_by_asc(execution_event::Column::Sequence)
            .limit(limit)
            .all(&self.reader)
            .await?
            .into_iter()
            .map(|row| {
                serde_json::from_value(row.payload)
                    .map_err(|e| StoreError::Corrupt(format!("event {id}#{}: {e}", row.sequence)))
            })
            .collect()
    }
}

fn sqlite_options(url: &str, connections: u32) -> ConnectOptions {
    let mut options = ConnectOptions::new(url);
    options
        .max_connections(connections)
        .min_connections(1)
        .sqlx_logging(false)
        .map_sqlx_sqlite_opts(|o| {
            o.journal_mode(SqliteJournalMode::Wal)
                .synchronous(SqliteSynchronous::Normal)
                .busy_timeout(Duration::from_secs(10))
                .foreign_keys(true)
        });
    options
}

fn is_unique_violation(error: &StoreError) -> bool {
    matches!(
        error,
        StoreError::Database(db) if matches!(db.sql_err(), Some(sea_orm::SqlErr::UniqueConstraintViolation(_)))
    )
}

async fn steps_of(db: &impl ConnectionTrait, id: &str) -> Result<Vec<execution_step::Model>> {
    Ok(execution_step::Entity::find()
        .filter(execution_step::Column::ExecutionId.eq(id))
        .order_by_asc(execution_step::Column::Position)
        .all(db)
        .await?)
}

/// `pg_notify(channel, payload)`: delivered to listeners when `db`'s
/// transaction commits (PostgreSQL).
async fn notify(
    db: &impl ConnectionTrait,
    channel: &str,
    payload: String,
) -> std::result::Result<(), DbErr> {
    db.execute_raw(sea_orm::Statement::from_sql_and_values(
        sea_orm::DbBackend::Postgres,
        "SELECT pg_notify($1, $2)",
        [channel.into(), payload.into()],
    ))
    .await?;
    Ok(())
}

/// Serialises admissions of one pipeline across connections and servers. On
/// SQLite the single writer connection already does; on PostgreSQL a
/// transaction-scoped advisory lock on the pipeline's name does.
async fn lock_pipeline(db: &impl ConnectionTrait, name: &str) -> Result<()> {
    if db.get_database_backend() == sea_orm::DbBackend::Postgres {
        db.execute_raw(sea_orm::Statement::from_sql_and_values(
            sea_orm::DbBackend::Postgres,
            "SELECT pg_advisory_xact_lock(hashtext($1))",
            [name.into()],
        ))
        .await?;
    }
    Ok(())
}

async fn latest_version(db: &impl ConnectionTrait, name: &str) -> Result<Option<i64>> {
    let version: Option<Option<i64>> = pipeline::Entity::find()
        .select_only()
        .column_as(pipeline::Column::Version.max(), "version")
        .filter(pipeline::Column::Name.eq(name))
        .into_tuple()
        .one(db)
        .await?;
    Ok(version.flatten())
}

async fn insert_pipeline(
    db: &impl ConnectionTrait,
    spec: &PipelineSpec,
    version: i64,
) -> Result<Pipeline> {
    let created_at = model::now();
    let definition = serde_json::to_value(spec).map_err(|e| StoreError::Corrupt(e.to_string()))?;
    pipeline::Entity::insert(pipeline::ActiveModel {
        name: Set(spec.name.clone()),
        version: Set(version),
        description: Set(spec.description.clone()),
        definition: Set(definition),
        created_at: Set(created_at),
        ..Default::default()
    })
    .exec_without_returning(db)
    .await?;
    Ok(Pipeline {
        spec: spec.clone(),
        version,
        created_at,
    })
}

fn pipeline_from_row(row: pipeline::Model) -> Result<Pipeline> {
    Ok(Pipeline {
        spec: serde_json::from_value(row.definition).map_err(|e| {
            StoreError::Corrupt(format!("pipeline {}@{}: {e}", row.name, row.version))
        })?,
        version: row.version,
        created_at: row.created_at,
    })
}

fn execution_row(exec: &Execution) -> execution::ActiveModel {
    execution::ActiveModel {
        id: Set(exec.id.clone()),
        pipeline_name: Set(exec.pipeline_name.clone()),
        pipeline_version: Set(exec.pipeline_version),
        definition: Set(serde_json::to_value(&exec.definition).unwrap_or(Value::Null)),
        status: Set(exec.status.as_str().to_string()),
        trigger_type: Set(exec.trigger.kind.as_str().to_string()),
        trigger_data: Set(Value::Object(exec.trigger.data.clone())),
        correlation_id: Set(exec.correlation_id.clone()),
        labels: Set(serde_json::to_value(&exec.labels).unwrap_or(Value::Null)),
        input: Set(Value::Object(exec.input.clone())),
        execution_data: Set(Value::Object(exec.execution_data.clone())),
        error_message: Set(exec.error_message.clone()),
        created_at: Set(exec.created_at),
        started_at: Set(exec.started_at),
        finished_at: Set(exec.finished_at),
        last_sequence: Set(exec.last_sequence),
        request_id: Set(exec.request_id.clone()),
        request_fingerprint: Set(exec.request_fingerprint.clone()),
        deadline_at: Set(exec.deadline),
        // Written only by the lease operations.
        owner: sea_orm::ActiveValue::NotSet,
        lease_expires_at: sea_orm::ActiveValue::NotSet,
        requested_action: sea_orm::ActiveValue::NotSet,
    }
}

/// The columns of an execution that change after admission; the others
/// (definition, input, labels, ids) are written once, by admission.
fn execution_changes(exec: &Execution) -> execution::ActiveModel {
    execution::ActiveModel {
        status: Set(exec.status.as_str().to_string()),
        execution_data: Set(Value::Object(exec.execution_data.clone())),
        error_message: Set(exec.error_message.clone()),
        started_at: Set(exec.started_at),
        finished_at: Set(exec.finished_at),
        last_sequence: Set(exec.last_sequence),
        deadline_at: Set(exec.deadline),
        ..Default::default()
    }
}

fn step_row(execution_id: &str, position: usize, step: &StepRun) -> execution_step::ActiveModel {
    execution_step::ActiveModel {
        execution_id: Set(execution_id.to_string()),
        name: Set(step.name.clone()),
        position: Set(position as i32),
        status: Set(step.status.as_str().to_string()),
        attempt: Set(step.attempt as i32),
        started_at: Set(step.started_at),
        finished_at: Set(step.finished_at),
        output: Set(step.output.clone().map(Value::Object)),
        error: Set(step.error.clone()),
        reason: Set(step.reason.clone()),
        next_attempt_at: Set(step.next_attempt_at),
        error_kind: Set(step.error_kind.clone()),
        retry_base: Set(step.retry_base as i32),
    }
}

fn event_row(event: &Event) -> execution_event::ActiveModel {
    execution_event::ActiveModel {
        execution_id: Set(event.execution_id.clone()),
        sequence: Set(event.sequence),
        event_type: Set(event.kind.as_str().to_string()),
        payload: Set(serde_json::to_value(event).unwrap_or(Value::Null)),
        created_at: Set(event.time),
    }
}

fn parse_status(text: &str) -> Result<ExecutionStatus> {
    ExecutionStatus::parse(text)
        .ok_or_else(|| StoreError::Corrupt(format!("unknown execution status '{text}'")))
}

fn object(value: Value, what: &str) -> Result<JsonMap> {
    match value {
        Value::Object(map) => Ok(map),
        other => Err(StoreError::Corrupt(format!(
            "{what} is not an object: {other}"
        ))),
    }
}

fn execution_from_rows(
    row: execution::Model,
    steps: Vec<execution_step::Model>,
) -> Result<Execution> {
    let corrupt = |what: &str, e: &dyn std::fmt::Display| {
        StoreError::Corrupt(format!("execution {} {what}: {e}", row.id))
    };
    let definition: PipelineSpec =
        serde_json::from_value(row.definition.clone()).map_err(|e| corrupt("definition", &e))?;
    let labels: BTreeMap<String, String> =
        serde_json::from_value(row.labels.clone()).map_err(|e| corrupt("labels", &e))?;
    let trigger = Trigger {
        kind: TriggerKind::parse(&row.trigger_type)
            .ok_or_else(|| corrupt("trigger", &row.trigger_type))?,
        data: object(row.trigger_data.clone(), "trigger data")?,
    };
    let steps = steps
        .into_iter()
        .map(|s| {
            Ok(StepRun {
                status: StepStatus::parse(&s.status).ok_or_else(|| {
                    StoreError::Corrupt(format!("unknown step status '{}'", s.status))
                })?,
                attempt: s.attempt.max(0) as u32,
                started_at: s.started_at,
                finished_at: s.finished_at,
                output: s.output.map(|o| object(o, "step output")).transpose()?,
                error: s.error,
                error_kind: s.error_kind,
                retry_base: s.retry_base.max(0) as u32,
                reason: s.reason,
                next_attempt_at: s.next_attempt_at,
                name: s.name,
            })
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(Execution {
        status: parse_status(&row.status)?,
        input: object(row.input, "input")?,
        execution_data: object(row.execution_data, "execution data")?,
        id: row.id,
        pipeline_name: row.pipeline_name,
        pipeline_version: row.pipeline_version,
        definition,
        trigger,
        correlation_id: row.correlation_id,
        labels,
        error_message: row.error_message,
        created_at: row.created_at,
        started_at: row.started_at,
        finished_at: row.finished_at,
        last_sequence: row.last_sequence,
        request_id: row.request_id,
        request_fingerprint: row.request_fingerprint,
        deadline: row.deadline_at,
        steps,
    })
}
