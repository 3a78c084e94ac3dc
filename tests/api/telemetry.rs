//! Operations telemetry, as an operator sees it: the Prometheus endpoint
//! scraped over HTTP, spans received by a real OTLP collector (a gRPC
//! TraceService in this test), and JSON log lines. Each test runs the real
//! binary, since logging and tracing are set up once per process.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::any_value;
use opentelemetry_proto::tonic::trace::v1::Span;
use pipelined::proto::v1 as pb;
use serde_json::{Value, json};
use tokio_stream::wrappers::TcpListenerStream;
use tonic::{Code, Request};

use crate::helpers::*;
use crate::process::{self, ServerProcess};

// ----- metrics -----

/// One sample of the text format: name, labels, value.
type Sample = (String, HashMap<String, String>, f64);

/// Reads the samples of an OpenMetrics / Prometheus text page (enough of
/// the format for the labels this server writes: no escaped quotes).
fn parse_samples(text: &str) -> Vec<Sample> {
    text.lines()
        .filter(|line| !line.starts_with('#') && !line.is_empty())
        .map(|line| {
            let (series, value) = line.rsplit_once(' ').expect("sample has a value");
            let value: f64 = value.parse().expect("sample value is a number");
            let (name, labels) = match series.split_once('{') {
                Some((name, rest)) => {
                    let labels = rest
                        .trim_end_matches('}')
                        .split("\",")
                        .filter(|pair| !pair.is_empty())
                        .map(|pair| {
                            let (key, value) = pair.split_once('=').expect("label is key=value");
                            (key.to_string(), value.trim_matches('"').to_string())
                        })
                        .collect();
                    (name.to_string(), labels)
                }
                None => (series.to_string(), HashMap::new()),
            };
            (name, labels, value)
        })
        .collect()
}

struct Scrape {
    samples: Vec<Sample>,
    text: String,
}

impl Scrape {
    /// The value of the one sample `name` whose labels include `labels`.
    fn value(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        let matching: Vec<f64> = self
            .samples
            .iter()
            .filter(|(n, l, _)| {
                n == name
                    && labels
                        .iter()
                        .all(|(k, v)| l.get(*k).map(String::as_str) == Some(*v))
            })
            .map(|(_, _, v)| *v)
            .collect();
        assert!(
            matching.len() <= 1,
            "{name} {labels:?} matches several samples:\n{}",
            self.text
        );
        matching.first().copied()
    }

    fn expect(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.value(name, labels)
            .unwrap_or_else(|| panic!("no sample {name} {labels:?} in:\n{}", self.text))
    }
}

async fn scrape(server: &ServerProcess) -> Scrape {
    let addr = server
        .logged_address("metrics serving")
        .expect("the server logs where it serves metrics");
    let response = reqwest::get(format!("http://{addr}/metrics"))
        .await
        .expect("GET /metrics");
    assert_eq!(response.status(), 200);
    let content_type = response.headers()["content-type"]
        .to_str()
        .unwrap()
        .to_string();
    assert!(
        content_type.starts_with("application/openmetrics-text"),
        "{content_type}"
    );
    let text = response.text().await.expect("metrics body");
    assert!(text.ends_with("# EOF\n"), "{text}");
    Scrape {
        samples: parse_samples(&text),
        text,
    }
}

const GET: &str = "pipeline.v1.PipelineService/GetExecution";
const RUN: &str = "pipeline.v1.PipelineService/RunPipeline";
const WATCH: &str = "pipeline.v1.PipelineService/WatchExecution";

