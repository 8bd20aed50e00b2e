//! An in-process emulator of AWS IAM Identity Center OIDC (`sso-oidc`), with
//! a protected echo resource, for tests, demos and the offline quick start.
//!
//! One listener serves:
//!
//! | route | what |
//! |---|---|
//! | `POST /client/register` | `RegisterClient` |
//! | `POST /device_authorization` | `StartDeviceAuthorization` |
//! | `POST /token` | `CreateToken`: `refresh_token`, device code and `authorization_code` (PKCE S256) grants |
//! | `POST /token?aws_iam=t` | `CreateTokenWithIAM`, SigV4-verified against the test credentials: JWT bearer (assertions of the test issuer), token exchange, `refresh_token` and `authorization_code` grants |
//! | `POST /_emulator/applications` | add an application for `CreateTokenWithIAM`: `{"arn", "audiences"?, "scopes"?}` |
//! | `POST /_emulator/jwt` | mint an assertion of the test issuer: `{"sub", "aud"?, "lifetime_secs"?, "expired"?}` → `{"assertion"}` |
//! | `GET /_emulator/idp/jwks.json`, `GET /_emulator/idp/.well-known/openid-configuration` | the test issuer's key and discovery document (issuer `<base>/_emulator/idp`) |
//! | `POST /_emulator/faults`, `DELETE /_emulator/faults` | script faults per operation, clear them |
//! | `GET /_emulator/counters` | [`Counters`] as JSON |
//! | `POST /_emulator/clients` | register a client directly: `{"client_name":"x"}` → `{"clientId","clientSecret"}` |
//! | `POST /_emulator/refresh_tokens` | `{"client_id","scopes"}` → `{"refreshToken"}` |
//! | `POST /_emulator/authorization_codes` | `{"client_id","redirect_uri","code_challenge"?}` → `{"code"}` |
//! | `POST /_emulator/config` | `{"access_token_lifetime_secs"?, "access_token_lifetime_ms"?, "rotate_refresh_tokens"?}` |
//! | `POST /_emulator/revoke_access_tokens` | every access token stops working |
//! | `POST /_emulator/revoke_refresh_tokens` | every refresh token is refused (`InvalidGrant`) → `{"ok","revoked"}` |
//! | `GET /_emulator/device?user_code=X` | HTML page with an Approve / Deny form |
//! | `POST /_emulator/device/approve`, `.../deny` | decide a device authorization (form or JSON `user_code`) |
//! | anything else | the protected echo resource |
//!
//! `CreateTokenWithIAM` knows the applications of
//! [`EmulatorConfig::applications`] (by default [`DEFAULT_APPLICATION_ARN`],
//! accepting assertions with `aud` = [`DEFAULT_AUDIENCE`]) and accepts calls
//! signed with [`EmulatorConfig::aws_credentials`] (by default
//! [`TEST_ACCESS_KEY_ID`] / [`TEST_SECRET_ACCESS_KEY`]). A missing or bad
//! signature gets AWS's 403 answer (`InvalidSignatureException`,
//! `UnrecognizedClientException`, ...). The access tokens it issues carry the
//! user's subject: see [`token_subject`].
//!
//! Errors look like the real service's: the model's status, an
//! `x-amzn-ErrorType: <Shape>:http://internal.amazon.com/coral/com.amazonaws.sso.oidc/`
//! header and a JSON body `{"error":"<oauth code>","error_description":"..."}`.
//! Every answer carries `x-amzn-RequestId`.
//!
//! The echo resource answers `200` with a JSON description of the request
//! (method, path, query, version, headers without `authorization` and
//! `x-api-token`, body length, `token_header`: the header the token came
//! in) when `Authorization: Bearer` (or, bare, `X-Api-Token`) carries a
//! live access token this emulator issued, and `401` with `www-authenticate: Bearer
//! error="invalid_token"` otherwise. Request headers steer it:
//! `x-echo-status: NNN`, `x-echo-delay-ms: N`, `x-echo-response-bytes: N`
//! (N bytes where byte `i` is `i % 251`, streamed, instead of JSON) and
//! `x-echo-set-cookies: N`.
//!
//! No token, client secret or device code is ever logged.
//!
//! # Example
//!
//! A token through the whole chain, offline: the emulator plays
//! SSO-OIDC for a [`RefreshTokenSource`](crate::RefreshTokenSource) behind
//! a [`TokenCache`](crate::TokenCache).
//!
//! ```
//! use sso_token_proxy::{
//!     CacheOptions, OidcClient, RefreshTokenSource, TokenCache,
//!     emulator::{Emulator, EmulatorConfig},
//! };
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let emulator = Emulator::start(EmulatorConfig::default()).await?;
//! let (client_id, client_secret) = emulator.register_client("doc-example");
//! let refresh_token = emulator.issue_refresh_token(&client_id, &[]);
//!
//! let oidc = OidcClient::builder().endpoint(emulator.url()).build()?;
//! let source = RefreshTokenSource::builder(oidc, client_id, client_secret, refresh_token).build()?;
//! let cache = TokenCache::new(source, CacheOptions::default());
//!
//! let token = cache.get().await?;
//! assert!(emulator.is_access_token_live(token.access_token().expose()));
//! assert_eq!(emulator.counters().create_token, 1);
//! emulator.shutdown().await;
//! # Ok(())
//! # }
//! ```

