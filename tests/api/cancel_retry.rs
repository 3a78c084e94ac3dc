//! Cancelling, retrying, and the execution state machine.

use std::path::Path;

use pipelined::proto::v1 as pb;
use serde_json::json;
use tonic::Code;

use crate::helpers::*;

async fn cancel(
    app: &TestApp,
    id: &str,
    mode: pb::CancelMode,
) -> Result<pb::Execution, tonic::Status> {
    app.client
        .clone()
        .cancel_execution(pb::CancelExecutionRequest {
            execution_id: id.into(),
            mode: mode as i32,
        })
        .await
        .map(|r| r.into_inner().execution.unwrap())
}

async fn retry(app: &TestApp, id: &str, from_step: &str) -> Result<pb::Execution, tonic::Status> {
    app.client
        .clone()
        .retry_execution(pb::RetryExecutionRequest {
            execution_id: id.into(),
            from_step: from_step.into(),
        })
        .await
        .map(|r| r.into_inner().execution.unwrap())
}

fn lines(path: &Path) -> usize {
    std::fs::read_to_string(path)
        .map(|s| s.lines().count())
        .unwrap_or(0)
}

#[tokio::test]
async fn graceful_cancel_lets_the_running_step_finish() {
    let app = spawn_app().await;
    let started = app.path("started");
    app.create(&format!(
        "name: graceful\nsteps:\n\
         - {{name: work, command: {{program: sh, args: [-c, 'touch {}; sleep 0.5; echo \"{{\\\"finished\\\": true}}\"']}}}}\n\
         - {{name: next, needs: [work], noop: {{}}}}\n",
        started.display()
    ))
    .await;
    let execution = app.run("graceful", json!({})).await;
    wait_until("the command runs", || started.exists()).await;

    let stopping = cancel(&app, &execution.id, pb::CancelMode::Graceful)
        .await
        .unwrap();
    assert_eq!(status(&stopping), pb::ExecutionStatus::Stopping);
    // Asking again while stopping changes nothing.
    let again = cancel(&app, &execution.id, pb::CancelMode::Graceful)
        .await
        .unwrap();
    assert_eq!(
        (status(&again), again.last_sequence),
        (pb::ExecutionStatus::Stopping, stopping.last_sequence)
    );

    let events = app.events(&execution.id, 0).await;
    let done = app.get(&execution.id).await;
    assert_eq!(status(&done), pb::ExecutionStatus::Cancelled);
    let work = step(&done, "work");
    assert_eq!(
        step_status(work),
        pb::StepStatus::Succeeded,
        "the running step finished"
    );
    assert_eq!(to_json(&work.output), json!({"finished": true}));
    assert_eq!(to_json(&done.execution_data), json!({"finished": true}));
    let next = step(&done, "next");
    assert_eq!(
        (step_status(next), next.reason.as_str(), next.attempt),
        (pb::StepStatus::Cancelled, "execution cancelled", 0)
    );
    // The command's log line (a STEP_LOG event) comes before its success.
    let kinds: Vec<_> = events
        .iter()
        .map(event_type)
        .filter(|&t| t != pb::EventType::StepLog)
        .collect();
    let kinds = &kinds[kinds.len() - 4..];
    assert_eq!(
        kinds,
        [
            pb::EventType::ExecutionCancelRequested,
            pb::EventType::StepSucceeded,
            pb::EventType::StepCancelled,
            pb::EventType::ExecutionCancelled
        ]
    );
}

