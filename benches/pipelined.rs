//! Benchmark harness for pipelined (issue 6): latency, throughput, watch
//! fan-out, memory per idle watcher and the unary floor, over real gRPC on
//! loopback. See BENCHMARKS.md.
//!
//! `cargo bench --bench pipelined -- [--scenario NAME] [--quick] [--markdown]
//! [--database-url postgres://...]`
//!
//! The server runs in a child process (this binary re-executed with the
//! hidden `--serve` flag) so that its memory can be read alone from
//! `/proc/<pid>/status`; every scenario gets a fresh child and a fresh
//! database. The child also serves a bare tonic service on a second port:
//! a unary echo, the floor that `GetExecution` is compared with, and a
//! server stream fed from a broadcast channel, the floor of watch-fanout.

use std::fmt::Write as _;
use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context as TaskContext, Poll};
use std::time::{Duration, Instant, SystemTime};

use anyhow::{Context, anyhow, bail};
use clap::{Parser, ValueEnum};
use pipelined::proto::v1 as pb;
use pipelined::proto::v1::pipeline_service_client::PipelineServiceClient;
use tokio::io::AsyncBufReadExt;
use tonic::codegen::http;
use tonic::transport::{Channel, Endpoint};

type Client = PipelineServiceClient<Channel>;

/// The allocator `pipelined` itself uses (src/main.rs), so that the server
/// child measures what `pipelined serve` runs.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Longest any single execution of the latency scenarios may take.
const PATIENCE: Duration = Duration::from_secs(120);

#[derive(Parser, Debug)]
#[command(about = "pipelined benchmarks (run with `cargo bench --bench pipelined -- ...`)")]
struct Args {
    /// Scenarios to run (repeatable or comma-separated); default: all.
    #[arg(long, value_enum, value_delimiter = ',')]
    scenario: Vec<Scenario>,
    /// Shorter runs: fewer iterations, 3 s instead of 10 s for timed loops.
    #[arg(long)]
    quick: bool,
    /// Print the results table as Markdown.
    #[arg(long)]
    markdown: bool,
    /// PostgreSQL server to use instead of SQLite: a URL of a database on a
    /// server where the bench may create databases; each scenario gets a
    /// fresh database there, dropped afterwards. A `sqlite://` URL is passed
    /// to the server as is.
    #[arg(long)]
    database_url: Option<String>,
    /// The server's `--max-parallel-steps`.
    #[arg(long, default_value_t = 64)]
    max_parallel_steps: usize,
    /// Concurrent clients of the throughput and unary scenarios.
    #[arg(long, default_value_t = 64)]
    clients: usize,
    /// Clients sharing one HTTP/2 connection in the throughput and unary scenarios.
    #[arg(long, default_value_t = 8)]
    clients_per_connection: usize,
    /// Length of each timed loop (default 10 s, 3 s with --quick).
    #[arg(long, value_parser = humantime::parse_duration)]
    duration: Option<Duration>,
    /// Watchers of the watch-fanout scenario.
    #[arg(long, default_value_t = 1000)]
    watchers: usize,
    /// The sleep before the chain in watch-fanout: time for every watcher to connect.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "2s")]
    fanout_sleep: Duration,
    /// Time between the waves of the watch-floor scenario (0: back to back).
    #[arg(long, value_parser = humantime::parse_duration, default_value = "10ms")]
    floor_gap: Duration,
    /// Open watch streams of the idle-watchers scenario.
    #[arg(long, default_value_t = 10_000)]
    idle_watchers: usize,
    /// Executions those idle watchers are spread over.
    #[arg(long, default_value_t = 100)]
    idle_executions: usize,
    /// Watch streams per HTTP/2 connection in idle-watchers.
    #[arg(long, default_value_t = 100)]
    idle_streams_per_connection: usize,
    /// The server's log filter (its stderr goes to a file in its temp dir;
    /// `pipelined serve` defaults to `info`).
    #[arg(long, default_value = "warn")]
    server_log: String,

    /// Passed by `cargo bench`; ignored.
    #[arg(long, hide = true)]
    bench: bool,
    /// Internal: run as the server child.
    #[arg(long, hide = true)]
    serve: bool,
    /// Internal: the server child's data directory.
    #[arg(long, hide = true)]
    data_dir: Option<PathBuf>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Scenario {
    #[value(name = "chain-40")]
    Chain40,
    #[value(name = "fanout-40")]
    Fanout40,
    #[value(name = "throughput-1")]
    Throughput1,
    #[value(name = "throughput-5")]
    Throughput5,
    #[value(name = "watch-fanout")]
    WatchFanout,
    #[value(name = "watch-floor")]
    WatchFloor,
    #[value(name = "idle-watchers")]
    IdleWatchers,
    #[value(name = "unary-floor")]
    UnaryFloor,
}

impl Scenario {
    fn name(self) -> &'static str {
        match self {
            Scenario::Chain40 => "chain-40",
            Scenario::Fanout40 => "fanout-40",
            Scenario::Throughput1 => "throughput-1",
            Scenario::Throughput5 => "throughput-5",
            Scenario::WatchFanout => "watch-fanout",
            Scenario::WatchFloor => "watch-floor",
            Scenario::IdleWatchers => "idle-watchers",
            Scenario::UnaryFloor => "unary-floor",
        }
    }
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    if args.serve {
        runtime.block_on(child_main(args))
    } else {
        runtime.block_on(driver_main(args))
    }
}

// ---------------------------------------------------------------------------
// The server child: pipelined plus a bare echo service.

async fn child_main(args: Args) -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_new(&args.server_log)?)
        .with_writer(std::io::stderr)
        .init();
    let data_dir = args
        .data_dir
        .context("--data-dir is required with --serve")?;
    let api = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let echo = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let api_addr = api.local_addr()?;
    println!("pipelined {api_addr}");
    println!("echo {}", echo.local_addr()?);
    use std::io::Write as _;
    std::io::stdout().flush()?;

    tokio::spawn(async move {
        let served = tonic::transport::Server::builder()
            .add_service(EchoServer::default())
            .serve_with_incoming(pipelined::server::incoming(echo))
            .await;
        if let Err(error) = served {
            eprintln!("echo server failed: {error}");
        }
    });

    let config = pipelined::server::ServeConfig {
        listen: api_addr,
        data_dir,
        database_url: args.database_url,
        max_parallel_steps: args.max_parallel_steps,
        shutdown_grace: Duration::from_secs(1),
        ..Default::default()
    };
    pipelined::server::serve(config, api, pipelined::server::signal()).await
}

/// The echo message: a string, sent back as is.
#[derive(Clone, PartialEq, prost::Message)]
struct EchoMessage {
    #[prost(string, tag = "1")]
    text: String,
}

