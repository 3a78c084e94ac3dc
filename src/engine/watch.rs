//! `WatchExecution`: stored events, then live ones, with no gap and no
//! duplicate at the seam; and `WatchExecutions`: live events of every
//! execution.
//!
//! The watcher subscribes to the hub *before* reading the database. Every
//! event is committed before it is published, so an event is either already
//! in the database when it is read, or published after the subscription;
//! sequence numbers drop the ones seen both ways. A watcher that lags behind
//! the live buffer, or sees a gap, reads the database again. A stream that
//! has sent nothing for the heartbeat interval sends a heartbeat, so that
//! proxies with idle timeouts keep it open.

use std::sync::Arc;

use chrono::{DateTime, Utc};
use tokio::sync::broadcast::error::RecvError;
use tokio::sync::mpsc;
use tokio::time::{Instant, Interval, MissedTickBehavior};
use tokio_stream::wrappers::ReceiverStream;

use super::Shared;
use crate::domain::Error;
use crate::domain::model::Event;
use crate::domain::status::{EventKind, ExecutionStatus};

/// Events read from the database per query while catching up.
const CATCH_UP_BATCH: u64 = 512;
/// Items queued per watcher between its task and its gRPC stream.
const STREAM_BUFFER: usize = 64;

/// One item of a watch stream.
#[derive(Debug, Clone, PartialEq)]
pub enum WatchItem {
    /// Shared with the hub and other watchers, not copied.
    Event(Arc<Event>),
    /// Nothing happened for a while; carries the server's time.
    Heartbeat(DateTime<Utc>),
}

/// The stream of one watcher.
pub type WatchStream = ReceiverStream<Result<WatchItem, Error>>;

/// Which events a watcher of all executions receives; empty lists match all.
#[derive(Debug, Clone, Default)]
pub struct AllEventsFilter {
    pub pipeline_name: Option<String>,
    pub statuses: Vec<ExecutionStatus>,
    pub kinds: Vec<EventKind>,
}

impl AllEventsFilter {
    fn matches(&self, event: &Event) -> bool {
        self.pipeline_name
            .as_ref()
            .is_none_or(|name| *name == event.pipeline_name)
            && (self.statuses.is_empty() || self.statuses.contains(&event.execution_status))
            && (self.kinds.is_empty() || self.kinds.contains(&event.kind))
    }
}

fn heartbeat(shared: &Shared) -> Interval {
    let period = shared.config.heartbeat_interval;
    let mut interval = tokio::time::interval_at(Instant::now() + period, period);
    interval.set_missed_tick_behavior(MissedTickBehavior::Delay);
    interval
}