mod admin;
mod echo;
mod fault;
mod iam;
mod idp;
mod service;
mod sigv4;
mod state;
mod wire;

/// The admin listener's `/login` page escapes with the emulator's helper.
#[cfg(feature = "proxy")]
pub(crate) use self::wire::html_escape;

use std::{
    io,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    sync::{Arc, Mutex, MutexGuard, PoisonError},
    time::{Duration, Instant},
};

use axum::{Router, extract::Request, response::Response};
use http::{HeaderValue, Method};
use tokio::{sync::watch, task::JoinHandle};

use self::state::{Settings, State};
pub use self::{
    fault::Fault,
    iam::{
        DEFAULT_APPLICATION_ARN, DEFAULT_AUDIENCE, EmulatorApplication, TEST_ACCESS_KEY_ID,
        TEST_SECRET_ACCESS_KEY, test_aws_credentials,
    },
    sigv4::TestAwsCredentials,
    state::Counters,
};
use crate::{oidc::Operation, secret::Secret};

/// How long [`EmulatorHandle::shutdown`] lets in-flight requests finish.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

/// How to run an [`Emulator`].
#[derive(Debug, Clone)]
pub struct EmulatorConfig {
    /// Where to listen. Default `127.0.0.1:0` (any free port).
    pub listen: SocketAddr,
    /// Lifetime of issued access tokens; sent as `expiresIn`, in whole
    /// seconds rounded up, at least 1. Default one hour.
    pub access_token_lifetime: Duration,
    /// Whether a `refresh_token` grant returns a new refresh token and
    /// revokes the one used. Default `true`.
    pub rotate_refresh_tokens: bool,
    /// With rotation: keep a used refresh token valid until the token it was
    /// rotated into is first used (as OAuth servers with a reuse grace do).
    /// A client that crashes after the server rotated but before it saved
    /// the new token can then still use the old one. Default `false`: the
    /// used token is revoked at once.
    pub rotation_grace: bool,
    /// Lifetime of device codes. Default 10 minutes.
    pub device_code_lifetime: Duration,
    /// Minimum time between device code polls, enforced to the millisecond
    /// and reported as `interval` in whole seconds rounded up. Zero turns the
    /// too-fast check off. Default 5 s.
    pub device_poll_interval: Duration,
    /// Clients that exist from the start.
    pub clients: Vec<SeedClient>,
    /// AWS credentials whose SigV4 signatures `CreateTokenWithIAM` accepts.
    /// Default: [`test_aws_credentials`].
    pub aws_credentials: Vec<TestAwsCredentials>,
    /// Applications `CreateTokenWithIAM` knows. Default: one,
    /// [`EmulatorApplication::default`].
    pub applications: Vec<EmulatorApplication>,
}

impl Default for EmulatorConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 0),
            access_token_lifetime: Duration::from_secs(3600),
            rotate_refresh_tokens: true,
            rotation_grace: false,
            device_code_lifetime: Duration::from_secs(600),
            device_poll_interval: Duration::from_secs(5),
            clients: Vec::new(),
            aws_credentials: vec![test_aws_credentials()],
            applications: vec![EmulatorApplication::default()],
        }
    }
}

/// Marks an access token that carries its user's subject.
pub(crate) const SUBJECT_TOKEN_PREFIX: &str = "aoi.";

/// The subject (user) an access token from this emulator's
/// `CreateTokenWithIAM` stands for; `None` for other tokens.
pub fn token_subject(access_token: &str) -> Option<String> {
    use base64::{Engine as _, engine::general_purpose::URL_SAFE_NO_PAD};
    let encoded = access_token
        .strip_prefix(SUBJECT_TOKEN_PREFIX)?
        .split('.')
        .next()?;
    String::from_utf8(URL_SAFE_NO_PAD.decode(encoded).ok()?).ok()
}

