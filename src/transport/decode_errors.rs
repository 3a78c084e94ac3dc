//! Requests that cannot be decoded are the caller's fault: tonic answers
//! them with INTERNAL (as gRPC's status code guide suggests for parse
//! errors), which tells a caller nothing useful and looks like a server bug.
//! This layer turns that answer into INVALID_ARGUMENT, keeping the message
//! (for example "recursion limit reached" for a `Struct` nested more than
//! about 30 levels deep).
//!
//! A request over the message size limit is answered OUT_OF_RANGE by tonic
//! ("decoded message length too large"); gRPC's status code guide and other
//! gRPC servers say RESOURCE_EXHAUSTED, which this layer answers instead
//! (tonic already does for a compressed request that is too large once
//! decompressed).

use tonic::codegen::http::{HeaderValue, Response};

/// The start of the message tonic gives undecodable requests, as it is
/// written in the `grpc-message` header (percent-encoded).
const DECODE_FAILURE: &str = "failed%20to%20decode%20Protobuf%20message";

/// The start of the message tonic gives requests over the size limit.
const TOO_LARGE: &str = "Error,%20decoded%20message%20length%20too%20large";

/// Rewrites the status of a trailers-only answer to an undecodable or
/// oversized request.
pub fn invalid_argument_for_undecodable<B>(mut response: Response<B>) -> Response<B> {
    let headers = response.headers_mut();
    let internal = headers
        .get("grpc-status")
        .is_some_and(|status| status == "13");
    let undecodable = headers
        .get("grpc-message")
        .and_then(|message| message.to_str().ok())
        .is_some_and(|message| {
            message.starts_with(DECODE_FAILURE) || message.starts_with("failed to decode")
        });
    if internal && undecodable {
        headers.insert("grpc-status", HeaderValue::from_static("3"));
    }
    let out_of_range = headers
        .get("grpc-status")
        .is_some_and(|status| status == "11");
    let too_large = headers
        .get("grpc-message")
        .and_then(|message| message.to_str().ok())
        .is_some_and(|message| {
            message.starts_with(TOO_LARGE)
                || message.starts_with("Error, decoded message length too large")
        });
    if out_of_range && too_large {
        headers.insert("grpc-status", HeaderValue::from_static("8"));
    }
    response
}
