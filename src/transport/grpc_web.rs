//! gRPC-Web beside gRPC, for browsers: `tonic_web::GrpcWebLayer` translates
//! `application/grpc-web(-text)` requests over HTTP/1.1 (or HTTP/2) into
//! gRPC calls, and a CORS layer lets pages from the configured origins make
//! them. Plain gRPC requests pass through both untouched.
//!
//! Cross-origin access is off unless origins are named
//! (`--cors-allow-origin`): without authentication configured every caller
//! is an admin, and a server that may run `command` steps must not be
//! drivable by whatever page a browser on the same machine happens to show.
//! Pages send their bearer token in the `authorization` header. gRPC-Web's content type is not one a
//! page may send cross-origin without asking, so every such call is
//! preflighted and answered only for listed origins.

use std::time::Duration;

use anyhow::bail;
use tonic::codegen::http::{HeaderName, HeaderValue, Method};
use tower::layer::util::Stack;
use tower_http::cors::{AllowOrigin, CorsLayer};

/// Request headers a gRPC-Web client sends besides the CORS-safelisted ones.
const ALLOWED_HEADERS: [&str; 7] = [
    "authorization",
    "content-type",
    "x-grpc-web",
    "x-user-agent",
    "grpc-timeout",
    "x-request-id",
    "traceparent",
];

/// Response headers a page may read: the status of a trailers-only answer
/// (errors) travels in headers, and the request id correlates with logs.
const EXPOSED_HEADERS: [&str; 4] = [
    "grpc-status",
    "grpc-message",
    "grpc-status-details-bin",
    "x-request-id",
];

/// How long a browser may cache a preflight answer (Chromium caps it at 2 h).
const PREFLIGHT_MAX_AGE: Duration = Duration::from_secs(2 * 60 * 60);

/// The layers that serve gRPC-Web, outermost first: CORS, then the gRPC-Web
/// translation. Fails on an origin that no browser would ever send.
pub fn layer(
    allowed_origins: &[String],
) -> anyhow::Result<Stack<tonic_web::GrpcWebLayer, CorsLayer>> {
    let cors = cors(allowed_origins)?;
    if !allowed_origins.is_empty() {
        tracing::info!(origins = ?allowed_origins, "gRPC-Web calls allowed from other origins");
    }
    Ok(Stack::new(tonic_web::GrpcWebLayer::new(), cors))
}

/// CORS for gRPC-Web calls from `allowed_origins` (`*` alone: any origin).
pub fn cors(allowed_origins: &[String]) -> anyhow::Result<CorsLayer> {
    let allow_origin = if allowed_origins.iter().any(|o| o == "*") {
        if allowed_origins.len() > 1 {
            bail!("--cors-allow-origin '*' allows every origin; give it alone");
        }
        AllowOrigin::any()
    } else {
        let origins = allowed_origins
            .iter()
            .map(|origin| parse_origin(origin))
            .collect::<anyhow::Result<Vec<_>>>()?;
        AllowOrigin::list(origins)
    };
    Ok(CorsLayer::new()
        .allow_origin(allow_origin)
        .allow_methods([Method::POST])
        .allow_headers(ALLOWED_HEADERS.map(HeaderName::from_static))
        .expose_headers(EXPOSED_HEADERS.map(HeaderName::from_static))
        .max_age(PREFLIGHT_MAX_AGE))
}

/// An origin as browsers send it: `scheme://host[:port]`, nothing after.
fn parse_origin(origin: &str) -> anyhow::Result<HeaderValue> {
    let Some((scheme, rest)) = origin.split_once("://") else {
        bail!("--cors-allow-origin {origin:?} is not an origin like http://localhost:5173");
    };
    if !matches!(scheme, "http" | "https") {
        bail!("--cors-allow-origin {origin:?}: the scheme must be http or https");
    }
    if rest.is_empty() || rest.contains(['/', '?', '#', ' ', '@']) {
        bail!(
            "--cors-allow-origin {origin:?}: an origin is scheme://host[:port], \
             without a path or a trailing slash"
        );
    }
    Ok(HeaderValue::from_str(&origin.to_ascii_lowercase())?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn origins_are_checked() {
        assert!(cors(&[]).is_ok());
        assert!(cors(&["*".into()]).is_ok());
        assert!(
            cors(&[
                "http://127.0.0.1:8080".into(),
                "https://ops.example.com".into()
            ])
            .is_ok()
        );
        for bad in [
            "localhost:8080",
            "ftp://example.com",
            "http://example.com/",
            "http://example.com/app",
            "http://",
        ] {
            assert!(cors(&[bad.into()]).is_err(), "{bad} accepted");
        }
        assert!(cors(&["*".into(), "http://a.example".into()]).is_err());
    }
}
