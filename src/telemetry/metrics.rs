//! Prometheus metrics: what is recorded, the tower layer that counts RPCs,
//! and the `/metrics` endpoint.
//!
//! One [`Metrics`] per store (so per server; nothing global), reached by the
//! engine and the transport through [`crate::storage::Store::metrics`].
//! Recording is cheap: label sets are `&'static str`s (no allocation, except
//! the pipeline name of an execution that ends), counters and gauges are
//! atomics, and a histogram observation takes its own short mutex, never
//! held across an await. Whether or not the endpoint is served, recording
//! goes on: it costs about as much as the check would.
//!
//! The executions that are active (queued, running, paused...) are counted
//! in the database at each scrape rather than tracked in memory: the count
//! is then right across restarts and, on PostgreSQL, across replicas (every
//! replica reports the same cluster-wide numbers).

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use futures::future::BoxFuture;
use http_body::{Body, Frame, SizeHint};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::{Registry, Unit};
use tokio_util::sync::CancellationToken;
use tonic::codegen::http::{HeaderMap, Request, Response};
use tower::{Layer, Service};

use crate::transport::status::code_name;

/// The RPC methods served, as they appear in the `method` label; any other
/// path is counted as `other`, so that callers cannot grow the label set.
const METHODS: &[&str] = &[
    "pipeline.v1.PipelineService/CreatePipeline",
    "pipeline.v1.PipelineService/GetPipeline",
    "pipeline.v1.PipelineService/ListPipelines",
    "pipeline.v1.PipelineService/UpdatePipeline",
    "pipeline.v1.PipelineService/DeletePipeline",
    "pipeline.v1.PipelineService/RunPipeline",
    "pipeline.v1.PipelineService/GetExecution",
    "pipeline.v1.PipelineService/ListExecutions",
    "pipeline.v1.PipelineService/CancelExecution",
    "pipeline.v1.PipelineService/RetryExecution",
    "pipeline.v1.PipelineService/PauseExecution",
    "pipeline.v1.PipelineService/ResumeExecution",
    "pipeline.v1.PipelineService/WatchExecution",
    "pipeline.v1.PipelineService/WatchExecutions",
    "pipeline.v1.PipelineService/ListAuditEvents",
    "grpc.health.v1.Health/Check",
    "grpc.health.v1.Health/Watch",
    "grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
    "grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
];
const OTHER_METHOD: &str = "other";

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RpcLabels {
    method: &'static str,
    code: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct MethodLabels {
    method: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ExecutionLabels {
    pipeline: String,
    status: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StepLabels {
    kind: &'static str,
    outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct QueueLabels {
    queue: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DbLabels {
    operation: &'static str,
}

/// Database operations timed in `pipelined_db_duration_seconds`.
#[derive(Clone, Copy, Debug)]
pub enum DbOp {
    /// One group commit of runners' changes and admissions.
    Commit,
    /// A write outside the group commit (retry, cancel of a queued one).
    Save,
    GetExecution,
    GetPipeline,
    ListExecutions,
    ReadEvents,
    ExecutionHead,
}

impl DbOp {
    fn as_str(self) -> &'static str {
        match self {
            Self::Commit => "commit",
            Self::Save => "save",
            Self::GetExecution => "get_execution",
            Self::GetPipeline => "get_pipeline",
            Self::ListExecutions => "list_executions",
            Self::ReadEvents => "read_events",
            Self::ExecutionHead => "execution_head",
        }
    }
}

fn rpc_buckets() -> Histogram {
    // 0.5 ms .. ~65 s
    Histogram::new(exponential_buckets(0.0005, 2.0, 18))
}

fn step_buckets() -> Histogram {
    // 1 ms .. ~9 h
    Histogram::new(exponential_buckets(0.001, 4.0, 12))
}

fn db_buckets() -> Histogram {
    // 0.1 ms .. ~3 s
    Histogram::new(exponential_buckets(0.0001, 2.0, 16))
}

type HistogramFamily<L> = Family<L, Histogram, fn() -> Histogram>;

/// Every metric of one server.
pub struct Metrics {
    registry: Registry,
    rpc_requests: Family<RpcLabels, Counter>,
    rpc_duration: HistogramFamily<RpcLabels>,
    executions: Family<ExecutionLabels, Counter>,
    executions_active: Family<ExecutionLabels, Gauge>,
    /// Held by a scrape from replacing the active-execution gauges to
    /// encoding them.
    scrape_lock: std::sync::Mutex<()>,
    step_duration: HistogramFamily<StepLabels>,
    queue_depth: Family<QueueLabels, Gauge>,
    active_watchers: Family<MethodLabels, Gauge>,
    db_duration: HistogramFamily<DbLabels>,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("pipelined");
        let rpc_requests = Family::default();
        registry.register(
            "rpc_requests",
            "RPCs handled, by method and final gRPC status code (of a stream: the code it ended with)",
            rpc_requests.clone(),
        );
        let rpc_duration = HistogramFamily::new_with_constructor(rpc_buckets as fn() -> Histogram);
        registry.register_with_unit(
            "rpc_duration",
            "Time from a request's arrival to its final status (of a stream: its whole life)",
            Unit::Seconds,
            rpc_duration.clone(),
        );
        let executions = Family::default();
        registry.register(
            "executions",
            "Executions that reached a terminal status (succeeded, failed, cancelled), by pipeline",
            executions.clone(),
        );
        let executions_active = Family::default();
        registry.register(
            "executions_active",
            "Executions not finished yet (queued, pending, running, paused, stopping, terminating), by pipeline and status, counted in the database at scrape time",
            executions_active.clone(),
        );
        let step_duration =
            HistogramFamily::new_with_constructor(step_buckets as fn() -> Histogram);
        registry.register_with_unit(
            "step_duration",
            "Duration of step attempts, by step kind and the attempt's outcome (succeeded, failed, cancelled)",
            Unit::Seconds,
            step_duration.clone(),
        );
        let queue_depth = Family::default();
        registry.register(
            "queue_depth",
            "Work waiting for a slot: queue executions: queued executions waiting under their pipeline's concurrency cap (from the database at scrape time); queue steps: ready steps waiting for their execution's parallelism limit (this server)",
            queue_depth.clone(),
        );
        let active_watchers = Family::default();
        registry.register(
            "active_watchers",
            "Open WatchExecution and WatchExecutions streams on this server",
            active_watchers.clone(),
        );
        let db_duration = HistogramFamily::new_with_constructor(db_buckets as fn() -> Histogram);
        registry.register_with_unit(
            "db_duration",
            "Duration of database operations, by operation (commit: one group commit of state changes)",
            Unit::Seconds,
            db_duration.clone(),
        );
        // Present from the start, so that dashboards see zeros, not gaps.
        for queue in ["executions", "steps"] {
            let _ = queue_depth.get_or_create(&QueueLabels { queue });
        }
        for method in [
            "pipeline.v1.PipelineService/WatchExecution",
            "pipeline.v1.PipelineService/WatchExecutions",
        ] {
            let _ = active_watchers.get_or_create(&MethodLabels { method });
        }
        Self {
            registry,
            rpc_requests,
            rpc_duration,
            executions,
            executions_active,
            scrape_lock: std::sync::Mutex::new(()),
            step_duration,
            queue_depth,
            active_watchers,
            db_duration,
        }
    }

    fn rpc_finished(&self, method: &'static str, code: &'static str, started: Instant) {
        let labels = RpcLabels { method, code };
        self.rpc_requests.get_or_create(&labels).inc();
        self.rpc_duration
            .get_or_create(&labels)
            .observe(started.elapsed().as_secs_f64());
    }

    fn watchers(&self, method: &'static str) -> Gauge {
        self.active_watchers
            .get_or_create_owned(&MethodLabels { method })
    }

    /// An execution of `pipeline` reached the terminal `status`.
    pub fn execution_finished(&self, pipeline: &str, status: &'static str) {
        self.executions
            .get_or_create(&ExecutionLabels {
                pipeline: pipeline.to_string(),
                status,
            })
            .inc();
    }

    /// An attempt of a step of `kind` ended with `outcome` after `seconds`.
    pub fn step_finished(&self, kind: &'static str, outcome: &'static str, seconds: f64) {
        self.step_duration
            .get_or_create(&StepLabels { kind, outcome })
            .observe(seconds);
    }

    /// The gauge of ready steps waiting for a parallelism slot; runners add
    /// and remove their own share.
    pub fn steps_waiting(&self) -> Gauge {
        self.queue_depth
            .get_or_create_owned(&QueueLabels { queue: "steps" })
    }

    /// Times a database operation until the returned guard is dropped.
    pub fn db_timer(&self, operation: DbOp) -> DbTimer<'_> {
        DbTimer {
            metrics: self,
            operation,
            started: Instant::now(),
        }
    }

    /// Replaces the active-execution gauges with `counts` (pipeline, status,
    /// how many), as read from the database.
    pub fn set_active(&self, counts: &[(String, String, i64)]) {
        self.executions_active.clear();
        let mut queued = 0;
        for (pipeline, status, count) in counts {
            let Some(status) = crate::domain::status::ExecutionStatus::parse(status) else {
                continue;
            };
            if status == crate::domain::status::ExecutionStatus::Queued {
                queued += count;
            }
            self.executions_active
                .get_or_create(&ExecutionLabels {
                    pipeline: pipeline.clone(),
                    status: status.as_str(),
                })
                .set(*count);
        }
        self.queue_depth
            .get_or_create(&QueueLabels {
                queue: "executions",
            })
            .set(queued);
    }

    /// The metrics in the OpenMetrics text format (which Prometheus reads).
    pub fn encode(&self) -> String {
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &self.registry)
            .expect("writing to a String cannot fail");
        text
    }
}

/// See [`Metrics::db_timer`].
pub struct DbTimer<'a> {
    metrics: &'a Metrics,
    operation: DbOp,
    started: Instant,
}

