//! The executor and the operations the API offers on top of it.
//!
//! [`Engine`] validates requests, talks to the [`Store`], starts one
//! [`runner::Runner`] task per active execution and routes control requests
//! (cancel, pause, resume) to it. There is no lock around execution: the
//! only shared maps are the registry of runners, touched briefly when one
//! starts, stops or is sent a request, and the set of pipelines with queued
//! executions.

pub mod egress;
pub mod hub;
pub mod processes;
mod runner;
pub mod secrets;
pub mod steps;
mod watch;

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use crate::domain::Error;
use crate::domain::definition::{CommandPolicy, Graph, PipelineSpec};
use crate::domain::model::{self, Event, Execution, Pipeline, RunRequest, StepRun};
use crate::domain::status::{CancelMode, EventKind, ExecutionStatus, StepStatus};
use crate::storage::{Admission, ExecutionFilter, Store, StoreError};
use hub::EventHub;
use processes::ProcessRegistry;
use runner::{Action, Control, Inbox, Runner};

pub use watch::{AllEventsFilter, WatchItem, WatchStream};

/// Settings of the executor.
#[derive(Debug, Clone)]
pub struct EngineConfig {
    /// Steps of one execution that may run at once, unless its pipeline says.
    pub max_parallel_steps: usize,
    /// Programs `command` steps may run.
    pub commands: CommandPolicy,
    /// Where running command process groups are recorded (see
    /// [`processes`]); `None` records nothing.
    pub process_dir: Option<PathBuf>,
    /// How long a watch stream may stay silent before a heartbeat is sent.
    pub heartbeat_interval: Duration,
    /// Where `http` and `grpc` steps may connect.
    pub egress: egress::EgressPolicy,
    /// Where `${secrets.NAME}` values come from.
    pub secrets: secrets::SecretStore,
}

impl Default for EngineConfig {
    fn default() -> Self {
        Self {
            max_parallel_steps: 16,
            commands: CommandPolicy::default(),
            process_dir: None,
            heartbeat_interval: Duration::from_secs(15),
            egress: egress::EgressPolicy::default(),
            secrets: secrets::SecretStore::default(),
        }
    }
}

/// State shared by the engine, its runners and its watchers.
pub(crate) struct Shared {
    store: Store,
    hub: Arc<EventHub>,
    config: EngineConfig,
    /// The runners of active executions, by id.
    runners: Mutex<HashMap<String, RunnerHandle>>,
    /// Pipelines that have (had) queued executions: when one of their
    /// executions finishes, queued ones are promoted. Entries are never
    /// removed, so that no race can strand a queued execution.
    queued_pipelines: Mutex<HashSet<String>>,
    processes: Option<ProcessRegistry>,
    shutdown: CancellationToken,
    tasks: TaskTracker,
}

/// How the engine reaches one runner.
struct RunnerHandle {
    control: mpsc::Sender<Control>,
    /// Cancelled to make the runner stop at once without recording anything
    /// more (its lease is gone); a child of the shutdown token.
    stop: CancellationToken,
}

/// The service's domain operations. Cheap to clone.
#[derive(Clone)]
pub struct Engine {
    shared: Arc<Shared>,
}

impl Engine {
    pub fn new(store: Store, config: EngineConfig) -> std::io::Result<Self> {
        let processes = match &config.process_dir {
            Some(dir) => Some(ProcessRegistry::open(dir)?),
            None => None,
        };
        Ok(Self {
            shared: Arc::new(Shared {
                store,
                hub: Arc::new(EventHub::default()),
                config,
                runners: Mutex::new(HashMap::new()),
                queued_pipelines: Mutex::new(HashSet::new()),
                processes,
                shutdown: CancellationToken::new(),
                tasks: TaskTracker::new(),
            }),
        })
    }

