//! The AWS SSO token cache file (`~/.aws/sso/cache/<sha1>.json`), as the AWS
//! CLI and SDKs write it, and a source that uses and refreshes it.

use std::{
    fmt,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::{Duration, SystemTime},
};

use serde::{Deserialize, Serialize};
use tokio::time::Instant;
use tower::ServiceExt;

use super::{
    FetchFuture, Reuse, Token, TokenError, TokenSource,
    persist::{PersistStatus, Rendered, TokenFileFormat, TokenFileWriter},
};
use crate::{
    fs_atomic,
    oidc::{CreateTokenRequest, OidcClient, ServiceErrorKind},
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
    // The value is not quoted: a file mangled by another writer may hold a
    // token where the timestamp belongs.
    let bad = || format!("not an RFC 3339 timestamp ({} characters)", text.len());
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

    /// When the client registration expires, on tokio's clock (the past
    /// clamps to now), if the file says.
    pub fn registration_expires_at(&self) -> Option<Instant> {
        let at = parse_expires_at(self.registration_expires_at.as_deref()?).ok()?;
        let left = at
            .duration_since(SystemTime::now())
            .unwrap_or(Duration::ZERO);
        Some(Instant::now() + left)
    }

    /// The access token, if present and parseable, with its expiry.
    pub fn token(&self) -> Option<Token> {
        let access = self.access_token.clone().filter(|t| !t.is_empty())?;
        let expires = parse_expires_at(self.expires_at.as_deref()?).ok()?;
        Some(Token::expiring_at(access, expires).with_refresh_token(self.refresh_token.clone()))
    }
}

/// Uses and refreshes an AWS SSO cache file, which the AWS CLI and SDKs
/// may rewrite at any time.
///
/// The file is re-read before every refresh, and again when a refresh is
/// refused with `InvalidGrant`: tokens another process wrote there that are
/// newer than the ones held (a later `expiresAt`) are adopted instead of
/// redeeming a refresh token that may have been rotated away. The newest
/// tokens are always held in memory; when writing them back fails, the
/// write is retried (see the `persist` module) and meanwhile the held
/// tokens win over the file's older ones.
pub struct SsoCacheSource {
    path: PathBuf,
    oidc: OidcClient,
    policy: OidcRetryPolicy,
    scopes: Vec<String>,
    /// The newest contents known (from the file, or from a refresh whose
    /// write is still pending); locked across a refresh, so refreshes do not
    /// overlap.
    newest: tokio::sync::Mutex<Option<SsoCacheFile>>,
    /// Shared with the writer, which must not overwrite another process's
    /// newer tokens either.
    known: Arc<Mutex<KnownRefreshTokens>>,
    writer: TokenFileWriter<SsoCacheFormat>,
    /// `registrationExpiresAt` of the newest contents known.
    registration_expires_at: std::sync::Mutex<Option<Instant>>,
}

impl fmt::Debug for SsoCacheSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SsoCacheSource")
            .field("path", &self.path)
            .field("writer", &self.writer)
            .finish_non_exhaustive()
    }
}

/// How many refresh tokens this process held are remembered, to tell its
/// own stale writes from another process's new ones.
const KNOWN_REFRESH_TOKENS: usize = 16;

/// The refresh tokens this source has held, newest last. A file holding
/// one of them is stale (a write of ours failed or is pending); a file
/// holding one it never held was written by another process.
#[derive(Default)]
struct KnownRefreshTokens(std::collections::VecDeque<Secret>);

impl KnownRefreshTokens {
    fn remember(&mut self, token: Option<&Secret>) {
        let Some(token) = token else { return };
        if self.0.contains(token) {
            return;
        }
        if self.0.len() == KNOWN_REFRESH_TOKENS {
            self.0.pop_front();
        }
        self.0.push_back(token.clone());
    }

