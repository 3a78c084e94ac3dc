//! Conversions between protobuf messages and domain types. Incoming messages
//! are checked field by field and every problem is reported with its path.

use std::time::Duration;

use chrono::{DateTime, Utc};
use prost_types::value::Kind;
use serde_json::Value;

use crate::domain::data::JsonMap;
use crate::domain::definition::{
    CommandSpec, ConcurrencyMode, ConcurrencyPolicy, GrpcSpec, HttpSpec, PipelineSpec, RetryPolicy,
    StepKind, StepSpec,
};
use crate::domain::model::{Event, Execution, Pipeline, Progress, StepRun, Trigger};
use crate::domain::status::{
    CancelMode, EventKind, ExecutionStatus, LogStream, StepStatus, TriggerKind,
};
use crate::domain::{Error, FieldViolation};
use crate::proto::v1 as pb;

/// Collects violations while a request is read.
#[derive(Default)]
pub struct Violations(Vec<FieldViolation>);

impl Violations {
    pub fn add(&mut self, field: impl Into<String>, description: impl Into<String>) {
        self.0.push(FieldViolation::new(field, description));
    }

    /// `Ok(value)` if nothing was wrong, else INVALID_ARGUMENT with all.
    pub fn into_result<T>(self, value: T) -> Result<T, Error> {
        if self.0.is_empty() {
            Ok(value)
        } else {
            Err(Error::InvalidArgument(self.0))
        }
    }
}

// ----- JSON <-> google.protobuf.Struct -----

pub fn struct_to_json(
    value: Option<prost_types::Struct>,
    path: &str,
    violations: &mut Violations,
) -> JsonMap {
    value
        .map(|s| {
            s.fields
                .into_iter()
                .map(|(k, v)| {
                    let json = value_to_json(v, &format!("{path}.{k}"), violations);
                    (k, json)
                })
                .collect()
        })
        .unwrap_or_default()
}

fn value_to_json(value: prost_types::Value, path: &str, violations: &mut Violations) -> Value {
    match value.kind {
        None | Some(Kind::NullValue(_)) => Value::Null,
        Some(Kind::BoolValue(b)) => Value::Bool(b),
        Some(Kind::StringValue(s)) => Value::String(s),
        Some(Kind::NumberValue(n)) => number_to_json(n).unwrap_or_else(|| {
            violations.add(path, "numbers must be finite");
            Value::Null
        }),
        Some(Kind::StructValue(s)) => Value::Object(struct_to_json(Some(s), path, violations)),
        Some(Kind::ListValue(list)) => Value::Array(
            list.values
                .into_iter()
                .enumerate()
                .map(|(i, v)| value_to_json(v, &format!("{path}[{i}]"), violations))
                .collect(),
        ),
    }
}

/// Whole numbers that a double holds exactly become JSON integers.
fn number_to_json(n: f64) -> Option<Value> {
    const EXACT: f64 = 9_007_199_254_740_992.0; // 2^53
    if n.fract() == 0.0 && n.abs() <= EXACT {
        Some(Value::from(n as i64))
    } else {
        serde_json::Number::from_f64(n).map(Value::Number)
    }
}

pub fn json_to_struct(map: &JsonMap) -> prost_types::Struct {
    prost_types::Struct {
        fields: map
            .iter()
            .map(|(k, v)| (k.clone(), json_to_value(v)))
            .collect(),
    }
}

fn json_to_value(value: &Value) -> prost_types::Value {
    let kind = match value {
        Value::Null => Kind::NullValue(0),
        Value::Bool(b) => Kind::BoolValue(*b),
        Value::Number(n) => Kind::NumberValue(n.as_f64().unwrap_or_default()),
        Value::String(s) => Kind::StringValue(s.clone()),
        Value::Array(items) => Kind::ListValue(prost_types::ListValue {
            values: items.iter().map(json_to_value).collect(),
        }),
        Value::Object(map) => Kind::StructValue(json_to_struct(map)),
    };
    prost_types::Value { kind: Some(kind) }
}

// ----- durations and times -----

