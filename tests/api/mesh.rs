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
use tonic::codegen::http;
use tonic::{Code, Request};

use crate::helpers::*;

const NAP: &str = "name: nap\nsteps: [{name: nap, sleep: {duration: 30s}}]\n";

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
