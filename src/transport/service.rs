//! `pipeline.v1.PipelineService`: each handler validates its request, calls
//! the engine and converts the answer.

use std::pin::Pin;

use tokio_stream::{Stream, StreamExt};
use tonic::{Request, Response, Status};

use super::convert::{self, Violations};
use crate::domain::Error;
use crate::domain::access::{self, AuditEvent, AuditFilter, Caller};
use crate::domain::limits;
use crate::domain::model::RunRequest;
use crate::engine::{AllEventsFilter, Engine, WatchItem};
use crate::proto::v1 as pb;
use crate::proto::v1::pipeline_service_server::PipelineService;
use crate::storage::ExecutionFilter;
use crate::storage::audit::AuditLog;

const MAX_PAGE_SIZE: i32 = 1000;
const MAX_CORRELATION_ID_LEN: usize = 256;
const MAX_REQUEST_ID_LEN: usize = 256;
const MAX_LABELS: usize = 64;
const MAX_LABEL_LEN: usize = 256;

/// The gRPC face of the [`Engine`].
pub struct PipelineApi {
    engine: Engine,
    audit: AuditLog,
}

impl PipelineApi {
    /// Mutating calls are recorded in `audit`.
    pub fn new(engine: Engine, audit: AuditLog) -> Self {
        Self { engine, audit }
    }

    /// Starts the audit record of a mutating call about `target`.
    fn audited<T>(
        &self,
        request: &Request<T>,
        method: &'static str,
        target: String,
    ) -> Result<Audited, Status> {
        debug_assert!(access::is_mutating(method));
        Ok(Audited {
            audit: self.audit.clone(),
            caller: caller(request)?,
            method,
            target: access::clip(target),
            request_id: request
                .metadata()
                .get(super::request_context::REQUEST_ID)
                .and_then(|id| id.to_str().ok())
                .unwrap_or_default()
                .to_string(),
            recorded: false,
        })
    }
}

/// The caller the auth layer found; a call without one (the layer not in
/// place) is refused rather than served as nobody.
fn caller<T>(request: &Request<T>) -> Result<Caller, Status> {
    request
        .extensions()
        .get::<Caller>()
        .cloned()
        .ok_or_else(|| Status::unauthenticated("the caller is unknown"))
}

/// A mutating call on its way to the audit trail. A call dropped before it
/// is answered (the caller went away, its deadline passed) is recorded as
/// CANCELLED, since its work may have been done all the same.
struct Audited {
    audit: AuditLog,
    caller: Caller,
    method: &'static str,
    target: String,
    request_id: String,
    recorded: bool,
}

impl Audited {
    /// Records how the call ended and hands its answer on; `note` tells
    /// what a successful call made (a new execution's id).
    fn finish<R>(
        mut self,
        result: Result<Response<R>, Status>,
        note: impl FnOnce(&R) -> String,
    ) -> Result<Response<R>, Status> {
        let (code, message) = match &result {
            Ok(response) => (tonic::Code::Ok, note(response.get_ref())),
            Err(status) => (status.code(), status.message().to_string()),
        };
        self.record(code, message);
        result
    }

    fn record(&mut self, code: tonic::Code, message: String) {
        self.recorded = true;
        self.audit.record(AuditEvent {
            id: uuid::Uuid::now_v7().to_string(),
            time: crate::domain::model::now(),
            caller: self.caller.name.clone(),
            role: self.caller.role,
            method: self.method.to_string(),
            target: std::mem::take(&mut self.target),
            request_id: std::mem::take(&mut self.request_id),
            code: super::status::code_name(code).to_string(),
            message,
        });
    }
}

impl Drop for Audited {
    fn drop(&mut self) {
        if !self.recorded {
            self.record(
                tonic::Code::Cancelled,
                "the call ended (its caller went away or its deadline passed) before it was \
                 answered; its work may have been done"
                    .to_string(),
            );
        }
    }
}

fn required(value: &str, field: &str) -> Result<(), Error> {
    if value.is_empty() {
        Err(Error::invalid(field, "is required"))
    } else {
        Ok(())
    }
}