impl Drop for DbTimer<'_> {
    fn drop(&mut self) {
        self.metrics
            .db_duration
            .get_or_create(&DbLabels {
                operation: self.operation.as_str(),
            })
            .observe(self.started.elapsed().as_secs_f64());
    }
}

/// Serves `GET /metrics` on `listener` until `stop` is cancelled; every
/// scrape first counts the active executions with `count_active`.
pub async fn serve<F, Fut>(
    listener: tokio::net::TcpListener,
    metrics: Arc<Metrics>,
    count_active: F,
    stop: CancellationToken,
) where
    F: Fn() -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Result<Vec<(String, String, i64)>, String>> + Send,
{
    use http_body_util::Full;
    use hyper::body::Bytes;
    use tonic::codegen::http::{Method, StatusCode, header};

    loop {
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(error) => {
                    tracing::warn!(%error, "accepting a metrics connection failed");
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                    continue;
                }
            },
            _ = stop.cancelled() => return,
        };
        let metrics = Arc::clone(&metrics);
        let count_active = count_active.clone();
        let stop = stop.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |request: hyper::Request<_>| {
                let metrics = Arc::clone(&metrics);
                let count_active = count_active.clone();
                async move {
                    let reply = |status: StatusCode, content_type: &str, body: String| {
                        hyper::Response::builder()
                            .status(status)
                            .header(header::CONTENT_TYPE, content_type)
                            .body(Full::new(Bytes::from(body)))
                    };
                    if request.uri().path() != "/metrics" {
                        return reply(
                            StatusCode::NOT_FOUND,
                            "text/plain",
                            "not found: try /metrics\n".into(),
                        );
                    }
                    if request.method() != Method::GET && request.method() != Method::HEAD {
                        return reply(
                            StatusCode::METHOD_NOT_ALLOWED,
                            "text/plain",
                            "only GET\n".into(),
                        );
                    }
                    let counted = count_active().await;
                    // One scrape at a time between replacing the gauges and
                    // encoding them: another scrape's replacement would
                    // otherwise show an empty family.
                    let text = {
                        let _scrape = metrics
                            .scrape_lock
                            .lock()
                            .unwrap_or_else(|e| e.into_inner());
                        match counted {
                            Ok(counts) => metrics.set_active(&counts),
                            Err(error) => tracing::warn!(
                                %error,
                                "counting active executions for /metrics failed"
                            ),
                        }
                        metrics.encode()
                    };
                    reply(
                        StatusCode::OK,
                        "application/openmetrics-text; version=1.0.0; charset=utf-8",
                        text,
                    )
                }
            });
            let connection = hyper::server::conn::http1::Builder::new()
                .serve_connection(hyper_util::rt::TokioIo::new(stream), service);
            tokio::pin!(connection);
            tokio::select! {
                _ = connection.as_mut() => {}
                _ = stop.cancelled() => {
                    connection.as_mut().graceful_shutdown();
                    let _ = connection.await;
                }
            }
        });
    }
}

