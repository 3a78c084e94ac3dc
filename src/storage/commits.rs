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
//!
//! On SQLite, admissions of new executions go through here too, in arrival
//! order with the changes: the single writer serialises them anyway, and
//! this saves each its own transaction. An admission refused for a reason of
//! its own (a reused request id, a concurrency cap) has written nothing and
//! does not affect the others; a database error fails the whole group.

use sea_orm::sea_query::OnConflict;
use sea_orm::{ColumnTrait, DatabaseConnection, DbErr, EntityTrait, QueryFilter, TransactionTrait};
use tokio::sync::{mpsc, oneshot};

use super::entities::{execution, execution_event, execution_step};
use super::{Admission, Result, Store, StoreError};
use crate::domain::definition::ConcurrencyPolicy;
use crate::domain::model::Execution;
use crate::telemetry::metrics::{DbOp, Metrics};

/// Most changes written in one transaction.
const MAX_BATCH: usize = 128;
/// Most rows in one `INSERT` (SQLite allows 32766 bound values; a row has
/// at most 13 columns).
const MAX_ROWS_PER_INSERT: usize = 1000;
/// How long requests are written one at a time after a group failed.
const ALONE_AFTER_FAILURE: std::time::Duration = std::time::Duration::from_secs(2);

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

/// A new execution to admit (see [`Store::admit_execution`]).
pub struct Admit {
    pub store: Store,
    pub exec: Execution,
    pub cap: Option<ConcurrencyPolicy>,
}

type Admitted = Result<(Admission, Execution)>;

enum Request {
    Change(Box<Change>, oneshot::Sender<Result<()>>),
    Admit(Box<Admit>, oneshot::Sender<Admitted>),
}

/// What a request comes to once its group is committed.
enum Outcome {
    Change(Result<()>),
    Admit(Box<Admitted>),
}

/// The sending side of the group-commit task.
#[derive(Clone)]
pub struct Committer {
    requests: mpsc::UnboundedSender<Request>,
}

impl Committer {
    /// Starts the task writing through `writer` as `replica`; it ends when
    /// the last `Committer` is dropped.
    pub fn start(
        writer: DatabaseConnection,
        replica: std::sync::Arc<str>,
        metrics: std::sync::Arc<Metrics>,
    ) -> Self {
        let (requests, receiver) = mpsc::unbounded_channel();
        tokio::spawn(run(writer, replica, receiver, metrics));
        Self { requests }
    }

    /// Writes `change` with whatever other changes are waiting; returns once
    /// it is committed (or refused).
    pub async fn commit(&self, change: Change) -> Result<()> {
        let (reply, answer) = oneshot::channel();
        self.send(Request::Change(Box::new(change), reply))?;
        answer.await.map_err(|_| closed())?
    }

    /// Admits an execution with whatever changes are waiting; returns once
    /// it is committed (or refused), with the execution as admitted.
    pub async fn admit(&self, admit: Admit) -> Admitted {
        let (reply, answer) = oneshot::channel();
        self.send(Request::Admit(Box::new(admit), reply))?;
        answer.await.map_err(|_| closed())?
    }

    fn send(&self, request: Request) -> Result<()> {
        self.requests.send(request).map_err(|_| closed())
    }
}

fn closed() -> StoreError {
    StoreError::Database(DbErr::Custom("the store is closed".into()))
}

