//! Statuses and the state machines that govern them.
//!
//! Execution:
//! ```text
//! pending ──▶ running ──▶ succeeded
//!    │          │  ╰────▶ failed ──────╮
//!    │          ├─▶ stopping ─┬─▶ cancelled ──╮
//!    │          ╰─▶ terminating ◀┘      ▲      │ retry
//!    ╰──────────────────────────────────╯      │
//! failed, cancelled ──retry──▶ running ◀───────╯
//! ```
//! Step: pending → running → succeeded | failed | cancelled; pending →
//! skipped | cancelled; pending → failed when it was waiting for another
//! attempt and the execution ended; back to pending by a retry, and
//! running → pending when an attempt is to be retried or a server restart
//! interrupted it (it runs again).

use serde::{Deserialize, Serialize};

use super::Error;

macro_rules! string_enum {
    ($(#[$meta:meta])* $name:ident { $($variant:ident => $text:literal),+ $(,)? }) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
        #[serde(rename_all = "snake_case")]
        pub enum $name { $($variant),+ }

        impl $name {
            /// The name stored in the database and shown to people.
            pub fn as_str(self) -> &'static str {
                match self { $(Self::$variant => $text),+ }
            }

            /// Inverse of [`Self::as_str`].
            pub fn parse(text: &str) -> Option<Self> {
                match text { $($text => Some(Self::$variant),)+ _ => None }
            }
        }

        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(self.as_str())
            }
        }
    };
}

string_enum!(
    /// Lifecycle of an execution.
    ExecutionStatus {
        Pending => "pending",
        Running => "running",
        Stopping => "stopping",
        Terminating => "terminating",
        Succeeded => "succeeded",
        Failed => "failed",
        Cancelled => "cancelled",
        Queued => "queued",
        Paused => "paused",
    }
);

string_enum!(
    /// Lifecycle of one step of an execution.
    StepStatus {
        Pending => "pending",
        Running => "running",
        Succeeded => "succeeded",
        Failed => "failed",
        Skipped => "skipped",
        Cancelled => "cancelled",
    }
);

string_enum!(
    /// What an event records.
    EventKind {
        ExecutionStarted => "execution_started",
        ExecutionSucceeded => "execution_succeeded",
        ExecutionFailed => "execution_failed",
        ExecutionCancelled => "execution_cancelled",
        ExecutionCancelRequested => "execution_cancel_requested",
        ExecutionRetried => "execution_retried",
        StepStarted => "step_started",
        StepSucceeded => "step_succeeded",
        StepFailed => "step_failed",
        StepSkipped => "step_skipped",
        StepCancelled => "step_cancelled",
        ExecutionQueued => "execution_queued",
        ExecutionPaused => "execution_paused",
        ExecutionResumed => "execution_resumed",
        StepRetrying => "step_retrying",
        StepLog => "step_log",
        StepProgress => "step_progress",
    }
);

string_enum!(
    /// Where a logged line came from.
    LogStream {
        Stdout => "stdout",
        Stderr => "stderr",
        Worker => "worker",
        System => "system",
    }
);

string_enum!(
    /// Where an execution came from.
    TriggerKind {
        Manual => "manual",
        Scheduled => "scheduled",
        Webhook => "webhook",
        Event => "event",
        Api => "api",
    }
);

string_enum!(
    /// How a cancel treats running steps.
    CancelMode {
        Graceful => "graceful",
        Terminate => "terminate",
    }
);

impl ExecutionStatus {
    pub fn is_terminal(self) -> bool {
        matches!(self, Self::Succeeded | Self::Failed | Self::Cancelled)
    }

    /// Whether the execution counts against its pipeline's concurrency cap.
    pub fn holds_slot(self) -> bool {
        matches!(
            self,
            Self::Pending | Self::Running | Self::Paused | Self::Stopping | Self::Terminating
        )
    }

    /// Whether the state machine allows `self → next`.
    pub fn can_become(self, next: Self) -> bool {
        use ExecutionStatus::*;
        matches!(
            (self, next),
            (Queued, Pending | Cancelled)
                | (Pending, Running | Cancelled)
                | (
                    Running,
                    Paused | Stopping | Terminating | Succeeded | Failed
                )
                | (
                    Paused,
                    Running | Stopping | Terminating | Succeeded | Failed
                )
                | (Stopping, Terminating | Cancelled)
                | (Terminating, Cancelled)
                | (Failed | Cancelled, Running | Queued)
        )
    }

    /// `Ok` if `self → next` is legal, else FAILED_PRECONDITION naming both.
    pub fn check(self, next: Self, action: &str) -> Result<(), Error> {
        if self.can_become(next) {
            Ok(())
        } else {
            Err(Error::FailedPrecondition(format!(
                "cannot {action} an execution that is {self} (it cannot become {next})"
            )))
        }
    }
}

impl StepStatus {
    pub fn is_final(self) -> bool {
        !matches!(self, Self::Pending | Self::Running)
    }

    pub fn can_become(self, next: Self) -> bool {
        use StepStatus::*;
        matches!(
            (self, next),
            (Pending, Running | Skipped | Cancelled | Failed)
                | (Running, Pending | Succeeded | Failed | Cancelled)
                | (Succeeded | Failed | Skipped | Cancelled, Pending)
        )
    }
}

impl EventKind {
    /// Events after which the execution is terminal.
    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            Self::ExecutionSucceeded | Self::ExecutionFailed | Self::ExecutionCancelled
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ALL: [ExecutionStatus; 9] = [
        ExecutionStatus::Queued,
        ExecutionStatus::Paused,
        ExecutionStatus::Pending,
        ExecutionStatus::Running,
        ExecutionStatus::Stopping,
        ExecutionStatus::Terminating,
        ExecutionStatus::Succeeded,
        ExecutionStatus::Failed,
        ExecutionStatus::Cancelled,
    ];

    #[test]
    fn terminal_states_only_leave_through_retry() {
        for from in ALL.into_iter().filter(|s| s.is_terminal()) {
            for to in ALL {
                let expected = from != ExecutionStatus::Succeeded
                    && matches!(to, ExecutionStatus::Running | ExecutionStatus::Queued);
                assert_eq!(from.can_become(to), expected, "{from} -> {to}");
            }
        }
    }

    #[test]
    fn names_round_trip() {
        for status in ALL {
            assert_eq!(ExecutionStatus::parse(status.as_str()), Some(status));
        }
    }
}
