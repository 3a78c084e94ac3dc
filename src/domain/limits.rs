//! Size and nesting limits of the data the service stores and sends, chosen
//! so that a whole `GetExecution` answer stays under gRPC's usual 4 MiB
//! message limit.

use serde_json::Value;

use super::data::JsonMap;

/// Largest `RunPipeline` input, as JSON.
pub const MAX_INPUT_BYTES: usize = 512 * 1024;
/// Largest output of one step attempt, as JSON.
pub const MAX_STEP_OUTPUT_BYTES: usize = 256 * 1024;
/// Largest merged `execution_data`, as JSON.
pub const MAX_EXECUTION_DATA_BYTES: usize = 1024 * 1024;
/// Largest sum of the stored outputs of one execution's steps, as JSON.
pub const MAX_TOTAL_OUTPUT_BYTES: usize = 2 * 1024 * 1024;
/// Deepest nesting of objects and arrays in inputs and outputs.
pub const MAX_DEPTH: usize = 32;
/// Largest request or response message the server accepts or sends.
pub const MAX_MESSAGE_BYTES: usize = 4 * 1024 * 1024;

/// Whether any key or string in `map` holds a NUL character, which
/// PostgreSQL cannot store in text or `jsonb`.
pub fn contains_nul(map: &JsonMap) -> bool {
    map.iter()
        .any(|(k, v)| k.contains('\0') || value_contains_nul(v))
}

/// [`contains_nul`] for any JSON value.
pub fn value_contains_nul(value: &Value) -> bool {
    match value {
        Value::String(s) => s.contains('\0'),
        Value::Array(items) => items.iter().any(value_contains_nul),
        Value::Object(map) => contains_nul(map),
        _ => false,
    }
}

/// `text` with NUL characters replaced by U+FFFD, for text the server
/// stores but did not get from a caller (log lines, error messages).
pub fn without_nul(text: String) -> String {
    if text.contains('\0') {
        text.replace('\0', "\u{FFFD}")
    } else {
        text
    }
}

/// The size of `map` as JSON.
pub fn json_size(map: &JsonMap) -> usize {
    serde_json::to_vec(map).map_or(usize::MAX, |json| json.len())
}

/// Checks a JSON object against a size limit and [`MAX_DEPTH`]; the error
/// completes a sentence about the object ("the output ...").
pub fn check_object(map: &JsonMap, max_bytes: usize) -> Result<(), String> {
    if depth_of_map(map) > MAX_DEPTH {
        return Err(format!("is nested more than {MAX_DEPTH} levels deep"));
    }
    let size = json_size(map);
    if size > max_bytes {
        return Err(format!(
            "is {size} bytes as JSON, more than the limit of {max_bytes}"
        ));
    }
    Ok(())
}

fn depth_of_map(map: &JsonMap) -> usize {
    1 + map.values().map(depth).max().unwrap_or(0)
}

fn depth(value: &Value) -> usize {
    match value {
        Value::Object(map) => depth_of_map(map),
        Value::Array(items) => 1 + items.iter().map(depth).max().unwrap_or(0),
        _ => 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn depth_and_size_are_enforced() {
        let mut deep = json!(1);
        for _ in 0..MAX_DEPTH {
            deep = json!({ "k": deep });
        }
        let map = deep.as_object().unwrap();
        assert!(check_object(map, 1 << 20).is_ok());
        let deeper = json!({ "k": deep });
        assert!(
            check_object(deeper.as_object().unwrap(), 1 << 20)
                .unwrap_err()
                .contains("nested")
        );
        let big = json!({ "k": "x".repeat(100) });
        assert!(
            check_object(big.as_object().unwrap(), 50)
                .unwrap_err()
                .contains("bytes")
        );
    }
}
