//! Pipeline definitions: what a user writes (as YAML/JSON for the CLI, as a
//! protobuf message for the RPCs), how it is validated, and the step graph
//! the executor walks.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::data::JsonMap;
use super::{Error, FieldViolation};

/// Longest name of a pipeline or a step.
pub const MAX_NAME_LEN: usize = 128;
/// Most steps one pipeline may have.
pub const MAX_STEPS: usize = 1000;
/// Longest `sleep` step.
pub const MAX_SLEEP: Duration = Duration::from_secs(24 * 3600);
/// Longest step timeout.
pub const MAX_TIMEOUT: Duration = Duration::from_secs(7 * 24 * 3600);
/// Highest `max_parallel_steps`.
pub const MAX_PARALLEL_STEPS: u32 = 1024;
/// Longest whole-execution timeout.
pub const MAX_EXECUTION_TIMEOUT: Duration = Duration::from_secs(30 * 24 * 3600);
/// Most attempts a retry policy may allow.
pub const MAX_ATTEMPTS: u32 = 100;
/// Longest delay between two attempts.
pub const MAX_RETRY_INTERVAL: Duration = Duration::from_secs(24 * 3600);
/// Highest `concurrency.max_active`.
pub const MAX_ACTIVE_LIMIT: u32 = 10_000;
/// Largest definition, as JSON.
pub const MAX_DEFINITION_BYTES: usize = 1024 * 1024;

/// A pipeline as its author wrote it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PipelineSpec {
    pub name: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub description: String,
    pub steps: Vec<StepSpec>,
    /// How many steps of one execution may run at once; 0 = server default.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub max_parallel_steps: u32,
    /// Retry policy of steps that have none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub default_retry: Option<RetryPolicy>,
    /// Limit for a whole execution, from when it starts running.
    #[serde(
        default,
        with = "opt_duration",
        skip_serializing_if = "Option::is_none"
    )]
    pub timeout: Option<Duration>,
    /// Cap on active executions of this pipeline.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub concurrency: Option<ConcurrencyPolicy>,
}

/// Error kinds that no retry policy retries: another attempt would meet
/// the same server configuration (`--egress-allow`, the secrets).
pub const NEVER_RETRIED: [&str; 2] = ["egress_denied", "secret_missing"];

/// How failed attempts of a step are retried.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RetryPolicy {
    /// Attempts in all, including the first; 0 and 1 mean no retry.
    #[serde(default)]
    pub max_attempts: u32,
    /// Delay before the second attempt; default 1s.
    #[serde(
        default,
        with = "opt_duration",
        skip_serializing_if = "Option::is_none"
    )]
    pub initial_interval: Option<Duration>,
    /// Growth factor of the delay; 0 means 2.
    #[serde(default, skip_serializing_if = "is_zero_f64")]
    pub backoff_coefficient: f64,
    /// Longest delay; default 100 x the initial interval.
    #[serde(
        default,
        with = "opt_duration",
        skip_serializing_if = "Option::is_none"
    )]
    pub max_interval: Option<Duration>,
    /// Random spread of each delay, 0 to 1 (0.2 = +/- 20%).
    #[serde(default, skip_serializing_if = "is_zero_f64")]
    pub jitter: f64,
    /// Error kinds that are never retried.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub non_retryable_errors: Vec<String>,
}

impl RetryPolicy {
    /// Whether an attempt numbered `attempt` that failed with `kind` may be
    /// followed by another.
    /// Kinds in [`NEVER_RETRIED`] never are.
    pub fn retries(&self, attempt: u32, kind: &str) -> bool {
        attempt < self.max_attempts
            && !self.non_retryable_errors.iter().any(|k| k == kind)
            && !NEVER_RETRIED.contains(&kind)
    }

    /// The delay after failed attempt number `attempt` (from 1), with
    /// `random` in [0, 1) spreading it by the jitter.
    pub fn delay(&self, attempt: u32, random: f64) -> Duration {
        let initial = self.initial_interval.unwrap_or(Duration::from_secs(1));
        let coefficient = if self.backoff_coefficient == 0.0 {
            2.0
        } else {
            self.backoff_coefficient
        };
        let max = self
            .max_interval
            .unwrap_or(initial * 100)
            .min(MAX_RETRY_INTERVAL);
        let exponent = attempt.saturating_sub(1).min(64) as i32;
        let base = (initial.as_secs_f64() * coefficient.powi(exponent)).min(max.as_secs_f64());
        let spread = 1.0 + self.jitter * (2.0 * random - 1.0);
        Duration::from_secs_f64((base * spread).clamp(0.0, MAX_RETRY_INTERVAL.as_secs_f64()))
    }
}

