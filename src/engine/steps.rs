//! Running one attempt of one step.

mod grpc;
mod http;
pub mod logs;
mod template;

pub(crate) use template::percent_encode;

use std::process::Stdio;
use std::time::Duration;

use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio_util::sync::CancellationToken;

use super::egress::EgressPolicy;
use super::processes::ProcessRegistry;
use super::secrets::{SecretStore, Secrets};
use crate::domain::data::JsonMap;
use crate::domain::definition::{CommandPolicy, CommandSpec, StepKind};
use crate::domain::limits;
use crate::domain::status::LogStream;
use logs::LineSplitter;
pub use logs::{Reporter, StepReport};

/// How many bytes of a command's stderr a failure message keeps (the tail).
pub const STDERR_TAIL_BYTES: usize = 4096;
/// Longest stdout line that is considered as a command's JSON output.
pub const MAX_OUTPUT_LINE_BYTES: usize = 8 * 1024 * 1024;

/// Why an attempt failed: a kind that retry policies match on, and a
/// message for people.
#[derive(Debug, Clone, PartialEq)]
pub struct StepFailure {
    pub kind: String,
    pub message: String,
}

impl StepFailure {
    pub fn new(kind: &str, message: impl Into<String>) -> Self {
        Self {
            kind: limits::without_nul(kind.to_string()),
            message: limits::without_nul(message.into()),
        }
    }
}

/// How an attempt ended.
#[derive(Debug, Clone, PartialEq)]
pub enum StepOutcome {
    Succeeded(JsonMap),
    Failed(StepFailure),
    /// Stopped by a terminate request or by server shutdown.
    Cancelled(String),
}

/// Everything one attempt needs.
pub struct Attempt<'a> {
    pub kind: &'a StepKind,
    pub execution_id: &'a str,
    pub pipeline_name: &'a str,
    pub step_name: &'a str,
    pub attempt: u32,
    /// The input merged with the outputs of the step's ancestors.
    pub input: JsonMap,
    pub timeout: Option<Duration>,
    pub commands: &'a CommandPolicy,
    /// Where running process groups are recorded, if anywhere.
    pub processes: Option<&'a ProcessRegistry>,
    /// Where log lines and progress go while the attempt runs.
    pub reporter: &'a Reporter,
    /// Cancelled to stop the attempt now.
    pub cancel: CancellationToken,
    /// Where `http` and `grpc` steps may connect.
    pub egress: &'a EgressPolicy,
    /// Where `${secrets.NAME}` values come from.
    pub secrets: &'a SecretStore,
}

/// Runs one attempt to its end, its timeout, or its cancellation. Dropping
/// the work on timeout or cancellation kills a command's whole process group.
/// An output over the size or nesting limits fails the attempt.
///
/// The secrets the step refers to are read first (one missing fails the
/// attempt with kind `secret_missing`); their values are masked in
/// everything the attempt reports, its output and its failure message.
pub async fn run(attempt: Attempt<'_>) -> StepOutcome {
    let mut names = std::collections::BTreeSet::new();
    for (field, name) in attempt.kind.secret_references() {
        match name {
            Ok(name) => names.insert(name),
            // Stored before names were checked when defined.
            Err(problem) => {
                return StepOutcome::Failed(StepFailure::new(
                    "secret_missing",
                    format!("{field}: {problem}"),
                ));
            }
        };
    }
    let secrets = match attempt.secrets.resolve(&names).await {
        Ok(secrets) => secrets,
        Err(failure) => return StepOutcome::Failed(failure),
    };
    let redactor = secrets.redactor();
    attempt.reporter.redact_with(redactor.clone());
    let cancel = attempt.cancel.clone();
    let timeout = attempt.timeout;
    let work = async {
        match timeout {
            Some(limit) => tokio::time::timeout(limit, execute(&attempt, &secrets))
                .await
                .unwrap_or_else(|_| {
                    Err(StepFailure::new(
                        "timeout",
                        format!("timed out after {}", humantime::format_duration(limit)),
                    ))
                }),
            None => execute(&attempt, &secrets).await,
        }
    };
    tokio::select! {
        biased;
        _ = cancel.cancelled() => StepOutcome::Cancelled("terminated".to_string()),
        result = work => match result.map(|output| redactor.object(output)).and_then(check_output) {
            Ok(output) => StepOutcome::Succeeded(output),
            Err(failure) => StepOutcome::Failed(redactor.failure(failure)),
        },
    }
}

