//! Authentication and authorization of calls: a tower layer that finds out
//! who the caller is from its `authorization: Bearer <token>` header, checks
//! that the caller's role allows the RPC ([`access::required_role`]), and
//! hands the caller ([`Caller`]) to the handlers in the request's
//! extensions.
//!
//! A bearer token is either one of the static tokens of the token file
//! (`<name> <role> <sha256-hex>` lines; only hashes are kept, and a
//! presented token's hash is compared with every one in constant time) or,
//! when a JWKS is configured, a JWT signed by one of its keys, with the
//! configured issuer and audience, not expired; its `sub` is the caller's
//! name and a claim (`role` by default) its role.
//!
//! Health checks and reflection need no credentials: load balancers and
//! orchestrators probe health without any, and reflection only describes
//! the API, whose protos are published with the clients anyway; it reveals
//! no data, and tools (grpcurl) need it before they can form a call.
//!
//! With neither tokens nor a JWKS, authentication is off and every caller is
//! an admin named `anonymous`.
//!
//! Refusals are answered here: UNAUTHENTICATED (missing, unknown or invalid
//! credentials, saying which) and PERMISSION_DENIED (a role too low, which
//! also goes to the audit trail). The layer sits inside gRPC-Web's, so
//! browsers' calls are checked the same way.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::task::{Context, Poll};

use anyhow::{Context as _, bail};
use futures::future::BoxFuture;
use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, JwkSet, PublicKeyUse};
use jsonwebtoken::{Algorithm, DecodingKey, Validation, errors::ErrorKind};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use tonic::Status;
use tonic::codegen::http::{HeaderMap, Request, Response};
use tower::{Layer, Service};

use crate::domain::access::{self, AuditEvent, Caller, Role};
use crate::domain::model;
use crate::storage::audit::AuditLog;

use super::request_context::REQUEST_ID;

/// The gRPC service whose methods [`access::required_role`] knows.
const PIPELINE_SERVICE: &str = "/pipeline.v1.PipelineService/";

/// Services open to every caller; see the module documentation.
const OPEN_SERVICES: [&str; 3] = [
    "/grpc.health.v1.Health/",
    "/grpc.reflection.v1.ServerReflection/",
    "/grpc.reflection.v1alpha.ServerReflection/",
];

/// How authentication is configured; all unset: off.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuthConfig {
    /// File of static tokens, `<name> <role> <sha256-hex>` per line.
    pub tokens_file: Option<PathBuf>,
    /// JWKS file whose keys may sign JWTs; turns JWT authentication on.
    pub jwt_jwks: Option<PathBuf>,
    /// The `iss` a JWT must have (required with a JWKS).
    pub jwt_issuer: Option<String>,
    /// An `aud` a JWT must have (required with a JWKS).
    pub jwt_audience: Option<String>,
    /// The JWT claim holding the caller's role.
    pub jwt_role_claim: String,
}

impl Default for AuthConfig {
    fn default() -> Self {
        Self {
            tokens_file: None,
            jwt_jwks: None,
            jwt_issuer: None,
            jwt_audience: None,
            jwt_role_claim: "role".to_string(),
        }
    }
}

/// Why a call's credentials were refused; each becomes UNAUTHENTICATED with
/// this text (see `status.rs`).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum AuthError {
    #[error("no credentials: send the header `authorization: Bearer <token>`")]
    Missing,
    #[error("the authorization header is not `Bearer <token>`")]
    NotBearer,
    #[error("unknown token")]
    UnknownToken,
    #[error("invalid JWT: {0}")]
    Jwt(String),
}

/// The hex SHA-256 of a token, as the token file holds it.
pub fn hash_token(token: &str) -> String {
    hex::encode(Sha256::digest(token.as_bytes()))
}

/// A new random token: 32 bytes from the operating system, in hex.
pub fn generate_token() -> anyhow::Result<String> {
    let mut bytes = [0u8; 32];
    getrandom::fill(&mut bytes).map_err(|e| anyhow::anyhow!("no random bytes: {e}"))?;
    Ok(hex::encode(bytes))
}

struct StaticToken {
    name: String,
    role: Role,
    hash: [u8; 32],
}

struct JwtKey {
    kid: Option<String>,
    algorithms: Vec<Algorithm>,
    key: DecodingKey,
}

struct JwtSettings {
    keys: Vec<JwtKey>,
    issuer: String,
    audience: String,
    role_claim: String,
}

/// Checks credentials; built from an [`AuthConfig`].
pub struct Authenticator {
    tokens: Vec<StaticToken>,
    jwt: Option<JwtSettings>,
}