/// What `RunPipeline` does when a pipeline is at its cap.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ConcurrencyMode {
    /// Wait as queued, in order.
    #[default]
    Queue,
    /// Refuse with RESOURCE_EXHAUSTED.
    Reject,
    /// Terminate the oldest active execution; the new one queues meanwhile.
    CancelOldest,
}

/// A cap on a pipeline's active executions.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConcurrencyPolicy {
    /// 0 means unlimited.
    #[serde(default)]
    pub max_active: u32,
    #[serde(default)]
    pub mode: ConcurrencyMode,
}

/// One step of a pipeline.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(try_from = "RawStep")]
pub struct StepSpec {
    pub name: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub needs: Vec<String>,
    #[serde(
        default,
        with = "opt_duration",
        skip_serializing_if = "Option::is_none"
    )]
    pub timeout: Option<Duration>,
    /// A CEL condition; false skips the step. Empty: always run.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub when: String,
    /// A failure does not fail the execution; dependents still run.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub continue_on_failure: bool,
    /// Overrides the pipeline's `default_retry`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry: Option<RetryPolicy>,
    /// Written as one key named after the kind: `sleep: {duration: 2s}`.
    #[serde(flatten)]
    pub kind: StepKind,
}

/// A step as written, before its one kind key is picked out; this gives
/// clearer errors than serde's flattened enums.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawStep {
    name: String,
    #[serde(default)]
    needs: Vec<String>,
    #[serde(default, with = "opt_duration")]
    timeout: Option<Duration>,
    #[serde(default)]
    when: String,
    #[serde(default)]
    continue_on_failure: bool,
    #[serde(default)]
    retry: Option<RetryPolicy>,
    #[serde(default, deserialize_with = "present")]
    noop: Option<serde_json::Value>,
    #[serde(default, deserialize_with = "present")]
    sleep: Option<serde_json::Value>,
    #[serde(default, deserialize_with = "present")]
    fail: Option<serde_json::Value>,
    #[serde(default, deserialize_with = "present")]
    set: Option<serde_json::Value>,
    #[serde(default, deserialize_with = "present")]
    command: Option<serde_json::Value>,
    #[serde(default, deserialize_with = "present")]
    http: Option<serde_json::Value>,
    #[serde(default, deserialize_with = "present")]
    grpc: Option<serde_json::Value>,
}

/// Keeps a key written with no value (`noop:`) as present.
fn present<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<serde_json::Value>, D::Error> {
    serde_json::Value::deserialize(d).map(Some)
}

impl TryFrom<RawStep> for StepSpec {
    type Error = String;

    fn try_from(raw: RawStep) -> Result<Self, String> {
        let kinds: Vec<(&str, serde_json::Value)> = [
            ("noop", raw.noop),
            ("sleep", raw.sleep),
            ("fail", raw.fail),
            ("set", raw.set),
            ("command", raw.command),
            ("http", raw.http),
            ("grpc", raw.grpc),
        ]
        .into_iter()
        .filter_map(|(key, value)| value.map(|v| (key, v)))
        .collect();
        let name = &raw.name;
        let (key, config) = match <[_; 1]>::try_from(kinds) {
            Ok([(key, config)]) => (key, config),
            Err(kinds) if kinds.is_empty() => {
                return Err(format!(
                    "step '{name}' needs a kind: one of {}",
                    StepKind::NAMES.join(", ")
                ));
            }
            Err(kinds) => {
                let keys: Vec<&str> = kinds.iter().map(|(k, _)| *k).collect();
                return Err(format!(
                    "step '{name}' has more than one kind: {}",
                    keys.join(", ")
                ));
            }
        };
        let config = match config {
            serde_json::Value::Null => serde_json::Value::Object(Default::default()),
            other => other,
        };
        let kind = serde_json::from_value(serde_json::json!({ key: config }))
            .map_err(|e| format!("step '{name}': {key}: {e}"))?;
        Ok(StepSpec {
            name: raw.name,
            needs: raw.needs,
            timeout: raw.timeout,
            when: raw.when,
            continue_on_failure: raw.continue_on_failure,
            retry: raw.retry,
            kind,
        })
    }
}

/// What a step does.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum StepKind {
    Noop {},
    Sleep {
        #[serde(with = "duration")]
        duration: Duration,
    },
    Fail {
        #[serde(default)]
        message: String,
    },
    Set {
        #[serde(default)]
        values: JsonMap,
    },
    Command(CommandSpec),
    Http(HttpSpec),
    Grpc(GrpcSpec),
}

impl StepKind {
    /// Every kind's key, as written in files.
    pub const NAMES: [&'static str; 7] =
        ["noop", "sleep", "fail", "set", "command", "http", "grpc"];

    pub fn name(&self) -> &'static str {
        match self {
            Self::Noop {} => "noop",
            Self::Sleep { .. } => "sleep",
            Self::Fail { .. } => "fail",
            Self::Set { .. } => "set",
            Self::Command(_) => "command",
            Self::Http(_) => "http",
            Self::Grpc(_) => "grpc",
        }
    }
}

