//! The AWS SSO token cache file (`~/.aws/sso/cache/<sha1>.json`), as the AWS
//! CLI and SDKs write it, and a source that uses and refreshes it.

use std::{
    fmt,
    path::{Path, PathBuf},
    time::{Duration, SystemTime},
};

use serde::{Deserialize, Serialize};
use tower::ServiceExt;

use super::{FetchFuture, Reuse, Token, TokenError, TokenSource};
use crate::{
    fs_atomic, metric_names,
    oidc::{CreateTokenRequest, OidcClient},
    retry::OidcRetryPolicy,
    secret::Secret,
};

/// Contents of an AWS SSO cache file. Keys this version does not know are
/// kept and written back.
#[derive(Clone, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SsoCacheFile {
    /// The AWS access portal URL.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start_url: Option<String>,
    /// Region of the Identity Center instance.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub region: Option<String>,
    /// The access token.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub access_token: Option<Secret>,
    /// Expiry of the access token, RFC 3339 (`Z`, fractions, or `UTC`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<String>,
    /// The registered client.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_id: Option<String>,
    /// Its secret.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_secret: Option<Secret>,
    /// When the client registration expires.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub registration_expires_at: Option<String>,
    /// The refresh token.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub refresh_token: Option<Secret>,
    /// Keys this version does not know.
    #[serde(flatten)]
    pub extra: serde_json::Map<String, serde_json::Value>,
}

impl fmt::Debug for SsoCacheFile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SsoCacheFile")
            .field("start_url", &self.start_url)
            .field("region", &self.region)
            .field("access_token", &self.access_token)
            .field("expires_at", &self.expires_at)
            .field("client_id", &self.client_id)
            .field("client_secret", &self.client_secret)
            .field("registration_expires_at", &self.registration_expires_at)
            .field("refresh_token", &self.refresh_token)
            .field("extra_keys", &self.extra.keys().collect::<Vec<_>>())
            .finish()
    }
}

/// Describes a JSON error by category and position only: serde messages for
/// type errors can quote the offending value, which may be a secret.
pub(crate) fn json_error_reason(e: &serde_json::Error) -> String {
    use serde_json::error::Category;
    let what = match e.classify() {
        Category::Io => "I/O error while reading",
        Category::Syntax => "not valid JSON",
        Category::Data => "JSON of the wrong shape",
        Category::Eof => "JSON ends early (truncated?)",
    };
    format!("{what} at line {}, column {}", e.line(), e.column())
}

/// Parses an `expiresAt` timestamp: RFC 3339 with `Z`, optional fractional
/// seconds, a `UTC` suffix (older AWS CLIs), or a numeric offset.
pub fn parse_expires_at(text: &str) -> Result<SystemTime, String> {
    let text = text.trim();
    let bad = || format!("`{text}` is not an RFC 3339 timestamp");
    if let Some(base) = text.strip_suffix("UTC") {
        return humantime::parse_rfc3339_weak(base.trim_end()).map_err(|_| bad());
    }
    if let Some(base) = text.strip_suffix('Z').or_else(|| text.strip_suffix('z')) {
        return humantime::parse_rfc3339_weak(base).map_err(|_| bad());
    }
    // A numeric offset: `+HH:MM` or `-HH:MM` after the time part.
    if text.len() > 6 && text.is_char_boundary(text.len() - 6) {
        let (base, offset) = text.split_at(text.len() - 6);
        let b = offset.as_bytes();
        if offset.is_ascii() && (b[0] == b'+' || b[0] == b'-') && b[3] == b':' && base.contains('T')
        {
            let hours: u64 = offset[1..3].parse().map_err(|_| bad())?;
            let minutes: u64 = offset[4..6].parse().map_err(|_| bad())?;
            let shift = Duration::from_secs(hours * 3600 + minutes * 60);
            let local = humantime::parse_rfc3339_weak(base).map_err(|_| bad())?;
            return Ok(if b[0] == b'+' {
                local - shift
            } else {
                local + shift
            });
        }
    }
    humantime::parse_rfc3339_weak(text).map_err(|_| bad())
}

/// Formats a time the way the AWS CLI writes `expiresAt`.
pub(crate) fn format_time(t: SystemTime) -> String {
    humantime::format_rfc3339_seconds(t).to_string()
}

