//! `grpc` steps: one `pipeline.v1.StepWorkerService/RunStep` call per attempt.
//!
//! The worker streams log lines and progress, which go to the attempt's
//! reporter as they arrive, and ends the stream with one result. Dropping the
//! future (timeout, terminate, shutdown) drops the response stream, which
//! resets the HTTP/2 stream: the worker sees its call cancelled.
//!
//! Each attempt opens its own channel (one HTTP/2 connection) and drops it at
//! the end, rather than sharing cached channels by address. Steps are coarse
//! units of work, so a TCP connect per attempt costs next to nothing beside
//! them, and a fresh connection never carries state over from a previous
//! attempt: a restarted or moved worker is simply dialled again, whereas a
//! cached channel whose connection broke may answer the next call with a
//! spurious UNAVAILABLE before it reconnects. A connect failure is also
//! unambiguous (`worker_unavailable`), and there is no cache to bound.
//!
//! **Egress.** The worker's host is resolved here and every address checked
//! against the server's allowlist (see [`crate::engine::egress`]); the
//! channel connects to a checked address while keeping the address as
//! written for the `:authority` of the call. Nothing allowed: kind
//! `egress_denied`, never retried. `${secrets.NAME}` in metadata values is
//! filled from the server's secrets.

use std::error::Error as _;
use std::time::Duration;

use tonic::codegen::http::Uri;
use tonic::metadata::{AsciiMetadataKey, AsciiMetadataValue};
use tonic::transport::{Channel, Endpoint};
use tonic::{Code, Request, Status};

use super::{Attempt, StepFailure};
use crate::domain::Error;
use crate::domain::data::JsonMap;
use crate::domain::definition::GrpcSpec;
use crate::domain::status::LogStream;
use crate::engine::egress::EgressError;
use crate::engine::secrets::Secrets;
use crate::proto::v1 as pb;
use crate::proto::v1::run_step_response::Message;
use crate::proto::v1::step_worker_service_client::StepWorkerServiceClient;
use crate::proto::v1::worker_result::Outcome;
use crate::transport::convert::{Violations, json_to_struct, struct_to_json};

/// How long connecting to a worker may take.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Largest message accepted from a worker.
pub const MAX_MESSAGE_BYTES: usize = 4 * 1024 * 1024;

pub async fn run(
    spec: &GrpcSpec,
    attempt: &Attempt<'_>,
    secrets: &Secrets,
) -> Result<JsonMap, StepFailure> {
    let request = request(spec, attempt, secrets)?;
    if spec.address.starts_with("https://") {
        // tonic is built without TLS here; retrying cannot help.
        return Err(StepFailure::new(
            "start_failed",
            format!(
                "cannot call {}: this server has no TLS support, use an http:// address",
                spec.address
            ),
        ));
    }
    let channel = connect(&spec.address, attempt).await?;
    let mut client =
        StepWorkerServiceClient::new(channel).max_decoding_message_size(MAX_MESSAGE_BYTES);
    let mut stream = client
        .run_step(request)
        .await
        .map_err(|status| from_status(&spec.address, status))?
        .into_inner();
    loop {
        let message = stream
            .message()
            .await
            .map_err(|status| from_status(&spec.address, status))?;
        let Some(message) = message else {
            return Err(StepFailure::new(
                "worker_error",
                "the worker ended the stream without a result",
            ));
        };
        match message.message {
            Some(Message::Log(log)) => attempt.reporter.log(LogStream::Worker, log.line.as_bytes()),
            Some(Message::Progress(progress)) => attempt
                .reporter
                .progress(progress.percent, &progress.message),
            Some(Message::Result(result)) => return outcome(result),
            // A message of a newer worker.proto that this server does not know.
            None => {}
        }
    }
}