/// An HTTP request made by an `http` step. `${path}` placeholders in the
/// URL, header values and body strings take values from the step's data;
/// `${secrets.NAME}` takes a server secret (see [`StepKind::secret_references`]).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpSpec {
    /// GET, POST, PUT, PATCH, DELETE or HEAD; empty means GET.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub method: String,
    pub url: String,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub headers: BTreeMap<String, String>,
    /// The JSON body; `None` sends the step's data for POST, PUT and PATCH.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub body: Option<JsonMap>,
    /// Statuses that count as success; empty means 2xx.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub expected_statuses: Vec<u16>,
}

/// HTTP methods an `http` step may use.
pub const HTTP_METHODS: [&str; 6] = ["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD"];

/// A call to a `pipeline.v1.StepWorkerService` made by a `grpc` step.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GrpcSpec {
    /// `http://host:port` of the worker.
    pub address: String,
    /// Passed to the worker as is.
    #[serde(default, skip_serializing_if = "JsonMap::is_empty")]
    pub config: JsonMap,
    /// Extra request metadata.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub metadata: BTreeMap<String, String>,
}

/// A program to run for a `command` step.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CommandSpec {
    pub program: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub args: Vec<String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub env: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub working_dir: String,
}

/// Which programs `command` steps may run on this server.
#[derive(Debug, Clone, Default)]
pub struct CommandPolicy {
    allowed: Vec<String>,
}

impl CommandPolicy {
    /// Commands are disabled when `allowed` is empty.
    pub fn new(allowed: Vec<String>) -> Self {
        Self { allowed }
    }

    pub fn allows(&self, program: &str) -> bool {
        self.allowed.iter().any(|p| p == program)
    }
}

