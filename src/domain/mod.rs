//! The domain: pipeline definitions and their validation, the execution and
//! step state machines, the data-merge rule, and the domain error.

pub mod access;
pub mod condition;
pub mod data;
pub mod definition;
pub mod error;
pub mod limits;
pub mod model;
pub mod status;

pub use error::{Error, FieldViolation};
