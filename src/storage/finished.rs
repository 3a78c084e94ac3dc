//! A bounded in-memory copy of finished executions, for `GetExecution`.
//!
//! A finished execution (succeeded, failed, cancelled) changes again only
//! when it is retried, and a retry goes through [`super::Store::save`] with an
//! expected status, which [`FinishedCache::invalidate`]s it. Reads that
//! raced with such an invalidation do not fill the cache: a read notes the
//! epoch before it starts and only stores its result if no invalidation
//! happened since. Only used when this process is the database's only
//! writer (SQLite): another replica's retry would not invalidate it.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};

use crate::domain::model::Execution;

/// Most executions kept; the oldest entries are dropped first.
const CAPACITY: usize = 4096;

#[derive(Default)]
pub struct FinishedCache {
    inner: Mutex<Inner>,
}

#[derive(Default)]
struct Inner {
    executions: HashMap<String, Arc<Execution>>,
    /// Insertion order, for eviction.
    order: VecDeque<String>,
    /// Bumped by every invalidation.
    epoch: u64,
}

impl FinishedCache {
    pub fn get(&self, id: &str) -> Option<Arc<Execution>> {
        self.lock().executions.get(id).cloned()
    }

    /// The epoch to pass to [`Self::insert`] after reading from the database.
    pub fn epoch(&self) -> u64 {
        self.lock().epoch
    }

    /// Keeps `exec` if it is finished and nothing was invalidated since
    /// `epoch` was taken (before the read that produced it).
    pub fn insert(&self, exec: &Execution, epoch: u64) {
        if !exec.status.is_terminal() {
            return;
        }
        let mut inner = self.lock();
        if inner.epoch != epoch || inner.executions.contains_key(&exec.id) {
            return;
        }
        if inner.order.len() >= CAPACITY
            && let Some(oldest) = inner.order.pop_front()
        {
            inner.executions.remove(&oldest);
        }
        inner.order.push_back(exec.id.clone());
        inner
            .executions
            .insert(exec.id.clone(), Arc::new(exec.clone()));
    }

    /// Forgets `id`, after a write that may have changed a finished execution.
    pub fn invalidate(&self, id: &str) {
        let mut inner = self.lock();
        inner.epoch += 1;
        if inner.executions.remove(id).is_some() {
            inner.order.retain(|kept| kept != id);
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().expect("finished cache lock")
    }
}