impl PipelineSpec {
    /// Checks everything that can be checked before a definition is stored:
    /// names, `needs`, cycles, durations and limits. Every problem found is
    /// reported at once, each with its field path. Then checks that every
    /// `command` step's program is allowed by `policy`.
    pub fn validate(&self, policy: &CommandPolicy) -> Result<(), Error> {
        let mut violations = Vec::new();
        check_name("name", &self.name, &mut violations);
        if self.steps.is_empty() {
            violations.push(FieldViolation::new(
                "steps",
                "a pipeline needs at least one step",
            ));
        }
        if self.steps.len() > MAX_STEPS {
            violations.push(FieldViolation::new(
                "steps",
                format!(
                    "{} steps is more than the limit of {MAX_STEPS}",
                    self.steps.len()
                ),
            ));
        }
        if self.max_parallel_steps > MAX_PARALLEL_STEPS {
            violations.push(FieldViolation::new(
                "max_parallel_steps",
                format!("must be at most {MAX_PARALLEL_STEPS}"),
            ));
        }
        if let Some(timeout) = self.timeout
            && (timeout.is_zero() || timeout > MAX_EXECUTION_TIMEOUT)
        {
            violations.push(FieldViolation::new(
                "timeout",
                format!(
                    "must be more than 0 and at most {}",
                    humantime::format_duration(MAX_EXECUTION_TIMEOUT)
                ),
            ));
        }
        if let Some(retry) = &self.default_retry {
            check_retry("default_retry", retry, &mut violations);
        }
        if let Some(concurrency) = &self.concurrency
            && concurrency.max_active > MAX_ACTIVE_LIMIT
        {
            violations.push(FieldViolation::new(
                "concurrency.max_active",
                format!("must be at most {MAX_ACTIVE_LIMIT}"),
            ));
        }
        let json = serde_json::to_value(self).unwrap_or_default();
        if super::limits::value_contains_nul(&json) {
            violations.push(FieldViolation::new(
                "steps",
                "the definition holds a NUL character, which cannot be stored",
            ));
        }
        let size = json.to_string().len();
        if size > MAX_DEFINITION_BYTES {
            violations.push(FieldViolation::new(
                "steps",
                format!("the definition is {size} bytes as JSON, more than the limit of {MAX_DEFINITION_BYTES}"),
            ));
        }

        let mut first_index: HashMap<&str, usize> = HashMap::new();
        for (i, step) in self.steps.iter().enumerate() {
            let field = format!("steps[{i}].name");
            check_name(&field, &step.name, &mut violations);
            if let Some(first) = first_index.insert(&step.name, i) {
                first_index.insert(&step.name, first);
                violations.push(FieldViolation::new(
                    field,
                    format!(
                        "duplicate step name '{}' (first used by steps[{first}])",
                        step.name
                    ),
                ));
            }
        }
        for (i, step) in self.steps.iter().enumerate() {
            for (j, need) in step.needs.iter().enumerate() {
                let field = format!("steps[{i}].needs[{j}]");
                if need == &step.name {
                    violations.push(FieldViolation::new(field, "a step cannot need itself"));
                } else if !first_index.contains_key(need.as_str()) {
                    violations.push(FieldViolation::new(
                        field,
                        format!("no step is named '{need}'"),
                    ));
                } else if step.needs[..j].contains(need) {
                    violations.push(FieldViolation::new(
                        field,
                        format!("'{need}' is listed twice"),
                    ));
                }
            }
            if let Some(timeout) = step.timeout
                && (timeout.is_zero() || timeout > MAX_TIMEOUT)
            {
                violations.push(FieldViolation::new(
                    format!("steps[{i}].timeout"),
                    format!(
                        "must be more than 0 and at most {}",
                        humantime::format_duration(MAX_TIMEOUT)
                    ),
                ));
            }
            match &step.kind {
                StepKind::Sleep { duration } if *duration > MAX_SLEEP => {
                    violations.push(FieldViolation::new(
                        format!("steps[{i}].sleep.duration"),
                        "must be at most 24 hours",
                    ));
                }
                // Its values are its output: values over the output limits
                // would fail every attempt.
                StepKind::Set { values } => {
                    if let Err(problem) =
                        super::limits::check_object(values, super::limits::MAX_STEP_OUTPUT_BYTES)
                    {
                        violations.push(FieldViolation::new(
                            format!("steps[{i}].set.values"),
                            format!("the values (the step's output) {problem}"),
                        ));
                    }
                }
                StepKind::Command(command) if command.program.trim().is_empty() => {
                    violations.push(FieldViolation::new(
                        format!("steps[{i}].command.program"),
                        "a program is required",
                    ));
                }
                StepKind::Http(http) => {
                    check_http(&format!("steps[{i}].http"), http, &mut violations)
                }
                StepKind::Grpc(grpc) => {
                    // TLS to workers comes with the server's own TLS support.
                    if grpc
                        .address
                        .strip_prefix("http://")
                        .is_none_or(str::is_empty)
                    {
                        violations.push(FieldViolation::new(
                            format!("steps[{i}].grpc.address"),
                            "must be an http:// address such as http://worker:50052 \
                             (TLS to workers is not supported yet)",
                        ));
                    }
                    for (key, value) in &grpc.metadata {
                        if !is_header_name(key) || key.ends_with("-bin") {
                            violations.push(FieldViolation::new(
                                format!("steps[{i}].grpc.metadata"),
                                format!("'{key}' is not a valid lowercase ASCII metadata name"),
                            ));
                        } else if !value.bytes().all(|b| (0x20..0x7f).contains(&b)) {
                            violations.push(FieldViolation::new(
                                format!("steps[{i}].grpc.metadata.{key}"),
                                "must be printable ASCII",
                            ));
                        }
                    }
                }
                _ => {}
            }
            for (field, written) in step.kind.secret_references() {
                if let Err(problem) = written {
                    violations.push(FieldViolation::new(format!("steps[{i}].{field}"), problem));
                }
            }
            if !step.when.is_empty()
                && let Err(problem) = super::condition::check(&step.when)
            {
                violations.push(FieldViolation::new(format!("steps[{i}].when"), problem));
            }
            if let Some(retry) = &step.retry {
                check_retry(&format!("steps[{i}].retry"), retry, &mut violations);
            }
        }
        if violations.is_empty()
            && let Some((index, cycle)) = self.find_cycle()
        {
            violations.push(FieldViolation::new(
                format!("steps[{index}].needs"),
                format!("dependency cycle: {}", cycle.join(" -> ")),
            ));
        }
        if !violations.is_empty() {
            return Err(Error::InvalidArgument(violations));
        }

        for (i, step) in self.steps.iter().enumerate() {
            if let StepKind::Command(command) = &step.kind
                && !policy.allows(&command.program)
            {
                return Err(Error::CommandNotAllowed {
                    field: format!("steps[{i}].command.program"),
                    program: command.program.clone(),
                });
            }
        }
        Ok(())
    }

