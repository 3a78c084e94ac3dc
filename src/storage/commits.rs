//! Group commit of runners' state changes. Every runner commits each state
//! change of its execution before publishing it; one transaction per change
//! makes the single writer (SQLite) or the WAL flush (PostgreSQL) the limit
//! on how many executions can run. Instead, runners hand their changes to
//! one task that writes every change waiting at that moment in a single
//! transaction: one fenced `UPDATE` per execution, then all step rows and
//! all events in one statement each. A change whose fence fails (its
//! replica lost the lease, or a stale copy) is left out of the transaction
//! and answered [`StoreError::LeaseLost`]; the others commit. Nothing is
//! answered before the transaction commits.

use sea_orm::sea_query::OnConflict;
use sea_orm::{
    ColumnTrait, ConnectionTrait, DatabaseConnection, DbErr, EntityTrait, QueryFilter,
    TransactionTrait,
};
use tokio::sync::{mpsc, oneshot};

use super::entities::{execution, execution_event, execution_step};
use super::{Result, StoreError};

/// Most changes written in one transaction.
const MAX_BATCH: usize = 128;
/// Most rows in one `INSERT` (SQLite allows 32766 bound values; a row has
/// at most 12 columns).
const MAX_ROWS_PER_INSERT: usize = 1000;

/// One runner's state change, as rows.
pub struct Change {
    pub execution_id: String,
    /// The stored `last_sequence` this change follows.
    pub previous_sequence: i64,
    pub execution: execution::ActiveModel,
    pub steps: Vec<execution_step::ActiveModel>,
    pub events: Vec<execution_event::ActiveModel>,
    /// The `pg_notify` payload announcing the events (PostgreSQL).
    pub announcement: Option<String>,
}

type Request = (Change, oneshot::Sender<Result<()>>);

/// The sending side of the group-commit task.
#[derive(Clone)]
pub struct Committer {
    requests: mpsc::UnboundedSender<Request>,
}

impl Committer {
    /// Starts the task writing through `writer` as `replica`; it ends when
    /// the last `Committer` is dropped.
    pub fn start(writer: DatabaseConnection, replica: std::sync::Arc<str>) -> Self {
        let (requests, receiver) = mpsc::unbounded_channel();
        tokio::spawn(run(writer, replica, receiver));
        Self { requests }
    }

    /// Writes `change` with whatever other changes are waiting; returns once
    /// it is committed (or refused).
    pub async fn commit(&self, change: Change) -> Result<()> {
        let (reply, answer) = oneshot::channel();
        self.requests
            .send((change, reply))
            .map_err(|_| StoreError::Database(DbErr::Custom("the store is closed".into())))?;
        answer
            .await
            .map_err(|_| StoreError::Database(DbErr::Custom("the store is closed".into())))?
    }
}

async fn run(
    writer: DatabaseConnection,
    replica: std::sync::Arc<str>,
    mut receiver: mpsc::UnboundedReceiver<Request>,
) {
    while let Some(first) = receiver.recv().await {
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH {
            match receiver.try_recv() {
                Ok(request) => batch.push(request),
                Err(_) => break,
            }
        }
        let (changes, replies): (Vec<Change>, Vec<_>) = batch.into_iter().unzip();
        match write(&writer, &replica, changes).await {
            Ok(outcomes) => {
                for (reply, outcome) in replies.into_iter().zip(outcomes) {
                    let _ = reply.send(outcome);
                }
            }
            Err(error) => {
                // The whole transaction failed: every change is answered
                // with the error (the runners retry).
                for reply in replies {
                    let _ = reply.send(Err(StoreError::Database(error.clone())));
                }
            }
        }
    }
}

/// Writes `changes` in one transaction; the outcome of each, in order.
async fn write(
    writer: &DatabaseConnection,
    replica: &str,
    changes: Vec<Change>,
) -> std::result::Result<Vec<Result<()>>, DbErr> {
    let txn = writer.begin().await?;
    let mut outcomes = Vec::with_capacity(changes.len());
    let mut steps = Vec::new();
    let mut events = Vec::new();
    let mut announcements = Vec::new();
    for change in changes {
        let updated = execution::Entity::update_many()
            .set(change.execution)
            .filter(execution::Column::Id.eq(&change.execution_id))
            .filter(execution::Column::LastSequence.eq(change.previous_sequence))
            .filter(execution::Column::Owner.eq(replica))
            .exec(&txn)
            .await?
            .rows_affected;
        if updated != 1 {
            outcomes.push(Err(StoreError::LeaseLost(change.execution_id)));
            continue;
        }
        outcomes.push(Ok(()));
        steps.extend(change.steps);
        events.extend(change.events);
        announcements.extend(change.announcement);
    }
    while !steps.is_empty() {
        let rest = steps.split_off(steps.len().min(MAX_ROWS_PER_INSERT));
        execution_step::Entity::insert_many(std::mem::replace(&mut steps, rest))
            .on_conflict(step_upsert())
            .exec_without_returning(&txn)
            .await?;
    }
    while !events.is_empty() {
        let rest = events.split_off(events.len().min(MAX_ROWS_PER_INSERT));
        execution_event::Entity::insert_many(std::mem::replace(&mut events, rest))
            .exec_without_returning(&txn)
            .await?;
    }
    for payload in announcements {
        txn.execute_raw(sea_orm::Statement::from_sql_and_values(
            sea_orm::DbBackend::Postgres,
            "SELECT pg_notify($1, $2)",
            [super::EVENTS_CHANNEL.into(), payload.into()],
        ))
        .await?;
    }
    txn.commit().await?;
    Ok(outcomes)
}

/// Step rows are inserted once at admission and updated afterwards.
pub fn step_upsert() -> OnConflict {
    OnConflict::columns([
        execution_step::Column::ExecutionId,
        execution_step::Column::Name,
    ])
    .update_columns([
        execution_step::Column::Status,
        execution_step::Column::Attempt,
        execution_step::Column::StartedAt,
        execution_step::Column::FinishedAt,
        execution_step::Column::Output,
        execution_step::Column::Error,
        execution_step::Column::Reason,
        execution_step::Column::NextAttemptAt,
        execution_step::Column::ErrorKind,
        execution_step::Column::RetryBase,
    ])
    .to_owned()
}
