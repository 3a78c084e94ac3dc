//! Bad input gets a precise status naming the field, and stores nothing.

use pipelined::proto::v1 as pb;
use prost_types::value::Kind;
use tonic::{Code, Status};
use tonic_types::StatusExt;

use crate::helpers::*;

fn violations(status: &Status) -> Vec<(String, String)> {
    status
        .get_details_bad_request()
        .map(|b| {
            b.field_violations
                .into_iter()
                .map(|v| (v.field, v.description))
                .collect()
        })
        .unwrap_or_default()
}

fn assert_invalid(status: &Status, field: &str, says: &str) {
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    let found = violations(status);
    assert!(
        found.iter().any(|(f, d)| f == field && d.contains(says)),
        "expected a violation of {field} saying '{says}', got {found:?}"
    );
}

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

fn sleep(name: &str, seconds: i64) -> pb::Step {
    step(
        name,
        pb::step::Kind::Sleep(pb::SleepStep {
            duration: Some(prost_types::Duration { seconds, nanos: 0 }),
        }),
    )
}

fn with_needs(mut step: pb::Step, needs: &[&str]) -> pb::Step {
    step.needs = needs.iter().map(|s| s.to_string()).collect();
    step
}

fn named(name: &str, steps: Vec<pb::Step>) -> pb::Pipeline {
    pb::Pipeline {
        name: name.into(),
        steps,
        ..Default::default()
    }
}

