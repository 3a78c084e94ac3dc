//! Starting and stopping the service: storage, engine, gRPC with health and
//! reflection, gRPC-Web, TLS, graceful shutdown.

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use futures::TryStreamExt;
use tokio::net::TcpListener;
use tokio_util::task::AbortOnDropHandle;
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
use crate::storage::audit::AuditLog;
use crate::telemetry;
use crate::telemetry::metrics::{Metrics, RpcMetricsLayer};
use crate::transport::auth::{AuthConfig, AuthLayer, Authenticator};
use crate::transport::deadline::DeadlineLayer;
use crate::transport::decode_errors;
use crate::transport::request_context::RequestContextLayer;
use crate::transport::service::PipelineApi;
use crate::transport::tls::{self, TlsConfig};
use crate::transport::write_batching::BatchedWrites;

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
    // ----- telemetry (see `crate::telemetry`) -----
    /// Where to serve Prometheus metrics (`GET /metrics`); `None`: nowhere.
    /// Port 0 picks a free port, logged as `metrics serving addr=...`.
    pub metrics_listen: Option<SocketAddr>,
    // --- Transport security ---
    /// Serve TLS with these files; `None`: plaintext.
    pub tls: Option<TlsConfig>,
    /// Allow plaintext on an address other than loopback.
    pub insecure_plaintext: bool,
    /// Who may call: static tokens and/or JWTs; all unset: authentication
    /// off, every caller an admin.
    pub auth: AuthConfig,
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
            metrics_listen: None,
            tls: None,
            insecure_plaintext: false,
            auth: AuthConfig::default(),
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

    /// Refuses plaintext on `addr` unless it is a loopback address or
    /// `insecure_plaintext` says something in front secures the traffic: the
    /// API has no other protection against whoever can reach the port.
    pub fn check_bind_policy(&self, addr: SocketAddr) -> anyhow::Result<()> {
        if self.tls.is_some() || self.insecure_plaintext || addr.ip().to_canonical().is_loopback() {
            return Ok(());
        }
        bail!(
            "refusing to serve plaintext gRPC on {addr}, which is not a loopback address: \
             anyone who can reach it could read and drive every pipeline. Either serve TLS \
             with --tls-cert FILE --tls-key FILE (PIPELINED_TLS_CERT, PIPELINED_TLS_KEY), or, \
             if something in front of the server (a service mesh, a TLS proxy) secures the \
             traffic, allow plaintext with --insecure-plaintext (PIPELINED_INSECURE_PLAINTEXT=true)"
        )
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
    config.check_bind_policy(listener.local_addr()?)?;
    // The TLS files are checked before anything else starts.
    let tls = config.tls.as_ref().map(tls::acceptor).transpose()?;
    let authenticator = Authenticator::load(&config.auth)?;
    if authenticator.is_none() && !listener.local_addr()?.ip().to_canonical().is_loopback() {
        tracing::warn!(
            addr = %listener.local_addr()?,
            "authentication is off and the server listens beyond this machine: every caller \
             is an admin; give --auth-tokens or --jwt-jwks"
        );
    }
    let egress = EgressPolicy::parse(&config.egress_allow).map_err(anyhow::Error::msg)?;
    let url = config.database_url()?;
    let replica = config.replica_id()?;
    let metrics = Arc::new(Metrics::new());
    let store = Store::connect(&url, &replica, config.lease, Arc::clone(&metrics))
        .await
        .with_context(|| format!("cannot open database {url}"))?;
    let audit = AuditLog::start(store.clone());
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
    // Telemetry: the RPC metrics layer and the metrics endpoint, which stops
    // with the engine.
    if let Some(addr) = config.metrics_listen {
        let listener = telemetry::metrics::bind(addr).await?;
        tracing::info!(addr = %listener.local_addr()?, "metrics serving");
        let store = engine.store().clone();
        let count_active = move || {
            let store = store.clone();
            async move { store.count_active().await.map_err(|e| e.to_string()) }
        };
        tokio::spawn(telemetry::metrics::serve(
            listener,
            Arc::clone(&metrics),
            count_active,
            engine.shutdown_token(),
        ));
    }

    // Registered before the server says it serves, so that a SIGHUP from
    // then on reloads rather than ends the process.
    let _reload_on_sighup = tls
        .as_ref()
        .and_then(|(_, cert)| reload_on_sighup(cert.clone()));
    tracing::info!(
        addr = %listener.local_addr()?,
        database = %redact(&url),
        recovered,
        tls = tls.is_some(),
        client_certificates = config.tls.as_ref().is_some_and(|t| t.client_ca.is_some()),
        "pipelined serving"
    );
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
    let router = tonic::transport::Server::builder()
        // Outermost first: gRPC-Web (CORS, then the translation; plain gRPC
        // passes through both), so every layer inside sees ordinary gRPC and
        // its answers reach browsers translated; then the request id and span
        // around everything else, the RPC metrics (which count refused calls
        // too), authentication and roles, the caller's deadline, and the
        // status fixes.
        .accept_http1(true)
        .layer(grpc_web)
        .layer(RequestContextLayer)
        .layer(RpcMetricsLayer::new(metrics))
        .layer(AuthLayer::new(authenticator, audit.clone()))
        .layer(DeadlineLayer)
        .layer(tower::util::MapResponseLayer::new(
            decode_errors::precise_status_for_undecodable,
        ))
        .add_service(health_service)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(
            PipelineServiceServer::new(PipelineApi::new(engine.clone(), audit.clone()))
                .max_decoding_message_size(limits::MAX_MESSAGE_BYTES)
                .max_encoding_message_size(limits::MAX_MESSAGE_BYTES)
                .accept_compressed(CompressionEncoding::Gzip)
                .send_compressed(CompressionEncoding::Gzip),
        );
    let serving: Pin<Box<dyn Future<Output = _> + Send>> = match tls {
        Some((acceptor, _)) => Box::pin(router.serve_with_incoming_shutdown(
            tls::incoming(listener, acceptor).map_ok(BatchedWrites::new),
            on_shutdown,
        )),
        None => Box::pin(router.serve_with_incoming_shutdown(incoming(listener), on_shutdown)),
    };
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
    audit.flush().await;
    tracing::info!("stopped");
    Ok(())
}

/// The plaintext connections accepted on `listener`: TCP_NODELAY (without
/// it a call's trailers, written after its data, wait for the client's
/// delayed ACK: 40 ms per call) and batched writes (see
/// [`crate::transport::write_batching`]).
pub fn incoming(
    listener: TcpListener,
) -> impl futures::Stream<Item = std::io::Result<BatchedWrites<tokio::net::TcpStream>>> {
    TcpIncoming::from(listener)
        .with_nodelay(Some(true))
        .map_ok(BatchedWrites::new)
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

/// Looks at the certificate files on every SIGHUP, until dropped.
fn reload_on_sighup(cert: Arc<tls::ReloadingCert>) -> Option<AbortOnDropHandle<()>> {
    let hangup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup());
    let mut hangup = match hangup {
        Ok(hangup) => hangup,
        Err(error) => {
            tracing::warn!(%error, "cannot handle SIGHUP; the certificate reloads when its files change");
            return None;
        }
    };
    Some(AbortOnDropHandle::new(tokio::spawn(async move {
        while hangup.recv().await.is_some() {
            // A failure is logged by the reload itself.
            if cert.reload() == tls::Reload::Unchanged {
                tracing::info!("SIGHUP: the TLS certificate files have not changed");
            }
        }
    })))
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