#[tokio::test]
async fn terminate_kills_the_whole_process_group() {
    let app = spawn_app().await;
    let pids = app.path("pids");
    app.create(&format!(
        "name: stuck\nsteps:\n\
         - {{name: hang, command: {{program: sh, args: [-c, 'sleep 1000 & echo $! > {0}; echo $$ >> {0}; wait']}}}}\n\
         - {{name: never, needs: [hang], noop: {{}}}}\n",
        pids.display()
    ))
    .await;
    let execution = app.run("stuck", json!({})).await;
    wait_until("both processes are up", || lines(&pids) == 2).await;
    let pids: Vec<i32> = std::fs::read_to_string(&pids)
        .unwrap()
        .lines()
        .map(|l| l.trim().parse().unwrap())
        .collect();
    assert!(pids.iter().all(|&pid| !process_gone(pid)));

    let terminating = cancel(&app, &execution.id, pb::CancelMode::Terminate)
        .await
        .unwrap();
    assert_eq!(status(&terminating), pb::ExecutionStatus::Terminating);
    let done = app.finish(&execution.id).await;
    assert_eq!(status(&done), pb::ExecutionStatus::Cancelled);
    let hang = step(&done, "hang");
    assert_eq!(
        (step_status(hang), hang.reason.as_str()),
        (pb::StepStatus::Cancelled, "terminated")
    );
    assert_eq!(step_status(step(&done, "never")), pb::StepStatus::Cancelled);
    for pid in pids {
        wait_until(&format!("process {pid} is gone"), || process_gone(pid)).await;
    }
}

#[derive(Debug, Clone, Copy)]
enum State {
    Running,
    Stopping,
    Succeeded,
    Failed,
    Cancelled,
}

/// A fresh execution in `state`.
async fn execution_in(app: &TestApp, state: State) -> pb::Execution {
    let (pipeline, expected) = match state {
        State::Running | State::Stopping | State::Cancelled => {
            ("hold", pb::ExecutionStatus::Running)
        }
        State::Succeeded => ("pass", pb::ExecutionStatus::Succeeded),
        State::Failed => ("fail", pb::ExecutionStatus::Failed),
    };
    let execution = app.run(pipeline, json!({})).await;
    match state {
        State::Running => {
            app.wait_for(&execution.id, |e| {
                event_type(e) == pb::EventType::StepStarted
            })
            .await;
        }
        State::Stopping => {
            app.wait_for(&execution.id, |e| {
                event_type(e) == pb::EventType::StepStarted
            })
            .await;
            cancel(app, &execution.id, pb::CancelMode::Graceful)
                .await
                .unwrap();
        }
        State::Cancelled => {
            app.wait_for(&execution.id, |e| {
                event_type(e) == pb::EventType::StepStarted
            })
            .await;
            cancel(app, &execution.id, pb::CancelMode::Terminate)
                .await
                .unwrap();
            app.finish(&execution.id).await;
        }
        State::Succeeded | State::Failed => {
            app.finish(&execution.id).await;
        }
    }
    let execution = app.get(&execution.id).await;
    let expected = match state {
        State::Stopping => pb::ExecutionStatus::Stopping,
        State::Cancelled => pb::ExecutionStatus::Cancelled,
        _ => expected,
    };
    assert_eq!(status(&execution), expected, "setting up {state:?}");
    execution
}

