//! Typed SSO-OIDC errors and the rule that turns a raw error response into one.
//!
//! The error type is taken from, in order: the `x-amzn-ErrorType` header (cut
//! at `:`), the body's `code`, the body's `__type` (cut before `#`), and the
//! OAuth `error` field (`slow_down`, `invalid_grant`, ...). Every error has an
//! [`ErrorClass`] that the retry policy acts on.

use std::{fmt, sync::Arc};

use http::{HeaderMap, StatusCode};
use serde::Deserialize;

/// What a caller should do about an error.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ErrorClass {
    /// The service asked us to slow down: retry later, with a growing delay.
    Throttled,
    /// A fault that may pass: retry with backoff.
    Transient,
    /// Retrying the same request cannot succeed.
    Fatal,
    /// Device flow only: the person has not approved yet; keep polling.
    Pending,
}

impl ErrorClass {
    /// Lower-case name, used in metrics labels and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Throttled => "throttled",
            Self::Transient => "transient",
            Self::Fatal => "fatal",
            Self::Pending => "pending",
        }
    }
}

impl fmt::Display for ErrorClass {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The errors the SSO-OIDC model declares.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ServiceErrorKind {
    /// `AccessDeniedException` (400).
    AccessDenied,
    /// `AuthorizationPendingException` (400).
    AuthorizationPending,
    /// `ExpiredTokenException` (400).
    ExpiredToken,
    /// `InternalServerException` (500).
    InternalServer,
    /// `InvalidClientException` (401).
    InvalidClient,
    /// `InvalidClientMetadataException` (400).
    InvalidClientMetadata,
    /// `InvalidGrantException` (400).
    InvalidGrant,
    /// `InvalidRedirectUriException` (400).
    InvalidRedirectUri,
    /// `InvalidRequestException` (400).
    InvalidRequest,
    /// `InvalidRequestRegionException` (400).
    InvalidRequestRegion,
    /// `InvalidScopeException` (400).
    InvalidScope,
    /// `SlowDownException` (400).
    SlowDown,
    /// `UnauthorizedClientException` (400).
    UnauthorizedClient,
    /// `UnsupportedGrantTypeException` (400).
    UnsupportedGrantType,
}

impl ServiceErrorKind {
    /// Every modelled error.
    pub const ALL: [Self; 14] = [
        Self::AccessDenied,
        Self::AuthorizationPending,
        Self::ExpiredToken,
        Self::InternalServer,
        Self::InvalidClient,
        Self::InvalidClientMetadata,
        Self::InvalidGrant,
        Self::InvalidRedirectUri,
        Self::InvalidRequest,
        Self::InvalidRequestRegion,
        Self::InvalidScope,
        Self::SlowDown,
        Self::UnauthorizedClient,
        Self::UnsupportedGrantType,
    ];

    /// The kind's name without the `Exception` suffix, e.g. `SlowDown`.
    pub fn name(self) -> &'static str {
        match self {
            Self::AccessDenied => "AccessDenied",
            Self::AuthorizationPending => "AuthorizationPending",
            Self::ExpiredToken => "ExpiredToken",
            Self::InternalServer => "InternalServer",
            Self::InvalidClient => "InvalidClient",
            Self::InvalidClientMetadata => "InvalidClientMetadata",
            Self::InvalidGrant => "InvalidGrant",
            Self::InvalidRedirectUri => "InvalidRedirectUri",
            Self::InvalidRequest => "InvalidRequest",
            Self::InvalidRequestRegion => "InvalidRequestRegion",
            Self::InvalidScope => "InvalidScope",
            Self::SlowDown => "SlowDown",
            Self::UnauthorizedClient => "UnauthorizedClient",
            Self::UnsupportedGrantType => "UnsupportedGrantType",
        }
    }

