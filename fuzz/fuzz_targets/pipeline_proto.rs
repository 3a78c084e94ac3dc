//! Pipeline definitions as protobuf bytes: a `CreatePipelineRequest` (an
//! `UpdatePipelineRequest` has the same shape) decoded with prost as tonic
//! does, then read and validated as the `CreatePipeline` handler does. The
//! same bytes are also read as a `RunPipelineRequest`, whose input and
//! trigger go through the same conversions and limits as in `RunPipeline`.

#![no_main]

use libfuzzer_sys::fuzz_target;
use pipelined::domain::limits;
use pipelined::proto::v1 as pb;
use pipelined::transport::convert::{self, Violations};
use pipelined_fuzz::{refused, validate_and_use};
use prost::Message;

fuzz_target!(|data: &[u8]| {
    if let Ok(request) = pb::CreatePipelineRequest::decode(data) {
        match convert::spec_from_proto(request.pipeline, "pipeline") {
            Ok(spec) => validate_and_use(spec, "pipeline"),
            Err(error) => refused(error, "pipeline"),
        }
    }
    if let Ok(request) = pb::RunPipelineRequest::decode(data) {
        let mut v = Violations::default();
        let input = convert::struct_to_json(request.input, "input", &mut v);
        if limits::check_object(&input, limits::MAX_INPUT_BYTES).is_ok() {
            let _ = limits::contains_nul(&input);
            let _ = convert::json_to_struct(&input);
        }
        let trigger = convert::trigger_from_proto(request.trigger, &mut v);
        let _ = limits::contains_nul(&trigger.data);
        if let Err(error) = v.into_result(()) {
            refused(error, "");
        }
    }
});
