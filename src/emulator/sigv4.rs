//! SigV4 verification of `CreateTokenWithIAM` calls against the emulator's
//! test credentials.
//!
//! Written from the Signature Version 4 specification, independently of the
//! `aws-sigv4` crate that signs the project's own requests, so each checks
//! the other; botocore's signer is the third party both must agree with.
//! Checked against AWS's public SigV4 test suite in the tests below.
//!
//! Failures are answered as AWS answers them (AWS API references, "Common
//! Errors": `MissingAuthenticationToken`, `IncompleteSignature` and
//! `UnrecognizedClientException` are HTTP 403; restJson services such as
//! Lambda name a signature mismatch `InvalidSignatureException`, also 403):
//! the type in `x-amzn-ErrorType` and a JSON body `{"message": ...}`.

use std::time::{Duration, SystemTime};

use http::{HeaderMap, StatusCode, request::Parts};
use ring::{digest, hmac};

use crate::secret::Secret;

/// The only algorithm SigV4 header authentication uses.
const ALGORITHM: &str = "AWS4-HMAC-SHA256";
/// The signing name of IAM Identity Center OIDC.
const SERVICE: &str = "sso-oauth";
/// How far the request time may be from the emulator's clock.
const MAX_SKEW: Duration = Duration::from_secs(5 * 60);

/// A key pair (and session token) the emulator accepts.
#[derive(Debug, Clone)]
pub struct TestAwsCredentials {
    /// The access key id.
    pub access_key_id: String,
    /// The secret access key.
    pub secret_access_key: Secret,
    /// The session token temporary credentials carry, if any.
    pub session_token: Option<Secret>,
}

/// Why a request's signature was refused, as AWS would say it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Rejection {
    /// The error type, e.g. `InvalidSignatureException`.
    pub(crate) error_type: &'static str,
    /// HTTP status.
    pub(crate) status: StatusCode,
    /// The `message` member.
    pub(crate) message: String,
}

impl Rejection {
    fn new(error_type: &'static str, message: impl Into<String>) -> Self {
        Self {
            error_type,
            status: StatusCode::FORBIDDEN,
            message: message.into(),
        }
    }

    /// The kind name for the emulator's error counters (type without the
    /// `Exception` suffix).
    pub(crate) fn label(&self) -> &'static str {
        self.error_type
            .strip_suffix("Exception")
            .unwrap_or(self.error_type)
    }
}

fn signature_mismatch() -> Rejection {
    Rejection::new(
        "InvalidSignatureException",
        "The request signature we calculated does not match the signature you provided. \
         Check your AWS Secret Access Key and signing method. Consult the service documentation for details.",
    )
}

fn unrecognized() -> Rejection {
    Rejection::new(
        "UnrecognizedClientException",
        "The security token included in the request is invalid.",
    )
}

fn incomplete(message: &str) -> Rejection {
    Rejection::new("IncompleteSignatureException", message)
}

/// The parts of an `Authorization: AWS4-HMAC-SHA256 ...` header.
struct AuthorizationHeader<'a> {
    access_key_id: &'a str,
    date: &'a str,
    region: &'a str,
    service: &'a str,
    signed_headers: Vec<&'a str>,
    signature: &'a str,
}

fn parse_authorization(value: &str) -> Result<AuthorizationHeader<'_>, Rejection> {
    let rest = value
        .strip_prefix(ALGORITHM)
        .filter(|r| r.starts_with(' '))
        .ok_or_else(|| incomplete("Unsupported signature algorithm; use AWS4-HMAC-SHA256."))?;
    let (mut credential, mut signed, mut signature) = (None, None, None);
    for item in rest.split(',') {
        match item.trim().split_once('=') {
            Some(("Credential", v)) => credential = Some(v),
            Some(("SignedHeaders", v)) => signed = Some(v),
            Some(("Signature", v)) => signature = Some(v),
            _ => {}
        }
    }
    let (Some(credential), Some(signed), Some(signature)) = (credential, signed, signature) else {
        return Err(incomplete(
            "Authorization header requires 'Credential', 'SignedHeaders' and 'Signature' parameters.",
        ));
    };
    let scope: Vec<&str> = credential.split('/').collect();
    let [access_key_id, date, region, service, terminator] = scope[..] else {
        return Err(incomplete(
            "Credential must have the form ACCESS_KEY_ID/YYYYMMDD/REGION/SERVICE/aws4_request.",
        ));
    };
    if terminator != "aws4_request" {
        return Err(signature_mismatch());
    }
    Ok(AuthorizationHeader {
        access_key_id,
        date,
        region,
        service,
        signed_headers: signed.split(';').collect(),
        signature,
    })
}