/// Binds the metrics listener of `addr`.
pub async fn bind(addr: SocketAddr) -> anyhow::Result<tokio::net::TcpListener> {
    use anyhow::Context as _;
    tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("cannot listen for metrics on {addr}"))
}

// ----- the RPC layer -----

/// Counts and times every call by method and final gRPC status, and
/// counts open watch streams. Placed inside the gRPC-Web translation, so it
/// sees gRPC-Web calls as gRPC ones.
#[derive(Debug, Clone)]
pub struct RpcMetricsLayer {
    metrics: Arc<Metrics>,
}

impl RpcMetricsLayer {
    pub fn new(metrics: Arc<Metrics>) -> Self {
        Self { metrics }
    }
}

impl<S> Layer<S> for RpcMetricsLayer {
    type Service = RpcMetrics<S>;

    fn layer(&self, inner: S) -> RpcMetrics<S> {
        RpcMetrics {
            inner,
            metrics: Arc::clone(&self.metrics),
        }
    }
}

/// The service of [`RpcMetricsLayer`].
#[derive(Debug, Clone)]
pub struct RpcMetrics<S> {
    inner: S,
    metrics: Arc<Metrics>,
}

fn method_label(path: &str) -> &'static str {
    let path = path.strip_prefix('/').unwrap_or(path);
    METHODS
        .iter()
        .find(|m| **m == path)
        .copied()
        .unwrap_or(OTHER_METHOD)
}

