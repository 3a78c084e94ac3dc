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

/// tonic's answers to requests it could not decode, and the precise status
/// for each: (tonic's status, the starts of its `grpc-message`, percent-encoded
/// as sent and plain, the status answered instead).
const REWRITES: [(&str, [&str; 2], &str); 2] = [
    // INTERNAL "failed to decode Protobuf message: …" → INVALID_ARGUMENT.
    (
        "13",
        [
            "failed%20to%20decode%20Protobuf%20message",
            "failed to decode",
        ],
        "3",
    ),
    // OUT_OF_RANGE "Error, decoded message length too large …" → RESOURCE_EXHAUSTED.
    (
        "11",
        [
            "Error,%20decoded%20message%20length%20too%20large",
            "Error, decoded message length too large",
        ],
        "8",
    ),
];

/// Rewrites the status of a trailers-only answer to an undecodable or
/// oversized request.
pub fn precise_status_for_undecodable<B>(mut response: Response<B>) -> Response<B> {
    let headers = response.headers_mut();
    let status = headers.get("grpc-status").and_then(|s| s.to_str().ok());
    let message = headers.get("grpc-message").and_then(|m| m.to_str().ok());
    let (Some(status), Some(message)) = (status, message) else {
        return response;
    };
    let rewrite = REWRITES.iter().find(|(from, starts, _)| {
        status == *from && starts.iter().any(|start| message.starts_with(start))
    });
    if let Some((_, _, to)) = rewrite {
        headers.insert("grpc-status", HeaderValue::from_static(to));
    }
    response
}