/// `20150830T123600Z` as a time.
fn parse_amz_date(text: &str) -> Option<SystemTime> {
    let b = text.as_bytes();
    if b.len() != 16 || b[8] != b'T' || b[15] != b'Z' {
        return None;
    }
    let rfc3339 = format!(
        "{}-{}-{}T{}:{}:{}Z",
        &text[0..4],
        &text[4..6],
        &text[6..8],
        &text[9..11],
        &text[11..13],
        &text[13..15]
    );
    humantime::parse_rfc3339(&rfc3339).ok()
}

fn format_amz_date(time: SystemTime) -> String {
    // `2015-08-30T12:36:00Z` → `20150830T123600Z`
    humantime::format_rfc3339_seconds(time)
        .to_string()
        .replace(['-', ':'], "")
}

/// Checks the SigV4 signature of a request against `credentials`; on
/// success returns the access key id that signed it.
pub(crate) fn verify(
    parts: &Parts,
    body: &[u8],
    credentials: &[TestAwsCredentials],
    now: SystemTime,
) -> Result<String, Rejection> {
    let Some(value) = parts.headers.get(http::header::AUTHORIZATION) else {
        return Err(Rejection::new(
            "MissingAuthenticationTokenException",
            "Missing Authentication Token",
        ));
    };
    let value = value.to_str().map_err(|_| signature_mismatch())?;
    let auth = parse_authorization(value)?;
    let Some(creds) = credentials
        .iter()
        .find(|c| c.access_key_id == auth.access_key_id)
    else {
        return Err(unrecognized());
    };

    let amz_date = header_text(&parts.headers, "x-amz-date").ok_or_else(|| {
        incomplete("Authorization header requires existence of a 'X-Amz-Date' header.")
    })?;
    let time = parse_amz_date(amz_date)
        .ok_or_else(|| incomplete("X-Amz-Date must have the form YYYYMMDDTHHMMSSZ."))?;
    if !amz_date.starts_with(auth.date) || auth.date.len() != 8 {
        return Err(Rejection::new(
            "InvalidSignatureException",
            "Date in Credential scope does not match YYYYMMDD from ISO-8601 version of date from HTTP.",
        ));
    }
    if auth.service != SERVICE {
        return Err(Rejection::new(
            "InvalidSignatureException",
            format!("Credential should be scoped to correct service: '{SERVICE}'."),
        ));
    }
    if now.duration_since(time).is_ok_and(|d| d > MAX_SKEW) {
        return Err(Rejection::new(
            "InvalidSignatureException",
            format!(
                "Signature expired: {amz_date} is now earlier than {} ({} - 5 min.)",
                format_amz_date(now - MAX_SKEW),
                format_amz_date(now)
            ),
        ));
    }
    if time.duration_since(now).is_ok_and(|d| d > MAX_SKEW) {
        return Err(Rejection::new(
            "InvalidSignatureException",
            format!(
                "Signature not yet current: {amz_date} is still later than {} ({} + 5 min.)",
                format_amz_date(now + MAX_SKEW),
                format_amz_date(now)
            ),
        ));
    }
    let token = header_text(&parts.headers, "x-amz-security-token");
    match (&creds.session_token, token) {
        (None, None) => {}
        (Some(expected), Some(got)) if expected.expose() == got => {}
        _ => return Err(unrecognized()),
    }
    for required in ["host", "x-amz-date"] {
        if !auth.signed_headers.contains(&required) {
            return Err(signature_mismatch());
        }
    }
    if token.is_some() && !auth.signed_headers.contains(&"x-amz-security-token") {
        return Err(signature_mismatch());
    }

    let canonical = canonical_request(parts, body, &auth.signed_headers)?;
    let scope = format!(
        "{}/{}/{}/aws4_request",
        auth.date, auth.region, auth.service
    );
    let string_to_sign = format!(
        "{ALGORITHM}\n{amz_date}\n{scope}\n{}",
        hex(digest::digest(&digest::SHA256, canonical.as_bytes()).as_ref())
    );
    let key = signing_key(
        &creds.secret_access_key,
        auth.date,
        auth.region,
        auth.service,
    );
    let provided = unhex(auth.signature).ok_or_else(signature_mismatch)?;
    hmac::verify(&key, string_to_sign.as_bytes(), &provided).map_err(|_| signature_mismatch())?;
    Ok(creds.access_key_id.clone())
}