    /// Resumes every execution left unfinished by a previous run of the
    /// server, after killing the command processes that run left behind.
    /// Returns how many executions it resumed or kept queued.
    ///
    /// "Unfinished" means active and held by no live replica: this server's
    /// own executions from before a restart, and those whose lease ran out.
    /// Afterwards a background task keeps renewing this server's leases and
    /// takes over executions whose replica stopped renewing them, and
    /// another ends the watch streams when the engine shuts down.
    pub async fn recover(&self) -> Result<usize, Error> {
        if let Some(processes) = &self.shared.processes {
            processes.kill_leftovers();
        }
        // This replica has no runner yet: its old leases (all of them, on
        // SQLite, where it is the only server) are free to claim now.
        let shared_store = self.shared.store.is_shared();
        self.shared.store.release_leases(!shared_store).await?;
        let resumed = self.shared.take_over().await?;
        self.shared.promote_all_queued().await?;
        // Watchers of one execution learn of the shutdown from their closed
        // hub channel.
        let shared = Arc::clone(&self.shared);
        self.shared.tasks.spawn(async move {
            shared.shutdown.cancelled().await;
            shared.hub.close();
        });
        let shared = Arc::clone(&self.shared);
        self.shared
            .tasks
            .spawn(async move { shared.keep_leases().await });
        if let Some(listener) = self.shared.store.listen_for_events().await? {
            let shared = Arc::clone(&self.shared);
            self.shared
                .tasks
                .spawn(async move { shared.relay_events(listener).await });
        }
        Ok(resumed)
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

    /// Stores a new execution of the pipeline's latest version and starts
    /// it, or queues it at the pipeline's concurrency cap. A known request
    /// id returns the execution the first request created.
    pub async fn run_pipeline(&self, request: RunRequest) -> Result<Execution, Error> {
        if self.shared.shutdown.is_cancelled() {
            return Err(Error::ShuttingDown);
        }
        let shared = Arc::clone(&self.shared);
        // Detached, so that a caller who goes away (a deadline, a reset)
        // cannot leave a stored execution without its runner.
        detached(async move { shared.run_pipeline(request).await }).await
    }

    pub async fn get_execution(&self, id: &str) -> Result<Execution, Error> {
        Ok(self.shared.store.get_execution(id).await?)
    }

    pub async fn list_executions(&self, filter: &ExecutionFilter) -> Result<Vec<Execution>, Error> {
        Ok(self.shared.store.list_executions(filter).await?)
    }

    /// Asks the execution's runner to cancel it; a queued execution is
    /// cancelled at once.
    pub async fn cancel_execution(&self, id: &str, mode: CancelMode) -> Result<Execution, Error> {
        let shared = Arc::clone(&self.shared);
        let id = id.to_string();
        // Detached: cancelling a queued execution commits, then publishes.
        detached(async move { shared.cancel_execution(&id, mode).await }).await
    }

    /// Stops new steps of a running execution from starting.
    pub async fn pause_execution(&self, id: &str) -> Result<Execution, Error> {
        self.shared.control(id, Action::Pause).await
    }

    /// Lets a paused execution start steps again.
    pub async fn resume_execution(&self, id: &str) -> Result<Execution, Error> {
        self.shared.control(id, Action::Resume).await
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
        let shared = Arc::clone(&self.shared);
        let (id, from_step) = (id.to_string(), from_step.map(str::to_string));
        // Detached for the same reason as `run_pipeline`.
        detached(async move { shared.retry_execution(&id, from_step.as_deref()).await }).await
    }

    /// Streams the execution's events after `after_sequence`: stored ones,
    /// then live ones, ending after the terminal event.
    pub async fn watch(&self, id: &str, after_sequence: i64) -> Result<WatchStream, Error> {
        watch::watch(Arc::clone(&self.shared), id, after_sequence).await
    }

    /// Streams live events of every execution that pass `filter`.
    pub fn watch_all(&self, filter: AllEventsFilter) -> WatchStream {
        watch::watch_all(Arc::clone(&self.shared), filter)
    }

    /// The store this engine runs on.
    pub fn store(&self) -> &Store {
        &self.shared.store
    }

    /// This server's metrics.
    pub fn metrics(&self) -> &Arc<crate::telemetry::metrics::Metrics> {
        self.shared.store.metrics()
    }

    /// Number of executions with live watchers.
    pub fn watched_executions(&self) -> usize {
        self.shared.hub.watched_executions()
    }
}

/// How long a replica waits for another one to carry out a forwarded
/// cancel, pause or resume.
const FORWARD_PATIENCE: Duration = Duration::from_secs(10);
/// Executions claimed per query when taking over.
const CLAIM_BATCH: u64 = 100;

/// Runs `work` as its own task and waits for it: dropping the caller does
/// not stop the work half-way.
async fn detached<T: Send + 'static>(
    work: impl Future<Output = Result<T, Error>> + Send + 'static,
) -> Result<T, Error> {
    // In the caller's span, so that its log lines carry the request id.
    tokio::spawn(work.in_current_span())
        .await
        .unwrap_or_else(|e| Err(Error::Internal(format!("request task failed: {e}"))))
}

