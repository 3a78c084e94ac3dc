//! Hostile and malformed requests: one table of cases, each sent by a real
//! client to the real server, each answered with a precise status (the code,
//! and the field it names or what its message says), and the server still
//! serving after every one of them.

use std::future::Future;
use std::pin::Pin;

use pipelined::proto::v1 as pb;
use pipelined::proto::v1::pipeline_service_client::PipelineServiceClient;
use prost::Message;
use prost::bytes::{Buf, BufMut};
use serde_json::{Value, json};
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::codegen::http::uri::PathAndQuery;
use tonic::transport::Channel;
use tonic::{Code, Status};
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_types::StatusExt;

use crate::helpers::*;

/// A call of the table.
enum Call {
    Create(pb::Pipeline),
    Update(pb::Pipeline),
    Run(pb::RunPipelineRequest),
    GetPipeline(String),
    ListPipelines(pb::ListPipelinesRequest),
    GetExecution(String),
    ListExecutions(pb::ListExecutionsRequest),
    Cancel(pb::CancelExecutionRequest),
    WatchAll(pb::WatchExecutionsRequest),
    /// Bytes sent as they are to a method (`CreatePipeline`), for what the
    /// generated client cannot send: strings that are not UTF-8.
    Raw(&'static str, Vec<u8>),
}

/// What the answer must say besides its code.
enum Says {
    /// A field violation of exactly this field whose description contains
    /// the text.
    Field(&'static str, &'static str),
    /// The status message contains the text.
    Message(&'static str),
}

struct Case {
    name: &'static str,
    call: Call,
    code: Code,
    says: Says,
}

fn invalid(name: &'static str, call: Call, field: &'static str, says: &'static str) -> Case {
    Case {
        name,
        call,
        code: Code::InvalidArgument,
        says: Says::Field(field, says),
    }
}

fn refused(name: &'static str, call: Call, code: Code, message: &'static str) -> Case {
    Case {
        name,
        call,
        code,
        says: Says::Message(message),
    }
}

/// Sends bytes as a request message and ignores the answer's body.
#[derive(Clone, Copy)]
struct RawCodec;

struct RawEncoder;
struct RawDecoder;

impl Codec for RawCodec {
    type Encode = Vec<u8>;
    type Decode = ();
    type Encoder = RawEncoder;
    type Decoder = RawDecoder;

    fn encoder(&mut self) -> RawEncoder {
        RawEncoder
    }

    fn decoder(&mut self) -> RawDecoder {
        RawDecoder
    }
}

impl Encoder for RawEncoder {
    type Item = Vec<u8>;
    type Error = Status;

