//! The `refresh_token` grant source: exchanges a long-lived refresh token,
//! keeping the newest (rotated) one in memory and persisting it through the
//! one persistence path ([`persist`](super::persist)) before the access
//! token it came with is handed out.

use std::{
    fmt,
    path::{Path, PathBuf},
    time::SystemTime,
};

use tower::ServiceExt;

use super::{
    CredentialUpdate, FetchFuture, ReloadFuture, Reuse, StateFile, Token, TokenError, TokenSource,
    parse_expires_at,
    persist::{PersistStatus, TokenFileWriter},
    sso_cache::format_time,
    state::StateFileFormat,
};
use crate::{
    oidc::{CreateTokenRequest, OidcClient},
    retry::OidcRetryPolicy,
    secret::Secret,
};

/// The credentials the source holds between fetches.
struct Credentials {
    client_secret: Secret,
    /// The refresh token as configured (file or inline), to tell an
    /// operator's new token from the one we started with.
    configured: Secret,
    /// The newest refresh token: used for the next refresh whatever the
    /// state file says.
    refresh_token: Secret,
    /// The last access token, possibly loaded from the state file.
    access: Option<Token>,
}

/// Exchanges a refresh token for access tokens (`grantType=refresh_token`).
pub struct RefreshTokenSource {
    oidc: OidcClient,
    policy: OidcRetryPolicy,
    client_id: String,
    scopes: Vec<String>,
    /// Writes the newest tokens to `token.state_file`, if configured.
    state: Option<TokenFileWriter<StateFileFormat>>,
    credentials: tokio::sync::Mutex<Credentials>,
}

impl fmt::Debug for RefreshTokenSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RefreshTokenSource")
            .field("client_id", &self.client_id)
            .field("scopes", &self.scopes)
            .field("state", &self.state)
            .finish_non_exhaustive()
    }
}

/// Builds a [`RefreshTokenSource`].
#[derive(Debug)]
pub struct RefreshTokenSourceBuilder {
    oidc: OidcClient,
    policy: OidcRetryPolicy,
    client_id: String,
    client_secret: Secret,
    refresh_token: Secret,
    configured_at: Option<SystemTime>,
    state_file: Option<PathBuf>,
    scopes: Vec<String>,
}

impl RefreshTokenSourceBuilder {
    /// The retry policy for `CreateToken` (default: [`OidcRetryPolicy`] with
    /// default settings).
    #[must_use]
    pub fn retry_policy(mut self, policy: OidcRetryPolicy) -> Self {
        self.policy = policy;
        self
    }

    /// Where rotated refresh tokens are persisted.
    #[must_use]
    pub fn state_file(mut self, path: impl Into<PathBuf>) -> Self {
        self.state_file = Some(path.into());
        self
    }

    /// When the configured refresh token was last changed (its file's
    /// mtime). A state file written later wins over it; an older one loses,
    /// so an operator who replaces the secret is obeyed.
    #[must_use]
    pub fn configured_at(mut self, at: SystemTime) -> Self {
        self.configured_at = Some(at);
        self
    }

    /// Scopes to request.
    #[must_use]
    pub fn scopes(mut self, scopes: Vec<String>) -> Self {
        self.scopes = scopes;
        self
    }

    /// Builds the source, reading the state file if there is one. A corrupt
    /// state file is an error (it is never overwritten blindly).
    pub fn build(self) -> Result<RefreshTokenSource, TokenError> {
        let configured = self.refresh_token.clone();
        let mut refresh_token = self.refresh_token;
        let mut access = None;
        if let Some(path) = &self.state_file
            && let Some(state) = StateFile::load(path)?
        {
            let same_client = state
                .client_id
                .as_deref()
                .is_none_or(|c| c == self.client_id);
            let newer = match (state.updated_at(), self.configured_at) {
                (Some(state_at), Some(config_at)) => state_at >= config_at,
                (_, None) => true,
                (None, Some(_)) => false,
            };
            if same_client && newer {
                tracing::info!(path = %path.display(), "using the refresh token from the state file");
                refresh_token = state.refresh_token.clone().unwrap_or(refresh_token);
                access = match (&state.access_token, state.expires_at.as_deref()) {
                    (Some(a), Some(exp)) => parse_expires_at(exp).ok().map(|exp| {
                        let token = Token::expiring_at(a.clone(), exp);
                        match state.updated_at() {
                            Some(written) => token.issued_at(written),
                            None => token,
                        }
                    }),
                    _ => None,
                };
            } else {
                tracing::info!(
                    path = %path.display(),
                    "ignoring the state file: the configured refresh token is newer or for another client"
                );
            }
        }
        if refresh_token.is_empty() {
            return Err(TokenError::NoRefreshToken(
                "the configured refresh token is empty".to_owned(),
            ));
        }
        Ok(RefreshTokenSource {
            oidc: self.oidc,
            policy: self.policy,
            client_id: self.client_id,
            scopes: self.scopes,
            state: self
                .state_file
                .map(|path| TokenFileWriter::new(path, StateFileFormat)),
            credentials: tokio::sync::Mutex::new(Credentials {
                client_secret: self.client_secret,
                configured,
                refresh_token,
                access: access.map(|t: Token| t.with_scopes(Vec::new())),
            }),
        })
    }
}