fn check_output(output: JsonMap) -> Result<JsonMap, StepFailure> {
    if limits::contains_nul(&output) {
        return Err(StepFailure::new(
            "invalid_output",
            "the output holds a NUL character, which cannot be stored",
        ));
    }
    limits::check_object(&output, limits::MAX_STEP_OUTPUT_BYTES)
        .map(|()| output)
        .map_err(|problem| StepFailure::new("output_too_large", format!("the output {problem}")))
}

/// The outcome of a built-in step that finishes at once (`noop`, `set`,
/// `fail`) without running it as a task; `None` for every other kind.
pub fn instant(kind: &StepKind) -> Option<StepOutcome> {
    let result = match kind {
        StepKind::Noop {} => Ok(JsonMap::new()),
        StepKind::Set { values } => Ok(values.clone()),
        StepKind::Fail { message } => Err(failure(message)),
        _ => return None,
    };
    Some(match result.and_then(check_output) {
        Ok(output) => StepOutcome::Succeeded(output),
        Err(failure) => StepOutcome::Failed(failure),
    })
}

fn failure(message: &str) -> StepFailure {
    if message.is_empty() {
        StepFailure::new("failed", "step failed")
    } else {
        StepFailure::new("failed", message.to_string())
    }
}

async fn execute(attempt: &Attempt<'_>, secrets: &Secrets) -> Result<JsonMap, StepFailure> {
    match attempt.kind {
        StepKind::Noop {} => Ok(JsonMap::new()),
        StepKind::Sleep { duration } => {
            tokio::time::sleep(*duration).await;
            Ok(JsonMap::new())
        }
        StepKind::Fail { message } => Err(failure(message)),
        StepKind::Set { values } => Ok(values.clone()),
        StepKind::Command(spec) => run_command(spec, attempt, secrets).await,
        StepKind::Http(spec) => http::run(spec, attempt, secrets).await,
        StepKind::Grpc(spec) => grpc::run(spec, attempt, secrets).await,
    }
}

/// Kills a process group when dropped: when the command ends, times out or
/// is cancelled, nothing it started outlives the step.
struct ProcessGroup(Pid);

impl Drop for ProcessGroup {
    fn drop(&mut self) {
        // ESRCH (the group is already gone) is the common, harmless case.
        let _ = killpg(self.0, Signal::SIGKILL);
    }
}

/// The prefix of the server's own environment variables (settings and
/// secrets), none of which a command step inherits.
const SERVER_ENV_PREFIX: &str = "PIPELINED_";

async fn run_command(
    spec: &CommandSpec,
    attempt: &Attempt<'_>,
    secrets: &Secrets,
) -> Result<JsonMap, StepFailure> {
    if !attempt.commands.allows(&spec.program) {
        return Err(StepFailure::new(
            "start_failed",
            format!(
                "program '{}' is not allowed on this server (see --allow-command)",
                spec.program
            ),
        ));
    }
    let mut command = tokio::process::Command::new(&spec.program);
    // The server's own settings (a database URL with its password, say)
    // are not the program's business, and its secrets reach a program only
    // through `${secrets.NAME}`: no `PIPELINED_*` variable is inherited.
    for (key, _) in std::env::vars_os() {
        if key
            .to_str()
            .is_some_and(|key| key.starts_with(SERVER_ENV_PREFIX))
        {
            command.env_remove(key);
        }
    }
    for (key, value) in &spec.env {
        let value = template::fill_secrets(value, secrets, &format!("env.{key}"))?;
        command.env(key, value);
    }
    command
        .args(&spec.args)
        .env("PIPELINED_EXECUTION_ID", attempt.execution_id)
        .env("PIPELINED_STEP", attempt.step_name)
        .env("PIPELINED_ATTEMPT", attempt.attempt.to_string())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .kill_on_drop(true);
    if !spec.working_dir.is_empty() {
        command.current_dir(&spec.working_dir);
    }
    let mut child = command.spawn().map_err(|e| {
        StepFailure::new(
            "start_failed",
            format!("cannot start '{}': {e}", spec.program),
        )
    })?;
    let record = child
        .id()
        .and_then(|pid| attempt.processes.map(|registry| registry.record(pid)));
    let group = child
        .id()
        .map(|pid| ProcessGroup(Pid::from_raw(pid as i32)));

    let mut stdin_payload = serde_json::to_vec(&attempt.input).unwrap_or_default();
    stdin_payload.push(b'\n');
    let stdin = child.stdin.take();
    let write_stdin = async move {
        if let Some(mut stdin) = stdin {
            // A program that does not read its stdin is fine.
            let _ = stdin.write_all(&stdin_payload).await;
        }
    };
    let stdout = child.stdout.take();
    let stderr = child.stderr.take();
    let wait = async {
        let status = child.wait().await;
        // The program is done: stop whatever it left behind, which also
        // closes the pipes those leftovers held open.
        drop(group);
        drop(record);
        status
    };
    let ((), last_line, stderr_tail, status) = tokio::join!(
        write_stdin,
        read_last_line(
            stdout,
            LineSplitter::new(attempt.reporter, LogStream::Stdout)
        ),
        read_tail(
            stderr,
            STDERR_TAIL_BYTES,
            LineSplitter::new(attempt.reporter, LogStream::Stderr)
        ),
        wait
    );
    let status = status.map_err(|e| {
        StepFailure::new(
            "start_failed",
            format!("waiting for '{}' failed: {e}", spec.program),
        )
    })?;
    if !status.success() {
        let how = match (
            status.code(),
            std::os::unix::process::ExitStatusExt::signal(&status),
        ) {
            (Some(code), _) => format!("exited with status {code}"),
            (None, Some(signal)) => format!("killed by signal {signal}"),
            _ => "failed".to_string(),
        };
        let tail = String::from_utf8_lossy(&stderr_tail);
        let tail = tail.trim();
        return Err(StepFailure::new(
            "exit_status",
            if tail.is_empty() {
                format!("{} {how}", spec.program)
            } else {
                format!("{} {how}: {tail}", spec.program)
            },
        ));
    }
    Ok(match serde_json::from_slice(&last_line) {
        Ok(serde_json::Value::Object(output)) => output,
        _ => JsonMap::new(),
    })
}