fn execution_id(value: &str) -> Result<&str, Error> {
    required(value, "execution_id")?;
    uuid::Uuid::parse_str(value).map(|_| value).map_err(|_| {
        let shown = crate::domain::error::preview(value);
        Error::invalid("execution_id", format!("'{shown}' is not an execution id"))
    })
}

fn page_size(value: i32, default: i32) -> Result<u64, Error> {
    match value {
        0 => Ok(default as u64),
        1..=MAX_PAGE_SIZE => Ok(value as u64),
        _ => Err(Error::invalid(
            "page_size",
            format!("must be between 0 and {MAX_PAGE_SIZE}"),
        )),
    }
}

type WatchStream = Pin<Box<dyn Stream<Item = Result<pb::WatchExecutionResponse, Status>> + Send>>;
type WatchAllStream =
    Pin<Box<dyn Stream<Item = Result<pb::WatchExecutionsResponse, Status>> + Send>>;

/// An event or a heartbeat, as the two fields every watch response has.
fn watch_fields(item: WatchItem) -> (Option<pb::ExecutionEvent>, Option<pb::Heartbeat>) {
    match item {
        WatchItem::Event(event) => (Some(convert::event_to_proto(&event)), None),
        WatchItem::Heartbeat(time) => (
            None,
            Some(pb::Heartbeat {
                time: Some(convert::timestamp(time)),
            }),
        ),
    }
}

fn check_labels(labels: &std::collections::HashMap<String, String>, v: &mut Violations) {
    if labels.len() > MAX_LABELS {
        v.add("labels", format!("at most {MAX_LABELS} labels"));
    }
    for (key, value) in labels {
        if key.contains('\0') || value.contains('\0') {
            v.add(format!("labels[{key}]"), "must not hold NUL characters");
        } else if key.is_empty() {
            v.add("labels", "label keys must not be empty");
        } else if key.len() > MAX_LABEL_LEN || value.len() > MAX_LABEL_LEN {
            v.add(
                format!("labels[{key}]"),
                format!("keys and values must be at most {MAX_LABEL_LEN} bytes"),
            );
        }
    }
}

#[tonic::async_trait]
impl PipelineService for PipelineApi {
    async fn create_pipeline(
        &self,
        request: Request<pb::CreatePipelineRequest>,
    ) -> Result<Response<pb::CreatePipelineResponse>, Status> {
        let target = request.get_ref().pipeline.as_ref().map(|p| p.name.clone());
        let audited = self.audited(&request, "CreatePipeline", target.unwrap_or_default())?;
        let result: Result<_, Status> = async {
            let spec = convert::spec_from_proto(request.into_inner().pipeline, "pipeline")?;
            access::check_definition(&spec, &audited.caller)?;
            let pipeline = self
                .engine
                .create_pipeline(spec)
                .await
                .map_err(|e| convert::prefix_paths(e, "pipeline"))?;
            Ok(Response::new(pb::CreatePipelineResponse {
                pipeline: Some(convert::pipeline_to_proto(&pipeline)),
            }))
        }
        .await;
        audited.finish(result, |_| String::new())
    }

    async fn get_pipeline(
        &self,
        request: Request<pb::GetPipelineRequest>,
    ) -> Result<Response<pb::GetPipelineResponse>, Status> {
        let request = request.into_inner();
        convert::pipeline_name(&request.name, "name")?;
        let version = match request.version {
            0 => None,
            v if v > 0 => Some(v),
            _ => return Err(Error::invalid("version", "must not be negative").into()),
        };
        let pipeline = self.engine.get_pipeline(&request.name, version).await?;
        Ok(Response::new(pb::GetPipelineResponse {
            pipeline: Some(convert::pipeline_to_proto(&pipeline)),
        }))
    }

    async fn list_pipelines(
        &self,
        request: Request<pb::ListPipelinesRequest>,
    ) -> Result<Response<pb::ListPipelinesResponse>, Status> {
        let request = request.into_inner();
        let limit = page_size(request.page_size, 100)?;
        if !request.page_token.is_empty()
            && convert::pipeline_name(&request.page_token, "page_token").is_err()
        {
            return Err(Error::invalid("page_token", "is not a token this server returned").into());
        }
        let after = (!request.page_token.is_empty()).then_some(request.page_token.as_str());
        let mut pipelines = self.engine.list_pipelines(after, limit + 1).await?;
        let next_page_token = if pipelines.len() as u64 > limit {
            pipelines.truncate(limit as usize);
            pipelines
                .last()
                .map(|p| p.spec.name.clone())
                .unwrap_or_default()
        } else {
            String::new()
        };
        Ok(Response::new(pb::ListPipelinesResponse {
            pipelines: pipelines.iter().map(convert::pipeline_to_proto).collect(),
            next_page_token,
        }))
    }

