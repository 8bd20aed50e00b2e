//! The emulator's bookkeeping: clients, tokens, device codes, authorization
//! codes, fault scripts and counters, and the service rules that act on them.
//!
//! Everything here is synchronous; the server keeps one [`State`] behind a
//! `std::sync::Mutex` and never holds the lock across an `.await`.

use std::{
    collections::{BTreeMap, HashMap, HashSet, VecDeque},
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use base64::{Engine as _, engine::general_purpose::URL_SAFE_NO_PAD};
use rand::Rng as _;
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

use crate::{
    oidc::{
        CreateTokenRequest, CreateTokenResponse, GRANT_AUTHORIZATION_CODE, GRANT_DEVICE_CODE,
        GRANT_JWT_BEARER, GRANT_REFRESH_TOKEN, GRANT_TOKEN_EXCHANGE, Operation,
        RegisterClientRequest, RegisterClientResponse, ServiceErrorKind,
        StartDeviceAuthorizationRequest, StartDeviceAuthorizationResponse,
    },
    secret::Secret,
};

use super::fault::Fault;

/// How much a `slow_down` answer adds to a device code's interval (RFC 8628
/// §3.5).
const SLOW_DOWN_STEP: Duration = Duration::from_secs(5);
/// How long a registered client secret is said to live.
const CLIENT_SECRET_LIFETIME_SECS: i64 = 90 * 24 * 3600;
/// How long an authorization code stays redeemable.
const AUTHORIZATION_CODE_LIFETIME: Duration = Duration::from_secs(600);
/// Past this many access tokens (at least), expired ones are dropped on the
/// next issue.
const ACCESS_TOKEN_PRUNE_AT: usize = 4096;

/// A snapshot of what the emulator has been asked to do.
///
/// Operation counters count every call that reached the operation, including
/// failed and faulted ones; calls made through
/// [`EmulatorHandle`](super::EmulatorHandle) methods or the `/_emulator/`
/// admin routes are not counted.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Counters {
    /// `CreateToken` calls (`POST /token`).
    pub create_token: u64,
    /// `CreateTokenWithIAM` calls (`POST /token?aws_iam=t`), signed or not.
    #[serde(default)]
    pub create_token_with_iam: u64,
    /// `RegisterClient` calls (`POST /client/register`).
    pub register_client: u64,
    /// `StartDeviceAuthorization` calls (`POST /device_authorization`).
    pub start_device_authorization: u64,
    /// `CreateToken` calls whose body could be read, by `grantType`
    /// (`refresh_token`, `authorization_code`, the device code URN, or
    /// `other` for anything unsupported).
    pub create_token_by_grant: BTreeMap<String, u64>,
    /// `CreateTokenWithIAM` calls that passed SigV4 and whose body could be
    /// read, by `grantType` (`other` for anything unsupported).
    #[serde(default)]
    pub create_token_with_iam_by_grant: BTreeMap<String, u64>,
    /// Error answers by kind name (`InvalidGrant`, `SlowDown`, ...), plus
    /// `Html502`, `EmptyBody` and `Malformed200` for those injected faults.
    pub errors_by_kind: BTreeMap<String, u64>,
    /// Successful `CreateToken` answers.
    pub tokens_issued: u64,
    /// Echo requests that carried a live access token.
    pub echo_authorized: u64,
    /// Echo requests answered `401`.
    pub echo_unauthorized: u64,
}

impl Counters {
    pub(crate) fn count_operation(&mut self, op: Operation) {
        match op {
            Operation::CreateToken => self.create_token += 1,
            Operation::CreateTokenWithIam => self.create_token_with_iam += 1,
            Operation::RegisterClient => self.register_client += 1,
            Operation::StartDeviceAuthorization => self.start_device_authorization += 1,
        }
    }

    pub(crate) fn count_error(&mut self, label: &str) {
        *self.errors_by_kind.entry(label.to_owned()).or_default() += 1;
    }

    pub(crate) fn count_iam_grant(&mut self, grant: &str) {
        let key = match grant {
            GRANT_REFRESH_TOKEN
            | GRANT_AUTHORIZATION_CODE
            | GRANT_JWT_BEARER
            | GRANT_TOKEN_EXCHANGE => grant,
            _ => "other",
        };
        *self
            .create_token_with_iam_by_grant
            .entry(key.to_owned())
            .or_default() += 1;
    }

    fn count_grant(&mut self, grant: &str) {
        let key = match grant {
            GRANT_REFRESH_TOKEN | GRANT_DEVICE_CODE | GRANT_AUTHORIZATION_CODE => grant,
            _ => "other",
        };
        *self
            .create_token_by_grant
            .entry(key.to_owned())
            .or_default() += 1;
    }
}

/// A modelled error answer, before it is put on the wire.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ApiError {
    pub(crate) kind: ServiceErrorKind,
    pub(crate) description: String,
    pub(crate) reason: Option<&'static str>,
}

