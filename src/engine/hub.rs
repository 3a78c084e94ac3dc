//! Live event fan-out: one broadcast channel per watched execution.
//!
//! Events are published only after they are committed, so the database is
//! always the source of truth; the hub only wakes watchers up early. A channel
//! exists while someone watches the execution and is removed with its last
//! watcher. A watcher that falls behind the channel's buffer is told it
//! lagged and reads the missed events back from the database, so a slow
//! watcher never slows the executor or other watchers.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use tokio::sync::broadcast;

use crate::domain::model::Event;

/// Events buffered per execution for watchers that are momentarily behind.
const CHANNEL_CAPACITY: usize = 256;

#[derive(Default)]
pub struct EventHub {
    channels: Mutex<HashMap<String, broadcast::Sender<Arc<Event>>>>,
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
        let channels = self.channels.lock().expect("event hub lock");
        if let Some(sender) = channels.get(&first.execution_id) {
            for event in events {
                // An error only means every watcher has just left.
                let _ = sender.send(Arc::new(event.clone()));
            }
        }
    }

    /// Starts receiving events of `execution_id` published from now on.
    pub fn subscribe(self: &Arc<Self>, execution_id: &str) -> Subscription {
        let mut channels = self.channels.lock().expect("event hub lock");
        let receiver = channels
            .entry(execution_id.to_string())
            .or_insert_with(|| broadcast::channel(CHANNEL_CAPACITY).0)
            .subscribe();
        Subscription {
            hub: Arc::clone(self),
            execution_id: execution_id.to_string(),
            receiver: Some(receiver),
        }
    }

    /// Number of executions being watched right now.
    pub fn watched_executions(&self) -> usize {
        self.channels.lock().expect("event hub lock").len()
    }
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
            .get(&self.execution_id)
            .is_some_and(|sender| sender.receiver_count() == 0)
        {
            channels.remove(&self.execution_id);
        }
    }
}
