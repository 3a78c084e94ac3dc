//! `http` steps: one HTTP request per attempt.
//!
//! **Request.** `${path}` placeholders (see [`super::template`]) are filled
//! from the step's data: percent-encoded in the URL, as text in header
//! values, and in the strings of the JSON body, where a string that is
//! exactly one placeholder takes the value with its JSON type. An empty
//! method means GET. Without a `body`, POST, PUT and PATCH send the step's
//! data. A request with a body gets `content-type: application/json` unless
//! the step sets its own.
//!
//! **Response.** A status in `expected_statuses` (empty: 200 to 299)
//! succeeds. If the body is a JSON object, the output is that object with
//! `"status"` set to the HTTP status: a `status` key of the response body is
//! replaced, because the status is always in `status` (the API's contract).
//! Any other body (array, scalar, not JSON, empty) gives
//! `{"status": 200, "body": "<the text, at most 64 KiB>"}`.
//!
//! **Failures** (the attempt's error kind): `template` (a placeholder names
//! no value), `secret_missing` (a `${secrets.NAME}` is not set),
//! `egress_denied` (the host is not allowed), `start_failed` (the filled-in URL or a header value is
//! invalid), `http_transport` (DNS, connect, TLS, broken connection, too
//! many redirects), `http_status` (`POST http://… answered 503 Service
//! Unavailable: <first 1 KiB of the body>`), `output_too_large` (a response
//! body over [`MAX_RESPONSE_BYTES`]; it is read as a stream and abandoned at
//! the limit, so a huge response costs bounded memory).
//!
//! One `system` log line per response: `GET http://… -> 200 OK in 12ms`.
//!
//! **Egress.** Before each connection the host is checked against the
//! server's allowlist (see [`crate::engine::egress`]): an IP literal as is,
//! a name by resolving it here and keeping only the allowed addresses, and
//! the request then connects only to those. Redirects (at most
//! [`MAX_REDIRECTS`]) are followed here, each hop checked the same way; a
//! hop to another origin drops every header the step set (any may carry a
//! secret) and is refused if it would repeat a body; 301, 302 and 303 turn a POST (and any 303) into a
//! GET without a body, 307 and 308 repeat the request. A refused host
//! fails the attempt with kind `egress_denied`, which is never retried.
//!
//! Each request (each hop) has a client of its own, which resolves only the
//! checked addresses: a 10 s connect timeout, no proxy from the environment,
//! rustls with the webpki roots. The step's timeout and cancellation drop
//! the request's future, which closes its connection.

use std::error::Error as _;
use std::sync::Arc;
use std::time::{Duration, Instant};

use reqwest::header::{CONTENT_LENGTH, CONTENT_TYPE, HeaderMap, HeaderName, HeaderValue, LOCATION};
use reqwest::{Method, Response, StatusCode, Url};
use serde_json::Value;

use super::template::{self, Escape, Scope};
use super::{Attempt, StepFailure};
use crate::domain::data::JsonMap;
use crate::domain::definition::HttpSpec;
use crate::domain::status::LogStream;
use crate::engine::egress::{EgressError, EgressPolicy};
use crate::engine::secrets::Secrets;

/// Largest response body read; a longer one fails the attempt.
pub const MAX_RESPONSE_BYTES: usize = 1024 * 1024;
/// Longest text kept in `{"body": ...}` for a non-object response.
pub const MAX_BODY_TEXT_BYTES: usize = 64 * 1024;
/// How much of the body an `http_status` failure message quotes.
pub const ERROR_BODY_BYTES: usize = 1024;
/// Limit for establishing a connection (TCP and TLS).
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Most redirects followed.
pub const MAX_REDIRECTS: usize = 5;