impl ApiError {
    pub(crate) fn new(kind: ServiceErrorKind, description: impl Into<String>) -> Self {
        Self {
            kind,
            description: description.into(),
            reason: None,
        }
    }
}

fn err<T>(kind: ServiceErrorKind, description: impl Into<String>) -> Result<T, ApiError> {
    Err(ApiError::new(kind, description))
}

/// Settings that can change while the emulator runs.
#[derive(Debug, Clone)]
pub(crate) struct Settings {
    pub(crate) access_token_lifetime: Duration,
    pub(crate) rotate_refresh_tokens: bool,
    pub(crate) rotation_grace: bool,
    pub(crate) device_code_lifetime: Duration,
    pub(crate) device_poll_interval: Duration,
}

struct ClientEntry {
    secret: String,
    scopes: Vec<String>,
    grant_types: Option<Vec<String>>,
}

struct RefreshEntry {
    client_id: String,
    scopes: Vec<String>,
    revoked: bool,
    /// With rotation grace: the token this one was rotated from, revoked
    /// when this one is first used.
    parent: Option<String>,
    /// With rotation grace: the unused token issued for this one.
    successor: Option<String>,
}

/// What the emulator knows about an access token it issued.
pub(crate) struct AccessEntry {
    pub(crate) expires_at: Instant,
    /// The user it stands for (`CreateTokenWithIAM` tokens).
    pub(crate) subject: Option<String>,
    /// The client or application it was issued to (`CreateTokenWithIAM`
    /// tokens).
    pub(crate) audience: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum DeviceStatus {
    Pending,
    Approved,
    Denied,
    Redeemed,
}

struct DeviceEntry {
    client_id: String,
    expires_at: Instant,
    interval: Duration,
    last_poll: Option<Instant>,
    status: DeviceStatus,
}

struct AuthCodeEntry {
    client_id: String,
    redirect_uri: String,
    code_challenge: Option<String>,
    expires_at: Instant,
    used: bool,
}

#[derive(Default)]
struct FaultScript {
    queue: VecDeque<Fault>,
    always: Option<Fault>,
}

/// All mutable emulator state.
pub(crate) struct State {
    pub(crate) settings: Settings,
    pub(crate) counters: Counters,
    clients: HashMap<String, ClientEntry>,
    refresh_tokens: HashMap<String, RefreshEntry>,
    access_tokens: HashMap<String, AccessEntry>,
    /// Expired access tokens are dropped when this many are held; doubled
    /// past what a prune leaves, so pruning stays linear overall.
    access_tokens_prune_at: usize,
    devices: HashMap<String, DeviceEntry>,
    /// user code → device code
    user_codes: HashMap<String, String>,
    auth_codes: HashMap<String, AuthCodeEntry>,
    faults: HashMap<Operation, FaultScript>,
    /// `CreateTokenWithIAM`: test credentials, applications, the test issuer.
    pub(crate) iam: super::iam::IamState,
}

// === random values ===

const URL_SAFE_ALPHABET: &[u8] =
    b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";

fn random_from(alphabet: &[u8], len: usize) -> String {
    let mut rng = rand::rng();
    (0..len)
        .map(|_| char::from(alphabet[rng.random_range(0..alphabet.len())]))
        .collect()
}

pub(crate) fn random_token(prefix: &str, len: usize) -> String {
    format!("{prefix}{}", random_from(URL_SAFE_ALPHABET, len))
}

/// A random id shaped like a UUID, for `x-amzn-RequestId`.
pub(crate) fn request_id() -> String {
    let hex = random_from(b"0123456789abcdef", 32);
    format!(
        "{}-{}-{}-{}-{}",
        &hex[..8],
        &hex[8..12],
        &hex[12..16],
        &hex[16..20],
        &hex[20..]
    )
}

pub(crate) fn epoch_secs() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

/// Whole seconds, rounded up, as the wire's `i32`.
pub(crate) fn ceil_secs(d: Duration) -> i32 {
    let secs = d.as_nanos().div_ceil(1_000_000_000);
    i32::try_from(secs).unwrap_or(i32::MAX)
}

/// The S256 PKCE transform of a code verifier (RFC 7636 §4.2).
pub(crate) fn pkce_s256(verifier: &str) -> String {
    URL_SAFE_NO_PAD.encode(Sha256::digest(verifier.as_bytes()))
}

fn is_absolute_http_url(uri: &str) -> bool {
    match uri.parse::<http::Uri>() {
        Ok(parsed) => {
            matches!(parsed.scheme_str(), Some("http" | "https"))
                && parsed.authority().is_some_and(|a| !a.host().is_empty())
        }
        Err(_) => false,
    }
}

fn is_subset(requested: &[String], granted: &[String]) -> bool {
    let granted: HashSet<&str> = granted.iter().map(String::as_str).collect();
    requested.iter().all(|s| granted.contains(s.as_str()))
}

/// The scopes a device-code or authorization-code grant issues: those
/// requested (which must be among the client's, if it registered any), or
/// else the client's.
fn scopes_for_grant(
    requested: Vec<String>,
    client_scopes: Vec<String>,
) -> Result<Vec<String>, ApiError> {
    if !client_scopes.is_empty() && !is_subset(&requested, &client_scopes) {
        return err(
            ServiceErrorKind::InvalidScope,
            "Requested scopes exceed those of the client",
        );
    }
    Ok(if requested.is_empty() {
        client_scopes
    } else {
        requested
    })
}

/// The result of a direct (not HTTP) client registration.
pub(crate) struct Registered {
    pub(crate) client_id: String,
    pub(crate) client_secret: String,
}

impl State {
    /// A state with hour-long tokens, rotation and the IAM test fixtures,
    /// for the emulator's unit tests.
    #[cfg(test)]
    pub(crate) fn for_tests() -> Self {
        Self::new(
            Settings {
                access_token_lifetime: Duration::from_secs(3600),
                rotate_refresh_tokens: true,
                rotation_grace: false,
                device_code_lifetime: Duration::from_secs(600),
                device_poll_interval: Duration::from_secs(5),
            },
            super::iam::IamState::for_tests(),
        )
    }