    async fn update_pipeline(
        &self,
        request: Request<pb::UpdatePipelineRequest>,
    ) -> Result<Response<pb::UpdatePipelineResponse>, Status> {
        let target = request.get_ref().pipeline.as_ref().map(|p| p.name.clone());
        let audited = self.audited(&request, "UpdatePipeline", target.unwrap_or_default())?;
        let result: Result<_, Status> = async {
            let spec = convert::spec_from_proto(request.into_inner().pipeline, "pipeline")?;
            access::check_definition(&spec, &audited.caller)?;
            let pipeline = self
                .engine
                .update_pipeline(spec)
                .await
                .map_err(|e| convert::prefix_paths(e, "pipeline"))?;
            Ok(Response::new(pb::UpdatePipelineResponse {
                pipeline: Some(convert::pipeline_to_proto(&pipeline)),
            }))
        }
        .await;
        audited.finish(result, |_| String::new())
    }

    async fn delete_pipeline(
        &self,
        request: Request<pb::DeletePipelineRequest>,
    ) -> Result<Response<pb::DeletePipelineResponse>, Status> {
        let audited = self.audited(&request, "DeletePipeline", request.get_ref().name.clone())?;
        let result: Result<_, Status> = async {
            let request = request.into_inner();
            convert::pipeline_name(&request.name, "name")?;
            self.engine.delete_pipeline(&request.name).await?;
            Ok(Response::new(pb::DeletePipelineResponse {}))
        }
        .await;
        audited.finish(result, |_| String::new())
    }

    async fn run_pipeline(
        &self,
        request: Request<pb::RunPipelineRequest>,
    ) -> Result<Response<pb::RunPipelineResponse>, Status> {
        let audited = self.audited(
            &request,
            "RunPipeline",
            request.get_ref().pipeline_name.clone(),
        )?;
        let result: Result<_, Status> = async {
            let request = request.into_inner();
            let mut v = Violations::default();
            convert::check_pipeline_name("pipeline_name", &request.pipeline_name, true, &mut v);
            if request.correlation_id.len() > MAX_CORRELATION_ID_LEN {
                v.add(
                    "correlation_id",
                    format!("must be at most {MAX_CORRELATION_ID_LEN} bytes"),
                );
            }
            if request.request_id.len() > MAX_REQUEST_ID_LEN {
                v.add(
                    "request_id",
                    format!("must be at most {MAX_REQUEST_ID_LEN} bytes"),
                );
            }
            check_labels(&request.labels, &mut v);
            let input = convert::struct_to_json(request.input, "input", &mut v);
            if let Err(problem) = limits::check_object(&input, limits::MAX_INPUT_BYTES) {
                v.add("input", format!("the input {problem}"));
            } else if limits::contains_nul(&input) {
                v.add("input", "must not hold NUL characters");
            }
            for (field, text) in [
                ("correlation_id", &request.correlation_id),
                ("request_id", &request.request_id),
            ] {
                if text.contains('\0') {
                    v.add(field, "must not hold NUL characters");
                }
            }
            let trigger = convert::trigger_from_proto(request.trigger, &mut v);
            if limits::contains_nul(&trigger.data) {
                v.add("trigger.data", "must not hold NUL characters");
            }
            let run = v.into_result(RunRequest {
                pipeline_name: request.pipeline_name,
                input,
                trigger,
                correlation_id: request.correlation_id,
                labels: request.labels.into_iter().collect(),
                request_id: (!request.request_id.is_empty()).then_some(request.request_id),
            })?;
            let execution = self.engine.run_pipeline(run).await?;
            Ok(Response::new(pb::RunPipelineResponse {
                execution: Some(convert::execution_to_proto(&execution)),
            }))
        }
        .await;
        audited.finish(result, |response| {
            response
                .execution
                .as_ref()
                .map(|e| format!("execution {}", e.id))
                .unwrap_or_default()
        })
    }