/// A client registered before the emulator starts.
#[derive(Debug, Clone)]
pub struct SeedClient {
    /// The client id.
    pub client_id: String,
    /// The client secret.
    pub client_secret: Secret,
    /// Refresh tokens that are live from the start, with `scopes`.
    pub refresh_tokens: Vec<Secret>,
    /// The client's scopes.
    pub scopes: Vec<String>,
}

/// State shared by the server task and every handle.
pub(crate) struct Shared {
    state: Mutex<State>,
    base_url: String,
}

impl Shared {
    /// The state lock. Never hold it across an `.await`.
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// An assertion of the test issuer for `sub` and `aud`.
    fn mint_assertion(&self, sub: &str, aud: &str, lifetime: Duration, expired: bool) -> String {
        let issuer = iam::issuer_url(&self.base_url);
        self.lock()
            .iam
            .issuer
            .mint(&issuer, sub, aud, lifetime, expired)
    }
}

struct ServerControl {
    stop: watch::Sender<bool>,
    task: Mutex<Option<JoinHandle<()>>>,
}

/// Starts emulators.
#[derive(Debug, Clone, Copy)]
pub struct Emulator;

impl Emulator {
    /// Binds `config.listen` and serves the emulator on a background task
    /// until [`EmulatorHandle::shutdown`] (or until the runtime ends;
    /// dropping the handles does not stop it).
    pub async fn start(config: EmulatorConfig) -> io::Result<EmulatorHandle> {
        let listener = tokio::net::TcpListener::bind(config.listen).await?;
        let addr = listener.local_addr()?;
        let base_url = format!("http://{}", reachable(addr));

        let mut state = State::new(
            Settings {
                access_token_lifetime: config.access_token_lifetime,
                rotate_refresh_tokens: config.rotate_refresh_tokens,
                rotation_grace: config.rotation_grace,
                device_code_lifetime: config.device_code_lifetime,
                device_poll_interval: config.device_poll_interval,
            },
            iam::IamState::new(config.aws_credentials, config.applications),
        );
        for seed in config.clients {
            state.add_client(
                Some(seed.client_id.clone()),
                Some(seed.client_secret.expose().to_owned()),
                seed.scopes.clone(),
                None,
            );
            for token in &seed.refresh_tokens {
                state.add_refresh_token(token.expose().to_owned(), &seed.client_id, &seed.scopes);
            }
        }
        let shared = Arc::new(Shared {
            state: Mutex::new(state),
            base_url,
        });

        let router = Router::new()
            .fallback(route)
            .with_state(Arc::clone(&shared));
        let (stop, mut stop_rx) = watch::channel(false);
        let stop_signal = async move {
            // Stop when told to; if every handle is gone, keep serving.
            while !*stop_rx.borrow_and_update() {
                if stop_rx.changed().await.is_err() {
                    std::future::pending::<()>().await;
                }
            }
        };
        let task = tokio::spawn(async move {
            if let Err(e) = axum::serve(listener, router)
                .with_graceful_shutdown(stop_signal)
                .await
            {
                tracing::warn!(error = %e, "emulator server stopped with an error");
            }
        });
        tracing::debug!(%addr, "emulator listening");
        Ok(EmulatorHandle {
            shared,
            addr,
            control: Arc::new(ServerControl {
                stop,
                task: Mutex::new(Some(task)),
            }),
        })
    }
}

/// An address a client can connect to: unspecified becomes loopback.
fn reachable(addr: SocketAddr) -> SocketAddr {
    match addr.ip() {
        IpAddr::V4(ip) if ip.is_unspecified() => {
            SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), addr.port())
        }
        IpAddr::V6(ip) if ip.is_unspecified() => {
            SocketAddr::new(IpAddr::V6(Ipv6Addr::LOCALHOST), addr.port())
        }
        _ => addr,
    }
}

async fn route(
    axum::extract::State(shared): axum::extract::State<Arc<Shared>>,
    req: Request,
) -> Response {
    let operation = if req.method() == Method::POST {
        let iam = req
            .uri()
            .query()
            .and_then(|q| wire::form_value(q, "aws_iam"))
            .is_some_and(|v| v == "t");
        match req.uri().path() {
            "/token" if iam => Some(Operation::CreateTokenWithIam),
            "/token" => Some(Operation::CreateToken),
            "/client/register" => Some(Operation::RegisterClient),
            "/device_authorization" => Some(Operation::StartDeviceAuthorization),
            _ => None,
        }
    } else {
        None
    };
    let mut resp = match operation {
        Some(op) => {
            let (parts, body) = req.into_parts();
            service::handle(&shared, op, &parts, body).await
        }
        None => match admin::handle(&shared, req).await {
            Ok(resp) => resp,
            Err(req) => echo::handle(&shared, req).await,
        },
    };
    if let Ok(id) = HeaderValue::from_str(&state::request_id()) {
        resp.headers_mut().insert(wire::REQUEST_ID_HEADER, id);
    }
    resp
}