#[tokio::test]
async fn state_machine_allows_only_legal_transitions() {
    use pb::ExecutionStatus as S;
    #[derive(Debug, Clone, Copy)]
    enum Action {
        Graceful,
        Terminate,
        Retry,
    }
    let app = spawn_app().await;
    app.create("name: hold\nsteps: [{name: wait, sleep: {duration: 2s}}]")
        .await;
    app.create("name: pass\nsteps: [{name: a, noop: {}}]").await;
    app.create("name: fail\nsteps: [{name: a, fail: {message: no}}]")
        .await;

    // (state, action, Ok(status right after) or Err(code))
    let table: Vec<(State, Action, Result<S, Code>)> = vec![
        (State::Running, Action::Graceful, Ok(S::Stopping)),
        (State::Running, Action::Terminate, Ok(S::Terminating)),
        (State::Running, Action::Retry, Err(Code::FailedPrecondition)),
        (State::Stopping, Action::Graceful, Ok(S::Stopping)),
        (State::Stopping, Action::Terminate, Ok(S::Terminating)),
        (
            State::Stopping,
            Action::Retry,
            Err(Code::FailedPrecondition),
        ),
        (
            State::Succeeded,
            Action::Graceful,
            Err(Code::FailedPrecondition),
        ),
        (
            State::Succeeded,
            Action::Terminate,
            Err(Code::FailedPrecondition),
        ),
        (
            State::Succeeded,
            Action::Retry,
            Err(Code::FailedPrecondition),
        ),
        (
            State::Failed,
            Action::Graceful,
            Err(Code::FailedPrecondition),
        ),
        (
            State::Failed,
            Action::Terminate,
            Err(Code::FailedPrecondition),
        ),
        (State::Failed, Action::Retry, Ok(S::Running)),
        (
            State::Cancelled,
            Action::Graceful,
            Err(Code::FailedPrecondition),
        ),
        (
            State::Cancelled,
            Action::Terminate,
            Err(Code::FailedPrecondition),
        ),
        (State::Cancelled, Action::Retry, Ok(S::Running)),
    ];
    let rows = table.into_iter().map(|(state, action, expected)| {
        let app = &app;
        async move {
            let before = execution_in(app, state).await;
            let result = match action {
                Action::Graceful => cancel(app, &before.id, pb::CancelMode::Graceful).await,
                Action::Terminate => cancel(app, &before.id, pb::CancelMode::Terminate).await,
                Action::Retry => retry(app, &before.id, "").await,
            };
            match (result, expected) {
                (Ok(after), Ok(want)) => assert_eq!(status(&after), want, "{state:?} + {action:?}"),
                (Err(error), Err(code)) => {
                    assert_eq!(error.code(), code, "{state:?} + {action:?}: {error:?}");
                    let after = app.get(&before.id).await;
                    assert_eq!(
                        (after.status, after.last_sequence),
                        (before.status, before.last_sequence),
                        "{state:?} + {action:?}: a refused request changes nothing"
                    );
                }
                (got, want) => panic!("{state:?} + {action:?}: got {got:?}, wanted {want:?}"),
            }
        }
    });
    futures::future::join_all(rows).await;
}

#[tokio::test]
async fn retry_keeps_succeeded_outputs_and_runs_only_what_failed() {
    let app = spawn_app().await;
    let count = app.path("count");
    let open = app.path("open");
    app.create(&format!(
        r#"
name: flaky
steps:
- name: counter
  command: {{program: sh, args: [-c, 'echo run >> {count}; echo "{{\"counted\": $(wc -l < {count})}}"']}}
- name: gate
  command: {{program: sh, args: [-c, 'test -f {open} || {{ echo "gate closed" >&2; exit 3; }}; echo "{{\"gate\": \"open\"}}"']}}
- name: after
  needs: [counter, gate]
  command: {{program: sh, args: [-c, 'read data; echo "{{\"after_saw\": $data}}"']}}
"#,
        count = count.display(),
        open = open.display()
    ))
    .await;
    let execution = app.run("flaky", json!({"input": true})).await;
    let failed = app.finish(&execution.id).await;
    assert_eq!(status(&failed), pb::ExecutionStatus::Failed);
    assert_eq!(
        step(&failed, "gate").error,
        "sh exited with status 3: gate closed"
    );
    assert_eq!(step_status(step(&failed, "after")), pb::StepStatus::Skipped);
    assert_eq!(
        to_json(&step(&failed, "counter").output),
        json!({"counted": 1})
    );

    std::fs::write(&open, "").unwrap();
    let retried = retry(&app, &execution.id, "").await.unwrap();
    assert_eq!(status(&retried), pb::ExecutionStatus::Running);
    assert_eq!(retried.id, execution.id, "the same execution continues");
    let done = app.finish(&execution.id).await;
    assert_eq!(
        status(&done),
        pb::ExecutionStatus::Succeeded,
        "{}",
        done.error_message
    );
    assert_eq!(lines(&count), 1, "the succeeded step did not run again");
    assert_eq!(
        (
            step(&done, "counter").attempt,
            step(&done, "gate").attempt,
            step(&done, "after").attempt
        ),
        (1, 2, 1)
    );
    assert_eq!(
        to_json(&step(&done, "after").output),
        json!({"after_saw": {"input": true, "counted": 1, "gate": "open"}})
    );
    assert!(done.error_message.is_empty());

    let events = app.events(&execution.id, 0).await;
    assert_gapless(&events, 1);
    let retried_event = events
        .iter()
        .find(|e| event_type(e) == pb::EventType::ExecutionRetried)
        .unwrap();
    assert_eq!(retried_event.message, "re-running gate, after");

    // A succeeded execution cannot be retried.
    assert_eq!(
        retry(&app, &execution.id, "").await.unwrap_err().code(),
        Code::FailedPrecondition
    );

    // from_step re-runs that step and everything downstream, even if it succeeded.
    std::fs::remove_file(&open).unwrap();
    let second = app.run("flaky", json!({})).await;
    assert_eq!(
        status(&app.finish(&second.id).await),
        pb::ExecutionStatus::Failed
    );
    std::fs::write(&open, "").unwrap();
    let unknown = retry(&app, &second.id, "nope").await.unwrap_err();
    assert_eq!(unknown.code(), Code::InvalidArgument);
    retry(&app, &second.id, "counter").await.unwrap();
    let done = app.finish(&second.id).await;
    assert_eq!(status(&done), pb::ExecutionStatus::Succeeded);
    assert_eq!(
        (step(&done, "counter").attempt, step(&done, "after").attempt),
        (2, 1)
    );
    assert_eq!(
        to_json(&step(&done, "counter").output),
        json!({"counted": 3})
    );
    assert_eq!(lines(&count), 3);
}

