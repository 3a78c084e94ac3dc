//! Deadlines: a call's `grpc-timeout` bounds all the work the server does
//! for it, and a call that runs past it ends with `DEADLINE_EXCEEDED`.
//!
//! tonic applies `grpc-timeout` itself, but only until the handler returns
//! its response headers, and then answers `CANCELLED` ("Timeout expired").
//! This layer, inside tonic's, races the handler against the same deadline
//! (its clock starts first, so it always answers before tonic's does) and
//! keeps the deadline on the response body, so that a server stream
//! (`WatchExecution`, a health `Watch`) ends at the deadline too. Either way
//! the handler's future or the stream is dropped, which stops the server's
//! work for the call: a watcher leaves the event hub, a query is abandoned.
//! Work that must not stop half-way (admitting an execution) runs in its
//! own task and is not affected.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use futures::future::BoxFuture;
use http_body::{Body, Frame, SizeHint};
use tokio::time::{Instant, Sleep};
use tonic::codegen::http::{HeaderMap, HeaderValue, Request, Response};
use tower::{Layer, Service};

use super::status;

/// The header a gRPC client states its deadline in.
const GRPC_TIMEOUT: &str = "grpc-timeout";

/// Applies the `grpc-timeout` of each call; see the module documentation.
#[derive(Debug, Clone, Copy, Default)]
pub struct DeadlineLayer;

impl<S> Layer<S> for DeadlineLayer {
    type Service = Deadline<S>;

    fn layer(&self, inner: S) -> Deadline<S> {
        Deadline { inner }
    }
}

/// The service of [`DeadlineLayer`].
#[derive(Debug, Clone)]
pub struct Deadline<S> {
    inner: S,
}

impl<S, ReqBody, ResBody> Service<Request<ReqBody>> for Deadline<S>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>>,
    S::Future: Send + 'static,
{
    type Response = Response<DeadlineBody<ResBody>>;
    type Error = S::Error;
    type Future = BoxFuture<'static, Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<ReqBody>) -> Self::Future {
        let timeout = grpc_timeout(request.headers());
        // Before the inner call, so that this deadline is never later than
        // the one tonic starts after it.
        let deadline = timeout.map(|timeout| Instant::now() + timeout);
        let call = self.inner.call(request);
        let (Some(timeout), Some(deadline)) = (timeout, deadline) else {
            return Box::pin(
                async move { Ok(call.await?.map(|body| DeadlineBody::new(body, None))) },
            );
        };
        Box::pin(async move {
            tokio::select! {
                biased;
                response = call => Ok(response?.map(|body| {
                    DeadlineBody::new(body, Some((deadline, timeout)))
                })),
                () = tokio::time::sleep_until(deadline) => {
                    tracing::info!(timeout = ?timeout, "call ended at its deadline");
                    Ok(status::deadline_exceeded(timeout).into_http())
                }
            }
        })
    }
}

/// A response body that ends with `DEADLINE_EXCEEDED` trailers, dropping
/// the rest of the body (the stream of a server-streaming call), once the
/// deadline passes.
pub struct DeadlineBody<B> {
    inner: Option<B>,
    deadline: Option<(Pin<Box<Sleep>>, Duration)>,
}

impl<B> DeadlineBody<B> {
    fn new(inner: B, deadline: Option<(Instant, Duration)>) -> Self {
        Self {
            inner: Some(inner),
            deadline: deadline
                .map(|(at, timeout)| (Box::pin(tokio::time::sleep_until(at)), timeout)),
        }
    }
}

/// The body of a trailers-only answer.
impl<B> Default for DeadlineBody<B> {
    fn default() -> Self {
        Self {
            inner: None,
            deadline: None,
        }
    }
}

impl<B> Body for DeadlineBody<B>
where
    B: Body + Unpin,
{
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let this = &mut *self;
        let Some(inner) = this.inner.as_mut() else {
            return Poll::Ready(None);
        };
        if let Some((sleep, timeout)) = this.deadline.as_mut()
            && sleep.as_mut().poll(cx).is_ready()
        {
            let timeout = *timeout;
            this.inner = None;
            this.deadline = None;
            tracing::info!(timeout = ?timeout, "stream ended at its deadline");
            let mut trailers = HeaderMap::new();
            if status::deadline_exceeded(timeout)
                .add_header(&mut trailers)
                .is_err()
            {
                trailers.insert("grpc-status", HeaderValue::from_static("4"));
            }
            return Poll::Ready(Some(Ok(Frame::trailers(trailers))));
        }
        let frame = ready!(Pin::new(inner).poll_frame(cx));
        if frame
            .as_ref()
            .is_none_or(|f| f.as_ref().is_ok_and(Frame::is_trailers))
        {
            // The call is over; nothing more to bound.
            this.inner = None;
            this.deadline = None;
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.as_ref().is_none_or(Body::is_end_stream)
    }

    fn size_hint(&self) -> SizeHint {
        self.inner
            .as_ref()
            .map_or_else(|| SizeHint::with_exact(0), Body::size_hint)
    }
}

/// The caller's timeout in `grpc-timeout` (at most 8 digits and a unit:
/// `H`, `M`, `S`, `m`, `u`, `n`); `None` when absent or malformed, as tonic
/// treats it.
pub fn grpc_timeout(headers: &HeaderMap) -> Option<Duration> {
    let value = headers.get(GRPC_TIMEOUT)?.to_str().ok()?;
    if value.len() < 2 || value.len() > 9 {
        return None;
    }
    let (digits, unit) = value.split_at(value.len() - 1);
    if !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let amount: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(amount * 3600),
        "M" => Duration::from_secs(amount * 60),
        "S" => Duration::from_secs(amount),
        "m" => Duration::from_millis(amount),
        "u" => Duration::from_micros(amount),
        "n" => Duration::from_nanos(amount),
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(value: &str) -> Option<Duration> {
        let mut headers = HeaderMap::new();
        headers.insert(GRPC_TIMEOUT, HeaderValue::from_str(value).unwrap());
        grpc_timeout(&headers)
    }

    #[test]
    fn grpc_timeout_units() {
        assert_eq!(parse("2H"), Some(Duration::from_secs(7200)));
        assert_eq!(parse("3M"), Some(Duration::from_secs(180)));
        assert_eq!(parse("10S"), Some(Duration::from_secs(10)));
        assert_eq!(parse("300m"), Some(Duration::from_millis(300)));
        assert_eq!(parse("99999999u"), Some(Duration::from_micros(99_999_999)));
        assert_eq!(parse("5n"), Some(Duration::from_nanos(5)));
        for bad in [
            "",
            "m",
            "100",
            "123456789S",
            "-1S",
            "+1S",
            "1.5S",
            "1s",
            "1 S",
        ] {
            assert_eq!(parse(bad), None, "{bad:?}");
        }
        assert_eq!(grpc_timeout(&HeaderMap::new()), None);
    }
}