impl Authenticator {
    /// Reads the token file and the JWKS; `None` when authentication is off.
    pub fn load(config: &AuthConfig) -> anyhow::Result<Option<Self>> {
        if config.jwt_jwks.is_none()
            && (config.jwt_issuer.is_some() || config.jwt_audience.is_some())
        {
            bail!("--jwt-issuer and --jwt-audience need --jwt-jwks");
        }
        let tokens = match &config.tokens_file {
            Some(path) => read_tokens(path)?,
            None => Vec::new(),
        };
        let jwt = match &config.jwt_jwks {
            Some(path) => {
                let (Some(issuer), Some(audience)) = (&config.jwt_issuer, &config.jwt_audience)
                else {
                    bail!(
                        "--jwt-jwks needs --jwt-issuer and --jwt-audience: without them any \
                         token the key owner ever signed, for any service, would be accepted"
                    );
                };
                if config.jwt_role_claim.is_empty() {
                    bail!("--jwt-role-claim must not be empty");
                }
                Some(JwtSettings {
                    keys: read_jwks(path)?,
                    issuer: issuer.clone(),
                    audience: audience.clone(),
                    role_claim: config.jwt_role_claim.clone(),
                })
            }
            None => None,
        };
        if config.tokens_file.is_none() && jwt.is_none() {
            return Ok(None);
        }
        Ok(Some(Self { tokens, jwt }))
    }

    /// Who sent `headers`, or why they are refused.
    pub fn authenticate(&self, headers: &HeaderMap) -> Result<Caller, AuthError> {
        let value = headers.get("authorization").ok_or(AuthError::Missing)?;
        let value = value.to_str().map_err(|_| AuthError::NotBearer)?;
        let (scheme, token) = value.split_once(' ').ok_or(AuthError::NotBearer)?;
        let token = token.trim();
        if !scheme.eq_ignore_ascii_case("bearer") || token.is_empty() {
            return Err(AuthError::NotBearer);
        }
        if let Some(caller) = self.static_token(token) {
            return Ok(caller);
        }
        match &self.jwt {
            Some(jwt) if token.split('.').count() == 3 => jwt.verify(token),
            _ => Err(AuthError::UnknownToken),
        }
    }

    /// The static token whose hash is `token`'s: every hash is compared, in
    /// constant time, so timing tells nothing about which one is close.
    fn static_token(&self, token: &str) -> Option<Caller> {
        let hash: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        let mut found = None;
        for entry in &self.tokens {
            if bool::from(entry.hash.ct_eq(&hash)) {
                found = Some(entry);
            }
        }
        found.map(|entry| Caller {
            name: entry.name.clone(),
            role: entry.role,
        })
    }
}

impl JwtSettings {
    fn verify(&self, token: &str) -> Result<Caller, AuthError> {
        let header = jsonwebtoken::decode_header(token).map_err(jwt_error)?;
        // Without a `kid`, every key of the algorithm is a candidate (during
        // a key rotation the JWKS holds the old and the new key).
        let candidates = self.keys.iter().filter(|key| {
            key.algorithms.contains(&header.alg) && (header.kid.is_none() || key.kid == header.kid)
        });
        let mut claims = None;
        let mut failure = None;
        for key in candidates {
            let mut validation = Validation::new(header.alg);
            validation.algorithms = key.algorithms.clone();
            validation.set_issuer(&[&self.issuer]);
            validation.set_audience(&[&self.audience]);
            validation.validate_nbf = true;
            validation.required_spec_claims =
                HashSet::from(["exp", "iss", "aud", "sub"].map(String::from));
            match jsonwebtoken::decode::<serde_json::Map<String, serde_json::Value>>(
                token,
                &key.key,
                &validation,
            ) {
                Ok(decoded) => {
                    claims = Some(decoded.claims);
                    break;
                }
                // Another key may have signed it; any other problem is the token's.
                Err(error) if matches!(error.kind(), ErrorKind::InvalidSignature) => {
                    failure = Some(jwt_error(error));
                }
                Err(error) => return Err(jwt_error(error)),
            }
        }
        let claims = match (claims, failure) {
            (Some(claims), _) => claims,
            (None, Some(failure)) => return Err(failure),
            (None, None) => {
                return Err(AuthError::Jwt(match &header.kid {
                    Some(kid) => format!(
                        "no key '{}' for {:?} in the JWKS",
                        crate::domain::error::preview(kid),
                        header.alg
                    ),
                    None => format!("no key for {:?} in the JWKS", header.alg),
                }));
            }
        };
        let name = claims
            .get("sub")
            .and_then(|sub| sub.as_str())
            .filter(|sub| !sub.is_empty())
            .ok_or_else(|| AuthError::Jwt("the 'sub' claim is not a name".into()))?;
        let role = match claims.get(&self.role_claim) {
            Some(serde_json::Value::String(role)) => Role::parse(role),
            // A list of roles (as some identity providers send): the highest known.
            Some(serde_json::Value::Array(roles)) => roles
                .iter()
                .filter_map(|r| r.as_str().and_then(Role::parse))
                .max(),
            _ => None,
        }
        .ok_or_else(|| {
            AuthError::Jwt(format!(
                "the '{}' claim names none of the roles {}",
                self.role_claim,
                Role::NAMES.join(", ")
            ))
        })?;
        Ok(Caller {
            name: name.to_string(),
            role,
        })
    }
}

