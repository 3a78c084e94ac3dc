//! Starting and stopping the service: storage, engine, gRPC with health and
//! reflection, gRPC-Web, graceful shutdown.

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use tokio::net::TcpListener;
use tonic::codec::CompressionEncoding;
use tonic::transport::server::TcpIncoming;
use tonic_health::ServingStatus;

use crate::domain::definition::CommandPolicy;
use crate::domain::limits;
use crate::engine::egress::EgressPolicy;
use crate::engine::secrets::SecretStore;
use crate::engine::{Engine, EngineConfig};
use crate::proto::v1::pipeline_service_server::PipelineServiceServer;
use crate::storage::Store;
use crate::transport::deadline::DeadlineLayer;
use crate::transport::decode_errors;
use crate::transport::request_context::RequestContextLayer;
use crate::transport::service::PipelineApi;

/// What `pipelined serve` is configured with.
#[derive(Debug, Clone)]
pub struct ServeConfig {
    pub listen: SocketAddr,
    /// Where the SQLite file lives when no database URL is given.
    pub data_dir: PathBuf,
    /// `sqlite://...` or `postgres://...`; overrides `data_dir`.
    pub database_url: Option<String>,
    pub max_parallel_steps: usize,
    /// Programs `command` steps may run; empty disables command steps.
    pub allow_commands: Vec<String>,
    /// How long in-flight calls and streams (a health `Watch`, say) may go
    /// on after shutdown begins before their connections are closed.
    pub shutdown_grace: Duration,
    /// How long a watch stream may stay silent before a heartbeat is sent.
    pub heartbeat_interval: Duration,
    /// This server's name in execution leases; `None` uses the one kept in
    /// the data directory (made up on first start).
    pub replica_id: Option<String>,
    /// How long a replica's lease on an execution lasts unless renewed: how
    /// soon another replica takes over the executions of one that died.
    pub lease: Duration,
    /// Origins whose pages may call the API with gRPC-Web (`*`: any);
    /// empty: no cross-origin browser access.
    pub cors_allow_origins: Vec<String>,
    /// Where `http` and `grpc` steps may connect: CIDRs, host names
    /// (`*.example.com`), each with an optional `:port`, or `public`
    /// (see [`crate::engine::egress`]). Empty: nowhere.
    pub egress_allow: Vec<String>,
    /// Directory of secret files for `${secrets.NAME}` (besides the
    /// `PIPELINED_SECRET_<NAME>` environment variables).
    pub secrets_dir: Option<PathBuf>,
}

impl Default for ServeConfig {
    /// The defaults of `pipelined serve`'s flags.
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 50051)),
            data_dir: PathBuf::from("./data"),
            database_url: None,
            max_parallel_steps: 16,
            allow_commands: Vec::new(),
            shutdown_grace: Duration::from_secs(10),
            heartbeat_interval: Duration::from_secs(15),
            replica_id: None,
            lease: Duration::from_secs(15),
            cors_allow_origins: Vec::new(),
            egress_allow: vec!["public".to_string()],
            secrets_dir: None,
        }
    }
}

impl ServeConfig {
    /// The replica id in effect: the configured one, or the one kept in
    /// `<data-dir>/replica-id`, created on first use.
    pub fn replica_id(&self) -> anyhow::Result<String> {
        if let Some(id) = self.replica_id.as_ref().filter(|id| !id.is_empty()) {
            return Ok(id.clone());
        }
        let path = self.data_dir.join("replica-id");
        if let Ok(id) = std::fs::read_to_string(&path)
            && !id.trim().is_empty()
        {
            return Ok(id.trim().to_string());
        }
        std::fs::create_dir_all(&self.data_dir)
            .with_context(|| format!("cannot create data directory {}", self.data_dir.display()))?;
        let id = uuid::Uuid::now_v7().to_string();
        std::fs::write(&path, &id).with_context(|| format!("cannot write {}", path.display()))?;
        Ok(id)
    }

    /// The database URL in effect, creating the data directory if needed.
    pub fn database_url(&self) -> anyhow::Result<String> {
        if let Some(url) = &self.database_url {
            return Ok(url.clone());
        }
        std::fs::create_dir_all(&self.data_dir)
            .with_context(|| format!("cannot create data directory {}", self.data_dir.display()))?;
        Ok(format!(
            "sqlite://{}?mode=rwc",
            self.data_dir.join("pipelined.db").display()
        ))
    }
}