#[tokio::test]
async fn metrics_endpoint_reports_rpcs_executions_steps_queues_watchers_and_database() {
    let dir = tempfile::TempDir::new().unwrap();
    let server = ServerProcess::start(dir.path(), &["--metrics-listen", "127.0.0.1:0"]).await;
    let client = server.client();

    // A two-step pipeline run to completion.
    process::create(
        &client,
        pipeline(
            "name: two-steps\nsteps:\n\
             - {name: nap, sleep: {duration: 10ms}}\n\
             - {name: tag, needs: [nap], set: {values: {done: true}}}\n",
        ),
    )
    .await;
    let done = process::run(&client, "two-steps", json!({})).await;
    let events = process::watch_to_end(&client, &done.id, 0).await;
    assert_eq!(
        event_type(events.last().unwrap()),
        pb::EventType::ExecutionSucceeded
    );
    // A successful Get and a NOT_FOUND.
    process::get(&client, &done.id).await;
    let missing = client
        .clone()
        .get_execution(pb::GetExecutionRequest {
            execution_id: "01890000-0000-7000-8000-000000000000".to_string(),
        })
        .await
        .expect_err("no such execution");
    assert_eq!(missing.code(), Code::NotFound);
    // The same Get over gRPC-Web, as a browser makes it, counts alike.
    let message = prost::Message::encode_to_vec(&pb::GetExecutionRequest {
        execution_id: done.id.clone(),
    });
    let mut body = vec![0u8];
    body.extend_from_slice(&(message.len() as u32).to_be_bytes());
    body.extend_from_slice(&message);
    let web = reqwest::Client::new()
        .post(format!("http://{}/{GET}", server.addr()))
        .header("content-type", "application/grpc-web+proto")
        .header("x-grpc-web", "1")
        .body(body)
        .send()
        .await
        .expect("gRPC-Web call");
    assert_eq!(web.status(), 200);
    let answer = web.bytes().await.expect("gRPC-Web body");
    assert!(
        String::from_utf8_lossy(&answer).contains("grpc-status:0"),
        "{answer:?}"
    );

    // Work that waits: one step running and one waiting for the only
    // parallelism slot; a second execution queued behind the first.
    process::create(
        &client,
        pipeline(
            "name: one-at-a-time\nconcurrency: {max_active: 1}\nmax_parallel_steps: 1\nsteps:\n\
             - {name: a, sleep: {duration: 1h}}\n\
             - {name: b, sleep: {duration: 1h}}\n",
        ),
    )
    .await;
    let running = process::run(&client, "one-at-a-time", json!({})).await;
    process::run(&client, "one-at-a-time", json!({})).await;
    // An open watch stream, once it has caught up.
    let mut watch = process::watch(&client, &running.id, 0).await;
    loop {
        let message = watch.message().await.expect("watch").expect("an event");
        if message
            .event
            .is_some_and(|e| event_type(&e) == pb::EventType::StepStarted)
        {
            break;
        }
    }

    let page = scrape(&server).await;
    let rpc = |method: &str, code: &str| {
        page.expect(
            "pipelined_rpc_requests_total",
            &[("method", method), ("code", code)],
        )
    };
    assert_eq!(rpc(GET, "OK"), 2.0, "one gRPC call, one gRPC-Web call");
    assert_eq!(rpc(GET, "NOT_FOUND"), 1.0);
    assert_eq!(rpc(RUN, "OK"), 3.0);
    // The finished watch stream counts with the code it ended with.
    assert_eq!(rpc(WATCH, "OK"), 1.0);
    assert_eq!(
        page.expect(
            "pipelined_rpc_duration_seconds_count",
            &[("method", GET), ("code", "NOT_FOUND")]
        ),
        1.0
    );
    assert_eq!(
        page.expect(
            "pipelined_rpc_duration_seconds_bucket",
            &[("method", GET), ("code", "OK"), ("le", "+Inf")]
        ),
        2.0
    );
    assert_eq!(
        page.expect(
            "pipelined_executions_total",
            &[("pipeline", "two-steps"), ("status", "succeeded")]
        ),
        1.0
    );
    for kind in ["sleep", "set"] {
        assert_eq!(
            page.expect(
                "pipelined_step_duration_seconds_count",
                &[("kind", kind), ("outcome", "succeeded")]
            ),
            1.0,
            "{kind}"
        );
    }
    assert!(
        page.expect(
            "pipelined_step_duration_seconds_sum",
            &[("kind", "sleep"), ("outcome", "succeeded")]
        ) >= 0.010
    );
    assert_eq!(
        page.expect("pipelined_active_watchers", &[("method", WATCH)]),
        1.0
    );
    assert_eq!(
        page.expect("pipelined_queue_depth", &[("queue", "executions")]),
        1.0
    );
    assert_eq!(
        page.expect("pipelined_queue_depth", &[("queue", "steps")]),
        1.0
    );
    assert_eq!(
        page.expect(
            "pipelined_executions_active",
            &[("pipeline", "one-at-a-time"), ("status", "running")]
        ),
        1.0
    );
    assert_eq!(
        page.expect(
            "pipelined_executions_active",
            &[("pipeline", "one-at-a-time"), ("status", "queued")]
        ),
        1.0
    );
    assert_eq!(
        page.value("pipelined_executions_active", &[("pipeline", "two-steps")]),
        None,
        "finished executions are not active"
    );
    for operation in ["commit", "get_execution", "read_events"] {
        assert!(
            page.expect(
                "pipelined_db_duration_seconds_count",
                &[("operation", operation)]
            ) >= 1.0,
            "{operation}"
        );
    }

    // The watcher goes away: the gauge drops and the stream counts as
    // cancelled by its client.
    drop(watch);
    let mut after = None;
    for _ in 0..1500 {
        let page = scrape(&server).await;
        if page.expect("pipelined_active_watchers", &[("method", WATCH)]) == 0.0 {
            after = Some(page);
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    let after = after.expect("the watcher gauge drops once the stream is gone");
    assert_eq!(
        after.expect(
            "pipelined_rpc_requests_total",
            &[("method", WATCH), ("code", "CANCELLED")]
        ),
        1.0
    );

    // Anything but GET /metrics is refused.
    let addr = server.logged_address("metrics serving").unwrap();
    let other = reqwest::get(format!("http://{addr}/other")).await.unwrap();
    assert_eq!(other.status(), 404);
}

// ----- traces -----

/// An OTLP collector: keeps every span it is sent.
#[derive(Clone, Default)]
struct Collector {
    spans: Arc<Mutex<Vec<Span>>>,
}

#[tonic::async_trait]
impl TraceService for Collector {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let mut spans = self.spans.lock().unwrap();
        for resource in request.into_inner().resource_spans {
            for scope in resource.scope_spans {
                spans.extend(scope.spans);
            }
        }
        Ok(tonic::Response::new(ExportTraceServiceResponse {
            partial_success: None,
        }))
    }
}

fn attribute(span: &Span, key: &str) -> Option<String> {
    span.attributes
        .iter()
        .find(|kv| kv.key == key)
        .and_then(|kv| kv.value.as_ref()?.value.as_ref())
        .map(|value| match value {
            any_value::Value::StringValue(s) => s.clone(),
            any_value::Value::IntValue(i) => i.to_string(),
            other => format!("{other:?}"),
        })
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn traced<T>(message: T, traceparent: &str) -> Request<T> {
    let mut request = Request::new(message);
    request
        .metadata_mut()
        .insert("traceparent", traceparent.parse().unwrap());
    request
}

#[tokio::test]
async fn spans_are_exported_over_otlp_continuing_the_callers_trace() {
    let collector = Collector::default();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let collector_addr = listener.local_addr().unwrap();
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(TraceServiceServer::new(collector.clone()))
            .serve_with_incoming(TcpListenerStream::new(listener)),
    );
    let dir = tempfile::TempDir::new().unwrap();
    let endpoint = format!("http://{collector_addr}");
    let server = ServerProcess::start(dir.path(), &["--otlp-endpoint", &endpoint]).await;
    let client = server.client();
    process::create(
        &client,
        pipeline(
            "name: traced\nsteps:\n\
             - {name: first, sleep: {duration: 1ms}}\n\
             - {name: second, needs: [first], noop: {}}\n",
        ),
    )
    .await;

    // A Get in one trace, a run in another.
    let get_trace = "0af7651916cd43dd8448eb211c80319c";
    let get_parent = "b7ad6b7169203331";
    let missing = client
        .clone()
        .get_execution(traced(
            pb::GetExecutionRequest {
                execution_id: "01890000-0000-7000-8000-000000000000".to_string(),
            },
            &format!("00-{get_trace}-{get_parent}-01"),
        ))
        .await
        .expect_err("no such execution");
    assert_eq!(missing.code(), Code::NotFound);
    let run_trace = "4bf92f3577b34da6a3ce929d0e0e4736";
    let run_parent = "00f067aa0ba902b7";
    let execution = client
        .clone()
        .run_pipeline(traced(
            pb::RunPipelineRequest {
                pipeline_name: "traced".to_string(),
                input: Some(to_struct(json!({}))),
                ..Default::default()
            },
            &format!("00-{run_trace}-{run_parent}-01"),
        ))
        .await
        .expect("run")
        .into_inner()
        .execution
        .unwrap();
    process::watch_to_end(&client, &execution.id, 0).await;
    // Buffered spans are flushed when the server stops.
    assert!(server.terminate().await.success());

    let spans = collector.spans.lock().unwrap().clone();
    let names: Vec<&str> = spans.iter().map(|s| s.name.as_str()).collect();
    let rpc = |method: &str| {
        spans
            .iter()
            .find(|s| s.name == "rpc" && attribute(s, "method").as_deref() == Some(method))
            .unwrap_or_else(|| panic!("no rpc span for {method} among {names:?}"))
    };
    let get = rpc("/pipeline.v1.PipelineService/GetExecution");
    assert_eq!(hex(&get.trace_id), get_trace);
    assert_eq!(hex(&get.parent_span_id), get_parent);
    assert_eq!(
        attribute(get, "rpc.grpc.status_code").as_deref(),
        Some("5"),
        "NOT_FOUND"
    );
    let run = rpc("/pipeline.v1.PipelineService/RunPipeline");
    assert_eq!(hex(&run.trace_id), run_trace);
    assert_eq!(hex(&run.parent_span_id), run_parent);
    assert!(attribute(run, "request_id").is_some());
    assert_eq!(attribute(run, "rpc.grpc.status_code").as_deref(), Some("0"));

    // The execution and its steps belong to the caller's trace, under the
    // call that started them.
    let exec_span = spans
        .iter()
        .find(|s| s.name == "execution")
        .unwrap_or_else(|| panic!("no execution span among {names:?}"));
    assert_eq!(
        attribute(exec_span, "execution_id").as_deref(),
        Some(execution.id.as_str())
    );
    assert_eq!(hex(&exec_span.trace_id), run_trace);
    assert_eq!(exec_span.parent_span_id, run.span_id);
    let steps: Vec<&Span> = spans.iter().filter(|s| s.name == "step").collect();
    assert_eq!(steps.len(), 2, "{names:?}");
    for (step, kind) in [("first", "sleep"), ("second", "noop")] {
        let span = steps
            .iter()
            .find(|s| attribute(s, "step").as_deref() == Some(step))
            .unwrap_or_else(|| panic!("no span for step {step}"));
        assert_eq!(
            attribute(span, "execution_id").as_deref(),
            Some(execution.id.as_str())
        );
        assert_eq!(attribute(span, "attempt").as_deref(), Some("1"));
        assert_eq!(attribute(span, "kind").as_deref(), Some(kind));
        assert_eq!(hex(&span.trace_id), run_trace);
        assert_eq!(span.parent_span_id, exec_span.span_id);
    }
}

// ----- logs -----

#[tokio::test]
async fn json_logs_are_one_object_per_line_with_span_fields() {
    let dir = tempfile::TempDir::new().unwrap();
    let server = ServerProcess::start(dir.path(), &["--log-format", "json"]).await;
    let client = server.client();
    process::create(
        &client,
        pipeline("name: logged\nsteps:\n- {name: only, noop: {}}\n"),
    )
    .await;
    let mut request = Request::new(pb::RunPipelineRequest {
        pipeline_name: "logged".to_string(),
        input: Some(to_struct(json!({}))),
        ..Default::default()
    });
    request
        .metadata_mut()
        .insert("x-request-id", "json-run-1".parse().unwrap());
    let execution = client
        .clone()
        .run_pipeline(request)
        .await
        .expect("run")
        .into_inner()
        .execution
        .unwrap();
    process::watch_to_end(&client, &execution.id, 0).await;
    let mut finished = None;
    wait_until("the server logs the end of the execution", || {
        finished = server
            .log()
            .lines()
            .find(|l| l.contains("execution finished"))
            .map(str::to_string);
        finished.is_some()
    })
    .await;
    assert!(server.terminate().await.success());

    let log = std::fs::read_to_string(dir.path().join("server.log")).unwrap();
    let lines: Vec<Value> = log
        .lines()
        .map(|line| {
            serde_json::from_str::<Value>(line)
                .unwrap_or_else(|e| panic!("not a JSON line ({e}): {line}"))
        })
        .collect();
    assert!(lines.len() >= 4, "{log}");
    for line in &lines {
        assert!(line.is_object(), "{line}");
        for field in ["timestamp", "level", "message", "target"] {
            assert!(line.get(field).is_some(), "{field} missing: {line}");
        }
    }
    let finished = lines
        .iter()
        .find(|l| l["message"] == "execution finished")
        .expect("the end of the execution is logged");
    assert_eq!(finished["status"], "succeeded", "{finished}");
    assert_eq!(finished["span"]["name"], "execution", "{finished}");
    assert_eq!(
        finished["span"]["execution_id"],
        execution.id.as_str(),
        "{finished}"
    );
    assert_eq!(finished["span"]["pipeline"], "logged", "{finished}");
    let admitted = lines
        .iter()
        .find(|l| l["message"] == "execution admitted")
        .expect("the admission is logged");
    assert_eq!(
        admitted["execution_id"],
        execution.id.as_str(),
        "{admitted}"
    );
    assert_eq!(admitted["span"]["name"], "rpc", "{admitted}");
    assert_eq!(admitted["span"]["request_id"], "json-run-1", "{admitted}");
    assert_eq!(
        admitted["span"]["method"], "/pipeline.v1.PipelineService/RunPipeline",
        "{admitted}"
    );
}