async fn run(
    writer: DatabaseConnection,
    replica: std::sync::Arc<str>,
    mut receiver: mpsc::UnboundedReceiver<Request>,
    metrics: std::sync::Arc<Metrics>,
) {
    // After a group failed, requests are written one at a time for a while,
    // so that one that fails every time (its runner retries it) fails alone
    // instead of taking other groups down with it.
    let mut alone_until: Option<tokio::time::Instant> = None;
    while let Some(first) = receiver.recv().await {
        let mut batch = vec![first];
        let limit = match alone_until {
            Some(until) if tokio::time::Instant::now() < until => 1,
            _ => MAX_BATCH,
        };
        while batch.len() < limit {
            match receiver.try_recv() {
                Ok(request) => batch.push(request),
                Err(_) => break,
            }
        }
        let mut replies = Vec::with_capacity(batch.len());
        let mut work = Vec::with_capacity(batch.len());
        for request in batch {
            match request {
                Request::Change(change, reply) => {
                    work.push(Work::Change(change));
                    replies.push(Reply::Change(reply));
                }
                Request::Admit(admit, reply) => {
                    work.push(Work::Admit(admit));
                    replies.push(Reply::Admit(reply));
                }
            }
        }
        let timer = metrics.db_timer(DbOp::Commit);
        let written = write(&writer, &replica, work).await;
        drop(timer);
        match written {
            Ok(outcomes) => {
                for (reply, outcome) in replies.into_iter().zip(outcomes) {
                    match (reply, outcome) {
                        (Reply::Change(reply), Outcome::Change(outcome)) => {
                            let _ = reply.send(outcome);
                        }
                        (Reply::Admit(reply), Outcome::Admit(outcome)) => {
                            let _ = reply.send(*outcome);
                        }
                        _ => unreachable!("outcomes follow their requests"),
                    }
                }
            }
            Err(error) => {
                // The whole transaction failed: every request is answered
                // with the error (runners retry their changes).
                if replies.len() > 1 {
                    alone_until = Some(tokio::time::Instant::now() + ALONE_AFTER_FAILURE);
                }
                for reply in replies {
                    let error = StoreError::Database(error.clone());
                    match reply {
                        Reply::Change(reply) => {
                            let _ = reply.send(Err(error));
                        }
                        Reply::Admit(reply) => {
                            let _ = reply.send(Err(error));
                        }
                    }
                }
            }
        }
    }
}

enum Work {
    Change(Box<Change>),
    Admit(Box<Admit>),
}

enum Reply {
    Change(oneshot::Sender<Result<()>>),
    Admit(oneshot::Sender<Admitted>),
}

/// Writes `work` in one transaction; the outcome of each, in order.
async fn write(
    writer: &DatabaseConnection,
    replica: &str,
    work: Vec<Work>,
) -> std::result::Result<Vec<Outcome>, DbErr> {
    // Rows are updated in id order, the order in which lease renewals lock
    // them too, so that two transactions cannot deadlock (PostgreSQL).
    let mut order: Vec<usize> = (0..work.len()).collect();
    order.sort_by(|&a, &b| work_key(&work[a]).cmp(work_key(&work[b])));
    let mut work: Vec<Option<Work>> = work.into_iter().map(Some).collect();
    let mut outcomes: Vec<Option<Outcome>> = work.iter().map(|_| None).collect();
    let txn = writer.begin().await?;
    let mut steps = Vec::new();
    let mut events = Vec::new();
    let mut announcements = Vec::new();
    for index in order {
        let Some(item) = work[index].take() else {
            continue;
        };
        let outcome = &mut outcomes[index];
        let change = match item {
            Work::Change(change) => *change,
            Work::Admit(admit) => {
                let Admit {
                    store,
                    mut exec,
                    cap,
                } = *admit;
                let admitted = match store.admit_in(&txn, &mut exec, cap.as_ref()).await {
                    Ok(admission) => Ok((admission, exec)),
                    // It may have written part of itself: nothing commits.
                    Err(StoreError::Database(error)) => return Err(error),
                    Err(refused) => Err(refused),
                };
                *outcome = Some(Outcome::Admit(Box::new(admitted)));
                continue;
            }
        };
        let updated = execution::Entity::update_many()
            .set(change.execution)
            .filter(execution::Column::Id.eq(&change.execution_id))
            .filter(execution::Column::LastSequence.eq(change.previous_sequence))
            .filter(execution::Column::Owner.eq(replica))
            .exec(&txn)
            .await?
            .rows_affected;
        if updated != 1 {
            *outcome = Some(Outcome::Change(Err(StoreError::LeaseLost(
                change.execution_id,
            ))));
            continue;
        }
        *outcome = Some(Outcome::Change(Ok(())));
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
        super::notify(&txn, super::EVENTS_CHANNEL, payload).await?;
    }
    txn.commit().await?;
    Ok(outcomes
        .into_iter()
        .map(|outcome| outcome.expect("every request has an outcome"))
        .collect())
}