    /// The shape name in the service model, e.g. `SlowDownException`.
    pub fn shape_name(self) -> &'static str {
        match self {
            Self::AccessDenied => "AccessDeniedException",
            Self::AuthorizationPending => "AuthorizationPendingException",
            Self::ExpiredToken => "ExpiredTokenException",
            Self::InternalServer => "InternalServerException",
            Self::InvalidClient => "InvalidClientException",
            Self::InvalidClientMetadata => "InvalidClientMetadataException",
            Self::InvalidGrant => "InvalidGrantException",
            Self::InvalidRedirectUri => "InvalidRedirectUriException",
            Self::InvalidRequest => "InvalidRequestException",
            Self::InvalidRequestRegion => "InvalidRequestRegionException",
            Self::InvalidScope => "InvalidScopeException",
            Self::SlowDown => "SlowDownException",
            Self::UnauthorizedClient => "UnauthorizedClientException",
            Self::UnsupportedGrantType => "UnsupportedGrantTypeException",
        }
    }

    /// The OAuth 2.0 `error` code the service puts in the body.
    pub fn oauth_code(self) -> &'static str {
        match self {
            Self::AccessDenied => "access_denied",
            Self::AuthorizationPending => "authorization_pending",
            Self::ExpiredToken => "expired_token",
            Self::InternalServer => "server_error",
            Self::InvalidClient => "invalid_client",
            Self::InvalidClientMetadata => "invalid_client_metadata",
            Self::InvalidGrant => "invalid_grant",
            Self::InvalidRedirectUri => "invalid_redirect_uri",
            Self::InvalidRequest => "invalid_request",
            Self::InvalidRequestRegion => "invalid_request",
            Self::InvalidScope => "invalid_scope",
            Self::SlowDown => "slow_down",
            Self::UnauthorizedClient => "unauthorized_client",
            Self::UnsupportedGrantType => "unsupported_grant_type",
        }
    }

    /// The HTTP status the model gives this error.
    pub fn status(self) -> StatusCode {
        match self {
            Self::InternalServer => StatusCode::INTERNAL_SERVER_ERROR,
            Self::InvalidClient => StatusCode::UNAUTHORIZED,
            _ => StatusCode::BAD_REQUEST,
        }
    }

    /// How the retry policy treats this error.
    pub fn class(self) -> ErrorClass {
        match self {
            Self::SlowDown => ErrorClass::Throttled,
            Self::InternalServer => ErrorClass::Transient,
            Self::AuthorizationPending => ErrorClass::Pending,
            _ => ErrorClass::Fatal,
        }
    }

    /// Finds a kind from an error type name: `SlowDownException`,
    /// `SlowDown`, case-insensitively.
    pub fn from_type_name(name: &str) -> Option<Self> {
        let name = name.trim();
        let bare = name
            .strip_suffix("Exception")
            .or_else(|| name.strip_suffix("exception"))
            .unwrap_or(name);
        Self::ALL
            .into_iter()
            .find(|k| k.name().eq_ignore_ascii_case(bare))
    }

    /// Finds a kind from an OAuth `error` code. `invalid_request` maps to
    /// `InvalidRequest`; only a type name can say `InvalidRequestRegion`.
    pub fn from_oauth_code(code: &str) -> Option<Self> {
        match code.trim() {
            "invalid_request" => Some(Self::InvalidRequest),
            code => Self::ALL
                .into_iter()
                .find(|k| *k != Self::InvalidRequestRegion && k.oauth_code() == code),
        }
    }
}

impl fmt::Display for ServiceErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// What the service said about an error, as far as it said anything.
///
/// The fields hold what the response carried, unchecked. An endpoint (or
/// a gateway in front of it) may echo the request it got, the client
/// secret and refresh token included, in any of them; so `Display` and
/// `Debug` show only the status, a model-defined `error` code and
/// `reason`, and a request id shaped as one, never the free text.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct ErrorDetails {
    /// HTTP status of the response.
    pub status: u16,
    /// The OAuth `error` code in the body.
    pub error: Option<String>,
    /// The body's `error_description` (or `message`): free text, never
    /// shown by this crate.
    pub error_description: Option<String>,
    /// The body's `reason` (AccessDenied, InvalidRequest).
    pub reason: Option<String>,
    /// `endpoint` member of InvalidRequestRegion.
    pub endpoint: Option<String>,
    /// `region` member of InvalidRequestRegion.
    pub region: Option<String>,
    /// The `x-amzn-RequestId` header, for support cases.
    pub request_id: Option<String>,
}