fn duration_from_proto(
    d: prost_types::Duration,
    path: &str,
    violations: &mut Violations,
) -> Option<Duration> {
    if d.seconds < 0 || d.nanos < 0 {
        violations.add(path, "must be a non-negative duration");
        return None;
    }
    if d.nanos >= 1_000_000_000 {
        violations.add(
            path,
            format!(
                "nanos must be below 1000000000 (whole seconds go in seconds), not {}",
                d.nanos
            ),
        );
        return None;
    }
    Some(Duration::new(d.seconds as u64, d.nanos as u32))
}

pub fn duration_to_proto(d: Duration) -> prost_types::Duration {
    prost_types::Duration {
        seconds: d.as_secs().min(i64::MAX as u64) as i64,
        nanos: d.subsec_nanos() as i32,
    }
}

pub fn timestamp(t: DateTime<Utc>) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: t.timestamp(),
        nanos: t.timestamp_subsec_nanos() as i32,
    }
}

// ----- pipelines -----

/// [`check_pipeline_name`] of a required name, as a result.
pub fn pipeline_name(name: &str, field: &str) -> Result<(), Error> {
    let mut v = Violations::default();
    check_pipeline_name(field, name, true, &mut v);
    v.into_result(())
}

/// Checks a request's reference to a pipeline by name (`field` is required
/// when `required`): a name no pipeline can have (NUL, control characters,
/// too long) is refused as such, and never reaches the database.
pub fn check_pipeline_name(field: &str, name: &str, required: bool, v: &mut Violations) {
    if name.is_empty() {
        if required {
            v.add(field, "is required");
        }
    } else if let Some(problem) = crate::domain::definition::name_problem(name) {
        v.add(field, problem);
    }
}

/// Reads a pipeline definition; `path` prefixes field paths (`pipeline`).
pub fn spec_from_proto(pipeline: Option<pb::Pipeline>, path: &str) -> Result<PipelineSpec, Error> {
    let mut v = Violations::default();
    let Some(pipeline) = pipeline else {
        v.add(path, "a pipeline is required");
        return v.into_result(PipelineSpec {
            name: String::new(),
            description: String::new(),
            steps: Vec::new(),
            max_parallel_steps: 0,
            default_retry: None,
            timeout: None,
            concurrency: None,
        });
    };
    if pipeline.max_parallel_steps < 0 {
        v.add(format!("{path}.max_parallel_steps"), "must not be negative");
    }
    let default_retry = pipeline
        .default_retry
        .map(|r| retry_from_proto(r, &format!("{path}.default_retry"), &mut v));
    let timeout = pipeline
        .timeout
        .and_then(|d| duration_from_proto(d, &format!("{path}.timeout"), &mut v));
    let concurrency = pipeline.concurrency.map(|c| {
        if c.max_active < 0 {
            v.add(
                format!("{path}.concurrency.max_active"),
                "must not be negative",
            );
        }
        let mode = match pb::ConcurrencyMode::try_from(c.mode) {
            Ok(pb::ConcurrencyMode::Unspecified | pb::ConcurrencyMode::Queue) => {
                ConcurrencyMode::Queue
            }
            Ok(pb::ConcurrencyMode::Reject) => ConcurrencyMode::Reject,
            Ok(pb::ConcurrencyMode::CancelOldest) => ConcurrencyMode::CancelOldest,
            Err(_) => {
                v.add(
                    format!("{path}.concurrency.mode"),
                    format!("{} is not a concurrency mode", c.mode),
                );
                ConcurrencyMode::Queue
            }
        };
        ConcurrencyPolicy {
            max_active: c.max_active.max(0) as u32,
            mode,
        }
    });
    let steps = pipeline
        .steps
        .into_iter()
        .enumerate()
        .map(|(i, step)| step_from_proto(step, &format!("{path}.steps[{i}]"), &mut v))
        .collect();
    let spec = PipelineSpec {
        name: pipeline.name,
        description: pipeline.description,
        steps,
        max_parallel_steps: pipeline.max_parallel_steps.max(0) as u32,
        default_retry,
        timeout,
        concurrency,
    };
    v.into_result(spec)
}

