//! Transport: the gRPC service, its conversions and its error table.

pub mod convert;
pub mod deadline;
pub mod decode_errors;
pub mod request_context;
pub mod service;
pub mod status;
