//! Pipeline definitions as text: YAML, as `pipelined apply` reads files (YAML
//! being a superset of JSON, JSON too), and JSON as the store reads it back.

#![no_main]

use libfuzzer_sys::fuzz_target;
use pipelined::domain::definition::PipelineSpec;
use pipelined_fuzz::validate_and_use;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(spec) = serde_yaml_ng::from_str::<PipelineSpec>(text) {
        validate_and_use(spec, "");
    }
    if let Ok(spec) = serde_json::from_str::<PipelineSpec>(text) {
        validate_and_use(spec, "");
    }
});
