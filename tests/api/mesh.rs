//! Calling from a service mesh: deadlines, gzip, message size limits,
//! request ids and trace context, over real sockets.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use hyper::client::conn::http2::SendRequest;
use hyper_util::rt::{TokioExecutor, TokioIo};
use pipelined::proto::v1 as pb;
use pipelined::proto::v1::pipeline_service_client::PipelineServiceClient;
use serde_json::json;
use tokio::time::Instant;
use tonic::codec::CompressionEncoding;
use tonic::codegen::http;
use tonic::metadata::MetadataMap;
use tonic::{Code, Request};

use crate::helpers::*;
use crate::process::{self, ServerProcess};

const NAP: &str = "name: nap\nsteps: [{name: nap, sleep: {duration: 30s}}]\n";
const TRACE_ID: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const TRACEPARENT: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

/// A gRPC client over a bare HTTP/2 connection. A tonic `Channel` gives up
/// on a call by itself when its `grpc-timeout` passes (answering CANCELLED
/// on the client's side); this one waits for whatever the server answers.
#[derive(Clone)]
struct Bare(SendRequest<tonic::body::Body>);

impl tower::Service<http::Request<tonic::body::Body>> for Bare {
    type Response = http::Response<hyper::body::Incoming>;
    type Error = hyper::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.0.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<tonic::body::Body>) -> Self::Future {
        Box::pin(self.0.send_request(request))
    }
}

async fn bare_client(addr: SocketAddr) -> PipelineServiceClient<Bare> {
    let stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let (sender, connection) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
            .await
            .expect("HTTP/2 handshake");
    tokio::spawn(connection);
    PipelineServiceClient::with_origin(Bare(sender), format!("http://{addr}").parse().unwrap())
}

fn with_timeout<T>(message: T, timeout: Duration) -> Request<T> {
    let mut request = Request::new(message);
    request.set_timeout(timeout);
    request
}

fn header<'a>(metadata: &'a MetadataMap, name: &str) -> Option<&'a str> {
    metadata.get(name).map(|v| v.to_str().expect("ASCII"))
}

/// Reads a stream until it fails, returning the status and how long it took.
async fn stream_status<T>(
    stream: &mut tonic::Streaming<T>,
    started: Instant,
) -> (tonic::Status, Duration) {
    tokio::time::timeout(PATIENCE, async {
        loop {
            match stream.message().await {
                Ok(Some(_)) => continue,
                Ok(None) => panic!("the stream ended without a status"),
                Err(status) => return (status, started.elapsed()),
            }
        }
    })
    .await
    .expect("the stream ends in time")
}

#[tokio::test]
async fn watches_past_their_deadline_end_with_deadline_exceeded() {
    let app = spawn_app().await;
    app.create(NAP).await;
    let execution = app.run("nap", json!({})).await;
    let timeout = Duration::from_millis(300);

    let started = Instant::now();
    let mut watch = app
        .client
        .clone()
        .watch_execution(with_timeout(
            pb::WatchExecutionRequest {
                execution_id: execution.id.clone(),
                after_sequence: 0,
            },
            timeout,
        ))
        .await
        .expect("the stream opens")
        .into_inner();
    let (status, took) = stream_status(&mut watch, started).await;
    assert_eq!(status.code(), Code::DeadlineExceeded, "{status:?}");
    assert!(status.message().contains("300ms"), "{status:?}");
    assert!(
        took >= Duration::from_millis(250) && took < Duration::from_secs(5),
        "ended after {took:?}"
    );

    let started = Instant::now();
    let mut watch_all = app
        .client
        .clone()
        .watch_executions(with_timeout(pb::WatchExecutionsRequest::default(), timeout))
        .await
        .expect("the stream opens")
        .into_inner();
    let (status, took) = stream_status(&mut watch_all, started).await;
    assert_eq!(status.code(), Code::DeadlineExceeded, "{status:?}");
    assert!(took < Duration::from_secs(5), "ended after {took:?}");

    // The execution is not affected by its watchers giving up.
    let running = app.get(&execution.id).await;
    assert_eq!(
        crate::helpers::status(&running),
        pb::ExecutionStatus::Running
    );
}

