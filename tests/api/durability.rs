//! Durable execution as a user sees it: retries with backoff, step and
//! execution timeouts that kill real processes, optional steps, live logs
//! within their budget, size limits, and heartbeats on idle watch streams.

use std::path::Path;
use std::time::Duration;

use pipelined::proto::v1 as pb;
use serde_json::{Value, json};
use tonic::Code;
use tonic_types::StatusExt;

use crate::helpers::*;

/// A `command` step running `script` with `sh -c`, as a YAML flow mapping.
fn sh(script: &str) -> String {
    format!(
        "{{program: sh, args: [-c, '{}']}}",
        script.replace('\'', "''")
    )
}

/// The events of one step, without its log lines.
fn step_events<'a>(events: &'a [pb::ExecutionEvent], name: &str) -> Vec<&'a pb::ExecutionEvent> {
    events
        .iter()
        .filter(|e| e.step_name == name && event_type(e) != pb::EventType::StepLog)
        .collect()
}

/// (type, attempt) of each event.
fn summary(events: &[&pb::ExecutionEvent]) -> Vec<(pb::EventType, i32)> {
    events.iter().map(|e| (event_type(e), e.attempt)).collect()
}

/// The log lines of one step from one stream.
fn log_lines(events: &[pb::ExecutionEvent], name: &str, stream: pb::LogStream) -> Vec<String> {
    events
        .iter()
        .filter(|e| {
            e.step_name == name
                && event_type(e) == pb::EventType::StepLog
                && e.log_stream == stream as i32
        })
        .map(|e| e.message.clone())
        .collect()
}

/// The process ids written to `path`, one a line.
fn pids(path: &Path) -> Vec<i32> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(|l| l.trim().parse().expect("a pid"))
        .collect()
}

async fn wait_until_gone(pid: i32) {
    wait_until_within(
        Duration::from_secs(5),
        &format!("process {pid} is gone"),
        || process_gone(pid),
    )
    .await;
}

async fn run_error(app: &TestApp, name: &str, input: Value) -> tonic::Status {
    app.client
        .clone()
        .run_pipeline(pb::RunPipelineRequest {
            pipeline_name: name.to_string(),
            input: Some(to_struct(input)),
            ..Default::default()
        })
        .await
        .expect_err("the input is refused")
}

fn violated_fields(status: &tonic::Status) -> Vec<String> {
    status
        .get_error_details()
        .bad_request()
        .map(|b| b.field_violations.iter().map(|v| v.field.clone()).collect())
        .unwrap_or_default()
}

/// A JSON object nested `depth` levels deep: `{"k": {"k": ... 1}}`.
fn nested(depth: usize) -> Value {
    let mut value = json!(1);
    for _ in 0..depth {
        value = json!({ "k": value });
    }
    value
}