    /// Whether `on_disk` holds tokens another process wrote that are newer
    /// than `held`: a refresh token this source never held, or the same
    /// refresh token with another access token that expires later.
    fn written_by_another(&self, on_disk: &SsoCacheFile, held: &SsoCacheFile) -> bool {
        if on_disk.refresh_token != held.refresh_token {
            return on_disk
                .refresh_token
                .as_ref()
                .is_some_and(|t| !self.0.contains(t));
        }
        let expiry = |f: &SsoCacheFile| {
            f.expires_at
                .as_deref()
                .and_then(|e| parse_expires_at(e).ok())
        };
        on_disk.access_token != held.access_token
            && match (expiry(on_disk), expiry(held)) {
                (Some(theirs), Some(ours)) => theirs > ours,
                (Some(_), None) => true,
                (None, _) => false,
            }
    }
}

fn is_invalid_grant(e: &TokenError) -> bool {
    matches!(e, TokenError::Oidc(e) if e.service_kind() == Some(ServiceErrorKind::InvalidGrant))
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
        let file = SsoCacheFile::load(&path)?;
        let known = Arc::new(Mutex::new(KnownRefreshTokens::default()));
        Ok(Self {
            writer: TokenFileWriter::new(
                &path,
                SsoCacheFormat {
                    path: path.clone(),
                    known: Arc::clone(&known),
                },
            ),
            known,
            path,
            oidc,
            policy,
            scopes,
            newest: tokio::sync::Mutex::new(None),
            registration_expires_at: std::sync::Mutex::new(file.registration_expires_at()),
        })
    }

    /// The cache file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Whether the newest tokens are in the cache file.
    pub fn persistence(&self) -> PersistStatus {
        self.writer.status()
    }

    async fn fetch_inner(&self, reuse: Reuse) -> Result<Token, TokenError> {
        let mut newest = self.newest.lock().await;
        let held = self.reconcile(&mut newest).await?;
        *self
            .registration_expires_at
            .lock()
            .expect("registration lock") = held.registration_expires_at();
        if let (Reuse::IfValidFor(min), Some(token)) = (reuse, held.token())
            && token.ttl() >= min
        {
            return Ok(token.with_scopes(self.scopes.clone()));
        }
        let refreshed = match self.refresh(&held).await {
            Err(e) if is_invalid_grant(&e) => {
                // Another process may have redeemed and rotated the refresh
                // token since the file was read.
                let reread = self.reconcile(&mut newest).await?;
                if reread.refresh_token == held.refresh_token {
                    return Err(e);
                }
                tracing::warn!(
                    path = %self.path.display(),
                    "refresh token refused, but another process wrote newer tokens to the SSO cache file; using them"
                );
                if let Some(token) = reread.token() {
                    let usable = match reuse {
                        Reuse::IfValidFor(min) => token.ttl() >= min,
                        Reuse::Never => reread.access_token != held.access_token,
                    };
                    if usable && token.is_valid() {
                        return Ok(token.with_scopes(self.scopes.clone()));
                    }
                }
                self.refresh(&reread).await?
            }
            other => other?,
        };
        let (token, updated) = refreshed;
        self.known
            .lock()
            .expect("known tokens lock")
            .remember(updated.refresh_token.as_ref());
        *newest = Some(updated.clone());
        self.writer.persist(updated).await;
        Ok(token)
    }

    /// The newest tokens: the file's when another process wrote newer ones
    /// (or none are held yet), else the held ones (the file may be stale
    /// after a failed write). An unreadable file falls back to the held
    /// tokens.
    async fn reconcile(
        &self,
        newest: &mut Option<SsoCacheFile>,
    ) -> Result<SsoCacheFile, TokenError> {
        let on_disk = load_blocking(self.path.clone()).await;
        let mut known = self.known.lock().expect("known tokens lock");
        match (on_disk, newest.as_ref()) {
            (Ok(on_disk), Some(held)) if !known.written_by_another(&on_disk, held) => {
                Ok(held.clone())
            }
            (Ok(on_disk), held) => {
                if held.is_some() {
                    tracing::info!(
                        path = %self.path.display(),
                        "another process wrote newer tokens to the SSO cache file; using them"
                    );
                    // Theirs win over a write of ours still pending.
                    self.writer.abandon_pending();
                }
                known.remember(on_disk.refresh_token.as_ref());
                *newest = Some(on_disk.clone());
                Ok(on_disk)
            }
            (Err(e), Some(held)) => {
                tracing::warn!(
                    error = %e,
                    "cannot read the SSO cache file; using the tokens held in memory"
                );
                Ok(held.clone())
            }
            (Err(e), None) => Err(e),
        }
    }

    /// Redeems `file`'s refresh token: the new token, and `file` with it.
    async fn refresh(&self, file: &SsoCacheFile) -> Result<(Token, SsoCacheFile), TokenError> {
        let missing = |what: &str| {
            TokenError::NoRefreshToken(format!(
                "{} has no {what}; log in again with `sso-token-proxy login` or `aws sso login`",
                self.path.display()
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
                self.path.display()
            )));
        }
        let request = CreateTokenRequest::refresh(client_id, client_secret, refresh_token)
            .with_scopes(self.scopes.clone());
        let response = tower::retry::Retry::new(self.policy.clone(), self.oidc.clone())
            .oneshot(request)
            .await?;
        let token = Token::from_response(&response)?.with_scopes(self.scopes.clone());
        let mut updated = file.clone();
        updated.access_token = Some(token.access_token().clone());
        updated.expires_at = Some(format_time(token.expires_at_wall()));
        if let Some(rotated) = response.refresh_token.filter(|r| !r.is_empty()) {
            updated.refresh_token = Some(rotated);
        }
        Ok((token, updated))
    }
}