fn header_text<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers.get(name).and_then(|v| v.to_str().ok())
}

/// The canonical request of SigV4 (method, path, query, signed headers,
/// payload hash), or a mismatch when a signed header is absent.
fn canonical_request(parts: &Parts, body: &[u8], signed: &[&str]) -> Result<String, Rejection> {
    let mut out = String::new();
    out.push_str(parts.method.as_str());
    out.push('\n');
    // Non-S3 services sign the path URI-encoded once more (double
    // encoding), as botocore and aws-sigv4 both do.
    out.push_str(&uri_encode(parts.uri.path(), false));
    out.push('\n');
    let mut query: Vec<(String, String)> = parts
        .uri
        .query()
        .unwrap_or("")
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|pair| {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            (
                uri_encode(&percent_decode(k), true),
                uri_encode(&percent_decode(v), true),
            )
        })
        .collect();
    query.sort();
    let query: Vec<String> = query.into_iter().map(|(k, v)| format!("{k}={v}")).collect();
    out.push_str(&query.join("&"));
    out.push('\n');
    let mut names: Vec<&str> = signed.to_vec();
    names.sort_unstable();
    for name in &names {
        let values: Vec<String> = if *name == "host" && !parts.headers.contains_key("host") {
            // HTTP/2 carries the host in `:authority`, which lands in the URI.
            parts
                .uri
                .authority()
                .map(|a| vec![a.as_str().to_owned()])
                .ok_or_else(signature_mismatch)?
        } else {
            let all: Vec<String> = parts
                .headers
                .get_all(*name)
                .iter()
                .map(|v| collapse_spaces(&String::from_utf8_lossy(v.as_bytes())))
                .collect();
            if all.is_empty() {
                return Err(signature_mismatch());
            }
            all
        };
        out.push_str(name);
        out.push(':');
        out.push_str(&values.join(","));
        out.push('\n');
    }
    out.push('\n');
    out.push_str(&names.join(";"));
    out.push('\n');
    out.push_str(&hex(digest::digest(&digest::SHA256, body).as_ref()));
    Ok(out)
}

/// Trims a header value and turns runs of spaces into one.
fn collapse_spaces(value: &str) -> String {
    value.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// kSigning = HMAC(HMAC(HMAC(HMAC("AWS4" + secret, date), region), service), "aws4_request")
fn signing_key(secret: &Secret, date: &str, region: &str, service: &str) -> hmac::Key {
    let mut key = hmac::Key::new(
        hmac::HMAC_SHA256,
        format!("AWS4{}", secret.expose()).as_bytes(),
    );
    for part in [date, region, service, "aws4_request"] {
        let tag = hmac::sign(&key, part.as_bytes());
        key = hmac::Key::new(hmac::HMAC_SHA256, tag.as_ref());
    }
    key
}

/// SigV4's URI encoding: every byte but `A-Za-z0-9-_.~` as `%XX`; `/` kept
/// unless `encode_slash`.
fn uri_encode(text: &str, encode_slash: bool) -> String {
    let mut out = String::with_capacity(text.len());
    for b in text.bytes() {
        match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                out.push(char::from(b));
            }
            b'/' if !encode_slash => out.push('/'),
            b => out.push_str(&format!("%{b:02X}")),
        }
    }
    out
}

