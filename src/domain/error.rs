use crate::storage::StoreError;

/// One invalid field of a request, named by its path (`steps[2].needs[0]`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldViolation {
    pub field: String,
    pub description: String,
}

impl FieldViolation {
    pub fn new(field: impl Into<String>, description: impl Into<String>) -> Self {
        Self {
            field: field.into(),
            description: description.into(),
        }
    }
}

/// Everything the domain and the executor can refuse or fail with. The
/// transport maps each variant to exactly one gRPC status code.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("invalid request: {}", describe(.0))]
    InvalidArgument(Vec<FieldViolation>),
    #[error("{kind} '{}' not found", preview(.id))]
    NotFound { kind: &'static str, id: String },
    #[error("{kind} '{}' already exists", preview(.id))]
    AlreadyExists { kind: &'static str, id: String },
    /// An illegal state transition or an operation the current state forbids.
    #[error("{0}")]
    FailedPrecondition(String),
    /// A `command` step names a program the server does not allow.
    #[error(
        "{field}: program '{}' is not allowed on this server; command steps run only \
         for programs given to `pipelined serve --allow-command`",
        preview(.program)
    )]
    CommandNotAllowed { field: String, program: String },
    /// A request id was used before for a different request.
    #[error("request_id '{}' was already used for a different request", preview(.0))]
    RequestIdReused(String),
    /// A limit refuses the request (a pipeline's concurrency cap).
    #[error("{0}")]
    ResourceExhausted(String),
    /// A watcher fell too far behind the live events to continue.
    #[error("{0}")]
    Lagged(String),
    #[error("the server is shutting down")]
    ShuttingDown,
    /// Something needed is out of reach for now; trying again may work.
    #[error("{0}")]
    Unavailable(String),
    /// A bug or a task that died; never expected.
    #[error("internal error: {0}")]
    Internal(String),
    /// The caller's role does not allow the call (or a step kind in it).
    #[error("{0}")]
    PermissionDenied(String),
    /// A storage failure with no domain meaning (database down, corrupt row).
    #[error(transparent)]
    Storage(StoreError),
}

impl From<StoreError> for Error {
    /// Storage outcomes that mean something to a caller become domain errors.
    fn from(error: StoreError) -> Self {
        match error {
            StoreError::NotFound { kind, id } => Self::NotFound { kind, id },
            StoreError::AlreadyExists { kind, id } => Self::AlreadyExists { kind, id },
            StoreError::Conflict(message) => Self::FailedPrecondition(message),
            StoreError::RequestIdReused(id) => Self::RequestIdReused(id),
            StoreError::LimitReached(message) => Self::ResourceExhausted(message),
            other => Self::Storage(other),
        }
    }
}

impl Error {
    pub fn invalid(field: impl Into<String>, description: impl Into<String>) -> Self {
        Self::InvalidArgument(vec![FieldViolation::new(field, description)])
    }
}

/// A value a caller sent, cut to 64 characters to be quoted in a message
/// (a status message travels in HTTP/2 headers, which clients limit).
pub fn preview(value: &str) -> String {
    const SHOWN: usize = 64;
    match value.char_indices().nth(SHOWN) {
        Some((end, _)) => format!("{}…", &value[..end]),
        None => value.to_owned(),
    }
}

fn describe(violations: &[FieldViolation]) -> String {
    violations
        .iter()
        .map(|v| format!("{}: {}", v.field, v.description))
        .collect::<Vec<_>>()
        .join("; ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quoted_values_are_cut() {
        let long = Error::NotFound {
            kind: "pipeline",
            id: "é".repeat(1000),
        };
        assert_eq!(
            long.to_string(),
            format!("pipeline '{}…' not found", "é".repeat(64))
        );
        let short = Error::CommandNotAllowed {
            field: "steps[0].command.program".into(),
            program: "rm".into(),
        };
        assert!(
            short
                .to_string()
                .starts_with("steps[0].command.program: program 'rm' is not")
        );
    }
}
