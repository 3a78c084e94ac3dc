//! Live event fan-out: one broadcast channel per watched execution.
//!
//! Events are published only after they are committed, so the database is
//! always the source of truth; the hub only wakes watchers up early. A channel
//! exists while someone watches the execution and is removed with its last
//! watcher. A watcher that falls behind the channel's buffer is told it
//! lagged and reads the missed events back from the database, so a slow
//! watcher never slows the executor or other watchers.
//!
//! A channel is closed only to make its watchers look again: when events
//! may have been missed, or when the engine shuts down. Watchers then learn
//! it from the one receiver they poll anyway, rather than each also waiting
//! on shared signals, whose locks every event would cost.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use tokio::sync::broadcast;

use crate::domain::model::Event;

/// Events buffered per execution for watchers that are momentarily behind.
const CHANNEL_CAPACITY: usize = 256;
/// Events of all executions buffered for `WatchExecutions` watchers.
const ALL_CAPACITY: usize = 8192;

pub struct EventHub {
    channels: Mutex<Channels>,
    /// Every event, for watchers of all executions.
    all: broadcast::Sender<Arc<Event>>,
    /// Bumped when events of other replicas may have been missed (the
    /// notification connection was lost): watchers must re-read.
    missed: tokio::sync::watch::Sender<u64>,
}

impl Default for EventHub {
    fn default() -> Self {
        Self {
            channels: Mutex::default(),
            all: broadcast::channel(ALL_CAPACITY).0,
            missed: tokio::sync::watch::channel(0).0,
        }
    }
}

#[derive(Default)]
struct Channels {
    by_execution: HashMap<String, broadcast::Sender<Arc<Event>>>,
    /// Set at shutdown: later subscriptions start closed.
    closed: bool,
}

/// A live subscription to one execution's events; unsubscribes on drop.
pub struct Subscription {
    hub: Arc<EventHub>,
    execution_id: String,
    receiver: Option<broadcast::Receiver<Arc<Event>>>,
}

impl EventHub {
    /// Hands committed events of one execution to its watchers, if any.
    pub fn publish(&self, events: &[Event]) {
        let Some(first) = events.first() else { return };
        let everyone = self.all.receiver_count() > 0;
        let channels = self.channels.lock().expect("event hub lock");
        let sender = channels.by_execution.get(&first.execution_id);
        if sender.is_none() && !everyone {
            return;
        }
        for event in events {
            let event = Arc::new(event.clone());
            // An error only means every watcher has just left.
            if let Some(sender) = sender {
                let _ = sender.send(Arc::clone(&event));
            }
            if everyone {
                let _ = self.all.send(slim(event));
            }
        }
    }

    /// Tells every watcher that events may have been missed: the
    /// per-execution channels are closed (their watchers subscribe again and
    /// re-read), and watchers of all executions are told.
    pub fn report_missed(&self) {
        self.channels
            .lock()
            .expect("event hub lock")
            .by_execution
            .clear();
        self.missed.send_modify(|n| *n += 1);
    }

    /// Closes every channel for good, at shutdown.
    pub fn close(&self) {
        let mut channels = self.channels.lock().expect("event hub lock");
        channels.closed = true;
        channels.by_execution.clear();
    }

    /// Changes when events may have been missed ([`Self::report_missed`]).
    pub fn missed(&self) -> tokio::sync::watch::Receiver<u64> {
        self.missed.subscribe()
    }

    /// Whether anyone here watches `execution_id`, or all executions.
    pub fn is_watched(&self, execution_id: &str) -> bool {
        self.all.receiver_count() > 0
            || self
                .channels
                .lock()
                .expect("event hub lock")
                .by_execution
                .contains_key(execution_id)
    }

    /// Starts receiving events of every execution published from now on.
    pub fn subscribe_all(&self) -> broadcast::Receiver<Arc<Event>> {
        self.all.subscribe()
    }

    /// Starts receiving events of `execution_id` published from now on.
    pub fn subscribe(self: &Arc<Self>, execution_id: &str) -> Subscription {
        let mut channels = self.channels.lock().expect("event hub lock");
        let receiver = if channels.closed {
            broadcast::channel(1).1
        } else {
            channels
                .by_execution
                .entry(execution_id.to_string())
                .or_insert_with(|| broadcast::channel(CHANNEL_CAPACITY).0)
                .subscribe()
        };
        Subscription {
            hub: Arc::clone(self),
            execution_id: execution_id.to_string(),
            receiver: Some(receiver),
        }
    }

    /// Number of executions being watched right now.
    pub fn watched_executions(&self) -> usize {
        self.channels
            .lock()
            .expect("event hub lock")
            .by_execution
            .len()
    }
}

/// The event without step outputs and execution data, which can be large,
/// for watchers of all executions: what their buffer holds stays small.
fn slim(event: Arc<Event>) -> Arc<Event> {
    if event.output.is_none() && event.execution_data.is_none() {
        return event;
    }
    Arc::new(Event {
        output: None,
        execution_data: None,
        ..Event::clone(&event)
    })
}

impl Subscription {
    pub fn receiver(&mut self) -> &mut broadcast::Receiver<Arc<Event>> {
        self.receiver
            .as_mut()
            .expect("receiver is present until drop")
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        drop(self.receiver.take());
        let mut channels = self.hub.channels.lock().expect("event hub lock");
        if channels
            .by_execution
            .get(&self.execution_id)
            .is_some_and(|sender| sender.receiver_count() == 0)
        {
            channels.by_execution.remove(&self.execution_id);
        }
    }
}
