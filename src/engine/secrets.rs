//! Secrets for steps: `${secrets.NAME}` in step configuration.
//!
//! A definition stores only the reference; the value is read when an attempt
//! starts (so a rotated secret is picked up by the next attempt) from, in
//! this order:
//!
//! 1. the server's environment variable `PIPELINED_SECRET_<NAME>`;
//! 2. the file `<secrets-dir>/<NAME>` (`--secrets-dir`), without its
//!    trailing newline.
//!
//! Names are `[A-Za-z0-9_]+`, matched exactly (case counts). Values never
//! come from execution data: the first path segment `secrets` of a
//! placeholder always means the server's secrets, so an input
//! `{"secrets": {...}}` cannot stand in for one (and cannot be read with
//! `${secrets...}` either).
//!
//! Every value resolved for an attempt is replaced by `***` in what the
//! attempt reports: its log lines and progress messages, its output and its
//! failure message ([`Redactor`]). Command steps do not inherit the
//! server's `PIPELINED_SECRET_*` variables; they get a secret only through
//! `${secrets.NAME}` in their `env`.

use std::borrow::Cow;
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use serde_json::Value;

use super::steps::StepFailure;
use crate::domain::data::JsonMap;
use crate::domain::definition::is_secret_name;

/// The prefix of environment variables holding secrets.
pub const ENV_PREFIX: &str = "PIPELINED_SECRET_";
/// What a secret's value is replaced with.
pub const MASK: &str = "***";

/// Where secrets come from.
#[derive(Debug, Clone, Default)]
pub struct SecretStore {
    dir: Option<PathBuf>,
}

impl SecretStore {
    /// Secrets from the environment and, if given, files in `dir`.
    pub fn new(dir: Option<PathBuf>) -> Self {
        Self { dir }
    }

    pub fn dir(&self) -> Option<&Path> {
        self.dir.as_deref()
    }

    /// The values of `names`; the first one missing fails with kind
    /// `secret_missing`, naming the secret and how to provide it.
    pub async fn resolve(&self, names: &BTreeSet<&str>) -> Result<Secrets, StepFailure> {
        let mut values = BTreeMap::new();
        for &name in names {
            let value = self.get(name).await?;
            values.insert(name.to_string(), value);
        }
        Ok(Secrets(values))
    }

    async fn get(&self, name: &str) -> Result<String, StepFailure> {
        if !is_secret_name(name) {
            return Err(StepFailure::new(
                "secret_missing",
                format!(
                    "'{name}' is not a valid secret name: use letters, digits and '_' in ${{secrets.NAME}}"
                ),
            ));
        }
        if let Some(value) = std::env::var_os(format!("{ENV_PREFIX}{name}")) {
            return value.into_string().map_err(|_| {
                StepFailure::new(
                    "secret_missing",
                    format!("secret '{name}': the environment variable {ENV_PREFIX}{name} is not valid UTF-8"),
                )
            });
        }
        let Some(dir) = &self.dir else {
            return Err(StepFailure::new(
                "secret_missing",
                format!(
                    "secret '{name}' is not set: set the environment variable {ENV_PREFIX}{name} \
                     for the server, or start it with --secrets-dir DIR and write the value to DIR/{name}"
                ),
            ));
        };
        let path = dir.join(name);
        match tokio::fs::read_to_string(&path).await {
            Ok(text) => Ok(text
                .strip_suffix('\n')
                .map(|t| t.strip_suffix('\r').unwrap_or(t))
                .unwrap_or(&text)
                .to_string()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Err(StepFailure::new(
                "secret_missing",
                format!(
                    "secret '{name}' is not set: write it to {} or set the environment variable \
                     {ENV_PREFIX}{name} for the server",
                    path.display()
                ),
            )),
            Err(e) => Err(StepFailure::new(
                "secret_missing",
                format!("secret '{name}': cannot read {}: {e}", path.display()),
            )),
        }
    }
}

/// The secrets resolved for one attempt, by name.
#[derive(Debug, Clone, Default)]
pub struct Secrets(BTreeMap<String, String>);

impl Secrets {
    /// No secrets.
    pub const fn empty() -> Self {
        Self(BTreeMap::new())
    }

    /// Secrets given as (name, value) pairs.
    pub fn from_pairs<'a>(pairs: impl IntoIterator<Item = (&'a str, &'a str)>) -> Self {
        Self(
            pairs
                .into_iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        )
    }

    pub fn get(&self, name: &str) -> Option<&str> {
        self.0.get(name).map(String::as_str)
    }

