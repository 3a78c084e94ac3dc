//! `${path}` placeholders in step configuration, filled from the step's data.
//!
//! A placeholder names a value of the step's data (a JSON object) by dotted
//! path: `${source.table}`; a path segment may also index an array
//! (`${rows.0.id}`). Spaces inside the braces are ignored. `$${` is a literal
//! `${`. A path that leads nowhere is an error naming the path, and so is an
//! empty or unterminated placeholder: a request is never sent half-filled.
//!
//! Inside text a value is inserted as text: strings without quotes, anything
//! else as compact JSON (`3`, `true`, `null`, `{"a":1}`). In a JSON value
//! ([`render_json`]) a string that is exactly one placeholder takes the
//! value itself, with its JSON type.

use std::fmt;

use serde_json::Value;

use super::StepFailure;
use crate::domain::data::JsonMap;

/// Why a template could not be filled.
#[derive(Debug, Clone, PartialEq)]
pub enum TemplateError {
    /// The data has no value at this path.
    Missing(String),
    /// `${}`.
    Empty,
    /// `${` with no closing `}`; holds the text from the `${`.
    Unterminated(String),
}

impl fmt::Display for TemplateError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Missing(path) => write!(f, "the step's data has no value at '{path}'"),
            Self::Empty => f.write_str("empty placeholder '${}'"),
            Self::Unterminated(rest) => write!(
                f,
                "unterminated placeholder '{}' (write '$${{' for a literal '${{')",
                rest.chars().take(40).collect::<String>()
            ),
        }
    }
}

impl TemplateError {
    /// The attempt failure, kind `template`; `place` says where the
    /// template was (`url`, `headers.x-team`, `body.user.id`).
    pub fn into_failure(self, place: &str) -> StepFailure {
        StepFailure::new("template", format!("{place}: {self}"))
    }
}

/// How inserted text is escaped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Escape {
    /// As is.
    None,
    /// Percent-encoded: every byte but `A-Z a-z 0-9 - . _ ~`, so a value is
    /// safe as a URL path segment or query parameter.
    Url,
}

/// One piece of a parsed template.
#[derive(Debug, PartialEq)]
enum Piece<'a> {
    Text(&'a str),
    Path(&'a str),
}

fn parse(template: &str) -> Result<Vec<Piece<'_>>, TemplateError> {
    let mut pieces = Vec::new();
    let mut rest = template;
    while let Some(at) = rest.find("${") {
        if rest[..at].ends_with('$') {
            // `$${`: the text up to and including the first `$`, then `{`.
            pieces.push(Piece::Text(&rest[..at]));
            pieces.push(Piece::Text("{"));
            rest = &rest[at + 2..];
            continue;
        }
        if at > 0 {
            pieces.push(Piece::Text(&rest[..at]));
        }
        let inner = &rest[at + 2..];
        let Some(end) = inner.find('}') else {
            return Err(TemplateError::Unterminated(rest[at..].to_string()));
        };
        let path = inner[..end].trim();
        if path.is_empty() {
            return Err(TemplateError::Empty);
        }
        pieces.push(Piece::Path(path));
        rest = &inner[end + 1..];
    }
    if !rest.is_empty() {
        pieces.push(Piece::Text(rest));
    }
    Ok(pieces)
}

/// The value at a dotted path: object keys, or indexes into arrays.
pub fn lookup<'a>(data: &'a JsonMap, path: &str) -> Option<&'a Value> {
    let mut segments = path.split('.');
    let mut value = data.get(segments.next()?)?;
    for segment in segments {
        value = match value {
            Value::Object(map) => map.get(segment)?,
            Value::Array(items) => items.get(segment.parse::<usize>().ok()?)?,
            _ => return None,
        };
    }
    Some(value)
}

fn resolve<'a>(data: &'a JsonMap, path: &str) -> Result<&'a Value, TemplateError> {
    lookup(data, path).ok_or_else(|| TemplateError::Missing(path.to_string()))
}

/// `template` with every placeholder replaced by its value as text.
pub fn render(template: &str, data: &JsonMap, escape: Escape) -> Result<String, TemplateError> {
    let mut out = String::with_capacity(template.len());
    for piece in parse(template)? {
        match piece {
            Piece::Text(text) => out.push_str(text),
            Piece::Path(path) => {
                let value = resolve(data, path)?;
                let text = match value {
                    Value::String(s) => s.clone(),
                    other => other.to_string(),
                };
                match escape {
                    Escape::None => out.push_str(&text),
                    Escape::Url => percent_encode(&text, &mut out),
                }
            }
        }
    }
    Ok(out)
}