/// The `reason` values of the model (`AccessDeniedExceptionReason`,
/// `InvalidRequestExceptionReason`).
const MODEL_REASONS: [&str; 5] = [
    "KMS_AccessDeniedException",
    "KMS_NotFoundException",
    "KMS_InvalidKeyUsageException",
    "KMS_InvalidStateException",
    "KMS_DisabledException",
];

impl ErrorDetails {
    /// The `error` code, if the model defines it.
    fn shown_error(&self) -> Option<&str> {
        self.error
            .as_deref()
            .filter(|e| ServiceErrorKind::from_oauth_code(e).is_some())
    }

    /// The `reason`, if the model defines it.
    fn shown_reason(&self) -> Option<&str> {
        self.reason.as_deref().filter(|r| MODEL_REASONS.contains(r))
    }

    /// The request id, if it is shaped as AWS's are (a UUID).
    fn shown_request_id(&self) -> Option<&str> {
        self.request_id.as_deref().filter(|id| is_uuid(id))
    }
}

/// `8-4-4-4-12` hexadecimal digits.
fn is_uuid(text: &str) -> bool {
    text.split('-').map(str::len).eq([8, 4, 4, 4, 12])
        && text.bytes().all(|b| b == b'-' || b.is_ascii_hexdigit())
}

impl fmt::Display for ErrorDetails {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "HTTP {}", self.status)?;
        if let Some(e) = self.shown_error() {
            write!(f, ": {e}")?;
        }
        if let Some(r) = self.shown_reason() {
            write!(f, " (reason: {r})")?;
        }
        if let Some(id) = self.shown_request_id() {
            write!(f, " [request id {id}]")?;
        }
        Ok(())
    }
}

impl fmt::Debug for ErrorDetails {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Free text by its length only.
        let len = |v: &Option<String>| v.as_ref().map(String::len);
        f.debug_struct("ErrorDetails")
            .field("status", &self.status)
            .field("error", &self.shown_error())
            .field("error_description_len", &len(&self.error_description))
            .field("reason", &self.shown_reason())
            .field("endpoint_len", &len(&self.endpoint))
            .field("region_len", &len(&self.region))
            .field("request_id", &self.shown_request_id())
            .finish()
    }
}

/// An error type name or code from a response, if it can be shown: a
/// CamelCase name or an OAuth code (letters, digits, `_`), at most 64
/// bytes. Anything else may be an echo of what was sent.
fn shown_code(code: &str) -> Option<String> {
    (!code.is_empty()
        && code.len() <= 64
        && code.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_'))
    .then(|| code.to_owned())
}

/// Which operation failed; part of every error message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Operation {
    /// `CreateToken`.
    CreateToken,
    /// `CreateTokenWithIAM` (SigV4-signed).
    CreateTokenWithIam,
    /// `RegisterClient`.
    RegisterClient,
    /// `StartDeviceAuthorization`.
    StartDeviceAuthorization,
}

impl Operation {
    /// The model's operation name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::CreateToken => "CreateToken",
            Self::CreateTokenWithIam => "CreateTokenWithIAM",
            Self::RegisterClient => "RegisterClient",
            Self::StartDeviceAuthorization => "StartDeviceAuthorization",
        }
    }

    /// HTTP path (and query) of the operation.
    pub fn path(self) -> &'static str {
        match self {
            Self::CreateToken => "/token",
            Self::CreateTokenWithIam => "/token?aws_iam=t",
            Self::RegisterClient => "/client/register",
            Self::StartDeviceAuthorization => "/device_authorization",
        }
    }
}

impl fmt::Display for Operation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A shared, cloneable cause.
#[derive(Clone)]
pub struct Cause(Arc<dyn std::error::Error + Send + Sync + 'static>);

impl Cause {
    /// Wraps an error.
    pub fn new(e: impl Into<Box<dyn std::error::Error + Send + Sync>>) -> Self {
        Self(Arc::from(e.into()))
    }
}

impl fmt::Debug for Cause {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&self.0, f)
    }
}

impl fmt::Display for Cause {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.0, f)
    }
}

