//! Request ids and trace context, as service meshes and proxies pass them.
//!
//! Every call gets an `rpc` tracing span with its method path, its request
//! id and, when the caller sent a valid W3C `traceparent`, its trace id, so
//! every log line written during the call carries them: the handler, the
//! engine work it waits for, and the polling of a response stream. The
//! request id is the caller's `x-request-id` when it is usable (1 to 128
//! visible ASCII characters), else a new UUID; it is sent back in the
//! response headers (of trailers-only error answers too), with the
//! `traceparent` when one was given. When traces are exported (see
//! [`crate::telemetry::tracing`]), the `rpc` span is a child of the caller's.

use std::pin::Pin;
use std::task::{Context, Poll};

use futures::future::BoxFuture;
use http_body::{Body, Frame, SizeHint};
use tonic::codegen::http::{HeaderMap, HeaderValue, Request, Response};
use tower::{Layer, Service};
use tracing::{Instrument, Span};

/// The header naming a request, as Envoy, Istio and Linkerd set it.
pub const REQUEST_ID: &str = "x-request-id";
/// The W3C trace context header.
pub const TRACEPARENT: &str = "traceparent";
/// The longest caller-chosen request id kept.
pub const MAX_REQUEST_ID_LEN: usize = 128;

/// Gives each call its request id and span; see the module documentation.
#[derive(Debug, Clone, Copy, Default)]
pub struct RequestContextLayer;

impl<S> Layer<S> for RequestContextLayer {
    type Service = RequestContext<S>;

    fn layer(&self, inner: S) -> RequestContext<S> {
        RequestContext { inner }
    }
}

/// The service of [`RequestContextLayer`].
#[derive(Debug, Clone)]
pub struct RequestContext<S> {
    inner: S,
}

impl<S, ReqBody, ResBody> Service<Request<ReqBody>> for RequestContext<S>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>>,
    S::Future: Send + 'static,
{
    type Response = Response<InSpan<ResBody>>;
    type Error = S::Error;
    type Future = BoxFuture<'static, Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: Request<ReqBody>) -> Self::Future {
        let headers = request.headers();
        let request_id = headers
            .get(REQUEST_ID)
            .filter(|value| usable_request_id(value.as_bytes()))
            .cloned()
            .unwrap_or_else(|| {
                HeaderValue::try_from(uuid::Uuid::now_v7().to_string())
                    .expect("a UUID is a header value")
            });
        let traceparent = headers
            .get(TRACEPARENT)
            .and_then(|value| Some((value.clone(), trace_id(value.to_str().ok()?)?.to_string())));
        let span = tracing::info_span!(
            "rpc",
            method = %request.uri().path(),
            request_id = %request_id.to_str().unwrap_or_default(),
            trace_id = tracing::field::Empty,
        );
        if let Some((_, trace_id)) = &traceparent {
            span.record("trace_id", tracing::field::display(trace_id));
            // Exported spans continue the caller's trace.
            crate::telemetry::tracing::continue_remote_trace(&span, headers);
        }
        // Handlers see the id in effect, generated or not.
        request.headers_mut().insert(REQUEST_ID, request_id.clone());
        let call = {
            let _entered = span.enter();
            self.inner.call(request)
        };
        let body_span = span.clone();
        Box::pin(
            async move {
                let mut response = call.await?;
                echo(response.headers_mut(), request_id, traceparent);
                Ok(response.map(|body| InSpan {
                    body: Some(body),
                    span: body_span,
                }))
            }
            .instrument(span),
        )
    }
}

fn echo(
    headers: &mut HeaderMap,
    request_id: HeaderValue,
    traceparent: Option<(HeaderValue, String)>,
) {
    headers.insert(REQUEST_ID, request_id);
    if let Some((traceparent, _)) = traceparent {
        headers.insert(TRACEPARENT, traceparent);
    }
}

/// 1 to [`MAX_REQUEST_ID_LEN`] visible ASCII characters: safe to log and to
/// send back.
fn usable_request_id(id: &[u8]) -> bool {
    (1..=MAX_REQUEST_ID_LEN).contains(&id.len()) && id.iter().all(|b| b.is_ascii_graphic())
}

/// The trace id of a valid W3C `traceparent`
/// (`version-traceid-parentid-flags`, lowercase hex); `None` for anything
/// else, which is then ignored as the specification asks.
pub fn trace_id(traceparent: &str) -> Option<&str> {
    let (version, rest) = traceparent.split_once('-')?;
    let hex = |s: &str, len: usize| {
        s.len() == len && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
    };
    if !hex(version, 2) || version == "ff" {
        return None;
    }
    let mut fields = rest.splitn(4, '-');
    let (trace, parent, flags) = (fields.next()?, fields.next()?, fields.next()?);
    // Version 00 has exactly four fields; later versions may append more.
    if fields.next().is_some() && version == "00" {
        return None;
    }
    let nonzero = |s: &str| s.bytes().any(|b| b != b'0');
    (hex(trace, 32) && nonzero(trace) && hex(parent, 16) && nonzero(parent) && hex(flags, 2))
        .then_some(trace)
}

/// A response body polled, and dropped, inside the call's span: the log
/// lines of a stream's work carry the call's request id too.
pub struct InSpan<B> {
    body: Option<B>,
    span: Span,
}

impl<B> Drop for InSpan<B> {
    fn drop(&mut self) {
        let _entered = self.span.enter();
        drop(self.body.take());
    }
}

impl<B> Body for InSpan<B>
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
        let _entered = this.span.enter();
        match this.body.as_mut() {
            Some(body) => Pin::new(body).poll_frame(cx),
            None => Poll::Ready(None),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.body.as_ref().is_none_or(Body::is_end_stream)
    }

    fn size_hint(&self) -> SizeHint {
        self.body
            .as_ref()
            .map_or_else(|| SizeHint::with_exact(0), Body::size_hint)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn traceparents() {
        let trace = "4bf92f3577b34da6a3ce929d0e0e4736";
        let valid = format!("00-{trace}-00f067aa0ba902b7-01");
        assert_eq!(trace_id(&valid), Some(trace));
        assert_eq!(
            trace_id(&format!("01-{trace}-00f067aa0ba902b7-01-later")),
            Some(trace),
            "a later version may add fields"
        );
        for bad in [
            format!("00-{trace}-00f067aa0ba902b7-01-extra"),
            format!("ff-{trace}-00f067aa0ba902b7-01"),
            format!("00-{}-00f067aa0ba902b7-01", "0".repeat(32)),
            format!("00-{trace}-0000000000000000-01"),
            format!("00-{}-00f067aa0ba902b7-01", trace.to_uppercase()),
            format!("00-{trace}-00f067aa0ba902b7"),
            format!("0-{trace}-00f067aa0ba902b7-01"),
            format!("00-{trace}0-00f067aa0ba902b7-01"),
            String::new(),
            "garbage".to_string(),
        ] {
            assert_eq!(trace_id(&bad), None, "{bad:?}");
        }
    }

    #[test]
    fn request_ids() {
        assert!(usable_request_id(b"abc-123"));
        assert!(usable_request_id(&[b'a'; MAX_REQUEST_ID_LEN]));
        assert!(!usable_request_id(&[b'a'; MAX_REQUEST_ID_LEN + 1]));
        assert!(!usable_request_id(b""));
        assert!(!usable_request_id(b"has space"));
        assert!(!usable_request_id("caf\u{e9}".as_bytes()));
    }
}