/// The `grpc-status` of `headers` (trailers, or the headers of a
/// trailers-only answer); a number gRPC does not define is UNKNOWN.
fn status_code(headers: &HeaderMap) -> Option<tonic::Code> {
    let value = headers.get("grpc-status")?;
    let code: i32 = value.to_str().ok()?.parse().ok()?;
    Some(tonic::Code::from_i32(code))
}

fn is_watch(method: &'static str) -> bool {
    method.ends_with("/WatchExecution") || method.ends_with("/WatchExecutions")
}

impl<S, ReqBody, ResBody> Service<Request<ReqBody>> for RpcMetrics<S>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>>,
    S::Future: Send + 'static,
{
    type Response = Response<Observed<ResBody>>;
    type Error = S::Error;
    type Future = BoxFuture<'static, Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<ReqBody>) -> Self::Future {
        let started = Instant::now();
        let method = method_label(request.uri().path());
        let metrics = Arc::clone(&self.metrics);
        let call = self.inner.call(request);
        Box::pin(async move {
            let response = match call.await {
                Ok(response) => response,
                Err(error) => {
                    metrics.rpc_finished(method, "UNKNOWN", started);
                    return Err(error);
                }
            };
            // Trailers-only: the status is in the headers and the call is over.
            let mut record = Some(Record {
                metrics,
                method,
                started,
            });
            let mut watcher = None;
            if let Some(code) = status_code(response.headers()) {
                if let Some(record) = record.take() {
                    record.finish(code);
                }
            } else if !response.status().is_success() {
                // Not a gRPC answer at all (a plain HTTP error).
                if let Some(record) = record.take() {
                    record.finish(tonic::Code::Unknown);
                }
            } else if is_watch(method) {
                let gauge = record.as_ref().map(|r| r.metrics.watchers(method));
                if let Some(gauge) = gauge {
                    gauge.inc();
                    watcher = Some(gauge);
                }
            }
            Ok(response.map(|body| Observed {
                body,
                record,
                watcher,
            }))
        })
    }
}

