//! `WatchExecution`: stored events, then live ones, with no gap and no
//! duplicate at the seam.
//!
//! The watcher subscribes to the hub *before* reading the database. Every
//! event is committed before it is published, so an event is either already
//! in the database when it is read, or published after the subscription;
//! sequence numbers drop the ones seen both ways. A watcher that lags behind
//! the live buffer, or sees a gap, reads the database again.

use std::sync::Arc;

use tokio::sync::broadcast::error::RecvError;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

use super::Shared;
use crate::domain::Error;
use crate::domain::model::Event;

/// Events read from the database per query while catching up.
const CATCH_UP_BATCH: u64 = 512;
/// Events queued per watcher between its task and its gRPC stream.
const STREAM_BUFFER: usize = 64;

/// The stream of one watcher.
pub type WatchStream = ReceiverStream<Result<Event, Error>>;

pub(super) async fn watch(shared: Arc<Shared>, id: &str, after: i64) -> Result<WatchStream, Error> {
    if after < 0 {
        return Err(Error::invalid("after_sequence", "must not be negative"));
    }
    let subscription = shared.hub.subscribe(id);
    // Fails with NOT_FOUND before the stream starts.
    let (status, _) = shared.store.execution_head(id).await?;
    let (tx, rx) = mpsc::channel(STREAM_BUFFER);
    let id = id.to_string();
    tokio::spawn(async move {
        let mut subscription = subscription;
        let mut sent = after;
        let mut finished_at_start = status.is_terminal();
        loop {
            // Catch up from the database.
            let mut last_was_terminal = false;
            loop {
                let batch = match shared.store.events_after(&id, sent, CATCH_UP_BATCH).await {
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
                    if tx.send(Ok(event)).await.is_err() {
                        return;
                    }
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
                            if tx.send(Ok((*event).clone())).await.is_err() || terminal {
                                return;
                            }
                        }
                        Ok(_) | Err(RecvError::Lagged(_)) => break,
                        Err(RecvError::Closed) => return,
                    },
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
