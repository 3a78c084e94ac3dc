//! The command line: `pipelined serve` runs the service; the other
//! subcommands are a client for people at a terminal.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, bail};
use clap::{Args, Parser, Subcommand, ValueEnum};
use serde_json::{Value, json};
use tonic::Code;
use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::Interceptor;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};
use tonic_types::StatusExt;

use crate::domain::access::Role;
use crate::domain::data::JsonMap;
use crate::domain::definition::PipelineSpec;
use crate::proto::v1 as pb;
use crate::proto::v1::pipeline_service_client::PipelineServiceClient;
use crate::server::{self, ServeConfig};
use crate::telemetry;
use crate::telemetry::tracing::{LogFormat, TracingConfig};
use crate::transport::auth::{self, AuthConfig};
use crate::transport::convert;
use crate::transport::tls::TlsConfig;

#[derive(Debug, Parser)]
#[command(
    name = "pipelined",
    version,
    about = "A pipeline execution service spoken to over gRPC"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the service.
    Serve(Box<ServeArgs>),
    /// Create a pipeline from a YAML or JSON file, or store it as a new version.
    Apply {
        /// The definition file ('-' for stdin).
        #[arg(short = 'f', long = "file")]
        file: PathBuf,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Start an execution of a pipeline.
    Run {
        /// The pipeline's name.
        name: String,
        /// Input data as a JSON object.
        #[arg(long, default_value = "{}")]
        input: String,
        /// Correlation id to store with the execution.
        #[arg(long)]
        correlation_id: Option<String>,
        /// Labels, as key=value (repeatable).
        #[arg(long = "label", value_parser = parse_label)]
        labels: Vec<(String, String)>,
        /// Idempotency key: running again with the same key returns the
        /// same execution instead of starting another.
        #[arg(long)]
        request_id: Option<String>,
        /// Follow the execution until it ends; exit non-zero unless it succeeds.
        #[arg(long)]
        watch: bool,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Show an execution with its steps.
    Get {
        execution_id: String,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// List executions, newest first.
    List {
        /// Only executions of this pipeline.
        #[arg(long)]
        pipeline: Option<String>,
        /// Only executions in these statuses (repeatable), e.g. running.
        #[arg(long = "status")]
        statuses: Vec<String>,
        /// Only executions with this correlation id.
        #[arg(long)]
        correlation_id: Option<String>,
        /// Only executions with this label, as key=value (repeatable).
        #[arg(long = "label", value_parser = parse_label)]
        labels: Vec<(String, String)>,
        /// How many to show.
        #[arg(long, default_value_t = 20)]
        limit: i32,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// List pipelines.
    Pipelines {
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Delete a pipeline and all its versions.
    Delete {
        name: String,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Follow an execution's events until it ends.
    Watch {
        execution_id: String,
        /// Start after this event sequence number.
        #[arg(long, default_value_t = 0)]
        after: i64,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Cancel an execution: running steps finish, unless --terminate.
    Cancel {
        execution_id: String,
        /// Stop running steps now (command steps' process groups are killed).
        #[arg(long)]
        terminate: bool,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Pause an execution: running steps finish, no new step starts.
    Pause {
        execution_id: String,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Resume a paused execution.
    Resume {
        execution_id: String,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Continue a failed or cancelled execution.
    Retry {
        execution_id: String,
        /// Also re-run this step and everything downstream of it.
        #[arg(long)]
        from_step: Option<String>,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Show the audit trail, newest first (admins only).
    Audit {
        /// Only calls of this caller.
        #[arg(long)]
        caller: Option<String>,
        /// Only calls of this RPC, e.g. RunPipeline.
        #[arg(long)]
        method: Option<String>,
        /// Only calls about this pipeline or execution.
        #[arg(long)]
        target: Option<String>,
        /// How many to show.
        #[arg(long, default_value_t = 50)]
        limit: i32,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Print the SHA-256 of a token read from stdin, for the token file; or,
    /// with --generate, make a new random token and print it and its line.
    HashToken {
        /// Make a new token: prints the token, then the token file line.
        #[arg(long)]
        generate: bool,
        /// The token's name in the file line (with --generate).
        #[arg(long, default_value = "NAME", requires = "generate")]
        name: String,
        /// The token's role in the file line (with --generate).
        #[arg(long, default_value = "viewer", requires = "generate", value_parser = clap::builder::PossibleValuesParser::new(Role::NAMES))]
        role: String,
    },
}

#[derive(Debug, Args)]
pub struct ServeArgs {
    /// Address to listen on.
    #[arg(long, env = "PIPELINED_LISTEN", default_value = "127.0.0.1:50051")]
    pub listen: SocketAddr,
    /// Directory of the embedded SQLite database.
    #[arg(long, env = "PIPELINED_DATA_DIR", default_value = "./data")]
    pub data_dir: PathBuf,
    /// Database URL (sqlite://... or postgres://...); overrides --data-dir.
    #[arg(long, env = "PIPELINED_DATABASE_URL")]
    pub database_url: Option<String>,
    /// Steps of one execution that may run at once, unless the pipeline says.
    #[arg(long, env = "PIPELINED_MAX_PARALLEL_STEPS", default_value_t = 16)]
    pub max_parallel_steps: usize,
    /// Allow `command` steps to run this program (repeatable; comma-separated
    /// in the environment variable). Without it, command steps are refused.
    #[arg(
        long = "allow-command",
        env = "PIPELINED_ALLOW_COMMANDS",
        value_delimiter = ','
    )]
    pub allow_commands: Vec<String>,
    /// How long open calls and streams may go on once shutdown begins.
    #[arg(long, env = "PIPELINED_SHUTDOWN_GRACE", default_value = "10s", value_parser = humantime::parse_duration)]
    pub shutdown_grace: std::time::Duration,
    /// How long a watch stream may stay silent before a heartbeat is sent.
    #[arg(long, env = "PIPELINED_HEARTBEAT", default_value = "15s", value_parser = positive_duration)]
    pub heartbeat: std::time::Duration,
    /// This server's name in execution leases (default: one kept in the
    /// data directory).
    #[arg(long, env = "PIPELINED_REPLICA_ID")]
    pub replica_id: Option<String>,
    /// How long a lease on an execution lasts unless renewed; another
    /// replica takes over a dead one's executions after it.
    #[arg(long, env = "PIPELINED_LEASE", default_value = "15s", value_parser = humantime::parse_duration)]
    pub lease: std::time::Duration,
    /// Let pages from this origin (scheme://host[:port]) call the API with
    /// gRPC-Web (repeatable; comma-separated in the environment variable;
    /// `*` allows any origin). Without it, no cross-origin browser access.
    #[arg(
        long = "cors-allow-origin",
        env = "PIPELINED_CORS_ALLOW_ORIGIN",
        value_delimiter = ','
    )]
    pub cors_allow_origins: Vec<String>,
    /// Log filter, e.g. info or pipelined=debug.
    #[arg(long, env = "PIPELINED_LOG", default_value = "info")]
    pub log: String,
    // ----- telemetry (see `crate::telemetry`) -----
    /// Serve Prometheus metrics at http://ADDR/metrics (default: off).
    #[arg(long, env = "PIPELINED_METRICS_LISTEN")]
    pub metrics_listen: Option<SocketAddr>,
    /// Export traces over OTLP/gRPC to this collector URL, e.g.
    /// http://localhost:4317 (default: OTEL_EXPORTER_OTLP_TRACES_ENDPOINT or
    /// OTEL_EXPORTER_OTLP_ENDPOINT if set, else off).
    #[arg(long, env = "PIPELINED_OTLP_ENDPOINT")]
    pub otlp_endpoint: Option<String>,
    /// Log line format: text, or one JSON object per line.
    #[arg(long, env = "PIPELINED_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
    // --- Transport security and the configuration file ---
    /// A TOML file of settings whose keys are these flags' long names
    /// (e.g. `listen = "0.0.0.0:50051"`); flags and environment variables
    /// take precedence over it.
    #[arg(long, env = "PIPELINED_CONFIG")]
    pub config: Option<PathBuf>,
    /// Serve TLS with this PEM certificate chain (needs --tls-key); the file
    /// is re-read when it changes, and on SIGHUP.
    #[arg(long, env = "PIPELINED_TLS_CERT")]
    pub tls_cert: Option<PathBuf>,
    /// The PEM private key of --tls-cert.
    #[arg(long, env = "PIPELINED_TLS_KEY")]
    pub tls_key: Option<PathBuf>,
    /// Require client certificates signed by a CA in this PEM bundle
    /// (mutual TLS; needs --tls-cert).
    #[arg(long, env = "PIPELINED_TLS_CLIENT_CA")]
    pub tls_client_ca: Option<PathBuf>,
    /// Allow plaintext on an address other than loopback (when something in
    /// front, a mesh sidecar or a proxy, secures the traffic).
    #[arg(
        long,
        env = "PIPELINED_INSECURE_PLAINTEXT",
        value_parser = clap::builder::FalseyValueParser::new()
    )]
    pub insecure_plaintext: bool,
    /// File of static bearer tokens, `<name> <role> <sha256-hex>` per line
    /// (see `pipelined hash-token`). With it or --jwt-jwks, every call but
    /// health and reflection needs a token.
    #[arg(long, env = "PIPELINED_AUTH_TOKENS")]
    pub auth_tokens: Option<PathBuf>,
    /// JWKS file (JSON) with the public keys that may sign JWTs.
    #[arg(long, env = "PIPELINED_JWT_JWKS")]
    pub jwt_jwks: Option<PathBuf>,
    /// The issuer (`iss`) JWTs must have; required with --jwt-jwks.
    #[arg(long, env = "PIPELINED_JWT_ISSUER")]
    pub jwt_issuer: Option<String>,
    /// The audience (`aud`) JWTs must have; required with --jwt-jwks.
    #[arg(long, env = "PIPELINED_JWT_AUDIENCE")]
    pub jwt_audience: Option<String>,
    /// The JWT claim holding the caller's role (viewer, operator or admin).
    #[arg(long, env = "PIPELINED_JWT_ROLE_CLAIM", default_value = "role")]
    pub jwt_role_claim: String,
    /// Where `http` and `grpc` steps may connect (repeatable;
    /// comma-separated in the environment variable): a CIDR (10.1.0.0/16,
    /// ::1/128), a host name (api.example.com, *.example.com), each
    /// optionally with :port, or `public` (globally routable addresses).
    #[arg(
        long = "egress-allow",
        env = "PIPELINED_EGRESS_ALLOW",
        value_delimiter = ',',
        default_value = "public"
    )]
    pub egress_allow: Vec<String>,
    /// Directory of secret files: `${secrets.NAME}` in a step reads
    /// DIR/NAME (after the environment variable PIPELINED_SECRET_NAME).
    #[arg(long, env = "PIPELINED_SECRETS_DIR")]
    pub secrets_dir: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct ClientArgs {
    /// The server's address.
    #[arg(
        long,
        env = "PIPELINED_SERVER",
        default_value = "http://127.0.0.1:50051"
    )]
    server: String,
    /// Output format.
    #[arg(long, short = 'o', value_enum, default_value_t = Output::Text)]
    output: Output,
    /// Trust this PEM CA bundle for an https:// server (default: the public
    /// web CAs).
    #[arg(long, env = "PIPELINED_CA_CERT")]
    ca_cert: Option<PathBuf>,
    /// Present this PEM certificate to an https:// server that requires
    /// client certificates (needs --client-key).
    #[arg(long, env = "PIPELINED_CLIENT_CERT")]
    client_cert: Option<PathBuf>,
    /// The PEM private key of --client-cert.
    #[arg(long, env = "PIPELINED_CLIENT_KEY")]
    client_key: Option<PathBuf>,
    /// Bearer token sent with every call.
    #[arg(long, env = "PIPELINED_TOKEN", hide_env_values = true)]
    token: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Output {
    Text,
    Json,
}

/// A duration greater than zero, such as `15s` or `500ms`.
fn positive_duration(text: &str) -> Result<std::time::Duration, String> {
    match humantime::parse_duration(text) {
        Ok(duration) if duration.is_zero() => Err("must be greater than zero".to_string()),
        Ok(duration) => Ok(duration),
        Err(error) => Err(error.to_string()),
    }
}

fn parse_label(text: &str) -> Result<(String, String), String> {
    text.split_once('=')
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .ok_or_else(|| format!("'{text}' is not key=value"))
}

/// Runs a parsed command line; the exit code is 0 on success.
pub async fn main(cli: Cli) -> ExitCode {
    match run(cli).await {
        Ok(code) => code,
        Err(error) => {
            match error.downcast_ref::<tonic::Status>() {
                Some(status) => eprintln!("error: {}", describe_status(status)),
                None => eprintln!("error: {error:#}"),
            }
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    if !matches!(cli.command, Command::Serve(_)) {
        // Like other terminal tools, end quietly when a reader such as
        // `head` closes the pipe, instead of panicking in println!.
        // SAFETY: called before any other thread writes to stdout.
        unsafe {
            let _ = nix::sys::signal::signal(
                nix::sys::signal::Signal::SIGPIPE,
                nix::sys::signal::SigHandler::SigDfl,
            );
        }
    }
    match cli.command {
        Command::Serve(args) => serve(*args).await,
        Command::HashToken {
            generate,
            name,
            role,
        } => hash_token(generate, &name, &role),
        Command::Audit {
            caller,
            method,
            target,
            limit,
            client,
        } => audit(caller, method, target, limit, &client).await,
        Command::Apply { file, client } => apply(&file, &client).await,
        Command::Run {
            name,
            input,
            correlation_id,
            labels,
            request_id,
            watch,
            client,
        } => {
            let input: JsonMap =
                serde_json::from_str(&input).context("--input must be a JSON object")?;
            let mut api = connect(&client).await?;
            let execution = api
                .run_pipeline(pb::RunPipelineRequest {
                    pipeline_name: name,
                    input: Some(convert::json_to_struct(&input)),
                    trigger: Some(pb::Trigger {
                        r#type: pb::TriggerType::Manual as i32,
                        data: None,
                    }),
                    correlation_id: correlation_id.unwrap_or_default(),
                    labels: labels.into_iter().collect(),
                    request_id: request_id.unwrap_or_default(),
                })
                .await?
                .into_inner()
                .execution
                .unwrap_or_default();
            if watch {
                if client.output == Output::Text {
                    println!("execution {} started", execution.id);
                }
                watch_events(&mut api, &execution.id, 0, client.output).await
            } else {
                print_execution(&execution, client.output);
                Ok(ExitCode::SUCCESS)
            }
        }
        Command::Get {
            execution_id,
            client,
        } => {
            let response = connect(&client)
                .await?
                .get_execution(pb::GetExecutionRequest { execution_id })
                .await?;
            Ok(show_execution(
                response.into_inner().execution,
                client.output,
            ))
        }
        Command::List {
            pipeline,
            statuses,
            correlation_id,
            labels,
            limit,
            client,
        } => {
            let statuses = statuses
                .iter()
                .map(|s| {
                    pb::ExecutionStatus::from_str_name(&format!(
                        "EXECUTION_STATUS_{}",
                        s.to_uppercase()
                    ))
                    .map(|s| s as i32)
                    .with_context(|| format!("unknown status '{s}'"))
                })
                .collect::<anyhow::Result<Vec<_>>>()?;
            let executions = connect(&client)
                .await?
                .list_executions(pb::ListExecutionsRequest {
                    pipeline_name: pipeline.unwrap_or_default(),
                    statuses,
                    page_size: limit,
                    page_token: String::new(),
                    correlation_id: correlation_id.unwrap_or_default(),
                    labels: labels.into_iter().collect(),
                })
                .await?
                .into_inner()
                .executions;
            match client.output {
                Output::Json => println!(
                    "{:#}",
                    Value::Array(executions.iter().map(execution_json).collect())
                ),
                Output::Text => {
                    println!(
                        "{:<38} {:<24} {:<12} {:>9}  CREATED",
                        "ID", "PIPELINE", "STATUS", "PROGRESS"
                    );
                    for e in &executions {
                        let p = e.progress.unwrap_or_default();
                        println!(
                            "{:<38} {:<24} {:<12} {:>9}  {}",
                            e.id,
                            format!("{}@{}", e.pipeline_name, e.pipeline_version),
                            status_name(e.status),
                            format!("{}/{}", p.steps_done, p.steps_total),
                            e.created_at.as_ref().map(time_text).unwrap_or_default()
                        );
                    }
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Pipelines { client } => {
            let pipelines = connect(&client)
                .await?
                .list_pipelines(pb::ListPipelinesRequest {
                    page_size: 1000,
                    page_token: String::new(),
                })
                .await?
                .into_inner()
                .pipelines;
            match client.output {
                Output::Json => println!(
                    "{:#}",
                    Value::Array(pipelines.iter().map(pipeline_json).collect())
                ),
                Output::Text => {
                    println!(
                        "{:<32} {:>7} {:>6}  DESCRIPTION",
                        "NAME", "VERSION", "STEPS"
                    );
                    for p in &pipelines {
                        println!(
                            "{:<32} {:>7} {:>6}  {}",
                            p.name,
                            p.version,
                            p.steps.len(),
                            p.description
                        );
                    }
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Delete { name, client } => {
            connect(&client)
                .await?
                .delete_pipeline(pb::DeletePipelineRequest { name: name.clone() })
                .await?;
            match client.output {
                Output::Json => println!("{}", json!({"deleted": name})),
                Output::Text => println!("pipeline {name} deleted"),
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Watch {
            execution_id,
            after,
            client,
        } => {
            let mut api = connect(&client).await?;
            watch_events(&mut api, &execution_id, after, client.output).await
        }
        Command::Pause {
            execution_id,
            client,
        } => {
            let response = connect(&client)
                .await?
                .pause_execution(pb::PauseExecutionRequest { execution_id })
                .await?;
            Ok(show_execution(
                response.into_inner().execution,
                client.output,
            ))
        }
        Command::Resume {
            execution_id,
            client,
        } => {
            let response = connect(&client)
                .await?
                .resume_execution(pb::ResumeExecutionRequest { execution_id })
                .await?;
            Ok(show_execution(
                response.into_inner().execution,
                client.output,
            ))
        }
        Command::Cancel {
            execution_id,
            terminate,
            client,
        } => {
            let mode = if terminate {
                pb::CancelMode::Terminate
            } else {
                pb::CancelMode::Graceful
            };
            let response = connect(&client)
                .await?
                .cancel_execution(pb::CancelExecutionRequest {
                    execution_id,
                    mode: mode as i32,
                })
                .await?;
            Ok(show_execution(
                response.into_inner().execution,
                client.output,
            ))
        }
        Command::Retry {
            execution_id,
            from_step,
            client,
        } => {
            let response = connect(&client)
                .await?
                .retry_execution(pb::RetryExecutionRequest {
                    execution_id,
                    from_step: from_step.unwrap_or_default(),
                })
                .await?;
            Ok(show_execution(
                response.into_inner().execution,
                client.output,
            ))
        }
    }
}

async fn serve(args: ServeArgs) -> anyhow::Result<ExitCode> {
    let telemetry = telemetry::tracing::init(&TracingConfig {
        filter: args.log.clone(),
        format: args.log_format,
        otlp_endpoint: args.otlp_endpoint.clone().or_else(|| {
            [
                "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
                "OTEL_EXPORTER_OTLP_ENDPOINT",
            ]
            .iter()
            .find_map(|name| std::env::var(name).ok().filter(|v| !v.is_empty()))
        }),
    })?;
    let served = serve_with(args).await;
    // Spans still buffered are exported before the process ends.
    telemetry.shutdown().await;
    served
}

async fn serve_with(args: ServeArgs) -> anyhow::Result<ExitCode> {
    let tls = match (args.tls_cert, args.tls_key, args.tls_client_ca) {
        (Some(cert), Some(key), client_ca) => Some(TlsConfig {
            cert,
            key,
            client_ca,
        }),
        (None, None, None) => None,
        (None, None, Some(_)) => bail!("--tls-client-ca needs --tls-cert and --tls-key"),
        (Some(_), None, _) => bail!("--tls-cert needs --tls-key"),
        (None, Some(_), _) => bail!("--tls-key needs --tls-cert"),
    };
    let config = ServeConfig {
        listen: args.listen,
        data_dir: args.data_dir,
        database_url: args.database_url,
        max_parallel_steps: args.max_parallel_steps,
        allow_commands: args
            .allow_commands
            .into_iter()
            .filter(|p| !p.is_empty())
            .collect(),
        shutdown_grace: args.shutdown_grace,
        heartbeat_interval: args.heartbeat,
        replica_id: args.replica_id,
        lease: args.lease,
        cors_allow_origins: args
            .cors_allow_origins
            .into_iter()
            .filter(|o| !o.is_empty())
            .collect(),
        metrics_listen: args.metrics_listen,
        tls,
        insecure_plaintext: args.insecure_plaintext,
        auth: AuthConfig {
            tokens_file: args.auth_tokens,
            jwt_jwks: args.jwt_jwks,
            jwt_issuer: args.jwt_issuer,
            jwt_audience: args.jwt_audience,
            jwt_role_claim: args.jwt_role_claim,
        },
        egress_allow: args
            .egress_allow
            .into_iter()
            .filter(|e| !e.trim().is_empty())
            .collect(),
        secrets_dir: args.secrets_dir,
    };
    // Refused before binding: nothing listens in plaintext, even briefly.
    config.check_bind_policy(args.listen)?;
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("cannot listen on {}", args.listen))?;
    server::serve(config, listener, server::signal()).await?;
    Ok(ExitCode::SUCCESS)
}

/// The API client: every call carries the bearer token, if one is given.
type Api = PipelineServiceClient<InterceptedService<Channel, BearerToken>>;

/// Adds `authorization: Bearer <token>` to every call.
#[derive(Clone)]
struct BearerToken(Option<MetadataValue<Ascii>>);

impl Interceptor for BearerToken {
    fn call(
        &mut self,
        mut request: tonic::Request<()>,
    ) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(value) = &self.0 {
            request
                .metadata_mut()
                .insert("authorization", value.clone());
        }
        Ok(request)
    }
}

async fn connect(args: &ClientArgs) -> anyhow::Result<Api> {
    let token = match args
        .token
        .as_deref()
        .map(str::trim)
        .filter(|t| !t.is_empty())
    {
        Some(token) => Some(
            MetadataValue::try_from(format!("Bearer {token}"))
                .context("--token must be printable ASCII")?,
        ),
        None => None,
    };
    let mut endpoint = Endpoint::from_shared(args.server.clone())
        .with_context(|| format!("--server {} is not a URL", args.server))?;
    if args.server.starts_with("https://") {
        let read = |path: &PathBuf| {
            std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))
        };
        let mut tls = ClientTlsConfig::new();
        tls = match &args.ca_cert {
            Some(path) => tls.ca_certificate(Certificate::from_pem(read(path)?)),
            None => tls.with_webpki_roots(),
        };
        match (&args.client_cert, &args.client_key) {
            (Some(cert), Some(key)) => {
                tls = tls.identity(Identity::from_pem(read(cert)?, read(key)?));
            }
            (None, None) => {}
            _ => bail!("--client-cert and --client-key go together"),
        }
        endpoint = endpoint.tls_config(tls).context("bad TLS settings")?;
    } else if args.ca_cert.is_some() || args.client_cert.is_some() || args.client_key.is_some() {
        bail!(
            "--ca-cert, --client-cert and --client-key are for TLS: give the server as https://{}",
            args.server.trim_start_matches("http://")
        );
    }
    let channel = endpoint.connect().await.with_context(|| {
        let trust = if args.server.starts_with("https://") && args.ca_cert.is_none() {
            " (trusting the public web CAs only; --ca-cert FILE trusts another)"
        } else {
            ""
        };
        format!("cannot reach pipelined at {}{trust}", args.server)
    })?;
    Ok(PipelineServiceClient::with_interceptor(
        channel,
        BearerToken(token),
    ))
}

/// `pipelined hash-token`.
fn hash_token(generate: bool, name: &str, role: &str) -> anyhow::Result<ExitCode> {
    if generate {
        let token = auth::generate_token()?;
        println!("{token}");
        println!("{name} {role} {}", auth::hash_token(&token));
        eprintln!(
            "the first line is the token, for the caller (shown only now); the second goes in \
             the --auth-tokens file"
        );
    } else {
        let text = std::io::read_to_string(std::io::stdin())?;
        let token = text.trim_end_matches(['\n', '\r']);
        if token.is_empty() {
            bail!("give the token on stdin, or use --generate");
        }
        println!("{}", auth::hash_token(token));
    }
    Ok(ExitCode::SUCCESS)
}

/// `pipelined audit`.
async fn audit(
    caller: Option<String>,
    method: Option<String>,
    target: Option<String>,
    limit: i32,
    client: &ClientArgs,
) -> anyhow::Result<ExitCode> {
    let events = connect(client)
        .await?
        .list_audit_events(pb::ListAuditEventsRequest {
            page_size: limit,
            page_token: String::new(),
            caller: caller.unwrap_or_default(),
            method: method.unwrap_or_default(),
            target: target.unwrap_or_default(),
        })
        .await?
        .into_inner()
        .events;
    match client.output {
        Output::Json => println!(
            "{:#}",
            Value::Array(
                events
                    .iter()
                    .map(|e| json!({
                        "id": e.id,
                        "time": opt(e.time.as_ref(), |t| time_text(t).into()),
                        "caller": e.caller,
                        "role": e.role,
                        "method": e.method,
                        "target": e.target,
                        "request_id": e.request_id,
                        "code": e.code,
                        "message": e.message,
                    }))
                    .collect()
            )
        ),
        Output::Text => {
            println!(
                "{:<24} {:<16} {:<8} {:<16} {:<38} {:<18} MESSAGE",
                "TIME", "CALLER", "ROLE", "METHOD", "TARGET", "CODE"
            );
            for e in &events {
                println!(
                    "{:<24} {:<16} {:<8} {:<16} {:<38} {:<18} {}",
                    e.time.as_ref().map(time_text).unwrap_or_default(),
                    e.caller,
                    e.role,
                    e.method,
                    e.target,
                    e.code,
                    e.message
                );
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

async fn apply(file: &PathBuf, client: &ClientArgs) -> anyhow::Result<ExitCode> {
    let text = if file.as_os_str() == "-" {
        std::io::read_to_string(std::io::stdin())?
    } else {
        std::fs::read_to_string(file).with_context(|| format!("cannot read {}", file.display()))?
    };
    // YAML is a superset of JSON, so one parser reads both.
    let spec: PipelineSpec = serde_yaml_ng::from_str(&text)
        .with_context(|| format!("{} is not a valid pipeline", file.display()))?;
    let mut api = connect(client).await?;
    let wanted = convert::spec_to_proto(&spec);
    let existing = match api
        .get_pipeline(pb::GetPipelineRequest {
            name: spec.name.clone(),
            version: 0,
        })
        .await
    {
        Ok(response) => response.into_inner().pipeline,
        Err(status) if status.code() == Code::NotFound => None,
        Err(status) => return Err(status.into()),
    };
    let (pipeline, verb) = match existing {
        Some(current)
            if convert::spec_from_proto(Some(current.clone()), "pipeline").ok() == Some(spec) =>
        {
            (current, "unchanged")
        }
        Some(_) => {
            let response = api
                .update_pipeline(pb::UpdatePipelineRequest {
                    pipeline: Some(wanted),
                })
                .await?;
            (
                response.into_inner().pipeline.unwrap_or_default(),
                "updated",
            )
        }
        None => {
            let response = api
                .create_pipeline(pb::CreatePipelineRequest {
                    pipeline: Some(wanted),
                })
                .await?;
            (
                response.into_inner().pipeline.unwrap_or_default(),
                "created",
            )
        }
    };
    match client.output {
        Output::Json => println!("{:#}", pipeline_json(&pipeline)),
        Output::Text => println!(
            "pipeline {} {verb} (version {})",
            pipeline.name, pipeline.version
        ),
    }
    Ok(ExitCode::SUCCESS)
}

/// Prints events until the terminal one; the exit code says how it ended.
async fn watch_events(
    api: &mut Api,
    execution_id: &str,
    after: i64,
    output: Output,
) -> anyhow::Result<ExitCode> {
    let mut stream = api
        .watch_execution(pb::WatchExecutionRequest {
            execution_id: execution_id.to_string(),
            after_sequence: after,
        })
        .await?
        .into_inner();
    let mut last_status = pb::ExecutionStatus::Unspecified as i32;
    while let Some(response) = stream.message().await? {
        let Some(event) = response.event else {
            continue;
        };
        last_status = event.execution_status;
        match output {
            Output::Json => println!("{}", event_json(&event)),
            Output::Text => println!("{}", event_text(&event)),
        }
    }
    if last_status == pb::ExecutionStatus::Unspecified as i32 {
        // Nothing after `after`: report the execution's current status.
        let execution = api
            .get_execution(pb::GetExecutionRequest {
                execution_id: execution_id.to_string(),
            })
            .await?
            .into_inner()
            .execution
            .unwrap_or_default();
        last_status = execution.status;
    }
    if last_status == pb::ExecutionStatus::Succeeded as i32 {
        Ok(ExitCode::SUCCESS)
    } else if [
        pb::ExecutionStatus::Failed as i32,
        pb::ExecutionStatus::Cancelled as i32,
    ]
    .contains(&last_status)
    {
        Ok(ExitCode::from(1))
    } else {
        bail!("the stream ended before the execution did; resume with --after")
    }
}

fn describe_status(status: &tonic::Status) -> String {
    let mut text = format!("{:?}: {}", status.code(), status.message());
    if let Some(bad_request) = status.get_details_bad_request() {
        for v in bad_request.field_violations {
            text.push_str(&format!("\n  {}: {}", v.field, v.description));
        }
    }
    text
}

fn status_name(status: i32) -> String {
    pb::ExecutionStatus::try_from(status)
        .map(|s| {
            s.as_str_name()
                .trim_start_matches("EXECUTION_STATUS_")
                .to_lowercase()
        })
        .unwrap_or_else(|_| status.to_string())
}

fn step_status_name(status: i32) -> String {
    pb::StepStatus::try_from(status)
        .map(|s| {
            s.as_str_name()
                .trim_start_matches("STEP_STATUS_")
                .to_lowercase()
        })
        .unwrap_or_else(|_| status.to_string())
}

fn event_type_name(kind: i32) -> String {
    pb::EventType::try_from(kind)
        .map(|s| {
            s.as_str_name()
                .trim_start_matches("EVENT_TYPE_")
                .to_lowercase()
        })
        .unwrap_or_else(|_| kind.to_string())
}

fn time_text(t: &prost_types::Timestamp) -> String {
    chrono::DateTime::from_timestamp(t.seconds, t.nanos.max(0) as u32)
        .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true))
        .unwrap_or_default()
}

fn duration_text(d: &prost_types::Duration) -> String {
    format!("{:.3}s", d.seconds as f64 + f64::from(d.nanos) / 1e9)
}

fn struct_json(s: &Option<prost_types::Struct>) -> Value {
    let mut v = convert::Violations::default();
    Value::Object(convert::struct_to_json(s.clone(), "", &mut v))
}

fn progress_bar(p: &pb::Progress) -> String {
    let filled = (p.percent / 5.0).round() as usize;
    format!(
        "[{}{}] {:>3.0}% {}/{}",
        "#".repeat(filled),
        ".".repeat(20 - filled.min(20)),
        p.percent,
        p.steps_done,
        p.steps_total
    )
}

fn event_text(e: &pb::ExecutionEvent) -> String {
    let mut text = format!("#{:<4} {:<26}", e.sequence, event_type_name(e.r#type));
    if !e.step_name.is_empty() {
        text.push_str(&format!(" {}", e.step_name));
        if e.attempt > 0 {
            text.push_str(&format!(" (attempt {})", e.attempt));
        }
    }
    if let Some(d) = &e.duration {
        text.push_str(&format!(" in {}", duration_text(d)));
    }
    if let Ok(stream) = pb::LogStream::try_from(e.log_stream)
        && stream != pb::LogStream::Unspecified
    {
        let stream = stream.as_str_name().trim_start_matches("LOG_STREAM_");
        text.push_str(&format!(" {}> {}", stream.to_lowercase(), e.message));
    } else if e.r#type == pb::EventType::StepProgress as i32 {
        text.push_str(&format!(" {:.0}% {}", e.step_percent, e.message));
    } else if !e.message.is_empty() {
        text.push_str(&format!(": {}", e.message));
    }
    if !e.error_kind.is_empty() {
        text.push_str(&format!(" [{}]", e.error_kind));
    }
    if let Some(at) = &e.next_attempt_at {
        text.push_str(&format!("; next attempt at {}", time_text(at)));
    }
    if let Some(p) = &e.progress {
        text = format!("{text:<72} {}", progress_bar(p));
    }
    if e.execution_data.is_some() {
        text.push_str(&format!(
            "\nexecution_data: {}",
            struct_json(&e.execution_data)
        ));
    }
    text
}

/// Prints the execution an RPC answered with; the subcommand succeeded.
fn show_execution(execution: Option<pb::Execution>, output: Output) -> ExitCode {
    print_execution(&execution.unwrap_or_default(), output);
    ExitCode::SUCCESS
}

fn print_execution(e: &pb::Execution, output: Output) {
    if output == Output::Json {
        println!("{:#}", execution_json(e));
        return;
    }
    let p = e.progress.unwrap_or_default();
    println!("execution   {}", e.id);
    println!(
        "pipeline    {} (version {})",
        e.pipeline_name, e.pipeline_version
    );
    println!("status      {}", status_name(e.status));
    println!("progress    {}", progress_bar(&p));
    if !e.correlation_id.is_empty() {
        println!("correlation {}", e.correlation_id);
    }
    if !e.labels.is_empty() {
        let labels: BTreeMap<_, _> = e.labels.iter().collect();
        println!(
            "labels      {}",
            labels
                .iter()
                .map(|(k, v)| format!("{k}={v}"))
                .collect::<Vec<_>>()
                .join(",")
        );
    }
    if let Some(d) = &e.duration {
        println!("duration    {}", duration_text(d));
    }
    if !e.error_message.is_empty() {
        println!("error       {}", e.error_message);
    }
    println!("data        {}", struct_json(&e.execution_data));
    println!("steps:");
    for s in &e.steps {
        let mut line = format!(
            "  {:<24} {:<10} attempt {}",
            s.name,
            step_status_name(s.status),
            s.attempt
        );
        if let Some(d) = &s.duration {
            line.push_str(&format!("  {}", duration_text(d)));
        }
        if !s.error.is_empty() {
            line.push_str(&format!("  error: {}", s.error));
        }
        if !s.reason.is_empty() {
            line.push_str(&format!("  ({})", s.reason));
        }
        println!("{line}");
    }
}

fn opt<T>(value: Option<T>, f: impl FnOnce(T) -> Value) -> Value {
    value.map(f).unwrap_or(Value::Null)
}

fn execution_json(e: &pb::Execution) -> Value {
    let p = e.progress.unwrap_or_default();
    json!({
        "id": e.id,
        "pipeline_name": e.pipeline_name,
        "pipeline_version": e.pipeline_version,
        "status": status_name(e.status),
        "trigger": opt(e.trigger.as_ref(), |t| json!({
            "type": pb::TriggerType::try_from(t.r#type).map(|t| t.as_str_name().trim_start_matches("TRIGGER_TYPE_").to_lowercase()).unwrap_or_default(),
            "data": struct_json(&t.data),
        })),
        "correlation_id": e.correlation_id,
        "labels": e.labels,
        "input": struct_json(&e.input),
        "execution_data": struct_json(&e.execution_data),
        "error_message": e.error_message,
        "created_at": opt(e.created_at.as_ref(), |t| time_text(t).into()),
        "started_at": opt(e.started_at.as_ref(), |t| time_text(t).into()),
        "finished_at": opt(e.finished_at.as_ref(), |t| time_text(t).into()),
        "duration_seconds": opt(e.duration.as_ref(), |d| json!(d.seconds as f64 + f64::from(d.nanos) / 1e9)),
        "progress": {"steps_done": p.steps_done, "steps_total": p.steps_total, "percent": p.percent},
        "last_sequence": e.last_sequence,
        "steps": e.steps.iter().map(|s| json!({
            "name": s.name,
            "status": step_status_name(s.status),
            "attempt": s.attempt,
            "needs": s.needs,
            "started_at": opt(s.started_at.as_ref(), |t| time_text(t).into()),
            "finished_at": opt(s.finished_at.as_ref(), |t| time_text(t).into()),
            "duration_seconds": opt(s.duration.as_ref(), |d| json!(d.seconds as f64 + f64::from(d.nanos) / 1e9)),
            "output": opt(s.output.as_ref(), |o| struct_json(&Some(o.clone()))),
            "error": s.error,
            "reason": s.reason,
        })).collect::<Vec<_>>(),
    })
}

fn pipeline_json(p: &pb::Pipeline) -> Value {
    let spec = convert::spec_from_proto(Some(p.clone()), "pipeline").ok();
    json!({
        "name": p.name,
        "version": p.version,
        "created_at": opt(p.created_at.as_ref(), |t| time_text(t).into()),
        "definition": serde_json::to_value(spec).unwrap_or(Value::Null),
    })
}

fn event_json(e: &pb::ExecutionEvent) -> Value {
    json!({
        "execution_id": e.execution_id,
        "sequence": e.sequence,
        "type": event_type_name(e.r#type),
        "time": opt(e.time.as_ref(), |t| time_text(t).into()),
        "execution_status": status_name(e.execution_status),
        "step_name": e.step_name,
        "attempt": e.attempt,
        "output": opt(e.output.as_ref(), |o| struct_json(&Some(o.clone()))),
        "message": e.message,
        "duration_seconds": opt(e.duration.as_ref(), |d| json!(d.seconds as f64 + f64::from(d.nanos) / 1e9)),
        "progress": opt(e.progress.as_ref(), |p| json!({"steps_done": p.steps_done, "steps_total": p.steps_total, "percent": p.percent})),
        "execution_data": opt(e.execution_data.as_ref(), |d| struct_json(&Some(d.clone()))),
    })
}