const ECHO_PATH: &str = "/bench.Echo/Echo";

/// A hand-written service with tonic's own codec path and nothing else: no
/// layers, no storage. Its connections are accepted like pipelined's
/// (`server::incoming`: TCP_NODELAY, batched writes), so that the floors
/// differ from pipelined only in what pipelined does per call.
/// `/bench.Echo/Echo` is the unary floor; `/bench.Echo/Broadcast` the
/// streaming floor (see [`BroadcastRequest`]).
#[derive(Clone, Default)]
struct EchoServer {
    /// The broadcast being gathered: watchers subscribe until `watchers` have.
    floor: Arc<std::sync::Mutex<Option<FloorSender>>>,
}

type FloorSender = tokio::sync::broadcast::Sender<pb::WatchExecutionResponse>;

const BROADCAST_PATH: &str = "/bench.Echo/Broadcast";

/// Request of `/bench.Echo/Broadcast`: once `watchers` streams are open, the
/// server sends `waves` waves of `per_wave` watch messages (shaped like
/// watch-fanout's step events, stamped with the time they are sent) to
/// every stream through a tokio broadcast channel, `gap_micros` apart, then
/// ends the streams. The delivery floor of tonic on this machine: no
/// storage, no layers, no executor.
#[derive(Clone, PartialEq, prost::Message)]
struct BroadcastRequest {
    #[prost(uint32, tag = "1")]
    watchers: u32,
    #[prost(uint32, tag = "2")]
    waves: u32,
    #[prost(uint32, tag = "3")]
    per_wave: u32,
    #[prost(uint64, tag = "4")]
    gap_micros: u64,
}

struct BroadcastMethod(Arc<std::sync::Mutex<Option<FloorSender>>>);

type FloorStream =
    Pin<Box<dyn futures::Stream<Item = Result<pb::WatchExecutionResponse, tonic::Status>> + Send>>;

impl tonic::server::ServerStreamingService<BroadcastRequest> for BroadcastMethod {
    type Response = pb::WatchExecutionResponse;
    type ResponseStream = FloorStream;
    type Future = std::future::Ready<Result<tonic::Response<FloorStream>, tonic::Status>>;

    fn call(&mut self, request: tonic::Request<BroadcastRequest>) -> Self::Future {
        let request = request.into_inner();
        let (receiver, complete) = {
            let mut floor = self.0.lock().expect("floor lock");
            let sender = floor
                .get_or_insert_with(|| tokio::sync::broadcast::channel(4096).0)
                .clone();
            let receiver = sender.subscribe();
            let complete = sender.receiver_count() >= request.watchers as usize;
            if complete {
                *floor = None;
            }
            (receiver, complete.then_some(sender))
        };
        if let Some(sender) = complete {
            tokio::spawn(broadcast_waves(sender, request));
        }
        let stream = futures::stream::unfold(receiver, |mut receiver| async move {
            let message = receiver.recv().await.ok()?;
            Some((Ok(message), receiver))
        });
        std::future::ready(Ok(tonic::Response::new(Box::pin(stream) as FloorStream)))
    }
}

async fn broadcast_waves(sender: FloorSender, request: BroadcastRequest) {
    // Time for the last stream's response headers to reach its client.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut sequence = 0i64;
    for wave in 0..request.waves {
        if wave > 0 && request.gap_micros > 0 {
            tokio::time::sleep(Duration::from_micros(request.gap_micros)).await;
        }
        for _ in 0..request.per_wave {
            sequence += 1;
            let _ = sender.send(floor_message(sequence));
        }
    }
}

/// A watch message the size of watch-fanout's step events.
fn floor_message(sequence: i64) -> pb::WatchExecutionResponse {
    let step = sequence / 2;
    pb::WatchExecutionResponse {
        event: Some(pb::ExecutionEvent {
            execution_id: "019af0c2-3b1e-7c4a-9d2f-5e8a1b6c7d90".into(),
            sequence,
            r#type: pb::EventType::StepSucceeded as i32,
            time: Some(SystemTime::now().into()),
            execution_status: pb::ExecutionStatus::Running as i32,
            step_name: format!("s{step}"),
            attempt: 1,
            duration: Some(prost_types::Duration {
                seconds: 0,
                nanos: 41_000,
            }),
            progress: Some(pb::Progress {
                steps_done: step as i32,
                steps_total: 41,
                percent: step as f64 * 100.0 / 41.0,
            }),
            pipeline_name: "watch-fanout".into(),
            ..Default::default()
        }),
        heartbeat: None,
    }
}

struct EchoMethod;

impl tonic::server::UnaryService<EchoMessage> for EchoMethod {
    type Response = EchoMessage;
    type Future = std::future::Ready<Result<tonic::Response<EchoMessage>, tonic::Status>>;

    fn call(&mut self, request: tonic::Request<EchoMessage>) -> Self::Future {
        std::future::ready(Ok(tonic::Response::new(request.into_inner())))
    }
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send + 'static>>;

impl tower::Service<http::Request<tonic::body::Body>> for EchoServer {
    type Response = http::Response<tonic::body::Body>;
    type Error = std::convert::Infallible;
    type Future = BoxFuture<Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, _: &mut TaskContext<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<tonic::body::Body>) -> Self::Future {
        let floor = Arc::clone(&self.floor);
        Box::pin(async move {
            if request.uri().path() == ECHO_PATH {
                let mut grpc = tonic::server::Grpc::new(tonic_prost::ProstCodec::default());
                Ok(grpc.unary(EchoMethod, request).await)
            } else if request.uri().path() == BROADCAST_PATH {
                let mut grpc = tonic::server::Grpc::new(tonic_prost::ProstCodec::default());
                Ok(grpc.server_streaming(BroadcastMethod(floor), request).await)
            } else {
                Ok(tonic::Status::unimplemented("no such method").into_http())
            }
        })
    }
}

impl tonic::server::NamedService for EchoServer {
    const NAME: &'static str = "bench.Echo";
}

// ---------------------------------------------------------------------------
// The parent: starting and stopping children.

/// Where a scenario sends its calls; `Copy`, so scenarios never borrow the child.
#[derive(Clone, Copy, Debug)]
struct Target {
    api: SocketAddr,
    echo: SocketAddr,
    pid: u32,
}

struct Server {
    child: tokio::process::Child,
    target: Target,
    dir: tempfile::TempDir,
    postgres: Option<PostgresDatabase>,
}

struct PostgresDatabase {
    admin_url: String,
    name: String,
}