fn retry_from_proto(retry: pb::RetryPolicy, path: &str, v: &mut Violations) -> RetryPolicy {
    if retry.max_attempts < 0 {
        v.add(format!("{path}.max_attempts"), "must not be negative");
    }
    for (field, value) in [
        ("backoff_coefficient", retry.backoff_coefficient),
        ("jitter", retry.jitter),
    ] {
        if !value.is_finite() {
            v.add(format!("{path}.{field}"), "must be a finite number");
        }
    }
    RetryPolicy {
        max_attempts: retry.max_attempts.max(0) as u32,
        initial_interval: retry
            .initial_interval
            .and_then(|d| duration_from_proto(d, &format!("{path}.initial_interval"), v)),
        backoff_coefficient: if retry.backoff_coefficient.is_finite() {
            retry.backoff_coefficient
        } else {
            0.0
        },
        max_interval: retry
            .max_interval
            .and_then(|d| duration_from_proto(d, &format!("{path}.max_interval"), v)),
        jitter: if retry.jitter.is_finite() {
            retry.jitter
        } else {
            0.0
        },
        non_retryable_errors: retry.non_retryable_errors,
    }
}

fn retry_to_proto(retry: &RetryPolicy) -> pb::RetryPolicy {
    pb::RetryPolicy {
        max_attempts: retry.max_attempts as i32,
        initial_interval: retry.initial_interval.map(duration_to_proto),
        backoff_coefficient: retry.backoff_coefficient,
        max_interval: retry.max_interval.map(duration_to_proto),
        jitter: retry.jitter,
        non_retryable_errors: retry.non_retryable_errors.clone(),
    }
}

fn step_from_proto(step: pb::Step, path: &str, v: &mut Violations) -> StepSpec {
    use pb::step::Kind as K;
    let timeout = step
        .timeout
        .and_then(|d| duration_from_proto(d, &format!("{path}.timeout"), v));
    let kind = match step.kind {
        None => {
            v.add(
                format!("{path}.kind"),
                format!(
                    "a step kind is required: one of {}",
                    StepKind::NAMES.join(", ")
                ),
            );
            StepKind::Noop {}
        }
        Some(K::Noop(_)) => StepKind::Noop {},
        Some(K::Sleep(sleep)) => {
            let field = format!("{path}.sleep.duration");
            let duration = match sleep.duration {
                Some(d) => duration_from_proto(d, &field, v).unwrap_or_default(),
                None => {
                    v.add(field, "a duration is required");
                    Duration::ZERO
                }
            };
            StepKind::Sleep { duration }
        }
        Some(K::Fail(fail)) => StepKind::Fail {
            message: fail.message,
        },
        Some(K::Set(set)) => StepKind::Set {
            values: struct_to_json(set.values, &format!("{path}.set.values"), v),
        },
        Some(K::Command(c)) => StepKind::Command(CommandSpec {
            program: c.program,
            args: c.args,
            env: c.env.into_iter().collect(),
            working_dir: c.working_dir,
        }),
        Some(K::Http(h)) => StepKind::Http(HttpSpec {
            method: h.method,
            url: h.url,
            headers: h.headers.into_iter().collect(),
            body: h
                .body
                .map(|b| struct_to_json(Some(b), &format!("{path}.http.body"), v)),
            expected_statuses: h
                .expected_statuses
                .iter()
                .enumerate()
                .map(|(j, &status)| {
                    u16::try_from(status).unwrap_or_else(|_| {
                        v.add(
                            format!("{path}.http.expected_statuses[{j}]"),
                            "must be an HTTP status from 100 to 599",
                        );
                        0
                    })
                })
                .collect(),
        }),
        Some(K::Grpc(g)) => StepKind::Grpc(GrpcSpec {
            address: g.address,
            config: struct_to_json(g.config, &format!("{path}.grpc.config"), v),
            metadata: g.metadata.into_iter().collect(),
        }),
    };
    let retry = step
        .retry
        .map(|r| retry_from_proto(r, &format!("{path}.retry"), v));
    StepSpec {
        name: step.name,
        needs: step.needs,
        timeout,
        when: step.when,
        continue_on_failure: step.continue_on_failure,
        retry,
        kind,
    }
}

