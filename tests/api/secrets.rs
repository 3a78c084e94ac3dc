//! `${secrets.NAME}`: values from `--secrets-dir` files (in-process servers)
//! and `PIPELINED_SECRET_<NAME>` variables (the real binary, so that no
//! variable of this test process leaks into other tests), sent where the
//! step says and masked as `***` everywhere the service keeps or shows them.

use pipelined::proto::v1 as pb;
use serde_json::json;
use tonic::Code;
use tonic_types::StatusExt;

use crate::egress::{Reply, TestServer};
use crate::helpers::*;
use crate::process::ServerProcess;

/// A secret value that percent-encodes differently in a URL.
fn secret_value() -> String {
    format!("s3cr3t/{}+x", uuid::Uuid::now_v7().simple())
}

/// A server whose secrets dir holds `API_TOKEN` = `value` (with a newline).
async fn app_with_token(value: &str) -> TestApp {
    let value = value.to_string();
    spawn_app_with(move |config| {
        // Next to the server's data, in the test's temporary directory.
        let secrets = config.data_dir.with_file_name("secrets");
        std::fs::create_dir_all(&secrets).unwrap();
        std::fs::write(secrets.join("API_TOKEN"), format!("{value}\n")).unwrap();
        config.secrets_dir = Some(secrets);
    })
    .await
}

/// Answers with the Authorization header and the target it got, as JSON
/// (or as text with status 500 under `/fail`).
fn echo(seen: &crate::egress::Seen) -> Reply {
    let auth = seen
        .headers
        .get("authorization")
        .map(|v| v.to_str().unwrap().to_string())
        .unwrap_or_default();
    if seen.target.starts_with("/fail") {
        return (500, vec![], format!("denied for {auth}"));
    }
    let body = json!({"auth": auth, "target": seen.target});
    (
        200,
        vec![("content-type", "application/json".to_string())],
        body.to_string(),
    )
}

#[tokio::test]
async fn an_http_step_sends_the_secret_and_nothing_kept_or_shown_contains_it() {
    let value = secret_value();
    let app = app_with_token(&value).await;
    let server = TestServer::start("127.0.0.1", echo).await;
    let yaml = format!(
        "name: with-secret\nsteps:\n\
         - {{name: call, http: {{url: \"{url}?key=${{secrets.API_TOKEN}}\", headers: {{Authorization: \"Bearer ${{secrets.API_TOKEN}}\"}}}}}}\n\
         - {{name: fails, continue_on_failure: true, http: {{url: \"{fail}\", headers: {{Authorization: \"Bearer ${{secrets.API_TOKEN}}\"}}}}}}\n",
        url = server.url("/echo"),
        fail = server.url("/fail"),
    );
    app.create(&yaml).await;
    // Data named `secrets` neither stands in for a secret nor is read.
    let id = app
        .run(
            "with-secret",
            json!({"secrets": {"API_TOKEN": "from-input"}}),
        )
        .await
        .id;
    let events = app.events(&id, 0).await;
    let done = app.get(&id).await;
    assert_eq!(status(&done), pb::ExecutionStatus::Succeeded, "{done:#?}");

    // The server got the real value, in the header and (encoded) in the URL.
    let seen = server.seen();
    assert_eq!(seen.len(), 2);
    let echoed = seen.iter().find(|s| s.target.starts_with("/echo")).unwrap();
    assert_eq!(echoed.headers["authorization"], format!("Bearer {value}"));
    assert!(echoed.target.contains("s3cr3t%2F"), "{}", echoed.target);

    // The output shows the echo masked.
    let output = to_json(&step(&done, "call").output);
    assert_eq!(output["auth"], "Bearer ***");
    assert_eq!(output["target"], "/echo?key=***");
    // The failure message quoting the body is masked too.
    let failed = step(&done, "fails");
    assert_eq!(failed.error_kind, "http_status");
    assert!(
        failed.error.contains("denied for Bearer ***"),
        "{}",
        failed.error
    );

    // Nothing stored or published holds the value, in any form.
    let encoded = value.replace('/', "%2F").replace('+', "%2B");
    let definition = app
        .client
        .clone()
        .get_pipeline(pb::GetPipelineRequest {
            name: "with-secret".to_string(),
            version: 0,
        })
        .await
        .unwrap()
        .into_inner();
    let kept = format!("{definition:?}\n{done:?}\n{events:?}");
    assert!(
        kept.contains("${secrets.API_TOKEN}"),
        "the reference is kept"
    );
    for form in [&value, &encoded] {
        assert!(!kept.contains(form.as_str()), "{form} leaked: {kept}");
    }
    let logs: Vec<&str> = events
        .iter()
        .filter(|e| event_type(e) == pb::EventType::StepLog)
        .map(|e| e.message.as_str())
        .collect();
    assert!(
        logs.iter().any(|l| l.contains("/echo?key=*** -> 200 OK")),
        "{logs:?}"
    );
    assert!(!to_json(&done.execution_data).to_string().contains("s3cr3t"));
}

