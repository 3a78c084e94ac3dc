//! The audit trail's table: queries, and [`AuditLog`], which writes events
//! in groups from a task of its own so that recording a call costs the call
//! no database round trip (and the single SQLite writer no transaction per
//! call). A reader first waits for every event recorded before it was asked
//! ([`AuditLog::flush`]), so a caller always finds its own calls.

use sea_orm::{ActiveValue::Set, ColumnTrait, EntityTrait, QueryFilter, QueryOrder, QuerySelect};
use tokio::sync::{mpsc, oneshot};

use super::entities::audit_event;
use super::{Result, Store, StoreError};
use crate::domain::access::{AuditEvent, AuditFilter, Role};

/// Most events written in one `INSERT` (9 columns a row).
const MAX_BATCH: usize = 500;

impl Store {
    /// Stores `events` in one statement.
    pub async fn insert_audit_events(&self, events: &[AuditEvent]) -> Result<()> {
        if events.is_empty() {
            return Ok(());
        }
        let rows = events.iter().map(|e| audit_event::ActiveModel {
            id: Set(e.id.clone()),
            time: Set(e.time),
            caller: Set(e.caller.clone()),
            role: Set(e.role.as_str().to_string()),
            method: Set(e.method.clone()),
            target: Set(e.target.clone()),
            request_id: Set(e.request_id.clone()),
            code: Set(e.code.clone()),
            message: Set(e.message.clone()),
        });
        audit_event::Entity::insert_many(rows)
            .exec_without_returning(&self.writer)
            .await?;
        Ok(())
    }

    /// Audit events matching `filter`, newest first.
    pub async fn list_audit_events(&self, filter: &AuditFilter) -> Result<Vec<AuditEvent>> {
        let mut query = audit_event::Entity::find()
            .order_by_desc(audit_event::Column::Id)
            .limit(filter.limit);
        if let Some(caller) = &filter.caller {
            query = query.filter(audit_event::Column::Caller.eq(caller));
        }
        if let Some(method) = &filter.method {
            query = query.filter(audit_event::Column::Method.eq(method));
        }
        if let Some(target) = &filter.target {
            query = query.filter(audit_event::Column::Target.eq(target));
        }
        if let Some(before) = &filter.before_id {
            query = query.filter(audit_event::Column::Id.lt(before));
        }
        query
            .all(&self.reader)
            .await?
            .into_iter()
            .map(|row| {
                Ok(AuditEvent {
                    role: Role::parse(&row.role).ok_or_else(|| {
                        StoreError::Corrupt(format!(
                            "audit event {} has the unknown role '{}'",
                            row.id, row.role
                        ))
                    })?,
                    id: row.id,
                    time: row.time,
                    caller: row.caller,
                    method: row.method,
                    target: row.target,
                    request_id: row.request_id,
                    code: row.code,
                    message: row.message,
                })
            })
            .collect()
    }
}

enum Message {
    Event(Box<AuditEvent>),
    /// Answered once every event sent before it is written (or given up).
    Flush(oneshot::Sender<()>),
}

/// Records audit events; see the module documentation. Cloning shares the
/// writer task, which ends when the last clone is dropped.
#[derive(Clone)]
pub struct AuditLog {
    sender: mpsc::Sender<Message>,
    store: Store,
}

/// Events waiting to be written, at most: a database slower than the calls
/// cannot make the queue grow without bound. Over it, an event is kept only
/// in the log (as when a write fails).
const MAX_QUEUED: usize = 10_000;
/// Attempts to write a batch before it is left to the log.
const WRITE_ATTEMPTS: u32 = 5;

impl AuditLog {
    /// Starts the writer task on `store`.
    pub fn start(store: Store) -> Self {
        let (sender, receiver) = mpsc::channel(MAX_QUEUED);
        tokio::spawn(write(store.clone(), receiver));
        Self { sender, store }
    }

    /// Queues `event` for writing, and logs it.
    pub fn record(&self, event: AuditEvent) {
        tracing::info!(
            target: "pipelined::audit",
            caller = %event.caller,
            role = %event.role,
            method = %event.method,
            target = %event.target,
            code = %event.code,
            "audit"
        );
        match self.sender.try_send(Message::Event(Box::new(event))) {
            Ok(()) => {}
            Err(mpsc::error::TrySendError::Full(_)) => tracing::error!(
                queued = MAX_QUEUED,
                "the audit queue is full (the database is slow); the event above is kept only in \
                 this log"
            ),
            Err(mpsc::error::TrySendError::Closed(_)) => {
                tracing::error!(
                    "the audit writer has stopped; the event above is kept only in this log"
                )
            }
        }
    }

    /// Events matching `filter`, newest first, including every one recorded
    /// before this call.
    pub async fn list(&self, filter: &AuditFilter) -> Result<Vec<AuditEvent>> {
        self.flush().await;
        self.store.list_audit_events(filter).await
    }

    /// Waits until every event recorded before this call is written.
    pub async fn flush(&self) {
        let (done, written) = oneshot::channel();
        if self.sender.send(Message::Flush(done)).await.is_ok() {
            let _ = written.await;
        }
    }
}

async fn write(store: Store, mut receiver: mpsc::Receiver<Message>) {
    let mut events = Vec::new();
    let mut flushes = Vec::new();
    while let Some(first) = receiver.recv().await {
        let mut next = Some(first);
        while let Some(message) = next.take() {
            match message {
                Message::Event(event) => events.push(*event),
                Message::Flush(done) => flushes.push(done),
            }
            if events.len() < MAX_BATCH {
                next = receiver.try_recv().ok();
            }
        }
        let mut written = store.insert_audit_events(&events).await;
        let mut backoff = std::time::Duration::from_millis(100);
        for _ in 1..WRITE_ATTEMPTS {
            if written.is_ok() || events.is_empty() {
                break;
            }
            tokio::time::sleep(backoff).await;
            backoff *= 2;
            written = store.insert_audit_events(&events).await;
        }
        if let Err(error) = written {
            // Kept in the log at least; the calls themselves have happened.
            for event in &events {
                tracing::error!(
                    %error,
                    id = %event.id,
                    caller = %event.caller,
                    method = %event.method,
                    target = %event.target,
                    code = %event.code,
                    "cannot store an audit event"
                );
            }
        }
        events.clear();
        for done in flushes.drain(..) {
            let _ = done.send(());
        }
    }
}
