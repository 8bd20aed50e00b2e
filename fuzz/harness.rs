//! The entry points of the fuzz targets, shared by `fuzz/fuzz_targets/*.rs`
//! and the replay test `tests/fuzz_regressions.rs` (both include this file
//! with `#[path]`), so that a crash input replays through exactly the code
//! the fuzzer ran. Each function takes the raw bytes libFuzzer produced and
//! must not panic; the few `assert!`s check properties the crate promises.
//!
//! Only the crate's public API (plus its hidden config-parsing entry
//! point), `http`, `serde_json` and `std` are used here.

// Each includer uses only some of the entry points.
#![allow(dead_code)]

use std::{net::SocketAddr, path::Path};

use http::{HeaderMap, HeaderName, HeaderValue, Method, StatusCode, Uri, Version};
use sso_token_proxy::{
    __private::parse_config,
    oidc::{
        CreateTokenResponse, OidcError, Operation, RegisterClientResponse,
        StartDeviceAuthorizationResponse, parse_error_response,
    },
    token::{SsoCacheFile, Token, parse_expires_at},
};

/// The fuzz targets, in the order `scripts/fuzz.sh` runs them.
pub(crate) const TARGETS: &[&str] = &[
    "config_parse",
    "sso_cache_parse",
    "oidc_error_decode",
    "oidc_response_decode",
    "request_target",
    "path_normalize",
];

/// Runs the named target's entry point on one input, exactly as its fuzz
/// target does (for `oidc_error_decode`, `data` is decoded the way the
/// `arbitrary` derive decodes it).
pub(crate) fn run(target: &str, data: &[u8]) {
    match target {
        "config_parse" => config_parse(data),
        "sso_cache_parse" => sso_cache_parse(data),
        "oidc_error_decode" => {
            if let Some(case) = ErrorCase::decode(data) {
                oidc_error_decode(&case);
            }
        }
        "oidc_response_decode" => oidc_response_decode(data),
        "request_target" => {
            if let Some(case) = request_target(data) {
                check_target(&case);
            }
        }
        "path_normalize" => path_normalize(data),
        other => panic!("unknown fuzz target `{other}`"),
    }
}

// === config_parse ===

/// Config parsing (and the parsed config's `Debug`, or the error message)
/// on UTF-8 text; invalid UTF-8 is skipped.
pub(crate) fn config_parse(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let _ = parse_config(text, Path::new("fuzz.toml"));
}

// === sso_cache_parse ===

/// `SsoCacheFile::parse`, `.token()` on a parsed file, what `store` would
/// write read back, and `parse_expires_at` on the UTF-8 input.
pub(crate) fn sso_cache_parse(data: &[u8]) {
    if let Ok(file) = SsoCacheFile::parse(data, Path::new("cache.json")) {
        let _ = format!("{file:?}");
        if let Some(token) = file.token() {
            let _ = token.header_value();
            let _ = token.ttl();
            let _ = token.expires_at_wall();
            let _ = format!("{token:?}");
        }
        // `SsoCacheFile::store` serialises like this (and `expect`s it to
        // work); what it writes must load again.
        let written = serde_json::to_vec_pretty(&file).expect("cache file serialises");
        if let Err(e) = SsoCacheFile::parse(&written, Path::new("cache.json")) {
            panic!("a cache file as store() writes it does not parse again: {e}");
        }
    }
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = parse_expires_at(text);
    }
}

// === oidc_error_decode ===

/// The structured input of `oidc_error_decode`. The fuzz target decodes it
/// with `#[derive(arbitrary::Arbitrary)]` on the same fields in the same
/// order; [`ErrorCase::decode`] reproduces that decoding without the
/// `arbitrary` crate (checked by `fuzz/tests/decoder_matches_arbitrary.rs`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ErrorCase<'a> {
    /// HTTP status; values `StatusCode::from_u16` rejects are skipped.
    pub(crate) status: u16,
    /// `x-amzn-ErrorType`; values `HeaderValue::from_str` rejects are skipped.
    pub(crate) error_type: Option<&'a str>,
    /// The response body.
    pub(crate) body: &'a [u8],
}

