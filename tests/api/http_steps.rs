//! `http` steps against real HTTP servers started by the tests on 127.0.0.1.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use http_body_util::{BodyExt, Full};
use hyper::body::{Bytes, Incoming};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use pipelined::proto::v1 as pb;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::{JoinHandle, JoinSet};

use crate::helpers::*;

/// A request as the server saw it.
#[derive(Debug, Clone)]
struct Seen {
    method: String,
    /// Path and query, as sent.
    target: String,
    headers: hyper::HeaderMap,
    body: Vec<u8>,
}

impl Seen {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).map(|v| v.to_str().unwrap())
    }

    fn json(&self) -> Value {
        serde_json::from_slice(&self.body).expect("a JSON request body")
    }
}

/// What the server answers.
struct Answer {
    status: u16,
    content_type: &'static str,
    body: String,
}

fn answer(status: u16, body: Value) -> Answer {
    Answer {
        status,
        content_type: "application/json",
        body: body.to_string(),
    }
}

fn text(status: u16, body: &str) -> Answer {
    Answer {
        status,
        content_type: "text/plain",
        body: body.to_string(),
    }
}

/// An HTTP/1.1 server (hyper) that records every request and answers the
/// n-th one (from 1) with `respond(n)`.
struct Server {
    addr: SocketAddr,
    seen: Arc<Mutex<Vec<Seen>>>,
    task: JoinHandle<()>,
}