    async fn get_execution(
        &self,
        request: Request<pb::GetExecutionRequest>,
    ) -> Result<Response<pb::GetExecutionResponse>, Status> {
        let request = request.into_inner();
        let execution = self
            .engine
            .get_execution(execution_id(&request.execution_id)?)
            .await?;
        Ok(Response::new(pb::GetExecutionResponse {
            execution: Some(convert::execution_to_proto(&execution)),
        }))
    }

    async fn list_executions(
        &self,
        request: Request<pb::ListExecutionsRequest>,
    ) -> Result<Response<pb::ListExecutionsResponse>, Status> {
        let request = request.into_inner();
        let limit = page_size(request.page_size, 50)?;
        let mut v = Violations::default();
        let statuses = convert::execution_statuses_from_proto(&request.statuses, &mut v);
        if !request.page_token.is_empty() && uuid::Uuid::parse_str(&request.page_token).is_err() {
            v.add("page_token", "is not a token this server returned");
        }
        check_labels(&request.labels, &mut v);
        convert::check_pipeline_name("pipeline_name", &request.pipeline_name, false, &mut v);
        if request.correlation_id.contains('\0') {
            v.add("correlation_id", "must not hold NUL characters");
        }
        let filter = v.into_result(ExecutionFilter {
            pipeline_name: (!request.pipeline_name.is_empty()).then_some(request.pipeline_name),
            statuses,
            before_id: (!request.page_token.is_empty()).then_some(request.page_token),
            correlation_id: (!request.correlation_id.is_empty()).then_some(request.correlation_id),
            labels: request.labels.into_iter().collect(),
            limit: limit + 1,
        })?;
        let mut executions = self.engine.list_executions(&filter).await?;
        let next_page_token = if executions.len() as u64 > limit {
            executions.truncate(limit as usize);
            executions.last().map(|e| e.id.clone()).unwrap_or_default()
        } else {
            String::new()
        };
        Ok(Response::new(pb::ListExecutionsResponse {
            executions: executions.iter().map(convert::execution_to_proto).collect(),
            next_page_token,
        }))
    }

    async fn cancel_execution(
        &self,
        request: Request<pb::CancelExecutionRequest>,
    ) -> Result<Response<pb::CancelExecutionResponse>, Status> {
        let audited = self.audited(
            &request,
            "CancelExecution",
            request.get_ref().execution_id.clone(),
        )?;
        let result: Result<_, Status> = async {
            let request = request.into_inner();
            let id = execution_id(&request.execution_id)?;
            let mut v = Violations::default();
            let mode = convert::cancel_mode_from_proto(request.mode, &mut v);
            v.into_result(())?;
            let execution = self.engine.cancel_execution(id, mode).await?;
            Ok(Response::new(pb::CancelExecutionResponse {
                execution: Some(convert::execution_to_proto(&execution)),
            }))
        }
        .await;
        audited.finish(result, |_| String::new())
    }

    async fn retry_execution(
        &self,
        request: Request<pb::RetryExecutionRequest>,
    ) -> Result<Response<pb::RetryExecutionResponse>, Status> {
        let audited = self.audited(
            &request,
            "RetryExecution",
            request.get_ref().execution_id.clone(),
        )?;
        let result: Result<_, Status> = async {
            let request = request.into_inner();
            let id = execution_id(&request.execution_id)?;
            let from_step = (!request.from_step.is_empty()).then_some(request.from_step.as_str());
            let execution = self.engine.retry_execution(id, from_step).await?;
            Ok(Response::new(pb::RetryExecutionResponse {
                execution: Some(convert::execution_to_proto(&execution)),
            }))
        }
        .await;
        audited.finish(result, |_| String::new())
    }

    async fn pause_execution(
        &self,
        request: Request<pb::PauseExecutionRequest>,
    ) -> Result<Response<pb::PauseExecutionResponse>, Status> {
        let audited = self.audited(
            &request,
            "PauseExecution",
            request.get_ref().execution_id.clone(),
        )?;
        let result: Result<_, Status> = async {
            let request = request.into_inner();
            let id = execution_id(&request.execution_id)?;
            let execution = self.engine.pause_execution(id).await?;
            Ok(Response::new(pb::PauseExecutionResponse {
                execution: Some(convert::execution_to_proto(&execution)),
            }))
        }
        .await;
        audited.finish(result, |_| String::new())
    }