    pub(crate) fn new(settings: Settings, iam: super::iam::IamState) -> Self {
        Self {
            settings,
            counters: Counters::default(),
            clients: HashMap::new(),
            refresh_tokens: HashMap::new(),
            access_tokens: HashMap::new(),
            access_tokens_prune_at: ACCESS_TOKEN_PRUNE_AT,
            devices: HashMap::new(),
            user_codes: HashMap::new(),
            auth_codes: HashMap::new(),
            faults: HashMap::new(),
            iam,
        }
    }

    // === faults ===

    pub(crate) fn inject(&mut self, op: Operation, faults: impl IntoIterator<Item = Fault>) {
        self.faults.entry(op).or_default().queue.extend(faults);
    }

    pub(crate) fn inject_always(&mut self, op: Operation, fault: Option<Fault>) {
        self.faults.entry(op).or_default().always = fault;
    }

    pub(crate) fn clear_faults(&mut self) {
        self.faults.clear();
    }

    /// The fault for the next call of `op`: the head of its script, else the
    /// sticky fault.
    pub(crate) fn take_fault(&mut self, op: Operation) -> Option<Fault> {
        let script = self.faults.get_mut(&op)?;
        script.queue.pop_front().or(script.always)
    }

    // === clients ===

    pub(crate) fn add_client(
        &mut self,
        client_id: Option<String>,
        client_secret: Option<String>,
        scopes: Vec<String>,
        grant_types: Option<Vec<String>>,
    ) -> Registered {
        let client_id = client_id.unwrap_or_else(|| random_token("", 22));
        let client_secret = client_secret.unwrap_or_else(|| random_token("aos", 120));
        self.clients.insert(
            client_id.clone(),
            ClientEntry {
                secret: client_secret.clone(),
                scopes,
                grant_types,
            },
        );
        Registered {
            client_id,
            client_secret,
        }
    }

    pub(crate) fn has_client(&self, client_id: &str) -> bool {
        self.clients.contains_key(client_id)
    }

    fn authenticate(
        &self,
        client_id: &str,
        client_secret: &Secret,
    ) -> Result<&ClientEntry, ApiError> {
        match self.clients.get(client_id) {
            Some(client) if client.secret == client_secret.expose() => Ok(client),
            Some(_) => err(ServiceErrorKind::InvalidClient, "Invalid client secret"),
            None => err(ServiceErrorKind::InvalidClient, "Invalid client id"),
        }
    }

    /// `RegisterClient`.
    pub(crate) fn register_client(
        &mut self,
        req: RegisterClientRequest,
    ) -> Result<RegisterClientResponse, ApiError> {
        if req.client_name.trim().is_empty() {
            return err(
                ServiceErrorKind::InvalidRequest,
                "clientName must not be empty",
            );
        }
        if req.client_type.is_empty() {
            return err(
                ServiceErrorKind::InvalidRequest,
                "clientType must not be empty",
            );
        }
        if req.client_type != "public" {
            return err(
                ServiceErrorKind::InvalidClientMetadata,
                "Invalid client type; only public clients are supported",
            );
        }
        if let Some(grants) = &req.grant_types
            && grants.iter().any(|g| {
                !matches!(
                    g.as_str(),
                    GRANT_REFRESH_TOKEN | GRANT_DEVICE_CODE | GRANT_AUTHORIZATION_CODE
                )
            })
        {
            return err(
                ServiceErrorKind::UnsupportedGrantType,
                "Unsupported grant type in grantTypes",
            );
        }
        if let Some(uris) = &req.redirect_uris
            && uris.iter().any(|u| !is_absolute_http_url(u))
        {
            return err(
                ServiceErrorKind::InvalidRedirectUri,
                "Redirect URIs must be absolute http or https URLs",
            );
        }
        let issued_at = epoch_secs();
        let registered =
            self.add_client(None, None, req.scopes.unwrap_or_default(), req.grant_types);
        Ok(RegisterClientResponse {
            client_id: Some(registered.client_id),
            client_secret: Some(Secret::new(registered.client_secret)),
            client_id_issued_at: Some(issued_at),
            client_secret_expires_at: Some(issued_at + CLIENT_SECRET_LIFETIME_SECS),
            authorization_endpoint: None,
            token_endpoint: None,
        })
    }

