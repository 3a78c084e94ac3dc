//! The executor and the operations the API offers on top of it.
//!
//! [`Engine`] validates requests, talks to the [`Store`], starts one
//! [`runner::Runner`] task per active execution and routes cancel requests to
//! it. There is no lock around execution: the only shared map is the
//! registry of runners, touched briefly when one starts, stops or is asked to
//! cancel.

pub mod hub;
mod runner;
pub mod steps;
mod watch;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use chrono::Utc;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use crate::domain::Error;
use crate::domain::definition::{CommandPolicy, Graph, PipelineSpec};
use crate::domain::model::{Event, Execution, Pipeline, RunRequest, StepRun};
use crate::domain::status::{CancelMode, EventKind, ExecutionStatus, StepStatus};
use crate::storage::{ExecutionFilter, Store};
use hub::EventHub;
use runner::{Control, Runner};

pub use watch::WatchStream;

/// Settings of the executor.
#[derive(Debug, Clone)]
pub struct EngineConfig {
    /// Steps of one execution that may run at once, unless its pipeline says.
    pub max_parallel_steps: usize,
    /// Programs `command` steps may run.
    pub commands: CommandPolicy,
}

impl Default for EngineConfig {
    fn default() -> Self {
        Self {
            max_parallel_steps: 16,
            commands: CommandPolicy::default(),
        }
    }
}

/// State shared by the engine, its runners and its watchers.
pub(crate) struct Shared {
    store: Store,
    hub: Arc<EventHub>,
    config: EngineConfig,
    /// Control channels of the runners of active executions, by id.
    runners: Mutex<HashMap<String, mpsc::Sender<Control>>>,
    shutdown: CancellationToken,
    tasks: TaskTracker,
}

/// The service's domain operations. Cheap to clone.
#[derive(Clone)]
pub struct Engine {
    shared: Arc<Shared>,
}

impl Engine {
    pub fn new(store: Store, config: EngineConfig) -> Self {
        Self {
            shared: Arc::new(Shared {
                store,
                hub: Arc::new(EventHub::default()),
                config,
                runners: Mutex::new(HashMap::new()),
                shutdown: CancellationToken::new(),
                tasks: TaskTracker::new(),
            }),
        }
    }

    /// Resumes every execution left unfinished by a previous run of the
    /// server. Returns how many.
    pub async fn recover(&self) -> Result<usize, Error> {
        let ids = self.shared.store.active_execution_ids().await?;
        for id in &ids {
            let exec = self.shared.store.get_execution(id).await?;
            self.register_and_spawn(exec)?;
        }
        Ok(ids.len())
    }

    /// Stops runners and watchers and waits for the runners to settle.
    /// Attempts still running are stopped and run again at the next start.
    pub async fn shutdown(&self) {
        self.shared.shutdown.cancel();
        self.shared.tasks.close();
        self.shared.tasks.wait().await;
    }

    /// A token cancelled when the engine shuts down.
    pub fn shutdown_token(&self) -> CancellationToken {
        self.shared.shutdown.clone()
    }

    // ----- pipelines -----

    pub async fn create_pipeline(&self, spec: PipelineSpec) -> Result<Pipeline, Error> {
        spec.validate(&self.shared.config.commands)?;
        Ok(self.shared.store.create_pipeline(&spec).await?)
    }

    pub async fn update_pipeline(&self, spec: PipelineSpec) -> Result<Pipeline, Error> {
        spec.validate(&self.shared.config.commands)?;
        Ok(self.shared.store.update_pipeline(&spec).await?)
    }

    pub async fn get_pipeline(&self, name: &str, version: Option<i64>) -> Result<Pipeline, Error> {
        Ok(self.shared.store.get_pipeline(name, version).await?)
    }

    pub async fn list_pipelines(
        &self,
        after_name: Option<&str>,
        limit: u64,
    ) -> Result<Vec<Pipeline>, Error> {
        Ok(self.shared.store.list_pipelines(after_name, limit).await?)
    }

    pub async fn delete_pipeline(&self, name: &str) -> Result<(), Error> {
        Ok(self.shared.store.delete_pipeline(name).await?)
    }

    // ----- executions -----

    /// Stores a new pending execution of the pipeline's latest version and
    /// starts its runner.
    pub async fn run_pipeline(&self, request: RunRequest) -> Result<Execution, Error> {
        if self.shared.shutdown.is_cancelled() {
            return Err(Error::ShuttingDown);
        }
        let pipeline = self
            .shared
            .store
            .get_pipeline(&request.pipeline_name, None)
            .await?;
        let exec = Execution {
            id: uuid::Uuid::now_v7().to_string(),
            pipeline_name: pipeline.spec.name.clone(),
            pipeline_version: pipeline.version,
            steps: pipeline
                .spec
                .steps
                .iter()
                .map(|s| StepRun::new(s.name.clone()))
                .collect(),
            definition: pipeline.spec,
            status: ExecutionStatus::Pending,
            trigger: request.trigger,
            correlation_id: request.correlation_id,
            labels: request.labels,
            execution_data: request.input.clone(),
            input: request.input,
            error_message: String::new(),
            created_at: Utc::now(),
            started_at: None,
            finished_at: None,
            last_sequence: 0,
        };
        self.shared.store.insert_execution(&exec).await?;
        self.register_and_spawn(exec.clone())?;
        Ok(exec)
    }