impl std::error::Error for Cause {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.0.source()
    }
}

/// Any failure of an SSO-OIDC call. Cheap to clone, so one failure can be
/// handed to many waiting callers. Never carries a secret.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum OidcError {
    /// A modelled service error.
    #[error("{operation} failed with {kind}: {details}")]
    Service {
        /// The call that failed.
        operation: Operation,
        /// Which modelled error.
        kind: ServiceErrorKind,
        /// What the service said.
        details: Box<ErrorDetails>,
    },
    /// An error response whose type is not in the model, or has no type.
    #[error("{operation} failed with HTTP {status}{}", code.as_deref().map(|c| format!(" ({c})")).unwrap_or_default())]
    Unknown {
        /// The call that failed.
        operation: Operation,
        /// The error type name, when the response had one.
        code: Option<String>,
        /// HTTP status.
        status: u16,
        /// What the service said.
        details: Box<ErrorDetails>,
    },
    /// Could not connect to the endpoint (refused, DNS, unreachable).
    #[error("{operation}: cannot connect to the SSO-OIDC endpoint: {source}")]
    Connect {
        /// The call that failed.
        operation: Operation,
        /// Why.
        #[source]
        source: Cause,
    },
    /// The call did not finish within its timeout.
    #[error(
        "{operation}: no response within {timeout:?}; check network reachability of the SSO-OIDC endpoint"
    )]
    Timeout {
        /// The call that failed.
        operation: Operation,
        /// The timeout that elapsed.
        timeout: std::time::Duration,
    },
    /// TLS handshake or certificate verification failed.
    #[error(
        "{operation}: TLS failure talking to the SSO-OIDC endpoint (check the endpoint URL and trust roots): {source}"
    )]
    Tls {
        /// The call that failed.
        operation: Operation,
        /// Why.
        #[source]
        source: Cause,
    },
    /// The connection broke mid-call.
    #[error("{operation}: connection error: {source}")]
    Io {
        /// The call that failed.
        operation: Operation,
        /// Why.
        #[source]
        source: Cause,
    },
    /// No AWS credentials to sign the call with, or signing failed. The
    /// request was not sent.
    #[error(
        "{operation}: cannot sign the request with AWS credentials (check the AWS credential chain: environment, profile, web identity, container or instance role): {source}"
    )]
    Credentials {
        /// The call that was not made.
        operation: Operation,
        /// Whether asking the credential chain again may help (a timeout,
        /// an unreachable metadata endpoint), as opposed to a configuration
        /// without credentials.
        retryable: bool,
        /// Why (never a credential).
        #[source]
        source: Cause,
    },
    /// A successful response we could not understand.
    #[error("{operation}: malformed response (HTTP {status}): {message}")]
    Decode {
        /// The call that failed.
        operation: Operation,
        /// HTTP status.
        status: u16,
        /// What is wrong with it (never the body itself).
        message: String,
    },
}

impl OidcError {
    /// How the retry policy treats this error.
    pub fn class(&self) -> ErrorClass {
        match self {
            Self::Service { kind, .. } => kind.class(),
            Self::Unknown { status, .. } if *status >= 500 => ErrorClass::Transient,
            Self::Unknown { status: 429, .. } => ErrorClass::Throttled,
            Self::Unknown { .. } => ErrorClass::Fatal,
            Self::Connect { .. } | Self::Timeout { .. } | Self::Io { .. } => ErrorClass::Transient,
            Self::Credentials {
                retryable: true, ..
            } => ErrorClass::Transient,
            Self::Credentials {
                retryable: false, ..
            } => ErrorClass::Fatal,
            Self::Tls { .. } | Self::Decode { .. } => ErrorClass::Fatal,
        }
    }

