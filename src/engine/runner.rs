//! The task that drives one execution.
//!
//! Each active execution has exactly one runner, which owns its in-memory
//! state and is the only writer of its rows, so event sequence numbers are
//! assigned without locks. Every state change is committed together with its
//! events in one transaction and only then published to watchers. Step
//! attempts run as their own tasks and report back over channels (their log
//! lines and progress on one, their outcome on another); control requests
//! (cancel, pause, resume) arrive over a third. Timers wake the runner for
//! retries whose delay is over and for the execution's deadline.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use super::Shared;
use super::steps::logs::{MAX_BYTES_PER_ATTEMPT, MAX_LINES_PER_ATTEMPT, Report};
use super::steps::{self, Attempt, Reporter, StepFailure, StepOutcome, StepReport};
use crate::domain::Error;
use crate::domain::condition;
use crate::domain::data::JsonMap;
use crate::domain::definition::Graph;
use crate::domain::limits;
use crate::domain::model::{self, Event, Execution};
use crate::domain::status::{CancelMode, EventKind, ExecutionStatus, LogStream, StepStatus};
use crate::storage::StoreError;

/// What a caller asks of a running execution.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    Cancel(CancelMode),
    Pause,
    Resume,
}

impl Action {
    /// The text stored when the request is forwarded to another replica.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Cancel(CancelMode::Graceful) => "cancel",
            Self::Cancel(CancelMode::Terminate) => "terminate",
            Self::Pause => "pause",
            Self::Resume => "resume",
        }
    }

    pub fn parse(text: &str) -> Option<Self> {
        Some(match text {
            "cancel" => Self::Cancel(CancelMode::Graceful),
            "terminate" => Self::Cancel(CancelMode::Terminate),
            "pause" => Self::Pause,
            "resume" => Self::Resume,
            _ => return None,
        })
    }

    /// What the action does to an execution in `status`: `Ok(None)` if
    /// nothing (it is already where the action would put it),
    /// `Ok(Some(next))` for a legal change, FAILED_PRECONDITION otherwise.
    pub fn plan(self, status: ExecutionStatus) -> Result<Option<ExecutionStatus>, Error> {
        let (target, verb) = match self {
            Self::Cancel(CancelMode::Graceful) => (ExecutionStatus::Stopping, "cancel"),
            Self::Cancel(CancelMode::Terminate) => (ExecutionStatus::Terminating, "cancel"),
            Self::Pause => (ExecutionStatus::Paused, "pause"),
            Self::Resume => (ExecutionStatus::Running, "resume"),
        };
        // Repeating a request, or asking a terminating execution to stop
        // gracefully, changes nothing and is not an error.
        if status == target
            || (status == ExecutionStatus::Terminating
                && self == Self::Cancel(CancelMode::Graceful))
        {
            return Ok(None);
        }
        if self == Self::Resume && status != ExecutionStatus::Paused {
            return Err(Error::FailedPrecondition(format!(
                "cannot resume an execution that is {status} (only paused executions resume)"
            )));
        }
        status.check(target, verb)?;
        Ok(Some(target))
    }
}

/// What a runner receives from the engine.
pub struct Inbox {
    pub control: mpsc::Receiver<Control>,
    /// Cancelled on shutdown, or when the runner must stop because its
    /// lease is gone.
    pub stop: CancellationToken,
}

/// A request sent to a runner, answered with the execution after it.
pub struct Control {
    pub action: Action,
    pub reply: oneshot::Sender<Result<Execution, Error>>,
}

struct Finished {
    index: usize,
    outcome: StepOutcome,
    /// Log lines and progress reports dropped over the budget.
    dropped: u64,
}

/// Log events are committed in batches of at most this many, or after
/// [`LOG_FLUSH_DELAY`], whichever comes first.
const LOG_BATCH: usize = 64;
const LOG_FLUSH_DELAY: Duration = Duration::from_millis(100);
/// Reports queued between attempts and their runner before they are dropped.
const REPORT_QUEUE: usize = 1024;

