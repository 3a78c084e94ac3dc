//! What every fuzz target checks about a pipeline definition once it has
//! been read, whichever way it came in.

use pipelined::domain::definition::{CommandPolicy, Graph, PipelineSpec};
use pipelined::domain::{Error, limits};
use pipelined::proto::v1 as pb;
use pipelined::transport::convert;
use prost::Message;

/// The server's command policy in the fuzz targets: `sh` allowed, as in the
/// integration tests.
pub fn policy() -> CommandPolicy {
    CommandPolicy::new(vec!["sh".to_owned()])
}

/// The answer the server sends for a refused definition: building it must
/// not panic, and every field path must start with `prefix`.
pub fn refused(error: Error, prefix: &str) {
    let error = convert::prefix_paths(error, prefix);
    if let Error::InvalidArgument(violations) = &error {
        assert!(
            !violations.is_empty(),
            "INVALID_ARGUMENT without a violation"
        );
        for violation in violations {
            assert!(
                violation.field.starts_with(prefix),
                "{} does not start with {prefix}",
                violation.field
            );
        }
    }
    let _ = tonic::Status::from(error);
}

/// Validates `spec` as `CreatePipeline` does; a valid one then goes
/// everywhere a stored definition goes.
pub fn validate_and_use(spec: PipelineSpec, prefix: &str) {
    match spec.validate(&policy()) {
        Ok(()) => use_valid(&spec),
        Err(error) => refused(error, prefix),
    }
}

/// What happens to a valid definition: it is stored as JSON and read back,
/// sent back as protobuf (and, from the CLI, sent to the server, which must
/// accept it too), and its graph, retry delays and conditions are used by
/// the executor.
pub fn use_valid(spec: &PipelineSpec) {
    // Stored as JSON text, read back by the store.
    let json = serde_json::to_string(spec).expect("a valid definition serializes");
    let stored: PipelineSpec = serde_json::from_str(&json)
        .unwrap_or_else(|e| panic!("a stored definition cannot be read back: {e}\n{json}"));
    stored
        .validate(&policy())
        .expect("a definition read back from storage is still valid");

    // Sent as protobuf (responses, and `pipelined apply` to the server).
    let message = pb::CreatePipelineRequest {
        pipeline: Some(convert::spec_to_proto(spec)),
    };
    let bytes = message.encode_to_vec();
    assert!(bytes.len() <= limits::MAX_MESSAGE_BYTES);
    let decoded =
        pb::CreatePipelineRequest::decode(bytes.as_slice()).expect("an encoded definition decodes");
    let received = convert::spec_from_proto(decoded.pipeline, "pipeline")
        .unwrap_or_else(|e| panic!("the server refuses a valid definition: {e:?}"));
    if let Err(e) = received.validate(&policy()) {
        panic!("the server refuses a valid definition: {e:?}");
    }

    // The executor's view.
    let graph = Graph::new(spec);
    assert_eq!(graph.order.len(), spec.steps.len(), "every step is ordered");
    for step in 0..spec.steps.len().min(50) {
        let _ = graph.ancestors(step);
        let _ = graph.downstream(step);
    }
    for retry in spec
        .default_retry
        .iter()
        .chain(spec.steps.iter().filter_map(|s| s.retry.as_ref()))
    {
        for attempt in [0, 1, 2, retry.max_attempts, u32::MAX] {
            for random in [0.0, 0.5, 0.999_999] {
                let _ = retry.delay(attempt, random);
            }
        }
    }
}