pub async fn run(
    spec: &HttpSpec,
    attempt: &Attempt<'_>,
    secrets: &Secrets,
) -> Result<JsonMap, StepFailure> {
    let scope = Scope {
        data: &attempt.input,
        secrets,
    };
    let mut request = Request::build(spec, &scope)?;
    let mut redirects = 0;
    let (mut response, shown) = loop {
        let shown = request.shown_url();
        let client = client_for(&request.url, attempt.egress).await?;
        let mut builder = client
            .request(request.method.clone(), request.url.clone())
            .headers(request.headers.clone());
        if let Some(body) = &request.body {
            builder = builder.body(body.clone());
        }
        let started = Instant::now();
        let response = builder.send().await.map_err(|e| {
            StepFailure::new(
                "http_transport",
                format!("{} {shown} failed: {}", request.method, error_chain(e)),
            )
        })?;
        let status = response.status();
        attempt.reporter.log(
            LogStream::System,
            format!(
                "{} {shown} -> {} in {}ms",
                request.method,
                status_text(status),
                started.elapsed().as_millis()
            )
            .as_bytes(),
        );
        let Some(next) = request.redirected(&response)? else {
            break (response, shown);
        };
        redirects += 1;
        if redirects > MAX_REDIRECTS {
            return Err(StepFailure::new(
                "http_transport",
                format!(
                    "{} {shown} failed: more than {MAX_REDIRECTS} redirects",
                    request.method
                ),
            ));
        }
        request = next;
    };
    let status = response.status();

    let expected = if spec.expected_statuses.is_empty() {
        (200..=299).contains(&status.as_u16())
    } else {
        spec.expected_statuses.contains(&status.as_u16())
    };
    if !expected {
        // The start of the body explains most errors; the rest is not read.
        let (start, _) = read_body(&mut response, ERROR_BODY_BYTES).await;
        let start = String::from_utf8_lossy(&start);
        let start = start.trim();
        let mut message = format!(
            "{} {shown} answered {}",
            request.method,
            status_text(status)
        );
        if !start.is_empty() {
            message = format!("{message}: {start}");
        }
        return Err(StepFailure::new("http_status", message));
    }

    let too_large = || {
        StepFailure::new(
            "output_too_large",
            format!(
                "the response body of {} {shown} is larger than {} bytes",
                request.method, MAX_RESPONSE_BYTES
            ),
        )
    };
    if response
        .content_length()
        .is_some_and(|length| length > MAX_RESPONSE_BYTES as u64)
    {
        return Err(too_large());
    }
    let (body, complete) = read_body(&mut response, MAX_RESPONSE_BYTES).await;
    match complete {
        Err(e) => Err(StepFailure::new(
            "http_transport",
            format!(
                "reading the response of {} {shown} failed: {}",
                request.method,
                error_chain(e)
            ),
        )),
        Ok(false) => Err(too_large()),
        Ok(true) => Ok(output(status, &body)),
    }
}

/// A client that connects `url`'s host only to the addresses the egress
/// policy allows, and follows no redirects.
async fn client_for(url: &Url, egress: &EgressPolicy) -> Result<reqwest::Client, StepFailure> {
    let host = url.host_str().unwrap_or_default();
    let port = url.port_or_known_default().unwrap_or(80);
    let addrs = egress.resolve(host, port).await.map_err(|e| match e {
        EgressError::Denied(message) => StepFailure::new("egress_denied", message),
        EgressError::Lookup(message) => StepFailure::new(
            "http_transport",
            format!("{} failed: {message}", shown(url)),
        ),
    })?;
    let mut builder = reqwest::Client::builder()
        .connect_timeout(CONNECT_TIMEOUT)
        .redirect(reqwest::redirect::Policy::none())
        .no_proxy()
        .user_agent(concat!("pipelined/", env!("CARGO_PKG_VERSION")))
        // Any name other than the checked one has nowhere to go.
        .dns_resolver(Arc::new(NoLookup));
    if let Some(domain) = url.domain() {
        builder = builder.resolve_to_addrs(domain, &addrs);
    }
    builder.build().map_err(|e| {
        StepFailure::new(
            "start_failed",
            format!("no HTTP client: {}", error_chain(e)),
        )
    })
}

/// A resolver that resolves nothing: a client resolves only the addresses
/// checked for it ([`reqwest::ClientBuilder::resolve_to_addrs`]).
struct NoLookup;

impl reqwest::dns::Resolve for NoLookup {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        let message = format!(
            "{} was not checked against the egress allowlist",
            name.as_str()
        );
        Box::pin(async move { Err(message.into()) })
    }
}

/// `url` without a password, for messages and logs.
fn shown(url: &Url) -> String {
    let mut url = url.clone();
    if url.password().is_some() {
        let _ = url.set_password(Some("***"));
    }
    url.to_string()
}

/// A request with its templates filled in.
struct Request {
    method: Method,
    url: Url,
    headers: HeaderMap,
    body: Option<Vec<u8>>,
}

