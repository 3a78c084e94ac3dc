//! WatchExecution: stored then live events, no gap, no duplicate, resumable.

use pipelined::proto::v1 as pb;
use serde_json::json;

use crate::helpers::*;

const CHAIN: &str = "name: chain\nsteps:\n\
    - {name: s1, sleep: {duration: 100ms}}\n\
    - {name: s2, needs: [s1], sleep: {duration: 100ms}}\n\
    - {name: s3, needs: [s2], sleep: {duration: 100ms}}\n\
    - {name: s4, needs: [s3], set: {values: {done: true}}}\n";

fn summary(events: &[pb::ExecutionEvent]) -> Vec<(i64, i32, String)> {
    events
        .iter()
        .map(|e| (e.sequence, e.r#type, e.step_name.clone()))
        .collect()
}

#[tokio::test]
async fn a_full_watch_sees_every_event_once_then_closes() {
    let app = spawn_app().await;
    app.create(CHAIN).await;
    let execution = app.run("chain", json!({"k": 1})).await;
    let events = app.events(&execution.id, 0).await;

    assert_gapless(&events, 1);
    assert_eq!(
        events.len(),
        10,
        "started, 4 x (started, succeeded), succeeded"
    );
    assert_eq!(event_type(&events[0]), pb::EventType::ExecutionStarted);
    let last = events.last().unwrap();
    assert_eq!(event_type(last), pb::EventType::ExecutionSucceeded);
    assert_eq!(last.execution_status, pb::ExecutionStatus::Succeeded as i32);
    assert_eq!(to_json(&last.execution_data), json!({"k": 1, "done": true}));
    let s4 = events
        .iter()
        .find(|e| e.step_name == "s4" && event_type(e) == pb::EventType::StepSucceeded)
        .unwrap();
    assert_eq!(to_json(&s4.output), json!({"done": true}));
    assert!(s4.duration.is_some());
    let progress: Vec<i32> = events
        .iter()
        .map(|e| e.progress.unwrap().steps_done)
        .collect();
    assert_eq!(progress, [0, 0, 1, 1, 2, 2, 3, 3, 4, 4]);

    // Watching a finished execution replays the same log and closes.
    assert_eq!(
        summary(&app.events(&execution.id, 0).await),
        summary(&events)
    );
    // After the last event there is nothing more to send.
    assert!(app.events(&execution.id, last.sequence).await.is_empty());
}

#[tokio::test]
async fn a_watcher_that_reconnects_gets_exactly_the_missed_events() {
    let app = spawn_app().await;
    app.create(CHAIN).await;
    let execution = app.run("chain", json!({})).await;
    let reference_stream = app.watch(&execution.id, 0).await;
    let reference = tokio::spawn({
        async move {
            let mut stream = reference_stream;
            let mut events = Vec::new();
            while let Some(m) = stream.message().await.unwrap() {
                events.push(m.event.unwrap());
            }
            events
        }
    });

    // Read three events, then hang up mid-run.
    let first = app.wait_for(&execution.id, |e| e.sequence == 3).await;
    assert_eq!(
        status(&app.get(&execution.id).await),
        pb::ExecutionStatus::Running,
        "still running at the hang-up"
    );
    // Reconnect from the last sequence seen, while the execution is still running.
    let rest = app.events(&execution.id, 3).await;

    let reference = reference.await.unwrap();
    let mut joined = first.clone();
    joined.extend(rest.clone());
    assert_gapless(&joined, 1);
    assert_eq!(summary(&joined), summary(&reference));
    assert_eq!(rest.first().unwrap().sequence, 4);
}

#[tokio::test]
async fn concurrent_watchers_all_see_the_same_log() {
    let app = spawn_app().await;
    app.create(CHAIN).await;
    let execution = app.run("chain", json!({})).await;
    let watchers = (0..20).map(|_| app.events(&execution.id, 0));
    let logs = futures::future::join_all(watchers).await;
    for log in &logs {
        assert_gapless(log, 1);
        assert_eq!(summary(log), summary(&logs[0]));
    }
}

#[tokio::test]
async fn a_watcher_that_stops_reading_does_not_hold_anyone_up() {
    let app = spawn_app().await;
    // 300 parallel steps make ~600 events, more than the live buffer and the
    // stream buffer together, so the idle watcher falls behind.
    let steps: String = (0..300)
        .map(|i| format!("- {{name: s{i}, noop: {{}}}}\n"))
        .collect();
    app.create(&format!(
        "name: wide\nmax_parallel_steps: 64\nsteps:\n{steps}"
    ))
    .await;
    let execution = app.run("wide", json!({})).await;
    let mut idle = app.watch(&execution.id, 0).await;

    // The execution and an attentive watcher finish while the idle one sleeps.
    let events = app.events(&execution.id, 0).await;
    assert_eq!(events.len(), 602);
    assert_eq!(
        status(&app.get(&execution.id).await),
        pb::ExecutionStatus::Succeeded
    );

    // The idle watcher then catches up with nothing lost or repeated.
    let mut late = Vec::new();
    while let Some(m) = idle.message().await.unwrap() {
        late.push(m.event.unwrap());
    }
    assert_gapless(&late, 1);
    assert_eq!(summary(&late), summary(&events));
}

#[tokio::test]
async fn a_watch_that_starts_past_the_end_closes_with_the_execution() {
    let app = spawn_app().await;
    app.create(CHAIN).await;
    let execution = app.run("chain", json!({})).await;
    assert!(app.events(&execution.id, 1000).await.is_empty());
}
