//! Headless device login: a `refresh_token` source with `device_login =
//! true` that has no usable refresh token (none configured or stored, or
//! one refused with `InvalidGrant`) runs the device flow (RFC 8628) itself.
//!
//! The flow: reuse the client (configured, or an unexpired registration
//! from the state file or the shared store), else `RegisterClient`; then
//! `StartDeviceAuthorization`, show the verification URI and user code
//! (`GET /login`, `/readyz`, the log; the device code never leaves this
//! module), and poll `CreateToken` at the service's `interval` (each
//! `SlowDown` adds 5 s for good). An expired device code starts a new
//! device authorization at once; a denial or a failure starts one after a
//! pause that doubles up to five minutes. The tokens an approval brings are
//! handed to the source like a rotation (memory first, then the state file
//! through the one persistence path), the `needs_login` gauge goes back to
//! 0 with the next fetch, and the cache fetches at once.
//!
//! With the shared store (`[store] kind = "redis"`) one device flow runs
//! fleet-wide: the replica that takes the login lock (`SET NX PX`, renewed
//! every third of its lease while the flow runs) logs in and publishes the
//! prompt (never the device code) and any client it registered; the others
//! show that prompt and wait for the new token record, which they adopt.
//! When the holder dies its lease runs out and another replica takes over
//! with a device authorization of its own.

use std::{
    fmt,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use crate::{
    oidc::{
        CreateTokenRequest, OidcClient, RegisterClientRequest, ServiceErrorKind,
        StartDeviceAuthorizationRequest,
    },
    retry::RetryConfig,
    secret::Secret,
    store::{Fence, SharedStoreSource, StoreError, StoreKeys},
    token::{
        CredentialUpdate, FetchFuture, PersistStatus, RefreshTokenSource, Registration,
        ReloadFuture, Reuse, Token, TokenError, TokenSource,
        device::{DevicePollError, PollSettings, first_interval, poll_device_token},
    },
};

/// The longest pause between device authorizations after failures.
const MAX_RESTART_PAUSE: Duration = Duration::from_secs(300);

/// How a device login runs.
#[derive(Debug, Clone)]
pub(crate) struct LoginSettings {
    /// The source's name (log lines).
    pub(crate) source: String,
    /// The AWS access portal URL.
    pub(crate) start_url: String,
    /// Scopes to register the client for and to request.
    pub(crate) scopes: Vec<String>,
    /// The client name `RegisterClient` gets.
    pub(crate) client_name: String,
    /// Poll interval when the service sends none (RFC 8628: 5 s).
    pub(crate) default_interval: Duration,
    /// What a `SlowDown` adds to the interval (RFC 8628: 5 s).
    pub(crate) slow_down_increment: Duration,
    /// Retries of transient failures while polling.
    pub(crate) retry: RetryConfig,
    /// The first pause before a new device authorization after a denial
    /// or a failure (doubling up to five minutes).
    pub(crate) restart_pause: Duration,
    /// Lease of the fleet-wide login lock.
    pub(crate) lock_lease: Duration,
}

/// What a person must do to approve the login. Holds no secret: the user
/// code is useless without the device code, which is never shown.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct LoginPrompt {
    /// Where to go.
    pub(crate) verification_uri: String,
    /// The same with the user code filled in, when the service gives one.
    pub(crate) verification_uri_complete: Option<String>,
    /// The code to confirm.
    pub(crate) user_code: String,
    /// When the code expires, milliseconds since the Unix epoch.
    pub(crate) expires_at_ms: u64,
}

impl LoginPrompt {
    /// Seconds until the code expires.
    pub(crate) fn expires_in_seconds(&self) -> u64 {
        let now = epoch_ms(SystemTime::now());
        self.expires_at_ms.saturating_sub(now) / 1000
    }
}

/// Where a source's device login stands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum LoginState {
    /// No login is running.
    Idle,
    /// A login is starting (registering, starting a device authorization,
    /// or waiting for another replica's prompt).
    Starting,
    /// Waiting for a person to approve `prompt`; `here` is false when
    /// another replica runs the device flow.
    Waiting {
        /// What to show.
        prompt: LoginPrompt,
        /// Whether this replica polls for it.
        here: bool,
    },
}

impl LoginState {
    /// `idle`, `starting` or `waiting_for_approval`.
    pub(crate) fn as_str(&self) -> &'static str {
        match self {
            Self::Idle => "idle",
            Self::Starting => "starting",
            Self::Waiting { .. } => "waiting_for_approval",
        }
    }
}

