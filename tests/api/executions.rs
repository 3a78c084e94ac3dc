//! Running executions: data flow, parallelism, failures, commands.

use pipelined::proto::v1 as pb;
use serde_json::json;

use crate::helpers::*;

#[tokio::test]
async fn run_records_trigger_labels_steps_and_progress() {
    let app = spawn_app().await;
    app.create("name: simple\nsteps:\n- {name: a, set: {values: {x: 1}}}\n- {name: b, needs: [a], noop: {}}\n").await;
    let started = app
        .client
        .clone()
        .run_pipeline(pb::RunPipelineRequest {
            pipeline_name: "simple".into(),
            input: Some(to_struct(json!({"sd_path": "/media/card"}))),
            trigger: Some(pb::Trigger {
                r#type: pb::TriggerType::Event as i32,
                data: Some(to_struct(json!({"signal": "sd_inserted"}))),
            }),
            correlation_id: "msg-42".into(),
            labels: [("team".to_string(), "video".to_string())].into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .execution
        .unwrap();
    assert_eq!(status(&started), pb::ExecutionStatus::Pending);
    assert_eq!(started.progress.unwrap().steps_total, 2);

    let done = app.finish(&started.id).await;
    assert_eq!(status(&done), pb::ExecutionStatus::Succeeded);
    assert_eq!(
        (done.pipeline_name.as_str(), done.pipeline_version),
        ("simple", 1)
    );
    assert_eq!(done.correlation_id, "msg-42");
    assert_eq!(done.labels["team"], "video");
    let trigger = done.trigger.clone().unwrap();
    assert_eq!(trigger.r#type, pb::TriggerType::Event as i32);
    assert_eq!(to_json(&trigger.data), json!({"signal": "sd_inserted"}));
    assert_eq!(to_json(&done.input), json!({"sd_path": "/media/card"}));
    assert_eq!(
        to_json(&done.execution_data),
        json!({"sd_path": "/media/card", "x": 1})
    );
    let progress = done.progress.unwrap();
    assert_eq!(
        (progress.steps_done, progress.steps_total, progress.percent),
        (2, 2, 100.0)
    );
    assert!(done.error_message.is_empty());
    assert!(millis(&done.created_at) <= millis(&done.started_at));
    assert!(millis(&done.started_at) <= millis(&done.finished_at));
    assert!(done.duration.is_some());
    let a = step(&done, "a");
    assert_eq!((step_status(a), a.attempt), (pb::StepStatus::Succeeded, 1));
    assert_eq!(to_json(&a.output), json!({"x": 1}));
    assert!(a.started_at.is_some() && a.finished_at.is_some() && a.duration.is_some());
    assert_eq!(step(&done, "b").needs, ["a"]);
    assert_eq!(
        done.last_sequence, 6,
        "started, 2 x (step started, succeeded), succeeded"
    );
}

#[tokio::test]
async fn independent_sleep_steps_overlap_in_time() {
    let app = spawn_app().await;
    app.create("name: parallel\nsteps:\n- {name: a, sleep: {duration: 400ms}}\n- {name: b, sleep: {duration: 400ms}}\n").await;
    app.create("name: serial\nmax_parallel_steps: 1\nsteps:\n- {name: a, sleep: {duration: 200ms}}\n- {name: b, sleep: {duration: 200ms}}\n").await;
    let parallel = app.run("parallel", json!({})).await;
    let serial = app.run("serial", json!({})).await;

    let parallel = app.finish(&parallel.id).await;
    let (a, b) = (step(&parallel, "a"), step(&parallel, "b"));
    assert!(
        millis(&a.started_at) < millis(&b.finished_at)
            && millis(&b.started_at) < millis(&a.finished_at),
        "a and b should run at the same time: {a:?} {b:?}"
    );

    // With max_parallel_steps: 1 the same shape runs one step at a time.
    let serial = app.finish(&serial.id).await;
    let (a, b) = (step(&serial, "a"), step(&serial, "b"));
    assert!(
        millis(&b.started_at) >= millis(&a.finished_at),
        "serial steps overlapped: {a:?} {b:?}"
    );
}

#[tokio::test]
async fn outputs_merge_deeply_and_the_later_step_in_order_wins() {
    let app = spawn_app().await;
    // Execution order: slow, w1, w2, reader (ties broken by file position).
    // w1 finishes after w2, yet w2 wins the key both write, every time.
    app.create(
        r#"
name: merge
steps:
- {name: slow, sleep: {duration: 300ms}}
- {name: w1, needs: [slow], set: {values: {winner: w1, nested: {from_w1: true}}}}
- {name: w2, set: {values: {winner: w2, nested: {from_w2: true}, list: [2]}}}
- name: reader
  needs: [w1, w2]
  command: {program: sh, args: [-c, 'read data; echo "{\"seen\": $data}"']}
"#,
    )
    .await;
    let execution = app
        .run(
            "merge",
            json!({"nested": {"from_input": 1}, "list": [1], "winner": "input"}),
        )
        .await;
    let done = app.finish(&execution.id).await;
    assert_eq!(
        status(&done),
        pb::ExecutionStatus::Succeeded,
        "{}",
        done.error_message
    );
    assert!(millis(&step(&done, "w1").finished_at) >= millis(&step(&done, "w2").finished_at));

    let expected = json!({
        "winner": "w2",
        "list": [2],
        "nested": {"from_input": 1, "from_w1": true, "from_w2": true},
    });
    // The reader got its input plus every ancestor's output, in order...
    assert_eq!(to_json(&step(&done, "reader").output)["seen"], expected);
    // ...and the execution data is the same merge plus the reader's output.
    let mut data = to_json(&done.execution_data);
    assert_eq!(
        data.as_object_mut().unwrap().remove("seen"),
        Some(expected.clone())
    );
    assert_eq!(data, expected);
}

#[tokio::test]
async fn a_failure_lets_running_steps_settle_then_skips_the_rest() {
    let app = spawn_app().await;
    app.create(
        r#"
name: failing
steps:
- {name: boom, fail: {message: disk on fire}}
- {name: running, sleep: {duration: 300ms}}
- {name: after_running, needs: [running], noop: {}}
- {name: after_boom, needs: [boom], noop: {}}
"#,
    )
    .await;
    let execution = app.run("failing", json!({})).await;
    let events = app.events(&execution.id, 0).await;
    let done = app.get(&execution.id).await;

    assert_eq!(status(&done), pb::ExecutionStatus::Failed);
    assert!(
        done.error_message
            .contains("step 'boom' failed: disk on fire"),
        "{}",
        done.error_message
    );
    assert_eq!(step(&done, "boom").error, "disk on fire");
    assert_eq!(step_status(step(&done, "boom")), pb::StepStatus::Failed);
    assert_eq!(
        step_status(step(&done, "running")),
        pb::StepStatus::Succeeded,
        "running steps finish"
    );
    for skipped in ["after_running", "after_boom"] {
        let s = step(&done, skipped);
        assert_eq!(step_status(s), pb::StepStatus::Skipped);
        assert!(s.reason.contains("boom"), "{}: {}", skipped, s.reason);
        assert_eq!(s.attempt, 0, "{skipped} never ran");
    }
    // The execution fails only after the running step settled.
    let last = events.last().unwrap();
    assert_eq!(event_type(last), pb::EventType::ExecutionFailed);
    let running_done = events
        .iter()
        .position(|e| e.step_name == "running" && event_type(e) == pb::EventType::StepSucceeded)
        .unwrap();
    assert!(running_done < events.len() - 1);
    assert_eq!(done.progress.unwrap().steps_done, 4);
}

#[tokio::test]
async fn command_steps_get_data_on_stdin_and_fail_with_stderr() {
    let app = spawn_app().await;
    app.create(&format!(
        r#"
name: commands
steps:
- name: echo
  command:
    program: sh
    args: [-c, 'read data; echo "noise"; echo "{{\"stdin\": $data, \"step\": \"$PIPELINED_STEP\", \"attempt\": $PIPELINED_ATTEMPT, \"greeting\": \"$GREETING\", \"cwd\": \"$(pwd)\"}}"']
    env: {{GREETING: hello}}
    working_dir: {}
- name: broken
  needs: [echo]
  command: {{program: sh, args: [-c, 'echo partial; echo "something went wrong" >&2; exit 3']}}
"#,
        app.dir().display()
    ))
    .await;
    let execution = app.run("commands", json!({"n": 7})).await;
    let done = app.finish(&execution.id).await;

    let echo = to_json(&step(&done, "echo").output);
    assert_eq!(echo["stdin"], json!({"n": 7}));
    assert_eq!(echo["step"], "echo");
    assert_eq!(echo["attempt"], 1);
    assert_eq!(echo["greeting"], "hello");
    assert_eq!(echo["cwd"], app.dir().display().to_string());

    let broken = step(&done, "broken");
    assert_eq!(step_status(broken), pb::StepStatus::Failed);
    assert_eq!(
        broken.error,
        "sh exited with status 3: something went wrong"
    );
    assert_eq!(status(&done), pb::ExecutionStatus::Failed);
}

#[tokio::test]
async fn a_step_timeout_fails_the_attempt() {
    let app = spawn_app().await;
    app.create("name: slow\nsteps:\n- {name: nap, timeout: 200ms, sleep: {duration: 10s}}\n")
        .await;
    let execution = app.run("slow", json!({})).await;
    let done = app.finish(&execution.id).await;
    let nap = step(&done, "nap");
    assert_eq!(step_status(nap), pb::StepStatus::Failed);
    assert_eq!(nap.error, "timed out after 200ms");
    assert_eq!(status(&done), pb::ExecutionStatus::Failed);
}

#[tokio::test]
async fn list_filters_by_pipeline_and_status_newest_first() {
    let app = spawn_app().await;
    app.create("name: good\nsteps: [{name: a, noop: {}}]").await;
    app.create("name: bad\nsteps: [{name: a, fail: {message: no}}]")
        .await;
    let mut ids = Vec::new();
    for name in ["good", "bad", "good", "good", "bad"] {
        let e = app.run(name, json!({})).await;
        app.finish(&e.id).await;
        ids.push((name, e.id));
    }
    let list = |pipeline_name: &str, statuses: Vec<i32>, page_size, page_token: String| {
        let mut client = app.client.clone();
        let request = pb::ListExecutionsRequest {
            pipeline_name: pipeline_name.into(),
            statuses,
            page_size,
            page_token,
            ..Default::default()
        };
        async move { client.list_executions(request).await.unwrap().into_inner() }
    };
    let all = list("", vec![], 0, String::new()).await;
    let newest_first: Vec<String> = ids.iter().rev().map(|(_, id)| id.clone()).collect();
    assert_eq!(
        all.executions
            .iter()
            .map(|e| e.id.clone())
            .collect::<Vec<_>>(),
        newest_first
    );
    assert!(all.next_page_token.is_empty());

    let good = list("good", vec![], 0, String::new()).await;
    assert_eq!(good.executions.len(), 3);
    assert!(good.executions.iter().all(|e| e.pipeline_name == "good"));
    let failed = list(
        "",
        vec![pb::ExecutionStatus::Failed as i32],
        0,
        String::new(),
    )
    .await;
    assert_eq!(failed.executions.len(), 2);
    assert!(failed.executions.iter().all(|e| e.pipeline_name == "bad"));

    let mut paged = Vec::new();
    let mut token = String::new();
    loop {
        let page = list("", vec![], 2, token).await;
        paged.extend(page.executions.into_iter().map(|e| e.id));
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
    }
    assert_eq!(paged, newest_first);
}