impl<'a> ErrorCase<'a> {
    /// Smallest input the fuzz target runs: `arbitrary`'s size hint
    /// (2 bytes of status, 1 byte of `Option` tag); libfuzzer-sys skips
    /// shorter inputs.
    pub(crate) const MIN_LEN: usize = 3;

    /// Decodes `data` as `arbitrary` 1.x (`arbitrary_take_rest`) decodes
    /// `struct { status: u16, error_type: Option<&str>, body: &[u8] }`:
    /// `status` little-endian from the first two bytes (zero-padded), one
    /// tag byte (`& 1` means `Some`), the string's length from the *end* of
    /// what is left, the string (cut to its longest UTF-8 prefix), and the
    /// body is everything else. `None` for inputs the fuzz target skips.
    pub(crate) fn decode(data: &'a [u8]) -> Option<Self> {
        if data.len() < Self::MIN_LEN {
            return None;
        }
        let status = u16::from_le_bytes([data[0], data[1]]);
        let tag = data[2];
        let mut rest = &data[3..];
        let error_type = if tag & 1 == 1 {
            let len = take_len_from_end(&mut rest);
            let candidate = &rest[..len];
            let valid = match std::str::from_utf8(candidate) {
                Ok(s) => s,
                Err(e) => std::str::from_utf8(&candidate[..e.valid_up_to()]).expect("valid prefix"),
            };
            rest = &rest[valid.len()..];
            Some(valid)
        } else {
            None
        };
        Some(Self {
            status,
            error_type,
            body: rest,
        })
    }

    /// The inverse of [`ErrorCase::decode`], used to write seeds:
    /// `error_type` must be valid UTF-8 (it is a `&str`).
    pub(crate) fn encode(&self) -> Vec<u8> {
        let mut out = self.status.to_le_bytes().to_vec();
        match self.error_type {
            None => {
                out.push(0);
                out.extend_from_slice(self.body);
            }
            Some(s) => {
                out.push(1);
                let n = s.len();
                // Remaining data is the string, the body, and k length bytes
                // where k depends on the total; find the consistent k.
                let payload = n + self.body.len();
                let k = if payload < 256 {
                    1
                } else if payload <= usize::from(u16::MAX) {
                    2
                } else {
                    4
                };
                out.extend_from_slice(s.as_bytes());
                out.extend_from_slice(self.body);
                let max = payload as u64;
                // int_in_range: bytes are read big-endian-first, but only as
                // many as the range's width needs; then `% (max + 1)`.
                let needed = (0..k).take_while(|i| (max >> (8 * i)) > 0).count();
                let be = (n as u64).to_be_bytes();
                let mut len_bytes = vec![0u8; k];
                len_bytes[..needed].copy_from_slice(&be[8 - needed..]);
                out.extend_from_slice(&len_bytes);
            }
        }
        out
    }
}

/// `arbitrary::Unstructured::arbitrary_byte_size`: the length of the next
/// variable-size value, taken from the end of `data` (1, 2 or 4 bytes,
/// depending on how much is left).
fn take_len_from_end(data: &mut &[u8]) -> usize {
    let len = data.len();
    if len == 0 {
        return 0;
    }
    if len == 1 {
        *data = &[];
        return 0;
    }
    let width = if len <= 256 {
        1
    } else if len <= usize::from(u16::MAX) + 2 {
        2
    } else if (len as u64) <= u64::from(u32::MAX) + 4 {
        4
    } else {
        8
    };
    let max = (len - width) as u64;
    let (rest, for_size) = data.split_at(len - width);
    *data = rest;
    // `int_in_range_impl(0..=max)`.
    if max == 0 {
        return 0;
    }
    // Big-endian, but only as many bytes as the range's width needs.
    let needed = (0..width).take_while(|i| (max >> (i * 8)) > 0).count();
    let value = for_size[..needed]
        .iter()
        .fold(0u64, |acc, &b| (acc << 8) | u64::from(b));
    let type_max = if width == 8 {
        u64::MAX
    } else {
        (1u64 << (8 * width)) - 1
    };
    let offset = if max == type_max {
        value
    } else {
        value % (max + 1)
    };
    offset as usize
}

