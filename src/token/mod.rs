//! Tokens and the sources that produce them.
//!
//! A [`TokenSource`] fetches a fresh [`Token`]; the
//! [`TokenCache`](crate::cache::TokenCache) decides when to ask.

pub(crate) mod device;
#[cfg(feature = "aws-iam")]
mod iam_exchange;
#[cfg(feature = "aws-iam")]
mod jwt_bearer;
mod persist;
mod refresh;
mod sso_cache;
pub(crate) use sso_cache::json_error_reason;
mod state;

use std::{
    fmt,
    future::Future,
    pin::Pin,
    time::{Duration, SystemTime},
};

use http::HeaderValue;
use sha2::{Digest as _, Sha256};
use tokio::time::Instant;

pub use device::{DevicePrompt, LoginOptions, device_login, sso_cache_file_name};
#[cfg(feature = "aws-iam")]
pub use iam_exchange::{CallerGrant, IamCallerExchange, IamExchange, IamGrant};
#[cfg(feature = "aws-iam")]
pub use jwt_bearer::JwtBearerSource;
pub use persist::PersistStatus;
pub use refresh::RefreshTokenSource;
#[cfg_attr(not(feature = "proxy"), allow(unused_imports))]
pub(crate) use refresh::Registration;
#[cfg(feature = "proxy")]
pub(crate) use sso_cache::format_time;
pub use sso_cache::{SsoCacheFile, SsoCacheSource, parse_expires_at};
pub use state::StateFile;

use crate::{
    oidc::{CreateTokenResponse, CreateTokenWithIamResponse, ErrorClass, OidcError, Operation},
    secret::Secret,
};

/// The longest lifetime a token is taken to have, whatever its source says
/// (an absurd `expiresIn` or `expiresAt` must not overflow a clock).
pub const MAX_TOKEN_LIFETIME: Duration = Duration::from_secs(366 * 24 * 3600);

/// An access token with what is known about it. `Debug` redacts secrets.
#[derive(Clone)]
pub struct Token {
    /// First 8 bytes of the SHA-256 of the access token: equal for the same
    /// token however often it is read back (file, Redis).
    id: u64,
    access_token: Secret,
    header: HeaderValue,
    expires_at: Instant,
    lifetime: Duration,
    expires_at_wall: SystemTime,
    refresh_token: Option<Secret>,
    id_token: Option<Secret>,
    scopes: Vec<String>,
}

impl Token {
    /// A token valid for `lifetime` from now (at most
    /// [`MAX_TOKEN_LIFETIME`]).
    pub fn new(access_token: Secret, lifetime: Duration) -> Self {
        let lifetime = lifetime.min(MAX_TOKEN_LIFETIME);
        let mut header = HeaderValue::try_from(format!("Bearer {}", access_token.expose()))
            .unwrap_or_else(|_| HeaderValue::from_static("Bearer invalid"));
        header.set_sensitive(true);
        Self {
            id: token_id(&access_token),
            access_token,
            header,
            expires_at: Instant::now() + lifetime,
            lifetime,
            expires_at_wall: SystemTime::now() + lifetime,
            refresh_token: None,
            id_token: None,
            scopes: Vec::new(),
        }
    }

    /// A token that expires at a wall-clock time (from a cache file). Its
    /// [`lifetime`](Self::lifetime) is the time it has left, unless
    /// [`issued_at`](Self::issued_at) says more.
    pub fn expiring_at(access_token: Secret, expires_at: SystemTime) -> Self {
        let lifetime = expires_at
            .duration_since(SystemTime::now())
            .unwrap_or(Duration::ZERO);
        let mut token = Self::new(access_token, lifetime);
        if lifetime < MAX_TOKEN_LIFETIME {
            token.expires_at_wall = expires_at;
        }
        token
    }

    /// Sets when the token was issued, where a file or store recorded it,
    /// so its [`lifetime`](Self::lifetime) is the whole lifetime it was
    /// issued with rather than what was left when it was read back.
    #[must_use]
    pub fn issued_at(mut self, issued_at: SystemTime) -> Self {
        if let Ok(whole) = self.expires_at_wall.duration_since(issued_at) {
            self.lifetime = whole.clamp(self.lifetime, MAX_TOKEN_LIFETIME);
        }
        self
    }

    /// Builds a token from a `CreateToken` response. A response without an
    /// `accessToken` or `expiresIn`, or with a token that cannot be a header
    /// value, is a decode error.
    pub fn from_response(response: &CreateTokenResponse) -> Result<Self, OidcError> {
        let mut token = Self::checked(
            Operation::CreateToken,
            response.access_token.as_ref(),
            response.expires_in,
            response.token_type.as_deref(),
        )?;
        token.refresh_token = response.refresh_token.clone();
        token.id_token = response.id_token.clone();
        Ok(token)
    }

