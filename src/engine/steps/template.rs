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
//!
//! `${secrets.NAME}` is one of the server's secrets (see
//! [`crate::engine::secrets`]), resolved before the attempt starts: a path
//! whose first segment is `secrets` never reads the step's data.

use std::borrow::Cow;
use std::fmt;

use serde_json::Value;

use super::StepFailure;
use crate::domain::data::JsonMap;
use crate::domain::definition::secret_path;
use crate::engine::secrets::Secrets;

/// What placeholders are filled from: the step's data and its secrets.
#[derive(Clone, Copy)]
pub struct Scope<'a> {
    pub data: &'a JsonMap,
    pub secrets: &'a Secrets,
}

/// Why a template could not be filled.
#[derive(Debug, Clone, PartialEq)]
pub enum TemplateError {
    /// The data has no value at this path.
    Missing(String),
    /// `${}`.
    Empty,
    /// `${` with no closing `}`; holds the text from the `${`.
    Unterminated(String),
    /// `${secrets.NAME}` of a secret that was not resolved (or a bad name).
    Secret(String),
}

impl fmt::Display for TemplateError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Missing(path) => write!(f, "the step's data has no value at '{path}'"),
            Self::Empty => f.write_str("empty placeholder '${}'"),
            Self::Secret(name) => write!(f, "secret '{name}' is not set"),
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
        let kind = match self {
            Self::Secret(_) => "secret_missing",
            _ => "template",
        };
        StepFailure::new(kind, format!("{place}: {self}"))
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

fn resolve<'a>(scope: &Scope<'a>, path: &str) -> Result<Cow<'a, Value>, TemplateError> {
    if let Some(name) = secret_path(path) {
        return scope
            .secrets
            .get(name)
            .map(|value| Cow::Owned(Value::String(value.to_string())))
            .ok_or_else(|| TemplateError::Secret(name.to_string()));
    }
    lookup(scope.data, path)
        .map(Cow::Borrowed)
        .ok_or_else(|| TemplateError::Missing(path.to_string()))
}

