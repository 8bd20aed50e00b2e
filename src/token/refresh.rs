//! The `refresh_token` grant source: exchanges a long-lived refresh token,
//! keeping the newest (rotated) one in memory and persisting it through the
//! one persistence path ([`persist`](super::persist)) before the access
//! token it came with is handed out.
//!
//! Sources that redeem one refresh token for different scope sets
//! ([`RefreshTokenSource::with_scopes`]) share one holder of it: they take
//! turns calling `CreateToken` and each uses the token the last rotation
//! left, so no source's rotation revokes another's refresh token.

use std::{
    collections::HashMap,
    fmt,
    path::{Path, PathBuf},
    sync::Arc,
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

/// A client registered with `RegisterClient` for a device login (as
/// opposed to one configured).
#[derive(Clone)]
#[cfg_attr(not(feature = "proxy"), allow(dead_code))]
pub(crate) struct Registration {
    /// The client id.
    pub(crate) client_id: String,
    /// Its secret.
    pub(crate) client_secret: Secret,
    /// When the registration expires, where the service said.
    pub(crate) expires_at: Option<SystemTime>,
}

impl fmt::Debug for Registration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Registration")
            .field("client_id", &self.client_id)
            .field("client_secret", &self.client_secret)
            .field("expires_at", &self.expires_at)
            .finish()
    }
}

#[cfg_attr(not(feature = "proxy"), allow(dead_code))]
impl Registration {
    /// Whether it can still be used (a minute to spare).
    pub(crate) fn is_usable(&self) -> bool {
        self.expires_at
            .is_none_or(|at| at > SystemTime::now() + std::time::Duration::from_secs(60))
    }
}

/// The credentials the source holds between fetches.
struct Credentials {
    /// The client id in use: the configured one, or a device login's
    /// registration (empty until the first login).
    client_id: String,
    /// The registration behind `client_id`, when it was registered rather
    /// than configured (kept in the state file for the next login).
    registration: Option<Registration>,
    client_secret: Secret,
    /// The refresh token as configured (file or inline), to tell an
    /// operator's new token from the one we started with.
    configured: Secret,
    /// The newest refresh token: used for the next refresh whatever the
    /// state file says.
    refresh_token: Secret,
    /// The last access token of each scope set; the state file's is loaded
    /// as the first scope set's.
    access: HashMap<Vec<String>, Token>,
}

/// One client and refresh token, shared by every scope set redeeming it.
struct CredentialHolder {
    oidc: OidcClient,
    policy: OidcRetryPolicy,
    /// The configured client id, or `device:START_URL` for a device login
    /// without one: the source's identity (and its shared-store keys).
    client_id: String,
    /// The scopes of the source built first; the state file keeps the
    /// access token of this scope set (one access token per file).
    persisted_scopes: Vec<String>,
    /// Writes the newest tokens to `token.state_file`, if configured.
    state: Option<TokenFileWriter<StateFileFormat>>,
    /// Held across each `CreateToken` call: with rotation, two concurrent
    /// refreshes would revoke each other's token.
    credentials: tokio::sync::Mutex<Credentials>,
}

/// Exchanges a refresh token for access tokens (`grantType=refresh_token`).
pub struct RefreshTokenSource {
    holder: Arc<CredentialHolder>,
    scopes: Vec<String>,
}

impl fmt::Debug for RefreshTokenSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RefreshTokenSource")
            .field("client_id", &self.holder.client_id)
            .field("scopes", &self.scopes)
            .field("state", &self.holder.state)
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
    /// Device login: `device:START_URL` when no client is configured.
    awaiting_login: Option<String>,
}

