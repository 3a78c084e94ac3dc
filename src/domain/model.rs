//! The records the service keeps: stored pipelines, executions with their
//! steps, and the events that tell their history.

use std::collections::BTreeMap;
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use super::data::{JsonMap, layered};
use super::definition::{Graph, PipelineSpec};
use super::status::{EventKind, ExecutionStatus, LogStream, StepStatus, TriggerKind};

/// The time now, to the microsecond: what both SQLite and PostgreSQL keep,
/// so that a time the API returns at once equals the one read back later.
pub fn now() -> DateTime<Utc> {
    chrono::SubsecRound::trunc_subsecs(Utc::now(), 6)
}

/// One stored version of a pipeline.
#[derive(Debug, Clone, PartialEq)]
pub struct Pipeline {
    pub spec: PipelineSpec,
    pub version: i64,
    pub created_at: DateTime<Utc>,
}

/// What started an execution.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Trigger {
    pub kind: TriggerKind,
    pub data: JsonMap,
}

/// What a caller asks `RunPipeline` for.
#[derive(Debug, Clone)]
pub struct RunRequest {
    pub pipeline_name: String,
    pub input: JsonMap,
    pub trigger: Trigger,
    pub correlation_id: String,
    pub labels: BTreeMap<String, String>,
    /// Idempotency key; `None` starts a new execution every time.
    pub request_id: Option<String>,
}

impl RunRequest {
    /// A fingerprint of what the request asks for, to tell a repeated
    /// request from a different one under the same `request_id`.
    pub fn fingerprint(&self) -> String {
        let canonical = serde_json::json!({
            "pipeline": self.pipeline_name,
            "input": self.input,
            "trigger": self.trigger,
            "correlation_id": self.correlation_id,
            "labels": self.labels,
        });
        // serde_json maps are ordered (BTreeMap), so this text is canonical.
        canonical.to_string()
    }
}

/// One run of a pipeline version, with every step.
#[derive(Debug, Clone)]
pub struct Execution {
    pub id: String,
    pub pipeline_name: String,
    pub pipeline_version: i64,
    /// The definition this execution runs, fixed when it was created.
    pub definition: PipelineSpec,
    pub status: ExecutionStatus,
    pub trigger: Trigger,
    pub correlation_id: String,
    pub labels: BTreeMap<String, String>,
    pub input: JsonMap,
    pub execution_data: JsonMap,
    pub error_message: String,
    pub created_at: DateTime<Utc>,
    pub started_at: Option<DateTime<Utc>>,
    pub finished_at: Option<DateTime<Utc>>,
    /// Sequence number of the latest event.
    pub last_sequence: i64,
    /// In definition order.
    pub steps: Vec<StepRun>,
    /// The caller's idempotency key, with the request's fingerprint.
    pub request_id: Option<String>,
    pub request_fingerprint: String,
    /// When the execution times out, if its pipeline has a timeout.
    pub deadline: Option<DateTime<Utc>>,
}

/// One step of one execution.
#[derive(Debug, Clone, PartialEq)]
pub struct StepRun {
    pub name: String,
    pub status: StepStatus,
    /// Latest attempt, from 1; 0 before the first.
    pub attempt: u32,
    pub started_at: Option<DateTime<Utc>>,
    pub finished_at: Option<DateTime<Utc>>,
    pub output: Option<JsonMap>,
    pub error: String,
    /// Kind of `error`, for retry policies.
    pub error_kind: String,
    pub reason: String,
    /// When a pending step that is retrying may start its next attempt.
    pub next_attempt_at: Option<DateTime<Utc>>,
    /// Attempts made before the latest `RetryExecution`: a retry policy
    /// counts only the attempts after it, so a manual retry gets a fresh set.
    pub retry_base: u32,
}

/// Steps done out of steps total.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Progress {
    pub done: u32,
    pub total: u32,
}

impl Progress {
    pub fn percent(self) -> f64 {
        if self.total == 0 {
            100.0
        } else {
            f64::from(self.done) * 100.0 / f64::from(self.total)
        }
    }
}