    /// Builds a token from a `CreateTokenWithIAM` response, with the same
    /// checks as [`Token::from_response`]; the granted `scope`, when the
    /// response names it, becomes the token's scopes.
    pub fn from_iam_response(response: &CreateTokenWithIamResponse) -> Result<Self, OidcError> {
        let mut token = Self::checked(
            Operation::CreateTokenWithIam,
            response.access_token.as_ref(),
            response.expires_in,
            response.token_type.as_deref(),
        )?;
        token.refresh_token = response.refresh_token.clone();
        token.id_token = response.id_token.clone();
        token.scopes = response.scope.clone().unwrap_or_default();
        Ok(token)
    }

    fn checked(
        operation: Operation,
        access_token: Option<&Secret>,
        expires_in: Option<i32>,
        token_type: Option<&str>,
    ) -> Result<Self, OidcError> {
        let decode = |message: &str| OidcError::Decode {
            operation,
            status: 200,
            message: message.to_owned(),
        };
        let access = access_token
            .filter(|t| !t.is_empty())
            .cloned()
            .ok_or_else(|| decode("response has no accessToken"))?;
        let expires_in = expires_in.ok_or_else(|| decode("response has no expiresIn"))?;
        if expires_in <= 0 {
            return Err(decode("expiresIn is not positive"));
        }
        if HeaderValue::try_from(format!("Bearer {}", access.expose())).is_err() {
            return Err(decode(
                "accessToken contains characters not allowed in a header",
            ));
        }
        if let Some(t) = token_type
            && !t.eq_ignore_ascii_case("bearer")
        {
            return Err(decode("tokenType is not Bearer"));
        }
        Ok(Self::new(access, Duration::from_secs(expires_in as u64)))
    }

    /// Sets the scopes the token was granted for.
    #[must_use]
    pub fn with_scopes(mut self, scopes: Vec<String>) -> Self {
        self.scopes = scopes;
        self
    }

    /// Sets the refresh token that came with it.
    #[must_use]
    pub fn with_refresh_token(mut self, refresh_token: Option<Secret>) -> Self {
        self.refresh_token = refresh_token;
        self
    }

    /// The token's identity: derived from its value (a SHA-256 prefix), so
    /// the same access token has the same id whether it came from
    /// `CreateToken`, a file or the shared store. Safe to log.
    pub fn id(&self) -> u64 {
        self.id
    }

    /// The raw access token.
    pub fn access_token(&self) -> &Secret {
        &self.access_token
    }

    /// `Bearer <token>` as a sensitive header value (cheap to clone).
    pub fn header_value(&self) -> &HeaderValue {
        &self.header
    }

    /// When the token expires (tokio clock).
    pub fn expires_at(&self) -> Instant {
        self.expires_at
    }

    /// The lifetime the token was issued with, where known; else the time
    /// it had left when this process got it. The cache's margins scale
    /// with it.
    pub fn lifetime(&self) -> Duration {
        self.lifetime
    }

    /// When the token expires (wall clock).
    pub fn expires_at_wall(&self) -> SystemTime {
        self.expires_at_wall
    }

    /// Time left until expiry (zero once expired).
    pub fn ttl(&self) -> Duration {
        self.expires_at.saturating_duration_since(Instant::now())
    }

    /// Whether the token is still valid now.
    pub fn is_valid(&self) -> bool {
        Instant::now() < self.expires_at
    }

    /// The refresh token that came with it.
    pub fn refresh_token(&self) -> Option<&Secret> {
        self.refresh_token.as_ref()
    }

    /// The id token that came with it.
    pub fn id_token(&self) -> Option<&Secret> {
        self.id_token.as_ref()
    }

    /// Granted scopes.
    pub fn scopes(&self) -> &[String] {
        &self.scopes
    }
}

/// A token's id: the first 8 bytes of the SHA-256 of its value.
fn token_id(access_token: &Secret) -> u64 {
    let digest = Sha256::digest(access_token.expose().as_bytes());
    let mut prefix = [0u8; 8];
    prefix.copy_from_slice(&digest[..8]);
    u64::from_be_bytes(prefix)
}

impl fmt::Debug for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Token")
            .field("id", &self.id)
            .field("access_token", &self.access_token)
            .field("ttl", &self.ttl())
            .field("refresh_token", &self.refresh_token)
            .field("id_token", &self.id_token)
            .field("scopes", &self.scopes)
            .finish()
    }
}

