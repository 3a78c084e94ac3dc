//! Placeholder until the CEL module lands.
use crate::domain::data::JsonMap;

pub const MAX_CONDITION_LEN: usize = 4096;

pub fn check(source: &str) -> Result<(), String> {
    if source.trim().is_empty() {
        return Err("must not be empty".into());
    }
    Ok(())
}

pub fn evaluate(source: &str, data: &JsonMap, _input: &JsonMap) -> Result<bool, String> {
    Ok(data.get(source).and_then(|v| v.as_bool()).unwrap_or(false))
}
