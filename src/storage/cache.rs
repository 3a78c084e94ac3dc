//! Bounded in-memory copies of rows that rarely change, for the hot reads:
//! finished executions (`GetExecution`) and the latest version of each
//! pipeline (`RunPipeline`). Used only when this process is the database's
//! only writer (SQLite), so that every write that could change a cached
//! value goes through [`ReadCache::invalidate`] here; with PostgreSQL
//! replicas another replica's write would not, so they read the database.
//!
//! Reads that raced with an invalidation do not fill the cache: a read notes
//! the epoch before it queries the database and stores its result only if
//! no invalidation happened since.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};

/// Most values kept; the oldest entries are dropped first.
const CAPACITY: usize = 4096;

pub struct ReadCache<V> {
    inner: Mutex<Inner<V>>,
}

struct Inner<V> {
    values: HashMap<String, Arc<V>>,
    /// Insertion order, for eviction.
    order: VecDeque<String>,
    /// Bumped by every invalidation.
    epoch: u64,
}

impl<V> Default for ReadCache<V> {
    fn default() -> Self {
        Self {
            inner: Mutex::new(Inner {
                values: HashMap::new(),
                order: VecDeque::new(),
                epoch: 0,
            }),
        }
    }
}

impl<V> ReadCache<V> {
    pub fn get(&self, key: &str) -> Option<Arc<V>> {
        self.lock().values.get(key).cloned()
    }

    /// The epoch to pass to [`Self::insert`]: take it before the read.
    pub fn epoch(&self) -> u64 {
        self.lock().epoch
    }

    /// Keeps `value` under `key` if nothing was invalidated since `epoch`.
    pub fn insert(&self, key: &str, value: V, epoch: u64) {
        let mut inner = self.lock();
        if inner.epoch != epoch || inner.values.contains_key(key) {
            return;
        }
        if inner.order.len() >= CAPACITY
            && let Some(oldest) = inner.order.pop_front()
        {
            inner.values.remove(&oldest);
        }
        inner.order.push_back(key.to_string());
        inner.values.insert(key.to_string(), Arc::new(value));
    }

    /// Forgets `key`, after a write that may have changed it.
    pub fn invalidate(&self, key: &str) {
        let mut inner = self.lock();
        inner.epoch += 1;
        if inner.values.remove(key).is_some() {
            inner.order.retain(|kept| kept != key);
        }
    }

    /// Invalidates `key` when the returned guard is dropped: arm it before
    /// committing a write, so that the invalidation happens even if the
    /// caller is dropped (a deadline, a cancelled call) while the commit,
    /// which goes ahead regardless, is awaited.
    pub fn invalidate_on_drop(&self, key: &str) -> InvalidateOnDrop<'_, V> {
        InvalidateOnDrop {
            cache: self,
            key: key.to_string(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner<V>> {
        self.inner.lock().expect("read cache lock")
    }
}

/// See [`ReadCache::invalidate_on_drop`].
pub struct InvalidateOnDrop<'a, V> {
    cache: &'a ReadCache<V>,
    key: String,
}

impl<V> Drop for InvalidateOnDrop<'_, V> {
    fn drop(&mut self) {
        self.cache.invalidate(&self.key);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_read_that_raced_with_an_invalidation_is_not_kept() {
        let cache = ReadCache::default();
        let epoch = cache.epoch();
        cache.invalidate("a");
        cache.insert("a", 1, epoch);
        assert!(cache.get("a").is_none());
        cache.insert("a", 2, cache.epoch());
        assert_eq!(cache.get("a").as_deref(), Some(&2));
        drop(cache.invalidate_on_drop("a"));
        assert!(cache.get("a").is_none());
    }

    #[test]
    fn the_oldest_entries_make_room() {
        let cache = ReadCache::default();
        for i in 0..=CAPACITY {
            cache.insert(&i.to_string(), i, cache.epoch());
        }
        assert!(cache.get("0").is_none());
        assert_eq!(cache.get(&CAPACITY.to_string()).as_deref(), Some(&CAPACITY));
    }
}