/// Serves on `listener` until `shutdown` completes, then stops gracefully:
/// health turns NOT_SERVING, watch streams end with UNAVAILABLE (clients
/// reconnect with their last sequence), in-flight calls finish, and running
/// step attempts are stopped to run again at the next start.
pub async fn serve(
    config: ServeConfig,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let egress = EgressPolicy::parse(&config.egress_allow).map_err(anyhow::Error::msg)?;
    let url = config.database_url()?;
    let replica = config.replica_id()?;
    let store = Store::connect(&url, &replica, config.lease)
        .await
        .with_context(|| format!("cannot open database {url}"))?;
    let engine = Engine::new(
        store,
        EngineConfig {
            max_parallel_steps: config.max_parallel_steps.max(1),
            commands: CommandPolicy::new(config.allow_commands.clone()),
            process_dir: Some(config.data_dir.join("processes")),
            heartbeat_interval: config.heartbeat_interval,
            egress,
            secrets: SecretStore::new(config.secrets_dir.clone()),
        },
    )
    .with_context(|| format!("cannot use data directory {}", config.data_dir.display()))?;
    let recovered = engine
        .recover()
        .await
        .context("cannot resume unfinished executions")?;

    let (health, health_service) = tonic_health::server::health_reporter();
    health
        .set_serving::<PipelineServiceServer<PipelineApi>>()
        .await;
    let reflection_v1 = reflection().build_v1()?;
    let reflection_v1alpha = reflection().build_v1alpha()?;
    let grpc_web = crate::transport::grpc_web::layer(&config.cors_allow_origins)?;

    tracing::info!(addr = %listener.local_addr()?, database = %redact(&url), recovered, "pipelined serving");
    let stopping = engine.shutdown_token();
    let (began, shutdown_began) = tokio::sync::oneshot::channel();
    let on_shutdown = async move {
        shutdown.await;
        tracing::info!("shutting down");
        health
            .set_service_status("", ServingStatus::NotServing)
            .await;
        health
            .set_not_serving::<PipelineServiceServer<PipelineApi>>()
            .await;
        stopping.cancel();
        let _ = began.send(());
    };
    let serving = tonic::transport::Server::builder()
        // Outermost first: gRPC-Web (CORS, then the translation; plain gRPC
        // passes through both), so every layer inside sees ordinary gRPC and
        // its answers reach browsers translated; then the request id and span
        // around everything else, the caller's deadline, and the status fixes.
        .accept_http1(true)
        .layer(grpc_web)
        .layer(RequestContextLayer)
        .layer(DeadlineLayer)
        .layer(tower::util::MapResponseLayer::new(
            decode_errors::precise_status_for_undecodable,
        ))
        .add_service(health_service)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(
            PipelineServiceServer::new(PipelineApi::new(engine.clone()))
                .max_decoding_message_size(limits::MAX_MESSAGE_BYTES)
                .max_encoding_message_size(limits::MAX_MESSAGE_BYTES)
                .accept_compressed(CompressionEncoding::Gzip)
                .send_compressed(CompressionEncoding::Gzip),
        )
        .serve_with_incoming_shutdown(
            // Without TCP_NODELAY a call's trailers, written after its
            // data, wait for the client's delayed ACK: 40 ms per call.
            TcpIncoming::from(listener).with_nodelay(Some(true)),
            on_shutdown,
        );
    let grace_over = async {
        match shutdown_began.await {
            Ok(()) => tokio::time::sleep(config.shutdown_grace).await,
            Err(_) => std::future::pending().await,
        }
    };
    tokio::select! {
        served = serving => served?,
        _ = grace_over => tracing::warn!(
            grace = ?config.shutdown_grace,
            "closing connections still open after the shutdown grace period"
        ),
    }
    engine.shutdown().await;
    tracing::info!("stopped");
    Ok(())
}

/// Reflection over every message this server speaks, advertising only the
/// services it serves: `StepWorkerService` is in the same descriptor set but
/// is served by workers, not here.
fn reflection() -> tonic_reflection::server::Builder<'static> {
    tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(crate::proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .with_service_name("pipeline.v1.PipelineService")
        .with_service_name("grpc.health.v1.Health")
        .with_service_name("grpc.reflection.v1.ServerReflection")
}

/// Completes on SIGINT or SIGTERM.
pub async fn signal() {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}

/// The URL without its password, for logs.
fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            format!("{}://***{}", &url[..scheme], &url[at..])
        }
        _ => url.to_string(),
    }
}
