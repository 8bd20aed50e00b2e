//! Putting answers on the wire the way the real service does, and reading
//! request bodies.

use axum::{body::Body, response::Response};
use bytes::Bytes;
use http::{HeaderValue, StatusCode, header};
use http_body_util::{BodyExt as _, LengthLimitError, Limited};
use serde::Serialize;

use crate::oidc::ServiceErrorKind;

use super::{fault::Fault, sigv4::Rejection, state::ApiError};

/// Header carrying the modelled error type.
pub(crate) const ERROR_TYPE_HEADER: &str = "x-amzn-errortype";
/// Header carrying the request id, on every answer.
pub(crate) const REQUEST_ID_HEADER: &str = "x-amzn-requestid";
/// What follows the shape name in `x-amzn-ErrorType`.
const ERROR_TYPE_NAMESPACE: &str = ":http://internal.amazon.com/coral/com.amazonaws.sso.oidc/";

/// A response with the given status, content type and body.
pub(crate) fn response(
    status: StatusCode,
    content_type: &'static str,
    body: impl Into<Body>,
) -> Response {
    let mut resp = Response::new(body.into());
    *resp.status_mut() = status;
    resp.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    resp
}

/// A JSON response.
pub(crate) fn json(status: StatusCode, value: &impl Serialize) -> Response {
    match serde_json::to_vec(value) {
        Ok(bytes) => response(status, "application/json", bytes),
        Err(_) => response(
            StatusCode::INTERNAL_SERVER_ERROR,
            "application/json",
            r#"{"error":"server_error"}"#,
        ),
    }
}

/// A modelled service error, shaped like the real service's: status from the
/// model, `x-amzn-ErrorType`, and an OAuth-style JSON body.
pub(crate) fn service_error(e: &ApiError) -> Response {
    let mut body = serde_json::Map::new();
    body.insert("error".into(), e.kind.oauth_code().into());
    body.insert("error_description".into(), e.description.clone().into());
    if let Some(reason) = e.reason {
        body.insert("reason".into(), reason.into());
    }
    if e.kind == ServiceErrorKind::InvalidRequestRegion {
        body.insert(
            "endpoint".into(),
            "https://oidc.us-west-2.amazonaws.com".into(),
        );
        body.insert("region".into(), "us-west-2".into());
    }
    let mut resp = json(e.kind.status(), &body);
    let error_type = format!("{}{ERROR_TYPE_NAMESPACE}", e.kind.shape_name());
    if let Ok(value) = HeaderValue::from_str(&error_type) {
        resp.headers_mut().insert(ERROR_TYPE_HEADER, value);
    }
    resp
}

/// What follows the type in `x-amzn-ErrorType` for errors of AWS's request
/// authentication layer (not of the SSO-OIDC model).
const AUTH_ERROR_TYPE_NAMESPACE: &str =
    ":http://internal.amazon.com/coral/com.amazon.coral.service/";

/// A refused SigV4 signature, as AWS answers it: 403, the type in
/// `x-amzn-ErrorType`, `{"message": ...}`.
pub(crate) fn signature_error(rejection: &Rejection) -> Response {
    let mut resp = json(
        rejection.status,
        &serde_json::json!({"message": rejection.message}),
    );
    let error_type = format!("{}{AUTH_ERROR_TYPE_NAMESPACE}", rejection.error_type);
    if let Ok(value) = HeaderValue::from_str(&error_type) {
        resp.headers_mut().insert(ERROR_TYPE_HEADER, value);
    }
    resp
}

