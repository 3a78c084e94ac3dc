//! gRPC-Web over HTTP/1.1, as a browser speaks it, and the CORS answers
//! that decide which pages may: raw requests, no gRPC-Web client library.

use pipelined::proto::v1 as pb;
use prost::Message;
use reqwest::header::HeaderMap;
use serde_json::json;

use crate::helpers::*;

const ALLOWED: &str = "http://127.0.0.1:8080";

/// A gRPC-Web answer: its HTTP status and headers, the messages of its data
/// frames and the text of its trailer frame.
struct WebAnswer {
    status: reqwest::StatusCode,
    version: reqwest::Version,
    headers: HeaderMap,
    messages: Vec<Vec<u8>>,
    trailers: String,
}

impl WebAnswer {
    /// The gRPC status: in the trailer frame, or in the headers of a
    /// trailers-only answer.
    fn grpc_status(&self) -> Option<String> {
        let in_trailers = self.trailers.lines().find_map(|line| {
            line.trim()
                .strip_prefix("grpc-status:")
                .map(|v| v.trim().to_string())
        });
        in_trailers.or_else(|| {
            self.headers
                .get("grpc-status")
                .map(|v| v.to_str().unwrap().to_string())
        })
    }
}

/// POSTs `request` as `application/grpc-web+proto` to `method` over
/// HTTP/1.1, with `origin` as a browser would send it.
async fn grpc_web_call(
    app: &TestApp,
    method: &str,
    request: impl Message,
    origin: Option<&str>,
) -> WebAnswer {
    let message = request.encode_to_vec();
    let mut body = vec![0u8];
    body.extend_from_slice(&(message.len() as u32).to_be_bytes());
    body.extend_from_slice(&message);
    let client = reqwest::Client::builder().http1_only().build().unwrap();
    let mut call = client
        .post(format!(
            "{}/pipeline.v1.PipelineService/{method}",
            app.endpoint()
        ))
        .header("content-type", "application/grpc-web+proto")
        .header("x-grpc-web", "1")
        .header("x-user-agent", "grpc-web-test")
        .body(body);
    if let Some(origin) = origin {
        call = call.header("origin", origin);
    }
    let response = call.send().await.expect("gRPC-Web call");
    let status = response.status();
    let version = response.version();
    let headers = response.headers().clone();
    let bytes = response.bytes().await.expect("gRPC-Web body").to_vec();

    // Frames: a flag byte (0x80: trailers), a 4-byte big-endian length, the
    // payload.
    let mut messages = Vec::new();
    let mut trailers = String::new();
    let mut rest = &bytes[..];
    while !rest.is_empty() {
        assert!(rest.len() >= 5, "truncated frame header in {bytes:?}");
        let flag = rest[0];
        let len = u32::from_be_bytes(rest[1..5].try_into().unwrap()) as usize;
        let payload = &rest[5..5 + len];
        if flag & 0x80 != 0 {
            trailers.push_str(std::str::from_utf8(payload).expect("ASCII trailers"));
        } else {
            messages.push(payload.to_vec());
        }
        rest = &rest[5 + len..];
    }
    WebAnswer {
        status,
        version,
        headers,
        messages,
        trailers,
    }
}

/// An OPTIONS preflight as a browser sends it before a gRPC-Web call.
async fn preflight(app: &TestApp, origin: &str) -> reqwest::Response {
    reqwest::Client::builder()
        .http1_only()
        .build()
        .unwrap()
        .request(
            reqwest::Method::OPTIONS,
            format!(
                "{}/pipeline.v1.PipelineService/ListPipelines",
                app.endpoint()
            ),
        )
        .header("origin", origin)
        .header("access-control-request-method", "POST")
        .header(
            "access-control-request-headers",
            "content-type,x-grpc-web,x-user-agent,grpc-timeout",
        )
        .send()
        .await
        .expect("preflight")
}

fn header<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers.get(name).map(|v| v.to_str().unwrap())
}