/// `parse_error_response` on a response built from the case, then every
/// accessor a caller uses on the error.
pub(crate) fn oidc_error_decode(case: &ErrorCase<'_>) {
    let Ok(status) = StatusCode::from_u16(case.status) else {
        return;
    };
    let mut headers = HeaderMap::new();
    if let Some(t) = case.error_type {
        let Ok(value) = HeaderValue::from_str(t) else {
            return;
        };
        headers.insert(HeaderName::from_static("x-amzn-errortype"), value);
    }
    let error = parse_error_response(Operation::CreateToken, status, &headers, case.body);
    let _ = error.class();
    let _ = error.kind_name();
    let _ = error.to_string();
    let _ = format!("{error:?}");
    let _ = error.service_kind();
    let _ = error.details().map(ToString::to_string);
    assert_eq!(error.operation(), Operation::CreateToken);
}

// === oidc_response_decode ===

/// Serialises a decoded response and decodes it again: it must come back
/// equal.
macro_rules! round_trip {
    ($ty:ty, $value:expr) => {{
        let value: &$ty = $value;
        let _ = format!("{value:?}");
        let bytes = serde_json::to_vec(value).expect("response serialises");
        let back: $ty = serde_json::from_slice(&bytes).expect("serialised response parses");
        assert!(back == *value, "response changed in a round trip");
    }};
}

/// Decodes the three SSO-OIDC success responses; a `CreateToken` response
/// becomes a token or a `Decode` error, and every response survives a
/// serialise/deserialise round trip.
pub(crate) fn oidc_response_decode(data: &[u8]) {
    if let Ok(resp) = serde_json::from_slice::<CreateTokenResponse>(data) {
        match Token::from_response(&resp) {
            Ok(token) => {
                let _ = token.header_value();
                let _ = format!("{token:?}");
            }
            Err(OidcError::Decode { .. }) => {}
            Err(other) => panic!("Token::from_response returned a non-Decode error: {other:?}"),
        }
        round_trip!(CreateTokenResponse, &resp);
    }
    if let Ok(resp) = serde_json::from_slice::<RegisterClientResponse>(data) {
        round_trip!(RegisterClientResponse, &resp);
    }
    if let Ok(resp) = serde_json::from_slice::<StartDeviceAuthorizationResponse>(data) {
        round_trip!(StartDeviceAuthorizationResponse, &resp);
    }
}

// === request_target ===

/// What `request_target` parsed: everything the proxy's request-target
/// check takes.
#[derive(Debug, Clone)]
pub(crate) struct TargetCase {
    /// The configured upstream (`http://127.0.0.1:9000` unless line 1 is a
    /// usable upstream URL).
    pub(crate) upstream: Uri,
    /// The request's method.
    pub(crate) method: Method,
    /// The request's version.
    pub(crate) version: Version,
    /// The request target.
    pub(crate) uri: Uri,
    /// The address the request arrived on.
    pub(crate) local: SocketAddr,
}

const DEFAULT_UPSTREAM: &str = "http://127.0.0.1:9000";
const DEFAULT_LOCAL: &str = "127.0.0.1:8080";