/// The shared-store side of a fleet-wide login.
struct Fleet {
    source: SharedStoreSource,
    /// `lock`/`fence` of the login lock (`record` is unused).
    lock: StoreKeys,
    /// The published prompt (JSON, expires with the device code).
    prompt_key: String,
    /// A client the holder registered (JSON), for the other replicas.
    client_key: String,
    owner: String,
}

/// A client as published in the shared store.
#[derive(Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct PublishedClient {
    client_id: String,
    client_secret: Secret,
    expires_at_ms: Option<u64>,
}

struct Shared {
    settings: LoginSettings,
    oidc: OidcClient,
    refresh: RefreshTokenSource,
    fleet: Option<Fleet>,
    state: watch::Sender<LoginState>,
    running: AtomicBool,
    /// Register a new client at the next attempt (the last one was refused).
    force_register: AtomicBool,
    /// Bumped whenever a login completes.
    completed: watch::Sender<u64>,
}

/// One source's device login; cheap to clone.
#[derive(Clone)]
pub(crate) struct DeviceLogin {
    shared: Arc<Shared>,
}

impl fmt::Debug for DeviceLogin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DeviceLogin")
            .field("source", &self.shared.settings.source)
            .field("state", &*self.shared.state.borrow())
            .field("fleet", &self.shared.fleet.is_some())
            .finish()
    }
}

/// Why another attempt is needed.
enum Again {
    /// The device code expired unapproved: start over at once.
    Now,
    /// Denied or failed: start over after a pause.
    After(TokenError),
}

impl From<StoreError> for Again {
    fn from(e: StoreError) -> Self {
        Self::After(TokenError::Store(e.to_string()))
    }
}

impl From<TokenError> for Again {
    fn from(e: TokenError) -> Self {
        Self::After(e)
    }
}