impl Request {
    fn build(spec: &HttpSpec, data: &Scope) -> Result<Self, StepFailure> {
        let method = match spec.method.to_ascii_uppercase().as_str() {
            "" => Method::GET,
            other => Method::from_bytes(other.as_bytes()).map_err(|_| {
                StepFailure::new("start_failed", format!("invalid method '{}'", spec.method))
            })?,
        };

        let url =
            template::render(&spec.url, data, Escape::Url).map_err(|e| e.into_failure("url"))?;
        let url = Url::parse(&url)
            .ok()
            .filter(|url| matches!(url.scheme(), "http" | "https"))
            .ok_or_else(|| {
                StepFailure::new(
                    "start_failed",
                    format!("'{url}' is not a valid http:// or https:// URL"),
                )
            })?;

        let mut headers = HeaderMap::new();
        for (name, value) in &spec.headers {
            let place = format!("headers.{name}");
            let value =
                template::render(value, data, Escape::None).map_err(|e| e.into_failure(&place))?;
            let header = HeaderName::from_bytes(name.as_bytes()).map_err(|_| {
                StepFailure::new(
                    "start_failed",
                    format!("'{name}' is not a valid header name"),
                )
            })?;
            let value = HeaderValue::from_str(&value).map_err(|_| {
                StepFailure::new(
                    "start_failed",
                    format!("{place}: the value is not a valid header value"),
                )
            })?;
            headers.insert(header, value);
        }

        let body = match &spec.body {
            Some(body) => Some(template::render_object(body, data, "body")?),
            None if matches!(method, Method::POST | Method::PUT | Method::PATCH) => {
                Some(data.data.clone())
            }
            None => None,
        };
        let body = body.map(|body| {
            if !headers.contains_key(CONTENT_TYPE) {
                headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
            }
            serde_json::to_vec(&body).expect("a JSON object serializes")
        });
        Ok(Self {
            method,
            url,
            headers,
            body,
        })
    }

    /// The URL for messages and logs, without a password.
    fn shown_url(&self) -> String {
        shown(&self.url)
    }

    /// The request to make next if `response` redirects (as browsers and
    /// reqwest do); `None` if it does not.
    fn redirected(&self, response: &Response) -> Result<Option<Self>, StepFailure> {
        let status = response.status();
        if !matches!(status.as_u16(), 301 | 302 | 303 | 307 | 308) {
            return Ok(None);
        }
        let Some(location) = response.headers().get(LOCATION) else {
            return Ok(None);
        };
        let url = location
            .to_str()
            .ok()
            .and_then(|location| self.url.join(location).ok())
            .filter(|url| matches!(url.scheme(), "http" | "https"))
            .ok_or_else(|| {
                StepFailure::new(
                    "http_transport",
                    format!(
                        "{} {} failed: the redirect to {:?} is not an http:// or https:// URL",
                        self.method,
                        self.shown_url(),
                        String::from_utf8_lossy(location.as_bytes())
                    ),
                )
            })?;
        let mut headers = self.headers.clone();
        let mut method = self.method.clone();
        let mut body = self.body.clone();
        if status == StatusCode::SEE_OTHER && method != Method::HEAD
            || matches!(status.as_u16(), 301 | 302) && method == Method::POST
        {
            method = Method::GET;
            body = None;
            headers.remove(CONTENT_TYPE);
            headers.remove(CONTENT_LENGTH);
        }
        if url.origin() != self.url.origin() {
            // Any header the step set may carry a secret (`X-Api-Key:
            // ${secrets.K}`), and so may a body: another origin gets
            // neither.
            if body.is_some() {
                return Err(StepFailure::new(
                    "http_transport",
                    format!(
                        "{} {} failed: {} redirects to another origin ({}); a request with a \
                         body is not sent on to another origin",
                        self.method,
                        self.shown_url(),
                        status,
                        shown(&url)
                    ),
                ));
            }
            let content_type = headers.remove(CONTENT_TYPE);
            headers.clear();
            if let Some(value) = content_type {
                headers.insert(CONTENT_TYPE, value);
            }
        }
        Ok(Some(Self {
            method,
            url,
            headers,
            body,
        }))
    }
}

/// The step's output for a successful response.
fn output(status: StatusCode, body: &[u8]) -> JsonMap {
    let code = Value::from(status.as_u16());
    match serde_json::from_slice::<Value>(body) {
        Ok(Value::Object(mut object)) => {
            object.insert("status".to_string(), code);
            object
        }
        _ => {
            let text = String::from_utf8_lossy(body);
            let mut output = JsonMap::new();
            output.insert("status".to_string(), code);
            output.insert(
                "body".to_string(),
                Value::String(cut(&text, MAX_BODY_TEXT_BYTES).to_string()),
            );
            output
        }
    }
}