impl SsoCacheFile {
    /// Reads and validates a cache file. Missing, empty, truncated or
    /// corrupt files are errors naming the path.
    pub fn load(path: &Path) -> Result<Self, TokenError> {
        let file_error = |reason: String| TokenError::File {
            path: path.display().to_string(),
            reason,
        };
        let bytes = std::fs::read(path).map_err(|e| {
            if e.kind() == std::io::ErrorKind::NotFound {
                file_error(
                    "SSO cache file does not exist; run `sso-token-proxy login` or `aws sso login`"
                        .to_owned(),
                )
            } else {
                file_error(format!("cannot read SSO cache file: {e}"))
            }
        })?;
        Self::parse(&bytes, path)
    }

    /// Parses and validates cache file contents; `path` is only used in
    /// error messages.
    pub fn parse(bytes: &[u8], path: &Path) -> Result<Self, TokenError> {
        let file_error = |reason: String| TokenError::File {
            path: path.display().to_string(),
            reason,
        };
        if bytes.iter().all(u8::is_ascii_whitespace) {
            return Err(file_error(
                "SSO cache file is empty (truncated?)".to_owned(),
            ));
        }
        let file: Self = serde_json::from_slice(bytes).map_err(|e| {
            file_error(format!(
                "SSO cache file is corrupt: {}",
                json_error_reason(&e)
            ))
        })?;
        for (key, value) in [
            ("expiresAt", &file.expires_at),
            ("registrationExpiresAt", &file.registration_expires_at),
        ] {
            if let Some(v) = value {
                parse_expires_at(v).map_err(|reason| file_error(format!("{key}: {reason}")))?;
            }
        }
        Ok(file)
    }

    /// Writes the file atomically (mode 0600).
    pub fn store(&self, path: &Path) -> Result<(), TokenError> {
        let bytes = serde_json::to_vec_pretty(self).expect("cache file serialises");
        fs_atomic::write_atomic(path, &bytes).map_err(|e| TokenError::File {
            path: path.display().to_string(),
            reason: format!("cannot write SSO cache file: {e}"),
        })
    }

    /// The access token, if present and parseable, with its expiry.
    pub fn token(&self) -> Option<Token> {
        let access = self.access_token.clone().filter(|t| !t.is_empty())?;
        let expires = parse_expires_at(self.expires_at.as_deref()?).ok()?;
        Some(Token::expiring_at(access, expires).with_refresh_token(self.refresh_token.clone()))
    }
}

/// Uses and refreshes an AWS SSO cache file. The file is re-read on every
/// fetch, so a concurrent `aws sso login` is picked up.
pub struct SsoCacheSource {
    path: PathBuf,
    oidc: OidcClient,
    policy: OidcRetryPolicy,
    scopes: Vec<String>,
    lock: tokio::sync::Mutex<()>,
}

impl fmt::Debug for SsoCacheSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SsoCacheSource")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

impl SsoCacheSource {
    /// A source for the cache file at `path`. The file is validated now, so
    /// a corrupt file fails at start.
    ///
    /// ```no_run
    /// use sso_token_proxy::{
    ///     CacheOptions, OidcClient, SsoCacheSource, TokenCache, retry::OidcRetryPolicy,
    /// };
    ///
    /// # fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// // The file `aws sso login` wrote (its name is the SHA-1 of the session name).
    /// let path = "/home/me/.aws/sso/cache/0123456789abcdef0123456789abcdef01234567.json";
    /// let oidc = OidcClient::builder().region("us-east-1").build()?;
    /// let source = SsoCacheSource::new(path, oidc, OidcRetryPolicy::new(Default::default()), Vec::new())?;
    /// let cache = TokenCache::new(source, CacheOptions::default());
    /// # let _ = cache;
    /// # Ok(())
    /// # }
    /// ```
    pub fn new(
        path: impl Into<PathBuf>,
        oidc: OidcClient,
        policy: OidcRetryPolicy,
        scopes: Vec<String>,
    ) -> Result<Self, TokenError> {
        let path = path.into();
        SsoCacheFile::load(&path)?;
        Ok(Self {
            path,
            oidc,
            policy,
            scopes,
            lock: tokio::sync::Mutex::new(()),
        })
    }