/// No handler is slow on purpose; a call waiting for a database lock is
/// the honest way a unary call outlives its deadline. The test holds the
/// write lock of the server's database on a connection of its own.
struct HeldLock {
    db: sea_orm::DatabaseConnection,
}

impl HeldLock {
    async fn take(app: &TestApp) -> Self {
        use sea_orm::ConnectionTrait;
        let url = std::fs::read_to_string(app.path("database_url")).unwrap_or_else(|_| {
            format!(
                "sqlite://{}?mode=rw",
                app.path("data/pipelined.db").display()
            )
        });
        let mut options = sea_orm::ConnectOptions::new(url);
        // One connection, so that every statement below runs on it.
        options.max_connections(1).min_connections(1);
        let db = sea_orm::Database::connect(options)
            .await
            .expect("connect to the server's database");
        match db.get_database_backend() {
            sea_orm::DatabaseBackend::Sqlite => {
                db.execute_unprepared("BEGIN IMMEDIATE").await.unwrap();
            }
            _ => {
                db.execute_unprepared("BEGIN").await.unwrap();
                db.execute_unprepared("LOCK TABLE executions IN EXCLUSIVE MODE")
                    .await
                    .unwrap();
            }
        }
        Self { db }
    }

    async fn release(self) {
        use sea_orm::ConnectionTrait;
        self.db.execute_unprepared("ROLLBACK").await.unwrap();
        self.db.close().await.unwrap();
    }
}

#[tokio::test]
async fn a_unary_call_past_its_deadline_ends_with_deadline_exceeded() {
    let app = spawn_app().await;
    app.create(NAP).await;
    let execution = app.run("nap", json!({})).await;
    app.wait_for(&execution.id, |e| {
        event_type(e) == pb::EventType::StepStarted
    })
    .await;
    let mut client = bare_client(app.addr).await;

    // The runner cannot record the cancellation while the database is
    // locked, so the call waits, and its deadline passes.
    let lock = HeldLock::take(&app).await;
    let started = Instant::now();
    let refused = tokio::time::timeout(
        PATIENCE,
        client.cancel_execution(with_timeout(
            pb::CancelExecutionRequest {
                execution_id: execution.id.clone(),
                mode: pb::CancelMode::Terminate as i32,
            },
            Duration::from_millis(300),
        )),
    )
    .await
    .expect("the server answers in time")
    .unwrap_err();
    let took = started.elapsed();
    assert_eq!(
        refused.code(),
        Code::DeadlineExceeded,
        "{refused:?} after {took:?}"
    );
    assert!(
        took >= Duration::from_millis(250) && took < Duration::from_secs(5),
        "answered after {took:?}"
    );
    assert!(
        refused.metadata().get("x-request-id").is_some(),
        "{refused:?}"
    );

    // Once the database is free again the server carries on: the cancel,
    // which had reached the execution's runner, is carried out (state
    // changes are never left half-done), and calls are answered.
    lock.release().await;
    let done = app.finish(&execution.id).await;
    assert_eq!(status(&done), pb::ExecutionStatus::Cancelled);
    let answered = client
        .get_execution(with_timeout(
            pb::GetExecutionRequest {
                execution_id: execution.id.clone(),
            },
            PATIENCE,
        ))
        .await
        .expect("a call within its deadline is answered");
    assert_eq!(answered.into_inner().execution.unwrap().id, execution.id);
}