impl RefreshTokenSourceBuilder {
    /// For a device login: the refresh token (and, without a configured
    /// client, the client) may be missing; a fetch then fails with
    /// [`TokenError::NoRefreshToken`] until a login hands them over.
    /// `start_url` names the source when no client is configured.
    #[must_use]
    #[cfg_attr(not(feature = "proxy"), allow(dead_code))]
    pub(crate) fn awaiting_login(mut self, start_url: &str) -> Self {
        self.awaiting_login = Some(format!("device:{start_url}"));
        self
    }

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
        let mut client_id = self.client_id.clone();
        let mut client_secret = self.client_secret;
        let mut registration = None;
        let registered_client = client_id.is_empty();
        if let Some(path) = &self.state_file {
            super::state::recover_leftover_writes(path);
        }
        if let Some(path) = &self.state_file
            && let Some(state) = StateFile::load(path)?
        {
            crate::fs_atomic::keep_private(path);
            let same_client =
                registered_client || state.client_id.as_deref().is_none_or(|c| c == client_id);
            let newer = match (state.updated_at(), self.configured_at) {
                (Some(state_at), Some(config_at)) => state_at >= config_at,
                (_, None) => true,
                (None, Some(_)) => false,
            };
            if same_client && newer {
                tracing::info!(path = %path.display(), "using the refresh token from the state file");
                refresh_token = state.refresh_token.clone().unwrap_or(refresh_token);
                // A device login's registered client comes with its tokens.
                if registered_client
                    && let (Some(id), Some(secret)) = (&state.client_id, &state.client_secret)
                {
                    client_id = id.clone();
                    client_secret = secret.clone();
                    registration = Some(Registration {
                        client_id: id.clone(),
                        client_secret: secret.clone(),
                        expires_at: state
                            .registration_expires_at
                            .as_deref()
                            .and_then(|t| parse_expires_at(t).ok()),
                    });
                }
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
        if refresh_token.is_empty() && self.awaiting_login.is_none() {
            return Err(TokenError::NoRefreshToken(
                "the configured refresh token is empty".to_owned(),
            ));
        }
        let label = match (&self.awaiting_login, self.client_id.is_empty()) {
            (Some(device), true) => device.clone(),
            _ => self.client_id.clone(),
        };
        let access = access
            .map(|t: Token| (self.scopes.clone(), t.with_scopes(Vec::new())))
            .into_iter()
            .collect();
        Ok(RefreshTokenSource {
            holder: Arc::new(CredentialHolder {
                oidc: self.oidc,
                policy: self.policy,
                client_id: label,
                persisted_scopes: self.scopes.clone(),
                state: self
                    .state_file
                    .map(|path| TokenFileWriter::new(path, StateFileFormat)),
                credentials: tokio::sync::Mutex::new(Credentials {
                    client_id,
                    registration,
                    client_secret,
                    configured,
                    refresh_token,
                    access,
                }),
            }),
            scopes: self.scopes,
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
            awaiting_login: None,
        }
    }

    /// Another source redeeming the same client and refresh token for
    /// `scopes`. The two share the newest refresh token and take turns
    /// calling `CreateToken`, so a rotation by one never revokes the
    /// other's refresh token; the state file keeps the refresh token once
    /// (with the access token of the scope set this source was built with).
    pub fn with_scopes(&self, scopes: Vec<String>) -> Self {
        Self {
            holder: Arc::clone(&self.holder),
            scopes,
        }
    }

    /// Whether `other` shares this source's refresh token (one was made
    /// from the other by [`with_scopes`](Self::with_scopes)).
    pub fn shares_refresh_token_with(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.holder, &other.holder)
    }

    /// The state file, if one is configured.
    pub fn state_file(&self) -> Option<&Path> {
        self.holder.state.as_ref().map(TokenFileWriter::path)
    }

    /// Whether the newest refresh token is in the state file, if one is
    /// configured.
    pub fn persistence(&self) -> Option<PersistStatus> {
        self.holder.state.as_ref().map(TokenFileWriter::status)
    }

    /// Takes credentials an operator replaced (SIGHUP, changed secret
    /// files). A refresh token equal to the one configured at start is not a
    /// change: after rotations it would be a revoked token. Returns whether
    /// anything changed.
    pub async fn reload(&self, update: CredentialUpdate) -> bool {
        let mut credentials = self.holder.credentials.lock().await;
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
        let mut credentials = self.holder.credentials.lock().await;
        credentials.refresh_token = refresh_token;
        match access {
            Some(token) => credentials.access.insert(self.scopes.clone(), token),
            None => credentials.access.remove(&self.scopes),
        };
        self.persist(&credentials).await;
    }

    /// The client a device login uses: the configured one, or the last
    /// registration while it has not expired; `None` when a new one must
    /// be registered.
    #[cfg_attr(not(feature = "proxy"), allow(dead_code))]
    pub(crate) async fn login_client(&self) -> Option<Registration> {
        let credentials = self.holder.credentials.lock().await;
        if credentials.client_id.is_empty() {
            return None;
        }
        match &credentials.registration {
            Some(r) => r.is_usable().then(|| r.clone()),
            None => Some(Registration {
                client_id: credentials.client_id.clone(),
                client_secret: credentials.client_secret.clone(),
                expires_at: None,
            }),
        }
    }

    /// Whether the client in use was registered by a device login (rather
    /// than configured).
    #[cfg_attr(not(feature = "proxy"), allow(dead_code))]
    pub(crate) async fn uses_registered_client(&self) -> bool {
        let credentials = self.holder.credentials.lock().await;
        credentials.client_id.is_empty() || credentials.registration.is_some()
    }

    /// Takes a client another replica registered, without tokens yet (they
    /// come from the shared store).
    #[cfg_attr(not(feature = "proxy"), allow(dead_code))]
    pub(crate) async fn use_registration(&self, registration: Registration) {
        let mut credentials = self.holder.credentials.lock().await;
        credentials.client_id = registration.client_id.clone();
        credentials.client_secret = registration.client_secret.clone();
        credentials.registration = Some(registration);
    }

    /// Takes the tokens a device login obtained, with the client that
    /// obtained them (`registration`: a registered one; `None`: the
    /// configured one): they are used for the next refresh and persisted
    /// like a rotation.
    #[cfg_attr(not(feature = "proxy"), allow(dead_code))]
    pub(crate) async fn adopt_login(
        &self,
        registration: Option<Registration>,
        refresh_token: Secret,
        access: Token,
    ) {
        let mut credentials = self.holder.credentials.lock().await;
        if let Some(r) = registration {
            credentials.client_id = r.client_id.clone();
            credentials.client_secret = r.client_secret.clone();
            credentials.registration = Some(r);
        }
        credentials.refresh_token = refresh_token;
        credentials.access.clear();
        credentials.access.insert(self.scopes.clone(), access);
        self.persist(&credentials).await;
    }

    /// Writes the newest tokens to the state file; a failed write is
    /// retried in the background (see [`persist`](super::persist)).
    async fn persist(&self, credentials: &Credentials) {
        let holder = &*self.holder;
        let Some(state) = &holder.state else {
            return;
        };
        let access = credentials.access.get(&holder.persisted_scopes);
        let registration = credentials.registration.as_ref();
        state
            .persist(StateFile {
                client_id: Some(credentials.client_id.clone()),
                client_secret: registration.map(|r| r.client_secret.clone()),
                registration_expires_at: registration.and_then(|r| r.expires_at).map(format_time),
                refresh_token: Some(credentials.refresh_token.clone()),
                access_token: access.map(|t| t.access_token().clone()),
                expires_at: access.map(|t| format_time(t.expires_at_wall())),
                updated_at: Some(humantime::format_rfc3339_nanos(SystemTime::now()).to_string()),
                extra: Default::default(),
            })
            .await;
    }

    async fn fetch_inner(&self, reuse: Reuse) -> Result<Token, TokenError> {
        let holder = &*self.holder;
        // Held across the call: with rotation, two concurrent refreshes
        // (of any scope set) would revoke each other's token.
        let mut credentials = holder.credentials.lock().await;
        if let (Reuse::IfValidFor(min), Some(token)) = (reuse, credentials.access.get(&self.scopes))
            && token.ttl() >= min
        {
            return Ok(token.clone().with_scopes(self.scopes.clone()));
        }
        if credentials.refresh_token.is_empty() || credentials.client_id.is_empty() {
            return Err(TokenError::NoRefreshToken(
                "none configured or stored yet; a device login must obtain one".to_owned(),
            ));
        }
        let request = CreateTokenRequest::refresh(
            credentials.client_id.clone(),
            credentials.client_secret.clone(),
            credentials.refresh_token.clone(),
        )
        .with_scopes(self.scopes.clone());
        let response = tower::retry::Retry::new(holder.policy.clone(), holder.oidc.clone())
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
        credentials
            .access
            .insert(self.scopes.clone(), token.clone());
        self.persist(&credentials).await;
        Ok(token)
    }
}

impl TokenSource for RefreshTokenSource {
    fn identity(&self) -> String {
        format!("refresh_token:{}", self.holder.client_id)
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