    /// The cache file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    async fn fetch_inner(&self, reuse: Reuse) -> Result<Token, TokenError> {
        let _guard = self.lock.lock().await;
        let path = self.path.clone();
        let mut file = load_blocking(path.clone()).await?;
        if let (Reuse::IfValidFor(min), Some(token)) = (reuse, file.token())
            && token.ttl() >= min
        {
            return Ok(token.with_scopes(self.scopes.clone()));
        }
        let missing = |what: &str| {
            TokenError::NoRefreshToken(format!(
                "{} has no {what}; log in again with `sso-token-proxy login` or `aws sso login`",
                path.display()
            ))
        };
        let client_id = file.client_id.clone().ok_or_else(|| missing("clientId"))?;
        let client_secret = file
            .client_secret
            .clone()
            .ok_or_else(|| missing("clientSecret"))?;
        let refresh_token = file
            .refresh_token
            .clone()
            .ok_or_else(|| missing("refreshToken"))?;
        if let Some(exp) = file
            .registration_expires_at
            .as_deref()
            .and_then(|s| parse_expires_at(s).ok())
            && exp <= SystemTime::now()
        {
            return Err(TokenError::NoRefreshToken(format!(
                "{}: the client registration expired; log in again",
                path.display()
            )));
        }

        let request = CreateTokenRequest::refresh(client_id, client_secret, refresh_token)
            .with_scopes(self.scopes.clone());
        let response = tower::retry::Retry::new(self.policy.clone(), self.oidc.clone())
            .oneshot(request)
            .await?;
        let token = Token::from_response(&response)?.with_scopes(self.scopes.clone());

        file.access_token = Some(token.access_token().clone());
        file.expires_at = Some(format_time(token.expires_at_wall()));
        if let Some(rotated) = &response.refresh_token {
            file.refresh_token = Some(rotated.clone());
        }
        let write = tokio::task::spawn_blocking(move || file.store(&path))
            .await
            .unwrap_or_else(|e| {
                Err(TokenError::File {
                    path: self.path.display().to_string(),
                    reason: format!("writer task failed: {e}"),
                })
            });
        if let Err(e) = write {
            // The new refresh token is in the returned token; keep serving.
            metrics::counter!(metric_names::PERSIST_FAILURES_TOTAL.name).increment(1);
            tracing::error!(error = %e, "could not write the refreshed SSO cache file");
        }
        Ok(token)
    }
}

async fn load_blocking(path: PathBuf) -> Result<SsoCacheFile, TokenError> {
    let shown = path.display().to_string();
    tokio::task::spawn_blocking(move || SsoCacheFile::load(&path))
        .await
        .unwrap_or_else(|e| {
            Err(TokenError::File {
                path: shown,
                reason: format!("reader task failed: {e}"),
            })
        })
}

impl TokenSource for SsoCacheSource {
    fn identity(&self) -> String {
        format!("sso_cache:{}", self.path.display())
    }

    fn scopes(&self) -> &[String] {
        &self.scopes
    }

    fn fetch(&self, reuse: Reuse) -> FetchFuture<'_> {
        Box::pin(self.fetch_inner(reuse))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::UNIX_EPOCH;

    #[test]
    fn expires_at_forms() {
        let want = UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        for s in [
            "2023-11-14T22:13:20Z",
            "2023-11-14T22:13:20UTC",
            "2023-11-14T22:13:20.000Z",
            "2023-11-14T23:13:20+01:00",
            "2023-11-14T21:13:20-01:00",
        ] {
            assert_eq!(parse_expires_at(s).unwrap(), want, "{s}");
        }
        let frac = parse_expires_at("2023-11-14T22:13:20.5Z").unwrap();
        assert_eq!(frac, want + Duration::from_millis(500));
        assert!(parse_expires_at("yesterday").is_err());
        assert!(parse_expires_at("2023-11-14T22:13:20+0é:00").is_err());
        assert!(parse_expires_at("ééééééééé").is_err());
        assert_eq!(format_time(want), "2023-11-14T22:13:20Z");
    }

    #[test]
    fn json_errors_do_not_quote_values() {
        let e = serde_json::from_str::<SsoCacheFile>(r#"{"accessToken": ["S3CRET"]}"#).unwrap_err();
        assert!(!json_error_reason(&e).contains("S3CRET"));
    }
}