#[tokio::test]
async fn gzip_clients_get_gzip_answers_and_plain_clients_plain_ones() {
    let app = spawn_app().await;
    let mut gzip = PipelineServiceClient::new(app.channel().await)
        .send_compressed(CompressionEncoding::Gzip)
        .accept_compressed(CompressionEncoding::Gzip);
    // A compressed request is understood (otherwise: UNIMPLEMENTED).
    gzip.create_pipeline(pb::CreatePipelineRequest {
        pipeline: Some(pipeline(
            "name: zipped\nsteps: [{name: a, set: {values: {a: 1}}}]\n",
        )),
    })
    .await
    .expect("a gzip request");
    let big = "compressible ".repeat(30_000);
    let response = gzip
        .run_pipeline(pb::RunPipelineRequest {
            pipeline_name: "zipped".into(),
            input: Some(to_struct(json!({"text": big}))),
            ..Default::default()
        })
        .await
        .expect("a gzip request");
    assert_eq!(header(response.metadata(), "grpc-encoding"), Some("gzip"));
    let execution = response.into_inner().execution.unwrap();
    assert_eq!(to_json(&execution.input), json!({"text": big}));
    let done = app.finish(&execution.id).await;
    assert_eq!(status(&done), pb::ExecutionStatus::Succeeded);

    // Streams too.
    let watch = gzip
        .watch_execution(pb::WatchExecutionRequest {
            execution_id: execution.id.clone(),
            after_sequence: 0,
        })
        .await
        .expect("a gzip watch");
    assert_eq!(header(watch.metadata(), "grpc-encoding"), Some("gzip"));
    let mut watch = watch.into_inner();
    let mut events = 0;
    while watch.message().await.expect("gzip stream").is_some() {
        events += 1;
    }
    assert!(events >= 3, "{events} events");

    // A client that asks for nothing gets plain answers.
    let plain = app
        .client
        .clone()
        .get_execution(pb::GetExecutionRequest {
            execution_id: execution.id.clone(),
        })
        .await
        .expect("a plain request");
    assert_ne!(header(plain.metadata(), "grpc-encoding"), Some("gzip"));
    assert_eq!(plain.into_inner().execution.unwrap().id, execution.id);
}