/// Parses `upstream URL \n request-line [\n listen address]` the way the
/// proxy gets them (the upstream validated as `Proxy::new` does, the request
/// line split as HTTP/1 does: `METHOD SP target SP version`). `None` when
/// the method or target does not parse (hyper answers 400 before the check).
pub(crate) fn request_target(data: &[u8]) -> Option<TargetCase> {
    let mut lines = data.split(|&b| b == b'\n');
    let upstream_line = trim_cr(lines.next().unwrap_or_default());
    let request_line = trim_cr(lines.next().unwrap_or_default());
    let local_line = trim_cr(lines.next().unwrap_or_default());

    let upstream = Uri::try_from(upstream_line)
        .ok()
        .filter(|u| {
            matches!(u.scheme_str(), Some("http" | "https"))
                && u.host().is_some_and(|h| !h.is_empty())
                && u.query().is_none()
                && !u.authority().is_some_and(|a| a.as_str().contains('@'))
        })
        .unwrap_or_else(|| Uri::from_static(DEFAULT_UPSTREAM));
    exercise_uri(&upstream);

    let local = std::str::from_utf8(local_line)
        .ok()
        .and_then(|s| s.parse::<SocketAddr>().ok())
        .unwrap_or_else(|| DEFAULT_LOCAL.parse().expect("default listen address"));

    let mut parts = request_line.splitn(3, |&b| b == b' ');
    let method = Method::from_bytes(parts.next().unwrap_or_default()).ok()?;
    let target = parts.next().unwrap_or_default();
    let version = match parts.next().unwrap_or_default() {
        b"HTTP/1.0" => Version::HTTP_10,
        b"HTTP/2" | b"HTTP/2.0" => Version::HTTP_2,
        _ => Version::HTTP_11,
    };
    let _ = method.as_str();
    let uri = Uri::try_from(target).ok()?;
    exercise_uri(&uri);
    Some(TargetCase {
        upstream,
        method,
        version,
        uri,
        local,
    })
}

/// The proxy's request-target check on a parsed case: never panics, and
/// `CONNECT` is always refused.
pub(crate) fn check_target(case: &TargetCase) {
    use sso_token_proxy::proxy::{Refusal, TargetCheck};
    let result =
        TargetCheck::new(&case.upstream).check(&case.method, case.version, &case.uri, case.local);
    if case.method == Method::CONNECT {
        assert_eq!(result, Err(Refusal::Connect), "CONNECT must be refused");
    }
}

fn trim_cr(line: &[u8]) -> &[u8] {
    line.strip_suffix(b"\r").unwrap_or(line)
}

/// Every accessor the proxy's target check and forwarder use.
fn exercise_uri(uri: &Uri) {
    let _ = uri.scheme_str();
    let _ = uri.path();
    let _ = uri.query();
    let _ = uri.path_and_query().map(|p| p.as_str());
    if let Some(a) = uri.authority() {
        let _ = a.host();
        let _ = a.port_u16();
        let _ = a.as_str().contains('@');
    }
    let _ = uri.to_string();
}

// === path_normalize ===