    // === device authorization ===

    /// `StartDeviceAuthorization`.
    pub(crate) fn start_device_authorization(
        &mut self,
        req: StartDeviceAuthorizationRequest,
        now: Instant,
        base_url: &str,
    ) -> Result<StartDeviceAuthorizationResponse, ApiError> {
        self.authenticate(&req.client_id, &req.client_secret)?;
        if req.start_url.trim().is_empty() {
            return err(
                ServiceErrorKind::InvalidRequest,
                "startUrl must not be empty",
            );
        }
        let device_code = random_token("aod", 80);
        let user_code = loop {
            let letters = random_from(b"ABCDEFGHIJKLMNOPQRSTUVWXYZ", 8);
            let code = format!("{}-{}", &letters[..4], &letters[4..]);
            if !self.user_codes.contains_key(&code) {
                break code;
            }
        };
        let lifetime = self.settings.device_code_lifetime;
        let interval = self.settings.device_poll_interval;
        self.devices.insert(
            device_code.clone(),
            DeviceEntry {
                client_id: req.client_id,
                expires_at: now + lifetime,
                interval,
                last_poll: None,
                status: DeviceStatus::Pending,
            },
        );
        self.user_codes
            .insert(user_code.clone(), device_code.clone());
        let verification_uri = format!("{base_url}/_emulator/device");
        Ok(StartDeviceAuthorizationResponse {
            device_code: Some(Secret::new(device_code)),
            verification_uri_complete: Some(format!("{verification_uri}?user_code={user_code}")),
            verification_uri: Some(verification_uri),
            user_code: Some(user_code),
            expires_in: Some(ceil_secs(lifetime)),
            interval: Some(ceil_secs(interval)),
        })
    }

    /// Every device code issued so far.
    pub(crate) fn device_codes(&self) -> Vec<Secret> {
        self.devices
            .keys()
            .map(|c| Secret::new(c.clone()))
            .collect()
    }

    /// Approves (or denies) a pending, unexpired device authorization.
    pub(crate) fn decide_device(&mut self, user_code: &str, approve: bool, now: Instant) -> bool {
        let Some(device_code) = self.user_codes.get(user_code.trim()) else {
            return false;
        };
        match self.devices.get_mut(device_code) {
            Some(entry) if entry.status == DeviceStatus::Pending && now < entry.expires_at => {
                entry.status = if approve {
                    DeviceStatus::Approved
                } else {
                    DeviceStatus::Denied
                };
                true
            }
            _ => false,
        }
    }

    // === tokens ===

    /// Makes `token` a live refresh token of `client_id`.
    pub(crate) fn add_refresh_token(&mut self, token: String, client_id: &str, scopes: &[String]) {
        self.refresh_tokens.insert(
            token,
            RefreshEntry {
                client_id: client_id.to_owned(),
                scopes: scopes.to_vec(),
                revoked: false,
                parent: None,
                successor: None,
            },
        );
    }

    pub(crate) fn issue_refresh_token(&mut self, client_id: &str, scopes: &[String]) -> String {
        let token = random_token("aor", 100);
        self.add_refresh_token(token.clone(), client_id, scopes);
        token
    }

    pub(crate) fn issue_authorization_code(
        &mut self,
        client_id: &str,
        redirect_uri: &str,
        code_challenge: Option<&str>,
        now: Instant,
    ) -> String {
        let code = random_token("aoc", 60);
        self.auth_codes.insert(
            code.clone(),
            AuthCodeEntry {
                client_id: client_id.to_owned(),
                redirect_uri: redirect_uri.to_owned(),
                code_challenge: code_challenge.map(str::to_owned),
                expires_at: now + AUTHORIZATION_CODE_LIFETIME,
                used: false,
            },
        );
        code
    }

    pub(crate) fn is_refresh_token_live(&self, token: &str) -> bool {
        self.refresh_tokens.get(token).is_some_and(|e| !e.revoked)
    }

    pub(crate) fn is_access_token_live(&self, token: &str, now: Instant) -> bool {
        self.live_access_token(token, now).is_some()
    }

    /// The entry of a live (issued, unexpired, unrevoked) access token.
    pub(crate) fn live_access_token(&self, token: &str, now: Instant) -> Option<&AccessEntry> {
        self.access_tokens.get(token).filter(|e| now < e.expires_at)
    }

    pub(crate) fn revoke_access_tokens(&mut self) {
        self.access_tokens.clear();
    }

    /// Revokes every refresh token issued so far (a user signing out, an
    /// administrator ending the session); returns how many were live.
    pub(crate) fn revoke_refresh_tokens(&mut self) -> usize {
        let live = self.refresh_tokens.values().filter(|e| !e.revoked).count();
        for entry in self.refresh_tokens.values_mut() {
            entry.revoked = true;
        }
        live
    }