/// What is recorded once a call's status is known.
struct Record {
    metrics: Arc<Metrics>,
    method: &'static str,
    started: Instant,
}

impl Record {
    fn finish(self, code: tonic::Code) {
        self.metrics
            .rpc_finished(self.method, code_name(code), self.started);
        // Called inside the call's `rpc` span (the request context layer
        // polls and drops the body in it): exported spans carry the status.
        super::tracing::record_grpc_status(code as i64);
    }
}

/// A response body that records the call when its trailers pass, or, if it
/// is dropped before (the client went away), as CANCELLED.
pub struct Observed<B> {
    body: B,
    record: Option<Record>,
    /// The open-watchers gauge to decrement when the stream ends.
    watcher: Option<Gauge>,
}

impl<B> Observed<B> {
    fn end(&mut self, code: tonic::Code) {
        if let Some(record) = self.record.take() {
            record.finish(code);
        }
        if let Some(gauge) = self.watcher.take() {
            gauge.dec();
        }
    }
}

impl<B> Drop for Observed<B> {
    fn drop(&mut self) {
        self.end(tonic::Code::Cancelled);
    }
}

impl<B> Body for Observed<B>
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
        let polled = Pin::new(&mut this.body).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(trailers) = frame.trailers_ref() {
                    this.end(status_code(trailers).unwrap_or(tonic::Code::Unknown));
                }
            }
            Poll::Ready(Some(Err(_))) => this.end(tonic::Code::Unknown),
            // Ended without trailers: not a gRPC answer.
            Poll::Ready(None) => this.end(tonic::Code::Unknown),
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels() {
        assert_eq!(
            method_label("/pipeline.v1.PipelineService/GetExecution"),
            "pipeline.v1.PipelineService/GetExecution"
        );
        assert_eq!(method_label("/made.Up/Method"), "other");
        let mut headers = HeaderMap::new();
        assert_eq!(status_code(&headers), None);
        headers.insert("grpc-status", "5".parse().unwrap());
        assert_eq!(status_code(&headers), Some(tonic::Code::NotFound));
        headers.insert("grpc-status", "99".parse().unwrap());
        assert_eq!(status_code(&headers), Some(tonic::Code::Unknown));
    }

    #[test]
    fn encodes_what_was_recorded() {
        let metrics = Metrics::new();
        metrics.execution_finished("deploy", "succeeded");
        metrics.step_finished("noop", "succeeded", 0.002);
        metrics.set_active(&[("deploy".into(), "queued".into(), 3)]);
        drop(metrics.db_timer(DbOp::Commit));
        let text = metrics.encode();
        for line in [
            "pipelined_executions_total{pipeline=\"deploy\",status=\"succeeded\"} 1",
            "pipelined_step_duration_seconds_count{kind=\"noop\",outcome=\"succeeded\"} 1",
            "pipelined_executions_active{pipeline=\"deploy\",status=\"queued\"} 3",
            "pipelined_queue_depth{queue=\"executions\"} 3",
            "pipelined_queue_depth{queue=\"steps\"} 0",
            "pipelined_db_duration_seconds_count{operation=\"commit\"} 1",
        ] {
            assert!(text.lines().any(|l| l == line), "{line} in\n{text}");
        }
    }
}