/// The SSO cache file as a [`TokenFileFormat`]: the newest tokens go into
/// the file as it is now, keeping every other key, unless the file holds
/// newer tokens another process wrote. A missing file is written anew; a
/// corrupt one is reported, never overwritten.
pub(crate) struct SsoCacheFormat {
    path: PathBuf,
    known: Arc<Mutex<KnownRefreshTokens>>,
}

impl TokenFileFormat for SsoCacheFormat {
    type Contents = SsoCacheFile;
    const WHAT: &'static str = "SSO cache file";

    fn render(&self, current: Option<&[u8]>, newest: &SsoCacheFile) -> Result<Rendered, String> {
        let merged = match current {
            None => newest.clone(),
            Some(bytes) => {
                let on_disk = SsoCacheFile::parse(bytes, &self.path).map_err(|e| {
                    format!("{e}; it is left alone (fix or remove it, or log in again)")
                })?;
                let known = self.known.lock().expect("known tokens lock");
                if known.written_by_another(&on_disk, newest) {
                    return Ok(Rendered::Superseded);
                }
                SsoCacheFile {
                    access_token: newest.access_token.clone(),
                    expires_at: newest.expires_at.clone(),
                    refresh_token: newest.refresh_token.clone(),
                    ..on_disk
                }
            }
        };
        serde_json::to_vec_pretty(&merged)
            .map(Rendered::Write)
            .map_err(|e| {
                format!(
                    "cannot serialise the SSO cache file: {}",
                    json_error_reason(&e)
                )
            })
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

    fn registration_expires_at(&self) -> Option<Instant> {
        *self
            .registration_expires_at
            .lock()
            .expect("registration lock")
    }

    fn scopes(&self) -> &[String] {
        &self.scopes
    }

    fn fetch(&self, reuse: Reuse) -> FetchFuture<'_> {
        Box::pin(self.fetch_inner(reuse))
    }

    fn persistence(&self) -> Option<PersistStatus> {
        Some(self.writer.status())
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
        let e = parse_expires_at("aor-canary-token").unwrap_err();
        assert!(!e.contains("canary"), "{e}");
        assert!(parse_expires_at("2023-11-14T22:13:20+0é:00").is_err());
        assert!(parse_expires_at("ééééééééé").is_err());
        assert_eq!(format_time(want), "2023-11-14T22:13:20Z");
    }