fn jwt_error(error: jsonwebtoken::errors::Error) -> AuthError {
    AuthError::Jwt(match error.kind() {
        ErrorKind::ExpiredSignature => "it has expired".into(),
        ErrorKind::ImmatureSignature => "it is not valid yet (nbf)".into(),
        ErrorKind::InvalidAudience => "wrong audience".into(),
        ErrorKind::InvalidIssuer => "wrong issuer".into(),
        ErrorKind::InvalidSignature => "bad signature".into(),
        ErrorKind::InvalidAlgorithm => "its algorithm does not match the key".into(),
        ErrorKind::MissingRequiredClaim(claim) => format!("the '{claim}' claim is missing"),
        ErrorKind::InvalidClaimFormat(claim) => format!("the '{claim}' claim is malformed"),
        _ => format!("malformed: {error}"),
    })
}

/// Reads a token file: `<name> <role> <sha256-hex>` per line, `#` comments.
fn read_tokens(path: &Path) -> anyhow::Result<Vec<StaticToken>> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read the token file {}", path.display()))?;
    let mut tokens: Vec<StaticToken> = Vec::new();
    for (number, line) in text.lines().enumerate() {
        let line = line.split('#').next().unwrap_or_default().trim();
        if line.is_empty() {
            continue;
        }
        let at = || format!("{}:{}", path.display(), number + 1);
        let fields: Vec<&str> = line.split_whitespace().collect();
        let [name, role, hash] = fields[..] else {
            bail!("{}: expected `<name> <role> <sha256-hex>`", at());
        };
        let role = Role::parse(role).with_context(|| {
            format!(
                "{}: unknown role '{role}' (one of {})",
                at(),
                Role::NAMES.join(", ")
            )
        })?;
        let hash: [u8; 32] = hex::decode(hash)
            .ok()
            .and_then(|bytes| bytes.try_into().ok())
            .with_context(|| {
                format!(
                    "{}: the hash must be 64 hex digits, the SHA-256 of the token \
                     (`pipelined hash-token` makes it)",
                    at()
                )
            })?;
        if tokens.iter().any(|t| t.hash == hash) {
            bail!("{}: the same token is listed twice", at());
        }
        tokens.push(StaticToken {
            name: name.to_string(),
            role,
            hash,
        });
    }
    Ok(tokens)
}

/// Reads a JWKS file: its signing keys, each with the algorithms it may
/// verify (its `alg`, or those of its key type).
fn read_jwks(path: &Path) -> anyhow::Result<Vec<JwtKey>> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read the JWKS {}", path.display()))?;
    let set: JwkSet = serde_json::from_str(&text).with_context(|| {
        format!(
            "{} is not a JWKS (a JSON {{\"keys\": [...]}})",
            path.display()
        )
    })?;
    let mut keys = Vec::new();
    for (i, jwk) in set.keys.iter().enumerate() {
        let what = || format!("{}: key {i}", path.display());
        if matches!(
            jwk.common.public_key_use,
            Some(PublicKeyUse::Encryption | PublicKeyUse::Other(_))
        ) {
            continue;
        }
        let by_type: Vec<Algorithm> = match &jwk.algorithm {
            AlgorithmParameters::RSA(_) => vec![
                Algorithm::RS256,
                Algorithm::RS384,
                Algorithm::RS512,
                Algorithm::PS256,
                Algorithm::PS384,
                Algorithm::PS512,
            ],
            AlgorithmParameters::EllipticCurve(ec) => match ec.curve {
                EllipticCurve::P256 => vec![Algorithm::ES256],
                EllipticCurve::P384 => vec![Algorithm::ES384],
                _ => bail!("{}: unsupported curve {:?}", what(), ec.curve),
            },
            AlgorithmParameters::OctetKeyPair(okp) if okp.curve == EllipticCurve::Ed25519 => {
                vec![Algorithm::EdDSA]
            }
            AlgorithmParameters::OctetKeyPair(okp) => {
                bail!("{}: unsupported curve {:?}", what(), okp.curve)
            }
            AlgorithmParameters::OctetKey(_) => bail!(
                "{}: symmetric (oct) keys are not accepted; use RSA, EC or Ed25519 keys",
                what()
            ),
            _ => bail!("{}: unsupported key type", what()),
        };
        let algorithms = match jwk.common.key_algorithm {
            Some(alg) => {
                let alg = Algorithm::try_from(alg)
                    .ok()
                    .filter(|alg| by_type.contains(alg))
                    .with_context(|| format!("{}: alg {alg} does not fit its key type", what()))?;
                vec![alg]
            }
            None => by_type,
        };
        let key = DecodingKey::from_jwk(jwk).with_context(what)?;
        keys.push(JwtKey {
            kid: jwk.common.key_id.clone(),
            algorithms,
            key,
        });
    }
    if keys.is_empty() {
        bail!("{} has no signing key", path.display());
    }
    Ok(keys)
}