/// The key groups are written in: admissions first, then changes by
/// execution id.
fn work_key(work: &Work) -> &str {
    match work {
        Work::Admit(_) => "",
        Work::Change(change) => &change.execution_id,
    }
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

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use crate::domain::definition::PipelineSpec;
    use crate::domain::model::{self, Event, Execution, StepRun, Trigger};
    use crate::domain::status::{EventKind, ExecutionStatus, TriggerKind};
    use crate::storage::{Store, StoreError};

    async fn store(dir: &tempfile::TempDir) -> Store {
        let url = format!("sqlite://{}?mode=rwc", dir.path().join("db").display());
        Store::connect(
            &url,
            "replica-a",
            Duration::from_secs(60),
            std::sync::Arc::new(crate::telemetry::metrics::Metrics::new()),
        )
        .await
        .expect("open the store")
    }

    /// An admitted (pending, leased) execution of a one-step pipeline.
    async fn admitted(store: &Store, spec: &PipelineSpec) -> Execution {
        let mut exec = Execution {
            id: String::new(),
            pipeline_name: spec.name.clone(),
            pipeline_version: 1,
            definition: spec.clone(),
            status: ExecutionStatus::Pending,
            trigger: Trigger {
                kind: TriggerKind::Manual,
                data: Default::default(),
            },
            correlation_id: String::new(),
            labels: Default::default(),
            input: Default::default(),
            execution_data: Default::default(),
            error_message: String::new(),
            created_at: model::now(),
            started_at: None,
            finished_at: None,
            last_sequence: 0,
            steps: vec![StepRun::new("only".into())],
            request_id: None,
            request_fingerprint: String::new(),
            deadline: None,
        };
        store.admit_execution(&mut exec, None).await.expect("admit");
        exec
    }

    /// The execution started, with its event: the change a runner saves.
    fn started(exec: &Execution) -> (Execution, Vec<Event>) {
        let mut exec = exec.clone();
        exec.status = ExecutionStatus::Running;
        exec.last_sequence += 1;
        let event = Event::new(&exec, exec.last_sequence, EventKind::ExecutionStarted);
        (exec, vec![event])
    }

    #[tokio::test]
    async fn a_stale_change_is_refused_without_failing_the_others_in_its_group() {
        let dir = tempfile::tempdir().unwrap();
        let store = store(&dir).await;
        let spec: PipelineSpec =
            serde_yaml_ng::from_str("name: p\nsteps:\n- {name: only, noop: {}}\n").unwrap();
        store.create_pipeline(&spec).await.unwrap();
        let executions: Vec<Execution> =
            futures::future::join_all((0..3).map(|_| admitted(&store, &spec))).await;
        let (a, a_events) = started(&executions[0]);
        let (b, b_events) = started(&executions[1]);
        // A copy that believes it is one event further than it is: its
        // events would not continue the stored log.
        let (mut stale, _) = started(&executions[2]);
        stale.last_sequence += 1;
        let stale_events = vec![Event::new(
            &stale,
            stale.last_sequence,
            EventKind::ExecutionStarted,
        )];

        // Sent together, so that they are written in one transaction.
        let (saved_a, saved_stale, saved_b) = tokio::join!(
            store.save(&a, &[], &a_events, None),
            store.save(&stale, &[], &stale_events, None),
            store.save(&b, &[], &b_events, None),
        );
        saved_a.expect("a is committed");
        saved_b.expect("b is committed");
        assert!(
            matches!(saved_stale, Err(StoreError::LeaseLost(_))),
            "{saved_stale:?}"
        );

        for (exec, status, events) in [
            (&a, ExecutionStatus::Running, 1),
            (&b, ExecutionStatus::Running, 1),
            (&executions[2], ExecutionStatus::Pending, 0),
        ] {
            let stored = store.get_execution(&exec.id).await.unwrap();
            assert_eq!(stored.status, status);
            assert_eq!(stored.last_sequence, events);
            assert_eq!(
                store.events_after(&exec.id, 0, 10).await.unwrap().len(),
                events as usize
            );
        }
    }
}