    /// A short name for the error, used in 503 bodies, logs and metrics:
    /// the modelled kind (`InvalidGrant`) or `Unknown`, `Connect`, `Timeout`,
    /// `Tls`, `Io`, `Credentials`, `Decode`.
    pub fn kind_name(&self) -> &'static str {
        match self {
            Self::Service { kind, .. } => kind.name(),
            Self::Unknown { .. } => "Unknown",
            Self::Connect { .. } => "Connect",
            Self::Timeout { .. } => "Timeout",
            Self::Tls { .. } => "Tls",
            Self::Io { .. } => "Io",
            Self::Credentials { .. } => "Credentials",
            Self::Decode { .. } => "Decode",
        }
    }

    /// The modelled kind, if this is a modelled service error.
    pub fn service_kind(&self) -> Option<ServiceErrorKind> {
        match self {
            Self::Service { kind, .. } => Some(*kind),
            _ => None,
        }
    }

    /// The operation that failed.
    pub fn operation(&self) -> Operation {
        match self {
            Self::Service { operation, .. }
            | Self::Unknown { operation, .. }
            | Self::Connect { operation, .. }
            | Self::Timeout { operation, .. }
            | Self::Tls { operation, .. }
            | Self::Io { operation, .. }
            | Self::Credentials { operation, .. }
            | Self::Decode { operation, .. } => *operation,
        }
    }

    /// What the service said, for service and unknown errors.
    pub fn details(&self) -> Option<&ErrorDetails> {
        match self {
            Self::Service { details, .. } | Self::Unknown { details, .. } => Some(details),
            _ => None,
        }
    }
}

// === error response parsing ===

#[derive(Debug, Default, Deserialize)]
struct ErrorBody {
    #[serde(default)]
    code: Option<String>,
    #[serde(default, rename = "__type")]
    type_: Option<String>,
    #[serde(default)]
    error: Option<String>,
    #[serde(default)]
    error_description: Option<String>,
    #[serde(default)]
    reason: Option<String>,
    #[serde(default)]
    endpoint: Option<String>,
    #[serde(default)]
    region: Option<String>,
    // Some AWS services use capitalised members; accept them too.
    #[serde(default, rename = "Message", alias = "message")]
    message: Option<String>,
}

/// `SlowDownException:http://internal.amazon.com/...` → `SlowDownException`;
/// `com.amazonaws.ssooidc#SlowDownException` → `SlowDownException`.
fn sanitize_type(raw: &str) -> &str {
    let before_colon = raw.split(':').next().unwrap_or(raw);
    let after_hash = before_colon.rsplit('#').next().unwrap_or(before_colon);
    after_hash.trim()
}