impl Server {
    async fn start(args: &Args) -> anyhow::Result<Server> {
        let dir = tempfile::Builder::new()
            .prefix("pipelined-bench")
            .tempdir()?;
        let (database_url, postgres) = match args.database_url.as_deref() {
            Some(url) if url.starts_with("postgres") => {
                let database = PostgresDatabase::create(url).await?;
                (Some(database.url()?), Some(database))
            }
            Some(url) => (Some(url.to_string()), None),
            None => (None, None),
        };
        let stderr = std::fs::File::create(dir.path().join("server.stderr"))?;
        let mut command = tokio::process::Command::new(std::env::current_exe()?);
        command
            .arg("--serve")
            .arg("--data-dir")
            .arg(dir.path().join("data"))
            .arg("--max-parallel-steps")
            .arg(args.max_parallel_steps.to_string())
            .arg("--server-log")
            .arg(&args.server_log)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(stderr)
            .kill_on_drop(true);
        if let Some(url) = &database_url {
            command.arg("--database-url").arg(url);
        }
        let mut child = command.spawn().context("cannot start the server child")?;
        let pid = child.id().context("child pid")?;
        let stdout = child.stdout.take().context("child stdout")?;
        let mut lines = tokio::io::BufReader::new(stdout).lines();
        let mut api = None;
        let mut echo = None;
        let reading = async {
            while api.is_none() || echo.is_none() {
                let Some(line) = lines.next_line().await? else {
                    bail!("the server child closed its stdout before printing its addresses");
                };
                match line.split_once(' ') {
                    Some(("pipelined", addr)) => api = Some(addr.parse::<SocketAddr>()?),
                    Some(("echo", addr)) => echo = Some(addr.parse::<SocketAddr>()?),
                    _ => {}
                }
            }
            Ok(())
        };
        let read = tokio::time::timeout(Duration::from_secs(60), reading).await;
        let mut server = Server {
            child,
            target: Target {
                api: api.unwrap_or(([0, 0, 0, 0], 0).into()),
                echo: echo.unwrap_or(([0, 0, 0, 0], 0).into()),
                pid,
            },
            dir,
            postgres,
        };
        match read {
            Ok(Ok(())) => {}
            Ok(Err(error)) => return Err(server.failure(error).await),
            Err(_) => return Err(server.failure(anyhow!("no addresses after 60 s")).await),
        }
        // The listener is bound before migrations run; wait until calls are answered.
        let target = server.target;
        let ready = server
            .guard(async move {
                let mut client = connect_client(target.api).await?;
                tokio::time::timeout(
                    Duration::from_secs(120),
                    client.list_pipelines(pb::ListPipelinesRequest::default()),
                )
                .await
                .context("the server did not answer within 120 s")??;
                Ok(())
            })
            .await;
        match ready {
            Ok(()) => Ok(server),
            Err(error) => Err(server.failure(error).await),
        }
    }

    fn stderr(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("server.stderr")).unwrap_or_default()
    }

    /// `error`, with the child's stderr, after stopping it.
    async fn failure(mut self, error: anyhow::Error) -> anyhow::Error {
        let _ = self.child.start_kill();
        let _ = self.child.wait().await;
        let stderr = self.stderr();
        self.drop_database().await;
        error.context(format!("server stderr:\n{}", tail(&stderr, 60)))
    }

    /// Runs `scenario`, failing with the child's stderr if the child dies first.
    async fn guard<T>(
        &mut self,
        scenario: impl Future<Output = anyhow::Result<T>>,
    ) -> anyhow::Result<T> {
        tokio::select! {
            result = scenario => result,
            status = self.child.wait() => Err(anyhow!(
                "the server child exited during the scenario ({status:?})"
            )),
        }
    }

    /// SIGTERM, wait, clean up; fails if the child did not exit cleanly.
    async fn stop(mut self) -> anyhow::Result<()> {
        let pid = nix::unistd::Pid::from_raw(self.target.pid as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let status = match tokio::time::timeout(Duration::from_secs(30), self.child.wait()).await {
            Ok(status) => status?,
            Err(_) => {
                let _ = self.child.start_kill();
                self.child.wait().await?;
                let stderr = self.stderr();
                self.drop_database().await;
                bail!(
                    "the server did not stop within 30 s of SIGTERM; stderr:\n{}",
                    tail(&stderr, 60)
                );
            }
        };
        let stderr = self.stderr();
        self.drop_database().await;
        if !status.success() {
            bail!(
                "the server exited with {status} after SIGTERM; stderr:\n{}",
                tail(&stderr, 60)
            );
        }
        Ok(())
    }

    async fn drop_database(&mut self) {
        if let Some(database) = self.postgres.take()
            && let Err(error) = database.drop().await
        {
            eprintln!("warning: cannot drop the bench database: {error:#}");
        }
    }
}

impl PostgresDatabase {
    async fn create(admin_url: &str) -> anyhow::Result<PostgresDatabase> {
        let name = format!("pipelined_bench_{}", uuid::Uuid::now_v7().simple());
        let admin = sea_orm::Database::connect(admin_url)
            .await
            .with_context(|| format!("cannot connect to {}", redact(admin_url)))?;
        sea_orm::ConnectionTrait::execute_unprepared(&admin, &format!("CREATE DATABASE {name}"))
            .await
            .context("cannot create the bench database")?;
        admin.close().await.ok();
        Ok(PostgresDatabase {
            admin_url: admin_url.to_string(),
            name,
        })
    }

    fn url(&self) -> anyhow::Result<String> {
        let (base, _) = self
            .admin_url
            .rsplit_once('/')
            .context("a postgres:// URL naming a database")?;
        Ok(format!("{base}/{}", self.name))
    }

    async fn drop(self) -> anyhow::Result<()> {
        let admin = sea_orm::Database::connect(self.admin_url.as_str()).await?;
        sea_orm::ConnectionTrait::execute_unprepared(
            &admin,
            &format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", self.name),
        )
        .await?;
        admin.close().await.ok();
        Ok(())
    }
}

async fn postgres_version(admin_url: &str) -> anyhow::Result<String> {
    let admin = sea_orm::Database::connect(admin_url).await?;
    let row = sea_orm::ConnectionTrait::query_one_raw(
        &admin,
        sea_orm::Statement::from_string(sea_orm::DbBackend::Postgres, "SHOW server_version"),
    )
    .await?
    .context("no answer to SHOW server_version")?;
    let version: String = row.try_get("", "server_version")?;
    admin.close().await.ok();
    Ok(version)
}

fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            format!("{}://***{}", &url[..scheme], &url[at..])
        }
        _ => url.to_string(),
    }
}

/// Resident set size and its high-water mark of `pid`, in bytes.
fn rss(pid: u32) -> anyhow::Result<(u64, u64)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let field = |name: &str| -> anyhow::Result<u64> {
        let line = status
            .lines()
            .find(|l| l.starts_with(name))
            .with_context(|| format!("no {name} in /proc/{pid}/status"))?;
        let kib: u64 = line[name.len()..]
            .trim()
            .trim_end_matches("kB")
            .trim()
            .parse()?;
        Ok(kib * 1024)
    };
    Ok((field("VmRSS:")?, field("VmHWM:")?))
}