impl RefreshTokenSource {
    /// Starts building a source for this client and refresh token.
    pub fn builder(
        oidc: OidcClient,
        client_id: impl Into<String>,
        client_secret: Secret,
        refresh_token: Secret,
    ) -> RefreshTokenSourceBuilder {
        RefreshTokenSourceBuilder {
            oidc,
            policy: OidcRetryPolicy::new(Default::default()),
            client_id: client_id.into(),
            client_secret,
            refresh_token,
            configured_at: None,
            state_file: None,
            scopes: Vec::new(),
        }
    }

    /// The state file, if one is configured.
    pub fn state_file(&self) -> Option<&Path> {
        self.state.as_ref().map(TokenFileWriter::path)
    }

    /// Whether the newest refresh token is in the state file, if one is
    /// configured.
    pub fn persistence(&self) -> Option<PersistStatus> {
        self.state.as_ref().map(TokenFileWriter::status)
    }

    /// Takes credentials an operator replaced (SIGHUP, changed secret
    /// files). A refresh token equal to the one configured at start is not a
    /// change: after rotations it would be a revoked token. Returns whether
    /// anything changed.
    pub async fn reload(&self, update: CredentialUpdate) -> bool {
        let mut credentials = self.credentials.lock().await;
        let mut changed = false;
        if let Some(secret) = update
            .client_secret
            .filter(|s| !s.is_empty() && *s != credentials.client_secret)
        {
            credentials.client_secret = secret;
            changed = true;
        }
        if let Some(token) = update
            .refresh_token
            .filter(|t| !t.is_empty() && *t != credentials.configured)
        {
            credentials.configured = token.clone();
            credentials.refresh_token = token;
            changed = true;
        }
        changed
    }

    /// Takes a refresh token another replica obtained (from the shared
    /// store), with the access token that came with it if there is one:
    /// it is used for the next refresh and persisted like a rotation.
    pub async fn adopt(&self, refresh_token: Secret, access: Option<Token>) {
        let mut credentials = self.credentials.lock().await;
        credentials.refresh_token = refresh_token;
        credentials.access = access;
        self.persist(&credentials).await;
    }

    /// Writes the newest tokens to the state file; a failed write is
    /// retried in the background (see [`persist`](super::persist)).
    async fn persist(&self, credentials: &Credentials) {
        let Some(state) = &self.state else {
            return;
        };
        let access = credentials.access.as_ref();
        state
            .persist(StateFile {
                client_id: Some(self.client_id.clone()),
                refresh_token: Some(credentials.refresh_token.clone()),
                access_token: access.map(|t| t.access_token().clone()),
                expires_at: access.map(|t| format_time(t.expires_at_wall())),
                updated_at: Some(humantime::format_rfc3339_nanos(SystemTime::now()).to_string()),
                extra: Default::default(),
            })
            .await;
    }

    async fn fetch_inner(&self, reuse: Reuse) -> Result<Token, TokenError> {
        // Held across the call: with rotation, two concurrent refreshes
        // would revoke each other's token.
        let mut credentials = self.credentials.lock().await;
        if let (Reuse::IfValidFor(min), Some(token)) = (reuse, &credentials.access)
            && token.ttl() >= min
        {
            return Ok(token.clone().with_scopes(self.scopes.clone()));
        }
        let request = CreateTokenRequest::refresh(
            self.client_id.clone(),
            credentials.client_secret.clone(),
            credentials.refresh_token.clone(),
        )
        .with_scopes(self.scopes.clone());
        let response = tower::retry::Retry::new(self.policy.clone(), self.oidc.clone())
            .oneshot(request)
            .await?;
        let token = Token::from_response(&response)?.with_scopes(self.scopes.clone());
        if let Some(rotated) = response
            .refresh_token
            .clone()
            .filter(|r| !r.is_empty() && *r != credentials.refresh_token)
        {
            tracing::debug!("refresh token rotated");
            // In memory first: from now on only this one is valid.
            credentials.refresh_token = rotated;
        }
        credentials.access = Some(token.clone());
        self.persist(&credentials).await;
        Ok(token)
    }
}

impl TokenSource for RefreshTokenSource {
    fn identity(&self) -> String {
        format!("refresh_token:{}", self.client_id)
    }

    fn scopes(&self) -> &[String] {
        &self.scopes
    }

    fn fetch(&self, reuse: Reuse) -> FetchFuture<'_> {
        Box::pin(self.fetch_inner(reuse))
    }

    fn reload(&self, update: CredentialUpdate) -> ReloadFuture<'_> {
        Box::pin(RefreshTokenSource::reload(self, update))
    }

    fn persistence(&self) -> Option<PersistStatus> {
        RefreshTokenSource::persistence(self)
    }
}