/// Reads the body, at most `limit` bytes. `Ok(true)`: all of it was read;
/// `Ok(false)`: it is longer, and the bytes read are the first `limit`.
async fn read_body(response: &mut Response, limit: usize) -> (Vec<u8>, reqwest::Result<bool>) {
    let mut body = Vec::new();
    loop {
        match response.chunk().await {
            Ok(None) => return (body, Ok(true)),
            Ok(Some(chunk)) => {
                if body.len() + chunk.len() > limit {
                    body.extend_from_slice(&chunk[..limit - body.len()]);
                    return (body, Ok(false));
                }
                body.extend_from_slice(&chunk);
            }
            Err(e) => return (body, Err(e)),
        }
    }
}

/// `text` cut to at most `limit` bytes, on a character boundary.
fn cut(text: &str, limit: usize) -> &str {
    if text.len() <= limit {
        return text;
    }
    let mut end = limit;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
}

/// `503 Service Unavailable`.
fn status_text(status: StatusCode) -> String {
    match status.canonical_reason() {
        Some(reason) => format!("{} {reason}", status.as_u16()),
        None => status.as_u16().to_string(),
    }
}

/// An error and its causes: reqwest's own message is often only
/// "error sending request"; the reason (refused, DNS, TLS) is in the causes.
fn error_chain(error: reqwest::Error) -> String {
    let error = error.without_url();
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.ends_with(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text
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

    fn spec(value: Value) -> HttpSpec {
        serde_json::from_value(value).unwrap()
    }

    fn data() -> JsonMap {
        json!({"id": 7, "name": "x\ny"})
            .as_object()
            .unwrap()
            .clone()
    }

    #[test]
    fn only_post_put_and_patch_send_the_data_without_a_body() {
        for (method, sends) in [("POST", true), ("put", true), ("PATCH", true), ("", false)] {
            let request = Request::build(
                &spec(json!({"method": method, "url": "http://h/"})),
                &scope(&data()),
            )
            .unwrap();
            assert_eq!(request.body.is_some(), sends, "{method}");
            assert_eq!(
                request.headers.contains_key(CONTENT_TYPE),
                sends,
                "{method}"
            );
        }
        let request = Request::build(
            &spec(
                json!({"method": "DELETE", "url": "http://h/", "body": {"id": "${id}"},
                "headers": {"Content-Type": "application/merge-patch+json"}}),
            ),
            &scope(&data()),
        )
        .unwrap();
        assert_eq!(request.body.unwrap(), br#"{"id":7}"#);
        assert_eq!(
            request.headers[CONTENT_TYPE], "application/merge-patch+json",
            "the step's own content-type is kept"
        );
    }

    #[test]
    fn values_that_cannot_be_sent_fail_before_the_request() {
        let header = spec(json!({"url": "http://h/", "headers": {"x-name": "${name}"}}));
        let failure = Request::build(&header, &scope(&data())).err().unwrap();
        assert_eq!(failure.kind, "start_failed");
        assert!(
            failure.message.contains("headers.x-name"),
            "{}",
            failure.message
        );
        let url = spec(json!({"url": "http://${missing}/"}));
        let failure = Request::build(&url, &scope(&data())).err().unwrap();
        assert_eq!(
            (failure.kind.as_str(), failure.message.as_str()),
            ("template", "url: the step's data has no value at 'missing'")
        );
    }

    #[test]
    fn passwords_are_hidden_in_messages() {
        let request = Request::build(
            &spec(json!({"url": "https://u:secret@h/p?id=${id}"})),
            &scope(&data()),
        )
        .unwrap();
        assert_eq!(request.shown_url(), "https://u:***@h/p?id=7");
    }

    #[test]
    fn output_is_a_json_object_or_the_text_under_body() {
        let ok = StatusCode::OK;
        assert_eq!(
            Value::Object(output(ok, br#"{"a": 1, "status": "fine"}"#)),
            json!({"a": 1, "status": 200})
        );
        assert_eq!(
            Value::Object(output(ok, b"[1, 2]")),
            json!({"status": 200, "body": "[1, 2]"})
        );
        assert_eq!(
            Value::Object(output(ok, b"")),
            json!({"status": 200, "body": ""})
        );
        let long = "é".repeat(MAX_BODY_TEXT_BYTES);
        let out = output(ok, long.as_bytes());
        let body = out["body"].as_str().unwrap();
        assert!(body.len() <= MAX_BODY_TEXT_BYTES && body.len() > MAX_BODY_TEXT_BYTES - 2);
    }
}