/// CPU time (user + system) used so far by process `pid`, or by this
/// process with `"self"`; /proc counts it in USER_HZ ticks (100 per second).
fn cpu_time(pid: &str) -> anyhow::Result<Duration> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // The fields after the command name, which is in parentheses: utime
    // and stime are the 12th and 13th.
    let rest = stat
        .rsplit_once(')')
        .with_context(|| format!("unexpected /proc/{pid}/stat"))?
        .1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| -> anyhow::Result<u64> {
        Ok(fields
            .get(i)
            .with_context(|| format!("short /proc/{pid}/stat"))?
            .parse()?)
    };
    Ok(Duration::from_millis((ticks(11)? + ticks(12)?) * 10))
}

/// CPU time of the server child and of this process (the clients) from
/// its start, for the watch scenarios' notes.
struct CpuMeter {
    server_pid: String,
    server_before: Duration,
    clients_before: Duration,
}

impl CpuMeter {
    fn start(server_pid: u32) -> anyhow::Result<Self> {
        let server_pid = server_pid.to_string();
        Ok(Self {
            server_before: cpu_time(&server_pid)?,
            clients_before: cpu_time("self")?,
            server_pid,
        })
    }

    /// "server X (Y µs per delivery), clients Z (W µs)" since the start.
    fn note(&self, deliveries: usize) -> anyhow::Result<String> {
        let server = cpu_time(&self.server_pid)?.saturating_sub(self.server_before);
        let clients = cpu_time("self")?.saturating_sub(self.clients_before);
        let per_delivery = |cpu: Duration| cpu.as_secs_f64() * 1e6 / deliveries.max(1) as f64;
        Ok(format!(
            "server {} ({:.1} µs per delivery), clients {} ({:.1} µs)",
            ms(server),
            per_delivery(server),
            ms(clients),
            per_delivery(clients)
        ))
    }
}

/// When the server stamped a watched event (or the floor its message).
fn event_time(event: &pb::ExecutionEvent) -> anyhow::Result<SystemTime> {
    SystemTime::try_from(event.time.context("event time")?)
        .map_err(|e| anyhow!("bad event time: {e:?}"))
}

fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / (1024.0 * 1024.0))
}

// ---------------------------------------------------------------------------
// Clients and pipelines.

async fn channel(addr: SocketAddr) -> anyhow::Result<Channel> {
    Ok(Endpoint::from_shared(format!("http://{addr}"))?
        .connect()
        .await?)
}

async fn connect_client(addr: SocketAddr) -> anyhow::Result<Client> {
    Ok(Client::new(channel(addr).await?))
}

/// `n` separate HTTP/2 connections.
async fn channels(addr: SocketAddr, n: usize) -> anyhow::Result<Vec<Channel>> {
    futures::future::try_join_all((0..n.max(1)).map(|_| channel(addr))).await
}

fn noop(name: &str, needs: Option<&str>) -> pb::Step {
    pb::Step {
        name: name.to_string(),
        needs: needs.map(|n| vec![n.to_string()]).unwrap_or_default(),
        kind: Some(pb::step::Kind::Noop(pb::NoopStep {})),
        ..Default::default()
    }
}

fn sleep(name: &str, duration: Duration) -> pb::Step {
    pb::Step {
        name: name.to_string(),
        kind: Some(pb::step::Kind::Sleep(pb::SleepStep {
            duration: Some(prost_types::Duration {
                seconds: duration.as_secs() as i64,
                nanos: duration.subsec_nanos() as i32,
            }),
        })),
        ..Default::default()
    }
}

/// `n` noops, each needing the previous one (the first needs `after`).
fn chain(n: usize, after: Option<&str>) -> Vec<pb::Step> {
    (0..n)
        .map(|i| {
            let previous = if i == 0 {
                after.map(str::to_string)
            } else {
                Some(format!("s{}", i - 1))
            };
            noop(&format!("s{i}"), previous.as_deref())
        })
        .collect()
}

async fn create_pipeline(
    client: &mut Client,
    name: &str,
    steps: Vec<pb::Step>,
    max_parallel_steps: i32,
) -> anyhow::Result<()> {
    client
        .create_pipeline(pb::CreatePipelineRequest {
            pipeline: Some(pb::Pipeline {
                name: name.to_string(),
                steps,
                max_parallel_steps,
                ..Default::default()
            }),
        })
        .await
        .with_context(|| format!("cannot create pipeline {name}"))?;
    Ok(())
}

/// `Some(true)` for a succeeded execution's terminal event, `Some(false)`
/// for a failed or cancelled one's, `None` for any other event.
fn terminal(event: &pb::ExecutionEvent) -> Option<bool> {
    match pb::EventType::try_from(event.r#type) {
        Ok(pb::EventType::ExecutionSucceeded) => Some(true),
        Ok(pb::EventType::ExecutionFailed | pb::EventType::ExecutionCancelled) => Some(false),
        _ => None,
    }
}

async fn start(client: &mut Client, pipeline: &str) -> anyhow::Result<pb::Execution> {
    client
        .run_pipeline(pb::RunPipelineRequest {
            pipeline_name: pipeline.to_string(),
            ..Default::default()
        })
        .await?
        .into_inner()
        .execution
        .context("RunPipeline answered without an execution")
}

async fn watch(
    client: &mut Client,
    id: &str,
) -> anyhow::Result<tonic::Streaming<pb::WatchExecutionResponse>> {
    Ok(client
        .watch_execution(pb::WatchExecutionRequest {
            execution_id: id.to_string(),
            after_sequence: 0,
        })
        .await?
        .into_inner())
}

