//! Admission of new executions: request ids, concurrency caps, listing by
//! correlation id and labels, pause and resume, and watching every execution.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use pipelined::proto::v1 as pb;
use serde_json::json;
use tonic::{Code, Status};
use tonic_types::StatusExt;

use crate::helpers::*;

async fn run_with(app: &TestApp, request: pb::RunPipelineRequest) -> Result<pb::Execution, Status> {
    app.client
        .clone()
        .run_pipeline(request)
        .await
        .map(|r| r.into_inner().execution.unwrap())
}

fn run_request(name: &str, input: serde_json::Value) -> pb::RunPipelineRequest {
    pb::RunPipelineRequest {
        pipeline_name: name.to_string(),
        input: Some(to_struct(input)),
        ..Default::default()
    }
}

/// Sends the same request `n` times at once, each on its own task and client.
async fn run_concurrently(
    app: &TestApp,
    n: usize,
    request: pb::RunPipelineRequest,
) -> Vec<Result<pb::Execution, Status>> {
    let calls: Vec<_> = (0..n)
        .map(|_| {
            let mut client = app.client.clone();
            let request = request.clone();
            tokio::spawn(async move {
                client
                    .run_pipeline(request)
                    .await
                    .map(|r| r.into_inner().execution.unwrap())
            })
        })
        .collect();
    let mut results = Vec::with_capacity(n);
    for call in calls {
        results.push(call.await.expect("RunPipeline task"));
    }
    results
}

async fn list(app: &TestApp, request: pb::ListExecutionsRequest) -> pb::ListExecutionsResponse {
    app.client
        .clone()
        .list_executions(request)
        .await
        .expect("list executions")
        .into_inner()
}

fn ids(executions: &[pb::Execution]) -> Vec<String> {
    executions.iter().map(|e| e.id.clone()).collect()
}

async fn cancel(app: &TestApp, id: &str) -> Result<pb::Execution, Status> {
    app.client
        .clone()
        .cancel_execution(pb::CancelExecutionRequest {
            execution_id: id.into(),
            mode: pb::CancelMode::Graceful as i32,
        })
        .await
        .map(|r| r.into_inner().execution.unwrap())
}

async fn pause(app: &TestApp, id: &str) -> Result<pb::Execution, Status> {
    app.client
        .clone()
        .pause_execution(pb::PauseExecutionRequest {
            execution_id: id.into(),
        })
        .await
        .map(|r| r.into_inner().execution.unwrap())
}

async fn resume(app: &TestApp, id: &str) -> Result<pb::Execution, Status> {
    app.client
        .clone()
        .resume_execution(pb::ResumeExecutionRequest {
            execution_id: id.into(),
        })
        .await
        .map(|r| r.into_inner().execution.unwrap())
}

async fn watch_all(
    app: &TestApp,
    request: pb::WatchExecutionsRequest,
) -> Result<tonic::Streaming<pb::WatchExecutionsResponse>, Status> {
    app.client
        .clone()
        .watch_executions(request)
        .await
        .map(|r| r.into_inner())
}

/// The next event of a WatchExecutions stream (skipping heartbeats), or
/// `None` if nothing arrives within `limit`.
async fn next_event(
    stream: &mut tonic::Streaming<pb::WatchExecutionsResponse>,
    limit: Duration,
) -> Option<pb::ExecutionEvent> {
    tokio::time::timeout(limit, async {
        loop {
            let message = stream
                .message()
                .await
                .expect("watch stream")
                .expect("the stream stays open");
            if let Some(event) = message.event {
                return event;
            }
        }
    })
    .await
    .ok()
}

/// An event's time in nanoseconds, for ordering events of different executions.
fn nanos(event: &pb::ExecutionEvent) -> i128 {
    let t = event.time.as_ref().expect("event time");
    i128::from(t.seconds) * 1_000_000_000 + i128::from(t.nanos)
}

fn first_of(events: &[pb::ExecutionEvent], kind: pb::EventType) -> &pb::ExecutionEvent {
    events
        .iter()
        .find(|e| event_type(e) == kind)
        .unwrap_or_else(|| panic!("no {kind:?} event in {events:#?}"))
}

fn terminal(events: &[pb::ExecutionEvent]) -> &pb::ExecutionEvent {
    let last = events.last().expect("events");
    assert!(
        matches!(
            event_type(last),
            pb::EventType::ExecutionSucceeded
                | pb::EventType::ExecutionFailed
                | pb::EventType::ExecutionCancelled
        ),
        "the last event is terminal: {last:#?}"
    );
    last
}

fn kinds(events: &[pb::ExecutionEvent]) -> Vec<pb::EventType> {
    events.iter().map(event_type).collect()
}

