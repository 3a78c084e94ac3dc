use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use pipelined::domain::definition::PipelineSpec;
use pipelined::proto::v1 as pb;
use pipelined::proto::v1::pipeline_service_client::PipelineServiceClient;
use pipelined::server::{ServeConfig, serve};
use pipelined::transport::convert;
use pipelined::transport::tls::TlsConfig;
use serde_json::Value;
use tempfile::TempDir;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tonic::transport::{Channel, ClientTlsConfig};

pub type Client = PipelineServiceClient<Channel>;

/// How long any test waits for an execution before declaring it stuck.
pub const PATIENCE: Duration = Duration::from_secs(30);

/// A running server and a client connected to it.
pub struct TestApp {
    pub addr: SocketAddr,
    pub client: Client,
    /// Whether the server serves TLS (see [`spawn_tls_app`]).
    tls: bool,
    dir: Option<TempDir>,
    shutdown: Option<oneshot::Sender<()>>,
    handle: Option<JoinHandle<anyhow::Result<()>>>,
}

/// Starts a server that allows `sh` in command steps.
pub async fn spawn_app() -> TestApp {
    spawn_app_in(TempDir::new().expect("temp dir"), vec!["sh".to_string()]).await
}

/// Starts a server that allows `sh` in command steps, with its configuration
/// adjusted by `tweak` (a short heartbeat, say).
pub async fn spawn_app_with(tweak: impl FnOnce(&mut ServeConfig)) -> TestApp {
    spawn_app_configured(
        TempDir::new().expect("temp dir"),
        vec!["sh".to_string()],
        tweak,
        None,
    )
    .await
}

/// Starts a server that serves TLS with `tls`; its `client` connects to
/// `https://localhost:PORT` with `client_tls`.
pub async fn spawn_tls_app(tls: TlsConfig, client_tls: ClientTlsConfig) -> TestApp {
    spawn_app_configured(
        TempDir::new().expect("temp dir"),
        vec!["sh".to_string()],
        |config| config.tls = Some(tls),
        Some(client_tls),
    )
    .await
}

/// Starts a server with its database in `dir`.
pub async fn spawn_app_in(dir: TempDir, allow_commands: Vec<String>) -> TestApp {
    spawn_app_configured(dir, allow_commands, |_| {}, None).await
}

async fn spawn_app_configured(
    dir: TempDir,
    allow_commands: Vec<String>,
    tweak: impl FnOnce(&mut ServeConfig),
    client_tls: Option<ClientTlsConfig>,
) -> TestApp {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().unwrap();
    let mut config = ServeConfig {
        listen: addr,
        data_dir: dir.path().join("data"),
        database_url: test_database(dir.path()).await,
        allow_commands,
        shutdown_grace: Duration::from_secs(1),
        // Tests serve HTTP and workers on loopback; tests/api/egress.rs
        // puts the default back to see it refuse them.
        egress_allow: vec!["127.0.0.1/32".to_string(), "::1/128".to_string()],
        ..ServeConfig::default()
    };
    tweak(&mut config);
    let (tx, rx) = oneshot::channel::<()>();
    let handle = tokio::spawn(serve(config, listener, async move {
        let _ = rx.await;
    }));
    let tls = client_tls.is_some();
    let client = match client_tls {
        None => connect(addr).await,
        Some(client_tls) => PipelineServiceClient::new(
            tls_channel(addr, client_tls)
                .await
                .expect("a TLS connection to the server"),
        ),
    };
    TestApp {
        addr,
        client,
        tls,
        dir: Some(dir),
        shutdown: Some(tx),
        handle: Some(handle),
    }
}

/// The environment variable that points the suite at PostgreSQL: a URL of a
/// database on a server where the suite may create databases. Unset, every
/// test uses a SQLite file in its temporary directory.
pub const POSTGRES_ENV: &str = "PIPELINED_TEST_POSTGRES_URL";