#[tokio::test]
async fn requests_over_4_mib_are_resource_exhausted() {
    let app = spawn_app().await;
    app.create("name: big\nsteps: [{name: a, set: {values: {a: 1}}}]\n")
        .await;
    let request = || pb::RunPipelineRequest {
        pipeline_name: "big".into(),
        input: Some(to_struct(json!({"blob": "x".repeat(5 << 20)}))),
        ..Default::default()
    };
    let plain = app
        .client
        .clone()
        .run_pipeline(request())
        .await
        .unwrap_err();
    assert_eq!(plain.code(), Code::ResourceExhausted, "{plain:?}");
    assert!(plain.message().contains("4194304"), "{plain:?}");

    // Compressed, it is small on the wire but too large once unpacked.
    let zipped = PipelineServiceClient::new(app.channel().await)
        .send_compressed(CompressionEncoding::Gzip)
        .run_pipeline(request())
        .await
        .unwrap_err();
    assert_eq!(zipped.code(), Code::ResourceExhausted, "{zipped:?}");

    // Just under the limit the message is read (and then refused by the
    // input's own, smaller limit).
    let under = app
        .client
        .clone()
        .run_pipeline(pb::RunPipelineRequest {
            pipeline_name: "big".into(),
            input: Some(to_struct(json!({"blob": "x".repeat((4 << 20) - 64)}))),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(under.code(), Code::InvalidArgument, "{under:?}");
}

#[tokio::test]
async fn the_request_id_is_echoed_or_made_up() {
    let app = spawn_app().await;
    let mut client = app.client.clone();
    let list = |id: Option<&str>| {
        let mut request = Request::new(pb::ListPipelinesRequest::default());
        if let Some(id) = id {
            request
                .metadata_mut()
                .insert("x-request-id", id.parse().unwrap());
        }
        request
    };

    let given = client.list_pipelines(list(Some("req-42"))).await.unwrap();
    assert_eq!(header(given.metadata(), "x-request-id"), Some("req-42"));

    for id in [None, Some("x".repeat(129).as_str()), Some("")] {
        let made_up = client.list_pipelines(list(id)).await.unwrap();
        let echoed = header(made_up.metadata(), "x-request-id").expect("a request id");
        assert!(uuid::Uuid::parse_str(echoed).is_ok(), "{id:?} -> {echoed}");
    }
    let first = client.list_pipelines(list(None)).await.unwrap();
    let second = client.list_pipelines(list(None)).await.unwrap();
    assert_ne!(
        header(first.metadata(), "x-request-id"),
        header(second.metadata(), "x-request-id"),
        "each call gets its own"
    );

    // Error answers (trailers-only) carry it too.
    let mut request = Request::new(pb::GetExecutionRequest {
        execution_id: uuid::Uuid::now_v7().to_string(),
    });
    request
        .metadata_mut()
        .insert("x-request-id", "req-43".parse().unwrap());
    let missing = client.get_execution(request).await.unwrap_err();
    assert_eq!(missing.code(), Code::NotFound);
    assert_eq!(header(missing.metadata(), "x-request-id"), Some("req-43"));
}

#[tokio::test]
async fn a_valid_traceparent_is_echoed_and_an_invalid_one_ignored() {
    let app = spawn_app().await;
    let mut client = app.client.clone();
    let list = |traceparent: &str| {
        let mut request = Request::new(pb::ListPipelinesRequest::default());
        request
            .metadata_mut()
            .insert("traceparent", traceparent.parse().unwrap());
        request
    };
    let valid = client.list_pipelines(list(TRACEPARENT)).await.unwrap();
    assert_eq!(header(valid.metadata(), "traceparent"), Some(TRACEPARENT));
    assert!(header(valid.metadata(), "x-request-id").is_some());

    let zero_trace = format!("00-{}-00f067aa0ba902b7-01", "0".repeat(32));
    for invalid in ["garbage", zero_trace.as_str()] {
        let ignored = client.list_pipelines(list(invalid)).await.unwrap();
        assert_eq!(header(ignored.metadata(), "traceparent"), None, "{invalid}");
    }
}

/// The ids are on the server's own log lines, from the real binary.
#[tokio::test]
async fn the_servers_log_lines_carry_the_request_and_trace_ids() {
    let dir = tempfile::TempDir::new().unwrap();
    let server = ServerProcess::start(&dir.path().join("data"), &[]).await;
    let client = server.client();
    process::create(&client, pipeline(NAP)).await;

    let mut request = Request::new(pb::RunPipelineRequest {
        pipeline_name: "nap".into(),
        ..Default::default()
    });
    request
        .metadata_mut()
        .insert("x-request-id", "mesh-run-1".parse().unwrap());
    request
        .metadata_mut()
        .insert("traceparent", TRACEPARENT.parse().unwrap());
    let execution = client
        .clone()
        .run_pipeline(request)
        .await
        .expect("run")
        .into_inner()
        .execution
        .unwrap();

    // A watch that runs into its deadline: the server ends the stream and
    // says so, under the watch's request id.
    let mut request = with_timeout(
        pb::WatchExecutionRequest {
            execution_id: execution.id.clone(),
            after_sequence: 0,
        },
        Duration::from_millis(300),
    );
    request
        .metadata_mut()
        .insert("x-request-id", "mesh-watch-1".parse().unwrap());
    let mut watch = client
        .clone()
        .watch_execution(request)
        .await
        .expect("watch")
        .into_inner();
    let (status, _) = stream_status(&mut watch, Instant::now()).await;
    assert_eq!(status.code(), Code::DeadlineExceeded, "{status:?}");

    let line = |needle: &str| {
        let log = server.log();
        log.lines().find(|l| l.contains(needle)).map(str::to_string)
    };
    let mut admitted = None;
    let mut ended = None;
    wait_until("the server logs both calls", || {
        admitted = line("execution admitted");
        ended = line("stream ended at its deadline");
        admitted.is_some() && ended.is_some()
    })
    .await;
    let admitted = admitted.unwrap();
    for expected in [
        "request_id=mesh-run-1",
        &format!("trace_id={TRACE_ID}"),
        "method=/pipeline.v1.PipelineService/RunPipeline",
        &execution.id,
    ] {
        assert!(
            admitted.contains(expected),
            "{expected} missing: {admitted}"
        );
    }
    let ended = ended.unwrap();
    assert!(ended.contains("request_id=mesh-watch-1"), "{ended}");
    assert!(
        ended.contains("method=/pipeline.v1.PipelineService/WatchExecution"),
        "{ended}"
    );
    server.terminate().await;
}