fn lines(path: &Path) -> usize {
    std::fs::read_to_string(path)
        .map(|s| s.lines().count())
        .unwrap_or(0)
}

/// A shell loop that ends once `gate` exists.
fn wait_for_gate(gate: &Path) -> String {
    format!("while [ ! -e {} ]; do sleep 0.02; done", gate.display())
}

fn field_violations(status: &Status) -> Vec<String> {
    status
        .get_details_bad_request()
        .map(|b| b.field_violations.into_iter().map(|v| v.field).collect())
        .unwrap_or_default()
}

// ----- request ids -----
//
// Tests that send many requests at once use several worker threads, as the
// server binary does, so that the requests really race.

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_runs_with_one_request_id_start_exactly_one_execution() {
    let app = spawn_app().await;
    let appended = app.path("appended");
    app.create(&format!(
        "name: once\nsteps:\n\
         - {{name: append, command: {{program: sh, args: [-c, 'echo run >> {}']}}}}\n",
        appended.display()
    ))
    .await;
    let request = pb::RunPipelineRequest {
        request_id: "order-42".into(),
        correlation_id: "msg-7".into(),
        labels: HashMap::from([("env".to_string(), "test".to_string())]),
        ..run_request("once", json!({"n": 1, "nested": {"b": 2, "a": 1}}))
    };

    let results = run_concurrently(&app, 20, request.clone()).await;
    let executions: Vec<pb::Execution> = results
        .into_iter()
        .map(|r| r.expect("every repeat is accepted"))
        .collect();
    let first = &executions[0].id;
    assert!(
        executions.iter().all(|e| &e.id == first),
        "every call returns the same execution: {:?}",
        ids(&executions)
    );
    assert_eq!(executions[0].request_id, "order-42");
    let listed = list(
        &app,
        pb::ListExecutionsRequest {
            pipeline_name: "once".into(),
            ..Default::default()
        },
    )
    .await;
    assert_eq!(ids(&listed.executions), [first.as_str()]);

    let done = app.finish(first).await;
    assert_eq!(status(&done), pb::ExecutionStatus::Succeeded);
    assert_eq!(lines(&appended), 1, "the command ran exactly once");

    // A repeat after the end returns the same execution as it is now.
    let repeat = run_with(&app, request.clone()).await.unwrap();
    assert_eq!(
        (&repeat.id, status(&repeat)),
        (first, pb::ExecutionStatus::Succeeded)
    );
    assert_eq!(repeat.last_sequence, done.last_sequence);

    // The same id for a different request is refused, naming the id.
    let different = run_with(
        &app,
        pb::RunPipelineRequest {
            input: Some(to_struct(json!({"n": 2, "nested": {"b": 2, "a": 1}}))),
            ..request.clone()
        },
    )
    .await
    .unwrap_err();
    assert_eq!(different.code(), Code::AlreadyExists, "{different:?}");
    assert!(
        different.message().contains("order-42"),
        "{}",
        different.message()
    );

    let relabelled = run_with(
        &app,
        pb::RunPipelineRequest {
            labels: HashMap::from([("env".to_string(), "prod".to_string())]),
            ..request.clone()
        },
    )
    .await
    .unwrap_err();
    assert_eq!(relabelled.code(), Code::AlreadyExists, "{relabelled:?}");

    // A new id starts a new execution.
    let fresh = run_with(
        &app,
        pb::RunPipelineRequest {
            request_id: "order-43".into(),
            ..request
        },
    )
    .await
    .unwrap();
    assert_ne!(&fresh.id, first);
    assert_eq!(
        status(&app.finish(&fresh.id).await),
        pb::ExecutionStatus::Succeeded
    );
    assert_eq!(lines(&appended), 2);
    let listed = list(
        &app,
        pb::ListExecutionsRequest {
            pipeline_name: "once".into(),
            ..Default::default()
        },
    )
    .await;
    assert_eq!(ids(&listed.executions), [fresh.id, first.clone()]);
}

// ----- listing -----

