//! SeaORM entities, one per table (see `migration/`).

pub mod audit_event;
pub mod execution;
pub mod execution_event;
pub mod execution_label;
pub mod execution_step;
pub mod pipeline;