    pub async fn get_execution(&self, id: &str) -> Result<Execution, Error> {
        Ok(self.shared.store.get_execution(id).await?)
    }

    pub async fn list_executions(&self, filter: &ExecutionFilter) -> Result<Vec<Execution>, Error> {
        Ok(self.shared.store.list_executions(filter).await?)
    }

    /// Asks the execution's runner to cancel it.
    pub async fn cancel_execution(&self, id: &str, mode: CancelMode) -> Result<Execution, Error> {
        let runner = self
            .shared
            .runners
            .lock()
            .expect("runners lock")
            .get(id)
            .cloned();
        if let Some(runner) = runner {
            let (reply, answer) = oneshot::channel();
            if runner.send(Control::Cancel { mode, reply }).await.is_ok()
                && let Ok(result) = answer.await
            {
                return result;
            }
        }
        // No runner: the execution has finished (or the server is stopping).
        let exec = self.shared.store.get_execution(id).await?;
        let target = match mode {
            CancelMode::Graceful => ExecutionStatus::Stopping,
            CancelMode::Terminate => ExecutionStatus::Terminating,
        };
        exec.status.check(target, "cancel")?;
        Err(Error::ShuttingDown)
    }

    /// Puts a failed or cancelled execution back to running: failed, skipped
    /// and cancelled steps (and, with `from_step`, that step and everything
    /// downstream of it) become pending again; succeeded steps keep their
    /// outputs and do not run again.
    pub async fn retry_execution(
        &self,
        id: &str,
        from_step: Option<&str>,
    ) -> Result<Execution, Error> {
        if self.shared.shutdown.is_cancelled() {
            return Err(Error::ShuttingDown);
        }
        let mut exec = self.shared.store.get_execution(id).await?;
        let graph = Graph::new(&exec.definition);
        let mut reset: Vec<bool> = exec
            .steps
            .iter()
            .map(|s| {
                matches!(
                    s.status,
                    StepStatus::Failed | StepStatus::Skipped | StepStatus::Cancelled
                )
            })
            .collect();
        if let Some(name) = from_step {
            let index = exec
                .steps
                .iter()
                .position(|s| s.name == name)
                .ok_or_else(|| {
                    Error::invalid(
                        "from_step",
                        format!("execution {id} has no step named '{name}'"),
                    )
                })?;
            for i in graph.downstream(index) {
                reset[i] = true;
            }
        }
        let previous = exec.status;
        previous.check(ExecutionStatus::Running, "retry")?;
        let changed: Vec<usize> = (0..reset.len()).filter(|&i| reset[i]).collect();
        for &i in &changed {
            exec.steps[i].reset();
        }
        exec.set_status(ExecutionStatus::Running);
        exec.finished_at = None;
        exec.error_message.clear();
        exec.recompute_data(&graph);
        exec.last_sequence += 1;
        let event = Event {
            execution_id: exec.id.clone(),
            sequence: exec.last_sequence,
            kind: EventKind::ExecutionRetried,
            time: Utc::now(),
            execution_status: exec.status,
            step_name: from_step.map(str::to_string),
            attempt: 0,
            output: None,
            message: format!(
                "re-running {}",
                changed
                    .iter()
                    .map(|&i| exec.steps[i].name.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
            duration: None,
            progress: exec.progress(),
            execution_data: None,
        };
        let store = self.shared.store.clone();
        let hub = Arc::clone(&self.shared.hub);
        let snapshot = exec.clone();
        // Registering first makes concurrent retries of one execution race on
        // the registry; the conditional write settles races across servers.
        let control = self.register(&exec.id)?;
        let events = [event];
        match store
            .save(&snapshot, &changed, &events, Some(previous))
            .await
        {
            Ok(()) => {
                hub.publish(&events);
                self.spawn(exec, control);
                Ok(snapshot)
            }
            Err(error) => {
                self.shared.runners.lock().expect("runners lock").remove(id);
                Err(error.into())
            }
        }
    }

    /// Streams the execution's events after `after_sequence`: stored ones,
    /// then live ones, ending after the terminal event.
    pub async fn watch(&self, id: &str, after_sequence: i64) -> Result<WatchStream, Error> {
        watch::watch(Arc::clone(&self.shared), id, after_sequence).await
    }

    /// Number of executions with live watchers.
    pub fn watched_executions(&self) -> usize {
        self.shared.hub.watched_executions()
    }

    /// Claims the runner slot of an execution; fails if it has a runner.
    fn register(&self, id: &str) -> Result<mpsc::Receiver<Control>, Error> {
        let mut runners = self.shared.runners.lock().expect("runners lock");
        if runners.contains_key(id) {
            return Err(Error::FailedPrecondition(format!(
                "execution {id} is active; only failed or cancelled executions can be retried"
            )));
        }
        let (sender, control) = mpsc::channel(16);
        runners.insert(id.to_string(), sender);
        Ok(control)
    }

    fn register_and_spawn(&self, exec: Execution) -> Result<(), Error> {
        let control = self.register(&exec.id)?;
        self.spawn(exec, control);
        Ok(())
    }

    fn spawn(&self, exec: Execution, control: mpsc::Receiver<Control>) {
        let span = tracing::info_span!("execution", id = %exec.id, pipeline = %exec.pipeline_name);
        let runner = Runner::new(Arc::clone(&self.shared), exec, control);
        self.shared.tasks.spawn(runner.run().instrument(span));
    }
}
