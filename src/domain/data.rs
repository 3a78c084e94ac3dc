//! The data-merge rule shared by step inputs and `execution_data`.
//!
//! `merge(base, overlay)` deep-merges JSON objects: keys of `overlay` are added
//! to `base`; where both hold an object the two are merged recursively; any
//! other value (scalar, array, null) from `overlay` replaces the one in `base`.
//! Layers are always applied in the execution's step order (a fixed
//! topological order, see [`crate::domain::definition::Graph`]), never in
//! completion order, so two parallel steps writing the same key always resolve
//! the same way: the step later in the order wins.

use serde_json::{Map, Value};

pub type JsonMap = Map<String, Value>;

/// Deep-merges `overlay` into `base`.
pub fn merge(base: &mut JsonMap, overlay: &JsonMap) {
    for (key, value) in overlay {
        match (base.get_mut(key), value) {
            (Some(Value::Object(existing)), Value::Object(incoming)) => merge(existing, incoming),
            _ => {
                base.insert(key.clone(), value.clone());
            }
        }
    }
}

/// `input` with every layer merged over it, in the order given.
pub fn layered<'a>(input: &JsonMap, layers: impl IntoIterator<Item = &'a JsonMap>) -> JsonMap {
    let mut data = input.clone();
    for layer in layers {
        merge(&mut data, layer);
    }
    data
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn obj(v: Value) -> JsonMap {
        v.as_object().unwrap().clone()
    }

    #[test]
    fn objects_merge_recursively_and_other_values_replace() {
        let mut base = obj(json!({"a": {"x": 1, "y": [1]}, "b": 1}));
        merge(
            &mut base,
            &obj(json!({"a": {"y": [2], "z": null}, "c": "new"})),
        );
        assert_eq!(
            Value::Object(base),
            json!({"a": {"x": 1, "y": [2], "z": null}, "b": 1, "c": "new"})
        );
    }

    #[test]
    fn later_layer_wins() {
        let input = obj(json!({"k": 0}));
        let first = obj(json!({"k": 1}));
        let second = obj(json!({"k": 2}));
        assert_eq!(layered(&input, [&first, &second])["k"], json!(2));
    }
}