#[tokio::test]
async fn executions_are_listed_by_correlation_id_and_labels() {
    let app = spawn_app().await;
    app.create("name: alpha\nsteps: [{name: a, noop: {}}]")
        .await;
    app.create("name: beta\nsteps: [{name: b, noop: {}}]").await;
    let run = async |pipeline: &str, correlation: &str, labels: &[(&str, &str)]| {
        run_with(
            &app,
            pb::RunPipelineRequest {
                correlation_id: correlation.into(),
                labels: labels
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect(),
                ..run_request(pipeline, json!({}))
            },
        )
        .await
        .unwrap()
        .id
    };
    let e1 = run("alpha", "c1", &[("env", "prod"), ("team", "x")]).await;
    let e2 = run("alpha", "c2", &[("env", "prod"), ("team", "y")]).await;
    let e3 = run("beta", "c1", &[("env", "prod"), ("team", "x")]).await;
    let e4 = run("alpha", "c1", &[("env", "dev"), ("team", "x")]).await;
    let e5 = run("beta", "c3", &[]).await;

    let query = async |pipeline: &str, correlation: &str, labels: &[(&str, &str)]| {
        let response = list(
            &app,
            pb::ListExecutionsRequest {
                pipeline_name: pipeline.into(),
                correlation_id: correlation.into(),
                labels: labels
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect(),
                ..Default::default()
            },
        )
        .await;
        assert!(response.next_page_token.is_empty());
        ids(&response.executions)
    };
    assert_eq!(
        query("", "", &[("env", "prod")]).await,
        [e3.as_str(), e2.as_str(), e1.as_str()],
        "one label"
    );
    assert_eq!(
        query("", "", &[("env", "prod"), ("team", "x")]).await,
        [e3.as_str(), e1.as_str()],
        "two labels, both required"
    );
    assert_eq!(
        query("alpha", "", &[("team", "x")]).await,
        [e4.as_str(), e1.as_str()],
        "a label and a pipeline"
    );
    assert_eq!(
        query("", "c1", &[]).await,
        [e4.as_str(), e3.as_str(), e1.as_str()],
        "a correlation id"
    );
    assert_eq!(
        query("", "c1", &[("env", "prod")]).await,
        [e3.as_str(), e1.as_str()],
        "a correlation id and a label"
    );
    assert_eq!(query("", "c3", &[]).await, [e5.as_str()]);
    assert!(query("", "", &[("env", "staging")]).await.is_empty());
    assert!(
        query("", "", &[("team", "prod")]).await.is_empty(),
        "a value under another key does not match"
    );
    assert!(query("", "nobody", &[]).await.is_empty());
    assert_eq!(
        query("", "", &[]).await,
        [
            e5.as_str(),
            e4.as_str(),
            e3.as_str(),
            e2.as_str(),
            e1.as_str()
        ]
    );

    // Listed executions carry what they were started with.
    let listed = list(
        &app,
        pb::ListExecutionsRequest {
            correlation_id: "c2".into(),
            ..Default::default()
        },
    )
    .await;
    let e2_listed = &listed.executions[0];
    assert_eq!(e2_listed.correlation_id, "c2");
    assert_eq!(
        e2_listed.labels,
        HashMap::from([
            ("env".to_string(), "prod".to_string()),
            ("team".to_string(), "y".to_string())
        ])
    );

    // Pages of a filtered listing hold only matching executions.
    let mut pages = Vec::new();
    let mut token = String::new();
    loop {
        let page = list(
            &app,
            pb::ListExecutionsRequest {
                labels: HashMap::from([("team".to_string(), "x".to_string())]),
                page_size: 1,
                page_token: token.clone(),
                ..Default::default()
            },
        )
        .await;
        pages.push(ids(&page.executions));
        token = page.next_page_token;
        if token.is_empty() {
            break;
        }
        assert!(pages.len() < 10, "paging ends");
    }
    assert_eq!(pages, [[e4.as_str()], [e3.as_str()], [e1.as_str()]]);
    let two_pages: Vec<Vec<String>> = {
        let first = list(
            &app,
            pb::ListExecutionsRequest {
                correlation_id: "c1".into(),
                page_size: 2,
                ..Default::default()
            },
        )
        .await;
        let second = list(
            &app,
            pb::ListExecutionsRequest {
                correlation_id: "c1".into(),
                page_size: 2,
                page_token: first.next_page_token.clone(),
                ..Default::default()
            },
        )
        .await;
        assert!(second.next_page_token.is_empty());
        vec![ids(&first.executions), ids(&second.executions)]
    };
    assert_eq!(two_pages, [vec![e4, e3], vec![e1]]);
}