/// Decodes `%XX` escapes (a `+` stays a `+`: this is not form encoding).
fn percent_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%'
            && let Some(b) = text
                .get(i + 1..i + 3)
                .and_then(|h| u8::from_str_radix(h, 16).ok())
        {
            out.push(b);
            i += 3;
            continue;
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(text: &str) -> Option<Vec<u8>> {
    if !text.len().is_multiple_of(2) {
        return None;
    }
    (0..text.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(text.get(i..i + 2)?, 16).ok())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The credentials of AWS's SigV4 test suite.
    fn suite_credentials(token: Option<&str>) -> Vec<TestAwsCredentials> {
        vec![TestAwsCredentials {
            access_key_id: "AKIDEXAMPLE".into(),
            secret_access_key: Secret::new("wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY"),
            session_token: token.map(Secret::new),
        }]
    }

    fn suite_time() -> SystemTime {
        parse_amz_date("20150830T123600Z").unwrap()
    }

    fn parts(method: &str, target: &str, headers: &[(&str, &str)]) -> Parts {
        let mut b = http::Request::builder().method(method).uri(target);
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        b.body(()).unwrap().into_parts().0
    }

    /// Re-signs a test-suite request for the `sso-oauth` scope with our own
    /// code path, then checks both the suite's service scope and ours.
    fn suite_signature(
        method: &str,
        target: &str,
        headers: &[(&str, &str)],
        body: &[u8],
    ) -> String {
        let p = parts(method, target, headers);
        let signed: Vec<&str> = {
            let mut v: Vec<&str> = p.headers.keys().map(|k| k.as_str()).collect();
            v.sort_unstable();
            v.dedup();
            v
        };
        let canonical = canonical_request(&p, body, &signed).unwrap();
        let sts = format!(
            "{ALGORITHM}\n20150830T123600Z\n20150830/us-east-1/service/aws4_request\n{}",
            hex(digest::digest(&digest::SHA256, canonical.as_bytes()).as_ref())
        );
        let key = signing_key(
            &suite_credentials(None)[0].secret_access_key,
            "20150830",
            "us-east-1",
            "service",
        );
        hex(hmac::sign(&key, sts.as_bytes()).as_ref())
    }

    #[test]
    fn canonicalisation_matches_the_aws_sigv4_test_suite() {
        // Expected signatures from AWS's SigV4 test suite (v4/<name>/header-signature.txt).
        let host = ("host", "example.amazonaws.com");
        let date = ("x-amz-date", "20150830T123600Z");
        assert_eq!(
            suite_signature("GET", "/", &[host, date], b""),
            "5fa00fa31553b73ebf1942676e86291e8372ff2a2260956d9b8aae1d763fbf31",
            "get-vanilla"
        );
        assert_eq!(
            suite_signature("GET", "/?Param2=value2&Param1=value1", &[host, date], b""),
            "b97d918cfa904a5beff61c982a1b6f458b799221646efd99d3219ec94cdf2500",
            "get-vanilla-query-order-key-case"
        );
        assert_eq!(
            suite_signature(
                "GET",
                "/",
                &[
                    host,
                    ("my-header1", " value1"),
                    ("my-header2", "\"a   b   c\""),
                    date
                ],
                b""
            ),
            "acc3ed3afb60bb290fc8d2dd0098b9911fcaa05412b367055dee359757a9c736",
            "get-header-value-trim"
        );
        assert_eq!(
            suite_signature(
                "POST",
                "/",
                &[
                    ("content-type", "application/x-www-form-urlencoded"),
                    host,
                    ("content-length", "13"),
                    date,
                    (
                        "x-amz-content-sha256",
                        "9095672bbd1f56dfc5b65f3e153adc8731a4a654192329106275f4c7b24d0b6e"
                    ),
                ],
                b"Param1=value1"
            ),
            "d3875051da38690788ef43de4db0d8f280229d82040bfac253562e56c3f20e0b",
            "post-x-www-form-urlencoded"
        );
    }

    /// A request signed here for `sso-oauth`, then verified.
    fn signed(secret: &str, token: Option<&str>, at: SystemTime) -> (Parts, Vec<u8>) {
        let body =
            br#"{"clientId":"arn:x","grantType":"urn:ietf:params:oauth:grant-type:jwt-bearer"}"#
                .to_vec();
        let amz_date = format_amz_date(at);
        let mut headers = vec![
            ("content-type", "application/json".to_owned()),
            ("host", "127.0.0.1:8999".to_owned()),
            ("x-amz-date", amz_date.clone()),
        ];
        if let Some(t) = token {
            headers.push(("x-amz-security-token", t.to_owned()));
        }
        let header_refs: Vec<(&str, &str)> =
            headers.iter().map(|(k, v)| (*k, v.as_str())).collect();
        let p = parts("POST", "/token?aws_iam=t", &header_refs);
        let mut names: Vec<&str> = header_refs.iter().map(|(k, _)| *k).collect();
        names.sort_unstable();
        let canonical = canonical_request(&p, &body, &names).unwrap();
        let day = &amz_date[..8];
        let sts = format!(
            "{ALGORITHM}\n{amz_date}\n{day}/us-east-1/sso-oauth/aws4_request\n{}",
            hex(digest::digest(&digest::SHA256, canonical.as_bytes()).as_ref())
        );
        let key = signing_key(&Secret::new(secret), day, "us-east-1", "sso-oauth");
        let sig = hex(hmac::sign(&key, sts.as_bytes()).as_ref());
        let auth = format!(
            "AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE/{day}/us-east-1/sso-oauth/aws4_request, SignedHeaders={}, Signature={sig}",
            names.join(";")
        );
        let mut all = header_refs.clone();
        all.push(("authorization", &auth));
        (parts("POST", "/token?aws_iam=t", &all), body)
    }

    #[test]
    fn good_signature_passes_and_every_defect_is_refused() {
        let creds = suite_credentials(None);
        let now = SystemTime::now();
        let good = "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY";
        let (p, body) = signed(good, None, now);
        assert_eq!(verify(&p, &body, &creds, now).unwrap(), "AKIDEXAMPLE");

        let kind = |r: Result<String, Rejection>| r.unwrap_err().error_type;
        let (p, body) = signed("wrong-secret", None, now);
        assert_eq!(
            kind(verify(&p, &body, &creds, now)),
            "InvalidSignatureException"
        );
        let (p, _) = signed(good, None, now);
        assert_eq!(
            kind(verify(&p, b"{}", &creds, now)),
            "InvalidSignatureException"
        );
        let (p, body) = signed(good, None, now - Duration::from_secs(600));
        let e = verify(&p, &body, &creds, now).unwrap_err();
        assert!(e.message.starts_with("Signature expired"), "{e:?}");
        assert_eq!(e.status, StatusCode::FORBIDDEN);
        let (p, body) = signed(good, None, now);
        assert_eq!(
            kind(verify(&p, &body, &[], now)),
            "UnrecognizedClientException"
        );
        let bare = parts("POST", "/token?aws_iam=t", &[("host", "x")]);
        assert_eq!(
            kind(verify(&bare, b"", &creds, now)),
            "MissingAuthenticationTokenException"
        );
        let junk = parts(
            "POST",
            "/token?aws_iam=t",
            &[("authorization", "AWS4-HMAC-SHA256 Credential=x")],
        );
        assert_eq!(
            kind(verify(&junk, b"", &creds, now)),
            "IncompleteSignatureException"
        );

        // Session tokens: required when configured, refused when not.
        let with_token = suite_credentials(Some("tok"));
        let (p, body) = signed(good, Some("tok"), now);
        assert!(verify(&p, &body, &with_token, now).is_ok());
        assert_eq!(
            kind(verify(&p, &body, &creds, now)),
            "UnrecognizedClientException"
        );
        let (p, body) = signed(good, Some("other"), now);
        assert_eq!(
            kind(verify(&p, &body, &with_token, now)),
            "UnrecognizedClientException"
        );
        let (p, body) = signed(good, None, now);
        assert_eq!(
            kind(verify(&p, &body, &with_token, now)),
            "UnrecognizedClientException"
        );
    }

    #[test]
    fn amz_dates_round_trip() {
        let t = suite_time();
        assert_eq!(format_amz_date(t), "20150830T123600Z");
        assert!(parse_amz_date("2015-08-30T12:36:00Z").is_none());
    }
}
