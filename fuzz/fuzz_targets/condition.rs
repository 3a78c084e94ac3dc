//! `when` conditions: checked as `CreatePipeline` does, then evaluated as the
//! executor does. The input is the condition, optionally followed by a NUL
//! byte and a JSON object used as `data` (otherwise `data` is a fixed
//! object with strings, numbers, lists and nested maps).

#![no_main]

use std::sync::LazyLock;

use libfuzzer_sys::fuzz_target;
use pipelined::domain::condition;
use pipelined::domain::data::JsonMap;
use serde_json::{Value, json};

static DATA: LazyLock<JsonMap> = LazyLock::new(|| {
    object(json!({
        "source": {"table": "orders", "schema": "public"},
        "rows": 3,
        "ratio": 0.75,
        "big": 18446744073709551615u64,
        "negative": -9223372036854775808i64,
        "tags": ["daily", "eu"],
        "name": "orders_2024",
        "enabled": true,
        "nothing": null,
        "items": [{"ok": true, "n": 1}, {"ok": false, "n": 2}],
    }))
});

static INPUT: LazyLock<JsonMap> =
    LazyLock::new(|| object(json!({"mode": "full", "limit": 10, "list": [1, 2, 3]})));

fn object(value: Value) -> JsonMap {
    match value {
        Value::Object(map) => map,
        _ => JsonMap::new(),
    }
}

fuzz_target!(|bytes: &[u8]| {
    let (source, data) = match bytes.iter().position(|&b| b == 0) {
        Some(at) => (&bytes[..at], Some(&bytes[at + 1..])),
        None => (bytes, None),
    };
    let Ok(source) = std::str::from_utf8(source) else {
        return;
    };
    let data = data
        .and_then(|json| serde_json::from_slice::<Value>(json).ok())
        .map(object)
        .unwrap_or_else(|| DATA.clone());
    let checked = condition::check(source);
    let evaluated = condition::evaluate(source, &data, &INPUT);
    for error in [checked.err(), evaluated.err()].into_iter().flatten() {
        assert!(!error.contains('\n'), "a multi-line error: {error:?}");
    }
});