pub struct Runner {
    shared: Arc<Shared>,
    exec: Execution,
    graph: Graph,
    max_parallel: usize,
    control: mpsc::Receiver<Control>,
    /// Shutdown, or a lost lease: stop without recording anything more.
    stop: CancellationToken,
    finished_tx: mpsc::UnboundedSender<Finished>,
    finished_rx: mpsc::UnboundedReceiver<Finished>,
    reports_tx: mpsc::Sender<Report>,
    reports_rx: mpsc::Receiver<Report>,
    /// Reports received but not committed yet.
    pending_reports: Vec<Report>,
    /// When the oldest of `pending_reports` must be committed at the latest.
    flush_at: Option<tokio::time::Instant>,
    /// State changes made but not committed yet (steps changed, events):
    /// finished attempts are staged so that their outcome is committed
    /// together with whatever they let start, in one transaction. Nothing
    /// staged is published before it is committed.
    staged_steps: Vec<usize>,
    staged_events: Vec<Event>,
    /// Cancellation tokens of the attempts now running, by step index.
    running: HashMap<usize, CancellationToken>,
    /// Why the execution fails, from the first step that failed.
    failure: Option<String>,
    /// Set once the execution's deadline has passed.
    timed_out: bool,
    /// Whether this runner has removed itself from the engine's registry.
    unregistered: bool,
    /// Ready steps of this execution waiting for a parallelism slot, as
    /// added to the server's `pipelined_queue_depth{queue="steps"}`.
    waiting_for_slot: i64,
    steps_waiting: prometheus_client::metrics::gauge::Gauge,
}

impl Runner {
    pub fn new(shared: Arc<Shared>, exec: Execution, inbox: Inbox) -> Self {
        let Inbox { control, stop } = inbox;
        let graph = Graph::new(&exec.definition);
        let max_parallel = match exec.definition.max_parallel_steps {
            0 => shared.config.max_parallel_steps,
            n => n as usize,
        }
        .max(1);
        let (finished_tx, finished_rx) = mpsc::unbounded_channel();
        let (reports_tx, reports_rx) = mpsc::channel(REPORT_QUEUE);
        let steps_waiting = shared.store.metrics().steps_waiting();
        Self {
            shared,
            exec,
            graph,
            max_parallel,
            control,
            stop,
            finished_tx,
            finished_rx,
            reports_tx,
            reports_rx,
            pending_reports: Vec::new(),
            flush_at: None,
            staged_steps: Vec::new(),
            staged_events: Vec::new(),
            running: HashMap::new(),
            failure: None,
            timed_out: false,
            unregistered: false,
            waiting_for_slot: 0,
            steps_waiting,
        }
    }

    /// Sets this execution's share of the steps waiting for a slot.
    fn set_waiting_for_slot(&mut self, waiting: i64) {
        let delta = waiting - std::mem::replace(&mut self.waiting_for_slot, waiting);
        if delta != 0 {
            self.steps_waiting.inc_by(delta);
        }
    }

    pub async fn run(mut self) {
        if self.prepare().await {
            self.drive().await;
        }
        self.set_waiting_for_slot(0);
        self.unregister();
    }

    /// Brings a new, retried or recovered execution to a runnable state.
    /// Returns false if there is nothing to run.
    async fn prepare(&mut self) -> bool {
        let mut changed = Vec::new();
        let mut events = Vec::new();
        let now = model::now();
        match self.exec.status {
            ExecutionStatus::Pending => {
                self.exec.set_status(ExecutionStatus::Running);
                self.exec.started_at.get_or_insert(now);
                self.exec.deadline = self.exec.definition.timeout.map(|t| now + t);
                events.push(self.event(EventKind::ExecutionStarted, None));
            }
            ExecutionStatus::Running
            | ExecutionStatus::Paused
            | ExecutionStatus::Stopping
            | ExecutionStatus::Terminating => {
                // Recovered after a restart: attempts that were running when
                // the server stopped run again (at least once).
                for (i, step) in self.exec.steps.iter_mut().enumerate() {
                    if step.status == StepStatus::Running {
                        step.reset();
                        changed.push(i);
                    }
                }
                self.failure = self.exec.steps.iter().enumerate().find_map(|(i, s)| {
                    (s.status == StepStatus::Failed
                        && !self.exec.definition.steps[i].continue_on_failure)
                        .then(|| format!("step '{}' failed: {}", s.name, s.error))
                });
            }
            ExecutionStatus::Queued
            | ExecutionStatus::Succeeded
            | ExecutionStatus::Failed
            | ExecutionStatus::Cancelled => {
                return false;
            }
        }
        // Committed with the first steps to start (or on its own, below).
        self.stage(&changed, events);
        true
    }