/// Authenticates and authorizes calls; see the module documentation.
#[derive(Clone)]
pub struct AuthLayer {
    auth: Option<Arc<Authenticator>>,
    audit: AuditLog,
}

impl AuthLayer {
    /// `auth`: `None` turns authentication off (everyone is an anonymous
    /// admin). Refusals by role go to `audit`.
    pub fn new(auth: Option<Authenticator>, audit: AuditLog) -> Self {
        Self {
            auth: auth.map(Arc::new),
            audit,
        }
    }
}

impl<S> Layer<S> for AuthLayer {
    type Service = Auth<S>;

    fn layer(&self, inner: S) -> Auth<S> {
        Auth {
            inner,
            auth: self.auth.clone(),
            audit: self.audit.clone(),
        }
    }
}

/// The service of [`AuthLayer`].
#[derive(Clone)]
pub struct Auth<S> {
    inner: S,
    auth: Option<Arc<Authenticator>>,
    audit: AuditLog,
}

/// The RPC's name for a method of `PipelineService`; the whole path for
/// anything else (which then needs the admin role).
pub fn method_name(path: &str) -> &str {
    path.strip_prefix(PIPELINE_SERVICE).unwrap_or(path)
}

impl<S, ReqBody, ResBody> Service<Request<ReqBody>> for Auth<S>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>>,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    ResBody: Default + Send + 'static,
{
    type Response = Response<ResBody>;
    type Error = S::Error;
    type Future = BoxFuture<'static, Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: Request<ReqBody>) -> Self::Future {
        let path = request.uri().path();
        if OPEN_SERVICES.iter().any(|open| path.starts_with(open)) {
            return Box::pin(self.inner.call(request));
        }
        let caller = match &self.auth {
            None => Caller::anonymous(),
            Some(auth) => match auth.authenticate(request.headers()) {
                Ok(caller) => caller,
                Err(error) => {
                    tracing::info!(%error, "call refused: not authenticated");
                    let status = Status::from(error);
                    return Box::pin(async move { Ok(status.into_http()) });
                }
            },
        };
        let method = method_name(path).to_string();
        if let Err(denied) = access::authorize(&caller, &method) {
            let status = Status::from(denied);
            tracing::info!(caller = %caller.name, role = %caller.role, message = %status.message(), "call refused");
            self.audit.record(AuditEvent {
                id: uuid::Uuid::now_v7().to_string(),
                time: model::now(),
                caller: caller.name,
                role: caller.role,
                method: access::clip(method),
                target: String::new(),
                request_id: request_id(request.headers()),
                code: super::status::code_name(status.code()).to_string(),
                message: status.message().to_string(),
            });
            return Box::pin(async move { Ok(status.into_http()) });
        }
        request.extensions_mut().insert(caller);
        Box::pin(self.inner.call(request))
    }
}

