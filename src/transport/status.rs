//! The one table from errors to gRPC statuses.

use std::time::Duration;

use tonic::{Code, Status};
use tonic_types::{ErrorDetails, FieldViolation, PreconditionViolation, StatusExt};

use crate::domain::Error;
use crate::storage::StoreError;

/// Longest status message sent, in bytes. Messages quote what callers sent
/// (names, ids), and a status travels in HTTP/2 headers, of which clients
/// take 16 KiB (hyper, so tonic) in all: a longer answer would reach the
/// caller as a protocol error instead of the status.
const MAX_MESSAGE_BYTES: usize = 1024;
/// Most bytes of field paths and descriptions in the field violations sent.
const MAX_VIOLATION_BYTES: usize = 4096;
/// Longest field path and description of one violation sent, in bytes.
const MAX_FIELD_BYTES: usize = 256;
const MAX_DESCRIPTION_BYTES: usize = 512;

impl From<Error> for Status {
    fn from(error: Error) -> Self {
        let message = bounded(&error.to_string(), MAX_MESSAGE_BYTES);
        match error {
            Error::InvalidArgument(violations) => {
                let (message, violations) = bounded_violations(message, violations);
                Status::with_error_details(
                    Code::InvalidArgument,
                    message,
                    ErrorDetails::with_bad_request(violations),
                )
            }
            Error::NotFound { .. } => Status::not_found(message),
            Error::AlreadyExists { .. } => Status::already_exists(message),
            Error::FailedPrecondition(_) => Status::failed_precondition(message),
            Error::CommandNotAllowed { field, .. } => Status::with_error_details(
                Code::FailedPrecondition,
                message.clone(),
                ErrorDetails::with_precondition_failure(vec![PreconditionViolation::new(
                    "COMMAND_NOT_ALLOWED",
                    bounded(&field, MAX_FIELD_BYTES),
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

/// `text` cut to at most `max` bytes (at a character boundary, ending with
/// an ellipsis when cut).
fn bounded(text: &str, max: usize) -> String {
    if text.len() <= max {
        return text.to_owned();
    }
    let mut end = max - '…'.len_utf8();
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &text[..end])
}

/// The violations that fit in an answer, each cut to size, and the message,
/// which says how many there were when not all fit.
fn bounded_violations(
    message: String,
    violations: Vec<crate::domain::FieldViolation>,
) -> (String, Vec<FieldViolation>) {
    let total = violations.len();
    let mut bytes = 0;
    let mut shown = Vec::new();
    for violation in violations {
        let field = bounded(&violation.field, MAX_FIELD_BYTES);
        let description = bounded(&violation.description, MAX_DESCRIPTION_BYTES);
        bytes += field.len() + description.len();
        if bytes > MAX_VIOLATION_BYTES && !shown.is_empty() {
            break;
        }
        shown.push(FieldViolation::new(field, description));
    }
    if shown.len() == total {
        return (message, shown);
    }
    let more = format!(" ({total} problems, the first {} listed)", shown.len());
    let message = bounded(&message, MAX_MESSAGE_BYTES - more.len()) + &more;
    (message, shown)
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
        // The message may quote what the caller sent (a JWT's `kid`).
        Status::unauthenticated(bounded(&error.to_string(), MAX_MESSAGE_BYTES))
    }
}

/// A gRPC code's canonical name (`NOT_FOUND`), as the audit trail and the
/// metrics' `code` label spell it.
pub fn code_name(code: tonic::Code) -> &'static str {
    match code {
        Code::Ok => "OK",
        Code::Cancelled => "CANCELLED",
        Code::Unknown => "UNKNOWN",
        Code::InvalidArgument => "INVALID_ARGUMENT",
        Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
        Code::NotFound => "NOT_FOUND",
        Code::AlreadyExists => "ALREADY_EXISTS",
        Code::PermissionDenied => "PERMISSION_DENIED",
        Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
        Code::FailedPrecondition => "FAILED_PRECONDITION",
        Code::Aborted => "ABORTED",
        Code::OutOfRange => "OUT_OF_RANGE",
        Code::Unimplemented => "UNIMPLEMENTED",
        Code::Internal => "INTERNAL",
        Code::Unavailable => "UNAVAILABLE",
        Code::DataLoss => "DATA_LOSS",
        Code::Unauthenticated => "UNAUTHENTICATED",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::FieldViolation as Violation;

    #[test]
    fn answers_stay_small_whatever_they_quote() {
        let name = "é".repeat(2_000);
        let violations: Vec<Violation> = (0..100_000)
            .map(|i| {
                let name = if i < 10 { name.as_str() } else { "a" };
                Violation::new(format!("steps[{i}].name{name}"), name)
            })
            .collect();
        let status = Status::from(Error::InvalidArgument(violations));
        assert!(
            status.message().len() <= MAX_MESSAGE_BYTES,
            "{}",
            status.message().len()
        );
        let shown = status.get_details_bad_request().unwrap().field_violations;
        assert!((1..10).contains(&shown.len()), "{}", shown.len());
        let more = format!(" (100000 problems, the first {} listed)", shown.len());
        assert!(status.message().ends_with(&more), "{}", status.message());
        assert!(shown[0].field.starts_with("steps[0].name"));
        assert!(shown[0].field.ends_with('…') && shown[0].field.len() <= MAX_FIELD_BYTES);

        let status = Status::from(Error::FailedPrecondition("x".repeat(1 << 20)));
        assert_eq!(status.message().len(), MAX_MESSAGE_BYTES);

        let few = Status::from(Error::invalid("name", "must not be empty"));
        assert_eq!(few.message(), "invalid request: name: must not be empty");
    }
}