    /// A redactor of these values.
    pub fn redactor(&self) -> Redactor {
        Redactor::new(self.0.values().map(String::as_str))
    }
}

/// Replaces secret values with `***`: each value as is, percent-encoded (as
/// it appears in a URL) and JSON-escaped.
#[derive(Debug, Clone, Default)]
pub struct Redactor {
    /// Longest first, so a value containing another is masked whole.
    patterns: Vec<String>,
}

impl Redactor {
    pub fn new<'a>(values: impl IntoIterator<Item = &'a str>) -> Self {
        let mut patterns = BTreeSet::new();
        for value in values.into_iter().filter(|v| !v.is_empty()) {
            patterns.insert(value.to_string());
            let mut encoded = String::new();
            super::steps::percent_encode(value, &mut encoded);
            patterns.insert(encoded);
            let json = Value::String(value.to_string()).to_string();
            patterns.insert(json[1..json.len() - 1].to_string());
        }
        let mut patterns: Vec<String> = patterns.into_iter().collect();
        patterns.sort_by_key(|p| std::cmp::Reverse(p.len()));
        Self { patterns }
    }

    pub fn is_empty(&self) -> bool {
        self.patterns.is_empty()
    }

    /// `text` with every secret value masked.
    pub fn text<'a>(&self, text: &'a str) -> Cow<'a, str> {
        let mut out = Cow::Borrowed(text);
        for pattern in &self.patterns {
            if out.contains(pattern.as_str()) {
                out = Cow::Owned(out.replace(pattern.as_str(), MASK));
            }
        }
        out
    }

    /// `value` with every string (and object key) masked.
    pub fn json(&self, value: Value) -> Value {
        match value {
            Value::String(s) => Value::String(self.text(&s).into_owned()),
            Value::Array(items) => Value::Array(items.into_iter().map(|v| self.json(v)).collect()),
            Value::Object(map) => Value::Object(self.object(map)),
            other => other,
        }
    }

    pub fn object(&self, map: JsonMap) -> JsonMap {
        if self.is_empty() {
            return map;
        }
        map.into_iter()
            .map(|(k, v)| (self.text(&k).into_owned(), self.json(v)))
            .collect()
    }

    pub fn failure(&self, failure: StepFailure) -> StepFailure {
        StepFailure {
            kind: failure.kind,
            message: self.text(&failure.message).into_owned(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn masks_plain_url_encoded_and_json_escaped_values() {
        let redactor = Redactor::new(["s3cr3t/+", "a\"b", ""]);
        assert_eq!(
            redactor.text("token s3cr3t/+ in url ?t=s3cr3t%2F%2B and a\\\"b"),
            "token *** in url ?t=*** and ***"
        );
        assert_eq!(redactor.text("nothing"), "nothing");
        let value = redactor.object(
            json!({"echo": "Bearer s3cr3t/+", "list": ["a\"b", 1], "s3cr3t/+": true})
                .as_object()
                .unwrap()
                .clone(),
        );
        assert_eq!(
            Value::Object(value),
            json!({"echo": "Bearer ***", "list": ["***", 1], "***": true})
        );
        let failure =
            redactor.failure(StepFailure::new("x", "GET http://h/?k=s3cr3t%2F%2B failed"));
        assert_eq!(failure.message, "GET http://h/?k=*** failed");
    }

    #[tokio::test]
    async fn files_are_read_without_their_newline_and_missing_ones_say_how_to_set_them() {
        let dir = std::env::temp_dir().join(format!("pipelined-secrets-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("TOKEN_A"), "abc\n").unwrap();
        let store = SecretStore::new(Some(dir.clone()));
        let names = BTreeSet::from(["TOKEN_A"]);
        assert_eq!(
            store.resolve(&names).await.unwrap().get("TOKEN_A"),
            Some("abc")
        );
        let failure = store
            .resolve(&BTreeSet::from(["NOPE_NOT_SET_ANYWHERE"]))
            .await
            .unwrap_err();
        assert_eq!(failure.kind, "secret_missing");
        assert!(
            failure
                .message
                .contains("PIPELINED_SECRET_NOPE_NOT_SET_ANYWHERE"),
            "{}",
            failure.message
        );
        assert!(
            failure
                .message
                .contains(&dir.join("NOPE_NOT_SET_ANYWHERE").display().to_string())
        );
        let failure = SecretStore::default()
            .resolve(&BTreeSet::from(["x-y"]))
            .await
            .unwrap_err();
        assert!(
            failure.message.contains("not a valid secret name"),
            "{}",
            failure.message
        );
        std::fs::remove_dir_all(dir).ok();
    }
}