/// Parses `base path \n target` (the target as a request's path and query
/// would be), joins the target under the base with both escaped-slash
/// policies, and checks what the proxy promises: the joined path never
/// leaves the base path, however an upstream reads dot segments, encoded
/// slashes, backslashes or `;` parameters; the query is kept byte for
/// byte; plain targets are never refused.
pub(crate) fn path_normalize(data: &[u8]) {
    use http::uri::PathAndQuery;
    use sso_token_proxy::proxy::{EscapedSlashes, UpstreamPath};

    let mut lines = data.splitn(2, |&b| b == b'\n');
    let base_line = trim_cr(lines.next().unwrap_or_default());
    let target_line = trim_cr(lines.next().unwrap_or_default());
    // A base path as an upstream URL carries it.
    let base = std::str::from_utf8(base_line)
        .ok()
        .and_then(|b| Uri::try_from(format!("http://up{b}")).ok())
        .filter(|u| u.query().is_none())
        .map_or_else(|| "/api".to_owned(), |u| u.path().to_owned());
    let Ok(target) = PathAndQuery::try_from(target_line) else {
        return;
    };
    for policy in [EscapedSlashes::Keep, EscapedSlashes::Reject] {
        let upstream = UpstreamPath::new(&base, policy);
        let Ok(joined) = upstream.join(Some(&target)) else {
            assert!(
                !is_plain_target(target.path().as_bytes()),
                "a plain target was refused: {target}"
            );
            continue;
        };
        let base = upstream.base();
        let path = joined.path().as_bytes();
        assert!(path.starts_with(base), "{joined} is not under {base:?}");
        let rest = &path[base.len()..];
        assert_eq!(
            rest.first(),
            Some(&b'/'),
            "{joined} does not continue {base:?}"
        );
        assert!(stays_within(rest), "{joined} leaves {base:?}");
        assert_eq!(joined.query(), target.query(), "the query changed");
        if policy == EscapedSlashes::Reject {
            assert!(!has_slash_escape(rest), "{joined} kept an escaped slash");
        }
        if !is_plain_target(target.path().as_bytes()) {
            // Normalised: no dot segment and no empty segment is left.
            let segments: Vec<&[u8]> = rest[1..].split(|&b| b == b'/').collect();
            for (i, segment) in segments.iter().enumerate() {
                let last = i + 1 == segments.len();
                let decoded = percent_decode(segment);
                assert!(
                    decoded != b"." && decoded != b"..",
                    "{joined} keeps a dot segment"
                );
                assert!(
                    !segment.is_empty() || last,
                    "{joined} keeps an empty segment"
                );
            }
        }
    }
}

/// Walks `path` as the most lenient upstream would: `/`, `\`, `%2F` and
/// `%5C` separate segments, a segment's `;` parameters are ignored and its
/// percent-encodings decoded. True when it never climbs above its root.
fn stays_within(path: &[u8]) -> bool {
    let mut normalised = Vec::with_capacity(path.len());
    let mut i = 0;
    while i < path.len() {
        if path[i] == b'\\' {
            normalised.push(b'/');
            i += 1;
        } else if is_slash_escape(&path[i..(i + 3).min(path.len())]) {
            normalised.push(b'/');
            i += 3;
        } else {
            normalised.push(path[i]);
            i += 1;
        }
    }
    let mut depth = 0i64;
    for segment in normalised.split(|&b| b == b'/') {
        let segment = segment.split(|&b| b == b';').next().unwrap_or_default();
        match percent_decode(segment).as_slice() {
            b"" | b"." => {}
            b".." => {
                depth -= 1;
                if depth < 0 {
                    return false;
                }
            }
            _ => depth += 1,
        }
    }
    true
}

/// A backslash, `%2F` or `%5C` anywhere in `bytes`.
fn has_slash_escape(bytes: &[u8]) -> bool {
    bytes.contains(&b'\\') || bytes.windows(3).any(is_slash_escape)
}

/// `bytes` is `%2F` or `%5C`, in any case.
fn is_slash_escape(bytes: &[u8]) -> bool {
    matches!(bytes, [b'%', b'2', f] if f.eq_ignore_ascii_case(&b'f'))
        || matches!(bytes, [b'%', b'5', c] if c.eq_ignore_ascii_case(&b'c'))
}

fn percent_decode(bytes: &[u8]) -> Vec<u8> {
    let hex = |b: u8| (b as char).to_digit(16).map(|d| d as u8);
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%'
            && let (Some(h), Some(l)) = (
                bytes.get(i + 1).copied().and_then(hex),
                bytes.get(i + 2).copied().and_then(hex),
            )
        {
            out.push(h * 16 + l);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    out
}

/// A path with nothing to normalise: it starts with `/`, and has no empty
/// segment, no segment with a `.` or `%`, and no backslash.
fn is_plain_target(path: &[u8]) -> bool {
    path.first() == Some(&b'/')
        && !path.contains(&b'\\')
        && path[1..].split(|&b| b == b'/').enumerate().all(|(i, s)| {
            let last = i + 1 == path[1..].split(|&b| b == b'/').count();
            (!s.is_empty() || last) && !s.contains(&b'.') && !s.contains(&b'%')
        })
}
