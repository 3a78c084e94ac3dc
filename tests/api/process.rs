//! The real `pipelined` binary as a child process, for tests that must kill
//! the server outright or signal it, and start it again on the same data.

use std::fs::OpenOptions;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use pipelined::proto::v1 as pb;
use pipelined::proto::v1::pipeline_service_client::PipelineServiceClient;
use tokio::process::{Child, Command};
use tonic::transport::Channel;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

use crate::helpers::{Client, PATIENCE};

/// The log line the server writes once it listens, with the bound address in
/// its `addr` field.
pub const SERVING: &str = "pipelined serving";

/// A `pipelined serve` child process and a client connected to it.
///
/// The process is killed (SIGKILL) when this is dropped, so no server
/// outlives its test; if the test is panicking, the server's output is
/// printed first.
pub struct ServerProcess {
    child: Child,
    addr: SocketAddr,
    client: Client,
    log: PathBuf,
}

impl ServerProcess {
    /// Starts `pipelined serve --data-dir <data_dir> --allow-command sh`
    /// plus `extra_args` (which must leave `pipelined` logging at `info`),
    /// and waits until it answers health checks with SERVING.
    ///
    /// Its stdout and stderr are appended to `<data_dir>/server.log`, so the
    /// log of a restarted server follows that of the previous run.
    pub async fn start(data_dir: &Path, extra_args: &[&str]) -> Self {
        Self::start_with_env(data_dir, extra_args, &[]).await
    }

