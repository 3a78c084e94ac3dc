//! `http` steps (being written).

use super::{Attempt, StepFailure};
use crate::domain::data::JsonMap;
use crate::domain::definition::HttpSpec;

pub async fn run(spec: &HttpSpec, _attempt: &Attempt<'_>) -> Result<JsonMap, StepFailure> {
    Err(StepFailure::new(
        "start_failed",
        format!("http steps are not available yet ({})", spec.url),
    ))
}