/// `value` with the placeholders in its strings (not in object keys)
/// filled; a string that is exactly one placeholder becomes the value.
/// Errors say where: `body.user.name`, `body.items.2`.
pub fn render_json(value: &Value, data: &JsonMap, place: &str) -> Result<Value, StepFailure> {
    match value {
        Value::String(template) => {
            let fail = |e: TemplateError| e.into_failure(place);
            match parse(template).map_err(fail)?.as_slice() {
                [Piece::Path(path)] => resolve(data, path).cloned().map_err(fail),
                _ => render(template, data, Escape::None)
                    .map(Value::String)
                    .map_err(fail),
            }
        }
        Value::Object(map) => render_object(map, data, place).map(Value::Object),
        Value::Array(items) => items
            .iter()
            .enumerate()
            .map(|(i, item)| render_json(item, data, &format!("{place}.{i}")))
            .collect::<Result<_, _>>()
            .map(Value::Array),
        other => Ok(other.clone()),
    }
}

/// [`render_json`] for each value of an object.
pub fn render_object(map: &JsonMap, data: &JsonMap, place: &str) -> Result<JsonMap, StepFailure> {
    map.iter()
        .map(|(key, value)| {
            Ok((
                key.clone(),
                render_json(value, data, &format!("{place}.{key}"))?,
            ))
        })
        .collect()
}

fn percent_encode(text: &str, out: &mut String) {
    const HEX: &[u8; 16] = b"0123456789ABCDEF";
    for &byte in text.as_bytes() {
        if byte.is_ascii_alphanumeric() || b"-._~".contains(&byte) {
            out.push(char::from(byte));
        } else {
            out.push('%');
            out.push(char::from(HEX[usize::from(byte >> 4)]));
            out.push(char::from(HEX[usize::from(byte & 0xf)]));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn data() -> JsonMap {
        json!({
            "id": 42,
            "name": "a b/c?d&e=f",
            "team": "data",
            "flag": true,
            "nothing": null,
            "source": {"table": "orders", "tags": ["x", "y"]},
            "rows": [{"id": 7}],
        })
        .as_object()
        .unwrap()
        .clone()
    }

    #[test]
    fn fills_text_with_strings_unquoted_and_other_values_as_json() {
        let got = render(
            "${team}:${id}:${flag}:${nothing}:${source.tags}:${ rows.0.id }",
            &data(),
            Escape::None,
        );
        assert_eq!(got.unwrap(), r#"data:42:true:null:["x","y"]:7"#);
    }

    #[test]
    fn percent_encodes_values_in_urls_but_not_the_template() {
        let got = render(
            "http://h/items/${name}?q=${team}&x=a/b",
            &data(),
            Escape::Url,
        );
        assert_eq!(
            got.unwrap(),
            "http://h/items/a%20b%2Fc%3Fd%26e%3Df?q=data&x=a/b"
        );
        let unicode = json!({"v": "é~"}).as_object().unwrap().clone();
        assert_eq!(render("${v}", &unicode, Escape::Url).unwrap(), "%C3%A9~");
    }

    #[test]
    fn a_double_dollar_escapes_a_placeholder() {
        let got = render("$${id} is ${id}, $$ and $ stay", &data(), Escape::None);
        assert_eq!(got.unwrap(), "${id} is 42, $$ and $ stay");
        assert_eq!(render("$$${id}", &data(), Escape::None).unwrap(), "$${id}");
    }

    #[test]
    fn missing_paths_and_malformed_placeholders_are_errors() {
        let render = |t: &str| render(t, &data(), Escape::None);
        assert_eq!(
            render("x ${source.missing} y"),
            Err(TemplateError::Missing("source.missing".into()))
        );
        assert_eq!(
            render("${id.deeper}"),
            Err(TemplateError::Missing("id.deeper".into()))
        );
        assert_eq!(
            render("${rows.1.id}"),
            Err(TemplateError::Missing("rows.1.id".into()))
        );
        assert_eq!(render("a ${ } b"), Err(TemplateError::Empty));
        assert_eq!(
            render("a ${id"),
            Err(TemplateError::Unterminated("${id".into()))
        );
        let failure = TemplateError::Missing("user.id".into()).into_failure("url");
        assert_eq!(failure.kind, "template");
        assert_eq!(
            failure.message,
            "url: the step's data has no value at 'user.id'"
        );
    }

    #[test]
    fn a_lone_placeholder_in_json_keeps_the_type() {
        let body = json!({
            "source": "${source}",
            "id": "${id}",
            "label": "#${id} ${source.table}",
            "list": ["${flag}", "${team}", 3],
            "${team}": "keys are not templates",
        });
        let got = render_json(&body, &data(), "body").unwrap();
        assert_eq!(
            got,
            json!({
                "source": {"table": "orders", "tags": ["x", "y"]},
                "id": 42,
                "label": "#42 orders",
                "list": [true, "data", 3],
                "${team}": "keys are not templates",
            })
        );
    }

    #[test]
    fn json_errors_say_where_the_placeholder_was() {
        let body = json!({"items": [1, {"who": "${user.name}"}]});
        let failure = render_json(&body, &data(), "body").unwrap_err();
        assert_eq!(failure.kind, "template");
        assert_eq!(
            failure.message,
            "body.items.1.who: the step's data has no value at 'user.name'"
        );
    }
}