/// The last non-empty line of a stream, reading it all in bounded memory;
/// every line also goes to `lines`.
async fn read_last_line(
    stream: Option<impl AsyncRead + Unpin>,
    mut lines: LineSplitter<'_>,
) -> Vec<u8> {
    let Some(mut stream) = stream else {
        return Vec::new();
    };
    let mut last = Vec::new();
    let mut current = Vec::new();
    let mut too_long = false;
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = match stream.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        lines.feed(&buf[..n]);
        for line in buf[..n].split_inclusive(|&b| b == b'\n') {
            let complete = line.ends_with(b"\n");
            let line = line.strip_suffix(b"\n").unwrap_or(line);
            if !too_long {
                current.extend_from_slice(line);
                if current.len() > MAX_OUTPUT_LINE_BYTES {
                    too_long = true;
                    current.clear();
                }
            }
            if complete {
                if !too_long && !current.iter().all(u8::is_ascii_whitespace) {
                    last = std::mem::take(&mut current);
                }
                current.clear();
                too_long = false;
            }
        }
    }
    lines.finish();
    if !too_long && !current.iter().all(u8::is_ascii_whitespace) {
        last = current;
    }
    last
}

/// The last `limit` bytes of a stream; every line also goes to `lines`.
async fn read_tail(
    stream: Option<impl AsyncRead + Unpin>,
    limit: usize,
    mut lines: LineSplitter<'_>,
) -> Vec<u8> {
    let Some(mut stream) = stream else {
        return Vec::new();
    };
    let mut tail = Vec::with_capacity(limit * 2);
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        match stream.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                lines.feed(&buf[..n]);
                tail.extend_from_slice(&buf[..n]);
                if tail.len() > limit {
                    tail.drain(..tail.len() - limit);
                }
            }
        }
    }
    lines.finish();
    tail
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn last_line_skips_trailing_blank_lines() {
        let reporter = Reporter::discard();
        let lines = || LineSplitter::new(&reporter, LogStream::Stdout);
        let data: &[u8] = b"log\n{\"a\":1}\n\n";
        assert_eq!(read_last_line(Some(data), lines()).await, b"{\"a\":1}");
        let unterminated: &[u8] = b"x\n{\"b\":2}";
        assert_eq!(
            read_last_line(Some(unterminated), lines()).await,
            b"{\"b\":2}"
        );
    }

    #[tokio::test]
    async fn tail_keeps_the_end() {
        let data = vec![b'x'; 10_000];
        let reporter = Reporter::discard();
        let lines = LineSplitter::new(&reporter, LogStream::Stderr);
        assert_eq!(read_tail(Some(&data[..]), 100, lines).await.len(), 100);
    }
}
