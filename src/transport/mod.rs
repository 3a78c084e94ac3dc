//! Transport: the gRPC service, its conversions and its error table, and
//! gRPC-Web for browsers, and TLS.

pub mod auth;
pub mod convert;
pub mod deadline;
pub mod decode_errors;
pub mod grpc_web;
pub mod request_context;
pub mod service;
pub mod status;
pub mod tls;
pub mod write_batching;