    /// `CreateToken`. Counts the grant and, on success, the issued token.
    pub(crate) fn create_token(
        &mut self,
        req: CreateTokenRequest,
        now: Instant,
        issuer: &str,
    ) -> Result<CreateTokenResponse, ApiError> {
        self.counters.count_grant(&req.grant_type);
        let client = self.authenticate(&req.client_id, &req.client_secret)?;
        let grant = req.grant_type.as_str();
        if !matches!(
            grant,
            GRANT_REFRESH_TOKEN | GRANT_DEVICE_CODE | GRANT_AUTHORIZATION_CODE
        ) {
            return err(
                ServiceErrorKind::UnsupportedGrantType,
                "Unsupported grant type",
            );
        }
        if grant != GRANT_REFRESH_TOKEN
            && let Some(allowed) = &client.grant_types
            && !allowed.iter().any(|g| g == grant)
        {
            return err(
                ServiceErrorKind::UnauthorizedClient,
                "The client is not registered for this grant type",
            );
        }
        let client_scopes = client.scopes.clone();
        let requested = req.scope.clone().unwrap_or_default();
        let response = match grant {
            GRANT_REFRESH_TOKEN => self.refresh_grant(&req, requested, now)?,
            GRANT_DEVICE_CODE => self.device_grant(&req, requested, client_scopes, now, issuer)?,
            _ => self.code_grant(&req, requested, client_scopes, now, issuer)?,
        };
        self.counters.tokens_issued += 1;
        Ok(response)
    }

    fn refresh_grant(
        &mut self,
        req: &CreateTokenRequest,
        requested: Vec<String>,
        now: Instant,
    ) -> Result<CreateTokenResponse, ApiError> {
        let Some(token) = req.refresh_token.as_ref().filter(|t| !t.is_empty()) else {
            return err(
                ServiceErrorKind::InvalidRequest,
                "refreshToken is required for the refresh_token grant",
            );
        };
        let granted = match self.refresh_tokens.get(token.expose()) {
            None => {
                return err(
                    ServiceErrorKind::InvalidGrant,
                    "Invalid refresh token provided",
                );
            }
            Some(entry) if entry.revoked => {
                return err(
                    ServiceErrorKind::InvalidGrant,
                    "Refresh token has been revoked",
                );
            }
            Some(entry) if entry.client_id != req.client_id => {
                return err(
                    ServiceErrorKind::InvalidGrant,
                    "Refresh token was issued to another client",
                );
            }
            Some(entry) => entry.scopes.clone(),
        };
        if !is_subset(&requested, &granted) {
            return err(
                ServiceErrorKind::InvalidScope,
                "Requested scopes exceed those of the refresh token",
            );
        }
        let mut response = self.issue_access(now);
        if self.settings.rotate_refresh_tokens {
            let used = token.expose().to_owned();
            let client_id = req.client_id.clone();
            let next = self.issue_refresh_token(&client_id, &granted);
            if self.settings.rotation_grace {
                // The used token stays valid until its successor is first
                // used; only one unused successor exists at a time.
                let (parent, previous_successor) = match self.refresh_tokens.get_mut(&used) {
                    Some(entry) => (entry.parent.take(), entry.successor.replace(next.clone())),
                    None => (None, None),
                };
                for revoke in parent.into_iter().chain(previous_successor) {
                    if let Some(e) = self.refresh_tokens.get_mut(&revoke) {
                        e.revoked = true;
                    }
                }
                if let Some(e) = self.refresh_tokens.get_mut(&next) {
                    e.parent = Some(used);
                }
            } else if let Some(old) = self.refresh_tokens.get_mut(&used) {
                old.revoked = true;
            }
            response.refresh_token = Some(Secret::new(next));
        }
        Ok(response)
    }

    fn device_grant(
        &mut self,
        req: &CreateTokenRequest,
        requested: Vec<String>,
        client_scopes: Vec<String>,
        now: Instant,
        issuer: &str,
    ) -> Result<CreateTokenResponse, ApiError> {
        let Some(code) = req.device_code.as_ref().filter(|c| !c.is_empty()) else {
            return err(
                ServiceErrorKind::InvalidRequest,
                "deviceCode is required for the device_code grant",
            );
        };
        let Some(entry) = self.devices.get_mut(code.expose()) else {
            return err(
                ServiceErrorKind::InvalidGrant,
                "Invalid device code provided",
            );
        };
        if entry.client_id != req.client_id {
            return err(
                ServiceErrorKind::InvalidGrant,
                "Device code was issued to another client",
            );
        }
        if entry.status == DeviceStatus::Redeemed {
            return err(
                ServiceErrorKind::InvalidGrant,
                "Device code has already been used",
            );
        }
        if now >= entry.expires_at {
            return err(ServiceErrorKind::ExpiredToken, "Device code has expired");
        }
        match entry.status {
            DeviceStatus::Denied => {
                return err(ServiceErrorKind::AccessDenied, "Authorization was denied");
            }
            DeviceStatus::Pending => {
                let too_fast = !entry.interval.is_zero()
                    && entry
                        .last_poll
                        .is_some_and(|last| now.saturating_duration_since(last) < entry.interval);
                entry.last_poll = Some(now);
                if too_fast {
                    entry.interval += SLOW_DOWN_STEP;
                    return err(
                        ServiceErrorKind::SlowDown,
                        "Client is polling too fast; slow down",
                    );
                }
                return err(
                    ServiceErrorKind::AuthorizationPending,
                    "Authorization is pending",
                );
            }
            DeviceStatus::Approved | DeviceStatus::Redeemed => {}
        }
        let scopes = scopes_for_grant(requested, client_scopes)?;
        entry.status = DeviceStatus::Redeemed;
        Ok(self.issue_full(&req.client_id, &scopes, now, issuer))
    }

