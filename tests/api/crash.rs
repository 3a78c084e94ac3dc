//! Crash recovery with the real binary: the server is killed with SIGKILL
//! while steps run, then started again on the same database.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use pipelined::proto::v1 as pb;
use serde_json::{Value, json};
use tempfile::TempDir;
use tokio::sync::mpsc;

use crate::helpers::*;
use crate::process::{ServerProcess, create, get, run, watch};

const EXECUTIONS: usize = 8;
const STEPS: [&str; 4] = ["a", "b", "c", "d"];

/// The pipeline `a -> {b, c} -> d` of `sh -c` steps. Every attempt appends
/// `"<step> <attempt>"` to `<dir>/<execution id>.steps`; `b`, and `c` when
/// the input has `"hold_c": true`, then wait for the file `<dir>/gate`, so
/// that they are certainly running when the server is killed (no sleep has
/// to be long enough). Every step then sleeps briefly and prints
/// `{"<step>": <attempt>}`.
fn crash_pipeline(dir: &Path) -> pb::Pipeline {
    let dir = dir.display();
    let record = format!(
        r#"echo "$PIPELINED_STEP $PIPELINED_ATTEMPT" >> '{dir}'/"$PIPELINED_EXECUTION_ID".steps"#
    );
    // Bounded (30 s), so that held attempts orphaned by the SIGKILL end
    // even if the test fails before it opens the gate.
    let hold = format!(
        "i=0; while [ ! -e '{dir}/gate' ] && [ $i -lt 600 ]; do sleep 0.05; i=$((i + 1)); done"
    );
    let output = r#"sleep 0.1; echo "{\"$PIPELINED_STEP\": $PIPELINED_ATTEMPT}""#;
    let command = |middle: String| {
        let script = format!("{record}; {middle}{output}");
        json!({"program": "sh", "args": ["-c", script]})
    };
    let spec = json!({
        "name": "crash",
        "steps": [
            {"name": "a", "command": command(String::new())},
            {"name": "b", "needs": ["a"], "command": command(format!("{hold}; "))},
            {"name": "c", "needs": ["a"], "command": command(format!(
                r#"read -r input; case "$input" in *'"hold_c":true'*) {hold};; esac; "#
            ))},
            {"name": "d", "needs": ["b", "c"], "command": command(String::new())},
        ]
    });
    pipeline(&spec.to_string())
}

/// One execution of the crash pipeline and what its watcher saw.
struct Run {
    id: String,
    input: Value,
    hold_c: bool,
    before_kill: Vec<pb::ExecutionEvent>,
}

impl Run {
    /// True once the execution can make no more progress until the gate
    /// opens: `a` succeeded, `b` running, and `c` running if held, else
    /// succeeded.
    fn held(&self) -> bool {
        let states = step_states(&self.before_kill);
        let state = |name: &str| states.get(name).map(|&(kind, _)| kind);
        let c = if self.hold_c {
            pb::EventType::StepStarted
        } else {
            pb::EventType::StepSucceeded
        };
        state("a") == Some(pb::EventType::StepSucceeded)
            && state("b") == Some(pb::EventType::StepStarted)
            && state("c") == Some(c)
    }
}

/// Each step's last event type and attempt in `events`.
fn step_states(events: &[pb::ExecutionEvent]) -> BTreeMap<String, (pb::EventType, i32)> {
    events
        .iter()
        .filter(|e| !e.step_name.is_empty())
        .map(|e| (e.step_name.clone(), (event_type(e), e.attempt)))
        .collect()
}

/// `#4 StepStarted b#1`, one per event, for failure messages.
fn summary(events: &[pb::ExecutionEvent]) -> Vec<String> {
    events
        .iter()
        .map(|e| {
            format!(
                "#{} {:?} {}#{}",
                e.sequence,
                event_type(e),
                e.step_name,
                e.attempt
            )
        })
        .collect()
}

/// The `"<step> <attempt>"` lines the execution's commands wrote.
fn step_log(dir: &Path, id: &str) -> Vec<String> {
    std::fs::read_to_string(dir.join(format!("{id}.steps")))
        .unwrap_or_default()
        .lines()
        .map(str::to_string)
        .collect()
}