#[tokio::test]
async fn a_retry_waits_in_the_queue_of_a_pipeline_at_its_concurrency_cap() {
    let app = spawn_app().await;
    let marker = app.path("ready");
    let gate = app.path("gate");
    app.create(&format!(
        "name: capped\nconcurrency: {{max_active: 1}}\nsteps:\n\
         - {{name: work, command: {{program: sh, args: [-c, 'while [ ! -f {gate} ]; do sleep 0.05; done; test -f {marker}']}}}}\n",
        gate = gate.display(),
        marker = marker.display(),
    ))
    .await;
    // The first execution fails (no marker yet) once the gate opens.
    let first = app.run("capped", json!({"n": 1})).await;
    std::fs::write(&gate, "").unwrap();
    assert_eq!(
        status(&app.finish(&first.id).await),
        pb::ExecutionStatus::Failed
    );
    std::fs::remove_file(&gate).unwrap();
    // A second execution holds the only slot while it waits on the gate.
    let second = app.run("capped", json!({"n": 2})).await;
    app.wait_for(&second.id, |e| event_type(e) == pb::EventType::StepStarted)
        .await;

    let retried = retry(&app, &first.id, "").await.unwrap();
    assert_eq!(status(&retried), pb::ExecutionStatus::Queued);
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    assert_eq!(
        status(&app.get(&first.id).await),
        pb::ExecutionStatus::Queued,
        "the retry waits while the slot is taken"
    );

    std::fs::write(&marker, "").unwrap();
    std::fs::write(&gate, "").unwrap();
    let second_events = app.events(&second.id, 0).await;
    let first_events = app.events(&first.id, retried.last_sequence - 1).await;
    assert_eq!(
        status(&app.get(&first.id).await),
        pb::ExecutionStatus::Succeeded
    );
    let second_end = millis(&second_events.last().unwrap().time);
    let restarted = first_events
        .iter()
        .find(|e| event_type(e) == pb::EventType::ExecutionStarted)
        .expect("the retried execution starts again");
    assert!(
        millis(&restarted.time) >= second_end,
        "the retry started only after the other execution ended"
    );
    assert_eq!(
        event_type(&first_events[0]),
        pb::EventType::ExecutionRetried
    );
    assert_eq!(
        first_events[0].execution_status,
        pb::ExecutionStatus::Queued as i32
    );
}