    async fn drive(&mut self) {
        loop {
            if self.stop.is_cancelled() {
                // Outcomes of attempts that finished are kept if the
                // database takes them at once (one try: the server is
                // stopping); otherwise those steps run again.
                self.commit_staged().await;
                return self.abandon().await;
            }
            // Past the deadline (say, after a restart), nothing new starts.
            if self.deadline_to_watch().is_some_and(|at| at <= Utc::now()) {
                self.on_deadline();
            }
            // Commits what is staged, with the steps that start now.
            if !self.start_ready_steps().await {
                return self.abandon().await;
            }
            let retry_at = self.next_retry_at();
            if self.running.is_empty() && retry_at.is_none() && !self.waits_for_resume() {
                return self.finish().await;
            }
            // Nothing started: what is staged is committed before waiting.
            if !self.commit_staged().await {
                return self.abandon().await;
            }
            let flush_at = self.flush_at;
            let deadline = self.deadline_to_watch();
            // Biased: a finished attempt is recorded before a shutdown is noticed.
            tokio::select! {
                biased;
                Some(done) = self.finished_rx.recv() => {
                    // Every attempt that has finished by now, in one commit.
                    self.on_step_finished(done);
                    while let Ok(done) = self.finished_rx.try_recv() {
                        self.on_step_finished(done);
                    }
                }
                Some(report) = self.reports_rx.recv() => {
                    self.pending_reports.push(report);
                    self.flush_at.get_or_insert_with(|| tokio::time::Instant::now() + LOG_FLUSH_DELAY);
                    if self.pending_reports.len() >= LOG_BATCH && !self.commit(&[], Vec::new()).await {
                        return self.abandon().await;
                    }
                }
                Some(control) = self.control.recv() => {
                    if !self.on_control(control).await {
                        return self.abandon().await;
                    }
                }
                _ = tokio::time::sleep_until(flush_at.unwrap_or_else(tokio::time::Instant::now)), if flush_at.is_some() => {
                    if !self.commit(&[], Vec::new()).await {
                        return self.abandon().await;
                    }
                }
                _ = sleep_until(retry_at), if retry_at.is_some() => {}
                _ = sleep_until(deadline), if deadline.is_some() => self.on_deadline(),
                _ = self.stop.cancelled() => return self.abandon().await,
            }
        }
    }

    /// Whether the steps that need step `i` may run: it succeeded, its
    /// condition skipped it, or it is optional and failed.
    fn satisfies_dependents(&self, i: usize) -> bool {
        match self.exec.steps[i].status {
            StepStatus::Succeeded | StepStatus::Skipped => true,
            StepStatus::Failed => self.exec.definition.steps[i].continue_on_failure,
            _ => false,
        }
    }