pub(super) async fn watch(shared: Arc<Shared>, id: &str, after: i64) -> Result<WatchStream, Error> {
    if after < 0 {
        return Err(Error::invalid("after_sequence", "must not be negative"));
    }
    let subscription = shared.hub.subscribe(id);
    // The first batch is read here: events prove the execution exists;
    // without any, its status says whether it exists (NOT_FOUND before the
    // stream starts) and whether it has finished.
    let mut first_batch = shared.store.events_after(id, after, CATCH_UP_BATCH).await?;
    let mut finished_at_start = false;
    if first_batch.is_empty() && shared.store.execution_head(id).await?.0.is_terminal() {
        finished_at_start = true;
        // It may have run to its end between the two reads: read again,
        // now that every event it will have is committed.
        first_batch = shared.store.events_after(id, after, CATCH_UP_BATCH).await?;
    }
    let (tx, rx) = mpsc::channel(STREAM_BUFFER);
    let id = id.to_string();
    tokio::spawn(async move {
        let mut subscription = subscription;
        let mut sent = after;
        let mut finished_at_start = finished_at_start;
        let mut first_batch = Some(first_batch);
        let mut idle = heartbeat(&shared);
        let mut missed = shared.hub.missed();
        loop {
            // Catch up from the database.
            let mut last_was_terminal = false;
            loop {
                let read = match first_batch.take() {
                    Some(batch) => Ok(batch),
                    None => shared.store.events_after(&id, sent, CATCH_UP_BATCH).await,
                };
                let batch = match read {
                    Ok(batch) => batch,
                    Err(error) => {
                        let _ = tx.send(Err(error.into())).await;
                        return;
                    }
                };
                let complete = (batch.len() as u64) < CATCH_UP_BATCH;
                for event in batch {
                    sent = event.sequence;
                    last_was_terminal = event.kind.is_terminal();
                    if tx
                        .send(Ok(WatchItem::Event(Arc::new(event))))
                        .await
                        .is_err()
                    {
                        return;
                    }
                    idle.reset();
                }
                if complete {
                    break;
                }
            }
            if last_was_terminal || std::mem::take(&mut finished_at_start) {
                return;
            }
            // Follow live events until done, or until a lag or gap sends us
            // back to the database.
            loop {
                tokio::select! {
                    received = subscription.receiver().recv() => match received {
                        // Already sent, or before `after_sequence`; a terminal
                        // event there still ends a watch that started past the end.
                        Ok(event) if event.sequence <= sent => {
                            if event.kind.is_terminal() {
                                return;
                            }
                        }
                        Ok(event) if event.sequence == sent + 1 => {
                            sent = event.sequence;
                            let terminal = event.kind.is_terminal();
                            if tx.send(Ok(WatchItem::Event(Arc::clone(&event)))).await.is_err() || terminal {
                                return;
                            }
                            idle.reset();
                        }
                        Ok(_) | Err(RecvError::Lagged(_)) => break,
                        Err(RecvError::Closed) => return,
                    },
                    _ = idle.tick() => {
                        if tx.send(Ok(WatchItem::Heartbeat(Utc::now()))).await.is_err() {
                            return;
                        }
                        // With several replicas, a lost notification would
                        // leave this watcher behind: look at the table.
                        if shared.store.is_shared() {
                            break;
                        }
                    }
                    // Notifications from other replicas were lost: re-read.
                    Ok(()) = missed.changed() => break,
                    _ = tx.closed() => return,
                    _ = shared.shutdown.cancelled() => {
                        let _ = tx.send(Err(Error::ShuttingDown)).await;
                        return;
                    }
                }
            }
        }
    });
    Ok(ReceiverStream::new(rx))
}

/// Live events of all executions. There is no replay: a watcher that falls
/// more than the hub's buffer behind is told so (ABORTED) and should
/// reconcile with `ListExecutions` before watching again.
pub(super) fn watch_all(shared: Arc<Shared>, filter: AllEventsFilter) -> WatchStream {
    let mut events = shared.hub.subscribe_all();
    let mut missed = shared.hub.missed();
    let (tx, rx) = mpsc::channel(STREAM_BUFFER);
    tokio::spawn(async move {
        let mut idle = heartbeat(&shared);
        loop {
            tokio::select! {
                // Other replicas' events may have been lost: say so.
                Ok(()) = missed.changed() => {
                    let _ = tx
                        .send(Err(Error::Lagged(
                            "events of other replicas may have been missed while the database \
                             connection was re-established; list executions to catch up, then \
                             watch again"
                                .to_string(),
                        )))
                        .await;
                    return;
                }
                received = events.recv() => match received {
                    Ok(event) => {
                        if filter.matches(&event) {
                            if tx.send(Ok(WatchItem::Event(event))).await.is_err() {
                                return;
                            }
                            idle.reset();
                        }
                    }
                    Err(RecvError::Lagged(missed)) => {
                        let _ = tx
                            .send(Err(Error::Lagged(format!(
                                "this watcher fell behind and missed {missed} events; \
                                 list executions to catch up, then watch again"
                            ))))
                            .await;
                        return;
                    }
                    Err(RecvError::Closed) => return,
                },
                _ = idle.tick() => {
                    if tx.send(Ok(WatchItem::Heartbeat(Utc::now()))).await.is_err() {
                        return;
                    }
                }
                _ = tx.closed() => return,
                _ = shared.shutdown.cancelled() => {
                    let _ = tx.send(Err(Error::ShuttingDown)).await;
                    return;
                }
            }
        }
    });
    ReceiverStream::new(rx)
}