impl Shared {
    async fn run_pipeline(self: &Arc<Self>, request: RunRequest) -> Result<Execution, Error> {
        let pipeline = self
            .store
            .get_pipeline(&request.pipeline_name, None)
            .await?;
        let request_fingerprint = request.fingerprint();
        let mut exec = Execution {
            // The id and creation time are assigned at admission.
            id: String::new(),
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
            created_at: model::now(),
            started_at: None,
            finished_at: None,
            last_sequence: 0,
            request_id: request.request_id,
            request_fingerprint,
            deadline: None,
        };
        let cap = exec.definition.concurrency.clone();
        if cap.as_ref().is_some_and(|c| c.max_active > 0) {
            // Before the execution may be queued, so that an execution
            // finishing meanwhile knows to promote it.
            self.note_queued(&exec.pipeline_name);
        }
        match self.store.admit_execution(&mut exec, cap.as_ref()).await? {
            Admission::Existing(existing) => {
                tracing::info!(execution_id = %existing.id, status = %existing.status, "request id matches an existing execution");
                Ok(*existing)
            }
            Admission::Created { to_cancel } => {
                tracing::info!(execution_id = %exec.id, pipeline = %exec.pipeline_name, status = %exec.status, "execution admitted");
                if exec.status == ExecutionStatus::Queued {
                    let events = self.store.events_after(&exec.id, 0, 1).await?;
                    self.hub.publish(&events);
                } else {
                    self.register_and_spawn(exec.clone())?;
                }
                for id in to_cancel {
                    // In the background: an eviction forwarded to another
                    // replica may take a while.
                    let shared = Arc::clone(self);
                    self.tasks.spawn(async move {
                        if let Err(error) = shared.cancel_execution(&id, CancelMode::Terminate).await {
                            tracing::info!(execution_id = %id, %error, "could not evict an execution for a newer one");
                        }
                    });
                }
                if exec.status == ExecutionStatus::Queued {
                    // A slot may have freed before the execution was stored.
                    self.promote(&exec.pipeline_name).await?;
                }
                Ok(exec)
            }
        }
    }

    async fn cancel_execution(&self, id: &str, mode: CancelMode) -> Result<Execution, Error> {
        match self.control(id, Action::Cancel(mode)).await {
            Err(Error::FailedPrecondition(message)) => {
                let exec = self.store.get_execution(id).await?;
                if exec.status == ExecutionStatus::Queued {
                    self.cancel_queued(exec).await
                } else {
                    Err(Error::FailedPrecondition(message))
                }
            }
            other => other,
        }
    }

    /// Cancels an execution that never started.
    async fn cancel_queued(&self, mut exec: Execution) -> Result<Execution, Error> {
        let now = model::now();
        // A retried execution waits in the queue with its succeeded steps:
        // only the steps still to run are cancelled.
        let changed: Vec<usize> = (0..exec.steps.len())
            .filter(|&i| !exec.steps[i].status.is_final())
            .collect();
        for &i in &changed {
            let step = &mut exec.steps[i];
            step.set_status(StepStatus::Cancelled);
            step.reason = "execution cancelled".to_string();
            step.finished_at = Some(now);
            step.next_attempt_at = None;
        }
        exec.set_status(ExecutionStatus::Cancelled);
        exec.finished_at = Some(now);
        exec.error_message = "cancelled by request while queued".to_string();
        let mut events = Vec::new();
        for &i in &changed {
            exec.last_sequence += 1;
            let mut event = Event::new(&exec, exec.last_sequence, EventKind::StepCancelled);
            event.step_name = Some(exec.steps[i].name.clone());
            event.message = exec.steps[i].reason.clone();
            events.push(event);
        }
        exec.last_sequence += 1;
        let mut event = Event::new(&exec, exec.last_sequence, EventKind::ExecutionCancelled);
        event.message = exec.error_message.clone();
        event.execution_data = Some(exec.execution_data.clone());
        events.push(event);
        self.store
            .save(&exec, &changed, &events, Some(ExecutionStatus::Queued))
            .await?;
        self.store
            .metrics()
            .execution_finished(&exec.pipeline_name, exec.status.as_str());
        self.hub.publish(&events);
        Ok(exec)
    }