#[tokio::test]
async fn a_command_step_gets_the_secret_in_its_env_and_its_echo_is_masked() {
    let value = secret_value();
    let app = app_with_token(&value).await;
    let yaml = "name: cmd-secret\nsteps:\n\
        - name: c\n  command:\n    program: sh\n    args: [-c, 'echo \"token is $TOKEN\"; echo \"stderr $TOKEN\" >&2; echo \"{\\\"t\\\": \\\"$TOKEN\\\", \\\"len\\\": ${#TOKEN}}\"']\n    env: {TOKEN: '${secrets.API_TOKEN}'}\n";
    app.create(yaml).await;
    let id = app.run("cmd-secret", json!({})).await.id;
    let events = app.events(&id, 0).await;
    let done = app.get(&id).await;
    assert_eq!(status(&done), pb::ExecutionStatus::Succeeded, "{done:#?}");
    let output = to_json(&step(&done, "c").output);
    assert_eq!(output["t"], "***");
    assert_eq!(
        output["len"],
        json!(value.len()),
        "the program got the value"
    );
    let logs: Vec<&str> = events
        .iter()
        .filter(|e| event_type(e) == pb::EventType::StepLog)
        .map(|e| e.message.as_str())
        .collect();
    assert!(logs.contains(&"token is ***"), "{logs:?}");
    assert!(logs.contains(&"stderr ***"), "{logs:?}");
    assert!(!format!("{events:?}{done:?}").contains(&value));
}

#[tokio::test]
async fn a_missing_secret_fails_the_step_with_secret_missing_and_input_cannot_supply_it() {
    let app = app_with_token("unused").await;
    app.create(
        "name: missing\nsteps:\n- name: s\n  retry: {max_attempts: 3, initial_interval: 10ms}\n  \
         command: {program: sh, args: [-c, 'echo ran'], env: {X: '${secrets.NOT_THERE}'}}\n",
    )
    .await;
    let id = app
        .run("missing", json!({"secrets": {"NOT_THERE": "from-input"}}))
        .await
        .id;
    let events = app.events(&id, 0).await;
    let done = app.get(&id).await;
    assert_eq!(status(&done), pb::ExecutionStatus::Failed);
    let s = step(&done, "s");
    assert_eq!(s.error_kind, "secret_missing");
    assert!(s.error.contains("'NOT_THERE'"), "{}", s.error);
    assert!(
        s.error.contains("PIPELINED_SECRET_NOT_THERE"),
        "{}",
        s.error
    );
    assert!(s.error.contains("NOT_THERE"), "{}", s.error);
    assert_eq!(s.attempt, 1, "secret_missing is not retried");
    assert!(
        !events
            .iter()
            .any(|e| event_type(e) == pb::EventType::StepLog && e.message == "ran"),
        "the program did not run"
    );
}

#[tokio::test]
async fn a_malformed_secret_reference_is_invalid_argument_with_its_field() {
    let app = spawn_app().await;
    let status = app
        .client
        .clone()
        .create_pipeline(pb::CreatePipelineRequest {
            pipeline: Some(pipeline(
                "name: bad-ref\nsteps:\n- {name: a, http: {url: 'http://h/', headers: {X-Key: '${secrets.x-y}'}}}\n",
            )),
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    let violations = status.get_details_bad_request().unwrap().field_violations;
    assert_eq!(violations[0].field, "pipeline.steps[0].http.headers.X-Key");
    assert!(
        violations[0].description.contains("${secrets.x-y}"),
        "{}",
        violations[0].description
    );
}

#[tokio::test]
async fn secrets_from_the_environment_reach_steps_only_through_references() {
    let value = secret_value();
    let dir = tempfile::TempDir::new().unwrap();
    let server = ServerProcess::start_with_env(
        &dir.path().join("data"),
        &[],
        &[
            ("PIPELINED_SECRET_FROM_ENV", &value),
            // A server setting, which a program must not see either.
            ("PIPELINED_HEARTBEAT", "14s"),
        ],
    )
    .await;
    let mut client = server.client();
    client
        .create_pipeline(pb::CreatePipelineRequest {
            pipeline: Some(pipeline(
                "name: env-secret\nsteps:\n- name: c\n  command:\n    program: sh\n    \
                 args: [-c, 'echo \"t=$T\"; echo \"inherited=${PIPELINED_SECRET_FROM_ENV:-none},${PIPELINED_HEARTBEAT:-none}\"']\n    \
                 env: {T: '${secrets.FROM_ENV}'}\n",
            )),
        })
        .await
        .unwrap();
    let id = client
        .run_pipeline(pb::RunPipelineRequest {
            pipeline_name: "env-secret".to_string(),
            input: Some(to_struct(json!({}))),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .execution
        .unwrap()
        .id;
    let mut stream = client
        .watch_execution(pb::WatchExecutionRequest {
            execution_id: id.clone(),
            after_sequence: 0,
        })
        .await
        .unwrap()
        .into_inner();
    let mut logs = Vec::new();
    tokio::time::timeout(PATIENCE, async {
        while let Some(message) = stream.message().await.unwrap() {
            let event = message.event.unwrap();
            if event_type(&event) == pb::EventType::StepLog {
                logs.push(event.message);
            }
        }
    })
    .await
    .expect("execution finishes in time");
    assert!(logs.contains(&"t=***".to_string()), "{logs:?}");
    assert!(
        logs.contains(&"inherited=none,none".to_string()),
        "the program inherits no PIPELINED_* variable of the server: {logs:?}"
    );
    assert!(
        !server.log().contains(&value),
        "the server log has no value"
    );
}
