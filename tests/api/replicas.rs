//! Several replicas of the real binary on one PostgreSQL database. These
//! tests need PostgreSQL (`PIPELINED_TEST_POSTGRES_URL`, which the test
//! command sets for its second run); on SQLite they return at once, since
//! SQLite serves one server only.

use std::path::Path;
use std::time::Duration;

use pipelined::proto::v1 as pb;
use serde_json::json;
use tempfile::TempDir;
use tokio_stream::StreamExt;

use crate::helpers::*;
use crate::process::{ServerProcess, create, get, run, watch_to_end};

/// The lease the replicas run with: how soon a dead one's work moves.
const LEASE: &str = "1s";

/// `count` replicas on one fresh PostgreSQL database, each with its own
/// data directory under `dir`; `None` without PostgreSQL.
async fn replicas(dir: &Path, count: usize) -> Option<Vec<ServerProcess>> {
    let url = test_database(dir).await?;
    let mut servers = Vec::new();
    for i in 0..count {
        let data = dir.join(format!("replica-{i}"));
        servers
            .push(ServerProcess::start(&data, &["--database-url", &url, "--lease", LEASE]).await);
    }
    Some(servers)
}

/// A shell script (to put in single quotes in YAML) that waits for `gate`.
fn gate_script(gate: &Path) -> String {
    format!(
        "while [ ! -e {} ]; do sleep 0.02; done; echo ''{{\"waited\": true}}''",
        gate.display()
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_killed_replicas_executions_finish_on_the_others_and_watchers_elsewhere_miss_nothing() {
    let dir = TempDir::new().unwrap();
    let Some(mut servers) = replicas(dir.path(), 3).await else {
        eprintln!("needs PostgreSQL: skipped on SQLite, which serves one server only");
        return;
    };
    let gate = dir.path().join("gate");
    let a = servers.remove(0);
    let (b, c) = (&servers[0], &servers[1]);
    let yaml = format!(
        "name: moving\nsteps:\n\
         - {{name: first, set: {{values: {{first: true}}}}}}\n\
         - {{name: held, needs: [first], command: {{program: sh, args: [-c, '{}']}}}}\n\
         - {{name: last, needs: [held], set: {{values: {{last: true}}}}}}\n",
        gate_script(&gate)
    );
    create(&a.client(), pipeline(&yaml)).await;
    // Completions of the pipeline, watched through C, whichever replica
    // ends up running each execution.
    let mut completions = c
        .client()
        .watch_executions(pb::WatchExecutionsRequest {
            pipeline_name: "moving".into(),
            types: vec![pb::EventType::ExecutionSucceeded as i32],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    // Started through A, watched through B.
    let mut ids = Vec::new();
    for n in 0..6 {
        let execution = run(&a.client(), "moving", json!({"n": n})).await;
        ids.push(execution.id);
    }
    let mut watchers = Vec::new();
    for id in &ids {
        let client = b.client();
        let id = id.clone();
        watchers.push(tokio::spawn(
            async move { watch_to_end(&client, &id, 0).await },
        ));
    }
    // Every execution is in its held step on A.
    let deadline = tokio::time::Instant::now() + PATIENCE;
    for id in &ids {
        loop {
            let execution = get(&c.client(), id).await;
            if step_status(step(&execution, "held")) == pb::StepStatus::Running {
                break;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "the held step of {id} never ran"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    a.kill().await;
    std::fs::write(&gate, "").unwrap();

    for (id, watcher) in ids.iter().zip(watchers) {
        let events = watcher.await.unwrap();
        assert_gapless(&events, 1);
        let last = events.last().unwrap();
        assert_eq!(event_type(last), pb::EventType::ExecutionSucceeded, "{id}");
        let done = get(&c.client(), id).await;
        assert_eq!(done.last_sequence, last.sequence);
        assert_eq!(
            step(&done, "first").attempt,
            1,
            "succeeded steps are not re-run"
        );
        assert_eq!(
            step(&done, "held").attempt,
            2,
            "the interrupted step ran again"
        );
        assert_eq!(
            to_json(&done.execution_data),
            json!({"n": ids.iter().position(|i| i == id).unwrap(), "first": true, "waited": true, "last": true})
        );
    }
    let mut completed = Vec::new();
    tokio::time::timeout(PATIENCE, async {
        while completed.len() < ids.len() {
            let message = completions.next().await.expect("the stream stays open");
            if let Some(event) = message.expect("watch all").event {
                assert_eq!(event.pipeline_name, "moving");
                completed.push(event.execution_id);
            }
        }
    })
    .await
    .expect("every completion reaches the watcher on C");
    completed.sort();
    let mut expected = ids.clone();
    expected.sort();
    assert_eq!(completed, expected);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn caps_and_request_ids_hold_across_replicas() {
    let dir = TempDir::new().unwrap();
    let Some(servers) = replicas(dir.path(), 3).await else {
        eprintln!("needs PostgreSQL: skipped on SQLite, which serves one server only");
        return;
    };
    let gate = dir.path().join("gate");
    create(
        &servers[0].client(),
        pipeline(&format!(
            "name: one-at-a-time\nconcurrency: {{max_active: 1, mode: reject}}\nsteps:\n\
                 - {{name: hold, command: {{program: sh, args: [-c, '{}']}}}}\n",
            gate_script(&gate)
        )),
    )
    .await;
    // 30 racing runs, 10 through each replica: exactly one is admitted.
    let mut calls = Vec::new();
    for i in 0..30 {
        let client = servers[i % 3].client();
        calls.push(tokio::spawn(async move {
            client
                .clone()
                .run_pipeline(pb::RunPipelineRequest {
                    pipeline_name: "one-at-a-time".into(),
                    input: Some(to_struct(json!({"i": i}))),
                    ..Default::default()
                })
                .await
        }));
    }
    let mut admitted = Vec::new();
    for call in calls {
        match call.await.unwrap() {
            Ok(response) => admitted.push(response.into_inner().execution.unwrap().id),
            Err(status) => assert_eq!(status.code(), tonic::Code::ResourceExhausted, "{status:?}"),
        }
    }
    assert_eq!(admitted.len(), 1, "exactly one run passes a cap of 1");

    // 30 racing runs with one request id, 10 through each replica: one execution.
    create(
        &servers[0].client(),
        pipeline("name: once\nsteps:\n- {name: a, noop: {}}\n"),
    )
    .await;
    let mut calls = Vec::new();
    for i in 0..30 {
        let client = servers[i % 3].client();
        calls.push(tokio::spawn(async move {
            client
                .clone()
                .run_pipeline(pb::RunPipelineRequest {
                    pipeline_name: "once".into(),
                    request_id: "order-7".into(),
                    ..Default::default()
                })
                .await
                .unwrap()
                .into_inner()
                .execution
                .unwrap()
                .id
        }));
    }
    let mut ids = Vec::new();
    for call in calls {
        ids.push(call.await.unwrap());
    }
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), 1, "one execution for one request id: {ids:?}");
    std::fs::write(&gate, "").unwrap();
    let events = watch_to_end(&servers[2].client(), &admitted[0], 0).await;
    assert_eq!(
        event_type(events.last().unwrap()),
        pb::EventType::ExecutionSucceeded
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn cancel_pause_and_resume_work_through_a_replica_that_does_not_run_the_execution() {
    let dir = TempDir::new().unwrap();
    let Some(servers) = replicas(dir.path(), 2).await else {
        eprintln!("needs PostgreSQL: skipped on SQLite, which serves one server only");
        return;
    };
    let gate = dir.path().join("gate");
    let (a, b) = (&servers[0], &servers[1]);
    create(
        &a.client(),
        pipeline(&format!(
            "name: remote\nsteps:\n\
                 - {{name: held, command: {{program: sh, args: [-c, '{}']}}}}\n\
                 - {{name: after, needs: [held], noop: {{}}}}\n",
            gate_script(&gate)
        )),
    )
    .await;
    let id = run(&a.client(), "remote", json!({})).await.id;
    let mut remote = b.client();
    let paused = remote
        .pause_execution(pb::PauseExecutionRequest {
            execution_id: id.clone(),
        })
        .await
        .expect("pause through the other replica")
        .into_inner()
        .execution
        .unwrap();
    assert_eq!(status(&paused), pb::ExecutionStatus::Paused);
    // Asking again changes nothing, and resuming a paused one works.
    let again = remote
        .pause_execution(pb::PauseExecutionRequest {
            execution_id: id.clone(),
        })
        .await
        .unwrap()
        .into_inner()
        .execution
        .unwrap();
    assert_eq!(again.last_sequence, paused.last_sequence);
    let resumed = remote
        .resume_execution(pb::ResumeExecutionRequest {
            execution_id: id.clone(),
        })
        .await
        .expect("resume through the other replica")
        .into_inner()
        .execution
        .unwrap();
    assert_eq!(status(&resumed), pb::ExecutionStatus::Running);
    let cancelling = remote
        .cancel_execution(pb::CancelExecutionRequest {
            execution_id: id.clone(),
            mode: pb::CancelMode::Terminate as i32,
        })
        .await
        .expect("cancel through the other replica")
        .into_inner()
        .execution
        .unwrap();
    assert!(
        matches!(
            status(&cancelling),
            pb::ExecutionStatus::Terminating | pb::ExecutionStatus::Cancelled
        ),
        "{:?}",
        status(&cancelling)
    );
    let events = watch_to_end(&b.client(), &id, 0).await;
    assert_gapless(&events, 1);
    let kinds: Vec<_> = events.iter().map(event_type).collect();
    for kind in [
        pb::EventType::ExecutionPaused,
        pb::EventType::ExecutionResumed,
        pb::EventType::ExecutionCancelRequested,
        pb::EventType::ExecutionCancelled,
    ] {
        assert!(kinds.contains(&kind), "{kind:?} in {kinds:?}");
    }
    // A request that is illegal where the execution is gets the same answer
    // on any replica.
    let refused = remote
        .resume_execution(pb::ResumeExecutionRequest { execution_id: id })
        .await
        .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::FailedPrecondition);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_frozen_replica_that_lost_its_lease_cannot_write_when_it_wakes_up() {
    use nix::sys::signal::Signal;
    let dir = TempDir::new().unwrap();
    let Some(servers) = replicas(dir.path(), 2).await else {
        eprintln!("needs PostgreSQL: skipped on SQLite, which serves one server only");
        return;
    };
    let gate = dir.path().join("gate");
    let (a, b) = (&servers[0], &servers[1]);
    create(
        &a.client(),
        pipeline(&format!(
            "name: frozen\nsteps:\n\
                 - {{name: held, command: {{program: sh, args: [-c, '{}']}}}}\n\
                 - {{name: after, needs: [held], set: {{values: {{after: true}}}}}}\n",
            gate_script(&gate)
        )),
    )
    .await;
    let id = run(&a.client(), "frozen", json!({})).await.id;
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while step_status(step(&get(&b.client(), &id).await, "held")) != pb::StepStatus::Running {
        assert!(tokio::time::Instant::now() < deadline, "held never ran");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // A stops renewing; B takes the execution over and starts attempt 2.
    a.signal(Signal::SIGSTOP);
    while step(&get(&b.client(), &id).await, "held").attempt < 2 {
        assert!(tokio::time::Instant::now() < deadline, "B never took over");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    std::fs::write(&gate, "").unwrap();
    let events = watch_to_end(&b.client(), &id, 0).await;
    // A wakes up: its attempt 1 ends too, but nothing it writes may land.
    a.signal(Signal::SIGCONT);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let done = get(&b.client(), &id).await;
    assert_gapless(&events, 1);
    assert_eq!(
        event_type(events.last().unwrap()),
        pb::EventType::ExecutionSucceeded
    );
    assert_eq!(
        done.last_sequence,
        events.last().unwrap().sequence,
        "the woken replica added nothing to the log"
    );
    assert_eq!(status(&done), pb::ExecutionStatus::Succeeded);
    assert_eq!(step(&done, "held").attempt, 2);
}
