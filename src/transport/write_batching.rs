//! Batches what one connection writes while other tasks are ready to run.
//!
//! Every gRPC stream of an HTTP/2 connection is served by a task of its own,
//! and each frame it sends wakes the connection's task, which tokio runs
//! next. One event sent to many watchers on one connection would thus cost a
//! `writev` per stream (and a read per stream on the client). Here a flush
//! with bytes waiting first lets every task that is already runnable take
//! its turn (the connection's task goes to the back of the run queue), so
//! that the streams woken by the same event add their frames, and then
//! writes them all at once. With nothing else runnable, that is one pass of
//! the scheduler.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tonic::transport::server::Connected;

/// Bytes held before a write goes out without waiting any longer.
const HOLD_LIMIT: usize = 64 * 1024;
/// Capacity a connection keeps once its bytes are out: a burst's buffer is
/// not kept by every connection that once had one.
const KEPT_CAPACITY: usize = 16 * 1024;

/// An accepted connection whose writes are batched (see the module docs).
pub struct BatchedWrites<T> {
    inner: T,
    held: Vec<u8>,
    /// The current flush has already let the other runnable tasks go first.
    yielded: bool,
}

impl<T> BatchedWrites<T> {
    pub fn new(inner: T) -> Self {
        Self {
            inner,
            held: Vec::new(),
            yielded: false,
        }
    }
}

impl<T: AsyncWrite + Unpin> BatchedWrites<T> {
    /// Writes out everything held.
    fn poll_write_held(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while !self.held.is_empty() {
            let written = ready!(Pin::new(&mut self.inner).poll_write(cx, &self.held))?;
            if written == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.held.drain(..written);
        }
        self.held.shrink_to(KEPT_CAPACITY);
        self.yielded = false;
        Poll::Ready(Ok(()))
    }
}

impl<T: Connected> Connected for BatchedWrites<T> {
    type ConnectInfo = T::ConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.inner.connect_info()
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for BatchedWrites<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for BatchedWrites<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.poll_write_vectored(cx, &[io::IoSlice::new(data)])
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if this.held.len() >= HOLD_LIMIT {
            ready!(this.poll_write_held(cx))?;
        }
        // Below the limit here: there is room for at least one byte.
        let room = HOLD_LIMIT - this.held.len();
        let mut taken = 0;
        for slice in data {
            let part = &slice[..slice.len().min(room - taken)];
            this.held.extend_from_slice(part);
            taken += part.len();
            if taken == room {
                break;
            }
        }
        Poll::Ready(Ok(taken))
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if !this.held.is_empty() && !this.yielded {
            // Back of the run queue: the tasks already woken go first.
            this.yielded = true;
            cx.waker().wake_by_ref();
            return Poll::Pending;
        }
        ready!(this.poll_write_held(cx))?;
        Pin::new(&mut this.inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(this.poll_write_held(cx))?;
        Pin::new(&mut this.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    /// Records every write that reaches the socket.
    #[derive(Clone, Default)]
    struct Recorder(Arc<Mutex<Vec<Vec<u8>>>>);

    impl AsyncWrite for Recorder {
        fn poll_write(
            self: Pin<&mut Self>,
            _: &mut Context<'_>,
            data: &[u8],
        ) -> Poll<io::Result<usize>> {
            self.0.lock().unwrap().push(data.to_vec());
            Poll::Ready(Ok(data.len()))
        }

        fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }

        fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    #[tokio::test]
    async fn frames_written_before_a_flush_reach_the_socket_in_one_write() {
        let socket = Recorder::default();
        let mut batched = BatchedWrites::new(socket.clone());
        batched.write_all(b"HEADERS").await.unwrap();
        batched.write_all(b"DATA-1").await.unwrap();
        batched.write_all(b"DATA-2").await.unwrap();
        assert!(
            socket.0.lock().unwrap().is_empty(),
            "nothing is written before the flush"
        );
        batched.flush().await.unwrap();
        assert_eq!(
            *socket.0.lock().unwrap(),
            vec![b"HEADERSDATA-1DATA-2".to_vec()]
        );
        batched.write_all(b"TRAILERS").await.unwrap();
        batched.shutdown().await.unwrap();
        assert_eq!(
            socket.0.lock().unwrap().last().unwrap(),
            b"TRAILERS",
            "shutdown writes what is held"
        );
    }

    #[tokio::test]
    async fn a_burst_is_written_in_pieces_and_its_buffer_not_kept() {
        let socket = Recorder::default();
        let mut batched = BatchedWrites::new(socket.clone());
        batched.write_all(&vec![7u8; 3 * HOLD_LIMIT]).await.unwrap();
        batched.flush().await.unwrap();
        let writes = socket.0.lock().unwrap().clone();
        assert!(
            writes.iter().all(|w| w.len() <= HOLD_LIMIT),
            "at most HOLD_LIMIT held"
        );
        assert_eq!(writes.iter().map(Vec::len).sum::<usize>(), 3 * HOLD_LIMIT);
        assert!(batched.held.capacity() <= KEPT_CAPACITY);
    }

    #[tokio::test]
    async fn a_flush_lets_tasks_that_are_already_runnable_go_first() {
        let socket = Recorder::default();
        let mut batched = BatchedWrites::new(socket.clone());
        let ran = Arc::new(std::sync::atomic::AtomicBool::new(false));
        // Runnable before the flush, on this (current-thread) runtime.
        let other = tokio::spawn({
            let ran = Arc::clone(&ran);
            async move { ran.store(true, std::sync::atomic::Ordering::SeqCst) }
        });
        batched.write_all(b"frame").await.unwrap();
        batched.flush().await.unwrap();
        assert!(
            ran.load(std::sync::atomic::Ordering::SeqCst),
            "the flush yielded first"
        );
        assert_eq!(socket.0.lock().unwrap().len(), 1);
        other.await.unwrap();
    }

    #[tokio::test]
    async fn everything_arrives_intact_through_a_slow_socket() {
        // An 8 KiB pipe: the wrapper meets partial writes and a full socket.
        let (client, mut server) = tokio::io::duplex(8 * 1024);
        let sent: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
        let writer = tokio::spawn({
            let sent = sent.clone();
            async move {
                let mut batched = BatchedWrites::new(client);
                for chunk in sent.chunks(7_001) {
                    batched.write_all(chunk).await.unwrap();
                    batched.flush().await.unwrap();
                }
                batched.shutdown().await.unwrap();
            }
        });
        let mut received = Vec::new();
        server.read_to_end(&mut received).await.unwrap();
        writer.await.unwrap();
        assert_eq!(received.len(), sent.len());
        assert!(received == sent, "bytes arrive in order and unchanged");
    }
}