    /// Sends a request to the execution's runner and waits for the answer.
    /// A runner on another replica gets it through the database. Without a
    /// runner anywhere the execution is not active: FAILED_PRECONDITION
    /// (NOT_FOUND if it does not exist).
    async fn control(&self, id: &str, action: Action) -> Result<Execution, Error> {
        if let Some(result) = self.control_here(id, action).await {
            return result;
        }
        if self.shutdown.is_cancelled() {
            return Err(Error::ShuttingDown);
        }
        let exec = self.store.get_execution(id).await?;
        if self.store.is_shared() && exec.status.holds_slot() {
            return self.forward(exec, action).await;
        }
        action.plan(exec.status)?;
        Err(Error::FailedPrecondition(format!(
            "cannot {} an execution that is {} (it has no runner)",
            action.as_str(),
            exec.status
        )))
    }

    /// Asks this replica's runner of `id`, if it has one.
    async fn control_here(&self, id: &str, action: Action) -> Option<Result<Execution, Error>> {
        let runner = self
            .runners
            .lock()
            .expect("runners lock")
            .get(id)
            .map(|r| r.control.clone())?;
        let (reply, answer) = oneshot::channel();
        runner.send(Control { action, reply }).await.ok()?;
        answer.await.ok()
    }

    /// Leaves `action` for the replica that runs `exec` and waits until the
    /// execution's status shows it was carried out.
    async fn forward(&self, exec: Execution, action: Action) -> Result<Execution, Error> {
        // A pending execution's runner makes it running before it reads
        // any request.
        let status = match exec.status {
            ExecutionStatus::Pending => ExecutionStatus::Running,
            other => other,
        };
        let Some(target) = action.plan(status)? else {
            return Ok(exec);
        };
        if !self.store.request_action(&exec.id, action.as_str()).await? {
            // It finished meanwhile.
            let now = self.store.get_execution(&exec.id).await?;
            action.plan(now.status)?;
            return Ok(now);
        }
        // The owner's tick also carries requests out: wait at least that long.
        let patience = FORWARD_PATIENCE.max(self.store.lease() / 2);
        let deadline = tokio::time::Instant::now() + patience;
        let mut pause = Duration::from_millis(20);
        loop {
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(Duration::from_millis(250));
            let (status, _) = self.store.execution_head(&exec.id).await?;
            if status == target || status.is_terminal() {
                return Ok(self.store.get_execution(&exec.id).await?);
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(Error::Unavailable(format!(
                    "the replica running execution {} did not carry out the request in {}s; \
                     it stays asked and is carried out when the execution is taken over",
                    exec.id,
                    patience.as_secs()
                )));
            }
        }
    }

