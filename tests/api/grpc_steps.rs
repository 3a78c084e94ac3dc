//! `grpc` steps against a real `pipeline.v1.StepWorkerService` served in the test.

use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use pipelined::proto::v1 as pb;
use pipelined::proto::v1::run_step_response::Message;
use pipelined::proto::v1::step_worker_service_server::{
    StepWorkerService, StepWorkerServiceServer,
};
use pipelined::proto::v1::worker_result::Outcome;
use serde_json::{Value, json};
use tokio::sync::mpsc;
use tokio_stream::wrappers::{ReceiverStream, TcpListenerStream};
use tonic::{Request, Response, Status};

use crate::helpers::*;

/// What the worker received in one call.
#[derive(Debug, Clone)]
struct Call {
    request: pb::RunStepRequest,
    /// The `x-team` request metadata, if any.
    team: Option<String>,
}

#[derive(Default)]
struct Seen {
    calls: Vec<Call>,
    /// Set when a `slow` call noticed that pipelined went away.
    cancelled: bool,
}

/// A StepWorkerService whose behaviour is chosen by the step's `config.mode`:
///
/// - `echo`: logs two lines with progress 50 between them, then succeeds
///   with `{rows: 3, by: "<step>#<attempt>"}`;
/// - `fail`: fails with `config.kind` and `config.message`;
/// - `flaky`: fails (with no kind) for the first `config.failures` calls,
///   then succeeds with `{recovered: true}`;
/// - `slow`: logs a line, then waits 30 s for its result, noting whether
///   the call is cancelled meanwhile;
/// - `status`: answers with the gRPC status INTERNAL `boom`;
/// - `silent`: ends the stream without a result;
/// - `nan`: succeeds with a non-finite number in its output.
#[derive(Clone, Default)]
struct TestWorker {
    seen: Arc<Mutex<Seen>>,
}

type ResponseStream =
    Pin<Box<dyn tokio_stream::Stream<Item = Result<pb::RunStepResponse, Status>> + Send>>;

#[tonic::async_trait]
impl StepWorkerService for TestWorker {
    type RunStepStream = ResponseStream;