/// A channel to the worker at `address`, connected to an address the
/// egress policy allows.
async fn connect(address: &str, attempt: &Attempt<'_>) -> Result<Channel, StepFailure> {
    let invalid = |why: String| {
        StepFailure::new(
            "start_failed",
            format!("invalid worker address {address}: {why}"),
        )
    };
    let uri: Uri = address.parse().map_err(|e| invalid(chain(&e)))?;
    let host = uri
        .host()
        .filter(|host| !host.is_empty())
        .ok_or_else(|| invalid("no host".to_string()))?;
    let port = uri.port_u16().unwrap_or(80);
    let addrs = attempt
        .egress
        .resolve(host, port)
        .await
        .map_err(|e| match e {
            EgressError::Denied(message) => StepFailure::new("egress_denied", message),
            EgressError::Lookup(message) => StepFailure::new(
                "worker_unavailable",
                format!("cannot connect to {address}: {message}"),
            ),
        })?;
    let mut last_error = String::new();
    for addr in addrs {
        let endpoint = Endpoint::from_shared(format!("http://{addr}"))
            .map_err(|e| invalid(chain(&e)))?
            .origin(uri.clone())
            .connect_timeout(CONNECT_TIMEOUT);
        match endpoint.connect().await {
            Ok(channel) => return Ok(channel),
            Err(e) => last_error = chain(&e),
        }
    }
    Err(StepFailure::new(
        "worker_unavailable",
        format!("cannot connect to {address}: {last_error}"),
    ))
}

/// The RunStep request of an attempt, with the step's metadata.
fn request(
    spec: &GrpcSpec,
    attempt: &Attempt<'_>,
    secrets: &Secrets,
) -> Result<Request<pb::RunStepRequest>, StepFailure> {
    let mut request = Request::new(pb::RunStepRequest {
        execution_id: attempt.execution_id.to_string(),
        pipeline_name: attempt.pipeline_name.to_string(),
        step_name: attempt.step_name.to_string(),
        attempt: i32::try_from(attempt.attempt).unwrap_or(i32::MAX),
        config: Some(json_to_struct(&spec.config)),
        data: Some(json_to_struct(&attempt.input)),
    });
    for (name, value) in &spec.metadata {
        let key = AsciiMetadataKey::from_bytes(name.as_bytes()).map_err(|_| {
            StepFailure::new(
                "start_failed",
                format!("'{name}' is not a valid metadata name"),
            )
        })?;
        let value = super::template::fill_secrets(value, secrets, &format!("metadata.{name}"))?;
        let value = AsciiMetadataValue::try_from(value.as_str()).map_err(|_| {
            StepFailure::new(
                "start_failed",
                format!("the value of metadata '{name}' is not valid (printable ASCII only)"),
            )
        })?;
        request.metadata_mut().insert(key, value);
    }
    Ok(request)
}

/// The step's outcome from the worker's result.
fn outcome(result: pb::WorkerResult) -> Result<JsonMap, StepFailure> {
    match result.outcome {
        Some(Outcome::Output(output)) => {
            let mut violations = Violations::default();
            let output = struct_to_json(Some(output), "output", &mut violations);
            violations.into_result(output).map_err(|error| {
                let problems = match error {
                    Error::InvalidArgument(violations) => violations
                        .iter()
                        .map(|v| format!("{}: {}", v.field, v.description))
                        .collect::<Vec<_>>()
                        .join("; "),
                    other => other.to_string(),
                };
                StepFailure::new(
                    "invalid_output",
                    format!("the worker's output is invalid: {problems}"),
                )
            })
        }
        Some(Outcome::Error(error)) => Err(StepFailure {
            kind: if error.kind.is_empty() {
                "worker_error".to_string()
            } else {
                error.kind
            },
            message: error.message,
        }),
        None => Err(StepFailure::new(
            "worker_error",
            "the worker sent a result with neither output nor error",
        )),
    }
}

/// A failure from a gRPC status of the call.
fn from_status(address: &str, status: Status) -> StepFailure {
    let mut message = status.message().to_string();
    if let Some(source) = status.source() {
        let cause = chain(source);
        if !message.contains(&cause) {
            message = format!("{message}: {cause}");
        }
    }
    match status.code() {
        Code::Unavailable => StepFailure::new(
            "worker_unavailable",
            format!("worker at {address} is unavailable: {message}"),
        ),
        code => StepFailure::new(
            "worker_error",
            format!("worker answered {code:?}: {message}"),
        ),
    }
}

/// An error with its causes, `outer: inner: innermost`.
fn chain(error: &(dyn std::error::Error + 'static)) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.contains(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text
}