    /// Carries out the requests other replicas left for executions this
    /// replica runs (all of them, or those of `id`).
    async fn apply_requests(self: &Arc<Self>, id: Option<&str>) {
        let ids = match id {
            Some(id) if self.runners.lock().expect("runners lock").contains_key(id) => {
                vec![id.to_string()]
            }
            // Not run here (yet): the owner's tick takes it.
            Some(_) => return,
            None => self.runner_ids(),
        };
        let requests = match self.store.take_requests(&ids).await {
            Ok(requests) => requests,
            Err(error) => {
                tracing::warn!(%error, "reading forwarded requests failed");
                return;
            }
        };
        for (id, text) in requests {
            let Some(action) = Action::parse(&text) else {
                tracing::warn!(execution_id = %id, request = %text, "unknown forwarded request");
                continue;
            };
            // Each on its own, so that a runner slow to answer holds up
            // nothing else.
            let shared = Arc::clone(self);
            self.tasks.spawn(async move {
                match tokio::time::timeout(FORWARD_PATIENCE, shared.control_here(&id, action)).await {
                    Ok(Some(Ok(_))) => {
                        tracing::info!(execution_id = %id, request = %text, "carried out a forwarded request")
                    }
                    Ok(Some(Err(error))) => {
                        tracing::info!(execution_id = %id, request = %text, %error, "refused a forwarded request")
                    }
                    Ok(None) | Err(_) => {
                        tracing::warn!(execution_id = %id, request = %text, "a forwarded request found no runner answering here")
                    }
                }
            });
        }
    }