#[tokio::test]
async fn every_bad_definition_is_invalid_argument_with_its_field() {
    let app = spawn_app().await;
    let mut nan = prost_types::Struct::default();
    nan.fields.insert(
        "x".into(),
        prost_types::Value {
            kind: Some(Kind::NumberValue(f64::INFINITY)),
        },
    );
    let cases: Vec<(&str, pb::Pipeline, &str, &str)> = vec![
        (
            "empty name",
            named("", vec![noop("a")]),
            "pipeline.name",
            "must not be empty",
        ),
        (
            "bad characters",
            named("no spaces", vec![noop("a")]),
            "pipeline.name",
            "may contain only",
        ),
        (
            "long name",
            named(&"n".repeat(129), vec![noop("a")]),
            "pipeline.name",
            "at most 128",
        ),
        (
            "no steps",
            named("p", vec![]),
            "pipeline.steps",
            "at least one step",
        ),
        (
            "too many steps",
            named("p", (0..1001).map(|i| noop(&format!("s{i}"))).collect()),
            "pipeline.steps",
            "limit of 1000",
        ),
        (
            "duplicate step",
            named("p", vec![noop("a"), noop("a")]),
            "pipeline.steps[1].name",
            "duplicate step name 'a'",
        ),
        (
            "bad step name",
            named("p", vec![noop("a/b")]),
            "pipeline.steps[0].name",
            "may contain only",
        ),
        (
            "unknown need",
            named("p", vec![with_needs(noop("a"), &["ghost"])]),
            "pipeline.steps[0].needs[0]",
            "no step is named 'ghost'",
        ),
        (
            "needs itself",
            named("p", vec![with_needs(noop("a"), &["a"])]),
            "pipeline.steps[0].needs[0]",
            "cannot need itself",
        ),
        (
            "need listed twice",
            named("p", vec![noop("a"), with_needs(noop("b"), &["a", "a"])]),
            "pipeline.steps[1].needs[1]",
            "listed twice",
        ),
        (
            "cycle",
            named(
                "p",
                vec![
                    with_needs(noop("a"), &["c"]),
                    with_needs(noop("b"), &["a"]),
                    with_needs(noop("c"), &["b"]),
                ],
            ),
            "pipeline.steps[0].needs",
            "dependency cycle: a -> c -> b -> a",
        ),
        (
            "no kind",
            named(
                "p",
                vec![pb::Step {
                    name: "a".into(),
                    ..Default::default()
                }],
            ),
            "pipeline.steps[0].kind",
            "a step kind is required",
        ),
        (
            "sleep without duration",
            named(
                "p",
                vec![step(
                    "a",
                    pb::step::Kind::Sleep(pb::SleepStep { duration: None }),
                )],
            ),
            "pipeline.steps[0].sleep.duration",
            "required",
        ),
        (
            "negative sleep",
            named("p", vec![sleep("a", -1)]),
            "pipeline.steps[0].sleep.duration",
            "non-negative",
        ),
        (
            "sleep too long",
            named("p", vec![sleep("a", 25 * 3600)]),
            "pipeline.steps[0].sleep.duration",
            "at most 24 hours",
        ),
        (
            "zero timeout",
            named(
                "p",
                vec![pb::Step {
                    timeout: Some(prost_types::Duration::default()),
                    ..noop("a")
                }],
            ),
            "pipeline.steps[0].timeout",
            "more than 0",
        ),
        (
            "negative timeout",
            named(
                "p",
                vec![pb::Step {
                    timeout: Some(prost_types::Duration {
                        seconds: -5,
                        nanos: 0,
                    }),
                    ..noop("a")
                }],
            ),
            "pipeline.steps[0].timeout",
            "non-negative",
        ),
        (
            "negative parallelism",
            pb::Pipeline {
                max_parallel_steps: -1,
                ..named("p", vec![noop("a")])
            },
            "pipeline.max_parallel_steps",
            "negative",
        ),
        (
            "huge parallelism",
            pb::Pipeline {
                max_parallel_steps: 5000,
                ..named("p", vec![noop("a")])
            },
            "pipeline.max_parallel_steps",
            "at most 1024",
        ),
        (
            "command without program",
            named(
                "p",
                vec![step(
                    "a",
                    pb::step::Kind::Command(pb::CommandStep::default()),
                )],
            ),
            "pipeline.steps[0].command.program",
            "required",
        ),
        (
            "non-finite number",
            named(
                "p",
                vec![step(
                    "a",
                    pb::step::Kind::Set(pb::SetStep { values: Some(nan) }),
                )],
            ),
            "pipeline.steps[0].set.values.x",
            "finite",
        ),
    ];
    let mut client = app.client.clone();
    for (case, definition, field, says) in cases {
        let name = definition.name.clone();
        let status = client
            .create_pipeline(pb::CreatePipelineRequest {
                pipeline: Some(definition),
            })
            .await
            .expect_err(case);
        assert_invalid(&status, field, says);
        if !name.is_empty() && name.len() <= 128 && !name.contains(' ') {
            let stored = client
                .get_pipeline(pb::GetPipelineRequest { name, version: 0 })
                .await;
            assert_eq!(
                stored.unwrap_err().code(),
                Code::NotFound,
                "{case}: nothing is stored"
            );
        }
    }

    let missing = client
        .create_pipeline(pb::CreatePipelineRequest { pipeline: None })
        .await
        .unwrap_err();
    assert_invalid(&missing, "pipeline", "required");

    // Several problems are reported at once.
    let many = client
        .create_pipeline(pb::CreatePipelineRequest {
            pipeline: Some(named("", vec![noop("a"), noop("a")])),
        })
        .await
        .unwrap_err();
    assert_eq!(violations(&many).len(), 2, "{many:?}");

    // An update is validated the same way and leaves the stored version alone.
    app.create("name: keep\nsteps: [{name: a, noop: {}}]").await;
    let update = client
        .update_pipeline(pb::UpdatePipelineRequest {
            pipeline: Some(named("keep", vec![with_needs(noop("a"), &["a"])])),
        })
        .await
        .unwrap_err();
    assert_invalid(&update, "pipeline.steps[0].needs[0]", "itself");
    let kept = client
        .get_pipeline(pb::GetPipelineRequest {
            name: "keep".into(),
            version: 0,
        })
        .await
        .unwrap();
    assert_eq!(kept.into_inner().pipeline.unwrap().version, 1);
}

