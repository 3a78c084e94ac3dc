//! `--egress-allow`: what `http` and `grpc` steps may connect to. Servers
//! here use the default allowlist (`public`) or a narrow one, and the
//! targets are real listeners on loopback addresses that must never see a
//! connection they were not allowed.

use std::convert::Infallible;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};

use http_body_util::{BodyExt, Full};
use hyper::body::{Bytes, Incoming};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use pipelined::proto::v1 as pb;
use serde_json::json;
use tokio::net::TcpListener;
use tokio::task::{JoinHandle, JoinSet};

use crate::helpers::*;

/// A request as a [`TestServer`] saw it.
#[derive(Debug, Clone)]
pub struct Seen {
    pub target: String,
    pub headers: hyper::HeaderMap,
}

/// What a [`TestServer`] answers: status, headers, body.
pub type Reply = (u16, Vec<(&'static str, String)>, String);

/// An HTTP/1.1 server (hyper) on `ip`, port 0, that records every request
/// and answers with `respond`.
pub struct TestServer {
    pub addr: SocketAddr,
    seen: Arc<Mutex<Vec<Seen>>>,
    task: JoinHandle<()>,
}

impl TestServer {
    pub async fn start(ip: &str, respond: impl Fn(&Seen) -> Reply + Send + Sync + 'static) -> Self {
        let listener = TcpListener::bind((ip.parse::<IpAddr>().unwrap(), 0))
            .await
            .expect("bind");
        let addr = listener.local_addr().unwrap();
        let seen: Arc<Mutex<Vec<Seen>>> = Arc::default();
        let respond = Arc::new(respond);
        let recorded = seen.clone();
        let task = tokio::spawn(async move {
            let mut connections = JoinSet::new();
            while let Ok((stream, _)) = listener.accept().await {
                let (seen, respond) = (recorded.clone(), respond.clone());
                let service = service_fn(move |request: hyper::Request<Incoming>| {
                    let (seen, respond) = (seen.clone(), respond.clone());
                    async move {
                        let (parts, body) = request.into_parts();
                        let _ = body.collect().await;
                        let request = Seen {
                            target: parts.uri.to_string(),
                            headers: parts.headers,
                        };
                        let (status, headers, body) = respond(&request);
                        seen.lock().unwrap().push(request);
                        let mut response = hyper::Response::builder().status(status);
                        for (name, value) in headers {
                            response = response.header(name, value);
                        }
                        Ok::<_, Infallible>(response.body(Full::new(Bytes::from(body))).unwrap())
                    }
                });
                connections.spawn(async move {
                    let _ = http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        Self { addr, seen, task }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    pub fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn ok_json() -> Reply {
    (
        200,
        vec![("content-type", "application/json".to_string())],
        r#"{"ok": true}"#.to_string(),
    )
}

/// A server with the default allowlist (`public` only).
async fn default_app() -> TestApp {
    spawn_app_with(|config| {
        config.egress_allow = pipelined::server::ServeConfig::default().egress_allow;
    })
    .await
}

/// Runs a one-step pipeline and returns the finished execution and events.
async fn run_one(
    app: &TestApp,
    name: &str,
    step: &str,
) -> (pb::Execution, Vec<pb::ExecutionEvent>) {
    app.create(&format!(
        "name: {name}\nsteps:\n- name: s\n  retry: {{max_attempts: 3, initial_interval: 10ms}}\n  {step}\n"
    ))
    .await;
    let id = app.run(name, json!({})).await.id;
    let events = app.events(&id, 0).await;
    (app.get(&id).await, events)
}

/// Asserts the step was refused by the allowlist at its first attempt,
/// with a message naming `target` and the flag.
fn assert_denied(done: &pb::Execution, events: &[pb::ExecutionEvent], target: &str) {
    assert_eq!(status(done), pb::ExecutionStatus::Failed, "{done:#?}");
    let s = step(done, "s");
    assert_eq!(s.error_kind, "egress_denied", "{}", s.error);
    assert!(s.error.contains(target), "names {target}: {}", s.error);
    assert!(
        s.error.contains("--egress-allow"),
        "names the flag: {}",
        s.error
    );
    assert_eq!(s.attempt, 1, "egress_denied is not retried");
    assert!(
        !events
            .iter()
            .any(|e| event_type(e) == pb::EventType::StepRetrying),
        "no retry was scheduled"
    );
}

#[tokio::test]
async fn by_default_http_steps_cannot_reach_loopback_link_local_or_private_addresses() {
    let app = default_app().await;
    let target = TestServer::start("127.0.0.1", |_| ok_json()).await;

    let (done, events) = run_one(
        &app,
        "to-loopback",
        &format!("http: {{url: \"{}\"}}", target.url("/admin")),
    )
    .await;
    assert_denied(&done, &events, &target.addr.to_string());
    assert!(step(&done, "s").error.contains("loopback"));

    for (name, url, class) in [
        (
            "to-metadata",
            "http://169.254.169.254/latest/meta-data/",
            "link-local",
        ),
        ("to-private", "http://10.11.12.13:8080/", "private"),
        ("to-cgnat", "http://100.64.1.1/", "CGNAT"),
        ("to-unspecified", "http://0.0.0.0:1/", "unspecified"),
        ("to-ipv6-loopback", "http://[::1]:1/", "loopback"),
    ] {
        let (done, events) = run_one(&app, name, &format!("http: {{url: \"{url}\"}}")).await;
        let host = url.trim_start_matches("http://").split('/').next().unwrap();
        let host = host
            .split(':')
            .next()
            .filter(|_| !host.starts_with('['))
            .unwrap_or(host);
        assert_denied(&done, &events, host);
        assert!(
            step(&done, "s").error.contains(class),
            "{}",
            step(&done, "s").error
        );
    }

    // The IPv4-mapped IPv6 form of 127.0.0.1 is loopback too.
    let (done, events) = run_one(
        &app,
        "to-mapped",
        &format!(
            "http: {{url: \"http://[::ffff:127.0.0.1]:{}/\"}}",
            target.addr.port()
        ),
    )
    .await;
    assert_denied(&done, &events, "127.0.0.1");
    assert!(target.seen().is_empty(), "the target saw no request");
}

#[tokio::test]
async fn a_name_that_resolves_to_loopback_is_refused_unless_it_is_listed() {
    let target = TestServer::start("127.0.0.1", |_| ok_json()).await;
    let url = format!("http://localhost:{}/x", target.addr.port());

    let app = default_app().await;
    let (done, events) = run_one(&app, "by-name", &format!("http: {{url: \"{url}\"}}")).await;
    assert_denied(&done, &events, "localhost");
    assert!(target.seen().is_empty());

    // Listing the name allows whatever it resolves to.
    let named = spawn_app_with(|config| {
        config.egress_allow = vec![
            "public".to_string(),
            format!("localhost:{}", target.addr.port()),
        ];
    })
    .await;
    let (done, _) = run_one(&named, "by-name", &format!("http: {{url: \"{url}\"}}")).await;
    assert_eq!(status(&done), pb::ExecutionStatus::Succeeded, "{done:#?}");
    assert_eq!(target.seen().len(), 1);
}

#[tokio::test]
async fn every_redirect_hop_is_checked_and_credentials_stay_with_their_origin() {
    // 127.0.0.2 is allowed, 127.0.0.1 (the same machine) is not.
    let forbidden = TestServer::start("127.0.0.1", |_| ok_json()).await;
    let other = TestServer::start("127.0.0.2", |_| ok_json()).await;
    let to_forbidden = forbidden.url("/internal");
    let to_other = other.url("/landing");
    let allowed = TestServer::start("127.0.0.2", move |seen| {
        let location = match seen.target.as_str() {
            "/to-forbidden" => to_forbidden.clone(),
            "/to-other" => to_other.clone(),
            _ => "/final".to_string(),
        };
        if seen.target == "/final" {
            return ok_json();
        }
        (302, vec![("location", location)], String::new())
    })
    .await;
    let app = spawn_app_with(|config| config.egress_allow = vec!["127.0.0.2/32".to_string()]).await;

    let (done, events) = run_one(
        &app,
        "redirect-out",
        &format!("http: {{url: \"{}\"}}", allowed.url("/to-forbidden")),
    )
    .await;
    assert_denied(&done, &events, &forbidden.addr.to_string());
    assert!(
        forbidden.seen().is_empty(),
        "the forbidden server saw nothing"
    );
    assert_eq!(allowed.seen().len(), 1);

    // Allowed hops are followed; Authorization goes along on the same
    // origin, not to another one.
    let (done, events) = run_one(
        &app,
        "redirect-in",
        &format!(
            "http: {{url: \"{}\", headers: {{Authorization: Bearer abc}}}}",
            allowed.url("/same")
        ),
    )
    .await;
    assert_eq!(status(&done), pb::ExecutionStatus::Succeeded, "{done:#?}");
    let seen = allowed.seen();
    assert_eq!(seen.last().unwrap().target, "/final");
    assert_eq!(seen.last().unwrap().headers["authorization"], "Bearer abc");
    let hops: Vec<&str> = events
        .iter()
        .filter(|e| event_type(e) == pb::EventType::StepLog)
        .map(|e| e.message.as_str())
        .collect();
    assert!(hops[0].contains("/same -> 302 Found"), "{hops:?}");
    assert!(hops[1].contains("/final -> 200 OK"), "{hops:?}");

    let (done, _) = run_one(
        &app,
        "redirect-across",
        &format!(
            "http: {{url: \"{}\", headers: {{Authorization: Bearer abc, X-Api-Key: k1}}}}",
            allowed.url("/to-other")
        ),
    )
    .await;
    assert_eq!(status(&done), pb::ExecutionStatus::Succeeded, "{done:#?}");
    let landed = other.seen();
    assert_eq!(landed.len(), 1);
    assert!(
        !landed[0].headers.contains_key("authorization"),
        "credentials are not sent to another origin"
    );
    assert!(
        !landed[0].headers.contains_key("x-api-key"),
        "no header the step set is sent to another origin"
    );
}

#[tokio::test]
async fn a_grpc_step_to_a_worker_that_is_not_allowed_is_refused_before_connecting() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let port = listener.local_addr().unwrap().port();
    let app = default_app().await;
    let (done, events) = run_one(
        &app,
        "grpc-out",
        &format!("grpc: {{address: \"http://127.0.0.1:{port}\"}}"),
    )
    .await;
    assert_denied(&done, &events, &format!("127.0.0.1:{port}"));
    let (done, events) = run_one(
        &app,
        "grpc-by-name",
        &format!("grpc: {{address: \"http://localhost:{port}\"}}"),
    )
    .await;
    assert_denied(&done, &events, "localhost");
    assert!(
        listener.accept().is_err(),
        "no connection reached the worker's port"
    );
}

#[tokio::test]
async fn a_bad_allowlist_entry_stops_the_server_at_start() {
    let dir = tempfile::TempDir::new().unwrap();
    let output = tokio::process::Command::new(env!("CARGO_BIN_EXE_pipelined"))
        .args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(dir.path())
        .args(["--egress-allow", "public,10.0.0.0/33"])
        .env_remove("PIPELINED_EGRESS_ALLOW")
        .output()
        .await
        .expect("run pipelined");
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("invalid --egress-allow entry '10.0.0.0/33'"),
        "{stderr}"
    );
}
