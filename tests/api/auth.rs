//! Authentication, roles and the audit trail: real random tokens whose
//! hashes are written to a token file, real JWTs signed with an Ed25519 key
//! made here and published in a JWKS file, spoken to over a real socket.

use std::path::{Path, PathBuf};
use std::process::Output;

use base64::Engine as _;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use pipelined::proto::v1 as pb;
use pipelined::transport::auth::AuthConfig;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use tonic::Code;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

use crate::helpers::*;
use crate::process::ServerProcess;

const ISSUER: &str = "https://idp.test";
const AUDIENCE: &str = "pipelined";

/// A new random token, as an operator would hand one out.
fn random_token() -> String {
    let mut bytes = [0u8; 24];
    getrandom::fill(&mut bytes).unwrap();
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The three callers of the token tests.
struct Tokens {
    viewer: String,
    operator: String,
    admin: String,
    file: PathBuf,
}

/// Writes a token file with a viewer, an operator and an admin: names,
/// roles and the SHA-256 of each token, never the token.
fn token_file(dir: &Path) -> Tokens {
    let tokens = Tokens {
        viewer: random_token(),
        operator: random_token(),
        admin: random_token(),
        file: dir.join("tokens"),
    };
    let hash = |token: &str| {
        Sha256::digest(token.as_bytes())
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect::<String>()
    };
    std::fs::write(
        &tokens.file,
        format!(
            "# name role sha256\nwatcher viewer {}\nci-bot operator {}\n\nroot admin {}  # people\n",
            hash(&tokens.viewer),
            hash(&tokens.operator),
            hash(&tokens.admin)
        ),
    )
    .unwrap();
    tokens
}

async fn app_with_tokens() -> (TestApp, Tokens, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let tokens = token_file(dir.path());
    let file = tokens.file.clone();
    let app = spawn_app_with(move |config| {
        config.auth = AuthConfig {
            tokens_file: Some(file),
            ..AuthConfig::default()
        }
    })
    .await;
    (app, tokens, dir)
}

const HELLO: &str = "name: hello\nsteps:\n- {name: greet, set: {values: {greeting: hi}}}\n";
const SLOW: &str = "name: slow\nsteps:\n- {name: nap, sleep: {duration: 1h}}\n";
const SHELL: &str =
    "name: shell\nsteps:\n- {name: say, command: {program: sh, args: ['-c', 'echo hi']}}\n";

fn run_request(name: &str) -> pb::RunPipelineRequest {
    pb::RunPipelineRequest {
        pipeline_name: name.to_string(),
        ..Default::default()
    }
}

#[tokio::test]
async fn calls_without_a_known_token_are_unauthenticated_but_health_is_open() {
    let (app, _tokens, _dir) = app_with_tokens().await;

    let missing = app
        .client
        .clone()
        .list_pipelines(pb::ListPipelinesRequest::default())
        .await
        .unwrap_err();
    assert_eq!(missing.code(), Code::Unauthenticated, "{missing:?}");
    assert!(missing.message().contains("no credentials"), "{missing:?}");

    let unknown = app
        .client_with_token(&random_token())
        .await
        .list_pipelines(pb::ListPipelinesRequest::default())
        .await
        .unwrap_err();
    assert_eq!(unknown.code(), Code::Unauthenticated);
    assert_eq!(unknown.message(), "unknown token");

    let health = HealthClient::new(app.channel().await)
        .check(HealthCheckRequest {
            service: "pipeline.v1.PipelineService".into(),
        })
        .await
        .expect("health needs no token")
        .into_inner();
    assert_eq!(health.status, ServingStatus::Serving as i32);
}

#[tokio::test]
async fn each_role_may_call_what_the_role_table_says() {
    let (app, tokens, _dir) = app_with_tokens().await;
    let mut viewer = app.client_with_token(&tokens.viewer).await;
    let mut operator = app.client_with_token(&tokens.operator).await;
    let mut admin = app.client_with_token(&tokens.admin).await;

    // Admins define pipelines, command steps included.
    for yaml in [HELLO, SLOW, SHELL] {
        admin
            .create_pipeline(pb::CreatePipelineRequest {
                pipeline: Some(pipeline(yaml)),
            })
            .await
            .expect("an admin creates a pipeline");
    }
    let shell = admin.run_pipeline(run_request("shell")).await.unwrap();
    assert!(shell.into_inner().execution.is_some());

    // Operators run and cancel, but do not define.
    let denied = operator
        .create_pipeline(pb::CreatePipelineRequest {
            pipeline: Some(pipeline("name: other\nsteps:\n- {name: a, noop: {}}\n")),
        })
        .await
        .unwrap_err();
    assert_eq!(denied.code(), Code::PermissionDenied);
    assert_eq!(
        denied.message(),
        "CreatePipeline needs the admin role; caller 'ci-bot' has operator"
    );
    let slow = operator
        .run_pipeline(run_request("slow"))
        .await
        .expect("an operator runs")
        .into_inner()
        .execution
        .unwrap();

    // Viewers read and watch, but do not run.
    let listed = viewer
        .list_pipelines(pb::ListPipelinesRequest::default())
        .await
        .expect("a viewer lists")
        .into_inner();
    assert_eq!(listed.pipelines.len(), 3);
    viewer
        .get_pipeline(pb::GetPipelineRequest {
            name: "hello".into(),
            version: 0,
        })
        .await
        .expect("a viewer gets a pipeline");
    let got = viewer
        .get_execution(pb::GetExecutionRequest {
            execution_id: slow.id.clone(),
        })
        .await
        .expect("a viewer gets an execution")
        .into_inner();
    assert_eq!(got.execution.unwrap().id, slow.id);
    let mut stream = viewer
        .watch_execution(pb::WatchExecutionRequest {
            execution_id: slow.id.clone(),
            after_sequence: 0,
        })
        .await
        .expect("a viewer watches")
        .into_inner();
    let first = stream.message().await.unwrap().unwrap();
    assert_eq!(first.event.unwrap().sequence, 1);
    let denied = viewer.run_pipeline(run_request("hello")).await.unwrap_err();
    assert_eq!(denied.code(), Code::PermissionDenied);
    assert_eq!(
        denied.message(),
        "RunPipeline needs the operator role; caller 'watcher' has viewer"
    );
    let denied = viewer
        .cancel_execution(pb::CancelExecutionRequest {
            execution_id: slow.id.clone(),
            mode: 0,
        })
        .await
        .unwrap_err();
    assert!(
        denied.message().contains("needs the operator role"),
        "{denied:?}"
    );

    let cancelled = operator
        .cancel_execution(pb::CancelExecutionRequest {
            execution_id: slow.id.clone(),
            mode: pb::CancelMode::Terminate as i32,
        })
        .await
        .expect("an operator cancels");
    assert!(cancelled.into_inner().execution.is_some());
    // The viewer's watch sees the operator's cancel through to the end.
    let mut last = None;
    while let Some(message) = stream.message().await.unwrap() {
        last = message.event.or(last);
    }
    assert_eq!(
        last.unwrap().execution_status,
        pb::ExecutionStatus::Cancelled as i32
    );
}

/// An Ed25519 key pair and the JWKS that publishes its public half.
struct SigningKey {
    pkcs8: Vec<u8>,
    jwks: Value,
}

fn signing_key(kid: &str) -> SigningKey {
    let mut seed = [0u8; 32];
    getrandom::fill(&mut seed).unwrap();
    let public = ed25519_dalek::SigningKey::from_bytes(&seed)
        .verifying_key()
        .to_bytes();
    // PKCS#8 v1 of an Ed25519 private key: a fixed prefix, then the seed.
    let mut pkcs8 = vec![
        0x30, 0x2e, 0x02, 0x01, 0x00, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x04, 0x22, 0x04,
        0x20,
    ];
    pkcs8.extend_from_slice(&seed);
    SigningKey {
        pkcs8,
        jwks: json!({"keys": [{
            "kty": "OKP",
            "crv": "Ed25519",
            "kid": kid,
            "use": "sig",
            "alg": "EdDSA",
            "x": base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(public),
        }]}),
    }
}

fn now() -> i64 {
    chrono::Utc::now().timestamp()
}

fn jwt(key: &SigningKey, kid: &str, claims: Value) -> String {
    let mut header = Header::new(Algorithm::EdDSA);
    header.kid = Some(kid.to_string());
    jsonwebtoken::encode(&header, &claims, &EncodingKey::from_ed_der(&key.pkcs8)).unwrap()
}

fn claims(sub: &str, role: &str) -> Value {
    json!({"sub": sub, "role": role, "iss": ISSUER, "aud": AUDIENCE, "exp": now() + 600})
}

#[tokio::test]
async fn jwts_signed_by_a_jwks_key_authenticate_with_their_role() {
    let dir = tempfile::tempdir().unwrap();
    let key = signing_key("k1");
    let jwks = dir.path().join("jwks.json");
    std::fs::write(&jwks, key.jwks.to_string()).unwrap();
    let app = spawn_app_with(move |config| {
        config.auth = AuthConfig {
            jwt_jwks: Some(jwks),
            jwt_issuer: Some(ISSUER.into()),
            jwt_audience: Some(AUDIENCE.into()),
            ..AuthConfig::default()
        }
    })
    .await;

    let admin = jwt(&key, "k1", claims("alice@example.com", "admin"));
    app.client_with_token(&admin)
        .await
        .create_pipeline(pb::CreatePipelineRequest {
            pipeline: Some(pipeline(HELLO)),
        })
        .await
        .expect("an admin JWT creates");
    let operator = jwt(&key, "k1", claims("deploy-job", "operator"));
    let execution = app
        .client_with_token(&operator)
        .await
        .run_pipeline(run_request("hello"))
        .await
        .expect("an operator JWT runs")
        .into_inner()
        .execution
        .unwrap();
    assert!(!execution.id.is_empty());
    let denied = app
        .client_with_token(&operator)
        .await
        .delete_pipeline(pb::DeletePipelineRequest {
            name: "hello".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(
        denied.message(),
        "DeletePipeline needs the admin role; caller 'deploy-job' has operator"
    );

    let other_key = signing_key("k1");
    let mut expired = claims("deploy-job", "operator");
    expired["exp"] = json!(now() - 3600);
    let mut elsewhere = claims("deploy-job", "operator");
    elsewhere["aud"] = json!("another-service");
    let mut foreign = claims("deploy-job", "operator");
    foreign["iss"] = json!("https://other-idp.test");
    let mut roleless = claims("deploy-job", "operator");
    roleless["role"] = json!("superuser");
    for (token, reason) in [
        (jwt(&key, "k1", expired), "invalid JWT: it has expired"),
        (jwt(&key, "k1", elsewhere), "invalid JWT: wrong audience"),
        (jwt(&key, "k1", foreign), "invalid JWT: wrong issuer"),
        (
            jwt(&other_key, "k1", claims("mallory", "admin")),
            "invalid JWT: bad signature",
        ),
        (
            jwt(&key, "k2", claims("deploy-job", "operator")),
            "invalid JWT: no key 'k2' for EdDSA in the JWKS",
        ),
        (
            jwt(&key, "k1", roleless),
            "invalid JWT: the 'role' claim names none of the roles viewer, operator, admin",
        ),
    ] {
        let refused = app
            .client_with_token(&token)
            .await
            .run_pipeline(run_request("hello"))
            .await
            .unwrap_err();
        assert_eq!(refused.code(), Code::Unauthenticated, "{refused:?}");
        assert_eq!(refused.message(), reason);
    }
}

#[tokio::test]
async fn the_audit_trail_tells_who_did_what_when_including_refusals() {
    let (app, tokens, _dir) = app_with_tokens().await;
    let mut viewer = app.client_with_token(&tokens.viewer).await;
    let mut operator = app.client_with_token(&tokens.operator).await;
    let mut admin = app.client_with_token(&tokens.admin).await;

    admin
        .create_pipeline(pb::CreatePipelineRequest {
            pipeline: Some(pipeline(SLOW)),
        })
        .await
        .unwrap();
    let execution = operator
        .run_pipeline(run_request("slow"))
        .await
        .unwrap()
        .into_inner()
        .execution
        .unwrap();
    viewer
        .cancel_execution(pb::CancelExecutionRequest {
            execution_id: execution.id.clone(),
            mode: 0,
        })
        .await
        .unwrap_err();
    operator
        .cancel_execution(pb::CancelExecutionRequest {
            execution_id: execution.id.clone(),
            mode: pb::CancelMode::Terminate as i32,
        })
        .await
        .unwrap();
    let missing = operator
        .pause_execution(pb::PauseExecutionRequest {
            execution_id: uuid::Uuid::now_v7().to_string(),
        })
        .await
        .unwrap_err();
    assert_eq!(missing.code(), Code::NotFound);
    // Reads are not audited.
    operator
        .get_execution(pb::GetExecutionRequest {
            execution_id: execution.id.clone(),
        })
        .await
        .unwrap();

    let trail = admin
        .list_audit_events(pb::ListAuditEventsRequest::default())
        .await
        .expect("an admin reads the audit trail")
        .into_inner();
    let rows: Vec<(&str, &str, &str, &str)> = trail
        .events
        .iter()
        .map(|e| {
            (
                e.caller.as_str(),
                e.role.as_str(),
                e.method.as_str(),
                e.code.as_str(),
            )
        })
        .collect();
    assert_eq!(
        rows,
        [
            ("ci-bot", "operator", "PauseExecution", "NOT_FOUND"),
            ("ci-bot", "operator", "CancelExecution", "OK"),
            ("watcher", "viewer", "CancelExecution", "PERMISSION_DENIED"),
            ("ci-bot", "operator", "RunPipeline", "OK"),
            ("root", "admin", "CreatePipeline", "OK"),
        ],
        "newest first: {:#?}",
        trail.events
    );
    let [_, cancel, denied, run, create] = &trail.events[..] else {
        unreachable!()
    };
    assert_eq!(create.target, "slow");
    assert_eq!(run.target, "slow");
    assert_eq!(run.message, format!("execution {}", execution.id));
    assert_eq!(cancel.target, execution.id);
    assert_eq!(
        denied.message,
        "CancelExecution needs the operator role; caller 'watcher' has viewer"
    );
    let times: Vec<i64> = trail.events.iter().map(|e| millis(&e.time)).collect();
    assert!(times.windows(2).all(|w| w[0] >= w[1]), "{times:?}");
    assert!(times[0] <= chrono::Utc::now().timestamp_millis());
    assert!(trail.events.iter().all(|e| !e.request_id.is_empty()));
    assert!(trail.next_page_token.is_empty());

    // Filters and pages.
    let mine = admin
        .list_audit_events(pb::ListAuditEventsRequest {
            caller: "ci-bot".into(),
            method: "CancelExecution".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(mine.events.len(), 1);
    assert_eq!(mine.events[0].id, cancel.id);
    let about = admin
        .list_audit_events(pb::ListAuditEventsRequest {
            target: execution.id.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    // The refused cancel was refused before its request was read.
    assert_eq!(about.events.len(), 1);
    let first = admin
        .list_audit_events(pb::ListAuditEventsRequest {
            page_size: 2,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let second = admin
        .list_audit_events(pb::ListAuditEventsRequest {
            page_size: 2,
            page_token: first.next_page_token.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let paged: Vec<&str> = first
        .events
        .iter()
        .chain(&second.events)
        .map(|e| e.id.as_str())
        .collect();
    let all: Vec<&str> = trail.events[..4].iter().map(|e| e.id.as_str()).collect();
    assert_eq!(paged, all);

    // Only admins read it; the refusal itself is recorded.
    let refused = operator
        .list_audit_events(pb::ListAuditEventsRequest::default())
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::PermissionDenied);
    assert_eq!(
        refused.message(),
        "ListAuditEvents needs the admin role; caller 'ci-bot' has operator"
    );
    let latest = admin
        .list_audit_events(pb::ListAuditEventsRequest {
            page_size: 1,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(latest.events[0].method, "ListAuditEvents");
    assert_eq!(latest.events[0].code, "PERMISSION_DENIED");
}

#[tokio::test]
async fn without_authentication_everyone_is_an_anonymous_admin_in_the_trail() {
    let app = spawn_app().await;
    app.create(HELLO).await;
    let trail = app
        .client
        .clone()
        .list_audit_events(pb::ListAuditEventsRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(trail.events.len(), 1);
    assert_eq!(trail.events[0].caller, "anonymous");
    assert_eq!(trail.events[0].role, "admin");
    assert_eq!(trail.events[0].method, "CreatePipeline");
}

#[tokio::test]
async fn grpc_web_calls_carry_their_token_in_the_authorization_header() {
    let (app, tokens, _dir) = app_with_tokens().await;
    let call = |token: Option<String>| {
        let url = format!(
            "{}/pipeline.v1.PipelineService/ListPipelines",
            app.endpoint()
        );
        async move {
            let mut request = reqwest::Client::builder()
                .http1_only()
                .build()
                .unwrap()
                .post(url)
                .header("content-type", "application/grpc-web+proto")
                .header("x-grpc-web", "1")
                .body(vec![0u8, 0, 0, 0, 0]);
            if let Some(token) = token {
                request = request.header("authorization", format!("Bearer {token}"));
            }
            let response = request.send().await.unwrap();
            let headers = response.headers().clone();
            let body = response.bytes().await.unwrap();
            (headers, String::from_utf8_lossy(&body).into_owned())
        }
    };
    let (headers, _) = call(None).await;
    assert_eq!(headers["grpc-status"], "16", "UNAUTHENTICATED: {headers:?}");
    let (headers, body) = call(Some(tokens.viewer.clone())).await;
    assert!(headers.get("grpc-status").is_none(), "{headers:?}");
    assert!(body.contains("grpc-status:0"), "{body:?}");
}

async fn pipelined(args: &[&str], env: &[(&str, &str)], stdin: Option<&str>) -> Output {
    let mut command = tokio::process::Command::new(env!("CARGO_BIN_EXE_pipelined"));
    command
        .args(args)
        .env_remove("PIPELINED_TOKEN")
        .envs(env.iter().copied())
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    let mut child = command.spawn().expect("run the CLI");
    let mut input = child.stdin.take().unwrap();
    if let Some(text) = stdin {
        tokio::io::AsyncWriteExt::write_all(&mut input, text.as_bytes())
            .await
            .unwrap();
    }
    drop(input);
    child.wait_with_output().await.unwrap()
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

#[tokio::test]
async fn the_cli_makes_tokens_sends_them_and_reads_the_audit_trail() {
    let dir = tempfile::tempdir().unwrap();
    // An operator makes a token for each caller; only hashes go to the file.
    let generated = pipelined(
        &[
            "hash-token",
            "--generate",
            "--name",
            "ops",
            "--role",
            "admin",
        ],
        &[],
        None,
    )
    .await;
    assert!(generated.status.success(), "{}", text(&generated.stderr));
    let out = text(&generated.stdout);
    let [admin_token, admin_line] = out.lines().collect::<Vec<_>>()[..] else {
        panic!("two lines expected: {out}");
    };
    assert!(admin_line.starts_with("ops admin "), "{admin_line}");
    let viewer_token = random_token();
    let hashed = pipelined(&["hash-token"], &[], Some(&format!("{viewer_token}\n"))).await;
    let viewer_hash = text(&hashed.stdout).trim().to_string();
    assert_eq!(
        viewer_hash,
        Sha256::digest(viewer_token.as_bytes())
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect::<String>()
    );
    let file = dir.path().join("tokens");
    std::fs::write(
        &file,
        format!("{admin_line}\nlooker viewer {viewer_hash}\n"),
    )
    .unwrap();

    let server = ServerProcess::start(
        &dir.path().join("data"),
        &["--auth-tokens", file.to_str().unwrap()],
    )
    .await;
    let endpoint = format!("http://{}", server.addr());
    let yaml = dir.path().join("hello.yaml");
    std::fs::write(&yaml, HELLO).unwrap();
    let server_env = [("PIPELINED_SERVER", endpoint.as_str())];

    let anonymous = pipelined(&["pipelines"], &server_env, None).await;
    assert!(!anonymous.status.success());
    assert!(
        text(&anonymous.stderr).contains("Unauthenticated: no credentials"),
        "{}",
        text(&anonymous.stderr)
    );
    let applied = pipelined(
        &[
            "apply",
            "-f",
            yaml.to_str().unwrap(),
            "--token",
            admin_token,
        ],
        &server_env,
        None,
    )
    .await;
    assert!(applied.status.success(), "{}", text(&applied.stderr));
    let refused = pipelined(
        &["run", "hello"],
        &[
            ("PIPELINED_SERVER", endpoint.as_str()),
            ("PIPELINED_TOKEN", viewer_token.as_str()),
        ],
        None,
    )
    .await;
    assert!(!refused.status.success());
    assert!(
        text(&refused.stderr)
            .contains("RunPipeline needs the operator role; caller 'looker' has viewer"),
        "{}",
        text(&refused.stderr)
    );

    let audit = pipelined(
        &["audit", "--token", admin_token, "-o", "json"],
        &server_env,
        None,
    )
    .await;
    assert!(audit.status.success(), "{}", text(&audit.stderr));
    let events: Value = serde_json::from_slice(&audit.stdout).expect("audit -o json is JSON");
    let rows: Vec<(&str, &str, &str)> = events
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["caller"].as_str().unwrap(),
                e["method"].as_str().unwrap(),
                e["code"].as_str().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        rows,
        [
            ("looker", "RunPipeline", "PERMISSION_DENIED"),
            ("ops", "CreatePipeline", "OK"),
        ]
    );
    let table = pipelined(
        &["audit", "--token", admin_token, "--caller", "ops"],
        &server_env,
        None,
    )
    .await;
    let table = text(&table.stdout);
    assert!(table.starts_with("TIME"), "{table}");
    assert_eq!(table.lines().count(), 2, "{table}");
    assert!(table.contains("CreatePipeline"), "{table}");
    let as_viewer = pipelined(&["audit", "--token", &viewer_token], &server_env, None).await;
    assert!(!as_viewer.status.success());
    assert!(
        text(&as_viewer.stderr).contains("PermissionDenied"),
        "{}",
        text(&as_viewer.stderr)
    );
    drop(server);
}