    fn code_grant(
        &mut self,
        req: &CreateTokenRequest,
        requested: Vec<String>,
        client_scopes: Vec<String>,
        now: Instant,
        issuer: &str,
    ) -> Result<CreateTokenResponse, ApiError> {
        self.check_authorization_code(
            &req.client_id,
            req.code.as_ref(),
            req.redirect_uri.as_deref(),
            req.code_verifier.as_ref(),
            now,
        )?;
        let scopes = scopes_for_grant(requested, client_scopes)?;
        self.use_authorization_code(req.code.as_ref());
        Ok(self.issue_full(&req.client_id, &scopes, now, issuer))
    }

    /// Checks an authorization code grant (`CreateToken` and
    /// `CreateTokenWithIAM` alike) without using the code up.
    pub(crate) fn check_authorization_code(
        &self,
        client_id: &str,
        code: Option<&Secret>,
        redirect_uri: Option<&str>,
        code_verifier: Option<&Secret>,
        now: Instant,
    ) -> Result<(), ApiError> {
        let Some(code) = code.filter(|c| !c.is_empty()) else {
            return err(
                ServiceErrorKind::InvalidRequest,
                "code is required for the authorization_code grant",
            );
        };
        let Some(entry) = self.auth_codes.get(code.expose()) else {
            return err(
                ServiceErrorKind::InvalidGrant,
                "Invalid authorization code provided",
            );
        };
        if entry.client_id != client_id {
            return err(
                ServiceErrorKind::InvalidGrant,
                "Authorization code was issued to another client",
            );
        }
        if entry.used {
            return err(
                ServiceErrorKind::InvalidGrant,
                "Authorization code has already been used",
            );
        }
        if now >= entry.expires_at {
            return err(
                ServiceErrorKind::InvalidGrant,
                "Authorization code has expired",
            );
        }
        if redirect_uri != Some(entry.redirect_uri.as_str()) {
            return err(
                ServiceErrorKind::InvalidGrant,
                "redirectUri does not match the authorization request",
            );
        }
        if let Some(challenge) = &entry.code_challenge {
            let Some(verifier) = code_verifier.filter(|v| !v.is_empty()) else {
                return err(
                    ServiceErrorKind::InvalidGrant,
                    "codeVerifier is required for this authorization code",
                );
            };
            if pkce_s256(verifier.expose()) != *challenge {
                return err(
                    ServiceErrorKind::InvalidGrant,
                    "codeVerifier does not match the code challenge",
                );
            }
        }
        Ok(())
    }

    /// Marks a checked authorization code as used.
    pub(crate) fn use_authorization_code(&mut self, code: Option<&Secret>) {
        if let Some(entry) = code.and_then(|c| self.auth_codes.get_mut(c.expose())) {
            entry.used = true;
        }
    }

    /// A new access token (no refresh token, no id token).
    fn issue_access(&mut self, now: Instant) -> CreateTokenResponse {
        let (token, lifetime) = self.issue_access_token(now, None, None);
        CreateTokenResponse {
            access_token: Some(Secret::new(token)),
            token_type: Some("Bearer".to_owned()),
            expires_in: Some(ceil_secs(lifetime).max(1)),
            refresh_token: None,
            id_token: None,
        }
    }

    /// Records a new access token and returns it with its lifetime. A token
    /// for a subject carries it, readable with
    /// [`token_subject`](super::token_subject).
    pub(crate) fn issue_access_token(
        &mut self,
        now: Instant,
        subject: Option<&str>,
        audience: Option<&str>,
    ) -> (String, Duration) {
        if self.access_tokens.len() >= self.access_tokens_prune_at {
            self.access_tokens.retain(|_, e| now < e.expires_at);
            self.access_tokens_prune_at = (2 * self.access_tokens.len()).max(ACCESS_TOKEN_PRUNE_AT);
        }
        let lifetime = self.settings.access_token_lifetime;
        let token = match subject {
            Some(subject) => format!(
                "{}{}.{}",
                super::SUBJECT_TOKEN_PREFIX,
                URL_SAFE_NO_PAD.encode(subject),
                random_from(URL_SAFE_ALPHABET, 64)
            ),
            None => random_token("aoa", 100),
        };
        self.access_tokens.insert(
            token.clone(),
            AccessEntry {
                expires_at: now + lifetime,
                subject: subject.map(str::to_owned),
                audience: audience.map(str::to_owned),
            },
        );
        (token, lifetime)
    }