/// RunPipeline, then WatchExecution until the terminal event: the time from
/// sending RunPipeline to receiving that event, and the execution's id.
async fn run_to_end(client: &mut Client, pipeline: &str) -> anyhow::Result<(Duration, String)> {
    let began = Instant::now();
    let execution = start(client, pipeline).await?;
    let mut stream = watch(client, &execution.id).await?;
    let mut elapsed = None;
    while let Some(message) = stream.message().await? {
        let Some(event) = message.event else { continue };
        if let Some(succeeded) = terminal(&event) {
            elapsed = Some(began.elapsed());
            if !succeeded {
                bail!(
                    "execution {} of {pipeline} did not succeed: {:?} {}",
                    execution.id,
                    pb::EventType::try_from(event.r#type),
                    event.message
                );
            }
        }
    }
    let elapsed = elapsed.with_context(|| {
        format!(
            "the watch of {} ended without a terminal event",
            execution.id
        )
    })?;
    Ok((elapsed, execution.id))
}

async fn run_to_end_within(
    client: &mut Client,
    pipeline: &str,
) -> anyhow::Result<(Duration, String)> {
    tokio::time::timeout(PATIENCE, run_to_end(client, pipeline))
        .await
        .with_context(|| format!("an execution of {pipeline} took more than {PATIENCE:?}"))?
}

// ---------------------------------------------------------------------------
// Statistics and results.

#[derive(Clone, Copy, Debug)]
struct Summary {
    count: usize,
    median: Duration,
    p99: Duration,
    max: Duration,
}

fn summarize(mut samples: Vec<Duration>) -> Option<Summary> {
    if samples.is_empty() {
        return None;
    }
    samples.sort_unstable();
    let rank = |q: f64| {
        let index = ((q * samples.len() as f64).ceil() as usize).clamp(1, samples.len()) - 1;
        samples[index]
    };
    Some(Summary {
        count: samples.len(),
        median: rank(0.5),
        p99: rank(0.99),
        max: samples[samples.len() - 1],
    })
}

fn ms(d: Duration) -> String {
    let ms = d.as_secs_f64() * 1000.0;
    if ms >= 100.0 {
        format!("{ms:.0} ms")
    } else if ms >= 10.0 {
        format!("{ms:.1} ms")
    } else {
        format!("{ms:.2} ms")
    }
}

#[derive(Debug, Default)]
struct Row {
    scenario: String,
    median: String,
    p99: String,
    throughput: String,
    target: String,
    /// Whether the target was met; `None` when there is none.
    met: Option<bool>,
    notes: String,
    median_ms: Option<f64>,
}

impl Row {
    fn new(scenario: &str) -> Row {
        Row {
            scenario: scenario.to_string(),
            median: "-".into(),
            p99: "-".into(),
            throughput: "-".into(),
            ..Default::default()
        }
    }

    fn latencies(mut self, summary: Option<Summary>) -> Row {
        if let Some(s) = summary {
            self.median = ms(s.median);
            self.p99 = ms(s.p99);
        }
        self
    }

    fn note(&mut self, note: impl AsRef<str>) {
        if !self.notes.is_empty() {
            self.notes.push_str("; ");
        }
        self.notes.push_str(note.as_ref());
    }

    fn verdict(&self) -> &'static str {
        match self.met {
            Some(true) => "ok",
            Some(false) => "MISSED",
            None => "",
        }
    }
}

fn table(rows: &[Row], markdown: bool) -> String {
    let header = [
        "scenario",
        "median",
        "p99",
        "throughput",
        "target",
        "met",
        "notes",
    ];
    let cells: Vec<[String; 7]> = rows
        .iter()
        .map(|r| {
            [
                r.scenario.clone(),
                r.median.clone(),
                r.p99.clone(),
                r.throughput.clone(),
                r.target.clone(),
                r.verdict().to_string(),
                r.notes.clone(),
            ]
        })
        .collect();
    let mut out = String::new();
    if markdown {
        let _ = writeln!(out, "| {} |", header.join(" | "));
        let _ = writeln!(out, "|{}", "---|".repeat(header.len()));
        for row in &cells {
            let escaped: Vec<String> = row.iter().map(|c| c.replace('|', "\\|")).collect();
            let _ = writeln!(out, "| {} |", escaped.join(" | "));
        }
    } else {
        let mut widths: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
        for row in &cells {
            for (w, c) in widths.iter_mut().zip(row.iter()) {
                *w = (*w).max(c.chars().count());
            }
        }
        let line = |cols: Vec<&str>| {
            let mut s = String::new();
            for (i, (c, w)) in cols.iter().zip(widths.iter()).enumerate() {
                if i + 1 == cols.len() {
                    s.push_str(c);
                } else {
                    let _ = write!(s, "{c:<w$}  ");
                }
            }
            s.trim_end().to_string()
        };
        let _ = writeln!(out, "{}", line(header.to_vec()));
        let _ = writeln!(
            out,
            "{}",
            line(widths.iter().map(|w| &"----------------------------------------------------------------------------------------------------"[..(*w).min(100)]).collect())
        );
        for row in &cells {
            let _ = writeln!(out, "{}", line(row.iter().map(String::as_str).collect()));
        }
    }
    out
}

// ---------------------------------------------------------------------------
// The driver.

async fn driver_main(args: Args) -> anyhow::Result<()> {
    let scenarios = if args.scenario.is_empty() {
        Scenario::value_variants().to_vec()
    } else {
        args.scenario.clone()
    };
    let header = machine_header(&args).await;
    eprintln!("{header}");
    let mut rows = Vec::new();
    for scenario in scenarios {
        eprintln!("==> {}", scenario.name());
        let began = Instant::now();
        let mut server = Server::start(&args).await?;
        let target = server.target;
        let result = server.guard(run_scenario(scenario, &args, target)).await;
        let peak = rss(target.pid).map(|(_, hwm)| hwm).ok();
        let mut scenario_rows = match result {
            Ok(rows) => rows,
            Err(error) => return Err(server.failure(error).await),
        };
        server.stop().await?;
        if let Some(peak) = peak
            && let Some(last) = scenario_rows.last_mut()
        {
            last.note(format!("server peak RSS {}", mib(peak)));
        }
        for row in &scenario_rows {
            eprintln!(
                "    {}: median {} p99 {} throughput {} {} {}",
                row.scenario,
                row.median,
                row.p99,
                row.throughput,
                row.verdict(),
                row.notes
            );
        }
        eprintln!("    ({:.1} s)", began.elapsed().as_secs_f64());
        rows.extend(scenario_rows);
    }
    let mut out = String::new();
    if args.markdown {
        for line in header.lines() {
            let _ = writeln!(out, "- {line}");
        }
        out.push('\n');
    } else {
        let _ = writeln!(out, "{header}\n");
    }
    out.push_str(&table(&rows, args.markdown));
    println!("\n{out}");
    Ok(())
}