/// Why a source could not produce a token. Cheap to clone; never holds a
/// secret.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum TokenError {
    /// The SSO-OIDC call failed.
    #[error(transparent)]
    Oidc(#[from] OidcError),
    /// A cache or state file is missing, unreadable or corrupt.
    #[error("{path}: {reason}")]
    File {
        /// The file.
        path: String,
        /// What is wrong.
        reason: String,
    },
    /// The source has no refresh token to use.
    #[error("no refresh token: {0}")]
    NoRefreshToken(String),
    /// The device flow did not complete.
    #[error("device login failed: {0}")]
    Login(String),
    /// A person must approve a device login (headless login, see `GET
    /// /login`); no token until then.
    #[error("login required: {0}")]
    LoginRequired(String),
    /// The shared token store (Redis) could not coordinate this refresh;
    /// it may pass.
    #[error("shared token store: {0}")]
    Store(String),
    /// The source handed back a token that is already unusable: too little
    /// of its life left for the cache's margin.
    #[error(
        "the source handed back a token with {left:?} left, not more than the {margin:?} margin \
         (or under the 1s minimum); is the clock right, or is the token file stale?"
    )]
    ExpiredOnArrival {
        /// What the token had left.
        left: Duration,
        /// The margin it had to exceed.
        margin: Duration,
    },
    /// Asked for a new token, the source handed back one an upstream had
    /// rejected.
    #[error("the source handed back a token an upstream rejected, even when asked for a new one")]
    RejectedAgain,
    /// AWS answered `SlowDown` to recent exchanges: none is made until the
    /// pause ends.
    #[error("exchanges are paused: AWS is throttling them (SlowDown)")]
    Throttled,
}

impl TokenError {
    /// How retrying would fare.
    pub fn class(&self) -> ErrorClass {
        match self {
            Self::Oidc(e) => e.class(),
            Self::File { .. }
            | Self::NoRefreshToken(_)
            | Self::Login(_)
            | Self::LoginRequired(_) => ErrorClass::Fatal,
            Self::Store(_) | Self::ExpiredOnArrival { .. } | Self::RejectedAgain => {
                ErrorClass::Transient
            }
            Self::Throttled => ErrorClass::Throttled,
        }
    }

    /// Short name for 503 bodies, logs and metrics.
    pub fn kind_name(&self) -> &'static str {
        match self {
            Self::Oidc(e) => e.kind_name(),
            Self::File { .. } => "TokenFile",
            Self::NoRefreshToken(_) => "NoRefreshToken",
            Self::Login(_) => "Login",
            Self::LoginRequired(_) => "LoginRequired",
            Self::Store(_) => "SharedStore",
            Self::ExpiredOnArrival { .. } => "ExpiredOnArrival",
            Self::RejectedAgain => "RejectedAgain",
            Self::Throttled => "Throttled",
        }
    }
}

/// When a source may hand back a token it already holds (from a state or
/// cache file) instead of calling `CreateToken`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Reuse {
    /// A held token valid for at least this long may be returned.
    IfValidFor(Duration),
    /// Always get a new token (the held one was rejected).
    Never,
}

/// Credentials re-read after an operator changed them; `None` means "not
/// configured as a file" or "unchanged".
#[derive(Debug, Clone, Default)]
pub struct CredentialUpdate {
    /// The client secret.
    pub client_secret: Option<Secret>,
    /// The refresh token.
    pub refresh_token: Option<Secret>,
}

/// A boxed future returned by [`TokenSource::reload`]: whether anything
/// changed.
pub type ReloadFuture<'a> = Pin<Box<dyn Future<Output = bool> + Send + 'a>>;

/// A boxed future returned by [`TokenSource::fetch`].
pub type FetchFuture<'a> = Pin<Box<dyn Future<Output = Result<Token, TokenError>> + Send + 'a>>;