    fn file(access: &str, refresh: &str, expires: &str) -> SsoCacheFile {
        SsoCacheFile {
            access_token: Some(Secret::new(access)),
            refresh_token: Some(Secret::new(refresh)),
            expires_at: Some(expires.to_owned()),
            ..Default::default()
        }
    }

    #[test]
    fn another_writer_is_told_from_a_stale_file_of_ours() {
        let mut known = KnownRefreshTokens::default();
        known.remember(Some(&Secret::new("rt-1")));
        known.remember(Some(&Secret::new("rt-2")));
        let held = file("at-2", "rt-2", "2030-01-01T10:00:00Z");
        // Our own older write (a newer one failed): the held tokens win,
        // even with an expiry in the same second.
        let stale = file("at-1", "rt-1", "2030-01-01T10:00:00Z");
        assert!(!known.written_by_another(&stale, &held));
        // A refresh token never held: another process's login or rotation,
        // whatever its expiry says.
        let theirs = file("at-x", "rt-x", "2030-01-01T09:00:00Z");
        assert!(known.written_by_another(&theirs, &held));
        // Same refresh token, another access token: only a later one counts.
        let later = file("at-y", "rt-2", "2030-01-01T11:00:00Z");
        let same_time = file("at-y", "rt-2", "2030-01-01T10:00:00Z");
        assert!(known.written_by_another(&later, &held));
        assert!(!known.written_by_another(&same_time, &held));
        assert!(!known.written_by_another(&held, &held));
        // Bounded: the oldest are forgotten.
        for n in 0..KNOWN_REFRESH_TOKENS {
            known.remember(Some(&Secret::new(format!("rt-new-{n}"))));
        }
        assert_eq!(known.0.len(), KNOWN_REFRESH_TOKENS);
        assert!(!known.0.contains(&Secret::new("rt-1")));
    }

    #[test]
    fn render_keeps_other_keys_and_leaves_newer_or_corrupt_files_alone() {
        let known = Arc::new(Mutex::new(KnownRefreshTokens::default()));
        known.lock().unwrap().remember(Some(&Secret::new("rt-1")));
        known.lock().unwrap().remember(Some(&Secret::new("rt-2")));
        let format = SsoCacheFormat {
            path: PathBuf::from("/cache.json"),
            known,
        };
        let newest = file("at-2", "rt-2", "2030-01-01T10:00:00Z");
        let current = br#"{"accessToken":"at-1","refreshToken":"rt-1","expiresAt":"2030-01-01T09:00:00Z","clientId":"c","futureKey":[1]}"#;
        let Rendered::Write(bytes) = format.render(Some(current), &newest).unwrap() else {
            panic!("our stale file is overwritten");
        };
        let v: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
        assert_eq!(v["refreshToken"], "rt-2");
        assert_eq!(v["accessToken"], "at-2");
        assert_eq!(v["clientId"], "c");
        assert_eq!(v["futureKey"], serde_json::json!([1]));
        let theirs =
            br#"{"accessToken":"at-x","refreshToken":"rt-x","expiresAt":"2030-01-01T12:00:00Z"}"#;
        assert!(matches!(
            format.render(Some(theirs), &newest),
            Ok(Rendered::Superseded)
        ));
        let err = format.render(Some(b"{torn"), &newest).err().unwrap();
        assert!(
            err.contains("corrupt") && err.contains("left alone"),
            "{err}"
        );
        assert!(matches!(
            format.render(None, &newest),
            Ok(Rendered::Write(_))
        ));
    }

    #[test]
    fn json_errors_do_not_quote_values() {
        let e = serde_json::from_str::<SsoCacheFile>(r#"{"accessToken": ["S3CRET"]}"#).unwrap_err();
        assert!(!json_error_reason(&e).contains("S3CRET"));
    }
}