async fn run_scenario(scenario: Scenario, args: &Args, target: Target) -> anyhow::Result<Vec<Row>> {
    let timed = args
        .duration
        .unwrap_or(Duration::from_secs(if args.quick { 3 } else { 10 }));
    let (warmup, runs) = if args.quick { (2, 20) } else { (5, 50) };
    match scenario {
        Scenario::Chain40 => {
            let mut client = connect_client(target.api).await?;
            create_pipeline(&mut client, "chain-40", chain(40, None), 0).await?;
            let mut row = sequential(&mut client, "chain-40", warmup, runs).await?;
            row.target = "median < 20 ms".into();
            row.met = Some(row_median_below(&row, 20.0));
            Ok(vec![row])
        }
        Scenario::Fanout40 => {
            let mut client = connect_client(target.api).await?;
            let steps = (0..40).map(|i| noop(&format!("s{i}"), None)).collect();
            create_pipeline(&mut client, "fanout-40", steps, 40).await?;
            let mut row = sequential(&mut client, "fanout-40", warmup, runs).await?;
            row.target = "median < 10 ms".into();
            row.met = Some(row_median_below(&row, 10.0));
            Ok(vec![row])
        }
        Scenario::Throughput1 => throughput(args, target, 1, timed, 2000.0)
            .await
            .map(|r| vec![r]),
        Scenario::Throughput5 => throughput(args, target, 5, timed, 500.0)
            .await
            .map(|r| vec![r]),
        Scenario::WatchFanout => watch_fanout(args, target).await.map(|r| vec![r]),
        Scenario::WatchFloor => watch_floor(args, target).await.map(|r| vec![r]),
        Scenario::IdleWatchers => idle_watchers(args, target).await.map(|r| vec![r]),
        Scenario::UnaryFloor => unary_floor(args, target, timed).await,
    }
}

fn row_median_below(row: &Row, limit_ms: f64) -> bool {
    row.median_ms.is_some_and(|m| m < limit_ms)
}

async fn sequential(
    client: &mut Client,
    pipeline: &str,
    warmup: usize,
    runs: usize,
) -> anyhow::Result<Row> {
    for _ in 0..warmup {
        run_to_end_within(client, pipeline).await?;
    }
    let mut samples = Vec::with_capacity(runs);
    for _ in 0..runs {
        samples.push(run_to_end_within(client, pipeline).await?.0);
    }
    let summary = summarize(samples);
    let mut row = Row::new(pipeline).latencies(summary);
    row.median_ms = summary.map(|s| s.median.as_secs_f64() * 1000.0);
    if let Some(s) = summary {
        row.note(format!(
            "{} sequential runs after {warmup} warm-up, max {}",
            s.count,
            ms(s.max)
        ));
    }
    Ok(row)
}

/// Closed loop: `clients` tasks, `per_connection` to an HTTP/2 connection,
/// each calling `call` back to back until `length` has passed. Returns the
/// latencies of the calls that finished within it.
async fn closed_loop<F, Fut>(
    addr: SocketAddr,
    clients: usize,
    per_connection: usize,
    length: Duration,
    call: F,
) -> anyhow::Result<Vec<Duration>>
where
    F: Fn(Channel) -> Fut + Clone + Send + 'static,
    Fut: Future<Output = anyhow::Result<Duration>> + Send,
{
    let connections = channels(addr, clients.div_ceil(per_connection.max(1))).await?;
    let end = Instant::now() + length;
    let tasks: Vec<_> = (0..clients)
        .map(|i| {
            let channel = connections[i / per_connection.max(1)].clone();
            let call = call.clone();
            tokio::spawn(async move {
                let mut samples = Vec::new();
                while Instant::now() < end {
                    let took = call(channel.clone()).await?;
                    if Instant::now() <= end {
                        samples.push(took);
                    }
                }
                anyhow::Ok(samples)
            })
        })
        .collect();
    let mut samples = Vec::new();
    for task in tasks {
        samples.extend(task.await??);
    }
    Ok(samples)
}

async fn throughput(
    args: &Args,
    target: Target,
    steps: usize,
    length: Duration,
    goal: f64,
) -> anyhow::Result<Row> {
    let name = format!("throughput-{steps}");
    let mut client = connect_client(target.api).await?;
    create_pipeline(&mut client, &name, chain(steps, None), 0).await?;
    // A few runs so that the first connection, statements and pages are warm.
    for _ in 0..3 {
        run_to_end_within(&mut client, &name).await?;
    }
    let pipeline = name.clone();
    let samples = closed_loop(
        target.api,
        args.clients,
        args.clients_per_connection,
        length,
        move |channel| {
            let pipeline = pipeline.clone();
            async move {
                let mut client = Client::new(channel);
                Ok(run_to_end_within(&mut client, &pipeline).await?.0)
            }
        },
    )
    .await?;
    let count = samples.len();
    let rate = count as f64 / length.as_secs_f64();
    let mut row = Row::new(&name).latencies(summarize(samples));
    row.throughput = format!("{rate:.0} exec/s");
    row.target = format!("≥ {goal:.0} exec/s");
    row.met = Some(rate >= goal);
    row.note(format!(
        "{count} executions of {steps} step(s) in {:.0} s, {} clients on {} connections",
        length.as_secs_f64(),
        args.clients,
        args.clients.div_ceil(args.clients_per_connection.max(1))
    ));
    Ok(row)
}

/// Watch streams per HTTP/2 connection in watch-fanout and watch-floor.
const WATCHERS_PER_CONNECTION: usize = 16;