/// Something that can produce a fresh token.
pub trait TokenSource: Send + Sync + 'static {
    /// A stable identity: which credentials this source uses (no secrets).
    fn identity(&self) -> String;

    /// The scopes it requests.
    fn scopes(&self) -> &[String];

    /// Gets a token. Implementations serialise their own refreshes: with
    /// refresh-token rotation two concurrent refreshes would revoke each
    /// other's token.
    fn fetch(&self, reuse: Reuse) -> FetchFuture<'_>;

    /// Takes new credentials (SIGHUP, changed secret files). The default
    /// has nothing to reload.
    fn reload(&self, update: CredentialUpdate) -> ReloadFuture<'_> {
        let _ = update;
        Box::pin(std::future::ready(false))
    }

    /// Whether the newest refresh token is on disk, for sources that keep
    /// one there; `None` (the default) for the others.
    fn persistence(&self) -> Option<PersistStatus> {
        None
    }

    /// When the client registration behind this source expires, on tokio's
    /// clock, where known (an SSO cache file's `registrationExpiresAt`). The
    /// default does not know.
    fn registration_expires_at(&self) -> Option<Instant> {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_redacts_everything_secret() {
        let t = Token::new(Secret::new("S3CRET-access"), Duration::from_secs(60))
            .with_refresh_token(Some(Secret::new("S3CRET-refresh")));
        let text = format!("{t:?}");
        assert!(!text.contains("S3CRET"), "{text}");
        assert!(t.header_value().is_sensitive());
        assert_eq!(t.header_value().to_str().unwrap(), "Bearer S3CRET-access");
    }

    #[test]
    fn identity_is_the_value() {
        let a = Token::new(Secret::new("same-value"), Duration::from_secs(60));
        let b = Token::expiring_at(
            Secret::new("same-value"),
            SystemTime::now() + Duration::from_secs(5),
        );
        let c = Token::new(Secret::new("other-value"), Duration::from_secs(60));
        assert_eq!(a.id(), b.id());
        assert_ne!(a.id(), c.id());
        // The id is not the token.
        assert!(!format!("{a:?}").contains("same-value"));
    }

    #[test]
    fn absurd_lifetimes_are_capped_not_overflowed() {
        let t = Token::new(Secret::new("a"), Duration::MAX);
        assert_eq!(t.lifetime(), MAX_TOKEN_LIFETIME);
        let far = SystemTime::UNIX_EPOCH + Duration::from_secs(253_402_300_799); // year 9999
        let t = Token::expiring_at(Secret::new("a"), far);
        assert_eq!(t.lifetime(), MAX_TOKEN_LIFETIME);
        assert!(t.expires_at_wall() <= SystemTime::now() + MAX_TOKEN_LIFETIME);
        let t = Token::expiring_at(Secret::new("a"), SystemTime::UNIX_EPOCH);
        assert_eq!(t.ttl(), Duration::ZERO);
        let r = CreateTokenResponse {
            access_token: Some("a".into()),
            expires_in: Some(i32::MAX),
            ..Default::default()
        };
        assert_eq!(
            Token::from_response(&r).unwrap().lifetime(),
            MAX_TOKEN_LIFETIME
        );
    }

    #[test]
    fn issued_at_gives_the_whole_lifetime() {
        let now = SystemTime::now();
        let t = Token::expiring_at(Secret::new("a"), now + Duration::from_secs(600))
            .issued_at(now - Duration::from_secs(3000));
        let whole = t.lifetime().as_secs();
        assert!((3599..=3600).contains(&whole), "{whole}");
        // An issue time after the expiry changes nothing.
        let t = Token::expiring_at(Secret::new("a"), now + Duration::from_secs(600))
            .issued_at(now + Duration::from_secs(3600));
        assert!(t.lifetime() <= Duration::from_secs(600));
    }

    #[test]
    fn from_response_checks_required_members() {
        let mut r = CreateTokenResponse {
            access_token: Some("a".into()),
            token_type: Some("Bearer".into()),
            expires_in: Some(60),
            ..Default::default()
        };
        assert!(Token::from_response(&r).is_ok());
        r.expires_in = None;
        assert!(matches!(
            Token::from_response(&r),
            Err(OidcError::Decode { .. })
        ));
        r.expires_in = Some(60);
        r.access_token = Some("bad\nvalue".into());
        let err = Token::from_response(&r).unwrap_err();
        assert!(!err.to_string().contains("bad\nvalue"));
        r.access_token = None;
        assert!(Token::from_response(&r).is_err());
    }

    #[test]
    fn from_iam_response_takes_the_granted_scopes() {
        let mut r = CreateTokenWithIamResponse {
            access_token: Some("a".into()),
            token_type: Some("Bearer".into()),
            expires_in: Some(60),
            scope: Some(vec!["openid".into()]),
            ..Default::default()
        };
        let t = Token::from_iam_response(&r).unwrap();
        assert_eq!(t.scopes(), ["openid"]);
        r.token_type = Some("MAC".into());
        let err = Token::from_iam_response(&r).unwrap_err();
        assert_eq!(err.operation(), Operation::CreateTokenWithIam);
        assert!(matches!(err, OidcError::Decode { .. }));
    }
}
