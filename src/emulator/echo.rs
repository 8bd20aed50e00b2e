//! The protected echo resource: every path and method the emulator does not
//! otherwise serve. It answers `200` with a description of the request when
//! the request carries a live access token the emulator issued (as
//! `Authorization: Bearer T`, or bare in `X-Api-Token: T`), `401`
//! otherwise.

use std::{
    collections::BTreeMap,
    convert::Infallible,
    pin::Pin,
    task::{Context, Poll},
    time::{Duration, Instant},
};

use axum::{body::Body, extract::Request, response::Response};
use bytes::Bytes;
use http::{HeaderMap, HeaderValue, StatusCode, header};
use http_body::{Frame, SizeHint};
use http_body_util::BodyExt as _;
use serde::Serialize;

use super::{Shared, wire};

/// Largest `x-echo-set-cookies` honoured.
const MAX_SET_COOKIES: u32 = 1000;
/// Size of each chunk of a generated response body.
const PATTERN_CHUNK: u64 = 64 * 1024;

#[derive(Serialize)]
struct EchoBody {
    authorized: bool,
    method: String,
    path: String,
    query: Option<String>,
    version: String,
    headers: BTreeMap<String, Vec<String>>,
    body_length: u64,
    /// The header the token came in: `authorization` or `x-api-token`.
    token_header: Option<&'static str>,
    /// The user the token stands for (`CreateTokenWithIAM` tokens).
    #[serde(skip_serializing_if = "Option::is_none")]
    subject: Option<String>,
}

/// Test controls read from `x-echo-*` request headers.
#[derive(Default)]
struct Controls {
    status: Option<StatusCode>,
    delay: Option<Duration>,
    response_bytes: Option<u64>,
    set_cookies: u32,
}

/// The other header the echo takes a token from, bare (the format of an
/// API-key style route: `token_header = "X-Api-Token"`, `token_format =
/// "{token}"`).
const API_TOKEN_HEADER: &str = "x-api-token";

/// The token a request carries and the header it came in:
/// `Authorization: Bearer T`, else `X-Api-Token: T`.
fn presented_token(headers: &HeaderMap) -> Option<(&str, &'static str)> {
    if let Some(token) = bearer_token(headers) {
        return Some((token, "authorization"));
    }
    let token = headers.get(API_TOKEN_HEADER)?.to_str().ok()?.trim();
    (!token.is_empty()).then_some((token, API_TOKEN_HEADER))
}

fn bearer_token(headers: &HeaderMap) -> Option<&str> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.trim().split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
}

fn number<T: std::str::FromStr>(
    headers: &HeaderMap,
    name: &'static str,
) -> Result<Option<T>, String> {
    match headers.get(name) {
        None => Ok(None),
        Some(v) => v
            .to_str()
            .ok()
            .and_then(|s| s.trim().parse::<T>().ok())
            .map(Some)
            .ok_or_else(|| format!("{name} must be a non-negative integer")),
    }
}

fn controls(headers: &HeaderMap) -> Result<Controls, String> {
    let status = match number::<u16>(headers, "x-echo-status")? {
        None => None,
        Some(code) => Some(
            StatusCode::from_u16(code)
                .ok()
                .filter(|s| !s.is_informational())
                .ok_or_else(|| "x-echo-status must be a status in 200..=999".to_owned())?,
        ),
    };
    let delay = number::<u64>(headers, "x-echo-delay-ms")?.map(Duration::from_millis);
    let response_bytes = number::<u64>(headers, "x-echo-response-bytes")?;
    let set_cookies = number::<u32>(headers, "x-echo-set-cookies")?.unwrap_or(0);
    if set_cookies > MAX_SET_COOKIES {
        return Err(format!(
            "x-echo-set-cookies must be at most {MAX_SET_COOKIES}"
        ));
    }
    Ok(Controls {
        status,
        delay,
        response_bytes,
        set_cookies,
    })
}

/// Reads the body to its end, counting bytes. `None` if it broke.
async fn count_body(mut body: Body) -> Option<u64> {
    let mut total = 0u64;
    while let Some(frame) = body.frame().await {
        if let Ok(data) = frame.ok()?.into_data() {
            total += data.len() as u64;
        }
    }
    Some(total)
}