/// Domain validation names fields from the definition's root (`steps[0]`);
/// requests carry the definition under `pipeline`.
pub fn prefix_paths(error: Error, prefix: &str) -> Error {
    match error {
        Error::InvalidArgument(violations) if !prefix.is_empty() => Error::InvalidArgument(
            violations
                .into_iter()
                .map(|f| FieldViolation::new(format!("{prefix}.{}", f.field), f.description))
                .collect(),
        ),
        Error::CommandNotAllowed { field, program } if !prefix.is_empty() => {
            Error::CommandNotAllowed {
                field: format!("{prefix}.{field}"),
                program,
            }
        }
        other => other,
    }
}

pub fn spec_to_proto(spec: &PipelineSpec) -> pb::Pipeline {
    use pb::step::Kind as K;
    pb::Pipeline {
        name: spec.name.clone(),
        version: 0,
        description: spec.description.clone(),
        max_parallel_steps: spec.max_parallel_steps as i32,
        created_at: None,
        default_retry: spec.default_retry.as_ref().map(retry_to_proto),
        timeout: spec.timeout.map(duration_to_proto),
        concurrency: spec.concurrency.as_ref().map(|c| pb::ConcurrencyPolicy {
            max_active: c.max_active as i32,
            mode: match c.mode {
                ConcurrencyMode::Queue => pb::ConcurrencyMode::Queue,
                ConcurrencyMode::Reject => pb::ConcurrencyMode::Reject,
                ConcurrencyMode::CancelOldest => pb::ConcurrencyMode::CancelOldest,
            } as i32,
        }),
        steps: spec
            .steps
            .iter()
            .map(|s| pb::Step {
                name: s.name.clone(),
                needs: s.needs.clone(),
                timeout: s.timeout.map(duration_to_proto),
                when: s.when.clone(),
                continue_on_failure: s.continue_on_failure,
                retry: s.retry.as_ref().map(retry_to_proto),
                kind: Some(match &s.kind {
                    StepKind::Noop {} => K::Noop(pb::NoopStep {}),
                    StepKind::Sleep { duration } => K::Sleep(pb::SleepStep {
                        duration: Some(duration_to_proto(*duration)),
                    }),
                    StepKind::Fail { message } => K::Fail(pb::FailStep {
                        message: message.clone(),
                    }),
                    StepKind::Set { values } => K::Set(pb::SetStep {
                        values: Some(json_to_struct(values)),
                    }),
                    StepKind::Command(c) => K::Command(pb::CommandStep {
                        program: c.program.clone(),
                        args: c.args.clone(),
                        env: c.env.clone().into_iter().collect(),
                        working_dir: c.working_dir.clone(),
                    }),
                    StepKind::Http(h) => K::Http(pb::HttpStep {
                        method: h.method.clone(),
                        url: h.url.clone(),
                        headers: h.headers.clone().into_iter().collect(),
                        body: h.body.as_ref().map(json_to_struct),
                        expected_statuses: h
                            .expected_statuses
                            .iter()
                            .map(|&s| i32::from(s))
                            .collect(),
                    }),
                    StepKind::Grpc(g) => K::Grpc(pb::GrpcStep {
                        address: g.address.clone(),
                        config: Some(json_to_struct(&g.config)),
                        metadata: g.metadata.clone().into_iter().collect(),
                    }),
                }),
            })
            .collect(),
    }
}

pub fn pipeline_to_proto(pipeline: &Pipeline) -> pb::Pipeline {
    pb::Pipeline {
        version: pipeline.version,
        created_at: Some(timestamp(pipeline.created_at)),
        ..spec_to_proto(&pipeline.spec)
    }
}

// ----- executions -----