/// The call's request id (set by the request context layer).
pub fn request_id(headers: &HeaderMap) -> String {
    headers
        .get(REQUEST_ID)
        .and_then(|id| id.to_str().ok())
        .unwrap_or_default()
        .to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use tonic::codegen::http::HeaderValue;

    fn authenticator(lines: &str) -> (tempfile::TempDir, Authenticator) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tokens");
        std::fs::write(&path, lines).unwrap();
        let auth = Authenticator::load(&AuthConfig {
            tokens_file: Some(path),
            ..AuthConfig::default()
        })
        .unwrap()
        .unwrap();
        (dir, auth)
    }

    fn bearer(value: &str) -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert("authorization", HeaderValue::from_str(value).unwrap());
        headers
    }

    #[test]
    fn static_tokens() {
        let token = generate_token().unwrap();
        assert_eq!(token.len(), 64);
        let (_dir, auth) = authenticator(&format!(
            "# who role hash\n\nci-bot operator {}  # the CI\n",
            hash_token(&token)
        ));
        assert_eq!(
            auth.authenticate(&bearer(&format!("Bearer {token}"))),
            Ok(Caller {
                name: "ci-bot".into(),
                role: Role::Operator
            })
        );
        assert_eq!(
            auth.authenticate(&bearer(&format!("bearer  {token}")))
                .unwrap()
                .name,
            "ci-bot"
        );
        assert_eq!(
            auth.authenticate(&bearer("Bearer nope")),
            Err(AuthError::UnknownToken)
        );
        assert_eq!(
            auth.authenticate(&bearer(&format!("Basic {token}"))),
            Err(AuthError::NotBearer)
        );
        assert_eq!(
            auth.authenticate(&HeaderMap::new()),
            Err(AuthError::Missing)
        );
    }

    #[test]
    fn bad_token_files_are_refused_with_their_line() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tokens");
        let hash = hash_token("x");
        for (text, expected) in [
            (
                format!("a admin {hash}\nb root {hash}\n"),
                ":2: unknown role 'root'",
            ),
            (
                "a admin abc\n".to_string(),
                ":1: the hash must be 64 hex digits",
            ),
            ("a admin\n".to_string(), ":1: expected"),
            (
                format!("a admin {hash}\nb viewer {hash}\n"),
                ":2: the same token",
            ),
        ] {
            std::fs::write(&path, text).unwrap();
            let error = Authenticator::load(&AuthConfig {
                tokens_file: Some(path.clone()),
                ..AuthConfig::default()
            })
            .err()
            .expect("refused");
            assert!(format!("{error:#}").contains(expected), "{error:#}");
        }
    }

    #[test]
    fn off_unless_configured_and_jwt_needs_issuer_and_audience() {
        assert!(
            Authenticator::load(&AuthConfig::default())
                .unwrap()
                .is_none()
        );
        let error = Authenticator::load(&AuthConfig {
            jwt_jwks: Some("/nonexistent".into()),
            ..AuthConfig::default()
        })
        .err()
        .unwrap();
        assert!(error.to_string().contains("--jwt-issuer"), "{error}");
    }

    #[test]
    fn jwks_keys_are_checked_at_start() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("jwks.json");
        let rsa = r#"{"kty": "RSA", "n": "AQAB", "e": "AQAB""#;
        for (keys, expected) in [
            (
                r#"{"kty": "oct", "k": "c2VjcmV0"}"#.to_string(),
                "symmetric (oct) keys are not accepted",
            ),
            (
                format!(r#"{rsa}, "alg": "ES256"}}"#),
                "alg ES256 does not fit",
            ),
            (format!(r#"{rsa}, "use": "enc"}}"#), "has no signing key"),
        ] {
            std::fs::write(&path, format!(r#"{{"keys": [{keys}]}}"#)).unwrap();
            let error = Authenticator::load(&AuthConfig {
                jwt_jwks: Some(path.clone()),
                jwt_issuer: Some("https://idp.test".into()),
                jwt_audience: Some("pipelined".into()),
                ..AuthConfig::default()
            })
            .err()
            .expect("refused");
            assert!(format!("{error:#}").contains(expected), "{error:#}");
        }
        std::fs::write(&path, format!(r#"{{"keys": [{rsa}, "alg": "RS256"}}]}}"#)).unwrap();
        let auth = Authenticator::load(&AuthConfig {
            jwt_jwks: Some(path.clone()),
            jwt_issuer: Some("https://idp.test".into()),
            jwt_audience: Some("pipelined".into()),
            ..AuthConfig::default()
        })
        .unwrap()
        .unwrap();
        let error = auth.authenticate(&bearer("Bearer a.b.c")).unwrap_err();
        assert!(
            error.to_string().starts_with("invalid JWT: malformed"),
            "{error}"
        );
        // Not shaped like a JWT: just an unknown token.
        assert_eq!(
            auth.authenticate(&bearer("Bearer abc")),
            Err(AuthError::UnknownToken)
        );
    }

    #[test]
    fn method_names() {
        assert_eq!(
            method_name("/pipeline.v1.PipelineService/RunPipeline"),
            "RunPipeline"
        );
        assert_eq!(method_name("/other.Service/X"), "/other.Service/X");
        assert_eq!(
            access::required_role(method_name("/other.Service/X")),
            Role::Admin
        );
    }
}
