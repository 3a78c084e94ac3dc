//! The one table from errors to gRPC statuses.

use std::time::Duration;

use tonic::{Code, Status};
use tonic_types::{ErrorDetails, FieldViolation, PreconditionViolation, StatusExt};

use crate::domain::Error;
use crate::storage::StoreError;

impl From<Error> for Status {
    fn from(error: Error) -> Self {
        let message = error.to_string();
        match error {
            Error::InvalidArgument(violations) => Status::with_error_details(
                Code::InvalidArgument,
                message,
                ErrorDetails::with_bad_request(
                    violations
                        .into_iter()
                        .map(|v| FieldViolation::new(v.field, v.description))
                        .collect::<Vec<_>>(),
                ),
            ),
            Error::NotFound { .. } => Status::not_found(message),
            Error::AlreadyExists { .. } => Status::already_exists(message),
            Error::FailedPrecondition(_) => Status::failed_precondition(message),
            Error::CommandNotAllowed { field, .. } => Status::with_error_details(
                Code::FailedPrecondition,
                message.clone(),
                ErrorDetails::with_precondition_failure(vec![PreconditionViolation::new(
                    "COMMAND_NOT_ALLOWED",
                    field,
                    message,
                )]),
            ),
            Error::RequestIdReused(_) => Status::already_exists(message),
            Error::ResourceExhausted(_) => Status::resource_exhausted(message),
            Error::Lagged(_) => Status::aborted(message),
            Error::ShuttingDown | Error::Unavailable(_) => Status::unavailable(message),
            Error::PermissionDenied(_) => Status::permission_denied(message),
            Error::Internal(_) => {
                tracing::error!(%message, "internal error");
                Status::internal(message)
            }
            Error::Storage(error) => match error {
                StoreError::NotFound { .. } => Status::not_found(message),
                StoreError::AlreadyExists { .. } => Status::already_exists(message),
                StoreError::Conflict(_) => Status::failed_precondition(message),
                StoreError::RequestIdReused(_) => Status::already_exists(message),
                StoreError::LimitReached(_) => Status::resource_exhausted(message),
                StoreError::LeaseLost(_) => Status::unavailable(message),
                ref unavailable if unavailable.is_unavailable() => {
                    tracing::warn!(%error, "database unavailable");
                    Status::unavailable("the database is unavailable; try again")
                }
                StoreError::Database(_) | StoreError::Corrupt(_) => {
                    tracing::error!(%error, "storage failure");
                    Status::internal("internal storage error")
                }
            },
        }
    }
}

/// The answer to a call that ran past its `grpc-timeout`. tonic's own
/// answer, `CANCELLED` ("Timeout expired"), would tell a caller (or a mesh
/// retry policy) that someone cancelled the call rather than that its
/// deadline passed.
pub fn deadline_exceeded(timeout: Duration) -> Status {
    Status::deadline_exceeded(format!(
        "deadline exceeded: the call's grpc-timeout of {} passed",
        humantime::format_duration(timeout)
    ))
}

/// Refused credentials: UNAUTHENTICATED, saying what was wrong.
impl From<super::auth::AuthError> for Status {
    fn from(error: super::auth::AuthError) -> Self {
        Status::unauthenticated(error.to_string())
    }
}