/// A script printing `{"<key>": "xxx..."}` with `bytes` x's.
fn big_output(key: &str, bytes: usize) -> String {
    format!(r#"printf '{{"{key}": "'; head -c {bytes} /dev/zero | tr '\0' x; printf '"}}\n'"#)
}

// --- Retries ---------------------------------------------------------------

#[tokio::test]
async fn a_failing_step_is_retried_after_growing_delays_until_it_succeeds() {
    let app = spawn_app().await;
    app.create(&format!(
        "name: flaky\nsteps:\n\
         - name: flaky\n  \
           retry: {{max_attempts: 5, initial_interval: 200ms, backoff_coefficient: 2}}\n  \
           command: {}\n",
        sh(r#"test "$PIPELINED_ATTEMPT" = 3 || exit 3; echo "{\"attempt\": $PIPELINED_ATTEMPT}""#)
    ))
    .await;
    let execution = app.run("flaky", json!({})).await;
    let events = app.events(&execution.id, 0).await;
    assert_gapless(&events, 1);

    use pb::EventType as E;
    let flaky = step_events(&events, "flaky");
    assert_eq!(
        summary(&flaky),
        [
            (E::StepStarted, 1),
            (E::StepRetrying, 1),
            (E::StepStarted, 2),
            (E::StepRetrying, 2),
            (E::StepStarted, 3),
            (E::StepSucceeded, 3)
        ]
    );
    for (retrying, delay) in [(flaky[1], 200), (flaky[3], 400)] {
        assert_eq!(retrying.error_kind, "exit_status");
        assert!(
            retrying.message.contains("exited with status 3"),
            "{}",
            retrying.message
        );
        let scheduled = millis(&retrying.next_attempt_at) - millis(&retrying.time);
        assert!(
            (delay - 50..=delay + 5).contains(&scheduled),
            "attempt {} was scheduled {scheduled} ms after it failed, not {delay} ms",
            retrying.attempt + 1
        );
    }
    // No attempt starts before its time.
    for (retrying, started) in [(flaky[1], flaky[2]), (flaky[3], flaky[4])] {
        let early = millis(&retrying.next_attempt_at) - millis(&started.time);
        assert!(
            early <= 2,
            "attempt {} started {early} ms before its time",
            started.attempt
        );
    }

    let done = app.get(&execution.id).await;
    assert_eq!(status(&done), pb::ExecutionStatus::Succeeded);
    let flaky = step(&done, "flaky");
    assert_eq!(
        (step_status(flaky), flaky.attempt),
        (pb::StepStatus::Succeeded, 3)
    );
    assert_eq!(to_json(&flaky.output), json!({"attempt": 3}));
    assert!(flaky.error.is_empty() && flaky.error_kind.is_empty());
    assert!(flaky.next_attempt_at.is_none());
}

#[tokio::test]
async fn a_step_that_keeps_failing_fails_after_its_last_attempt() {
    let app = spawn_app().await;
    app.create(&format!(
        "name: broken\nsteps:\n\
         - name: broken\n  \
           retry: {{max_attempts: 2, initial_interval: 100ms, jitter: 0.5}}\n  \
           command: {}\n\
         - {{name: after, needs: [broken], noop: {{}}}}\n",
        sh("echo broken >&2; exit 3")
    ))
    .await;
    let execution = app.run("broken", json!({})).await;
    let events = app.events(&execution.id, 0).await;
    assert_gapless(&events, 1);

    use pb::EventType as E;
    let broken = step_events(&events, "broken");
    assert_eq!(
        summary(&broken),
        [
            (E::StepStarted, 1),
            (E::StepRetrying, 1),
            (E::StepStarted, 2),
            (E::StepFailed, 2)
        ]
    );
    // 100 ms +/- 50% jitter.
    let delay = millis(&broken[1].next_attempt_at) - millis(&broken[1].time);
    assert!((45..=151).contains(&delay), "delay {delay} ms");
    assert_eq!(
        (broken[3].error_kind.as_str(), broken[3].message.as_str()),
        ("exit_status", "sh exited with status 3: broken")
    );
    assert!(broken[3].next_attempt_at.is_none());

    let done = app.get(&execution.id).await;
    assert_eq!(status(&done), pb::ExecutionStatus::Failed);
    assert_eq!(
        done.error_message,
        "step 'broken' failed: sh exited with status 3: broken"
    );
    let broken = step(&done, "broken");
    assert_eq!(
        (
            step_status(broken),
            broken.attempt,
            broken.error_kind.as_str()
        ),
        (pb::StepStatus::Failed, 2, "exit_status")
    );
    assert_eq!(step_status(step(&done, "after")), pb::StepStatus::Skipped);
}

#[tokio::test]
async fn errors_marked_non_retryable_fail_the_step_at_once() {
    let app = spawn_app().await;
    app.create(&format!(
        "name: fatal\nsteps:\n\
         - name: fatal\n  \
           retry: {{max_attempts: 5, initial_interval: 50ms, non_retryable_errors: [exit_status]}}\n  \
           command: {}\n",
        sh("exit 3")
    ))
    .await;
    let execution = app.run("fatal", json!({})).await;
    let events = app.events(&execution.id, 0).await;
    use pb::EventType as E;
    let fatal = step_events(&events, "fatal");
    assert_eq!(summary(&fatal), [(E::StepStarted, 1), (E::StepFailed, 1)]);
    assert_eq!(fatal[1].error_kind, "exit_status");
    let done = app.get(&execution.id).await;
    assert_eq!(status(&done), pb::ExecutionStatus::Failed);
    assert_eq!(step(&done, "fatal").attempt, 1);
}

#[tokio::test]
async fn the_pipeline_default_retry_applies_unless_a_step_has_its_own() {
    let app = spawn_app().await;
    // Both steps succeed on their third attempt; the second allows only two.
    let third_time_lucky = sh(r#"test "$PIPELINED_ATTEMPT" -ge 3 || exit 3; echo "{}""#);
    app.create(&format!(
        "name: defaults\n\
         default_retry: {{max_attempts: 3, initial_interval: 50ms}}\n\
         steps:\n\
         - name: inherits\n  command: {third_time_lucky}\n\
         - name: overrides\n  needs: [inherits]\n  \
           retry: {{max_attempts: 2, initial_interval: 50ms}}\n  \
           command: {third_time_lucky}\n"
    ))
    .await;
    let execution = app.run("defaults", json!({})).await;
    let events = app.events(&execution.id, 0).await;
    assert_gapless(&events, 1);
    use pb::EventType as E;
    assert_eq!(
        summary(&step_events(&events, "inherits")),
        [
            (E::StepStarted, 1),
            (E::StepRetrying, 1),
            (E::StepStarted, 2),
            (E::StepRetrying, 2),
            (E::StepStarted, 3),
            (E::StepSucceeded, 3)
        ]
    );
    assert_eq!(
        summary(&step_events(&events, "overrides")),
        [
            (E::StepStarted, 1),
            (E::StepRetrying, 1),
            (E::StepStarted, 2),
            (E::StepFailed, 2)
        ]
    );
    let done = app.get(&execution.id).await;
    assert_eq!(status(&done), pb::ExecutionStatus::Failed);
    assert_eq!(
        step_status(step(&done, "inherits")),
        pb::StepStatus::Succeeded
    );
    assert_eq!(step(&done, "overrides").attempt, 2);
}

// --- Timeouts --------------------------------------------------------------

#[tokio::test]
async fn a_step_over_its_timeout_is_killed_and_fails_as_timed_out() {
    let app = spawn_app().await;
    let pidfile = app.path("pid");
    app.create(&format!(
        "name: slow\nsteps:\n\
         - name: hang\n  timeout: 500ms\n  command: {}\n\
         - {{name: after, needs: [hang], noop: {{}}}}\n",
        sh(&format!("echo $$ > {}; sleep 30", pidfile.display()))
    ))
    .await;
    let execution = app.run("slow", json!({})).await;
    let events = app.events(&execution.id, 0).await;
    use pb::EventType as E;
    let hang = step_events(&events, "hang");
    assert_eq!(summary(&hang), [(E::StepStarted, 1), (E::StepFailed, 1)]);
    assert_eq!(
        (hang[1].error_kind.as_str(), hang[1].message.as_str()),
        ("timeout", "timed out after 500ms")
    );
    let ran = hang[1].duration.expect("a duration");
    assert!(
        ran.seconds * 1000 + i64::from(ran.nanos) / 1_000_000 >= 495,
        "the attempt ran its full timeout: {ran:?}"
    );

    let done = app.get(&execution.id).await;
    assert_eq!(status(&done), pb::ExecutionStatus::Failed);
    let hang = step(&done, "hang");
    assert_eq!(
        (step_status(hang), hang.error_kind.as_str()),
        (pb::StepStatus::Failed, "timeout")
    );
    assert_eq!(step_status(step(&done, "after")), pb::StepStatus::Skipped);
    let [pid] = pids(&pidfile)[..] else {
        panic!("the command wrote its pid once")
    };
    wait_until_gone(pid).await;
}

#[tokio::test]
async fn a_timed_out_attempt_is_retried_like_any_failure() {
    let app = spawn_app().await;
    let pidfile = app.path("pids");
    app.create(&format!(
        "name: slow\nsteps:\n\
         - name: hang\n  timeout: 300ms\n  \
           retry: {{max_attempts: 2, initial_interval: 50ms}}\n  \
           command: {}\n",
        sh(&format!("echo $$ >> {}; sleep 30", pidfile.display()))
    ))
    .await;
    let execution = app.run("slow", json!({})).await;
    let events = app.events(&execution.id, 0).await;
    assert_gapless(&events, 1);
    use pb::EventType as E;
    let hang = step_events(&events, "hang");
    assert_eq!(
        summary(&hang),
        [
            (E::StepStarted, 1),
            (E::StepRetrying, 1),
            (E::StepStarted, 2),
            (E::StepFailed, 2)
        ]
    );
    assert_eq!(hang[1].error_kind, "timeout");
    assert_eq!(hang[3].error_kind, "timeout");
    assert_eq!(
        status(&app.get(&execution.id).await),
        pb::ExecutionStatus::Failed
    );
    let pids = pids(&pidfile);
    assert_eq!(pids.len(), 2, "one process per attempt");
    for pid in pids {
        wait_until_gone(pid).await;
    }
}

#[tokio::test]
async fn an_execution_over_its_timeout_fails_and_a_retry_gets_a_fresh_deadline() {
    let app = spawn_app().await;
    let pidfile = app.path("pids");
    // The first attempt of `hang` outlives the execution's timeout; the one
    // after RetryExecution takes a moment, then succeeds.
    app.create(&format!(
        "name: bounded\ntimeout: 1s\nsteps:\n\
         - {{name: first, noop: {{}}}}\n\
         - name: hang\n  needs: [first]\n  command: {}\n\
         - {{name: after, needs: [hang], noop: {{}}}}\n",
        sh(&format!(
            r#"echo $$ >> {}; if [ "$PIPELINED_ATTEMPT" = 1 ]; then sleep 30; fi; sleep 0.2; echo "{{\"attempt\": $PIPELINED_ATTEMPT}}""#,
            pidfile.display()
        ))
    ))
    .await;
    let execution = app.run("bounded", json!({})).await;
    wait_until("the command runs", || pids(&pidfile).len() == 1).await;
    let running = app.get(&execution.id).await;
    assert_eq!(status(&running), pb::ExecutionStatus::Running);
    let first_deadline = millis(&running.deadline);
    assert_eq!(
        first_deadline - millis(&running.started_at),
        1000,
        "the deadline is the timeout after the start"
    );

    let events = app.events(&execution.id, 0).await;
    assert_gapless(&events, 1);
    let failed = app.get(&execution.id).await;
    assert_eq!(status(&failed), pb::ExecutionStatus::Failed);
    assert!(
        failed.error_message.contains("timed out"),
        "{}",
        failed.error_message
    );
    assert!(
        millis(&failed.finished_at) >= first_deadline - 5,
        "it ran until its deadline"
    );
    let hang = step(&failed, "hang");
    assert_eq!(
        (step_status(hang), hang.reason.as_str()),
        (pb::StepStatus::Cancelled, "execution timed out")
    );
    assert_eq!(
        step_status(step(&failed, "first")),
        pb::StepStatus::Succeeded
    );
    assert_eq!(step_status(step(&failed, "after")), pb::StepStatus::Skipped);
    use pb::EventType as E;
    let hang_events = step_events(&events, "hang");
    assert_eq!(
        summary(&hang_events),
        [(E::StepStarted, 1), (E::StepCancelled, 1)]
    );
    assert_eq!(hang_events[1].message, "execution timed out");
    let last = events.last().unwrap();
    assert_eq!(event_type(last), E::ExecutionFailed);
    assert!(last.message.contains("timed out"), "{}", last.message);
    wait_until_gone(pids(&pidfile)[0]).await;

    let retried_at = chrono::Utc::now().timestamp_millis();
    let retried = app
        .client
        .clone()
        .retry_execution(pb::RetryExecutionRequest {
            execution_id: execution.id.clone(),
            from_step: String::new(),
        })
        .await
        .expect("retry")
        .into_inner()
        .execution
        .unwrap();
    assert_eq!(status(&retried), pb::ExecutionStatus::Running);
    let second_deadline = millis(&retried.deadline);
    assert!(
        second_deadline >= retried_at + 1000 - 5,
        "a retry starts the clock again: deadline {second_deadline}, retried at {retried_at}"
    );
    let done = app.finish(&execution.id).await;
    assert_eq!(
        status(&done),
        pb::ExecutionStatus::Succeeded,
        "{}",
        done.error_message
    );
    assert_eq!(to_json(&step(&done, "hang").output), json!({"attempt": 2}));
    assert_eq!(step_status(step(&done, "after")), pb::StepStatus::Succeeded);
}

// --- Optional steps --------------------------------------------------------

#[tokio::test]
async fn an_optional_step_that_fails_does_not_fail_the_execution() {
    let app = spawn_app().await;
    app.create(&format!(
        "name: optional\nsteps:\n\
         - name: lint\n  continue_on_failure: true\n  command: {}\n\
         - {{name: build, set: {{values: {{built: true}}}}}}\n\
         - {{name: publish, needs: [lint, build], set: {{values: {{published: true}}}}}}\n",
        sh("echo style problems >&2; exit 4")
    ))
    .await;
    let execution = app.run("optional", json!({})).await;
    let events = app.events(&execution.id, 0).await;
    assert_gapless(&events, 1);
    let done = app.get(&execution.id).await;
    assert_eq!(
        status(&done),
        pb::ExecutionStatus::Succeeded,
        "{}",
        done.error_message
    );
    assert!(done.error_message.is_empty());
    let lint = step(&done, "lint");
    assert_eq!(
        (
            step_status(lint),
            lint.error.as_str(),
            lint.error_kind.as_str()
        ),
        (
            pb::StepStatus::Failed,
            "sh exited with status 4: style problems",
            "exit_status"
        )
    );
    assert_eq!(
        step_status(step(&done, "publish")),
        pb::StepStatus::Succeeded
    );
    assert_eq!(
        to_json(&done.execution_data),
        json!({"built": true, "published": true})
    );
    use pb::EventType as E;
    let lint_events = step_events(&events, "lint");
    assert_eq!(
        summary(&lint_events),
        [(E::StepStarted, 1), (E::StepFailed, 1)]
    );
    assert_eq!(lint_events[1].error_kind, "exit_status");
    assert_eq!(event_type(events.last().unwrap()), E::ExecutionSucceeded);
}

// --- Live logs -------------------------------------------------------------

#[tokio::test]
async fn a_watcher_sees_log_lines_while_the_command_still_runs() {
    let app = spawn_app().await;
    let go = app.path("go");
    app.create(&format!(
        "name: chatty\nsteps:\n- name: talk\n  command: {}\n",
        sh(&format!(
            r#"echo first; while [ ! -f {} ]; do sleep 0.05; done; echo second; echo oops >&2; echo "{{\"done\": true}}""#,
            go.display()
        ))
    ))
    .await;
    let execution = app.run("chatty", json!({})).await;
    let seen = app
        .wait_for(&execution.id, |e| event_type(e) == pb::EventType::StepLog)
        .await;
    let line = seen.last().unwrap();
    assert_eq!(
        (
            line.step_name.as_str(),
            line.attempt,
            line.log_stream,
            line.message.as_str()
        ),
        ("talk", 1, pb::LogStream::Stdout as i32, "first")
    );
    let meanwhile = app.get(&execution.id).await;
    assert_eq!(
        step_status(step(&meanwhile, "talk")),
        pb::StepStatus::Running,
        "the line arrived while the step was running"
    );

    std::fs::write(&go, "").unwrap();
    let events = app.events(&execution.id, 0).await;
    assert_gapless(&events, 1);
    assert_eq!(
        log_lines(&events, "talk", pb::LogStream::Stdout),
        ["first", "second", r#"{"done": true}"#]
    );
    assert_eq!(log_lines(&events, "talk", pb::LogStream::Stderr), ["oops"]);
    let succeeded = events
        .iter()
        .find(|e| event_type(e) == pb::EventType::StepSucceeded)
        .unwrap();
    for log in events
        .iter()
        .filter(|e| event_type(e) == pb::EventType::StepLog)
    {
        assert!(
            log.sequence < succeeded.sequence,
            "logs come before success"
        );
        assert_eq!(log.attempt, 1);
    }
    let done = app.get(&execution.id).await;
    assert_eq!(status(&done), pb::ExecutionStatus::Succeeded);
    assert_eq!(to_json(&step(&done, "talk").output), json!({"done": true}));
}

#[tokio::test]
async fn log_lines_of_a_command_that_keeps_printing_reach_watchers_promptly() {
    let app = spawn_app().await;
    let printed = app.path("printed");
    let go = app.path("go");
    // A line every 20 ms, until the test has seen one (or 200 lines).
    app.create(&format!(
        "name: ticker\nsteps:\n- name: tick\n  command: {}\n",
        sh(&format!(
            r#"i=0; while [ ! -f {go} ] && [ $i -lt 200 ]; do echo "tick $i"; echo $i >> {printed}; i=$((i+1)); sleep 0.02; done"#,
            go = go.display(),
            printed = printed.display()
        ))
    ))
    .await;
    let execution = app.run("ticker", json!({})).await;
    app.wait_for(&execution.id, |e| event_type(e) == pb::EventType::StepLog)
        .await;
    let lines_before = std::fs::read_to_string(&printed)
        .unwrap_or_default()
        .lines()
        .count();
    std::fs::write(&go, "").unwrap();
    // Log lines are committed at least every 100 ms (about five lines here),
    // not only once a batch of 64 has filled up.
    assert!(
        lines_before < 40,
        "the first line reached the watcher only after {lines_before} lines were printed"
    );
    let done = app.finish(&execution.id).await;
    assert_eq!(status(&done), pb::ExecutionStatus::Succeeded);
}

#[tokio::test]
async fn a_flood_of_log_lines_is_capped_and_the_excess_counted() {
    let app = spawn_app().await;
    app.create(&format!(
        "name: flood\nsteps:\n\
         - name: flood\n  command: {}\n\
         - name: wide\n  command: {}\n",
        sh(r#"i=0; while [ $i -lt 5000 ]; do echo "line $i"; i=$((i+1)); done"#),
        sh(r#"head -c 10000 /dev/zero | tr '\0' x; echo"#)
    ))
    .await;
    let execution = app.run("flood", json!({})).await;
    let events = app.events(&execution.id, 0).await;
    assert_gapless(&events, 1);
    let done = app.get(&execution.id).await;
    assert_eq!(
        status(&done),
        pb::ExecutionStatus::Succeeded,
        "{}",
        done.error_message
    );

    let kept = log_lines(&events, "flood", pb::LogStream::Stdout);
    assert!(
        !kept.is_empty() && kept.len() <= 1000,
        "{} lines kept",
        kept.len()
    );
    let expected: Vec<String> = (0..kept.len()).map(|i| format!("line {i}")).collect();
    assert_eq!(kept, expected, "the first lines are kept, in order");
    let system = log_lines(&events, "flood", pb::LogStream::System);
    assert_eq!(
        system.len(),
        1,
        "one note about the dropped lines: {system:?}"
    );
    let dropped = 5000 - kept.len();
    assert!(
        system[0].starts_with(&format!("{dropped} log lines dropped")),
        "{}",
        system[0]
    );
    let flood_logs: Vec<&pb::ExecutionEvent> = events
        .iter()
        .filter(|e| e.step_name == "flood" && event_type(e) == pb::EventType::StepLog)
        .collect();
    let note = flood_logs.last().unwrap();
    assert_eq!(
        (note.log_stream, note.attempt),
        (pb::LogStream::System as i32, 1),
        "the note is the attempt's last line"
    );
    let succeeded = step_events(&events, "flood").pop().unwrap();
    assert_eq!(event_type(succeeded), pb::EventType::StepSucceeded);
    assert!(note.sequence < succeeded.sequence);

    let wide = log_lines(&events, "wide", pb::LogStream::Stdout);
    assert_eq!(wide, [format!("{} [line cut]", "x".repeat(4096))]);
}

// --- Limits ----------------------------------------------------------------

#[tokio::test]
async fn an_output_over_the_size_limit_fails_the_step() {
    let app = spawn_app().await;
    app.create(&format!(
        "name: big\nsteps:\n\
         - name: big\n  command: {}\n\
         - {{name: after, needs: [big], noop: {{}}}}\n",
        sh(&big_output("big", 300 * 1024))
    ))
    .await;
    let execution = app.run("big", json!({"small": 1})).await;
    let events = app.events(&execution.id, 0).await;
    assert_gapless(&events, 1);
    let done = app.get(&execution.id).await;
    assert_eq!(status(&done), pb::ExecutionStatus::Failed);
    let big = step(&done, "big");
    assert_eq!(
        (step_status(big), big.error_kind.as_str()),
        (pb::StepStatus::Failed, "output_too_large")
    );
    assert!(big.error.contains("262144"), "{}", big.error);
    assert!(big.output.is_none());
    assert_eq!(step_status(step(&done, "after")), pb::StepStatus::Skipped);
    assert!(
        done.steps.iter().all(|s| !matches!(
            step_status(s),
            pb::StepStatus::Running | pb::StepStatus::Pending
        )),
        "nothing is left running: {:?}",
        done.steps
    );
    assert_eq!(to_json(&done.execution_data), json!({"small": 1}));
    let failed = step_events(&events, "big").pop().unwrap();
    assert_eq!(
        (event_type(failed), failed.error_kind.as_str()),
        (pb::EventType::StepFailed, "output_too_large")
    );
}

#[tokio::test]
async fn an_output_that_would_make_the_execution_data_too_large_fails_the_step() {
    let app = spawn_app().await;
    // Five outputs of 240 KiB each: the fifth takes the data over 1 MiB.
    let mut yaml = "name: heavy\nsteps:\n".to_string();
    for i in 1..=5 {
        let needs = if i == 1 {
            String::new()
        } else {
            format!("  needs: [s{}]\n", i - 1)
        };
        yaml += &format!(
            "- name: s{i}\n{needs}  command: {}\n",
            sh(&big_output(&format!("k{i}"), 240 * 1024))
        );
    }
    app.create(&yaml).await;
    let execution = app.run("heavy", json!({})).await;
    let done = app.finish(&execution.id).await;
    assert_eq!(status(&done), pb::ExecutionStatus::Failed);
    for i in 1..=4 {
        assert_eq!(
            step_status(step(&done, &format!("s{i}"))),
            pb::StepStatus::Succeeded
        );
    }
    let s5 = step(&done, "s5");
    assert_eq!(
        (step_status(s5), s5.error_kind.as_str()),
        (pb::StepStatus::Failed, "data_too_large")
    );
    assert!(s5.error.contains("execution data"), "{}", s5.error);
    let data = to_json(&done.execution_data);
    let keys: Vec<&String> = data.as_object().unwrap().keys().collect();
    assert_eq!(keys, ["k1", "k2", "k3", "k4"]);
}

#[tokio::test]
async fn oversized_or_too_deeply_nested_inputs_are_refused_and_the_server_keeps_serving() {
    let app = spawn_app().await;
    app.create("name: p\nsteps: [{name: a, noop: {}}]").await;

    let huge = run_error(&app, "p", json!({"blob": "x".repeat(600 * 1024)})).await;
    assert_eq!(huge.code(), Code::InvalidArgument, "{huge:?}");
    assert_eq!(violated_fields(&huge), ["input"], "{huge:?}");

    let deep = run_error(&app, "p", nested(33)).await;
    assert_eq!(deep.code(), Code::InvalidArgument, "{deep:?}");
    assert_eq!(violated_fields(&deep), ["input"], "{deep:?}");

    // At the limits, the input is taken.
    let at_limit = app.run("p", nested(32)).await;
    assert_eq!(
        status(&app.finish(&at_limit.id).await),
        pb::ExecutionStatus::Succeeded
    );
    let large = app.run("p", json!({"blob": "x".repeat(500 * 1024)})).await;
    assert_eq!(
        status(&app.finish(&large.id).await),
        pb::ExecutionStatus::Succeeded
    );
}

/// Protobuf decoding stops at 100 nested messages, and each level of a
/// `Struct` costs three (map entry, `Value`, `Struct`): from 34 levels on,
/// the request fails to decode before the server's own depth check runs.
/// tonic answers that with INTERNAL; the server turns it into
/// INVALID_ARGUMENT ("failed to decode Protobuf message: ... recursion limit
/// reached").
#[tokio::test]
async fn an_input_nested_far_beyond_the_limit_is_refused_as_invalid() {
    let app = spawn_app().await;
    app.create("name: p\nsteps: [{name: a, noop: {}}]").await;
    let deep = run_error(&app, "p", nested(40)).await;
    // The decoder refuses it before any field is read: no field violation,
    // but the right code and a message that says why.
    assert_eq!(deep.code(), Code::InvalidArgument, "{deep:?}");
    assert!(deep.message().contains("recursion limit"), "{deep:?}");
    let execution = app.run("p", json!({})).await;
    assert_eq!(
        status(&app.finish(&execution.id).await),
        pb::ExecutionStatus::Succeeded
    );
}

// --- Heartbeats ------------------------------------------------------------

#[tokio::test]
async fn idle_watch_streams_get_heartbeats_until_the_terminal_event() {
    let app = spawn_app_with(|config| config.heartbeat_interval = Duration::from_millis(200)).await;
    app.create("name: nap\nsteps: [{name: nap, sleep: {duration: 1500ms}}]")
        .await;
    let execution = app.run("nap", json!({})).await;
    let mut stream = app.watch(&execution.id, 0).await;
    let mut messages = Vec::new();
    tokio::time::timeout(PATIENCE, async {
        while let Some(message) = stream.message().await.expect("watch stream") {
            messages.push(message);
        }
    })
    .await
    .expect("the stream ends after the terminal event");

    assert!(
        messages
            .iter()
            .all(|m| m.event.is_some() != m.heartbeat.is_some()),
        "each message is an event or a heartbeat: {messages:#?}"
    );
    let last = messages.last().unwrap().event.as_ref().expect("an event");
    assert_eq!(event_type(last), pb::EventType::ExecutionSucceeded);
    let position = |kind: pb::EventType| {
        messages
            .iter()
            .position(|m| m.event.as_ref().is_some_and(|e| event_type(e) == kind))
            .unwrap()
    };
    let (started, succeeded) = (
        position(pb::EventType::StepStarted),
        position(pb::EventType::StepSucceeded),
    );
    let heartbeats: Vec<&pb::Heartbeat> = messages[started..succeeded]
        .iter()
        .filter_map(|m| m.heartbeat.as_ref())
        .collect();
    assert!(
        heartbeats.len() >= 3,
        "heartbeats while the step sleeps: {messages:#?}"
    );
    let from = millis(&messages[started].event.as_ref().unwrap().time);
    for heartbeat in heartbeats {
        assert!(millis(&heartbeat.time) >= from, "{heartbeat:?}");
    }
    let events: Vec<pb::ExecutionEvent> = messages.into_iter().filter_map(|m| m.event).collect();
    assert_gapless(&events, 1);

    // Watching all executions while nothing happens also gets heartbeats.
    let mut all = app
        .client
        .clone()
        .watch_executions(pb::WatchExecutionsRequest::default())
        .await
        .expect("watch all")
        .into_inner();
    let first = tokio::time::timeout(Duration::from_secs(5), all.message())
        .await
        .expect("a heartbeat in time")
        .expect("stream")
        .expect("a message");
    assert!(
        first.event.is_none() && first.heartbeat.is_some(),
        "{first:?}"
    );
}

#[tokio::test]
async fn a_manual_retry_gives_the_retry_policy_a_fresh_set_of_attempts() {
    let app = spawn_app().await;
    app.create(
        "name: fresh\nsteps:\n\
         - {name: a, retry: {max_attempts: 2, initial_interval: 10ms}, fail: {message: boom}}\n",
    )
    .await;
    let execution = app.run("fresh", json!({})).await;
    let first = app.finish(&execution.id).await;
    assert_eq!(step(&first, "a").attempt, 2);
    let mut client = app.client.clone();
    let retried = client
        .retry_execution(pb::RetryExecutionRequest {
            execution_id: execution.id.clone(),
            from_step: String::new(),
        })
        .await
        .unwrap()
        .into_inner()
        .execution
        .unwrap();
    let events = app.events(&execution.id, retried.last_sequence).await;
    let done = app.get(&execution.id).await;
    assert_eq!(status(&done), pb::ExecutionStatus::Failed);
    assert_eq!(
        step(&done, "a").attempt,
        4,
        "two more attempts after the retry"
    );
    let kinds: Vec<_> = events
        .iter()
        .filter(|e| e.step_name == "a")
        .map(|e| (event_type(e), e.attempt))
        .collect();
    assert_eq!(
        kinds,
        [
            (pb::EventType::StepStarted, 3),
            (pb::EventType::StepRetrying, 3),
            (pb::EventType::StepStarted, 4),
            (pb::EventType::StepFailed, 4),
        ]
    );
}

#[tokio::test]
async fn a_step_waiting_for_its_next_attempt_ends_failed_when_another_step_fails() {
    let app = spawn_app().await;
    app.create(
        "name: waiting\nsteps:\n\
         - {name: patient, retry: {max_attempts: 5, initial_interval: 30s}, fail: {message: not yet}}\n\
         - {name: doomed, command: {program: sh, args: [-c, 'sleep 0.3; exit 4']}}\n\
         - {name: later, needs: [patient], noop: {}}\n",
    )
    .await;
    let execution = app.run("waiting", json!({})).await;
    let done = tokio::time::timeout(Duration::from_secs(10), app.finish(&execution.id))
        .await
        .expect("the execution ends without waiting for the 30 s retry");
    assert_eq!(status(&done), pb::ExecutionStatus::Failed);
    assert!(
        done.error_message.contains("doomed"),
        "{}",
        done.error_message
    );
    let patient = step(&done, "patient");
    assert_eq!(
        (
            step_status(patient),
            patient.attempt,
            patient.error.as_str(),
            patient.error_kind.as_str()
        ),
        (pb::StepStatus::Failed, 1, "not yet", "failed")
    );
    assert!(
        patient
            .reason
            .starts_with("no further attempt: step 'doomed' failed"),
        "{}",
        patient.reason
    );
    assert!(patient.next_attempt_at.is_none());
    assert_eq!(step_status(step(&done, "later")), pb::StepStatus::Skipped);
}

#[tokio::test]
async fn nul_characters_are_refused_in_inputs_and_outputs_and_replaced_in_logs() {
    let app = spawn_app().await;
    app.create(
        "name: nul\nsteps:\n\
         - {name: noisy, command: {program: sh, args: [-c, \"printf 'a\\\\000b\\\\n' >&2; echo '{}'\"]}}\n\
         - {name: bad, needs: [noisy], command: {program: sh, args: [-c, 'echo \"{\\\"k\\\": \\\"x\\\\u0000y\\\"}\"']}}\n",
    )
    .await;
    let execution = app.run("nul", json!({})).await;
    let events = app.events(&execution.id, 0).await;
    let done = app.get(&execution.id).await;
    let line = events
        .iter()
        .find(|e| {
            event_type(e) == pb::EventType::StepLog
                && e.step_name == "noisy"
                && e.log_stream == pb::LogStream::Stderr as i32
        })
        .expect("the stderr line");
    assert_eq!(line.message, "a\u{FFFD}b");
    assert_eq!(step_status(step(&done, "noisy")), pb::StepStatus::Succeeded);
    let bad = step(&done, "bad");
    assert_eq!(
        (step_status(bad), bad.error_kind.as_str()),
        (pb::StepStatus::Failed, "invalid_output")
    );

    let refused = run_error(&app, "nul", json!({"k": "x\u{0}y"})).await;
    assert_eq!(refused.code(), Code::InvalidArgument);
    assert_eq!(violated_fields(&refused), ["input"]);
}