    async fn retry_execution(
        self: &Arc<Self>,
        id: &str,
        from_step: Option<&str>,
    ) -> Result<Execution, Error> {
        let mut exec = self.store.get_execution(id).await?;
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
        // A pipeline with a concurrency cap takes retried executions through
        // its queue, like new ones, so that a retry cannot exceed the cap.
        let capped = match self.store.get_pipeline(&exec.pipeline_name, None).await {
            Ok(latest) => latest.spec.concurrency.is_some_and(|c| c.max_active > 0),
            Err(StoreError::NotFound { .. }) => false,
            Err(error) => return Err(error.into()),
        };
        let changed: Vec<usize> = (0..reset.len()).filter(|&i| reset[i]).collect();
        for &i in &changed {
            let step = &mut exec.steps[i];
            step.reset();
            step.retry_base = step.attempt;
        }
        let now = model::now();
        exec.set_status(if capped {
            ExecutionStatus::Queued
        } else {
            ExecutionStatus::Running
        });
        exec.finished_at = None;
        exec.error_message.clear();
        exec.deadline = exec.definition.timeout.map(|t| now + t);
        exec.recompute_data(&graph);
        exec.last_sequence += 1;
        let mut event = Event::new(&exec, exec.last_sequence, EventKind::ExecutionRetried);
        event.step_name = from_step.map(str::to_string);
        event.message = format!(
            "re-running {}",
            changed
                .iter()
                .map(|&i| exec.steps[i].name.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        );
        let snapshot = exec.clone();
        let events = [event];
        if capped {
            // Its runner may still be finishing; it must be gone first.
            if self.runners.lock().expect("runners lock").contains_key(id) {
                return Err(Error::FailedPrecondition(format!(
                    "execution {id} is still finishing; try again"
                )));
            }
            self.note_queued(&exec.pipeline_name);
            self.store
                .save(&snapshot, &changed, &events, Some(previous))
                .await?;
            self.hub.publish(&events);
            self.promote(&exec.pipeline_name).await?;
            return Ok(snapshot);
        }
        // Registering first makes concurrent retries of one execution race on
        // the registry; the conditional write settles races across servers.
        let control = self.register(&exec.id)?;
        match self
            .store
            .save(&snapshot, &changed, &events, Some(previous))
            .await
        {
            Ok(()) => {
                self.hub.publish(&events);
                self.spawn(exec, control);
                Ok(snapshot)
            }
            Err(error) => {
                self.runners.lock().expect("runners lock").remove(id);
                Err(error.into())
            }
        }
    }

    /// Claims the executions no live replica holds, a batch at a time,
    /// and starts their runners. Returns how many it started.
    async fn take_over(self: &Arc<Self>) -> Result<usize, Error> {
        let mut started = 0;
        loop {
            let ids = self.store.claim_orphans(CLAIM_BATCH).await?;
            let full = ids.len() as u64 == CLAIM_BATCH;
            for id in ids {
                if self.runners.lock().expect("runners lock").contains_key(&id) {
                    // A runner of an earlier lease of ours: its state is
                    // stale. It stops; the claim lapses (only runners'
                    // leases are renewed) and a fresh runner takes over.
                    self.stop_runner(&id);
                    continue;
                }
                match self.store.get_execution(&id).await {
                    Ok(exec) if exec.status.holds_slot() => {
                        if self.register_and_spawn(exec).is_ok() {
                            tracing::info!(execution_id = %id, "resuming an execution no replica holds");
                            started += 1;
                        }
                    }
                    Ok(_) => {}
                    // Not started: its claim lapses and it is claimed again.
                    Err(error) => {
                        tracing::warn!(execution_id = %id, %error, "cannot resume an execution")
                    }
                }
            }
            if !full {
                return Ok(started);
            }
        }
    }

    /// Promotes the queued executions of every pipeline that has some.
    async fn promote_all_queued(self: &Arc<Self>) -> Result<(), Error> {
        for name in self.store.pipelines_with_queued().await? {
            self.note_queued(&name);
            self.promote(&name).await?;
        }
        Ok(())
    }

    /// Until shutdown, every third of a lease: renews this replica's leases,
    /// takes over executions whose lease ran out, and promotes queued
    /// executions (their pipeline's last execution may have ended on a
    /// replica that died).
    async fn keep_leases(self: Arc<Self>) {
        let period = self.store.lease() / 3;
        let renewer = Arc::clone(&self);
        self.tasks
            .spawn(async move { renewer.renew_leases(period).await });
        loop {
            tokio::select! {
                _ = tokio::time::sleep(period) => {}
                _ = self.shutdown.cancelled() => return,
            }
            if let Err(error) = self.take_over().await {
                tracing::warn!(%error, "taking over executions failed");
            }
            if self.store.is_shared() {
                self.apply_requests(None).await;
            }
            if let Err(error) = self.promote_all_queued().await {
                tracing::warn!(%error, "starting queued executions failed");
            }
        }
    }

    /// Until shutdown, every `period`: renews the leases of the executions
    /// this replica runs, and stops the runners whose lease is gone (another
    /// replica took them over while this one could not renew). Its own task,
    /// so that nothing else can hold renewal up.
    async fn renew_leases(self: Arc<Self>, period: Duration) {
        loop {
            tokio::select! {
                _ = tokio::time::sleep(period) => {}
                _ = self.shutdown.cancelled() => return,
            }
            let ids = self.runner_ids();
            match self.store.renew_leases(&ids).await {
                Ok(held) => {
                    let held: HashSet<&String> = held.iter().collect();
                    for id in ids.iter().filter(|id| !held.contains(id)) {
                        // A runner that finished meanwhile is gone already.
                        self.stop_runner(id);
                    }
                }
                Err(error) => tracing::warn!(%error, "renewing execution leases failed"),
            }
        }
    }

    /// Until shutdown, hands the events other replicas commit to the
    /// watchers here (PostgreSQL `LISTEN`; the events are read from the
    /// table). After a lost connection the listener reconnects; watchers
    /// re-read the table at each heartbeat, so nothing is lost meanwhile.
    async fn relay_events(self: Arc<Self>, mut listener: sea_orm::sqlx::postgres::PgListener) {
        loop {
            let received = tokio::select! {
                received = listener.try_recv() => received,
                _ = self.shutdown.cancelled() => return,
            };
            match received {
                // The connection was lost (it reconnects at the next call):
                // whatever was announced meanwhile is gone.
                Ok(None) => {
                    tracing::warn!(
                        "lost the connection that listens for other replicas' events; reconnecting"
                    );
                    self.hub.report_missed();
                }
                Ok(Some(notification))
                    if notification.channel() == crate::storage::REQUESTS_CHANNEL =>
                {
                    self.apply_requests(Some(notification.payload())).await;
                }
                Ok(Some(notification)) => self.relay(notification.payload()).await,
                Err(error) => {
                    tracing::warn!(%error, "listening for other replicas' events failed; retrying");
                    tokio::select! {
                        _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                        _ = self.shutdown.cancelled() => return,
                    }
                }
            }
        }
    }

    /// Publishes here the events another replica announced (`replica id
    /// first last`), if anyone here watches them.
    async fn relay(&self, announcement: &str) {
        let mut parts = announcement.split(' ');
        let (Some(replica), Some(id), Some(first), Some(last)) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return;
        };
        let (Ok(first), Ok(last)) = (first.parse::<i64>(), last.parse::<i64>()) else {
            return;
        };
        if replica == self.store.replica() || last < first || !self.hub.is_watched(id) {
            return;
        }
        match self
            .store
            .events_after(id, first - 1, (last - first + 1) as u64)
            .await
        {
            Ok(events) => self.hub.publish(&events),
            Err(error) => {
                tracing::warn!(execution_id = %id, %error, "reading another replica's events failed")
            }
        }
    }