/// The database of the test whose files live in `dir`: `None` for the SQLite
/// default, or, when [`POSTGRES_ENV`] is set, a PostgreSQL database of its
/// own, created on first use and remembered in `dir` so that a server
/// restarted on the same directory finds the same data.
pub async fn test_database(dir: &Path) -> Option<String> {
    let admin_url = std::env::var(POSTGRES_ENV).ok().filter(|u| !u.is_empty())?;
    let remembered = dir.join("database_url");
    if let Ok(url) = std::fs::read_to_string(&remembered) {
        return Some(url);
    }
    let name = format!("t_{}", uuid::Uuid::now_v7().simple());
    let admin = sea_orm::Database::connect(admin_url.as_str())
        .await
        .expect("connect to the test PostgreSQL server");
    sea_orm::ConnectionTrait::execute_unprepared(&admin, &format!("CREATE DATABASE {name}"))
        .await
        .expect("create a test database");
    admin.close().await.ok();
    let (base, _) = admin_url
        .rsplit_once('/')
        .expect("a postgres:// URL naming a database");
    let url = format!("{base}/{name}");
    std::fs::write(&remembered, &url).expect("remember the test database");
    Some(url)
}

pub async fn connect(addr: SocketAddr) -> Client {
    let endpoint = format!("http://{addr}");
    for _ in 0..100 {
        if let Ok(client) = PipelineServiceClient::connect(endpoint.clone()).await {
            return client;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("server at {addr} never accepted a connection");
}

/// A channel to the TLS server at `addr`, by the name `localhost`.
pub async fn tls_channel(
    addr: SocketAddr,
    client_tls: ClientTlsConfig,
) -> Result<Channel, tonic::transport::Error> {
    Channel::from_shared(format!("https://localhost:{}", addr.port()))
        .unwrap()
        .tls_config(client_tls)?
        .connect()
        .await
}

impl TestApp {
    pub fn endpoint(&self) -> String {
        if self.tls {
            format!("https://localhost:{}", self.addr.port())
        } else {
            format!("http://{}", self.addr)
        }
    }

    /// The server's temporary directory (its database lives in `data/`).
    pub fn dir(&self) -> &Path {
        self.dir.as_ref().expect("directory").path()
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir().join(name)
    }

    /// A channel for other services served on the same port (plaintext
    /// servers; TLS ones: [`tls_channel`]).
    pub async fn channel(&self) -> Channel {
        Channel::from_shared(self.endpoint())
            .unwrap()
            .connect()
            .await
            .expect("connect")
    }

    /// Shuts the server down gracefully and hands back its data directory.
    pub async fn stop(mut self) -> TempDir {
        let _ = self.shutdown.take().unwrap().send(());
        tokio::time::timeout(PATIENCE, self.handle.take().unwrap())
            .await
            .expect("server stops in time")
            .expect("server task")
            .expect("server exits cleanly");
        self.dir.take().unwrap()
    }

    pub async fn create(&self, yaml: &str) -> pb::Pipeline {
        self.client
            .clone()
            .create_pipeline(pb::CreatePipelineRequest {
                pipeline: Some(pipeline(yaml)),
            })
            .await
            .expect("create pipeline")
            .into_inner()
            .pipeline
            .unwrap()
    }

    pub async fn run(&self, name: &str, input: Value) -> pb::Execution {
        self.client
            .clone()
            .run_pipeline(pb::RunPipelineRequest {
                pipeline_name: name.to_string(),
                input: Some(to_struct(input)),
                ..Default::default()
            })
            .await
            .expect("run pipeline")
            .into_inner()
            .execution
            .unwrap()
    }

    pub async fn get(&self, id: &str) -> pb::Execution {
        self.client
            .clone()
            .get_execution(pb::GetExecutionRequest {
                execution_id: id.to_string(),
            })
            .await
            .expect("get execution")
            .into_inner()
            .execution
            .unwrap()
    }

    /// Opens a WatchExecution stream.
    pub async fn watch(
        &self,
        id: &str,
        after: i64,
    ) -> tonic::Streaming<pb::WatchExecutionResponse> {
        self.client
            .clone()
            .watch_execution(pb::WatchExecutionRequest {
                execution_id: id.to_string(),
                after_sequence: after,
            })
            .await
            .expect("watch")
            .into_inner()
    }

    /// Every event after `after` until the stream closes.
    pub async fn events(&self, id: &str, after: i64) -> Vec<pb::ExecutionEvent> {
        let mut stream = self.watch(id, after).await;
        let mut events = Vec::new();
        tokio::time::timeout(PATIENCE, async {
            while let Some(message) = stream.message().await.expect("watch stream") {
                events.push(message.event.unwrap());
            }
        })
        .await
        .expect("execution finishes in time");
        events
    }

    /// Waits for the execution to end and returns it.
    pub async fn finish(&self, id: &str) -> pb::Execution {
        self.events(id, 0).await;
        self.get(id).await
    }

    /// Watches until an event matches, returning the events so far.
    pub async fn wait_for(
        &self,
        id: &str,
        matches: impl Fn(&pb::ExecutionEvent) -> bool,
    ) -> Vec<pb::ExecutionEvent> {
        let mut stream = self.watch(id, 0).await;
        let mut events = Vec::new();
        tokio::time::timeout(PATIENCE, async {
            while let Some(message) = stream.message().await.expect("watch stream") {
                let event = message.event.unwrap();
                let done = matches(&event);
                events.push(event);
                if done {
                    return;
                }
            }
            panic!("stream ended before the awaited event: {events:#?}");
        })
        .await
        .expect("awaited event arrives in time");
        events
    }
}

impl Drop for TestApp {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
    }
}

/// A pipeline message from YAML, the way the CLI reads files.
pub fn pipeline(yaml: &str) -> pb::Pipeline {
    let spec: PipelineSpec = serde_yaml_ng::from_str(yaml).expect("test pipeline YAML");
    convert::spec_to_proto(&spec)
}

pub fn to_struct(value: Value) -> prost_types::Struct {
    convert::json_to_struct(value.as_object().expect("a JSON object"))
}

pub fn to_json(value: &Option<prost_types::Struct>) -> Value {
    let mut violations = convert::Violations::default();
    Value::Object(convert::struct_to_json(value.clone(), "", &mut violations))
}

pub fn step<'a>(execution: &'a pb::Execution, name: &str) -> &'a pb::StepRun {
    execution
        .steps
        .iter()
        .find(|s| s.name == name)
        .unwrap_or_else(|| panic!("no step {name}"))
}