#[tokio::test]
async fn command_steps_are_refused_unless_the_program_is_allowed() {
    let app = spawn_app_in(tempfile::TempDir::new().unwrap(), vec![]).await;
    let status = app
        .client
        .clone()
        .create_pipeline(pb::CreatePipelineRequest {
            pipeline: Some(pipeline("name: cmd\nsteps:\n- {name: a, noop: {}}\n- {name: b, command: {program: sh, args: [-c, 'true']}}\n")),
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::FailedPrecondition);
    assert!(
        status.message().contains("--allow-command"),
        "{}",
        status.message()
    );
    let failure = status
        .get_details_precondition_failure()
        .expect("precondition details");
    assert_eq!(
        failure.violations[0].subject,
        "pipeline.steps[1].command.program"
    );
    assert_eq!(failure.violations[0].r#type, "COMMAND_NOT_ALLOWED");

    // Allowed programs are matched exactly.
    let other = spawn_app().await;
    let status = other
        .client
        .clone()
        .create_pipeline(pb::CreatePipelineRequest {
            pipeline: Some(pipeline(
                "name: cmd\nsteps: [{name: b, command: {program: /bin/sh}}]",
            )),
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::FailedPrecondition);
}

#[tokio::test]
async fn bad_requests_name_their_field() {
    let app = spawn_app().await;
    let mut c = app.client.clone();
    app.create("name: ok\nsteps: [{name: a, noop: {}}]").await;
    let unknown_id = "01900000-0000-7000-8000-000000000000".to_string();

    let s = c
        .run_pipeline(pb::RunPipelineRequest::default())
        .await
        .unwrap_err();
    assert_invalid(&s, "pipeline_name", "required");
    let s = c
        .run_pipeline(pb::RunPipelineRequest {
            pipeline_name: "ghost".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(s.code(), Code::NotFound);
    let s = c
        .run_pipeline(pb::RunPipelineRequest {
            pipeline_name: "ok".into(),
            trigger: Some(pb::Trigger {
                r#type: 42,
                data: None,
            }),
            correlation_id: "x".repeat(300),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_invalid(&s, "trigger.type", "unknown trigger type");
    assert_invalid(&s, "correlation_id", "at most 256");

    let s = c
        .get_execution(pb::GetExecutionRequest {
            execution_id: "".into(),
        })
        .await
        .unwrap_err();
    assert_invalid(&s, "execution_id", "required");
    let s = c
        .get_execution(pb::GetExecutionRequest {
            execution_id: "not-an-id".into(),
        })
        .await
        .unwrap_err();
    assert_invalid(&s, "execution_id", "not an execution id");
    let s = c
        .get_execution(pb::GetExecutionRequest {
            execution_id: unknown_id.clone(),
        })
        .await
        .unwrap_err();
    assert_eq!(s.code(), Code::NotFound);

    let s = c
        .list_executions(pb::ListExecutionsRequest {
            page_size: -1,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_invalid(&s, "page_size", "between");
    let s = c
        .list_executions(pb::ListExecutionsRequest {
            statuses: vec![99],
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_invalid(&s, "statuses[0]", "not an execution status");
    let s = c
        .list_executions(pb::ListExecutionsRequest {
            page_token: "garbage".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_invalid(&s, "page_token", "not a token");
    let s = c
        .list_pipelines(pb::ListPipelinesRequest {
            page_size: 1001,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_invalid(&s, "page_size", "between");
    let s = c
        .get_pipeline(pb::GetPipelineRequest {
            name: "".into(),
            version: 0,
        })
        .await
        .unwrap_err();
    assert_invalid(&s, "name", "required");
    let s = c
        .get_pipeline(pb::GetPipelineRequest {
            name: "ok".into(),
            version: -1,
        })
        .await
        .unwrap_err();
    assert_invalid(&s, "version", "negative");

    let s = c
        .cancel_execution(pb::CancelExecutionRequest {
            execution_id: unknown_id.clone(),
            mode: 0,
        })
        .await
        .unwrap_err();
    assert_eq!(s.code(), Code::NotFound);
    let s = c
        .cancel_execution(pb::CancelExecutionRequest {
            execution_id: unknown_id.clone(),
            mode: 9,
        })
        .await
        .unwrap_err();
    assert_invalid(&s, "mode", "not a cancel mode");
    let s = c
        .retry_execution(pb::RetryExecutionRequest {
            execution_id: unknown_id.clone(),
            from_step: "".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(s.code(), Code::NotFound);
    let s = c
        .watch_execution(pb::WatchExecutionRequest {
            execution_id: unknown_id.clone(),
            after_sequence: 0,
        })
        .await
        .unwrap_err();
    assert_eq!(s.code(), Code::NotFound);

    let execution = app.run("ok", serde_json::json!({})).await;
    app.finish(&execution.id).await;
    let s = c
        .watch_execution(pb::WatchExecutionRequest {
            execution_id: execution.id.clone(),
            after_sequence: -1,
        })
        .await
        .unwrap_err();
    assert_invalid(&s, "after_sequence", "negative");
}