    /// A cycle in `needs`, as the index of the step where it was found and the
    /// step names along it, first name repeated at the end.
    fn find_cycle(&self) -> Option<(usize, Vec<String>)> {
        #[derive(Clone, Copy, PartialEq)]
        enum Mark {
            New,
            OnPath,
            Done,
        }
        let index: HashMap<&str, usize> = self
            .steps
            .iter()
            .enumerate()
            .map(|(i, s)| (s.name.as_str(), i))
            .collect();
        let mut marks = vec![Mark::New; self.steps.len()];
        for start in 0..self.steps.len() {
            if marks[start] != Mark::New {
                continue;
            }
            // Iterative depth-first search; `path` holds (step, next need to visit).
            let mut path: Vec<(usize, usize)> = vec![(start, 0)];
            marks[start] = Mark::OnPath;
            while let Some(&mut (node, ref mut next)) = path.last_mut() {
                if let Some(need) = self.steps[node].needs.get(*next) {
                    *next += 1;
                    let child = index[need.as_str()];
                    match marks[child] {
                        Mark::New => {
                            marks[child] = Mark::OnPath;
                            path.push((child, 0));
                        }
                        Mark::OnPath => {
                            let from = path.iter().position(|&(n, _)| n == child).unwrap_or(0);
                            let mut cycle: Vec<String> = path[from..]
                                .iter()
                                .map(|&(n, _)| self.steps[n].name.clone())
                                .collect();
                            cycle.push(self.steps[child].name.clone());
                            return Some((child, cycle));
                        }
                        Mark::Done => {}
                    }
                } else {
                    marks[node] = Mark::Done;
                    path.pop();
                }
            }
        }
        None
    }
}

/// The step graph of a validated definition, indexed by step position.
#[derive(Debug, Clone)]
pub struct Graph {
    /// Indices of each step's needs.
    pub needs: Vec<Vec<usize>>,
    /// Indices of the steps that need each step.
    pub dependents: Vec<Vec<usize>>,
    /// The execution order: a topological order in which ties are broken by
    /// position in the definition. Data layers are merged in this order.
    pub order: Vec<usize>,
    /// Each step's rank in `order`.
    pub rank: Vec<usize>,
}

impl Graph {
    /// Builds the graph. The definition must have passed [`PipelineSpec::validate`].
    pub fn new(spec: &PipelineSpec) -> Self {
        let index: HashMap<&str, usize> = spec
            .steps
            .iter()
            .enumerate()
            .map(|(i, s)| (s.name.as_str(), i))
            .collect();
        let n = spec.steps.len();
        let needs: Vec<Vec<usize>> = spec
            .steps
            .iter()
            .map(|s| {
                s.needs
                    .iter()
                    .filter_map(|d| index.get(d.as_str()).copied())
                    .collect()
            })
            .collect();
        let mut dependents = vec![Vec::new(); n];
        for (i, ds) in needs.iter().enumerate() {
            for &d in ds {
                dependents[d].push(i);
            }
        }
        // Kahn's algorithm, always taking the lowest ready position.
        let mut waiting: Vec<usize> = needs.iter().map(Vec::len).collect();
        let mut ready: std::collections::BTreeSet<usize> =
            (0..n).filter(|&i| waiting[i] == 0).collect();
        let mut order = Vec::with_capacity(n);
        while let Some(i) = ready.pop_first() {
            order.push(i);
            for &d in &dependents[i] {
                waiting[d] -= 1;
                if waiting[d] == 0 {
                    ready.insert(d);
                }
            }
        }
        let mut rank = vec![0; n];
        for (r, &i) in order.iter().enumerate() {
            rank[i] = r;
        }
        Self {
            needs,
            dependents,
            order,
            rank,
        }
    }

    /// Every step `step` depends on, directly or not, in execution order.
    pub fn ancestors(&self, step: usize) -> Vec<usize> {
        let mut seen = vec![false; self.needs.len()];
        let mut stack = self.needs[step].clone();
        while let Some(i) = stack.pop() {
            if !std::mem::replace(&mut seen[i], true) {
                stack.extend(&self.needs[i]);
            }
        }
        self.order.iter().copied().filter(|&i| seen[i]).collect()
    }

    /// `step` and every step that depends on it, directly or not.
    pub fn downstream(&self, step: usize) -> Vec<usize> {
        let mut seen = vec![false; self.needs.len()];
        let mut stack = vec![step];
        while let Some(i) = stack.pop() {
            if !std::mem::replace(&mut seen[i], true) {
                stack.extend(&self.dependents[i]);
            }
        }
        (0..seen.len()).filter(|&i| seen[i]).collect()
    }
}

fn check_name(field: &str, name: &str, violations: &mut Vec<FieldViolation>) {
    if let Some(description) = name_problem(name) {
        violations.push(FieldViolation::new(field, description));
    }
}

/// Why `name` cannot be the name of a pipeline or a step, if it cannot.
/// Requests that name a pipeline are checked with it too: a name no
/// pipeline can have is a bad argument, not a pipeline that is not found.
pub fn name_problem(name: &str) -> Option<String> {
    if name.is_empty() {
        Some("must not be empty".to_string())
    } else if name.len() > MAX_NAME_LEN {
        Some(format!("must be at most {MAX_NAME_LEN} characters"))
    } else if !name
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
    {
        Some("may contain only letters, digits, '-', '_' and '.'".to_string())
    } else {
        None
    }
}

fn is_zero(n: &u32) -> bool {
    *n == 0
}

fn is_zero_f64(n: &f64) -> bool {
    *n == 0.0
}