    /// Access, refresh and id token, as a first grant gives them.
    fn issue_full(
        &mut self,
        client_id: &str,
        scopes: &[String],
        now: Instant,
        issuer: &str,
    ) -> CreateTokenResponse {
        let mut response = self.issue_access(now);
        response.refresh_token = Some(Secret::new(self.issue_refresh_token(client_id, scopes)));
        response.id_token = Some(Secret::new(fake_id_token(
            issuer,
            client_id,
            self.settings.access_token_lifetime,
            None,
        )));
        response
    }
}

/// A JWT-shaped id token: real-looking header and claims, random signature.
pub(crate) fn fake_id_token(
    issuer: &str,
    client_id: &str,
    lifetime: Duration,
    subject: Option<&str>,
) -> String {
    let iat = epoch_secs();
    let exp = iat + i64::from(ceil_secs(lifetime).max(1));
    let header = serde_json::json!({"alg": "RS256", "typ": "JWT", "kid": "emulator"});
    let claims = serde_json::json!({
        "iss": issuer,
        "sub": subject.map_or_else(|| random_token("", 36), str::to_owned),
        "aud": client_id,
        "iat": iat,
        "exp": exp,
    });
    format!(
        "{}.{}.{}",
        URL_SAFE_NO_PAD.encode(header.to_string()),
        URL_SAFE_NO_PAD.encode(claims.to_string()),
        random_from(URL_SAFE_ALPHABET, 86),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state() -> State {
        State::for_tests()
    }

    fn refresh_req(client: &Registered, token: &str) -> CreateTokenRequest {
        CreateTokenRequest::refresh(
            client.client_id.clone(),
            Secret::new(client.client_secret.clone()),
            Secret::new(token),
        )
    }

    #[test]
    fn ceil_secs_rounds_up() {
        assert_eq!(ceil_secs(Duration::ZERO), 0);
        assert_eq!(ceil_secs(Duration::from_millis(1)), 1);
        assert_eq!(ceil_secs(Duration::from_millis(1000)), 1);
        assert_eq!(ceil_secs(Duration::from_millis(1001)), 2);
    }

    #[test]
    fn pkce_matches_rfc7636_appendix_b() {
        assert_eq!(
            pkce_s256("dBjftJeZ4CVP-mB92K27uhbUJU1p1r_wW1gFWFOEjXk"),
            "E9Melhoa2OwvFrEMTJguCHaoeK1t8URWbuGJSstw-cM"
        );
    }

    #[test]
    fn request_ids_look_like_uuids() {
        let id = request_id();
        let parts: Vec<usize> = id.split('-').map(str::len).collect();
        assert_eq!(parts, [8, 4, 4, 4, 12]);
    }

    #[test]
    fn redirect_uri_check() {
        assert!(is_absolute_http_url("http://127.0.0.1:8080/cb"));
        assert!(is_absolute_http_url("https://example.com/cb"));
        assert!(!is_absolute_http_url("/cb"));
        assert!(!is_absolute_http_url("ftp://example.com/cb"));
        assert!(!is_absolute_http_url("not a url"));
    }

    #[test]
    fn rotation_grace_keeps_the_used_token_until_its_successor_is_used() {
        let mut s = state();
        s.settings.rotation_grace = true;
        let now = Instant::now();
        let client = s.add_client(None, None, vec![], None);
        let rt1 = s.issue_refresh_token(&client.client_id, &[]);
        let rt2 = s
            .create_token(refresh_req(&client, &rt1), now, "x")
            .unwrap()
            .refresh_token
            .unwrap();
        // Crash before rt2 was saved: rt1 still works, and supersedes rt2.
        assert!(s.is_refresh_token_live(&rt1));
        let rt3 = s
            .create_token(refresh_req(&client, &rt1), now, "x")
            .unwrap()
            .refresh_token
            .unwrap();
        assert!(!s.is_refresh_token_live(rt2.expose()));
        // Using rt3 revokes rt1.
        let rt4 = s
            .create_token(refresh_req(&client, rt3.expose()), now, "x")
            .unwrap()
            .refresh_token
            .unwrap();
        assert!(!s.is_refresh_token_live(&rt1));
        assert!(s.is_refresh_token_live(rt3.expose()));
        assert!(s.is_refresh_token_live(rt4.expose()));
        assert_eq!(
            s.create_token(refresh_req(&client, &rt1), now, "x")
                .unwrap_err()
                .kind,
            ServiceErrorKind::InvalidGrant
        );
    }

    #[test]
    fn refresh_rotation_and_scope_subset() {
        let mut s = state();
        let now = Instant::now();
        let client = s.add_client(None, None, vec![], None);
        let scopes = vec!["a".to_owned(), "b".to_owned()];
        let rt = s.issue_refresh_token(&client.client_id, &scopes);

        let wider = refresh_req(&client, &rt).with_scopes(vec!["c".into()]);
        assert_eq!(
            s.create_token(wider, now, "x").unwrap_err().kind,
            ServiceErrorKind::InvalidScope
        );

        let resp = s.create_token(refresh_req(&client, &rt), now, "x").unwrap();
        let new_rt = resp.refresh_token.unwrap();
        assert!(new_rt.expose().starts_with("aor"));
        assert!(!s.is_refresh_token_live(&rt));
        assert!(s.is_refresh_token_live(new_rt.expose()));
        assert!(resp.access_token.unwrap().expose().starts_with("aoa"));
        assert_eq!(
            s.create_token(refresh_req(&client, &rt), now, "x")
                .unwrap_err()
                .kind,
            ServiceErrorKind::InvalidGrant
        );

        s.settings.rotate_refresh_tokens = false;
        let resp = s
            .create_token(refresh_req(&client, new_rt.expose()), now, "x")
            .unwrap();
        assert!(resp.refresh_token.is_none());
        assert!(s.is_refresh_token_live(new_rt.expose()));
        assert_eq!(s.counters.tokens_issued, 2);
        assert_eq!(s.counters.create_token_by_grant["refresh_token"], 4);
    }

    #[test]
    fn refresh_token_of_another_client_is_invalid_grant() {
        let mut s = state();
        let a = s.add_client(None, None, vec![], None);
        let b = s.add_client(None, None, vec![], None);
        let rt = s.issue_refresh_token(&a.client_id, &[]);
        let e = s
            .create_token(refresh_req(&b, &rt), Instant::now(), "x")
            .unwrap_err();
        assert_eq!(e.kind, ServiceErrorKind::InvalidGrant);
        assert!(s.is_refresh_token_live(&rt));
    }

    #[test]
    fn device_flow_slow_down_grows_interval() {
        let mut s = state();
        let t0 = Instant::now();
        let client = s.add_client(None, None, vec![], None);
        let start = s
            .start_device_authorization(
                StartDeviceAuthorizationRequest {
                    client_id: client.client_id.clone(),
                    client_secret: Secret::new(client.client_secret.clone()),
                    start_url: "https://x.awsapps.com/start".into(),
                },
                t0,
                "http://h",
            )
            .unwrap();
        assert_eq!(start.interval, Some(5));
        let user_code = start.user_code.unwrap();
        assert!(user_code.len() == 9 && user_code.as_bytes()[4] == b'-');
        let poll = || {
            CreateTokenRequest::device_code(
                client.client_id.clone(),
                Secret::new(client.client_secret.clone()),
                start.device_code.clone().unwrap(),
            )
        };
        let kind = |r: Result<CreateTokenResponse, ApiError>| r.unwrap_err().kind;
        assert_eq!(
            kind(s.create_token(poll(), t0, "x")),
            ServiceErrorKind::AuthorizationPending
        );
        let t1 = t0 + Duration::from_secs(1);
        assert_eq!(
            kind(s.create_token(poll(), t1, "x")),
            ServiceErrorKind::SlowDown
        );
        // interval is now 10 s: 6 s later is still too fast
        let t2 = t1 + Duration::from_secs(6);
        assert_eq!(
            kind(s.create_token(poll(), t2, "x")),
            ServiceErrorKind::SlowDown
        );
        let t3 = t2 + Duration::from_secs(16);
        assert_eq!(
            kind(s.create_token(poll(), t3, "x")),
            ServiceErrorKind::AuthorizationPending
        );
        assert!(s.decide_device(&user_code, true, t3));
        assert!(!s.decide_device(&user_code, false, t3), "decided once");
        let resp = s.create_token(poll(), t3, "x").unwrap();
        assert!(resp.id_token.unwrap().expose().split('.').count() == 3);
        assert_eq!(
            kind(s.create_token(poll(), t3, "x")),
            ServiceErrorKind::InvalidGrant
        );
    }

    #[test]
    fn fault_script_then_sticky() {
        let mut s = state();
        s.inject(
            Operation::CreateToken,
            [Fault::Html502, Fault::Malformed200],
        );
        s.inject_always(Operation::CreateToken, Some(Fault::EmptyBody(503)));
        assert_eq!(s.take_fault(Operation::CreateToken), Some(Fault::Html502));
        assert_eq!(
            s.take_fault(Operation::CreateToken),
            Some(Fault::Malformed200)
        );
        assert_eq!(
            s.take_fault(Operation::CreateToken),
            Some(Fault::EmptyBody(503))
        );
        assert_eq!(s.take_fault(Operation::RegisterClient), None);
        s.inject_always(Operation::CreateToken, None);
        assert_eq!(s.take_fault(Operation::CreateToken), None);
    }
}