/// A handle on a running emulator. Clones share the same emulator.
#[derive(Clone)]
pub struct EmulatorHandle {
    shared: Arc<Shared>,
    addr: SocketAddr,
    control: Arc<ServerControl>,
}

impl std::fmt::Debug for EmulatorHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EmulatorHandle")
            .field("addr", &self.addr)
            .finish_non_exhaustive()
    }
}

impl EmulatorHandle {
    /// The bound address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Base URL, e.g. `http://127.0.0.1:40123` (no trailing slash). An
    /// unspecified listen address is given as loopback.
    pub fn url(&self) -> String {
        self.shared.base_url.clone()
    }

    /// Registers a public client directly (no HTTP call, not counted).
    /// Returns its id and secret.
    pub fn register_client(&self, name: &str) -> (String, Secret) {
        let registered = self.shared.lock().add_client(None, None, Vec::new(), None);
        tracing::debug!(client_name = name, "emulator: registered a client directly");
        (registered.client_id, Secret::new(registered.client_secret))
    }

    /// Issues a live refresh token for `client_id` with `scopes`. The client
    /// need not exist, but only an existing client can redeem it.
    pub fn issue_refresh_token(&self, client_id: &str, scopes: &[String]) -> Secret {
        Secret::new(self.shared.lock().issue_refresh_token(client_id, scopes))
    }

    /// Issues a single-use authorization code for `client_id`, redeemable
    /// with the same `redirect_uri` and, when `code_challenge` (an S256 PKCE
    /// challenge) is given, the matching `codeVerifier`. It lives 10 minutes.
    pub fn issue_authorization_code(
        &self,
        client_id: &str,
        redirect_uri: &str,
        code_challenge: Option<&str>,
    ) -> Secret {
        Secret::new(self.shared.lock().issue_authorization_code(
            client_id,
            redirect_uri,
            code_challenge,
            Instant::now(),
        ))
    }

    /// The issuer URL of the test token issuer (`<url>/_emulator/idp`): the
    /// `iss` of its assertions.
    pub fn issuer_url(&self) -> String {
        iam::issuer_url(&self.shared.base_url)
    }

    /// A JWT of the test issuer for `subject`, with `aud` =
    /// [`DEFAULT_AUDIENCE`], valid for `lifetime`.
    pub fn mint_assertion(&self, subject: &str, lifetime: Duration) -> Secret {
        Secret::new(
            self.shared
                .mint_assertion(subject, DEFAULT_AUDIENCE, lifetime, false),
        )
    }

    /// A JWT of the test issuer for `subject` and `audience`; with
    /// `expired`, one that expired `lifetime` ago.
    pub fn mint_assertion_with(
        &self,
        subject: &str,
        audience: &str,
        lifetime: Duration,
        expired: bool,
    ) -> Secret {
        Secret::new(
            self.shared
                .mint_assertion(subject, audience, lifetime, expired),
        )
    }

    /// Adds (or replaces) an application `CreateTokenWithIAM` knows.
    pub fn add_application(&self, application: EmulatorApplication) {
        self.shared.lock().iam.add_application(application);
    }

    /// Refuses `CreateTokenWithIAM` for `subject` from now on with
    /// `AccessDeniedException`, as Identity Center does for a user not
    /// assigned to the application (JWT bearer and token exchange grants).
    pub fn deny_user(&self, subject: &str) {
        self.shared.lock().iam.deny_user(subject);
    }

    /// Approves the pending device authorization with this user code.
    /// `false` if there is none (unknown, expired or already decided).
    pub fn approve(&self, user_code: &str) -> bool {
        self.shared
            .lock()
            .decide_device(user_code, true, Instant::now())
    }

    /// Every device code issued so far, for tests that check none leaks.
    pub fn device_codes(&self) -> Vec<Secret> {
        self.shared.lock().device_codes()
    }

    /// Denies the pending device authorization with this user code.
    /// `false` if there is none (unknown, expired or already decided).
    pub fn deny(&self, user_code: &str) -> bool {
        self.shared
            .lock()
            .decide_device(user_code, false, Instant::now())
    }