fn check_retry(path: &str, retry: &RetryPolicy, violations: &mut Vec<FieldViolation>) {
    let mut add = |field: &str, description: String| {
        violations.push(FieldViolation::new(format!("{path}.{field}"), description));
    };
    if retry.max_attempts > MAX_ATTEMPTS {
        add("max_attempts", format!("must be at most {MAX_ATTEMPTS}"));
    }
    let limit = humantime::format_duration(MAX_RETRY_INTERVAL);
    for (field, interval) in [
        ("initial_interval", retry.initial_interval),
        ("max_interval", retry.max_interval),
    ] {
        if let Some(d) = interval
            && (d.is_zero() || d > MAX_RETRY_INTERVAL)
        {
            add(field, format!("must be more than 0 and at most {limit}"));
        }
    }
    if let (Some(initial), Some(max)) = (retry.initial_interval, retry.max_interval)
        && max < initial
    {
        add(
            "max_interval",
            "must not be less than initial_interval".to_string(),
        );
    }
    if !(retry.backoff_coefficient == 0.0 || (1.0..=100.0).contains(&retry.backoff_coefficient)) {
        add(
            "backoff_coefficient",
            "must be 0 (meaning 2) or from 1 to 100".to_string(),
        );
    }
    if !(0.0..=1.0).contains(&retry.jitter) {
        add("jitter", "must be from 0 to 1".to_string());
    }
    for (j, kind) in retry.non_retryable_errors.iter().enumerate() {
        if kind.trim().is_empty() || kind.len() > MAX_NAME_LEN {
            add(
                &format!("non_retryable_errors[{j}]"),
                format!("must be 1 to {MAX_NAME_LEN} characters"),
            );
        }
    }
}

fn check_http(path: &str, http: &HttpSpec, violations: &mut Vec<FieldViolation>) {
    let method = if http.method.is_empty() {
        "GET"
    } else {
        &http.method
    };
    if !HTTP_METHODS.contains(&method) {
        violations.push(FieldViolation::new(
            format!("{path}.method"),
            format!("must be one of {}", HTTP_METHODS.join(", ")),
        ));
    }
    let host = http
        .url
        .strip_prefix("http://")
        .or_else(|| http.url.strip_prefix("https://"));
    if host.is_none_or(str::is_empty) {
        violations.push(FieldViolation::new(
            format!("{path}.url"),
            "must be an http:// or https:// URL",
        ));
    }
    for key in http.headers.keys() {
        if !is_header_name(&key.to_ascii_lowercase()) {
            violations.push(FieldViolation::new(
                format!("{path}.headers"),
                format!("'{key}' is not a valid header name"),
            ));
        }
    }
    for (j, status) in http.expected_statuses.iter().enumerate() {
        if !(100..=599).contains(status) {
            violations.push(FieldViolation::new(
                format!("{path}.expected_statuses[{j}]"),
                "must be an HTTP status from 100 to 599",
            ));
        }
    }
}

/// The first path segment of `${secrets.NAME}` placeholders: a path that
/// starts with it names one of the server's secrets, never execution data.
pub const SECRETS_SEGMENT: &str = "secrets";

/// Whether `name` may name a secret: `[A-Za-z0-9_]+`.
pub fn is_secret_name(name: &str) -> bool {
    !name.is_empty() && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
}

/// For a placeholder path (trimmed), what follows `secrets.` if the path
/// names a secret (`""` for a bare `secrets`); `None` for a data path.
pub fn secret_path(path: &str) -> Option<&str> {
    match path.strip_prefix(SECRETS_SEGMENT)? {
        "" => Some(""),
        rest => rest.strip_prefix('.'),
    }
}

/// The secret names of the `${secrets.NAME}` placeholders in `text`
/// (`$${` escapes a placeholder); an invalid reference is an `Err` saying
/// what is wrong with it.
pub fn secret_references(text: &str) -> Vec<Result<&str, String>> {
    let mut found = Vec::new();
    let mut rest = text;
    while let Some(at) = rest.find("${") {
        let escaped = rest[..at].ends_with('$');
        let inner = &rest[at + 2..];
        let Some(end) = inner.find('}') else { break };
        if !escaped && let Some(name) = secret_path(inner[..end].trim()) {
            found.push(if is_secret_name(name) {
                Ok(name)
            } else {
                Err(format!(
                    "'${{{}}}' does not name a secret: write ${{secrets.NAME}} with a NAME of \
                     letters, digits and '_'",
                    inner[..end].trim()
                ))
            });
        }
        rest = if escaped { inner } else { &inner[end + 1..] };
    }
    found
}

