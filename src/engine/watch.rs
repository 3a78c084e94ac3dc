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

use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use futures::Stream;
use tokio::sync::broadcast;
use tokio::sync::broadcast::error::RecvError;
use tokio::time::{Instant, Sleep};

use super::Shared;
use super::hub::Subscription;
use crate::domain::Error;
use crate::domain::model::Event;
use crate::domain::status::{EventKind, ExecutionStatus};

/// Events read from the database per query while catching up.
const CATCH_UP_BATCH: u64 = 512;

/// One item of a watch stream.
#[derive(Debug, Clone, PartialEq)]
pub enum WatchItem {
    /// Shared with the hub and other watchers, not copied.
    Event(Arc<Event>),
    /// Nothing happened for a while; carries the server's time.
    Heartbeat(DateTime<Utc>),
}

/// The stream of one watcher.
pub type WatchStream = Pin<Box<dyn Stream<Item = Result<WatchItem, Error>> + Send>>;

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

/// Sends a heartbeat when a stream has sent nothing for the interval.
/// Sending an item only records the time; the timer is looked at when it
/// fires, so a busy stream does not touch the timer wheel per item.
struct Heartbeat {
    period: Duration,
    last_sent: Instant,
    timer: Pin<Box<Sleep>>,
}

impl Heartbeat {
    fn new(shared: &Shared) -> Self {
        let period = shared.config.heartbeat_interval;
        let now = Instant::now();
        Self {
            period,
            last_sent: now,
            timer: Box::pin(tokio::time::sleep_until(now + period)),
        }
    }

    fn sent(&mut self) {
        self.last_sent = Instant::now();
    }

    /// Completes when the stream has been quiet for the whole period.
    async fn due(&mut self) {
        loop {
            (&mut self.timer).await;
            let due_at = self.last_sent + self.period;
            let now = Instant::now();
            if due_at <= now {
                self.last_sent = now;
                self.timer.as_mut().reset(now + self.period);
                return;
            }
            self.timer.as_mut().reset(due_at);
        }
    }
}

/// Where a [`Watcher`] is.
enum Phase {
    /// Sending stored events: `pending` first, then further reads until a
    /// read comes back short.
    CatchUp {
        pending: VecDeque<Event>,
        read_all: bool,
        last_was_terminal: bool,
    },
    /// Following the hub.
    Live,
    Done,
}

/// One `WatchExecution` stream. It runs inside the task that serves the
/// gRPC stream (no task or channel of its own), so a hub event wakes that
/// task directly, and the encoder takes every event already buffered in one
/// poll. A client that goes away drops it, which unsubscribes.
struct Watcher {
    shared: Arc<Shared>,
    id: String,
    subscription: Subscription,
    /// The sequence of the last event sent.
    sent: i64,
    phase: Phase,
    /// The execution had ended when the watch began: end after catching up.
    finished_at_start: bool,
    heartbeat: Heartbeat,
}

impl Watcher {
    async fn next(&mut self) -> Option<Result<WatchItem, Error>> {
        loop {
            match &mut self.phase {
                Phase::Done => return None,
                Phase::CatchUp {
                    pending,
                    read_all,
                    last_was_terminal,
                } => {
                    if let Some(event) = pending.pop_front() {
                        self.sent = event.sequence;
                        *last_was_terminal = event.kind.is_terminal();
                        self.heartbeat.sent();
                        return Some(Ok(WatchItem::Event(Arc::new(event))));
                    }
                    if !*read_all {
                        let read =
                            self.shared
                                .store
                                .events_after(&self.id, self.sent, CATCH_UP_BATCH);
                        match read.await {
                            Ok(batch) => {
                                *read_all = (batch.len() as u64) < CATCH_UP_BATCH;
                                *pending = batch.into();
                            }
                            Err(error) => {
                                self.phase = Phase::Done;
                                return Some(Err(error.into()));
                            }
                        }
                        continue;
                    }
                    if *last_was_terminal || std::mem::take(&mut self.finished_at_start) {
                        self.phase = Phase::Done;
                        return None;
                    }
                    self.phase = Phase::Live;
                }
                Phase::Live => {
                    if let Some(item) = self.next_live().await {
                        return Some(item);
                    }
                }
            }
        }
    }