// ----- concurrency caps -----

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn fifty_concurrent_runs_under_a_cap_of_one_run_one_at_a_time_in_order() {
    let app = spawn_app().await;
    app.create(
        "name: serial\nconcurrency: {max_active: 1}\n\
         steps: [{name: nap, sleep: {duration: 50ms}}]\n",
    )
    .await;

    // Meanwhile, poll what a user listing active executions would see.
    let done = Arc::new(AtomicBool::new(false));
    let most_active = Arc::new(AtomicUsize::new(0));
    let poller = tokio::spawn({
        let (done, most_active) = (Arc::clone(&done), Arc::clone(&most_active));
        let mut client = app.client.clone();
        async move {
            while !done.load(Ordering::Relaxed) {
                let active = client
                    .list_executions(pb::ListExecutionsRequest {
                        pipeline_name: "serial".into(),
                        statuses: vec![
                            pb::ExecutionStatus::Pending as i32,
                            pb::ExecutionStatus::Running as i32,
                        ],
                        ..Default::default()
                    })
                    .await
                    .expect("list")
                    .into_inner()
                    .executions
                    .len();
                most_active.fetch_max(active, Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    });

    let results = run_concurrently(&app, 50, run_request("serial", json!({}))).await;
    let mut accepted: Vec<pb::Execution> = results
        .into_iter()
        .map(|r| r.expect("queue mode accepts every run"))
        .collect();
    accepted.sort_by(|a, b| a.id.cmp(&b.id));
    let queued: Vec<&pb::Execution> = accepted
        .iter()
        .filter(|e| status(e) == pb::ExecutionStatus::Queued)
        .collect();
    assert_eq!(
        queued.len(),
        49,
        "all but one wait for the slot: {:?}",
        accepted.iter().map(status).collect::<Vec<_>>()
    );

    let mut windows = Vec::new();
    for execution in &accepted {
        let events = app.events(&execution.id, 0).await;
        assert_gapless(&events, 1);
        let end = terminal(&events);
        assert_eq!(
            event_type(end),
            pb::EventType::ExecutionSucceeded,
            "{events:#?}"
        );
        if status(execution) == pb::ExecutionStatus::Queued {
            assert_eq!(event_type(&events[0]), pb::EventType::ExecutionQueued);
            assert_eq!(
                events[0].execution_status,
                pb::ExecutionStatus::Queued as i32
            );
            assert_eq!(event_type(&events[1]), pb::EventType::ExecutionStarted);
        } else {
            assert_eq!(event_type(&events[0]), pb::EventType::ExecutionStarted);
        }
        let started = first_of(&events, pb::EventType::ExecutionStarted);
        let step_started = first_of(&events, pb::EventType::StepStarted);
        assert!(nanos(started) <= nanos(step_started));
        windows.push((execution.id.clone(), nanos(started), nanos(end)));
    }
    done.store(true, Ordering::Relaxed);
    poller.await.unwrap();

    // In order of creation (id), each ran only after the previous had ended.
    for pair in windows.windows(2) {
        let ((previous, _, ended), (next, started, _)) = (&pair[0], &pair[1]);
        assert!(
            started >= ended,
            "{next} started {} µs before {previous} ended",
            (ended - started) / 1000
        );
    }
    assert!(
        most_active.load(Ordering::Relaxed) <= 1,
        "ListExecutions showed {} active executions at once",
        most_active.load(Ordering::Relaxed)
    );
    for execution in &accepted {
        let now = app.get(&execution.id).await;
        assert_eq!(status(&now), pb::ExecutionStatus::Succeeded);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn reject_mode_refuses_runs_over_the_cap_until_a_slot_frees() {
    let app = spawn_app().await;
    let gate = app.path("gate");
    app.create(&format!(
        "name: exclusive\nconcurrency: {{max_active: 1, mode: reject}}\nsteps:\n\
         - {{name: hold, command: {{program: sh, args: [-c, '{}']}}}}\n",
        wait_for_gate(&gate)
    ))
    .await;

    let results = run_concurrently(&app, 50, run_request("exclusive", json!({}))).await;
    let (accepted, refused): (Vec<_>, Vec<_>) = results.into_iter().partition(Result::is_ok);
    assert_eq!(accepted.len(), 1, "exactly one run is accepted");
    assert_eq!(refused.len(), 49);
    for refusal in refused {
        let refusal = refusal.unwrap_err();
        assert_eq!(refusal.code(), Code::ResourceExhausted, "{refusal:?}");
        assert!(
            refusal.message().contains("'exclusive'")
                && refusal.message().contains("max_active = 1"),
            "the refusal names the pipeline and its limit: {}",
            refusal.message()
        );
    }
    let running = accepted.into_iter().next().unwrap().unwrap();
    assert_ne!(status(&running), pb::ExecutionStatus::Queued);

    std::fs::write(&gate, "").unwrap();
    assert_eq!(
        status(&app.finish(&running.id).await),
        pb::ExecutionStatus::Succeeded
    );
    let next = run_with(&app, run_request("exclusive", json!({})))
        .await
        .expect("a run is accepted once the slot is free");
    assert_eq!(
        status(&app.finish(&next.id).await),
        pb::ExecutionStatus::Succeeded
    );
    let listed = list(
        &app,
        pb::ListExecutionsRequest {
            pipeline_name: "exclusive".into(),
            ..Default::default()
        },
    )
    .await;
    assert_eq!(
        ids(&listed.executions),
        [next.id, running.id],
        "refused runs leave nothing behind"
    );
}

#[tokio::test]
async fn cancel_oldest_mode_terminates_the_running_execution_for_the_new_one() {
    let app = spawn_app().await;
    app.create(
        "name: latest\nconcurrency: {max_active: 1, mode: cancel_oldest}\nsteps:\n\
         - {name: work, command: {program: sh, args: [-c, 'read -r data; case \"$data\" in *slow*) sleep 30;; esac']}}\n",
    )
    .await;
    let a = app.run("latest", json!({"speed": "slow"})).await;
    app.wait_for(&a.id, |e| event_type(e) == pb::EventType::StepStarted)
        .await;

    let b = app.run("latest", json!({"speed": "fast"})).await;
    assert_eq!(
        status(&b),
        pb::ExecutionStatus::Queued,
        "the new one waits until the old one is gone"
    );

    let a_events = app.events(&a.id, 0).await;
    let a_done = app.get(&a.id).await;
    assert_eq!(status(&a_done), pb::ExecutionStatus::Cancelled);
    let work = step(&a_done, "work");
    assert_eq!(
        (step_status(work), work.reason.as_str()),
        (pb::StepStatus::Cancelled, "terminated")
    );
    let requested = first_of(&a_events, pb::EventType::ExecutionCancelRequested);
    assert_eq!(requested.message, "terminate");
    let a_end = terminal(&a_events);
    assert_eq!(event_type(a_end), pb::EventType::ExecutionCancelled);

    let b_events = app.events(&b.id, 0).await;
    assert_gapless(&b_events, 1);
    assert_eq!(
        kinds(&b_events),
        [
            pb::EventType::ExecutionQueued,
            pb::EventType::ExecutionStarted,
            pb::EventType::StepStarted,
            pb::EventType::StepSucceeded,
            pb::EventType::ExecutionSucceeded,
        ]
    );
    let b_step = first_of(&b_events, pb::EventType::StepStarted);
    assert!(
        nanos(b_step) >= nanos(a_end),
        "B's step started before A was gone"
    );
    assert_eq!(
        status(&app.get(&b.id).await),
        pb::ExecutionStatus::Succeeded
    );
}

#[tokio::test]
async fn cancelling_a_queued_execution_cancels_it_at_once_and_the_queue_moves_on() {
    let app = spawn_app().await;
    let gate = app.path("gate");
    app.create(&format!(
        "name: line\nconcurrency: {{max_active: 1, mode: queue}}\nsteps:\n\
         - {{name: hold, command: {{program: sh, args: [-c, '{}']}}}}\n\
         - {{name: after, needs: [hold], noop: {{}}}}\n",
        wait_for_gate(&gate)
    ))
    .await;
    let first = app.run("line", json!({})).await;
    app.wait_for(&first.id, |e| event_type(e) == pb::EventType::StepStarted)
        .await;
    let second = app.run("line", json!({})).await;
    let third = app.run("line", json!({})).await;
    assert_eq!(status(&second), pb::ExecutionStatus::Queued);
    assert_eq!(status(&third), pb::ExecutionStatus::Queued);

    let cancelled = cancel(&app, &second.id).await.unwrap();
    assert_eq!(
        status(&cancelled),
        pb::ExecutionStatus::Cancelled,
        "no wait"
    );
    for step in &cancelled.steps {
        assert_eq!(
            (step_status(step), step.attempt),
            (pb::StepStatus::Cancelled, 0),
            "{step:?}"
        );
    }
    // Its event log closes at once, without it ever starting.
    let events = app.events(&second.id, 0).await;
    assert_gapless(&events, 1);
    assert_eq!(
        kinds(&events),
        [
            pb::EventType::ExecutionQueued,
            pb::EventType::StepCancelled,
            pb::EventType::StepCancelled,
            pb::EventType::ExecutionCancelled,
        ]
    );
    assert_eq!(
        status(&app.get(&third.id).await),
        pb::ExecutionStatus::Queued,
        "the slot is still taken"
    );

    std::fs::write(&gate, "").unwrap();
    assert_eq!(
        status(&app.finish(&first.id).await),
        pb::ExecutionStatus::Succeeded
    );
    let third_done = app.finish(&third.id).await;
    assert_eq!(status(&third_done), pb::ExecutionStatus::Succeeded);
    let second_now = app.get(&second.id).await;
    assert_eq!(status(&second_now), pb::ExecutionStatus::Cancelled);
    assert_eq!(second_now.last_sequence, cancelled.last_sequence);
    assert!(second_now.started_at.is_none(), "it never started");
}

// ----- pause and resume -----

const PAUSABLE: &str = "name: pausable\nsteps:\n\
    - {name: a, sleep: {duration: 500ms}}\n\
    - {name: b, needs: [a], noop: {}}\n\
    - {name: c, needs: [b], set: {values: {done: true}}}\n";

#[tokio::test]
async fn a_paused_execution_starts_no_step_until_resumed() {
    let app = spawn_app().await;
    app.create(PAUSABLE).await;
    let execution = app.run("pausable", json!({})).await;
    let id = execution.id.clone();
    app.wait_for(&id, |e| {
        event_type(e) == pb::EventType::StepStarted && e.step_name == "a"
    })
    .await;

    // Resuming a running execution changes nothing.
    let before = app.get(&id).await;
    let same = resume(&app, &id)
        .await
        .expect("resume of a running execution");
    assert_eq!(
        (status(&same), same.last_sequence),
        (pb::ExecutionStatus::Running, before.last_sequence)
    );

    let paused = pause(&app, &id).await.unwrap();
    assert_eq!(status(&paused), pb::ExecutionStatus::Paused);
    assert_eq!(
        step_status(step(&paused, "a")),
        pb::StepStatus::Running,
        "the running step goes on"
    );
    let again = pause(&app, &id).await.unwrap();
    assert_eq!(
        (status(&again), again.last_sequence),
        (pb::ExecutionStatus::Paused, paused.last_sequence),
        "pausing twice changes nothing"
    );

    app.wait_for(&id, |e| {
        event_type(e) == pb::EventType::StepSucceeded && e.step_name == "a"
    })
    .await;
    let settled = app.get(&id).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let still = app.get(&id).await;
    assert_eq!(status(&still), pb::ExecutionStatus::Paused);
    assert_eq!(
        ["a", "b", "c"].map(|s| step_status(step(&still, s))),
        [
            pb::StepStatus::Succeeded,
            pb::StepStatus::Pending,
            pb::StepStatus::Pending
        ]
    );
    assert_eq!(
        still.last_sequence, settled.last_sequence,
        "nothing happened while paused"
    );

    let resumed = resume(&app, &id).await.unwrap();
    assert_eq!(status(&resumed), pb::ExecutionStatus::Running);

    let events = app.events(&id, 0).await;
    assert_gapless(&events, 1);
    let done = app.get(&id).await;
    assert_eq!(status(&done), pb::ExecutionStatus::Succeeded);
    assert_eq!(to_json(&done.execution_data), json!({"done": true}));
    let summary: Vec<(pb::EventType, &str)> = events
        .iter()
        .map(|e| (event_type(e), e.step_name.as_str()))
        .collect();
    assert_eq!(
        summary,
        [
            (pb::EventType::ExecutionStarted, ""),
            (pb::EventType::StepStarted, "a"),
            (pb::EventType::ExecutionPaused, ""),
            (pb::EventType::StepSucceeded, "a"),
            (pb::EventType::ExecutionResumed, ""),
            (pb::EventType::StepStarted, "b"),
            (pb::EventType::StepSucceeded, "b"),
            (pb::EventType::StepStarted, "c"),
            (pb::EventType::StepSucceeded, "c"),
            (pb::EventType::ExecutionSucceeded, ""),
        ]
    );
    let paused_event = first_of(&events, pb::EventType::ExecutionPaused);
    assert_eq!(
        paused_event.execution_status,
        pb::ExecutionStatus::Paused as i32
    );
    let resumed_event = first_of(&events, pb::EventType::ExecutionResumed);
    assert_eq!(
        resumed_event.execution_status,
        pb::ExecutionStatus::Running as i32
    );

    // A finished execution can be neither paused nor resumed.
    for (action, result) in [
        ("pause", pause(&app, &id).await),
        ("resume", resume(&app, &id).await),
    ] {
        let refusal = result.unwrap_err();
        assert_eq!(
            refusal.code(),
            Code::FailedPrecondition,
            "{action}: {refusal:?}"
        );
        assert!(
            refusal.message().contains("succeeded"),
            "{action}: {}",
            refusal.message()
        );
    }
}

#[tokio::test]
async fn a_paused_execution_stays_paused_across_a_restart() {
    let app = spawn_app().await;
    app.create(
        "name: overnight\nsteps:\n\
         - {name: a, sleep: {duration: 200ms}}\n\
         - {name: b, needs: [a], set: {values: {b: 1}}}\n",
    )
    .await;
    let execution = app.run("overnight", json!({})).await;
    let id = execution.id.clone();
    app.wait_for(&id, |e| event_type(e) == pb::EventType::StepStarted)
        .await;
    pause(&app, &id).await.unwrap();
    app.wait_for(&id, |e| event_type(e) == pb::EventType::StepSucceeded)
        .await;
    let before = app.get(&id).await;

    let dir = app.stop().await;
    let app = spawn_app_in(dir, vec!["sh".to_string()]).await;
    let after = app.get(&id).await;
    assert_eq!(status(&after), pb::ExecutionStatus::Paused);
    assert_eq!(after.last_sequence, before.last_sequence);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let later = app.get(&id).await;
    assert_eq!(status(&later), pb::ExecutionStatus::Paused);
    assert_eq!(
        (step_status(step(&later, "b")), later.last_sequence),
        (pb::StepStatus::Pending, before.last_sequence),
        "nothing started after the restart"
    );

    let resumed = resume(&app, &id).await.expect("resume after a restart");
    assert_eq!(status(&resumed), pb::ExecutionStatus::Running);
    let events = app.events(&id, 0).await;
    assert_gapless(&events, 1);
    let done = app.get(&id).await;
    assert_eq!(status(&done), pb::ExecutionStatus::Succeeded);
    assert_eq!(to_json(&done.execution_data), json!({"b": 1}));
    assert_eq!(
        events
            .iter()
            .filter(|e| event_type(e) == pb::EventType::StepStarted)
            .map(|e| e.step_name.as_str())
            .collect::<Vec<_>>(),
        ["a", "b"],
        "a did not run again"
    );
}

// ----- watching every execution -----

#[tokio::test]
async fn watching_all_executions_filters_by_pipeline_type_and_status() {
    let app = spawn_app().await;
    app.create(
        "name: watched\nsteps:\n\
         - {name: one, set: {values: {x: 1}}}\n\
         - {name: two, needs: [one], noop: {}}\n",
    )
    .await;
    app.create("name: other\nsteps: [{name: boom, fail: {message: no}}]")
        .await;
    let mut by_pipeline = watch_all(
        &app,
        pb::WatchExecutionsRequest {
            pipeline_name: "watched".into(),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    let mut completions = watch_all(
        &app,
        pb::WatchExecutionsRequest {
            types: vec![pb::EventType::ExecutionSucceeded as i32],
            ..Default::default()
        },
    )
    .await
    .unwrap();
    let mut failures = watch_all(
        &app,
        pb::WatchExecutionsRequest {
            statuses: vec![pb::ExecutionStatus::Failed as i32],
            ..Default::default()
        },
    )
    .await
    .unwrap();

    // The other pipeline's execution comes first, so a leaky filter shows it.
    let failed = app.run("other", json!({})).await;
    assert_eq!(
        status(&app.finish(&failed.id).await),
        pb::ExecutionStatus::Failed
    );
    let x1 = app.run("watched", json!({})).await.id;
    let x2 = app.run("watched", json!({})).await.id;
    for id in [&x1, &x2] {
        assert_eq!(
            status(&app.finish(id).await),
            pb::ExecutionStatus::Succeeded
        );
    }

    let mut seen: BTreeMap<String, Vec<pb::ExecutionEvent>> = BTreeMap::new();
    let mut ended = HashSet::new();
    while ended.len() < 2 {
        let event = next_event(&mut by_pipeline, PATIENCE)
            .await
            .expect("events of the watched pipeline");
        assert_eq!(event.pipeline_name, "watched", "{event:#?}");
        if event_type(&event) == pb::EventType::ExecutionSucceeded {
            ended.insert(event.execution_id.clone());
        }
        seen.entry(event.execution_id.clone())
            .or_default()
            .push(event);
    }
    assert_eq!(seen.keys().collect::<Vec<_>>(), [&x1, &x2]);
    for (id, events) in &seen {
        assert_gapless(events, 1);
        let app_events = app.events(id, 0).await;
        assert_eq!(kinds(events), kinds(&app_events), "every event of {id}");
    }

    let mut done = Vec::new();
    for _ in 0..2 {
        let event = next_event(&mut completions, PATIENCE)
            .await
            .expect("a completion");
        assert_eq!(event_type(&event), pb::EventType::ExecutionSucceeded);
        assert_eq!(event.pipeline_name, "watched");
        done.push(event.execution_id);
    }
    // The two run at the same time: either may finish first.
    done.sort();
    let mut expected = [x1.clone(), x2.clone()];
    expected.sort();
    assert_eq!(done, expected);

    let failure = next_event(&mut failures, PATIENCE)
        .await
        .expect("the failure");
    assert_eq!(
        (
            event_type(&failure),
            failure.execution_id.as_str(),
            failure.pipeline_name.as_str()
        ),
        (pb::EventType::ExecutionFailed, failed.id.as_str(), "other")
    );

    // Nothing else matches: no second completion, no other failure.
    let quiet = Duration::from_millis(200);
    assert_eq!(next_event(&mut completions, quiet).await, None);
    assert_eq!(next_event(&mut failures, quiet).await, None);
    assert_eq!(next_event(&mut by_pipeline, quiet).await, None);
}

#[tokio::test]
async fn watching_all_executions_rejects_unknown_types_and_statuses() {
    let app = spawn_app().await;
    for (request, field) in [
        (
            pb::WatchExecutionsRequest {
                types: vec![999],
                ..Default::default()
            },
            "types[0]",
        ),
        (
            pb::WatchExecutionsRequest {
                statuses: vec![999],
                ..Default::default()
            },
            "statuses[0]",
        ),
        (
            pb::WatchExecutionsRequest {
                types: vec![pb::EventType::ExecutionFailed as i32, 0],
                ..Default::default()
            },
            "types[1]",
        ),
    ] {
        let refusal = watch_all(&app, request).await.unwrap_err();
        assert_eq!(refusal.code(), Code::InvalidArgument, "{refusal:?}");
        assert_eq!(field_violations(&refusal), [field]);
    }
}

// ----- regressions -----

#[tokio::test]
async fn queued_executions_start_when_an_update_removes_the_cap() {
    let app = spawn_app().await;
    let gate = app.path("gate");
    let yaml = |cap: &str| {
        format!(
            "name: uncapped\n{cap}steps:\n- {{name: hold, command: {{program: sh, args: [-c, '{}']}}}}\n",
            wait_for_gate(&gate)
        )
    };
    app.create(&yaml("concurrency: {max_active: 1}\n")).await;
    let first = app.run("uncapped", json!({})).await;
    let second = app.run("uncapped", json!({})).await;
    assert_eq!(status(&second), pb::ExecutionStatus::Queued);
    app.client
        .clone()
        .update_pipeline(pb::UpdatePipelineRequest {
            pipeline: Some(pipeline(&yaml(""))),
        })
        .await
        .unwrap();
    std::fs::write(&gate, "").unwrap();
    assert_eq!(
        status(&app.finish(&first.id).await),
        pb::ExecutionStatus::Succeeded
    );
    assert_eq!(
        status(&app.finish(&second.id).await),
        pb::ExecutionStatus::Succeeded,
        "the queued execution starts although the pipeline has no cap any more"
    );
}

#[tokio::test]
async fn cancelling_a_queued_retry_keeps_the_steps_that_had_succeeded() {
    let app = spawn_app().await;
    let gate = app.path("gate");
    let marker = app.path("marker");
    app.create(&format!(
        "name: keep\nconcurrency: {{max_active: 1}}\nsteps:\n\
         - {{name: ok, set: {{values: {{kept: true}}}}}}\n\
         - {{name: flaky, needs: [ok], command: {{program: sh, args: [-c, 'test -e {marker}']}}}}\n\
         - {{name: hold, command: {{program: sh, args: [-c, 'test -e {marker} || exit 0; {}']}}}}\n",
        wait_for_gate(&gate),
        marker = marker.display(),
    ))
    .await;
    let failed = app.finish(&app.run("keep", json!({"n": 1})).await.id).await;
    assert_eq!(status(&failed), pb::ExecutionStatus::Failed);
    // Another execution takes the only slot and holds it at the gate.
    std::fs::write(&marker, "").unwrap();
    let holder = app.run("keep", json!({"n": 2})).await;
    app.wait_for(&holder.id, |e| {
        event_type(e) == pb::EventType::StepStarted && e.step_name == "hold"
    })
    .await;
    let retried = app
        .client
        .clone()
        .retry_execution(pb::RetryExecutionRequest {
            execution_id: failed.id.clone(),
            from_step: String::new(),
        })
        .await
        .unwrap()
        .into_inner()
        .execution
        .unwrap();
    assert_eq!(status(&retried), pb::ExecutionStatus::Queued);
    let cancelled = cancel(&app, &failed.id).await.unwrap();
    assert_eq!(status(&cancelled), pb::ExecutionStatus::Cancelled);
    let ok = step(&cancelled, "ok");
    assert_eq!(step_status(ok), pb::StepStatus::Succeeded);
    assert_eq!(to_json(&ok.output), json!({"kept": true}));
    assert_eq!(
        step_status(step(&cancelled, "flaky")),
        pb::StepStatus::Cancelled
    );
    let events = app.events(&failed.id, 0).await;
    assert_gapless(&events, 1);
    std::fs::write(&gate, "").unwrap();
    assert_eq!(
        status(&app.finish(&holder.id).await),
        pb::ExecutionStatus::Succeeded
    );
}
