//! Pipeline definitions: create, get, list, update, delete.

use pipelined::proto::v1 as pb;
use serde_json::json;
use tonic::Code;

use crate::helpers::*;

const SIMPLE: &str =
    "name: simple\ndescription: one step\nsteps:\n- name: only\n  set: {values: {v: 1}}\n";

#[tokio::test]
async fn create_get_update_and_list_versions() {
    let app = spawn_app().await;
    let mut client = app.client.clone();

    let created = app.create(SIMPLE).await;
    assert_eq!((created.name.as_str(), created.version), ("simple", 1));
    assert_eq!(created.description, "one step");
    assert!(created.created_at.is_some());

    let again = client
        .create_pipeline(pb::CreatePipelineRequest {
            pipeline: Some(pipeline(SIMPLE)),
        })
        .await
        .unwrap_err();
    assert_eq!(again.code(), Code::AlreadyExists);

    let updated = client
        .update_pipeline(pb::UpdatePipelineRequest {
            pipeline: Some(pipeline("name: simple\nsteps:\n- {name: only, set: {values: {v: 2}}}\n- {name: more, noop: {}}\n")),
        })
        .await
        .unwrap()
        .into_inner()
        .pipeline
        .unwrap();
    assert_eq!(updated.version, 2);
    assert_eq!(updated.steps.len(), 2);

    let latest = client
        .get_pipeline(pb::GetPipelineRequest {
            name: "simple".into(),
            version: 0,
        })
        .await
        .unwrap()
        .into_inner()
        .pipeline
        .unwrap();
    assert_eq!(latest, updated);
    let first = client
        .get_pipeline(pb::GetPipelineRequest {
            name: "simple".into(),
            version: 1,
        })
        .await
        .unwrap()
        .into_inner()
        .pipeline
        .unwrap();
    assert_eq!(first, created);
    let missing_version = client
        .get_pipeline(pb::GetPipelineRequest {
            name: "simple".into(),
            version: 3,
        })
        .await
        .unwrap_err();
    assert_eq!(missing_version.code(), Code::NotFound);

    let missing = client
        .update_pipeline(pb::UpdatePipelineRequest {
            pipeline: Some(pipeline("name: nobody\nsteps: [{name: a, noop: {}}]")),
        })
        .await
        .unwrap_err();
    assert_eq!(missing.code(), Code::NotFound);
}

#[tokio::test]
async fn list_pages_through_latest_versions_by_name() {
    let app = spawn_app().await;
    for name in ["charlie", "alpha", "bravo"] {
        app.create(&format!("name: {name}\nsteps: [{{name: a, noop: {{}}}}]"))
            .await;
    }
    app.client
        .clone()
        .update_pipeline(pb::UpdatePipelineRequest {
            pipeline: Some(pipeline("name: bravo\nsteps: [{name: b, noop: {}}]")),
        })
        .await
        .unwrap();

    let mut seen = Vec::new();
    let mut token = String::new();
    loop {
        let page = app
            .client
            .clone()
            .list_pipelines(pb::ListPipelinesRequest {
                page_size: 2,
                page_token: token,
            })
            .await
            .unwrap()
            .into_inner();
        assert!(page.pipelines.len() <= 2);
        seen.extend(page.pipelines.into_iter().map(|p| (p.name, p.version)));
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
    }
    assert_eq!(
        seen,
        [
            ("alpha".to_string(), 1),
            ("bravo".to_string(), 2),
            ("charlie".to_string(), 1)
        ]
    );
}

#[tokio::test]
async fn executions_keep_the_version_they_started_with() {
    let app = spawn_app().await;
    app.create("name: versioned\nsteps:\n- {name: wait, sleep: {duration: 300ms}}\n- {name: mark, needs: [wait], set: {values: {v: 1}}}\n")
        .await;
    let first = app.run("versioned", json!({})).await;
    app.client
        .clone()
        .update_pipeline(pb::UpdatePipelineRequest {
            pipeline: Some(pipeline(
                "name: versioned\nsteps:\n- {name: mark, set: {values: {v: 2}}}\n",
            )),
        })
        .await
        .unwrap();
    let second = app.run("versioned", json!({})).await;

    let first = app.finish(&first.id).await;
    let second = app.finish(&second.id).await;
    assert_eq!(
        (first.pipeline_version, to_json(&first.execution_data)),
        (1, json!({"v": 1}))
    );
    assert_eq!(first.steps.len(), 2);
    assert_eq!(
        (second.pipeline_version, to_json(&second.execution_data)),
        (2, json!({"v": 2}))
    );
}

#[tokio::test]
async fn delete_is_refused_while_an_execution_is_active() {
    let app = spawn_app().await;
    let mut client = app.client.clone();
    app.create("name: busy\nsteps: [{name: wait, sleep: {duration: 400ms}}]")
        .await;
    let execution = app.run("busy", json!({})).await;

    let refused = client
        .delete_pipeline(pb::DeletePipelineRequest {
            name: "busy".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::FailedPrecondition, "{refused:?}");
    assert!(
        refused.message().contains(&execution.id),
        "{}",
        refused.message()
    );
    client
        .get_pipeline(pb::GetPipelineRequest {
            name: "busy".into(),
            version: 0,
        })
        .await
        .expect("still there");

    app.finish(&execution.id).await;
    client
        .delete_pipeline(pb::DeletePipelineRequest {
            name: "busy".into(),
        })
        .await
        .expect("delete after finish");
    let gone = client
        .get_pipeline(pb::GetPipelineRequest {
            name: "busy".into(),
            version: 0,
        })
        .await
        .unwrap_err();
    assert_eq!(gone.code(), Code::NotFound);
    let twice = client
        .delete_pipeline(pb::DeletePipelineRequest {
            name: "busy".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(twice.code(), Code::NotFound);
    // Past executions stay readable.
    assert_eq!(
        status(&app.get(&execution.id).await),
        pb::ExecutionStatus::Succeeded
    );
}

#[tokio::test]
async fn the_readme_examples_are_valid_and_run() {
    let app = spawn_app().await;
    for name in ["hello", "etl"] {
        let path = format!("{}/examples/{name}.yaml", env!("CARGO_MANIFEST_DIR"));
        let created = app.create(&std::fs::read_to_string(&path).unwrap()).await;
        let execution = app.run(&created.name, json!({})).await;
        let done = app.finish(&execution.id).await;
        assert_eq!(
            status(&done),
            pb::ExecutionStatus::Succeeded,
            "{path}: {}",
            done.error_message
        );
    }
}