/// Every event after `after` until the stream closes after the terminal one.
async fn events_after(client: &Client, id: &str, after: i64) -> Vec<pb::ExecutionEvent> {
    let mut stream = watch(client, id, after).await;
    let mut events = Vec::new();
    tokio::time::timeout(PATIENCE, async {
        while let Some(message) = stream.message().await.expect("watch stream") {
            events.push(message.event.unwrap());
        }
    })
    .await
    .unwrap_or_else(|_| panic!("execution {id} finishes in time: {:?}", summary(&events)));
    events
}

#[tokio::test]
async fn sigkill_mid_run_then_restart_finishes_every_execution_without_losing_or_repeating_events()
{
    let dir = TempDir::new().expect("temp dir");
    let data = dir.path().join("data");
    let server = ServerProcess::start(&data, &[]).await;
    let client = server.client();
    create(&client, crash_pipeline(dir.path())).await;

    let mut runs = Vec::new();
    for n in 0..EXECUTIONS {
        let hold_c = n % 2 == 0;
        let input = json!({"n": n, "hold_c": hold_c});
        let execution = run(&client, "crash", input.clone()).await;
        runs.push(Run {
            id: execution.id,
            input,
            hold_c,
            before_kill: Vec::new(),
        });
    }

    // One watcher per execution, all feeding one channel until the
    // connection dies with the server.
    let (events_tx, mut events_rx) = mpsc::unbounded_channel();
    for (k, run) in runs.iter().enumerate() {
        let mut stream = watch(&client, &run.id, 0).await;
        let events_tx = events_tx.clone();
        tokio::spawn(async move {
            while let Ok(Some(message)) = stream.message().await {
                let _ = events_tx.send((k, message.event.expect("event")));
            }
        });
    }
    drop(events_tx);
    tokio::time::timeout(PATIENCE, async {
        while !runs.iter().all(Run::held) {
            let (k, event) = events_rx
                .recv()
                .await
                .expect("watch streams stay open while the steps are held");
            runs[k].before_kill.push(event);
        }
    })
    .await
    .expect("every execution gets to its held steps");

    server.kill().await;
    // The streams break with the connection; keep all they delivered.
    tokio::time::timeout(PATIENCE, async {
        while let Some((k, event)) = events_rx.recv().await {
            runs[k].before_kill.push(event);
        }
    })
    .await
    .expect("watch streams end when the server dies");
    for run in &runs {
        assert!(
            run.held(),
            "no step finished between the held state and the kill: {:?}",
            summary(&run.before_kill)
        );
    }
    // Opening the gate lets the orphaned attempts end (they find no one
    // reading their stdout) and the next attempts run without waiting.
    std::fs::write(dir.path().join("gate"), "").expect("open the gate");

    let server = ServerProcess::start(&data, &[]).await;
    let client = server.client();
    let (mut rerun, mut kept) = (0, 0);
    for run in &runs {
        let id = &run.id;
        let last_seen = run.before_kill.last().expect("events before the kill");
        let after = events_after(&client, id, last_seen.sequence).await;
        let events: Vec<_> = run.before_kill.iter().chain(&after).cloned().collect();
        let context = format!(
            "execution {id} ({}) on {}: {:?}",
            run.input,
            server.addr(),
            summary(&events)
        );
        assert_gapless(&events, 1);
        assert_eq!(
            events.last().map(event_type),
            Some(pb::EventType::ExecutionSucceeded),
            "{context}"
        );
        let done = get(&client, id).await;
        assert_eq!(
            status(&done),
            pb::ExecutionStatus::Succeeded,
            "{}; {context}",
            done.error_message
        );
        assert_eq!(done.last_sequence, events.len() as i64, "{context}");

        let at_kill = step_states(&run.before_kill);
        let log = step_log(dir.path(), id);
        let mut expected_data = run.input.clone();
        for name in STEPS {
            let context = format!("step {name}; log {log:?}; {context}");
            // The attempts the step's command recorded, in order.
            let logged: Vec<&str> = log
                .iter()
                .filter_map(|line| line.strip_prefix(name)?.strip_prefix(' '))
                .collect();
            let after_kill: Vec<_> = after
                .iter()
                .filter(|e| e.step_name == name && event_type(e) != pb::EventType::StepLog)
                .map(|e| (event_type(e), e.attempt))
                .collect();
            let ran_once_after_the_kill = |attempt| {
                assert_eq!(
                    after_kill,
                    [
                        (pb::EventType::StepStarted, attempt),
                        (pb::EventType::StepSucceeded, attempt)
                    ],
                    "{context}"
                );
            };
            let attempt = match at_kill.get(name) {
                Some(&(pb::EventType::StepSucceeded, 1)) => {
                    kept += 1;
                    assert_eq!(after_kill, [], "not run again: {context}");
                    assert_eq!(logged, ["1"], "ran exactly once: {context}");
                    1
                }
                Some(&(pb::EventType::StepStarted, 1)) => {
                    rerun += 1;
                    ran_once_after_the_kill(2);
                    // At least once: the orphaned first attempt may go on.
                    assert!(logged.contains(&"1"), "{context}");
                    assert_eq!(
                        logged.iter().filter(|&&a| a != "1").collect::<Vec<_>>(),
                        [&"2"],
                        "{context}"
                    );
                    2
                }
                None => {
                    ran_once_after_the_kill(1);
                    assert_eq!(logged, ["1"], "{context}");
                    1
                }
                Some(other) => panic!("unexpected state {other:?} at the kill: {context}"),
            };
            let step_run = step(&done, name);
            assert_eq!(
                (step_status(step_run), step_run.attempt),
                (pb::StepStatus::Succeeded, attempt),
                "{context}"
            );
            assert_eq!(
                to_json(&step_run.output),
                json!({ name: attempt }),
                "{context}"
            );
            expected_data[name] = json!(attempt);
        }
        assert_eq!(to_json(&done.execution_data), expected_data, "{context}");
    }
    // b of every execution and c of half of them were cut off; a of every
    // execution and the other c's had finished.
    assert_eq!((rerun, kept), (EXECUTIONS * 3 / 2, EXECUTIONS * 3 / 2));

    let exit = server.terminate().await;
    assert!(exit.success(), "SIGTERM ends the server cleanly: {exit}");
}