#[tokio::test]
async fn unary_and_streaming_calls_over_http1() {
    let app = spawn_app_with(|c| c.cors_allow_origins = vec![ALLOWED.into()]).await;
    app.create("name: web\nsteps:\n  - name: hello\n    set: {values: {greeting: hello}}\n")
        .await;

    let answer = grpc_web_call(
        &app,
        "ListPipelines",
        pb::ListPipelinesRequest::default(),
        Some(ALLOWED),
    )
    .await;
    assert_eq!(answer.status, 200);
    assert_eq!(answer.version, reqwest::Version::HTTP_11);
    assert_eq!(
        header(&answer.headers, "content-type"),
        Some("application/grpc-web+proto")
    );
    assert_eq!(
        header(&answer.headers, "access-control-allow-origin"),
        Some(ALLOWED)
    );
    let exposed = header(&answer.headers, "access-control-expose-headers").unwrap_or_default();
    for name in [
        "grpc-status",
        "grpc-message",
        "grpc-status-details-bin",
        "x-request-id",
    ] {
        assert!(exposed.contains(name), "{name} not exposed: {exposed}");
    }
    assert_eq!(
        answer.grpc_status().as_deref(),
        Some("0"),
        "trailers: {:?}",
        answer.trailers
    );
    assert_eq!(answer.messages.len(), 1);
    let list = pb::ListPipelinesResponse::decode(&answer.messages[0][..]).unwrap();
    let names: Vec<_> = list.pipelines.iter().map(|p| p.name.as_str()).collect();
    assert_eq!(names, ["web"]);

    // Server streaming: one data frame per event, then the trailers.
    let execution = app.run("web", json!({})).await;
    app.finish(&execution.id).await;
    let answer = grpc_web_call(
        &app,
        "WatchExecution",
        pb::WatchExecutionRequest {
            execution_id: execution.id.clone(),
            after_sequence: 0,
        },
        None,
    )
    .await;
    assert_eq!(
        answer.grpc_status().as_deref(),
        Some("0"),
        "trailers: {:?}",
        answer.trailers
    );
    let events: Vec<_> = answer
        .messages
        .iter()
        .map(|m| {
            pb::WatchExecutionResponse::decode(&m[..])
                .unwrap()
                .event
                .unwrap()
        })
        .collect();
    assert_gapless(&events, 1);
    assert_eq!(
        event_type(events.last().unwrap()),
        pb::EventType::ExecutionSucceeded
    );

    // Errors carry their status and message too.
    let answer = grpc_web_call(
        &app,
        "GetExecution",
        pb::GetExecutionRequest {
            execution_id: "01a20b24-9a0f-776b-9371-6dee82053214".into(),
        },
        Some(ALLOWED),
    )
    .await;
    assert_eq!(answer.status, 200);
    assert_eq!(answer.grpc_status().as_deref(), Some("5"));
    assert!(answer.messages.is_empty());

    // Plain gRPC over HTTP/2 on the same port is unaffected.
    let pipelines = app
        .client
        .clone()
        .list_pipelines(pb::ListPipelinesRequest::default())
        .await
        .unwrap()
        .into_inner()
        .pipelines;
    assert_eq!(pipelines.len(), 1);
}

#[tokio::test]
async fn preflight_answers_only_configured_origins() {
    let app = spawn_app_with(|c| c.cors_allow_origins = vec![ALLOWED.into()]).await;

    let allowed = preflight(&app, ALLOWED).await;
    assert!(allowed.status().is_success(), "{}", allowed.status());
    let headers = allowed.headers();
    assert_eq!(
        header(headers, "access-control-allow-origin"),
        Some(ALLOWED)
    );
    assert_eq!(
        header(headers, "access-control-allow-methods"),
        Some("POST")
    );
    let allowed_headers = header(headers, "access-control-allow-headers").unwrap_or_default();
    for name in [
        "content-type",
        "x-grpc-web",
        "x-user-agent",
        "grpc-timeout",
        "x-request-id",
        "traceparent",
    ] {
        assert!(
            allowed_headers.contains(name),
            "{name} not allowed: {allowed_headers}"
        );
    }

    for other in [
        "http://127.0.0.1:8081",
        "https://127.0.0.1:8080",
        "http://evil.example",
    ] {
        let refused = preflight(&app, other).await;
        assert_eq!(
            header(refused.headers(), "access-control-allow-origin"),
            None,
            "{other} allowed"
        );
    }
    // The call itself from another origin gets no CORS header either, so
    // the browser hides the answer.
    let answer = grpc_web_call(
        &app,
        "ListPipelines",
        pb::ListPipelinesRequest::default(),
        Some("http://evil.example"),
    )
    .await;
    assert_eq!(header(&answer.headers, "access-control-allow-origin"), None);
}

#[tokio::test]
async fn by_default_no_origin_is_allowed_but_grpc_web_works() {
    let app = spawn_app().await;
    let refused = preflight(&app, ALLOWED).await;
    assert_eq!(
        header(refused.headers(), "access-control-allow-origin"),
        None
    );

    // Same-origin and non-browser clients send no preflight.
    let answer = grpc_web_call(
        &app,
        "ListPipelines",
        pb::ListPipelinesRequest::default(),
        None,
    )
    .await;
    assert_eq!(answer.grpc_status().as_deref(), Some("0"));
}

#[tokio::test]
async fn any_origin_with_a_star() {
    let app = spawn_app_with(|c| c.cors_allow_origins = vec!["*".into()]).await;
    let allowed = preflight(&app, "http://anything.example:1234").await;
    assert_eq!(
        header(allowed.headers(), "access-control-allow-origin"),
        Some("*")
    );
}