/// One entry of an execution's event log.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Event {
    pub execution_id: String,
    /// 1, 2, 3, ... with no gaps within one execution.
    pub sequence: i64,
    pub kind: EventKind,
    /// When it was recorded, just before the commit that stores it.
    pub time: DateTime<Utc>,
    pub execution_status: ExecutionStatus,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub step_name: Option<String>,
    #[serde(default)]
    pub attempt: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output: Option<JsonMap>,
    #[serde(default)]
    pub message: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub duration: Option<Duration>,
    pub progress: Progress,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub execution_data: Option<JsonMap>,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub pipeline_name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_attempt_at: Option<DateTime<Utc>>,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub error_kind: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub log_stream: Option<LogStream>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub step_percent: Option<f64>,
}

impl Event {
    /// An event of `kind` about `exec` in its current state.
    pub fn new(exec: &Execution, sequence: i64, kind: EventKind) -> Self {
        Self {
            execution_id: exec.id.clone(),
            sequence,
            kind,
            time: now(),
            execution_status: exec.status,
            step_name: None,
            attempt: 0,
            output: None,
            message: String::new(),
            duration: None,
            progress: exec.progress(),
            execution_data: None,
            pipeline_name: exec.pipeline_name.clone(),
            next_attempt_at: None,
            error_kind: String::new(),
            log_stream: None,
            step_percent: None,
        }
    }
}

impl StepRun {
    pub fn new(name: String) -> Self {
        Self {
            name,
            status: StepStatus::Pending,
            attempt: 0,
            started_at: None,
            finished_at: None,
            output: None,
            error: String::new(),
            error_kind: String::new(),
            reason: String::new(),
            next_attempt_at: None,
            retry_base: 0,
        }
    }

    pub fn duration(&self) -> Option<Duration> {
        Some(
            (self.finished_at? - self.started_at?)
                .to_std()
                .unwrap_or_default(),
        )
    }

    /// Moves the step to `next`; the state machine must allow it.
    pub fn set_status(&mut self, next: StepStatus) {
        debug_assert!(
            self.status.can_become(next),
            "step {}: {} -> {next}",
            self.name,
            self.status
        );
        self.status = next;
    }

    /// Puts the step back to pending for another attempt.
    pub fn reset(&mut self) {
        self.set_status(StepStatus::Pending);
        self.finished_at = None;
        self.output = None;
        self.error.clear();
        self.error_kind.clear();
        self.reason.clear();
        self.next_attempt_at = None;
    }
}

impl Execution {
    /// Moves the execution to `next`; the state machine must allow it.
    pub fn set_status(&mut self, next: ExecutionStatus) {
        debug_assert!(
            self.status.can_become(next),
            "execution {}: {} -> {next}",
            self.id,
            self.status
        );
        self.status = next;
    }

    pub fn progress(&self) -> Progress {
        Progress {
            done: self.steps.iter().filter(|s| s.status.is_final()).count() as u32,
            total: self.steps.len() as u32,
        }
    }

    pub fn duration(&self) -> Option<Duration> {
        let start = self.started_at?;
        let end = self.finished_at.unwrap_or_else(Utc::now);
        Some((end - start).to_std().unwrap_or_default())
    }

    /// Recomputes `execution_data`: the input with the outputs of all
    /// succeeded steps merged over it in execution order.
    pub fn recompute_data(&mut self, graph: &Graph) {
        let outputs = graph.order.iter().filter_map(|&i| {
            let step = &self.steps[i];
            (step.status == StepStatus::Succeeded)
                .then_some(step.output.as_ref())
                .flatten()
        });
        self.execution_data = layered(&self.input, outputs);
    }

    /// The data step `index` receives: the input with the outputs of all of
    /// its ancestors merged over it in execution order.
    pub fn step_input(&self, graph: &Graph, index: usize) -> JsonMap {
        let outputs = graph
            .ancestors(index)
            .into_iter()
            .filter_map(|i| self.steps[i].output.as_ref());
        layered(&self.input, outputs)
    }
}