    fn encode(&mut self, item: Vec<u8>, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        dst.put_slice(&item);
        Ok(())
    }
}

impl Decoder for RawDecoder {
    type Item = ();
    type Error = Status;

    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<()>, Status> {
        src.advance(src.remaining());
        Ok(Some(()))
    }
}

type Answer<'a> = Pin<Box<dyn Future<Output = Result<(), Status>> + Send + 'a>>;

fn send(channel: &Channel, call: Call) -> Answer<'_> {
    let mut client = PipelineServiceClient::new(channel.clone());
    Box::pin(async move {
        match call {
            Call::Create(pipeline) => client
                .create_pipeline(pb::CreatePipelineRequest {
                    pipeline: Some(pipeline),
                })
                .await
                .map(drop),
            Call::Update(pipeline) => client
                .update_pipeline(pb::UpdatePipelineRequest {
                    pipeline: Some(pipeline),
                })
                .await
                .map(drop),
            Call::Run(request) => client.run_pipeline(request).await.map(drop),
            Call::GetPipeline(name) => client
                .get_pipeline(pb::GetPipelineRequest { name, version: 0 })
                .await
                .map(drop),
            Call::ListPipelines(request) => client.list_pipelines(request).await.map(drop),
            Call::GetExecution(execution_id) => client
                .get_execution(pb::GetExecutionRequest { execution_id })
                .await
                .map(drop),
            Call::ListExecutions(request) => client.list_executions(request).await.map(drop),
            Call::Cancel(request) => client.cancel_execution(request).await.map(drop),
            Call::WatchAll(request) => client.watch_executions(request).await.map(drop),
            Call::Raw(method, bytes) => {
                let mut grpc = tonic::client::Grpc::new(channel.clone());
                grpc.ready()
                    .await
                    .map_err(|e| Status::unavailable(e.to_string()))?;
                let path = PathAndQuery::from_static(method);
                grpc.unary(tonic::Request::new(bytes), path, RawCodec)
                    .await
                    .map(drop)
            }
        }
    })
}

// ----- building requests -----

fn step(name: &str, kind: pb::step::Kind) -> pb::Step {
    pb::Step {
        name: name.into(),
        kind: Some(kind),
        ..Default::default()
    }
}

fn noop(name: &str) -> pb::Step {
    step(name, pb::step::Kind::Noop(pb::NoopStep {}))
}

fn needs(mut step: pb::Step, names: &[String]) -> pb::Step {
    step.needs = names.to_vec();
    step
}

fn pipeline(name: &str, steps: Vec<pb::Step>) -> pb::Pipeline {
    pb::Pipeline {
        name: name.into(),
        steps,
        ..Default::default()
    }
}

fn duration(seconds: i64, nanos: i32) -> Option<prost_types::Duration> {
    Some(prost_types::Duration { seconds, nanos })
}

fn with_timeout(seconds: i64, nanos: i32) -> pb::Pipeline {
    pipeline(
        "p",
        vec![pb::Step {
            timeout: duration(seconds, nanos),
            ..noop("a")
        }],
    )
}

fn sleeping(seconds: i64, nanos: i32) -> pb::Pipeline {
    pipeline(
        "p",
        vec![step(
            "a",
            pb::step::Kind::Sleep(pb::SleepStep {
                duration: duration(seconds, nanos),
            }),
        )],
    )
}

fn retrying(retry: pb::RetryPolicy) -> pb::Pipeline {
    pipeline(
        "p",
        vec![pb::Step {
            retry: Some(retry),
            ..noop("a")
        }],
    )
}

/// A JSON object nested `depth` levels deep: `{"k": {"k": ... 1}}`.
fn nested(depth: usize) -> Value {
    let mut value = json!(1);
    for _ in 0..depth {
        value = json!({ "k": value });
    }
    value
}

fn run(name: &str, input: Value) -> Call {
    Call::Run(pb::RunPipelineRequest {
        pipeline_name: name.into(),
        input: Some(to_struct(input)),
        ..Default::default()
    })
}

fn set_values(depth: usize) -> pb::Pipeline {
    pipeline(
        "p",
        vec![step(
            "a",
            pb::step::Kind::Set(pb::SetStep {
                values: Some(to_struct(nested(depth))),
            }),
        )],
    )
}

/// `CreatePipeline` request bytes whose `placeholder` (in a name) is replaced
/// by bytes that are not UTF-8.
fn not_utf8(request: impl Message, placeholder: &str) -> Vec<u8> {
    let mut bytes = request.encode_to_vec();
    let at = bytes
        .windows(placeholder.len())
        .position(|w| w == placeholder.as_bytes())
        .expect("the placeholder is in the message");
    bytes[at..at + 4].copy_from_slice(&[0xff, 0xfe, 0xc0, 0x80]);
    bytes
}

fn cases() -> Vec<Case> {
    let five_mib = "x".repeat(5 << 20);
    let long_names: Vec<String> = (0..1000).map(|i| format!("{i:0>120}")).collect();
    let mut long_cycle: Vec<pb::Step> = long_names
        .iter()
        .enumerate()
        .map(|(i, name)| {
            needs(
                noop(name),
                std::slice::from_ref(&long_names[(i + 1) % 1000]),
            )
        })
        .collect();
    long_cycle.truncate(1000);
    let create = "/pipeline.v1.PipelineService/CreatePipeline";
    let get = "/pipeline.v1.PipelineService/GetExecution";
    vec![
        // Sizes.
        refused(
            "a definition over 4 MiB",
            Call::Create(pb::Pipeline {
                description: five_mib.clone(),
                ..pipeline("p", vec![noop("a")])
            }),
            Code::ResourceExhausted,
            "4194304",
        ),
        refused(
            "an input over 4 MiB",
            run("ok", json!({ "blob": five_mib })),
            Code::ResourceExhausted,
            "4194304",
        ),
        invalid(
            "1001 steps",
            Call::Create(pipeline(
                "p",
                (0..1001).map(|i| noop(&format!("s{i}"))).collect(),
            )),
            "pipeline.steps",
            "more than the limit of 1000",
        ),
        invalid(
            "100000 steps, all with the same name",
            Call::Create(pipeline("p", (0..100_000).map(|_| noop("a")).collect())),
            "pipeline.steps",
            "more than the limit of 1000",
        ),
        invalid(
            "500 steps with the same 5000-character name",
            Call::Create(pipeline(
                "p",
                (0..500).map(|_| noop(&"n".repeat(5000))).collect(),
            )),
            "pipeline.steps[0].name",
            "at most 128 characters",
        ),
        invalid(
            "a 1 MiB pipeline name to run",
            run(&"n".repeat(1 << 20), json!({})),
            "pipeline_name",
            "at most 128 characters",
        ),
        invalid(
            "a 1 MiB execution id",
            Call::GetExecution("e".repeat(1 << 20)),
            "execution_id",
            "is not an execution id",
        ),
        refused(
            "a 900 KiB program name",
            Call::Create(pipeline(
                "p",
                vec![step(
                    "a",
                    pb::step::Kind::Command(pb::CommandStep {
                        program: "p".repeat(900 << 10),
                        ..Default::default()
                    }),
                )],
            )),
            Code::FailedPrecondition,
            "is not allowed on this server",
        ),
        // Nesting.
        invalid(
            "an input nested 33 levels deep",
            run("ok", nested(33)),
            "input",
            "nested more than 32 levels deep",
        ),
        refused(
            "an input nested too deep to decode",
            run("ok", nested(200)),
            Code::InvalidArgument,
            "recursion limit reached",
        ),
        refused(
            "set values nested too deep to decode",
            Call::Create(set_values(40)),
            Code::InvalidArgument,
            "recursion limit reached",
        ),
        // The step graph.
        invalid(
            "a cycle in needs",
            Call::Create(pipeline(
                "p",
                vec![
                    needs(noop("a"), &["c".into()]),
                    needs(noop("b"), &["a".into()]),
                    needs(noop("c"), &["b".into()]),
                ],
            )),
            "pipeline.steps[0].needs",
            "dependency cycle: a -> c -> b -> a",
        ),
        invalid(
            "a cycle through 1000 steps with long names",
            Call::Create(pipeline("p", long_cycle)),
            "pipeline.steps[0].needs",
            "dependency cycle: ",
        ),
        invalid(
            "a cycle in an update",
            Call::Update(pipeline("ok", vec![needs(noop("a"), &["a".into()])])),
            "pipeline.steps[0].needs[0]",
            "cannot need itself",
        ),
        // Text that is not UTF-8, or holds control characters.
        refused(
            "a pipeline name that is not UTF-8",
            Call::Raw(
                create,
                not_utf8(
                    pb::CreatePipelineRequest {
                        pipeline: Some(pipeline("@@@@", vec![noop("a")])),
                    },
                    "@@@@",
                ),
            ),
            Code::InvalidArgument,
            "not UTF-8",
        ),
        refused(
            "a step name that is not UTF-8",
            Call::Raw(
                create,
                not_utf8(
                    pb::CreatePipelineRequest {
                        pipeline: Some(pipeline("p", vec![noop("@@@@")])),
                    },
                    "@@@@",
                ),
            ),
            Code::InvalidArgument,
            "not UTF-8",
        ),
        refused(
            "an execution id that is not UTF-8",
            Call::Raw(
                get,
                not_utf8(
                    pb::GetExecutionRequest {
                        execution_id: "@@@@".into(),
                    },
                    "@@@@",
                ),
            ),
            Code::InvalidArgument,
            "not UTF-8",
        ),
        refused(
            "bytes that are no message at all",
            Call::Raw(create, vec![0x0a, 0xff, 0xff, 0xff, 0xff, 0x0f, 0x01]),
            Code::InvalidArgument,
            "failed to decode",
        ),
        invalid(
            "NUL in a pipeline name",
            Call::Create(pipeline("p\0", vec![noop("a")])),
            "pipeline.name",
            "may contain only",
        ),
        invalid(
            "a newline in a step name",
            Call::Create(pipeline("p", vec![noop("a\nb")])),
            "pipeline.steps[0].name",
            "may contain only",
        ),
        invalid(
            "an escape in a pipeline name",
            Call::Create(pipeline("p\x1b[31m", vec![noop("a")])),
            "pipeline.name",
            "may contain only",
        ),
        invalid(
            "NUL in the name of the pipeline to run",
            run("ok\0", json!({})),
            "pipeline_name",
            "may contain only",
        ),
        invalid(
            "a newline in the name of a pipeline to get",
            Call::GetPipeline("ok\n".into()),
            "name",
            "may contain only",
        ),
        invalid(
            "NUL in the pipeline filter of ListExecutions",
            Call::ListExecutions(pb::ListExecutionsRequest {
                pipeline_name: "ok\0".into(),
                ..Default::default()
            }),
            "pipeline_name",
            "may contain only",
        ),
        invalid(
            "NUL in the correlation id filter of ListExecutions",
            Call::ListExecutions(pb::ListExecutionsRequest {
                correlation_id: "c\0".into(),
                ..Default::default()
            }),
            "correlation_id",
            "NUL",
        ),
        invalid(
            "NUL in the page token of ListPipelines",
            Call::ListPipelines(pb::ListPipelinesRequest {
                page_token: "ok\0".into(),
                ..Default::default()
            }),
            "page_token",
            "is not a token this server returned",
        ),
        invalid(
            "NUL in a label",
            Call::Run(pb::RunPipelineRequest {
                pipeline_name: "ok".into(),
                labels: [("k".to_string(), "v\0".to_string())].into(),
                ..Default::default()
            }),
            "labels[k]",
            "NUL",
        ),
        // Durations.
        invalid(
            "a negative step timeout",
            Call::Create(with_timeout(-1, 0)),
            "pipeline.steps[0].timeout",
            "non-negative",
        ),
        invalid(
            "negative nanos in a step timeout",
            Call::Create(with_timeout(1, -5)),
            "pipeline.steps[0].timeout",
            "non-negative",
        ),
        invalid(
            "nanos over a second in a step timeout",
            Call::Create(with_timeout(0, 1_500_000_000)),
            "pipeline.steps[0].timeout",
            "nanos",
        ),
        invalid(
            "a step timeout of 10^12 seconds",
            Call::Create(with_timeout(1_000_000_000_000, 0)),
            "pipeline.steps[0].timeout",
            "at most 7days",
        ),
        invalid(
            "the longest step timeout there is",
            Call::Create(with_timeout(i64::MAX, 999_999_999)),
            "pipeline.steps[0].timeout",
            "at most 7days",
        ),
        invalid(
            "the most negative step timeout there is",
            Call::Create(with_timeout(i64::MIN, -999_999_999)),
            "pipeline.steps[0].timeout",
            "non-negative",
        ),
        invalid(
            "a negative sleep",
            Call::Create(sleeping(-30, 0)),
            "pipeline.steps[0].sleep.duration",
            "non-negative",
        ),
        invalid(
            "a sleep of 10^12 seconds",
            Call::Create(sleeping(1_000_000_000_000, 0)),
            "pipeline.steps[0].sleep.duration",
            "at most 24 hours",
        ),
        invalid(
            "an execution timeout of 10^12 seconds",
            Call::Create(pb::Pipeline {
                timeout: duration(1_000_000_000_000, 0),
                ..pipeline("p", vec![noop("a")])
            }),
            "pipeline.timeout",
            "at most 30days",
        ),
        invalid(
            "a retry delay of 10^12 seconds",
            Call::Create(retrying(pb::RetryPolicy {
                max_attempts: 3,
                initial_interval: duration(1_000_000_000_000, 0),
                ..Default::default()
            })),
            "pipeline.steps[0].retry.initial_interval",
            "at most 1day",
        ),
        invalid(
            "a negative longest retry delay",
            Call::Create(pb::Pipeline {
                default_retry: Some(pb::RetryPolicy {
                    max_attempts: 3,
                    max_interval: duration(-1, -1),
                    ..Default::default()
                }),
                ..pipeline("p", vec![noop("a")])
            }),
            "pipeline.default_retry.max_interval",
            "non-negative",
        ),
        invalid(
            "a backoff that is not a number",
            Call::Create(retrying(pb::RetryPolicy {
                max_attempts: 3,
                backoff_coefficient: f64::NAN,
                ..Default::default()
            })),
            "pipeline.steps[0].retry.backoff_coefficient",
            "finite",
        ),
        invalid(
            "an infinite jitter",
            Call::Create(retrying(pb::RetryPolicy {
                max_attempts: 3,
                jitter: f64::INFINITY,
                ..Default::default()
            })),
            "pipeline.steps[0].retry.jitter",
            "finite",
        ),
        invalid(
            "the most negative parallelism",
            Call::Create(pb::Pipeline {
                max_parallel_steps: i32::MIN,
                ..pipeline("p", vec![noop("a")])
            }),
            "pipeline.max_parallel_steps",
            "must not be negative",
        ),
        // Enums.
        invalid(
            "trigger type 999",
            Call::Run(pb::RunPipelineRequest {
                pipeline_name: "ok".into(),
                trigger: Some(pb::Trigger {
                    r#type: 999,
                    data: None,
                }),
                ..Default::default()
            }),
            "trigger.type",
            "unknown trigger type 999",
        ),
        invalid(
            "status filter 999",
            Call::ListExecutions(pb::ListExecutionsRequest {
                statuses: vec![1, 999],
                ..Default::default()
            }),
            "statuses[1]",
            "999 is not an execution status",
        ),
        invalid(
            "concurrency mode 999",
            Call::Create(pb::Pipeline {
                concurrency: Some(pb::ConcurrencyPolicy {
                    max_active: 1,
                    mode: 999,
                }),
                ..pipeline("p", vec![noop("a")])
            }),
            "pipeline.concurrency.mode",
            "999 is not a concurrency mode",
        ),
        invalid(
            "cancel mode -1",
            Call::Cancel(pb::CancelExecutionRequest {
                execution_id: "01900000-0000-7000-8000-000000000000".into(),
                mode: -1,
            }),
            "mode",
            "-1 is not a cancel mode",
        ),
        invalid(
            "event type 999 to watch",
            Call::WatchAll(pb::WatchExecutionsRequest {
                types: vec![999],
                ..Default::default()
            }),
            "types[0]",
            "999 is not an event type",
        ),
        // Paging, ids and empty names.
        invalid(
            "a negative page size",
            Call::ListExecutions(pb::ListExecutionsRequest {
                page_size: -1,
                ..Default::default()
            }),
            "page_size",
            "between 0 and 1000",
        ),
        invalid(
            "the largest page size",
            Call::ListPipelines(pb::ListPipelinesRequest {
                page_size: i32::MAX,
                ..Default::default()
            }),
            "page_size",
            "between 0 and 1000",
        ),
        invalid(
            "an execution id that is no id",
            Call::GetExecution("not-an-id".into()),
            "execution_id",
            "'not-an-id' is not an execution id",
        ),
        invalid(
            "an empty execution id",
            Call::GetExecution(String::new()),
            "execution_id",
            "is required",
        ),
        invalid(
            "an empty pipeline name",
            Call::Create(pipeline("", vec![noop("a")])),
            "pipeline.name",
            "must not be empty",
        ),
        invalid(
            "an empty step name",
            Call::Create(pipeline("p", vec![noop("")])),
            "pipeline.steps[0].name",
            "must not be empty",
        ),
        invalid(
            "an empty name to run",
            run("", json!({})),
            "pipeline_name",
            "is required",
        ),
        invalid(
            "an empty name to get",
            Call::GetPipeline(String::new()),
            "name",
            "is required",
        ),
    ]
}

#[tokio::test]
async fn malformed_requests_get_precise_statuses_and_the_server_keeps_serving() {
    let app = spawn_app().await;
    app.create("name: ok\nsteps: [{name: a, noop: {}}]").await;
    let execution = app.run("ok", json!({})).await;
    let channel = app.channel().await;
    let mut client = PipelineServiceClient::new(channel.clone());

    let mut failures = Vec::new();
    for case in cases() {
        let name = case.name;
        match send(&channel, case.call).await {
            Ok(()) => failures.push(format!("{name}: accepted")),
            Err(status) => {
                if let Err(problem) = check(&status, case.code, &case.says) {
                    failures.push(format!("{name}: {problem}"));
                }
            }
        }
        // The server still serves, on the same channel.
        client
            .get_execution(pb::GetExecutionRequest {
                execution_id: execution.id.clone(),
            })
            .await
            .unwrap_or_else(|e| panic!("after '{name}' the server does not answer: {e:?}"));
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));