impl StepKind {
    /// Every `${secrets...}` reference of the step's configuration, with the
    /// field it is in (`http.headers.Authorization`, `command.env.TOKEN`):
    /// in an `http` step's URL, header values and body strings, a `grpc`
    /// step's metadata values and a `command` step's environment values.
    pub fn secret_references(&self) -> Vec<(String, Result<&str, String>)> {
        fn text<'a>(
            out: &mut Vec<(String, Result<&'a str, String>)>,
            field: String,
            value: &'a str,
        ) {
            for found in secret_references(value) {
                out.push((field.clone(), found));
            }
        }
        fn json<'a>(
            out: &mut Vec<(String, Result<&'a str, String>)>,
            field: String,
            value: &'a serde_json::Value,
        ) {
            match value {
                serde_json::Value::String(s) => text(out, field, s),
                serde_json::Value::Array(items) => {
                    for (i, item) in items.iter().enumerate() {
                        json(out, format!("{field}.{i}"), item);
                    }
                }
                serde_json::Value::Object(map) => {
                    for (key, item) in map {
                        json(out, format!("{field}.{key}"), item);
                    }
                }
                _ => {}
            }
        }
        let mut out = Vec::new();
        match self {
            Self::Http(http) => {
                text(&mut out, "http.url".to_string(), &http.url);
                for (name, value) in &http.headers {
                    text(&mut out, format!("http.headers.{name}"), value);
                }
                for (key, value) in http.body.iter().flatten() {
                    json(&mut out, format!("http.body.{key}"), value);
                }
            }
            Self::Grpc(grpc) => {
                for (name, value) in &grpc.metadata {
                    text(&mut out, format!("grpc.metadata.{name}"), value);
                }
            }
            Self::Command(command) => {
                for (name, value) in &command.env {
                    text(&mut out, format!("command.env.{name}"), value);
                }
            }
            _ => {}
        }
        out
    }
}

/// A lowercase HTTP/2 header name.
fn is_header_name(name: &str) -> bool {
    !name.is_empty()
        && name.bytes().all(|b| {
            b.is_ascii_lowercase() || b.is_ascii_digit() || b"-_.!#$%&'*+^`|~".contains(&b)
        })
}

/// Durations written as `1.5s`, `250ms`, `2m`.
mod duration {
    use serde::{Deserialize, Deserializer, Serializer};
    use std::time::Duration;

    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(&humantime::format_duration(*d))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let text = String::deserialize(d)?;
        humantime::parse_duration(&text).map_err(serde::de::Error::custom)
    }
}

mod opt_duration {
    use serde::{Deserialize, Deserializer, Serializer};
    use std::time::Duration;

    pub fn serialize<S: Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
        match d {
            Some(d) => super::duration::serialize(d, s),
            None => s.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
        Option::<String>::deserialize(d)?
            .map(|text| humantime::parse_duration(&text).map_err(serde::de::Error::custom))
            .transpose()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(yaml: &str) -> PipelineSpec {
        serde_yaml_ng::from_str(yaml).unwrap()
    }

    #[test]
    fn yaml_round_trips_every_kind() {
        let p = spec(
            "name: p\nsteps:\n- name: a\n  noop: {}\n- name: b\n  needs: [a]\n  timeout: 5s\n  sleep: {duration: 150ms}\n\
             - name: c\n  fail: {message: boom}\n- name: d\n  set: {values: {k: 1}}\n\
             - name: e\n  command: {program: sh, args: [-c, 'echo {}']}\n",
        );
        assert_eq!(p.steps[1].timeout, Some(Duration::from_secs(5)));
        assert_eq!(
            p.steps[1].kind,
            StepKind::Sleep {
                duration: Duration::from_millis(150)
            }
        );
        let again: PipelineSpec =
            serde_json::from_value(serde_json::to_value(&p).unwrap()).unwrap();
        assert_eq!(again, p);
    }

    #[test]
    fn cycle_is_named() {
        let p = spec(
            "name: p\nsteps:\n- {name: a, needs: [c], noop: {}}\n- {name: b, needs: [a], noop: {}}\n- {name: c, needs: [b], noop: {}}\n",
        );
        let Err(Error::InvalidArgument(v)) = p.validate(&CommandPolicy::default()) else {
            panic!("expected a violation")
        };
        assert_eq!(v[0].description, "dependency cycle: a -> c -> b -> a");
    }

    #[test]
    fn order_breaks_ties_by_position() {
        let p = spec(
            "name: p\nsteps:\n- {name: late, needs: [root], noop: {}}\n- {name: root, noop: {}}\n- {name: other, noop: {}}\n",
        );
        let g = Graph::new(&p);
        assert_eq!(g.order, vec![1, 0, 2]);
        assert_eq!(g.ancestors(0), vec![1]);
        assert_eq!(g.downstream(1), vec![0, 1]);
    }
}

#[cfg(test)]
mod hostile_tests {
    use super::*;