    /// Appends faults to the operation's script; each call of the operation
    /// consumes one, first in first out.
    pub fn inject(&self, op: Operation, faults: impl IntoIterator<Item = Fault>) {
        self.shared.lock().inject(op, faults);
    }

    /// Sets (or with `None` clears) a fault played on every call of the
    /// operation whose script is empty.
    pub fn inject_always(&self, op: Operation, fault: Option<Fault>) {
        self.shared.lock().inject_always(op, fault);
    }

    /// Clears every script and sticky fault.
    pub fn clear_faults(&self) {
        self.shared.lock().clear_faults();
    }

    /// A snapshot of the counters.
    pub fn counters(&self) -> Counters {
        self.shared.lock().counters.clone()
    }

    /// Lifetime of access tokens issued from now on.
    pub fn set_access_token_lifetime(&self, lifetime: Duration) {
        self.shared.lock().settings.access_token_lifetime = lifetime;
    }

    /// Turns refresh token rotation on or off for later grants.
    pub fn set_rotation(&self, on: bool) {
        self.shared.lock().settings.rotate_refresh_tokens = on;
    }

    /// Revokes every access token issued so far.
    pub fn revoke_access_tokens(&self) {
        self.shared.lock().revoke_access_tokens();
    }

    /// Revokes every refresh token issued so far: the next refresh with any
    /// of them gets `InvalidGrant`. Returns how many were live.
    pub fn revoke_refresh_tokens(&self) -> usize {
        self.shared.lock().revoke_refresh_tokens()
    }

    /// Whether `token` is a refresh token this emulator issued and has not
    /// revoked.
    pub fn is_refresh_token_live(&self, token: &str) -> bool {
        self.shared.lock().is_refresh_token_live(token)
    }

    /// Whether `token` is an access token this emulator issued that has not
    /// expired or been revoked.
    pub fn is_access_token_live(&self, token: &str) -> bool {
        self.shared
            .lock()
            .is_access_token_live(token, Instant::now())
    }

    /// Stops the emulator: no new connections are accepted (connects are
    /// refused once this returns), in-flight requests get up to 10 seconds
    /// to finish. Stops the emulator for every clone of the handle.
    pub async fn shutdown(self) {
        let _ = self.control.stop.send(true);
        let task = self
            .control
            .task
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        if let Some(mut task) = task
            && tokio::time::timeout(SHUTDOWN_GRACE, &mut task)
                .await
                .is_err()
        {
            task.abort();
            let _ = task.await;
        }
        tracing::debug!(addr = %self.addr, "emulator stopped");
    }
}

/// Runs an emulator with default settings on `listen` until Ctrl-C or
/// SIGTERM. Prints its URL and a ready-made client (id, secret and one
/// refresh token) to stdout, so a person can use it at once. These are the
/// emulator's own fake credentials, valid nowhere else.
pub async fn run_standalone(listen: SocketAddr) -> io::Result<()> {
    let handle = Emulator::start(EmulatorConfig {
        listen,
        ..EmulatorConfig::default()
    })
    .await?;
    let (client_id, client_secret) = handle.register_client("sso-token-proxy-emulator");
    let refresh_token = handle.issue_refresh_token(&client_id, &[]);
    println!("SSO-OIDC emulator listening on {}", handle.url());
    println!("  client id:     {client_id}");
    println!("  client secret: {}", client_secret.expose());
    println!("  refresh token: {}", refresh_token.expose());
    println!(
        "  echo resource: {}/anything (needs Authorization: Bearer <accessToken>)",
        handle.url()
    );
    println!("  CreateTokenWithIAM (POST /token?aws_iam=t, SigV4 for sso-oauth):");
    println!("    application ARN:   {DEFAULT_APPLICATION_ARN}");
    println!("    AWS access key id: {TEST_ACCESS_KEY_ID}");
    println!("    AWS secret key:    {TEST_SECRET_ACCESS_KEY}");
    println!(
        "    assertions:        POST {}/_emulator/jwt {{\"sub\":\"alice\"}} (issuer {}, aud {DEFAULT_AUDIENCE})",
        handle.url(),
        handle.issuer_url()
    );
    wait_for_stop_signal().await;
    handle.shutdown().await;
    Ok(())
}

async fn wait_for_stop_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let terminate = async {
            match signal(SignalKind::terminate()) {
                Ok(mut s) => {
                    s.recv().await;
                }
                Err(_) => std::future::pending::<()>().await,
            }
        };
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            () = terminate => {}
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}
