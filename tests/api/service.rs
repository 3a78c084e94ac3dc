//! Around the API: health, reflection, restart, and the shutdown behaviour.

use pipelined::proto::v1 as pb;
use serde_json::json;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_reflection::pb::v1::ServerReflectionRequest;
use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;

use crate::helpers::*;

#[tokio::test]
async fn health_reports_serving_overall_and_per_service() {
    let app = spawn_app().await;
    let mut health = HealthClient::new(app.channel().await);
    for service in ["", "pipeline.v1.PipelineService"] {
        let response = health
            .check(HealthCheckRequest {
                service: service.into(),
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(
            response.status,
            ServingStatus::Serving as i32,
            "service '{service}'"
        );
    }
    let unknown = health
        .check(HealthCheckRequest {
            service: "nope".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(unknown.code(), tonic::Code::NotFound);

    // A health watcher sees NOT_SERVING when the server starts shutting down.
    let mut watch = health
        .watch(HealthCheckRequest {
            service: "pipeline.v1.PipelineService".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        watch.message().await.unwrap().unwrap().status,
        ServingStatus::Serving as i32
    );
    let stopping = tokio::spawn(app.stop());
    let next = watch.message().await.unwrap().unwrap();
    assert_eq!(next.status, ServingStatus::NotServing as i32);
    stopping.await.unwrap();
}

/// One reflection request on its own stream, as grpcurl sends them.
async fn reflect(app: &TestApp, request: MessageRequest) -> MessageResponse {
    let mut reflection = ServerReflectionClient::new(app.channel().await);
    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(request),
    };
    let mut responses = reflection
        .server_reflection_info(tokio_stream::iter([request]))
        .await
        .unwrap()
        .into_inner();
    responses
        .message()
        .await
        .unwrap()
        .expect("a reflection response")
        .message_response
        .unwrap()
}

#[tokio::test]
async fn reflection_lists_and_describes_the_services() {
    let app = spawn_app().await;
    let MessageResponse::ListServicesResponse(list) =
        reflect(&app, MessageRequest::ListServices(String::new())).await
    else {
        panic!("expected a service list")
    };
    let names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
    for expected in ["pipeline.v1.PipelineService", "grpc.health.v1.Health"] {
        assert!(
            names.iter().any(|n| n == expected),
            "{expected} missing from {names:?}"
        );
    }
    // The API and the error details it sends are both described, so
    // grpcurl can call it and decode field violations without proto files.
    for symbol in ["pipeline.v1.PipelineService", "google.rpc.BadRequest"] {
        let response = reflect(&app, MessageRequest::FileContainingSymbol(symbol.into())).await;
        let MessageResponse::FileDescriptorResponse(files) = response else {
            panic!("expected file descriptors for {symbol}, got {response:?}")
        };
        assert!(!files.file_descriptor_proto.is_empty(), "{symbol}");
    }
}

#[tokio::test]
async fn a_restart_resumes_unfinished_executions_with_gapless_events() {
    let app = spawn_app().await;
    app.create("name: long\nsteps:\n- {name: first, set: {values: {a: 1}}}\n- {name: nap, needs: [first], sleep: {duration: 1s}}\n- {name: last, needs: [nap], set: {values: {b: 2}}}\n")
        .await;
    let execution = app.run("long", json!({})).await;
    app.wait_for(&execution.id, |e| {
        e.step_name == "nap" && event_type(e) == pb::EventType::StepStarted
    })
    .await;

    // Graceful shutdown mid-step: watchers are told to come back later.
    let mut watcher = app.watch(&execution.id, 0).await;
    let dir = app.stop().await;
    let mut seen = 0;
    let ended = loop {
        match watcher.message().await {
            Ok(Some(_)) => seen += 1,
            Ok(None) => break None,
            Err(status) => break Some(status),
        }
    };
    assert!(seen >= 4, "watcher saw the stored events first");
    if let Some(status) = ended {
        assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
    }

    let app = spawn_app_in(dir, vec![]).await;
    let done = app.finish(&execution.id).await;
    assert_eq!(
        pb::ExecutionStatus::try_from(done.status).unwrap(),
        pb::ExecutionStatus::Succeeded
    );
    assert_eq!(
        step(&done, "first").attempt,
        1,
        "succeeded steps are not re-run"
    );
    assert_eq!(
        step(&done, "nap").attempt,
        2,
        "the interrupted step runs again"
    );
    assert_eq!(to_json(&done.execution_data), json!({"a": 1, "b": 2}));
    assert_gapless(&app.events(&execution.id, 0).await, 1);
}