    fn violations(yaml: &str) -> Vec<FieldViolation> {
        let spec: PipelineSpec = serde_yaml_ng::from_str(yaml).unwrap();
        match spec.validate(&CommandPolicy::default()) {
            Err(Error::InvalidArgument(v)) => v,
            other => panic!("expected violations, got {other:?}"),
        }
    }

    #[test]
    fn set_values_beyond_the_output_limits_are_refused() {
        let deep = format!("{}1{}", "[".repeat(40), "]".repeat(40));
        let v = violations(&format!(
            "name: p\nsteps: [{{name: a, set: {{values: {{k: {deep}}}}}}}]"
        ));
        assert_eq!(v[0].field, "steps[0].set.values");
        assert!(v[0].description.contains("nested more than 32"), "{v:?}");
        let big = "x".repeat(300 * 1024);
        let v = violations(&format!(
            "name: p\nsteps: [{{name: a, set: {{values: {{k: {big}}}}}}}]"
        ));
        assert!(
            v[0].description.contains("more than the limit of 262144"),
            "{v:?}"
        );
        // Within the limits they are taken.
        let spec: PipelineSpec =
            serde_yaml_ng::from_str("name: p\nsteps: [{name: a, set: {values: {k: [[[1]]]}}}]")
                .unwrap();
        assert!(spec.validate(&CommandPolicy::default()).is_ok());
    }

    #[test]
    fn names_with_control_characters_are_not_names() {
        for name in ["p\0", "a\nb", "p\x1b[31m", "", &"n".repeat(129)] {
            assert!(name_problem(name).is_some(), "{name:?}");
        }
        assert_eq!(name_problem("etl-2024_v1.0"), None);
    }

    #[test]
    fn enormous_durations_are_refused_or_unreadable() {
        // Too long for a Duration: a parse error, not a panic.
        assert!(
            serde_yaml_ng::from_str::<PipelineSpec>(
                "name: p\nsteps: [{name: a, sleep: {duration: 99999999999999999999y}}]"
            )
            .is_err()
        );
        let v = violations(
            "name: p\ntimeout: 18446744073709551615s\n\
             steps: [{name: a, timeout: 500000y, sleep: {duration: 500000y}}]",
        );
        let fields: Vec<&str> = v.iter().map(|v| v.field.as_str()).collect();
        assert_eq!(
            fields,
            ["timeout", "steps[0].timeout", "steps[0].sleep.duration"]
        );
    }
}

#[cfg(test)]
mod kind_tests {
    use super::*;

    #[test]
    fn secret_references_are_checked_with_their_field() {
        let p: PipelineSpec = serde_yaml_ng::from_str(
            "name: p\nsteps:\n\
             - {name: a, http: {url: 'http://h/${secrets.OK_1}', headers: {Authorization: 'Bearer ${secrets.x-y}'}, body: {l: ['${ secrets }']}}}\n\
             - {name: b, command: {program: sh, env: {T: '${secrets.T}', U: '$${secrets.not-one}', V: '${secrets.a.b}'}}}\n\
             - {name: c, grpc: {address: 'http://w:1', metadata: {k: '${secrets.K}'}}}\n",
        )
        .unwrap();
        let Err(Error::InvalidArgument(v)) = p.validate(&CommandPolicy::new(vec!["sh".into()]))
        else {
            panic!("expected violations")
        };
        let fields: Vec<&str> = v.iter().map(|v| v.field.as_str()).collect();
        assert_eq!(
            fields,
            [
                "steps[0].http.headers.Authorization",
                "steps[0].http.body.l.0",
                "steps[1].command.env.V"
            ]
        );
        assert!(
            v[0].description.contains("'${secrets.x-y}'"),
            "{}",
            v[0].description
        );
        let names: Vec<_> = p.steps[1].kind.secret_references();
        assert_eq!(names[0], ("command.env.T".to_string(), Ok("T")));
        assert_eq!(p.steps[2].kind.secret_references()[0].1, Ok("K"));
        assert!(
            RetryPolicy {
                max_attempts: 5,
                ..Default::default()
            }
            .retries(1, "http_status")
        );
        assert!(
            !RetryPolicy {
                max_attempts: 5,
                ..Default::default()
            }
            .retries(1, "egress_denied")
        );
    }

    #[test]
    fn bare_noop_is_accepted_and_typos_in_a_kind_are_refused() {
        let p: PipelineSpec =
            serde_yaml_ng::from_str("name: p\nsteps:\n- name: a\n  noop:\n").unwrap();
        assert_eq!(p.steps[0].kind, StepKind::Noop {});
        let typo = serde_yaml_ng::from_str::<PipelineSpec>(
            "name: p\nsteps:\n- {name: a, fail: {mesage: x}}\n",
        );
        assert!(
            typo.unwrap_err()
                .to_string()
                .contains("unknown field `mesage`")
        );
    }
}