fn epoch_ms(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// Whether `e` means that only a person can get this source a token again.
fn needs_device_login(e: &TokenError) -> bool {
    match e {
        TokenError::NoRefreshToken(_) => true,
        TokenError::Oidc(e) => matches!(
            e.service_kind(),
            Some(ServiceErrorKind::InvalidGrant | ServiceErrorKind::InvalidClient)
        ),
        _ => false,
    }
}

impl DeviceLogin {
    /// A login for the source `refresh` belongs to; with `fleet`, one
    /// device flow serves every replica sharing that store.
    pub(crate) fn new(
        settings: LoginSettings,
        oidc: OidcClient,
        refresh: RefreshTokenSource,
        fleet: Option<SharedStoreSource>,
    ) -> Self {
        let fleet = fleet.map(|source| {
            let base = source.keys().record.trim_end_matches(":token").to_owned();
            Fleet {
                lock: StoreKeys {
                    record: format!("{base}:login"),
                    lock: format!("{base}:login:lock"),
                    fence: format!("{base}:login:fence"),
                },
                prompt_key: format!("{base}:login:prompt"),
                client_key: format!("{base}:login:client"),
                owner: format!("{}:{:08x}", std::process::id(), rand::random::<u32>()),
                source,
            }
        });
        Self {
            shared: Arc::new(Shared {
                settings,
                oidc,
                refresh,
                fleet,
                state: watch::Sender::new(LoginState::Idle),
                running: AtomicBool::new(false),
                force_register: AtomicBool::new(false),
                completed: watch::Sender::new(0),
            }),
        }
    }

    /// Where the login stands now.
    pub(crate) fn state(&self) -> LoginState {
        self.shared.state.borrow().clone()
    }

    /// Whether a login is running.
    pub(crate) fn in_progress(&self) -> bool {
        self.shared.running.load(Ordering::Acquire)
    }

    /// Changes each time a login completes.
    pub(crate) fn completions(&self) -> watch::Receiver<u64> {
        self.shared.completed.subscribe()
    }

    /// The error a fetch gets while the login runs.
    fn required(&self) -> TokenError {
        let how = match self.state() {
            LoginState::Waiting { prompt, .. } => format!(
                "approve the device login at {} with code {} (see GET /login)",
                prompt
                    .verification_uri_complete
                    .as_deref()
                    .unwrap_or(&prompt.verification_uri),
                prompt.user_code
            ),
            _ => "a device login is starting (see GET /login)".to_owned(),
        };
        TokenError::LoginRequired(how)
    }

    /// Starts the login unless one runs.
    fn start(&self, why: &TokenError) {
        if self.shared.running.swap(true, Ordering::AcqRel) {
            return;
        }
        if matches!(why, TokenError::Oidc(e) if e.service_kind() == Some(ServiceErrorKind::InvalidClient))
        {
            self.shared.force_register.store(true, Ordering::Relaxed);
        }
        tracing::warn!(
            source = %self.shared.settings.source,
            kind = why.kind_name(),
            error = %why,
            "no usable refresh token; starting a device login (see GET /login on the admin listener)"
        );
        self.shared.state.send_replace(LoginState::Starting);
        tokio::spawn(Arc::clone(&self.shared).run());
    }
}

// === impl Shared ===

impl Shared {
    /// Logs in, starting over until a login completes.
    async fn run(self: Arc<Self>) {
        let mut pause = self.settings.restart_pause;
        loop {
            let attempt = match &self.fleet {
                None => self.device_flow(None).await,
                Some(fleet) => self.fleet_login(fleet).await,
            };
            match attempt {
                Ok(()) => break,
                Err(Again::Now) => {
                    tracing::warn!(
                        source = %self.settings.source,
                        "the device code expired before anyone approved it; starting a new device authorization"
                    );
                }
                Err(Again::After(e)) => {
                    tracing::warn!(
                        source = %self.settings.source,
                        kind = e.kind_name(),
                        error = %e,
                        pause_s = pause.as_secs_f64(),
                        "device login failed; starting a new device authorization after a pause"
                    );
                    self.state.send_replace(LoginState::Starting);
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(MAX_RESTART_PAUSE);
                }
            }
        }
        self.state.send_replace(LoginState::Idle);
        self.running.store(false, Ordering::Release);
        self.completed.send_modify(|n| *n += 1);
        tracing::info!(source = %self.settings.source, "device login complete; serving");
    }

    /// The client to log in with, and whether it was registered (not
    /// configured): the configured one, else an unexpired registration
    /// (this process's, the state file's, the fleet's), else a new one.
    async fn client(&self) -> Result<(Registration, bool), Again> {
        let registered = self.refresh.uses_registered_client().await;
        let forced = self.force_register.swap(false, Ordering::Relaxed);
        if !registered {
            if let Some(client) = self.refresh.login_client().await {
                return Ok((client, false));
            }
        } else if !forced {
            if let Some(client) = self.refresh.login_client().await {
                return Ok((client, true));
            }
            if let Some(client) = self.published_client().await {
                return Ok((client, true));
            }
        }
        let mut request = RegisterClientRequest::public(self.settings.client_name.clone());
        if !self.settings.scopes.is_empty() {
            request.scopes = Some(self.settings.scopes.clone());
        }
        let response = self
            .oidc
            .register_client(&request)
            .await
            .map_err(TokenError::from)?;
        let (Some(client_id), Some(client_secret)) = (response.client_id, response.client_secret)
        else {
            return Err(Again::After(TokenError::Login(
                "RegisterClient returned no clientId or clientSecret".to_owned(),
            )));
        };
        let registration = Registration {
            client_id,
            client_secret,
            expires_at: response
                .client_secret_expires_at
                .map(|secs| UNIX_EPOCH + Duration::from_secs(secs.max(0) as u64)),
        };
        tracing::info!(
            source = %self.settings.source,
            client_id = %registration.client_id,
            "registered a client for the device login"
        );
        self.refresh.use_registration(registration.clone()).await;
        if let Some(fleet) = &self.fleet {
            let published = PublishedClient {
                client_id: registration.client_id.clone(),
                client_secret: registration.client_secret.clone(),
                expires_at_ms: registration.expires_at.map(epoch_ms),
            };
            let ttl = registration
                .expires_at
                .and_then(|at| at.duration_since(SystemTime::now()).ok());
            let json = serde_json::to_string(&published).expect("client serialises");
            fleet
                .source
                .store()
                .set_value(&fleet.client_key, &json, ttl)
                .await?;
        }
        Ok((registration, true))
    }

    /// A client another replica registered, if it has not expired.
    async fn published_client(&self) -> Option<Registration> {
        let fleet = self.fleet.as_ref()?;
        let json = fleet
            .source
            .store()
            .get_value(&fleet.client_key)
            .await
            .ok()??;
        let published: PublishedClient = serde_json::from_str(&json).ok()?;
        let registration = Registration {
            client_id: published.client_id,
            client_secret: published.client_secret,
            expires_at: published
                .expires_at_ms
                .map(|ms| UNIX_EPOCH + Duration::from_millis(ms)),
        };
        registration.is_usable().then_some(registration)
    }

    /// One device authorization: start it, show the prompt, poll until it
    /// is approved, and hand the tokens to the source (and, with `fleet`,
    /// to the shared store as the generation after `fleet.1`).
    async fn device_flow(&self, fleet: Option<(&Fleet, u64)>) -> Result<(), Again> {
        let (client, registered) = self.client().await?;
        let device = match self
            .oidc
            .start_device_authorization(&StartDeviceAuthorizationRequest {
                client_id: client.client_id.clone(),
                client_secret: client.client_secret.clone(),
                start_url: self.settings.start_url.clone(),
            })
            .await
        {
            Ok(d) => d,
            Err(e) => {
                if registered && e.service_kind() == Some(ServiceErrorKind::InvalidClient) {
                    self.force_register.store(true, Ordering::Relaxed);
                }
                return Err(Again::After(e.into()));
            }
        };
        let Some(device_code) = device.device_code.clone().filter(|c| !c.is_empty()) else {
            return Err(Again::After(TokenError::Login(
                "StartDeviceAuthorization returned no deviceCode".to_owned(),
            )));
        };
        let expires_in = Duration::from_secs(device.expires_in.unwrap_or(600).max(1) as u64);
        let prompt = LoginPrompt {
            verification_uri: device.verification_uri.clone().unwrap_or_default(),
            verification_uri_complete: device.verification_uri_complete.clone(),
            user_code: device.user_code.clone().unwrap_or_default(),
            expires_at_ms: epoch_ms(SystemTime::now() + expires_in),
        };
        tracing::warn!(
            source = %self.settings.source,
            verification_uri = %prompt.verification_uri,
            verification_uri_complete = prompt.verification_uri_complete.as_deref().unwrap_or(""),
            user_code = %prompt.user_code,
            expires_in_s = expires_in.as_secs(),
            "device login: open the verification URI and confirm the user code"
        );
        if let Some((fleet, _)) = fleet {
            let json = serde_json::to_string(&prompt).expect("prompt serialises");
            fleet
                .source
                .store()
                .set_value(&fleet.prompt_key, &json, Some(expires_in))
                .await?;
        }
        self.state
            .send_replace(LoginState::Waiting { prompt, here: true });

        let request = CreateTokenRequest::device_code(
            client.client_id.clone(),
            client.client_secret.clone(),
            device_code,
        )
        .with_scopes(self.settings.scopes.clone());
        let settings = PollSettings {
            interval: first_interval(device.interval, self.settings.default_interval),
            slow_down_increment: self.settings.slow_down_increment,
            expires_in,
            retry: self.settings.retry.clone(),
        };
        let response = match poll_device_token(&settings, || self.oidc.create_token(&request)).await
        {
            Ok(r) => r,
            Err(DevicePollError::Expired) => return Err(Again::Now),
            Err(DevicePollError::Failed(e)) => return Err(Again::After(e)),
        };
        let token = Token::from_response(&response)
            .map_err(TokenError::from)?
            .with_scopes(self.settings.scopes.clone());
        let Some(refresh_token) = response.refresh_token.clone().filter(|r| !r.is_empty()) else {
            return Err(Again::After(TokenError::Login(
                "the approved device login returned no refreshToken; the proxy could not keep the token fresh".to_owned(),
            )));
        };
        // Memory and state file first, then the fleet.
        self.refresh
            .adopt_login(
                registered.then_some(client),
                refresh_token.clone(),
                token.clone(),
            )
            .await;
        if let Some((fleet, base)) = fleet {
            if let Err(e) = fleet.source.store_login(base, &token, &refresh_token).await {
                tracing::warn!(source = %self.settings.source, error = %e, "could not store the login's tokens in the shared store");
            }
            let _ = fleet.source.store().delete(&fleet.prompt_key).await;
        }
        Ok(())
    }

    /// One login for the whole fleet: run the device flow under the login
    /// lock, or show the holder's prompt until a new token record appears.
    async fn fleet_login(&self, fleet: &Fleet) -> Result<(), Again> {
        let store = fleet.source.store();
        let base = fleet.source.generation().await?;
        let mut step = Duration::from_millis(100);
        loop {
            if fleet.source.generation().await? > base {
                return self.logged_in_elsewhere().await;
            }
            if let Some(fence) = store
                .try_lock(&fleet.lock, &fleet.owner, self.settings.lock_lease)
                .await?
            {
                // Another replica may have finished just before.
                if fleet.source.generation().await? > base {
                    let _ = store.release(&fleet.lock, &fence).await;
                    return self.logged_in_elsewhere().await;
                }
                tracing::info!(source = %self.settings.source, fence = fence.number, "took the fleet's login lock; this replica runs the device flow");
                let renewal = RenewOnDrop(tokio::spawn(renew_login_lock(
                    fleet.source.clone(),
                    fleet.lock.clone(),
                    fence.clone(),
                    self.settings.lock_lease,
                )));
                let result = self.device_flow(Some((fleet, base))).await;
                drop(renewal);
                if let Err(e) = store.release(&fleet.lock, &fence).await {
                    tracing::warn!(error = %e, "could not release the login lock; it expires with its lease");
                }
                return result;
            }
            // Another replica runs the flow: show its prompt.
            match store.get_value(&fleet.prompt_key).await? {
                Some(json) => {
                    if let Ok(prompt) = serde_json::from_str::<LoginPrompt>(&json) {
                        let state = LoginState::Waiting {
                            prompt,
                            here: false,
                        };
                        self.state.send_if_modified(|s| {
                            let changed = *s != state;
                            *s = state.clone();
                            changed
                        });
                    }
                }
                None => {
                    self.state.send_if_modified(|s| {
                        let changed = *s != LoginState::Starting;
                        *s = LoginState::Starting;
                        changed
                    });
                }
            }
            tokio::time::sleep(step).await;
            step = (step * 2).min(Duration::from_secs(1));
        }
    }

    /// Another replica logged in: take the client it registered, if any;
    /// the tokens come from the shared store at the next fetch.
    async fn logged_in_elsewhere(&self) -> Result<(), Again> {
        if self.refresh.uses_registered_client().await
            && let Some(client) = self.published_client().await
        {
            self.refresh.use_registration(client).await;
        }
        tracing::info!(source = %self.settings.source, "another replica completed the device login");
        Ok(())
    }
}

/// Aborts the lease renewal when the flow ends, however it ends.
struct RenewOnDrop(tokio::task::JoinHandle<()>);

impl Drop for RenewOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Extends the login lock every third of its lease while the flow runs.
async fn renew_login_lock(
    source: SharedStoreSource,
    keys: StoreKeys,
    fence: Fence,
    lease: Duration,
) {
    let period = (lease / 3).max(Duration::from_millis(10));
    loop {
        tokio::time::sleep(period).await;
        match source.store().renew(&keys, &fence, lease).await {
            Ok(true) => {}
            Ok(false) => {
                tracing::warn!(
                    fence = fence.number,
                    "lost the login lock (its lease ran out); another replica may start a device flow"
                );
                return;
            }
            Err(e) => tracing::debug!(error = %e, "could not renew the login lock"),
        }
    }
}

/// A source that logs in by itself: hands out the inner source's tokens,
/// and starts the device login when it has no usable refresh token; while
/// the login runs, fetches fail at once with `LoginRequired` (no
/// `CreateToken` with a refresh token known to be refused).
pub(crate) struct DeviceLoginSource {
    inner: Arc<dyn TokenSource>,
    login: DeviceLogin,
}

impl DeviceLoginSource {
    /// Wraps `inner`, the source `login` logs in for.
    pub(crate) fn new(inner: Arc<dyn TokenSource>, login: DeviceLogin) -> Self {
        Self { inner, login }
    }

    async fn fetch_inner(&self, reuse: Reuse) -> Result<Token, TokenError> {
        if self.login.in_progress() {
            return Err(self.login.required());
        }
        match self.inner.fetch(reuse).await {
            Err(e) if needs_device_login(&e) => {
                self.login.start(&e);
                Err(self.login.required())
            }
            other => other,
        }
    }
}

impl TokenSource for DeviceLoginSource {
    fn identity(&self) -> String {
        self.inner.identity()
    }

    fn scopes(&self) -> &[String] {
        self.inner.scopes()
    }

    fn fetch(&self, reuse: Reuse) -> FetchFuture<'_> {
        Box::pin(self.fetch_inner(reuse))
    }

    fn reload(&self, update: CredentialUpdate) -> ReloadFuture<'_> {
        self.inner.reload(update)
    }

    fn persistence(&self) -> Option<PersistStatus> {
        self.inner.persistence()
    }

    fn registration_expires_at(&self) -> Option<tokio::time::Instant> {
        self.inner.registration_expires_at()
    }
}