impl Server {
    async fn start(respond: impl Fn(usize) -> Answer + Send + Sync + 'static) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().unwrap();
        let seen: Arc<Mutex<Vec<Seen>>> = Arc::default();
        let respond = Arc::new(respond);
        let recorded = seen.clone();
        let task = tokio::spawn(async move {
            // Dropped with the task, which aborts every connection.
            let mut connections = JoinSet::new();
            while let Ok((stream, _)) = listener.accept().await {
                let seen = recorded.clone();
                let respond = respond.clone();
                let service = service_fn(move |request: hyper::Request<Incoming>| {
                    let seen = seen.clone();
                    let respond = respond.clone();
                    async move {
                        let (parts, body) = request.into_parts();
                        let body = body.collect().await.expect("request body").to_bytes();
                        let n = {
                            let mut seen = seen.lock().unwrap();
                            seen.push(Seen {
                                method: parts.method.to_string(),
                                target: parts.uri.to_string(),
                                headers: parts.headers,
                                body: body.to_vec(),
                            });
                            seen.len()
                        };
                        let answer = respond(n);
                        let response = hyper::Response::builder()
                            .status(answer.status)
                            .header("content-type", answer.content_type)
                            .body(Full::new(Bytes::from(answer.body)))
                            .unwrap();
                        Ok::<_, Infallible>(response)
                    }
                });
                connections.spawn(async move {
                    let _ = http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        Self { addr, seen, task }
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A bare TCP server: reads each request's head, writes `reply` (nothing:
/// never answers), then counts the connection once the client closes it.
struct RawServer {
    addr: SocketAddr,
    requests: Arc<AtomicUsize>,
    closed: Arc<AtomicUsize>,
    task: JoinHandle<()>,
}

impl RawServer {
    async fn start(reply: Option<Vec<u8>>) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().unwrap();
        let requests = Arc::new(AtomicUsize::new(0));
        let closed = Arc::new(AtomicUsize::new(0));
        let reply = Arc::new(reply);
        let (counted, ended) = (requests.clone(), closed.clone());
        let task = tokio::spawn(async move {
            let mut connections = JoinSet::new();
            while let Ok((stream, _)) = listener.accept().await {
                let (counted, ended, reply) = (counted.clone(), ended.clone(), reply.clone());
                connections.spawn(async move {
                    serve_raw(stream, &counted, reply.as_deref()).await;
                    ended.fetch_add(1, Ordering::SeqCst);
                });
            }
        });
        Self {
            addr,
            requests,
            closed,
            task,
        }
    }
}

impl Drop for RawServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn serve_raw(mut stream: TcpStream, requests: &AtomicUsize, reply: Option<&[u8]>) {
    let mut head = Vec::new();
    let mut buf = [0u8; 4096];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        match stream.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => head.extend_from_slice(&buf[..n]),
        }
    }
    requests.fetch_add(1, Ordering::SeqCst);
    if let Some(reply) = reply {
        // The client may hang up half way; that is the point of some tests.
        for chunk in reply.chunks(64 * 1024) {
            if stream.write_all(chunk).await.is_err() {
                return;
            }
        }
        let _ = stream.shutdown().await;
    }
    // Wait for the client to close its side.
    while let Ok(n) = stream.read(&mut buf).await {
        if n == 0 {
            break;
        }
    }
}

fn events_of(events: &[pb::ExecutionEvent], kind: pb::EventType) -> Vec<&pb::ExecutionEvent> {
    events.iter().filter(|e| event_type(e) == kind).collect()
}

#[tokio::test]
async fn a_templated_post_reaches_the_server_and_its_json_answer_becomes_the_output() {
    let server = Server::start(|_| {
        answer(
            201,
            json!({"item_id": 99, "created": true, "status": "new"}),
        )
    })
    .await;
    let app = spawn_app().await;
    app.create(&format!(
        r#"
name: http-post
steps:
  - name: call
    http:
      method: POST
      url: "{}"
      headers: {{x-team: "${{team}}", authorization: "Bearer ${{secret.token}}"}}
      body:
        item: "${{item}}"
        count: "${{item.count}}"
        label: "item ${{id}} of ${{team}}"
        literal: "$${{id}}"
        fixed: [1, "two"]
"#,
        server.url("/items/${id}?team=${team}")
    ))
    .await;
    let input = json!({
        "id": "a b/7",
        "team": "data",
        "item": {"count": 3, "tags": ["x"]},
        "secret": {"token": "t0k"},
    });
    let execution = app.run("http-post", input.clone()).await;
    let done = app.finish(&execution.id).await;
    assert_eq!(
        status(&done),
        pb::ExecutionStatus::Succeeded,
        "{}",
        done.error_message
    );

    let seen = server.seen();
    assert_eq!(seen.len(), 1);
    let request = &seen[0];
    assert_eq!(request.method, "POST");
    assert_eq!(request.target, "/items/a%20b%2F7?team=data");
    assert_eq!(request.header("x-team"), Some("data"));
    assert_eq!(request.header("authorization"), Some("Bearer t0k"));
    assert_eq!(request.header("content-type"), Some("application/json"));
    assert_eq!(
        request.json(),
        json!({
            "item": {"count": 3, "tags": ["x"]},
            "count": 3,
            "label": "item a b/7 of data",
            "literal": "${id}",
            "fixed": [1, "two"],
        })
    );

    // The HTTP status replaces the body's own "status".
    let output = json!({"item_id": 99, "created": true, "status": 201});
    assert_eq!(to_json(&step(&done, "call").output), output);
    let mut data = input;
    data.as_object_mut()
        .unwrap()
        .extend(output.as_object().unwrap().clone());
    assert_eq!(to_json(&done.execution_data), data);

    let events = app.events(&execution.id, 0).await;
    let logs: Vec<&str> = events_of(&events, pb::EventType::StepLog)
        .iter()
        .map(|e| e.message.as_str())
        .collect();
    let expected = format!(
        "POST {} -> 201 Created in ",
        server.url("/items/a%20b%2F7?team=data")
    );
    assert!(
        logs.iter().any(|line| line.starts_with(&expected)),
        "no request summary among {logs:?}"
    );
}

#[tokio::test]
async fn a_get_sends_no_body_and_a_text_answer_lands_under_body() {
    let server = Server::start(|_| text(200, "plain words")).await;
    let app = spawn_app().await;
    app.create(&format!(
        "name: http-get\nsteps:\n- {{name: fetch, http: {{url: \"{}\"}}}}\n",
        server.url("/report")
    ))
    .await;
    let execution = app.run("http-get", json!({"big": "input"})).await;
    let done = app.finish(&execution.id).await;
    assert_eq!(status(&done), pb::ExecutionStatus::Succeeded);
    let seen = server.seen();
    assert_eq!(
        (seen[0].method.as_str(), seen[0].target.as_str()),
        ("GET", "/report")
    );
    assert!(seen[0].body.is_empty());
    assert_eq!(seen[0].header("content-type"), None);
    assert_eq!(
        to_json(&step(&done, "fetch").output),
        json!({"status": 200, "body": "plain words"})
    );
}

#[tokio::test]
async fn a_503_answer_fails_the_step_with_kind_http_status() {
    let server = Server::start(|_| text(503, "down for maintenance")).await;
    let app = spawn_app().await;
    app.create(&format!(
        "name: http-down\nsteps:\n- {{name: call, http: {{method: POST, url: \"{}\"}}}}\n",
        server.url("/jobs")
    ))
    .await;
    let execution = app.run("http-down", json!({"job": 1})).await;
    let done = app.finish(&execution.id).await;
    assert_eq!(status(&done), pb::ExecutionStatus::Failed);

    let call = step(&done, "call");
    assert_eq!(step_status(call), pb::StepStatus::Failed);
    assert_eq!(call.error_kind, "http_status");
    assert_eq!(
        call.error,
        format!(
            "POST {} answered 503 Service Unavailable: down for maintenance",
            server.url("/jobs")
        )
    );
    let events = app.events(&execution.id, 0).await;
    let failed = events_of(&events, pb::EventType::StepFailed);
    assert_eq!(failed.len(), 1);
    assert_eq!(failed[0].error_kind, "http_status");
    assert!(failed[0].message.contains("503"), "{}", failed[0].message);
    // Without a body, POST sends the step's data.
    assert_eq!(server.seen()[0].json(), json!({"job": 1}));
}

#[tokio::test]
async fn a_retry_policy_retries_503_answers_until_the_server_recovers() {
    let server = Server::start(|n| match n {
        1 | 2 => text(503, "busy"),
        _ => answer(200, json!({"done": n})),
    })
    .await;
    let app = spawn_app().await;
    app.create(&format!(
        "name: http-retry\nsteps:\n\
         - name: call\n  retry: {{max_attempts: 3, initial_interval: 50ms}}\n  http: {{url: \"{}\"}}\n",
        server.url("/flaky")
    ))
    .await;
    let execution = app.run("http-retry", json!({})).await;
    let events = app.events(&execution.id, 0).await;
    let done = app.get(&execution.id).await;
    assert_eq!(
        status(&done),
        pb::ExecutionStatus::Succeeded,
        "{}",
        done.error_message
    );
    let call = step(&done, "call");
    assert_eq!(call.attempt, 3);
    assert_eq!(to_json(&call.output), json!({"done": 3, "status": 200}));
    assert_eq!(server.seen().len(), 3);

    let retrying = events_of(&events, pb::EventType::StepRetrying);
    assert_eq!(retrying.len(), 2, "{events:#?}");
    for (event, attempt) in retrying.iter().zip([1, 2]) {
        assert_eq!(event.attempt, attempt);
        assert_eq!(event.error_kind, "http_status");
        assert!(event.message.contains("503"), "{}", event.message);
        assert!(millis(&event.next_attempt_at) >= millis(&event.time));
    }
    let succeeded = events_of(&events, pb::EventType::StepSucceeded);
    assert_eq!(succeeded.len(), 1);
    assert_eq!(succeeded[0].attempt, 3);
    assert!(events_of(&events, pb::EventType::StepFailed).is_empty());
}

#[tokio::test]
async fn a_server_that_never_answers_times_the_step_out_and_the_connection_is_closed() {
    let server = RawServer::start(None).await;
    let app = spawn_app().await;
    app.create(&format!(
        "name: http-hang\nsteps:\n- {{name: call, timeout: 300ms, http: {{url: \"http://{}/slow\"}}}}\n",
        server.addr
    ))
    .await;
    let execution = app.run("http-hang", json!({})).await;
    let done = app.finish(&execution.id).await;
    assert_eq!(status(&done), pb::ExecutionStatus::Failed);
    let call = step(&done, "call");
    assert_eq!(call.error_kind, "timeout");
    assert_eq!(call.error, "timed out after 300ms");
    assert_eq!(server.requests.load(Ordering::SeqCst), 1);
    // Dropping the timed-out attempt aborted the request.
    wait_until_within(
        Duration::from_secs(5),
        "the client closes the connection",
        || server.closed.load(Ordering::SeqCst) == 1,
    )
    .await;
}

#[tokio::test]
async fn a_refused_connection_fails_the_step_with_kind_http_transport() {
    // A port that was just free: nothing listens there.
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    drop(listener);
    let app = spawn_app().await;
    app.create(&format!(
        "name: http-refused\nsteps:\n- {{name: call, http: {{url: \"http://{addr}/x\"}}}}\n"
    ))
    .await;
    let execution = app.run("http-refused", json!({})).await;
    let done = app.finish(&execution.id).await;
    assert_eq!(status(&done), pb::ExecutionStatus::Failed);
    let call = step(&done, "call");
    assert_eq!(call.error_kind, "http_transport");
    assert!(
        call.error
            .starts_with(&format!("GET http://{addr}/x failed: "))
            && call.error.to_lowercase().contains("refused"),
        "{}",
        call.error
    );
}

#[tokio::test]
async fn a_tls_handshake_failure_fails_the_step_with_kind_http_transport() {
    // An https:// URL pointing at a server that does not speak TLS: it
    // answers the ClientHello with a plain HTTP 400.
    let server = Server::start(|_| answer(200, json!({}))).await;
    let app = spawn_app().await;
    app.create(&format!(
        "name: http-tls\nsteps:\n- {{name: call, http: {{url: \"https://{}/x\"}}}}\n",
        server.addr
    ))
    .await;
    let execution = app.run("http-tls", json!({})).await;
    let done = app.finish(&execution.id).await;
    let call = step(&done, "call");
    assert_eq!(call.error_kind, "http_transport", "{}", call.error);
    assert!(
        call.error
            .starts_with(&format!("GET https://{}/x failed: ", server.addr)),
        "{}",
        call.error
    );
    assert!(server.seen().is_empty(), "no HTTP request got through");
}

#[tokio::test]
async fn a_placeholder_naming_no_value_fails_the_step_with_kind_template() {
    let server = Server::start(|_| answer(200, json!({}))).await;
    let app = spawn_app().await;
    app.create(&format!(
        "name: http-template\nsteps:\n- {{name: call, http: {{url: \"{}\"}}}}\n",
        server.url("/users/${user.id}")
    ))
    .await;
    let execution = app
        .run("http-template", json!({"user": {"name": "ann"}}))
        .await;
    let done = app.finish(&execution.id).await;
    assert_eq!(status(&done), pb::ExecutionStatus::Failed);
    let call = step(&done, "call");
    assert_eq!(call.error_kind, "template");
    assert_eq!(call.error, "url: the step's data has no value at 'user.id'");
    assert!(server.seen().is_empty(), "nothing is sent");
}

#[tokio::test]
async fn expected_statuses_make_a_404_succeed() {
    let server = Server::start(|_| answer(404, json!({"error": "no such item"}))).await;
    let app = spawn_app().await;
    app.create(&format!(
        "name: http-404\nsteps:\n- {{name: probe, http: {{method: DELETE, url: \"{}\", expected_statuses: [404]}}}}\n",
        server.url("/items/1")
    ))
    .await;
    let execution = app.run("http-404", json!({})).await;
    let done = app.finish(&execution.id).await;
    assert_eq!(
        status(&done),
        pb::ExecutionStatus::Succeeded,
        "{}",
        done.error_message
    );
    assert_eq!(
        to_json(&step(&done, "probe").output),
        json!({"error": "no such item", "status": 404})
    );
    assert_eq!(server.seen()[0].method, "DELETE");
}

#[tokio::test]
async fn a_response_body_over_the_cap_fails_the_step_with_kind_output_too_large() {
    // No content-length: the body is streamed until the connection closes,
    // so only reading (and stopping at) 1 MiB can catch it.
    let mut reply =
        b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\nconnection: close\r\n\r\n".to_vec();
    reply.resize(reply.len() + 4 * 1024 * 1024, b'x');
    let server = RawServer::start(Some(reply)).await;
    let app = spawn_app().await;
    app.create(&format!(
        "name: http-huge\nsteps:\n- {{name: call, http: {{url: \"http://{}/huge\"}}}}\n",
        server.addr
    ))
    .await;
    let execution = app.run("http-huge", json!({})).await;
    let done = app.finish(&execution.id).await;
    assert_eq!(status(&done), pb::ExecutionStatus::Failed);
    let call = step(&done, "call");
    assert_eq!(call.error_kind, "output_too_large");
    assert!(call.error.contains("1048576 bytes"), "{}", call.error);
}
