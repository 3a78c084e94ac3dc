//! `grpc` steps (being written).

use super::{Attempt, StepFailure};
use crate::domain::data::JsonMap;
use crate::domain::definition::GrpcSpec;

pub async fn run(spec: &GrpcSpec, _attempt: &Attempt<'_>) -> Result<JsonMap, StepFailure> {
    Err(StepFailure::new(
        "worker_unavailable",
        format!("grpc steps are not available yet ({})", spec.address),
    ))
}