/// The error the service would give when this kind is injected as a fault.
pub(crate) fn injected_error(kind: ServiceErrorKind) -> ApiError {
    use ServiceErrorKind as K;
    let description = match kind {
        K::AccessDenied => "You do not have sufficient access to perform this action.",
        K::AuthorizationPending => "Authorization is pending",
        K::ExpiredToken => "Token has expired",
        K::InternalServer => "An internal error occurred while processing the request",
        K::InvalidClient => "Invalid client",
        K::InvalidClientMetadata => "Invalid client metadata",
        K::InvalidGrant => "Invalid grant provided",
        K::InvalidRedirectUri => "Invalid redirect URI",
        K::InvalidRequest => "Invalid request",
        K::InvalidRequestRegion => "The token was issued in another region",
        K::InvalidScope => "Invalid scope requested",
        K::SlowDown => "Client is polling too fast; slow down",
        K::UnauthorizedClient => "Client is not authorized to make this request",
        K::UnsupportedGrantType => "Unsupported grant type",
    };
    let mut e = ApiError::new(kind, description);
    if kind == K::AccessDenied {
        e.reason = Some("KMS_AccessDeniedException");
    }
    e
}

const HTML_502: &str = "<html>\r\n<head><title>502 Bad Gateway</title></head>\r\n<body>\r\n\
                        <center><h1>502 Bad Gateway</h1></center>\r\n</body>\r\n</html>\r\n";

/// The answer a non-delay fault gives in place of the normal one.
pub(crate) fn fault_response(fault: Fault) -> Response {
    match fault {
        Fault::Error(kind) => service_error(&injected_error(kind)),
        Fault::Html502 => response(StatusCode::BAD_GATEWAY, "text/html", HTML_502),
        Fault::EmptyBody(status) => {
            let status = StatusCode::from_u16(status)
                .ok()
                .filter(|s| !s.is_informational())
                .unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
            let mut resp = Response::new(Body::empty());
            *resp.status_mut() = status;
            resp
        }
        Fault::Malformed200 => response(StatusCode::OK, "application/json", r#"{"accessToken": 5"#),
        // A delay is not an answer; callers handle it before getting here.
        Fault::Delay(_) => service_error(&injected_error(ServiceErrorKind::InternalServer)),
    }
}

/// Why a body could not be read.
#[derive(Debug)]
pub(crate) enum BodyError {
    TooLarge,
    Broken,
}

/// Reads a whole body of at most `limit` bytes.
pub(crate) async fn read_body(body: Body, limit: usize) -> Result<Bytes, BodyError> {
    match Limited::new(body, limit).collect().await {
        Ok(collected) => Ok(collected.to_bytes()),
        Err(e) if e.is::<LengthLimitError>() => Err(BodyError::TooLarge),
        Err(_) => Err(BodyError::Broken),
    }
}

/// Value of `key` in an `application/x-www-form-urlencoded` string (also a
/// query string).
pub(crate) fn form_value(encoded: &str, key: &str) -> Option<String> {
    encoded.split('&').find_map(|pair| {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        (percent_decode(k) == key).then(|| percent_decode(v))
    })
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' => {
                let hex = s
                    .get(i + 1..i + 3)
                    .and_then(|h| u8::from_str_radix(h, 16).ok());
                match hex {
                    Some(b) => {
                        out.push(b);
                        i += 2;
                    }
                    None => out.push(b'%'),
                }
            }
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Escapes text for HTML.
pub(crate) fn html_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn form_values_decode() {
        assert_eq!(
            form_value("user_code=ABCD-EFGH", "user_code").as_deref(),
            Some("ABCD-EFGH")
        );
        assert_eq!(
            form_value("a=1&user_code=AB%2DCD+x", "user_code").as_deref(),
            Some("AB-CD x")
        );
        assert_eq!(form_value("a=1", "user_code"), None);
        assert_eq!(form_value("user_code=%", "user_code").as_deref(), Some("%"));
        assert_eq!(
            form_value("user_code=%4", "user_code").as_deref(),
            Some("%4")
        );
    }

    #[test]
    fn html_is_escaped() {
        assert_eq!(
            html_escape("<a href=\"x\">&'"),
            "&lt;a href=&quot;x&quot;&gt;&amp;&#39;"
        );
    }
}
