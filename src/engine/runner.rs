//! The task that drives one execution.
//!
//! Each active execution has exactly one runner, which owns its in-memory
//! state and is the only writer of its rows, so event sequence numbers are
//! assigned without locks. Every state change is committed together with its
//! events in one transaction and only then published to watchers. Step
//! attempts run as their own tasks and report back over a channel; cancel
//! requests arrive over another.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use super::Shared;
use super::steps::{self, Attempt, StepOutcome};
use crate::domain::Error;
use crate::domain::definition::Graph;
use crate::domain::model::{Event, Execution};
use crate::domain::status::{CancelMode, EventKind, ExecutionStatus, StepStatus};

/// A request sent to a runner.
pub enum Control {
    Cancel {
        mode: CancelMode,
        reply: oneshot::Sender<Result<Execution, Error>>,
    },
}

struct Finished {
    index: usize,
    outcome: StepOutcome,
}

pub struct Runner {
    shared: Arc<Shared>,
    exec: Execution,
    graph: Graph,
    max_parallel: usize,
    control: mpsc::Receiver<Control>,
    finished_tx: mpsc::UnboundedSender<Finished>,
    finished_rx: mpsc::UnboundedReceiver<Finished>,
    /// Cancellation tokens of the attempts now running, by step index.
    running: HashMap<usize, CancellationToken>,
    /// Why the execution fails, from the first step that failed.
    failure: Option<String>,
    /// Whether this runner has removed itself from the engine's registry.
    unregistered: bool,
}

impl Runner {
    pub fn new(shared: Arc<Shared>, exec: Execution, control: mpsc::Receiver<Control>) -> Self {
        let graph = Graph::new(&exec.definition);
        let max_parallel = match exec.definition.max_parallel_steps {
            0 => shared.config.max_parallel_steps,
            n => n as usize,
        }
        .max(1);
        let (finished_tx, finished_rx) = mpsc::unbounded_channel();
        Self {
            shared,
            exec,
            graph,
            max_parallel,
            control,
            finished_tx,
            finished_rx,
            running: HashMap::new(),
            failure: None,
            unregistered: false,
        }
    }

    pub async fn run(mut self) {
        if self.prepare().await {
            self.drive().await;
        }
        self.unregister();
    }

    /// Brings a new, retried or recovered execution to a runnable state.
    /// Returns false if there is nothing to run.
    async fn prepare(&mut self) -> bool {
        let mut changed = Vec::new();
        let mut events = Vec::new();
        let now = Utc::now();
        match self.exec.status {
            ExecutionStatus::Pending => {
                self.exec.set_status(ExecutionStatus::Running);
                self.exec.started_at.get_or_insert(now);
                events.push(self.event(EventKind::ExecutionStarted, None));
            }
            ExecutionStatus::Running | ExecutionStatus::Stopping | ExecutionStatus::Terminating => {
                // Recovered after a restart: attempts that were running when
                // the server stopped run again (at least once).
                for (i, step) in self.exec.steps.iter_mut().enumerate() {
                    if step.status == StepStatus::Running {
                        step.reset();
                        changed.push(i);
                    }
                }
                if let Some(failed) = self
                    .exec
                    .steps
                    .iter()
                    .find(|s| s.status == StepStatus::Failed)
                {
                    self.failure = Some(format!("step '{}' failed: {}", failed.name, failed.error));
                }
            }
            ExecutionStatus::Succeeded | ExecutionStatus::Failed | ExecutionStatus::Cancelled => {
                return false;
            }
        }
        self.commit(&changed, events).await
    }

    async fn drive(&mut self) {
        loop {
            if self.shared.shutdown.is_cancelled() {
                return self.abandon().await;
            }
            if !self.start_ready_steps().await {
                return self.abandon().await;
            }
            if self.running.is_empty() {
                return self.finish().await;
            }
            // Biased: a finished attempt is recorded before a shutdown is noticed.
            tokio::select! {
                biased;
                Some(done) = self.finished_rx.recv() => {
                    if !self.on_step_finished(done).await {
                        return self.abandon().await;
                    }
                }
                Some(control) = self.control.recv() => {
                    if !self.on_control(control).await {
                        return self.abandon().await;
                    }
                }
                _ = self.shared.shutdown.cancelled() => return self.abandon().await,
            }
        }
    }

    /// Starts every pending step whose needs have succeeded, in execution
    /// order, while slots are free. Returns false if the server is stopping.
    async fn start_ready_steps(&mut self) -> bool {
        if self.exec.status != ExecutionStatus::Running || self.failure.is_some() {
            return true;
        }
        let free = self.max_parallel.saturating_sub(self.running.len());
        let ready: Vec<usize> = self
            .graph
            .order
            .iter()
            .copied()
            .filter(|&i| {
                self.exec.steps[i].status == StepStatus::Pending
                    && self.graph.needs[i]
                        .iter()
                        .all(|&d| self.exec.steps[d].status == StepStatus::Succeeded)
            })
            .take(free)
            .collect();
        if ready.is_empty() {
            return true;
        }
        let now = Utc::now();
        let mut events = Vec::with_capacity(ready.len());
        for &i in &ready {
            let step = &mut self.exec.steps[i];
            step.set_status(StepStatus::Running);
            step.attempt += 1;
            step.finished_at = None;
            step.output = None;
            step.error.clear();
            step.reason.clear();
            step.started_at = Some(now);
            let mut event = self.event(EventKind::StepStarted, Some(i));
            event.attempt = self.exec.steps[i].attempt;
            events.push(event);
        }
        if !self.commit(&ready, events).await {
            return false;
        }
        for i in ready {
            self.spawn_attempt(i);
        }
        true
    }