pub fn status(execution: &pb::Execution) -> pb::ExecutionStatus {
    pb::ExecutionStatus::try_from(execution.status).unwrap()
}

pub fn step_status(step: &pb::StepRun) -> pb::StepStatus {
    pb::StepStatus::try_from(step.status).unwrap()
}

pub fn event_type(event: &pb::ExecutionEvent) -> pb::EventType {
    pb::EventType::try_from(event.r#type).unwrap()
}

pub fn millis(t: &Option<prost_types::Timestamp>) -> i64 {
    let t = t.as_ref().expect("timestamp");
    t.seconds * 1000 + i64::from(t.nanos) / 1_000_000
}

/// Asserts sequences are exactly `from..=to` in order.
pub fn assert_gapless(events: &[pb::ExecutionEvent], from: i64) {
    let sequences: Vec<i64> = events.iter().map(|e| e.sequence).collect();
    let expected: Vec<i64> = (from..from + events.len() as i64).collect();
    assert_eq!(sequences, expected, "event sequences must be gapless");
}

/// True once `pid` no longer exists (a zombie awaiting its reaper counts as gone).
pub fn process_gone(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        Ok(stat) => stat
            .rsplit(')')
            .next()
            .is_some_and(|rest| rest.trim_start().starts_with('Z')),
    }
}

/// Polls `condition` until it holds, failing the test after [`PATIENCE`].
pub async fn wait_until(what: &str, condition: impl FnMut() -> bool) {
    wait_until_within(PATIENCE, what, condition).await;
}

/// Polls `condition` until it holds, failing the test after `limit`.
pub async fn wait_until_within(limit: Duration, what: &str, mut condition: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + limit;
    while !condition() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out after {limit:?} waiting until {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A client that sends `authorization: Bearer <token>` with every call.
pub type TokenClient =
    PipelineServiceClient<tonic::service::interceptor::InterceptedService<Channel, BearerToken>>;

/// Adds the bearer token to every call.
#[derive(Clone)]
pub struct BearerToken(tonic::metadata::MetadataValue<tonic::metadata::Ascii>);

impl tonic::service::Interceptor for BearerToken {
    fn call(
        &mut self,
        mut request: tonic::Request<()>,
    ) -> Result<tonic::Request<()>, tonic::Status> {
        request
            .metadata_mut()
            .insert("authorization", self.0.clone());
        Ok(request)
    }
}

impl TestApp {
    /// A client of this server that authenticates with `token`.
    pub async fn client_with_token(&self, token: &str) -> TokenClient {
        PipelineServiceClient::with_interceptor(
            self.channel().await,
            BearerToken(format!("Bearer {token}").parse().expect("an ASCII token")),
        )
    }
}