    /// [`ServerProcess::start`] with these environment variables set for the
    /// server. Unless `extra_args` says otherwise, steps may reach
    /// 127.0.0.1 and ::1 (`--egress-allow`), where tests serve.
    pub async fn start_with_env(
        data_dir: &Path,
        extra_args: &[&str],
        env: &[(&str, &str)],
    ) -> Self {
        std::fs::create_dir_all(data_dir).expect("create the data dir");
        let log = data_dir.join("server.log");
        let output = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .expect("open the server log");
        let run_starts_at = output.metadata().expect("server log metadata").len() as usize;
        // The port: `--listen 127.0.0.1:0` makes the server's own bind pick a
        // free port, and the server logs the address it is bound to
        // (`pipelined serving addr=127.0.0.1:PORT`). Reading the port from
        // there leaves no window in which another test could take it, unlike
        // probing a free port with a listener of ours, closing it and passing
        // the number on. A restarted server gets a new port; clients
        // reconnect to `addr()` of the new process.
        // Replicas sharing a database name it in `extra_args`.
        let database = if extra_args.contains(&"--database-url") {
            Vec::new()
        } else {
            crate::helpers::test_database(data_dir)
                .await
                .map(|url| vec!["--database-url".to_string(), url])
                .unwrap_or_default()
        };
        let mut child = Command::new(env!("CARGO_BIN_EXE_pipelined"))
            .arg("serve")
            .args(["--listen", "127.0.0.1:0", "--data-dir"])
            .arg(data_dir)
            .args(["--allow-command", "sh"])
            .args(&database)
            .args(if extra_args.contains(&"--egress-allow") {
                &[][..]
            } else {
                &["--egress-allow", "127.0.0.1/32,::1/128"][..]
            })
            .args(extra_args)
            .envs(env.iter().copied())
            // Settings from the environment must not redirect the database or
            // silence the log line read below.
            .env_remove("PIPELINED_DATABASE_URL")
            .env_remove("PIPELINED_LOG")
            .env_remove("PIPELINED_EGRESS_ALLOW")
            .env_remove("PIPELINED_SECRETS_DIR")
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(output.try_clone().expect("clone the log file"))
            .stderr(output)
            .kill_on_drop(true)
            .spawn()
            .expect("start the pipelined binary");
        let addr = wait_for_address(&mut child, &log, run_starts_at).await;
        // The server listens already, so a lazy channel connects at once.
        let channel = Channel::from_shared(format!("http://{addr}"))
            .unwrap()
            .connect_lazy();
        let server = ServerProcess {
            child,
            addr,
            client: PipelineServiceClient::new(channel.clone()),
            log,
        };
        let status = tokio::time::timeout(
            PATIENCE,
            HealthClient::new(channel).check(HealthCheckRequest {
                service: String::new(),
            }),
        )
        .await
        .expect("health check answers in time")
        .expect("health check")
        .into_inner()
        .status;
        assert_eq!(status, ServingStatus::Serving as i32, "server health");
        server
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// A client of this server (cheap: clones share one connection).
    pub fn client(&self) -> Client {
        self.client.clone()
    }

    /// The address in the latest log line containing `message` (written
    /// like the `pipelined serving addr=...` line), e.g. where
    /// `--metrics-listen 127.0.0.1:0` made the server listen.
    pub fn logged_address(&self, message: &str) -> Option<SocketAddr> {
        self.log()
            .lines()
            .filter(|line| line.contains(message))
            .filter_map(listen_address)
            .next_back()
    }

    /// Everything the server processes started on this data dir have printed.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Kills the server with SIGKILL, as a crash would, and reaps it. Its
    /// step processes, each in its own process group, are not signalled.
    pub async fn kill(mut self) {
        self.child.kill().await.expect("SIGKILL the server");
    }

    /// Sends `signal` (SIGSTOP, SIGCONT...) to the server.
    pub fn signal(&self, signal: Signal) {
        let pid = self.child.id().expect("the server is still running");
        kill(Pid::from_raw(pid as i32), signal).expect("signal the server");
    }

    /// Sends SIGTERM and waits for the graceful shutdown to end.
    pub async fn terminate(mut self) -> ExitStatus {
        let pid = self.child.id().expect("the server is still running");
        kill(Pid::from_raw(pid as i32), Signal::SIGTERM).expect("SIGTERM the server");
        tokio::time::timeout(PATIENCE, self.child.wait())
            .await
            .expect("the server stops in time after SIGTERM")
            .expect("wait for the server")
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        // Already exited (kill, terminate) is fine: this is then a no-op.
        let _ = self.child.start_kill();
        if std::thread::panicking() {
            eprintln!(
                "----- pipelined log ({}) -----\n{}----- end of pipelined log -----",
                self.log.display(),
                self.log()
            );
        }
    }
}

/// Reads the server's output from `run_starts_at` on until the server says
/// where it listens; fails if the process exits first.
async fn wait_for_address(child: &mut Child, log: &Path, run_starts_at: usize) -> SocketAddr {
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        let output = std::fs::read_to_string(log).unwrap_or_default();
        let this_run = output.get(run_starts_at..).unwrap_or_default();
        if let Some(addr) = this_run
            .lines()
            .filter(|line| line.contains(SERVING))
            .find_map(listen_address)
        {
            return addr;
        }
        if let Some(status) = child.try_wait().expect("poll the server process") {
            panic!("pipelined exited with {status} before serving:\n{this_run}");
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "pipelined did not log '{SERVING}' in time:\n{this_run}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The address in a `pipelined serving addr=... ...` log line, with or
/// without ANSI colours around the field name, or in the `addr` field of a
/// JSON log line (`--log-format json`).
pub fn listen_address(line: &str) -> Option<SocketAddr> {
    if line.starts_with('{') {
        let json: serde_json::Value = serde_json::from_str(line).ok()?;
        return json.get("addr")?.as_str()?.parse().ok();
    }
    let plain = strip_ansi(line);
    let value = plain
        .split_whitespace()
        .find_map(|f| f.strip_prefix("addr="))?;
    value.parse().ok()
}

fn strip_ansi(text: &str) -> String {
    let mut plain = String::with_capacity(text.len());
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            // ESC [ parameters final-byte
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            plain.push(c);
        }
    }
    plain
}

// ----- client calls shared by the tests that run the binary -----

pub async fn create(client: &Client, pipeline: pb::Pipeline) {
    client
        .clone()
        .create_pipeline(pb::CreatePipelineRequest {
            pipeline: Some(pipeline),
        })
        .await
        .expect("create pipeline");
}

pub async fn run(client: &Client, name: &str, input: serde_json::Value) -> pb::Execution {
    client
        .clone()
        .run_pipeline(pb::RunPipelineRequest {
            pipeline_name: name.to_string(),
            input: Some(crate::helpers::to_struct(input)),
            ..Default::default()
        })
        .await
        .expect("run pipeline")
        .into_inner()
        .execution
        .unwrap()
}

pub async fn get(client: &Client, id: &str) -> pb::Execution {
    client
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

pub async fn watch(
    client: &Client,
    id: &str,
    after: i64,
) -> tonic::Streaming<pb::WatchExecutionResponse> {
    client
        .clone()
        .watch_execution(pb::WatchExecutionRequest {
            execution_id: id.to_string(),
            after_sequence: after,
        })
        .await
        .expect("watch")
        .into_inner()
}

/// The events after `after` until the stream closes (heartbeats skipped).
pub async fn watch_to_end(client: &Client, id: &str, after: i64) -> Vec<pb::ExecutionEvent> {
    let mut stream = watch(client, id, after).await;
    let mut events = Vec::new();
    tokio::time::timeout(PATIENCE, async {
        while let Some(message) = stream.message().await.expect("watch stream") {
            events.extend(message.event);
        }
    })
    .await
    .unwrap_or_else(|_| panic!("execution {id} ends in time"));
    events
}