    async fn resume_execution(
        &self,
        request: Request<pb::ResumeExecutionRequest>,
    ) -> Result<Response<pb::ResumeExecutionResponse>, Status> {
        let audited = self.audited(
            &request,
            "ResumeExecution",
            request.get_ref().execution_id.clone(),
        )?;
        let result: Result<_, Status> = async {
            let request = request.into_inner();
            let id = execution_id(&request.execution_id)?;
            let execution = self.engine.resume_execution(id).await?;
            Ok(Response::new(pb::ResumeExecutionResponse {
                execution: Some(convert::execution_to_proto(&execution)),
            }))
        }
        .await;
        audited.finish(result, |_| String::new())
    }

    type WatchExecutionStream = WatchStream;

    async fn watch_execution(
        &self,
        request: Request<pb::WatchExecutionRequest>,
    ) -> Result<Response<Self::WatchExecutionStream>, Status> {
        let request = request.into_inner();
        let id = execution_id(&request.execution_id)?;
        let events = self.engine.watch(id, request.after_sequence).await?;
        let stream = events.map(|item| {
            item.map(|item| {
                let (event, heartbeat) = watch_fields(item);
                pb::WatchExecutionResponse { event, heartbeat }
            })
            .map_err(Status::from)
        });
        Ok(Response::new(Box::pin(stream)))
    }

    type WatchExecutionsStream = WatchAllStream;

    async fn watch_executions(
        &self,
        request: Request<pb::WatchExecutionsRequest>,
    ) -> Result<Response<Self::WatchExecutionsStream>, Status> {
        let request = request.into_inner();
        let mut v = Violations::default();
        let statuses = convert::execution_statuses_from_proto(&request.statuses, &mut v);
        let kinds = request
            .types
            .iter()
            .enumerate()
            .filter_map(|(i, &t)| convert::event_kind_from_proto(t, &format!("types[{i}]"), &mut v))
            .collect();
        let filter = v.into_result(AllEventsFilter {
            pipeline_name: (!request.pipeline_name.is_empty()).then_some(request.pipeline_name),
            statuses,
            kinds,
        })?;
        let stream = self.engine.watch_all(filter).map(|item| {
            item.map(|item| {
                let (event, heartbeat) = watch_fields(item);
                pb::WatchExecutionsResponse { event, heartbeat }
            })
            .map_err(Status::from)
        });
        Ok(Response::new(Box::pin(stream)))
    }

    async fn list_audit_events(
        &self,
        request: Request<pb::ListAuditEventsRequest>,
    ) -> Result<Response<pb::ListAuditEventsResponse>, Status> {
        let request = request.into_inner();
        let limit = page_size(request.page_size, 50)?;
        if !request.page_token.is_empty() && uuid::Uuid::parse_str(&request.page_token).is_err() {
            return Err(Error::invalid("page_token", "is not a token this server returned").into());
        }
        let some = |text: String| (!text.is_empty()).then_some(text);
        let filter = AuditFilter {
            caller: some(request.caller),
            method: some(request.method),
            target: some(request.target),
            before_id: some(request.page_token),
            limit: limit + 1,
        };
        let mut events = self.audit.list(&filter).await.map_err(Error::from)?;
        let next_page_token = if events.len() as u64 > limit {
            events.truncate(limit as usize);
            events.last().map(|e| e.id.clone()).unwrap_or_default()
        } else {
            String::new()
        };
        Ok(Response::new(pb::ListAuditEventsResponse {
            events: events
                .into_iter()
                .map(|e| pb::AuditEvent {
                    id: e.id,
                    time: Some(convert::timestamp(e.time)),
                    caller: e.caller,
                    role: e.role.as_str().to_string(),
                    method: e.method,
                    target: e.target,
                    request_id: e.request_id,
                    code: e.code,
                    message: e.message,
                })
                .collect(),
            next_page_token,
        }))
    }
}