    // Nothing refused was stored.
    let pipelines = client
        .list_pipelines(pb::ListPipelinesRequest::default())
        .await
        .unwrap()
        .into_inner()
        .pipelines;
    let names: Vec<&str> = pipelines.iter().map(|p| p.name.as_str()).collect();
    assert_eq!(names, ["ok"]);
    let health = HealthClient::new(channel)
        .check(HealthCheckRequest {
            service: String::new(),
        })
        .await
        .expect("health check")
        .into_inner();
    assert_eq!(health.status, ServingStatus::Serving as i32);
}

/// Whether `status` is the expected answer; else what is wrong with it.
fn check(status: &Status, code: Code, says: &Says) -> Result<(), String> {
    if status.code() != code {
        return Err(format!("expected {code:?}, got {status:?}"));
    }
    // Answers stay small whatever was sent: a client takes 16 KiB of headers.
    if status.message().len() > 1024 {
        return Err(format!(
            "a message of {} bytes: {}…",
            status.message().len(),
            status.message().chars().take(200).collect::<String>()
        ));
    }
    match says {
        Says::Message(text) if status.message().contains(text) => Ok(()),
        Says::Message(text) => Err(format!("the message does not say '{text}': {status:?}")),
        Says::Field(field, text) => {
            let violations: Vec<(String, String)> = status
                .get_details_bad_request()
                .map(|b| {
                    b.field_violations
                        .into_iter()
                        .map(|v| (v.field, v.description))
                        .collect()
                })
                .unwrap_or_default();
            if violations
                .iter()
                .any(|(f, d)| f == field && d.contains(text))
            {
                Ok(())
            } else {
                let shown: Vec<_> = violations.iter().take(5).collect();
                Err(format!(
                    "no violation of {field} saying '{text}' among {} : {shown:?} ({})",
                    violations.len(),
                    status.message().chars().take(300).collect::<String>()
                ))
            }
        }
    }
}