    fn spawn_attempt(&mut self, index: usize) {
        let cancel = CancellationToken::new();
        self.running.insert(index, cancel.clone());
        let spec = self.exec.definition.steps[index].clone();
        let input = self.exec.step_input(&self.graph, index);
        let execution_id = self.exec.id.clone();
        let attempt = self.exec.steps[index].attempt;
        let shared = Arc::clone(&self.shared);
        let finished = self.finished_tx.clone();
        tokio::spawn(async move {
            let outcome = steps::run(Attempt {
                kind: &spec.kind,
                execution_id: &execution_id,
                step_name: &spec.name,
                attempt,
                input,
                timeout: spec.timeout,
                commands: &shared.config.commands,
                cancel,
            })
            .await;
            let _ = finished.send(Finished { index, outcome });
        });
    }

    async fn on_step_finished(&mut self, done: Finished) -> bool {
        self.running.remove(&done.index);
        let i = done.index;
        let step = &mut self.exec.steps[i];
        step.finished_at = Some(Utc::now());
        let kind = match done.outcome {
            StepOutcome::Succeeded(output) => {
                step.set_status(StepStatus::Succeeded);
                step.output = Some(output);
                self.exec.recompute_data(&self.graph);
                EventKind::StepSucceeded
            }
            StepOutcome::Failed(error) => {
                step.set_status(StepStatus::Failed);
                step.error = error;
                self.failure
                    .get_or_insert_with(|| format!("step '{}' failed: {}", step.name, step.error));
                EventKind::StepFailed
            }
            StepOutcome::Cancelled(reason) => {
                step.set_status(StepStatus::Cancelled);
                step.reason = reason;
                EventKind::StepCancelled
            }
        };
        let event = self.step_event(kind, i);
        self.commit(&[i], vec![event]).await
    }

    async fn on_control(&mut self, control: Control) -> bool {
        match control {
            Control::Cancel { mode, reply } => {
                let target = match mode {
                    CancelMode::Graceful => ExecutionStatus::Stopping,
                    CancelMode::Terminate => ExecutionStatus::Terminating,
                };
                let status = self.exec.status;
                // Repeating a cancel, or asking a terminating execution to
                // stop gracefully, changes nothing and is not an error.
                if status == target
                    || (status == ExecutionStatus::Terminating && mode == CancelMode::Graceful)
                {
                    let _ = reply.send(Ok(self.exec.clone()));
                    return true;
                }
                if let Err(e) = status.check(target, "cancel") {
                    let _ = reply.send(Err(e));
                    return true;
                }
                self.exec.set_status(target);
                let mut event = self.event(EventKind::ExecutionCancelRequested, None);
                event.message = mode.as_str().to_string();
                if !self.commit(&[], vec![event]).await {
                    let _ = reply.send(Err(Error::ShuttingDown));
                    return false;
                }
                if mode == CancelMode::Terminate {
                    self.running.values().for_each(CancellationToken::cancel);
                }
                let _ = reply.send(Ok(self.exec.clone()));
                true
            }
        }
    }

    /// Nothing is running any more: settles the remaining steps and the
    /// execution, commits, and tells watchers.
    async fn finish(&mut self) {
        let now = Utc::now();
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
            step.set_status(step_status);
            step.reason = reason.clone();
            step.finished_at = Some(now);
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
        if self.persist(&pending, &events).await {
            // Unregister before publishing, so that a client reacting to the
            // terminal event can retry the execution at once.
            self.unregister();
            self.shared.hub.publish(&events);
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
        // Answer pending cancel requests so their callers are not left waiting.
        self.control.close();
        while let Ok(Control::Cancel { reply, .. }) = self.control.try_recv() {
            let _ = reply.send(Err(Error::ShuttingDown));
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

    /// Commits, then publishes. Returns false if the server is stopping.
    async fn commit(&mut self, changed: &[usize], events: Vec<Event>) -> bool {
        if changed.is_empty() && events.is_empty() {
            return true;
        }
        if !self.persist(changed, &events).await {
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
                Err(error) => {
                    tracing::warn!(execution = %self.exec.id, %error, "saving execution state failed; retrying");
                    tokio::select! {
                        _ = tokio::time::sleep(delay) => {}
                        _ = self.shared.shutdown.cancelled() => return false,
                    }
                    delay = (delay * 2).min(Duration::from_secs(5));
                }
            }
        }
    }

    /// A new event for the execution's current state; takes the next sequence.
    fn event(&mut self, kind: EventKind, step: Option<usize>) -> Event {
        self.exec.last_sequence += 1;
        let step = step.map(|i| &self.exec.steps[i]);
        Event {
            execution_id: self.exec.id.clone(),
            sequence: self.exec.last_sequence,
            kind,
            time: Utc::now(),
            execution_status: self.exec.status,
            step_name: step.map(|s| s.name.clone()),
            attempt: step.map_or(0, |s| s.attempt),
            output: None,
            message: String::new(),
            duration: None,
            progress: self.exec.progress(),
            execution_data: None,
        }
    }

    /// An event for a step that just finished an attempt.
    fn step_event(&mut self, kind: EventKind, index: usize) -> Event {
        let mut event = self.event(kind, Some(index));
        let step = &self.exec.steps[index];
        event.output = step.output.clone();
        event.message = match step.status {
            StepStatus::Failed => step.error.clone(),
            _ => step.reason.clone(),
        };
        event.duration = step.duration();
        event
    }
}
