//! `when` conditions and the README's resilient example.

use serde_json::json;
use tonic_types::StatusExt;

use crate::helpers::*;
use pipelined::proto::v1 as pb;

#[tokio::test]
async fn a_false_condition_skips_the_step_and_its_dependents_still_run() {
    let app = spawn_app().await;
    app.create(
        "name: cond\nsteps:\n\
         - {name: count, set: {values: {rows: 3, source: {table: orders}}}}\n\
         - {name: publish, needs: [count], when: \"data.rows > 2 && data.source.table == 'orders'\", set: {values: {published: true}}}\n\
         - {name: alert, needs: [count], when: \"data.rows == 0 || input.force == true\", set: {values: {alerted: true}}}\n\
         - {name: after-alert, needs: [alert], set: {values: {after: true}}}\n",
    )
    .await;
    let done = app
        .finish(&app.run("cond", json!({"force": false})).await.id)
        .await;
    assert_eq!(status(&done), pb::ExecutionStatus::Succeeded);
    assert_eq!(
        step_status(step(&done, "publish")),
        pb::StepStatus::Succeeded
    );
    let alert = step(&done, "alert");
    assert_eq!(
        (step_status(alert), alert.attempt),
        (pb::StepStatus::Skipped, 0)
    );
    assert_eq!(
        alert.reason,
        "condition is false: data.rows == 0 || input.force == true"
    );
    assert_eq!(
        step_status(step(&done, "after-alert")),
        pb::StepStatus::Succeeded,
        "a step that needs a skipped step still runs"
    );
    assert_eq!(
        to_json(&done.execution_data),
        json!({"force": false, "rows": 3, "source": {"table": "orders"}, "published": true, "after": true})
    );

    // The same pipeline with `force` takes the other branch.
    let forced = app
        .finish(&app.run("cond", json!({"force": true})).await.id)
        .await;
    assert_eq!(
        step_status(step(&forced, "alert")),
        pb::StepStatus::Succeeded
    );
}

#[tokio::test]
async fn a_condition_that_cannot_be_evaluated_fails_the_step_without_retrying() {
    let app = spawn_app().await;
    app.create(
        "name: bad-cond\ndefault_retry: {max_attempts: 3, initial_interval: 10ms}\nsteps:\n\
         - {name: a, when: \"data.missing > 1\", noop: {}}\n\
         - {name: b, when: \"'text'\", noop: {}}\n",
    )
    .await;
    let done = app.finish(&app.run("bad-cond", json!({})).await.id).await;
    assert_eq!(status(&done), pb::ExecutionStatus::Failed);
    let a = step(&done, "a");
    assert_eq!(
        (step_status(a), a.error_kind.as_str(), a.attempt),
        (pb::StepStatus::Failed, "condition", 1)
    );
    assert!(a.error.contains("missing"), "{}", a.error);
    let b = step(&done, "b");
    assert_eq!(step_status(b), pb::StepStatus::Failed);
    assert!(b.error.contains("bool"), "{}", b.error);
}

#[tokio::test]
async fn a_condition_with_a_syntax_error_is_refused_with_its_field() {
    let app = spawn_app().await;
    let error = app
        .client
        .clone()
        .create_pipeline(pb::CreatePipelineRequest {
            pipeline: Some(pipeline(
                "name: p\nsteps:\n- {name: a, noop: {}}\n- {name: b, when: \"data.rows >\", noop: {}}\n",
            )),
        })
        .await
        .unwrap_err();
    assert_eq!(error.code(), tonic::Code::InvalidArgument);
    let violations = error
        .get_error_details()
        .bad_request()
        .expect("bad request details")
        .field_violations
        .clone();
    assert_eq!(violations.len(), 1, "{violations:?}");
    assert_eq!(violations[0].field, "pipeline.steps[1].when");
}

#[tokio::test]
async fn the_resilient_example_retries_survives_its_optional_failure_and_branches() {
    let app = spawn_app().await;
    let path = format!("{}/examples/resilient.yaml", env!("CARGO_MANIFEST_DIR"));
    app.create(&std::fs::read_to_string(&path).unwrap()).await;
    let execution = app.run("resilient", json!({})).await;
    let events = app.events(&execution.id, 0).await;
    assert_gapless(&events, 1);
    let done = app.get(&execution.id).await;
    assert_eq!(
        status(&done),
        pb::ExecutionStatus::Succeeded,
        "{}",
        done.error_message
    );
    let flaky = step(&done, "flaky");
    assert_eq!(
        (step_status(flaky), flaky.attempt),
        (pb::StepStatus::Succeeded, 3)
    );
    let retrying = events
        .iter()
        .filter(|e| event_type(e) == pb::EventType::StepRetrying && e.step_name == "flaky")
        .count();
    assert_eq!(retrying, 2);
    let cleanup = step(&done, "cleanup");
    assert_eq!(
        (
            step_status(cleanup),
            cleanup.attempt,
            cleanup.error.as_str()
        ),
        (pb::StepStatus::Failed, 3, "the cleanup service is down")
    );
    assert_eq!(
        step_status(step(&done, "publish")),
        pb::StepStatus::Succeeded
    );
    assert_eq!(
        step_status(step(&done, "alert-empty")),
        pb::StepStatus::Skipped
    );
    assert_eq!(
        to_json(&done.execution_data),
        json!({"rows": 42, "published": true})
    );
}