/// Kills the process group led by a pid on drop, if it is still there.
struct KillGroupOnDrop(i32);

impl Drop for KillGroupOnDrop {
    fn drop(&mut self) {
        if !process_gone(self.0) {
            let _ = killpg(Pid::from_raw(self.0), Signal::SIGKILL);
        }
    }
}

#[tokio::test]
async fn a_step_process_orphaned_by_sigkill_is_killed_when_the_server_restarts() {
    let dir = TempDir::new().expect("temp dir");
    let data = dir.path().join("data");
    let server = ServerProcess::start(&data, &[]).await;
    let client = server.client();
    let pid_file = dir.path().join("pid.1");
    let script = format!(
        r#"echo $$ > '{}'/pid.$PIPELINED_ATTEMPT; if [ "$PIPELINED_ATTEMPT" = 1 ]; then sleep 60; fi; echo '{{"done": true}}'"#,
        dir.path().display()
    );
    let spec = json!({
        "name": "orphan",
        "steps": [{"name": "work", "command": {"program": "sh", "args": ["-c", script]}}]
    });
    create(&client, pipeline(&spec.to_string())).await;
    let execution = run(&client, "orphan", json!({})).await;
    let read_pid = || {
        std::fs::read_to_string(&pid_file)
            .ok()
            .and_then(|s| s.trim().parse::<i32>().ok())
    };
    wait_until("the first attempt writes its pid", || read_pid().is_some()).await;
    let pid = read_pid().unwrap();
    let _cleanup = KillGroupOnDrop(pid);
    // The server records the group just after starting it; the program can
    // be quicker to write its pid than the server to write that record.
    let record = data.join("processes").join(pid.to_string());
    wait_until("the server records the attempt's process group", || {
        record.exists()
    })
    .await;

    server.kill().await;
    assert!(
        !process_gone(pid),
        "the step's process group (pid {pid}) outlives the server's SIGKILL"
    );

    let server = ServerProcess::start(&data, &[]).await;
    wait_until_within(
        Duration::from_secs(5),
        &format!("the restarted server has killed the orphaned attempt (pid {pid})"),
        || process_gone(pid),
    )
    .await;
    let client = server.client();
    let events = events_after(&client, &execution.id, 0).await;
    assert_gapless(&events, 1);
    let done = get(&client, &execution.id).await;
    assert_eq!(status(&done), pb::ExecutionStatus::Succeeded);
    assert_eq!(step(&done, "work").attempt, 2);
    assert!(server.terminate().await.success());
}