/// Turns a non-2xx response into a typed error. Never fails: a body that is
/// not JSON (an HTML page from a load balancer, an empty body) falls back to
/// the status code.
pub fn parse_error_response(
    operation: Operation,
    status: StatusCode,
    headers: &HeaderMap,
    body: &[u8],
) -> OidcError {
    // A non-JSON body is not an error here: only its fields are optional hints.
    let parsed: ErrorBody = serde_json::from_slice(body).unwrap_or_default();
    let details = Box::new(ErrorDetails {
        status: status.as_u16(),
        error: parsed.error.clone(),
        error_description: parsed.error_description.clone().or(parsed.message.clone()),
        reason: parsed.reason.clone(),
        endpoint: parsed.endpoint.clone(),
        region: parsed.region.clone(),
        request_id: headers
            .get("x-amzn-requestid")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned),
    });

    let type_name = headers
        .get("x-amzn-errortype")
        .and_then(|v| v.to_str().ok())
        .map(sanitize_type)
        .filter(|s| !s.is_empty())
        .or_else(|| {
            parsed
                .code
                .as_deref()
                .map(sanitize_type)
                .filter(|s| !s.is_empty())
        })
        .or_else(|| {
            parsed
                .type_
                .as_deref()
                .map(sanitize_type)
                .filter(|s| !s.is_empty())
        });

    let kind = match type_name {
        Some(name) => ServiceErrorKind::from_type_name(name),
        None => parsed
            .error
            .as_deref()
            .and_then(ServiceErrorKind::from_oauth_code),
    };

    match kind {
        Some(kind) => OidcError::Service {
            operation,
            kind,
            details,
        },
        None => OidcError::Unknown {
            operation,
            code: type_name.or(parsed.error.as_deref()).and_then(shown_code),
            status: status.as_u16(),
            details,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    fn parse(status: u16, header: Option<&str>, body: &str) -> OidcError {
        let mut headers = HeaderMap::new();
        if let Some(h) = header {
            headers.insert("x-amzn-ErrorType", HeaderValue::from_str(h).unwrap());
        }
        parse_error_response(
            Operation::CreateToken,
            StatusCode::from_u16(status).unwrap(),
            &headers,
            body.as_bytes(),
        )
    }

    #[test]
    fn header_form_of_the_real_service_wins() {
        let e = parse(
            400,
            Some("SlowDownException:http://internal.amazon.com/coral/com.amazonaws.sso.oidc/"),
            r#"{"error":"invalid_grant","error_description":"slow please"}"#,
        );
        assert_eq!(e.service_kind(), Some(ServiceErrorKind::SlowDown));
        assert_eq!(e.class(), ErrorClass::Throttled);
        assert_eq!(
            e.details().unwrap().error_description.as_deref(),
            Some("slow please")
        );
    }

    #[test]
    fn body_code_then_type_then_oauth_error() {
        let e = parse(
            400,
            None,
            r#"{"code":"InvalidGrantException","__type":"x#SlowDownException","error":"slow_down"}"#,
        );
        assert_eq!(e.service_kind(), Some(ServiceErrorKind::InvalidGrant));
        let e = parse(
            400,
            None,
            r#"{"__type":"com.amazonaws.ssooidc#ExpiredTokenException","error":"slow_down"}"#,
        );
        assert_eq!(e.service_kind(), Some(ServiceErrorKind::ExpiredToken));
        let e = parse(
            400,
            None,
            r#"{"error":"authorization_pending","error_description":"wait"}"#,
        );
        assert_eq!(
            e.service_kind(),
            Some(ServiceErrorKind::AuthorizationPending)
        );
        assert_eq!(e.class(), ErrorClass::Pending);
    }

    #[test]
    fn invalid_request_is_disambiguated_by_header() {
        let e = parse(400, None, r#"{"error":"invalid_request"}"#);
        assert_eq!(e.service_kind(), Some(ServiceErrorKind::InvalidRequest));
        let e = parse(
            400,
            Some(
                "InvalidRequestRegionException:http://internal.amazon.com/coral/com.amazonaws.sso.oidc/",
            ),
            r#"{"error":"invalid_request","endpoint":"https://oidc.eu-west-1.amazonaws.com","region":"eu-west-1"}"#,
        );
        assert_eq!(
            e.service_kind(),
            Some(ServiceErrorKind::InvalidRequestRegion)
        );
        assert_eq!(e.details().unwrap().region.as_deref(), Some("eu-west-1"));
    }

    #[test]
    fn reason_is_kept() {
        let e = parse(
            400,
            Some("AccessDeniedException"),
            r#"{"error":"access_denied","error_description":"no","reason":"KMS_AccessDeniedException"}"#,
        );
        assert_eq!(e.service_kind(), Some(ServiceErrorKind::AccessDenied));
        assert_eq!(
            e.details().unwrap().reason.as_deref(),
            Some("KMS_AccessDeniedException")
        );
        assert!(e.to_string().contains("KMS_AccessDeniedException"));
    }

    /// An endpoint, or a gateway before it, that echoes the request it got
    /// into every field of its answer: none of it is shown.
    #[test]
    fn echoed_request_text_is_never_shown() {
        const ECHO: &str = "RT-canary-91bd CS-canary-7f3a\n2030-01-01 INFO forged\u{1b}[31m";
        let body = serde_json::json!({
            "error": ECHO,
            "error_description": ECHO,
            "message": ECHO,
            "reason": ECHO,
            "endpoint": ECHO,
            "region": ECHO,
        })
        .to_string();
        let header_echo = "RT-canary-91bd";
        for type_header in [None, Some(header_echo), Some("AccessDeniedException")] {
            let mut headers = HeaderMap::new();
            headers.insert(
                "x-amzn-requestid",
                HeaderValue::from_static("RT-canary-91bd"),
            );
            if let Some(t) = type_header {
                headers.insert("x-amzn-errortype", HeaderValue::from_str(t).unwrap());
            }
            for status in [400, 500] {
                let e = parse_error_response(
                    Operation::CreateToken,
                    StatusCode::from_u16(status).unwrap(),
                    &headers,
                    body.as_bytes(),
                );
                for shown in [e.to_string(), format!("{e:?}"), format!("{e:#?}")] {
                    assert!(!shown.contains("canary"), "{shown}");
                    assert!(!shown.contains("forged"), "{shown}");
                    assert!(!shown.contains('\u{1b}'), "{shown}");
                }
            }
        }
    }

    #[test]
    fn model_codes_reasons_and_request_ids_are_shown() {
        let mut headers = HeaderMap::new();
        headers.insert(
            "x-amzn-requestid",
            HeaderValue::from_static("0c9d3a6e-5b1f-4e7a-9d2c-8f6b1a2e3d4c"),
        );
        let e = parse_error_response(
            Operation::CreateToken,
            StatusCode::BAD_REQUEST,
            &headers,
            br#"{"error":"access_denied","error_description":"quiet","reason":"KMS_AccessDeniedException"}"#,
        );
        let shown = e.to_string();
        assert!(shown.contains("access_denied"), "{shown}");
        assert!(
            shown.contains("(reason: KMS_AccessDeniedException)"),
            "{shown}"
        );
        assert!(
            shown.contains("[request id 0c9d3a6e-5b1f-4e7a-9d2c-8f6b1a2e3d4c]"),
            "{shown}"
        );
        assert!(!shown.contains("quiet"), "{shown}");
        // The text itself stays available to a library caller who asks.
        assert_eq!(
            e.details().unwrap().error_description.as_deref(),
            Some("quiet")
        );
        // An unmodelled type keeps a plain name.
        let e = parse(400, Some("FancyNewException:http://x"), "{}");
        assert!(e.to_string().contains("(FancyNewException)"), "{e}");
    }

    #[test]
    fn html_502_from_a_load_balancer_is_transient_unknown() {
        let e = parse(
            502,
            None,
            "<html><body><h1>502 Bad Gateway</h1></body></html>",
        );
        assert!(matches!(
            e,
            OidcError::Unknown {
                status: 502,
                code: None,
                ..
            }
        ));
        assert_eq!(e.class(), ErrorClass::Transient);
    }

    #[test]
    fn empty_body_falls_back_to_status() {
        let e = parse(400, None, "");
        assert!(matches!(e, OidcError::Unknown { status: 400, .. }));
        assert_eq!(e.class(), ErrorClass::Fatal);
        let e = parse(503, None, "");
        assert_eq!(e.class(), ErrorClass::Transient);
        let e = parse(429, None, "");
        assert_eq!(e.class(), ErrorClass::Throttled);
    }

    #[test]
    fn unmodelled_type_is_unknown_with_its_code() {
        let e = parse(400, Some("FancyNewException:http://x"), "{}");
        match e {
            OidcError::Unknown { code, status, .. } => {
                assert_eq!(code.as_deref(), Some("FancyNewException"));
                assert_eq!(status, 400);
            }
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn every_kind_round_trips_through_each_form() {
        for kind in ServiceErrorKind::ALL {
            assert_eq!(
                parse(kind.status().as_u16(), Some(kind.shape_name()), "{}").service_kind(),
                Some(kind)
            );
            let body = format!(
                r#"{{"__type":"com.amazonaws.ssooidc#{}"}}"#,
                kind.shape_name()
            );
            assert_eq!(parse(400, None, &body).service_kind(), Some(kind));
            if kind != ServiceErrorKind::InvalidRequestRegion {
                let body = format!(r#"{{"error":"{}"}}"#, kind.oauth_code());
                assert_eq!(parse(400, None, &body).service_kind(), Some(kind));
            }
        }
    }

    #[test]
    fn classes_follow_the_design_table() {
        use ServiceErrorKind::*;
        for kind in ServiceErrorKind::ALL {
            let expected = match kind {
                SlowDown => ErrorClass::Throttled,
                InternalServer => ErrorClass::Transient,
                AuthorizationPending => ErrorClass::Pending,
                _ => ErrorClass::Fatal,
            };
            assert_eq!(kind.class(), expected, "{kind}");
        }
    }
}