async fn watch_fanout(args: &Args, target: Target) -> anyhow::Result<Row> {
    let mut client = connect_client(target.api).await?;
    let mut steps = vec![sleep("wait", args.fanout_sleep)];
    steps.extend(chain(40, Some("wait")));
    create_pipeline(&mut client, "watch-fanout", steps, 0).await?;
    let connections = channels(target.api, args.watchers.div_ceil(WATCHERS_PER_CONNECTION)).await?;
    let execution = start(&mut client, "watch-fanout").await?;
    let sleep_began = Instant::now();
    let connected_count = Arc::new(AtomicUsize::new(0));
    let tasks: Vec<_> = (0..args.watchers)
        .map(|i| {
            let mut client = Client::new(connections[i / WATCHERS_PER_CONNECTION].clone());
            let id = execution.id.clone();
            let connected_count = Arc::clone(&connected_count);
            tokio::spawn(async move {
                let mut stream = watch(&mut client, &id).await?;
                connected_count.fetch_add(1, Ordering::Relaxed);
                let connected = SystemTime::now();
                let connected_after = sleep_began.elapsed();
                let mut delays = Vec::with_capacity(90);
                let mut early = 0usize;
                let mut saw_sleep_end = false;
                while let Some(message) = stream.message().await? {
                    let arrived = SystemTime::now();
                    let Some(event) = message.event else { continue };
                    let time = event_time(&event)?;
                    if time < connected {
                        continue;
                    }
                    if event.step_name == "wait"
                        && event.r#type == pb::EventType::StepSucceeded as i32
                    {
                        saw_sleep_end = true;
                    }
                    match arrived.duration_since(time) {
                        Ok(delay) => delays.push(delay),
                        Err(_) => {
                            early += 1;
                            delays.push(Duration::ZERO);
                        }
                    }
                }
                anyhow::Ok((delays, early, saw_sleep_end, connected_after))
            })
        })
        .collect();
    let mut delays = Vec::new();
    let mut early = 0;
    let mut in_time = 0;
    let mut last_connected = Duration::ZERO;
    // CPU time is counted from when every watcher is connected (or the
    // sleep is over) to the end: the delivery work, on both sides.
    while connected_count.load(Ordering::Relaxed) < args.watchers
        && sleep_began.elapsed() < args.fanout_sleep
    {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let cpu = CpuMeter::start(target.pid)?;
    for task in tasks {
        let (d, e, saw, connected_after) = tokio::time::timeout(PATIENCE, task)
            .await
            .context("a watcher did not finish")???;
        delays.extend(d);
        early += e;
        in_time += usize::from(saw);
        last_connected = last_connected.max(connected_after);
    }
    let deliveries = delays.len();
    let cpu = cpu.note(deliveries)?;
    let summary = summarize(delays);
    let mut row = Row::new("watch-fanout").latencies(summary);
    row.target = "p99 < 10 ms".into();
    row.met = summary.map(|s| s.p99 < Duration::from_millis(10));
    if let Some(s) = summary {
        row.throughput = format!("{} deliveries", s.count);
        row.note(format!(
            "delay = arrival - event time over (watcher, event) pairs, max {}",
            ms(s.max)
        ));
    }
    if summary.is_some() {
        row.note(format!("CPU while delivering: {cpu}"));
    }
    row.note(format!(
        "{} watchers on {} connections, {in_time} connected before the {:?} sleep ended (last after {})",
        args.watchers,
        connections.len(),
        args.fanout_sleep,
        ms(last_connected)
    ));
    if early > 0 {
        row.note(format!(
            "{early} arrivals before their event time (clock), counted as 0"
        ));
    }
    Ok(row)
}

/// The streaming floor: watch-fanout's 1000 watchers and 41 waves of two
/// messages, sent by the bare tonic service of the same process (see
/// [`BroadcastRequest`]), `--floor-gap` apart.
async fn watch_floor(args: &Args, target: Target) -> anyhow::Result<Row> {
    const WAVES: u32 = 41;
    const PER_WAVE: u32 = 2;
    let connections =
        channels(target.echo, args.watchers.div_ceil(WATCHERS_PER_CONNECTION)).await?;
    let request = BroadcastRequest {
        watchers: args.watchers as u32,
        waves: WAVES,
        per_wave: PER_WAVE,
        gap_micros: args.floor_gap.as_micros() as u64,
    };
    let connected_count = Arc::new(AtomicUsize::new(0));
    let tasks: Vec<_> = (0..args.watchers)
        .map(|i| {
            let channel = connections[i / WATCHERS_PER_CONNECTION].clone();
            let request = request.clone();
            let connected_count = Arc::clone(&connected_count);
            tokio::spawn(async move {
                let mut grpc = tonic::client::Grpc::new(channel);
                grpc.ready().await?;
                let codec: tonic_prost::ProstCodec<BroadcastRequest, pb::WatchExecutionResponse> =
                    tonic_prost::ProstCodec::default();
                let mut stream = grpc
                    .server_streaming(
                        tonic::Request::new(request),
                        http::uri::PathAndQuery::from_static(BROADCAST_PATH),
                        codec,
                    )
                    .await?
                    .into_inner();
                connected_count.fetch_add(1, Ordering::Relaxed);
                let mut delays = Vec::with_capacity((WAVES * PER_WAVE) as usize);
                while let Some(message) = stream.message().await? {
                    let arrived = SystemTime::now();
                    let event = message.event.context("floor message without event")?;
                    let time = event_time(&event)?;
                    delays.push(arrived.duration_since(time).unwrap_or(Duration::ZERO));
                }
                anyhow::Ok(delays)
            })
        })
        .collect();
    while connected_count.load(Ordering::Relaxed) < args.watchers {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let cpu = CpuMeter::start(target.pid)?;
    let mut delays = Vec::new();
    for task in tasks {
        let mut d = tokio::time::timeout(PATIENCE, task)
            .await
            .context("a floor watcher did not finish")???;
        if d.len() != (WAVES * PER_WAVE) as usize {
            bail!(
                "a floor watcher got {} of {} messages",
                d.len(),
                WAVES * PER_WAVE
            );
        }
        delays.append(&mut d);
    }
    let cpu = cpu.note(delays.len())?;
    let summary = summarize(delays);
    let mut row = Row::new("watch-floor").latencies(summary);
    row.target = "(floor of watch-fanout)".into();
    if let Some(s) = summary {
        row.throughput = format!("{} deliveries", s.count);
        row.note(format!(
            "bare tonic server stream in the same process, no layers: {WAVES} waves of {PER_WAVE} messages {:?} apart to {} watchers ({} connections) from a broadcast channel; delay = arrival - send time, max {}; CPU: {cpu}",
            args.floor_gap,
            args.watchers,
            connections.len(),
            ms(s.max),
        ));
    }
    Ok(row)
}

async fn idle_watchers(args: &Args, target: Target) -> anyhow::Result<Row> {
    let mut client = connect_client(target.api).await?;
    create_pipeline(
        &mut client,
        "idle",
        vec![sleep("idle", Duration::from_secs(3600))],
        0,
    )
    .await?;
    let mut ids = Vec::with_capacity(args.idle_executions);
    for _ in 0..args.idle_executions.max(1) {
        ids.push(start(&mut client, "idle").await?.id);
    }
    let per_connection = args.idle_streams_per_connection.max(1);
    let connections = channels(target.api, args.idle_watchers.div_ceil(per_connection)).await?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (baseline, _) = rss(target.pid)?;

    let established = Arc::new(AtomicUsize::new(0));
    let opening = Arc::new(tokio::sync::Semaphore::new(256));
    let began = Instant::now();
    let tasks: Vec<_> = (0..args.idle_watchers)
        .map(|i| {
            let mut client = Client::new(connections[i / per_connection].clone());
            let id = ids[i % ids.len()].clone();
            let established = established.clone();
            let opening = opening.clone();
            tokio::spawn(async move {
                // At most 256 watchers are being opened at once; a permit is
                // given back when the watcher's first event arrives.
                let mut permit = Some(opening.acquire_owned().await?);
                let mut stream = watch(&mut client, &id).await?;
                let mut finished = false;
                while let Some(message) = stream.message().await? {
                    if message.event.is_some() && permit.take().is_some() {
                        established.fetch_add(1, Ordering::Relaxed);
                    }
                    if message.event.as_ref().and_then(terminal).is_some() {
                        finished = true;
                    }
                }
                anyhow::Ok(finished)
            })
        })
        .collect();
    let deadline = Instant::now() + Duration::from_secs(300);
    while established.load(Ordering::Relaxed) < args.idle_watchers {
        if tasks.iter().any(|t| t.is_finished()) {
            bail!(
                "a watcher ended before all were established ({} of {})",
                established.load(Ordering::Relaxed),
                args.idle_watchers
            );
        }
        if Instant::now() > deadline {
            bail!(
                "only {} of {} watchers established after 300 s",
                established.load(Ordering::Relaxed),
                args.idle_watchers
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let open_time = began.elapsed();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (with_watchers, _) = rss(target.pid)?;

    for id in &ids {
        client
            .cancel_execution(pb::CancelExecutionRequest {
                execution_id: id.clone(),
                mode: pb::CancelMode::Terminate as i32,
            })
            .await?;
    }
    let mut unfinished = 0;
    for task in tasks {
        let finished = tokio::time::timeout(PATIENCE, task)
            .await
            .context("a watcher did not end after the cancel")???;
        unfinished += usize::from(!finished);
    }
    if unfinished > 0 {
        bail!("{unfinished} watchers ended without a terminal event");
    }

    let mut row = Row::new("idle-watchers");
    let per_watcher = with_watchers.saturating_sub(baseline) / args.idle_watchers.max(1) as u64;
    row.throughput = format!(
        "{:.0} opens/s",
        args.idle_watchers as f64 / open_time.as_secs_f64()
    );
    row.target = "< 200 MiB RSS".into();
    row.met = Some(with_watchers < 200 * 1024 * 1024);
    row.note(format!(
        "RSS {} before, {} with {} watchers ({} executions, {} connections): {} bytes/watcher; all open in {:.1} s",
        mib(baseline),
        mib(with_watchers),
        args.idle_watchers,
        ids.len(),
        connections.len(),
        per_watcher,
        open_time.as_secs_f64()
    ));
    Ok(row)
}

async fn unary_floor(args: &Args, target: Target, length: Duration) -> anyhow::Result<Vec<Row>> {
    let mut client = connect_client(target.api).await?;
    create_pipeline(&mut client, "unary", chain(5, None), 0).await?;
    let (_, id) = run_to_end_within(&mut client, "unary").await?;
    let size = client
        .get_execution(pb::GetExecutionRequest {
            execution_id: id.clone(),
        })
        .await?
        .into_inner();
    let size = prost::Message::encoded_len(&size);

    let get = {
        let id = id.clone();
        move |channel: Channel| {
            let id = id.clone();
            async move {
                let mut client = Client::new(channel);
                let began = Instant::now();
                client
                    .get_execution(pb::GetExecutionRequest { execution_id: id })
                    .await?;
                Ok(began.elapsed())
            }
        }
    };
    let echo = {
        let text = id.clone();
        move |channel: Channel| {
            let text = text.clone();
            async move {
                let mut grpc = tonic::client::Grpc::new(channel);
                let began = Instant::now();
                grpc.ready().await?;
                let codec: tonic_prost::ProstCodec<EchoMessage, EchoMessage> =
                    tonic_prost::ProstCodec::default();
                grpc.unary(
                    tonic::Request::new(EchoMessage { text }),
                    http::uri::PathAndQuery::from_static(ECHO_PATH),
                    codec,
                )
                .await?;
                Ok(began.elapsed())
            }
        }
    };
    // Warm both up briefly, then measure each alone.
    closed_loop(target.api, 8, 8, Duration::from_millis(500), get.clone()).await?;
    closed_loop(target.echo, 8, 8, Duration::from_millis(500), echo.clone()).await?;
    let per_connection = args.clients_per_connection;
    let get_samples = closed_loop(target.api, args.clients, per_connection, length, get).await?;
    let echo_samples = closed_loop(target.echo, args.clients, per_connection, length, echo).await?;
    let get_rate = get_samples.len() as f64 / length.as_secs_f64();
    let echo_rate = echo_samples.len() as f64 / length.as_secs_f64();
    let ratio = get_rate / echo_rate.max(f64::MIN_POSITIVE);

    let mut get_row = Row::new("unary-floor GetExecution").latencies(summarize(get_samples));
    get_row.throughput = format!("{get_rate:.0} req/s");
    get_row.target = "≥ 0.5 × echo".into();
    get_row.met = Some(ratio >= 0.5);
    get_row.note(format!(
        "{ratio:.2} × echo; a finished 5-step execution, {size}-byte response; {} clients, {} connections",
        args.clients,
        args.clients.div_ceil(per_connection.max(1))
    ));
    let mut echo_row = Row::new("unary-floor echo").latencies(summarize(echo_samples));
    echo_row.throughput = format!("{echo_rate:.0} req/s");
    echo_row.note("bare tonic unary echo in the same server process, no layers");
    Ok(vec![get_row, echo_row])
}

async fn machine_header(args: &Args) -> String {
    let cores = std::thread::available_parallelism()
        .map(|n| n.get().to_string())
        .unwrap_or_else(|_| "?".into());
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|info| {
            info.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, v)| v.trim().to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let load = std::fs::read_to_string("/proc/loadavg")
        .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default();
    let database = match args.database_url.as_deref() {
        Some(url) if url.starts_with("postgres") => {
            let version = postgres_version(url)
                .await
                .unwrap_or_else(|e| format!("version unknown: {e}"));
            format!(
                "PostgreSQL {version} at {} (a fresh database per scenario)",
                redact(url)
            )
        }
        Some(url) => url.to_string(),
        None => "SQLite (a fresh file in a temp dir per scenario; WAL, synchronous=NORMAL)".into(),
    };
    let commit = git(&["rev-parse", "--short", "HEAD"]).unwrap_or_else(|| "unknown".into());
    let dirty =
        git(&["status", "--porcelain", "--untracked-files=no"]).is_some_and(|s| !s.is_empty());
    let profile = if cfg!(debug_assertions) {
        "DEBUG build (numbers are not meaningful; use cargo bench)"
    } else {
        "release (bench profile)"
    };
    let command: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| a != "--bench")
        .map(|a| redact(&a))
        .collect();
    format!(
        "machine: {cores} cores, {cpu}; load average at start {load}\n\
         database: {database}\n\
         date: {}\n\
         commit: {commit}{}\n\
         build: {profile}; server --max-parallel-steps {}, log filter {}\n\
         options: {}",
        chrono::Utc::now().format("%Y-%m-%d %H:%M UTC"),
        if dirty { " (dirty)" } else { "" },
        args.max_parallel_steps,
        args.server_log,
        if command.is_empty() {
            "(defaults)".to_string()
        } else {
            command.join(" ")
        },
    )
}

fn git(args: &[&str]) -> Option<String> {
    let output = std::process::Command::new("git")
        .args(args)
        .current_dir(Path::new(env!("CARGO_MANIFEST_DIR")))
        .output()
        .ok()?;
    output
        .status
        .success()
        .then(|| String::from_utf8_lossy(&output.stdout).trim().to_string())
}