    fn note_queued(&self, pipeline: &str) {
        self.queued_pipelines
            .lock()
            .expect("queued lock")
            .insert(pipeline.to_string());
    }

    /// Called by a runner whose execution reached a terminal status: starts
    /// queued executions of its pipeline if there are any.
    fn execution_finished(self: &Arc<Self>, pipeline: &str, capped: bool) {
        // With several replicas, the queued execution may have been noted
        // by another one.
        let waiting = (capped && self.store.is_shared())
            || self
                .queued_pipelines
                .lock()
                .expect("queued lock")
                .contains(pipeline);
        if waiting && !self.shutdown.is_cancelled() {
            let shared = Arc::clone(self);
            let pipeline = pipeline.to_string();
            self.tasks.spawn(async move {
                if let Err(error) = shared.promote(&pipeline).await {
                    tracing::warn!(%pipeline, %error, "cannot start queued executions");
                }
            });
        }
    }

    /// Starts the pipeline's queued executions that fit under its cap.
    async fn promote(self: &Arc<Self>, pipeline: &str) -> Result<(), Error> {
        let cap = match self.store.get_pipeline(pipeline, None).await {
            Ok(latest) => latest.spec.concurrency,
            Err(StoreError::NotFound { .. }) => None,
            Err(error) => return Err(error.into()),
        };
        for exec in self.store.promote_queued(pipeline, cap.as_ref()).await? {
            let id = exec.id.clone();
            if let Err(error) = self.register_and_spawn(exec) {
                // Its previous runner is still finishing; that runner's end
                // promotes again.
                tracing::warn!(execution_id = %id, %error, "cannot start a promoted execution yet");
            }
        }
        Ok(())
    }

    /// Claims the runner slot of an execution; fails if it has a runner.
    fn register(&self, id: &str) -> Result<Inbox, Error> {
        let mut runners = self.runners.lock().expect("runners lock");
        if runners.contains_key(id) {
            return Err(Error::FailedPrecondition(format!(
                "execution {id} is active; only failed or cancelled executions can be retried"
            )));
        }
        let (sender, control) = mpsc::channel(16);
        let stop = self.shutdown.child_token();
        runners.insert(
            id.to_string(),
            RunnerHandle {
                control: sender,
                stop: stop.clone(),
            },
        );
        Ok(Inbox { control, stop })
    }

    /// Ids of the executions this replica has runners for.
    fn runner_ids(&self) -> Vec<String> {
        self.runners
            .lock()
            .expect("runners lock")
            .keys()
            .cloned()
            .collect()
    }

    /// Makes the runner of `id`, if any, stop at once: its lease is gone.
    fn stop_runner(&self, id: &str) {
        if let Some(runner) = self.runners.lock().expect("runners lock").get(id) {
            tracing::warn!(execution_id = %id, "stopping a runner whose lease is gone");
            runner.stop.cancel();
        }
    }

    fn register_and_spawn(self: &Arc<Self>, exec: Execution) -> Result<(), Error> {
        let control = self.register(&exec.id)?;
        self.spawn(exec, control);
        Ok(())
    }

    fn spawn(self: &Arc<Self>, exec: Execution, inbox: Inbox) {
        // Its own root, not part of the call that started it: the runner
        // outlives the call (and recovered executions have none).
        let span = tracing::info_span!(parent: None, "execution", execution_id = %exec.id, pipeline = %exec.pipeline_name);
        span.follows_from(tracing::Span::current());
        // In exported traces, though, a child of the call that started it.
        crate::telemetry::tracing::continue_current_trace(&span);
        let runner = Runner::new(Arc::clone(self), exec, inbox);
        self.tasks.spawn(runner.run().instrument(span));
    }
}