    /// The next live item; `None` when the phase changed instead.
    ///
    /// Only the hub's receiver and the heartbeat timer are polled, and the
    /// timer only while no event is ready: shutdown and missed events
    /// arrive as a closed channel ([`super::hub`]).
    async fn next_live(&mut self) -> Option<Result<WatchItem, Error>> {
        tokio::select! {
            biased;
            received = self.subscription.receiver().recv() => match received {
                // Already sent, or before `after_sequence`; a terminal event
                // there still ends a watch that started past the end.
                Ok(event) if event.sequence <= self.sent => {
                    if event.kind.is_terminal() {
                        self.phase = Phase::Done;
                    }
                    None
                }
                Ok(event) if event.sequence == self.sent + 1 => {
                    self.sent = event.sequence;
                    if event.kind.is_terminal() {
                        self.phase = Phase::Done;
                    }
                    self.heartbeat.sent();
                    Some(Ok(WatchItem::Event(event)))
                }
                // A lag or a gap: back to the database.
                Ok(_) | Err(RecvError::Lagged(_)) => {
                    self.catch_up();
                    None
                }
                Err(RecvError::Closed) if self.shared.shutdown.is_cancelled() => {
                    self.phase = Phase::Done;
                    Some(Err(Error::ShuttingDown))
                }
                // Events may have been missed: subscribe again, then re-read.
                Err(RecvError::Closed) => {
                    self.subscription = self.shared.hub.subscribe(&self.id);
                    self.catch_up();
                    None
                }
            },
            () = self.heartbeat.due() => {
                // With several replicas, a lost notification would leave
                // this watcher behind: look at the table after this.
                if self.shared.store.is_shared() {
                    self.catch_up();
                }
                Some(Ok(WatchItem::Heartbeat(Utc::now())))
            }
        }
    }

    fn catch_up(&mut self) {
        self.phase = Phase::CatchUp {
            pending: VecDeque::new(),
            read_all: false,
            last_was_terminal: false,
        };
    }
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
    let watcher = Watcher {
        heartbeat: Heartbeat::new(&shared),
        phase: Phase::CatchUp {
            read_all: (first_batch.len() as u64) < CATCH_UP_BATCH,
            pending: first_batch.into(),
            last_was_terminal: false,
        },
        shared,
        id: id.to_string(),
        subscription,
        sent: after,
        finished_at_start,
    };
    Ok(Box::pin(futures::stream::unfold(
        watcher,
        |mut watcher| async move {
            let item = watcher.next().await?;
            Some((item, watcher))
        },
    )))
}

/// Live events of all executions. There is no replay: a watcher that falls
/// more than the hub's buffer behind is told so (ABORTED) and should
/// reconcile with `ListExecutions` before watching again.
pub(super) fn watch_all(shared: Arc<Shared>, filter: AllEventsFilter) -> WatchStream {
    let watcher = AllWatcher {
        events: shared.hub.subscribe_all(),
        missed: shared.hub.missed(),
        heartbeat: Heartbeat::new(&shared),
        shared,
        filter,
        done: false,
    };
    Box::pin(futures::stream::unfold(watcher, |mut watcher| async move {
        let item = watcher.next().await?;
        Some((item, watcher))
    }))
}

/// One `WatchExecutions` stream; like [`Watcher`], it runs in the task
/// serving the gRPC stream.
struct AllWatcher {
    shared: Arc<Shared>,
    filter: AllEventsFilter,
    events: broadcast::Receiver<Arc<Event>>,
    missed: tokio::sync::watch::Receiver<u64>,
    heartbeat: Heartbeat,
    done: bool,
}

impl AllWatcher {
    async fn next(&mut self) -> Option<Result<WatchItem, Error>> {
        if self.done {
            return None;
        }
        loop {
            tokio::select! {
                biased;
                received = self.events.recv() => match received {
                    Ok(event) => {
                        if self.filter.matches(&event) {
                            self.heartbeat.sent();
                            return Some(Ok(WatchItem::Event(event)));
                        }
                    }
                    Err(RecvError::Lagged(missed)) => {
                        self.done = true;
                        return Some(Err(Error::Lagged(format!(
                            "this watcher fell behind and missed {missed} events; \
                             list executions to catch up, then watch again"
                        ))));
                    }
                    Err(RecvError::Closed) => return None,
                },
                // Other replicas' events may have been lost: say so.
                Ok(()) = self.missed.changed() => {
                    self.done = true;
                    return Some(Err(Error::Lagged(
                        "events of other replicas may have been missed while the database \
                         connection was re-established; list executions to catch up, then \
                         watch again"
                            .to_string(),
                    )));
                }
                () = self.shared.shutdown.cancelled() => {
                    self.done = true;
                    return Some(Err(Error::ShuttingDown));
                }
                () = self.heartbeat.due() => return Some(Ok(WatchItem::Heartbeat(Utc::now()))),
            }
        }
    }
}