    /// Pending steps whose needs are met, in execution order.
    fn ready_steps(&self) -> impl Iterator<Item = usize> + '_ {
        self.graph.order.iter().copied().filter(|&i| {
            self.exec.steps[i].status == StepStatus::Pending
                && self.graph.needs[i]
                    .iter()
                    .all(|&d| self.satisfies_dependents(d))
        })
    }

    /// Whether new steps may start at all.
    fn may_start_steps(&self) -> bool {
        self.exec.status == ExecutionStatus::Running && self.failure.is_none() && !self.timed_out
    }

    /// When the earliest retry waiting for its delay may start, if a slot
    /// is free for it.
    fn next_retry_at(&self) -> Option<DateTime<Utc>> {
        if !self.may_start_steps() || self.running.len() >= self.max_parallel {
            return None;
        }
        self.ready_steps()
            .filter_map(|i| self.exec.steps[i].next_attempt_at)
            .min()
    }

    /// A paused execution with work left waits for `ResumeExecution`.
    fn waits_for_resume(&self) -> bool {
        self.exec.status == ExecutionStatus::Paused
            && self.failure.is_none()
            && !self.timed_out
            && self
                .exec
                .steps
                .iter()
                .any(|s| s.status == StepStatus::Pending)
    }

    /// The deadline, while it can still end the execution.
    fn deadline_to_watch(&self) -> Option<DateTime<Utc>> {
        let watching = matches!(
            self.exec.status,
            ExecutionStatus::Running | ExecutionStatus::Paused
        );
        self.exec.deadline.filter(|_| watching && !self.timed_out)
    }

    /// The deadline passed: running attempts are stopped now, nothing new
    /// starts, and the execution fails once they have settled.
    fn on_deadline(&mut self) {
        let limit = self
            .exec
            .definition
            .timeout
            .map(|t| humantime::format_duration(t).to_string())
            .unwrap_or_default();
        self.timed_out = true;
        self.failure = Some(format!("execution timed out after {limit}"));
        self.running.values().for_each(CancellationToken::cancel);
    }

    /// Starts every ready step, in execution order, while slots are free;
    /// a step whose condition is false is skipped (which may make others
    /// ready). Returns false if the server is stopping.
    async fn start_ready_steps(&mut self) -> bool {
        loop {
            if !self.may_start_steps() {
                self.set_waiting_for_slot(0);
                return true;
            }
            let now = model::now();
            let mut free = self.max_parallel.saturating_sub(self.running.len());
            let ready: Vec<usize> = self
                .ready_steps()
                .filter(|&i| {
                    self.exec.steps[i]
                        .next_attempt_at
                        .is_none_or(|at| at <= now)
                })
                .collect();
            // Conditions may take up to a second each: what is staged is
            // committed (and published) first, not held behind them.
            if ready
                .iter()
                .any(|&i| !self.exec.definition.steps[i].when.is_empty())
                && !self.commit_staged().await
            {
                return false;
            }
            let mut started = Vec::new();
            let mut changed = Vec::new();
            let mut events = Vec::new();
            let mut waiting = ready.len() as i64;
            for i in ready {
                if free == 0 {
                    break;
                }
                waiting -= 1;
                let condition = self.exec.definition.steps[i].when.clone();
                let verdict = if condition.is_empty() {
                    Ok(true)
                } else {
                    // Off the async workers: evaluation may take up to a second.
                    let data = self.exec.step_input(&self.graph, i);
                    let input = self.exec.input.clone();
                    let source = condition.clone();
                    tokio::task::spawn_blocking(move || condition::evaluate(&source, &data, &input))
                        .await
                        .unwrap_or_else(|e| Err(format!("evaluation failed: {e}")))
                };
                match verdict {
                    Err(problem) if condition::is_busy(&problem) => {
                        // Try again in a moment; nothing to record.
                        self.exec.steps[i].next_attempt_at =
                            Some(now + std::time::Duration::from_secs(1));
                    }
                    Ok(true) => {
                        free -= 1;
                        let step = &mut self.exec.steps[i];
                        step.set_status(StepStatus::Running);
                        step.attempt += 1;
                        step.finished_at = None;
                        step.output = None;
                        step.error.clear();
                        step.error_kind.clear();
                        step.reason.clear();
                        step.next_attempt_at = None;
                        step.started_at = Some(now);
                        events.push(self.event(EventKind::StepStarted, Some(i)));
                        started.push(i);
                        changed.push(i);
                    }
                    Ok(false) => {
                        let step = &mut self.exec.steps[i];
                        step.set_status(StepStatus::Skipped);
                        step.reason = format!("condition is false: {condition}");
                        step.finished_at = Some(now);
                        let mut event = self.event(EventKind::StepSkipped, Some(i));
                        event.message = self.exec.steps[i].reason.clone();
                        events.push(event);
                        changed.push(i);
                    }
                    Err(problem) => {
                        // A condition that cannot be evaluated fails the
                        // step; trying again would not change the data.
                        let step = &mut self.exec.steps[i];
                        step.set_status(StepStatus::Running);
                        step.set_status(StepStatus::Failed);
                        step.attempt += 1;
                        step.started_at = Some(now);
                        step.error = format!("when: {problem}");
                        step.error_kind = "condition".to_string();
                        step.finished_at = Some(now);
                        if !self.exec.definition.steps[i].continue_on_failure {
                            self.failure.get_or_insert_with(|| {
                                format!(
                                    "step '{}' failed: when: {problem}",
                                    self.exec.steps[i].name
                                )
                            });
                        }
                        events.push(self.step_event(EventKind::StepFailed, i));
                        changed.push(i);
                    }
                }
            }
            self.set_waiting_for_slot(waiting);
            if changed.is_empty() {
                return true;
            }
            if !self.commit(&changed, events).await {
                return false;
            }
            for &i in &started {
                self.spawn_attempt(i);
            }
            // Only skips and failures can make more steps ready (or stop
            // them); started steps cannot.
            if started.len() == changed.len() {
                return true;
            }
        }
    }

    fn spawn_attempt(&mut self, index: usize) {
        let cancel = CancellationToken::new();
        self.running.insert(index, cancel.clone());
        // A child of the runner's `execution` span.
        let span = tracing::info_span!(
            "step",
            execution_id = %self.exec.id,
            step = %self.exec.steps[index].name,
            attempt = self.exec.steps[index].attempt,
            kind = self.exec.definition.steps[index].kind.name(),
        );
        if let Some(outcome) = steps::instant(&self.exec.definition.steps[index].kind) {
            drop(span);
            // No task of its own, no wake-up: the outcome is read by the
            // next turn of `drive`.
            let _ = self.finished_tx.send(Finished {
                index,
                outcome,
                dropped: 0,
            });
            return;
        }
        let spec = self.exec.definition.steps[index].clone();
        let input = self.exec.step_input(&self.graph, index);
        let execution_id = self.exec.id.clone();
        let pipeline_name = self.exec.pipeline_name.clone();
        let attempt = self.exec.steps[index].attempt;
        let shared = Arc::clone(&self.shared);
        let finished = self.finished_tx.clone();
        let reporter = Reporter::new(index, attempt, self.reports_tx.clone());
        let attempt_task = async move {
            let outcome = steps::run(Attempt {
                kind: &spec.kind,
                execution_id: &execution_id,
                pipeline_name: &pipeline_name,
                step_name: &spec.name,
                attempt,
                input,
                timeout: spec.timeout,
                commands: &shared.config.commands,
                processes: shared.processes.as_ref(),
                reporter: &reporter,
                cancel,
                egress: &shared.config.egress,
                secrets: &shared.config.secrets,
            })
            .await;
            let dropped = reporter.dropped();
            let _ = finished.send(Finished {
                index,
                outcome,
                dropped,
            });
        };
        tokio::spawn(tracing::Instrument::instrument(attempt_task, span));
    }

    /// Records the outcome of a finished attempt, staged for the next commit.
    fn on_step_finished(&mut self, done: Finished) {
        // Everything the attempt reported was queued before it finished.
        while let Ok(report) = self.reports_rx.try_recv() {
            self.pending_reports.push(report);
        }
        self.running.remove(&done.index);
        let i = done.index;
        let mut events = Vec::new();
        if done.dropped > 0 {
            let mut event = self.event(EventKind::StepLog, Some(i));
            event.log_stream = Some(LogStream::System);
            event.message = format!(
                "{} log lines dropped: an attempt keeps at most {MAX_LINES_PER_ATTEMPT} lines and {} KiB",
                done.dropped,
                MAX_BYTES_PER_ATTEMPT / 1024
            );
            events.push(event);
        }
        let now = model::now();
        let outcome = match done.outcome {
            StepOutcome::Succeeded(output) => self.accept_output(i, output),
            other => other,
        };
        let step = &mut self.exec.steps[i];
        step.finished_at = Some(now);
        self.shared.store.metrics().step_finished(
            self.exec.definition.steps[i].kind.name(),
            match outcome {
                StepOutcome::Succeeded(_) => "succeeded",
                StepOutcome::Failed(_) => "failed",
                StepOutcome::Cancelled(_) => "cancelled",
            },
            step.duration().unwrap_or_default().as_secs_f64(),
        );
        let kind = match outcome {
            StepOutcome::Succeeded(output) => {
                step.set_status(StepStatus::Succeeded);
                step.output = Some(output);
                self.exec.recompute_data(&self.graph);
                EventKind::StepSucceeded
            }
            StepOutcome::Failed(failure) => self.on_step_failed(i, failure, now),
            StepOutcome::Cancelled(reason) => {
                step.set_status(StepStatus::Cancelled);
                step.reason = if self.timed_out {
                    "execution timed out".to_string()
                } else {
                    reason
                };
                EventKind::StepCancelled
            }
        };
        let event = self.step_event(kind, i);
        events.push(event);
        self.stage(&[i], events);
    }

    /// Fails an output that would make the execution's data too large.
    fn accept_output(&self, i: usize, output: JsonMap) -> StepOutcome {
        let others: usize = self
            .exec
            .steps
            .iter()
            .enumerate()
            .filter(|&(j, _)| j != i)
            .filter_map(|(_, s)| s.output.as_ref())
            .map(limits::json_size)
            .sum();
        if others + limits::json_size(&output) > limits::MAX_TOTAL_OUTPUT_BYTES {
            return StepOutcome::Failed(StepFailure::new(
                "data_too_large",
                format!(
                    "the outputs of this execution's steps would be more than {} bytes as JSON",
                    limits::MAX_TOTAL_OUTPUT_BYTES
                ),
            ));
        }
        let mut data = self.exec.execution_data.clone();
        crate::domain::data::merge(&mut data, &output);
        if let Err(problem) = limits::check_object(&data, limits::MAX_EXECUTION_DATA_BYTES) {
            return StepFailure::new(
                "data_too_large",
                format!("with this output the execution data {problem}"),
            )
            .into();
        }
        StepOutcome::Succeeded(output)
    }

    /// Records a failed attempt: another attempt is scheduled if the retry
    /// policy allows, else the step fails (and with it the execution, unless
    /// the step may fail).
    fn on_step_failed(&mut self, i: usize, failure: StepFailure, now: DateTime<Utc>) -> EventKind {
        let spec = &self.exec.definition.steps[i];
        let policy = spec
            .retry
            .as_ref()
            .or(self.exec.definition.default_retry.as_ref());
        // No retry once the execution is failing, stopping or out of time.
        let may_retry = matches!(
            self.exec.status,
            ExecutionStatus::Running | ExecutionStatus::Paused
        ) && !self.timed_out
            && self.failure.is_none();
        let step = &mut self.exec.steps[i];
        step.error = failure.message;
        step.error_kind = failure.kind;
        match policy {
            Some(policy)
                if may_retry
                    && policy.retries(step.attempt - step.retry_base, &step.error_kind) =>
            {
                let delay = policy.delay(step.attempt - step.retry_base, random_unit());
                step.set_status(StepStatus::Pending);
                step.next_attempt_at = Some(now + delay);
                EventKind::StepRetrying
            }
            _ => {
                step.set_status(StepStatus::Failed);
                if !spec.continue_on_failure {
                    self.failure.get_or_insert_with(|| {
                        format!("step '{}' failed: {}", step.name, step.error)
                    });
                }
                EventKind::StepFailed
            }
        }
    }

    async fn on_control(&mut self, Control { action, reply }: Control) -> bool {
        let result = match action.plan(self.exec.status) {
            Err(error) => Err(error),
            Ok(None) => Ok(true),
            Ok(Some(target)) => self.apply(action, target).await,
        };
        match result {
            Ok(committed) => {
                let _ = reply.send(Ok(self.exec.clone()));
                committed
            }
            Err(error) => {
                // Not committed (shutdown or a lost lease): this runner stops.
                let keep_going = !matches!(error, Error::ShuttingDown);
                let _ = reply.send(Err(error));
                keep_going
            }
        }
    }

    /// Moves the execution to `target` as `action` asks (already planned
    /// as legal). Ok(false) if the change could not be committed.
    async fn apply(&mut self, action: Action, target: ExecutionStatus) -> Result<bool, Error> {
        self.exec.set_status(target);
        let mut event = match action {
            Action::Cancel(mode) => {
                let mut event = self.event(EventKind::ExecutionCancelRequested, None);
                event.message = mode.as_str().to_string();
                event
            }
            Action::Pause => self.event(EventKind::ExecutionPaused, None),
            Action::Resume => self.event(EventKind::ExecutionResumed, None),
        };
        event.execution_status = target;
        if !self.commit(&[], vec![event]).await {
            return Err(Error::ShuttingDown);
        }
        if action == Action::Cancel(CancelMode::Terminate) {
            self.running.values().for_each(CancellationToken::cancel);
        }
        Ok(true)
    }

    /// Nothing is running any more: settles the remaining steps and the
    /// execution, commits, and tells watchers.
    async fn finish(&mut self) {
        let now = model::now();
        let cancelling = matches!(
            self.exec.status,
            ExecutionStatus::Stopping | ExecutionStatus::Terminating
        );
        let pending: Vec<usize> = (0..self.exec.steps.len())
            .filter(|&i| self.exec.steps[i].status == StepStatus::Pending)
            .collect();
        let (step_status, step_event, reason, outcome) = if cancelling {
            let reason = "execution cancelled".to_string();
            (
                StepStatus::Cancelled,
                EventKind::StepCancelled,
                reason,
                ExecutionStatus::Cancelled,
            )
        } else if let Some(failure) = &self.failure {
            let reason = format!("not run: {failure}");
            (
                StepStatus::Skipped,
                EventKind::StepSkipped,
                reason,
                ExecutionStatus::Failed,
            )
        } else if pending.is_empty() {
            (
                StepStatus::Skipped,
                EventKind::StepSkipped,
                String::new(),
                ExecutionStatus::Succeeded,
            )
        } else {
            let reason = "not run: a step it needs did not succeed".to_string();
            self.failure = Some(format!("{} steps could not run", pending.len()));
            (
                StepStatus::Skipped,
                EventKind::StepSkipped,
                reason,
                ExecutionStatus::Failed,
            )
        };
        let mut events = Vec::new();
        for &i in &pending {
            let step = &mut self.exec.steps[i];
            step.finished_at = Some(now);
            if step.next_attempt_at.take().is_some() && !cancelling {
                // It failed and was waiting for another attempt that will
                // not come: it stays failed, with its last error.
                step.set_status(StepStatus::Failed);
                step.reason = format!(
                    "no further attempt: {}",
                    reason.trim_start_matches("not run: ")
                );
                events.push(self.step_event(EventKind::StepFailed, i));
                continue;
            }
            step.set_status(step_status);
            step.reason = reason.clone();
            let mut event = self.event(step_event, Some(i));
            event.message = reason.clone();
            events.push(event);
        }
        self.exec.set_status(outcome);
        self.exec.finished_at = Some(now);
        self.exec.error_message = match outcome {
            ExecutionStatus::Cancelled => match &self.failure {
                Some(failure) => format!("cancelled by request; {failure}"),
                None => "cancelled by request".to_string(),
            },
            ExecutionStatus::Failed => self.failure.clone().unwrap_or_default(),
            _ => String::new(),
        };
        let kind = match outcome {
            ExecutionStatus::Succeeded => EventKind::ExecutionSucceeded,
            ExecutionStatus::Failed => EventKind::ExecutionFailed,
            _ => EventKind::ExecutionCancelled,
        };
        let mut event = self.event(kind, None);
        event.message = self.exec.error_message.clone();
        event.duration = self.exec.duration();
        event.execution_data = Some(self.exec.execution_data.clone());
        events.push(event);
        let (pending, events) = self.take_staged(&pending, events);
        let events = self.with_reports(events);
        if self.persist(&pending, &events).await {
            // Unregister before publishing, so that a client reacting to the
            // terminal event can retry the execution at once.
            self.unregister();
            // Counted before watchers learn of the end.
            self.shared
                .store
                .metrics()
                .execution_finished(&self.exec.pipeline_name, outcome.as_str());
            // In the `execution` span: the line carries the execution id.
            tracing::info!(status = %outcome, "execution finished");
            self.shared.hub.publish(&events);
            let capped = self
                .exec
                .definition
                .concurrency
                .as_ref()
                .is_some_and(|c| c.max_active > 0);
            self.shared
                .execution_finished(&self.exec.pipeline_name, capped);
        }
    }

    /// The server is shutting down: stops running attempts without recording
    /// their end, so that they run again when the server starts next.
    async fn abandon(&mut self) {
        self.running.values().for_each(CancellationToken::cancel);
        while !self.running.is_empty() {
            match self.finished_rx.recv().await {
                Some(done) => {
                    self.running.remove(&done.index);
                }
                None => break,
            }
        }
        // Answer pending requests so their callers are not left waiting.
        self.control.close();
        while let Ok(control) = self.control.try_recv() {
            let _ = control.reply.send(Err(Error::ShuttingDown));
        }
    }

    /// Removes this runner from the engine's registry, once: afterwards a
    /// retry may register a new runner under the same id.
    fn unregister(&mut self) {
        if !std::mem::replace(&mut self.unregistered, true) {
            self.shared
                .runners
                .lock()
                .expect("runners lock")
                .remove(&self.exec.id);
        }
    }

    /// Turns the reports received so far into events placed before `events`.
    fn with_reports(&mut self, events: Vec<Event>) -> Vec<Event> {
        if self.pending_reports.is_empty() {
            return events;
        }
        // The reports take sequences before the events already built: shift those.
        self.flush_at = None;
        let reports = std::mem::take(&mut self.pending_reports);
        let shift = reports.len() as i64;
        let first = self.exec.last_sequence - events.len() as i64 + 1;
        let mut all = Vec::with_capacity(reports.len() + events.len());
        for (k, report) in reports.into_iter().enumerate() {
            let mut event = Event::new(&self.exec, first + k as i64, EventKind::StepLog);
            let step = &self.exec.steps[report.index];
            event.step_name = Some(step.name.clone());
            event.attempt = report.attempt;
            match report.report {
                StepReport::Log { stream, line } => {
                    event.log_stream = Some(stream);
                    event.message = line;
                }
                StepReport::Progress { percent, message } => {
                    event.kind = EventKind::StepProgress;
                    event.step_percent = Some(percent);
                    event.message = message;
                }
            }
            all.push(event);
        }
        for mut event in events {
            event.sequence += shift;
            all.push(event);
        }
        self.exec.last_sequence += shift;
        all
    }

    /// Adds state changes to the next commit.
    fn stage(&mut self, changed: &[usize], events: Vec<Event>) {
        for &i in changed {
            if !self.staged_steps.contains(&i) {
                self.staged_steps.push(i);
            }
        }
        self.staged_events.extend(events);
    }

    /// What is staged followed by `changed` and `events` (whose sequences
    /// follow the staged ones), leaving nothing staged.
    fn take_staged(&mut self, changed: &[usize], events: Vec<Event>) -> (Vec<usize>, Vec<Event>) {
        self.stage(changed, events);
        (
            std::mem::take(&mut self.staged_steps),
            std::mem::take(&mut self.staged_events),
        )
    }

    /// Commits what is staged, if anything (reports wait for their batch).
    async fn commit_staged(&mut self) -> bool {
        if self.staged_steps.is_empty() && self.staged_events.is_empty() {
            return true;
        }
        self.commit(&[], Vec::new()).await
    }

    /// Commits what is staged with `changed` and `events`, then publishes.
    /// Returns false if the server is stopping.
    async fn commit(&mut self, changed: &[usize], events: Vec<Event>) -> bool {
        let (changed, events) = self.take_staged(changed, events);
        let events = self.with_reports(events);
        if changed.is_empty() && events.is_empty() {
            return true;
        }
        if !self.persist(&changed, &events).await {
            return false;
        }
        self.shared.hub.publish(&events);
        true
    }

    /// Commits the current state of the execution, the steps at `changed` and
    /// `events` in one transaction, retrying while the database fails.
    /// Returns false if the server began shutting down first.
    async fn persist(&mut self, changed: &[usize], events: &[Event]) -> bool {
        let mut delay = Duration::from_millis(50);
        loop {
            match self
                .shared
                .store
                .save(&self.exec, changed, events, None)
                .await
            {
                Ok(()) => return true,
                Err(StoreError::LeaseLost(_)) => {
                    // Another replica runs it now; stop without recording.
                    tracing::warn!(execution_id = %self.exec.id, "lost the lease on this execution; another replica took it over");
                    return false;
                }
                Err(error) => {
                    tracing::warn!(execution_id = %self.exec.id, %error, "saving execution state failed; retrying");
                    tokio::select! {
                        _ = tokio::time::sleep(delay) => {}
                        _ = self.stop.cancelled() => return false,
                    }
                    delay = (delay * 2).min(Duration::from_secs(1));
                }
            }
        }
    }

    /// A new event for the execution's current state; takes the next sequence.
    fn event(&mut self, kind: EventKind, step: Option<usize>) -> Event {
        self.exec.last_sequence += 1;
        let mut event = Event::new(&self.exec, self.exec.last_sequence, kind);
        if let Some(step) = step.map(|i| &self.exec.steps[i]) {
            event.step_name = Some(step.name.clone());
            event.attempt = step.attempt;
        }
        event
    }

    /// An event for a step that just finished an attempt.
    fn step_event(&mut self, kind: EventKind, index: usize) -> Event {
        let mut event = self.event(kind, Some(index));
        let step = &self.exec.steps[index];
        event.output = step.output.clone();
        event.message = match kind {
            EventKind::StepFailed | EventKind::StepRetrying => step.error.clone(),
            _ => step.reason.clone(),
        };
        if matches!(kind, EventKind::StepFailed | EventKind::StepRetrying) {
            event.error_kind = step.error_kind.clone();
        }
        event.next_attempt_at = step.next_attempt_at;
        event.duration = step.duration();
        event
    }
}

impl From<StepFailure> for StepOutcome {
    fn from(failure: StepFailure) -> Self {
        Self::Failed(failure)
    }
}

/// Sleeps until `at` (at once if it has passed); forever if `None`.
async fn sleep_until(at: Option<DateTime<Utc>>) {
    match at {
        Some(at) => tokio::time::sleep((at - Utc::now()).to_std().unwrap_or_default()).await,
        None => std::future::pending().await,
    }
}

/// A random number in [0, 1) for retry jitter; needs no random crate.
fn random_unit() -> f64 {
    use std::hash::BuildHasher;
    let bits = std::collections::hash_map::RandomState::new().hash_one(Utc::now());
    (bits >> 11) as f64 / (1u64 << 53) as f64
}