/// Serves the echo resource.
pub(crate) async fn handle(shared: &Shared, req: Request) -> Response {
    let (parts, body) = req.into_parts();
    let presented = presented_token(&parts.headers);
    let token_header = presented.map(|(_, header)| header);
    let (live, subject) = {
        let mut state = shared.lock();
        let entry = presented.and_then(|(t, _)| state.live_access_token(t, Instant::now()));
        let (live, subject) = (entry.is_some(), entry.and_then(|e| e.subject.clone()));
        if live {
            state.counters.echo_authorized += 1;
        } else {
            state.counters.echo_unauthorized += 1;
        }
        (live, subject)
    };
    tracing::debug!(method = %parts.method, path = parts.uri.path(), authorized = live, "emulator: echo");

    if !live {
        // Drain what the client sends so the connection stays usable.
        let _ = count_body(body).await;
        let mut resp = wire::response(
            StatusCode::UNAUTHORIZED,
            "application/json",
            r#"{"error":"invalid_token"}"#,
        );
        resp.headers_mut().insert(
            header::WWW_AUTHENTICATE,
            HeaderValue::from_static(r#"Bearer error="invalid_token""#),
        );
        return resp;
    }

    let controls = match controls(&parts.headers) {
        Ok(c) => c,
        Err(message) => {
            let _ = count_body(body).await;
            return wire::json(
                StatusCode::BAD_REQUEST,
                &serde_json::json!({"error": "bad_echo_control", "message": message}),
            );
        }
    };
    if let Some(delay) = controls.delay {
        tokio::time::sleep(delay).await;
    }
    let Some(body_length) = count_body(body).await else {
        return wire::json(
            StatusCode::BAD_REQUEST,
            &serde_json::json!({"error": "body_read_failed"}),
        );
    };
    let status = controls.status.unwrap_or(StatusCode::OK);

    let mut resp = match controls.response_bytes {
        Some(n) => wire::response(
            status,
            "application/octet-stream",
            Body::new(PatternBody { sent: 0, total: n }),
        ),
        None => {
            let mut headers: BTreeMap<String, Vec<String>> = BTreeMap::new();
            for (name, value) in &parts.headers {
                if name == header::AUTHORIZATION || name == API_TOKEN_HEADER {
                    continue;
                }
                headers
                    .entry(name.as_str().to_owned())
                    .or_default()
                    .push(String::from_utf8_lossy(value.as_bytes()).into_owned());
            }
            let echo = EchoBody {
                authorized: true,
                method: parts.method.to_string(),
                path: parts.uri.path().to_owned(),
                query: parts.uri.query().map(str::to_owned),
                version: format!("{:?}", parts.version),
                headers,
                body_length,
                token_header,
                subject,
            };
            wire::json(status, &echo)
        }
    };
    for i in 0..controls.set_cookies {
        if let Ok(v) = HeaderValue::from_str(&format!("echo{i}=value{i}; Path=/")) {
            resp.headers_mut().append(header::SET_COOKIE, v);
        }
    }
    resp
}

/// The deterministic response pattern: byte `i` is `i % 251`.
pub(crate) fn pattern_byte(i: u64) -> u8 {
    (i % 251) as u8
}

/// A streamed body of `total` pattern bytes.
struct PatternBody {
    sent: u64,
    total: u64,
}

impl http_body::Body for PatternBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        if self.sent >= self.total {
            return Poll::Ready(None);
        }
        let start = self.sent;
        let end = self.total.min(start + PATTERN_CHUNK);
        let chunk: Vec<u8> = (start..end).map(pattern_byte).collect();
        self.sent = end;
        Poll::Ready(Some(Ok(Frame::data(Bytes::from(chunk)))))
    }

    fn is_end_stream(&self) -> bool {
        self.sent >= self.total
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::with_exact(self.total - self.sent)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn pattern_body_streams_exactly() {
        let body = Body::new(PatternBody {
            sent: 0,
            total: 200_000,
        });
        let bytes = body.collect().await.unwrap().to_bytes();
        assert_eq!(bytes.len(), 200_000);
        assert!(
            bytes
                .iter()
                .enumerate()
                .all(|(i, b)| *b == pattern_byte(i as u64))
        );
    }

    #[test]
    fn bearer_parsing() {
        let mut h = HeaderMap::new();
        assert_eq!(bearer_token(&h), None);
        h.insert(
            header::AUTHORIZATION,
            HeaderValue::from_static("bearer  abc "),
        );
        assert_eq!(bearer_token(&h), Some("abc"));
        h.insert(header::AUTHORIZATION, HeaderValue::from_static("Basic abc"));
        assert_eq!(bearer_token(&h), None);
    }

    #[test]
    fn bad_controls_are_reported() {
        let mut h = HeaderMap::new();
        h.insert("x-echo-status", HeaderValue::from_static("abc"));
        assert!(controls(&h).is_err());
        h.insert("x-echo-status", HeaderValue::from_static("101"));
        assert!(controls(&h).is_err());
        h.insert("x-echo-status", HeaderValue::from_static("418"));
        assert_eq!(controls(&h).unwrap().status, Some(StatusCode::IM_A_TEAPOT));
    }
}
