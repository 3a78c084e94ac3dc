//! Who may do what: the three roles, the one table of the role each RPC
//! needs, the rule on which step kinds a caller may define, and the audit
//! record of a call.

use chrono::{DateTime, Utc};

use super::Error;
use super::definition::{PipelineSpec, StepKind};

/// A caller's role. Each role may do everything the ones before it may.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Role {
    /// Reads pipelines and executions and watches them.
    Viewer,
    /// A viewer that also runs, cancels, retries, pauses and resumes.
    Operator,
    /// Everything: defines pipelines and reads the audit trail too.
    Admin,
}

impl Role {
    pub const NAMES: [&'static str; 3] = ["viewer", "operator", "admin"];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Viewer => "viewer",
            Self::Operator => "operator",
            Self::Admin => "admin",
        }
    }

    pub fn parse(text: &str) -> Option<Self> {
        match text {
            "viewer" => Some(Self::Viewer),
            "operator" => Some(Self::Operator),
            "admin" => Some(Self::Admin),
            _ => None,
        }
    }
}

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Who makes a call: a token's name or a JWT's subject, and the role it has.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    pub name: String,
    pub role: Role,
}

impl Caller {
    /// Everyone, when authentication is off: an admin, as before
    /// authentication existed.
    pub fn anonymous() -> Self {
        Self {
            name: "anonymous".to_string(),
            role: Role::Admin,
        }
    }
}

/// The role `pipeline.v1.PipelineService/<method>` needs: the one table of
/// it. A method this table does not know (added to the proto but not here)
/// needs the admin role, so a new RPC is never open by mistake.
pub fn required_role(method: &str) -> Role {
    match method {
        "GetPipeline" | "ListPipelines" | "GetExecution" | "ListExecutions" | "WatchExecution"
        | "WatchExecutions" => Role::Viewer,
        "RunPipeline" | "CancelExecution" | "RetryExecution" | "PauseExecution"
        | "ResumeExecution" => Role::Operator,
        "CreatePipeline" | "UpdatePipeline" | "DeletePipeline" | "ListAuditEvents" => Role::Admin,
        _ => Role::Admin,
    }
}

/// Whether a call to `method` changes something, and so goes to the audit
/// trail whatever its outcome.
pub fn is_mutating(method: &str) -> bool {
    matches!(
        method,
        "CreatePipeline"
            | "UpdatePipeline"
            | "DeletePipeline"
            | "RunPipeline"
            | "CancelExecution"
            | "RetryExecution"
            | "PauseExecution"
            | "ResumeExecution"
    )
}

/// Refuses `caller` a call to `method` its role does not allow.
pub fn authorize(caller: &Caller, method: &str) -> Result<(), Error> {
    let needed = required_role(method);
    if caller.role >= needed {
        Ok(())
    } else {
        Err(Error::PermissionDenied(format!(
            "{method} needs the {needed} role; caller '{}' has {}",
            caller.name, caller.role
        )))
    }
}

/// The role a step kind needs in a definition: steps that reach outside the
/// server (run programs, call HTTP or gRPC services) only admins may define,
/// whoever else may one day define pipelines.
pub fn role_to_define(kind: &StepKind) -> Role {
    match kind {
        StepKind::Noop {}
        | StepKind::Sleep { .. }
        | StepKind::Fail { .. }
        | StepKind::Set { .. } => Role::Viewer,
        StepKind::Command(_) | StepKind::Http(_) | StepKind::Grpc(_) => Role::Admin,
    }
}

/// Refuses a definition holding a step kind `caller` may not define.
pub fn check_definition(spec: &PipelineSpec, caller: &Caller) -> Result<(), Error> {
    for step in &spec.steps {
        let needed = role_to_define(&step.kind);
        if caller.role < needed {
            return Err(Error::PermissionDenied(format!(
                "step '{}' is a {} step: defining one needs the {needed} role; caller '{}' has {}",
                step.name,
                step.kind.name(),
                caller.name,
                caller.role
            )));
        }
    }
    Ok(())
}

/// One call in the audit trail.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditEvent {
    /// A UUIDv7: ids sort by time.
    pub id: String,
    pub time: DateTime<Utc>,
    pub caller: String,
    pub role: Role,
    /// The RPC's name (`RunPipeline`).
    pub method: String,
    /// The pipeline name or execution id; empty when unknown.
    pub target: String,
    /// The call's `x-request-id`.
    pub request_id: String,
    /// A gRPC status code name (`OK`, `PERMISSION_DENIED`).
    pub code: String,
    pub message: String,
}

/// Text from a request as the audit trail keeps it (a target, a method
/// path): at most 256 bytes of it.
pub fn clip(mut text: String) -> String {
    const MAX_LEN: usize = 256;
    if text.len() > MAX_LEN {
        let mut end = MAX_LEN;
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        text.truncate(end);
    }
    text
}

/// Filter and page of `ListAuditEvents`.
#[derive(Debug, Clone, Default)]
pub struct AuditFilter {
    pub caller: Option<String>,
    pub method: Option<String>,
    pub target: Option<String>,
    /// Only events with an id lower than this.
    pub before_id: Option<String>,
    pub limit: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn caller(role: Role) -> Caller {
        Caller {
            name: "ci-bot".into(),
            role,
        }
    }

    #[test]
    fn roles_allow_what_the_table_says() {
        assert!(authorize(&caller(Role::Viewer), "ListExecutions").is_ok());
        assert!(authorize(&caller(Role::Operator), "RunPipeline").is_ok());
        assert!(authorize(&caller(Role::Admin), "DeletePipeline").is_ok());
        let Err(Error::PermissionDenied(message)) =
            authorize(&caller(Role::Viewer), "CancelExecution")
        else {
            panic!("a viewer may not cancel");
        };
        assert_eq!(
            message,
            "CancelExecution needs the operator role; caller 'ci-bot' has viewer"
        );
        assert!(authorize(&caller(Role::Operator), "CreatePipeline").is_err());
        assert!(authorize(&caller(Role::Operator), "ListAuditEvents").is_err());
        assert_eq!(required_role("SomethingNew"), Role::Admin);
        assert!(authorize(&caller(Role::Operator), "SomethingNew").is_err());
    }

    #[test]
    fn only_admins_define_steps_that_reach_outside() {
        let spec: PipelineSpec = serde_yaml_ng::from_str(
            "name: p\nsteps:\n- {name: a, set: {values: {x: 1}}}\n- {name: b, command: {program: sh}}\n",
        )
        .unwrap();
        let Err(Error::PermissionDenied(message)) =
            check_definition(&spec, &caller(Role::Operator))
        else {
            panic!("an operator may not define a command step");
        };
        assert!(message.contains("step 'b' is a command step"), "{message}");
        assert!(check_definition(&spec, &caller(Role::Admin)).is_ok());
    }

    #[test]
    fn clipped_text_keeps_whole_characters() {
        assert_eq!(clip("short".into()), "short");
        let long = "é".repeat(200);
        let clipped = clip(long);
        assert_eq!(clipped.len(), 256);
        assert!(clipped.chars().all(|c| c == 'é'));
    }

    #[test]
    fn role_names_round_trip() {
        for name in Role::NAMES {
            assert_eq!(Role::parse(name).unwrap().as_str(), name);
        }
        assert_eq!(Role::parse("root"), None);
    }
}