/// `template` with every placeholder replaced by its value as text.
pub fn render(template: &str, data: &Scope, escape: Escape) -> Result<String, TemplateError> {
    let mut out = String::with_capacity(template.len());
    for piece in parse(template)? {
        match piece {
            Piece::Text(text) => out.push_str(text),
            Piece::Path(path) => {
                let value = resolve(data, path)?;
                let text = match value.as_ref() {
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
pub fn render_json(value: &Value, data: &Scope, place: &str) -> Result<Value, StepFailure> {
    match value {
        Value::String(template) => {
            let fail = |e: TemplateError| e.into_failure(place);
            match parse(template).map_err(fail)?.as_slice() {
                [Piece::Path(path)] => resolve(data, path).map(Cow::into_owned).map_err(fail),
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
pub fn render_object(map: &JsonMap, data: &Scope, place: &str) -> Result<JsonMap, StepFailure> {
    map.iter()
        .map(|(key, value)| {
            Ok((
                key.clone(),
                render_json(value, data, &format!("{place}.{key}"))?,
            ))
        })
        .collect()
}

/// In a field that is not a template (a `command` step's `env`, a `grpc`
/// step's `metadata`): `text` with its `${secrets.NAME}` placeholders
/// filled and everything else as written, except that `$${secrets.` is a
/// literal `${secrets.`.
pub fn fill_secrets(text: &str, secrets: &Secrets, place: &str) -> Result<String, StepFailure> {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(at) = rest.find("${") {
        let inner = &rest[at + 2..];
        let Some(end) = inner.find('}') else { break };
        let path = inner[..end].trim();
        match secret_path(path) {
            Some(_) if rest[..at].ends_with('$') => {
                out.push_str(&rest[..at - 1]);
                out.push_str("${");
                rest = inner;
            }
            Some(name) => {
                out.push_str(&rest[..at]);
                let value = secrets
                    .get(name)
                    .ok_or_else(|| TemplateError::Secret(name.to_string()).into_failure(place))?;
                out.push_str(value);
                rest = &inner[end + 1..];
            }
            None => {
                out.push_str(&rest[..at + 2]);
                rest = inner;
            }
        }
    }
    out.push_str(rest);
    Ok(out)
}

/// Percent-encodes every byte but `A-Z a-z 0-9 - . _ ~`.
pub(crate) fn percent_encode(text: &str, out: &mut String) {
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

    static NO_SECRETS: Secrets = Secrets::empty();

    fn scope(data: &JsonMap) -> Scope<'_> {
        Scope {
            data,
            secrets: &NO_SECRETS,
        }
    }

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
            &scope(&data()),
            Escape::None,
        );
        assert_eq!(got.unwrap(), r#"data:42:true:null:["x","y"]:7"#);
    }

    #[test]
    fn percent_encodes_values_in_urls_but_not_the_template() {
        let got = render(
            "http://h/items/${name}?q=${team}&x=a/b",
            &scope(&data()),
            Escape::Url,
        );
        assert_eq!(
            got.unwrap(),
            "http://h/items/a%20b%2Fc%3Fd%26e%3Df?q=data&x=a/b"
        );
        let unicode = json!({"v": "é~"}).as_object().unwrap().clone();
        assert_eq!(
            render("${v}", &scope(&unicode), Escape::Url).unwrap(),
            "%C3%A9~"
        );
    }

    #[test]
    fn a_double_dollar_escapes_a_placeholder() {
        let got = render(
            "$${id} is ${id}, $$ and $ stay",
            &scope(&data()),
            Escape::None,
        );
        assert_eq!(got.unwrap(), "${id} is 42, $$ and $ stay");
        assert_eq!(
            render("$$${id}", &scope(&data()), Escape::None).unwrap(),
            "$${id}"
        );
    }

    #[test]
    fn missing_paths_and_malformed_placeholders_are_errors() {
        let render = |t: &str| render(t, &scope(&data()), Escape::None);
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
        let got = render_json(&body, &scope(&data()), "body").unwrap();
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
        let failure = render_json(&body, &scope(&data()), "body").unwrap_err();
        assert_eq!(failure.kind, "template");
        assert_eq!(
            failure.message,
            "body.items.1.who: the step's data has no value at 'user.name'"
        );
    }

    #[test]
    fn secrets_come_from_the_secrets_never_from_the_data() {
        let secrets = Secrets::from_pairs([("TOKEN", "s/1")]);
        let data = json!({"secrets": {"TOKEN": "from-data", "OTHER": "x"}, "id": 1})
            .as_object()
            .unwrap()
            .clone();
        let scope = Scope {
            data: &data,
            secrets: &secrets,
        };
        assert_eq!(
            render(
                "Bearer ${secrets.TOKEN} ${ secrets.TOKEN }",
                &scope,
                Escape::None
            )
            .unwrap(),
            "Bearer s/1 s/1"
        );
        assert_eq!(
            render("http://h/?t=${secrets.TOKEN}", &scope, Escape::Url).unwrap(),
            "http://h/?t=s%2F1"
        );
        assert_eq!(
            render("${secrets.OTHER}", &scope, Escape::None),
            Err(TemplateError::Secret("OTHER".into()))
        );
        let failure = render_json(&json!("${secrets.OTHER}"), &scope, "body.x").unwrap_err();
        assert_eq!(failure.kind, "secret_missing");
        assert_eq!(failure.message, "body.x: secret 'OTHER' is not set");
        assert_eq!(
            render_json(&json!("${secrets.TOKEN}"), &scope, "body").unwrap(),
            json!("s/1")
        );
    }

    #[test]
    fn fields_that_are_not_templates_fill_only_secrets() {
        let secrets = Secrets::from_pairs([("K", "v")]);
        assert_eq!(
            fill_secrets(
                "a ${secrets.K} ${HOME} $${secrets.K} $${x} ${secrets.K",
                &secrets,
                "env.X"
            )
            .unwrap(),
            "a v ${HOME} ${secrets.K} $${x} ${secrets.K"
        );
        let failure = fill_secrets("${secrets.NOPE}", &secrets, "env.X").unwrap_err();
        assert_eq!(failure.kind, "secret_missing");
    }
}