    async fn run_step(
        &self,
        request: Request<pb::RunStepRequest>,
    ) -> Result<Response<Self::RunStepStream>, Status> {
        let team = request
            .metadata()
            .get("x-team")
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        let request = request.into_inner();
        let config = to_json(&request.config);
        let calls = {
            let mut seen = self.seen.lock().unwrap();
            seen.calls.push(Call {
                request: request.clone(),
                team,
            });
            seen.calls.len()
        };
        let mode = config["mode"].as_str().unwrap_or_default().to_string();
        if mode == "status" {
            return Err(Status::internal("boom"));
        }
        let (tx, rx) = mpsc::channel(8);
        let seen = Arc::clone(&self.seen);
        tokio::spawn(async move {
            let step = format!("{}#{}", request.step_name, request.attempt);
            match mode.as_str() {
                "echo" => {
                    let _ = tx.send(log(&format!("starting {step}"))).await;
                    let _ = tx.send(progress(50.0, "half way")).await;
                    let _ = tx.send(log("finishing")).await;
                    let _ = tx.send(output(json!({"rows": 3, "by": step}))).await;
                }
                "fail" => {
                    let kind = config["kind"].as_str().unwrap_or_default();
                    let message = config["message"].as_str().unwrap_or_default();
                    let _ = tx.send(error(kind, message)).await;
                }
                "flaky" => {
                    let failures = config["failures"].as_u64().unwrap_or(0) as usize;
                    let reply = if calls <= failures {
                        error("", &format!("flaky failure {calls}"))
                    } else {
                        output(json!({"recovered": true}))
                    };
                    let _ = tx.send(reply).await;
                }
                "slow" => {
                    let _ = tx.send(log("working slowly")).await;
                    tokio::select! {
                        _ = tx.closed() => seen.lock().unwrap().cancelled = true,
                        _ = tokio::time::sleep(Duration::from_secs(30)) => {
                            let _ = tx.send(output(json!({"slow": true}))).await;
                        }
                    }
                }
                "nan" => {
                    let value = prost_types::Value {
                        kind: Some(prost_types::value::Kind::NumberValue(f64::NAN)),
                    };
                    let output = prost_types::Struct {
                        fields: [("ratio".to_string(), value)].into(),
                    };
                    let _ = tx.send(result(Outcome::Output(output))).await;
                }
                _ => {} // `silent`: the stream ends with no result.
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}

fn reply(message: Message) -> Result<pb::RunStepResponse, Status> {
    Ok(pb::RunStepResponse {
        message: Some(message),
    })
}

fn log(line: &str) -> Result<pb::RunStepResponse, Status> {
    reply(Message::Log(pb::WorkerLog {
        line: line.to_string(),
    }))
}

fn progress(percent: f64, message: &str) -> Result<pb::RunStepResponse, Status> {
    reply(Message::Progress(pb::WorkerProgress {
        percent,
        message: message.to_string(),
    }))
}

fn result(outcome: Outcome) -> Result<pb::RunStepResponse, Status> {
    reply(Message::Result(pb::WorkerResult {
        outcome: Some(outcome),
    }))
}

fn output(value: Value) -> Result<pb::RunStepResponse, Status> {
    result(Outcome::Output(to_struct(value)))
}

fn error(kind: &str, message: &str) -> Result<pb::RunStepResponse, Status> {
    result(Outcome::Error(pb::WorkerError {
        message: message.to_string(),
        kind: kind.to_string(),
    }))
}

/// A TestWorker served on a free port of 127.0.0.1 until the test ends.
struct Worker {
    address: String,
    seen: Arc<Mutex<Seen>>,
}

impl Worker {
    async fn start() -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the worker");
        let address = format!("http://{}", listener.local_addr().unwrap());
        let worker = TestWorker::default();
        let seen = Arc::clone(&worker.seen);
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(StepWorkerServiceServer::new(worker))
                .serve_with_incoming(TcpListenerStream::new(listener)),
        );
        Self { address, seen }
    }

    fn calls(&self) -> Vec<Call> {
        self.seen.lock().unwrap().calls.clone()
    }

    fn cancelled(&self) -> bool {
        self.seen.lock().unwrap().cancelled
    }
}

/// Creates a pipeline of `steps` (YAML list items), runs it with `input`, and
/// returns the finished execution with all its events.
async fn run_to_end(
    app: &TestApp,
    name: &str,
    steps: &str,
    input: Value,
) -> (pb::Execution, Vec<pb::ExecutionEvent>) {
    app.create(&format!("name: {name}\nsteps:\n{steps}")).await;
    let id = app.run(name, input).await.id;
    let events = app.events(&id, 0).await;
    assert_gapless(&events, 1);
    (app.get(&id).await, events)
}

fn types_of(events: &[pb::ExecutionEvent], step: &str) -> Vec<pb::EventType> {
    events
        .iter()
        .filter(|e| e.step_name == step)
        .map(event_type)
        .collect()
}

#[tokio::test]
async fn a_grpc_step_gets_its_data_and_streams_logs_and_progress_before_its_output() {
    let app = spawn_app().await;
    let worker = Worker::start().await;
    let steps = format!(
        "- {{name: first, set: {{values: {{from_first: 1, shared: {{a: 1}}}}}}}}\n\
         - {{name: unrelated, set: {{values: {{unrelated: true}}}}}}\n\
         - {{name: w, needs: [first], grpc: {{address: \"{}\", config: {{mode: echo, depth: {{n: 2}}}}, metadata: {{x-team: data}}}}}}\n",
        worker.address
    );
    let (done, events) = run_to_end(
        &app,
        "grpc-echo",
        &steps,
        json!({"batch": 7, "shared": {"b": 2}}),
    )
    .await;
    assert_eq!(status(&done), pb::ExecutionStatus::Succeeded, "{done:#?}");

    let calls = worker.calls();
    assert_eq!(calls.len(), 1);
    let call = &calls[0];
    assert_eq!(call.request.execution_id, done.id);
    assert_eq!(call.request.pipeline_name, "grpc-echo");
    assert_eq!(call.request.step_name, "w");
    assert_eq!(call.request.attempt, 1);
    assert_eq!(
        to_json(&call.request.config),
        json!({"mode": "echo", "depth": {"n": 2}})
    );
    // The input merged with the outputs of the steps `w` needs, not those of
    // `unrelated`.
    assert_eq!(
        to_json(&call.request.data),
        json!({"batch": 7, "from_first": 1, "shared": {"a": 1, "b": 2}})
    );
    assert_eq!(call.team.as_deref(), Some("data"));

    use pb::EventType as T;
    assert_eq!(
        types_of(&events, "w"),
        [
            T::StepStarted,
            T::StepLog,
            T::StepProgress,
            T::StepLog,
            T::StepSucceeded
        ]
    );
    let reports: Vec<(i32, String, f64)> = events
        .iter()
        .filter(|e| e.step_name == "w")
        .filter(|e| matches!(event_type(e), T::StepLog | T::StepProgress))
        .map(|e| (e.log_stream, e.message.clone(), e.step_percent))
        .collect();
    let worker_stream = pb::LogStream::Worker as i32;
    assert_eq!(
        reports,
        [
            (worker_stream, "starting w#1".to_string(), 0.0),
            (0, "half way".to_string(), 50.0),
            (worker_stream, "finishing".to_string(), 0.0),
        ]
    );
    assert!(
        events
            .iter()
            .filter(|e| e.step_name == "w")
            .all(|e| e.attempt == 1)
    );

    let w = step(&done, "w");
    assert_eq!((step_status(w), w.attempt), (pb::StepStatus::Succeeded, 1));
    assert_eq!(to_json(&w.output), json!({"rows": 3, "by": "w#1"}));
    assert_eq!(
        to_json(&done.execution_data),
        json!({
            "batch": 7, "shared": {"a": 1, "b": 2}, "from_first": 1,
            "unrelated": true, "rows": 3, "by": "w#1"
        })
    );
}

#[tokio::test]
async fn a_worker_error_of_a_non_retryable_kind_fails_the_step_at_its_first_attempt() {
    let app = spawn_app().await;
    let worker = Worker::start().await;
    let steps = format!(
        "- {{name: w, retry: {{max_attempts: 3, initial_interval: 50ms, non_retryable_errors: [bad_input]}}, \
         grpc: {{address: \"{}\", config: {{mode: fail, kind: bad_input, message: no rows to load}}}}}}\n",
        worker.address
    );
    let (done, events) = run_to_end(&app, "grpc-bad-input", &steps, json!({})).await;
    assert_eq!(status(&done), pb::ExecutionStatus::Failed);
    let w = step(&done, "w");
    assert_eq!((step_status(w), w.attempt), (pb::StepStatus::Failed, 1));
    assert_eq!(w.error_kind, "bad_input");
    assert_eq!(w.error, "no rows to load");
    assert_eq!(worker.calls().len(), 1);
    use pb::EventType as T;
    assert_eq!(types_of(&events, "w"), [T::StepStarted, T::StepFailed]);
    let failed = events.iter().find(|e| event_type(e) == T::StepFailed);
    assert_eq!(failed.unwrap().error_kind, "bad_input");
}

#[tokio::test]
async fn a_flaky_worker_is_retried_until_its_third_attempt_succeeds() {
    let app = spawn_app().await;
    let worker = Worker::start().await;
    let steps = format!(
        "- {{name: w, retry: {{max_attempts: 3, initial_interval: 50ms, non_retryable_errors: [bad_input]}}, \
         grpc: {{address: \"{}\", config: {{mode: flaky, failures: 2}}}}}}\n",
        worker.address
    );
    let (done, events) = run_to_end(&app, "grpc-flaky", &steps, json!({})).await;
    assert_eq!(status(&done), pb::ExecutionStatus::Succeeded, "{done:#?}");
    let w = step(&done, "w");
    assert_eq!((step_status(w), w.attempt), (pb::StepStatus::Succeeded, 3));
    assert_eq!(to_json(&w.output), json!({"recovered": true}));
    let attempts: Vec<i32> = worker.calls().iter().map(|c| c.request.attempt).collect();
    assert_eq!(attempts, [1, 2, 3]);

    use pb::EventType as T;
    assert_eq!(
        types_of(&events, "w"),
        [
            T::StepStarted,
            T::StepRetrying,
            T::StepStarted,
            T::StepRetrying,
            T::StepStarted,
            T::StepSucceeded
        ]
    );
    let retries: Vec<(i32, &str, &str)> = events
        .iter()
        .filter(|e| event_type(e) == T::StepRetrying)
        .map(|e| (e.attempt, e.error_kind.as_str(), e.message.as_str()))
        .collect();
    assert_eq!(
        retries,
        [
            (1, "worker_error", "flaky failure 1"),
            (2, "worker_error", "flaky failure 2")
        ]
    );
}

#[tokio::test]
async fn a_worker_where_nothing_listens_fails_the_step_as_unavailable() {
    let app = spawn_app().await;
    // A port that was free a moment ago: nothing listens on it now.
    let port = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap().port()
    };
    let steps = format!(
        "- {{name: w, grpc: {{address: \"http://127.0.0.1:{port}\", config: {{mode: echo}}}}}}\n"
    );
    let (done, _) = run_to_end(&app, "grpc-nobody", &steps, json!({})).await;
    assert_eq!(status(&done), pb::ExecutionStatus::Failed);
    let w = step(&done, "w");
    assert_eq!((step_status(w), w.attempt), (pb::StepStatus::Failed, 1));
    assert_eq!(w.error_kind, "worker_unavailable", "{}", w.error);
    assert!(
        w.error.contains(&format!("127.0.0.1:{port}")),
        "the error names the address: {}",
        w.error
    );
}

#[tokio::test]
async fn a_slow_worker_times_out_and_sees_its_call_cancelled() {
    let app = spawn_app().await;
    let worker = Worker::start().await;
    let steps = format!(
        "- {{name: w, timeout: 300ms, grpc: {{address: \"{}\", config: {{mode: slow}}}}}}\n",
        worker.address
    );
    let (done, events) = run_to_end(&app, "grpc-slow", &steps, json!({})).await;
    assert_eq!(status(&done), pb::ExecutionStatus::Failed);
    let w = step(&done, "w");
    assert_eq!((step_status(w), w.attempt), (pb::StepStatus::Failed, 1));
    assert_eq!(w.error_kind, "timeout");
    // The line logged before the timeout was kept.
    assert!(
        events
            .iter()
            .any(|e| event_type(e) == pb::EventType::StepLog && e.message == "working slowly")
    );
    wait_until_within(
        Duration::from_secs(5),
        "the worker sees its call cancelled",
        || worker.cancelled(),
    )
    .await;
}

#[tokio::test]
async fn a_grpc_error_a_missing_result_or_a_non_finite_output_fails_the_step() {
    let app = spawn_app().await;
    let worker = Worker::start().await;
    let cases = [
        ("status", "worker_error", "worker answered Internal: boom"),
        (
            "silent",
            "worker_error",
            "the worker ended the stream without a result",
        ),
        ("nan", "invalid_output", "numbers must be finite"),
    ];
    for (mode, kind, message) in cases {
        let steps = format!(
            "- {{name: w, grpc: {{address: \"{}\", config: {{mode: {mode}}}}}}}\n",
            worker.address
        );
        let (done, _) = run_to_end(&app, &format!("grpc-{mode}"), &steps, json!({})).await;
        assert_eq!(status(&done), pb::ExecutionStatus::Failed, "{mode}");
        let w = step(&done, "w");
        assert_eq!(w.error_kind, kind, "{mode}: {}", w.error);
        assert!(
            w.error.contains(message),
            "{mode}: {} should contain {message}",
            w.error
        );
    }
}