pub fn trigger_from_proto(trigger: Option<pb::Trigger>, v: &mut Violations) -> Trigger {
    let Some(trigger) = trigger else {
        return Trigger {
            kind: TriggerKind::Api,
            data: JsonMap::new(),
        };
    };
    let kind = match pb::TriggerType::try_from(trigger.r#type) {
        Ok(pb::TriggerType::Unspecified | pb::TriggerType::Api) => TriggerKind::Api,
        Ok(pb::TriggerType::Manual) => TriggerKind::Manual,
        Ok(pb::TriggerType::Scheduled) => TriggerKind::Scheduled,
        Ok(pb::TriggerType::Webhook) => TriggerKind::Webhook,
        Ok(pb::TriggerType::Event) => TriggerKind::Event,
        Err(_) => {
            v.add(
                "trigger.type",
                format!("unknown trigger type {}", trigger.r#type),
            );
            TriggerKind::Api
        }
    };
    Trigger {
        kind,
        data: struct_to_json(trigger.data, "trigger.data", v),
    }
}

fn trigger_to_proto(trigger: &Trigger) -> pb::Trigger {
    let kind = match trigger.kind {
        TriggerKind::Manual => pb::TriggerType::Manual,
        TriggerKind::Scheduled => pb::TriggerType::Scheduled,
        TriggerKind::Webhook => pb::TriggerType::Webhook,
        TriggerKind::Event => pb::TriggerType::Event,
        TriggerKind::Api => pb::TriggerType::Api,
    };
    pb::Trigger {
        r#type: kind as i32,
        data: Some(json_to_struct(&trigger.data)),
    }
}

pub fn execution_status_to_proto(status: ExecutionStatus) -> pb::ExecutionStatus {
    match status {
        ExecutionStatus::Pending => pb::ExecutionStatus::Pending,
        ExecutionStatus::Running => pb::ExecutionStatus::Running,
        ExecutionStatus::Stopping => pb::ExecutionStatus::Stopping,
        ExecutionStatus::Terminating => pb::ExecutionStatus::Terminating,
        ExecutionStatus::Succeeded => pb::ExecutionStatus::Succeeded,
        ExecutionStatus::Failed => pb::ExecutionStatus::Failed,
        ExecutionStatus::Cancelled => pb::ExecutionStatus::Cancelled,
        ExecutionStatus::Queued => pb::ExecutionStatus::Queued,
        ExecutionStatus::Paused => pb::ExecutionStatus::Paused,
    }
}

pub fn execution_status_from_proto(
    value: i32,
    field: &str,
    v: &mut Violations,
) -> Option<ExecutionStatus> {
    Some(match pb::ExecutionStatus::try_from(value) {
        Ok(pb::ExecutionStatus::Pending) => ExecutionStatus::Pending,
        Ok(pb::ExecutionStatus::Running) => ExecutionStatus::Running,
        Ok(pb::ExecutionStatus::Stopping) => ExecutionStatus::Stopping,
        Ok(pb::ExecutionStatus::Terminating) => ExecutionStatus::Terminating,
        Ok(pb::ExecutionStatus::Succeeded) => ExecutionStatus::Succeeded,
        Ok(pb::ExecutionStatus::Failed) => ExecutionStatus::Failed,
        Ok(pb::ExecutionStatus::Cancelled) => ExecutionStatus::Cancelled,
        Ok(pb::ExecutionStatus::Queued) => ExecutionStatus::Queued,
        Ok(pb::ExecutionStatus::Paused) => ExecutionStatus::Paused,
        Ok(pb::ExecutionStatus::Unspecified) | Err(_) => {
            v.add(field, format!("{value} is not an execution status"));
            return None;
        }
    })
}

/// The `statuses` filter of a request, each value checked.
pub fn execution_statuses_from_proto(values: &[i32], v: &mut Violations) -> Vec<ExecutionStatus> {
    values
        .iter()
        .enumerate()
        .filter_map(|(i, &s)| execution_status_from_proto(s, &format!("statuses[{i}]"), v))
        .collect()
}

fn step_status_to_proto(status: StepStatus) -> pb::StepStatus {
    match status {
        StepStatus::Pending => pb::StepStatus::Pending,
        StepStatus::Running => pb::StepStatus::Running,
        StepStatus::Succeeded => pb::StepStatus::Succeeded,
        StepStatus::Failed => pb::StepStatus::Failed,
        StepStatus::Skipped => pb::StepStatus::Skipped,
        StepStatus::Cancelled => pb::StepStatus::Cancelled,
    }
}

pub fn cancel_mode_from_proto(value: i32, v: &mut Violations) -> CancelMode {
    match pb::CancelMode::try_from(value) {
        Ok(pb::CancelMode::Unspecified | pb::CancelMode::Graceful) => CancelMode::Graceful,
        Ok(pb::CancelMode::Terminate) => CancelMode::Terminate,
        Err(_) => {
            v.add("mode", format!("{value} is not a cancel mode"));
            CancelMode::Graceful
        }
    }
}

fn progress_to_proto(progress: Progress) -> pb::Progress {
    pb::Progress {
        steps_done: progress.done as i32,
        steps_total: progress.total as i32,
        percent: progress.percent(),
    }
}

fn step_to_proto(step: &StepRun, needs: &[String]) -> pb::StepRun {
    pb::StepRun {
        name: step.name.clone(),
        status: step_status_to_proto(step.status) as i32,
        attempt: step.attempt as i32,
        started_at: step.started_at.map(timestamp),
        finished_at: step.finished_at.map(timestamp),
        duration: step.duration().map(duration_to_proto),
        output: step.output.as_ref().map(json_to_struct),
        error: step.error.clone(),
        reason: step.reason.clone(),
        needs: needs.to_vec(),
        next_attempt_at: step.next_attempt_at.map(timestamp),
        error_kind: step.error_kind.clone(),
    }
}

pub fn execution_to_proto(exec: &Execution) -> pb::Execution {
    pb::Execution {
        id: exec.id.clone(),
        pipeline_name: exec.pipeline_name.clone(),
        pipeline_version: exec.pipeline_version,
        status: execution_status_to_proto(exec.status) as i32,
        trigger: Some(trigger_to_proto(&exec.trigger)),
        correlation_id: exec.correlation_id.clone(),
        labels: exec.labels.clone().into_iter().collect(),
        input: Some(json_to_struct(&exec.input)),
        execution_data: Some(json_to_struct(&exec.execution_data)),
        error_message: exec.error_message.clone(),
        created_at: Some(timestamp(exec.created_at)),
        started_at: exec.started_at.map(timestamp),
        finished_at: exec.finished_at.map(timestamp),
        duration: exec.duration().map(duration_to_proto),
        progress: Some(progress_to_proto(exec.progress())),
        steps: exec
            .steps
            .iter()
            .zip(&exec.definition.steps)
            .map(|(run, spec)| step_to_proto(run, &spec.needs))
            .collect(),
        last_sequence: exec.last_sequence,
        request_id: exec.request_id.clone().unwrap_or_default(),
        deadline: exec.deadline.map(timestamp),
    }
}

fn event_kind_to_proto(kind: EventKind) -> pb::EventType {
    match kind {
        EventKind::ExecutionStarted => pb::EventType::ExecutionStarted,
        EventKind::ExecutionSucceeded => pb::EventType::ExecutionSucceeded,
        EventKind::ExecutionFailed => pb::EventType::ExecutionFailed,
        EventKind::ExecutionCancelled => pb::EventType::ExecutionCancelled,
        EventKind::ExecutionCancelRequested => pb::EventType::ExecutionCancelRequested,
        EventKind::ExecutionRetried => pb::EventType::ExecutionRetried,
        EventKind::StepStarted => pb::EventType::StepStarted,
        EventKind::StepSucceeded => pb::EventType::StepSucceeded,
        EventKind::StepFailed => pb::EventType::StepFailed,
        EventKind::StepSkipped => pb::EventType::StepSkipped,
        EventKind::StepCancelled => pb::EventType::StepCancelled,
        EventKind::ExecutionQueued => pb::EventType::ExecutionQueued,
        EventKind::ExecutionPaused => pb::EventType::ExecutionPaused,
        EventKind::ExecutionResumed => pb::EventType::ExecutionResumed,
        EventKind::StepRetrying => pb::EventType::StepRetrying,
        EventKind::StepLog => pb::EventType::StepLog,
        EventKind::StepProgress => pb::EventType::StepProgress,
    }
}

/// The event kinds a watcher asks for, each checked.
pub fn event_kind_from_proto(value: i32, field: &str, v: &mut Violations) -> Option<EventKind> {
    let known = [
        EventKind::ExecutionStarted,
        EventKind::ExecutionSucceeded,
        EventKind::ExecutionFailed,
        EventKind::ExecutionCancelled,
        EventKind::ExecutionCancelRequested,
        EventKind::ExecutionRetried,
        EventKind::ExecutionQueued,
        EventKind::ExecutionPaused,
        EventKind::ExecutionResumed,
        EventKind::StepStarted,
        EventKind::StepSucceeded,
        EventKind::StepFailed,
        EventKind::StepSkipped,
        EventKind::StepCancelled,
        EventKind::StepRetrying,
        EventKind::StepLog,
        EventKind::StepProgress,
    ];
    let found = known
        .into_iter()
        .find(|&k| event_kind_to_proto(k) as i32 == value);
    if found.is_none() {
        v.add(field, format!("{value} is not an event type"));
    }
    found
}

fn log_stream_to_proto(stream: LogStream) -> pb::LogStream {
    match stream {
        LogStream::Stdout => pb::LogStream::Stdout,
        LogStream::Stderr => pb::LogStream::Stderr,
        LogStream::Worker => pb::LogStream::Worker,
        LogStream::System => pb::LogStream::System,
    }
}

pub fn event_to_proto(event: &Event) -> pb::ExecutionEvent {
    pb::ExecutionEvent {
        execution_id: event.execution_id.clone(),
        sequence: event.sequence,
        r#type: event_kind_to_proto(event.kind) as i32,
        time: Some(timestamp(event.time)),
        execution_status: execution_status_to_proto(event.execution_status) as i32,
        step_name: event.step_name.clone().unwrap_or_default(),
        attempt: event.attempt as i32,
        output: event.output.as_ref().map(json_to_struct),
        message: event.message.clone(),
        duration: event.duration.map(duration_to_proto),
        progress: Some(progress_to_proto(event.progress)),
        execution_data: event.execution_data.as_ref().map(json_to_struct),
        next_attempt_at: event.next_attempt_at.map(timestamp),
        error_kind: event.error_kind.clone(),
        log_stream: event
            .log_stream
            .map_or(pb::LogStream::Unspecified, log_stream_to_proto) as i32,
        step_percent: event.step_percent.unwrap_or_default(),
        pipeline_name: event.pipeline_name.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn json_survives_a_round_trip_through_struct() {
        let data = json!({"n": 3, "f": 1.5, "s": "x", "b": true, "z": null, "l": [1, {"k": "v"}]});
        let map = data.as_object().unwrap().clone();
        let mut v = Violations::default();
        let back = struct_to_json(Some(json_to_struct(&map)), "input", &mut v);
        assert_eq!(Value::Object(back), data);
        assert!(v.0.is_empty());
    }

    #[test]
    fn durations_out_of_range_are_named() {
        let mut v = Violations::default();
        let read = |seconds, nanos, v: &mut Violations| {
            duration_from_proto(prost_types::Duration { seconds, nanos }, "timeout", v)
        };
        assert_eq!(
            read(i64::MAX, 999_999_999, &mut v),
            Some(Duration::new(i64::MAX as u64, 999_999_999))
        );
        assert_eq!(read(i64::MIN, 0, &mut v), None);
        assert_eq!(read(1, -1, &mut v), None);
        assert_eq!(read(0, 1_000_000_000, &mut v), None);
        let descriptions: Vec<&str> = v.0.iter().map(|f| f.description.as_str()).collect();
        assert_eq!(descriptions[..2], ["must be a non-negative duration"; 2]);
        assert!(descriptions[2].starts_with("nanos must be below 1000000000"));
    }

    #[test]
    fn pipeline_names_in_requests_are_checked() {
        let mut v = Violations::default();
        check_pipeline_name("pipeline_name", "ok", true, &mut v);
        check_pipeline_name("pipeline_name", "", false, &mut v);
        assert!(v.0.is_empty());
        check_pipeline_name("pipeline_name", "", true, &mut v);
        check_pipeline_name("pipeline_name", "ok\0", false, &mut v);
        assert_eq!(v.0[0].description, "is required");
        assert!(v.0[1].description.starts_with("may contain only"));
    }

    #[test]
    fn non_finite_numbers_are_named() {
        let mut s = prost_types::Struct::default();
        s.fields.insert(
            "x".into(),
            prost_types::Value {
                kind: Some(Kind::NumberValue(f64::NAN)),
            },
        );
        let mut v = Violations::default();
        struct_to_json(Some(s), "input", &mut v);
        assert_eq!(v.0[0].field, "input.x");
    }
}
