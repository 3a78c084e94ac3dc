//! Requests that cannot be decoded are the caller's fault: tonic answers
//! them with INTERNAL (as gRPC's status code guide suggests for parse
//! errors), which tells a caller nothing useful and looks like a server bug.
//! This layer turns that answer into INVALID_ARGUMENT, keeping the message
//! (for example "recursion limit reached" for a `Struct` nested more than
//! about 30 levels deep).

use tonic::codegen::http::{HeaderValue, Response};

/// The start of the message tonic gives undecodable requests, as it is
/// written in the `grpc-message` header (percent-encoded).
const DECODE_FAILURE: &str = "failed%20to%20decode%20Protobuf%20message";

/// Rewrites the status of a trailers-only answer to an undecodable request.
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
    response
}
